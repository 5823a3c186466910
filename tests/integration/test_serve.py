"""The Ray Serve compression service on localhost: jobs, auth, validation, confinement, cancel, generate."""

from __future__ import annotations

import json
import os
import socket
import threading
from pathlib import Path

import pytest
import ray
import torch
from ray import serve
from transformers import AutoModelForCausalLM, AutoTokenizer

from orchestrator.errors import ConfigError, UsageError
from orchestrator.surfaces.serve import app as job_app
from orchestrator.surfaces.serve import generate as gen_app
from orchestrator.surfaces.serve import jobs as jobs_mod
from orchestrator.surfaces.serve import teardown
from orchestrator.surfaces.serve.auth import TOKEN_ENV, TOKEN_FILE_ENV
from orchestrator.surfaces.serve.client import ServeClient
from tests.conftest import TINY

pytestmark = pytest.mark.integration

TOKEN = "test-token-0123456789abcdef"
TINY_JOB = {
    "model": {"source": "tiny", "tiny": TINY},
    "calibration": {"source": "generate", "num_samples": 4, "seq_len": 32},
    "pruning": {"method": "gblm", "sparsity": 0.5},
    "eval": {"enabled": False},
    "backend": {"kind": "local"},
}
# Self-generated calibration on a wider tiny model: minutes of work, cancelled long before the end.
LONG_JOB_YAML = """
model: {source: tiny, tiny: {layers: 4, hidden: 256, heads: 4, kv_heads: 2, intermediate: 512}}
calibration: {source: generate, num_samples: 64, seq_len: 128}
pruning: {method: sparsegpt}
eval: {enabled: false}
backend: {kind: local}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """A local Ray with the job service at ``/``; yields ``(client, root, url, token_file)``."""
    base = tmp_path_factory.mktemp("serve")
    root = base / "root"
    token_file = base / "token"
    token_file.write_text(TOKEN + "\n")
    hold_dir = base / "hold"  # jobs wait at a phase while a hold file exists (jobs.hold_at_phase)
    hold_dir.mkdir()
    os.environ[jobs_mod.HOLD_DIR_ENV] = str(hold_dir)  # inherited by the Ray workers started below
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    # cancel_grace_s=0: a cancel kills the worker at once, so the service's own cleanup is what is tested
    serve.run(job_app.build_app({"root": str(root), "token_file": str(token_file), "cancel_grace_s": "0"}),
              name="jobs", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    try:
        # a bound on a hang, not on speed: a cancel answers once the job's cleanup is done, which a loaded
        # 2-core machine has been seen to take two minutes over
        yield ServeClient(url, TOKEN, timeout=600), root, url, token_file
    finally:
        serve.shutdown()
        ray.shutdown()
        os.environ.pop(jobs_mod.HOLD_DIR_ENV, None)


@pytest.fixture(scope="module")
def finished_job(service):
    """A tiny job submitted as YAML text and polled to completion."""
    client, root, _, _ = service
    code, body = client.submit(json.dumps(TINY_JOB), "application/x-yaml")  # JSON is YAML too
    assert code == 202, body
    assert body["state"] in ("pending", "running")
    job = client.wait(body["job_id"], timeout=240)
    return job


def test_job_runs_to_completion_and_serves_its_report(service, finished_job):
    client, root, _, _ = service
    job = finished_job
    assert job["state"] == "succeeded", job
    assert job["error"] is None and job["phase"] is None
    assert job["progress"]["done"] == 4 and set(job["progress"]["phases"]) == {"load", "data", "prune", "save"}
    assert job["started_at"] >= job["submitted_at"] and job["finished_at"] >= job["started_at"]
    run_dir = Path(job["run_dir"])
    assert run_dir == root / job["job_id"]  # no output.dir given: <root>/<job_id>
    assert (run_dir / "model" / "config.json").is_file()
    code, report = client.request("GET", f"/v1/jobs/{job['job_id']}/report")
    assert code == 200
    assert report == json.loads((run_dir / "report.json").read_text())
    assert abs(report["sparsity"]["reached"] - 0.5) < 1e-3
    assert report["config"]["output"]["dir"] == str(run_dir)
    code, listing = client.request("GET", "/v1/jobs")
    assert code == 200 and job["job_id"] in [j["job_id"] for j in listing["jobs"]]


def test_every_endpoint_needs_the_token(service, finished_job):
    _, root, url, _ = service
    job_id = finished_job["job_id"]
    before = sorted(p.name for p in root.iterdir())
    calls = [("POST", "/v1/jobs", json.dumps(TINY_JOB)), ("GET", "/v1/jobs", None), ("GET", f"/v1/jobs/{job_id}", None),
             ("GET", f"/v1/jobs/{job_id}/report", None), ("DELETE", f"/v1/jobs/{job_id}", None)]
    for token, message in ((None, "missing"), ("wrong-token-0123456789abcdef", "invalid")):
        anon = ServeClient(url, token)
        for method, path, body in calls:
            code, answer = anon.request(method, path, body, "application/json" if body else None)
            assert code == 401, (method, path, token)
            assert message in answer["error"] and TOKEN not in json.dumps(answer)
    assert sorted(p.name for p in root.iterdir()) == before  # the rejected POSTs started nothing
    code, job = ServeClient(url, TOKEN).status(job_id)
    assert code == 200 and job["state"] == "succeeded"  # the rejected DELETEs cancelled nothing


def test_bad_config_is_400_naming_the_field(service):
    client, root, _, _ = service
    before = sorted(p.name for p in root.iterdir())
    code, body = client.submit("model: {source: tiny}\npruning: {sparsity: 1.5}\n")
    assert code == 400
    assert body["error"].startswith("pruning.sparsity:") and "1.5" in body["error"]
    code, body = client.submit({**TINY_JOB, "pruning": {"method": "gblmm"}})
    assert code == 400 and "pruning.method: 'gblmm'" in body["error"]
    code, body = client.submit("pruning: [1, 2", "application/x-yaml")
    assert code == 400 and body["error"].startswith("config: invalid YAML")
    code, body = client.submit("{}", "image/png")
    assert code == 415
    assert sorted(p.name for p in root.iterdir()) == before


@pytest.mark.parametrize("out_dir", ["../escaped", "a/../../escaped", "/tmp/escaped", "~/escaped"])
def test_output_outside_the_root_is_400(service, out_dir):
    client, root, _, _ = service
    before = sorted(p.name for p in root.iterdir())
    code, body = client.submit({**TINY_JOB, "output": {"dir": out_dir}})
    assert code == 400
    assert body["error"].startswith("output.dir:") and repr(out_dir) in body["error"]
    assert not (root.parent / "escaped").exists()
    assert sorted(p.name for p in root.iterdir()) == before


def test_cancel_stops_the_job_and_leaves_no_output(service):
    client, root, _, _ = service
    hold, arrived = _hold("long", "data")  # the job stops at the start of its calibration phase
    code, body = client.submit(LONG_JOB_YAML + "output: {dir: nested/long}\n")
    assert code == 202, body
    job_id = body["job_id"]
    assert arrived.wait(timeout=180), client.status(job_id)  # the held job announced the phase: an event
    code, job = client.status(job_id, fresh=True)  # the registry recorded the phase before the job held
    assert job["state"] == "running" and job["phase"] == "data", job
    assert (root / "nested" / f".long.tmp-{job_id}").is_dir(), "the run writes into its own temp dir"
    code, job = client.request("DELETE", f"/v1/jobs/{job_id}")
    hold.unlink()
    assert code == 200, job
    assert job["state"] == "cancelled"
    assert not (root / "nested").exists()  # neither the run, nor its temp dir, nor the parent it created
    code, job = client.status(job_id)
    assert job["state"] == "cancelled" and job["run_dir"] is None
    code, body = client.request("GET", f"/v1/jobs/{job_id}/report")
    assert code == 409 and "cancelled" in body["error"]
    code, body = client.request("DELETE", f"/v1/jobs/{job_id}")  # a finished job: deleted (nothing to remove)
    assert code == 200 and body["deleted"] and body["removed"] == [], body
    assert client.status(job_id)[0] == 404 and client.request("DELETE", f"/v1/jobs/{job_id}")[0] == 404
    assert client.request("DELETE", "/v1/jobs/no-such-job")[0] == 404


def test_generate_endpoint_continues_a_prompt_with_the_pruned_checkpoint(service, finished_job):
    _, _, url, token_file = service
    run_dir = finished_job["run_dir"]
    serve.run(gen_app.build_app({"model_dir": run_dir, "token_file": str(token_file), "num_cpus": "0"}),
              name="generate", route_prefix="/gen")
    client = ServeClient(url, TOKEN)
    code, body = client.request("POST", "/gen/v1/generate", {"prompt": "the quick brown", "max_new_tokens": 8})
    assert code == 200, body
    tok = AutoTokenizer.from_pretrained(Path(run_dir) / "model")
    model = AutoModelForCausalLM.from_pretrained(Path(run_dir) / "model").eval()
    ids = tok("the quick brown", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    new = out[0, ids["input_ids"].shape[1]:]
    assert body == {"text": tok.decode(new, skip_special_tokens=True), "tokens": int(new.numel())}
    assert 1 <= body["tokens"] <= 8
    assert ServeClient(url, None).request("POST", "/gen/v1/generate", {"prompt": "x"})[0] == 401
    code, body = client.request("POST", "/gen/v1/generate", {"prompt": "x", "max_new_tokens": 0})
    assert code == 400 and body["error"].startswith("max_new_tokens:")


def test_apps_refuse_to_start_without_a_token(monkeypatch, tmp_path):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    monkeypatch.delenv(TOKEN_FILE_ENV, raising=False)
    with pytest.raises(UsageError, match=r"RAYPRUNE_SERVE_TOKEN"):
        job_app.build_app({"root": str(tmp_path)})
    with pytest.raises(UsageError, match=r"RAYPRUNE_SERVE_TOKEN"):
        gen_app.build_app({"model_dir": str(tmp_path)})
    monkeypatch.setenv(TOKEN_ENV, "short")
    with pytest.raises(UsageError, match=r"at least 16"):
        job_app.build_app({"root": str(tmp_path)})
    monkeypatch.setenv(TOKEN_FILE_ENV, str(tmp_path / "missing"))
    with pytest.raises(UsageError, match=r"token_file: cannot read"):
        job_app.build_app({"root": str(tmp_path)})
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    monkeypatch.delenv(TOKEN_FILE_ENV)
    monkeypatch.delenv("RAYPRUNE_SERVE_ROOT", raising=False)
    with pytest.raises(ConfigError, match=r"root: no service root"):
        job_app.build_app({})
    with pytest.raises(ConfigError, match=r"job_num_cpus: expected float, got 'many'"):
        job_app.build_app({"root": str(tmp_path), "job_num_cpus": "many"})
    assert job_app.build_app({"root": str(tmp_path), "job_num_cpus": "0.5"}) is not None


def _hold(job_name: str, phase: str) -> tuple[Path, threading.Event]:
    """Hold jobs whose output is named ``job_name`` at ``phase``; the event fires when one arrives."""
    hold = Path(os.environ[jobs_mod.HOLD_DIR_ENV]) / f"{job_name}.{phase}.hold"
    hold.write_text("")
    reached = hold.with_suffix(".reached")
    os.mkfifo(reached)  # the job's write blocks until the reader opens it: a rendezvous, no polling
    arrived = threading.Event()
    threading.Thread(target=lambda: (reached.read_text(), arrived.set()), daemon=True).start()
    return hold, arrived


def test_policy_and_malformed_bodies_are_4xx_over_http(service):
    client, _, _, _ = service
    code, body = client.submit("model: {trust_remote_code: true}\ncalibration: {source: /etc/passwd}\n")
    assert code == 400 and "model.trust_remote_code" in body["error"] and "calibration.source" in body["error"]
    code, body = client.submit("a: &a [1]\nb: *a\n")
    assert code == 400 and "anchor" in body["error"]
    code, body = client.submit("x" * (2 << 20))
    assert code == 413 and "exceeds the limit" in body["error"]


def test_jobs_may_not_overlap_and_a_cancelled_ray_job_leaves_no_checkpoint(service):
    """Findings 4 and 7: overlapping output dirs; a cancelled job's ``.NAME.ckpt`` and temp dir leaked,
    and resubmitting to the same directory failed."""
    client, root, _, _ = service
    job = {**TINY_JOB, "backend": {"kind": "ray", "workers": 1}, "output": {"dir": "iso/ckpt-run"}}
    hold, arrived = _hold("ckpt-run", "save")  # after the pruning phase: its checkpoints are on disk
    code, body = client.submit(job)
    assert code == 202, body
    job_id = body["job_id"]
    assert arrived.wait(timeout=240), client.status(job_id)
    assert (root / "iso" / ".ckpt-run.ckpt" / "progress.json").is_file()
    for rel, names in (("iso/ckpt-run", job_id), ("iso/ckpt-run/inner", job_id), ("iso", "iso/.ckpt-run.ckpt")):
        code, body = client.submit({**TINY_JOB, "output": {"dir": rel}})
        assert code == 409 and names in body["error"], (rel, body)
    code, body = client.request("DELETE", f"/v1/jobs/{job_id}")
    hold.unlink()
    assert code == 200 and body["state"] == "cancelled", body
    assert not (root / "iso").exists()  # checkpoints, temp dir, lock and the parent the job got
    code, body = client.submit({**TINY_JOB, "output": {"dir": "iso/ckpt-run"}})  # the same directory: nothing
    assert code == 202, body  # in the way (a one-process job: the cleanup above is what is tested)
    assert client.wait(body["job_id"], timeout=240)["state"] == "succeeded"
    assert (root / "iso" / "ckpt-run" / "report.json").is_file()
    assert not (root / "iso" / ".ckpt-run.ckpt").exists()


def test_a_job_over_its_time_limit_is_cancelled_and_cleaned_up(service):
    """Finding 1: no per-job time limit."""
    from orchestrator.surfaces.serve.submission import validate_submission

    _, root, _, _ = service
    registry = jobs_mod.JobRegistry.remote(root=str(root), cancel_grace_s=0, max_wall_s=0.5)
    cfg = validate_submission(json.dumps({**TINY_JOB, "output": {"dir": "limited/slow"}}).encode(),
                              "application/json", root, "slow-job")
    hold = Path(os.environ[jobs_mod.HOLD_DIR_ENV]) / "slow.data.hold"
    hold.write_text("")  # the job cannot finish: the limit, not the job, ends it (in whichever phase)
    code, body = ray.get(registry.submit.remote("slow-job", cfg.to_dict(), cfg.output.dir))
    assert code == 202, body
    code, body = ray.get(registry.wait.remote("slow-job", 600))  # a bound on a hang: the limit fires in < 1 s
    hold.unlink()
    assert body["state"] == "cancelled" and body["error"].startswith("max_wall_s: the job ran longer"), body
    assert not (root / "limited").exists()
    ray.kill(registry)


class _DroppingRegistry(jobs_mod.JobRegistry.__ray_actor_class__):
    """A registry whose every ``ray.cancel`` is lost, as Ray loses a forced cancel that follows a graceful one."""

    @staticmethod
    def _cancel_task(job, force: bool) -> None:
        pass


def test_a_cancel_ray_drops_still_stops_the_job_by_killing_its_process(service):
    from orchestrator.surfaces.serve.submission import validate_submission

    _, root, _, _ = service
    registry = ray.remote(num_cpus=0)(_DroppingRegistry).remote(root=str(root), cancel_grace_s=0)
    cfg = validate_submission(json.dumps({**TINY_JOB, "output": {"dir": "dropped/held"}}).encode(),
                              "application/json", root, "dropped-job")
    hold, arrived = _hold("held", "data")
    code, body = ray.get(registry.submit.remote("dropped-job", cfg.to_dict(), cfg.output.dir))
    assert code == 202, body
    assert arrived.wait(timeout=180)  # the job holds at its data phase: only a kill can end it now
    code, body = ray.get(registry.cancel.remote("dropped-job"), timeout=600)  # a bound on a hang
    hold.unlink()
    assert code == 200 and body["state"] == "cancelled", body
    assert not (root / "dropped").exists()
    ray.kill(registry)


def test_placement_groups_of_a_killed_job_are_freed_by_name(service):
    """Finding 7: a force-killed job's placement group outlived it (it belongs to the Serve job)."""
    import asyncio

    from ray.util import placement_group_table
    from ray.util.placement_group import placement_group

    from actors.group import PLACEMENT_PREFIX_ENV
    from orchestrator.groups import named_placement

    prefix = teardown.placement_prefix("killed")
    with named_placement(prefix):
        assert os.environ[PLACEMENT_PREFIX_ENV] == prefix  # what ActorGroup names its group after
    assert PLACEMENT_PREFIX_ENV not in os.environ
    mine = placement_group([{"CPU": 0.01}], name=prefix + "a")
    other = placement_group([{"CPU": 0.01}], name=teardown.placement_prefix("alive") + "b")
    ray.get([mine.ready(), other.ready()], timeout=60)
    assert asyncio.run(teardown.free_placement_groups(prefix)) == [prefix + "a"]
    states = {info["name"]: info["state"] for info in placement_group_table().values()}
    assert states[prefix + "a"] == "REMOVED" and states[teardown.placement_prefix("alive") + "b"] == "CREATED"
    ray.util.remove_placement_group(other)


