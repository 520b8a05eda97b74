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
import logging
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from featcal.backbone.base import Backbone, BlockState, Inputs
from featcal.errors import SourceUnavailable, loading
from featcal.io.hub import resolve_model_dir
from featcal.io.lazy import LLM_FILES, is_lazy, lazy_causal_lm, load_causal_lm

log = logging.getLogger(__name__)


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
        experts: hub ids / folders, a mapping task → source (experts are paired with
            tasks BY NAME) or a list aligned with tasks.
        dtype: model dtype (``bfloat16`` for real LLMs; FeatCal statistics stay float32).
        attn_implementation: passed to ``from_pretrained`` (``sdpa`` or ``eager``).
        streaming: bounded-memory mode. ``load_base``/``load_expert`` return
            ``LazyCausalLM`` handles (safetensors folders read block by block); the run's
            merge (``featcal.merge.streaming.merge_models``) streams them tensor by tensor
            into ``merge_dir`` and returns the merged model loaded in memory; FeatCal then
            runs layer-streamed.
        merge_dir: where the streamed merged model is written (a normal HF folder);
            null: ``$FEATCAL_CACHE/merged/<hash of sources and merge>`` (or
            ``~/.cache/featcal/merged/...``).
        merge_device: where the streaming merge's per-tensor arithmetic runs.
        merged_on_disk: streaming mode only: the merge returns the merged model as a
            ``LazyCausalLM`` (not loaded): evaluation loads it when it runs, FeatCal reads
            it block by block and writes the calibrated model to disk. Host memory then
            stays flat in model depth (``experiments/bench_llm_memory.py``).
    """

    key_value_patterns = ("k_proj", "v_proj")

    #: config keys naming model sources (checked for availability before anything loads)
    model_source_keys = ("base", "experts")

    def __init__(
        self,
        tasks: list[str],
        base: str,
        experts: Mapping[str, str] | list[str],
        dtype: str = "float32",
        attn_implementation: str | None = "sdpa",
        streaming: bool = False,
        merge_dir: str | None = None,
        merge_device: str = "cpu",
        merged_on_disk: bool = False,
    ):
        super().__init__(tasks)
        self.base_source = str(base)
        if isinstance(experts, Mapping):
            missing = [t for t in self.tasks if t not in experts]
            if missing:
                raise ValueError(f"no expert given for task(s) {missing} (experts: {sorted(experts)})")
            self.expert_sources = {t: str(experts[t]) for t in self.tasks}
        else:
            if len(experts) != len(self.tasks):
                raise ValueError(f"{len(experts)} experts for {len(self.tasks)} tasks")
            self.expert_sources = {t: str(e) for t, e in zip(self.tasks, experts)}
        self.dtype = dtype
        self.attn_implementation = attn_implementation
        self.streaming = bool(streaming)
        self.merge_dir = merge_dir
        self.merge_device = merge_device
        self.merged_on_disk = bool(merged_on_disk)

    @classmethod
    def validate_config(cls, node: dict) -> list[str]:
        problems = []
        tasks = list(node.get("tasks") or [])
        experts = node.get("experts")
        if isinstance(experts, Mapping):
            missing = [t for t in tasks if t not in experts]
            if missing:
                problems.append(f"experts: no expert for task(s) {missing} (experts are paired with tasks by name)")
        elif experts is not None and len(experts) != len(tasks):
            problems.append(f"experts: {len(experts)} given for {len(tasks)} tasks")
        if node.get("dtype", "float32") not in ("float32", "bfloat16", "float16", "fp32", "bf16", "fp16"):
            problems.append(f"dtype={node.get('dtype')!r}: allowed: float32, bfloat16, float16")
        if node.get("merged_on_disk") and not node.get("streaming"):
            problems.append("merged_on_disk=true needs streaming=true")
        return problems

    @classmethod
    def validate_run(cls, cfg) -> list[str]:
        """Backbone x calibrator combinations that cannot work, in one sentence each."""
        adapter, target = cfg.backbone.adapter, str(cfg.calibration.get("_target_", ""))
        if adapter.get("merged_on_disk") and target.startswith("featcal.calibration.surgery."):
            return [f"calibration={target.rsplit('.', 1)[-1]} hooks the merged model's lm_head, which "
                    "backbone.adapter.merged_on_disk=true keeps on disk: set merged_on_disk=false (the merged model is loaded)"]
        return []

    # ---- loading -------------------------------------------------------
    def _lazy(self, source: str):
        return lazy_causal_lm(source, self.dtype, self.attn_implementation)

    def load_base(self) -> nn.Module:
        with loading("the base model, set by backbone.adapter.base"):
            if self.streaming:
                return self._lazy(self.base_source)
            return load_causal_lm(self.base_source, self.dtype, self.attn_implementation)

    def load_expert(self, task: str) -> nn.Module:
        with loading(f"the expert of task '{task}', set by backbone.adapter.experts.{task}"):
            if self.streaming:
                return self._lazy(self.expert_sources[task])
            return load_causal_lm(self.expert_sources[task], self.dtype, self.attn_implementation)

    # ---- storage: streaming mode keeps models on disk (``featcal.io.lazy``) ----
    def materialize(self, model) -> nn.Module:
        """A loaded model for a lazy handle (the model itself otherwise)."""
        return model.materialize() if is_lazy(model) else model

    def is_on_disk(self, model) -> bool:
        return is_lazy(model)

    def saved_folder(self, model) -> Path:
        if not is_lazy(model):
            raise ValueError(f"{type(model).__name__} is a loaded model, not one kept on disk")
        return model.folder

    def module_names(self, model) -> dict[int, str]:
        """An on-disk model names its modules through its skeleton (the architecture on ``meta``)."""
        return super().module_names(model.skeleton() if self.is_on_disk(model) else model)

    def block_writer(self, model, output_dir=None):
        from featcal.io.lazy import BlockFolderWriter

        return BlockFolderWriter(model, model.block_prefixes(self), output_dir)

    def open_saved(self, folder, like):
        return lazy_causal_lm(folder, like.dtype, like.attn_implementation, name=str(folder))

    def disk_identity(self, model) -> tuple:
        """``(folder, "dtype|attention")`` of a lazy model (``is_on_disk``; featcal.refcache keys on it)."""
        return self.saved_folder(model), f"{model.dtype}|{model.attn_implementation}"

    def merge(self, merge_fn, base, experts, **data) -> nn.Module:
        """In memory (``Backbone.merge``); models kept on disk (``streaming=true``) are merged
        tensor by tensor by the merge layer (``featcal.merge.streaming.merge_models``)."""
        if is_lazy(base) or any(is_lazy(e) for e in experts):
            raise TypeError("featcal: models kept on disk (backbone.adapter.streaming=true) are merged tensor by "
                            "tensor by featcal.merge.streaming.merge_models(merge, adapter, base, experts), "
                            "not in memory by adapter.merge")
        return super().merge(merge_fn, base, experts, **data)

    def load_tokenizer(self):
        from transformers import AutoTokenizer

        with loading("the tokenizer of the base model, set by backbone.adapter.base"):
            folder = resolve_model_dir(self.base_source, allow_patterns=LLM_FILES)
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
        position_embeddings = inner.rotary_emb(hidden, position_ids=position_ids)
        token_mask = attention_mask.to(torch.float32)
        extras = {
            **self.mask_extras(model, hidden, attention_mask, position_ids),
            "position_ids": position_ids,
            "position_embeddings": position_embeddings,
        }
        return BlockState(hidden, token_mask, token_mask > 0, extras)

    def mask_extras(self, model: nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor) -> dict:
        """The attention-mask entries of the block state (Llama: one causal mask)."""
        return {"attention_mask": _causal_mask(model, hidden, attention_mask, position_ids)}

    def run_block(self, block: nn.Module, state: BlockState) -> BlockState:
        out = block(state.hidden, **state.extras)
        if isinstance(out, tuple):  # transformers 4.x layers return tuples
            out = out[0]
        return state.with_hidden(out)

    def final_hidden(self, model: nn.Module, state: BlockState) -> torch.Tensor:
        """[B, N, D]: what ``lm_head`` reads at every position (the final norm's output)."""
        return model.model.norm(state.hidden)

    def readout(self, model: nn.Module, state: BlockState) -> torch.Tensor:
        """[M, D]: the lm_head input at every real token of the batch (row-major), as ``lm_head``
        receives it (its forward pre-hooks, e.g. a Surgery module, apply here too), float32."""
        from featcal.backbone.t5 import _through_pre_hooks

        return _through_pre_hooks(model.lm_head, self.final_hidden(model, state))[state.readout_mask].float()

    def representation_site(self, model: nn.Module) -> tuple[nn.Module, str]:
        """The final hidden state before ``lm_head``, per token (Surgery / ProbSurgery hook it)."""
        if is_lazy(model):
            raise ValueError("a model kept on disk (merged_on_disk) has no module to hook: load it first")
        return model.lm_head, "input"

    def device_of(self, model) -> torch.device:
        return torch.device("cpu") if is_lazy(model) else super().device_of(model)

    @torch.no_grad()
    def represent(self, model, inputs: Inputs) -> torch.Tensor:
        """The final representation (see ``readout``); a lazy (on-disk) model is run by a
        streamed forward: its shell embeds and reads out, each block is loaded on the inputs'
        device, run and dropped (one block in memory at a time)."""
        if not is_lazy(model):
            return super().represent(model, inputs)
        ids = inputs["input_ids"] if isinstance(inputs, Mapping) else inputs
        device = ids.device
        shell = model.shell().to(device)
        state = self.embed(shell, inputs)
        for index in range(model.num_blocks(self)):
            block = model.load_block(self, index, device)
            state = self.run_block(block, state)
            block.to("meta")
        out = self.readout(shell, state)
        del shell
        return out
