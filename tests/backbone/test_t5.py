"""FLAN-T5 / GLUE: loaders, the T5 adapter's block forward, decoder targets, the GLUE pool's
generation and scoring, FeatCal and Surgery on a tiny T5 merge (no network).

The tiny world (tokenizer, GLUE-schema datasets, base and experts saved like transformers
4.x saved FLAN-T5) comes from ``tests/fixtures/t5.py`` (fixtures ``w`` and ``models``) and is
built once per process. The run end to end: ``tests/run/test_t5_e2e.py``; the presets and
the paper comparison: ``tests/run/test_t5_presets.py``; the GPU: ``tests/run/test_t5_gpu.py``."""
from __future__ import annotations

import copy
import json
import os

import numpy as np
import pandas as pd
import pytest
import torch

from featcal.backbone.seq2seq import IGNORE, decoder_inputs_from_labels, greedy_generate, labels_from_generated
from featcal.backbone.t5 import T5Backbone, T5EncoderExit, load_t5, load_t5_lora
from featcal.errors import SourceUnavailable
from featcal.tasks.glue import GLUETaskPool, glue_templates
from featcal.tasks.text2text import pad_batch, parse_float, score_answers, spearman

from tests.fixtures.t5 import EXPERT_TASKS, TASKS, lora_adapter
from tests.fixtures.t5 import glue_pool as _pool


# ---- templates and metrics --------------------------------------------------------------


def test_templates_are_fusionbench_strings_and_label_words():
    t = glue_templates()
    assert list(t) == TASKS
    assert t["cola"]["template"] == (
        "Indicate if the following sentence is grammatically correct or not: \"{sentence}\". "
        "Answere 'acceptable' or 'unacceptable'."
    )
    assert t["qnli"]["template"].endswith("Answer with 'yes' or 'no'.")  # the one without the typo
    assert t["mnli"]["test_split"] == "validation_matched" and t["rte"]["test_split"] == "validation"
    words = {k: v.get("label_words") for k, v in t.items()}
    assert words == {
        "cola": ["unacceptable", "acceptable"], "mnli": ["entailment", "neutral", "contradiction"],
        "mrpc": ["no", "yes"], "qnli": ["yes", "no"], "qqp": ["no", "yes"], "rte": ["yes", "no"],
        "sst2": ["negative", "positive"], "stsb": None,
    }
    assert t["stsb"]["metric"] == "spearman" and t["stsb"]["target_format"].format(3.14159) == "3.1"


def test_spearman_parse_and_scores_against_references():
    rng = np.random.default_rng(0)
    pred = rng.integers(0, 5, 40).astype(float)  # many ties
    gold = rng.normal(size=40)
    ref = pd.Series(pred).corr(pd.Series(gold), method="spearman")
    assert spearman(pred, gold) == pytest.approx(ref, abs=1e-12)
    assert spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]) == 0.0  # constant answers carry no order
    assert parse_float(" 3.4 ") == 3.4 and parse_float("yes") == 0.0 and parse_float("nan") == 0.0 and parse_float("") == 0.0
    answers, golds = ["1.0", "oops", "3.5", "2.0"], [1.2, 0.5, 4.0, 2.2]
    out = score_answers("spearman", answers, ["?"] * 4, golds)
    assert out == {"spearman": pytest.approx(100 * pd.Series([1.0, 0.0, 3.5, 2.0]).corr(pd.Series(golds), method="spearman"))}
    assert score_answers("accuracy", ["yes", " no", "maybe"], ["yes", "no", "no"], [None] * 3) == {"accuracy": pytest.approx(200 / 3)}


def test_labels_and_decoder_inputs_from_answers():
    eos = 1
    gen = torch.tensor([[5, 6, 1, 0, 0], [7, 1, 0, 0, 0], [8, 0, 9, 4, 3]])  # row 3: no eos (cut), a pad id inside
    labels = labels_from_generated(gen, eos)
    assert labels.tolist() == [[5, 6, 1, IGNORE, IGNORE], [7, 1, IGNORE, IGNORE, IGNORE], [8, 0, 9, 4, 3]]
    dec = decoder_inputs_from_labels(labels, start_token_id=0, pad_token_id=0)
    # positions after the mask hold whatever the shift brings (eos); they are masked out
    assert dec["decoder_input_ids"].tolist() == [[0, 5, 6, 1, 0], [0, 7, 1, 0, 0], [0, 8, 0, 9, 4]]
    assert dec["decoder_attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]


# ---- loading ------------------------------------------------------------------------------


def _offline(monkeypatch, tmp_path):
    import datasets
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)


