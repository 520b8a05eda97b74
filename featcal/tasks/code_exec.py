"""pass@k code tasks (lm-eval's humaneval / mbpp family) scored inside featcal's fence.

lm-eval's code tasks score through Hugging Face ``evaluate.load("code_eval")``, which
needs the hub (it fails offline) and runs the programs in the evaluating process's
environment. :func:`fenced_code_eval` replaces only that ``evaluate.load("code_eval")``
call (for the process, :func:`install`, done by the task pool through :func:`gate`) by
:class:`FencedCodeEval`: the same
``compute(references, predictions, k)`` interface, each program run by
:func:`featcal.sandbox.run_program` (child process, CPU/memory/wall limits, own
temporary folder, whitelisted environment, no network where the OS allows), and pass@k
computed with the unbiased estimator of Chen et al. (2021), :func:`pass_at_k`.

Model-written code runs only with ``backbone.taskpool.allow_code_execution=true``;
otherwise :func:`runnable` drops the code tasks with one warning, and a code task that
reaches the scorer anyway is refused.
"""
from __future__ import annotations

import contextlib
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator, Sequence

import numpy as np

from featcal import sandbox
from featcal.errors import ConfigError

log = logging.getLogger(__name__)

#: lm-eval task name prefixes whose scoring executes model-written code.
CODE_TASK_PREFIXES = ("humaneval", "mbpp")


