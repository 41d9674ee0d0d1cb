"""Helpers shared by the bitsandbytes and torchao presets (not public)."""

from __future__ import annotations

import dataclasses
import zlib
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from rmsjax._types import HALF_FLOATS
from rmsjax.quantization import BlockCodec
from rmsjax.stochastic import stochastic_round
from rmsjax.storage import Quantized, quantized
from rmsjax.validation import display_name

__all__ = [
    "ParamRoundingState",
    "float32_updates",
    "library_storage",
    "round_bfloat16_params",
]


def library_storage(codec: BlockCodec, name: str, **changes: Any) -> Quantized:
    """``quantized(codec=...)`` with the codec's fields changed (``min_size`` from
    ``min_8bit_size``, torchao's ``block_size``); a bad value is reported under ``name``."""
    for field, value in changes.items():
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
            raise ValueError(f"`{display_name(name)}` must be an int >= 0, got {value!r}.")
        if field == "block_size" and value == 0:
            raise ValueError(f"`{display_name(name)}` must be an int >= 1, got 0.")
    try:
        return quantized(codec=dataclasses.replace(codec, **changes))
    except ValueError as err:  # e.g. an odd 4-bit block size
        raise ValueError(f"`{display_name(name)}`: {err}") from None


def float32_updates() -> optax.GradientTransformation:
    """Cast float16/bfloat16 updates to float32 (the libraries compute with ``grad.float()``):
    the rest of the chain, and the update it returns, are float32 for half-precision leaves;
    ``apply_updates`` then adds in float32 and rounds the parameter once, as the libraries'
    ``p.copy_(p_f32)`` does."""

    def update_fn(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        del params
        half = lambda u: jnp.dtype(u.dtype) in HALF_FLOATS
        if not any(half(u) for u in jax.tree.leaves(updates)):
            return updates, state  # the same tree (so a recording sees it, see rmsjax.stages)
        return jax.tree.map(lambda u: u.astype(jnp.float32) if half(u) else u, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


class ParamRoundingState(NamedTuple):
    """State of :func:`round_bfloat16_params`: the PRNG key data (uint32) split every step."""

    key: jax.Array


def round_bfloat16_params(seed: int = 0) -> optax.GradientTransformation:
    r"""Turn the update of each bfloat16 parameter into one that lands it on a stochastically
    rounded value: :math:`u' = \mathrm{SR}(\theta + u) - \theta` in float32.

    Placed last in a chain whose updates are float32 (:func:`float32_updates`),
    ``apply_updates(theta, u')`` computes :math:`\theta + u'` in float32, which is exactly the
    bfloat16 number :math:`\mathrm{SR}(\theta + u)` (both are bfloat16 values, so their
    difference and the sum are exact in float32), and casts it without a second rounding:
    torchao's ``bf16_stochastic_round``. Other dtypes pass unchanged. The key in the state is
    split at every step; each parameter's key is the step key folded with its key path.
    """

    def init_fn(params: Any) -> ParamRoundingState:
        del params
        return ParamRoundingState(key=jax.random.PRNGKey(seed))

    def update_fn(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        if params is None:
            raise ValueError(
                "bf16_stochastic_round needs the parameters: call update(grads, state, params)."
            )
        use, keep = jax.random.split(state.key)

        def leaf(path: Any, u: Any, p: Any) -> Any:
            if u is None or p is None or jnp.dtype(p.dtype) != jnp.dtype(jnp.bfloat16):
                return u
            key = jax.random.fold_in(use, zlib.crc32(jax.tree_util.keystr(path).encode()))
            p32 = p.astype(jnp.float32)
            rounded = stochastic_round(p32 + u.astype(jnp.float32), key, jnp.bfloat16)
            return rounded.astype(jnp.float32) - p32

        out = jax.tree_util.tree_map_with_path(leaf, updates, params, is_leaf=lambda x: x is None)
        return out, ParamRoundingState(key=keep)

    return optax.GradientTransformation(init_fn, update_fn)
