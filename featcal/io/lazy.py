"""Causal LM checkpoints: loaded whole (``load_causal_lm``) or kept on disk and read
block by block (``LazyCausalLM``, opened by ``lazy_causal_lm``).

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
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from featcal.errors import CheckpointMismatch, SourceUnavailable
from featcal.io.hub import resolve_model_dir
from featcal.io.safetensors import INDEX_NAME, CheckpointReader, ShardWriter, copy_model_files
from featcal.utils import as_torch_dtype

#: the files of a causal LM checkpoint (what a hub download fetches)
LLM_FILES = ["*.json", "*.safetensors", "pytorch_model*.bin", "*.model", "*.txt", "*.tiktoken"]


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

    folder = resolve_model_dir(source, allow_patterns=LLM_FILES)
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



class LazyCausalLM:
    """A causal LM checkpoint folder (safetensors) read block by block; see the module doc."""

    def __init__(self, folder: str | os.PathLike, dtype: str | torch.dtype = "float32", attn_implementation: str | None = None, name: str | None = None):
        from transformers import AutoConfig

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
        return load_causal_lm(str(self.folder), self.dtype, self.attn_implementation)


def lazy_causal_lm(source: str | os.PathLike, dtype: str | torch.dtype = "float32",
                   attn_implementation: str | None = None, name: str | None = None) -> LazyCausalLM:
    """A ``LazyCausalLM`` on the folder of ``source`` (a folder or a hub id, resolved like
    ``load_causal_lm``), named ``name`` (default: ``source``); a folder it cannot open raises
    the project's error, the library's exception chained."""
    folder = resolve_model_dir(source, allow_patterns=LLM_FILES)
    try:
        return LazyCausalLM(folder, dtype, attn_implementation, name=str(source) if name is None else name)
    except SourceUnavailable:
        raise
    except Exception as err:
        raise _llm_load_error(str(source), folder, err) from err


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


class BlockFolderWriter:
    """Writes a calibrated model on disk: one safetensors shard per calibrated block, one
    shard with every non-block tensor of the merged checkpoint, the index, the config and
    tokenizer files: a normal HF folder."""

    def __init__(self, merged: "LazyCausalLM", prefixes: list[str], output_dir=None):
        self.merged = merged
        self.prefixes = list(prefixes)
        self.folder = Path(output_dir) if output_dir else merged.folder.with_name(merged.folder.name + ".featcal")
        self.folder.mkdir(parents=True, exist_ok=True)
        for old in self.folder.glob("*.safetensors"):
            old.unlink()
        self.weight_map: dict[str, str] = {}
        self.total = 0

    def _write(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        layout = [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
        w = ShardWriter(self.folder / name, layout)
        for k, v in tensors.items():
            w.write(k, v)
            self.weight_map[k] = name
        w.close()
        self.total += w.total_bytes

    def write_block(self, index: int, block: nn.Module) -> None:
        prefix = self.prefixes[index]
        on_disk = {k for k in self.merged.reader.keys() if k.startswith(prefix)}
        sd = {prefix + k: v.detach() for k, v in block.state_dict().items() if prefix + k in on_disk}
        self._write(f"model-block-{index:05d}.safetensors", sd)

    def finish(self) -> Path:
        rest = [k for k in self.merged.reader.keys() if not k.startswith(tuple(self.prefixes))]
        self._write("model-rest.safetensors", {k: self.merged.reader.get(k) for k in rest})
        copy_model_files(self.merged.folder, self.folder)
        (self.folder / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": self.total}, "weight_map": self.weight_map}, indent=2))
        return self.folder
