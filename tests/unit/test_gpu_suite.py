"""The GPU suite's own logic, on the CPU: a row passes only when it ran, every finished row is on disk, a
rerun keeps the passed rows, and the rows still call the engine's real signatures."""

from __future__ import annotations

import inspect
import json

import pytest

from tests.gpu import check
from tests.gpu import rows as R


class _Ctx(R.Context):
    def __init__(self, out):
        super().__init__(gpu=False)
        self.out = out
        self.closed = False

    def close(self) -> None:
        self.closed = True


def test_statuses_and_every_finished_row_on_disk(tmp_path, monkeypatch):
    out = tmp_path / "suite.json"
    seen_on_disk = []

    def passes(ctx):
        return {"ok": True, "value": 1}

    def fails(ctx):
        seen_on_disk.append([r["row"] for r in json.loads(out.read_text())["rows"]])  # written before this row
        return {"ok": False}

    def raises(ctx):
        raise RuntimeError("boom")

    def skips(ctx):
        raise R.Skip("no such model here")

    monkeypatch.setattr(R, "ROWS", {"a": passes, "b": fails, "c": raises, "d": skips})
    ctx = _Ctx(out)
    rows = check.run_rows(["a", "b", "c", "d"], out, {"gpu": "x"}, [], ctx)
    assert [r["status"] for r in rows] == ["passed", "failed", "failed", "skipped"]
    assert seen_on_disk == [["a"]]
    assert "RuntimeError: boom" in rows[2]["error"] and rows[3]["reason"] == "no such model here"
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(rows))
    assert ctx.closed


def test_rerun_failed_runs_only_what_did_not_pass(tmp_path, monkeypatch):
    out = tmp_path / "suite.json"
    out.write_text(json.dumps({"rows": [{"row": "a", "status": "passed"}, {"row": "b", "status": "failed"}]}))
    ran = []
    monkeypatch.setattr(R, "ROWS", {"a": lambda ctx: ran.append("a") or {"ok": True},
                                    "b": lambda ctx: ran.append("b") or {"ok": True}})
    monkeypatch.setattr(check.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(check.torch.cuda, "get_device_name", lambda i: "fake")
    monkeypatch.setattr(R, "Context", lambda gpu=True: _Ctx(out))
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: True)  # no cluster is started for rows that need none
    assert check.main(["--out", str(out), "--rerun-failed"]) == 0
    assert ran == ["b"]
    assert [(r["row"], r["status"]) for r in json.loads(out.read_text())["rows"]] == [("a", "passed"), ("b", "passed")]


def test_a_skipped_row_fails_the_suite_unless_allowed(tmp_path, monkeypatch):
    out = tmp_path / "suite.json"
    monkeypatch.setattr(R, "ROWS", {"s": lambda ctx: (_ for _ in ()).throw(R.Skip("absent"))})
    monkeypatch.setattr(R, "Context", lambda gpu=True: _Ctx(out))
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    assert check.main(["--cpu", "--out", str(out)]) == 1
    assert check.main(["--cpu", "--out", str(out), "--allow-skip", "s"]) == 0


def test_unknown_rows_are_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        check.main(["--cpu", "--rows", "nope"])
    assert exc.value.code == 2 and "unknown row" in capsys.readouterr().err


@pytest.mark.parametrize("func,params", [
    ("actors.distributed:run_ray", {"group", "progress"}),
    ("actors.importance:run_ray_importance", {"group", "spec"}),
    ("actors.group:GroupSpec", {"gpu_fraction", "use_gpu", "backend", "deepspeed", "num_threads", "field"}),
    ("actors.sharded_eval:ShardedEvalGroup", {"spec", "model_cfg", "progress"}),
    ("orchestrator.planner:run_plan_kwargs", {"native_bf16"}),
    ("orchestrator.pruning.sparsegpt:sparsegpt_prune", {"nm"}),
])
def test_rows_call_the_engine_by_its_real_signatures(func, params):
    import importlib

    mod, name = func.split(":")
    assert params <= set(inspect.signature(getattr(importlib.import_module(mod), name)).parameters)
