r"""Fused optimizer steps: update AND apply, for every leaf, in one pass over memory.

The optax protocol splits a step in two: ``update`` turns gradients into updates (writing the
new state), then ``apply_updates`` adds them to the parameters. On CPU, XLA compiles that into
several loops per leaf, so the step moves more bytes than it must, and a tree of many leaves
compiles one fusion per leaf and rule. An optimizer from this module adds a third entry point,

.. code-block:: python

  opt = rmsjax.fused.rmsprop(learning_rate=1e-3, centered=True, momentum=0.9)
  state = opt.init(params)
  params, state = opt.step(params, grads, state)   # == update + apply_updates

which on CPU runs the whole step, for all float32 leaves of the tree, as ONE call of a native
kernel (:mod:`rmsjax.native`) that reads each parameter, gradient and state element once and
writes the new values in place (donate ``params`` and ``state`` to ``jax.jit`` so XLA can reuse
the buffers), spread over all cores. ``opt.init`` and ``opt.update`` are exactly the optax-protocol
optimizer of the same name (``rmsjax.rmsprop``, ...), so the state is the same and the two entry
points can be mixed.

Numbers: the kernel performs the operations of the pure-JAX rules in the same order, so its
results equal ``update`` + ``apply_updates`` to float32 rounding (the tests compare the two on
every configuration). Hyperparameters, schedules included, are evaluated by JAX and passed to
the kernel as a float32 operand: traced values, schedules and :func:`inject_hyperparams` work
and never recompile.

When the pure-JAX path runs instead (same numbers, the XLA-compiled chain):

* ``backend="jax"``, ``RMSJAX_NATIVE=0``, or the kernel could not be built
  (``rmsjax.native.available()`` is False; ``rmsjax.native.status()`` says why);
* on GPU/TPU (chosen while lowering, with ``jax.lax.platform_dependent``);
* when more than one device is visible, or an input is sharded over several devices (the
  kernel has no partitioning rule, so the elementwise XLA program is kept);
* under ``jax.vmap`` (a ``custom_vmap`` rule), and to differentiate the step (a ``custom_jvp``
  rule: the tangents are the pure-JAX rule's);
* for leaves that are not float32 (float16/bfloat16/float64/complex parameters, a non-float32
  ``mu_dtype``), leaves whose gradient is ``None``, leaves of fewer than 16384 elements
  (biases, norms: there the compiled chain is faster, see ``_MIN_NATIVE_ELEMENTS``), and AdamW
  with a weight-decay ``mask``. Such leaves go through the pure-JAX chain while the other
  leaves still use the kernel.

``backend="native"`` raises ``RuntimeError`` at the first step when the kernel is unavailable
instead of falling back silently. To see which path a step takes, look for ``ffi_call`` in
``jax.make_jaxpr(opt.step)(params, grads, state)``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.typing import ArrayLike, DTypeLike

from rmsjax import native
from rmsjax import optimizers as O
from rmsjax import transforms as T
from rmsjax._numerics import debias, increment
from rmsjax._types import ScalarOrSchedule
from rmsjax.updates import apply_updates
from rmsjax.validation import check_learning_rate

__all__ = ["FusedOptimizer", "adam", "adamw", "inject_hyperparams", "rmsprop", "sgd"]

_BACKENDS = ("auto", "native", "jax")
_KIND_RMS, _KIND_ADAM, _KIND_SGD = 0, 1, 2
# XLA's compile time grows faster than linearly with the operand count of one custom call
# (1024 leaves in one call: ~40 s), so a large tree is updated by several calls of at most
# this many leaves; each call is still a single pass over its leaves.
_LEAVES_PER_CALL = 32
# Leaves smaller than this many elements are left to the XLA-compiled pure-JAX rule: for them a
# step costs per-array overhead, not bandwidth, and benchmarks/run.py measured the kernel slower
# than the compiled chain on trees of 4K-element leaves (1024 leaves, 4M parameters) and faster
# from 32K-element leaves up. Set to 0 to send every float32 leaf to the kernel.
_MIN_NATIVE_ELEMENTS = 16384


class FusedOptimizer(NamedTuple):
    """An optimizer with the optax protocol (``init``, ``update``) plus a fused ``step``.

    ``step(params, grads, state) -> (new_params, new_state)`` equals
    ``update(grads, state, params)`` followed by ``rmsjax.apply_updates``. ``init`` and
    ``update`` are the pure-JAX optax-protocol functions, so the object can also be passed to
    ``optax.chain`` and friends like any ``GradientTransformation``.
    """

    init: Callable[[Any], Any]
    update: Callable[..., tuple[Any, Any]]
    step: Callable[[Any, Any, Any], tuple[Any, Any]]


class _Spec(NamedTuple):
    """What the kernel needs to know about one configuration."""

    tx: optax.GradientTransformation  # the pure-JAX chain (the reference)
    slots: tuple[tuple[int, str], ...]  # (chain index, field) of each per-parameter state tree
    scalars: Callable[[Any], list[Any]] | None  # old chain state -> kernel scalars; None: no kernel
    attrs: dict[str, Any]  # static kernel flags


# --------------------------------------------------------------------------------------------
# Per-configuration specs: the kernel's scalars are computed here with exactly the expressions
# the pure-JAX transforms use, so both paths see the same float32 constants.
# --------------------------------------------------------------------------------------------


def _step_size(learning_rate: Any, lr_state: Any) -> Any:
    # scale_by_learning_rate(flip_sign=True): -lr, or -schedule(count) via scale_by_schedule.
    if callable(learning_rate):
        return -1 * learning_rate(lr_state.count)
    return -1 * learning_rate


def _attrs(kind: int, **flags: bool) -> dict[str, Any]:
    out = {"kind": np.int64(kind)}
    for name in ("centered", "eps_in_sqrt", "momentum", "nesterov", "weight_decay"):
        out[name] = bool(flags.get(name, False))
    return out


def _rmsprop_spec(hp: dict[str, Any]) -> _Spec:
    tx = O.rmsprop(
        hp["learning_rate"],
        decay=hp["decay"],
        eps=hp["eps"],
        initial_scale=hp["initial_scale"],
        eps_in_sqrt=hp["eps_in_sqrt"],
        centered=hp["centered"],
        momentum=hp["momentum"],
        nesterov=hp["nesterov"],
        bias_correction=hp["bias_correction"],
        promote_half=hp["promote_half"],
    )
    has_mom = hp["momentum"] is not None
    slots = ((0, "mu"),) if hp["centered"] else ()
    slots += ((0, "nu"),) + (((2, "trace"),) if has_mom else ())

    def scalars(state: Any) -> list[Any]:
        decay = hp["decay"]
        count = increment(state[0].count)
        corr = debias(decay, count) if hp["bias_correction"] else 1.0
        beta = hp["momentum"] if has_mom else 0.0
        return [1 - decay, decay, hp["eps"], corr, _step_size(hp["learning_rate"], state[1]), beta]

    attrs = _attrs(
        _KIND_RMS,
        centered=hp["centered"],
        eps_in_sqrt=hp["eps_in_sqrt"],
        momentum=has_mom,
        nesterov=hp["nesterov"] and has_mom,
    )
    return _Spec(tx, slots, scalars, attrs)


def _adam_scalars(hp: dict[str, Any], state: Any, lr_index: int, wd: Any) -> list[Any]:
    b1, b2 = hp["b1"], hp["b2"]
    count = increment(state[0].count)
    c1, c2 = debias(b1, count), debias(b2, count)
    c1_next = debias(b1, increment(count))
    lr = _step_size(hp["learning_rate"], state[lr_index])
    return [1 - b1, b1, 1 - b2, b2, hp["eps"], hp["eps_root"], c1, c2, c1_next, lr, wd]


def _adam_tx(hp: dict[str, Any]) -> optax.GradientTransformation:
    return T.scale_by_adam(
        b1=hp["b1"],
        b2=hp["b2"],
        eps=hp["eps"],
        eps_root=hp["eps_root"],
        mu_dtype=hp["mu_dtype"],
        nesterov=hp["nesterov"],
        promote_half=hp["promote_half"],
    )


def _adam_spec(hp: dict[str, Any]) -> _Spec:
    tx = optax.chain(_adam_tx(hp), T.scale_by_learning_rate(hp["learning_rate"]))
    scalars = lambda state: _adam_scalars(hp, state, 1, 0.0)
    attrs = _attrs(_KIND_ADAM, nesterov=hp["nesterov"], weight_decay=False)
    return _Spec(tx, ((0, "mu"), (0, "nu")), scalars, attrs)


def _adamw_spec(hp: dict[str, Any]) -> _Spec:
    tx = O.adamw(
        hp["learning_rate"],
        b1=hp["b1"],
        b2=hp["b2"],
        eps=hp["eps"],
        eps_root=hp["eps_root"],
        mu_dtype=hp["mu_dtype"],
        weight_decay=hp["weight_decay"],
        mask=hp["mask"],
        nesterov=hp["nesterov"],
        promote_half=hp["promote_half"],
    )
    wd = hp["weight_decay"]

    def scalars(state: Any) -> list[Any]:
        return _adam_scalars(hp, state, 2, wd(state[1].count) if callable(wd) else wd)

    attrs = _attrs(_KIND_ADAM, nesterov=hp["nesterov"], weight_decay=True)
    # A mask makes the decay per-leaf (optax.masked state): left to the pure-JAX path.
    return _Spec(tx, ((0, "mu"), (0, "nu")), scalars if hp["mask"] is None else None, attrs)


def _sgd_spec(hp: dict[str, Any]) -> _Spec:
    has_mom = hp["momentum"] is not None
    first = (
        T.trace(
            decay=hp["momentum"],
            nesterov=hp["nesterov"],
            accumulator_dtype=hp["accumulator_dtype"],
            promote_half=hp["promote_half"],
        )
        if has_mom
        else optax.identity()
    )
    tx = optax.chain(first, T.scale_by_learning_rate(hp["learning_rate"]))

    def scalars(state: Any) -> list[Any]:
        return [_step_size(hp["learning_rate"], state[1]), hp["momentum"] if has_mom else 0.0]

    attrs = _attrs(_KIND_SGD, momentum=has_mom, nesterov=hp["nesterov"] and has_mom)
    return _Spec(tx, ((0, "trace"),) if has_mom else (), scalars, attrs)


# --------------------------------------------------------------------------------------------
# The step: pure-JAX reference, native kernel, and the dispatch between them
# --------------------------------------------------------------------------------------------


def _is_none(x: Any) -> bool:
    return x is None


def _get_slot(state: Any, slot: tuple[int, str]) -> Any:
    return getattr(state[slot[0]], slot[1])


def _set_slot(state: Any, slot: tuple[int, str], value: Any) -> Any:
    i, field = slot
    return (*state[:i], state[i]._replace(**{field: value}), *state[i + 1 :])


def _pure_step(tx: optax.GradientTransformation, params: Any, grads: Any, state: Any) -> Any:
    updates, state = tx.update(grads, state, params)
    return apply_updates(params, updates), state


def _is_dynamic(value: Any) -> bool:
    return isinstance(value, (jax.Array, np.ndarray, np.generic)) and not isinstance(value, bool)


def _kernel_call(spec: _Spec, scalars: Any, p_list: Any, g_list: Any, slot_lists: Any) -> Any:
    """One FFI call updating the leaves ``p_list`` (and their state) in place."""
    n_in, n_out = 2 + len(slot_lists), 1 + len(slot_lists)
    operands: list[Any] = [scalars]
    results: list[Any] = []
    aliases: dict[int, int] = {}
    for k, (p, g) in enumerate(zip(p_list, g_list, strict=True)):
        leaf_in = [p, g, *(s[k] for s in slot_lists)]
        leaf_out = [leaf_in[0], *leaf_in[2:]]
        base_in, base_out = 1 + k * n_in, k * n_out
        operands += leaf_in
        results += [jax.ShapeDtypeStruct(jnp.shape(x), jnp.float32) for x in leaf_out]
        aliases[base_in] = base_out
        for j in range(len(slot_lists)):
            aliases[base_in + 2 + j] = base_out + 1 + j
    call = jax.ffi.ffi_call(
        native.TARGET, results, input_output_aliases=aliases, vmap_method="sequential"
    )
    outs = call(*operands, **spec.attrs)
    p_new = [outs[k * n_out] for k in range(len(p_list))]
    s_new = [[outs[k * n_out + 1 + j] for k in range(len(p_list))] for j in range(n_out - 1)]
    return p_new, s_new


def _core(make: Callable[[dict[str, Any]], _Spec], hp_static: dict[str, Any]) -> Callable:
    """``core(hp_dyn, sub_state, p_list, g_list) -> (p_list, slot_lists)`` for eligible leaves.

    ``sub_state`` is the chain state whose per-parameter trees are lists of the eligible
    leaves. The kernel runs on CPU; the pure-JAX chain runs elsewhere, under vmap, and gives
    the derivatives.
    """

    def pure(hp_dyn: Any, sub_state: Any, p_list: Any, g_list: Any) -> Any:
        spec = make({**hp_static, **hp_dyn})
        p_new, s_new = _pure_step(spec.tx, p_list, g_list, sub_state)
        return p_new, [_get_slot(s_new, slot) for slot in spec.slots]

    def kernel(hp_dyn: Any, sub_state: Any, p_list: Any, g_list: Any) -> Any:
        spec = make({**hp_static, **hp_dyn})
        assert spec.scalars is not None
        scalars = jnp.stack([jnp.asarray(x, jnp.float32) for x in spec.scalars(sub_state)])
        slot_lists = [_get_slot(sub_state, slot) for slot in spec.slots]
        n_slots = len(slot_lists)
        p_new: list[Any] = []
        s_new: list[list[Any]] = [[] for _ in range(n_slots)]
        for lo in range(0, len(p_list), _LEAVES_PER_CALL):
            hi = min(len(p_list), lo + _LEAVES_PER_CALL)
            window = [s[lo:hi] for s in slot_lists]
            pp, ss = _kernel_call(spec, scalars, p_list[lo:hi], g_list[lo:hi], window)
            p_new += pp
            for j in range(n_slots):
                s_new[j] += ss[j]
        return p_new, s_new

    kernel_v = jax.custom_batching.custom_vmap(kernel)

    @kernel_v.def_vmap
    def _vmap_rule(axis_size: int, in_batched: Any, *args: Any) -> Any:
        in_axes = tuple(jax.tree.map(lambda b: 0 if b else None, ib) for ib in in_batched)
        out = jax.vmap(pure, in_axes=in_axes, axis_size=axis_size)(*args)
        return out, jax.tree.map(lambda _: True, out)

    def dispatch(*args: Any) -> Any:
        if not _accelerator_present():
            return kernel_v(*args)  # CPU-only process: skip tracing the unused pure branch
        return jax.lax.platform_dependent(*args, cpu=kernel_v, default=pure)

    core = jax.custom_jvp(dispatch)
    core.defjvp(lambda primals, tangents: jax.jvp(pure, primals, tangents))
    return core


@functools.cache
def _accelerator_present() -> bool:
    """True when this process can also run on a non-CPU backend (GPU, TPU, ...)."""
    for name in ("gpu", "tpu", "METAL"):
        try:
            if jax.devices(name):
                return True
        except Exception:  # unknown or uninitialisable backend: not present
            continue
    return False


def _single_device(trees: Iterable[Any]) -> bool:
    if jax.device_count() > 1:
        return False
    for tree in trees:
        for leaf in jax.tree.leaves(tree):
            if isinstance(leaf, jax.Array) and not isinstance(leaf, jax.core.Tracer):
                if len(leaf.sharding.device_set) > 1:
                    return False
    return True


def _eligible(p: Any, g: Any, states: list[Any]) -> bool:
    if g is None or p is None or not hasattr(p, "dtype") or not hasattr(g, "dtype"):
        return False
    shape = jnp.shape(p)
    if math.prod(shape) < _MIN_NATIVE_ELEMENTS:
        return False
    for x in (p, g, *states):
        if x is None or not hasattr(x, "dtype") or jnp.result_type(x) != jnp.float32:
            return False
        if jnp.shape(x) != shape:
            return False
    return True


def _make(
    spec_fn: Callable[[dict[str, Any]], _Spec], hp: dict[str, Any], backend: str
) -> FusedOptimizer:
    if backend not in _BACKENDS:
        raise ValueError(f"`backend` must be one of {_BACKENDS}, got {backend!r}.")
    spec = spec_fn(hp)
    tx = spec.tx
    hp_static = {k: v for k, v in hp.items() if not _is_dynamic(v)}
    hp_dyn = {k: v for k, v in hp.items() if _is_dynamic(v)}

    def use_native(params: Any, grads: Any) -> bool:
        if backend == "jax" or spec.scalars is None:
            return False
        if not native.available():
            if backend == "native":
                raise RuntimeError(
                    f"backend='native' was requested but the native kernel is unavailable "
                    f"({native.status()}). Use backend='auto' to fall back to pure JAX."
                )
            return False
        return _single_device((params, grads))

    def step(params: Any, grads: Any, state: Any) -> tuple[Any, Any]:
        if not use_native(params, grads):
            return _pure_step(tx, params, grads, state)
        try:
            p_leaves, treedef = jax.tree.flatten(params, is_leaf=_is_none)
            g_leaves = treedef.flatten_up_to(grads)
            s_leaves = [treedef.flatten_up_to(_get_slot(state, s)) for s in spec.slots]
        except (ValueError, TypeError, AttributeError, IndexError):
            return _pure_step(tx, params, grads, state)  # let the reference path report it
        idx = [
            i
            for i, (p, g) in enumerate(zip(p_leaves, g_leaves, strict=True))
            if _eligible(p, g, [s[i] for s in s_leaves])
        ]
        if not idx:
            return _pure_step(tx, params, grads, state)
        chosen = set(idx)
        # Counts, schedule states and the other leaves: the pure chain, with the kernel's
        # leaves masked out by None gradients (they pass through untouched).
        rest = treedef.unflatten([None if i in chosen else g for i, g in enumerate(g_leaves)])
        new_params, new_state = _pure_step(tx, params, rest, state)
        sub_state = state
        for k, slot in enumerate(spec.slots):
            sub_state = _set_slot(sub_state, slot, [s_leaves[k][i] for i in idx])
        p_sub, s_sub = _core(spec_fn, hp_static)(
            hp_dyn, sub_state, [p_leaves[i] for i in idx], [g_leaves[i] for i in idx]
        )
        out_p = treedef.flatten_up_to(new_params)
        for j, i in enumerate(idx):
            out_p[i] = p_sub[j]
        for k, slot in enumerate(spec.slots):
            leaves = treedef.flatten_up_to(_get_slot(new_state, slot))
            for j, i in enumerate(idx):
                leaves[i] = s_sub[k][j]
            new_state = _set_slot(new_state, slot, treedef.unflatten(leaves))
        return treedef.unflatten(out_p), new_state

    return FusedOptimizer(tx.init, tx.update, step)


# --------------------------------------------------------------------------------------------
# Public factories
# --------------------------------------------------------------------------------------------


def _hyperparams(args: dict[str, Any]) -> dict[str, Any]:
    """A factory's arguments (its ``locals()`` on entry) minus ``backend``."""
    return {k: v for k, v in args.items() if k != "backend"}


