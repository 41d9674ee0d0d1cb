"""``rmsjax.compat.pytorch.lr_scheduler`` against the learning rates of real torch runs.

``tests/reference/torch_lr.npz`` holds, for each case, the ``param_groups[0]["lr"]`` a torch
2.13 scheduler gave to each of 300 ``optimizer.step()`` calls, stepping the scheduler after
every update or once per epoch of 4 updates (written by ``tests/reference/generate.py``, which
also records the scheduler classes' signatures). The schedules must give the same rates,
eagerly and under jit, to float32 accuracy.
"""

from __future__ import annotations

import inspect
import json
import math
import re
from functools import cache
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rmsjax.compat.pytorch as P
from rmsjax.compat.pytorch import lr_scheduler as L
from tests.reference.generate import LR_LAMBDAS, REQUIRED

REF = Path(__file__).parent / "reference" / "torch_lr.npz"
RTOL = 2e-6  # float32 rounding, a few ulp (see the module docstring for the bound)


@cache
def reference() -> tuple[list[dict[str, Any]], dict[str, np.ndarray], dict[str, Any]]:
    with np.load(REF) as z:
        arrays = {k: z[k] for k in z.files}
    cases = json.loads(str(arrays.pop("cases")))
    signatures = json.loads(str(arrays.pop("signatures")))
    return cases, arrays, signatures


def build(name: str, lr: float | None, kwargs: dict[str, Any], **options: Any) -> Any:
    kw = dict(kwargs)
    if name == "LambdaLR":
        kw["lr_lambda"] = LR_LAMBDAS[kw["lr_lambda"]]
    if name == "SequentialLR":
        kw["schedulers"] = [build(c["scheduler"], lr, c["kwargs"]) for c in kw["schedulers"]]
    factory = getattr(L, name)
    return factory(**kw, **options) if lr is None else factory(lr, **kw, **options)


def schedule_cases() -> list[Any]:
    cases, _, _ = reference()
    return [pytest.param(c, id=c["key"]) for c in cases if c["scheduler"] != "ReduceLROnPlateau"]


def plateau_cases() -> list[Any]:
    cases, _, _ = reference()
    return [pytest.param(c, id=c["key"]) for c in cases if c["scheduler"] == "ReduceLROnPlateau"]


def assert_rates(got: Any, want: np.ndarray) -> None:
    got = np.asarray(got, np.float64)
    assert got.dtype == np.float64 and got.shape == want.shape
    bad = ~np.isclose(got, want, rtol=RTOL, atol=0.0)
    if np.any(bad):
        first = int(np.argmax(bad))
        raise AssertionError(
            f"{int(bad.sum())} rates differ; first at count {first}: {got[first]!r} vs torch "
            f"{want[first]!r} (max rel err {np.max(np.abs(got / want - 1)[want != 0]):.2e})"
        )


def build_case(case: dict[str, Any]) -> Any:
    options = {"updates_per_epoch": case["updates_per_epoch"]}
    return build(case["scheduler"], case["lr"], case["kwargs"], **options)


@cache
def jitted_rates() -> dict[str, np.ndarray]:
    """Every schedule under jit, one scalar count at a time (what optax does), compiled once."""
    cases = [p.values[0] for p in schedule_cases()]
    schedules = [build_case(c) for c in cases]
    counts = jnp.arange(reference()[1][f"{cases[0]['key']}/lr"].size, dtype=jnp.int32)
    rates = jax.jit(lambda c: [jax.vmap(s)(c) for s in schedules])(counts)
    return {c["key"]: np.asarray(r) for c, r in zip(cases, rates, strict=True)}


@pytest.mark.parametrize("case", schedule_cases())
def test_schedule_matches_torch(case: dict[str, Any]) -> None:
    _, arrays, _ = reference()
    want = arrays[f"{case['key']}/lr"]
    counts = jnp.arange(want.size, dtype=jnp.int32)
    assert_rates(build_case(case)(counts), want)  # eager, all counts at once
    assert_rates(jitted_rates()[case["key"]], want)


