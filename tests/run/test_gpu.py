"""Device checks on a CUDA GPU (marker ``gpu``; skipped where no CUDA device exists).

Run them with ``pytest -m gpu`` or ``experiments/gpu_check.sh``. Tiny real architectures
(CLIP vision tower, Llama decoder) from ``tests/fixtures/featcal_worlds.py``; each check runs
the same thing on the CPU and on ``cuda`` and compares.
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from featcal.calibration.feature_calibration import FeatCal
from featcal.calibration.surgery import ProbSurgery, Surgery
from featcal.calibration.surgery_model import load_surgery
from featcal.merge import dare, task_arithmetic, ties, weight_average
from tests.fixtures.featcal_worlds import final_drift as _final_drift  # clip_world, llama_world: tests/conftest.py

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("one_thread")]

ROOT = Path(__file__).resolve().parents[2]
#: the device under test; FEATCAL_TEST_GPU_DEVICE=cpu runs these checks on the CPU (to
#: check the tests themselves on a machine without a GPU; conftest then does not skip)
CUDA = torch.device(os.environ.get("FEATCAL_TEST_GPU_DEVICE", "cuda"))
DEV = CUDA.type


@pytest.fixture(autouse=True)
def exact_fp32():
    """Plain float32 on the GPU for CPU-vs-GPU comparisons (no TF32 convolutions/matmuls)."""
    if not torch.cuda.is_available():
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _rel_diff(a: torch.nn.Module, b: torch.nn.Module) -> dict[str, float]:
    """Per parameter: max|a − b| / max|a| (a on any device, b on any device)."""
    out = {}
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        p, q = p.detach().float().cpu(), q.detach().float().cpu()
        out[n] = float((p - q).abs().max() / p.abs().max().clamp_min(1e-12))
    return out


def _featcal(world, device, models_on=None, **kw):
    backbone, base, experts, merged_sd, calib, _ = world
    merged = backbone.with_state_dict(base, merged_sd)
    base_m, experts_m = base, experts
    if models_on is not None:
        merged, base_m = merged.to(models_on), copy.deepcopy(base).to(models_on)
        experts_m = [copy.deepcopy(e).to(models_on) for e in experts]
    return FeatCal(progress=False, **kw).calibrate(backbone, merged, base_m, experts_m, calib, device)


# ----------------------------------------------------------------------------- FeatCal


@pytest.mark.parametrize("route", ["direct", "gram"])
@pytest.mark.parametrize("name", ["clip", "llama"])
def test_featcal_on_cuda_gives_the_cpu_parameters(name, route, request):
    """Models at home on the CPU (as in a run: the driver moves one block at a time) and
    models already on the GPU both give the CPU result to float32 tolerance."""
    world = request.getfixturevalue(f"{name}_world")
    cpu = _featcal(world, "cpu", cross_route=route)
    for models_on in (None, CUDA):
        gpu = _featcal(world, CUDA, models_on=models_on, cross_route=route)
        home = "cpu" if models_on is None else DEV
        assert all(p.device.type == home for p in gpu.model.parameters())
        diffs = _rel_diff(cpu.model, gpu.model)
        worst = max(diffs, key=diffs.get)
        print(f"{name}/{route}/models on {home}: worst {worst} {diffs[worst]:.2e}")
        assert diffs[worst] < 5e-4, (worst, diffs[worst])
        after = lambda r: {(d["task"], d["block"]): d["drift"] for d in r.report.drift if d["when"] == "after"}  # noqa: E731
        assert after(cpu) and set(after(gpu)) == set(after(cpu))
        for k, v in after(cpu).items():
            assert after(gpu)[k] == pytest.approx(v, rel=1e-3, abs=1e-5)


@pytest.mark.parametrize("name", ["clip", "llama"])
def test_featcal_bf16_models_and_fast_block_passes_on_cuda(name, request):
    """bf16 models (the run's precision=bf16) and fp32 models with tf32/bf16 block passes:
    finite calibrated weights in the model's dtype that lower the final drift."""
    world = request.getfixturevalue(f"{name}_world")
    backbone, base, experts, merged_sd, calib, test = world
    merged0 = backbone.with_state_dict(base, merged_sd)
    before = sum(_final_drift(backbone, merged0, experts, test))
    ref = _featcal(world, CUDA)
    for kw in (dict(block_dtype="tf32"), dict(block_dtype="tf32", gram_tf32=True), dict(block_dtype="bf16")):
        out = _featcal(world, CUDA, **kw)
        diffs = _rel_diff(ref.model, out.model)
        print(f"{name} {kw}: worst parameter difference to fp32 {max(diffs.values()):.2e}")
        assert max(diffs.values()) < 5e-2
        assert sum(_final_drift(backbone, out.model, experts, test)) < before
    # bf16 weights end to end
    b16 = lambda m: copy.deepcopy(m).to(torch.bfloat16)  # noqa: E731
    merged = b16(merged0)
    out = FeatCal(progress=False).calibrate(backbone, merged, b16(base), [b16(e) for e in experts], calib, CUDA)
    assert all(p.dtype == torch.bfloat16 and torch.isfinite(p).all() for p in out.model.parameters())
    assert sum(_final_drift(backbone, out.model.float(), experts, test)) < before


# ----------------------------------------------------------------------------- Surgery


def _surgery_world(clip_world):
    backbone, base, experts, merged_sd, calib, test = clip_world
    return backbone, base, experts, merged_sd, calib


@pytest.mark.parametrize("cls", [Surgery, ProbSurgery])
def test_surgery_trains_on_cuda_like_on_cpu(cls, clip_world, tmp_path):
    backbone, base, experts, merged_sd, calib = _surgery_world(clip_world)
    opts = dict(iterations=30, batches_per_iteration=2, log_every=10, progress=False)
    runs = {}
    for device in ("cpu", DEV):
        merged = backbone.with_state_dict(base, merged_sd)
        runs[device] = cls(**opts).calibrate(backbone, merged, base, experts, calib, device)
    gpu, cpu = runs[DEV], runs["cpu"]
    assert gpu.report.extra["device"].startswith(DEV)
    assert next(gpu.surgery.parameters()).device.type == DEV
    for task, value in gpu.report.extra["l1_after"].items():
        assert value < gpu.report.extra["l1_before"][task]
        # same seeds, same CPU-drawn indices and noise: the same training up to float rounding
        assert value == pytest.approx(cpu.report.extra["l1_after"][task], rel=1e-2)
    # bf16 autocast on the GPU
    merged = backbone.with_state_dict(base, merged_sd)
    mixed = cls(**opts, precision="bf16-mixed").calibrate(backbone, merged, base, experts, calib, DEV)
    assert all(mixed.report.extra["l1_after"][t] < mixed.report.extra["l1_before"][t] for t in mixed.report.extra["l1_after"])
    # represent on the GPU, save, load back and represent again
    x = calib[0][0].to(CUDA)
    gpu.model.to(CUDA)
    with torch.no_grad():
        z = backbone.represent(gpu.model_for_task(0), x)
    assert z.device.type == DEV
    gpu.save(tmp_path / "surgery")
    gpu.remove_hooks()
    back = load_surgery(tmp_path / "surgery", backbone, gpu.model)
    back.surgery.to(CUDA)
    with torch.no_grad():
        torch.testing.assert_close(backbone.represent(back.model_for_task(0), x), z)


# ----------------------------------------------------------------------------- merges


def test_merges_on_cuda_equal_the_cpu_merges():
    g = torch.Generator().manual_seed(0)
    base = {"a": torch.randn(64, 32, generator=g), "b": torch.randn(32, generator=g), "ids": torch.arange(3)}
    experts = [{k: (v + 0.1 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v) for k, v in base.items()}
               for _ in range(3)]
    on = lambda sd: {k: v.to(CUDA) for k, v in sd.items()}  # noqa: E731
    for fn, kw in ((weight_average, {}), (task_arithmetic, {}), (ties, {}), (ties, {"merge_func": "mean"}), (dare, {"seed": 3})):
        cpu = fn(base, experts, **kw)
        gpu = fn(on(base), [on(e) for e in experts], **kw)
        for k in base:
            assert gpu[k].device.type == DEV, (fn.__name__, k)
            torch.testing.assert_close(gpu[k].cpu(), cpu[k], rtol=1e-6, atol=1e-6, msg=f"{fn.__name__} {k}")


# ----------------------------------------------------------------------------- end to end


def _run(args, tmp_path, name):
    env = dict(os.environ)
    env.setdefault("FEATCAL_CACHE", str(tmp_path / "cache"))
    env["WANDB_SILENT"] = "true"
    env["HYDRA_FULL_ERROR"] = "1"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    out = tmp_path / name
    proc = subprocess.run(
        [sys.executable, "-m", "featcal.run", "backbone=embedded_small", "logger=none", f"hydra.run.dir={out}", *args],
        cwd=str(ROOT), env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, f"{args}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return json.loads((out / "results.json").read_text()), out


@pytest.fixture(scope="module")
def e2e_tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("gpu_e2e")


def test_featcal_run_bf16_on_cuda_end_to_end(e2e_tmp):
    """`featcal-run device=cuda precision=bf16` completes, saves, and scores like fp32."""
    common = ["calibration=featcal", "budget.per_task=32", "evaluate_experts=false", "evaluate_base=false"]
    fp32, _ = _run([f"device={DEV}", "precision=fp32", *common], e2e_tmp, "fp32_featcal")
    res, out = _run([f"device={DEV}", "precision=bf16", "merge=ties", "save_calibrated=true", *common],
                    e2e_tmp, "bf16_featcal_ties")
    bf16, _ = _run([f"device={DEV}", "precision=bf16", *common], e2e_tmp, "bf16_featcal")
    for r in (fp32, res, bf16):
        assert r["device"].startswith(DEV)
        if DEV == "cuda":
            assert r["memory"]["cuda_peak_mib"] > 0
        assert 0 <= r["score"]["calibrated"]["average"] <= 100
    assert (out / "calibrated_model" / "config.json").exists()
    # bf16 weights change the accuracies by rounding only
    for stage in ("merged", "calibrated"):
        a, b = fp32["score"][stage]["average"], bf16["score"][stage]["average"]
        assert abs(a - b) < 3.0, (stage, a, b)


@pytest.mark.parametrize("calibration", ["surgery", "probsurgery"])
def test_surgery_run_on_cuda_end_to_end(calibration, e2e_tmp):
    res, _ = _run([f"device={DEV}", f"calibration={calibration}", "budget.per_task=32", "calibration.iterations=50",
                   "evaluate_experts=false", "evaluate_base=false"], e2e_tmp, calibration)
    assert res["device"].startswith(DEV)
    assert res["calibration_report"]["extra"]["device"].startswith(DEV)
    assert res["calibration_report"]["extra"]["steps"] == 50 * 2 * len(res["tasks"])
    assert 0 <= res["score"]["calibrated"]["average"] <= 100
