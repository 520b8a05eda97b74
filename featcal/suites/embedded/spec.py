"""The embedded suite's spec: every knob of a build; its hash names the cache folder.

``EmbeddedSpec`` (the default suite), ``INTERFERENCE_SPEC`` (the over-interfering stress
regime) and ``expected_split_sizes`` (the split sizes a spec gives, without building).
The tasks it may name are ``featcal.suites.embedded.data.TASKS``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from featcal.cache import SuiteSpec
from featcal.suites.embedded.data import DEFAULT_TASKS, DIGITS_N, INTERFERENCE_TASKS, TASKS

#: bump when the build procedure changes: old caches then live under another hash
BUILD_VERSION = 4  # 4: pinned portable builds (featcal.suites.build), experts from the saved base
PRETRAIN_DATA = ("union", "upright")
HEAD_SOURCES = ("canonical", "task")


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


