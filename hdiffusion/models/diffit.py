"""DiffiT, the image-space Diffusion Vision Transformer (Hatamizadeh et al. 2023, arXiv:2312.02139).

A U-shaped network over S resolution stages (32, 16, 8, 4 for CIFAR-10). Every stage is a stack of DiffiT
residual cells: a conv3x3 feeding a transformer block whose self-attention is time-dependent (TMSA), attention
within windows of the feature map at high resolution and over the whole map where the window covers it:

    encoder   conv3x3 tokenizer -> stage 0 -> down -> stage 1 -> ... -> down -> stage S-1 --+
    decoder   head <- stage 0 <- merge(up, skip 0) <- ... <- merge(up, skip S-2) <- stage S-1 <-+

The noise level, augmentation and class enter only through the time token x_t, which every TMSA projects into
its queries, keys and values (equations 3-5 of the paper); nothing else in the network sees the noise level.

Feature maps are [N, C, H, W] for convolutions and [N, H, W, C] tokens inside the transformer blocks; attention
heads are [N, H, W, heads, d] (see .attention).
"""

import torch
from torch import nn
from torch.nn import functional as F

from .attention import ShiftedWindowAttention
from .conditioning import AUG_COND_FEATURES, check_conditioning, checkpoint, param_groups
from .layers import FourierFeatures, zero_init


class RelativePositionBias(nn.Module):
    """B of TMSA: one learned logit per head and relative offset (dy, dx) of key to query within a window.

    (2w - 1)^2 offsets for a w x w window, as in Swin (Liu et al. 2021, section 3.2). Starts at zero, so the fresh
    attention is position-blind. Returns [heads, w^2, w^2], queries by keys in row-major order within the window.
    """

    def __init__(self, window_size, num_heads):
        super().__init__()
        self.window_size = window_size
        self.table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        yx = torch.stack(torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing="ij"))
        offset = yx.flatten(1)[:, :, None] - yx.flatten(1)[:, None, :] + window_size - 1  # [2, w^2, w^2], >= 0
        # Derived from window_size alone, so it is not part of the weights.
        self.register_buffer("index", offset[0] * (2 * window_size - 1) + offset[1], persistent=False)

    def extra_repr(self):
        return f"window_size={self.window_size}, num_heads={self.table.shape[1]}"

    def forward(self):
        return self.table[self.index].permute(2, 0, 1)


class TMSA(nn.Module):
    """Time-dependent multi-head self-attention (paper, equations 3-6).

        q_s = x_s W_qs + x_t W_qt,   k_s = x_s W_ks + x_t W_kt,   v_s = x_s W_vs + x_t W_vt
        Attention(Q, K, V) = Softmax(Q K^T / sqrt(d) + B) V

    x_s are the spatial tokens, x_t the time token of the sample. Within one sample x_t W_kt adds the same vector
    to every key, which the softmax cancels; x_t W_qt moves every query, which changes which keys it prefers. So
    the attention pattern depends on the noise level, not only the features (as adaLN / AdaGN scaling would).
    Attention runs within non-overlapping window_size x window_size windows (a window as large as the feature map
    is global attention). The spatial projection has a bias (as in ViT); the time projection needs none.
    """

    def __init__(self, width, time_width, num_heads, window_size, dropout=0.0):
        super().__init__()
        self.num_heads, self.d_head = num_heads, width // num_heads
        self.qkv_spatial = nn.Linear(width, 3 * width)  # [W_qs, W_ks, W_vs]
        self.qkv_time = nn.Linear(time_width, 3 * width, bias=False)  # [W_qt, W_kt, W_vt]
        self.position_bias = RelativePositionBias(window_size, num_heads)
        self.attention = ShiftedWindowAttention(window_size, shift=0, scale=self.d_head**-0.5)
        self.dropout = nn.Dropout(dropout)
        self.out_proj = zero_init(nn.Linear(width, width))

    def extra_repr(self):
        return f"num_heads={self.num_heads}, d_head={self.d_head}"

    def qkv(self, x, time_token):
        """x [N, H, W, C], time_token [N, C_t] -> q, k, v, each [N, H, W, heads, d_head]."""
        qkv = self.qkv_spatial(x) + self.qkv_time(time_token)[:, None, None, :]
        return qkv.unflatten(-1, (3, self.num_heads, self.d_head)).unbind(-3)

    def forward(self, x, time_token):
        q, k, v = self.qkv(x, time_token)
        x = self.attention(q, k, v, self.position_bias()).flatten(-2)
        return self.out_proj(self.dropout(x))


