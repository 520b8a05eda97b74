"""Post-merging calibrators. See ``featcal.calibration.base.Calibrator``."""
from featcal.calibration.base import CalibratedModel, CalibrationReport, Calibrator, NoCalibration

__all__ = ["CalibratedModel", "CalibrationReport", "Calibrator", "NoCalibration"]
