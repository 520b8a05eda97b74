"""Gemma-2 adapter: (1 + w) RMSNorm closed form against brute-force least squares, block
forward identical to the model's own (sliding-window and full layers, soft-capping),
FeatCal on a tiny sharded Gemma-2 lowers the final drift to every expert."""
from __future__ import annotations

import pytest
import torch

from featcal.backbone.gemma2 import Gemma2Backbone
from featcal.calibration.feature_calibration import FeatCal
from featcal.calibration.feature_calibration.solver import anchor, solve_rmsnorm
from featcal.calibration.feature_calibration.stats import normalise_without_affine
from featcal.merge import task_arithmetic
from featcal.merge.streaming import merge_models
from tests.fixtures.featcal_worlds import final_drift as _final_drift
from tests.fixtures.llm import TASKS, build_world, is_sharded, task_batch

pytestmark = pytest.mark.usefixtures("one_thread")


def test_gemma_norm_closed_form_matches_brute_force_least_squares():
    """min_w Σ_t E_t‖norm_w(x_t) − norm_{w_t}(x_t)‖² + λ‖(1 + w) − A_g‖², A_g = ρ(1 + w_m) + (1 − ρ)(1 + w_0),
    with Gemma's norm_w(x) = x/rms(x)·(1 + w): solved in effective-scale space, written as w = g − 1."""
    from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm

    torch.manual_seed(0)
    d, lam, rho = 6, 0.05, 2.2
    norm = Gemma2RMSNorm(d, eps=1e-6)
    xs = [torch.randn(40 + 7 * t, d) * (1 + t) for t in range(3)]
    w_t = [0.3 * torch.randn(d) for _ in range(3)]
    w_m, w_0 = 0.2 * torch.randn(d), 0.2 * torch.randn(d)

    # the FeatCal path (as the driver runs it with norm_scale_offset = 1)
    off = Gemma2Backbone.norm_scale_offset(None, norm)
    assert off == 1.0
    e = torch.stack([(normalise_without_affine(norm, x, torch.float32, off) ** 2).mean(0) for x in xs])
    g = solve_rmsnorm(e, torch.stack([w + off for w in w_t]), anchor(w_m.double() + off, w_0.double() + off, rho), lam)
    w_featcal = (g - off).float()

    # brute force: per dimension, rows √(1/N_t)·z·(1 + w) ≈ √(1/N_t)·z·(1 + w_t), ridge rows
    a_g = rho * (1 + w_m) + (1 - rho) * (1 + w_0)
    want = torch.empty(d)
    for j in range(d):
        rows, rhs = [], []
        for x, wt in zip(xs, w_t):
            z = (x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt())[:, j]
            s = 1.0 / len(x) ** 0.5
            rows.append(s * z)  # coefficient of w: z·(1 + w) − z·(1 + w_t) = z·w − z·w_t
            rhs.append(s * z * wt[j])
        rows.append(torch.tensor([lam**0.5]))
        rhs.append(torch.tensor([lam**0.5 * (a_g[j] - 1)]))
        a = torch.cat(rows).double()[:, None]
        b = torch.cat(rhs).double()[:, None]
        want[j] = torch.linalg.lstsq(a, b).solution.squeeze().float()
    torch.testing.assert_close(w_featcal, want, rtol=1e-5, atol=1e-6)

    # the norm module with the solved weight has the brute-force outputs
    with torch.no_grad():
        norm.weight.copy_(w_featcal)
    ref = xs[0] / xs[0].pow(2).mean(-1, keepdim=True).add(1e-6).sqrt() * (1 + want)
    torch.testing.assert_close(norm(xs[0]), ref, rtol=1e-5, atol=1e-5)
    # ignoring the offset (weight = 1 as "unit scale") normalises to 2z: a different e
    e_wrong = (normalise_without_affine(norm, xs[0], torch.float32) ** 2).mean(0)
    assert torch.allclose(e_wrong, 4 * e[0], rtol=1e-4)


