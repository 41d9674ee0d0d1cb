"""rmsjax: exact, sturdy RMSProp-family gradient transformations on the optax protocol.

Swap ``optax.`` for ``rmsjax.``: names, signatures, defaults and numbers are optax's, except
where optax returns NaN or overflows (each such difference is documented on the function).
"""

from optax import GradientTransformation, GradientTransformationExtraArgs, chain

from rmsjax.optimizers import adadelta, adagrad, adam, adamw, rmsprop, rprop, sgd
from rmsjax.schedules import (
    constant_schedule,
    cosine_decay_schedule,
    exponential_decay,
    inverse_time_decay,
    join_schedules,
    piecewise_constant_schedule,
    polynomial_schedule,
    warmup_cosine_decay_schedule,
)
from rmsjax.transforms import (
    AddDecayedWeightsState,
    ScaleByAdaDeltaState,
    ScaleByAdamState,
    ScaleByCenteredRmsState,
    ScaleByRmsState,
    ScaleByRpropState,
    ScaleByRssState,
    ScaleByRStdDevState,
    ScaleByScheduleState,
    ScaleState,
    TraceState,
    add_decayed_weights,
    scale,
    scale_by_adadelta,
    scale_by_adam,
    scale_by_centered_rms,
    scale_by_learning_rate,
    scale_by_rms,
    scale_by_rprop,
    scale_by_rss,
    scale_by_schedule,
    scale_by_stddev,
    trace,
)
from rmsjax.updates import apply_updates

__version__ = "0.1.0"

__all__ = [
    "AddDecayedWeightsState",
    "GradientTransformation",
    "GradientTransformationExtraArgs",
    "ScaleByAdaDeltaState",
    "ScaleByAdamState",
    "ScaleByCenteredRmsState",
    "ScaleByRStdDevState",
    "ScaleByRmsState",
    "ScaleByRpropState",
    "ScaleByRssState",
    "ScaleByScheduleState",
    "ScaleState",
    "TraceState",
    "adadelta",
    "adagrad",
    "adam",
    "adamw",
    "add_decayed_weights",
    "apply_updates",
    "chain",
    "constant_schedule",
    "cosine_decay_schedule",
    "exponential_decay",
    "inverse_time_decay",
    "join_schedules",
    "piecewise_constant_schedule",
    "polynomial_schedule",
    "rmsprop",
    "rprop",
    "scale",
    "scale_by_adadelta",
    "scale_by_adam",
    "scale_by_centered_rms",
    "scale_by_learning_rate",
    "scale_by_rms",
    "scale_by_rprop",
    "scale_by_rss",
    "scale_by_schedule",
    "scale_by_stddev",
    "sgd",
    "trace",
    "warmup_cosine_decay_schedule",
]
