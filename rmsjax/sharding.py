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

Stored moments (:mod:`rmsjax.storage`) are sharded with their parameter too: the codes and
scales of a quantized moment get the parameter's sharding on the leading axes (rmsjax's
default block layout runs along the last axis only, so no block crosses a shard of a leading
axis), a stochastically rounded moment's values get the parameter's sharding and its PRNG key
is replicated.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec, Sharding, SingleDeviceSharding

from rmsjax.storage import is_stored

__all__ = ["state_sharding"]


def _is_uncommitted(leaf: Any) -> bool:
    return isinstance(leaf, jax.Array) and not leaf.committed


def _sharding_of(path: Any, leaf: Any, *, follow_uncommitted: bool) -> Sharding | None:
    """The sharding a parameter leaf pins its state to; None for a leaf that pins nothing (a
    Python scalar, or, unless ``follow_uncommitted``, a ``jax.Array`` not committed to a
    device)."""
    if isinstance(leaf, int | float | complex):
        return None
    if _is_uncommitted(leaf) and not follow_uncommitted:
        return None
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
    A stored moment (:class:`rmsjax.StoredArray`, from ``rmsjax.quantized`` or
    ``rmsjax.stochastic_rounding``) mirrors a parameter the same way, by its decoded shape; its
    arrays then get: uint8 codes and float32 scales, the parameter's sharding on the leading
    axes, and on the last axis when each shard holds whole blocks (else the last axis is not
    split; the libraries' flat layout shards only 8-bit codes); bfloat16/float16 values, the
    parameter's sharding; PRNG keys, ``replicated``.
    This holds for every rmsjax and optax transformation and for wrappers that keep the
    parameter tree inside their state (``optax.chain``, ``optax.masked``, ``optax.MultiSteps``,
    ``optax.inject_hyperparams``, ``flax.nnx.Optimizer``).

    Args:
      opt: anything with an ``init(params)`` (an ``optax.GradientTransformation``).
      params: the parameter tree: ``jax.Array`` leaves with their sharding, or
        ``jax.ShapeDtypeStruct`` leaves with a ``sharding``. Nothing is computed on them; ``init``
        is only traced (``jax.eval_shape``). A Python scalar leaf pins nothing: its state gets
        ``replicated`` like the step counts. So does a ``jax.Array`` that is not committed to
        a device (``jnp.float32(1.0)``, which JAX may move anywhere) when other leaves are
        committed, so it never mixes the default device into a mesh-sharded state. NumPy
        arrays raise ``TypeError``.
      replicated: sharding for leaves that mirror no placed parameter; by default a fully
        replicated ``NamedSharding`` on the parameters' mesh (the default device when no
        parameter is placed).

    Returns:
      A tree with the structure of ``opt.init(params)`` whose leaves are ``jax.sharding.Sharding``.

    optax has no counterpart; its ``tree_map_params`` can express the same thing by hand.
    """
    param_paths = jax.tree_util.tree_flatten_with_path(params)[0]
    placed: dict[tuple[Any, ...], tuple[tuple[int, ...], Sharding]] = {}
    floating: dict[tuple[Any, ...], tuple[int, ...]] = {}
    # Uncommitted arrays live on the default device; they are followed only when no leaf is
    # committed (one device, plain `jnp` arrays), never next to mesh-placed parameters.
    follow = not any(
        isinstance(getattr(leaf, "sharding", None), Sharding) and not _is_uncommitted(leaf)
        for _, leaf in param_paths
    )
    for path, leaf in param_paths:
        sharding = _sharding_of(path, leaf, follow_uncommitted=follow)
        if sharding is None:
            floating[tuple(path)] = tuple(np.shape(leaf))
        else:
            placed[tuple(path)] = (tuple(np.shape(leaf)), sharding)
    if replicated is None:
        replicated = _replicated_like([s for _, s in placed.values()])
    if replicated is None:  # nothing is placed: the default device
        replicated = SingleDeviceSharding(jax.devices()[0])
    by_path = dict(placed)
    for path, shape in floating.items():
        by_path[path] = (shape, replicated)

    abstract = jax.eval_shape(opt.init, params)

    def mirrored(path: Any, shape: tuple[int, ...]) -> Sharding | None:
        path = tuple(path)
        # Longest suffix first: the most specific parameter wins.
        for start in range(len(path) + 1):
            hit = by_path.get(path[start:])
            if hit is not None and hit[0] == shape:
                return hit[1]
        return None

    def leaf_sharding(path: Any, leaf: Any) -> Any:
        if is_stored(leaf):
            return leaf.shardings(mirrored(path, leaf.moment_shape()), replicated)
        found = mirrored(path, tuple(leaf.shape))
        return replicated if found is None else found

    return jax.tree_util.tree_map_with_path(leaf_sharding, abstract, is_leaf=is_stored)
