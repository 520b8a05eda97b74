"""FeatCal closed forms against brute-force least squares on the stacked problem."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from featcal.calibration.feature_calibration.stats import add_upper_, gram_norm

from featcal.calibration.feature_calibration import (
    FeatCal,
    MomentAccumulator,
    SolveInfo,
    check_finite,
    ridge_solve,
    solve_layernorm,
    solve_linear_bias,
    solve_linear_weight,
    solve_rmsnorm,
    task_scale,
)

torch.set_default_dtype(torch.float32)
D = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def _problem(T=3, n=40, d_in=5, d_out=4, alpha=0.3, seed=0, weighted=True):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(n, d_in, generator=g, dtype=D) * (1 + t) + t for t in range(T)]
    xe = [x + 0.5 * torch.randn(n, d_in, generator=g, dtype=D) for x in xs]
    xt = [alpha * e + (1 - alpha) * s for s, e in zip(xs, xe)]
    ws = [torch.rand(n, generator=g, dtype=D) + 0.05 if weighted else torch.ones(n, dtype=D) for _ in range(T)]
    wts = [torch.randn(d_out, d_in, generator=g, dtype=D) for _ in range(T)]
    bts = [torch.randn(d_out, generator=g, dtype=D) for _ in range(T)]
    anc_w = torch.randn(d_out, d_in, generator=g, dtype=D)
    anc_b = torch.randn(d_out, generator=g, dtype=D)
    return xs, xe, xt, ws, wts, bts, anc_w, anc_b


def _stats(xs, xt, ws, wts):
    """Per-task w-weighted statistics through the driver's accumulator."""
    c_ss, cross, mu_s, mu_t = [], [], [], []
    for x, y, w, wt in zip(xs, xt, ws, wts):
        acc = MomentAccumulator(x.shape[1], "cpu", dtype=D)
        acc.add(x[:17], w[:17])  # two "batches"
        acc.add(x[17:], w[17:])
        c_ss.append(acc.second())
        mu_s.append(acc.mean())
        sw = w.sum()
        cross.append((x * w[:, None]).T @ (y @ wt.T) / sw)  # E[x_s (W_t x_t)^T]
        mu_t.append((y * w[:, None]).sum(0) / sw)
    return c_ss, cross, mu_s, mu_t


def test_linear_weight_matches_stacked_lstsq():
    xs, xe, xt, ws, wts, bts, anc_w, _ = _problem()
    lam, eps = 0.05, 1e-3  # a visible ε so its role in the stacked problem is checked too
    c_ss, cross, _, _ = _stats(xs, xt, ws, wts)
    w = solve_linear_weight(c_ss, cross, anc_w, lam, eps, dtype=D)

    # brute force: minimise Σ_t s_t E_w‖W x_s − W_t x_t‖² + λ‖W − A‖² + ε‖W‖²
    rows_a, rows_b = [], []
    for x, y, wt_, wt in zip(xs, xt, ws, wts):
        s = 1.0 / torch.linalg.matrix_norm((x * wt_[:, None]).T @ x / wt_.sum())
        r = torch.sqrt(s * wt_ / wt_.sum())[:, None]
        rows_a.append(r * x)
        rows_b.append(r * (y @ wt.T))
    d_in = xs[0].shape[1]
    rows_a += [lam**0.5 * torch.eye(d_in, dtype=D), eps**0.5 * torch.eye(d_in, dtype=D)]
    rows_b += [lam**0.5 * anc_w.T, torch.zeros_like(anc_w.T)]
    ref = torch.linalg.lstsq(torch.cat(rows_a), torch.cat(rows_b)).solution.T
    torch.testing.assert_close(w, ref, rtol=1e-8, atol=1e-9)


