r"""How a moment is stored: a float dtype, a float dtype with stochastic rounding, or 8/4 bits.

Every per-parameter state array of rmsjax (a *moment*: ``mu``, ``nu``, ``trace``,
``sum_of_squares``, ...) is built by :func:`rmsjax.tree.state_like` and updated by
:func:`rmsjax.tree.map_rule`. Both take a *storage* choice per moment, which the transformations
expose as a keyword (``mu_dtype``, ``nu_dtype``, ``accumulator_dtype``, ...). A choice is

* ``None``: the default dtype policy (the parameter's float dtype; float32 for
  float16/bfloat16 parameters unless ``promote_half=False``);
* a float dtype (``jnp.bfloat16``): the moment is an array of that dtype, as in optax;
* :func:`stochastic_rounding` ``(jnp.bfloat16)``: the moment is computed in float32 and stored
  in bfloat16/float16, rounded up or down at random so that the stored value is unbiased;
* :func:`quantized` ``(bits=8)`` or ``(bits=4)``: the moment is stored block-wise in 8 or 4
  bits with one float32 scale per block (:mod:`rmsjax.quantization`).

The update rules never see the storage: ``map_rule`` decodes each stored moment to a plain
array before calling the rule and encodes the rule's new value afterwards. A stored moment is a
:class:`StoredArray`, a pytree node whose leaves are ordinary arrays (uint8 codes, float32
scales, bfloat16 values, uint32 PRNG keys), so ``jit``, ``vmap``, buffer donation, optax's
wrappers, checkpointing and :func:`rmsjax.state_sharding` handle it like any other state.

Memory per parameter entry (state bytes, scales and keys included; float32 is 4 bytes):

=====================================  ===========================================
storage                                bytes per entry of one moment
=====================================  ===========================================
float32 (default)                      4
bfloat16 / float16, with or without    2 (stochastic rounding adds one 8-byte key
stochastic rounding                    per array)
``quantized(bits=8)``                  1 + 4/256 = 1.016 (codes + one scale per 256)
``quantized(bits=4)``                  0.5 + 4/128 = 0.531 (two codes per byte)
=====================================  ===========================================

Adam's two moments take 8 bytes per parameter in float32, 2.03 at 8 bits and 1.06 at 4 bits.
"""

from __future__ import annotations

import dataclasses
import functools
import zlib
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike

from rmsjax.quantization import BlockCodec, QuantizedArray, moment_codec
from rmsjax.stochastic import stochastic_round
from rmsjax.validation import check_float_dtype, display_name

__all__ = [
    "KernelView",
    "Quantized",
    "StochasticRounding",
    "Storage",
    "StoredArray",
    "check_storage",
    "decode",
    "encode",
    "is_stored",
    "plain_dtype",
    "quantized",
    "stochastic_rounding",
    "store",
]

_ROUNDED = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def _is_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class Quantized:
    """Block-wise 8- or 4-bit storage of a moment: made by :func:`quantized` (see there).

    A frozen, hashable value (it is static metadata of the state's pytree). ``codec``, when
    given, is used for every moment it is applied to; otherwise the codec is
    :func:`rmsjax.quantization.moment_codec` ``(bits, signed=..., block_size=...)`` with
    ``min_size``, signed or not according to the moment.
    """

    bits: int = 8
    block_size: int | None = None
    min_size: int = 4096
    codec: BlockCodec | None = None

    def __post_init__(self) -> None:
        if not _is_int(self.bits) or self.bits not in (4, 8):
            raise ValueError(f"`bits` must be 4 or 8, got {self.bits!r}.")
        if self.block_size is not None and not (_is_int(self.block_size) and self.block_size >= 1):
            raise ValueError(
                f"`block_size` must be None (256 for 8 bits, 128 for 4) or an integer >= 1, "
                f"got {self.block_size!r}."
            )
        if not (_is_int(self.min_size) and self.min_size >= 0):
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

    def codec_for(self, signed: bool) -> BlockCodec:
        """The codec of a moment that can be negative (``signed``) or not."""
        return self.codec if self.codec is not None else _moment_codec(self, signed)


@functools.lru_cache(maxsize=64)
def _moment_codec(spec: Quantized, signed: bool) -> BlockCodec:
    codec = moment_codec(spec.bits, signed=signed, block_size=spec.block_size)
    return dataclasses.replace(codec, min_size=spec.min_size)


