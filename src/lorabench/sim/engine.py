"""Symbolic tensor lifetimes: a miniature autograd that moves byte counts, not data.

The estimator (estimator.py) does not fit a formula to measurements: it walks the
same ops the training step runs (memops.py), and this module keeps, for each
symbolic tensor, its size in bytes and who holds it, exactly as PyTorch does:

- a storage lives while a Python-level name, an autograd node's saved tensors,
  the autocast weight cache or a backward input buffer holds it (a reference
  count per storage);
- `Node`s are recorded in creation order (autograd's sequence number) and the
  backward `run_backward` follows PyTorch's engine: the ready node with the
  highest sequence number runs first, AccumulateGrad nodes before all others; a
  node's input gradients are freed when it returns, then its saved tensors, then
  its outputs are summed into the next nodes' input buffers (out of place: a sum
  of two buffers briefly holds three); a gradient whose dtype differs from the
  input's metadata is cast (validate_outputs); AccumulateGrad steals the first
  gradient of a parameter (no copy) and adds later ones in place.
- checkpointed blocks save nothing in forward (the saved-tensor hooks store
  placeholders); the first unpack in backward recomputes the block, holding the
  recomputed saved tensors, and stops early once the last one is produced
  (torch.utils.checkpoint's non-reentrant early stop).

Bytes only: no tensor is ever created. Only what differs from a constant term
is simulated (activations, casts, logits, backward buffers, gradients); the
constant terms (parameters, buffers, batches, optimizer state) are added by
the estimator.

Depth without cost: blocks 1 .. L-2 of a decoder are the same ops on the same
shapes, so the simulation runs three blocks and treats block 1 as `rep`
representing L-2 identical blocks. While block 1's ops run (its forward or its
backward: a "window"), the other L-3 copies are either all before or all after
that point, so the live bytes there are the simulated bytes plus 0 or (L-3)·Δ,
whichever is larger (Δ = the window's net bytes). Outside the window the copies
are all in the same state: their net bytes are carried in `extra`; a storage
made by block 1 and freed outside any block (the autocast cache at the end of
the forward) is freed by every copy at once.

No maximum is taken during the replay: the local maxima of the live bytes are
recorded as events (`commit`), and `lines` turns them into candidate peaks,
each an affine function of the micro-batch when the replay ran with a symbolic
micro-batch (replay.py), in two readings: the first micro-batch of a step, and
a later one (every .grad already allocated, AccumulateGrad adding in place).
"""
from __future__ import annotations

import heapq

F32, BF16, F16, I64 = "fp32", "bf16", "fp16", "i64"
ISZ = {F32: 4, BF16: 2, F16: 2, I64: 8}
INF = float("inf")

# Categories of live bytes, reported at the peak (estimator breakdown).
CATS = ("activations", "autocast_weight_copies", "logits_loss", "backward_buffers",
        "grads", "recompute")
ACT, WCAST, LOGITS, BWD, GRAD, RECOMP = range(len(CATS))


def promote(a: str, b: str) -> str:
    """Type promotion of two float dtypes: equal stays, anything else is fp32 (fp16+bf16 too)."""
    return a if a == b else F32


class Buf:
    """A storage: bytes, reference count, category, owning block."""
    __slots__ = ("nb", "rc", "cat", "own")

    def __init__(self, nb, cat, own):
        self.nb, self.rc, self.cat, self.own = nb, 1, cat, own


class T:
    """A symbolic tensor: a view of a storage with numel, dtype, and autograd metadata."""
    __slots__ = ("buf", "numel", "dt", "rg", "fn", "pos")

    def __init__(self, buf, numel, dt, rg=False, fn=None, pos=0):
        self.buf, self.numel, self.dt, self.rg, self.fn, self.pos = buf, numel, dt, rg, fn, pos

    @property
    def nbytes(self) -> int:
        return self.numel * ISZ[self.dt]


class Node:
    """An autograd node: edges to the producers of its inputs, saved tensors, a backward rule."""
    __slots__ = ("seq", "edges", "saved", "bw", "blk", "deps", "ibuf", "nsave", "ck")

    def __init__(self, seq, edges, bw, blk, nout=1):
        self.seq, self.edges, self.bw, self.blk = seq, edges, bw, blk
        self.saved, self.deps, self.ibuf, self.nsave, self.ck = [], 0, [None] * nout, 0, None


