"""An allowlist unpickler for whole-module torch checkpoints (never runs a file's code).

The task-vectors release ships whole pickled ``ImageEncoder`` objects, which
``torch.load(weights_only=True)`` refuses. Plain pickle would resolve *every* global the
file names (``os.system``, ``builtins.eval``...) and call it: a file dropped in a shared
checkpoint folder would run code as the user. This unpickler is handed to ``torch.load``
through its public ``pickle_module=`` argument (torch keeps driving storages through
``persistent_load`` and maps ``*Storage`` names itself), and decides every global:

- **allowlisted** (:data:`ALLOWED`): what rebuilds tensors, storages, parameters, dtypes
  and plain containers resolves to the real object;
- **refused** (:func:`refusal`): globals from modules that reach the shell, the import
  system or arbitrary callables (``os``, ``posix``, ``nt``, ``subprocess``, ``builtins``
  outside the containers, ``importlib``, ``functools``, ``operator``, ``copyreg``,
  ``sys``, ``pickle``, ``runpy``, ``ctypes``, ``socket`` ..., any private top-level
  module such as ``_posixsubprocess``), and names such as ``eval``/``exec``/``getattr``/
  ``system``/``popen``/``__import__`` anywhere: loading stops *before anything runs*
  with one ``featcal:`` message naming the file and the global;
- **everything else** (the release's ``src.modeling.ImageEncoder``, open_clip and
  torch module classes, torchvision transforms, functions such as open_clip's
  ``_convert_to_rgb``) becomes an inert stub *without importing its module*: calling it
  builds a stub, its pickled ``__dict__`` is kept as data, so the tensors are read from
  the state (``_parameters`` / ``_buffers`` / ``_modules``).

Nothing outside :data:`ALLOWED` is ever imported or called, so the refusal list is a
clear message for tampered files, not the safety boundary itself.
"""
from __future__ import annotations

import io
import os
import pickle
import types
from typing import Any

import torch
from torch import nn

from featcal.errors import CheckpointMismatch

_DTYPES = {name for name in dir(torch) if isinstance(getattr(torch, name, None), torch.dtype)}

