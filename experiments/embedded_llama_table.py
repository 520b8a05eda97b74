"""The embedded LLM suite's table in one process: base, experts, WA / TA / TIES, and TA + each
calibrator at several budgets (streaming on: streamed merges into sharded folders,
layer-streamed FeatCal), scored with the suite's scorer (``featcal.suites.embedded_llama.build.score``,
which gives exactly lm-eval's numbers on the suite's YAMLs:
``tests/suites/test_embedded_llama.py::test_lm_eval_scores_equal_the_independent_scorer``) on every
test doc. ``featcal-run backbone=embedded_llama`` gives the same rows through lm-eval, one
process per configuration (about 10 minutes each on a loaded 2-core machine, mostly
lm-eval's per-task set-up); this script exists to fill the table in minutes.

    python experiments/embedded_llama_table.py [--backbone embedded_llama] [--budgets 8 32 256]
        [--calibrations featcal surgery probsurgery] [--out results/embedded_llama.json]

Prints a markdown table; writes the rows (per category, mean, normalised = merged ÷ expert,
share of the TA→experts gap closed, calibration wall and CPU seconds), the build's identity
(``featcal.suites.build.suite_identity``: spec hash, content hash, portable) and the load
average at the start and the end as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


EXTRA: list[str] = []


def compose(backbone: str, merge: str = "task_arithmetic", calibration: str = "none", extra=()):
    from hydra import compose as hcompose
    from hydra import initialize_config_dir

    with initialize_config_dir(str(ROOT / "conf"), version_base=None):
        return hcompose("config", overrides=[f"backbone={backbone}", f"merge={merge}", f"calibration={calibration}",
                                             "logger=none", *EXTRA, *extra])


def main() -> None:
    import torch

    from featcal.merge.streaming import merge_models
    from featcal.run import _build
    from featcal.suites.embedded_llama import build as el

    ap = argparse.ArgumentParser()
    ap.add_argument("--backbone", default="embedded_llama")
    ap.add_argument("--budgets", type=int, nargs="+", default=[8, 32, 256])
    ap.add_argument("--calibrations", nargs="+", default=["featcal", "surgery", "probsurgery"])
    ap.add_argument("--merges", nargs="+", default=["weight_average", "task_arithmetic", "ties"],
                    help="the merge rows (task_arithmetic is always scored: the calibrators start from it)")
    ap.add_argument("--out", default=str(ROOT / "results" / "embedded_llama.json"))
    ap.add_argument("--merge-dir", default=None, help="where the streamed merges go (default: a temp folder)")
    ap.add_argument("--extra", nargs="*", default=[], help="further Hydra overrides for every configuration")
    args = ap.parse_args()
    torch.set_num_threads(1)
    EXTRA[:] = args.extra
    import tempfile

    merge_root = Path(args.merge_dir or tempfile.mkdtemp(prefix="featcal-llama-table-"))
    cfg = compose(args.backbone)
    adapter, pool = _build(cfg.backbone.adapter), _build(cfg.backbone.taskpool)
    spec, folder = adapter.spec, adapter.folder
    data = el.load_data(folder, spec)
    tok = pool.tokenizer()
    tasks = list(spec.tasks)
    manifest = el.read_manifest(folder)
    from featcal.suites.build import suite_identity

    identity = suite_identity(folder, spec.SUITE)
    load_start = os.getloadavg()
    print("suite", identity, "load average", load_start, flush=True)
    rows: dict[str, dict[str, float]] = {"base": manifest["metrics"]["base"], "experts": manifest["metrics"]["experts"]}
    info: dict[str, dict] = {}

    def merged_with(merge: str):
        c = compose(args.backbone, merge)
        ad = _build(c.backbone.adapter)
        ad.merge_dir = str(merge_root / merge)
        base, experts = ad.load_base(), ad.load_experts()
        return ad, merge_models(_build(c.merge), ad, base, experts), base, experts

    def write() -> list[str]:
        """The table so far (printed by the caller) and the JSON, rewritten atomically after
        every row: a run cut short keeps the rows it finished."""
        mean = {k: sum(v[t] for t in tasks) / len(tasks) for k, v in rows.items()}
        norm = {k: 100 * sum(v[t] / rows["experts"][t] for t in tasks) / len(tasks) for k, v in rows.items()}
        ta, ex = mean.get("TA"), mean["experts"]
        lines = [f"| model | {' | '.join(tasks)} | mean | normalised % | gap closed | calibration s (CPU s) |",
                 "|---" * (len(tasks) + 5) + "|"]
        for k, v in rows.items():
            gap = f"{100 * (mean[k] - ta) / (ex - ta):+.0f} %" if k.startswith("TA +") and ta is not None and ex != ta else ""
            secs = f"{info[k]['calibration_s']:.1f} ({info[k]['calibration_cpu_s']:.1f})" if "calibration_s" in info.get(k, {}) else ""
            lines.append(f"| {k} | {' | '.join(f'{v[t]:.1f}' for t in tasks)} | {mean[k]:.1f} | {norm[k]:.1f} | {gap} | {secs} |")
        result = {"spec": spec.to_dict(), "suite": identity, "build_seconds": manifest["build_seconds"],
                  "build_workers": manifest.get("build_workers"),
                  "load_average": {"start": load_start, "now": os.getloadavg()},
                  "rows": rows, "mean": mean, "normalised": norm, "runs": info, "table": lines}
        tmp = Path(args.out + ".tmp")
        tmp.write_text(json.dumps(result, indent=1) + "\n")
        os.replace(tmp, args.out)  # atomically: a finished row is never lost
        return lines

    merges = [m for m in ("weight_average", "task_arithmetic", "ties") if m in args.merges or m == "task_arithmetic"]
    for merge in merges:
        label = {"weight_average": "WA", "task_arithmetic": "TA", "ties": "TIES"}[merge]
        _, model, _, _ = merged_with(merge)
        rows[label] = el.score_all(model, tok, spec, data)
        print(label, rows[label], flush=True)
        write()

    for cal in args.calibrations:
        for b in args.budgets:
            key = f"TA + {cal} @ {b}"
            try:
                ad, merged, base, experts = merged_with("task_arithmetic")
                c = compose(args.backbone, "task_arithmetic", cal, ["calibration.progress=false"])
                calibrator = _build(c.calibration)
                calib = pool.calibration_set(b, 0, int(c.budget.batch_size))
                t0, c0 = time.time(), time.process_time()
                calib = ad.prepare_calibration(merged, base, experts, calib, "cpu")
                out = calibrator.calibrate(ad, merged, base, experts, calib, "cpu")
                info[key] = {"calibration_s": time.time() - t0, "calibration_cpu_s": time.process_time() - c0}
                out.eval()
                rows[key] = {t: el.score_all(out.model_for_task(i), tok, spec, {t: data[t]})[t] for i, t in enumerate(tasks)}
            except Exception as err:  # report, go on with the other rows
                import traceback

                traceback.print_exc()
                info[key] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"}
                print(key, "failed:", info[key]["error"], flush=True)
                continue
            print(key, rows[key], info[key], flush=True)
            write()

    lines = write()
    print("\n".join(lines))
    print({k: v for k, v in info.items() if "error" in v})
    print("load average at the start", load_start, "at the end", os.getloadavg())


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
