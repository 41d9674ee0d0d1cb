"""The kernel's FFI call: operands marshalled by the names of :mod:`rmsjax._native.table`.

:func:`kernel_call` is one checked call; :func:`run` updates any number of leaves with as many
calls as :data:`RESULTS_PER_CALL` and :data:`LEAVES_PER_CALL` require (both documented test
hooks: monkeypatch them here to make a small tree take several calls).

The operands of one call, their order and which result each is updated into: :func:`ffi`
(the kernel's side: the comment at the top of ``fused_step.cc``); their names, counts and the
attributes the kernel checks: :mod:`rmsjax._native.table`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rmsjax._native import table
from rmsjax._native.loader import TARGET

__all__ = [
    "LEAVES_PER_CALL",
    "RESULTS_PER_CALL",
    "ffi",
    "kernel_call",
    "leaves_per_call",
    "results_per_leaf",
    "run",
    "scalar_vector",
    "visible_work",
]

# XLA's compile time grows with the square of the results of one custom call (its fusion pass
# checks every in-place output pair of the call for each result, and MLIR verifies each
# alias against the others; 1024 leaves in one call: about a minute), and by a smaller amount
# with the number of calls (one thunk each), so a large tree is updated by several calls of at
# most RESULTS_PER_CALL results (new parameters and state arrays; 16 measured fastest to compile
# on 1024 leaves for rmsprop, centered rmsprop with momentum and AdamW: 8, 4 and 5 leaves per
# call) and at most LEAVES_PER_CALL leaves. Each call is still a single pass over its leaves,
# and the calls are asynchronous: they run back to back on XLA's thread pool, without waiting
# for each other (the step time did not change from 32 leaves per call to 4).
RESULTS_PER_CALL = 16
LEAVES_PER_CALL = 16

# XLA's CPU client runs a program that its cost analysis finds cheap (fewer than 1000 flops)
# synchronously, on the thread that calls it; a custom call counts as 0 flops. The kernel's
# program would be run so, and a training loop could not dispatch step n + 1 (for a tree of many
# leaves, milliseconds of Python and PjRt work per step) while step n runs: see
# :func:`visible_work`.
_VISIBLE_WORK = 4096


def kernel_call(
    kind: table.Kind,
    flags: Mapping[str, bool],
    scalars: Mapping[str, Any],
    p_list: Sequence[Any],
    g_list: Sequence[Any],
    slots: Mapping[str, Sequence[Any]],
) -> tuple[list[Any], dict[str, list[Any]]]:
    """One FFI call updating the leaves ``p_list`` and their state slots, in place.

    Every operand is named: ``scalars`` must hold exactly the kind's scalar names and ``slots``
    exactly the slots :func:`rmsjax._native.table.present_slots` gives for ``flags`` (each a
    list parallel to ``p_list``); anything else raises ``ValueError`` while tracing. Returns the
    new parameters and the new slot lists, by slot name.
    """
    names = table.present_slots(kind, flags)
    if set(slots) != set(names):
        raise ValueError(
            f"kernel {kind.name!r} with {dict(flags)} takes the slots {names}, got {sorted(slots)}"
        )
    if set(scalars) != set(kind.scalars):
        raise ValueError(
            f"kernel {kind.name!r} takes the scalars {kind.scalars}, got {sorted(scalars)}"
        )
    n_leaves = len(p_list)
    if n_leaves == 0 or len(g_list) != n_leaves or any(len(slots[s]) != n_leaves for s in names):
        raise ValueError("kernel_call needs one gradient and one array per slot for each leaf")
    return ffi(kind, flags, scalar_vector(kind, scalars), p_list, g_list, slots)


def scalar_vector(kind: table.Kind, scalars: Mapping[str, Any]) -> Any:
    """The kernel's float32 scalar operand: ``scalars`` in the order of ``kind.scalars``."""
    return jnp.stack([jnp.asarray(scalars[name], jnp.float32) for name in kind.scalars])


