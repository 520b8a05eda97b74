"""MergeBench evaluation: one full model alive at a time, the model's own context length,
the user's generation limit reaching lm-eval, nltk data checked up front."""
from __future__ import annotations

import gc
import weakref

import pytest
import torch

from featcal.errors import SourceUnavailable
from featcal.tasks.mergebench import MergeBenchTaskPool, check_lm_eval_resources


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, one_thread):
    from transformers import AutoModelForCausalLM

    from tests.fixtures.llm import config, word_tokenizer
    from tests.fixtures.mergebench import write_lm_eval_tasks

    root = tmp_path_factory.mktemp("mb_eval")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config("llama")).save_pretrained(root / "m", max_shard_size="40KB")
    word_tokenizer(root / "m")
    write_lm_eval_tasks(root)
    return root


def _pool(root, tasks, lm_tasks, **kw):
    return MergeBenchTaskPool(tasks, str(root / "m"), {t: "unused" for t in tasks}, lm_tasks,
                              lm_eval_include=[str(root)], lm_eval_defaults=False, limit=2, **kw)


def test_one_materialised_model_alive_at_a_time(tiny, monkeypatch):
    from featcal.io.lazy import LazyCausalLM

    tasks = ["instruction", "math", "coding", "safety"]
    pool = _pool(tiny, tasks, {t: ["tiny_mc"] for t in tasks}, max_length=1024)
    live: list[weakref.ref] = []
    real_materialize = LazyCausalLM.materialize

    def materialize(self):
        m = real_materialize(self)
        live.append(weakref.ref(m))
        return m

    monkeypatch.setattr(LazyCausalLM, "materialize", materialize)
    peak = []
    real_lm_eval = pool.lm_eval

    def counting_lm_eval(model, lm_tasks, batch_size):
        gc.collect()
        peak.append(sum(r() is not None for r in live))
        return real_lm_eval(model, lm_tasks, batch_size)

    monkeypatch.setattr(pool, "lm_eval", counting_lm_eval)
    a, b = LazyCausalLM(tiny / "m", name="a"), LazyCausalLM(tiny / "m", name="b")
    owner = {0: a, 1: b, 2: a, 3: b}  # alternating: each model still materialised once
    out = pool.evaluate(lambda i: owner[i], "cpu", batch_size=2)
    assert set(out) == set(tasks)
    assert len(live) == 2 and peak == [1, 1]  # one lm-eval run per model, one model alive in each
    gc.collect()
    assert all(r() is None for r in live)  # nothing left alive after evaluation
    # the same model scored the same on its categories
    assert out["instruction"]["score"] == out["coding"]["score"]


def test_pool_asks_the_model_adapter_whether_a_model_is_on_disk(tiny, monkeypatch):
    """The pool loads a model kept on disk through the bound adapter's storage API
    (``is_on_disk`` / ``materialize``), whatever the handle is."""
    from transformers import AutoModelForCausalLM

    from featcal.backbone.llama import LlamaBackbone

    class Handle:  # an on-disk model this adapter knows, no LazyCausalLM
        pass

    loaded = []

    class Storage(LlamaBackbone):
        def is_on_disk(self, model):
            return isinstance(model, Handle)

        def materialize(self, model):
            m = AutoModelForCausalLM.from_pretrained(str(tiny / "m"))
            loaded.append(weakref.ref(m))
            return m

    pool = _pool(tiny, ["math"], {"math": ["tiny_mc"]}, max_length=1024).bind(Storage([], base="", experts=[]))
    seen = []
    real_lm_eval = pool.lm_eval
    monkeypatch.setattr(pool, "lm_eval", lambda model, lm_tasks, bs: (seen.append(model), real_lm_eval(model, lm_tasks, bs))[1])
    out = pool.evaluate(lambda i: Handle(), "cpu", batch_size=2)
    assert len(loaded) == 1 and isinstance(seen[0], torch.nn.Module) and 0.0 <= out["math"]["score"] <= 100.0
    del seen[:]
    gc.collect()
    assert loaded[0]() is None  # the materialised model is freed after its lm-eval run
    plain = AutoModelForCausalLM.from_pretrained(str(tiny / "m"))
    assert pool.evaluate(lambda i: plain, "cpu", batch_size=2) == out and len(loaded) == 1  # loaded: used as it is


