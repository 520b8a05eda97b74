"""The calibration bench's method specs (the timing itself is a script, never a test)."""
import importlib.util
import os
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


#: a stand-in for a checkout of the official FeatCal code (github.com/egangu/featcal): its
#: layout (``src/featcal/``, a package that is also named ``featcal``) and the interface the
#: bench calls; it records what it was given instead of calibrating
STANDIN_OFFICIAL = '''
import json, os, sys
from dataclasses import asdict, dataclass


@dataclass
class FeatCalConfig:
    num_calibration_examples: int = 256
    calibration_batch_size: int = 16
    lambda_ratio: float = 0.0
    anchor_blend_rho: float = 1.0
    teacher_interp_alpha: float = 0.0
    covariance_eps: float = 0.0
    calibrate_bias: bool = False
    calibrate_layernorm: bool = False


def _clip_first_layer_input(model, images):
    vision = model.vision_model
    return vision.pre_layrnorm(vision.embeddings(images))


class CLIPFeatCalibrator:
    def __init__(self, config, *, processor, device, cache_dir=None, datasets_cache_dir=None):
        self.config, self.device = config, device

    def prepare_first_layer_inputs(self, *, merged_model, expert_models, tasks):
        raise RuntimeError("the hub-dataset loader must not run in the bench")

    def calibrate(self, *, merged_model, base_model, expert_models, tasks):
        student, expert = self.prepare_first_layer_inputs(merged_model=merged_model, expert_models=expert_models,
                                                          tasks=tasks)
        ours = sys.modules["featcal"].__file__
        record = {"config": asdict(self.config), "tasks": list(tasks),
                  "batches": {t: [list(b.shape) for b in student[t]] for t in tasks},
                  "expert_batches": {t: [list(b.shape) for b in expert[t]] for t in tasks},
                  "per_task_distinct": bool((student[tasks[0]][0] != student[tasks[1]][0]).any()),
                  "package": __name__, "featcal_is_this_project": "featcal-official" not in ours}
        with open(os.environ["STANDIN_RECORD"], "w") as f:
            json.dump(record, f)
        return merged_model
'''


def _standin_checkout(tmp_path: Path) -> Path:
    """A folder laid out like a checkout of the official repository, holding the stand-in."""
    checkout = tmp_path / "featcal-official"
    (checkout / "src" / "featcal").mkdir(parents=True)
    (checkout / "src" / "featcal" / "__init__.py").write_text('"""stand-in"""\n')
    (checkout / "src" / "featcal" / "featcal.py").write_text(STANDIN_OFFICIAL)
    return checkout


@pytest.mark.slow
def test_official_method_runs_a_checkout_of_the_authors_code_beside_this_featcal(tmp_path):
    """``--official-src``: the authors' package (also named ``featcal``) is imported beside this
    one, configured from conf/calibration/featcal.yaml, fed the bench's own calibration images
    (its hub loader bypassed), timed, and its parameters compared with this FeatCal's."""
    import json
    import subprocess
    import sys

    from omegaconf import OmegaConf

    checkout = _standin_checkout(tmp_path)
    record, out = tmp_path / "record.json", tmp_path / "bench.json"
    cmd = [sys.executable, str(ROOT / "experiments" / "bench_calibration.py"), "--tiny", "--experts", "2", "--n", "32",
           "--methods", "official,featcal", "--official-src", str(checkout), "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "STANDIN_RECORD": str(record)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = json.loads(record.read_text())
    ours = OmegaConf.load(ROOT / "conf" / "calibration" / "featcal.yaml")
    assert got["config"] == {
        "num_calibration_examples": 32, "calibration_batch_size": 16, "lambda_ratio": ours.lambda_ratio,
        "anchor_blend_rho": ours.rho, "teacher_interp_alpha": ours.alpha, "covariance_eps": ours.eps,
        "calibrate_bias": ours.calibrate_bias, "calibrate_layernorm": ours.calibrate_norm,
    }
    # two tasks, 32 images each in batches of 16, tiny tower: 16 patches + class token, width 64
    assert got["tasks"] == ["task0", "task1"]
    assert got["batches"] == {t: [[16, 17, 64], [16, 17, 64]] for t in got["tasks"]}
    assert got["expert_batches"] == got["batches"]
    assert got["per_task_distinct"]  # each task's own images
    assert got["package"] == "featcal_official.featcal" and got["featcal_is_this_project"]
    rows = {r["method"]: r for r in json.loads(out.read_text())["results"]}
    assert set(rows) == {"official", "featcal"} and rows["official"]["seconds"] > 0
    # the stand-in returns the merge uncalibrated: far from FeatCal's parameters, and reported so
    assert rows["official"]["param_reference"] == "featcal" and rows["official"]["param_rel_diff"] > 1e-3
    assert "ratios (other / official)" in proc.stdout


def test_official_method_needs_a_checkout(tmp_path):
    bench = _bench()
    with pytest.raises(SystemExit):
        bench.main(["--methods", "official,featcal", "--tiny"])
    with pytest.raises(FileNotFoundError, match="egangu/featcal"):
        bench.load_official(tmp_path)


@pytest.mark.slow
def test_parity_script_compares_the_four_calibrations(tmp_path):
    """experiments/featcal_official_parity.py with the stand-in checkout (it returns the merge
    uncalibrated, in the dtype it is given): the four comparisons are printed, the stand-in's
    float32 and float64 results are the same merge (difference 0), and this FeatCal's float32
    and float64-solve results agree to float32 rounding."""
    import re
    import subprocess
    import sys

    checkout = _standin_checkout(tmp_path)
    cmd = [sys.executable, str(ROOT / "experiments" / "featcal_official_parity.py"), "--official-src", str(checkout),
           "--tiny", "--experts", "2", "--n", "16"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "STANDIN_RECORD": str(tmp_path / "record.json")})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    found = dict(re.findall(r"^(\S+ vs \S+): max (\S+);", proc.stdout, flags=re.M))
    assert set(found) == {"official vs featcal", "official vs official-fp64", "featcal vs official-fp64",
                          "featcal vs featcal-fp64solve"}, proc.stdout
    assert float(found["official vs official-fp64"]) == 0.0
    assert float(found["official vs featcal"]) > 1e-3  # FeatCal moved the parameters; the stand-in did not
    assert float(found["featcal vs featcal-fp64solve"]) < 1e-3