def visible_work(vector: Any) -> Any:
    """``vector`` minus a zero that XLA cannot see is zero: ``sum(z * z)`` over
    ``_VISIBLE_WORK`` zeros behind an optimization barrier (about 8K flops, a few microseconds).

    The flops make XLA's CPU client execute the step asynchronously, like any program with real
    arithmetic, instead of on the calling thread. ``x - (+0)`` is ``x`` for every float32 ``x``
    (signed zeros, infinities and NaN included), so the kernel's scalars are unchanged.
    """
    zeros = jax.lax.optimization_barrier(jnp.zeros(_VISIBLE_WORK, jnp.float32))
    return vector - jnp.sum(zeros * zeros)


def results_per_leaf(q8: bool, n_slots: int) -> int:
    """The kernel's results per leaf: the parameters, then each state slot (codes and scales
    with 8-bit state)."""
    return 1 + (2 if q8 else 1) * n_slots


def leaves_per_call(per_leaf: int) -> int:
    """How many leaves one kernel call takes when each has ``per_leaf`` results (see
    :data:`RESULTS_PER_CALL`): at least 1, at most :data:`LEAVES_PER_CALL`."""
    return max(1, min(LEAVES_PER_CALL, RESULTS_PER_CALL // per_leaf))


def ffi(
    kind: table.Kind,
    flags: Mapping[str, bool],
    vector: Any,
    p_list: Sequence[Any],
    g_list: Sequence[Any],
    slots: Mapping[str, Sequence[Any]],
    codec_operands: Sequence[Any] = (),
) -> tuple[list[Any], dict[str, list[Any]]]:
    """The FFI call itself, operands already checked (see :func:`kernel_call`).

    With the flag ``q8`` each slot entry is a ``(codes, scales)`` pair and ``codec_operands``
    holds one codec operand per present slot; the new slot entries are pairs too.
    """
    names = table.present_slots(kind, flags)
    q8 = table.complete_flags(kind, flags)["q8"]
    n_leaves, n_slots = len(p_list), len(names)
    operands: list[Any] = [vector, *codec_operands]
    results: list[Any] = []
    aliases: dict[int, int] = {}
    for k in range(n_leaves):
        states = [a for s in names for a in (slots[s][k] if q8 else (slots[s][k],))]
        base_in, base_out = len(operands), len(results)
        operands += [p_list[k], g_list[k], *states]
        results += [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (p_list[k], *states)]
        aliases[base_in] = base_out
        for j in range(len(states)):
            aliases[base_in + 2 + j] = base_out + 1 + j
    call = jax.ffi.ffi_call(TARGET, results, input_output_aliases=aliases, vmap_method="sequential")
    outs = call(
        *operands,
        kind=np.int64(kind.id),
        flags=np.int64(table.flag_bits(kind, flags)),
        leaves=np.int64(n_leaves),
        table=np.int64(table.TABLE_HASH),
    )
    per = 2 if q8 else 1
    n_out = results_per_leaf(q8, n_slots)
    p_new = list(outs[0::n_out])
    s_new: dict[str, list[Any]] = {}
    for j, s in enumerate(names):
        first = 1 + per * j
        if q8:
            s_new[s] = list(zip(outs[first::n_out], outs[first + 1 :: n_out], strict=True))
        else:
            s_new[s] = list(outs[first::n_out])
    return p_new, s_new


def run(
    kind: table.Kind,
    flags: Mapping[str, bool],
    vector: Any,
    p_list: Sequence[Any],
    g_list: Sequence[Any],
    slots: Mapping[str, Sequence[Any]],
    codec_operands: Sequence[Any] = (),
) -> tuple[list[Any], dict[str, list[Any]]]:
    """:func:`ffi` over any number of leaves: consecutive windows of :func:`leaves_per_call`
    leaves, one call each, with the same scalars and codec operands. Same arguments and
    results as :func:`ffi`."""
    names = table.present_slots(kind, flags)
    q8 = table.complete_flags(kind, flags)["q8"]
    per_call = leaves_per_call(results_per_leaf(q8, len(names)))
    p_new: list[Any] = []
    s_new: dict[str, list[Any]] = {s: [] for s in names}
    for lo in range(0, len(p_list), per_call):
        hi = min(len(p_list), lo + per_call)
        window = {s: slots[s][lo:hi] for s in names}
        pp, ss = ffi(kind, flags, vector, p_list[lo:hi], g_list[lo:hi], window, codec_operands)
        p_new += pp
        for s in names:
            s_new[s] += ss[s]
    return p_new, s_new
