"""The embedded_t5 suite's spec: every knob of a build; its hash names the cache folder.

``EmbeddedT5Spec`` and ``expected_split_sizes`` (the split sizes a spec gives, without
building). The tasks it may name are ``featcal.suites.embedded_t5.data.TASKS``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from featcal.cache import SuiteSpec
from featcal.suites.embedded_t5.data import DEFAULT_TASKS, TASKS

#: bump when the build procedure changes: old caches then live under another hash
BUILD_VERSION = 2  # 2: pinned portable builds (featcal.suites.build), experts from the saved base


# --------------------------------------------------------------------------------------
# the spec
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EmbeddedT5Spec(SuiteSpec):
    """Every knob of the build. Its hash names the cache folder."""

    SUITE = "embedded_t5"
    CACHE_DIR = "embedded_t5"
    LABEL = "embedded_t5 suite"
    BUILD_VERSION = BUILD_VERSION
    # the layout ``_build`` writes (see ``SuiteSpec.required_files``): every model folder
    # carries the tokenizer, so it loads through the normal T5 loaders
    MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
    DATA_SUFFIX = ".json"

    tasks: tuple[str, ...] = DEFAULT_TASKS
    # architecture (T5 v1.1 / FLAN-T5 layout, reduced)
    d_model: int = 64
    d_ff: int = 128
    layers: int = 2  # encoder blocks = decoder blocks
    heads: int = 4
    # data: examples per task
    n_train: int = 1000
    n_test: int = 500
    # base pre-training: generic objectives + a share of the tasks' train examples
    pretrain_steps: int = 600
    pretrain_batch: int = 64
    pretrain_lr: float = 3e-3
    pretrain_mix: float = 0.03
    # expert fine-tuning (whole model, gentle)
    finetune_steps: int = 60
    finetune_batch: int = 32
    finetune_lr: float = 5e-4
    weight_decay: float = 0.01
    warmup_frac: float = 0.1
    seed: int = 0

    def __post_init__(self):
        self._check_tasks(TASKS)
        if self.d_model % self.heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by heads ({self.heads})")
        for key in ("d_model", "d_ff", "layers", "heads", "n_train", "n_test", "pretrain_steps", "pretrain_batch", "finetune_steps", "finetune_batch"):
            if int(getattr(self, key)) < 1:
                raise ValueError(f"{key} must be a positive integer, got {getattr(self, key)}")
        if not 0.0 <= float(self.pretrain_mix) <= 1.0:
            raise ValueError(f"pretrain_mix must be in [0, 1], got {self.pretrain_mix}")


def expected_split_sizes(spec: EmbeddedT5Spec | Mapping[str, Any] | None = None) -> dict[str, dict[str, int]]:
    """``{"train": {task: n}, "test": {task: n}}`` without building anything."""
    spec = EmbeddedT5Spec.from_config(spec)
    return {"train": {t: spec.n_train for t in spec.tasks}, "test": {t: spec.n_test for t in spec.tasks}}
