"""Softmax attention: `F.scaled_dot_product_attention`, bit for bit, except under forward-mode AD (MeanFlow's
`torch.func.jvp`; fused kernels have none, pytorch#128971), where `SDPAWithJVP` computes the tangent with one
more SDPA call and matmuls on P (docs/meanflow.md, "The attention's JVP")."""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F


def _forward_mode_active() -> bool:
    """Whether a torch.func transform (jvp, vmap, ...) or a forward-AD dual level is running."""
    return torch._C._functorch.maybe_current_level() is not None or torch.autograd.forward_ad._current_level >= 0


class SDPAWithJVP(torch.autograd.Function):
    """SDPA with the JVP t_O = P t_V + (P * t_S) V - rowsum(P * t_S) O, t_S = (t_Q K^T + Q t_K^T) / sqrt(d);
    its backward recomputes the fused forward; the tangent is not differentiable."""

    @staticmethod
    def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v)  # (N, H, T, Dh)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        q, k, v = inputs
        ctx.save_for_backward(q, k, v)
        ctx.save_for_forward(q, k, v, output)

    @staticmethod
    def jvp(ctx: Any, t_q: torch.Tensor, t_k: torch.Tensor, t_v: torch.Tensor) -> torch.Tensor:
        q, k, v, out = ctx.saved_tensors
        scale = 1.0 / math.sqrt(q.shape[-1])
        probs = torch.softmax((q @ k.transpose(-2, -1)) * scale, dim=-1)           # (N, H, T, T)
        t_scores = (t_q @ k.transpose(-2, -1) + q @ t_k.transpose(-2, -1)) * scale  # (N, H, T, T)
        weighted = probs * t_scores                                                 # (N, H, T, T)
        tangent = F.scaled_dot_product_attention(q, k, t_v)                         # P t_V, fused
        return tangent + weighted @ v - weighted.sum(dim=-1, keepdim=True) * out    # (N, H, T, Dh)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = (tensor.detach().requires_grad_() for tensor in ctx.saved_tensors)
        with torch.enable_grad():
            out = F.scaled_dot_product_attention(q, k, v)
        return torch.autograd.grad(out, (q, k, v), grad_out)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax attention of (N, H, T, Dh) queries, keys and values -> (N, H, T, Dh): SDPA, with the JVP
    of `SDPAWithJVP` under forward-mode AD (torch.func.jvp, forward_ad)."""
    if _forward_mode_active():
        return SDPAWithJVP.apply(q, k, v)
    return F.scaled_dot_product_attention(q, k, v)
