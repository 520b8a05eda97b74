"""FLAN-T5 / GLUE presets: the published numbers reach the comparison script, and the
experiment and LoRA presets compose and validate (no network, no model loaded)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tests.fixtures.t5 import TASKS


def test_paper_numbers_reach_the_comparison_script(tmp_path):
    from featcal.report import paper as mod  # featcal-report paper

    rows = []  # the run's long CSV: one row per (stage, task, metric), primary marked
    for bb in ("flan_t5_base_glue", "flan_t5_base_glue_lora16"):
        for merge, cal in (("task_arithmetic", "featcal"), ("ties", "none"), ("task_arithmetic", "none")):
            for t in TASKS:
                metric = "spearman" if t == "stsb" else "accuracy"
                for stage, value in (("merged", 70.0), ("calibrated", 80.0), ("experts", 85.0)):
                    value = value + 8.0 if t == "stsb" else value
                    meta = dict(run_dir=f"{bb}-{merge}-{cal}", backbone=bb, merge=merge, calibration=cal, budget=256, task=t, stage=stage)
                    rows.append(dict(meta, metric=metric, value=value, primary=True))
                    rows.append(dict(meta, metric="unparseable", value=999.0, primary=False))  # not a primary metric
    sweep = tmp_path / "results.csv"
    pd.DataFrame(rows).to_csv(sweep, index=False)
    assert mod.main([str(sweep), "--csv-out", str(tmp_path / "m.csv")]) == 0
    m = pd.read_csv(tmp_path / "m.csv", keep_default_na=False)
    ours = m[m.task == "average"].set_index(["backbone", "method", "merge"])["ours"]
    assert ours[("flan_t5_base_glue", "featcal", "task_arithmetic")] == pytest.approx(80.0 + 8.0 / 8)  # STS-B's Spearman counts
    assert (m[m.task == "average"]["tasks"] == 8).all()
    avg = pd.to_numeric(m[m.task == "average"].set_index(["backbone", "method", "merge"])["paper"], errors="coerce")
    assert avg[("flan_t5_base_glue", "featcal", "task_arithmetic")] == pytest.approx(85.2)
    assert avg[("flan_t5_base_glue", "none", "task_arithmetic")] == pytest.approx(78.9)
    assert avg[("flan_t5_base_glue", "none", "ties")] == pytest.approx(79.9)
    assert avg[("flan_t5_base_glue", "experts", "")] == pytest.approx(86.4)
    assert avg[("flan_t5_base_glue_lora16", "none", "task_arithmetic")] == pytest.approx(77.4)
    assert avg[("flan_t5_base_glue_lora16", "none", "ties")] == pytest.approx(77.5)
    assert avg[("flan_t5_base_glue_lora16", "experts", "")] == pytest.approx(84.6)
    assert np.isnan(avg[("flan_t5_base_glue_lora16", "featcal", "task_arithmetic")])  # no published LoRA FeatCal number
    text = (tmp_path / "results_vs_paper.md").read_text()
    assert "75.70" in text  # the base model: listed as a reference


def test_flan_t5_presets_compose():
    from hydra import compose, initialize_config_dir
    from pathlib import Path

    from featcal.config import validate

    conf = str(Path(__file__).resolve().parents[2] / "conf")
    with initialize_config_dir(conf, version_base="1.3"):
        table = compose("config", overrides=["experiment=flan_t5_glue_table"], return_hydra_config=True)
        budget = compose("config", overrides=["experiment=flan_t5_glue_budget"], return_hydra_config=True)
        lora = compose("config", overrides=["backbone=flan_t5_base_glue_lora16", "budget.per_task=256"])
    assert table.backbone.adapter.base == "google/flan-t5-base" and table.budget.per_task == 256
    params = table.hydra.sweeper.params
    assert set(params.merge.split(",")) == {"weight_average", "task_arithmetic", "ties"}
    assert set(params.calibration.split(",")) == {"none", "featcal", "surgery", "probsurgery"}
    assert [int(b) for b in budget.hydra.sweeper.params["budget.per_task"].split(",")] == [8, 16, 32, 64, 128, 256]
    assert lora.backbone.adapter.lora is True
    assert dict(lora.backbone.adapter.experts) == {t: f"tanganke/flan-t5-base_glue-{t}_lora-16" for t in TASKS}
    assert lora.backbone.taskpool.tasks == TASKS
    validate(lora)  # hub ids are not touched by validation
