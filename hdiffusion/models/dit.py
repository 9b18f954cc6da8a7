"""DiT, the Diffusion Transformer (Peebles & Xie 2022, "Scalable Diffusion Models with Transformers", arXiv:2212.09748).

A plain ViT over patches (paper, section 3.2 and figure 3): patchify the image into a grid of p x p patches, add a
2-D sin-cos (or learned) position embedding, run N transformer blocks conditioned by adaLN-Zero, then a final
adaptive LayerNorm, a linear decoder to p x p x C values per token, and unpatchify. The conditioning vector c is
the sum of the embeddings of the noise level and of the class.

Differences from the reference implementation (facebookresearch/DiT), all for this trainer's EDM objective:
- the timestep embedder reads c_noise = ln(sigma) / 4 through random Fourier features (as HDiT does) instead of a
  sinusoidal embedding of the DDPM step t in [0, 1000); the MLP after it is DiT's;
- the output has out_channels = in_channels by default: the denoiser learns no variance. DiT's learn_sigma doubles
  the output channels; out_channels=2 * in_channels reproduces it (the paper's parameter and Gflop counts);
- the non-leaky augmentation conditioning (aug_cond) is embedded and added to c through a zero-initialised
  projection, so a fresh model conditions exactly as DiT does;
- the label dropout for classifier-free guidance is the trainer's (dataset.cond_dropout_rate); the null class is
  index num_classes, as in DiT;
- optional dropout in the attention and MLP branches (DiT has none; dropout_rate=0 is the paper's model).

Tokens are [N, H, W, C] (channels last) as in HDiT; attention heads are [N, H, W, heads, d] (see .attention).
"""

import torch
from torch import nn

from .attention import GlobalAttention
from .conditioning import AUG_COND_FEATURES, check_conditioning, checkpoint, param_groups
from .layers import FourierFeatures

# The paper's table 1: (layers N, hidden size d, heads) per model size; the "/p" of a name is the patch size.
_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
PRESETS = {
    f"DiT-{size}/{patch}": {"depth": depth, "width": width, "num_heads": heads, "patch_size": patch}
    for size, (depth, width, heads) in _SIZES.items()
    for patch in (2, 4, 8)
}
POS_EMBS = ("sincos", "learned")
FREQUENCY_FEATURES = 256  # DiT's frequency_embedding_size: features of the noise level before the MLP


def sincos_pos_emb(h, w, width):
    """The fixed 2-D sin-cos position embedding of MAE and DiT, [h, w, width] in float32.

    Half of the channels encode the row, half the column, each as the 1-D Transformer embedding (Vaswani et al.
    2017): sin and cos of position * 10000**(-i / (width / 4)) for i < width / 4. Positions count tokens.
    """
    if width % 4:
        raise ValueError(f"DiT: the sin-cos position embedding needs a width divisible by 4, got {width}")
    n_freqs = width // 4
    omega = 10000.0 ** -(torch.arange(n_freqs, dtype=torch.float64) / n_freqs)

    def axis(n):  # [n, width / 2]
        angle = torch.arange(n, dtype=torch.float64)[:, None] * omega
        return torch.cat((angle.sin(), angle.cos()), dim=-1)

    emb_y = axis(h)[:, None].expand(h, w, 2 * n_freqs)
    emb_x = axis(w)[None, :].expand(h, w, 2 * n_freqs)
    return torch.cat((emb_y, emb_x), dim=-1).float()


def modulate(x, shift, scale):
    """adaLN: LayerNorm(x) * (1 + scale) + shift, with per-image shift and scale [N, 1, 1, C] from c."""
    return x * (1 + scale) + shift


