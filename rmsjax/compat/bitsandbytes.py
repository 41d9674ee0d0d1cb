r"""bitsandbytes' 8-bit optimizers (0.50), reproduced as optax-protocol transformations.

``Adam8bit``, ``AdamW8bit`` and ``RMSprop8bit`` with the classes' own argument names and
defaults. Each keeps its moments of parameters with at least ``min_8bit_size`` entries in
8 bits exactly as bitsandbytes does (:func:`rmsjax.quantization.bitsandbytes_codec`: its
dynamic maps, blocks of 256 over the flattened tensor, one float32 absolute maximum per block,
and the rounding of its CPU kernel), and smaller ones in float32, through the storage
mechanism every rmsjax moment has (:mod:`rmsjax.storage`). ``tests/test_lowbit_presets.py``
replays 30-step trajectories of the real library (``tests/reference/lowbit.npz``).

Findings about bitsandbytes 0.50 that the presets reproduce (measured on its CPU kernels):

* the CPU quantizer rounds each normalised value on a grid of 65536 points of [-1, 1] and
  takes the code nearest to that grid point, so an exact 0 is stored as a small positive code;
* ``Adam8bit`` applies ``weight_decay`` DECOUPLED, like ``AdamW8bit``
  (:math:`\theta \leftarrow \theta(1 - \eta\lambda)` before the step), unlike
  ``torch.optim.Adam``; the two classes differ only in the default ``weight_decay``;
* ``RMSprop8bit`` ignores ``momentum`` (its kernels never read it) and keeps its one state,
  the mean square, with the SIGNED dynamic map;
* ``RMSprop8bit(centered=True)`` raises ``NotImplementedError`` in bitsandbytes. rmsjax
  supports it (both moments with the signed 8-bit map, the variance clamped at 0 as in
  :func:`rmsjax.scale_by_centered_rms`); there is no reference run for it.

How the presets differ from rmsjax's own storage (:func:`rmsjax.quantized` ``(8)``): the same
dynamic maps, but blocks over the flattened tensor and the CPU kernel's grid rounding (an exact
0 stored as a small positive code), against rmsjax's blocks within rows and nearest codes; at 4
bits rmsjax has its own scheme (bitsandbytes has none). On the quality benchmark's digits tasks
(AdamW, 300 full-batch steps, 5 seeds; final loss relative to float32 state on the same seed)
the preset codecs run in rmsjax ended at -25% (classifier) and -0.1% (autoencoder),
``rmsjax.quantized(8)`` at -28% and -2%, ``rmsjax.quantized(4)`` at -24% and
-8% (``benchmarks/results/quality.md``).

Float16/bfloat16 parameters: like the libraries (``grad.float()``), the update is computed
and returned in float32, so ``rmsjax.apply_updates`` rounds the parameter once. Not
reproduced: paging (``is_paged``: memory management of CUDA, no effect here), the ``args``
override object, per-parameter overrides (``GlobalOptimManager``; use
``optax.multi_transform``), ``percentile_clipping`` and ``max_unorm`` (not in these classes'
signatures). On CUDA, bitsandbytes rounds to the nearest code; these presets reproduce the
CPU kernel (use ``rmsjax.quantized(8)`` with the flat layout for nearest rounding).
"""

from __future__ import annotations

from typing import Any

import optax
from jax.typing import ArrayLike

from rmsjax import transforms as T
from rmsjax._types import ScalarOrSchedule
from rmsjax.compat._common import betas_pair, descend, is_static_zero
from rmsjax.compat._lowbit import float32_updates, library_storage
from rmsjax.quantization import bitsandbytes_codec
from rmsjax.validation import argument_names, check_in_range

__all__ = ["adam8bit", "adamw8bit", "rmsprop8bit"]

_NAMES = {"learning_rate": "lr", "b1": "betas[0]", "b2": "betas[1]"}


def _no_args(args: Any) -> None:
    if args is not None:
        raise TypeError(
            f"`args` must be None, got {args!r}: bitsandbytes' override object is not "
            "reproduced; pass the arguments themselves (`min_8bit_size`, ...)."
        )


