"""Applying updates to parameters: rounded to nearest, or stochastically."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from rmsjax._types import HALF_FLOATS
from rmsjax.stochastic import stochastic_round
from rmsjax.tree import describe_difference, is_none, map_rule, structure_error

__all__ = ["apply_updates", "apply_updates_stochastic"]


def _add(path: Any, p: Any, u: Any, params: Any, updates: Any) -> Any:
    if p is None:
        return None
    if u is None:
        return p
    if not hasattr(u, "dtype") and not isinstance(u, int | float | complex):
        where = jax.tree_util.keystr(path) or "the root"
        raise TypeError(
            f"Update leaf {where} is a {type(u).__name__}, not an array: the tree of updates "
            f"does not match the params ({jax.tree.structure(params)} versus "
            f"{jax.tree.structure(updates)}). Pass the updates returned by `update`."
        )
    dtype = jnp.asarray(p).dtype
    out = jnp.asarray(p + u)
    return out if out.dtype == dtype else out.astype(dtype)


def apply_updates(params: Any, updates: Any) -> Any:
    r"""Return :math:`\theta + u` leaf by leaf, in each parameter's own dtype.

    A ``None`` parameter leaf stays ``None`` whatever its update (``apply_updates(None, u)`` is
    ``None``; a frozen ``{"frozen": None}`` entry stays ``None``), and a ``None`` update leaves
    its parameter unchanged. The update tree must have the params' structure (down to the
    params' ``None`` leaves); if not, the error shows both structures and which keys only one
    of them has. The sum is cast back to the parameter dtype.

    Args:
      params: the parameter tree :math:`\theta`.
      updates: a tree with the params' structure (``None`` leaves allowed): the output of an
        optimizer's ``update``.

    Same as ``optax.apply_updates``, except that a ``None`` update keeps its parameter (optax
    raises a ``TypeError`` adding ``None``) and a structure mismatch gets a readable error.
    """
    path_leaves, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_none)
    spec: Any = treedef  # jax's PyTreeDef has no type information for flatten_up_to
    try:
        u_leaves = spec.flatten_up_to(updates)
    except (ValueError, TypeError):
        detail = describe_difference(params, updates, "params", "updates")
        raise structure_error(
            updates, params, tree_name="updates", other_name="params", detail=detail
        ) from None
    out = [
        _add(path, p, u, params, updates)
        for (path, p), u in zip(path_leaves, u_leaves, strict=True)
    ]
    return jax.tree_util.tree_unflatten(treedef, out)


def apply_updates_stochastic(params: Any, updates: Any, key: jax.Array) -> Any:
    r"""Return :math:`\theta + u` leaf by leaf, rounding bfloat16/float16 leaves stochastically.

    Each bfloat16 or float16 parameter leaf is updated as
    ``stochastic_round(float32(θ) + float32(u), key_leaf, θ.dtype)``: the sum is formed in
    float32 and rounded up or down at random so that its expectation is the float32 sum. An
    update below half an ulp of the parameter, which :func:`rmsjax.apply_updates` (round to
    nearest) drops every step, is applied in expectation. Leaves of any other dtype get the
    plain sum, as in :func:`rmsjax.apply_updates`. ``None`` leaves stay ``None``; the update
    tree must have the params' structure.

    Args:
      params: the parameter tree :math:`\theta`.
      updates: a tree with the params' structure (``None`` leaves allowed).
      key: a ``jax.random`` key, split into one key per leaf. Pass a fresh key every step, e.g.
        ``jax.random.fold_in(key, step)``: reusing a key repeats the same rounding decisions.

    The name says what differs from ``apply_updates`` (the rounding), and a separate function
    keeps ``apply_updates``' signature equal to optax's. Differences: optax has no stochastic
    rounding; torchao's ``bf16_stochastic_round=True`` does the same inside its optimizers'
    step (bfloat16 only, torch's global generator).
    """
    leaves, treedef = jax.tree.flatten(updates, is_leaf=is_none)
    keys = jax.tree_util.tree_unflatten(
        treedef, list(jax.random.split(key, max(len(leaves), 1))[: len(leaves)])
    )

    def rule(u: jax.Array, p: jax.Array, k: jax.Array) -> tuple[jax.Array, jax.Array]:
        if jnp.dtype(p.dtype) in HALF_FLOATS:
            total = p.astype(jnp.float32) + u.astype(jnp.float32)
            return u, stochastic_round(total, k, p.dtype)
        return u, p + u

    _, (new_params,) = map_rule(
        rule, updates, (params,), (keys,), what="params", extra_names=("keys",)
    )
    return new_params
