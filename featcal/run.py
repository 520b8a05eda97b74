"""The one entrypoint: compose -> validate -> load -> merge -> calibrate -> evaluate -> report.

    featcal-run                                   # embedded default, offline, CPU
    featcal-run merge=ties calibration=surgery budget.per_task=32
    featcal-run -m calibration=none,featcal,surgery budget.per_task=8,32,256

The run knows no model family and no calibrator: the backbone adapter loads and merges,
the calibrator returns a ``CalibratedModel`` (a module per task and a typed report), the
task pool evaluates with its own scorer and names its metrics.
"""
from __future__ import annotations

import copy
import logging
import os
import random
import statistics
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
from featcal.paths import conf_dir
from featcal.prefetch import prefetch_sources
from featcal.envcheck import check_environment
from featcal.lock import job_slot
from featcal.merge.registry import as_merge, build_merge
from featcal.merge.streaming import merge_models
from featcal.refcache import ReferenceCache
from featcal.resume import config_hash, interrupted, previous_results
from featcal.strict import hydra_errors
from featcal.report.run_tables import format_table, long_rows, per_task_table, write_results
from featcal.tasks.base import Metrics, TaskPool, scores
from featcal.utils import DTYPES, MemorySampler, StageTimer, atomic_write_json, current_rss_mib, resolve_device, seed_everything, timing_context

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
    """Whether a merge (what ``merge=`` builds, or a merge function) reads the calibration
    set: its record says (``featcal.merge.registry``; RegMean, AdaMerging)."""
    return as_merge(merge_fn).needs_calibration_data


def _merge_heads(merge: Any, pool: TaskPool) -> dict[str, Any]:
    """``{"heads": ...}`` for a merge whose record declares ``needs_heads`` (AdaMerging):
    per task, a callable mapping the backbone's final representation to class logits, from
    the task pool's ``heads()``; ``{}`` for every other merge."""
    if not merge.needs_heads:
        return {}
    heads = getattr(pool, "heads", None)
    if heads is None:
        raise errors.ConfigError(f"this merge needs class heads (entropy of class predictions); the task pool "
                          f"{type(pool).__name__} has none (classification pools such as embedded and CLIP have them)")
    return {"heads": heads()}