@dataclasses.dataclass(frozen=True)
class StochasticRounding:
    """bfloat16/float16 storage with stochastic rounding: made by :func:`stochastic_rounding`."""

    dtype: Any = jnp.bfloat16
    seed: int = 0

    def __post_init__(self) -> None:
        try:
            dtype = jnp.dtype(self.dtype)
        except TypeError:
            dtype = None
        if dtype not in _ROUNDED:
            raise ValueError(
                f"`dtype` must be jnp.bfloat16 or jnp.float16 (the dtypes stochastic rounding "
                f"targets), got {self.dtype!r}."
            )
        object.__setattr__(self, "dtype", dtype)
        if not _is_int(self.seed):
            raise TypeError(f"`seed` must be an int, got {self.seed!r}.")


Storage = Quantized | StochasticRounding
"""A storage choice other than a plain dtype: :class:`Quantized` or :class:`StochasticRounding`."""


def quantized(
    bits: int = 8,
    *,
    block_size: int | None = None,
    min_size: int = 4096,
    codec: BlockCodec | None = None,
) -> Quantized:
    r"""Store a moment block-wise in ``bits`` = 8 or 4 bits, with one float32 scale per block.

    Pass it where a transformation takes a moment's dtype:
    ``rmsjax.adamw(1e-3, mu_dtype=rmsjax.quantized(8), nu_dtype=rmsjax.quantized(8))``.
    Each array of at least ``min_size`` entries is split along its LAST axis into blocks of
    ``block_size`` entries (a short last block per row is allowed) and stored as

    .. math::

        s_b = \max_{i \in b} |x_i|, \qquad c_i = \arg\min_k |Q_k - x_i / s_b|, \qquad
        \hat x_i = Q_{c_i}\, s_b,

    uint8 codes :math:`c` and float32 scales :math:`s`. The map :math:`Q` depends on the
    moment: a moment that can be negative (``mu``, ``trace``) uses the signed dynamic map
    (8 bits: 256 values from :math:`-1` to 1, about two significant digits from
    :math:`5.5 \cdot 10^{-7}` up; 4 bits: 16 values); a second moment (``nu``,
    ``sum_of_squares``, AdaDelta's averages, ``nu_max``), which is :math:`\ge 0`, uses the
    unsigned dynamic map at 8 bits and the zero-free linear map :math:`k/16,\ k = 1..16` at 4
    bits, so a positive entry is never stored as 0 (no :math:`g/\sqrt{0}` blow-up). The error of
    an entry is at most half the gap between the two map values around :math:`x_i/s_b`, times
    :math:`s_b` (:func:`rmsjax.quantization.moment_codec`). Each step decodes, updates in
    float32 and re-encodes, so the rounding error does not accumulate beyond one step's.

    Smaller arrays (biases, norms), complex moments and moments of non-float parameters stay
    unquantized in their default dtype (float32 for float32 and half-precision parameters):
    they cost little memory and lose most from rounding. A value beyond the float32 range
    (:math:`+\infty` after an overflow) is stored as the largest float32: a block-wise scale
    cannot hold :math:`\infty` without turning its whole block into NaN. NaN stays NaN (its
    block decodes to NaN).

    Args:
      bits: 8 (blocks of 256, 1.016 bytes per entry) or 4 (blocks of 128, two codes per byte,
        0.531 bytes per entry).
      block_size: entries per scale along the last axis, an integer >= 1; ``None`` for 256
        (8 bits) or 128 (4 bits).
      min_size: arrays with fewer entries stay unquantized; an integer >= 0 (default 4096,
        bitsandbytes' ``min_8bit_size``).
      codec: a :class:`rmsjax.quantization.BlockCodec` to use as is for every moment this is
        applied to (the library presets pass ``bitsandbytes_codec`` / ``torchao_codec``); then
        ``block_size`` and ``min_size`` must keep their defaults and ``bits`` is the codec's.

    Returns:
      A :class:`Quantized` value (frozen, hashable, validated here).

    Differences: optax has no quantized state. bitsandbytes (``Adam8bit``, ...) and torchao
    (``AdamW8bit``, ``AdamW4bit``) block the FLATTENED tensor, so a block can straddle rows and
    shards; rmsjax's blocks never leave a row, so the state of a parameter sharded along a
    leading axis is sharded with it and needs no communication (see
    :func:`rmsjax.state_sharding`). rmsjax rounds to the nearest code and stores a block's
    largest entry exactly whatever its sign (the libraries' signed maps end at -0.99297 / -0.8875);
    bitsandbytes' CPU kernel never stores an exact 0. torchao keeps a tensor in float32 unless
    its size is a multiple of the block size; rmsjax only needs ``min_size``. To reproduce the
    libraries exactly use :mod:`rmsjax.compat.bitsandbytes` and :mod:`rmsjax.compat.torchao`.
    """
    return Quantized(bits=bits, block_size=block_size, min_size=min_size, codec=codec)


