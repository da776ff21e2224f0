"""Strict JSON for job args, meta and results.

Args must round-trip exactly: what ``process`` receives equals what was inserted. So we refuse what
``json`` would silently change or cannot represent (sets, bytes, datetimes, NaN/Infinity, non-string
dict keys) and say where the bad value sits (``args.items[2].when``). Tuples become lists, which is the
one lossy conversion we accept (it is what every JSON user expects).

Canonical encoding (for unique keys) sorts keys, uses compact separators, and writes integral floats as
integers, so ``{"a": 1.0, "b": 2}`` and ``{"b": 2, "a": 1}`` hash alike while ``true`` and ``1`` stay
distinct.
"""

from __future__ import annotations

import json
import math
from typing import Any

from .errors import ValidationError

# Stored JSON is written with sorted keys (jsonb does not keep key order anyway), so the stored text of
# args is also their canonical form whenever they hold no integral float (see encode_args).
_canonical = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"), sort_keys=True)
_encoder = _canonical


_INTEGRAL_FLOAT = ("", None, "")


def _find_problem(value: Any, path: str) -> tuple[str, Any, str] | None:
    """Walk ``value``; return (path, bad value, reason) for the first thing JSON cannot carry exactly.

    Returns ``_INTEGRAL_FLOAT`` (not a problem) when the value is fine but holds a float like ``1.0``,
    whose canonical form differs from its stored text.
    """
    stack: list[tuple[str, Any]] = [(path, value)]
    integral = False
    while stack:
        where, item = stack.pop()
        if item is None or isinstance(item, (str, bool, int)):
            continue
        if isinstance(item, float):
            if not math.isfinite(item):
                return where, item, "NaN and Infinity are not valid JSON"
            integral = integral or item.is_integer()
            continue
        if isinstance(item, dict):
            for key, sub in item.items():
                if not isinstance(key, str):
                    return where, key, f"dict keys must be strings (got {type(key).__name__})"
                stack.append((f"{where}.{key}", sub))
            continue
        if isinstance(item, (list, tuple)):
            stack.extend((f"{where}[{i}]", sub) for i, sub in enumerate(item))
            continue
        kind = type(item).__name__
        hint = ""
        if kind in ("datetime", "date", "time"):
            hint = "; pass item.isoformat() and parse it in process()"
        elif kind in ("bytes", "bytearray"):
            hint = "; encode it (base64) first"
        elif kind in ("set", "frozenset"):
            hint = "; pass a sorted list"
        elif kind == "Decimal":
            hint = "; pass it as a string"
        return where, item, f"{kind} is not JSON-serialisable{hint}"
    return _INTEGRAL_FLOAT if integral else None


def encode(value: Any, field: str, *, limit: int | None = None, worker: str | None = None) -> str:
    """Encode a JSON object for storage, or raise ValidationError naming the bad field."""
    return encode_checked(value, field, limit=limit, worker=worker)[0]


def encode_checked(
    value: Any, field: str, *, limit: int | None = None, worker: str | None = None
) -> tuple[str, bool]:
    """Like :func:`encode`; also says whether the text is already canonical (no integral floats)."""
    problem = _find_problem(value, field)
    if problem is not None and problem is not _INTEGRAL_FLOAT:
        where, bad, reason = problem
        raise ValidationError(where, bad, reason, worker=worker)
    text = _encoder.encode(value)
    if limit is not None and len(text) * 4 > limit:
        # A character is 1-4 bytes in UTF-8: only texts that could exceed the limit are measured.
        size = len(text.encode())
        if size > limit:
            raise ValidationError(
                field,
                f"<{size} bytes>",
                f"encoded size {size} bytes exceeds the limit of {limit} bytes",
                worker=worker,
            )
    return text, problem is None


def decode(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def _normalise(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, dict):
        return {k: _normalise(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_normalise(v) for v in value]
    return value


_encode_str: Any = getattr(json.encoder, "c_encode_basestring", None) or json.encoder.py_encode_basestring


def _has_integral_float(value: Any) -> bool:
    if isinstance(value, float):
        return value.is_integer()
    if isinstance(value, dict):
        return any(_has_integral_float(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_has_integral_float(v) for v in value)
    return False


def canonical(value: Any) -> str:
    """Stable text for hashing: sorted keys, compact, integral floats as ints."""
    if isinstance(value, str):
        return str(_encode_str(value))
    if _has_integral_float(value):
        value = _normalise(value)
    return _canonical.encode(value)
