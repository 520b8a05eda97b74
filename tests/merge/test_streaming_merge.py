"""Streaming merges (tensor by tensor from sharded safetensors, written shard by shard)
equal the in-memory merges exactly, and the output folder loads as a normal HF model."""
from __future__ import annotations

import functools
import inspect
import json

import pytest
import torch

from featcal.backbone.llama import LlamaBackbone
from featcal.io.safetensors import CheckpointReader, ShardWriter
from featcal.merge import dare, task_arithmetic, ties, weight_average
from featcal.merge.streaming import GlobalTies, merge_models, merge_recipe, merged_folder, stream_merge
from tests.fixtures.llm import TASKS, build_world, is_sharded

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("llm_merge")
    base, experts = build_world(root, "llama", layers=2, steps=3)
    backbone = LlamaBackbone(TASKS, base=base, experts=experts)
    return root, backbone, base, experts


def _sds(backbone):
    b = backbone.load_base().state_dict()
    return b, [backbone.load_expert(t).state_dict() for t in backbone.tasks]


def _load_folder(folder):
    return CheckpointReader(folder).state_dict()


def test_fixture_is_sharded(world):
    _, _, base, experts = world
    assert is_sharded(base) and all(is_sharded(e) for e in experts.values())


@pytest.mark.parametrize(
    "fn",
    [
        weight_average,
        functools.partial(task_arithmetic, scaling_factor=0.3),
        functools.partial(dare, scaling_factor=0.3, drop_rate=0.5, seed=7),
    ],
    ids=["weight_average", "task_arithmetic", "dare"],
)
def test_streaming_equals_in_memory(world, tmp_path, fn):
    root, backbone, base, experts = world
    out = stream_merge(fn, base, [experts[t] for t in TASKS], tmp_path / "merged", exclude=backbone.merge_excluded, progress=False)
    b, es = _sds(backbone)
    ref = fn(b, es, exclude=backbone.merge_excluded)
    got = _load_folder(out)
    on_disk = set(CheckpointReader(base).keys())
    assert set(got) == on_disk
    for k in on_disk:
        assert torch.equal(got[k], ref[k]), k
    # embeddings and lm_head stay at the base value; block weights moved
    assert torch.equal(got["model.embed_tokens.weight"], b["model.embed_tokens.weight"])
    assert torch.equal(got["lm_head.weight"], b["lm_head.weight"])
    assert not torch.equal(got["model.layers.0.mlp.up_proj.weight"], b["model.layers.0.mlp.up_proj.weight"])


def _global_ties_reference(b, es, exclude, lam, density, merge_func):
    """Brute force: flatten every merged tensor's task vector, kthvalue over the whole vector."""
    keys = [k for k, v in b.items() if torch.is_floating_point(v) and not exclude(k)]
    flat = torch.stack([torch.cat([(e[k].float() - b[k].float()).reshape(-1) for k in keys]) for e in es])
    n = flat.shape[1]
    kth = flat.abs().kthvalue(n - int(n * density), dim=1, keepdim=True).values
    trimmed = flat * (flat.abs() >= kth)
    sign = torch.sign(trimmed.sum(0))
    sign[sign == 0] = torch.sign(sign.sum())
    agree = torch.where(sign > 0, trimmed > 0, trimmed < 0)
    sel = trimmed * agree
    tv = {"sum": sel.sum(0), "mean": sel.sum(0) / agree.sum(0).clamp(min=1), "max": sel.abs().max(0).values * sign}[merge_func]
    out, at = {}, 0
    for k in keys:
        size = b[k].numel()
        out[k] = (b[k].float() + lam * tv[at : at + size].view_as(b[k])).to(b[k].dtype)
        at += size
    return out


@pytest.mark.parametrize("merge_func", ["sum", "mean", "max"])
def test_streaming_ties_equals_global_in_memory_ties(world, tmp_path, merge_func):
    root, backbone, base, experts = world
    fn = functools.partial(ties, scaling_factor=0.3, density=0.2)
    if "merge_func" in inspect.signature(ties).parameters:
        fn = functools.partial(fn, merge_func=merge_func)
    elif merge_func != "sum":
        fn = functools.partial(fn, merge_func=merge_func)  # streaming knows it; in-memory one not yet
    out = stream_merge(fn, base, [experts[t] for t in TASKS], tmp_path / "m", exclude=backbone.merge_excluded, progress=False)
    got = _load_folder(out)
    b, es = _sds(backbone)
    ref = _global_ties_reference(b, es, backbone.merge_excluded, 0.3, 0.2, merge_func)
    for k, v in ref.items():
        assert torch.equal(got[k], v), k
    if "merge_func" in inspect.signature(ties).parameters:  # the in-memory global TIES
        mem = fn(b, es, exclude=backbone.merge_excluded)
        for k in ref:
            assert torch.equal(got[k], mem[k]), k


