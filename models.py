"""SiT: a DiT-style transformer over latent (or pixel) patches, with the parameter names and shapes of
`willisma/SiT`, so the published checkpoints load with `strict=True`. No I/O here (download.py loads)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Mapping, Optional, get_type_hints

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from sit.attention import attention


def _hyperparameter(default: Any, low: float = 0, high: float = 1, *, below_high: bool = False,
                    from_data: bool = False, stored_if_set: bool = False) -> Any:
    """A ModelConfig field: its default, bounds [low, high] ([low, high) with below_high), whether the data
    sets it, and whether it is stored only when set (options the original lacks)."""
    interval = f"[{low:g}, {high:g}{')' if below_high else ']'}"  # as messages write it
    return field(default=default, metadata=dict(low=low, high=high, below_high=below_high, interval=interval,
                                                from_data=from_data, stored_if_set=stored_if_set))


@dataclass(frozen=True)
class ModelConfig:
    """SiT's hyperparameters (its constructor arguments), each with its type, default and bounds (far past
    any published model). A stored config without a field loads with its default."""
    input_size: int = _hyperparameter(32, 1, 4096, from_data=True)
    patch_size: int = _hyperparameter(2, 1, 256)
    in_channels: int = _hyperparameter(4, 1, 256, from_data=True)
    hidden_size: int = _hyperparameter(1152, 1, 65536)
    depth: int = _hyperparameter(28, 1, 1024)
    num_heads: int = _hyperparameter(16, 1, 4096)
    mlp_ratio: float = _hyperparameter(4.0, 1e-3, 64.0)
    class_dropout_prob: float = _hyperparameter(0.1, 0.0, 1.0, below_high=True)  # the original's label dropout
    num_classes: int = _hyperparameter(1000, 1, 10_000_000, from_data=True)
    learn_sigma: bool = _hyperparameter(True)
    mean_flow: bool = _hyperparameter(False, stored_if_set=True)  # a second time input r: MeanFlow (sit/training/meanflow.py)
    # LightningDiT's block options (docs/backbones.md), each off by default: the original's block
    rope: bool = _hyperparameter(False, stored_if_set=True)      # 2-D rotary position embedding of q and k
    swiglu: bool = _hyperparameter(False, stored_if_set=True)    # SwiGLU feed-forward instead of the GELU MLP
    rms_norm: bool = _hyperparameter(False, stored_if_set=True)  # RMSNorm (learned scale) instead of LayerNorm
    qk_norm: bool = _hyperparameter(False, stored_if_set=True)   # q and k normalised per head before attention

    @classmethod
    def network_keys(cls) -> tuple[str, ...]:
        """The hyperparameters of the network's design, not set by the data (train.py's --model-config keys)."""
        return tuple(spec.name for spec in fields(cls) if not spec.metadata["from_data"])

    @classmethod
    def requirement(cls, key: str) -> str:
        """What a value of `key` must be, e.g. "an integer in [1, 1024]"."""
        kind = get_type_hints(cls)[key]
        if kind is bool:
            return "true or false"
        return f"{'an integer' if kind is int else 'a number'} in {_FIELDS[key].metadata['interval']}"

    @classmethod
    def value_problem(cls, key: str, value: Any) -> Optional[str]:
        """What is wrong with one hyperparameter's value (type, bounds), or None. `key` must be a field."""
        kind = get_type_hints(cls)[key]
        if kind is bool:
            return None if isinstance(value, bool) else f"{key} must be true or false, got {value!r}"
        if isinstance(value, bool) or not isinstance(value, int if kind is int else (int, float)):
            return f"{key} must be {'an integer' if kind is int else 'a number'}, got {value!r}"
        spec = _FIELDS[key].metadata
        too_high = value >= spec["high"] if spec["below_high"] else value > spec["high"]
        if value < spec["low"] or too_high or not math.isfinite(value):  # ints past float range: too high
            return f"{key} {value} is outside {spec['interval']}"
        return None

    @classmethod
    def problem_of(cls, stored: Any) -> Optional[str]:
        """One line saying what is wrong with a stored config dict (unknown key, wrong type, out of bounds,
        a size that does not divide), or None; missing keys take their defaults."""
        if not isinstance(stored, Mapping):
            return f"the model config is a {type(stored).__name__}, not a dict"
        unknown = sorted(str(key) for key in stored if key not in _FIELDS)
        if unknown:
            return f"the model config has unknown key(s) {', '.join(unknown)} (valid: {', '.join(_FIELDS)})"
        for key, value in stored.items():
            problem = cls.value_problem(key, value)
            if problem is not None:
                return f"the model config's {problem}"
        config = cls(**stored)
        for size, divisor in (("input_size", "patch_size"), ("hidden_size", "num_heads")):
            if getattr(config, size) % getattr(config, divisor):
                return (f"the model config's {size} {getattr(config, size)} is not divisible by {divisor} "
                        f"{getattr(config, divisor)}")
        return rope_problem(config.hidden_size, config.num_heads) if config.rope else None

    @classmethod
    def from_dict(cls, stored: Mapping[str, Any]) -> "ModelConfig":
        """The config a checkpoint stores ("model_config"); a key it lacks takes the field's default.
        Raises ValueError (the one line of `problem_of`) when it is not a sane config."""
        problem = cls.problem_of(stored)
        if problem is not None:
            raise ValueError(problem)
        return cls(**stored)

    def to_dict(self) -> dict:
        """The stored form, SiT's keyword arguments: every field in order, values as given (no conversion);
        an option the original lacks only when set."""
        return {name: getattr(self, name) for name, spec in _FIELDS.items()
                if not spec.metadata["stored_if_set"] or getattr(self, name) != spec.default}

    def parameter_count(self) -> int:
        """The parameters of SiT(**self.to_dict()) (pos_embed included), counted on the meta device."""
        with torch.device("meta"):
            model = SiT(**self.to_dict())
        return sum(parameter.numel() for parameter in model.parameters())


