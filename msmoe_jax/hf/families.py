"""The Hugging Face model families we convert: their config fields mapped onto ``ModelConfig``
and their tensor names mapped onto our parameters.

A family states every architectural switch its configs carry. A switch we support is mapped;
one we do not (a value our model would compute differently) is refused with the field named,
rather than converted into a model that silently computes something else.

A key that a config.json leaves out means what transformers' config class defaults it to
(``DEFAULTS``, per family), except the sizes (``REQUIRED``): a checkpoint without them is
refused, naming the key.

The router's load-balancing coefficient is rescaled (``aux_loss_coef_from_hf``: ours is
``top_k`` times ``router_aux_loss_coef``) and our router z-loss is off after import
(``model.z_loss_coef: 0``): none of these families has one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple


class ConversionError(ValueError):
    """A checkpoint or config that cannot be converted, phrased for the user."""


class Dense(NamedTuple):
    """One HF linear/embedding tensor. ``transpose``: ours is the HF ``[out, in]`` transposed,
    then reshaped to our shape (e.g. ``[d, heads, head_dim]``); our first ``in_dims`` axes
    are HF's ``in`` (2 for the output projection ``[heads, head_dim, d]``). ``flat``: the HF
    tensor is 1-D and ours its reshape (a bias ``[heads, head_dim]``)."""
    name: str
    transpose: bool
    in_dims: int = 1
    flat: bool = False


class Stacked(NamedTuple):
    """Our ``[num_experts, a, b]`` from one HF tensor per expert (``[b, a]`` when
    ``transpose``): read expert by expert, slice by slice."""
    names: tuple[str, ...]
    transpose: bool


class Layered(NamedTuple):
    """Our stacked ``[layers, ...]`` parameter from one source per layer."""
    layers: tuple[Dense | Stacked, ...]


Source = Dense | Stacked | Layered


def hf_names(source: Source) -> tuple[str, ...]:
    """The HF tensors a source reads."""
    if isinstance(source, Layered):
        return tuple(n for s in source.layers for n in hf_names(s))
    return source.names if isinstance(source, Stacked) else (source.name,)


def number(value: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConversionError(f"{field}: expected a number, got {value!r}")
    return float(value)


def rope_theta(hf: dict) -> float:
    """RoPE base: ``rope_parameters.rope_theta`` (transformers 5) or ``rope_theta`` (4); absent:
    the family's default (``hf["rope_theta"]`` after ``with_defaults``)."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    for name, value in (("rope_parameters", params), ("rope_scaling", scaling)):
        if not isinstance(value, dict):
            raise ConversionError(f"{name}: expected an object or null, got {value!r}")
    kind = params.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if kind not in (None, "default"):
        raise ConversionError(f"rope_parameters.rope_type: only 'default' RoPE is supported, "
                              f"got {kind!r}")
    return number(params.get("rope_theta", hf["rope_theta"]), "rope_theta")


