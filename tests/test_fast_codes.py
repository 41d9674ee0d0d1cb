"""The pure-JAX codecs' fast paths against a NumPy statement of the same codes.

``BlockCodec.encode`` (two passes: ``scales_of``, then ``codes_of`` with one table lookup per
entry, :mod:`rmsjax.quantization.fast`) must give exactly the codes and scales of the
definition: the block scale, ``v = x / s`` correctly rounded (float64 division of float32
values, rounded once to float32, is the correctly rounded float32 quotient), a NaN ``v`` read as
-1, and the code ``table[#(points <= v)]`` over the float32 breakpoints of the rounding rule
(:func:`rmsjax.quantization.rounding.breakpoints`, found by bisection on the host). Inputs: every
float32 within a few ulps of every breakpoint, through scales whose float32 reciprocal is and is
not exact (the fast path buckets ``x * fl(1/s)`` and compares the exact quotient), scales at the
ends of the float32 range, special values, and random arrays (hypothesis).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rmsjax.quantization import BlockCodec, bitsandbytes_codec, moment_codec, torchao_codec
from rmsjax.quantization.fast import DRIFT, bucket_table
from rmsjax.quantization.rounding import breakpoints

F32 = np.float32
# The codecs that round to the nearest code (rmsjax's 4-bit default rounds stochastically: its
# maps with the nearest rounding stand for it here, and STOCHASTIC below for the default).
CODECS = {
    **{
        f"moment8-{'signed' if signed else 'unsigned'}": moment_codec(8, signed=signed)
        for signed in (True, False)
    },
    **{
        f"moment4-nearest-{'signed' if signed else 'unsigned'}": dataclasses.replace(
            moment_codec(4, signed=signed), rounding="nearest"
        )
        for signed in (True, False)
    },
    **{f"bitsandbytes-{s}": bitsandbytes_codec(signed=s == "signed") for s in ("signed", "u")},
    **{
        f"torchao{bits}-{'signed' if signed else 'unsigned'}": torchao_codec(bits, signed=signed)
        for bits in (8, 4)
        for signed in (True, False)
    },
}
SCALES = (1.0, 3.0, 0.7, 1e-3, 123.456, 1.5 * 2.0**126, 1.5 * 2.0**127, 1.2e-38, 7e-38)


def reference_stochastic_codes(codec: BlockCodec, v: np.ndarray, bits: np.ndarray) -> np.ndarray:
    """The stochastic rounding's code of each normalised ``v`` (its definition in
    :class:`BlockCodec`): ``k`` with ``Q_k <= v < Q_k+1`` (``v`` clipped to the map, ``k`` at
    most the second-to-last code), one up when ``u * (Q_k+1 - Q_k) < v - Q_k`` in float32, with
    ``u = (bits >> 8) * 2^-24``."""
    q = np.asarray(codec.qmap, F32)
    v = np.clip(v, q[0], q[-1]).astype(F32)
    k = np.minimum(np.searchsorted(q, v, side="right") - 1, q.size - 2)
    u = (bits >> np.uint32(8)).astype(F32) * F32(2.0**-24)
    up = (u * (q[1:] - q[:-1])[k]).astype(F32) < (v - q[k]).astype(F32)
    return (k + up).astype(np.uint8)


def reference_encode(
    codec: BlockCodec, x: np.ndarray, random_bits: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Codes and scales of a 2-D float32 ``x`` whose rows are whole blocks (the definition),
    with ``random_bits`` (of ``x``'s shape) for a stochastically rounding codec.

    XLA flushes float32 subnormals to zero on the CPU: the reference does the same first.
    """
    x = np.where(np.abs(x) < np.finfo(F32).tiny, F32(0), x).astype(F32)
    rows, n = x.shape
    blocks = x.reshape(rows, n // codec.block_size, codec.block_size)
    nan = np.isnan(blocks)
    scales = np.max(np.where(nan, F32(0), np.abs(blocks)), axis=-1)
    if codec.convention != "bitsandbytes":
        scales = np.where(np.any(nan, axis=-1), F32(np.nan), scales)
    if codec.convention == "torchao":
        scales = np.maximum(scales, F32(1e-12))
    if codec.scale == "power_of_two":  # the smallest power of two >= the maximum
        with np.errstate(all="ignore"):
            exponent = np.clip(np.ceil(np.log2(scales.astype(np.float64))), -126, 127)
        finite = (scales > 0) & (scales < np.inf)
        scales = np.where(finite, np.exp2(exponent), scales).astype(F32)
    with np.errstate(all="ignore"):
        if codec.normalize == "reciprocal":
            recip = (F32(1) / scales.astype(F32)).astype(F32)
            recip = np.where(np.abs(recip) < np.finfo(F32).tiny, F32(0), recip)
            v = (blocks * recip[..., None]).astype(F32)
        else:
            divisor = np.where(scales == 0, 1.0, scales.astype(np.float64))
            v = (blocks.astype(np.float64) / divisor[..., None]).astype(F32)
    v = np.where(np.abs(v) < np.finfo(F32).tiny, F32(0), v)
    v = np.where(np.isnan(v), F32(-1), v)
    if random_bits is not None:
        codes = reference_stochastic_codes(codec, v, random_bits.reshape(v.shape))
    else:
        points, table = breakpoints(codec.qmap, codec.convention)
        codes = table[np.searchsorted(points, v, side="right")].astype(np.uint8)
    if codec.convention == "bitsandbytes":
        codes = np.where((scales == 0)[..., None], np.uint8(0), codes)
    codes = codes.reshape(rows, n)
    if codec.bits == 4:
        codes = (codes[:, 0::2] << 4) | codes[:, 1::2]
    return codes.reshape(-1) if codec.layout == "flat" else codes, scales.reshape(-1)


def near_breakpoints(codec: BlockCodec, ulps: int = DRIFT + 2) -> np.ndarray:
    """Every float32 within ``ulps`` of every breakpoint of ``codec``, in [-1, 1]."""
    points, _ = breakpoints(codec.qmap, codec.convention)
    ordinal = points.view(np.int32).astype(np.int64)
    ordinal = np.where(ordinal >= 0, ordinal, -(ordinal & 0x7FFFFFFF))
    near = (ordinal[:, None] + np.arange(-ulps, ulps + 1)).reshape(-1)
    bits = np.where(near >= 0, near, (-near) | 0x80000000).astype(np.uint32)
    v = bits.view(F32)
    return v[np.abs(v) <= 1]


def as_blocks(values: np.ndarray, codec: BlockCodec, scale: float) -> np.ndarray:
    """``values * scale`` (float32) in rows of whole blocks, each block holding ``scale``
    itself so that its scale is ``scale``."""
    b = codec.block_size
    x = (values.astype(np.float64) * scale).astype(F32)
    x = np.where(np.abs(x) <= scale, x, F32(scale))  # rounding must not raise the maximum
    per = b - 1
    pad = (-x.size) % per
    x = np.concatenate([x, np.zeros(pad, F32)]).reshape(-1, per)
    x = np.concatenate([x, np.full((x.shape[0], 1), scale, F32)], axis=1)
    if min(codec.qmap) >= 0:
        x = np.abs(x)
    return x.reshape(-1, 2 * b) if x.shape[0] % 2 == 0 else x.reshape(-1, b)


def check(codec: BlockCodec, x: np.ndarray) -> None:
    want_codes, want_scales = reference_encode(codec, x)
    codes, scales = codec.encode(jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(scales).reshape(-1), want_scales)
    got = np.asarray(codes).reshape(want_codes.shape)
    wrong = np.argwhere(got != want_codes)
    assert wrong.size == 0, f"{len(wrong)} codes differ, first at {wrong[:3].tolist()}"


@pytest.mark.parametrize("name", sorted(CODECS))
def test_codes_near_every_breakpoint_through_every_scale(name: str) -> None:
    codec = CODECS[name]
    assert bucket_table(codec.qmap, codec.convention) is not None  # the fast path is taken
    values = near_breakpoints(codec)
    for scale in SCALES:
        check(codec, as_blocks(values, codec, scale))


@pytest.mark.parametrize("name", sorted(CODECS))
def test_special_values(name: str) -> None:
    codec = CODECS[name]
    rng = np.random.default_rng(3)
    x = rng.normal(size=(16, 256)).astype(F32) * np.exp(rng.normal(size=(16, 1)) * 8).astype(F32)
    x[0, 3] = np.nan
    x[1, 5], x[2, 7] = np.inf, -np.inf
    x[3] = 0.0
    x[4, 9] = 1e-40  # subnormal: 0 on the CPU
    x[5] = 1e-40
    x[6, 0] = -0.0
    x[7] = np.finfo(F32).max
    x[8, 1] = -np.finfo(F32).max
    x[9] = -0.0
    x[10] = np.finfo(F32).tiny
    x[11, :128] = -np.finfo(F32).tiny
    if min(codec.qmap) >= 0:
        x = np.abs(x)
    check(codec, x)


@settings(max_examples=15, deadline=None)
@given(
    name=st.sampled_from(sorted(CODECS)),
    seed=st.integers(0, 2**31 - 1),
    spread=st.floats(0, 30),
)
def test_random_arrays(name: str, seed: int, spread: float) -> None:
    codec = CODECS[name]
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(8, 256)) * np.exp(rng.normal(size=(8, 256)) * spread)
    x = np.clip(x, -np.finfo(F32).max, np.finfo(F32).max).astype(F32)
    if min(codec.qmap) >= 0:
        x = np.abs(x)
    check(codec, x)


