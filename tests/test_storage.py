"""Moment storage (rmsjax.storage): float dtypes, stochastic rounding, 8/4-bit block codes.

The mechanism is written once (``state_like`` builds stored leaves, ``map_rule`` decodes and
encodes around the rule), so it is checked by composition against independent references:
for every rule and every storage, one step from a stored state must equal optax's own
transformation (or, for the rmsjax-only rules, rmsjax's float32 one, itself checked against
optax and torch elsewhere) run on the DECODED state, and the new stored state must be that
reference's new state encoded by the codec (tested against bitsandbytes and torchao in
test_quantization.py) or stochastically rounded with the state's split key.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import re
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import rmsjax
from rmsjax.quantization import moment_codec
from rmsjax.stochastic import counter_bits, round_with_bits
from rmsjax.storage import StoredArray, decode, is_stored, seed_key

SPECS = {
    "q8": rmsjax.quantized(8),
    "q4": rmsjax.quantized(4),
    "sr": rmsjax.stochastic_rounding(jnp.bfloat16),
}

# name -> (rmsjax transformation with every moment stored as `s`, the reference run on the
# decoded state: optax's own where it has one, else rmsjax's float32 transformation)
RULES: dict[str, tuple[Any, Any]] = {
    "rms": (lambda s: rmsjax.scale_by_rms(nu_dtype=s), lambda: optax.scale_by_rms()),
    "rms_bias": (
        lambda s: rmsjax.scale_by_rms(initial_scale=0.5, bias_correction=True, nu_dtype=s),
        lambda: optax.scale_by_rms(initial_scale=0.5, bias_correction=True),
    ),
    # optax's scale_by_stddev takes the root of nu - mu^2, which the rounded moments can make
    # negative: the reference is rmsjax's float32 transformation (clamped, see step 2 tests).
    # Both forms of the state are stored in every storage (4-bit defaults to the variance form).
    "centered": (
        lambda s: rmsjax.scale_by_centered_rms(mu_dtype=s, nu_dtype=s, variance=False),
        lambda: rmsjax.scale_by_centered_rms(variance=False),
    ),
    "centered_variance": (
        lambda s: rmsjax.scale_by_centered_rms(mu_dtype=s, nu_dtype=s, variance=True),
        lambda: rmsjax.scale_by_centered_rms(variance=True),
    ),
    "adam": (lambda s: rmsjax.scale_by_adam(mu_dtype=s, nu_dtype=s), lambda: optax.scale_by_adam()),
    "nadam": (
        lambda s: rmsjax.scale_by_adam(mu_dtype=s, nu_dtype=s, nesterov=True),
        lambda: optax.scale_by_adam(nesterov=True),
    ),
    "amsgrad": (
        lambda s: rmsjax.scale_by_amsgrad(mu_dtype=s, nu_dtype=s),
        lambda: optax.scale_by_amsgrad(),
    ),
    "adam_exact_bias": (
        lambda s: rmsjax.scale_by_adam_exact_bias(amsgrad=True, mu_dtype=s, nu_dtype=s),
        lambda: rmsjax.scale_by_adam_exact_bias(amsgrad=True),
    ),
    "adam_eps_hat": (
        lambda s: rmsjax.scale_by_adam_eps_hat(amsgrad=True, mu_dtype=s, nu_dtype=s),
        lambda: rmsjax.scale_by_adam_eps_hat(amsgrad=True),
    ),
    "trace": (
        lambda s: rmsjax.trace(0.9, nesterov=True, accumulator_dtype=s),
        lambda: optax.trace(0.9, nesterov=True),
    ),
    "dampened_trace": (
        lambda s: rmsjax.dampened_trace(0.9, 0.2, accumulator_dtype=s),
        lambda: rmsjax.dampened_trace(0.9, 0.2),
    ),
    "rss": (
        lambda s: rmsjax.scale_by_rss(sum_of_squares_dtype=s),
        lambda: optax.scale_by_rss(),
    ),
    "adadelta": (
        lambda s: rmsjax.scale_by_adadelta(e_g_dtype=s, e_x_dtype=s),
        lambda: optax.scale_by_adadelta(),
    ),
}


def params_and_grads(steps: int, seed: int = 0) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A quantizable (16, 300) leaf (rows of two blocks, the second short), a small one that
    stays float32, and gradients whose scale varies by row and step."""
    rng = np.random.default_rng(seed)
    params = {"w": jnp.asarray(rng.normal(size=(16, 300)), jnp.float32), "b": jnp.ones(7)}
    row = 10.0 ** rng.uniform(-3, 1, size=(16, 1))
    grads = [
        {
            "w": jnp.asarray(rng.normal(size=(16, 300)) * row * (1 + t), jnp.float32),
            "b": jnp.asarray(rng.normal(size=7), jnp.float32),
        }
        for t in range(steps)
    ]
    return params, grads


def decoded(state: Any) -> Any:
    """The state with every stored moment replaced by its plain (decoded) array."""
    return jax.tree.map(lambda x: decode(x) if is_stored(x) else x, state, is_leaf=is_stored)


def stored_leaves(state: Any) -> list[StoredArray]:
    return [x for x in jax.tree.leaves(state, is_leaf=is_stored) if is_stored(x)]


