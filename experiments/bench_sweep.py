"""Wall-clock and CPU time of a preset sweep before and after the reference-evaluation
cache and the job de-duplication, measured in one run of this script.

- ``before``: Hydra's basic sweeper (every cell of the cross product, ``calibration=none``
  once per budget) and ``reference_cache=false`` (experts and base evaluated in every job):
  the previous behaviour;
- ``after``: the preset as it is (``featcal.sweeper.DedupSweeper``; reference cache on),
  starting from an EMPTY reference cache: the first sweep on a backbone;
- ``again`` (optional, ``--again``): the same sweep once more into a new folder: a later
  sweep that finds every reference stored.

Every sweep runs ``python -m featcal.run`` in a subprocess with a private ``FEATCAL_CACHE``
whose ``embedded/`` links to the shared, already built suite (the build is not timed).
CPU time is the children's user + system time (robust on a shared machine); wall-clock
is disturbed by other processes.

    python experiments/bench_sweep.py                       # embedded_table, calibration none,featcal, 2 tasks
    python experiments/bench_sweep.py --calibration none,featcal,surgery,probsurgery --tasks all

Writes results/bench_sweep.md and .json.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def sweep(args: list[str], env: dict, cwd: Path) -> dict:
    c0, t0 = _cpu(), time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "featcal.run", *args], env=env, cwd=cwd, capture_output=True, text=True)
    wall, cpu = time.perf_counter() - t0, _cpu() - c0
    if proc.returncode != 0:
        raise RuntimeError(f"sweep failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return {"wall_s": wall, "cpu_s": cpu, "log": proc.stdout + proc.stderr}


def sweep_variants(again: bool = False) -> dict[str, list[str]]:
    """The overrides of each timed sweep on top of the preset's (``tests/run/test_bench_sweep.py``
    composes them, so a renamed config key fails there, not after an hour of sweeping)."""
    variants = {
        "before": ["hydra.sweeper._target_=hydra._internal.core_plugins.basic_sweeper.BasicSweeper", "reference_cache=false"],
        "after": [],
    }
    if again:
        variants["again"] = []
    return variants


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="embedded_table")
    p.add_argument("--calibration", default="none,featcal", help="the preset's calibration sweep (full: none,featcal,surgery,probsurgery)")
    p.add_argument("--tasks", default="inverted,rot90", help="backbone.tasks subset, or 'all'")
    p.add_argument("--again", action="store_true", help="also time a later sweep that finds every reference stored")
    p.add_argument("--out", default=str(ROOT / "results" / "bench_sweep"))
    a = p.parse_args(argv)

    shared = Path(os.environ.get("FEATCAL_CACHE") or Path.home() / ".cache" / "featcal")
    common = [f"experiment={a.preset}", "logger=none", "device=cpu", f"hydra.sweeper.params.calibration='{a.calibration}'"]
    if a.tasks != "all":
        common.append(f"backbone.tasks=[{a.tasks}]")
    variants = sweep_variants(a.again)
    rows = {}
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as tmp:
        tmp = Path(tmp)
        cache = tmp / "cache"
        cache.mkdir()
        if (shared / "embedded").is_dir():
            (cache / "embedded").symlink_to(shared / "embedded")
        env = dict(os.environ, FEATCAL_CACHE=str(cache), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"),
                   PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), HYDRA_FULL_ERROR="1")
        for name, extra in variants.items():
            folder = tmp / f"sweep-{name}"
            r = sweep([*common, *extra, f"hydra.sweep.dir={folder}"], env, tmp)
            results = [json.loads(f.read_text()) for f in sorted(folder.glob("*/results.json"))]
            r["jobs"] = len(results)
            r["reference_cache"] = sorted({json.dumps(x.get("reference_cache", {}), sort_keys=True) for x in results})
            r["reference_eval_s"] = sum(x["timings"].get("evaluate_experts", 0) + x["timings"].get("evaluate_base", 0) for x in results)
            r["scores"] = {(x["calibration"], str(x["budget"])): x["score"]["calibrated"]["average"] for x in results}
            rows[name] = r
            print(f"{name:6s}: {r['jobs']} jobs, wall {r['wall_s']:.1f} s, CPU {r['cpu_s']:.1f} s, "
                  f"reference evaluations {r['reference_eval_s']:.1f} s", flush=True)
    b, f = rows["before"], rows["after"]
    # the same numbers wherever the same cell ran in both
    for key, v in f["scores"].items():
        if key in b["scores"] and b["scores"][key] != v:
            raise AssertionError(f"score of {key} differs: before {b['scores'][key]} after {v}")
    ratio_wall, ratio_cpu = f["wall_s"] / b["wall_s"], f["cpu_s"] / b["cpu_s"]
    print(f"after / before: wall-clock {ratio_wall:.2f}x, CPU time {ratio_cpu:.2f}x")
    load = os.getloadavg()
    lines = [
        "# Preset sweep before / after the reference cache and job de-duplication (bench_sweep.py)",
        "",
        f"`featcal-run experiment={a.preset}` with `calibration={a.calibration}`, tasks {a.tasks}, CPU, "
        f"one run of `python experiments/bench_sweep.py {' '.join(argv or sys.argv[1:])}`; "
        f"load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (2 cores shared with other processes: "
        "wall-clock is disturbed, CPU time much less).",
        "",
        "| sweep | jobs | wall-clock (s) | CPU time (s) | expert + base evaluation (s, summed over jobs) | reference_cache in results.json |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['jobs']} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {r['reference_eval_s']:.1f} | "
                     f"{'; '.join(r['reference_cache'])} |")
    lines += ["", f"**after / before: wall-clock {ratio_wall:.2f}x, CPU time {ratio_cpu:.2f}x** "
              "(every cell that ran in both sweeps has the same average score)."]
    if "again" in rows:
        g = rows["again"]
        lines.append(f"A later sweep (every reference stored): wall-clock {g['wall_s'] / b['wall_s']:.2f}x, "
                     f"CPU time {g['cpu_s'] / b['cpu_s']:.2f}x of before.")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(
        {k: {kk: vv for kk, vv in v.items() if kk not in ("log", "scores")} for k, v in rows.items()}
        | {"ratio_wall": ratio_wall, "ratio_cpu": ratio_cpu}, indent=2) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