class TimestepEmbedder(nn.Module):
    """c_noise [N] -> [N, width]: Fourier features, then DiT's two-layer SiLU MLP."""

    def __init__(self, width, features=FREQUENCY_FEATURES):
        super().__init__()
        self.fourier = FourierFeatures(1, features)
        self.mlp = nn.Sequential(nn.Linear(features, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, c_noise):
        return self.mlp(self.fourier(c_noise[:, None]))


class Attention(nn.Module):
    """Multi-head self-attention over the whole token grid, softmax(q k^T / sqrt(d_head)) v (ViT, as DiT uses it)."""

    def __init__(self, width, heads, dropout=0.0):
        super().__init__()
        self.heads, self.d_head = heads, width // heads
        self.qkv_proj = nn.Linear(width, 3 * width)
        self.attention = GlobalAttention(scale=self.d_head**-0.5)  # the backend dispatch and flops.count_macs see it
        self.dropout = nn.Dropout(dropout)
        self.out_proj = nn.Linear(width, width)

    def extra_repr(self):
        return f"heads={self.heads}, d_head={self.d_head}"

    def forward(self, x):
        q, k, v = self.qkv_proj(x).unflatten(-1, (3, self.heads, self.d_head)).unbind(-3)  # [N, H, W, heads, d]
        x = self.attention(q, k, v).flatten(-2)
        return self.out_proj(self.dropout(x))


class FeedForward(nn.Sequential):
    """Linear, GELU (tanh approximation, as DiT), Linear."""

    def __init__(self, width, d_ff, dropout=0.0):
        super().__init__(
            nn.Linear(width, d_ff), nn.GELU(approximate="tanh"), nn.Dropout(dropout), nn.Linear(d_ff, width)
        )


class DiTBlock(nn.Module):
    """A transformer block with adaLN-Zero (paper, section 3.2, "adaLN-Zero block").

    One SiLU + Linear of c gives six [N, width] vectors: shift, scale and gate for the attention branch and for the
    MLP branch. Each branch is x + gate * branch(LayerNorm(x) * (1 + scale) + shift). The projection starts at zero
    (DiT._init_weights), so every gate starts at 0 and the block starts as the identity.
    """

    def __init__(self, width, heads, d_ff, dropout=0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)  # adaLN supplies the affine part
        self.attn = Attention(width, heads, dropout)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = FeedForward(width, d_ff, dropout)
        self.ada_ln = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def forward(self, x, c):
        modulation = self.ada_ln(c)[:, None, None]  # [N, 1, 1, 6 * width]: broadcast over the token grid
        shift_attn, scale_attn, gate_attn, shift_mlp, scale_mlp, gate_mlp = modulation.chunk(6, dim=-1)
        x = x + gate_attn * self.attn(modulate(self.norm1(x), shift_attn, scale_attn))
        return x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """Adaptive LayerNorm (shift and scale from c, no gate), a linear decoder to a ph x pw patch of out_channels
    per token, unpatchify: [N, h, w, width] -> [N, out_channels, h * ph, w * pw]."""

    def __init__(self, width, out_channels, patch_size):
        super().__init__()
        self.patch_size = patch_size
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.ada_ln = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.linear = nn.Linear(width, patch_size[0] * patch_size[1] * out_channels)

    def forward(self, x, c):
        shift, scale = self.ada_ln(c)[:, None, None].chunk(2, dim=-1)
        x = self.linear(modulate(self.norm(x), shift, scale))
        n, h, w, _ = x.shape
        ph, pw = self.patch_size
        x = x.view(n, h, w, ph, pw, -1).permute(0, 5, 1, 3, 2, 4)  # [N, C, h, ph, w, pw]
        return x.reshape(n, x.shape[1], h * ph, w * pw)


class DiT(nn.Module):
    """Diffusion Transformer for [N, in_channels, H, W] images or latents of one size, input_size = (H, W).

    depth, width and num_heads are the paper's N, d and heads; PRESETS has its named models (DiT(4, 32,
    **PRESETS["DiT-XL/2"], out_channels=8, num_classes=1000) is the paper's 256x256 latent model). mlp_ratio: hidden
    width of the MLP over width (4, DiT's). pos_emb: "sincos" (fixed, DiT's) or "learned". num_classes > 0 adds
    a class embedding with one extra entry, index num_classes, for the null class of classifier-free guidance.
    Call as model(x, c_noise, aug_cond=None, class_cond=None, mapping_cond=None), with x [N, C, H, W] already scaled
    by c_in and c_noise [N] = ln(sigma) / 4 (EDM preconditioning, done by the caller).
    """

    def __init__(
        self, in_channels, input_size, *, out_channels=None, patch_size=2, depth=12, width=384, num_heads=6,
        mlp_ratio=4.0, pos_emb="sincos", dropout_rate=0.0, num_classes=0, mapping_cond_dim=0, checkpointing=False,
    ):
        super().__init__()
        self.input_size = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
        self.patch_size = (patch_size, patch_size) if isinstance(patch_size, int) else tuple(patch_size)
        (h, w), (ph, pw) = self.input_size, self.patch_size
        if h % ph or w % pw:
            raise ValueError(f"DiT: input size {h}x{w} is not divisible by the patch size {ph}x{pw}")
        if width % num_heads:
            raise ValueError(f"DiT: width {width} is not a multiple of num_heads {num_heads}")
        if pos_emb not in POS_EMBS:
            raise ValueError(f"DiT: pos_emb must be one of {POS_EMBS}, got {pos_emb!r}")
        if num_classes < 0 or mapping_cond_dim < 0:
            raise ValueError("DiT: num_classes and mapping_cond_dim must be >= 0")
        self.input_channels = in_channels
        self.out_channels = in_channels if out_channels is None else out_channels
        self.num_classes = num_classes
        self.mapping_cond_dim = mapping_cond_dim
        self.checkpointing = checkpointing
        self.grid = (h // ph, w // pw)

        # Patchify: a p x p, stride p convolution is a Linear on each flattened patch (ViT, DiT's "patchify" layer).
        self.patch_embed = nn.Conv2d(in_channels, width, self.patch_size, stride=self.patch_size)
        if pos_emb == "sincos":  # a function of the grid, so not saved with the weights
            self.register_buffer("pos_emb", sincos_pos_emb(*self.grid, width), persistent=False)
        else:
            self.pos_emb = nn.Parameter(torch.empty(*self.grid, width))

        # Conditioning: c = embedding of the noise level + of the class (+ augmentation, + mapping_cond).
        self.time_emb = TimestepEmbedder(width)
        self.aug_emb = FourierFeatures(AUG_COND_FEATURES, FREQUENCY_FEATURES)
        self.aug_in_proj = nn.Linear(FREQUENCY_FEATURES, width, bias=False)
        self.class_emb = nn.Embedding(num_classes + 1, width) if num_classes else None
        self.mapping_cond_in_proj = nn.Linear(mapping_cond_dim, width, bias=False) if mapping_cond_dim else None

        d_ff = int(width * mlp_ratio)
        self.blocks = nn.ModuleList([DiTBlock(width, num_heads, d_ff, dropout_rate) for _ in range(depth)])
        self.final_layer = FinalLayer(width, self.out_channels, self.patch_size)
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self):
        # DiT's initialize_weights: xavier-uniform Linear weights and zero biases (ViT/MAE), the patch embedding
        # initialised as the Linear it is, N(0, 0.02) for the class table and the timestep MLP.
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.xavier_uniform_(self.patch_embed.weight.view(self.patch_embed.out_channels, -1))
        nn.init.zeros_(self.patch_embed.bias)
        if isinstance(self.pos_emb, nn.Parameter):
            nn.init.trunc_normal_(self.pos_emb, std=0.02)  # ViT's initialisation of a learned position embedding
        if self.class_emb is not None:
            nn.init.normal_(self.class_emb.weight, std=0.02)
        for layer in self.time_emb.mlp[0], self.time_emb.mlp[2]:
            nn.init.normal_(layer.weight, std=0.02)
        # adaLN-Zero: every modulation projection and the output layer start at 0, so every block starts as the
        # identity and the model outputs exactly 0 (paper, section 3.2). The extra conditioning inputs of this
        # implementation start at 0 too, so a fresh model's c is DiT's t + y.
        zero = [block.ada_ln for block in self.blocks]
        zero += [self.final_layer.ada_ln, self.final_layer.linear, self.aug_in_proj, self.mapping_cond_in_proj]
        for module in filter(None, zero):
            for param in module.parameters():
                nn.init.zeros_(param)

    def check_input_size(self, h, w):
        """Raise ValueError unless an h x w input is the size the model was built for (its position embedding)."""
        if (h, w) != self.input_size:
            raise ValueError(f"DiT: the model was built for {self.input_size[0]}x{self.input_size[1]} inputs "
                             f"(a {self.grid[0]}x{self.grid[1]} token grid of {self.patch_size[0]}x"
                             f"{self.patch_size[1]} patches), got {h}x{w}")

    def param_groups(self, lr, weight_decay, mapping_lr_scale=1 / 3):
        """Optimizer parameter groups: weight decay or not, all at lr.

        Weight decay on the weights of the Linear layers and of the patch embedding, except the projections that
        read Fourier features or external conditioning (the timestep MLP's first layer, the aug_cond and
        mapping_cond projections), as HDiT tags them; none on biases, the class table and the position embedding.
        mapping_lr_scale is ignored: DiT has no mapping network, and its paper trains every parameter at one
        learning rate. (Scaling the adaLN projections, HDiT's counterpart, would slow a third of every block.)
        """
        conditioning_in_projs = {self.time_emb.mlp[0], self.aug_in_proj, self.mapping_cond_in_proj}
        decayed = {
            id(m.weight) for m in self.modules()
            if isinstance(m, (nn.Linear, nn.Conv2d)) and m not in conditioning_in_projs
        }
        return param_groups(self, lr, weight_decay, decayed)

    def conditioning(self, n, c_noise, aug_cond, class_cond, mapping_cond):
        """c = t + y (+ augmentation, + mapping_cond embeddings), [N, width]: the input of every adaLN."""
        aug_cond = check_conditioning(self, n, c_noise, aug_cond, class_cond, mapping_cond)
        c = self.time_emb(c_noise) + self.aug_in_proj(self.aug_emb(aug_cond))
        if self.class_emb is not None:
            c = c + self.class_emb(class_cond)
        if self.mapping_cond_in_proj is not None:
            c = c + self.mapping_cond_in_proj(mapping_cond)
        return c

    def forward(self, x, c_noise, aug_cond=None, class_cond=None, mapping_cond=None):
        if x.ndim != 4 or x.shape[1] != self.input_channels:
            raise ValueError(f"DiT: x must be [N, {self.input_channels}, H, W], got {list(x.shape)}")
        self.check_input_size(*x.shape[-2:])
        c = self.conditioning(x.shape[0], c_noise, aug_cond, class_cond, mapping_cond)
        x = self.patch_embed(x).movedim(1, -1) + self.pos_emb  # [N, h, w, width]
        for block in self.blocks:
            x = checkpoint(block, x, c, enabled=self.checkpointing)
        return self.final_layer(x, c)