def stochastic_rounding(dtype: DTypeLike = jnp.bfloat16, *, seed: int = 0) -> StochasticRounding:
    r"""Store a moment in bfloat16 or float16, rounded stochastically after each update.

    Pass it where a transformation takes a moment's dtype:
    ``rmsjax.adam(1e-3, mu_dtype=rmsjax.stochastic_rounding(), nu_dtype=...)``. The rule
    computes the new moment :math:`x` in float32 from the decoded (exact) stored value, and
    stores :func:`rmsjax.stochastic_round` ``(x)``: one of the two neighbouring ``dtype``
    values, the upper one with probability proportional to the distance from the lower, so
    :math:`E[\mathrm{stored}] = x`. Round-to-nearest bfloat16 stalls a moving average: with
    :math:`\beta_2 = 0.999`, :math:`0.999\,\nu` rounds back to :math:`\nu` (bfloat16 has 8
    significant bits), so :math:`\nu` never decays; stochastic rounding decays it in
    expectation.

    Randomness: every stored array holds its own PRNG key (raw ``uint32`` key data) in the
    state, split at every update (one half rounds, the other is kept); nothing is global, and
    the same seed and gradients give the same state. The initial keys derive from ``seed``,
    the moment's name and the parameter's key path (so ``optax.masked`` or a new layer
    elsewhere in the model does not change them). A leaf whose gradient is
    ``None`` keeps its key. The initial value (``initial_scale``, ...) is rounded to nearest.

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


def check_storage(name: str, value: Any) -> None:
    """A moment's storage argument: ``None``, a floating dtype, or a :data:`Storage` value.

    Raises ``TypeError``/``ValueError`` naming the argument (as the user typed it).
    """
    if value is None or isinstance(value, Quantized | StochasticRounding):
        return
    try:
        check_float_dtype(name, value)
    except TypeError as err:
        raise TypeError(
            f"`{display_name(name)}` must be None, a floating dtype, rmsjax.quantized(...) or "
            f"rmsjax.stochastic_rounding(...), got {value!r}."
        ) from err


def plain_dtype(value: Any) -> DTypeLike | None:
    """The dtype of a storage choice that is a plain dtype; ``None`` for None and specs."""
    return None if value is None or isinstance(value, Quantized | StochasticRounding) else value


# --------------------------------------------------------------------------------------------
# The stored moment
# --------------------------------------------------------------------------------------------


@functools.partial(jax.tree_util.register_dataclass, data_fields=["data"], meta_fields=["storage"])
@dataclasses.dataclass(frozen=True)
class StoredArray:
    """One moment array held by a :data:`Storage`: a pytree node of plain arrays.

    ``data`` holds the arrays (the leaves): a :class:`rmsjax.quantization.QuantizedArray`
    (uint8 ``codes``, float32 ``scales``) for :class:`Quantized`, or a ``(value, key)`` pair
    (the bfloat16/float16 array and its uint32 PRNG key data) for
    :class:`StochasticRounding`. ``storage`` is static metadata. :meth:`decode` gives the
    moment as a plain array (float32, or float64 for float64 parameters).

    It deliberately has no ``shape`` or ``dtype``: code that treats state leaves as arrays of
    the parameter's shape must not take it for one.
    """

    data: Any
    storage: Storage

    def decode(self) -> jax.Array:
        """The moment as a plain array (what the update rules see)."""
        return decode(self)

    def kernel_view(self, shape: tuple[int, ...]) -> KernelView | str:
        """The arrays and codec the native kernel reads and writes for this moment of a
        parameter of ``shape``, or why this storage has no such view (the moment then stays on
        the pure-JAX path). Whether the kernel runs the codec is the kernel's business."""
        if not isinstance(self.data, QuantizedArray):
            return "stochastically rounded state (the kernel has float32 and 8-bit state)"
        q = self.data
        if tuple(q.shape) != tuple(shape) or q.dtype != np.float32:
            return f"8-bit state of shape {q.shape} and dtype {q.dtype} for a parameter of {shape}"
        return KernelView((q.codes, q.scales), q.codec)

    def with_arrays(self, arrays: tuple[Any, ...]) -> StoredArray:
        """This moment holding ``arrays`` (new values of :meth:`kernel_view`'s ``arrays``)."""
        q = self.data
        codes, scales = arrays
        return StoredArray(QuantizedArray(codes, scales, q.codec, q.shape, q.dtype), self.storage)


