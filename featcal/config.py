"""Validation of a composed run config, before any model or dataset is loaded.

Hydra itself rejects unknown group options ("Could not find 'merge/foo'. Available
options in 'merge': ...") and unknown keys (struct mode; ``featcal.strict`` rewords its
message, and rejects keys added with ``+key=`` too). This module checks the
top-level keys, the budget and the backbone's task list, and collects what every
configured object (adapter, task pool, merge function, calibrator) says about its own
node through its ``validate_config(node) -> list[str]`` (next to its code). Each
problem names the key, the value given and what is allowed; all are reported at once.
"""
from __future__ import annotations

import math
import re
from typing import Any

from omegaconf import DictConfig, OmegaConf

from featcal.errors import ConfigError




_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
PRECISIONS = ("fp32", "bf16", "fp16")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))


def _get(cfg: DictConfig, key: str, default: Any = None) -> Any:
    return OmegaConf.select(cfg, key, default=default)


def _target_object(target: str) -> Any:
    from hydra.utils import get_object

    return get_object(target)


def _own_problems(path: str, node: DictConfig) -> list[str]:
    """The problems the ``_target_`` of ``node`` reports for it through its
    ``validate_config(node: dict) -> list[str]`` (a classmethod or a function attribute),
    each prefixed with ``path``."""
    try:
        data = OmegaConf.to_container(node, resolve=True, throw_on_missing=False)
    except Exception:  # noqa: BLE001 - a broken interpolation is reported by Hydra itself
        data = OmegaConf.to_container(node, resolve=False)
    # descriptive and Hydra keys are not the object's; ??? values are reported above
    data = {k: v for k, v in data.items() if not str(k).startswith("_") and k != "name" and v != "???"}
    target = str(node["_target_"])
    try:
        obj = _target_object(target)
    except Exception as err:  # noqa: BLE001 - any import problem is a config problem here
        return [f"{path}._target_={target!r}: cannot be imported ({type(err).__name__}: {err})"]
    check = getattr(obj, "validate_config", None)
    if check is None:
        return []
    return [f"{path}.{p}" for p in check(data)]


def check_keys(node: dict, checks: dict[str, tuple]) -> list[str]:
    """``[f"{key}={value!r}: {allowed}"]`` for every key of ``node`` in ``checks`` whose
    value fails ``ok(value)``; ``checks = {key: (ok, allowed)}``. A helper for
    ``validate_config`` implementations."""
    out = []
    for key, (ok, allowed) in checks.items():
        if key in node and not ok(node[key]):
            out.append(f"{key}={node[key]!r}: {allowed}")
    return out


def positive_int(x: Any) -> bool:
    return _is_int(x) and x >= 1


def non_negative_number(x: Any) -> bool:
    return _is_num(x) and x >= 0


def number_in(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False):
    def ok(x: Any) -> bool:
        if not _is_num(x):
            return False
        x = float(x)
        return (x > lo if lo_open else x >= lo) and (x < hi if hi_open else x <= hi)

    return ok


def _backbone_tasks(cfg: DictConfig, problems: list[str]) -> list[str]:
    """The backbone's task list when it is valid (else [], its problems added): adapter and
    task pool present, tasks unique and known to the backbone's size tables or spec."""

    def bad(key: str, value: Any, allowed: str) -> None:
        problems.append(f"{key}={value!r}: {allowed}")

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
        # a task the backbone does not know (its split-size tables, or its spec's tasks)
        known: set[str] = set()
        for table in ("train_sizes", "test_sizes"):
            sizes = _get(cfg, f"backbone.{table}")
            if isinstance(sizes, DictConfig):
                known |= {str(k) for k in sizes.keys()}
        spec_tasks = _get(cfg, "backbone.spec.tasks")
        if not known and spec_tasks is not None:
            known = {str(t) for t in spec_tasks}
        unknown = [t for t in tasks if known and t not in known]
        if unknown:
            from featcal.strict import did_you_mean

            key = "backbone.tasks" if _get(cfg, "backbone.tasks") is not None else "backbone.adapter.tasks"
            hints = "".join(did_you_mean(t, known) for t in unknown[:1])
            problems.append(f"{key}={tasks}: unknown task(s) {unknown} for this backbone{hints}; "
                            f"known: {', '.join(sorted(known))}")
            tasks = []  # no size-table complaints about them
    return tasks


