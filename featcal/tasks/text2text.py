"""Text-to-text task pools (T5-style encoder–decoders): prompts in, generated text out.

A :class:`TextToTextTaskPool` turns each task's examples into prompt strings and target
strings, tokenises test splits once (cached on disk under ``text2text/``; the n drawn
calibration rows are tokenised when drawn), hands out unlabeled calibration batches
(``input_ids`` + ``attention_mask``; gold target ids as ``labels`` only for the gold-target
ablation) and evaluates a model by **batched greedy generation** on the device, decoded
with special tokens skipped and scored per task:

* ``accuracy``: exact string match of the decoded answer with the target text (in %);
* ``spearman``: the answer parsed as a float (0.0 when it does not parse), Spearman rank
  correlation with the gold scores, ×100.

Subclasses say where examples come from and how they read: ``task_names``,
``load_split(task, split)`` (a ``datasets.Dataset`` or a list of dicts),
``render_input(task, row)``, ``render_target(task, row)``, ``gold_value(task, row)`` and
``metric_of(task)``. The GLUE pool (``featcal.tasks.glue``) is one.
"""
from __future__ import annotations

import abc
import hashlib
import json
import logging
import math
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from featcal.backbone.base import Inputs
from featcal.tasks.base import Metrics, TaskPool
from featcal.tasks.budget import examples_per_task, seeded_first_n

log = logging.getLogger(__name__)

IGNORE = -100


# --------------------------------------------------------------------------- metrics


def parse_float(text: str) -> float:
    """The answer as a number; 0.0 when it does not parse (FusionBench's STS-B rule)."""
    try:
        value = float(str(text).strip())
    except (TypeError, ValueError):
        return 0.0
    return value if math.isfinite(value) else 0.0


