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
- The offline run file is read back after logging (``read_run_file``): missing, empty,
  truncated (mid-header, mid-record), corrupt or without an exit record is reported as
  such (status failed, the next invocation logs again), never as a success; on resume such
  runs are set aside out of ``wandb sync``'s reach (``set_aside_bad_runs``) and
  featcal-report lists them (``offline_run_problems``).
- ``Wandb`` is the ``logger=wandb`` object (``conf/logger/wandb.yaml``'s ``_target_``,
  see ``featcal.loggers``); ``WandbLogger`` is one started run.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import socket
import struct
import urllib.parse
import zlib
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MODES = ("offline", "online", "disabled")
_ALIASES = {"dryrun": "offline", "run": "online", "": "offline"}
INIT_TIMEOUT_S = 10.0
PROBE_TIMEOUT_S = 5.0
_MAGIC = b":W&B"


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


def offline_runs(folder: str | os.PathLike, rid: str | None = None) -> list[Path]:
    """The offline W&B run folders under ``folder/wandb`` (of run id ``rid`` if given)."""
    root = Path(folder) / "wandb"
    pattern = f"offline-run-*-{rid}" if rid else "offline-run-*"
    return sorted(p for p in root.glob(pattern) if p.is_dir())


def remove_offline_runs(folder: str | os.PathLike, rid: str) -> list[Path]:
    """Remove the offline runs of id ``rid`` under ``folder/wandb`` (never synced
    leftovers: a killed job's empty run, a superseded one). Returns what was removed."""
    gone = []
    for run in offline_runs(folder, rid):
        shutil.rmtree(run, ignore_errors=True)
        gone.append(run)
    return gone


# ---- reading an offline run file back ---------------------------------------------------
# A ``.wandb`` file is W&B's transaction log: a 7-byte file header (``:W&B``, the magic
# 0xBEE1, version 0), then LevelDB-log framed records (32 KiB blocks; each fragment a 7-byte
# header -- CRC-32 of type and data, length, type FULL/FIRST/MIDDLE/LAST -- and its data;
# a block tail shorter than a header is zero padding), each record one protobuf ``Record``.
# The installed wandb (0.31) reads these files only in its Go service (wandb-core): its old
# Python reader (``wandb.sdk.internal.datastore``) is gone. So the framing (with its CRCs) is
# read here, and every record is decoded with wandb's own protobuf class (``Record``).
_BLOCK = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4
_FILE_HEADER = struct.Struct("<4sHB")
_FRAGMENT = struct.Struct("<IHB")
_WB_MAGIC = 0xBEE1


class RunFileError(ValueError):
    """A ``.wandb`` file that is truncated or corrupt (``offset``: where reading stopped)."""

    def __init__(self, message: str, offset: int = 0):
        super().__init__(message)
        self.offset = offset


def _framed_records(path: Path):
    data = path.read_bytes()
    size = len(data)
    if size == 0:
        raise RunFileError("empty (0 bytes)", 0)
    if size < _FILE_HEADER.size:
        raise RunFileError(f"truncated inside its file header ({size} of {_FILE_HEADER.size} bytes)", size)
    ident, magic, version = _FILE_HEADER.unpack_from(data, 0)
    if ident != _MAGIC or magic != _WB_MAGIC or version != 0:
        raise RunFileError(f"not a W&B run file (file header {data[:7]!r})", 0)
    crc_seed = {t: zlib.crc32(bytes([t])) for t in (_FULL, _FIRST, _MIDDLE, _LAST)}
    pos, parts, first_at = _FILE_HEADER.size, None, 0
    while pos < size:
        left = _BLOCK - pos % _BLOCK
        if left < _FRAGMENT.size:  # block tail: zero padding
            if data[pos:pos + left].strip(b"\0"):
                raise RunFileError(f"corrupt block padding at byte {pos}", pos)
            pos += left
            continue
        if size - pos < _FRAGMENT.size:
            raise RunFileError(f"truncated inside a record header at byte {pos} ({size - pos} of {_FRAGMENT.size} bytes)", pos)
        crc, length, kind = _FRAGMENT.unpack_from(data, pos)
        if kind == 0 and length == 0 and crc == 0:  # a zeroed tail (preallocated, never written)
            if data[pos:].strip(b"\0"):
                raise RunFileError(f"corrupt record header at byte {pos} (zero type)", pos)
            raise RunFileError(f"truncated: zero bytes from byte {pos} on (the data was never written)", pos)
        if kind not in crc_seed or length > left - _FRAGMENT.size:
            raise RunFileError(f"corrupt record header at byte {pos} (type {kind}, length {length})", pos)
        body = data[pos + _FRAGMENT.size:pos + _FRAGMENT.size + length]
        if len(body) < length:
            raise RunFileError(f"truncated mid-record at byte {pos} ({len(body)} of {length} bytes)", pos)
        if zlib.crc32(body, crc_seed[kind]) & 0xFFFFFFFF != crc:
            raise RunFileError(f"corrupt record at byte {pos} (checksum mismatch)", pos)
        if kind == _FULL:
            if parts is not None:
                raise RunFileError(f"corrupt: a record at byte {first_at} has no last fragment", first_at)
            yield pos, body
        elif kind == _FIRST:
            if parts is not None:
                raise RunFileError(f"corrupt: a record at byte {first_at} has no last fragment", first_at)
            parts, first_at = [body], pos
        else:
            if parts is None:
                raise RunFileError(f"corrupt: a record fragment at byte {pos} has no first fragment", pos)
            parts.append(body)
            if kind == _LAST:
                yield first_at, b"".join(parts)
                parts = None
        pos += _FRAGMENT.size + length
    if parts is not None:
        raise RunFileError(f"truncated mid-record at byte {first_at} (its last fragment is missing)", first_at)