def test_replica_copy_follows_the_registry_change_feed(service):
    """The fast status path: reads come from the replica's copy, which the change feed keeps current."""
    import asyncio

    from orchestrator.surfaces.serve.submission import validate_submission

    _, root, _, _ = service
    registry = jobs_mod.JobRegistry.remote(root=str(root), max_finished_jobs=1)
    direct_reads = []

    async def call(method, *args):
        if method == "get":
            direct_reads.append(args[0])
        return await getattr(registry, method).remote(*args)

    def cfg(name):
        return validate_submission(json.dumps({**TINY_JOB, "output": {"dir": f"feed/{name}"}}).encode(),
                                   "application/json", root, name).to_dict()

    async def state_when(mirror, job_id, state):
        while (view := (await mirror.get(job_id))[1])["state"] != state:
            await mirror.next_update()  # the registry has recorded it (awaited below): the feed delivers it
        return view

    async def scenario():
        mirror = job_app.JobMirror(call)
        assert (await mirror.get("nope"))[0] == 404 and direct_reads == ["nope"]  # unknown: asked directly
        code, view = await call("submit", "a", cfg("a"), str(root / "feed" / "a"))
        assert code == 202
        mirror.offer(view)  # what the replica does with its own submission
        await call("wait", "a", 240)
        final = await asyncio.wait_for(state_when(mirror, "a", "succeeded"), 60)
        assert final["version"] > view["version"] and direct_reads == ["nope"]  # no direct read of "a"
        mirror.offer(view)  # an older view never replaces a newer one
        assert (await mirror.get("a"))[1]["state"] == "succeeded"
        await call("submit", "b", cfg("b"), str(root / "feed" / "b"))
        await call("wait", "b", 240)
        await asyncio.wait_for(state_when(mirror, "b", "succeeded"), 60)
        code, _ = await mirror.get("a")  # forgotten by the registry (max_finished_jobs=1): gone here too
        assert code == 404 and direct_reads == ["nope", "a"]

    asyncio.run(scenario())
    ray.kill(registry)