def test_context_length_is_the_models_and_max_gen_toks_reaches_lm_eval(tiny, monkeypatch):
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM

    seen = []
    real = HFLM.generate_until

    def generate_until(self, requests, disable_tqdm=False):
        seen.append((self.max_length, [r.args[1].get("max_gen_toks") for r in requests]))
        return real(self, requests, disable_tqdm)

    monkeypatch.setattr(HFLM, "generate_until", generate_until)
    model = AutoModelForCausalLM.from_pretrained(str(tiny / "m")).eval()
    pool = _pool(tiny, ["math"], {"math": ["tiny_gen"]}, max_length=1024, max_gen_toks=3)
    pool.evaluate(lambda i: model, "cpu", batch_size=2)
    ctx, gens = seen[-1]
    assert ctx == model.config.max_position_embeddings == 64  # not the calibration max_length (1024)
    assert gens and set(gens) == {3}
    seen.clear()
    pool = _pool(tiny, ["math"], {"math": ["tiny_gen"]}, max_length=1024)  # no knob: the task's own
    pool.evaluate(lambda i: model, "cpu", batch_size=2)
    assert set(seen[-1][1]) == {2}  # tiny_gen's own generation_kwargs.max_gen_toks


def test_nltk_data_is_checked_up_front(monkeypatch, tmp_path):
    import nltk

    monkeypatch.setattr(nltk.data, "path", [str(tmp_path / "empty")])
    check_lm_eval_resources(["gsm8k_cot", "toxigen"])  # no nltk data needed
    with pytest.raises(SourceUnavailable, match="punkt_tab") as err:
        check_lm_eval_resources(["ifeval"])
    assert "python -m nltk.downloader punkt_tab" in str(err.value) and "NLTK_DATA" in str(err.value)


def test_default_lm_eval_task_reads_its_hub_snapshot_offline(tmp_path, monkeypatch, one_thread):
    """gsm8k_cot (a MergeBench default, lm-eval's own YAML) over openai/gsm8k present only as
    a hub snapshot, network off: lm-eval's datasets.load_dataset goes through the resolver."""
    from transformers import AutoModelForCausalLM

    from tests.fixtures.llm import config, word_tokenizer
    from tests.fixtures.standin_hub import put_lm_eval_datasets
    from tests.fixtures.standin_hub import offline_home

    hub = offline_home(monkeypatch, tmp_path / "hf")
    put_lm_eval_datasets(hub)
    cfg = config("llama")
    cfg.max_position_embeddings = 4096  # room for the 8-shot chain-of-thought prompt
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    word_tokenizer(tmp_path / "tok")
    pool = MergeBenchTaskPool(["math"], str(tmp_path / "tok"), {"math": "unused"}, {"math": ["gsm8k_cot"]},
                              limit=2, max_gen_toks=4)
    out = pool.evaluate(lambda i: model, "cpu", batch_size=2)
    assert set(out["math"]) == {"gsm8k_cot/exact_match", "score"}
    assert 0.0 <= out["math"]["score"] <= 100.0


def test_generation_limit_beyond_the_context_is_bounded(tiny, monkeypatch):
    """A limit >= the model's context (ifeval's 1280 on a short model) is cut to half the
    context instead of failing in lm-eval's assertion."""
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM

    seen = []
    real = HFLM.generate_until

    def generate_until(self, requests, disable_tqdm=False):
        seen.append([r.args[1].get("max_gen_toks") for r in requests])
        return real(self, requests, disable_tqdm)

    monkeypatch.setattr(HFLM, "generate_until", generate_until)
    model = AutoModelForCausalLM.from_pretrained(str(tiny / "m")).eval()
    pool = _pool(tiny, ["math"], {"math": ["tiny_gen"]}, max_gen_toks=1280)
    out = pool.evaluate(lambda i: model, "cpu", batch_size=2)
    assert set(seen[-1]) == {model.config.max_position_embeddings // 2}
    assert 0.0 <= out["math"]["score"] <= 100.0
