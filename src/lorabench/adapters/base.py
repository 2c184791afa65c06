"""The adapter seam: what every adapter on a frozen linear layer answers.

An adapter adds trainable parameters beside a frozen `nn.Linear` W0 (d_out × d_in)
and a branch to its output:

    h = W0·x + branch(dropout(x))        merged: W0 ← W0 + ΔW, branch off

Callers ask the adapter instead of switching on its kind (torchtune's
`adapter_params()`): `params` gives the names and shapes it adds (the
estimator's layout and the module's creation alike), `init` initialises them,
`branch` computes its output, `delta_weight` gives ΔW for merging, `replay`
runs the same ops on the estimator's symbolic simulator. Torch is imported
inside the methods that need it, so the estimator can ask `params` and
`replay` without importing torch.

Variants that do more than add a branch override the defaults below:
`combine` joins the base output and the branch (default: out + branch; DoRA
rescales the base output too) and `replay_combine` replays it; `merge` and
`unmerge` fold ΔW into W0 and back; `lr_scale` gives a parameter's learning
rate as a multiple of the optimizer's (LoRA+); `check_projection` refuses a
projection the adapter cannot wrap (PiSSA: rank above min(d_in, d_out)).

Three hooks let a variant act in the training flow (train/techniques.py calls them
on every adapted layer of the model at once; each is a no-op by default):
`prepare` once after the model is built, before the memory window, with a closure
that runs the first batch backward (LoRA-GA: an init from the first gradient of W0;
`has_init_stage` says whether it runs one, and the row then carries its time and
peak); `adjust_gradients` after the step's last backward, before the optimizer
(LoRA-Pro's gradient adjustment, AdaLoRA's orthogonality regulariser);
`after_step` after the optimizer step, the gradients still set (AdaLoRA's rank
allocation).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from ..spec.config import Cell


@dataclass(frozen=True)
class AdapterParam:
    name: str                # attribute of the adapted layer, e.g. "lora_A"
    shape: tuple[int, ...]
    trainable: bool = True   # adapters train in fp32 whatever the base dtype

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


class AllocationWalk:
    """Allocations and frees in a hook's order, and the peak they reach: how an adapter's `*_bytes`
    answers what its hook holds above the training state (each walk is held to the CPU tracker's
    count of the hook). `unit`: bytes per counted element."""

    def __init__(self, unit: int = 1):
        self.unit, self.live, self.peak = unit, 0, 0

    def new(self, *counts: int) -> None:
        for n in counts:
            self.live += self.unit * n
            self.peak = max(self.peak, self.live)

    def free(self, *counts: int) -> None:
        self.live -= self.unit * sum(counts)


class Adapter(ABC):
    """One kind of adapter; a cell's lora_rank, lora_alpha and lora_dropout configure it."""

    name: str = ""
    needs_dense_base: bool = False
    """it reads or rewrites W0 itself (DoRA's column norms, PiSSA's SVD), so it cannot run on a
    quantized base (nf4, int8) here"""
    rewrites_base: bool = False
    """it writes W0 when it initialises (PiSSA's residual, LoRA-GA's offset): not on a tied head,
    whose W0 is the embedding too"""
    multi_rank: bool = True
    """it runs on several ranks (strategy ddp, fsdp2): False for an adapter whose hooks read or
    rewrite whole tensors between steps (prepare, adjust_gradients, after_step)"""

    def scaling(self, cell: Cell) -> float:
        """The factor on the branch's output; LoRA: alpha / r."""
        return cell.lora_alpha / cell.lora_rank

    @abstractmethod
    def params(self, d_in: int, d_out: int, cell: Cell, splits: tuple[int, ...] | None = None,
               quantized: bool = False) -> list[AdapterParam]:
        """The parameters it adds to one d_in → d_out layer, in registration order; the first
        one multiplies the layer's input, the last one produces its output. `splits`: the widths
        of a fused projection's output slices (qkv: q, k, v), None for any other layer;
        `quantized`: the layer's base is bitsandbytes' (the cell's nf4 or int8), not a float one."""

    @abstractmethod
    def init(self, layer) -> None:
        """Initialise `layer`'s adapter parameters in place (torch, under no_grad)."""

    @abstractmethod
    def branch(self, layer, h):
        """The branch's output for the (dropped-out) input h, scaling included (torch)."""

    @abstractmethod
    def delta_weight(self, layer, on_host: bool = False):
        """ΔW (d_out × d_in, fp32) that merging adds to W0; on_host: computed on the CPU."""

    def delta_abs_max(self, layer) -> float:
        """max |ΔW|, on the host (no device allocation before the measured window)."""
        return self.delta_weight(layer, on_host=True).abs().max().item()

    def replay(self, sim, h, params: dict, d_out: int, owned: bool = False):
        """The ops of `branch` on the estimator's simulator (sim/): `h` is the symbolic input,
        `params` maps each AdapterParam's name to its simulated parameter; returns the branch's
        output before the cast to the base output's dtype. `owned`: the replay releases h once its
        first op returns (PEFT's dropout output, a temporary: peft_frees_dropped_input). An adapter
        without it cannot be estimated analytically: the estimate says so."""
        raise NotImplementedError(f"adapter {self.name!r} has no replay for the analytic estimator")

    # ---- hooks with defaults: what plain LoRA does
    def combine(self, layer, x, h, out):
        """The adapted layer's output from its input x, the adapter's input h (dropped out, in the
        adapter's dtype outside autocast) and the base output `out` (torch)."""
        return out + self.branch(layer, h).to(out.dtype)

    def replay_combine(self, sim, h, y, params: dict, d_out: int, *, weight=None, bias=None,
                       dropout: bool = False, device: str = "cpu", owned: bool = False):
        """`combine` on the simulator: h the adapter's input, y the base output (both left to the
        caller, but h when `owned`: replay's), `weight`/`bias` the base's simulated parameters, `dropout`
        whether the layer has a dropout module. Default: y + replay(h).to(y.dtype)."""
        from ..sim.ops import binary
        scaled = self.replay(sim, h, params, d_out, owned)
        cast = sim.to(scaled, y.dtype)
        out = binary(sim, y, cast, "add")
        sim.drop(cast)
        sim.drop(scaled)
        return out

    peft_frees_dropped_input: bool = True
    """Whether PEFT's layer of this kind frees the dropout's output once the branch's first matmul returns
    (`lora_B(lora_A(dropout(x)))`: a temporary argument); DoRA's variant keeps it (`x = dropout(x)`)."""

    def peft_casts_input(self, quantized: str | None, autocast, device: str) -> bool:
        """Whether PEFT's layer of this kind casts its input to the adapter's dtype before the branch
        (`_cast_input_dtype`; the estimator's Dims.peft), on a base `quantized` (nf4, int8; None: a
        float one) under `autocast` (its dtype, or None) on `device`. Default: always (PEFT's LoRA layers)."""
        return True

    def merge(self, layer) -> None:
        """W0 ← W0 + ΔW in place (torch, under no_grad)."""
        layer.base.weight += self.delta_weight(layer).to(layer.base.weight.dtype)

    def unmerge(self, layer) -> None:
        """Undo `merge` (torch, under no_grad)."""
        layer.base.weight -= self.delta_weight(layer).to(layer.base.weight.dtype)

    def lr_scale(self, param_name: str, cell: Cell) -> float:
        """The learning rate of the adapter parameter `param_name` as a multiple of the optimizer's."""
        return 1.0

    def check_projection(self, name: str, d_in: int, d_out: int, cell: Cell,
                         splits: tuple[int, ...] | None = None) -> str | None:
        """Why this adapter cannot wrap projection `name` (d_in → d_out) in `cell`; None if it can."""
        return None

    # ---- the training flow's hooks (train/techniques.py), each given every adapted layer
    has_init_stage: bool = False
    """Whether `prepare` runs a data-dependent initialisation; the one place that says so
    (a row's init_s and init_peak_bytes are measured for it, None otherwise)."""

    def prepare(self, layers, backward, cell: Cell, total_steps: int) -> None:
        """Once, after the model is built and before the first step (outside the memory window):
        `backward()` runs the loss of the cell's first micro-batch backward through the model as
        it stands (whatever requires grad then gets .grad); `cell` is the run's cell and
        `total_steps` the optimizer steps the run will take. Default: nothing."""

    def adjust_gradients(self, layers, grad_scale) -> None:
        """After the step's last backward, before the optimizer step: change the adapters' .grad
        in place. `grad_scale`: the loss scale (a 0-d tensor) the gradients carry under fp16's
        GradScaler, else None. Default: nothing."""

    def adjust_bytes(self, params: list, cell: Cell) -> int:
        """What `adjust_gradients` holds above the training state while it runs, for the
        estimator's backward phase, given every trainable ParamSpec. Default: 0."""
        return 0

    def after_step(self, layers) -> None:
        """After the optimizer step, before the next zero_grad (the gradients are still set).
        Default: nothing."""

    def after_step_bytes(self, params: list, cell: Cell) -> tuple[int, int]:
        """What `after_step` allocates, for the estimator's optimizer phase, given every trainable
        ParamSpec: (bytes it keeps from the first step's on, the most it holds above those while it
        runs). Default: (0, 0)."""
        return 0, 0
