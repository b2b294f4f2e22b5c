"""`to_json_safe`: the one converter of numpy and torch values before JSON."""

from __future__ import annotations

import json
import math

import numpy as np
import torch

from cxrdx.jsonsafe import to_json_safe


def test_numpy_and_torch_values_become_plain_json():
    value = {
        "a": np.float32(0.5),
        "b": np.int64(3),
        "c": np.arange(3),
        "d": torch.tensor([1.5, 2.5]),
        "e": (np.bool_(True), "x"),
        1: [np.float64(2.0)],
    }
    safe = to_json_safe(value)
    assert safe == {"a": 0.5, "b": 3, "c": [0, 1, 2], "d": [1.5, 2.5], "e": [True, "x"], "1": [2.0]}
    assert type(safe["b"]) is int and type(safe["a"]) is float and type(safe["e"][0]) is bool
    assert json.loads(json.dumps(safe)) == safe


def test_nonfinite_numbers_become_null_or_stay():
    value = {"nan": np.float64("nan"), "inf": float("inf"), "list": np.array([1.0, np.nan])}
    assert to_json_safe(value) == {"nan": None, "inf": None, "list": [1.0, None]}
    kept = to_json_safe(value, nonfinite="keep")
    assert math.isnan(kept["nan"]) and kept["inf"] == math.inf and math.isnan(kept["list"][1])
    assert json.dumps(kept) == '{"nan": NaN, "inf": Infinity, "list": [1.0, NaN]}'
