"""Device hygiene checked on the CPU (no second device needed; see
``tests/fixtures/device_audit.py``).

The GPU itself is exercised by ``tests/run/test_gpu.py`` (marker ``gpu``).
"""
from __future__ import annotations

import copy

import pytest
import torch

from featcal.calibration.feature_calibration import FeatCal, solve_layernorm, solve_rmsnorm
from tests.fixtures.device_audit import FactoryAudit, foreign_home

pytestmark = pytest.mark.usefixtures("one_thread")


def _world_parts(world):
    backbone, base, experts, merged_sd, calib, _ = world
    return backbone, base, experts, merged_sd, calib


@pytest.mark.parametrize("route", ["direct", "gram"])
@pytest.mark.parametrize("name", ["clip", "llama"])
def test_featcal_keeps_no_alias_of_expert_parameters(name, route, request):
    """Experts whose blocks live elsewhere (the CPU in a GPU run; a poisoned "home" here) give the same
    calibration as experts on the work device: every statistic is a copy on that device.
    Before the fix the LayerNorm/RMSNorm γ, β of the experts were kept by reference and
    followed the block home (issue 9's crash in solve_layernorm)."""
    backbone, base, experts, merged_sd, calib = _world_parts(request.getfixturevalue(f"{name}_world"))
    kw = dict(progress=False, cross_route=route, drift_examples=4)
    ref = FeatCal(**kw).calibrate(backbone, backbone.with_state_dict(base, merged_sd), base, experts, calib)
    away = [copy.deepcopy(e) for e in experts]
    out = FeatCal(**kw).calibrate(
        foreign_home(backbone, away), backbone.with_state_dict(base, merged_sd), base, away, calib
    )
    # the expert blocks really went "home" (and lost their data)
    assert all(p.isnan().all() for e in away for b in backbone.blocks(e) for p in b.parameters())
    for (n, p), q in zip(ref.model.named_parameters(), out.model.parameters()):
        assert p.device == q.device
        torch.testing.assert_close(q, p, rtol=0, atol=0, msg=n)
    assert out.report.drift == ref.report.drift


@pytest.mark.parametrize("name", ["clip", "llama"])
def test_featcal_creates_every_tensor_on_the_data_device(name, request):
    """No tensor factory call in FeatCal without device=, no .cpu() / .to("cpu")."""
    backbone, base, experts, merged_sd, calib = _world_parts(request.getfixturevalue(f"{name}_world"))
    for kw in (dict(cross_route="direct"), dict(cross_route="gram", dtype="float64"), dict(forward_order=False)):
        merged = backbone.with_state_dict(base, merged_sd)
        with FactoryAudit() as audit:
            FeatCal(progress=False, **kw).calibrate(backbone, merged, base, experts, calib)
        assert audit.unexpected() == [], kw


def test_norm_solves_follow_their_inputs_device():
    """The closed forms compute on the device of the statistics (meta: raises on any mix)."""
    t, d = 3, 5
    meta = dict(device="meta")
    e, m, g, b = (torch.empty(t, d, **meta) for _ in range(4))
    a_g, a_b = torch.empty(d, **meta), torch.empty(d, **meta)
    gamma, beta = solve_layernorm(e, m, g, b, a_g, a_b, 0.1)
    assert gamma.is_meta and beta.is_meta and gamma.shape == (d,)
    assert solve_rmsnorm(e, g, a_g, 0.1).is_meta
    with pytest.raises((RuntimeError, ValueError)):
        solve_layernorm(e, m, g, torch.zeros(t, d), a_g, a_b, 0.1)


