"""``python -m featcal.report`` is ``featcal-report``."""
from featcal.report.cli import main

raise SystemExit(main())
