"""Building the embedded benchmark: pre-training, fine-tuning, cache and checksums.

Everything comes from scikit-learn's 8×8 handwritten digits (``load_digits``, shipped in
the package; nothing is downloaded):

1. The 1797 images are split once (seeded) into a test pool and a train pool.
2. Each task applies its own fixed input transform (inversion, quarter turns,
   mirroring, a fixed patch permutation, heavy noise, shrinking, ...) and label map to
   the pools (``TASKS``).
3. A small ``CLIPVisionModelWithProjection`` (same module types as ViT-B/32, reduced
   size) is pre-trained as the shared **base**: digit identity with a throwaway cosine
   classifier, under mild random augmentations. With ``pretrain_data="upright"`` (the
   pre-v3 recipe, kept in ``INTERFERENCE_SPEC``) it sees upright digits only under
   generic augmentations (none of the tasks' transforms); with ``"union"`` (the default
   since v3) it sees every task's input distribution (the train pool upright plus a
   ``pretrain_transformed`` share of it through each task's transform: the transforms
   act as augmentations), as CLIP's pre-training covers the domains of its downstream
   tasks.
4. Each task's frozen head is a ``ClassEmbeddingHead`` of "zero-shot" class embeddings
   from the base: the normalised mean base embedding of each class, centred over
   classes (the role CLIP's text embeddings play), on the task's own train split with
   ``head_source="task"`` (pre-v3), or with ``"canonical"`` (the default) on *upright,
   untransformed* train-pool digits under the task's label map: the class described
   once, independently of the task's input distribution, as CLIP's text prompts do.
5. One **expert** per task fine-tunes the whole tower (not the head) from the base.

The build is deterministic for a spec (seeded generators, no global RNG use outside a
forked RNG scope) and, on the CPU (the default build device), *portable*: its arithmetic
runs in child processes pinned to fixed kernels (``featcal.suite_build``: ATen's AVX2
kernels, MKL's AVX2 reproducibility branch, oneDNN off, one thread each), so every x86-64
CPU with AVX2 builds the same files for a spec with the same torch. The base is built first,
then the experts, each from the saved base, by several workers at once (the same files
whatever their number). A GPU build (``build_device=cuda``) or a build on another
architecture is marked not portable in the manifest. The build is cached on disk under ``<cache>/embedded/<spec hash>/``: ``base/`` and ``experts/<task>/``
(``save_pretrained``, safetensors, loaded back with
``featcal.backbone.clip.load_clip_vision``), ``heads.safetensors``,
``data/<task>.safetensors`` (the transformed splits) and ``manifest.json`` (sha256 of
every file; written last, the folder is assembled in a temporary directory and renamed
into place). A missing, truncated or altered file, or a bad manifest, is detected on
load and the folder is rebuilt with a warning. A lock file (``filelock``) serialises
builders; the cache root is ``$FEATCAL_CACHE`` or the user cache folder
(``platformdirs``). The manifest also records ``content_hash`` (one hash over the files:
the build's identity, which ``results.json`` carries as ``suite``), ``portable`` and
``portability_note``.

The models are read by ``featcal.backbone.embedded.EmbeddedBackbone``, the splits and
heads by ``featcal.tasks.embedded.EmbeddedTaskPool``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from featcal.tasks.base import ClassEmbeddingHead
from featcal.cache import SuiteSpec, ensure_suite, read_manifest, write_manifest  # noqa: F401  (read_manifest: public here)
from featcal import suite_build
from featcal.utils import train_adamw

#: bump when the build procedure changes: old caches then live under another hash
BUILD_VERSION = 4  # 4: pinned portable builds (featcal.suite_build), experts from the saved base
#: number of images in sklearn's digits dataset
DIGITS_N = 1797
#: CPU threads used while building (see ``build``)
BUILD_THREADS = 1
PRETRAIN_DATA = ("union", "upright")
HEAD_SOURCES = ("canonical", "task")


# --------------------------------------------------------------------------------------
# tasks: a fixed input transform and a label map each
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TaskDef:
    name: str
    n_classes: int
    label: Callable[[torch.Tensor], torch.Tensor]
    #: (gray images [N,1,S,S] in [0,1], spec, fixed generator, per-example generator)
    #: -> RGB images [N,3,S,S] in [0,1]; the fixed generator draws task constants
    #: (the same on both splits), the other per-example randomness
    transform: Callable[[torch.Tensor, "EmbeddedSpec", torch.Generator, torch.Generator], torch.Tensor]
    description: str


def _gray(x: torch.Tensor) -> torch.Tensor:
    return x.expand(-1, 3, -1, -1).clone()


def _t_identity(x, spec, g, gs):
    return _gray(x)


def _t_inverted(x, spec, g, gs):
    return _gray(1.0 - x)


def _t_rot90(x, spec, g, gs):
    return _gray(torch.rot90(x, 1, dims=(2, 3)))


def _t_mirror(x, spec, g, gs):
    return _gray(torch.flip(x, dims=(3,)))


def _t_patch_shuffle(x, spec, g, gs):
    p, s = spec.patch_size, spec.image_size
    k = s // p
    perm = torch.randperm(k * k, generator=g)  # one fixed permutation for the task
    n = x.shape[0]
    patches = x.reshape(n, 1, k, p, k, p).permute(0, 1, 2, 4, 3, 5).reshape(n, 1, k * k, p, p)
    patches = patches[:, :, perm]
    out = patches.reshape(n, 1, k, k, p, p).permute(0, 1, 2, 4, 3, 5).reshape(n, 1, s, s)
    return _gray(out)


def _t_noise(x, spec, g, gs):
    noise = torch.randn(x.shape, generator=gs) * 0.25
    return _gray((x + noise).clamp(0.0, 1.0))


def _t_shrink_corner(x, spec, g, gs):
    s = spec.image_size
    small = max(2, (s * 5) // 8)
    y = F.interpolate(x, size=(small, small), mode="bilinear", align_corners=False, antialias=True)
    out = torch.zeros_like(x)
    out[:, :, s - small:, s - small:] = y
    return _gray(out)


def _t_upside_red(x, spec, g, gs):
    y = torch.rot90(x, 2, dims=(2, 3))
    out = torch.zeros(x.shape[0], 3, x.shape[2], x.shape[3])
    out[:, 0:1] = y
    return out


def _t_transpose(x, spec, g, gs):
    return _gray(x.transpose(2, 3))


TASKS: dict[str, TaskDef] = {
    t.name: t
    for t in [
        TaskDef("digits", 10, lambda y: y, _t_identity, "upright digits, digit identity (10)"),
        TaskDef("inverted", 10, lambda y: y, _t_inverted, "inverted intensities, digit (10)"),
        TaskDef("rot90", 10, lambda y: y, _t_rot90, "rotated 90° counter-clockwise, digit (10)"),
        TaskDef("mirror_parity", 2, lambda y: y % 2, _t_mirror, "mirrored left-right, parity (2)"),
        TaskDef("patch_shuffle", 10, lambda y: y, _t_patch_shuffle, "fixed permutation of the ViT patches, digit (10)"),
        TaskDef("noisy_mod3", 3, lambda y: y % 3, _t_noise, "heavy Gaussian noise, digit mod 3 (3)"),
        TaskDef("small_geq5", 2, lambda y: (y >= 5).long(), _t_shrink_corner, "shrunk into the bottom-right corner, digit ≥ 5 (2)"),
        TaskDef("upside_red", 10, lambda y: y, _t_upside_red, "rotated 180° and drawn in the red channel only, digit (10)"),
        TaskDef("transpose_mod4", 4, lambda y: y % 4, _t_transpose, "transposed, digit mod 4 (4)"),
        TaskDef("mirror", 10, lambda y: y, _t_mirror, "mirrored left-right, digit (10)"),
        TaskDef("noisy", 10, lambda y: y, _t_noise, "heavy Gaussian noise, digit (10)"),
        TaskDef("small", 10, lambda y: y, _t_shrink_corner, "shrunk into the bottom-right corner, digit (10)"),
        TaskDef("transpose", 10, lambda y: y, _t_transpose, "transposed, digit (10)"),
    ]
}

#: the default suite (build v3): seven input distributions of the digits, digit identity
#: as the label everywhere (the heads are canonical upright-digit prototypes)
DEFAULT_TASKS = ("inverted", "rot90", "mirror", "patch_shuffle", "small", "upside_red", "transpose")
#: the over-interfering stress suite's tasks (the default's before build v3)
INTERFERENCE_TASKS = (
    "inverted",
    "rot90",
    "mirror_parity",
    "patch_shuffle",
    "noisy_mod3",
    "small_geq5",
    "upside_red",
    "transpose_mod4",
)
#: eight input distributions of the digits, all with digit identity as the label (the
#: candidate suite for the union-pre-trained, canonical-head recipe; see the README)
IDENTITY_TASKS = ("inverted", "rot90", "mirror", "patch_shuffle", "noisy", "small", "upside_red", "transpose")


# --------------------------------------------------------------------------------------
# the spec
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EmbeddedSpec(SuiteSpec):
    """Every knob of the build. Its hash names the cache folder."""

    SUITE = "embedded"
    CACHE_DIR = "embedded"
    LABEL = "embedded benchmark"
    BUILD_VERSION = BUILD_VERSION
    # the layout ``_build`` writes (see ``SuiteSpec.required_files``)
    MODEL_FILES = ("config.json", "model.safetensors")
    DATA_SUFFIX = ".safetensors"
    EXTRA_FILES = ("heads.safetensors",)

    tasks: tuple[str, ...] = DEFAULT_TASKS
    # architecture (CLIP ViT, reduced)
    image_size: int = 16
    patch_size: int = 4
    width: int = 128
    layers: int = 4
    heads: int = 4
    mlp_ratio: int = 4
    projection_dim: int = 128
    # data: test pool size, train examples per task (None: the whole train pool)
    n_test: int = 500
    n_train: int | None = None
    # base pre-training: digit identity under mild random augmentations, on "upright"
    # digits only or on the "union" of every task's input distribution (the train pool
    # upright and through each task's transform, the transforms acting as augmentations)
    pretrain_data: str = "union"
    #: with ``union``: the share of the train pool passed through each task's transform
    #: (a seeded subset per task; 1.0: all of it)
    pretrain_transformed: float = 0.15
    pretrain_steps: int = 300
    pretrain_batch: int = 128
    pretrain_lr: float = 1e-3
    # zero-shot heads: class prototypes of the base on "canonical" inputs (upright,
    # untransformed train-pool digits under the task's label map: the class described
    # once, independently of the task's input distribution, as CLIP's text prompts do)
    # or on the "task"'s own train split
    head_source: str = "canonical"
    # expert fine-tuning (whole tower, frozen head): gentle, as CLIP's experts
    finetune_steps: int = 60
    finetune_batch: int = 64
    finetune_lr: float = 1e-4
    weight_decay: float = 0.1
    warmup_frac: float = 0.1
    logit_scale: float = 100.0
    seed: int = 0

    def __post_init__(self):
        self._check_tasks(TASKS)
        if self.pretrain_data not in PRETRAIN_DATA:
            raise ValueError(f"pretrain_data must be one of {list(PRETRAIN_DATA)}, got {self.pretrain_data!r}")
        if self.head_source not in HEAD_SOURCES:
            raise ValueError(f"head_source must be one of {list(HEAD_SOURCES)}, got {self.head_source!r}")
        if not 0.0 <= float(self.pretrain_transformed) <= 1.0:
            raise ValueError(f"pretrain_transformed must be in [0, 1], got {self.pretrain_transformed}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})")
        if self.width % self.heads:
            raise ValueError(f"width ({self.width}) must be divisible by heads ({self.heads})")
        if not 0 < self.n_test < DIGITS_N:
            raise ValueError(f"n_test must be in 1 ... {DIGITS_N - 1}, got {self.n_test}")
        pool = DIGITS_N - self.n_test
        if self.n_train is not None and not 0 < self.n_train <= pool:
            raise ValueError(f"n_train must be in 1 ... {pool} (the train pool) or null, got {self.n_train}")
        for key in ("layers", "pretrain_steps", "pretrain_batch", "finetune_steps", "finetune_batch", "mlp_ratio", "projection_dim"):
            if int(getattr(self, key)) < 1:
                raise ValueError(f"{key} must be a positive integer, got {getattr(self, key)}")


    @property
    def train_pool_size(self) -> int:
        return DIGITS_N - self.n_test

    @property
    def train_size(self) -> int:
        return self.n_train if self.n_train is not None else self.train_pool_size


#: the over-interfering stress regime (``backbone=embedded_interference``): the default
#: recipe before build v2 (upright-only pre-training, heads on each task's own split,
#: hard fine-tuning on conflicting label sets)
INTERFERENCE_SPEC = EmbeddedSpec(
    tasks=INTERFERENCE_TASKS,
    pretrain_data="upright",
    pretrain_transformed=1.0,
    pretrain_steps=400,
    pretrain_batch=128,
    pretrain_lr=1e-3,
    head_source="task",
    finetune_steps=100,
    finetune_batch=64,
    finetune_lr=3e-4,
)


def expected_split_sizes(spec: EmbeddedSpec | Mapping[str, Any] | None = None) -> dict[str, dict[str, int]]:
    """``{"train": {task: n}, "test": {task: n}}`` without building anything."""
    spec = EmbeddedSpec.from_config(spec)
    return {
        "train": {t: spec.train_size for t in spec.tasks},
        "test": {t: spec.n_test for t in spec.tasks},
    }


# --------------------------------------------------------------------------------------
# cache location and validation (featcal.cache: lock, manifest, rebuild)
# --------------------------------------------------------------------------------------
def cache_path(spec: EmbeddedSpec, cache_dir: str | os.PathLike | None = None) -> Path:
    return spec.cache_path(cache_dir)


def validate_cache(folder: Path, spec: EmbeddedSpec) -> str | None:
    """``None`` if ``folder`` holds a complete build of ``spec``, else the reason it does not."""
    return spec.cache_problem(folder)


def ensure_built(spec: EmbeddedSpec | Mapping[str, Any] | None = None, cache_dir: str | os.PathLike | None = None,
                 device: str | torch.device | None = None, progress: bool = True) -> Path:
    """The folder of a complete, verified build of ``spec``, built if needed (``featcal.cache.ensure_suite``)."""
    spec = EmbeddedSpec.from_config(spec)
    # ``build`` is looked up per call, not bound at import: tests replace it to count builds
    return ensure_suite(spec, cache_dir, lambda tmp: build(spec, tmp, device=device, progress=progress))


# --------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------
def _task_generator(spec: EmbeddedSpec, name: str, salt: str = "") -> torch.Generator:
    digest = hashlib.sha256(f"{spec.seed}:{name}:{salt}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def _load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = torch.tensor(d.images, dtype=torch.float32) / 16.0  # [N, 8, 8] in [0, 1]
    labels = torch.tensor(d.target, dtype=torch.long)
    if images.shape[0] != DIGITS_N:
        raise RuntimeError(f"sklearn digits has {images.shape[0]} images, expected {DIGITS_N}")
    return images, labels


def _pools(spec: EmbeddedSpec) -> dict[str, torch.Tensor]:
    """Indices of the test pool and the train pool (a seeded split of the 1797 images)."""
    perm = torch.randperm(DIGITS_N, generator=_task_generator(spec, "__split__"))
    return {"test": perm[: spec.n_test], "train": perm[spec.n_test:]}


def _upscale(images8: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(images8[:, None], size=(size, size), mode="bilinear", align_corners=False).clamp(0.0, 1.0)


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return (x - 0.5) / 0.5


def make_task_data(spec: EmbeddedSpec, name: str, images8: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """A task's splits: transformed pixel values (float16 storage) and mapped labels."""
    tdef = TASKS[name]
    pools = _pools(spec)
    g_order = _task_generator(spec, name, "order")
    train_idx = pools["train"][torch.randperm(len(pools["train"]), generator=g_order)][: spec.train_size]
    test_idx = pools["test"]
    out: dict[str, torch.Tensor] = {}
    for split, idx in (("train", train_idx), ("test", test_idx)):
        g_fixed = _task_generator(spec, name, "fixed")  # same constants (e.g. permutation) on both splits
        g_sample = _task_generator(spec, name, f"sample-{split}")
        x = tdef.transform(_upscale(images8[idx], spec.image_size), spec, g_fixed, g_sample)
        out[f"{split}_x"] = _normalise(x).to(torch.float16).contiguous()
        out[f"{split}_y"] = tdef.label(labels[idx]).long().contiguous()
        out[f"{split}_index"] = idx.long().contiguous()
    return out