class DiffiTTransformerBlock(nn.Module):
    """The DiffiT Transformer block (paper, equations 7-8), pre-norm:

        x^_s = TMSA(LN(x_s), x_t) + x_s
        x_s  = MLP(LN(x^_s)) + x^_s

    The MLP is Linear -> GELU -> Linear with mlp_ratio x width hidden units (ViT's). Both residual branches end in
    a zero-initialised projection, so a fresh block is the identity.
    """

    def __init__(self, width, time_width, num_heads, window_size, mlp_ratio=4.0, dropout=0.0):
        super().__init__()
        hidden = int(mlp_ratio * width)
        self.attn_norm = nn.LayerNorm(width)
        self.attn = TMSA(width, time_width, num_heads, window_size, dropout)
        self.mlp_norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, hidden), nn.GELU(), nn.Dropout(dropout), zero_init(nn.Linear(hidden, width))
        )

    def forward(self, x, time_token):
        x = x + self.attn(self.attn_norm(x), time_token)
        return x + self.mlp(self.mlp_norm(x))


class DiffiTResBlock(nn.Module):
    """The DiffiT residual cell (paper, equations 9-10), a conv3x3 before the transformer block:

        x^_s = Conv3x3(Swish(GN(x_s)))
        x_s  = DiffiT-Block(x^_s, x_t) + x_s

    x is [N, C, H, W]; the block sees it as [N, H, W, C] tokens.
    """

    def __init__(self, width, time_width, num_heads, window_size, mlp_ratio=4.0, num_groups=32, dropout=0.0):
        super().__init__()
        self.norm = nn.GroupNorm(num_groups, width)
        self.conv = nn.Conv2d(width, width, 3, padding=1)
        self.block = DiffiTTransformerBlock(width, time_width, num_heads, window_size, mlp_ratio, dropout)

    def forward(self, x, time_token):
        x_hat = self.conv(F.silu(self.norm(x)))
        return x + self.block(x_hat.movedim(1, -1), time_token).movedim(-1, 1)


class Stage(nn.ModuleList):
    def forward(self, x, time_token, checkpointing=False):
        for cell in self:
            x = checkpoint(cell, x, time_token, enabled=checkpointing)
        return x


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling, then a conv3x3 to the next stage's width."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _per_stage(value, n_stages, name):
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n_stages
    if len(values) != n_stages:
        raise ValueError(f"DiffiT: {name} has {len(values)} entries, widths has {n_stages}")
    return values


