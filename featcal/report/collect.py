"""Gather every run of a sweep into one CSV (long format) and a Markdown table.

    featcal-collect multirun/2026-11-23/16-05-00            # writes collected.csv + collected.md there
    featcal-collect multirun/... --out results/my_sweep

Every job folder is accounted for (``scan_sweep``): complete runs are collected; a job
folder holding a Hydra config (``.hydra/config.yaml``) but no complete ``results.json`` is
listed as **incomplete** with its status -- ``failed`` (its ``failed.json`` gives the
one-line reason, see featcal/errors.py), ``running`` (its ``.featcal.lock`` is held by a
live process on this host) or ``killed or crashed`` -- and its overrides; an unreadable
``results.json`` is listed with the file and the parse error, and everything readable is
still collected. They appear on stdout (one line per job containing ``incomplete``), in
sections of collected.md, and in failed.csv / incomplete.csv.

Rows are keyed by the whole configuration: ``config_id`` hashes the resolved config
without the seed and the presentation keys (``config_key``), ``config`` holds it as JSON;
the summary table shows every config key that differs between runs of one backbone x
merge x calibration as a column or in the method label (``featcal (rho=1.0, alpha=0)``).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from featcal.errors import failed_runs, one_line, varying_overrides
from featcal.report import format_table
from featcal.utils import atomic_write_text

KEYS = ["backbone", "merge", "calibration", "budget", "split", "seed"]
LOCK_FILE = ".featcal.lock"
RESULTS_FILE = "results.json"
FAILED_FILE = "failed.json"

#: config keys that do not change what a run computes (left out of the configuration key)
PRESENTATION_KEYS = ("seed", "logger", "resume", "debug", "num_workers", "eval_batch_size", "save_calibrated",
                     "device", "calibrate_repeats", "hydra")
#: leaf names left out wherever they appear (progress bars and similar)
PRESENTATION_LEAVES = ("progress",)
STRUCTURAL = ("backbone", "merge", "calibration", "budget")


# ---- every job folder of a sweep ---------------------------------------------------------
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
    with the parse error. Used by featcal-collect and featcal-report."""
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


# ---- the configuration key -------------------------------------------------------------------
def _flatten(node: Any, prefix: str, out: dict[str, str]) -> None:
    if isinstance(node, dict) and node:
        for k, v in node.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out)
    else:
        out[prefix] = node if isinstance(node, str) else json.dumps(node, sort_keys=True, default=str)


def config_key(results: dict[str, Any]) -> dict[str, str]:
    """The run's effective configuration as flat ``{dotted key: value text}``: the resolved
    config without the seed and the presentation keys, plus the device actually used and the
    embedded suite's build (``suite.content_hash``) as ``build``."""
    flat: dict[str, str] = {}
    _flatten(results.get("config") or {}, "", flat)
    keep = {}
    for k, v in flat.items():
        top = k.split(".", 1)[0]
        if top in PRESENTATION_KEYS or k.rsplit(".", 1)[-1] in PRESENTATION_LEAVES or k.startswith("_"):
            continue
        keep[k] = v
    if results.get("device"):
        keep["device"] = str(results["device"]).split(":")[0]
    suite = results.get("suite")
    if isinstance(suite, dict) and suite.get("content_hash"):
        keep["build"] = str(suite["content_hash"])
    return keep


