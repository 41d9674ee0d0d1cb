"""torchao's own low-bit AdamW on the quality benchmark's digits tasks: the reference run.

Trains the two digits tasks of ``benchmarks/quality.py`` (the MLP classifier 64-256-256-10 and
the autoencoder 64-256-32-256-64 on scikit-learn's bundled digits, full batch, AdamW lr 1e-3,
weight decay 1e-4, 300 steps) in PyTorch with ``torch.optim.AdamW`` (float32 state) and
torchao 0.18's ``AdamW4bit`` and ``AdamW8bit``, 5 seeds, and reports each final loss relative
to torch's float32 run of the same seed (same weights, same data). The torch models are
initialised by torch, so the numbers are compared relative to each framework's own float32
run: next to them, the same relative differences of rmsjax's storages, read from
``benchmarks/results/quality.json`` (AdamW rows).

torch and torchao are a reference, not a dependency of rmsjax::

  pip install torch==2.13.0 torchao   # the CPU wheel; a bare `torch` pulls CUDA
  python benchmarks/torchao_reference.py          # about a minute on 2 cores

Writes ``benchmarks/results/torchao_reference.{json,md}``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
TASKS = ("digits", "autoencoder")
OPTIMIZERS = ("float32", "torchao AdamW8bit", "torchao AdamW4bit")
RMSJAX = ("8-bit", "4-bit", "4-bit + factored ν", "4-bit, torchao's scheme")  # noqa: RUF001


def digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    return (data.data / 16.0).astype(np.float32), data.target.astype(np.int64)


def train(task: str, optimizer: str, seed: int, steps: int) -> float:
    """The final full-batch loss of one run (the quality benchmark's definition)."""
    import torch
    import torchao.optim

    torch.manual_seed(seed)
    x_np, y_np = digits()
    x, y = torch.from_numpy(x_np), torch.from_numpy(y_np)
    act = torch.nn.ReLU
    if task == "digits":
        sizes = [64, 256, 256, 10]
    else:
        sizes = [64, 256, 32, 256, 64]
    layers: list[Any] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(torch.nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(act())
    model = torch.nn.Sequential(*layers)

    def loss_fn() -> Any:
        out = model(x)
        if task == "digits":
            return torch.nn.functional.cross_entropy(out, y)
        return 100.0 * torch.mean((torch.sigmoid(out) - x) ** 2)

    kwargs = {"lr": 1e-3, "weight_decay": 1e-4}
    if optimizer == "float32":
        opt = torch.optim.AdamW(model.parameters(), **kwargs)
    elif optimizer == "torchao AdamW8bit":
        opt = torchao.optim.AdamW8bit(model.parameters(), **kwargs)
    else:
        opt = torchao.optim.AdamW4bit(model.parameters(), **kwargs)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
    with torch.no_grad():
        return float(loss_fn())


def rmsjax_rows(path: Path) -> dict[tuple[str, str], dict[str, Any]]:
    if not path.exists():
        return {}
    rows = json.loads(path.read_text())["summary"]
    return {(r["task"], r["storage"]): r for r in rows if r["optimizer"] == "adamw"}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument(
        "--redraw",
        action="store_true",
        help="only rewrite the markdown from <out>/torchao_reference.json and quality.json",
    )
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.redraw:
        saved = json.loads((out / "torchao_reference.json").read_text())
        write_markdown(out, saved["meta"], saved["summary"])
        return
    import torch
    import torchao

    torch.set_num_threads(1)
    start = time.perf_counter()
    runs = []
    for task in TASKS:
        for seed in range(args.seeds):
            for opt in OPTIMIZERS:
                final = train(task, opt, seed, args.steps)
                runs.append({"task": task, "optimizer": opt, "seed": seed, "final_loss": final})
                print(f"{task:11s} seed {seed} {opt:18s} final {final:.5f}", flush=True)
    summary = []
    for task in TASKS:
        base = {
            r["seed"]: r["final_loss"]
            for r in runs
            if (r["task"], r["optimizer"]) == (task, "float32")
        }
        for opt in OPTIMIZERS:
            mine = [r for r in runs if (r["task"], r["optimizer"]) == (task, opt)]
            paired = [(r["final_loss"] - base[r["seed"]]) / base[r["seed"]] for r in mine]
            finals = [r["final_loss"] for r in mine]
            summary.append(
                {
                    "task": task,
                    "optimizer": opt,
                    "final_mean": statistics.fmean(finals),
                    "final_std": statistics.stdev(finals),
                    "rel_diff": (statistics.fmean(finals) - statistics.fmean(base.values()))
                    / statistics.fmean(base.values()),
                    "paired_rel_mean": statistics.fmean(paired),
                    "paired_rel_std": statistics.stdev(paired),
                }
            )
    meta = {
        "command": "python benchmarks/torchao_reference.py " + " ".join(argv or sys.argv[1:]),
        "versions": {"torch": torch.__version__, "torchao": torchao.__version__},
        "seeds": list(range(args.seeds)),
        "steps": args.steps,
        "wall_s": time.perf_counter() - start,
    }
    (out / "torchao_reference.json").write_text(
        json.dumps({"meta": meta, "summary": summary, "runs": runs}, indent=1)
    )
    write_markdown(out, meta, summary)


def write_markdown(out: Path, meta: dict[str, Any], summary: list[dict[str, Any]]) -> None:
    """``<out>/torchao_reference.md``: torchao's rows, then rmsjax's AdamW rows of
    ``<out>/quality.json`` for the same tasks."""
    versions = meta["versions"]
    ours = rmsjax_rows(out / "quality.json")
    lines = [
        "# torchao's low-bit AdamW on the digits tasks, next to rmsjax",
        "",
        f"Produced by `{meta['command'].strip()}` in {meta['wall_s']:.0f} s (torch "
        f"{versions['torch']}, torchao {versions['torchao']}, CPU, {len(meta['seeds'])} seeds, "
        f"{meta['steps']} full-batch steps of AdamW lr 1e-3, weight decay 1e-4). Final loss "
        "relative to the same framework's float32 AdamW on the same seed (paired mean ± std over "
        "seeds); rmsjax's rows are the AdamW rows of `quality.md` (same tasks, sizes and "
        "hyperparameters; its own float32 runs as the reference).",
        "",
        "| task | storage | final loss vs float32 (paired) |",
        "|---|---|---:|",
    ]
    for task in TASKS:
        for row in summary:
            if row["task"] != task or row["optimizer"] == "float32":
                continue
            lines.append(
                f"| {task} | {row['optimizer']} (torch) | "
                f"{100 * row['paired_rel_mean']:+.1f}% ± {100 * row['paired_rel_std']:.1f}% |"
            )
        for name in RMSJAX:
            r = ours.get((task, name))
            if r is None or "paired_rel_mean" not in r:
                continue
            lines.append(
                f"| {task} | rmsjax `{name}` | "
                f"{100 * r['paired_rel_mean']:+.1f}% ± {100 * r['paired_rel_std']:.1f}% |"
            )
    (out / "torchao_reference.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
