"""DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation", arXiv:2402.09353):
W0 split into a magnitude and a direction; LoRA adapts the direction, the magnitude trains.

    W' = m ⊙ (W0 + s·B·A) / ‖W0 + s·B·A‖_row      (norm over d_in, one per output row)
    m (d_out, trainable) = ‖W0‖_row at initialisation, so W' = W0 and the model is the base model

The norm is detached (paper §4.3: "treat ‖V + ΔV‖_c as a constant", which saves the
memory of its gradient). Forward as PEFT computes it (peft/tuners/lora/dora.py,
`DoraLinearLayer.forward`, called by `DoraLinearVariant.forward`), with g = m / ‖·‖:

    lora_weight = B(A(I)).T                      (an identity-matrix product, as PEFT: d_in × d_in eye)
    ‖·‖ = ‖W0 + s·lora_weight.detach()‖_row      (in the adapter's dtype, W0 cast to it)
    base_result = out − bias                     (no dropout module, or eval mode: the base output)
                = W0·dropout(x)                  (with dropout: a second base matmul, W0 in the adapter's dtype)
    out + (g − 1)·base_result + g·s·B(A(dropout(x)))

so out + ... = g·W0·x + g·s·B·A·x = W'·x (+ bias). The extra memory against LoRA (per target):
base_result and B(A(x)) saved for m's gradient, an N × d_out product per term, and during the
forward the d_in × d_in eye, the d_in × d_out lora_weight and W0 + s·lora_weight.
`replay_combine` replays exactly these ops on the simulator (tests/test_adapter_variants.py:
equal to the measured CPU peak to the byte). Merging: W0 ← W' (PEFT's `merge_unsafe`, the norm
kept for `unmerge`: W0 = W'·‖·‖/m − s·B·A).
"""
from __future__ import annotations

from ..sim.ops import binary, linear, product
from ..sim.rules import pass_backward, unary_backward
from ..sim.tensors import Param, promote
from .base import AdapterParam
from .lora import LoRA


