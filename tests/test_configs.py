"""Every config in configs/ loads, validates and lays out its mesh for the device count it is
written for, without compiling anything; the GPU configs' training state fits an H100."""

import math

import pytest

from msmoe_jax.config import ConfigError, load_config
from msmoe_jax.parallel.mesh import validate_for
from msmoe_jax.plan import main as plan_main
from msmoe_jax.plan import plan
from support import ROOT

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
H100_BYTES = 80e9


def test_the_gpu_configs_exist():
    names = {p.stem for p in CONFIGS}
    assert {"h100_single", "mixtral_8x7b_64xh100", "megascale_352b_512xh100"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_lays_out_its_mesh(path):
    cfg = load_config(path)
    n = cfg.parallel.devices or 8
    out = plan(cfg, n)
    assert math.prod(out.mesh.values()) == n
    assert out.params > 0 and out.state_bytes_per_device > 0
    if cfg.parallel.devices is not None and cfg.parallel.devices > 1:
        # Experts are split: one device holds much less than the whole model's state.
        assert out.state_bytes_per_device < 12 * out.params / 4
    if "h100" in path.stem:
        # Parameters and AdamW moments leave at least half an H100 for activations.
        assert out.state_bytes_per_device < H100_BYTES / 2, out


@pytest.mark.slow
def test_the_352b_config_is_the_papers_model():
    cfg = load_config(ROOT / "configs" / "megascale_352b_512xh100.yaml")
    m = cfg.model
    assert (m.num_layers, m.d_model, m.num_heads, m.num_kv_heads, m.moe_d_ff, m.num_experts,
            m.top_k, cfg.train.seq_len, m.vocab_size) == (
        60, 4096, 32, 8, 14336, 32, 3, 8192, 65536)
    out = plan(cfg, 512)
    assert 330e9 < out.params < 360e9
    # Ulysses attention over the node, where expert_tensor splits the experts' width.
    assert out.mesh == {"data:expert_data": 2, "data:expert": 32, "sequence:expert_tensor": 8}
    assert cfg.parallel.attention == "ulysses" and cfg.parallel.zero == 1


def test_a_config_refuses_another_device_count(capsys):
    path = ROOT / "configs" / "mixtral_8x7b_64xh100.yaml"
    with pytest.raises(ConfigError, match="parallel.devices: this config is written for 64 "
                                          "devices but the run has 8"):
        validate_for(load_config(path), 8)
    assert plan_main(["--config", str(path)]) == 0
    assert "64 devices" in capsys.readouterr().out
