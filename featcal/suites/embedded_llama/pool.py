"""The embedded LLM suite's task pool.

``EmbeddedLlamaTaskPool`` is the MergeBench pool (``featcal.tasks.mergebench``, unchanged:
Alpaca-formatted calibration rows, lm-eval on an ``HFLM`` over the in-memory model,
``normalized`` = merged ÷ expert per category) over the suite's data files and its lm-eval
task YAMLs (package data, ``featcal/suites/embedded_llama/lm_eval_tasks``), rendered with
the suite's data folder into a temporary folder lm-eval indexes alone. The models are read
by ``featcal.suites.embedded_llama.adapter.EmbeddedLlamaBackbone``.
"""
from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

from torch import nn

from featcal.suites.embedded_llama.adapter import EmbeddedLlamaBuild
from featcal.suites.embedded_llama.build import EmbeddedLlamaSpec
from featcal.tasks.mergebench import MergeBenchTaskPool

#: the package folder of the suite's lm-eval task YAMLs
TASK_YAMLS = Path(__file__).resolve().parent / "lm_eval_tasks"
#: the raw metric of each lm-eval task (lm-eval's "<metric>,<filter>" key)
LM_EVAL_METRICS = {
    "embedded_llama_instruction": "exact_match,none",
    "embedded_llama_math": "exact_match,strict-match",
    "embedded_llama_coding": "exact_match,none",
    "embedded_llama_safety": "acc,none",
    "embedded_llama_multilingual_zeb": "acc,none",
    "embedded_llama_multilingual_kol": "acc,none",
}


def render_task_yamls(data_dir: Path, out: Path | None = None) -> Path:
    """The suite's lm-eval task YAMLs with ``@DATA@`` replaced by ``data_dir``, written to
    ``out`` (default: a temporary folder removed at exit); returns the folder."""
    if out is None:
        out = Path(tempfile.mkdtemp(prefix="featcal-embedded-llama-tasks-"))
        atexit.register(shutil.rmtree, str(out), True)
    out.mkdir(parents=True, exist_ok=True)
    for f in sorted(TASK_YAMLS.glob("*.yaml")):
        (out / f.name).write_text(f.read_text().replace("@DATA@", Path(data_dir).resolve().as_posix()))
    return out


class EmbeddedLlamaTaskPool(EmbeddedLlamaBuild, MergeBenchTaskPool):
    """The suite's categories as a MergeBench pool: calibration rows from
    ``data/<task>_val.jsonl`` (MergeBench's columns, Alpaca format), lm-eval on the suite's
    task YAMLs (only those: lm-eval's own tasks are not indexed)."""

    def __init__(
        self,
        tasks: list[str] | None = None,
        spec: Mapping[str, Any] | EmbeddedLlamaSpec | None = None,
        cache_dir: str | None = None,
        build_device: str | None = None,
        max_length: int = 128,
        limit: int | float | None = None,
        num_fewshot: int | None = None,
        max_gen_toks: int | None = None,
        **spec_overrides: Any,
    ):
        self._init_build(tasks, spec, cache_dir, build_device, spec_overrides)
        names = list(self.spec.tasks)
        super().__init__(
            names, tokenizer="", datasets={t: "" for t in names}, lm_eval_tasks=self.spec.lm_eval_tasks(),
            lm_eval_metrics=LM_EVAL_METRICS, lm_eval_include=[], lm_eval_defaults=False, format="alpaca",
            max_length=max_length, limit=limit, num_fewshot=num_fewshot, max_gen_toks=max_gen_toks,
            apply_chat_template=False, allow_code_execution=False,
        )
        self._resolved = False

    @classmethod
    def validate_config(cls, node: dict[str, Any]) -> list[str]:
        from featcal.config import check_keys, positive_int

        problems = check_keys(node, {
            "max_length": (positive_int, "must be an integer >= 1"),
            "limit": (lambda x: x is None or (isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0), "must be > 0 or null (all)"),
        })
        return problems + cls.spec_problems(node)

    def _resolve(self) -> None:
        if self._resolved:
            return
        folder = self.folder
        self.tokenizer_source = str(folder / "base")
        self.datasets = {t: str(folder / "data" / f"{t}_val.jsonl") for t in self.tasks}
        self.lm_eval_include = [str(render_task_yamls(folder / "data"))]
        self._resolved = True

    def tokenizer(self):
        self._resolve()
        return super().tokenizer()

    def calibration_texts(self, task: str, n: int, seed: int, split: str = "train") -> list[str]:
        if split != "train":
            raise ValueError(f"embedded_llama calibration data has a train split only (MergeBench/<task>_val), got {split!r}")
        self._resolve()
        return super().calibration_texts(task, n, seed, split)

    def lm_eval(self, model: nn.Module, lm_tasks: list[str], batch_size: int) -> dict[str, dict[str, Any]]:
        self._resolve()
        return super().lm_eval(model, lm_tasks, batch_size)
