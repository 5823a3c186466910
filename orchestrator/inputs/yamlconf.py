"""Generic YAML-to-dataclass building: a safe YAML loader, ``dotted.key=value`` overrides,
and type checks that collect every problem instead of stopping at the first."""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from typing import Any, Literal

import yaml


class _Loader(yaml.SafeLoader):
    """SafeLoader without YAML 1.1's base-60 numbers (``2:4`` stays a string) and with
    ``1e3`` read as a float."""


_Loader.yaml_implicit_resolvers = {
    key: [(tag, rx) for tag, rx in resolvers if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")]
    for key, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0o?[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
    list("-+0123456789"),
)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^(?:[-+]?(?:[0-9][0-9_]*)?\.[0-9_]+(?:[eE][-+]?[0-9]+)?|[-+]?[0-9][0-9_]*\.(?:[eE][-+]?[0-9]+)?"
        r"|[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)


#: the longest integer literal read as a number (a 64-bit integer has 19 digits); longer ones stay text
MAX_INT_DIGITS = 30
#: what an ``int`` field holds: a 64-bit signed integer (what torch, numpy and JSON peers accept)
INT_RANGE = (-(2**63), 2**63 - 1)


class OutOfRange(str):
    """A numeric literal too long to be read as a number (Python refuses to convert integer text of more
    than 4300 digits at all): kept as text, so the field's type check names the field."""

    def __repr__(self) -> str:
        return f"a {len(self)}-character number"


def _too_long(text: str) -> bool:
    return len(text.lstrip("+-").replace("_", "")) > MAX_INT_DIGITS


def bounded_int(text: str) -> int | OutOfRange:
    """``int(text)`` for a decimal literal of at most :data:`MAX_INT_DIGITS` digits, else :class:`OutOfRange`."""
    return OutOfRange(text) if _too_long(text) else int(text)


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int | OutOfRange:
    text = loader.construct_scalar(node)
    return OutOfRange(text) if _too_long(text) else yaml.SafeLoader.construct_yaml_int(loader, node)


_Loader.add_constructor("tag:yaml.org,2002:int", _construct_int)


class StrictLoader(_Loader):
    """:class:`_Loader` for untrusted text: dates stay strings and ``<<`` merge keys are plain keys
    (the job service also refuses anchors, aliases and explicit tags before loading)."""


StrictLoader.yaml_implicit_resolvers = {
    key: [(tag, rx) for tag, rx in resolvers if tag not in ("tag:yaml.org,2002:timestamp", "tag:yaml.org,2002:merge")]
    for key, resolvers in _Loader.yaml_implicit_resolvers.items()
}


def yaml_load(text: str):
    """Parse YAML text with rayprune's loader (safe; ``2:4`` is a string)."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader derives from SafeLoader


def _parse_scalar(text: str) -> Any:
    """Parse an override value with YAML rules (``1e-3`` -> float, ``null`` -> None)."""
    try:
        return yaml_load(text) if text != "" else ""
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str], problems: list[str]) -> None:
    """Apply ``a.b.c=value`` overrides to a nested dict in place."""
    for item in overrides:
        if "=" not in item:
            problems.append(f"override {item!r}: expected KEY=VALUE (e.g. pruning.sparsity=0.5)")
            continue
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            problems.append(f"override {item!r}: empty key segment")
            continue
        node = data
        for part in parts[:-1]:
            nxt = node.get(part)
            if not isinstance(nxt, dict):
                nxt = {}
                node[part] = nxt
            node = nxt
        node[parts[-1]] = _parse_scalar(value)


def _type_ok(value: Any, tp: Any) -> tuple[bool, Any]:
    """Check/coerce a YAML value against a dataclass field type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return True, None
        for arg in args:
            if arg is type(None):
                continue
            ok, coerced = _type_ok(value, arg)
            if ok:
                return True, coerced
        return False, value
    if origin is Literal:
        return value in typing.get_args(tp), value
    if origin is list:
        if not isinstance(value, list):
            return False, value
        (item,) = typing.get_args(tp) or (Any,)
        out = []
        for v in value:
            ok, coerced = _type_ok(v, item)
            if not ok:
                return False, value
            out.append(coerced)
        return True, out
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool) and INT_RANGE[0] <= value <= INT_RANGE[1], value
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                as_float = float(value)
            except OverflowError:  # an int beyond the float range
                return False, value
            return math.isfinite(as_float), as_float
        return False, value
    if tp is str:
        if isinstance(value, OutOfRange):
            return False, value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, str(value)
        return isinstance(value, str), value
    return True, value


def _choices(tp: Any) -> tuple | None:
    """The allowed values of a Literal (also inside Optional or list), else None."""
    if typing.get_origin(tp) is Literal:
        return typing.get_args(tp)
    for arg in typing.get_args(tp):
        found = _choices(arg)
        if found:
            return found
    return None


def _show(value: Any, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters (a problem line stays one readable line)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _type_problem(where: str, value: Any, tp: Any, md: Any) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return f"{where}: {value!r} is not a finite number"
    if isinstance(value, OutOfRange):
        return f"{where}: {value!r} is out of range"
    if isinstance(value, int) and not isinstance(value, bool) and not INT_RANGE[0] <= value <= INT_RANGE[1]:
        return f"{where}: {_show(value)} is out of range"
    explain = md.get("explain")
    if explain is not None and explain(value):
        return f"{where}: {explain(value)}"
    choices = _choices(tp)
    if choices and typing.get_origin(tp) is list:
        return f"{where}: expected a list of {', '.join(map(str, choices))}, got {_show(value)}"
    if choices:
        return f"{where}: {_show(value)} is not one of {', '.join(map(str, choices))}"
    return f"{where}: expected {_type_name(tp)}, got {_show(value)}"


def _fmt(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def range_text(bounds: dict[str, float]) -> str:
    """``> 0``, ``>= 2``, ``in (0, 1)``, ``in [0, 1)``, ... from declared bounds."""
    lo = ("(", bounds["gt"]) if "gt" in bounds else ("[", bounds["ge"]) if "ge" in bounds else None
    hi = (")", bounds["lt"]) if "lt" in bounds else ("]", bounds["le"]) if "le" in bounds else None
    if lo and hi:
        return f"in {lo[0]}{_fmt(lo[1])}, {_fmt(hi[1])}{hi[0]}"
    if lo:
        return f"{'>' if lo[0] == '(' else '>='} {_fmt(lo[1])}"
    return f"{'<' if hi[0] == ')' else '<='} {_fmt(hi[1])}"


def _bound_problem(where: str, value: Any, md: Any, raw: Any = None) -> str | None:
    """The declared range or non-emptiness a built value breaks (None values are never checked);
    the message quotes ``raw``, the value as written."""
    if value is None:
        return None
    if md.get("nonempty") and not value:
        return f"{where}: must not be empty"
    bounds = md.get("bounds") or {}
    if not bounds or isinstance(value, (list, str, bool)):
        return None
    checks = {"ge": value >= bounds["ge"] if "ge" in bounds else True,
              "gt": value > bounds["gt"] if "gt" in bounds else True,
              "le": value <= bounds["le"] if "le" in bounds else True,
              "lt": value < bounds["lt"] if "lt" in bounds else True}
    ok = all(checks.values())
    if ok:
        return None
    hint = f" {md['hint']}" if md.get("hint") else ""
    return f"{where}: must be {range_text(bounds)}{hint}, got {value if raw is None else raw!r}"


def build_dataclass(cls: type, data: Any, prefix: str, problems: list[str]) -> Any:
    """Recursively build dataclass ``cls`` from ``data``, collecting problems (types, choices, declared ranges)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        problems.append(f"{prefix or 'config'}: expected a mapping, got {data!r}")
        return cls()
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            where = f"{prefix}.{key}" if prefix else str(key)
            problems.append(f"{where}: unknown key (allowed: {', '.join(sorted(names))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        where = f"{prefix}.{f.name}" if prefix else f.name
        tp = hints[f.name]
        value = data[f.name]
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = build_dataclass(tp, value, where, problems)
            continue
        ok, coerced = _type_ok(value, tp)
        if not ok:
            problems.append(_type_problem(where, value, tp, f.metadata))
            continue
        bad = _bound_problem(where, coerced, f.metadata, value)
        if bad:
            problems.append(bad)
            continue
        kwargs[f.name] = coerced
    return cls(**kwargs)


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        (item,) = typing.get_args(tp) or (Any,)
        return f"list of {_type_name(item)}"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))