_FIELDS = {spec.name: spec for spec in fields(ModelConfig)}  # in SiT's argument order


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation. x: (N, T, D); shift, scale: (N, D)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class PatchEmbed(nn.Module):
    """Image (N, C, H, W) to patch tokens (N, T, D) with one strided convolution."""

    def __init__(self, input_size: int, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.patch_size = (patch_size, patch_size)  # a pair, as timm's PatchEmbed
        self.grid_size = input_size // patch_size
        self.num_patches = self.grid_size ** 2
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)                     # (N, D, H/p, W/p)
        return x.flatten(2).transpose(1, 2)  # (N, T, D)


class TimestepEmbedder(nn.Module):
    """Embeds scalar times t in [0, 1] into vectors: sinusoids, then a 2-layer MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size, bias=True), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size, bias=True))
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000) -> torch.Tensor:
        """Sinusoidal embedding of t: (N,) -> (N, dim), cosines first then sines."""
        half = dim // 2
        # the original's operation order, for bitwise-equal embeddings
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half).to(t.device)  # (half,)
        args = t[:, None].float() * freqs[None]               # (N, half)
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Embeds class labels; row `num_classes` is the null label used by classifier-free guidance."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        use_cfg_embedding = int(dropout_prob > 0)
        self.embedding_table = nn.Embedding(num_classes + use_cfg_embedding, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels: torch.Tensor, force_drop_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Replace labels by the null label, at random (training) or where force_drop_ids == 1."""
        drop_ids = (torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
                    if force_drop_ids is None else force_drop_ids == 1)
        return torch.where(drop_ids, self.num_classes, labels)

    def forward(self, labels: torch.Tensor, train: bool, force_drop_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)


def rope_problem(hidden_size: int, num_heads: int) -> Optional[str]:
    """Why 2-D RoPE cannot rotate heads of this size (None when it can): the head size must divide by 4."""
    head_size = hidden_size // num_heads
    if head_size % 4:
        return (f"the model config's rope needs a head size (hidden_size / num_heads) divisible by 4 to cover the "
                f"patch grid's rows and columns, got {hidden_size} / {num_heads} = {head_size}")
    return None


