"""Runs every command block that README.md and docs/*.md mark ``<!-- runnable -->``, so the
documented commands cannot drift (docs/testing.md, *Runnable examples*).

Each block runs with ``bash -e`` from the repository root, with ``RUN_DIR`` set to a temporary
directory, as a user would run it: no simulated-device flag is inherited from the test session
(train.py sets its own). Variants: ``output`` (the next fenced block must appear in stdout, in
order), ``errors`` (each command exits with 2 and prints the matching ``error:`` line of the
next fenced block; a line ending in ``...`` is a prefix), ``h100`` (skipped without the H100
compile plugin)."""

import os
import re
import subprocess

import pytest

from support import ROOT
from test_docs import commands, runnable_blocks

pytestmark = pytest.mark.slow

BLOCKS = runnable_blocks()
TIMEOUT = 600


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


def expected_lines(block) -> list[str]:
    return [s.rstrip() for s in block.text.splitlines() if s.strip()]


def check_errors(block, expected, env):
    want = expected_lines(expected)
    for cmd, line in zip(commands(block.text), want, strict=True):
        r = run(cmd, env)
        assert r.returncode == 2, (
            f"{block.id}: `{cmd}` exited with {r.returncode}, expected 2\n{tail(r.stderr)}")
        got = [s for s in r.stderr.splitlines() if s.startswith("error:")]
        assert got, f"{block.id}: `{cmd}` printed no error line\n{tail(r.stderr)}"
        if line.endswith("..."):
            assert got[-1].startswith(line[:-3].rstrip()), (
                f"{block.id}: `{cmd}` printed\n  {got[-1]}\nthe page shows\n  {line}")
        else:
            assert got[-1] == line, (
                f"{block.id}: `{cmd}` printed\n  {got[-1]}\nthe page shows\n  {line}")


def check_output(block, expected, stdout):
    lines = [s.rstrip() for s in stdout.splitlines()]
    want = expected_lines(expected)
    i = 0
    for line in lines:
        if i < len(want) and line == want[i]:
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
