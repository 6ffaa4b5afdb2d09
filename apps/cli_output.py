"""What CLI commands print or save as JSON: strict JSON, never NaN or Infinity.

`json.dumps` writes float('nan') as the bare word NaN, which no JSON parser accepts; a non-finite number in a result
means something went wrong upstream, so it is refused with the field that holds it.
"""

from __future__ import annotations

import json
import math

from residscope.model.errors import InputError


def nonfinite_field(obj, path: str = "") -> tuple[str, float] | None:
    """(dotted path, value) of the first NaN / Infinity in nested dicts, lists and tuples; None when all are finite."""
    if isinstance(obj, float):
        return None if math.isfinite(obj) else (path or "<value>", obj)
    if isinstance(obj, dict):
        items = ((f"{path}.{k}" if path else str(k), v) for k, v in obj.items())
    elif isinstance(obj, (list, tuple)):
        items = ((f"{path}[{i}]", v) for i, v in enumerate(obj))
    else:
        return None
    for sub, value in items:
        found = nonfinite_field(value, sub)
        if found:
            return found
    return None


def json_text(obj, *, indent: int = 2, default=None) -> str:
    """`obj` as strict JSON; InputError naming the field when a number in it is NaN or infinite. `default` as in
    `json.dumps` (e.g. `str` for paths)."""
    found = nonfinite_field(obj)
    if found:
        raise InputError(f"result field {found[0]} is {found[1]}: not a finite number, refusing to write it as JSON")
    return json.dumps(obj, indent=indent, allow_nan=False, default=default)
