"""A character-level GRU (Flax NNX) learns Shakespeare's sonnets: rmsprop versus sgd.

Recurrent networks are the non-stationary setting RMSProp was made for (Graves 2013 trained
his LSTM text and handwriting models with centered RMSProp): a per-weight running RMS of the
gradient adapts each weight's step as training moves, where one global step size cannot.
The text is ``examples/data/sonnets.txt`` (a few KB of public-domain verse shipped with the
repository). With so little text the model ends up learning it by heart; what the example
shows is how fast each optimizer gets there.

    python examples/char_rnn.py                   # both optimizers, writes char_rnn.png
    python examples/char_rnn.py --steps 1000 --out rnn.png

Prints the training loss (bits per character) as training goes, text sampled from each trained
model, and writes a PNG of the loss curves.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import rmsjax

TEXT = Path(__file__).resolve().parent / "data" / "sonnets.txt"
SEQ, BATCH, EMBED, HIDDEN = 64, 32, 32, 128


# Gradient clipping is the usual companion of both in RNN training; it is the same for both.
OPTIMIZERS: dict[str, tuple[str, Callable[[], optax.GradientTransformation]]] = {
    "rmsprop": (
        "rmsprop (lr 3e-3)",
        lambda: optax.chain(optax.clip_by_global_norm(1.0), rmsjax.rmsprop(3e-3)),
    ),
    "sgd": (
        "sgd + momentum 0.9 (lr 0.1)",
        lambda: optax.chain(optax.clip_by_global_norm(1.0), rmsjax.sgd(0.1, momentum=0.9)),
    ),
}


class Vocab:
    """Characters <-> integer ids."""

    def __init__(self, text: str) -> None:
        self.chars = sorted(set(text))
        self.index = {c: i for i, c in enumerate(self.chars)}

    def encode(self, text: str) -> np.ndarray:
        return np.array([self.index[c] for c in text], np.int32)

    def decode(self, ids: np.ndarray) -> str:
        return "".join(self.chars[int(i)] for i in ids)


class CharRNN(nnx.Module):
    """Embedding -> GRU -> linear read-out of the next character's logits."""

    def __init__(self, vocab_size: int, *, rngs: nnx.Rngs) -> None:
        self.embed = nnx.Embed(vocab_size, EMBED, rngs=rngs)
        self.cell = nnx.GRUCell(EMBED, HIDDEN, rngs=rngs)
        self.rnn = nnx.RNN(self.cell)
        self.out = nnx.Linear(HIDDEN, vocab_size, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return self.out(self.rnn(self.embed(tokens)))

    def step(self, carry: jax.Array, token: jax.Array) -> tuple[jax.Array, jax.Array]:
        """One character at a time (for sampling): (new carry, logits)."""
        carry, h = self.cell(carry, self.embed(token))
        return carry, self.out(h)


def loss_fn(model: CharRNN, tokens: jax.Array) -> jax.Array:
    """Mean next-character cross-entropy (nats)."""
    logits = model(tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


@nnx.jit
def train_step(model: CharRNN, optimizer: nnx.Optimizer, tokens: jax.Array) -> jax.Array:
    loss, grads = nnx.value_and_grad(loss_fn)(model, tokens)
    optimizer.update(model, grads)
    return loss


@nnx.jit
def sample_step(
    model: CharRNN, carry: jax.Array, token: jax.Array, key: jax.Array, temperature: float
) -> tuple[jax.Array, jax.Array]:
    carry, logits = model.step(carry, token)
    return carry, jax.random.categorical(key, logits / temperature)


def sample(
    model: CharRNN, vocab: Vocab, prompt: str, length: int, seed: int, temperature: float = 0.7
) -> str:
    """Feed ``prompt``, then draw ``length`` characters."""
    key = jax.random.key(seed)
    carry = jnp.zeros((1, HIDDEN))
    ids = vocab.encode(prompt)
    token = jnp.asarray(ids[:1])
    for i in ids[1:]:
        key, sub = jax.random.split(key)
        carry, _ = sample_step(model, carry, token, sub, temperature)
        token = jnp.asarray([i])
    out = []
    for _ in range(length):
        key, sub = jax.random.split(key)
        carry, token = sample_step(model, carry, token, sub, temperature)
        out.append(int(token[0]))
    return prompt + vocab.decode(np.array(out))


def windows(data: np.ndarray, rng: np.random.Generator, count: int) -> np.ndarray:
    """``count`` random windows of SEQ + 1 characters."""
    starts = rng.integers(0, len(data) - SEQ - 1, size=count)
    return np.stack([data[s : s + SEQ + 1] for s in starts])


def train(
    name: str, steps: int, seed: int = 0, *, verbose: bool = True
) -> tuple[list[float], CharRNN, Vocab]:
    """Train with optimizer ``name``: (losses per step in nats/char, model, vocab)."""
    from tqdm import tqdm

    text = TEXT.read_text(encoding="utf-8")
    vocab = Vocab(text)
    data = vocab.encode(text)
    model = CharRNN(len(vocab.chars), rngs=nnx.Rngs(seed))
    optimizer = nnx.Optimizer(model, OPTIMIZERS[name][1](), wrt=nnx.Param)
    step = nnx.cached_partial(train_step, model, optimizer)
    rng = np.random.default_rng(seed + 1)
    losses: list[float] = []
    bar = tqdm(range(1, steps + 1), desc=f"{name:8s}", disable=not verbose)
    for i in bar:
        losses.append(float(step(windows(data, rng, BATCH))))
        if i % 25 == 0:
            bar.set_postfix(bits_per_char=f"{np.mean(losses[-25:]) / np.log(2):.2f}")
    return losses, model, vocab


def plot(curves: dict[str, list[float]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=100)
    for name, losses in curves.items():
        bits = np.asarray(losses) / np.log(2)
        smooth = np.convolve(bits, np.ones(10) / 10, mode="valid")
        ax.plot(np.arange(10, len(bits) + 1), smooth, lw=1.4, label=OPTIMIZERS[name][0])
    ax.set_xlabel("step")
    ax.set_ylabel("training loss, bits/char (moving avg. of 10)")
    ax.set_title("GRU character model (Flax NNX) on Shakespeare's sonnets")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the example (``argv``: command-line arguments); return the loss curves."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--out", default="char_rnn.png", help="PNG of the loss curves")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sample-length", type=int, default=240, help="characters to sample")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    curves = {}
    for name in OPTIMIZERS:
        losses, model, vocab = train(name, args.steps, args.seed)
        curves[name] = losses
        bits = np.mean(losses[-25:]) / np.log(2)
        print(f"\n{name}: training loss {bits:.2f} bits/char after {args.steps} steps. Sample:")
        print(sample(model, vocab, "Shall I ", args.sample_length, seed=args.seed))
        print()
    print(f"trained in {time.perf_counter() - start:.1f} s")
    plot(curves, args.out)
    print(f"wrote {args.out}")
    return curves


if __name__ == "__main__":
    main()
