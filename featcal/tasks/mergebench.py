"""MergeBench (He et al., NeurIPS 2025 D&B): five LLM task categories, calibration data
formatted as the experts were trained, evaluation with lm-evaluation-harness.

Tasks (categories) and their expert training data: instruction (Tulu-3 IF), math
(DART-Math), coding (Magicoder), safety (WildGuardMix), multilingual (Aya). The
calibration data is ``MergeBench/<task>_val`` (train split), shuffled with the run
seed, first n, **paired with the experts by task name** (the pool's ``tasks`` are the
backbone's tasks, and each task's data source is looked up by that name).

Format (source: MergeBench's ``merging/taskloader.py``, ``formatting_prompts_func`` with
TRL's ``SFTTrainer``): every expert was fine-tuned on the Alpaca-style prompt
``Below is an instruction ... ### Instruction: {instruction} [### Input: {input}]
### Response: {response}``, the lines after the first indented by eight spaces as in that
source, with per-dataset columns (instruction: instruction/input/output; math:
query/response; coding: instruction/response; safety: prompt/response; multilingual:
inputs/targets), tokenised with the tokenizer's defaults (BOS added) and truncated to
``max_length`` (MergeBench trained at 2048; default here 1024). ``format: chat`` uses the
tokenizer's chat template instead (user = instruction [+ input], assistant = response).

Evaluation: ``lm_eval.simple_evaluate`` on an ``HFLM`` that wraps the in-memory model
(no reload from disk; context length = the model's own), with the lm-eval task list of
each category from the yaml; a lazy (streamed) model is materialised once for all its
categories and freed before the next model (one full model alive at a time);
``limit`` caps the examples per lm-eval task (quick runs). Metrics per category:
every lm-eval task's raw metric (``<lm task>/<metric>``) and ``score``, their mean
(the primary metric); ``finalize`` adds ``normalized`` = score ÷ the expert's score
for every evaluated stage once the experts were evaluated.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Mapping

import torch
from torch import nn

from featcal.backbone.base import Inputs
from featcal.errors import ConfigError
from featcal.errors import SourceUnavailable
from featcal.tasks import code_exec
from featcal.tasks.budget import examples_per_task
from featcal.tasks.lm_harness import (
    check_lm_eval_resources, context_bounded_hflm, lm_eval_task_datasets, planned_lm_tasks, release_memory, task_manager,
)
from featcal.tasks.base import Metrics, TaskPool

log = logging.getLogger(__name__)

#: per-task columns of MergeBench/<task>_val (instruction, input, response)
DEFAULT_COLUMNS = {
    "instruction": {"instruction": "instruction", "input": "input", "response": "output"},
    "math": {"instruction": "query", "input": "input", "response": "response"},
    "coding": {"instruction": "instruction", "input": "input", "response": "response"},
    "safety": {"instruction": "prompt", "input": "input", "response": "response"},
    "multilingual": {"instruction": "inputs", "input": "input", "response": "targets"},
}

_INDENT = "\n" + " " * 8
_HEADER = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request."
)


def alpaca_text(instruction: str, response: str, input_text: str = "") -> str:
    """The prompt + response string MergeBench's experts were fine-tuned on."""
    lines = [_HEADER, "", "### Instruction:", instruction, ""]
    if input_text:
        lines += ["### Input:", input_text, ""]
    lines += ["### Response:", response, ""]
    return _INDENT.join(lines)


def load_rows(source: str, split: str, task: str):
    """A dataset split from a local path (save_to_disk folder, data file or folder, snapshot
    folder), the prepared datasets cache, the hub snapshot in the hub cache or the hub."""
    from featcal.io.datasets import load_dataset_split

    return load_dataset_split(str(source), split, None, where=f"task '{task}'", key=f"backbone.taskpool.datasets.{task}")