def expected_storage(new_plain: Any, old: StoredArray) -> np.ndarray:
    """What the storage must hold after the step: the reference's new moment encoded by the
    codec, or stochastically rounded with the counter bits of the old key."""
    if isinstance(old.storage, rmsjax.StochasticRounding):
        value, key = old.data
        bits = counter_bits(value.shape, key[0], key[1])
        out = round_with_bits(new_plain, bits, value.dtype)
        return np.asarray(out.astype(jnp.float32))
    q = old.data
    # a stochastically rounding codec draws the bits of the old (seed, counter)
    noise = None if q.key is None else counter_bits(q.shape, q.key[0], q.key[1])
    return np.asarray(q.codec.decode(*q.codec.encode(new_plain, noise), q.shape))


@pytest.mark.parametrize("spec", sorted(SPECS))
@pytest.mark.parametrize("rule", sorted(RULES))
def test_every_rule_decodes_steps_and_encodes(rule: str, spec: str) -> None:
    make, reference = RULES[rule]
    opt, ref = make(SPECS[spec]), reference()
    params, grads = params_and_grads(3, seed=len(rule))
    state = opt.init(params)
    chex.assert_trees_all_equal_structs(decoded(state), ref.init(params))
    # The large leaf of every moment is stored, the small one stays a float32 array.
    stored = stored_leaves(state)
    n_moments = len(stored) if spec != "sr" else len(stored) // 2
    assert n_moments >= 1
    for moment in jax.tree.leaves(state, is_leaf=is_stored):
        if not is_stored(moment) and np.ndim(moment) == 1:
            assert moment.dtype == (jnp.bfloat16 if spec == "sr" else jnp.float32)
    update = jax.jit(opt.update)
    for g in grads:
        plain = decoded(state)
        u_ref, new_ref = ref.update(g, plain, params)
        u, new = update(g, state, params)
        for mine, want in zip(jax.tree.leaves(u), jax.tree.leaves(u_ref), strict=True):
            # a few ulps of the update's scale (Nesterov's g + b*m cancels to small values)
            scale = float(np.max(np.abs(want)))
            np.testing.assert_allclose(mine, want, rtol=2e-5, atol=1e-6 * scale)
        old_leaves = jax.tree.leaves(state, is_leaf=is_stored)
        new_leaves = jax.tree.leaves(new, is_leaf=is_stored)
        ref_leaves = jax.tree.leaves(new_ref)
        assert len(old_leaves) == len(new_leaves) == len(ref_leaves)
        for old, got, want in zip(old_leaves, new_leaves, ref_leaves, strict=True):
            if not is_stored(old):
                np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-6)
                continue
            assert type(got.data) is type(old.data)
            expected = expected_storage(want, old)
            mine = np.asarray(decode(got))
            # The compiled step and the reference may round a float32 operation differently
            # (an ulp apart): a block's scale may differ by an ulp (every decoded entry of the
            # block then differs by an ulp), and a value may cross a code boundary or a random
            # threshold (one code apart): at most 0.2% of the entries.
            differ = np.mean(~np.isclose(mine, expected, rtol=1e-6, atol=0))
            assert differ <= 2e-3, f"{differ:.4f} of the entries differ"
            if isinstance(old.storage, rmsjax.StochasticRounding):
                seed, counter = np.asarray(old.data[1])
                assert np.array_equal(np.asarray(got.data[1]), [seed, counter + 1])
            if isinstance(old.storage, rmsjax.Quantized) and old.data.key is not None:
                # the counter advances by one per encoding, the seed stays
                want_key = np.asarray(old.data.key) + np.uint32([0, 1])
                assert np.array_equal(np.asarray(got.data.key), want_key)
        state = new


def test_specs_are_validated_at_construction() -> None:
    with pytest.raises(ValueError, match="`bits` must be 4 or 8, got 6"):
        rmsjax.quantized(6)
    with pytest.raises(ValueError, match="`bits`"):
        rmsjax.quantized(True)
    with pytest.raises(ValueError, match=r"`block_size`.*got 0"):
        rmsjax.quantized(8, block_size=0)
    with pytest.raises(ValueError, match=r"`min_size`.*got -1"):
        rmsjax.quantized(8, min_size=-1)
    with pytest.raises(TypeError, match=r"`codec`.*BlockCodec"):
        rmsjax.quantized(codec="bnb")
    with pytest.raises(ValueError, match="`codec` fixes"):
        rmsjax.quantized(8, min_size=10, codec=moment_codec(8, signed=True))
    with pytest.raises(ValueError, match=r"`dtype` must be jnp\.bfloat16 or jnp\.float16"):
        rmsjax.stochastic_rounding(jnp.float32)
    with pytest.raises(ValueError, match="`dtype`"):
        rmsjax.stochastic_rounding("nonsense")
    with pytest.raises(TypeError, match="`seed`"):
        rmsjax.stochastic_rounding(seed=0.5)
    spec = rmsjax.quantized(4)
    assert hash(spec) == hash(rmsjax.quantized(4)) and spec != rmsjax.quantized(8)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.bits = 8  # type: ignore[misc]


@pytest.mark.parametrize(
    ("factory", "arg"),
    [
        (lambda v: rmsjax.adam(0.1, nu_dtype=v), "nu_dtype"),
        (lambda v: rmsjax.adamw(0.1, mu_dtype=v), "mu_dtype"),
        (lambda v: rmsjax.rmsprop(0.1, momentum=0.9, momentum_dtype=v), "momentum_dtype"),
        (lambda v: rmsjax.rmsprop(0.1, momentum_dtype=v), "momentum_dtype"),
        (lambda v: rmsjax.rmsprop(0.1, centered=True, mu_dtype=v), "mu_dtype"),
        (lambda v: rmsjax.sgd(0.1, momentum=0.9, accumulator_dtype=v), "accumulator_dtype"),
        (lambda v: rmsjax.adagrad(0.1, sum_of_squares_dtype=v), "sum_of_squares_dtype"),
        (lambda v: rmsjax.adadelta(e_x_dtype=v), "e_x_dtype"),
        (lambda v: rmsjax.scale_by_amsgrad(nu_dtype=v), "nu_dtype"),
    ],
)
def test_storage_arguments_reject_bad_values_by_name(factory: Any, arg: str) -> None:
    with pytest.raises(ValueError, match=f"`{arg}` must be None or a floating dtype"):
        factory(jnp.int8)
    with pytest.raises(TypeError, match=f"`{arg}` must be None, a floating dtype"):
        factory(8)
    factory(jnp.bfloat16)
    factory(rmsjax.quantized(4))


