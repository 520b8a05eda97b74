"""The FeatCal driver on tiny real architectures: a CLIP vision tower and a Llama decoder.

Models are built by ``tests/fixtures/featcal_worlds.py`` (the ``clip_world`` / ``llama_world``
fixtures): fine-tuned for a few steps into task "experts" (so task vectors act on their
task's inputs, as real fine-tuning does), saved to tmp_path and loaded back through the
backbone adapters' real loaders. Merge: Task Arithmetic (λ = 0.3).
"""
from __future__ import annotations

import json

import pytest
import torch

from featcal.calibration.feature_calibration import FeatCal
from tests.fixtures.featcal_worlds import T
from tests.fixtures.featcal_worlds import final_drift as _final_drift

pytestmark = pytest.mark.usefixtures("one_thread")


def _calibrate(world, **kwargs):
    backbone, base, experts, merged_sd, calib, _ = world
    merged = backbone.with_state_dict(base, merged_sd)
    kwargs.setdefault("progress", False)
    return FeatCal(**kwargs).calibrate(backbone, merged, base, experts, calib)


def _block_params(backbone, model):
    out = {}
    for i, blk in enumerate(backbone.blocks(model)):
        for n, p in blk.named_parameters():
            out[f"{i}.{n}"] = p.detach().clone()
    return out


def _drift(report, when: str, tasks: list[str]) -> dict[int, list[float]]:
    """The report's drift rows for one ``when``, as {task index: [drift per block]}."""
    out: dict[int, list[float]] = {}
    for row in sorted((r for r in report.drift if r["when"] == when), key=lambda r: r["block"]):
        out.setdefault(tasks.index(row["task"]), []).append(row["drift"])
    return out


# ----------------------------------------------------------------------------- CLIP


def test_clip_featcal_lowers_final_drift_to_every_expert(clip_world):
    backbone, base, experts, merged_sd, calib, test = clip_world
    merged = backbone.with_state_dict(base, merged_sd)
    before = _final_drift(backbone, merged, experts, test)
    out = _calibrate(clip_world)
    after = _final_drift(backbone, out.model, experts, test)
    assert all(a < b for a, b in zip(after, before)), (before, after)
    assert sum(after) / T < 0.85 * sum(before) / T, (before, after)
    # representation through the CalibratedModel interface is the calibrated model's
    torch.testing.assert_close(out.represent(test[0], 0), backbone.represent(out.model, test[0]))
    # report: per-block drift before/after per task index, JSON-friendly
    rep = out.report
    json.dumps(rep.to_dict())
    before_d, after_d = _drift(rep, "before", backbone.tasks), _drift(rep, "after", backbone.tasks)
    assert set(before_d) == set(range(T)) == set(after_d)
    assert all(len(v) == 2 for v in after_d.values())
    # the calibrated blocks drift less than the merged ones along the forward pass
    assert all(after_d[t][0] < before_d[t][0] for t in range(T))
    assert rep.method == "featcal" and rep.timings["total"] > 0 and rep.fallbacks == []


def test_clip_parameters_outside_blocks_keep_merged_values(clip_world):
    backbone, base, experts, merged_sd, calib, _ = clip_world
    out = _calibrate(clip_world)
    inside = set()
    for blk in backbone.blocks(out.model):
        inside |= {id(p) for p in blk.parameters()}
    outside = [(n, p) for n, p in out.model.named_parameters() if id(p) not in inside]
    assert {n.split(".")[1] for n, _ in outside} >= {"embeddings", "pre_layrnorm", "post_layernorm"}
    assert any(n.startswith("visual_projection") for n, _ in outside)
    for n, p in outside:
        assert torch.equal(p, merged_sd[n]), n
    changed = [n for n, p in out.model.named_parameters() if id(p) in inside and not torch.equal(p, merged_sd[n])]
    assert len(changed) == len(inside)  # every block parameter was calibrated


