"""Typed run configuration: dataclasses, YAML loading, dotted overrides and validation.

Everything a run needs is in :class:`Config`. ``load_config`` reads a YAML file, applies
``section.key=value`` overrides, checks every key and type against the dataclasses and then
checks the combinations (``Config.validate``). All problems raise :class:`ConfigError` with the
dotted name of the field and what is allowed, before JAX compiles anything.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config problem, phrased for the user: names the field and what is allowed."""


@dataclasses.dataclass
class ModelConfig:
    vocab_size: int = 256  # token ids 0..vocab_size-1 (the stdlib corpus needs >= 256)
    d_model: int = 64  # width of the residual stream
    num_layers: int = 2  # transformer blocks
    num_heads: int = 4  # query heads
    num_kv_heads: int = 2  # key/value heads (grouped-query attention); divides num_heads
    head_dim: int | None = None  # None: d_model // num_heads
    d_ff: int = 128  # width of the dense FFN layers
    num_dense_layers: int = 0  # the first N layers use a dense FFN instead of MoE
    # MoE
    num_experts: int = 8  # routed experts per MoE layer
    top_k: int = 2  # experts each token is routed to
    moe_d_ff: int = 64  # width of each routed expert
    num_shared_experts: int = 0  # experts every token passes through, beside the routed ones
    shared_d_ff: int | None = None  # width of one shared expert; None: moe_d_ff
    renormalize_topk: bool = True  # rescale the top-k gate weights to sum to 1
    # Scale the shared experts' output by sigmoid(x @ w) per token (Qwen-MoE's shared gate).
    shared_expert_gate: bool = False
    # Attention variants of imported models: biases on the Q/K/V projections (Qwen2), and an
    # RMSNorm on queries and keys before RoPE, per head ("head", Qwen3) or over all heads
    # together ("full", OLMoE).
    attention_bias: bool = False
    qk_norm: Literal["none", "head", "full"] = "none"  # see attention_bias
    moe_mode: Literal["dropless", "capacity"] = "dropless"  # capacity: drop past capacity_factor
    capacity_factor: float = 1.25  # capacity mode: slots per expert = ceil(cf * tokens * k / E)
    # Weight of the load-balancing loss E * sum_e f_e * p_e per MoE layer (f_e: expert e's
    # share of the top-k assignments, summing to 1; p_e: its mean router probability),
    # averaged over the layers. Hugging Face's coefficient is top_k times smaller (convert.py).
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.001  # weight of the router z-loss, mean logsumexp(logits)^2
    # How each device computes its local experts: "padded" is a dense per-expert einsum over
    # [E, capacity, d] buffers (fast on CPU), "ragged_dot" a grouped GEMM over expert-sorted rows
    # (no padding FLOPs; the fast choice on GPU). "auto" picks by backend.
    expert_compute: Literal["auto", "padded", "ragged_dot"] = "auto"
    # Numerics
    rope_theta: float = 10000.0  # RoPE base frequency
    norm_eps: float = 1e-6  # RMSNorm epsilon
    tie_embeddings: bool = False  # the output projection reuses the input embedding
    init_std: float = 0.02  # std of the normal initialisation (output layers scaled down)
    dtype: Literal["float32", "bfloat16"] = "bfloat16"  # compute dtype
    param_dtype: Literal["float32", "bfloat16"] = "float32"  # parameters and optimizer state

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.num_heads

    @property
    def resolved_shared_d_ff(self) -> int:
        return self.shared_d_ff if self.shared_d_ff is not None else self.moe_d_ff


