"""The one entrypoint: merge -> calibrate -> evaluate -> report.

    featcal-run                                   # embedded default, offline, CPU
    featcal-run merge=ties calibration=surgery budget=32
    featcal-run -m calibration=none,featcal,surgery budget=8,32,256
"""
from __future__ import annotations

import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from featcal.backbone.base import Backbone
from featcal.calibration.base import CalibratedModel, NoCalibration
from featcal.config import ConfigError, validate
from featcal.resume import config_hash, previous_results
from featcal.report import format_table, long_rows, per_task_table, with_average, write_results
from featcal.tasks.base import TaskPool, evaluate
from featcal.utils import DTYPES, StageTimer, current_rss_mib, peak_rss_mib, resolve_device, seed_everything
from featcal.wandb_log import WandbLogger

log = logging.getLogger("featcal")


def _build(node: DictConfig | dict, drop: tuple[str, ...] = ("name",)) -> Any:
    """Hydra-instantiate a config node (or its resolved dict), leaving out descriptive keys."""
    data = dict(node) if isinstance(node, dict) else OmegaConf.to_container(node, resolve=True)
    for key in drop:
        data.pop(key, None)
    return instantiate(data)


def _choices() -> dict[str, str]:
    try:
        return dict(HydraConfig.get().runtime.choices)
    except Exception:
        return {}


def _sweep_group() -> tuple[str | None, str | None]:
    """(W&B group, run name): runs of one multirun share the sweep folder's name as group."""
    try:
        hc = HydraConfig.get()
    except Exception:
        return None, None
    name = (hc.job.override_dirname or "default").replace("'", "")
    if hc.mode == RunMode.MULTIRUN:
        sweep = Path(hc.sweep.dir)
        return "sweep-" + "_".join(sweep.parts[-2:]), name
    return None, name


def _draw_calibration(cfg: DictConfig, pool: TaskPool) -> list[list[Any]]:
    """The run's calibration set: ``budget.per_task`` unlabeled examples per task, seeded."""
    cal_bs = int(cfg.calibration.get("batch_size", 16))
    return pool.calibration_set(int(cfg.budget.per_task), int(cfg.seed), cal_bs, str(cfg.budget.split))


# ---- merging (data-free merges, and merges that read the calibration set) ------------
def _merge_flag(merge_fn, name: str) -> bool:
    """A merge function's declared needs (looked up through ``functools.partial``)."""
    fn = merge_fn
    while fn is not None:
        if getattr(fn, name, False):
            return True
        fn = getattr(fn, "func", None)
    return False


def _merge(merge_fn, adapter: Backbone, pool: TaskPool, base, experts, calib, device) -> torch.nn.Module:
    """The merged model. A merge function with ``needs_calibration_data = True`` (RegMean,
    AdaMerging) also receives ``backbone=, base_model=, expert_models=, calib=, device=``
    (the same calibration set the calibrator gets later); with ``needs_heads = True``
    (AdaMerging) also ``heads=``: per task, a callable mapping the backbone's final
    representation to class logits, taken from the task pool."""
    extra: dict[str, Any] = {}
    if _merge_flag(merge_fn, "needs_calibration_data"):
        extra = dict(backbone=adapter, base_model=base, expert_models=experts, calib=calib, device=device)
        if _merge_flag(merge_fn, "needs_heads"):
            extra["heads"] = pool.heads()
    merged_sd = merge_fn(base.state_dict(), [e.state_dict() for e in experts], exclude=adapter.merge_excluded, **extra)
    return adapter.with_state_dict(base, merged_sd)


