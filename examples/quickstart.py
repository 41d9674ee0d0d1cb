"""rmsjax quick start: RMSProp on a quadratic bowl and on a small least-squares problem.

Run:  python examples/quickstart.py
"""

import jax
import jax.numpy as jnp
import optax

import rmsjax


def bowl() -> None:
    """RMSProp on f(x, y) = x^2 + y^2 from (0.54, 0.34)."""
    params = {"xy": jnp.array([0.54, 0.34])}
    loss = lambda p: jnp.sum(p["xy"] ** 2)
    opt = rmsjax.rmsprop(learning_rate=0.01, decay=0.99)
    state = opt.init(params)
    step = jax.jit(lambda p, s: _step(opt, loss, p, s))
    print("iteration | (x, y)             | f")
    for i in range(51):
        if i % 10 == 0:
            x, y = (float(v) for v in params["xy"])
            print(f"{i:9d} | ({x:+.5f}, {y:+.5f}) | {float(loss(params)):.3e}")
        params, state = step(params, state)


def _step(opt, loss, params, state):
    grads = jax.grad(loss)(params)
    updates, state = opt.update(grads, state, params)
    return rmsjax.apply_updates(params, updates), state


def least_squares() -> None:
    """rmsjax and optax side by side on the same linear regression: same numbers."""
    key_x, key_w = jax.random.split(jax.random.key(0))
    x = jax.random.normal(key_x, (256, 8))
    y = x @ jax.random.normal(key_w, (8,))
    loss = lambda p: jnp.mean((x @ p["w"] + p["b"] - y) ** 2)
    start = {"w": jnp.zeros(8), "b": jnp.zeros(())}
    finals = {}
    for name, lib in (("rmsjax", rmsjax), ("optax", optax)):
        opt = lib.rmsprop(learning_rate=0.01, centered=True, momentum=0.9)
        params, state = start, opt.init(start)
        step = jax.jit(lambda p, s, opt=opt: _step(opt, loss, p, s))
        for _ in range(200):
            params, state = step(params, state)
        finals[name] = params
        print(f"{name:6s}: loss after 200 steps = {float(loss(params)):.3e}")
    diff = max(
        float(jnp.max(jnp.abs(a - b)))
        for a, b in zip(
            jax.tree.leaves(finals["rmsjax"]), jax.tree.leaves(finals["optax"]), strict=True
        )
    )
    print(f"largest parameter difference rmsjax vs optax: {diff:.1e}")


if __name__ == "__main__":
    bowl()
    print()
    least_squares()
