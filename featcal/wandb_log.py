"""Weights & Biases logging, as a dashboard user expects it; never raising into a run.

- mode / project / entity: ``logger.*``, which default to ``WANDB_MODE`` / ``WANDB_PROJECT`` /
  ``WANDB_ENTITY`` (offline and project ``featcal`` when unset). ``disabled`` starts no
  W&B at all (no ``wandb/`` folder).
- One W&B run per configuration: its id derives from the run's config hash (and the
  sweep group), with ``resume="allow"``, so a rerun updates its run instead of adding one;
  earlier offline runs of the same id in the job folder (a killed job's, a superseded one)
  are removed first, so ``wandb sync <job>/wandb/offline-run-*`` uploads one run.
- ``job_type="run"``, tags (backbone, merge, calibration, experiment), a readable name;
  scalars go to the summary, per-task scores to a ``wandb.Table``, the calibration loss
  against its own step (``define_metric``); ``results.json`` (and a saved calibrated model)
  as artifacts.
- ``results.json`` records the W&B id, group, project, mode and whether logging succeeded
  (``wandb.status``): a finished run whose logging failed is logged from its results.json
  on the next invocation (``featcal.run``), without recomputing; featcal-report reads the
  group and project from there.
- ``logger.mode=online`` without a network falls back to offline, saying so and naming
  ``logger.mode=offline``: a TCP probe of the server (5 s) first, then ``init_timeout`` 10 s.
- The offline run file is read back after logging (``featcal.wandb_runfile``): missing, empty,
  truncated (mid-header, mid-record), corrupt or without an exit record is reported as
  such (status failed, the next invocation logs again), never as a success; on resume such
  runs are set aside out of ``wandb sync``'s reach (``set_aside_bad_runs``) and
  ``featcal-report`` lists them (``offline_run_problems``).
- ``Wandb`` is the ``logger=wandb`` object (``conf/logger/wandb.yaml``'s ``_target_``,
  see ``featcal.loggers``); ``WandbLogger`` is one started run.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
import urllib.parse
from pathlib import Path
from typing import Any

from featcal.wandb_runfile import check_offline_run, remove_offline_runs, set_aside_bad_runs

log = logging.getLogger(__name__)

MODES = ("offline", "online", "disabled")
_ALIASES = {"dryrun": "offline", "run": "online", "": "offline"}
INIT_TIMEOUT_S = 10.0
PROBE_TIMEOUT_S = 5.0


def resolve_mode(value: Any) -> str:
    """``logger.mode`` (or ``$WANDB_MODE`` when unset) as one of offline / online / disabled."""
    if value is None:
        value = os.environ.get("WANDB_MODE", "offline")
    mode = _ALIASES.get(str(value).strip().lower(), str(value).strip().lower())
    if mode not in MODES:
        raise ValueError(f"logger.mode must be one of {', '.join(MODES)} (or WANDB_MODE); got {value!r}")
    return mode


def run_id(config_hash: str, group: str | None = None) -> str:
    """The W&B run id of one configuration (in one sweep group): reruns resume it."""
    if not group:
        return f"fc-{config_hash}"
    return "fc-" + hashlib.sha256(f"{group}/{config_hash}".encode()).hexdigest()[:16]


def server_unreachable(timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """Why the W&B server cannot be reached (a TCP connect to ``WANDB_BASE_URL``, default
    api.wandb.ai, within ``timeout`` seconds), or None when it can (or a proxy decides)."""
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")):
        return None
    url = urllib.parse.urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai")
    host = url.hostname or "api.wandb.ai"
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as err:
        return f"cannot reach {host}:{port} within {timeout:.0f} s ({type(err).__name__}: {err})"


class WandbLogger:
    """init / log results / finish; every failure is kept in ``error`` and said, never raised."""

    def __init__(
        self,
        cfg: dict[str, Any],
        run_dir: Path,
        config: dict[str, Any],
        name: str | None,
        group: str | None,
        rid: str | None = None,
        tags: list[str] | None = None,
        job_type: str = "run",
    ):
        self.run = None
        self.error: str | None = None
        self.notes: list[str] = []
        self.out_dir = Path(run_dir)
        self.mode = resolve_mode(cfg.get("mode"))
        self.project = cfg.get("project") or os.environ.get("WANDB_PROJECT") or "featcal"
        self.entity = cfg.get("entity") or os.environ.get("WANDB_ENTITY") or None
        self.group = cfg.get("group") or group
        self.id = rid
        self.name = name
        self.logged = False
        if self.mode == "disabled":
            return
        try:
            import wandb
        except Exception as err:  # pragma: no cover - wandb is a dependency
            self.error = f"{type(err).__name__}: {err}"
            return
        self._wandb = wandb
        if rid:
            removed = remove_offline_runs(self.out_dir, rid)
            if removed:
                self.notes.append(f"W&B: removed {len(removed)} earlier offline run(s) of this job (killed or superseded): "
                                  + ", ".join(str(p) for p in removed))
        kwargs = dict(
            project=self.project, entity=self.entity, group=self.group,
            tags=sorted({str(t) for t in [*(tags or []), *(cfg.get("tags") or [])] if t}), name=name, job_type=job_type,
            dir=str(self.out_dir), config=config, reinit="finish_previous",
        )
        if rid:
            kwargs.update(id=rid, resume="allow")
        unreachable = server_unreachable() if self.mode == "online" else None
        try:
            if unreachable:
                raise ConnectionError(unreachable)
            self.run = self._init(kwargs, self.mode)
        except Exception as err:  # no network in online mode, bad credentials...
            if self.mode == "online":
                self.notes.append(f"W&B: online start failed ({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
                                  "logging offline instead (`wandb sync` uploads it later; logger.mode=offline skips the attempt)")
                try:
                    with contextlib.suppress(Exception):
                        wandb.teardown()  # forget the half-started online run (its id stays in use otherwise)
                    self.mode = "offline"
                    self.run = self._init(kwargs, "offline")
                except Exception as err2:
                    self.error = f"{type(err2).__name__}: {err2}"
            else:
                self.error = f"{type(err).__name__}: {err}"
        if self.error:
            log.warning("W&B could not start (%s); the run continues without it.", self.error)
        for note in self.notes:
            print(note, flush=True)

    def _init(self, kwargs: dict[str, Any], mode: str):
        wandb = self._wandb
        settings = wandb.Settings(init_timeout=INIT_TIMEOUT_S) if mode == "online" else None
        return wandb.init(mode=mode, settings=settings, **kwargs)

    @property
    def active(self) -> bool:
        return self.run is not None

    def log_results(self, results: dict[str, Any], artifacts: dict[str, Path] | None = None) -> None:
        """Scalars into the summary, per-task scores and drift as tables, the loss curve on
        its own step, ``artifacts`` ({name: file or folder}) as W&B artifacts."""
        if self.run is None:
            return
        try:
            wandb = self._wandb
            summary: dict[str, float] = {}
            for stage, per_task in results["metrics"].items():  # runs-table columns; no history, no panels
                for task, values in per_task.items():
                    for metric, value in values.items():
                        summary[f"{metric}/{stage}/{task}"] = float(value)
            for stage, per_task in results["score"].items():
                summary[f"score/{stage}/average"] = float(per_task["average"])
            for stage, secs in (results.get("timings") or {}).items():
                summary[f"time/{stage}"] = float(secs)
            for key, value in (results.get("memory") or {}).items():
                if isinstance(value, (int, float)) and value is not None:
                    summary[f"memory/{key}"] = float(value)
            self.run.summary.update(summary)
            rows = []
            for stage, per_task in results["metrics"].items():
                for task, values in per_task.items():
                    for metric, value in values.items():
                        rows.append([stage, task, metric, float(value)])
            table = results["table"]
            columns = list(table[0].keys()) if table else ["task"]
            tables = {"per_task_scores": wandb.Table(columns=["stage", "task", "metric", "value"], data=rows),
                      "per_task": wandb.Table(columns=columns, data=[[row.get(c) for c in columns] for row in table])}
            drift = results.get("drift")
            if drift:
                tables["feature_drift"] = wandb.Table(columns=["task", "block", "when", "drift"], data=[[r["task"], r["block"], r["when"], r["drift"]] for r in drift])
            self.run.log(tables)  # tables (one table panel each), no scalar histories
            if drift:
                value = {(r["when"], r["task"], r["block"]): r["drift"] for r in drift}
                tasks = sorted({r["task"] for r in drift})
                blocks = sorted({r["block"] for r in drift})
                for when in sorted({r["when"] for r in drift}):
                    ys = [[value[(when, t, b)] for b in blocks] for t in tasks]
                    self.run.log({f"drift_chart/{when}": wandb.plot.line_series(xs=blocks, ys=ys, keys=tasks, title=f"feature drift per block ({when} calibration)", xname="block")})
            curve = results.get("loss_curve")
            if curve:
                self.run.define_metric("calibration/step")
                self.run.define_metric("calibration/loss", step_metric="calibration/step")
                for point in curve:
                    self.run.log({"calibration/loss": float(point["loss"]), "calibration/step": int(point["step"])})
            for name, path in (artifacts or {}).items():
                path = Path(path)
                if not path.exists():
                    continue
                art = wandb.Artifact(f"{name}-{self.id or self.run.id}", type=name)
                if path.is_dir():
                    art.add_dir(str(path))
                else:
                    art.add_file(str(path))
                self.run.log_artifact(art)
            self.logged = True
        except Exception as err:
            self.error = f"{type(err).__name__}: {err}"
            log.warning("W&B logging failed (%s); results are still on disk.", self.error)

    def finish(self) -> None:
        if self.run is None:
            return
        try:
            self.run.finish()
            # wandb-core writes the offline run file when its service stops, not at finish():
            # stop it now, so that the file is complete (and checkable) before results.json
            # says "logged" -- a kill after this point loses nothing
            self._wandb.teardown()
        except Exception as err:
            self.error = self.error or f"finish failed: {type(err).__name__}: {err}"
            log.warning("W&B finish failed: %s", err)
        if self.mode == "offline" and self.run_folder is not None:
            problem = check_offline_run(self.run_folder)
            if problem:
                self.error = self.error or f"offline run corrupt or empty: {problem}"

    @property
    def run_dir(self) -> str | None:
        return getattr(self.run, "dir", None) if self.run is not None else None

    @property
    def run_folder(self) -> Path | None:
        """The run's own folder (``.../wandb/offline-run-...``)."""
        d = self.run_dir
        return Path(d).parent if d else None

    def record(self) -> dict[str, Any]:
        """What results.json keeps about this run's W&B logging."""
        status = "disabled" if self.mode == "disabled" else ("logged" if self.logged and not self.error else "failed")
        return {
            "id": self.id, "group": self.group, "project": self.project, "entity": self.entity, "mode": self.mode,
            "name": self.name, "status": status, "error": self.error,
            "run_folder": str(self.run_folder) if self.run_folder is not None else None,
        }

    record_key = "wandb"

    def outcome(self) -> str | None:
        """The line a run prints about its W&B logging (None when disabled)."""
        if self.mode == "disabled":
            return None
        if self.error:
            return (f"W&B: not logged ({self.error}); results are on disk and are logged on the next "
                    f"featcal-run of this configuration.")
        if self.run_folder is not None:
            return f"W&B ({self.mode}): {self.run_folder}"
        return None


