"""Loggers are instantiated by ``_target_`` (issue 22, part 7): featcal.run knows no logger
by name, so a logger class plugged in by ``logger._target_`` is used exactly as W&B is."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.fixtures.wandb_records import finished_results
from featcal.utils import atomic_write_json

ROOT = Path(__file__).resolve().parents[2]
CALLS: list[tuple] = []


class RecordingLogger:
    """A logger class of the kind ``conf/logger/*.yaml`` point at; it records what it is asked."""

    record_key = "recording"

    def __init__(self, label: str = "x", **_):
        self.label = label

    @classmethod
    def validate_config(cls, node):
        return [] if isinstance(node.get("label", "x"), str) else [f"label={node['label']!r}: a string"]

    def needs_backfill(self, done, run_dir):
        CALLS.append(("needs_backfill", done.get(self.record_key)))
        return done.get(self.record_key) is None

    def start(self, run_dir, config, *, name, group, config_hash, tags, job_type):
        CALLS.append(("start", name, config_hash, tuple(tags), job_type))
        return RecordingRun(self.label)


class RecordingRun:
    record_key = "recording"

    def __init__(self, label):
        self.label, self.logged = label, None

    def log_results(self, results, artifacts):
        CALLS.append(("log_results", results["score"]["calibrated"]["average"], sorted(artifacts)))

    def finish(self):
        CALLS.append(("finish",))

    def record(self):
        return {"label": self.label, "status": "logged"}

    def outcome(self):
        return f"recording logger: {self.label}"


def _compose(overrides):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=list(overrides))
    return OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))


def test_every_logger_config_names_its_class():
    from hydra.utils import get_class

    from featcal.run import _build

    for yaml in sorted((ROOT / "conf" / "logger").glob("*.yaml")):
        cfg = _compose([f"logger={yaml.stem}"])
        assert "_target_" in cfg.logger, yaml
        obj = _build(cfg.logger)
        assert isinstance(obj, get_class(cfg.logger._target_))
        for attr in ("start", "needs_backfill", "validate_config"):
            assert callable(getattr(obj, attr)), (yaml, attr)
        assert obj.validate_config(OmegaConf.to_container(cfg.logger)) == []


def test_no_logger_name_tests_in_the_package():
    pattern = re.compile(r"logger\.name|logger\.get\(\s*[\"']name|logger\[[\"']name")
    hits = [f"{p}:{i}" for p in (ROOT / "featcal").rglob("*.py")
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert hits == []


def test_a_logger_plugged_in_by_target_is_used_like_wandb(tmp_path, capsys):
    """A finished run whose results the plugged-in logger never received: featcal.run asks
    the class (needs_backfill), starts it, logs the stored results and records them under
    its own key -- and a bad value of its own key is reported by its validate_config."""
    from featcal import run as run_mod
    from featcal.config import validate
    from featcal.errors import ConfigError
    from featcal.resume import config_hash

    target = f"{__name__}.RecordingLogger"
    cfg = _compose(["backbone=embedded_small", "budget.per_task=8", "logger=none", f"logger._target_={target}",
                    "+logger.label=mine"])
    with pytest.raises(ConfigError, match=r"logger\.label=3: a string"):
        validate(_compose(["backbone=embedded_small", "logger=none", f"logger._target_={target}", "+logger.label=3"]))
    res = {**finished_results(), "config": OmegaConf.to_container(cfg), "config_hash": config_hash(cfg)}
    out = tmp_path / "job"
    out.mkdir()
    atomic_write_json(out / "results.json", res)
    CALLS.clear()
    run_mod.run(cfg, out)
    assert [c[0] for c in CALLS] == ["needs_backfill", "start", "log_results", "finish"]
    assert CALLS[1][2] == config_hash(cfg) and CALLS[1][4] == "run" and "embedded_small" in CALLS[1][3]
    assert CALLS[2][1:] == (75.0, ["results"])
    stored = json.loads((out / "results.json").read_text())
    assert stored["recording"] == {"label": "mine", "status": "logged"} and "wandb" not in stored
    assert "recording logger: mine" in capsys.readouterr().out
    CALLS.clear()
    run_mod.run(cfg, out)  # recorded now: the class says no backfill
    assert CALLS == [("needs_backfill", {"label": "mine", "status": "logged"})]