def test_jobs_survive_the_loss_of_their_registry(service):
    """Issue 30, finding 1: the registry's state lived in its actor only. Kill it while two jobs hold both CPUs:
    a new registry on the same root knows both (failed, with the reason), nothing they owned is left, and a new
    job gets the freed CPUs and runs."""
    from ray.util import placement_group_table

    from orchestrator.surfaces.serve.submission import validate_submission

    _, service_root, _, _ = service
    root = service_root / "survive"  # a root of its own: one registry per root
    root.mkdir()
    first = jobs_mod.JobRegistry.remote(root=str(root), cancel_grace_s=0)
    holds, ids = [], []
    for name in ("lost-a", "lost-b"):
        cfg = validate_submission(json.dumps({**TINY_JOB, "output": {"dir": f"held/{name}"}}).encode(),
                                  "application/json", root, name)
        hold, arrived = _hold(name, "data")
        code, body = ray.get(first.submit.remote(name, cfg.to_dict(), cfg.output.dir))
        assert code == 202, body
        assert arrived.wait(timeout=240), ray.get(first.get.remote(name))
        holds.append(hold)
        ids.append(name)
    assert any(p.name.startswith(".lost-a.tmp-") for p in (root / "held").iterdir())
    cfg = validate_submission(json.dumps({**TINY_JOB, "output": {"dir": "held/lost-q"}}).encode(),
                              "application/json", root, "lost-q")
    assert ray.get(first.submit.remote("lost-q", cfg.to_dict(), cfg.output.dir))[0] == 202
    code, body = ray.get(first.get.remote("lost-q"))  # both CPUs are held: it waits its turn (finding 3)
    assert body["state"] == "pending" and body["queue_position"] == 1, body
    ray.kill(first)  # as when its node is lost: no cleanup of its own
    second = jobs_mod.JobRegistry.remote(root=str(root), cancel_grace_s=0, job_num_cpus=2)  # one job fills it
    for job_id, state in (("lost-a", "running"), ("lost-b", "running"), ("lost-q", "pending")):
        code, body = ray.get(second.wait.remote(job_id, 600))  # a bound on a hang
        assert code == 200 and body["state"] == "failed", body
        assert body["error"].startswith(f"the job service restarted while this job was {state}"), body
    assert not (root / "held").exists()  # temp dirs, locks and the parent they were given
    alive = [i["name"] for i in placement_group_table().values()
             if i["name"].startswith(teardown.placement_prefix("lost")) and i["state"] != "REMOVED"]
    assert alive == []
    for hold in holds:
        hold.unlink()
    # the freed CPUs run a new job (both of them); another waits in the queue until it is done, then runs
    queue = []
    for name, rel in (("after", "held/lost-a"), ("after-q", "held/after-q")):
        cfg = validate_submission(json.dumps({**TINY_JOB, "output": {"dir": rel}}).encode(), "application/json",
                                  root, name)
        (Path(os.environ[jobs_mod.HOLD_DIR_ENV]) / f"{Path(rel).name}.data.reached").unlink(missing_ok=True)
        hold, arrived = _hold(Path(rel).name, "data") if name != "after-q" else (None, None)
        code, body = ray.get(second.submit.remote(name, cfg.to_dict(), cfg.output.dir))
        assert code == 202, body
        if arrived is not None:
            assert arrived.wait(timeout=240), ray.get(second.get.remote(name))
        queue.append(hold)
    code, body = ray.get(second.get.remote("after-q"))
    assert body["state"] == "pending" and body["queue_position"] == 1, body
    for hold in queue[:1]:
        hold.unlink()
    for name in ("after", "after-q"):
        code, body = ray.get(second.wait.remote(name, 600))
        assert body["state"] == "succeeded", body  # the lost jobs' CPUs were free again
    third = jobs_mod.JobRegistry.remote(root=str(root), cancel_grace_s=0)  # and a restart keeps finished jobs
    listed = {j["job_id"]: j["state"] for j in ray.get(third.list_jobs.remote())[1]["jobs"]}
    assert listed == {"lost-a": "failed", "lost-b": "failed", "lost-q": "failed", "after": "succeeded",
                      "after-q": "succeeded"}
    code, body = ray.get(third.delete.remote("after"))  # DELETE of a finished job: its run goes, and the job
    assert code == 200 and body["deleted"] and body["removed"] == [str(root / "held" / "lost-a")], body
    assert not (root / "held" / "lost-a").exists() and ray.get(third.get.remote("after"))[0] == 404
    for registry in (second, third):
        ray.kill(registry)


