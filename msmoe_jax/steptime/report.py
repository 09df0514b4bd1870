"""What a compiled training step does against what the model needs, by scope.

    python -m msmoe_jax.steptime --config configs/mixtral_8x7b_64xh100.yaml [--skew 1.5]

Reads the program compiled for H100 (``msmoe_jax/h100.py``) when the CUDA plugin is installed,
else the program XLA compiles for the simulated CPU devices (labelled as such: XLA:CPU widens
BF16/FP8 collectives, fuses differently and keeps ``ragged_dot`` as it is). Per scope it puts
side by side: matmul FLOPs **executed** by the program vs the model's **useful** FLOPs
(``flops.py``: 6 x active parameters + the causal half of attention), bytes **moved** vs
the routed rows' bytes for the expert exchange, and the communication the step-time model
leaves **exposed**. Deep models are compiled at two smaller depths and extrapolated per layer.
"""

from __future__ import annotations

from typing import NamedTuple

from msmoe_jax.config import Config, ModelConfig
from msmoe_jax.steptime.hlo import Routing

SCOPES_SHOWN = ("attention", "router", "experts", "ffn", "lm_head", "other")


def useful_flops_per_token(m: ModelConfig, seq_len: int) -> dict[str, float]:
    """Training FLOPs per token by scope (forward + backward = 6 x parameters touched; the
    causal half of attention's score and value products). Sums to
    ``flops.train_flops_per_token``."""
    d, hd = m.d_model, m.resolved_head_dim
    moe_layers = m.num_layers - m.num_dense_layers
    return {
        "attention": 6.0 * m.num_layers * d * hd * (2 * m.num_heads + 2 * m.num_kv_heads)
        + 6.0 * m.num_layers * seq_len * m.num_heads * hd,
        "router": 6.0 * moe_layers * d * m.num_experts,
        "experts": 6.0 * moe_layers * m.top_k * 3 * d * m.moe_d_ff,
        "ffn": 6.0 * (m.num_dense_layers * 3 * d * m.d_ff
                      + moe_layers * m.num_shared_experts * 3 * d * m.resolved_shared_d_ff),
        "lm_head": 6.0 * d * m.vocab_size,
        "other": 0.0,
    }


def expert_recompute(cfg: Config) -> float:
    """The share of the experts' useful FLOPs that the config recomputes on purpose: of the
    nine GEMM passes of a SwiGLU expert (3 forward, 6 backward), ``remat: full`` redoes the
    three forward ones, ``selective`` and the chunked pipeline's backward (``chunks`` > 1) the
    gate and up GEMMs (their outputs are not stored)."""
    if cfg.train.remat == "full":
        return 3 / 9
    if cfg.train.remat == "selective" or cfg.parallel.chunks > 1:
        return 2 / 9
    return 0.0


def routed_row_bytes(cfg: Config, devices: int) -> float:
    """Bytes per device per step that the expert exchange must move: every routed row sent
    once to its expert's device and once back, forward and backward (4 passes), in the wire
    format, to the (n-1)/n of experts elsewhere (n = ``expert`` devices; copies over
    ``expert_tensor`` inside a node not counted)."""
    from msmoe_jax.parallel.mesh import Layout

    m, t = cfg.model, cfg.train
    n = Layout.from_config(cfg, devices).sizes["expert"]
    if m.num_experts == 0 or n == 1:
        return 0.0
    rows = t.batch_size * t.seq_len / devices * m.top_k * (m.num_layers - m.num_dense_layers)
    import jax.numpy as jnp

    itemsize = jnp.dtype(m.dtype).itemsize  # "none" sends the compute dtype
    wire = lambda fmt: (1 + 4 / m.d_model) if fmt == "fp8" else itemsize
    z = cfg.compression
    row = m.d_model * (wire(z.dispatch) + wire(z.combine))  # out and back, each direction
    return 2 * rows * row * (n - 1) / n


class Report(NamedTuple):
    target: str  # "H100 (compiled for N)" or "CPU (fallback: ...)"
    layers: tuple[int, ...]  # depths compiled
    executed: dict[str, float]  # FLOPs per device per step by scope
    useful: dict[str, float]
    moved: dict[str, float]  # bytes per device per step by comm_bytes scope
    routed: float  # routed rows' bytes (see routed_row_bytes)
    step: float  # modelled seconds
    exposed: dict[str, float]  # exposed communication seconds by comm scope
    mfu: float
    kernels_modelled: bool = False  # Pallas grouped GEMMs in the program (FLOPs modelled)


def kernel_routing(cfg: Config, devices: int, routing: Routing = Routing()) -> Routing:
    """``routing`` with the Pallas kernels' buffer fill of ``cfg`` on GPUs: the ragged
    exchange's receive buffer rows per routed row (``parallel.buffer_factor``, or the worst
    case's), 1.0 for local experts (their kernels read exactly the routed rows)."""
    import dataclasses

    from msmoe_jax.parallel.choices import resolve
    from msmoe_jax.parallel.experts import Group, receive_rows
    from msmoe_jax.parallel.mesh import Layout

    layout = Layout.from_config(cfg, devices)
    choices = resolve(cfg, layout, gpu=True)
    fill = 1.0
    if choices.experts == "ragged":
        m, size = cfg.model, layout.sizes
        g = Group((), size["expert"], (), size["expert_tensor"])
        t = cfg.train.batch_size * cfg.train.seq_len // devices // cfg.train.grad_accum_steps
        t //= choices.chunks
        cf = m.capacity_factor if m.moe_mode == "capacity" else None
        fill = receive_rows(g, m.num_experts // g.n, t, m.top_k, cf,
                            choices.buffer_factor) / (t * m.top_k)
    return dataclasses.replace(routing, fill=fill, tile_rows=cfg.kernel.block_m)