def rmsprop(
    learning_rate: ScalarOrSchedule,
    decay: ArrayLike = 0.9,
    eps: ArrayLike = 1e-8,
    initial_scale: ArrayLike = 0.0,
    eps_in_sqrt: bool = True,
    centered: bool = False,
    momentum: ArrayLike | None = None,
    nesterov: bool = False,
    bias_correction: bool = False,
    *,
    promote_half: bool = True,
    backend: str = "auto",
) -> FusedOptimizer:
    r""":func:`rmsjax.rmsprop` with a fused ``step``; same arguments, state and numbers.

    Per element, in one pass (:math:`\rho` = decay, :math:`\beta` = momentum, :math:`c` the
    bias correction :math:`1-\rho^t` or 1):

    .. math::
      \nu \leftarrow (1-\rho)g^2 + \rho\nu, \quad
      (\text{centered: } \mu \leftarrow (1-\rho)g + \rho\mu,\
      \sigma^2 = \max(\nu/c - (\mu/c)^2, 0);\ \text{else } \sigma^2 = \nu/c)

      s = g/\sqrt{\sigma^2+\epsilon}\ \text{(or } g/(\sqrt{\sigma^2}+\epsilon)), \quad
      u = -\eta s, \quad m \leftarrow u + \beta m,\ u \leftarrow m
      \ (\text{Nesterov: } u + \beta m), \quad \theta \leftarrow \theta + u

    Args: as :func:`rmsjax.rmsprop` (same valid ranges, checked at construction), plus
      ``backend``: ``"auto"`` (native kernel on CPU when available, else pure JAX),
      ``"native"`` (raise if the kernel is unavailable) or ``"jax"`` (never the kernel).

    Differences from optax: those of :func:`rmsjax.rmsprop`; optax has no fused step.
    """
    hp = _hyperparams(locals())
    return _make(_rmsprop_spec, hp, backend)