def test_per_task_scaling_is_inverse_frobenius_norm():
    c = torch.randn(6, 6, dtype=D)
    c = c @ c.T
    assert task_scale(c) == pytest.approx(1.0 / float(torch.linalg.matrix_norm(c)))
    # the scaling makes the solution invariant to rescaling one task's inputs and targets
    xs, xe, xt, ws, wts, bts, anc_w, _ = _problem(weighted=False)
    c_ss, cross, _, _ = _stats(xs, xt, ws, wts)
    w1 = solve_linear_weight(c_ss, cross, anc_w, 0.05, dtype=D)
    c_ss[1], cross[1] = 100.0 * c_ss[1], 100.0 * cross[1]
    w2 = solve_linear_weight(c_ss, cross, anc_w, 0.05, dtype=D)
    torch.testing.assert_close(w1, w2)


def test_linear_bias_matches_stacked_lstsq():
    xs, xe, xt, ws, wts, bts, anc_w, anc_b = _problem()
    lam = 0.05
    c_ss, cross, mu_s, mu_t = _stats(xs, xt, ws, wts)
    w = solve_linear_weight(c_ss, cross, anc_w, lam, dtype=D)
    scales = [task_scale(c) for c in c_ss]
    targets = [b + wt @ m for b, wt, m in zip(bts, wts, mu_t)]
    b = solve_linear_bias(w, scales, mu_s, targets, anc_b, lam)

    # brute force over b with W fixed: Σ_t s_t E_w‖W x_s + b − W_t x_t − b_t‖² + λ‖b − A_b‖²
    rows_a, rows_b = [], []
    for x, y, wt_, wt, bt, s in zip(xs, xt, ws, wts, bts, scales):
        r = torch.sqrt(s * wt_ / wt_.sum())[:, None]
        rows_a.append(r)
        rows_b.append(r * (y @ wt.T + bt - x @ w.T))
    rows_a.append(torch.full((1, 1), lam**0.5, dtype=D))
    rows_b.append(lam**0.5 * anc_b[None])
    ref = torch.linalg.lstsq(torch.cat(rows_a), torch.cat(rows_b)).solution[0]
    torch.testing.assert_close(b, ref, rtol=1e-8, atol=1e-9)


