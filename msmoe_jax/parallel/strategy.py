"""Chooses the parallel implementation once from the config and wraps the model in it.

``make_ops`` picks the collective-aware pieces of a layer for the layout; ``make_grad_fn`` runs
the per-device objective and its gradient under one ``shard_map`` over the folded mesh;
``state_specs`` gives every parameter and optimizer-state leaf its PartitionSpec from the
parameters' logical axes.

Routing and permutation run per device inside ``shard_map``: under plain ``jit`` with a sharded
batch XLA partitions the router's argsort/gather/scatter globally, ~7x slower on 8 simulated
devices with identical losses.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from msmoe_jax.config import Config
from msmoe_jax.kernels.experts import kernel_experts, pallas_dot, tiles_of
from msmoe_jax.model import LayerOps, local_experts
from msmoe_jax.model.remat import remat_policy
from msmoe_jax.model.transformer import is_stacked
from msmoe_jax.objective import COUNTS, loss_terms
from msmoe_jax.parallel import collectives as C
from msmoe_jax.parallel import fp8
from msmoe_jax.parallel.attention import (
    gather_sequence,
    gather_then,
    scoped,
    tensor_attention,
    then_scatter,
    ulysses_attention,
)
from msmoe_jax.parallel.choices import Choices, resolve
from msmoe_jax.parallel.experts import (
    Group,
    Wires,
    experts_all_gather,
    experts_padded_all_to_all,
    experts_ragged_all_to_all,
)
from msmoe_jax.parallel.grad_exchange import (
    exchange_gradients,
    replica_axes,
    scatter_gradients,
    vary_replicas,
)
from msmoe_jax.parallel.layer_grads import accumulate_into
from msmoe_jax.parallel.mesh import REPLICATED, Layout, is_gpu
from msmoe_jax.parallel.vocab import parallel_embed, parallel_head_nll
from msmoe_jax.parallel.zero import GATHERED, gatherer, splits


def make_ops(cfg: Config, layout: Layout, choices: Choices) -> LayerOps:
    """The LayerOps for ``layout``: per-device pieces that communicate over its mesh axes,
    implemented as ``choices`` (``choices.resolve``) says."""
    size = layout.sizes
    seq, n_seq = layout.seq_axes, size["sequence"] * size["tensor"]
    tensor = layout.axes["tensor"]
    ring = cfg.parallel.collective_matmul
    z = cfg.compression
    wire = lambda fmt: fp8.wire(z.channel_group) if fmt == "fp8" else C.EXACT
    wires = Wires(wire(z.dispatch), wire(z.combine), wire(z.tensor))
    impl = choices.attention
    if layout.attention == "ulysses":
        attention = dict(attention=ulysses_attention(
            seq, n_seq, head_chunks(cfg.parallel.chunks, n_seq, cfg.model.num_heads,
                                    layout.num_kv_heads), impl))
    else:
        kv_sharded = layout.num_kv_heads % n_seq == 0
        attention = dict(attention_in=gather_sequence(seq, n_seq, ring, wires.tensor),
                         attention=tensor_attention(seq, n_seq, kv_sharded, impl),
                         attention_out=scoped(then_scatter(seq, n_seq, ring, wires.tensor),
                                              "tensor_attention"))
    group = Group(layout.axes["expert"], size["expert"], layout.axes["expert_tensor"],
                  size["expert_tensor"])
    tiles = tiles_of(cfg.kernel)
    dot = (pallas_dot(tiles, choices.interpret) if choices.grouped_gemm == "pallas"
           else jax.lax.ragged_dot)
    chunks, bf = choices.chunks, choices.buffer_factor
    if choices.experts == "local":
        if choices.local_compute == "ragged_dot" and choices.grouped_gemm == "pallas":
            experts = kernel_experts(cfg.kernel, choices.interpret)
        else:
            experts = local_experts(choices.local_compute)
    elif choices.experts == "all_gather":
        experts = experts_all_gather(group, wires, chunks, ring, bf)
    elif choices.experts == "ragged":
        move = C.ragged_exchange if choices.gpu else C.ragged_exchange_padded
        experts = experts_ragged_all_to_all(group, wires, chunks, bf, move, dot)
    else:
        experts = experts_padded_all_to_all(group, wires, chunks, bf)
    n_tensor = size["tensor"]
    vocab = (dict(embed=parallel_embed(seq, n_seq), head_nll=parallel_head_nll(seq, n_seq))
             if layout.vocab_sharded else {})
    return LayerOps(**attention, **vocab,
                    ffn_in=scoped(gather_then(tensor, n_tensor, ring, wires.tensor),
                                  "tensor_ffn"),
                    ffn_out=scoped(then_scatter(tensor, n_tensor, ring, wires.tensor),
                                   "tensor_ffn"),
                    experts=experts, remat_policy=block_policy(cfg),
                    scan_layers=cfg.train.scan_layers)


def block_policy(cfg: Config):
    """The remat policy of each block: ``train.remat``'s; with ZeRO-3 and no remat, one that
    saves everything but the gathered parameters (gathered again for the backward)."""
    policy = remat_policy(cfg.train.remat)
    if policy is None and cfg.parallel.zero == 3:
        policy = jax.checkpoint_policies.save_anything_except_these_names(GATHERED)
    return policy


def head_chunks(chunks: int, n: int, heads: int, kv: int) -> int:
    """The most head groups, up to ``chunks``, that Ulysses can exchange one by one: each
    group needs n query heads per device and its KV heads (repeated where fewer) dividing
    evenly."""
    for c in range(chunks, 0, -1):
        g = n * c
        if heads % g == 0 and (kv % g == 0 or g % kv == 0):
            return c
    return 1


def param_specs(params, layout: Layout):
    """PartitionSpecs with the structure of ``params`` (an nnx.State of tagged Params)."""
    is_var = lambda x: isinstance(x, nnx.Variable)
    return jax.tree.map(lambda v: jax.tree.map(lambda _: layout.param_spec(v.axes), v),
                        params, is_leaf=is_var)


def state_specs(state, optimizer: optax.GradientTransformation, layout: Layout,
                zero: int = 0):
    """PartitionSpecs for the train state {step, params, opt_state}: optimizer moments follow
    their parameters (``zero=0``) or are also split over the parameters' replica devices
    (``zero=1``, ``zero_spec``), and so are the parameters themselves with ``zero=3``;
    counters are replicated."""
    specs = param_specs(state["params"], layout)
    moments = zero_specs(state["params"], specs, layout) if zero else specs
    if zero == 3:
        specs = moments
    opt = optax.tree_map_params(optimizer, lambda _, spec: spec, state["opt_state"], moments,
                                transform_non_params=lambda _: REPLICATED)
    return {"step": REPLICATED, "params": specs, "opt_state": opt}


def zero_specs(params, specs, layout: Layout):
    """``zero_spec`` of every parameter: the layout of its sharded optimizer state. The
    stacked blocks' ``layers`` dimension (their first) is never split, so that a layer's
    slice is split like a lone layer's parameter."""
    sizes = dict(layout.mesh_axes)
    return jax.tree_util.tree_map_with_path(
        lambda path, p, s: zero_spec(s, p.shape, sizes, int(is_stacked(path))), params, specs)


