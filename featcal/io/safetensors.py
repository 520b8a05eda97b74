"""Safetensors checkpoints read tensor by tensor and written incrementally.

``CheckpointReader``: a folder of safetensors shards (with or without the index json) read
one tensor at a time by positioned reads, nothing mapped or cached between calls.
``ShardWriter``: one safetensors file written tensor by tensor (the header first, from the
announced shapes and dtypes, then each tensor's bytes as it comes), so no shard is ever
buffered. ``copy_model_files``: a model folder's config / tokenizer files (not its weights).
The streamed merge (``featcal.merge.streaming``), the lazy models (``featcal.io.lazy``) and the
streamed calibrators read and write checkpoints through these.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import torch

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

# safetensors dtype names <-> torch dtypes
_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


# ============================================================================ reading


class CheckpointReader:
    """Tensor-by-tensor access to a folder of safetensors shards, without memory maps.

    ``keys()`` in file order (the index's shard order, then each file's order), ``get(key)``
    reads one tensor with a positioned read straight into a fresh tensor, ``meta(key)``
    its dtype and shape from the header. Nothing stays mapped or cached between calls:
    reading through a held ``safe_open`` handle keeps every touched page of the file
    resident in the process (its RSS grows to the whole checkpoint), which is what
    streaming must avoid.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        index = self.folder / INDEX_NAME
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = list(dict.fromkeys(weight_map.values()))
        else:
            files = sorted(p.name for p in self.folder.glob("*.safetensors"))
            if not files:
                from featcal.errors import SourceUnavailable

                bins = sorted(p.name for p in self.folder.glob("*.bin"))
                raise SourceUnavailable(
                    f"no *.safetensors weights in model folder '{self.folder}'" + (f" (it has PyTorch {bins[0]}...)" if bins else "")
                    + ": streaming reads safetensors only",
                    "Set backbone.adapter.streaming=false (loads .bin checkpoints in memory), or convert the folder once: "
                    "`AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(DIR2)` writes safetensors.")
        self.files = files
        self._headers: dict[str, tuple[int, dict]] = {}
        self._meta: dict[str, dict] = {}
        for f in files:
            start, header, meta = _read_header(self.folder / f)
            self._headers[f] = (start, header)
            self._meta[f] = meta
        self._where: dict[str, str] = {}
        self._alias: dict[str, str] = {}
        for f in files:
            for k in self._headers[f][1]:
                self._where[k] = f

    def keys(self) -> list[str]:
        return list(self._where) + [k for k in self._alias if k not in self._where]

    def drop(self, key: str) -> None:
        """Hide ``key`` (a redundant tensor, e.g. the copy of a tied head)."""
        self._where.pop(key, None)

    def alias(self, key: str, target: str) -> None:
        """Read ``target`` when ``key`` is asked for (a tied head saved only as the embedding)."""
        self._alias[key] = target

    def file_of(self, key: str) -> str:
        return self._where[key if key in self._where else self._alias[key]]

    def keys_of(self, file: str) -> list[str]:
        return [k for k, f in self._where.items() if f == file]

    def __contains__(self, key: str) -> bool:
        return key in self._where or key in self._alias

    def get(self, key: str) -> torch.Tensor:
        if key not in self._where and key in self._alias:
            key = self._alias[key]
        file = self._where[key]
        start, header = self._headers[file]
        info = header[key]
        dtype, shape = _ST_DTYPES[info["dtype"]], tuple(info["shape"])
        begin, end = info["data_offsets"]
        out = torch.empty(shape, dtype=dtype)
        if end > begin:
            view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
            with open(self.folder / file, "rb") as fh:
                fh.seek(start + begin)
                got = fh.readinto(view)
            if got != end - begin:
                raise OSError(f"{self.folder / file}: short read for {key} ({got} of {end - begin} bytes)")
        return out

    def meta(self, key: str) -> tuple[torch.dtype, tuple[int, ...]]:
        if key not in self._where and key in self._alias:
            key = self._alias[key]
        info = self._headers[self._where[key]][1][key]
        return _ST_DTYPES[info["dtype"]], tuple(info["shape"])

    def metadata(self, file: str) -> dict:
        """The file's ``__metadata__`` (string pairs)."""
        return dict(self._meta.get(file, {}))

    def state_dict(self, prefix: str = "", strip: bool = True) -> dict[str, torch.Tensor]:
        """The tensors whose key starts with ``prefix`` (prefix removed if ``strip``)."""
        out = {}
        for k in self._where:
            if k.startswith(prefix):
                out[k[len(prefix):] if strip else k] = self.get(k)
        return out

    def close(self) -> None:
        pass


def _read_header(path: Path) -> tuple[int, dict, dict]:
    """(data start offset, {key: {dtype, shape, data_offsets}}, __metadata__) of a
    safetensors file."""
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
    meta = header.pop("__metadata__", None) or {}
    return 8 + n, header, meta


# ============================================================================ writing


class ShardWriter:
    """Writes one safetensors file tensor by tensor: the header (offsets from the
    announced shapes/dtypes) first, then each tensor's bytes in the announced order."""

    def __init__(self, path: Path, layout: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict | None = None):
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        header: dict = {"__metadata__": {"format": "pt", **(metadata or {})}}
        offset = 0
        for key, dtype, shape in layout:
            size = _numel(shape) * _itemsize(dtype)
            header[key] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.expected = [(k, d, tuple(s)) for k, d, s in layout]
        self.position = 0
        self.total_bytes = offset
        self.fh = open(self.tmp, "wb")
        self.fh.write(struct.pack("<Q", len(raw)))
        self.fh.write(raw)

    def write(self, key: str, tensor: torch.Tensor) -> None:
        want_key, dtype, shape = self.expected[self.position]
        if key != want_key or tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(
                f"shard {self.path.name}: expected {want_key} {dtype} {shape}, got {key} {tensor.dtype} {tuple(tensor.shape)}"
            )
        t = tensor.detach().to("cpu").contiguous()
        if t.numel():
            self.fh.write(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        self.position += 1

    def close(self) -> None:
        self.fh.close()
        if self.position != len(self.expected):
            raise ValueError(f"shard {self.path.name}: {self.position} of {len(self.expected)} tensors written")
        self.tmp.replace(self.path)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


#: non-weight files copied from the source folder (config, generation config, tokenizer)
COPY_PATTERNS = ("*.json", "*.model", "*.txt", "*.tiktoken", "*.jinja")


def copy_model_files(source: Path, dest: Path) -> list[str]:
    """Copy config / tokenizer files (not weights, not the weight index)."""
    copied = []
    for pattern in COPY_PATTERNS:
        for p in sorted(Path(source).glob(pattern)):
            if p.name == INDEX_NAME or not p.is_file():
                continue
            shutil.copy2(p, dest / p.name)
            copied.append(p.name)
    return copied


def write_index(folder: Path, weight_map: dict[str, str], total_size: int) -> Path:
    """The ``model.safetensors.index.json`` of a sharded folder (key -> shard file), written
    atomically (a reader never sees half of it); returns its path."""
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    path = Path(folder) / INDEX_NAME
    tmp = path.with_name(INDEX_NAME + ".tmp")
    tmp.write_text(json.dumps(index, indent=2))
    tmp.replace(path)
    return path
