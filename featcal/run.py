"""The one entrypoint: compose -> validate -> load -> merge -> calibrate -> evaluate -> report.

    featcal-run                                   # embedded default, offline, CPU
    featcal-run merge=ties calibration=surgery budget.per_task=32
    featcal-run -m calibration=none,featcal,surgery budget.per_task=8,32,256

The run knows no model family and no calibrator: the backbone adapter loads and merges,
the calibrator returns a ``CalibratedModel`` (a module per task and a typed report), the
task pool evaluates with its own scorer and names its metrics.
"""
from __future__ import annotations

import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from featcal import errors
from featcal.backbone.base import Backbone
from featcal.calibration.base import CalibratedModel, Calibrator
from featcal.config import validate
from featcal.resume import config_hash, previous_results
from featcal.report import format_table, long_rows, per_task_table, write_results
from featcal.tasks.base import Metrics, TaskPool, scores
from featcal.utils import DTYPES, StageTimer, current_rss_mib, peak_rss_mib, resolve_device, seed_everything
from featcal.wandb_log import WandbLogger

log = logging.getLogger("featcal")

#: descriptive keys some config nodes may still carry; never constructor arguments
_DESCRIPTIVE = ("name",)


def _build(node: DictConfig | dict) -> Any:
    """Hydra-instantiate a config node (resolved), leaving out descriptive keys."""
    data = dict(node) if isinstance(node, dict) else OmegaConf.to_container(node, resolve=True)
    for key in _DESCRIPTIVE:
        data.pop(key, None)
    return instantiate(data)


def _choices(cfg: DictConfig) -> dict[str, str]:
    """The config-group choices: from the running Hydra app, or from a config composed
    with ``return_hydra_config=True`` (scripts, tests)."""
    try:
        choices = HydraConfig.get().runtime.choices
    except Exception:
        choices = OmegaConf.select(cfg, "hydra.runtime.choices", default=None) or {}
    return {str(k): str(v) for k, v in choices.items() if v is not None}


def _label(group: str, node: Any, choices: dict[str, str]) -> str:
    """A group's label for tables and logs: the Hydra choice (``merge=ties`` -> ``ties``);
    outside Hydra (``compose`` in scripts) a ``name`` key or the ``_target_``'s last part."""
    if group in choices:
        return str(choices[group])
    if isinstance(node, (dict, DictConfig)):
        if node.get("name"):
            return str(node["name"])
        target = node.get("_target_")
        if target:
            return str(target).rsplit(".", 1)[-1].lower()
    return "?"


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


def needs_calibration_data(merge_fn: Callable[..., Any]) -> bool:
    """A merge function (or a ``functools.partial`` of one) that declares
    ``needs_calibration_data = True`` (RegMean, AdaMerging)."""
    fn = merge_fn
    while fn is not None:
        if getattr(fn, "needs_calibration_data", False):
            return True
        fn = getattr(fn, "func", None)
    return False


def _merge_heads(merge_fn: Callable[..., Any], pool: TaskPool) -> dict[str, Any]:
    """``{"heads": ...}`` for a merge function declaring ``needs_heads = True`` (AdaMerging):
    per task, a callable mapping the backbone's final representation to class logits, from
    the task pool's ``heads()``; ``{}`` for every other merge."""
    fn, needs = merge_fn, False
    while fn is not None and not needs:
        needs = bool(getattr(fn, "needs_heads", False))
        fn = getattr(fn, "func", None)
    if not needs:
        return {}
    heads = getattr(pool, "heads", None)
    if heads is None:
        raise errors.ConfigError(f"this merge needs class heads (entropy of class predictions); the task pool "
                          f"{type(pool).__name__} has none (classification pools such as embedded and CLIP have them)")
    return {"heads": heads()}


