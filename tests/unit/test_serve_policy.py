"""The operator's job policy: what a submitted config may name and how much work it may ask for.

Finding 1 of the hardening review: the job API accepted every run-config field (remote code,
pickles, any file on disk, any hub download, unbounded work).
"""

from __future__ import annotations

import pytest

from orchestrator.errors import ConfigError
from orchestrator.inputs.loader import config_from_dict
from orchestrator.surfaces.serve.auth import ApiError
from orchestrator.surfaces.serve.policy import JobPolicy, load_policy, policy_problems
from orchestrator.surfaces.serve.submission import validate_submission


def _problems(data: dict, policy: JobPolicy | None = None) -> list[str]:
    return policy_problems(config_from_dict(data), policy or JobPolicy())


def test_the_default_policy_allows_builtin_work():
    assert _problems({}) == []  # the embedded default: builtin model and data
    assert _problems({"model": {"source": "tiny"}, "calibration": {"source": "generate"},
                      "eval": {"tasks": ["debian_cloze"]}}) == []


@pytest.mark.parametrize("data, field", [
    ({"model": {"trust_remote_code": True}}, "model.trust_remote_code: true is refused"),
    ({"model": {"allow_pickle": True}}, "model.allow_pickle: true is refused"),
    ({"model": {"source": "/etc"}}, "model.source: '/etc' is outside the allowed model directories"),
    ({"model": {"source": "meta-llama/Llama-2-70b-hf"}}, "model.source: 'meta-llama/Llama-2-70b-hf' is not an "
                                                         "allowed hub model"),
    ({"model": {"source": "../models/x"}}, "model.source: '../models/x': local sources must be absolute"),
    ({"calibration": {"source": "/etc/passwd"}}, "calibration.source: '/etc/passwd' is outside"),
    ({"calibration": {"source": "wikitext"}}, "calibration.source: 'wikitext' is not an allowed hub dataset"),
    ({"eval": {"source": "/root/.ssh/id_rsa"}}, "eval.source: '/root/.ssh/id_rsa' is outside"),
    ({"eval": {"tasks": ["/etc/shadow"]}}, "eval.tasks[0]: '/etc/shadow' is outside"),
    ({"eval": {"tasks": ["lm_eval:hellaswag"]}}, "eval.tasks[0]: 'lm_eval:hellaswag' is not a builtin task"),
    ({"structured": {"recovery": {"source": "/var/log/syslog"}}}, "structured.recovery.source: '/var/log/syslog'"),
    ({"backend": {"address": "ray://elsewhere:10001"}}, "backend.address: 'ray://elsewhere:10001'"),
    ({"calibration": {"num_samples": 100000}}, "calibration.num_samples: 100000 exceeds the service limit of 256"),
    ({"calibration": {"seq_len": 65536}}, "calibration.seq_len: 65536 exceeds"),
    ({"eval": {"num_windows": 1000000}}, "eval.num_windows: 1000000 exceeds"),
    ({"structured": {"recovery": {"steps": 10 ** 7}}}, "structured.recovery.steps: 10000000 exceeds"),
    ({"backend": {"workers": 512}}, "backend.workers: 512 exceeds"),
    ({"output": {"overwrite": True}}, "output.overwrite: true is refused"),
    # issue 30, finding 4: the shape of a random model, threads, iterations and retries are bounded too
    ({"model": {"source": "tiny", "tiny": {"layers": 80, "hidden": 8192, "intermediate": 28672, "heads": 64,
                                           "kv_heads": 8}}}, "model.tiny: a shape of 68,"),
    ({"backend": {"num_threads": 100000}}, "backend.num_threads: 100000 exceeds"),
    ({"pruning": {"lstsq": {"iters": 10 ** 9}}}, "pruning.lstsq.iters: 1000000000 exceeds"),
    ({"pruning": {"lstsq": {"rounds": 1000}}}, "pruning.lstsq.rounds: 1000 exceeds"),
    ({"pruning": {"block_tune": {"epochs": 10 ** 6}}}, "pruning.block_tune.epochs: 1000000 exceeds"),
    ({"backend": {"max_retries": 10 ** 6}}, "backend.max_retries: 1000000 exceeds"),
    ({"pruning": {"admm": {"max_iters": 10 ** 7}}}, "pruning.admm.max_iters: 10000000 exceeds"),
    ({"pruning": {"swaps": 10 ** 7, "reconstruct": "layer"}}, "pruning.swaps: 10000000 exceeds"),
])
def test_the_default_policy_refuses(data, field):
    problems = _problems(data)
    assert any(p.startswith(field) for p in problems), problems


