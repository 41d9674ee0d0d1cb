r"""Block-wise 4- and 8-bit codecs for ONE array of optimizer state.

A codec stores an array :math:`x` as small integer *codes* and one float32 *scale* per block of
``block_size`` consecutive entries:

.. math::

    s_b = \max_{i \in b} |x_i|, \qquad
    c_i = \operatorname{round}_Q(x_i / s_b), \qquad
    \hat x_i = Q[c_i] \cdot s_b,

where :math:`Q` is a sorted *map* of 256 (8-bit) or 16 (4-bit) values in :math:`[-1, 1]` and
:math:`\operatorname{round}_Q` picks a code for the normalised value. The maps are the dynamic
("exponent + fraction") maps of Dettmers et al., 8-bit Optimizers via Block-wise Quantization
(2022), as bitsandbytes and torchao build them (:func:`dynamic_map`), and torchao's zero-free
linear map for 4-bit second moments (:func:`linear_map`). Everything here is pure JAX: ``encode``
and ``decode`` jit, vmap and shard like any elementwise function.

Block layout (``BlockCodec.layout``):

* ``"last_axis"`` (the default): blocks run along the LAST axis only, so a block never
  straddles two rows. An array of shape ``(..., n)`` has ``ceil(n / block_size)`` blocks per row;
  a short last block is padded with zeros (which change no maximum) and the padding is never
  stored. Codes keep the leading axes (``(..., n)`` for 8 bits, ``(..., ceil(n / 2))`` for 4
  bits) and so do the scales (``(..., ceil(n / block_size))``): when a parameter is sharded
  along an earlier axis, its codes and scales shard the same way and no block crosses a shard.
  Sharding the last axis is block-local too when each shard's length is a multiple of
  ``block_size``.
* ``"flat"``: blocks run over the flattened (C-order) array, as bitsandbytes and torchao do.
  Codes are ``shape`` (8 bits) or ``(ceil(size / 2),)`` (4 bits), scales ``(ceil(size /
  block_size),)``. A block may straddle rows and so shards. When the last axis is a multiple of
  ``block_size`` the two layouts give the same blocks, codes and scales.

Rounding (``BlockCodec.convention``) differs between the libraries, and each is reproduced:

* ``"nearest"`` (rmsjax): the code whose value is nearest to :math:`x_i / s_b` in exact
  arithmetic; an exact tie goes to the larger code. The scale is the block's absolute maximum
  (NaN if the block holds a NaN, so a NaN stays visible after decoding); an all-zero block has
  scale 0 and decodes to zeros.
* ``"bitsandbytes"``: bitsandbytes 0.50's CPU kernel. It normalises by multiplying with the
  float32 reciprocal of the absolute maximum (``normalize="reciprocal"``; the maximum ignores
  NaN entries), rounds
  :math:`(v + 1) / 2 \cdot 65535 + 1/2` down to one of 65536 grid points of :math:`[-1, 1]` and
  takes the code nearest to that grid point. This is not nearest rounding: the grid is
  :math:`3.05 \cdot 10^{-5}` apart, so codes smaller than that are never produced and zero
  itself is stored as the code nearest to :math:`+1.5 \cdot 10^{-5}` (code 131,
  :math:`+2.1 \cdot 10^{-5} s_b`, in the signed map; code 7, :math:`+1.6 \cdot 10^{-5} s_b`, in
  the unsigned one). An all-zero block gets scale 0 and code 0; a NaN entry gets code 0.
* ``"torchao"``: torchao 0.18. The scale is the absolute maximum clipped below at
  :math:`10^{-12}`; the normalised value :math:`v = x / s` rounds up from code :math:`k` to
  :math:`k + 1` when :math:`v - Q_k \ge (Q_{k+1} - Q_k) / 2` in float32 arithmetic.

Every convention is implemented the same way: the map and the rounding rule are turned once, on
the host, into the float32 breakpoints where the chosen code changes (found by bisection over
the float32 numbers of :math:`[-1, 1]`), and ``encode`` looks the normalised value up in them.
The lookup only compares, so it gives the same codes on every backend (no fused multiply-add or
fast division can move a breakpoint).

Limits: XLA flushes float32 subnormals (below :math:`1.2 \cdot 10^{-38}`) to zero on the CPU,
so a block holding such values is encoded as if they were 0 (the libraries keep them). The
bit-exact agreement with the libraries is verified on the CPU; on a GPU it additionally needs
XLA's float32 division to be correctly rounded.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike, DTypeLike

__all__ = [
    "BlockCodec",
    "QuantizedArray",
    "bitsandbytes_codec",
    "dequantize",
    "dynamic_map",
    "linear_map",
    "moment_codec",
    "quantize",
    "torchao_codec",
]

Layout = Literal["last_axis", "flat"]
Convention = Literal["nearest", "bitsandbytes", "torchao"]
Normalize = Literal["divide", "reciprocal"]
_LAYOUTS = ("last_axis", "flat")
_CONVENTIONS = ("nearest", "bitsandbytes", "torchao")
_NORMALIZE = ("divide", "reciprocal")
_F32 = np.float32
_TORCHAO_SCALE_FLOOR = 1e-12  # torchao clips each block's scale below at this value
_BNB_GRID = 65536  # bitsandbytes' CPU kernel rounds onto this many points of [-1, 1]


# ------------------------------------------------------------------------------------------
# Maps
# ------------------------------------------------------------------------------------------


def _linspace32(start: float, stop: float, num: int) -> np.ndarray:
    """``torch.linspace(start, stop, num)`` in float32, bit for bit.

    torch computes the first half as ``start + step * i`` and the second half as
    ``stop - step * (num - 1 - i)``, each with one rounding (a fused multiply-add), where
    ``step`` is the float32 quotient ``(stop - start) / (num - 1)``. In float64 both the product
    and the sum are exact here, so one rounding to float32 reproduces the fused result.
    """
    lo, hi = _F32(start), _F32(stop)
    if num == 1:
        return np.array([lo], _F32)
    step = np.float64((hi - lo) / _F32(num - 1))
    i = np.arange(num, dtype=np.float64)
    first = np.float64(lo) + step * i
    second = np.float64(hi) - step * (num - 1 - i)
    return np.where(i < num // 2, first, second).astype(_F32)


def dynamic_map(signed: bool = True, *, exponent_bits: int = 7, total_bits: int = 8) -> np.ndarray:
    r"""The dynamic quantization map of bitsandbytes and torchao, as float32, sorted.

    For each exponent :math:`j = 0, \dots, E - 1` (``E = exponent_bits``) the map holds the
    midpoints of an even split of :math:`[0.1, 1]` into :math:`2^{j + T - 1 - E}` parts
    (:math:`2^{j + T - E}` when unsigned; ``T = total_bits``), scaled by :math:`10^{j - E + 1}`
    (and their negatives when signed), plus 0 and 1: a wide range (:math:`5.5 \cdot 10^{-7}` to
    1 for 8 bits) with about two significant digits everywhere. ``dynamic_map(True)`` and
    ``dynamic_map(False)`` are bitsandbytes' ``create_dynamic_map(signed)`` (256 values, the
    signed map from :math:`-0.99297` to 1); ``dynamic_map(True, exponent_bits=3,
    total_bits=4)`` is torchao's 16-value map for 4-bit first moments. The float32 rounding of
    every step is the libraries' (``torch.linspace`` and float32 products), so the values are
    bit-identical to theirs.

    Args:
      signed: include the negative values (first moments) or not (second moments).
      exponent_bits: ``E``, at least 1 and at most ``total_bits - 1``.
      total_bits: ``T``, 4 or 8; the map has :math:`2^T` values.

    Differences: bitsandbytes pads a map shorter than 256 entries with zeros; this function
    never pads (the length is :math:`2^T` whenever the arguments are valid).
    """
    if total_bits not in (4, 8):
        raise ValueError(f"`total_bits` must be 4 or 8, got {total_bits!r}.")
    if not (isinstance(exponent_bits, int) and 1 <= exponent_bits <= total_bits - 1):
        raise ValueError(
            f"`exponent_bits` must be an integer in [1, {total_bits - 1}] for "
            f"total_bits={total_bits}, got {exponent_bits!r}."
        )
    non_sign = total_bits - 1
    values: list[np.ndarray] = [np.array([0.0, 1.0], _F32)]
    parts = [
        2 ** (j + non_sign - exponent_bits + (0 if signed else 1)) for j in range(exponent_bits)
    ]
    extra = 2 ** (non_sign - exponent_bits) - 1
    for j, n in [*enumerate(parts), *([(exponent_bits - 1, extra)] if extra > 0 else [])]:
        bounds = _linspace32(0.1, 1.0, n + 1)
        means = (bounds[:-1] + bounds[1:]) / _F32(2)
        magnitude = _F32(10.0 ** (j - exponent_bits + 1))
        values.append(magnitude * means)
        if signed:
            values.append(-magnitude * means)
    out = np.sort(np.concatenate(values).astype(_F32))
    if out.size != 2**total_bits:
        raise ValueError(
            f"exponent_bits={exponent_bits}, total_bits={total_bits}, signed={signed} gives "
            f"{out.size} values, not {2**total_bits}; bitsandbytes pads such a map with zeros, "
            "which this function does not. Use more exponent bits."
        )
    return out


def linear_map(levels: int, *, signed: bool = False, zero: bool = True) -> np.ndarray:
    r"""An evenly spaced map of ``levels`` float32 values ending at 1.

    ``zero=True``: :math:`k / (L - 1)` for :math:`k = 0, \dots, L - 1` (from :math:`-1` when
    ``signed``: :math:`-1 + 2k / (L - 1)`). ``zero=False``: :math:`k / L` for
    :math:`k = 1, \dots, L` (unsigned only). ``linear_map(16, zero=False)`` is torchao's map for
    4-bit second moments: without a zero code a small second moment is never stored as 0, so
    :math:`1 / \sqrt{\hat v}` never blows up (Li et al., Memory Efficient Optimizers with 4-bit
    States, 2023). ``levels`` must be 16 or 256.
    """
    if levels not in (16, 256):
        raise ValueError(f"`levels` must be 16 or 256, got {levels!r}.")
    if not zero:
        if signed:
            raise ValueError("`zero=False` needs `signed=False`: a signed linear map holds 0.")
        return (np.arange(1, levels + 1, dtype=np.float64) / levels).astype(_F32)
    k = np.arange(levels, dtype=np.float64)
    if signed:
        return (-1.0 + 2.0 * k / (levels - 1)).astype(_F32)
    return (k / (levels - 1)).astype(_F32)


# ------------------------------------------------------------------------------------------
# Rounding rules, turned into breakpoints on the host
# ------------------------------------------------------------------------------------------


def _ordinal(v: np.ndarray) -> np.ndarray:
    """Float32 values as integers in the same order (both zeros map to 0)."""
    bits = np.asarray(v, _F32).view(np.int32).astype(np.int64)
    return np.where(bits >= 0, bits, -(bits & 0x7FFFFFFF))


def _from_ordinal(o: np.ndarray) -> np.ndarray:
    o = np.asarray(o, np.int64)
    bits = np.where(o >= 0, o, (-o) | 0x80000000).astype(np.uint32)
    return bits.view(_F32)


def _nearest_rule(qmap: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    mids = (qmap[:-1].astype(np.float64) + qmap[1:].astype(np.float64)) / 2  # exact in float64
    return lambda v: np.searchsorted(mids, v.astype(np.float64), side="right")


def _torchao_rule(qmap: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    top = qmap.size - 1

    def rule(v: np.ndarray) -> np.ndarray:
        down = np.clip(np.searchsorted(qmap, v, side="right") - 1, 0, top)
        up = np.minimum(down + 1, top)
        residual = v - qmap[down]  # float32 arithmetic, as torch does it
        half_gap = (qmap[up] - qmap[down]) * _F32(0.5)
        return np.where(residual >= half_gap, up, down)

    return rule


def _bitsandbytes_rule(qmap: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    # The kernel's table: grid point g_i = -1 + 2i / 65535 (float32) takes the number of
    # float32 midpoints 0.5 * (Q_k + Q_{k+1}) below it.
    mids = _F32(0.5) * (qmap[:-1] + qmap[1:])
    i = np.arange(_BNB_GRID).astype(_F32)
    grid = _F32(-1.0) + (_F32(2.0) * i) / _F32(_BNB_GRID - 1)
    table = np.searchsorted(mids, grid, side="left")

    def rule(v: np.ndarray) -> np.ndarray:
        v = np.clip(v.astype(_F32), _F32(-1), _F32(1))
        t = ((v + _F32(1)) * _F32(0.5)) * _F32(_BNB_GRID - 1) + _F32(0.5)  # each step float32
        return table[t.astype(np.int64)]

    return rule


_RULES = {"nearest": _nearest_rule, "torchao": _torchao_rule, "bitsandbytes": _bitsandbytes_rule}


@functools.lru_cache(maxsize=64)
def _breakpoints(qmap: tuple[float, ...], convention: str) -> tuple[np.ndarray, np.ndarray]:
    """``(points, codes)``: the code of a normalised value v is ``codes[#(points <= v)]``.

    Every rule is monotone in v, so its step function over the float32 numbers of [-1, 1] is
    pinned down by the places where it changes; bisection over the float32 ordinals finds each
    of them exactly (at most 255 changes, 31 halvings each).
    """
    q = np.asarray(qmap, _F32)
    rule = _RULES[convention](q)
    code = lambda o: rule(_from_ordinal(o)).astype(np.int64)
    lo = np.array([_ordinal(np.array(-1.0, _F32))], np.int64)
    hi = np.array([_ordinal(np.array(1.0, _F32))], np.int64)
    first = code(lo)
    c_lo, c_hi = first, code(hi)
    points: list[np.ndarray] = []
    codes: list[np.ndarray] = []
    while lo.size:
        changing = c_lo != c_hi
        lo, hi, c_lo, c_hi = lo[changing], hi[changing], c_lo[changing], c_hi[changing]
        found = hi - lo == 1
        points.append(hi[found])
        codes.append(c_hi[found])
        lo, hi, c_lo, c_hi = lo[~found], hi[~found], c_lo[~found], c_hi[~found]
        mid = (lo + hi) // 2
        c_mid = code(mid)
        lo, hi = np.concatenate([lo, mid]), np.concatenate([mid, hi])
        c_lo, c_hi = np.concatenate([c_lo, c_mid]), np.concatenate([c_mid, c_hi])
    where = np.concatenate(points)
    order = np.argsort(where)
    table = np.concatenate([first, np.concatenate(codes)[order]]).astype(np.uint8)
    return _from_ordinal(where[order]), table


def _lookup(qmap: tuple[float, ...], convention: str, v: jax.Array) -> jax.Array:
    """The codes of normalised values ``v``: ``table[#(points <= v)]``, by a branchless binary
    search of fixed depth (8 gathers from a 256-entry constant, elementwise in ``v``)."""
    points, table = _breakpoints(qmap, convention)
    padded = np.full(256, np.inf, _F32)
    padded[: points.size] = points
    padded_table = np.zeros(257, np.uint8)
    padded_table[: table.size] = table
    count = jnp.zeros(v.shape, jnp.int32)
    step = 128
    while step:
        probe = jnp.asarray(padded)[count + (step - 1)]
        count = jnp.where(probe <= v, count + step, count)
        step //= 2
    return jnp.asarray(padded_table)[count]


# ------------------------------------------------------------------------------------------
# The codec
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BlockCodec:
    r"""How one array of optimizer state is stored in 4 or 8 bits (see the module docstring).

    A frozen, hashable value: it can be a static argument of ``jax.jit`` and a pytree's static
    metadata.

    Attributes:
      qmap: the map :math:`Q`, 16 or 256 float32 values (as Python floats), strictly increasing,
        within [-1, 1]. 16 values give 4-bit codes (two per byte), 256 give 8-bit codes.
      block_size: entries per scale, an integer >= 1 (even for 4-bit codes in the flat layout).
      layout: ``"last_axis"`` (blocks never leave a row: shard-safe) or ``"flat"`` (blocks over
        the flattened array, as bitsandbytes and torchao).
      convention: ``"nearest"``, ``"bitsandbytes"`` or ``"torchao"``: the scale, the
        normalisation and the rounding of that library (module docstring).
      min_size: arrays with fewer entries are better kept in float32 (see :meth:`applies_to`);
        an integer >= 0.
      whole_blocks: if true, :meth:`applies_to` also requires the size to be a multiple of
        ``block_size`` (torchao's rule).
      normalize: ``"divide"`` computes :math:`v = x / s`; ``"reciprocal"`` computes
        :math:`v = x \cdot \mathrm{fl}(1 / s)` as bitsandbytes' CPU kernel does (one more
        rounding: about one code in a thousand differs from ``"divide"``).

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
        if self.convention not in _CONVENTIONS:
            raise ValueError(
                f"`convention` must be one of {_CONVENTIONS}, got {self.convention!r}."
            )
        if self.bits == 4 and self.layout == "flat" and self.block_size % 2:
            raise ValueError(
                f"`block_size` must be even for 4-bit codes in the flat layout (two codes share "
                f"a byte), got {self.block_size}."
            )
        if self.normalize not in _NORMALIZE:
            raise ValueError(f"`normalize` must be one of {_NORMALIZE}, got {self.normalize!r}.")
        if not (isinstance(self.min_size, int) and self.min_size >= 0):
            raise ValueError(f"`min_size` must be an integer >= 0, got {self.min_size!r}.")

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

    # -- encode / decode -------------------------------------------------------------------

    def encode(self, x: ArrayLike) -> tuple[jax.Array, jax.Array]:
        r"""``(codes, scales)`` of a real array ``x`` (any shape, any float dtype).

        ``x`` is read in float32. ``codes`` is uint8 with :meth:`code_shape` (two 4-bit codes
        per byte, the even-indexed entry in the high nibble, as torchao packs them); ``scales``
        is float32 with :meth:`scale_shape`. Pure and elementwise per block: jit, vmap and
        sharding apply.
        """
        x = jnp.asarray(x)
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(
                f"BlockCodec.encode needs a real floating-point array, got dtype {x.dtype}. "
                "Complex state is not quantized (store its real and imaginary parts apart)."
            )
        return _encode(self, x)

    def _encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        shape = x.shape
        blocks = self._blocks(x.astype(jnp.float32))
        mag = jnp.abs(blocks)
        nan = jnp.isnan(mag)
        # The maximum over the non-NaN entries; XLA's reductions need not propagate NaN, so a
        # NaN is put back explicitly (bitsandbytes' maximum skips NaN entries, the others not).
        scales = jnp.max(jnp.where(nan, jnp.float32(0.0), mag), axis=-1)
        if self.convention != "bitsandbytes":
            scales = jnp.where(jnp.any(nan, axis=-1), jnp.float32(jnp.nan), scales)
        if self.convention == "torchao":
            scales = jnp.maximum(scales, jnp.float32(_TORCHAO_SCALE_FLOOR))
        if self.normalize == "reciprocal":
            v = blocks * (jnp.float32(1.0) / scales)[..., None]
        else:
            # XLA rewrites a division by a broadcast into a multiplication by the reciprocal
            # (one more rounding, which moves about one code in a thousand); the barrier keeps
            # the true, correctly rounded division.
            divisor = jnp.where(scales == 0, jnp.float32(1.0), scales)[..., None]
            v = blocks / lax.optimization_barrier(jnp.broadcast_to(divisor, blocks.shape))
        # A NaN normalised value takes the code of -1 (bitsandbytes clamps NaN to -1; torchao's
        # comparisons all fail, giving code 0); under "nearest" its block's scale is NaN anyway.
        v = jnp.where(jnp.isnan(v), jnp.float32(-1.0), v)
        codes = _lookup(self.qmap, self.convention, v)
        if self.convention == "bitsandbytes":
            codes = jnp.where((scales == 0)[..., None], jnp.uint8(0), codes)
        return self._pack(codes, shape), scales

    def _pack(self, codes: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        lead, n = self._rows(shape)
        codes = codes.reshape(*lead, -1)[..., :n]
        if self.bits == 8:
            return codes.reshape(shape)
        if n % 2:
            codes = jnp.pad(codes, [(0, 0)] * len(lead) + [(0, 1)])
        return (codes[..., 0::2] << 4) | codes[..., 1::2]

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
        values = jnp.asarray(np.asarray(self.qmap, _F32))[codes.astype(jnp.int32)]
        blocks = self._blocks(values.reshape(*lead, n)) * scales[..., None]
        flat = blocks.reshape(*lead, -1)[..., :n]
        return flat.reshape(shape).astype(dtype)


# One compiled program per codec, shape and dtype (inside an outer jit these simply inline).
_encode = jax.jit(BlockCodec._encode, static_argnums=0)
_decode = jax.jit(BlockCodec._decode, static_argnums=(0, 3, 4))


def moment_codec(bits: int = 8, *, signed: bool, block_size: int | None = None) -> BlockCodec:
    r"""rmsjax's own codec for a first (``signed=True``) or second (``signed=False``) moment.

    8 bits: :func:`dynamic_map` (signed or unsigned), blocks of 256. 4 bits: the signed 4-bit
    dynamic map for first moments, torchao's zero-free :func:`linear_map` for second moments,
    blocks of 128. In the signed maps the most negative value is -1 (instead of -0.99297 for 8
    bits and -0.8875 for 4 bits), so that a block whose largest entry is negative stores it
    exactly, as it does a positive one. Always the shard-safe ``"last_axis"`` layout and exact
    ``"nearest"`` rounding (zero is stored exactly in the signed maps); ``min_size`` 4096 like
    both libraries.

    Args:
      bits: 4 or 8.
      signed: whether the state can be negative.
      block_size: entries per scale (>= 1); default 256 (8 bits) or 128 (4 bits).

    Differences: bitsandbytes and torchao block the flattened tensor (a block can straddle rows
    and shards), round differently (:func:`bitsandbytes_codec`, :func:`torchao_codec`) and
    store a block's largest negative entry 0.7% (8 bits) or 11% (4 bits) too small.
    """
    if bits not in (4, 8):
        raise ValueError(f"`bits` must be 4 or 8, got {bits!r}.")
    if not signed:
        qmap = dynamic_map(False) if bits == 8 else linear_map(16, zero=False)
    else:
        qmap = dynamic_map(True, exponent_bits=7 if bits == 8 else 3, total_bits=bits)
        qmap[0] = -1.0  # the block's most negative entry is stored exactly, like its maximum
    block = (256 if bits == 8 else 128) if block_size is None else block_size
    return BlockCodec(qmap=tuple(qmap.tolist()), block_size=block)


def bitsandbytes_codec(*, signed: bool) -> BlockCodec:
    """bitsandbytes 0.50's 8-bit block-wise state: ``Adam8bit`` / ``AdamW8bit`` /
    ``RMSprop8bit`` on the CPU.

    ``create_dynamic_map(signed)`` (``state1`` signed, ``state2`` unsigned), blocks of 256 over
    the flattened tensor (the last block may be short), the CPU kernel's rounding
    (``convention="bitsandbytes"``, see the module docstring), and float32 state below
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
    if bits == 8:
        qmap, block = dynamic_map(signed), 256
    elif bits == 4:
        qmap = dynamic_map(True, exponent_bits=3, total_bits=4) if signed else None
        qmap, block = (linear_map(16, zero=False) if qmap is None else qmap), 128
    else:
        raise ValueError(f"`bits` must be 4 or 8, got {bits!r}.")
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
    data_fields=["codes", "scales"],
    meta_fields=["codec", "shape", "dtype"],
)
@dataclasses.dataclass(frozen=True)
class QuantizedArray:
    """An array stored by a :class:`BlockCodec`: a pytree with two array leaves.

    ``codes`` (uint8) and ``scales`` (float32) are the leaves (they shard, checkpoint and
    donate like any state); ``codec``, ``shape`` and ``dtype`` (of the decoded array) are static
    metadata. ``dequantize(q)`` gives the array back.
    """

    codes: Any
    scales: Any
    codec: BlockCodec
    shape: tuple[int, ...]
    dtype: Any

    @property
    def size(self) -> int:
        return math.prod(self.shape)


def quantize(x: ArrayLike, codec: BlockCodec) -> QuantizedArray:
    """``x`` encoded by ``codec``, its shape and dtype recorded (:meth:`BlockCodec.encode`)."""
    x = jnp.asarray(x)
    codes, scales = codec.encode(x)
    return QuantizedArray(codes, scales, codec, tuple(x.shape), jnp.dtype(x.dtype))


def dequantize(q: QuantizedArray, dtype: DTypeLike | None = None) -> jax.Array:
    """The decoded array of ``q``, in ``dtype`` (default: the dtype it was quantized from)."""
    return q.codec.decode(q.codes, q.scales, q.shape, q.dtype if dtype is None else dtype)
