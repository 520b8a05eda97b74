"""TF32 for FeatCal's fast paths: the rounding, the CPU emulation, and its use by the driver."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from featcal.calibration.feature_calibration import FeatCal
from featcal.calibration.feature_calibration.tf32 import EMULATE_ENV, EmulatedTF32, round_to_tf32, tf32_context


def _nearest_tf32_brute(v: float) -> float:
    """Nearest value with a 10-bit mantissa, ties to even, by enumerating the two neighbours."""
    if v == 0 or not math.isfinite(v):
        return v
    m, e = math.frexp(abs(v))  # |v| = m · 2^e, m in [0.5, 1)
    ulp = 2.0 ** (e - 11)  # 11 significant bits (1 implicit + 10 stored)
    lo = math.floor(abs(v) / ulp) * ulp
    hi = lo + ulp
    if abs(v) - lo < hi - abs(v):
        r = lo
    elif abs(v) - lo > hi - abs(v):
        r = hi
    else:  # tie: the neighbour whose last kept bit is 0
        r = lo if round(lo / ulp) % 2 == 0 else hi
    return math.copysign(r, v)


def test_round_to_tf32_matches_a_brute_force_rounding():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([
        torch.randn(3000, generator=g) * 10 ** torch.randint(-6, 6, (3000,), generator=g).float(),
        # exact ties and the values beside them, around 1 and 2
        torch.tensor([1 + 2**-11, 1 + 3 * 2**-11, 1 + 5 * 2**-11, 2 - 2**-12, 2 - 2**-13, -(1 + 3 * 2**-11)]),
    ])
    got = round_to_tf32(x)
    want = torch.tensor([_nearest_tf32_brute(float(v)) for v in x], dtype=torch.float64)
    assert torch.equal(got.double(), want)
    # ten mantissa bits at most: the 13 low bits are clear
    assert int((got.view(torch.int32) & 0x1FFF).abs().max()) == 0
    # specials pass through
    special = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan")])
    out = round_to_tf32(special)
    assert out[:4].tolist() == special[:4].tolist() and math.isnan(out[4])
    with pytest.raises(TypeError):
        round_to_tf32(torch.ones(2, dtype=torch.float64))


def test_emulated_products_use_rounded_operands_and_nothing_else_changes():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(8, 40, generator=g), torch.randn(40, 24, generator=g)
    bias = torch.randn(24, generator=g)
    ra, rb = round_to_tf32(a), round_to_tf32(b)
    want = ra @ rb
    qa, qb = torch.randn(2, 8, 40, generator=g), torch.randn(2, 40, 8, generator=g)
    img, ker = torch.randn(1, 3, 9, 9, generator=g), torch.randn(4, 3, 3, 3, generator=g)
    q, k, v = (torch.randn(1, 2, 5, 8, generator=g) for _ in range(3))
    with EmulatedTF32():
        got = {
            "matmul": torch.matmul(a, b), "@": a @ b, "mm": a.mm(b), "linear": F.linear(a, b.T),
            "addmm": torch.addmm(bias, a, b), "einsum": torch.einsum("ij,jk->ik", a, b),
            "bmm": torch.bmm(qa, qb), "conv": F.conv2d(img, ker),
            "sdpa": F.scaled_dot_product_attention(q, k, v), "sum": a.sum(), "f64": a.double() @ b.double(),
        }
    for key in ("matmul", "@", "mm", "linear", "einsum"):
        torch.testing.assert_close(got[key], want, rtol=0, atol=1e-5, msg=key)
    torch.testing.assert_close(got["addmm"], want + bias, rtol=0, atol=1e-5)  # bias not rounded
    # keyword operands: rounded by name, the added term and the bias stay float32
    big = torch.full((8, 24), 1 + 2**-12)  # TF32 would round it to 1: off by 2.4e-4
    with EmulatedTF32():
        kw_addmm = torch.addmm(input=big, mat1=a, mat2=b)
        kw_linear = F.linear(input=a, weight=b.T, bias=big[0])
    torch.testing.assert_close(kw_addmm, want + big, rtol=0, atol=1e-5)
    torch.testing.assert_close(kw_linear, want + big[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(got["bmm"], round_to_tf32(qa) @ round_to_tf32(qb), rtol=0, atol=1e-5)
    torch.testing.assert_close(got["conv"], F.conv2d(round_to_tf32(img), round_to_tf32(ker)), rtol=0, atol=1e-5)
    torch.testing.assert_close(
        got["sdpa"], F.scaled_dot_product_attention(*(round_to_tf32(t) for t in (q, k, v))), rtol=0, atol=1e-5
    )
    # the emulation does change the product (by about TF32's precision), reductions and
    # float64 products are left alone
    rel = float((got["matmul"] - a @ b).abs().max() / (a @ b).abs().max())
    assert 1e-5 < rel < 5e-3
    assert got["sum"] == a.sum()
    assert torch.equal(got["f64"], a.double() @ b.double())


def test_tf32_context_on_the_cpu_is_off_unless_emulation_is_asked_for(monkeypatch):
    a, b = torch.randn(16, 16), torch.randn(16, 16)
    monkeypatch.delenv(EMULATE_ENV, raising=False)
    with tf32_context("cpu"):
        plain = a @ b
    assert torch.equal(plain, a @ b)
    monkeypatch.setenv(EMULATE_ENV, "1")
    assert isinstance(tf32_context("cpu"), EmulatedTF32)
    with tf32_context(torch.device("cpu")):
        emulated = a @ b
    assert torch.equal(emulated, round_to_tf32(a) @ round_to_tf32(b))


@pytest.mark.usefixtures("one_thread")
def test_featcal_tf32_paths_on_the_cpu_emulation(clip_world, monkeypatch):
    """block_dtype=tf32 / gram_tf32 under the emulation: a small, non-zero parameter change
    against fp32; without the emulation the CPU result is exactly the fp32 one."""
    backbone, base, experts, merged_sd, calib, _ = clip_world

    def run(**kw):
        merged = backbone.with_state_dict(base, merged_sd)
        out = FeatCal(progress=False, **kw).calibrate(backbone, merged, base, experts, calib, "cpu")
        return {k: v.detach().clone() for k, v in out.model.state_dict().items()}

    def rel(p, ref):
        return max(float((p[k] - ref[k]).abs().max() / ref[k].abs().max().clamp_min(1e-12))
                   for k in ref if ref[k].is_floating_point())

    monkeypatch.delenv(EMULATE_ENV, raising=False)
    ref = run()
    assert rel(run(block_dtype="tf32", gram_tf32=True), ref) == 0.0
    monkeypatch.setenv(EMULATE_ENV, "1")
    passes = rel(run(block_dtype="tf32"), ref)
    both = rel(run(block_dtype="tf32", gram_tf32=True), ref)
    assert 0.0 < passes < 1e-2 and 0.0 < both < 1e-2, (passes, both)
