"""HDiT, the Hourglass Diffusion Transformer (Crowson et al. 2024, arXiv:2401.11605).

The architecture of k-diffusion's image_transformer_v2: patches in, a U-Net-shaped hierarchy of transformer levels
(2x2 token merges going down, splits with learned skip interpolation going up), patches out. Every block is
pre-norm with AdaRMSNorm driven by a mapping network of the noise level, augmentation and class, and every
residual branch ends in a zero-initialised projection, so the fresh model outputs exactly 0.

Tokens are [N, H, W, C] throughout; attention heads are [N, H, W, heads, d] (see .attention).
"""

import torch
from torch import nn

from .attention import GlobalAttention, NeighborhoodAttention, ShiftedWindowAttention
from .conditioning import AUG_COND_FEATURES, check_conditioning, checkpoint, param_groups
from .layers import (
    AdaRMSNorm,
    AxialRoPE,
    FourierFeatures,
    LinearGEGLU,
    RMSNorm,
    TokenMerge,
    TokenSplit,
    TokenSplitWithoutSkip,
    apply_rotary_emb,
    downscale_pos,
    make_axial_pos,
    scale_for_cosine_sim,
    zero_init,
)

ATTENTION_TYPES = ("global", "neighborhood", "shifted-window", "none")
DEFAULT_SELF_ATTN = {"type": "neighborhood", "d_head": 64, "kernel_size": 7}
DEFAULT_MIDDLE_SELF_ATTN = {"type": "global", "d_head": 64}


# Self-attention specs: {"type": "global", "d_head": 64} | {"type": "neighborhood", "d_head": 64, "kernel_size": 7}
# | {"type": "shifted-window", "d_head": 64, "window_size": 8} | {"type": "none"}


def check_self_attn(spec, width, where):
    kind = spec.get("type")
    if kind not in ATTENTION_TYPES:
        raise ValueError(f"{where}: self-attention type must be one of {ATTENTION_TYPES}, got {kind!r}")
    needed = {"global": ["d_head"], "neighborhood": ["d_head", "kernel_size"],
              "shifted-window": ["d_head", "window_size"], "none": []}[kind]
    for key in needed:
        if not isinstance(spec.get(key), int) or spec[key] < 1:
            raise ValueError(f"{where}: {kind} attention needs a positive integer {key!r}, got {spec.get(key)!r}")
    if kind != "none" and width % spec["d_head"]:
        raise ValueError(f"{where}: width {width} is not a multiple of d_head {spec['d_head']}")


def make_attention(spec, layer_index):
    """The attention op of one layer, or None for feed-forward-only levels."""
    kind = spec["type"]
    if kind == "global":
        return GlobalAttention(backend=spec.get("backend", "auto"))
    if kind == "neighborhood":
        return NeighborhoodAttention(spec["kernel_size"], backend=spec.get("backend", "auto"))
    if kind == "shifted-window":
        # Layers alternate plain and half-shifted windows so that information crosses window borders (Swin).
        shift = spec["window_size"] // 2 if layer_index % 2 else 0
        return ShiftedWindowAttention(spec["window_size"], shift)
    return None


# Transformer blocks


