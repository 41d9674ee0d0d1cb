"""rmsjax: exact, sturdy RMSProp-family gradient transformations on the optax protocol.

Swap ``optax.`` for ``rmsjax.``: names, signatures, defaults and numbers are optax's, except
where optax returns NaN or overflows (each such difference is documented on the function).
"""

import importlib
from typing import Any

from optax import GradientTransformation, GradientTransformationExtraArgs, chain

from rmsjax.optimizers import adamw, rmsprop
from rmsjax.transforms import (
    AddDecayedWeightsState,
    ScaleByAdamState,
    ScaleByCenteredRmsState,
    ScaleByRmsState,
    ScaleByRStdDevState,
    ScaleByScheduleState,
    ScaleState,
    TraceState,
    add_decayed_weights,
    scale,
    scale_by_adam,
    scale_by_centered_rms,
    scale_by_learning_rate,
    scale_by_rms,
    scale_by_schedule,
    scale_by_stddev,
    trace,
)
from rmsjax.updates import apply_updates

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # rmsjax.fused and rmsjax.native load on first use (and `python -m rmsjax.native` runs
    # without the module having been imported already).
    if name in ("fused", "native"):
        return importlib.import_module(f"rmsjax.{name}")
    raise AttributeError(f"module 'rmsjax' has no attribute {name!r}")


__all__ = [
    "AddDecayedWeightsState",
    "GradientTransformation",
    "GradientTransformationExtraArgs",
    "ScaleByAdamState",
    "ScaleByCenteredRmsState",
    "ScaleByRStdDevState",
    "ScaleByRmsState",
    "ScaleByScheduleState",
    "ScaleState",
    "TraceState",
    "add_decayed_weights",
    "adamw",
    "apply_updates",
    "chain",
    "fused",
    "native",
    "rmsprop",
    "scale",
    "scale_by_adam",
    "scale_by_centered_rms",
    "scale_by_learning_rate",
    "scale_by_rms",
    "scale_by_schedule",
    "scale_by_stddev",
    "trace",
]
