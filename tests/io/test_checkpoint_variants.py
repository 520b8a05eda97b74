"""Checkpoint variants users have, through the streaming merge's reader: untied saves of
tied models (an extra lm_head.weight equal to the embedding) either way round, sharded or
not, bf16 / fp16 / fp32 experts; a head that really differs, and .bin folders, get one
clear message."""
from __future__ import annotations

import functools
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from featcal.errors import CheckpointMismatch, SourceUnavailable
from featcal.io.safetensors import CheckpointReader
from featcal.merge.streaming import stream_merge
from featcal.merge.task_arithmetic import task_arithmetic

EMB = "model.embed_tokens.weight"


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from tests.fixtures.llm import config

    root = tmp_path_factory.mktemp("variants")
    cfg = config("llama")
    cfg.tie_word_embeddings = True
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(cfg).eval()
    base.save_pretrained(root / "base")
    experts = []
    for i in range(2):
        torch.manual_seed(10 + i)
        e = AutoModelForCausalLM.from_config(cfg).eval()
        e.save_pretrained(root / f"e{i}", max_shard_size="40KB" if i else "10GB")  # sharded and not
        experts.append(root / f"e{i}")
    return root, experts


def _merged(folder) -> dict:
    r = CheckpointReader(folder)
    return {k: r.get(k) for k in r.keys()}


def _untie(src, dst, head=None):
    """Rewrite a (single-file or sharded) tied checkpoint with an extra lm_head.weight."""
    import shutil

    shutil.copytree(src, dst)
    files = sorted(dst.glob("*.safetensors"))
    sd = load_file(str(files[-1]))
    emb = CheckpointReader(src).get(EMB)
    sd["lm_head.weight"] = emb.clone() if head is None else head
    save_file(sd, str(files[-1]), metadata={"format": "pt"})
    index = dst / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text())
        data["weight_map"]["lm_head.weight"] = files[-1].name
        index.write_text(json.dumps(data))
    return dst


def test_untied_save_of_a_tied_expert_merges_like_the_tied_one(tied, tmp_path):
    root, experts = tied
    fn = functools.partial(task_arithmetic, scaling_factor=0.3)
    assert "lm_head.weight" not in CheckpointReader(root / "base")  # tied: no head stored
    want = _merged(stream_merge(fn, root / "base", experts, tmp_path / "ref", progress=False))
    untied = [_untie(e, tmp_path / f"untied{i}") for i, e in enumerate(experts)]
    assert "lm_head.weight" in CheckpointReader(untied[1])
    got = _merged(stream_merge(fn, root / "base", untied, tmp_path / "out", progress=False))
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    # the other way round: a base saved untied (equal head), tied experts: the head merges like the embedding
    base_untied = _untie(root / "base", tmp_path / "base_untied")
    got = _merged(stream_merge(fn, base_untied, experts, tmp_path / "out2", progress=False))
    assert torch.equal(got["lm_head.weight"], want[EMB]) and torch.equal(got[EMB], want[EMB])


def test_a_really_untied_head_is_one_clear_message(tied, tmp_path):
    root, experts = tied
    emb = CheckpointReader(experts[0]).get(EMB)
    bad = _untie(experts[0], tmp_path / "bad", head=emb + 0.1)
    with pytest.raises(CheckpointMismatch, match="differs from its embedding"):
        stream_merge(functools.partial(task_arithmetic, scaling_factor=0.3), root / "base", [bad], tmp_path / "o", progress=False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_experts_merge_against_an_fp32_base(tied, tmp_path, dtype):
    from transformers import AutoModelForCausalLM

    root, experts = tied
    half = []
    for i, e in enumerate(experts):
        AutoModelForCausalLM.from_pretrained(str(e), dtype=dtype).save_pretrained(tmp_path / f"h{i}")
        half.append(tmp_path / f"h{i}")
    assert CheckpointReader(half[0]).meta(EMB)[0] == dtype
    fn = functools.partial(task_arithmetic, scaling_factor=0.3)
    got = _merged(stream_merge(fn, root / "base", half, tmp_path / "out", progress=False))
    base = _merged(root / "base")
    exp = [_merged(h) for h in half]
    want = base[EMB] + 0.3 * sum(e[EMB].float() - base[EMB] for e in exp)
    assert got[EMB].dtype == base[EMB].dtype  # written in the base's dtype
    torch.testing.assert_close(got[EMB], want, rtol=0, atol=1e-6)


def test_bin_only_folder_is_one_clear_message(tied, tmp_path):
    root, _ = tied
    folder = tmp_path / "bin"
    folder.mkdir()
    torch.save(load_file(str(root / "base" / "model.safetensors")), str(folder / "pytorch_model.bin"))
    with pytest.raises(SourceUnavailable, match="pytorch_model.bin") as err:
        CheckpointReader(folder)
    assert "backbone.adapter.streaming=false" in str(err.value)
    from featcal.io.hub import load_raw_state_dict  # the in-memory loaders read .bin

    assert torch.equal(load_raw_state_dict(folder)[EMB], CheckpointReader(root / "base").get(EMB))
