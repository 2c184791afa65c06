"""The training step's ops, replayed on `memsim.Sim`: what each op allocates and saves.

One function per op of model.py / lora.py / techniques.py, in the same order.
Shapes: b micro-batch, s sequence, C d_model, H/G query/key-value heads, D head
dim, F d_ff, V vocab, r LoRA rank, N = b·s tokens; a = bytes per element of
the tensor's dtype (4 fp32, 2 fp16/bf16). What autograd saves follows
tools/autograd/derivatives.yaml: a product saves the operand the *other*
input's gradient needs, so a frozen weight's matmul saves no input, and a node
is recorded only when some input requires grad.

Per-op saved bytes (all ×a of the tensor that is saved):
- linear y = x·Wᵀ: x (N·d_in) if W trains; W (or its autocast copy) if x needs grad.
- RMSNorm (fp32 inside): x.float() (N·C·4), rsqrt (N·4), x̂ = x·rsqrt (N·C·4) when w trains.
- LayerNorm: x, mean, rstd (N each).
- RoPE: the cos/sin casts (s·D/2·a, four per block when dtypes differ); no activation.
- SDPA: q, k, v, out (N·(H+2G)·D + N·H·D) and the log-sum-exp (b·H·s·4), never the
  b·H·s² scores (CPU: _scaled_dot_product_flash_attention_for_cpu; CUDA: flash /
  memory-efficient; the math fallback -- CUDA fp32 with GQA -- materialises them).
  llama: out.transpose(1, 2).reshape(...) copies (N·H·D, o's saved input) when H > 1;
  in backward the same reshape of q's and k's gradients copies too.
- Python lifetimes count: Attention.forward's q, k, v, y and RMSNorm's x.float(),
  x̂ live until the function returns, the logits until compute_loss returns.
- SwiGLU: gate out, silu out, up out (3·N·F); the product (N·F) when down trains.
  GELU MLP: up out (N·F), gelu out (N·F).
- LoRA per target: its input (or dropout output and the dropout mask, N·d_in each),
  A's output (N·r); under autocast the half copies of A and B.
- loss: the fp32 log-softmax (N·V·4); during the loss also the logits (N·V·a) and
  their fp32 copy (N·V·4); backward adds its gradient twice (nll, log-softmax).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..sim.rules import (bw_add_bcast, bw_cat, bw_embedding, bw_layernorm, bw_linear, bw_log_softmax, bw_loss, bw_math_attn, bw_mul, bw_mul_reduce, bw_new_like_input, bw_pass, bw_pow2, bw_rsqrt, bw_sdpa, bw_split, bw_sub)
from ..sim.engine import BF16, F16, F32, LOGITS, Checkpoint, Param, Sim, T

DT = {"fp32": F32, "bf16": BF16, "fp16": F16}


@dataclass
class Dims:
    """Shapes and switches of one replay (which weights exist is in the params dict)."""
    b: int        # micro-batch (symbolic in replay.py)
    s: int
    C: int
    H: int
    G: int
    D: int
    F: int
    V: int
    style: str    # llama | gpt2
    rank: int
    dropout: float
    ckpt: bool
    device: str   # cpu | cuda: SDPA kernel, autocast op lists
    buf_dt: str   # dtype of the RoPE tables (the base dtype in LoRA cells)


# ---------------------------------------------------------------- forward ops
def linear(sim: Sim, x: T, W: Param, bias: Param | None, d_out: int) -> T:
    """F.linear: autocast casts bias, weight (cached when it trains) and input to the half dtype."""
    d_in = W.t.numel // d_out
    rows = x.numel // d_in
    if sim.autocast:
        bc = sim.cast_weight(bias) if bias else None
        wc = sim.cast_weight(W)
        xc = sim.to(x, sim.autocast)
    else:
        bc = sim.hold(bias.t) if bias else None
        wc, xc = sim.hold(W.t), sim.hold(x)
    n = sim.node([xc, wc, bc], bw_linear)
    if n is not None:
        if wc.rg or (bc is not None and bc.rg):
            sim.save(n, xc)
        if xc.rg:
            sim.save(n, wc)
    y = sim.out(sim.new(rows * d_out, xc.dt), n)
    sim.drop(xc)
    sim.drop(wc)
    sim.drop(bc)
    return y


def elementwise(sim: Sim, x: T, bw, save_input: bool = True, dt: str | None = None) -> T:
    """A one-input elementwise op (silu, gelu, ·const): saves its input when asked."""
    n = sim.node([x], bw)
    if save_input:
        sim.save(n, x)
    return sim.out(sim.new(x.numel, dt or x.dt), n)


def binary(sim: Sim, a: T, b: T, kind: str) -> T:
    """a+b, a-b, a·b of equal shapes (type-promoted output)."""
    bw = {"add": bw_pass, "sub": bw_sub, "mul": bw_mul}[kind]
    n = sim.node([a, b], bw)
    if kind == "mul" and n is not None:
        if b.rg:
            sim.save(n, a)
        if a.rg:
            sim.save(n, b)
    dt = a.dt if a.dt == b.dt else F32
    return sim.out(sim.new(max(a.numel, b.numel), dt), n)


def mul_const(sim: Sim, x: T, c: T) -> T:
    """x·c where c needs no grad (RoPE tables, dropout mask): saves c."""
    n = sim.node([x], bw_new_like_input)
    sim.save(n, c)
    return sim.out(sim.new(x.numel, x.dt), n)


def rmsnorm(sim: Sim, x: T, w: Param, C: int) -> T:
    """RMSNorm in fp32, cast back: xf = x.float(); y = xf·rsqrt(mean(xf²)+eps); (y·w.float()).to(x.dtype)."""
    N = x.numel // C
    xf = sim.to(x, F32)
    n = sim.node([xf], bw_pow2)
    sim.save(n, xf)
    p = sim.out(sim.new(N * C, F32), n)
    m = sim.out(sim.new(N, F32), sim.node([p], bw_new_like_input))  # mean backward: expand(g)/C
    sim.drop(p)
    a = sim.out(sim.new(N, F32), sim.node([m], bw_pass))
    sim.drop(m)
    n = sim.node([a], bw_rsqrt)
    r = sim.out(sim.new(N, F32), n)
    sim.save(n, r)
    sim.drop(a)
    n = sim.node([xf, r], bw_mul_reduce)
    if n is not None:
        if r.rg:
            sim.save(n, xf)
        if xf.rg:
            sim.save(n, r)
    y = sim.out(sim.new(N * C, F32), n)
    sim.drop(r)
    wf = sim.to(w.t, F32)
    n = sim.node([y, wf], bw_mul_reduce)
    if n is not None:
        if wf.rg:
            sim.save(n, y)
        if y.rg:
            sim.save(n, wf)
    z = sim.out(sim.new(N * C, F32), n)
    sim.drop(wf)
    out = sim.to(z, x.dt)
    for t in (z, y, xf):  # locals xf, y live until return
        sim.drop(t)
    return out


def layernorm(sim: Sim, x: T, w: Param, bias: Param, d: Dims) -> T:
    """native_layer_norm: out, mean, rstd; saves x, mean, rstd (and w, b). CUDA autocast runs it in fp32."""
    C = d.C
    N = x.numel // C
    xin = sim.to(x, F32) if (sim.autocast and d.device == "cuda") else sim.hold(x)
    sdt = F32 if w.t.dt == F32 else xin.dt
    n = sim.node([xin, w.t, bias.t], bw_layernorm)
    out = sim.out(sim.new(N * C, xin.dt), n)
    mean, rstd = sim.new(N, sdt), sim.new(N, sdt)
    sim.save(n, xin, mean, rstd)
    sim.drop(mean)
    sim.drop(rstd)
    sim.drop(xin)
    return out


def rope(sim: Sim, x: T, tables: tuple[T, T]) -> T:
    """apply_rope: casts cos/sin to x's dtype, x1·cos - x2·sin, x1·sin + x2·cos, cat (half-size temporaries)."""
    cos, sin = (sim.to(t, x.dt) for t in tables)
    half = x.numel // 2
    n = sim.node([x], bw_split, nout=2)
    x1, x2 = sim.view(x, half), sim.view(x, half)
    if n is not None:
        sim.out(x1, n, 0)
        sim.out(x2, n, 1)
    t1, t2 = mul_const(sim, x1, cos), mul_const(sim, x2, sin)
    a = binary(sim, t1, t2, "sub")
    sim.drop(t1)
    sim.drop(t2)
    t3, t4 = mul_const(sim, x1, sin), mul_const(sim, x2, cos)
    b = binary(sim, t3, t4, "add")
    sim.drop(t3)
    sim.drop(t4)
    n = sim.node([a, b], bw_cat)
    o = sim.out(sim.new(x.numel, x.dt), n)
    for t in (a, b, x1, x2, cos, sin):
        sim.drop(t)
    return o


