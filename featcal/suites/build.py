"""Portable suite builds: the same bytes for a spec on every x86-64 CPU.

A built suite's numbers are only comparable if every machine builds the same files. The
CPU kernels of a training run follow the instruction set (ATen's vectorised kernels pick
AVX2 or AVX-512 at run time, MKL's GEMM and oneDNN's convolutions pick their own code
paths), and hundreds of training steps amplify the last-bit differences into points of
accuracy. A *pinned* build therefore runs its arithmetic in child processes whose kernels
are fixed before torch is imported:

* ``ATEN_CPU_CAPABILITY=avx2``: ATen's AVX2 kernels, also on AVX-512 CPUs;
* ``MKL_CBWR=AVX2``: MKL's conditional-numerical-reproducibility branch that gives the same
  results on every Intel or compatible (AMD) CPU with AVX2;
* oneDNN (``torch.backends.mkldnn``) and NNPACK off (convolutions go through im2col and
  MKL's GEMM; oneDNN's blockings follow the cache sizes), ``DNNL_MAX_CPU_ISA`` capped besides;
* one thread per process (``OMP_NUM_THREADS=MKL_NUM_THREADS=1``, ``torch.set_num_threads(1)``).

AVX2 rather than the SSE baseline: every x86-64 CPU of the last decade has it (Intel since
Haswell, 2013; AMD since Excavator/Zen), and the baseline kernels cost 1.75x the CPU time of
the vision suite's pre-training (1.37x for the T5 suite; AVX2 1.0x; measured by
``experiments/bench_suite_build.py``). The guarantee holds for one torch build (the pin fixes
the code paths of that binary, not of other versions). A build that cannot be pinned is
marked not portable (``portability``: the manifest records it and the run prints it): on a
GPU, on another architecture (ARM), or on an x86-64 CPU without AVX2 (the child then runs
ATen's baseline kernels).

Any suite uses it the same way (see ``featcal.suites.embedded.build``):

* ``run_pinned("pkg.module:function", kwargs)`` runs one step (e.g. pre-training the base,
  which writes its files into the build folder) in a pinned child and returns its
  JSON-serialisable result;
* ``run_pinned_jobs("pkg.module:function", [kwargs, ...], workers)`` runs independent jobs
  (e.g. one expert each) in ``workers`` pinned children at once; each job's bytes depend
  only on its inputs, so the files are the same whatever the worker count;
* ``portability(device)`` gives the manifest's ``portable`` flag and ``note``;
  ``suite_identity(folder, name)`` the ``suite`` block of ``results.json``.
"""
from __future__ import annotations

import importlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

#: the environment of every pinned child (set before torch is imported there)
PINNED_ENV: dict[str, str] = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_CBWR": "AVX2",
    "DNNL_MAX_CPU_ISA": "AVX2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "MKL_DYNAMIC": "FALSE",
    "OPENBLAS_NUM_THREADS": "1",
    "CUDA_VISIBLE_DEVICES": "",
}
#: what the pin is called in manifests and notes (bump ``PIN_VERSION`` if ``PINNED_ENV``
#: or ``_pin_torch`` changes what the kernels compute: the suites' build versions fold it in)
PIN_VERSION = 1
PIN_NAME = "x86-64 AVX2 (ATen AVX2 kernels, MKL CBWR=AVX2, oneDNN/NNPACK off, 1 thread)"
#: ATen's kernel level in a pinned child (``torch.backends.cpu.get_cpu_capability()``)
PIN_CAPABILITY = "AVX2"
X86_64 = ("x86_64", "amd64", "x64")
#: environment variable: the number of pinned children that train experts at once
WORKERS_ENV = "FEATCAL_BUILD_WORKERS"


