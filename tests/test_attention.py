"""Attention kinds of hdiffusion.models.attention against naive implementations written here, and natten."""

import pytest
import torch

from hdiffusion.models.attention import (
    global_attention,
    neighborhood_attention,
    neighborhood_attention_reference,
    shifted_window_attention,
)

# natten runs on CPU through an uncompiled flex_attention and says so on every new shape.
pytestmark = [
    pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

# (H, W, kernel_size): square and non-square, grids equal to the kernel, grids where most queries are at a border.
NEIGHBORHOOD_CASES = [(7, 7, 7), (5, 5, 5), (3, 3, 3), (9, 11, 3), (9, 11, 5), (12, 8, 7), (8, 13, 7), (6, 10, 5)]


def qkv(n, h, w, heads, d, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(n, h, w, heads, d, generator=generator, dtype=dtype) for _ in range(3)]


def naive_attention(q, k, v, scale):
    """softmax(scale * q . k) v for one query [d] over keys [L, d]."""
    weights = torch.softmax(scale * (k @ q), dim=0)
    return weights @ v


def naive_neighborhood_attention(q, k, v, kernel_size, scale=1.0):
    """Per-query gather of the kernel_size x kernel_size window, clamped inside the grid as NATTEN defines it."""
    n, h, w, heads, d = q.shape
    out = torch.empty_like(q)
    for i in range(h):
        for j in range(w):
            top = min(max(i - kernel_size // 2, 0), h - kernel_size)
            left = min(max(j - kernel_size // 2, 0), w - kernel_size)
            rows, cols = slice(top, top + kernel_size), slice(left, left + kernel_size)
            for b in range(n):
                for head in range(heads):
                    keys = k[b, rows, cols, head].reshape(-1, d)
                    values = v[b, rows, cols, head].reshape(-1, d)
                    out[b, i, j, head] = naive_attention(q[b, i, j, head], keys, values, scale)
    return out


def naive_shifted_window_attention(q, k, v, window_size, shift, scale=1.0):
    """Swin semantics stated independently: on the grid rolled by `shift`, a query sees the keys of its window
    that were neighbours in the original image, i.e. not brought next to it by the wrap-around (needs H, W >= 2
    windows). Computed in original coordinates."""
    n, h, w, heads, d = q.shape
    out = torch.empty_like(q)
    for i in range(h):
        for j in range(w):
            ri, rj = (i + shift) % h, (j + shift) % w  # where the roll puts this token
            keys_at = [
                (a, b)
                for a in range(h)
                for b in range(w)
                if (a + shift) % h // window_size == ri // window_size
                and (b + shift) % w // window_size == rj // window_size
                and abs(a - i) < window_size
                and abs(b - j) < window_size
            ]
            rows = torch.tensor([a for a, _ in keys_at])
            cols = torch.tensor([b for _, b in keys_at])
            for batch in range(n):
                for head in range(heads):
                    keys, values = k[batch, rows, cols, head], v[batch, rows, cols, head]
                    out[batch, i, j, head] = naive_attention(q[batch, i, j, head], keys, values, scale)
    return out


@pytest.mark.parametrize("h, w, kernel_size", NEIGHBORHOOD_CASES)
def test_neighborhood_reference_matches_naive_loop(h, w, kernel_size):
    q, k, v = qkv(2, h, w, 2, 8)
    expected = naive_neighborhood_attention(q, k, v, kernel_size, scale=0.5)
    actual = neighborhood_attention_reference(q, k, v, kernel_size, scale=0.5)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("h, w, kernel_size", NEIGHBORHOOD_CASES)
def test_natten_matches_reference(h, w, kernel_size):
    pytest.importorskip("natten")
    q, k, v = qkv(2, h, w, 2, 16, seed=1)
    with torch.no_grad():
        expected = neighborhood_attention(q, k, v, kernel_size, backend="reference")
        actual = neighborhood_attention(q, k, v, kernel_size, backend="natten")
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("h, w, kernel_size", [(16, 32, 7), (16, 16, 13), (8, 16, 3), (9, 11, 5), (12, 8, 7)])
def test_flex_matches_reference(h, w, kernel_size):
    """FlexAttention over 2-D tiles (16x32, 16x16, 8x16 tile; the rest run row-major) equals the reference.
    On CPU flex_attention has no backward; the GPU benchmark checks gradients (benchmarks/check_gpu.py)."""
    q, k, v = qkv(2, h, w, 2, 16, seed=3)
    with torch.no_grad():
        expected = neighborhood_attention(q, k, v, kernel_size, backend="reference")
        actual = neighborhood_attention(q, k, v, kernel_size, backend="flex")
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("h, w, kernel_size", [(16, 32, 7), (32, 64, 7), (32, 32, 31), (24, 40, 7), (30, 50, 11)])
def test_neighborhood_block_mask_agrees_with_create_block_mask(h, w, kernel_size):
    """The block mask computed from block bounding boxes marks the same partial and full blocks as torch's
    create_block_mask, which evaluates every (query, key) pair, on grids that tile (16x32, 32x64, 32x32 with full
    blocks at kernel 31); on grids that do not tile (row-major blocks wrap rows) it marks a superset as partial."""
    from torch.nn.attention.flex_attention import create_block_mask

    from hdiffusion.models.attention import _neighborhood_mask_mod, _tile_shape, neighborhood_block_mask

    tile = _tile_shape(h, w)
    expected = create_block_mask(_neighborhood_mask_mod(h, w, kernel_size, tile), None, None, h * w, h * w, "cpu")
    actual = neighborhood_block_mask(h, w, kernel_size, torch.device("cpu"))

    def blocks(block_mask, full):  # dense [q_blocks, kv_blocks] bool of the partial or the full blocks
        counts = block_mask.full_kv_num_blocks if full else block_mask.kv_num_blocks
        indices = block_mask.full_kv_indices if full else block_mask.kv_indices
        dense = torch.zeros(block_mask.kv_indices.shape[-2:], dtype=torch.bool)
        if counts is not None:
            for row, (count, index) in enumerate(zip(counts[0, 0], indices[0, 0])):
                dense[row, index[:count].long()] = True
        return dense

    if tile != (1, w):
        assert torch.equal(blocks(actual, full=False), blocks(expected, full=False))
        assert torch.equal(blocks(actual, full=True), blocks(expected, full=True))
    else:
        needed = blocks(expected, full=False) | blocks(expected, full=True)
        assert (blocks(actual, full=False) | blocks(actual, full=True))[needed].all()
    assert blocks(expected, full=True).sum() == (24 if kernel_size == 31 else 0)


def test_natten_matches_reference_with_cosine_sim_scale():
    """The HDiT case: unit q, k times sqrt(10), softmax scale 1.0."""
    pytest.importorskip("natten")
    q, k, v = qkv(1, 10, 12, 4, 16, seed=2)
    q = q / q.norm(dim=-1, keepdim=True) * 10**0.5
    k = k / k.norm(dim=-1, keepdim=True) * 10**0.5
    with torch.no_grad():
        expected = neighborhood_attention(q, k, v, 7, backend="reference")
        actual = neighborhood_attention(q, k, v, 7, backend="natten")
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("size", [4, 5, 7])
def test_neighborhood_over_whole_grid_is_global(size):
    q, k, v = qkv(2, size, size, 3, 8, seed=3)
    expected = global_attention(q, k, v, backend="reference")
    torch.testing.assert_close(neighborhood_attention_reference(q, k, v, size), expected, atol=1e-5, rtol=1e-5)


def test_global_attention_matches_naive():
    q, k, v = qkv(1, 3, 4, 2, 8, seed=4)
    expected = torch.empty_like(q)
    keys, values = k.flatten(1, 2), v.flatten(1, 2)  # [1, L, heads, d]
    for i in range(3):
        for j in range(4):
            for head in range(2):
                expected[0, i, j, head] = naive_attention(q[0, i, j, head], keys[0, :, head], values[0, :, head], 1.0)
    torch.testing.assert_close(global_attention(q, k, v), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("h, w, window_size", [(8, 8, 4), (6, 9, 3), (4, 4, 4)])
def test_unshifted_windows_match_naive_per_window_attention(h, w, window_size):
    q, k, v = qkv(2, h, w, 2, 8, seed=5)
    expected = torch.empty_like(q)
    for top in range(0, h, window_size):
        for left in range(0, w, window_size):
            window = (slice(None), slice(top, top + window_size), slice(left, left + window_size))
            expected[window] = global_attention(q[window], k[window], v[window], backend="reference")
    torch.testing.assert_close(shifted_window_attention(q, k, v, window_size, shift=0), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("h, w, window_size, shift", [(8, 8, 4, 2), (6, 9, 3, 1), (8, 12, 4, 3)])
def test_shifted_windows_match_naive(h, w, window_size, shift):
    q, k, v = qkv(1, h, w, 2, 8, seed=6)
    expected = naive_shifted_window_attention(q, k, v, window_size, shift)
    actual = shifted_window_attention(q, k, v, window_size, shift)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_gradients_flow_through_reference_paths():
    q, k, v = (t.requires_grad_() for t in qkv(1, 8, 8, 2, 8, seed=7))
    # On CPU with grad needed, "auto" must pick the reference: natten has no CPU backward.
    out = neighborhood_attention(q, k, v, 3) + shifted_window_attention(q, k, v, 4, shift=2) + global_attention(q, k, v)
    out.square().sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0

    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    neighborhood_attention_reference(q2, k2, v2, 3).square().sum().backward()
    q3, k3, v3 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    naive_neighborhood_attention(q3, k3, v3, 3).square().sum().backward()
    torch.testing.assert_close(q2.grad, q3.grad, atol=1e-5, rtol=1e-4)


def test_sizes_that_do_not_fit_are_rejected():
    q, k, v = qkv(1, 6, 8, 1, 8)
    with pytest.raises(ValueError, match="kernel_size 7"):
        neighborhood_attention(q, k, v, 7)
    with pytest.raises(ValueError, match="window_size 4"):
        shifted_window_attention(q, k, v, 4)
    with pytest.raises(ValueError, match="backend"):
        neighborhood_attention(q, k, v, 3, backend="fast")
