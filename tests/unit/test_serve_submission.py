"""Job-service request checks that need no Ray: body parsing, root confinement, options, tokens."""

from __future__ import annotations

import pytest

from orchestrator.errors import ConfigError
from orchestrator.surfaces.serve.auth import ApiError, load_token
from orchestrator.surfaces.serve.bodies import parse_config_body as parse_body
from orchestrator.surfaces.serve.options import JobServiceOptions, parse_options
from orchestrator.surfaces.serve.ownership import claim, overlap, release
from orchestrator.surfaces.serve.submission import confine_output, validate_submission


def test_yaml_and_json_bodies_parse_the_same():
    assert parse_body(b"pruning: {pattern: 2:4}", "application/x-yaml") == {"pruning": {"pattern": "2:4"}}
    assert parse_body(b'{"pruning": {"pattern": "2:4"}}', "application/json; charset=utf-8") == {
        "pruning": {"pattern": "2:4"}}
    for body, ctype, status, start in [(b"[1]", "application/json", 400, "config: expected a mapping"),
                                       (b"{", "application/json", 400, "config: invalid JSON"),
                                       (b"", "text/plain", 400, "config: the request body is empty"),
                                       (b"\xff", "text/plain", 400, "config: the request body is not UTF-8"),
                                       (b"{}", "text/html", 415, "content-type: 'text/html'")]:
        with pytest.raises(ApiError) as err:
            parse_body(body, ctype)
        assert err.value.status == status and err.value.message.startswith(start), body


def test_output_dir_is_confined_to_the_root(tmp_path):
    root = (tmp_path / "root").resolve()
    root.mkdir()
    data: dict = {}
    assert confine_output(data, root, "job1") == root / "job1"
    assert data["output"]["dir"] == str(root / "job1")
    data = {"output": {"dir": "team/a/../run"}}
    assert confine_output(data, root, "job2") == root / "team" / "run"
    (root / "link").symlink_to(tmp_path)  # a symlink inside the root that points out of it
    for bad in ("../x", "/etc/x", "~/x", ".", "link/x"):
        with pytest.raises(ApiError) as err:
            confine_output({"output": {"dir": bad}}, root, "j")
        assert err.value.status == 400 and err.value.message.startswith(f"output.dir: {bad!r}"), bad


def test_submission_reports_every_config_problem_in_one_line(tmp_path):
    with pytest.raises(ApiError) as err:
        validate_submission(b"pruning: {sparsity: 1.5, method: x}", "text/plain", tmp_path.resolve(), "j")
    assert err.value.status == 400 and "\n" not in err.value.message
    assert "pruning.method: 'x'" in err.value.message and "pruning.sparsity: must be in (0, 1), got 1.5" in (
        err.value.message)
    (tmp_path / "done").mkdir()
    with pytest.raises(ApiError, match=r"output.dir: .* already exists"):
        validate_submission(b"output: {dir: done}", "text/plain", tmp_path.resolve(), "j")


def test_options_parse_strings_and_name_bad_values():
    opts = parse_options(JobServiceOptions, {"root": "123", "job_num_cpus": "0.5", "max_active_jobs": "3"})
    assert (opts.root, opts.job_num_cpus, opts.max_active_jobs) == ("123", 0.5, 3)
    with pytest.raises(ConfigError) as err:
        parse_options(JobServiceOptions, {"max_active_jobs": "0", "colour": "red"})
    assert err.value.problems == ["colour: unknown key (allowed: cancel_grace_s, job_num_cpus, max_active_jobs, "
                                  "max_body_bytes, max_finished_jobs, max_requeues, num_replicas, policy_file, "
                                  "retention_s, root, token_file)",
                                  "max_active_jobs: must be > 0, got 0"]