def test_allow_lists_open_exactly_what_they_name(tmp_path):
    models, data = tmp_path / "models", tmp_path / "data"
    (models / "m").mkdir(parents=True)
    data.mkdir()
    (tmp_path / "outside.parquet").write_text("x")
    (data / "link.parquet").symlink_to(tmp_path / "outside.parquet")  # a link out of the root is outside
    policy = JobPolicy(model_roots=[str(models)], data_roots=[str(data)], hub_models=["org/*"],
                       hub_datasets=["wikitext"], lm_eval_tasks=["arc_*"], max_num_samples=40)
    assert _problems({"model": {"source": str(models / "m")}, "calibration": {"source": "wikitext"},
                      "eval": {"source": str(data / "e.parquet"), "tasks": ["lm_eval:arc_easy"],
                               "task_limit": 50}}, policy) == []
    assert _problems({"model": {"source": "org/model"}}, policy) == []
    # `org/*` matches `org/..` and `org/.x`: relative paths, never hub ids (issue 30, finding 10)
    for name in ("org/..", "org/.", "org/.hidden", "org/x--y"):
        (problem,) = _problems({"model": {"source": name}}, policy)
        assert problem.startswith(f"model.source: {name!r} is not a hub id"), problem
    (problem,) = _problems({"calibration": {"source": "wikitext/.."}}, JobPolicy(hub_datasets=["wikitext*"]))
    assert problem.startswith("calibration.source: 'wikitext/..' is not a hub id"), problem
    refused = _problems({"model": {"source": "other/model"}, "calibration": {"source": str(data / "link.parquet"),
                                                                            "num_samples": 41},
                         "eval": {"tasks": ["lm_eval:arc_easy"]}}, policy)
    assert [p.split(":")[0] for p in refused] == ["model.source", "calibration.source", "eval.task_limit",
                                                  "calibration.num_samples"], refused


