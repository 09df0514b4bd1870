"""Overlap schedules (collective matmuls, chunked pipelines) against the single-device
reference: loss, metrics and every parameter's gradient (fp32, random data, 8 devices)."""

import re

import pytest

from equality import A2A, AG, MODEL, RAGGED, check_against_reference
from support import assert_chunks_independent

pytestmark = pytest.mark.slow  # whole trainings or many compiles (-m 'not slow' skips)

RING, BIDIR = {"collective_matmul": "ring"}, {"collective_matmul": "bidirectional"}
SCHEDULES = {
    # Megatron TP attention and FFNs + all_gather experts, all as ppermute rings.
    "tp4xdata2-tpattn-ep4xed2-gather-ring": (
        {"data": 2, "tensor": 4, "attention": "tensor", "expert_data": 2, "expert": 4, **AG,
         **RING}, {}),
    # Expert tensor parallelism: the experts' ring runs over expert_tensor devices.
    "tp8-tpattn-etp8-gather-bidirectional": (
        {"data": 1, "tensor": 8, "attention": "tensor", "expert_data": 1, "expert_tensor": 8,
         **AG, **BIDIR}, {}),
    "seq4xdata2-ep8-gather-bidirectional": (
        {"data": 2, "sequence": 4, "expert_data": 1, "expert": 8, **AG, **BIDIR}, {}),
    # Chunked pipelines: Ulysses head groups and MoE token chunks with the custom backward.
    "seq4xdata2-ep8-a2a-chunks2": (
        {"data": 2, "sequence": 4, "expert_data": 1, "expert": 8, **A2A, "chunks": 2}, {}),
    "seq2xdata2xtp2-ep4xetp2-a2a-chunks4": (
        {"data": 2, "sequence": 2, "tensor": 2, "expert_data": 1, "expert": 4,
         "expert_tensor": 2, **A2A, "chunks": 4}, {"num_heads": 16}),
    "seq4xdata2-ep8-ragged-chunks2": (
        # Chunks of half the tokens overflow 2x buffers on these random batches.
        {"data": 2, "sequence": 4, "expert_data": 1, "expert": 8, **RAGGED, "chunks": 2,
         "buffer_factor": 4.0}, {}),
    "seq4xdata2-ep4xed2-gather-chunks2": (
        {"data": 2, "sequence": 4, "expert_data": 2, "expert": 4, **AG, "chunks": 2}, {}),
}


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_schedule_matches_single_device(name):
    parallel, model = SCHEDULES[name]
    compiled = check_against_reference(parallel, {**MODEL, **model})
    if parallel.get("collective_matmul", "off") != "off":
        # Every float all_gather and reduce-scatter became ppermute ring steps (only the
        # positions' int all_gather is left).
        hlo = compiled.as_text()
        assert "collective-permute" in hlo
        left = re.findall(r"= (\S+) (?:all-gather|reduce-scatter)(?:-start)?\(", hlo)
        assert all(shape.startswith("s32") for shape in left), left
    if parallel.get("chunks", 1) > 1:
        assert_chunks_independent(compiled.as_text(), parallel["chunks"])


