"""Strict JSON for job args, meta and results.

Args must round-trip exactly: what ``process`` receives equals what was inserted. So we refuse what
``json`` would silently change or cannot represent (sets, bytes, datetimes, NaN/Infinity, non-string
dict keys) and say where the bad value sits (``args.items[2].when``). Tuples become lists, which is the
one lossy conversion we accept (it is what every JSON user expects).

We also refuse, with a :class:`~oban_py.errors.ValidationError` naming the path, what PostgreSQL or
Python would reject later with a raw error (or never finish with): NUL characters (``\\u0000``) and
surrogate code points in strings and keys (jsonb rejects NUL, UTF-8 cannot encode surrogates), integers
of more than :data:`MAX_INT_DIGITS` digits (Python's int-to-text conversion refuses very long ones),
containers nested deeper than :data:`MAX_DEPTH` (``json`` recurses once per level, and Python's default
recursion limit is 1000, on the way in and on the way out), and cycles (a dict or list that contains
itself). The check is one iterative walk that gives up as soon as the encoded text must exceed the size
limit, so no value can make it hang (a list holding itself, or a small value that expands to an
exponentially large text, ends with an error).

Canonical encoding (for unique keys) sorts keys, uses compact separators, and writes integral floats as
integers, so ``{"a": 1.0, "b": 2}`` and ``{"b": 2, "a": 1}`` hash alike while ``true`` and ``1`` stay
distinct.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from .errors import ValidationError

__all__ = [
    "MAX_DEPTH",
    "MAX_INT_DIGITS",
    "MAX_UNLIMITED_BYTES",
    "canonical",
    "decode",
    "encode",
    "encode_checked",
    "scrub_text",
    "text_problem",
]

#: Deepest nesting of dicts and lists accepted (the top-level object is depth 1).
MAX_DEPTH = 500
#: Longest integer accepted, in decimal digits (``abs(n) < 10**MAX_INT_DIGITS``).
MAX_INT_DIGITS = 1000
_INT_LIMIT = 10**MAX_INT_DIGITS
#: Without a size limit, values whose encoded text would exceed this many bytes are refused anyway.
MAX_UNLIMITED_BYTES = 8 * 1024 * 1024
_MAX_PATH = 200

# Stored JSON is written with sorted keys (jsonb does not keep key order anyway), so the stored text of
# args is also their canonical form whenever they hold no integral float (see encode_args).
_canonical = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"), sort_keys=True)
_encoder = _canonical

_SURROGATE = re.compile("[\ud800-\udfff]")
_PLAIN_KEY = re.compile(r"[\w\-]{1,60}")
_NUL_REASON = "contains a NUL character (\\u0000), which PostgreSQL cannot store"
_SURROGATE_REASON = (
    "contains a surrogate code point (U+D800-U+DFFF), which is not valid UTF-8; "
    "decode bytes with errors='replace' or strip it"
)

_INTEGRAL_FLOAT = ("", None, "")


def text_problem(text: str) -> str | None:
    """Why PostgreSQL would reject ``text`` in a text or jsonb column (NUL, surrogates), or None."""
    if "\x00" in text:
        return _NUL_REASON
    if not text.isascii() and _SURROGATE.search(text) is not None:
        return _SURROGATE_REASON
    return None


def scrub_text(text: str) -> str:
    """``text`` made storable: NUL and lone surrogates become U+FFFD (a valid surrogate pair is joined)."""
    if "\x00" in text:
        text = text.replace("\x00", "\ufffd")
    if not text.isascii() and _SURROGATE.search(text) is not None:
        text = text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    return text


def _render(field: str, parent: Any, key: Any) -> str:
    """The dotted path of a walk position: ``parent`` is ``None`` (the root) or ``(grandparent, key)``."""
    parts: list[str] = []
    at: Any = (parent, key)
    while at is not None:
        at, key = at
        if key is None:
            continue
        if isinstance(key, int):
            parts.append(f"[{key}]")
        elif _PLAIN_KEY.fullmatch(key):
            parts.append(f".{key}")
        else:
            shown = repr(key) if len(key) <= 60 else repr(key[:57]) + "..."
            parts.append(f"[{shown}]")
    path = field + "".join(reversed(parts))
    return path if len(path) <= _MAX_PATH else path[:100] + "..." + path[-(_MAX_PATH - 103) :]


def _find_problem(value: Any, field: str, budget: int) -> tuple[str, Any, str] | None:
    """Walk ``value``; return (path, bad value, reason) for the first thing JSON cannot carry exactly.

    Returns ``_INTEGRAL_FLOAT`` (not a problem) when the value is fine but holds a float like ``1.0``,
    whose canonical form differs from its stored text. ``budget`` is the size limit in bytes: the walk
    keeps a lower bound of the encoded size and stops as soon as it exceeds the limit, so a value that
    expands (the same list referenced twice at every level, a cycle) cannot keep it busy.

    Hot path of every insert: exact types first, one tuple per item, positions rendered only on error.
    """
    start = budget
    # (item, parent position, key in parent, depth); a position is (parent position, key).
    stack: list[tuple[Any, Any, Any, int]] = [(value, None, None, 1)]
    pop = stack.pop
    push = stack.append
    integral = False
    while stack:
        item, parent, key, depth = pop()
        cls = type(item)
        if cls is str:
            budget -= len(item) + 1  # the container counted one byte for it already
            if "\x00" in item or (not item.isascii() and _SURROGATE.search(item) is not None):
                return _render(field, parent, key), item, text_problem(item) or ""
        elif cls is int:
            if not -_INT_LIMIT < item < _INT_LIMIT:
                return _render(field, parent, key), item, _INT_REASON
        elif cls is dict:
            if depth > MAX_DEPTH:
                return _too_deep(value, field, parent, key)
            budget -= 1 + 3 * len(item)  # braces, and per entry at least a colon, a comma, one byte of value
            node = (parent, key)
            depth += 1
            for k, sub in item.items():
                if type(k) is not str and not isinstance(k, str):
                    return (
                        _render(field, parent, key),
                        k,
                        f"dict keys must be strings (got {type(k).__name__})",
                    )
                budget -= len(k) + 2
                if "\x00" in k or (not k.isascii() and _SURROGATE.search(k) is not None):
                    return _render(field, node, k), k, f"key {text_problem(k)}"
                push((sub, node, k, depth))
        elif cls is list or cls is tuple:
            if depth > MAX_DEPTH:
                return _too_deep(value, field, parent, key)
            budget -= 1 + 2 * len(item)  # brackets, and per element at least a comma and one byte
            node = (parent, key)
            depth += 1
            stack.extend([(sub, node, i, depth) for i, sub in enumerate(item)])
        elif cls is float:
            if not math.isfinite(item):
                return _render(field, parent, key), item, "NaN and Infinity are not valid JSON"
            integral = integral or item.is_integer()
        elif item is None or cls is bool:
            pass
        else:
            # A subclass (an enum, an OrderedDict...) is checked as a copy of its base type, as json
            # encodes it; anything else cannot be encoded.
            for base, plain in _BASES:
                if isinstance(item, base):
                    push((plain(item), parent, key, depth))
                    break
            else:
                return _render(field, parent, key), item, _type_reason(item)
            continue
        if budget < 0:
            cycle = _find_cycle(value, field)
            if cycle is not None:
                return cycle
            return field, f"<more than {start} bytes>", f"encoded size exceeds the limit of {start} bytes"
    return _INTEGRAL_FLOAT if integral else None


_BASES: tuple[tuple[type, Any], ...] = (
    (str, str.__str__),
    (int, int.__int__),
    (float, float.__float__),
    (dict, dict),
    (list, list),
    (tuple, list),
)
_INT_REASON = f"integers may have at most {MAX_INT_DIGITS} digits; pass a longer one as a string"


def _too_deep(value: Any, field: str, parent: Any, key: Any) -> tuple[str, Any, str]:
    return _find_cycle(value, field) or (
        _render(field, parent, key),
        f"<nested more than {MAX_DEPTH} levels deep>",
        f"dicts and lists may be nested at most {MAX_DEPTH} levels deep",
    )


def _find_cycle(value: Any, field: str) -> tuple[str, Any, str] | None:
    """The first dict or list in ``value`` that contains itself, as a problem; None if there is none.

    Depth-first with the containers on the current path and those already finished, so shared (not
    cyclic) sub-values are visited once: linear in the number of distinct containers.
    """
    done: set[int] = set()
    on_path: set[int] = set()
    stack: list[tuple[Any, Any, Any, bool]] = [(value, None, None, False)]
    while stack:
        item, parent, key, leaving = stack.pop()
        ident = id(item)
        if leaving:
            on_path.discard(ident)
            done.add(ident)
            continue
        if ident in on_path:
            kind = "dict" if isinstance(item, dict) else "list"
            return (
                _render(field, parent, key),
                item,
                f"this {kind} contains itself (a cycle), which JSON cannot represent",
            )
        if ident in done:
            continue
        on_path.add(ident)
        stack.append((item, parent, key, True))
        node = (parent, key)
        pairs = item.items() if isinstance(item, dict) else enumerate(item)
        for k, sub in pairs:
            if isinstance(sub, (dict, list, tuple)):
                stack.append((sub, node, k, False))
    return None


def _type_reason(item: Any) -> str:
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
    return f"{kind} is not JSON-serialisable{hint}"


def encode(value: Any, field: str, *, limit: int | None = None, worker: str | None = None) -> str:
    """Encode a JSON value for storage, or raise ValidationError naming the bad field.

    Never raises anything else and never hangs, whatever ``value`` holds (see the module docstring).
    """
    return encode_checked(value, field, limit=limit, worker=worker)[0]


def encode_checked(
    value: Any, field: str, *, limit: int | None = None, worker: str | None = None
) -> tuple[str, bool]:
    """Like :func:`encode`; also says whether the text is already canonical (no integral floats)."""
    problem = _find_problem(value, field, MAX_UNLIMITED_BYTES if limit is None else limit)
    if problem is not None and problem is not _INTEGRAL_FLOAT:
        where, bad, reason = problem
        raise ValidationError(where, bad, reason, worker=worker)
    try:
        text = _encoder.encode(value)
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:
        # Only reachable when the interpreter is stricter than our limits (a lowered recursion limit or
        # sys.set_int_max_str_digits), or a subclass misbehaves while being encoded.
        raise ValidationError(
            field, f"<{type(value).__name__}>", f"cannot be encoded as JSON: {exc}", worker=worker
        ) from None
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
    """Stable text for hashing: sorted keys, compact, integral floats as ints.

    ``value`` must have passed :func:`encode` (this does not check it again).
    """
    if isinstance(value, str):
        return str(_encode_str(value))
    if _has_integral_float(value):
        value = _normalise(value)
    return _canonical.encode(value)
