r"""Block-scaled FP8 storage of a moment: :class:`Float8`, made by :func:`float8`."""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Literal

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec, Sharding

from rmsjax.storage.base import Storage, StoredArray
from rmsjax.validation import is_int

__all__ = ["Float8", "Float8Array", "float8"]

SecondMoment = Literal["e5m2", "e4m3_sqrt"]
_SECOND = ("e5m2", "e4m3_sqrt")
_E4M3 = jnp.dtype(jnp.float8_e4m3fn)
_E5M2 = jnp.dtype(jnp.float8_e5m2)


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=["values", "scales"], meta_fields=["root"]
)
@dataclasses.dataclass(frozen=True)
class Float8Array:
    """The data of an FP8 moment: ``values`` (the moment's shape, ``float8_e4m3fn`` or
    ``float8_e5m2``), ``scales`` (float32, one per block of the last axis:
    ``(..., ceil(n / block_size))``), and whether the values hold the moment's square root
    (``root``, static)."""

    values: Any
    scales: Any
    root: bool = False


@dataclasses.dataclass(frozen=True)
class Float8(Storage[Float8Array]):
    """Block-scaled FP8 storage of a moment: made by :func:`float8` (see there)."""

    block_size: int = 256
    min_size: int = 4096
    second_moment: SecondMoment = "e4m3_sqrt"

    def __post_init__(self) -> None:
        if not (is_int(self.block_size) and self.block_size >= 1):
            raise ValueError(f"`block_size` must be an integer >= 1, got {self.block_size!r}.")
        if not (is_int(self.min_size) and self.min_size >= 0):
            raise ValueError(
                f"`min_size` must be an integer >= 0 (entries; smaller arrays stay float32), "
                f"got {self.min_size!r}."
            )
        if self.second_moment not in _SECOND:
            raise ValueError(
                f"`second_moment` must be one of {_SECOND}, got {self.second_moment!r}."
            )

    def _format(self, signed: bool) -> tuple[jnp.dtype, bool]:
        """(the FP8 dtype, whether the square root is stored) of a moment."""
        if signed or self.second_moment == "e4m3_sqrt":
            return _E4M3, not signed
        return _E5M2, False

    def store(self, array: jax.Array, *, signed: bool, salt: str) -> Any:
        del salt
        if not jnp.issubdtype(array.dtype, jnp.floating) or array.size < self.min_size:
            return array
        dtype, root = self._format(signed)
        empty = Float8Array(jnp.zeros(array.shape, dtype), None, root)
        return StoredArray(self.encode(array, empty), self)

    def encode(self, x: jax.Array, data: Float8Array) -> Float8Array:
        big = jnp.finfo(jnp.float32).max
        x = jnp.clip(jnp.real(x).astype(jnp.float32), -big, big)
        if data.root:
            x = jnp.sqrt(jnp.maximum(x, 0.0))
        dtype = jnp.dtype(data.values.dtype)
        blocks, n = _blocks(x, self.block_size)
        scales = jnp.max(jnp.abs(blocks), axis=-1) / jnp.float32(jnp.finfo(dtype).max)
        divisor = jnp.where(scales == 0, jnp.float32(1.0), scales)[..., None]
        values = _to_format(blocks / divisor, dtype)
        return Float8Array(_unblock(values, n, x.shape), scales, data.root)

    def decode(self, data: Float8Array) -> jax.Array:
        values, n = _blocks(data.values.astype(jnp.float32), self.block_size)
        out = _unblock(values * data.scales[..., None], n, data.values.shape)
        return out * out if data.root else out

    def shape(self, data: Float8Array) -> tuple[int, ...]:
        return tuple(data.values.shape)

    def decoded_dtype(self, data: Float8Array) -> jnp.dtype:
        del data
        return jnp.dtype(jnp.float32)

    def shardings(
        self, data: Float8Array, sharding: Sharding | None, replicated: Sharding
    ) -> Float8Array:
        shape = self.shape(data)
        if sharding is None or not isinstance(sharding, NamedSharding) or not shape:
            values = replicated if sharding is None else sharding
            return Float8Array(values, replicated, data.root)
        if sharding.is_fully_replicated:
            return Float8Array(sharding, sharding, data.root)
        spec = tuple(sharding.spec) + (None,) * (len(shape) - len(tuple(sharding.spec)))
        entry = spec[-1]
        names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        shards = math.prod(int(sharding.mesh.shape[name]) for name in names)
        local = shape[-1] // shards if shape[-1] % shards == 0 else 0
        last = entry if local > 0 and local % self.block_size == 0 else None
        scales = NamedSharding(sharding.mesh, PartitionSpec(*spec[:-1], last))
        return Float8Array(sharding, scales, data.root)


