"""Layers shared by the transformer backbones: norms, GEGLU, Fourier features, axial RoPE, token merge/split.

Tokens live on a grid in channels-last layout, [N, H, W, C]. Norms, cosine-similarity scaling and RoPE compute
in float32 and cast back, so that the models run under bf16/fp16 autocast without losing precision where it
matters (k-diffusion does the same).
"""

import math

import torch
from torch import nn
from torch.nn import functional as F


def zero_init(layer):
    """Zero a layer's parameters; residual branches that start at zero make a fresh network the identity."""
    for param in layer.parameters():
        nn.init.zeros_(param)
    return layer


def rms_norm(x, scale, eps=1e-6):
    """x / rms(x) * scale over the last dimension, with the statistics in float32."""
    dtype = torch.promote_types(torch.promote_types(x.dtype, scale.dtype), torch.float32)
    mean_sq = torch.mean(x.to(dtype) ** 2, dim=-1, keepdim=True)
    scale = scale.to(dtype) * torch.rsqrt(mean_sq + eps)
    return x * scale.to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, features, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(features))

    def extra_repr(self):
        return f"features={self.scale.shape[0]}, eps={self.eps}"

    def forward(self, x):
        return rms_norm(x, self.scale, self.eps)


class AdaRMSNorm(nn.Module):
    """RMSNorm whose gain is 1 + Linear(cond), one per sample; scale only, no shift (HDiT paper, section 3).

    The projection starts at zero so the gain starts at exactly 1.
    """

    def __init__(self, features, cond_features, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.linear = zero_init(nn.Linear(cond_features, features, bias=False))

    def extra_repr(self):
        return f"eps={self.eps}"

    def forward(self, x, cond):
        scale = 1 + self.linear(cond)  # [N, C]
        scale = scale.view(scale.shape[0], *[1] * (x.ndim - 2), scale.shape[1])  # broadcast over the token axes
        return rms_norm(x, scale, self.eps)


class LinearGEGLU(nn.Linear):
    """x -> a * gelu(b) with [a, b] = x @ W^T: one Linear of 2 * d_ff outputs, gated down to d_ff."""

    def __init__(self, in_features, d_ff, bias=False):
        super().__init__(in_features, 2 * d_ff, bias=bias)
        self.d_ff = d_ff

    def extra_repr(self):
        return f"in_features={self.in_features}, d_ff={self.d_ff}, bias={self.bias is not None}"

    def forward(self, x):
        x, gate = super().forward(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FourierFeatures(nn.Module):
    """[cos(2 pi x W^T), sin(2 pi x W^T)] with a fixed random W ~ N(0, std^2) (Tancik et al. 2020).

    W is a buffer, not a parameter: it is saved with the model but never trained.
    """

    def __init__(self, in_features, out_features, std=1.0):
        super().__init__()
        if out_features % 2:
            raise ValueError(f"FourierFeatures needs an even number of output features, got {out_features}")
        self.register_buffer("weight", torch.randn(out_features // 2, in_features) * std)

    def forward(self, x):
        # The phases reach tens of radians, where bf16 would be ~0.1 rad off, so they stay in float32 under autocast:
        # a broadcast product and sum rather than a matmul, which autocast would run in bf16. in_features is small.
        f = 2 * math.pi * torch.sum(x.float()[..., None, :] * self.weight.float(), dim=-1)
        return torch.cat((f.cos(), f.sin()), dim=-1)


# Axial rotary position embeddings


def make_axial_pos(h, w, dtype=None, device=None):
    """Centres of an h x w grid of cells, [h, w, 2] as (y, x); the longer side spans [-1, 1] and the shorter side
    keeps the aspect ratio, so a token's position means the same place in the image at any resolution."""
    aspect = w / h
    y_max, x_max = (1 / aspect, 1.0) if aspect > 1 else (1.0, aspect)

    def centres(limit, n):
        edges = torch.linspace(-limit, limit, n + 1, dtype=dtype, device=device)
        return (edges[:-1] + edges[1:]) / 2

    return torch.stack(torch.meshgrid(centres(y_max, h), centres(x_max, w), indexing="ij"), dim=-1)


def downscale_pos(pos):
    """Positions of the 2x2-merged grid: the mean of each 2x2 block of [h, w, 2] positions."""
    h, w, e = pos.shape
    return pos.view(h // 2, 2, w // 2, 2, e).mean(dim=(1, 3))


class AxialRoPE(nn.Module):
    """Rotary angles for 2-D positions, different frequencies for every head (k-diffusion's newest variant).

    dim is the number of rotated features per head (half of d_head in HDiT). Of the dim // 2 rotation pairs, half
    turn with y and half with x. The n_heads * dim // 4 frequencies are log-spaced in [pi, 10 pi) and dealt out
    round-robin to the heads, so together the heads cover the band finely.
    """

    def __init__(self, dim, n_heads):
        super().__init__()
        n_freqs = dim // 4
        log_freqs = torch.linspace(math.log(math.pi), math.log(10 * math.pi), n_heads * n_freqs + 1)[:-1]
        self.register_buffer("freqs", log_freqs.exp().view(n_freqs, n_heads).T.contiguous())  # [heads, dim // 4]

    def extra_repr(self):
        return f"dim={self.freqs.shape[1] * 4}, n_heads={self.freqs.shape[0]}"

    def forward(self, pos):
        """pos [..., 2] -> theta [..., heads, dim // 2], in float32."""
        pos = pos.float()
        theta_y = pos[..., None, 0:1] * self.freqs
        theta_x = pos[..., None, 1:2] * self.freqs
        return torch.cat((theta_y, theta_x), dim=-1)


def apply_rotary_emb(x, theta):
    """Rotate feature pairs (x[i], x[i + d]), i < d = theta.shape[-1], by theta; features from 2d on pass through."""
    d = theta.shape[-1]
    x1, x2, rest = x[..., :d].float(), x[..., d : 2 * d].float(), x[..., 2 * d :]
    cos, sin = theta.cos(), theta.sin()
    y1 = x1 * cos - x2 * sin
    y2 = x2 * cos + x1 * sin
    return torch.cat((y1.to(x.dtype), y2.to(x.dtype), rest), dim=-1)


def scale_for_cosine_sim(q, k, scale, eps=1e-6):
    """q, k -> sqrt(scale) q / |q|, sqrt(scale) k / |k|: attention logits become scale * cos(q, k), bounded, which
    keeps attention stable without a softmax temperature (HDiT paper, section 3, after Swin v2)."""
    sqrt_scale = scale.float().sqrt()
    q_scale = sqrt_scale * torch.rsqrt(torch.sum(q.float() ** 2, dim=-1, keepdim=True) + eps)
    k_scale = sqrt_scale * torch.rsqrt(torch.sum(k.float() ** 2, dim=-1, keepdim=True) + eps)
    return q * q_scale.to(q.dtype), k * k_scale.to(k.dtype)


# Token merging and splitting: patching in and out, and moving between hourglass levels


def _check_divisible(h, w, patch_size, what):
    ph, pw = patch_size
    if h % ph or w % pw:
        raise ValueError(f"{what}: a {h}x{w} token grid cannot be cut into {ph}x{pw} patches")


class TokenMerge(nn.Module):
    """[N, H, W, C] -> [N, H / ph, W / pw, out]: concatenate each ph x pw patch of tokens, then project."""

    def __init__(self, in_features, out_features, patch_size=(2, 2)):
        super().__init__()
        self.patch_size = tuple(patch_size)
        self.proj = nn.Linear(in_features * self.patch_size[0] * self.patch_size[1], out_features, bias=False)

    def forward(self, x):
        n, h, w, c = x.shape
        ph, pw = self.patch_size
        _check_divisible(h, w, self.patch_size, "TokenMerge")
        x = x.view(n, h // ph, ph, w // pw, pw, c).permute(0, 1, 3, 2, 4, 5).reshape(n, h // ph, w // pw, ph * pw * c)
        return self.proj(x)


class TokenSplitWithoutSkip(nn.Module):
    """[N, h, w, C] -> [N, h * ph, w * pw, out]: project each token to a ph x pw patch of tokens."""

    def __init__(self, in_features, out_features, patch_size=(2, 2)):
        super().__init__()
        self.patch_size = tuple(patch_size)
        self.proj = nn.Linear(in_features, out_features * self.patch_size[0] * self.patch_size[1], bias=False)

    def forward(self, x):
        x = self.proj(x)
        n, h, w, _ = x.shape
        ph, pw = self.patch_size
        x = x.view(n, h, w, ph, pw, -1).permute(0, 1, 3, 2, 4, 5)
        return x.reshape(n, h * ph, w * pw, x.shape[-1])


class TokenSplit(TokenSplitWithoutSkip):
    """Split, then blend with the skip connection of the same level: lerp(skip, x, fac), with fac learned from
    0.5 (HDiT paper, section 3.1: a learned linear interpolation in place of U-Net's concatenation)."""

    def __init__(self, in_features, out_features, patch_size=(2, 2)):
        super().__init__(in_features, out_features, patch_size)
        self.fac = nn.Parameter(torch.full([1], 0.5))

    def forward(self, x, skip):
        x = super().forward(x)
        return torch.lerp(skip, x, self.fac.to(x.dtype))