class KernelView(NamedTuple):
    """What the native kernel reads and writes of a stored moment (see
    :meth:`StoredArray.kernel_view`): its arrays in operand order and its block codec."""

    arrays: tuple[Any, ...]
    codec: BlockCodec


def is_stored(x: Any) -> bool:
    """True for a :class:`StoredArray` (an ``is_leaf`` for ``jax.tree`` functions)."""
    return isinstance(x, StoredArray)


def _salt(name: str) -> int:
    return zlib.crc32(name.encode()) & 0x7FFFFFFF


def store(array: jax.Array, spec: Storage, *, signed: bool, salt: str = "") -> Any:
    """``array`` (a freshly built moment, float32 or wider) held as ``spec`` says.

    Returns a :class:`StoredArray`, or ``array`` itself where the storage does not apply
    (complex moments, and arrays smaller than the codec's minimum for :class:`Quantized`).
    ``signed`` says whether the moment can be negative (it picks the map). ``salt`` (the
    moment's name and the parameter's key path, e.g. ``"nu['w']"``) makes the initial PRNG
    keys of :class:`StochasticRounding` differ between arrays: the key is
    ``fold_in(PRNGKey(seed), crc32(salt))``.
    """
    if not jnp.issubdtype(array.dtype, jnp.floating):
        return array
    if isinstance(spec, StochasticRounding):
        key = jax.random.fold_in(jax.random.PRNGKey(spec.seed), _salt(salt))
        return StoredArray((array.astype(spec.dtype), key), spec)
    codec = spec.codec_for(signed)
    if not codec.applies_to(array.shape):
        return array
    codes, scales = codec.encode(_finite(array))
    # An all-zero moment starts as zero codes and zero scales, as the libraries create their
    # state: it decodes to exactly 0 under every convention (torchao's encoder would give a
    # zero block the scale 1e-12, and its zero-free 4-bit map would decode it to 6.25e-14).
    empty = jnp.all(array == 0)
    codes = jnp.where(empty, jnp.zeros_like(codes), codes)
    scales = jnp.where(empty, jnp.zeros_like(scales), scales)
    return StoredArray(QuantizedArray(codes, scales, codec, tuple(array.shape), array.dtype), spec)


def _finite(x: jax.Array) -> jax.Array:
    big = jnp.finfo(jnp.float32).max
    return jnp.clip(x.astype(jnp.float32), -big, big)  # NaN stays NaN


def decode(stored: StoredArray) -> jax.Array:
    """The plain array a :class:`StoredArray` holds (float32 for stochastic rounding; the
    dtype recorded at :func:`store` for quantized moments)."""
    if isinstance(stored.storage, StochasticRounding):
        value, _ = stored.data
        return value.astype(jnp.float32)
    q = stored.data
    return q.codec.decode(q.codes, q.scales, q.shape, q.dtype)


def encode(x: jax.Array, old: StoredArray) -> StoredArray:
    """The new value ``x`` of a moment, held like ``old`` (the same storage, shape and codec;
    for stochastic rounding, ``old``'s key is split: one half rounds ``x``, one is kept)."""
    if isinstance(old.storage, StochasticRounding):
        value, key = old.data
        use, keep = jax.random.split(key)
        rounded = stochastic_round(jnp.real(x).astype(jnp.float32), use, value.dtype)
        return StoredArray((rounded, keep), old.storage)
    q = old.data
    codes, scales = q.codec.encode(_finite(jnp.real(x)))
    return StoredArray(QuantizedArray(codes, scales, q.codec, q.shape, q.dtype), old.storage)