def test_loads_4x_checkpoint_with_own_lm_head(w):
    from safetensors.torch import load_file

    model = load_t5(w["base"])
    sd = load_file(os.path.join(w["base"], "model.safetensors"))
    assert json.loads(open(os.path.join(w["base"], "config.json")).read())["tie_word_embeddings"] is False
    assert model.lm_head.weight is not model.shared.weight
    assert torch.equal(model.lm_head.weight, sd["lm_head.weight"]) and torch.equal(model.shared.weight, sd["shared.weight"])
    assert not torch.equal(model.lm_head.weight, model.shared.weight)
    assert model.encoder.embed_tokens.weight is model.shared.weight


def test_missing_models_and_datasets_fail_naming_them(w, monkeypatch, tmp_path):
    _offline(monkeypatch, tmp_path)
    with pytest.raises(SourceUnavailable, match="/no/such/t5"):
        load_t5("/no/such/t5")
    with pytest.raises(SourceUnavailable, match="featcal-test/no-such-t5") as err:
        load_t5("featcal-test/no-such-t5")
    assert "hf download featcal-test/no-such-t5" in str(err.value) and "HF_HUB_OFFLINE" in str(err.value)
    bb = T5Backbone(["cola"], w["base"], {"cola": "featcal-test/no-such-lora"}, lora=True)
    with pytest.raises(SourceUnavailable, match="featcal-test/no-such-lora"):
        bb.load_expert("cola")
    with pytest.raises(SourceUnavailable, match="featcal-test/no-such-glue") as err:  # at construction
        GLUETaskPool(["cola"], w["tokenizer"], datasets="featcal-test/no-such-glue", cache_dir=str(tmp_path / "c"), progress=False)
    assert "hf download --repo-type dataset featcal-test/no-such-glue" in str(err.value) and "HF_HUB_OFFLINE=1" in str(err.value)
    assert "config 'cola'" in str(err.value)
    pool = GLUETaskPool(["cola"], w["tokenizer"], datasets="/no/such/glue", cache_dir=str(tmp_path / "c"), progress=False,
                        check_sources=False)
    with pytest.raises(SourceUnavailable, match="/no/such/glue"):
        pool.calibration_set(4, 0, 4)


def test_lora_adapters_merge_into_dense_weights(w, tmp_path):
    adapters = {t: str(lora_adapter(w["base"], tmp_path / f"lora-{t}", seed=i)) for i, t in enumerate(["cola", "rte"])}
    assert os.path.exists(os.path.join(adapters["cola"], "adapter_config.json"))
    base = load_t5(w["base"])
    for lora in (True, "auto"):
        bb = T5Backbone(["cola", "rte"], w["base"], adapters, lora=lora)
        expert = bb.load_expert("cola")
        assert type(expert).__name__ == "T5ForConditionalGeneration"
        assert not any("lora" in k for k in expert.state_dict()), "LoRA factors are merged away"
    from safetensors.torch import load_file

    factors = load_file(os.path.join(adapters["cola"], "adapter_model.safetensors"))
    cfg = json.loads(open(os.path.join(adapters["cola"], "adapter_config.json")).read())
    scale = cfg["lora_alpha"] / cfg["r"]
    base_sd, exp_sd = base.state_dict(), expert.state_dict()
    touched = 0
    for key, a in factors.items():
        if ".lora_A." not in key:
            continue
        b = factors[key.replace("lora_A", "lora_B")]
        target = key.split("base_model.model.", 1)[1].replace(".lora_A.weight", ".weight")
        expected = base_sd[target] + scale * (b @ a)
        assert torch.allclose(exp_sd[target], expected, atol=1e-6), target
        touched += 1
    assert touched == 2 * 2 * 2 + 2 * 2  # q, v in 2 encoder self-attn, 2 decoder self-attn, 2 decoder cross-attn
    untouched = [k for k in base_sd if ".q." not in k and ".v." not in k]
    assert all(torch.equal(base_sd[k], exp_sd[k]) for k in untouched)


