"""The one place where per-array update rules are lifted over pytrees.

Every transformation in rmsjax writes its rule for a single array,
``rule(g, *state_leaves, *extra_leaves) -> (update, *new_state_leaves)``, and calls
:func:`map_rule` to apply it leaf by leaf. ``map_rule`` owns the policies that must be the same
everywhere:

* ``None`` gradient leaves pass through: the update is ``None`` and the state leaf is kept.
* The gradient tree must have the state's structure; if not, the error shows both structures.
* Integer and boolean gradient leaves raise ``TypeError`` naming the leaf.
* The rule sees the gradient promoted to the common dtype of the gradient and its state leaves
  (a float16 gradient with float32 moments is computed in float32); the update it returns is
  cast back to the gradient's dtype, and every state leaf keeps its own dtype.

:func:`state_like` builds state leaves with the dtype policy shared by all transformations:
moments of float16/bfloat16 parameters are kept in float32 unless asked otherwise.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike

__all__ = ["map_rule", "real_dtype", "state_dtype", "state_like"]

_HALF = (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16))


def _is_none(x: Any) -> bool:
    return x is None


def state_dtype(
    param_dtype: DTypeLike, override: DTypeLike | None = None, *, promote_half: bool = True
) -> jnp.dtype:
    """Dtype of a state leaf for a parameter of ``param_dtype``.

    ``override`` wins when given. Otherwise float16/bfloat16 become float32 when
    ``promote_half`` (their range cannot hold squared gradients: 300**2 overflows float16 and
    1e-4**2 underflows it), and every other dtype is kept.
    """
    if override is not None:
        return jnp.dtype(override)
    dtype = jnp.dtype(param_dtype)
    if promote_half and dtype in _HALF:
        return jnp.dtype(jnp.float32)
    return dtype


def real_dtype(dtype: DTypeLike) -> jnp.dtype:
    """The real counterpart of a complex dtype (complex64 -> float32); other dtypes unchanged."""
    dtype = jnp.dtype(dtype)
    return jnp.finfo(dtype).dtype if jnp.issubdtype(dtype, jnp.complexfloating) else dtype


def state_like(
    params: Any,
    fill: Any = 0.0,
    *,
    dtype: DTypeLike | None = None,
    promote_half: bool = True,
    real: bool = False,
) -> Any:
    """A state tree shaped like ``params``, filled with ``fill`` (which may be traced).

    The leaf dtype follows :func:`state_dtype`; ``real=True`` drops a complex dtype to its real
    part (for second moments, which are real). ``None`` leaves stay ``None``. Each leaf is built
    with ``jnp.full_like``, so it carries its parameter's sharding: state initialised from
    sharded parameters lives where they live (see :mod:`rmsjax.sharding`).
    """

    def leaf(p: Any) -> jax.Array:
        dt = state_dtype(jnp.result_type(p), dtype, promote_half=promote_half)
        if real:
            dt = real_dtype(dt)
        return jnp.full_like(p, fill, dtype=dt)

    return jax.tree.map(leaf, params)


def _structure_error(what: str, updates: Any, other: Any, detail: str) -> ValueError:
    return ValueError(
        f"The gradient tree does not have the structure of the {what}.\n"
        f"  gradients: {jax.tree.structure(updates, is_leaf=_is_none)}\n"
        f"  {what}: {jax.tree.structure(other, is_leaf=_is_none)}\n"
        f"({detail}) Pass gradients shaped like the params given to `init`, or re-run `init` "
        "after changing the model."
    )


def _leaves_like(updates: Any, treedef: Any, tree: Any, what: str) -> list[Any]:
    try:
        leaves = treedef.flatten_up_to(tree)
    except (ValueError, TypeError) as err:
        raise _structure_error(what, updates, tree, str(err)) from None
    for leaf in leaves:
        if leaf is not None and not hasattr(leaf, "dtype") and not np.isscalar(leaf):
            raise _structure_error(
                what, updates, tree, f"found a {type(leaf).__name__} where an array belongs."
            )
    return leaves


def _cast_like(x: Any, like: Any) -> jax.Array:
    """``x`` as an array of ``like``'s dtype, ``like`` an array or a dtype (no conversion
    emitted when ``x`` already has it)."""
    if isinstance(like, np.dtype):
        dtype = like
    else:
        dtype = like.dtype if hasattr(like, "dtype") else jnp.result_type(like)
    x = jnp.asarray(x)
    return x if x.dtype == dtype else x.astype(dtype)


def _check_gradient(path: Any, g: Any) -> None:
    dtype = jnp.result_type(g)
    if not jnp.issubdtype(dtype, jnp.inexact):
        raise TypeError(
            f"Gradient leaf {jax.tree_util.keystr(path) or '<root>'} has dtype {dtype}; rmsjax "
            "transformations need floating-point or complex gradients. Cast the leaf to a float "
            "dtype, or keep it out of the optimizer with `optax.masked` / `optax.set_to_zero`."
        )


def map_rule(
    rule: Callable[..., tuple[Any, ...]],
    updates: Any,
    states: Sequence[Any] = (),
    extras: Sequence[Any] = (),
    *,
    what: str = "optimizer state",
    extra_names: Sequence[str] = ("params",),
) -> tuple[Any, tuple[Any, ...]]:
    """Apply a per-array ``rule`` leaf by leaf; return ``(updates, new_states)``.

    ``rule(g, *state_leaves, *extra_leaves)`` returns ``(update, *new_state_leaves)`` with one
    new leaf per tree in ``states``. ``extras`` are read-only trees (the params). Where a
    gradient leaf is ``None``, the rule is skipped: the update is ``None`` and the state leaves
    are returned unchanged.
    """
    path_leaves, treedef = jax.tree_util.tree_flatten_with_path(updates, is_leaf=_is_none)
    state_leaves = [_leaves_like(updates, treedef, s, what) for s in states]
    extra_leaves = [
        _leaves_like(updates, treedef, e, name)
        for e, name in zip(extras, extra_names[: len(extras)], strict=True)
    ]
    out_updates: list[Any] = []
    out_states: list[list[Any]] = [[] for _ in states]
    for i, (path, g) in enumerate(path_leaves):
        olds = [leaves[i] for leaves in state_leaves]
        if g is None:
            out_updates.append(None)
            for acc, old in zip(out_states, olds, strict=True):
                acc.append(old)
            continue
        _check_gradient(path, g)
        for old in olds:
            if old is None:
                raise _structure_error(
                    what, updates, states[0], f"{jax.tree_util.keystr(path)} has no state"
                )
        g_in = _cast_like(g, jnp.result_type(g, *olds)) if olds else g
        u, *news = rule(g_in, *olds, *(leaves[i] for leaves in extra_leaves))
        out_updates.append(_cast_like(u, g))
        for acc, old, new in zip(out_states, olds, news, strict=True):
            acc.append(_cast_like(new, old))
    return (
        treedef.unflatten(out_updates),
        tuple(treedef.unflatten(leaves) for leaves in out_states),
    )