def aux_loss_coef_from_hf(coef_hf: float, top_k: int) -> float:
    """Our ``model.aux_loss_coef`` for transformers' ``router_aux_loss_coef``:
    ``top_k * coef_hf`` (``aux_loss_coef_to_hf`` inverts it).

    transformers (``load_balancing_loss_func``, the same in all four families) pools the
    statistics of its L MoE layers, each routing the same T tokens (no padding), and adds
    ``coef_hf * aux_hf`` to the loss, with

        aux_hf = E * sum_e F_e * P_e,   F = sum_l c_l / (L T),   P = sum_l q_l / (L T)

    where c_l [E] counts layer l's top-k assignments per expert (summing to T k, so F sums to
    k) and q_l [E] sums its router probabilities over the tokens. We add ``coef * aux`` with the
    mean over layers of each layer's own loss (``objective.py``, ``model/moe.py``
    ``load_balancing_loss``; fractions summing to 1):

        aux = (1/L) * sum_l E * sum_e (c_le / (T k)) * (q_le / T)

    With ``coef = k * coef_hf`` the difference is exactly

        coef * aux - coef_hf * aux_hf
            = coef_hf * E / (2 L^2 T^2) * sum_{l,l'} <c_l - c_l', q_l - q_l'>

    so the two terms are equal when L = 1 or every layer makes the same number of assignments
    to each expert (c_l the same for all l), and then so are their gradients (with respect to
    q_l: ``coef_hf * E * c_l / (L T^2)`` ours, ``coef_hf * E * mean_l'(c_l') / (L T^2)``
    transformers'). Otherwise transformers' pooling couples the layers (each layer's
    probabilities are pushed by every layer's counts) and no coefficient makes them equal;
    ``k * coef_hf`` matches the per-layer scale (no layer factor: each layer weighs 1/L in both,
    and both are ``k * coef_hf`` at uniform routing).

    transformers adds the term only when ``output_router_logits`` is true (config or forward
    argument; released configs mostly say false). We map the coefficient regardless: it is
    the strength the term has when it is on, and the one a fine-tuning run would switch on.
    To fine-tune without it, import with ``--set model.aux_loss_coef=0``.
    """
    return float(top_k) * coef_hf


def aux_loss_coef_to_hf(coef: float, top_k: int) -> float:
    """transformers' ``router_aux_loss_coef`` for our ``model.aux_loss_coef``: ``coef / top_k``
    (the inverse of ``aux_loss_coef_from_hf``, which derives it)."""
    return coef / top_k


def require(hf: dict, field: str, allowed: Callable[[Any], bool], what: str,
            default: Any = None) -> None:
    value = hf.get(field, default)
    if not allowed(value):
        raise ConversionError(f"{field}: {what}, got {value!r}")


def common_config(hf: dict) -> dict:
    """The fields every family shares (Llama-style attention, RMSNorm, SwiGLU experts).
    ``hf``: a config.json with the family's defaults filled in (``with_defaults``)."""
    require(hf, "hidden_act", lambda v: v == "silu", "only 'silu' (SwiGLU) is supported")
    require(hf, "router_jitter_noise", lambda v: not v,
            "router jitter is not supported (set it to 0)", 0.0)
    top_k = hf["num_experts_per_tok"]
    return dict(
        vocab_size=hf["vocab_size"], d_model=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
        num_kv_heads=hf["num_key_value_heads"] or hf["num_attention_heads"],
        head_dim=hf.get("head_dim") or None, num_dense_layers=0,
        num_experts=hf["num_experts"], top_k=top_k, num_shared_experts=0,
        rope_theta=rope_theta(hf), norm_eps=number(hf["rms_norm_eps"], "rms_norm_eps"),
        tie_embeddings=bool(hf["tie_word_embeddings"]),
        aux_loss_coef=aux_loss_coef_from_hf(
            number(hf["router_aux_loss_coef"], "router_aux_loss_coef"), top_k),
        z_loss_coef=0.0,  # no family has a router z-loss
        attention_bias=False, qk_norm="none", shared_expert_gate=False)


def full_attention(hf: dict, windowed: bool) -> None:
    if windowed:
        require(hf, "sliding_window", lambda v: not v or v >= hf["max_position_embeddings"],
                "sliding-window attention is not supported (null, or at least "
                "max_position_embeddings)")


def mixtral_config(hf: dict) -> dict:
    """MixtralForCausalLM: softmax over the top-k logits = renormalised top-k softmax."""
    full_attention(hf, True)
    require(hf, "attention_bias", lambda v: not v, "attention biases are not supported", False)
    return dict(common_config(hf), moe_d_ff=hf["intermediate_size"], renormalize_topk=True)


