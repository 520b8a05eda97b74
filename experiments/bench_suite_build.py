"""The cost of pinned (portable) suite builds and of parallel expert training, from one run.

Part 1, the pin: each suite's base step (task data + ``--steps`` pre-training steps of the
default spec) in a child process with 1 thread, under three kernel settings, CPU seconds
(``time.process_time`` of the step, imports excluded):

* ``native``: this CPU's own kernels (the build before issue 27);
* ``pinned``: ``featcal.suite_build.PINNED_ENV`` (AVX2) + oneDNN/NNPACK off (the portable build);
* ``baseline``: the x86-64 baseline, ATen default kernels, MKL_CBWR=COMPATIBLE, oneDNN/NNPACK
  off (a pin that would hold on CPUs without AVX2 too; the alternative not taken).

The ratios pinned/native and baseline/native are the build-time cost of each pin (CPU time:
the machine may be shared; wall-clock ratios would measure the other jobs).

Part 2 (``--workers``): a whole small build (``embedded_small`` or ``embedded_t5_small``)
with 1 and with N pinned workers, wall-clock and the files' content hash (equal).

    python experiments/bench_suite_build.py --steps 30
    python experiments/bench_suite_build.py --steps 0 --workers 2 --suite embedded_small
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SETTINGS = {
    "native": {},
    "pinned": None,  # featcal.suite_build.PINNED_ENV
    "baseline": {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE", "DNNL_MAX_CPU_ISA": "SSE41",
                 "ONEDNN_MAX_CPU_ISA": "SSE41"},
}
ISA_VARS = ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "DNNL_MAX_CPU_ISA", "ONEDNN_MAX_CPU_ISA")

CHILD = r"""
import json, sys, time, tempfile
from pathlib import Path
import torch
setting, suite, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
if setting in ("pinned", "baseline"):
    from featcal.suite_build import _pin_torch
    _pin_torch()
torch.set_num_threads(1)
if suite == "embedded":
    import featcal.tasks.embedded_build as m
    spec = m.EmbeddedSpec(pretrain_steps=steps)
else:
    import featcal.tasks.embedded_t5 as m
    spec = m.EmbeddedT5Spec(pretrain_steps=steps)
m.preload()
with tempfile.TemporaryDirectory() as tmp:
    c0 = time.process_time()
    m._build_base(spec.to_dict(), tmp, "cpu", False)
    cpu = time.process_time() - c0
print(json.dumps({"cpu": cpu, "capability": torch.backends.cpu.get_cpu_capability()}))
"""


def child_env(setting: str) -> dict[str, str]:
    from featcal.suite_build import PINNED_ENV

    env = {k: v for k, v in os.environ.items() if k not in ISA_VARS}
    env.update(PINNED_ENV if setting == "pinned" else SETTINGS[setting])
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return env


def base_step_cpu(setting: str, suite: str, steps: int) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, setting, suite, str(steps)], env=child_env(setting),
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30, help="pre-training steps per measurement (0: skip part 1)")
    ap.add_argument("--suites", default="embedded,embedded_t5")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--workers", type=int, default=0, help="part 2: N workers vs 1 (0: skip)")
    ap.add_argument("--suite", default="embedded_small", help="part 2's build (a conf/backbone name)")
    args = ap.parse_args()
    print(f"load average at start: {os.getloadavg()}")
    if args.steps:
        for suite in args.suites.split(","):
            cpu = {}
            for _ in range(args.repeats):  # interleaved, so a change of load hits every setting alike
                for setting in SETTINGS:
                    r = base_step_cpu(setting, suite, args.steps)
                    cpu.setdefault(setting, []).append(r["cpu"])
                    print(f"  {suite:12s} {setting:7s} ({r['capability']}): {r['cpu']:.1f} CPU s", flush=True)
            best = {k: min(v) for k, v in cpu.items()}
            print(f"{suite}: base step ({args.steps} pre-training steps + data), best of {args.repeats}: "
                  + ", ".join(f"{k} {v:.1f} s" for k, v in best.items())
                  + f"; pinned/native {best['pinned'] / best['native']:.2f}, baseline/native {best['baseline'] / best['native']:.2f}")
    if args.workers:
        from omegaconf import OmegaConf

        node = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "backbone" / f"{args.suite}.yaml").spec)
        if args.suite.startswith("embedded_t5"):
            import featcal.tasks.embedded_t5 as m

            spec = m.EmbeddedT5Spec.from_config(node)
        else:
            import featcal.tasks.embedded_build as m

            spec = m.EmbeddedSpec.from_config(node)
        res = {}
        with tempfile.TemporaryDirectory() as tmp:
            for w in (1, args.workers):
                t0 = time.time()
                man = m.build(spec, Path(tmp) / f"w{w}", progress=False, workers=w)
                res[w] = (time.time() - t0, man["content_hash"], man["build_seconds"])
                print(f"  {args.suite} with {w} worker(s): {res[w][0]:.1f} s wall, content {res[w][1]}, "
                      f"steps {json.dumps({k: round(v, 1) for k, v in res[w][2].items()})}", flush=True)
        w = args.workers
        print(f"{args.suite}: {w} workers / 1 worker wall-clock {res[w][0] / res[1][0]:.2f}; "
              f"same files: {res[w][1] == res[1][1]}")


if __name__ == "__main__":
    main()
