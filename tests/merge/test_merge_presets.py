"""Every published number in results/paper/*.csv names (column ``rerun``) the override set
that reruns its source's protocol; each composes with ``hydra.compose``, validates, and
sets the protocol's keys (METHOD.md, "Protocols behind the published baselines")."""
from __future__ import annotations

import csv
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAPER = sorted((ROOT / "results" / "paper").glob("*.csv"))


def _rows():
    out = []
    for f in PAPER:
        for r in csv.DictReader(open(f, newline="")):
            out.append((f.name, r))
    return out


ROWS = _rows()
RERUNS = sorted({r["rerun"] for _, r in ROWS})


def test_every_paper_row_names_its_rerun():
    assert PAPER and ROWS
    missing = [(f, r["method"], r["merge"], r["task"]) for f, r in ROWS if not r.get("rerun", "").strip()]
    assert not missing


def _compose(overrides: list[str], tmp_path: Path):
    from hydra import compose, initialize_config_dir

    overrides = [o.replace("=DIR", f"={tmp_path}") for o in overrides]
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=overrides, return_hydra_config=True)


@pytest.mark.parametrize("rerun", RERUNS)
def test_every_rerun_composes_and_validates(rerun, tmp_path):
    from omegaconf import OmegaConf

    from featcal.config import validate

    cfg = _compose(shlex.split(rerun), tmp_path)
    validate(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]))
    choices = cfg.hydra.runtime.choices
    # the preset sweeps its source's rows; the row's own overrides leave exactly one job
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = [f"{k}={v}" for k, v in cfg.hydra.sweeper.params.items()]
    jobs = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(params + shlex.split(rerun)), None)[0]
    assert len(jobs) == 1, jobs
    for o in shlex.split(rerun):
        key, value = o.split("=", 1)
        if key in ("merge", "calibration", "experiment"):
            assert choices[key] == value


def _cfg(rerun, tmp_path):
    return _compose(shlex.split(rerun), tmp_path)


def test_protocol_keys_of_each_source(tmp_path):
    by = {(f, r["source"].split()[0], r["method"], r["merge"]): r["rerun"] for f, r in ROWS}
    # Surgery paper (CLIP): transductive test data, torch-1.x Surgery, the original TIES trim and AdaMerging
    surgery_ties = _cfg(by[("clip_vit_b32.csv", "Surgery", "surgery", "ties")], tmp_path)
    assert surgery_ties.budget.split == "test" and surgery_ties.budget.per_task == "all"
    assert surgery_ties.calibration.zero_grad == "zeros" and surgery_ties.calibration.iterations == 500
    assert surgery_ties.calibration.batches_per_iteration == 2 and surgery_ties.calibration.select == "final"
    assert surgery_ties.merge.trim_extra_zeros == 25599489 and surgery_ties.merge.density == 0.2
    assert surgery_ties.merge.scaling_factor == 0.3
    # the effective vision-tower density the yaml's comment promises
    assert int(0.2 * (87849216 + 25599489)) / 87849216 == pytest.approx(0.258, abs=5e-4)
    ada = _cfg(by[("clip_vit_b32.csv", "Surgery", "none", "adamerging")], tmp_path)
    assert (ada.merge.steps, ada.merge.batches_per_task, ada.merge.clamp) == (500, 2, True)
    assert ada.budget.split == "test"
    # FeatCal paper (CLIP): this project's protocol
    fc = _cfg(by[("clip_vit_b32.csv", "FeatCal", "surgery", "task_arithmetic")], tmp_path)
    assert fc.budget.split == "train" and fc.budget.per_task == 256
    assert fc.calibration.zero_grad == "set_to_none" and fc.calibration.select == "final"
    # FusionBench (FLAN-T5): its scoring and the keep_vars trim
    fb = _cfg(by[("flan_t5_glue.csv", "FusionBench", "none", "ties")], tmp_path)
    assert fb.backbone.taskpool.stsb_gold == "text" and fb.backbone.taskpool.max_new_tokens == 9
    assert dict(fb.merge.trim_count) == {"shared.weight": 3} and fb.merge.density == 0.2
    own = _cfg(by[("flan_t5_glue.csv", "FeatCal", "featcal", "task_arithmetic")], tmp_path)
    assert own.backbone.taskpool.get("stsb_gold", "raw") == "raw" and own.backbone.taskpool.max_new_tokens == 10


