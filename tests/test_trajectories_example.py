"""examples/trajectories.py runs headless, converges where the issue says, writes its PNGs."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "trajectories.py"


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("trajectories_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def short_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    pytest.importorskip("matplotlib")
    out = tmp_path_factory.mktemp("trajectories")
    return load_example().main(["--steps", "50", "--out", str(out), "--quiet"]), out


def test_rmsprop_reaches_the_bowl_minimum_within_50_steps(short_run: Any) -> None:
    result, _ = short_run
    f = result["f"]["bowl"]["rmsprop"]
    assert f.shape == (51,)
    assert f[0] == pytest.approx(0.54**2 + 0.34**2, rel=1e-6)
    assert f.min() < 1e-4
    # the example's RMSProp path is optax.rmsprop(0.01, decay=0.99)'s, run here independently
    opt = optax.rmsprop(0.01, decay=0.99)

    def step(carry: Any, _: Any) -> tuple[Any, Any]:
        p, s = carry
        u, s = opt.update(jax.grad(lambda q: jnp.sum(q**2))(p), s, p)
        p = optax.apply_updates(p, u)
        return (p, s), p

    p0 = jnp.asarray([0.54, 0.34], jnp.float32)
    expected = np.asarray(jax.lax.scan(step, (p0, opt.init(p0)), None, length=50)[1])
    np.testing.assert_allclose(
        result["paths"]["bowl"]["rmsprop"][1:], expected, rtol=1e-5, atol=1e-7
    )


def test_every_optimizer_runs_on_every_surface(short_run: Any) -> None:
    result, _ = short_run
    expected = {
        "sgd",
        "momentum",
        "nesterov",
        "adagrad",
        "adadelta",
        "rmsprop",
        "rmsprop_centered",
        "rmsprop_momentum",
        "adam",
        "adamw",
        "rprop",
    }
    assert set(result["paths"]) == {"bowl", "valley", "rosenbrock"}
    for surface, per_opt in result["f"].items():
        assert set(per_opt) == expected, surface
        for name, f in per_opt.items():
            assert np.all(np.isfinite(f)), (surface, name)
            # every method makes progress from its start in 50 steps
            assert f[-1] < f[0], (surface, name)


def test_every_png_is_written_and_not_empty(short_run: Any) -> None:
    result, out = short_run
    names = sorted(p.name for p in out.iterdir())
    assert names == ["bowl.png", "loss.png", "rosenbrock.png", "valley.png"]
    assert sorted(p.name for p in result["pngs"]) == names
    for png in out.iterdir():
        data = png.read_bytes()
        assert len(data) > 10_000 and data[:8] == b"\x89PNG\r\n\x1a\n", png


def test_no_plot_prints_tables_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    example = load_example()
    # one optimizer keeps this run to a few small compilations
    monkeypatch.setattr(example, "OPTIMIZERS", {"sgd": example.OPTIMIZERS["sgd"]})
    example.main(["--steps", "3", "--out", str(tmp_path / "none"), "--no-plot"])
    text = capsys.readouterr().out
    assert "iteration | (x, y)" in text and "bowl / SGD" in text
    assert "        3 | (" in text
    assert not (tmp_path / "none").exists()
