"""Small shared utilities: atomic writes, seeding, device/dtype choice, a warm-up-cosine
learning-rate schedule and the AdamW loop that uses it, timing and memory."""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        # mkstemp creates 0600; a result file gets what open() would give it (0644 under umask 022)
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    """The process umask (read without changing it where /proc tells it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: read by setting it, then put it back at once
    os.umask(mask)
    return mask


def atomic_write_json(path: str | os.PathLike, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj: Any):
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj)}")


def cache_root() -> Path:
    """featcal's cache root: ``$FEATCAL_CACHE`` or the platform's user cache folder
    (``~/.cache/featcal`` on Linux, honouring ``XDG_CACHE_HOME``)."""
    env = os.environ.get("FEATCAL_CACHE")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("featcal"))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:  # pragma: no cover
        pass
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def resolve_device(name: str | torch.device | None, mps: bool = True) -> torch.device:
    """``name`` as a device; ``"auto"`` or ``None``: cuda if available, else (with ``mps``)
    Apple's mps if available, else cpu. The embedded suites' builds pass ``mps=False``:
    they have always been built on cuda or cpu, and the cache does not record the device
    in its hash."""
    if name is None or str(name) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if mps and getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(name)


def warmup_cosine(steps: int, warmup_frac: float) -> Callable[[int], float]:
    """A ``LambdaLR`` factor: linear warm-up over ``warmup_frac`` of ``steps`` (at least
    one step), then a cosine decay to 0 at ``steps`` (held at 0 beyond)."""
    warm = max(1, int(round(steps * warmup_frac)))

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        t = (step - warm) / max(1, steps - warm)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))

    return f


def train_adamw(
    model: torch.nn.Module,
    batches: Iterable[Any],
    loss_of: Callable[[Any], torch.Tensor],
    steps: int,
    lr: float,
    weight_decay: float,
    warmup_frac: float,
    ema_weight: float,
    extra_params: Sequence[torch.nn.Parameter] = (),
    desc: str = "",
    progress: bool = True,
) -> float:
    """Train ``model`` (and ``extra_params``) in place on ``batches`` (``steps`` of them),
    one step per ``loss_of(batch)``: AdamW (betas 0.9/0.98, eps 1e-6) with ``weight_decay``
    on matrices only, the ``warmup_cosine`` schedule over ``steps``, gradients clipped to
    norm 1 (the embedded suites' recipe). The model is left in eval mode. Returns the loss's
    running average (each new value weighted ``ema_weight``; nan if there was no step).

    ``batches`` is consumed lazily, one item before each ``loss_of``: callers whose batches
    and losses draw from one generator keep their order of draws."""
    from tqdm.auto import tqdm

    model.train()
    params = list(model.parameters()) + list(extra_params)
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.98), eps=1e-6,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(steps, warmup_frac))
    bar = tqdm(batches, total=steps, desc=desc, disable=not progress, leave=False)
    ema = None
    for batch in bar:
        loss = loss_of(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        value = float(loss.detach())
        # (1 - w) is exact for the suites' weights (0.1, 0.05): the recorded losses are unchanged
        ema = value if ema is None else (1.0 - ema_weight) * ema + ema_weight * value
        bar.set_postfix(loss=f"{ema:.3f}", refresh=False)
    model.eval()
    return float(ema if ema is not None else float("nan"))


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

_DTYPE_NAMES = {
    "float32": torch.float32, "fp32": torch.float32,
    "float64": torch.float64, "fp64": torch.float64, "double": torch.float64,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def as_torch_dtype(dtype: "str | torch.dtype") -> torch.dtype:
    """``torch.float32``, "float32", "fp32", "torch.bfloat16", "bf16", ... -> a torch dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).replace("torch.", "")
    if name not in _DTYPE_NAMES:
        raise ValueError(f"unknown dtype {dtype!r}; allowed: {', '.join(sorted(_DTYPE_NAMES))}")
    return _DTYPE_NAMES[name]


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, in MiB."""
    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return ru / 1024.0 if sys.platform != "darwin" else ru / (1024.0 * 1024.0)


def current_rss_mib() -> float:
    try:
        import psutil

        return psutil.Process().memory_info().rss / (1024.0 * 1024.0)
    except Exception:  # pragma: no cover
        return float("nan")


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run a block with ``n`` intra-op CPU threads (None: leave the setting), then restore it."""
    previous = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def release_freed_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc ``malloc_trim``), so
    that the resident set measured next is what is still in use."""
    import gc

    gc.collect()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)


class MemorySampler:
    """The run's own peak host RSS, sampled by a daemon thread every ``interval`` seconds
    between ``start()`` and ``stop()``, in total and per stage (``StageTimer`` names the
    stage), with the resident set at ``start()`` as the baseline.

    ``ru_maxrss`` is the process's peak over its whole life: in a sweep whose jobs share a
    process (Hydra's basic launcher, joblib workers) it only climbs. The sampler sees only
    its own run. A spike shorter than ``interval`` between two samples can be missed (every
    stage boundary is sampled too); the CUDA peak comes from the allocator and is exact.
    """

    def __init__(self, interval: float = 0.01, device: torch.device | None = None):
        import threading

        self.interval = float(interval)
        self.device = device
        self.baseline_mib = float("nan")
        self.peak_mib = float("nan")
        self.stage_peak_mib: dict[str, float] = {}
        self.stage_cuda_peak_mib: dict[str, float] = {}
        self._stack: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._process = None

    @property
    def cuda(self) -> bool:
        return self.device is not None and torch.device(self.device).type == "cuda" and torch.cuda.is_available()

    def _rss(self) -> float:
        if self._process is None:
            import psutil

            self._process = psutil.Process()
        return self._process.memory_info().rss / 2**20

    def sample(self) -> float:
        value = self._rss()
        with self._lock:
            if not value <= self.peak_mib:  # nan-safe max
                self.peak_mib = value
            for name in self._stack:
                if not value <= self.stage_peak_mib.get(name, float("nan")):
                    self.stage_peak_mib[name] = value
        return value

    def start(self) -> "MemorySampler":
        import threading

        release_freed_memory()
        self.baseline_mib = self._rss()
        self.peak_mib = self.baseline_mib
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="featcal-rss-sampler", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            with contextlib.suppress(Exception):
                self.sample()

    def stop(self) -> dict[str, Any]:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        with contextlib.suppress(Exception):
            self.sample()
        return self.summary()

    def enter(self, name: str) -> None:
        with self._lock:
            self._stack.append(name)
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        with contextlib.suppress(Exception):
            self.sample()

    def leave(self, name: str) -> None:
        with contextlib.suppress(Exception):
            self.sample()
        if self.cuda:
            peak = torch.cuda.max_memory_allocated(self.device) / 2**20
            self.stage_cuda_peak_mib[name] = max(peak, self.stage_cuda_peak_mib.get(name, 0.0))
            for outer in self._stack[:-1]:  # an enclosing stage saw this peak too
                self.stage_cuda_peak_mib[outer] = max(peak, self.stage_cuda_peak_mib.get(outer, 0.0))
        with self._lock:
            if name in self._stack:
                self._stack.remove(name)

    def summary(self) -> dict[str, Any]:
        cuda_peak = None
        if self.cuda:
            now = torch.cuda.max_memory_allocated(self.device) / 2**20
            cuda_peak = max([now, *self.stage_cuda_peak_mib.values()])
        return {
            "peak_rss_mib": self.peak_mib,
            "baseline_rss_mib": self.baseline_mib,
            "peak_rss_above_baseline_mib": self.peak_mib - self.baseline_mib,
            "stage_peak_rss_mib": dict(self.stage_peak_mib),
            "cuda_peak_mib": cuda_peak,
            "stage_cuda_peak_mib": dict(self.stage_cuda_peak_mib) if self.cuda else {},
            "rss_method": f"sampled every {self.interval * 1000:.0f} ms from the run's start (baseline: RSS at the start)",
        }


def timing_context() -> dict[str, Any]:
    """What a wall-clock number needs beside it: torch's intra-op threads, the CPUs this
    process may use, and the machine's load average (1, 5, 15 min)."""
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover - not on this platform
        load = None
    return {"torch_threads": torch.get_num_threads(), "cpus_usable": usable, "cpu_count": os.cpu_count(), "loadavg": load}


class StageTimer:
    """Wall-clock per named stage (CUDA work is synchronised at stage boundaries), with the
    process CPU time and the timing context (threads, load average) at each stage's start;
    with a ``MemorySampler`` the stage's peak memory too."""

    def __init__(self, device: torch.device | None = None, memory: MemorySampler | None = None):
        self.device = device
        self.memory = memory
        self.seconds: dict[str, float] = {}
        self.cpu_seconds: dict[str, float] = {}
        self.context: dict[str, dict[str, Any]] = {}

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self._sync()
        self.context.setdefault(name, timing_context())
        if self.memory is not None:
            self.memory.enter(name)
        start, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        except BaseException as err:
            # name the stage on the exception (innermost wins) for featcal.errors' report
            if getattr(err, "featcal_stage", None) is None:
                with contextlib.suppress(AttributeError, TypeError):
                    err.featcal_stage = name
            raise
        finally:
            self._sync()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
            self.cpu_seconds[name] = self.cpu_seconds.get(name, 0.0) + time.process_time() - cpu
            if self.memory is not None:
                self.memory.leave(name)

    def _sync(self) -> None:
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def free_mib(path: str | os.PathLike) -> float:
    """Free space (MiB) on the file system holding ``path`` (or its nearest existing parent)."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free / 2**20