def available_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def build_workers(n_jobs: int, workers: int | None = None) -> int:
    """How many pinned children run ``n_jobs`` independent jobs: ``workers`` if given, else
    ``$FEATCAL_BUILD_WORKERS``, else the usable cores; at most ``n_jobs``, at least 1."""
    if workers is None:
        env = os.environ.get(WORKERS_ENV, "").strip()
        if env:
            try:
                workers = int(env)
            except ValueError:
                raise ValueError(f"featcal: {WORKERS_ENV}={env!r} is not a whole number; unset it or give e.g. 2") from None
        else:
            workers = available_cores()
    if int(workers) < 1:
        raise ValueError(f"featcal: build workers must be at least 1, got {workers}")
    return max(1, min(int(workers), int(n_jobs)))


def portability(device: Any = "cpu", pinned: bool = True, capability: str | None = PIN_CAPABILITY) -> dict[str, Any]:
    """``{"portable": bool, "note": str}`` of a build on ``device`` (pinned or not) on this
    machine; ``capability``: the ATen kernel level the pinned children reported."""
    dev = str(device or "cpu")
    machine = platform.machine().lower()
    import torch

    tv = torch.__version__
    if not dev.startswith("cpu"):
        return {"portable": False, "note": (
            f"built on {dev}: GPU kernels depend on the GPU model and the CUDA libraries, so these files (and "
            f"scores) can differ from the portable CPU build of the same spec; set build_device=cpu for that one")}
    if machine not in X86_64:
        return {"portable": False, "note": (
            f"built on a {machine or 'unknown'} CPU: the portable build is pinned for x86-64 CPUs only, so these "
            f"files (and scores) can differ from the x86-64 build of the same spec")}
    if not pinned:
        return {"portable": False, "note": (
            "built with this CPU's own kernels (not pinned): the files can differ on a CPU with another "
            "instruction set")}
    if capability != PIN_CAPABILITY:
        return {"portable": False, "note": (
            f"this CPU cannot run the pinned {PIN_CAPABILITY} kernels (the build ran ATen's {capability} ones): "
            f"the files can differ from the portable build of the same spec on an AVX2 CPU")}
    return {"portable": True, "note": (
        f"pinned CPU build, {PIN_NAME}: the same files on every x86-64 CPU with AVX2 and torch {tv}")}


def quiet(progress: bool) -> None:
    """In a build step: without ``progress``, no transformers progress bars either."""
    if not progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def _pin_torch() -> dict[str, Any]:
    """Inside a pinned child: switch off the kernels the environment does not pin; return what holds."""
    import torch

    torch.set_num_threads(1)
    torch.backends.mkldnn.enabled = False
    torch.backends.nnpack.enabled = False
    return {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads()}


