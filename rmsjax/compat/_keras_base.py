r"""What every Keras 3 optimizer does around its own rule (``keras.optimizers.Optimizer``).

Keras' ``BaseOptimizer.apply`` runs, on each call (the jax backend, Keras 3.15):

1. ``loss_scale_factor``: every gradient is divided by it.
2. ``gradient_accumulation_steps`` :math:`N`: the gradients are summed over calls; on every
   :math:`N`-th call (``(iterations_raw + 1) % N == 0``) the sum is divided by :math:`N` and
   steps 3-4 run on that mean, otherwise nothing but the sum changes.
3. ``clipnorm`` (each variable's gradient on its own), ``global_clipnorm`` (all together) or
   ``clipvalue`` (each entry); at most one of the three.
4. Weight decay, then the optimizer's own rule, with the learning rate (schedule) evaluated at the
   RAW call count; the rule's own step counter (Adam's bias corrections) is the number of
   updates done, ``iterations_raw // N``.
5. ``use_ema``: :math:`a \leftarrow \mu a + (1-\mu)\theta` with :math:`\mu` =
   ``ema_momentum`` (:math:`\mu = 0` while ``iterations_raw // N == 0``, so the average starts
   at the first values), on EVERY call, accumulating ones included. With
   ``ema_overwrite_frequency`` :math:`F`, the parameters are replaced by the average on calls
   where ``(iterations_raw // N + 1) % F == 0`` (with accumulation, that is :math:`N`
   consecutive calls).
6. The raw call count advances.

:func:`keras_chain` builds that as an optax chain: ``[unscale] -> [accumulate_gradients(
[clip] -> rule -> [decoupled_weight_decay])] -> [parameter_ema]``, each link present only when
its argument is set. The links are optax-protocol transformations; the state stays a pytree.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike

from rmsjax import transforms as T
from rmsjax._types import ScalarOrSchedule
from rmsjax.tree import map_rule
from rmsjax.validation import check_in_range, is_concrete

__all__ = [
    "AccumulationState",
    "EmaState",
    "accumulate_gradients",
    "clip_by_global_norm",
    "clip_by_norm",
    "finalize_variable_values",
    "keras_chain",
    "parameter_ema",
    "unscale",
]


# --------------------------------------------------------------------------------------------
# Validation of the BaseOptimizer arguments (Keras' own names)
# --------------------------------------------------------------------------------------------


def _check_positive(name: str, value: Any) -> None:
    if value is not None:
        check_in_range(
            name,
            value,
            low=0.0,
            low_open=True,
            hint="Pass None to switch it off (Keras silently ignores values <= 0).",
        )


def _check_static_int(name: str, value: Any, low: int, meaning: str) -> None:
    """``value`` must be None or a Python int >= ``low``: it decides which calls do what."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        traced = not is_concrete(value) or hasattr(value, "shape")
        raise TypeError(
            f"`{name}` must be None or a Python int >= {low} ({meaning}), got {value!r}."
            + (
                f" Under optax.inject_hyperparams, list {name!r} in `static_args`."
                if traced
                else ""
            )
        )
    check_in_range(name, value, low=low, hint="Pass None to switch it off.")


def _check_exclusive_clipping(clipnorm: Any, clipvalue: Any, global_clipnorm: Any) -> None:
    given = {
        k: v
        for k, v in (
            ("clipnorm", clipnorm),
            ("clipvalue", clipvalue),
            ("global_clipnorm", global_clipnorm),
        )
        if v is not None
    }
    if len(given) > 1:
        shown = ", ".join(f"{k}={v!r}" for k, v in given.items())
        raise ValueError(
            f"Only one of `clipnorm`, `clipvalue` and `global_clipnorm` can be set, got {shown}. "
            "Keras refuses the combination too; chain a second clipping transformation yourself "
            "if you need both."
        )


def _exclusion_mask(patterns: str | Sequence[str] | None) -> Callable[[Any], Any] | None:
    """A ``mask`` for :func:`rmsjax.decoupled_weight_decay`: False where a pattern matches."""
    if patterns is None:
        return None
    names = [patterns] if isinstance(patterns, str) else list(patterns)
    if not all(isinstance(n, str) for n in names):
        raise TypeError(
            "`exclude_from_weight_decay` must be a string or a sequence of strings (regular "
            f"expressions searched in each leaf's key path), got {patterns!r}."
        )
    if not names:
        return None
    pattern = re.compile("|".join(sorted(set(names))))

    def mask(params: Any) -> Any:
        return jax.tree_util.tree_map_with_path(
            lambda path, _: pattern.search(jax.tree_util.keystr(path)) is None, params
        )

    return mask