def test_global_threshold_is_the_exact_kth_value():
    """Histogram bisection over float32 bit patterns finds kthvalue exactly, ties included."""
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(37, 5, generator=g), torch.randn(101, generator=g).round(decimals=1), torch.zeros(13)]
    base = [torch.zeros_like(t) for t in tensors]
    for density in (0.2, 0.5, 0.01, 1.0):
        m = GlobalTies(density=density)
        for p in range(2):
            m.begin_pass(p, 1)
            for i, (b, t) in enumerate(zip(base, tensors)):
                m.observe(p, str(i), b, [t])
            m.end_pass(p)
        flat = torch.cat([t.reshape(-1) for t in tensors]).abs()
        k = flat.numel() - int(flat.numel() * density)
        want = float(flat.kthvalue(k).values) if k > 0 else 0.0
        assert m.thresholds[0] == want, density


def test_merged_folder_loads_as_a_normal_hf_model(world, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, backbone, base, experts = world
    out = stream_merge(
        functools.partial(task_arithmetic, scaling_factor=0.3), base, [experts[t] for t in TASKS], tmp_path / "m",
        exclude=backbone.merge_excluded, progress=False,
    )
    assert is_sharded(out)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(
        v.numel() * v.element_size() for v in _load_folder(out).values()
    )
    model = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    ref = backbone.with_state_dict(backbone.load_base(), task_arithmetic(*_sds(backbone), 0.3, exclude=backbone.merge_excluded))
    ids = torch.tensor([[1, 5, 9, 13, 17]])
    assert torch.equal(model(ids).logits, ref(ids).logits)
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok("w1 w2")["input_ids"][-2:] == [5, 6]


def test_shard_writer_checks_order_and_bf16_roundtrip(tmp_path):
    t = torch.randn(3, 4).to(torch.bfloat16)
    w = ShardWriter(tmp_path / "a.safetensors", [("x", torch.bfloat16, (3, 4)), ("y", torch.int64, (2,))])
    with pytest.raises(ValueError, match="expected x"):
        w.write("y", torch.zeros(2, dtype=torch.int64))
    w.write("x", t)
    w.write("y", torch.tensor([5, 6]))
    w.close()
    r = CheckpointReader(tmp_path)
    assert torch.equal(r.get("x"), t) and r.get("y").tolist() == [5, 6]


def test_unknown_and_data_needing_merges_are_refused(world, tmp_path):
    _, backbone, base, experts = world

    def regmean(base, experts, exclude=None):
        return base

    regmean.needs_calibration_data = True
    with pytest.raises(ValueError, match="no streaming version"):
        stream_merge(regmean, base, [experts[t] for t in TASKS], tmp_path / "x", progress=False)


def test_the_run_streams_models_kept_on_disk_into_a_reused_cache_folder(world, tmp_path, monkeypatch):
    """``merge_models`` (the run's merge stage) merges an adapter's on-disk models tensor by
    tensor into ``$FEATCAL_CACHE/merged/<recipe hash>`` (the in-memory result, bitwise), opens
    it through the adapter, and reuses the folder for the same recipe; loaded models are
    merged by the adapter in memory, which refuses on-disk ones."""
    _, backbone, base, experts = world
    monkeypatch.setenv("FEATCAL_CACHE", str(tmp_path / "cache"))
    ta = functools.partial(task_arithmetic, scaling_factor=0.3)
    st = LlamaBackbone(TASKS, base=base, experts=experts, streaming=True)
    b, es = st.load_base(), st.load_experts()
    with pytest.raises(TypeError, match="merge_models"):
        st.merge(ta, b, es)
    merged = merge_models(ta, st, b, es)
    assert not st.is_on_disk(merged)
    ref = merge_models(ta, backbone, backbone.load_base(), backbone.load_experts())  # loaded: in memory
    got_sd, ref_sd = merged.state_dict(), ref.state_dict()
    assert got_sd.keys() == ref_sd.keys() and all(torch.equal(got_sd[k], ref_sd[k]) for k in ref_sd)
    folder = merged_folder(ta, [str(base)] + [experts[t] for t in TASKS])
    assert folder.parent == tmp_path / "cache" / "merged"
    assert json.loads((folder / "featcal_merge.json").read_text()) == merge_recipe(ta, [str(base)] + [experts[t] for t in TASKS])
    written = {p.name: p.stat().st_mtime_ns for p in folder.glob("*.safetensors")}
    st.merged_on_disk = True
    lazy = merge_models(ta, st, b, es)
    assert st.is_on_disk(lazy) and st.saved_folder(lazy) == folder
    assert {p.name: p.stat().st_mtime_ns for p in folder.glob("*.safetensors")} == written  # reused, not rewritten
