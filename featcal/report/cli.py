"""``featcal-report``: the one reporting tool, its commands dispatched by the first argument.

    featcal-report <sweeps | CSVs> [--out DIR]    tables, comparison with the paper, figures (``report``)
    featcal-report collect <sweep> [--out DIR]    one long CSV + Markdown table of a sweep
    featcal-report table <collected.csv> [--out]  TA vs TA + each calibrator per budget, gap closed
    featcal-report paper <collected.csv> [...]    a collected CSV beside the published numbers
    featcal-report figures <sweeps | CSVs> [...]  only the figures

Without a command name the arguments are the default ``report`` command's, so
``featcal-report multirun/<date>/<time>`` keeps working; ``featcal-report report <folder>``
reports a folder that happens to be named like a command.
"""
from __future__ import annotations

import sys
from typing import Callable

COMMANDS = ("report", "collect", "table", "paper", "figures")


def _command(name: str) -> Callable[[list[str] | None], int]:
    """The ``main(argv)`` of a command, imported only when it runs."""
    if name == "collect":
        from featcal.report.collect import main
    elif name == "table":
        from featcal.report.calibration_table import main
    elif name == "paper":
        from featcal.report.paper import main
    elif name == "figures":
        from featcal.report.sweep import figures_main as main
    else:
        from featcal.report.sweep import main
    return main


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        print("\n`featcal-report <command> -h` describes a command; `featcal-report report -h` the default one.")
        return 0
    if argv and argv[0] in COMMANDS:
        return _command(argv[0])(argv[1:])
    return _command("report")(argv)
