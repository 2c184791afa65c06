"""estimate.replay: one symbolic replay of a micro-batch, against concrete replays and against
the CPU allocation tracker measuring the same forward and backward."""
from __future__ import annotations

import pytest
import torch

from lorabench.estimator.replay import replay, simulate
from lorabench.measure.trackers import MemoryTracker
from lorabench.sim.tensors import GRADS
from lorabench.spec.config import Cell, ModelConfig
from lorabench.train.techniques import build_model, compute_loss, make_scaler

PHASES = ("forward", "backward")
LLAMA = ModelConfig(d_model=16, n_layers=2, n_heads=2, d_ff=32, vocab_size=64, seq_len=16)
DEEP_GQA = ModelConfig(d_model=16, n_layers=5, n_heads=2, n_kv_heads=1, d_ff=32, vocab_size=64, seq_len=8)
GPT2 = ModelConfig(style="gpt2", d_model=16, n_layers=2, n_heads=2, d_ff=32, vocab_size=64, seq_len=8)
MIXED = ModelConfig(d_model=16, n_layers=4, n_heads=2, d_ff=48, vocab_size=100, seq_len=8)

CASES = {
    "llama-fp32": (LLAMA, Cell(precision="fp32")),
    "deep-gqa-bf16-ckpt": (DEEP_GQA, Cell(precision="bf16", checkpointing=True)),
    "gpt2-lora-dropout": (GPT2, Cell(precision="fp32", lora_rank=4, lora_targets=("q", "down"), lora_dropout=0.1)),
    "lora-bf16-on-fp16-base": (MIXED, Cell(precision="bf16", lora_rank=2, lora_targets=("gate", "o", "k"),
                                           base_dtype="fp16")),
    "fp16-scaler": (LLAMA, Cell(precision="fp16", accumulation=2)),
}