def adamw(
    learning_rate: ScalarOrSchedule,
    b1: ArrayLike = 0.9,
    b2: ArrayLike = 0.999,
    eps: ArrayLike = 1e-8,
    eps_root: ArrayLike = 0.0,
    mu_dtype: DTypeLike | None = None,
    weight_decay: ScalarOrSchedule = 1e-4,
    mask: Any | None = None,
    *,
    nesterov: bool = False,
    promote_half: bool = True,
    backend: str = "auto",
) -> FusedOptimizer:
    r""":func:`rmsjax.adamw` with a fused ``step``; same arguments, state and numbers.

    Per element: :math:`m \leftarrow (1-\beta_1)g + \beta_1 m`,
    :math:`\nu \leftarrow (1-\beta_2)g^2 + \beta_2\nu`,
    :math:`\theta \leftarrow \theta - \eta\,(\hat m/(\sqrt{\nu/(1-\beta_2^t)+\epsilon_{root}}
    + \epsilon) + \lambda\theta)` with :math:`\hat m` as in :func:`rmsjax.scale_by_adam`.

    Args: as :func:`rmsjax.adamw`, plus ``backend`` (see :func:`rmsprop`). With a ``mask``
    the step runs the pure-JAX path.

    Differences from optax: those of :func:`rmsjax.adamw`; optax has no fused step.
    """
    hp = _hyperparams(locals())
    return _make(_adamw_spec, hp, backend)


