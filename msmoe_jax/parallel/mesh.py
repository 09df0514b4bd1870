"""The device mesh, its axis names and the sharding rules, in one place.

Folded parallelism: attention sees the devices as ``data x sequence x tensor``, the MoE layers
as ``expert_data x expert x expert_tensor``. Both views are row-major over the same devices,
so one mesh serves both: its axes are the common refinement of the two factorisations (each
mesh axis lies inside exactly one axis of each view, and is named ``"<attention>:<expert>"``).
A view axis is then a tuple of mesh axes, which collectives and PartitionSpecs accept directly,
and switching views costs no communication.

Example: data 2 x sequence 4 with expert_data 2 x expert 4 gives the mesh
``{"data:expert_data": 2, "sequence:expert": 4}``; data 8 with expert 8 gives
``{"data:expert": 8}`` (expert parallelism spanning the data-parallel devices).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from msmoe_jax.config import Config, ConfigError

ATTENTION_VIEW = ("data", "sequence", "tensor")  # major -> minor
EXPERT_VIEW = ("expert_data", "expert", "expert_tensor")
REPLICATED = P()

# Logical axes of parameters (declared by the layers) that may be sharded, and the view axes
# they map to. Every other logical axis is replicated.
#   heads / kv_heads: attention heads, over the attention group when parallel.attention=tensor
#   mlp: width of dense FFNs and shared experts, over ``tensor``
#   experts / expert_mlp: routed experts and their width, over ``expert`` / ``expert_tensor``
#   vocab: the embedding's rows and the LM head's columns, over the attention group when
#     the vocabulary is sharded (parallel.vocab)


def _fill(sizes: dict[str, int], view: tuple[str, ...], n: int) -> dict[str, int]:
    """Resolves one -1 per view; ConfigError unless the view's product is ``n``."""
    for axis in view:
        if sizes[axis] == 0 or sizes[axis] < -1:
            raise ConfigError(f"parallel.{axis}: must be a positive integer or -1, "
                              f"got {sizes[axis]}")
    free = [a for a in view if sizes[a] == -1]
    if len(free) > 1:
        raise ConfigError(f"parallel.{free[1]}: only one axis per view may be -1 "
                          f"(parallel.{free[0]} is -1 too)")
    known = math.prod(sizes[a] for a in view if sizes[a] != -1)
    if free:
        if n % known:
            raise ConfigError(f"parallel.{free[0]}: cannot fill {n} devices; the other axes of "
                              f"its view ({_product(sizes, view)}) do not divide {n}")
        sizes[free[0]] = n // known
    elif known != n:
        fields = " x ".join(f"parallel.{a}" for a in view)
        values = " x ".join(str(sizes[a]) for a in view)
        raise ConfigError(f"{fields}: {values} = {known} but there are {n} devices; the product "
                          "must equal the device count (or set one of them to -1 to fill it)")
    return sizes


def _product(sizes, view) -> str:
    return " x ".join(f"{a} {sizes[a]}" for a in view)


def _spans(sizes: dict[str, int], view: tuple[str, ...]) -> dict[str, tuple[int, int]]:
    """Axis -> [stride, stride * size) in row-major device order (minor axes first)."""
    spans, stride = {}, 1
    for axis in reversed(view):
        spans[axis] = (stride, stride * sizes[axis])
        stride *= sizes[axis]
    return spans


