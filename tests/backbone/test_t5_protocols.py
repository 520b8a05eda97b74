"""FLAN-T5 protocol checks against references written here:

* FeatCal on a tiny random T5, measured on HELD-OUT batches with the models' own forward:
  the per-block drift to the experts falls in every block, and every calibratable block
  parameter (Linear weights and RMSNorm scales) moves;
* FusionBench's GLUE scoring: STS-B gold scores parsed from their "{:.1f}" text and
  answers of ``generate(max_length=10)`` (at most 9 new tokens), Spearman from scipy.
"""
from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

from featcal.backbone.seq2seq import greedy_generate
from featcal.backbone.t5 import T5Backbone

pytestmark = pytest.mark.usefixtures("one_thread")

TASKS = ["a", "b", "c"]


@pytest.fixture(scope="module")
def random_t5(one_thread):
    """A tiny random gated-GELU T5 (2 + 2 blocks, own lm_head as FLAN-T5) and three experts:
    the base with per-parameter noise (block norms included)."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    cfg = T5Config(vocab_size=48, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_decoder_layers=2, num_heads=4,
                   feed_forward_proj="gated-gelu", tie_word_embeddings=False, decoder_start_token_id=0,
                   pad_token_id=0, eos_token_id=1, dropout_rate=0.0)
    base = T5ForConditionalGeneration(cfg).eval()
    base.lm_head.weight = nn.Parameter(base.shared.weight.detach().clone())
    g = torch.Generator().manual_seed(1)
    experts = []
    for _ in TASKS:
        e = copy.deepcopy(base)
        with torch.no_grad():
            for name, p in e.named_parameters():
                scale = 0.15 if "layer_norm" in name else 0.1
                p.add_(scale * p.detach().abs().mean() * torch.randn(p.shape, generator=g))
        experts.append(e.eval())
    return T5Backbone(TASKS, base="unused", experts=["unused"] * len(TASKS)), base, experts


def _batches(n_batches, seed, task):
    """Random prompts per task (task-dependent token range), right-padded."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(2 + 10 * task, 12 + 10 * task, (6, 9), generator=g)
        lengths = torch.randint(4, 10, (6,), generator=g)
        mask = (torch.arange(9)[None] < lengths[:, None]).long()
        ids = torch.where(mask.bool(), ids, torch.zeros_like(ids))
        ids[torch.arange(6), lengths - 1] = 1  # eos
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def _block_outputs(model, batch):
    """Hidden states after every encoder and decoder block, from the model's own forward."""
    outs = []
    hooks = [blk.register_forward_hook(lambda m, a, o: outs.append(o[0] if isinstance(o, tuple) else o))
             for blk in list(model.encoder.block) + list(model.decoder.block)]
    with torch.no_grad():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
              decoder_input_ids=batch["decoder_input_ids"], decoder_attention_mask=batch["decoder_attention_mask"])
    for h in hooks:
        h.remove()
    return outs


def _drift(model, expert, batches, n_enc):
    """Per block: mean over valid tokens of ‖h_model − h_expert‖ / ‖h_expert‖."""
    num, den = None, None
    for batch in batches:
        a, b = _block_outputs(model, batch), _block_outputs(expert, batch)
        rows = []
        for i, (x, y) in enumerate(zip(a, b)):
            m = (batch["attention_mask"] if i < n_enc else batch["decoder_attention_mask"]).float()
            rel = (x - y).norm(dim=-1) / y.norm(dim=-1)
            rows.append(((rel * m).sum(), m.sum()))
        n = torch.stack([r[0] for r in rows])
        d = torch.stack([r[1] for r in rows])
        num = n if num is None else num + n
        den = d if den is None else den + d
    return num / den


def test_featcal_t5_lowers_held_out_drift_in_every_block_and_moves_every_block_parameter(random_t5):
    from featcal.calibration.feature_calibration import FeatCal
    from featcal.merge import task_arithmetic

    bb, base, experts = random_t5
    merged = bb.merge(task_arithmetic, base, experts)
    before = copy.deepcopy(merged)
    calib = bb.prepare_calibration(merged, base, experts, [_batches(3, 10 + t, t) for t in range(len(TASKS))], "cpu")
    held = bb.prepare_calibration(merged, base, experts, [_batches(2, 100 + t, t) for t in range(len(TASKS))], "cpu")
    out = FeatCal(progress=False, drift_examples=0).calibrate(bb, merged, base, experts, calib, "cpu")
    cal = out.model_for_task(0)
    n_enc = len(cal.encoder.block)
    d_before = torch.stack([_drift(before, e, held[t], n_enc) for t, e in enumerate(experts)]).mean(0)
    d_after = torch.stack([_drift(cal, e, held[t], n_enc) for t, e in enumerate(experts)]).mean(0)
    assert len(d_before) == 4 and float(d_before.min()) > 0.01  # the merge really drifts
    print("held-out drift per block before/after", d_before.tolist(), d_after.tolist())
    assert (d_after < d_before).all(), (d_before.tolist(), d_after.tolist())
    # every calibratable block parameter moved: Linear weights and RMSNorm scales; the
    # relative-position bias (an Embedding, not a Linear or norm) keeps its merged value
    after_sd, before_sd = cal.state_dict(), before.state_dict()
    block_keys = [k for k in before_sd if k.startswith(("encoder.block.", "decoder.block."))]
    calibratable = [k for k in block_keys if "relative_attention_bias" not in k]
    norms = [k for k in calibratable if "layer_norm" in k]
    assert len(calibratable) == 2 * 9 + 2 * 14 == 46 and len(norms) == 2 * 2 + 2 * 3
    unmoved = [k for k in calibratable if torch.equal(after_sd[k], before_sd[k])]
    assert not unmoved
    for k in block_keys:
        if "relative_attention_bias" in k:
            assert torch.equal(after_sd[k], before_sd[k]), k