@pytest.mark.parametrize("case", plateau_cases())
def test_reduce_lr_on_plateau_matches_torch(case: dict[str, Any]) -> None:
    _, arrays, _ = reference()
    want = arrays[f"{case['key']}/lr"]
    values = jnp.asarray(arrays[f"{case['key']}/values"], jnp.float32)
    lr = case["lr"]
    tx = L.ReduceLROnPlateau(lr, **case["kwargs"], updates_per_epoch=case["updates_per_epoch"])
    params = {"w": jnp.ones(2)}

    def step(state: Any, value: jax.Array) -> tuple[Any, jax.Array]:
        updates, state = tx.update(params, state, params, value=value)
        return state, updates["w"][0] * lr

    _, got = jax.jit(lambda s: jax.lax.scan(step, s, values))(tx.init(params))
    assert_rates(got, want)


def test_reduce_lr_on_plateau_chains_after_an_optimizer() -> None:
    """Chained after ``sgd(lr, momentum)``, the update equals a plain SGD run whose rate is the
    reduced one: torch changes ``param_group["lr"]``, which sits outside the buffer."""
    params = {"w": jnp.array([1.0, -2.0])}
    losses = [1.0, 0.5, 0.5, 0.5, 0.5, 0.5]
    opt = optax.chain(P.sgd(lr=0.1, momentum=0.9), L.ReduceLROnPlateau(0.1, patience=1))
    state = opt.init(params)
    buffer = jnp.zeros(2)
    lr = 0.1
    best, bad = math.inf, 0
    update = jax.jit(opt.update)
    for i, loss in enumerate(losses):
        g = {"w": jnp.array([0.3, 0.1]) * (i + 1)}
        updates, state = update(g, state, params, value=loss)
        buffer = g["w"] if i == 0 else 0.9 * buffer + g["w"]
        np.testing.assert_allclose(updates["w"], -lr * buffer, rtol=1e-6)
        # torch's rule, stated in plain Python (mode min, rel threshold 1e-4, patience 1)
        if loss < best * (1 - 1e-4):
            best, bad = loss, 0
        else:
            bad += 1
        if bad > 1:
            lr, bad = lr * 0.1, 0
    assert lr < 0.1 * 0.1 + 1e-12  # the run did reduce (twice), so the test can fail


def test_one_cycle_holds_its_final_rate_past_total_steps() -> None:
    """torch raises past ``total_steps``; the schedule holds its rate at ``total_steps - 1``."""
    cases, arrays, _ = reference()
    case = next(c for c in cases if c["scheduler"] == "OneCycleLR")
    total = case["kwargs"]["total_steps"]
    want = arrays[f"{case['key']}/lr"][total - 1]
    schedule = build("OneCycleLR", None, case["kwargs"])
    later = schedule(jnp.array([total + 1, total + 50, 2**31 - 1], jnp.int32))
    assert_rates(later, np.full(3, want))


def test_large_counts_stay_accurate() -> None:
    """gamma ** count from a float64 log: no drift from rounding gamma to float32."""
    count = 100_000
    got = float(L.ExponentialLR(1.0, gamma=0.9999)(count))
    want = 0.9999**count
    assert abs(got / want - 1) < 1e-5
    # Raising the rounded gamma would be off by about count * 3e-8 relative:
    assert abs(float(jnp.float32(0.9999)) ** count / want - 1) > 1e-4


@pytest.mark.parametrize("name", L.__all__)
def test_signatures_are_torchs(name: str) -> None:
    """torch's argument names, order and defaults, after the first argument (the optimizer,
    here its initial ``lr``; OneCycleLR has none) and before the keyword-only options."""
    _, _, recorded = reference()
    if name not in recorded:
        assert name in {"TorchSchedule", "ReduceLROnPlateauState"}
        return
    params = list(inspect.signature(getattr(L, name)).parameters.values())
    if params[0].name == "lr":
        params = params[1:]
    got = [
        [p.name, p.kind.name, REQUIRED if p.default is inspect.Parameter.empty else p.default]
        for p in params
        if p.kind is not inspect.Parameter.KEYWORD_ONLY
    ]
    assert got == recorded[name]
    assert (name == "OneCycleLR") != ("lr" in inspect.signature(getattr(L, name)).parameters)