def run(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    """Run one configuration and write its results into ``out_dir``."""
    choices = _choices(cfg)
    if "hydra" in cfg:  # composed with return_hydra_config=True: keep the run's own keys
        cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    # ---- validate (before anything heavy: a bad value costs nothing) ------------
    validate(cfg)
    done = previous_results(cfg, out_dir)  # resume: a complete run of the same config is not redone
    if done is not None:
        return done
    started = time.time()
    seed_everything(int(cfg.seed))
    device = resolve_device(cfg.device)
    dtype = DTYPES[cfg.precision]
    timer = StageTimer(device)
    merge_fn = _build(cfg.merge)
    calibrator: Calibrator = _build(cfg.calibration)
    adapter: Backbone = _build(cfg.backbone.adapter)
    pool: TaskPool = _build(cfg.backbone.taskpool)
    if torch.cuda.is_available() and device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    meta = {
        "backbone": _label("backbone", cfg.backbone, choices),
        "merge": _label("merge", cfg.merge, choices),
        "calibration": _label("calibration", cfg.calibration, choices),
        "budget": cfg.budget.per_task if cfg.budget.per_task == "all" else int(cfg.budget.per_task),
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

    # ---- load -----------------------------------------------------------------
    with timer.stage("load"):
        base = adapter.load_base()
        experts = adapter.load_experts()
        tasks = pool.names
        errors.check_tasks(tasks, adapter.tasks)
    suite = getattr(adapter, "suite_identity", lambda: None)()  # a built suite's identity (None: hub models)

    # ---- calibration data (before merging when the merge itself needs it) ---------
    merge_needs_data = needs_calibration_data(merge_fn)
    calib = None
    if merge_needs_data or calibrator.needs_calibration_data:
        with timer.stage("calibration_data"):
            calib = pool.calibration_set(meta["budget"], int(cfg.seed), int(cfg.budget.batch_size), str(cfg.budget.split))

    # ---- merge ----------------------------------------------------------------
    with timer.stage("merge"):
        data = {}
        if merge_needs_data:
            data = dict(backbone=adapter, base_model=base, expert_models=experts, calib=calib, device=device)
            data.update(_merge_heads(merge_fn, pool))
        merged = adapter.merge(merge_fn, base, experts, **data)
    if dtype != torch.float32:
        base, merged = base.to(dtype), merged.to(dtype)
        experts = [e.to(dtype) for e in experts]

    # ---- evaluate the references ------------------------------------------------
    bs = int(cfg.eval_batch_size)

    def evaluate(model: torch.nn.Module, model_for_task: Callable[[int], torch.nn.Module], **kw) -> Metrics:
        model.to(device)
        try:
            return pool.evaluate(model_for_task, device, bs, **kw)
        finally:
            model.to("cpu")

    metrics: dict[str, Metrics] = {}
    if cfg.evaluate_experts:
        with timer.stage("evaluate_experts"):
            metrics["experts"] = {}
            for i, expert in enumerate(experts):
                metrics["experts"].update(evaluate(expert, lambda _i, e=expert: e, only=[i], desc=f"expert {tasks[i]}"))
    if cfg.evaluate_base:
        with timer.stage("evaluate_base"):
            metrics["base"] = evaluate(base, lambda _i: base, desc="base")
    with timer.stage("evaluate_merged"):
        metrics["merged"] = evaluate(merged, lambda _i: merged, desc="merged")

    # ---- calibrate --------------------------------------------------------------
    rss_before = current_rss_mib()
    with timer.stage("calibrate"):
        if calib is not None:
            calib = adapter.prepare_calibration(merged, base, experts, calib, device)
        calibrated: CalibratedModel = calibrator.calibrate(adapter, merged, base, experts, calib, device)
    report = calibrated.report
    report.extra.setdefault("rss_increase_mib", current_rss_mib() - rss_before)
    if cfg.get("save_calibrated", False):
        calibrated.save(out_dir / calibrated.save_name)

    # ---- evaluate the calibrated model -----------------------------------------------
    if getattr(calibrated, "unchanged", False):  # e.g. calibration=none: the merged numbers
        metrics["calibrated"] = {t: dict(v) for t, v in metrics["merged"].items()}
    else:
        with timer.stage("evaluate_calibrated"):
            calibrated.eval()
            metrics["calibrated"] = evaluate(calibrated, calibrated.model_for_task, desc="calibrated")

    metrics = pool.finalize(metrics)

    # ---- report ---------------------------------------------------------------
    memory = {
        "peak_rss_mib": peak_rss_mib(),
        "cuda_peak_mib": (torch.cuda.max_memory_allocated(device) / 2**20) if device.type == "cuda" else None,
    }
    primary = {t: pool.primary_metric(t) for t in tasks}
    score = {stage: scores(m, pool) for stage, m in metrics.items()}
    table = per_task_table(tasks, score, primary)
    report_dict = report.to_dict()
    results = {
        **meta,
        "tasks": tasks,
        "device": str(device),
        "primary_metric": primary,
        "score": score,
        "metrics": metrics,
        "table": table,
        "timings": dict(timer.seconds),
        "memory": memory,
        "drift": report_dict.pop("drift"),
        "loss_curve": report_dict.pop("loss_curve"),
        "calibration_report": report_dict,
        "wall_clock_seconds": time.time() - started,
        "config": OmegaConf.to_container(cfg, resolve=True),
        "config_hash": config_hash(cfg),
        "suite": suite,
    }
    long = long_rows({"run_dir": str(out_dir), **meta}, metrics, score, primary)
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
_OLD_BUDGET_ARG = re.compile(r"^budget=([0-9][0-9,]*)$")


def _job() -> tuple[bool, dict]:
    """(multirun?, {job_num, overrides}) of the running Hydra job."""
    try:
        hc = HydraConfig.get()
    except Exception:
        return False, {}
    job = {"overrides": [str(o) for o in hc.overrides.task]}
    try:
        job["job_num"] = int(hc.job.num)
    except Exception:
        pass
    return hc.mode == RunMode.MULTIRUN, job


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def _hydra_main(cfg: DictConfig) -> float:
    # user-fixable errors are reported here (one paragraph, failed.json), never by Hydra:
    # a single run exits with code 2 (3: out of GPU memory); a multirun job returns nan
    # and the sweep goes on. See featcal/errors.py.
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    multirun, job = _job()
    results = errors.guard(lambda: run(cfg, out_dir), cfg, out_dir, multirun, job)
    if results is None:
        return float("nan")
    return float(results["score"]["calibrated"]["average"])


def main() -> None:
    args = sys.argv[1:]
    for arg in args:
        m = _OLD_BUDGET_ARG.match(arg)
        if m:
            print(f"featcal: the budget is a key, not a config group: use budget.per_task={m.group(1)}", file=sys.stderr)
            sys.exit(2)
    # Hydra's parser wants flags before overrides; accept `featcal-run a=1 -m b=2,3` too
    flags = [a for a in args if a in ("-m", "--multirun")]
    sys.argv[1:] = flags + [a for a in args if a not in flags]
    _hydra_main()
    code = errors.pending_exit_code()  # a multirun whose jobs failed with user errors
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