def dense_prefix(hf: dict) -> int:
    """Qwen's dense layers as our leading dense layers; other placements are refused."""
    step = hf["decoder_sparse_step"]
    dense = sorted(hf["mlp_only_layers"] or [])
    n = hf["num_hidden_layers"]
    if step != 1:
        raise ConversionError(f"decoder_sparse_step: only 1 (every layer MoE unless listed in "
                              f"mlp_only_layers) is supported, got {step}")
    if dense != list(range(len(dense))) or len(dense) > n:
        raise ConversionError(f"mlp_only_layers: only the first layers may be dense (our "
                              f"model.num_dense_layers), got {dense}")
    return len(dense)


def qwen_config(hf: dict, shared: bool) -> dict:
    """Qwen2MoeForCausalLM (Q/K/V biases, a gated shared expert) and Qwen3MoeForCausalLM
    (per-head Q/K norms, no shared expert)."""
    if hf["use_sliding_window"]:
        full_attention(hf, True)
    out = dict(common_config(hf), moe_d_ff=hf["moe_intermediate_size"],
               d_ff=hf["intermediate_size"], num_dense_layers=dense_prefix(hf),
               renormalize_topk=bool(hf["norm_topk_prob"]))
    if shared:
        width = hf["shared_expert_intermediate_size"] or 0
        out.update(attention_bias=bool(hf["qkv_bias"]))
        if width:
            out.update(num_shared_experts=1, shared_d_ff=width, shared_expert_gate=True)
    else:
        require(hf, "attention_bias", lambda v: not v, "attention biases are not supported "
                "for Qwen3-MoE", False)
        out.update(qk_norm="head")
    return out


def olmoe_config(hf: dict) -> dict:
    """OlmoeForCausalLM: Q/K RMSNorms over all heads together, no top-k renormalisation."""
    require(hf, "clip_qkv", lambda v: v is None, "clipping Q/K/V is not supported (null)")
    require(hf, "attention_bias", lambda v: not v, "attention biases are not supported", False)
    return dict(common_config(hf), moe_d_ff=hf["intermediate_size"], qk_norm="full",
                renormalize_topk=bool(hf["norm_topk_prob"]))


class Naming(NamedTuple):
    """Where a family keeps its MoE tensors."""
    moe: str  # the MoE block under a layer: "block_sparse_moe" or "mlp"
    experts: tuple[str, str, str]  # (gate, up, down) projection names of one expert


MIXTRAL = Naming("block_sparse_moe", ("w1", "w3", "w2"))
QWEN = Naming("mlp", ("gate_proj", "up_proj", "down_proj"))


def swiglu(ours: str, hf: str, names=("gate_proj", "up_proj", "down_proj")) -> dict[str, Dense]:
    return {f"{ours}['{w}'].value": Dense(f"{hf}.{n}.weight", True)
            for w, n in zip(("w_gate", "w_up", "w_down"), names)}


def block_tensors(m, naming: Naming, i: int, moe: bool) -> dict[str, Dense | Stacked]:
    """Layer ``i``'s tensors: our path inside a block (``['attn']['wq'].value``) -> source."""
    hf = f"model.layers.{i}"
    attn = f"{hf}.self_attn"
    out: dict[str, Dense | Stacked] = {
        "['attn_norm']['scale'].value": Dense(f"{hf}.input_layernorm.weight", False),
        "['ffn_norm']['scale'].value": Dense(f"{hf}.post_attention_layernorm.weight", False),
        **{f"['attn']['{w}'].value": Dense(f"{attn}.{p}_proj.weight", True)
           for w, p in (("wq", "q"), ("wk", "k"), ("wv", "v"))},
        "['attn']['wo'].value": Dense(f"{attn}.o_proj.weight", True, 2),
    }
    if m.attention_bias:
        out.update({f"['attn']['biases'][{j}].value": Dense(f"{attn}.{p}_proj.bias", False,
                                                             flat=True)
                    for j, p in enumerate("qkv")})
    if m.qk_norm != "none":
        out.update({f"['attn']['qk_norm'][{j}]['scale'].value": Dense(
            f"{attn}.{p}_norm.weight", False) for j, p in enumerate("qk")})
    if not moe:
        out.update(swiglu("['ffn']", f"{hf}.mlp"))
        return out
    moe_hf = f"{hf}.{naming.moe}"
    experts = lambda w: tuple(f"{moe_hf}.experts.{e}.{w}.weight" for e in range(m.num_experts))
    gate, up, down = naming.experts
    out.update({
        "['ffn']['router'].value": Dense(f"{moe_hf}.gate.weight", True),
        "['ffn']['w_gate'].value": Stacked(experts(gate), True),
        "['ffn']['w_up'].value": Stacked(experts(up), True),
        "['ffn']['w_down'].value": Stacked(experts(down), True),
    })
    if m.num_shared_experts:
        out.update(swiglu("['ffn']['shared']", f"{moe_hf}.shared_expert"))
    if m.shared_expert_gate:
        out["['ffn']['shared_gate'].value"] = Dense(f"{moe_hf}.shared_expert_gate.weight", True)
    return out


