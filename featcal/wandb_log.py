"""Weights & Biases logging (offline by default) and a reader for offline run files.

W&B is optional at run time: if it cannot start, the run goes on and says so.
"""
from __future__ import annotations

import json
import logging
import os
import struct
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class WandbLogger:
    """Thin wrapper: init / log results / finish, never raising into the run."""

    def __init__(self, cfg: dict[str, Any], run_dir: Path, config: dict[str, Any], name: str | None, group: str | None):
        self.run = None
        self.error: str | None = None
        mode = str(cfg.get("mode", "offline"))
        if mode not in ("offline", "online", "disabled"):
            raise ValueError(f"logger.mode must be one of offline, online, disabled; got {mode!r}")
        try:
            import wandb

            self._wandb = wandb
            self.run = wandb.init(
                project=cfg.get("project", "featcal"),
                entity=cfg.get("entity"),
                group=cfg.get("group") or group,
                tags=list(cfg.get("tags") or []),
                name=name,
                mode=mode,
                dir=str(run_dir),
                config=config,
                reinit="finish_previous",
            )
        except Exception as err:  # no wandb, no network in online mode, bad credentials...
            self.error = f"{type(err).__name__}: {err}"
            log.warning("W&B could not start (%s); the run continues without it.", self.error)
            self.run = None

    @property
    def active(self) -> bool:
        return self.run is not None

    def log_results(self, results: dict[str, Any]) -> None:
        if self.run is None:
            return
        try:
            wandb = self._wandb
            summary: dict[str, float] = {}
            for stage, per_task in results["metrics"].items():
                for task, values in per_task.items():
                    for metric, value in values.items():
                        summary[f"{metric}/{stage}/{task}"] = float(value)
            for stage, per_task in results["score"].items():
                summary[f"score/{stage}/average"] = float(per_task["average"])
            for stage, secs in results["timings"].items():
                summary[f"time/{stage}"] = float(secs)
            for key, value in results["memory"].items():
                if value is not None:
                    summary[f"memory/{key}"] = float(value)
            self.run.log(summary)
            for k, v in summary.items():
                self.run.summary[k] = v
            table = results["table"]
            columns = list(table[0].keys()) if table else ["task"]
            self.run.log({"per_task": wandb.Table(columns=columns, data=[[row.get(c) for c in columns] for row in table])})
            drift = results.get("drift")
            if drift:
                rows = [[r["task"], r["block"], r["when"], r["drift"]] for r in drift]
                dtab = wandb.Table(columns=["task", "block", "when", "drift"], data=rows)
                self.run.log({"feature_drift": dtab})
                value = {(r["when"], r["task"], r["block"]): r["drift"] for r in drift}
                tasks = sorted({r["task"] for r in drift})
                blocks = sorted({r["block"] for r in drift})
                for when in sorted({r["when"] for r in drift}):
                    ys = [[value[(when, t, b)] for b in blocks] for t in tasks]
                    self.run.log({f"drift_chart/{when}": wandb.plot.line_series(xs=blocks, ys=ys, keys=tasks, title=f"feature drift per block ({when} calibration)", xname="block")})
            curve = results.get("loss_curve")
            if curve:
                for point in curve:
                    self.run.log({"calibration/loss": float(point["loss"]), "calibration/step": int(point["step"])})
        except Exception as err:
            self.error = f"{type(err).__name__}: {err}"
            log.warning("W&B logging failed (%s); results are still on disk.", self.error)

    def finish(self) -> None:
        if self.run is not None:
            try:
                self.run.finish()
            except Exception as err:
                log.warning("W&B finish failed: %s", err)

    @property
    def run_dir(self) -> str | None:
        return getattr(self.run, "dir", None) if self.run is not None else None


# ---- reading offline runs back (tests, auditing) --------------------------
_BLOCK = 32768
_HEADER = 7


def _records(path: Path):
    data = path.read_bytes()
    if len(data) < 7 or data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B run file")
    pos = 7
    buf = b""
    while pos + _HEADER <= len(data):
        left_in_block = _BLOCK - (pos % _BLOCK)
        if left_in_block < _HEADER:
            pos += left_in_block
            continue
        _crc, length, rtype = struct.unpack("<IHB", data[pos : pos + _HEADER])
        pos += _HEADER
        chunk = data[pos : pos + length]
        pos += length
        if rtype == 0 and length == 0:
            continue
        if rtype == 1:
            yield chunk
        elif rtype == 2:
            buf = chunk
        elif rtype == 3:
            buf += chunk
        elif rtype == 4:
            yield buf + chunk
            buf = b""


def read_offline_run(run_folder: str | os.PathLike) -> dict[str, Any]:
    """Config, summary and history of an offline W&B run folder (``offline-run-*``)."""
    from wandb.proto import wandb_internal_pb2 as pb

    folder = Path(run_folder)
    files = list(folder.glob("run-*.wandb"))
    if not files:
        raise FileNotFoundError(f"no run-*.wandb in {folder}")
    out: dict[str, Any] = {"config": {}, "summary": {}, "history": [], "group": None}
    for raw in _records(files[0]):
        rec = pb.Record()
        rec.ParseFromString(raw)
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            out["group"] = rec.run.run_group or None
            for item in rec.run.config.update:
                out["config"][item.key] = json.loads(item.value_json)
        elif kind == "config":
            for item in rec.config.update:
                out["config"][item.key] = json.loads(item.value_json)
        elif kind == "history":
            out["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
        elif kind == "summary":
            for item in rec.summary.update:
                out["summary"][item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return out
