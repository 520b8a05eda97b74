"""Config composition of every option in every group, and validation errors."""
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from featcal.config import validate
from featcal.errors import ConfigError

CONF = Path(__file__).resolve().parents[2] / "conf"
GROUPS = ["backbone", "merge", "calibration", "logger", "experiment"]


def options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def compose_cfg(overrides=(), hydra_cfg=False):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=hydra_cfg)


@pytest.mark.parametrize("group", [g for g in GROUPS if g != "experiment"])
def test_every_option_composes(group):
    for opt in options(group):
        cfg = compose_cfg([f"{group}={opt}"])
        assert cfg[group] is not None
        missing = [k for k in OmegaConf.missing_keys(cfg) if not k.startswith("hydra.")]
        if missing:
            # options that need a user-supplied path say so, naming the key
            with pytest.raises(ConfigError, match="required but not set"):
                validate(cfg)
        else:
            validate(cfg)
        if group in ("backbone", "calibration"):
            # objects are selected by _target_ only; the run labels groups from Hydra's choices
            assert "name" not in cfg[group], f"{group}/{opt}.yaml"
        if group in ("merge", "calibration"):  # the node builds its object as the run does
            from featcal.run import _build

            assert _build(cfg[group]) is not None


def test_experiment_presets_compose_with_sweeps():
    for opt in options("experiment"):
        cfg = compose_cfg([f"experiment={opt}"], hydra_cfg=True)
        params = OmegaConf.select(cfg, "hydra.sweeper.params")
        assert params, f"experiment={opt} defines no sweep"


def test_launchers_compose():
    for opt in sorted(p.stem for p in (CONF / "hydra" / "launcher").glob("*.yaml")):
        cfg = compose_cfg([f"hydra/launcher={opt}"], hydra_cfg=True)
        assert "_target_" in cfg.hydra.launcher


def test_defaults_validate():
    cfg = compose_cfg()
    validate(cfg)


def test_seed_reaches_calibrators_by_interpolation():
    for opt in ("surgery", "probsurgery", "probsurgery_shared"):
        cfg = compose_cfg([f"calibration={opt}", "seed=7"])
        assert cfg.calibration.seed == 7


def test_numeric_budget_group_choice_points_to_the_key(monkeypatch, capsys):
    import sys

    from featcal import run as run_module

    monkeypatch.setattr(sys, "argv", ["featcal-run", "budget=32"])
    with pytest.raises(SystemExit) as exit_:
        run_module.main()
    assert exit_.value.code == 2
    assert "budget.per_task=32" in capsys.readouterr().err


@pytest.mark.parametrize(
    "override, key, hint",
    [
        ("budget.per_task=-3", "budget.per_task", "positive integer"),
        ("budget.per_task=0", "budget.per_task", "positive integer"),
        ("budget.per_task=1000000", "budget.per_task", "examples of split 'train'"),
        ("budget.split=val", "budget.split", "allowed: train, test"),
        ("budget.batch_size=0", "budget.batch_size", "positive integer"),
        ("merge.scaling_factor=1.7", "merge.scaling_factor", "(0, 1]"),
        ("merge.scaling_factor=-0.1", "merge.scaling_factor", "(0, 1]"),
        ("device=gpu7", "device", "allowed: auto, cpu"),
        ("precision=fp8", "precision", "allowed: fp32, bf16, fp16"),
        ("seed=-1", "seed", "non-negative"),
        ("logger.mode=sometimes", "logger.mode", "allowed: offline, online, disabled"),
        ("calibration.alpha=1.5", "calibration.alpha", "[0, 1]"),
        ("calibration.lambda_ratio=-1", "calibration.lambda_ratio", ">= 0"),
        ("calibration.pass_tokens=-5", "calibration.pass_tokens", "integer >= 0"),
        ("calibration.drift_examples=2.5", "calibration.drift_examples", "integer >= 0"),
        ("calibration.cross_route=fast", "calibration.cross_route", "allowed: auto, direct, gram"),
        ("calibration=surgery calibration.lr=0", "calibration.lr", "> 0"),
        ("calibration=probsurgery calibration.kl_weight=-1", "calibration.kl_weight", ">= 0"),
        ("calibration=surgery calibration.iterations=0", "calibration.iterations", "positive integer"),
    ],
)
def test_bad_values_name_key_and_allowed(override, key, hint):
    cfg = compose_cfg(override.split())
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    msg = str(err.value)
    assert key in msg and hint in msg


def test_ties_density_and_all_problems_reported_together():
    cfg = compose_cfg(["merge=ties", "merge.density=0", "budget.per_task=-1", "precision=int4"])
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    msg = str(err.value)
    assert "merge.density" in msg and "budget.per_task" in msg and "precision" in msg


def test_budget_all_is_accepted_for_every_calibrator():
    """budget.per_task=all (the whole split) works for FeatCal too: it only costs time and
    memory linear in the examples, so validation does not reject it."""
    from featcal.config import validate

    for cal in ("featcal", "surgery", "probsurgery", "none"):
        validate(compose_cfg([f"calibration={cal}", "budget.per_task=all", "budget.split=test"]))
        validate(compose_cfg([f"calibration={cal}", "budget.per_task=all", "budget.split=train"]))
    with pytest.raises(ConfigError, match="or 'all'"):
        validate(compose_cfg(["budget.per_task=most"]))


def test_ties_merge_func_and_featcal_fast_path_keys_are_validated():
    with pytest.raises(ConfigError) as info:
        validate(compose_cfg(["merge=ties", "merge.merge_func=median", "calibration.block_dtype=fp8",
                              "calibration.gram_tf32=maybe"]))
    msg = str(info.value)
    assert "merge.merge_func='median'" in msg and "calibration.block_dtype='fp8'" in msg
    assert "calibration.gram_tf32='maybe'" in msg
    validate(compose_cfg(["merge=ties", "merge.merge_func=mean", "calibration.block_dtype=tf32",
                          "calibration.gram_tf32=true"]))
