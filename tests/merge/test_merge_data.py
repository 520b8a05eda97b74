"""Merges that read the calibration set (RegMean, layer-wise AdaMerging) on a tiny CLIP vision tower."""
import copy

import pytest
import torch
from torch import nn

from featcal.backbone.clip import CLIPVisionBackbone
from featcal.merge import task_arithmetic, weight_average
from featcal.merge.adamerging import adamerging, entropy
from featcal.merge.regmean import regmean
from featcal.tasks.base import ClassEmbeddingHead

N_TASKS = 3


@pytest.fixture(scope="module")
def world(one_thread):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    cfg = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                           image_size=8, patch_size=4, projection_dim=8, hidden_act="quick_gelu")
    base = CLIPVisionModelWithProjection(cfg).eval()
    experts = []
    for t in range(N_TASKS):
        e = copy.deepcopy(base)
        with torch.no_grad():
            for p in e.parameters():
                p.add_(0.05 * torch.randn_like(p))
        experts.append(e.eval())
    backbone = CLIPVisionBackbone([f"t{t}" for t in range(N_TASKS)], base="unused", experts=["unused"] * N_TASKS)
    # task t's inputs: its own distribution (shifted means), two batches of 8
    calib = [[torch.randn(8, 3, 8, 8) + 0.5 * t for _ in range(2)] for t in range(N_TASKS)]
    heads = [ClassEmbeddingHead(torch.randn(5, 8), logit_scale=10.0) for _ in range(N_TASKS)]
    return base, experts, backbone, calib, heads


def linear_inputs(model, batches):
    """X per Linear name, captured independently of featcal (the model's own forward)."""
    xs: dict[str, list[torch.Tensor]] = {}
    handles = [
        m.register_forward_pre_hook(lambda mod, args, name=name: xs.setdefault(name, []).append(args[0].reshape(-1, args[0].shape[-1]).double()))
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear)
    ]
    with torch.no_grad():
        for b in batches:
            model(pixel_values=b)
    for h in handles:
        h.remove()
    return {k: torch.cat(v) for k, v in xs.items()}


def run_regmean(world, **kw):
    base, experts, backbone, calib, _ = world
    return regmean(base.state_dict(), [e.state_dict() for e in experts], backbone=backbone, base_model=base,
                   expert_models=experts, calib=calib, device="cpu", solve_dtype="float64", **kw)


def test_regmean_equals_stacked_least_squares_at_ratio_one(world):
    base, experts, _, calib, _ = world
    out = run_regmean(world, reduce_non_diagonal_ratio=1.0)
    inputs = [linear_inputs(e, c) for e, c in zip(experts, calib)]
    names = sorted(inputs[0])
    assert "visual_projection" in names and any("fc2" in n for n in names) and len(names) == 2 * 6 + 1
    for name in names:
        a = torch.cat([x[name] for x in inputs])
        w_t = [e.state_dict()[name + ".weight"].double() for e in experts]
        b = torch.cat([x[name] @ w.t() for x, w in zip(inputs, w_t)])
        expected = torch.linalg.lstsq(a, b).solution.t()
        got = out[name + ".weight"].double()
        assert torch.allclose(got, expected, atol=1e-5, rtol=1e-4), name
        # and it is neither the plain average nor any single expert
        assert not torch.allclose(got, sum(w_t) / N_TASKS, atol=1e-4)


def test_regmean_scales_off_diagonal_gram_entries(world):
    base, experts, _, calib, _ = world
    out = run_regmean(world, reduce_non_diagonal_ratio=0.95)
    plain = run_regmean(world, reduce_non_diagonal_ratio=1.0)
    inputs = [linear_inputs(e, c) for e, c in zip(experts, calib)]
    for name in ("vision_model.encoder.layers.0.mlp.fc1", "visual_projection"):
        gs, rhs = 0, 0
        for x, e in zip(inputs, experts):
            g = x[name].t() @ x[name]
            g = 0.95 * g + 0.05 * torch.diag(torch.diagonal(g))
            gs = gs + g
            rhs = rhs + g @ e.state_dict()[name + ".weight"].double().t()
        expected = torch.linalg.solve(gs, rhs).t()
        assert torch.allclose(out[name + ".weight"].double(), expected, atol=1e-5, rtol=1e-4)
        assert not torch.allclose(out[name + ".weight"], plain[name + ".weight"], atol=1e-4)


def test_regmean_averages_everything_else_and_keeps_excluded(world):
    base, experts, backbone, calib, _ = world
    excluded = "vision_model.embeddings.class_embedding"
    out = regmean(base.state_dict(), [e.state_dict() for e in experts], exclude=lambda k: k == excluded,
                  backbone=backbone, base_model=base, expert_models=experts, calib=calib)
    avg = weight_average(base.state_dict(), [e.state_dict() for e in experts])
    linear_weights = {n + ".weight" for n, m in base.named_modules() if isinstance(m, nn.Linear)}
    checked = 0
    for key, value in out.items():
        if key == excluded:
            assert torch.equal(value, base.state_dict()[key])
        elif key not in linear_weights:
            assert torch.allclose(value, avg[key]), key  # biases, norms, embeddings
            checked += 1
    assert checked > 10
    assert any(k.endswith("fc1.bias") for k in out)
    assert set(out) == set(base.state_dict())
    # the experts and the base model were left as they were
    for e in experts:
        assert all(not p.requires_grad or p.grad is None for p in e.parameters())


def run_adamerging(world, **kw):
    base, experts, backbone, calib, heads = world
    history: list = []
    out = adamerging(base.state_dict(), [e.state_dict() for e in experts], backbone=backbone, base_model=base,
                     calib=calib, heads=heads, device="cpu", history=history, **kw)
    return out, history


def mean_entropy(world, state_dict):
    base, _, backbone, calib, heads = world
    model = copy.deepcopy(base)
    model.load_state_dict(state_dict)
    with torch.no_grad():
        return sum(float(entropy(h(backbone.represent(model, b)))) for c, h in zip(calib, heads) for b in c)


def test_adamerging_with_zero_lr_is_task_arithmetic_at_init(world):
    base, experts, *_ = world
    before = {k: v.clone() for k, v in base.state_dict().items()}
    out, history = run_adamerging(world, init=0.3, lr=0.0, steps=3)
    ta = task_arithmetic(base.state_dict(), [e.state_dict() for e in experts], scaling_factor=0.3)
    for key in ta:
        assert torch.allclose(out[key], ta[key], atol=1e-6), key
    lambdas = torch.tensor(history[-1]["lambdas"])
    assert lambdas.shape == (N_TASKS, sum(1 for v in base.state_dict().values() if v.is_floating_point()))
    assert torch.all(lambdas == 0.3)
    for key, value in base.state_dict().items():  # the base model is not trained
        assert torch.equal(value, before[key])


def test_adamerging_lowers_prediction_entropy(world):
    base, experts, *_ = world
    ta = task_arithmetic(base.state_dict(), [e.state_dict() for e in experts], scaling_factor=0.3)
    out, history = run_adamerging(world, init=0.3, lr=0.05, steps=25)
    curve = [h["entropy"] for h in history if "entropy" in h]
    assert len(curve) == 25 and curve[-1] < curve[0]
    assert mean_entropy(world, out) < mean_entropy(world, ta) - 1e-3
    lambdas = torch.tensor(history[-1]["lambdas"])
    assert lambdas.min() >= 0.0 and lambdas.max() <= 1.0 and not torch.all(lambdas == 0.3)