def _norm_problem(T=3, n=50, d=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    zs = [torch.randn(n, d, generator=g, dtype=D) * 0.8 + 0.3 * t for t in range(T)]
    ws = [torch.rand(n, generator=g, dtype=D) + 0.05 for _ in range(T)]
    gammas = torch.randn(T, d, generator=g, dtype=D)
    betas = torch.randn(T, d, generator=g, dtype=D)
    e = torch.stack([(w[:, None] * z * z).sum(0) / w.sum() for z, w in zip(zs, ws)])
    m = torch.stack([(w[:, None] * z).sum(0) / w.sum() for z, w in zip(zs, ws)])
    return zs, ws, gammas, betas, e, m, torch.randn(d, generator=g, dtype=D), torch.randn(d, generator=g, dtype=D)


def test_layernorm_matches_per_dimension_lstsq():
    zs, ws, gammas, betas, e, m, a_g, a_b = _norm_problem()
    lam = 0.05
    gamma, beta = solve_layernorm(e, m, gammas, betas, a_g, a_b, lam)
    d = e.shape[1]
    for j in range(d):
        rows_a, rows_b = [], []
        for t, (z, w) in enumerate(zip(zs, ws)):
            r = torch.sqrt(w / w.sum())[:, None]
            zj = z[:, j : j + 1]
            rows_a.append(r * torch.cat([zj, torch.ones_like(zj)], 1))
            rows_b.append(r * (gammas[t, j] * zj + betas[t, j]))
        rows_a.append(lam**0.5 * torch.eye(2, dtype=D))
        rows_b.append(lam**0.5 * torch.stack([a_g[j], a_b[j]])[:, None])
        ref = torch.linalg.lstsq(torch.cat(rows_a), torch.cat(rows_b)).solution[:, 0]
        torch.testing.assert_close(torch.stack([gamma[j], beta[j]]), ref, rtol=1e-8, atol=1e-9)


def test_rmsnorm_matches_per_dimension_lstsq():
    zs, ws, gammas, _, e, _, a_g, _ = _norm_problem(seed=2)
    lam = 0.05
    gamma = solve_rmsnorm(e, gammas, a_g, lam)
    for j in range(e.shape[1]):
        rows_a, rows_b = [], []
        for t, (z, w) in enumerate(zip(zs, ws)):
            r = torch.sqrt(w / w.sum())[:, None]
            rows_a.append(r * z[:, j : j + 1])
            rows_b.append(r * gammas[t, j] * z[:, j : j + 1])
        rows_a.append(torch.full((1, 1), lam**0.5, dtype=D))
        rows_b.append(torch.full((1, 1), lam**0.5 * float(a_g[j]), dtype=D))
        ref = torch.linalg.lstsq(torch.cat(rows_a), torch.cat(rows_b)).solution[0, 0]
        torch.testing.assert_close(gamma[j], ref, rtol=1e-8, atol=1e-9)


def test_huge_ridge_returns_the_anchor():
    xs, xe, xt, ws, wts, bts, anc_w, anc_b = _problem()
    lam = 1e12
    c_ss, cross, mu_s, mu_t = _stats(xs, xt, ws, wts)
    w = solve_linear_weight(c_ss, cross, anc_w, lam, dtype=D)
    torch.testing.assert_close(w, anc_w, rtol=0, atol=1e-8)
    scales = [task_scale(c) for c in c_ss]
    b = solve_linear_bias(w, scales, mu_s, [b + wt @ m for b, wt, m in zip(bts, wts, mu_t)], anc_b, lam)
    torch.testing.assert_close(b, anc_b, rtol=0, atol=1e-8)
    zs, _, gammas, betas, e, m, a_g, a_b = _norm_problem()
    gamma, beta = solve_layernorm(e, m, gammas, betas, a_g, a_b, lam)
    torch.testing.assert_close(gamma, a_g, rtol=0, atol=1e-8)
    torch.testing.assert_close(beta, a_b, rtol=0, atol=1e-8)
    torch.testing.assert_close(solve_rmsnorm(e, gammas, a_g, lam), a_g, rtol=0, atol=1e-8)


def test_one_task_alpha_one_no_ridge_identical_inputs_recovers_the_expert():
    xs, _, _, ws, wts, bts, anc_w, anc_b = _problem(T=1)
    xt = xs  # identical student and expert inputs; α = 1 makes the teacher input x_e = x_s
    lam = 1e-12
    c_ss, cross, mu_s, mu_t = _stats(xs, xt, ws, wts)
    w = solve_linear_weight(c_ss, cross, anc_w, lam, eps=0.0, dtype=D)
    torch.testing.assert_close(w, wts[0], rtol=1e-7, atol=1e-7)
    b = solve_linear_bias(w, [task_scale(c_ss[0])], mu_s, [bts[0] + wts[0] @ mu_t[0]], anc_b, lam)
    torch.testing.assert_close(b, bts[0], rtol=1e-7, atol=1e-7)
    zs, _, gammas, betas, e, m, a_g, a_b = _norm_problem(T=1)
    gamma, beta = solve_layernorm(e, m, gammas, betas, a_g, a_b, lam, eps=0.0)
    torch.testing.assert_close(gamma, gammas[0], rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(beta, betas[0], rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(solve_rmsnorm(e, gammas, a_g, lam), gammas[0], rtol=1e-7, atol=1e-7)


def test_singular_system_falls_back_to_pinv():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(30, 5, generator=g, dtype=D)
    x[:, 2] = 0.0  # an input dimension that never fires: C_ss is exactly singular
    c = x.T @ x / 30
    rhs = torch.randn(5, 3, generator=g, dtype=D)
    rhs[2] = 0.0
    info = SolveInfo()
    sol = ridge_solve(c, rhs, 0.0, dtype=D, info=info)
    assert info.method == "pinv"
    assert torch.isfinite(sol).all()
    torch.testing.assert_close(sol, torch.linalg.pinv(c) @ rhs)
    # and a regular system takes the Cholesky path
    info = SolveInfo()
    ridge_solve(c, rhs, 0.05, dtype=D, info=info)
    assert info.method == "cholesky"


def test_non_finite_statistics_raise_naming_the_module():
    with pytest.raises(FloatingPointError, match="encoder.layers.3.mlp.fc1"):
        check_finite("encoder.layers.3.mlp.fc1", C_ss=torch.tensor([[float("nan")]]))
    with pytest.raises(FloatingPointError, match="blk.norm"):
        check_finite("blk.norm", e=torch.tensor([1.0, float("inf")]))
    check_finite("ok", C_ss=torch.eye(2), s_t=1.0)



def _tiny_stack(dtype):
    from featcal.backbone.base import Backbone, BlockState

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)
            self.norm = nn.LayerNorm(8)

        def forward(self, x):
            return x + self.norm(self.fc(x))

    class Stack(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([Block(), Block()])

    class StackBackbone(Backbone):
        def load_base(self):
            raise NotImplementedError

        def load_expert(self, task):
            raise NotImplementedError

        def blocks(self, model):
            return list(model.layers)

        def embed(self, model, inputs):
            x = inputs.to(next(model.parameters()).dtype)
            b, n, _ = x.shape
            return BlockState(x, torch.ones(b, n), torch.ones(b, n, dtype=torch.bool), {})

        def run_block(self, block, state):
            return state.with_hidden(block(state.hidden))

        def readout(self, model, state):
            return state.hidden.mean(1)

    torch.manual_seed(0)
    base = Stack().to(dtype)
    experts = []
    for _ in range(2):
        e = copy.deepcopy(base)
        with torch.no_grad():
            for p in e.parameters():
                p.add_(0.3 * torch.randn_like(p))
        experts.append(e)
    return StackBackbone(["a", "b"]), base, experts


def test_bf16_statistics_accumulate_in_float32():
    # 4096 tokens of ≈1: a bf16 running sum would stall at 256 (8 mantissa bits)
    x = (1.0 + 0.01 * torch.randn(4096, 4)).to(torch.bfloat16)
    acc = MomentAccumulator(4, "cpu", dtype=x.dtype)
    for chunk in x.split(64):
        acc.add(chunk.reshape(4, 16, 4))
    assert acc.first.dtype == torch.float32 and acc.raw_second.dtype == torch.float32
    ref = x.double()
    torch.testing.assert_close(acc.mean().double(), ref.mean(0), rtol=1e-4, atol=0)
    torch.testing.assert_close(acc.second().double(), ref.T @ ref / 4096, rtol=1e-4, atol=0)

    # and the driver on a bf16 model: float32 statistics, bf16 parameters back, finite
    backbone, base, experts = _tiny_stack(torch.bfloat16)
    merged = copy.deepcopy(base)
    with torch.no_grad():
        for pm, *pe in zip(merged.parameters(), *[e.parameters() for e in experts]):
            pm.copy_(sum(p.float() for p in pe) / len(pe))
    before = {k: v.clone() for k, v in merged.state_dict().items()}
    import featcal.calibration.feature_calibration.walk as fc

    captured, accumulators = [], []
    orig_capture, orig_add = fc.capture_inputs, MomentAccumulator.add

    def spy_capture(*args, **kwargs):
        store, order, out = orig_capture(*args, **kwargs)
        captured.extend(v.dtype for v in store.values())
        return store, order, out

    def spy_add(self, x, w=None, **kwargs):
        accumulators.append(self.first.dtype)
        return orig_add(self, x, w, **kwargs)

    fc.capture_inputs, MomentAccumulator.add = spy_capture, spy_add
    try:
        calib = [[torch.randn(4, 6, 8)] for _ in range(2)]
        FeatCal(progress=False).calibrate(backbone, merged, base, experts, calib)
    finally:
        fc.capture_inputs, MomentAccumulator.add = orig_capture, orig_add
    assert captured and all(d == torch.bfloat16 for d in captured)  # the model really ran in bf16
    assert accumulators and all(d == torch.float32 for d in accumulators)
    for k, v in merged.state_dict().items():
        assert v.dtype == torch.bfloat16 and torch.isfinite(v.float()).all()
    assert any(not torch.equal(v, before[k]) for k, v in merged.state_dict().items())


def test_moment_accumulator_upper_triangle_norm_and_reuse():
    """Wide inputs: only the upper block triangle is multiplied; the mirrored moment, its
    Frobenius norm and a reset-and-reuse all match the plain formulas."""
    g = torch.Generator().manual_seed(3)
    x1, w1 = torch.randn(30, 10, generator=g, dtype=D), torch.rand(30, generator=g, dtype=D)
    x2 = torch.randn(25, 10, generator=g, dtype=D) + 1.0
    acc = MomentAccumulator(10, "cpu", dtype=D, chunk=3)  # 10 > 2·3: panels of 3 rows
    acc.add(x1[:11], w1[:11])
    acc.add(x1[11:], w1[11:])
    raw = (x1 * w1[:, None]).T @ x1
    assert torch.count_nonzero(torch.tril(acc.raw_upper(), -3)) == 0  # nothing below the diagonal blocks
    torch.testing.assert_close(acc.second(), raw / w1.sum())
    assert acc.raw_norm() == pytest.approx(float(torch.linalg.matrix_norm(raw)), rel=1e-12)
    torch.testing.assert_close(acc.raw_full(), raw)
    acc.reset()
    acc.add(x2)
    torch.testing.assert_close(acc.second(), x2.T @ x2 / 25)
    torch.testing.assert_close(acc.mean(), x2.mean(0))
    assert acc.raw_norm() == pytest.approx(float(torch.linalg.matrix_norm(x2.T @ x2)), rel=1e-12)


def test_gram_norm_zero_below_add_upper_and_premultiplied_weights():
    """The fast paths of the statistics: the norm from the whole zero-below buffer equals
    the panel-by-panel norm and the full matrix's; ``add_upper_`` adds on the upper block
    triangle only; ``add(x, w, xw=x·w)`` equals ``add(x, w)``."""
    g = torch.Generator().manual_seed(5)
    x, w = torch.randn(40, 11, generator=g, dtype=D), torch.rand(40, generator=g, dtype=D)
    acc = MomentAccumulator(11, "cpu", dtype=D, chunk=3)
    acc.add(x, w)
    full = (x * w[:, None]).T @ x
    up = acc.raw_upper()
    ref = float(torch.linalg.matrix_norm(full))
    assert gram_norm(up, 3, zero_below=True) == pytest.approx(ref, rel=1e-12)
    assert gram_norm(up, 3) == pytest.approx(ref, rel=1e-12)
    # float32: the cancellation 2‖U‖² − Σ‖diag‖² stays at float32 rounding
    assert gram_norm(up.float(), 3, zero_below=True) == pytest.approx(ref, rel=1e-6)
    other = MomentAccumulator(11, "cpu", dtype=D, chunk=3)
    other.add(x, w, xw=x * w[:, None])
    assert torch.equal(other.raw_upper(), up) and torch.equal(other.first, acc.first)
    assert other.weight_sum == acc.weight_sum
    dst = torch.full((11, 11), 7.0, dtype=D)
    add_upper_(dst, up, 0.5, chunk=3)
    r, c = torch.meshgrid(torch.arange(11), torch.arange(11), indexing="ij")
    below = c < 3 * (r // 3)  # left of the panel's diagonal block: never written
    assert torch.all(dst[below] == 7.0)
    torch.testing.assert_close(dst[~below], 7.0 + 0.5 * full[~below])
    small = torch.zeros(4, 4, dtype=D)  # not wide enough for panels: a plain add
    add_upper_(small, full[:4, :4], 2.0, chunk=3)
    torch.testing.assert_close(small, 2.0 * full[:4, :4])


def _plain_featcal(backbone, merged, base, experts, calib, lam, rho, alpha, eps):
    """FeatCal on the tiny stack written out per module with the plain formulas (no shared
    statistics, no cross-term routes, no joined passes, float64), for the driver to match."""
    from featcal.calibration.feature_calibration import anchor

    model = copy.deepcopy(merged).double()
    base64 = copy.deepcopy(base).double()
    experts64 = [copy.deepcopy(e).double() for e in experts]
    hs = [torch.cat(c).double() for c in calib]
    he = [h.clone() for h in hs]
    for l, blk in enumerate(model.layers):
        b0 = base64.layers[l]
        eb = [e.layers[l] for e in experts64]
        xs_fc, xe_fc = [h.reshape(-1, 8) for h in hs], [h.reshape(-1, 8) for h in he]
        xs_nm = [blk.fc(h).reshape(-1, 8) for h in hs]  # the not-yet-updated merged block
        # Linear: per-task C_ss, C_st W_tᵀ, then the closed forms
        c_ss, cross, mu_s, targets = [], [], [], []
        for xs, xe, e in zip(xs_fc, xe_fc, eb):
            xt = alpha * xe + (1 - alpha) * xs
            c_ss.append(xs.T @ xs / len(xs))
            cross.append(xs.T @ (xt @ e.fc.weight.T) / len(xs))
            mu_s.append(xs.mean(0))
            targets.append(e.fc.bias + e.fc.weight @ xt.mean(0))
        w = solve_linear_weight(c_ss, cross, anchor(blk.fc.weight, b0.fc.weight, rho), lam, eps, dtype=D)
        b = solve_linear_bias(w, [task_scale(c) for c in c_ss], mu_s, targets, anchor(blk.fc.bias, b0.fc.bias, rho), lam)
        # LayerNorm: moments of the affine-free normalised student input
        z = [torch.nn.functional.layer_norm(x, (8,), eps=blk.norm.eps) for x in xs_nm]
        gamma, beta = solve_layernorm(
            torch.stack([(v * v).mean(0) for v in z]), torch.stack([v.mean(0) for v in z]),
            torch.stack([e.norm.weight for e in eb]), torch.stack([e.norm.bias for e in eb]),
            anchor(blk.norm.weight, b0.norm.weight, rho), anchor(blk.norm.bias, b0.norm.bias, rho), lam, eps,
        )
        with torch.no_grad():
            blk.fc.weight.copy_(w)
            blk.fc.bias.copy_(b)
            blk.norm.weight.copy_(gamma)
            blk.norm.bias.copy_(beta)
            hs = [blk(h) for h in hs]
            he = [e(h) for e, h in zip(eb, he)]
    return model


@pytest.mark.parametrize(
    "route,pass_tokens,chunk",
    [("gram", 0, None), ("direct", 0, None), ("gram", 4096, 2), ("direct", 4096, 2), ("auto", 50, 3)],
)
def test_driver_matches_plain_per_module_formulas(route, pass_tokens, chunk, monkeypatch):
    """The driver's fast paths (shared statistics, cross-term routes, joined passes,
    upper-triangle Gram products, accumulators reused across tasks) give the plain result."""
    import featcal.calibration.feature_calibration.stats as fc

    if chunk:
        monkeypatch.setattr(fc, "GRAM_CHUNK", chunk)  # 8-wide inputs in panels: the wide-input path
    backbone, base, experts = _tiny_stack(torch.float32)
    g = torch.Generator().manual_seed(7)
    calib = [[torch.randn(4, 6, 8, generator=g) + t for _ in range(3)] for t in range(2)]
    merged = copy.deepcopy(base)
    with torch.no_grad():
        for pm, p0, *pe in zip(merged.parameters(), base.parameters(), *[e.parameters() for e in experts]):
            pm.copy_(p0 + 0.3 * sum(p - p0 for p in pe))
    lam, rho, alpha, eps = 0.05, 2.2, 0.25, 1e-8
    with torch.no_grad():
        ref = _plain_featcal(backbone, merged, base, experts, calib, lam, rho, alpha, eps)
    out = FeatCal(
        lambda_ratio=lam, rho=rho, alpha=alpha, eps=eps, cross_route=route, pass_tokens=pass_tokens,
        drift_examples=None, inplace=False, progress=False,
    ).calibrate(backbone, merged, base, experts, calib)
    for (name, got), want in zip(out.model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(got.double(), want, rtol=2e-4, atol=2e-5, msg=name)
    # and it really moved the parameters away from the merge
    assert any(not torch.allclose(a, b) for a, b in zip(out.model.parameters(), merged.parameters()))
