"""Calibration: dev tasks, and an Optuna study that tunes DySCO's knobs and registers the result.

    from calibration import CalibrationConfig, calibrate
    result = calibrate(CalibrationConfig(dev="mrcr", model="smollm2-135m", trials=20,
                                         storage="sqlite:///calibration.db"))
    print(result.table())

Modules: `tasks` (dev tasks and graders), `space` (the searched knobs), `runner` (scoring a
method on examples with prefill reuse), `study` (the study: objective, adoption rule, trials,
result), `pareto` (the speed objective: cost model, Pareto front, the point registered),
`storage` (study storages, locks, heartbeats), `workers` (extra worker processes),
`tracking` (MLflow), `cli` (the `calibrate` command), `evaluation` (`dysco eval` and the paired
statistics the study's adoption rule uses). Imports are lazy so that
`calibration.tasks` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CalibrationConfig": "calibration.study",
    "CalibrationError": "calibration.errors",
    "CalibrationResult": "calibration.study",
    "Calibration": "calibration.study",
    "calibrate": "calibration.study",
    "SearchSpace": "calibration.space",
    "ExampleRunner": "calibration.runner",
    "Method": "calibration.runner",
    "Tracker": "calibration.tracking",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'calibration' has no attribute {name!r}")
