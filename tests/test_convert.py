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

from msmoe_jax.config import ModelConfig  # noqa: E402
from msmoe_jax.convert import export_checkpoint, import_checkpoint, restore_params  # noqa: E402
from msmoe_jax.hf.families import ConversionError, family_for_export, family_of  # noqa: E402
from msmoe_jax.model import load_balancing_loss, reference_ops, route_topk  # noqa: E402
from msmoe_jax.objective import reference_loss_fn  # noqa: E402
from msmoe_jax.parallel.mesh import Layout, make_mesh  # noqa: E402
from msmoe_jax.state import init_state  # noqa: E402
from support import tiny_config, tiny_mixtral  # noqa: E402

TOKENS = np.random.default_rng(0).integers(0, 256, size=(2, 24))


def torch_logits(model):
    with torch.no_grad():
        return model(torch.tensor(TOKENS)).logits.float().numpy()


def graphdef_of(run_cfg):
    layout = Layout.from_config(run_cfg, 8)
    return init_state(run_cfg, make_mesh(layout), layout, abstract=True)[0]


def our_logits(run_cfg, params):
    graphdef = graphdef_of(run_cfg)
    from flax import nnx

    @jax.jit
    def forward(params, tokens):
        model = nnx.merge(graphdef, params)
        return model(tokens, jnp.arange(tokens.shape[1]), reference_ops("padded"))[0]
    return np.asarray(forward(params, jnp.asarray(TOKENS)))


@pytest.mark.slow
def test_mixtral_import_matches_pytorch_and_exports_back(tmp_path):
    hf = tiny_mixtral(tmp_path / "hf")
    base = tiny_config(tmp_path, model={"dtype": "float32"},
                       parallel={"data": 2, "sequence": 4, "expert_data": 2, "expert": 4})
    run = import_checkpoint(tmp_path / "hf", tmp_path / "ours", base)
    assert run.model.num_experts == 4 and run.model.rope_theta == 5000.0
    assert run.checkpoint.init_from == str((tmp_path / "ours").absolute())

    layout = Layout.from_config(run, 8)
    params = restore_params(tmp_path / "ours", run, make_mesh(layout), layout)
    w_up = params["moe_blocks"]["ffn"]["w_up"][...]  # [layers, E, d, f]
    assert w_up.addressable_shards[0].data.shape[1:] == (1, 32, 48)  # experts split 4 ways
    ours, ref = our_logits(run, params), torch_logits(hf)
    diff = float(np.max(np.abs(ours - ref)))
    print(f"Mixtral max |logit difference| {diff:.2e}")
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=1e-4)

    # The router's auxiliary loss in the training objective: ours (the objective's aux metric
    # times the imported coefficient) is transformers' (load_balancing_loss_func times
    # router_aux_loss_coef) plus the cross-layer term of its pooled statistics; no z-loss.
    assert run.model.z_loss_coef == 0.0
    _, metrics = jax.jit(reference_loss_fn(run.model, graphdef_of(run)))(params, TOKENS)
    with torch.no_grad():
        out = hf(torch.tensor(TOKENS[:, :-1]), output_router_logits=True)
    router_logits = [x.float().numpy() for x in out.router_logits]
    coef = hf.config.router_aux_loss_coef
    np.testing.assert_allclose(
        run.model.aux_loss_coef * float(metrics["aux_loss"]),
        coef * float(out.aux_loss) + cross_layer_term(router_logits, 2, coef), rtol=1e-4)

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


@pytest.mark.slow
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


