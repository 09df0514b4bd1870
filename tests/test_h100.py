"""The program an H100 cluster would run, compiled here without a GPU (msmoe_jax/h100.py): every
shipped config compiles for H100 (the CI gate), the GPU paths are the ones chosen, and the
ragged exchange's backward sums nothing across devices."""

from pathlib import Path

import jax
import pytest

from msmoe_jax import h100
from msmoe_jax.config import load_config
from msmoe_jax.parallel.comm_bytes import collectives
from msmoe_jax.parallel.mesh import is_gpu, validate_for
from msmoe_jax.steptime.hlo import parse
from msmoe_jax.steptime.report import analyse, expert_recompute
from support import ROOT, tiny_config

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not h100.available(), reason=h100.INSTALL_HINT)]

CONFIGS = sorted(p.name for p in (ROOT / "configs").glob("*.yaml"))
# The gate compiles one block of each kind (a dense one where the config has them, then an MoE
# one) at the real widths, layout and device count.


def gate_config(name: str, **overrides):
    """The config at its device count. Cluster configs compile without the GPU overlap flags
    (3x faster here: 60 s instead of 190 s for the 352B config's block on 512 GPUs); the
    8-GPU configs keep them, so the flags' passes are compiled too."""
    cfg = load_config(ROOT / "configs" / name, [f"{k}={v}" for k, v in overrides.items()])
    n = cfg.parallel.devices or 8
    if n > 8:
        cfg.run.gpu_overlap_flags = False
    return validate_for(cfg, n), n


@pytest.mark.parametrize("name", CONFIGS)
def test_every_shipped_config_compiles_for_h100(name):
    cfg, n = gate_config(name)
    layers = min(cfg.model.num_layers, 1 + (cfg.model.num_dense_layers > 0))
    compiled = h100.compile_step(cfg, n, layers=layers)
    assert compiled.memory.peak > compiled.memory.arguments > 0
    entry, _ = parse(compiled.text)
    assert entry, "no program"
    if n > 1:  # the expert exchange is in the program, under its scope
        assert any(c.scope == "moe_dispatch" for c in collectives(compiled.text, n))
    # Only routed rows are multiplied: the experts' executed FLOPs (the Pallas kernels'
    # modelled at balanced routing) stay within 1.15x of the routed rows' FLOPs plus the
    # recompute the config's remat asks for.
    r = analyse(h100.with_layers(cfg, layers), n, {layers: compiled.text})
    planned = r.useful["experts"] * (1 + expert_recompute(cfg))
    assert r.executed["experts"] <= 1.15 * planned, (r.executed["experts"] / planned)


@pytest.mark.parametrize("name", ["default.yaml", "h100_single.yaml"])
def test_shipped_configs_compile_with_the_pallas_kernel(name):
    """The Pallas grouped GEMM compiles to Triton kernels (PTX) for Hopper, forward and
    backward, under expert parallelism (default) and on one GPU (h100_single)."""
    cfg, n = gate_config(name, **{"kernel.grouped_gemm": "pallas"})
    compiled = h100.compile_step(cfg, n, layers=1 + (cfg.model.num_dense_layers > 0))
    assert "__gpu$xla.gpu.triton" in compiled.text


def test_gpu_paths_are_chosen_from_the_mesh():
    """Compiling for H100 from a CPU machine (default backend "cpu") still takes the GPU
    paths: the ragged all_to_all dispatch, as async starts."""
    cfg = tiny_config(parallel={"expert_data": 1, "expert": 8, "dispatch": "all_to_all",
                                "all_to_all": "auto"},
                      model={"dtype": "bfloat16", "num_experts": 8})
    text = h100.compile_step(cfg, 8).text
    assert "ragged-all-to-all-start" in text
    assert is_gpu(h100.devices(8)) and not is_gpu(jax.devices())


def test_ragged_exchange_backward_sums_nothing_across_devices():
    """The ragged exchange lands in a buffer typed varying, so the backward holds no
    all-reduce in the expert path (an invariant buffer gave bf16 all-reduces of the received
    rows' cotangents over all devices, one per exchange)."""
    cfg = tiny_config(parallel={"data": 2, "sequence": 4, "attention": "ulysses",
                                "expert_data": 1, "expert": 8, "dispatch": "all_to_all",
                                "all_to_all": "ragged"},
                      model={"dtype": "bfloat16", "num_experts": 8})
    text = h100.compile_step(cfg, 8).text
    found = collectives(text, 8)
    assert any(c.op == "ragged-all-to-all" for c in found)
    in_experts = [c for c in found if c.op == "all-reduce" and c.scope == "moe_dispatch"]
    assert not in_experts, in_experts