def is_code_task(name: str) -> bool:
    return str(name).startswith(CODE_TASK_PREFIXES)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` pass: 1 - C(n-c, k) / C(n, k),
    as a product (no huge binomials)."""
    if not 0 <= c <= n or k < 1 or k > n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


class FencedCodeEval:
    """Drop-in for ``evaluate.load("code_eval")``: ``compute(references, predictions, k)``
    returns ``({"pass@k": mean over problems}, per-problem outcomes)``; program =
    candidate + newline + reference (the test code), as code_eval builds it."""

    def __init__(self, limits: sandbox.Limits = sandbox.Limits(), workers: int = 2, allowed: bool = True):
        self.limits, self.workers, self.allowed = limits, max(1, int(workers)), bool(allowed)
        self.programs_run = 0

    def compute(self, references: Sequence[str], predictions: Sequence[Sequence[str]], k: Sequence[int] | int = (1,),
                num_workers: int | None = None, timeout: float | None = None) -> tuple[dict[str, float], dict[int, list]]:
        if not self.allowed:
            raise ConfigError(
                "an lm-eval code task would execute model-written code, but backbone.taskpool.allow_code_execution is false",
                "Set backbone.taskpool.allow_code_execution=true to run it (in featcal's fence), or drop the task.",
            )
        ks = [k] if isinstance(k, int) else list(k)
        if len(references) != len(predictions):
            raise ValueError("code_eval: one reference (test code) per problem")
        jobs = [(i, cand + "\n" + ref) for i, (ref, cands) in enumerate(zip(references, predictions)) for cand in cands]
        with ThreadPoolExecutor(max_workers=num_workers or self.workers) as pool:
            outcomes = list(pool.map(lambda job: sandbox.run_program(job[1], self.limits), jobs))
        self.programs_run += len(jobs)
        per: dict[int, list] = {i: [] for i in range(len(references))}
        for (i, _), out in zip(jobs, outcomes):
            per[i].append(out)
        scores: dict[str, float] = {}
        for kk in ks:
            vals = [pass_at_k(len(o), sum(x.status == "passed" for x in o), kk) for o in per.values() if len(o) >= kk]
            if vals:
                scores[f"pass@{kk}"] = float(np.mean(vals))
        return scores, per


def runnable(lm_tasks: Sequence[str], allowed: bool, where: str = "backbone.taskpool.lm_eval_tasks") -> list[str]:
    """``lm_tasks`` without the code tasks unless ``allowed`` (one warning naming them)."""
    if allowed:
        return list(lm_tasks)
    skipped = [t for t in lm_tasks if is_code_task(t)]
    if skipped:
        log.warning(
            "featcal: skipping %s from %s: they execute model-written code; set "
            "backbone.taskpool.allow_code_execution=true to run them in featcal's fence (see README, Security)",
            skipped, where,
        )
    return [t for t in lm_tasks if not is_code_task(t)]


def fence_statement(allowed: bool, limits: sandbox.Limits = sandbox.Limits()) -> dict[str, Any]:
    """What results.json and the log say about model-written code."""
    if not allowed:
        return {"allowed": False, "note": "code tasks skipped (backbone.taskpool.allow_code_execution=false)"}
    return {"allowed": True, "fence": sandbox.describe(limits)}


_installed: dict[str, Any] = {}


def install(allowed: bool, limits: sandbox.Limits = sandbox.Limits(), workers: int = 2) -> FencedCodeEval | None:
    """For the rest of the process, ``evaluate.load("code_eval")`` (what lm-eval's humaneval /
    mbpp task files call when lm-eval loads them) returns a :class:`FencedCodeEval`
    (refusing to run anything unless ``allowed``); any other ``evaluate.load`` is unchanged.
    The last call's setting applies. None when ``evaluate`` is not installed."""
    try:
        import evaluate
    except ImportError:  # lm-eval without evaluate: its code tasks cannot load either
        return None
    scorer = FencedCodeEval(limits, workers, allowed)
    _installed["scorer"] = scorer
    if not getattr(evaluate.load, "_featcal_fence", False):
        original = evaluate.load

        def load(path: str, *args: Any, **kwargs: Any) -> Any:
            if str(path).rstrip("/").split("/")[-1] == "code_eval":
                return _installed["scorer"]
            return original(path, *args, **kwargs)

        load._featcal_fence = True  # type: ignore[attr-defined]
        evaluate.load = load
    return scorer


@contextlib.contextmanager
def fenced_code_eval(allowed: bool, limits: sandbox.Limits = sandbox.Limits(), workers: int = 2) -> Iterator[FencedCodeEval]:
    """While active, ``evaluate.load("code_eval")`` returns a :class:`FencedCodeEval` (tests and scripts;
    the task pool uses :func:`install` through :func:`gate`)."""
    scorer = FencedCodeEval(limits, workers, allowed)
    try:
        import evaluate
    except ImportError:  # lm-eval without evaluate: its code tasks cannot load either
        yield scorer
        return
    original = evaluate.load

    def load(path: str, *args: Any, **kwargs: Any) -> Any:
        if str(path).rstrip("/").split("/")[-1] == "code_eval":
            return scorer
        return original(path, *args, **kwargs)

    evaluate.load = load
    if allowed:
        log.info("featcal: model-written code runs fenced: %s", sandbox.describe(limits))
    try:
        yield scorer
    finally:
        evaluate.load = original


def gate(lm_eval_tasks: dict[str, list[str]], allowed: bool) -> tuple[dict[str, list[str]], dict[str, Any]]:
    """The task pool's hook: ``(lm_eval_tasks without code tasks unless allowed, statement)``;
    logs the opt-in and the fence (or the skip) once."""
    code = [t for ts in lm_eval_tasks.values() for t in ts if is_code_task(t)]
    statement = {**fence_statement(allowed), "code_tasks": code}
    if code and allowed:
        log.warning("featcal: allow_code_execution=true: %s execute model-written code, fenced: %s", code, statement["fence"])
    kept = {cat: runnable(ts, allowed, f"backbone.taskpool.lm_eval_tasks.{cat}") for cat, ts in lm_eval_tasks.items()}
    if code and not allowed:  # what was skipped, per category; categories left with no task are not scored
        statement["skipped"] = {cat: [t for t in ts if is_code_task(t)] for cat, ts in lm_eval_tasks.items() if any(map(is_code_task, ts))}
        statement["categories_not_scored"] = [cat for cat, ts in lm_eval_tasks.items() if ts and not kept[cat]]
        if statement["categories_not_scored"]:
            log.warning("featcal: categories %s have no lm-eval task left and get no score in this run",
                        statement["categories_not_scored"])
    install(allowed)
    return kept, statement
