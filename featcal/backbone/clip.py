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

import json
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from featcal.backbone.base import Backbone, BlockState, Inputs
from featcal.hub import SourceUnavailable, load_raw_state_dict, resolve_model_dir

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


def read_model_config(folder: Path) -> dict:
    """``config.json`` of a model folder, as a dict."""
    cfg_file = Path(folder) / "config.json"
    if not cfg_file.exists():
        raise SourceUnavailable(f"no config.json in model folder '{folder}'")
    return json.loads(cfg_file.read_text())


def _vision_config(folder: Path):
    from transformers import CLIPVisionConfig

    data = read_model_config(folder)
    if "vision_config" in data or "vision_config_dict" in data:  # a full CLIPModel config
        # legacy 4.x configs carry ``vision_config_dict``, whose values take precedence
        vision = {**(data.get("vision_config") or {}), **(data.get("vision_config_dict") or {})}
        vision.setdefault("projection_dim", data.get("projection_dim", 512))
    else:
        vision = data
    vision = {k: v for k, v in vision.items() if k not in ("architectures", "model_type", "transformers_version")}
    return CLIPVisionConfig(**vision)


def load_clip_vision(source: str, projection_source: str | None = None, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Load a CLIP vision tower with projection from a hub id or a local folder.

    Works for checkpoints saved by transformers 4.x and 5.x. If the checkpoint has no
    ``visual_projection`` (a bare vision model), it is read from ``projection_source``.
    """
    from transformers import CLIPVisionModelWithProjection

    folder = resolve_model_dir(source)
    config = _vision_config(folder)
    sd = canonical_clip_vision_keys(load_raw_state_dict(folder))
    if "visual_projection.weight" in sd:  # the weights decide (a saved vision_config may carry a stale default)
        config.projection_dim = sd["visual_projection.weight"].shape[0]
    if "visual_projection.weight" not in sd:
        if projection_source is None:
            raise SourceUnavailable(
                f"checkpoint '{source}' has no visual_projection and no projection_source was given"
            )
        proj_folder = resolve_model_dir(projection_source)
        proj = canonical_clip_vision_keys(load_raw_state_dict(proj_folder))
        if "visual_projection.weight" not in proj:
            raise SourceUnavailable(f"'{projection_source}' has no visual_projection weight")
        sd["visual_projection.weight"] = proj["visual_projection.weight"]
        config.projection_dim = proj["visual_projection.weight"].shape[0]
    model = CLIPVisionModelWithProjection(config)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise SourceUnavailable(
            f"checkpoint '{source}' does not fit a CLIP vision tower: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return model.to(dtype).eval()


class CLIPVisionBackbone(Backbone):
    """Adapter for transformers CLIP vision towers.

    Blocks: ``vision_model.encoder.layers``. First-block inputs: patch + class +
    position embeddings, then ``pre_layrnorm``. Readout: ``post_layernorm`` on the
    class token, then ``visual_projection``.
    """

    key_value_patterns = ("k_proj", "v_proj")

    def __init__(self, tasks: list[str], base: str, experts: Mapping[str, str] | list[str], projection_source: str | None = None):
        super().__init__(tasks)
        self.base_source = base
        if isinstance(experts, Mapping):
            self.expert_sources = {t: str(experts[t]) for t in self.tasks}
        else:
            self.expert_sources = {t: str(e) for t, e in zip(self.tasks, experts)}
        self.projection_source = projection_source or base

    def load_base(self) -> nn.Module:
        return load_clip_vision(self.base_source)

    def load_expert(self, task: str) -> nn.Module:
        return load_clip_vision(self.expert_sources[task], projection_source=self.projection_source)

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
        out = block(state.hidden, None)
        if isinstance(out, tuple):  # transformers 4.x layers return tuples
            out = out[0]
        return state.with_hidden(out)

    def readout(self, model: nn.Module, state: BlockState) -> torch.Tensor:
        pooled = model.vision_model.post_layernorm(state.hidden[:, 0, :])
        return model.visual_projection(pooled)

    def representation_site(self, model: nn.Module) -> tuple[nn.Module, str]:
        return model.visual_projection, "output"
