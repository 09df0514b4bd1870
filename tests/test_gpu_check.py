"""benchmarks/gpu_check.py, the lent GPU's one-command check: its smoke run on CPU passes every
check it can run here and writes both reports; its checks fail on a wrong kernel; its profile
reader counts only the GPU's streams."""

import gzip
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from support import ROOT, load_script


@pytest.fixture
def gpu_check(monkeypatch):
    # Loading it adds train.py's GPU flags to XLA_FLAGS: undone after the test.
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))
    return load_script("benchmarks/gpu_check.py")


@pytest.mark.slow
def test_smoke_run_passes_and_reports(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks/gpu_check.py"), "--smoke",
                           "--out", str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    sections = report["sections"]
    assert list(sections) == ["ceilings", "correctness", "step", "gemm", "layer", "fp8",
                              "lowerings", "targets"]
    assert not [n for n, s in sections.items() if "error" in s or not s.get("records")]
    checks = sections["correctness"]["records"]
    # Every check ran and passed, except cuDNN attention, which needs a GPU.
    assert {r["status"] for r in checks} == {"pass", "skip"}, checks
    assert [r["name"] for r in checks if r["status"] == "skip"] == [
        "cuDNN flash attention vs XLA"]
    names = [r["name"] for r in checks]
    for impl in ("pallas", "ragged_dot", "padded"):
        assert names.count(f"grouped GEMM {impl}, plain") == 2  # fp32 and bf16
    assert names.count("grouped GEMM pallas, gather-scatter-scale") == 2  # fp32 and bf16
    assert sum(n.startswith("expert layer fused") for n in names) == 3  # cf 1 in bf16 only
    train = next(r for r in checks if r["name"].startswith("default model"))
    assert train["losses"][-1] < train["losses"][0]
    step, = sections["step"]["records"]
    assert step["tokens_per_s"] > 0 and step["model_nominal_ms"] > 0
    # Our kernel against the best ragged_dot of all lowerings, per routing (no MFU on CPU).
    goals = sections["targets"]["records"]
    assert [r["name"] for r in goals] == [f"tiny {r}: forward vs the best ragged_dot"
                                          for r in ("balanced", "skewed")]
    assert all(r["status"] in ("met", "missed") for r in goals)
    assert {r["name"].split(":")[0] for r in sections["lowerings"]["records"]} == {
        "jax masked", "cuDNN fusion"}
    md = (tmp_path / "gpu_check.md").read_text()
    assert "smoke run: figures mean nothing" in md and "## lowerings" in md


def test_grouped_gemm_check_fails_on_a_wrong_kernel(gpu_check, monkeypatch):
    """A kernel that skips the last group's rows (as a masking bug would) fails the check,
    forward and backward; ragged_dot and the padded reference still pass."""
    from msmoe_jax.kernels import grouped_gemm

    def dropping_last(lhs, rhs, sizes, src=None, dst=None, scale=None, out_rows=None,
                      out_dtype=None, tiles=None, interpret=None):
        assert src is None or out_rows is not None
        cut = sizes.at[-2].set(0)  # the last non-empty group (SIZES ends with an empty one)
        rows = lhs if src is None else lhs[src]
        y = jax.lax.ragged_dot(rows, rhs, cut)
        if scale is not None:
            y = y * scale[:, None]
        return y if dst is None else jnp.zeros_like(y).at[dst].set(y)

    monkeypatch.setattr(grouped_gemm, "grouped_matmul", dropping_last)
    ctx = gpu_check.Ctx(True, False, 1, None, 60.0, 0.0)
    with jax.default_matmul_precision("highest"):
        records = gpu_check.check_grouped_gemm(ctx)
    status = {(r["name"], r["dtype"]): r["status"] for r in records}
    assert status[("grouped GEMM pallas, plain", "float32")] == "FAIL"
    assert status[("grouped GEMM pallas, gather-scatter-scale", "bfloat16")] == "FAIL"
    assert status[("grouped GEMM ragged_dot, plain", "float32")] == "pass"
    assert status[("grouped GEMM padded, plain", "bfloat16")] == "pass"


def test_rel_error_never_passes_nan(gpu_check):
    assert gpu_check.rel_error([1.0, np.nan], [1.0, 2.0]) == float("inf")
    assert gpu_check.rel_error([1.0, 2.0], [1.0, 2.0]) == 0.0
    assert gpu_check.verdict(2e-4, gpu_check.TOL["float32"]) == "FAIL"


def test_profile_reader_counts_gpu_streams_only(gpu_check, tmp_path):
    """Kernel time by kind from a Perfetto trace: the GPU's "Stream" lines, not the "XLA Ops"
    line that repeats them, nor the host."""
    meta = lambda pid, tid, what, name: {"ph": "M", "pid": pid, "tid": tid, "name": what,
                                         "args": {"name": name}}
    x = lambda pid, tid, name, dur: {"ph": "X", "pid": pid, "tid": tid, "name": name,
                                     "ts": 0, "dur": dur}
    events = [meta(1, 0, "process_name", "/device:GPU:0"),
              meta(1, 7, "thread_name", "Stream #7(Compute)"),
              meta(1, 9, "thread_name", "XLA Ops"),
              meta(2, 0, "process_name", "/host:CPU"),
              meta(2, 3, "thread_name", "Stream #3"),
              x(1, 7, "nvjet_hsh_128x256_gemm", 300), x(1, 7, "loop_fusion_3", 50),
              x(1, 7, "triton_grouped_gemm_kernel", 200), x(1, 7, "cudnn_fmha_fwd", 100),
              x(1, 9, "nvjet_hsh_128x256_gemm", 300), x(2, 3, "loop_fusion_3", 999)]
    path = tmp_path / "plugins/profile/run1/perfetto_trace.json.gz"
    path.parent.mkdir(parents=True)
    with gzip.open(path, "wt") as fh:
        json.dump({"traceEvents": events}, fh)
    kinds = gpu_check.kernel_time_by_kind(tmp_path)
    assert kinds == pytest.approx({"GEMM (cuBLAS/XLA)": 300e-6, "other fusions": 50e-6,
                                   "grouped GEMM (Pallas)": 200e-6,
                                   "attention (cuDNN)": 100e-6})
    assert gpu_check.kernel_time_by_kind(tmp_path / "none") == {}


def test_refuses_to_run_off_gpu_without_smoke(gpu_check, tmp_path, capsys):
    assert gpu_check.main(["--out", str(tmp_path)]) == 2
    assert "use --smoke" in capsys.readouterr().err
