"""This project's FeatCal against the authors' code, parameter by parameter, and which of the
two is off when they differ.

Workload: ``experiments/bench_calibration.py``'s (ViT-B/32-shaped tower, ``--experts``
random experts, ``--n`` random images per task). Four calibrations of the same Task
Arithmetic merge:

* ``official``: the official code (``--official-src``, a checkout of
  github.com/egangu/featcal, imported as ``featcal_official``) on the float32 models;
* ``official-fp64``: the official code on float64 copies of every model and image (its
  statistics and its LayerNorm solves then run in float64; its linear solves stay float32,
  as it hard-codes them);
* ``featcal``: this project's FeatCal with ``conf/calibration/featcal.yaml`` (float32);
* ``featcal-fp64solve``: the same with ``dtype: float64`` (float64 solves).

For each pair it prints the worst block tensors by max|θ_a − θ_b| / max|θ_b|. If the
official float32 result is far from its own float64 result while this project's float32
result is close to it, the gap between the two implementations is the official code's
float32 rounding, not a different method.

    python experiments/featcal_official_parity.py --official-src /tmp/featcal-official --experts 2 --n 16
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

import bench_calibration as bench  # noqa: E402  (the workload and the official adapter)


def ours(backbone, merged, base, experts, calibration, **overrides):
    import torch

    calibrator = bench.make_calibrator("featcal", overrides)
    return calibrator.calibrate(backbone, copy.deepcopy(merged), base, experts, calibration,
                                device=torch.device("cpu")).model


def worst(backbone, a, b, top: int) -> list[tuple[float, str]]:
    import torch

    diffs = bench.param_differences(bench.block_params(backbone, a, torch.float64),
                                    bench.block_params(backbone, b, torch.float64))
    return sorted(((value, key) for key, value in diffs.items()), reverse=True)[:top]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official-src", required=True, metavar="DIR")
    parser.add_argument("--experts", type=int, default=2)
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--top", type=int, default=4)
    args = parser.parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")

    backbone, merged, base, experts, calibration = bench.build_workload(args.experts, args.n, 0.1, args.seed, args.tiny)
    adapter = bench.OfficialCalibrator(args.official_src, args.n)
    runs = {"official": adapter.calibrate(backbone, copy.deepcopy(merged), base, experts, calibration, "cpu").model}
    as64 = [copy.deepcopy(m).double() for m in (merged, base, *experts)]
    images64 = [[b.double() for b in task] for task in calibration]
    runs["official-fp64"] = adapter.calibrate(backbone, as64[0], as64[1], as64[2:], images64, "cpu").model
    runs["featcal"] = ours(backbone, merged, base, experts, calibration)
    runs["featcal-fp64solve"] = ours(backbone, merged, base, experts, calibration, dtype="float64")

    print(f"workload: {'tiny' if args.tiny else 'ViT-B/32-shaped'} tower, {args.experts} experts, n={args.n} per task")
    for a, b in [("official", "featcal"), ("official", "official-fp64"), ("featcal", "official-fp64"),
                 ("featcal", "featcal-fp64solve")]:
        rows = worst(backbone, runs[a], runs[b], args.top)
        print(f"{a} vs {b}: max {rows[0][0]:.2e}; worst tensors: "
              + ", ".join(f"{name} {value:.1e}" for value, name in rows))


if __name__ == "__main__":
    main()
