"""Streaming merges: base and experts read tensor by tensor from their safetensors
shards, the merged model written shard by shard.

Host memory is about one tensor × (experts + 2) (the base tensor, each expert's
tensor, the merged result), never a whole model: the merged shards are written in the
safetensors format directly (``featcal.io.safetensors``: header first, computed from the
base's shapes and dtypes, then each tensor's bytes as soon as it is merged), so not even
a shard is buffered. The output is a normal Hugging Face folder (the base's shard layout
and index json, its config, generation config and tokenizer files) that transformers,
lm-eval and vLLM load as is.

Every method is the same arithmetic as its in-memory version in ``featcal.merge``
(weight average, task arithmetic and DARE call it on one tensor at a time; TIES needs
a global per-task threshold over the whole task vector, found exactly by two
histogram passes over the float32 bit patterns of the magnitudes, then the majority
sign by a third pass, then the merge pass: ``featcal.merge.streaming_methods``, named
by each method's record in ``featcal.merge.registry``). Keys for which ``exclude(key)`` holds and
non-floating tensors keep the base value (LLMs: token embeddings and ``lm_head``).

``merge_models`` is the merge stage of a run: models the adapter keeps on disk
(``adapter.is_on_disk``) are merged here into a folder (``merge_on_disk``: cached under a
name made of the merge and its inputs) that the adapter then opens (``adapter.open_saved``);
loaded models are merged in memory by the adapter (``adapter.merge``).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

from featcal.io.safetensors import INDEX_NAME, CheckpointReader, ShardWriter, copy_model_files, write_index
from featcal.merge.registry import as_merge
from featcal.utils import cache_root

# the streaming forms of the methods (re-exported here: ``featcal.merge.streaming.GlobalTies``)
from featcal.merge.streaming_methods import GlobalTies, PerTensor, StreamingMethod  # noqa: F401

log = logging.getLogger(__name__)

Exclude = Callable[[str], bool] | None

# ============================================================================ streaming forms


def streaming_method(merge_fn) -> StreamingMethod:
    """The streaming form of a merge (``featcal.merge.registry.as_merge`` takes what the
    config builds, a registered function or its partial): the method's record says it."""
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
        write_index(out, weight_map, total)
    return out


# ============================================================================ the run's merge stage


def merge_recipe(merge_fn, sources: list[str]) -> dict:
    """What a streamed merge result depends on: sources, the merge method's function and
    the parameters it was given (its record's ``identity``, ``featcal.merge.registry``)."""
    return {"sources": list(sources), **as_merge(merge_fn).identity()}


def merged_folder(merge_fn, sources: list[str], merge_dir: str | os.PathLike | None = None) -> Path:
    """Where the streamed merge of ``sources`` goes: ``merge_dir`` when given, else
    ``<cache root>/merged/<hash of the recipe>`` (``featcal.utils.cache_root``: ``$FEATCAL_CACHE``
    or ``~/.cache/featcal``, like every other featcal cache)."""
    if merge_dir:
        return Path(merge_dir)
    key = json.dumps(merge_recipe(merge_fn, sources), sort_keys=True, default=str)
    return cache_root() / "merged" / hashlib.sha256(key.encode()).hexdigest()[:16]


def merge_on_disk(merge_fn, adapter, base: Any, experts: Sequence[Any], **data: Any) -> Any:
    """The streamed merge of models kept on disk (``adapter.is_on_disk``): their folders
    (``adapter.saved_folder``) merged tensor by tensor into ``merged_folder`` (reused when its
    ``featcal_merge.json`` holds the same recipe), on ``adapter.merge_device``, keeping
    ``adapter.merge_excluded`` keys at the base value; the result opened by the adapter
    (``open_saved``, with the base's storage settings) and loaded unless
    ``adapter.merged_on_disk``."""
    if data:
        raise ValueError(f"streaming merges take no calibration data (got {sorted(data)})")
    folders = [Path(adapter.saved_folder(m)) for m in (base, *experts)]
    sources = [str(f) for f in folders]
    folder = merged_folder(merge_fn, sources, adapter.merge_dir)
    marker = folder / "featcal_merge.json"
    recipe = merge_recipe(merge_fn, sources)
    if marker.is_file() and json.loads(marker.read_text()) == recipe:
        log.info("streamed merge: reusing %s", folder)
    else:
        marker.unlink(missing_ok=True)
        stream_merge(merge_fn, folders[0], folders[1:], folder, exclude=adapter.merge_excluded, device=adapter.merge_device)
        marker.write_text(json.dumps(recipe, indent=2))
    merged = adapter.open_saved(folder, like=base)
    return merged if adapter.merged_on_disk else adapter.materialize(merged)


def merge_models(merge_fn, adapter, base: Any, experts: Sequence[Any], **data: Any) -> Any:
    """The merged model: streamed (``merge_on_disk``) when the adapter keeps the models on
    disk, else ``adapter.merge`` (state-dict arithmetic in memory; ``data``: what merges with
    ``needs_calibration_data`` read)."""
    if adapter.is_on_disk(base) or any(adapter.is_on_disk(e) for e in experts):
        return merge_on_disk(merge_fn, adapter, base, experts, **data)
    return adapter.merge(merge_fn, base, experts, **data)
