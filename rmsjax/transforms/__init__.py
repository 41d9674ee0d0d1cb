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

* the returned update has the gradient's dtype; state leaves keep their dtype;
* state of float16/bfloat16 leaves is kept in float32 unless ``promote_half=False``;
* ``None`` gradient leaves pass through and leave their state untouched;
* a division whose denominator is exactly zero yields 0 instead of NaN/Inf (optax returns NaN
  for a zero gradient with ``eps=0``).
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
    ScaleByRmsState,
    ScaleByRssState,
    ScaleByRStdDevState,
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
    "ScaleByRStdDevState",
    "ScaleByRmsState",
    "ScaleByRpropState",
    "ScaleByRssState",
    "ScaleByScheduleState",
    "ScaleState",
    "SplitRealAndImaginaryState",
    "TraceState",
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
