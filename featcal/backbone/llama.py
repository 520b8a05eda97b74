"""Decoder-only LLMs (transformers ``LlamaForCausalLM`` and look-alikes).

Blocks: ``model.model.layers`` (each: RMSNorm → q/k/v/o attention, RMSNorm →
gate/up/down MLP). First-block inputs: token embeddings, with the rotary position
embeddings and the causal (+ padding) attention mask carried in ``BlockState.extras``
so every block gets exactly what ``LlamaModel.forward`` would pass it.

Final representation (``readout``): the final RMSNorm of the last hidden states, then
**mean-pooled over the real (non-padding) tokens** → [B, D]. This is a generic
sentence-level feature for drift measurements and representation-level calibrators;
generative evaluation (harnesses) uses the calibrated ``model`` itself.

Token masks: ``token_mask`` = the attention mask (padding weight 0 for FeatCal's
statistics), ``readout_mask`` = every real token (each one feeds the LM head), so the
last-block token weighting of FeatCal leaves all real tokens at weight 1.

Embeddings and the LM head are not part of task vectors (``merge_excluded``), as in
MergeBench-style LLM merging; they keep the base value.

Inputs are dicts ``{"input_ids": [B, N], "attention_mask": [B, N]}`` (attention_mask
optional).
"""
from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from featcal.backbone.base import Backbone, BlockState, Inputs
from featcal.errors import CheckpointMismatch, loading
from featcal.hub import SourceUnavailable, resolve_model_dir
from featcal.utils import as_torch_dtype

_LLM_FILES = ["*.json", "*.safetensors", "pytorch_model*.bin", "*.model", "*.txt", "*.tiktoken"]

def _first_line(err: BaseException, limit: int = 200) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _bad_weights_file(folder: Path) -> Path | None:
    """The first ``*.safetensors`` file in ``folder`` whose header cannot be read."""
    from safetensors import safe_open

    for f in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt"):
                pass
        except Exception:
            return f
    return None


def _llm_load_error(source: str, folder: Path, err: BaseException) -> SourceUnavailable:
    """The project's error for a failed ``from_pretrained`` of a causal LM."""
    text = str(err)
    name = type(err).__name__
    if "Unrecognized configuration class" in text or "Unrecognized model" in text:
        try:
            data = json.loads((folder / "config.json").read_text())
        except (OSError, ValueError):
            data = {}
        mt = data.get("model_type")
        if mt is None:
            return CheckpointMismatch(
                f"config.json of '{source}' has no model_type, so its architecture is unknown",
                "Save the checkpoint with save_pretrained (which writes model_type) or add it to config.json.",
            )
        return CheckpointMismatch(
            f"'{source}' is a '{mt}' checkpoint, which is not a causal language model (AutoModelForCausalLM cannot load it)",
            "Point the LLM backbone at a decoder-only causal LM (Llama, Mistral, Qwen2, ...).",
        )
    if "safetensor" in name.lower() or "safetensor" in text.lower() or "deserializ" in text.lower():
        bad = _bad_weights_file(folder)
        where = f"weights file '{bad}'" if bad else f"a weights file in '{folder}'"
        return SourceUnavailable(
            f"{where} of model '{source}' cannot be read: it is truncated or corrupt ({name})",
            "Delete it and download or save the checkpoint again (an interrupted download or copy leaves a short file).",
        )
    if "mismatched_sizes" in text or "size mismatch" in text:
        return CheckpointMismatch(
            f"the weights of '{source}' do not fit the architecture in its config.json (tensor shapes differ)",
            "The weights and config.json come from different models; save or download them together.",
        )
    if isinstance(err, OSError) and ("does not appear to have" in text or "no file named" in text):
        return SourceUnavailable(
            f"model folder '{folder}' of '{source}' holds no weights (*.safetensors or pytorch_model*.bin)",
            "Point the config at the folder holding the checkpoint's weights and config.json.",
        )
    return SourceUnavailable(
        f"could not load causal LM '{source}' ({name}: {_first_line(err)})",
        "Check that the folder holds a complete transformers checkpoint (config.json, weights, tokenizer).",
    )


def load_causal_lm(source: str, dtype: str | torch.dtype = "float32", attn_implementation: str | None = "sdpa") -> nn.Module:
    """A causal LM from a hub id or a local folder (eval mode, on CPU).

    A missing or unreadable checkpoint raises ``SourceUnavailable`` (with the offline
    hint for hub ids); one of another architecture, or whose weights do not cover the
    model, raises ``CheckpointMismatch``. The library's exception is chained.
    """
    from transformers import AutoModelForCausalLM

    folder = resolve_model_dir(source, allow_patterns=_LLM_FILES)
    if not (folder / "config.json").exists():
        raise SourceUnavailable(
            f"no config.json in model folder '{folder}'" + (f" for '{source}'" if str(source) != str(folder) else ""),
            "A transformers checkpoint folder holds config.json next to its weights (save it with save_pretrained).",
        )
    kwargs = {"dtype": as_torch_dtype(dtype), "output_loading_info": True}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        try:
            model, info = AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)
        except TypeError:  # transformers 4.x spells it torch_dtype
            kwargs["torch_dtype"] = kwargs.pop("dtype")
            model, info = AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)
    except Exception as err:  # OSError, ValueError (bad config), safetensors errors, ...
        raise _llm_load_error(str(source), folder, err) from err
    missing = sorted(info.get("missing_keys") or [])
    if getattr(model.config, "tie_word_embeddings", False):
        missing = [k for k in missing if not k.startswith("lm_head")]
    mismatched = list(info.get("mismatched_keys") or [])
    if missing or mismatched:
        detail = f"missing {missing[:4]}{' ...' if len(missing) > 4 else ''}" if missing else f"mismatched {mismatched[:4]}"
        raise CheckpointMismatch(
            f"the weights of '{source}' do not cover the model its config.json describes ({detail})",
            "The weights and config.json come from different models (e.g. num_hidden_layers); save or download them together.",
        )
    return model.eval()


