"""Which leaves of a step the native kernel updates, and in which groups.

A leaf goes to the kernel when its parameters and gradients are float32 or bfloat16 arrays of
the same shape with at least ``min_native_size`` elements, and its state slots are all float32
arrays of that shape or all 8-bit moments in a codec the kernel runs
(:func:`rmsjax._native.codecs.unsupported`); the leaves of one *group* share one kernel
configuration (flags, scalars, codec operands), so each group is updated by its own kernel
calls. Everything else stays on the pure-JAX chain: :func:`leaf_key` says why where the user
should hear it (``backend="native"`` raises with it).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rmsjax._native import codecs
from rmsjax.storage import KernelView, StoredArray, is_stored
from rmsjax.tree import is_none

__all__ = [
    "PARAM_DTYPES",
    "Grouping",
    "Skip",
    "group_leaves",
    "kernel_view",
    "leaf_key",
    "leaf_paths",
    "leaves_like",
    "single_device",
    "stored_issue",
]

# The parameter dtypes the kernel takes (gradients of the same dtype).
PARAM_DTYPES = (np.dtype(np.float32), np.dtype(jnp.bfloat16))


def leaf_paths(tree: Any) -> list[Any]:
    """The key path of every leaf of ``tree`` (``None`` leaves included), in flattening order."""
    return [path for path, _ in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_none)[0]]


def leaves_like(treedef: Any, tree: Any) -> list[Any] | None:
    """``tree``'s subtrees at the leaves of ``treedef`` (the parameters' structure, ``None``
    leaves included), or ``None`` when ``tree`` does not have that structure above them
    (another container type, other keys, another length). Nothing but jax's
    ``flatten_up_to`` runs inside the check, whose ``ValueError`` says exactly that."""
    try:
        leaves: list[Any] = treedef.flatten_up_to(tree)
    except ValueError:
        return None
    return leaves


def single_device(trees: Iterable[Any]) -> bool:
    """True when one device is visible and no array of ``trees`` is sharded over several (the
    kernel has no partitioning rule)."""
    if jax.device_count() > 1:
        return False
    for tree in trees:
        for leaf in jax.tree.leaves(tree):
            if isinstance(leaf, jax.Array) and not isinstance(leaf, jax.core.Tracer):
                if len(leaf.sharding.device_set) > 1:
                    return False
    return True


class Skip(NamedTuple):
    """A leaf the kernel does not take; ``why`` is set when ``backend="native"`` must raise."""

    why: str | None = None


def kernel_view(x: StoredArray, shape: tuple[int, ...]) -> KernelView:
    """The kernel's view of a stored moment that :func:`leaf_key` accepted."""
    view = x.kernel_view(shape)
    assert not isinstance(view, str)  # the leaf's group was chosen by leaf_key
    return view


def stored_issue(x: StoredArray, shape: tuple[int, ...]) -> str | None:
    """Why the kernel cannot update a stored state array, or None when it can."""
    view = x.kernel_view(shape)
    return view if isinstance(view, str) else codecs.unsupported(view.codec)


def leaf_key(p: Any, g: Any, states: list[Any], min_size: int) -> Any:
    """The group of leaves (one kernel configuration) this leaf joins, or a :class:`Skip`.

    The key is the parameters' dtype and, for 8-bit state, the codec of every slot: the leaves
    of one group share the kernel's flags, scalars and codec operands.
    """
    if g is None or p is None or not hasattr(p, "dtype") or not hasattr(g, "dtype"):
        return Skip()
    shape = tuple(np.shape(p))
    if math.prod(shape) < min_size:
        return Skip()
    dtype = np.dtype(p.dtype)
    if dtype not in PARAM_DTYPES or np.dtype(g.dtype) != dtype or tuple(np.shape(g)) != shape:
        return Skip()
    stored = [x for x in states if is_stored(x)]
    if not stored:
        for x in states:
            if getattr(x, "dtype", None) != np.float32 or tuple(np.shape(x)) != shape:
                return Skip()
        return (dtype.name, None)
    for x in stored:
        why = stored_issue(x, shape)
        if why is not None:
            return Skip(why)
    if len(stored) != len(states):
        return Skip("8-bit state mixed with unquantized state in one parameter's moments")
    codecs_ = [kernel_view(x, shape).codec for x in stored]
    blocks = {c.block_size for c in codecs_}
    if len(blocks) != 1:
        return Skip(f"8-bit moments with different block sizes {sorted(blocks)}")
    return (dtype.name, tuple(codecs_))


class Grouping(NamedTuple):
    """The leaves of a step, by index into the flattened parameters."""

    groups: dict[Any, list[int]]  # group key (see leaf_key) -> its leaves, in tree order
    refused: list[tuple[int, str]]  # leaves left out with a reason (backend="native" raises)


def group_leaves(
    p_leaves: Sequence[Any],
    g_leaves: Sequence[Any],
    s_leaves: Mapping[str, Sequence[Any]],
    min_size: int,
) -> Grouping:
    """:func:`leaf_key` for every leaf: ``s_leaves`` holds each present state slot's leaves,
    parallel to ``p_leaves`` and ``g_leaves``."""
    groups: dict[Any, list[int]] = {}
    refused: list[tuple[int, str]] = []
    for i, (p, g) in enumerate(zip(p_leaves, g_leaves, strict=True)):
        key = leaf_key(p, g, [s_leaves[s][i] for s in s_leaves], min_size)
        if isinstance(key, Skip):
            if key.why is not None:
                refused.append((i, key.why))
            continue
        groups.setdefault(key, []).append(i)
    return Grouping(groups, refused)
