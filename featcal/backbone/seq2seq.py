"""Encoder–decoder targets and generation (T5 and other seq2seq models): greedy answers,
labels cut at the first eos, teacher-forced decoder inputs. The T5 adapter attaches these
to its calibration batches; the text-to-text pools generate their answers with them."""
from __future__ import annotations

import torch
from torch import nn

IGNORE = -100  # label padding (positions that are not target tokens)


def labels_from_generated(generated: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """Greedy answers [B, L] (without the decoder start token) → labels: every token up
    to and including the first eos; positions after it are ``IGNORE``. A row without
    eos (answer cut at the length limit) keeps all its tokens."""
    is_eos = generated == eos_token_id
    seen_before = (is_eos.long().cumsum(1) - is_eos.long()) > 0  # an eos earlier in the row
    return generated.masked_fill(seen_before, IGNORE)


def decoder_inputs_from_labels(labels: torch.Tensor, start_token_id: int, pad_token_id: int) -> dict[str, torch.Tensor]:
    """Teacher forcing on ``labels`` [B, L] (``IGNORE`` = no target): decoder inputs
    shifted right behind the start token, and the mask of positions that predict a
    target token (trailing all-ignored columns dropped)."""
    mask = labels != IGNORE
    keep = int(mask.any(0).nonzero().max()) + 1 if bool(mask.any()) else 1
    labels, mask = labels[:, :keep], mask[:, :keep]
    ids = labels.masked_fill(~mask, pad_token_id)
    dec = torch.full_like(ids, pad_token_id)
    dec[:, 0] = start_token_id
    dec[:, 1:] = ids[:, :-1]
    return {"decoder_input_ids": dec, "decoder_attention_mask": mask.long()}


@torch.no_grad()
def greedy_generate(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int = 10) -> torch.Tensor:
    """Greedy answers [B, ≤ max_new_tokens] (decoder start token removed; finished rows
    padded with the pad token), computed on the model's device."""
    from transformers import GenerationConfig

    cfg = model.config
    gen_cfg = GenerationConfig(
        max_new_tokens=int(max_new_tokens),
        do_sample=False,
        num_beams=1,
        decoder_start_token_id=cfg.decoder_start_token_id,
        pad_token_id=cfg.pad_token_id,
        eos_token_id=cfg.eos_token_id,
    )
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=gen_cfg)
    return out[:, 1:]