def validate(cfg: DictConfig, composed: DictConfig | None = None) -> None:
    """Raise ``ConfigError`` listing every invalid value in ``cfg``, and every key the run
    does not know (``featcal.strict``; ``composed``: the config with its ``hydra`` node,
    whose overrides show keys added with ``+``, when ``cfg`` has none)."""
    from featcal.strict import unknown_key_problems, _overrides_of

    problems: list[str] = []
    overrides, choices = _overrides_of(composed if composed is not None else cfg)
    problems.extend(unknown_key_problems(cfg, overrides, choices))

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
    debug = _get(cfg, "debug", False)
    if not isinstance(debug, bool):
        bad("debug", debug, "must be true or false (true: full tracebacks for user errors)")
    v = _get(cfg, "resume", True)
    if not isinstance(v, bool):
        bad("resume", v, "must be true or false")
    v = _get(cfg, "reference_cache", True)
    if not isinstance(v, bool):
        bad("reference_cache", v, "must be true or false (false: evaluate experts and base anew)")
    v = _get(cfg, "num_workers")
    if not _is_int(v) or v < 0:
        bad("num_workers", v, "must be a non-negative integer")

    # ---- backbone ----------------------------------------------------------
    tasks = _backbone_tasks(cfg, problems)

    # ---- budget: the one resolution every task pool uses (featcal/tasks/budget.py) ----
    from featcal.tasks.budget import config_problems

    def declared_sizes(split: str) -> dict[str, int] | None:
        sizes = _get(cfg, f"backbone.{split}_sizes")
        return None if sizes is None else {str(k): int(v) for k, v in OmegaConf.to_container(sizes).items()}

    budget = _get(cfg, "budget")
    budget = OmegaConf.to_container(budget) if isinstance(budget, DictConfig) else {}
    problems.extend(config_problems(budget, tasks, declared_sizes))

    # ---- each configured object checks its own keys ------------------------------
    for path in ("backbone.adapter", "backbone.taskpool", "merge", "calibration"):
        node = _get(cfg, path)
        if node is None or _get(cfg, f"{path}._target_") is None:
            if path in ("merge", "calibration"):
                bad(f"{path}._target_", None, f"the {path} config needs a _target_")
            continue
        problems.extend(_own_problems(path, node))
    # ---- combinations a backbone adapter rules out (``validate_run(cfg) -> list[str]``) ----
    target = _get(cfg, "backbone.adapter._target_")
    if target is not None:
        try:
            combo = getattr(_target_object(str(target)), "validate_run", None)
        except Exception:  # noqa: BLE001 - reported above
            combo = None
        problems.extend(combo(cfg) if combo is not None else [])

    # ---- logger: instantiated by _target_; its class checks its own keys ---------------
    node = _get(cfg, "logger")
    if node is None or _get(cfg, "logger._target_") is None:
        bad("logger._target_", None, "the logger config needs a _target_ (conf/logger/*.yaml: featcal.loggers.NoLogger, featcal.wandb_log.Wandb)")
    else:
        problems.extend(_own_problems("logger", node))

    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))


def compose(overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """The run config composed from the shipped configs (``featcal.paths.conf_dir``) with
    Hydra's compose API: what ``featcal-run <overrides> --cfg job`` prints, unresolved. For
    tools and tests outside a running Hydra app (e.g. ``compose(["backbone=embedded_small"])``
    gives a preset with its model and task pool filled in)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from featcal.paths import conf_dir

    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides))
