"""SGD, Adam, AdaGrad, AdaDelta and Rprop: against optax live where optax is right, against
NumPy re-statements of the published algorithms where it is not (Rprop, AdaDelta without a
learning rate, complex AdaDelta)."""

from __future__ import annotations

import inspect
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rmsjax
from tests.common import assert_trees_close, loss, mixed_tree

STEPS = 25


def run_many(opts: list[Any], params: Any, steps: int = STEPS, loss_fn: Any = loss) -> list[Any]:
    """Trajectories (params after each step, stacked on axis 0) of several optimizers.

    All optimizers run in ONE jitted scan: one compilation instead of one per optimizer keeps
    this file fast.
    """

    def step(carry: Any, _: Any) -> tuple[Any, Any]:
        new = []
        for opt, (p, s) in zip(opts, carry, strict=True):
            u, s = opt.update(jax.grad(loss_fn)(p), s, p)
            new.append((optax.apply_updates(p, u), s))
        return new, [p for p, _ in new]

    @jax.jit
    def run(p: Any) -> Any:
        return jax.lax.scan(step, [(p, o.init(p)) for o in opts], None, length=steps)[1]

    return run(params)


def assert_parity(cases: dict[str, tuple[Any, Any]], params: Any, **kw: Any) -> None:
    """rmsjax and optax walk the same trajectory, case by case (named in the failure)."""
    names = list(cases)
    flat = [opt for name in names for opt in cases[name]]
    trajs = run_many(flat, params, **kw)
    for i, name in enumerate(names):
        ours, theirs = trajs[2 * i], trajs[2 * i + 1]
        for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
            scale = float(np.max(np.abs(np.asarray(b)))) + 1e-30
            err = float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) / scale
            assert err < 2e-6, f"{name}: trajectory differs from optax by {err:.2e} of scale"


def sched(v: float = 0.05) -> Any:
    return optax.exponential_decay(v, transition_steps=5, decay_rate=0.6)


def both(factory: str, *args: Any, **kw: Any) -> tuple[Any, Any]:
    return getattr(rmsjax, factory)(*args, **kw), getattr(optax, factory)(*args, **kw)


# --------------------------------------------------------------------------------------------
# Live parity with optax
# --------------------------------------------------------------------------------------------


def test_sgd_matches_optax() -> None:
    cases = {
        "plain": both("sgd", 0.05),
        "momentum": both("sgd", 0.05, momentum=0.9),
        "accumulator f32": both("sgd", 0.03, 0.5, accumulator_dtype=jnp.float32),
        "schedule nesterov": both("sgd", sched(), momentum=0.8, nesterov=True),
    }
    assert_parity(cases, mixed_tree())


def test_adam_matches_optax() -> None:
    cases = {
        "defaults": both("adam", 0.05),
        "nesterov betas eps_root": both(
            "adam", 0.02, b1=0.5, b2=0.9, eps=1e-6, eps_root=1e-8, nesterov=True
        ),
        "schedule": both("adam", sched()),
    }
    assert_parity(cases, mixed_tree())


def test_adagrad_and_scale_by_rss_match_optax() -> None:
    cases = {
        "defaults": both("adagrad", 0.1),
        "zero start, schedule": both(
            "adagrad", sched(0.2), initial_accumulator_value=0.0, eps=1e-10
        ),
        "big start": both("adagrad", 0.3, initial_accumulator_value=2.0, eps=0.0),
        # a large eps, so that putting it outside the square root would show
        "scale_by_rss": (
            optax.chain(rmsjax.scale_by_rss(0.5, 0.3), optax.scale(-0.1)),
            optax.chain(optax.scale_by_rss(0.5, 0.3), optax.scale(-0.1)),
        ),
    }
    assert_parity(cases, mixed_tree())


def test_adadelta_and_scale_by_adadelta_match_optax() -> None:
    mask = lambda p: jax.tree.map(lambda x: x.ndim > 1, p)
    cases = {
        "rho eps weight decay": both("adadelta", 0.5, rho=0.95, eps=1e-4, weight_decay=0.05),
        "decay masked": both("adadelta", 0.5, weight_decay=0.05, weight_decay_mask=mask),
        "schedules": both("adadelta", sched(2.0), weight_decay=sched(0.1)),
        "scale_by_adadelta": (
            optax.chain(rmsjax.scale_by_adadelta(0.8, 1e-5), optax.scale(-1.0)),
            optax.chain(optax.scale_by_adadelta(0.8, 1e-5), optax.scale(-1.0)),
        ),
    }
    assert_parity(cases, mixed_tree())