def _rearm(job_name: str, phase: str) -> tuple[Path, threading.Event]:
    """:func:`_hold` again for a phase a job already reached once (its rendezvous FIFO is made anew)."""
    (Path(os.environ[jobs_mod.HOLD_DIR_ENV]) / f"{job_name}.{phase}.reached").unlink(missing_ok=True)
    return _hold(job_name, phase)


def test_a_job_lost_with_its_registry_continues_from_its_checkpoint(service):
    """Findings 1 and 8: a distributed job lost with its registry is submitted again and continues its checkpoint
    (before: failed, and its checkpoint removed); a checkpoint kept by a cancelled job blocked its output.dir for
    good: DELETE of that job removes it."""
    from orchestrator.surfaces.serve.submission import validate_submission

    _, service_root, _, _ = service
    root = service_root / "requeue"
    root.mkdir()
    data = {**TINY_JOB, "backend": {"kind": "ray", "workers": 1}, "output": {"dir": "kept/run"}}
    cfg = validate_submission(json.dumps(data).encode(), "application/json", root, "lost")
    ckpt = root / "kept" / ".run.ckpt"
    first = jobs_mod.JobRegistry.remote(root=str(root), cancel_grace_s=0, keep_failed_checkpoints=True)
    hold, arrived = _hold("run", "save")  # the pruning phases are done and checkpointed
    assert ray.get(first.submit.remote("lost", cfg.to_dict(), cfg.output.dir))[0] == 202
    assert arrived.wait(timeout=240), ray.get(first.get.remote("lost"))
    saved = (ckpt / "progress.json").read_bytes()
    ray.kill(first)
    hold, arrived = _rearm("run", "save")
    second = jobs_mod.JobRegistry.remote(root=str(root), cancel_grace_s=0, keep_failed_checkpoints=True)
    code, body = ray.get(second.get.remote("lost"))
    assert code == 200 and body["state"] in ("pending", "running") and body["restarts"] == 1, body
    assert arrived.wait(timeout=240), ray.get(second.get.remote("lost"))
    code, body = ray.get(second.get.remote("lost"))
    assert body["resumed"] and body["state"] == "running", body
    assert (ckpt / "progress.json").read_bytes() == saved  # continued: nothing recomputed, nothing rewritten
    code, body = ray.get(second.cancel.remote("lost"), timeout=600)  # a bound on a hang
    assert code == 200 and body["state"] == "cancelled", body
    assert (ckpt / "progress.json").is_file()  # kept for the operator (keep_failed_checkpoints)
    hold.unlink()
    code, body = ray.get(second.delete.remote("lost"))  # DELETE of the job that kept it removes it
    assert code == 200 and str(ckpt) in body["removed"] and not ckpt.exists(), body
    cfg = validate_submission(json.dumps(data).encode(), "application/json", root, "again")
    assert ray.get(second.submit.remote("again", cfg.to_dict(), cfg.output.dir))[0] == 202  # its output.dir is free
    code, body = ray.get(second.wait.remote("again", 600))
    assert body["state"] == "succeeded" and not body["resumed"] and body["restarts"] == 0, body
    assert (root / "kept" / "run" / "report.json").is_file() and not ckpt.exists()
    ray.kill(second)


def test_a_job_over_its_disk_limit_is_cancelled_and_cleaned_up(service):
    """Finding 4: nothing bounded what a job writes below the root."""
    from orchestrator.surfaces.serve.submission import validate_submission

    _, root, _, _ = service
    registry = jobs_mod.JobRegistry.remote(root=str(root), cancel_grace_s=0, max_job_bytes=1000, disk_check_s=0.05)
    data = {**TINY_JOB, "backend": {"kind": "ray", "workers": 1}, "output": {"dir": "disk/big"}}
    cfg = validate_submission(json.dumps(data).encode(), "application/json", root, "big")
    hold = Path(os.environ[jobs_mod.HOLD_DIR_ENV]) / "big.save.hold"
    hold.write_text("")  # the job cannot finish: its checkpoints are far over 1000 bytes by its save phase
    assert ray.get(registry.submit.remote("big", cfg.to_dict(), cfg.output.dir))[0] == 202
    code, body = ray.get(registry.wait.remote("big", 600))  # a bound on a hang
    hold.unlink()
    assert body["state"] == "cancelled" and body["error"].startswith("max_job_bytes: the job wrote "), body
    assert not (root / "disk").exists()
    ray.kill(registry)