class Param:
    """A parameter: its (memoryless) tensor, its AccumulateGrad node, its .grad."""
    __slots__ = ("t", "acc", "grad", "blk")

    def __init__(self, sim, numel, dt, trainable, blk):
        self.t = T(Buf(0, ACT, None), numel, dt, trainable)
        self.t.buf.rc = 1 << 40  # never freed
        self.grad, self.blk = None, blk
        self.acc = None
        if trainable:
            self.acc = Node(INF, [], None, blk)
            self.acc.ck = self
            self.t.fn = self.acc


class Sim:
    """Live-byte bookkeeping, phase events, block windows, checkpoint recompute."""

    def __init__(self, n_layers: int, autocast: str | None):
        self.n_extra = max(n_layers - 3, 0)      # copies of block 1 beyond the one simulated
        self.rep = 1 if n_layers > 3 else -2     # the block that stands for L-2 copies
        self.cats = [0] * len(CATS)
        self.cur = 0
        self.extra = [0] * len(CATS)             # net bytes of the unsimulated copies
        self.extra_t = tuple(self.extra)
        self.phase = "forward"
        # Local maxima of the live bytes: (phase, window, cur, cats, extra). Sizes may be
        # symbolic (the micro-batch as a huge integer K, see `lines`), so no maximum is
        # taken here.
        self.events: list[tuple] = []
        self.pending = False
        self.windows: list[list] = []            # [cats at start, n·Δ at end]
        self.win_id = -1
        self.owner = None                        # block whose ops are running (None: outside blocks)
        self.seq = 0
        self.autocast = autocast                 # half dtype under autocast, else None
        self.cache: dict[int, T] = {}            # autocast weight cache (id(param) -> cast)
        self.mode = "normal"                     # normal | discard (checkpointed forward) | recompute
        self.ck_nodes: list[Node] = []           # nodes of the checkpointed block being recorded
        self.recompute_q = None
        self.remaining = 0
        self.dead = False
        self.cat_alloc = ACT

    # ---- bytes ----
    def new(self, numel: int, dt: str, cat: int | None = None) -> T:
        if self.dead:
            return T(Buf(0, ACT, None), numel, dt)
        if cat is None:
            cat = self.cat_alloc
        nb = numel * ISZ[dt]
        self.cur += nb
        self.cats[cat] += nb
        self.pending = True
        return T(Buf(nb, cat, self.owner), numel, dt)

    def hold(self, t: T) -> T:
        t.buf.rc += 1
        return t

    def drop(self, t: T | None) -> None:
        if t is None:
            return
        b = t.buf
        b.rc -= 1
        if b.rc == 0 and b.nb:
            if self.pending:
                self.commit()
            self.cur -= b.nb
            self.cats[b.cat] -= b.nb
            if b.own == self.rep and self.owner is None and self.n_extra:
                self.extra[b.cat] -= self.n_extra * b.nb  # every copy frees its own at once
                self.extra_t = tuple(self.extra)

    def view(self, t: T, numel: int | None = None, fn=None, pos=0) -> T:
        t.buf.rc += 1
        return T(t.buf, t.numel if numel is None else numel, t.dt, t.rg if fn is None else True, fn or t.fn, pos if fn else t.pos)

    def recat(self, t: T, cat: int) -> None:
        """Move a storage to another category (a stolen gradient becomes .grad)."""
        if self.pending:
            self.commit()  # for a later micro-batch this is a free (the add is in place)
        b = t.buf
        self.cats[b.cat] -= b.nb
        self.cats[cat] += b.nb
        b.cat = cat

    def commit(self) -> None:
        self.events.append((self.phase, self.win_id, self.cur, tuple(self.cats), self.extra_t))
        self.pending = False

    def set_phase(self, phase: str) -> None:
        if self.pending:
            self.commit()
        self.phase = phase
        self.commit()  # a phase's peak is at least what is live when it starts

    def set_owner(self, blk) -> None:
        """Enter the ops of block `blk` (None: outside any block); opens/closes the rep window."""
        if blk == self.owner:
            return
        if self.pending:
            self.commit()
        if self.owner == self.rep:
            w = self.windows[self.win_id]
            w[1] = tuple(self.n_extra * (a - b) for a, b in zip(self.cats, w[0]))
            self.extra = [e + a for e, a in zip(self.extra, w[1])]
            self.extra_t = tuple(self.extra)
            self.win_id = -1
        self.owner = blk
        if blk == self.rep:
            self.win_id = len(self.windows)
            self.windows.append([tuple(self.cats), None])

    def lines(self, K: int) -> dict:
        """Every local maximum as an affine function of the micro-batch b.

        The simulation runs with b = K (a huge integer), so each byte count is
        A + B·K with A the batch-independent bytes: decoded, a maximum is the line
        A + B·b. Inside block 1's window the unsimulated copies are either all before
        (offset `extra`) or all after it (extra + n·Δ): both lines are kept, their max
        is the live bytes. Reading 0 is the first micro-batch; reading 1 a later one
        (grads excluded: the caller adds every .grad as a constant). Returns
        {(reading, phase): [(A, B, cats)]} pruned to lines that can be the max for b >= 1."""
        if self.pending:
            self.commit()
        out: dict = {}
        half = K // 2
        sums: dict[int, int] = {}
        after_sums = [(sum(w[1]), w[1][GRAD]) for w in self.windows]
        for idx, (phase, w, cur, cats, extra) in enumerate(self.events):
            se = sums.get(id(extra))
            if se is None:
                se = sums[id(extra)] = sum(extra)
            v1 = cur + se
            v2 = v1 - cats[GRAD] - extra[GRAD]
            opts = [(v1, v2, 0)]
            if w >= 0:
                sa, ga = after_sums[w]
                opts.append((v1 + sa, v2 + sa - ga, 1))
            for a, b_, opt in opts:
                for k, val in ((0, a), (1, b_)):
                    B = (val + half) // K
                    out.setdefault((k, phase), []).append((val - B * K, B, idx, opt))
        res = {}
        for (k, phase), ls in out.items():
            kept = []
            for A, B, idx, opt in _envelope(ls):
                _, w, _, cats, extra = self.events[idx]
                off = extra if not opt else tuple(e + a for e, a in zip(extra, self.windows[w][1]))
                tot = tuple(c + o for c, o in zip(cats, off))
                if k:
                    tot = tot[:GRAD] + (0,) + tot[GRAD + 1:]
                kept.append((A, B, tot))
            res[(k, phase)] = kept
        return res


    # ---- autograd recording ----
    def node(self, inputs, bw, nout: int = 1) -> Node | None:
        """A node for an op whose differentiable inputs are `inputs`; None when none requires grad."""
        edges, needed = [], False
        for t in inputs:
            if t is not None and t.rg:
                edges.append((t.fn, t.pos, t.dt, t.numel))
                needed = True
            else:
                edges.append(None)
        if not needed:
            return None
        if self.mode == "recompute":
            return self.recompute_q.pop()
        self.seq += 1
        n = Node(self.seq, edges, bw, self.owner, nout)
        if self.mode == "discard":
            self.ck_nodes.append(n)
        return n

    def out(self, t: T, node: Node | None, pos: int = 0) -> T:
        if node is not None:
            t.rg, t.fn, t.pos = True, node, pos
        return t

    def save(self, node: Node | None, *ts: T) -> None:
        if node is None:
            return
        for t in ts:
            if self.mode == "discard":
                node.nsave += 1
            else:
                node.saved.append(self.hold(t))
                if self.mode == "recompute":
                    self.remaining -= 1
                    if self.remaining == 0:
                        self.dead = True  # early stop: the rest of the block is not recomputed

    # ---- autocast ----
    def cast_weight(self, p: Param) -> T:
        """Autocast's cast of an fp32 weight: cached for the region when it is a leaf requiring grad."""
        ac = self.autocast
        t = p.t
        if ac is None or t.dt == ac:
            return self.hold(t)
        key = id(p)
        if t.rg and t.dt == F32 and key in self.cache:
            return self.hold(self.cache[key])
        c = self.to(t, ac, WCAST)
        if t.rg and t.dt == F32:
            self.cache[key] = self.hold(c)
        return c

    def clear_cache(self) -> None:
        for t in self.cache.values():
            self.drop(t)
        self.cache = {}

    def to(self, t: T, dt: str, cat: int | None = None) -> T:
        """x.to(dt): the same tensor when the dtype matches, else a copy (ToCopyBackward saves nothing)."""
        if t.dt == dt:
            return self.hold(t)
        n = self.node([t], _bw_cast)
        return self.out(self.new(t.numel, dt, cat), n)

    # ---- backward ----
    def run_backward(self, root: T) -> None:
        """loss.backward(): PyTorch's engine order over the recorded graph."""
        start = root.fn
        if start is None:
            return
        stack, seen = [start], {id(start)}
        while stack:
            n = stack.pop()
            for e in n.edges:
                if e is None:
                    continue
                m = e[0]
                m.deps += 1
                if id(m) not in seen:
                    seen.add(id(m))
                    stack.append(m)
        g0 = self.new(1, root.dt, BWD)  # torch.autograd.backward's ones_like, held until it returns
        start.ibuf[root.pos] = self.hold(g0)
        heap = [(-start.seq, 0, start)]
        tick = 1
        while heap:
            _, _, n = heapq.heappop(heap)
            self.set_owner(n.blk)
            if n.seq == INF:
                self._accumulate_grad(n)
                continue
            if n.ck is not None and not n.ck.done and n.nsave:
                self._recompute(n.ck)
            grads = n.ibuf
            outs = n.bw(self, n, grads)
            for g in grads:
                self.drop(g)
            n.ibuf = None
            casted = []
            for e, g in zip(n.edges, outs):
                if g is not None and (e is None or e[2] != g.dt):
                    if e is None:
                        self.drop(g)
                        g = None
                    else:
                        c = self.new(e[3], e[2], BWD)
                        self.drop(g)
                        g = c
                casted.append(g)
            for t in n.saved:
                self.drop(t)
            n.saved = []
            for e, g in zip(n.edges, casted):
                if e is None:
                    continue
                m, pos = e[0], e[1]
                if g is not None:
                    old = m.ibuf[pos]
                    if old is None:
                        m.ibuf[pos] = g
                    else:
                        s = self.new(g.numel, g.dt, BWD)
                        self.drop(old)
                        self.drop(g)
                        m.ibuf[pos] = s
                m.deps -= 1
                if m.deps == 0:
                    heapq.heappush(heap, (-m.seq, tick, m))
                    tick += 1
        self.set_owner(None)
        self.drop(g0)

    def _accumulate_grad(self, n: Node) -> None:
        p: Param = n.ck
        g = n.ibuf[0]
        n.ibuf = [None]
        n.deps = 0
        if g is None:
            return
        if p.grad is None:
            self.recat(g, GRAD)
            p.grad = g  # stolen: the gradient buffer becomes .grad
        else:
            self.drop(g)  # .grad += g in place

    def _recompute(self, ck) -> None:
        """Checkpoint: re-run the block's forward to refill its nodes' saved tensors."""
        q = list(reversed(ck.nodes))
        self.mode, self.recompute_q = "recompute", q
        self.remaining = sum(n.nsave for n in ck.nodes)
        self.dead = self.remaining == 0
        saved_cache, self.cache = self.cache, {}
        cat, self.cat_alloc = self.cat_alloc, RECOMP
        out = ck.fn()
        self.drop(out)
        self.clear_cache()
        self.dead = False
        self.cache, self.cat_alloc = saved_cache, cat
        self.mode, self.recompute_q, self.dead = "normal", None, False
        ck.done = True


def _envelope(lines: list) -> list:
    """Lines A + B·b not dominated for b >= 1 (another line at least as high at b = 1
    and at least as steep)."""
    lines.sort(key=lambda t: (-(t[0] + t[1]), -t[1]))
    kept, best_b = [], None
    for ln in lines:
        if best_b is None or ln[1] > best_b:
            kept.append(ln)
            best_b = ln[1]
    return kept


def _bw_cast(sim: Sim, node: Node, grads):
    """ToCopyBackward: grad.to(input dtype) -- the engine's validate_outputs makes the copy."""
    g = grads[0]
    return [sim.hold(g) if g is not None else None]


class Checkpoint:
    """Recorded checkpointed block: its nodes (creation order) and how to re-run it."""
    __slots__ = ("nodes", "fn", "done")

    def __init__(self, nodes, fn):
        self.nodes, self.fn, self.done = nodes, fn, False
