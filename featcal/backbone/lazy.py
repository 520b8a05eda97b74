"""Models that stay on disk: a transformers checkpoint folder read block by block.

``LazyCausalLM`` is what an LLM backbone hands out in streaming mode instead of a loaded
model: a safetensors folder plus its config. It never holds more than what is asked of it:

- ``skeleton()``: the full architecture on the ``meta`` device (no memory), used only to
  know the module tree (which state-dict prefix block l has: family-agnostic, through
  ``backbone.blocks``);
- ``shell()``: the model with **zero** blocks and its non-block weights (embeddings,
  final norm, rotary tables, LM head) loaded: what ``backbone.embed`` / ``readout`` need;
- ``load_block(backbone, l, device)``: block l as a real module on ``device`` with its
  weights read from the shards (positioned reads: only that block's tensors are read,
  nothing stays mapped).

``BlockSource`` gives the streamed FeatCal one interface over both kinds of model: an
in-memory ``nn.Module`` (block l moved to the device and back) or a ``LazyCausalLM``
(block l loaded, then dropped).
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from featcal.utils import as_torch_dtype


class LazyCausalLM:
    """A causal LM checkpoint folder (safetensors) read block by block; see the module doc."""

    def __init__(self, folder: str | os.PathLike, dtype: str | torch.dtype = "float32", attn_implementation: str | None = None, name: str | None = None):
        from transformers import AutoConfig

        from featcal.merge.streaming import CheckpointReader

        self.folder = Path(folder)
        self.name = name or str(folder)
        self.dtype = as_torch_dtype(dtype)
        self.attn_implementation = attn_implementation
        self.config = AutoConfig.from_pretrained(str(self.folder))
        if attn_implementation:
            self.config._attn_implementation = attn_implementation
        self.reader = CheckpointReader(self.folder)
        self._skeleton: nn.Module | None = None

    def __repr__(self) -> str:
        return f"LazyCausalLM({self.name!r})"

    # ---- structure ------------------------------------------------------------
    def skeleton(self) -> nn.Module:
        if self._skeleton is None:
            from transformers import AutoModelForCausalLM

            with torch.device("meta"):
                self._skeleton = AutoModelForCausalLM.from_config(self.config, dtype=self.dtype).eval()
        return self._skeleton

    def block_prefixes(self, backbone) -> list[str]:
        sk = self.skeleton()
        names = {id(m): n for n, m in sk.named_modules()}
        return [names[id(b)] + "." for b in backbone.blocks(sk)]

    def num_blocks(self, backbone) -> int:
        return len(backbone.blocks(self.skeleton()))

    def load_block(self, backbone, index: int, device: torch.device | str = "cpu") -> nn.Module:
        """Block ``index`` with its weights from the checkpoint, on ``device``."""
        prefix = self.block_prefixes(backbone)[index]
        block = copy.deepcopy(backbone.blocks(self.skeleton())[index])
        block.to_empty(device=device)
        sd = {k: v.to(device=device, dtype=self.dtype if v.is_floating_point() else v.dtype) for k, v in self.reader.state_dict(prefix).items()}
        missing, unexpected = block.load_state_dict(sd, strict=False)
        persistent_missing = [m for m in missing if m in dict(block.named_parameters())]
        if persistent_missing or unexpected:
            raise ValueError(f"{self.name}: block {index} ({prefix}) does not match its checkpoint: missing {persistent_missing}, unexpected {unexpected}")
        return block.eval()

    def shell(self) -> nn.Module:
        """The model without blocks, non-block weights loaded (eval mode, CPU)."""
        from transformers import AutoModelForCausalLM

        cfg = copy.deepcopy(self.config)
        prefixes = self.block_prefixes_from_config()
        cfg.num_hidden_layers = 0
        if getattr(cfg, "layer_types", None) is not None:
            cfg.layer_types = []
        model = AutoModelForCausalLM.from_config(cfg, dtype=self.dtype).eval()
        sd = {k: self.reader.get(k) for k in self.reader.keys() if not k.startswith(prefixes)}  # blocks never read
        missing, unexpected = model.load_state_dict(sd, strict=False)
        tied = getattr(model, "_tied_weights_keys", None) or {}
        tied = set(tied) if not isinstance(tied, dict) else set(tied.keys())
        if [m for m in missing if m not in tied] or unexpected:
            raise ValueError(f"{self.name}: non-block weights do not match the checkpoint: missing {missing}, unexpected {unexpected}")
        if hasattr(model, "tie_weights"):
            model.tie_weights()
        return model

    def block_prefixes_from_config(self) -> tuple[str, ...]:
        """State-dict prefixes of every block (keys containing ``.layers.<i>.``)."""
        import re

        out = set()
        for k in self.reader.keys():
            m = re.match(r"^(.*?\.layers\.\d+\.)", k)
            if m:
                out.add(m.group(1))
        return tuple(sorted(out))

    def to(self, *args, **kwargs) -> "LazyCausalLM":
        """Model-like ``.to``: a dtype changes the dtype blocks are loaded in; devices are
        ignored (blocks go where the caller loads them)."""
        for a in (*args, *kwargs.values()):
            if isinstance(a, torch.dtype):
                self.dtype = a
                self._skeleton = None
        return self

    def eval(self) -> "LazyCausalLM":
        return self

    def materialize(self) -> nn.Module:
        """The whole model in memory (eval mode, CPU)."""
        from featcal.backbone.llama import load_causal_lm

        return load_causal_lm(str(self.folder), self.dtype, self.attn_implementation)


def is_lazy(model: Any) -> bool:
    return isinstance(model, LazyCausalLM)


class BlockSource:
    """Block-by-block access to one model, in memory or on disk (see the module doc)."""

    def __init__(self, backbone, model: nn.Module | LazyCausalLM):
        self.backbone = backbone
        self.model = model
        self.lazy = is_lazy(model)
        self._home: dict[int, torch.device] = {}

    def __len__(self) -> int:
        if self.lazy:
            return self.model.num_blocks(self.backbone)
        return len(self.backbone.blocks(self.model))

    def embedder(self) -> nn.Module:
        """A model ``backbone.embed`` accepts (the shell for a lazy model)."""
        return self.model.shell() if self.lazy else self.model

    def acquire(self, index: int, device: torch.device) -> nn.Module:
        if self.lazy:
            return self.model.load_block(self.backbone, index, device)
        blk = self.backbone.blocks(self.model)[index]
        self._home[index] = self.backbone.device_of(blk)
        return blk.to(device)

    def release(self, index: int, block: nn.Module) -> None:
        if self.lazy:
            block.to("meta")  # frees the storage
            return
        block.to(self._home.pop(index, torch.device("cpu")))