def pinned_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment with ``PINNED_ENV`` and featcal importable."""
    env = dict(os.environ)
    env.update(PINNED_ENV)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.update(extra or {})
    return env


def _start(spec: Mapping[str, Any], workdir: Path, tag: str) -> tuple[subprocess.Popen, Path]:
    spec_path = workdir / f"{tag}.in.json"
    result = workdir / f"{tag}.out.json"
    spec_path.write_text(json.dumps(dict(spec)))
    proc = subprocess.Popen([sys.executable, "-m", "featcal.suites.build", str(spec_path), str(result)], env=pinned_env())
    return proc, result


def run_pinned_build(
    first: str | None, first_job: Mapping[str, Any] | None, target: str, jobs: Sequence[Mapping[str, Any]],
    workers: int | None = None,
    info: dict[str, Any] | None = None,
) -> tuple[Any, list[Any]]:
    """``(first(**first_job), [target(**job) for job in jobs])`` in pinned children:
    ``build_workers(len(jobs), workers)`` of them start at once; the first runs ``first``
    (e.g. the base, which the jobs read), and every child runs its share of ``jobs``
    (child ``i``: jobs ``i, i + w, ...`` in order) once ``first`` is done. The others
    import torch meanwhile, so a build pays one start-up per worker.

    ``first``/``target``: ``"package.module:function"``; jobs and results JSON-serialisable.
    The jobs must be independent (each writes its own files): then the bytes are the same
    whatever the worker count. A failing child fails the call (its traceback is on stderr).
    ``info`` (a dict), if given, receives ``"capability"``: the ATen kernel level the
    children ran (the lowest if they differ)."""
    jobs = list(jobs)
    w = build_workers(max(1, len(jobs)), workers)
    with tempfile.TemporaryDirectory(prefix="featcal-build-") as tmp:
        done = Path(tmp) / "first.done"
        started = []
        for i in range(w):
            spec = {"target": target, "jobs": jobs[i::w], "first": None, "wait_for": None}
            if first is not None:
                if i == 0:
                    spec.update(first={"target": first, "job": dict(first_job or {})}, signal=str(done))
                else:
                    spec["wait_for"] = str(done)
            started.append(_start(spec, Path(tmp), f"w{i}"))
        procs = [p for p, _ in started]
        code0 = procs[0].wait()
        if code0 != 0:  # the others may wait for the first step forever: stop them
            for p in procs[1:]:
                p.kill()
        codes = [code0] + [p.wait() for p in procs[1:]]
        failed = [c for c in codes if c != 0]
        if failed:
            raise RuntimeError(
                f"featcal: a pinned suite build step ({first or target}) failed in {len(failed)} of {w} child "
                f"process(es) (exit status {failed[0]}); its traceback is printed above")
        parts = [json.loads(res.read_text()) for _, res in started]
    if info is not None:
        levels = sorted({p["pin"]["cpu_capability"] for p in parts})
        info["capability"] = levels[0] if len(levels) == 1 else "/".join(levels)
    out: list[Any] = [None] * len(jobs)
    for i, part in enumerate(parts):
        for k, value in enumerate(part["results"]):
            out[i + k * w] = value
    return parts[0].get("first"), out


def run_pinned_jobs(target: str, jobs: Sequence[Mapping[str, Any]], workers: int | None = None) -> list[Any]:
    """``[target(**job) for job in jobs]`` in ``build_workers(len(jobs), workers)`` pinned
    children at once (see ``run_pinned_build``)."""
    if not jobs:
        return []
    return run_pinned_build(None, None, target, jobs, workers)[1]


def run_pinned(target: str, kwargs: Mapping[str, Any]) -> Any:
    """``target(**kwargs)`` in one pinned child process (see ``run_pinned_build``)."""
    return run_pinned_jobs(target, [kwargs], workers=1)[0]


def probe(var: str) -> dict[str, Any]:
    """What a pinned child computes with (a diagnostic build step): ``var``'s value in its
    environment, ATen's kernel level, the thread count and whether oneDNN is on."""
    import torch

    return {"var": var, "value": os.environ.get(var), "capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(), "mkldnn": torch.backends.mkldnn.enabled}


def _call(target: str, kwargs: Mapping[str, Any]) -> Any:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)(**kwargs)


def _child_main(spec_path: str, result_path: str) -> None:
    pin = _pin_torch()
    if pin["threads"] != 1:  # the environment did not take (the kernel level is reported, see portability)
        raise RuntimeError(f"featcal: the pinned build child runs with {pin}; expected 1 thread")
    spec = json.loads(Path(spec_path).read_text())
    first = None
    if spec.get("first"):
        first = _call(spec["first"]["target"], spec["first"]["job"])
        Path(spec["signal"]).write_text("done")
    elif spec.get("wait_for"):
        import time

        # start-up work while the first step runs (a build module may define ``preload()``)
        module = importlib.import_module(spec["target"].partition(":")[0])
        if callable(getattr(module, "preload", None)):
            module.preload()

        while not Path(spec["wait_for"]).exists():  # the parent kills this child if the first step fails
            time.sleep(0.1)
    if spec["jobs"]:  # the build steps import their modules (and transformers) on first use
        results = [_call(spec["target"], job) for job in spec["jobs"]]
    else:
        results = []
    tmp = Path(result_path + ".tmp")
    tmp.write_text(json.dumps({"first": first, "results": results, "pin": pin}))
    os.replace(tmp, result_path)


