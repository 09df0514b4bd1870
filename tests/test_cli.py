"""train.py as a user meets it: --help, and clear one-line errors with a non-zero exit."""

from support import run_cli, tiny_config, write_config


def assert_clean_error(r, code, *needles):
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: "), r.stderr
    for needle in needles:
        assert needle in r.stderr, r.stderr


def test_help_lists_options():
    r = run_cli("--help")
    assert r.returncode == 0
    for option in ("--config", "--set", "--print-config"):
        assert option in r.stdout


def test_print_config_applies_overrides():
    r = run_cli("--set", "model.num_experts=16", "--print-config")
    assert r.returncode == 0, r.stderr
    assert "num_experts: 16" in r.stdout


def test_missing_config_file():
    assert_clean_error(run_cli("--config", "/nonexistent/x.yaml"), 2,
                       "config file not found: /nonexistent/x.yaml")


def test_bad_overrides():
    assert_clean_error(run_cli("--set", "model.num_experts"), 2, "expected dotted.key=value")
    assert_clean_error(run_cli("--set", "model.topk=2"), 2, "model.topk: unknown key")
    assert_clean_error(run_cli("--set", "model.top_k=x"), 2, "model.top_k: expected int")


def test_mesh_size_must_match_devices():
    assert_clean_error(run_cli("--set", "parallel.data=3"), 2,
                       "parallel.data x parallel.sequence x parallel.tensor: 3 x 4 x 1 = 12",
                       "there are 8 devices")


def test_corrupt_checkpoint_directory(tmp_path):
    cfg = tiny_config(tmp_path, checkpoint={"every": 2})
    config = write_config(cfg, tmp_path / "cfg.yaml")
    step = tmp_path / "run" / "checkpoints" / "4"
    for item in ("state", "data"):
        (step / item).mkdir(parents=True)
        (step / item / "garbage").write_bytes(b"\x00not a checkpoint")
    r = run_cli("--config", config)
    assert_clean_error(r, 1, "could not be restored", str(step))


def test_gpu_overlap_flags_keep_user_values(monkeypatch):
    from msmoe_jax.cli import GPU_OVERLAP_FLAGS, gpu_overlap_flags
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_enable_latency_hiding_scheduler=false")
    added = gpu_overlap_flags()
    import os
    flags = os.environ["XLA_FLAGS"]
    assert "--xla_gpu_enable_latency_hiding_scheduler=false" in flags
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" not in flags
    assert len(added) == len(GPU_OVERLAP_FLAGS) - 1
    assert all(a in flags for a in added)
