"""Strict configs: a key the run does not know is an error, never a silent default.

Hydra rejects ``budget.per_tsk=8`` (the key does not exist) but suggests appending it
with ``+budget.per_tsk=8``, which it then accepts: the run would go on with the default
budget. Here:

* :func:`unknown_key_problems` (called by ``featcal.config.validate``) reports

  - every key of a node with a ``_target_`` that its target does not take (the class's
    ``__init__`` chain or the function's parameters; a target taking ``**kwargs`` all the
    way up takes anything), wherever the key came from (a config file, ``+key=``, ``++key=``);
  - every key added with ``+key=`` / ``++key=`` to a plain node (``budget``, ``eval``,
    ``backbone``, ``logger``, the top level ...), which by Hydra's rules did not exist
    (``++`` also when the key is not in the group's config file);

  each with a did-you-mean from the node's known keys.
* :func:`hydra_errors` turns Hydra's own composition errors (``Could not override
  'budget.per_tsk'``; a run folder that cannot be created or written) into one
  ``featcal:`` paragraph and exit code 2.
"""
from __future__ import annotations

import contextlib
import difflib
import errno
import inspect
import os
import sys
from pathlib import Path
from typing import Any, Iterable, Iterator

from omegaconf import DictConfig, ListConfig, OmegaConf

#: keys Hydra's ``instantiate`` reads itself, and the descriptive ``name``
INSTANTIATE_KEYS = frozenset({"_target_", "_partial_", "_convert_", "_recursive_", "_args_", "name"})


