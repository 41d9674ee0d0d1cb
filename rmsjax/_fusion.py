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

__all__ = ["instance"]


def instance(tree: Any, k: int) -> Any:
    """``tree`` (a pytree of arrays) as the ``k``-th independent copy: the same values, which
    XLA does not merge with another copy's (see the module docstring)."""
    leaves, treedef = jax.tree.flatten(tree)
    if not leaves:
        return tree
    *leaves, tag = lax.optimization_barrier((*leaves, jnp.int32(k)))
    keep = tag >= 0  # always true (k >= 0), unknown to the compiler
    return jax.tree.unflatten(treedef, [jnp.where(keep, x, jnp.zeros((), x.dtype)) for x in leaves])
