"""Representation Surgery (Yang et al., ICML 2024) and ProbSurgery (Wei et al., ICML 2025).

Both put a small residual module on the merged model's final representation
z = backbone.represent(merged, x) (whatever the backbone names as its final
representation, e.g. a projected embedding before L2 normalisation) and train it so
that ẑ = z − module(z) matches the expert's representation of the same input under
an L1 loss. Only the modules train.

Because the merged encoder and the experts are frozen, their representations of the
calibration set are computed once (no grad, batched) and the modules train on the
cached tensors; the reference implementations re-run the encoder every step.

Device and precision go through Lightning Fabric, so the same code runs on CPU in
float32 and on a GPU in bf16. Which split the calibration batches come from
(train: this project's protocol; test: the original transductive one) is the run's
``budget.split``; a calibrator only sees batches.
"""
from __future__ import annotations

import json
import math
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from featcal.backbone.base import Backbone, Inputs, move_inputs
from featcal.calibration.base import CalibratedModel, CalibrationReport, Calibrator
from featcal.utils import torch_threads

ZERO_GRAD = ("set_to_none", "zeros")
SELECT = ("final", "best")
SELECTION_SPLITS = ("test", "calibration")

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


# ----------------------------------------------------------------------- training


def _resolve_fabric(accelerator: str, devices: Any, precision: str, device: torch.device | str):
    """A single-device Fabric. ``accelerator="auto"`` follows the run's ``device``."""
    from lightning.fabric import Fabric

    if accelerator == "auto":
        dev = torch.device(device)
        accelerator = {"cuda": "cuda", "mps": "mps"}.get(dev.type, "cpu")
        if dev.type == "cuda" and dev.index is not None:
            devices = [dev.index]
    return Fabric(accelerator=accelerator, devices=devices, precision=precision)


class _IndexStream:
    """Minibatch indices for one task: consecutive chunks of seeded permutations.

    Each example is seen once per pass; a batch spanning a pass boundary takes the
    rest from the next permutation, so batches always hold min(batch_size, n) rows.
    """

    def __init__(self, n: int, batch_size: int, generator: torch.Generator):
        self.n, self.bs, self.g = n, min(batch_size, n), generator
        # indices are drawn on the CPU (a seeded CPU generator gives the same stream on
        # every device) and moved to the device per step by the training loop
        self.buf = torch.empty(0, dtype=torch.long, device="cpu")

    def next(self) -> torch.Tensor:
        while self.buf.numel() < self.bs:
            self.buf = torch.cat([self.buf, torch.randperm(self.n, generator=self.g)])
        out, self.buf = self.buf[: self.bs], self.buf[self.bs:]
        return out


