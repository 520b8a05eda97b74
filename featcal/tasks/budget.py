"""The calibration budget: one resolution for every task pool and for config validation.

The ``budget`` config node::

    budget:
      per_task: 64      # calibration examples per task: an integer >= 1, or "all" (the whole split)
      split: train      # the split they are drawn from: train, or test (Surgery's transductive protocol)
      batch_size: 16    # calibration batch size

``examples_per_task`` turns ``per_task`` and a task's split size into the number of
examples that task draws (or raises one ``BudgetTooLarge`` / ``ConfigError`` naming the key
and the split size); ``config_problems`` checks the same node against the split sizes a
backbone config declares (``backbone.train_sizes`` / ``backbone.test_sizes``), before
anything loads, with the same words. Every pool family (CLIP, GLUE/text-to-text, MergeBench,
the embedded suites) asks ``examples_per_task``; which examples it draws (its seeded
shuffle, first n) stays the pool's, see ``seeded_first_n``.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from featcal.errors import BudgetTooLarge, ConfigError

#: ``budget.per_task`` value meaning "every example of the split" (Surgery's transductive
#: protocol: ``budget.split=test budget.per_task=all``)
ALL = "all"
#: the splits calibration examples can come from (``budget.split``)
SPLITS = ("train", "test")

_FORM = "must be a positive integer (calibration examples per task, e.g. 8 ... 256) or 'all'"


def _is_count(n: Any) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n >= 1


def per_task_problem(n: Any) -> str | None:
    """What is wrong with ``budget.per_task=n`` on its own (None: an integer >= 1 or 'all')."""
    if n == ALL or _is_count(n):
        return None
    return _FORM


def over_budget(n: int, size: int, task: str, split: str) -> tuple[str, str]:
    """(reason, fix) when ``n`` examples are asked of a split of ``size``: the one wording
    of a budget that does not fit, for the pools and for config validation."""
    return (
        f"task '{task}': calibration budget {n} (budget.per_task) exceeds the {size} examples of split '{split}'",
        f"Use budget.per_task={size} or less, budget.per_task=all, or another budget.split.",
    )


def examples_per_task(n: int | str | None, size: int, task: str, split: str = "train") -> int:
    """How many calibration examples ``task`` draws from its ``split`` of ``size`` examples:
    ``n``, or all of them for ``"all"`` (None: also all). Raises ``ConfigError`` for a value
    that is no count and ``BudgetTooLarge`` (a ``ConfigError``) when ``n`` exceeds ``size``."""
    if n is None or n == ALL:
        return int(size)
    if isinstance(n, str) and n.strip().isdigit():
        n = int(n)
    if not _is_count(n):
        raise ConfigError(f"task '{task}': budget.per_task={n!r} {_FORM}")
    if n > size:
        raise BudgetTooLarge(*over_budget(n, int(size), task, split))
    return int(n)


def seeded_first_n(size: int, n: int, seed: int) -> list[int]:
    """The rows a pool calibrates on: a permutation of ``range(size)`` seeded with the run
    seed (numpy's default generator), first ``n`` (the CLIP and text-to-text pools)."""
    return np.random.default_rng(int(seed)).permutation(int(size))[: int(n)].tolist()


def config_problems(budget: Mapping[str, Any], tasks: list[str], sizes_of: Any) -> list[str]:
    """Problems with a ``budget`` node (``key=value: what is allowed``), before anything loads.

    ``sizes_of(split)`` gives the declared ``{task: examples}`` of a split (None: the backbone
    declares none; the pool checks at load time). A numeric budget is checked against the
    smallest split of ``tasks``, with the words of ``over_budget``."""
    problems: list[str] = []

    def bad(key: str, value: Any, allowed: str) -> None:
        problems.append(f"{key}={value!r}: {allowed}")

    bs = budget.get("batch_size")
    if not _is_count(bs):
        bad("budget.batch_size", bs, "must be a positive integer (calibration batch size)")
    n, split = budget.get("per_task"), budget.get("split", "train")
    if split not in SPLITS:
        bad("budget.split", split, f"allowed: {', '.join(SPLITS)}")
    form = per_task_problem(n)
    if form is not None:
        bad("budget.per_task", n, form)
    if form is not None or n == ALL or split not in SPLITS or not tasks:
        return problems  # "all": the whole split of every task always fits
    sizes = sizes_of(split)
    if sizes is None:
        return problems
    missing = [t for t in tasks if t not in sizes]
    if missing:
        bad(f"backbone.{split}_sizes", sorted(sizes), f"has no size for tasks {missing}")
        return problems
    smallest = min(tasks, key=lambda t: sizes[t])
    if n > sizes[smallest]:
        reason, fix = over_budget(n, sizes[smallest], smallest, split)
        bad("budget.per_task", n, f"{reason} (backbone.{split}_sizes.{smallest}). {fix}")
    return problems
