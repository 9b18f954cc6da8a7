"""Attention over a 2-D token grid: global, neighborhood and shifted-window, each with a pure PyTorch reference.

Every function takes q, k, v in the heads-last grid layout [N, H, W, heads, d] (natten's layout) and returns the
attention output in the same layout. `scale` multiplies the logits; HDiT uses cosine-similarity attention whose
q and k already carry the learned temperature, hence the default 1.0.

Optional accelerators are imported with this module (models import it when built) and only used where they
support the case:
- global: flash-attn (CUDA, fp16/bf16), else F.scaled_dot_product_attention;
- neighborhood: on CUDA, FlexAttention (compiled) with a block-sparse mask over tokens reordered into 2-D tiles;
  else natten.na2d (natten >= 0.20) where it can run; else SDPA with the neighborhood as a boolean mask.
The modules at the bottom wrap one kind each for the models; `hdiffusion.flops` counts them analytically.
"""

import functools
import importlib

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention


def _optional_package(name):
    """The package, or None where it is not installed."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


# Looked up once, when this module is imported, not at each call: the calls run inside torch.compile'd layers,
# where tracing an import (or a cached function that imports) can break the graph.
FLASH_ATTN, NATTEN = _optional_package("flash_attn"), _optional_package("natten")


def _needs_grad(*tensors):
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _sdpa_over_grid(q, k, v, mask, scale):
    """SDPA over all tokens of the grid: [N, H, W, heads, d] -> [N, heads, H * W, d] and back."""
    n, h, w, heads, d = q.shape
    q, k, v = (t.flatten(1, 2).transpose(1, 2) for t in (q, k, v))
    x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return x.transpose(1, 2).unflatten(1, (h, w))


# Global attention


def global_attention(q, k, v, scale=1.0, backend="auto"):
    """Every query attends to every key. backend: "auto" | "flash-attn" | "reference" (F.scaled_dot_product_attention,
    which itself picks a fused kernel where PyTorch has one)."""
    if backend not in ("auto", "flash-attn", "reference"):
        raise ValueError(f"global attention backend must be 'auto', 'flash-attn' or 'reference', got {backend!r}")
    flash_ok = (
        FLASH_ATTN is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
        and q.shape[-1] % 8 == 0 and q.shape[-1] <= 256  # the head dims flash-attn 2 has kernels for
    )
    if backend == "flash-attn" and not flash_ok:
        raise RuntimeError("the flash-attn backend needs the flash_attn package, fp16/bf16 CUDA tensors and "
                           "d_head a multiple of 8 up to 256")
    if backend == "reference" or not flash_ok:
        return _sdpa_over_grid(q, k, v, None, scale)
    n, h, w, heads, d = q.shape
    q, k, v = (t.flatten(1, 2) for t in (q, k, v))  # flash-attn's layout is [N, L, heads, d]
    return FLASH_ATTN.flash_attn_func(q, k, v, softmax_scale=scale).unflatten(1, (h, w))


# Neighborhood attention (Hassani et al. 2023)


def check_neighborhood_fits(h, w, kernel_size):
    if not 1 <= kernel_size <= min(h, w):
        raise ValueError(
            f"neighborhood attention: kernel_size {kernel_size} does not fit a {h}x{w} token grid "
            f"(it must be between 1 and the shorter side)"
        )


def window_start(position, n, kernel_size):
    """First key index of the window of a query at `position` (a tensor) on an axis of n tokens: centred on the
    query, shifted inward at the borders so that every query sees exactly kernel_size keys (NATTEN's definition)."""
    return (position - kernel_size // 2).clamp(0, n - kernel_size)


def neighborhood_window_start(n, kernel_size, device=None):
    """window_start of every query along one axis, [n]."""
    return window_start(torch.arange(n, device=device), n, kernel_size)


@functools.lru_cache(maxsize=32)
def neighborhood_mask(h, w, kernel_size, device=None):
    """Boolean [H * W, H * W] mask, True where query (row) may attend to key (column)."""

    def axis_mask(n):  # [query, key]
        start = neighborhood_window_start(n, kernel_size, device)[:, None]
        j = torch.arange(n, device=device)
        return (start <= j) & (j < start + kernel_size)

    with torch.inference_mode(False):  # a mask cached under inference mode would be unusable in training later
        mask_y, mask_x = axis_mask(h), axis_mask(w)
        return (mask_y[:, None, :, None] & mask_x[None, :, None, :]).reshape(h * w, h * w)


def neighborhood_attention_reference(q, k, v, kernel_size, scale=1.0):
    """Neighborhood attention as dense attention under the neighborhood mask: O((HW)^2), for tests and for
    backward where natten cannot run. hdiffusion.flops still counts kernel_size^2 keys per query."""
    n, h, w, heads, d = q.shape
    check_neighborhood_fits(h, w, kernel_size)
    return _sdpa_over_grid(q, k, v, neighborhood_mask(h, w, kernel_size, q.device), scale)


NEIGHBORHOOD_BACKENDS = ("auto", "flex", "natten", "reference")


def neighborhood_attention(q, k, v, kernel_size, scale=1.0, backend="auto"):
    """Each query attends to the kernel_size x kernel_size keys around it.

    backend: "auto" | "flex" | "natten" | "reference". "auto" uses FlexAttention on CUDA; elsewhere natten where it
    can run (installed, and on CPU only without gradients: natten has no CPU backward; a NotImplementedError from
    natten falls through), else the reference.
    """
    if backend not in NEIGHBORHOOD_BACKENDS:
        raise ValueError(f"neighborhood attention backend must be one of {NEIGHBORHOOD_BACKENDS}, got {backend!r}")
    n, h, w, heads, d = q.shape
    check_neighborhood_fits(h, w, kernel_size)
    if backend == "reference":
        return neighborhood_attention_reference(q, k, v, kernel_size, scale)
    if backend == "flex" or (backend == "auto" and q.is_cuda):
        return neighborhood_attention_flex(q, k, v, kernel_size, scale)
    if backend == "natten":
        if NATTEN is None:
            raise RuntimeError("the natten backend needs the natten package (pip install 'natten>=0.20')")
        return _na2d(q, k, v, kernel_size, scale)
    natten_ok = NATTEN is not None and (q.is_cuda or (q.device.type == "cpu" and not _needs_grad(q, k, v)))
    if natten_ok:
        try:
            return _na2d(q, k, v, kernel_size, scale)
        except NotImplementedError:  # no natten kernel for this dtype, head dim or device
            pass
    return neighborhood_attention_reference(q, k, v, kernel_size, scale)


def _na2d(q, k, v, kernel_size, scale):
    # q, k, v are often strided views of one qkv projection; natten's fused kernels want dense tensors.
    q, k, v = (t.contiguous() for t in (q, k, v))
    return NATTEN.na2d(q, k, v, kernel_size, scale=scale)


# FlexAttention neighborhood: FlexAttention (Dong et al. 2024) computes attention block by block and skips the
# blocks its block mask marks empty. In row-major token order a block of 128 queries is a thin strip of rows whose
# neighborhoods touch many key blocks; reordering tokens into 2-D tiles of 8 x 16 makes each query block a
# compact patch whose neighbors lie in a few key tiles, so most blocks are skipped.

FLEX_TILE = (8, 16)


def _tile_shape(h, w):
    th, tw = FLEX_TILE
    return (th, tw) if h % th == 0 and w % tw == 0 else (1, w)  # row-major when the grid does not tile


def _tile_coords(index, w, tile):
    """(row, col) on the grid of the token at `index` in tiled order."""
    th, tw = tile
    tile_index, within = index // (th * tw), index % (th * tw)
    return (tile_index // (w // tw)) * th + within // tw, (tile_index % (w // tw)) * tw + within % tw


def _block_bounds(h, w, tile, block_size, device):
    """Per block of block_size tokens in tiled order, the bounding box of its tokens: ((row min, row max),
    (col min, col max)), each [blocks]. A last partial block repeats its last token, which leaves its box as is."""
    index = torch.arange(h * w, device=device)
    index = torch.cat([index, index[-1:].expand(-(h * w) % block_size)]).view(-1, block_size)
    rows, cols = _tile_coords(index, w, tile)
    return (rows.amin(1), rows.amax(1)), (cols.amin(1), cols.amax(1))


_BLOCK_MASKS = {}  # (h, w, kernel_size, device, block_size) -> BlockMask: a few grids per model


def neighborhood_block_mask(h, w, kernel_size, device, block_size=128):
    """The block mask of _build_block_mask, built once per grid and cached.

    The cache is a plain dict, which dynamo reads inside a compiled layer as a guarded input of the graph (it would
    trace through a functools.lru_cache and rebuild the mask in every graph). Building the mask while dynamo traces
    breaks the graph, and the break stays in that layer's compiled code: NeighborhoodAttention.prepare builds it
    in eager code before the layer first runs.
    """
    key = (h, w, kernel_size, torch.device(device), block_size)
    if key not in _BLOCK_MASKS:
        _BLOCK_MASKS[key] = _build_block_mask(*key)
    return _BLOCK_MASKS[key]


@torch.compiler.disable  # a few dozen small ops, once per grid
def _build_block_mask(h, w, kernel_size, device, block_size):
    """FlexAttention's block mask for neighborhood attention over tiled tokens, computed from block bounding boxes.

    torch's create_block_mask evaluates the mask for every (query, key) pair: at a 256x256 token grid that is
    4.3e9 pairs and tens of GiB of temporaries. Here each block of queries is a box of tokens whose neighborhoods
    cover a box of keys (their union) and share a box of keys (their intersection); a key block whose box meets
    the union is partial (the mask_mod decides per pair), one whose box lies inside the intersection is full (no
    mask needed). Memory and time grow with blocks^2, not tokens^2. Boxes over-approximate blocks that wrap a row
    (grids that do not tile), which only turns would-be skipped or full blocks into partial ones: still exact.
    """
    tile = _tile_shape(h, w)
    with torch.inference_mode(False):  # a mask cached under inference mode would be unusable in training later
        return BlockMask.from_kv_blocks(*_neighborhood_blocks(h, w, kernel_size, tile, block_size, device),
                                        BLOCK_SIZE=block_size, mask_mod=_neighborhood_mask_mod(h, w, kernel_size, tile),
                                        seq_lengths=(h * w, h * w))


def _neighborhood_blocks(h, w, kernel_size, tile, block_size, device):
    """(partial counts, partial indices, full counts, full indices) in BlockMask.from_kv_blocks's layout."""
    rows, cols = _block_bounds(h, w, tile, block_size, device)

    def key_spans(bounds, n):
        """Per query block [q_blocks, 1]: the keys its queries' windows cover (union) and share (intersection),
        as half-open [lo, hi) along one axis. Window starts grow with the query position."""
        lo, hi = (window_start(t, n, kernel_size)[:, None] for t in bounds)
        return (lo, hi + kernel_size), (hi, lo + kernel_size)

    def key_box(bounds):  # per key block [1, kv_blocks], half-open
        return bounds[0][None], bounds[1][None] + 1

    def overlaps(a, b):
        return (a[0] < b[1]) & (b[0] < a[1])

    def contains(outer, inner):
        return (outer[0] <= inner[0]) & (inner[1] <= outer[1])

    (union_rows, common_rows), (union_cols, common_cols) = key_spans(rows, h), key_spans(cols, w)
    key_rows, key_cols = key_box(rows), key_box(cols)
    meets = overlaps(union_rows, key_rows) & overlaps(union_cols, key_cols)
    inside = contains(common_rows, key_rows) & contains(common_cols, key_cols)

    def as_indices(blocks):  # [q_blocks, kv_blocks] bool -> counts [1, 1, q_blocks], indices of the set ones first
        counts = blocks.sum(1, dtype=torch.int32)
        indices = blocks.int().argsort(dim=1, descending=True, stable=True).int()
        return counts[None, None], indices[None, None]

    return (*as_indices(meets & ~inside), *as_indices(meets & inside))


def _neighborhood_mask_mod(h, w, kernel_size, tile):
    """FlexAttention mask_mod: may the query at tiled index q_index see the key at kv_index?"""

    def mask_mod(batch, head, q_index, kv_index):
        q_row, q_col = _tile_coords(q_index, w, tile)
        kv_row, kv_col = _tile_coords(kv_index, w, tile)
        row_start, col_start = window_start(q_row, h, kernel_size), window_start(q_col, w, kernel_size)
        return ((kv_row >= row_start) & (kv_row < row_start + kernel_size)
                & (kv_col >= col_start) & (kv_col < col_start + kernel_size))

    return mask_mod


@functools.cache
def _compiled_flex_attention():
    return torch.compile(flex_attention, dynamic=False)


def neighborhood_attention_flex(q, k, v, kernel_size, scale=1.0):
    """Neighborhood attention through FlexAttention over tiled tokens (compiled on CUDA; CPU: forward only)."""
    n, h, w, heads, d = q.shape
    th, tw = _tile_shape(h, w)

    def to_tiles(t):  # [N, H, W, heads, d] -> [N, heads, tiles * th * tw, d]
        return t.view(n, h // th, th, w // tw, tw, heads, d).permute(0, 5, 1, 3, 2, 4, 6).reshape(n, heads, h * w, d)

    block_mask = neighborhood_block_mask(h, w, kernel_size, q.device)
    # Uncompiled, flex_attention runs a slow dense reference; compiled, one fused block-sparse kernel. Inside a
    # compiled layer (dynamo tracing) the plain function is compiled as part of the layer's graph.
    compiled = q.is_cuda and not torch.compiler.is_compiling()
    flex = _compiled_flex_attention() if compiled else flex_attention
    x = flex(to_tiles(q), to_tiles(k), to_tiles(v), block_mask=block_mask, scale=scale)
    return x.view(n, heads, h // th, w // tw, th, tw, d).permute(0, 2, 4, 3, 5, 1, 6).reshape(n, h, w, heads, d)


# Shifted-window attention (Swin, Liu et al. 2021)


def check_window_fits(h, w, window_size):
    if window_size < 1 or h % window_size or w % window_size:
        raise ValueError(
            f"shifted-window attention: window_size {window_size} does not tile a {h}x{w} token grid "
            f"(both sides must be multiples of it)"
        )


@functools.lru_cache(maxsize=32)
def shifted_window_mask(n_windows_h, n_windows_w, window_size, shift, device=None):
    """Boolean [n_h, n_w, ws^2, ws^2] mask for the grid rolled by +shift: the first `shift` rows (and columns) then
    hold tokens wrapped around from the far edge, which must not attend across the seam to their new neighbours.
    Tokens attend to each other iff they are on the same side of the seam in both directions."""
    with torch.inference_mode(False):  # a mask cached under inference mode would be unusable in training later
        rows = torch.arange(n_windows_h * window_size, device=device)
        cols = torch.arange(n_windows_w * window_size, device=device)
        region = 2 * (rows < shift)[:, None] + (cols < shift)[None, :]  # [H, W], four regions at most
        region = region.view(n_windows_h, window_size, n_windows_w, window_size).transpose(1, 2).flatten(2)
        return region[..., :, None] == region[..., None, :]


def shifted_window_attention(q, k, v, window_size, shift=0, scale=1.0, bias=None):
    """Attention within non-overlapping window_size x window_size windows of the grid rolled by `shift`.

    bias: None, or [heads, ws^2, ws^2] added to the logits of every window, query by key in row-major order
    within the window (a relative position bias: Swin, DiffiT).
    """
    n, h, w, heads, d = q.shape
    check_window_fits(h, w, window_size)
    nh, nw, ws = h // window_size, w // window_size, window_size

    def to_windows(t):  # [N, H, W, heads, d] -> [N, heads, nh, nw, ws * ws, d]
        t = torch.roll(t, shifts=(shift, shift), dims=(1, 2))
        return t.view(n, nh, ws, nw, ws, heads, d).permute(0, 5, 1, 3, 2, 4, 6).reshape(n, heads, nh, nw, ws * ws, d)

    mask = shifted_window_mask(nh, nw, ws, shift, q.device) if shift else None
    if bias is not None:  # additive mask [heads, 1, 1, ws^2, ws^2], broadcast over the batch and the windows
        bias = bias.to(q.dtype)[:, None, None]
        mask = bias if mask is None else bias.masked_fill(~mask, float("-inf"))
    x = F.scaled_dot_product_attention(to_windows(q), to_windows(k), to_windows(v), attn_mask=mask, scale=scale)
    x = x.view(n, heads, nh, nw, ws, ws, d).permute(0, 2, 4, 3, 5, 1, 6).reshape(n, h, w, heads, d)
    return torch.roll(x, shifts=(-shift, -shift), dims=(1, 2))


# One module per kind, for the models


class GridAttention(nn.Module):
    """Attention over [N, H, W, heads, d]; keys_per_query says how many keys each query sees, for FLOP counting."""

    def keys_per_query(self, h, w):
        raise NotImplementedError

    def prepare(self, h, w, device):
        """Build and cache what attention over an h x w grid needs, in eager code before a compiled layer runs it
        (built inside the layer, it would break the layer's graph for good). Most kinds need nothing."""


class GlobalAttention(GridAttention):
    def __init__(self, scale=1.0, backend="auto"):
        super().__init__()
        self.scale, self.backend = scale, backend

    def keys_per_query(self, h, w):
        return h * w

    def forward(self, q, k, v):
        return global_attention(q, k, v, self.scale, self.backend)


class NeighborhoodAttention(GridAttention):
    def __init__(self, kernel_size, scale=1.0, backend="auto"):
        super().__init__()
        self.kernel_size, self.scale, self.backend = kernel_size, scale, backend

    def extra_repr(self):
        return f"kernel_size={self.kernel_size}"

    def keys_per_query(self, h, w):
        return self.kernel_size**2

    def prepare(self, h, w, device):
        if self.backend == "flex" or (self.backend == "auto" and device.type == "cuda"):
            neighborhood_block_mask(h, w, self.kernel_size, device)

    def forward(self, q, k, v):
        return neighborhood_attention(q, k, v, self.kernel_size, self.scale, self.backend)


class ShiftedWindowAttention(GridAttention):
    def __init__(self, window_size, shift=0, scale=1.0):
        super().__init__()
        self.window_size, self.shift, self.scale = window_size, shift, scale

    def extra_repr(self):
        return f"window_size={self.window_size}, shift={self.shift}"

    def keys_per_query(self, h, w):
        return self.window_size**2

    def forward(self, q, k, v, bias=None):
        return shifted_window_attention(q, k, v, self.window_size, self.shift, self.scale, bias)