# --------------------------------------------------------------------------------------------
# The links
# --------------------------------------------------------------------------------------------


def unscale(loss_scale_factor: ArrayLike) -> optax.GradientTransformation:
    r"""Divide every gradient by ``loss_scale_factor``: :math:`u = g / s` (Keras' unscaling).

    Args:
      loss_scale_factor: :math:`s`, > 0: the factor the loss was multiplied by.

    A division, as in Keras (``optax.scale(1 / s)`` rounds differently).
    """
    _check_positive("loss_scale_factor", loss_scale_factor)

    def update_fn(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        del params
        out, _ = map_rule(lambda g: (g / loss_scale_factor,), updates)
        return out, state

    return optax.GradientTransformation(optax.init_empty_state, update_fn)


def _clip_by_norm_rule(g: jax.Array, clipnorm: ArrayLike) -> tuple[jax.Array]:
    l2sum = jnp.sum(jnp.square(jnp.abs(g)))
    positive = l2sum > 0
    l2norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, l2sum, 1)), l2sum)
    return (g * clipnorm / jnp.maximum(l2norm, clipnorm),)


def clip_by_norm(clipnorm: ArrayLike) -> optax.GradientTransformation:
    r"""Clip each leaf's gradient to an L2 norm of at most ``clipnorm`` (Keras' ``clipnorm``).

    .. math::  u = g\,c \,/\, \max(\lVert g \rVert_2, c)

    with the norm over the leaf alone, computed as Keras does (NaN-safe at :math:`g = 0`).

    Args:
      clipnorm: :math:`c`, > 0.

    Differences: optax has no per-leaf norm clipping (``optax.clip_by_block_rms`` clips the
    RMS, ``optax.clip_by_global_norm`` the norm of the whole tree); torch's
    ``clip_grad_norm_`` is global.
    """
    _check_positive("clipnorm", clipnorm)

    def update_fn(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        del params
        out, _ = map_rule(lambda g: _clip_by_norm_rule(g, clipnorm), updates)
        return out, state

    return optax.GradientTransformation(optax.init_empty_state, update_fn)


def clip_by_global_norm(global_clipnorm: ArrayLike) -> optax.GradientTransformation:
    r"""Scale the whole gradient tree to a global L2 norm of at most ``global_clipnorm``.

    .. math::
      n = \sqrt{\textstyle\sum_\text{leaves} \lVert g \rVert_2^2}, \qquad
      u = g \cdot c\,\min(1/n,\ 1/c) + (n - n)

    This is Keras' formula: the factor is :math:`c \cdot (1/c)` when nothing is clipped, which
    rounds to 1 only for some :math:`c`, and a non-finite norm makes every entry NaN.

    Args:
      global_clipnorm: :math:`c`, > 0.

    Differences from ``optax.clip_by_global_norm``: optax returns :math:`g` untouched below
    the threshold and computes :math:`(g / n)\,c` above it; the results agree to rounding.
    """
    _check_positive("global_clipnorm", global_clipnorm)
    inverse = 1.0 / global_clipnorm  # Keras takes this reciprocal in Python (float64)

    def update_fn(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        del params
        leaves = jax.tree.leaves(updates)
        if not leaves:
            return updates, state
        norm = jnp.sqrt(jnp.sum(jnp.stack([jnp.sum(jnp.square(jnp.abs(g))) for g in leaves])))
        factor = global_clipnorm * jnp.minimum(1.0 / norm, inverse) + (norm - norm)
        out, _ = map_rule(lambda g: (g * factor,), updates)
        return out, state

    return optax.GradientTransformation(optax.init_empty_state, update_fn)


class AccumulationState(NamedTuple):
    """State of :func:`accumulate_gradients`.

    ``count``: calls so far (int32); ``acc``: the sum of the gradients since the last update
    (parameter dtype); ``inner``: the wrapped transformation's state, advanced only on updates.
    """

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as optax's states do
    acc: Any
    inner: Any


def accumulate_gradients(
    inner: optax.GradientTransformation, steps: int
) -> optax.GradientTransformation:
    r"""Keras' ``gradient_accumulation_steps``: run ``inner`` on every ``steps``-th call only.

    On call :math:`c = 0, 1, 2, \dots`: if :math:`(c + 1) \bmod N = 0`, ``inner`` is given the
    mean :math:`(g_c + A)/N` of the gradients since its last update and its update is returned;
    otherwise the update is zero and :math:`A \leftarrow A + g_c`, with ``inner``'s state
    untouched. ``inner`` therefore counts updates (0, 1, 2, ...), not calls: a Keras
    learning-rate schedule, which sees the call count, must be given to ``inner`` as
    ``k -> schedule(N k + N - 1)`` (:func:`keras_chain` does this).

    Args:
      inner: the transformation to run on the mean gradient.
      steps: :math:`N`, a Python int >= 2.

    Differences from ``optax.MultiSteps``: the gradients are summed and divided by :math:`N`
    (MultiSteps keeps a running mean, which rounds differently), there is no "skip" logic, and
    the result is an ordinary ``GradientTransformation`` whose state is
    :class:`AccumulationState`.
    """
    _check_static_int("gradient_accumulation_steps", steps, 2, "gradients are summed per update")

    def init_fn(params: Any) -> AccumulationState:
        acc = jax.tree.map(jnp.zeros_like, params)
        return AccumulationState(count=jnp.zeros([], jnp.int32), acc=acc, inner=inner.init(params))

    def update_fn(
        updates: Any, state: AccumulationState, params: Any = None
    ) -> tuple[Any, AccumulationState]:
        is_update = (state.count + 1) % steps == 0

        def rule(g: jax.Array, acc: jax.Array) -> tuple[jax.Array, jax.Array]:
            total = g + acc
            return total / steps, jnp.where(is_update, jnp.zeros_like(total), total)

        mean, (acc,) = map_rule(rule, updates, (state.acc,), what="gradient accumulators")
        out, inner_state = jax.lax.cond(
            is_update,
            lambda: inner.update(mean, state.inner, params),
            lambda: (jax.tree.map(jnp.zeros_like, mean), state.inner),
        )
        return out, AccumulationState(
            count=optax.safe_increment(state.count), acc=acc, inner=inner_state
        )

    return optax.GradientTransformation(init_fn, update_fn)


class EmaState(NamedTuple):
    """State of :func:`parameter_ema`: calls so far (int32) and the moving average of the
    parameters (a tree like the params). Read it with :func:`finalize_variable_values`."""

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as optax's states do
    ema: Any


def parameter_ema(
    ema_momentum: ArrayLike = 0.99,
    ema_overwrite_frequency: int | None = None,
    *,
    accumulation_steps: int = 1,
) -> optax.GradientTransformation:
    r"""Keras' ``use_ema``: a moving average of the parameters, kept in the state.

    Placed LAST in a chain. With :math:`\theta' = \theta + u` the parameters after this call's
    update and :math:`i = \lfloor c / N \rfloor` the Keras ``iterations`` (:math:`c` = calls so
    far, :math:`N` = ``accumulation_steps``):

    .. math::
      \mu_i = 0 \text{ if } i = 0 \text{ else } \mu, \qquad
      a \leftarrow \mu_i\, a + (1 - \mu_i)\, \theta'

    and, when ``ema_overwrite_frequency`` :math:`F` is set and :math:`(i + 1) \bmod F = 0`,
    the update becomes :math:`a - \theta` so that the parameters are replaced by the average.

    Args:
      ema_momentum: :math:`\mu`, in [0, 1].
      ema_overwrite_frequency: ``None`` (never overwrite) or a Python int >= 1.
      accumulation_steps: :math:`N`, the ``gradient_accumulation_steps`` of the chain (1 when
        there is no accumulation).

    The parameters must be updated with ``optax.apply_updates`` / ``rmsjax.apply_updates``
    (plain addition): the average is taken of :math:`\theta + u`. After an overwrite the
    parameters equal the average to within one rounding of :math:`\theta + (a - \theta)`
    (Keras assigns it exactly). The average starts as a copy of the parameters (Keras starts
    at zeros; the two agree from the first update on). optax has no counterpart
    (``optax.ema`` averages updates, not parameters).
    """
    check_in_range("ema_momentum", ema_momentum, low=0.0, high=1.0)
    _check_static_int(
        "ema_overwrite_frequency", ema_overwrite_frequency, 1, "calls between overwrites"
    )
    frequency = ema_overwrite_frequency

    def init_fn(params: Any) -> EmaState:
        return EmaState(
            count=jnp.zeros([], jnp.int32),
            ema=jax.tree.map(lambda p: jnp.array(p, copy=True), params),
        )

    def update_fn(updates: Any, state: EmaState, params: Any = None) -> tuple[Any, EmaState]:
        if params is None:
            raise ValueError(
                "The moving average of the parameters (`use_ema`) needs them: call "
                "`update(grads, state, params)`."
            )
        iterations = state.count // accumulation_steps

        def rule(u: jax.Array, avg: jax.Array, p: jax.Array) -> tuple[jax.Array, jax.Array]:
            new = (p + u).astype(p.dtype)
            momentum = (iterations != 0).astype(avg.dtype) * ema_momentum
            avg = momentum * avg + (1 - momentum) * new
            if frequency is None:
                return u, avg
            return jnp.where((iterations + 1) % frequency == 0, avg - p, u), avg

        out, (ema,) = map_rule(rule, updates, (state.ema,), (params,), what="parameter average")
        return out, EmaState(count=optax.safe_increment(state.count), ema=ema)

    return optax.GradientTransformation(init_fn, update_fn)


def finalize_variable_values(params: Any, state: Any) -> Any:
    """The parameters to keep at the end of training: the moving average when ``use_ema``.

    The counterpart of Keras' ``optimizer.finalize_variable_values(model.variables)``: returns
    the average held in the :class:`EmaState` found in ``state`` (the optimizer state, possibly
    nested in chains, ``inject_hyperparams`` or ``MultiSteps``), or ``params`` unchanged when
    the optimizer keeps no average. Nothing is modified: assign the result yourself.
    """
    found = [
        s
        for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, EmaState))
        if isinstance(s, EmaState)
    ]
    if not found:
        return params
    if len(found) > 1:
        raise ValueError(
            f"The optimizer state holds {len(found)} parameter averages (EmaState); pass the "
            "state of one optimizer."
        )
    return found[0].ema


