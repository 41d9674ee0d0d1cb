r"""Block-wise 8- or 4-bit storage of a moment: :class:`Quantized`, made by :func:`quantized`."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec, Sharding

from rmsjax.quantization import BlockCodec, QuantizedArray, check_bits, moment_codec
from rmsjax.stochastic import counter_bits
from rmsjax.storage.base import KernelView, Storage, StoredArray, seed_key
from rmsjax.validation import is_int

__all__ = ["Quantized", "quantized"]


@dataclasses.dataclass(frozen=True)
class Quantized(Storage[QuantizedArray]):
    """Block-wise 8- or 4-bit storage of a moment: made by :func:`quantized` (see there).

    A frozen, hashable value (it is static metadata of the state's pytree). ``codec``, when
    given, is used for every moment it is applied to; otherwise the codec is
    :func:`rmsjax.quantization.moment_codec` ``(bits, signed=..., block_size=...)`` with
    ``min_size``, signed or not according to the moment. The data of a stored moment is a
    :class:`rmsjax.quantization.QuantizedArray` (uint8 codes, float32 scales, and for a
    stochastically rounding codec a ``uint32[2]`` ``(seed, counter)`` key; its codec, shape
    and dtype as metadata).
    """

    bits: int = 8
    block_size: int | None = None
    min_size: int = 4096
    codec: BlockCodec | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        check_bits(self.bits)
        if not is_int(self.seed):
            raise TypeError(f"`seed` must be an int, got {self.seed!r}.")
        if self.block_size is not None and not (is_int(self.block_size) and self.block_size >= 1):
            raise ValueError(
                f"`block_size` must be None (256 for 8 bits, 128 for 4) or an integer >= 1, "
                f"got {self.block_size!r}."
            )
        if not (is_int(self.min_size) and self.min_size >= 0):
            raise ValueError(
                f"`min_size` must be an integer >= 0 (entries; smaller arrays stay float32), "
                f"got {self.min_size!r}."
            )
        if self.codec is not None:
            if not isinstance(self.codec, BlockCodec):
                raise TypeError(
                    f"`codec` must be None or a rmsjax.quantization.BlockCodec, got "
                    f"{type(self.codec).__name__}."
                )
            if self.bits not in (8, self.codec.bits) or (self.block_size, self.min_size) != (
                None,
                4096,
            ):
                raise ValueError(
                    "`codec` fixes the bits, block size and minimum size itself; pass it alone "
                    f"(got bits={self.bits}, block_size={self.block_size}, "
                    f"min_size={self.min_size} with a {self.codec.bits}-bit codec)."
                )
            object.__setattr__(self, "bits", self.codec.bits)

    @property
    def cancels_differences(self) -> bool:
        r"""True for 4-bit codes: with one significant bit (the default maps) or 16 levels, the
        rounding of :math:`\nu` and :math:`|\mu|^2` swamps their difference."""
        return self.bits == 4

    def codec_for(self, signed: bool) -> BlockCodec:
        """The codec of a moment that can be negative (``signed``) or not."""
        return self.codec if self.codec is not None else _moment_codec(self, signed)

    def store(self, array: jax.Array, *, signed: bool, salt: str) -> Any:
        if not jnp.issubdtype(array.dtype, jnp.floating):
            return array  # complex moments stay unquantized
        codec = self.codec_for(signed)
        if not codec.applies_to(array.shape):
            return array
        key = None
        bits = None
        if codec.rounding == "stochastic":
            key = seed_key(self.seed, salt)
            bits = counter_bits(array.shape, key[0], key[1])
            key = key.at[1].add(jnp.uint32(1))
        codes, scales = codec.encode(_finite(array), bits)
        # An all-zero moment starts as zero codes and zero scales, as the libraries create
        # their state: it decodes to exactly 0 under every convention (torchao's encoder would
        # give a zero block the scale 1e-12, and its zero-free 4-bit map would decode it to
        # 6.25e-14).
        empty = jnp.all(array == 0)
        codes = jnp.where(empty, jnp.zeros_like(codes), codes)
        scales = jnp.where(empty, jnp.zeros_like(scales), scales)
        data = QuantizedArray(codes, scales, codec, tuple(array.shape), array.dtype, key)
        return StoredArray(data, self)

    def decode(self, data: QuantizedArray) -> jax.Array:
        return data.codec.decode(data.codes, data.scales, data.shape, data.dtype)

    def encode(self, x: jax.Array, data: QuantizedArray) -> QuantizedArray:
        key = data.key
        if key is None:
            codes, scales = data.codec.encode(_finite(jnp.real(x)))
        else:
            bits = counter_bits(tuple(data.shape), key[0], key[1])
            codes, scales = data.codec.encode(_finite(jnp.real(x)), bits)
            key = key.at[1].add(jnp.uint32(1))
        return dataclasses.replace(data, codes=codes, scales=scales, key=key)

    def encode_from(self, new: Callable[[], jax.Array], data: QuantizedArray) -> QuantizedArray:
        # Two passes over the new value, each with its own copy of its computation: the block
        # scales (a reduction), then the codes given the scales (elementwise). XLA fuses each
        # with the computation of the value; none keeps the value in memory.
        value = lambda: _finite(jnp.real(new()))
        scales = data.codec.scales_of(value())
        key, bits = data.key, None
        if key is not None:
            bits = counter_bits(tuple(data.shape), key[0], key[1])
            key = key.at[1].add(jnp.uint32(1))
        codes = data.codec.codes_of(value(), scales, bits)
        return dataclasses.replace(data, codes=codes, scales=scales, key=key)

    def shape(self, data: QuantizedArray) -> tuple[int, ...]:
        return tuple(data.shape)

    def decoded_dtype(self, data: QuantizedArray) -> jnp.dtype:
        return jnp.dtype(data.dtype)

    def shardings(
        self, data: QuantizedArray, sharding: Sharding | None, replicated: Sharding
    ) -> QuantizedArray:
        codes, scales = (
            (replicated, replicated)
            if sharding is None
            else _codes_and_scales(data.codec, tuple(data.shape), sharding, replicated)
        )
        key = None if data.key is None else replicated
        return dataclasses.replace(data, codes=codes, scales=scales, key=key)

    def kernel_view(self, data: QuantizedArray) -> KernelView | str:
        if data.key is not None:
            return "stochastically rounded codes (the native kernel rounds to the nearest code)"
        return KernelView((data.codes, data.scales), data.codec)

    def with_arrays(self, data: QuantizedArray, arrays: tuple[Any, ...]) -> QuantizedArray:
        codes, scales = arrays
        return dataclasses.replace(data, codes=codes, scales=scales)


@functools.lru_cache(maxsize=64)
def _moment_codec(spec: Quantized, signed: bool) -> BlockCodec:
    codec = moment_codec(spec.bits, signed=signed, block_size=spec.block_size)
    return dataclasses.replace(codec, min_size=spec.min_size)


def _finite(x: jax.Array) -> jax.Array:
    """``x`` in float32 with values beyond the float32 range clipped to it (NaN stays NaN): a
    block-wise scale cannot hold infinity without turning its whole block into NaN."""
    big = jnp.finfo(jnp.float32).max
    return jnp.clip(x.astype(jnp.float32), -big, big)


def _axis_size(mesh: Any, entry: Any) -> int:
    """How many shards a PartitionSpec entry (None, an axis name, a tuple of them) makes."""
    names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    return math.prod(int(mesh.shape[name]) for name in names)


def _codes_and_scales(
    codec: BlockCodec, shape: tuple[int, ...], sharding: Sharding, replicated: Sharding
) -> tuple[Sharding, Sharding]:
    """Shardings of a quantized moment's codes and scales, from its parameter's sharding."""
    if sharding.is_fully_replicated:
        return sharding, sharding
    if not isinstance(sharding, NamedSharding) or not shape:
        return replicated, replicated
    spec = tuple(sharding.spec) + (None,) * (len(shape) - len(tuple(sharding.spec)))
    named = lambda *entries: NamedSharding(sharding.mesh, PartitionSpec(*entries))
    if codec.layout == "flat":  # blocks over the flattened array: only 8-bit codes mirror it
        return (sharding if codec.bits == 8 else replicated), replicated
    # Leading axes follow the parameter. The last axis does too when every shard holds whole
    # blocks (and whole bytes of 4-bit codes); otherwise it is not split.
    n, shards = shape[-1], _axis_size(sharding.mesh, spec[-1])
    local = n // shards if n % shards == 0 else 0
    whole = local > 0 and local % codec.block_size == 0 and (codec.bits == 8 or local % 2 == 0)
    last = spec[-1] if whole else None
    return named(*spec[:-1], last), named(*spec[:-1], last)


def quantized(
    bits: int = 8,
    *,
    block_size: int | None = None,
    min_size: int = 4096,
    codec: BlockCodec | None = None,
    seed: int = 0,
) -> Quantized:
    r"""Store a moment block-wise in ``bits`` = 8 or 4 bits, with one float32 scale per block.

    Pass it where a transformation takes a moment's dtype:
    ``rmsjax.adamw(1e-3, mu_dtype=rmsjax.quantized(4), nu_dtype=rmsjax.quantized(4))``.
    Each array of at least ``min_size`` entries is split along its LAST axis into blocks of
    ``block_size`` entries (a short last block per row is allowed) and stored as

    .. math::

        \hat x_i = Q_{c_i}\, s_b, \qquad v_i = x_i / s_b \in [-1, 1],

    uint8 codes :math:`c` (two per byte at 4 bits) and float32 scales :math:`s`, with the map
    :math:`Q`, the scale and the rounding of :func:`rmsjax.quantization.moment_codec`:

    * 8 bits (blocks of 256): :math:`s_b = \max_{i \in b} |x_i|`, the dynamic maps (256
      values, about two significant digits from :math:`5.5 \cdot 10^{-7}` to 1, signed for
      moments that can be negative: ``mu``, ``trace``), the nearest code.
    * 4 bits (blocks of 128): :math:`s_b` the smallest power of two
      :math:`\ge \max_{i \in b} |x_i|` and maps of powers of two: :math:`2^{-15}, \dots, 1`
      for a second moment (``nu``, ``sum_of_squares``, AdaDelta's averages, ``nu_max``; no
      zero, so a positive entry is never stored as 0: no :math:`g/\sqrt{0}`), and
      :math:`0, \pm 2^{-6}, \dots, \pm 1, 2^{-7}` for a moment that can be negative. Each
      entry takes one of the two map values around :math:`v_i`, at random, with the
      probabilities that make it exact in expectation (stochastic rounding): a moving average
      whose update :math:`(1-\beta)g` is far below half a code step keeps moving instead of
      freezing. (With the nearest code, AdamW's 4-bit first moment ended at up to +300% of
      float32's final loss, and a second moment stops growing after a few steps and never
      decays; see the memory guide.) The random bits are
      :func:`rmsjax.stochastic.counter_bits` of the entry's index and a ``(seed, counter)``
      key kept in the state (``uint32[2]``, 8 bytes per array), derived from ``seed``, the
      moment's name and its parameter's key path, the counter advanced at every update: runs
      are reproducible from ``seed`` and every sharding gives the same bits. The price is
      noise in the stored second moment, which makes steps somewhat larger on average
      (:math:`E[1/\sqrt{\hat\nu}] > 1/\sqrt{\nu}`).

    Each step decodes, updates in float32 (the update uses the new, unrounded moment) and
    re-encodes, so the rounding error does not accumulate beyond one step's.

    Smaller arrays (biases, norms), complex moments and moments of non-float parameters stay
    unquantized in their default dtype (float32 for float32 and half-precision parameters):
    they cost little memory and lose most from rounding. A value beyond the float32 range
    (:math:`+\infty` after an overflow) is stored as the largest float32: a block-wise scale
    cannot hold :math:`\infty` without turning its whole block into NaN. NaN stays NaN (its
    block decodes to NaN).

    Args:
      bits: 8 (1.016 bytes per entry) or 4 (0.531 bytes per entry).
      block_size: entries per scale along the last axis, an integer >= 1; ``None`` for 256
        (8 bits) or 128 (4 bits).
      min_size: arrays with fewer entries stay unquantized; an integer >= 0 (default 4096,
        bitsandbytes' ``min_8bit_size``).
      codec: a :class:`rmsjax.quantization.BlockCodec` to use as is for every moment this is
        applied to (the library presets pass ``bitsandbytes_codec`` / ``torchao_codec``); then
        ``block_size`` and ``min_size`` must keep their defaults and ``bits`` is the codec's.
      seed: an int; the random bits of stochastically rounded codes derive from it (4-bit
        first moments, or a ``codec`` with ``rounding="stochastic"``); unused otherwise.

    Returns:
      A :class:`Quantized` value (frozen, hashable, validated here).

    Differences: optax has no quantized state. bitsandbytes (``Adam8bit``, ...) and torchao
    (``AdamW8bit``, ``AdamW4bit``) block the FLATTENED tensor, so a block can straddle rows and
    shards; rmsjax's blocks never leave a row, so the state of a parameter sharded along a
    leading axis is sharded with it and needs no communication (see
    :func:`rmsjax.state_sharding`). At 8 bits rmsjax rounds to the nearest code and stores a
    block's largest entry exactly whatever its sign (the libraries' signed maps end at
    -0.99297); bitsandbytes' CPU kernel never stores an exact 0. At 4 bits torchao (and rmsjax
    before this release) use a 16-value dynamic map for the first moment and :math:`k/16` for
    the second, both rounded to nearest, float32 maxima as scales: with AdamW on the quality
    benchmark's digits tasks, +158% and +230% of float32's final loss (torchao's own
    ``AdamW4bit`` in PyTorch: +65% and +324%), where this scheme ends at -8% and -24%
    (:mod:`rmsjax.compat.torchao`; the memory guide has every task). torchao keeps a tensor in
    float32 unless its size is a multiple of the block size; rmsjax only needs ``min_size``. To
    reproduce the libraries exactly use :mod:`rmsjax.compat.bitsandbytes` and
    :mod:`rmsjax.compat.torchao`.
    """
    return Quantized(bits=bits, block_size=block_size, min_size=min_size, codec=codec, seed=seed)