def test_a_refusal_is_a_400_naming_every_field_and_no_file_content(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOKEN=hunter2-do-not-leak\n")
    body = f"model: {{trust_remote_code: true}}\ncalibration: {{source: {secret}}}\n".encode()
    with pytest.raises(ApiError) as err:
        validate_submission(body, "text/plain", tmp_path.resolve(), "j")
    assert err.value.status == 400 and "\n" not in err.value.message
    assert "model.trust_remote_code" in err.value.message and "calibration.source" in err.value.message
    assert "hunter2" not in err.value.message


def test_a_run_inside_the_output_dir_is_refused_even_when_overwrite_is_allowed(tmp_path):
    root = tmp_path.resolve()
    (root / "parent" / "victim").mkdir(parents=True)
    (root / "parent" / "victim" / "manifest.json").write_text("{}")
    with pytest.raises(ApiError) as err:
        validate_submission(b"output: {dir: parent, overwrite: true}", "text/plain", root, "j",
                            JobPolicy(allow_overwrite=True))
    assert err.value.status == 409 and "contains the run or checkpoint 'parent/victim'" in err.value.message


def test_policy_file_is_validated_with_one_line_per_problem(tmp_path, monkeypatch):
    assert load_policy(None) == JobPolicy()
    good = tmp_path / "policy.yaml"
    good.write_text(f"data_roots: [{tmp_path}]\nmax_wall_s: 60\n")
    assert load_policy(str(good)).max_wall_s == 60
    monkeypatch.setenv("RAYPRUNE_SERVE_POLICY", str(good))
    assert load_policy(None).data_roots == [str(tmp_path.resolve())]
    bad = tmp_path / "bad.yaml"
    bad.write_text("max_wall_s: -1\ncolour: red\ndata_roots: [relative/dir]\n")
    with pytest.raises(ConfigError) as err:
        load_policy(str(bad))
    assert [p.split(":")[1].strip() for p in err.value.problems] == ["data_roots", "max_wall_s", "colour"]


@pytest.mark.parametrize("shape", [{}, {"layers": 3, "hidden": 96, "heads": 6, "kv_heads": 2, "intermediate": 200}])
def test_tiny_params_counts_what_transformers_builds(shape):
    """The policy's size of a random model is computed from its shape; it must equal the real model's count."""
    import torch
    from transformers import LlamaForCausalLM

    from orchestrator.inputs.config import TinyModelConfig
    from orchestrator.inputs.models import tiny_llama_config, tiny_params

    tiny = TinyModelConfig(**shape)
    with torch.device("meta"):
        model = LlamaForCausalLM(tiny_llama_config(tiny))
    assert tiny_params(tiny) == sum(p.numel() for p in model.parameters())


def test_the_tiny_model_cache_keeps_the_recently_used(tmp_path):
    """Generated tiny models are trimmed to the most recently used (finding 4: cached forever before)."""
    import os

    from orchestrator.inputs.models import TINY_CACHE_GRACE_S, TINY_CACHE_KEEP, _trim_tiny_cache

    old = 1_000_000.0  # long past the grace period
    made = []
    for i in range(TINY_CACHE_KEEP + 3):
        d = tmp_path / f"tiny-{i:02d}"
        d.mkdir()
        os.utime(d, (old + i, old + i))
        made.append(d)
    fresh = tmp_path / "tiny-fresh"
    fresh.mkdir()  # just used: kept whatever its rank
    current = made[0]  # the oldest, but the one being returned
    _trim_tiny_cache(tmp_path, current)
    kept = sorted(p.name for p in tmp_path.iterdir())
    assert kept == sorted([fresh.name, current.name] + [d.name for d in made[-(TINY_CACHE_KEEP - 1):]])
    assert TINY_CACHE_GRACE_S > 0


def test_a_policy_can_require_hub_sources_pinned_to_a_commit():
    """Issue 30, finding 6: hub sources were read at whatever their branch held when each process looked."""
    policy = JobPolicy(hub_models=["org/*"], hub_datasets=["wikitext"], require_pinned=True)
    commit = "0123456789abcdef0123456789abcdef01234567"
    refused = _problems({"model": {"source": "org/m", "revision": "main"},
                         "calibration": {"source": "wikitext"}}, policy)
    assert [p.split(":")[0] for p in refused] == ["model.revision", "calibration.revision"], refused
    assert _problems({"model": {"source": "org/m", "revision": commit},
                      "calibration": {"source": "wikitext", "revision": commit}}, policy) == []
    assert _problems({}, policy) == []  # builtin model and data need no pin


def test_a_job_whose_weights_alone_exceed_the_disk_cap_is_refused():
    """Finding 4: no cap on what a job writes. The known size (2 bytes a parameter) is checked before a job starts."""
    from orchestrator.inputs.config import TinyModelConfig
    from orchestrator.inputs.models import tiny_params

    need = 2 * tiny_params(TinyModelConfig())
    assert _problems({"model": {"source": "tiny"}}, JobPolicy(max_job_bytes=need)) == []
    (problem,) = _problems({"model": {"source": "tiny"}}, JobPolicy(max_job_bytes=need - 1))
    assert problem.startswith(f"model.source: 'tiny': its weights alone take {need:,} bytes"), problem
    (problem,) = _problems({}, JobPolicy(max_job_bytes=2**20))  # the builtin SmolLM2 too
    assert "its weights alone take 269,030,016 bytes" in problem, problem


def test_the_builtin_model_size_is_what_transformers_builds():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from orchestrator.plan_fit import SMOLLM2_PARAMS

    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    assert SMOLLM2_PARAMS == sum(p.numel() for p in model.parameters())