class MergeBenchTaskPool(TaskPool):
    """MergeBench categories for causal LMs (see the module docstring).

    Args:
        tasks: category names in expert order (the backbone's tasks).
        tokenizer: hub id or local folder of the tokenizer (the base's).
        datasets: task → calibration data source (hub id, saved folder or json file).
        lm_eval_tasks: task → list of lm-eval task names scored for that category.
        lm_eval_metrics: lm-eval task → metric key (e.g. ``exact_match,strict-match``);
            default: the first of acc_norm, acc, exact_match, pass@1, prompt_level_strict_acc
            that the task reports.
        lm_eval_include: extra folders of lm-eval task YAMLs (``TaskManager(include_path)``).
        lm_eval_defaults: index lm-eval's own tasks too (false: only ``lm_eval_include``,
            which skips indexing thousands of YAML files; local-task tests).
        columns: per-task overrides of the dataset columns (instruction/input/response).
        format: ``alpaca`` (MergeBench's training format) or ``chat``.
        max_length: truncation of calibration examples (tokens).
        limit: examples per lm-eval task (null: all).
        num_fewshot: passed to lm-eval (null: each task's default).
        max_gen_toks: generation cap for every generation task, passed as lm-eval's
            ``gen_kwargs`` (null: each task's own ``generation_kwargs``).
        apply_chat_template: lm-eval's option (MergeBench evaluates without it).
        allow_code_execution: run the code tasks (humaneval_plus / mbpp_plus execute
            model-written code) in featcal's fence (featcal/tasks/code_exec.py); false
            (default): they are skipped with a warning.
    """

    def __init__(
        self,
        tasks: list[str],
        tokenizer: str,
        datasets: Mapping[str, str],
        lm_eval_tasks: Mapping[str, list[str]],
        lm_eval_metrics: Mapping[str, str] | None = None,
        lm_eval_include: list[str] | None = None,
        lm_eval_defaults: bool = True,
        columns: Mapping[str, Mapping[str, str]] | None = None,
        format: str = "alpaca",
        max_length: int = 1024,
        limit: int | float | None = None,
        num_fewshot: int | None = None,
        max_gen_toks: int | None = None,
        apply_chat_template: bool = False,
        allow_code_execution: bool = False,
    ):
        self.tasks = list(tasks)
        missing = [t for t in self.tasks if t not in datasets]
        if missing:
            raise ValueError(f"no calibration data source for task(s) {missing}")
        self.tokenizer_source = str(tokenizer)
        self.datasets = {t: str(datasets[t]) for t in self.tasks}
        self.lm_eval_tasks = {t: list(lm_eval_tasks.get(t, [])) for t in self.tasks}
        self.lm_eval_metrics = dict(lm_eval_metrics or {})
        self.lm_eval_include = [str(p) for p in (lm_eval_include or [])]
        self.columns = {t: {**DEFAULT_COLUMNS.get(t, DEFAULT_COLUMNS["instruction"]), **dict((columns or {}).get(t, {}))} for t in self.tasks}
        if format not in ("alpaca", "chat"):
            raise ValueError(f"format must be alpaca or chat, got {format!r}")
        self.format = format
        self.max_length = int(max_length)
        self.limit = limit
        self.num_fewshot = num_fewshot
        self.max_gen_toks = max_gen_toks
        self.apply_chat_template = bool(apply_chat_template)
        self.allow_code_execution = bool(allow_code_execution)
        # code tasks: skipped unless allowed; when allowed, scored in featcal's fence (code_exec.gate)
        self.lm_eval_tasks, self.code_execution = code_exec.gate(self.lm_eval_tasks, self.allow_code_execution)
        self.lm_eval_defaults = bool(lm_eval_defaults)
        self._tokenizer = None
        self._task_manager = None

    model_source_keys = ("tokenizer",)

    @classmethod
    def dataset_sources(cls, node: Mapping[str, Any]) -> list[tuple[str, str | None, str]]:
        given = node.get("datasets") or {}
        return [(str(given[t]), None, f"backbone.taskpool.datasets.{t}") for t in node.get("tasks") or [] if given.get(t)]

    @classmethod
    def evaluation_dataset_sources(cls, node: Mapping[str, Any]) -> list[tuple[str, str | None, str]]:
        """The hub datasets of the lm-eval tasks the run evaluates (their task YAMLs)."""
        return lm_eval_task_datasets(node)[0]

    @classmethod
    def check_resources(cls, node: Mapping[str, Any]) -> None:
        """Before any model loads: every lm-eval task name is known to lm-eval, and the data
        files some tasks read at scoring time (ifeval: nltk's punkt_tab) are installed."""
        unknown = lm_eval_task_datasets(node)[1]
        if unknown:
            raise ConfigError(f"lm-eval does not know the task(s) {unknown}",
                              "Check the names against lm-eval's task list, or add the folder of your own task "
                              "YAMLs to backbone.taskpool.lm_eval_include.")
        check_lm_eval_resources([x for names in planned_lm_tasks(node).values() for x in names])

    @classmethod
    def validate_config(cls, node: dict) -> list[str]:
        from featcal.config import check_keys, positive_int

        problems = check_keys(node, {
            "max_length": (positive_int, "must be an integer >= 1"),
            "format": (lambda x: x in ("alpaca", "chat"), "allowed: alpaca, chat"),
            "limit": (lambda x: x is None or (isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0), "must be > 0 or null (all)"),
        })
        tasks = list(node.get("tasks") or [])
        for key in ("datasets", "lm_eval_tasks"):
            given = node.get(key) or {}
            missing = [t for t in tasks if t not in given]
            if missing:
                problems.append(f"{key}: no entry for task(s) {missing} (experts and data are paired by task name)")
        if not isinstance(node.get("allow_code_execution", False), bool):  # code tasks: featcal/tasks/code_exec.py
            problems.append("allow_code_execution: must be true or false (true: run model-written code, fenced)")
        return problems

    # ---- data ------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self.tasks)

    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            from featcal.io.hub import offline_hint, resolve_model_dir

            folder = resolve_model_dir(self.tokenizer_source, allow_patterns=["*.json", "*.model", "*.txt", "*.tiktoken", "*.jinja"])
            try:
                tok = AutoTokenizer.from_pretrained(str(folder))
            except Exception as err:
                raise SourceUnavailable(offline_hint("model", self.tokenizer_source) + f" (cause: {err})") from err
            if tok.pad_token is None:
                tok.pad_token = tok.eos_token
            self._tokenizer = tok
        return self._tokenizer

    def text(self, task: str, row: Mapping[str, Any]) -> str:
        """One training example of ``task`` as its expert saw it."""
        cols = self.columns[task]
        instruction = str(row.get(cols["instruction"], "") or "")
        input_text = str(row.get(cols["input"], "") or "") if cols.get("input") in row else ""
        response = str(row.get(cols["response"], "") or "")
        if self.format == "alpaca":
            return alpaca_text(instruction, response, input_text)
        user = instruction + ("\n\n" + input_text if input_text else "")
        return self.tokenizer().apply_chat_template(
            [{"role": "user", "content": user}, {"role": "assistant", "content": response}], tokenize=False
        )

    def calibration_texts(self, task: str, n: int | str, seed: int, split: str = "train") -> list[str]:
        ds = load_rows(self.datasets[task], split, task)
        rows = ds.shuffle(seed=seed).select(range(examples_per_task(n, len(ds), task, split)))
        return [self.text(task, row) for row in rows]

    def calibration_set(self, n: int | str, seed: int, batch_size: int, split: str = "train") -> list[list[Inputs]]:
        tok = self.tokenizer()
        out = []
        for task in self.tasks:
            texts = self.calibration_texts(task, n, seed, split)
            batches = []
            for i in range(0, len(texts), batch_size):
                enc = tok(texts[i : i + batch_size], truncation=True, max_length=self.max_length, padding=True, return_tensors="pt")
                batches.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
            out.append(batches)
        return out

    # ---- evaluation --------------------------------------------------------------
    def family_backbone(self):
        from featcal.backbone.llama import LlamaBackbone

        return LlamaBackbone([], base="", experts=[])

    def primary_metric(self, task: str) -> str:
        return "score"

    def _metric_of(self, lm_task: str, values: Mapping[str, Any]) -> tuple[str, float]:
        if lm_task in self.lm_eval_metrics:
            key = self.lm_eval_metrics[lm_task]
            if key not in values:
                raise KeyError(f"lm-eval task {lm_task} reports {sorted(values)}, not {key!r}")
            return key, float(values[key])
        for prefix in ("acc_norm,", "acc,", "exact_match,", "pass@1,", "pass_at_1,", "pass_at_k,", "prompt_level_strict_acc,"):
            for key, v in values.items():
                if key.startswith(prefix) and isinstance(v, (int, float)):
                    return key, float(v)
        raise KeyError(f"lm-eval task {lm_task}: no known metric among {sorted(values)}; set lm_eval_metrics.{lm_task}")

    def generation_kwargs(self) -> dict[str, Any] | None:
        """lm-eval's ``gen_kwargs`` for every generation task: ``max_gen_toks`` when the user
        set ``max_gen_toks`` (HFLM in lm-eval 0.4.x takes no such constructor argument; it
        reads it from the task's generation kwargs), else None (each task's own limit)."""
        return {"max_gen_toks": int(self.max_gen_toks)} if self.max_gen_toks else None

    def lm_eval(self, model: nn.Module, lm_tasks: list[str], batch_size: int) -> dict[str, dict[str, Any]]:
        """``lm_eval.simple_evaluate`` on an HFLM wrapping ``model`` (in memory).

        The context length is the model's own (HFLM reads it from the model config), never the
        calibration ``max_length``; generation limits are each task's, or ``max_gen_toks``."""
        import lm_eval

        check_lm_eval_resources(lm_tasks)
        lm = context_bounded_hflm()(pretrained=model, tokenizer=self.tokenizer(), batch_size=batch_size)
        if self._task_manager is None:  # indexing lm-eval's task YAMLs takes a while: once per process
            self._task_manager = task_manager(self.lm_eval_include, self.lm_eval_defaults,
                                              [x for names in self.lm_eval_tasks.values() for x in names])
        tm = self._task_manager
        from featcal.io.datasets import hub_cache_aware_load_dataset

        with hub_cache_aware_load_dataset():  # lm-eval's task datasets from `hf download` snapshots too
            res = self._simple_evaluate(lm_eval, lm, lm_tasks, tm)
        return res["results"]

    def _simple_evaluate(self, lm_eval, lm, lm_tasks, tm):
        return lm_eval.simple_evaluate(
            model=lm,
            tasks=list(lm_tasks),
            task_manager=tm,
            limit=self.limit,
            num_fewshot=self.num_fewshot,
            apply_chat_template=self.apply_chat_template,
            confirm_run_unsafe_code=self.allow_code_execution,
            gen_kwargs=self.generation_kwargs(),
            log_samples=False,
            bootstrap_iters=0,
        )

    @torch.no_grad()
    def evaluate(
        self,
        model_for_task: Callable[[int], nn.Module],
        device: torch.device | str,
        batch_size: int = 8,
        only: list[int] | None = None,
        desc: str = "",
    ) -> Metrics:
        """Every category's lm-eval tasks, one lm-eval run per distinct model.

        A lazy (on-disk) model is materialised once for all the categories it serves and freed
        (host and device) before the next one is: at most one full model is alive at a time.
        Whether a model is on disk, and loading it, is the model adapter's (``backbone()``)."""
        storage = self.backbone()

        todo_tasks = [(i, t) for i, t in enumerate(self.tasks) if (only is None or i in only) and self.lm_eval_tasks[t]]
        sources = {i: model_for_task(i) for i, _ in todo_tasks}
        order: list[int] = []  # distinct models, in first-use order
        for i, _ in todo_tasks:
            if all(sources[i] is not sources[j] for j in order):
                order.append(i)
        results: dict[int, dict] = {}  # first task index of a model -> lm-eval results
        for first in order:
            src = sources[first]
            mine = [(i, t) for i, t in todo_tasks if sources[i] is src]
            lm_tasks = list(dict.fromkeys(lt for _, t in mine for lt in self.lm_eval_tasks[t]))
            on_disk = storage.is_on_disk(src)
            model = storage.materialize(src).to(device) if on_disk else src
            try:
                log.info("lm-eval %s %s: %s", desc, [t for _, t in mine], lm_tasks)
                results[first] = self.lm_eval(model, lm_tasks, batch_size)
            finally:
                if on_disk:
                    model.to("meta")  # frees the weights' storage even if lm-eval kept a reference
                    del model
                    release_memory(device)
        out: Metrics = {}
        for i, task in todo_tasks:
            first = next(f for f in order if sources[f] is sources[i])
            values: dict[str, float] = {}
            for lm_task in self.lm_eval_tasks[task]:
                name, v = self._metric_of(lm_task, results[first][lm_task])
                values[f"{lm_task}/{name.split(',')[0]}"] = 100.0 * v
            values["score"] = sum(values.values()) / len(values)
            out[task] = values
        return out

    def finalize(self, metrics: dict[str, Metrics]) -> dict[str, Metrics]:
        """Adds ``normalized`` (stage score ÷ expert score, per category) to every stage
        once the experts were evaluated (MergeBench's normalised performance)."""
        experts = metrics.get("experts") or {}
        for stage, per_task in metrics.items():
            for task, values in per_task.items():
                ref = (experts.get(task) or {}).get("score")
                if ref:
                    values["normalized"] = values["score"] / ref
        return metrics