def run(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    """Run one configuration and write its results into ``out_dir``."""
    validate(cfg)  # before anything heavy: a bad value costs nothing
    done = previous_results(cfg, out_dir)  # resume: a complete run of the same config is not redone
    if done is not None:
        return done
    started = time.time()
    seed_everything(int(cfg.seed))
    device = resolve_device(cfg.device)
    dtype = DTYPES[cfg.precision]
    timer = StageTimer(device)
    choices = _choices()
    merge_fn = _build(cfg.merge)
    cal_node = OmegaConf.to_container(cfg.calibration, resolve=True)
    if "seed" in cal_node:  # one run seed drives data order and calibrator training alike
        cal_node["seed"] = int(cfg.seed)
    calibrator = _build(cal_node)
    adapter: Backbone = _build(cfg.backbone.adapter)
    pool: TaskPool = _build(cfg.backbone.taskpool)
    if torch.cuda.is_available() and device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    meta = {
        "backbone": str(cfg.backbone.get("name", choices.get("backbone", "?"))),
        "merge": str(cfg.merge.get("name", choices.get("merge", "?"))),
        "calibration": choices.get("calibration", type(calibrator).__name__.lower()),
        "budget": int(cfg.budget.per_task),
        "split": str(cfg.budget.split),
        "seed": int(cfg.seed),
    }
    log.info("run %s on %s", meta, device)
    group, run_name = _sweep_group()
    logger = None
    if cfg.logger.name == "wandb":
        logger = WandbLogger(
            OmegaConf.to_container(cfg.logger, resolve=True),
            out_dir,
            {**OmegaConf.to_container(cfg, resolve=True), "run": meta},
            name=run_name,
            group=group,
        )

    with timer.stage("load"):
        base = adapter.load_base()
        experts = adapter.load_experts()
        tasks = pool.names
        if tasks != adapter.tasks:
            raise ConfigError(f"task pool tasks {tasks} do not match backbone tasks {adapter.tasks}")

    calib = None
    if _merge_flag(merge_fn, "needs_calibration_data"):
        with timer.stage("calibration_data"):
            calib = _draw_calibration(cfg, pool)
    with timer.stage("merge"):
        merged = _merge(merge_fn, adapter, pool, base, experts, calib, device)
    if dtype != torch.float32:
        base, merged = base.to(dtype), merged.to(dtype)
        experts = [e.to(dtype) for e in experts]

    bs = int(cfg.eval_batch_size)

    def plain(model: torch.nn.Module):
        return lambda inputs, i: adapter.represent(model, inputs)

    def on_device(model: torch.nn.Module, fn):
        model.to(device)
        try:
            return fn()
        finally:
            model.to("cpu")

    accuracy: dict[str, dict[str, float]] = {}
    if cfg.evaluate_experts:
        with timer.stage("evaluate_experts"):
            accs: dict[str, float] = {}
            for i, expert in enumerate(experts):
                accs.update(on_device(expert, lambda: evaluate(plain(expert), pool, device, bs, only=[i], desc=f"expert {tasks[i]}")))
            accuracy["experts"] = with_average(accs)
    if cfg.evaluate_base:
        with timer.stage("evaluate_base"):
            accuracy["base"] = with_average(on_device(base, lambda: evaluate(plain(base), pool, device, bs, desc="base")))
    with timer.stage("evaluate_merged"):
        accuracy["merged"] = with_average(on_device(merged, lambda: evaluate(plain(merged), pool, device, bs, desc="merged")))

    report: dict[str, Any] = {}
    if isinstance(calibrator, NoCalibration):
        accuracy["calibrated"] = dict(accuracy["merged"])
        timer.seconds["calibrate"] = 0.0
    else:
        if calib is None:
            with timer.stage("calibration_data"):
                calib = _draw_calibration(cfg, pool)
        rss_before = current_rss_mib()
        with timer.stage("calibrate"):
            calibrated: CalibratedModel = calibrator.calibrate(adapter, merged, base, experts, calib, device)
        report = dict(calibrated.report or {})
        report["rss_increase_mib"] = current_rss_mib() - rss_before
        if cfg.get("save_calibrated", False):
            calibrated.save(out_dir / calibrated.save_name)
        with timer.stage("evaluate_calibrated"):
            calibrated.eval()
            accuracy["calibrated"] = with_average(
                on_device(calibrated, lambda: evaluate(calibrated.represent, pool, device, bs, desc="calibrated"))
            )

    memory = {
        "peak_rss_mib": peak_rss_mib(),
        "cuda_peak_mib": (torch.cuda.max_memory_allocated(device) / 2**20) if device.type == "cuda" else None,
    }
    drift_rows = []
    for when, per_task in (report.get("drift") or {}).items():
        for t_index, values in per_task.items():
            for block, value in enumerate(values):
                drift_rows.append({"task": tasks[int(t_index)], "block": block, "when": when, "drift": float(value)})
    table = per_task_table(tasks, accuracy)
    results = {
        **meta,
        "tasks": tasks,
        "device": str(device),
        "accuracy": accuracy,
        "table": table,
        "timings": dict(timer.seconds),
        "memory": memory,
        "drift": drift_rows,
        "loss_curve": report.get("loss_curve"),
        "calibration_report": {k: v for k, v in report.items() if k not in ("drift", "loss_curve")},
        "wall_clock_seconds": time.time() - started,
        "config": OmegaConf.to_container(cfg, resolve=True),
        "config_hash": config_hash(cfg),
    }
    long = long_rows({"run_dir": str(out_dir), **meta}, accuracy)
    write_results(out_dir, results, long)

    print(f"\n{meta['backbone']} | merge={meta['merge']} | calibration={meta['calibration']} | budget={meta['budget']} ({meta['split']})")
    print(format_table(table))
    t = timer.seconds
    print("wall-clock (s): " + ", ".join(f"{k} {v:.1f}" for k, v in t.items()))
    print(f"peak host RSS {memory['peak_rss_mib']:.0f} MiB" + (f", CUDA peak {memory['cuda_peak_mib']:.0f} MiB" if memory["cuda_peak_mib"] else ""))
    print(f"results: {out_dir / 'results.json'}")

    if logger is not None:
        logger.log_results(results)
        logger.finish()
        if logger.error:
            print(f"W&B: not logged ({logger.error}); results are on disk.")
        elif logger.run_dir:
            print(f"W&B ({cfg.logger.mode}): {Path(logger.run_dir).parent}")
    return results


CONF_DIR = os.environ.get("FEATCAL_CONF", str(Path(__file__).resolve().parent.parent / "conf"))
_BUDGET_ARG = re.compile(r"^(budget)=([0-9]+(?:,[0-9]+)*)$")


def _quote_numeric_group_choices(argv: list[str]) -> list[str]:
    """``budget=64`` / ``budget=8,32,256`` select options of the budget *group*; Hydra parses
    bare numbers as ints and refuses them as group choices, so quote them as names."""
    out = []
    for arg in argv:
        m = _BUDGET_ARG.match(arg)
        if m:
            arg = f"{m.group(1)}=" + ",".join(f"'{v}'" for v in m.group(2).split(","))
        out.append(arg)
    return out


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def _hydra_main(cfg: DictConfig) -> float:
    try:
        results = run(cfg, Path(HydraConfig.get().runtime.output_dir))
    except ConfigError as err:
        print(f"featcal: {err}", file=sys.stderr)
        sys.exit(2)
    return float(results["accuracy"]["calibrated"]["average"])


def main() -> None:
    args = _quote_numeric_group_choices(sys.argv[1:])
    # Hydra's parser wants flags before overrides; accept `featcal-run a=1 -m b=2,3` too
    flags = [a for a in args if a in ("-m", "--multirun")]
    sys.argv[1:] = flags + [a for a in args if a not in flags]
    _hydra_main()


if __name__ == "__main__":
    main()