def config_id(key: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def _short_names(keys: list[str], prefix: str) -> dict[str, str]:
    """Shortest dotted suffix of each key that is unique among ``keys``."""
    out = {}
    for k in keys:
        parts = k[len(prefix):].split(".") if k.startswith(prefix) else k.split(".")
        for n in range(1, len(parts) + 1):
            name = ".".join(parts[-n:])
            if sum(1 for o in keys if o == k or o.endswith("." + name) or o == name) == 1 or n == len(parts):
                out[k] = name
                break
    return out


def _text(v: str | None) -> str:
    if v is None:
        return "—"
    return v


def label_configurations(runs: pd.DataFrame, keys: list[dict[str, str]]) -> pd.DataFrame:
    """Per run (rows of ``runs``: backbone, n_tasks, merge, calibration; ``keys``: each run's
    ``config_key``): ``merge_label`` / ``calibration_label`` naming the ``merge.*`` /
    ``calibration.*`` values that differ between runs of the same backbone x task count x
    merge x calibration (``featcal (rho=1.0, alpha=0)``), ``config_id``, and one column per
    other differing key (``build`` for the suite build). Returns ``runs`` with these added
    and ``runs.attrs["config_columns"]`` listing the extra columns."""
    runs = runs.copy()
    groups: dict[tuple, list[int]] = {}
    for i, (_, r) in enumerate(runs.iterrows()):
        groups.setdefault((r["backbone"], r.get("n_tasks"), r["merge"], r["calibration"]), []).append(i)
    varying_by_group: dict[tuple, list[str]] = {}
    extra: list[str] = []
    for g, idx in groups.items():
        names = list(dict.fromkeys(k for i in idx for k in keys[i]))  # config order (rho before alpha)
        varying = [k for k in names if len({keys[i].get(k) for i in idx}) > 1 and k != "budget.per_task"]
        varying_by_group[g] = varying
        for k in varying:
            if not (k.startswith("merge.") or k.startswith("calibration.")) and k not in extra:
                extra.append(k)
    # keys that always carry the same values (backbone.tasks and the adapter's and pool's
    # copies of it, interpolated from one key) are shown once, under the shortest name
    seen: dict[tuple, str] = {}
    for k in sorted(extra, key=lambda k: (k.count("."), len(k), k)):
        values = tuple(keys[i].get(k) for i in range(len(keys)))
        seen.setdefault(values, k)
    extra = [k for k in extra if k in seen.values()]
    extra.sort(key=lambda k: (k == "build", k))
    merge_labels, cal_labels = [], []
    for i, (_, r) in enumerate(runs.iterrows()):
        g = (r["backbone"], r.get("n_tasks"), r["merge"], r["calibration"])
        varying = varying_by_group[g]
        labels = []
        for group, name in (("merge", r["merge"]), ("calibration", r["calibration"])):
            own = [k for k in varying if k.startswith(group + ".")]
            short = _short_names(own, group + ".")
            parts = [f"{short[k]}={_text(keys[i].get(k))}" for k in own]
            labels.append(f"{name} ({', '.join(parts)})" if parts else str(name))
        merge_labels.append(labels[0])
        cal_labels.append(labels[1])
    runs["merge_label"] = merge_labels
    runs["calibration_label"] = cal_labels
    runs["config_id"] = [config_id(k) for k in keys]
    for k in extra:
        runs[k] = [_text(keys[i].get(k)) for i in range(len(keys))]
    runs.attrs["config_columns"] = extra
    return runs


# ---- collecting ------------------------------------------------------------------------------
def collect(sweep_dir: Path, sweep: Sweep | None = None) -> pd.DataFrame:
    """Long table of every complete run under ``sweep_dir`` (incomplete and unreadable jobs
    are left out here; ``scan_sweep`` lists them)."""
    sweep = sweep or scan_sweep(sweep_dir)
    frames = []
    for folder, data in sweep.complete:
        csv = folder / "results.csv"
        if not csv.exists():
            continue
        try:
            df = pd.read_csv(csv)
        except Exception:  # an unreadable CSV beside a good results.json: skip it, say so
            sweep.unreadable.append({"run": folder.name, "run_dir": str(folder), "path": str(csv), "error": "unreadable results.csv"})
            continue
        memory = data.get("memory") or {}
        key = config_key(data)
        df["n_tasks"] = len(data.get("tasks") or [])
        df["calibrate_seconds"] = (data.get("timings") or {}).get("calibrate")
        df["merge_seconds"] = (data.get("timings") or {}).get("merge")
        df["peak_rss_mib"] = memory.get("peak_rss_mib")
        df["cuda_peak_mib"] = memory.get("cuda_peak_mib")
        df["rss_above_start_mib"] = memory.get("peak_rss_above_baseline_mib")
        df["config_id"] = config_id(key)
        df["config"] = json.dumps(key)  # config order (labels follow it)
        frames.append(df)
    if not frames:
        raise FileNotFoundError(f"no completed runs (results.json) under {sweep_dir}")
    return pd.concat(frames, ignore_index=True)


def failed_table(sweep_dir: Path) -> list[dict]:
    """One row per failed job under ``sweep_dir``: run folder, the overrides that set it
    apart from the other jobs, stage, error class and one-line reason."""
    sweep_dir = Path(sweep_dir)
    varying = varying_overrides(sweep_dir)
    rows = []
    for f in failed_runs(sweep_dir):
        overrides = [str(o) for o in f.get("overrides") or []]
        shown = [o for o in overrides if o.split("=", 1)[0] in varying] if varying else overrides
        try:
            run = str(Path(f["run_dir"]).relative_to(sweep_dir))
        except ValueError:
            run = f["run_dir"]
        rows.append({
            "run": run,
            "status": {"crash": "crashed", "out_of_memory": "out of memory"}.get(f.get("kind"), "failed"),
            "overrides": " ".join(shown),
            "stage": f.get("stage") or "",
            "error": f.get("error", ""),
            "reason": f.get("reason", ""),
        })
    return rows


def metric_column(df: pd.DataFrame, metric: str = "accuracy") -> pd.DataFrame:
    """The rows of one metric with its values in a column named after it (long CSVs
    since the ``metric``/``value`` columns; older CSVs that carry an ``accuracy``
    column pass through)."""
    if "metric" not in df.columns:
        return df
    out = df[df["metric"] == metric].copy()
    out[metric] = out["value"]
    return out


def summary_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per run and stage (experts / merged / calibrated), one column per task (its
    primary metric) plus the average. With a ``config`` column (featcal-collect's), the
    config keys that differ between runs of one backbone x merge x calibration show in the
    labels and as columns, and runs are never merged unless they share run folder."""
    sub = df[df["stage"].isin(["experts", "merged", "calibrated"]) & df["primary"].astype(str).str.lower().isin(("true", "1"))].copy()
    extra_cols: list[str] = []
    if "config" in sub.columns and "run_dir" in sub.columns:
        per_run = sub.drop_duplicates("run_dir")
        keys = [json.loads(c) if isinstance(c, str) else {} for c in per_run["config"]]
        meta = per_run[["run_dir", "backbone", "merge", "calibration"]].copy()
        meta["n_tasks"] = per_run["n_tasks"].to_numpy() if "n_tasks" in per_run else 0
        labelled = label_configurations(meta.reset_index(drop=True), keys)
        extra_cols = labelled.attrs["config_columns"]
        lab = labelled[["run_dir", "merge_label", "calibration_label", *extra_cols]]
        sub = sub.merge(lab, on="run_dir", how="left")
        sub["merge"], sub["calibration"] = sub["merge_label"], sub["calibration_label"]
    index = [k for k in KEYS if k in sub.columns] + extra_cols + (["run_dir"] if "run_dir" in sub.columns else []) + ["stage"]
    for c in index:
        sub[c] = sub[c].astype(str)
    wide = sub.pivot_table(index=index, columns="task", values="value", aggfunc="first")
    tasks = [c for c in wide.columns if c != "average"] + (["average"] if "average" in wide.columns else [])
    wide = wide[tasks].reset_index()
    cost = [c for c in ("calibrate_seconds", "peak_rss_mib") if c in sub.columns]
    if cost:
        extra = sub.groupby(index)[cost].first().reset_index()
        wide = wide.merge(extra, on=index, how="left")
    if "run_dir" in wide.columns:
        wide["run"] = wide["run_dir"].map(lambda p: Path(p).name)
        wide = wide.drop(columns=["run_dir"])
        wide = wide[["run"] + [c for c in wide.columns if c != "run"]]
    return wide


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="featcal-collect", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", type=Path, help="a Hydra multirun folder (or any folder holding run folders)")
    parser.add_argument("--out", type=Path, default=None, help="folder for collected.csv / collected.md (default: sweep_dir)")
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        print(f"featcal-collect: no such folder: {args.sweep_dir}", file=sys.stderr)
        return 2
    out = args.out or args.sweep_dir
    sweep = scan_sweep(args.sweep_dir)
    failed = failed_table(args.sweep_dir)
    failed_md = ""
    if failed:
        atomic_write_text(out / "failed.csv", pd.DataFrame(failed).to_csv(index=False))
    try:
        df = collect(args.sweep_dir, sweep)
    except FileNotFoundError as err:
        df = None
        print(f"featcal-collect: {err}", file=sys.stderr)
    incomplete_md = sweep.markdown()
    if sweep.incomplete or sweep.unreadable:
        rows = [{"kind": "incomplete", **j} for j in sweep.incomplete] + [{"kind": "unreadable", **u} for u in sweep.unreadable]
        atomic_write_text(out / "incomplete.csv", pd.DataFrame(rows).to_csv(index=False))
    if failed:
        escaped = [{k: str(v).replace("|", "\\|") for k, v in row.items()} for row in failed]
        failed_md = f"\n## Failed jobs ({len(failed)})\n\n" + format_table(escaped) + "\n"
    notes = "\n".join(sweep.lines())
    n_inc = sum(1 for j in sweep.incomplete if j["status"] != "failed")
    tail = (f", {len(failed)} failed" if failed else "") + (f", {n_inc} incomplete (killed, crashed or running)" if n_inc else "") + \
        (f", {len(sweep.unreadable)} unreadable" if sweep.unreadable else "")
    if df is None:
        atomic_write_text(out / "collected.md", (incomplete_md + failed_md).lstrip("\n") or "(no runs)\n")
        if notes:
            print(notes)
        print(f"\n0 runs{tail} -> {out / 'collected.md'}")
        return 2
    atomic_write_text(out / "collected.csv", df.to_csv(index=False))
    table = summary_table(df)
    rows = table.to_dict(orient="records")
    atomic_write_text(out / "collected.md", format_table(rows) + "\n" + ("\n" + incomplete_md if incomplete_md else "") + failed_md)
    print(format_table(rows))
    if notes:
        print("\n" + notes)
    if failed:
        print("\n" + failed_md.strip())
    files = [out / "collected.csv", out / "collected.md"] + ([out / "failed.csv"] if failed else []) + \
        ([out / "incomplete.csv"] if sweep.incomplete or sweep.unreadable else [])
    print(f"\n{df['run_dir'].nunique()} runs{tail} -> {', '.join(map(str, files))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