def read_run_file(path: str | os.PathLike) -> list[tuple[int, Any]]:
    """Every record of a ``.wandb`` file as ``(byte offset, wandb Record)``; raises
    ``RunFileError`` naming where a truncated or corrupt file stops making sense."""
    from google.protobuf.message import DecodeError
    from wandb.proto import wandb_internal_pb2 as pb

    path = Path(path)
    out = []
    for offset, raw in _framed_records(path):
        rec = pb.Record()
        try:
            rec.ParseFromString(raw)
        except DecodeError as err:
            raise RunFileError(f"corrupt record at byte {offset} ({err})", offset) from err
        out.append((offset, rec))
    return out


def run_file_problem(path: str | os.PathLike) -> str | None:
    """None for a complete W&B run file, else what is wrong with it: empty, truncated
    (mid-header, mid-record), corrupt (checksum, framing, protobuf), no run record, or no
    exit record (the run was killed or its logging cut short before ``finish``)."""
    path = Path(path)
    try:
        records = read_run_file(path)
    except RunFileError as err:
        return f"{path} is {err}" if str(err).startswith(("empty", "truncated", "not ")) else f"{path}: {err}"
    except OSError as err:
        return f"{path} cannot be read ({err})"
    kinds = [rec.WhichOneof("record_type") for _, rec in records]
    if not records:
        return f"{path} holds no records (only the file header): the run was cut short"
    if "run" not in kinds:
        return f"{path} holds no run record ({len(records)} records): the run was cut short"
    if "exit" not in kinds:
        return f"{path} is incomplete: no exit record after {len(records)} records (killed or cut short before finish)"
    return None


def check_offline_run(run_folder: str | os.PathLike) -> str | None:
    """None when an offline run folder holds a complete, readable W&B run file, else what
    is wrong with it (see ``run_file_problem``; also errors W&B's own log recorded while
    writing it, such as a full disk)."""
    folder = Path(run_folder)
    files = sorted(folder.glob("run-*.wandb"))
    if not files:
        return f"no run-*.wandb file in {folder}"
    problem = run_file_problem(files[0])
    if problem:
        return problem
    internal = folder / "logs" / "debug-internal.log"
    if internal.is_file():
        for line in internal.read_text(errors="replace").splitlines():
            low = line.lower()
            if ('"level":"error"' in low or " error " in low) and ("write" in low or "no space" in low or "corrupt" in low):
                return f"W&B reported an error writing {files[0]}: {line.strip()[:200]}"
    return None


SET_ASIDE = "not-synced"  # <job>/wandb/not-synced/<run>: out of reach of `wandb sync <job>/wandb[/offline-run-*]`


def set_aside(run_folder: str | os.PathLike) -> Path:
    """Move a corrupt or incomplete offline run out of ``wandb sync``'s reach: into
    ``<wandb dir>/not-synced/`` with its ``.wandb`` file renamed ``*.wandb.corrupt``
    (``wandb sync`` takes ``*.wandb`` files in a run folder or one level below a wandb
    folder). Returns the new place."""
    folder = Path(run_folder)
    dest_root = folder.parent / SET_ASIDE
    dest_root.mkdir(parents=True, exist_ok=True)
    dest = dest_root / folder.name
    n = 1
    while dest.exists():
        dest, n = dest_root / f"{folder.name}.{n}", n + 1
    for f in folder.glob("*.wandb"):
        f.rename(f.with_name(f.name + ".corrupt"))
    folder.rename(dest)
    return dest


def set_aside_bad_runs(folder: str | os.PathLike) -> list[tuple[Path, str]]:
    """Check every offline run under ``folder/wandb``; set aside those that are corrupt,
    empty or incomplete. Returns ``[(new place, problem)]``."""
    moved = []
    for run in offline_runs(folder):
        problem = check_offline_run(run)
        if problem:
            moved.append((set_aside(run), problem))
    return moved


def offline_run_problems(folder: str | os.PathLike) -> list[tuple[Path, str]]:
    """``[(offline run folder, problem)]`` for the corrupt, empty or incomplete offline runs
    under ``folder/wandb`` (nothing is moved)."""
    out = []
    for run in offline_runs(folder):
        problem = check_offline_run(run)
        if problem:
            out.append((run, problem))
    return out


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
