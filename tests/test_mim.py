"""Tests for mim.py: masking invariants, HOG against a naive oracle, losses, and one training step per method."""
import math
from dataclasses import replace

import pytest
import torch

import mim
from mim import block_masking, hog, hog_targets, mask_to_map, masked_mean, norm_pix, patchify, random_masking, \
    unpatchify


# ---- masking invariants (mask: 1 = removed, 0 = kept) ----

@pytest.mark.parametrize("n, ratio", [(16, 0.75), (196, 0.75), (10, 0.9), (64, 0.6), (7, 0.0)])
def test_random_masking_counts_and_restore(n, ratio):
    ids_keep, ids_restore, mask = random_masking(5, n, ratio)
    n_vis = round(n * (1 - ratio))
    assert ids_keep.shape == (5, n_vis) and ids_restore.shape == (5, n) and mask.shape == (5, n)
    assert (mask.sum(dim=1) == n - n_vis).all()                           # exact count per sample
    assert (torch.gather(mask, 1, ids_keep) == 0).all()                   # kept ids are the zeros of the mask
    # ids_restore inverts the shuffle: [kept, removed] tokens gathered with ids_restore are in original order
    ids_shuffle = ids_restore.argsort(dim=1)
    assert (ids_shuffle[:, :n_vis] == ids_keep).all()
    tokens = torch.arange(n)[None].expand(5, -1)
    shuffled = torch.gather(tokens, 1, ids_shuffle)
    assert (torch.gather(shuffled, 1, ids_restore) == tokens).all()


