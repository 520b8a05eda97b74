"""Wall-clock and peak memory of post-merging calibrators on a ViT-B/32-shaped tower.

Workload: a transformers ``CLIPVisionConfig()`` tower (defaults: 12 layers, width 768,
MLP 3072, image 224, patch 32 → 50 tokens, visual projection 512) with random weights
as the base, ``--experts`` experts = base + random perturbations of every block
parameter (``--delta`` × the parameter's std), Task Arithmetic (λ = 0.3), ``--n``
random images per task in batches of 16, on ``--device`` (cpu or cuda: the models stay
on the CPU and each calibrator moves what it works on, as in a run).

Each calibrator named in ``--methods`` is built from ``conf/calibration/<name>.yaml``
with ``hydra.utils.instantiate`` and run in a fresh subprocess (so peak RSS is per
method). Measured around ``calibrator.calibrate(...)`` only (model building excluded):
wall-clock (CUDA synchronised before and after; a short warm-up of the device first),
peak CUDA memory allocated during the call (``torch.cuda.max_memory_allocated`` after a
reset), and peak host RSS increase over the RSS just before the call (psutil sampled
every 20 ms; ``ru_maxrss`` of the subprocess is reported too). Prints one table and
the ratios to the first method, all from this one run.

For calibrators that rewrite the merged weights (FeatCal), the calibrated block
parameters of every variant are compared with those of the first listed variant of
the same yaml: max over tensors of max|θ − θ_ref| / max|θ_ref| (the parameter
difference relative to the parameters' scale), e.g. bf16/tf32 block passes vs fp32.

    python experiments/bench_calibration.py                   # featcal,surgery,probsurgery, n=32
    python experiments/bench_calibration.py --methods featcal,none --n 8
    python experiments/bench_calibration.py --methods featcal,featcal:pass_tokens=0:drift_examples=0
    python experiments/bench_calibration.py --device cuda --n 256 \
        --methods featcal,featcal:block_dtype=tf32,featcal:block_dtype=bf16,surgery,probsurgery
    # --n 256 is the paper's setting (8 tasks, 256 examples each)
    python experiments/bench_calibration.py --emulate-tf32 \
        --methods featcal,featcal:block_dtype=tf32,featcal:block_dtype=tf32:gram_tf32=true,featcal:block_dtype=bf16
    # without a GPU: TF32's effect on the parameters, with TF32 emulated on the CPU

A method is a yaml name, optionally followed by ``:key=value`` overrides of that yaml
(values parsed as YAML), so variants of one calibrator can be compared in one run. A
name may carry ``@<git revision>``: that method runs the ``featcal`` package of that
revision (``git archive``), e.g. ``--methods featcal,featcal@main`` times this tree's
FeatCal against the one on ``main`` in the same run (and compares their parameters).

The method ``official`` runs the authors' own FeatCal code on the same workload:
``--official-src DIR`` names a checkout of it (github.com/egangu/featcal; DIR holds
``src/featcal/featcal.py``), which the child imports under the name ``featcal_official``
(nothing of it is copied into this project). It is configured with the hyperparameters
of ``conf/calibration/featcal.yaml`` (λ, ρ, α, ε, bias and norm switches), batch 16, and
given the same calibration images: its dataset loader (the hub's datasets) is bypassed by
computing its first-layer inputs with its own ``_clip_first_layer_input`` on those images,
inside the timed call. Its calibrated block parameters are compared with those of the
first ``featcal`` variant of the run (the parity column), so one run prints this project's
FeatCal time over the official code's and shows that both compute the same parameters:

    git clone https://github.com/egangu/featcal /tmp/featcal-official
    python experiments/bench_calibration.py --official-src /tmp/featcal-official \
        --methods official,featcal,featcal:drift_examples=0 --n 32

``--profile N``: each method also runs under ``torch.profiler`` (CPU, and CUDA on a GPU)
and its N most expensive operators (self time) are printed below the table (and kept in
``--json``); the profiler's overhead is in those runs' times. ``CPU (s)`` is the
process's user + system time during the call (all threads; robust on a shared machine).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: the calibration configs; a ``featcal@<rev>`` child reads that revision's (BENCH_CONF_DIR)
CONF = Path(os.environ.get("BENCH_CONF_DIR") or ROOT / "conf" / "calibration")


#: ``--tiny``: a 2-block width-64 tower with the same structure, for smoke runs of the script
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            image_size=32, patch_size=8, projection_dim=32)


def build_workload(num_experts: int, n: int, delta: float, seed: int, tiny: bool = False):
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from featcal.backbone.clip import CLIPVisionBackbone
    from featcal.merge import task_arithmetic

    torch.manual_seed(seed)
    config = CLIPVisionConfig(**TINY) if tiny else CLIPVisionConfig()  # default: ViT-B/32 shapes
    base = CLIPVisionModelWithProjection(config).eval()
    tasks = [f"task{t}" for t in range(num_experts)]
    backbone = CLIPVisionBackbone(tasks, base="<in-memory>", experts=["<in-memory>"] * num_experts)
    base_sd = base.state_dict()
    experts = []
    for t in range(num_experts):
        gen = torch.Generator().manual_seed(seed + 1 + t)
        sd = {}
        for key, value in base_sd.items():
            if torch.is_floating_point(value) and "encoder.layers" in key:
                std = float(value.std()) if value.numel() > 1 else 0.02
                std = std if std > 0 else 0.02
                sd[key] = value + delta * std * torch.randn(value.shape, generator=gen)
            else:
                sd[key] = value.clone()
        experts.append(backbone.with_state_dict(base, sd))
    merged = backbone.with_state_dict(base, task_arithmetic(base_sd, [e.state_dict() for e in experts], 0.3))
    gen = torch.Generator().manual_seed(seed + 1000)
    size = config.image_size
    calibration = []
    for t in range(num_experts):
        shift = torch.randn(3, size, size, generator=gen)
        images = shift + torch.randn(n, 3, size, size, generator=gen)
        calibration.append([images[i : i + 16] for i in range(0, n, 16)])
    return backbone, merged, base, experts, calibration


def split_method(method: str) -> tuple[str, dict]:
    """"featcal:pass_tokens=0:drift_examples=0" -> ("featcal", {"pass_tokens": 0, "drift_examples": 0})."""
    import yaml

    name, *parts = method.split(":")
    name = name.split("@", 1)[0]
    overrides = {}
    for part in parts:
        key, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"override {part!r} in {method!r} is not key=value")
        overrides[key.strip()] = yaml.safe_load(value)
    return name.strip(), overrides


#: the method name that runs the authors' code (``--official-src``) instead of a yaml
OFFICIAL = "official"


def load_official(src: str | os.PathLike):
    """The official code's ``featcal.featcal`` module from a checkout of its repository,
    imported as the package ``featcal_official`` (its own name would shadow this project's)."""
    import importlib
    import importlib.util

    root = Path(src)
    for pkg in (root / "src" / "featcal", root / "featcal", root):
        if (pkg / "featcal.py").is_file() and (pkg / "__init__.py").is_file():
            break
    else:
        raise FileNotFoundError(f"--official-src {src}: no featcal/featcal.py below it (expected a checkout of "
                                "github.com/egangu/featcal, which has src/featcal/featcal.py)")
    if "featcal_official" not in sys.modules:
        spec = importlib.util.spec_from_file_location("featcal_official", pkg / "__init__.py",
                                                      submodule_search_locations=[str(pkg)])
        module = importlib.util.module_from_spec(spec)
        sys.modules["featcal_official"] = module
        spec.loader.exec_module(module)
    return importlib.import_module("featcal_official.featcal")


class OfficialCalibrator:
    """Adapts the official ``CLIPFeatCalibrator`` to this bench's ``calibrate`` call: the
    hyperparameters of ``conf/calibration/featcal.yaml``, the bench's calibration images as
    its calibration batches (its hub-dataset loader is replaced by its own first-layer
    function on those images), the merged model calibrated in place."""

    def __init__(self, src: str, n: int):
        from omegaconf import OmegaConf

        self.module = load_official(src)
        ours = OmegaConf.load(CONF / "featcal.yaml")
        self.config = self.module.FeatCalConfig(
            num_calibration_examples=n, calibration_batch_size=16, lambda_ratio=float(ours.lambda_ratio),
            anchor_blend_rho=float(ours.rho), teacher_interp_alpha=float(ours.alpha), covariance_eps=float(ours.eps),
            calibrate_bias=bool(ours.calibrate_bias), calibrate_layernorm=bool(ours.calibrate_norm),
        )

    def calibrate(self, backbone, merged, base, experts, calibration, device):
        import types

        import torch

        module = self.module
        tasks = [f"task{t}" for t in range(len(experts))]
        images = dict(zip(tasks, calibration))

        @torch.no_grad()
        def first_layer_inputs(_self, *, merged_model, expert_models, tasks):
            student, expert = {}, {}
            merged_model.to(device).eval()
            for task in tasks:
                model = expert_models[task].to(device).eval()
                student[task] = [module._clip_first_layer_input(merged_model, b.to(device)).cpu() for b in images[task]]
                expert[task] = [module._clip_first_layer_input(model, b.to(device)).cpu() for b in images[task]]
                model.to("cpu")
            return student, expert

        calibrator = module.CLIPFeatCalibrator(self.config, processor=None, device=torch.device(device))
        calibrator.prepare_first_layer_inputs = types.MethodType(first_layer_inputs, calibrator)
        model = calibrator.calibrate(merged_model=merged, base_model=base, expert_models=dict(zip(tasks, experts)),
                                     tasks=tasks)
        return types.SimpleNamespace(model=model.to("cpu"), report=types.SimpleNamespace(drift=[]))


def run_one(method: str, args) -> dict:
    """In this (fresh) process: build the workload, run one calibrator, measure it."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    name, overrides = split_method(method)
    if name == OFFICIAL:
        if overrides:
            raise ValueError(f"{method!r}: the official code takes no overrides (it uses featcal.yaml's values)")
        return measure(method, OfficialCalibrator(args.official_src, args.n), args)
    return measure(method, make_calibrator(name, overrides, args.seed), args)


def make_calibrator(name: str, overrides: dict | None = None, seed: int = 0):
    """The calibrator of ``conf/calibration/<name>.yaml`` (a yaml extending another one of the
    group is composed), with ``overrides`` of its keys and its progress bar off."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(CONF / f"{name}.yaml")
    if "defaults" in cfg:  # compose a yaml that extends another one of the group
        parts = []
        for item in cfg.defaults:
            parts.append(cfg if item == "_self_" else OmegaConf.load(CONF / f"{item}.yaml"))
        cfg = OmegaConf.merge(*[OmegaConf.masked_copy(p, [k for k in p if k != "defaults"]) for p in parts])
    for key, value in (overrides or {}).items():
        if key not in cfg:
            raise KeyError(f"{name}.yaml has no key {key!r}")
        cfg[key] = value
    if "progress" in cfg:
        cfg.progress = False
    # calibrator yamls take the run seed by interpolation (seed: ${seed})
    return instantiate(OmegaConf.create({"seed": seed, "calibration": cfg}).calibration)


def measure(method: str, calibrator, args) -> dict:
    """Build the workload, run ``calibrator.calibrate`` once and measure it."""
    import psutil
    import torch

    backbone, merged, base, experts, calibration = build_workload(args.experts, args.n, args.delta, args.seed, args.tiny)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        # context, cuBLAS/cuSOLVER handles and first kernels are not the calibrator's cost
        a = torch.randn(256, 256, device=device)
        torch.linalg.cholesky(a @ a.T + 256 * torch.eye(256, device=device))
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        cuda_before = torch.cuda.memory_allocated(device)

    proc = psutil.Process()
    baseline = proc.memory_info().rss
    peak = [baseline]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    profiler = None
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        profiler = profile(activities=activities)
        profiler.__enter__()
    start = time.perf_counter()
    cpu0 = time.process_time()
    out = calibrator.calibrate(backbone, merged, base, experts, calibration, device=device)
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    cpu_seconds = time.process_time() - cpu0
    profile_top = None
    if profiler is not None:
        profiler.__exit__(None, None, None)
        sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        profile_top = profiler.key_averages().table(sort_by=sort, row_limit=args.profile, max_name_column_width=60)
    stop.set()
    sampler.join()
    peak[0] = max(peak[0], proc.memory_info().rss)
    result = {
        "method": method,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "profile_top": profile_top,
        "featcal_source": str(Path(__import__("featcal").__file__).resolve().parent),
        "peak_rss_increase_mb": (peak[0] - baseline) / 2**20,
        "rss_before_mb": baseline / 2**20,
        "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "threads": torch.get_num_threads(),
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if cuda else ""),
        "cuda_peak_mb": (torch.cuda.max_memory_allocated(device) - cuda_before) / 2**20 if cuda else None,
    }
    if args.params_out:
        torch.save(block_params(backbone, out.model), args.params_out)
        result["params_file"] = args.params_out
    drift = out.report.drift
    if drift:
        last = max(r["block"] for r in drift)
        for when in ("before", "after"):
            values = [r["drift"] for r in drift if r["block"] == last and r["when"] == when]
            if values:
                result[f"last_block_drift_{when}"] = sum(values) / len(values)
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="featcal,surgery,probsurgery")
    parser.add_argument("--n", type=int, default=32, help="calibration examples per task")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--delta", type=float, default=0.1, help="expert perturbation, × parameter std")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    parser.add_argument("--tiny", action="store_true", help="a tiny tower instead of ViT-B/32 (smoke test of the script)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument(
        "--emulate-tf32", action="store_true",
        help="CPU only: emulate TF32 matrix products (featcal.calibration.feature_calibration.tf32) so that the "
             "parameter difference of block_dtype=tf32 / gram_tf32=true variants can be measured "
             "without a GPU (slower than plain fp32; its timings are not TF32 timings)",
    )
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="run under torch.profiler and print each method's N most expensive operators")
    parser.add_argument("--official-src", default=None, metavar="DIR",
                        help="a checkout of the official FeatCal code (github.com/egangu/featcal), for the method "
                             "'official'")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--params-out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        print("RESULT " + json.dumps(run_one(args.child, args)), flush=True)
        return

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    official = any(split_method(m)[0] == OFFICIAL for m in methods)
    if official:
        if not args.official_src:
            parser.error("the method 'official' needs --official-src DIR (a checkout of github.com/egangu/featcal)")
        load_official(args.official_src)  # a wrong folder fails here, before any timing
    results = []
    child_env = dict(os.environ)
    if args.emulate_tf32:
        if not args.device.startswith("cpu"):
            parser.error("--emulate-tf32 is for the CPU; a CUDA device has real TF32")
        child_env["FEATCAL_EMULATE_TF32"] = "1"
    print(
        f"workload: CLIPVisionConfig({'tiny' if args.tiny else ''}) tower "
        f"({'tiny' if args.tiny else 'ViT-B/32 shapes'}), {args.experts} experts, "
        f"n={args.n} per task, batch 16, device {args.device}, {os.cpu_count()} CPU cores"
        + (", TF32 emulated on the CPU (FEATCAL_EMULATE_TF32=1)" if args.emulate_tf32 else "")
    )
    tmp = tempfile.TemporaryDirectory(prefix="featcal-bench-")
    failed = False
    try:
        for index, method in enumerate(methods):
            name = split_method(method)[0]
            if name != OFFICIAL and not (CONF / f"{name}.yaml").exists():
                print(f"skip {method}: conf/calibration/{name}.yaml not found")
                failed = True
                continue
            cmd = [sys.executable, __file__, "--child", method, "--n", str(args.n), "--experts", str(args.experts),
                   "--delta", str(args.delta), "--seed", str(args.seed), "--threads", str(args.threads),
                   "--device", args.device, "--profile", str(args.profile)] + (["--tiny"] if args.tiny else [])
            env = child_env
            if name == OFFICIAL:
                cmd += ["--official-src", str(Path(args.official_src).resolve())]
                env = dict(child_env, TQDM_DISABLE="1")
            rev = method.split(":", 1)[0].partition("@")[2]
            if rev:  # that revision's featcal package first on the path
                src = Path(tmp.name) / f"src-{index}"
                src.mkdir()
                archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "featcal", "conf/calibration"],
                                         capture_output=True, check=True)
                subprocess.run(["tar", "-x", "-C", str(src)], input=archive.stdout, check=True)
                # that revision's configs too: their _target_ names its own module layout
                env = dict(child_env, PYTHONPATH=str(src) + os.pathsep + child_env.get("PYTHONPATH", ""),
                           BENCH_CONF_DIR=str(src / "conf" / "calibration"))
            # variants of one yaml, and the official code against featcal: compare parameters
            if sum(split_method(m)[0] == name for m in methods) > 1 or (official and name in (OFFICIAL, "featcal")):
                cmd += ["--params-out", str(Path(tmp.name) / f"{index}.pt")]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(ROOT), env=env)
            line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
            if proc.returncode != 0 or not line:
                print(f"{method}: FAILED (exit {proc.returncode})\n{proc.stderr[-2000:]}")
                failed = True
                continue
            res = json.loads(line[-1][len("RESULT "):])
            results.append(res)
            cuda = f", CUDA peak {res['cuda_peak_mb']:.0f} MiB" if res.get("cuda_peak_mb") is not None else ""
            print(f"  done {method}: {res['seconds']:.2f} s (CPU {res['cpu_seconds']:.1f} s){cuda}", flush=True)
    except KeyboardInterrupt:  # e.g. a time limit (timeout --signal=INT): report what finished
        print("interrupted: the table below holds the methods that finished", flush=True)
        failed = True

    if not results:
        tmp.cleanup()
        sys.exit(1 if failed else 0)
    add_param_differences(results)
    tmp.cleanup()
    print()
    print(f"device: {results[0].get('device', args.device)}")
    print(
        "| method | wall-clock (s) | CPU (s) | CUDA peak (MiB) | peak RSS increase (MiB) | process max RSS (MiB) "
        "| last-block drift before → after | max |Δθ|/max |θ| vs |"
    )
    print("|---|---:|---:|---:|---:|---:|---|---|")
    for r in results:
        drift = (
            f"{r['last_block_drift_before']:.3f} → {r['last_block_drift_after']:.3f}"
            if "last_block_drift_after" in r
            else "–"
        )
        cuda_peak = f"{r['cuda_peak_mb']:.0f}" if r.get("cuda_peak_mb") is not None else "–"
        diff = f"{r['param_rel_diff']:.2e} ({r['param_reference']})" if "param_rel_diff" in r else "–"
        print(
            f"| {r['method']} | {r['seconds']:.2f} | {r['cpu_seconds']:.1f} | {cuda_peak} | {r['peak_rss_increase_mb']:.0f} "
            f"| {r['ru_maxrss_mb']:.0f} | {drift} | {diff} |"
        )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2) + "\n")
    ref = results[0]
    if len(results) > 1:
        print()
        print(f"ratios (other / {ref['method']}), same run:")
        for r in results[1:]:
            t_ratio = r["seconds"] / max(ref["seconds"], 1e-9)
            m_ratio = r["peak_rss_increase_mb"] / max(ref["peak_rss_increase_mb"], 1e-9)
            c_ratio = r["cpu_seconds"] / max(ref["cpu_seconds"], 1e-9)
            print(f"  {r['method']}: wall-clock ×{t_ratio:.2f}, CPU time ×{c_ratio:.2f}, peak RSS increase ×{m_ratio:.2f}")
    for r in results:
        if r.get("profile_top"):
            print()
            print(f"torch.profiler, {r['method']}: top {args.profile} operators by self time")
            print(r["profile_top"])
    if failed:
        sys.exit(1)


