"""Predict, without running anything, what `lorabench run` measures for a cell.

    est = estimate(model_cfg, cell, batch_size, device="cpu")
    est.est_peak_bytes, est.est_peak_phase, est.breakdown, est.est_flops_per_step

Every byte is a tensor the training step really holds (see
stacks/transformer_replay.py and each adapter's `replay` for the per-op saved
tensors, and sim/ for how lifetimes are followed). The
persistent terms are closed forms (stacks/transformer_layout.py):

  params            Σ numel·a        frozen base in base_dtype (a = 2 or 4), trainable in fp32;
                    a quantized base (nf4, int8) as bitsandbytes stores it (sim/quant.py)
  grads             Σ_trainable numel·4    .grad of the trainable parameters only
  optimizer_state   the cell's optimizer's state (optimizers/, one formula per optimizer), e.g.
                    AdamW Σ_trainable 2·numel·a: exp_avg and exp_avg_sq (the param's dtype),
                    + 4 B per trainable tensor: AdamW's `step` (a 0-d fp32 tensor; on CUDA
                    for-loop/foreach keep it on the host, fused/capturable on the device);
                    SGD Σ numel·a; Adafactor factored rows and columns; 8-bit AdamW uint8
                    moments + fp32 absmax per 256 + 2 maps. What `build` allocates (8-bit
                    AdamW's maps on CPU) is held from the start, the rest from the first step
  buffers           llama: RoPE cos, sin = 2·T_max·(D/2)·a   (a of the base dtype in LoRA cells; a
                    Hugging Face model: inv_freq and its copy, 2·(D/2)·a, the tables per forward)
  batches           2·B·s·8 per step: x and y int64 of the whole optimizer-step batch (see
                    batch_pair_bytes for B = 1). The CPU
                    tracker counts a batch once an op touches it, so a peak in warm-up step k
                    holds k of them; on CUDA every step's batch is copied to the device first.

The per-micro-batch terms come from replaying the step (replay.py on sim/): activations
saved for backward, autocast's half weight copies (cached for the autocast
region when the weight trains, and saved by the matmul), logits/loss tensors
(N·V·a logits, their N·V·4 fp32 copy and log-softmax, two N·V·4 gradients),
backward buffers (gradients in flight, sums of two branches, casts), gradients
as they are created, and under checkpointing the block inputs plus one block's
recomputation. The optimizer temporaries are closed forms of the cell's optimizer, the
largest over its parameter groups (each group is stepped by its own call), e.g.:

  for-loop AdamW   max_i (2·n_i + n_(i-1))·a   sqrt(v_i) and its quotient by the bias
                   correction, while the previous parameter's denominator is still bound
  foreach AdamW    Σ_trainable n_i·a           _foreach_sqrt of every exp_avg_sq at once
  fused AdamW      0                           (kernel-internal)
  SGD, 8-bit AdamW 0; Adafactor: optimizers/adafactor.py

Phase peaks: forward and backward = persistent terms (+ optimizer state when the
memory window holds a second step) + the simulated peak of the phase; optimizer
= persistent + grads + state + temporaries, or with fp16 GradScaler's unscale_ before
step() when that holds more (an optimizer step without temporaries: SGD, 8-bit AdamW,
fused). Ties go to the earlier phase, as the tracker's max() does.

Several ranks (estimator/parallel.py): one rank's bytes. fsdp2 shards the persistent terms and
replays FSDP2's own buffers (sim/fsdp.py); with cpu_offload (FSDP2's CPUOffloadPolicy, GPU cells)
parameters, gradients, optimizer state and its temporaries are host memory: none of them is in a
phase's bytes (cuda_overheads["host_offloaded"] says how much the host holds per rank).

CUDA-only lines (Estimate.cuda_overheads, never folded into a tensor term):
  cublas_workspace   2 × 8,519,680 B (":4096:2:16:8"; 32 MiB each on Hopper): one per
                     cuBLAS handle, i.e. the forward thread's and autograd's device
                     thread's; allocated by the caching allocator, so it is inside
                     max_memory_allocated and added to est_peak_bytes as its own line
  allocator_rounding every allocation is rounded up to 512 B; exact for the persistent
                     tensors (params, grads, optimizer state, buffers, batches), not
                     modelled for activations (< 512 B per live tensor); added likewise
  cuda_context       ~500 MiB of context and kernels, outside the allocator: NVML sees
                     it, max_memory_allocated does not; reported, never added
On CUDA the SDPA kernel and autocast's op lists differ (transformer_replay.sdpa, layernorm).
None of the CUDA terms could be checked on hardware here (no GPU in CI).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..adapters import get as get_adapter
from ..optimizers import get as get_optimizer
from ..spec.config import Cell, ModelConfig, resolve_optimizer_impl
from ..stacks.base import ITEM_BYTES as ISZ
from ..stacks.transformer_layout import state_bytes
from ..stacks import stack_for
from .parallel import ddp_bucket_bytes, rank_state, sharded_groups
from .replay import simulate

PHASES = ("forward", "backward", "optimizer")
CUBLAS_WORKSPACE_BYTES = {"default": 4096 * 1024 * 2 + 16 * 1024 * 8, "hopper": 32 * 1024 * 1024}
CUBLAS_HANDLES = 2            # the Python thread's and autograd's CUDA device thread's
CUDA_CONTEXT_BYTES = 500 * 1024 ** 2  # typical; depends on driver, CUDA version, lazy loading
# Scalars of train_step: a later micro-batch's forward still holds the previous `loss` and
# the running `total` (backward: `total`), each in the loss's dtype (4 B, or 2 B for the
# native loss of 16-bit logits); the optimizer step holds both, and with fp16 GradScaler's
# 4-byte found_inf and inv_scale.
LOSS_SCALARS_LATER_MICROBATCH = {"forward": 2, "backward": 1}
OPT_SCALARS_FP16 = {"other": 4, "fused": 12}  # found_inf; fused also its sum and grad_scale
# fp16, before step(): unscale_ holds the scale as a double and its reciprocal (8 + 8 B), then
# inv_scale, found_inf and a copy of each (4 B each); the fused path's check of the gradients
# makes the same four with a dummy inv_scale. An optimizer step without temporaries peaks here.
OPT_SCALARS_FP16_UNSCALE = 16

TERMS = {
    "params": "Σ numel·a over parameters (frozen base in base_dtype, trainable fp32; nf4/int8 as bitsandbytes stores them)",
    "buffers": "RoPE cos/sin tables, 2·T_max·(D/2)·a (llama; transformers': inv_freq, 2·(D/2)·a)",
    "batches": "(x, y) int64 batches resident: n·2·B·s·8",
    "grad_scaler": "GradScaler scale + growth tracker, 8 B (fp16)",
    "optimizer_state": "the optimizer's state, e.g. AdamW exp_avg + exp_avg_sq (2·a B per trainable param) + 4 B step per tensor",
    "grads": ".grad of trainable parameters, 4 B each",
    "optimizer_temporaries": "the optimizer step's temporaries, e.g. AdamW for-loop: max (2·n_i + n_(i-1))·a; foreach: Σ n_i·a; fused: 0",
    "activations": "tensors saved for backward and live forward temporaries (the stack's replayed ops)",
    "autocast_weight_copies": "half copies of fp32 weights made by autocast (cached when trainable)",
    "logits_loss": "logits (N·V·a, kept through backward with keep_logits), fp32 copy and log-softmax (N·V·4 each; "
                   "the native loss: none, N·V·a; upcast_logits: the fp32 copy replaces the logits), their gradients",
    "backward_buffers": "gradients in flight, branch sums, dtype casts during backward",
    "recompute": "checkpointing: one block's recomputed saved tensors and temporaries",
    "scalars": "scalar tensors of train_step (previous loss, running total, GradScaler's found_inf)",
    "graph_held": "what the previous loss's autograd graph still keeps (bitsandbytes int8: each projection's input) "
                  "until the next loss replaces it, and the last one through the optimizer step",
    "adapter_state": "what the adapter's after_step keeps between steps (PEFT AdaLoRA's importance averages) and holds while it runs",
    "adapter_adjust": "the adapter's gradient adjustment at the backward's end (LoRA-Pro's FP32 projection, AdaLoRA's "
                      "orthogonality regulariser: Adapter.adjust_bytes)",
    "ddp_buckets": "ddp: the Reducer's gradient buckets, one copy of the trainable gradients (estimator/parallel.py)",
    "fsdp_gathered": "fsdp2: unsharded parameters and all-gather outputs live at the peak (sim/fsdp.py)",
    "fsdp_reduce": "fsdp2: unsharded gradients and the reduce-scatter input in flight at the peak (sim/fsdp.py)",
    "cublas_workspace": "CUDA: cuBLAS workspaces in the caching allocator",
    "allocator_rounding": "CUDA: 512-byte rounding of the persistent tensors",
}


def _round512(nb: int) -> int:
    return max(512, -(-nb // 512) * 512) - nb if nb else 0


@dataclass
class Estimate:
    """Predicted bytes (int) and FLOPs of one cell; `breakdown` is what is live at the peak."""
    est_param_bytes: int = field(metadata={'row': True})
    est_grad_bytes: int = field(metadata={'row': True})
    est_optimizer_state_bytes: int = field(metadata={'row': True})
    est_activation_bytes: int = field(metadata={'row': True})
    est_peak_bytes: int = field(metadata={'row': True})
    est_peak_phase: str = field(metadata={'row': True})
    est_flops_per_step: int = field(metadata={'row': True})
    est_hw_flops_per_step: int = 0
    phase_peak_bytes: dict[str, int] = field(default_factory=dict)
    breakdown: dict[str, int] = field(default_factory=dict)
    cuda_overheads: dict[str, int] = field(default_factory=dict)
    total_params: int = 0
    trainable_params: int = 0
    device: str = "cpu"
    method: str = "analytic"  # analytic (this module) | trace (measure/trace.py)
    est_basis: str = field(default="", metadata={'row': True})  # what was modelled (Stack.analytic_basis; trace)
    est_reserved_bytes: int | None = None  # CUDA traces: the caching allocator's peak reserve (sim/caching_allocator)

    def fields(self) -> dict:
        """The fields a result row stores (declared with metadata row=True; see row/codec.py)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata.get("row")}