def sdpa(sim: Sim, q: T, k: T, v: T, d: Dims) -> T:
    """F.scaled_dot_product_attention(is_causal=True): the kernel decides what is saved.

    CPU: _scaled_dot_product_flash_attention_for_cpu (any dtype, GQA native) saves
    q, k, v, out and lse (b·H·s·4). CUDA (untested on hardware here): flash for
    fp16/bf16 with D <= 256 (lse b·H·s·4, GQA native), else memory-efficient
    (lse padded to a multiple of 32 positions), and where that cannot run (GQA)
    the math fallback, which repeats k, v to H heads and keeps the b·H·s² softmax.
    """
    if sim.autocast:
        q2, k2, v2 = sim.to(q, sim.autocast), sim.to(k, sim.autocast), sim.to(v, sim.autocast)
    else:
        q2, k2, v2 = sim.hold(q), sim.hold(k), sim.hold(v)
    cuda = d.device == "cuda"
    flash = not cuda or (q2.dt != F32 and d.D <= 256)  # CPU's kernel, or CUDA flash
    if cuda and not flash and d.G != d.H:  # memory-efficient attention has no GQA: math fallback
        out = _math_attention(sim, q2, k2, v2, d)
    else:
        n = sim.node([q2, k2, v2], bw_sdpa)
        out = sim.out(sim.new(q2.numel, q2.dt), n)
        s_pad = d.s if flash else -(-d.s // 32) * 32  # memory-efficient pads lse to 32 positions
        lse = sim.new(d.b * d.H * s_pad, F32)
        sim.save(n, q2, k2, v2, out, lse)
        sim.drop(lse)
    for t in (q2, k2, v2):
        sim.drop(t)
    return out


def _math_attention(sim: Sim, q: T, k: T, v: T, d: Dims) -> T:
    """CUDA math SDPA (fp32 + GQA): k, v repeated to H heads, scores and softmax b·H·s² materialised."""
    rep = d.H // d.G
    ke, ve = sim.new(k.numel * rep, k.dt), sim.new(v.numel * rep, v.dt)
    n = sim.node([q, k, v], bw_math_attn)
    scores = sim.new(d.b * d.H * d.s * d.s, q.dt)
    probs = sim.new(d.b * d.H * d.s * d.s, q.dt)
    sim.drop(scores)
    out = sim.out(sim.new(q.numel, q.dt), n)
    sim.save(n, q, ke, probs, ve)
    for t in (ke, ve, probs):
        sim.drop(t)
    return out


def project(sim: Sim, x: T, name: str, P: dict, d: Dims, d_out: int) -> T:
    """A projection: nn.Linear, or LoRALinear = base(x) + (B·A·dropout(x))·alpha/r."""
    W, bias = P[name], P.get(name + ".bias")
    y = linear(sim, x, W, bias, d_out)
    if name + ".A" not in P:
        return y
    h = sim.hold(x)
    if d.dropout > 0:  # CPU/CUDA native dropout: a float mask of x's shape, then x·mask
        mask = sim.new(x.numel, x.dt)
        h2 = mul_const(sim, x, mask)
        sim.drop(mask)
        sim.drop(h)
        h = h2
    if not sim.autocast:
        h2 = sim.to(h, F32)
        sim.drop(h)
        h = h2
    a = linear(sim, h, P[name + ".A"], None, d.rank)
    bb = linear(sim, a, P[name + ".B"], None, d_out)
    sim.drop(a)
    l1 = elementwise(sim, bb, bw_new_like_input, save_input=False)  # · alpha/r
    sim.drop(bb)
    l2 = sim.to(l1, y.dt)
    out = binary(sim, y, l2, "add")
    for t in (l2, l1, y, h):  # locals out (y), h, lora live until return
        sim.drop(t)
    return out


def reshape_heads(sim: Sim, t: T, clone_grad: bool) -> T:
    """view(B,T,H,D).transpose(1,2): free in forward; in backward the view of a non-contiguous
    gradient (RoPE's cat output, transposed) is a reshape, i.e. a copy."""
    if not clone_grad or not t.rg:
        return sim.hold(t)
    n = sim.node([t], bw_new_like_input)
    return sim.out(sim.view(t), n)


def attention(sim: Sim, x: T, P: dict, d: Dims, tables) -> T:
    H, G, D = d.H, d.G, d.D
    llama = d.style == "llama"
    q = project(sim, x, "q", P, d, H * D)
    k = project(sim, x, "k", P, d, G * D)
    v = project(sim, x, "v", P, d, G * D)
    # a transpose(1, 2) of (b, heads, s, D) is still contiguous when heads or s is 1
    qh = reshape_heads(sim, q, llama and H > 1 and d.s > 1)
    kh = reshape_heads(sim, k, llama and G > 1 and d.s > 1)
    sim.drop(q)
    sim.drop(k)
    if llama:  # q, k = apply_rope(q), apply_rope(k): the old q, k are released after both
        q2, k2 = rope(sim, qh, tables), rope(sim, kh, tables)
        sim.drop(qh)
        sim.drop(kh)
    else:
        q2, k2 = qh, kh
    y = sdpa(sim, q2, k2, v, d)
    if llama and H > 1 and d.s > 1:  # out is (B,H,T,D)-contiguous: transpose(1,2).reshape copies
        y2 = sim.out(sim.new(y.numel, y.dt), sim.node([y], bw_pass))
        sim.drop(y)
        y = y2
    o = project(sim, y, "o", P, d, d.C)
    for t in (y, q2, k2, v):  # Attention.forward's locals q, k, v, y live until it returns
        sim.drop(t)
    return o


def mlp(sim: Sim, x: T, P: dict, d: Dims) -> T:
    if d.style == "llama":
        g = project(sim, x, "gate", P, d, d.F)
        sg = elementwise(sim, g, bw_new_like_input)
        sim.drop(g)
        u = project(sim, x, "up", P, d, d.F)
        h = binary(sim, sg, u, "mul")
        sim.drop(sg)
        sim.drop(u)
    else:
        u = project(sim, x, "up", P, d, d.F)
        h = elementwise(sim, u, bw_new_like_input)
        sim.drop(u)
    o = project(sim, h, "down", P, d, d.C)
    sim.drop(h)
    return o


def norm(sim: Sim, x: T, P: dict, name: str, d: Dims) -> T:
    if d.style == "llama":
        return rmsnorm(sim, x, P[name], d.C)
    return layernorm(sim, x, P[name], P[name + ".bias"], d)


def block(sim: Sim, x: T, P: dict, d: Dims, tables) -> T:
    """x + attn(norm1(x)), then x + mlp(norm2(x)); a sum of two dtypes is fp32."""
    h = norm(sim, x, P, "norm1", d)
    a = attention(sim, h, P, d, tables)
    sim.drop(h)
    x2 = binary(sim, x, a, "add")
    sim.drop(a)
    h = norm(sim, x2, P, "norm2", d)
    m = mlp(sim, h, P, d)
    sim.drop(h)
    x3 = binary(sim, x2, m, "add")
    sim.drop(m)
    sim.drop(x2)
    return x3


def checkpointed_block(sim: Sim, x: T, P: dict, d: Dims, tables) -> T:
    """torch.utils.checkpoint (non-reentrant): forward saves nothing but keeps the block input."""
    sim.mode, sim.ck_nodes = "discard", []
    out = block(sim, x, P, d, tables)
    nodes, sim.mode = sim.ck_nodes, "normal"
    if nodes:
        ck = Checkpoint(nodes, lambda: block(sim, x, P, d, tables))
        for n in nodes:
            n.ck = ck
        nodes[0].saved.append(sim.hold(x))  # the frame keeps the inputs until the block's backward ends
    return out


def forward_loss(sim: Sim, params: dict, d: Dims, n_blocks: int, tables) -> T:
    """compute_loss(model, x, y) / accumulation: embeddings, blocks, final norm, head, fp32 CE."""
    N = d.b * d.s
    sim.set_owner(None)
    tok = params["tok_emb"]
    n = sim.node([tok.t], bw_embedding)
    x = sim.out(sim.new(N * d.C, tok.t.dt), n)
    if d.style == "gpt2":
        pos_w = params["pos_emb"]
        pos = sim.new(d.s, "i64")
        n = sim.node([pos_w.t], bw_embedding)
        sim.save(n, pos)
        pe = sim.out(sim.new(d.s * d.C, pos_w.t.dt), n)
        sim.drop(pos)
        n = sim.node([x, pe], bw_add_bcast)
        x2 = sim.out(sim.new(N * d.C, x.dt if x.dt == pe.dt else F32), n)
        sim.drop(x)
        sim.drop(pe)
        x = x2
    for i in range(n_blocks):
        sim.set_owner(i)
        P = params["blocks"][i]
        xn = checkpointed_block(sim, x, P, d, tables) if d.ckpt else block(sim, x, P, d, tables)
        sim.drop(x)
        x = xn
    sim.set_owner(None)
    h = norm(sim, x, params, "norm_f", d)
    cat, sim.cat_alloc = sim.cat_alloc, LOGITS
    logits = linear(sim, h, params["head"], None, d.V)
    sim.drop(h)
    sim.drop(x)  # Transformer.forward's x lives until it returns
    lf = sim.to(logits, F32)
    n = sim.node([lf], bw_log_softmax)
    lsm = sim.out(sim.new(N * d.V, F32), n)
    sim.save(n, lsm)
    n = sim.node([lsm], bw_loss)  # nll_loss_forward: (loss, total_weight); saves lsm and total_weight
    loss = sim.out(sim.new(1, F32), n)
    total_weight = sim.new(1, F32)
    sim.save(n, lsm, total_weight)
    for t in (total_weight, lsm, lf):  # cross_entropy's argument lf lives until it returns
        sim.drop(t)
    sim.clear_cache()  # autocast region ends with compute_loss
    sim.drop(logits)
    sim.cat_alloc = cat
    out = sim.out(sim.new(1, F32), sim.node([loss], bw_new_like_input))  # loss / accumulation
    sim.drop(loss)
    return out