def complex_loss(params: Any) -> jax.Array:
    """A real loss of complex parameters (non-quadratic, so every step matters)."""
    total = jnp.zeros((), jnp.float32)
    for i, z in enumerate(jax.tree.leaves(params)):
        d = jnp.abs(z - (0.3 + 0.2j) * (i + 1)) ** 2
        total = total + jnp.sum(d * (1.5 + jnp.sin(jnp.real(z))))
    return total


def complex_tree() -> Any:
    rng = np.random.default_rng(3)
    c = lambda *s: jnp.asarray(rng.normal(size=s) + 1j * rng.normal(size=s), jnp.complex64)
    return {"a": c(3), "b": c(2, 2)}


def test_complex_parameters_match_optax_where_optax_uses_abs_squared() -> None:
    # optax's sgd, adam and adagrad are right for complex numbers (|g|^2). The caller passes
    # conj(jax.grad), optax's convention for complex parameters.
    cases = {
        "sgd momentum": both("sgd", 0.02, momentum=0.9),
        "adam": both("adam", 0.05),
        "adagrad": both("adagrad", 0.1),
    }

    def run(opts: list[Any]) -> list[Any]:
        def step(carry: Any, _: Any) -> tuple[Any, Any]:
            new = []
            for opt, (p, s) in zip(opts, carry, strict=True):
                g = jax.tree.map(jnp.conj, jax.grad(complex_loss)(p))
                u, s = opt.update(g, s, p)
                new.append((optax.apply_updates(p, u), s))
            return new, [p for p, _ in new]

        p0 = complex_tree()
        return jax.jit(
            lambda p: jax.lax.scan(step, [(p, o.init(p)) for o in opts], None, length=20)[1]
        )(p0)

    trajs = run([o for name in cases for o in cases[name]])
    for i in range(len(cases)):
        assert_trees_close(trajs[2 * i], trajs[2 * i + 1], rtol=1e-5, atol=2e-6)
    # and the loss went down: conj(jax.grad) is the descent direction
    final = jax.tree.map(lambda x: x[-1], trajs[2])
    assert complex_loss(final) < complex_loss(complex_tree())


# --------------------------------------------------------------------------------------------
# Rprop: NumPy statement of torch.optim.Rprop's update (optax's is one step late)
# --------------------------------------------------------------------------------------------


def rprop_reference(
    grads: np.ndarray,
    lr: float,
    etas: tuple[float, float] = (0.5, 1.2),
    step_sizes: tuple[float, float] = (1e-6, 50.0),
) -> np.ndarray:
    """Parameter increments of torch.optim.Rprop fed ``grads`` (axis 0 = step), real arrays.

    Written after torch's single-tensor loop: the sign tensor is overwritten by the etas, the
    step sizes are multiplied and clamped, the gradient is zeroed where the factor is eta_minus,
    and the parameter moves by -sign(grad) * step_size.
    """
    eta_minus, eta_plus = etas
    dtype = grads.dtype
    prev = np.zeros_like(grads[0])
    step = np.full_like(grads[0], lr)
    out = []
    for grad in grads:
        sign = np.sign(grad * prev)
        factor = np.ones_like(grad)
        factor[sign > 0] = eta_plus
        factor[sign < 0] = eta_minus
        step = np.clip(step * factor, step_sizes[0], step_sizes[1]).astype(dtype)
        grad = grad.copy()
        grad[factor == np.asarray(eta_minus, dtype)] = 0
        out.append(-np.sign(grad) * step)
        prev = grad
    return np.stack(out)


def gradient_sequence(steps: int = 30, n: int = 40, seed: int = 0) -> np.ndarray:
    """Gradients that keep their sign (steps grow to the max), alternate (steps shrink to the
    min), are exactly zero now and then, and are random."""
    rng = np.random.default_rng(seed)
    g = rng.normal(size=(steps, n))
    g[:, :8] = np.abs(g[:, :8])  # constant sign
    g[:, 8:16] = np.abs(g[:, 8:16]) * (-1.0) ** np.arange(steps)[:, None]  # flips every step
    g[rng.random(size=g.shape) < 0.1] = 0.0  # exact zeros
    return g.astype(np.float32)