def adam(
    learning_rate: ScalarOrSchedule,
    b1: ArrayLike = 0.9,
    b2: ArrayLike = 0.999,
    eps: ArrayLike = 1e-8,
    eps_root: ArrayLike = 0.0,
    mu_dtype: DTypeLike | None = None,
    *,
    nesterov: bool = False,
    promote_half: bool = True,
    backend: str = "auto",
) -> FusedOptimizer:
    r"""Adam, ``chain(scale_by_adam, scale_by_learning_rate)`` as ``optax.adam``, with a fused step.

    Per element: the moments of :func:`rmsjax.scale_by_adam`, then
    :math:`\theta \leftarrow \theta - \eta\,\hat m/(\sqrt{\nu/(1-\beta_2^t)+\epsilon_{root}}
    + \epsilon)`.

    Args: ``learning_rate`` (>= 0 or a schedule), ``b1``, ``b2`` in [0, 1), ``eps``,
    ``eps_root`` >= 0, ``mu_dtype``, ``nesterov`` (NAdam), ``promote_half``, ``backend`` (see
    :func:`rmsprop`). Same numbers as ``optax.adam`` (differences: those of
    :func:`rmsjax.scale_by_adam`).
    """
    check_learning_rate("learning_rate", learning_rate)
    hp = _hyperparams(locals())
    return _make(_adam_spec, hp, backend)