def test_memory_extrapolates_linearly_in_layers():
    """The method for unrolled configs too deep to compile: 2 and 4 layers predict 6 within
    4% (3.0% off for the peak since the layers' parameters are stacked)."""
    deep = {"num_layers": 60, "num_dense_layers": 3}
    assert h100.depths(tiny_config(model=deep)) == (60,)  # scanned: compiled whole
    assert h100.depths(tiny_config(model=deep, train={"scan_layers": False})) == (5, 7)
    cfg = tiny_config(model={"num_layers": 6, "num_dense_layers": 1, "d_model": 256,
                             "moe_d_ff": 256, "d_ff": 512, "dtype": "bfloat16"},
                      train={"seq_len": 256, "scan_layers": False})
    two, four, six = (h100.compile_step(cfg, 8, layers=n) for n in (2, 4, 6))
    predicted = h100.extrapolate(two, four, 6)
    assert predicted.peak == pytest.approx(six.memory.peak, rel=0.04)
    assert predicted.arguments == pytest.approx(six.memory.arguments, rel=0.04)


def test_plan_compile_cli(capsys):
    from msmoe_jax import plan

    assert plan.main(["--config", str(ROOT / "configs" / "default.yaml"), "--compile"]) == 0
    out = capsys.readouterr().out
    assert "H100 program per device (compiled with 4 layers)" in out
    assert "peak (compiled)" in out and "fits in" in out


def test_steptime_cli_reads_the_h100_program(capsys):
    from msmoe_jax.steptime.__main__ import main

    assert main(["--config", str(ROOT / "configs" / "default.yaml")]) == 0
    out = capsys.readouterr().out
    assert "read from: H100 program compiled for 8 GPUs" in out
    assert "experts" in out and "expert exchange" in out and "MFU" in out


def test_missing_plugin_is_a_clear_error(monkeypatch):
    from jax.experimental import topologies

    def absent(**_):
        raise NotImplementedError("topology not implemented for cuda")

    monkeypatch.setattr(topologies, "get_topology_desc", absent)
    with pytest.raises(h100.PluginMissing, match=r"\.\[h100-compile\]"):
        h100.devices(8)
    assert not h100.available()


def test_target_description_ships_with_the_package():
    assert h100.TARGET.is_file() and Path(h100.TARGET).suffix == ".txtpb"
    assert h100.memory_capacity() == 84942979072


def test_chunked_ragged_pipeline_compiles_for_h100():
    """The chunked pipeline runs the ragged exchange and the Pallas kernel on GPU: in the H100
    program no collective of chunk 1's dispatch (forward or backward) waits for chunk 0's
    expert GEMMs, and the exchanges are async start/done pairs."""
    from support import assert_chunks_independent

    cfg = tiny_config(parallel={"expert_data": 1, "expert": 8, "dispatch": "all_to_all",
                                "chunks": 2},
                      model={"dtype": "bfloat16", "num_experts": 8, "num_layers": 1},
                      train={"seq_len": 128})  # one MoE layer: chunk names are per layer
    text = h100.compile_step(cfg, 8).text
    assert "ragged-all-to-all-start" in text and "__gpu$xla.gpu.triton" in text
    assert_chunks_independent(text, 2)


@pytest.mark.parametrize("wire", ["none", "fp8"])
def test_expert_exchange_sends_each_routed_row_once(wire):
    """Megatron's order with expert_tensor > 1: each device sends its own routed rows over
    ``expert`` once (forward and backward, there and back), and the gather/scatter over the
    expert_tensor devices inside the node is counted apart (scope ``expert_tensor``)."""
    from msmoe_jax.parallel.comm_bytes import by_scope
    from msmoe_jax.steptime.report import routed_row_bytes

    cfg = tiny_config(parallel={"expert_data": 1, "expert": 4, "expert_tensor": 2,
                                "dispatch": "all_to_all"},
                      model={"dtype": "bfloat16", "num_experts": 8, "num_layers": 1},
                      train={"seq_len": 128},
                      compression={"dispatch": wire, "combine": wire})
    moved = by_scope(collectives(h100.compile_step(cfg, 8).text, 8))
    routed = routed_row_bytes(cfg, 8)
    assert routed <= moved["moe_dispatch"] <= 1.1 * routed, moved["moe_dispatch"] / routed
    assert moved["expert_tensor"] > 0
