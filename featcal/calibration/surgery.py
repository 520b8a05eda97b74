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
``budget.split``; a calibrator only sees batches. The modules, their bank and the
calibrated model that hooks them in (saved, loaded) are in ``surgery_model.py``.
"""
from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from featcal.backbone.base import Backbone, Inputs, move_inputs
from featcal.calibration.base import CalibrationReport, Calibrator
from featcal.calibration.surgery_model import SurgeryBank, SurgeryCalibratedModel
from featcal.utils import torch_threads

ZERO_GRAD = ("set_to_none", "zeros")
SELECT = ("final", "best")
SELECTION_SPLITS = ("test", "calibration")

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
    #: training minibatch rows (the cached features are per calibration example)
    memory_knobs = {"batch_size": "half"}

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


__all__ = ["ProbSurgery", "Surgery"]