def measure(cfg: ModelConfig, cell: Cell, b: int, micro_batches: int = 1) -> tuple[list[dict], int]:
    """compute_loss and backward of `micro_batches` micro-batches of b sequences under the CPU
    tracker: each one's {phase: peak bytes above what was live before the first} (parameters,
    buffers, the batch), and the .grad bytes at the end."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (b, cfg.seq_len), generator=gen)
    y = torch.randint(0, cfg.vocab_size, (b, cfg.seq_len), generator=gen)
    scaler = make_scaler(cell.precision, "cpu")
    scaler.scale(torch.ones(()))  # GradScaler's scale and growth tracker exist before the window
    with MemoryTracker("cpu") as mem:
        model = build_model(cfg, cell, "cpu", 0)
        mem.track(x, y)
        base = mem.current_bytes
        mem.start_window()
        for i in range(micro_batches):
            mem.phase(f"forward{i}")
            loss = compute_loss(model, x, y, cell.precision) / cell.accumulation
            mem.phase(f"backward{i}")
            scaler.scale(loss).backward()
            del loss
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    return [{ph: mem.phase_peak_bytes[f"{ph}{i}"] - base for ph in PHASES} for i in range(micro_batches)], grads


@pytest.mark.parametrize("case", list(CASES))
def test_replay_matches_the_measured_micro_batch_to_the_byte(case):
    cfg, cell = CASES[case]
    (measured,), _ = measure(cfg, cell, 2)
    res = simulate(cfg, cell)
    assert {ph: res.peak(0, ph, 2)[0] for ph in PHASES} == measured


def test_second_reading_is_a_later_micro_batch_without_its_grads():
    """A later micro-batch of the step finds every .grad allocated (AccumulateGrad adds in place):
    its peaks, less the .grad bytes, are the replay's second reading. Small vocabulary, wide MLP:
    the first backward peaks once the grads are made, so the two readings differ."""
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=2, d_ff=128, vocab_size=16, seq_len=4)
    cell = Cell(precision="fp32", accumulation=2)
    (first, later), grad_bytes = measure(cfg, cell, 1, micro_batches=2)
    res = simulate(cfg, cell)
    assert {ph: res.peak(0, ph, 1)[0] for ph in PHASES} == first
    assert {ph: res.peak(1, ph, 1)[0] for ph in PHASES} == {ph: later[ph] - grad_bytes for ph in PHASES}
    assert res.peak(0, "backward", 1)[0] > res.peak(1, "backward", 1)[0]
    assert all(cats[GRADS] == 0 for (reading, _), lines in res.lines.items() if reading == 1 for *_, cats in lines)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("case", ["deep-gqa-bf16-ckpt", "gpt2-lora-dropout", "fp16-scaler"])
def test_symbolic_micro_batch_equals_concrete_replays(case, device):
    """peak(b) of the one symbolic replay is, at b = 1, 2, 3, the peak a replay at that b computes."""
    cfg, cell = CASES[case]
    symbolic = simulate(cfg, cell, device)
    for b in (1, 2, 3):
        concrete = replay(cfg, cell, device, micro_batch=b)
        assert all(B == 0 for lines in concrete.lines.values() for _, B, _ in lines)
        for reading, phase in symbolic.lines:
            assert symbolic.peak(reading, phase, b)[0] == concrete.peak(reading, phase, b)[0], (reading, phase, b)
        assert symbolic.saved_at(b) == concrete.saved_at(b)
    # and the activations do grow with b: the lines are not all flat
    assert symbolic.peak(0, "forward", 3)[0] > symbolic.peak(0, "forward", 1)[0]


def test_cuda_math_attention_keeps_the_scores():
    """CUDA fp32 with GQA falls back to math attention. Saved per block at the start of backward,
    against CPU's flash kernel: + the b·H·s² softmax, + k and v repeated to H heads (beyond k, v),
    - SDPA's output and the b·H·s log-sum-exp (fp32: 4 B each)."""
    b, s, H, G, D = 1, 32, 2, 1, 8
    cfg = ModelConfig(d_model=H * D, n_layers=2, n_heads=H, n_kv_heads=G, d_ff=32, vocab_size=64, seq_len=s)
    cell = Cell(precision="fp32")
    cpu, cuda = simulate(cfg, cell, "cpu"), simulate(cfg, cell, "cuda")
    N = b * s
    per_block = 4 * (b * H * s * s + (H // G - 1) * 2 * N * G * D - N * H * D - b * H * s)
    assert cuda.saved_at(b)["activations"] - cpu.saved_at(b)["activations"] == cfg.n_layers * per_block


def test_simulate_is_cached_per_architecture_and_technique():
    cfg, cell = CASES["gpt2-lora-dropout"]
    first = simulate(cfg, cell)
    assert simulate(cfg, cell) is first
    # accumulation, alpha and the id do not change one micro-batch's ops
    same_ops = Cell(precision="fp32", lora_rank=4, lora_targets=("down", "q"), lora_dropout=0.2, lora_alpha=3.0,
                    accumulation=4, id="other")
    assert simulate(ModelConfig(**cfg.to_dict()), same_ops) is first
    assert simulate(cfg, Cell(precision="fp32", lora_rank=4, lora_targets=("q", "down"))) is not first  # no dropout
    assert simulate(cfg, cell, "cuda") is not first
    again = replay(cfg, cell, "cpu")  # uncached, same result
    assert again is not first and again == first


@pytest.mark.parametrize("a,b", [
    (dict(adapter="adalora", adapter_backend="builtin"), dict(adapter="adalora", adapter_backend="peft")),
    (dict(adapter="merged-qkv", merged_qkv_enable=["q", "v"]), dict(adapter="merged-qkv", merged_qkv_enable=["q", "k", "v"])),
])
def test_the_replay_cache_tells_apart_cells_whose_replays_differ(a, b):
    """simulate caches one replay per key, every Cell field but those replay.NOT_REPLAYED names:
    two cells that differ in a replayed field (PEFT's AdaLoRA on a 16-bit base trains `ranknum`,
    the builtin one has none; merged-qkv's adapted slices) get their own replays, in either order."""
    cfg = ModelConfig(d_model=16, n_layers=1, n_heads=2, d_ff=16, vocab_size=64, seq_len=8, fused_qkv=True)
    common = dict(precision="fp32", lora_rank=4, base_dtype="bf16", lora_targets=("qkv", "head"))
    cells = [Cell(**common, **a), Cell(**common, **b)]
    fresh = [replay(cfg, c, "cpu").lines for c in cells]
    assert fresh[0] != fresh[1]
    for order in (cells, cells[::-1]):
        for c in order:
            assert simulate(cfg, c).lines == fresh[cells.index(c)]
