"""Catching device mix-ups on a machine without a second device.

Two tools for the CPU test suite (``tests/test_device.py``):

* ``FactoryAudit``: a ``TorchFunctionMode`` that records every tensor factory call
  (``torch.zeros/ones/empty/eye/full/arange/tensor/rand/randn/randint/randperm/linspace``)
  made *directly by featcal code* without an explicit ``device=``, and every
  ``Tensor.cpu()`` / ``.to("cpu")`` made by featcal code. On CPU such calls work; on a GPU
  run they put a tensor on the CPU next to CUDA data (the crash of issue 9) or move data
  off the device inside a loop.
* ``foreign_home``: a backbone whose expert blocks report the ``meta`` device as their
  home. The FeatCal driver moves each expert block to the work device, captures, and
  moves it back "home" — to meta, which drops its data. Any statistic that still aliases
  an expert parameter then becomes a meta tensor and the solve raises on meta/cpu mixing:
  the same failure as an expert kept on the CPU while the work runs on cuda.
"""
from __future__ import annotations

import os
import traceback
from dataclasses import dataclass

import torch
from torch.overrides import TorchFunctionMode

import featcal

_FEATCAL_DIR = os.path.dirname(os.path.abspath(featcal.__file__))

FACTORIES = {
    torch.zeros, torch.ones, torch.empty, torch.eye, torch.full, torch.arange, torch.tensor,
    torch.rand, torch.randn, torch.randint, torch.randperm, torch.linspace,
}


@dataclass
class Finding:
    what: str
    where: str  # file:line in featcal

    def __str__(self) -> str:
        return f"{self.what} at {self.where}"


def _featcal_caller() -> str | None:
    """file:line of the code calling the op, if that is featcal's own code (factories
    called inside torch, e.g. by ``nn.Linear.__init__``, are torch's business)."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        path = os.path.abspath(frame.filename)
        if path == os.path.abspath(__file__):
            continue
        if path.startswith(_FEATCAL_DIR):
            return f"{os.path.relpath(path, os.path.dirname(_FEATCAL_DIR))}:{frame.lineno}"
        return None
    return None


def _is_cpu(arg) -> bool:
    """A literal "cpu" (a ``torch.device`` is how the work device is passed around, so on a
    CPU run ``.to(device)`` is fine and is not flagged)."""
    return isinstance(arg, str) and arg.startswith("cpu")


class FactoryAudit(TorchFunctionMode):
    """Record device-unsafe calls made by featcal code (see the module docstring)."""

    def __init__(self):
        super().__init__()
        self.findings: list[Finding] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        what = None
        if func in FACTORIES and kwargs.get("device") is None:
            what = f"torch.{func.__name__} without device="
        elif func is torch.Tensor.cpu:
            what = "Tensor.cpu()"
        elif func is torch.Tensor.to and (
            _is_cpu(kwargs.get("device")) or any(_is_cpu(a) for a in args[1:2])
        ):
            what = "Tensor.to(cpu)"
        if what is not None:
            where = _featcal_caller()
            if where is not None:
                self.findings.append(Finding(what, where))
        return func(*args, **kwargs)

    def unexpected(self, allowed: dict[str, str] | None = None) -> list[str]:
        """Findings whose location does not start with an allowed prefix
        (``allowed`` maps "path:line" prefixes to the reason they are fine)."""
        allowed = allowed or {}
        return sorted({str(f) for f in self.findings if not any(f.where.startswith(a) for a in allowed)})


HOME = torch.device("meta")  # the "other device" expert blocks report as their home


def foreign_home(backbone, experts):
    """A copy of ``backbone`` whose expert blocks report a foreign home device.

    ``device_of(expert block)`` answers ``HOME``; sending such a block home
    (``block.to(HOME)``) poisons its parameters *in place* with NaN instead of moving
    them. That is what a real move does to a tensor object that still aliases a
    parameter (``Module.to`` swaps the parameter's data between CPU and CUDA in place):
    it leaves the work device. A statistic kept by reference then turns NaN and the
    solve fails or differs; a statistic copied on the work device is unaffected.

    ``experts`` are the (deep-copied!) expert models the calibration will use.
    """
    import types

    expert_blocks = {id(b) for e in experts for b in backbone.blocks(e)}

    def patched_to(self, *args, **kwargs):
        target = args[0] if args else kwargs.get("device")
        if isinstance(target, torch.device) and target == HOME:
            with torch.no_grad():
                for p in self.parameters():
                    p.fill_(float("nan"))
            return self
        return torch.nn.Module.to(self, *args, **kwargs)

    for e in experts:
        for b in backbone.blocks(e):
            b.to = types.MethodType(patched_to, b)

    class ForeignHome(type(backbone)):  # type: ignore[misc, valid-type]
        def device_of(self, model):
            if id(model) in expert_blocks:
                return HOME
            return super().device_of(model)

    clone = object.__new__(ForeignHome)
    clone.__dict__.update(backbone.__dict__)
    return clone
