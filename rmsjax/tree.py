"""The one place where per-array update rules are lifted over pytrees.

Every transformation in rmsjax writes its rule for a single array,
``rule(g, *state_leaves, *extra_leaves) -> (update, *new_state_leaves)``, and calls
:func:`map_rule` to apply it leaf by leaf. ``map_rule`` owns the policies that must be the same
everywhere:

* ``None`` gradient leaves pass through: the update is ``None`` and the state leaf is kept
  (``update(None, state, params)`` returns ``(None, state)``, as optax's stateless
  transformations do).
* The gradient tree must have the state's structure; if not, the error shows both structures
  and says which keys only the gradients have and which only the state has.
* Integer and boolean gradient leaves raise ``TypeError`` naming the leaf.
* The rule sees the gradient promoted to the common dtype of the gradient and its state leaves
  (a float16 gradient with float32 moments is computed in float32); the update it returns is
  cast back to the gradient's dtype, and every state leaf keeps its own dtype.

:func:`state_like` builds state leaves with the dtype policy shared by all transformations:
moments are floating point (the default float dtype for integer and boolean parameters), and
moments of float16/bfloat16 parameters are kept in float32 unless asked otherwise.
:func:`check_state` is the check every transformation runs on the state it is given.

Storage (:mod:`rmsjax.storage`) is applied here too, once for every rule: ``state_like`` takes,
in place of a dtype, a storage choice (:func:`rmsjax.quantized`,
:func:`rmsjax.stochastic_rounding`) and builds :class:`~rmsjax.storage.StoredArray` leaves;
``map_rule`` decodes each stored state leaf to a plain array before calling the rule and
encodes the rule's new value afterwards. The rules see plain arrays only.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike

from rmsjax import _fusion
from rmsjax import storage as S
from rmsjax._numerics import cast_to
from rmsjax._types import HALF_FLOATS

__all__ = [
    "check_state",
    "describe_difference",
    "flatten_like",
    "is_none",
    "map_rule",
    "real_dtype",
    "state_dtype",
    "state_like",
    "structure_error",
]


def is_none(x: Any) -> bool:
    """``x is None`` (an ``is_leaf`` that keeps ``None`` leaves in ``jax.tree`` functions)."""
    return x is None


def state_dtype(
    param_dtype: DTypeLike, override: DTypeLike | None = None, *, promote_half: bool = True
) -> jnp.dtype:
    """Dtype of a state leaf for a parameter of ``param_dtype``.

    ``override`` wins when given (the transformations reject integer and boolean overrides
    at construction, see :func:`rmsjax.validation.check_float_dtype`). Otherwise integer and
    boolean parameters get the default float dtype (float32, float64 under ``jax_enable_x64``):
    a moving average of float gradients kept in int32 would round to 0 forever.
    float16/bfloat16 become float32 when ``promote_half`` (their range cannot hold squared
    gradients: 300**2 overflows float16 and 1e-4**2 underflows it); every other float and
    complex dtype is kept.
    """
    if override is not None:
        return jnp.dtype(override)
    dtype = jnp.dtype(param_dtype)
    if not jnp.issubdtype(dtype, jnp.inexact):
        return jnp.dtype(jnp.result_type(float))
    if promote_half and dtype in HALF_FLOATS:
        return jnp.dtype(jnp.float32)
    return dtype


def real_dtype(dtype: DTypeLike) -> jnp.dtype:
    """The real counterpart of a complex dtype (complex64 -> float32); other dtypes unchanged."""
    dtype = jnp.dtype(dtype)
    return jnp.finfo(dtype).dtype if jnp.issubdtype(dtype, jnp.complexfloating) else dtype


def _is_flax_variable(x: Any) -> bool:
    """Whether ``x`` is a Flax NNX ``Variable`` (``nnx.Param``, ...), without importing Flax."""
    return any(
        c.__name__ == "Variable" and c.__module__.startswith("flax.") for c in type(x).__mro__
    )


def state_like(
    params: Any,
    fill: Any = 0.0,
    *,
    dtype: DTypeLike | S.Storage | None = None,
    promote_half: bool = True,
    real: bool = False,
    signed: bool | None = None,
    name: str = "",
    both_parts: bool = False,
) -> Any:
    """A state tree shaped like ``params``, filled with ``fill`` (which may be traced).

    The leaf dtype follows :func:`state_dtype`; ``real=True`` drops a complex dtype to its real
    part (for second moments, which are real). ``both_parts=True`` fills a complex leaf with
    ``fill`` in its real AND its imaginary part (for state that treats the two parts as
    separate reals). ``None`` leaves stay ``None``. Each leaf is built with ``jnp.full_like``,
    so it carries its parameter's sharding: state initialised from sharded parameters lives
    where they live (see :mod:`rmsjax.sharding`).

    ``dtype`` may also be a kind of storage (:class:`rmsjax.storage.Storage`:
    :func:`rmsjax.quantized`, :func:`rmsjax.stochastic_rounding`): each leaf is then built in
    its default dtype (as for ``dtype=None`` with ``promote_half``) and given to the kind's
    :meth:`~rmsjax.storage.Storage.store`, which returns a
    :class:`~rmsjax.storage.StoredArray` where the storage applies. ``signed`` says whether the
    moment can be negative (it picks the quantization map; default: ``not real``, as second
    moments are the real ones), and ``name`` (the state field, e.g. ``"nu"``) keeps the random
    streams of two moments of one parameter apart.

    Flax NNX: ``nnx.Optimizer`` initialises the state from ``nnx.state(model, wrt)``, whose leaves
    are ``nnx.Param`` variables, and wraps each leaf of the result in a variable of its own. A
    float leaf keeps its parameter's variable (as optax's states do); a
    :class:`~rmsjax.storage.StoredArray` (itself a small tree: codes and scales, or a value and a
    key) is returned without it, so that NNX wraps its arrays one by one and can update them
    (a variable holding a whole ``StoredArray`` would be overwritten with a plain dict by
    ``nnx.update``).
    """
    plain = S.plain_dtype(dtype)
    kind = dtype if isinstance(dtype, S.Storage) else None
    is_signed = (not real) if signed is None else signed

    def leaf(path: Any, p: Any) -> Any:
        dt = state_dtype(jnp.result_type(p), plain, promote_half=promote_half or kind is not None)
        if real:
            dt = real_dtype(dt)
        value = fill
        if jnp.iscomplexobj(fill) and not jnp.issubdtype(dt, jnp.complexfloating):
            value = jnp.real(fill)  # a complex-typed real hyperparameter (see cast_to)
        array = jnp.full_like(p, value, dtype=dt)
        if both_parts and jnp.iscomplexobj(array):
            array = jax.lax.complex(jnp.real(array), jnp.real(array))
        if kind is None:
            return array
        return kind.store(array, signed=is_signed, salt=name + jax.tree_util.keystr(path))

    def node(path: Any, p: Any) -> Any:
        if not _is_flax_variable(p):
            return leaf(path, p)
        # the variable's own path (not the path inside it) names the parameter: the same random
        # stream as for the plain array
        inner, box = jax.tree.flatten(p)
        built = [leaf(path, x) for x in inner]
        if len(built) == 1 and S.is_stored(built[0]):
            return built[0]
        return jax.tree.unflatten(box, built)

    path_leaves, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_flax_variable)
    return jax.tree.unflatten(treedef, [node(path, p) for path, p in path_leaves])


def check_state(state: Any, expected: type | tuple[type, ...], transform: str) -> None:
    """Raise ``TypeError`` unless ``state`` is an instance of ``expected``.

    Every transformation calls this first in ``update``: the state of another optimizer has
    other fields (or a field such as ``count`` that resolves to ``tuple.count``), and would
    otherwise fail somewhere inside the arithmetic, or worse, be accepted.
    """
    if isinstance(state, expected):
        return
    classes = expected if isinstance(expected, tuple) else (expected,)
    names = " or ".join(c.__name__ for c in classes)
    raise TypeError(
        f"`{transform}` expected its state as {names}, got {type(state).__name__}: "
        f"{_short(state)}. Pass the state returned by this optimizer's `init` (the state of "
        "another optimizer, or of another configuration of this one, does not fit)."
    )


def _short(x: Any, limit: int = 200) -> str:
    text = repr(jax.tree.map(lambda leaf: getattr(leaf, "shape", leaf), x))
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------------------------
# Structure errors
# --------------------------------------------------------------------------------------------


def _children(x: Any) -> tuple[type, dict[Any, Any]] | None:
    """The node type and ``{key: child}`` of a pytree node; ``None`` for a leaf (or None)."""
    if x is None:
        return None
    kids = jax.tree_util.tree_flatten_with_path(x, is_leaf=lambda y: y is not x)[0]
    if len(kids) == 1 and kids[0][0] == ():
        return None
    return type(x), {path[0]: child for path, child in kids}


def _keys(keys: list[Any]) -> str:
    return ", ".join(jax.tree_util.keystr((k,)) for k in keys)


def _has(name: str) -> str:
    return f"the {name} have" if name.endswith("s") else f"the {name} has"


def _lacks(name: str) -> str:
    return f"the {name} lack" if name.endswith("s") else f"the {name} lacks"


def describe_difference(
    a: Any, b: Any, a_name: str, b_name: str, path: tuple[Any, ...] = ()
) -> str:
    """Where tree ``b`` stops matching tree ``a`` (whose leaves match any subtree), in words,
    each key attributed to the tree that has it; ``""`` when ``b`` matches."""
    node_a = _children(a)
    if node_a is None:
        return ""
    where = f"at {jax.tree_util.keystr(path)}" if path else "at the root"
    node_b = _children(b)
    if node_b is None or node_a[0] is not node_b[0]:
        kind_b = "a leaf" if node_b is None else f"a {type(b).__name__}"
        return f"{where}, {_has(a_name)} a {type(a).__name__} where {_has(b_name)} {kind_b}"
    only_a = [k for k in node_a[1] if k not in node_b[1]]
    only_b = [k for k in node_b[1] if k not in node_a[1]]
    if only_a or only_b:
        parts = []
        if only_a:
            parts.append(f"{_has(a_name)} {_keys(only_a)}, which {_lacks(b_name)}")
        if only_b:
            parts.append(f"{_has(b_name)} {_keys(only_b)}, which {_lacks(a_name)}")
        return f"{where}, " + "; ".join(parts)
    for key, child in node_a[1].items():
        found = describe_difference(child, node_b[1][key], a_name, b_name, (*path, key))
        if found:
            return found
    return ""


def structure_error(
    tree: Any, other: Any, *, tree_name: str, other_name: str, detail: str = ""
) -> ValueError:
    """A ``ValueError`` saying that ``tree`` (the gradients, the updates) does not have the
    structure of ``other`` (the state, the params): both structures, and where they differ,
    each key attributed to the tree that has it."""
    detail = (
        detail
        or describe_difference(tree, other, tree_name, other_name)
        or "the two trees have the same keys but differ in a node's type or metadata"
    )
    return ValueError(
        f"The tree of {tree_name} does not have the structure of the {other_name}.\n"
        f"  {tree_name}: {jax.tree.structure(tree, is_leaf=is_none)}\n"
        f"  {other_name}: {jax.tree.structure(other, is_leaf=is_none)}\n"
        f"{detail[:1].upper() + detail[1:]}.\n"
        f"Pass {tree_name} shaped like the params given to `init`, or re-run `init` after "
        "changing the model."
    )


def flatten_like(
    tree: Any, treedef: Any, other: Any, *, tree_name: str, other_name: str
) -> list[Any]:
    """``other`` flattened up to ``treedef`` (the structure of ``tree``, ``None`` leaves
    included), or the :func:`structure_error` of the two."""
    try:
        return list(treedef.flatten_up_to(other))
    except (ValueError, TypeError):
        raise structure_error(tree, other, tree_name=tree_name, other_name=other_name) from None


def _check_leaf(tree: Any, other: Any, path: Any, leaf: Any, names: tuple[str, str]) -> None:
    if leaf is None or hasattr(leaf, "dtype") or np.isscalar(leaf) or S.is_stored(leaf):
        return
    where = jax.tree_util.keystr(path) or "the root"
    detail = f"at {where}, {_has(names[0])} an array where {_has(names[1])} a {type(leaf).__name__}"
    raise structure_error(tree, other, tree_name=names[0], other_name=names[1], detail=detail)


def _check_gradient(path: Any, g: Any, leaf_name: str) -> None:
    dtype = jnp.result_type(g)
    if not jnp.issubdtype(dtype, jnp.inexact):
        raise TypeError(
            f"{leaf_name.capitalize()} leaf {jax.tree_util.keystr(path) or '<root>'} has dtype "
            f"{dtype}; rmsjax needs floating-point or complex {leaf_name}s. Cast the leaf to a "
            "float dtype, or keep it out of the optimizer with `optax.masked` / "
            "`optax.set_to_zero`."
        )


def _unbox(tree: Any) -> tuple[Any, Callable[[Any], Any]]:
    """``tree`` with every Flax NNX variable replaced by the one value it holds (an array or a
    :class:`~rmsjax.storage.StoredArray`), and the function that puts a tree of that shape
    back into the same variables.

    Gradients and parameters of an NNX model may arrive as ``nnx.Param`` variables, and the
    state of a float moment keeps them, while a stored moment is built without one (see
    :func:`state_like`): the rule meets all of them as plain values.
    """
    is_leaf = lambda x: x is None or _is_flax_variable(x)
    leaves, treedef_ = jax.tree.flatten(tree, is_leaf=is_leaf)
    treedef: Any = treedef_
    boxes: list[Any] = []
    values: list[Any] = []
    for x in leaves:
        inner, box = (
            jax.tree.flatten(x, is_leaf=S.is_stored) if _is_flax_variable(x) else ([x], None)
        )
        if box is not None and len(inner) != 1:
            inner, box = [x], None  # a variable holding a tree: left as it is
        boxes.append(box)
        values.append(inner[0])
    if all(b is None for b in boxes):
        return tree, lambda new: new

    def rebox(new: Any) -> Any:
        flat = treedef.flatten_up_to(new)
        return treedef.unflatten(
            [
                v if b is None else jax.tree.unflatten(b, [v])
                for v, b in zip(flat, boxes, strict=True)
            ]
        )

    return treedef.unflatten(values), rebox


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
    gradient leaf is ``None`` (or the whole gradient tree is ``None``), the rule is skipped:
    the update is ``None`` and the state leaves are returned unchanged. ``what`` and
    ``extra_names`` name the trees in structure errors.

    A state leaf that is a :class:`~rmsjax.storage.StoredArray` is decoded before the rule is
    called and the rule's new value is encoded back into the same storage
    (:func:`rmsjax.storage.decode` / :func:`~rmsjax.storage.encode`); a plain state leaf keeps
    its dtype. Flax NNX variables (``nnx.Param``) in any of the trees are looked through: the
    rule sees the values they hold, and the results are put back into the same variables.

    Where a leaf has stored moments, the rule is applied once per loop that reads its results
    (the update; each pass of each stored moment's encoding), each time to an independent copy
    of the stored data (:mod:`rmsjax._fusion`), so that XLA fuses every such loop with the
    decoding and the rule and keeps no decoded moment in memory: the compiled step needs the
    resident arrays and little more.
    """
    updates, rebox_updates = _unbox(updates)
    unboxed = [_unbox(t) for t in states]
    states = [t for t, _ in unboxed]
    extras = [_unbox(t)[0] for t in extras]
    path_leaves, treedef = jax.tree_util.tree_flatten_with_path(updates, is_leaf=is_none)
    names = [what] * len(states) + list(extra_names[: len(extras)])
    others = [*states, *extras]
    if len(names) != len(others):
        raise ValueError(f"map_rule: {len(extras)} extras but names {list(extra_names)}.")
    flat = [
        flatten_like(updates, treedef, o, tree_name="gradients", other_name=n)
        for o, n in zip(others, names, strict=True)
    ]
    n_states = len(states)
    out_updates: list[Any] = []
    out_states: list[list[Any]] = [[] for _ in states]
    for i, (path, g) in enumerate(path_leaves):
        olds = [leaves[i] for leaves in flat[:n_states]]
        if g is None:
            out_updates.append(None)
            for acc, old in zip(out_states, olds, strict=True):
                acc.append(old)
            continue
        _check_gradient(path, g, "gradient")
        for leaves, other, name in zip(flat, others, names, strict=True):
            if leaves[i] is None:
                detail = f"{jax.tree_util.keystr(path) or 'the root'} has a gradient but no {name}"
                raise structure_error(
                    updates, other, tree_name="gradients", other_name=name, detail=detail
                )
            _check_leaf(updates, other, path, leaves[i], ("gradients", name))
        dtypes = [S.decoded_dtype(old) for old in olds]
        g_in = cast_to(g, jnp.result_type(g, *dtypes)) if olds else g
        extra_leaves = [leaves[i] for leaves in flat[n_states:]]
        if any(S.is_stored(old) for old in olds):
            u, news = _stored_leaf(rule, g_in, olds, extra_leaves)
        else:
            u, *plain_news = rule(g_in, *olds, *extra_leaves)
            news = [S.encode(new, old) for new, old in zip(plain_news, olds, strict=True)]
        out_updates.append(cast_to(u, jnp.result_type(g)))
        for acc, new in zip(out_states, news, strict=True):
            acc.append(new)
    return (
        rebox_updates(jax.tree_util.tree_unflatten(treedef, out_updates)),
        tuple(
            rebox(jax.tree_util.tree_unflatten(treedef, leaves))
            for leaves, (_, rebox) in zip(out_states, unboxed, strict=True)
        ),
    )


# --------------------------------------------------------------------------------------------
# Leaves with stored moments
# --------------------------------------------------------------------------------------------


def _stored_leaf(
    rule: Callable[..., tuple[Any, ...]], g: Any, olds: list[Any], extras: list[Any]
) -> tuple[Any, list[Any]]:
    """The update and new moments of one leaf with stored moments (see :func:`map_rule`)."""
    copies = itertools.count()

    def results() -> tuple[Any, ...]:
        values = [S.decode(x) for x in _fusion.instance(olds, next(copies))]
        return tuple(rule(g, *values, *extras))

    first = results()
    news = [
        old.encode_from(lambda j=j: results()[1 + j])
        if S.is_stored(old)
        else S.encode(first[1 + j], old)
        for j, old in enumerate(olds)
    ]
    return first[0], news
