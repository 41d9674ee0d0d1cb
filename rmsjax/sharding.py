"""Where optimizer state lives when the parameters are sharded over several devices.

Every moment buffer rmsjax creates is built with ``jnp.full_like(param, ...)``
(:func:`rmsjax.tree.state_like`), so ``opt.init(params)`` called eagerly on sharded parameters
returns state that is sharded exactly like them, on meshes of either axis type. Under
``jax.jit`` that holds for meshes with ``AxisType.Explicit`` axes (the sharding is part of the
type), but with ``AxisType.Auto`` axes a jitted ``init`` returns *replicated* outputs unless
``out_shardings`` says otherwise: a buffer that does not read its parameter's values gives the
compiler nothing to propagate. :func:`state_sharding` computes those ``out_shardings``::

    init = jax.jit(opt.init, out_shardings=rmsjax.state_sharding(opt, params))
    opt_state = init(params)  # each moment sharded like its parameter, `count` replicated
"""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import NamedSharding, PartitionSpec, Sharding

__all__ = ["state_sharding"]


def _sharding_of(path: Any, leaf: Any) -> Sharding:
    sharding = getattr(leaf, "sharding", None)
    if not isinstance(sharding, Sharding):
        raise TypeError(
            f"Parameter leaf {jax.tree_util.keystr(path) or '<root>'} "
            f"({type(leaf).__name__}) has no sharding. Pass `jax.Array`s placed with "
            "`jax.device_put(x, NamedSharding(mesh, spec))`, or `jax.ShapeDtypeStruct`s with a "
            "`sharding`."
        )
    return sharding


def _replicated_like(shardings: list[Sharding]) -> Sharding | None:
    """A fully replicated sharding on the devices of the parameters (None when no params)."""
    for sharding in shardings:
        if isinstance(sharding, NamedSharding):
            return NamedSharding(sharding.mesh, PartitionSpec())
    for sharding in shardings:
        if sharding.is_fully_replicated:
            return sharding
    if shardings:
        raise ValueError(
            f"Cannot tell how to replicate scalar state over parameters sharded with "
            f"{type(shardings[0]).__name__}; pass `replicated=` (e.g. "
            "`NamedSharding(mesh, PartitionSpec())`)."
        )
    return None


def state_sharding(
    opt: Any,
    params: Any,
    *,
    replicated: Sharding | None = None,
) -> Any:
    """The sharding of every leaf of ``opt.init(params)``: ``out_shardings`` for a jitted init.

    A state leaf that mirrors a parameter (a moment buffer such as ``nu``, ``mu`` or ``trace``)
    gets that parameter's sharding; every other leaf (step counts, scalar hyperparameters of
    ``optax.inject_hyperparams``) gets ``replicated``, by default a fully replicated
    ``NamedSharding`` on the parameters' mesh.

    A state leaf mirrors a parameter when the parameter's key path is a suffix of the leaf's key
    path in the state tree and the shapes agree: ``state[0].nu["w"]`` mirrors ``params["w"]``.
    This holds for every rmsjax and optax transformation and for wrappers that keep the
    parameter tree inside their state (``optax.chain``, ``optax.masked``, ``optax.MultiSteps``,
    ``optax.inject_hyperparams``, ``flax.nnx.Optimizer``).

    Args:
      opt: anything with an ``init(params)`` (an ``optax.GradientTransformation``).
      params: the parameter tree: ``jax.Array`` leaves with their sharding, or
        ``jax.ShapeDtypeStruct`` leaves with a ``sharding``. Nothing is computed on them; ``init``
        is only traced (``jax.eval_shape``).
      replicated: sharding for leaves that mirror no parameter.

    Returns:
      A tree with the structure of ``opt.init(params)`` whose leaves are ``jax.sharding.Sharding``.

    optax has no counterpart; its ``tree_map_params`` can express the same thing by hand.
    """
    param_paths = jax.tree_util.tree_flatten_with_path(params)[0]
    by_path: dict[tuple[Any, ...], tuple[tuple[int, ...], Sharding]] = {}
    for path, leaf in param_paths:
        by_path[tuple(path)] = (tuple(leaf.shape), _sharding_of(path, leaf))
    if replicated is None:
        replicated = _replicated_like([s for _, s in by_path.values()])

    abstract = jax.eval_shape(opt.init, params)

    def leaf_sharding(path: Any, leaf: Any) -> Sharding | None:
        path = tuple(path)
        shape = tuple(leaf.shape)
        # Longest suffix first: the most specific parameter wins.
        for start in range(len(path) + 1):
            hit = by_path.get(path[start:])
            if hit is not None and hit[0] == shape:
                return hit[1]
        return replicated

    return jax.tree_util.tree_map_with_path(leaf_sharding, abstract)
