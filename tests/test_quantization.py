"""Block-wise 4/8-bit codecs and stochastic rounding against bitsandbytes 0.50 and torchao 0.18.

The reference values in ``tests/reference/lowbit.npz`` were produced by the real libraries
(``python tests/reference/generate.py --only lowbit``; see its LOWBIT comment): codec vectors
(input, codes, scales, decoded), the libraries' maps, and how often torchao's bfloat16
stochastic rounding rounded each of a set of values up. Codes are compared exactly: every
rounding decision, ties included, is reproduced (the presets turn the library's float32
arithmetic into breakpoints), so the tolerance is zero flipped codes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rmsjax
from rmsjax.quantization import (
    BlockCodec,
    QuantizedArray,
    bitsandbytes_codec,
    dequantize,
    dynamic_map,
    linear_map,
    moment_codec,
    quantize,
    torchao_codec,
)
from rmsjax.stochastic import counter_bits, stochastic_round
from rmsjax.updates import apply_updates_stochastic

ROOT = Path(__file__).resolve().parents[1]
REF = np.load(ROOT / "tests" / "reference" / "lowbit.npz")

# scheme in the npz -> the preset that must reproduce it
SCHEMES = {
    "bnb_signed": bitsandbytes_codec(signed=True),
    "bnb_signed_short": bitsandbytes_codec(signed=True),
    "bnb_unsigned": bitsandbytes_codec(signed=False),
    "bnb_unsigned_short": bitsandbytes_codec(signed=False),
    "torchao8_signed": torchao_codec(8, signed=True),
    "torchao8_unsigned": torchao_codec(8, signed=False),
    "torchao4_signed": torchao_codec(4, signed=True),
    "torchao4_unsigned": torchao_codec(4, signed=False),
}


def vectors(scheme: str) -> tuple[np.ndarray, ...]:
    key = f"codec/{scheme}"
    return tuple(REF[f"{key}/{part}"] for part in ("input", "codes", "scales", "decoded"))


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(np.asarray(a), np.asarray(b), equal_nan=True)


# ------------------------------------------------------------------------------------------
# Maps
# ------------------------------------------------------------------------------------------


def test_maps_are_the_libraries_maps():
    assert same_bits(dynamic_map(True), REF["map/bnb_signed"])
    assert same_bits(dynamic_map(False), REF["map/bnb_unsigned"])
    assert same_bits(dynamic_map(True), REF["map/torchao8_signed"])
    assert same_bits(dynamic_map(False), REF["map/torchao8_unsigned"])
    four = dynamic_map(True, exponent_bits=3, total_bits=4)
    assert same_bits(four, REF["map/torchao4_signed"])
    assert same_bits(four, REF["map/torchao_dynamic4"])
    assert same_bits(linear_map(16, zero=False), REF["map/torchao4_unsigned"])
    # A plain float64 construction (numpy.linspace, no float32 steps) is off in the last bit
    # somewhere: the float32 arithmetic of the libraries matters.
    naive = []
    for j in range(7):
        b = np.linspace(0.1, 1, 2**j + 1)
        naive += list(10.0 ** (j - 6) * (b[:-1] + b[1:]) / 2)
    naive = np.sort(np.array([*naive, *(-np.array(naive)), 0.0, 1.0], np.float32))
    assert not np.array_equal(naive, REF["map/bnb_signed"])


def test_map_arguments_are_checked():
    with pytest.raises(ValueError, match="total_bits"):
        dynamic_map(True, total_bits=6)
    with pytest.raises(ValueError, match="exponent_bits"):
        dynamic_map(True, exponent_bits=8)
    with pytest.raises(ValueError, match="levels"):
        linear_map(10)
    with pytest.raises(ValueError, match="zero=False"):
        linear_map(16, signed=True, zero=False)


# ------------------------------------------------------------------------------------------
# The presets reproduce the libraries' codes, scales and decoded values exactly
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_preset_matches_library_exactly(scheme):
    codec = SCHEMES[scheme]
    x, codes, scales, decoded = vectors(scheme)
    got_codes, got_scales = codec.encode(x)
    flipped = int(np.sum(np.asarray(got_codes) != codes))
    assert flipped == 0, f"{flipped} of {codes.size} codes differ from the library's"
    assert same_bits(np.asarray(got_scales), scales)
    assert same_bits(np.asarray(codec.decode(codes, scales, x.shape)), decoded)
    assert same_bits(np.asarray(codec.decode(got_codes, got_scales, x.shape)), decoded)


def test_vectors_cover_the_hard_cases():
    # The stored inputs hold what the exactness test must get right: tiny and huge blocks,
    # zero blocks, NaN and inf, and values at and next to the midpoints between codes.
    x, codes, scales, _ = vectors("bnb_signed")
    assert np.any(scales == 0) and np.any(np.isinf(scales))
    assert np.any(np.isnan(x)) and np.any((scales > 0) & (scales < 1e-15))
    q = REF["map/bnb_signed"].astype(np.float64)
    mids = ((q[:-1] + q[1:]) / 2).astype(np.float32)
    assert np.isin(mids, x).sum() > 200
    # bitsandbytes' CPU grid rounding: zero is not stored as the zero code (127) but as code
    # 131 (+2.1e-5 of the block maximum); and some small codes are never produced.
    zero_block = np.nonzero(scales == 0)[0][0] * 256
    assert np.all(x[zero_block : zero_block + 256] == 0)
    nonzero_scale_zero_entries = (x == 0) & (np.repeat(scales, 256)[: x.size] > 0)
    assert np.all(codes[nonzero_scale_zero_entries] == 131)
    assert 127 not in codes


def test_wrong_schemes_miss_the_library_by_far():
    """Each preset's choices matter: another block size, map, rounding or layout misses the
    stored vectors on a large share of the entries, while the preset misses none."""
    x, codes, scales, decoded = vectors("bnb_signed")
    bnb = SCHEMES["bnb_signed"]
    share = lambda c: np.mean(np.asarray(c.encode(x)[0]) != codes)
    assert share(BlockCodec(bnb.qmap, 128, "flat", "bitsandbytes")) > 0.05  # block size
    assert share(BlockCodec(bnb.qmap, 256, "flat", "nearest")) > 0.01  # rounding
    assert share(BlockCodec(bnb.qmap, 256, "flat", "torchao")) > 0.01
    linear = BlockCodec(tuple(linear_map(256, signed=True).tolist()), 256, "flat", "bitsandbytes")
    assert share(linear) > 0.3  # map
    finite = np.isfinite(decoded)
    err = lambda c: np.max(
        np.abs(np.asarray(c.decode(*c.encode(x), x.shape))[finite] - decoded[finite])
    )
    assert err(linear) > 1e3 * max(err(bnb), 1e-30)

    x, codes, scales, decoded = vectors("torchao4_unsigned")
    tao = SCHEMES["torchao4_unsigned"]
    with_zero = BlockCodec(tuple(linear_map(16).tolist()), 128, "flat", "torchao")
    got = np.asarray(with_zero.decode(*with_zero.encode(x), x.shape))
    # torchao's zero-free map never decodes a positive block to 0; a map with a zero does.
    assert np.all(decoded[np.isfinite(decoded)] > 0)
    assert np.sum(got == 0) > 100
    rows = BlockCodec(tao.qmap, 128, "last_axis", "torchao")  # x is (64, 64): rows < a block
    assert np.asarray(rows.encode(x)[1]).shape != scales.shape
    assert np.mean(np.asarray(rows.decode(*rows.encode(x), x.shape)) != decoded) > 0.1

    x, codes, _, _ = vectors("torchao8_signed")
    for wrong in (BlockCodec(tuple(dynamic_map(True).tolist()), 256, "flat", "nearest"),):
        assert np.sum(np.asarray(wrong.encode(x)[0]) != codes) > 10  # ties go up in torchao


# ------------------------------------------------------------------------------------------
# rmsjax's own codec: exact nearest rounding, error bounds, layout
# ------------------------------------------------------------------------------------------


def _normalised_error_bound(v: np.ndarray, qmap: np.ndarray) -> np.ndarray:
    """Half the gap between the map values enclosing each v (the nearest-rounding bound)."""
    q = qmap.astype(np.float64)
    k = np.clip(np.searchsorted(q, v, side="right") - 1, 0, q.size - 2)
    inside = (v >= q[0]) & (v <= q[-1])
    gap = np.where(inside, (q[k + 1] - q[k]) / 2, np.maximum(q[0] - v, v - q[-1]))
    return gap


def _numpy_scales(blocks: np.ndarray, scale: str) -> np.ndarray:
    """A block's scale, restated: its absolute maximum, or the smallest power of two >= it."""
    m = np.abs(blocks).max(axis=-1, keepdims=True)
    if scale == "max":
        return m
    return np.where(m > 0, 2.0 ** np.ceil(np.log2(np.where(m > 0, m, 1.0))), 0.0)