# --------------------------------------------------------------------------------------
# a build's identity
# --------------------------------------------------------------------------------------
def content_hash(files: Mapping[str, Mapping[str, Any]]) -> str:
    """One hash over a build's files (a manifest's ``files``: path -> sha256): equal iff
    every file is byte-identical (16 hex digits of a sha256 over the sorted path/sha pairs)."""
    import hashlib

    payload = "\n".join(f"{rel}\t{meta['sha256']}" for rel, meta in sorted(files.items()))
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def build_suite(spec: Any, out: Path, device: Any, progress: bool, threads: int | None, workers: int | None,
              pinned: bool, base_step: str, expert_step: str) -> dict[str, Any]:
    """Build a suite into the new folder ``out``: ``base_step(spec, out, device, progress)``
    (``"module:function"``: data, base, shared files; returns ``{"fields": {...}, "seconds":
    {...}, "cpu": {...}}``), then ``expert_step(..., task=t)`` per task (returns ``{"task",
    "fields": [(path, value), ...], "seconds", "cpu"}``: each value lands at
    ``manifest[path...][task]``), then the manifest (``write_suite_manifest``) with the
    base's fields, the experts', the timings and the portability record.

    On the CPU with ``pinned`` the steps run in pinned children (``run_pinned_build``:
    the experts in ``workers`` at once; the steps must read only the base step's files so
    the bytes do not depend on the worker count); otherwise (a GPU, ``pinned=False``) in
    this process with ``threads`` intra-op threads, marked not portable. ``spec``: a
    ``featcal.cache.SuiteSpec`` (``to_dict``, ``spec_hash``, ``BUILD_VERSION``, ``tasks``).
    ``device``: ``None`` is the CPU. Used by every embedded suite."""
    import torch

    from featcal.utils import resolve_device, torch_threads

    out = Path(out)
    started, cpu_started = time.time(), time.process_time()
    dev = torch.device("cpu") if device is None else resolve_device(device, mps=False)
    pin = bool(pinned) and dev.type == "cpu"
    out.mkdir(parents=True, exist_ok=False)
    job = {"spec": spec.to_dict(), "out": str(out), "device": str(dev), "progress": bool(progress)}
    if pin:
        n_workers = build_workers(len(spec.tasks), workers)
        info: dict[str, Any] = {}
        base, experts = run_pinned_build(base_step, job, expert_step, [{**job, "task": t} for t in spec.tasks],
                                                     n_workers, info)
    else:
        n_workers, info = 1, {"capability": None}
        with torch_threads(threads):
            base = _call(base_step, job)
            experts = [_call(expert_step, {**job, "task": t}) for t in spec.tasks]
    port = portability(dev, pinned=pin, capability=info["capability"])
    fields = dict(base["fields"])
    for e in experts:  # each expert's values go to fields[path...][task], in the spec's task order
        for path, value in e["fields"]:
            node = fields
            for key in path:
                node = node.setdefault(key, {})
            node[e["task"]] = value
    timings = dict(base["seconds"])
    timings["experts"] = time.time() - started - sum(timings.values())
    timings["expert_steps_sum"] = sum(e["seconds"] for e in experts)
    timings["total"] = time.time() - started
    timings["cpu_total"] = time.process_time() - cpu_started + sum(base.get("cpu", {}).values()) + sum(e["cpu"] for e in experts)
    return write_suite_manifest(out, {
        "build_version": spec.BUILD_VERSION,
        "spec_hash": spec.spec_hash(),
        "spec": spec.to_dict(),
        **fields,
        "build_seconds": timings,
        "device": str(dev),
        "portable": port["portable"],
        "portability_note": port["note"],
        "pin": PIN_NAME if pin else None,
        "cpu_capability": info["capability"],
        "build_workers": n_workers,
        "threads": 1 if pin else torch.get_num_threads(),
        "torch": torch.__version__,
    })