def test_token_file_wins_and_is_stripped(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYPRUNE_SERVE_TOKEN", "from-the-environment-0123")
    assert load_token() == "from-the-environment-0123"
    (tmp_path / "tok").write_text("  from-the-file-0123456789\n")
    monkeypatch.setenv("RAYPRUNE_SERVE_TOKEN_FILE", str(tmp_path / "tok"))
    assert load_token() == "from-the-file-0123456789"


def test_release_removes_what_the_job_owns_and_the_parents_it_created(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "a").mkdir()
    (root / "a" / "keep.txt").write_text("other job")
    final = root / "a" / "b" / "run"
    paths = claim(final, "j1", root)
    assert paths.created == [root / "a" / "b"] and (root / "a" / "b").is_dir()  # the registry made it
    (root / "a" / "b" / ".run.tmp-j1" / "model").mkdir(parents=True)
    (root / "a" / "b" / ".run.ckpt").mkdir()
    (root / "a" / "b" / ".run.lock").write_text("")
    removed = release(paths, keep_checkpoint=False, busy=[])
    assert not (root / "a" / "b").exists()  # temp dir, checkpoints, lock and the parent it created
    assert (root / "a" / "keep.txt").is_file() and root.is_dir()
    assert len(removed) == 4


def test_release_touches_nothing_it_did_not_create(tmp_path):
    """Finding 3: cancelling a job whose output.dir is '*' removed every running job's temp dir; the
    cleanup also removed empty parents it never created, racing another job's mkdir."""
    others = [tmp_path / ".run-a.tmp-1", tmp_path / ".run-b.tmp-2", tmp_path / ".[ab].tmp-3",
              tmp_path / ".*.tmp-other", tmp_path / "empty-parent-of-another-job"]
    for d in others:
        d.mkdir()
    paths = claim(tmp_path / "*", "9", tmp_path)
    mine = tmp_path / ".*.tmp-9"
    mine.mkdir()
    assert release(paths, keep_checkpoint=False, busy=[]) == [str(mine)]
    assert all(d.is_dir() for d in others)
    # a parent the job created stays while another active job's directory lies below it
    nested = claim(tmp_path / "shared" / "x" / "run", "10", tmp_path)
    assert release(nested, keep_checkpoint=False, busy=[tmp_path / "shared" / "x" / "run2"]) == []
    assert (tmp_path / "shared" / "x").is_dir()
    assert release(nested, keep_checkpoint=False, busy=[]) == [str(tmp_path / "shared" / "x"),
                                                                str(tmp_path / "shared")]


def test_checkpoints_are_kept_only_when_the_operator_asks(tmp_path):
    paths = claim(tmp_path / "run", "j", tmp_path)
    (tmp_path / ".run.ckpt").mkdir()
    release(paths, keep_checkpoint=True, busy=[])
    assert (tmp_path / ".run.ckpt").is_dir()
    preexisting = claim(tmp_path / "run", "k", tmp_path)  # a checkpoint it did not create is not its own
    release(preexisting, keep_checkpoint=False, busy=[])
    assert (tmp_path / ".run.ckpt").is_dir()


def test_active_jobs_may_not_overlap(tmp_path):
    """Finding 4: only an exact output.dir match among active jobs was refused."""
    active = [("a", tmp_path / "team" / "run")]
    assert overlap(tmp_path / "team" / "run2", active) is None
    for final, word in [(tmp_path / "team" / "run", "is the output"), (tmp_path / "team" / "run" / "x", "inside"),
                        (tmp_path / "team", "contains")]:
        assert word in overlap(final, active), final


def test_output_dir_may_not_touch_published_runs_or_checkpoints(tmp_path):
    """Finding 4: ``<victim>/model/x`` wrote into another run; ``.NAME.ckpt`` could be replaced."""
    root = tmp_path.resolve()
    (root / "victim" / "model").mkdir(parents=True)
    (root / "victim" / "manifest.json").write_text("{}")
    (root / "team" / ".old.ckpt").mkdir(parents=True)
    (root / "team" / ".old.ckpt" / "progress.json").write_text("{}")
    cases = [("victim/model/x", 409, "lies inside the run or checkpoint 'victim'"),
             ("team/.old.ckpt", 400, "names starting with '.' are reserved"),
             ("team/.old.ckpt/x", 400, "names starting with '.' are reserved"),
             ("team", 409, "contains the checkpoint 'team/.old.ckpt'"),
             (".", 400, "escapes the service root")]
    for rel, status, text in cases:
        with pytest.raises(ApiError) as err:
            validate_submission(f"output: {{dir: '{rel}'}}".encode(), "text/plain", root, "j")
        assert err.value.status == status and text in err.value.message, (rel, err.value.message)
    (root / "parent").mkdir()
    (root / "parent" / "victim").mkdir()
    (root / "parent" / "victim" / "manifest.json").write_text("{}")
    with pytest.raises(ApiError) as err:
        validate_submission(b"output: {dir: parent, overwrite: true}", "text/plain", root, "j")
    assert err.value.status == 400 and "output.overwrite: true is refused" in err.value.message


def test_cancel_grace_covers_the_worker_groups_graceful_shutdown():
    """Finding 7: the 5 s grace was shorter than the worker group's 30 s shutdown, so the force-kill
    landed before the group had freed its placement group."""
    import dataclasses
    import inspect

    from actors.group import GroupSpec
    from orchestrator.surfaces.serve.jobs import JobRegistry

    shutdown = next(f.default for f in dataclasses.fields(GroupSpec) if f.name == "shutdown_timeout_s")
    registry_default = inspect.signature(JobRegistry.__ray_actor_class__.__init__).parameters["cancel_grace_s"]
    assert JobServiceOptions().cancel_grace_s > shutdown and registry_default.default > shutdown
