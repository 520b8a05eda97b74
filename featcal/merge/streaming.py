"""Streaming merges: base and experts read tensor by tensor from their safetensors
shards, the merged model written shard by shard.

Host memory is about one tensor × (experts + 2) (the base tensor, each expert's
tensor, the merged result), never a whole model: the merged shards are written in the
safetensors format directly (header first, computed from the base's shapes and dtypes,
then each tensor's bytes as soon as it is merged), so not even a shard is buffered.
The output is a normal Hugging Face folder (the base's shard layout and index json,
its config, generation config and tokenizer files) that transformers, lm-eval and vLLM
load as is.

Every method is the same arithmetic as its in-memory version in ``featcal.merge``
(weight average, task arithmetic and DARE call it on one tensor at a time; TIES needs
a global per-task threshold over the whole task vector, found exactly by two
histogram passes over the float32 bit patterns of the magnitudes, then the majority
sign by a third pass, then the merge pass: ``featcal.merge.streaming_methods``, named
by each method's record in ``featcal.merge.registry``). Keys for which ``exclude(key)`` holds and
non-floating tensors keep the base value (LLMs: token embeddings and ``lm_head``).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import struct
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

# the streaming forms of the methods (re-exported here: ``featcal.merge.streaming.GlobalTies``)
from featcal.merge.streaming_methods import GlobalTies, PerTensor, StreamingMethod  # noqa: F401

log = logging.getLogger(__name__)

Exclude = Callable[[str], bool] | None

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


# ============================================================================ streaming forms


def streaming_method(merge_fn) -> StreamingMethod:
    """The streaming form of a merge (``featcal.merge.registry.as_merge`` takes what the
    config builds, a registered function or its partial): the method's record says it."""
    from featcal.merge.registry import as_merge

    return as_merge(merge_fn).streaming()


# ============================================================================ driver


def _mergeable(key: str, dtype: torch.dtype, exclude: Exclude) -> bool:
    return dtype.is_floating_point and not (exclude is not None and exclude(key))


def _embedding_key(keys: Iterable[str]) -> str | None:
    found = [k for k in keys if k.endswith("embed_tokens.weight")]
    return found[0] if len(found) == 1 else None


def _align_tied_head(base: "CheckpointReader", expert: "CheckpointReader", name) -> None:
    """Checkpoints of a tied model (lm_head = the embedding) saved either way: with or without
    an ``lm_head.weight``. An expert's extra head equal to its own embedding is dropped (the base
    has none: it ties them); a head missing from the expert while the base stores one reads the
    expert's embedding. A head that differs from the embedding cannot be tied: one message."""
    head = "lm_head.weight"
    emb = _embedding_key(expert.keys())
    if emb is None or (head in expert) == (head in base):
        return
    if head in expert:  # untied save of a tied model
        h, e = expert.get(head), expert.get(emb)
        if h.shape != e.shape or not torch.equal(h.float(), e.float()):
            from featcal.errors import CheckpointMismatch

            raise CheckpointMismatch(
                f"expert '{name}' stores an lm_head.weight that differs from its embedding ({emb}), while the base "
                "ties them (no lm_head.weight): the expert was trained with an untied head and cannot be merged into a tied model",
                "Use a base saved with its own lm_head.weight (tie_word_embeddings=false), or the expert's tied checkpoint.")
        expert.drop(head)
    else:  # the base was saved untied (equal head), the expert tied
        expert.alias(head, emb)


def stream_merge(
    merge_fn,
    base: str | os.PathLike,
    experts: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    exclude: Exclude = None,
    device: torch.device | str = "cpu",
    files_from: str | os.PathLike | None = None,
    progress: bool = True,
) -> Path:
    """Merge safetensors checkpoints tensor by tensor into ``out`` (a HF model folder).

    ``merge_fn``: a bound merge (``featcal.merge.registry.Merge``, what ``merge=`` builds)
    or a registered merge function (or its partial); its record names the streaming form
    (``streaming_method``). ``device``: where the per-tensor arithmetic runs. ``files_from``:
    the folder whose config/tokenizer files are copied (default: the base's).
    Returns ``out``. Written atomically per file; the index last.
    """
    from tqdm.auto import tqdm

    method = streaming_method(merge_fn)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(device)
    rb = CheckpointReader(base)
    res = [CheckpointReader(e) for e in experts]
    if not res:
        raise ValueError("merging needs at least one expert")
    keys = rb.keys()
    for i, r in enumerate(res):
        _align_tied_head(rb, r, experts[i])
        if set(r.keys()) != set(keys):
            missing = sorted(set(keys) - set(r.keys()))[:5]
            extra = sorted(set(r.keys()) - set(keys))[:5]
            raise ValueError(f"expert {i} ({experts[i]}) does not match the base: missing {missing}, unexpected {extra}")
        for k in keys:
            if r.meta(k)[1] != rb.meta(k)[1]:
                raise ValueError(f"expert {i} ({experts[i]}): {k} has shape {r.meta(k)[1]}, base {rb.meta(k)[1]}")
    merge_keys = [k for k in keys if _mergeable(k, rb.meta(k)[0], exclude)]

    def load(k):
        return rb.get(k).to(device), [r.get(k).to(device) for r in res]

    for p in range(method.passes):
        method.begin_pass(p, len(res))
        for k in tqdm(merge_keys, desc=f"merge pass {p + 1}/{method.passes + 1}", disable=not progress, leave=False):
            b, es = load(k)
            method.observe(p, k, b, es)
            del b, es
        method.end_pass(p)

    total = 0
    weight_map = {}
    for file in tqdm(rb.files, desc=f"merge -> {out.name}", disable=not progress):
        file_keys = rb.keys_of(file)
        layout = [(k, *rb.meta(k)) for k in file_keys]
        writer = ShardWriter(out / file, layout, {k: v for k, v in rb.metadata(file).items() if k != "format"})
        for k in file_keys:
            if k in merge_keys:
                b, es = load(k)
                t = method.merge(k, b, es)
                del b, es
            else:
                t = rb.get(k)
            writer.write(k, t)
            weight_map[k] = file
            del t
        writer.close()
        total += writer.total_bytes
    copy_model_files(Path(files_from) if files_from else Path(base), out)
    if len(rb.files) > 1 or (Path(base) / INDEX_NAME).is_file():
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        tmp = out / (INDEX_NAME + ".tmp")
        tmp.write_text(json.dumps(index, indent=2))
        tmp.replace(out / INDEX_NAME)
    return out


def iter_block_keys(keys: Iterable[str], prefix: str) -> list[str]:
    return [k for k in keys if k.startswith(prefix)]