class DoRA(LoRA):
    name = "dora"
    needs_dense_base = True

    def params(self, d_in, d_out, cell, splits=None, quantized=False):
        return super().params(d_in, d_out, cell) + [AdapterParam("lora_magnitude", (d_out,))]

    def init(self, layer):
        """LoRA's A and B; m = ‖W0 + s·B·A‖_row = ‖W0‖_row (B = 0), in FP32 (PEFT's update_layer)."""
        import torch
        super().init(layer)
        w = layer.base.weight.detach().to(torch.float32)
        layer.lora_magnitude.copy_(torch.linalg.norm(w + layer.scaling * (layer.lora_B @ layer.lora_A), dim=1))

    # ---- torch
    def combine(self, layer, x, h, out):
        return (out + self._dora(layer, h, out)).to(out.dtype)

    def _dora(self, layer, h, out):
        """DoraLinearLayer.forward: (g − 1)·base_result + g·s·B(A(h)); its locals die on return."""
        import torch.nn as nn
        import torch.nn.functional as F
        A, B, s = layer.lora_A, layer.lora_B, layer.scaling
        lora_weight = _lora_weight(A, B).to(A.dtype)
        weight = layer.base.weight.to(A.dtype)
        weight_norm = _weight_norm(weight, lora_weight.detach(), s).detach()
        mag_norm_scale = (layer.lora_magnitude / weight_norm).view(1, -1)
        lora_result = F.linear(F.linear(h, A), B)
        if isinstance(layer.dropout, nn.Identity) or not layer.training:
            bias = layer.base.bias
            base_result = out if bias is None else out - bias
        else:
            base_result = F.linear(h, weight)
        return (mag_norm_scale - 1) * base_result + mag_norm_scale * lora_result * s

    # ---- the simulator (estimator)
    peft_frees_dropped_input = False  # PEFT's DoraLinearVariant: `x = dropout(x)`, used to its end

    def replay_combine(self, sim, h, y, params, d_out, *, weight=None, bias=None, dropout=False, device="cpu",
                       owned=False):
        """`combine` op by op: y + the DoRA term, cast to y's dtype."""
        dora = self._replay_dora(sim, h, y, params, d_out, weight, bias, dropout)
        total = binary(sim, y, dora, "add")
        sim.drop(dora)
        out = sim.to(total, y.dtype)
        sim.drop(total)
        return out

    def _replay_dora(self, sim, h, y, params, d_out, weight, bias, dropout):
        """`_dora` op by op; dt is the adapter's dtype (W0 and the eye are cast to it)."""
        A, B, m = params["lora_A"], params["lora_B"], params["lora_magnitude"]
        dt = A.tensor.dtype
        rank = B.tensor.numel // d_out
        d_in = A.tensor.numel // rank
        lora_weight, graph_held = _replay_lora_weight(sim, A, B, d_in, rank, d_out, dt)
        w = sim.to(weight.tensor, dt)  # weight = W0.to(dt): a copy when the base is stored in another dtype
        # weight_norm = ‖w + s·lora_weight.detach()‖_row, detached
        scaled = sim.new(d_out * d_in, dt)
        total = sim.new(d_out * d_in, dt)
        sim.drop(scaled)
        norm = sim.new(d_out, dt)
        sim.drop(total)
        # mag_norm_scale = (m / norm).view(1, -1): DivBackward saves the norm
        node = sim.node([m.tensor, norm], _div_backward)
        sim.save(node, norm)
        quotient = sim.out(sim.new(d_out, promote(m.tensor.dtype, dt)), node)
        g = sim.out(sim.view(quotient), sim.node([quotient], pass_backward))
        sim.drop(quotient)
        # lora_result = B(A(h))
        a = linear(sim, h, A, None, rank)
        lora_result = linear(sim, a, B, None, d_out)
        sim.drop(a)
        if not dropout:  # base_result = out (- bias)
            base_result = binary(sim, y, bias.tensor, "sub") if bias is not None else sim.hold(y)
        else:  # F.linear(dropout(x), w)
            w_param = Param(w.numel, w.dtype, False, None)
            w_param.tensor = w
            base_result = linear(sim, h, w_param, None, d_out)
        # (g - 1)·base_result + g·lora_result·s
        g1 = sim.out(sim.new(d_out, g.dtype), sim.node([g], pass_backward))
        t2 = _mul_row(sim, g1, base_result)
        sim.drop(g1)
        t3 = _mul_row(sim, g, lora_result)
        t4 = sim.out(sim.new(t3.numel, t3.dtype), sim.node([t3], unary_backward))
        sim.drop(t3)
        dora = binary(sim, t2, t4, "add")
        sim.drop(t2)
        sim.drop(t4)
        for t in graph_held:  # lora_weight dies, and its graph with what it saved
            sim.drop(t)
        for t in (lora_weight, w, norm, g, lora_result, base_result):  # the other locals
            sim.drop(t)
        return dora

    def _merged(self, layer):
        """(W' in FP32, the detached norm) from the unmerged W0."""
        import torch
        w = layer.base.weight.detach().to(torch.float32)
        combined = w + self.delta_lora(layer)
        norm = torch.linalg.norm(combined, dim=1).detach()
        return (layer.lora_magnitude.detach() / norm).view(-1, 1) * combined, norm

    def delta_lora(self, layer, on_host=False):
        """s·B·A (FP32)."""
        return LoRA.delta_weight(self, layer, on_host)

    def delta_weight(self, layer, on_host=False):
        """W' − W0 (FP32), from the unmerged layer."""
        import torch
        w = layer.base.weight.detach().to(torch.float32)
        m = layer.lora_magnitude.detach().to(torch.float32)
        if on_host:
            w, m = w.cpu(), m.cpu()
        combined = w + self.delta_lora(layer, on_host)
        return (m / torch.linalg.norm(combined, dim=1)).view(-1, 1) * combined - w

    def delta_abs_max(self, layer):
        return self.delta_weight(layer, on_host=True).abs().max().item()

    def merge(self, layer):
        merged, norm = self._merged(layer)
        layer._dora_merged_norm = norm
        layer.base.weight.copy_(merged.to(layer.base.weight.dtype))

    def unmerge(self, layer):
        import torch
        norm = layer._dora_merged_norm
        w = layer.base.weight.detach().to(torch.float32) * (norm / layer.lora_magnitude.detach()).view(-1, 1)
        layer.base.weight.copy_((w - self.delta_lora(layer)).to(layer.base.weight.dtype))
        del layer._dora_merged_norm


