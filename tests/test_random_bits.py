"""rmsjax.stochastic.counter_bits: the counter-based random bits of unbiased rounding.

Checked against a NumPy statement of the published hash (Wellons' lowbias32 applied to
``index * 0x9E3779B9 + key``), and for the statistical properties rounding needs: uniform
bytes, independent bits from step to step and seed to seed.
"""

from __future__ import annotations

import numpy as np
import pytest

from rmsjax.stochastic import counter_bits, mix32


def _lowbias32(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.uint64) & 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x21F0AAAD) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x735A2D97) & 0xFFFFFFFF
    x ^= x >> 15
    return x.astype(np.uint32)


@pytest.mark.parametrize("shape", [(), (7,), (3, 5), (2, 3, 4)])
def test_counter_bits_follow_the_published_hash(shape: tuple[int, ...]) -> None:
    seed, counter = 123456789, 42
    key = _lowbias32(np.uint64(seed) ^ _lowbias32(np.uint64(counter)).astype(np.uint64))
    index = np.arange(int(np.prod(shape)), dtype=np.uint64).reshape(shape)
    want = _lowbias32((index * 0x9E3779B9 + key.astype(np.uint64)) & 0xFFFFFFFF)
    np.testing.assert_array_equal(np.asarray(counter_bits(shape, seed, counter)), want)
    x = np.arange(0, 2**32, 2**20 + 12345, dtype=np.uint64)
    np.testing.assert_array_equal(np.asarray(mix32(x.astype(np.uint32))), _lowbias32(x))


def test_counter_bits_look_uniform_and_independent() -> None:
    a = np.asarray(counter_bits((512, 512), seed=7, counter=0))
    b = np.asarray(counter_bits((512, 512), seed=7, counter=1))
    c = np.asarray(counter_bits((512, 512), seed=8, counter=0))
    counts = np.bincount((a & 0xFF).ravel(), minlength=256)
    expected = a.size / 256
    chi2 = float(np.sum((counts - expected) ** 2 / expected))
    assert chi2 < 255 + 6 * np.sqrt(2 * 255)  # 255 degrees of freedom, six sigma
    assert abs(np.unpackbits(a.view(np.uint8)).mean() - 0.5) < 0.002
    for other in (b, c):
        agree = np.unpackbits((a ^ ~other).view(np.uint8)).mean()  # bits equal half the time
        assert abs(agree - 0.5) < 0.002
    assert len(np.unique(a)) > 0.99 * a.size
