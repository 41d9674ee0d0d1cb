"""The worked examples run (a handful of steps, through their command line) and learn.

Each example is loaded from examples/ and its ``main`` is called with small ``--steps``; the
test checks that every optimizer's training loss falls and that the picture is written. The
sharded example is exercised on 8 devices by test_sharding.py.
"""

from __future__ import annotations

import importlib.util
import itertools
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest

pytest.importorskip("flax")
pytest.importorskip("tqdm")
pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[1]


def load(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def falls(losses: list[float], window: int = 5) -> bool:
    return float(np.mean(losses[-window:])) < 0.9 * float(np.mean(losses[:window]))


@pytest.fixture(scope="module")
def mlp_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, dict[str, Any], Path]:
    ex = load("mlp_classifier")
    out = tmp_path_factory.mktemp("mlp") / "mlp.png"
    # The spirals sit on a plateau for the first few dozen steps, hence 150 steps.
    return ex, ex.main(["--steps", "150", "--out", str(out)]), out


def test_mlp_classifier_learns_with_every_optimizer(mlp_runs: Any) -> None:
    _, runs, out = mlp_runs
    assert set(runs) == {"rmsprop", "centered", "adamw", "sgd"}
    for name, (losses, acc, _, _) in runs.items():
        assert len(losses) == 150
        assert all(np.isfinite(losses)), name
        assert falls(losses, window=10), (name, losses)
        assert acc > 1 / 3, (name, acc)  # better than chance on three classes
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_mlp_classifier_checkpoint_round_trip(mlp_runs: Any, tmp_path: Path) -> None:
    """NNX model + optimizer state through Orbax: identical; another optimizer: ValueError."""
    pytest.importorskip("orbax.checkpoint")
    from flax import nnx

    ex, runs, _ = mlp_runs
    _, _, model, optimizer = runs["centered"]  # 150 steps: count, mu, nu, trace all non-trivial
    ex.save_checkpoint(str(tmp_path / "ckpt"), model, optimizer)
    fresh_model, fresh_optimizer = ex.build("centered", seed=1)  # other initial weights
    ex.restore_checkpoint(str(tmp_path / "ckpt"), fresh_model, fresh_optimizer)
    for a, b in zip(
        jax.tree.leaves((nnx.state(model), nnx.state(optimizer))),
        jax.tree.leaves((nnx.state(fresh_model), nnx.state(fresh_optimizer))),
        strict=True,
    ):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(fresh_optimizer.step.get_value()) == 150

    other_model, other_optimizer = ex.build("rmsprop")  # no momentum, not centered
    with pytest.raises(ValueError, match="do not match"):
        ex.restore_checkpoint(str(tmp_path / "ckpt"), other_model, other_optimizer)


