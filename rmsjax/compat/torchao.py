r"""torchao's low-bit AdamW (0.18), reproduced as optax-protocol transformations.

``torchao.optim.AdamW8bit`` and ``AdamW4bit`` with the classes' own argument names and
defaults, including ``bf16_stochastic_round``. Each keeps the moments of a parameter whose
size is at least 4096 and a multiple of ``block_size`` as torchao does
(:func:`rmsjax.quantization.torchao_codec`: 8 bits with the dynamic maps, or 4 bits with the
signed 4-bit dynamic map for :math:`m` and the zero-free linear map :math:`k/16` for
:math:`v`; blocks over the flattened tensor; torchao's rounding), other parameters' in
float32, through the storage mechanism every rmsjax moment has (:mod:`rmsjax.storage`).
``tests/test_lowbit_presets.py`` replays 30-step trajectories of the real library
(``tests/reference/lowbit.npz``).

torchao computes the step in float32 (``p.float()``, ``grad.float()``) and writes the
parameter back once: rounded to nearest, or, with ``bf16_stochastic_round=True`` and a
bfloat16 parameter, stochastically (:func:`rmsjax.stochastic_round`). The presets do the same:
the update of a float16/bfloat16 parameter is float32, and ``rmsjax.apply_updates`` lands the
parameter on torchao's value. The random bits come from a key in the optimizer state
(seed 0, split every step, folded with each parameter's key path), not from torch's global
generator: the rounding is unbiased and reproducible, but not torchao's draw for draw.

How the presets differ from rmsjax's own storage (:func:`rmsjax.quantized`), and by how much:
the 8-bit preset has rmsjax's 8-bit maps but torchao's flattened blocks, scale floor and
rounding; the 4-bit preset has torchao's 4-bit scheme, which rmsjax replaced (a 16-value
dynamic map for :math:`m` and :math:`k/16` for :math:`v`, both rounded to nearest, against
rmsjax's powers of two, power-of-two scales and stochastic rounding; blocks within rows). On the
quality benchmark's digits tasks (AdamW, 300 full-batch steps, 5 seeds; final loss relative to
float32 state on the same seed), the preset codecs run in rmsjax ended at
+230% (classifier) and +158% (autoencoder) for ``adamw4bit``, -26% and +188% (one seed of five
ending 8 times above float32) for ``adamw8bit``; torchao 0.18 itself, run in PyTorch against
torch's float32 AdamW, at +324% and +65% (``AdamW4bit``), -31% and -6% (``AdamW8bit``);
``rmsjax.quantized(4)`` at -24% and -8%, ``rmsjax.quantized(8)`` at -28% and
-2% (``benchmarks/results/torchao_reference.md``, ``quality.md``).

Not reproduced: ``DTensor`` parameters (use :func:`rmsjax.state_sharding`, whose default
layout keeps blocks within shards), CPU offload, and torchao's float8 state (``AdamWFp8``).
"""

from __future__ import annotations

import optax
from jax.typing import ArrayLike

from rmsjax import transforms as T
from rmsjax._types import ScalarOrSchedule
from rmsjax.compat._common import betas_pair, descend, is_static_zero
from rmsjax.compat._lowbit import (
    float32_updates,
    library_storage,
    round_bfloat16_params,
)
from rmsjax.quantization import torchao_codec
from rmsjax.validation import argument_names

__all__ = ["adamw4bit", "adamw8bit"]


def _adamw(
    bits: int,
    lr: ScalarOrSchedule,
    betas: tuple[ArrayLike, ArrayLike],
    eps: ArrayLike,
    weight_decay: ScalarOrSchedule,
    amsgrad: bool,
    block_size: int,
    bf16_stochastic_round: bool,
) -> optax.GradientTransformation:
    b1, b2 = betas_pair(betas)
    first = library_storage(torchao_codec(bits, signed=True), "block_size", block_size=block_size)
    second = library_storage(torchao_codec(bits, signed=False), "block_size", block_size=block_size)
    with argument_names({"learning_rate": "lr", "b1": "betas[0]", "b2": "betas[1]"}):
        if amsgrad:
            scaler = T.scale_by_amsgrad(
                b1=b1,
                b2=b2,
                eps=eps,
                mu_dtype=first,
                nu_dtype=second,
                max_before_correction=True,
            )
        else:
            scaler = T.scale_by_adam(b1=b1, b2=b2, eps=eps, mu_dtype=first, nu_dtype=second)
        step = descend(lr)
        decay = [] if is_static_zero(weight_decay) else [T.decoupled_weight_decay(weight_decay, lr)]
    rounding = [round_bfloat16_params()] if bf16_stochastic_round else []
    return optax.chain(float32_updates(), scaler, step, *decay, *rounding)


