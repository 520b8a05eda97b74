"""Shared pieces of the subprocess end-to-end tests: an isolated environment and a
runner for ``python -m <module>`` that fails with the tail of its output."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def isolated_env(root: Path) -> dict[str, str]:
    """The host environment with its own cache and HOME (no W&B credentials from the host)."""
    e = dict(os.environ)
    e["FEATCAL_CACHE"] = str(root / "cache")
    e["HOME"] = str(root / "home")
    e.pop("WANDB_API_KEY", None)
    e["WANDB_SILENT"] = "true"
    e["HYDRA_FULL_ERROR"] = "1"
    return e


def run_module(module: str, args, env, cwd, check: bool = True, timeout: int = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", module, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{module} {list(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc
