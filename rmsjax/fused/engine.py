"""The fused step's machinery: leaf selection, the kernel call, and the choice of path.

:func:`build` turns a protocol optimizer (``tx``, from a factory call with hyperparameters
``hp``) and its :class:`~rmsjax.fused.plans.Plan` into a :class:`FusedOptimizer`. Its ``step``
sends the eligible leaves through the native kernel (:mod:`rmsjax._native.call`, operands built
from :mod:`rmsjax._native.table`) and everything else (counts, schedule states, other leaves)
through ``tx.update`` + :func:`rmsjax.apply_updates`.

Names documented for tests: :func:`accelerator_present` (monkeypatch it to emulate a process
with a GPU); ``LEAVES_PER_CALL`` and ``RESULTS_PER_CALL`` are in :mod:`rmsjax._native.call`.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from rmsjax import native
from rmsjax._native import call, codecs, table
from rmsjax.fused.plans import Plan, Planner, StateLayoutError, find_state, replace_field
from rmsjax.storage import KernelView, StoredArray, is_stored
from rmsjax.updates import apply_updates

__all__ = [
    "BACKENDS",
    "MIN_NATIVE_SIZE",
    "FusedOptimizer",
    "NativeFallbackWarning",
    "accelerator_present",
    "build",
]

BACKENDS = ("auto", "native", "jax")
# Leaves smaller than this many elements are left to the XLA-compiled pure-JAX rule: for them a
# step costs per-array overhead, not bandwidth, and benchmarks/run.py measured the kernel slower
# than the compiled chain on trees of 4K-element leaves (1024 leaves, 4M parameters) and faster
# from 32K-element leaves up. The fused factories' ``min_native_size`` argument overrides it.
MIN_NATIVE_SIZE = 16384


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


class NativeFallbackWarning(UserWarning):
    """The native kernel is unavailable, so fused steps run the (slower) pure-JAX path.

    Issued once per process, at the first fused step with ``backend="auto"`` that has leaves
    the kernel would take, in a CPU-only process where the kernel could not be built or loaded
    (not when ``RMSJAX_NATIVE=0`` or ``backend="jax"`` chose the pure-JAX path on purpose).
    Silence it with ``warnings.filterwarnings("ignore", category=NativeFallbackWarning)``.
    """


_fallback_warned = False


def _warn_fallback() -> None:
    global _fallback_warned
    if _fallback_warned or not native.enabled() or accelerator_present():
        return
    _fallback_warned = True
    warnings.warn(
        f"rmsjax.fused: the native CPU kernel is unavailable ({native.status()}); fused steps "
        "run the pure-JAX path instead (same numbers, slower). Run `python -m rmsjax.native` "
        "to see why; pass backend='jax' (or set RMSJAX_NATIVE=0) to choose the pure-JAX path "
        "on purpose.",
        NativeFallbackWarning,
        stacklevel=3,
    )


@functools.cache
def accelerator_present() -> bool:
    """True when this process can also run on a non-CPU backend (GPU, TPU, ...).

    Then a fused step called outside ``jit`` picks its path per platform
    (``jax.lax.platform_dependent``: the kernel on CPU, the pure-JAX chain elsewhere), and a
    missing kernel is not warned about. Under ``jit`` the choice is made while lowering, for
    the platforms lowered for (see ``fused_step_p``).
    """
    for name in ("gpu", "tpu", "METAL"):
        try:
            if jax.devices(name):
                return True
        except Exception:  # unknown or uninitialisable backend: not present
            continue
    return False


def _is_none(x: Any) -> bool:
    return x is None


def _is_dynamic(value: Any) -> bool:
    return isinstance(value, (jax.Array, np.ndarray, np.generic)) and not isinstance(value, bool)


def _pure_step(
    tx: optax.GradientTransformation, params: Any, grads: Any, state: Any
) -> tuple[Any, Any]:
    updates, state = tx.update(grads, state, params)
    return apply_updates(params, updates), state


def _core(
    factory: Callable[..., optax.GradientTransformation],
    planner: Planner,
    hp_static: dict[str, Any],
) -> Callable[..., Any]:
    """``core(hp_dyn, sub_state, p_list, g_list) -> (p_list, slot_lists)`` for eligible leaves.

    ``sub_state`` is the optimizer state whose slot fields are lists of the eligible leaves.
    The kernel runs on CPU; the pure-JAX chain runs elsewhere, under vmap, and gives the
    derivatives (both rebuilt from the hyperparameters, which may be traced). ``core`` binds
    one ``fused_step_p`` (see there for how each of those is chosen).
    """

    def plan_of(hp_dyn: Any) -> Plan:
        plan = planner({**hp_static, **hp_dyn})
        assert plan is not None  # a configuration with no plan never reaches the core
        return plan

    def pure(hp_dyn: Any, sub_state: Any, p_list: Any, g_list: Any) -> Any:
        plan = plan_of(hp_dyn)
        tx = factory(**hp_static, **hp_dyn)
        p_new, s_new = _pure_step(tx, p_list, g_list, sub_state)
        names = table.present_slots(plan.kind, plan.flags)
        return p_new, [getattr(find_state(s_new, plan.slots[s], s), s) for s in names]

    def kernel(hp_dyn: Any, sub_state: Any, p_list: Any, g_list: Any) -> Any:
        plan = plan_of(hp_dyn)
        names = table.present_slots(plan.kind, plan.flags)
        slot_lists = {s: getattr(find_state(sub_state, plan.slots[s], s), s) for s in names}
        dtype = jnp.dtype(p_list[0].dtype)
        q8 = bool(names) and is_stored(slot_lists[names[0]][0])
        flags = {
            **plan.flags,
            **plan.dtype_flags(sub_state, dtype),
            "bf16": dtype == jnp.bfloat16,
            "q8": q8,
        }
        vector = call.visible_work(call.scalar_vector(plan.kind, plan.scalars(sub_state, dtype)))
        codec_operands: list[Any] = []
        if q8:
            # every leaf of the group has the same codecs (the group's key, see _leaf_key)
            views = {
                s: [_view(x, tuple(p.shape)) for x, p in zip(slot_lists[s], p_list, strict=True)]
                for s in names
            }
            codec_operands = [jnp.asarray(codecs.operand(views[s][0].codec)) for s in names]
            slot_lists = {s: [v.arrays for v in views[s]] for s in names}
        p_new, new_lists = call.run(
            plan.kind, flags, vector, p_list, g_list, slot_lists, codec_operands
        )
        s_new = [new_lists[s] for s in names]
        if q8:
            old = {s: getattr(find_state(sub_state, plan.slots[s], s), s) for s in names}
            s_new = [
                [_restored(x, new) for x, new in zip(old[s], s_new[j], strict=True)]
                for j, s in enumerate(names)
            ]
        return p_new, s_new

    def core(hp_dyn: Any, sub_state: Any, p_list: Any, g_list: Any) -> Any:
        args = (hp_dyn, sub_state, p_list, g_list)
        flat, in_tree = jax.tree.flatten(args)
        # the results are the new parameters and slots: the same arrays as those operands
        plan = plan_of(hp_dyn)
        names = table.present_slots(plan.kind, plan.flags)
        slots = [getattr(find_state(sub_state, plan.slots[s], s), s) for s in names]
        like, out_tree = jax.tree.flatten((p_list, slots))
        position = {id(x): i for i, x in enumerate(flat)}
        out_index = tuple(position[id(x)] for x in like)
        call = _Call(kernel, pure, in_tree, out_tree, out_index, f"{len(p_list)} leaves")
        return jax.tree.unflatten(out_tree, fused_step_p.bind(*flat, call=call))

    return core


class _Call:
    """The static part of one ``fused_step_p``: the kernel and the pure-JAX rule (both
    ``(hp_dyn, sub_state, p_list, g_list) -> (p_list, slot_lists)``), how the flat operands
    and results are structured, and which operand each result replaces (same shape and
    dtype). Hashed and compared by identity."""

    __slots__ = ("in_tree", "kernel", "label", "out_index", "out_tree", "pure")

    def __init__(
        self,
        kernel: Callable[..., Any],
        pure: Callable[..., Any],
        in_tree: Any,
        out_tree: Any,
        out_index: tuple[int, ...],
        label: str,
    ):
        self.kernel, self.pure = kernel, pure
        self.in_tree, self.out_tree = in_tree, out_tree
        self.out_index, self.label = out_index, label

    def __repr__(self) -> str:
        return self.label

    def flat(self, fn: Callable[..., Any], *flat: Any) -> list[Any]:
        """``fn`` (the kernel or the pure rule) on flat operands, with flat results."""
        leaves, tree = jax.tree.flatten(fn(*jax.tree.unflatten(self.in_tree, flat)))
        if tree != self.out_tree:
            raise AssertionError(f"fused step results {tree}, expected {self.out_tree}")
        return leaves


# One primitive for all the kernel calls of a group of leaves. It stands for the step of those
# leaves until XLA lowering, which picks the rule per platform: the FFI kernel calls on CPU,
# the pure-JAX chain elsewhere (only the platforms lowered for are ever traced). ``vmap`` runs
# the pure-JAX chain under vmap, differentiation takes the pure-JAX chain's JVP. A primitive
# rather than jax.custom_jvp / custom_vmap / lax.platform_dependent wrappers: those trace the
# kernel path once more per wrapper over all the step's arrays, which was most of the fused
# step's trace time on a tree of many leaves. The name contains ``ffi_call`` (the documented
# way to see that a step uses the kernel: look for it in ``jax.make_jaxpr(opt.step)``).
fused_step_p = Primitive("rmsjax_ffi_call")
fused_step_p.multiple_results = True


def _impl(*flat: Any, call: _Call) -> list[Any]:
    # eager (outside jit): the kernel's FFI calls run one by one, as ops, on CPU
    if accelerator_present():
        return jax.lax.platform_dependent(
            *flat,
            cpu=functools.partial(call.flat, call.kernel),
            default=functools.partial(call.flat, call.pure),
        )
    return call.flat(call.kernel, *flat)


def _abstract_eval(*avals: Any, call: _Call) -> list[Any]:
    out = [avals[i] for i in call.out_index]
    return [a.update(weak_type=False) if a.weak_type else a for a in out]


def _lower_kernel(*flat: Any, call: _Call) -> list[Any]:
    return call.flat(call.kernel, *flat)


def _lower_pure(*flat: Any, call: _Call) -> list[Any]:
    return call.flat(call.pure, *flat)


def _jvp(primals: Sequence[Any], tangents: Sequence[Any], *, call: _Call) -> Any:
    tangents = [ad.instantiate_zeros(t) for t in tangents]
    return jax.jvp(functools.partial(call.flat, call.pure), tuple(primals), tuple(tangents))


def _batch(args: Sequence[Any], dims: Sequence[Any], *, call: _Call) -> Any:
    out = jax.vmap(functools.partial(call.flat, call.pure), in_axes=tuple(dims))(*args)
    return out, [0] * len(out)


fused_step_p.def_impl(_impl)
fused_step_p.def_abstract_eval(_abstract_eval)
mlir.register_lowering(fused_step_p, mlir.lower_fun(_lower_kernel, multiple_results=True), "cpu")
mlir.register_lowering(fused_step_p, mlir.lower_fun(_lower_pure, multiple_results=True))
ad.primitive_jvps[fused_step_p] = _jvp
batching.primitive_batchers[fused_step_p] = _batch


def _paths(tree: Any) -> list[Any]:
    """The key path of every leaf of ``tree`` (``None`` leaves included), in flattening order."""
    return [path for path, _ in jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_none)[0]]


def _single_device(trees: Iterable[Any]) -> bool:
    if jax.device_count() > 1:
        return False
    for tree in trees:
        for leaf in jax.tree.leaves(tree):
            if isinstance(leaf, jax.Array) and not isinstance(leaf, jax.core.Tracer):
                if len(leaf.sharding.device_set) > 1:
                    return False
    return True


def _restored(old: StoredArray, new: tuple[Any, ...]) -> StoredArray:
    """``old``'s storage holding the kernel's new arrays."""
    return old.with_arrays(tuple(new))


def _view(x: StoredArray, shape: tuple[int, ...]) -> KernelView:
    view = x.kernel_view(shape)
    assert not isinstance(view, str)  # the leaf's group was chosen by _leaf_key
    return view


_PARAM_DTYPES = (np.dtype(np.float32), np.dtype(jnp.bfloat16))


class _Skip(NamedTuple):
    """A leaf the kernel does not take; ``why`` is set when ``backend="native"`` must raise."""

    why: str | None = None


def _stored_issue(x: StoredArray, shape: tuple[int, ...]) -> str | None:
    """Why the kernel cannot update a stored state array, or None when it can."""
    view = x.kernel_view(shape)
    return view if isinstance(view, str) else codecs.unsupported(view.codec)


def _leaf_key(p: Any, g: Any, states: list[Any], min_size: int) -> Any:
    """The group of leaves (one kernel configuration) this leaf joins, or a :class:`_Skip`.

    The key is the parameters' dtype and, for 8-bit state, the codec of every slot: the leaves
    of one group share the kernel's flags, scalars and codec operands.
    """
    if g is None or p is None or not hasattr(p, "dtype") or not hasattr(g, "dtype"):
        return _Skip()
    shape = tuple(np.shape(p))
    if math.prod(shape) < min_size:
        return _Skip()
    dtype = np.dtype(p.dtype)
    if dtype not in _PARAM_DTYPES or np.dtype(g.dtype) != dtype or tuple(np.shape(g)) != shape:
        return _Skip()
    stored = [x for x in states if is_stored(x)]
    if not stored:
        for x in states:
            if getattr(x, "dtype", None) != np.float32 or tuple(np.shape(x)) != shape:
                return _Skip()
        return (dtype.name, None)
    for x in stored:
        why = _stored_issue(x, shape)
        if why is not None:
            return _Skip(why)
    if len(stored) != len(states):
        return _Skip("8-bit state mixed with unquantized state in one parameter's moments")
    codecs_ = [_view(x, shape).codec for x in stored]
    blocks = {c.block_size for c in codecs_}
    if len(blocks) != 1:
        return _Skip(f"8-bit moments with different block sizes {sorted(blocks)}")
    return (dtype.name, tuple(codecs_))


def build(
    factory: Callable[..., optax.GradientTransformation],
    hp: Mapping[str, Any],
    tx: optax.GradientTransformation,
    planner: Planner,
    *,
    backend: str,
    min_native_size: int,
) -> FusedOptimizer:
    """The fused optimizer for ``tx = factory(**hp)``: ``init``/``update`` are ``tx``'s.

    Args:
      factory: the protocol optimizer factory (called again inside the step with traced
        hyperparameters, for the pure-JAX branch).
      hp: ``factory``'s arguments, by name, defaults applied.
      tx: ``factory(**hp)``.
      planner: the factory's planner (:mod:`rmsjax.fused.plans`).
      backend: ``"auto"``, ``"native"`` or ``"jax"``.
      min_native_size: leaves with fewer elements take the pure-JAX path.
    """
    if backend not in BACKENDS:
        raise ValueError(f"`backend` must be one of {BACKENDS}, got {backend!r}.")
    if not isinstance(min_native_size, int) or isinstance(min_native_size, bool):
        raise TypeError(f"`min_native_size` must be an int >= 0, got {min_native_size!r}.")
    if min_native_size < 0:
        raise ValueError(
            f"`min_native_size` must be an int >= 0 (elements), got {min_native_size!r}."
        )
    plan = planner(hp)
    hp_static = {k: v for k, v in hp.items() if not _is_dynamic(v)}
    hp_dyn = {k: v for k, v in hp.items() if _is_dynamic(v)}

    def step(params: Any, grads: Any, state: Any) -> tuple[Any, Any]:
        if plan is None or backend == "jax":
            return _pure_step(tx, params, grads, state)
        if backend == "native" and not native.available():
            raise RuntimeError(
                f"backend='native' was requested but the native kernel is unavailable "
                f"({native.status()}). Use backend='auto' to fall back to pure JAX."
            )
        if not _single_device((params, grads)):
            return _pure_step(tx, params, grads, state)
        names = table.present_slots(plan.kind, plan.flags)
        try:
            p_leaves, tdef = jax.tree.flatten(params, is_leaf=_is_none)
            treedef: Any = tdef  # jax's PyTreeDef stub lacks flatten_up_to
            g_leaves = treedef.flatten_up_to(grads)
            s_leaves = {
                s: treedef.flatten_up_to(getattr(find_state(state, plan.slots[s], s), s))
                for s in names
            }
        except (StateLayoutError, ValueError, TypeError, AttributeError, IndexError):
            return _pure_step(tx, params, grads, state)  # let the reference path report it
        groups: dict[Any, list[int]] = {}
        for i, (p, g) in enumerate(zip(p_leaves, g_leaves, strict=True)):
            key = _leaf_key(p, g, [s_leaves[s][i] for s in names], min_native_size)
            if isinstance(key, _Skip):
                if key.why is not None and backend == "native":
                    path = jax.tree_util.keystr(_paths(params)[i]) or "the root"
                    raise ValueError(
                        f"backend='native': the native kernel cannot update the parameter at "
                        f"{path}: {key.why}. Use backend='auto' to run such leaves with the "
                        "pure-JAX chain (the other leaves still use the kernel)."
                    )
                continue
            groups.setdefault(key, []).append(i)
        if not groups:
            return _pure_step(tx, params, grads, state)
        if not native.available():
            _warn_fallback()
            return _pure_step(tx, params, grads, state)
        chosen = {i for idx in groups.values() for i in idx}
        # Counts, schedule states and the other leaves: the pure chain, with the kernel's
        # leaves masked out by None gradients (they pass through untouched).
        rest = treedef.unflatten([None if i in chosen else g for i, g in enumerate(g_leaves)])
        new_params, new_state = _pure_step(tx, params, rest, state)
        out_p = treedef.flatten_up_to(new_params)
        out_s = {
            s: treedef.flatten_up_to(getattr(find_state(new_state, plan.slots[s], s), s))
            for s in names
        }
        core = _core(factory, planner, hp_static)
        for idx in groups.values():  # one kernel configuration per group
            sub_state = state
            for s in names:
                leaves = [s_leaves[s][i] for i in idx]
                sub_state = replace_field(sub_state, plan.slots[s], s, leaves)
            p_sub, s_sub = core(
                hp_dyn, sub_state, [p_leaves[i] for i in idx], [g_leaves[i] for i in idx]
            )
            for j, i in enumerate(idx):
                out_p[i] = p_sub[j]
                for k, s in enumerate(names):
                    out_s[s][i] = s_sub[k][j]
        for s in names:
            new_state = replace_field(new_state, plan.slots[s], s, treedef.unflatten(out_s[s]))
        return treedef.unflatten(out_p), new_state

    return FusedOptimizer(tx.init, tx.update, step)
