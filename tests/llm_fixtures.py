"""Tiny decoder LLM worlds for the MergeBench tests: a Llama or Gemma-2 base built from a
small config, experts fine-tuned from it for a few steps on their own token pattern, all
saved as SHARDED safetensors (save_pretrained with a small max_shard_size) together with a
local word-level tokenizer (no network anywhere)."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

VOCAB, SEQ = 64, 12
TASKS = ["instruction", "math", "coding"]
SHARD = "40KB"


def word_tokenizer(folder: Path):
    """A local fast tokenizer: words w0..w59 plus specials, whitespace pre-tokenised."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for i in range(VOCAB - 4):
        vocab[f"w{i}"] = i + 4
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.chat_template = (
        "{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
        "{% if add_generation_prompt %}<s> assistant {% endif %}"
    )
    fast.save_pretrained(folder)
    return fast


def config(family: str, layers: int = 2):
    if family == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        )
    from transformers import Gemma2Config

    return Gemma2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
        sliding_window=4, query_pre_attn_scalar=8, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, attn_implementation="eager",
    )


def task_batch(t: int, n: int, seed: int, pad: bool = True):
    """Task t: sequences over its own 16-token slice of the vocabulary, a fixed stride."""
    gen = torch.Generator().manual_seed(seed)
    start = torch.randint(0, 16, (n, 1), generator=gen)
    ids = 4 + (16 * t + (start + (t + 1) * torch.arange(SEQ)) % 16) % (VOCAB - 4)
    mask = torch.ones(n, SEQ, dtype=torch.long)
    if pad:
        lengths = torch.randint(SEQ // 2, SEQ + 1, (n,), generator=gen)
        mask = (torch.arange(SEQ)[None] < lengths[:, None]).long()
        ids = ids.masked_fill(mask == 0, 0)
    return {"input_ids": ids, "attention_mask": mask}


def build_world(root: Path, family: str = "llama", layers: int = 2, steps: int = 15, seed: int = 0, dtype=torch.float32):
    """Base and one expert per task in ``root``; returns (base dir, {task: expert dir})."""
    from transformers import AutoModelForCausalLM

    root = Path(root)
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_config(config(family, layers)).eval()
    with torch.no_grad():  # Gemma's norms start at 0 (scale 1): give them some spread
        for n, p in base.named_parameters():
            if "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    base.save_pretrained(root / "base", max_shard_size=SHARD)
    word_tokenizer(root / "base")
    experts = {}
    for t, task in enumerate(TASKS):
        e = copy.deepcopy(base).train()
        batch = task_batch(t, 32, 300 + t, pad=False)
        params = [p for n, p in e.named_parameters() if ".layers." in n]
        opt = torch.optim.Adam(params, lr=3e-3)
        for _ in range(steps):
            loss = e(**batch, labels=batch["input_ids"]).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        e.eval()
        if dtype != torch.float32:
            e = e.to(dtype)
        e.save_pretrained(root / task, max_shard_size=SHARD)
        word_tokenizer(root / task)
        experts[task] = str(root / task)
    if dtype != torch.float32:
        base.to(dtype).save_pretrained(root / "base", max_shard_size=SHARD)
    return str(root / "base"), experts


def is_sharded(folder) -> bool:
    index = Path(folder) / "model.safetensors.index.json"
    return index.is_file() and len(set(json.loads(index.read_text())["weight_map"].values())) > 1