# --------------------------------------------------------------------------------------
# the build
# --------------------------------------------------------------------------------------
def clip_config(spec: EmbeddedSpec):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=spec.width,
        intermediate_size=spec.width * spec.mlp_ratio,
        projection_dim=spec.projection_dim,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_channels=3,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        hidden_act="quick_gelu",
        attention_dropout=0.0,
    )


def _uniform(n: int, g: torch.Generator) -> Callable[..., torch.Tensor]:
    """``u(lo, hi, *shape)``: per-image uniform draws [n, *shape] from ``g``."""

    def u(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, *shape, generator=g)

    return u


def _random_affine(x: torch.Tensor, u: Callable[..., torch.Tensor], angle: float, scale: tuple[float, float],
                   shift: float, padding: str) -> torch.Tensor:
    """Each image rotated by up to ±``angle`` rad, scaled by a factor in ``scale`` and shifted
    by up to ±``shift`` (fractions of the half-width), bilinear; draws angle, scale, x, y in
    turn (the order the cached builds were made with)."""
    a = u(-angle, angle)
    s = u(*scale)
    tx, ty = u(-shift, shift), u(-shift, shift)
    cos, sin = torch.cos(a) / s, torch.sin(a) / s
    theta = torch.stack([torch.stack([cos, -sin, tx], -1), torch.stack([sin, cos, ty], -1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode=padding, align_corners=False)


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Mild generic augmentations of gray images in [0, 1]: affine jitter, tint, contrast, noise."""
    u = _uniform(x.shape[0], g)
    y = _random_affine(x, u, angle=0.35, scale=(0.85, 1.15), shift=0.15, padding="zeros")  # about ±20°
    y = y * u(0.6, 1.0, 1, 1, 1)  # contrast
    y = y.expand(-1, 3, -1, -1) * u(0.5, 1.0, 3, 1, 1)  # colour tint
    y = y + torch.randn(y.shape, generator=g) * u(0.0, 0.15, 1, 1, 1)
    return _normalise(y.clamp(0.0, 1.0))


def _jitter(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Mild jitter of normalised RGB images: small affine moves, contrast and noise."""
    u = _uniform(x.shape[0], g)
    y = _random_affine(x, u, angle=0.2, scale=(0.9, 1.1), shift=0.1, padding="border")  # about ±11°
    return y * u(0.7, 1.0, 1, 1, 1) + torch.randn(y.shape, generator=g) * u(0.0, 0.2, 1, 1, 1)


def _batches(n: int, batch: int, steps: int, g: torch.Generator) -> Iterator[torch.Tensor]:
    """``steps`` index batches, epoch by epoch through seeded permutations."""
    perm, pos = torch.randperm(n, generator=g), 0
    for _ in range(steps):
        if pos + batch > n:
            perm, pos = torch.randperm(n, generator=g), 0
        yield perm[pos: pos + batch]
        pos += batch


def _train(
    model: nn.Module,
    head: Callable[[torch.Tensor], torch.Tensor],
    extra_params: list[nn.Parameter],
    x: torch.Tensor,
    y: torch.Tensor,
    steps: int,
    batch: int,
    lr: float,
    spec: EmbeddedSpec,
    g: torch.Generator,
    device: torch.device,
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None,
    desc: str,
    progress: bool,
) -> float:
    batch = min(batch, x.shape[0])

    def loss_of(idx: torch.Tensor) -> torch.Tensor:
        xb = x[idx]
        if augment is not None:
            xb = augment(xb, g)
        logits = head(model(pixel_values=xb.to(device)).image_embeds)
        return F.cross_entropy(logits, y[idx].to(device))

    return train_adamw(
        model, _batches(x.shape[0], batch, steps, g), loss_of, steps, lr, spec.weight_decay, spec.warmup_frac,
        ema_weight=0.1, extra_params=extra_params, desc=desc, progress=progress,
    )


@torch.no_grad()
def _embed(model: nn.Module, x: torch.Tensor, device: torch.device, batch: int = 512) -> torch.Tensor:
    model.eval()
    out = [model(pixel_values=x[i: i + batch].float().to(device)).image_embeds.float().cpu() for i in range(0, x.shape[0], batch)]
    return torch.cat(out)


def prototypes(embeddings: torch.Tensor, labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Normalised class means of normalised embeddings, centred by the mean over classes."""
    z = F.normalize(embeddings.float(), dim=-1)
    means = torch.stack([z[labels == c].mean(0) for c in range(n_classes)])
    return F.normalize(means - means.mean(0, keepdim=True), dim=-1)


def _accuracy(emb: torch.Tensor, labels: torch.Tensor, head: ClassEmbeddingHead) -> float:
    return 100.0 * float((head(emb).argmax(-1) == labels).float().mean())


def pretraining_data(
    spec: EmbeddedSpec, images8: torch.Tensor, digits: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, Callable[[torch.Tensor, torch.Generator], torch.Tensor]]:
    """(inputs, digit labels, per-batch augmentation) of the base's pre-training.

    ``union``: the whole train pool upright plus once through every task's transform
    (the task's fixed constants, its own per-example draws), normalised RGB, jittered
    per batch by ``_jitter``. ``upright``: upright gray train-pool digits, augmented
    per batch by ``_augment`` (the pre-v2 recipe). Labels are digit identity either way;
    no test-pool image is used.
    """
    pool = _pools(spec)["train"]
    upright = _upscale(images8[pool], spec.image_size)
    if spec.pretrain_data == "upright":
        return upright, digits[pool], _augment
    xs, ys = [_normalise(_gray(upright))], [digits[pool]]
    n_sub = int(round(float(spec.pretrain_transformed) * len(pool)))
    for name in spec.tasks:
        if n_sub == 0:
            break
        g_fixed = _task_generator(spec, name, "fixed")
        g_sample = _task_generator(spec, name, "sample-pretrain")
        if n_sub < len(pool):
            sub = torch.randperm(len(pool), generator=_task_generator(spec, name, "pretrain-subset"))[:n_sub]
        else:
            sub = torch.arange(len(pool))
        xs.append(_normalise(TASKS[name].transform(upright[sub], spec, g_fixed, g_sample)))
        ys.append(digits[pool][sub])
    x = torch.cat(xs).to(torch.float16).float()  # the precision the task splits are stored in
    return x, torch.cat(ys), _jitter


def canonical_inputs(spec: EmbeddedSpec, images8: torch.Tensor, digits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Upright, untransformed train-pool digits (normalised RGB) and their digit labels."""
    pool = _pools(spec)["train"]
    return _normalise(_gray(_upscale(images8[pool], spec.image_size))), digits[pool]


def zero_shot_head(
    spec: EmbeddedSpec,
    name: str,
    base: nn.Module,
    data: Mapping[str, torch.Tensor],
    images8: torch.Tensor,
    digits: torch.Tensor,
    device: torch.device,
    canonical: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Class embeddings [C, D] of a task's frozen head, from the base (see ``head_source``).

    ``canonical``: a dict kept by the caller across the tasks of one build; the base's
    embeddings of the canonical inputs (the same for every task, only the label map
    differs) are computed once and reused from it (the same numbers as recomputing)."""
    tdef = TASKS[name]
    if spec.head_source == "task":
        return prototypes(_embed(base, data["train_x"], device), data["train_y"], tdef.n_classes)
    if canonical is not None and "embeddings" in canonical:
        emb, y = canonical["embeddings"], canonical["digits"]
    else:
        x, y = canonical_inputs(spec, images8, digits)
        emb = _embed(base, x, device)
        if canonical is not None:
            canonical.update(embeddings=emb, digits=y)
    return prototypes(emb, tdef.label(y), tdef.n_classes)


def build(
    spec: EmbeddedSpec,
    out: Path,
    device: str | torch.device | None = None,
    progress: bool = True,
    threads: int | None = BUILD_THREADS,
    workers: int | None = None,
    pinned: bool = True,
) -> dict[str, Any]:
    """Build ``spec`` into the (new) folder ``out``; the manifest is written last.

    ``device``: where to train (``None``: the CPU, the portable build; ``"auto"``: cuda if
    available). On the CPU with ``pinned`` (the default) every step runs in child processes
    pinned to the x86-64 baseline kernels (``featcal.suite_build``): the same files on every
    x86-64 CPU; the base first, then the experts in ``workers`` children at once (default:
    ``$FEATCAL_BUILD_WORKERS`` or the usable cores), the same files whatever their number.
    Otherwise (a GPU, or ``pinned=False``) the steps run in this process with ``threads``
    intra-op threads (``None``: leave torch's setting) and the manifest marks the build
    not portable.
    """
    return suite_build.build_suite(spec, Path(out), device, progress, threads, workers, pinned,
                                   f"{__name__}:_build_base", f"{__name__}:_build_expert")


def preload() -> None:
    """Import what the build steps use (a pinned worker does this while the base trains)."""
    from transformers import CLIPVisionModelWithProjection  # noqa: F401


def _build_base(spec: Mapping[str, Any], out: str, device: str, progress: bool) -> dict[str, Any]:
    """Step 1 (a pinned child, see ``build``): the task splits, the pre-trained base and the
    zero-shot heads into ``out``."""
    from safetensors.torch import save_file
    from transformers import CLIPVisionModelWithProjection

    spec = EmbeddedSpec.from_config(spec)
    out, dev = Path(out), torch.device(device)
    suite_build.quiet(progress)
    started, cpu0 = time.time(), time.process_time()
    images8, digits = _load_digits()
    timings: dict[str, float] = {}

    # ---- data ---------------------------------------------------------------
    data = {t: make_task_data(spec, t, images8, digits) for t in spec.tasks}
    (out / "data").mkdir()
    for t, d in data.items():
        save_file(d, str(out / "data" / f"{t}.safetensors"), metadata={"task": t})

    # ---- base: generic pre-training ------------------------------------------
    t0 = time.time()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        base = CLIPVisionModelWithProjection(clip_config(spec))
        throwaway = torch.randn(10, spec.projection_dim) * 0.02
    base.to(dev)
    w = nn.Parameter(throwaway.to(dev))

    def cosine_head(z: torch.Tensor) -> torch.Tensor:
        return 20.0 * F.normalize(z, dim=-1) @ F.normalize(w, dim=-1).t()

    pre_x, pre_y, augment = pretraining_data(spec, images8, digits)
    pre_loss = _train(
        base, cosine_head, [w], pre_x, pre_y, spec.pretrain_steps, spec.pretrain_batch, spec.pretrain_lr,
        spec, _task_generator(spec, "__pretrain__"), dev, augment, "pretrain base", progress,
    )
    base.eval()
    timings["pretrain"] = time.time() - t0

    # ---- heads: zero-shot prototypes of the base ------------------------------
    heads: dict[str, torch.Tensor] = {}
    zero_shot: dict[str, float] = {}
    canonical: dict[str, torch.Tensor] = {}  # the base's embeddings of the canonical inputs, once
    for t in spec.tasks:
        d = data[t]
        heads[t] = zero_shot_head(spec, t, base, d, images8, digits, dev, canonical)
        head = ClassEmbeddingHead(heads[t], spec.logit_scale)
        zero_shot[t] = _accuracy(_embed(base, d["test_x"], dev), d["test_y"], head)
    save_file({t: h.contiguous().cpu() for t, h in heads.items()}, str(out / "heads.safetensors"))
    base.save_pretrained(str(out / "base"), safe_serialization=True)
    timings["data_base_heads"] = time.time() - started - timings["pretrain"]
    return {
        "fields": {
            "tasks": {t: {"n_classes": TASKS[t].n_classes, "description": TASKS[t].description} for t in spec.tasks},
            "split_sizes": expected_split_sizes(spec),
            "pretrain_final_loss": pre_loss,
            "metrics": {"base_zero_shot": zero_shot},
        },
        "seconds": timings,
        "cpu": {"base": time.process_time() - cpu0},
    }


def _build_expert(spec: Mapping[str, Any], out: str, device: str, progress: bool, task: str) -> dict[str, Any]:
    """Step 2 (one per task, pinned children in parallel, see ``build``): fine-tune the
    task's expert from the saved base with its frozen head; save it, return its accuracy.
    Reads only the step-1 files, so its bytes do not depend on the other experts."""
    from safetensors.torch import load_file
    from transformers import CLIPVisionModelWithProjection

    spec = EmbeddedSpec.from_config(spec)
    out, dev = Path(out), torch.device(device)
    suite_build.quiet(progress)
    t0, c0 = time.time(), time.process_time()
    d = load_file(str(out / "data" / f"{task}.safetensors"))
    heads = load_file(str(out / "heads.safetensors"))
    expert = CLIPVisionModelWithProjection.from_pretrained(str(out / "base")).to(dev)
    head = ClassEmbeddingHead(heads[task], spec.logit_scale).to(dev)
    _train(
        expert, head, [], d["train_x"].float(), d["train_y"], spec.finetune_steps, spec.finetune_batch,
        spec.finetune_lr, spec, _task_generator(spec, task, "finetune"), dev, None, f"fine-tune {task}", progress,
    )
    accuracy = _accuracy(_embed(expert, d["test_x"], dev), d["test_y"], head.cpu())
    expert.save_pretrained(str(out / "experts" / task), safe_serialization=True)
    return {"task": task, "fields": [(["metrics", "experts"], accuracy)], "seconds": time.time() - t0, "cpu": time.process_time() - c0}


# --------------------------------------------------------------------------------------
# shared by the adapter (featcal.backbone.embedded) and the task pool
# --------------------------------------------------------------------------------------
def _spec_from(tasks: list[str] | None, spec: Any, overrides: Mapping[str, Any]) -> EmbeddedSpec:
    given = dataclasses.asdict(spec) if isinstance(spec, EmbeddedSpec) else dict(spec or {})
    given.update(overrides)
    if tasks is not None:
        if "tasks" in given:
            if not set(map(str, tasks)) <= set(map(str, given["tasks"])) or len(set(tasks)) != len(tasks):
                raise ValueError(f"tasks {list(tasks)} disagree with spec.tasks {list(given['tasks'])}: "
                                 "they must be distinct tasks of the spec (a subset selects those experts)")
        else:
            given["tasks"] = list(tasks)
    return EmbeddedSpec.from_config(given)


class EmbeddedBuild:
    """The spec, cache location and build device of one embedded suite, and its cache
    folder: built (or validated) on first use, then remembered."""

    def _init_build(
        self,
        tasks: list[str] | None,
        spec: Mapping[str, Any] | EmbeddedSpec | None,
        cache_dir: str | None,
        build_device: str | None,
        spec_overrides: Mapping[str, Any],
    ) -> None:
        self.spec = _spec_from(tasks, spec, spec_overrides)
        #: the tasks this object serves: ``tasks`` (a subset of the built suite, in the given
        #: order) or every task of the spec; the cache is the whole suite's either way
        self.selected = [str(t) for t in tasks] if tasks is not None else list(self.spec.tasks)
        self.cache_dir = cache_dir
        self.build_device = build_device
        self._folder: Path | None = None

    @property
    def folder(self) -> Path:
        if self._folder is None:
            self._folder = ensure_built(self.spec, self.cache_dir, device=self.build_device)
        return self._folder

    def suite_identity(self) -> dict[str, Any]:
        """The build's identity for ``results.json`` (``featcal.suite_build.suite_identity``);
        warns when the build is not portable."""
        from featcal.suite_build import announce_identity

        return announce_identity(self.folder, self.spec.SUITE)