class SelfAttentionBlock(nn.Module):
    """x + out_proj(attention(rope(cosine-sim(q, k)), v)) of AdaRMSNorm(x); RoPE turns half of each head's dims."""

    def __init__(self, d_model, d_head, cond_features, attention, dropout=0.0):
        super().__init__()
        self.d_head = d_head
        self.n_heads = d_model // d_head
        self.norm = AdaRMSNorm(d_model, cond_features)
        self.qkv_proj = nn.Linear(d_model, 3 * d_model, bias=False)
        self.scale = nn.Parameter(torch.full([self.n_heads], 10.0))  # learned per-head logit scale
        self.pos_emb = AxialRoPE(d_head // 2, self.n_heads)
        self.attention = attention
        self.dropout = nn.Dropout(dropout)
        self.out_proj = zero_init(nn.Linear(d_model, d_model, bias=False))

    def extra_repr(self):
        return f"d_head={self.d_head}, n_heads={self.n_heads}"

    def forward(self, x, pos, cond):
        skip = x
        x = self.norm(x, cond)
        q, k, v = self.qkv_proj(x).unflatten(-1, (3, self.n_heads, self.d_head)).unbind(-3)  # [N, H, W, heads, d]
        q, k = scale_for_cosine_sim(q, k, self.scale[:, None])
        theta = self.pos_emb(pos)  # [H, W, heads, d_head // 4]
        q, k = apply_rotary_emb(q, theta), apply_rotary_emb(k, theta)
        x = self.attention(q, k, v).flatten(-2)
        x = self.dropout(x)
        return skip + self.out_proj(x)


class FeedForwardBlock(nn.Module):
    """x + down(dropout(GEGLU(AdaRMSNorm(x))))."""

    def __init__(self, d_model, d_ff, cond_features, dropout=0.0):
        super().__init__()
        self.norm = AdaRMSNorm(d_model, cond_features)
        self.up_proj = LinearGEGLU(d_model, d_ff, bias=False)
        self.dropout = nn.Dropout(dropout)
        self.down_proj = zero_init(nn.Linear(d_ff, d_model, bias=False))

    def forward(self, x, cond):
        skip = x
        x = self.norm(x, cond)
        x = self.dropout(self.up_proj(x))
        return skip + self.down_proj(x)


class TransformerLayer(nn.Module):
    """A self-attention block (absent for attention type "none") and a feed-forward block."""

    def __init__(self, d_model, d_ff, cond_features, self_attn, layer_index, dropout=0.0):
        super().__init__()
        attention = make_attention(self_attn, layer_index)
        self.self_attn = (
            SelfAttentionBlock(d_model, self_attn["d_head"], cond_features, attention, dropout)
            if attention is not None else None
        )
        self.ff = FeedForwardBlock(d_model, d_ff, cond_features, dropout)

    def forward(self, x, pos, cond, checkpointing=False):
        if self.self_attn is not None:
            x = checkpoint(self.self_attn, x, pos, cond, enabled=checkpointing)
        return checkpoint(self.ff, x, cond, enabled=checkpointing)


class Level(nn.ModuleList):
    def forward(self, x, pos, cond, checkpointing=False):
        for layer in self:
            if layer.self_attn is not None:  # eager: the layer itself may be compiled (see GridAttention.prepare)
                layer.self_attn.attention.prepare(x.shape[1], x.shape[2], x.device)
            x = layer(x, pos, cond, checkpointing)
        return x


# Mapping network: the conditioning vector shared by every AdaRMSNorm


class MappingFeedForwardBlock(nn.Module):
    def __init__(self, d_model, d_ff, dropout=0.0):
        super().__init__()
        self.norm = RMSNorm(d_model)
        self.up_proj = LinearGEGLU(d_model, d_ff, bias=False)
        self.dropout = nn.Dropout(dropout)
        self.down_proj = zero_init(nn.Linear(d_ff, d_model, bias=False))

    def forward(self, x):
        return x + self.down_proj(self.dropout(self.up_proj(self.norm(x))))


class MappingNetwork(nn.Module):
    def __init__(self, depth, d_model, d_ff, dropout=0.0):
        super().__init__()
        self.in_norm = RMSNorm(d_model)
        self.blocks = nn.ModuleList([MappingFeedForwardBlock(d_model, d_ff, dropout) for _ in range(depth)])
        self.out_norm = RMSNorm(d_model)

    def forward(self, x):
        x = self.in_norm(x)
        for block in self.blocks:
            x = block(x)
        return self.out_norm(x)


# The model


class HDiT(nn.Module):
    """Hourglass Diffusion Transformer.

    widths/depths/d_ffs/self_attns/dropout_rates describe the outer levels, outermost first; each has a down half
    before the 2x2 merge and an up half of the same depth after the split. middle_* describe the innermost level.
    num_classes > 0 adds a class embedding with one extra entry, index num_classes, for the null class of
    classifier-free guidance. Call as model(x, c_noise, aug_cond=None, class_cond=None, mapping_cond=None), with
    x [N, C, H, W] already scaled by c_in and c_noise [N] = ln(sigma) / 4 (EDM preconditioning, done by the caller).
    """

    def __init__(
        self, in_channels, out_channels, patch_size, widths, middle_width, depths, middle_depth,
        mapping_width=256, mapping_depth=2, *, d_ffs=None, middle_d_ff=None, self_attns=None,
        middle_self_attn=None, dropout_rates=None, middle_dropout_rate=0.0, mapping_d_ff=None,
        mapping_dropout_rate=0.0, num_classes=0, mapping_cond_dim=0, checkpointing=False,
    ):
        super().__init__()
        n_outer = len(widths)
        d_ffs = [3 * width for width in widths] if d_ffs is None else list(d_ffs)
        self_attns = [dict(DEFAULT_SELF_ATTN) for _ in widths] if self_attns is None else list(self_attns)
        dropout_rates = [0.0] * n_outer if dropout_rates is None else list(dropout_rates)
        for name, values in (("depths", depths), ("d_ffs", d_ffs), ("self_attns", self_attns),
                             ("dropout_rates", dropout_rates)):
            if len(values) != n_outer:
                raise ValueError(f"HDiT: {name} has {len(values)} entries, widths has {n_outer}")
        if mapping_width % 2:
            raise ValueError(f"HDiT: mapping_width must be even (Fourier features), got {mapping_width}")
        if num_classes < 0 or mapping_cond_dim < 0:
            raise ValueError("HDiT: num_classes and mapping_cond_dim must be >= 0")

        # One list per property, outermost level first, the middle level last (k-diffusion's `levels`).
        self.level_widths = [*widths, middle_width]
        self.level_depths = [*depths, middle_depth]
        self.level_d_ffs = [*d_ffs, 3 * middle_width if middle_d_ff is None else middle_d_ff]
        self.level_self_attns = [*self_attns, dict(middle_self_attn or DEFAULT_MIDDLE_SELF_ATTN)]
        self.level_dropout_rates = [*dropout_rates, middle_dropout_rate]
        for i, (width, spec) in enumerate(zip(self.level_widths, self.level_self_attns)):
            check_self_attn(spec, width, "middle level" if i == n_outer else f"level {i}")

        self.input_channels = in_channels
        self.out_channels = out_channels
        self.patch_size = (patch_size, patch_size) if isinstance(patch_size, int) else tuple(patch_size)
        self.num_classes = num_classes
        self.mapping_cond_dim = mapping_cond_dim
        self.checkpointing = checkpointing
        mapping_d_ff = 3 * mapping_width if mapping_d_ff is None else mapping_d_ff

        self.patch_in = TokenMerge(in_channels, self.level_widths[0], self.patch_size)

        self.time_emb = FourierFeatures(1, mapping_width)
        self.time_in_proj = nn.Linear(mapping_width, mapping_width, bias=False)
        self.aug_emb = FourierFeatures(AUG_COND_FEATURES, mapping_width)
        self.aug_in_proj = nn.Linear(mapping_width, mapping_width, bias=False)
        self.class_emb = nn.Embedding(num_classes + 1, mapping_width) if num_classes else None
        self.mapping_cond_in_proj = nn.Linear(mapping_cond_dim, mapping_width, bias=False) if mapping_cond_dim else None
        self.mapping = MappingNetwork(mapping_depth, mapping_width, mapping_d_ff, mapping_dropout_rate)

        def level(i, first_index):
            # Layer indices run on from the down half into the up half, so shifted windows keep alternating.
            width, d_ff, self_attn, dropout = (
                self.level_widths[i], self.level_d_ffs[i], self.level_self_attns[i], self.level_dropout_rates[i]
            )
            return Level([
                TransformerLayer(width, d_ff, mapping_width, self_attn, first_index + j, dropout)
                for j in range(self.level_depths[i])
            ])

        self.down_levels = nn.ModuleList([level(i, 0) for i in range(n_outer)])
        self.mid_level = level(n_outer, 0)
        self.up_levels = nn.ModuleList([level(i, self.level_depths[i]) for i in range(n_outer)])
        outer, inner = self.level_widths[:-1], self.level_widths[1:]
        self.merges = nn.ModuleList([TokenMerge(w_outer, w_inner) for w_outer, w_inner in zip(outer, inner)])
        self.splits = nn.ModuleList([TokenSplit(w_inner, w_outer) for w_outer, w_inner in zip(outer, inner)])

        self.out_norm = RMSNorm(self.level_widths[0])
        self.patch_out = zero_init(TokenSplitWithoutSkip(self.level_widths[0], out_channels, self.patch_size))

    def check_input_size(self, h, w):
        """Raise ValueError unless an h x w image goes through every patching, merge and attention window."""
        ph, pw = self.patch_size
        if h % ph or w % pw:
            raise ValueError(f"HDiT: a {h}x{w} input is not divisible by the patch size {ph}x{pw}")
        gh, gw = h // ph, w // pw
        for i, spec in enumerate(self.level_self_attns):
            where = f"HDiT level {i} ({gh}x{gw} tokens for a {h}x{w} input)"
            if spec["type"] == "neighborhood" and spec["kernel_size"] > min(gh, gw):
                raise ValueError(f"{where}: neighborhood kernel_size {spec['kernel_size']} does not fit")
            if spec["type"] == "shifted-window" and (gh % spec["window_size"] or gw % spec["window_size"]):
                raise ValueError(f"{where}: window_size {spec['window_size']} does not tile the grid")
            if i < len(self.level_self_attns) - 1:
                if gh % 2 or gw % 2:
                    raise ValueError(f"{where}: odd token grid, cannot merge 2x2 into the next level")
                gh, gw = gh // 2, gw // 2

    def param_groups(self, lr, weight_decay, mapping_lr_scale=1 / 3):
        """Optimizer parameter groups, as k-diffusion tags them.

        Weight decay only on the weights of Linear layers, except the in-projections of the conditioning
        embeddings; none on norm gains, attention scales, skip factors and embeddings. The mapping network and every
        AdaRMSNorm projection (everything that computes or consumes the conditioning vector inside the blocks)
        train at lr * mapping_lr_scale (HDiT paper, appendix: mapping network learning rate 1/3).
        """
        conditioning_in_projs = {self.time_in_proj, self.aug_in_proj, self.mapping_cond_in_proj}
        decayed = {id(m.weight) for m in self.modules() if isinstance(m, nn.Linear) and m not in conditioning_in_projs}
        mapping = {id(p) for p in self.mapping.parameters()}
        mapping |= {id(p) for m in self.modules() if isinstance(m, AdaRMSNorm) for p in m.parameters()}
        return param_groups(self, lr, weight_decay, decayed, mapping, mapping_lr_scale)

    def mapping_input(self, n, c_noise, aug_cond, class_cond, mapping_cond):
        """Sum of the conditioning embeddings, [N, mapping_width]."""
        aug_cond = check_conditioning(self, n, c_noise, aug_cond, class_cond, mapping_cond)
        emb = self.time_in_proj(self.time_emb(c_noise[:, None])) + self.aug_in_proj(self.aug_emb(aug_cond))
        if self.class_emb is not None:
            emb = emb + self.class_emb(class_cond)
        if self.mapping_cond_in_proj is not None:
            emb = emb + self.mapping_cond_in_proj(mapping_cond)
        return emb

    def forward(self, x, c_noise, aug_cond=None, class_cond=None, mapping_cond=None):
        if x.ndim != 4 or x.shape[1] != self.input_channels:
            raise ValueError(f"HDiT: x must be [N, {self.input_channels}, H, W], got {list(x.shape)}")
        self.check_input_size(*x.shape[-2:])
        cond = self.mapping(self.mapping_input(x.shape[0], c_noise, aug_cond, class_cond, mapping_cond))

        x = self.patch_in(x.movedim(1, -1))
        pos = make_axial_pos(x.shape[1], x.shape[2], device=x.device)

        skips, poses = [], []
        for down_level, merge in zip(self.down_levels, self.merges):
            x = down_level(x, pos, cond, self.checkpointing)
            skips.append(x)
            poses.append(pos)
            x = merge(x)
            pos = downscale_pos(pos)

        x = self.mid_level(x, pos, cond, self.checkpointing)

        for up_level, split, skip, pos in reversed(list(zip(self.up_levels, self.splits, skips, poses))):
            x = split(x, skip)
            x = up_level(x, pos, cond, self.checkpointing)

        x = self.patch_out(self.out_norm(x))
        return x.movedim(-1, 1)
