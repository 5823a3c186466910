"""Job-service request checks that need no Ray: body parsing, root confinement, options, tokens."""

from __future__ import annotations

import pytest

from orchestrator.errors import ConfigError
from orchestrator.surfaces.serve.auth import ApiError, load_token
from orchestrator.surfaces.serve.jobs import remove_partial_output
from orchestrator.surfaces.serve.options import JobServiceOptions, parse_options
from orchestrator.surfaces.serve.submission import confine_output, parse_body, validate_submission


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
                                  "max_body_bytes, max_finished_jobs, num_replicas, root, token_file)",
                                  "max_active_jobs: must be > 0, got 0"]


def test_token_file_wins_and_is_stripped(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYPRUNE_SERVE_TOKEN", "from-the-environment-0123")
    assert load_token() == "from-the-environment-0123"
    (tmp_path / "tok").write_text("  from-the-file-0123456789\n")
    monkeypatch.setenv("RAYPRUNE_SERVE_TOKEN_FILE", str(tmp_path / "tok"))
    assert load_token() == "from-the-file-0123456789"


def test_partial_output_cleanup_stops_at_the_root(tmp_path):
    root = tmp_path / "root"
    (root / "a" / "b" / ".run.tmp-x1" / "model").mkdir(parents=True)
    (root / "a" / "keep.txt").write_text("other job")
    removed = remove_partial_output(str(root / "a" / "b" / "run"), str(root))
    assert not (root / "a" / "b").exists()  # temp dir and the now-empty parent
    assert (root / "a" / "keep.txt").is_file() and root.is_dir()
    assert len(removed) == 2


def test_cleanup_of_a_job_named_like_a_pattern_touches_no_other_job(tmp_path):
    """Issue finding: cancelling a job whose output.dir is '*' removed every running job's temp dir."""
    others = [tmp_path / ".run-a.tmp-1", tmp_path / ".run-b.tmp-2", tmp_path / ".[ab].tmp-3"]
    for d in others:
        d.mkdir()
    mine = tmp_path / ".*.tmp-9"
    mine.mkdir()
    assert remove_partial_output(str(tmp_path / "*")) == [str(mine)]
    assert all(d.is_dir() for d in others)
    assert remove_partial_output(str(tmp_path / "[ab]")) == [str(others[2])]
    assert others[0].is_dir() and others[1].is_dir()