@pytest.fixture(scope="module")
def gemma_world(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("gemma2")
    base, experts = build_world(root, "gemma2", layers=2, steps=15)
    backbone = Gemma2Backbone(TASKS, base=base, experts=experts)
    b = backbone.load_base()
    ex = backbone.load_experts()
    merged_sd = task_arithmetic(b.state_dict(), [e.state_dict() for e in ex], 0.3, exclude=backbone.merge_excluded)
    calib = [[task_batch(t, 16, t), task_batch(t, 16, 10 + t)] for t in range(len(TASKS))]
    test = [task_batch(t, 48, 50 + t) for t in range(len(TASKS))]
    return backbone, b, ex, merged_sd, calib, test, base, experts


def test_gemma_checkpoints_are_sharded_and_have_both_layer_types(gemma_world):
    backbone, base, *_rest, base_dir, expert_dirs = gemma_world
    assert is_sharded(base_dir) and all(is_sharded(e) for e in expert_dirs.values())
    assert set(base.config.layer_types) == {"sliding_attention", "full_attention"}
    assert base.config.attn_logit_softcapping and base.config.sliding_window < 12


def test_gemma_backbone_matches_the_model_forward(gemma_world):
    backbone, base, *_ = gemma_world
    batch = task_batch(1, 5, 99)
    with torch.no_grad():
        ref = base(**batch, output_hidden_states=True).hidden_states[-1]  # after the final norm
        state = backbone.embed(base, batch)
        for blk in backbone.blocks(base):
            state = backbone.run_block(blk, state)
        got = base.model.norm(state.hidden)
    m = batch["attention_mask"].bool()
    torch.testing.assert_close(got[m], ref[m], rtol=1e-5, atol=1e-5)
    # the sliding-window mask matters: full attention everywhere gives other features
    with torch.no_grad():
        state = backbone.embed(base, batch)
        state.extras["masks"]["sliding_attention"] = state.extras["masks"]["full_attention"]
        for blk in backbone.blocks(base):
            state = backbone.run_block(blk, state)
    assert not torch.allclose(base.model.norm(state.hidden)[m], ref[m], atol=1e-4)


def test_gemma_featcal_lowers_final_drift_and_moves_all_four_norms(gemma_world):
    backbone, base, experts, merged_sd, calib, test, *_ = gemma_world
    merged = backbone.with_state_dict(base, merged_sd)
    before = _final_drift(backbone, merged, experts, test)
    out = FeatCal(progress=False).calibrate(backbone, merged, base, experts, calib)
    after = _final_drift(backbone, out.model, experts, test)
    assert all(a < b for a, b in zip(after, before)), (before, after)
    names = set()
    for i, blk in enumerate(backbone.blocks(out.model)):
        for n, p in blk.named_parameters():
            assert not torch.equal(p, merged_sd[f"model.layers.{i}.{n}"]), (i, n)
            names.add(n.rsplit(".", 1)[0])
    assert {"input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"} <= names
    # generation path still works (final soft-capping inside the model)
    logits = out.model(**test[0]).logits
    assert torch.isfinite(logits).all() and logits.abs().max() <= 30.0 + 1e-4


def test_gemma_layer_streamed_equals_in_memory(gemma_world):
    """Lazy Gemma-2 checkpoints (tied lm_head, sliding/full layers): streamed merge and
    layer-streamed FeatCal give the in-memory result."""
    import functools

    backbone, base, experts, merged_sd, calib, test, base_dir, expert_dirs = gemma_world
    merged = backbone.with_state_dict(base, merged_sd)
    ref = FeatCal(progress=False, pass_tokens=0, drift_examples=0).calibrate(backbone, merged, base, experts, calib)
    st = Gemma2Backbone(TASKS, base=base_dir, experts=expert_dirs, streaming=True, merge_dir=str(base_dir) + "-merged")
    lb, le = st.load_base(), st.load_experts()
    m = merge_models(functools.partial(task_arithmetic, scaling_factor=0.3), st, lb, le)
    got = FeatCal(progress=False, drift_examples=0).calibrate(st, m, lb, le, calib)
    assert got.report.settings["streamed"] is True
    for (n, a), b in zip(ref.model.state_dict().items(), got.model.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=n)