@dataclasses.dataclass
class ParallelConfig:
    """Two views of the same devices (folded parallelism); each view's product is the device
    count, and -1 fills in whatever the other axes of its view leave."""

    # The device count the layout is written for (all processes' devices together); null
    # = any. A run on a different count stops at load instead of building another mesh.
    devices: int | None = None
    # Attention view. The residual stream is split over the batch by ``data`` and along the
    # sequence by ``sequence`` x ``tensor``.
    data: int = -1
    sequence: int = 1  # dense FFNs and shared experts work on their own tokens over this axis
    tensor: int = 1  # dense FFNs and shared experts are Megatron tensor-parallel over this axis
    # How attention crosses the sequence split (sequence x tensor devices): "ulysses" swaps
    # sequence shards for head shards with all_to_all (replicated weights); "tensor" is
    # Megatron's tensor parallelism (all_gather the sequence, heads split with sharded weights,
    # reduce-scatter back).
    attention: Literal["ulysses", "tensor"] = "ulysses"
    # Expert view.
    expert_data: int = -1  # replicas of the experts
    expert: int = 1  # experts split over this axis (expert parallelism)
    expert_tensor: int = 1  # each expert's FFN width split over this axis
    # How tokens reach their experts: all_to_all of the routed tokens, or all_gather of the
    # layer input + reduce-scatter of the output; "auto" picks by moved bytes (all_gather when
    # top_k >= expert).
    dispatch: Literal["all_to_all", "all_gather", "auto"] = "auto"
    # The all_to_all dispatch's exchange: "padded" sends worst-case per-expert buffers (runs
    # everywhere); "ragged" sends only the routed rows with ragged_all_to_all and computes
    # with grouped GEMMs (on CPU, which lacks ragged_all_to_all, an emulation over a padded
    # all_to_all stands in: same numbers, no saving). "auto": ragged on GPU, padded elsewhere.
    all_to_all: Literal["auto", "padded", "ragged"] = "auto"
    # Dropless exchange buffers, as a multiple of the balanced load (every device sends and
    # receives tokens x top_k rows when routing is even). "ragged" sizes each device's receive
    # buffer with it; "padded" each (source, expert) block. Rows past a buffer are dropped
    # and counted in the ``dropped`` metric (the trainer warns when they pass 1% of the
    # assignments); nothing is lost silently. 2.0 leaves room for the load of a device's
    # experts to reach twice the mean; the padded exchange's compute and bytes scale with it,
    # the ragged one's only its receive memory. Early in training routing can be far less
    # even: the tiny default model overflowed 2x by up to 17% of its assignments in its first
    # 100 steps, so configs/default.yaml keeps "worst_case": every token choosing one device.
    buffer_factor: float | Literal["worst_case"] = 2.0
    # Collective matmuls: the all_gathers and reduce-scatters of tensor-parallel attention and
    # FFNs, and of the all_gather dispatch (dropless only), run as rings of ppermute steps
    # overlapped with the GEMMs beside them. "bidirectional" sends half of each block each way.
    collective_matmul: Literal["off", "ring", "bidirectional"] = "off"
    # Chunked pipelines inside a layer: the MoE block's tokens (and the Ulysses attention's
    # heads, in as many groups up to this as the heads allow) are split into this many chunks,
    # so chunk i+1's all_to_all/all_gather overlaps chunk i's GEMMs; the MoE backward is
    # hand-scheduled (parallel/pipeline.py). 1 = off. Needs dropless MoE and the padded
    # all_to_all or the all_gather dispatch.
    chunks: int = 1
    # ZeRO: 0 keeps the optimizer state beside each replica of its parameter; 1 shards the
    # AdamW moments of every parameter over that parameter's replica devices (the mesh axes
    # its own layout does not split it over): the gradients are reduce-scattered into those
    # parts, each device updates only its part, and the update is all-gathered into the
    # (replicated) parameters. Same traffic as 0, a fraction of the optimizer memory.
    # 3 also holds the parameters in those parts and all-gathers each where it is used (the
    # blocks' one layer at a time, in the compute dtype for matrices, again for the
    # backward); the gathers' backward reduce-scatters the gradients. Its gathers are paid
    # per micro-batch (parallel/zero.py).
    zero: Literal[0, 1, 3] = 0
    # The embedding and the LM head: "sharded" splits the vocabulary over the attention group
    # (parallel.sequence x parallel.tensor devices), with a fused cross-entropy that combines
    # the softmax statistics over the group and never holds [tokens, vocab] logits
    # (parallel/vocab.py); "replicated" keeps both tables whole on every device. "auto":
    # sharded when the group has more than one device, divides model.vocab_size, and the
    # tables' FP32 parameters and Adam moments (12 bytes an entry) would take >= 1 GiB.
    vocab: Literal["auto", "sharded", "replicated"] = "auto"