def sgd(
    learning_rate: ScalarOrSchedule,
    momentum: ArrayLike | None = None,
    nesterov: bool = False,
    accumulator_dtype: DTypeLike | None = None,
    *,
    promote_half: bool = True,
    backend: str = "auto",
) -> FusedOptimizer:
    r"""SGD with optional heavy-ball/Nesterov momentum, as ``optax.sgd``, with a fused step.

    ``chain(trace(momentum, nesterov), scale_by_learning_rate(learning_rate))``; per element:
    :math:`m \leftarrow g + \beta m`, :math:`\theta \leftarrow \theta - \eta m` (Nesterov:
    :math:`\theta \leftarrow \theta - \eta (g + \beta m)`); without momentum
    :math:`\theta \leftarrow \theta - \eta g`.

    Args: ``learning_rate`` (>= 0 or a schedule), ``momentum`` in [0, 1] or ``None``,
    ``nesterov``, ``accumulator_dtype``, ``promote_half``, ``backend`` (see :func:`rmsprop`).
    Same numbers as ``optax.sgd`` (torch's SGD without dampening, with the learning rate
    outside the buffer).
    """
    check_learning_rate("learning_rate", learning_rate)
    hp = _hyperparams(locals())
    return _make(_sgd_spec, hp, backend)


