"""The storage protocol: :class:`Storage` (a kind of storage) and :class:`StoredArray`.

A *kind of storage* is a frozen, hashable value (static pytree metadata) that owns everything
about how one moment array is held: how its data is built from a fresh moment
(:meth:`Storage.store`), decoded for the rule and encoded after it, how many bytes it takes,
its shapes and shardings, and the view the native kernel needs. A moment held by a kind is a
:class:`StoredArray` (``data`` and ``storage``); a moment held as a plain float array (the
default, and any float dtype) is that array itself, as in optax. Nothing outside the kinds
looks inside ``data``: the rest of the package calls the methods below.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import zlib
from collections.abc import Callable
from typing import Any, Generic, NamedTuple, TypeVar

import jax
import jax.numpy as jnp
from jax.sharding import Sharding

from rmsjax._numerics import cast_to
from rmsjax.stochastic import mix32
from rmsjax.validation import check_float_dtype, display_name

__all__ = [
    "KernelView",
    "Storage",
    "StoredArray",
    "check_storage",
    "decode",
    "decoded_dtype",
    "encode",
    "is_stored",
    "plain_dtype",
    "salt_of",
    "seed_key",
]

D = TypeVar("D")


class KernelView(NamedTuple):
    """What the native kernel reads and writes of a stored moment (see
    :meth:`StoredArray.kernel_view`): its arrays in operand order and the codec that encodes
    them (whether the kernel runs that codec is the kernel's business)."""

    arrays: tuple[Any, ...]
    codec: Any


class Storage(abc.ABC, Generic[D]):
    """A kind of storage for one moment array; ``D`` is the type of its data (a pytree of arrays).

    Subclasses are frozen dataclasses validated at construction (they are the values users pass
    as a moment's ``*_dtype`` argument) and implement the methods below. Adding a kind of storage
    means adding one such class (and its tests); :func:`rmsjax.tree.state_like`,
    :func:`rmsjax.tree.map_rule`, :func:`rmsjax.state_sharding` and the fused step work with it
    through these methods alone.
    """

    @property
    def cancels_differences(self) -> bool:
        r"""Whether the difference of two moments held this way (centered RMSProp's
        :math:`\nu - |\mu|^2`) is lost in their rounding at the variances training meets; then
        :func:`rmsjax.scale_by_centered_rms` keeps the variance itself (its variance form).
        False by default."""
        return False

    @abc.abstractmethod
    def store(self, array: jax.Array, *, signed: bool, salt: str) -> Any:
        """``array`` (a freshly built moment, in its default dtype) held by this storage: a
        :class:`StoredArray`, or ``array`` itself where this storage does not apply to it
        (complex moments; arrays too small to be worth it). ``signed``: whether the moment can
        be negative. ``salt``: the moment's name and its parameter's key path (``"nu['w']"``),
        for kinds that derive a random stream per array."""

    @abc.abstractmethod
    def decode(self, data: D) -> jax.Array:
        """The moment as a plain array (what the update rules see)."""

    @abc.abstractmethod
    def encode(self, x: jax.Array, data: D) -> D:
        """The new value ``x`` of the moment held in ``data``'s place (same shapes and dtypes)."""

    def encode_from(self, new: Callable[[], jax.Array], data: D) -> D:
        """:meth:`encode` of the value that ``new()`` returns, which ``new`` computes afresh at
        every call (an independent copy for XLA, :mod:`rmsjax._fusion`).

        A kind calls ``new`` once per pass it makes over the value (:class:`Quantized`: the
        block scales, then the codes), so that XLA fuses each pass with the computation of the
        value instead of keeping the whole value in memory. The result must equal
        ``encode(new(), data)``; that is the default.
        """
        return self.encode(new(), data)

    @abc.abstractmethod
    def shape(self, data: D) -> tuple[int, ...]:
        """The shape of the moment (of its decoded array)."""

    @abc.abstractmethod
    def decoded_dtype(self, data: D) -> jnp.dtype:
        """The dtype of the decoded moment."""

    @abc.abstractmethod
    def shardings(self, data: D, sharding: Sharding | None, replicated: Sharding) -> D:
        """``data`` with each array replaced by its sharding, for a moment whose parameter has
        ``sharding`` (None: the parameter pins nothing); ``replicated`` for arrays that
        mirror no parameter axis (scalars, keys)."""

    def kernel_view(self, data: D) -> KernelView | str:
        """The kernel's view of ``data``, or why this kind has none (the default)."""
        del data
        return f"{type(self).__name__} state (the native kernel has no view of it)"

    def with_arrays(self, data: D, arrays: tuple[Any, ...]) -> D:
        """``data`` holding ``arrays`` in place of :meth:`kernel_view`'s arrays."""
        raise NotImplementedError(f"{type(self).__name__} has no kernel view")


@functools.partial(jax.tree_util.register_dataclass, data_fields=["data"], meta_fields=["storage"])
@dataclasses.dataclass(frozen=True)
class StoredArray(Generic[D]):
    """One moment array held by a kind of :class:`Storage`: a pytree node of plain arrays.

    ``data`` holds the arrays (the leaves; their layout is the kind's: uint8 codes and float32
    scales for :class:`~rmsjax.storage.Quantized`, a bfloat16 value and a PRNG key for
    :class:`~rmsjax.storage.StochasticRounding`); ``storage`` is static metadata. Every method
    delegates to the kind.

    It deliberately has no ``shape`` or ``dtype`` attribute: code that treats state leaves as
    arrays of the parameter's shape must not take it for one (:meth:`moment_shape` says it).
    """

    data: D
    storage: Storage[D]

    def decode(self) -> jax.Array:
        """The moment as a plain array (what the update rules see)."""
        return self.storage.decode(self.data)

    def encode(self, x: jax.Array) -> StoredArray[D]:
        """This moment holding the new value ``x``."""
        return StoredArray(self.storage.encode(x, self.data), self.storage)

    def encode_from(self, new: Callable[[], jax.Array]) -> StoredArray[D]:
        """This moment holding the value ``new()`` computes afresh at each call (see
        :meth:`Storage.encode_from`)."""
        return StoredArray(self.storage.encode_from(new, self.data), self.storage)

    def moment_shape(self) -> tuple[int, ...]:
        """The shape of the moment this holds."""
        return self.storage.shape(self.data)

    @property
    def nbytes(self) -> int:
        """Bytes of the arrays that hold the moment (codes, scales, keys included)."""
        return sum(int(x.size) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(self.data))

    def shardings(self, sharding: Sharding | None, replicated: Sharding) -> StoredArray[D]:
        """This node with its arrays replaced by their shardings (see :meth:`Storage.shardings`)."""
        return StoredArray(self.storage.shardings(self.data, sharding, replicated), self.storage)

    def kernel_view(self, shape: tuple[int, ...]) -> KernelView | str:
        """The arrays and codec the native kernel reads and writes for this moment of a float32
        parameter of ``shape``, or why there is none (the moment then stays on the pure-JAX
        path)."""
        mine, dtype = self.moment_shape(), self.storage.decoded_dtype(self.data)
        if mine != tuple(shape) or dtype != jnp.float32:
            return f"a stored moment of shape {mine} and dtype {dtype} for a parameter of {shape}"
        return self.storage.kernel_view(self.data)

    def with_arrays(self, arrays: tuple[Any, ...]) -> StoredArray[D]:
        """This moment holding ``arrays`` (new values of :meth:`kernel_view`'s ``arrays``)."""
        return StoredArray(self.storage.with_arrays(self.data, arrays), self.storage)


def is_stored(x: Any) -> bool:
    """True for a :class:`StoredArray` (an ``is_leaf`` for ``jax.tree`` functions)."""
    return isinstance(x, StoredArray)


def decode(held: Any) -> jax.Array:
    """The plain array of a moment held plainly (itself) or as a :class:`StoredArray`."""
    return held.decode() if is_stored(held) else held


def decoded_dtype(held: Any) -> jnp.dtype:
    """The dtype of the plain array of a moment held plainly or as a :class:`StoredArray`."""
    if is_stored(held):
        return held.storage.decoded_dtype(held.data)
    return jnp.dtype(held.dtype)


def encode(x: jax.Array, held: Any) -> Any:
    """The new value ``x`` of a moment held like ``held``: encoded by its storage, or as an
    array of ``held``'s dtype."""
    return held.encode(x) if is_stored(held) else cast_to(x, held.dtype)


def check_storage(name: str, value: Any) -> None:
    """A moment's storage argument: ``None``, a floating dtype, or a :class:`Storage` value.

    Raises ``TypeError``/``ValueError`` naming the argument (as the user typed it).
    """
    if value is None or isinstance(value, Storage):
        return
    try:
        check_float_dtype(name, value)
    except TypeError as err:
        raise TypeError(
            f"`{display_name(name)}` must be None, a floating dtype, rmsjax.quantized(...) or "
            f"rmsjax.stochastic_rounding(...), got {value!r}."
        ) from err


def plain_dtype(value: Any) -> Any:
    """The dtype of a storage choice that is a plain dtype; ``None`` for None and kinds."""
    return None if value is None or isinstance(value, Storage) else value


def seed_key(seed: int, salt: str) -> jax.Array:
    r"""The initial key of a moment whose stored value is rounded at random: ``uint32[2]``
    :math:`(\mathrm{mix32}(\mathrm{salt\_of}(salt) \oplus \mathrm{mix32}(seed \bmod 2^{32})),
    0)`, a seed word and a counter of 0 (:func:`rmsjax.stochastic.counter_bits` of the two
    gives the random bits of an encoding, after which the counter advances by one).

    ``seed``: the user's seed (an int); ``salt``: the moment's name and its parameter's key
    path (:meth:`Storage.store`), so that every moment of every parameter has its own stream.
    """
    word = mix32(jnp.uint32(salt_of(salt)) ^ mix32(jnp.uint32(seed % 2**32)))
    return jnp.stack([word, jnp.uint32(0)])


def salt_of(name: str) -> int:
    """A 31-bit integer of a moment's salt (see :meth:`Storage.store`), stable across runs."""
    return zlib.crc32(name.encode()) & 0x7FFFFFFF