@pytest.mark.parametrize("name", sorted(CODECS))
def test_decode_is_the_map_times_the_scale(name: str) -> None:
    codec = CODECS[name]
    n = 2 * codec.block_size
    codes = np.arange(n) % len(codec.qmap)
    packed = codes if codec.bits == 8 else (codes[0::2] << 4) | codes[1::2]
    scales = np.array([3.0, 0.7], F32)[: n // codec.block_size]
    got = codec.decode(jnp.asarray(packed.astype(np.uint8)), jnp.asarray(scales), (n,))
    want = np.asarray(codec.qmap, F32)[codes] * np.repeat(scales, codec.block_size)
    np.testing.assert_array_equal(np.asarray(got), want)


def test_bucket_tables_separate_the_breakpoints() -> None:
    """No bucket holds two breakpoints, and none lies within DRIFT positions of a bucket's end
    (what lets the bucket come from the approximate quotient)."""
    for codec in CODECS.values():
        t = bucket_table(codec.qmap, codec.convention)
        assert t is not None
        has = np.isfinite(t.point)
        points, _ = breakpoints(codec.qmap, codec.convention)
        assert np.array_equal(np.sort(t.point[has]), points)
        starts = ((np.arange(t.low.size) + t.first) << t.shift) - t.offset
        inside = t.point_position[has].astype(np.int64) - starts[has]
        assert np.all(inside > DRIFT) and np.all(inside < (1 << t.shift) - DRIFT)


def test_encode_jits_and_keeps_shapes() -> None:
    codec = moment_codec(8, signed=True)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 300)), jnp.float32)
    codes, scales = jax.jit(codec.encode)(x)
    assert codes.shape == codec.code_shape(x.shape)
    assert scales.shape == codec.scale_shape(x.shape)
    np.testing.assert_array_equal(codes, codec.codes_of(x, codec.scales_of(x)))