# ---- the adapter's forward -------------------------------------------------------------------


def _teacher_batch(w, models, tmp_path, task_index=0, n=6):
    bb, base, experts = models
    pool = _pool(w, tmp_path)
    calib = pool.calibration_set(n, seed=3, batch_size=n)
    return bb.prepare_calibration(base, base, experts, calib, "cpu")[task_index][0]


def test_block_by_block_forward_equals_model_forward(w, models, tmp_path):
    bb, base, experts = models
    model = experts[1]
    batch = _teacher_batch(w, models, tmp_path, task_index=1)
    # padded encoder inputs and ragged targets, so both masks matter
    assert (batch["attention_mask"] == 0).any()
    batch["decoder_attention_mask"][0, 1:] = 0
    blocks = bb.blocks(model)
    assert len(blocks) == 4 and isinstance(blocks[1], T5EncoderExit)
    assert blocks[1].block is model.encoder.block[1] and blocks[2] is model.decoder.block[0]
    assert "final_layer_norm" not in " ".join(bb.calibratable_modules(blocks[1]))
    names = list(bb.calibratable_modules(blocks[2]))
    assert {"layer.1.EncDecAttention.k", "layer.2.DenseReluDense.wi_0", "layer.2.DenseReluDense.wi_1"} <= set(names)

    state = bb.embed(model, batch)
    for i, blk in enumerate(blocks):
        state = bb.run_block(blk, state)
        if i == 1:
            enc = model.encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
            assert torch.allclose(state.extras["enc_out"], enc, atol=1e-5)
    captured = {}
    handle = model.lm_head.register_forward_pre_hook(lambda m, a: captured.setdefault("x", a[0]))
    out = model(**batch)
    handle.remove()
    mask = batch["decoder_attention_mask"].bool()
    ours = model.lm_head(bb.final_hidden(model, state))
    assert torch.allclose(ours[mask], out.logits[mask], atol=1e-5)
    rep = bb.represent(model, batch)
    assert rep.shape == (int(mask.sum()), model.config.d_model)
    assert torch.allclose(rep, captured["x"][mask], atol=1e-5)
    site, where = bb.representation_site(model)
    assert site is model.lm_head and where == "input"


def test_expert_targets_are_its_own_greedy_answers(w, models, tmp_path):
    bb, base, experts = models
    pool = _pool(w, tmp_path)
    calib = pool.calibration_set(8, seed=0, batch_size=4)
    assert all(set(b) == {"input_ids", "attention_mask"} for task in calib for b in task)  # unlabeled
    again = pool.calibration_set(8, seed=0, batch_size=4)
    other = pool.calibration_set(8, seed=1, batch_size=4)
    assert torch.equal(calib[0][0]["input_ids"], again[0][0]["input_ids"])
    assert not all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(calib[0], other[0]))
    prepared = bb.prepare_calibration(base, base, experts, calib, "cpu")
    for t, expert in enumerate(experts):
        for batch in prepared[t]:
            logits = expert(**batch).logits
            mask = batch["decoder_attention_mask"].bool()
            # teacher forcing on the expert's answer: its argmax reproduces the answer
            nxt = torch.cat([batch["decoder_input_ids"][:, 1:], torch.full_like(batch["decoder_input_ids"][:, :1], -1)], 1)
            pred = logits.argmax(-1)
            last = mask.sum(1) - 1
            for r in range(pred.shape[0]):
                k = int(last[r])
                assert torch.equal(pred[r, :k], nxt[r, :k])
            gen = greedy_generate(expert, batch["input_ids"], batch["attention_mask"], 10)
            assert torch.equal(batch["decoder_input_ids"][:, 1:][mask[:, 1:]], gen[:, : mask.shape[1] - 1][mask[:, 1:]])

    gold_pool = _pool(w, tmp_path, calibration_target="gold")
    gold = gold_pool.calibration_set(8, seed=0, batch_size=4)
    assert "labels" in gold[0][0] and torch.equal(gold[0][0]["input_ids"], calib[0][0]["input_ids"])
    gold_bb = T5Backbone(EXPERT_TASKS, w["base"], w["experts"], calibration_target="gold")
    prepared = gold_bb.prepare_calibration(base, base, experts, gold, "cpu")
    tok = gold_pool.tokenizer
    words = glue_templates()["cola"]["label_words"]
    batch = prepared[0][0]
    for ids, mask in zip(batch["decoder_input_ids"], batch["decoder_attention_mask"]):
        assert tok.decode(ids[1 : int(mask.sum())], skip_special_tokens=True) in words
    with pytest.raises(ValueError, match="gold"):
        gold_bb.prepare_calibration(base, base, experts, calib, "cpu")