class DiffiT(nn.Module):
    """Image-space DiffiT: a U-Net of DiffiT residual cells.

    widths, depths, num_heads, window_sizes and dropout_rates have one entry per resolution stage, outermost
    first (num_heads, window_sizes and dropout_rates may also be one value for all); stage i works at 1 / 2^i of
    the input resolution. Each stage has depths[i] cells in the encoder and as many in the decoder. Window
    attention in w x w windows; a window as large as the stage's feature map is global attention.

    time_width is the width of the time token x_t (default 4 x widths[0], EDM's embedding width). num_classes > 0
    adds a class embedding with one extra row, index num_classes, for the null class of classifier-free guidance.
    Call as model(x, c_noise, aug_cond=None, class_cond=None), with x [N, C, H, W] already scaled by c_in and
    c_noise [N] = ln(sigma) / 4 (EDM preconditioning, done by the caller).
    """

    def __init__(
        self, in_channels, out_channels, widths, depths, num_heads=4, window_sizes=8, *, time_width=None,
        mlp_ratio=4.0, num_groups=32, dropout_rates=0.0, num_classes=0, checkpointing=False,
    ):
        super().__init__()
        n_stages = len(widths)
        depths = _per_stage(depths, n_stages, "depths")
        num_heads = _per_stage(num_heads, n_stages, "num_heads")
        window_sizes = _per_stage(window_sizes, n_stages, "window_sizes")
        dropout_rates = _per_stage(dropout_rates, n_stages, "dropout_rates")
        for i, (width, heads, window) in enumerate(zip(widths, num_heads, window_sizes)):
            if width % heads:
                raise ValueError(f"DiffiT stage {i}: width {width} is not a multiple of num_heads {heads}")
            if width % num_groups:
                raise ValueError(f"DiffiT stage {i}: width {width} is not a multiple of num_groups {num_groups}")
            if window < 1:
                raise ValueError(f"DiffiT stage {i}: window size must be positive, got {window}")
        if num_classes < 0:
            raise ValueError("DiffiT: num_classes must be >= 0")
        time_width = 4 * widths[0] if time_width is None else time_width
        if time_width % 2:
            raise ValueError(f"DiffiT: time_width must be even (Fourier features), got {time_width}")

        self.input_channels, self.out_channels = in_channels, out_channels
        self.widths, self.depths, self.num_heads = list(widths), depths, num_heads
        self.window_sizes, self.time_width = window_sizes, time_width
        self.num_classes = num_classes
        self.mapping_cond_dim = 0  # the trainer's interface; DiffiT takes no extra conditioning vector
        self.checkpointing = checkpointing

        # The time token x_t: Fourier features of c_noise and of the augmentation vector, plus the class embedding,
        # through a two-layer Swish MLP. It is the only conditioning input of the network.
        self.time_emb = FourierFeatures(1, time_width)
        self.time_in_proj = nn.Linear(time_width, time_width, bias=False)
        self.aug_emb = FourierFeatures(AUG_COND_FEATURES, time_width)
        self.aug_in_proj = nn.Linear(time_width, time_width, bias=False)
        self.class_emb = nn.Embedding(num_classes + 1, time_width) if num_classes else None
        self.time_mlp = nn.Sequential(
            nn.Linear(time_width, time_width), nn.SiLU(), nn.Linear(time_width, time_width)
        )

        def stage(i):
            return Stage([
                DiffiTResBlock(widths[i], time_width, num_heads[i], window_sizes[i], mlp_ratio, num_groups,
                               dropout_rates[i])
                for _ in range(depths[i])
            ])

        self.tokenizer = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        self.encoder = nn.ModuleList([stage(i) for i in range(n_stages)])
        # Between stages: conv3x3 with stride 2 going down; nearest 2x and conv3x3 going up.
        self.downsamples = nn.ModuleList([
            nn.Conv2d(widths[i], widths[i + 1], 3, stride=2, padding=1) for i in range(n_stages - 1)
        ])
        self.upsamples = nn.ModuleList([Upsample(widths[i + 1], widths[i]) for i in range(n_stages - 1)])
        # Skip connections: the decoder stage's input and the encoder output of the same resolution, concatenated
        # and brought back to the stage width by a 1x1 convolution. The deepest decoder stage continues from the
        # deepest encoder stage, whose output is its input already.
        self.skip_merges = nn.ModuleList([nn.Conv2d(2 * widths[i], widths[i], 1) for i in range(n_stages - 1)])
        self.decoder = nn.ModuleList([stage(i) for i in range(n_stages)])
        self.head = nn.Sequential(
            nn.GroupNorm(num_groups, widths[0]), nn.SiLU(),
            zero_init(nn.Conv2d(widths[0], out_channels, 3, padding=1)),  # the fresh model outputs 0
        )

    def check_input_size(self, h, w):
        """Raise ValueError unless an h x w image goes through every downsampling and attention window."""
        n_stages = len(self.widths)
        factor = 2 ** (n_stages - 1)
        if h % factor or w % factor:
            raise ValueError(f"DiffiT: a {h}x{w} input is not divisible by {factor} on each side, as its "
                             f"{n_stages} stages need")
        for i, window in enumerate(self.window_sizes):
            gh, gw = h >> i, w >> i
            if gh % window or gw % window:
                raise ValueError(f"DiffiT stage {i} ({gh}x{gw} for a {h}x{w} input): window size {window} does "
                                 f"not tile the feature map")

    def param_groups(self, lr, weight_decay, mapping_lr_scale=1 / 3):
        """Optimizer parameter groups: weight decay or not, all at lr.

        Weight decay on the weights of Linear and Conv2d layers, except the in-projections of the Fourier
        embeddings; none on biases, norm gains, relative position biases and the class embedding.
        mapping_lr_scale is ignored: DiffiT has no mapping network, and its paper, like DiT's, trains every
        parameter at one learning rate.
        """
        conditioning_in_projs = {self.time_in_proj, self.aug_in_proj}
        decayed = {
            id(m.weight) for m in self.modules()
            if isinstance(m, (nn.Linear, nn.Conv2d)) and m not in conditioning_in_projs
        }
        return param_groups(self, lr, weight_decay, decayed)

    def time_token(self, n, c_noise, aug_cond=None, class_cond=None, mapping_cond=None):
        """x_t, [N, time_width]: the embeddings of the noise level, augmentation and class, summed, through the MLP."""
        aug_cond = check_conditioning(self, n, c_noise, aug_cond, class_cond, mapping_cond)
        emb = self.time_in_proj(self.time_emb(c_noise[:, None])) + self.aug_in_proj(self.aug_emb(aug_cond))
        if self.class_emb is not None:
            emb = emb + self.class_emb(class_cond)
        return self.time_mlp(emb)

    def forward(self, x, c_noise, aug_cond=None, class_cond=None, mapping_cond=None):
        if x.ndim != 4 or x.shape[1] != self.input_channels:
            raise ValueError(f"DiffiT: x must be [N, {self.input_channels}, H, W], got {list(x.shape)}")
        self.check_input_size(*x.shape[-2:])
        time_token = self.time_token(x.shape[0], c_noise, aug_cond, class_cond, mapping_cond)

        x = self.tokenizer(x)
        skips = []
        for i, stage in enumerate(self.encoder):
            if i > 0:
                x = self.downsamples[i - 1](x)
            x = stage(x, time_token, self.checkpointing)
            skips.append(x)

        for i in reversed(range(len(self.decoder))):
            if i < len(self.decoder) - 1:
                x = self.skip_merges[i](torch.cat([self.upsamples[i](x), skips[i]], dim=1))
            x = self.decoder[i](x, time_token, self.checkpointing)
        return self.head(x)