def test_default_storage_is_unchanged() -> None:
    params = {"w": jnp.ones((64, 128)), "h": jnp.ones((64, 128), jnp.bfloat16)}
    state = rmsjax.adamw(1e-3).init(params)
    assert not stored_leaves(state)
    assert {x.dtype for x in jax.tree.leaves(state[0].mu)} == {jnp.dtype(jnp.float32)}
    # A plain dtype is a plain array (optax's mu_dtype), rounded to nearest.
    state = rmsjax.adam(1e-3, mu_dtype=jnp.bfloat16, nu_dtype=jnp.float16).init(params)
    assert state[0].mu["w"].dtype == jnp.bfloat16 and state[0].nu["h"].dtype == jnp.float16


def test_what_stays_unquantized() -> None:
    """Arrays below min_size, complex moments and (for bitsandbytes-like sizes) small layers
    stay plain float32; bfloat16 parameters get float32-decoded quantized moments."""
    params = {
        "big": jnp.ones((32, 128), jnp.bfloat16),
        "small": jnp.ones((4095,)),
        "z": jnp.ones((64, 64), jnp.complex64),
    }
    state = rmsjax.adam(1e-3, mu_dtype=rmsjax.quantized(8), nu_dtype=rmsjax.quantized(8)).init(
        params
    )
    mu, nu = state[0].mu, state[0].nu
    assert is_stored(mu["big"]) and decode(mu["big"]).dtype == jnp.float32
    assert mu["small"].dtype == jnp.float32 and not is_stored(mu["small"])
    assert mu["z"].dtype == jnp.complex64 and not is_stored(mu["z"])
    assert is_stored(nu["z"])  # the second moment of a complex leaf is real: quantized
    assert is_stored(
        rmsjax.scale_by_rms(nu_dtype=rmsjax.quantized(min_size=0)).init({"x": jnp.ones(3)}).nu["x"]
    )
    updates, _ = rmsjax.adam(0.1, mu_dtype=rmsjax.quantized(4)).update(
        jax.tree.map(jnp.ones_like, params), state, params
    )
    assert updates["big"].dtype == jnp.bfloat16  # the gradient's dtype, as always


def state_bytes(state: Any) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))


@pytest.mark.parametrize(
    ("spec", "limit"), [(None, 8.0), (rmsjax.quantized(8), 2.05), (rmsjax.quantized(4), 1.07)]
)
def test_adamw_state_bytes_per_parameter(spec: Any, limit: float) -> None:
    params = {"w": jax.ShapeDtypeStruct((1024, 1024), jnp.float32)}
    state = jax.eval_shape(rmsjax.adamw(1e-3, mu_dtype=spec, nu_dtype=spec).init, params)
    per_param = (state_bytes(state) - 4) / 1024**2  # minus the int32 count
    assert per_param <= limit
    assert per_param > limit - 0.05  # the codes and scales are all there


def test_stochastic_rounding_decays_where_nearest_stalls() -> None:
    """nu_0 = 1, zero gradients, decay 0.999: the float32 average is 0.999^t. In bfloat16 with
    round to nearest, 0.999 rounds back to 1.0 (half a bfloat16 step below 1 is 0.00195), so
    the average never decays. Stochastic rounding is unbiased at each step, so the mean over M
    independent entries stays within 5 standard deviations (each step adds a variance of at
    most ulp^2/4, ulp = 2^-8 below 1) of 0.999^t."""
    steps, m = 300, 8192
    params = {"w": jnp.zeros(m)}
    grads = {"w": jnp.zeros(m)}

    def run(nu_dtype: Any) -> jax.Array:
        opt = rmsjax.scale_by_rms(decay=0.999, initial_scale=1.0, nu_dtype=nu_dtype)

        def body(_: Any, s: Any) -> Any:
            return opt.update(grads, s)[1]

        state = jax.jit(lambda s: jax.lax.fori_loop(0, steps, body, s))(opt.init(params))
        nu = state.nu["w"]
        return decode(nu) if is_stored(nu) else nu.astype(jnp.float32)

    nearest = run(jnp.bfloat16)
    stochastic = run(rmsjax.stochastic_rounding(jnp.bfloat16, seed=3))
    assert np.all(np.asarray(nearest) == 1.0)
    target = 0.999**steps
    bound = 5 * 2.0**-8 * np.sqrt(steps / (4 * m))
    assert abs(float(jnp.mean(stochastic)) - target) <= bound
    assert 1 - target > 20 * bound  # nearest is far outside the bound