def _replay_lora_weight(sim, A, B, d_in, rank, d_out, dt):
    """`_lora_weight(A, B).to(dt)` on the simulator: (lora_weight, what its graph holds).

    Its graph is dead once lora_weight is (only lora_weight.detach() is used), so its nodes are
    not recorded, only what they hold until then: A's node the eye (or its autocast copy), B's
    node A(I) -- none of it in a checkpointed forward, whose saves are placeholders. Unrecorded,
    they are missing from both the saves a recompute counts and its total, so the early stop
    (at the block's last save, later) is unchanged."""
    keep = sim.mode != "discard"
    eye = sim.new(d_in * d_in, dt)
    wa = sim.cast_weight(A) if sim.autocast else sim.hold(A.tensor)  # F.linear(eye, A)
    e = sim.to(eye, sim.autocast) if sim.autocast else sim.hold(eye)
    held = [sim.hold(e)] if keep else []
    a_eye = sim.new(d_in * rank, e.dtype)
    sim.drop(e)
    sim.drop(wa)
    wb = sim.cast_weight(B) if sim.autocast else sim.hold(B.tensor)  # F.linear(a_eye, B)
    if keep:
        held.append(sim.hold(a_eye))
    lw = sim.new(d_in * d_out, a_eye.dtype)
    sim.drop(wb)
    sim.drop(a_eye)
    sim.drop(eye)  # _lora_weight returns: x_eye's name dies
    lora_weight = sim.to(lw, dt)  # .to(A.dtype): a copy of autocast's half result
    sim.drop(lw)
    return lora_weight, held


def _mul_row(sim, row, x):
    """row·x, row (1 × d_out) broadcast over x's rows: saves x if row needs grad, row if x does."""
    return product(sim, row, x, x.numel, promote(row.dtype, x.dtype), _mul_row_backward)


def _mul_row_backward(sim, node, grads):
    """MulBackward0 of row·x: g·x (full size, reduced to the row's shape by the engine's
    validate_outputs after g·row is made) and g·row."""
    grad = grads[0]
    edge_row, edge_x = node.edges
    full = sim.new(grad.numel, grad.dtype) if edge_row else None
    grad_x = sim.new(edge_x.numel, grad.dtype) if edge_x else None
    grad_row = None
    if edge_row:
        grad_row = sim.new(edge_row.numel, grad.dtype)
        sim.drop(full)
    return [grad_row, grad_x]


def _div_backward(sim, node, grads):
    """DivBackward0 of m / norm (norm detached): grad_m = g / norm."""
    return [sim.new(node.edges[0].numel, grads[0].dtype), None]


def _lora_weight(A, B):
    """PEFT's get_lora_weight: B(A(I)).T, the eye freed on return (unless a saved tensor holds it)."""
    import torch
    import torch.nn.functional as F
    x_eye = torch.eye(A.shape[1], device=A.device, dtype=A.dtype)
    return F.linear(F.linear(x_eye, A), B).T


def _weight_norm(weight, lora_weight, scaling):
    """PEFT's get_weight_norm: ‖W + s·lora_weight‖ over d_in, per output row."""
    import torch
    weight = weight + scaling * lora_weight
    return torch.linalg.norm(weight, dim=1).to(weight.dtype)
