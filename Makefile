PY ?= python

.PHONY: install run test test-fast bench report

install:            ## editable install with test tools
	$(PY) -m pip install -e '.[dev]'

run:                ## the embedded default: offline, CPU, minutes
	featcal-run

test:               ## the whole test suite (what CI runs)
	$(PY) -m pytest -q

test-fast:          ## everything but the slow (cold default run, subprocess end-to-end) and GPU tests
	$(PY) -m pytest -q -m "not slow and not gpu"

bench:              ## calibrator wall-clock / memory ratios on a ViT-B/32-shaped tower
	$(PY) experiments/bench_calibration.py

report:             ## embedded benchmark figures -> results/
	$(PY) experiments/embedded_report.py
