"""A small decoder-only transformer (Flax NNX) models Shakespeare's sonnets, with AdamW state
in float32, 8 bits and 4 bits.

The model reads 64 characters and predicts each next one: token and position embeddings, two
pre-norm blocks of causal self-attention (4 heads) and an MLP, and a linear read-out (421k
parameters). ``d_model`` 128 and an MLP of 512 make every weight matrix at least 4096 entries,
so under ``rmsjax.quantized`` nearly all of the optimizer state is actually stored in 8 or 4
bits (arrays below 4096 entries -- biases, layer norms -- stay float32). The text is
``examples/data/sonnets.txt``: the first 90% is trained on, the last 10% is held out for an
evaluation loss. Every run starts from the same weights and sees the same mini-batches and
dropout masks; only how AdamW stores its two moments differs (``mu_dtype`` / ``nu_dtype``, see
``docs/guides/memory.md``).

    python examples/transformer_lm.py                        # float32, 8-bit, 4-bit state
    python examples/transformer_lm.py --storage 8-bit --steps 600 --out lm.png

Prints the optimizer's state bytes per parameter, the training and held-out losses (bits per
character), text sampled from each trained model, and writes a PNG of the held-out loss
curves. 4 KB of text is little for a transformer: it soon learns the training part by heart.
Dropout (0.3) and a modest learning rate hold the held-out loss on a plateau, near 3.7 bits per
character, from about step 100 to step 400 at least; the training loss keeps falling.

The training loop is functional NNX (``nnx.split`` once, ``nnx.merge`` inside a ``jax.jit``
step with an optax state); flax's ``nnx.Optimizer`` trains the same state equally well (see
"With Flax NNX" in ``docs/guides/memory.md``).
"""

from __future__ import annotations

import argparse
import functools
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
HELD_OUT = 0.1  # the last 10% of the text
SEQ, BATCH = 64, 16
D_MODEL, LAYERS, HEADS, MLP = 128, 2, 4, 512
# 4 KB of text: without dropout the model learns the training part by heart within 200 steps
# and the held-out loss climbs from there; with it (and a modest learning rate) the held-out
# loss stays on a plateau for hundreds of steps.
DROPOUT = 0.3
LEARNING_RATE, WEIGHT_DECAY = 5e-4, 0.1

# name -> storage of both AdamW moments (None: float32). See rmsjax.storage.
STORAGES: dict[str, Any] = {
    "float32": None,
    "8-bit": rmsjax.quantized(8),
    "4-bit": rmsjax.quantized(4),
}


def make_optimizer(storage: Any = None) -> optax.GradientTransformation:
    """AdamW (LEARNING_RATE, WEIGHT_DECAY) after clipping the global gradient norm to 1, with
    both moments stored as ``storage`` (None, a dtype, rmsjax.quantized(...), ...)."""
    return optax.chain(
        optax.clip_by_global_norm(1.0),
        rmsjax.adamw(LEARNING_RATE, weight_decay=WEIGHT_DECAY, mu_dtype=storage, nu_dtype=storage),
    )


def load_text() -> tuple[list[str], np.ndarray, np.ndarray]:
    """(characters of the vocabulary, training ids, held-out ids): the whole text's vocabulary,
    its first 90% and its last 10%."""
    text = TEXT.read_text(encoding="utf-8")
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    ids = np.array([index[c] for c in text], np.int32)
    split = int(len(ids) * (1 - HELD_OUT))
    return chars, ids[:split], ids[split:]


def dropout(x: jax.Array, key: jax.Array | None) -> jax.Array:
    """Zero each entry with probability DROPOUT and scale the rest by 1 / (1 - DROPOUT);
    the identity without a key (evaluation)."""
    if key is None:
        return x
    keep = jax.random.bernoulli(key, 1 - DROPOUT, x.shape)
    return jnp.where(keep, x / (1 - DROPOUT), 0.0)


