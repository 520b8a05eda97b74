"""The configuration key of a run: what tells two runs of a sweep apart.

``config_key`` is the resolved config without the seed and the presentation keys (plus the
device used and the suite build), ``config_id`` its hash; ``label_configurations`` names the
keys that differ between runs of one backbone x merge x calibration in the method labels
(``featcal (rho=1.0, alpha=0)``) or as columns.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

import pandas as pd

#: config keys that do not change what a run computes (left out of the configuration key)
PRESENTATION_KEYS = ("seed", "logger", "resume", "debug", "num_workers", "eval_batch_size", "save_calibrated",
                     "device", "calibrate_repeats", "hydra")
#: leaf names left out wherever they appear (progress bars and similar)
PRESENTATION_LEAVES = ("progress",)


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

