"""benchmarks/compare.py runs end to end on tiny shapes (a smoke run: no timing assertions)."""

import importlib.util

from support import ROOT


def load(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