def test_masks_are_per_sample_and_deterministic_under_a_seed():
    a = random_masking(4, 64, 0.75, generator=torch.Generator().manual_seed(3))[2]
    b = random_masking(4, 64, 0.75, generator=torch.Generator().manual_seed(3))[2]
    assert torch.equal(a, b) and not torch.equal(a[0], a[1])
    a = block_masking(4, (8, 8), 30, generator=torch.Generator().manual_seed(3))
    b = block_masking(4, (8, 8), 30, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and not torch.equal(a[0], a[1])


def components(grid: torch.Tensor) -> int:
    """4-connected components of the ones of a 2-D 0/1 grid (flood fill)."""
    seen, count = set(), 0
    h, w = grid.shape
    for start in [(r, c) for r in range(h) for c in range(w) if grid[r, c] == 1]:
        if start in seen:
            continue
        count, stack = count + 1, [start]
        while stack:
            r, c = stack.pop()
            if (r, c) in seen or not (0 <= r < h and 0 <= c < w) or grid[r, c] != 1:
                continue
            seen.add((r, c))
            stack += [(r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)]
    return count


def test_block_masking_exact_count_and_contiguous():
    g = torch.Generator().manual_seed(0)
    block = block_masking(16, (14, 14), 118, generator=g)                 # SiameseIM's 118 of 196
    assert (block.sum(dim=1) == 118).all()
    rand = random_masking(16, 196, 1 - 78 / 196, generator=g)[2]          # same count, no structure
    assert rand.sum(dim=1).eq(118).all()
    blocky = sum(components(m.view(14, 14)) for m in block) / 16
    scattered = sum(components(m.view(14, 14)) for m in rand) / 16
    assert blocky < 4 < scattered, (blocky, scattered)                    # a few rectangles vs many islands


def test_mask_maps_are_aligned_across_levels():
    from hivit import units_to_map
    mask = random_masking(2, 12, 0.5)[2]                                   # grid 3 x 4
    for scale in (1, 2, 4, 16):
        level = mask_to_map(mask, (3, 4), scale)                           # (B, 3s, 4s)
        units = mask[:, :, None, None, None].expand(-1, -1, scale, scale, 1)   # HiViT unit layout
        assert torch.equal(level, units_to_map(units, (3, 4))[:, 0])
        pooled = torch.nn.functional.avg_pool2d(level[:, None], scale)[:, 0]    # back to the unit grid
        assert torch.equal(pooled.flatten(1), mask)


# ---- pixel targets ----

def test_patchify_roundtrip_and_order():
    x = torch.randn(2, 3, 32, 48)
    p = patchify(x)
    assert p.shape == (2, 6, 768)
    assert torch.equal(unpatchify(p, (2, 3)), x)
    assert torch.equal(p[0, 4].view(16, 16, 3), x[0, :, 16:32, 16:32].permute(1, 2, 0))   # unit (1, 1): row-major


def test_norm_pix_and_masked_mean():
    t = torch.randn(2, 5, 12) * 3 + 7
    z = norm_pix(t)
    assert torch.allclose(z.mean(-1), torch.zeros(2, 5), atol=1e-5)
    assert torch.allclose(z.var(-1), torch.ones(2, 5), atol=1e-4)
    per_unit = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    assert masked_mean(per_unit, mask).item() == pytest.approx((1 + 3 + 6) / 3)


# ---- HOG ----

def naive_hog(img: torch.Tensor, normalize: bool) -> torch.Tensor:
    """Deliberately plain HOG of one (3, H, W) image: explicit loops over channels, pixels and cells, in float64."""
    c_, h, w = img.shape
    x = img.double().tolist()

    def px(c, r, q):                                                      # reflect padding by one pixel
        r = -r if r < 0 else (2 * (h - 1) - r if r >= h else r)
        q = -q if q < 0 else (2 * (w - 1) - q if q >= w else q)
        return x[c][r][q]

    out = torch.zeros(c_, 9, h // 8, w // 8, dtype=torch.float64)
    for c in range(c_):
        for r in range(h):
            for q in range(w):
                gx = (px(c, r - 1, q - 1) + 2 * px(c, r, q - 1) + px(c, r + 1, q - 1)
                      - px(c, r - 1, q + 1) - 2 * px(c, r, q + 1) - px(c, r + 1, q + 1))
                gy = (px(c, r - 1, q - 1) + 2 * px(c, r - 1, q) + px(c, r - 1, q + 1)
                      - px(c, r + 1, q - 1) - 2 * px(c, r + 1, q) - px(c, r + 1, q + 1))
                b = math.floor(math.atan2(gx, gy) * 9 / math.pi) % 9
                out[c, b, r // 8, q // 8] += math.sqrt(gx * gx + gy * gy)
        if normalize:
            for i in range(h // 8):
                for j in range(w // 8):
                    norm = math.sqrt(sum(out[c, k, i, j].item() ** 2 for k in range(9)))
                    if norm > 0:
                        out[c, :, i, j] /= norm
    return out.reshape(c_ * 9, h // 8, w // 8)


@pytest.mark.parametrize("normalize", [True, False])
def test_hog_matches_naive_reference(normalize):
    imgs = torch.randn(2, 3, 16, 24, generator=torch.Generator().manual_seed(0))
    ours = hog(imgs, normalize=normalize)
    assert ours.shape == (2, 27, 2, 3) and ours.dtype == torch.float32
    for b in range(2):
        ref = naive_hog(imgs[b], normalize).float()
        tol = 1e-5 if normalize else 1e-5 * ref.abs().max().item()        # unnormalised sums reach ~1e2
        assert torch.allclose(ours[b], ref, atol=tol), (ours[b] - ref).abs().max()


def test_hog_of_constant_image_is_zero():
    assert hog(torch.full((1, 3, 16, 16), 0.7)).abs().max() == 0


def ramp(side: int = 32) -> torch.Tensor:
    """One linear ramp per colour channel whose Sobel orientation sits a quarter into bins 0, 3 and 7."""
    i, j = torch.arange(side, dtype=torch.float64)[:, None], torch.arange(side, dtype=torch.float64)[None]
    # gx = -8 dI/dj and gy = -8 dI/di, so I = -(sin t * j + cos t * i) has atan2(gx, gy) = t in the interior
    chans = [-(math.sin(t) * j + math.cos(t) * i) for t in ((b + 0.25) * math.pi / 9 for b in (0, 3, 7))]
    return torch.stack(chans)[None].float()                               # (1, 3, side, side)


def test_hog_rotation_and_flip_permute_bins():
    img = ramp()
    base = hog(img).view(1, 3, 9, 4, 4)
    inner = (..., slice(1, 3), slice(1, 3))                               # cells without reflect-padded borders
    assert (base[0, :, :, 1, 1].argmax(dim=-1) == torch.tensor([0, 3, 7])).all()
    for k in (1, -1):
        # +-90 deg is the same unsigned orientation shift of 4.5 bins; a quarter into bin b lands in bin b + 4
        rotated = hog(torch.rot90(img, k, dims=(2, 3))).view(1, 3, 9, 4, 4)
        expected = torch.rot90(base, k, dims=(3, 4)).roll(4, dims=2)
        assert torch.allclose(rotated[inner], expected[inner], atol=1e-5)
    rotated = hog(torch.rot90(img, 2, dims=(2, 3))).view(1, 3, 9, 4, 4)   # 180 deg: unsigned bins unchanged
    assert torch.allclose(rotated[inner], torch.rot90(base, 2, dims=(3, 4))[inner], atol=1e-5)
    flipped = hog(img.flip(3)).view(1, 3, 9, 4, 4)                        # mirror: angle -> -angle, bin b -> 8 - b
    assert torch.allclose(flipped[inner], base.flip(4).flip(2)[inner], atol=1e-5)


def test_hog_fp32_under_bf16_autocast_and_targets_layout():
    imgs = torch.randn(2, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = hog(imgs)
    assert h.dtype == torch.float32 and torch.isfinite(h).all()
    assert torch.allclose(h, hog(imgs))
    t = hog_targets(h)                                                    # (B, N, 27 * 2 * 2)
    assert t.shape == (2, 4, 108)
    assert torch.equal(t[0, 3].view(27, 2, 2), h[0, :, 2:4, 2:4])          # unit (1, 1) owns cells 2..3 x 2..3


# ---- losses ----

def test_losses_basic_values():
    a = torch.randn(2, 4, 8)
    assert mim.l2_loss(a, a).abs().max() == 0 and mim.smooth_l1_loss(a, a).abs().max() == 0
    assert torch.allclose(mim.cosine_loss(a, 3 * a), torch.zeros(2, 4), atol=1e-6)
    q = torch.eye(4) * 10
    assert mim.info_nce_loss(q, q, temperature=0.05).max() < 1e-6            # each query matches its own key
    assert mim.info_nce_loss(q, q.roll(1, dims=0), temperature=0.05).min() > 10
