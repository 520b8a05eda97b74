"""Layer-streamed FeatCal (models read block by block from sharded safetensors, activations
in a host store) equals the in-memory FeatCal to float tolerance on a tiny Llama merge,
and lowers the final drift to every expert."""
from __future__ import annotations

import copy
import functools

import pytest
import torch

from featcal.io.lazy import LazyCausalLM, is_lazy
from featcal.backbone.llama import LlamaBackbone
from featcal.calibration.feature_calibration import FeatCal
from featcal.merge import task_arithmetic
from featcal.merge.streaming import merge_models
from tests.fixtures.featcal_worlds import final_drift as _final_drift
from tests.fixtures.llm import TASKS, build_world, task_batch

pytestmark = pytest.mark.usefixtures("one_thread")

TA = functools.partial(task_arithmetic, scaling_factor=0.3)


@pytest.fixture(scope="module")
def world(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("llm_streamed")
    base, experts = build_world(root, "llama", layers=3, steps=15)
    calib = [[task_batch(t, 8, t), task_batch(t, 8, 10 + t)] for t in range(len(TASKS))]
    test = [task_batch(t, 32, 50 + t) for t in range(len(TASKS))]
    mem = LlamaBackbone(TASKS, base=base, experts=experts)
    streaming = LlamaBackbone(TASKS, base=base, experts=experts, streaming=True, merge_dir=str(root / "merged"))
    return mem, streaming, calib, test


def _in_memory(mem, calib, **kw):
    base = mem.load_base()
    experts = mem.load_experts()
    merged = mem.merge(TA, base, experts)
    return FeatCal(progress=False, pass_tokens=0, **kw).calibrate(mem, merged, base, experts, calib), base, experts, merged


def _streamed(streaming, calib, **kw):
    base = streaming.load_base()
    experts = streaming.load_experts()
    assert is_lazy(base) and all(isinstance(e, LazyCausalLM) for e in experts)
    merged = merge_models(TA, streaming, base, experts)  # streamed to disk, loaded back
    assert not is_lazy(merged)
    return FeatCal(progress=False, **kw).calibrate(streaming, merged, base, experts, calib)


def test_streamed_equals_in_memory_and_lowers_drift(world):
    mem, streaming, calib, test = world
    ref, base, experts, merged_ref = _in_memory(mem, calib)
    merged_plain = mem.merge(TA, base, experts)
    got = _streamed(streaming, calib)
    assert got.report.settings["streamed"] is True
    assert "streamed" not in ref.report.settings
    sd_ref, sd_got = ref.model.state_dict(), got.model.state_dict()
    assert sd_ref.keys() == sd_got.keys()
    moved = 0
    for k in sd_ref:
        torch.testing.assert_close(sd_got[k], sd_ref[k], rtol=1e-4, atol=1e-5, msg=k)
        moved += not torch.equal(sd_got[k], merged_plain.state_dict()[k])
    assert moved >= 3 * 9  # every block's q/k/v/o, gate/up/down and two norms were solved
    # the drift reports agree too
    assert len(got.report.drift) == len(ref.report.drift) == 2 * 3 * len(TASKS)
    for a, b in zip(got.report.drift, ref.report.drift):
        assert (a["task"], a["block"], a["when"]) == (b["task"], b["block"], b["when"])
        assert a["drift"] == pytest.approx(b["drift"], rel=1e-4, abs=1e-6)
    before = _final_drift(mem, merged_plain, experts, test)
    after = _final_drift(mem, got.model, experts, test)
    assert all(a < b for a, b in zip(after, before)), (before, after)
    mem_report = got.report.extra["memory"]
    assert mem_report["activation_mib"] > 0 and mem_report["peak_rss_mib"] > 0


def test_disk_offload_gives_the_same_calibration(world, tmp_path):
    _, streaming, calib, _ = world
    host = _streamed(streaming, calib, drift_examples=0)
    disk = _streamed(streaming, calib, drift_examples=0, offload="disk", offload_dir=str(tmp_path / "act"))
    assert disk.report.extra["memory"]["activation_store"] == "disk"
    assert list((tmp_path / "act").glob("slot-*.bin"))
    for a, b in zip(host.model.parameters(), disk.model.parameters()):
        assert torch.equal(a, b)


def test_lazy_blocks_match_the_loaded_model(world):
    mem, streaming, calib, _ = world
    lazy = streaming.load_base()
    full = mem.load_base()
    for l, blk in enumerate(mem.blocks(full)):
        got = lazy.load_block(streaming, l, "cpu")
        assert got is not blk
        for (n, p), (n2, q) in zip(blk.named_parameters(), got.named_parameters()):
            assert n == n2 and torch.equal(p, q)
    shell = lazy.shell()
    assert len(shell.model.layers) == 0
    a = streaming.embed(shell, calib[0][0])
    b = mem.embed(full, calib[0][0])
    assert torch.equal(a.hidden, b.hidden)


def test_streamed_in_bf16_matches_in_memory_bf16(world):
    """bf16 models: activations stored in bf16 on the host, statistics in float32."""
    mem, streaming, calib, _ = world
    mem16 = copy.copy(mem)
    mem16.dtype = "bfloat16"
    st16 = copy.copy(streaming)
    st16.dtype = "bfloat16"
    ref, *_ = _in_memory(mem16, calib, drift_examples=0)
    got = _streamed(st16, calib, drift_examples=0)
    for (n, a), b in zip(ref.model.named_parameters(), got.model.parameters()):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(b.float(), a.float(), rtol=2e-2, atol=2e-2, msg=n)


def test_merged_on_disk_gives_the_same_calibration_as_a_folder(world, tmp_path):
    """A merged model kept on disk: blocks read and written one at a time; the calibrated
    model is a normal HF folder, equal to the in-memory streamed result."""
    from transformers import AutoModelForCausalLM

    mem, streaming, calib, _ = world
    ref = _streamed(streaming, calib, drift_examples=0)
    disk_bb = copy.copy(streaming)
    disk_bb.merged_on_disk = True
    base = disk_bb.load_base()
    experts = disk_bb.load_experts()
    merged = merge_models(TA, disk_bb, base, experts)
    assert is_lazy(merged)
    out = FeatCal(progress=False, drift_examples=0, output_dir=str(tmp_path / "cal")).calibrate(disk_bb, merged, base, experts, calib)
    assert out.report.extra["calibrated_folder"] == str(tmp_path / "cal")
    model = out.model_for_task(0)
    for (n, a), (n2, b) in zip(ref.model.state_dict().items(), model.state_dict().items()):
        assert n == n2 and torch.equal(a, b), n
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "cal"))
    ids = torch.tensor([[1, 5, 9, 13]])
    assert torch.equal(loaded(ids).logits, ref.model(ids).logits)
    saved = out.save(tmp_path / "saved")
    assert (saved / "calibration_report.json").is_file() and (saved / "model.safetensors.index.json").is_file()


