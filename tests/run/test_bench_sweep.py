"""experiments/bench_sweep.py's sweeps compose: the overrides it times are accepted by the
shipped configs (the timing itself is a script, never a test). A key renamed in conf/ (e.g.
``reference_cache``, once a ``+key`` and now a config key) fails here, not after an hour of
sweeping."""
import importlib
import importlib.util
from pathlib import Path

import pytest

from featcal.config import compose, validate

ROOT = Path(__file__).resolve().parents[2]


def _script():
    spec = importlib.util.spec_from_file_location("bench_sweep", ROOT / "experiments" / "bench_sweep.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("again", [False, True])
def test_every_timed_sweep_composes_and_validates(again):
    variants = _script().sweep_variants(again)
    assert list(variants) == ["before", "after"] + (["again"] if again else [])
    for name, overrides in variants.items():
        # the job's own overrides (the sweeper's are hydra.*, which the compose API does not take)
        job = [o for o in overrides if not o.startswith("hydra.")]
        cfg = compose(["experiment=embedded_table", "logger=none", "device=cpu", "backbone.tasks=[inverted,rot90]", *job])
        validate(cfg)
        # "before" is the old behaviour: every job evaluates the references itself
        assert cfg.reference_cache is (name != "before"), name
    # the sweeper it swaps in for "before" is Hydra's own basic sweeper (every cell of the product)
    sweeper = [o for o in variants["before"] if o.startswith("hydra.sweeper._target_=")]
    target = sweeper[0].split("=", 1)[1]
    module, _, cls = target.rpartition(".")
    assert getattr(importlib.import_module(module), cls).__name__ == "BasicSweeper"