def _average_ranks(values: Sequence[float]) -> np.ndarray:
    """Ranks 1..n with ties sharing their average rank."""
    x = np.asarray(values, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    sorted_x = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def spearman(pred: Sequence[float], gold: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties); 0.0 when either side is
    constant (no ordering information) or there are fewer than two pairs."""
    if len(pred) != len(gold):
        raise ValueError(f"{len(pred)} predictions for {len(gold)} gold values")
    if len(pred) < 2:
        return 0.0
    a, b = _average_ranks(pred), _average_ranks(gold)
    a, b = a - a.mean(), b - b.mean()
    den = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
    return float((a * b).sum()) / den if den > 0 else 0.0


def exact_match_accuracy(predictions: Sequence[str], targets: Sequence[str]) -> float:
    """% of answers equal to their target string (surrounding whitespace ignored)."""
    if not targets:
        return 0.0
    hits = sum(str(p).strip() == str(t).strip() for p, t in zip(predictions, targets))
    return 100.0 * hits / len(targets)


def score_answers(metric: str, predictions: Sequence[str], targets: Sequence[str], golds: Sequence[Any]) -> dict[str, float]:
    """{metric: value} for decoded answers: ``accuracy`` (exact match with ``targets``) or
    ``spearman`` (parsed floats vs numeric ``golds``, ×100)."""
    if metric == "accuracy":
        return {"accuracy": exact_match_accuracy(predictions, targets)}
    if metric == "spearman":
        return {"spearman": 100.0 * spearman([parse_float(p) for p in predictions], [float(g) for g in golds])}
    raise ValueError(f"unknown text-to-text metric '{metric}' (allowed: accuracy, spearman)")


# ----------------------------------------------------------------------- batching


def pad_batch(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids [B, L] and attention mask [B, L] for token id lists."""
    width = max((len(r) for r in rows), default=1) or 1
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.as_tensor(list(r), dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


def pad_labels(rows: Sequence[Sequence[int]]) -> torch.Tensor:
    width = max((len(r) for r in rows), default=1) or 1
    out = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.as_tensor(list(r), dtype=torch.long)
    return out


def default_cache_root() -> Path:
    from featcal.utils import cache_root

    return cache_root() / "text2text"


def _hash(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


class TokenisedSplit:
    """Tokenised examples of one task split: input ids, target ids, target texts, gold values."""

    def __init__(self, input_ids: list[list[int]], target_ids: list[list[int]], targets: list[str], golds: list[Any]):
        self.input_ids, self.target_ids, self.targets, self.golds = input_ids, target_ids, targets, golds

    def __len__(self) -> int:
        return len(self.input_ids)


# ----------------------------------------------------------------------- the pool


class TextToTextTaskPool(TaskPool):
    """Generic text-to-text task pool (see the module docstring).

    Args:
        tasks: task names, ordered like the backbone's experts.
        tokenizer: hub id or folder of the tokenizer (usually the base model's), or a
            tokenizer object.
        cache_dir: where tokenised splits are cached (null: $FEATCAL_CACHE or
            ~/.cache/featcal, under ``text2text/``).
        max_input_length: prompts are truncated to this many tokens (eos kept).
        max_new_tokens: greedy answers are at most this long.
        calibration_target: "expert" (calibration batches carry inputs only) or "gold"
            (they also carry the gold target ids as ``labels``: the ablation).
        max_test_examples: evaluate on the first k test examples only (null: all).
        progress: tqdm bars.
    """

    def __init__(
        self,
        tasks: list[str],
        tokenizer: Any,
        cache_dir: str | None = None,
        max_input_length: int = 512,
        max_new_tokens: int = 10,
        calibration_target: str = "expert",
        max_test_examples: int | None = None,
        progress: bool = True,
    ):
        if calibration_target not in ("expert", "gold"):
            raise ValueError(f"calibration_target must be 'expert' or 'gold', got {calibration_target!r}")
        self._names = list(tasks)
        self.tokenizer_source = tokenizer
        self._tokenizer = None if isinstance(tokenizer, (str, os.PathLike)) else tokenizer
        self.cache_dir = Path(os.path.expanduser(str(cache_dir))) if cache_dir else default_cache_root()
        self.max_input_length = int(max_input_length)
        self.max_new_tokens = int(max_new_tokens)
        self.calibration_target = calibration_target
        self.max_test_examples = None if max_test_examples is None else int(max_test_examples)
        self.progress = bool(progress)
        self._splits: dict[tuple[str, str], TokenisedSplit] = {}

    @classmethod
    def validate_config(cls, node: dict[str, Any]) -> list[str]:
        from featcal.config import check_keys, positive_int

        return check_keys(node, {
            "calibration_target": (lambda x: x in ("expert", "gold"), "allowed: expert, gold"),
            "max_input_length": (positive_int, "must be a positive integer"),
            "max_new_tokens": (positive_int, "must be a positive integer"),
            "max_test_examples": (lambda x: x is None or positive_int(x), "must be a positive integer or null (all)"),
        })

    # ---- what subclasses provide ------------------------------------------
    @abc.abstractmethod
    def load_split(self, task: str, split: str) -> Sequence[dict]:
        """The rows of ``split`` ("train" or "test") of ``task`` (a datasets.Dataset or a list of dicts)."""

    @abc.abstractmethod
    def render_input(self, task: str, row: dict) -> str:
        """The prompt string of one example."""

    @abc.abstractmethod
    def render_target(self, task: str, row: dict) -> str:
        """The target string of one example (what a correct answer decodes to)."""

    def gold_value(self, task: str, row: dict) -> Any:
        """The gold value the metric compares with (default: the target string)."""
        return self.render_target(task, row)

    def metric_of(self, task: str) -> str:
        return "accuracy"

    def source_identity(self, task: str, split: str) -> Any:
        """What identifies the data of (task, split) in the cache key."""
        return [type(self).__name__, task, split]

    # ---- the TaskPool contract ------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self._names)

    def primary_metric(self, task: str) -> str:
        return self.metric_of(task)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from featcal.backbone.t5 import load_t5_tokenizer

            self._tokenizer = load_t5_tokenizer(str(self.tokenizer_source))
        return self._tokenizer

    # ---- tokenised data (cached) ----------------------------------------------
    def _tokenizer_identity(self) -> Any:
        tok = self.tokenizer
        try:
            backend = tok.backend_tokenizer.to_str()
            digest = hashlib.sha256(backend.encode()).hexdigest()[:16]
        except Exception:  # slow tokenizers
            digest = str(len(tok))
        return [type(tok).__name__, getattr(tok, "name_or_path", ""), digest]

    def _cache_key(self, task: str, split: str) -> str:
        return _hash(
            {
                "format": 1,
                "source": self.source_identity(task, split),
                "tokenizer": self._tokenizer_identity(),
                "max_input_length": self.max_input_length,
                "render": self.render_identity(task),
            }
        )

    def render_identity(self, task: str) -> Any:
        """What determines the prompt/target strings of ``task`` (templates, label words)."""
        return None

    def split(self, task: str, split: str) -> TokenisedSplit:
        """All of ``split`` of ``task`` tokenised, from the disk cache when it is there
        (used for the test split; calibration tokenises only the rows it draws)."""
        key = (task, split)
        if key in self._splits:
            return self._splits[key]
        folder = self.cache_dir / f"{task}-{split}-{self._cache_key(task, split)}"
        data = self._read_cache(folder)
        if data is None:
            data = self._tokenise(task, self.load_split(task, split))
            self._write_cache(folder, data)
        self._splits[key] = data
        return data

    def _tokenise(self, task: str, rows: Any) -> TokenisedSplit:
        prompts, targets, golds = [], [], []
        for row in rows:
            row = dict(row)
            prompts.append(self.render_input(task, row))
            targets.append(self.render_target(task, row))
            golds.append(self.gold_value(task, row))
        tok = self.tokenizer
        enc = tok(prompts, truncation=True, max_length=self.max_input_length)["input_ids"] if prompts else []
        tgt = tok(targets, truncation=True, max_length=self.max_new_tokens + 1)["input_ids"] if targets else []
        return TokenisedSplit([list(map(int, x)) for x in enc], [list(map(int, x)) for x in tgt], targets, golds)

    @staticmethod
    def _read_cache(folder: Path) -> TokenisedSplit | None:
        if not (folder / "meta.json").exists():
            return None
        try:
            meta = json.loads((folder / "meta.json").read_text())
            arrays = np.load(folder / "ids.npz")

            def unflat(name):
                flat, offsets = arrays[name].tolist(), arrays[name + "_offsets"].tolist()
                return [flat[a:b] for a, b in zip(offsets[:-1], offsets[1:])]

            data = TokenisedSplit(unflat("input_ids"), unflat("target_ids"), meta["targets"], meta["golds"])
            if not (len(data.input_ids) == len(data.target_ids) == len(data.targets) == len(data.golds) == meta["size"]):
                raise ValueError("inconsistent lengths")
            return data
        except Exception as err:  # a damaged cache is rebuilt
            log.warning("rebuilding the tokenised cache %s (%s)", folder, err)
            return None

    @staticmethod
    def _write_cache(folder: Path, data: TokenisedSplit) -> None:
        def flat(rows):
            offsets = np.cumsum([0] + [len(r) for r in rows]).astype(np.int64)
            values = np.fromiter((v for r in rows for v in r), dtype=np.int64, count=int(offsets[-1]))
            return values, offsets

        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = folder.parent / f".tmp-{folder.name}-{uuid.uuid4().hex[:8]}"
        try:
            tmp.mkdir(parents=True)
            ii, io = flat(data.input_ids)
            ti, to = flat(data.target_ids)
            np.savez(tmp / "ids.npz", input_ids=ii, input_ids_offsets=io, target_ids=ti, target_ids_offsets=to)
            meta = {"size": len(data), "targets": data.targets, "golds": data.golds}
            (tmp / "meta.json").write_text(json.dumps(meta))
            if folder.exists():
                shutil.rmtree(folder, ignore_errors=True)
            os.replace(tmp, folder)
        except OSError as err:  # another process won the race, or a read-only cache
            log.warning("could not write the tokenised cache %s (%s)", folder, err)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    # ---- calibration ------------------------------------------------------------
    def split_size(self, task: str, split: str) -> int:
        return len(self.load_split(task, split))

    def calibration_indices(self, task: str, n: int | str, seed: int, split: str = "train") -> list[int]:
        """Rows of ``split`` used for calibration: a seeded permutation, first n (n = "all":
        the whole split, in that seeded order)."""
        size = self.split_size(task, split)
        return seeded_first_n(size, examples_per_task(n, size, task, split), seed)

    def calibration_examples(self, task: str, n: int | str, seed: int, split: str = "train") -> TokenisedSplit:
        """The n drawn examples, tokenised (only those rows are read and tokenised)."""
        idx = self.calibration_indices(task, n, seed, split)
        if split == "test":
            full = self.split(task, "test")
            return TokenisedSplit(
                [full.input_ids[i] for i in idx], [full.target_ids[i] for i in idx],
                [full.targets[i] for i in idx], [full.golds[i] for i in idx],
            )
        rows = self.load_split(task, split)
        picked = rows.select(idx) if hasattr(rows, "select") else [rows[i] for i in idx]
        return self._tokenise(task, picked)

    def calibration_batches(self, task: str, n: int | str, seed: int, batch_size: int, split: str = "train") -> list[dict]:
        """Unlabeled batches (``input_ids``, ``attention_mask``; ``labels`` = gold target ids
        only when ``calibration_target`` is gold)."""
        data = self.calibration_examples(task, n, seed, split)
        pad = self.tokenizer.pad_token_id
        out = []
        for i in range(0, len(data), batch_size):
            sl = slice(i, i + batch_size)
            ids, mask = pad_batch(data.input_ids[sl], pad)
            batch = {"input_ids": ids, "attention_mask": mask}
            if self.calibration_target == "gold":
                batch["labels"] = pad_labels(data.target_ids[sl])
            out.append(batch)
        return out

    def calibration_set(self, n: int | str, seed: int, batch_size: int, split: str = "train") -> list[list[Inputs]]:
        return [self.calibration_batches(t, n, seed, batch_size, split) for t in self._names]

    # ---- evaluation -----------------------------------------------------------
    @torch.no_grad()
    def generate_answers(self, model: nn.Module, input_ids: list[list[int]], device: torch.device | str, batch_size: int, desc: str = "") -> list[str]:
        """Greedy answers (decoded, special tokens skipped) for token id lists, in order.
        Examples run longest first so batches carry little padding."""
        from featcal.backbone.seq2seq import greedy_generate

        device = torch.device(device)
        tok = self.tokenizer
        order = sorted(range(len(input_ids)), key=lambda i: -len(input_ids[i]))
        answers: list[str] = [""] * len(input_ids)
        bar = tqdm(range(0, len(order), batch_size), desc=desc, leave=False, disable=not self.progress)
        for start in bar:
            rows = order[start : start + batch_size]
            ids, mask = pad_batch([input_ids[r] for r in rows], tok.pad_token_id)
            gen = greedy_generate(model, ids.to(device), mask.to(device), self.max_new_tokens)
            texts = tok.batch_decode(gen.cpu(), skip_special_tokens=True)
            for r, text in zip(rows, texts):
                answers[r] = text.strip()
        return answers

    def evaluate(
        self,
        model_for_task: Callable[[int], nn.Module],
        device: torch.device | str,
        batch_size: int = 64,
        only: list[int] | None = None,
        desc: str = "",
    ) -> Metrics:
        """{task: {metric: value}} for ``model_for_task(i)`` (a model with ``generate``)."""
        device = torch.device(device)
        out: Metrics = {}
        for i, task in enumerate(self._names):
            if only is not None and i not in only:
                continue
            data = self.split(task, "test")
            k = len(data) if self.max_test_examples is None else min(len(data), self.max_test_examples)
            model = model_for_task(i)
            home = next(model.parameters()).device
            model.to(device)
            try:
                answers = self.generate_answers(model, data.input_ids[:k], device, batch_size, desc=f"{desc}:{task}" if desc else task)
            finally:
                model.to(home)
            out[task] = score_answers(self.metric_of(task), answers, data.targets[:k], data.golds[:k])
        return out
