"""Build the embedded benchmark (default spec) and measure the merging phenomenon.

    python experiments/embedded_report.py                 # default spec, user cache
    python experiments/embedded_report.py --cold          # time a cold build (fresh cache folder)
    python experiments/embedded_report.py --set width=128 finetune_steps=200 --out /tmp/x.md

Evaluates the base (zero-shot prototype heads), each expert on its own task, weight
averaging, Task Arithmetic (λ = 0.3) and TIES (λ = 0.3, density 0.2), optionally FeatCal
(``--featcal 32``), and writes ``results/embedded_benchmark.md``.
"""
from __future__ import annotations

import argparse
import ast
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from featcal.merge import task_arithmetic, ties, weight_average
from featcal.suites.embedded.adapter import EmbeddedBackbone
from featcal.suites.embedded.pool import EmbeddedTaskPool
from featcal.suites.embedded.build import cache_path, ensure_built, read_manifest
from featcal.suites.embedded.data import TASKS
from featcal.suites.embedded.spec import EmbeddedSpec

ROOT = Path(__file__).resolve().parents[1]


def _avg(d: dict[str, float]) -> float:
    return sum(d.values()) / len(d)


def measure(spec: EmbeddedSpec, cache_dir: str | None, device: str, featcal_budgets: list[int]) -> dict:
    t0 = time.time()
    folder = ensure_built(spec, cache_dir, device=device)
    ensure_seconds = time.time() - t0
    manifest = read_manifest(folder)
    adapter = EmbeddedBackbone(spec=spec, cache_dir=cache_dir)
    pool = EmbeddedTaskPool(spec=spec, cache_dir=cache_dir)
    base = adapter.load_base()
    experts = adapter.load_experts()
    tasks = pool.names

    def evaluate(model_for_task, **kw) -> dict[str, float]:
        return {t: m["accuracy"] for t, m in pool.evaluate(model_for_task, device, **kw).items()}

    acc: dict[str, dict[str, float]] = {}
    acc["base (zero-shot)"] = evaluate(lambda i: base, desc="base")
    acc["experts"] = {}
    for i, e in enumerate(experts):
        acc["experts"].update(evaluate(lambda _i, e=e: e, only=[i], desc="expert"))
    bsd, esd = base.state_dict(), [e.state_dict() for e in experts]
    merges = {
        "weight averaging": weight_average(bsd, esd),
        "task arithmetic (λ=0.3)": task_arithmetic(bsd, esd, scaling_factor=0.3),
        "TIES (λ=0.3, k=20%)": ties(bsd, esd, scaling_factor=0.3, density=0.2),
    }
    models = {}
    for name, sd in merges.items():
        models[name] = adapter.with_state_dict(base, sd)
        acc[name] = evaluate(lambda i, m=models[name]: m, desc=name)
    featcal = {}
    if featcal_budgets:
        from featcal.calibration.feature_calibration import FeatCal

        ta = models["task arithmetic (λ=0.3)"]
        for n in featcal_budgets:
            calib = pool.calibration_set(n, 0, 16, "train")
            t1 = time.time()
            cm = FeatCal().calibrate(adapter, ta, base, experts, calib, device)
            secs = time.time() - t1
            key = f"TA + FeatCal (n={n})"
            acc[key] = evaluate(cm.model_for_task, desc=key)
            featcal[n] = secs
    return {
        "spec": spec.to_dict(),
        "folder": str(folder),
        "tasks": tasks,
        "accuracy": acc,
        "manifest_build_seconds": manifest.get("build_seconds"),
        "ensure_seconds": ensure_seconds,
        "featcal_seconds": featcal,
    }