def block_params(backbone, model, dtype=None) -> dict:
    """The model's block parameters by ``<block>.<name>``, on the CPU (float32 unless ``dtype``)."""
    import torch

    return {f"{i}.{n}": p.detach().to("cpu", dtype or torch.float32) for i, blk in enumerate(backbone.blocks(model))
            for n, p in blk.named_parameters()}


def param_differences(params: dict, reference: dict) -> dict[str, float]:
    """max|θ − θ_ref| / max|θ_ref| of each tensor (relative to the tensor's own scale)."""
    out = {}
    for key, ref in reference.items():
        scale = float(ref.abs().max()) if ref.numel() else 0.0
        diff = float((params[key] - ref).abs().max()) if ref.numel() else 0.0
        out[key] = diff / max(scale, 1e-12)
    return out


def relative_param_difference(params: dict, reference: dict) -> float:
    """max over tensors of max|θ − θ_ref| / max|θ_ref| (the tensors' own scale)."""
    return max(param_differences(params, reference).values(), default=0.0)


def add_param_differences(results: list[dict]) -> None:
    """Compare each variant's calibrated parameters with the first variant of its yaml, and the
    official code's with the first featcal variant."""
    import torch

    first: dict[str, dict] = {}
    # the official code is compared with the first featcal variant (both compute FeatCal)
    ordered = sorted((r for r in results if "params_file" in r), key=lambda r: split_method(r["method"])[0] == OFFICIAL)
    for r in ordered:
        name = split_method(r["method"])[0]
        if name == OFFICIAL and "featcal" in first:
            name = "featcal"
        if name not in first:
            first[name] = r
            continue
        ref = first[name]
        r["param_rel_diff"] = relative_param_difference(
            torch.load(r["params_file"], weights_only=True), torch.load(ref["params_file"], weights_only=True)
        )
        r["param_reference"] = ref["method"]


if __name__ == "__main__":
    main()