def compile_texts(cfg: Config, devices: int, target: str = "h100",
                  max_layers: int = 8) -> dict[int, str]:
    """{depth: compiled HLO text} of ``cfg``'s step for ``target`` "h100" or "cpu" (simulated
    devices): the whole model, or two smaller depths (``h100.depths``) when deeper than
    ``max_layers``."""
    from msmoe_jax import h100

    depths = h100.depths(cfg, max_layers)
    if target == "h100":
        return {n: h100.compile_step(cfg, devices, layers=n).text for n in depths}
    import jax

    from msmoe_jax.comms import build_step

    texts = {}
    for n in depths:
        _, _, step, state, tokens = build_step(h100.with_layers(cfg, n), jax.devices()[:devices])
        texts[n] = step.lower(state, tokens).compile().as_text()
    return texts


def analyse(cfg: Config, devices: int, texts: dict[int, str], hw_name: str = "h100",
            target: str = "h100", routing: Routing = Routing()) -> Report:
    """The report of ``cfg``'s step from its compiled ``texts`` (``compile_texts``; two depths
    are extrapolated linearly per layer to the config's)."""
    from msmoe_jax.flops import train_flops_per_token
    from msmoe_jax.parallel.comm_bytes import by_scope, collectives
    from msmoe_jax.steptime.model import HARDWARE, program_ops, schedule

    hw = HARDWARE[hw_name]
    routing = kernel_routing(cfg, devices, routing)
    depth = cfg.model.num_layers
    depths = tuple(sorted(texts))
    scale = 1.0 if target == "h100" or cfg.model.dtype != "bfloat16" else 0.5
    runs = []
    for layers in depths:
        program = program_ops(texts[layers], devices, hw, scale, routing)
        timeline = schedule(program.ops, True, hw.overlap_slowdown)
        runs.append((program.flops, by_scope(collectives(texts[layers], devices, routing)),
                     timeline.step, timeline.exposed_by_scope))
    if len(runs) == 1:
        executed, moved, step, exposed = runs[0]
    else:
        f = (depth - depths[0]) / (depths[1] - depths[0])
        line = lambda a, b: {k: a.get(k, 0.0) + f * (b.get(k, 0.0) - a.get(k, 0.0))
                             for k in set(a) | set(b)}
        (fa, ma, sa, ea), (fb, mb, sb, eb) = runs
        executed, moved, step = line(fa, fb), line(ma, mb), sa + f * (sb - sa)
        # Exposure is not additive per block (it depends on what overlaps): never below 0.
        exposed = {k: max(v, 0.0) for k, v in line(ea, eb).items()}
    tokens = cfg.train.batch_size * cfg.train.seq_len / devices
    useful = {k: v * tokens for k, v in useful_flops_per_token(
        cfg.model, cfg.train.seq_len).items()}
    model_flops = train_flops_per_token(cfg.model, cfg.train.seq_len) * tokens
    label = (f"H100 program compiled for {devices} GPUs" if target == "h100" else
             f"CPU program for {devices} simulated devices (fallback: BF16/FP8 collectives "
             "widened, CPU fusions, no ragged all_to_all)")
    return Report(label, depths, executed, useful, moved, routed_row_bytes(cfg, devices), step,
                  exposed, model_flops / (step * hw.peak_flops) if step else 0.0,
                  any("grouped_gemm" in t and "__gpu$xla.gpu.triton" in t
                      for t in texts.values()))


def format_report(r: Report) -> str:
    from msmoe_jax.parallel.comm_bytes import human

    e_total, u_total = sum(r.executed.values()), sum(r.useful.values())
    unit, div = next((u, d) for u, d in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6))
                     if max(e_total, u_total) >= 10 * d or u == "MFLOP")
    lines = [f"read from: {r.target}" + (
        f"; compiled at {' and '.join(map(str, r.layers))} layers, extrapolated per layer"
        if len(r.layers) > 1 else ""), "FLOPs: matmuls per device per step",
        "", f"{'scope':<11} {'executed ' + unit:>15} {'useful ' + unit:>13} "
            f"{'executed/useful':>16}"]
    for scope in SCOPES_SHOWN:
        e, u = r.executed.get(scope, 0.0), r.useful.get(scope, 0.0)
        if e or u:
            ratio = f"{e / u:.2f}x" if u else "-"
            lines.append(f"{scope:<11} {e / div:>15.2f} {u / div:>13.2f} {ratio:>16}")
    lines.append(f"{'total':<11} {e_total / div:>15.2f} {u_total / div:>13.2f} "
                 f"{e_total / u_total if u_total else 0:>15.2f}x")
    lines += ["", f"{'comm scope':<17} {'moved/step':>12} {'exposed ms':>11}"]
    for scope in sorted(set(r.moved) | set(r.exposed), key=lambda k: -r.moved.get(k, 0.0)):
        lines.append(f"{scope:<17} {human(r.moved.get(scope, 0.0)):>12} "
                     f"{r.exposed.get(scope, 0.0) * 1e3:>11.2f}")
    if r.routed:
        got = r.moved.get("moe_dispatch", 0.0)
        lines.append(f"expert exchange: {human(got)} moved vs {human(r.routed)} of routed rows "
                     f"({got / r.routed:.2f}x)")
    if r.kernels_modelled:
        lines.append("note: the FLOPs of the Pallas grouped GEMMs (routed rows at balanced "
                     "routing, in whole row tiles) and of cuDNN attention (the causal half) "
                     "are modelled, not read from the program")
    lines += ["", f"modelled step {r.step * 1e3:.1f} ms, exposed communication "
              f"{sum(r.exposed.values()) * 1e3:.1f} ms, MFU {r.mfu:.1%}"]
    return "\n".join(lines)

