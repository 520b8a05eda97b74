"""Validation of a composed run config, before any model or dataset is loaded.

Hydra itself rejects unknown group options ("Could not find 'merge/foo'. Available
options in 'merge': ...") and unknown keys (struct mode). This module checks values:
each problem names the key, the value given and what is allowed, and all problems
are reported at once.
"""
from __future__ import annotations

import math
import re
from typing import Any

from omegaconf import DictConfig, OmegaConf


class ConfigError(ValueError):
    """The run config is invalid; the message lists every problem."""


_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
PRECISIONS = ("fp32", "bf16", "fp16")
SPLITS = ("train", "test")
LOGGERS = ("wandb", "none")
WANDB_MODES = ("offline", "online", "disabled")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))


def _get(cfg: DictConfig, key: str, default: Any = None) -> Any:
    return OmegaConf.select(cfg, key, default=default)


def validate(cfg: DictConfig) -> None:
    """Raise ``ConfigError`` listing every invalid value in ``cfg``."""
    problems: list[str] = []

    def bad(key: str, value: Any, allowed: str) -> None:
        problems.append(f"{key}={value!r}: {allowed}")

    # ---- required values left as ??? ---------------------------------------
    for key in sorted(OmegaConf.missing_keys(cfg)):
        if not key.startswith("hydra."):
            problems.append(f"{key}: required but not set (pass it on the command line: {key}=...)")

    # ---- top level ----------------------------------------------------------
    seed = _get(cfg, "seed")
    if not _is_int(seed) or seed < 0:
        bad("seed", seed, "must be a non-negative integer")
    device = _get(cfg, "device")
    if not isinstance(device, str) or not _DEVICE.match(device):
        bad("device", device, "allowed: auto, cpu, cuda, cuda:N, mps")
    precision = _get(cfg, "precision")
    if precision not in PRECISIONS:
        bad("precision", precision, f"allowed: {', '.join(PRECISIONS)}")
    for key in ("eval_batch_size",):
        v = _get(cfg, key)
        if not _is_int(v) or v < 1:
            bad(key, v, "must be a positive integer")
    v = _get(cfg, "resume", True)
    if not isinstance(v, bool):
        bad("resume", v, "must be true or false")
    v = _get(cfg, "num_workers")
    if not _is_int(v) or v < 0:
        bad("num_workers", v, "must be a non-negative integer")

    # ---- backbone ----------------------------------------------------------
    tasks: list[str] = []
    if _get(cfg, "backbone.adapter._target_") is None:
        bad("backbone.adapter._target_", None, "every backbone config needs an adapter with a _target_")
    if _get(cfg, "backbone.taskpool._target_") is None:
        bad("backbone.taskpool._target_", None, "every backbone config needs a taskpool with a _target_")
    tasks_node = _get(cfg, "backbone.adapter.tasks")
    if tasks_node is None or len(tasks_node) == 0:
        bad("backbone.adapter.tasks", tasks_node, "must list at least one task")
    else:
        tasks = [str(t) for t in tasks_node]
        if len(set(tasks)) != len(tasks):
            bad("backbone.adapter.tasks", tasks, "task names must be unique")

    # ---- budget -------------------------------------------------------------
    n = _get(cfg, "budget.per_task")
    split = _get(cfg, "budget.split", "train")
    if split not in SPLITS:
        bad("budget.split", split, f"allowed: {', '.join(SPLITS)}")
    if not _is_int(n) or n < 1:
        bad("budget.per_task", n, "must be a positive integer (calibration examples per task, e.g. 8 ... 256)")
    elif split in SPLITS and tasks:
        sizes = _get(cfg, f"backbone.{split}_sizes")
        if sizes is not None:
            sizes = {str(k): int(v) for k, v in OmegaConf.to_container(sizes).items()}
            missing = [t for t in tasks if t not in sizes]
            if missing:
                bad(f"backbone.{split}_sizes", sorted(sizes), f"has no size for tasks {missing}")
            else:
                smallest = min(tasks, key=lambda t: sizes[t])
                if n > sizes[smallest]:
                    bad(
                        "budget.per_task",
                        n,
                        f"larger than the {split} split of task '{smallest}' ({sizes[smallest]} examples); "
                        f"allowed: 1 ... {sizes[smallest]}",
                    )

    # ---- merge --------------------------------------------------------------
    if _get(cfg, "merge._target_") is None:
        bad("merge._target_", None, "the merge config needs a _target_")
    lam = _get(cfg, "merge.scaling_factor")
    if lam is not None and (not _is_num(lam) or not 0.0 < float(lam) <= 1.0):
        bad("merge.scaling_factor", lam, "must be a number in (0, 1]")
    density = _get(cfg, "merge.density")
    if density is not None and (not _is_num(density) or not 0.0 < float(density) <= 1.0):
        bad("merge.density", density, "must be a number in (0, 1]")
    drop = _get(cfg, "merge.drop_rate")
    if drop is not None and (not _is_num(drop) or not 0.0 <= float(drop) < 1.0):
        bad("merge.drop_rate", drop, "must be a number in [0, 1)")

    ratio = _get(cfg, "merge.reduce_non_diagonal_ratio")
    if ratio is not None and (not _is_num(ratio) or not 0.0 <= float(ratio) <= 1.0):
        bad("merge.reduce_non_diagonal_ratio", ratio, "must be a number in [0, 1]")
    solve = _get(cfg, "merge.solve_dtype")
    if solve is not None and solve not in ("float32", "float64"):
        bad("merge.solve_dtype", solve, "allowed: float32, float64")
    steps = _get(cfg, "merge.steps")
    if steps is not None and (not _is_int(steps) or steps < 0):
        bad("merge.steps", steps, "must be an integer >= 0")
    for key in ("merge.lr", "merge.init"):
        v = _get(cfg, key)
        if v is not None and (not _is_num(v) or float(v) < 0):
            bad(key, v, "must be a number >= 0")

    # ---- calibration --------------------------------------------------------
    if _get(cfg, "calibration._target_") is None:
        bad("calibration._target_", None, "the calibration config needs a _target_")
    checks = {
        "lambda_ratio": (lambda x: _is_num(x) and x >= 0, "must be a number >= 0"),
        "alpha": (lambda x: _is_num(x) and 0.0 <= x <= 1.0, "must be a number in [0, 1]"),
        "rho": (lambda x: _is_num(x), "must be a finite number (1 anchors at the merged weights)"),
        "eps": (lambda x: _is_num(x) and x >= 0, "must be a number >= 0"),
        "batch_size": (lambda x: _is_int(x) and x >= 1, "must be a positive integer"),
        "iterations": (lambda x: _is_int(x) and x >= 1, "must be a positive integer"),
        "batches_per_iteration": (lambda x: _is_int(x) and x >= 1, "must be a positive integer"),
        "steps": (lambda x: x is None or (_is_int(x) and x >= 1), "must be a positive integer or null"),
        "lr": (lambda x: _is_num(x) and x > 0, "must be a number > 0"),
        "hidden_dim": (lambda x: _is_int(x) and x >= 1, "must be a positive integer"),
        "kl_weight": (lambda x: _is_num(x) and x >= 0, "must be a number >= 0"),
        "last_block_patch_weight": (lambda x: _is_num(x) and x >= 0, "must be a number >= 0"),
        "drift_examples": (lambda x: x is None or (_is_int(x) and x >= 0), "must be an integer >= 0 or null (all)"),
        "pass_tokens": (lambda x: x is None or (_is_int(x) and x >= 0), "must be an integer >= 0 or null (no joining)"),
    }
    cal = _get(cfg, "calibration")
    if cal is not None:
        for key, (ok, allowed) in checks.items():
            if key in cal:
                value = cal[key]
                if not ok(value):
                    bad(f"calibration.{key}", value, allowed)

    # ---- logger -------------------------------------------------------------
    lname = _get(cfg, "logger.name")
    if lname not in LOGGERS:
        bad("logger.name", lname, f"allowed: {', '.join(LOGGERS)}")
    if lname == "wandb":
        mode = _get(cfg, "logger.mode", "offline")
        if mode not in WANDB_MODES:
            bad("logger.mode", mode, f"allowed: {', '.join(WANDB_MODES)}")

    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))
