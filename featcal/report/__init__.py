"""Reporting: one run's result files and the ``featcal-report`` tool for sweeps.

- ``run_tables``: a run's per-task table, long rows and results files (``featcal-run``).
- ``cli``: ``featcal-report`` and its commands (``report``, the default; ``collect``,
  ``table``, ``paper``, ``figures``).
- ``scan``: every job folder of a sweep (complete, incomplete, unreadable);
  ``config_keys``: what tells runs apart; ``collect``: the long CSV of a sweep.
- ``load``, ``sweep_tables``, ``paper``, ``figures``, ``wandb_report``, ``sweep``: the
  sweep report (tables, comparison with the published numbers, figures, W&B report run);
  ``calibration_table``: TA vs TA + each calibrator per budget.
"""
