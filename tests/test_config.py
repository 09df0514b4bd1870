"""Config loading and validation: each problem gives one message naming the field."""

import pytest

from msmoe_jax.config import Config, ConfigError, config_from_dict, load_config
from msmoe_jax.parallel.mesh import validate_for


def check(raw=None, overrides=(), device_count=8, match=""):
    with pytest.raises(ConfigError, match=match):
        validate_for(config_from_dict(raw or {}, list(overrides)), device_count)


def test_defaults_are_valid_and_overrides_apply():
    cfg = config_from_dict({}, ["model.num_experts=16", "train.steps=7", "run.dir=/tmp/x",
                                "model.head_dim=null", "optimizer.lr=1e-3", "seed=3"])
    validate_for(cfg, 8)
    assert cfg.model.num_experts == 16 and cfg.train.steps == 7 and cfg.seed == 3
    assert cfg.optimizer.lr == 1e-3 and isinstance(cfg.optimizer.lr, float)
    assert isinstance(validate_for(Config(), 8), Config)


def test_load_config_file_and_default_yaml(tmp_path):
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    cfg = validate_for(load_config(root / "configs" / "default.yaml", ["checkpoint.keep=3"]), 8)
    assert cfg.checkpoint.keep == 3
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


@pytest.mark.parametrize("raw,overrides,match", [
    ({"model": {"num_expert": 8}}, (), r"model\.num_expert: unknown key .*allowed keys: .*num_experts"),
    ({"modle": {}}, (), r"modle: unknown key in top level"),
    ({}, ["model.top_k=two"], r"model\.top_k: expected int, got 'two'"),
    ({}, ["model.dtype=float16"], r"model\.dtype: expected one of 'float32', 'bfloat16'"),
    ({}, ["train.steps=1.5"], r"train\.steps: expected int"),
    ({}, ["model.tie_embeddings=3"], r"model\.tie_embeddings: expected bool"),
    ({"model": 5}, (), r"model: expected a mapping"),
    ({}, ["model.top_k=9", "model.num_experts=8"], r"model\.top_k: must be between 1 and model\.num_experts=8, got 9"),
    ({}, ["model.num_heads=6", "model.num_kv_heads=4", "model.d_model=48"], r"model\.num_kv_heads: must divide model\.num_heads=6"),
    ({}, ["model.d_model=66"], r"model\.d_model: must be divisible by model\.num_heads"),
    ({}, ["model.num_dense_layers=3"], r"model\.num_dense_layers: must be between 0 and model\.num_layers=2"),
    ({}, ["model.capacity_factor=0"], r"model\.capacity_factor: must be > 0"),
    ({}, ["train.batch_size=0"], r"train\.batch_size: must be a positive integer"),
    ({}, ["train.batch_size=12"], r"train\.batch_size: must be divisible by parallel\.data x train\.grad_accum_steps = 8 x 1, got 12"),
    ({}, ["train.grad_accum_steps=3"], r"train\.batch_size: must be divisible by parallel\.data x train\.grad_accum_steps = 8 x 3, got 16"),
    ({}, ["train.grad_accum_steps=0"], r"train\.grad_accum_steps: must be a positive integer"),
    ({}, ["compression.dispatch=fp16"], r"compression\.dispatch: expected one of 'none', 'fp8'"),
    ({}, ["compression.gradients=bf16"], r"compression\.gradients: expected one of 'fp32', 'bf16_a2a'"),
    ({}, ["compression.channel_group=0"], r"compression\.channel_group: must be a positive integer"),
    ({}, ["compression.tensor=fp8", "parallel.tensor=2", "parallel.data=4", "parallel.collective_matmul=ring"], r"compression\.tensor: 'fp8' sends the tensor-parallel collectives on their own; set parallel\.collective_matmul to 'off'"),
    ({}, ["compression.combine=fp8", "parallel.expert=2", "parallel.expert_data=4", "parallel.dispatch=all_gather", "parallel.collective_matmul=ring"], r"compression\.combine: 'fp8' with the all_gather dispatch needs parallel\.collective_matmul 'off'"),
    ({}, ["parallel.data=4"], r"parallel\.data x parallel\.sequence x parallel\.tensor: 4 x 1 x 1 = 4 but there are 8 devices"),
    ({}, ["parallel.data=0"], r"parallel\.data: must be a positive integer or -1"),
    ({}, ["parallel.expert=3"], r"parallel\.expert_data: cannot fill 8 devices"),
    ({}, ["parallel.expert_data=2", "parallel.expert=2"], r"parallel\.expert_data x parallel\.expert x parallel\.expert_tensor: 2 x 2 x 1 = 4"),
    ({}, ["parallel.data=-1", "parallel.sequence=-1"], r"parallel\.sequence: only one axis per view may be -1"),
    ({}, ["parallel.dispatch=ring"], r"parallel\.dispatch: expected one of 'all_to_all', 'all_gather', 'auto'"),
    ({}, ["parallel.attention=ring"], r"parallel\.attention: expected one of 'ulysses', 'tensor'"),
    ({}, ["parallel.sequence=8", "model.num_heads=4", "model.num_kv_heads=2"], r"model\.num_heads: must be divisible by parallel\.sequence x parallel\.tensor = 8"),
    ({}, ["parallel.sequence=4", "train.seq_len=30"], r"train\.seq_len: must be divisible by parallel\.sequence x parallel\.tensor = 4"),
    ({}, ["parallel.sequence=4", "model.num_heads=12", "model.num_kv_heads=6", "model.d_model=48"], r"model\.num_kv_heads: must divide or be a multiple of"),
    ({}, ["parallel.expert=8", "model.num_experts=12"], r"model\.num_experts: must be divisible by parallel\.expert=8"),
    ({}, ["parallel.expert_tensor=8", "model.moe_d_ff=20"], r"model\.moe_d_ff: must be divisible by parallel\.expert_tensor=8"),
    ({}, ["parallel.tensor=8", "model.num_heads=8", "model.num_dense_layers=1", "model.d_ff=60"], r"model\.d_ff: must be divisible by parallel\.tensor=8"),
    ({}, ["parallel.vocab=split"], r"parallel\.vocab: expected one of 'auto', 'sharded', 'replicated'"),
    ({}, ["parallel.sequence=4", "parallel.vocab=sharded", "model.vocab_size=258"], r"model\.vocab_size: must be divisible by parallel\.sequence x parallel\.tensor = 4 for parallel\.vocab 'sharded', got 258"),
    ({}, ["parallel.zero=2"], r"parallel\.zero: expected one of 0, 1, 3"),
    ({}, ["data.source=tokens"], r"data\.path: is required"),
    ({}, ["data.source=tokens", "data.path=/nonexistent.bin"], r"data\.path: no such file"),
    ({}, ["data.path=/x.bin"], r"data\.path: only used with data\.source='tokens'"),
    ({}, ["model.vocab_size=100"], r"model\.vocab_size: must be >= 256"),
    ({}, ["optimizer.lr=0"], r"optimizer\.lr: must be > 0"),
    ({}, ["checkpoint.keep=0"], r"checkpoint\.keep: must be a positive integer"),
    ({}, ["checkpoint.every=-1"], r"checkpoint\.every: must be >= 0"),
    ({}, ["model.head_dim=7"], r"model\.head_dim: must be even"),
])
def test_validation_messages(raw, overrides, match):
    check(raw, overrides, match=match)


