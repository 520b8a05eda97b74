"""What Surgery and ProbSurgery produce: small residual modules on the merged model's final
representation (z -> z - module_t(z)), routed by task (``SurgeryBank``), and the calibrated
model that hooks them into the merged model at ``backbone.representation_site``, saved and
loaded with it (``SurgeryCalibratedModel``, ``load_surgery``). Training: ``surgery.py``."""
from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from featcal.backbone.base import Backbone
from featcal.calibration.base import CalibratedModel, CalibrationReport

# --------------------------------------------------------------------------- modules


class SurgeryModule(nn.Module):
    """down Linear(D→h, no bias) → ReLU → up Linear(h→D, no bias, zero init).

    ``forward`` returns the bias b(z); the calibrated representation is z − b(z).
    The zero-initialised up projection makes the module the identity map at init.
    """

    def __init__(self, dim: int, hidden: int = 16):
        super().__init__()
        self.down = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(hidden, dim, bias=False)
        nn.init.zeros_(self.up.weight)

    def forward(self, z: torch.Tensor, noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.up(F.relu(self.down(z))), None


class ProbSurgeryModule(nn.Module):
    """Linear(D→h, no bias) → ReLU → heads μ, log σ² (Linear(h→D, no bias, zero init)).

    With ``noise`` ε (training) the bias is one reparameterised sample
    b = μ + exp(½ log σ²)·ε and the KL(N(μ, σ²) ‖ N(0, I)) term is returned (summed over
    the feature dimension, one value per row); without noise (inference) b = μ.
    """

    def __init__(self, dim: int, hidden: int = 128):
        super().__init__()
        self.down = nn.Linear(dim, hidden, bias=False)
        self.mu = nn.Linear(hidden, dim, bias=False)
        self.logvar = nn.Linear(hidden, dim, bias=False)
        nn.init.zeros_(self.mu.weight)
        nn.init.zeros_(self.logvar.weight)

    def forward(self, z: torch.Tensor, noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        h = F.relu(self.down(z))
        mu = self.mu(h)
        if noise is None:
            return mu, None
        logvar = self.logvar(h)
        b = mu + torch.exp(0.5 * logvar) * noise.to(mu.dtype)
        kl = 0.5 * (logvar.exp() + mu.pow(2) - 1.0 - logvar).sum(-1)
        return b, kl


class SurgeryBank(nn.Module):
    """The residual modules of one calibrated model, routed by task index.

    ``num_modules`` is the number of tasks, or 1 for the shared ("one-to-all") variant,
    in which every task index routes to the single module.
    """

    def __init__(self, kind: str, dim: int, hidden: int, num_modules: int):
        super().__init__()
        if kind not in ("surgery", "probsurgery"):
            raise ValueError(f"unknown surgery kind '{kind}'")
        cls = SurgeryModule if kind == "surgery" else ProbSurgeryModule
        self.kind, self.dim, self.hidden = kind, int(dim), int(hidden)
        self.blocks = nn.ModuleList(cls(dim, hidden) for _ in range(num_modules))

    @property
    def shared(self) -> bool:
        return len(self.blocks) == 1

    def index(self, task_index: int) -> int:
        if self.shared:
            return 0
        if not 0 <= task_index < len(self.blocks):
            raise IndexError(f"task index {task_index} out of range for {len(self.blocks)} surgery modules")
        return task_index

    def forward(
        self, z: torch.Tensor, task_index: int, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(ẑ = z − b(z), per-row KL or None)."""
        b, kl = self.blocks[self.index(task_index)](z, noise)
        return z - b, kl

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, "dim": self.dim, "hidden": self.hidden, "num_modules": len(self.blocks)}


# ---------------------------------------------------------------------- calibrated


class SurgeryCalibratedModel(CalibratedModel):
    """Merged model + per-task residual modules on the final representation.

    ``model_for_task(t)`` returns the merged model (the family's own class) with module t
    applied by a forward hook at ``backbone.representation_site(model)``: the
    representation z becomes ẑ = z − module_t(z), whatever calls the model (the task
    pool's scorer, ``generate``, ``backbone.represent``). The hook is installed on the
    first call and routes to the task of the latest ``model_for_task`` call, so one task
    is evaluated at a time; ``remove_hooks()`` restores the plain merged model.
    """

    save_name = "surgery"

    def __init__(self, backbone: Backbone, model: nn.Module, bank: SurgeryBank, report: CalibrationReport | None = None):
        super().__init__(backbone, model, report)
        self.surgery = bank
        self._task: int | None = None
        self._handle = None

    def model_for_task(self, task_index: int) -> nn.Module:
        self.surgery.index(task_index)  # raises for an index without a module
        self._task = int(task_index)
        if self._handle is None:
            module, where = self.backbone.representation_site(self.model)
            self._handle = attach_correction(module, where, self._correct)
        return self.model

    def remove_hooks(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _correct(self, z: torch.Tensor) -> torch.Tensor:
        p = next(self.surgery.parameters())
        z_hat, _ = self.surgery(z.to(device=p.device, dtype=p.dtype), self._task)
        return z_hat.to(device=z.device, dtype=z.dtype)

    def save(self, folder: str | Path) -> Path:
        """The modules (``surgery_modules.safetensors``), their config and hook site
        (``surgery_config.json``) and the report; the merged model is not saved (the merge
        recreates it). Load back with :func:`load_surgery`."""
        from safetensors.torch import save_file

        folder = Path(folder)
        tmp = folder.parent / f".tmp-{folder.name}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        try:
            module, where = self.backbone.representation_site(self.model)
            site = next((n for n, m in self.model.named_modules() if m is module), None)
            state = {k: v.detach().contiguous().cpu() for k, v in self.surgery.state_dict().items()}
            save_file(state, str(tmp / "surgery_modules.safetensors"))
            config = {
                "format": SURGERY_FORMAT,
                "config": self.surgery.config(),
                "site": {"module": site, "where": where},
                "formula": "z_hat = z - module[t](z) at the site; module t = blocks.<t> (blocks.0 when shared)",
            }
            (tmp / "surgery_config.json").write_text(json.dumps(config, indent=2) + "\n")
            (tmp / "calibration_report.json").write_text(json.dumps(self.report.to_dict(), indent=2, default=str) + "\n")
            if folder.exists():
                shutil.rmtree(folder)
            tmp.replace(folder)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return folder

    @classmethod
    def load(cls, folder: str | Path, backbone: Backbone, model: nn.Module) -> "SurgeryCalibratedModel":
        return load_surgery(folder, backbone, model)


SURGERY_FORMAT = "featcal.surgery/2"


def load_surgery(folder: str | Path, backbone: Backbone, model: nn.Module) -> SurgeryCalibratedModel:
    """Rebuild a Surgery/ProbSurgery calibrated model from ``SurgeryCalibratedModel.save``
    output and the same merged model (e.g. the run's merge recomputed)::

        cal = load_surgery("outputs/<run>/surgery", backbone, merged)
        model = cal.model_for_task(t)      # the merged model with module t hooked in
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg_file = folder / "surgery_config.json"
    if not cfg_file.exists():
        raise ValueError(f"'{folder}' is not a saved surgery calibration (no surgery_config.json)")
    payload = json.loads(cfg_file.read_text())
    if payload.get("format") != SURGERY_FORMAT:
        raise ValueError(f"'{folder}' has format {payload.get('format')!r}, expected {SURGERY_FORMAT!r}")
    bank = SurgeryBank(**payload["config"])
    bank.load_state_dict(load_file(str(folder / "surgery_modules.safetensors")))
    try:
        bank = bank.to(backbone.device_of(model))
    except StopIteration:
        pass
    return SurgeryCalibratedModel(backbone, model, bank.eval())


def attach_correction(module: nn.Module, where: str, correct):
    """Register a hook on ``module`` that replaces its output (``where="output"``) or its
    first positional input (``"input"``) by ``correct(tensor)``; returns the handle."""
    if where == "output":
        def hook(mod, args, output):
            if isinstance(output, torch.Tensor):
                return correct(output)
            return (correct(output[0]),) + tuple(output[1:])

        return module.register_forward_hook(hook)
    if where == "input":
        def pre_hook(mod, args):
            return (correct(args[0]),) + tuple(args[1:])

        return module.register_forward_pre_hook(pre_hook)
    raise ValueError(f"representation site must be 'output' or 'input', got {where!r}")


__all__ = [
    "attach_correction",
    "load_surgery",
    "ProbSurgeryModule",
    "SurgeryBank",
    "SurgeryCalibratedModel",
    "SurgeryModule",
]