# ---- the GLUE pool ------------------------------------------------------------------------


def test_glue_pool_generation_and_scoring(w, models, tmp_path):
    bb, base, experts = models
    pool = _pool(w, tmp_path)
    res = pool.evaluate(lambda i: experts[i], "cpu", batch_size=5)
    assert set(res) == set(EXPERT_TASKS)
    assert {k: list(v) for k, v in res.items()} == {"cola": ["accuracy"], "mnli": ["accuracy"], "rte": ["accuracy"], "stsb": ["spearman"]}
    assert pool.primary_metric("stsb") == "spearman" and pool.primary_metric("rte") == "accuracy"
    import datasets

    tok = pool.tokenizer
    templates = glue_templates()
    for i, task in enumerate(EXPERT_TASKS):
        info = templates[task]
        rows = datasets.load_from_disk(os.path.join(w["data"], task))[info["test_split"]]
        answers, golds, targets = [], [], []
        for row in rows:  # one example at a time, no padding: the reference
            prompt = info["template"].format(**{f: row[f] for f in info["fields"]})
            enc = tok(prompt, return_tensors="pt")
            gen = greedy_generate(experts[i], enc["input_ids"], enc["attention_mask"], 10)
            answers.append(tok.decode(gen[0], skip_special_tokens=True).strip())
            if task == "stsb":
                golds.append(row["label"])
            else:
                targets.append(info["label_words"][row["label"]])
        if task == "stsb":
            ref = 100 * pd.Series([parse_float(a) for a in answers]).corr(pd.Series(golds), method="spearman")
            assert res[task]["spearman"] == pytest.approx(ref, abs=1e-6)
        else:
            ref = 100 * np.mean([a == t for a, t in zip(answers, targets)])
            assert res[task]["accuracy"] == pytest.approx(ref)
            assert ref > 100 / len(info["label_words"]), f"{task}: the expert answers with label words"
    # an unparseable STS-B answer scores as 0.0: the CoLA expert answers with words
    words = pool.generate_answers(experts[0], pool.split("stsb", "test").input_ids, "cpu", 4)
    assert all(parse_float(a) == 0.0 for a in words) and set(words) <= {"acceptable", "unacceptable"}
    assert pool.evaluate(lambda i: experts[0], "cpu", 4, only=[3]) == {"stsb": {"spearman": 0.0}}


def test_tokenised_cache_is_reused_and_rebuilt_when_damaged(w, tmp_path):
    pool = _pool(w, tmp_path)
    first = pool.split("rte", "test")
    folders = [p for p in (tmp_path / "cache").iterdir() if p.name.startswith("rte-test-")]
    assert len(folders) == 1 and (folders[0] / "ids.npz").exists()
    again = _pool(w, tmp_path)
    again.load_split = lambda *a: pytest.fail("the cached split is read from disk")
    cached = again.split("rte", "test")
    assert cached.input_ids == first.input_ids and cached.targets == first.targets
    (folders[0] / "ids.npz").write_bytes(b"damaged")
    rebuilt = _pool(w, tmp_path).split("rte", "test")
    assert rebuilt.input_ids == first.input_ids


# ---- merging and calibrating ------------------------------------------------------------------


def test_merge_counts_tied_embeddings_once(models):
    bb, base, experts = models
    seen = {}

    def spy(base_sd, expert_sds, exclude=None):
        seen["keys"] = list(base_sd)
        return {k: v + 1.0 for k, v in base_sd.items()}

    merged = bb.merge(spy, base, experts)
    assert "shared.weight" in seen["keys"] and "encoder.embed_tokens.weight" not in seen["keys"]
    assert "lm_head.weight" in seen["keys"]  # FLAN-T5's own lm_head is a distinct tensor
    assert merged.encoder.embed_tokens.weight is merged.shared.weight
    assert torch.allclose(merged.shared.weight, base.shared.weight + 1.0)


