"""The embedded suite's data: scikit-learn's 8x8 digits, one input transform and label map per task.

``TASKS``: every task the suite knows (``TaskDef``: a fixed input transform and a label map);
``make_task_data``: a task's stored splits; ``pretraining_data`` / ``canonical_inputs``: what
the base is pre-trained on and what its zero-shot heads describe. All draws come from seeded
generators (``task_generator``), so a spec gives the same data everywhere. The spec is
``featcal.suites.embedded.spec``, the build ``featcal.suites.embedded.build``.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from featcal.suites.embedded.spec import EmbeddedSpec

#: number of images in sklearn's digits dataset
DIGITS_N = 1797


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
# data
# --------------------------------------------------------------------------------------
def task_generator(spec: EmbeddedSpec, name: str, salt: str = "") -> torch.Generator:
    digest = hashlib.sha256(f"{spec.seed}:{name}:{salt}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = torch.tensor(d.images, dtype=torch.float32) / 16.0  # [N, 8, 8] in [0, 1]
    labels = torch.tensor(d.target, dtype=torch.long)
    if images.shape[0] != DIGITS_N:
        raise RuntimeError(f"sklearn digits has {images.shape[0]} images, expected {DIGITS_N}")
    return images, labels


def _pools(spec: EmbeddedSpec) -> dict[str, torch.Tensor]:
    """Indices of the test pool and the train pool (a seeded split of the 1797 images)."""
    perm = torch.randperm(DIGITS_N, generator=task_generator(spec, "__split__"))
    return {"test": perm[: spec.n_test], "train": perm[spec.n_test:]}


def _upscale(images8: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(images8[:, None], size=(size, size), mode="bilinear", align_corners=False).clamp(0.0, 1.0)


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return (x - 0.5) / 0.5


def make_task_data(spec: EmbeddedSpec, name: str, images8: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """A task's splits: transformed pixel values (float16 storage) and mapped labels."""
    tdef = TASKS[name]
    pools = _pools(spec)
    g_order = task_generator(spec, name, "order")
    train_idx = pools["train"][torch.randperm(len(pools["train"]), generator=g_order)][: spec.train_size]
    test_idx = pools["test"]
    out: dict[str, torch.Tensor] = {}
    for split, idx in (("train", train_idx), ("test", test_idx)):
        g_fixed = task_generator(spec, name, "fixed")  # same constants (e.g. permutation) on both splits
        g_sample = task_generator(spec, name, f"sample-{split}")
        x = tdef.transform(_upscale(images8[idx], spec.image_size), spec, g_fixed, g_sample)
        out[f"{split}_x"] = _normalise(x).to(torch.float16).contiguous()
        out[f"{split}_y"] = tdef.label(labels[idx]).long().contiguous()
        out[f"{split}_index"] = idx.long().contiguous()
    return out


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
        g_fixed = task_generator(spec, name, "fixed")
        g_sample = task_generator(spec, name, "sample-pretrain")
        if n_sub < len(pool):
            sub = torch.randperm(len(pool), generator=task_generator(spec, name, "pretrain-subset"))[:n_sub]
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

