"""The run's contract, in process, on a tiny CLIP benchmark (local stand-ins, no network):
merge functions that need calibration data, calibrated models that are the family's own
model (FeatCal: a plain Hugging Face folder; Surgery: a forward hook), typed reports."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from tests.fixtures import fake_merges
from tests.fixtures.clip import make_tiny_clip_benchmark
from featcal.merge import task_arithmetic
from featcal.run import run

CONF = Path(__file__).resolve().parents[2] / "conf"
TASKS = ("mnist", "eurosat")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bench(tmp_path_factory, one_thread):
    return make_tiny_clip_benchmark(tmp_path_factory.mktemp("bench"), tasks=TASKS, n_train=16, n_test=12)


def compose_run(bench, *overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(
            config_name="config",
            return_hydra_config=True,  # the group choices label the run
            overrides=[*bench, "logger=none", "device=cpu", "budget.per_task=8", "budget.batch_size=4",
                       "evaluate_experts=false", "evaluate_base=false", *overrides],
        )


def family(cfg):
    from hydra.utils import instantiate

    adapter = instantiate(cfg.backbone.adapter)
    base = adapter.load_base()
    return adapter, base, adapter.load_experts()


def pixels(seed=0):
    return torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_merge_function_gets_calibration_data_before_merging(bench, tmp_path):
    cfg = compose_run(bench, "calibration=none", "save_calibrated=true")
    with open_dict(cfg):
        cfg.merge = {"_target_": "tests.fixtures.fake_merges.calib_scaled_ta", "_partial_": True}
    fake_merges.CALLS.clear()
    res = run(cfg, tmp_path / "run")
    (call,) = fake_merges.CALLS
    # the run's calibration set: per task budget.per_task examples in batches of budget.batch_size
    assert [sum(b["pixel_values"].shape[0] for b in task) for task in call["calib"]] == [8, 8]
    assert all(b["pixel_values"].shape[0] <= 4 for task in call["calib"] for b in task)
    assert call["backbone"].tasks == list(TASKS) and len(call["expert_models"]) == len(TASKS)
    assert isinstance(call["base_model"], torch.nn.Module) and str(call["device"]) == "cpu"
    # what the merge returned is the model the run evaluated and saved: its λ came from the data
    pos = sum(float((b["pixel_values"] > 0).float().mean()) for task in call["calib"] for b in task)
    lam = 0.1 + 0.4 * pos / sum(len(task) for task in call["calib"])
    assert abs(lam - 0.3) > 1e-3  # not the default task arithmetic by accident
    adapter, base, experts = family(cfg)
    want = task_arithmetic(base.state_dict(), [e.state_dict() for e in experts], scaling_factor=lam)
    from transformers import CLIPVisionModelWithProjection

    saved = CLIPVisionModelWithProjection.from_pretrained(str(tmp_path / "run" / "calibrated_model")).state_dict()
    for k, v in want.items():
        torch.testing.assert_close(saved[k], v)
    assert res["calibration"] == "none" and res["score"]["calibrated"] == res["score"]["merged"]


def test_featcal_saves_a_plain_hf_model_that_differs_from_the_merged_one(bench, tmp_path):
    cfg = compose_run(bench, "calibration=featcal", "calibration.progress=false", "save_calibrated=true")
    res = run(cfg, tmp_path / "run")
    from transformers import CLIPVisionModelWithProjection

    calibrated = CLIPVisionModelWithProjection.from_pretrained(str(tmp_path / "run" / "calibrated_model")).eval()
    adapter, base, experts = family(cfg)
    merged = adapter.with_state_dict(base, task_arithmetic(base.state_dict(), [e.state_dict() for e in experts], scaling_factor=0.3))
    from hydra.utils import instantiate

    pool = instantiate(cfg.backbone.taskpool)
    gap_cal = gap_merged = 0.0
    with torch.no_grad():
        for t, expert in enumerate(experts):  # held-out test images of each task
            x = next(iter(pool.tasks[t].test_batches(12)))[0]["pixel_values"]
            z_cal, z_merged, z_exp = (m(pixel_values=x).image_embeds for m in (calibrated, merged, expert))
            assert not torch.allclose(z_cal, z_merged)
            gap_cal += float((z_cal - z_exp).abs().mean())
            gap_merged += float((z_merged - z_exp).abs().mean())
    assert gap_cal < gap_merged  # closer to each task's expert than the merged model was
    # the report's drift rows: after < before at the last block, for every task
    last = max(r["block"] for r in res["drift"])
    for t in TASKS:
        before = next(r["drift"] for r in res["drift"] if r["task"] == t and r["block"] == last and r["when"] == "before")
        after = next(r["drift"] for r in res["drift"] if r["task"] == t and r["block"] == last and r["when"] == "after")
        assert after < before, t
    assert res["calibration_report"]["method"] == "featcal" and res["calibration_report"]["settings"]["rho"] == 2.2
    assert set(res["metrics"]["calibrated"]) == set(TASKS)
    assert all(res["primary_metric"][t] == "accuracy" for t in TASKS)


def test_surgery_is_a_hook_on_the_merged_model_and_saves_modules(bench, tmp_path):
    cfg = compose_run(bench, "calibration=surgery", "calibration.iterations=30", "calibration.progress=false", "save_calibrated=true")
    res = run(cfg, tmp_path / "run")
    extra = res["calibration_report"]["extra"]
    assert extra["l1_after_mean"] < extra["l1_before_mean"]
    assert res["loss_curve"][-1]["loss"] < res["loss_curve"][0]["loss"]
    from featcal.calibration.surgery_model import load_surgery

    adapter, base, experts = family(cfg)
    merged = adapter.with_state_dict(base, task_arithmetic(base.state_dict(), [e.state_dict() for e in experts], scaling_factor=0.3))
    x = pixels(1)
    with torch.no_grad():
        z_merged = merged(pixel_values=x).image_embeds
        cal = load_surgery(tmp_path / "run" / "surgery", adapter, merged)
        outs = []
        for t in range(len(TASKS)):
            model = cal.model_for_task(t)
            assert type(model) is type(merged)  # the family's own model, hooked
            z = model(pixel_values=x).image_embeds
            # the hook applies module t to the representation: ẑ = z − b_t(z)
            torch.testing.assert_close(z, z_merged - cal.surgery.blocks[t](z_merged)[0])
            assert not torch.allclose(z, z_merged)
            outs.append(z)
        assert not torch.allclose(outs[0], outs[1])  # routed by task
        cal.remove_hooks()
        torch.testing.assert_close(merged(pixel_values=x).image_embeds, z_merged)