def zero_spec(spec: P, shape: tuple[int, ...], sizes: dict[str, int], fixed: int = 0) -> P:
    """``spec`` also split over its replica axes (the mesh axes it does not use), on the
    largest dimension they divide (appended to that dimension's own axes), leaving the first
    ``fixed`` dimensions alone; unchanged when no dimension divides (small leaves stay
    replicated)."""
    replicas = tuple(a for a in replica_axes(spec, tuple(sizes)) if sizes[a] > 1)
    if not replicas:
        return spec
    entries = list(spec) + [None] * (len(shape) - len(spec))
    own = lambda e: () if e is None else (e if isinstance(e, tuple) else (e,))
    split = lambda e: math.prod(sizes[a] for a in own(e))
    n = math.prod(sizes[a] for a in replicas)
    fits = [d for d in range(fixed, len(shape)) if shape[d] % (split(entries[d]) * n) == 0]
    if not fits:
        return spec
    d = max(fits, key=lambda d: shape[d] // split(entries[d]))
    entries[d] = own(entries[d]) + replicas
    return P(*entries)


def make_grad_fn(cfg: Config, graphdef: nnx.GraphDef, mesh: Mesh, layout: Layout):
    """Returns ``grad_fn(params, tokens) -> (metrics, grads)``, to be called under ``jit``.

    params: laid out as ``state_specs`` says for ``parallel.zero``; tokens: [batch, seq_len + 1].
    Everything runs per device under one ``shard_map``: each device differentiates the loss
    w.r.t. its own copy of the parameters (its contribution through its tokens), accumulates
    that over the ``train.grad_accum_steps`` micro-batches in FP32, and the contributions are
    summed over each parameter's replicas (``grad_exchange``, as ``compression.gradients``
    says): all-reduced (``zero=0``), reduce-scattered into each replica's part once per step
    (``zero=1``), or by the parameter all-gathers' backward in each micro-batch (``zero=3``,
    ``parallel/zero.py``). grads: the gradient of the mean micro-batch loss, laid out like the
    optimizer state (``zero_specs`` with ZeRO); metrics: scalars averaged over the
    micro-batches (``loss`` among them) and the per-layer counts of ``objective.COUNTS``
    summed over them.
    """
    choices = resolve(cfg, layout, is_gpu(mesh))
    base_ops = make_ops(cfg, layout, choices)
    stage, mode = cfg.parallel.zero, cfg.compression.gradients
    steps = cfg.train.grad_accum_steps
    sizes = dict(layout.mesh_axes)
    # Sums over the batch whose backward hands each device the gradient of the sum.
    reduce = lambda tree: C.total(tree, layout.all_axes)

    # Scanned blocks accumulate their gradients layer by layer (parallel/layer_grads.py).
    layerwise = steps > 1 and cfg.train.scan_layers

    def per_device(params, inputs, targets, positions, specs, zero, ops):
        def micro_batch(params, acc, inputs, targets, positions):
            o = ops if acc is None else ops._replace(scan_blocks=accumulate_into(acc))
            params = o.gather("", params)  # ZeRO-3: the model's own (unstacked) parameters
            return loss_terms(graphdef, params, inputs, targets, positions, cfg.model, o,
                              reduce)

        grad = jax.value_and_grad(micro_batch, has_aux=True)
        held = zero if stage == 3 else specs
        local = vary_replicas(params, held, layout.all_axes)
        if steps == 1:
            (_, metrics), grads = grad(local, None, inputs, targets, positions)
        else:
            split = lambda a: a.reshape(steps, a.shape[0] // steps, *a.shape[1:])

            def accumulate(acc, batch):
                if not layerwise:
                    (_, metrics), g = grad(local, None, *batch, positions)
                    return jax.tree.map(lambda a, b: a + b.astype(jnp.float32), acc, g), metrics
                # The stacked blocks' cotangent w.r.t. acc is acc with their gradient added.
                both = jax.value_and_grad(micro_batch, argnums=(0, 1), has_aux=True)
                (_, metrics), (g, added) = both(local, acc, *batch, positions)
                acc = jax.tree_util.tree_map_with_path(
                    lambda path, a, b, c: c if is_stacked(path) else a + b.astype(jnp.float32),
                    acc, g, added)
                return acc, metrics

            zeros = jax.tree.map(lambda p: jnp.zeros_like(p, jnp.float32), local)
            grads, metrics = jax.lax.scan(accumulate, zeros, (split(inputs), split(targets)))
            grads = jax.tree.map(lambda g: g / steps, grads)
            metrics = {k: (jnp.sum if k in COUNTS else jnp.mean)(m, axis=0)
                       for k, m in metrics.items()}
        # The exchange starts from FP32 whatever the parameters' dtype.
        grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
        if stage == 1:
            grads = scatter_gradients(grads, specs, zero, layout.all_axes, sizes, mode)
        else:  # with ZeRO-3 only the leaves held whole are left to sum
            grads = exchange_gradients(grads, held, layout.all_axes, sizes, mode)
        return metrics, jax.tree.map(lambda g, p: g.astype(p.dtype), grads, local)

    # Two cases run without shard_map's varying-axes check: the Pallas interpreter (the
    # kernel path off GPU) evaluates kernels with unvarying grid indices against per-device
    # blocks, which jax 0.10's check rejects; and the BF16 gradient all_gather, whose result
    # is the same on every replica but typed varying (jax 0.10 has no invariant all_gather).
    # The tests compare both paths' gradients with the single-device reference.
    interpreted = choices.pallas and choices.interpret
    check = not interpreted and mode == "fp32"

    def grad_fn(params, tokens):
        specs = param_specs(params, layout)
        zero = zero_specs(params, specs, layout) if stage else specs
        ops = base_ops
        if stage == 3:
            parts = splits(params, specs, zero, layout.all_axes, sizes, cfg.model.dtype)
            ops = ops._replace(gather=gatherer(parts, sizes, mode))
        sharded = jax.shard_map(
            functools.partial(per_device, specs=specs, zero=zero, ops=ops), mesh=mesh,
            in_specs=(zero if stage == 3 else specs, layout.tokens, layout.tokens,
                      layout.positions),
            out_specs=(REPLICATED, zero), check_vma=check)
        positions = jnp.arange(tokens.shape[1] - 1)
        return sharded(params, tokens[:, :-1], tokens[:, 1:], positions)

    return grad_fn
