"""GLUE as text-to-text tasks for the FLAN-T5 experts (FusionBench's protocol).

* Data: ``nyu-mll/glue`` with the task as config name, resolved by
  ``featcal.io.datasets`` (a local ``save_to_disk`` folder of one task's DatasetDict, a
  folder holding one such folder per task, a data/snapshot folder with README configs,
  the prepared datasets cache, the hub snapshot in the hub cache, then the hub).
  Test = ``validation`` (MNLI: ``validation_matched``); calibration = unlabeled inputs
  from ``train``, shuffled with the run seed, first n per task.
* Prompts and label words: ``featcal/tasks/data/glue_templates.json``, FusionBench's
  strings exactly as the experts were fine-tuned on them (typos included).
* Scoring: greedy generation of at most 10 new tokens, decoded with special tokens
  skipped; classification = exact match with the label word (accuracy, %); STS-B =
  the answer parsed as a float (0.0 when it does not parse), Spearman ×100 against the
  gold scores (target string ``"{:.1f}"`` of the score). ``stsb_gold: text`` takes the
  gold scores parsed back from that ``"{:.1f}"`` text (rounded to 0.1), as FusionBench
  scores STS-B; the default ``raw`` uses the dataset's scores as they are.
"""
from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

from featcal.errors import SourceUnavailable
from featcal.tasks.text2text import TextToTextTaskPool

TEMPLATES_FILE = Path(__file__).resolve().parent / "data" / "glue_templates.json"
GLUE_HUB_ID = "nyu-mll/glue"
STSB_GOLD = ("raw", "text")


@lru_cache(maxsize=None)
def _read_templates(path: str) -> dict:
    return json.loads(Path(path).read_text())["tasks"]


def glue_templates(path: str | os.PathLike | None = None) -> dict[str, dict]:
    """{task: {template, fields, label_words | target_format, metric, config, test_split, train_split}}."""
    return {k: dict(v) for k, v in _read_templates(str(path or TEMPLATES_FILE)).items()}