STOCHASTIC = {
    f"moment4-{'signed' if signed else 'unsigned'}": moment_codec(4, signed=signed)
    for signed in (True, False)
}


@settings(max_examples=10, deadline=None)
@given(
    name=st.sampled_from(sorted(STOCHASTIC)),
    seed=st.integers(0, 2**31 - 1),
    spread=st.floats(0, 30),
    special=st.booleans(),
)
def test_stochastic_codes_follow_their_definition(
    name: str, seed: int, spread: float, special: bool
) -> None:
    """rmsjax's default 4-bit codecs (power-of-two scales, stochastic rounding) on random
    arrays, values near every map point and special values, against the NumPy definition."""
    codec = STOCHASTIC[name]
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(8, 256)) * np.exp(rng.normal(size=(8, 256)) * spread)
    x = np.clip(x, -np.finfo(F32).max, np.finfo(F32).max).astype(F32)
    near = near_breakpoints(dataclasses.replace(codec, rounding="nearest"))
    x[0, : min(near.size, 256)] = near[:256]  # scale 1 (and 2^k multiples below)
    x[1, :128] = (np.asarray(codec.qmap, F32)[rng.integers(0, 16, 128)] * F32(4.0)).astype(F32)
    if special:
        x[2, 3], x[3, 5], x[4, 7] = np.nan, np.inf, -np.inf
        x[5] = 0.0
        x[6, 9] = 1e-40
        x[7, 1] = -np.finfo(F32).max
    if min(codec.qmap) >= 0:
        x = np.abs(x)
    bits = rng.integers(0, 2**32, size=x.shape, dtype=np.uint64).astype(np.uint32)
    want_codes, want_scales = reference_encode(codec, x, bits)
    codes, scales = codec.encode(jnp.asarray(x), jnp.asarray(bits))
    np.testing.assert_array_equal(np.asarray(scales).reshape(-1), want_scales)
    got = np.asarray(codes).reshape(want_codes.shape)
    wrong = np.argwhere(got != want_codes)
    assert wrong.size == 0, f"{len(wrong)} codes differ, first at {wrong[:3].tolist()}"
