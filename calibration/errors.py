"""The one error type of calibration: bad input, or a study, storage or profile that does not fit."""


class CalibrationError(ValueError):
    """Bad input to a calibration (unknown task, wrong profile, a study made differently …)."""
