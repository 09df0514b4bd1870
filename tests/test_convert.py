"""Hugging Face checkpoints: a tiny random model built with transformers (CPU PyTorch) is
imported onto a sharded mesh and computes PyTorch's logits; exported back, transformers
reloads the same weights; unsupported switches are refused by name."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from support import tiny_config  # noqa: E402
from msmoe_jax.convert import export_checkpoint, import_checkpoint, restore_params  # noqa: E402
from msmoe_jax.hf.families import ConversionError  # noqa: E402
from msmoe_jax.model import reference_ops  # noqa: E402
from msmoe_jax.parallel.mesh import Layout, make_mesh  # noqa: E402
from msmoe_jax.state import init_state  # noqa: E402

TOKENS = np.random.default_rng(0).integers(0, 256, size=(2, 24))


def tiny_mixtral(path, **overrides):
    cfg = transformers.MixtralConfig(
        vocab_size=256, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
        num_experts_per_tok=2, max_position_embeddings=64, rope_theta=5000.0,
        rms_norm_eps=1e-5, **overrides)
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(cfg).eval()
    with torch.no_grad():  # norms away from 1, so a misplaced norm weight shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    return model


def torch_logits(model):
    with torch.no_grad():
        return model(torch.tensor(TOKENS)).logits.float().numpy()


def our_logits(run_cfg, params):
    layout = Layout.from_config(run_cfg, 8)
    mesh = make_mesh(layout)
    graphdef, _, _, _ = init_state(run_cfg, mesh, layout, abstract=True)
    from flax import nnx

    @jax.jit
    def forward(params, tokens):
        model = nnx.merge(graphdef, params)
        return model(tokens, jnp.arange(tokens.shape[1]), reference_ops("padded"))[0]
    return np.asarray(forward(params, jnp.asarray(TOKENS)))


def test_mixtral_import_matches_pytorch_and_exports_back(tmp_path):
    hf = tiny_mixtral(tmp_path / "hf")
    base = tiny_config(tmp_path, model={"dtype": "float32"},
                       parallel={"data": 2, "sequence": 4, "expert_data": 2, "expert": 4})
    run = import_checkpoint(tmp_path / "hf", tmp_path / "ours", base)
    assert run.model.num_experts == 4 and run.model.rope_theta == 5000.0
    assert run.checkpoint.init_from == str((tmp_path / "ours").absolute())

    layout = Layout.from_config(run, 8)
    params = restore_params(tmp_path / "ours", run, make_mesh(layout), layout)
    w_up = params["blocks"][0]["ffn"]["w_up"][...]
    assert w_up.addressable_shards[0].data.shape == (1, 32, 48)  # experts split 4 ways
    ours, ref = our_logits(run, params), torch_logits(hf)
    diff = float(np.max(np.abs(ours - ref)))
    print(f"Mixtral max |logit difference| {diff:.2e}")
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=1e-4)

    export_checkpoint(tmp_path / "ours", tmp_path / "back", run)
    back = transformers.MixtralForCausalLM.from_pretrained(tmp_path / "back").eval()
    for (name, a), (_, b) in zip(sorted(hf.state_dict().items()), sorted(back.state_dict().items())):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=name)
    np.testing.assert_allclose(torch_logits(back), ref, atol=1e-6)


COMMON = dict(vocab_size=256, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5)
FAMILIES = {
    "qwen2_moe": ("Qwen2MoeForCausalLM", "Qwen2MoeConfig", dict(
        intermediate_size=64, moe_intermediate_size=48, shared_expert_intermediate_size=40,
        num_experts=4, num_experts_per_tok=2, mlp_only_layers=[0], norm_topk_prob=False)),
    "qwen3_moe": ("Qwen3MoeForCausalLM", "Qwen3MoeConfig", dict(
        intermediate_size=64, moe_intermediate_size=48, num_experts=4, num_experts_per_tok=2,
        head_dim=8, norm_topk_prob=True)),
    "olmoe": ("OlmoeForCausalLM", "OlmoeConfig", dict(
        intermediate_size=48, num_experts=4, num_experts_per_tok=2)),
}


def build(path, family, **overrides):
    model_cls, cfg_cls, extra = FAMILIES[family]
    torch.manual_seed(1)
    cfg = getattr(transformers, cfg_cls)(**COMMON, **{**extra, **overrides})
    model = getattr(transformers, model_cls)(cfg).eval()
    with torch.no_grad():  # norms, biases and gates away from their initial values
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name or "shared_expert_gate" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_family_import_matches_pytorch(tmp_path, family):
    hf = build(tmp_path / "hf", family)
    base = tiny_config(tmp_path, model={"dtype": "float32"},
                       parallel={"data": 2, "sequence": 4, "expert_data": 2, "expert": 4})
    run = import_checkpoint(tmp_path / "hf", tmp_path / "ours", base)
    layout = Layout.from_config(run, 8)
    params = restore_params(tmp_path / "ours", run, make_mesh(layout), layout)
    ours, ref = our_logits(run, params), torch_logits(hf)
    print(f"{family} max |logit difference| {float(np.max(np.abs(ours - ref))):.2e}")
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=1e-4)

    export_checkpoint(tmp_path / "ours", tmp_path / "back", run)
    back = type(hf).from_pretrained(tmp_path / "back").eval()
    for (name, a), (_, b) in zip(sorted(hf.state_dict().items()), sorted(back.state_dict().items())):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=name)
    np.testing.assert_allclose(torch_logits(back), ref, atol=1e-6)


def test_unsupported_switches_are_refused_by_name(tmp_path):
    base = tiny_config(tmp_path)
    tiny_mixtral(tmp_path / "hf", sliding_window=8)
    with pytest.raises(ConversionError, match="sliding_window: sliding-window attention"):
        import_checkpoint(tmp_path / "hf", tmp_path / "ours", base)
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg.update(sliding_window=None, architectures=["JambaForCausalLM"])
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match=r"architectures: \['JambaForCausalLM'\] is not "
                                              "supported"):
        import_checkpoint(tmp_path / "hf", tmp_path / "ours", base)


def test_cli_import_then_train_from_it(tmp_path):
    """The CLI imports; train.py fine-tunes from the written config (checkpoint.init_from):
    with a learning rate of ~0 the parameters after one step are the imported ones."""
    import subprocess
    import sys

    from support import ROOT, write_config
    from msmoe_jax.config import load_config
    from msmoe_jax.trainer import train

    hf = tiny_mixtral(tmp_path / "hf")
    base = write_config(tiny_config(tmp_path, model={"dtype": "float32"}), tmp_path / "base.yaml")
    r = subprocess.run([sys.executable, "-m", "msmoe_jax.convert", "import", "--from",
                        str(tmp_path / "hf"), "--out", str(tmp_path / "ours"), "--config",
                        str(base), "--set", "parallel.expert=4", "--set", "parallel.data=8"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "train with: python train.py --config" in r.stdout
    run = load_config(tmp_path / "ours" / "config.yaml",
                      ["train.steps=1", "optimizer.lr=1e-12", "optimizer.warmup_steps=0",
                       "checkpoint.every=1", "checkpoint.async_save=false",
                       f"run.dir={tmp_path / 'ft'}"], device_count=8)
    out = train(run)
    layout = Layout.from_config(run, 8)
    imported = restore_params(tmp_path / "ours", run, make_mesh(layout), layout)
    for a, b in zip(jax.tree.leaves(imported), jax.tree.leaves(out["state"]["params"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    # The fine-tuned run's last checkpoint step exports (its config is the run's config.json)
    # and transformers computes the same logits as the original model (lr ~0).
    r = subprocess.run([sys.executable, "-m", "msmoe_jax.convert", "export", "--from",
                        str(tmp_path / "ft" / "checkpoints" / "1"), "--out", str(tmp_path / "hf2")],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    back = transformers.MixtralForCausalLM.from_pretrained(tmp_path / "hf2").eval()
    np.testing.assert_allclose(torch_logits(back), torch_logits(hf), atol=1e-4)
    r = subprocess.run([sys.executable, "-m", "msmoe_jax.convert", "import", "--from",
                        str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 2 and "error: " in r.stderr and "no config.json" in r.stderr