def updates_of(opt: Any, grads: np.ndarray) -> np.ndarray:
    """The updates ``opt`` emits for a fixed sequence of gradients (one jitted scan), with
    parameters held at 0."""

    def step(state: Any, g: jax.Array) -> tuple[Any, jax.Array]:
        u, state = opt.update(g, state, jnp.zeros_like(g))  # params: for the weight decay
        return state, u

    return np.asarray(
        jax.jit(lambda gs: jax.lax.scan(step, opt.init(gs[0]), gs)[1])(jnp.asarray(grads))
    )


@pytest.mark.parametrize(
    "lr, kw",
    [
        (0.1, {}),
        (0.05, dict(eta_minus=0.3, eta_plus=1.5, min_step_size=0.01, max_step_size=0.3)),
        (2.0, dict(min_step_size=0.02, max_step_size=0.5)),  # lr above the max: clipped at once
        (1e-4, dict(min_step_size=1e-3, max_step_size=1.0)),  # lr below the min: clipped at once
    ],
)
def test_rprop_matches_torch_algorithm(lr: float, kw: dict[str, float]) -> None:
    grads = gradient_sequence()
    etas = (kw.get("eta_minus", 0.5), kw.get("eta_plus", 1.2))
    bounds = (kw.get("min_step_size", 1e-6), kw.get("max_step_size", 50.0))
    expected = rprop_reference(grads, lr, etas, bounds)
    np.testing.assert_allclose(updates_of(rmsjax.rprop(lr, **kw), grads), expected, rtol=1e-6)
    # scale_by_rprop has optax's sign convention: the descent step is its negation.
    np.testing.assert_allclose(
        updates_of(rmsjax.scale_by_rprop(lr, **kw), grads), -expected, rtol=1e-6
    )
    # the sequence exercises every branch: steps grow, shrink, and are skipped on a flip
    first = float(np.clip(lr, *bounds))
    steps = np.abs(expected)
    assert (steps == 0).any() and (steps > 0).any()
    assert (steps[steps > 0] != first).any()


def test_rprop_first_update_is_not_delayed_unlike_optax() -> None:
    grads = gradient_sequence(steps=5)
    ours = updates_of(rmsjax.rprop(0.1), grads)
    theirs = updates_of(optax.rprop(0.1), grads)
    np.testing.assert_allclose(ours[0], -0.1 * np.sign(grads[0]), rtol=1e-6)
    assert np.all(theirs[0] == 0)  # optax's documented-here defect: one step late


def test_rprop_trajectory_on_quadratic_matches_numpy() -> None:
    # f(x) = sum(a * (x - c)^2); gradients computed by NumPy in float32 along its own path.
    rng = np.random.default_rng(1)
    a = rng.uniform(0.5, 3.0, size=12).astype(np.float32)
    c = rng.normal(size=12).astype(np.float32)
    x0 = rng.normal(size=12).astype(np.float32)
    lr, etas, bounds = 0.05, (0.5, 1.2), (1e-6, 50.0)
    x = x0.copy()
    prev, step = np.zeros_like(x), np.full_like(x, lr)
    expected = []
    for _ in range(STEPS):
        g = np.float32(2) * a * (x - c)
        s = np.sign(g * prev)
        factor = np.where(s > 0, np.float32(etas[1]), np.where(s < 0, np.float32(etas[0]), 1))
        step = np.clip(step * factor.astype(np.float32), *bounds).astype(np.float32)
        g = np.where(s < 0, np.float32(0), g)
        x = (x - np.sign(g) * step).astype(np.float32)
        prev = g
        expected.append(x.copy())
    f = lambda p: jnp.sum(jnp.asarray(a) * (p["x"] - jnp.asarray(c)) ** 2)
    traj = run_many([rmsjax.rprop(lr)], {"x": jnp.asarray(x0)}, loss_fn=f)[0]["x"]
    np.testing.assert_allclose(np.asarray(traj), np.stack(expected), rtol=1e-5, atol=1e-6)


def test_rprop_complex_treats_parts_as_independent_reals() -> None:
    real = gradient_sequence(seed=1)
    imag = gradient_sequence(seed=2)
    grads = (real + 1j * imag).astype(np.complex64)
    ours = updates_of(rmsjax.rprop(0.1, max_step_size=1.0), grads)
    np.testing.assert_allclose(ours.real, rprop_reference(real, 0.1, step_sizes=(1e-6, 1.0)))
    np.testing.assert_allclose(ours.imag, rprop_reference(imag, 0.1, step_sizes=(1e-6, 1.0)))