def test_surgery_creates_tensors_on_the_device_or_from_cpu_generators():
    """Surgery/ProbSurgery draw their minibatch indices and noise from seeded CPU generators
    (identical streams on every device) and move them to the device; nothing else is
    created without device=."""
    from featcal.backbone.clip import CLIPVisionBackbone
    from featcal.calibration.surgery import ProbSurgery, Surgery
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    cfg = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=8, patch_size=4, projection_dim=8)
    base = CLIPVisionModelWithProjection(cfg).eval()
    experts = [copy.deepcopy(base) for _ in range(2)]
    with torch.no_grad():
        for k, e in enumerate(experts):
            for p in e.parameters():
                p.add_(0.05 * (k + 1))
    backbone = CLIPVisionBackbone(["a", "b"], base="unused", experts=["x", "y"])
    calib = [[torch.randn(4, 3, 8, 8)] for _ in range(2)]
    allowed = {
        "featcal/calibration/surgery.py": "CPU generators for indices/noise, moved with .to(device); save() writes CPU tensors",
    }
    for cls in (Surgery, ProbSurgery):
        with FactoryAudit() as audit:
            cal = cls(iterations=3, batches_per_iteration=1, progress=False, accelerator="cpu").calibrate(
                backbone, copy.deepcopy(base), base, experts, calib, "cpu"
            )
        # the only factory calls without device= are the CPU-generator ones in the training loop
        assert audit.unexpected(allowed) == []
        kinds = {f.what for f in audit.findings}
        # the audit sees the generator draws (else it would not be looking)
        assert "torch.randperm without device=" in kinds
        assert ("torch.randn without device=" in kinds) == (cls is ProbSurgery)
        assert kinds <= {"torch.randperm without device=", "torch.randn without device="}, kinds
        assert cal.report.extra["steps"] == 3 * 2


def test_block_dtype_bf16_runs_the_passes_in_bf16_and_keeps_fp32_statistics(clip_world):
    """bf16 block passes (autocast) give float32 parameters close to, but not equal to,
    the fp32 calibration; tf32 is a CUDA switch and changes nothing on the CPU."""
    backbone, base, experts, merged_sd, calib = _world_parts(clip_world)

    def run(**kw):
        merged = backbone.with_state_dict(base, merged_sd)
        return FeatCal(progress=False, drift_examples=0, **kw).calibrate(backbone, merged, base, experts, calib)

    ref, tf32, bf16 = run(), run(block_dtype="tf32", gram_tf32=True), run(block_dtype="bf16")
    assert tf32.report.settings["gram_tf32"] is True
    assert bf16.report.settings["block_dtype"] == "bf16" and ref.report.settings["block_dtype"] == "fp32"
    worst = 0.0
    pairs = zip(ref.model.named_parameters(), bf16.model.parameters(), tf32.model.parameters())
    for n, p, q, r in ((n, p.detach(), q.detach(), r.detach()) for (n, p), q, r in pairs):
        assert q.dtype == torch.float32 and torch.isfinite(q).all(), n
        assert torch.equal(p, r), n  # tf32 (passes and Grams) on the CPU: plain float32
        worst = max(worst, float((q - p).abs().max() / p.abs().max().clamp_min(1e-12)))
    assert 0.0 < worst < 5e-2, worst  # bf16 really ran, and stays close


def test_block_dtype_is_validated():
    with pytest.raises(ValueError, match="block_dtype"):
        FeatCal(block_dtype="fp8")


def test_featcal_refuses_a_budget_whose_activations_cannot_fit(clip_world, monkeypatch):
    """Any budget (budget.per_task=all included) is fine while one block's activations of
    all examples fit on the device; otherwise a clear error before any block runs."""
    from featcal.calibration.feature_calibration import in_memory
    from featcal.errors import ConfigError

    backbone, base, experts, merged_sd, calib = _world_parts(clip_world)
    monkeypatch.setattr(in_memory, "available_bytes", lambda device: 10_000)
    merged = backbone.with_state_dict(base, merged_sd)
    with pytest.raises(ConfigError, match=r"FeatCal: 96 calibration examples need about .* GiB .* smaller budget"):
        FeatCal(progress=False).calibrate(backbone, merged, base, experts, calib)
    for p, q in zip(merged.parameters(), backbone.with_state_dict(base, merged_sd).parameters()):
        assert torch.equal(p, q)  # nothing was written
    monkeypatch.setattr(in_memory, "available_bytes", lambda device: None)  # unknown: no check
    FeatCal(progress=False, drift_examples=0).calibrate(backbone, merged, base, experts, calib)


def test_merges_create_tensors_on_the_weights_device():
    from featcal.merge import dare, task_arithmetic, ties, weight_average

    g = torch.Generator().manual_seed(0)
    base = {"a": torch.randn(6, 4, generator=g), "b": torch.randn(4, generator=g), "ids": torch.arange(3)}
    experts = [{k: (v + torch.randn(v.shape, generator=g) if v.is_floating_point() else v) for k, v in base.items()}
               for _ in range(2)]
    with FactoryAudit() as audit:
        for fn in (weight_average, task_arithmetic, ties, dare):
            fn(base, experts)
    # DARE's masks come from a CPU generator on purpose (same merge on every device) and
    # say so with device="cpu"; nothing else is created without a device
    assert audit.unexpected() == []
