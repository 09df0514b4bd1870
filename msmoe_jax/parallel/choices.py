"""Every ``auto`` of the config resolved once, for one layout on one kind of device.

``resolve`` is the only place that turns ``auto`` into an implementation; ``make_ops`` and
``make_grad_fn`` read the ``Choices`` it returns, and ``plan`` prints them.

What ``auto`` picks on GPU, and why (compiled H100 programs, docs/performance.md):

* experts exchange: the ragged all_to_all. Only routed rows move and the receive buffer is
  bounded by ``parallel.buffer_factor``; the padded exchange sends and multiplies each
  (source, expert) block at its bound whatever the routing.
* grouped GEMM: the Pallas (Triton) kernel. Its tiles cover only the routed rows of each
  expert (padding rows cost a zero store, not a GEMM), forward and both backward products;
  XLA:GPU lowers ``jax.lax.ragged_dot`` to a dense GEMM over a masked input, experts x the
  FLOPs.
* attention core: cuDNN flash attention for bf16 models with head_dim a multiple of 8 up to
  128 (no [b, h, s, s] logits in memory; the masked half is skipped).

Elsewhere (CPU, the reference): the padded exchange (XLA:CPU lacks ``ragged_all_to_all``),
``jax.lax.ragged_dot`` or the dense per-expert einsum, and XLA attention.
"""

from __future__ import annotations

import dataclasses

from msmoe_jax.config import Config
from msmoe_jax.parallel.mesh import Layout


@dataclasses.dataclass(frozen=True)
class Choices:
    gpu: bool  # the mesh is made of GPUs (real or compile-only)
    # How the routed experts meet their tokens: "local" (no expert parallelism), "all_gather",
    # "padded" or "ragged" (the all_to_all exchanges).
    experts: str
    local_compute: str  # "local" experts: "padded" (dense einsum) or "ragged_dot" (grouped)
    grouped_gemm: str  # "xla" (jax.lax.ragged_dot) or "pallas" (msmoe_jax/kernels)
    interpret: bool  # Pallas kernels in the interpreter (off GPU; slow, for tests)
    attention: str  # "xla" or "cudnn"
    buffer_factor: float | None  # dropless buffers x the balanced load; None: worst case
    chunks: int  # token chunks of the expert pipeline

    def describe(self) -> str:
        """One line: what runs the experts and attention."""
        how = {"local": f"local ({self.local_compute})", "all_gather": "all_gather dispatch",
               "padded": "padded all_to_all", "ragged": "ragged all_to_all"}[self.experts]
        if self.experts != "local":
            how += (" (worst-case buffers)" if self.buffer_factor is None
                    else f" (buffers {self.buffer_factor:g}x the balanced load)")
        gemm = f", grouped GEMM {self.grouped_gemm}" if self.grouped else ""
        chunks = f", {self.chunks} chunks" if self.chunks > 1 else ""
        return f"experts {how}{gemm}{chunks}; attention {self.attention}"

    @property
    def grouped(self) -> bool:
        """The experts compute on expert-sorted rows (where ``grouped_gemm`` applies)."""
        return self.experts == "ragged" or (self.experts == "local"
                                            and self.local_compute == "ragged_dot")

    @property
    def pallas(self) -> bool:
        """The Pallas kernel runs somewhere in the step."""
        return self.grouped_gemm == "pallas" and self.grouped


def resolve(cfg: Config, layout: Layout, gpu: bool) -> Choices:
    """The implementation of every ``auto`` field for ``layout`` on GPUs (``gpu``) or not."""
    p, k, m = cfg.parallel, cfg.kernel, cfg.model
    size = layout.sizes
    grouped_gemm = k.grouped_gemm
    if grouped_gemm == "auto":
        grouped_gemm = "pallas" if gpu else "xla"
    if size["expert"] * size["expert_tensor"] == 1:
        experts = "local"
    elif layout.dispatch == "all_gather":
        experts = "all_gather"
    elif p.all_to_all == "auto":  # an explicit Pallas kernel runs in the ragged exchange
        experts = "ragged" if gpu or grouped_gemm == "pallas" else "padded"
    else:
        experts = p.all_to_all
    local_compute = m.expert_compute
    if local_compute == "auto":
        local_compute = "ragged_dot" if gpu else "padded"
    attention = k.attention
    if attention == "auto":  # cuDNN's head-dim limit (JAX allows 256 only on a Hopper host)
        fits = m.resolved_head_dim % 8 == 0 and m.resolved_head_dim <= 128
        attention = "cudnn" if gpu and m.dtype == "bfloat16" and fits else "xla"
    bf = p.buffer_factor
    return Choices(gpu=gpu, experts=experts, local_compute=local_compute,
                   grouped_gemm=grouped_gemm, interpret=not gpu, attention=attention,
                   buffer_factor=None if bf == "worst_case" else float(bf), chunks=p.chunks)
