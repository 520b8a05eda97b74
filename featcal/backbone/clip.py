"""CLIP vision towers (transformers ``CLIPVisionModelWithProjection``).

The unit of work is a vision tower plus its visual projection: the final
representation is the projected image embedding (not L2-normalised), which
zero-shot heads score and Surgery modules adjust.

Checkpoints come in several layouts, all normalised here to the transformers 5
``CLIPVisionModelWithProjection`` keys (``vision_model.*``, ``visual_projection.*``):
- a full ``CLIPModel`` (text tower keys are dropped),
- a ``CLIPVisionModel`` saved by transformers 4.x (``vision_model.*`` keys) or 5.x
  (bare ``embeddings.*``/``encoder.*`` keys): these carry no projection, which is
  taken from ``projection_source`` (the base ``CLIPModel``) when given,
- a ``CLIPVisionModelWithProjection`` from either version.
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
from featcal.io.hub import load_raw_state_dict, resolve_model_dir
from featcal.errors import SourceUnavailable

#: per tower: (model prefix, projection prefix, bare root prefixes of a tower saved alone)
_TOWERS = {
    "vision": ("vision_model.", "visual_projection.", ("embeddings.", "pre_layrnorm.", "encoder.", "post_layernorm.")),
    "text": ("text_model.", "text_projection.", ("embeddings.", "encoder.", "final_layer_norm.")),
}


def canonical_clip_keys(raw: Mapping[str, torch.Tensor], tower: str = "vision") -> dict[str, torch.Tensor]:
    """Map any CLIP checkpoint layout onto one tower's ``CLIP<Tower>ModelWithProjection``
    keys (``vision_model.*`` + ``visual_projection.*``, or ``text_model.*`` +
    ``text_projection.*``): full ``CLIPModel`` (the other tower's keys are dropped),
    a tower saved alone by transformers 4.x (prefixed) or 5.x (bare root keys),
    wrapper prefixes (``model.``, ``clip_model.``, ``module.``); persisted
    ``position_ids`` buffers are dropped (recomputed at init)."""
    model_prefix, proj_prefix, roots = _TOWERS[tower]
    ours = (model_prefix, proj_prefix)
    out: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        k = key
        for prefix in ("model.", "clip_model.", "module."):
            if k.startswith(prefix) and k[len(prefix):].startswith(ours + roots):
                k = k[len(prefix):]
        if k.startswith(model_prefix + model_prefix):
            k = k[len(model_prefix):]
        if k.startswith(roots):
            k = model_prefix + k
        if k.startswith(ours) and not k.endswith("position_ids"):
            out[k] = value
    return out


def canonical_clip_vision_keys(raw: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return canonical_clip_keys(raw, "vision")


CLIP_MODEL_TYPES = ("clip", "clip_vision_model")


def _not_clip(source: str, data: dict) -> CheckpointMismatch:
    arch = data.get("architectures") or []
    what = f"a '{data.get('model_type')}' checkpoint" + (f" ({', '.join(map(str, arch))})" if arch else "")
    return CheckpointMismatch(
        f"'{source}' is {what}, not a CLIP model (config.json model_type must be one of {list(CLIP_MODEL_TYPES)})",
        "Point this setting at a CLIP vision tower (an expert fine-tuned from the base) or a full CLIP model.",
    )


def read_model_config(folder: Path, source: str | None = None) -> dict:
    """``config.json`` of a model folder, as a dict (a missing or broken file names the source)."""
    folder = Path(folder)
    source = source or str(folder)
    cfg_file = folder / "config.json"
    if not cfg_file.exists():
        raise SourceUnavailable(
            f"no config.json in model folder '{folder}'" + (f" for '{source}'" if source != str(folder) else ""),
            "A checkpoint folder holds config.json next to its weights (save it with save_pretrained).",
        )
    try:
        return json.loads(cfg_file.read_text())
    except ValueError as err:
        raise SourceUnavailable(f"config.json of '{source}' is not valid JSON ({cfg_file})", "Save or download the checkpoint again.") from err


def _vision_config(folder: Path, source: str | None = None):
    from transformers import CLIPVisionConfig

    source = source or str(folder)
    data = read_model_config(folder, source)
    model_type = data.get("model_type")
    if model_type is not None and model_type not in CLIP_MODEL_TYPES:
        raise _not_clip(source, data)
    if "vision_config" in data or "vision_config_dict" in data:  # a full CLIPModel config
        # legacy 4.x configs carry ``vision_config_dict``, whose values take precedence
        vision = {**(data.get("vision_config") or {}), **(data.get("vision_config_dict") or {})}
        vision.setdefault("projection_dim", data.get("projection_dim", 512))
    else:
        vision = data
    vision = {k: v for k, v in vision.items() if k not in ("architectures", "model_type", "transformers_version")}
    try:
        return CLIPVisionConfig(**vision)
    except Exception as err:  # bad values in a hand-written config
        raise CheckpointMismatch(f"config.json of '{source}' is not a valid CLIP vision config ({type(err).__name__})") from err


def _fit(model: nn.Module, sd: dict, source: str) -> None:
    """Load ``sd`` into ``model``; every parameter must be present with the right shape."""
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as err:  # size mismatches
        lines = [ln.strip() for ln in str(err).splitlines() if "size mismatch" in ln][:2]
        raise CheckpointMismatch(
            f"checkpoint '{source}' does not fit the CLIP vision tower described by its config.json: "
            + ("; ".join(lines) or "tensor shapes differ"),
            "The weights and config.json come from different models; save or download them together.",
        ) from err
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise CheckpointMismatch(
            f"checkpoint '{source}' does not fit a CLIP vision tower: missing {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}",
            "Use a transformers CLIP checkpoint (CLIPModel, CLIPVisionModel or CLIPVisionModelWithProjection); "
            "open_clip torch files go through backbone=clip_vit_b32_openclip.",
        )


def load_clip_vision(source: str, projection_source: str | None = None, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Load a CLIP vision tower with projection from a hub id or a local folder.

    Works for checkpoints saved by transformers 4.x and 5.x. If the checkpoint has no
    ``visual_projection`` (a bare vision model), it is read from ``projection_source``.
    Missing or unreadable sources raise ``SourceUnavailable``; checkpoints of another
    architecture or shape raise ``CheckpointMismatch``.
    """
    from transformers import CLIPVisionModelWithProjection

    folder = resolve_model_dir(source)
    config = _vision_config(folder, str(source))
    raw = load_raw_state_dict(folder, str(source))
    sd = canonical_clip_vision_keys(raw)
    if not any(k.startswith("vision_model.") for k in sd):
        raise CheckpointMismatch(
            f"checkpoint '{source}' holds no CLIP vision tower weights (no vision_model.* keys; it has e.g. {sorted(raw)[:3]})",
            "Point this setting at a CLIP vision model.",
        )
    if "visual_projection.weight" in sd:  # the weights decide (a saved vision_config may carry a stale default)
        config.projection_dim = sd["visual_projection.weight"].shape[0]
    if "visual_projection.weight" not in sd:
        if projection_source is None:
            raise CheckpointMismatch(
                f"checkpoint '{source}' has no visual_projection and no projection_source was given",
                "Give backbone.adapter.projection_source (a full CLIP model whose projection the tower uses).",
            )
        with loading(f"projection source '{projection_source}'"):
            proj_folder = resolve_model_dir(projection_source)
            proj = canonical_clip_vision_keys(load_raw_state_dict(proj_folder, str(projection_source)))
        if "visual_projection.weight" not in proj:
            raise CheckpointMismatch(
                f"'{projection_source}' has no visual_projection weight (needed by '{source}', a tower without projection)",
                "Use a full CLIP model (CLIPModel) as the base or as backbone.adapter.projection_source.",
            )
        sd["visual_projection.weight"] = proj["visual_projection.weight"]
        config.projection_dim = proj["visual_projection.weight"].shape[0]
    model = CLIPVisionModelWithProjection(config)
    _fit(model, sd, str(source))
    return model.to(dtype).eval()


def shapes_of(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_same_architecture(base: nn.Module | dict, expert: nn.Module, base_source: str, expert_source: str) -> None:
    """Raise ``CheckpointMismatch`` unless ``expert`` has the base's parameter names and
    shapes (``base``: the base model or its :func:`shapes_of`)."""
    b = base if isinstance(base, dict) else shapes_of(base)
    e = shapes_of(expert)
    diff = [k for k in b if k in e and b[k] != e[k]]
    if diff or b.keys() != e.keys():
        k = diff[0] if diff else sorted(set(b) ^ set(e))[0]
        detail = f"{k}: base {b.get(k)}, expert {e.get(k)}"
        raise CheckpointMismatch(
            f"expert '{expert_source}' is not the same architecture as the base '{base_source}' ({detail})",
            "Experts must be fine-tuned from the base model (same size and layout).",
        )


_MASK_KWARGS: dict[type, dict] = {}


def _layer_mask_kwargs(layer: nn.Module) -> dict:
    """Extra mask arguments of a CLIP encoder layer: transformers 4.x layers require
    ``causal_attention_mask`` (None for the vision tower), 5.x layers have no such
    parameter. Read once per layer class from its signature."""
    cls = type(layer)
    if cls not in _MASK_KWARGS:
        params = inspect.signature(cls.forward).parameters
        _MASK_KWARGS[cls] = {"causal_attention_mask": None} if "causal_attention_mask" in params else {}
    return _MASK_KWARGS[cls]


class CLIPVisionBackbone(Backbone):
    """Adapter for transformers CLIP vision towers.

    Blocks: ``vision_model.encoder.layers``. First-block inputs: patch + class +
    position embeddings, then ``pre_layrnorm``. Readout: ``post_layernorm`` on the
    class token, then ``visual_projection``.
    """

    key_value_patterns = ("k_proj", "v_proj")

    #: config keys naming model sources (checked for availability before anything loads)
    model_source_keys = ("base", "experts", "projection_source")

    def __init__(self, tasks: list[str], base: str, experts: Mapping[str, str] | list[str], projection_source: str | None = None):
        super().__init__(tasks)
        self.base_source = base
        if isinstance(experts, Mapping):
            self.expert_sources = {t: str(experts[t]) for t in self.tasks}
        else:
            self.expert_sources = {t: str(e) for t, e in zip(self.tasks, experts)}
        self.projection_source = projection_source or base

    def load_base(self) -> nn.Module:
        with loading("the base model, set by backbone.adapter.base"):
            model = load_clip_vision(self.base_source)
        self._base_shapes = shapes_of(model)
        return model

    def load_expert(self, task: str) -> nn.Module:
        with loading(f"the expert of task '{task}', set by backbone.adapter.experts.{task}"):
            model = load_clip_vision(self.expert_sources[task], projection_source=self.projection_source)
            self._check_expert(model, task)
        return model

    def _check_expert(self, model: nn.Module, task: str) -> None:
        base = getattr(self, "_base_shapes", None)
        if base is not None:
            check_same_architecture(base, model, self.base_source, self.expert_sources[task])

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        return list(model.vision_model.encoder.layers)

    def embed(self, model: nn.Module, inputs: Inputs) -> BlockState:
        pixel_values = inputs["pixel_values"] if isinstance(inputs, Mapping) else inputs
        vm = model.vision_model
        pixel_values = pixel_values.to(dtype=vm.embeddings.patch_embedding.weight.dtype)
        hidden = vm.pre_layrnorm(vm.embeddings(pixel_values))
        b, n, _ = hidden.shape
        token_mask = torch.ones(b, n, device=hidden.device)
        readout = torch.zeros(b, n, dtype=torch.bool, device=hidden.device)
        readout[:, 0] = True
        return BlockState(hidden, token_mask, readout, {})

    def run_block(self, block: nn.Module, state: BlockState) -> BlockState:
        out = block(state.hidden, attention_mask=None, **_layer_mask_kwargs(block))
        if isinstance(out, tuple):  # transformers 4.x layers return tuples
            out = out[0]
        return state.with_hidden(out)

    def readout(self, model: nn.Module, state: BlockState) -> torch.Tensor:
        pooled = model.vision_model.post_layernorm(state.hidden[:, 0, :])
        return model.visual_projection(pooled)

    def representation_site(self, model: nn.Module) -> tuple[nn.Module, str]:
        return model.visual_projection, "output"
