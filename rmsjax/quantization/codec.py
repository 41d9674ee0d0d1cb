"""The codec of one array (:class:`BlockCodec`), its presets, and :class:`QuantizedArray`."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike, DTypeLike

from rmsjax.quantization.fast import bucket_table
from rmsjax.quantization.fast import codes as fast_codes
from rmsjax.quantization.maps import dynamic_map, linear_map, power_of_two_map
from rmsjax.quantization.rounding import CONVENTIONS, lookup, stochastic_codes
from rmsjax.validation import is_int

__all__ = [
    "BlockCodec",
    "QuantizedArray",
    "bitsandbytes_codec",
    "check_bits",
    "dequantize",
    "moment_codec",
    "quantize",
    "torchao_codec",
]

Layout = Literal["last_axis", "flat"]
Convention = Literal["nearest", "bitsandbytes", "torchao"]
Normalize = Literal["divide", "reciprocal"]
Rounding = Literal["nearest", "stochastic"]
Scale = Literal["max", "power_of_two"]
_SCALES = ("max", "power_of_two")
_LAYOUTS = ("last_axis", "flat")
_ROUNDINGS = ("nearest", "stochastic")
_NORMALIZE = ("divide", "reciprocal")
_F32 = np.float32
_TORCHAO_SCALE_FLOOR = 1e-12  # torchao clips each block's scale below at this value


def check_bits(bits: Any) -> None:
    """``bits``, the width of one code, must be 4 or 8: ``ValueError`` otherwise."""
    if not is_int(bits) or bits not in (4, 8):
        raise ValueError(f"`bits` must be 4 or 8, got {bits!r}.")


@dataclasses.dataclass(frozen=True)
class BlockCodec:
    r"""How one array of optimizer state is stored in 4 or 8 bits (see :mod:`rmsjax.quantization`).

    A frozen, hashable value: it can be a static argument of ``jax.jit`` and a pytree's static
    metadata.

    Attributes:
      qmap: the map :math:`Q`, 16 or 256 float32 values (as Python floats), strictly increasing,
        within [-1, 1]. 16 values give 4-bit codes (two per byte), 256 give 8-bit codes.
      block_size: entries per scale, an integer >= 1 (even for 4-bit codes in the flat layout).
      layout: ``"last_axis"`` (blocks never leave a row: shard-safe) or ``"flat"`` (blocks over
        the flattened array, as bitsandbytes and torchao).
      convention: ``"nearest"``, ``"bitsandbytes"`` or ``"torchao"``: the scale, the
        normalisation and the rounding of that library (see :mod:`rmsjax.quantization`).
      min_size: arrays with fewer entries are better kept in float32 (see :meth:`applies_to`);
        an integer >= 0.
      whole_blocks: if true, :meth:`applies_to` also requires the size to be a multiple of
        ``block_size`` (torchao's rule).
      normalize: ``"divide"`` computes :math:`v = x / s`; ``"reciprocal"`` computes
        :math:`v = x \cdot \mathrm{fl}(1 / s)` as bitsandbytes' CPU kernel does (one more
        rounding: about one code in a thousand differs from ``"divide"``).
      rounding: ``"nearest"`` (the ``convention``'s own rounding) or ``"stochastic"``: the
        code of :math:`v = x / s` is one of the two map values around :math:`v`, the upper one
        with probability proportional to the distance from the lower
        (:func:`rmsjax.quantization.rounding.stochastic_codes`), so the decoded value is
        :math:`x` in expectation; :meth:`encode` then takes 32 random bits per entry.
        Stochastic rounding needs ``convention="nearest"`` and ``normalize="divide"``.
      scale: ``"max"``: a block's scale is its absolute maximum; ``"power_of_two"``: the
        smallest power of two at least that maximum (:math:`2^{\lceil\log_2 \max\rceil}`,
        within :math:`[2^{-126}, 2^{127}]`; 0 for an all-zero block, NaN with a NaN), so that
        :math:`x / s` and :math:`Q_c \cdot s` are exact (a change of exponent). Needs
        ``convention="nearest"``.

    Differences from bitsandbytes and torchao: the libraries tie a codec to a tensor subclass or
    to their fused kernels; here it is a value with two pure functions, and the choice of float32
    state for small tensors is reported by :meth:`applies_to` rather than taken silently.
    """

    qmap: tuple[float, ...]
    block_size: int = 256
    layout: Layout = "last_axis"
    convention: Convention = "nearest"
    min_size: int = 4096
    whole_blocks: bool = False
    normalize: Normalize = "divide"
    rounding: Rounding = "nearest"
    scale: Scale = "max"

    def __post_init__(self) -> None:
        q = np.asarray(self.qmap, np.float64)
        if q.ndim != 1 or q.size not in (16, 256):
            raise ValueError(
                f"`qmap` must hold 16 (4-bit) or 256 (8-bit) values, got {q.size}. Build one "
                "with rmsjax.quantization.dynamic_map or linear_map."
            )
        if not (np.all(np.isfinite(q)) and np.all(np.abs(q) <= 1) and np.all(np.diff(q) > 0)):
            raise ValueError(
                "`qmap` must be strictly increasing finite values in [-1, 1] (encoding divides "
                "by the block's absolute maximum, so |x / s| <= 1)."
            )
        if np.any(q.astype(_F32) != q):
            raise ValueError("`qmap` values must be float32 numbers (the codes decode to them).")
        if not (isinstance(self.block_size, int) and self.block_size >= 1):
            raise ValueError(f"`block_size` must be an integer >= 1, got {self.block_size!r}.")
        if self.layout not in _LAYOUTS:
            raise ValueError(f"`layout` must be one of {_LAYOUTS}, got {self.layout!r}.")
        if self.convention not in CONVENTIONS:
            raise ValueError(f"`convention` must be one of {CONVENTIONS}, got {self.convention!r}.")
        if self.bits == 4 and self.layout == "flat" and self.block_size % 2:
            raise ValueError(
                f"`block_size` must be even for 4-bit codes in the flat layout (two codes share "
                f"a byte), got {self.block_size}."
            )
        if self.normalize not in _NORMALIZE:
            raise ValueError(f"`normalize` must be one of {_NORMALIZE}, got {self.normalize!r}.")
        if not (isinstance(self.min_size, int) and self.min_size >= 0):
            raise ValueError(f"`min_size` must be an integer >= 0, got {self.min_size!r}.")
        if self.scale not in _SCALES:
            raise ValueError(f"`scale` must be one of {_SCALES}, got {self.scale!r}.")
        if self.scale != "max" and self.convention != "nearest":
            raise ValueError(
                f"`scale={self.scale!r}` needs convention='nearest', got {self.convention!r}."
            )
        if self.rounding not in _ROUNDINGS:
            raise ValueError(f"`rounding` must be one of {_ROUNDINGS}, got {self.rounding!r}.")
        if self.rounding == "stochastic" and (self.convention, self.normalize) != (
            "nearest",
            "divide",
        ):
            raise ValueError(
                "`rounding='stochastic'` needs convention='nearest' and normalize='divide' "
                f"(rmsjax's own scale and division), got convention={self.convention!r}, "
                f"normalize={self.normalize!r}."
            )

    def __repr__(self) -> str:
        # The 16 or 256 map values would fill a screen in every state's repr.
        fields = ", ".join(
            f"{f.name}={getattr(self, f.name)!r}"
            for f in dataclasses.fields(self)
            if f.name != "qmap"
        )
        return f"BlockCodec(qmap=<{len(self.qmap)} values in [{self.qmap[0]:.6g}, 1]>, {fields})"

    @property
    def bits(self) -> int:
        """4 or 8: the width of one code."""
        return 4 if len(self.qmap) == 16 else 8

    # -- shapes ----------------------------------------------------------------------------

    def applies_to(self, shape: Sequence[int]) -> bool:
        """Whether a state array of ``shape`` should be stored with this codec.

        True when it has at least ``min_size`` entries and, with ``whole_blocks``, a multiple of
        ``block_size`` of them; otherwise the libraries keep the state in float32. (``encode``
        itself accepts any shape.)
        """
        size = math.prod(shape)
        return size >= self.min_size and not (self.whole_blocks and size % self.block_size)

    def _rows(self, shape: Sequence[int]) -> tuple[tuple[int, ...], int]:
        shape = tuple(shape)
        if self.layout == "flat":
            return (), math.prod(shape)
        return (shape[:-1], shape[-1]) if shape else ((), 1)

    def code_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """Shape of the uint8 codes of an array of ``shape``."""
        lead, n = self._rows(shape)
        if self.bits == 8:
            return tuple(shape)
        return (*lead, -(-n // 2))

    def scale_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """Shape of the float32 scales of an array of ``shape``: one per block."""
        lead, n = self._rows(shape)
        return (*lead, -(-n // self.block_size))

    def _blocks(self, x: jax.Array) -> jax.Array:
        lead, n = self._rows(x.shape)
        rows = x.reshape(*lead, n)
        nb = -(-n // self.block_size)
        pad = nb * self.block_size - n
        if pad:
            rows = jnp.pad(rows, [(0, 0)] * len(lead) + [(0, pad)])
        return rows.reshape(*lead, nb, self.block_size)

    def _per_entry(self, per_block: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        """A per-block array (of :meth:`scale_shape`) repeated for every entry of its block, in
        the row view ``(*lead, n)`` of an array of ``shape``."""
        lead, n = self._rows(shape)
        nb = per_block.shape[-1]
        full = (*lead, nb, self.block_size)
        entries = jnp.broadcast_to(per_block[..., None], full).reshape(*lead, nb * self.block_size)
        return entries[..., :n] if nb * self.block_size != n else entries

    # -- encode / decode -------------------------------------------------------------------

    def encode(
        self, x: ArrayLike, random_bits: ArrayLike | None = None
    ) -> tuple[jax.Array, jax.Array]:
        r"""``(codes, scales)`` of a real array ``x`` (any shape, any float dtype).

        ``x`` is read in float32. ``codes`` is uint8 with :meth:`code_shape` (two 4-bit codes
        per byte, the even-indexed entry in the high nibble, as torchao packs them); ``scales``
        is float32 with :meth:`scale_shape`. Pure and elementwise per block: jit, vmap and
        sharding apply. ``random_bits``: with ``rounding="stochastic"`` (and only then), a
        ``uint32`` array of ``x``'s shape, the random bits of each entry's rounding
        (:func:`rmsjax.stochastic.counter_bits`). The same as ``(self.codes_of(x, s,
        random_bits), s)`` with ``s = self.scales_of(x)``.
        """
        x = _real(x, "encode")
        return _encode(self, x, self._checked_bits(x.shape, random_bits))

    def _checked_bits(self, shape: tuple[int, ...], random_bits: ArrayLike | None) -> Any:
        if (random_bits is None) != (self.rounding == "nearest"):
            raise ValueError(
                f"BlockCodec.encode: `random_bits` must be given with rounding='stochastic' "
                f"and only then (this codec's rounding is {self.rounding!r})."
            )
        if random_bits is None:
            return None
        random_bits = jnp.asarray(random_bits)
        if random_bits.shape != shape or random_bits.dtype != jnp.uint32:
            raise ValueError(
                f"BlockCodec.encode: `random_bits` must be uint32 of x's shape {shape}, got "
                f"{random_bits.dtype}{list(random_bits.shape)}."
            )
        return random_bits

    def _encode(self, x: jax.Array, random_bits: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        scales = self.scales_of(x)
        return self.codes_of(x, scales, random_bits), scales

    def scales_of(self, x: ArrayLike) -> jax.Array:
        r"""The float32 scale of every block of ``x`` (:meth:`scale_shape`): the first of
        :meth:`encode`'s two passes.

        ``"nearest"``: the largest :math:`|x_i|` of the block, NaN if the block holds a NaN;
        ``"bitsandbytes"``: the largest over the non-NaN entries; ``"torchao"``: the largest,
        at least :math:`10^{-12}`; with ``scale="power_of_two"``, the smallest power of two at
        least the largest. XLA flushes float32 subnormals to zero on the CPU, so there a block
        of subnormals and zeros has scale 0.

        Computed as one reduction of the pair (magnitude, is-NaN) per block, which XLA fuses
        with the computation of ``x`` (a single reduction of the magnitudes would be split by
        XLA's CPU compiler into a two-stage reduction that keeps the magnitudes in memory).
        """
        x = jnp.asarray(x)
        blocks = self._blocks(x.astype(jnp.float32))
        nan = jnp.isnan(blocks)
        mag = jnp.where(nan, jnp.float32(0.0), jnp.abs(blocks))
        largest, any_nan = lax.reduce(
            (mag, nan.astype(jnp.int8)),
            (np.float32(0.0), np.int8(0)),
            lambda a, b: (jnp.maximum(a[0], b[0]), jnp.maximum(a[1], b[1])),
            (blocks.ndim - 1,),
        )
        # bitsandbytes' maximum skips NaN entries; the others make the block's scale NaN, so
        # that a NaN stays visible after decoding. (The flag is never above 1: the comparison
        # keeps the reduction's second result in use for bitsandbytes too.)
        limit = 1 if self.convention == "bitsandbytes" else 0
        scales = jnp.where(any_nan > limit, jnp.float32(jnp.nan), largest)
        if self.convention == "torchao":
            scales = jnp.maximum(scales, jnp.float32(_TORCHAO_SCALE_FLOOR))
        if self.scale == "power_of_two":
            scales = _power_of_two_at_least(scales)
        return scales

    def codes_of(
        self, x: ArrayLike, scales: ArrayLike, random_bits: ArrayLike | None = None
    ) -> jax.Array:
        r"""The uint8 codes of ``x`` (:meth:`code_shape`) given the block ``scales`` that
        :meth:`scales_of` returns for it: the second of :meth:`encode`'s two passes, elementwise
        given the scales.

        With :math:`s` the entry's block scale (1 where it is 0), :math:`v = x / s` correctly
        rounded (``normalize="divide"``) or :math:`x \cdot \mathrm{fl}(1/s)`
        (``"reciprocal"``); a NaN :math:`v` is read as :math:`-1`; the code is the rounding
        rule's for :math:`v` (:mod:`rmsjax.quantization.rounding`), found with one table
        lookup (:mod:`rmsjax.quantization.fast`) where the map allows, or with ``rounding=
        "stochastic"`` drawn with ``random_bits`` (as :meth:`encode` takes them).
        """
        x = jnp.asarray(x)
        shape = tuple(x.shape)
        scales = jnp.asarray(scales, jnp.float32)
        lead, n = self._rows(shape)
        xs = x.astype(jnp.float32).reshape(*lead, n)
        checked: jax.Array | None = self._checked_bits(shape, random_bits)
        bits = None if checked is None else checked.reshape(*lead, n)
        # per block: the scale, the divisor (1 for a zero scale), and the factors of the
        # approximate quotient: fl(1/s) is subnormal (flushed to 0 on the CPU) for s >= 2^126,
        # so the approximation then uses (x * 2^-8) * fl(2^8 / s)
        one = jnp.float32(1.0)
        divisor = jnp.where(scales == 0, one, scales)
        big = divisor >= jnp.float32(2.0**120)
        if self.normalize == "reciprocal":
            recip, pre = one / scales, one
        else:
            recip = jnp.where(big, jnp.float32(256.0), one) / divisor
            pre = jnp.where(big, jnp.float32(2.0**-8), one)
        per_block = [scales, divisor, jnp.broadcast_to(pre, scales.shape), recip]
        scale, d, pre, recip = (self._per_entry(a, shape) for a in per_block)
        codes = self._codes(xs, scale, d, pre, recip, bits)
        if self.bits == 8:
            return codes.reshape(shape)
        # 4-bit codes: two per byte, the even-indexed entry in the high nibble
        if n % 2:  # the padding's nibble is 0
            codes = jnp.pad(codes, [(0, 0)] * len(lead) + [(0, 1)])
        pairs = codes.reshape(*lead, -1, 2)
        return (pairs[..., 0] << 4) | pairs[..., 1]

    def _codes(
        self,
        xs: jax.Array,
        scale: jax.Array,
        d: jax.Array,
        pre: jax.Array,
        recip: jax.Array,
        bits: jax.Array | None,
    ) -> jax.Array:
        """The uint8 code of each float32 entry of ``xs`` given, per entry, its block's
        ``scale``, divisor ``d`` and approximate-quotient factors ``pre`` and ``recip`` (see
        :meth:`codes_of`), and for stochastic rounding its random ``bits``. Elementwise."""
        one = jnp.float32(1.0)
        table = None if bits is not None else bucket_table(self.qmap, self.convention)
        if self.normalize == "reciprocal":
            v = xs * recip
            v = jnp.where(jnp.isnan(v), jnp.float32(-1.0), v)
            if table is None:
                codes = lookup(self.qmap, self.convention, v)
            else:
                negative = lax.bitcast_convert_type(v, jnp.int32) >> 31
                codes = fast_codes(jnp.abs(v), negative, v, table)
        else:
            # v is NaN where x is NaN or infinite (then s is infinite too) or the scale is NaN:
            # -1 then, as the reference takes a NaN v.
            bad = jnp.isnan(d) | ~jnp.isfinite(xs)
            approx = jnp.where(bad, jnp.float32(-1.0), (xs * pre) * recip)
            # |x| / s, correctly rounded, and the sign of x (of v). XLA rewrites a division by
            # a broadcast into a multiplication by the reciprocal (one more rounding);
            # max(s, |x|), which is s (no |x| exceeds its block's scale), is not a broadcast,
            # so the division stays. Its result is read once (see fast.codes).
            magnitude = jnp.where(bad, one, jnp.abs(xs))
            denominator = jnp.where(bad, one, jnp.maximum(d, jnp.abs(xs)))
            sign = jnp.where(bad, jnp.int32(-1), lax.bitcast_convert_type(xs, jnp.int32) >> 31)
            if bits is not None:
                v = jnp.where(sign < 0, -one, one) * (magnitude / denominator)
                codes = stochastic_codes(self.qmap, v, bits)
            elif table is None:
                v = jnp.where(sign < 0, -one, one) * (magnitude / denominator)
                codes = lookup(self.qmap, self.convention, v)
            else:
                codes = fast_codes(magnitude / denominator, sign, approx, table)
        if self.convention == "bitsandbytes":
            codes = jnp.where(scale == 0, jnp.uint8(0), codes)
        return codes

    def decode(
        self,
        codes: ArrayLike,
        scales: ArrayLike,
        shape: Sequence[int],
        dtype: DTypeLike = jnp.float32,
    ) -> jax.Array:
        r""":math:`\hat x = Q[c] \cdot s` per block, as an array of ``shape`` and ``dtype``.

        The product is a float32 multiplication (as both libraries do it), then cast to
        ``dtype``. ``codes`` and ``scales`` are what :meth:`encode` returned for that shape.
        """
        shape = tuple(shape)
        codes = jnp.asarray(codes)
        scales = jnp.asarray(scales, jnp.float32)
        if codes.shape != self.code_shape(shape) or scales.shape != self.scale_shape(shape):
            raise ValueError(
                f"codes {codes.shape} / scales {scales.shape} do not belong to an array of "
                f"shape {shape}: expected {self.code_shape(shape)} / {self.scale_shape(shape)}."
            )
        return _decode(self, codes, scales, shape, jnp.dtype(dtype))

    def _decode(
        self, codes: jax.Array, scales: jax.Array, shape: tuple[int, ...], dtype: jnp.dtype
    ) -> jax.Array:
        lead, n = self._rows(shape)
        if self.bits == 4:
            codes = jnp.stack([codes >> 4, codes & 15], axis=-1).reshape(*lead, -1)
        codes = codes.reshape(*lead, -1)[..., :n]
        table = jnp.asarray(np.asarray(self.qmap, _F32))
        values = table.at[codes.astype(jnp.int32)].get(mode="promise_in_bounds")
        # In the code's own shape (the scales are repeated per entry): XLA then fuses the
        # table lookup into each consumer of the decoded values.
        return (values * self._per_entry(scales, shape)).reshape(shape).astype(dtype)


def _real(x: ArrayLike, what: str) -> jax.Array:
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(
            f"BlockCodec.{what} needs a real floating-point array, got dtype {x.dtype}. "
            "Complex state is not quantized (store its real and imaginary parts apart)."
        )
    return x


def _power_of_two_at_least(m: jax.Array) -> jax.Array:
    """The smallest power of two >= ``m`` (``m`` >= 0), within [2^-126, 2^127]; 0 stays 0,
    NaN stays NaN and infinity stays infinity (the scale of a block holding one, as with
    ``scale="max"``)."""
    mantissa, exponent = jnp.frexp(m)  # m = mantissa * 2^exponent, mantissa in [0.5, 1)
    exponent = jnp.where(mantissa == 0.5, exponent - 1, exponent)
    power = jnp.ldexp(jnp.float32(1.0), jnp.clip(exponent, -126, 127))
    return jnp.where((m > 0) & (m < jnp.inf), power, m)


# One compiled program per codec, shape and dtype (inside an outer jit these simply inline).
_encode = jax.jit(BlockCodec._encode, static_argnums=0)
_decode = jax.jit(BlockCodec._decode, static_argnums=(0, 3, 4))


def moment_codec(bits: int = 8, *, signed: bool, block_size: int | None = None) -> BlockCodec:
    r"""rmsjax's own codec for a first (``signed=True``) or second (``signed=False``) moment.

    8 bits: :func:`dynamic_map` (signed or unsigned), blocks of 256, the block's absolute
    maximum as its scale, the nearest code. In the signed map the most negative value is -1
    (instead of bitsandbytes' -0.99297), so that a block whose largest entry is negative
    stores it exactly, as it does a positive one.

    4 bits: :func:`power_of_two_map`, blocks of 128, a power-of-two scale per block
    (``scale="power_of_two"``: :math:`s = 2^{\lceil \log_2 \max_b |x| \rceil}`, so
    :math:`v = x/s` and :math:`Q_c s` are exact), and stochastic rounding
    (``rounding="stochastic"``) of every moment between its two neighbouring map values (second
    moments: :math:`2^{-15} \dots 1`; first moments: :math:`0, \pm 2^{-6} \dots \pm 1` and
    :math:`2^{-7}`), so that the stored value is right in expectation. A moving average updated
    by :math:`(1 - \beta)` of a new value changes by far less than half a code step per update;
    the nearest code would freeze it (a first moment that cannot follow its gradients; a second
    moment that stops growing after a few steps and never decays, so the steps come out several
    times too large or too small), while the stochastic code follows it in expectation. The
    cost is noise: a second moment's decoded value wanders around its true value by up to an
    octave, and :math:`1/\sqrt{\hat\nu}` averages a little above :math:`1/\sqrt{\nu}` (10-20%
    larger steps where :math:`\nu` decays slowly, in ``tests/test_storage.py``). Measurements:
    ``benchmarks/results/quality_ablation/summary.md``.

    Always the shard-safe ``"last_axis"`` layout; ``min_size`` 4096 like both libraries.

    Args:
      bits: 4 or 8.
      signed: whether the state can be negative.
      block_size: entries per scale (>= 1); default 256 (8 bits) or 128 (4 bits).

    Differences: bitsandbytes and torchao block the flattened tensor (a block can straddle rows
    and shards), round differently (:func:`bitsandbytes_codec`, :func:`torchao_codec`) and
    store a block's largest negative entry 0.7% (8 bits) or 11% (4 bits) too small. At 4 bits
    torchao (and rmsjax until this release) use the 4-bit dynamic map for first moments and
    the linear map :math:`k/16` for second moments, both rounded to nearest, with float32
    maxima as scales.
    """
    check_bits(bits)
    block = (256 if bits == 8 else 128) if block_size is None else block_size
    if bits == 4:
        return BlockCodec(
            qmap=tuple(power_of_two_map(signed).tolist()),
            block_size=block,
            rounding="stochastic",
            scale="power_of_two",
        )
    qmap = dynamic_map(signed)
    if signed:
        qmap[0] = -1.0  # the block's most negative entry is stored exactly, like its maximum
    return BlockCodec(qmap=tuple(qmap.tolist()), block_size=block)


def bitsandbytes_codec(*, signed: bool) -> BlockCodec:
    """bitsandbytes 0.50's 8-bit block-wise state: ``Adam8bit`` / ``AdamW8bit`` /
    ``RMSprop8bit`` on the CPU.

    ``create_dynamic_map(signed)`` (``state1`` signed, ``state2`` unsigned), blocks of 256 over
    the flattened tensor (the last block may be short), the CPU kernel's rounding
    (``convention="bitsandbytes"``, see :mod:`rmsjax.quantization`), and float32 state below
    ``min_8bit_size=4096`` entries. The codes, absolute maxima and decoded values equal
    ``bitsandbytes.functional.quantize_blockwise(x, code, blocksize=256)`` and
    ``dequantize_blockwise`` bit for bit (tests/reference/lowbit.npz).

    Differences: the CUDA kernels of bitsandbytes round to the nearest code; this reproduces the
    CPU kernel, whose grid rounding never stores zero exactly (a systematic
    :math:`+2 \\cdot 10^{-5}` of the block maximum on a zero first moment).
    """
    return BlockCodec(
        qmap=tuple(dynamic_map(signed).tolist()),
        block_size=256,
        layout="flat",
        convention="bitsandbytes",
        min_size=4096,
        normalize="reciprocal",
    )


def torchao_codec(bits: int, *, signed: bool) -> BlockCodec:
    """torchao 0.18's ``OptimState8bit`` (``bits=8``) or ``OptimState4bit`` (``bits=4``).

    8 bits: ``create_dynamic_map(signed)``, blocks of 256 (``AdamW8bit``). 4 bits: the signed
    4-bit dynamic map for ``exp_avg``, the zero-free linear map ``k / 16`` for ``exp_avg_sq``,
    blocks of 128 (``AdamW4bit``; plain block-wise scaling for both moments, no rank-1
    normalisation in 0.18). Blocks over the flattened tensor; quantized only when the tensor
    has at least 4096 entries and a whole number of blocks (``whole_blocks``), else float32.
    Codes, scales and decoded values equal torchao's bit for bit (tests/reference/lowbit.npz).
    """
    check_bits(bits)
    if bits == 8:
        qmap, block = dynamic_map(signed), 256
    else:
        block = 128
        qmap = (
            dynamic_map(True, exponent_bits=3, total_bits=4)
            if signed
            else linear_map(16, zero=False)
        )
    return BlockCodec(
        qmap=tuple(qmap.tolist()),
        block_size=block,
        layout="flat",
        convention="torchao",
        min_size=4096,
        whole_blocks=True,
    )


# ------------------------------------------------------------------------------------------
# A quantized array as one pytree node
# ------------------------------------------------------------------------------------------


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["codes", "scales", "key"],
    meta_fields=["codec", "shape", "dtype"],
)
@dataclasses.dataclass(frozen=True)
class QuantizedArray:
    """An array stored by a :class:`BlockCodec`: a pytree with two or three array leaves.

    ``codes`` (uint8) and ``scales`` (float32) are the leaves (they shard, checkpoint and
    donate like any state); ``codec``, ``shape`` and ``dtype`` (of the decoded array) are static
    metadata. ``dequantize(q)`` gives the array back. ``key``: ``None`` (no leaf) for a codec
    that rounds to nearest; for a stochastically rounding one, as kept by
    :class:`rmsjax.storage.Quantized`, a ``uint32[2]`` array ``(seed, counter)``: the random
    bits of the next encoding are :func:`rmsjax.stochastic.counter_bits` ``(shape, seed,
    counter)``, and the counter advances by one at every encoding.
    """

    codes: Any
    scales: Any
    codec: BlockCodec
    shape: tuple[int, ...]
    dtype: Any
    key: Any = None

    @property
    def size(self) -> int:
        return math.prod(self.shape)


def quantize(
    x: ArrayLike, codec: BlockCodec, random_bits: ArrayLike | None = None
) -> QuantizedArray:
    """``x`` encoded by ``codec``, its shape and dtype recorded (:meth:`BlockCodec.encode`;
    ``random_bits`` for a stochastically rounding codec)."""
    x = jnp.asarray(x)
    codes, scales = codec.encode(x, random_bits)
    return QuantizedArray(codes, scales, codec, tuple(x.shape), jnp.dtype(x.dtype))


def dequantize(q: QuantizedArray, dtype: DTypeLike | None = None) -> jax.Array:
    """The decoded array of ``q``, in ``dtype`` (default: the dtype it was quantized from)."""
    return q.codec.decode(q.codes, q.scales, q.shape, q.dtype if dtype is None else dtype)