class _SurgeryBase(Calibrator):
    """Shared training loop of Surgery and ProbSurgery (see the module docstring).

    Schedule: for each of ``iterations`` iterations, for each task in order,
    ``batches_per_iteration`` Adam steps on minibatches of that task (one step per
    batch), i.e. iterations × batches_per_iteration × T steps in total; the original
    is 500 × 2 per task. With per-task modules and ``zero_grad="set_to_none"`` (today's
    torch default) the order does not change the result (tasks own disjoint parameters,
    and Adam skips parameters without gradient).

    ``zero_grad="zeros"``: the originals' torch 1.x ``optimizer.zero_grad()``, which leaves
    zero gradients instead of None: once a module has had a gradient, every later step
    (any task's) is an Adam step for it with g = 0, so it keeps moving on its momentum and
    its step count advances (the order of tasks then matters).

    Rounds: the schedule is cut into ``rounds`` equal rounds (``iterations`` a multiple of
    ``rounds``). ``select="final"`` keeps the last modules; ``select="best"`` keeps the
    modules at the end of the best round, scored on ``selection_split``: ``test`` =
    the run's task-pool score on the test split (ProbSurgery's public code: the best of 50
    rounds on the test set; such a run is labelled ``+test-selected``), ``calibration`` =
    the lowest mean L1 to the experts on the calibration features (no test data).
    """

    kind: str = "surgery"
    name: str = "surgery"

    def __init__(
        self,
        hidden: int,
        shared: bool = False,
        kl_weight: float = 0.0,
        iterations: int = 500,
        batches_per_iteration: int = 2,
        batch_size: int = 16,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 0.0,
        log_every: int = 50,
        seed: int = 0,
        accelerator: str = "auto",
        devices: Any = 1,
        precision: str = "32-true",
        progress: bool = True,
        zero_grad: str = "set_to_none",
        rounds: int = 1,
        select: str = "final",
        selection_split: str = "test",
    ):
        if iterations < 0 or batches_per_iteration < 1 or batch_size < 1:
            raise ValueError("iterations must be >= 0, batches_per_iteration and batch_size >= 1")
        if zero_grad not in ZERO_GRAD:
            raise ValueError(f"zero_grad must be one of {', '.join(ZERO_GRAD)}, got {zero_grad!r}")
        if select not in SELECT or selection_split not in SELECTION_SPLITS:
            raise ValueError(f"select must be one of {SELECT} and selection_split one of {SELECTION_SPLITS}, "
                             f"got {select!r}, {selection_split!r}")
        if int(rounds) < 1 or int(iterations) % int(rounds):
            raise ValueError(f"rounds must be >= 1 and divide iterations ({iterations}), got {rounds}")
        self.zero_grad = zero_grad
        self.rounds = int(rounds)
        self.select = select
        self.selection_split = selection_split
        #: set by the run when ``needs_test_scorer``: ``scorer(calibrated) -> float`` (higher is
        #: better), the task pool's average score of a calibrated model on the test split
        self.round_scorer = None
        self.hidden = int(hidden)
        self.shared = bool(shared)
        self.kl_weight = float(kl_weight)
        self.iterations = int(iterations)
        self.batches_per_iteration = int(batches_per_iteration)
        self.batch_size = int(batch_size)
        self.lr = float(lr)
        self.betas = (float(betas[0]), float(betas[1]))
        self.weight_decay = float(weight_decay)
        self.log_every = max(1, int(log_every))
        self.seed = int(seed)
        self.accelerator = accelerator
        self.devices = devices
        self.precision = str(precision)
        self.progress = bool(progress)

    @classmethod
    def validate_config(cls, node: dict) -> list[str]:
        from featcal.config import check_keys, non_negative_number, number_in, positive_int

        return check_keys(node, {
            "hidden": (positive_int, "must be a positive integer"),
            "iterations": (positive_int, "must be a positive integer"),
            "batches_per_iteration": (positive_int, "must be a positive integer"),
            "batch_size": (positive_int, "must be a positive integer (training minibatch rows)"),
            "lr": (number_in(0.0, math.inf, lo_open=True), "must be a number > 0"),
            "kl_weight": (non_negative_number, "must be a number >= 0"),
            "weight_decay": (non_negative_number, "must be a number >= 0"),
            "log_every": (positive_int, "must be a positive integer"),
            "seed": (lambda x: isinstance(x, int) and not isinstance(x, bool) and x >= 0, "must be a non-negative integer"),
            "zero_grad": (lambda x: x in ZERO_GRAD, "allowed: set_to_none (today's torch), zeros (torch 1.x, the originals)"),
            "rounds": (positive_int, "must be a positive integer dividing iterations"),
            "select": (lambda x: x in SELECT, "allowed: final (the last round), best (the best-scoring round)"),
            "selection_split": (lambda x: x in SELECTION_SPLITS, "allowed: test (task-pool score on the test split), calibration (L1 on the calibration set)"),
        }) + (
            [f"rounds={node['rounds']!r}: must divide iterations={node['iterations']!r}"]
            if positive_int(node.get("rounds", 1)) and positive_int(node.get("iterations", 1))
            and node.get("iterations", 1) % node.get("rounds", 1) else []
        )

    @property
    def needs_test_scorer(self) -> bool:
        """True when rounds are selected by their test-split score (the run supplies it)."""
        return self.select == "best" and self.selection_split == "test" and self.rounds > 1

    @property
    def selection_label(self) -> str:
        """The suffix of this calibrator's label in every table: test-set selection is marked."""
        return "+test-selected" if self.needs_test_scorer else ""

    # ---- feature cache ---------------------------------------------------
    @torch.no_grad()
    def _encode(self, fabric, backbone: Backbone, model: nn.Module, batches: list[Inputs]) -> torch.Tensor:
        """Final representations of all batches, float32, on the fabric device."""
        outs = []
        with fabric.autocast():
            for inputs in batches:
                z = backbone.represent(model, move_inputs(inputs, fabric.device))
                outs.append(z.detach().float())
        return torch.cat(outs, 0)

    def _cache(self, fabric, backbone, merged, experts, calibration):
        merged_feats, expert_feats = [], []
        merged.to(fabric.device)
        for t, (expert, batches) in enumerate(zip(experts, calibration)):
            if len(batches) == 0:
                raise ValueError(f"task {t} has no calibration batches")
            merged_feats.append(self._encode(fabric, backbone, merged, batches))
            home = backbone.device_of(expert)
            expert.to(fabric.device)
            expert_feats.append(self._encode(fabric, backbone, expert, batches))
            expert.to(home)
            if merged_feats[-1].shape != expert_feats[-1].shape:
                raise ValueError(
                    f"task {t}: merged and expert representations differ in shape "
                    f"{tuple(merged_feats[-1].shape)} vs {tuple(expert_feats[-1].shape)}"
                )
        return merged_feats, expert_feats

    def _train(self, fabric, wrapped, optimizer, merged_feats, expert_feats, names, on_round=None):
        """The optimisation loop on cached features; returns (steps, loss curve, per-task curve).
        ``on_round(r, step)`` runs after each of the ``rounds`` rounds (r = 1 ... rounds)."""
        per_round = self.iterations // self.rounds
        set_to_none = self.zero_grad == "set_to_none"
        T = len(merged_feats)
        sample_gen = torch.Generator().manual_seed(self.seed + 1)
        noise_gen = torch.Generator().manual_seed(self.seed + 2)
        streams = [_IndexStream(f.shape[0], self.batch_size, sample_gen) for f in merged_feats]
        stochastic = self.kind == "probsurgery"
        wrapped.train()

        total = self.iterations * self.batches_per_iteration * T
        curve: list[dict[str, float]] = []
        task_curve: dict[str, list[list[float]]] = {n: [] for n in names}
        # window sums stay on the device (no host sync per step): [loss, l1] and per-task l1
        win = torch.zeros(2, device=fabric.device)
        task_sum = torch.zeros(T, device=fabric.device)
        task_cnt = [0] * T
        win_count = 0
        step = 0
        bar = tqdm(total=total, desc=self.name, disable=not self.progress, leave=False)
        for it in range(self.iterations):
            for t in range(T):
                for _ in range(self.batches_per_iteration):
                    idx = streams[t].next().to(fabric.device)
                    z, target = merged_feats[t][idx], expert_feats[t][idx]
                    noise = None
                    if stochastic:
                        noise = torch.randn(z.shape, generator=noise_gen).to(fabric.device)
                    z_hat, kl = wrapped(z, t, noise)
                    l1 = F.l1_loss(z_hat.float(), target)
                    loss = l1 if kl is None else l1 + self.kl_weight * kl.float().mean()
                    optimizer.zero_grad(set_to_none=set_to_none)
                    fabric.backward(loss)
                    optimizer.step()
                    step += 1
                    win[0] += loss.detach()
                    win[1] += l1.detach()
                    task_sum[t] += l1.detach()
                    task_cnt[t] += 1
                    win_count += 1
                    if step % self.log_every == 0 or step == total:
                        w_loss, w_l1 = (win / win_count).tolist()
                        sums = task_sum.tolist()
                        curve.append({"step": step, "loss": w_loss, "l1": w_l1})
                        for k in range(T):
                            if task_cnt[k]:
                                task_curve[names[k]].append([step, sums[k] / task_cnt[k]])
                        bar.set_postfix(loss=f"{w_loss:.4f}")
                        win.zero_()
                        task_sum.zero_()
                        task_cnt = [0] * T
                        win_count = 0
                    bar.update(1)
            if on_round is not None and (it + 1) % per_round == 0:
                on_round((it + 1) // per_round, step)
                wrapped.train()
        bar.close()
        return step, curve, task_curve

    def _round_selector(self, backbone, merged, bank, merged_feats, expert_feats):
        """(on_round callback, record): scores every round, keeps the best round's modules."""
        record: dict[str, Any] = {"rounds": [], "best": None, "state": None}
        if self.select != "best" or self.rounds == 1:
            return None, record
        if self.selection_split == "test" and self.round_scorer is None:
            raise ValueError("select=best with selection_split=test needs the run's test scorer (featcal-run sets it)")

        def on_round(r: int, step: int) -> None:
            bank.eval()
            with torch.no_grad():
                if self.selection_split == "test":
                    cal = SurgeryCalibratedModel(backbone, merged, bank)
                    try:
                        score = float(self.round_scorer(cal))
                    finally:
                        cal.remove_hooks()
                else:  # minus the mean L1 to the experts on the calibration features
                    p = next(bank.parameters())
                    l1 = [float(F.l1_loss(bank(z.to(p.dtype), t)[0].float(), y)) for t, (z, y) in enumerate(zip(merged_feats, expert_feats))]
                    score = -sum(l1) / len(l1)
            record["rounds"].append({"round": r, "step": step, "score": score})
            if record["best"] is None or score > record["best"]["score"]:
                record["best"] = {"round": r, "step": step, "score": score}
                record["state"] = {k: v.detach().clone() for k, v in bank.state_dict().items()}

        return on_round, record

    # ---- calibration -------------------------------------------------------
    def calibrate(
        self,
        backbone: Backbone,
        merged: nn.Module,
        base: nn.Module,
        experts: list[nn.Module],
        calibration: list[list[Inputs]],
        device: torch.device | str = "cpu",
    ) -> SurgeryCalibratedModel:
        t0 = time.perf_counter()
        T = self.check_inputs(experts, calibration)
        names = list(backbone.tasks) if len(backbone.tasks) == T else [str(i) for i in range(T)]
        fabric = _resolve_fabric(self.accelerator, self.devices, self.precision, device)

        merged_feats, expert_feats = self._cache(fabric, backbone, merged, experts, calibration)
        t_cache = time.perf_counter() - t0

        dim = merged_feats[0].shape[-1]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            bank = SurgeryBank(self.kind, dim, self.hidden, 1 if self.shared else T)
        optimizer = torch.optim.Adam(bank.parameters(), lr=self.lr, betas=self.betas, weight_decay=self.weight_decay)
        wrapped, optimizer = fabric.setup(bank, optimizer)

        # The modules are tiny (a [16, D] minibatch through a D→h→D MLP): on CPU, intra-op
        # threads only add hand-off cost, so the loop runs single-threaded (restored after).
        on_round, record = self._round_selector(backbone, merged, bank, merged_feats, expert_feats)
        with torch_threads(1 if fabric.device.type == "cpu" else None):
            step, curve, task_curve = self._train(fabric, wrapped, optimizer, merged_feats, expert_feats, names, on_round)
        if record["state"] is not None:
            bank.load_state_dict(record["state"])
        t_train = time.perf_counter() - t0 - t_cache

        bank.eval()
        before, after = {}, {}
        with torch.no_grad():
            for t in range(T):
                z, target = merged_feats[t], expert_feats[t]
                before[names[t]] = float(F.l1_loss(z, target))
                z_hat, _ = bank(z.to(next(bank.parameters()).dtype), t)
                after[names[t]] = float(F.l1_loss(z_hat.float(), target))

        report = CalibrationReport(
            method=self.name,
            loss_curve=curve,
            settings={
                "shared": self.shared,
                "hidden": self.hidden,
                "kl_weight": self.kl_weight,
                "iterations": self.iterations,
                "batches_per_iteration": self.batches_per_iteration,
                "batch_size": self.batch_size,
                "lr": self.lr,
                "seed": self.seed,
                "precision": self.precision,
                "zero_grad": self.zero_grad,
                "rounds": self.rounds,
                "select": self.select,
                "selection_split": self.selection_split if self.select == "best" else None,
            },
            timings={"cache": t_cache, "train": t_train, "total": time.perf_counter() - t0},
            extra={
                "num_modules": len(bank.blocks),
                "dim": int(dim),
                "trainable_parameters": int(sum(p.numel() for p in bank.parameters())),
                "steps": step,
                "examples_per_task": {names[t]: int(merged_feats[t].shape[0]) for t in range(T)},
                "task_loss_curve": task_curve,
                "l1_before": before,
                "l1_after": after,
                "l1_before_mean": sum(before.values()) / T if T else math.nan,
                "l1_after_mean": sum(after.values()) / T if T else math.nan,
                "device": str(fabric.device),
                "round_scores": record["rounds"],
                "selected_round": record["best"]["round"] if record["best"] else self.rounds,
                "test_selected": bool(self.needs_test_scorer),
            },
        )
        calibrated = SurgeryCalibratedModel(backbone, merged, bank, report)
        return calibrated


class Surgery(_SurgeryBase):
    """Representation Surgery: per-task down(D→16) → ReLU → up(16→D, zero init), ẑ = z − up(relu(down(z)))."""

    kind = "surgery"
    name = "surgery"

    def __init__(self, hidden: int = 16, shared: bool = False, **kwargs):
        super().__init__(hidden=hidden, shared=shared, kl_weight=0.0, **kwargs)


class ProbSurgery(_SurgeryBase):
    """Probabilistic Surgery: μ / log σ² heads; train on one sample + 1e-4·KL, infer ẑ = z − μ."""

    kind = "probsurgery"
    name = "probsurgery"

    def __init__(self, hidden: int = 128, shared: bool = False, kl_weight: float = 1e-4, **kwargs):
        super().__init__(hidden=hidden, shared=shared, kl_weight=kl_weight, **kwargs)


__all__ = [
    "attach_correction",
    "load_surgery",
    "ProbSurgery",
    "ProbSurgeryModule",
    "Surgery",
    "SurgeryBank",
    "SurgeryCalibratedModel",
    "SurgeryModule",
]
