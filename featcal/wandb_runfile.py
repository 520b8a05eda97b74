"""Offline W&B run folders and their ``.wandb`` run files, read back without W&B.

A run file is checked after logging (``check_offline_run``): missing, empty, truncated
(mid-header, mid-record), corrupt or without an exit record is reported as such, never as a
success. ``set_aside_bad_runs`` moves such runs out of ``wandb sync``'s reach (a run's next
invocation logs its results again) and ``offline_run_problems`` lists them (featcal-report).
Used by ``featcal.wandb_log`` (the logger) and ``featcal.report`` (the report run).
"""
from __future__ import annotations

import os
import shutil
import struct
import zlib
from pathlib import Path
from typing import Any

_MAGIC = b":W&B"


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
