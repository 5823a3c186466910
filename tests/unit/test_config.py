"""Config loading: defaults, overrides, every problem reported together, fingerprint."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.errors import ConfigError, UsageError
from orchestrator.inputs.config import RunConfig
from orchestrator.inputs.loader import config_from_dict, load_config

REPO = Path(__file__).resolve().parents[2]


def _problems(data: dict | None = None, overrides: list[str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        config_from_dict(data or {}, overrides)
    return exc.value.problems


def test_defaults_are_valid() -> None:
    cfg = load_config(None)
    assert isinstance(cfg, RunConfig)
    assert cfg == RunConfig()
    assert cfg.pruning.method == "gblm" and cfg.pruning.nm is None
    assert cfg.pruning.target_sparsity == 0.5
    assert cfg.pruning.gblm.alpha == 100.0 and cfg.pruning.sparsegpt.percdamp == 0.01


@pytest.mark.parametrize("name", ["default.yaml", "tiny.yaml"])
def test_shipped_configs_load(name: str) -> None:
    path = REPO / "configs" / name
    if not path.is_file():
        pytest.skip(f"{name} not in this checkout")
    cfg = load_config(path)
    assert cfg.pruning.method in ("magnitude", "wanda", "sparsegpt", "gblm", "gblm-sparsegpt")


def test_overrides_parse_with_yaml_types() -> None:
    cfg = load_config(
        None,
        [
            "pruning.sparsity=0.6",
            "backend.kind=local",
            "backend.workers=4",
            "pruning.sparsegpt.percdamp=1e-3",
            "backend.address=null",
            "eval.enabled=false",
            "model.source=tiny",
        ],
    )
    assert cfg.pruning.sparsity == 0.6 and isinstance(cfg.pruning.sparsity, float)
    assert cfg.pruning.target_sparsity == 0.6
    assert cfg.backend.kind == "local"
    assert cfg.backend.workers == 4
    assert cfg.pruning.sparsegpt.percdamp == pytest.approx(1e-3)
    assert cfg.backend.address is None
    assert cfg.eval.enabled is False
    assert cfg.model.source == "tiny"


def test_overrides_beat_file(tmp_path: Path) -> None:
    f = tmp_path / "run.yaml"
    f.write_text("pruning:\n  method: wanda\n  sparsity: 0.4\nbackend:\n  workers: 3\n")
    cfg = load_config(f, ["pruning.sparsity=0.7"])
    assert cfg.pruning.method == "wanda"
    assert cfg.pruning.sparsity == 0.7
    assert cfg.backend.workers == 3
    assert cfg.calibration.num_samples == 32  # untouched defaults stay


def test_int_accepted_for_float_field() -> None:
    cfg = config_from_dict({"pruning": {"gblm": {"alpha": 50}}})
    assert cfg.pruning.gblm.alpha == 50.0 and isinstance(cfg.pruning.gblm.alpha, float)


def test_nm_pattern_sets_target() -> None:
    cfg = config_from_dict({}, ["pruning.pattern=4:8"])
    assert cfg.pruning.nm == (4, 8) and cfg.pruning.target_sparsity == 0.5
    cfg = config_from_dict({}, ["pruning.pattern=2:4", "pruning.sparsity=0.5"])
    assert cfg.pruning.nm == (2, 4)


def test_three_semantic_problems_reported_together() -> None:
    probs = _problems(overrides=["pruning.sparsity=1.5", "calibration.num_samples=0", "backend.kind=slurm"])
    assert len(probs) == 3, probs
    joined = "\n".join(probs)
    assert any("pruning.sparsity" in p and "1.5" in p for p in probs), joined
    assert any("calibration.num_samples" in p and "0" in p for p in probs), joined
    assert any("backend.kind" in p and "slurm" in p for p in probs), joined


def test_three_type_problems_reported_together() -> None:
    probs = _problems({"backend": {"workers": "two"}, "pruning": {"sequential": "yes"}, "eval": {"seq_len": 1.5}})
    assert len(probs) == 3, probs
    assert any(p.startswith("backend.workers") and "'two'" in p and "int" in p for p in probs)
    assert any(p.startswith("pruning.sequential") and "'yes'" in p and "bool" in p for p in probs)
    assert any(p.startswith("eval.seq_len") and "1.5" in p for p in probs)


def test_config_error_is_usage_error_with_exit_code_2() -> None:
    with pytest.raises(UsageError) as exc:
        config_from_dict({}, ["backend.workers=0"])
    assert exc.value.exit_code == 2
    assert "backend.workers" in str(exc.value)


def test_type_and_semantic_problems_reported_together() -> None:
    probs = _problems(overrides=["backend.workers=abc", "pruning.sparsity=1.5"])
    assert any("backend.workers" in p for p in probs)
    assert any("pruning.sparsity" in p for p in probs), probs


def test_unknown_keys_top_level_and_nested() -> None:
    probs = _problems({"modle": {}, "pruning": {"methd": "wanda"}})
    assert len(probs) == 2
    assert any(p.startswith("modle:") and "unknown key" in p for p in probs)
    assert any(p.startswith("pruning.methd:") and "unknown key" in p and "method" in p for p in probs)


def test_unknown_key_from_override() -> None:
    probs = _problems(overrides=["backend.wokers=3"])
    assert probs == [p for p in probs if p.startswith("backend.wokers")] and len(probs) == 1


def test_bool_is_not_an_int() -> None:
    probs = _problems({"backend": {"workers": True}})
    assert len(probs) == 1 and probs[0].startswith("backend.workers") and "True" in probs[0]


def test_section_must_be_a_mapping() -> None:
    probs = _problems({"pruning": 5})
    assert len(probs) == 1 and probs[0].startswith("pruning") and "mapping" in probs[0]


def test_nm_with_mismatched_sparsity() -> None:
    probs = _problems(overrides=["pruning.pattern=2:4", "pruning.sparsity=0.6"])
    assert len(probs) == 1
    assert "pruning.sparsity" in probs[0] and "0.6" in probs[0] and "2:4" in probs[0]


@pytest.mark.parametrize("pattern", ["4:4", "5:4", "8:4"])
def test_pattern_with_n_not_below_m(pattern: str) -> None:
    probs = _problems(overrides=[f"pruning.pattern={pattern}"])
    assert len(probs) == 1 and "pruning.pattern" in probs[0] and pattern in probs[0] and "N < M" in probs[0]


def test_unknown_pattern() -> None:
    probs = _problems(overrides=["pruning.pattern=3:7"])
    assert len(probs) == 1 and "pruning.pattern" in probs[0] and "3:7" in probs[0]


@pytest.mark.parametrize("value", ["0", "1", "1.0", "-0.2", "2"])
def test_sparsity_outside_open_unit_interval(value: str) -> None:
    probs = _problems(overrides=[f"pruning.sparsity={value}"])
    assert len(probs) == 1 and probs[0].startswith("pruning.sparsity") and "(0, 1)" in probs[0]


@pytest.mark.parametrize("value", [0, -3])
def test_non_positive_num_samples(value: int) -> None:
    probs = _problems({"calibration": {"num_samples": value}})
    assert len(probs) == 1 and probs[0].startswith("calibration.num_samples") and str(value) in probs[0]


def test_bad_method_and_norm() -> None:
    probs = _problems(overrides=["pruning.method=obs", "pruning.gblm.norm=l3"])
    assert len(probs) == 2
    assert any("pruning.method" in p and "obs" in p for p in probs)
    assert any("pruning.gblm.norm" in p and "l3" in p for p in probs)


def test_malformed_override() -> None:
    probs = _problems(overrides=["pruning.sparsity"])
    assert len(probs) == 1 and "KEY=VALUE" in probs[0]


def test_malformed_yaml_file(tmp_path: Path) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text("pruning:\n  method: [wanda\n  sparsity: 0.5\n")
    with pytest.raises(ConfigError) as exc:
        load_config(f)
    assert len(exc.value.problems) == 1
    assert "not valid YAML" in exc.value.problems[0] and "line" in exc.value.problems[0]
    assert "bad.yaml" in exc.value.problems[0]


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_non_mapping_yaml(tmp_path: Path, text: str) -> None:
    f = tmp_path / "list.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as exc:
        load_config(f)
    assert "mapping" in exc.value.problems[0]


def test_empty_yaml_gives_defaults(tmp_path: Path) -> None:
    f = tmp_path / "empty.yaml"
    f.write_text("")
    assert load_config(f) == RunConfig()


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(tmp_path / "nope.yaml")
    assert "does not exist" in exc.value.problems[0] and "nope.yaml" in exc.value.problems[0]


def test_binary_file(tmp_path: Path) -> None:
    f = tmp_path / "bin.yaml"
    f.write_bytes(b"\xff\xfe\x00\x81\x82")
    with pytest.raises(ConfigError) as exc:
        load_config(f)
    assert "bin.yaml" in exc.value.problems[0]


def test_fingerprint_stable_and_sensitive() -> None:
    base = load_config(None).fingerprint()
    assert len(base) == 64 and int(base, 16) >= 0
    assert load_config(None).fingerprint() == base
    assert config_from_dict({}).fingerprint() == base
    assert load_config(None, ["pruning.sparsity=0.6"]).fingerprint() != base
    assert load_config(None, ["pruning.method=wanda"]).fingerprint() != base
    assert load_config(None, ["pruning.gblm.alpha=10"]).fingerprint() != base
    assert load_config(None, ["calibration.seed=1"]).fingerprint() != base
    assert load_config(None, ["output.dir=elsewhere"]).fingerprint() == base
    assert load_config(None, ["output.overwrite=true"]).fingerprint() == base


def test_fingerprint_independent_of_key_order() -> None:
    a = config_from_dict({"pruning": {"method": "wanda", "sparsity": 0.4}, "backend": {"workers": 3}})
    b = config_from_dict({"backend": {"workers": 3}, "pruning": {"sparsity": 0.4, "method": "wanda"}})
    assert a.fingerprint() == b.fingerprint()


def test_input_dict_not_mutated() -> None:
    data = {"pruning": {"method": "wanda"}}
    config_from_dict(data, ["pruning.sparsity=0.3"])
    assert data == {"pruning": {"method": "wanda"}}


def test_readme_key_table_is_generated_from_the_config_classes():
    from orchestrator.inputs.keys import key_table

    text = (REPO / "README.md").read_text()
    start = text.index("<!-- key table:")
    start = text.index("\n", start) + 1
    end = text.index("<!-- end of key table -->")
    assert text[start:end] == key_table(), "README key table is stale: regenerate it with key_table()"


def test_every_field_declares_a_role_and_a_help_line():
    from orchestrator.inputs.config import ROLES
    from orchestrator.inputs.keys import iter_fields

    for name, f, _ in iter_fields():
        assert f.metadata.get("role") in ROLES, name
        assert f.metadata.get("help"), name


def test_roles_decide_the_fingerprints():
    from orchestrator.inputs.loader import config_from_dict

    base = config_from_dict({})
    for override, work, full in [("backend.workers=5", False, False), ("eval.num_windows=3", False, True),
                                 ("pruning.sparsity=0.3", True, True), ("output.dir=x", False, False),
                                 ("backend.forward_dtype=bfloat16", True, True)]:
        cfg = config_from_dict({}, [override])
        assert (cfg.work_fingerprint() != base.work_fingerprint()) == work, override
        assert (cfg.fingerprint() != base.fingerprint()) == full, override


def test_declared_ranges_and_choices_are_checked_while_building():
    from orchestrator.errors import ConfigError
    from orchestrator.inputs.loader import config_from_dict

    with pytest.raises(ConfigError) as exc:
        config_from_dict({}, ["structured.spread=1", "model.dtype=int8", "structured.estimators=[element3]",
                              "structured.protect_first=-1", "calibration.generate.top_p=1.5"])
    assert sorted(exc.value.problems) == sorted([
        "structured.spread: must be in [0, 1), got 1",
        "model.dtype: 'int8' is not one of float32, bfloat16, float16",
        "structured.estimators: expected a list of element1, element2, vector, got ['element3']",
        "structured.protect_first: must be >= 0 or null, got -1",
        "calibration.generate.top_p: must be in (0, 1], got 1.5",
    ])