def batch_pair_bytes(batch_size: int, seq_len: int, device: str) -> int:
    """Bytes of one step's (x, y), int64 (B, s) each: 2·B·s·8.

    tokens.MarkovTokens slices x = seq[:, :-1] and y = seq[:, 1:] of one (B, s+1)
    tensor and calls .contiguous(); with B = 1 both slices already count as
    contiguous, so on CPU they share that one storage of (s+1)·8 bytes. On CUDA
    .to(device) copies each slice on its own."""
    if batch_size == 1 and device != "cuda":
        return (seq_len + 1) * 8
    return 2 * batch_size * seq_len * 8


def optimizer_temporaries(optimizer, groups: list[list], impl: str) -> int:
    """Bytes of the optimizer step's temporaries at their peak (see module docstring): the
    largest of its parameter groups' (step() calls one update per group, whose temporaries
    die with it). groups: the trainable tensors per group in the order step() visits them."""
    return max((optimizer.temporaries(g, impl) for g in groups if g), default=0)


def is_hopper(gpu_name: str | None) -> bool:
    """Whether a GPU name is a Hopper part (cuBLAS takes a 32 MiB workspace there)."""
    return bool(gpu_name) and any(h in gpu_name for h in ("H100", "H200", "GH200"))


def cuda_overheads(cfg: ModelConfig, cell: Cell, batch_size: int, n_batches: int, gpu_name: str | None,
                   impl: str) -> dict:
    """The CUDA-only lines (module docstring); untested on hardware."""
    from ..stacks.transformer_layout import block_params, model_params, optimizer_groups
    ws = CUBLAS_HANDLES * CUBLAS_WORKSPACE_BYTES["hopper" if is_hopper(gpu_name) else "default"]
    outer, one = model_params(cfg, cell, blocks=range(0)), block_params(cfg, cell, 0)
    L = cfg.n_layers
    params = sum(_round512(b) for p in outer for b in p.storage_bytes) + L * sum(_round512(b) for p in one for b in p.storage_bytes)
    grads = sum(_round512(p.nbytes) for p in outer if p.trainable) + L * sum(_round512(p.nbytes) for p in one if p.trainable)
    trainable = [p for g in optimizer_groups(cfg, cell) for p in g]
    opt = get_optimizer(cell.optimizer)
    state = opt.resident_bytes(trainable, impl, "cuda", round_to=512) - opt.resident_bytes(trainable, impl, "cuda")
    buffers = sum(_round512(n * ISZ[cell.base_float_dtype]) for n in stack_for(cfg).buffer_numels(cfg))
    if cell.cpu_offload:  # the shards, their gradients and the optimizer's state are host memory
        params = grads = state = 0
    batches = n_batches * 2 * _round512(batch_size * cfg.seq_len * 8)
    return {"cublas_workspace": ws, "allocator_rounding": params + grads + state + buffers + batches,
            "rounding_grads": grads, "rounding_state": state, "cuda_context": CUDA_CONTEXT_BYTES}


