"""Plain JSON values from numpy and torch ones: the one converter behind every JSON file and response cxrdx writes."""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np


def to_json_safe(value: Any, nonfinite: Literal["null", "keep"] = "null") -> Any:
    """`value` with numpy/torch scalars and arrays turned into Python numbers and lists, tuples into
    lists and dict keys into strings, recursively. NaN and infinity become None with `nonfinite="null"`
    (strict JSON has neither); `"keep"` leaves them for `json.dumps`, which writes NaN and Infinity."""
    if isinstance(value, dict):
        return {k if isinstance(k, str) else str(k): to_json_safe(v, nonfinite) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json_safe(v, nonfinite) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    elif hasattr(value, "tolist"):  # numpy arrays, torch tensors
        return to_json_safe(value.tolist(), nonfinite)
    if isinstance(value, float) and nonfinite == "null" and not math.isfinite(value):
        return None
    return value