def test_rprop_schedule_seeds_the_step_sizes() -> None:
    grads = gradient_sequence(steps=8)
    schedule = optax.linear_schedule(0.2, 0.0, transition_steps=4)
    np.testing.assert_array_equal(
        updates_of(rmsjax.rprop(schedule), grads), updates_of(rmsjax.rprop(0.2), grads)
    )


# --------------------------------------------------------------------------------------------
# AdaDelta: descent without a learning rate, |g|^2 for complex numbers
# --------------------------------------------------------------------------------------------


def adadelta_reference(grads: np.ndarray, rho: float, eps: float, lr: float = 1.0) -> np.ndarray:
    """Zeiler (2012), Algorithm 1, in float64 / complex128, with |g|^2 for complex numbers."""
    e_g = np.zeros(grads.shape[1:])
    e_x = np.zeros(grads.shape[1:])
    out = []
    for g in grads.astype(np.complex128 if np.iscomplexobj(grads) else np.float64):
        e_g = rho * e_g + (1 - rho) * np.abs(g) ** 2
        delta = np.sqrt(e_x + eps) / np.sqrt(e_g + eps) * g
        e_x = rho * e_x + (1 - rho) * np.abs(delta) ** 2
        out.append(-lr * delta)
    return np.stack(out)


def test_adadelta_without_learning_rate_descends() -> None:
    grads = gradient_sequence()
    ours = updates_of(rmsjax.adadelta(), grads)
    np.testing.assert_allclose(ours, adadelta_reference(grads, 0.9, 1e-6), rtol=2e-5, atol=1e-9)
    # optax moves by +delta (gradient ascent); rmsjax by -delta
    np.testing.assert_allclose(ours, -updates_of(optax.adadelta(), grads), rtol=1e-6)


def test_adadelta_without_learning_rate_lowers_the_loss() -> None:
    f = lambda p: jnp.sum((p["x"] - 1.0) ** 2)
    p0 = {"x": jnp.linspace(-2.0, 2.0, 5)}
    ours, theirs = run_many([rmsjax.adadelta(eps=1e-3), optax.adadelta(eps=1e-3)], p0, loss_fn=f)
    last = lambda t: jax.tree.map(lambda x: x[-1], t)
    assert f(last(ours)) < f(p0) < f(last(theirs))


def test_adadelta_complex_uses_abs_squared() -> None:
    real, imag = gradient_sequence(seed=4), gradient_sequence(seed=5)
    grads = (real + 1j * imag).astype(np.complex64)
    ours = updates_of(rmsjax.adadelta(0.5, rho=0.8, eps=1e-5), grads)
    expected = adadelta_reference(grads, 0.8, 1e-5, lr=0.5)
    np.testing.assert_allclose(ours, expected, rtol=2e-5, atol=1e-8)
    state = rmsjax.scale_by_adadelta().init(jnp.zeros(3, jnp.complex64))
    assert state.e_g.dtype == jnp.float32 and state.e_x.dtype == jnp.float32


# --------------------------------------------------------------------------------------------
# Validation, tracing, dtypes
# --------------------------------------------------------------------------------------------

BAD = [
    ("sgd", dict(learning_rate=-0.1), "learning_rate"),
    ("sgd", dict(learning_rate=0.1, momentum=1.5), "`momentum`"),
    ("adam", dict(learning_rate=0.1, b1=1.0), "b1"),
    ("adam", dict(learning_rate=0.1, eps=-1.0), "eps"),
    ("adagrad", dict(learning_rate=float("nan")), "learning_rate"),
    ("adagrad", dict(learning_rate=0.1, initial_accumulator_value=-1.0), "initial_accumulator"),
    ("adagrad", dict(learning_rate=0.1, eps=-1e-7), "eps"),
    ("adadelta", dict(learning_rate=-1.0), "learning_rate"),
    ("adadelta", dict(rho=1.0), "rho"),
    ("adadelta", dict(eps=0.0), "eps"),
    ("adadelta", dict(weight_decay=-0.1), "weight_decay"),
    ("rprop", dict(learning_rate=-0.1), "learning_rate"),
    ("rprop", dict(learning_rate=0.1, eta_minus=0.0), "eta_minus"),
    ("rprop", dict(learning_rate=0.1, eta_minus=1.0), "eta_minus"),
    ("rprop", dict(learning_rate=0.1, eta_plus=1.0), "eta_plus"),
    ("rprop", dict(learning_rate=0.1, min_step_size=0.0), "min_step_size"),
    ("rprop", dict(learning_rate=0.1, max_step_size=-1.0), "max_step_size"),
    ("rprop", dict(learning_rate=0.1, min_step_size=2.0, max_step_size=1.0), "min_step_size"),
    ("scale_by_rss", dict(initial_accumulator_value=float("inf")), "initial_accumulator"),
    ("scale_by_adadelta", dict(rho=-0.5), "rho"),
    ("scale_by_rprop", dict(learning_rate=0.1, eta_plus=0.5), "eta_plus"),
]


