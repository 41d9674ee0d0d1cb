r"""Weight decay: :func:`add_decayed_weights` (optax's; coupled or decoupled by its place in the
chain) and :func:`decoupled_weight_decay` (learning-rate-scaled, PyTorch's AdamW and Keras).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import optax
from jax.typing import ArrayLike

from rmsjax._types import ScalarOrSchedule
from rmsjax.moments import moment_transform
from rmsjax.validation import (
    check_learning_rate,
    check_nonneg,
)

__all__ = [
    "AddDecayedWeightsState",
    "DecoupledWeightDecayState",
    "WeightDecaySchedule",
    "add_decayed_weights",
    "decoupled_weight_decay",
]


AddDecayedWeightsState = optax.AddDecayedWeightsState
"""State of :func:`add_decayed_weights` with a constant weight decay:
``optax.AddDecayedWeightsState``, an empty ``optax.EmptyState`` (as in optax)."""

try:
    from optax.transforms._adding import WeightDecaySchedule
except ImportError:  # pragma: no cover - an optax without it has no such layout to match

    class WeightDecaySchedule(NamedTuple):  # type: ignore[no-redef]
        """State of :func:`add_decayed_weights` with a schedule: the update count (int32)."""

        count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax


def _decay_rule(g: jax.Array, p: jax.Array, *, coefficient: ArrayLike) -> tuple[jax.Array]:
    return (g + coefficient * p,)


def add_decayed_weights(
    weight_decay: ScalarOrSchedule = 0.0,
    mask: Any | Callable[[Any], Any] | None = None,
) -> optax.GradientTransformation:
    r"""Add the parameters scaled by the weight decay: :math:`u_t = g_t + \lambda_t\,\theta_t`.

    Placed before an adaptive scaling it is L2 regularisation ("coupled", torch's
    ``weight_decay``); placed after it, as in :func:`rmsjax.adamw`, it is decoupled weight
    decay (Loshchilov & Hutter).

    Args:
      weight_decay: :math:`\lambda`, a float >= 0 or a schedule ``count -> lambda`` evaluated
        at 0, 1, 2, ...
      mask: a tree of booleans with the params' structure (or a prefix of it), or a callable
        ``params -> such a tree``; leaves marked False are left undecayed (via
        ``optax.masked``).

    Same numbers and states as ``optax.add_decayed_weights``: ``optax.EmptyState`` for a
    constant ``weight_decay``, optax's ``WeightDecaySchedule(count)`` (exported as
    ``rmsjax.WeightDecaySchedule``) for a schedule, wrapped in ``optax.MaskedState`` with a
    ``mask``. ``update(None, state, params)`` returns ``(None, state)`` as in optax; with a
    constant ``weight_decay`` (and no ``mask``), ``update`` accepts any state and returns it
    unchanged, as optax's does. Raises ``ValueError`` when ``params`` is not given.
    """
    check_nonneg("weight_decay", weight_decay, schedule=True)
    if callable(weight_decay):
        schedule = weight_decay
        return _params_rule_transform(
            "add_decayed_weights", _decay_rule, schedule, WeightDecaySchedule, mask
        )
    return _params_rule_transform(
        "add_decayed_weights", _decay_rule, lambda _: weight_decay, AddDecayedWeightsState, mask
    )


def _params_rule_transform(
    name: str,
    rule: Callable[..., tuple[jax.Array]],
    coefficient: Callable[[Any], ArrayLike],
    state: type,
    mask: Any | Callable[[Any], Any] | None,
) -> optax.GradientTransformation:
    """``u_t = rule(g_t, params, coefficient=coefficient(count))`` (count 0, 1, 2, ...; None
    when the state has no count), optionally masked: :func:`add_decayed_weights` and
    :func:`decoupled_weight_decay`."""
    transform = moment_transform(
        name,
        rule,
        state=state,
        step_args=lambda count: dict(coefficient=coefficient(count)),
        with_params=True,
        stage=name,
    )
    return transform if mask is None else optax.masked(transform, mask)


class DecoupledWeightDecayState(NamedTuple):
    """State of :func:`decoupled_weight_decay`: update count (int32) for schedules."""

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as optax's states do


def _decoupled_decay_rule(
    g: jax.Array, p: jax.Array, *, coefficient: ArrayLike
) -> tuple[jax.Array]:
    return (g - coefficient * p,)


def decoupled_weight_decay(
    weight_decay: ScalarOrSchedule,
    learning_rate: ScalarOrSchedule,
    mask: Any | Callable[[Any], Any] | None = None,
) -> optax.GradientTransformation:
    r"""Subtract :math:`\eta_t \lambda_t \theta` from the (final) update.

    .. math::  u_t = g_t - \eta_t\,\lambda_t\,\theta_{t-1}

    Placed LAST in a chain (after the learning rate and any momentum buffer), it gives the
    decoupled weight decay of ``torch.optim.AdamW`` (:math:`\theta \leftarrow
    \theta(1 - \eta\lambda)` before the step) and of every Keras optimizer's ``weight_decay``
    (:math:`\theta \leftarrow \theta - \theta\lambda\eta`): the decay never enters a moment or
    momentum buffer, and it follows a learning-rate schedule.

    Args:
      weight_decay: :math:`\lambda`, a float >= 0 or a schedule ``count -> lambda``.
      learning_rate: :math:`\eta`, a float >= 0 or a schedule ``count -> eta`` (pass the same
        one as to the optimizer); counts are 0, 1, 2, ...
      mask: which leaves are decayed (a boolean tree or a callable returning one), as in
        :func:`rmsjax.add_decayed_weights`.

    Equivalent to ``chain(add_decayed_weights(wd), scale_by_learning_rate(lr))`` applied to the
    parameters alone; optax has no single transformation for it. Raises ``ValueError`` when
    ``params`` is not given to ``update``.
    """
    check_nonneg("weight_decay", weight_decay, schedule=True)
    check_learning_rate("learning_rate", learning_rate)

    def coefficient(count: Any) -> Any:
        wd = weight_decay(count) if callable(weight_decay) else weight_decay
        lr = learning_rate(count) if callable(learning_rate) else learning_rate
        return lr * wd

    return _params_rule_transform(
        "decoupled_weight_decay",
        _decoupled_decay_rule,
        coefficient,
        DecoupledWeightDecayState,
        mask,
    )