def test_clip_ablation_switches_run_and_differ(clip_world):
    backbone = clip_world[0]
    merged_sd = clip_world[3]
    ref = _block_params(backbone, _calibrate(clip_world).model)
    variants = {
        "no_bias": dict(calibrate_bias=False),
        "no_norm": dict(calibrate_norm=False),
        "no_token_weighting": dict(token_weighting=False),
        "rho1": dict(rho=1.0),
        "alpha0.3": dict(alpha=0.3),
        "lambda1": dict(lambda_ratio=1.0),
        "gram": dict(cross_route="gram"),
        "direct": dict(cross_route="direct"),
        "float64": dict(dtype="float64"),
    }
    results = {k: _block_params(backbone, _calibrate(clip_world, **kw).model) for k, kw in variants.items()}

    def differs(a, b, keys=None):
        keys = keys or a.keys()
        return max(float((a[k] - b[k]).abs().max()) for k in keys)

    for name in ("no_bias", "no_norm", "no_token_weighting", "rho1", "alpha0.3", "lambda1"):
        assert differs(results[name], ref) > 1e-4, name
    # the cross-term routes and the solve dtype are implementation choices: same answer
    for name in ("gram", "direct", "float64"):
        assert differs(results[name], ref) < 1e-4, name
    # the switches do what they say
    blk = {k: v for k, v in merged_sd.items() if ".encoder.layers." in k}
    for k, v in results["no_bias"].items():
        full = f"vision_model.encoder.layers.{k}"
        if k.endswith(".bias") and "layer_norm" not in k:
            assert torch.equal(v, blk[full]), k
    for k, v in results["no_norm"].items():
        full = f"vision_model.encoder.layers.{k}"
        if "layer_norm" in k:
            assert torch.equal(v, blk[full]), k
    # token weighting only touches the last block
    last = str(len(backbone.blocks(_calibrate(clip_world).model)) - 1)
    first_keys = [k for k in ref if not k.startswith(last + ".")]
    assert differs(results["no_token_weighting"], ref, first_keys) < 1e-6
    assert differs(results["no_token_weighting"], ref, [k for k in ref if k.startswith(last + ".")]) > 1e-4


def test_clip_forward_order_false_uses_uncalibrated_inputs(clip_world):
    backbone = clip_world[0]
    fwd = _calibrate(clip_world)
    flat = _calibrate(clip_world, forward_order=False)
    a, b = _block_params(backbone, fwd.model), _block_params(backbone, flat.model)
    # block 0 sees the same (embedding) inputs in both modes; block 1 does not
    assert max(float((a[k] - b[k]).abs().max()) for k in a if k.startswith("0.")) < 1e-6
    assert max(float((a[k] - b[k]).abs().max()) for k in a if k.startswith("1.")) > 1e-4
    # in the ablation the "before" chain is the student chain: same before-drift as forward order
    flat_d, fwd_d = _drift(flat.report, "before", backbone.tasks), _drift(fwd.report, "before", backbone.tasks)
    for t in range(T):
        assert flat_d[t] == pytest.approx(fwd_d[t], rel=1e-5)
    # and it still calibrates
    backbone, base, experts, merged_sd, calib, test = clip_world
    merged = backbone.with_state_dict(base, merged_sd)
    before = _final_drift(backbone, merged, experts, test)
    after = _final_drift(backbone, flat.model, experts, test)
    assert sum(after) < sum(before)


def test_clip_nan_statistics_raise_naming_the_module(clip_world):
    backbone, base, experts, merged_sd, calib, _ = clip_world
    bad = [list(c) for c in calib]
    bad[1] = [bad[1][0].clone()]
    bad[1][0][0, :, 5, 5] = float("nan")
    merged = backbone.with_state_dict(base, merged_sd)
    with pytest.raises(FloatingPointError, match=r"vision_model\.encoder\.layers\.0\.\w+"):
        FeatCal(progress=False).calibrate(backbone, merged, base, experts, bad)


def test_clip_inplace_false_leaves_merged_untouched(clip_world):
    backbone, base, experts, merged_sd, calib, _ = clip_world
    merged = backbone.with_state_dict(base, merged_sd)
    out = FeatCal(progress=False, inplace=False).calibrate(backbone, merged, base, experts, calib)
    assert out.model is not merged
    for n, p in merged.state_dict().items():
        assert torch.equal(p, merged_sd[n])


# ----------------------------------------------------------------------------- Llama


def test_llama_featcal_lowers_final_drift_to_every_expert(llama_world):
    backbone, base, experts, merged_sd, calib, test = llama_world
    merged = backbone.with_state_dict(base, merged_sd)
    before = _final_drift(backbone, merged, experts, test)
    out = _calibrate(llama_world)
    after = _final_drift(backbone, out.model, experts, test)
    assert all(a < b for a, b in zip(after, before)), (before, after)
    json.dumps(out.report.to_dict())
    # every module of every block (q/k/v/o, gate/up/down, both RMSNorms) was calibrated
    names = set()
    for i, blk in enumerate(backbone.blocks(out.model)):
        for n, p in blk.named_parameters():
            assert not torch.equal(p, merged_sd[f"model.layers.{i}.{n}"]), (i, n)
            names.add(n.rsplit(".", 1)[0])
    assert names >= {
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm",
    }
    # outside the blocks: merged values (embeddings and lm_head are the base's: excluded from merging)
    inside = {id(p) for blk in backbone.blocks(out.model) for p in blk.parameters()}
    for n, p in out.model.named_parameters():
        if id(p) not in inside:
            assert torch.equal(p, merged_sd[n]), n
    assert torch.equal(out.model.model.embed_tokens.weight, base.model.embed_tokens.weight)