class Block(nnx.Module):
    """Pre-norm transformer block: x + attention(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, *, rngs: nnx.Rngs) -> None:
        self.norm1 = nnx.LayerNorm(D_MODEL, rngs=rngs)
        self.qkv = nnx.Linear(D_MODEL, 3 * D_MODEL, rngs=rngs)  # (128, 384)
        self.proj = nnx.Linear(D_MODEL, D_MODEL, rngs=rngs)  # (128, 128)
        self.norm2 = nnx.LayerNorm(D_MODEL, rngs=rngs)
        self.up = nnx.Linear(D_MODEL, MLP, rngs=rngs)  # (128, 512)
        self.down = nnx.Linear(MLP, D_MODEL, rngs=rngs)  # (512, 128)

    def __call__(self, x: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
        batch, length, _ = x.shape
        keys = [None, None] if dropout_key is None else jax.random.split(dropout_key)
        qkv = self.qkv(self.norm1(x)).reshape(batch, length, 3, HEADS, D_MODEL // HEADS)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        attended = jax.nn.dot_product_attention(q, k, v, is_causal=True)
        x = x + dropout(self.proj(attended.reshape(batch, length, D_MODEL)), keys[0])
        return x + dropout(self.down(nnx.gelu(self.up(self.norm2(x)))), keys[1])


class TransformerLM(nnx.Module):
    """Token + position embeddings -> LAYERS blocks -> layer norm -> next-character logits."""

    def __init__(self, vocab_size: int, *, rngs: nnx.Rngs) -> None:
        self.embed = nnx.Embed(vocab_size, D_MODEL, rngs=rngs)
        self.position = nnx.Param(0.02 * jax.random.normal(rngs.params(), (SEQ, D_MODEL)))
        self.blocks = nnx.List([Block(rngs=rngs) for _ in range(LAYERS)])
        self.norm = nnx.LayerNorm(D_MODEL, rngs=rngs)
        self.out = nnx.Linear(D_MODEL, vocab_size, rngs=rngs)

    def __call__(self, tokens: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
        """Logits ``(..., length, vocab)``; with ``dropout_key``, dropout as in training."""
        keys = [None] * (LAYERS + 1)
        if dropout_key is not None:
            keys = list(jax.random.split(dropout_key, LAYERS + 1))
        x = dropout(self.embed(tokens) + self.position[: tokens.shape[-1]], keys[0])
        for block, key in zip(self.blocks, keys[1:], strict=True):
            x = block(x, key)
        return self.out(self.norm(x))


def loss_fn(
    model: TransformerLM, tokens: jax.Array, dropout_key: jax.Array | None = None
) -> jax.Array:
    """Mean next-character cross-entropy (nats) over windows of SEQ + 1 characters (with
    dropout when given a ``dropout_key``: training)."""
    logits = model(tokens[:, :-1], dropout_key)
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


def windows(data: np.ndarray, rng: np.random.Generator, count: int) -> np.ndarray:
    """``count`` random windows of SEQ + 1 characters."""
    starts = rng.integers(0, len(data) - SEQ - 1, size=count)
    return np.stack([data[s : s + SEQ + 1] for s in starts])


def eval_windows(data: np.ndarray) -> np.ndarray:
    """Every window of SEQ + 1 characters of ``data`` at a stride of SEQ (each character but
    the first is predicted exactly once)."""
    starts = range(0, len(data) - SEQ, SEQ)
    return np.stack([data[s : s + SEQ + 1] for s in starts])


def make_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation) -> Callable[..., Any]:
    """The jitted training step ``(params, opt_state, tokens, dropout_key) -> (params,
    opt_state, loss)`` (``params`` and ``opt_state`` are donated).

    Functional NNX: the model is ``nnx.merge(graphdef, params)`` inside the step and the
    optimizer state is a plain optax state. (flax's ``nnx.Optimizer`` is not used because its
    ``update`` writes the new state back through ``nnx.state``, which turns the state's
    ``rmsjax.StoredArray`` nodes -- codes and scales of a quantized moment -- into plain
    ``nnx.State`` dictionaries, so the second update fails; float32 state would work there.)
    """

    def loss_of(params: nnx.State, tokens: jax.Array, key: jax.Array) -> jax.Array:
        return loss_fn(nnx.merge(graphdef, params), tokens, key)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(
        params: nnx.State, opt_state: Any, tokens: jax.Array, key: jax.Array
    ) -> tuple[Any, Any, Any]:
        loss, grads = jax.value_and_grad(loss_of)(params, tokens, key)
        updates, opt_state = tx.update(grads, opt_state, params)
        return rmsjax.apply_updates(params, updates), opt_state, loss

    return step


@functools.partial(jax.jit, static_argnums=0)
def evaluate(graphdef: nnx.GraphDef, params: nnx.State, tokens: jax.Array) -> jax.Array:
    """Mean loss of the model ``(graphdef, params)`` on the windows ``tokens``."""
    return loss_fn(nnx.merge(graphdef, params), tokens)


def state_bytes_per_param(opt_state: Any, params: Any) -> float:
    """Bytes of every optimizer-state array (codes, scales, counts included) per parameter."""
    size = sum(x.size for x in jax.tree.leaves(params))
    return sum(x.nbytes for x in jax.tree.leaves(opt_state)) / size


def sample(model: TransformerLM, chars: list[str], prompt: str, length: int, seed: int) -> str:
    """Feed ``prompt``, then draw ``length`` characters (temperature 0.7), re-reading the last
    SEQ characters for each (no key/value cache: the model is small)."""
    index = {c: i for i, c in enumerate(chars)}
    ids = [index[c] for c in prompt]
    key = jax.random.key(seed)

    @nnx.jit
    def next_id(model: TransformerLM, window: jax.Array, last: jax.Array, key: jax.Array) -> Any:
        logits = model(window[None])[0, last]
        return jax.random.categorical(key, logits / 0.7)

    for _ in range(length):
        window = np.zeros(SEQ, np.int32)
        context = ids[-SEQ:]
        window[: len(context)] = context
        key, sub = jax.random.split(key)
        ids.append(int(next_id(model, jnp.asarray(window), len(context) - 1, sub)))
    return "".join(chars[i] for i in ids)


def train(
    storage: str, steps: int, seed: int = 0, *, eval_every: int = 50, verbose: bool = True
) -> dict[str, Any]:
    """Train with AdamW state stored as STORAGES[``storage``].

    Returns ``{"losses": training loss per step, "eval_steps", "eval_losses": held-out loss
    (nats/char) at those steps, "model", "chars", "state_bytes_per_param"}``.
    """
    from tqdm import tqdm

    chars, train_ids, held_out = load_text()
    held_out_windows = jnp.asarray(eval_windows(held_out))
    graphdef, params = nnx.split(TransformerLM(len(chars), rngs=nnx.Rngs(seed)))
    tx = make_optimizer(STORAGES[storage])
    opt_state = jax.jit(tx.init)(params)  # one compiled program, not an op per array
    bytes_per_param = state_bytes_per_param(opt_state, params)
    step = make_step(graphdef, tx)
    rng = np.random.default_rng(seed + 1)
    dropout_keys = jax.random.key(seed + 2)
    losses: list[float] = []
    eval_steps: list[int] = []
    eval_losses: list[float] = []
    bar = tqdm(range(1, steps + 1), desc=f"{storage:8s}", disable=not verbose)
    for i in bar:
        tokens = windows(train_ids, rng, BATCH)
        key = jax.random.fold_in(dropout_keys, i)
        params, opt_state, loss = step(params, opt_state, tokens, key)
        losses.append(float(loss))
        if i % eval_every == 0 or i == steps:
            eval_steps.append(i)
            eval_losses.append(float(evaluate(graphdef, params, held_out_windows)))
            bar.set_postfix(held_out_bits=f"{eval_losses[-1] / np.log(2):.2f}")
    return {
        "losses": losses,
        "eval_steps": eval_steps,
        "eval_losses": eval_losses,
        "model": nnx.merge(graphdef, params),
        "chars": chars,
        "state_bytes_per_param": bytes_per_param,
    }


def plot(runs: dict[str, dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=100)
    for name, run in runs.items():
        bits = np.asarray(run["eval_losses"]) / np.log(2)
        label = f"AdamW state {name} ({run['state_bytes_per_param']:.2f} bytes/param)"
        ax.plot(run["eval_steps"], bits, lw=1.4, marker=".", label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("held-out loss, bits/char")
    ax.set_title("Transformer character model (Flax NNX) on Shakespeare's sonnets")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """Run the example (``argv``: command-line arguments); return the runs by storage."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--storage", choices=["all", *STORAGES], default="all")
    parser.add_argument("--out", default="transformer_lm.png", help="PNG of the held-out loss")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-every", type=int, default=50, help="steps between evaluations")
    parser.add_argument("--sample-length", type=int, default=200, help="characters to sample")
    args = parser.parse_args(argv)

    names = list(STORAGES) if args.storage == "all" else [args.storage]
    start = time.perf_counter()
    runs = {}
    for name in names:
        run = train(name, args.steps, args.seed, eval_every=args.eval_every)
        runs[name] = run
        train_bits = np.mean(run["losses"][-25:]) / np.log(2)
        held_bits = run["eval_losses"][-1] / np.log(2)
        print(
            f"\n{name}: {run['state_bytes_per_param']:.3f} state bytes/param; after "
            f"{args.steps} steps training loss {train_bits:.2f}, held-out {held_bits:.2f} "
            "bits/char. Sample:"
        )
        print(sample(run["model"], run["chars"], "Shall I ", args.sample_length, args.seed))
        print()
    print(f"trained in {time.perf_counter() - start:.1f} s")
    plot(runs, args.out)
    print(f"wrote {args.out}")
    return runs


if __name__ == "__main__":
    main()