def _to_format(v: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """float32 ``v`` (within the format's range, or NaN) rounded to the nearest ``dtype`` value,
    ties to even, then cast. The rounding is done in float32 first (a power-of-two step, an
    exact ``round``, an exact product), so that the cast is exact: some jax versions convert
    float32 to FP8 through a 16-bit float, rounding twice (about 0.3% of the entries one FP8
    step off)."""
    info = jnp.finfo(dtype)
    exponent = ((lax.bitcast_convert_type(v, jnp.int32) >> 23) & 0xFF) - 127
    step_exp = jnp.maximum(exponent, int(info.minexp)) - int(info.nmant)
    rounded = jnp.ldexp(jnp.round(jnp.ldexp(v, -step_exp)), step_exp)
    return rounded.astype(dtype)


def _blocks(x: jax.Array, block: int) -> tuple[jax.Array, int]:
    """``x`` as ``(..., blocks, block)`` along its last axis (zero padded), and its length."""
    lead, n = (x.shape[:-1], x.shape[-1]) if x.ndim else ((), 1)
    rows = x.reshape(*lead, n)
    pad = -n % block
    if pad:
        rows = jnp.pad(rows, [(0, 0)] * len(lead) + [(0, pad)])
    return rows.reshape(*lead, -1, block), n


def _unblock(blocks: jax.Array, n: int, shape: tuple[int, ...]) -> jax.Array:
    lead = blocks.shape[:-2]
    return blocks.reshape(*lead, -1)[..., :n].reshape(shape)


def float8(
    *, block_size: int = 256, min_size: int = 4096, second_moment: SecondMoment = "e4m3_sqrt"
) -> Float8:
    r"""Store a moment in FP8 (8 bits per entry) with one float32 scale per block.

    Pass it where a transformation takes a moment's dtype:
    ``rmsjax.adamw(1e-3, mu_dtype=rmsjax.float8(), nu_dtype=rmsjax.float8())``. An array of at
    least ``min_size`` entries is cut along its last axis into blocks of ``block_size``; a
    block :math:`b` keeps :math:`s_b = \max_{i \in b} |y_i| / F` (float32) and each entry
    :math:`\mathrm{fp8}(y_i / s_b)`, the float8 cast (round to nearest even), decoded as
    :math:`\hat y_i = \mathrm{fp8}(y_i/s_b)\, s_b`. :math:`F` is the format's largest value.

    * A moment that can be negative: :math:`y = x` in ``float8_e4m3fn`` (E4M3: 4 exponent and
      3 mantissa bits, :math:`F = 448`, relative error up to :math:`2^{-4}`, down to
      :math:`2^{-9} / 448 \approx 4 \cdot 10^{-6}` of the block maximum).
    * A second moment (:math:`\ge 0`), ``second_moment="e4m3_sqrt"`` (default): the square root
      is stored, :math:`y = \sqrt{x}` in E4M3 and :math:`\hat x = \hat y^2` (a range expansion
      as in COAT, arXiv 2410.19313: the root halves the decades to cover, so :math:`\nu` keeps
      ten decades below the block maximum); ``"e5m2"``: :math:`y = x` in ``float8_e5m2`` (5
      exponent bits, 2 mantissa bits, :math:`F = 57344`; Fishman et al., arXiv 2409.12517).

    Round to nearest: an average whose per-step change is below half an FP8 step (about 3%)
    does not move; 8 bits leave far fewer such updates than 4 (compare
    :func:`rmsjax.quantized`). Smaller arrays, complex moments and non-float parameters' moments
    stay float32. Memory: 1 + 4 / ``block_size`` bytes per entry (1.016 with blocks of 256).

    Args:
      block_size: entries per scale along the last axis, an integer >= 1 (default 256).
      min_size: arrays with fewer entries stay float32; an integer >= 0.
      second_moment: ``"e4m3_sqrt"`` or ``"e5m2"``.

    Returns:
      A :class:`Float8` value (frozen, hashable, validated here).

    Differences: torchao's ``AdamWFp8`` stores both moments in E4M3 with a scale per block of
    256 (the block maximum / 448) over the flattened tensor; here blocks stay within a row (the
    state shards with its parameter) and the second moment has a wider range. bitsandbytes and
    optax have no FP8 state. The native kernel does not run FP8 state (the fused step takes the
    pure-JAX path for it).
    """
    return Float8(block_size=block_size, min_size=min_size, second_moment=second_moment)