def test_merge_with_calibration_data_gets_decoder_targets(w, models, tmp_path):
    bb, base, experts = models
    seen = {}

    def needs_data(base_sd, expert_sds, exclude=None, backbone=None, base_model=None, expert_models=None, calib=None, device=None):
        seen["calib"] = calib
        batch = calib[0][0]  # the backbone can run its blocks on these batches
        state = backbone.embed(base_model, batch)
        for blk in backbone.blocks(base_model):
            state = backbone.run_block(blk, state)
        seen["rows"] = backbone.readout(base_model, state).shape[0]
        return dict(base_sd)

    calib = _pool(w, tmp_path).calibration_set(4, 0, 4)
    bb.merge(needs_data, base, experts, backbone=bb, base_model=base, expert_models=experts, calib=calib, device="cpu")
    assert all("decoder_input_ids" in b for task in seen["calib"] for b in task)
    assert seen["rows"] == int(seen["calib"][0][0]["decoder_attention_mask"].sum())
    assert "decoder_input_ids" not in calib[0][0]  # the caller's batches are left as they were


def test_featcal_lowers_final_decoder_drift_to_every_expert(w, models, tmp_path):
    from featcal.calibration.feature_calibration import FeatCal
    from featcal.merge import task_arithmetic

    bb, base, experts = models
    merged = bb.merge(task_arithmetic, base, experts)
    before_model = copy.deepcopy(merged)
    pool = _pool(w, tmp_path)
    calib = bb.prepare_calibration(merged, base, experts, pool.calibration_set(16, 0, 8), "cpu")
    out = FeatCal(progress=False, drift_examples=None).calibrate(bb, merged, base, experts, calib, "cpu")
    cal = out.model_for_task(0)
    for t, expert in enumerate(experts):
        for batch in calib[t]:
            ref = bb.represent(expert, batch)
            d_before = (bb.represent(before_model, batch) - ref).norm()
            d_after = (bb.represent(cal, batch) - ref).norm()
            assert d_after < d_before, f"task {EXPERT_TASKS[t]}"
    rows = pd.DataFrame(out.report.drift)
    last = rows[rows.block == rows.block.max()].pivot(index="task", columns="when", values="drift")
    assert (last["after"] < last["before"]).all()
    # the drift reported for the last encoder block is that of the encoder's own output
    # (captured from the models' plain forward), not of the decoder inputs that follow it
    exit_rows = rows[(rows.block == 1) & (rows.when == "before")].set_index("task")["drift"]
    for t, expert in enumerate(experts):
        outs = []
        for model in (before_model, expert):
            got = []
            h = model.encoder.block[-1].register_forward_hook(lambda m, a, o: got.append(o[0] if isinstance(o, tuple) else o))
            with torch.no_grad():
                for batch in calib[t]:
                    model.encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            h.remove()
            outs.append(got)
        num = den = 0.0
        for a, b, batch in zip(outs[0], outs[1], calib[t]):
            rel = (a - b).norm(dim=-1) / b.norm(dim=-1)
            m = batch["attention_mask"].float()
            num, den = num + float((rel * m).sum()), den + float(m.sum())
        assert exit_rows[EXPERT_TASKS[t]] == pytest.approx(num / den, rel=1e-4)
    # outside the blocks: as merged; inside: calibrated (cross-attention k/v included)
    for name in ("shared.weight", "lm_head.weight", "encoder.final_layer_norm.weight", "decoder.final_layer_norm.weight"):
        assert torch.equal(cal.state_dict()[name], before_model.state_dict()[name]), name
    k = "decoder.block.1.layer.1.EncDecAttention.k.weight"
    assert not torch.equal(cal.state_dict()[k], before_model.state_dict()[k])
    # save_calibrated: a plain model folder that loads back with the same (untied) weights
    folder = out.save(tmp_path / "calibrated")
    back = load_t5(str(folder))
    assert back.lm_head.weight is not back.shared.weight
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in cal.state_dict().items())
    # one linear system per tensor read (and token weighting): the group leaders
    leaders = set(out.report.extra["cross_routes"])
    assert "decoder.block.0.layer.2.DenseReluDense.wi_0" in leaders  # wi_0/wi_1 share their input
    assert not any("wi_1" in k for k in leaders)
    assert "decoder.block.0.layer.1.EncDecAttention.k" in leaders  # k/v read the encoder output
    assert not any("EncDecAttention.v" in k for k in leaders)
    assert "encoder.block.0.layer.0.SelfAttention.q" in leaders  # q/k/v share one system ...
    assert "encoder.block.0.layer.0.SelfAttention.k" not in leaders
    # ... except in the last block, where k/v keep uniform token weights
    assert "decoder.block.1.layer.0.SelfAttention.q[readout-weighted]" in leaders
    assert "decoder.block.1.layer.0.SelfAttention.k" in leaders