# ---- IO beside compute: the prefetching walk is the sequential one, bit for bit ---------
def _on_disk(streaming, calib, out, **kw):
    disk_bb = copy.copy(streaming)
    disk_bb.merged_on_disk = True
    base, experts = disk_bb.load_base(), disk_bb.load_experts()
    merged = merge_models(TA, disk_bb, base, experts)
    res = FeatCal(progress=False, output_dir=str(out), **kw).calibrate(disk_bb, merged, base, experts, calib)
    return res, res.model_for_task(0).state_dict()


def test_prefetch_and_async_writes_equal_the_sequential_walk(world, tmp_path):
    _, streaming, calib, _ = world
    seq, sd_seq = _on_disk(streaming, calib, tmp_path / "seq", prefetch=False)
    par, sd_par = _on_disk(streaming, calib, tmp_path / "par")  # the default: prefetch on
    assert sd_seq.keys() == sd_par.keys()
    for k in sd_seq:
        assert torch.equal(sd_seq[k], sd_par[k]), k
    assert [r["drift"] for r in seq.report.drift] == [r["drift"] for r in par.report.drift]
    # every shard was written (the last write waited for), the same bytes
    names = sorted(p.name for p in (tmp_path / "seq").glob("*.safetensors"))
    assert names == sorted(p.name for p in (tmp_path / "par").glob("*.safetensors")) and len(names) == 3 + 1
    for n in names:
        assert (tmp_path / "seq" / n).read_bytes() == (tmp_path / "par" / n).read_bytes(), n
    # merged in memory (written in place), lazy base and experts prefetched
    a = _streamed(streaming, calib, prefetch=False)
    b = _streamed(streaming, calib)
    for (n, p), q in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(p, q), n


class _Source:
    """A BlockSource stand-in that records which blocks were loaded, and in which thread."""

    lazy = False

    def __init__(self, gate=None):
        import threading

        self.loaded, self.released, self.threads = [], [], set()
        self.gate = gate
        self.main = threading.get_ident()

    def acquire(self, index, device):
        import threading

        if self.gate is not None:
            self.gate.wait()
        self.threads.add(threading.get_ident())
        self.loaded.append(index)
        return torch.nn.Linear(1, 1)

    def release(self, index, block):
        self.released.append(index)


def test_prefetcher_loads_one_block_ahead_in_a_thread():
    from featcal.calibration.feature_calibration.streamed import BlockPrefetcher

    srcs = [_Source(), _Source()]
    pf = BlockPrefetcher(srcs, torch.device("cpu"), num_blocks=4)
    pf.schedule(0)
    for l in range(4):
        blocks = pf.take(l)
        assert len(blocks) == 2
        ahead = min(l + 1, 3)
        if l + 1 < 4:
            pf.pending[l + 1].result()  # block l + 1 loads meanwhile ...
        assert all(s.loaded == list(range(ahead + 1)) for s in srcs)  # ... and nothing further
    pf.close()
    assert all(s.main not in s.threads for s in srcs)  # loads ran in the background thread
    seq = [_Source()]
    off = BlockPrefetcher(seq, torch.device("cpu"), num_blocks=2, enabled=False)
    off.take(0)
    assert seq[0].loaded == [0] and seq[0].threads == {seq[0].main}


def test_an_aborted_walk_gives_the_prefetched_blocks_back():
    import threading

    from featcal.calibration.feature_calibration.streamed import BlockPrefetcher

    gate = threading.Event()
    src = _Source(gate)
    pf = BlockPrefetcher([src], torch.device("cpu"), num_blocks=3)
    gate.set()
    pf.take(0)  # block 1 is now loading
    pf.close()  # the walk stops here (e.g. an error): block 1 is waited for and released
    assert src.loaded == [0, 1] and src.released == [1]
