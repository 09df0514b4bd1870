"""benchmarks/compare.py runs end to end on tiny shapes (a smoke run: no timing assertions)."""

import sys
from pathlib import Path

import pytest

from support import load_script


def load(name):
    return load_script(f"benchmarks/{name}.py")


@pytest.mark.slow
def test_compare_smoke_run(tmp_path, capsys):
    png = tmp_path / "compare.png"
    tiny = ["model.d_model=32", "model.num_layers=1", "model.num_dense_layers=0",
            "model.num_heads=8", "model.d_ff=64", "model.moe_d_ff=32", "train.batch_size=8",
            "train.seq_len=32"]
    code = load("compare").main(["--steps", "1", "--plot", str(png),
                                 *[a for o in tiny for a in ("--set", o)]])
    assert code == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines()
            if line.startswith(("msmoe (ours)", "GSPMD (jit)", "Megatron TP+EP (ours)"))]
    assert len(rows) == 3, out
    assert rows[0].split()[3] == "1.00x"
    # The three train the same model: the same first-step loss.
    assert len({row.split()[-1] for row in rows}) == 1, rows
    assert png.stat().st_size > 10_000


def test_compare_without_matplotlib_skips_the_plot_up_front(monkeypatch, capsys):
    """Without matplotlib the plot is dropped with a note before the benchmark runs (it used
    to run the whole benchmark and then fail on the import)."""
    compare = load("compare")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert compare.plot_path("runs/bench/compare.png") is None
    assert "matplotlib is not installed" in capsys.readouterr().out
    monkeypatch.undo()
    assert compare.plot_path("x.png") == Path("x.png") and compare.plot_path("") is None
