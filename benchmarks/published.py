"""The step-time model against published end-to-end MoE training throughput (H100 / H800).

    python benchmarks/published.py [--only mixtral]

Each case is a published run re-expressed in a layout msmoe-jax has today (no pipeline
parallelism: every GPU runs all layers on its share of the tokens, so the per-GPU work per token
is the published run's). Its training step is compiled for H100s at 2 and 4 layers,
extrapolated per layer, and replayed on the modelled cluster (``msmoe_jax/steptime``); the
prediction is tokens/s per GPU, set beside the published figure. Sources and the reasons for
the gaps: docs/performance.md, *Calibration*.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from msmoe_jax.h100 import platforms_for_compiling  # noqa: E402

MIXTRAL = dict(vocab_size=32000, d_model=4096, num_layers=32, num_heads=32, num_kv_heads=8,
               d_ff=14336, num_dense_layers=0, num_experts=8, top_k=2, moe_d_ff=14336,
               rope_theta=1e6, dtype="bfloat16", param_dtype="float32", moe_mode="dropless")
# MegaScale-MoE's internal 352B model (arXiv 2505.11432, Table 2).
M352B = dict(vocab_size=65536, d_model=4096, num_layers=60, num_heads=32, num_kv_heads=8,
             d_ff=14336, num_dense_layers=0, num_experts=32, top_k=3, moe_d_ff=14336,
             dtype="bfloat16", param_dtype="float32", moe_mode="dropless")

CASES = {
    # Megatron-Core MoE README: 468 TFLOP/s per H100 for Mixtral 8x7B bf16 (MCore v0.9); its
    # reference mapping: 64 GPUs, TP1 EP8 PP4 VP8, MBS 1, GBS 256, seq 4096. Here: attention
    # data-parallel, EP 8 inside each node, 4 sequences per GPU as 4 micro-batches of 1.
    "mixtral": dict(
        published="Megatron-Core, Mixtral 8x7B, 64 H100: 468 TFLOP/s/GPU",
        hardware="h100", devices=16, published_tflops=468.0,
        config=dict(model=MIXTRAL, parallel=dict(data=16, expert_data=2, expert=8,
                                                 dispatch="all_to_all"),
                    train=dict(batch_size=64, seq_len=4096, grad_accum_steps=4,
                               remat="selective"))),
    # MegaScale-MoE Table 3: 1,407.7k tokens/s on 1,440 H800 (GBS 720 x 8192, PP 15, SP + EP 8
    # inside nodes) = 977.6 tokens/s per GPU. Here: Ulysses 8 inside a node, the 32 experts
    # over 32 GPUs, 4,096 tokens per GPU per step as there.
    "352b": dict(
        published="MegaScale-MoE, 352B, 1,440 H800: 977.6 tokens/s/GPU",
        hardware="h800", devices=32, published_tokens=1_407_700 / 1440,
        config=dict(model=M352B, parallel=dict(data=4, sequence=8, attention="ulysses",
                                               expert_data=1, expert=32,
                                               dispatch="all_to_all"),
                    train=dict(batch_size=16, seq_len=8192, grad_accum_steps=1,
                               remat="selective"))),
}


def main(argv=None) -> int:
    platforms_for_compiling()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", choices=sorted(CASES), nargs="*")
    args = p.parse_args(argv)

    from msmoe_jax.config import config_from_dict
    from msmoe_jax.flops import train_flops_per_token
    from msmoe_jax.parallel.mesh import Layout, validate_for
    from msmoe_jax.steptime.report import analyse, compile_texts, format_report

    print("| published | modelled layout | predicted tokens/s/GPU | published tokens/s/GPU "
          "| predicted / published |\n|---|---|---|---|---|")
    for name in args.only or sorted(CASES):
        case = CASES[name]
        cfg = validate_for(config_from_dict(case["config"]), case["devices"])
        n = case["devices"]
        report = analyse(cfg, n, compile_texts(cfg, n), case["hardware"])
        print(format_report(report), file=sys.stderr)
        tokens = cfg.train.batch_size * cfg.train.seq_len / n / report.step
        published = case.get("published_tokens") or case["published_tflops"] * 1e12 / (
            train_flops_per_token(cfg.model, cfg.train.seq_len))

        print(f"| {case['published']} | {Layout.from_config(cfg, n).describe()}, {n} GPUs "
              f"({case['hardware'].upper()}) | {tokens:,.0f} | {published:,.0f} | "
              f"{tokens / published:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