def test_featcal_ignores_encoder_padding_everywhere(w, models, tmp_path):
    """Extra encoder padding changes no calibrated weight: padded encoder rows weigh 0 in the
    encoder blocks and in the decoder's cross-attention k/v (``module_masks``)."""
    from featcal.calibration.feature_calibration import FeatCal
    from featcal.merge import task_arithmetic

    bb, base, experts = models
    merged = bb.merge(task_arithmetic, base, experts)
    pool = _pool(w, tmp_path)
    calib = bb.prepare_calibration(merged, base, experts, pool.calibration_set(8, 0, 4), "cpu")
    padded = []
    for task in calib:
        rows = []
        for b in task:
            b = dict(b)
            extra = 5
            b["input_ids"] = torch.nn.functional.pad(b["input_ids"], (0, extra), value=0)
            b["attention_mask"] = torch.nn.functional.pad(b["attention_mask"], (0, extra), value=0)
            rows.append(b)
        padded.append(rows)
    results = []
    for data in (calib, padded):
        out = FeatCal(progress=False, drift_examples=0, inplace=False).calibrate(bb, merged, base, experts, data, "cpu")
        results.append(out.model_for_task(0).state_dict())
    changed = 0
    for k, v in results[0].items():
        assert torch.allclose(v, results[1][k], atol=1e-4, rtol=1e-4), k
        changed += not torch.equal(v, merged.state_dict()[k])
    assert changed > 0


def test_surgery_hook_changes_generation_only_for_its_task(w, models, tmp_path):
    from featcal.calibration.surgery import Surgery
    from featcal.merge import task_arithmetic

    bb, base, experts = models
    merged = bb.merge(task_arithmetic, base, experts)
    pool = _pool(w, tmp_path)
    calib = bb.prepare_calibration(merged, base, experts, pool.calibration_set(8, 0, 8), "cpu")
    cal = Surgery(iterations=3, progress=False, accelerator="cpu").calibrate(bb, merged, base, experts, calib, "cpu")
    tokens = [int(sum(b["decoder_attention_mask"].sum() for b in calib[t])) for t in range(len(experts))]
    assert list(cal.report.extra["examples_per_task"].values()) == tokens  # one feature row per target token
    with torch.no_grad():  # make module 0 a strong correction and module 1 the identity
        cal.surgery.blocks[0].down.weight.normal_(0, 3.0)
        cal.surgery.blocks[0].up.weight.normal_(0, 3.0)
        cal.surgery.blocks[1].up.weight.zero_()
    # represent(x, t) is the corrected representation, per target token, as lm_head reads it
    batch = calib[0][0]
    z = bb.represent(merged, batch)
    assert torch.allclose(cal.represent(batch, 0), z - cal.surgery.blocks[0](z)[0], rtol=1e-4, atol=1e-4)
    assert torch.allclose(cal.represent(batch, 1), z, atol=1e-6)
    cal.remove_hooks()
    ids, mask = pad_batch(pool.split("cola", "test").input_ids, pool.tokenizer.pad_token_id)
    plain = greedy_generate(merged, ids, mask, 10)
    routed0 = greedy_generate(cal.model_for_task(0), ids, mask, 10)
    routed1 = greedy_generate(cal.model_for_task(1), ids, mask, 10)
    assert not torch.equal(routed0, plain)
    assert torch.equal(routed1, plain)
    cal.remove_hooks()