def _adam(
    lr: Any,
    betas: Any,
    eps: Any,
    weight_decay: Any,
    amsgrad: bool,
    optim_bits: int,
    args: Any,
    min_8bit_size: int,
    name: str,
) -> optax.GradientTransformation:
    if amsgrad:
        raise ValueError(f"`amsgrad` must be False: bitsandbytes' {name} does not support it.")
    if optim_bits != 32:
        raise ValueError(
            f"`optim_bits` must be 32, got {optim_bits!r}: {name} always keeps 8-bit state "
            "(bitsandbytes accepts only the default, for compatibility)."
        )
    _no_args(args)
    b1, b2 = betas_pair(betas)
    signed = library_storage(
        bitsandbytes_codec(signed=True), "min_8bit_size", min_size=min_8bit_size
    )
    unsigned = library_storage(
        bitsandbytes_codec(signed=False), "min_8bit_size", min_size=min_8bit_size
    )
    with argument_names(_NAMES):
        scaler = T.scale_by_adam_exact_bias(
            b1=b1, b2=b2, eps=eps, mu_dtype=signed, nu_dtype=unsigned
        )
        step = descend(lr)
        decay = [] if is_static_zero(weight_decay) else [T.decoupled_weight_decay(weight_decay, lr)]
    return optax.chain(float32_updates(), scaler, step, *decay)


def adam8bit(
    lr: ScalarOrSchedule = 1e-3,
    betas: tuple[ArrayLike, ArrayLike] = (0.9, 0.999),
    eps: ArrayLike = 1e-8,
    weight_decay: ScalarOrSchedule = 0,
    amsgrad: bool = False,
    optim_bits: int = 32,
    args: Any = None,
    min_8bit_size: int = 4096,
    is_paged: bool = False,
) -> optax.GradientTransformation:
    r"""``bitsandbytes.optim.Adam8bit``: Adam with 8-bit block-wise moments.

    .. math::
      m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t, \qquad
      v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2

      \theta \leftarrow \theta\,(1 - \eta_t\lambda) - \eta_t\,
      \frac{m_t/(1-\beta_1^t)}{\sqrt{v_t/(1-\beta_2^t)} + \epsilon}

    computed in float32 from the decoded moments; then :math:`m_t` is stored with the signed
    and :math:`v_t` with the unsigned dynamic map (blocks of 256 over the flattened tensor, one
    float32 absolute maximum per block; :func:`rmsjax.quantization.bitsandbytes_codec`) when
    the parameter has at least ``min_8bit_size`` entries, else in float32. The weight decay is
    DECOUPLED, as bitsandbytes applies it in ``Adam8bit`` too (``torch.optim.Adam`` couples it).
    Chain: ``float32_updates, scale_by_adam_exact_bias(mu_dtype=..., nu_dtype=...),
    scale_by_learning_rate(lr), [decoupled_weight_decay(weight_decay, lr)]``.

    Args:
      lr: >= 0, or a schedule ``count -> lr`` (a ``torch.optim.lr_scheduler``'s part).
      betas: ``(beta1, beta2)``, each in [0, 1).
      eps: >= 0, outside the root.
      weight_decay: >= 0 or a schedule; a Python 0 leaves the term out.
      amsgrad: must be False (bitsandbytes raises ``ValueError`` too).
      optim_bits: must be 32 (the only value bitsandbytes accepts; the state is 8-bit).
      args: must be None (bitsandbytes' override object is not reproduced).
      min_8bit_size: parameters with fewer entries keep float32 moments; an int >= 0.
      is_paged: accepted and ignored (paging is CUDA memory management).

    Differences: none in the numbers beyond float32 rounding (the trajectories of
    ``tests/reference/lowbit.npz`` are followed to ~1e-6, with a code now and then one step
    apart where the two orders of float32 operations round a moment across a code boundary).
    """
    del is_paged
    return _adam(lr, betas, eps, weight_decay, amsgrad, optim_bits, args, min_8bit_size, "Adam8bit")