def rope_tables(grid_size: int, head_size: int, device: Optional[torch.device] = None,
                theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """LightningDiT's axial 2-D rotary embedding of a grid_size^2 patch grid: cos, sin (T, head_size) each.
    Channel pairs (2i, 2i+1) turn by one angle: the first half of the head by row, the second by column."""
    quarter = head_size // 4
    frequencies = theta ** (-torch.arange(quarter, dtype=torch.float32, device=device) / quarter)  # (Dh/4,)
    positions = torch.arange(grid_size, dtype=torch.float32, device=device)
    angles = (positions[:, None] * frequencies[None]).repeat_interleave(2, dim=1)  # (G, Dh/2): pairs share
    rows = angles[:, None, :].expand(grid_size, grid_size, -1)     # (G, G, Dh/2): by the row index
    columns = angles[None, :, :].expand(grid_size, grid_size, -1)  # (G, G, Dh/2): by the column index
    angles = torch.cat([rows, columns], dim=-1).reshape(grid_size * grid_size, head_size)  # (T, Dh)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Turn each channel pair (x[2i], x[2i+1]) of x (N, H, T, Dh) by its angle: cos, sin (T, Dh)."""
    pairs = x.unflatten(-1, (-1, 2))                                    # (N, H, T, Dh/2, 2)
    turned = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)  # (N, H, T, Dh): (-x1, x0)
    return x * cos.to(x.dtype) + turned * sin.to(x.dtype)


class RMSNorm(nn.Module):
    """x / rms(x) (computed in float32) times a learned scale started at 1: LightningDiT's (LLaMA's)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        full = x.float()
        return (full * torch.rsqrt(full.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def block_norm(dim: int, rms_norm: bool) -> nn.Module:
    """A block's (and the final layer's) norm: the original's LayerNorm without affine, or RMSNorm."""
    return RMSNorm(dim) if rms_norm else nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)