def did_you_mean(key: str, known: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``known``, or ``""``."""
    known = [str(k) for k in known]
    close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.5)
    if not close:  # a prefix/suffix typo of a long key ("lambda" for "lambda_ratio")
        close = [k for k in known if k.startswith(str(key)) or str(key).startswith(k)][:1]
    return f" (did you mean '{close[0]}'?)" if close else ""


def _known_list(known: Iterable[str]) -> str:
    names = sorted(k for k in known if not k.startswith("_"))
    return ", ".join(names) if len(names) <= 30 else ", ".join(names[:30]) + ", ..."


def accepted_keys(target: str) -> frozenset[str] | None:
    """The keyword arguments ``target`` (a dotted path) takes, or None when it takes any
    (``**kwargs`` up to the top of its ``__init__`` chain) or cannot be inspected."""
    try:
        from hydra.utils import get_object

        obj = get_object(target)
    except Exception:  # noqa: BLE001 - validate reports an unimportable target itself
        return None
    names: set[str] = set()
    if inspect.isclass(obj):
        inits = [k.__dict__["__init__"] for k in obj.__mro__ if "__init__" in k.__dict__ and k is not object]
    else:
        inits = [obj]
    for fn in inits:
        try:
            sig = inspect.signature(fn)
        except (TypeError, ValueError):
            return None
        var_kw = False
        for p in sig.parameters.values():
            if p.kind is p.VAR_KEYWORD:
                var_kw = True
            elif p.kind is not p.VAR_POSITIONAL:
                names.add(p.name)
        names.discard("self")
        if not var_kw:
            return frozenset(names)
    return None


def _target_nodes(node: Any, path: str = "") -> Iterator[tuple[str, DictConfig]]:
    if isinstance(node, DictConfig):
        if "_target_" in node:
            yield path, node
        for k in node.keys():
            if path == "" and k == "hydra":
                continue
            child = node._get_node(k)
            if isinstance(child, (DictConfig, ListConfig)):
                yield from _target_nodes(child, f"{path}.{k}" if path else str(k))
    elif isinstance(node, ListConfig):
        for i, child in enumerate(node._iter_ex(resolve=False) if hasattr(node, "_iter_ex") else []):
            if isinstance(child, (DictConfig, ListConfig)):
                yield from _target_nodes(child, f"{path}[{i}]")


def _target_problems(cfg: DictConfig) -> list[str]:
    out = []
    for path, node in _target_nodes(cfg):
        try:
            target = str(node["_target_"])
        except Exception:  # noqa: BLE001
            continue
        accepted = accepted_keys(target)
        if accepted is None:
            continue
        known = accepted | INSTANTIATE_KEYS
        for key in node.keys():
            key = str(key)
            if key not in known:
                out.append(f"{path}.{key}: unknown key ({target} takes no '{key}'){did_you_mean(key, accepted)}; "
                           f"known keys: {_known_list(accepted)}")
    return out


def _overrides_of(cfg: DictConfig) -> tuple[list[str], dict[str, str]]:
    """(task overrides, group choices) of a config composed with ``return_hydra_config=True``
    or else of the running Hydra job; ([], {}) outside Hydra."""
    hydra = OmegaConf.select(cfg, "hydra", default=None) if isinstance(cfg, DictConfig) else None
    if hydra is not None:
        ov = [str(o) for o in (OmegaConf.select(hydra, "overrides.task", default=None) or [])]
        ch = OmegaConf.select(hydra, "runtime.choices", default=None) or {}
        return ov, {str(k): str(v) for k, v in ch.items()}
    try:
        from hydra.core.hydra_config import HydraConfig

        hc = HydraConfig.get()
        return [str(o) for o in hc.overrides.task], {str(k): str(v) for k, v in hc.runtime.choices.items()}
    except Exception:  # noqa: BLE001 - not in a Hydra app
        return [], {}


def _conf_dir() -> Path:
    from featcal.paths import conf_dir

    return conf_dir()


def _group_file(conf: Path, group: str, name: str) -> DictConfig:
    """The config file ``<group>/<name>.yaml`` with the files its ``defaults:`` list names merged
    in at their packages, in order (a backbone preset: its model at ``adapter``, its task pool
    ``@_here_``); interpolations are left as they are."""
    node = OmegaConf.load(conf / group / f"{name}.yaml")
    defaults = node.pop("defaults", None) or ["_self_"]
    if "_self_" not in defaults:
        defaults = [*defaults, "_self_"]
    out = OmegaConf.create({})
    for entry in defaults:
        if entry == "_self_":
            out = OmegaConf.merge(out, node)
            continue
        if isinstance(entry, str):  # another file of the same group, at the same package
            out = OmegaConf.merge(out, _group_file(conf, group, entry))
            continue
        ((where, choice),) = entry.items()
        path, _, package = str(where).partition("@")
        sub = path.lstrip("/") if path.startswith("/") else f"{group}/{path}"
        child = _group_file(conf, sub, str(choice))
        package = sub.split("/")[-1] if not package else "" if package == "_here_" else package
        for part in reversed(package.split(".") if package else []):
            child = OmegaConf.create({part: child})
        out = OmegaConf.merge(out, child)
    return out


def _in_config_files(key: str, choices: dict[str, str]) -> bool:
    """Whether dotted ``key`` is set in conf/config.yaml or its group's chosen file (``++``),
    the files that file's ``defaults:`` names included."""
    parts = key.split(".")
    try:
        if parts[0] in choices and len(parts) > 1:
            ref = _group_file(_conf_dir(), parts[0], choices[parts[0]])
            rest = ".".join(parts[1:])
        else:
            ref = OmegaConf.load(_conf_dir() / "config.yaml")
            rest = key
        return OmegaConf.select(ref, rest, default=None, throw_on_resolution_failure=False) is not None or \
            _has_path(ref, rest)
    except Exception:  # noqa: BLE001
        return False


def _has_path(node: Any, dotted: str) -> bool:
    for part in dotted.split("."):
        if not isinstance(node, DictConfig) or part not in node:
            return False
        node = node._get_node(part)
    return True


def _only_added(node: Any, full: str, added: set[str]) -> bool:
    """Whether the node at dotted ``full`` exists only because of the ``added`` keys."""
    if full in added:
        return True
    if isinstance(node, DictConfig) and len(node) > 0:
        return all(_only_added(node._get_node(k), f"{full}.{k}", added) for k in node.keys())
    return False


def _added_key_problems(cfg: DictConfig, overrides: list[str], choices: dict[str, str]) -> list[str]:
    if not overrides:
        return []
    try:
        from hydra.core.override_parser.overrides_parser import OverridesParser

        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception:  # noqa: BLE001 - Hydra parsed them already
        return []
    added = []
    for o in parsed:
        key = str(o.key_or_group)
        if not (o.is_add() or o.is_force_add()):
            continue
        if o.package is not None or "/" in key or key in choices or key.split(".")[0] == "hydra":
            continue  # a config group, or Hydra's own settings
        if o.is_force_add() and _in_config_files(key, choices):
            continue  # ++ on a key the config files define: a plain override
        added.append(o)
    out = []
    for o in added:
        key = str(o.key_or_group)
        # the first component that did not exist before the overrides added it
        parts = key.split(".")
        others = {str(a.key_or_group) for a in added}
        node: Any = cfg
        for i, part in enumerate(parts):
            prefix = ".".join(parts[: i + 1])
            child = node._get_node(part) if isinstance(node, DictConfig) and part in node else None
            is_new = child is None or i == len(parts) - 1 or _only_added(child, prefix, others)
            if isinstance(node, DictConfig) and "_target_" in node:
                break  # keys of a _target_ node: checked against the target's signature
            if is_new:
                parent = ".".join(parts[:i]) or "the top level"
                base = ".".join(parts[:i])
                siblings = []
                for k in node.keys() if isinstance(node, DictConfig) else []:
                    full = f"{base}.{k}" if base else str(k)
                    if not _only_added(node._get_node(k), full, others):
                        siblings.append(str(k))
                if i == 0:
                    siblings = [s for s in siblings if s != "hydra"]
                sign = "++" if o.is_force_add() else "+"
                out.append(f"{prefix}: unknown key (added with {sign}{o.input_line.lstrip('+')}){did_you_mean(part, siblings)}; "
                           f"known keys of {parent}: {_known_list(siblings)}. Keys cannot be added with '+': "
                           f"change an existing one (without '+')")
                break
            node = child
    return out


def unknown_key_problems(cfg: DictConfig, overrides: list[str] | None = None, choices: dict[str, str] | None = None) -> list[str]:
    """Problems (``key: unknown key ...; did you mean ...``) for keys the run does not know;
    the overrides and group choices default to the running Hydra job's."""
    if overrides is None or choices is None:
        ov, ch = _overrides_of(cfg)
        overrides = ov if overrides is None else overrides
        choices = ch if choices is None else choices
    return _target_problems(cfg) + _added_key_problems(cfg, list(overrides), dict(choices))


# ---------------------------------------------------------------------------
# Hydra's own errors (before the task function runs)


def _override_problem(ex: BaseException) -> str | None:
    """The featcal paragraph for Hydra's "Could not override 'a.b'" (an unknown key)."""
    msg = str(ex)
    if type(ex).__name__ != "ConfigCompositionException" or not msg.startswith("Could not override '"):
        return None
    cause = ex.__cause__
    if type(cause).__name__ not in ("ConfigAttributeError", "ConfigKeyError"):
        return None  # another problem with this override: Hydra's own message
    full_key = getattr(cause, "full_key", None) or msg.split("'")[1]
    leaf = str(getattr(cause, "key", None) or full_key.rsplit(".", 1)[-1])
    parent = getattr(cause, "parent_node", None)
    known: list[str] = []
    if isinstance(parent, DictConfig):
        known = [str(k) for k in parent.keys()]
        target = parent.get("_target_") if "_target_" in parent else None
        if target:
            acc = accepted_keys(str(target))
            if acc is not None:
                known = sorted(set(known) | acc)
    where = full_key.rsplit(".", 1)[0] if "." in full_key else "the top level"
    if not known:
        return f"unknown config key '{full_key}'; check its spelling (`featcal-run --cfg job` prints every key)"
    return (f"unknown config key '{full_key}'{did_you_mean(leaf, known)}; known keys of {where}: {_known_list(known)}. "
            f"Keys cannot be added: fix the spelling (`featcal-run --cfg job` prints every key)")


def _run_folder_problem(ex: BaseException) -> str | None:
    """The featcal paragraph for an OSError Hydra hit creating or writing the run folder."""
    if not isinstance(ex, OSError) or ex.errno is None or type(ex).__module__.startswith("hydra"):
        return None  # (Hydra's MissingConfigException is an IOError too)
    frames = []
    tb = ex.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    files = [f.f_code.co_filename.replace(os.sep, "/") for f in frames]
    if any("/featcal/" in f and not f.endswith("featcal/strict.py") for f in files):
        return None  # raised inside the run itself
    if not any(f.endswith("hydra/core/utils.py") for f in files):
        return None  # not where Hydra creates the run folder and writes .hydra/
    path = ex.filename or "?"
    what = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exhausted",
            errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
            errno.EPERM: "permission denied"}.get(ex.errno or -1, ex.strerror or type(ex).__name__)
    free = ""
    with contextlib.suppress(Exception):
        from featcal.utils import free_mib

        free = f" ({free_mib(path):.1f} MiB free there)"
    return (f"cannot create or write the run folder {path}: {what}{free}. Nothing ran. Set hydra.run.dir=<folder> "
            f"(hydra.sweep.dir=<folder> with -m) to a writable folder with free space")


@contextlib.contextmanager
def hydra_errors() -> Iterator[None]:
    """While ``featcal-run``'s Hydra app starts, report an unknown key or an unusable run
    folder as one ``featcal:`` paragraph and exit 2 instead of Hydra's message and exit 1."""
    try:
        import hydra._internal.utils as hu
    except ImportError:  # pragma: no cover
        yield
        return
    original = hu.run_and_report

    def run_and_report(func: Any) -> Any:
        def translated() -> Any:
            try:
                return func()
            except Exception as ex:  # noqa: BLE001 - translated or re-raised
                text = _override_problem(ex) or _run_folder_problem(ex)
                if text is None:
                    raise
                from featcal.errors import EXIT_USER_ERROR

                sys.stderr.write(f"featcal: {text}.\n")
                sys.stderr.flush()
                raise SystemExit(EXIT_USER_ERROR) from None

        return original(translated)

    hu.run_and_report = run_and_report
    try:
        yield
    finally:
        hu.run_and_report = original
