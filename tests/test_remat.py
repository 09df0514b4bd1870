"""Rematerialisation policies: same gradients, less stored activation memory."""

import pytest

from equality import MODEL, check_against_reference

pytestmark = pytest.mark.slow  # whole trainings or many compiles (-m 'not slow' skips)

# The default config's kind of layout; three MoE layers and 32 tokens per device so stored
# activations matter next to XLA:CPU's transient buffers (at smaller sizes, or with longer
# sequences, the CPU compiler's peak is set by transients and the order is noise).
LAYOUT = {"data": 2, "sequence": 4, "expert_data": 1, "expert": 8,
          "dispatch": "all_to_all", "all_to_all": "padded", "buffer_factor": 4.0}


def test_remat_policies_same_gradients_and_decreasing_memory():
    temp, a2a = {}, {}
    for policy in ("none", "selective", "full"):
        compiled = check_against_reference(
            LAYOUT, {**MODEL, "num_layers": 3, "num_dense_layers": 0},
            train={"remat": policy, "seq_len": 128})
        temp[policy] = compiled.memory_analysis().temp_size_in_bytes
        hlo = compiled.as_text()
        a2a[policy] = hlo.count(" all-to-all(")
    assert a2a["selective"] == a2a["none"], a2a  # the dispatch all_to_alls are stored, not redone
    assert temp["none"] > temp["selective"] > temp["full"], temp
