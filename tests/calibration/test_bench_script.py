"""The calibration bench's method specs (the timing itself is a script, never a test)."""
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


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
    # another revision's FeatCal: the yaml name without the revision
    assert bench.split_method("featcal@9ae9d73:pass_tokens=0") == ("featcal", {"pass_tokens": 0})


def test_parameter_difference_is_relative_to_each_tensors_scale(tmp_path):
    import torch

    bench = _bench()
    ref = {"a": torch.tensor([10.0, -20.0]), "b": torch.tensor([0.5, 0.1])}
    got = {"a": torch.tensor([10.2, -20.0]), "b": torch.tensor([0.5, 0.09])}
    # a: 0.2 / 20 = 0.01; b: 0.01 / 0.5 = 0.02 -> the worst tensor
    assert bench.relative_param_difference(got, ref) == pytest.approx(0.02, rel=1e-5)
    torch.save(ref, tmp_path / "0.pt")
    torch.save(got, tmp_path / "1.pt")
    results = [
        {"method": "featcal", "params_file": str(tmp_path / "0.pt")},
        {"method": "surgery"},
        {"method": "featcal:block_dtype=bf16", "params_file": str(tmp_path / "1.pt")},
    ]
    bench.add_param_differences(results)
    assert "param_rel_diff" not in results[0] and "param_rel_diff" not in results[1]
    assert results[2]["param_reference"] == "featcal"
    assert results[2]["param_rel_diff"] == pytest.approx(0.02, rel=1e-5)


@pytest.mark.slow
def test_a_revision_from_before_the_layout_redesign_runs_with_its_own_configs(tmp_path):
    """``featcal@<rev>`` runs that revision's package with that revision's calibration configs
    (their ``_target_`` names its own module layout: 9ae9d73 still had
    ``featcal.calibration.featcal``); the two FeatCals agree exactly on the tiny tower."""
    import json
    import subprocess
    import sys

    rev = "9ae9d73"
    if subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e", f"{rev}^{{commit}}"], capture_output=True).returncode:
        pytest.skip(f"a shallow clone without {rev}")
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "bench_calibration.py"), "--tiny", "--experts", "2",
                           "--n", "16", "--methods", f"featcal,featcal@{rev}", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {r["method"]: r for r in json.loads(out.read_text())["results"]}
    assert set(rows) == {"featcal", f"featcal@{rev}"}
    assert rows[f"featcal@{rev}"]["param_rel_diff"] == 0.0