def _causal_mask(model: nn.Module, inputs_embeds: torch.Tensor, attention_mask, position_ids):
    """The 4D (or None = plain causal) mask ``LlamaModel.forward`` would build."""
    from transformers.masking_utils import create_causal_mask

    params = inspect.signature(create_causal_mask).parameters
    # transformers 5.x: inputs_embeds / cache; 4.4x-4.5x: input_embeds / past_key_values
    kwargs = {
        "config": model.config,
        ("inputs_embeds" if "inputs_embeds" in params else "input_embeds"): inputs_embeds,
        "attention_mask": attention_mask,
        ("cache" if "cache" in params else "past_key_values"): None,
    }
    if "position_ids" in params:
        kwargs["position_ids"] = position_ids
    if "cache_position" in params:  # transformers 4.x
        kwargs["cache_position"] = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device)
    return create_causal_mask(**kwargs)


class LlamaBackbone(Backbone):
    """Adapter for decoder-only transformers LLMs (Llama, Mistral, Qwen2-style layouts).

    Args:
        tasks: task names, one expert per task.
        base: hub id or local folder of θ₀.
        experts: hub ids / folders, a mapping task → source or a list aligned with tasks.
        dtype: model dtype (``bfloat16`` for real LLMs; FeatCal statistics stay float32).
        attn_implementation: passed to ``from_pretrained`` (``sdpa`` or ``eager``).
    """

    key_value_patterns = ("k_proj", "v_proj")

    def __init__(
        self,
        tasks: list[str],
        base: str,
        experts: Mapping[str, str] | list[str],
        dtype: str = "float32",
        attn_implementation: str | None = "sdpa",
    ):
        super().__init__(tasks)
        self.base_source = str(base)
        if isinstance(experts, Mapping):
            self.expert_sources = {t: str(experts[t]) for t in self.tasks}
        else:
            self.expert_sources = {t: str(e) for t, e in zip(self.tasks, experts)}
        self.dtype = dtype
        self.attn_implementation = attn_implementation

    # ---- loading -------------------------------------------------------
    def load_base(self) -> nn.Module:
        with loading("the base model, set by backbone.adapter.base"):
            return load_causal_lm(self.base_source, self.dtype, self.attn_implementation)

    def load_expert(self, task: str) -> nn.Module:
        with loading(f"the expert of task '{task}', set by backbone.adapter.experts.{task}"):
            return load_causal_lm(self.expert_sources[task], self.dtype, self.attn_implementation)

    def load_tokenizer(self):
        from transformers import AutoTokenizer

        with loading("the tokenizer of the base model, set by backbone.adapter.base"):
            folder = resolve_model_dir(self.base_source, allow_patterns=_LLM_FILES)
            try:
                return AutoTokenizer.from_pretrained(str(folder))
            except Exception as err:
                raise SourceUnavailable(
                    f"no usable tokenizer in '{self.base_source}' ({type(err).__name__})",
                    "The base model's folder must hold its tokenizer files (tokenizer.json or tokenizer.model "
                    "with tokenizer_config.json).",
                ) from err

    def merge_excluded(self, key: str) -> bool:
        """Embeddings and the LM head are not part of LLM task vectors."""
        return "embed_tokens" in key or key.startswith("lm_head") or ".lm_head." in key

    # ---- structure -----------------------------------------------------
    def blocks(self, model: nn.Module) -> list[nn.Module]:
        return list(model.model.layers)

    # ---- forward -------------------------------------------------------
    def embed(self, model: nn.Module, inputs: Inputs) -> BlockState:
        if isinstance(inputs, Mapping):
            input_ids = inputs["input_ids"]
            attention_mask = inputs.get("attention_mask")
        else:
            input_ids, attention_mask = inputs, None
        inner = model.model
        hidden = inner.embed_tokens(input_ids)
        b, n = input_ids.shape
        position_ids = torch.arange(n, device=hidden.device).unsqueeze(0)
        if attention_mask is None:
            attention_mask = torch.ones(b, n, dtype=torch.long, device=hidden.device)
        mask = _causal_mask(model, hidden, attention_mask, position_ids)
        position_embeddings = inner.rotary_emb(hidden, position_ids=position_ids)
        token_mask = attention_mask.to(torch.float32)
        extras = {
            "attention_mask": mask,
            "position_ids": position_ids,
            "position_embeddings": position_embeddings,
        }
        return BlockState(hidden, token_mask, token_mask > 0, extras)

    def run_block(self, block: nn.Module, state: BlockState) -> BlockState:
        out = block(state.hidden, **state.extras)
        if isinstance(out, tuple):  # transformers 4.x layers return tuples
            out = out[0]
        return state.with_hidden(out)

    def readout(self, model: nn.Module, state: BlockState) -> torch.Tensor:
        """Final RMSNorm, then the mean over real tokens: [B, D]."""
        h = model.model.norm(state.hidden).float()
        w = state.token_mask.to(h.device, torch.float32).unsqueeze(-1)
        return (h * w).sum(1) / w.sum(1).clamp_min(1.0)
