"""Tiny local stand-ins for the CLIP benchmark (no network).

- ``write_tiny_tokenizer``: a CLIP BPE tokenizer (vocab.json + merges.txt) over the
  256 byte symbols, as CLIP hub repos ship it.
- ``make_tiny_clip``: a tiny ``CLIPModel`` (vision + text towers) saved with the
  tokenizer and an image processor, in the transformers 5 layout or the 4.x layout
  (legacy ``*_config_dict`` config, persisted ``position_ids`` buffers).
- ``make_tiny_expert``: a perturbed copy of the base vision tower saved like the
  ``tanganke/clip-vit-base-patch32_<task>`` experts (a 4.x ``CLIPVisionModel``:
  ``vision_model.*`` keys, no projection).
- ``make_tiny_task_dataset``: a ``DatasetDict`` in the real task schema (PIL
  ``image`` + ``ClassLabel`` ``label``) written with ``save_to_disk``.
- ``make_tiny_clip_benchmark``: all of the above for a few tasks, returning the
  Hydra overrides that run ``featcal-run backbone=clip_vit_b32`` on them.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

TINY_IMAGE = 32
TINY_PATCH = 8


def _byte_symbols() -> list[str]:
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1)) | set(range(ord("®"), ord("ÿ") + 1))
    out, extra = [], 0
    for b in range(256):
        if b in printable:
            out.append(chr(b))
        else:
            out.append(chr(256 + extra))
            extra += 1
    return out


def write_tiny_tokenizer(folder: Path) -> int:
    """Write vocab.json, merges.txt, tokenizer_config.json; return the vocab size."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    symbols = _byte_symbols()
    vocab: dict[str, int] = {}
    for s in symbols:
        vocab[s] = len(vocab)
    for s in symbols:
        vocab[s + "</w>"] = len(vocab)
    merges = ["t h", "th e</w>", "o f</w>"]
    for m in merges:
        a, b = m.split(" ")
        vocab.setdefault(a + b, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)  # the largest id, as in CLIP
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "CLIPTokenizer", "model_max_length": 96}))
    return len(vocab)


def tiny_clip_config(vocab_size: int):
    from transformers import CLIPConfig

    text = dict(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=96, hidden_act="quick_gelu", bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    vision = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=TINY_IMAGE,
        patch_size=TINY_PATCH, hidden_act="quick_gelu",
    )
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=16), text, vision


def _save_processor(folder: Path) -> None:
    from transformers import CLIPImageProcessor

    CLIPImageProcessor(
        size={"shortest_edge": TINY_IMAGE}, crop_size={"height": TINY_IMAGE, "width": TINY_IMAGE}
    ).save_pretrained(str(folder))


