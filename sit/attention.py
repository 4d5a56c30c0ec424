"""Softmax attention whose forward-mode derivative (JVP) runs on fused kernels where it can.

`attention(q, k, v)` is `F.scaled_dot_product_attention(q, k, v)` (flash / memory-efficient kernels on
GPUs). PyTorch's fused kernels have no forward-mode derivative (pytorch#128971), so `torch.func.jvp`
through SiT, what MeanFlow's target needs, would fail or fall back to the math path's dual numbers.
Under a forward-mode transform this module's `SDPAWithJVP` computes the tangent itself: with
S = Q K^T / sqrt(d), P = softmax(S), O = P V and tangents t_Q, t_K, t_V,

    t_S = (t_Q K^T + Q t_K^T) / sqrt(d)
    t_O = P t_V + (P * t_S) V - rowsum(P * t_S) * O

where P t_V is one more fused SDPA call and the rest is matmuls on P (one (T, T) matrix per head,
what math attention holds too, but no dual-number graph). Its backward (of the primal output) recomputes
the fused forward and differentiates it; the tangent output is not differentiable (MeanFlow takes it
under stop-gradient). Outside forward-mode AD `attention` is SDPA itself, bit for bit.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F


def _forward_mode_active() -> bool:
    """Whether a torch.func transform (jvp, vmap, ...) or a forward-AD dual level is running."""
    return torch._C._functorch.maybe_current_level() is not None or torch.autograd.forward_ad._current_level >= 0


class SDPAWithJVP(torch.autograd.Function):
    """Scaled dot-product attention with a JVP of SDPA calls and matmuls (see the module docstring)."""

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
