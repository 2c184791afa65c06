"""The transformer: shapes, causality, GQA, gpt2 style, head checks, parameter count."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from lorabench.spec.config import ModelConfig
from lorabench.stacks.transformer import RMSNorm, Transformer, count_params
from lorabench.spec.schema import FieldError


def cfg(**kw) -> ModelConfig:
    base = dict(d_model=16, n_layers=2, n_heads=4, d_ff=24, vocab_size=32, seq_len=8)
    return ModelConfig(**{**base, **kw})


def idx(c: ModelConfig, batch=3, seed=0):
    return torch.randint(0, c.vocab_size, (batch, c.seq_len), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("style", ["llama", "gpt2"])
@pytest.mark.parametrize("T", [8, 5, 1])
def test_logits_shape(style, T):
    c = cfg(style=style)
    torch.manual_seed(0)
    m = Transformer(c)
    logits = m(idx(c)[:, :T])
    assert logits.shape == (3, T, c.vocab_size)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


@pytest.mark.parametrize("style, kv", [("llama", None), ("llama", 2), ("llama", 1), ("gpt2", None)])
def test_causal_future_tokens_do_not_change_earlier_logits(style, kv):
    c = cfg(style=style, n_kv_heads=kv)
    torch.manual_seed(0)
    m = Transformer(c).eval()
    x = idx(c)
    x2 = x.clone()
    x2[:, 5] = (x2[:, 5] + 1) % c.vocab_size
    with torch.no_grad():
        a, b = m(x), m(x2)
    torch.testing.assert_close(a[:, :5], b[:, :5], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, 5:], b[:, 5:], atol=1e-6)  # the changed position and later ones do change


@pytest.mark.parametrize("style", ["llama", "gpt2"])
def test_checkpointing_flag_does_not_change_the_output(style):
    c = cfg(style=style)
    torch.manual_seed(0)
    m = Transformer(c)
    x = idx(c)
    a = m(x)
    m.checkpointing = True
    b = m(x)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_gqa_shapes_and_equivalence_to_repeated_kv_heads():
    """GQA with G kv heads equals MHA whose k/v weights repeat each kv head for its H/G query heads."""
    H, G = 4, 2
    c_gqa = cfg(n_heads=H, n_kv_heads=G)
    c_mha = cfg(n_heads=H, n_kv_heads=H)
    D, C = c_gqa.head_dim, c_gqa.d_model
    torch.manual_seed(0)
    gqa = Transformer(c_gqa)
    attn = gqa.blocks[0].attn
    assert attn.q.weight.shape == (H * D, C)
    assert attn.k.weight.shape == (G * D, C) and attn.v.weight.shape == (G * D, C)
    mha = Transformer(c_mha)
    sd = gqa.state_dict()
    for k, v in list(sd.items()):
        if k.endswith(("attn.k.weight", "attn.v.weight")):
            sd[k] = v.view(G, D, C).repeat_interleave(H // G, dim=0).reshape(H * D, C)
    mha.load_state_dict(sd)
    x = idx(c_gqa)
    with torch.no_grad():
        torch.testing.assert_close(gqa(x), mha(x), rtol=1e-5, atol=1e-5)
    assert count_params(gqa)[0] < count_params(mha)[0]


def test_gpt2_style_ties_embeddings_and_learns_positions():
    c = cfg(style="gpt2", max_seq_len=12)
    assert c.tie_embeddings and c.bias and c.qkv_bias
    torch.manual_seed(0)
    m = Transformer(c)
    assert m.head.weight is m.tok_emb.weight
    assert isinstance(m.pos_emb, nn.Embedding) and m.pos_emb.weight.shape == (12, c.d_model)
    assert isinstance(m.norm_f, nn.LayerNorm)
    assert m.blocks[0].attn.q.bias is not None and m.blocks[0].mlp.down.bias is not None
    assert not hasattr(m.blocks[0].mlp, "gate")
    assert not hasattr(m, "rope_cos")
    # positions matter: the same token at two positions gets different logits
    x = torch.full((1, 4), 3)
    with torch.no_grad():
        out = m(x)
    assert not torch.allclose(out[0, 0], out[0, 1])


def test_llama_style_unties_and_uses_rope():
    c = cfg()
    assert not c.tie_embeddings and not c.bias
    torch.manual_seed(0)
    m = Transformer(c)
    assert m.head.weight is not m.tok_emb.weight
    assert m.pos_emb is None
    assert isinstance(m.norm_f, RMSNorm)
    assert m.blocks[0].attn.q.bias is None and hasattr(m.blocks[0].mlp, "gate")
    assert m.rope_cos.shape == (c.max_seq_len, c.head_dim // 2)
    # RoPE is a rotation: it preserves the norm of each head vector
    from lorabench.stacks.transformer import apply_rope
    q = torch.randn(1, 2, c.seq_len, c.head_dim)
    r = apply_rope(q, m.rope_cos[: c.seq_len], m.rope_sin[: c.seq_len])
    torch.testing.assert_close(r.norm(dim=-1), q.norm(dim=-1))
    torch.testing.assert_close(r[:, :, 0], q[:, :, 0])  # position 0: angle 0


def test_untied_gpt2_and_qkv_bias_overrides():
    c = cfg(style="gpt2", tie_embeddings=False)
    m = Transformer(c)
    assert m.head.weight is not m.tok_emb.weight
    c2 = cfg(qkv_bias=True)  # Qwen2: biases on q, k, v only
    m2 = Transformer(c2)
    a = m2.blocks[0].attn
    assert a.q.bias is not None and a.k.bias is not None and a.v.bias is not None and a.o.bias is None


@pytest.mark.parametrize("kw, key", [
    (dict(d_model=16, n_heads=3), "n_heads"),
    (dict(d_model=18, n_heads=4), "n_heads"),
    (dict(n_heads=4, n_kv_heads=3), "n_kv_heads"),
    (dict(n_heads=4, n_kv_heads=8), "n_kv_heads"),
    (dict(seq_len=16, max_seq_len=8), "seq_len"),
])
def test_head_and_length_checks(kw, key):
    with pytest.raises(FieldError) as e:
        cfg(**kw)
    assert e.value.key == key


def test_kv_heads_default_to_n_heads():
    c = cfg(n_heads=4)
    assert c.n_kv_heads == 4 and c.head_dim == 4


def test_count_params_matches_hand_formula_llama():
    V, C, L, H, G, F = 32, 16, 2, 4, 2, 24
    c = cfg(vocab_size=V, d_model=C, n_layers=L, n_heads=H, n_kv_heads=G, d_ff=F)
    D = C // H
    per_layer = (C + C * H * D + 2 * C * G * D + H * D * C) + (C + 3 * C * F)
    expected = V * C + L * per_layer + C + V * C  # embedding, blocks, final norm, untied head
    assert expected == 512 + 2 * (16 + 256 + 256 + 256 + 16 + 1152) + 16 + 512
    m = Transformer(c)
    assert count_params(m) == (expected, expected)
    assert sum(p.numel() for p in m.parameters()) == expected


def test_count_params_matches_hand_formula_gpt2_tied():
    V, C, L, F, T = 32, 16, 2, 24, 8
    c = cfg(style="gpt2", vocab_size=V, d_model=C, n_layers=L, n_heads=4, d_ff=F, seq_len=T)
    per_layer = 2 * C + 4 * (C * C + C) + 2 * C + (C * F + F) + (F * C + C)
    expected = V * C + T * C + L * per_layer + 2 * C  # head tied: counted once
    m = Transformer(c)
    assert count_params(m) == (expected, expected)


def test_count_params_counts_frozen_separately():
    m = Transformer(cfg())
    total, _ = count_params(m)
    m.tok_emb.weight.requires_grad_(False)
    assert count_params(m) == (total, total - 32 * 16)


def test_gpt2_init_normal_002_and_zero_biases():
    """Stated init: every Linear and Embedding weight ~ N(0, 0.02), biases 0, norm weights 1."""
    c = ModelConfig(style="gpt2", d_model=128, n_layers=2, n_heads=4, d_ff=512, vocab_size=512, seq_len=16)
    torch.manual_seed(0)
    m = Transformer(c)
    for name, mod in m.named_modules():
        if isinstance(mod, (nn.Linear, nn.Embedding)):
            w = mod.weight.detach()
            assert abs(w.mean().item()) < 0.002, name
            assert w.std().item() == pytest.approx(0.02, rel=0.05), name
            if getattr(mod, "bias", None) is not None:
                assert torch.count_nonzero(mod.bias) == 0, name
        elif isinstance(mod, (nn.LayerNorm, RMSNorm)):
            assert torch.equal(mod.weight, torch.ones_like(mod.weight)), name


def test_rope_tables_follow_the_formula():
    """angle(t, i) = t · theta^(-2i/D): position 0 is no rotation; the first pair turns by 1 rad per position,
    the last pair by theta^(-(D-2)/D)."""
    from lorabench.stacks.transformer import rope_tables
    c = cfg(n_heads=2, rope_theta=10000.0)  # head_dim 8
    cos, sin = rope_tables(c)
    D = c.head_dim
    assert torch.equal(cos[0], torch.ones(D // 2)) and torch.equal(sin[0], torch.zeros(D // 2))
    t = 5
    for i in range(D // 2):
        angle = t * 10000.0 ** (-2 * i / D)
        assert cos[t, i].item() == pytest.approx(math.cos(angle), abs=1e-6)
        assert sin[t, i].item() == pytest.approx(math.sin(angle), abs=1e-6)