def test_4bit_second_moment_follows_float32_where_the_nearest_code_stalls() -> None:
    """Adam's nu (decay 0.999) over 600 steps of N(0, 1) gradients, half of each block's entries
    shrinking to N(0, 0.05^2) after step 100: float32's nu of that half decays towards 0.05^2.
    The nearest 4-bit code cannot move by less than half a code (a factor 1.5 on the powers of
    two): nu stops growing after a few steps and never decays, and ends a factor 2 or more
    away; the default (stochastic) code follows float32 in the mean."""
    steps, shape = 600, (16, 256)
    shrink = jnp.zeros(shape, bool).at[:, ::2].set(True)

    def run(nu_dtype: Any) -> np.ndarray:
        opt = rmsjax.scale_by_adam(nu_dtype=nu_dtype)
        params = {"w": jnp.zeros(shape)}

        def body(t: Any, s: Any) -> Any:
            g = jax.random.normal(jax.random.fold_in(jax.random.key(0), t), shape)
            g = jnp.where(shrink & (t >= 100), 0.05 * g, g)
            return opt.update({"w": g}, s)[1]

        state = jax.jit(lambda s: jax.lax.fori_loop(0, steps, body, s))(opt.init(params))
        nu = state.nu["w"]
        return np.asarray(decode(nu) if is_stored(nu) else nu)[np.asarray(shrink)]

    want = run(None).mean()
    nearest_codec = dataclasses.replace(moment_codec(4, signed=False), rounding="nearest")
    nearest = run(rmsjax.quantized(codec=nearest_codec)).mean()
    default = run(rmsjax.quantized(4)).mean()
    assert abs(default / want - 1) < 0.1
    assert abs(np.log(nearest / want)) > np.log(2)


def test_stochastic_rounding_keys() -> None:
    """One key per stored array, different between leaves, moments and seeds (the seed word of
    seed_key, counter 0); the counter advances at each update; kept when the gradient is
    None."""
    params = {"a": jnp.ones(8), "b": jnp.ones(8)}
    sr = rmsjax.stochastic_rounding()
    opt = rmsjax.scale_by_adam(mu_dtype=sr, nu_dtype=sr)
    state = opt.init(params)
    keys = [np.asarray(x.data[1]).tobytes() for x in stored_leaves(state)]
    assert len(set(keys)) == 4
    assert np.array_equal(state.mu["a"].data[1], seed_key(0, "mu['a']"))
    other = rmsjax.scale_by_adam(mu_dtype=rmsjax.stochastic_rounding(seed=1)).init(params)
    assert np.asarray(other.mu["a"].data[1]).tobytes() not in keys
    _, new = opt.update({"a": jnp.ones(8), "b": None}, state)
    assert np.array_equal(new.mu["b"].data[1], state.mu["b"].data[1])
    seed, counter = np.asarray(state.mu["a"].data[1])
    assert np.array_equal(new.mu["a"].data[1], [seed, counter + 1])


def _mix32(x: int) -> int:
    """Wellons' lowbias32, restated in Python integers."""
    x ^= x >> 16
    x = (x * 0x21F0AAAD) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x735A2D97) & 0xFFFFFFFF
    return x ^ (x >> 15)


def test_quantized_stochastic_rounding_keys() -> None:
    """A 4-bit first moment holds (seed, counter): the seed word is the documented hash of the
    user's seed and the moment's salt, the counter counts encodings (1 after init), a None
    gradient keeps it, and the codes are reproducible from the seed."""
    import zlib

    params = {"a": jnp.ones((4, 1024)), "b": jnp.ones((4, 1024))}
    q4 = rmsjax.quantized(4, seed=7)
    opt = rmsjax.scale_by_adam(mu_dtype=q4, nu_dtype=rmsjax.quantized(4))
    state = opt.init(params)
    for name in ("a", "b"):
        salt = f"mu['{name}']"
        word = _mix32((zlib.crc32(salt.encode()) & 0x7FFFFFFF) ^ _mix32(7))
        assert np.asarray(state.mu[name].data.key).tolist() == [word, 1]
    g = {"a": jnp.full((4, 1024), 0.3), "b": None}
    _, new = opt.update(g, state)
    assert np.asarray(new.mu["a"].data.key)[1] == 2
    assert np.array_equal(new.mu["b"].data.key, state.mu["b"].data.key)
    _, again = opt.update(g, opt.init(params))
    assert np.array_equal(again.mu["a"].data.codes, new.mu["a"].data.codes)
    other = rmsjax.scale_by_adam(mu_dtype=rmsjax.quantized(4, seed=8)).init(params)
    assert np.asarray(other.mu["a"].data.key)[0] != np.asarray(state.mu["a"].data.key)[0]
    with pytest.raises(TypeError, match="`seed` must be an int"):
        rmsjax.quantized(4, seed=1.5)  # type: ignore[arg-type]


def test_old_4bit_checkpoints_restore_with_the_old_codecs_only(tmp_path: Any) -> None:
    """A checkpoint of the old default 4-bit state (torchao's maps, rounded to nearest, float32
    maxima) restores through the codecs the CHANGELOG gives, and not into the new default."""
    ocp = pytest.importorskip("orbax.checkpoint")
    from rmsjax.quantization import BlockCodec, dynamic_map, linear_map

    old_m = dynamic_map(True, exponent_bits=3, total_bits=4)
    old_m[0] = -1.0
    old = {
        "mu_dtype": rmsjax.quantized(codec=BlockCodec(qmap=tuple(old_m.tolist()), block_size=128)),
        "nu_dtype": rmsjax.quantized(
            codec=BlockCodec(qmap=tuple(linear_map(16, zero=False).tolist()), block_size=128)
        ),
    }
    params, grads = params_and_grads(2)
    opt = rmsjax.adamw(1e-2, **old)
    state = opt.init(params)
    for g in grads:
        _, state = opt.update(g, state, params)
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(tmp_path / "old", state)
    ckpt.wait_until_finished()
    restored = ckpt.restore(tmp_path / "old", jax.eval_shape(opt.init, params))
    chex.assert_trees_all_equal(restored, state)
    new = rmsjax.adamw(1e-2, mu_dtype=rmsjax.quantized(4), nu_dtype=rmsjax.quantized(4))
    with pytest.raises((ValueError, KeyError, TypeError)):
        ckpt.restore(tmp_path / "old", jax.eval_shape(new.init, params))