def inject_hyperparams(
    factory: Callable[..., FusedOptimizer],
    static_args: str | Iterable[str] = (),
    hyperparam_dtype: DTypeLike | None = None,
) -> Callable[..., FusedOptimizer]:
    """``optax.inject_hyperparams`` for a fused factory: the state holds the hyperparameters.

    ``inject_hyperparams(rmsjax.fused.rmsprop)(learning_rate=0.1)`` returns a
    :class:`FusedOptimizer` whose ``init``/``update`` are exactly
    ``optax.inject_hyperparams(rmsjax.fused.rmsprop)(...)`` and whose ``step`` does the same
    thing fused: schedules are evaluated and ``state.hyperparams`` is read by optax's own code,
    then the fused step of the inner optimizer runs with those (traced) values. Arguments as
    for ``optax.inject_hyperparams``.
    """
    protocol = optax.inject_hyperparams(factory, static_args, hyperparam_dtype)

    @functools.wraps(factory)
    def as_step(*args: Any, **kwargs: Any) -> optax.GradientTransformation:
        # A transformation whose "update" is the fused step (new params in place of updates),
        # so optax's wrapper can manage the hyperparameters around it.
        opt = factory(*args, **kwargs)

        def update(grads: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
            return opt.step(params, grads, state)

        return optax.GradientTransformation(opt.init, update)

    stepping = optax.inject_hyperparams(as_step, static_args, hyperparam_dtype)

    @functools.wraps(factory)
    def wrapped(*args: Any, **kwargs: Any) -> FusedOptimizer:
        outer = protocol(*args, **kwargs)
        inner = stepping(*args, **kwargs)

        def step(params: Any, grads: Any, state: Any) -> tuple[Any, Any]:
            return inner.update(grads, state, params)

        return FusedOptimizer(outer.init, outer.update, step)

    return wrapped