@dataclasses.dataclass
class DataConfig:
    # "stdlib": the Python standard library's own source, byte-tokenised (no download);
    # "tokens": a flat binary file of pre-tokenised ids (see token_dtype), memory-mapped.
    source: Literal["stdlib", "tokens"] = "stdlib"
    path: str | None = None  # the token file, for source 'tokens'
    token_dtype: Literal["uint16", "uint32"] = "uint16"  # item type of the token file
    max_bytes: int = 8_000_000  # stdlib corpus: stop collecting after this many bytes


@dataclasses.dataclass
class OptimizerConfig:
    lr: float = 3e-3  # peak learning rate (AdamW), after warmup, before cosine decay
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 20  # linear warmup from 0 to lr
    b1: float = 0.9  # Adam's first-moment decay
    b2: float = 0.95  # Adam's second-moment decay
    eps: float = 1e-8  # Adam's denominator epsilon
    weight_decay: float = 0.1  # decoupled (AdamW), on matrices only
    grad_clip: float = 1.0  # global-norm clipping; 0 disables


@dataclasses.dataclass
class TrainConfig:
    steps: int = 200  # optimizer steps in the whole run (a resumed run continues to it)
    batch_size: int = 16  # global, in sequences
    seq_len: int = 128  # tokens per sequence (fixed for a run: resuming refuses another)
    log_every: int = 10  # log metrics every N steps (and the first and last)
    # Activation rematerialisation per block (msmoe_jax/model/remat.py): "none" stores every
    # activation, "selective" stores the attention core's inputs and context and the experts'
    # dispatched and combined rows and recomputes the rest, "full" stores only block inputs.
    remat: Literal["none", "selective", "full"] = "none"
    # Run the layers under jax.lax.scan (one block of each kind in the compiled program:
    # compile time independent of depth) or unrolled (one copy per layer: the scheduler may
    # overlap across layer boundaries, compile time grows with depth). Same parameters and
    # checkpoints either way.
    scan_layers: bool = True
    # Micro-batches per step: each device's batch is split into this many, their gradients
    # are accumulated in FP32, and the gradient exchange runs once per step.
    grad_accum_steps: int = 1


@dataclasses.dataclass
class KernelConfig:
    """Which implementation runs the routed experts' grouped GEMM (where experts compute on
    expert-sorted rows: ``model.expert_compute=ragged_dot`` without expert parallelism, and the
    ragged all_to_all dispatch) and its tiles."""

    # "xla": jax.lax.ragged_dot (XLA:GPU multiplies every row by every expert's weights, masked).
    # "pallas": msmoe_jax/kernels (Triton on GPU, multiplies only routed rows; the Pallas
    # interpreter elsewhere, slow and meant for tests). "auto": pallas on GPU, xla elsewhere
    # (parallel/choices.py).
    grouped_gemm: Literal["auto", "xla", "pallas"] = "auto"
    # The attention core: "xla" is jax.nn.dot_product_attention's XLA path (materialises the
    # [b, h, s, s] logits), "cudnn" its cuDNN flash-attention kernel (GPU, bf16). "auto":
    # cudnn on GPU for bf16 models, xla otherwise.
    attention: Literal["auto", "xla", "cudnn"] = "auto"
    # pallas without expert parallelism: permute tokens in the GEMM prologue and un-permute
    # them, gate-weighted, in the epilogue (no expert-sorted copy of the activations).
    fuse_permute: bool = True
    block_m: int = 128  # rows per tile
    block_n: int = 128  # output columns per tile
    block_k: int = 64  # contraction step
    num_warps: int = 8  # Triton warps per program (GPU)
    num_stages: int = 3  # Triton software-pipelining stages (GPU)


