"""Building a run config: YAML (or a dict from a request) plus ``key=value`` overrides, typed into
:class:`~orchestrator.inputs.config.RunConfig` and checked by :mod:`orchestrator.inputs.validation`,
every problem reported together."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from orchestrator.errors import ConfigError
from orchestrator.inputs.config import RunConfig
from orchestrator.inputs.validation import validate
from orchestrator.inputs.yamlconf import apply_overrides, build_dataclass, yaml_load


def config_from_dict(data: dict[str, Any], overrides: list[str] | None = None) -> RunConfig:
    """Build and validate a :class:`RunConfig` from a nested dict plus overrides.

    Raises:
        ConfigError: listing every problem found.
    """
    problems: list[str] = []
    data = json.loads(json.dumps(data or {}))  # deep copy, JSON-safe
    apply_overrides(data, overrides or [], problems)
    cfg = build_dataclass(RunConfig, data, "", problems)
    problems.extend(validate(cfg))  # fields with bad types kept their defaults: still safe to check
    if problems:
        raise ConfigError(problems)
    return cfg


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run config (or the defaults when ``path`` is None) and apply overrides.

    Args:
        path: YAML file, or None for the embedded defaults.
        overrides: ``dotted.key=value`` strings, values parsed as YAML scalars.

    Raises:
        ConfigError: unreadable or malformed file, or any invalid field.
    """
    return config_from_dict(read_config_file(path), overrides)


def read_config_file(path: str | Path | None) -> dict[str, Any]:
    """The nested dict of a YAML run config (empty for None), unvalidated.

    Raises:
        ConfigError: a missing, unreadable or malformed file.
    """
    data: Any = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError([f"config: file {str(p)!r} does not exist"])
        try:
            data = yaml_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            raise ConfigError([f"config: {str(p)!r} is not valid YAML{where}"]) from None
        except UnicodeDecodeError:
            raise ConfigError([f"config: {str(p)!r} is not a text file"]) from None
        if not isinstance(data, dict):
            raise ConfigError([f"config: {str(p)!r} must hold a mapping, got {type(data).__name__}"])
    return data
