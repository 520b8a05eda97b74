"""Where FeatCal's in-memory walk keeps the models (featcal.calibration.feature_calibration.driver):
the decision with mocked free device memory, and the CPU walk under every placement."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from featcal.calibration.feature_calibration import driver
from featcal.calibration.feature_calibration.driver import FeatCal
from featcal.calibration.feature_calibration.in_memory import choose_placement, models_bytes

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "experiments"))

GIB = 2**30
pytestmark = pytest.mark.usefixtures("one_thread")


def test_choose_placement():
    cuda = torch.device("cuda")
    # ViT-B/32 x 10 models is about 3.5 GiB
    assert choose_placement(cuda, int(3.5 * GIB), 78 * GIB) == "resident"
    assert choose_placement(cuda, int(3.5 * GIB), 4 * GIB) == "prefetch"  # fits, but not with room to work
    assert choose_placement(cuda, int(3.5 * GIB), None) == "prefetch"  # unknown: the safe way
    assert choose_placement(cuda, 60 * GIB, 100 * GIB) == "resident"
    assert choose_placement(cuda, 61 * GIB, 100 * GIB) == "prefetch"
    for dev in ("cpu", "mps"):  # never moved as a whole: the walk as it always was
        assert choose_placement(torch.device(dev), 1, 100 * GIB) == "host"


def test_models_bytes_counts_what_is_not_on_the_device():
    a, b = torch.nn.Linear(4, 3), torch.nn.Linear(8, 2, bias=False)
    b.register_buffer("stat", torch.zeros(5, dtype=torch.float64))
    assert models_bytes([a, b], torch.device("cuda")) == (12 + 3 + 16) * 4 + 5 * 8
    assert models_bytes([a, b], torch.device("cpu")) == 0


@pytest.fixture(scope="module")
def workload():
    from bench_calibration import build_workload

    return build_workload(2, 8, 0.1, 0, tiny=True)


def _run(workload, monkeypatch=None, placement=None):
    import copy

    backbone, merged, base, experts, calib = workload
    merged = copy.deepcopy(merged)
    if placement is not None:
        monkeypatch.setattr(driver, "choose_placement", lambda *a, **k: placement)
    out = FeatCal(progress=False).calibrate(backbone, merged, base, experts, calib, device="cpu")
    return out


def test_cpu_walk_is_the_host_placement_and_resident_gives_the_same_bits(workload, monkeypatch):
    host = _run(workload)
    assert host.report.extra["placement"] == "host"
    resident = _run(workload, monkeypatch, "resident")
    assert resident.report.extra["placement"] == "resident"
    for (n, a), b in zip(host.model.state_dict().items(), resident.model.state_dict().values()):
        assert torch.equal(a, b), n
    assert [r["drift"] for r in host.report.drift] == [r["drift"] for r in resident.report.drift]
    _, _, base, experts, _ = workload
    assert all(p.device.type == "cpu" for m in (base, *experts, resident.model) for p in m.parameters())


def test_resident_models_go_back_home_on_error(workload, monkeypatch):
    moved = []

    class Spy(driver.Resident):
        def restore(self):
            moved.append(len(self.moves))
            super().restore()

    monkeypatch.setattr(driver, "Resident", Spy)
    monkeypatch.setattr(FeatCal, "_calibrate_in_memory", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        _run(workload, monkeypatch, "resident")
    assert moved == [1 + 1 + 2]  # merged, base and both experts restored