class GLUETaskPool(TextToTextTaskPool):
    """The eight GLUE tasks of the FLAN-T5 experts (see the module docstring).

    Args:
        tasks: task names (keys of the template file: cola, mnli, mrpc, qnli, qqp, rte,
            sst2, stsb), ordered like the backbone's experts.
        tokenizer: tokenizer source (the base model's hub id or folder).
        datasets: where the data comes from: one source for every task (a hub id, used
            with the task's config name, or a folder) or a mapping task → source.
        templates: path of the template file (null: the packaged one).
        check_sources: open every task's test split on construction, so that a missing
            dataset fails at once (the run builds the pool before loading any model).
        (other arguments: see ``TextToTextTaskPool``.)
    """

    def __init__(
        self,
        tasks: list[str],
        tokenizer: Any,
        datasets: str | Mapping[str, str] = GLUE_HUB_ID,
        templates: str | None = None,
        check_sources: bool = True,
        stsb_gold: str = "raw",
        **kwargs: Any,
    ):
        if stsb_gold not in STSB_GOLD:
            raise ValueError(f"stsb_gold must be one of {', '.join(STSB_GOLD)}, got {stsb_gold!r}")
        self.stsb_gold = stsb_gold
        super().__init__(tasks, tokenizer, **kwargs)
        self.templates = glue_templates(templates)
        unknown = [t for t in self.names if t not in self.templates]
        if unknown:
            raise ValueError(f"unknown GLUE tasks {unknown}; known: {sorted(self.templates)}")
        if isinstance(datasets, Mapping):
            missing = [t for t in self.names if t not in datasets]
            if missing:
                raise ValueError(f"no dataset source for tasks {missing}")
            self.sources = {t: str(datasets[t]) for t in self.names}
        else:
            self.sources = {t: str(datasets) for t in self.names}
        self._per_task_sources = isinstance(datasets, Mapping)
        self._raw: dict[tuple[str, str], Any] = {}
        if check_sources:  # a missing dataset fails now, before any model is loaded
            for t in self.names:
                self.load_split(t, "test")

    model_source_keys = ("tokenizer",)

    @classmethod
    def dataset_sources(cls, node: Mapping[str, Any]) -> list[tuple[str, str | None, str]]:
        """(source, config, config key) of every task's data, as the pool will resolve them."""
        try:
            known = glue_templates(node.get("templates"))
        except Exception:  # noqa: BLE001 - validation reports a bad template file
            return []
        given = node.get("datasets", GLUE_HUB_ID)
        out = []
        for t in node.get("tasks") or []:
            if t not in known:
                continue
            if isinstance(given, Mapping):
                if t in given:
                    out.append((str(given[t]), known[t].get("config", t), f"backbone.taskpool.datasets.{t}"))
            else:
                out.append((str(given), known[t].get("config", t), "backbone.taskpool.datasets"))
        return out

    @classmethod
    def validate_config(cls, node: dict[str, Any]) -> list[str]:
        problems = super().validate_config(node)
        if node.get("stsb_gold", "raw") not in STSB_GOLD:
            problems.append(f"stsb_gold={node.get('stsb_gold')!r}: allowed: raw (the dataset's scores), "
                            "text (parsed from the \"{{:.1f}}\" target text, FusionBench)")
        try:
            known = glue_templates(node.get("templates"))
        except Exception as err:  # noqa: BLE001 - a bad template file is a config problem
            return problems + [f"templates={node.get('templates')!r}: cannot be read ({type(err).__name__}: {err})"]
        tasks = list(node.get("tasks") or [])
        unknown = [t for t in tasks if t not in known]
        if unknown:
            problems.append(f"tasks={tasks!r}: unknown GLUE tasks {unknown}; allowed: {', '.join(known)}")
        return problems

    # ---- data ---------------------------------------------------------------
    def split_name(self, task: str, split: str) -> str:
        info = self.templates[task]
        return info["test_split"] if split == "test" else info.get("train_split", "train") if split == "train" else split

    def load_split(self, task: str, split: str):
        key = (task, split)
        if key in self._raw:
            return self._raw[key]
        from featcal.io.datasets import load_dataset_split

        source, name = self.sources[task], self.split_name(task, split)
        config = self.templates[task].get("config", task)
        key_name = "backbone.taskpool.datasets" + (f".{task}" if self._per_task_sources else "")
        ds = load_dataset_split(source, name, config, where=f"task '{task}'", key=key_name)
        fields = self.templates[task]["fields"] + ["label"]
        missing = [f for f in fields if f not in ds.column_names]
        if missing:
            raise SourceUnavailable(f"dataset for task '{task}' lacks columns {missing} (has {ds.column_names})")
        self._raw[key] = ds
        return ds

    def source_identity(self, task: str, split: str) -> Any:
        from featcal.io.datasets import dataset_location

        source = self.sources[task]
        loc = dataset_location(source, self.templates[task].get("config", task))
        folder = loc.path if loc.kind in ("saved", "folder", "file") else None
        if folder is None:
            return [GLUE_HUB_ID if source == GLUE_HUB_ID else source, self.templates[task].get("config", task), self.split_name(task, split)]
        files = [folder] if folder.is_file() else [f for f in folder.rglob("*") if f.is_file() and ".cache" not in f.parts]
        stamp = sorted((f.name, f.stat().st_size, int(f.stat().st_mtime)) for f in files)
        return [str(folder.resolve()), self.split_name(task, split), stamp]

    def render_identity(self, task: str) -> Any:
        if self.stsb_gold != "raw" and self.metric_of(task) == "spearman":  # the cached golds differ
            return {**self.templates[task], "stsb_gold": self.stsb_gold}
        return self.templates[task]

    # ---- strings ------------------------------------------------------------
    def render_input(self, task: str, row: dict) -> str:
        info = self.templates[task]
        return info["template"].format(**{f: row[f] for f in info["fields"]})

    def render_target(self, task: str, row: dict) -> str:
        info = self.templates[task]
        if "label_words" in info:
            label = int(row["label"])
            if not 0 <= label < len(info["label_words"]):
                raise ValueError(f"task '{task}': label {label} has no label word (unlabeled test rows use -1)")
            return info["label_words"][label]
        return info.get("target_format", "{}").format(float(row["label"]))

    def gold_value(self, task: str, row: dict) -> Any:
        if self.metric_of(task) == "spearman":
            if self.stsb_gold == "text":  # FusionBench: the gold parsed from its "{:.1f}" target text
                return float(self.render_target(task, row))
            return float(row["label"])
        return self.render_target(task, row)

    def metric_of(self, task: str) -> str:
        return self.templates[task].get("metric", "accuracy")
