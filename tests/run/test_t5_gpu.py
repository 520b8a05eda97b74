"""The T5 path on a CUDA GPU (marker ``gpu``; skipped where no CUDA device exists;
FEATCAL_TEST_GPU_DEVICE=cpu runs it on the CPU to check the test), on the tiny offline T5
world of ``tests/fixtures/t5.py`` (fixtures ``w`` and ``models``)."""
from __future__ import annotations

import copy
import os

import numpy as np
import pandas as pd
import pytest
import torch

from tests.fixtures.t5 import EXPERT_TASKS
from tests.fixtures.t5 import glue_pool as _pool


GPU_DEVICE = os.environ.get("FEATCAL_TEST_GPU_DEVICE") or ("cuda" if torch.cuda.is_available() else None)


@pytest.mark.gpu
@pytest.mark.skipif(GPU_DEVICE is None, reason="needs a CUDA device (marker gpu; FEATCAL_TEST_GPU_DEVICE=cpu checks the test)")
def test_t5_calibrators_and_scoring_on_the_gpu(w, models, tmp_path):
    """Device-clean T5 path: answers, FeatCal (fp32: equal to the CPU result; bf16: finite
    and lowering the final drift), Surgery and the GLUE scorer on the work device while the
    models live on the CPU."""
    from featcal.calibration.feature_calibration import FeatCal
    from featcal.calibration.surgery import Surgery
    from featcal.merge import task_arithmetic

    dev = torch.device(GPU_DEVICE)
    bb, base, experts = models
    merged = bb.merge(task_arithmetic, base, experts)
    pool = _pool(w, tmp_path)
    raw = pool.calibration_set(8, 0, 4)
    calib = bb.prepare_calibration(merged, base, experts, raw, "cpu")
    on_dev = bb.prepare_calibration(merged, base, experts, raw, dev)
    assert all(next(e.parameters()).device.type == "cpu" for e in experts)  # moved back home
    same = [torch.equal(a["decoder_input_ids"], b["decoder_input_ids"]) for ta, tb in zip(calib, on_dev) for a, b in zip(ta, tb)]
    assert np.mean(same) >= 0.75

    ref = FeatCal(progress=False, inplace=False).calibrate(bb, merged, base, experts, calib, "cpu").model_for_task(0)
    got = FeatCal(progress=False, inplace=False).calibrate(bb, merged, base, experts, calib, dev).model_for_task(0)
    for k, v in ref.state_dict().items():
        assert torch.allclose(got.state_dict()[k].cpu(), v, atol=2e-3, rtol=2e-3), k

    half = [copy.deepcopy(m).to(torch.bfloat16) for m in (merged, base, *experts)]
    out = FeatCal(progress=False, inplace=False).calibrate(bb, half[0], half[1], half[2:], calib, dev)
    assert all(torch.isfinite(p.float()).all() for p in out.model_for_task(0).parameters())
    rows = pd.DataFrame(out.report.drift)
    last = rows[rows.block == rows.block.max()].groupby("when")["drift"].mean()
    assert last["after"] < last["before"]

    cal = Surgery(iterations=3, progress=False).calibrate(bb, merged, base, experts, calib, dev)
    cal.to(dev)
    scores = pool.evaluate(cal.model_for_task, dev, batch_size=4)
    assert set(scores) == set(EXPERT_TASKS)
    cal.to("cpu")
    cal.remove_hooks()
    cpu_scores = pool.evaluate(lambda i: experts[i], "cpu", 4)
    dev_scores = pool.evaluate(lambda i: experts[i], dev, 4)
    for t in EXPERT_TASKS:
        for metric, value in cpu_scores[t].items():
            assert dev_scores[t][metric] == pytest.approx(value, abs=10.0), t
    assert all(next(e.parameters()).device.type == "cpu" for e in experts)
