"""Independent copies of a computation for XLA's fusion: :func:`instance`.

XLA fuses an elementwise computation into each loop that reads it only when it can recompute
it there: an expression that feeds a reduction AND an elementwise loop over the reduction's
result, or that contains a table lookup (a gather) or a division read by several loops, is
computed once and kept in memory whole. For a decoded optimizer moment that is a float32 array
of the parameter's size: the temporary that makes low-bit state cost more memory at the step
than float32 state.

The storage layer therefore builds the new value of a stored moment once per loop that reads
it (:func:`rmsjax.tree.map_rule`): the update, the block scales, the codes. Written alike, those
copies would be merged back by XLA's common-subexpression elimination; :func:`instance` makes
them differ in a way no simplification sees through, at no cost: the stored arrays pass through
an optimisation barrier together with the copy's number, and each array is selected by a
comparison on that number (true, but opaque to XLA). The values are unchanged, bit for bit.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["instance", "written"]


def instance(tree: Any, k: int) -> Any:
    """``tree`` (a pytree of arrays) as the ``k``-th independent copy: the same values, which
    XLA does not merge with another copy's (see the module docstring)."""
    leaves, treedef = jax.tree.flatten(tree)
    if not leaves:
        return tree
    *leaves, tag = lax.optimization_barrier((*leaves, jnp.int32(k)))
    keep = tag >= 0  # always true (k >= 0), unknown to the compiler
    return jax.tree.unflatten(treedef, [jnp.where(keep, x, jnp.zeros((), x.dtype)) for x in leaves])


def written(tree: Any) -> jax.Array:
    """An int32 scalar, always 1, computed from the first entry of every array of ``tree``: it
    is known only once they all are (``(byte | 1) != 0`` on each entry's first byte, which XLA
    cannot simplify to true).

    :func:`rmsjax.tree.map_rule` starts the first read of a leaf's stored moments at row
    ``1 - written(previous leaf's new moments)`` (row 0), so that XLA encodes the leaves in
    turn: the parts it copies to write them in place then never coexist.
    """
    ones = [
        (lax.bitcast_convert_type(x.reshape(-1)[:1], jnp.uint8).reshape(-1)[0] | 1) != 0
        for x in jax.tree.leaves(tree)
    ]
    return jnp.all(jnp.stack(ones)).astype(jnp.int32)
