r"""bfloat16/float16 storage with stochastic rounding: :class:`StochasticRounding`, made by
:func:`stochastic_rounding`."""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Sharding
from jax.tree_util import SequenceKey
from jax.typing import DTypeLike

from rmsjax._types import HALF_FLOATS
from rmsjax.stochastic import counter_bits, round_with_bits
from rmsjax.storage.base import Storage, StoredArray, seed_key
from rmsjax.validation import is_int

__all__ = ["RoundedArray", "StochasticRounding", "stochastic_rounding"]


class RoundedArray(NamedTuple):
    """The data of a stochastically rounded moment: the bfloat16/float16 ``value`` and its
    ``key``, ``uint32[2]`` = ``(seed, counter)`` of the random bits of its next rounding
    (:func:`rmsjax.stochastic.counter_bits`).

    Its key paths are ``[0]`` and ``[1]`` (as a plain pair's), so checkpoints keep their
    names. (Earlier versions kept raw ``jax.random`` key data there, of the same shape and
    dtype: such a checkpoint restores, its two words read as seed and counter.)"""

    value: Any
    key: Any


jax.tree_util.register_pytree_with_keys(
    RoundedArray,
    lambda r: (((SequenceKey(0), r.value), (SequenceKey(1), r.key)), None),
    lambda _, children: RoundedArray(*children),
    flatten_func=lambda r: ((r.value, r.key), None),
)


@dataclasses.dataclass(frozen=True)
class StochasticRounding(Storage[RoundedArray]):
    """bfloat16/float16 storage with stochastic rounding: made by :func:`stochastic_rounding`."""

    dtype: Any = jnp.bfloat16
    seed: int = 0

    def __post_init__(self) -> None:
        try:
            dtype = jnp.dtype(self.dtype)
        except TypeError:
            dtype = None
        if dtype not in HALF_FLOATS:
            raise ValueError(
                f"`dtype` must be jnp.bfloat16 or jnp.float16 (the dtypes stochastic rounding "
                f"targets), got {self.dtype!r}."
            )
        object.__setattr__(self, "dtype", dtype)
        if not is_int(self.seed):
            raise TypeError(f"`seed` must be an int, got {self.seed!r}.")

    def store(self, array: jax.Array, *, signed: bool, salt: str) -> Any:
        del signed
        if not jnp.issubdtype(array.dtype, jnp.floating):
            return array  # complex moments stay unrounded
        return StoredArray(RoundedArray(array.astype(self.dtype), seed_key(self.seed, salt)), self)

    def decode(self, data: RoundedArray) -> jax.Array:
        return data.value.astype(jnp.float32)

    def encode(self, x: jax.Array, data: RoundedArray) -> RoundedArray:
        seed, counter = data.key[0], data.key[1]
        bits = counter_bits(tuple(data.value.shape), seed, counter)
        rounded = round_with_bits(jnp.real(x).astype(jnp.float32), bits, data.value.dtype)
        return RoundedArray(rounded, jnp.stack([seed, counter + jnp.uint32(1)]))

    def shape(self, data: RoundedArray) -> tuple[int, ...]:
        return tuple(data.value.shape)

    def decoded_dtype(self, data: RoundedArray) -> jnp.dtype:
        del data
        return jnp.dtype(jnp.float32)

    def kernel_view(self, data: RoundedArray) -> str:
        del data
        return f"stochastically rounded {self.dtype} state (the kernel has no such storage)"

    def shardings(
        self, data: RoundedArray, sharding: Sharding | None, replicated: Sharding
    ) -> RoundedArray:
        return RoundedArray(replicated if sharding is None else sharding, replicated)


def stochastic_rounding(dtype: DTypeLike = jnp.bfloat16, *, seed: int = 0) -> StochasticRounding:
    r"""Store a moment in bfloat16 or float16, rounded stochastically after each update.

    Pass it where a transformation takes a moment's dtype:
    ``rmsjax.adam(1e-3, mu_dtype=rmsjax.stochastic_rounding(), nu_dtype=...)``. The rule
    computes the new moment :math:`x` in float32 from the decoded (exact) stored value, and
    stores :func:`rmsjax.stochastic.round_with_bits` ``(x, bits)``: one of the two neighbouring
    ``dtype`` values, the upper one with probability proportional to the distance from the
    lower, so :math:`E[\mathrm{stored}] = x`. Round-to-nearest bfloat16 stalls a moving
    average: with :math:`\beta_2 = 0.999`, :math:`0.999\,\nu` rounds back to :math:`\nu`
    (bfloat16 has 8 significant bits), so :math:`\nu` never decays; stochastic rounding
    decays it in expectation.

    Randomness: every stored array holds its own key in the state, ``uint32[2]`` =
    ``(seed, counter)``; an update rounds with the bits
    :func:`rmsjax.stochastic.counter_bits` ``(shape, seed, counter)`` (a hash of the entry's
    index and the key: a few integer operations per entry, the same on every backend and
    sharding) and keeps ``(seed, counter + 1)``. Nothing is global, and the same seed and
    gradients give the same state. The initial key is :func:`rmsjax.storage.seed_key`
    ``(seed, salt)``, from ``seed``, the moment's name and the parameter's key path (so
    ``optax.masked`` or a new layer elsewhere in the model does not change it), counter 0. A
    leaf whose gradient is ``None`` keeps its key. The initial value (``initial_scale``, ...)
    is rounded to nearest.

    Args:
      dtype: ``jnp.bfloat16`` (default; float32's range, 8 significant bits) or
        ``jnp.float16`` (11 significant bits, but overflows above 65504: a second moment of
        gradients above 256 becomes :math:`\infty` and its update 0).
      seed: an int from which the state's keys are derived.

    Returns:
      A :class:`StochasticRounding` value (frozen, hashable, validated here).

    Complex moments stay unrounded in their complex dtype. Memory: 2 bytes per entry plus 8
    bytes per array. Differences: optax stores a moment given ``mu_dtype=jnp.bfloat16`` with
    round to nearest (the plain dtype here does the same); bitsandbytes has no stochastic
    rounding; torchao's ``bf16_stochastic_round`` rounds the bfloat16 PARAMETERS, not the state
    (see :mod:`rmsjax.compat.torchao`), with torch's global generator.
    """
    return StochasticRounding(dtype=dtype, seed=seed)