def test_overflow_is_stored_finite_and_nan_stays_visible() -> None:
    """A quantized moment cannot hold inf (its block would decode to NaN): it holds the largest
    float32, and its neighbours in the block stay finite. NaN gradients stay NaN."""
    opt = rmsjax.scale_by_rms(nu_dtype=rmsjax.quantized(8, min_size=0))
    params = {"w": jnp.zeros((2, 256))}
    g = jnp.ones((2, 256)).at[0, 3].set(1e30).at[1, 5].set(jnp.nan)
    u, state = opt.update({"w": g}, opt.init(params))
    nu = np.asarray(decode(state.nu["w"]))
    assert nu[0, 3] == np.finfo(np.float32).max
    assert np.all(np.isfinite(nu[0])) and np.all(np.isnan(nu[1]))
    assert np.all(np.isfinite(np.asarray(u["w"][0])))


# ------------------------------------------------------------------------------------------
# The state is a pytree of arrays: jit, vmap, donation and optax's wrappers handle it
# ------------------------------------------------------------------------------------------


def assert_close_but_for_flips(actual: Any, expected: Any, *, lr: float, share: float) -> None:
    """Two runs of one quantized optimizer compiled differently: float32 rounding may move a
    moment across a code boundary (one code: at most a few % of that moment at 8 bits, more
    at 4), which moves its parameter by at most ~lr per step. So: every parameter within
    ``lr``, and at most ``share`` of them more than float32 rounding apart."""
    for a, b in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert np.max(np.abs(a - b)) <= lr
        assert np.mean(~np.isclose(a, b, rtol=1e-5, atol=1e-7)) <= share


def _adamw(spec: Any = None) -> optax.GradientTransformation:
    return rmsjax.adamw(1e-2, mu_dtype=spec, nu_dtype=spec)


def _run(opt: Any, steps: int = 4, donate: bool = False) -> tuple[Any, Any]:
    params, grads = params_and_grads(steps)
    state = opt.init(params)
    update = jax.jit(opt.update, donate_argnums=(1,) if donate else ())
    for g in grads:
        u, state = update(g, state, params)
        params = rmsjax.apply_updates(params, u)
    return params, state