def markdown(res: dict, cold_seconds: float | None) -> str:
    tasks, acc = res["tasks"], res["accuracy"]
    exp, ta = _avg(acc["experts"]), _avg(acc["task arithmetic (λ=0.3)"])
    spec = res["spec"]
    lines = [
        "# Embedded benchmark (sklearn digits, small CLIP vision tower)",
        "",
        "Written by `python experiments/embedded_report.py` (the default spec of "
        "`conf/backbone/embedded.yaml` / `featcal.suites.embedded.spec.EmbeddedSpec`). Top-1 test accuracy (%).",
        "",
        f"Machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads.",
        "",
        "## Spec",
        "",
        "```json",
        json.dumps(spec, indent=1),
        "```",
        "",
        "## Tasks",
        "",
        "| task | transform and labels |",
        "|---|---|",
    ]
    lines += [f"| {t} | {TASKS[t].description} |" for t in tasks]
    lines += ["", "## Accuracy per task", ""]
    rows = list(acc)
    lines.append("| model | " + " | ".join(tasks) + " | avg |")
    lines.append("|---" * (len(tasks) + 2) + "|")
    for r in rows:
        lines.append(f"| {r} | " + " | ".join(f"{acc[r][t]:.1f}" for t in tasks) + f" | **{_avg(acc[r]):.2f}** |")
    lines += [
        "",
        "## Summary",
        "",
        f"- Experts (each on its own task): **{exp:.2f}** (requirement ≥ 90).",
        f"- Task Arithmetic λ = 0.3 is {ta - _avg(acc['base (zero-shot)']):.2f} points above the base (requirement ≥ 8).",
        f"- Task Arithmetic λ = 0.3: **{ta:.2f}**, i.e. {exp - ta:.2f} points below the experts (requirement ≥ 10).",
        f"- Base zero-shot: {_avg(acc['base (zero-shot)']):.2f}; weight averaging {_avg(acc['weight averaging']):.2f}; "
        f"TIES {_avg(acc['TIES (λ=0.3, k=20%)']):.2f}.",
    ]
    for key in rows:
        if key.startswith("TA + FeatCal"):
            closed = (_avg(acc[key]) - ta) / max(exp - ta, 1e-9) * 100
            lines.append(f"- {key}: {_avg(acc[key]):.2f}, closes {closed:.1f} % of the TA → experts gap.")
    bs = res.get("manifest_build_seconds") or {}
    lines += [
        "",
        "## Build time",
        "",
        f"- Build recorded in the manifest: pre-training {bs.get('pretrain', float('nan')):.1f} s, "
        f"fine-tuning all experts {bs.get('finetune', float('nan')):.1f} s, total {bs.get('total', float('nan')):.1f} s.",
    ]
    if cold_seconds is not None:
        lines.append(f"- Cold `ensure_built` (fresh cache folder, wall clock): {cold_seconds:.1f} s.")
    lines += ["", NOTES]
    return "\n".join(lines)


NOTES = """## Notes

- Recipe (build v3): the base is pre-trained on digit identity over upright train-pool
  digits plus a 15 % share of them passed through each task's transform
  (`pretrain_data: union`, `pretrain_transformed: 0.15`): it has seen every task's input
  distribution, a little, as CLIP's pre-training covers its downstream domains. Heads are
  frozen canonical prototypes of the base (normalised, class-centred mean base embeddings
  of *upright* digits: the class described once, like a CLIP text prompt). Experts
  fine-tune the whole tower gently (60 steps at lr 1e-4) towards those heads.
- Regime criteria (issue 11): experts ≥ 90, TA (λ = 0.3) ≥ base + 8 and ≤ experts − 10, WA
  between base and experts. CLIP ViT-B/32 on its 8 tasks: zero-shot 48 < WA 66 < TA 69 <
  experts 90. Here TA and WA are close (both about 10 points over the base) and TIES does
  not beat TA; the over-interfering pre-v3 recipe is kept as `backbone=embedded_interference`.
- The build runs on one intra-op thread (`featcal.suites.embedded.build.BUILD_THREADS`): the same
  numerics on any machine, and no OpenMP barrier stalls when other processes share the two
  cores (two threads ran 4-10x slower than one on this busy machine). Build times above were
  measured while another job was using the CPU.
"""



def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache-dir", default=None, help="cache root (default: $FEATCAL_CACHE or the user cache dir)")
    ap.add_argument("--cold", action="store_true", help="build into a fresh temporary cache and time it")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--set", nargs="*", default=[], help="spec overrides key=value")
    ap.add_argument("--featcal", nargs="*", type=int, default=[], help="FeatCal budgets to try (needs featcal.calibration.feature_calibration)")
    ap.add_argument("--out", default=str(ROOT / "results" / "embedded_benchmark.md"))
    ap.add_argument("--json", default=None, help="also dump the raw figures here")
    ap.add_argument("--from-json", default=None, help="only re-render the Markdown from a --json dump")
    args = ap.parse_args(argv)
    if args.from_json:
        res = json.loads(Path(args.from_json).read_text())
        Path(args.out).write_text(markdown(res, res.get("cold_build_seconds")))
        print(Path(args.out).read_text())
        return 0

    overrides = {}
    for item in args.set:
        k, v = item.split("=", 1)
        try:
            overrides[k] = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            overrides[k] = v
    spec = EmbeddedSpec.from_config(None, **overrides)
    cache_dir = args.cache_dir
    cold = None
    tmp = None
    if args.cold:
        tmp = tempfile.TemporaryDirectory(prefix="featcal-embedded-")
        cache_dir = tmp.name
        t0 = time.time()
        ensure_built(spec, cache_dir, device=args.device)
        cold = time.time() - t0
        print(f"cold build: {cold:.1f} s at {cache_path(spec, cache_dir)}", file=sys.stderr)
    res = measure(spec, cache_dir, args.device, args.featcal)
    res["cold_build_seconds"] = cold
    text = markdown(res, cold)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    print(text)
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
