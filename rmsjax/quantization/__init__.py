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

from rmsjax.quantization.codec import (
    BlockCodec,
    QuantizedArray,
    bitsandbytes_codec,
    check_bits,
    dequantize,
    moment_codec,
    quantize,
    torchao_codec,
)
from rmsjax.quantization.maps import dynamic_map, linear_map, power_of_two_map

__all__ = [
    "BlockCodec",
    "QuantizedArray",
    "bitsandbytes_codec",
    "check_bits",
    "dequantize",
    "dynamic_map",
    "linear_map",
    "power_of_two_map",
    "moment_codec",
    "quantize",
    "torchao_codec",
]
