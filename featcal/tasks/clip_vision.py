"""The CLIP eight-task image classification benchmark.

Tasks: sun397, stanford-cars, resisc45, eurosat, svhn, gtsrb, mnist, dtd. Their
dataset ids, split/column names, class names and prompt templates are data in
``featcal/tasks/data/clip_tasks.json``.

- Data: ``datasets.load_dataset(<hub id or local folder>)``, or
  ``datasets.load_from_disk`` for a folder written by ``save_to_disk``. Hub access
  honours ``HF_HOME`` / ``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` natively; a dataset
  that cannot be found raises :class:`~featcal.errors.SourceUnavailable` naming it and
  saying how to pre-download it.
- Preprocessing: the base model's ``CLIPImageProcessor`` (resize, centre crop,
  normalise); without a ``preprocessor_config.json`` the standard CLIP recipe
  (bicubic resize of the short side, centre crop to the model's image size, CLIP
  mean/std).
- Calibration examples: the ``train`` split (or the requested split), shuffled with
  the run seed, first n. Test batches: the full test split.
- Heads: zero-shot class embeddings, the mean over templates of L2-normalised text
  embeddings through the base model's text tower and ``text_projection``,
  L2-normalised again; cached on disk per (base model, task, class names, templates);
  logits = ``logit_scale.exp()`` · cosine.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from featcal.errors import CheckpointMismatch, ConfigError, CorruptCache, loading
from featcal.backbone.clip import canonical_clip_keys, read_model_config
from featcal.io.hub import load_raw_state_dict, resolve_model_dir
from featcal.errors import SourceUnavailable
from featcal.tasks.base import ClassEmbeddingHead, ClassificationTaskPool, Task
from featcal.tasks.budget import examples_per_task, seeded_first_n
from featcal.tasks.clip_images import CLIPImagePreprocess, ImageCollate, ImageLabelDataset
from featcal.utils import cache_root

DATA_FILE = Path(__file__).with_name("data") / "clip_tasks.json"
CLIP_TASKS = ("sun397", "stanford-cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd")


@lru_cache(maxsize=4)
def _read_table(path: str) -> dict:
    return json.loads(Path(path).read_text())["tasks"]


def task_table(path: str | os.PathLike | None = None) -> dict[str, dict]:
    """Per task: dataset, config, splits, columns, sizes, class names, templates."""
    return {k: dict(v) for k, v in _read_table(str(path or DATA_FILE)).items()}


# ---------------------------------------------------------------------------
# text tower and tokenizer of the base model (its image preprocessing: clip_images.py)


def load_clip_text(source: str, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, float]:
    """The text tower + ``text_projection`` of a CLIP model, and its ``logit_scale.exp()``.

    ``source`` is a hub id or a local folder holding a full ``CLIPModel`` saved by
    transformers 4.x or 5.x (legacy ``text_config_dict`` configs and persisted
    ``position_ids`` buffers included). The state dict is mapped onto
    ``CLIPTextModelWithProjection`` and loaded strictly, so a layout mismatch fails
    loudly instead of leaving random weights.
    """
    from transformers import CLIPConfig, CLIPTextConfig, CLIPTextModelWithProjection

    folder = resolve_model_dir(source)
    data = read_model_config(folder, str(source))
    if data.get("model_type") not in (None, "clip", "clip_text_model"):
        raise CheckpointMismatch(
            f"'{source}' is a '{data.get('model_type')}' checkpoint, not a CLIP model (its text tower builds the zero-shot heads)",
            "The base must be a full CLIP model (CLIPModel with text and vision towers).",
        )
    if data.get("model_type") == "clip" or "text_config" in data or "text_config_dict" in data:
        clean = {k: v for k, v in data.items() if k not in ("architectures", "transformers_version", "model_type")}
        full = CLIPConfig(**clean)
        config = full.text_config
        config.projection_dim = full.projection_dim
    else:
        config = CLIPTextConfig(**{k: v for k, v in data.items() if k not in ("architectures", "transformers_version", "model_type")})
    raw = load_raw_state_dict(folder, str(source))
    sd = canonical_clip_keys(raw, "text")
    if "text_projection.weight" not in sd:
        raise CheckpointMismatch(
            f"'{source}' has no text_projection",
            "A full CLIPModel checkpoint (text and vision towers) is needed as the base for zero-shot heads.",
        )
    config.projection_dim = sd["text_projection.weight"].shape[0]
    model = CLIPTextModelWithProjection(config)
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as err:  # size mismatches
        raise CheckpointMismatch(
            f"the text tower weights of '{source}' do not fit its config.json (tensor shapes differ)",
            "The weights and config.json come from different models; save or download them together.",
        ) from err
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise CheckpointMismatch(f"'{source}' does not fit a CLIP text tower: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if "logit_scale" in raw:
        logit_scale = float(raw["logit_scale"].float().exp())
    else:
        logit_scale = float(np.exp(data.get("logit_scale_init_value", np.log(100.0))))
    return model.to(dtype).eval(), logit_scale


def load_clip_tokenizer(source: str):
    """The CLIP tokenizer saved with the base model (folder or hub id)."""
    from transformers import AutoTokenizer, CLIPTokenizer

    folder = resolve_model_dir(source, allow_patterns=["*.json", "*.txt"])
    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception:
        try:
            return CLIPTokenizer.from_pretrained(str(folder))
        except Exception as err:
            raise SourceUnavailable(
                f"no usable CLIP tokenizer in '{source}' ({type(err).__name__})",
                "The base model's folder must hold its tokenizer files (vocab.json, merges.txt, tokenizer_config.json).",
            ) from err


# ---------------------------------------------------------------------------
# zero-shot heads


@torch.no_grad()
def zeroshot_class_embeddings(
    text_model: nn.Module,
    tokenizer: Any,
    classnames: Sequence[str],
    templates: Sequence[str],
    device: torch.device | str,
    batch_size: int = 256,
) -> torch.Tensor:
    """[C, D]: per class, the mean over templates of L2-normalised text embeddings, L2-normalised."""
    texts = [t.replace("{c}", c) for c in classnames for t in templates]
    max_len = getattr(text_model.config, "max_position_embeddings", 77)
    text_model = text_model.to(device)
    chunks = []
    for i in range(0, len(texts), batch_size):
        tok = tokenizer(texts[i:i + batch_size], padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        tok = {k: v.to(device) for k, v in tok.items() if k in ("input_ids", "attention_mask")}
        emb = text_model(**tok).text_embeds.float()
        chunks.append(torch.nn.functional.normalize(emb, dim=-1))
    emb = torch.cat(chunks).reshape(len(classnames), len(templates), -1).mean(1)
    return torch.nn.functional.normalize(emb, dim=-1).cpu()


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[-80:] or "model"


def _source_identity(source: str) -> str:
    """Hub id as is; a local folder by absolute path and its weight files' size/mtime."""
    path = Path(os.path.expanduser(str(source)))
    if not path.is_dir():
        return str(source)
    stats = sorted(
        (f.name, f.stat().st_size, int(f.stat().st_mtime))
        for f in path.iterdir()
        if f.suffix in (".safetensors", ".bin", ".json")
    )
    return json.dumps([str(path.resolve()), stats])


