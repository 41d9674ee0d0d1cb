"""The 8-bit codec operand: written by ``rmsjax._native.codecs.operand`` from the codec, read back
by ``codecs.parse`` and by the kernel's ``ReadCodec``, both of which refuse the same malformed
operands (the layout itself is written once, ``CODEC_SECTIONS`` in ``rmsjax/_native/table.py``).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rmsjax import native
from rmsjax._native import call, codecs, table
from rmsjax.quantization import moment_codec
from rmsjax.quantization.rounding import breakpoints


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("block_size", [64, 2048])
def test_parse_reads_back_the_codec(signed, block_size):
    codec = moment_codec(8, signed=signed, block_size=block_size)
    fields, sections = codecs.parse(codecs.operand(codec))
    assert fields["magic"] == table.CODEC_MAGIC
    assert fields["block_size"] == block_size
    assert fields["cells"] == 2 * fields["half"] == sections["cells"].size
    np.testing.assert_array_equal(sections["qmap"], np.asarray(codec.qmap, np.float32))
    points, _ = breakpoints(codec.qmap, "nearest")  # the codec's own rounding
    n = len(points)
    np.testing.assert_array_equal(sections["points"][:n], np.asarray(points, np.float32))
    assert np.all(sections["points"][n:] == np.inf)
    np.testing.assert_array_equal(sections["padding"], 0)


def _corrupt(what: str) -> np.ndarray:
    """The operand of rmsjax's signed codec with one thing wrong."""
    blob = np.array(codecs.operand(moment_codec(8, signed=True, block_size=64)))
    fields, _ = codecs.parse(blob)
    head = blob[slice(*table.codec_spans(fields)["fields"])].view("<i4")
    at = {name: i for i, name in enumerate(table.CODEC_FIELDS)}
    if what == "magic":
        head[at["magic"]] += 1
    elif what == "block_size":
        head[at["block_size"]] = table.MAX_BLOCK + 1
    elif what == "cells":
        head[at["cells"]] -= 2
    elif what == "coverage":
        head[at["half"]] += 1
        head[at["cells"]] += 2
        blob = np.concatenate([blob, np.zeros(2, np.uint8)])
    elif what == "size":
        blob = blob[:-1]
    elif what == "dtype":
        blob = blob.view(np.int8)
    return blob


# what is wrong -> (codecs.parse's message, the kernel's message)
MALFORMED = {
    "magic": ("magic number", "wrong magic number"),
    "block_size": ("block size", "block size out of range"),
    "cells": ("cells for half", "cell counts out of range"),
    "coverage": ("do not cover", "does not cover [-1, 1]"),
    "size": ("bytes, got", "size does not match its cell count"),
    "dtype": ("1-D uint8 array", "must be a uint8 array"),
}


@pytest.mark.parametrize("what", list(MALFORMED))
def test_parse_refuses_a_malformed_operand(what):
    with pytest.raises(ValueError, match=MALFORMED[what][0]):
        codecs.parse(_corrupt(what))


@pytest.mark.skipif(not native.available(), reason=f"native kernel off: {native.status()}")
@pytest.mark.parametrize("what", [None, *MALFORMED])
def test_the_kernel_refuses_what_parse_refuses(what):
    # One leaf of SGD with 8-bit momentum, through the FFI call with a given codec operand.
    n, block = 128, 64
    codec = moment_codec(8, signed=True, block_size=block)
    operand = codecs.operand(codec) if what is None else _corrupt(what)
    sgd = table.kind("sgd")
    flags = {"momentum": True, "nesterov": False, "scale_first": False, "q8": True}
    vector = call.scalar_vector(sgd, {"step_size": -0.1, "momentum": 0.9, "weight_decay": 0.0})
    p, g = jnp.ones(n, jnp.float32), jnp.full(n, 0.5, jnp.float32)
    codes, scales = jnp.zeros(n, jnp.uint8), jnp.zeros(n // block, jnp.float32)

    def step(op):
        return call.ffi(sgd, flags, vector, [p], [g], {"trace": [(codes, scales)]}, [op])

    if what is None:
        (p_new,), _ = jax.jit(step)(jnp.asarray(operand))
        np.testing.assert_allclose(np.asarray(p_new), 1.0 - 0.1 * 0.5, rtol=1e-7)
        return
    with pytest.raises(Exception, match=re.escape(MALFORMED[what][1])):
        jax.block_until_ready(jax.jit(step)(jnp.asarray(operand)))