# ---------------------------------------------------------------- FusionBench GLUE scoring


def test_greedy_answers_of_9_new_tokens_equal_generate_max_length_10(random_t5):
    """FusionBench generates with ``max_length=10``: the decoder start token counts, so at
    most 9 new tokens; ``max_new_tokens: 9`` gives the same answers."""
    _, base, experts = random_t5
    batch = _batches(1, 7, 0)[0]
    for model in (base, experts[1]):
        ours = greedy_generate(model, batch["input_ids"], batch["attention_mask"], max_new_tokens=9)
        with torch.no_grad():
            ref = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], max_length=10,
                                 do_sample=False, num_beams=1, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
        ref = ref[:, 1:]
        assert ours.shape[1] <= 9 and ref.shape[1] <= 9
        width = max(ours.shape[1], ref.shape[1])
        pad = lambda x: torch.nn.functional.pad(x, (0, width - x.shape[1]))  # noqa: E731
        assert torch.equal(pad(ours), pad(ref))


@pytest.fixture(scope="module")
def glue_world(one_thread):
    import datasets

    from tests.fixtures.t5 import world

    datasets.disable_progress_bars()
    return world()


def test_stsb_gold_parsed_from_its_text_like_fusionbench(glue_world, tmp_path):
    import datasets
    from scipy.stats import spearmanr

    from featcal.tasks.glue import GLUETaskPool, glue_templates
    from featcal.tasks.text2text import parse_float

    w = glue_world
    bb = T5Backbone(["stsb"], w["base"], {"stsb": w["experts"]["stsb"]})
    expert = bb.load_experts()[0]
    kw = dict(datasets=w["data"], cache_dir=str(tmp_path / "cache"), progress=False)  # one cache for both pools
    raw = GLUETaskPool(["stsb"], w["tokenizer"], **kw)
    text = GLUETaskPool(["stsb"], w["tokenizer"], stsb_gold="text", max_new_tokens=9, **kw)
    info = glue_templates()["stsb"]
    rows = datasets.load_from_disk(os.path.join(w["data"], "stsb"))[info["test_split"]]
    labels = [float(r["label"]) for r in rows]
    rounded = [float("%.1f" % x) for x in labels]  # the "{:.1f}" text read back
    assert raw.split("stsb", "test").golds == labels
    assert text.split("stsb", "test").golds == rounded != labels  # not the raw golds from the shared cache
    tok = text.tokenizer
    answers = []
    for r in rows:  # one example at a time, FusionBench's generate(max_length=10)
        enc = tok(info["template"].format(**{f: r[f] for f in info["fields"]}), return_tensors="pt")
        with torch.no_grad():
            gen = expert.generate(**enc, max_length=10, do_sample=False, num_beams=1)
        answers.append(parse_float(tok.decode(gen[0, 1:], skip_special_tokens=True).strip()))
    want = 100 * spearmanr(answers, rounded).correlation
    got = text.evaluate(lambda i: expert, "cpu", 4)["stsb"]["spearman"]
    assert got == pytest.approx(want, abs=1e-9)
    assert raw.evaluate(lambda i: expert, "cpu", 4)["stsb"]["spearman"] == pytest.approx(
        100 * spearmanr(answers, labels).correlation, abs=1e-9)
    assert GLUETaskPool.validate_config({"tasks": ["stsb"], "stsb_gold": "rounded"})


def test_regmean_on_t5_uses_each_tasks_mean_gram_padding_included(random_t5):
    """RegMean through the T5 adapter (decoder targets attached by the adapter): every
    Linear's G_t = X_tᵀX_t / N_t over all of task t's rows reaching it (padding included),
    with tasks of 1, 2 and 3 batches, against a closed form built from the experts' own
    plain forward."""
    import functools

    from featcal.merge.regmean import regmean

    bb, base, experts = random_t5
    calib = [_batches(1 + t, 50 + t, t) for t in range(len(TASKS))]
    out = bb.merge(functools.partial(regmean, solve_dtype="float64"), base, experts, backbone=bb, base_model=base,
                   expert_models=experts, calib=calib, device="cpu")
    prepared = bb.prepare_calibration(base, base, experts, calib, "cpu")
    xs = []
    for e, batches in zip(experts, prepared):
        got: dict[str, list[torch.Tensor]] = {}
        hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: got.setdefault(n, []).append(a[0].reshape(-1, a[0].shape[-1]).double()))
                 for n, m in e.named_modules() if isinstance(m, nn.Linear)]
        with torch.no_grad():
            for b in batches:
                e(**{k: b[k] for k in ("input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask")})
        for h in hooks:
            h.remove()
        xs.append({k: torch.cat(v) for k, v in got.items()})
    rows = {len(x["encoder.block.0.layer.0.SelfAttention.q"]) for x in xs}
    assert len(rows) == 3  # unequal token counts per task
    merged_sd = out.state_dict()
    checked = 0
    for name in xs[0]:
        lhs = rhs = 0
        for t, e in enumerate(experts):
            x = xs[t][name]
            g = x.T @ x / len(x)
            g = 0.95 * g + 0.05 * torch.diag(torch.diagonal(g))
            lhs = lhs + g
            rhs = rhs + g @ e.state_dict()[name + ".weight"].double().T
        want = torch.linalg.solve(lhs, rhs).T
        err = float((merged_sd[name + ".weight"].double() - want).abs().max() / want.abs().max())
        assert err < 1e-5, (name, err)
        checked += 1
    assert checked == 2 * 7 + 2 * 11 + 1  # every block Linear and lm_head