@dataclasses.dataclass
class CompressionConfig:
    """Lower-precision communication (MegaScale-MoE section 5); msmoe_jax/parallel/fp8.py and
    grad_exchange.py. "none" sends the compute dtype."""

    # Gradients of parameters replicated over devices (attention, router, embeddings, norms,
    # dense FFNs; routed experts over parallel.expert_data): "fp32" is a psum in FP32;
    # "bf16_a2a" casts the FP32-accumulated gradient to BF16, all_to_alls it so each device
    # receives every replica's piece of one shard, sums the pieces in FP32 and all_gathers the
    # reduced shard in BF16 (half the bytes; no chain of BF16 additions).
    gradients: Literal["fp32", "bf16_a2a"] = "fp32"
    # Tokens sent to the experts (the dispatch all_to_all / all_gather) and the expert outputs
    # sent back (the combine all_to_all / reduce-scatter): "fp8" is E4M3 with one FP32 scale
    # per token row, saturating; the backward sends its cotangents the same way.
    dispatch: Literal["none", "fp8"] = "none"
    combine: Literal["none", "fp8"] = "none"  # see dispatch
    # Tensor-parallel all_gathers (per-token FP8) and reduce-scatters (FP8 all_to_all + FP32
    # sum; their backward all_gathers FP8 with per-channel scales over token groups) of
    # parallel.tensor, tensor-parallel attention and parallel.expert_tensor.
    tensor: Literal["none", "fp8"] = "none"
    channel_group: int = 128  # tokens per per-channel scale in FP8 gradient all_gathers


@dataclasses.dataclass
class CheckpointConfig:
    every: int = 100  # save every N steps (and at the end); 0 disables checkpoints
    keep: int = 2  # checkpoints kept (the oldest are deleted)
    async_save: bool = True  # write checkpoints in the background while training goes on
    resume: bool = True  # resume from the latest checkpoint in run.dir/checkpoints
    # Start (when there is nothing to resume) from these parameters: a directory written by
    # ``python -m msmoe_jax.convert import`` or a training checkpoint step. Fresh optimizer.
    init_from: str | None = None


@dataclasses.dataclass
class RunConfig:
    # The run directory: config.json, metrics.jsonl, checkpoints/. One run at a time holds it
    # (a lock); a new run in it resumes from its latest checkpoint.
    dir: str = "runs/default"
    # Peak FLOP/s per device used for MFU, in TFLOP/s. None: looked up from the device kind
    # (H100/H200 bf16 dense 989); on a CPU MFU is reported against a nominal 1 TFLOP/s.
    peak_tflops: float | None = None
    progress: Literal["auto", "bar", "lines"] = "auto"  # auto: a bar on a terminal, else lines
    # Simulated devices when JAX runs on the CPU (train.py sets XLA_FLAGS before JAX starts,
    # unless XLA_FLAGS already sets --xla_force_host_platform_device_count).
    cpu_devices: int = 8
    # Add the GPU latency-hiding / collective-combining XLA flags (msmoe_jax/cli.py
    # GPU_OVERLAP_FLAGS) to XLA_FLAGS; a flag already in XLA_FLAGS keeps the user's value.
    gpu_overlap_flags: bool = True
    # Also log the metrics for TensorBoard (run.dir/tensorboard; needs tensorboardX).
    tensorboard: bool = False
    # Write a JAX profiler trace (run.dir/profile) of this many steps after the first; 0 = off.
    profile_steps: int = 0


@dataclasses.dataclass
class DistributedConfig:
    # Multi-process runs: a process silent for this long is declared dead and the run stops.
    heartbeat_timeout_s: int = 60
    # How long processes wait for each other to join the run.
    init_timeout_s: int = 300