@pytest.mark.parametrize("name", ["ties_mergebench", "task_arithmetic_mergebench", "adamerging_fusionbench",
                                  "ties_fusionbench_t5", "ties_surgery_clip", "adamerging_original"])
def test_merge_protocol_options_compose(name, tmp_path):
    from hydra.utils import instantiate

    from featcal.config import validate

    from omegaconf import OmegaConf

    cfg = _compose([f"merge={name}"], tmp_path)
    validate(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]))
    fn = instantiate(cfg.merge)
    kw = fn.params  # the record bound to the preset's parameters
    if name == "ties_mergebench":
        assert (kw["density"], kw["scaling_factor"], list(kw["trim_also"])) == (0.3, 0.4, ["lm_head.weight"])
    if name == "task_arithmetic_mergebench":
        assert kw["scaling_factor"] == 0.4
    if name == "adamerging_fusionbench":
        assert (kw["steps"], kw["batches_per_task"], kw["clamp"]) == (1000, 1, False)


def test_probsurgery_original_protocol_selects_on_test_and_says_so(tmp_path):
    from hydra.utils import instantiate

    cfg = _compose(["calibration=probsurgery_original_protocol", "budget.split=test", "budget.per_task=all"], tmp_path)
    cal = instantiate(cfg.calibration)
    assert (cal.iterations, cal.batches_per_iteration, cal.rounds) == (5000, 1, 50)
    assert cal.zero_grad == "zeros" and cal.select == "best" and cal.selection_split == "test"
    assert cal.needs_test_scorer and cal.selection_label == "+test-selected"
    bad = _compose(["calibration=probsurgery", "calibration.rounds=7"], tmp_path)
    from featcal.config import validate
    from featcal.errors import ConfigError

    from omegaconf import OmegaConf

    with pytest.raises(ConfigError, match="rounds=7"):
        validate(OmegaConf.masked_copy(bad, [k for k in bad if k != "hydra"]))


@pytest.mark.slow  # one in-process run of the small embedded benchmark
def test_test_selected_runs_are_labelled_in_results_and_tables(tmp_path):
    """A best-of-rounds run selected on the test split says so: the calibration label in
    results.json, the per-task table rows and the long CSV carry ``+test-selected``, and
    ``calibration_report.extra`` the flag and every round's score."""
    import json

    import pandas as pd
    from omegaconf import OmegaConf

    from featcal.run import run

    cfg = _compose(["backbone=embedded_small", "calibration=probsurgery", "calibration.iterations=4",
                    "calibration.batches_per_iteration=1", "calibration.rounds=2", "calibration.select=best",
                    "calibration.progress=false", "budget.per_task=8", "logger=none", "evaluate_experts=false",
                    "evaluate_base=false"], tmp_path)
    res = run(cfg, tmp_path / "run")
    assert res["calibration"] == "probsurgery+test-selected"
    extra = res["calibration_report"]["extra"]
    assert extra["test_selected"] is True and len(extra["round_scores"]) == 2
    assert extra["selected_round"] in (1, 2)
    # the scorer is the run's own test evaluation: the selected round's score is the table's
    best = max(r["score"] for r in extra["round_scores"])
    assert res["score"]["calibrated"]["average"] == pytest.approx(best, abs=1e-9)
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["calibration"] == "probsurgery+test-selected"
    long = pd.read_csv(tmp_path / "run" / "results.csv")  # what featcal-report (and its collect) tabulate
    assert set(long["calibration"]) == {"probsurgery+test-selected"}
    assert OmegaConf.select(cfg, "calibration.selection_split") == "test"