def test_llama_backbone_matches_the_model_forward(llama_world):
    backbone, base, experts, merged_sd, calib, test = llama_world
    batch = dict(test[0])
    batch["attention_mask"] = batch["attention_mask"].clone()
    batch["attention_mask"][0, :3] = 0  # left padding too
    with torch.no_grad():
        ref = base(**batch, output_hidden_states=True).hidden_states[-1]
        state = backbone.embed(base, batch)
        for blk in backbone.blocks(base):
            state = backbone.run_block(blk, state)
        z = backbone.readout(base, state)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(base.model.norm(state.hidden)[real], ref[real])
    torch.testing.assert_close(z, ref[real])  # per real token, row-major: what lm_head receives
    assert torch.equal(state.token_mask.bool(), real) and torch.equal(state.readout_mask, real)


def test_llama_missing_source_raises_source_unavailable(tmp_path):
    from featcal.backbone.llama import LlamaBackbone
    from featcal.errors import SourceUnavailable

    empty = tmp_path / "empty"
    empty.mkdir()
    backbone = LlamaBackbone(["a"], base=str(empty), experts=[str(tmp_path / "nope")])
    with pytest.raises(SourceUnavailable, match="no config.json in model folder .*empty"):
        backbone.load_base()
    with pytest.raises(SourceUnavailable):
        backbone.load_expert("a")


def test_drift_examples_caps_the_diagnostic_chain_only(clip_world):
    """The drift report uses the first k examples per task; the calibration itself uses all."""
    full = _calibrate(clip_world, drift_examples=None)
    few = _calibrate(clip_world, drift_examples=5)
    off = _calibrate(clip_world, drift_examples=0)
    tasks = clip_world[0].tasks
    assert full.report.extra["drift_examples_per_task"] == {t: 32 for t in tasks}
    assert few.report.extra["drift_examples_per_task"] == {t: 5 for t in tasks}
    assert off.report.drift == []
    for a, b, c in zip(full.model.parameters(), few.model.parameters(), off.model.parameters()):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert _drift(few.report, "before", tasks) != _drift(full.report, "before", tasks)


def test_block_state_take_cuts_batch_tensors_in_extras(llama_world):
    backbone, base, *_ , calib, _ = llama_world
    state = backbone.embed(base, calib[0][0])
    part = state.take(3)
    assert part.hidden.shape[0] == 3 and part.token_mask.shape[0] == 3
    ref = backbone.run_block(backbone.blocks(base)[0], state).hidden[:3]
    got = backbone.run_block(backbone.blocks(base)[0], part).hidden
    assert torch.allclose(got, ref, atol=1e-5)
    assert state.take(99) is state


def test_joined_llama_batches_run_like_separate_ones(llama_world):
    """Joining padded batches (attention masks per example, rotary tables shared) gives the
    same block outputs; batches of another length are left as they are."""
    from featcal.backbone.base import join_states
    from featcal.calibration.feature_calibration import pack_passes

    backbone, base, *_, calib, _ = llama_world
    a, b = (backbone.embed(base, batch) for batch in calib[0])
    joined = join_states([a, b])
    assert joined is not None and joined.hidden.shape[0] == a.hidden.shape[0] + b.hidden.shape[0]
    blk = backbone.blocks(base)[0]
    ref = torch.cat([backbone.run_block(blk, a).hidden, backbone.run_block(blk, b).hidden])
    assert torch.allclose(backbone.run_block(blk, joined).hidden, ref, atol=1e-5)

    short = backbone.embed(base, {k: v[:, :-2] for k, v in calib[0][1].items()})
    assert join_states([a, short]) is None
    s_out, e_out = pack_passes([a, short, b], [a, short, b], 10**6)
    assert [s.hidden.shape for s in s_out] == [a.hidden.shape, short.hidden.shape, b.hidden.shape]
    s_out, _ = pack_passes([a, b, short], [a, b, short], 10**6)
    assert [s.hidden.shape[0] for s in s_out] == [2 * a.hidden.shape[0], short.hidden.shape[0]]
    s_out, _ = pack_passes([a, b, a], [a, b, a], a.token_mask.numel() * 2)  # the token cap
    assert [s.hidden.shape[0] for s in s_out] == [2 * a.hidden.shape[0], a.hidden.shape[0]]


def test_llama_joined_passes_give_the_same_calibration(llama_world):
    one = _calibrate(llama_world, pass_tokens=0, drift_examples=0)
    joined = _calibrate(llama_world, drift_examples=0)
    for (n, p), q in zip(one.model.named_parameters(), joined.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=n)
