"""Host memory and wall-clock of in-memory vs streaming merge + FeatCal as a Llama grows.

A Llama is built from a config (random weights) at growing depth and width; T experts are
the base plus small random task vectors; everything is saved as sharded safetensors. Each
configuration is then measured in a FRESH subprocess per mode, so the peak RSS
(``ru_maxrss``) is that configuration's own:

- ``in-memory``: base + experts loaded, merged in memory (task arithmetic), FeatCal with
  every model in memory (the reference merging code's way);
- ``streaming``: lazy safetensors models, streamed merge to disk, layer-streamed FeatCal
  with the merged model on disk too (blocks read and written one at a time; block l + 1
  of every model loads in a background thread while block l computes, calibrated blocks
  are written by another thread);
- ``streaming-seq``: the same with ``FeatCal(prefetch=False)``: the sequential walk (the
  previous behaviour; the same numbers bit for bit).

Wall-clock and CPU time (user + system of the process, all threads) are both reported:
on a shared machine the wall-clock is disturbed by other processes.

Peak RSS is reported above the process's RSS after imports (the Python/torch baseline).
The streaming curve should stay flat in depth (a few blocks + activations); the in-memory
one grows with (experts + 2) models.

    python experiments/bench_llm_memory.py                      # default sizes (a few minutes)
    python experiments/bench_llm_memory.py --depths 2,4,8 --widths 128,256

Writes results/bench_llm_memory.{md,csv,png}.
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
VOCAB = 512


def _config(depth: int, hidden: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=int(hidden * 2.75), num_hidden_layers=depth,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
    )


def build(folder: Path, depth: int, hidden: int, tasks: int) -> None:
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(_config(depth, hidden)).eval()
    base.save_pretrained(folder / "base", max_shard_size="16MB")
    sd = base.state_dict()
    for t in range(tasks):
        g = torch.Generator().manual_seed(100 + t)
        with torch.no_grad():
            for k, p in base.named_parameters():
                if ".layers." in k:
                    p.copy_(sd[k] + 0.02 * torch.randn(p.shape, generator=g))
        base.save_pretrained(folder / f"expert{t}", max_shard_size="16MB")
        base.load_state_dict(sd)


def measure(folder: Path, mode: str, tasks: int, n: int, seq: int, batch: int) -> dict:
    import functools

    import torch

    from featcal.backbone.llama import LlamaBackbone
    from featcal.calibration.feature_calibration import FeatCal
    from featcal.merge import task_arithmetic
    from featcal.merge.streaming import merge_models

    torch.set_num_threads(1)
    names = [f"t{t}" for t in range(tasks)]
    experts = {f"t{t}": str(folder / f"expert{t}") for t in range(tasks)}
    g = torch.Generator().manual_seed(0)
    calib = [
        [{"input_ids": torch.randint(0, VOCAB, (batch, seq), generator=g)} for _ in range(n // batch)] for _ in range(tasks)
    ]
    ta = functools.partial(task_arithmetic, scaling_factor=0.3)
    # warm-up: the imports and kernels every mode needs, so the baseline holds them
    import featcal.io.lazy  # noqa: F401
    import featcal.calibration.feature_calibration.streamed  # noqa: F401
    import featcal.merge.streaming  # noqa: F401
    from transformers import LlamaForCausalLM

    tiny = LlamaForCausalLM(_config(1, 64)).eval()
    with torch.no_grad():
        tiny(torch.zeros(1, 4, dtype=torch.long))
    del tiny
    baseline = _rss_now_mib()
    start = time.perf_counter()
    cpu0 = time.process_time()
    if mode == "in-memory":
        bb = LlamaBackbone(names, base=str(folder / "base"), experts=experts)
    else:
        bb = LlamaBackbone(names, base=str(folder / "base"), experts=experts, streaming=True, merged_on_disk=True,
                           merge_dir=str(folder / "merged"))
    base = bb.load_base()
    exs = bb.load_experts()
    merged = merge_models(ta, bb, base, exs)
    t_merge = time.perf_counter() - start
    fc = FeatCal(progress=False, drift_examples=0, pass_tokens=0, output_dir=str(folder / "calibrated"),
                 prefetch=mode != "streaming-seq")
    out = fc.calibrate(bb, merged, base, exs, calib)
    wall = time.perf_counter() - start
    cpu = time.process_time() - cpu0
    assert out.report.drift == []
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"mode": mode, "baseline_mib": baseline, "peak_rss_mib": peak, "peak_above_baseline_mib": peak - baseline,
            "merge_s": t_merge, "wall_s": wall, "cpu_s": cpu}


def _rss_now_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _child(args: list[str]) -> dict:
    # a fixed glibc mmap threshold: large tensors are always mmapped and returned to the OS
    # on free (glibc's dynamic threshold otherwise moves them into the heap after the first
    # free, where freed blocks stay resident and peak RSS creeps with the number of blocks
    # allocated in turn); the same setting for both modes
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="1048576",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{args} failed:\n{proc.stderr[-3000:]}")
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    return json.loads(lines[-1]) if lines else {}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depths", default="4,8,16,32", help="depth series (at --hidden)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--widths", default="128,512", help="extra widths at --width-depth")
    p.add_argument("--width-depth", type=int, default=8)
    p.add_argument("--tasks", type=int, default=3)
    p.add_argument("--n", type=int, default=8, help="calibration examples per task")
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--out", default=str(ROOT / "results" / "bench_llm_memory"))
    p.add_argument("--_build", nargs=4, help=argparse.SUPPRESS)
    p.add_argument("--_measure", nargs=2, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a._build:
        build(Path(a._build[0]), int(a._build[1]), int(a._build[2]), int(a._build[3]))
        return 0
    if a._measure:
        print(json.dumps(measure(Path(a._measure[0]), a._measure[1], a.tasks, a.n, a.seq, a.batch)))
        return 0

    configs = [(int(d), a.hidden) for d in a.depths.split(",") if d]
    configs += [(a.width_depth, int(w)) for w in a.widths.split(",") if w and (a.width_depth, int(w)) not in configs]
    rows = []
    for depth, hidden in configs:
        with tempfile.TemporaryDirectory(prefix="bench-llm-") as tmp:
            folder = Path(tmp)
            _child(["--_build", str(folder), str(depth), str(hidden), str(a.tasks)])
            size = sum(f.stat().st_size for f in (folder / "base").glob("*.safetensors")) / 2**20
            for mode in ("in-memory", "streaming", "streaming-seq"):
                r = _child(["--_measure", str(folder), mode, "--tasks", str(a.tasks), "--n", str(a.n), "--seq", str(a.seq), "--batch", str(a.batch)])
                r.update(depth=depth, hidden=hidden, model_mib=size)
                rows.append(r)
                print(f"depth {depth:3d} hidden {hidden:4d} model {size:7.1f} MiB  {mode:9s}  peak RSS +{r['peak_above_baseline_mib']:7.1f} MiB  "
                      f"wall {r['wall_s']:6.1f} s  CPU {r['cpu_s']:6.1f} s", flush=True)
    _report(rows, Path(a.out), a)
    return 0


def _report(rows: list[dict], out: Path, a) -> None:
    import pandas as pd

    out.parent.mkdir(parents=True, exist_ok=True)
    df = pd.DataFrame(rows)
    df.to_csv(out.with_suffix(".csv"), index=False)
    lines = [
        "# Host memory of in-memory vs streaming merge + FeatCal (bench_llm_memory.py)",
        "",
        f"Llama from config, random weights, CPU, fp32; {a.tasks} experts, n = {a.n} per task, "
        f"sequence {a.seq}, batch {a.batch}; task arithmetic then FeatCal. Peak RSS above the "
        "process's RSS after imports and a warm-up, each configuration and mode in a fresh subprocess "
        "(glibc MALLOC_MMAP_THRESHOLD_=1 MiB in both).",
        "",
        "| depth | hidden | model (MiB) | in-memory peak (MiB) | streaming peak (MiB) | sequential streaming peak (MiB) | ratio | "
        "in-memory wall (s) | streaming wall (s) | sequential streaming wall (s) | streaming / in-memory wall | "
        "in-memory CPU (s) | streaming CPU (s) | sequential streaming CPU (s) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (depth, hidden), g in df.groupby(["depth", "hidden"], sort=True):
        im = g[g["mode"] == "in-memory"].iloc[0]
        st = g[g["mode"] == "streaming"].iloc[0]
        sq = g[g["mode"] == "streaming-seq"].iloc[0]
        lines.append(
            f"| {depth} | {hidden} | {im['model_mib']:.1f} | {im['peak_above_baseline_mib']:.0f} | {st['peak_above_baseline_mib']:.0f} | "
            f"{sq['peak_above_baseline_mib']:.0f} | "
            f"{im['peak_above_baseline_mib'] / max(st['peak_above_baseline_mib'], 1e-9):.1f}x | {im['wall_s']:.1f} | {st['wall_s']:.1f} | "
            f"{sq['wall_s']:.1f} | {st['wall_s'] / im['wall_s']:.2f}x | {im['cpu_s']:.1f} | {st['cpu_s']:.1f} | {sq['cpu_s']:.1f} |"
        )
    lines += ["", f"Load average when the table was written: {' / '.join(f'{x:.1f}' for x in os.getloadavg())} "
              "(on this project's shared 2-core machine: wall-clock ratios are disturbed, CPU times much less)."]
    text = "\n".join(lines) + "\n"
    out.with_suffix(".md").write_text(text)
    print(text)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    depth_rows = df[df["hidden"] == a.hidden].sort_values("depth")
    for mode, g in depth_rows.groupby("mode"):
        axes[0].plot(g["depth"], g["peak_above_baseline_mib"], marker="o", label=mode)
        axes[1].plot(g["depth"], g["wall_s"], marker="o", label=mode)
    axes[0].set(xlabel="depth (blocks)", ylabel="peak host RSS above baseline (MiB)", title=f"memory, hidden {a.hidden}")
    axes[1].set(xlabel="depth (blocks)", ylabel="merge + FeatCal wall-clock (s)", title=f"time, hidden {a.hidden}")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    print(f"wrote {out.with_suffix('.md')}, .csv, .png")


if __name__ == "__main__":
    sys.exit(main())
