"""Post-merging calibrators. See ``featcal.calibration.base.Calibrator``."""
from featcal.calibration.base import CalibratedModel, Calibrator, NoCalibration

__all__ = ["CalibratedModel", "Calibrator", "NoCalibration"]
