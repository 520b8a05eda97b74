"""The backbone adapter interface: the only place that knows model internals.

A backbone adapter loads a model family (base + experts, from hub ids or local
folders), names the ordered calibratable blocks, produces first-block inputs,
forwards one block, and maps the last block's output to the final
representation that task heads (or Surgery modules) consume.

Calibrators talk to models only through this interface, so the same FeatCal
driver walks a CLIP vision tower, a T5 encoder or a Llama decoder stack.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import nn

Inputs = Any  # a tensor or a mapping of tensors: whatever ``Backbone.embed`` accepts


def move_inputs(inputs: Inputs, device: torch.device | str) -> Inputs:
    """Move a tensor, or a mapping/sequence of tensors, to ``device``."""
    if isinstance(inputs, torch.Tensor):
        return inputs.to(device, non_blocking=True)
    if isinstance(inputs, Mapping):
        return {k: move_inputs(v, device) for k, v in inputs.items()}
    if isinstance(inputs, (list, tuple)):
        return type(inputs)(move_inputs(v, device) for v in inputs)
    return inputs


def batch_size_of(inputs: Inputs) -> int:
    if isinstance(inputs, torch.Tensor):
        return inputs.shape[0]
    if isinstance(inputs, Mapping):
        return batch_size_of(next(iter(inputs.values())))
    raise TypeError(f"cannot infer batch size of {type(inputs)}")


@dataclass
class BlockState:
    """Everything a block needs besides its weights, for one batch.

    hidden:       [B, N, D] hidden states entering the next block.
    token_mask:   [B, N] float, 1 for real tokens and 0 for padding.
    readout_mask: [B, N] bool, the tokens that reach the final representation
                  (CLIP: the class token; a decoder LLM: every real token).
    extras:       block keyword arguments that do not change from block to
                  block (attention masks, rotary embeddings, ...).
    """

    hidden: torch.Tensor
    token_mask: torch.Tensor
    readout_mask: torch.Tensor
    extras: dict[str, Any] = field(default_factory=dict)

    def with_hidden(self, hidden: torch.Tensor) -> "BlockState":
        return BlockState(hidden, self.token_mask, self.readout_mask, self.extras)

    def take(self, k: int) -> "BlockState":
        """The first ``k`` examples of the batch (views). Tensors in ``extras`` whose first
        dimension is the batch size are cut too; broadcast ones (batch dim 1) are kept.
        The batch size is the token mask's: ``hidden`` may already hold only the first ``k``
        (the streamed FeatCal's drift chain stores cut hidden states)."""
        b = max(self.hidden.shape[0], self.token_mask.shape[0])
        if k >= b:
            return self

        def cut(v: Any) -> Any:
            if isinstance(v, torch.Tensor):
                return v[:k] if v.dim() > 0 and v.shape[0] == b else v
            if isinstance(v, (tuple, list)):
                return type(v)(cut(x) for x in v)
            if isinstance(v, Mapping):
                return {key: cut(x) for key, x in v.items()}
            return v

        return BlockState(self.hidden[:k], self.token_mask[:k], self.readout_mask[:k], cut(self.extras))

    def to(self, device: torch.device | str) -> "BlockState":
        return BlockState(
            self.hidden.to(device),
            self.token_mask.to(device),
            self.readout_mask.to(device),
            move_inputs(self.extras, device),
        )


class _NoJoin(Exception):
    pass


def _join_values(values: list[Any], sizes: list[int]) -> Any:
    """Join one extras entry across states: per-example tensors (first dim = that state's
    batch size) are concatenated, shared ones (same value in every state) are kept once."""
    first = values[0]
    if isinstance(first, torch.Tensor):
        if not all(isinstance(v, torch.Tensor) for v in values):
            raise _NoJoin
        if all(v.dim() > 0 and v.shape[0] == b and v.shape[1:] == first.shape[1:] for v, b in zip(values, sizes)):
            return torch.cat(values, 0)
        if all(v is first or (v.shape == first.shape and torch.equal(v, first)) for v in values):
            return first
        raise _NoJoin
    if isinstance(first, (tuple, list)):
        if not all(isinstance(v, type(first)) and len(v) == len(first) for v in values):
            raise _NoJoin
        parts = [_join_values(list(items), sizes) for items in zip(*values)]
        return type(first)(*parts) if hasattr(first, "_fields") else type(first)(parts)
    if isinstance(first, Mapping):
        if not all(isinstance(v, Mapping) and v.keys() == first.keys() for v in values):
            raise _NoJoin
        return {k: _join_values([v[k] for v in values], sizes) for k in first}
    if all(v is first or v == first for v in values):
        return first
    raise _NoJoin


def join_states(states: list[BlockState]) -> BlockState | None:
    """One state holding the examples of ``states`` in order, or None if they cannot be
    joined (different token counts or hidden widths, or extras that are neither
    per-example nor shared). Lets a block run on larger batches than the data loader's."""
    if len(states) == 1:
        return states[0]
    first = states[0]
    if any(s.hidden.shape[1:] != first.hidden.shape[1:] or s.hidden.dtype != first.hidden.dtype for s in states):
        return None
    sizes = [int(s.hidden.shape[0]) for s in states]
    try:
        extras = _join_values([s.extras for s in states], sizes)
    except _NoJoin:
        return None
    return BlockState(
        torch.cat([s.hidden for s in states], 0),
        torch.cat([s.token_mask for s in states], 0),
        torch.cat([s.readout_mask for s in states], 0),
        extras,
    )


def is_norm(module: nn.Module) -> bool:
    """LayerNorm (weight + bias) or an RMSNorm-style scale-only norm."""
    if isinstance(module, nn.LayerNorm):
        return True
    name = type(module).__name__.lower()
    return ("rmsnorm" in name or "layernorm" in name) and hasattr(module, "weight")


def is_rms_norm(module: nn.Module) -> bool:
    """A scale-only norm: y = γ · x / rms(x) (T5, Llama)."""
    return is_norm(module) and not isinstance(module, nn.LayerNorm) and getattr(module, "bias", None) is None


class Backbone(abc.ABC):
    """A model-family adapter.

    Subclasses are instantiated from ``conf/model/*.yaml`` (at ``backbone.adapter`` of a
    ``conf/backbone`` preset); ``tasks`` is the ordered list of task names, one expert per task.
    """

    #: name patterns (substrings of the module's qualified name inside a block)
    #: of key/value projections: FeatCal's last-block token weighting leaves them
    #: at uniform weight.
    key_value_patterns: tuple[str, ...] = ("k_proj", "v_proj")

    def __init__(self, tasks: list[str]):
        self.tasks = list(tasks)

    @classmethod
    def validate_config(cls, node: dict[str, Any]) -> list[str]:
        """Problems with this adapter's config node (``key=value: what is allowed``),
        found before anything loads; ``featcal.config.validate`` collects them."""
        return []

    # ---- loading -------------------------------------------------------
    @abc.abstractmethod
    def load_base(self) -> nn.Module:
        """The pretrained model θ₀ (eval mode, on CPU)."""

    @abc.abstractmethod
    def load_expert(self, task: str) -> nn.Module:
        """Expert θ_t fine-tuned from θ₀ on ``task`` (eval mode, on CPU)."""

    def load_experts(self) -> list[nn.Module]:
        return [self.load_expert(t) for t in self.tasks]

    def merge_excluded(self, key: str) -> bool:
        """State-dict keys that are not part of task vectors (kept at base value)."""
        return False

    def with_state_dict(self, template: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> nn.Module:
        """A deep copy of ``template`` carrying ``state_dict``."""
        import copy

        model = copy.deepcopy(template)
        model.load_state_dict(dict(state_dict), strict=True)
        return model.eval()

    # ---- storage (the model layer's business alone) ----------------------
    def is_on_disk(self, model: Any) -> bool:
        """True when ``model`` is a handle on weights kept on disk (read block by block),
        not a loaded ``nn.Module``. Default: every model is loaded."""
        return False

    def materialize(self, model: Any) -> nn.Module:
        """A loaded module for ``model`` (the model itself when it is already loaded)."""
        return model

    def block_source(self, model: Any):
        """Block-by-block access to ``model``, loaded or on disk (``acquire`` / ``release``)."""
        from featcal.io.lazy import BlockSource

        return BlockSource(self, model)

    def module_names(self, model: Any) -> dict[int, str]:
        """``id(module) -> qualified name`` for every module of ``model`` (for a model on disk:
        of the module objects its blocks are loaded into)."""
        return {id(m): n for n, m in model.named_modules()}

    def block_writer(self, model: Any, output_dir: Any = None) -> Any:
        """For a model on disk: a writer of its calibrated blocks into a new checkpoint folder
        (``write_block(index, block)``, then ``finish() -> folder``). Families without on-disk
        models raise."""
        raise NotImplementedError(f"{type(self).__name__} keeps no models on disk")

    def open_saved(self, folder: Any, like: Any) -> Any:
        """A handle on a model saved in ``folder`` by a streamed calibrator, with the storage
        settings (dtype, attention) of ``like``. Families without on-disk models raise."""
        raise NotImplementedError(f"{type(self).__name__} keeps no models on disk")

    def saved_folder(self, model: Any) -> Any:
        """The folder holding the weights of a model kept on disk (``is_on_disk``)."""
        raise NotImplementedError(f"{type(self).__name__} keeps no models on disk")

    #: streamed merges of models kept on disk (``featcal.merge.streaming.merge_on_disk``): the
    #: merged folder (None: a cache folder named by the merge and its inputs), where the
    #: per-tensor arithmetic runs, and whether the merged model stays on disk too
    merge_dir: str | None = None
    merge_device: str = "cpu"
    merged_on_disk: bool = False

    def disk_identity(self, model: Any) -> tuple[Any, str]:
        """For a model on disk (``is_on_disk``): ``(folder, settings)``, its checkpoint folder
        and the settings it is read with (dtype, attention); what a cache of its scores is
        keyed by (``featcal.refcache``). Families without on-disk models raise."""
        raise NotImplementedError(f"{type(self).__name__} keeps no models on disk")

    # ---- structure -----------------------------------------------------
    @abc.abstractmethod
    def blocks(self, model: nn.Module) -> list[nn.Module]:
        """The ordered calibratable blocks of ``model`` (references, not copies)."""

    def calibratable_modules(self, block: nn.Module) -> dict[str, nn.Module]:
        """Every Linear and every norm inside a block, by qualified name, in order."""
        out: dict[str, nn.Module] = {}
        for name, mod in block.named_modules():
            if isinstance(mod, nn.Linear) or is_norm(mod):
                out[name] = mod
        return out

    def norm_scale_offset(self, module: nn.Module) -> float:
        """A norm's effective scale is ``weight + offset`` (0 for LayerNorm/Llama RMSNorm,
        1 for Gemma's RMSNorm, which scales by 1 + weight). FeatCal solves for the
        effective scale and writes it back minus the offset."""
        return 0.0

    def is_key_value(self, module_name: str) -> bool:
        leaf = module_name.rsplit(".", 1)[-1]
        return any(p == leaf or p in leaf for p in self.key_value_patterns)

    def module_masks(self, module_name: str, state: BlockState) -> tuple[torch.Tensor, torch.Tensor]:
        """(token mask, readout mask) over the rows that module ``module_name`` of a block
        reads on ``state``. Default: the block's own tokens. A module that reads another
        sequence (a decoder's cross-attention key/value projections read the encoder
        output) gets that sequence's masks."""
        return state.token_mask, state.readout_mask

    # ---- forward -------------------------------------------------------
    @abc.abstractmethod
    def embed(self, model: nn.Module, inputs: Inputs) -> BlockState:
        """Inputs of the first block (embeddings, pre-norms, masks...)."""

    @abc.abstractmethod
    def run_block(self, block: nn.Module, state: BlockState) -> BlockState:
        """Forward one block of this family on ``state``; returns the next state."""

    @abc.abstractmethod
    def readout(self, model: nn.Module, state: BlockState) -> torch.Tensor:
        """Final representation [B, D] from the last block's output state."""

    def represent(self, model: nn.Module, inputs: Inputs) -> torch.Tensor:
        """The final representation of ``inputs`` (e.g. CLIP's projected image embedding)."""
        state = self.embed(model, inputs)
        for block in self.blocks(model):
            state = self.run_block(block, state)
        return self.readout(model, state)

    def device_of(self, model: nn.Module) -> torch.device:
        return next(model.parameters()).device

    # ---- the run's hooks -------------------------------------------------
    def representation_site(self, model: nn.Module) -> tuple[nn.Module, str]:
        """``(module, "output" | "input")``: the module of ``model`` whose output (or first
        input) is the final representation (what ``represent`` returns, what Surgery-style
        calibrators correct with a forward hook). CLIP: ``visual_projection``, output."""
        raise NotImplementedError(f"{type(self).__name__} does not name a representation site")

    def prepare_calibration(
        self,
        merged: nn.Module,
        base: nn.Module,
        experts: list[nn.Module],
        calib: list[list[Inputs]],
        device: torch.device | str,
    ) -> list[list[Inputs]]:
        """Family-specific additions to the calibration batches before calibrating (e.g.
        decoder targets from each expert's answers); the default returns them unchanged."""
        return calib

    def merge(self, merge_fn: Callable[..., Any], base: nn.Module, experts: list[nn.Module], **data: Any) -> nn.Module:
        """The merged model. Default: in-memory state-dict arithmetic,
        ``merge_fn(base_sd, expert_sds, exclude=self.merge_excluded, **data)`` loaded into a
        copy of ``base``. ``data`` carries calibration data and models for merge functions
        with ``needs_calibration_data = True`` (RegMean, AdaMerging). Streaming merges
        (models that do not fit in memory several times) override this."""
        merged_sd = merge_fn(base.state_dict(), [e.state_dict() for e in experts], exclude=self.merge_excluded, **data)
        return self.with_state_dict(base, merged_sd)
