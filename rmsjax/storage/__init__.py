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
  bits with one float32 scale per block (:mod:`rmsjax.quantization`);
* :func:`factored` ``()``: a second moment of a matrix is stored as its row and column means
  (Adafactor); other arrays as ``quantized(4)``;
* :func:`float8` ``()``: FP8 values (E4M3; a second moment's square root in E4M3, or E5M2)
  with one float32 scale per block.

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
``quantized(bits=4)``                  0.5 + 4/128 = 0.531 (two codes per byte; a
                                       first moment adds one 8-byte key per array)
``float8()``                           1 + 4/256 = 1.016
``factored()``, an n x m matrix        4 (n + m) / (n m): 0.008 for 1024 x 1024
=====================================  ===========================================

Adam's two moments take 8 bytes per parameter in float32, 2.03 at 8 bits, 1.06 at 4 bits and
0.54 with a 4-bit first moment and a factored second moment.
"""

from rmsjax.storage.base import (
    KernelView,
    Storage,
    StoredArray,
    check_storage,
    decode,
    encode,
    is_stored,
    plain_dtype,
)
from rmsjax.storage.factored import Factored, FactoredArray, factored
from rmsjax.storage.float8 import Float8, Float8Array, float8
from rmsjax.storage.quantized import Quantized, quantized
from rmsjax.storage.rounded import RoundedArray, StochasticRounding, stochastic_rounding

__all__ = [
    "Factored",
    "FactoredArray",
    "Float8",
    "Float8Array",
    "KernelView",
    "Quantized",
    "RoundedArray",
    "StochasticRounding",
    "Storage",
    "StoredArray",
    "check_storage",
    "decode",
    "encode",
    "factored",
    "float8",
    "is_stored",
    "plain_dtype",
    "quantized",
    "stochastic_rounding",
]
