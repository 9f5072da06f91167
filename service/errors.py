"""Validation errors in words: each names its field once.

The math and the spec raise ``ValueError("field: what is wrong")`` so that a message read alone
names its field; pydantic prefixes ``"Value error, "``; the API adds the field as ``loc``. Said
together that read ``hidden: Value error, hidden: layer sizes must be >= 1``. The API's 422
bodies carry the cleaned ``msg`` and every client joins ``loc: msg``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

_PYDANTIC_PREFIXES = ("Value error, ", "Assertion failed, ")


def clean_message(field: str | Sequence[str], msg: str) -> str:
    """``msg`` without pydantic's prefix and without leading ``"field: "`` (repeated, any of
    the names given, with ``_`` or ``-``).

    >>> clean_message("dataset", "dataset: dataset: no dataset named 'x'")
    "no dataset named 'x'"
    """
    msg = str(msg)
    for prefix in _PYDANTIC_PREFIXES:
        if msg.startswith(prefix):
            msg = msg[len(prefix) :]
    fields = [field] if isinstance(field, str) else list(field)
    names = {n for f in fields for n in (f, f.replace("_", "-"))} - {""}
    changed = True
    while changed:
        changed = False
        for name in names:
            if msg.startswith(f"{name}: "):
                msg = msg[len(name) + 2 :]
                changed = True
    return msg


#: A message that starts with the field it is about: ``"k: must be at most ..."``.
_NAMED = re.compile(r"^([a-z][a-z0-9_]*): ")

#: pydantic's names of the branches of a union (``hidden.int``, ``hidden.list[int]``): not fields
_BRANCH = re.compile(r"^((int|float|str|bool|none|list|dict|tuple)(\[.*\])?|function-.*)$")


def field_name(loc: Sequence[Any], skip_body: bool = True) -> str:
    """The dotted field of a pydantic ``loc`` (``("body", "hidden", 1)`` -> ``hidden.1``), without
    the names pydantic gives the branches of a union (``("body", "hidden", "list[int]")`` ->
    ``hidden``)."""
    parts = list(loc)
    if skip_body and parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:]
    return ".".join(str(p) for p in parts if not (isinstance(p, str) and _BRANCH.match(p)))


def clean_errors(errors: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Pydantic/FastAPI error dicts with each ``msg`` cleaned for its field."""
    out = []
    for err in errors:
        err = dict(err)
        loc = tuple(err.get("loc") or ())
        if not field_name(loc):  # a check across fields: its message names the field
            named = _NAMED.match(clean_message("", err.get("msg", "")))
            if named:
                loc = (*loc, named.group(1))
                err["loc"] = loc
        names = [field_name(loc), *(str(p) for p in loc if isinstance(p, str))]
        err["msg"] = clean_message(names, err.get("msg", ""))
        out.append(err)
    return out


def describe_errors(errors: Iterable[Mapping[str, Any]], dash: bool = False) -> str:
    """``"field: message; field: message"`` (``dash``: ``max-iter`` as on the command line);
    the branches of a union field are said as one: ``hidden: Input should be a valid integer,
    or Input should be a valid list``."""
    by_field: dict[str, list[str]] = {}
    for err in clean_errors(errors):
        name = field_name(err.get("loc") or ()) or "spec"
        msgs = by_field.setdefault(name.replace("_", "-") if dash else name, [])
        if err["msg"] not in msgs:
            msgs.append(err["msg"])
    return "; ".join(f"{name}: {', or '.join(msgs)}" for name, msgs in by_field.items())