def layer_tensors(m, naming: Naming) -> dict[str, Source]:
    """Our parameter path (``jax.tree_util.keystr`` of the params state) -> its HF source.
    The blocks of a kind are stacked (``model/transformer.py``): each of their parameters
    comes from one HF tensor per layer (``Layered``)."""
    out: dict[str, Source] = {
        "['embed'].value": Dense("model.embed_tokens.weight", False),
        "['final_norm']['scale'].value": Dense("model.norm.weight", False),
    }
    if not m.tie_embeddings:
        out["['lm_head'].value"] = Dense("lm_head.weight", True)
    dense = m.num_dense_layers
    kinds = (("dense_blocks", range(dense)), ("moe_blocks", range(dense, m.num_layers)))
    for name, layers in kinds:
        per_layer = [block_tensors(m, naming, i, name == "moe_blocks") for i in layers]
        for path in per_layer[0] if per_layer else ():
            out[f"['{name}']{path}"] = Layered(tuple(t[path] for t in per_layer))
    return out


class Family(NamedTuple):
    architecture: str
    model_config: Callable[[dict], dict]  # config.json -> ModelConfig fields (import)
    tensors: Callable[[Any], dict[str, Source]]  # ModelConfig -> path -> source
    hf_config: Callable[[Any], dict]  # ModelConfig -> config.json fields (export)


# The sizes a config.json must give, besides ``COMMON_REQUIRED`` and the number of experts
# (``EXPERTS``).
REQUIRED = {
    "MixtralForCausalLM": ("intermediate_size",),
    "Qwen2MoeForCausalLM": ("moe_intermediate_size",),
    "Qwen3MoeForCausalLM": ("moe_intermediate_size",),
    "OlmoeForCausalLM": ("intermediate_size",),
}
COMMON_REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                   "num_experts_per_tok")
# The names each config class reads the number of experts from, its own first (Mixtral and
# Qwen3-MoE map num_experts onto num_local_experts, OLMoE the reverse; Qwen2-MoE has one).
EXPERTS = {
    "MixtralForCausalLM": ("num_local_experts", "num_experts"),
    "Qwen2MoeForCausalLM": ("num_experts",),
    "Qwen3MoeForCausalLM": ("num_local_experts", "num_experts"),
    "OlmoeForCausalLM": ("num_experts", "num_local_experts"),
}

# transformers' defaults (its config classes, the same in 4.4x and 5.x) for the keys we read
# that a config.json may leave out.
_COMMON_DEFAULTS = dict(hidden_act="silu", tie_word_embeddings=False, rope_theta=10000.0,
                        head_dim=None)
_QWEN_DEFAULTS = dict(_COMMON_DEFAULTS, rms_norm_eps=1e-6, router_aux_loss_coef=0.001,
                      norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[],
                      use_sliding_window=False, sliding_window=4096,
                      max_position_embeddings=32768)
