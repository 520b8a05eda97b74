"""Every job folder of a sweep: complete runs, incomplete jobs (failed, running, killed or
crashed, from their ``failed.json`` and ``.featcal.lock``) and unreadable results files.

Used by ``featcal-report collect`` and ``featcal-report``: every job folder is accounted for
(listed, never dropped silently).
"""
from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from featcal.errors import one_line, varying_overrides
from featcal.report.run_tables import format_table

LOCK_FILE = ".featcal.lock"
RESULTS_FILE = "results.json"
FAILED_FILE = "failed.json"


@dataclass
class Sweep:
    """What ``scan_sweep`` found under a folder."""

    root: Path
    complete: list[tuple[Path, dict[str, Any]]] = field(default_factory=list)  # (run folder, results)
    incomplete: list[dict[str, Any]] = field(default_factory=list)  # run, run_dir, status, reason, overrides
    unreadable: list[dict[str, Any]] = field(default_factory=list)  # path, error

    def lines(self) -> list[str]:
        """One human line per incomplete job and per unreadable file."""
        out = []
        for j in self.incomplete:
            text = f"incomplete: {j['run']} ({j['status']})"
            if j["overrides"]:
                text += f" {j['overrides']}"
            if j["reason"]:
                text += f" -- {j['reason']}"
            out.append(text)
        for u in self.unreadable:
            out.append(f"unreadable: {u['path']}: {u['error']}")
        return out

    def markdown(self) -> str:
        """Sections for collected.md / table.md (empty when every job is complete)."""
        parts = []
        if self.incomplete:
            rows = [{k: str(j[k]).replace("|", "\\|") for k in ("run", "status", "overrides", "reason")} for j in self.incomplete]
            parts.append(f"## Incomplete jobs ({len(rows)})\n\n" + format_table(rows) + "\n")
        if self.unreadable:
            rows = [{k: str(u[k]).replace("|", "\\|") for k in ("path", "error")} for u in self.unreadable]
            parts.append(f"## Unreadable results ({len(rows)})\n\n" + format_table(rows) + "\n")
        return "\n".join(parts)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    except OSError:
        return False
    return True


def lock_status(run_dir: Path) -> tuple[str, str]:
    """(status, reason) of a job folder without complete results, from its lock file."""
    lock = Path(run_dir) / LOCK_FILE
    if not lock.exists():
        return "killed or crashed", ""
    try:
        data = json.loads(lock.read_text())
        pid, host = int(data["pid"]), str(data.get("host", ""))
    except (OSError, ValueError, KeyError, TypeError) as err:
        return "killed or crashed", f"unreadable {LOCK_FILE} ({type(err).__name__})"
    if host and host != socket.gethostname():
        return "killed or crashed", f"lock held by pid {pid} on host {host} (not checked from here)"
    if _pid_alive(pid):
        return "running", f"pid {pid}"
    return "killed or crashed", f"lock left by pid {pid}, which is gone"


def _overrides(run_dir: Path) -> list[str]:
    import yaml

    try:
        items = yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text()) or []
        return [str(i) for i in items]
    except Exception:
        return []


def _is_job_path(path: Path, root: Path) -> bool:
    """Not inside W&B's or submitit's own folders."""
    parts = path.relative_to(root).parts
    return not any(p == "wandb" or p.startswith(".submitit") or p.startswith("offline-run-") for p in parts)


def scan_sweep(root: str | os.PathLike) -> Sweep:
    """Every job folder under ``root`` (a folder holding ``.hydra/config.yaml`` or a
    ``results.json``): complete runs with their results, incomplete jobs with a status
    (failed / running / killed or crashed) and their overrides, unreadable results files
    with the parse error. Used by featcal-report collect and featcal-report."""
    root = Path(root)
    sweep = Sweep(root)
    folders = {p.parent.parent for p in root.rglob("config.yaml") if p.parent.name == ".hydra"}
    folders |= {p.parent for p in root.rglob(RESULTS_FILE)}
    folders = sorted((f for f in folders if _is_job_path(f, root)), key=lambda f: _sort_key(f, root))
    varying = varying_overrides(root)
    for folder in folders:
        try:
            run = str(folder.relative_to(root)) or "."
        except ValueError:  # pragma: no cover
            run = str(folder)
        res = folder / RESULTS_FILE
        if res.exists():
            try:
                data = json.loads(res.read_text())
                if not isinstance(data, dict) or "score" not in data:
                    raise ValueError("not a featcal results file (no 'score')")
            except (OSError, ValueError, UnicodeDecodeError) as err:
                sweep.unreadable.append({"run": run, "run_dir": str(folder), "path": str(res), "error": one_line(f"{type(err).__name__}: {err}")})
                continue
            sweep.complete.append((folder, data))
            continue
        overrides = _overrides(folder)
        shown = [o for o in overrides if o.split("=", 1)[0] in varying] if varying else overrides
        failed = folder / FAILED_FILE
        if failed.exists():
            try:
                info = json.loads(failed.read_text())
                reason = one_line(str(info.get("reason") or info.get("error") or ""))
            except (OSError, ValueError) as err:
                reason = f"unreadable {FAILED_FILE}: {type(err).__name__}"
            status = "failed"
        else:
            status, reason = lock_status(folder)
        sweep.incomplete.append({"run": run, "run_dir": str(folder), "status": status, "reason": reason, "overrides": " ".join(shown)})
    return sweep


def _sort_key(folder: Path, root: Path) -> tuple:
    parts = folder.relative_to(root).parts
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts)

