"""The merges against references written here from the published definitions
(METHOD.md, "Merge methods" and "Protocols behind the published baselines"):

* TIES with exact sign ties (the elected-sign sum exactly 0: majority sign 0, negative
  entries kept), in memory and streaming;
* the TIES trim sets of the published numbers on tiny state dicts of the real layouts:
  the whole open_clip image encoder with the text side's zero task vectors, FusionBench's
  ``state_dict(keep_vars=True)`` of a tiny T5 (shared embedding three times), MergeBench's
  ``lm_head`` in the trim but not written;
* RegMean's per-task mean Gram with unequal rows per task.

The references flatten everything into one [T, N] matrix and sort (no kthvalue, no
key-by-key passes), a different route from the implementations.
"""
from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn

from featcal.merge import ties
from featcal.merge.regmean import regmean
from featcal.merge.streaming import GlobalTies

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- the TIES reference


def ties_reference(base, experts, merged_keys, trim_entries, lam=0.3, density=0.2, majority_override=None):
    """TIES as METHOD.md states it.

    ``trim_entries``: the list of (key, times) whose task-vector entries make up each task's
    flattened vector, in order; ``None`` as a key stands for that many zero entries. Every
    task keeps its entries with |x| >= the k-th largest magnitude (k = int(density·N));
    elected sign = sign(Σ_t kept); a zero elected sign becomes the majority sign
    sign(Σ elected signs), itself 0 when that sum is 0; kept entries agreeing under
    ``where(sign > 0, v > 0, v < 0)`` are summed; θ₀ + λ·that, for ``merged_keys``."""
    rows = []
    for e in experts:
        parts = []
        for key, times in trim_entries:
            if key is None:
                parts.append(torch.zeros(times, dtype=torch.float64))
            else:
                tv = (e[key].double() - base[key].double()).reshape(-1)
                parts.extend([tv] * times)
        rows.append(torch.cat(parts))
    flat = torch.stack(rows)  # [T, N]
    n = flat.shape[1]
    k = int(n * density)
    kept = torch.zeros_like(flat)
    for t in range(flat.shape[0]):
        if k >= n:
            kept[t] = flat[t]
            continue
        desc = flat[t].abs().sort(descending=True).values
        kth_largest = desc[k]  # the (N-k)-th smallest: k + 1 entries reach it when distinct
        kept[t] = torch.where(flat[t].abs() >= kth_largest, flat[t], torch.zeros_like(flat[t]))
    sign = torch.sign(kept.sum(0))
    majority = torch.sign(sign.sum()) if majority_override is None else torch.tensor(float(majority_override))
    sign = torch.where(sign == 0, majority, sign)
    agree = torch.where(sign > 0, kept > 0, kept < 0)
    merged = (kept * agree).sum(0)
    out, at = {}, 0
    for key, times in trim_entries:
        size = times if key is None else base[key].numel() * times
        if key in merged_keys and key not in out:
            out[key] = (base[key].double() + lam * merged[at : at + base[key].numel()].view(base[key].shape)).to(base[key].dtype)
        at += size
    return out


def run_global_ties(m: GlobalTies, base, experts):
    """The streaming TIES's passes over the keys of ``base`` (what ``stream_merge`` does
    with tensors read from shards)."""
    keys = list(base)
    for p in range(m.passes):
        m.begin_pass(p, len(experts))
        for k in keys:
            m.observe(p, k, base[k], [e[k] for e in experts])
        m.end_pass(p)
    return {k: m.merge(k, base[k], [e[k] for e in experts]) for k in keys}


# ---------------------------------------------------------------- exact sign ties


