"""The building blocks of the run configuration: the choice types, the field roles and :func:`opt`.

Every config dataclass (:mod:`~orchestrator.inputs.config`, :mod:`~orchestrator.inputs.pruning_config`) declares
its fields with :func:`opt`: default, role, help line and range in one place.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import field
from typing import Any, Literal

Method = Literal["magnitude", "wanda", "sparsegpt", "gblm", "gblm-sparsegpt"]
Pattern = Literal["unstructured", "2:4", "4:8"]
Reconstruct = Literal["none", "layer", "block"]
DType = Literal["float32", "bfloat16", "float16"]
ComputeDType = Literal["auto", "float32", "bfloat16", "float16"]  # ``auto``: resolved on the hardware that computes
METHODS: tuple[str, ...] = typing.get_args(Method)
PATTERNS: tuple[str, ...] = typing.get_args(Pattern)
DTYPES: tuple[str, ...] = typing.get_args(DType)

#: the role of a field, declared once (``opt(role=...)``) and used by every fingerprint and the run key
RESULT = "result"  # decides the pruned model (masks, weights): checkpoints, resume and the run key hash it
MEASURE = "measure"  # decides what is measured or written, not the model: the run key hashes it, resume does not
EXECUTION = "execution"  # only where or how the run executes: nothing hashes it
ROLES = (RESULT, MEASURE, EXECUTION)


def opt(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING, role: str = RESULT,
        help: str = "", ge: float | None = None, gt: float | None = None, le: float | None = None,
        lt: float | None = None, hint: str = "", nonempty: bool = False, explain: Any = None) -> Any:
    """A config field with its role, its help line and its declared range (checked when the config is built).

    Args:
        default: the default value (or ``factory`` for a mutable one).
        role: :data:`RESULT`, :data:`MEASURE` or :data:`EXECUTION`.
        help: one line for the README's key table (``rayprune keys`` prints it too).
        ge, gt, le, lt: bounds of a number (None values are never checked).
        hint: words added to a range error, e.g. ``(0: in the coordinator process)``.
        nonempty: a string or list that must not be empty.
        explain: ``value -> message or None``: a better error for a value outside a Literal's choices.
    """
    bounds = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}
    md = {"role": role, "help": help, "bounds": bounds, "hint": hint, "nonempty": nonempty, "explain": explain}
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=md)
    return field(default=default, metadata=md)


def _nm_explain(value: Any) -> str | None:
    """``4:2`` or ``4:4`` is an N:M pattern with N >= M: say so rather than list the choices."""
    parts = str(value).split(":")
    if len(parts) == 2 and all(x.isdigit() for x in parts) and int(parts[0]) >= int(parts[1]):
        return f"{value!r} needs N < M"
    return None