@pytest.mark.parametrize("text,match", [
    ("model.num_experts", r"expected dotted\.key=value"),
    ("=3", r"empty key"),
    ("model..top_k=2", r"empty key"),
    ("model.top_k=[1", r"not valid YAML"),
    ("seed.x=1", r"seed is not a section"),
])
def test_bad_overrides(text, match):
    with pytest.raises(ConfigError, match=match):
        config_from_dict({"seed": 1}, [text])


def test_views_that_do_not_nest_cannot_fold():
    check({}, ["parallel.tensor=3", "parallel.expert=4"], device_count=12,
          match=r"parallel: the views .* cannot be folded onto one mesh")


@pytest.mark.parametrize("overrides,mesh,dispatch", [
    ([], {"data:expert_data": 8}, "all_to_all"),
    (["parallel.data=2", "parallel.sequence=4", "parallel.expert=4"],
     {"data:expert_data": 2, "sequence:expert": 4}, "all_to_all"),
    (["parallel.sequence=4", "parallel.expert=8", "model.num_experts=8"],
     {"data:expert": 2, "sequence:expert": 4}, "all_to_all"),
    (["parallel.tensor=2", "parallel.sequence=2", "parallel.expert=4", "model.top_k=4"],
     {"data:expert_data": 2, "sequence:expert": 2, "tensor:expert": 2}, "all_gather"),
    (["parallel.expert=2", "parallel.expert_tensor=2"],
     {"data:expert_data": 2, "data:expert": 2, "data:expert_tensor": 2}, "all_gather"),
])
def test_folded_mesh_axes(overrides, mesh, dispatch):
    from msmoe_jax.parallel.mesh import Layout
    cfg = config_from_dict({}, overrides)
    layout = Layout.from_config(validate_for(cfg, 8), 8)
    assert dict(layout.mesh_axes) == mesh
    assert layout.dispatch == dispatch
    assert layout.sizes["data"] * layout.sizes["sequence"] * layout.sizes["tensor"] == 8


def test_every_device_agnostic_config_loads_for_8_devices():
    from pathlib import Path
    configs = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
    assert {p.name for p in configs} >= {"default.yaml", "compressed.yaml"}
    for path in configs:  # the cluster configs are checked on their own counts (test_configs)
        if load_config(path).parallel.devices is None:
            validate_for(load_config(path), 8)
    cfg = load_config(configs[0].parent / "compressed.yaml")
    assert (cfg.compression.gradients, cfg.compression.dispatch) == ("bf16_a2a", "fp8")