class Attention(nn.Module):
    """Multi-head self-attention with fused qkv through SDPA; optionally q and k normalised per head
    (qk_norm) and turned by a rotary embedding."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False, rms_norm: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by the number of heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        if qk_norm:
            head_norm = RMSNorm if rms_norm else nn.LayerNorm
            self.q_norm, self.k_norm = head_norm(dim // num_heads), head_norm(dim // num_heads)
        self.qk_norm = qk_norm
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor, rope: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        """x: (N, T, D); rope: rope_tables' (cos, sin) of the T tokens, or None."""
        N, T, D = x.shape
        qkv = self.qkv(x).reshape(N, T, 3, self.num_heads, D // self.num_heads)  # (N, T, 3, H, D/H)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                         # 3 x (N, H, T, D/H)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        x = attention(q, k, v)                                                  # (N, H, T, D/H): SDPA (sit.attention)
        x = x.transpose(1, 2).reshape(N, T, D)                                  # (N, T, D)
        return self.proj(x)


class SwiGLU(nn.Module):
    """silu(x W1) * (x W2), then W3 (w12 holds W1 and W2): LightningDiT's feed-forward."""

    def __init__(self, dim: int, mlp_hidden_dim: int):
        super().__init__()
        hidden_dim = int(2 / 3 * mlp_hidden_dim)  # LightningDiT's rounding: 3072 for XL's 4608
        self.w12 = nn.Linear(dim, 2 * hidden_dim, bias=True)
        self.w3 = nn.Linear(hidden_dim, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.w12(x).chunk(2, dim=-1)  # 2 x (N, T, hidden)
        return self.w3(F.silu(gate) * value)


class TanhGELU(nn.Module):
    """GELU with the tanh approximation, the original's MLP activation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            # the same function written as x * sigmoid(2u): compiled CPU kernels evaluate exp faster
            # than tanh (SiT-S/2 sampler step 9% faster); equal to the eager form to float rounding
            return x * torch.sigmoid(2 * math.sqrt(2 / math.pi) * (x + 0.044715 * x * x * x))
        return F.gelu(x, approximate="tanh")


class Mlp(nn.Module):
    """Two linear layers with a tanh-approximated GELU between them."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim, bias=True)
        self.act = TanhGELU()
        self.fc2 = nn.Linear(hidden_dim, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SiTBlock(nn.Module):
    """A transformer block with adaLN-Zero conditioning (LightningDiT's options: ModelConfig's)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, swiglu: bool = False,
                 rms_norm: bool = False, qk_norm: bool = False):
        super().__init__()
        self.norm1 = block_norm(hidden_size, rms_norm)
        self.attn = Attention(hidden_size, num_heads=num_heads, qk_norm=qk_norm, rms_norm=rms_norm)
        self.norm2 = block_norm(hidden_size, rms_norm)
        self.mlp = (SwiGLU if swiglu else Mlp)(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor,
                rope: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        """x: (N, T, D) tokens; c: (N, D) conditioning; rope: the rotary tables (rope_tables) or None."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """adaLN-modulated norm and a linear map from tokens to patch pixels."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, rms_norm: bool = False):
        super().__init__()
        self.norm_final = block_norm(hidden_size, rms_norm)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (N, T, p * p * C_out)


class SiT(nn.Module):
    """Scalable Interpolant Transformer; `self.config`: its arguments (ModelConfig's fields) as a dict."""

    def __init__(self, input_size: int = ModelConfig.input_size, patch_size: int = ModelConfig.patch_size,
                 in_channels: int = ModelConfig.in_channels, hidden_size: int = ModelConfig.hidden_size,
                 depth: int = ModelConfig.depth, num_heads: int = ModelConfig.num_heads,
                 mlp_ratio: float = ModelConfig.mlp_ratio,
                 class_dropout_prob: float = ModelConfig.class_dropout_prob,
                 num_classes: int = ModelConfig.num_classes, learn_sigma: bool = ModelConfig.learn_sigma,
                 mean_flow: bool = ModelConfig.mean_flow, rope: bool = ModelConfig.rope,
                 swiglu: bool = ModelConfig.swiglu, rms_norm: bool = ModelConfig.rms_norm,
                 qk_norm: bool = ModelConfig.qk_norm):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input size {input_size} is not divisible by the patch size {patch_size}")
        if rope and rope_problem(hidden_size, num_heads):
            raise ValueError(rope_problem(hidden_size, num_heads))
        arguments = locals()
        # a plain dict (ModelConfig.to_dict), as checkpoints store it
        self.config = ModelConfig(**{name: arguments[name] for name in _FIELDS}).to_dict()
        self.rope = rope
        self.learn_sigma = learn_sigma
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.grad_checkpointing = False  # recompute each block in backward to save memory

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        # MeanFlow: the interval r - t (t=0 noise, t=1 data; r >= t) embedded and added to c, zero at the start
        self.r_embedder = TimestepEmbedder(hidden_size) if mean_flow else None
        # Fixed sin-cos embedding; a Parameter (frozen) so that checkpoints keep the original's key.
        self.pos_embed = nn.Parameter(torch.zeros(1, self.x_embedder.num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([SiTBlock(hidden_size, num_heads, mlp_ratio=mlp_ratio, swiglu=swiglu,
                                              rms_norm=rms_norm, qk_norm=qk_norm) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, rms_norm=rms_norm)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """The original's initialisation: xavier linears, zeroed adaLN and output layers."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)
        if self.pos_embed.device.type != "meta":
            grid = self.x_embedder.grid_size
            self.pos_embed.data.copy_(get_2d_sincos_pos_embed(self.pos_embed.shape[-1], grid).unsqueeze(0))
        # Patch embedding initialised like a linear layer rather than a convolution:
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))  # (D, C * p * p)
        nn.init.constant_(self.x_embedder.proj.bias, 0)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        if self.r_embedder is not None:  # zero: a velocity model's weights give u(x, t, r) = v(x, t) at the start
            nn.init.normal_(self.r_embedder.mlp[0].weight, std=0.02)
            nn.init.constant_(self.r_embedder.mlp[2].weight, 0)
        zeroed = [block.adaLN_modulation[-1] for block in self.blocks]
        for layer in zeroed + [self.final_layer.adaLN_modulation[-1], self.final_layer.linear]:
            nn.init.constant_(layer.weight, 0)
            nn.init.constant_(layer.bias, 0)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, p * p * C) patch tokens to (N, C, H, W) images."""
        c = self.out_channels
        p = self.patch_size
        h = w = int(x.shape[1] ** 0.5)
        assert h * w == x.shape[1], "tokens do not form a square grid"
        x = x.reshape(x.shape[0], h, w, p, p, c)           # (N, h, w, p, p, C)
        x = torch.einsum("nhwpqc->nchpwq", x)              # (N, C, h, p, w, p)
        return x.reshape(x.shape[0], c, h * p, w * p)      # (N, C, H, W)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, hidden_at: Optional[int] = None,
                r: Optional[torch.Tensor] = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The model output (velocity, score or noise) at x: (N, C, H, W), t: (N,) in [0, 1], y: (N,) labels
        (`num_classes`: null) -> (N, C, H, W); with hidden_at (block 1..depth) also the tokens (N, T, D) after
        it. r: (N,) MeanFlow's step end (r >= t): the average velocity over [t, r], labels never dropped."""
        if hidden_at is not None and not 1 <= hidden_at <= len(self.blocks):
            raise ValueError(f"hidden_at must be a block number in 1..{len(self.blocks)}, got {hidden_at}")
        x = self.x_embedder(x) + self.pos_embed  # (N, T, D), T = H * W / p ** 2
        interval = None if self.r_embedder is None else (torch.zeros_like(t) if r is None else r - t)  # (N,)
        t = self.t_embedder(t)                   # (N, D)
        y = self.y_embedder(y, self.training and r is None)  # (N, D)
        c = t + y                                # (N, D)
        if self.r_embedder is not None:
            c = c + self.r_embedder(interval)   # (N, D)
        rope = (rope_tables(self.x_embedder.grid_size, x.shape[-1] // self.num_heads, x.device)
                if self.rope else None)          # 2 x (T, D/H): made per call, so no buffer to keep or load
        hidden = None
        for number, block in enumerate(self.blocks, start=1):
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, c, rope, use_reentrant=False)
            else:
                x = block(x, c, rope)            # (N, T, D)
            if number == hidden_at:
                hidden = x
        x = self.final_layer(x, c)               # (N, T, p * p * C_out)
        x = self.unpatchify(x)                   # (N, C_out, H, W)
        if self.learn_sigma:
            x, _ = x.chunk(2, dim=1)             # (N, C, H, W): the sigma half is unused
        return x if hidden_at is None else (x, hidden)

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float,
                         guide_all_channels: bool = False, cfg_interval: tuple[float, float] = (0.0, 1.0),
                         r: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Classifier-free guidance: x (2N, C, H, W) (first half used), t (2N,), y (2N,) whose last N are the
        null label -> (2N, C, H, W), both halves guided. As the original, only the first 3 channels are guided
        unless guide_all_channels; only samples with t in cfg_interval are; r: MeanFlow's, for forward."""
        half = x[: len(x) // 2]
        combined = torch.cat([half, half], dim=0)           # (2N, C, H, W)
        model_out = self.forward(combined, t, y) if r is None else self.forward(combined, t, y, r=r)
        num_guided = model_out.shape[1] if guide_all_channels else 3
        eps, rest = model_out[:, :num_guided], model_out[:, num_guided:]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        scale = _interval_scale(t[: len(t) // 2], cfg_scale, cfg_interval, eps.ndim)
        half_eps = uncond_eps + scale * (cond_eps - uncond_eps)
        eps = torch.cat([half_eps, half_eps], dim=0)
        return torch.cat([eps, rest], dim=1)


def has_null_class(config: dict) -> bool:
    """Whether a SiT of this config has the null label of classifier-free guidance (label dropout > 0)."""
    return config.get("class_dropout_prob", ModelConfig.class_dropout_prob) > 0


def _interval_scale(t: torch.Tensor, cfg_scale: float, interval: tuple[float, float], ndim: int) -> Any:
    """The guidance scale per sample: cfg_scale inside the interval, 1 outside. t: (N,)."""
    low, high = interval
    if low <= 0.0 and high >= 1.0:
        return cfg_scale  # guidance everywhere: keep the original's arithmetic exactly
    inside = (t >= low) & (t <= high)
    scale = torch.where(inside, torch.full_like(t, cfg_scale), torch.ones_like(t))
    return scale.view(-1, *([1] * (ndim - 1)))  # (N, 1, 1, 1)


def get_1d_sincos_pos_embed_from_grid(embed_dim: int, pos: torch.Tensor) -> torch.Tensor:
    """pos: (M,) positions -> (M, embed_dim) embedding, sines first then cosines (float64)."""
    if embed_dim % 2:
        raise ValueError(f"embedding dimension {embed_dim} must be even")
    omega = torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000 ** omega                       # (D/2,)
    out = pos.reshape(-1).double()[:, None] * omega[None]  # (M, D/2)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> torch.Tensor:
    """Fixed 2-D embedding of a grid_size^2 grid (MAE's order): (grid_size ** 2, embed_dim) float32."""
    coords = torch.arange(grid_size, dtype=torch.float64)
    grid_w, grid_h = torch.meshgrid(coords, coords, indexing="xy")  # each (G, G); w varies along columns
    emb_first = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid_w)   # (G * G, D/2)
    emb_second = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid_h)  # (G * G, D/2)
    return torch.cat([emb_first, emb_second], dim=1).float()                # (G * G, D)


# name -> (depth, hidden_size, patch_size, num_heads)
MODEL_SHAPES = {
    "SiT-XL/2": (28, 1152, 2, 16), "SiT-XL/4": (28, 1152, 4, 16), "SiT-XL/8": (28, 1152, 8, 16),
    "SiT-L/2": (24, 1024, 2, 16), "SiT-L/4": (24, 1024, 4, 16), "SiT-L/8": (24, 1024, 8, 16),
    "SiT-B/2": (12, 768, 2, 12), "SiT-B/4": (12, 768, 4, 12), "SiT-B/8": (12, 768, 8, 12),
    "SiT-S/2": (12, 384, 2, 6), "SiT-S/4": (12, 384, 4, 6), "SiT-S/8": (12, 384, 8, 6),
    # patch 1, for f16 latents (VA-VAE's 16x16 at 256 px), and LightningDiT's published models
    "SiT-XL/1": (28, 1152, 1, 16), "SiT-L/1": (24, 1024, 1, 16), "SiT-B/1": (12, 768, 1, 12),
    "LightningDiT-XL/1": (28, 1152, 1, 16), "LightningDiT-B/1": (12, 768, 1, 12),
}
BLOCK_OPTIONS = ("rope", "swiglu", "rms_norm", "qk_norm")  # part of a name's design (model_name_for_config)
# LightningDiT's release (configs/lightningdit_xl_vavae_f16d32.yaml): RoPE, SwiGLU, RMSNorm, no learned sigma;
# QK-norm off there (its comment: turn it on against NaN losses, at some cost in convergence)
LIGHTNINGDIT = dict(rope=True, swiglu=True, rms_norm=True, learn_sigma=False)
MODEL_OPTIONS = {"LightningDiT-XL/1": LIGHTNINGDIT, "LightningDiT-B/1": LIGHTNINGDIT}  # name -> SiT arguments


def model_design(name: str) -> dict:
    """The SiT arguments a --model name fixes: its shape and its options (MODEL_OPTIONS)."""
    depth, hidden_size, patch_size, num_heads = MODEL_SHAPES[name]
    return dict(depth=depth, hidden_size=hidden_size, patch_size=patch_size, num_heads=num_heads,
                **MODEL_OPTIONS.get(name, {}))


def _make_constructor(name: str):
    design = model_design(name)

    def build(**kwargs: Any) -> SiT:
        return SiT(**{**design, **kwargs})

    build.__name__ = name.replace("-", "_").replace("/", "_")
    options = ", ".join(f"{key}={value}" for key, value in MODEL_OPTIONS.get(name, {}).items())
    build.__doc__ = (f"{name}: depth {design['depth']}, width {design['hidden_size']}, patch {design['patch_size']}, "
                     f"{design['num_heads']} heads{'; ' + options if options else ''}.")
    return build


SiT_models = {name: _make_constructor(name) for name in MODEL_SHAPES}
SiT_XL_2, SiT_XL_4, SiT_XL_8 = SiT_models["SiT-XL/2"], SiT_models["SiT-XL/4"], SiT_models["SiT-XL/8"]
SiT_L_2, SiT_L_4, SiT_L_8 = SiT_models["SiT-L/2"], SiT_models["SiT-L/4"], SiT_models["SiT-L/8"]
SiT_B_2, SiT_B_4, SiT_B_8 = SiT_models["SiT-B/2"], SiT_models["SiT-B/4"], SiT_models["SiT-B/8"]
SiT_S_2, SiT_S_4, SiT_S_8 = SiT_models["SiT-S/2"], SiT_models["SiT-S/4"], SiT_models["SiT-S/8"]
SiT_XL_1, SiT_L_1, SiT_B_1 = SiT_models["SiT-XL/1"], SiT_models["SiT-L/1"], SiT_models["SiT-B/1"]
LightningDiT_XL_1, LightningDiT_B_1 = SiT_models["LightningDiT-XL/1"], SiT_models["LightningDiT-B/1"]

# Head counts of the published widths (not recoverable from parameter shapes).
HEADS_FOR_WIDTH = {hidden: heads for _, hidden, _, heads in MODEL_SHAPES.values()}


def model_name_for_config(config: dict) -> Optional[str]:
    """The SiT_models name whose depth/width/patch/heads and block options (BLOCK_OPTIONS) match `config`, or None."""
    for name in MODEL_SHAPES:
        design = model_design(name)
        if all(config.get(key, getattr(ModelConfig, key)) == design.get(key, getattr(ModelConfig, key))
               for key in ("depth", "hidden_size", "patch_size", "num_heads", *BLOCK_OPTIONS)):
            return name
    return None


def model_config_from_state_dict(state_dict: dict) -> dict:
    """SiT constructor arguments read back from parameter shapes (ValueError for another dict). The head
    count comes from QK-norm's weights, else the published widths, else head size 64; RoPE is read as off."""
    required = ["pos_embed", "x_embedder.proj.weight", "y_embedder.embedding_table.weight", "final_layer.linear.weight"]
    missing = [key for key in required if key not in state_dict]
    if missing:
        raise ValueError(f"not a SiT state dict: missing {', '.join(missing)}")
    _, num_patches, hidden_size = state_dict["pos_embed"].shape
    _, in_channels, patch_size, _ = state_dict["x_embedder.proj.weight"].shape
    depth = len({key.split(".")[1] for key in state_dict if key.startswith("blocks.") and key.endswith("attn.qkv.weight")})
    grid = math.isqrt(num_patches)
    out_channels = state_dict["final_layer.linear.weight"].shape[0] // (patch_size * patch_size)
    swiglu = "blocks.0.mlp.w12.weight" in state_dict
    if not depth:
        mlp_ratio = 4.0
    elif swiglu:  # SwiGLU keeps int(2/3 of the GELU MLP's hidden size): the published ratio 4 when it fits
        hidden = state_dict["blocks.0.mlp.w12.weight"].shape[0] // 2
        ratios = [4.0] + [width / hidden_size for width in range(int(1.5 * hidden), int(1.5 * hidden) + 3)]
        mlp_ratio = next((ratio for ratio in ratios if int(2 / 3 * int(hidden_size * ratio)) == hidden), ratios[1])
    else:
        mlp_ratio = state_dict["blocks.0.mlp.fc1.weight"].shape[0] / hidden_size
    qk_norm = "blocks.0.attn.q_norm.weight" in state_dict  # then its weights have the head size
    num_heads = (hidden_size // state_dict["blocks.0.attn.q_norm.weight"].shape[0] if qk_norm
                 else HEADS_FOR_WIDTH.get(hidden_size, max(1, hidden_size // 64)))
    return ModelConfig(  # the rest (label dropout) as the fields' defaults
        input_size=grid * patch_size, patch_size=patch_size, in_channels=in_channels, hidden_size=hidden_size,
        depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
        num_classes=state_dict["y_embedder.embedding_table.weight"].shape[0] - 1,
        learn_sigma=out_channels == 2 * in_channels, swiglu=swiglu,
        rms_norm="final_layer.norm_final.weight" in state_dict, qk_norm=qk_norm,
    ).to_dict()
