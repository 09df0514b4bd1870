"""The Hugging Face model families we convert: their config fields mapped onto ``ModelConfig``
and their tensor names mapped onto our parameters.

A family states every architectural switch its configs carry. A switch we support is mapped;
one we do not (a value our model would compute differently) is refused with the field named,
rather than converted into a model that silently computes something else.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple


class ConversionError(ValueError):
    """A checkpoint or config that cannot be converted, phrased for the user."""


class Dense(NamedTuple):
    """One HF linear/embedding tensor. ``transpose``: ours is the HF ``[out, in]`` transposed,
    then reshaped to our shape (e.g. ``[d, heads, head_dim]``); our first ``in_dims`` axes
    are HF's ``in`` (2 for the output projection ``[heads, head_dim, d]``)."""
    name: str
    transpose: bool
    in_dims: int = 1


class Stacked(NamedTuple):
    """Our ``[num_experts, a, b]`` from one HF tensor per expert (``[b, a]`` when
    ``transpose``): read expert by expert, slice by slice."""
    names: tuple[str, ...]
    transpose: bool


Source = Dense | Stacked


def rope_theta(hf: dict) -> float:
    """RoPE base: ``rope_parameters.rope_theta`` (transformers 5) or ``rope_theta`` (4)."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    kind = params.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if kind not in (None, "default"):
        raise ConversionError(f"rope_parameters.rope_type: only 'default' RoPE is supported, "
                              f"got {kind!r}")
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def require(hf: dict, field: str, allowed: Callable[[Any], bool], what: str,
            default: Any = None) -> None:
    value = hf.get(field, default)
    if not allowed(value):
        raise ConversionError(f"{field}: {what}, got {value!r}")


def mixtral_config(hf: dict) -> dict:
    """MixtralForCausalLM config.json -> ModelConfig fields."""
    require(hf, "hidden_act", lambda v: v == "silu", "only 'silu' (SwiGLU) experts are supported",
            "silu")
    require(hf, "sliding_window", lambda v: v is None or v >= hf.get("max_position_embeddings", 0),
            "sliding-window attention is not supported (null, or at least "
            "max_position_embeddings)")
    require(hf, "attention_bias", lambda v: not v, "attention biases are not supported", False)
    require(hf, "router_jitter_noise", lambda v: not v,
            "router jitter is not supported (set it to 0)", 0.0)
    return dict(
        vocab_size=hf["vocab_size"], d_model=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
        num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim"), num_dense_layers=0,
        num_experts=hf["num_local_experts"], top_k=hf["num_experts_per_tok"],
        moe_d_ff=hf["intermediate_size"], num_shared_experts=0,
        renormalize_topk=True,  # softmax over the top-k logits = renormalised top-k softmax
        rope_theta=rope_theta(hf), norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.01)))


def mixtral_tensors(num_layers: int, num_experts: int, tied: bool) -> dict[str, Source]:
    """Our parameter path (``jax.tree_util.keystr`` of the params state) -> its HF source."""
    out: dict[str, Source] = {
        "['embed'].value": Dense("model.embed_tokens.weight", False),
        "['final_norm']['scale'].value": Dense("model.norm.weight", False),
    }
    if not tied:
        out["['lm_head'].value"] = Dense("lm_head.weight", True)
    for i in range(num_layers):
        ours, hf = f"['blocks'][{i}]", f"model.layers.{i}"
        moe = f"{hf}.block_sparse_moe"
        experts = lambda w: tuple(f"{moe}.experts.{e}.{w}.weight" for e in range(num_experts))
        out.update({
            f"{ours}['attn_norm']['scale'].value": Dense(f"{hf}.input_layernorm.weight", False),
            f"{ours}['ffn_norm']['scale'].value": Dense(
                f"{hf}.post_attention_layernorm.weight", False),
            **{f"{ours}['attn']['{w}'].value": Dense(f"{hf}.self_attn.{p}_proj.weight", True)
               for w, p in (("wq", "q"), ("wk", "k"), ("wv", "v"))},
            f"{ours}['attn']['wo'].value": Dense(f"{hf}.self_attn.o_proj.weight", True, 2),
            f"{ours}['ffn']['router'].value": Dense(f"{moe}.gate.weight", True),
            f"{ours}['ffn']['w_gate'].value": Stacked(experts("w1"), True),
            f"{ours}['ffn']['w_up'].value": Stacked(experts("w3"), True),
            f"{ours}['ffn']['w_down'].value": Stacked(experts("w2"), True),
        })
    return out


class Family(NamedTuple):
    architecture: str
    model_config: Callable[[dict], dict]
    tensors: Callable[[Any], dict[str, Source]]  # ModelConfig -> path -> source
    hf_config: Callable[[Any], dict]  # ModelConfig -> config.json fields (export)


def mixtral_hf_config(m) -> dict:
    return {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
        "vocab_size": m.vocab_size, "hidden_size": m.d_model,
        "intermediate_size": m.moe_d_ff, "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_heads, "num_key_value_heads": m.num_kv_heads,
        "head_dim": m.resolved_head_dim, "num_local_experts": m.num_experts,
        "num_experts_per_tok": m.top_k, "hidden_act": "silu", "rms_norm_eps": m.norm_eps,
        "rope_theta": m.rope_theta, "tie_word_embeddings": m.tie_embeddings,
        "router_aux_loss_coef": m.aux_loss_coef, "router_jitter_noise": 0.0,
        "sliding_window": None, "max_position_embeddings": 4096 * 32,
        "torch_dtype": "float32" if m.param_dtype == "float32" else "bfloat16",
    }


FAMILIES = {
    "MixtralForCausalLM": Family(
        "MixtralForCausalLM", mixtral_config,
        lambda m: mixtral_tensors(m.num_layers, m.num_experts, m.tie_embeddings),
        mixtral_hf_config),
}


def family_of(hf: dict) -> Family:
    archs = hf.get("architectures") or []
    for arch in archs:
        if arch in FAMILIES:
            return FAMILIES[arch]
    raise ConversionError(f"architectures: {archs} is not supported; supported: "
                          f"{', '.join(FAMILIES)}")


def family_for_export(m) -> Family:
    """The family a ModelConfig exports as: Mixtral's layout covers our plain MoE model."""
    if m.num_dense_layers or m.num_shared_experts or not m.renormalize_topk:
        raise ConversionError(
            "model: only Mixtral-layout models (no dense layers, no shared experts, "
            "renormalize_topk true) can be exported so far")
    return FAMILIES["MixtralForCausalLM"]