@pytest.mark.parametrize("spec", sorted(SPECS))
def test_jit_donation_and_vmap(spec: str) -> None:
    opt = _adamw(SPECS[spec])
    p1, s1 = _run(opt)
    p2, s2 = _run(opt, donate=True)
    chex.assert_trees_all_equal(p1, p2)
    chex.assert_trees_all_equal(s1, s2)
    # vmap over a batch of two independent models equals running each alone.
    (pa, ga), (pb, gb) = params_and_grads(1, seed=1), params_and_grads(1, seed=2)
    stack = lambda a, b: jax.tree.map(lambda x, y: jnp.stack([x, y]), a, b)
    states = jax.vmap(opt.init)(stack(pa, pb))
    u, _ = jax.jit(jax.vmap(opt.update))(stack(ga[0], gb[0]), states, stack(pa, pb))
    ua, _ = opt.update(ga[0], opt.init(pa), pa)
    chex.assert_trees_all_close(jax.tree.map(lambda x: x[0], u), ua, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("spec", ["q8", "sr"])
def test_optax_wrappers(spec: str) -> None:
    """inject_hyperparams (the storage is static, the numbers are injected), MultiSteps and
    masked run and agree with the unwrapped optimizer where they should."""
    s = SPECS[spec]
    plain_p, plain_s = _run(_adamw(s))
    injected = optax.inject_hyperparams(rmsjax.adamw)(learning_rate=1e-2, mu_dtype=s, nu_dtype=s)
    inj_p, inj_s = _run(injected)
    assert_close_but_for_flips(inj_p, plain_p, lr=1e-2, share=0.01)
    chex.assert_trees_all_equal_structs(inj_s.inner_state, plain_s)
    # MultiSteps(k=1) is the optimizer itself; k=2 applies every other step.
    multi_p, _ = _run(optax.MultiSteps(_adamw(s), every_k_schedule=1))
    assert_close_but_for_flips(multi_p, plain_p, lr=1e-2, share=0.01)
    _, multi2 = _run(optax.MultiSteps(_adamw(s), every_k_schedule=2))
    assert int(multi2.gradient_step) == 2
    # masked: the masked-out leaf gets the raw gradient, the other is optimised as before
    # (with the same random keys: they follow the parameter's key path, not its position).
    masked = optax.masked(_adamw(s), {"w": True, "b": False})
    mp, ms = _run(masked)
    assert_close_but_for_flips(mp["w"], plain_p["w"], lr=1e-2, share=0.01)
    assert stored_leaves(ms)


def test_fused_step_keeps_working_with_stored_moments() -> None:
    """The fused step sends only plain float32 leaves to its kernel; stored moments take the
    pure path, and the step equals update + apply_updates."""
    params, grads = params_and_grads(2)
    for spec in SPECS.values():
        opt = rmsjax.fused.adamw(1e-2, mu_dtype=spec, nu_dtype=spec, min_native_size=0)
        state = opt.init(params)
        step = jax.jit(opt.step)
        for g in grads:
            p_fused, s_fused = step(params, g, state)
            u, s_ref = opt.update(g, state, params)
            leaves = lambda s: jax.tree.leaves(decoded(s))
            # one step from the same state: the parameters agree to float32 rounding; the
            # new moments too, except where a rounding moved one across a code boundary
            chex.assert_trees_all_close(
                p_fused, rmsjax.apply_updates(params, u), rtol=1e-6, atol=1e-8
            )
            for a, b in zip(leaves(s_fused), leaves(s_ref), strict=True):
                assert np.mean(~np.isclose(a, b, rtol=1e-5, atol=0)) <= 2e-3
            params, state = p_fused, s_fused


# ------------------------------------------------------------------------------------------
# Centered RMSProp with quantized moments: finite gradients give finite updates
# ------------------------------------------------------------------------------------------

LONG_STEPS = 400


@functools.partial(jax.jit, static_argnames=("bits", "eps_in_sqrt", "bias_correction", "variance"))
def _centered_long_run(
    level, noise, decay, eps, key, *, bits, eps_in_sqrt, bias_correction, variance=None
):
    """LONG_STEPS steps of centered RMSProp with both moments quantized, on gradients
    ``level * r * c * (1 + noise * N(0, 1))`` (near constant in time for small noise), with
    ``r`` spread over six decades across rows and ``c`` from 0.3 to 1 along each row (so only
    a block's largest entry is stored exactly). Returns whether every update and moment
    stayed finite, and how many entries had a rounded variance (decoded nu - mu^2 in the nu
    form, the decoded variance in the variance form) below 0."""
    spec = rmsjax.quantized(bits)
    opt = rmsjax.scale_by_centered_rms(
        decay=decay,
        eps=eps,
        eps_in_sqrt=eps_in_sqrt,
        bias_correction=bias_correction,
        mu_dtype=spec,
        nu_dtype=spec,
        variance=variance,
    )
    spread = 10.0 ** jnp.linspace(-3.0, 3.0, 16)[:, None] * jnp.linspace(0.3, 1.0, 256)
    rows = level * spread
    params = jnp.zeros((16, 256))

    def body(carry, k):
        state, finite, negative = carry
        g = rows * (1 + noise * jax.random.normal(k, (16, 256)))
        u, state = opt.update(g, state)
        mu = decode(state.mu)
        if hasattr(state, "var"):
            second = decode(state.var)
            rounded_variance = second
        else:
            second = decode(state.nu)
            rounded_variance = second - mu * mu
        finite &= jnp.all(jnp.isfinite(u)) & jnp.all(jnp.isfinite(mu))
        finite &= jnp.all(jnp.isfinite(second))
        negative += jnp.sum(rounded_variance < 0)
        return (state, finite, negative), None

    keys = jax.random.split(key, LONG_STEPS)
    init = (opt.init(params), jnp.bool_(True), jnp.int32(0))
    (_, finite, negative), _ = jax.lax.scan(body, init, keys)
    return finite, negative


@settings(max_examples=20, deadline=None)
@given(
    level=st.floats(1e-3, 1e3).flatmap(lambda x: st.sampled_from([x, -x])),
    noise=st.one_of(st.just(0.0), st.floats(1e-7, 1e-2)),
    decay=st.floats(0.5, 0.999),
    eps=st.floats(1e-10, 1e-2),
    bits=st.sampled_from([8, 4]),
    eps_in_sqrt=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_centered_quantized_stays_finite(level, noise, decay, eps, bits, eps_in_sqrt, seed) -> None:
    # (bias_correction divides both moments by the same constant before the clamp: one
    # compiled variant of it is checked in the test below, the others stay uncorrected to keep
    # the number of compilations at four.)
    finite, _ = _centered_long_run(
        level,
        noise,
        decay,
        eps,
        jax.random.key(seed),
        bits=bits,
        eps_in_sqrt=eps_in_sqrt,
        bias_correction=False,
    )
    assert bool(finite)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_variance_does_round_below_zero(bits: int) -> None:
    """The property above is not vacuous: with quantized moments the decoded nu - mu^2 is
    negative for many entries of a near-constant gradient (optax's scale_by_stddev then takes
    the root of a negative number: NaN), and the clamp keeps every update finite. (The nu form
    is asked for: 4-bit storage defaults to the variance form, which stores no difference.)"""
    finite, negative = _centered_long_run(
        1.0,
        1e-4,
        0.9,
        1e-8,
        jax.random.key(0),
        bits=bits,
        eps_in_sqrt=True,
        bias_correction=bits == 4,
        variance=False,
    )
    assert bool(finite) and int(negative) > 1000
    # optax on such a decoded state: NaN
    spec = rmsjax.quantized(bits)
    opt = rmsjax.scale_by_centered_rms(decay=0.9, mu_dtype=spec, nu_dtype=spec, variance=False)
    g = jnp.linspace(0.3, 1.0, 16 * 256).reshape(16, 256)
    state = jax.jit(
        lambda s: jax.lax.fori_loop(0, LONG_STEPS, lambda _, s: opt.update(g, s)[1], s)
    )(opt.init(g))
    plain = decoded(state)
    assert np.any(np.asarray(plain.nu - plain.mu**2) < 0)
    u_optax, _ = optax.scale_by_stddev(decay=0.9).update(g, plain)
    u_mine, _ = opt.update(g, state)
    assert np.any(np.isnan(np.asarray(u_optax))) and np.all(np.isfinite(np.asarray(u_mine)))


def _storage_arguments() -> list[tuple[str, str]]:
    found = []
    for name in rmsjax.__all__:
        fn = getattr(rmsjax, name)
        if not callable(fn) or isinstance(fn, type):
            continue
        try:
            params = inspect.signature(fn).parameters
        except (TypeError, ValueError):
            continue
        found += [(name, p) for p in params if p.endswith("_dtype")]
    return found


def test_every_storage_argument_is_documented_by_the_template() -> None:
    from rmsjax.moments import STORAGE_CHOICES

    arguments = _storage_arguments()
    assert len(arguments) >= 25  # every moment of every optimizer and transformation
    for name, argument in arguments:
        doc = getattr(rmsjax, name).__doc__
        assert "{storage}" not in doc, name
        entry = re.search(rf"^\s+{argument}: storage of (.*?): ", doc, re.MULTILINE)
        assert entry is not None, (name, argument)
        assert STORAGE_CHOICES in " ".join(doc[entry.end() :].split()), (name, argument)


def test_factored_second_moment_is_adafactors_row_and_column_averages() -> None:
    """Adam with ``nu_dtype=factored()`` against a NumPy statement of Adafactor's factored
    second moment (rows and columns of g^2 averaged with beta2, decoded as r c / mean(r))."""
    b1, b2, eps = 0.9, 0.99, 1e-8
    opt = rmsjax.scale_by_adam(b1=b1, b2=b2, eps=eps, nu_dtype=rmsjax.factored(min_size=64))
    params, grads = params_and_grads(4, seed=3)
    state = opt.init(params)
    assert isinstance(state.nu["w"].data, rmsjax.storage.FactoredArray)
    assert state.nu["b"].dtype == jnp.float32  # 7 entries, below min_size and one axis
    rows, cols = np.zeros(16), np.zeros(300)
    m = np.zeros((16, 300))
    update = jax.jit(opt.update)
    for t, g in enumerate(grads, start=1):
        u, state = update(g, state, params)
        g64 = np.asarray(g["w"], np.float64)
        # the step uses the decoded (factored) old nu and this step's g^2 entry by entry
        old = np.outer(rows, cols) / rows.mean() if t > 1 else 0.0
        v = b2 * old + (1 - b2) * g64**2
        rows = b2 * rows + (1 - b2) * (g64**2).mean(axis=1)
        cols = b2 * cols + (1 - b2) * (g64**2).mean(axis=0)
        m = b1 * m + (1 - b1) * g64
        want = (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
        # float32 rounding, relative to the update's scale (m cancels to small values)
        np.testing.assert_allclose(np.asarray(u["w"]), want, rtol=2e-5, atol=1e-6 * abs(want).max())
    np.testing.assert_allclose(np.asarray(state.nu["w"].data.rows), rows, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(state.nu["w"].data.cols), cols, rtol=1e-5)
    # 4 (n + m) bytes instead of 4 n m
    assert state.nu["w"].nbytes == 4 * (16 + 300)


def test_factored_fallback_signed_moments_and_arguments() -> None:
    params = {"w": jnp.ones((64, 128)), "v": jnp.ones(8192), "s": jnp.ones((4, 4))}
    state = rmsjax.adamw(1e-3, mu_dtype=rmsjax.quantized(4), nu_dtype=rmsjax.factored()).init(
        params
    )
    nu = state[0].nu
    assert isinstance(nu["w"].storage, rmsjax.Factored)
    assert isinstance(nu["v"].storage, rmsjax.Quantized)  # one axis: the 4-bit fallback
    assert isinstance(nu["s"], jax.Array)  # below every minimum size: float32
    plain = rmsjax.adam(1e-3, nu_dtype=rmsjax.factored(fallback=None)).init(params)
    assert isinstance(plain[0].nu["v"], jax.Array)
    with pytest.raises(ValueError, match=r"second moments.*mu\['s'\]"):
        rmsjax.adam(1e-3, mu_dtype=rmsjax.factored()).init(params)
    with pytest.raises(ValueError, match="`min_size` must be an integer >= 0"):
        rmsjax.factored(min_size=-1)
    with pytest.raises(TypeError, match="`fallback` must be None"):
        rmsjax.factored(fallback=jnp.bfloat16)  # type: ignore[arg-type]
    # jit and vmap
    opt = rmsjax.adam(1e-3, nu_dtype=rmsjax.factored(min_size=16))
    stack = {"w": jnp.stack([jnp.ones((8, 8)), 2 * jnp.ones((8, 8)) + jnp.eye(8)])}
    u, _ = jax.jit(jax.vmap(opt.update))(stack, jax.vmap(opt.init)(stack), stack)
    one = {"w": stack["w"][1]}
    u1, _ = opt.update(one, opt.init(one), one)
    np.testing.assert_allclose(u["w"][1], u1["w"], rtol=1e-6)


@pytest.mark.parametrize("second", ["e4m3_sqrt", "e5m2"])
def test_float8_is_a_block_scaled_cast(second: str) -> None:
    """Adam with FP8 moments: the stored values equal a NumPy statement of the scheme (block
    maximum / the format's largest value as the scale, ml_dtypes' float8 cast), and the state
    shards, jits and vmaps like the others."""
    import ml_dtypes

    spec = rmsjax.float8(second_moment=second)  # type: ignore[arg-type]
    opt = rmsjax.scale_by_adam(mu_dtype=spec, nu_dtype=spec)
    params, grads = params_and_grads(2, seed=4)
    state = opt.init(params)
    _, state = jax.jit(opt.update)(grads[0], state, params)
    g = np.asarray(grads[0]["w"], np.float32)

    def restate(y: np.ndarray, dtype: Any, largest: float) -> np.ndarray:
        blocks = np.pad(y, [(0, 0), (0, 512 - 300)]).reshape(16, 2, 256)
        scale = (np.abs(blocks).max(axis=-1, keepdims=True) / np.float32(largest)).astype(
            np.float32
        )
        values = (blocks / np.where(scale == 0, 1, scale)).astype(dtype).astype(np.float32)
        return (values * scale).reshape(16, 512)[:, :300]

    mu = (np.float32(0.1) * g).astype(np.float32)
    nu = (np.float32(0.001) * g * g).astype(np.float32)
    np.testing.assert_allclose(
        decode(state.mu["w"]), restate(mu, ml_dtypes.float8_e4m3fn, 448), rtol=1e-6
    )
    if second == "e5m2":
        want = restate(nu, ml_dtypes.float8_e5m2, 57344)
        assert state.nu["w"].data.values.dtype == jnp.float8_e5m2
    else:
        want = restate(np.sqrt(nu), ml_dtypes.float8_e4m3fn, 448) ** 2
        assert state.nu["w"].data.root
    np.testing.assert_allclose(decode(state.nu["w"]), want, rtol=1e-5)
    assert state.mu["w"].nbytes == 16 * 300 + 4 * 16 * 2  # 1 byte per entry + the scales
    assert state.nu["b"].dtype == jnp.float32  # below min_size
    with pytest.raises(ValueError, match="`second_moment` must be one of"):
        rmsjax.float8(second_moment="e4m3")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`block_size` must be an integer >= 1"):
        rmsjax.float8(block_size=0)


def test_centered_rms_keeps_the_variance_where_4_bits_would_cancel_it() -> None:
    params = {"w": jnp.zeros((32, 256))}
    state_of = lambda storage: rmsjax.scale_by_centered_rms(nu_dtype=storage).init(params)
    assert isinstance(state_of(rmsjax.quantized(4)), rmsjax.ScaleByCenteredVarianceState)
    assert isinstance(state_of(rmsjax.factored()), rmsjax.ScaleByCenteredVarianceState)
    for storage in (None, jnp.bfloat16, rmsjax.quantized(8), rmsjax.stochastic_rounding()):
        assert isinstance(state_of(storage), rmsjax.ScaleByRStdDevState)  # optax's

    # Full-batch-like gradients: a mean of 1 and a standard deviation of 0.01. float32 state
    # steps by about g / 0.01; 4-bit nu and mu hold one significant bit each, so nu - mu^2 is
    # noise of the size of nu (the clamp at 0 then makes steps of g / sqrt(eps)); the variance
    # form stores the variance itself and follows float32.
    def steps(opt: Any) -> np.ndarray:
        update = jax.jit(opt.update)
        state, out = opt.init(params), []
        for i in range(150):
            g = {"w": 1.0 + 0.01 * jax.random.normal(jax.random.PRNGKey(i), (32, 256))}
            u, state = update(g, state)
            out.append(np.asarray(u["w"]))
        return np.abs(np.stack(out[50:]))

    four = rmsjax.quantized(4)
    reference = steps(rmsjax.scale_by_centered_rms())
    ratio = steps(rmsjax.scale_by_centered_rms(mu_dtype=four, nu_dtype=four)) / reference
    cancelled = steps(rmsjax.scale_by_centered_rms(mu_dtype=four, nu_dtype=four, variance=False))
    assert 0.7 < np.median(ratio) < 1.5 and np.mean(ratio > 10) < 0.01
    assert np.mean(cancelled / reference > 10) > 0.2  # what the variance form avoids


def _step_peak(opt: Any, leaves: int) -> tuple[float, float]:
    """Peak bytes per parameter of the compiled ``update + apply_updates`` step (parameters
    and state donated): arguments + outputs - aliased + temporaries, from XLA's memory
    analysis; and the resident bytes (parameters, gradients, state) per parameter."""
    size = 1 << 20
    params = [jnp.zeros((size // leaves // 256, 256)) for _ in range(leaves)]
    state = jax.eval_shape(opt.init, params)

    def step(p: Any, g: Any, s: Any) -> Any:
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s

    compiled = jax.jit(step, donate_argnums=(0, 2)).lower(params, params, state).compile()
    m = compiled.memory_analysis()
    peak = (
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        - m.alias_size_in_bytes
        + m.temp_size_in_bytes
    )
    resident = 8 * size + sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
    return peak / size, resident / size


@pytest.mark.parametrize("leaves", [1, 16])
def test_low_bit_state_lowers_the_peak_of_the_pure_step(leaves: int) -> None:
    """The memory that low-bit state saves is saved at the step too: the compiled pure-JAX
    AdamW step with 8-bit or 4-bit moments peaks well below the float32-state step (whose peak
    is its resident data, 16 bytes per parameter), not above it (decoding every moment whole
    would add 4 float32 bytes per moment and parameter)."""
    f32, f32_resident = _step_peak(rmsjax.adamw(1e-3), leaves)
    assert f32 <= f32_resident * 1.01
    for bits, at_most in ((8, 0.8), (4, 0.9)):
        spec = rmsjax.quantized(bits)
        peak, resident = _step_peak(rmsjax.adamw(1e-3, mu_dtype=spec, nu_dtype=spec), leaves)
        assert peak <= at_most * f32, f"{bits}-bit: {peak:.2f} bytes per parameter"
        assert resident < peak
    # bfloat16 moments (12 bytes per parameter at rest) still peak at the float32 step's 16:
    # not above it (the goal, 12.1, is open)
    sr = rmsjax.stochastic_rounding()
    peak, _ = _step_peak(rmsjax.adamw(1e-3, mu_dtype=sr, nu_dtype=sr), leaves)
    assert peak <= 1.01 * f32
