"""A fence for running model-written Python programs (pass@k code tasks).

Each program runs in a **child process** with:

- CPU-time (``RLIMIT_CPU``), address-space (``RLIMIT_AS``) and file-size
  (``RLIMIT_FSIZE``) limits, and a wall-clock limit (the whole process group is killed);
- its **own temporary working folder** (also its ``HOME`` and ``TMPDIR``), deleted after;
- an **environment built from a whitelist** (``PATH``, locale): no tokens, keys or
  proxies from the parent (``HF_TOKEN``, ``WANDB_API_KEY``, ``AWS_*``...);
- ``python -I`` (isolated mode: no ``PYTHON*`` variables, no user site, no cwd on the path);
- **no network** where the OS allows it: ``unshare -n`` (root) or ``unshare -rn`` (an
  unprivileged user namespace); where neither works the fence says so
  (:func:`network_isolation`) and the program runs with the host's network.

This is a fence against accidents and casual misbehaviour of generated code, not a
security boundary against a determined attacker (same user, same file system outside
the working folder): run code benchmarks on a machine or container you can afford to lose.
"""
from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from typing import Any

try:
    import resource  # POSIX; imported here, never between fork and exec
except ImportError:  # pragma: no cover - Windows: run_program refuses (no rlimits)
    resource = None  # type: ignore[assignment]

#: environment variables a child may inherit (values from the parent); nothing else.
ENV_WHITELIST = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ")


@dataclass(frozen=True)
class Limits:
    cpu_seconds: int = 10
    wall_seconds: float = 20.0
    memory_mb: int = 2048
    file_size_mb: int = 64


@dataclass
class Outcome:
    status: str  # passed | failed | timeout | error
    returncode: int | None
    output: str  # the tail of stdout + stderr


@functools.lru_cache(maxsize=1)
def network_isolation() -> str:
    """How children are cut off the network: ``"unshare -n"``, ``"unshare -rn"`` or
    ``"none (...reason...)"`` (probed once by running ``true`` in a new network namespace)."""
    exe = shutil.which("unshare")
    if exe is None:
        return "none (no unshare command on this system)"
    for flags in (["-n"], ["-rn"]):
        try:
            r = subprocess.run([exe, *flags, "true"], capture_output=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if r.returncode == 0:
            return "unshare " + " ".join(flags)
    return "none (unshare cannot create a network namespace here: not root and user namespaces disabled)"


def _prefix() -> list[str]:
    how = network_isolation()
    return how.split() if how.startswith("unshare") else []


def child_env(workdir: str) -> dict[str, str]:
    env = {k: os.environ[k] for k in ENV_WHITELIST if k in os.environ}
    env.setdefault("PATH", "/usr/bin:/bin")
    env.update(HOME=workdir, TMPDIR=workdir, PYTHONDONTWRITEBYTECODE="1", PYTHONHASHSEED="0")
    return env


def describe(limits: Limits) -> dict[str, Any]:
    """The fence, for logs and results.json."""
    return {
        **asdict(limits),
        "process": "child process per program, own temporary working folder, python -I",
        "environment": "whitelist: " + ", ".join(ENV_WHITELIST) + " (+ HOME/TMPDIR = the working folder)",
        "network": network_isolation(),
    }


def _set_limits(limits: Limits) -> None:  # runs in the child between fork and exec: no imports, no locks
    cpu = int(limits.cpu_seconds)
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    mem = int(limits.memory_mb) * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
    fsize = int(limits.file_size_mb) * 2**20
    resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def run_program(program: str, limits: Limits = Limits()) -> Outcome:
    """Run ``program`` (Python source) inside the fence; ``passed`` iff it exits 0."""
    if resource is None:
        raise RuntimeError("featcal's code fence needs POSIX resource limits (Linux/macOS)")
    with tempfile.TemporaryDirectory(prefix="featcal-code-") as work:
        path = os.path.join(work, "program.py")
        with open(path, "w") as f:
            f.write(program)
        cmd = [*_prefix(), sys.executable, "-I", path]
        proc = subprocess.Popen(
            cmd, cwd=work, env=child_env(work), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, preexec_fn=lambda: _set_limits(limits), start_new_session=True, close_fds=True,
        )
        try:
            out, _ = proc.communicate(timeout=limits.wall_seconds)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            out, _ = proc.communicate()
            return Outcome("timeout", None, out.decode(errors="replace")[-2000:])
        text = out.decode(errors="replace")[-2000:]
        if proc.returncode == 0:
            return Outcome("passed", 0, text)
        return Outcome("timeout" if proc.returncode == -signal.SIGXCPU else "failed", proc.returncode, text)
