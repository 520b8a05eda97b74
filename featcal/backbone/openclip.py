"""open_clip image encoders (the task-vectors release format) in the CLIP adapter.

The task-vectors release (Ilharco et al.) and the works built on it (AdaMerging,
Surgery, ...) ship open_clip ``ViT-B-32`` image encoders as torch files::

    <checkpoint_dir>/zeroshot.pt              # the pretrained encoder θ₀
    <checkpoint_dir>/<Dataset>/finetuned.pt   # expert θ_t (SUN397, Cars, RESISC45, ...)

Each file is either a whole pickled ``ImageEncoder`` object (an ``nn.Module`` whose
``model`` attribute is an open_clip ``CLIP``; its classes come from the release's
own ``src.modeling`` package, which need not be importable here) or a plain state
dict. This module reads both, loads the vision tower into an open_clip model built
through ``open_clip.create_model`` (which validates every shape), and converts the
open_clip ``VisionTransformer`` into a transformers ``CLIPVisionModelWithProjection``
so the ordinary :class:`~featcal.backbone.clip.CLIPVisionBackbone` machinery (blocks,
embed, readout, merging by state dict) runs unchanged.

Whole pickled objects are read by :mod:`featcal.safe_pickle`'s allowlist unpickler:
tensors and containers are rebuilt, every other class becomes an inert stub (never
imported), and a global that could run code (``os.system``, ``eval``...) is refused.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from featcal import safe_pickle
from featcal.backbone.clip import CLIPVisionBackbone, shapes_of
from featcal.errors import CheckpointMismatch, ConfigError, loading
from featcal.errors import SourceUnavailable

# ---------------------------------------------------------------------------
# reading the torch files


def read_torch_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a torch file holding a state dict or a whole pickled module."""
    path = Path(os.path.expanduser(str(path)))
    if not path.is_file():
        raise SourceUnavailable(
            f"open_clip checkpoint '{path}' does not exist",
            "Download the task-vectors release checkpoints (zeroshot.pt and <Dataset>/finetuned.pt) and set "
            "backbone.adapter.checkpoint_dir to the folder holding them.",
        )
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception:
        try:
            obj = safe_pickle.torch_load(path)  # allowlist unpickler: refuses code, stubs classes
        except safe_pickle.UnsafeCheckpoint:
            raise
        except Exception as err:  # truncated zip, not a torch file
            raise SourceUnavailable(
                f"open_clip checkpoint '{path}' cannot be read: it is truncated, corrupt or not a torch file ({type(err).__name__})",
                "Download or copy it again (an interrupted download leaves a short file).",
            ) from err
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if isinstance(obj, Mapping):
        return {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if isinstance(obj, nn.Module) or hasattr(obj, "__dict__"):
        tensors = safe_pickle.module_tensors(obj)
        if tensors:
            return tensors
    raise CheckpointMismatch(
        f"'{path}' holds neither a state dict nor a module ({type(obj).__name__})",
        "Use a task-vectors style checkpoint: a pickled ImageEncoder or its state dict.",
    )


def visual_state_dict(raw: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The open_clip ``VisionTransformer`` weights (keys relative to ``model.visual``)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        k = key
        for prefix in ("module.", "model.", "image_encoder.", "module."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        if k.startswith("visual."):
            out[k[len("visual."):]] = value
    if not out and any(k.startswith("conv1.") for k in raw):  # already a bare vision tower
        out = dict(raw)
    if not out:
        raise CheckpointMismatch(
            f"no open_clip vision tower (visual.* keys) in the checkpoint (it has e.g. {sorted(raw)[:3]})",
            "Use an open_clip image encoder checkpoint (task-vectors zeroshot.pt / finetuned.pt).",
        )
    return out


# ---------------------------------------------------------------------------
# open_clip model skeletons


def build_openclip_visual(model_name: str = "ViT-B-32", quick_gelu: bool = True, model_config_path: str | None = None) -> nn.Module:
    """A randomly initialised open_clip vision tower of ``model_name`` (no download).

    ``model_config_path``: a json file (or folder of them) with custom open_clip
    model configs, registered through ``open_clip.add_model_config`` first.
    """
    import open_clip

    if model_config_path:
        open_clip.add_model_config(str(model_config_path))
    try:
        model = open_clip.create_model(model_name, pretrained=None, force_quick_gelu=quick_gelu, device="cpu")
    except RuntimeError as err:
        raise ConfigError(
            f"open_clip has no model config '{model_name}' (backbone.adapter.model_name)",
            "Use an open_clip model name (e.g. ViT-B-32), or register a custom one with backbone.adapter.model_config_path.",
        ) from err
    return model.visual.eval()


def load_openclip_visual(path: str | os.PathLike, model_name: str = "ViT-B-32", quick_gelu: bool = True, model_config_path: str | None = None) -> nn.Module:
    """The open_clip vision tower of a task-vectors style checkpoint, loaded strictly."""
    visual = build_openclip_visual(model_name, quick_gelu, model_config_path)
    with loading(f"file '{path}'"):
        sd = visual_state_dict(read_torch_checkpoint(path))
    try:
        visual.load_state_dict(sd, strict=True)
    except RuntimeError as err:
        lines = [ln.strip() for ln in str(err).splitlines()[1:] if ln.strip()][:2]
        raise CheckpointMismatch(
            f"checkpoint '{path}' does not fit open_clip '{model_name}' ({'; '.join(lines)[:300]})",
            "Set backbone.adapter.model_name to the checkpoint's architecture (e.g. ViT-B-16, ViT-L-14).",
        ) from err
    return visual


# ---------------------------------------------------------------------------
# conversion to transformers


def _is_quick_gelu(act: nn.Module) -> bool:
    return type(act).__name__ == "QuickGELU"


def openclip_visual_to_hf(visual: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Convert an open_clip ``VisionTransformer`` to ``CLIPVisionModelWithProjection``.

    Mapping: conv1 → patch_embedding, class_embedding, positional_embedding →
    position_embedding, ln_pre → pre_layrnorm, resblocks.i.{ln_1, ln_2} →
    layers.i.{layer_norm1, layer_norm2}, attn.in_proj → {q,k,v}_proj, attn.out_proj →
    out_proj, mlp.{c_fc, c_proj} → mlp.{fc1, fc2}, ln_post → post_layernorm, proj →
    visual_projection (transposed).
    """
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    blocks = list(visual.transformer.resblocks)
    if not blocks:
        raise ValueError("open_clip vision tower has no blocks")
    b0 = blocks[0]
    for name in ("ls_1", "ls_2"):
        if not isinstance(getattr(b0, name, nn.Identity()), nn.Identity):
            raise ValueError("open_clip towers with layer scale have no transformers CLIP equivalent")
    if getattr(visual, "attn_pool", None) is not None or getattr(visual, "pool_type", "tok") != "tok":
        raise ValueError("only class-token pooling open_clip towers map onto transformers CLIP")
    if getattr(visual, "proj", None) is None:
        raise ValueError("open_clip tower has no projection")
    if isinstance(visual.ln_pre, nn.Identity):
        raise ValueError("open_clip towers without ln_pre have no transformers CLIP equivalent")

    conv = visual.conv1
    width = conv.out_channels
    patch = conv.kernel_size[0]
    image_size = visual.image_size[0] if isinstance(visual.image_size, (tuple, list)) else int(visual.image_size)
    act = b0.mlp.gelu if hasattr(b0.mlp, "gelu") else b0.mlp[1]
    config = CLIPVisionConfig(
        hidden_size=width,
        intermediate_size=b0.mlp.c_fc.out_features,
        num_hidden_layers=len(blocks),
        num_attention_heads=b0.attn.num_heads,
        image_size=image_size,
        patch_size=patch,
        num_channels=conv.in_channels,
        projection_dim=visual.proj.shape[1],
        hidden_act="quick_gelu" if _is_quick_gelu(act) else "gelu",
        layer_norm_eps=visual.ln_pre.eps,
    )
    sd: dict[str, torch.Tensor] = {
        "vision_model.embeddings.class_embedding": visual.class_embedding,
        "vision_model.embeddings.patch_embedding.weight": conv.weight,
        "vision_model.embeddings.position_embedding.weight": visual.positional_embedding,
        "vision_model.pre_layrnorm.weight": visual.ln_pre.weight,
        "vision_model.pre_layrnorm.bias": visual.ln_pre.bias,
        "vision_model.post_layernorm.weight": visual.ln_post.weight,
        "vision_model.post_layernorm.bias": visual.ln_post.bias,
        "visual_projection.weight": visual.proj.t(),
    }
    for i, blk in enumerate(blocks):
        p = f"vision_model.encoder.layers.{i}."
        q, k, v = blk.attn.in_proj_weight.chunk(3, dim=0)
        qb, kb, vb = blk.attn.in_proj_bias.chunk(3, dim=0)
        sd.update({
            p + "self_attn.q_proj.weight": q, p + "self_attn.q_proj.bias": qb,
            p + "self_attn.k_proj.weight": k, p + "self_attn.k_proj.bias": kb,
            p + "self_attn.v_proj.weight": v, p + "self_attn.v_proj.bias": vb,
            p + "self_attn.out_proj.weight": blk.attn.out_proj.weight,
            p + "self_attn.out_proj.bias": blk.attn.out_proj.bias,
            p + "layer_norm1.weight": blk.ln_1.weight, p + "layer_norm1.bias": blk.ln_1.bias,
            p + "layer_norm2.weight": blk.ln_2.weight, p + "layer_norm2.bias": blk.ln_2.bias,
            p + "mlp.fc1.weight": blk.mlp.c_fc.weight, p + "mlp.fc1.bias": blk.mlp.c_fc.bias,
            p + "mlp.fc2.weight": blk.mlp.c_proj.weight, p + "mlp.fc2.bias": blk.mlp.c_proj.bias,
        })
    model = CLIPVisionModelWithProjection(config)
    sd = {k: t.detach().clone().contiguous() for k, t in sd.items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [m for m in missing if not m.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(f"open_clip → transformers conversion incomplete: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.to(dtype).eval()


def load_openclip_as_hf(path: str | os.PathLike, model_name: str = "ViT-B-32", quick_gelu: bool = True, model_config_path: str | None = None, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A task-vectors checkpoint as a transformers ``CLIPVisionModelWithProjection``."""
    visual = load_openclip_visual(path, model_name, quick_gelu, model_config_path)
    try:
        return openclip_visual_to_hf(visual, dtype)
    except ValueError as err:  # an open_clip layout transformers CLIP cannot express
        raise CheckpointMismatch(f"open_clip tower '{path}' ({model_name}) cannot be converted: {err}") from err


class OpenCLIPVisionBackbone(CLIPVisionBackbone):
    """CLIP adapter over open_clip image encoders saved as torch files.

    ``base`` / ``experts`` are file paths (``zeroshot.pt``, ``<Dataset>/finetuned.pt``),
    relative to ``checkpoint_dir`` when it is given and they are not absolute.
    ``quick_gelu`` must be true for OpenAI-pretrained weights (the release's ViT-B-32).
    """

    def __init__(
        self,
        tasks: list[str],
        base: str,
        experts: Mapping[str, str] | list[str],
        checkpoint_dir: str | None = None,
        model_name: str = "ViT-B-32",
        quick_gelu: bool = True,
        model_config_path: str | None = None,
    ):
        def where(p: str) -> str:
            p = os.path.expanduser(str(p))
            return str(Path(os.path.expanduser(str(checkpoint_dir))) / p) if checkpoint_dir and not os.path.isabs(p) else p

        if isinstance(experts, Mapping):
            experts = {t: where(experts[t]) for t in tasks}
        else:
            experts = [where(e) for e in experts]
        super().__init__(tasks, where(base), experts)
        self.checkpoint_dir = checkpoint_dir
        self.model_name = model_name
        self.quick_gelu = bool(quick_gelu)
        self.model_config_path = model_config_path

    def _load(self, path: str) -> nn.Module:
        return load_openclip_as_hf(path, self.model_name, self.quick_gelu, self.model_config_path)

    def load_base(self) -> nn.Module:
        with loading("the base model, set by backbone.adapter.base"):
            model = self._load(self.base_source)
        self._base_shapes = shapes_of(model)
        return model

    def load_expert(self, task: str) -> nn.Module:
        with loading(f"the expert of task '{task}', set by backbone.adapter.experts.{task}"):
            model = self._load(self.expert_sources[task])
            self._check_expert(model, task)
        return model
