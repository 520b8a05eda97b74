"""Images of the CLIP tasks as the base model expects them: PIL images (or encoded bytes,
paths, arrays) -> ``pixel_values``, through the base model's ``CLIPImageProcessor`` or the
standard CLIP recipe; the (image, label) dataset and collate function the CLIP pool's data
loaders use."""
from __future__ import annotations

import io
import os
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from featcal.backbone.clip import read_model_config
from featcal.errors import SourceUnavailable
from featcal.io.hub import resolve_model_dir

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class CLIPImagePreprocess:
    """PIL images -> ``pixel_values`` [B, 3, H, W] float32, as the base model expects.

    Uses the model's ``CLIPImageProcessor`` when the folder has a
    ``preprocessor_config.json``; otherwise the standard CLIP recipe at
    ``image_size`` (bicubic short-side resize, centre crop, CLIP mean/std).
    """

    def __init__(self, processor: Any | None = None, image_size: int = 224):
        self.processor = processor
        self.image_size = int(image_size)
        self._fallback = None
        if processor is None:
            from torchvision import transforms as T

            self._fallback = T.Compose([
                T.Resize(self.image_size, interpolation=T.InterpolationMode.BICUBIC),
                T.CenterCrop(self.image_size),
                T.ToTensor(),
                T.Normalize(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
            ])

    @classmethod
    def from_pretrained(cls, source: str) -> "CLIPImagePreprocess":
        folder = resolve_model_dir(source, allow_patterns=["*.json", "*.txt"])
        image_size = 224
        try:
            data = read_model_config(folder)
            vision = {**(data.get("vision_config") or {}), **(data.get("vision_config_dict") or {})} or data
            image_size = int(vision.get("image_size", 224))
        except SourceUnavailable:
            pass
        if (folder / "preprocessor_config.json").exists():
            from transformers import CLIPImageProcessor

            return cls(CLIPImageProcessor.from_pretrained(str(folder)), image_size)
        return cls(None, image_size)

    def __call__(self, images: Sequence[Any]) -> torch.Tensor:
        images = [to_rgb(im) for im in images]
        if self.processor is not None:
            out = self.processor(images=images, return_tensors="pt")["pixel_values"]
            return torch.as_tensor(out).float()
        return torch.stack([self._fallback(im) for im in images])


def to_rgb(image: Any):
    """A PIL RGB image from a PIL image, encoded bytes, a {'bytes','path'} dict or a path."""
    from PIL import Image

    if isinstance(image, Mapping):
        if image.get("bytes") is not None:
            image = Image.open(io.BytesIO(image["bytes"]))
        elif image.get("path"):
            image = Image.open(image["path"])
    elif isinstance(image, (bytes, bytearray)):
        image = Image.open(io.BytesIO(image))
    elif isinstance(image, (str, os.PathLike)):
        image = Image.open(image)
    elif isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if image.mode != "RGB":
        image = image.convert("RGB")
    return image


class ImageLabelDataset(torch.utils.data.Dataset):
    """(image, label) items from a ``datasets.Dataset`` (optionally a subset of rows)."""

    def __init__(self, ds, image_column: str, label_column: str, indices: Sequence[int] | None = None):
        self.ds = ds.select_columns([image_column, label_column])
        self.image_column = image_column
        self.label_column = label_column
        self.indices = None if indices is None else [int(i) for i in indices]

    def __len__(self) -> int:
        return len(self.ds) if self.indices is None else len(self.indices)

    def __getitem__(self, i: int):
        row = self.ds[i if self.indices is None else self.indices[i]]
        return row[self.image_column], int(row[self.label_column])


class ImageCollate:
    """Preprocessed ``pixel_values`` (and labels) of a batch of (image, label) items."""

    def __init__(self, preprocess: CLIPImagePreprocess, with_labels: bool):
        self.preprocess = preprocess
        self.with_labels = with_labels

    def __call__(self, items):
        pixel_values = self.preprocess([im for im, _ in items])
        inputs = {"pixel_values": pixel_values}
        if self.with_labels:
            return inputs, torch.tensor([lab for _, lab in items], dtype=torch.long)
        return inputs