@pytest.mark.slow
def test_cli_import_then_train_from_it(tmp_path):
    """The CLI imports; train.py fine-tunes from the written config (checkpoint.init_from):
    with a learning rate of ~0 the parameters after one step are the imported ones."""
    import subprocess
    import sys

    from msmoe_jax.config import load_config
    from msmoe_jax.parallel.mesh import validate_for
    from msmoe_jax.trainer import train
    from support import ROOT, write_config

    hf = tiny_mixtral(tmp_path / "hf")
    base = write_config(tiny_config(tmp_path, model={"dtype": "float32"}), tmp_path / "base.yaml")
    r = subprocess.run([sys.executable, "-m", "msmoe_jax.convert", "import", "--from",
                        str(tmp_path / "hf"), "--out", str(tmp_path / "ours"), "--config",
                        str(base), "--set", "parallel.expert=4", "--set", "parallel.data=8"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "train with: python train.py --config" in r.stdout
    run = validate_for(load_config(
        tmp_path / "ours" / "config.yaml",
        ["train.steps=1", "optimizer.lr=1e-12", "optimizer.warmup_steps=0", "checkpoint.every=1",
         "checkpoint.async_save=false", f"run.dir={tmp_path / 'ft'}"]), 8)
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
    assert r.returncode == 2 and "error: " in r.stderr and "nowhere: no such directory" in r.stderr


@pytest.mark.slow
def test_qwen3_without_norm_topk_prob_uses_transformers_default(tmp_path):
    """A config.json without norm_topk_prob: transformers' default (False) applies, not ours."""
    build(tmp_path / "hf", "qwen3_moe")
    path = tmp_path / "hf" / "config.json"
    cfg = json.loads(path.read_text())
    del cfg["norm_topk_prob"]
    path.write_text(json.dumps(cfg))
    hf = transformers.Qwen3MoeForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.norm_topk_prob is False
    base = tiny_config(tmp_path, model={"dtype": "float32"}, parallel={"expert": 4})
    run = import_checkpoint(tmp_path / "hf", tmp_path / "ours", base)
    layout = Layout.from_config(run, 8)
    params = restore_params(tmp_path / "ours", run, make_mesh(layout), layout)
    np.testing.assert_allclose(our_logits(run, params), torch_logits(hf), atol=1e-4, rtol=1e-4)
    assert run.model.renormalize_topk is False


# Per family: the keys a config.json must have (the shapes), which transformers' config class
# fills in with nothing else; every other key we read must default as transformers defaults it.
SIZES = {
    "MixtralForCausalLM": ("MixtralConfig", dict(
        vocab_size=256, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=48, num_local_experts=4, num_experts_per_tok=2)),
    "Qwen2MoeForCausalLM": ("Qwen2MoeConfig", dict(
        vocab_size=256, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        moe_intermediate_size=48, num_experts=4, num_experts_per_tok=2)),
    "Qwen3MoeForCausalLM": ("Qwen3MoeConfig", dict(
        vocab_size=256, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        moe_intermediate_size=48, num_experts=4, num_experts_per_tok=2)),
    "OlmoeForCausalLM": ("OlmoeConfig", dict(
        vocab_size=256, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=48, num_experts=4, num_experts_per_tok=2)),
}


@pytest.mark.parametrize("arch", SIZES)
def test_absent_keys_default_as_in_transformers(arch):
    cls, sizes = SIZES[arch]
    full = dict(getattr(transformers, cls)(**sizes).to_dict(), architectures=[arch])
    sparse = {k: v for k, v in full.items()
              if k in sizes or k in ("architectures", "model_type", "num_local_experts")}
    assert family_of(sparse).model_config(sparse) == family_of(full).model_config(full)


def test_olmoe_export_refuses_a_head_dim_transformers_cannot_hold():
    """OLMoE sizes q_norm by hidden_size (k_norm by hidden_size / heads * kv_heads): a model
    whose heads are not d_model / num_heads wide has no OLMoE checkpoint."""
    m = ModelConfig(vocab_size=256, d_model=32, num_heads=4, num_kv_heads=2, head_dim=16,
                    num_experts=4, top_k=2, moe_d_ff=48, qk_norm="full", renormalize_topk=False)
    with pytest.raises(ConversionError, match=r"model\.qk_norm.*model\.head_dim"):
        family_for_export(m)
    family_for_export(ModelConfig(**{**vars(m), "head_dim": 8}))  # d_model / num_heads: fine


def cross_layer_term(router_logits, k, coef_hf):
    """Ours minus transformers' router loss term, for per-layer router logits [T, E] (see
    msmoe_jax.hf.families.aux_loss_coef_from_hf):
    coef_hf * E / (2 L^2 T^2) * sum_{l,l'} <c_l - c_l', q_l - q_l'> with c_l the top-k
    assignment counts and q_l the probability sums of layer l."""
    counts, probs = [], []
    for x in router_logits:
        x = np.asarray(x, np.float64)
        p = np.exp(x - x.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        top = np.argsort(-p, axis=-1)[:, :k]
        counts.append(np.bincount(top.reshape(-1), minlength=x.shape[1]))
        probs.append(p.sum(0))
    (n_layers, t, e) = len(router_logits), router_logits[0].shape[0], router_logits[0].shape[1]
    total = sum(float(np.dot(c1 - c2, q1 - q2)) for c1, q1 in zip(counts, probs)
                for c2, q2 in zip(counts, probs))
    return coef_hf * e / (2 * n_layers ** 2 * t ** 2) * total


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["MixtralForCausalLM", "OlmoeForCausalLM"])
def test_aux_loss_coefficient_matches_transformers_objective(arch):
    """Random router logits of a 4-layer model: our load-balancing term (mean over layers of
    load_balancing_loss, times the imported coefficient) equals transformers'
    load_balancing_loss_func(...) * router_aux_loss_coef when every layer makes the same top-k
    choices (its probabilities differ), and differs by exactly the cross-layer term otherwise.
    Export maps the coefficient back."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    cls, sizes = SIZES[arch]
    n_layers, e, k, t, coef_hf = 4, 8, 2, 96, 0.02
    sizes = dict(sizes, num_hidden_layers=n_layers, num_experts_per_tok=k,
                 router_aux_loss_coef=coef_hf,
                 **{("num_local_experts" if "num_local_experts" in sizes else "num_experts"): e})
    hf = dict(getattr(transformers, cls)(**sizes).to_dict(), architectures=[arch])
    fields = family_of(hf).model_config(hf)
    assert fields["z_loss_coef"] == 0.0  # transformers has no router z-loss

    def hf_term(logits):
        logits = tuple(torch.tensor(x, dtype=torch.float32) for x in logits)
        return coef_hf * float(load_balancing_loss_func(logits, e, k))

    def our_term(logits):
        stats = [route_topk(jnp.asarray(x, jnp.float32), k, fields["renormalize_topk"])[2]
                 for x in logits]
        r = jax.tree.map(lambda *a: jnp.stack(a), *stats)  # as the model stacks its layers'
        aux = jnp.mean(load_balancing_loss(r.expert_counts, r.prob_sum, r.tokens, k))
        return fields["aux_loss_coef"] * float(aux)

    rng = np.random.default_rng(0)
    base = 2 * rng.normal(size=(t, e))
    # Each layer's logits: the base scaled per layer and shifted per token (same top-k choices).
    same = [a * base + rng.normal(size=(t, 1)) for a in (0.5, 1.0, 1.5, 3.0)]
    np.testing.assert_allclose(our_term(same), hf_term(same), rtol=1e-5)
    indep = [2 * rng.normal(size=(t, e)) for _ in range(n_layers)]
    cross = cross_layer_term(indep, k, coef_hf)
    assert abs(cross) > 1e-4 * hf_term(indep)  # the condition matters
    np.testing.assert_allclose(our_term(indep), hf_term(indep) + cross, rtol=1e-5)

    m = ModelConfig(**{**fields, "dtype": "float32"})
    assert family_for_export(m).hf_config(m)["router_aux_loss_coef"] == pytest.approx(coef_hf)
    # Our z-loss has no transformers counterpart: export does not refuse a model trained with it.
    m = ModelConfig(**{**fields, "z_loss_coef": 1e-3})
    assert family_for_export(m).hf_config(m)["router_aux_loss_coef"] == pytest.approx(coef_hf)
