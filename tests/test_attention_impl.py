"""The attention core's implementations: "xla" (the CPU reference, unchanged) and "cudnn" (cuDNN
flash attention), the latter compiled for H100 without a GPU: a fused cuDNN custom call forward
and backward, and no [s, s] score buffer, where the XLA program has one."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from msmoe_jax import h100
from msmoe_jax.model.layers import causal_attention
from msmoe_jax.parallel.attention import ulysses_attention

B, S, H, KV, HD = 2, 1024, 8, 2, 64
FWD, BWD = "__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward"


def qkv(key=0, dtype=jnp.float32, s=16, h=4, kv=2, hd=8):
    kq, kk, kvv = jax.random.split(jax.random.key(key), 3)
    return (jax.random.normal(kq, (2, s, h, hd), dtype),
            jax.random.normal(kk, (2, s, kv, hd), dtype),
            jax.random.normal(kvv, (2, s, kv, hd), dtype))


def test_xla_is_the_plain_dot_product_attention():
    q, k, v = qkv()
    want = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    np.testing.assert_array_equal(causal_attention(q, k, v), want)
    np.testing.assert_array_equal(causal_attention(q, k, v, "xla"), want)


def test_unknown_implementation_names_the_setting():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="kernel.attention"):
        causal_attention(q, k, v, "flash")
    with pytest.raises(ValueError, match="kernel.attention"):
        ulysses_attention((), 1, 1, "flash")(q, k, v)


# --- compiled for H100 (no GPU needed) -------------------------------------------------------

needs_plugin = pytest.mark.skipif(not h100.available(), reason=h100.INSTALL_HINT)


@pytest.fixture
def for_h100():
    with h100.compile_only():
        yield


def compiled_text(fn, mesh: Mesh, spec: P) -> str:
    """HLO of jit(value_and_grad(sum of fn(q, k, v))) for bf16 q [B, S, H, HD], k/v with KV
    heads, laid out as ``spec`` on ``mesh``."""
    sharding = NamedSharding(mesh, spec)
    arg = lambda heads: jax.ShapeDtypeStruct((B, S, heads, HD), jnp.bfloat16, sharding=sharding)
    loss = lambda q, k, v: fn(q, k, v).astype(jnp.float32).sum()
    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    return step.lower(arg(H), arg(KV), arg(KV)).compile().as_text()


def score_buffers(text: str, heads: int) -> list[str]:
    """Shapes in ``text`` with at least b x heads x s x s elements: an attention score matrix,
    in any dtype or layout (XLA's GQA path holds it as [b, kv, h/kv, s, s], or reshaped)."""
    shapes = re.findall(r"\b(?:bf16|f16|f32|pred|s32)\[[\d,]+\]", text)
    size = lambda shape: int(np.prod([int(d) for d in re.findall(r"\d+", shape.split("[")[1])]))
    return sorted({s for s in shapes if size(s) >= B * heads * S * S})


def assert_flash(text: str, heads: int):
    assert FWD in text and BWD in text, set(re.findall(r"__cudnn\$\w+", text))
    assert not re.search(rf"\[{B},{heads},{S},{S}\]", text)
    assert not score_buffers(text, heads), score_buffers(text, heads)


@needs_plugin
def test_cudnn_compiles_to_fused_attention_without_scores(for_h100):
    mesh = Mesh(np.array(h100.devices(1)), ("d",))
    text = compiled_text(lambda q, k, v: causal_attention(q, k, v, "cudnn"), mesh, P())
    assert_flash(text, H)
    # Control: the XLA path holds the scores (so the assertions above can fail).
    xla = compiled_text(lambda q, k, v: causal_attention(q, k, v, "xla"), mesh, P())
    assert FWD not in xla and score_buffers(xla, H)


@needs_plugin
def test_ulysses_cudnn_compiles_to_fused_attention_without_scores(for_h100):
    """Under shard_map over 4 H100s: full sequences, 2 query heads (and the 2 KV heads
    repeated to 1 each) per device."""
    n = 4
    mesh = Mesh(np.array(h100.devices(n)), ("sequence",))
    spec = P(None, "sequence")
    core = ulysses_attention(("sequence",), n, 1, "cudnn")
    fn = jax.shard_map(core, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec)
    text = compiled_text(fn, mesh, spec)
    assert_flash(text, H // n)
    assert "all-to-all" in text
