"""The cost of pinned (portable) suite builds and of parallel expert training, from one run.

Part 1, the pin: each suite's base step (task data + ``--steps`` pre-training steps of the
default spec) in a child process with 1 thread, under three kernel settings, CPU seconds
(``time.process_time`` of the step, imports excluded):

* ``native``: this CPU's own kernels (the build before issue 27);
* ``pinned``: ``featcal.suites.build.PINNED_ENV`` (AVX2) + oneDNN/NNPACK off (the portable build);
* ``baseline``: the x86-64 baseline, ATen default kernels, MKL_CBWR=COMPATIBLE, oneDNN/NNPACK
  off (a pin that would hold on CPUs without AVX2 too; the alternative not taken).

The ratios pinned/native and baseline/native are the build-time cost of each pin (CPU time:
the machine may be shared; wall-clock ratios would measure the other jobs).

Part 2 (``--workers``): a whole small build (``embedded_small`` or ``embedded_t5_small``)
with 1 and with N pinned workers, wall-clock and the files' content hash (equal).

Part 3 (``--breakdown N``): where the pinned pre-training child's time goes, in one pinned
1-thread child building the default ``embedded`` spec's base with N pre-training steps: CPU
seconds (``time.process_time``, robust on a shared machine) of the task splits, the
pre-training inputs, the per-batch augmentation, the model forward (loss), the backward,
gradient clipping, the AdamW step, the rest of the loop (Python, scheduler, batches), the
zero-shot heads and saving. Scaled to the spec's own step count for the estimate of a cold
build's pre-training.

Part 4 (``--threads-check N``): the base of ``embedded_small`` (N pre-training steps) built in
a pinned child with 1 and with 2 intra-op threads: CPU and wall seconds and whether every
file's sha256 is the same (it is not: a 2-thread pin would be a new build version).

    python experiments/bench_suite_build.py --steps 30
    python experiments/bench_suite_build.py --steps 0 --workers 2 --suite embedded_small
    python experiments/bench_suite_build.py --steps 0 --breakdown 40
    python experiments/bench_suite_build.py --steps 0 --threads-check 100
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
    "pinned": None,  # featcal.suites.build.PINNED_ENV
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
    from featcal.suites.build import _pin_torch
    _pin_torch()
torch.set_num_threads(1)
if suite == "embedded":
    import featcal.suites.embedded.build as m
    spec = m.EmbeddedSpec(pretrain_steps=steps)
else:
    import featcal.suites.embedded_t5.build as m
    spec = m.EmbeddedT5Spec(pretrain_steps=steps)
m.preload()
with tempfile.TemporaryDirectory() as tmp:
    c0 = time.process_time()
    m._build_base(spec.to_dict(), tmp, "cpu", False)
    cpu = time.process_time() - c0
print(json.dumps({"cpu": cpu, "capability": torch.backends.cpu.get_cpu_capability()}))
"""


BREAKDOWN_CHILD = r"""
import json, sys, time, tempfile
import torch
from featcal.suites.build import _pin_torch
_pin_torch()
import featcal.suites.embedded.build as m
import featcal.suites.embedded.data as d
import featcal.utils as fu
steps = int(sys.argv[1])
spec = m.EmbeddedSpec(pretrain_steps=steps)
full_steps = m.EmbeddedSpec().pretrain_steps
m.preload()
cpu = {}
in_loop = [False]
def timed(key, fn, loop_key=None):
    def inner(*a, **k):
        name = loop_key if (loop_key and in_loop[0]) else key
        c0 = time.process_time()
        try:
            return fn(*a, **k)
        finally:
            cpu[name] = cpu.get(name, 0.0) + time.process_time() - c0
    return inner
def loop_flag(fn):
    def inner(*a, **k):
        in_loop[0] = True
        try:
            return fn(*a, **k)
        finally:
            in_loop[0] = False
    return inner
m.make_task_data = timed("task splits", m.make_task_data)
m.pretraining_data = timed("pre-training inputs", m.pretraining_data)
d._jitter = timed("augmentation (per batch)", d._jitter)
m._embed = timed("zero-shot heads + test embeddings", m._embed)
m.train_adamw = timed("training loop (all)", loop_flag(m.train_adamw))
torch.Tensor.backward = timed("backward", torch.Tensor.backward)
torch.nn.utils.clip_grad_norm_ = timed("gradient clipping", torch.nn.utils.clip_grad_norm_)
torch.optim.AdamW.step = timed("AdamW step", torch.optim.AdamW.step)
m.ClassEmbeddingHead  # noqa
orig_forward = None
from transformers import CLIPVisionModelWithProjection
CLIPVisionModelWithProjection.forward = timed("model forward (outside the loop)", CLIPVisionModelWithProjection.forward, "model forward")
CLIPVisionModelWithProjection.save_pretrained = timed("saving", CLIPVisionModelWithProjection.save_pretrained)
with tempfile.TemporaryDirectory() as tmp:
    c0, w0 = time.process_time(), time.time()
    m._build_base(spec.to_dict(), tmp, "cpu", False)
    total, wall = time.process_time() - c0, time.time() - w0
print(json.dumps({"cpu": cpu, "total": total, "wall": wall, "steps": steps, "full_steps": full_steps,
                  "threads": torch.get_num_threads(), "capability": torch.backends.cpu.get_cpu_capability()}))
"""