def test_reference_covers_every_scheduler_and_both_steppings() -> None:
    cases, _, recorded = reference()
    names = {c["scheduler"] for c in cases}
    assert names == set(recorded) == set(L.__all__) - {"TorchSchedule", "ReduceLROnPlateauState"}
    for name in names:
        assert {c["updates_per_epoch"] for c in cases if c["scheduler"] == name} == {1, 4}, name


# --------------------------------------------------------------------------------------------
# Bad arguments: raised at construction, with torch's argument name
# --------------------------------------------------------------------------------------------

BAD: list[tuple[Any, dict[str, Any], str, type[Exception]]] = [
    (L.StepLR, {"lr": -0.1, "step_size": 3}, "lr", ValueError),
    (L.StepLR, {"lr": 0.1, "step_size": 0}, "step_size", ValueError),
    (L.StepLR, {"lr": 0.1, "step_size": 2.5}, "step_size", TypeError),
    (L.StepLR, {"lr": 0.1, "step_size": 3, "gamma": -0.5}, "gamma", ValueError),
    (
        L.StepLR,
        {"lr": 0.1, "step_size": 3, "updates_per_epoch": 0},
        "updates_per_epoch",
        ValueError,
    ),
    (L.MultiStepLR, {"lr": 0.1, "milestones": [3, -1]}, "milestones", ValueError),
    (L.MultiStepLR, {"lr": 0.1, "milestones": [3], "gamma": math.nan}, "gamma", ValueError),
    (L.ExponentialLR, {"lr": 0.1, "gamma": -1.0}, "gamma", ValueError),
    (L.ExponentialLR, {"lr": math.inf, "gamma": 0.9}, "lr", ValueError),
    (L.CosineAnnealingLR, {"lr": 0.1, "T_max": 0}, "T_max", ValueError),
    (L.CosineAnnealingLR, {"lr": 0.1, "T_max": 5, "eta_min": -1e-3}, "eta_min", ValueError),
    (L.CosineAnnealingWarmRestarts, {"lr": 0.1, "T_0": 0}, "T_0", ValueError),
    (L.CosineAnnealingWarmRestarts, {"lr": 0.1, "T_0": 5, "T_mult": 0}, "T_mult", ValueError),
    (L.CosineAnnealingWarmRestarts, {"lr": 0.1, "T_0": 5, "T_mult": 1.5}, "T_mult", TypeError),
    (L.CosineAnnealingWarmRestarts, {"lr": 0.1, "T_0": 5, "eta_min": -1.0}, "eta_min", ValueError),
    (L.LinearLR, {"lr": 0.1, "start_factor": 0.0}, "start_factor", ValueError),
    (L.LinearLR, {"lr": 0.1, "end_factor": 1.5}, "end_factor", ValueError),
    (L.LinearLR, {"lr": 0.1, "total_iters": -1}, "total_iters", ValueError),
    (L.OneCycleLR, {"max_lr": -0.1, "total_steps": 10}, "max_lr", ValueError),
    (L.OneCycleLR, {"max_lr": 0.1, "total_steps": 0}, "total_steps", ValueError),
    (L.OneCycleLR, {"max_lr": 0.1, "epochs": 0, "steps_per_epoch": 3}, "epochs", ValueError),
    (
        L.OneCycleLR,
        {"max_lr": 0.1, "epochs": 2, "steps_per_epoch": 0},
        "steps_per_epoch",
        ValueError,
    ),
    (L.OneCycleLR, {"max_lr": 0.1, "epochs": 2}, "total_steps", ValueError),
    (L.OneCycleLR, {"max_lr": 0.1, "total_steps": 9, "pct_start": 1.5}, "pct_start", ValueError),
    (L.OneCycleLR, {"max_lr": 0.1, "total_steps": 4, "pct_start": 0.25}, "pct_start", ValueError),
    (
        L.OneCycleLR,
        {"max_lr": 0.1, "total_steps": 9, "anneal_strategy": "exp"},
        "anneal_strategy",
        ValueError,
    ),
    (L.OneCycleLR, {"max_lr": 0.1, "total_steps": 9, "div_factor": 0.0}, "div_factor", ValueError),
    (
        L.OneCycleLR,
        {"max_lr": 0.1, "total_steps": 9, "final_div_factor": -1.0},
        "final_div_factor",
        ValueError,
    ),
    (L.LambdaLR, {"lr": 0.1, "lr_lambda": 0.5}, "lr_lambda", TypeError),
    (L.SequentialLR, {"lr": 0.1, "schedulers": [], "milestones": []}, "schedulers", ValueError),
    (
        L.SequentialLR,
        {"lr": 0.1, "schedulers": [L.ExponentialLR(0.1, 0.9)] * 2, "milestones": []},
        "milestones",
        ValueError,
    ),
    (
        L.SequentialLR,
        {"lr": 0.1, "schedulers": [L.ExponentialLR(0.1, 0.9)] * 3, "milestones": [5, 2]},
        "milestones",
        ValueError,
    ),
    (
        L.SequentialLR,
        {"lr": 0.1, "schedulers": [L.ExponentialLR(0.2, 0.9)], "milestones": []},
        "lr",
        ValueError,
    ),
    (
        L.SequentialLR,
        {
            "lr": 0.1,
            "schedulers": [L.ExponentialLR(0.1, 0.9, updates_per_epoch=3)],
            "milestones": [],
        },
        "updates_per_epoch",
        ValueError,
    ),
    (
        L.SequentialLR,
        {"lr": 0.1, "schedulers": [L.ReduceLROnPlateau(0.1)], "milestones": []},
        "schedulers[0]",
        TypeError,
    ),
    (L.ReduceLROnPlateau, {"lr": 0.0}, "lr", ValueError),
    (L.ReduceLROnPlateau, {"lr": 0.1, "mode": "minimum"}, "mode", ValueError),
    (L.ReduceLROnPlateau, {"lr": 0.1, "factor": 1.0}, "factor", ValueError),
    (L.ReduceLROnPlateau, {"lr": 0.1, "patience": -1}, "patience", ValueError),
    (L.ReduceLROnPlateau, {"lr": 0.1, "threshold": -1e-4}, "threshold", ValueError),
    (L.ReduceLROnPlateau, {"lr": 0.1, "threshold_mode": "relative"}, "threshold_mode", ValueError),
    (L.ReduceLROnPlateau, {"lr": 0.1, "cooldown": -2}, "cooldown", ValueError),
    (L.ReduceLROnPlateau, {"lr": 0.1, "min_lr": -1.0}, "min_lr", ValueError),
    (L.ReduceLROnPlateau, {"lr": 0.1, "eps": -1.0}, "eps", ValueError),
    (L.ReduceLROnPlateau, {"lr": 0.1, "updates_per_epoch": 0}, "updates_per_epoch", ValueError),
]


@pytest.mark.parametrize(
    ("factory", "kwargs", "name", "error"),
    BAD,
    ids=[f"{f.__name__}-{n}-{i}" for i, (f, _, n, _) in enumerate(BAD)],
)
def test_bad_arguments_raise_naming_torchs_argument(
    factory: Any, kwargs: dict[str, Any], name: str, error: type[Exception]
) -> None:
    with pytest.raises(error, match=re.escape(f"`{name}`")):
        factory(**kwargs)


def test_traced_arguments_are_not_checked() -> None:
    @jax.jit
    def rate(lr: jax.Array, gamma: jax.Array) -> jax.Array:
        return L.StepLR(lr, step_size=2, gamma=gamma)(jnp.int32(5))

    np.testing.assert_allclose(rate(0.1, 0.5), 0.1 * 0.5**2, rtol=1e-6)
