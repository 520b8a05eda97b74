"""Test-only: read an offline W&B run file back (config, summary, history, group) to check
what a run logged. featcal itself never decodes these files (results.json records the W&B
id, group, project and mode)."""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

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
    out: dict[str, Any] = {"config": {}, "summary": {}, "history": [], "group": None, "artifacts": [], "metrics": {}}
    for raw in _records(files[0]):
        rec = pb.Record()
        rec.ParseFromString(raw)
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            out["group"] = rec.run.run_group or None
            out["job_type"] = rec.run.job_type
            out["tags"] = list(rec.run.tags)
            out["name"] = rec.run.display_name
            out["id"] = rec.run.run_id
            out["project"] = rec.run.project
            for item in rec.run.config.update:
                out["config"][item.key] = json.loads(item.value_json)
        elif kind == "config":
            for item in rec.config.update:
                out["config"][item.key] = json.loads(item.value_json)
        elif kind == "history":
            out["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
        elif kind == "artifact":
            out["artifacts"].append({"name": rec.artifact.name, "type": rec.artifact.type,
                                     "files": [e.path for e in rec.artifact.manifest.contents]})
        elif kind == "metric":
            out["metrics"][rec.metric.name] = rec.metric.step_metric
        elif kind == "summary":
            for item in rec.summary.update:
                out["summary"][item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return out
