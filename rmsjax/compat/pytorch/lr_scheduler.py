r"""``torch.optim.lr_scheduler`` (PyTorch 2.x) as optax schedules.

Each function has the torch class's name, argument names and defaults, except that the first
argument is the optimizer's initial learning rate ``lr`` instead of the optimizer::

    # torch: opt = SGD(params, lr=0.1); sched = StepLR(opt, step_size=7, gamma=0.5)
    from rmsjax.compat.pytorch import lr_scheduler, sgd
    opt = sgd(lr=lr_scheduler.StepLR(0.1, step_size=7, gamma=0.5))

It returns a schedule ``count -> lr`` (jit-safe; ``count`` is the int32 number of updates done
so far, as optax passes it) whose value at count :math:`k` is the learning rate torch uses for
the :math:`(k+1)`-th ``optimizer.step()`` when ``scheduler.step()`` follows every optimizer
step. A torch loop that calls ``scheduler.step()`` once per epoch of ``N`` updates is
``updates_per_epoch=N`` (keyword-only): the value at count :math:`k` is then the per-step
value at :math:`\lfloor k / N \rfloor`. (It is not called ``steps_per_epoch`` because
``OneCycleLR`` already has an argument of that name with another meaning.)

``ReduceLROnPlateau`` reads the loss, so it is not a schedule but a transformation (see there).

Checked against the learning rates of real ``torch.optim.lr_scheduler`` 2.13 runs, per-step
and per-epoch (``tests/test_lr_scheduler.py``; the generator is
``tests/reference/generate.py``). torch computes in Python float64, recursively for most
schedulers (``lr_t = lr_{t-1} * ...``); these schedules use the equivalent closed forms in
the default float dtype (float32), arranged to stay accurate where the recursion's factors
cancel: powers :math:`\gamma^n` use :math:`\log\gamma` from float64, and cosine weights are
computed as :math:`\sin^2` of the distance to the end of the half period, so values near
``eta_min`` keep their relative accuracy. The relative difference from torch is at most about
:math:`10^{-7}(2 + |\ln(\text{lr}_k/\text{lr})|)` for counts below :math:`2^{24}`.

Invalid arguments raise at construction, naming torch's argument: ``ValueError`` for a value
out of range, ``TypeError`` for a wrong type (integer arguments must be Python integers).

Not reproduced: ``last_epoch`` (resume by offsetting the count, or with optax's own state),
per-parameter-group lists (one learning rate per schedule; use ``optax.multi_transform`` for
groups), and the deprecated ``scheduler.step(epoch)``. Other torch schedulers
(``ConstantLR``, ``PolynomialLR``, ``CyclicLR``, ``MultiplicativeLR``, ``ChainedScheduler``)
are not provided yet.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.typing import ArrayLike

from rmsjax.validation import check_in_range, check_nonneg, is_concrete

__all__ = [
    "CosineAnnealingLR",
    "CosineAnnealingWarmRestarts",
    "ExponentialLR",
    "LambdaLR",
    "LinearLR",
    "MultiStepLR",
    "OneCycleLR",
    "ReduceLROnPlateau",
    "ReduceLROnPlateauState",
    "SequentialLR",
    "StepLR",
    "TorchSchedule",
]

_INT32_MAX = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class TorchSchedule:
    """A torch scheduler as an optax schedule: call it with the update count.

    Attributes:
      lr: the optimizer's initial learning rate the schedule was built with (None for
        :func:`OneCycleLR`, which does not depend on it).
      per_step: ``k -> lr`` after ``k`` calls of torch's ``scheduler.step()``.
      updates_per_epoch: optimizer updates per ``scheduler.step()``.

    ``schedule(count) = per_step(count // updates_per_epoch)``. :func:`SequentialLR` reads
    ``lr`` and ``per_step`` of the schedules it joins.
    """

    lr: Any
    per_step: Callable[[jax.Array], jax.Array]
    updates_per_epoch: int = 1

    def __call__(self, count: ArrayLike) -> jax.Array:
        k = jnp.asarray(count, jnp.int32) // self.updates_per_epoch
        return self.per_step(k)


# --------------------------------------------------------------------------------------------
# Checks and float32-accurate pieces
# --------------------------------------------------------------------------------------------


def _check_int(name: str, value: Any, *, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(
            f"`{name}` must be a Python integer >= {low}, got {value!r} of type "
            f"{type(value).__name__}."
        )
    if value < low:
        raise ValueError(f"`{name}` must be an integer >= {low}, got {value!r}.")
    return int(value)


def _check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {', '.join(map(repr, choices))}, got {value!r}.")


def _make(
    lr: Any,
    per_step: Callable[[jax.Array], jax.Array],
    updates_per_epoch: int,
    *,
    uses_lr: bool = True,
) -> TorchSchedule:
    # OneCycleLR takes no `lr` (uses_lr=False): its schedule records None.
    if uses_lr:
        check_nonneg("lr", lr)
    n = _check_int("updates_per_epoch", updates_per_epoch, low=1)
    return TorchSchedule(lr=lr, per_step=per_step, updates_per_epoch=n)


def _real(x: ArrayLike) -> jax.Array | np.ndarray | np.number | complex:
    """``x`` itself, typed without the bools that its validation has already rejected.

    ``ArrayLike`` includes ``bool`` and ``numpy.bool_``, between which ``-`` is undefined;
    this narrowing lets ``lr - eta_min`` type-check while it is still computed exactly as
    written (in Python float64 for Python numbers).
    """
    assert not isinstance(x, bool | np.bool_), f"unvalidated hyperparameter {x!r}"
    return x


def _host(x: ArrayLike) -> float:
    """A concrete validated hyperparameter as a Python float (the real part of the complex
    zero-imaginary values that validation accepts)."""
    return float(np.asarray(x).real)


def _float(x: Any) -> jax.Array:
    return jnp.asarray(x, dtype=float)


def _power(base: Any, n: jax.Array) -> jax.Array:
    r""":math:`b^n` for an integer array ``n``, to float32 accuracy even for large ``n``.

    ``log(b)`` is taken in float64 on the host and split into a float32 pair, so the result's
    relative error is about :math:`6\cdot10^{-8}(1 + |n \log b|)` instead of the
    :math:`n\cdot 6\cdot 10^{-8}` of raising a rounded ``b``. ``b = 0`` gives 1 at ``n = 0``
    and 0 after, as Python does.
    """
    hi: float | jax.Array
    if is_concrete(base):
        b = float(base)
        if b == 0.0:
            return jnp.where(n == 0, _float(1.0), _float(0.0))
        log = math.log(b)
        hi = float(np.float32(log))
        lo = log - hi
    else:
        hi, lo = jnp.log(base), 0.0
    nf = _float(n)
    return jnp.where(n == 0, _float(1.0), jnp.exp(nf * hi + nf * lo))


def _cosine_weight(left: Any, length: Any) -> jax.Array:
    r"""torch's :math:`(1 + \cos(\pi\,\text{done}/\text{length}))/2` where
    ``left = length - done``, computed as :math:`\sin^2(\pi\,\text{left} / (2\,\text{length}))`
    so that it keeps its relative accuracy near 0 (the end of the half period)."""
    return jnp.sin((math.pi / 2) * _float(left) / _float(length)) ** 2


# --------------------------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------------------------


def StepLR(
    lr: ArrayLike,
    step_size: int,
    gamma: ArrayLike = 0.1,
    *,
    updates_per_epoch: int = 1,
) -> TorchSchedule:
    r"""``torch.optim.lr_scheduler.StepLR``: multiply by ``gamma`` every ``step_size`` steps.

    .. math:: \text{lr}_k = \text{lr}\cdot\gamma^{\lfloor k / \text{step\_size} \rfloor}

    Args:
      lr: the optimizer's initial learning rate, >= 0.
      step_size: integer >= 1 (torch does not check it; 0 fails there on the first step).
      gamma: >= 0 (torch does not check it).
      updates_per_epoch: integer >= 1, optimizer updates per ``scheduler.step()``.

    Same as ``optax.exponential_decay(lr, step_size, gamma, staircase=True)`` up to rounding.
    """
    step_size = _check_int("step_size", step_size, low=1)
    check_nonneg("gamma", gamma)
    return _make(lr, lambda k: jnp.asarray(lr * _power(gamma, k // step_size)), updates_per_epoch)


def MultiStepLR(
    lr: ArrayLike,
    milestones: Iterable[int],
    gamma: ArrayLike = 0.1,
    *,
    updates_per_epoch: int = 1,
) -> TorchSchedule:
    r"""``torch.optim.lr_scheduler.MultiStepLR``: multiply by ``gamma`` at each milestone.

    .. math:: \text{lr}_k = \text{lr}\cdot\gamma^{\#\{m \in \text{milestones} : m \le k\}}

    Args:
      lr: the optimizer's initial learning rate, >= 0.
      milestones: integers >= 0, in any order; a milestone listed twice multiplies by
        :math:`\gamma^2` there (as torch, which counts them).
      gamma: >= 0.
      updates_per_epoch: integer >= 1, optimizer updates per ``scheduler.step()``.
    """
    points = sorted(_check_int("milestones", m, low=0) for m in milestones)
    check_nonneg("gamma", gamma)
    table = jnp.asarray(points, jnp.int32)

    def per_step(k: jax.Array) -> jax.Array:
        passed = jnp.searchsorted(table, k, side="right") if points else jnp.zeros_like(k)
        return jnp.asarray(lr * _power(gamma, passed))

    return _make(lr, per_step, updates_per_epoch)


def ExponentialLR(lr: ArrayLike, gamma: ArrayLike, *, updates_per_epoch: int = 1) -> TorchSchedule:
    r"""``torch.optim.lr_scheduler.ExponentialLR``: :math:`\text{lr}_k = \text{lr}\cdot\gamma^k`.

    Args:
      lr: the optimizer's initial learning rate, >= 0.
      gamma: >= 0.
      updates_per_epoch: integer >= 1, optimizer updates per ``scheduler.step()``.

    ``optax.exponential_decay(lr, 1, gamma)`` raises a float32 ``gamma``, so it drifts from
    torch by :math:`k \cdot 3\cdot 10^{-8}` relative (0.3% after 100k steps of 0.9999);
    this schedule does not.
    """
    check_nonneg("gamma", gamma)
    return _make(lr, lambda k: jnp.asarray(lr * _power(gamma, k)), updates_per_epoch)


def CosineAnnealingLR(
    lr: ArrayLike,
    T_max: int,
    eta_min: ArrayLike = 0.0,
    *,
    updates_per_epoch: int = 1,
) -> TorchSchedule:
    r"""``torch.optim.lr_scheduler.CosineAnnealingLR``: half a cosine from ``lr`` to ``eta_min``.

    .. math::
      \text{lr}_k = \eta_{min} + (\text{lr} - \eta_{min})\,
      \frac{1 + \cos(\pi k / T_{max})}{2}

    torch computes it recursively, :math:`\text{lr}_k = \eta_{min} + (\text{lr}_{k-1} -
    \eta_{min})\,(1 + \cos(\pi k/T_{max}))/(1 + \cos(\pi (k-1)/T_{max}))`, restarting the
    product with an added term one step after each minimum. Without other schedulers
    touching the rate this equals the closed form above; after :math:`T_{max}` both keep
    following the cosine, back up to ``lr`` at :math:`2T_{max}` (torch does not stop at
    ``eta_min``; use :func:`SequentialLR` to hold it). The reference test covers several
    periods.

    Args:
      lr: the optimizer's initial learning rate, >= 0.
      T_max: the half period, integer >= 1 (torch divides by it unchecked).
      eta_min: the minimum, >= 0 (torch does not check it; a value above ``lr`` makes the
        cosine rise first, as in torch).
      updates_per_epoch: integer >= 1, optimizer updates per ``scheduler.step()``.

    Same values as ``optax.cosine_decay_schedule(lr, T_max, alpha=eta_min/lr)`` up to
    ``T_max``; optax then holds ``eta_min`` where torch climbs back.
    """
    T_max = _check_int("T_max", T_max, low=1)
    check_nonneg("eta_min", eta_min)

    def per_step(k: jax.Array) -> jax.Array:
        left = T_max - jnp.mod(k, 2 * T_max)  # in (-T_max, T_max]: signed distance to the minimum
        return jnp.asarray(eta_min + (_real(lr) - eta_min) * _cosine_weight(left, T_max))

    return _make(lr, per_step, updates_per_epoch)


def CosineAnnealingWarmRestarts(
    lr: ArrayLike,
    T_0: int,
    T_mult: int = 1,
    eta_min: ArrayLike = 0.0,
    *,
    updates_per_epoch: int = 1,
) -> TorchSchedule:
    r"""``torch.optim.lr_scheduler.CosineAnnealingWarmRestarts`` (SGDR).

    .. math::
      \text{lr}_k = \eta_{min} + (\text{lr} - \eta_{min})\,
      \frac{1 + \cos(\pi T_{cur} / T_i)}{2}

    where the cycles have lengths :math:`T_i = T_0 T_{mult}^i` and :math:`T_{cur}` counts the
    steps since the last restart (the cycle's start, where the rate jumps back to ``lr``).

    Args:
      lr: the optimizer's initial learning rate, >= 0.
      T_0: first cycle length, integer >= 1.
      T_mult: cycle growth, integer >= 1.
      eta_min: the minimum, >= 0 (torch accepts any int or float).
      updates_per_epoch: integer >= 1, optimizer updates per ``scheduler.step()``. torch also
        accepts fractional epochs in ``step(epoch)``, which is not reproduced.
    """
    T_0 = _check_int("T_0", T_0, low=1)
    T_mult = _check_int("T_mult", T_mult, low=1)
    check_nonneg("eta_min", eta_min)
    if T_mult == 1:

        def cycle(k: jax.Array) -> tuple[jax.Array, Any]:
            return T_0 - jnp.mod(k, T_0), T_0

    else:
        starts, lengths = [], []
        start, length = 0, T_0
        while start <= _INT32_MAX:
            starts.append(start)
            lengths.append(length)
            start, length = start + length, length * T_mult
        start_table = jnp.asarray(starts, jnp.int32)
        length_table = np.asarray(lengths, np.float64)

        def cycle(k: jax.Array) -> tuple[jax.Array, Any]:
            i = jnp.maximum(jnp.searchsorted(start_table, k, side="right") - 1, 0)
            length = _float(jnp.asarray(length_table)[i])
            return length - _float(k - start_table[i]), length

    def per_step(k: jax.Array) -> jax.Array:
        left, length = cycle(k)
        return jnp.asarray(eta_min + (_real(lr) - eta_min) * _cosine_weight(left, length))

    return _make(lr, per_step, updates_per_epoch)


def LinearLR(
    lr: ArrayLike,
    start_factor: float = 1.0 / 3,
    end_factor: float = 1.0,
    total_iters: int = 5,
    *,
    updates_per_epoch: int = 1,
) -> TorchSchedule:
    r"""``torch.optim.lr_scheduler.LinearLR``: a factor moving linearly, then held.

    .. math::
      \text{lr}_k = \text{lr}\cdot\Big(s + (e - s)\,\frac{\min(k, T)}{T}\Big)

    with :math:`s` = ``start_factor``, :math:`e` = ``end_factor``, :math:`T` = ``total_iters``
    (torch's recursive form gives the same values). A linear warm-up is
    ``LinearLR(lr, start_factor=0.01, total_iters=warmup)``.

    Args:
      lr: the optimizer's initial learning rate, >= 0.
      start_factor: in (0, 1] (torch's range).
      end_factor: in [0, 1] (torch's range).
      total_iters: integer >= 0; with 0 the factor stays ``start_factor`` (what torch's
        recursive form does).
      updates_per_epoch: integer >= 1, optimizer updates per ``scheduler.step()``.
    """
    check_in_range("start_factor", start_factor, low=0.0, high=1.0, low_open=True)
    check_in_range("end_factor", end_factor, low=0.0, high=1.0)
    total = _check_int("total_iters", total_iters, low=0)

    def per_step(k: jax.Array) -> jax.Array:
        if total == 0:
            return jnp.asarray(lr * start_factor * jnp.ones_like(_float(k)))
        done = _float(jnp.clip(k, 0, total))
        return jnp.asarray(lr * ((total - done) * start_factor + done * end_factor) / total)

    return _make(lr, per_step, updates_per_epoch)


def OneCycleLR(
    max_lr: ArrayLike,
    total_steps: int | None = None,
    epochs: int | None = None,
    steps_per_epoch: int | None = None,
    pct_start: float = 0.3,
    anneal_strategy: str = "cos",
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
    three_phase: bool = False,
    *,
    updates_per_epoch: int = 1,
) -> TorchSchedule:
    r"""``torch.optim.lr_scheduler.OneCycleLR``: warm up to ``max_lr``, anneal far below.

    With :math:`T` = ``total_steps`` (or ``epochs * steps_per_epoch``), :math:`p` =
    ``pct_start``, :math:`\eta_0 = \text{max\_lr}/\text{div\_factor}` and
    :math:`\eta_{min} = \eta_0/\text{final\_div\_factor}`, the phases end at steps
    :math:`pT - 1` (:math:`\eta_0 \to \text{max\_lr}`) and :math:`T - 1`
    (:math:`\text{max\_lr} \to \eta_{min}`); with ``three_phase`` at :math:`pT - 1`
    (:math:`\eta_0 \to \text{max\_lr}`), :math:`2pT - 2` (back to :math:`\eta_0`) and
    :math:`T - 1` (:math:`\eta_0 \to \eta_{min}`). Step :math:`k` lies in the first phase
    whose end is :math:`\ge k` (else the last); with :math:`a` its start,
    :math:`b` its end and :math:`x = (k - a)/(b - a)`, it goes from :math:`u` to :math:`v` as

    .. math::
      \text{cos: } v + (u - v)\,\frac{1 + \cos(\pi x)}{2}, \qquad
      \text{linear: } u + (v - u)\,x.

    There is no ``lr`` argument: torch overwrites the optimizer's rate with
    :math:`\eta_0`.

    Args:
      max_lr: >= 0 (one value; torch also takes one per parameter group).
      total_steps: integer >= 1, or None to use ``epochs * steps_per_epoch`` (integers >= 1).
      pct_start: in [0, 1] (torch also insists on a float). ``pct_start * total_steps == 1``
        makes the first phase zero steps long: torch raises ``ZeroDivisionError`` when it
        builds the scheduler, this raises ``ValueError``.
      anneal_strategy: ``"cos"`` or ``"linear"``.
      div_factor, final_div_factor: > 0.
      three_phase: the three-phase schedule of the paper.
      updates_per_epoch: integer >= 1, optimizer updates per ``scheduler.step()``.

    Differences from torch:

    * torch also cycles the optimizer's momentum (or Adam's ``betas[0]``) between
      ``max_momentum`` and ``base_momentum`` by default (``cycle_momentum=True``); this is a
      learning-rate schedule only, so ``cycle_momentum``, ``base_momentum`` and
      ``max_momentum`` are not taken. It matches a torch run with ``cycle_momentum=False``
      or with an optimizer without momentum.
    * torch raises when stepped more than ``total_steps`` times. Count ``total_steps`` is
      torch's value (the last phase extrapolated one step: below :math:`\eta_{min}`, and with
      ``"linear"`` possibly negative); larger counts hold :math:`\eta_{min}`, the value at
      ``total_steps - 1``.
    """
    if total_steps is not None:
        total = _check_int("total_steps", total_steps, low=1)
    elif epochs is not None and steps_per_epoch is not None:
        total = _check_int("epochs", epochs, low=1) * _check_int(
            "steps_per_epoch", steps_per_epoch, low=1
        )
    else:
        raise ValueError(
            "OneCycleLR needs `total_steps`, or both `epochs` and `steps_per_epoch` (their "
            f"product is used); got total_steps={total_steps!r}, epochs={epochs!r}, "
            f"steps_per_epoch={steps_per_epoch!r}."
        )
    check_nonneg("max_lr", max_lr)
    check_in_range("pct_start", pct_start, low=0.0, high=1.0)
    _check_choice("anneal_strategy", anneal_strategy, ("cos", "linear"))
    check_in_range("div_factor", div_factor, low=0.0, low_open=True)
    check_in_range("final_div_factor", final_div_factor, low=0.0, low_open=True)
    warm_end = float(pct_start * total) - 1
    if warm_end == 0.0:
        raise ValueError(
            f"pct_start * total_steps = {pct_start!r} * {total} = 1 makes the warm-up phase "
            "zero steps long (torch raises ZeroDivisionError). Change `pct_start` or "
            "`total_steps`."
        )
    peak = _real(max_lr)
    initial = peak / div_factor
    minimum = initial / final_div_factor
    if three_phase:
        phases = [
            (warm_end, initial, peak),
            (float(2 * pct_start * total) - 2, peak, initial),
            (total - 1.0, initial, minimum),
        ]
    else:
        phases = [(warm_end, initial, peak), (total - 1.0, peak, minimum)]
    starts = [0.0] + [end for end, _, _ in phases[:-1]]
    # torch divides by zero at count `total` when the last phase is empty (pct_start = 1).
    last_defined = total if phases[-1][0] > starts[-1] else total - 1

    def phase(i: int, k: jax.Array) -> jax.Array:
        end, u, v = phases[i]
        length = end - starts[i]
        if length == 0.0:  # only reached where torch divides by zero: hold the end value
            return jnp.asarray(v * jnp.ones_like(k))
        # Written from the smaller end, so that values near it keep their relative accuracy.
        if abs(u) > abs(v):
            u, v, k_left = v, u, end - k
        else:
            k_left = k - starts[i]
        if anneal_strategy == "cos":
            return jnp.asarray(u + (v - u) * _cosine_weight(k_left, length))
        return jnp.asarray(u + (v - u) * (k_left / length))

    def per_step(count: jax.Array) -> jax.Array:
        k = _float(jnp.where(count > last_defined, total - 1, count))
        value = phase(len(phases) - 1, k)
        for i in reversed(range(len(phases) - 1)):
            value = jnp.where(k <= phases[i][0], phase(i, k), value)
        return value

    return _make(None, per_step, updates_per_epoch, uses_lr=False)


def LambdaLR(
    lr: ArrayLike,
    lr_lambda: Callable[[jax.Array], ArrayLike],
    *,
    updates_per_epoch: int = 1,
) -> TorchSchedule:
    r"""``torch.optim.lr_scheduler.LambdaLR``: :math:`\text{lr}_k = \text{lr}\cdot f(k)`.

    Args:
      lr: the optimizer's initial learning rate, >= 0.
      lr_lambda: ``f``, called with the int32 step count :math:`k` as a jax array (torch
        passes a Python int), so it must be jit-safe: jnp operations, ``//``, ``%``, ``**``,
        not ``min``/``if``. One function (torch also takes one per parameter group).
      updates_per_epoch: integer >= 1, optimizer updates per ``scheduler.step()``.
    """
    if not callable(lr_lambda):
        raise TypeError(f"`lr_lambda` must be a callable k -> factor, got {lr_lambda!r}.")
    return _make(lr, lambda k: jnp.asarray(lr * _float(lr_lambda(k))), updates_per_epoch)


def SequentialLR(
    lr: ArrayLike,
    schedulers: Sequence[Callable[[jax.Array], ArrayLike]],
    milestones: Sequence[int],
    *,
    updates_per_epoch: int = 1,
) -> TorchSchedule:
    r"""``torch.optim.lr_scheduler.SequentialLR``: hand over to the next schedule at each
    milestone.

    .. math::
      \text{lr}_k = S_i(k - m_i), \qquad i = \#\{j : m_j \le k\},\ m_0 = 0

    Each schedule restarts from its own step 0 at its milestone, from the initial ``lr``
    (torch re-applies the scheduler's closed form at step 0 there, and its recursion carries on
    from that value).

    Args:
      lr: the optimizer's initial learning rate, >= 0. torch's schedulers all share one
        optimizer, so the schedules built here with this module must have been given the same
        ``lr`` (``ValueError`` otherwise); ``OneCycleLR``, whose rate does not depend on it,
        and plain callables are not checked.
      schedulers: one or more schedules: this module's (built WITHOUT ``updates_per_epoch``:
        give it to ``SequentialLR`` instead) or any callable ``k -> lr``. A
        ``ReduceLROnPlateau`` is refused, as in torch.
      milestones: ``len(schedulers) - 1`` non-decreasing integers >= 0 (torch does not check
        the order).
      updates_per_epoch: integer >= 1, optimizer updates per ``scheduler.step()``; milestones
        count scheduler steps, as in torch.
    """
    schedulers = list(schedulers)
    if not schedulers:
        raise ValueError("`schedulers` must hold at least one schedule, got none.")
    points = [_check_int("milestones", m, low=0) for m in milestones]
    if len(points) != len(schedulers) - 1:
        raise ValueError(
            f"`milestones` must have one entry fewer than `schedulers`: got {len(points)} "
            f"milestones for {len(schedulers)} schedulers."
        )
    if points != sorted(points):
        raise ValueError(f"`milestones` must be non-decreasing, got {points!r}.")
    parts: list[Callable[[jax.Array], ArrayLike]] = []
    for i, s in enumerate(schedulers):
        if not callable(s):
            raise TypeError(
                f"`schedulers[{i}]` must be a schedule k -> lr, got {type(s).__name__} "
                "(ReduceLROnPlateau cannot be sequenced, as in torch)."
            )
        if isinstance(s, TorchSchedule):
            if s.updates_per_epoch != 1:
                raise ValueError(
                    f"`schedulers[{i}]` was built with `updates_per_epoch`="
                    f"{s.updates_per_epoch}; build the parts per step and pass "
                    "`updates_per_epoch` to SequentialLR."
                )
            if is_concrete(s.lr) and is_concrete(lr) and _host(s.lr) != _host(lr):
                raise ValueError(
                    f"`schedulers[{i}]` was built with `lr`={s.lr!r} but SequentialLR with "
                    f"`lr`={lr!r}; in torch they share one optimizer, so pass the same lr."
                )
            parts.append(s.per_step)
        else:
            parts.append(s)

    def per_step(k: jax.Array) -> jax.Array:
        value = _float(parts[0](k))
        for m, part in zip(points, parts[1:], strict=True):
            value = jnp.where(k >= m, _float(part(k - m)), value)
        return value

    return _make(lr, per_step, updates_per_epoch)


# --------------------------------------------------------------------------------------------
# ReduceLROnPlateau
# --------------------------------------------------------------------------------------------


class ReduceLROnPlateauState(NamedTuple):
    """State of :func:`ReduceLROnPlateau` (torch's scheduler attributes of the same names)."""

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as optax's states do
    lr: jax.Array  # the current learning rate
    best: jax.Array
    num_bad_epochs: jax.Array  # int32
    cooldown_counter: jax.Array  # int32


def ReduceLROnPlateau(
    lr: ArrayLike,
    mode: str = "min",
    factor: ArrayLike = 0.1,
    patience: int = 10,
    threshold: ArrayLike = 1e-4,
    threshold_mode: str = "rel",
    cooldown: int = 0,
    min_lr: ArrayLike = 0,
    eps: ArrayLike = 1e-8,
    *,
    updates_per_epoch: int = 1,
) -> optax.GradientTransformationExtraArgs:
    r"""``torch.optim.lr_scheduler.ReduceLROnPlateau`` as a transformation that reads the loss.

    ``update(updates, state, params=None, *, value=loss)`` multiplies the updates by
    :math:`\eta/\text{lr}`, the current learning rate over the initial one, and then feeds
    ``value`` to torch's rule (one ``scheduler.step(value)``):

    * ``value`` is better than ``best`` if it is below ``best * (1 - threshold)`` (mode
      ``"min"``, threshold_mode ``"rel"``), below ``best - threshold`` (``"min"``,
      ``"abs"``), above ``best * (1 + threshold)`` (``"max"``, ``"rel"``) or above
      ``best + threshold`` (``"max"``, ``"abs"``); ``best`` starts at :math:`+\infty`
      (:math:`-\infty` for ``"max"``). Better: ``best = value``, ``num_bad_epochs = 0``;
      else ``num_bad_epochs += 1``.
    * In cooldown (``cooldown_counter > 0``): ``cooldown_counter -= 1`` and
      ``num_bad_epochs = 0``.
    * If ``num_bad_epochs > patience``: :math:`\eta' = \max(\eta\cdot\text{factor},
      \text{min\_lr})`, applied only if :math:`\eta - \eta' > \text{eps}`; then
      ``cooldown_counter = cooldown`` and ``num_bad_epochs = 0``.

    Chain it LAST, after an optimizer built with the same constant ``lr``::

        opt = optax.chain(
            rmsjax.compat.pytorch.sgd(lr=0.1, momentum=0.9),
            ReduceLROnPlateau(0.1, patience=5),
        )
        updates, state = opt.update(grads, state, params, value=loss)

    ``optax.chain`` passes ``value`` on to the transformations that take it. Every torch
    preset except ``rprop`` keeps ``lr`` outside its buffers, so scaling the final update is
    exactly torch's change of ``param_group["lr"]`` (``rprop`` ignores later learning rates in
    torch too, but scaling its update does not).

    Args:
      lr: the optimizer's initial learning rate, > 0 (``min_lr`` and ``eps`` are absolute
        rates, so the schedule needs it).
      mode: ``"min"`` or ``"max"``.
      factor: in [0, 1) (torch checks only ``< 1``).
      patience: integer >= 0, bad steps tolerated before a reduction.
      threshold: >= 0.
      threshold_mode: ``"rel"`` or ``"abs"``.
      cooldown: integer >= 0, steps after a reduction during which bad steps are not counted.
      min_lr: >= 0 (one value; torch also takes one per parameter group).
      eps: >= 0, the smallest reduction applied.
      updates_per_epoch: integer >= 1: the rule runs on every ``updates_per_epoch``-th update
        (the last of each epoch), with the ``value`` passed there; the other updates' values
        are ignored. This is torch's ``scheduler.step(val_loss)`` once per epoch: pass the
        validation loss on the epoch's last update.

    Differences:

    * from torch: the comparisons and the rate are computed in the default float dtype
      (float32), torch's in float64, so a value within float32 rounding of the threshold
      may be judged differently.
    * from ``optax.contrib.reduce_on_plateau``: the loss passed with an update changes the
      rate from the NEXT update on (torch's order: ``optimizer.step()`` then
      ``scheduler.step(loss)``), where optax applies it to the same update; torch's
      ``mode``, ``threshold_mode``, ``min_lr`` and ``eps`` replace optax's ``rtol``/``atol``/
      ``min_scale``; and ``num_bad_epochs > patience`` (torch) replaces optax's
      ``== patience``, one step earlier.
    """
    check_in_range("lr", lr, low=0.0, low_open=True)
    _check_choice("mode", mode, ("min", "max"))
    check_in_range("factor", factor, low=0.0, high=1.0, high_open=True)
    patience = _check_int("patience", patience, low=0)
    check_nonneg("threshold", threshold)
    _check_choice("threshold_mode", threshold_mode, ("rel", "abs"))
    cooldown = _check_int("cooldown", cooldown, low=0)
    check_nonneg("min_lr", min_lr)
    check_nonneg("eps", eps)
    every = _check_int("updates_per_epoch", updates_per_epoch, low=1)
    worst = math.inf if mode == "min" else -math.inf

    def is_better(a: jax.Array, best: jax.Array) -> jax.Array:
        if mode == "min":
            return a < (best * (1.0 - threshold) if threshold_mode == "rel" else best - threshold)
        return a > (best * (threshold + 1.0) if threshold_mode == "rel" else best + threshold)

    def init_fn(params: Any) -> ReduceLROnPlateauState:
        del params
        zero = jnp.zeros([], jnp.int32)
        return ReduceLROnPlateauState(
            count=zero,
            lr=_float(lr),
            best=_float(worst),
            num_bad_epochs=zero,
            cooldown_counter=zero,
        )

    def torch_step(state: ReduceLROnPlateauState, value: Any) -> ReduceLROnPlateauState:
        current = jnp.asarray(value, state.best.dtype)
        better = is_better(current, state.best)
        best = jnp.where(better, current, state.best)
        bad = jnp.where(better, 0, state.num_bad_epochs + 1)
        in_cooldown = state.cooldown_counter > 0
        cooldown_counter = jnp.where(
            in_cooldown, state.cooldown_counter - 1, state.cooldown_counter
        )
        bad = jnp.where(in_cooldown, 0, bad)
        reduce = bad > patience
        new_lr = jnp.maximum(state.lr * factor, min_lr).astype(state.lr.dtype)
        lr_out = jnp.where(reduce & (state.lr - new_lr > eps), new_lr, state.lr)
        return ReduceLROnPlateauState(
            count=state.count,
            lr=lr_out,
            best=best,
            num_bad_epochs=jnp.where(reduce, 0, bad).astype(jnp.int32),
            cooldown_counter=jnp.where(reduce, cooldown, cooldown_counter).astype(jnp.int32),
        )

    def update_fn(
        updates: Any,
        state: ReduceLROnPlateauState,
        params: Any = None,
        *,
        value: ArrayLike,
        **extra_args: Any,
    ) -> tuple[Any, ReduceLROnPlateauState]:
        del params, extra_args
        scale = state.lr / lr
        updates = jax.tree.map(lambda u: (u * scale).astype(u.dtype), updates)
        count = jnp.where(state.count < _INT32_MAX, state.count + 1, state.count)
        stepped = torch_step(state, value)
        on_epoch_end = count % every == 0
        new_state = jax.tree.map(lambda a, b: jnp.where(on_epoch_end, a, b), stepped, state)
        return updates, new_state._replace(count=count.astype(jnp.int32))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