# --------------------------------------------------------------------------------------------
# The chain
# --------------------------------------------------------------------------------------------


def _at_call_count(learning_rate: ScalarOrSchedule, steps: int | None) -> ScalarOrSchedule:
    """With accumulation, the inner chain counts updates k; Keras evaluates the schedule at the
    call count of the k-th update, N k + N - 1."""
    if steps is None or not callable(learning_rate):
        return learning_rate
    schedule = learning_rate
    return lambda count: schedule(steps * count + steps - 1)


def keras_chain(
    rule: Callable[[ScalarOrSchedule], list[optax.GradientTransformation]],
    *,
    learning_rate: ScalarOrSchedule,
    weight_decay: ScalarOrSchedule | None,
    clipnorm: ArrayLike | None,
    clipvalue: ArrayLike | None,
    global_clipnorm: ArrayLike | None,
    use_ema: bool,
    ema_momentum: ArrayLike,
    ema_overwrite_frequency: int | None,
    loss_scale_factor: ArrayLike | None,
    gradient_accumulation_steps: int | None,
    name: str | None,
    exclude_from_weight_decay: str | Sequence[str] | None,
) -> optax.GradientTransformation:
    """An optimizer's ``rule(learning_rate)`` links inside Keras' BaseOptimizer machinery.

    See the module docstring for the order. ``name`` is accepted and ignored (it names Keras
    variables; optax states are unnamed).
    """
    del name
    _check_exclusive_clipping(clipnorm, clipvalue, global_clipnorm)
    mask = _exclusion_mask(exclude_from_weight_decay)
    # Checked even without use_ema (Keras ignores it then): a bad value is a mistake either way.
    check_in_range("ema_momentum", ema_momentum, low=0.0, high=1.0)

    lr = _at_call_count(learning_rate, gradient_accumulation_steps)
    clipping = []
    if clipnorm is not None:
        clipping.append(clip_by_norm(clipnorm))
    if global_clipnorm is not None:
        clipping.append(clip_by_global_norm(global_clipnorm))
    if clipvalue is not None:
        _check_positive("clipvalue", clipvalue)
        clipping.append(optax.clip(clipvalue))  # jnp.clip(g, -v, v), as Keras
    decay = [] if weight_decay is None else [T.decoupled_weight_decay(weight_decay, lr, mask)]
    links = [*clipping, *rule(lr), *decay]
    if gradient_accumulation_steps is not None:
        links = [accumulate_gradients(optax.chain(*links), gradient_accumulation_steps)]
    if loss_scale_factor is not None:
        links.insert(0, unscale(loss_scale_factor))
    if use_ema:
        links.append(
            parameter_ema(
                ema_momentum,
                ema_overwrite_frequency,
                accumulation_steps=gradient_accumulation_steps or 1,
            )
        )
    return optax.chain(*links)