class Wandb:
    """``logger=wandb`` (``conf/logger/wandb.yaml``): the settings of the W&B runs it starts.

    ``mode`` / ``project`` / ``entity`` default to ``WANDB_MODE`` / ``WANDB_PROJECT`` /
    ``WANDB_ENTITY`` (in the YAML); ``group`` (None: the sweep's) and ``tags`` (added to the
    automatic ones) as given."""

    record_key = "wandb"

    def __init__(self, mode: str | None = None, project: str | None = None, entity: str | None = None,
                 group: str | None = None, tags: list[str] | None = None, name: str | None = None):
        self.settings = {"mode": mode, "project": project, "entity": entity, "group": group, "tags": list(tags or [])}

    @classmethod
    def validate_config(cls, node: dict[str, Any]) -> list[str]:
        mode = node.get("mode", "offline")
        if mode is not None and mode not in MODES:
            return [f"mode={mode!r}: allowed: {', '.join(MODES)}"]
        return []

    @property
    def mode(self) -> str:
        return resolve_mode(self.settings.get("mode"))

    def start(self, run_dir: Path, config: dict[str, Any], *, name: str | None, group: str | None,
              config_hash: str, tags: list[str] | None = None, job_type: str = "run") -> WandbLogger:
        """Start (or resume) the W&B run of one configuration: its id derives from the config
        hash and the group (``logger.group``, else ``group``: the sweep's)."""
        group = self.settings.get("group") or group
        return WandbLogger(self.settings, run_dir, config, name=name, group=group, rid=run_id(config_hash, group),
                           tags=tags, job_type=job_type)

    def needs_backfill(self, done: dict[str, Any], run_dir: Path) -> bool:
        """A finished run is logged again (from its results.json) when W&B is on and its
        logging failed or never happened, or its offline run file is corrupt, empty or
        incomplete (set aside first, so that ``wandb sync`` never uploads it)."""
        if self.mode == "disabled":
            return False
        record = done.get("wandb") or {}
        bad = set_aside_bad_runs(run_dir)
        for place, problem in bad:
            print(f"W&B: set aside a corrupt or incomplete offline run ({problem}) -> {place} "
                  "(not for `wandb sync`)", flush=True)
        if record.get("status") != "logged":
            return True
        folder = record.get("run_folder")
        if record.get("mode") == "offline" and folder:  # set aside above, or deleted since
            return not (Path(run_dir) / "wandb" / Path(folder).name).is_dir()
        return False
