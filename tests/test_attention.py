"""sit.attention: SDPA whose JVP is computed by SDPA calls and matmuls, checked against torch.func.jvp of
math attention (fp32, 1e-5), against finite differences (fp64), in gradients, under torch.compile, and
after differentiable ops on q and k (QK-norm, a RoPE-like rotation) as the backbone options put there."""
import math

import pytest
import torch
import torch.nn.functional as F

from models import SiT
from sit.attention import SDPAWithJVP, attention


def math_attention(q, k, v):
    """Softmax attention written out: (N, H, T, Dh)."""
    return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1) @ v


def inputs(dtype=torch.float32, shape=(2, 3, 7, 8), seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator, dtype=dtype) for _ in range(6)]  # q, k, v, t_q, t_k, t_v


def test_jvp_equals_the_math_attentions_jvp_in_fp32():
    q, k, v, tq, tk, tv = inputs()
    out, tangent = torch.func.jvp(attention, (q, k, v), (tq, tk, tv))
    ref_out, ref_tangent = torch.func.jvp(math_attention, (q, k, v), (tq, tk, tv))
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-5)
    torch.testing.assert_close(tangent, ref_tangent, rtol=0, atol=1e-5)
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v))  # the primal is SDPA itself


def test_jvp_equals_central_finite_differences_in_fp64():
    q, k, v, tq, tk, tv = inputs(torch.float64)
    eps = 1e-6
    _, tangent = torch.func.jvp(attention, (q, k, v), (tq, tk, tv))
    plus = math_attention(q + eps * tq, k + eps * tk, v + eps * tv)
    minus = math_attention(q - eps * tq, k - eps * tk, v - eps * tv)
    torch.testing.assert_close(tangent, (plus - minus) / (2 * eps), rtol=1e-6, atol=1e-8)


def test_forward_ad_dual_numbers_take_the_same_jvp():
    import torch.autograd.forward_ad as fwAD

    q, k, v, tq, tk, tv = inputs()
    with fwAD.dual_level():
        dual = attention(fwAD.make_dual(q, tq), fwAD.make_dual(k, tk), fwAD.make_dual(v, tv))
        tangent = fwAD.unpack_dual(dual).tangent
    _, ref = torch.func.jvp(math_attention, (q, k, v), (tq, tk, tv))
    torch.testing.assert_close(tangent, ref, rtol=0, atol=1e-5)


def test_gradients_of_the_primal_and_of_the_tangent_equal_the_math_attentions():
    q, k, v, tq, tk, tv = inputs()
    weights = torch.randn_like(q)
    grads = {}
    for name, function in (("sdpa", attention), ("math", math_attention)):
        leaves = [tensor.clone().requires_grad_() for tensor in (q, k, v)]
        out, tangent = torch.func.jvp(function, tuple(leaves), (tq, tk, tv))
        primal_grads = torch.autograd.grad((out * weights).sum(), leaves, retain_graph=True)
        tangent_grads = torch.autograd.grad((tangent * weights).sum(), leaves)
        grads[name] = primal_grads + tangent_grads
    for ours, reference in zip(grads["sdpa"], grads["math"]):
        torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)
    leaves = [tensor.clone().requires_grad_() for tensor in (q, k, v)]  # the Function's own backward (no transform)
    (SDPAWithJVP.apply(*leaves) * weights).sum().backward()
    reference = torch.autograd.grad((math_attention(q.requires_grad_(), k.requires_grad_(), v.requires_grad_())
                                     * weights).sum(), (q, k, v))
    for leaf, expected in zip(leaves, reference):
        torch.testing.assert_close(leaf.grad, expected, rtol=0, atol=1e-5)


def qk_norm_and_rotation(q, k):
    """Differentiable ops a backbone puts before attention: RMS-normalised q, k, then a RoPE-like rotation."""
    q, k = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) for x in (q, k))
    angles = torch.arange(q.shape[-2])[:, None] * torch.linspace(0.1, 1.0, q.shape[-1] // 2)[None]  # (T, Dh/2)
    cos, sin = angles.cos(), angles.sin()

    def rotate(x):
        first, second = x[..., ::2], x[..., 1::2]
        return torch.cat([first * cos - second * sin, first * sin + second * cos], dim=-1)
    return rotate(q), rotate(k)


def test_jvp_through_qk_norm_and_rotary_ops_before_attention():
    q, k, v, tq, tk, tv = inputs()

    def block(function):
        return lambda q, k, v: function(*qk_norm_and_rotation(q, k), v)
    _, tangent = torch.func.jvp(block(attention), (q, k, v), (tq, tk, tv))
    _, reference = torch.func.jvp(block(math_attention), (q, k, v), (tq, tk, tv))
    torch.testing.assert_close(tangent, reference, rtol=0, atol=1e-5)


def test_sit_jvp_equals_the_sit_with_math_attention(monkeypatch):
    torch.manual_seed(0)
    model = SiT(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=2, num_heads=2, num_classes=4,
                learn_sigma=False, mean_flow=True)
    for parameter in model.parameters():  # out of the zero start, so every path carries a derivative
        parameter.data.add_(0.05 * torch.randn_like(parameter))
    x, v = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    t, r, y = torch.tensor([0.2, 0.5]), torch.tensor([0.7, 0.5]), torch.tensor([1, 3])

    def call(x, r, t):
        return model(x, t, y, r=r)
    primals, tangents = (x, r, t), (v, torch.zeros(2), torch.ones(2))
    out, dudt = torch.func.jvp(call, primals, tangents)
    monkeypatch.setattr("models.attention", math_attention)
    ref_out, ref_dudt = torch.func.jvp(call, primals, tangents)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-5)
    torch.testing.assert_close(dudt, ref_dudt, rtol=0, atol=1e-5)


def test_compiled_attention_equals_eager_in_values_and_gradients():
    q, k, v, tq, tk, tv = inputs(shape=(1, 2, 5, 4))
    compiled = torch.compile(lambda q, k, v: attention(*qk_norm_and_rotation(q, k), v), backend="eager")
    leaves = [tensor.clone().requires_grad_() for tensor in (q, k, v)]
    out = compiled(*leaves)
    out.sum().backward()
    reference = math_attention(*qk_norm_and_rotation(*(x.requires_grad_() for x in (q, k))), v.requires_grad_())
    reference.sum().backward()
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-5)
    for leaf, expected in zip(leaves, (q, k, v)):
        torch.testing.assert_close(leaf.grad, expected.grad, rtol=0, atol=1e-5)
    _, tangent = torch.func.jvp(torch.compile(attention, backend="eager"), (q.detach(), k.detach(), v.detach()),
                                (tq, tk, tv))
    _, expected = torch.func.jvp(math_attention, (q.detach(), k.detach(), v.detach()), (tq, tk, tv))
    torch.testing.assert_close(tangent, expected, rtol=0, atol=1e-5)
