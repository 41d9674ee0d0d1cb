r"""Gradient transformations on the optax protocol, grouped by family.

Each transformation is an ``optax.GradientTransformation`` whose numerics are a small pure
function for ONE array (the ``_..._rule`` functions of each module), lifted over pytrees by
:func:`rmsjax.tree.map_rule`; the arithmetic those rules share lives in
:mod:`rmsjax._numerics`. Names, signatures and defaults are optax 0.2.x's; every deliberate
difference from optax is listed in the function's docstring under "Differences".

* :mod:`~rmsjax.transforms.scaling`: ``scale``, ``scale_by_schedule``,
  ``scale_by_learning_rate``;
* :mod:`~rmsjax.transforms.rms`: ``scale_by_rms``, ``scale_by_centered_rms``
  (``scale_by_stddev``), ``scale_by_rss``, ``scale_by_adadelta``;
* :mod:`~rmsjax.transforms.adam`: ``scale_by_adam``, ``scale_by_amsgrad``,
  ``scale_by_adam_exact_bias``, ``scale_by_adam_eps_hat``;
* :mod:`~rmsjax.transforms.momentum`: ``trace``, ``dampened_trace``;
* :mod:`~rmsjax.transforms.weight_decay`: ``add_decayed_weights``, ``decoupled_weight_decay``;
* :mod:`~rmsjax.transforms.rprop`: ``scale_by_rprop``;
* :mod:`~rmsjax.transforms.complex`: ``split_real_and_imaginary``.

Notation used in the docstrings: :math:`g` the incoming update (usually the gradient),
:math:`t` the step count after increment (the first step has :math:`t = 1`), :math:`|g|^2`
the squared modulus (:math:`g^2` for real :math:`g`).

Shared behaviour of every transformation:

* a transformation that shares its name with optax's keeps its state in optax's own
  ``NamedTuple`` classes, with optax's fields in optax's order (``rmsjax.ScaleByRmsState is
  optax.ScaleByRmsState``), so states and Orbax checkpoints move freely between the two;
  the rmsjax-only transformations have their own state classes;
* ``update`` first checks the type of the state it is given, and raises ``TypeError`` naming
  the expected and the received state type (for the state of another optimizer);
* the returned update has the gradient's dtype; state leaves keep their dtype;
* state is floating point: float32 for float16/bfloat16 leaves unless ``promote_half=False``,
  the default float dtype for integer and boolean leaves;
* ``None`` gradient leaves pass through and leave their state untouched
  (``update(None, state, params)`` returns ``None`` updates);
* a division whose denominator is exactly zero yields 0 instead of NaN/Inf (optax returns NaN
  for a zero gradient with ``eps=0``); a NaN denominator still gives NaN;
* a second moment that overflows (float32 :math:`|g| \ge 2^{64}`) is :math:`+\infty` and
  gives a zero step, never NaN (the "Numerics" paragraph of each rule); float32 denormals
  are flushed to zero by XLA's CPU backend (measured), so a denormal gradient acts as 0.
"""

from rmsjax.transforms.adam import (
    ScaleByAdamEpsHatState,
    ScaleByAdamExactBiasState,
    ScaleByAdamState,
    ScaleByAmsgradState,
    scale_by_adam,
    scale_by_adam_eps_hat,
    scale_by_adam_exact_bias,
    scale_by_amsgrad,
)
from rmsjax.transforms.complex import SplitRealAndImaginaryState, split_real_and_imaginary
from rmsjax.transforms.momentum import DampenedTraceState, TraceState, dampened_trace, trace
from rmsjax.transforms.rms import (
    ScaleByAdaDeltaState,
    ScaleByCenteredRmsState,
    ScaleByCenteredVarianceState,
    ScaleByCenteredVarianceWithCountState,
    ScaleByRmsState,
    ScaleByRmsWithCountState,
    ScaleByRssState,
    ScaleByRStdDevState,
    ScaleByRStdDevWithCountState,
    scale_by_adadelta,
    scale_by_centered_rms,
    scale_by_rms,
    scale_by_rss,
    scale_by_stddev,
)
from rmsjax.transforms.rprop import ScaleByRpropState, scale_by_rprop
from rmsjax.transforms.scaling import (
    ScaleByScheduleState,
    ScaleState,
    scale,
    scale_by_learning_rate,
    scale_by_schedule,
)
from rmsjax.transforms.weight_decay import (
    AddDecayedWeightsState,
    DecoupledWeightDecayState,
    WeightDecaySchedule,
    add_decayed_weights,
    decoupled_weight_decay,
)

__all__ = [
    "AddDecayedWeightsState",
    "DampenedTraceState",
    "DecoupledWeightDecayState",
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
    "TraceState",
    "WeightDecaySchedule",
    "add_decayed_weights",
    "dampened_trace",
    "decoupled_weight_decay",
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
    "split_real_and_imaginary",
    "trace",
]
