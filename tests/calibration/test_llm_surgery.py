"""Surgery / ProbSurgery on LLM backbones: the representation is the final hidden state
before lm_head, per real token (as for T5); a lazy (streamed) model gives the same
representation through a block-streamed forward; the hook at lm_head's input is what
``represent`` reads."""
from __future__ import annotations

import pytest
import torch

from featcal.backbone.gemma2 import Gemma2Backbone
from featcal.io.lazy import LazyCausalLM
from featcal.backbone.llama import LlamaBackbone
from featcal.io.lazy import load_causal_lm

FAMILIES = {"llama": LlamaBackbone, "gemma2": Gemma2Backbone}


@pytest.fixture(scope="module")
def worlds(tmp_path_factory, one_thread):
    from transformers import AutoModelForCausalLM

    from tests.fixtures.llm import config, task_batch, word_tokenizer

    out = {}
    for family in FAMILIES:
        root = tmp_path_factory.mktemp(family)
        torch.manual_seed(0)
        m = AutoModelForCausalLM.from_config(config(family)).eval()
        with torch.no_grad():
            for n, p in m.named_parameters():
                if "norm" in n:
                    p.add_(0.1 * torch.randn_like(p))
        m.save_pretrained(root / "m", max_shard_size="40KB")
        word_tokenizer(root / "m")
        out[family] = (root / "m", task_batch(0, 4, 1, pad=True))
    return out


@pytest.mark.parametrize("family", list(FAMILIES))
def test_representation_is_the_lm_head_input_per_real_token(worlds, family):
    folder, batch = worlds[family]
    bb = FAMILIES[family](["a"], str(folder), {"a": str(folder)})
    model = load_causal_lm(str(folder), "float32", bb.attn_implementation)
    z = bb.represent(model, batch)
    assert z.shape == (int(batch["attention_mask"].sum()), model.config.hidden_size)
    # independent reference: the lm_head input that the model's own forward computes
    seen = []
    site, where = bb.representation_site(model)
    assert site is model.lm_head and where == "input"
    h = site.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach()))
    with torch.no_grad():
        model(**batch)
    h.remove()
    want = seen[0][batch["attention_mask"].bool()].float()
    torch.testing.assert_close(z, want, rtol=1e-4, atol=1e-5)
    # the streamed forward of the same checkpoint on disk gives the same representation
    lazy = LazyCausalLM(folder, "float32", bb.attn_implementation)
    torch.testing.assert_close(bb.represent(lazy, batch), z, rtol=1e-4, atol=1e-5)
    assert bb.device_of(lazy) == torch.device("cpu")
    with pytest.raises(ValueError, match="on disk"):
        bb.representation_site(lazy)


def test_surgery_with_the_merged_model_on_disk_is_rejected_before_loading():
    from hydra import compose, initialize_config_dir

    from featcal.config import validate
    from featcal.errors import ConfigError
    from featcal.run import CONF_DIR

    for calibration in ("surgery", "probsurgery"):
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose(config_name="config", overrides=["backbone=mergebench_llama32_3b", f"calibration={calibration}",
                                                           "+backbone.adapter.merged_on_disk=true", "logger=none"])
        with pytest.raises(ConfigError, match="merged_on_disk=true keeps on disk"):
            validate(cfg)
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            validate(compose(config_name="config", overrides=["backbone=mergebench_llama32_3b", f"calibration={calibration}", "logger=none"]))
