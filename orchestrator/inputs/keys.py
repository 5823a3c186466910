"""Every config key, walked from the config classes: the README's key table is generated here."""

from __future__ import annotations

import dataclasses
import json
import typing
from typing import Any, Literal

from orchestrator.inputs.config import RESULT, RunConfig


def iter_fields(cls: type = None, prefix: str = "") -> list[tuple[str, dataclasses.Field, Any]]:
    """Every leaf field of the config classes: ``(dotted name, field, type)``, in declaration order."""
    cls = cls or RunConfig
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        name = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            out += iter_fields(hints[f.name], name + ".")
        else:
            out.append((name, f, hints[f.name]))
    return out


def _default_text(f: dataclasses.Field) -> str:
    value = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
    return f"`{json.dumps(value)}`" if not isinstance(value, str) else f"`{value}`" if value else '`""`'


def _type_text(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " \\| ".join(f"`{a}`" for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return f"list of {_type_text(typing.get_args(tp)[0])}"
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if args and len(args) < len(typing.get_args(tp)):
        return f"{_type_text(args[0])} or null"
    return getattr(tp, "__name__", str(tp))


def key_table() -> str:
    """The Markdown table of every config key (the README's, generated from the config classes)."""
    from orchestrator.inputs.yamlconf import range_text

    lines = ["| key | type | default | role | meaning |", "|---|---|---|---|---|"]
    for name, f, tp in iter_fields():
        bounds = f.metadata.get("bounds")
        kind = _type_text(tp) + (f", {range_text(bounds)}" if bounds else "")
        lines.append(f"| `{name}` | {kind} | {_default_text(f)} | {f.metadata.get('role', RESULT)} | "
                     f"{f.metadata.get('help', '')} |")
    return "\n".join(lines) + "\n"
