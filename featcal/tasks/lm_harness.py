"""lm-evaluation-harness plumbing of the MergeBench pools: an ``HFLM`` whose generation limit
stays inside the model's context, the nltk data some tasks read at scoring time, one task
index per process (only the folders of the tasks a run names), and the datasets a run's
lm-eval tasks read (for prefetching)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

import torch

from featcal.errors import SourceUnavailable
from featcal.tasks import code_exec

log = logging.getLogger("featcal.tasks.mergebench")


_BOUNDED_HFLM = None


def context_bounded_hflm():
    """HFLM whose generation limit never reaches the model's context length: a task asking
    for more (ifeval's 1280 tokens on a short-context model) gets half the context, with a
    warning, instead of lm-eval's assertion."""
    global _BOUNDED_HFLM
    if _BOUNDED_HFLM is None:
        from lm_eval.models.huggingface import HFLM

        class ContextBoundedHFLM(HFLM):
            def generate_until(self, requests, disable_tqdm: bool = False):
                warned = set()
                for req in requests:
                    kwargs = req.args[1] if len(req.args) > 1 and isinstance(req.args[1], dict) else None
                    if kwargs is None:
                        continue
                    want = int(kwargs.get("max_gen_toks", self.max_gen_toks))
                    if want >= self.max_length:
                        kwargs["max_gen_toks"] = self.max_length // 2
                        name = getattr(req, "task_name", "?")
                        if name not in warned:
                            warned.add(name)
                            log.warning("lm-eval task %s asks for %d new tokens, the model's context is %d: generating %d",
                                        name, want, self.max_length, self.max_length // 2)
                return super().generate_until(requests, disable_tqdm)

        _BOUNDED_HFLM = ContextBoundedHFLM
    return _BOUNDED_HFLM


def release_memory(device: torch.device | str) -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available() and torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


#: lm-eval tasks that read nltk data at scoring time, and the resources they need
NLTK_RESOURCES = {"ifeval": ["tokenizers/punkt_tab"]}


def check_lm_eval_resources(lm_tasks: list[str]) -> None:
    """Fail before evaluating when a task's nltk data is missing (it cannot be fetched offline)."""
    needed = sorted({r for t in lm_tasks for r in NLTK_RESOURCES.get(t, [])})
    if not needed:
        return
    try:
        import nltk
    except ImportError as err:
        raise SourceUnavailable(f"lm-eval tasks {sorted(set(lm_tasks) & set(NLTK_RESOURCES))} need nltk, which is not installed",
                                "pip install -e '.[llm]'") from err
    missing = []
    for r in needed:
        try:
            nltk.data.find(r)
        except LookupError:
            missing.append(r)
    if missing:
        names = " ".join(m.rsplit("/", 1)[-1] for m in missing)
        raise SourceUnavailable(
            f"lm-eval task ifeval needs the nltk data {missing}, not found in nltk's data path ({', '.join(nltk.data.path[:3])}, ...)",
            f"On a machine with internet run `python -m nltk.downloader {names}` (it writes ~/nltk_data), copy that "
            "folder here (or point NLTK_DATA at it); or drop ifeval from backbone.taskpool.lm_eval_tasks.instruction")


_TASK_MANAGERS: dict[tuple, Any] = {}


def _task_yaml_folders(names: set[str], roots: list[Path]) -> list[Path] | None:
    """The folders under ``roots`` whose YAML files define the tasks ``names`` (a top-level
    ``task: <name>`` line), or None when some name is not found that way (a group, a tag,
    a Python task): then only the full index knows it."""
    found: dict[str, list[Path]] = {}
    for root in roots:
        for yml in sorted(Path(root).rglob("*.yaml")):
            try:
                text = yml.read_text(encoding="utf-8", errors="ignore")
            except OSError:
                continue
            if "task:" not in text:
                continue
            for line in text.splitlines():
                if line.startswith("task:"):
                    name = line[5:].split("#", 1)[0].strip().strip("'\"")
                    if name in names and yml.parent not in found.setdefault(name, []):
                        found[name].append(yml.parent)
    if set(found) != set(names):
        return None
    return list(dict.fromkeys(f for folders in found.values() for f in folders))


def task_manager(include: list[str] | tuple[str, ...] = (), defaults: bool = True, names: list[str] | None = None):
    """lm-eval's ``TaskManager`` over ``include`` (+ lm-eval's own tasks when ``defaults``),
    built once per process. Indexing all of lm-eval's ~14k task YAMLs costs ~20 s of CPU:
    given the task ``names`` a run needs, only the folders defining them are indexed (~1 s;
    includes and ``!function`` files resolve relative to each YAML as usual), falling back
    to the full index when a name is not a plain YAML task (groups, tags)."""
    include = tuple(str(p) for p in include)
    wanted = frozenset(names or ())
    key = (include, bool(defaults), wanted)
    if key not in _TASK_MANAGERS:
        from lm_eval.tasks import TaskManager

        tm = None
        if defaults and wanted:
            import lm_eval.tasks

            folders = _task_yaml_folders(set(wanted), [Path(lm_eval.tasks.__file__).parent, *map(Path, include)])
            if folders is not None:
                tm = TaskManager(include_path=[*map(str, folders), *include], include_defaults=False)
                if not wanted <= set(tm.task_index):
                    tm = None
        if tm is None:
            tm = TaskManager(include_path=list(include) or None, include_defaults=bool(defaults))
        _TASK_MANAGERS[key] = tm
    return _TASK_MANAGERS[key]


def planned_lm_tasks(node: Mapping[str, Any]) -> dict[str, list[str]]:
    """{category: lm-eval tasks this pool config will run} (code tasks only when allowed)."""
    tasks = list(node.get("tasks") or [])
    given = node.get("lm_eval_tasks") or {}
    allowed = node.get("allow_code_execution", False) is True
    return {t: [str(x) for x in (given.get(t) or []) if allowed or not code_exec.is_code_task(x)] for t in tasks}


def lm_eval_task_datasets(node: Mapping[str, Any]) -> tuple[list[tuple[str, str | None, str]], list[str]]:
    """([(hub dataset, config, config key)], [unknown task lines]) of the lm-eval tasks that
    a pool config will run, read from lm-eval's task YAMLs (``dataset_path`` /
    ``dataset_name``); tasks reading packaged builders (json, csv, ...) or local data files
    are left out (nothing to download), as are groups and tags."""
    planned = planned_lm_tasks(node)
    if not any(planned.values()):
        return [], []
    try:
        tm = task_manager(node.get("lm_eval_include") or [], node.get("lm_eval_defaults", True) is not False,
                          [x for names in planned.values() for x in names])
    except ImportError:
        return [], []
    out, unknown = [], []
    for cat, names in planned.items():
        for name in names:
            entry = tm.task_index.get(name)
            if entry is None:
                unknown.append(f"{name} (backbone.taskpool.lm_eval_tasks.{cat})")
                continue
            cfg = entry.cfg or {}
            path, kwargs = cfg.get("dataset_path"), cfg.get("dataset_kwargs") or {}
            if not isinstance(path, str) or path.count("/") != 1 or kwargs.get("data_files") or kwargs.get("data_dir"):
                continue
            config = cfg.get("dataset_name")
            out.append((path, str(config) if config is not None else None, f"backbone.taskpool.lm_eval_tasks.{cat} ({name})"))
    return out, unknown
