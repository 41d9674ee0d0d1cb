"""Every fenced ```python block of README.md and docs/**/*.md runs, on its own, as written.

One test per block (its id is ``file:line``). Each block is executed in a fresh namespace, in a
temporary working directory, so a block that leans on an earlier one (an undefined name, a
missing import, a literal ``...`` standing for code) fails here. A block that genuinely cannot
run in one process says so with a visible ``<!-- no-run: reason -->`` line right before its
opening fence; such blocks are listed by ``test_opt_outs_are_rare``.
"""

from __future__ import annotations

import linecache
import re
from pathlib import Path

import jax
import pytest

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^(?P<indent> *)(?P<fence>`{3,}|~{3,})(?P<info>[^\n`]*)$")
NO_RUN = re.compile(r"^\s*<!--\s*no-run:\s*(?P<reason>\S.*?)\s*-->\s*$")
MAX_OPT_OUTS = 2
# Top-level modules of the examples extra (pyproject.toml).
EXAMPLES_EXTRA = {"flax", "orbax", "tqdm", "matplotlib"}


def markdown_files() -> list[Path]:
    files = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    return [f for f in files if "_build" not in f.relative_to(ROOT).parts]


def python_blocks(path: Path) -> list[tuple[int, str, str | None]]:
    """(line of the opening fence, source, no-run reason or None) of each python block."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, indent = m["fence"], len(m["indent"])
        lang = m["info"].strip().split(" ")[0].lower() if m["info"].strip() else ""
        end = i + 1
        while end < len(lines) and not (
            lines[end].strip().startswith(fence) and set(lines[end].strip()) == {fence[0]}
        ):
            end += 1
        if lang in ("python", "py", "python3"):
            body = "\n".join(line[indent:] for line in lines[i + 1 : end])
            prev = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            opt_out = NO_RUN.match(prev)
            blocks.append((i + 1, body, opt_out["reason"] if opt_out else None))
        i = end + 1
    return blocks


BLOCKS = [
    pytest.param(path, line, source, reason, id=f"{path.relative_to(ROOT)}:{line}")
    for path in markdown_files()
    for line, source, reason in python_blocks(path)
]


def test_blocks_were_found():
    """The collector itself works: the README and the guides have runnable blocks."""
    files = {p.values[0].name for p in BLOCKS}
    assert "README.md" in files
    assert len([p for p in BLOCKS if p.values[3] is None]) >= 10


def test_opt_outs_are_rare():
    opt_outs = [(p.id, p.values[3]) for p in BLOCKS if p.values[3] is not None]
    assert len(opt_outs) <= MAX_OPT_OUTS, f"too many <!-- no-run --> blocks: {opt_outs}"


@pytest.mark.parametrize(("path", "line", "source", "reason"), BLOCKS)
def test_block_runs(path, line, source, reason, tmp_path, monkeypatch):
    if reason is not None:
        pytest.skip(f"<!-- no-run: {reason} -->")
    monkeypatch.chdir(tmp_path)
    name = f"<{path.relative_to(ROOT)}:{line}>"
    # Let tracebacks show the failing line of the block.
    linecache.cache[name] = (len(source), None, source.splitlines(keepends=True), name)
    code = compile(source, name, "exec")
    x64 = jax.config.jax_enable_x64
    try:
        exec(code, {"__name__": "__doc_block__"})
    except ModuleNotFoundError as err:
        # Blocks on the examples need the examples extra, which the floor-version CI job
        # (.ci/run, floor_tests) leaves out; everywhere else it is installed.
        if (err.name or "").split(".")[0] not in EXAMPLES_EXTRA:
            raise
        pytest.skip(f"needs the examples extra ({err.name} is not installed)")
    finally:
        jax.config.update("jax_enable_x64", x64)