@dataclasses.dataclass
class Config:
    seed: int = 0  # initial weights and the data order
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    kernel: KernelConfig = dataclasses.field(default_factory=KernelConfig)
    compression: CompressionConfig = dataclasses.field(default_factory=CompressionConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> Config:
        """Checks combinations of fields. The checks that need the device count live with the
        mesh: ``parallel.mesh.validate_for(cfg, device_count)``."""
        m, t = self.model, self.train

        def need(ok: bool, field: str, msg: str) -> None:
            if not ok:
                raise ConfigError(f"{field}: {msg}")

        positive = [
            ("model.vocab_size", m.vocab_size), ("model.d_model", m.d_model),
            ("model.num_layers", m.num_layers), ("model.num_heads", m.num_heads),
            ("model.num_kv_heads", m.num_kv_heads), ("model.d_ff", m.d_ff),
            ("model.num_experts", m.num_experts), ("model.top_k", m.top_k),
            ("model.moe_d_ff", m.moe_d_ff), ("train.steps", t.steps),
            ("train.batch_size", t.batch_size), ("train.seq_len", t.seq_len),
            ("train.log_every", t.log_every), ("train.grad_accum_steps", t.grad_accum_steps),
            ("compression.channel_group", self.compression.channel_group),
            ("checkpoint.keep", self.checkpoint.keep),
            ("data.max_bytes", self.data.max_bytes), ("run.cpu_devices", self.run.cpu_devices),
        ]
        for name, value in positive:
            need(value >= 1, name, f"must be a positive integer, got {value}")
        need(m.top_k <= m.num_experts, "model.top_k",
             f"must be between 1 and model.num_experts={m.num_experts}, got {m.top_k}")
        need(m.num_heads % m.num_kv_heads == 0, "model.num_kv_heads",
             f"must divide model.num_heads={m.num_heads}, got {m.num_kv_heads}")
        if m.head_dim is None:
            need(m.d_model % m.num_heads == 0, "model.d_model",
                 f"must be divisible by model.num_heads={m.num_heads} when model.head_dim is "
                 f"not set, got {m.d_model}")
        else:
            need(m.head_dim >= 1, "model.head_dim", f"must be positive, got {m.head_dim}")
        need(m.resolved_head_dim % 2 == 0, "model.head_dim",
             f"must be even for rotary embeddings, got {m.resolved_head_dim}")
        need(0 <= m.num_dense_layers <= m.num_layers, "model.num_dense_layers",
             f"must be between 0 and model.num_layers={m.num_layers}, got {m.num_dense_layers}")
        need(m.num_shared_experts >= 0, "model.num_shared_experts",
             f"must be >= 0, got {m.num_shared_experts}")
        if m.shared_d_ff is not None:
            need(m.shared_d_ff >= 1, "model.shared_d_ff", f"must be positive, got {m.shared_d_ff}")
        need(m.qk_norm != "full" or self.parallel.attention == "ulysses", "model.qk_norm",
             "'full' normalises over all heads of a token, which parallel.attention 'tensor' "
             "splits over devices; use parallel.attention: ulysses")
        need(not m.shared_expert_gate or m.num_shared_experts > 0, "model.shared_expert_gate",
             "needs model.num_shared_experts > 0")
        need(m.capacity_factor > 0, "model.capacity_factor",
             f"must be > 0, got {m.capacity_factor}")
        need(m.aux_loss_coef >= 0, "model.aux_loss_coef", f"must be >= 0, got {m.aux_loss_coef}")
        need(m.z_loss_coef >= 0, "model.z_loss_coef", f"must be >= 0, got {m.z_loss_coef}")
        need(m.rope_theta > 0, "model.rope_theta", f"must be > 0, got {m.rope_theta}")
        need(m.norm_eps > 0, "model.norm_eps", f"must be > 0, got {m.norm_eps}")

        kc = self.kernel
        for name in ("block_m", "block_n", "block_k"):
            v = getattr(kc, name)
            need(v >= 16 and v & (v - 1) == 0, f"kernel.{name}",
                 f"must be a power of two >= 16, got {v}")
        need(kc.num_warps in (1, 2, 4, 8, 16), "kernel.num_warps",
             f"must be one of 1, 2, 4, 8, 16, got {kc.num_warps}")
        need(kc.num_stages >= 1, "kernel.num_stages", f"must be >= 1, got {kc.num_stages}")
        if kc.grouped_gemm == "pallas":
            need(m.expert_compute != "padded", "kernel.grouped_gemm",
                 "'pallas' runs the grouped expert GEMM, but model.expert_compute is 'padded'; "
                 "set model.expert_compute to 'ragged_dot' or 'auto'")

        o = self.optimizer
        need(o.lr > 0, "optimizer.lr", f"must be > 0, got {o.lr}")
        need(0 <= o.min_lr_ratio <= 1, "optimizer.min_lr_ratio",
             f"must be in [0, 1], got {o.min_lr_ratio}")
        need(o.warmup_steps >= 0, "optimizer.warmup_steps", f"must be >= 0, got {o.warmup_steps}")
        need(o.grad_clip >= 0, "optimizer.grad_clip",
             f"must be >= 0 (0 disables), got {o.grad_clip}")
        need(o.weight_decay >= 0, "optimizer.weight_decay", f"must be >= 0, got {o.weight_decay}")
        need(0 <= o.b1 < 1 and 0 <= o.b2 < 1, "optimizer.b1/b2",
             f"must be in [0, 1), got b1={o.b1}, b2={o.b2}")
        need(self.checkpoint.every >= 0, "checkpoint.every",
             f"must be >= 0 (0 disables checkpoints), got {self.checkpoint.every}")
        need(bool(self.run.dir), "run.dir", "must be a non-empty path")
        if self.checkpoint.init_from is not None:
            need(Path(self.checkpoint.init_from).is_dir(), "checkpoint.init_from",
                 f"no such directory: {self.checkpoint.init_from}")
        if self.run.peak_tflops is not None:
            need(self.run.peak_tflops > 0, "run.peak_tflops",
                 f"must be > 0 or null, got {self.run.peak_tflops}")

        d = self.data
        if d.source == "tokens":
            need(d.path is not None, "data.path", "is required when data.source is 'tokens'")
            need(Path(d.path or "").is_file(), "data.path", f"no such file: {d.path}")
        elif d.path is not None:
            raise ConfigError("data.path: only used with data.source='tokens' "
                              f"(data.source is {d.source!r})")
        if d.source == "stdlib":
            need(m.vocab_size >= 256, "model.vocab_size",
                 f"must be >= 256 for the byte-level stdlib corpus, got {m.vocab_size}")

        bf = self.parallel.buffer_factor
        need(bf == "worst_case" or (isinstance(bf, (int, float)) and 0 < bf < math.inf),
             "parallel.buffer_factor",
             f"must be a finite number > 0 or 'worst_case', got {bf!r}")
        if self.kernel.attention == "cudnn":
            need(m.dtype == "bfloat16", "kernel.attention",
                 f"'cudnn' needs model.dtype 'bfloat16', got {m.dtype!r}; use 'auto' or 'xla'")
            hd = m.resolved_head_dim
            need(hd % 8 == 0 and hd <= 256, "kernel.attention",
                 f"'cudnn' needs model.head_dim a multiple of 8 up to 256, got {hd}")
        need(self.run.profile_steps >= 0, "run.profile_steps",
             f"must be >= 0 (0 = no trace), got {self.run.profile_steps}")
        for name in ("heartbeat_timeout_s", "init_timeout_s"):
            value = getattr(self.distributed, name)
            need(value >= 1, f"distributed.{name}", f"must be a positive integer, got {value}")
        if self.parallel.devices is not None:
            need(self.parallel.devices >= 1, "parallel.devices",
                 f"must be a positive integer or null, got {self.parallel.devices}")
        return self


# ---------------------------------------------------------------------------------------------
# Loading: YAML -> dicts -> dataclasses, with type checks naming the dotted field.

def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, field: str) -> Any:
    """Returns ``value`` checked against type ``tp``; raises ConfigError naming ``field``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, field)
            except ConfigError:
                pass
    elif origin is Literal:
        if value in typing.get_args(tp):
            return value
    elif tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{field}: expected {_type_name(tp)}, got {value!r}")


def _build(cls: Any, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = prefix or "top level"
        raise ConfigError(f"{prefix + '.' if prefix else ''}{unknown[0]}: unknown key in {where}; "
                          f"allowed keys: {', '.join(sorted(names))}")
    kwargs = {}
    for name, value in data.items():
        field = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value if value is not None else {}, field)
        else:
            kwargs[name] = _coerce(value, tp, field)
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``'model.num_experts=16'`` -> (['model', 'num_experts'], 16); values are YAML scalars."""
    if "=" not in text:
        raise ConfigError(f"bad override {text!r}: expected dotted.key=value, "
                          "e.g. --set model.num_experts=16")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"bad override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"bad override {text!r}: value is not valid YAML ({e})") from None
    return key.split("."), value


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"bad override {text!r}: {part} is not a section")
            node = child
        node[path[-1]] = value
    return raw


def config_from_dict(raw: dict[str, Any], overrides: Sequence[str] = ()) -> Config:
    raw = apply_overrides(dict(raw or {}), list(overrides))
    return _build(Config, raw, "")


def read_config_file(path: str | Path | None) -> dict[str, Any]:
    """The raw mapping of a YAML (or JSON) config file; None: empty (all defaults)."""
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return raw


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> Config:
    """Loads ``path`` (None: all defaults), applies overrides and validates."""
    return config_from_dict(read_config_file(path), overrides).validate()
