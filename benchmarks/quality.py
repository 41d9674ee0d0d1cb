"""Training quality with memory-efficient optimizer state: float32, bfloat16, 8 and 4 bits.

Trains tasks with AdamW, RMSProp and centered RMSProp (momentum 0.9), each with ALL of the
optimizer's moments stored one way (``mu_dtype``, ``nu_dtype``, ``momentum_dtype``; see
``rmsjax/storage/``): float32 (the default), bfloat16 (round to nearest, like optax's
``mu_dtype``), bfloat16 with stochastic rounding (``rmsjax.stochastic_rounding()``),
``rmsjax.quantized(8)``, ``rmsjax.quantized(4)``, and the first moments in 4 bits with a
factored second moment (``nu_dtype=rmsjax.factored()``); five seeds each. ``--storages`` also
takes the ablations of ``ABLATIONS`` (candidate 4-bit maps, roundings and block sizes, and
``"4-bit, torchao's scheme"``: torchao's 4-bit maps and rounding in rmsjax's layout, the old
default). The tasks run by default (``DEFAULT_TASKS``) are those whose float32 final loss is
stable across seeds and sensitive to the optimizer:

* ``digits``: an MLP (64-256-256-10) classifies scikit-learn's bundled 8 x 8 digits (1797
  images, no download), full batch, 300 steps; final loss = the training loss, which is small
  (about 0.002 nats) and so sensitive to how well the optimizer converges.
* ``autoencoder``: an MLP autoencoder (64-256-32-256-64, sigmoid output) on the same digits,
  full batch, 300 steps; final loss = 100 x the mean squared reconstruction error.
* ``char_rnn``: ``examples/char_rnn.py``, the GRU on the sonnets (no held-out split); final
  loss = training loss on the whole text (every window of 65 characters at a stride of 64,
  evaluated once after training, so the mini-batch noise of the last steps does not enter).

and, when named: ``mlp`` (``examples/mlp_classifier.py`` on three spirals, held-out loss: a
seed spread of 33-70%) and ``transformer`` (``examples/transformer_lm.py``, held-out loss on
the last 10% of the sonnets, which sits on a plateau where every storage ends within 0.3%).

A seed fixes the initial weights, the data (spirals) and the mini-batch order (and dropout
masks): the storages of one optimizer and seed see exactly the same batches, so their
difference is the storage's alone. Reported per task, optimizer and storage: the final loss
(mean and sample standard deviation over the seeds), its relative difference to float32 state
(the difference of the means, and the per-seed paired differences' mean and spread), the
fraction of moment entries really quantized (arrays of >= 4096 entries; the rest stay
float32), the state bytes per parameter, and the training step time relative to float32 state
in the same run (pure-JAX path: ``jax.jit`` of loss, gradient, ``update`` and
``apply_updates``, parameters and state donated; the median over timing rounds of the ratio,
the storages interleaved in time).

Usage::

  python benchmarks/quality.py            # the full run (about 30 min on 2 idle cores)
  python benchmarks/quality.py --quick    # smoke run (a few steps, 2 seeds; CI runs it)
  python benchmarks/quality.py --tasks digits --optimizers adamw --storages float32 4-bit
  python benchmarks/quality.py --tasks digits --storages "m: dynamic, nearest" "m: dynamic, SR"
  python benchmarks/quality.py --from-json benchmarks/results/quality.json  # redraw only
  python benchmarks/quality.py --from-json a/quality.json b/quality.json  # merge two runs

Writes ``<out>/quality.json`` and ``<out>/quality.md`` (default ``benchmarks/results``) and the
picture ``--plot`` (default ``docs/img/quality.png``; ``--plot ''`` for none). Needs the
``examples`` extra (Flax, matplotlib) and scikit-learn (the digits).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import char_rnn  # noqa: E402
import mlp_classifier  # noqa: E402
import transformer_lm  # noqa: E402
from flax import nnx  # noqa: E402
from machine import describe  # noqa: E402

import rmsjax  # noqa: E402

STORAGES: dict[str, Any] = {
    "float32": None,
    "bfloat16": jnp.bfloat16,
    "bfloat16 + SR": rmsjax.stochastic_rounding(jnp.bfloat16),
    "8-bit": rmsjax.quantized(8),
    "4-bit": rmsjax.quantized(4),
    "4-bit + factored ν": {"first": rmsjax.quantized(4), "second": rmsjax.factored()},  # noqa: RUF001
}


@dataclasses.dataclass(frozen=True)
class Rank1(rmsjax.storage.Storage[Any]):
    """Experimental (ablation only): Li et al.'s rank-1 normalisation of a matrix, 4-bit codes
    on the zero-free linear map k/16; the scale of entry (i, j) is min(row i's absolute
    maximum, column j's). Arrays that are not matrices of >= 4096 entries stay float32. The
    codes are kept one per byte (the memory is not what is measured here)."""

    def store(self, array: jax.Array, *, signed: bool, salt: str) -> Any:
        if array.ndim != 2 or array.size < 4096:
            return array
        return rmsjax.storage.StoredArray(self.encode(array, None), self)

    def _qmap(self) -> jax.Array:
        return jnp.arange(1, 17, dtype=jnp.float32) / 16

    def decode(self, data: Any) -> jax.Array:
        codes, rows, cols = data
        return self._qmap()[codes.astype(jnp.int32)] * jnp.minimum(rows[:, None], cols[None, :])

    def encode(self, x: jax.Array, data: Any) -> Any:
        x = x.astype(jnp.float32)
        rows, cols = jnp.max(jnp.abs(x), axis=1), jnp.max(jnp.abs(x), axis=0)
        scale = jnp.minimum(rows[:, None], cols[None, :])
        v = jnp.abs(x) / jnp.where(scale == 0, 1.0, scale)
        codes = jnp.clip(jnp.round(v * 16) - 1, 0, 15).astype(jnp.uint8)
        return (codes, rows, cols)

    def shape(self, data: Any) -> tuple[int, ...]:
        return tuple(data[0].shape)

    def decoded_dtype(self, data: Any) -> Any:
        return jnp.dtype(jnp.float32)

    def shardings(self, data: Any, sharding: Any, replicated: Any) -> Any:
        return (replicated, replicated, replicated)


def _codec(qmap: Any, *, block: int = 128, rounding: str = "nearest", scale: str = "max") -> Any:
    codec = rmsjax.quantization.BlockCodec(
        qmap=tuple(np.asarray(qmap, np.float32).tolist()),
        block_size=block,
        rounding=rounding,
        scale=scale,
    )
    return rmsjax.quantized(codec=codec)


# Candidate 4-bit maps (16 float32 values): see benchmarks/results/quality_ablation/.
_DYNAMIC = rmsjax.quantization.dynamic_map(True, exponent_bits=3, total_bits=4)
_DYNAMIC[0] = -1.0  # the old default's signed map (torchao's, its most negative value -1)
_POW2_SIGNED = np.concatenate([-(2.0 ** -np.arange(8)), 2.0 ** -np.arange(8)[::-1]])
_POW2_SIGNED_ZERO = np.concatenate([-(2.0 ** -np.arange(7)), [0.0], 2.0 ** -np.arange(8)[::-1]])
_LINEAR_SIGNED = np.linspace(-1, 1, 16)
_LINEAR_POSITIVE = np.arange(1, 17) / 16  # zero-free, the old default for second moments
_GEOMETRIC = np.geomspace(1e-4, 1, 16)
_POW2_POSITIVE = 2.0 ** -np.arange(16)[::-1]
_SQRT_LINEAR = (np.arange(1, 17) / 16) ** 2
# Ablations of the 4-bit storage (only with --storages). "m: ...": only the signed moments
# (AdamW's m, centered RMSProp's mean and momentum buffer) in 4 bits, "v: ...": only the
# second moment nu; the rest float32. "nearest" / "SR": round to the nearest code /
# stochastically between the two neighbouring codes.
ABLATIONS: dict[str, Any] = {
    "m: dynamic, nearest": {"first": _codec(_DYNAMIC), "second": None},
    "m: dynamic, SR": {"first": _codec(_DYNAMIC, rounding="stochastic"), "second": None},
    "m: dynamic, SR, blocks of 32": {
        "first": _codec(_DYNAMIC, block=32, rounding="stochastic"),
        "second": None,
    },
    "m: linear, SR": {"first": _codec(_LINEAR_SIGNED, rounding="stochastic"), "second": None},
    "m: powers of 2, SR": {"first": _codec(_POW2_SIGNED, rounding="stochastic"), "second": None},
    "m: powers of 2 and 0, SR": {
        "first": _codec(_POW2_SIGNED_ZERO, rounding="stochastic"),
        "second": None,
    },
    "m: powers of 2 and 0, SR, power-of-2 scale": {
        "first": _codec(_POW2_SIGNED_ZERO, rounding="stochastic", scale="power_of_two"),
        "second": None,
    },
    "m: powers of 2 and 0, SR, blocks of 32": {
        "first": _codec(_POW2_SIGNED_ZERO, block=32, rounding="stochastic"),
        "second": None,
    },
    "v: linear, nearest": {"first": None, "second": _codec(_LINEAR_POSITIVE)},
    "v: powers of 2, nearest, power-of-2 scale": {
        "first": None,
        "second": _codec(_POW2_POSITIVE, scale="power_of_two"),
    },
    "v: linear, SR": {"first": None, "second": _codec(_LINEAR_POSITIVE, rounding="stochastic")},
    "v: rank-1 linear, nearest": {"first": None, "second": Rank1()},
    "v: geometric 1e-4, nearest": {"first": None, "second": _codec(_GEOMETRIC)},
    "v: powers of 2, nearest": {"first": None, "second": _codec(_POW2_POSITIVE)},
    "v: powers of 2, SR": {"first": None, "second": _codec(_POW2_POSITIVE, rounding="stochastic")},
    "v: sqrt-linear, nearest": {"first": None, "second": _codec(_SQRT_LINEAR)},
    "m dynamic SR + v powers of 2": {
        "first": _codec(_DYNAMIC, rounding="stochastic"),
        "second": _codec(_POW2_POSITIVE),
    },
    "m powers of 2 SR + v powers of 2": {
        "first": _codec(_POW2_SIGNED, rounding="stochastic"),
        "second": _codec(_POW2_POSITIVE),
    },
    "m powers of 2 and 0 SR + v powers of 2, power-of-2 scales": {
        "first": _codec(_POW2_SIGNED_ZERO, rounding="stochastic", scale="power_of_two"),
        "second": _codec(_POW2_POSITIVE, scale="power_of_two"),
    },
    "4-bit, both moments SR": {
        "first": _codec(_POW2_SIGNED_ZERO, rounding="stochastic", scale="power_of_two"),
        "second": _codec(_POW2_POSITIVE, rounding="stochastic", scale="power_of_two"),
    },
    "4-bit, v nearest, max scale": {
        "first": _codec(_POW2_SIGNED_ZERO, rounding="stochastic", scale="power_of_two"),
        "second": _codec(_POW2_POSITIVE),
    },
    "4-bit, v SR, max scale": {
        "first": _codec(_POW2_SIGNED_ZERO, rounding="stochastic", scale="power_of_two"),
        "second": _codec(_POW2_POSITIVE, rounding="stochastic"),
    },
    "4-bit, torchao's scheme": {"first": _codec(_DYNAMIC), "second": _codec(_LINEAR_POSITIVE)},
    # the libraries' exact schemes (the codecs of rmsjax.compat.bitsandbytes / .torchao)
    "bitsandbytes 8-bit (preset codecs)": {
        "first": rmsjax.quantized(codec=rmsjax.quantization.bitsandbytes_codec(signed=True)),
        "second": rmsjax.quantized(codec=rmsjax.quantization.bitsandbytes_codec(signed=False)),
    },
    "torchao 8-bit (preset codecs)": {
        "first": rmsjax.quantized(codec=rmsjax.quantization.torchao_codec(8, signed=True)),
        "second": rmsjax.quantized(codec=rmsjax.quantization.torchao_codec(8, signed=False)),
    },
    "torchao 4-bit (preset codecs)": {
        "first": rmsjax.quantized(codec=rmsjax.quantization.torchao_codec(4, signed=True)),
        "second": rmsjax.quantized(codec=rmsjax.quantization.torchao_codec(4, signed=False)),
    },
    "FP8: E4M3, sqrt(v) in E4M3": rmsjax.float8(),
    "FP8: E4M3, v in E5M2": rmsjax.float8(second_moment="e5m2"),
    "m dynamic SR + v geometric": {
        "first": _codec(_DYNAMIC, rounding="stochastic"),
        "second": _codec(_GEOMETRIC),
    },
}
CHOICES = {**STORAGES, **ABLATIONS}
OPTIMIZERS = ("adamw", "rmsprop", "centered")
OPTIMIZER_TITLES = {
    "adamw": "AdamW",
    "rmsprop": "RMSProp",
    "centered": "centered RMSProp + momentum 0.9",
}
GOALS = {"8-bit": 0.01, "4-bit": 0.02}  # the goal: final loss within this of float32


def make_optimizer(
    name: str, lr: float, storage: Any, *, weight_decay: float, clip: float | None
) -> optax.GradientTransformation:
    """``name`` with every moment stored as ``storage`` (and gradient clipping if ``clip``);
    ``storage`` may be ``{"first": ..., "second": ...}``: the signed moments (AdamW's m,
    centered RMSProp's mean and momentum) one way, the second moment nu another."""
    first, second = (
        (storage["first"], storage["second"]) if isinstance(storage, dict) else (storage, storage)
    )
    if name == "adamw":
        tx = rmsjax.adamw(lr, weight_decay=weight_decay, mu_dtype=first, nu_dtype=second)
    elif name == "rmsprop":
        tx = rmsjax.rmsprop(lr, nu_dtype=second)
    elif name == "centered":
        tx = rmsjax.rmsprop(
            lr,
            centered=True,
            momentum=0.9,
            nu_dtype=second,
            mu_dtype=first,
            momentum_dtype=first,
        )
    else:
        raise ValueError(f"`name` must be one of {OPTIMIZERS}, got {name!r}.")
    return optax.chain(optax.clip_by_global_norm(clip), tx) if clip else tx


@dataclasses.dataclass(frozen=True)
class Task:
    """One training problem, built from an example's public functions.

    ``model(seed)`` makes the NNX model; ``loss(model, batch, key)`` is the training loss
    (``key``: a fresh PRNG key per step, for dropout); ``batches(seed)`` yields the mini-batches;
    ``final(seed)`` the data of the final loss, ``final_loss(model, data)`` computes it.
    """

    name: str
    title: str
    final_metric: str
    steps: int
    quick_steps: int
    timing_steps: int
    learning_rates: dict[str, float]
    weight_decay: float
    clip: float | None
    model: Callable[[int], nnx.Module]
    loss: Callable[[Any, Any, jax.Array], jax.Array]
    batches: Callable[[int], Iterator[Any]]
    final: Callable[[int], Any]
    final_loss: Callable[[Any, Any], jax.Array]


def _mlp_batches(seed: int) -> Iterator[Any]:
    x, y = mlp_classifier.make_spirals(4096, seed)
    rng = np.random.default_rng(seed + 2)
    while True:
        idx = rng.integers(0, len(x), size=mlp_classifier.BATCH)
        yield x[idx], y[idx]


def _rnn_text() -> np.ndarray:
    text = char_rnn.TEXT.read_text(encoding="utf-8")
    return char_rnn.Vocab(text).encode(text)


def _rnn_batches(seed: int) -> Iterator[Any]:
    data = _rnn_text()
    rng = np.random.default_rng(seed + 1)
    while True:
        yield char_rnn.windows(data, rng, char_rnn.BATCH)


def _rnn_final(seed: int) -> np.ndarray:
    data = _rnn_text()
    starts = range(0, len(data) - char_rnn.SEQ, char_rnn.SEQ)
    return np.stack([data[s : s + char_rnn.SEQ + 1] for s in starts])


def _digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled handwritten digits (1797 images of 8 x 8 pixels, 10 classes; no
    download), pixels scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return (data.data / 16.0).astype(np.float32), data.target.astype(np.int32)


def _full_batch(seed: int) -> Iterator[Any]:
    del seed
    batch = _digits()
    while True:
        yield batch


class Autoencoder(nnx.Module):
    """64 -> 256 -> 32 -> 256 -> 64 (ReLU between, sigmoid output): reconstructs a digit."""

    def __init__(self, *, rngs: nnx.Rngs) -> None:
        self.net = mlp_classifier.MLP([64, 256, 32, 256, 64], rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.sigmoid(self.net(x))


def _reconstruction_loss(model: Any, x: jax.Array) -> jax.Array:
    """Mean squared error per pixel, times 100 (a loss of order 1)."""
    return 100.0 * jnp.mean((model(x) - x) ** 2)


def _lm_batches(seed: int) -> Iterator[Any]:
    _, train_ids, _ = transformer_lm.load_text()
    rng = np.random.default_rng(seed + 1)
    while True:
        yield transformer_lm.windows(train_ids, rng, transformer_lm.BATCH)


def _lm_model(seed: int) -> nnx.Module:
    chars, _, _ = transformer_lm.load_text()
    return transformer_lm.TransformerLM(len(chars), rngs=nnx.Rngs(seed))


def _rnn_model(seed: int) -> nnx.Module:
    text = char_rnn.TEXT.read_text(encoding="utf-8")
    return char_rnn.CharRNN(len(char_rnn.Vocab(text).chars), rngs=nnx.Rngs(seed))


def _digits_task(
    name: str,
    title: str,
    metric: str,
    *,
    model: Callable[[int], nnx.Module],
    loss: Callable[[Any, Any], jax.Array],
) -> Task:
    """A full-batch task on scikit-learn's digits: 300 steps of the whole set, the final loss
    the training loss on it; learning rates 1e-3 (centered RMSProp with momentum: 1e-4)."""
    return Task(
        name=name,
        title=title,
        final_metric=metric,
        steps=300,
        quick_steps=5,
        timing_steps=50,
        learning_rates={"adamw": 1e-3, "rmsprop": 1e-3, "centered": 1e-4},
        weight_decay=1e-4,
        clip=None,
        model=model,
        loss=lambda model_, batch, key: loss(model_, batch),
        batches=_full_batch,
        final=lambda seed: _digits(),
        final_loss=loss,
    )


# Learning rates: the examples' (MLP: all three; char-RNN: rmsprop; transformer: adamw), the
# others chosen the same way (a common starting value that trains; centered RMSProp carries
# momentum 0.9, hence a 10x smaller rate). Not tuned per storage: every storage gets float32's.
TASKS = {
    "mlp": Task(
        name="mlp",
        title="MLP on three spirals",
        final_metric="held-out loss (2048 points)",
        steps=1000,
        quick_steps=20,
        timing_steps=100,
        learning_rates={"adamw": 1e-2, "rmsprop": 1e-2, "centered": 1e-3},
        weight_decay=1e-4,
        clip=None,
        model=lambda seed: mlp_classifier.MLP(mlp_classifier.SIZES, rngs=nnx.Rngs(seed)),
        loss=lambda model, batch, key: mlp_classifier.loss_fn(model, *batch),
        batches=_mlp_batches,
        final=lambda seed: mlp_classifier.make_spirals(2048, seed + 1),
        final_loss=lambda model, data: mlp_classifier.loss_fn(model, *data),
    ),
    "char_rnn": Task(
        name="char_rnn",
        title="GRU character model",
        final_metric="training loss on the whole text (nats/char)",
        steps=400,
        quick_steps=5,
        timing_steps=10,
        learning_rates={"adamw": 3e-3, "rmsprop": 3e-3, "centered": 3e-4},
        weight_decay=1e-4,
        clip=1.0,
        model=_rnn_model,
        loss=lambda model, batch, key: char_rnn.loss_fn(model, batch),
        batches=_rnn_batches,
        final=_rnn_final,
        final_loss=char_rnn.loss_fn,
    ),
    "digits": _digits_task(
        "digits",
        "MLP classifier on the digits",
        "training loss, full batch (nats)",
        model=lambda seed: mlp_classifier.MLP([64, 256, 256, 10], rngs=nnx.Rngs(seed)),
        loss=lambda model, data: mlp_classifier.loss_fn(model, *data),
    ),
    "autoencoder": _digits_task(
        "autoencoder",
        "autoencoder on the digits",
        "reconstruction loss, full batch (100 x MSE)",
        model=lambda seed: Autoencoder(rngs=nnx.Rngs(seed)),
        loss=lambda model, data: _reconstruction_loss(model, data[0]),
    ),
    "transformer": Task(
        name="transformer",
        title="transformer character model",
        final_metric="held-out loss, last 10% of the text (nats/char)",
        steps=300,
        quick_steps=3,
        timing_steps=5,
        learning_rates={
            "adamw": transformer_lm.LEARNING_RATE,
            "rmsprop": transformer_lm.LEARNING_RATE,
            "centered": transformer_lm.LEARNING_RATE / 10,
        },
        weight_decay=transformer_lm.WEIGHT_DECAY,
        clip=1.0,
        model=_lm_model,
        loss=transformer_lm.loss_fn,
        batches=_lm_batches,
        final=lambda seed: transformer_lm.eval_windows(transformer_lm.load_text()[2]),
        final_loss=transformer_lm.loss_fn,
    ),
}


# The tasks run by default: float32's final loss is stable across seeds (a spread of a few
# percent) and moves when the optimizer state is rounded badly. "mlp" (held-out loss, seed
# spread 33-70%) and "transformer" (held-out loss on a plateau: every storage ends within 0.3%)
# cannot tell good state from bad; they run when named.
DEFAULT_TASKS = ("digits", "autoencoder", "char_rnn")


def make_step(task: Task, graphdef: Any, tx: optax.GradientTransformation) -> Callable[..., Any]:
    """``(params, rest, opt_state, batch, key) -> (params, rest, opt_state, loss)``, jitted,
    donating ``params`` and ``opt_state`` (``rest``: the model's other state, e.g. the GRU's
    RNG counter). The gradient is NNX's (``nnx.value_and_grad`` of the example's loss with
    respect to the ``nnx.Param`` variables); the update is the optax-protocol ``tx.update``
    and ``rmsjax.apply_updates`` on the parameters' ``nnx.State``."""

    @functools.partial(jax.jit, donate_argnums=(0, 2))
    def step(
        params: Any, rest: Any, opt_state: Any, batch: Any, key: jax.Array
    ) -> tuple[Any, Any, Any, Any]:
        model = nnx.merge(graphdef, params, rest)
        loss, grads = nnx.value_and_grad(task.loss)(model, batch, key)
        updates, opt_state = tx.update(grads, opt_state, params)
        _, _, rest = nnx.split(model, nnx.Param, ...)
        return rmsjax.apply_updates(params, updates), rest, opt_state, loss

    return step


def state_stats(opt_state: Any, params: Any) -> dict[str, float]:
    """State bytes per parameter, and the fraction of moment entries held quantized: entries of
    quantized moments over entries of all per-parameter moments (the scalar step count is not a
    moment)."""
    n_params = sum(x.size for x in jax.tree.leaves(params))
    total_bytes = sum(x.nbytes for x in jax.tree.leaves(opt_state))
    quantized = plain = 0
    for leaf in jax.tree.leaves(opt_state, is_leaf=rmsjax.storage.is_stored):
        if rmsjax.storage.is_stored(leaf):
            entries = int(np.prod(leaf.moment_shape()))
            if isinstance(leaf.storage, (rmsjax.Quantized, rmsjax.Factored)):
                quantized += entries
            else:
                plain += entries
        elif jnp.ndim(leaf) > 0:
            plain += int(jnp.size(leaf))
    return {
        "state_bytes_per_param": total_bytes / n_params,
        "quantized_fraction": quantized / (quantized + plain),
        "params": n_params,
    }


def curve(losses: np.ndarray, points: int = 50) -> list[float]:
    """The loss curve as the means of ``points`` consecutive chunks (for the picture)."""
    chunks = np.array_split(losses, min(points, len(losses)))
    return [float(c.mean()) for c in chunks]


def train_once(
    task: Task,
    step: Callable[..., Any],
    final_fn: Callable[..., Any],
    seed: int,
    steps: int,
    tx: optax.GradientTransformation,
) -> tuple[dict[str, Any], tuple[Any, Any, Any]]:
    """One training run: (final loss, last-steps training loss, curve, seconds per step, state
    statistics; the final ``(params, rest, opt_state)``)."""
    load = os.getloadavg()[0]
    _, params, rest = nnx.split(task.model(seed), nnx.Param, ...)
    opt_state = jax.jit(tx.init)(params)
    stats = state_stats(opt_state, params)
    batches = task.batches(seed)
    keys = jax.random.key(seed + 2)
    params, rest, opt_state, first = step(
        params, rest, opt_state, next(batches), jax.random.fold_in(keys, 1)
    )
    losses = [first]
    jax.block_until_ready((params, opt_state))
    start = time.perf_counter()
    for i in range(2, steps + 1):
        params, rest, opt_state, loss = step(
            params, rest, opt_state, next(batches), jax.random.fold_in(keys, i)
        )
        losses.append(loss)
    jax.block_until_ready((params, opt_state))
    seconds = (time.perf_counter() - start) / max(steps - 1, 1)
    values = np.asarray(jax.device_get(losses), np.float64)
    final = float(final_fn(params, rest, task.final(seed)))
    last = max(1, steps // 20)
    record = {
        "seed": seed,
        "load": load,
        "final_loss": final,
        "train_loss_last": float(values[-last:].mean()),
        "finite": bool(np.all(np.isfinite(values)) and np.isfinite(final)),
        "seconds_per_step": seconds,
        "curve": curve(values),
        **stats,
    }
    return record, (params, rest, opt_state)


def time_steps(
    task: Task,
    compiled: dict[str, Callable[..., Any]],
    carries: dict[str, tuple[Any, Any, Any]],
    rounds: int,
    log: Callable[[str], None],
) -> dict[str, dict[str, float]]:
    """Seconds per training step of each storage, interleaved: ``rounds`` rounds, each running
    ``task.timing_steps`` steps of every storage (one fixed batch) in an order that rotates
    every round. Per storage: the median seconds per step and the median over rounds of the
    ratio to float32's time in the same round."""
    batch = next(task.batches(0))
    key = jax.random.key(0)
    names = list(compiled)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            params, rest, opt_state = carries[name]
            start = time.perf_counter()
            for _ in range(task.timing_steps):
                params, rest, opt_state, _ = compiled[name](params, rest, opt_state, batch, key)
            jax.block_until_ready((params, opt_state))
            times[name].append((time.perf_counter() - start) / task.timing_steps)
            carries[name] = (params, rest, opt_state)
    out = {}
    for name in names:
        ratios = [a / b for a, b in zip(times[name], times["float32"], strict=True)]
        out[name] = {
            "timed_ms_per_step": 1e3 * statistics.median(times[name]),
            "step_time_ratio": statistics.median(ratios),
        }
        log(
            f"{task.name:11s} timing {name:8s} {out[name]['timed_ms_per_step']:.2f} ms/step, "
            f"{out[name]['step_time_ratio']:.2f} x float32"
        )
    return out


def run_task(
    task: Task,
    optimizers: list[str],
    storages: list[str],
    seeds: list[int],
    steps: int,
    log: Callable[[str], None],
    *,
    rounds: int,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every (optimizer, seed, storage) run of ``task`` (storages innermost, so that the runs
    being compared follow each other in time), then the interleaved step timing of each
    optimizer's storages (:func:`time_steps`, continuing from the last seed's state): (runs,
    timings)."""
    graphdef, _, _ = nnx.split(task.model(0), nnx.Param, ...)

    @jax.jit
    def final_fn(params: Any, rest: Any, data: Any) -> jax.Array:
        return task.final_loss(nnx.merge(graphdef, params, rest), data)

    runs = []
    timings = []
    for opt_name in optimizers:
        lr = task.learning_rates[opt_name]
        compiled = {}
        txs = {}
        for storage in storages:
            txs[storage] = make_optimizer(
                opt_name, lr, CHOICES[storage], weight_decay=task.weight_decay, clip=task.clip
            )
            compiled[storage] = make_step(task, graphdef, txs[storage])
        carries = {}
        for seed in seeds:
            for storage in storages:
                start = time.perf_counter()
                run, carries[storage] = train_once(
                    task, compiled[storage], final_fn, seed, steps, txs[storage]
                )
                run.update(task=task.name, optimizer=opt_name, storage=storage, lr=lr)
                runs.append(run)
                log(
                    f"{task.name:11s} {opt_name:8s} seed {seed} {storage:8s} "
                    f"final {run['final_loss']:.4f}  {1e3 * run['seconds_per_step']:.1f} ms/step"
                    f"  ({time.perf_counter() - start:.1f} s)"
                )
        for storage, timing in time_steps(task, compiled, carries, rounds, log).items():
            timings.append({"task": task.name, "optimizer": opt_name, "storage": storage, **timing})
    return runs, timings


def summarize(runs: list[dict[str, Any]], timings: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (task, optimizer, storage): the final loss over seeds and its difference to float32.

    ``rel_diff``: (mean - float32 mean) / float32 mean. ``paired_rel_mean`` / ``_std``: mean and
    sample standard deviation over seeds of (loss - float32 loss of the same seed) / the latter.
    ``float32_rel_std``: float32's own seed-to-seed spread, std / mean. ``train_ms_per_step``:
    the median over seeds of the training loops' time per step (load-sensitive);
    ``timed_ms_per_step`` and ``step_time_ratio``: from the interleaved timing
    (:func:`time_steps`).
    """
    timed = {(t["task"], t["optimizer"], t["storage"]): t for t in timings}
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["task"], r["optimizer"], r["storage"]), []).append(r)
    rows = []
    for (task, opt, storage), rs in groups.items():
        base = {r["seed"]: r for r in groups.get((task, opt, "float32"), [])}
        finals = [r["final_loss"] for r in rs]
        row: dict[str, Any] = {
            "task": task,
            "optimizer": opt,
            "storage": storage,
            "seeds": len(rs),
            "final_mean": statistics.fmean(finals),
            "final_std": statistics.stdev(finals) if len(finals) > 1 else float("nan"),
            "finite": all(r["finite"] for r in rs),
            "quantized_fraction": rs[0]["quantized_fraction"],
            "state_bytes_per_param": rs[0]["state_bytes_per_param"],
            "params": rs[0]["params"],
            "train_ms_per_step": 1e3 * statistics.median(r["seconds_per_step"] for r in rs),
        }
        if (task, opt, storage) in timed:
            t = timed[task, opt, storage]
            row.update(
                timed_ms_per_step=t["timed_ms_per_step"], step_time_ratio=t["step_time_ratio"]
            )
        if base and all(r["seed"] in base for r in rs):
            f32 = [base[r["seed"]]["final_loss"] for r in rs]
            paired = [(r["final_loss"] - b) / b for r, b in zip(rs, f32, strict=True)]
            f32_mean = statistics.fmean(f32)
            row.update(
                rel_diff=(row["final_mean"] - f32_mean) / f32_mean,
                paired_rel_mean=statistics.fmean(paired),
                paired_rel_std=statistics.stdev(paired) if len(paired) > 1 else float("nan"),
                float32_rel_std=(statistics.stdev(f32) / f32_mean)
                if len(f32) > 1
                else float("nan"),
            )
            # Beyond the seed noise: the paired mean more than two standard errors from 0.
            se = row["paired_rel_std"] / np.sqrt(len(paired))
            row["beyond_noise"] = bool(np.isfinite(se) and abs(row["paired_rel_mean"]) > 2 * se)
            goal = GOALS.get(storage)
            if goal is not None:
                row["goal"] = goal
                row["goal_met"] = bool(row["rel_diff"] <= goal)
        rows.append(row)
    return rows


def versions() -> str:
    import flax

    return (
        f"Python {platform.python_version()}, jax {jax.__version__}, flax {flax.__version__}, "
        f"optax {optax.__version__}, numpy {np.__version__}"
    )


def _pct(x: float) -> str:
    return "n/a" if not np.isfinite(x) else f"{100 * x:+.2f}%"


def markdown(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    storages = meta["storages"]
    lines = [
        "# Training quality with memory-efficient optimizer state",
        "",
        f"Produced by `{meta['command']}` in {meta['wall_s'] / 60:.1f} min.",
        "",
        f"* Machine: {meta['machine']}; GPU: {meta['gpu']}.",
        f"* Load average (1 min; the machine is shared): {meta['load'][0]:.2f} at the start, "
        f"{meta['load'][1]:.2f} at the end; at the start of the training runs "
        f"{meta['load_during']['min']:.2f} to {meta['load_during']['max']:.2f} "
        f"(mean {meta['load_during']['mean']:.2f}).",
        f"* Versions: {meta['versions']}.",
        f"* Seeds: {meta['seeds']}; steps: "
        + ", ".join(f"{t} {s}" for t, s in meta["steps"].items())
        + ".",
        "* Storage of every moment: float32 (default), bfloat16 (round to nearest), "
        "`bfloat16 + SR` (`rmsjax.stochastic_rounding()`), `rmsjax.quantized(8)`, "
        "`rmsjax.quantized(4)`; `4-bit + factored ν`: the first moments `quantized(4)`, the "  # noqa: RUF001
        "second moment `rmsjax.factored()`. Arrays below 4096 entries stay float32.",
    ]
    if any(name in ABLATIONS for name in storages):
        lines.append(
            "* Ablations of 4 bits (see `ABLATIONS` in `benchmarks/quality.py`): `m: ...`: only "
            "the signed moments (AdamW's m, centered RMSProp's mean and momentum) in 4 bits, the "
            "rest float32; `v: ...`: only the second moment nu in 4 bits; otherwise both. Maps: "
            "`dynamic` (torchao's 16-value map, -1 for its lowest value), `powers of 2 and 0` "
            "(0, ±2^-6..±1 and 2^-7), `powers of 2` (±2^-7..±1 signed, no zero; 2^-15..1 for "
            "nu), `linear` (-1..1 in 15 steps; k/16 for nu), `geometric 1e-4` (16 values from "
            "1e-4 to 1), `sqrt-linear` ((k/16)^2), `rank-1 linear` (k/16, the scale of an entry "
            "the smaller of its row's and column's maxima, Li et al.); `nearest` / `SR`: round "
            "to the nearest code / stochastically between the two neighbouring codes; scales "
            "the block's maximum unless `power-of-2 scale`; blocks of 128 unless stated."
        )
    lines += [
        "* Relative difference: (mean final loss - float32's) / float32's; paired: the same per "
        "seed (same weights and batches), mean ± standard deviation over seeds; float32 spread: "
        "float32's own standard deviation over seeds / mean. Goal (issue 19): at most +1% at "
        "8 bits, +2% at 4 bits (a lower loss meets it).",
        "* Step time: pure-JAX path (`jax.jit` of loss, gradient, `update`, `apply_updates`), "
        f"{meta['timing']['rounds']} rounds, each running every storage's step "
        + ", ".join(f"{t}: {n}" for t, n in meta["timing"]["steps"].items())
        + " times on one batch in an order rotating per round; ms/step: the median over rounds; "
        "vs float32: the median over rounds of the ratio to float32 in the same round.",
        "",
        "## Final loss relative to float32 state",
        "",
        "| task | optimizer | float32 final loss | "
        + " | ".join(s for s in storages if s != "float32")
        + " | float32 spread |",
        "|---|---|---:|" + "---:|" * (len(storages) - 1) + "---:|",
    ]
    index = {(r["task"], r["optimizer"], r["storage"]): r for r in rows}
    for task in meta["tasks"]:
        for opt in meta["optimizers"]:
            base = index.get((task, opt, "float32"))
            if base is None:
                continue
            cells = []
            for s in storages:
                if s == "float32":
                    continue
                r = index.get((task, opt, s))
                if r is None:  # a storage that this task was not run with (merged runs)
                    cells.append("")
                    continue
                mark = ""
                if not r.get("goal_met", True):
                    mark = " ✗" if r["beyond_noise"] else " (✗)"
                cells.append(f"{_pct(r['rel_diff'])}{mark}")
            spread = base.get("float32_rel_std", float("nan"))
            lines.append(
                f"| {task} | {opt} | {base['final_mean']:.4f} ± {base['final_std']:.4f} | "
                + " | ".join(cells)
                + f" | {'n/a' if not np.isfinite(spread) else f'{100 * spread:.2f}%'} |"
            )
    lines += [
        "",
        "✗: the goal missed (more than +1% at 8 bits, +2% at 4 bits) and the paired difference is "
        "more than two standard errors (std / sqrt(seeds)) from 0; (✗): above the goal but "
        "within that seed noise.",
        "",
        "## Details per storage",
        "",
        "| task | optimizer | storage | final loss (mean ± std) | rel. diff | paired rel. diff "
        "| quantized | state B/param | ms/step | step time vs float32 |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        paired = (
            f"{_pct(r['paired_rel_mean'])} ± {100 * r['paired_rel_std']:.2f}%"
            if "paired_rel_mean" in r and np.isfinite(r["paired_rel_std"])
            else "n/a"
        )
        lines.append(
            f"| {r['task']} | {r['optimizer']} | {r['storage']} | {r['final_mean']:.4f} ± "
            f"{r['final_std']:.4f} | {_pct(r.get('rel_diff', float('nan')))} | {paired} | "
            f"{100 * r['quantized_fraction']:.1f}% | {r['state_bytes_per_param']:.3f} | "
            f"{r.get('timed_ms_per_step', float('nan')):.2f} | "
            f"{r.get('step_time_ratio', float('nan')):.2f} |"
        )
    lines += ["", "## Tasks", ""]
    for name in meta["tasks"]:
        t = TASKS[name]
        lines.append(
            f"* `{name}` ({t.title}): {meta['steps'][name]} steps, final loss = {t.final_metric}; "
            "learning rates "
            + ", ".join(f"{o} {t.learning_rates[o]:g}" for o in meta["optimizers"])
            + f"; AdamW weight decay {t.weight_decay:g}"
            + (f"; gradient clipped to global norm {t.clip:g}" if t.clip else "")
            + "."
        )
    return "\n".join(lines) + "\n"


def plot(
    meta: dict[str, Any], runs: list[dict[str, Any]], rows: list[dict[str, Any]], path: str
) -> None:
    """Top: AdamW's training-loss curves per task (mean over seeds) for each storage; bottom:
    the final loss relative to float32 per optimizer and storage, with the paired seed spread
    as error bars, float32's own seed spread as a grey band and the goals as dashed lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    tasks, storages, opts = meta["tasks"], meta["storages"], meta["optimizers"]
    palette = ["black", "tab:orange", "tab:blue", "tab:green", "tab:red", "tab:purple", "tab:brown"]
    colors = {s: palette[i % len(palette)] for i, s in enumerate(storages)}
    fig, axes = plt.subplots(2, len(tasks), figsize=(4.2 * len(tasks), 6.6), dpi=100, squeeze=False)
    curve_opt = "adamw" if "adamw" in opts else opts[0]
    for j, task in enumerate(tasks):
        ax = axes[0, j]
        for s in storages:
            cs = [
                r["curve"]
                for r in runs
                if (r["task"], r["optimizer"], r["storage"]) == (task, curve_opt, s)
            ]
            mean = np.mean(np.asarray(cs), axis=0)
            x = np.linspace(1, meta["steps"][task], len(mean))
            ax.plot(x, mean, color=colors[s], lw=1.2, label=s, ls="--" if s == "4-bit" else "-")
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1, 2, 3, 5)))
        ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_title(f"{TASKS[task].title}: {OPTIMIZER_TITLES[curve_opt]}", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.set_ylabel("training loss (mean of seeds)", fontsize=8)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
        if j == 0:
            ax.legend(fontsize=7, title="state storage", title_fontsize=7)

        ax = axes[1, j]
        index = {(r["optimizer"], r["storage"]): r for r in rows if r["task"] == task}
        others = [s for s in storages if s != "float32"]
        width = 0.8 / max(len(others), 1)
        for i, opt in enumerate(opts):
            base = index.get((opt, "float32"), {})
            band = 100 * base.get("float32_rel_std", float("nan"))
            if np.isfinite(band):
                ax.fill_between([i - 0.45, i + 0.45], -band, band, color="0.85", lw=0)
            for k, s in enumerate(others):
                r = index.get((opt, s))
                if r is None or "rel_diff" not in r:
                    continue
                err = 100 * r["paired_rel_std"] if np.isfinite(r["paired_rel_std"]) else 0
                ax.bar(
                    i - 0.4 + width * (k + 0.5),
                    100 * r["rel_diff"],
                    width,
                    yerr=err,
                    color=colors[s],
                    capsize=2,
                    label=s if i == 0 else None,
                )
        for goal, style in ((1, ":"), (2, "--")):
            ax.axhline(goal, color="red", lw=0.8, ls=style)
        ax.axhline(0, color="black", lw=0.6)
        ax.set_xticks(
            range(len(opts)), [OPTIMIZER_TITLES[o].split(" +")[0] for o in opts], fontsize=8
        )
        ax.set_ylabel("final loss vs float32 state (%)", fontsize=8)
        ax.set_title(TASKS[task].final_metric, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3, axis="y")
        if j == 0:
            ax.legend(fontsize=7)
    fig.suptitle(
        "Optimizer state in float32, bfloat16, 8 and 4 bits: "
        f"{len(meta['seeds'])} seeds; grey: float32's seed spread; red: the +1% / +2% goals",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def merge(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One result of several runs of this script (each with its own tasks): runs and timings
    concatenated; tasks, storages, optimizers and seeds in order of appearance; steps joined;
    commands and wall times listed."""
    if len(results) == 1:
        return results[0]
    first = results[0]["meta"]
    meta = dict(first)
    ordered = lambda key: list(dict.fromkeys(x for r in results for x in r["meta"][key]))
    for key in ("tasks", "optimizers", "storages", "seeds"):
        meta[key] = ordered(key)
    meta["steps"] = {k: v for r in results for k, v in r["meta"]["steps"].items()}
    meta["timing"] = {
        "rounds": first["timing"]["rounds"],
        "steps": {k: v for r in results for k, v in r["meta"]["timing"]["steps"].items()},
    }
    meta["command"] = " ; ".join(r["meta"]["command"] for r in results)
    meta["wall_s"] = sum(r["meta"]["wall_s"] for r in results)
    meta["wall_s_each"] = [r["meta"]["wall_s"] for r in results]
    loads = [r["meta"]["load_during"] for r in results]
    meta["load_during"] = {
        "min": min(x["min"] for x in loads),
        "mean": statistics.fmean(x["mean"] for x in loads),
        "max": max(x["max"] for x in loads),
    }
    return {
        "meta": meta,
        "runs": [x for r in results for x in r["runs"]],
        "timings": [x for r in results for x in r.get("timings", [])],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark (``argv``: command-line arguments); return the JSON written."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few steps, 2 seeds (smoke run)")
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(DEFAULT_TASKS))
    parser.add_argument("--optimizers", nargs="+", choices=OPTIMIZERS, default=list(OPTIMIZERS))
    parser.add_argument(
        "--storages",
        nargs="+",
        choices=list(CHOICES),
        default=list(STORAGES),
        help="float32 is always run (the reference); the 4-bit ablations only when named",
    )
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (5; quick 2)")
    parser.add_argument("--steps", type=int, default=None, help="steps of every task")
    parser.add_argument("--rounds", type=int, default=None, help="timing rounds (3; quick 2)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--plot", default=str(ROOT / "docs" / "img" / "quality.png"))
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument(
        "--from-json",
        nargs="+",
        default=None,
        help="only recompute the summary, quality.md and the picture from these JSONs' runs "
        "(several: runs of separate processes, e.g. one per task, merged)",
    )
    args = parser.parse_args(argv)
    if args.from_json:
        result = merge([json.loads(Path(f).read_text()) for f in args.from_json])
        meta, runs = result["meta"], result["runs"]
        rows = result["summary"] = summarize(runs, result.get("timings", []))
        Path(args.out, "quality.json").write_text(json.dumps(result, indent=1))
        Path(args.out, "quality.md").write_text(markdown(meta, rows))
        if args.plot:
            plot(meta, runs, rows, args.plot)
        return result
    storages = ["float32", *[s for s in args.storages if s != "float32"]]
    seeds = list(range(args.seeds or (2 if args.quick else 5)))
    steps = {
        t: args.steps or (TASKS[t].quick_steps if args.quick else TASKS[t].steps)
        for t in args.tasks
    }
    log = (lambda _: None) if args.quiet else functools.partial(print, flush=True)

    load_start = os.getloadavg()[0]
    start = time.perf_counter()
    runs, timings = [], []
    rounds = args.rounds or (2 if args.quick else 3)
    for name in args.tasks:
        task_runs, task_timings = run_task(
            TASKS[name], args.optimizers, storages, seeds, steps[name], log, rounds=rounds
        )
        runs += task_runs
        timings += task_timings
    rows = summarize(runs, timings)
    loads = [r["load"] for r in runs]
    meta = {
        "command": " ".join(
            ["python benchmarks/quality.py", shlex.join(sys.argv[1:] if argv is None else argv)]
        ).strip(),
        "machine": describe(),
        "versions": versions(),
        "load": [load_start, os.getloadavg()[0]],
        "load_during": {"min": min(loads), "mean": statistics.fmean(loads), "max": max(loads)},
        "timing": {"rounds": rounds, "steps": {t: TASKS[t].timing_steps for t in args.tasks}},
        "wall_s": time.perf_counter() - start,
        "tasks": args.tasks,
        "optimizers": args.optimizers,
        "storages": storages,
        "seeds": seeds,
        "steps": steps,
        "gpu": "not measured (no GPU available to this run)",
    }
    result = {"meta": meta, "summary": rows, "runs": runs, "timings": timings}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.json").write_text(json.dumps(result, indent=1))
    (out / "quality.md").write_text(markdown(meta, rows))
    if args.plot:
        plot(meta, runs, rows, args.plot)
    log(markdown(meta, rows))
    return result


if __name__ == "__main__":
    main()