def test_mlp_classifier_fused_equals_unfused() -> None:
    """The example's default (rmsjax.fused.nnx.Optimizer, the native kernel) against flax's own
    nnx.Optimizer over the protocol optimizer: the same losses and weights to float32 rounding."""
    from flax import nnx

    ex = load("mlp_classifier")
    for name in ("centered", "adamw"):
        fused = ex.train(name, 30, progress=False, fused=True)
        plain = ex.train(name, 30, progress=False, fused=False)
        assert type(fused[3]).__module__ == "rmsjax.fused.nnx"
        assert type(plain[3]) is nnx.Optimizer
        np.testing.assert_allclose(fused[0], plain[0], rtol=1e-4)
        for a, b in zip(
            jax.tree.leaves(nnx.state(fused[2])), jax.tree.leaves(nnx.state(plain[2])), strict=True
        ):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_char_rnn_learns_with_rmsprop_and_sgd(tmp_path: Path, capsys: Any) -> None:
    ex = load("char_rnn")
    out = tmp_path / "rnn.png"
    curves = ex.main(["--steps", "12", "--out", str(out), "--sample-length", "40"])
    assert set(curves) == {"rmsprop", "sgd"}
    for name, losses in curves.items():
        assert all(np.isfinite(losses)), name
        assert falls(losses, window=3), (name, losses)
    printed = capsys.readouterr().out
    assert printed.count("Shall I ") == 2  # one sample per optimizer
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_transformer_lm_learns_with_8bit_state(tmp_path: Path, capsys: Any) -> None:
    """A few steps with AdamW's moments in 8 bits: the loss falls, the held-out loss is finite,
    and the state takes the bytes the documented layout says (docs/guides/memory.md: arrays of
    >= 4096 entries as one uint8 code per entry plus one float32 scale per block of 256 along
    the last axis, the rest float32; plus AdamW's int32 step count)."""
    ex = load("transformer_lm")
    out = tmp_path / "lm.png"
    args = ["--storage", "8-bit", "--steps", "8", "--eval-every", "4", "--out", str(out)]
    runs = ex.main([*args, "--sample-length", "5"])
    run = runs["8-bit"]
    assert all(np.isfinite(run["losses"])) and all(np.isfinite(run["eval_losses"]))
    assert falls(run["losses"], window=3), run["losses"]
    assert run["eval_steps"] == [4, 8]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert capsys.readouterr().out.count("Shall I ") == 1

    from flax import nnx

    chars, _, _ = ex.load_text()
    params = nnx.state(ex.TransformerLM(len(chars), rngs=nnx.Rngs(0)), nnx.Param)
    shapes = [x.shape for x in jax.tree.leaves(params)]
    per_moment = sum(
        int(np.prod(s)) + 4 * int(np.prod(s[:-1])) * -(-s[-1] // 256)
        if np.prod(s) >= 4096
        else 4 * int(np.prod(s))
        for s in shapes
    )
    n = sum(int(np.prod(s)) for s in shapes)
    assert run["state_bytes_per_param"] == pytest.approx((2 * per_moment + 4) / n, rel=1e-12)
    big = sum(int(np.prod(s)) for s in shapes if np.prod(s) >= 4096)
    assert big / n > 0.95  # the example's point: nearly all of the state is quantized


def test_quality_benchmark_quick_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """benchmarks/quality.py --quick on the MLP with RMSProp, float32 and 8-bit state."""
    import json

    spec = importlib.util.spec_from_file_location("quality", ROOT / "benchmarks" / "quality.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "quality", bench)  # its dataclass looks itself up there
    monkeypatch.setattr(sys, "path", list(sys.path))  # it prepends the repository's folders
    spec.loader.exec_module(bench)
    args = ["--quick", "--tasks", "mlp", "--optimizers", "rmsprop", "--storages", "8-bit"]
    bench.main([*args, "--out", str(tmp_path), "--plot", str(tmp_path / "q.png"), "--quiet"])
    result = json.loads((tmp_path / "quality.json").read_text())
    runs = result["runs"]
    assert {(r["storage"], r["seed"]) for r in runs} == {
        (s, seed) for s in ("float32", "8-bit") for seed in (0, 1)
    }
    assert all(r["finite"] for r in runs)

    # Quantized entries: the MLP's arrays of >= 4096 entries (its 64 x 64 kernel), from the
    # layer widths of the example, over all of RMSProp's nu entries.
    widths = [2, 64, 64, 3]
    sizes = [a * b for a, b in itertools.pairwise(widths)] + widths[1:]
    expected = sum(s for s in sizes if s >= 4096) / sum(sizes)
    for r in runs:
        assert r["quantized_fraction"] == pytest.approx(expected if r["storage"] == "8-bit" else 0)

    # The summary's relative difference, recomputed from the runs.
    final = {(r["storage"], r["seed"]): r["final_loss"] for r in runs}
    f32 = np.mean([final["float32", s] for s in (0, 1)])
    q8 = np.mean([final["8-bit", s] for s in (0, 1)])
    (row,) = [r for r in result["summary"] if r["storage"] == "8-bit"]
    assert row["rel_diff"] == pytest.approx((q8 - f32) / f32, rel=1e-9)
    assert abs(row["rel_diff"]) < 0.05  # 20 steps: 8-bit state follows float32 closely
    assert row["step_time_ratio"] > 0
    text = (tmp_path / "quality.md").read_text()
    assert "python benchmarks/quality.py --quick --tasks mlp" in text
    assert "| mlp | rmsprop |" in text
    assert (tmp_path / "q.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The digits task (scikit-learn's bundled data) with the 4-bit and factored storages, run
    # apart and merged by --from-json as separate processes' results are.
    pytest.importorskip("sklearn")
    args = ["--quick", "--tasks", "digits", "--optimizers", "adamw", "--seeds", "2", "--quiet"]
    (tmp_path / "d").mkdir()
    factored_name = "4-bit + factored \u03bd"  # (nu)
    bench.main([*args, "--storages", factored_name, "--out", str(tmp_path / "d"), "--plot", ""])
    merged = bench.main(
        [
            "--from-json",
            str(tmp_path / "quality.json"),
            str(tmp_path / "d" / "quality.json"),
            "--out",
            str(tmp_path),
            "--plot",
            "",
        ]
    )
    assert merged["meta"]["tasks"] == ["mlp", "digits"]
    digits = {r["storage"]: r for r in merged["summary"] if r["task"] == "digits"}
    # the MLP's kernels (64 x 256 and 256 x 256) are stored, its 256 x 10 head is not
    factored = digits[factored_name]
    assert factored["finite"] and 0.9 < factored["quantized_fraction"] < 1
    # 4-bit first moment (0.53 B) + factored nu (~0) on the big kernels, float32 elsewhere
    assert factored["state_bytes_per_param"] < 1.0


def test_step_benchmark_same_buffers_and_processes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """benchmarks/run.py on 64K parameters: ``--same-buffers`` shares one set of buffers where
    the states have optax's layout (rmsprop) and falls back, saying why, where they do not
    (bfloat16 parameters); ``--processes 2`` merges two processes' rows into the median and
    spread; both outputs start with the machine."""
    import json

    spec = importlib.util.spec_from_file_location("bench_run", ROOT / "benchmarks" / "run.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setattr(sys, "path", list(sys.path))  # it prepends the repository's folders
    spec.loader.exec_module(bench)
    case = ["--sizes", "0.0625", "--trees", "1", "--reps", "2", "--same-buffers"]

    bench.main([*case, "--configs", "rmsprop,adamw-bf16", "--out", str(tmp_path / "one")])
    result = json.loads((tmp_path / "one" / "results.json").read_text())
    assert next(iter(result["meta"])) == "machine" and result["meta"]["same_buffers"]
    jax_rows = [r for r in result["rows"] if not r["impl"].startswith("torch")]
    buffers = {(r["config"], r["impl"]): (r["buffers"], r["buffers_note"]) for r in jax_rows}
    assert all(b == ("shared", "") for (c, _), b in buffers.items() if c == "rmsprop")
    assert all(
        b[0] == "own" and "params differ" in b[1]
        for (c, _), b in buffers.items()
        if c == "adamw-bf16"
    )
    text = (tmp_path / "one" / "results.md").read_text()
    assert text.startswith(f"Machine: {result['meta']['machine']};")
    assert "adamw-bf16, 1 leaf, 0.062M (rmsjax (bf16)'s params differ" in text

    bench.main([*case, "--configs", "rmsprop", "--processes", "2", "--out", str(tmp_path / "p")])
    result = json.loads((tmp_path / "p" / "results.json").read_text())
    assert result["meta"]["processes"] == 2
    for r in result["rows"]:
        per = [p["ratio_vs_optax"] for p in r["per_process"]]
        assert r["processes"] == len(per) == 2 and r["buffers"] == "shared"
        assert r["ratio_vs_optax"] == pytest.approx(float(np.median(per)))
        assert (r["ratio_min"], r["ratio_max"]) == (min(per), max(per))
        assert len(r["step_ms_all"]) == 2 * 2  # every timing of both processes
    text = (tmp_path / "p" / "results.md").read_text()
    assert text.startswith("Machine: ") and "every case ran in 2 fresh processes" in text
