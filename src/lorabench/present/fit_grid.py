"""The grid `lorabench fit` explores: its axes, their defaults and how they are pruned.

    axes = parse_axes(precision="auto", optimizer="adamw,adamw-8bit", loss="standard,chunked")
    combos = grid(16, axes.resolved(cfg, gpu, 16))

Axes (`Axes`; every value one `estimator.estimate` on CUDA, nothing run):

  precision   fp32, bf16 (autocast), bf16-pure (everything in bf16, no FP32 master), and fp16
              (autocast + GradScaler) on a GPU without a bf16 path (T4, V100): where both exist
              fp16 costs what bf16 costs, in memory and time. fp16-pure is not explored: with
              AdamW it goes to NaN (eps = 1e-8 is 0 in FP16; README). `--precision` lists them.
  method      full fine-tuning, once per optimizer; LoRA at each rank (`--lora-rank`, default
              16: memory hardly depends on it; "8,64" shows that) with the frozen base in fp32
              or 16 bits (bf16; fp16 in fp16 cells; a pure precision's base is its own dtype)
              and, where the estimator takes them (`quant_bases`, probed once per call), the
              quantized bases of spec.config.BASE_DTYPES: nf4 (QLoRA) under bf16, bf16-pure and
              fp16, int8 under bf16 and fp16 (QUANT_PRECISIONS). fp32, beside 16-bit
              precisions, is the FP32 reference: full fine-tuning with the first optimizer and
              LoRA on an fp32 or a bf16 base (its other variants cost what bf16's do, more slowly).
  optimizer   adamw, adamw-8bit, paged-adamw-8bit, adafactor, sgd (the optimizers/ registry;
              `--optimizer`, in order of preference). Only trainable state depends on it: full
              fine-tuning explores each in a pure precision; under autocast, whose FP32 master
              weights and gradients outweigh any optimizer's state, the first two of the default
              list (AMP_OPTIMIZERS: AdamW, 8-bit AdamW; every one named when --optimizer is
              given); an adapter cell (MiB of state) uses the first listed.
  loss        standard, chunked (`--loss-chunks` chunks, default 8); native (the cross-entropy in the
              logits' dtype) and chunked-output (torchtune's, litgpt's: every chunk's logits kept)
              when named, or with `--loss all`. `--upcast-logits`, `--keep-logits`:
              what the user's model hands over and their loop keeps (Cell.upcast_logits, keep_logits).
  checkpointing off, on; micro-batch m in the powers of two dividing the batch B (and B),
              accumulation B / m.
  strategy    with N > 1 GPUs (`--gpus N`, or `--gpu 8xH100-SXM`): ddp, fsdp2 and fsdp2-offload (FSDP2's
              CPUOffloadPolicy: shards, gradients and the optimizer step on the host) over the N
              ranks, every other axis as above; B is then each GPU's batch (the optimizer step's is
              N·B). One GPU: no strategy (none).

The LoRA dropout (`--lora-dropout`, default 0.0), the targets and the adapter (`--adapter`, default lora;
an adapter that reads W0 takes no quantized base) are the user's values, not axes.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

from ..optimizers import names as optimizer_names
from ..spec.config import BASE_DTYPES, CHUNKED_LOSSES, DEFAULT_TARGETS, LOSSES, QUANT_DTYPES, Cell
from ..spec.scenario import cell_id
from ..spec.schema import ConfigError, one_of

AUTO_PRECISIONS = ("fp32", "bf16", "bf16-pure")   # + fp16 where the GPU has no bf16 path
GRID_PRECISIONS = ("fp32", "fp16", "bf16", "bf16-pure")  # what --precision may list
PRECISION_PREFERENCE = ("bf16", "bf16-pure", "fp16", "fp32")  # ties: no loss scaler, then 16-bit autocast
RANKS = (16,)
OPTIMIZER_ORDER = ("adamw", "adamw-8bit", "paged-adamw-8bit", "adafactor", "sgd")
IMPLEMENTATIONS = ("auto", "foreach", "fused", "forloop")  # AdamW's (TrainConfig.optimizer)
QUANT_PRECISIONS = {"nf4": ("bf16", "bf16-pure", "fp16"), "int8": ("bf16", "fp16")}  # where each is tried
OTHER_QUANT_PRECISIONS = ("bf16", "bf16-pure", "fp16")  # a quantized dtype not named above
AMP_OPTIMIZERS = 2  # of the default list: AdamW and 8-bit AdamW under autocast (its FP32 master dominates)
STRATEGIES_OVER_GPUS = ("ddp", "fsdp2", "fsdp2-offload")  # fsdp2-offload: FSDP2 with CPUOffloadPolicy


def sixteen_bit(precision: str) -> str:
    """The 16-bit base dtype paired with a precision: fp16 with fp16 autocast, else bf16."""
    return "fp16" if precision in ("fp16", "fp16-pure") else "bf16"


def micro_batches(batch: int) -> list[int]:
    """Powers of two dividing `batch`, and `batch` itself, ascending."""
    out = [m for m in (2**i for i in range(batch.bit_length())) if batch % m == 0]
    return out + ([batch] if batch not in out else [])


def is_quant(base_dtype: str) -> bool:
    return base_dtype in QUANT_DTYPES


def hidden_cost(combo) -> bool:
    """A cost in time the FLOP count does not see: a quantized base is dequantized in every matmul,
    a paged optimizer's state may page to host memory, CPU offload copies every shard over PCIe
    and steps the optimizer on the CPU."""
    return is_quant(combo.base_dtype) or combo.optimizer.startswith("paged") or combo.strategy.endswith("offload")


@dataclass(frozen=True)
class Combo:
    precision: str
    lora_rank: int
    base_dtype: str
    checkpointing: bool
    micro_batch_size: int
    accumulation: int
    loss: str = "standard"
    optimizer: str = "adamw"
    double_quant: bool = True  # an nf4 base's scales double-quantized (a quantized checkpoint says which)
    strategy: str = "none"     # none | ddp | fsdp2 | fsdp2-offload (over world_size GPUs)
    world_size: int = 1

    def cell(self, targets: tuple = DEFAULT_TARGETS, axes: "Axes | None" = None) -> Cell:
        """The combination as a Cell, with the user's values of `axes` (its dropout, loss chunks,
        adapter, kept and upcast logits: the chunked loss hands over none)."""
        a = axes or Axes()
        lora = {"lora_targets": tuple(targets), "lora_dropout": a.lora_dropout, "adapter": a.adapter} \
            if self.lora_rank else {}
        cell = Cell(precision=self.precision, lora_rank=self.lora_rank, checkpointing=self.checkpointing,
                    accumulation=self.accumulation, base_dtype=self.base_dtype, loss=self.loss,
                    loss_chunks=a.loss_chunks if self.loss in CHUNKED_LOSSES else None, optimizer=self.optimizer,
                    keep_logits=a.keep_logits and self.loss != "chunked",
                    upcast_logits=a.upcast_logits and self.loss != "chunked",
                    double_quant=self.double_quant if self.base_dtype == "nf4" else None,
                    strategy=self.strategy.removesuffix("-offload"), world_size=self.world_size,
                    cpu_offload=self.strategy.endswith("-offload"), **lora)
        return dataclasses.replace(cell, id=cell_id(cell, set()))

    @functools.cached_property
    def id(self) -> str:
        """cell id plus the micro-batch, e.g. `bf16-r8-bf16base-ckpt-acc4-chunked-mb4`."""
        return f"{self.cell().id}-mb{self.micro_batch_size}"

    @property
    def key(self) -> tuple:
        return (self.precision, self.lora_rank, self.base_dtype, self.checkpointing, self.micro_batch_size,
                self.loss, self.optimizer) + self._over

    @property
    def method(self) -> tuple:
        """The technique as one axis: (rank, base, optimizer) of full fine-tuning, (rank, base) of LoRA
        (whose optimizer is the grid's first: changing to LoRA is one change, not two), and the
        strategy over several GPUs (ddp to fsdp2 is a change of method too)."""
        return (self.lora_rank, self.base_dtype) + (() if self.lora_rank else (self.optimizer,)) + self._over

    @property
    def _over(self) -> tuple:
        """(strategy,) over several GPUs; () on one (the keys of one GPU's grid stay as they were)."""
        return (self.strategy,) if self.strategy != "none" else ()

    @property
    def axes(self) -> tuple:
        """(precision, method, checkpointing, micro-batch, loss): what a suggestion changes, axis by axis."""
        return self.precision, self.method, self.checkpointing, self.micro_batch_size, self.loss


@dataclass(frozen=True)
class Axes:
    """What the grid explores (module docstring); `resolved` fills in what depends on the model and GPU."""
    precisions: tuple | None = None       # None: AUTO_PRECISIONS (+ fp16 where no bf16 path)
    ranks: tuple = RANKS
    optimizers: tuple = OPTIMIZER_ORDER   # in order of preference; adapter cells use the first
    losses: tuple = ("standard", "chunked")  # native only when named (--loss native, all)
    loss_chunks: int = 8
    lora_dropout: float = 0.0
    optimizer_impl: str = "auto"
    amp_optimizers: int | None = AMP_OPTIMIZERS  # how many of them full fine-tuning under autocast explores
    quant_dtypes: tuple = QUANT_DTYPES    # the quantized bases to try (each where the estimator takes it)
    quant: tuple = ()                     # (precision, base dtype) pairs the estimator takes (resolved)
    unavailable: tuple = ()               # (base dtype, why) of quantized bases it does not take yet
    model_quant: str | None = None        # a quantized checkpoint's own base (nf4 | int8): only adapters on it
    double_quant: bool = True             # nf4 combinations' double quantization (the checkpoint's, if quantized)
    world_size: int = 1                   # GPUs (`--gpus`); above 1 every combination is ddp or fsdp2 over them
    adapter: str = "lora"                 # the adapter of every LoRA combination (`--adapter`)
    keep_logits: bool = False             # the user's loop keeps the logits (Cell.keep_logits; not the chunked loss)
    upcast_logits: bool = False           # the user's model hands over FP32 logits (Cell.upcast_logits; likewise)

    @property
    def strategies(self) -> tuple:
        return STRATEGIES_OVER_GPUS if self.world_size > 1 else ("none",)

    @property
    def lora_optimizer(self) -> str:
        return self.optimizers[0]

    def resolved(self, cfg, gpu, batch: int, targets: tuple = DEFAULT_TARGETS, rates=None) -> "Axes":
        """Explicit precisions (auto: fp16 only where `rates` (else `gpu`) has no bf16 path) and the
        quantized bases the estimator takes for this model (`quant_bases`)."""
        precs = self.precisions
        if precs is None:
            g = rates if rates is not None else gpu
            known = any(v is not None for v in g.tflops.values())
            precs = AUTO_PRECISIONS + (("fp16",) if known and g.peak_flops("bf16") is None else ())
        axes = dataclasses.replace(self, precisions=tuple(p for p in GRID_PRECISIONS if p in precs))
        if cfg.quantized:  # its weights are quantized already: QLoRA on that base is all it trains
            dq = bool(cfg.quantized_double_quant) if cfg.quantized == "nf4" else True
            axes = dataclasses.replace(axes, quant_dtypes=(cfg.quantized,), model_quant=cfg.quantized, double_quant=dq)
        from ..adapters import get as get_adapter, projection_problem
        from ..spec.schema import FieldError
        try:
            problem = projection_problem(cfg, Combo(axes.precisions[0], axes.ranks[-1], "fp32", False, batch, 1).cell(
                targets, axes))
        except FieldError as e:  # a rule between the adapter and the targets (merged-qkv's)
            problem = e.message
        if not problem and axes.world_size > 1 and not get_adapter(axes.adapter).multi_rank:
            problem = f"adapter {axes.adapter} does not run on several ranks (--gpus {axes.world_size}) here"
        if problem:
            raise ConfigError("--adapter" if axes.adapter != "lora" else "--lora-rank", "", problem)
        quant, unavailable = quant_bases(cfg, axes, batch, targets)
        return dataclasses.replace(axes, quant=quant, unavailable=unavailable)


def quant_bases(cfg, axes: Axes, batch: int, targets: tuple) -> tuple[tuple, tuple]:
    """((precision, dtype) pairs whose LoRA cells the analytic estimator takes, (dtype, why) of those
    it does not): one estimate per pair, of a combination the grid holds anyway (its replay is reused).
    Any error is a "not yet": the dtype is left out, and the assumptions line says why."""
    from ..adapters import get as get_adapter
    from ..estimator.analytic import estimate
    ok, why = [], {}
    if get_adapter(axes.adapter).needs_dense_base:
        return (), tuple((q, f"adapter {axes.adapter} reads W0 itself: no quantized base") for q in axes.quant_dtypes)
    for q in (d for d in BASE_DTYPES if d in QUANT_DTYPES and d in axes.quant_dtypes):
        for p in (p for p in axes.precisions if p in QUANT_PRECISIONS.get(q, OTHER_QUANT_PRECISIONS)):
            combo = Combo(p, axes.ranks[0], q, False, batch, 1, axes.losses[0], axes.lora_optimizer, axes.double_quant)
            try:
                cell = combo.cell(targets, axes)
                if cell.base_dtype != q:
                    raise ValueError(f"a {p} cell stores its base in {cell.base_dtype}")
                estimate(cfg, cell, batch, device="cuda", optimizer_impl=axes.optimizer_impl, n_batches=1,
                         window_steps=2)
            except Exception as e:  # noqa: BLE001 - a capability probe: whatever it raises means "not yet"
                why.setdefault(q, " ".join(str(getattr(e, "message", e)).split())[:120])
                continue
            ok.append((p, q))
    return tuple(ok), tuple((q, m) for q, m in why.items() if q not in {d for _, d in ok})


def methods(p: str, axes: Axes) -> list[tuple[int, str, str]]:
    """(rank, base, optimizer) of the methods explored at precision `p` (module docstring); a quantized
    checkpoint's: LoRA on its own base only."""
    if axes.model_quant:
        return [(r, q, axes.lora_optimizer) for r in axes.ranks for pp, q in axes.quant if pp == p]
    if p == "fp32" and len(axes.precisions) > 1:  # the FP32 reference
        full, bases = [(0, "fp32", axes.optimizers[0])], ["fp32", "bf16"]
    else:
        amp = axes.amp_optimizers if p in ("bf16", "fp16") else None
        full = [(0, "fp32", o) for o in axes.optimizers[:amp]]
        bases = [sixteen_bit(p)] if p.endswith("-pure") else ["fp32", sixteen_bit(p)]
    bases += [q for pp, q in axes.quant if pp == p]
    return full + [(r, b, axes.lora_optimizer) for r in axes.ranks for b in bases]


def grid(batch: int, axes: Axes | None = None) -> list[Combo]:
    """Every combination of the module docstring (`axes` resolved; None: the defaults, fp16 included)."""
    axes = axes or Axes(precisions=GRID_PRECISIONS)
    out = []
    for p in axes.precisions or AUTO_PRECISIONS:
        for r, base, opt in methods(p, axes):
            for strategy in axes.strategies:
                if strategy.startswith("fsdp2") and is_quant(base):  # FSDP2 shards no bitsandbytes weight here
                    continue
                for loss in axes.losses:
                    for ckpt in (False, True):
                        for m in micro_batches(batch):
                            out.append(Combo(p, r, base, ckpt, m, batch // m, loss, opt, axes.double_quant,
                                             strategy, axes.world_size))
    return out


# ---------------------------------------------------------------- the options
def parse_targets(text: str, model) -> tuple:
    """--lora-targets as a tuple of projections of `model` (a ModelConfig); ConfigError naming the option."""
    from ..spec.config import allowed_targets, split_targets
    allowed = allowed_targets(model)
    style = "mixture-of-experts" if model.n_experts else model.style
    targets = tuple(split_targets(text))
    if not targets:
        raise ConfigError("--lora-targets", "", "must name at least one projection")
    for t in targets:
        if t not in allowed:
            raise ConfigError("--lora-targets", "", f"unknown target {t!r} for a {style} model (allowed: {', '.join(allowed)})")
    return targets


def _items(text: str) -> list[str]:
    return [t.strip() for t in str(text).split(",") if t.strip()]


def parse_optimizers(text: str | None, impl: str | None = None) -> tuple[tuple, str]:
    """(--optimizer's kinds, AdamW's implementation). `--optimizer` takes optimizer kinds (comma list;
    None or "all": every registered one, OPTIMIZER_ORDER first); for compatibility an implementation
    (auto, foreach, fused, forloop: what --optimizer meant before) given there sets --optimizer-impl."""
    if text is not None and not _items(text):
        raise ConfigError("--optimizer", "", "must name optimizers (a comma list, or all), got an empty value")
    kinds, impls = [], []
    for t in _items(text or "all"):
        if t in IMPLEMENTATIONS:
            impls.append(t)
        elif t == "all":
            kinds += [o for o in OPTIMIZER_ORDER if o in optimizer_names()]
            kinds += [o for o in optimizer_names() if o not in OPTIMIZER_ORDER]
        elif t in optimizer_names():
            kinds.append(t)
        else:
            raise ConfigError("--optimizer", "", f"unknown optimizer {t!r} (known: {', '.join(optimizer_names())}; "
                                                 f"or an AdamW implementation: {', '.join(IMPLEMENTATIONS)})")
    if len(set(impls)) > 1 or (impls and impl not in (None, impls[0])):
        raise ConfigError("--optimizer", "", f"names two AdamW implementations ({', '.join(dict.fromkeys(impls + [impl] if impl else impls))})")
    if not kinds:
        kinds = [o for o in OPTIMIZER_ORDER if o in optimizer_names()]
    resolved = impls[0] if impls else (impl or "auto")
    if resolved not in IMPLEMENTATIONS:
        raise ConfigError("--optimizer-impl", "", one_of(*IMPLEMENTATIONS)(resolved))
    return tuple(dict.fromkeys(kinds)), resolved


def parse_axes(precision: str | None = "auto", lora_rank: str | None = None, optimizer: str | None = None,
               optimizer_impl: str | None = None, loss: str | None = None, loss_chunks: int = 8,
               lora_dropout: float = 0.0, adapter: str = "lora", keep_logits: bool = False,
               upcast_logits: bool = False) -> Axes:
    """The Axes of fit's options; bad input: ConfigError naming the option."""
    precs = None
    if precision not in (None, "auto"):
        precs = tuple(_items(precision))
        bad = [p for p in precs if p not in GRID_PRECISIONS]
        if bad or not precs:
            why = "fp16-pure is not explored (AdamW goes to NaN in pure FP16)" if "fp16-pure" in bad else \
                f"allowed: auto or a list of {', '.join(GRID_PRECISIONS)}"
            raise ConfigError("--precision", "", f"{'unknown precision ' + repr(bad[0]) if bad else 'empty'} ({why})")
    ranks = RANKS
    if lora_rank is not None:
        try:
            ranks = tuple(sorted({int(r) for r in str(lora_rank).split(",")}))  # an empty item is no rank
        except ValueError:
            raise ConfigError("--lora-rank", "", f"must be a comma list of integers > 0, got {lora_rank!r}") from None
        if not ranks or ranks[0] < 1 or ranks[-1] >= 2**63:
            raise ConfigError("--lora-rank", "", f"must be a comma list of integers in [1, 2^63), got {lora_rank!r}")
    losses = LOSSES if loss == "all" else Axes.losses if loss is None else tuple(dict.fromkeys(_items(loss)))
    if not losses or any(x not in LOSSES for x in losses):
        raise ConfigError("--loss", "", f"must be a comma list of {', '.join(LOSSES)}, got {loss!r}")
    if isinstance(loss_chunks, bool) or not isinstance(loss_chunks, int) or not 1 <= loss_chunks < 2**63:
        raise ConfigError("--loss-chunks", "", f"must be an integer in [1, 2^63), got {loss_chunks!r}")
    if not isinstance(lora_dropout, (int, float)) or not 0 <= lora_dropout < 1:
        raise ConfigError("--lora-dropout", "", f"must be in [0, 1), got {lora_dropout!r}")
    for flag, value in (("--keep-logits", keep_logits), ("--upcast-logits", upcast_logits)):
        if not isinstance(value, bool):
            raise ConfigError(flag, "", f"must be true or false, got {value!r}")
        if value and losses == ("chunked",):
            raise ConfigError(flag, "", "the chunked loss makes no whole logits to keep or cast: add the standard or "
                              "native loss to --loss")
    kinds, impl = parse_optimizers(optimizer, optimizer_impl)
    named = any(t not in IMPLEMENTATIONS and t != "all" for t in _items(optimizer or ""))
    from ..adapters import get as get_adapter
    get_adapter(adapter, "--adapter", "")  # one line for an unknown adapter
    return Axes(precs, ranks, kinds, losses, loss_chunks, float(lora_dropout), impl,
                None if named else AMP_OPTIMIZERS, adapter=adapter, keep_logits=keep_logits, upcast_logits=upcast_logits)
