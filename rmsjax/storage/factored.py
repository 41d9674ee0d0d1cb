r"""A second moment kept as row and column averages (Adafactor): :class:`Factored`, made by
:func:`factored`."""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec, Sharding

from rmsjax.storage.base import Storage, StoredArray
from rmsjax.storage.quantized import Quantized
from rmsjax.validation import is_int

__all__ = ["Factored", "FactoredArray", "factored"]

_FOUR_BITS = Quantized(bits=4)  # the default storage of arrays that are not factored


class FactoredArray(NamedTuple):
    """The data of a factored moment of shape ``(..., n, m)``: ``rows`` (``(..., n)``, the
    mean over the last axis) and ``cols`` (``(..., m)``, the mean over the axis before it),
    float32."""

    rows: Any
    cols: Any


@dataclasses.dataclass(frozen=True)
class Factored(Storage[FactoredArray]):
    """A second moment kept as row and column averages: made by :func:`factored` (see there)."""

    min_size: int = 4096
    fallback: Any = _FOUR_BITS

    def __post_init__(self) -> None:
        if not (is_int(self.min_size) and self.min_size >= 0):
            raise ValueError(
                f"`min_size` must be an integer >= 0 (entries; smaller matrices are stored as "
                f"`fallback`), got {self.min_size!r}."
            )
        if self.fallback is not None and (
            not isinstance(self.fallback, Storage) or isinstance(self.fallback, Factored)
        ):
            raise TypeError(
                f"`fallback` must be None (float32) or a storage such as rmsjax.quantized(4) "
                f"(not another factored()), got {self.fallback!r}."
            )

    @property
    def cancels_differences(self) -> bool:
        r"""True: row and column means reproduce :math:`\nu` only approximately, far from the
        precision of :math:`\nu - |\mu|^2`."""
        return True

    def store(self, array: jax.Array, *, signed: bool, salt: str) -> Any:
        if signed:
            raise ValueError(
                f"rmsjax.factored() stores second moments (nu, which are >= 0) only; it was "
                f"given the moment {salt!r}, which can be negative. Pass it as `nu_dtype` and "
                "store the first moment another way (e.g. rmsjax.quantized(4))."
            )
        if not jnp.issubdtype(array.dtype, jnp.floating):
            return array  # complex moments stay as they are
        if array.ndim < 2 or array.size < self.min_size:
            if self.fallback is None:
                return array
            return self.fallback.store(array, signed=signed, salt=salt)
        data = self.encode(array, FactoredArray(None, None))
        return StoredArray(data, self)

    def decode(self, data: FactoredArray) -> jax.Array:
        rows, cols = data
        total = jnp.mean(rows, axis=-1, keepdims=True)[..., None]
        outer = rows[..., :, None] * cols[..., None, :]
        return jnp.where(total > 0, outer / jnp.where(total > 0, total, 1.0), 0.0)

    def encode(self, x: jax.Array, data: FactoredArray) -> FactoredArray:
        del data
        x = jnp.real(x).astype(jnp.float32)
        return FactoredArray(jnp.mean(x, axis=-1), jnp.mean(x, axis=-2))

    def shape(self, data: FactoredArray) -> tuple[int, ...]:
        return (*data.rows.shape, data.cols.shape[-1])

    def decoded_dtype(self, data: FactoredArray) -> jnp.dtype:
        del data
        return jnp.dtype(jnp.float32)

    def shardings(
        self, data: FactoredArray, sharding: Sharding | None, replicated: Sharding
    ) -> FactoredArray:
        if sharding is None or not isinstance(sharding, NamedSharding):
            return FactoredArray(replicated, replicated)
        ndim = len(self.shape(data))
        spec = tuple(sharding.spec) + (None,) * (ndim - len(tuple(sharding.spec)))
        named = lambda *entries: NamedSharding(sharding.mesh, PartitionSpec(*entries))
        return FactoredArray(named(*spec[:-1]), named(*spec[:-2], spec[-1]))


def factored(*, min_size: int = 4096, fallback: Storage[Any] | None = _FOUR_BITS) -> Factored:
    r"""Store a second moment of a matrix as its row and column averages (Adafactor).

    Pass it as a second moment's storage: ``rmsjax.adamw(1e-3, mu_dtype=rmsjax.quantized(4),
    nu_dtype=rmsjax.factored())`` is Li et al.'s "4-bit Factor" AdamW, about 0.53 bytes of
    state per parameter. A moment :math:`\nu` of shape :math:`(\dots, n, m)` with at least
    ``min_size`` entries is kept as

    .. math::

        r_i = \frac{1}{m}\sum_j \nu_{ij}, \qquad c_j = \frac{1}{n}\sum_i \nu_{ij}, \qquad
        \hat\nu_{ij} = \frac{r_i\, c_j}{\frac{1}{n}\sum_k r_k}

    (per matrix of the leading axes), float32, :math:`4(n + m)` bytes instead of :math:`4nm`.
    The rule decodes :math:`\hat\nu` and computes its new moment
    :math:`\nu' = \beta\hat\nu + (1-\beta)g^2` entry by entry, which makes this step's
    update (so the current gradient enters each entry's denominator exactly); then
    :math:`\nu'` is stored as its row and column averages. Since :math:`\hat\nu` has the row
    and column averages :math:`r` and :math:`c`, those are exactly
    :math:`\beta r + (1-\beta)\,\overline{g^2}` by rows and by columns: the state follows
    Adafactor's factored second moment (Shazeer and Stern, 2018). The past is remembered as a
    rank-1 estimate, so an entry's history is its row's and column's, not its own.

    Args:
      min_size: matrices with fewer entries, and arrays of fewer than two axes, are stored as
        ``fallback``; an integer >= 0.
      fallback: the storage of those arrays: a storage value (default
        :func:`rmsjax.quantized` ``(4)``, which itself keeps arrays below its ``min_size`` in
        float32) or ``None`` for float32.

    Returns:
      A :class:`Factored` value (frozen, hashable, validated here). Its ``init`` raises
      ``ValueError`` when it is given a moment that can be negative (a first moment).

    Differences: optax's ``adafactor`` is its own optimizer (update clipping, relative step
    sizes, no first moment by default) and divides by the factored estimate of the NEW second
    moment; here factoring is a storage of the second moment of any rmsjax transformation
    (``adam``, ``adamw``, ``rmsprop``), the rule unchanged, and this step's :math:`g^2` enters
    its own update unfactored (as the quantized storages use the unrounded new moment).
    Adafactor and lpmm add :math:`\epsilon_1 = 10^{-30}` to :math:`g^2` before averaging; here
    an all-zero matrix decodes to 0 (the rule's own :math:`\epsilon` guards the division).
    bitsandbytes and torchao have no factored state.
    """
    return Factored(min_size=min_size, fallback=fallback)
