"""Model FLOPs per token and MFU.

Training FLOPs per token = 6 x (matmul parameters a token touches: attention projections, the
dense FFN or the router + its top-k experts + shared experts, and the output head) plus the
attention score and value products, 6 x s x heads x head_dim per layer with the causal half
counted. Embedding lookups are free.
"""

from __future__ import annotations

import jax

from msmoe_jax.config import ModelConfig

# Dense bf16 peak per device in TFLOP/s, by a substring of jax's device_kind.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "H800": 989.0, "A100": 312.0, "L4": 121.0}
NOMINAL_TFLOPS = 1.0  # devices not in the table (a CPU); set run.peak_tflops to be precise


def active_matmul_params(cfg: ModelConfig) -> int:
    d, hd = cfg.d_model, cfg.resolved_head_dim
    attn = d * hd * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
    dense_ffn = 3 * d * cfg.d_ff
    moe_ffn = (d * cfg.num_experts + cfg.top_k * 3 * d * cfg.moe_d_ff
               + cfg.num_shared_experts * 3 * d * cfg.resolved_shared_d_ff)
    moe_layers = cfg.num_layers - cfg.num_dense_layers
    return (cfg.num_layers * attn + cfg.num_dense_layers * dense_ffn + moe_layers * moe_ffn
            + d * cfg.vocab_size)


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    attention = 6 * cfg.num_layers * seq_len * cfg.num_heads * cfg.resolved_head_dim
    return 6.0 * active_matmul_params(cfg) + attention


def peak_flops_per_device(peak_tflops: float | None) -> float:
    if peak_tflops is not None:
        return peak_tflops * 1e12
    kind = jax.devices()[0].device_kind
    for name, tflops in PEAK_TFLOPS.items():
        if name in kind:
            return tflops * 1e12
    return NOMINAL_TFLOPS * 1e12


def mfu(flops_per_token: float, tokens_per_sec: float, num_devices: int, peak: float) -> float:
    return flops_per_token * tokens_per_sec / (peak * num_devices)