THREADS_CHILD = r"""
import hashlib, json, sys, time, tempfile
from pathlib import Path
import torch
from featcal.suites.build import _pin_torch
_pin_torch()
threads, steps, conf = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
torch.set_num_threads(threads)
import featcal.suites.embedded.build as m
from omegaconf import OmegaConf
node = OmegaConf.to_container(OmegaConf.load(conf).spec)
node["pretrain_steps"] = steps
spec = m.EmbeddedSpec.from_config(node)
m.preload()
with tempfile.TemporaryDirectory() as tmp:
    c0, w0 = time.process_time(), time.time()
    m._build_base(spec.to_dict(), tmp, "cpu", False)
    cpu, wall = time.process_time() - c0, time.time() - w0
    sha = {str(p.relative_to(tmp)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(tmp).rglob("*")) if p.is_file()}
print(json.dumps({"threads": torch.get_num_threads(), "cpu": cpu, "wall": wall, "sha256": sha}))
"""


def breakdown(steps: int) -> None:
    env = child_env("pinned")
    proc = subprocess.run([sys.executable, "-c", BREAKDOWN_CHILD, str(steps)], env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(proc.stderr[-3000:])
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    cpu = r["cpu"]
    loop = cpu.pop("training loop (all)", 0.0)
    print(f"pinned base step, default embedded spec with {r['steps']} pre-training steps ({r['capability']}, "
          f"{r['threads']} thread): {r['total']:.1f} CPU s, {r['wall']:.1f} s wall; load average {os.getloadavg()[0]:.1f}")
    print("| part | CPU s | per step (ms) | share of the loop |")
    print("|---|---:|---:|---:|")
    loop_rows = ["augmentation (per batch)", "model forward", "backward", "gradient clipping", "AdamW step"]
    for k in loop_rows:
        v = cpu.get(k, 0.0)
        print(f"| {k} | {v:.2f} | {1e3 * v / max(r['steps'], 1):.1f} | {v / max(loop, 1e-9):.1%} |")
    rest = loop - sum(cpu.get(k, 0.0) for k in loop_rows)
    print(f"| rest of the loop (Python, scheduler, index batches, loss) | {rest:.2f} | {1e3 * rest / max(r['steps'], 1):.1f} | {rest / max(loop, 1e-9):.1%} |")
    print(f"| **training loop** | {loop:.2f} | {1e3 * loop / max(r['steps'], 1):.1f} | 100% |")
    for k in ("task splits", "pre-training inputs", "zero-shot heads + test embeddings", "saving"):
        print(f"| {k} (once) | {cpu.get(k, 0.0):.2f} | | |")
    per_step = loop / max(r["steps"], 1)
    print(f"estimate for the spec's {r['full_steps']} steps: training loop {per_step * r['full_steps']:.0f} CPU s, "
          f"of which arithmetic (forward, backward, clipping, AdamW) "
          f"{sum(cpu.get(k, 0.0) for k in loop_rows[1:]) / max(loop, 1e-9):.1%}")


def threads_check(steps: int, suite: str) -> None:
    conf = str(ROOT / "conf" / "backbone" / f"{suite}.yaml")
    res = {}
    for t in (1, 2):
        env = dict(child_env("pinned"), OMP_NUM_THREADS=str(t), MKL_NUM_THREADS=str(t))
        proc = subprocess.run([sys.executable, "-c", THREADS_CHILD, str(t), str(steps), conf], env=env,
                              capture_output=True, text=True)
        if proc.returncode:
            sys.exit(proc.stderr[-3000:])
        res[t] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"  {suite} base, {steps} pre-training steps, {res[t]['threads']} thread(s): {res[t]['cpu']:.1f} CPU s, "
              f"{res[t]['wall']:.1f} s wall", flush=True)
    same = {k: res[1]["sha256"][k] == res[2]["sha256"].get(k) for k in res[1]["sha256"]}
    print(f"files with the same sha256 at 1 and 2 threads: {sum(same.values())}/{len(same)}; differing: "
          f"{[k for k, v in same.items() if not v]}; wall 2 threads / 1 thread {res[2]['wall'] / res[1]['wall']:.2f} "
          f"(load average {os.getloadavg()[0]:.1f})")


def child_env(setting: str) -> dict[str, str]:
    from featcal.suites.build import PINNED_ENV

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
    ap.add_argument("--suite", default="embedded_small", help="part 2's and 4's build (a conf/backbone name)")
    ap.add_argument("--breakdown", type=int, default=0, metavar="N", help="part 3: N pre-training steps (0: skip)")
    ap.add_argument("--threads-check", type=int, default=0, metavar="N", help="part 4: N pre-training steps (0: skip)")
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
    if args.breakdown:
        breakdown(args.breakdown)
    if args.threads_check:
        threads_check(args.threads_check, args.suite)
    if args.workers:
        from omegaconf import OmegaConf

        node = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "backbone" / f"{args.suite}.yaml").spec)
        if args.suite.startswith("embedded_t5"):
            import featcal.suites.embedded_t5.build as m

            spec = m.EmbeddedT5Spec.from_config(node)
        else:
            import featcal.suites.embedded.build as m

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
