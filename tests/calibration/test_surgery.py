"""Surgery and ProbSurgery on a tiny CLIP vision tower (no network).

Base + 3 perturbed experts are saved to tmp folders and loaded back through
CLIPVisionBackbone; the merged model is task arithmetic (λ = 0.3).
"""
from __future__ import annotations


from pathlib import Path

import pytest
import torch
from torch import nn

from featcal.backbone.clip import CLIPVisionBackbone
from featcal.calibration.surgery import ProbSurgery, Surgery
from featcal.calibration.surgery_model import ProbSurgeryModule, SurgeryBank, SurgeryModule, load_surgery
from featcal.merge import task_arithmetic

TASKS = ["a", "b", "c"]
IMAGE = 32
N_PER_TASK = 24
BATCH = 8
FAST = dict(iterations=40, batches_per_iteration=2, log_every=20, progress=False, accelerator="cpu")


def _tiny_clip(seed: int):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=IMAGE,
        patch_size=8,
        projection_dim=24,
    )
    return CLIPVisionModelWithProjection(cfg).eval()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("tiny_clip")
    base = _tiny_clip(0)
    base.save_pretrained(root / "base")
    expert_dirs = []
    g = torch.Generator().manual_seed(1)
    for i, t in enumerate(TASKS):
        expert = _tiny_clip(0)
        with torch.no_grad():
            for p in expert.parameters():
                p.add_(0.08 * torch.randn(p.shape, generator=g))
        expert.save_pretrained(root / t)
        expert_dirs.append(str(root / t))
    backbone = CLIPVisionBackbone(TASKS, base=str(root / "base"), experts=expert_dirs)
    base_m = backbone.load_base()
    experts = backbone.load_experts()
    merged_sd = task_arithmetic(base_m.state_dict(), [e.state_dict() for e in experts], scaling_factor=0.3)
    gi = torch.Generator().manual_seed(2)
    calib = [
        [torch.randn(BATCH, 3, IMAGE, IMAGE, generator=gi) + 0.5 * k for _ in range(N_PER_TASK // BATCH)]
        for k in range(len(TASKS))
    ]
    return backbone, base_m, experts, merged_sd, calib


def _merged(backbone, base_m, merged_sd):
    return backbone.with_state_dict(base_m, merged_sd)


def _calibrate(calibrator, setup):
    backbone, base_m, experts, merged_sd, calib = setup
    merged = _merged(backbone, base_m, merged_sd)
    return calibrator.calibrate(backbone, merged, base_m, experts, calib, "cpu")


def _l1(backbone, represent, experts, calib):
    out = []
    for t, expert in enumerate(experts):
        vals = []
        for x in calib[t]:
            with torch.no_grad():
                vals.append((represent(x, t) - backbone.represent(expert, x)).abs().mean())
        out.append(float(torch.stack(vals).mean()))
    return out


# ------------------------------------------------------------------- modules


@pytest.mark.parametrize("cls,hidden", [(SurgeryModule, 16), (ProbSurgeryModule, 128)])
def test_modules_start_as_identity(cls, hidden):
    bank_kind = "surgery" if cls is SurgeryModule else "probsurgery"
    bank = SurgeryBank(bank_kind, 24, hidden, 3)
    z = torch.randn(5, 24)
    for t in range(3):
        z_hat, _ = bank(z, t)
        assert torch.equal(z_hat, z)
    # the first layer is default-initialised (non-zero), the output layer(s) zero, no biases
    for m in bank.modules():
        if isinstance(m, nn.Linear):
            assert m.bias is None
    assert bank.blocks[0].down.weight.abs().sum() > 0


def test_probsurgery_sample_and_kl():
    mod = ProbSurgeryModule(6, 8)
    with torch.no_grad():
        mod.mu.weight.normal_()
        mod.logvar.weight.normal_(std=0.1)
    z = torch.randn(4, 6)
    eps = torch.randn(4, 6)
    b, kl = mod(z, eps)
    h = torch.relu(mod.down(z))
    mu, lv = mod.mu(h), mod.logvar(h)
    assert torch.allclose(b, mu + torch.exp(0.5 * lv) * eps)
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(mu, torch.exp(0.5 * lv)), torch.distributions.Normal(0.0, 1.0)
    ).sum(-1)
    assert torch.allclose(kl, expected, atol=1e-5)
    b0, kl0 = mod(z)
    assert kl0 is None and torch.allclose(b0, mu)


# ------------------------------------------------------------- calibration


def test_identity_at_init_equals_merged(setup):
    backbone, base_m, experts, merged_sd, calib = setup
    for calibrator in (Surgery(iterations=0, **{k: v for k, v in FAST.items() if k != "iterations"}),
                       ProbSurgery(iterations=0, **{k: v for k, v in FAST.items() if k != "iterations"})):
        cal = _calibrate(calibrator, setup)
        assert cal.report.extra["steps"] == 0
        plain = _merged(backbone, base_m, merged_sd)
        for t in range(len(TASKS)):
            x = calib[t][0]
            assert torch.equal(cal.represent(x, t), backbone.represent(plain, x))
            assert cal.report.extra["l1_before"][TASKS[t]] == pytest.approx(cal.report.extra["l1_after"][TASKS[t]])


@pytest.mark.parametrize("cls", [Surgery, ProbSurgery])
def test_training_reduces_l1_for_every_task(cls, setup):
    backbone, base_m, experts, merged_sd, calib = setup
    merged = _merged(backbone, base_m, merged_sd)
    before = _l1(backbone, lambda x, t: backbone.represent(merged, x), experts, calib)
    cal = _calibrate(cls(**{**FAST, "iterations": 100}), setup)
    after = _l1(backbone, cal.represent, experts, calib)
    assert cal.report.extra["steps"] == 100 * 2 * len(TASKS)
    assert cal.report.extra["num_modules"] == len(TASKS)
    for t in range(len(TASKS)):
        assert after[t] < 0.8 * before[t], (t, before, after)
        assert cal.report.extra["l1_after"][TASKS[t]] == pytest.approx(after[t], rel=1e-4)
        assert cal.report.extra["l1_before"][TASKS[t]] == pytest.approx(before[t], rel=1e-4)
    curve = cal.report.loss_curve
    assert curve[-1]["step"] == cal.report.extra["steps"]
    assert curve[-1]["l1"] < curve[0]["l1"]
    assert cal.report.timings["total"] > 0
    import json

    json.dumps(cal.report.to_dict())  # JSON-friendly


def test_probsurgery_inference_is_deterministic(setup):
    backbone, base_m, experts, merged_sd, calib = setup
    cal = _calibrate(ProbSurgery(**FAST), setup)
    x = calib[1][0]
    a, b = cal.represent(x, 1), cal.represent(x, 1)
    assert torch.equal(a, b)
    # and it is z − μ (the μ head has moved away from zero)
    z = backbone.represent(_merged(backbone, base_m, merged_sd), x)
    mu, _ = cal.surgery.blocks[1](z)
    assert mu.abs().max() > 0
    assert torch.allclose(a, z - mu)


def test_shared_variant_trains_one_module(setup):
    backbone, base_m, experts, merged_sd, calib = setup
    cal = _calibrate(ProbSurgery(shared=True, **FAST), setup)
    assert len(cal.surgery.blocks) == 1 and cal.report.extra["num_modules"] == 1
    assert cal.report.settings["shared"] is True
    assert cal.surgery.blocks[0].mu.weight.abs().sum() > 0
    x = calib[0][0]
    outs = [cal.represent(x, t) for t in range(len(TASKS))]
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    n_params = sum(p.numel() for p in cal.surgery.parameters())
    assert cal.report.extra["trainable_parameters"] == n_params == 3 * 24 * 128
    assert cal.report.extra["l1_after_mean"] < cal.report.extra["l1_before_mean"]


@pytest.mark.parametrize("cls", [Surgery, ProbSurgery])
def test_same_seed_same_result(cls, setup):
    a = _calibrate(cls(seed=3, **FAST), setup)
    b = _calibrate(cls(seed=3, **FAST), setup)
    c = _calibrate(cls(seed=4, **FAST), setup)
    sa, sb, sc = a.surgery.state_dict(), b.surgery.state_dict(), c.surgery.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a.report.loss_curve == b.report.loss_curve
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


@pytest.mark.parametrize("cls", [Surgery, ProbSurgery])
def test_save_load_round_trip(cls, setup, tmp_path):
    backbone, base_m, experts, merged_sd, calib = setup
    cal = _calibrate(cls(**FAST), setup)
    folder = cal.save(tmp_path / "surgery")
    assert {p.name for p in folder.iterdir()} == {"surgery_modules.safetensors", "surgery_config.json", "calibration_report.json"}
    loaded = load_surgery(folder, backbone, _merged(backbone, base_m, merged_sd))
    plain = _merged(backbone, base_m, merged_sd)
    assert len(loaded.surgery.blocks) == len(TASKS)
    for t in range(len(TASKS)):
        x = calib[t][0]
        assert torch.equal(loaded.represent(x, t), cal.represent(x, t))
        assert not torch.equal(loaded.represent(x, t), backbone.represent(plain, x))


def test_model_for_task_hooks_the_family_model(setup):
    """model_for_task(t) is the merged CLIPVisionModelWithProjection itself: its forward
    (image_embeds), the adapter's represent and the hook's formula agree; the hook
    follows the latest task index and goes away with remove_hooks()."""
    backbone, base_m, experts, merged_sd, calib = setup
    cal = _calibrate(Surgery(**FAST), setup)
    plain = _merged(backbone, base_m, merged_sd)
    x = calib[0][0]
    with torch.no_grad():
        z = plain(pixel_values=x).image_embeds
        for t in range(len(TASKS)):
            model = cal.model_for_task(t)
            assert model is cal.model and type(model) is type(plain)
            want = z - cal.surgery.blocks[t](z)[0]
            torch.testing.assert_close(model(pixel_values=x).image_embeds, want)
            torch.testing.assert_close(backbone.represent(model, x), want)
        with pytest.raises(IndexError):
            cal.model_for_task(len(TASKS))
        cal.remove_hooks()
        torch.testing.assert_close(cal.model(pixel_values=x).image_embeds, z)


def test_input_site_hook_corrects_the_first_input():
    from featcal.calibration.surgery_model import attach_correction

    lin = nn.Linear(4, 3)
    x = torch.randn(2, 4)
    handle = attach_correction(lin, "input", lambda v: v * 0)
    assert torch.equal(lin(x), lin.bias.expand(2, 3))
    handle.remove()
    with pytest.raises(ValueError, match="output"):
        attach_correction(lin, "middle", lambda v: v)


class _CountingBackbone(CLIPVisionBackbone):
    def __init__(self, inner: CLIPVisionBackbone):
        super().__init__(inner.tasks, inner.base_source, [inner.expert_sources[t] for t in inner.tasks])
        self.calls = 0

    def represent(self, model, inputs):
        self.calls += 1
        return super().represent(model, inputs)


def test_features_are_cached_not_recomputed_per_step(setup):
    backbone, base_m, experts, merged_sd, calib = setup
    counts = []
    for iterations in (5, 50):
        counting = _CountingBackbone(backbone)
        cal = Surgery(**{**FAST, "iterations": iterations}).calibrate(
            counting, _merged(backbone, base_m, merged_sd), base_m, experts, calib, "cpu"
        )
        assert cal.report.extra["steps"] == iterations * 2 * len(TASKS)
        counts.append(counting.calls)
    n_batches = sum(len(b) for b in calib)
    # merged + expert representation of every calibration batch, exactly once
    assert counts == [2 * n_batches, 2 * n_batches]


def test_hydra_configs_instantiate_with_defaults():
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    conf = Path(__file__).resolve().parents[2] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        s, p, ps, po = (
            instantiate(compose(config_name="config", overrides=[f"calibration={name}"]).calibration)
            for name in ("surgery", "probsurgery", "probsurgery_shared", "probsurgery_original")
        )
    assert isinstance(s, Surgery) and s.hidden == 16 and not s.shared
    assert (s.iterations, s.batches_per_iteration, s.batch_size, s.lr) == (500, 2, 16, 1e-3)
    assert s.betas == (0.9, 0.999) and s.weight_decay == 0.0 and s.precision == "32-true"
    assert isinstance(p, ProbSurgery) and p.hidden == 128 and p.kl_weight == 1e-4 and not p.shared
    assert isinstance(ps, ProbSurgery) and ps.shared and ps.hidden == 128
    # default ProbSurgery: Surgery's schedule; the original: 50 rounds x 100 batches per
    # task, tasks alternating one batch at a time = 5000 iterations of 1 batch per task
    assert (p.iterations, p.batches_per_iteration) == (500, 2)
    assert isinstance(po, ProbSurgery) and not po.shared and po.kl_weight == 1e-4
    assert (po.iterations, po.batches_per_iteration) == (5000, 1)


def test_fabric_bf16_mixed_and_auto_accelerator(setup):
    # accelerator "auto" follows the device handed to calibrate; bf16 autocast trains fp32 modules
    opts = {**FAST, "accelerator": "auto", "precision": "bf16-mixed"}
    cal = _calibrate(Surgery(**opts), setup)
    assert cal.report.extra["device"] == "cpu" and cal.report.settings["precision"] == "bf16-mixed"
    assert next(cal.surgery.parameters()).dtype == torch.float32
    for t in TASKS:
        assert cal.report.extra["l1_after"][t] < cal.report.extra["l1_before"][t]


def test_misaligned_inputs_are_rejected():
    import torch.nn as nn

    from featcal.calibration.base import Calibrator

    with pytest.raises(ValueError, match="2 experts but 1 calibration sets"):
        Calibrator.check_inputs([nn.Linear(1, 1), nn.Linear(1, 1)], [[torch.zeros(1)]])
    with pytest.raises(ValueError, match="at least one calibration batch"):
        Calibrator.check_inputs([nn.Linear(1, 1)], [[]])


def test_schedule_keys_give_alternating_or_blocked_task_order(setup, monkeypatch):
    """batches_per_iteration = 1: tasks alternate one batch at a time (ProbSurgery's
    original order); > 1: that many consecutive batches per task (Surgery's)."""
    calls = []
    original = SurgeryBank.forward

    def recording(self, z, task_index, noise=None):
        if self.training:
            calls.append(task_index)
        return original(self, z, task_index, noise)

    monkeypatch.setattr(SurgeryBank, "forward", recording)
    opts = {**FAST, "log_every": 1000}
    _calibrate(ProbSurgery(**{**opts, "iterations": 3, "batches_per_iteration": 1}), setup)
    assert calls == [0, 1, 2] * 3
    calls.clear()
    _calibrate(ProbSurgery(**{**opts, "iterations": 1, "batches_per_iteration": 3}), setup)
    assert calls == [0, 0, 0, 1, 1, 1, 2, 2, 2]


# ---- protocol options: optimiser semantics and best-of-rounds (METHOD.md, "Protocols") ----
#
# A toy problem with a hand-written reference: the modules' forward and Adam written out
# from their equations, with the originals' torch 1.x ``zero_grad()`` (zero gradients kept:
# a parameter that has had a gradient takes an Adam step with g = 0 whenever any task
# steps) or today's ``set_to_none`` (only the stepping task's parameters move).


class _ToyBackbone:
    """represent(model, x) = model(x): the 'encoders' are fixed Linear maps."""

    def __init__(self, tasks):
        self.tasks = list(tasks)

    def represent(self, model, inputs):
        return model(inputs)

    def device_of(self, model):
        return next(model.parameters()).device

    def representation_site(self, model):
        return model, "output"


def _toy(num_tasks=3, dim=6, n=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    merged = nn.Linear(dim, dim)
    experts = [nn.Linear(dim, dim) for _ in range(num_tasks)]
    with torch.no_grad():
        for m in [merged] + experts:
            m.weight.copy_(torch.randn(dim, dim, generator=g) / dim ** 0.5)
            m.bias.copy_(0.3 * torch.randn(dim, generator=g))
        for e in experts:  # experts near the merged map
            e.weight.copy_(merged.weight + 0.4 * torch.randn(dim, dim, generator=g) / dim ** 0.5)
    calib = [[torch.randn(n, dim, generator=g) + t] for t in range(num_tasks)]
    return _ToyBackbone([f"t{t}" for t in range(num_tasks)]), merged, experts, calib


def _reference_train(kind, z, y, seed, iterations, bpi, zero_grad, lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
                     hidden=4, kl_weight=1e-4):
    """Surgery / ProbSurgery training written out: full-batch minibatches (batch_size >= n:
    each batch a fresh permutation of the task's rows, drawn from the seeded sampler as the
    calibrator does), the modules' forward by hand, Adam by hand."""
    T, dim = len(z), z[0].shape[1]
    with torch.random.fork_rng(devices=[]):  # the calibrator's seeded init
        torch.manual_seed(seed)
        init = SurgeryBank(kind, dim, hidden, T).state_dict()
    params = [{k.split(".", 2)[2]: v.clone().double().requires_grad_(True) for k, v in init.items() if k.startswith(f"blocks.{t}.")}
              for t in range(T)]
    state = {id(p): {"m": torch.zeros_like(p), "v": torch.zeros_like(p), "step": 0, "has_grad": False}
             for ps in params for p in ps.values()}
    sample_gen = torch.Generator().manual_seed(seed + 1)
    noise_gen = torch.Generator().manual_seed(seed + 2)
    b1, b2 = betas
    for _ in range(iterations):
        for t in range(T):
            for _ in range(bpi):
                idx = torch.randperm(z[t].shape[0], generator=sample_gen)
                zt, yt = z[t][idx].double(), y[t][idx].double()
                p = params[t]
                h = torch.relu(zt @ p["down.weight"].T)
                if kind == "surgery":
                    loss = (zt - h @ p["up.weight"].T - yt).abs().mean()
                else:
                    noise = torch.randn(zt.shape, generator=noise_gen).double()
                    mu, lv = h @ p["mu.weight"].T, h @ p["logvar.weight"].T
                    b = mu + torch.exp(0.5 * lv) * noise
                    kl = 0.5 * (lv.exp() + mu ** 2 - 1 - lv).sum(-1).mean()
                    loss = (zt - b - yt).abs().mean() + kl_weight * kl
                names = list(p)
                grads = dict(zip(names, torch.autograd.grad(loss, [p[k] for k in names])))
                for s in range(T):
                    for name, q in params[s].items():
                        st = state[id(q)]
                        if s == t:
                            g, st["has_grad"] = grads[name], True
                        elif zero_grad == "zeros" and st["has_grad"]:
                            g = torch.zeros_like(q)  # torch 1.x: a zeroed gradient, still a step
                        else:
                            continue  # grad None: Adam skips the parameter
                        st["step"] += 1
                        st["m"] = b1 * st["m"] + (1 - b1) * g
                        st["v"] = b2 * st["v"] + (1 - b2) * g * g
                        m_hat = st["m"] / (1 - b1 ** st["step"])
                        v_hat = st["v"] / (1 - b2 ** st["step"])
                        with torch.no_grad():
                            q -= lr * m_hat / (v_hat.sqrt() + eps)
    return {f"blocks.{t}.{k}": v.detach() for t in range(T) for k, v in params[t].items()}


def _features(merged, experts, calib):
    with torch.no_grad():
        return [merged(c[0]) for c in calib], [e(c[0]) for e, c in zip(experts, calib)]


def _toy_calibrate(cls, toy, **kw):
    bb, merged, experts, calib = toy
    opts = dict(hidden=4, batch_size=64, log_every=5, progress=False, accelerator="cpu", lr=1e-3)
    opts.update(kw)
    return cls(**opts).calibrate(bb, merged, None, experts, calib, "cpu")


@pytest.mark.parametrize("cls,kind", [(Surgery, "surgery"), (ProbSurgery, "probsurgery")])
@pytest.mark.parametrize("zero_grad", ["set_to_none", "zeros"])
def test_optimiser_semantics_equal_a_hand_written_adam(cls, kind, zero_grad):
    toy = _toy()
    z, y = _features(toy[1], toy[2], toy[3])
    out = _toy_calibrate(cls, toy, iterations=12, batches_per_iteration=2, zero_grad=zero_grad, lr=2e-2)
    want = _reference_train(kind, z, y, seed=0, iterations=12, bpi=2, zero_grad=zero_grad, lr=2e-2)
    got = out.surgery.state_dict()
    assert set(got) == set(want)
    worst = max(float((got[k].double() - want[k]).abs().max()) for k in want)
    assert worst < 1e-5, worst  # fp32 training vs the fp64 reference over 72 Adam steps
    other = _reference_train(kind, z, y, seed=0, iterations=12, bpi=2, lr=2e-2,
                             zero_grad="set_to_none" if zero_grad == "zeros" else "zeros")
    assert max(float((got[k].double() - other[k]).abs().max()) for k in want) > 1e-3  # the semantics differ


def test_torch1_semantics_lower_the_toy_l1_like_the_originals():
    """With zero gradients kept, the other tasks' modules keep moving on their momentum:
    on this toy problem the final calibration L1 is below today's (measured: Surgery 0.101
    vs 0.121, as the issue saw 0.327 vs 0.402 on its toy; the exactness is the test above)."""
    toy = _toy(seed=4)
    runs = {zg: _toy_calibrate(Surgery, toy, iterations=40, batches_per_iteration=2, zero_grad=zg, lr=1e-2)
            for zg in ("set_to_none", "zeros")}
    l1 = {zg: r.report.extra["l1_after_mean"] for zg, r in runs.items()}
    assert l1["zeros"] < 0.95 * l1["set_to_none"]
    assert runs["zeros"].report.settings["zero_grad"] == "zeros"


@pytest.mark.parametrize("cls", [Surgery, ProbSurgery])
def test_best_of_rounds_keeps_the_best_rounds_modules(cls):
    """rounds=3 over 30 iterations, select=best on the test split: the run's scorer says
    round 2 is best, so the modules are those after 20 iterations (a separate 20-iteration
    run: the schedule's draws are a prefix)."""
    toy = _toy()
    seen = []

    def scorer(cal):
        seen.append(cal.represent(toy[3][0][0], 0).clone())  # the round's modules are in place
        return [0.2, 0.9, 0.5][len(seen) - 1]

    calibrator = cls(hidden=4, batch_size=64, progress=False, accelerator="cpu", lr=2e-2, iterations=30,
                     batches_per_iteration=1, rounds=3, select="best", selection_split="test")
    assert calibrator.needs_test_scorer and calibrator.selection_label == "+test-selected"
    calibrator.round_scorer = scorer
    bb, merged, experts, calib = toy
    out = calibrator.calibrate(bb, merged, None, experts, calib, "cpu")
    assert len(merged._forward_hooks) == 0  # the rounds' scoring hooks are removed
    prefix = _toy_calibrate(cls, toy, iterations=20, batches_per_iteration=1, lr=2e-2)
    full = _toy_calibrate(cls, toy, iterations=30, batches_per_iteration=1, lr=2e-2)
    for k, v in prefix.surgery.state_dict().items():
        assert torch.equal(out.surgery.state_dict()[k], v), k
    assert any(not torch.equal(full.surgery.state_dict()[k], v) for k, v in prefix.surgery.state_dict().items())
    extra = out.report.extra
    assert [r["score"] for r in extra["round_scores"]] == [0.2, 0.9, 0.5]
    assert extra["selected_round"] == 2 and extra["test_selected"] is True
    assert len(seen) == 3 and not torch.equal(seen[0], seen[2])
    assert torch.equal(out.represent(toy[3][0][0], 0), seen[1])


def test_best_of_rounds_on_the_calibration_split_picks_the_lowest_l1():
    toy = _toy(seed=2)
    z, y = _features(toy[1], toy[2], toy[3])
    out = _toy_calibrate(Surgery, toy, iterations=40, batches_per_iteration=1, lr=5e-2, rounds=4, select="best",
                         selection_split="calibration")
    l1 = []
    for r in (1, 2, 3, 4):
        run = _toy_calibrate(Surgery, toy, iterations=10 * r, batches_per_iteration=1, lr=5e-2)
        l1.append(run.report.extra["l1_after_mean"])
    best = min(range(4), key=lambda i: l1[i]) + 1
    assert out.report.extra["selected_round"] == best and out.report.extra["test_selected"] is False
    assert out.report.extra["l1_after_mean"] == pytest.approx(l1[best - 1], rel=1e-6)
    assert [-s["score"] for s in out.report.extra["round_scores"]] == pytest.approx(l1, rel=1e-6)


def test_round_options_are_validated():
    assert Surgery.validate_config({"iterations": 10, "rounds": 3})
    assert Surgery.validate_config({"zero_grad": "none", "select": "top", "selection_split": "val"})
    assert not Surgery.validate_config({"iterations": 30, "rounds": 3, "zero_grad": "zeros", "select": "best"})
    with pytest.raises(ValueError, match="test scorer"):
        Surgery(hidden=4, iterations=2, rounds=2, select="best", progress=False, accelerator="cpu").calibrate(
            *_toy()[:2], None, _toy()[2], _toy()[3], "cpu")
