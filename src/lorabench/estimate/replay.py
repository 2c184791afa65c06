"""One micro-batch of the training step, replayed symbolically once and reused.

`simulate(cfg, cell, device)` runs memops' forward and backward on a memsim.Sim
with the micro-batch size set to a huge integer K, so every byte count comes out
as A + B·K: decoded, each local maximum is a line A + B·b valid for any
micro-batch b (activations scale with b; weights, their casts and gradients do
not). The result is cached per architecture and technique, so a grid over batch
sizes and accumulation counts costs one replay.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..stacks import transformer_replay as memops
from ..spec.config import Cell, ModelConfig
from ..stacks.transformer_layout import model_params
from ..sim.engine import CATS, Buf, Param, Sim, T


def _dims(cfg: ModelConfig, cell: Cell, micro_b: int, device: str) -> memops.Dims:
    lora = cell.lora_rank > 0
    return memops.Dims(b=micro_b, s=cfg.seq_len, C=cfg.d_model, H=cfg.n_heads, G=cfg.n_kv_heads, D=cfg.head_dim,
                       F=cfg.d_ff, V=cfg.vocab_size, style=cfg.style, rank=cell.lora_rank,
                       dropout=(cell.lora_dropout or 0.0) if lora else 0.0, ckpt=cell.checkpointing,
                       device=device, buf_dt=memops.DT[cell.base_dtype if lora else "fp32"])


def _sim_params(sim: Sim, cfg: ModelConfig, cell: Cell, n_blocks: int) -> dict:
    """Memoryless Param objects for the simulated blocks, keyed like memops expects."""
    params: dict = {"blocks": [dict() for _ in range(n_blocks)]}
    for p in model_params(cfg, cell, blocks=range(n_blocks)):
        obj = Param(sim, p.numel, memops.DT[p.dtype], p.trainable, p.block)
        if p.block is None:
            params[p.name] = obj
        else:
            params["blocks"][p.block][p.name.split(".", 2)[2]] = obj
    if cfg.tie_embeddings:
        params["head"] = params["tok_emb"]
    return params


K_SYMBOLIC = 1 << 48  # the micro-batch size the simulation runs with (see Sim.lines)


@dataclass(frozen=True)
class SimResult:
    """One replay of a micro-batch, valid for every micro-batch size b.

    lines[(reading, phase)] = [(A, B, cats)]: candidate peaks A + B·b (reading 0: the
    first micro-batch; 1: a later one, .grad bytes excluded); saved = the categories
    live when the first backward starts, encoded as A + B·K."""
    lines: dict
    saved: tuple

    def peak(self, reading: int, phase: str, b: int) -> tuple[int, dict]:
        best = max(self.lines[(reading, phase)], key=lambda ln: ln[0] + ln[1] * b)
        return best[0] + best[1] * b, {c: _at(v, b) for c, v in zip(CATS, best[2])}

    def saved_at(self, b: int) -> dict:
        return {c: _at(v, b) for c, v in zip(CATS, self.saved)}


def _at(v: int, b: int) -> int:
    B = (v + K_SYMBOLIC // 2) // K_SYMBOLIC
    return v - B * K_SYMBOLIC + B * b


_CACHE: dict[tuple, SimResult] = {}


def _simulate(cfg: ModelConfig, cell: Cell, device: str) -> SimResult:
    d = _dims(cfg, cell, K_SYMBOLIC, device)
    autocast = None if cell.precision == "fp32" else memops.DT[cell.precision]
    n_blocks = min(cfg.n_layers, 3)
    sim = Sim(cfg.n_layers, autocast)
    params = _sim_params(sim, cfg, cell, n_blocks)
    half = cfg.seq_len * (cfg.head_dim // 2)
    tables = tuple(T(Buf(0, 0, None), half, d.buf_dt) for _ in range(2))
    for t in tables:
        t.buf.rc = 1 << 40
    sim.set_phase("forward")
    loss = memops.forward_loss(sim, params, d, n_blocks, tables)
    sim.set_phase("backward")
    saved = tuple(a + b for a, b in zip(sim.cats, sim.extra))
    root = sim.hold(loss)
    if cell.precision == "fp16":  # scaler.scale(loss).backward(): a scaled copy is the root
        root = sim.out(sim.new(1, memops.F32), sim.node([loss], memops.bw_new_like_input))
    sim.run_backward(root)
    sim.drop(root)
    sim.drop(loss)
    return SimResult(sim.lines(K_SYMBOLIC), saved)


def simulate(cfg: ModelConfig, cell: Cell, device: str = "cpu") -> SimResult:
    """Replay one micro-batch's forward and backward (memops on memsim); cached.

    A later micro-batch of an accumulated step runs the same ops with every .grad
    already allocated and AccumulateGrad adding in place, so one replay gives both
    readings; the micro-batch size is symbolic, so one replay serves every batch
    size and accumulation count."""
    lora = cell.lora_rank > 0
    key = (cfg.style, cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.d_ff, cfg.vocab_size,
           cfg.seq_len, cfg.max_seq_len, cfg.tie_embeddings, cfg.bias, cfg.qkv_bias, cell.precision,
           cell.lora_rank, tuple(cell.lora_targets or ()) if lora else (), bool(lora and (cell.lora_dropout or 0) > 0),
           cell.checkpointing, cell.base_dtype if lora else "fp32", device)
    res = _CACHE.get(key)
    if res is None:
        if len(_CACHE) > 4096:
            _CACHE.clear()
        res = _CACHE[key] = _simulate(cfg, cell, device)
    return res
