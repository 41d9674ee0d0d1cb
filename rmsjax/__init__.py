"""rmsjax: exact, sturdy RMSProp-family gradient transformations on the optax protocol.

Swap ``optax.`` for ``rmsjax.``: names, signatures, defaults and numbers are optax's, except
where optax returns NaN or overflows (each such difference is documented on the function).
"""

import importlib
from typing import Any

from optax import GradientTransformation, GradientTransformationExtraArgs, chain

from rmsjax import compat, quantization
from rmsjax._numerics import precise_debias
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
from rmsjax.sharding import state_sharding
from rmsjax.stochastic import stochastic_round
from rmsjax.storage import (
    Factored,
    Float8,
    Quantized,
    StochasticRounding,
    Storage,
    StoredArray,
    factored,
    float8,
    quantized,
    stochastic_rounding,
)
from rmsjax.transforms import (
    AddDecayedWeightsState,
    DampenedTraceState,
    DecoupledWeightDecayState,
    ScaleByAdaDeltaState,
    ScaleByAdamEpsHatState,
    ScaleByAdamExactBiasState,
    ScaleByAdamState,
    ScaleByAmsgradState,
    ScaleByCenteredRmsState,
    ScaleByCenteredVarianceState,
    ScaleByCenteredVarianceWithCountState,
    ScaleByRmsState,
    ScaleByRmsWithCountState,
    ScaleByRpropState,
    ScaleByRssState,
    ScaleByRStdDevState,
    ScaleByRStdDevWithCountState,
    ScaleByScheduleState,
    ScaleState,
    SplitRealAndImaginaryState,
    TraceState,
    WeightDecaySchedule,
    add_decayed_weights,
    dampened_trace,
    decoupled_weight_decay,
    scale,
    scale_by_adadelta,
    scale_by_adam,
    scale_by_adam_eps_hat,
    scale_by_adam_exact_bias,
    scale_by_amsgrad,
    scale_by_centered_rms,
    scale_by_learning_rate,
    scale_by_rms,
    scale_by_rprop,
    scale_by_rss,
    scale_by_schedule,
    scale_by_stddev,
    split_real_and_imaginary,
    trace,
)
from rmsjax.updates import apply_updates, apply_updates_stochastic

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # rmsjax.fused and rmsjax.native load on first use (and `python -m rmsjax.native` runs
    # without the module having been imported already).
    if name in ("fused", "native"):
        return importlib.import_module(f"rmsjax.{name}")
    raise AttributeError(f"module 'rmsjax' has no attribute {name!r}")


__all__ = [
    "AddDecayedWeightsState",
    "DampenedTraceState",
    "DecoupledWeightDecayState",
    "Factored",
    "Float8",
    "GradientTransformation",
    "GradientTransformationExtraArgs",
    "Quantized",
    "ScaleByAdaDeltaState",
    "ScaleByAdamEpsHatState",
    "ScaleByAdamExactBiasState",
    "ScaleByAdamState",
    "ScaleByAmsgradState",
    "ScaleByCenteredRmsState",
    "ScaleByCenteredVarianceState",
    "ScaleByCenteredVarianceWithCountState",
    "ScaleByRStdDevState",
    "ScaleByRStdDevWithCountState",
    "ScaleByRmsState",
    "ScaleByRmsWithCountState",
    "ScaleByRpropState",
    "ScaleByRssState",
    "ScaleByScheduleState",
    "ScaleState",
    "SplitRealAndImaginaryState",
    "StochasticRounding",
    "Storage",
    "StoredArray",
    "TraceState",
    "WeightDecaySchedule",
    "adadelta",
    "adagrad",
    "adam",
    "adamw",
    "add_decayed_weights",
    "apply_updates",
    "apply_updates_stochastic",
    "chain",
    "compat",
    "constant_schedule",
    "cosine_decay_schedule",
    "dampened_trace",
    "decoupled_weight_decay",
    "exponential_decay",
    "factored",
    "float8",
    "fused",
    "inverse_time_decay",
    "join_schedules",
    "native",
    "piecewise_constant_schedule",
    "polynomial_schedule",
    "precise_debias",
    "quantization",
    "quantized",
    "rmsprop",
    "rprop",
    "scale",
    "scale_by_adadelta",
    "scale_by_adam",
    "scale_by_adam_eps_hat",
    "scale_by_adam_exact_bias",
    "scale_by_amsgrad",
    "scale_by_centered_rms",
    "scale_by_learning_rate",
    "scale_by_rms",
    "scale_by_rprop",
    "scale_by_rss",
    "scale_by_schedule",
    "scale_by_stddev",
    "sgd",
    "split_real_and_imaginary",
    "state_sharding",
    "stochastic_round",
    "stochastic_rounding",
    "trace",
    "warmup_cosine_decay_schedule",
]