def write_suite_manifest(out: Path, fields: Mapping[str, Any]) -> dict[str, Any]:
    """``featcal.cache.write_manifest`` plus the build's ``content_hash`` (over the files it
    lists); written last, atomically."""
    from featcal.cache import MANIFEST, write_manifest

    manifest = write_manifest(Path(out), dict(fields))
    manifest = {**{k: v for k, v in manifest.items() if k != "files"}, "content_hash": content_hash(manifest["files"]),
                "files": manifest["files"]}
    tmp = Path(out) / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, Path(out) / MANIFEST)
    return manifest


def suite_identity(folder: Path, name: str) -> dict[str, Any]:
    """The ``suite`` block of ``results.json``: ``{"name", "spec_hash", "content_hash",
    "portable", "note"}`` of the build in ``folder``."""
    manifest = json.loads((Path(folder) / "manifest.json").read_text())
    portable = manifest.get("portable")
    return {
        "name": name,
        "spec_hash": manifest.get("spec_hash"),
        "content_hash": manifest.get("content_hash") or content_hash(manifest["files"]),
        "portable": bool(portable) if portable is not None else False,
        "note": manifest.get("portability_note") or "built before portable builds (no portability record)",
    }


def announce_identity(folder: Path, name: str) -> dict[str, Any]:
    """``suite_identity`` of ``folder``, with a logged warning (in the run's output) when the
    build is not portable."""
    import logging

    ident = suite_identity(folder, name)
    if not ident["portable"]:
        logging.getLogger("featcal").warning("the %s suite at %s is not a portable build: %s", name, folder, ident["note"])
    return ident


class BuiltSuite:
    """Mixin of the adapter and the task pool of a suite whose spec names exactly its tasks
    (``embedded_t5``, ``embedded_llama``): the spec (from a mapping or a spec object, plus
    keyword overrides; ``tasks``, when given, must equal the spec's), the cache location,
    and the suite folder, built (or verified) on first use, then remembered. Subclasses set
    ``SPEC`` (the ``SuiteSpec`` dataclass) and ``ENSURE_BUILT`` (the suite module's
    ``ensure_built(spec, cache_dir, device=...)``, wrapped in ``staticmethod``)."""

    SPEC: type
    ENSURE_BUILT: Callable[..., Path]

    @classmethod
    def spec_from(cls, tasks: list[str] | None, spec: Any, overrides: Mapping[str, Any]) -> Any:
        given = spec.to_dict() if isinstance(spec, cls.SPEC) else dict(spec or {})
        given.update(overrides)
        if tasks is not None:
            if "tasks" in given and [str(t) for t in given["tasks"]] != [str(t) for t in tasks]:
                raise ValueError(f"tasks {list(tasks)} disagree with spec.tasks {list(given['tasks'])}")
            given["tasks"] = list(tasks)
        return cls.SPEC.from_config(given)

    @classmethod
    def spec_problems(cls, node: Mapping[str, Any]) -> list[str]:
        """``validate_config``'s share: the spec a config node describes, as problems."""
        try:
            cls.spec_from(node.get("tasks"), node.get("spec"), {})
        except (ValueError, TypeError) as err:
            return [f"spec: {err}"]
        return []

    def _init_build(self, tasks, spec, cache_dir, build_device, spec_overrides) -> None:
        self.spec = self.spec_from(tasks, spec, spec_overrides)
        self.build_cache_dir = cache_dir
        self.build_device = build_device
        self._folder: Path | None = None

    @property
    def folder(self) -> Path:
        if self._folder is None:
            self._folder = type(self).ENSURE_BUILT(self.spec, self.build_cache_dir, device=self.build_device)
        return self._folder

    def suite_identity(self) -> dict[str, Any]:
        """The build's identity for ``results.json`` (``featcal.suites.build.suite_identity``);
        warns when the build is not portable."""
        return announce_identity(self.folder, self.spec.SUITE)


if __name__ == "__main__":  # a pinned child: python -m featcal.suites.build <jobs.json> <result.json>
    _child_main(sys.argv[1], sys.argv[2])