#: (module, name) pairs resolved to the real objects.
ALLOWED: frozenset[tuple[str, str]] = frozenset(
    {
        ("torch._utils", "_rebuild_tensor"),
        ("torch._utils", "_rebuild_tensor_v2"),
        ("torch._utils", "_rebuild_tensor_v3"),
        ("torch._utils", "_rebuild_parameter"),
        ("torch._utils", "_rebuild_parameter_with_state"),
        ("torch._tensor", "_rebuild_from_type_v2"),
        ("torch._tensor", "Tensor"),
        ("torch", "Tensor"),
        ("torch", "Size"),
        ("torch", "device"),
        ("torch.nn.parameter", "Parameter"),
        ("collections", "OrderedDict"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
        ("builtins", "bytearray"),
        ("builtins", "slice"),
        ("builtins", "complex"),
        ("__builtin__", "set"),  # protocol-2 pickles written by Python 2
        ("__builtin__", "frozenset"),
    }
    | {("torch", d) for d in _DTYPES}
)

#: top-level modules whose globals are refused (shell, processes, import system, reflection).
DENIED_MODULES = frozenset(
    {
        "builtins", "__builtin__", "os", "posix", "nt", "commands", "popen2", "posixpath", "ntpath", "subprocess", "pty", "shutil",
        "importlib", "imp", "pkgutil", "runpy", "zipimport", "site", "sys", "types", "inspect", "code", "codeop",
        "functools", "operator", "copyreg", "copy_reg", "copy", "pickle", "cPickle", "marshal", "shelve", "dill",
        "ctypes", "cffi", "socket", "ssl", "http", "urllib", "requests", "ftplib", "smtplib", "telnetlib", "asyncio",
        "multiprocessing", "threading", "concurrent", "signal", "webbrowser", "pdb", "bdb", "trace", "timeit",
        "profile", "cProfile", "platform", "tempfile", "glob", "pathlib", "io", "codecs", "shlex", "sysconfig",
        "ensurepip", "venv", "distutils", "setuptools", "pip", "contextlib", "weakref", "gc", "atexit", "builtins",
    }
)

#: names refused in any module.
DENIED_NAMES = frozenset(
    {
        "eval", "exec", "execfile", "compile", "getattr", "setattr", "delattr", "__import__", "__getattribute__",
        "__builtins__", "globals", "locals", "vars", "system", "popen", "Popen", "spawn", "fork", "call", "run",
        "check_call", "check_output", "getoutput", "import_module", "load", "loads", "load_module", "open",
        "attrgetter", "itemgetter", "methodcaller", "partial", "reduce", "apply", "breakpoint", "input", "exit",
    }
)


class UnsafeCheckpoint(CheckpointMismatch):
    """A pickled checkpoint names a global that could run code: refused before loading it."""


class Stub(nn.Module):
    """Inert stand-in for any pickled global outside the allowlist (never imported).

    Pickled ``nn.Module`` objects are rebuilt without ``__init__`` and then receive their
    ``__dict__`` (``_parameters``, ``_buffers``, ``_modules``...): all that is needed to
    read their tensors. Calling a stub (a pickled function or a class called by REDUCE)
    only builds another stub instance.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__()
        object.__setattr__(self, "_pickled_args", args)

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2 and (state[0] is None or isinstance(state[0], dict)):
            state = {**(state[0] or {}), **(state[1] or {})}
        if isinstance(state, dict):
            if "_parameters" in state or "_modules" in state:
                nn.Module.__setstate__(self, state)
            else:
                object.__setattr__(self, "_pickled_state", state)
        else:
            object.__setattr__(self, "_pickled_state", state)

    # pickled objects may carry extend/append/setitem opcodes (lists, dicts subclassed)
    def append(self, item: Any) -> None:
        self.__dict__.setdefault("_pickled_items", []).append(item)

    def extend(self, items: Any) -> None:
        for item in items:
            self.append(item)

    def __setitem__(self, key: Any, value: Any) -> None:
        self.__dict__.setdefault("_pickled_mapping", {})[key] = value


def _top(module: str) -> str:
    return module.split(".", 1)[0]


def refusal(module: str, name: str) -> bool:
    """Whether the global ``module.name`` is refused (see the module docstring)."""
    if (module, name) in ALLOWED:
        return False
    top = _top(module)
    last = name.rsplit(".", 1)[-1]
    return (
        top in DENIED_MODULES
        or (top.startswith("_") and top != "__main__")
        or last in DENIED_NAMES
        or last.startswith(("exec", "spawn", "popen", "__"))
        or "." in name and any(p.startswith("__") for p in name.split("."))
    )


_stubs: dict[tuple[str, str], type] = {}


def _stub(module: str, name: str) -> type:
    key = (module, name)
    if key not in _stubs:
        _stubs[key] = type(name.rsplit(".", 1)[-1], (Stub,), {"__module__": f"featcal.stub.{module}", "__qualname__": name})
    return _stubs[key]


_HINT = ("Only load checkpoints from a source you trust; re-download this file from its original release, or "
         "convert a trusted copy to a state dict / safetensors file.")


class AllowlistUnpickler(pickle._Unpickler):  # the Python unpickler: its opcodes can be vetted one by one
    """Unpickler whose ``find_class`` resolves only :data:`ALLOWED` globals, and which
    refuses to set attributes on a class (a BUILD on ``torch.Tensor`` would patch it for
    the whole process). ``source`` (set by :func:`torch_load`) names the file in messages.
    """

    source = "<checkpoint>"
    dispatch = dict(pickle._Unpickler.dispatch)

    def _refuse(self, what: str) -> UnsafeCheckpoint:
        return UnsafeCheckpoint(f"checkpoint '{self.source}' {what}; it was not loaded (nothing from it ran)", _HINT)

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in ALLOWED:
            return super().find_class(module, name)
        if refusal(module, name):
            raise self._refuse(f"refers to the global '{module}.{name}', which could run code when unpickled")
        return _stub(module, name)

    def _load_build(self) -> None:
        target = self.stack[-2]
        if isinstance(target, type):
            raise self._refuse(f"sets attributes on the class '{target.__module__}.{target.__qualname__}'")
        pickle._Unpickler.load_build(self)

    dispatch[pickle.BUILD[0]] = _load_build


def _module_for(source: str) -> types.ModuleType:
    """A module object with pickle's interface, as ``torch.load(pickle_module=)`` expects."""

    class _Unpickler(AllowlistUnpickler):
        pass

    _Unpickler.source = source
    mod = types.ModuleType("featcal_allowlist_pickle")
    mod.Unpickler = _Unpickler  # type: ignore[attr-defined]
    mod.load = lambda f, **kw: _Unpickler(f, **kw).load()  # type: ignore[attr-defined]
    mod.loads = lambda b, **kw: _Unpickler(io.BytesIO(b), **kw).load()  # type: ignore[attr-defined]
    mod.__name__ = "pickle"  # torch's legacy loader checks the module name in places
    return mod


def torch_load(path: str | os.PathLike) -> Any:
    """``torch.load`` of a whole pickled object through :class:`AllowlistUnpickler` (CPU).

    Raises :class:`UnsafeCheckpoint` for a refused global (before it is called).
    ``weights_only=False`` is needed only so torch accepts a custom ``pickle_module``;
    the allowlist, not torch's, decides what resolves.
    """
    return torch.load(str(path), map_location="cpu", weights_only=False, pickle_module=_module_for(str(path)))  # allowlisted reader


def module_tensors(obj: Any, prefix: str = "", out: dict | None = None, seen: set | None = None) -> dict[str, torch.Tensor]:
    """Parameters and buffers of a (possibly stubbed) module tree, read from ``__dict__``."""
    out = {} if out is None else out
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return out
    seen.add(id(obj))
    d = getattr(obj, "__dict__", {})
    for kind in ("_parameters", "_buffers"):
        for name, t in (d.get(kind) or {}).items():
            if isinstance(t, torch.Tensor):
                out[prefix + name] = t.detach()
    for name, child in (d.get("_modules") or {}).items():
        if child is not None:
            module_tensors(child, f"{prefix}{name}.", out, seen)
    return out
