"""Gemma-2 decoders (transformers ``Gemma2ForCausalLM``).

Differences from Llama that the adapter handles:

- **Four RMSNorms per block** (``input_layernorm``, ``post_attention_layernorm``,
  ``pre_feedforward_layernorm``, ``post_feedforward_layernorm``): all are calibratable
  modules (found by ``calibratable_modules`` like every norm).
- **Scale 1 + weight.** ``Gemma2RMSNorm`` multiplies by ``1 + weight``;
  ``norm_scale_offset`` = 1 makes FeatCal solve for the effective scale g = 1 + w (the
  experts' and anchor targets in g-space, z normalised with unit effective scale) and
  write back w = g − 1.
- **Sliding-window layers and attention logit soft-capping.** Each block is the model's
  own ``Gemma2DecoderLayer`` called with the mask of its layer type: ``embed`` builds
  both masks exactly as ``Gemma2Model.forward`` does (``create_causal_mask`` and
  ``create_sliding_window_causal_mask``) and ``run_block`` picks the one named by
  ``config.layer_types[layer_idx]``; soft-capping lives inside the attention module.
- **Scaled embeddings** (× √hidden) come from the model's own ``embed_tokens``; the
  final logit soft-capping is in ``Gemma2ForCausalLM.forward`` (generation/evaluation
  use the model itself); ``readout`` is the final norm's mean over real tokens.
- Gemma-2 ties ``lm_head`` to the token embeddings; both stay out of task vectors.
"""
from __future__ import annotations

import inspect

import torch
from torch import nn

from featcal.backbone.base import BlockState
from featcal.backbone.llama import LlamaBackbone


def _masks(model: nn.Module, inputs_embeds: torch.Tensor, attention_mask, position_ids) -> dict:
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    kwargs = dict(config=model.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask)
    out = {}
    for name, fn in (("full_attention", create_causal_mask), ("sliding_attention", create_sliding_window_causal_mask)):
        params = inspect.signature(fn).parameters
        kw = dict(kwargs)
        if "cache" in params:
            kw["cache"] = None
        elif "past_key_values" in params:
            kw["past_key_values"] = None
        if "position_ids" in params:
            kw["position_ids"] = position_ids
        if "cache_position" in params:  # transformers 4.x
            kw["cache_position"] = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device)
        out[name] = fn(**kw)
    return out


def is_gemma_norm(module: nn.Module) -> bool:
    return type(module).__name__ in ("Gemma2RMSNorm", "GemmaRMSNorm", "Gemma3RMSNorm")


class Gemma2Backbone(LlamaBackbone):
    """Adapter for Gemma-2 decoders (same arguments as ``LlamaBackbone``; default
    ``attn_implementation="eager"``: soft-capping is not supported by sdpa)."""

    def __init__(self, *args, attn_implementation: str | None = "eager", **kwargs):
        super().__init__(*args, attn_implementation=attn_implementation, **kwargs)

    def norm_scale_offset(self, module: nn.Module) -> float:
        return 1.0 if is_gemma_norm(module) else 0.0

    def mask_extras(self, model: nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor) -> dict:
        """One mask per layer type (sliding-window and full attention), as Gemma2Model builds them."""
        return {"masks": _masks(model, hidden, attention_mask, position_ids)}

    def run_block(self, block: nn.Module, state: BlockState) -> BlockState:
        ex = state.extras
        attn = block.self_attn
        layer_type = getattr(attn, "layer_type", None)
        if layer_type is None:
            layer_type = "sliding_attention" if getattr(attn, "sliding_window", None) else "full_attention"
        out = block(
            state.hidden,
            attention_mask=ex["masks"][layer_type],
            position_ids=ex["position_ids"],
            position_embeddings=ex["position_embeddings"],
        )
        if isinstance(out, tuple):
            out = out[0]
        return state.with_hidden(out)