def tie_world(seed=0):
    """Two experts over two tensors, integer-valued task vectors: on half of the entries
    the experts cancel exactly (elected sign 0), on the rest they agree, with as many
    positive as negative elected signs: Σ elected signs = 0 exactly."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"a": (4, 6), "b": (12,)}
    # multiples of 1/8: base + integer and its difference back are exact in float32
    base = {k: (8 * torch.randn(s, generator=g)).round() / 8 for k, s in shapes.items()}
    n = sum(torch.Size(s).numel() for s in shapes.values())
    mags = torch.randint(1, 9, (n,), generator=g).double()
    perm = torch.randperm(n, generator=g)
    cancel, agree = perm[: n // 2], perm[n // 2:]
    t1 = torch.zeros(n, dtype=torch.float64)
    t2 = torch.zeros(n, dtype=torch.float64)
    t1[cancel] = mags[cancel]
    t2[cancel] = -mags[cancel]
    signs = torch.tensor([1.0, -1.0]).repeat(len(agree) // 2 + 1)[: len(agree)].double()
    signs = signs[torch.randperm(len(agree), generator=g)]
    t1[agree] = signs * mags[agree]
    t2[agree] = signs * (mags[agree] + 1)  # unequal magnitudes, same sign
    experts = []
    for tv in (t1, t2):
        e, at = {}, 0
        for k, s in shapes.items():
            size = torch.Size(s).numel()
            e[k] = base[k] + tv[at: at + size].view(s).float()
            at += size
        experts.append(e)
    # task vectors as the merge sees them (float32 subtraction of the stored weights)
    return base, experts


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tie_world_really_has_a_zero_elected_sign_sum(seed):
    base, experts = tie_world(seed)
    tvs = [torch.cat([(e[k] - base[k]).reshape(-1) for k in base]) for e in experts]
    elected = torch.sign(tvs[0] + tvs[1])
    assert int((elected == 0).sum()) == 18 and float(elected.sum()) == 0.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exact_sign_ties_keep_the_negative_entries_in_memory_and_streaming(seed):
    base, experts = tie_world(seed)
    entries = [(k, 1) for k in base]
    want = ties_reference(base, experts, set(base), entries, lam=0.3, density=1.0)
    old = ties_reference(base, experts, set(base), entries, lam=0.3, density=1.0, majority_override=1.0)
    assert any(not torch.allclose(want[k], old[k]) for k in base)  # the case tells the two rules apart
    mem = ties(base, experts, scaling_factor=0.3, density=1.0)
    streamed = run_global_ties(GlobalTies(scaling_factor=0.3, density=1.0), base, experts)
    for k in base:
        # fp32 work vs the reference's fp64: one rounding of base + λ·τ (|θ| < 5, ulp 4.8e-7)
        assert torch.allclose(mem[k], want[k], rtol=0, atol=1e-6), k
        assert torch.equal(streamed[k], mem[k]), k
    # on a cancelling entry the kept value is the negative expert's: θ₀ + λ·τ₂
    tv2 = {k: experts[1][k] - base[k] for k in base}
    tv1 = {k: experts[0][k] - base[k] for k in base}
    cancel = {k: (tv1[k] + tv2[k]) == 0 for k in base}
    for k in base:
        neg = torch.where(tv1[k] < 0, tv1[k], tv2[k])
        assert torch.allclose(mem[k][cancel[k]], (base[k] + 0.3 * neg)[cancel[k]], atol=1e-6)


# ---------------------------------------------------------------- trim sets


def _perturbed(sd, scale, seed, skip=()):
    g = torch.Generator().manual_seed(seed)
    return {
        k: (v if (not torch.is_floating_point(v) or any(s in k for s in skip)) else v + scale * torch.randn(v.shape, generator=g))
        for k, v in sd.items()
    }


def test_trim_over_the_whole_openclip_image_encoder_with_text_zeros():
    """The original CLIP TIES code flattens the open_clip ImageEncoder (the text transformer
    deleted, the text side's embeddings, ln_final, text_projection and logit_scale still in,
    their task vectors zero). ``trim_extra_zeros`` = their entry count gives the same vision
    tower, in memory and streaming; the vision tower keeps more than 20 %."""
    g = torch.Generator().manual_seed(3)
    width, vocab, ctx, embed = 8, 50, 7, 6
    vision = {
        "visual.class_embedding": torch.randn(width, generator=g),
        "visual.positional_embedding": torch.randn(5, width, generator=g),
        "visual.conv1.weight": torch.randn(width, 3, 2, 2, generator=g),
        "visual.ln_pre.weight": torch.ones(width), "visual.ln_pre.bias": torch.zeros(width),
        "visual.transformer.resblocks.0.attn.in_proj_weight": torch.randn(3 * width, width, generator=g),
        "visual.transformer.resblocks.0.mlp.c_fc.weight": torch.randn(2 * width, width, generator=g),
        "visual.ln_post.weight": torch.ones(width), "visual.proj": torch.randn(width, embed, generator=g),
    }
    text = {
        "token_embedding.weight": torch.randn(vocab, width, generator=g),
        "positional_embedding": torch.randn(ctx, width, generator=g),
        "ln_final.weight": torch.ones(width), "ln_final.bias": torch.zeros(width),
        "text_projection": torch.randn(width, embed, generator=g),
        "logit_scale": torch.tensor(4.6052),
    }
    whole = {**vision, **text}
    experts = [_perturbed(whole, 0.1, 10 + t, skip=tuple(text)) for t in range(3)]
    z = sum(v.numel() for v in text.values())
    want = ties_reference(whole, experts, set(vision), [(k, 1) for k in whole])
    fn = functools.partial(ties, scaling_factor=0.3, density=0.2, trim_extra_zeros=z)
    vis_experts = [{k: e[k] for k in vision} for e in experts]
    mem = fn(vision, vis_experts)
    streamed = run_global_ties(GlobalTies(0.3, 0.2, trim_extra_zeros=z), vision, vis_experts)
    plain = ties(vision, vis_experts, scaling_factor=0.3, density=0.2)
    for k in vision:
        assert torch.allclose(mem[k], want[k], rtol=0, atol=1e-6), k
        assert torch.equal(streamed[k], mem[k]), k
    n_vis = sum(v.numel() for v in vision.values())
    assert any(not torch.equal(plain[k], mem[k]) for k in vision)
    # each task keeps int(0.2·(N + Z)) + 1 vision entries (distinct magnitudes), not int(0.2·N) + 1
    from featcal.merge.ties import global_trim_threshold

    for e in vis_experts:
        thr = global_trim_threshold(vision, e, list(vision), 0.2, extra_zeros=z)
        kept = sum(int(((e[k] - vision[k]).abs() >= thr).sum()) for k in vision)
        assert kept == int(0.2 * (n_vis + z)) + 1 and kept > int(0.2 * n_vis) + 1


@pytest.fixture(scope="module")
def tiny_t5():
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    cfg = T5Config(vocab_size=40, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_decoder_layers=1, num_heads=2,
                   feed_forward_proj="gated-gelu", tie_word_embeddings=False, decoder_start_token_id=0)
    base = T5ForConditionalGeneration(cfg).eval()
    # FLAN-T5's layout: an own lm_head (transformers 5.x ties it at construction here)
    base.lm_head.weight = nn.Parameter(base.shared.weight.detach().clone())
    experts = []
    for t in range(3):
        e = copy.deepcopy(base)
        g = torch.Generator().manual_seed(20 + t)
        with torch.no_grad():
            for p in e.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        experts.append(e)
    return base, experts


def test_trim_like_fusionbench_keep_vars_counts_the_t5_shared_embedding_three_times(tiny_t5):
    """FusionBench flattens ``state_dict(keep_vars=True)``: ``shared``,
    ``encoder.embed_tokens`` and ``decoder.embed_tokens`` are three names for one tensor.
    The T5 adapter merges distinct tensors; ``trim_count={shared.weight: 3}`` reproduces the
    keep_vars trim (and its majority sign)."""
    from featcal.backbone.t5 import T5Backbone

    base, experts = tiny_t5
    sd_b = base.state_dict(keep_vars=True)
    sd_e = [e.state_dict(keep_vars=True) for e in experts]
    # the real layout: three names of one tensor, lm_head its own
    assert sd_b["encoder.embed_tokens.weight"] is sd_b["shared.weight"] is sd_b["decoder.embed_tokens.weight"]
    assert sd_b["lm_head.weight"] is not sd_b["shared.weight"]
    keys = [k for k, v in sd_b.items() if torch.is_floating_point(v)]
    want = ties_reference({k: v.detach() for k, v in sd_b.items()}, [{k: v.detach() for k, v in s.items()} for s in sd_e],
                          set(keys), [(k, 1) for k in keys])
    bb = T5Backbone(["a", "b", "c"], base="unused", experts=["unused"] * 3)
    merged = bb.merge(functools.partial(ties, scaling_factor=0.3, density=0.2, trim_count={"shared.weight": 3}), base, experts)
    plain = bb.merge(functools.partial(ties, scaling_factor=0.3, density=0.2), base, experts)
    got, got_plain = merged.state_dict(), plain.state_dict()
    differs = False
    for k in keys:
        assert torch.allclose(got[k], want[k], rtol=0, atol=1e-6), k
        differs |= not torch.allclose(got_plain[k], want[k], rtol=0, atol=1e-6)
    assert differs  # counting the copies once is a different trim


def test_trim_like_mergebench_counts_lm_head_but_never_writes_it():
    """MergeBench: an untied ``lm_head`` enters the trim (and the majority sign) but keeps
    its base value; the token embeddings stay out of both."""
    g = torch.Generator().manual_seed(5)
    base = {
        "model.embed_tokens.weight": torch.randn(30, 8, generator=g),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(8, 8, generator=g),
        "model.layers.0.mlp.up_proj.weight": torch.randn(16, 8, generator=g),
        "model.layers.0.input_layernorm.weight": torch.ones(8),
        "model.norm.weight": torch.ones(8),
        "lm_head.weight": torch.randn(30, 8, generator=g),
    }
    experts = [_perturbed(base, 0.1, 30 + t) for t in range(3)]
    for e in experts:  # lm_head moved more than the rest: it takes much of the 20 %
        e["lm_head.weight"] = base["lm_head.weight"] + 3 * (e["lm_head.weight"] - base["lm_head.weight"])
    exclude = lambda k: "embed_tokens" in k or k.startswith("lm_head")  # noqa: E731 (the Llama adapter's rule)
    trim = [k for k in base if "embed_tokens" not in k]
    merged_keys = {k for k in trim if not k.startswith("lm_head")}
    want = ties_reference(base, experts, merged_keys, [(k, 1) for k in trim], lam=0.4, density=0.3)
    got = ties(base, experts, scaling_factor=0.4, density=0.3, exclude=exclude, trim_also=["lm_head.weight"])
    plain = ties(base, experts, scaling_factor=0.4, density=0.3, exclude=exclude)
    for k in merged_keys:
        assert torch.allclose(got[k], want[k], rtol=0, atol=1e-6), k
    assert torch.equal(got["lm_head.weight"], base["lm_head.weight"])
    assert torch.equal(got["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    assert any(not torch.equal(got[k], plain[k]) for k in merged_keys)
    with pytest.raises(ValueError, match="trim_also"):  # the streaming passes see merged keys only
        GlobalTies(trim_also=["lm_head.weight"])


def test_trim_options_are_validated():
    from featcal.merge.registry import TIES

    bad = TIES.validate_config({"trim_extra_zeros": -1, "trim_count": {"shared.weight": 0}, "trim_also": "lm_head"})
    assert len(bad) == 3 and all(any(k in p for k in ("trim_extra_zeros", "trim_count", "trim_also")) for p in bad)
    assert TIES.validate_config({"trim_extra_zeros": 25599489, "trim_count": {"shared.weight": 3}, "trim_also": ["lm_head.weight"]}) == []
    with pytest.raises(ValueError, match="nope"):
        ties({"w": torch.zeros(3)}, [{"w": torch.ones(3)}], trim_count={"nope": 3})


# ---------------------------------------------------------------- RegMean


@pytest.fixture(scope="module")
def clip_world():
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from featcal.backbone.clip import CLIPVisionBackbone

    torch.manual_seed(0)
    cfg = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=8, patch_size=4, projection_dim=8, hidden_act="quick_gelu")
    base = CLIPVisionModelWithProjection(cfg).eval()
    experts = []
    for t in range(3):
        e = copy.deepcopy(base)
        with torch.no_grad():
            for p in e.parameters():
                p.add_(0.05 * torch.randn_like(p))
        experts.append(e.eval())
    bb = CLIPVisionBackbone(["t0", "t1", "t2"], base="unused", experts=["unused"] * 3)
    # unequal rows per task: 1, 3 and 2 batches of different sizes
    calib = [[torch.randn(3, 3, 8, 8)], [torch.randn(8, 3, 8, 8) + 0.7 for _ in range(3)], [torch.randn(5, 3, 8, 8) - 0.4] * 2]
    return base, experts, bb, calib


def _linear_inputs(model, batches):
    xs: dict[str, list[torch.Tensor]] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: xs.setdefault(n, []).append(a[0].reshape(-1, a[0].shape[-1]).double()))
             for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for b in batches:
            model(pixel_values=b)
    for h in hooks:
        h.remove()
    return {k: torch.cat(v) for k, v in xs.items()}


@pytest.mark.parametrize("gram", ["mean", "sum"])
def test_regmean_uses_the_per_task_mean_gram(clip_world, gram):
    """W = (Σ_t G_t)⁻¹ Σ_t G_t W_t, G_t = X_tᵀX_t / N_t with off-diagonals × 0.95
    (``gram: sum`` drops the 1/N_t); the tasks have 3, 24 and 10 images."""
    base, experts, bb, calib = clip_world
    out = regmean(base.state_dict(), [e.state_dict() for e in experts], backbone=bb, base_model=base,
                  expert_models=experts, calib=calib, device="cpu", solve_dtype="float64", gram=gram)
    xs = [_linear_inputs(e, c) for e, c in zip(experts, calib)]
    rows = {len(x["vision_model.encoder.layers.0.mlp.fc1"]) for x in xs}
    assert len(rows) == 3  # unequal rows per task
    max_err = 0.0
    for name in xs[0]:
        lhs = rhs = 0
        for t, e in enumerate(experts):
            x = xs[t][name]
            g = x.T @ x / (len(x) if gram == "mean" else 1)
            g = 0.95 * g + 0.05 * torch.diag(torch.diagonal(g))
            lhs = lhs + g
            rhs = rhs + g @ e.state_dict()[name + ".weight"].double().T
        want = torch.linalg.solve(lhs, rhs).T
        got = out[name + ".weight"].double()
        max_err = max(max_err, float((got - want).abs().max() / want.abs().max()))
    assert max_err < 1e-5, max_err  # fp32 weights out of an fp64 solve


def test_regmean_mean_and_sum_grams_differ_with_unequal_rows(clip_world):
    base, experts, bb, calib = clip_world
    kw = dict(backbone=bb, base_model=base, expert_models=experts, calib=calib, device="cpu", solve_dtype="float64")
    a = regmean(base.state_dict(), [e.state_dict() for e in experts], gram="mean", **kw)
    b = regmean(base.state_dict(), [e.state_dict() for e in experts], gram="sum", **kw)
    k = "vision_model.encoder.layers.0.mlp.fc1.weight"
    assert (a[k] - b[k]).abs().max() > 1e-3
    from featcal.merge.registry import REGMEAN

    assert REGMEAN.validate_config({"gram": "tokens"}) and not REGMEAN.validate_config({"gram": "mean"})


# ---------------------------------------------------------------- AdaMerging schedule and clamp


class _Identity:
    """represent(model, x) = model(x)."""

    def represent(self, model, inputs):
        return model(inputs)


def _ada_world(seed=0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    base = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).eval()
    experts = []
    for t in range(2):
        e = copy.deepcopy(base)
        with torch.no_grad():
            for p in e.parameters():
                p.add_(0.8 * torch.randn(p.shape, generator=g))
        experts.append(e)
    heads = [nn.Linear(3, 4) for _ in range(2)]
    with torch.no_grad():
        for h in heads:
            h.weight.copy_(2 * torch.randn(4, 3, generator=g))
            h.bias.zero_()
    calib = [[torch.randn(6, 4, generator=g) + t for _ in range(2)] for t in range(2)]  # 2 batches per task
    return base, experts, heads, calib


def _ada_reference(base, experts, heads, calib, steps, bpt, clamp, lr, seed, init=0.3, betas=(0.9, 0.999), eps=1e-8):
    """Layer-wise AdaMerging from its definition: θ_l = θ₀_l + Σ_t c_{t,l} τ_{t,l},
    c = clamp(λ, 0, 1) (or λ), loss = Σ_t Σ_{bpt batches} mean entropy of softmax(head_t(f_θ(x))),
    Adam by hand on λ; batches of each task visited in seeded shuffled passes."""
    keys = [k for k, _ in base.named_parameters()]
    b0 = {k: v.detach().double() for k, v in base.named_parameters()}
    tau = {k: torch.stack([dict(e.named_parameters())[k].detach().double() - b0[k] for e in experts]) for k in keys}
    lam = torch.full((len(experts), len(keys)), float(init), dtype=torch.float64, requires_grad=True)
    m = torch.zeros_like(lam)
    v = torch.zeros_like(lam)
    gen = torch.Generator().manual_seed(seed)
    order = [torch.randperm(len(b), generator=gen).tolist() for b in calib]
    cursor = [0] * len(calib)
    for step in range(1, steps + 1):
        coef = lam.clamp(0.0, 1.0) if clamp else lam
        theta = {k: b0[k] + (coef[:, i].view(-1, *([1] * b0[k].dim())) * tau[k]).sum(0) for i, k in enumerate(keys)}
        loss = 0
        for t in range(len(calib)):
            for _ in range(bpt):
                if cursor[t] >= len(order[t]):
                    order[t] = torch.randperm(len(calib[t]), generator=gen).tolist()
                    cursor[t] = 0
                x = calib[t][order[t][cursor[t]]].double()
                cursor[t] += 1
                h = torch.tanh(x @ theta["0.weight"].T + theta["0.bias"])
                z = h @ theta["2.weight"].T + theta["2.bias"]
                logits = z @ heads[t].weight.detach().double().T + heads[t].bias.detach().double()
                logp = torch.log_softmax(logits, -1)
                loss = loss + (-(logp.exp() * logp).sum(-1)).mean()
        (g,) = torch.autograd.grad(loss, [lam])
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        with torch.no_grad():
            lam -= lr * (m / (1 - betas[0] ** step)) / ((v / (1 - betas[1] ** step)).sqrt() + eps)
    coef = (lam.clamp(0.0, 1.0) if clamp else lam).detach()
    return coef, {k: b0[k] + (coef[:, i].view(-1, *([1] * b0[k].dim())) * tau[k]).sum(0) for i, k in enumerate(keys)}


@pytest.mark.parametrize("clamp,bpt", [(True, 2), (False, 1), (True, 1)])
def test_adamerging_schedule_and_clamp_equal_the_definition(clamp, bpt):
    from featcal.merge.adamerging import adamerging

    base, experts, heads, calib = _ada_world()
    hist = []
    out = adamerging(base.state_dict(), [e.state_dict() for e in experts], backbone=_Identity(), base_model=base,
                     calib=calib, heads=heads, device="cpu", init=0.3, lr=0.08, steps=12, clamp=clamp,
                     batches_per_task=bpt, seed=3, history=hist)
    coef, theta = _ada_reference(base, experts, heads, calib, steps=12, bpt=bpt, clamp=clamp, lr=0.08, seed=3)
    got = torch.tensor(hist[-1]["lambdas"], dtype=torch.float64)
    assert float((got - coef).abs().max()) < 2e-5  # fp32 vs fp64 over 12 Adam steps
    for k, want in theta.items():
        assert float((out[k].double() - want).abs().max()) < 1e-4, k
    if clamp:  # the case reaches the bounds (else the clamp is not exercised)
        assert float(coef.min()) == 0.0 or float(coef.max()) == 1.0
    else:
        assert float(coef.min()) < 0.0 or float(coef.max()) > 1.0


def test_adamerging_batches_per_task_and_clamp_change_the_result():
    from featcal.merge.adamerging import adamerging

    base, experts, heads, calib = _ada_world()
    kw = dict(backbone=_Identity(), base_model=base, calib=calib, heads=heads, device="cpu", lr=0.08, steps=12, seed=3)
    runs = {}
    for clamp, bpt in ((True, 1), (True, 2), (False, 1)):
        hist = []
        adamerging(base.state_dict(), [e.state_dict() for e in experts], clamp=clamp, batches_per_task=bpt, history=hist, **kw)
        runs[clamp, bpt] = torch.tensor(hist[-1]["lambdas"])
    assert not torch.allclose(runs[True, 1], runs[True, 2]) and not torch.allclose(runs[True, 1], runs[False, 1])
    from featcal.merge.registry import ADAMERGING as fn

    assert fn.validate_config({"batches_per_task": 0}) and not fn.validate_config({"batches_per_task": 2})