@pytest.mark.parametrize("factory, kw, name", BAD, ids=[f"{f}-{n}" for f, _, n in BAD])
def test_bad_hyperparameters_raise_at_construction(factory: str, kw: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        getattr(rmsjax, factory)(**kw)


@pytest.mark.parametrize(
    "factory, kw",
    [
        ("sgd", dict(learning_rate=0.1, momentum=0.9)),
        ("adam", dict(learning_rate=0.1, b1=0.8)),
        ("adagrad", dict(learning_rate=0.1, initial_accumulator_value=0.2)),
        ("adadelta", dict(learning_rate=0.5, rho=0.8, weight_decay=0.01)),
        ("rprop", dict(learning_rate=0.1, eta_plus=1.3, max_step_size=2.0)),
    ],
)
def test_inject_hyperparams_and_jit(factory: str, kw: dict) -> None:
    """Hyperparameters may be traced: no check, no Python branch on their value."""
    params = {"w": jnp.linspace(-1.0, 1.0, 4)}
    ours = optax.inject_hyperparams(getattr(rmsjax, factory))(**kw)
    direct = getattr(rmsjax, factory)(**kw)
    step = lambda opt: jax.jit(lambda g, s: opt.update(g, s, params))
    g = {"w": jnp.asarray([0.3, -0.2, 0.0, 1.0])}
    u1, _ = step(ours)(g, ours.init(params))
    u2, _ = step(direct)(g, direct.init(params))
    # traced hyperparameters round like float32 arrays (e.g. 1 - b1), Python floats do not
    assert_trees_close(u1, u2, rtol=2e-5, atol=0)


@pytest.mark.parametrize(
    "name, args", [("scale_by_rss", ()), ("scale_by_adadelta", ()), ("scale_by_rprop", (0.1,))]
)
@pytest.mark.parametrize("promote_half", [True, False])
def test_half_precision_state_and_update_dtype(name: str, args: tuple, promote_half: bool) -> None:
    opt = getattr(rmsjax, name)(*args, promote_half=promote_half)
    params = {"w": jnp.ones(3, jnp.bfloat16), "skip": None}
    state = opt.init(params)
    want = jnp.float32 if promote_half else jnp.bfloat16
    assert all(leaf.dtype == want for leaf in jax.tree.leaves(state))
    u, _ = opt.update({"w": jnp.asarray([1.0, -2.0, 300.0], jnp.bfloat16), "skip": None}, state)
    assert u["w"].dtype == jnp.bfloat16 and u["skip"] is None
    assert bool(jnp.all(jnp.isfinite(u["w"].astype(jnp.float32))))


@pytest.mark.parametrize(
    "name",
    [
        "sgd",
        "adam",
        "adagrad",
        "adadelta",
        "rprop",
        "scale_by_rss",
        "scale_by_adadelta",
        "scale_by_rprop",
    ],
)
def test_signature_is_optax_plus_promote_half(name: str) -> None:
    """Same argument names, order, kinds and defaults as optax 0.2.x; the additions are the
    keyword-only ``promote_half`` and, for ``scale_by_rss``, the keyword-only ``eps_in_sqrt``
    (torch's AdaGrad puts eps outside the root)."""
    ours = inspect.signature(getattr(rmsjax, name)).parameters
    theirs = inspect.signature(getattr(optax, name)).parameters
    extra = [p for p in ours if p not in theirs]
    want = ["eps_in_sqrt", "promote_half"] if name == "scale_by_rss" else ["promote_half"]
    assert extra == want
    assert all(ours[p].kind is inspect.Parameter.KEYWORD_ONLY for p in extra)
    for pname, p in theirs.items():
        assert ours[pname].kind == p.kind, pname
        assert ours[pname].default == p.default, pname
    assert [p for p in ours if p not in extra] == list(theirs)