@dataclasses.dataclass(frozen=True)
class Layout:
    """A validated parallel layout: view-axis sizes, the folded mesh axes, and the specs."""

    sizes: dict[str, int]  # view axis -> size
    mesh_axes: tuple[tuple[str, int], ...]  # (name, size), major -> minor
    axes: dict[str, tuple[str, ...]]  # view axis -> its mesh axes, major -> minor
    attention: str
    dispatch: str  # resolved: "all_to_all" or "all_gather"
    num_kv_heads: int
    vocab_sharded: bool

    @classmethod
    def from_config(cls, cfg: Config, device_count: int) -> Layout:
        p, m, t = cfg.parallel, cfg.model, cfg.train
        sizes = {a: getattr(p, a) for a in ATTENTION_VIEW + EXPERT_VIEW}
        _fill(sizes, ATTENTION_VIEW, device_count)
        _fill(sizes, EXPERT_VIEW, device_count)

        # Mesh axes: cut the device range at every view-axis boundary of either view.
        spans = {**_spans(sizes, ATTENTION_VIEW), **_spans(sizes, EXPERT_VIEW)}
        cuts = sorted({c for span in spans.values() for c in span})
        for lo, hi in zip(cuts, cuts[1:]):
            if hi % lo:
                raise ConfigError(
                    f"parallel: the views {_product(sizes, ATTENTION_VIEW)} and "
                    f"{_product(sizes, EXPERT_VIEW)} cannot be folded onto one mesh (axis "
                    f"boundaries at {lo} and {hi} devices do not nest); choose sizes whose "
                    "cumulative products divide each other")
        mesh_axes: list[tuple[str, int]] = []
        axes: dict[str, list[str]] = {a: [] for a in sizes}
        if device_count == 1:  # one trivial mesh axis
            mesh_axes, axes["data"], axes["expert_data"] = [("data:expert_data", 1)], \
                ["data:expert_data"], ["data:expert_data"]
        for lo, hi in reversed(list(zip(cuts, cuts[1:]))):
            owner = [a for view in (ATTENTION_VIEW, EXPERT_VIEW) for a in view
                     if spans[a][0] <= lo and hi <= spans[a][1]]
            name = ":".join(owner)
            mesh_axes.append((name, hi // lo))
            for a in owner:
                axes[a].append(name)

        def need(ok, field, msg):
            if not ok:
                raise ConfigError(f"{field}: {msg}")

        seq_split = sizes["sequence"] * sizes["tensor"]
        micro = sizes["data"] * t.grad_accum_steps
        need(t.batch_size % micro == 0, "train.batch_size",
             f"must be divisible by parallel.data x train.grad_accum_steps = "
             f"{sizes['data']} x {t.grad_accum_steps}, got {t.batch_size}")
        need(t.seq_len % seq_split == 0, "train.seq_len",
             f"must be divisible by parallel.sequence x parallel.tensor = {seq_split}, "
             f"got {t.seq_len}")
        need(m.num_heads % seq_split == 0, "model.num_heads",
             f"must be divisible by parallel.sequence x parallel.tensor = {seq_split} (heads are "
             f"split over them), got {m.num_heads}")
        kv = m.num_kv_heads
        need(kv % seq_split == 0 or seq_split % kv == 0, "model.num_kv_heads",
             f"must divide or be a multiple of parallel.sequence x parallel.tensor = "
             f"{seq_split}, got {kv}")
        need(m.num_experts % sizes["expert"] == 0, "model.num_experts",
             f"must be divisible by parallel.expert={sizes['expert']}, got {m.num_experts}")
        need(m.moe_d_ff % sizes["expert_tensor"] == 0, "model.moe_d_ff",
             f"must be divisible by parallel.expert_tensor={sizes['expert_tensor']}, "
             f"got {m.moe_d_ff}")
        if m.num_dense_layers:
            need(m.d_ff % sizes["tensor"] == 0, "model.d_ff",
                 f"must be divisible by parallel.tensor={sizes['tensor']}, got {m.d_ff}")
        if m.num_shared_experts:
            need(m.resolved_shared_d_ff % sizes["tensor"] == 0, "model.shared_d_ff",
                 f"must be divisible by parallel.tensor={sizes['tensor']}, "
                 f"got {m.resolved_shared_d_ff}")
        c = p.chunks
        need(c >= 1, "parallel.chunks", f"must be a positive integer, got {c}")
        if c > 1:
            need(m.moe_mode == "dropless", "parallel.chunks",
                 "chunks > 1 needs model.moe_mode='dropless' (capacity is pooled over all of a "
                 "layer's tokens), got 'capacity'")
            tokens = t.batch_size // micro * t.seq_len // seq_split
            need(tokens % c == 0, "parallel.chunks",
                 f"must divide the tokens per device ({tokens}), got {c}")
        dispatch = p.dispatch
        if dispatch == "auto":
            # Per device and layer, all_to_all moves ~T*k*(n-1)/n token rows each way and
            # all_gather/reduce-scatter T*(n-1): equal bytes at k = n (the paper measured the
            # gather faster from top-k > 6 at n = 8).
            dispatch = "all_gather" if m.top_k >= sizes["expert"] > 1 else "all_to_all"
        if cfg.kernel.grouped_gemm == "pallas" and sizes["expert"] * sizes["expert_tensor"] > 1:
            # With expert parallelism the grouped GEMM runs in the ragged all_to_all dispatch.
            need(dispatch == "all_to_all" and p.all_to_all != "padded", "kernel.grouped_gemm",
                 "'pallas' with expert parallelism needs the ragged all_to_all dispatch "
                 "(parallel.dispatch all_to_all, parallel.all_to_all ragged or auto); got "
                 f"dispatch {dispatch!r}, all_to_all {p.all_to_all!r}")
        z = cfg.compression
        if p.collective_matmul != "off":
            rings = sizes["tensor"] > 1 or (p.attention == "tensor" and seq_split > 1)
            need(z.tensor == "none" or not rings, "compression.tensor",
                 "'fp8' sends the tensor-parallel collectives on their own; set "
                 "parallel.collective_matmul to 'off' (its rings send the compute dtype)")
            if dispatch == "all_gather" and m.moe_mode == "dropless":
                for name in ("dispatch", "combine"):
                    need(getattr(z, name) == "none", f"compression.{name}",
                         "'fp8' with the all_gather dispatch needs parallel.collective_matmul "
                         "'off' (its ring sends the compute dtype)")
        vocab = p.vocab
        if vocab == "auto":
            # 12 bytes an entry: FP32 parameter and both Adam moments, per table (one when tied).
            tables = (1 if m.tie_embeddings else 2) * m.vocab_size * m.d_model * 12
            vocab = ("sharded" if seq_split > 1 and m.vocab_size % seq_split == 0
                     and tables >= 2**30 else "replicated")
        if vocab == "sharded":
            need(m.vocab_size % seq_split == 0, "model.vocab_size",
                 f"must be divisible by parallel.sequence x parallel.tensor = {seq_split} for "
                 f"parallel.vocab 'sharded', got {m.vocab_size} (or set parallel.vocab to "
                 "'replicated' or 'auto')")
        return cls(sizes, tuple(mesh_axes), {a: tuple(v) for a, v in axes.items()},
                   p.attention, dispatch, kv, vocab == "sharded")

    # -- groups of mesh axes ------------------------------------------------------------------
    @property
    def seq_axes(self) -> tuple[str, ...]:
        """The attention group: mesh axes the sequence is split over (sequence, then tensor)."""
        return self.axes["sequence"] + self.axes["tensor"]

    @property
    def all_axes(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.mesh_axes)

    # -- partition specs ----------------------------------------------------------------------
    @property
    def tokens(self) -> P:
        """[batch, seq] arrays: batch over ``data``, sequence over the attention group."""
        return P(_entry(self.axes["data"]), _entry(self.seq_axes))

    @property
    def batch(self) -> P:
        """[batch, seq + 1] token windows as fed from the host: split over ``data`` only."""
        return P(_entry(self.axes["data"]))

    @property
    def positions(self) -> P:
        """[seq] global positions, split like the tokens' sequence dimension."""
        return P(_entry(self.seq_axes))

    def param_spec(self, logical: tuple[str | None, ...]) -> P:
        """PartitionSpec of a parameter from its logical axes (see the table above)."""
        tp_attention = self.attention == "tensor"
        group = self.sizes["sequence"] * self.sizes["tensor"]
        rules = {
            "heads": self.seq_axes if tp_attention else (),
            "kv_heads": (self.seq_axes if tp_attention and self.num_kv_heads % group == 0
                         else ()),
            "mlp": self.axes["tensor"],
            "experts": self.axes["expert"],
            "expert_mlp": self.axes["expert_tensor"],
            "vocab": self.seq_axes if self.vocab_sharded else (),
        }
        return P(*(_entry(rules.get(name, ()) if name else ()) for name in logical))

    def describe(self) -> str:
        views = [_product(self.sizes, ATTENTION_VIEW) + f" ({self.attention} attention)",
                 _product(self.sizes, EXPERT_VIEW) + f" ({self.dispatch} dispatch)"]
        return "; ".join(views) + ("; sharded vocabulary" if self.vocab_sharded else "")


def _entry(axes: tuple[str, ...]):
    """A PartitionSpec entry: None for no axes, the name for one, the tuple for several."""
    return None if not axes else axes[0] if len(axes) == 1 else tuple(axes)


def make_mesh(layout: Layout, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds the mesh over ``devices`` (default: all). Axis types are Auto: collectives are
    written by hand inside shard_map, and jit outside it only moves whole arrays."""
    devices = list(jax.devices() if devices is None else devices)
    names = tuple(name for name, _ in layout.mesh_axes)
    shape = tuple(size for _, size in layout.mesh_axes)
    return jax.make_mesh(shape, names, devices=devices, axis_types=(AxisType.Auto,) * len(shape))


def is_gpu(devices_or_mesh) -> bool:
    """Whether the mesh (or device list) is made of GPUs, compile-only ones included: the
    choice of GPU code paths, which ``jax.default_backend()`` gets wrong when compiling for
    GPUs from a CPU machine (msmoe_jax/h100.py)."""
    devs = getattr(devices_or_mesh, "devices", devices_or_mesh)
    first = next(iter(getattr(devs, "flat", devs)))
    return first.platform in ("gpu", "cuda", "rocm")


def sharding(mesh: Mesh, spec: P) -> NamedSharding:
    return NamedSharding(mesh, spec)


def validate_for(cfg: Config, device_count: int) -> Config:
    """``cfg.validate()`` plus the checks that need the device count: ``parallel.devices`` and
    the layout (``Layout.from_config``). Returns ``cfg``."""
    cfg.validate()
    devices = cfg.parallel.devices
    if devices is not None and devices != device_count:
        raise ConfigError(f"parallel.devices: this config is written for {devices} devices but "
                          f"the run has {device_count}; set parallel.devices=null to fit the "
                          "layout to whatever devices there are")
    Layout.from_config(cfg, device_count)
    return cfg