_MATH = r"""
    .. math::
      \theta \leftarrow \theta - \eta_t\lambda\theta, \qquad
      m_t = m_{t-1} + (1-\beta_1)(g_t - m_{t-1}), \qquad
      v_t = v_{t-1} + (1-\beta_2)(g_t^2 - v_{t-1})

      \theta \leftarrow \theta - \eta_t\,\frac{m_t/(1-\beta_1^t)}
      {\sqrt{\hat v_t}/\sqrt{1-\beta_2^t} + \epsilon}

    in float32 from the decoded moments, with :math:`\hat v_t = v_t`, or with ``amsgrad`` the
    running maximum of the raw :math:`v_s` (stored like :math:`v`). The new (unrounded)
    moments make the step; then they are stored."""


def adamw8bit(
    lr: ScalarOrSchedule = 1e-3,
    betas: tuple[ArrayLike, ArrayLike] = (0.9, 0.999),
    eps: ArrayLike = 1e-8,
    weight_decay: ScalarOrSchedule = 1e-2,
    amsgrad: bool = False,
    *,
    block_size: int = 256,
    bf16_stochastic_round: bool = False,
) -> optax.GradientTransformation:
    r"""``torchao.optim.AdamW8bit``: AdamW with 8-bit block-wise moments.
    {math}
    :math:`m` is stored with the signed and :math:`v` with the unsigned 8-bit dynamic map,
    ``block_size`` entries of the flattened tensor per float32 scale, when the parameter has at
    least 4096 entries and a multiple of ``block_size``; else in float32. Chain:
    ``float32_updates, scale_by_adam | scale_by_amsgrad(max_before_correction=True),
    scale_by_learning_rate(lr), [decoupled_weight_decay(weight_decay, lr)],
    [bfloat16 stochastic rounding]``.

    Args:
      lr: >= 0 or a schedule ``count -> lr``.
      betas: ``(beta1, beta2)``, each in [0, 1).
      eps: >= 0, outside the root.
      weight_decay: >= 0 or a schedule (decoupled); a Python 0 leaves the term out.
      amsgrad: divide by the running maximum of the raw second moment (torch's form).
      block_size: entries per scale, an int >= 1.
      bf16_stochastic_round: write bfloat16 parameters back with stochastic rounding (see
        :mod:`rmsjax.compat.torchao`); other dtypes are rounded to nearest.

    Differences: float32 rounding only (the stored trajectories are followed to ~1e-6, a code
    now and then one step apart); the random bits of ``bf16_stochastic_round`` (see the module).
    From :func:`rmsjax.quantized` ``(8)``, and on the quality benchmark: see the module.
    """
    return _adamw(8, lr, betas, eps, weight_decay, amsgrad, block_size, bf16_stochastic_round)


def adamw4bit(
    lr: ScalarOrSchedule = 1e-3,
    betas: tuple[ArrayLike, ArrayLike] = (0.9, 0.999),
    eps: ArrayLike = 1e-8,
    weight_decay: ScalarOrSchedule = 1e-2,
    amsgrad: bool = False,
    *,
    block_size: int = 128,
    bf16_stochastic_round: bool = False,
) -> optax.GradientTransformation:
    r"""``torchao.optim.AdamW4bit``: AdamW with 4-bit block-wise moments.
    {math}
    :math:`m` is stored with the signed 4-bit dynamic map (16 values) and :math:`v` with the
    zero-free linear map :math:`k/16,\ k = 1..16` (a positive :math:`v` is never stored as 0,
    so :math:`1/\sqrt{v}` stays bounded), two codes per byte, ``block_size`` entries of the
    flattened tensor per float32 scale, when the parameter has at least 4096 entries and a
    multiple of ``block_size``; else in float32. Chain as :func:`adamw8bit`.

    Args:
      lr: >= 0 or a schedule. betas: each in [0, 1). eps: >= 0. weight_decay: >= 0 or a
        schedule (decoupled). amsgrad: torch's AMSGrad.
      block_size: entries per scale, an even int >= 2 (two 4-bit codes share a byte).
      bf16_stochastic_round: as in :func:`adamw8bit`.

    Differences: as :func:`adamw8bit` (torchao 0.18 applies plain block-wise scaling to both
    moments, no rank-1 normalisation, and so does this preset). How torchao's 4-bit scheme
    differs from :func:`rmsjax.quantized` ``(4)``, and what that costs on the quality
    benchmark: see :mod:`rmsjax.compat.torchao`.
    """
    return _adamw(4, lr, betas, eps, weight_decay, amsgrad, block_size, bf16_stochastic_round)


adamw8bit.__doc__ = (adamw8bit.__doc__ or "").replace("{math}", _MATH)
adamw4bit.__doc__ = (adamw4bit.__doc__ or "").replace("{math}", _MATH)