def estimate(model_cfg: ModelConfig, cell: Cell, batch_size: int, device: str = "cpu",
             optimizer_impl: str = "auto", n_batches: int | None = None, window_steps: int = 2,
             first_update_step: int = 1, gpu_name: str | None = None) -> Estimate:
    """The cell's predicted memory (bytes) and FLOPs; pure arithmetic, no tensor is created.

    window_steps: optimizer steps inside the memory window (CPU: the warm-up steps;
    CUDA: warm-up + timed). With two or more, AdamW's state exists during the later
    forward/backward passes. n_batches: (x, y) batches resident at the peak
    (default: window_steps on CPU, where the tracker sees a batch once used; on
    CUDA the caller should pass warm-up + timed steps, all copied up front).
    first_update_step: the first step whose optimizer.step() runs. AdamW creates its
    state there; an fp16 GradScaler that finds inf/NaN skips the step (measured rows
    say which: loss_scale_trajectory), so the state may appear later or not at all
    (not with fused AdamW, whose step() runs and skips inside the kernel)."""
    from .flops import flops_per_step
    opt = get_optimizer(cell.optimizer)
    impl = opt.implementation(resolve_optimizer_impl(optimizer_impl, device), device)
    micro_b = cell.micro_batch(batch_size)
    stack = stack_for(model_cfg)
    sb = state_bytes(model_cfg, cell, stack.parameters)  # the optimizer's order: the stack's model's
    buf_isz = ISZ[cell.base_float_dtype]
    buffers = sum(stack.buffer_numels(model_cfg)) * buf_isz
    n_batches = window_steps if n_batches is None else n_batches
    batches = n_batches * batch_pair_bytes(batch_size, model_cfg.seq_len, device)
    groups = sharded_groups(sb.groups, cell)  # what this rank steps (fsdp2: its shards)
    trainable = [p for g in groups for p in g]
    param_bytes, grad_bytes = rank_state(model_cfg, cell, sb)
    on_device = not cell.cpu_offload  # FSDP2's CPUOffloadPolicy: shards, gradients and the step on the host
    state_dev = opt.resident_bytes(trainable, impl, device) * on_device  # on CUDA less the host (`step`) and paged
    state_built = opt.resident_bytes(trainable, impl, device, stepped=False) * on_device  # before the first step
    if opt.scaler_in_step(impl):  # GradScaler hands found_inf to the fused kernel: step() runs, state is made
        first_update_step = 1
    state_fb = state_dev if window_steps > first_update_step else state_built
    stepped = first_update_step <= window_steps
    scaler = 8 if cell.uses_loss_scaler else 0  # GradScaler's _scale (fp32) and _growth_tracker (int32)

    res = simulate(model_cfg, cell, device, micro_b)
    const = {"params": param_bytes * on_device, "buffers": buffers, "batches": batches, "grad_scaler": scaler}
    dev_grads = grad_bytes * on_device
    if cell.strategy == "ddp":  # the Reducer's buckets, from the wrap on
        const["ddp_buckets"] = ddp_bucket_bytes(sb.grad_bytes)
    phases: dict[str, tuple[int, dict]] = {}
    # what the adapter's after_step keeps from step 1's on (PEFT AdaLoRA's importance state), and holds above it
    kept, after_step_tmp = get_adapter(cell.adapter).after_step_bytes(trainable, cell) if cell.is_lora else (0, 0)
    kept, after_step_tmp = kept * on_device, after_step_tmp * on_device
    held = res.graph_held_at(micro_b)  # the previous loss's graph: until the next loss replaces it
    held += stack.input_grad_held(model_cfg, cell, micro_b)  # and what it keeps beside (HF)
    for ph in ("forward", "backward"):
        v, cats = res.peak(0, ph, micro_b)
        cats["scalars"] = 0
        first = True  # the phase peaks in the step's first micro-batch
        if cell.accumulation > 1:
            v2, cats2 = res.peak(1, ph, micro_b)
            later = LOSS_SCALARS_LATER_MICROBATCH[ph] * res.loss_itemsize
            prev = held if ph == "forward" else 0
            if v2 + dev_grads + later + prev + (scaler if window_steps < 2 else 0) > v:
                cats, first = dict(cats2, grads=dev_grads, scalars=later), False
                if prev:
                    cats["graph_held"] = prev
        terms = dict(const, optimizer_state=state_fb, **cats, adapter_state=kept if window_steps >= 2 else 0)
        if ph == "forward" and window_steps < 2 and first:
            terms["grad_scaler"] = 0  # made by the first scaler.scale(), in step 1's first backward
        phases[ph] = (sum(terms.values()), terms)
    adjust = get_adapter(cell.adapter).adjust_bytes(trainable, cell) * on_device if cell.is_lora else 0
    if adjust:  # the adapter's adjust_gradients ends the backward phase: every gradient set, the graph freed
        terms = dict(const, optimizer_state=state_fb, grads=dev_grads, graph_held=held, scalars=2 * res.loss_itemsize,
                     adapter_state=kept if window_steps >= 2 else 0, adapter_adjust=adjust)
        phases["backward"] = max(phases["backward"], (sum(terms.values()), terms), key=lambda vt: vt[0])
    opt_tmp = optimizer_temporaries(opt, groups, impl) * on_device if stepped else 0
    terms = dict(const, optimizer_state=state_dev if stepped else state_built, grads=dev_grads,
                 optimizer_temporaries=opt_tmp, graph_held=held,
                 scalars=2 * res.loss_itemsize + (OPT_SCALARS_FP16["fused" if opt.scaler_in_step(impl) else "other"]
                              if cell.uses_loss_scaler else 0))
    phases["optimizer"] = (sum(terms.values()), terms)
    if kept and stepped:  # step() over the kept state of an earlier step, or the after_step that makes or updates it
        during = dict(terms, adapter_state=kept if window_steps >= 2 else 0)
        after = dict(terms, optimizer_temporaries=0, adapter_state=kept + after_step_tmp)
        phases["optimizer"] = max(((sum(t.values()), t) for t in (during, after)), key=lambda vt: vt[0])
    if cell.uses_loss_scaler:  # GradScaler's unscale_ (fused: its inf check), before step(): state as in forward
        unscale = dict(const, optimizer_state=state_fb, grads=dev_grads, scalars=8 + OPT_SCALARS_FP16_UNSCALE)
        if sum(unscale.values()) > phases["optimizer"][0]:
            phases["optimizer"] = (sum(unscale.values()), unscale)

    cuda = {}
    if device == "cuda":
        cuda = cuda_overheads(model_cfg, cell, batch_size, n_batches, gpu_name, impl)
        if cell.cpu_offload:  # reported, never added: what each rank keeps in host memory
            cuda["host_offloaded"] = param_bytes + grad_bytes + opt.resident_bytes(trainable, impl, device)
        for ph, (v, t) in phases.items():
            extra = {k: cuda[k] for k in ("cublas_workspace", "allocator_rounding")}
            if ph != "optimizer":
                extra["allocator_rounding"] -= cuda["rounding_grads"] + (cuda["rounding_state"] if state_fb != state_dev else 0)
            phases[ph] = (v + sum(extra.values()), dict(t, **extra))
    peak_phase = max(PHASES, key=lambda p: phases[p][0])
    peak, breakdown = phases[peak_phase]
    breakdown = {k: int(v) for k, v in breakdown.items() if v}
    fl = flops_per_step(model_cfg, cell, batch_size)
    activations = sum(v for k, v in res.saved_at(micro_b).items() if k not in ("grads", "fsdp_gathered", "fsdp_reduce"))
    return Estimate(
        est_param_bytes=param_bytes, est_grad_bytes=grad_bytes,
        est_optimizer_state_bytes=opt.state_bytes(trainable), est_activation_bytes=int(activations),
        est_peak_bytes=int(peak), est_peak_phase=peak_phase,
        est_flops_per_step=fl.model, est_hw_flops_per_step=fl.hardware,
        phase_peak_bytes={p: int(phases[p][0]) for p in PHASES}, breakdown=breakdown,
        cuda_overheads=cuda, total_params=sb.total_params, trainable_params=sb.trainable_params, device=device,
        est_basis=stack.analytic_basis + ("; PEFT's adapter layers replayed as lorabench's (AdaLoRA: as PEFT's "
                                                         "SVDLinear) with PEFT's input cast (--method trace runs PEFT's)"
                                                         if cell.adapter_backend == "peft" else "")
        + (f"; transformers' {model_cfg.approximates} read as the Llama-style block of its widths (its parameter "
           "count)" + (", its projections fused as transformers' layer fuses them" if model_cfg.layer_order else "")
           if model_cfg.approximates else ""))