DEFAULTS = {
    "MixtralForCausalLM": dict(_COMMON_DEFAULTS, num_key_value_heads=8, rms_norm_eps=1e-5,
                               rope_theta=1e6, router_aux_loss_coef=0.001,
                               router_jitter_noise=0.0, sliding_window=None,
                               max_position_embeddings=4096 * 32),
    "Qwen2MoeForCausalLM": dict(_QWEN_DEFAULTS, num_key_value_heads=16, intermediate_size=5632,
                                shared_expert_intermediate_size=5632, qkv_bias=True),
    "Qwen3MoeForCausalLM": dict(_QWEN_DEFAULTS, num_key_value_heads=4, intermediate_size=6144,
                                attention_bias=False),
    "OlmoeForCausalLM": dict(_COMMON_DEFAULTS, num_key_value_heads=None, rms_norm_eps=1e-5,
                             router_aux_loss_coef=0.01, norm_topk_prob=False, clip_qkv=None,
                             attention_bias=False, max_position_embeddings=4096),
}


def with_defaults(arch: str, build: Callable[[dict], dict]) -> Callable[[dict], dict]:
    """``build`` on the config.json with ``arch``'s defaults filled in (and the number of
    experts as ``num_experts``), after checking that the sizes are there and are positive
    integers."""
    def model_config(hf: dict) -> dict:
        names = EXPERTS[arch]
        experts = next((name for name in names if name in hf), names[0])
        keys = (*COMMON_REQUIRED, *REQUIRED[arch], experts)
        for key in keys:
            if key not in hf:
                raise ConversionError(f"{key}: required key is missing (a {arch} config.json "
                                      f"gives the sizes {', '.join(keys)})")
        for key in keys:
            v = hf[key]
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConversionError(f"{key}: expected a positive integer, got {v!r}")
        return build({**DEFAULTS[arch], **hf, "num_experts": hf[experts]})
    return model_config


def base_hf_config(m, arch: str, model_type: str) -> dict:
    return {
        "architectures": [arch], "model_type": model_type,
        "vocab_size": m.vocab_size, "hidden_size": m.d_model, "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_heads, "num_key_value_heads": m.num_kv_heads,
        "head_dim": m.resolved_head_dim, "num_experts_per_tok": m.top_k, "hidden_act": "silu",
        "rms_norm_eps": m.norm_eps, "rope_theta": m.rope_theta,
        "tie_word_embeddings": m.tie_embeddings,
        "router_aux_loss_coef": aux_loss_coef_to_hf(m.aux_loss_coef, m.top_k),
        # transformers' default: the aux loss is added only when this (or the forward's
        # argument) is true; set it to fine-tune with it (aux_loss_coef_from_hf).
        "output_router_logits": False,
        "max_position_embeddings": 4096 * 32, "sliding_window": None,
        "torch_dtype": "float32" if m.param_dtype == "float32" else "bfloat16",
    }


def mixtral_hf_config(m) -> dict:
    return dict(base_hf_config(m, "MixtralForCausalLM", "mixtral"),
                intermediate_size=m.moe_d_ff, num_local_experts=m.num_experts,
                router_jitter_noise=0.0)


def qwen_hf_config(m, shared: bool) -> dict:
    arch, kind = (("Qwen2MoeForCausalLM", "qwen2_moe") if shared
                  else ("Qwen3MoeForCausalLM", "qwen3_moe"))
    out = dict(base_hf_config(m, arch, kind), num_experts=m.num_experts,
               moe_intermediate_size=m.moe_d_ff, intermediate_size=m.d_ff,
               mlp_only_layers=list(range(m.num_dense_layers)), decoder_sparse_step=1,
               norm_topk_prob=m.renormalize_topk, use_sliding_window=False)
    if shared:
        out.update(qkv_bias=m.attention_bias,
                   shared_expert_intermediate_size=(m.num_shared_experts * m.resolved_shared_d_ff
                                                    if m.num_shared_experts else 0))
    return out