@pytest.mark.parametrize(
    ("bits", "signed", "rounding"),
    [(8, True, None), (8, False, None), (4, True, "nearest"), (4, False, "nearest")],
)
def test_nearest_codec_round_trip(bits, signed, rounding):
    codec = moment_codec(bits, signed=signed)
    if rounding is not None:  # the 4-bit first-moment map, rounded to nearest
        codec = dataclasses.replace(codec, rounding=rounding)
    assert codec.rounding == "nearest"
    rng = np.random.default_rng(bits + 2 * signed)
    x = rng.normal(size=(3, 5, 700)) * 10.0 ** rng.uniform(-8, 3, size=(3, 5, 1))
    x = (x if signed else np.abs(x)).astype(np.float32)
    codes, scales = codec.encode(x)
    assert codes.dtype == jnp.uint8 and scales.dtype == jnp.float32
    assert codes.shape == ((3, 5, 700) if bits == 8 else (3, 5, 350))
    assert scales.shape == (3, 5, -(-700 // codec.block_size))
    got = np.asarray(codec.decode(codes, scales, x.shape))
    # Independent restatement: the nearest map value to x / s (float64 argmin), times s.
    q = np.asarray(codec.qmap)
    blocks = np.pad(x.astype(np.float64), [(0, 0), (0, 0), (0, -700 % codec.block_size)])
    blocks = blocks.reshape(3, 5, -1, codec.block_size)
    s = _numpy_scales(blocks, codec.scale)
    v = blocks / s
    # argmin takes the first of two equally near values; rmsjax gives a tie to the larger
    nearest = q[q.size - 1 - np.argmin(np.abs(v[..., None] - q)[..., ::-1], axis=-1)]
    expected = (nearest * s).reshape(3, 5, -1)[..., :700]
    np.testing.assert_allclose(got, expected, rtol=2e-7, atol=0)
    # The error bound: half the local gap of the map, times the block scale.
    bound = _normalised_error_bound(v, q) * s
    err = np.abs(got.astype(np.float64) - x)
    bound = bound.reshape(3, 5, -1)[..., :700]
    assert np.all(err <= bound * (1 + 1e-6) + 1e-45)
    assert np.asarray(scales).max() == _numpy_scales(x, codec.scale).max()


def test_zero_is_exact_in_signed_maps_and_absent_from_the_4bit_second_moment_map():
    x = np.zeros((2, 300), np.float32)
    x[0, :5] = [1.0, -0.5, 0.0, 1e-9, 0.25]
    for bits in (8, 4):
        signed = moment_codec(bits, signed=True)
        noise = None if signed.rounding == "nearest" else counter_bits(x.shape, 1, 2)
        out = np.asarray(signed.decode(*signed.encode(x, noise), x.shape))
        assert out[0, 2] == 0 and np.all(out[1] == 0)
    v = moment_codec(4, signed=False)
    out = np.asarray(v.decode(*v.encode(np.abs(x), counter_bits(x.shape, 3, 4)), x.shape))
    assert out[0, 3] == 2.0**-15 and out[0, 2] == 2.0**-15  # the smallest code: 2^-15 scale
    assert np.all(out[1] == 0)  # an all-zero block has scale 0


def test_nan_stays_visible_under_nearest():
    codec = moment_codec(signed=True)
    x = np.ones((2, 256), np.float32)
    x[0, 7] = np.nan
    out = np.asarray(codec.decode(*codec.encode(x), x.shape))
    assert np.all(np.isnan(out[0])) and np.all(out[1] == 1)


def test_last_axis_blocks_are_row_local_and_flat_blocks_are_not():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(6, 300)).astype(np.float32)
    y = x.copy()
    y[2] *= 1000.0  # change one row only
    rows = moment_codec(signed=True)
    cx, sx = rows.encode(x)
    cy, sy = rows.encode(y)
    others = np.arange(6) != 2
    assert np.array_equal(np.asarray(cx)[others], np.asarray(cy)[others])
    assert np.array_equal(np.asarray(sx)[others], np.asarray(sy)[others])
    # Row by row (vmap) is the same as the whole array: no block crosses a row.
    cv, sv = jax.vmap(rows.encode)(x)
    assert np.array_equal(np.asarray(cv), np.asarray(cx))
    assert np.array_equal(np.asarray(sv), np.asarray(sx))
    # A short last block equals the row padded with zeros (which change no maximum).
    padded = np.pad(x, [(0, 0), (0, 212)])
    cp, sp = rows.encode(padded)
    assert np.array_equal(np.asarray(cp)[:, :300], np.asarray(cx))
    assert np.array_equal(np.asarray(sp), np.asarray(sx))
    # The flat layout blocks across rows: changing row 2 changes its neighbours' codes.
    flat = BlockCodec(rows.qmap, layout="flat")
    fx, _ = flat.encode(x)
    fy, _ = flat.encode(y)
    assert not np.array_equal(np.asarray(fx)[others], np.asarray(fy)[others])
    # With a last axis that is a multiple of the block size, both layouts coincide.
    z = rng.normal(size=(4, 512)).astype(np.float32)
    assert all(
        np.array_equal(np.asarray(a).reshape(-1), np.asarray(b).reshape(-1))
        for a, b in zip(rows.encode(z), flat.encode(z), strict=True)
    )


SHARDED = textwrap.dedent(
    """
    import json, sys
    import jax, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from rmsjax.quantization import BlockCodec, moment_codec
    mesh = jax.make_mesh((4,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
    rows = moment_codec(signed=True)
    flat = BlockCodec(rows.qmap, layout="flat")
    x = jax.device_put(np.ones((8, 96), np.float32), NamedSharding(mesh, P("x", None)))
    out = {}
    for name, codec in (("last_axis", rows), ("flat", flat)):
        text = jax.jit(codec.encode).lower(x).compile().as_text()
        codes, scales = jax.jit(codec.encode)(x)
        out[name] = {
            "collectives": sum(text.count(op) for op in
                               ("all-reduce", "all-gather", "all-to-all", "collective-permute")),
            "scales_spec": str(scales.sharding.spec),
        }
    print(json.dumps(out))
    """
)


def test_last_axis_layout_needs_no_communication_when_sharded():
    env = dict(os.environ)
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run(
        [sys.executable, "-c", SHARDED], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["last_axis"]["collectives"] == 0
    assert "'x'" in out["last_axis"]["scales_spec"]
    # Blocks of 256 over rows of 96 straddle the shards: XLA must communicate.
    assert out["flat"]["collectives"] > 0


def test_power_of_two_maps_are_their_formulas():
    # restated from the definition: code c of the unsigned map is 2^(c - 15); of the signed
    # map -2^-c below 7, 0 at 7 and 2^(c - 15) above
    c = np.arange(16)
    unsigned = 2.0 ** (c - 15.0)
    signed = np.where(c < 7, -(2.0 ** -c.astype(float)), np.where(c == 7, 0.0, 2.0 ** (c - 15.0)))
    assert np.array_equal(rmsjax.quantization.power_of_two_map(False), unsigned)
    assert np.array_equal(rmsjax.quantization.power_of_two_map(True), signed)


def _unpack4(codes: np.ndarray, n: int) -> np.ndarray:
    codes = np.asarray(codes).astype(np.int64)
    return np.stack([codes >> 4, codes & 15], axis=-1).reshape(*codes.shape[:-1], -1)[..., :n]


@pytest.mark.parametrize("signed", [True, False])
def test_default_4bit_codec_is_numpy_stochastic_rounding(signed):
    """Codes equal a NumPy statement of the definition (power-of-two scale, lower neighbour,
    u = (b >> 8) 2^-24, up iff fl(u d) < fl(v - Q_k)), and are unbiased."""
    codec = moment_codec(4, signed=signed)
    assert (codec.rounding, codec.scale, codec.block_size) == ("stochastic", "power_of_two", 128)
    rng = np.random.default_rng(5)
    x = (rng.normal(size=(6, 300)) * 10.0 ** rng.uniform(-4, 2, size=(6, 1))).astype(np.float32)
    x = x if signed else np.abs(x)
    x[0, :3] = [0.0, -0.0 if signed else 0.0, 1e-30]
    bits = counter_bits(x.shape, 123, 7)
    codes, scales = codec.encode(x, bits)
    q = np.asarray(codec.qmap, np.float32)
    blocks = np.pad(x, [(0, 0), (0, -300 % 128)]).reshape(6, -1, 128)
    s = _numpy_scales(blocks.astype(np.float64), "power_of_two").astype(np.float32)
    v = (blocks / s).reshape(6, -1)[:, :300]  # exact: s is a power of two
    v = np.clip(v, q[0], q[-1])  # below 2^-15 a second moment is stored as 2^-15 (no zero)
    k = np.clip(np.searchsorted(q, v, side="right") - 1, 0, 14)
    u = (np.asarray(bits) >> 8).astype(np.float32) * np.float32(2.0**-24)
    up = (u * (q[k + 1] - q[k])).astype(np.float32) < (v - q[k]).astype(np.float32)
    assert np.array_equal(_unpack4(codes, 300), k + up)
    assert np.array_equal(np.asarray(scales), s[..., 0])
    # exact zeros stay exactly zero (first moments); each value decodes to one of its two
    # neighbours
    out = np.asarray(codec.decode(codes, scales, x.shape))
    assert np.all(out[0, :2] == 0) if signed else np.all(out[0, :2] == 2.0**-15 * s[0, 0, 0])
    srep = np.repeat(s[..., 0], 128, axis=-1)[:, :300]
    lo, hi = q[k] * srep, q[k + 1] * srep
    assert np.all((out == lo) | (out == hi))
    # unbiased: the mean of 400 draws is within 5 standard errors of x (within the map's range)
    x = np.clip(x, q[0] * srep, None) if not signed else x
    draws = np.stack(
        [
            np.asarray(codec.decode(*codec.encode(x, counter_bits(x.shape, 9, t)), x.shape))
            for t in range(400)
        ]
    )
    p = np.where(hi > lo, (x - lo) / np.where(hi > lo, hi - lo, 1), 0)
    se = (hi - lo) * np.sqrt(p * (1 - p) / 400) + 1e-3 * (hi - lo) + 1e-30
    assert np.all(np.abs(draws.mean(axis=0) - x) <= 5 * se)


def test_power_of_two_map_rounded_to_nearest_is_exponent_and_leading_mantissa_bit():
    codec = dataclasses.replace(moment_codec(4, signed=False), rounding="nearest")
    rng = np.random.default_rng(6)
    x = np.abs(rng.normal(size=(4, 256)) * 10.0 ** rng.uniform(-9, 3, size=(4, 256)))
    x = x.astype(np.float32)
    codes, scales = codec.encode(x)
    # restated on the float's bits: v = x / s = (1 + f) 2^e, code = clip(e + 15 + [f >= 1/2])
    s = _numpy_scales(x.reshape(4, 2, 128).astype(np.float64), "power_of_two").astype(np.float32)
    v = (x.reshape(4, 2, 128) / s).reshape(4, 256)
    word = v.view(np.uint32).astype(np.int64)
    e = (word >> 23) - 127
    half = (word >> 22) & 1
    want = np.clip(e + 15 + half, 0, 15)
    assert np.array_equal(_unpack4(codes, 256), want)
    assert np.all(np.log2(np.asarray(scales)) % 1 == 0)


def test_stochastic_codec_arguments_are_checked():
    codec = moment_codec(4, signed=True)
    x = np.ones((2, 8), np.float32)
    with pytest.raises(ValueError, match="random_bits"):
        codec.encode(x)
    with pytest.raises(ValueError, match="uint32 of x's shape"):
        codec.encode(x, np.zeros((2, 7), np.uint32))
    with pytest.raises(ValueError, match="random_bits"):
        moment_codec(8, signed=False).encode(x, counter_bits(x.shape, 0, 0))
    with pytest.raises(ValueError, match="convention='nearest'"):
        BlockCodec(qmap=codec.qmap, convention="torchao", rounding="stochastic")
    with pytest.raises(ValueError, match="`rounding` must be one of"):
        BlockCodec(qmap=codec.qmap, rounding="up")
    with pytest.raises(ValueError, match="`scale` must be one of"):
        BlockCodec(qmap=codec.qmap, scale="min")


def test_shapes_packing_and_eligibility():
    c4 = dataclasses.replace(moment_codec(4, signed=True), rounding="nearest", scale="max")
    x = np.float32([-1.0, -0.6, 0.0, 0.2, 0.5, 1.0, 0.0775])  # odd: the last byte is half used
    codes, scales = c4.encode(x)
    assert codes.shape == (4,) and scales.shape == (1,)
    q = np.asarray(c4.qmap, np.float32)
    nearest = np.argmin(np.abs(x[:, None].astype(np.float64) - q), axis=1)
    pairs = np.append(nearest, 0)
    assert np.array_equal(np.asarray(codes), (pairs[0::2] << 4) | pairs[1::2])  # high = even
    assert np.array_equal(np.asarray(c4.decode(codes, scales, x.shape)), q[nearest])
    scalar = moment_codec(signed=True)
    c, s = scalar.encode(np.float32(-2.5))
    assert c.shape == () and s.shape == (1,)
    assert float(scalar.decode(c, s, ())) == -2.5
    assert np.asarray(scalar.decode(*scalar.encode(np.ones((2, 3))), (2, 3), jnp.bfloat16)).dtype
    bnb, tao = bitsandbytes_codec(signed=True), torchao_codec(8, signed=True)
    assert not bnb.applies_to((4095,)) and bnb.applies_to((65, 65))
    assert tao.applies_to((64, 64)) and not tao.applies_to((65, 65))
    with pytest.raises(ValueError, match="do not belong"):
        scalar.decode(c, s, (2,))


def test_codec_arguments_are_checked():
    q = tuple(dynamic_map(True).tolist())
    with pytest.raises(ValueError, match=r"16 \(4-bit\) or 256"):
        BlockCodec(q[:100])
    with pytest.raises(ValueError, match="strictly increasing"):
        BlockCodec(tuple(reversed(q)))
    with pytest.raises(ValueError, match="block_size"):
        BlockCodec(q, block_size=0)
    with pytest.raises(ValueError, match="layout"):
        BlockCodec(q, layout="rows")
    with pytest.raises(ValueError, match="convention"):
        BlockCodec(q, convention="round")
    with pytest.raises(ValueError, match="even"):
        BlockCodec(tuple(linear_map(16).tolist()), block_size=5, layout="flat")
    with pytest.raises(TypeError, match="real floating-point"):
        moment_codec(signed=True).encode(np.ones(3, np.complex64))


def test_quantized_array_is_a_pytree_that_jits():
    codec = moment_codec(signed=False)
    x = jnp.abs(jax.random.normal(jax.random.key(0), (4, 300), jnp.bfloat16))
    q = quantize(x, codec)
    assert isinstance(q, QuantizedArray) and q.shape == (4, 300) and q.size == 1200
    assert [leaf.dtype for leaf in jax.tree.leaves(q)] == [jnp.uint8, jnp.float32]
    twice = jax.jit(lambda q: quantize(dequantize(q, jnp.float32) * 2, q.codec))(q)
    np.testing.assert_allclose(
        np.asarray(dequantize(twice, jnp.float32)),
        2 * np.asarray(dequantize(q, jnp.float32)),
        rtol=0.02,
    )
    assert dequantize(q).dtype == jnp.bfloat16


# ------------------------------------------------------------------------------------------
# Stochastic rounding
# ------------------------------------------------------------------------------------------


def _neighbours(x: np.ndarray, dtype) -> tuple[np.ndarray, np.ndarray]:
    """The representable values toward and away from zero around float32 x (NumPy)."""
    if dtype == jnp.bfloat16:
        bits = x.view(np.uint32)
        down = (bits & 0xFFFF0000).view(np.float32)
        up = ((bits & 0xFFFF0000) + np.where(bits & 0xFFFF, 0x10000, 0)).astype(np.uint32)
        return down, up.view(np.float32)
    r = x.astype(np.float16)
    toward = np.where(np.abs(r.astype(np.float32)) <= np.abs(x), r, np.nextafter(r, 0 * r))
    outward = (np.sign(x) * np.inf).astype(np.float16)
    away = np.where(toward.astype(np.float32) == x, toward, np.nextafter(toward, outward))
    return toward.astype(np.float32), away.astype(np.float32)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_stochastic_round_picks_a_neighbour_and_is_unbiased(dtype):
    rng = np.random.default_rng(5)
    hi = 30 if dtype == jnp.bfloat16 else 3  # float16: stay below its maximum, 65504
    x = (rng.normal(size=48) * 10.0 ** rng.uniform(-6, hi, 48)).astype(np.float32)
    x = np.concatenate([x, np.float32([1.0, -3.0, 1 + 2**-20, -(1 + 2**-9), 2**-20, 7e-8])])
    draws = 8192
    out = stochastic_round(np.repeat(x[:, None], draws, 1), jax.random.key(11), dtype)
    assert out.dtype == dtype
    got = np.asarray(out.astype(jnp.float32))
    down, up = _neighbours(x, dtype)
    assert np.all((got == down[:, None]) | (got == up[:, None]))
    gap = np.abs(up.astype(np.float64) - down)
    p = np.where(gap > 0, np.abs(x.astype(np.float64) - down) / np.where(gap > 0, gap, 1), 0)
    # Each draw is down + gap * Bernoulli(p): the mean's standard error is gap * sqrt(p(1-p)/n).
    mean = got.astype(np.float64).mean(axis=1)
    sigma = gap * np.sqrt(p * (1 - p) / draws)
    assert np.all(np.abs(mean - x) <= 5 * sigma + 1e-7 * gap)
    exact = gap == 0
    assert np.all(got[exact] == x[exact, None])


def test_stochastic_round_matches_torchao_frequencies():
    """The same rule as torchao's ``_fp32_to_bf16_sr``: for each stored value, how often it
    rounds away from zero agrees with torchao's count over the same number of draws (two
    binomial samples of one probability), except above the largest bfloat16, where torchao can
    produce inf and rmsjax rounds to nearest (documented)."""
    x = REF["sr/values"]
    counts = REF["sr/up_counts"]
    draws = json.loads(str(REF["lowbit_cases"]))["sr_draws"]
    out = stochastic_round(np.repeat(x[:, None], draws, 1), jax.random.key(2), jnp.bfloat16)
    bits = np.asarray(jax.lax.bitcast_convert_type(out, jnp.uint16))
    mine = np.sum(bits != (x.view(np.uint32) >> 16)[:, None], axis=1)
    frac = (x.view(np.uint32) & 0xFFFF) / 2**16
    in_range = np.abs(x) <= float(jnp.finfo(jnp.bfloat16).max)
    sigma = np.sqrt(2 * draws * frac * (1 - frac))
    ok = np.abs(mine - counts) <= 5 * sigma  # exact (0 = 0) where frac is 0
    assert np.all(ok[in_range]), (mine[in_range], counts[in_range])
    assert np.all(frac[~in_range] > 0) and np.any(counts[~in_range] > 0)  # torchao: some inf
    nearest = np.asarray(jnp.asarray(x[~in_range]).astype(jnp.bfloat16).astype(jnp.float32))
    assert np.all(np.asarray(out[~in_range].astype(jnp.float32)) == nearest[:, None])


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_stochastic_round_special_values(dtype):
    big = float(jnp.finfo(dtype).max)
    x = np.float32([np.nan, np.inf, -np.inf, 0.0, -0.0, big, -big, 3.4e38, -3.4e38])
    out = np.asarray(stochastic_round(np.repeat(x[:, None], 256, 1), jax.random.key(1), dtype))
    out = out.astype(np.float32)
    assert np.all(np.isnan(out[0]))
    assert np.all(out[1] == np.inf) and np.all(out[2] == -np.inf)
    assert np.all(out[3] == 0) and not np.any(np.signbit(out[3]))
    assert np.all(out[4] == 0) and np.all(np.signbit(out[4]))
    assert np.all(out[5] == big) and np.all(out[6] == -big)
    expected = np.asarray(jnp.asarray(x[7:]).astype(dtype).astype(jnp.float32))
    assert np.all(out[7:] == expected[:, None])  # beyond the range: as astype
    just_below = np.nextafter(np.float32(big), np.float32(0))
    below = stochastic_round(np.full(4096, just_below), jax.random.key(2), dtype)
    assert np.all(np.isfinite(np.asarray(below.astype(jnp.float32))))


def test_stochastic_round_is_pure_and_traceable():
    x = jnp.linspace(1.0, 1.01, 1000)
    a = stochastic_round(x, jax.random.key(0))
    b = jax.jit(stochastic_round, static_argnums=2)(x, jax.random.key(0), jnp.bfloat16)
    c = stochastic_round(x, jax.random.key(1))
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        stochastic_round(x, jax.random.key(0), jnp.float32)


def test_apply_updates_stochastic_tracks_float32_where_nearest_stalls():
    """bfloat16 weights at 1.0 (ulp 2^-7) get an update of 1e-4 per step, below half an ulp.

    Round to nearest returns 1.0 every step. Stochastic rounding is unbiased at each step, so
    E[θ_T] = 1 + T·u; each step adds a variance of at most ulp²/4, so the mean of M
    independent weights has a standard deviation of at most ulp·sqrt(T / (4M)). The bound
    below is 5 of those.
    """
    steps, m, u = 200, 4096, 1e-4
    params = {"w": jnp.ones(m, jnp.bfloat16), "f": jnp.ones(3, jnp.float32), "n": None}
    updates = {"w": jnp.full(m, u, jnp.float32), "f": jnp.full(3, u, jnp.float32), "n": None}

    def run(apply):
        def body(t, p):
            return apply(p, updates, jax.random.fold_in(jax.random.key(7), t))

        return jax.jit(lambda p: jax.lax.fori_loop(0, steps, body, p))(params)

    nearest = run(lambda p, up, _key: rmsjax.apply_updates(p, up))
    stochastic = run(apply_updates_stochastic)
    assert np.all(np.asarray(nearest["w"], np.float32) == 1.0)  # stalled
    ulp = 2.0**-7
    mean = float(np.mean(np.asarray(stochastic["w"], np.float64)))
    bound = 5 * ulp * np.sqrt(steps / (4 * m))
    assert abs(mean - (1 + steps * u)) <= bound
    assert steps * u > 4 * bound  # the test separates the two: nearest is far outside it
    assert stochastic["n"] is None
    np.testing.assert_array_equal(np.asarray(stochastic["f"]), np.asarray(nearest["f"]))
    assert stochastic["w"].dtype == jnp.bfloat16


def test_apply_updates_stochastic_reports_structure_mismatch():
    with pytest.raises(ValueError, match="structure"):
        apply_updates_stochastic({"a": jnp.ones(2)}, {"b": jnp.ones(2)}, jax.random.key(0))


# ------------------------------------------------------------------------------------------
# The codecs inside the libraries' optimizers: replaying lowbit.npz's trajectories
# ------------------------------------------------------------------------------------------

LOWBIT = json.loads(str(REF["lowbit_cases"]))
F32 = np.float32


def _fma(a: float, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """a * b + c with one rounding (torch's compiled lerp), exact in float64 for float32 input."""
    return (np.float64(F32(a)) * b.astype(np.float64) + c).astype(F32)


def _replay(case: dict, tensor: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The library's CPU step restated in NumPy float32, with rmsjax's codecs for the state."""
    name, lib, kw = case["name"], case["library"], case["kwargs"]
    shape = tuple(LOWBIT["big"][lib]) if tensor == "big" else tuple(LOWBIT["small"])
    salt = 0 if tensor == "big" else 1
    p = np.random.default_rng([20261121, salt]).normal(size=shape).astype(F32)
    grads = (REF[f"{name}/{tensor}/grads"].astype(np.uint32) << 16).view(F32)
    quantized = tensor == "big"
    if lib == "bitsandbytes":
        codecs = bitsandbytes_codec(signed=True), bitsandbytes_codec(signed=False)
    else:
        bits = 8 if lib == "torchao8" else 4
        codecs = torchao_codec(bits, signed=True), torchao_codec(bits, signed=False)
    m, v = np.zeros(shape, F32), np.zeros(shape, F32)
    params, states = [], []
    for t in range(1, LOWBIT["steps"] + 1):
        g = grads[t - 1].reshape(shape)
        if case["optimizer"] == "RMSprop8bit":  # bitsandbytes' CPU kernels ignore momentum
            lr, a, eps = kw.get("lr", 1e-2), kw.get("alpha", 0.99), kw.get("eps", 1e-8)
            g = g + p * F32(kw.get("weight_decay", 0.0))
            v = v * F32(a) + g * g * F32(1 - a)
            p = p + F32(-lr) * g / (np.sqrt(v) + F32(eps))
            if quantized:
                states = list(codecs[0].encode(v))  # its one state uses the signed map
                v = np.asarray(codecs[0].decode(*states, shape))
        elif lib == "bitsandbytes":
            lr, (b1, b2) = kw.get("lr", 1e-3), kw.get("betas", [0.9, 0.999])
            eps = kw.get("eps", 1e-8)
            wd = kw.get("weight_decay", 0.0 if case["optimizer"] == "Adam8bit" else 1e-2)
            m = m * F32(b1) + g * F32(1 - b1)
            v = v * F32(b2) + g * g * F32(1 - b2)
            c1, c2 = 1 - b1**t, np.sqrt(1 - b2**t)
            if wd > 0:
                p = p * F32(1 - lr * wd)
            if quantized:
                p = p + F32(-lr / c1) * m / (np.sqrt(v) / F32(c2) + F32(eps))
            else:
                p = p + m / (np.sqrt(v) + F32(eps * c2)) * F32(-lr * c2 / c1)
        else:  # torchao's single_param_adam (AdamW)
            lr, (b1, b2) = kw.get("lr", 1e-3), kw.get("betas", [0.9, 0.999])
            eps = kw.get("eps", 1e-8)
            p = p - F32(lr) * F32(kw.get("weight_decay", 1e-2)) * p
            c1, c2 = F32(1) - F32(b1) ** F32(t), F32(1) - F32(b2) ** F32(t)
            m, v = _fma(1 - b1, g - m, m), _fma(1 - b2, g * g - v, v)
            p = p - F32(lr) * (m / c1) / (np.sqrt(v) / np.sqrt(c2) + F32(eps))
        if quantized and case["optimizer"] != "RMSprop8bit":
            states = [*codecs[0].encode(m), *codecs[1].encode(v)]
            m = np.asarray(codecs[0].decode(*states[:2], shape))
            v = np.asarray(codecs[1].decode(*states[2:], shape))
        if not quantized or t in LOWBIT["checkpoints"]:
            params.append(p.copy())
    return params, [np.asarray(s) for s in states]


@pytest.mark.parametrize("case", LOWBIT["cases"], ids=lambda c: c["name"])
def test_codecs_reproduce_the_library_optimizers(case):
    """30 steps of each stored run: with rmsjax's codecs for the 8/4-bit state, every code of
    the final state equals the library's, and the parameters and scales agree to float32
    rounding (the restated arithmetic orders some products differently: a few ulps)."""
    params, states = _replay(case, "big")
    ref = REF[f"{case['name']}/big/params"]
    np.testing.assert_allclose(np.stack(params), ref, rtol=1e-6, atol=1e-6)
    slots = ("state1", "state1_scales", "state2", "state2_scales")
    stored = [REF[f"{case['name']}/big/{k}"] for k in slots if f"{case['name']}/big/{k}" in REF]
    assert len(stored) == len(states)
    for got, want in zip(states, stored, strict=True):
        assert got.size == want.size and got.dtype == want.dtype
        if got.dtype == np.uint8:  # codes: every one equal
            assert np.array_equal(got.reshape(-1), want.reshape(-1))
        else:  # scales: the block maxima of states that agree to a few ulps
            np.testing.assert_allclose(got.reshape(-1), want.reshape(-1), rtol=2e-6)
    # The tensor below the 4096-entry minimum keeps float32 state in both libraries.
    small, _ = _replay(case, "small")
    np.testing.assert_allclose(
        np.stack(small), REF[f"{case['name']}/small/params"][1:], rtol=1e-6, atol=1e-6
    )
    assert not bitsandbytes_codec(signed=True).applies_to(LOWBIT["small"])