def default_cache_dir() -> Path:
    return cache_root() / "clip_heads"


# ---------------------------------------------------------------------------
# datasets


def _pre_download_hint(source: str, config: str | None, task: str) -> str:
    cfg = f", '{config}'" if config else ""
    return (
        f"To pre-download it, on a machine with hub access run "
        f"`python -c \"import datasets; datasets.load_dataset('{source}'{cfg})\"` (or "
        f"`hf download --repo-type dataset {source}`), copy $HF_HOME here and set HF_HOME to it "
        f"with HF_HUB_OFFLINE=1 (HF_DATASETS_OFFLINE=1); or save it with "
        f"`load_dataset(...).save_to_disk(DIR)` and pass backbone.taskpool.datasets.{task}=DIR."
    )


def load_task_split(source: str, split: str, config: str | None = None, task: str = "?"):
    """One split of a dataset: a local path, the prepared datasets cache, the hub snapshot
    in the hub cache or the hub (``featcal.io.datasets``)."""
    from featcal.io.datasets import load_dataset_split

    return load_dataset_split(str(source), split, config, where=f"task '{task}'", key=f"backbone.taskpool.datasets.{task}")


# ---------------------------------------------------------------------------
# the task pool


class CLIPVisionTaskPool(ClassificationTaskPool):
    """The CLIP image classification tasks, aligned with a CLIP backbone's experts.

    Args:
        tasks: task names (keys of ``clip_tasks.json``), in expert order.
        base: the base CLIP model (hub id or folder): text tower for the heads,
            tokenizer and image processor.
        datasets: optional per-task dataset source overriding the table's hub id
            (a hub id, a ``save_to_disk`` folder or a data folder).
        task_overrides: optional per-task dict merged into the table entry
            (``config``, ``train_split``, ``test_split``, ``image_column``,
            ``label_column``, ``classnames``, ``templates``).
        cache_dir: zero-shot head cache (default ``$FEATCAL_CACHE/clip_heads`` or
            ``~/.cache/featcal/clip_heads``).
        device: where the text tower runs to build heads (None/"auto": the best available).
        num_workers / pin_memory: DataLoader settings (pin_memory default: cuda available).
        text_batch_size: prompts per text-tower batch.
        max_test_examples: evaluate on the first k test examples only (smoke runs;
            None = the full test split, as in the paper).
    """

    model_source_keys = ("base",)

    @classmethod
    def dataset_sources(cls, node: Mapping[str, Any]) -> list[tuple[str, str | None, str]]:
        """(source, config, config key) of every task's data, as the pool will resolve them."""
        table = task_table(node.get("data_file"))
        given = node.get("datasets") or {}
        out = []
        for t in node.get("tasks") or []:
            if t not in table:
                continue
            spec = {**table[t], **dict((node.get("task_overrides") or {}).get(t) or {})}
            source = str(given.get(t) or spec["dataset"])
            out.append((source, spec.get("config"), f"backbone.taskpool.datasets.{t}"))
        return out

    def __init__(
        self,
        tasks: Sequence[str],
        base: str,
        datasets: Mapping[str, str] | None = None,
        task_overrides: Mapping[str, Mapping[str, Any]] | None = None,
        cache_dir: str | None = None,
        device: str | None = None,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        text_batch_size: int = 256,
        max_test_examples: int | None = None,
        data_file: str | None = None,
    ):
        table = task_table(data_file)
        unknown = [t for t in tasks if t not in table]
        if unknown:
            raise ConfigError(f"unknown CLIP tasks {unknown} (backbone.adapter.tasks); known: {sorted(table)}")
        self.task_names = list(tasks)
        self.base = str(base)
        self.specs: dict[str, dict] = {}
        for t in self.task_names:
            spec = dict(table[t])
            if task_overrides and t in task_overrides and task_overrides[t]:
                spec.update(dict(task_overrides[t]))
            if datasets and datasets.get(t):
                spec["dataset"] = str(datasets[t])
            self.specs[t] = spec
        self.cache_dir = Path(os.path.expanduser(str(cache_dir))) if cache_dir else default_cache_dir()
        if device is None or str(device) == "auto":
            from featcal.utils import resolve_device

            device = resolve_device("auto")
        self.device = torch.device(device)
        self.num_workers = int(num_workers)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
        self.text_batch_size = int(text_batch_size)
        self.max_test_examples = None if max_test_examples is None else int(max_test_examples)
        self._tasks: list[Task] | None = None
        self._splits: dict[tuple[str, str], Any] = {}
        self._preprocess: CLIPImagePreprocess | None = None
        self._heads: dict[str, ClassEmbeddingHead] = {}

    # ---- data -----------------------------------------------------------
    @property
    def preprocess(self) -> CLIPImagePreprocess:
        if self._preprocess is None:
            with loading("the base model's image processor, set by backbone.taskpool.base"):
                self._preprocess = CLIPImagePreprocess.from_pretrained(self.base)
        return self._preprocess

    def split_name(self, task: str, split: str) -> str:
        spec = self.specs[task]
        return {"train": spec.get("train_split", "train"), "test": spec.get("test_split", "test")}.get(split, split)

    def dataset(self, task: str, split: str):
        """The raw ``datasets.Dataset`` of ``task``'s ``split`` ('train', 'test' or a split name)."""
        name = self.split_name(task, split)
        key = (task, name)
        if key not in self._splits:
            spec = self.specs[task]
            ds = load_task_split(spec["dataset"], name, spec.get("config"), task)
            for col in (spec["image_column"], spec["label_column"]):
                if col not in ds.column_names:
                    raise ConfigError(
                        f"dataset '{spec['dataset']}' (task '{task}') has no column '{col}'; columns: {ds.column_names}",
                        f"Name the columns with +backbone.taskpool.task_overrides.{task}.image_column=... / label_column=...",
                    )
            feature = ds.features.get(spec["label_column"])
            n_classes = getattr(feature, "num_classes", None)
            if n_classes is not None and n_classes != len(spec["classnames"]):
                raise ConfigError(
                    f"task '{task}': dataset '{spec['dataset']}' has {n_classes} classes but {len(spec['classnames'])} class names",
                    f"Is backbone.taskpool.datasets.{task} the right dataset? Otherwise give its class names with "
                    f"+backbone.taskpool.task_overrides.{task}.classnames=[...]",
                )
            self._splits[key] = ds
        return self._splits[key]

    def _loader(self, ds, task: str, indices, batch_size: int, with_labels: bool):
        spec = self.specs[task]
        data = ImageLabelDataset(ds, spec["image_column"], spec["label_column"], indices)
        return torch.utils.data.DataLoader(
            data,
            batch_size=int(batch_size),
            shuffle=False,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            collate_fn=ImageCollate(self.preprocess, with_labels),
            persistent_workers=False,
        )

    def calibration_indices(self, task: str, n: int | str, seed: int, split: str = "train") -> list[int]:
        """Rows of ``split`` used for calibration: a seeded permutation, first n (n = "all":
        the whole split, as the original Surgery/ProbSurgery code uses the test split)."""
        size = len(self.dataset(task, split))
        return seeded_first_n(size, examples_per_task(n, size, task, split), seed)

    def calibration_batches(self, task: str, n: int | str, seed: int, batch_size: int, split: str = "train") -> Iterator[dict]:
        ds = self.dataset(task, split)
        idx = self.calibration_indices(task, n, seed, split)
        yield from self._loader(ds, task, idx, batch_size, with_labels=False)

    def test_batches(self, task: str, batch_size: int) -> Iterator[tuple[dict, torch.Tensor]]:
        ds = self.dataset(task, "test")
        idx = None
        if self.max_test_examples is not None and self.max_test_examples < len(ds):
            idx = list(range(self.max_test_examples))
        yield from self._loader(ds, task, idx, batch_size, with_labels=True)

    # ---- heads ----------------------------------------------------------
    def head_cache_file(self, task: str) -> Path:
        spec = self.specs[task]
        key = json.dumps([_source_identity(self.base), task, spec["classnames"], spec["templates"]])
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        return self.cache_dir / _slug(self.base) / f"{_slug(task)}-{digest}.pt"

    def build_heads(self) -> dict[str, ClassEmbeddingHead]:
        """Zero-shot heads for every task (from the disk cache when present)."""
        todo = []
        for t in self.task_names:
            if t in self._heads:
                continue
            if not self._load_cached_head(t):
                todo.append(t)
        if todo:
            self._build_heads(todo)
        return {t: self._heads[t] for t in self.task_names}

    def _load_cached_head(self, task: str) -> bool:
        f = self.head_cache_file(task)
        if not f.exists():
            return False
        try:
            blob = torch.load(str(f), map_location="cpu", weights_only=True)
            self._heads[task] = ClassEmbeddingHead(blob["class_embeddings"], float(blob["logit_scale"]))
        except Exception as err:  # a truncated or foreign file: rebuild it
            import warnings

            warnings.warn(f"zero-shot head cache {f} is unreadable ({type(err).__name__}); rebuilding it", RuntimeWarning, stacklevel=2)
            return False
        return True

    def _build_heads(self, todo: list[str]) -> None:
        """Zero-shot heads of ``todo`` through the base's text tower, written to the cache;
        concurrent runs (a sweep) build them once (a file lock per base model)."""
        from filelock import FileLock

        lock_dir = self.cache_dir / _slug(self.base)
        try:
            lock_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise CorruptCache(
                f"cannot create the zero-shot head cache folder {lock_dir} ({type(err).__name__})",
                "Set backbone.taskpool.cache_dir (or FEATCAL_CACHE) to a writable folder.",
            ) from err
        with FileLock(str(lock_dir / ".build.lock")):
            todo = [t for t in todo if not self._load_cached_head(t)]  # another process may have built some
            if not todo:
                return
            with loading("the base model's text tower and tokenizer (zero-shot heads), set by backbone.taskpool.base"):
                text_model, logit_scale = load_clip_text(self.base)
                tokenizer = load_clip_tokenizer(self.base)
            for t in todo:
                spec = self.specs[t]
                emb = zeroshot_class_embeddings(text_model, tokenizer, spec["classnames"], spec["templates"], self.device, self.text_batch_size)
                f = self.head_cache_file(t)
                tmp = f.with_suffix(f".tmp{os.getpid()}")
                try:
                    f.parent.mkdir(parents=True, exist_ok=True)
                    torch.save({"class_embeddings": emb, "logit_scale": logit_scale, "base": self.base, "task": t}, str(tmp))
                    os.replace(tmp, f)
                except OSError as err:
                    raise CorruptCache(
                        f"cannot write the zero-shot head cache {f} ({type(err).__name__})",
                        "Set backbone.taskpool.cache_dir (or FEATCAL_CACHE) to a writable folder.",
                    ) from err
                self._heads[t] = ClassEmbeddingHead(emb, logit_scale)
            del text_model

    # ---- TaskPool -------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self.task_names)

    @property
    def tasks(self) -> list[Task]:
        if self._tasks is None:
            heads = self.build_heads()
            out = []
            for t in self.task_names:
                out.append(
                    Task(
                        name=t,
                        head=heads[t],
                        calibration_batches=(lambda n, seed, bs, split="train", _t=t: self.calibration_batches(_t, n, seed, bs, split)),
                        test_batches=(lambda bs, _t=t: self.test_batches(_t, bs)),
                    )
                )
            self._tasks = out
        return self._tasks
