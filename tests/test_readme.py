"""Runs every command block that README.md and docs/*.md mark ``<!-- runnable -->``, so the
documented commands cannot drift (docs/testing.md, *Runnable examples*).

Each block runs with ``bash -e`` from the repository root, with ``RUN_DIR`` set to a temporary
directory, as a user would run it: no simulated-device flag is inherited from the test session
(train.py sets its own). Variants, as words after ``runnable:``: ``output`` (the next fenced
block must appear in stdout, line by line in order), ``errors`` (each command exits with 2 and
prints the matching ``error:`` line of the next fenced block; a line ending in ``...`` is a
prefix), ``h100`` (skipped without the H100 compile plugin)."""

import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from support import ROOT

pytestmark = pytest.mark.slow

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARKER = re.compile(r"^<!--\s*runnable(?::\s*([\w\s-]*))?\s*-->\s*$")
VARIANTS = {"output", "errors", "h100"}
TIMEOUT = 600


# ---------------------------------------------------------------------------------------------
# The marked blocks


@dataclass
class Block:
    """A fenced code block: the page, the fence's line (1-based), its info string, its text,
    and the words of the ``<!-- runnable[: words] -->`` marker on the line before (None: not
    marked)."""

    page: Path
    line: int
    info: str
    text: str
    marker: set | None

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def fenced_blocks(page: Path) -> list[tuple[Block, int]]:
    """Every fenced block of ``page`` with the 0-based index of its closing fence."""
    lines = page.read_text().splitlines()
    out, i = [], 0
    while i < len(lines):
        m = re.match(r"^```(.*)$", lines[i])
        if not m:
            i += 1
            continue
        start, body = i, []
        i += 1
        while i < len(lines) and lines[i] != "```":
            body.append(lines[i])
            i += 1
        mm = MARKER.match(lines[start - 1]) if start else None
        marker = set((mm.group(1) or "").split()) if mm else None
        out.append((Block(page, start + 1, m.group(1).strip(), "\n".join(body) + "\n", marker),
                    i))
        i += 1
    return out


def runnable_blocks() -> list[tuple[Block, Block | None]]:
    """Every marked block with the fenced block right after it (its expected output, for the
    ``output`` and ``errors`` variants) when only blank lines separate the two."""
    out = []
    for page in PAGES:
        lines = page.read_text().splitlines()
        blocks = fenced_blocks(page)
        for k, (b, close) in enumerate(blocks):
            if b.marker is None:
                continue
            nxt = None
            if k + 1 < len(blocks):
                following = blocks[k + 1][0]
                if all(not s.strip() for s in lines[close + 1:following.line - 1]):
                    nxt = following
            out.append((b, nxt))
    return out


def commands(text: str) -> list[str]:
    """The commands of a block: backslash continuations joined; blank and comment lines out."""
    out, current = [], ""
    for line in text.splitlines():
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        line, current = current + line, ""
        if line.strip() and not line.lstrip().startswith("#"):
            out.append(line.strip())
    return out


BLOCKS = runnable_blocks()


def test_runnable_blocks_are_well_formed():
    """Cheap checks before anything runs: bash blocks; nothing that installs, runs the suite or
    needs a checkpoint from outside; training writes under $RUN_DIR for a few steps."""
    assert BLOCKS, "no <!-- runnable --> blocks found"
    problems = []
    for b, nxt in BLOCKS:
        if b.info != "bash":
            problems.append(f"{b.id}: a runnable block must be ```bash")
        if b.marker - VARIANTS:
            problems.append(f"{b.id}: unknown variant(s) {sorted(b.marker - VARIANTS)}")
        for cmd in commands(b.text):
            if re.search(r"\bpip install\b|\bpytest\b|msmoe_jax\.convert\b", cmd):
                problems.append(f"{b.id}: not runnable here: {cmd}")
            trains = re.search(r"\btrain\.py\b", cmd) and not re.search(
                r"--help|--print-config", cmd)
            if trains and "errors" not in b.marker:
                if "run.dir=$RUN_DIR/" not in cmd:
                    problems.append(f"{b.id}: a training command must write under "
                                    f"--set run.dir=$RUN_DIR/...: {cmd}")
                steps = re.search(r"train\.steps=(\d+)", cmd)
                if not steps or int(steps.group(1)) > 10:
                    problems.append(f"{b.id}: set a small train.steps (<= 10): {cmd}")
        if b.marker & {"output", "errors"} and nxt is None:
            problems.append(f"{b.id}: needs the expected output block right after it")
        if "errors" in b.marker and nxt is not None:
            n_cmd, n_err = len(commands(b.text)), len(expected_lines(nxt))
            if n_cmd != n_err:
                problems.append(f"{b.id}: {n_cmd} commands but {n_err} error lines")
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------------------------------------
# Running them


def h100_available() -> bool:
    from msmoe_jax import h100

    return h100.available()


def user_env(run_dir) -> dict:
    env = dict(os.environ, RUN_DIR=str(run_dir))
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                   env.get("XLA_FLAGS", "")).strip()
    if flags:
        env["XLA_FLAGS"] = flags
    else:
        env.pop("XLA_FLAGS", None)
    return env


def run(code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-e", "-o", "pipefail", "-c", code], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT)


def tail(text: str, n: int = 30) -> str:
    return "\n".join(text.splitlines()[-n:])


def expected_lines(block: Block) -> list[str]:
    return [s.rstrip() for s in block.text.splitlines() if s.strip()]


def check_errors(block: Block, expected: Block, env: dict) -> None:
    for cmd, line in zip(commands(block.text), expected_lines(expected), strict=True):
        r = run(cmd, env)
        assert r.returncode == 2, (
            f"{block.id}: `{cmd}` exited with {r.returncode}, expected 2\n{tail(r.stderr)}")
        got = [s for s in r.stderr.splitlines() if s.startswith("error:")]
        assert got, f"{block.id}: `{cmd}` printed no error line\n{tail(r.stderr)}"
        if line.endswith("..."):
            ok = got[-1].startswith(line[:-3].rstrip())
        else:
            ok = got[-1] == line
        assert ok, f"{block.id}: `{cmd}` printed\n  {got[-1]}\nthe page shows\n  {line}"


def check_output(block: Block, expected: Block, stdout: str) -> None:
    want, i = expected_lines(expected), 0
    for line in stdout.splitlines():
        if i < len(want) and line.rstrip() == want[i]:
            i += 1
    assert i == len(want), (
        f"{block.id}: the output shown on the page is not what the command prints; first "
        f"line not found: {want[i]!r}\n--- printed (last lines) ---\n{tail(stdout)}")


@pytest.mark.parametrize("block,expected", BLOCKS, ids=[b.id for b, _ in BLOCKS])
def test_runnable_block(block, expected, tmp_path):
    if "h100" in block.marker and not h100_available():
        pytest.skip("needs the H100 compile plugin: pip install -e '.[h100-compile]'")
    env = user_env(tmp_path)
    if "errors" in block.marker:
        check_errors(block, expected, env)
        return
    r = run(block.text, env)
    assert r.returncode == 0, (
        f"{block.id} exited with {r.returncode}\n--- block ---\n{block.text}"
        f"--- stdout ---\n{tail(r.stdout)}\n--- stderr ---\n{tail(r.stderr)}")
    if "output" in block.marker:
        check_output(block, expected, r.stdout)
