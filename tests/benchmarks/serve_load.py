"""Load test of the compression service: concurrent job submissions and status requests.

Starts a local Ray + Serve job service (or targets ``--url`` with ``--token``/``$RAYPRUNE_SERVE_TOKEN``),
fires ``--jobs`` concurrent submissions of the tiny model (``configs/tiny.yaml``, self-generated
calibration), then, once the first jobs run, measures ``GET /v1/jobs/{id}`` two ways while they run
(the other jobs wait in Ray's queue): ``status``: ``--pollers`` clients (one per job, as users
watching their jobs) each reading its job's status ``--polls`` times in a row; ``status_burst``:
``--status-requests`` requests released at once (a throughput test: on a small machine its
latency is the queue of the whole burst). Then it waits for every job, prints a table and writes JSON::

    python tests/benchmarks/serve_load.py --out bench-out/serve_load.json
    python tests/benchmarks/serve_load.py --url http://head:8000 --out load.json

JSON: ``{"status": {"requests", "errors", "p50_ms", "p99_ms"}, "status_burst": {...}, "submit": {...},
"jobs": {...}}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from orchestrator.inputs.yamlconf import yaml_load
from orchestrator.surfaces.serve.client import ServeClient

log = logging.getLogger("bench.serve_load")
TINY_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"


def fire(n: int, call) -> tuple[list[float], list[tuple[int, object]]]:
    """Run ``call(i)`` for ``i < n`` on ``n`` threads released together; returns latencies (ms) and answers."""
    barrier = threading.Barrier(n)

    def one(i: int) -> tuple[float, tuple[int, object]]:
        barrier.wait()
        t0 = time.perf_counter()
        try:
            answer = call(i)
        except Exception as exc:  # noqa: BLE001 - a transport error counts as an error
            answer = (0, repr(exc))
        return (time.perf_counter() - t0) * 1000, answer

    with ThreadPoolExecutor(max_workers=n) as pool:
        results = list(pool.map(one, range(n)))
    return [r[0] for r in results], [r[1] for r in results]


def summarize(latencies: list[float], answers: list[tuple[int, object]], ok: tuple[int, ...]) -> dict:
    """Request count, errors (status not in ``ok``) and p50/p99 latency in ms."""
    q = statistics.quantiles(latencies, n=100, method="inclusive") if len(latencies) > 1 else latencies * 99
    errors = [a for a in answers if a[0] not in ok]
    for code, body in errors[:3]:
        log.warning("error answer: HTTP %s %s", code, str(body)[:200])
    return {"requests": len(answers), "errors": len(errors), "p50_ms": round(q[49], 1), "p99_ms": round(q[98], 1)}


def poll(n_clients: int, polls: int, call) -> tuple[list[float], list[tuple[int, object]]]:
    """``n_clients`` threads, released together, each running ``call(i)`` ``polls`` times in a row."""
    def many(i: int) -> list[tuple[float, tuple[int, object]]]:
        out = []
        for _ in range(polls):
            t0 = time.perf_counter()
            try:
                answer = call(i)
            except Exception as exc:  # noqa: BLE001 - a transport error counts as an error
                answer = (0, repr(exc))
            out.append(((time.perf_counter() - t0) * 1000, answer))
        return out

    barrier = threading.Barrier(n_clients)
    with ThreadPoolExecutor(max_workers=n_clients) as pool:
        results = [r for rs in pool.map(lambda i: (barrier.wait(), many(i))[1], range(n_clients)) for r in rs]
    return [r[0] for r in results], [r[1] for r in results]


def run_load(client: ServeClient, jobs: int, status_requests: int, job_timeout: float, pollers: int = 20,
             polls: int = 10, num_samples: int = 256) -> dict:
    """Submit ``jobs`` tiny jobs, read their status while they run (pollers, then a burst); wait for the jobs."""
    config = yaml_load(TINY_CONFIG.read_text())
    config.pop("output", None)  # each job writes <root>/<job_id>
    config["calibration"]["num_samples"] = num_samples  # jobs of several seconds: reads happen while they run
    body = json.dumps(config)
    t0 = time.perf_counter()
    sub_lat, sub_ans = fire(jobs, lambda i: client.submit(body, "application/json"))
    ids = [a[1]["job_id"] for a in sub_ans if a[0] == 202]
    log.info("%d/%d submissions accepted in %.2f s", len(ids), jobs, time.perf_counter() - t0)
    if not ids:
        raise SystemExit("no job was accepted; nothing to read the status of")
    deadline = time.perf_counter() + 120  # read statuses while jobs run, not while workers are still starting
    while time.perf_counter() < deadline and not any(client.status(i)[1].get("state") == "running" for i in ids[:2]):
        time.sleep(0.5)
    po_lat, po_ans = poll(pollers, polls, lambda i: client.status(ids[i % len(ids)]))
    st_lat, st_ans = fire(status_requests, lambda i: client.status(ids[i % len(ids)]))
    seen = Counter(a[1]["state"] for a in po_ans + st_ans if a[0] == 200)
    log.info("states seen by the status requests: %s", dict(seen))
    finals = {}
    for job_id in ids:
        remaining = max(1.0, job_timeout - (time.perf_counter() - t0))
        finals[job_id] = client.wait(job_id, timeout=remaining, poll=1.0)
    wall = time.perf_counter() - t0
    states = Counter(j["state"] for j in finals.values())
    for job in finals.values():
        if job["state"] != "succeeded":
            log.warning("job %s %s: %s", job["job_id"], job["state"], job["error"])
    return {
        "submit": summarize(sub_lat, sub_ans, (202,)),
        "status": {**summarize(po_lat, po_ans, (200,)), "clients": pollers},
        "status_burst": summarize(st_lat, st_ans, (200,)),
        "jobs": {"submitted": len(ids), **{s: states.get(s, 0) for s in ("succeeded", "failed", "cancelled")},
                 "wall_s": round(wall, 1), "states_during_status_burst": dict(seen)},
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_child(root: str, token_file: str, num_cpus: int) -> None:
    """Run a local Ray + the job service until stdin closes; prints the HTTP port first."""
    import ray
    from ray import serve

    from orchestrator.surfaces.serve.app import build_app

    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app({"root": root, "token_file": token_file}), name="jobs", route_prefix="/")
        print(port, flush=True)
        sys.stdin.read()
    finally:
        serve.shutdown()
        ray.shutdown()


def main() -> None:
    """Command line entry point."""
    if len(sys.argv) == 5 and sys.argv[1] == "--serve-child":
        serve_child(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="an existing service (default: start a local Ray + Serve app)")
    parser.add_argument("--token", help="bearer token for --url (default $RAYPRUNE_SERVE_TOKEN)")
    parser.add_argument("--jobs", type=int, default=20, help="concurrent job submissions")
    parser.add_argument("--pollers", type=int, default=20, help="clients reading status in a loop")
    parser.add_argument("--polls", type=int, default=10, help="status reads per polling client")
    parser.add_argument("--status-requests", type=int, default=200, help="status requests of the burst")
    parser.add_argument("--num-samples", type=int, default=256, help="calibration windows of each tiny job")
    parser.add_argument("--num-cpus", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                        help="CPUs the local Ray gives jobs (default: all but one, which serves HTTP as the "
                             "head node does in deploy/kuberay/rayservice.yaml, where jobs run on workers)")
    parser.add_argument("--job-timeout", type=float, default=1800, help="seconds to wait for all jobs")
    parser.add_argument("--out", type=Path, required=True, help="JSON results file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    if args.url:
        token = args.token or os.environ.get("RAYPRUNE_SERVE_TOKEN")
        if not token:
            parser.error("--token or $RAYPRUNE_SERVE_TOKEN is required with --url")
        results = run_load(ServeClient(args.url, token), args.jobs, args.status_requests, args.job_timeout,
                           args.pollers, args.polls, args.num_samples)
    else:
        with tempfile.TemporaryDirectory(prefix="rayprune-serve-load-") as tmp:
            token = secrets.token_urlsafe(24)
            token_file = Path(tmp) / "token"
            token_file.write_text(token)
            # the service in its own process, as clients are elsewhere in production: the client threads
            # here do not share a GIL with the Ray driver
            child = subprocess.Popen([sys.executable, __file__, "--serve-child", str(Path(tmp) / "runs"),
                                      str(token_file), str(args.num_cpus)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
            try:
                port = int(child.stdout.readline())
                client = ServeClient(f"http://127.0.0.1:{port}", token)
                results = run_load(client, args.jobs, args.status_requests, args.job_timeout, args.pollers,
                                   args.polls, args.num_samples)
            finally:
                child.stdin.close()  # the child shuts Serve and Ray down and exits
                child.wait(timeout=120)
        results["setup"] = {"local_ray_cpus": args.num_cpus, "job_num_cpus": 1}

    log.info("%-12s %9s %7s %9s %9s", "endpoint", "requests", "errors", "p50 ms", "p99 ms")
    for name in ("submit", "status", "status_burst"):
        r = results[name]
        log.info("%-12s %9d %7d %9.1f %9.1f", name, r["requests"], r["errors"], r["p50_ms"], r["p99_ms"])
    j = results["jobs"]
    log.info("jobs: %d submitted, %d succeeded, %d failed, all done after %.1f s",
             j["submitted"], j["succeeded"], j["failed"], j["wall_s"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