def olmoe_hf_config(m) -> dict:
    # transformers' OLMoE sizes q_norm by hidden_size and k_norm by hidden_size // heads *
    # kv_heads whatever head_dim says: its checkpoint cannot hold other head widths.
    if m.num_heads * m.resolved_head_dim != m.d_model:
        raise ConversionError(
            f"model.qk_norm: 'full' exports as OlmoeForCausalLM, whose Q/K norms transformers "
            f"sizes for heads d_model / num_heads = {m.d_model / m.num_heads:g} wide, but "
            f"model.head_dim is {m.resolved_head_dim}: transformers could not load the "
            "checkpoint, and no other supported family has norms over all heads")
    return dict(base_hf_config(m, "OlmoeForCausalLM", "olmoe"), num_experts=m.num_experts,
                intermediate_size=m.moe_d_ff, norm_topk_prob=m.renormalize_topk, clip_qkv=None)


FAMILIES = {
    "MixtralForCausalLM": Family("MixtralForCausalLM",
                                 with_defaults("MixtralForCausalLM", mixtral_config),
                                 lambda m: layer_tensors(m, MIXTRAL), mixtral_hf_config),
    "Qwen2MoeForCausalLM": Family("Qwen2MoeForCausalLM",
                                  with_defaults("Qwen2MoeForCausalLM",
                                                lambda hf: qwen_config(hf, True)),
                                  lambda m: layer_tensors(m, QWEN),
                                  lambda m: qwen_hf_config(m, True)),
    "Qwen3MoeForCausalLM": Family("Qwen3MoeForCausalLM",
                                  with_defaults("Qwen3MoeForCausalLM",
                                                lambda hf: qwen_config(hf, False)),
                                  lambda m: layer_tensors(m, QWEN),
                                  lambda m: qwen_hf_config(m, False)),
    "OlmoeForCausalLM": Family("OlmoeForCausalLM", with_defaults("OlmoeForCausalLM", olmoe_config),
                               lambda m: layer_tensors(m, QWEN), olmoe_hf_config),
}

# Fields of the training objective, not of what the model computes: export maps the first
# (router_aux_loss_coef) and cannot carry the second (no family has a router z-loss).
OBJECTIVE_FIELDS = ("aux_loss_coef", "z_loss_coef")


def family_of(hf: dict) -> Family:
    archs = hf.get("architectures") or []
    if not isinstance(archs, list):
        raise ConversionError(f"architectures: expected a list of names, got {archs!r}")
    for arch in archs:
        if arch in FAMILIES:
            return FAMILIES[arch]
    raise ConversionError(f"architectures: {archs} is not supported; supported: "
                          f"{', '.join(FAMILIES)}")


def family_for_export(m) -> Family:
    """The HF family whose architecture computes what our ModelConfig ``m`` computes."""
    if m.qk_norm == "full":
        arch = "OlmoeForCausalLM"
    elif m.qk_norm == "head":
        arch = "Qwen3MoeForCausalLM"
    elif m.attention_bias or m.num_shared_experts or m.num_dense_layers:
        arch = "Qwen2MoeForCausalLM"
    else:
        arch = "MixtralForCausalLM" if m.renormalize_topk else "Qwen2MoeForCausalLM"
    family = FAMILIES[arch]
    # Round trip: the family must read back exactly this model.
    back = family.model_config(family.hf_config(m))
    differs = {k: (getattr(m, k), v) for k, v in back.items()
               if k not in ("head_dim", "d_ff", "shared_d_ff", *OBJECTIVE_FIELDS)
               and getattr(m, k) != v}
    if differs:
        raise ConversionError(f"model: no supported Hugging Face family computes this model "
                              f"({arch} would change {differs})")
    return family