def adamw8bit(
    lr: ScalarOrSchedule = 1e-3,
    betas: tuple[ArrayLike, ArrayLike] = (0.9, 0.999),
    eps: ArrayLike = 1e-8,
    weight_decay: ScalarOrSchedule = 1e-2,
    amsgrad: bool = False,
    optim_bits: int = 32,
    args: Any = None,
    min_8bit_size: int = 4096,
    is_paged: bool = False,
) -> optax.GradientTransformation:
    r"""``bitsandbytes.optim.AdamW8bit``: :func:`adam8bit` with ``weight_decay=1e-2``.

    .. math::
      \theta \leftarrow \theta\,(1 - \eta_t\lambda) - \eta_t\,
      \frac{m_t/(1-\beta_1^t)}{\sqrt{v_t/(1-\beta_2^t)} + \epsilon}

    with the 8-bit moments of :func:`adam8bit` (bitsandbytes' two classes run the same kernel;
    only the default ``weight_decay`` differs).

    Args:
      lr: >= 0 or a schedule. betas: each in [0, 1). eps: >= 0. weight_decay: >= 0 or a
      schedule (decoupled). amsgrad: must be False. optim_bits: must be 32. args: must be None.
      min_8bit_size: an int >= 0. is_paged: ignored.

    Differences from ``optax.adamw`` (besides the 8-bit state): torch's default weight decay
    1e-2 and bias corrections accurate to the last bit (:func:`rmsjax.scale_by_adam_exact_bias`).
    """
    del is_paged
    return _adam(
        lr, betas, eps, weight_decay, amsgrad, optim_bits, args, min_8bit_size, "AdamW8bit"
    )


def rmsprop8bit(
    lr: ScalarOrSchedule = 1e-2,
    alpha: ArrayLike = 0.99,
    eps: ArrayLike = 1e-8,
    weight_decay: ScalarOrSchedule = 0,
    momentum: ArrayLike = 0,
    centered: bool = False,
    args: Any = None,
    min_8bit_size: int = 4096,
) -> optax.GradientTransformation:
    r"""``bitsandbytes.optim.RMSprop8bit``: RMSProp with an 8-bit mean square.

    .. math::
      g \leftarrow g + \lambda\theta, \qquad v_t = \alpha v_{t-1} + (1-\alpha) g_t^2, \qquad
      \theta \leftarrow \theta - \eta_t\, g_t / (\sqrt{v_t} + \epsilon)

    with :math:`v_t` stored with the SIGNED dynamic map (as bitsandbytes stores its ``state1``)
    when the parameter has at least ``min_8bit_size`` entries, else in float32. The weight
    decay is coupled (added to the gradient). ``momentum`` is validated and IGNORED, as
    bitsandbytes' kernels ignore it (measured on its CPU kernel: the trajectory with
    ``momentum=0.9`` equals the one without). Chain: ``float32_updates,
    [add_decayed_weights(weight_decay)], scale_by_rms(alpha, eps, eps_in_sqrt=False,
    nu_dtype=...), scale_by_learning_rate(lr)``.

    Args:
      lr: >= 0 or a schedule. alpha: in [0, 1). eps: >= 0, outside the root.
      weight_decay: >= 0 or a schedule (coupled). momentum: in [0, 1) (bitsandbytes' range
        for it), ignored.
      centered: divide by the estimated standard deviation :math:`\sqrt{\max(v - \mu^2, 0)}`
        (:math:`\mu` the moving average of :math:`g`, also 8-bit, signed map). An rmsjax
        extension: bitsandbytes raises ``NotImplementedError``.
      args: must be None. min_8bit_size: an int >= 0.

    Differences: bitsandbytes raises ``NotImplementedError`` for ``alpha=0`` and for
    ``centered=True``; rmsjax runs both (``alpha=0`` divides by :math:`|g| + \epsilon`).
    """
    _no_args(args)
    check_in_range("momentum", momentum, low=0.0, high=1.0, high_open=True)
    storage = library_storage(
        bitsandbytes_codec(signed=True), "min_8bit_size", min_size=min_8bit_size
    )
    with argument_names({"learning_rate": "lr", "decay": "alpha"}):
        if centered:
            scaler = T.scale_by_centered_rms(
                decay=alpha, eps=eps, eps_in_sqrt=False, mu_dtype=storage, nu_dtype=storage
            )
        else:
            scaler = T.scale_by_rms(decay=alpha, eps=eps, eps_in_sqrt=False, nu_dtype=storage)
        decay = [] if is_static_zero(weight_decay) else [T.add_decayed_weights(weight_decay)]
        step = descend(lr)
    return optax.chain(float32_updates(), *decay, scaler, step)
