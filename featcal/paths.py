"""Where the shipped configs and the published numbers live.

In a checkout (editable install) they are the top-level ``conf/`` and ``results/paper/``;
an installed wheel carries copies under ``<prefix>/share/featcal/`` (``data-files`` in
pyproject.toml), so ``featcal-run`` works from any folder without the source tree.
``FEATCAL_CONF`` overrides the config folder.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

_SOURCE_ROOT = Path(__file__).resolve().parent.parent
_SHARE = Path(sys.prefix) / "share" / "featcal"


def _first(*candidates: Path) -> Path:
    for c in candidates:
        if c.is_dir():
            return c
    return candidates[0]


def conf_dir() -> Path:
    """The Hydra config folder: ``FEATCAL_CONF``, the checkout's ``conf/``, or the wheel's copy."""
    env = os.environ.get("FEATCAL_CONF")
    if env:
        return Path(env)
    return _first(_SOURCE_ROOT / "conf", _SHARE / "conf")


def paper_dir() -> Path:
    """The published numbers (``results/paper/*.csv``), or the wheel's copy."""
    return _first(_SOURCE_ROOT / "results" / "paper", _SHARE / "paper")