def run(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    """Run one configuration and write its results into ``out_dir``."""
    choices = _choices(cfg)
    composed = cfg  # with its hydra node (overrides: keys added with +) when composed so
    if "hydra" in cfg:  # composed with return_hydra_config=True: keep the run's own keys
        cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    # ---- validate (before anything heavy: a bad value costs nothing) ------------
    validate(cfg, composed=composed)
    done = previous_results(cfg, out_dir)  # resume: a complete run of the same config is not redone
    if done is not None:
        _backfill_logger(cfg, out_dir, done, choices)  # its W&B logging failed before: log it now
        return done
    check_environment(cfg, out_dir)  # the device exists; cache and run folders are writable
    from featcal.io.hub import check_sources_available

    check_sources_available(cfg)  # every model and dataset findable, before anything loads
    started = time.time()
    seed_everything(int(cfg.seed))
    device = resolve_device(cfg.device)
    # the run's own memory: a sampling thread from a baseline taken now (not the process's
    # lifetime peak, which only climbs in a sweep sharing a process), CUDA peak reset here
    sampler = MemorySampler(device=device).start()
    try:
        return _run_measured(cfg, out_dir, choices, device, sampler, started)
    finally:
        sampler.stop()


def _start_logger(logger: Any, cfg: DictConfig, out_dir: Path, meta: dict[str, Any], choices: dict[str, str]) -> Any:
    """The run's logger, started by the ``logger`` group's object (``featcal.loggers``):
    for W&B, the run id from the config hash (and sweep group), resume allowed, job_type
    run, tags and a readable name; None when it logs nothing."""
    group, _ = _sweep_group()
    experiment = choices.get("experiment") or None
    _, job = _job()
    shown = ("backbone", "merge", "calibration", "budget.per_task", "seed", "experiment", "logger", "resume", "device")
    extra = [o for o in job.get("overrides", []) if o.split("=", 1)[0].lstrip("+~") not in shown
             and not o.startswith(("logger.", "hydra.", "hydra/"))]
    name = f"{meta['merge']}+{meta['calibration']} n={meta['budget']} seed={meta['seed']}" + (f" [{','.join(extra)}]" if extra else "")
    tags = [meta["backbone"], meta["merge"], meta["calibration"]] + ([f"experiment:{experiment}"] if experiment else [])
    return logger.start(out_dir, {**OmegaConf.to_container(cfg, resolve=True), "run": meta, "experiment": experiment},
                        name=name, group=group, config_hash=config_hash(cfg), tags=tags, job_type="run")


def _log_results(run_logger: Any, results: dict[str, Any], out_dir: Path, artifacts: dict[str, Path]) -> None:
    """Log ``results`` and record the outcome in results.json (rewritten atomically)."""
    run_logger.log_results(results, artifacts)
    run_logger.finish()
    results[run_logger.record_key] = run_logger.record()
    atomic_write_json(out_dir / "results.json", results)
    line = run_logger.outcome()
    if line:
        print(line)


def _backfill_logger(cfg: DictConfig, out_dir: Path, done: dict[str, Any], choices: dict[str, str]) -> None:
    """A finished run whose logging failed, never happened or left a corrupt record: log
    its stored results (nothing is recomputed)."""
    logger = _build(cfg.logger)
    if not logger.needs_backfill(done, out_dir):
        return
    meta = {k: done.get(k) for k in ("backbone", "merge", "calibration", "budget", "split", "seed")}
    run_logger = _start_logger(logger, cfg, out_dir, meta, choices)
    if run_logger is None:
        return
    if getattr(run_logger, "active", False):
        print(f"W&B: logging the stored results of {out_dir} (logging failed or was cut short before; nothing is recomputed)")
    _log_results(run_logger, done, out_dir, {"results": out_dir / "results.json"})


def _meta(cfg: DictConfig, choices: dict[str, str], calibrator: Calibrator) -> dict[str, Any]:
    """The run's labels (backbone, merge, calibration, budget, split, seed) for tables and logs."""
    meta = {
        "backbone": _label("backbone", cfg.backbone, choices),
        "merge": _label("merge", cfg.merge, choices),
        "calibration": _label("calibration", cfg.calibration, choices),
        "budget": cfg.budget.per_task if cfg.budget.per_task == "all" else int(cfg.budget.per_task),
        "split": str(cfg.budget.split),
        "seed": int(cfg.seed),
    }
    # a calibrator that picks its result by test-split scores is labelled so in every table
    meta["calibration"] += getattr(calibrator, "selection_label", "")
    return meta


def _merge_inputs(merge: Any, backbone: Backbone, pool: TaskPool, base: torch.nn.Module, experts: list, calibration_batches: Any,
                  device: torch.device) -> dict[str, Any]:
    """What a data-using merge (RegMean, AdaMerging) reads besides the state dicts; ``{}`` for the others."""
    if not merge.needs_calibration_data:
        return {}
    return {"backbone": backbone, "base_model": base, "expert_models": experts, "calib": calibration_batches, "device": device,
            **_merge_heads(merge, pool)}


def _calibrate(timer: StageTimer, repeats: int, calibrator: Calibrator, backbone: Backbone, merged: torch.nn.Module,
               base: torch.nn.Module, experts: list, calibration_batches: Any, device: torch.device) -> tuple[CalibratedModel, list[float]]:
    """The calibrate stage, ``repeats`` times from the same RNG state on copies of the merged
    model (benchmark-grade timing: the median is recorded); the last calibrates ``merged``."""
    repeat_seconds: list[float] = []
    rng = _rng_state()
    for k in range(repeats):
        _set_rng_state(rng)
        target = copy.deepcopy(merged) if k < repeats - 1 else merged
        before = timer.seconds.get("calibrate", 0.0)
        with timer.stage("calibrate"):
            data = backbone.prepare_calibration(target, base, experts, calibration_batches, device) if calibration_batches is not None else None
            calibrated: CalibratedModel = calibrator.calibrate(backbone, target, base, experts, data, device)
        repeat_seconds.append(timer.seconds["calibrate"] - before)
        if k < repeats - 1:
            del calibrated, target
    if repeats > 1:
        timer.seconds["calibrate"] = statistics.median(repeat_seconds)
        timer.cpu_seconds["calibrate"] /= repeats
    return calibrated, repeat_seconds


def _print_summary(meta: dict[str, Any], table: Any, timer: StageTimer, repeat_seconds: list[float], memory: dict[str, Any]) -> None:
    """The run's table, stage times (with threads and load) and memory, printed before
    anything is written: a full disk cannot hide the numbers."""
    print(f"\n{meta['backbone']} | merge={meta['merge']} | calibration={meta['calibration']} | budget={meta['budget']} ({meta['split']})")
    print(format_table(table))
    print("wall-clock (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timer.seconds.items()))
    ctx = timer.context.get("calibrate") or timing_context()
    repeats = len(repeat_seconds)
    print(f"  ({ctx['torch_threads']} torch threads, load average {ctx['loadavg']}"
          + (f"; calibrate: median of {repeats} repeats {', '.join(f'{x:.1f}' for x in repeat_seconds)}" if repeats > 1 else "") + ")")
    print(f"peak host RSS of this run {memory['peak_rss_mib']:.0f} MiB ({memory['peak_rss_above_baseline_mib']:+.0f} MiB over its start)"
          + (f", CUDA peak {memory['cuda_peak_mib']:.0f} MiB" if memory["cuda_peak_mib"] else ""))


def _results_record(cfg: DictConfig, meta: dict[str, Any], tasks: list[str], device: torch.device, primary: dict[str, str],
                    score: dict[str, Any], metrics: dict[str, Any], table: Any, timer: StageTimer, repeat_seconds: list[float],
                    memory: dict[str, Any], fetched: Any, report: Any, refs: Any, started: float, pool: TaskPool,
                    suite: Any) -> dict[str, Any]:
    """What ``results.json`` holds for one finished run."""
    repeats = len(repeat_seconds)
    report_dict = report.to_dict()
    return {
        **meta,
        "tasks": tasks,
        "device": str(device),
        "primary_metric": primary,
        "score": score,
        "metrics": metrics,
        "table": table,
        "timings": dict(timer.seconds),
        "timing": {"cpu_seconds": dict(timer.cpu_seconds), "context": timer.context, "at_end": timing_context(),
                   "calibrate_repeats": repeat_seconds, "calibrate_is": "median of the repeats" if repeats > 1 else "one measurement"},
        "memory": memory,
        "prepared": fetched,  # where each hub model / dataset came from (downloaded in prepare, or cached)
        "drift": report_dict.pop("drift"),
        "loss_curve": report_dict.pop("loss_curve"),
        "calibration_report": report_dict,
        "reference_cache": refs.status,
        "wall_clock_seconds": time.time() - started,
        "config": OmegaConf.to_container(cfg, resolve=True),
        "config_hash": config_hash(cfg),
        **({"code_execution": pool.code_execution} if getattr(pool, "code_execution", None) else {}),  # opt-in + fence
        "suite": suite,
    }


def _evaluate_references(cfg: DictConfig, timer: StageTimer, refs: ReferenceCache, evaluate: Callable[..., Metrics],
                         tasks: list[str], base: torch.nn.Module, experts: list, merged: torch.nn.Module) -> dict[str, Metrics]:
    """Experts (each on its own task), base and merged model. Experts and base are stored
    once per model x task x eval settings (``ReferenceCache``) and reused by later jobs."""
    metrics: dict[str, Metrics] = {}
    if cfg.evaluate_experts:
        with timer.stage("evaluate_experts"):
            metrics["experts"] = refs.experts(experts, tasks, lambda i: evaluate(
                experts[i], lambda _i, e=experts[i]: e, only=[i], desc=f"expert {tasks[i]}"))
    if cfg.evaluate_base:
        with timer.stage("evaluate_base"):
            metrics["base"] = refs.base(base, tasks, lambda only: evaluate(base, lambda _i: base, only=only, desc="base"))
    with timer.stage("evaluate_merged"):
        metrics["merged"] = evaluate(merged, lambda _i: merged, desc="merged")
    return metrics


def _run_measured(cfg: DictConfig, out_dir: Path, choices: dict[str, str], device: torch.device,
                  sampler: MemorySampler, started: float) -> dict[str, Any]:
    dtype = DTYPES[cfg.precision]
    timer = StageTimer(device, memory=sampler)
    # ---- first use: hub downloads (and suite builds, below), timed apart from loading ----
    with timer.stage("prepare"):  # before the task pool is built: it may open its datasets
        fetched = prefetch_sources(cfg)  # every hub model and dataset into the local caches (~0 s when cached)
    merge = build_merge(OmegaConf.to_container(cfg.merge, resolve=True))  # the method's record, bound
    calibrator: Calibrator = _build(cfg.calibration)
    backbone: Backbone = _build(cfg.backbone.adapter)
    pool: TaskPool = _build(cfg.backbone.taskpool).bind(backbone)  # it asks the model layer how to read a model

    meta = _meta(cfg, choices, calibrator)
    log.info("run %s on %s", meta, device)
    logger = _start_logger(_build(cfg.logger), cfg, out_dir, meta, choices)  # by _target_ (featcal.loggers); None: none

    if isinstance(getattr(type(backbone), "folder", None), property):
        with timer.stage("prepare"):
            backbone.folder  # noqa: B018 - builds (or verifies) the embedded suite once

    # ---- load -----------------------------------------------------------------
    with timer.stage("load"):
        base = backbone.load_base()
        experts = backbone.load_experts()
        tasks = pool.names
        errors.check_tasks(tasks, backbone.tasks)
    suite = getattr(backbone, "suite_identity", lambda: None)()  # a built suite's identity (None: hub models)

    # ---- calibration data (before merging when the merge itself needs it) ---------
    merge_needs_data = merge.needs_calibration_data
    calibration_batches = None
    if merge_needs_data or calibrator.needs_calibration_data:
        with timer.stage("calibration_data"):
            calibration_batches = pool.calibration_set(meta["budget"], int(cfg.seed), int(cfg.budget.batch_size), str(cfg.budget.split))

    # ---- merge ----------------------------------------------------------------
    with timer.stage("merge"):
        merged = merge_models(merge, backbone, base, experts, **_merge_inputs(merge, backbone, pool, base, experts, calibration_batches, device))
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

    refs = ReferenceCache.for_run(cfg, device, pool, backbone)
    metrics = _evaluate_references(cfg, timer, refs, evaluate, tasks, base, experts, merged)

    # ---- calibrate --------------------------------------------------------------
    rss_before = current_rss_mib()
    repeats = max(1, int(cfg.get("calibrate_repeats", 1) or 1))
    if getattr(calibrator, "needs_test_scorer", False):  # best-of-rounds on the test split
        calibrator.round_scorer = lambda cal: scores(evaluate(cal.model, cal.model_for_task, desc="round"), pool)["average"]
    calibrated, repeat_seconds = _calibrate(timer, repeats, calibrator, backbone, merged, base, experts, calibration_batches, device)
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
    memory = sampler.stop()  # the run's own peaks (host RSS sampled, CUDA reset at the start), per stage
    primary = {t: pool.primary_metric(t) for t in tasks}
    score = {stage: scores(m, pool) for stage, m in metrics.items()}
    table = per_task_table(tasks, score, primary)
    results = _results_record(cfg, meta, tasks, device, primary, score, metrics, table, timer, repeat_seconds, memory,
                              fetched, report, refs, started, pool, suite)
    if logger is not None:
        results[logger.record_key] = {**logger.record(), "status": "pending"}  # "logged" once W&B has it
    long = long_rows({"run_dir": str(out_dir), **meta}, metrics, score, primary)

    _print_summary(meta, table, timer, repeat_seconds, memory)
    errors.keep_results(out_dir, results, lambda: write_results(out_dir, results, long))  # OSError: failed.json / stderr
    print(f"results: {out_dir / 'results.json'}")

    if logger is not None:
        artifacts = {"results": out_dir / "results.json"}
        if cfg.get("save_calibrated", False):
            artifacts["model"] = out_dir / calibrated.save_name
        _log_results(logger, results, out_dir, artifacts)
    return results


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "random": random.getstate()}
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:  # pragma: no cover
        pass
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["random"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


CONF_DIR = str(conf_dir())  # the checkout's conf/ or an installed wheel's copy (featcal/paths.py)
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
    with job_slot(out_dir) as free:  # <out_dir>/.featcal.lock: a job another live process runs is skipped
        results = errors.guard(lambda: run(cfg, out_dir), cfg, out_dir, multirun, job) if free else None
    if not free and not multirun:
        sys.exit(errors.EXIT_USER_ERROR)
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
    try:
        with hydra_errors():  # an unknown key or an unusable run folder: one featcal: paragraph, exit 2
            _hydra_main()
    except KeyboardInterrupt:
        interrupted(args)
    code = errors.pending_exit_code()  # a multirun whose jobs failed with user errors
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