def make_tiny_clip(folder: Path, layout: str = "v5", seed: int = 0):
    """Save a tiny CLIPModel (+ tokenizer, image processor) to ``folder``; return the model."""
    from safetensors.torch import save_file
    from transformers import CLIPModel

    folder = Path(folder)
    vocab_size = write_tiny_tokenizer(folder)
    config, text, vision = tiny_clip_config(vocab_size)
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    if layout == "v5":
        model.save_pretrained(str(folder))
    elif layout == "v4":
        sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
        sd["text_model.embeddings.position_ids"] = torch.arange(text["max_position_embeddings"])[None]
        sd["vision_model.embeddings.position_ids"] = torch.arange((TINY_IMAGE // TINY_PATCH) ** 2 + 1)[None]
        save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
        (folder / "config.json").write_text(json.dumps({
            "architectures": ["CLIPModel"], "model_type": "clip", "transformers_version": "4.21.0.dev0",
            "projection_dim": 16, "logit_scale_init_value": 2.6592, "initializer_factor": 1.0,
            "text_config_dict": text, "vision_config_dict": vision,
        }))
    else:
        raise ValueError(layout)
    _save_processor(folder)
    return model


def make_tiny_expert(base_folder: Path, folder: Path, seed: int, scale: float = 0.05) -> None:
    """A perturbed base vision tower saved as a 4.x ``CLIPVisionModel`` (``vision_model.*`` keys)."""
    from safetensors.torch import save_file

    from featcal.io.hub import load_raw_state_dict

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    raw = load_raw_state_dict(Path(base_folder))
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in raw.items():
        if k.startswith("vision_model.") and not k.endswith("position_ids"):
            noise = torch.randn(v.shape, generator=g) * scale * (v.float().std() if v.numel() > 1 else 1.0)
            sd[k] = (v.float() + noise).contiguous()
    sd["vision_model.embeddings.position_ids"] = torch.arange((TINY_IMAGE // TINY_PATCH) ** 2 + 1)[None]
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((Path(base_folder) / "config.json").read_text())
    vision = cfg.get("vision_config") or cfg.get("vision_config_dict")
    vision = {k: v for k, v in vision.items() if k not in ("model_type", "transformers_version", "architectures")}
    (folder / "config.json").write_text(json.dumps({
        **vision, "architectures": ["CLIPVisionModel"], "model_type": "clip_vision_model", "transformers_version": "4.40.0",
    }))


def make_tiny_task_dataset(folder: Path, num_classes: int, n_train: int = 16, n_test: int = 12, seed: int = 0, mode: str = "RGB", size: int = 40):
    """A DatasetDict (train/test) of random PIL images + ClassLabel labels, saved to disk."""
    import datasets
    from PIL import Image

    rng = np.random.default_rng(seed)
    features = datasets.Features({
        "image": datasets.Image(),
        "label": datasets.ClassLabel(names=[f"c{i}" for i in range(num_classes)]),
    })

    def split(n: int) -> datasets.Dataset:
        labels = [int(i % num_classes) for i in range(n)]
        images = []
        for lab in labels:
            arr = rng.integers(0, 256, size=(size, size + 4, 3), dtype=np.uint8)
            arr[..., lab % 3] = np.clip(arr[..., lab % 3].astype(int) + 40 * lab, 0, 255).astype(np.uint8)
            im = Image.fromarray(arr, "RGB")
            images.append(im.convert(mode))
        return datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)

    dd = datasets.DatasetDict({"train": split(n_train), "test": split(n_test)})
    dd.save_to_disk(str(folder))
    return dd


def make_tiny_clip_benchmark(
    tmp_path: Path,
    tasks: Sequence[str] = ("mnist", "eurosat", "svhn"),
    n_train: int = 16,
    n_test: int = 12,
    layout: str = "v4",
) -> list[str]:
    """Build a tiny base, one expert per task and one dataset per task under ``tmp_path``.

    Returns the Hydra overrides for ``featcal-run backbone=clip_vit_b32 ...`` (add
    your own merge / calibration / budget / logger choices; the budget must be at
    most ``n_train``).
    """
    from featcal.tasks.clip_vision import task_table

    tmp_path = Path(tmp_path)
    table = task_table()
    base = tmp_path / "clip_base"
    make_tiny_clip(base, layout=layout)
    overrides = [
        "backbone=clip_vit_b32",
        f"backbone.adapter.tasks=[{','.join(tasks)}]",
        f"backbone.adapter.base={base}",
        f"backbone.taskpool.cache_dir={tmp_path / 'clip_heads'}",
    ]
    for i, t in enumerate(tasks):
        expert = tmp_path / f"clip_expert_{t}"
        make_tiny_expert(base, expert, seed=100 + i)
        data = tmp_path / f"clip_data_{t}"
        make_tiny_task_dataset(data, len(table[t]["classnames"]), n_train, n_test, seed=i, mode="L" if t == "mnist" else "RGB")
        overrides += [
            f"backbone.adapter.experts.{t}={expert}",
            f"backbone.taskpool.datasets.{t}={data}",
            f"backbone.train_sizes.{t}={n_train}",
            f"backbone.test_sizes.{t}={n_test}",
        ]
    return overrides
