"""The calibration bench's method specs (the timing itself is a script, never a test)."""
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_calibration", ROOT / "experiments" / "bench_calibration.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_method_specs_parse_yaml_overrides():
    bench = _bench()
    assert bench.split_method("surgery") == ("surgery", {})
    assert bench.split_method("featcal:pass_tokens=0:drift_examples=null:dtype=float64") == (
        "featcal",
        {"pass_tokens": 0, "drift_examples": None, "dtype": "float64"},
    )
    with pytest.raises(ValueError, match="not key=value"):
        bench.split_method("featcal:pass_tokens")
