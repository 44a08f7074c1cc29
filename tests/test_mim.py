"""Tests for mim.py: masking invariants, HOG against a naive oracle, losses, and one training step per method."""
import math
from dataclasses import asdict, replace

import pytest
import torch

import mim
from hivit import PRESETS as HIVIT_PRESETS, VIT_PRESETS, HiViT, VisionTransformer, sincos_pos_embed_2d, units_to_map
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


@pytest.mark.parametrize("ratio", [1.0, 1.5, -0.5])
def test_mask_ratio_outside_0_1_is_refused(ratio):
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        random_masking(2, 16, ratio)                                      # 1.5 would keep 8 of 16 units silently
    for pattern in ("random", "block"):
        with pytest.raises(ValueError, match=r"\[0, 1\)"):
            mim.mask_units(2, (4, 4), mask_ratio=ratio, pattern=pattern)


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


# ---- methods on the tiny encoders ----


def tiny_encoder(kind: str = "hivit"):
    """The tiny HiViT (or ViT) without a classification head, so every parameter belongs to the pre-training."""
    if kind == "hivit":
        return HiViT(replace(HIVIT_PRESETS["tiny"], num_classes=0))
    return VisionTransformer(replace(VIT_PRESETS["vit_tiny"], num_classes=0))


def build(name: str, kind: str = "hivit", **overrides):
    return mim.METHODS[name](tiny_encoder(kind), cfg=replace(mim.tiny_decoder(mim.PRESETS[name]), **overrides))


def check_step(model, imgs, **extra):
    """One forward/backward: finite loss, and a finite gradient for every trainable parameter (none for teachers)."""
    out = model(imgs, **extra)
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
    out["loss"].backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{name} got no gradient"
            assert torch.isfinite(p.grad).all(), name
        else:
            assert name.startswith("teacher.") and p.grad is None, name
    return out


class PerfectDecoder(torch.nn.Module):
    """Stands in for MAEDecoder: returns the true target, plus `noise` on the first visible (or removed) unit of
    sample 0. A unit n was kept when ids_restore[n] < N_vis (its rank in the shuffle)."""

    def __init__(self, target, *, noise, on_visible):
        super().__init__()
        self.target, self.noise, self.on_visible = target, noise, on_visible

    def forward(self, latent, ids_restore, grid_hw):
        kept = ids_restore[0] < latent.shape[1]                           # (N,) visible units of sample 0
        unit = int((kept if self.on_visible else ~kept).nonzero()[0])
        pred = self.target.clone()
        pred[0, unit] += self.noise
        return pred


def fast_itpn_encoder():
    import fast_itpn
    return fast_itpn.FastiTPN(replace(fast_itpn.PRESETS["tiny"], num_classes=0), pyramid=False)


@pytest.mark.parametrize("name", ["mae", "fastmim", "m3i"])
@pytest.mark.parametrize("kind", ["hivit", "vit", "fast_itpn"])
def test_methods_start_the_position_table_from_sincos(name, kind):
    # Every method calls encoder.init_pos_embed_sincos() at construction: the table (trunc-normal when the encoder is
    # built) becomes MAE's 2-D sin-cos table, stays trainable, and the EMA teacher is copied after that.
    encoder = fast_itpn_encoder() if kind == "fast_itpn" else tiny_encoder(kind)
    model = mim.METHODS[name](encoder, cfg=mim.tiny_decoder(mim.PRESETS[name]))
    key = "absolute_pos_embed" if kind == "hivit" else "pos_embed"
    grid = model.encoder.grid
    expected = sincos_pos_embed_2d(model.encoder.cfg.embed_dim, *grid)[None]   # (1, N, C), hivit.py
    table = dict(model.encoder.named_parameters())[key]
    assert torch.equal(table.detach(), expected) and table.requires_grad
    if name == "m3i":
        assert torch.equal(dict(model.teacher.named_parameters())[key], expected)


def test_mae_loss_zero_for_perfect_prediction_and_counts_only_masked_units():
    torch.manual_seed(0)
    model = build("mae")
    imgs = torch.randn(2, 3, 64, 64)
    target = norm_pix(patchify(imgs))
    model.decoder = PerfectDecoder(target, noise=0.0, on_visible=True)
    assert model(imgs)["loss"].item() == 0                               # perfect prediction
    model.decoder = PerfectDecoder(target, noise=5.0, on_visible=True)
    assert model(imgs)["loss"].item() == 0                               # errors on visible units do not count
    model.decoder = PerfectDecoder(target, noise=2.0, on_visible=False)
    out = model(imgs)
    assert out["mask"].sum() == 2 * 12                                   # 16 units, 0.75 removed
    assert out["loss"].item() == pytest.approx(4.0 / 24, rel=1e-5)      # 2^2 on one unit, mean over 24 removed


def test_mae_decoder_puts_each_token_back_at_its_unit():
    """Oracle with a 0-block decoder: output at unit n = pred(norm(embed(token of n) + pos_n)), or the mask token."""
    torch.manual_seed(0)
    decoder = mim.MAEDecoder(8, dim=16, depth=0, num_heads=2, out_dim=4)
    ids_keep, ids_restore, mask = random_masking(3, 12, 0.75)
    tokens = torch.randn(3, 3, 8)                                         # (B, N_vis, C) in ids_keep order
    out = decoder(tokens, ids_restore, (3, 4))                            # (B, N, 4)
    pos = sincos_pos_embed_2d(16, 3, 4)                                   # (N, D), hivit.py
    for b in range(3):
        for n in range(12):
            kept = (ids_keep[b] == n).nonzero()
            x = decoder.embed(tokens[b, kept[0, 0]]) if len(kept) else decoder.mask_token[0, 0]
            assert torch.allclose(out[b, n], decoder.pred(decoder.norm(x + pos[n])), atol=1e-6)
            assert mask[b, n] == (0 if len(kept) else 1)


def test_fastmim_overfits_one_batch():
    torch.manual_seed(0)
    model = build("fastmim")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    imgs = torch.nn.functional.interpolate(torch.randn(4, 3, 4, 4), size=32, mode="bilinear")   # smooth images
    losses = []
    for _ in range(10):
        opt.zero_grad()
        loss = model(imgs)["loss"]
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-3:]) / 3 < 0.5 * losses[0], losses


@pytest.mark.parametrize("kind", ["hivit", "vit"])
def test_mae_step_and_shapes(kind):
    out = check_step(build("mae", kind), torch.randn(2, 3, 64, 64))
    assert out["pred"].shape == (2, 16, 768) and out["recon"].shape == (2, 3, 64, 64)
    assert (out["mask"].sum(dim=1) == 12).all()


def test_simmim_input_at_masked_units_is_the_mask_token():
    model = build("simmim")
    imgs = torch.randn(2, 3, 64, 64)
    mask = random_masking(2, 16, 0.75)[2]
    x = model.mask_input(imgs, mask)
    pixel_mask = mask_to_map(mask, (4, 4), 16)[:, None].expand(-1, 3, -1, -1).bool()   # (B, 3, H, W)
    token = model.mask_token.detach().expand(2, 3, 64, 64)
    assert torch.equal(x[pixel_mask], token[pixel_mask])                 # masked units: the learnable colour
    assert torch.equal(x[~pixel_mask], imgs[~pixel_mask])                # visible units: untouched



@pytest.mark.parametrize("name", ["simmim", "fastmim"])
def test_fastmim_encoder_never_sees_the_masked_pixels(name, monkeypatch):
    """FastMIM Sec. 4.1: the RGB input is masked before the encoder, so new pixels in the masked units change no
    prediction (every unit is encoded, and attention would carry a leak to all of them), while the target moves."""
    torch.manual_seed(0)
    model = build(name).eval()
    fixed = mim.random_masking(2, 16, 0.75, generator=torch.Generator().manual_seed(2))
    monkeypatch.setattr(mim, "mask_units", lambda *a, **k: fixed)
    mask = fixed[2]
    imgs = torch.randn(2, 3, 64, 64)
    noisy = imgs + mask_to_map(mask, (4, 4), 16)[:, None] * torch.randn_like(imgs)   # masked units only
    with torch.no_grad():
        a, b = model(imgs), model(noisy)
    assert torch.equal(a["pred"], b["pred"]) and a["loss"] != b["loss"]

@pytest.mark.parametrize("name, kind", [("simmim", "hivit"), ("fastmim", "hivit"), ("fastmim", "vit")])
def test_fastmim_step(name, kind):
    out = check_step(build(name, kind), torch.randn(2, 3, 32, 32))
    assert out["pred"].shape == (2, 4, 108 if name == "fastmim" else 768)
    if name == "fastmim":
        assert out["pictures"]["hog_target"].shape == (2, 3, 32, 32)


def test_no_nan_under_bf16_autocast():
    torch.manual_seed(0)
    imgs = torch.randn(2, 2, 3, 32, 32)                                   # two views per image (M3I)
    for name in ("mae", "fastmim", "m3i"):
        model = build(name)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = (model(imgs, geometry=random_geometry(2)) if model.num_views == 2 else model(imgs[:, 0]))["loss"]
        loss.backward()
        assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters()
                                            if p.grad is not None)


def test_fastmim_p_switches_resolution_mid_run_and_keeps_optimizer_state():
    torch.manual_seed(0)
    model = build("fastmim_p", img_sizes=((0.0, 32), (0.5, 48), (0.75, 64)))   # 128/160/192, scaled down
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    sizes = [mim.img_size_at(model.cfg, progress=s / 4) for s in range(4)]
    assert sizes == [32, 32, 48, 64]
    moments = None
    for step, side in enumerate(sizes):
        opt.zero_grad()
        loss = model(torch.randn(2, 3, side, side))["loss"]
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
        states = {id(p): opt.state[p] for g in opt.param_groups for p in g["params"]}
        assert all(int(s["step"]) == step + 1 for s in states.values())  # one continuous optimizer history
        if moments is not None:                                          # moments carried over, not re-created
            assert all(states[k]["exp_avg"] is moments[k] for k in moments)
        moments = {k: s["exp_avg"] for k, s in states.items()}
    # fine-tune at another size: the position tables interpolate on the fly
    classifier = HiViT(HIVIT_PRESETS["tiny"])
    missing = classifier.load_state_dict(model.encoder.state_dict(), strict=False).missing_keys
    assert sorted(missing) == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    assert torch.isfinite(classifier(torch.randn(1, 3, 80, 80))).all()


def test_depth_truncation_pretrains_and_loads_into_the_full_model():
    cfg = mim.truncate_encoder_config(replace(HIVIT_PRESETS["tiny"], num_classes=0), 1)
    assert cfg.depth == HIVIT_PRESETS["tiny"].depth - 1
    model = mim.FastMIM(HiViT(cfg), cfg=mim.tiny_decoder(mim.PRESETS["fastmim"]))
    check_step(model, torch.randn(2, 3, 32, 32))
    full = HiViT(replace(HIVIT_PRESETS["tiny"], num_classes=0))
    missing = full.load_state_dict(model.encoder.state_dict(), strict=False).missing_keys
    assert missing and all(k.startswith(f"blocks.{cfg.depth}.") for k in missing)   # only the removed block
    with pytest.raises(ValueError):
        mim.truncate_encoder_config(cfg, cfg.depth)


# ---- M3I ----

def test_mixed_input_takes_each_unit_from_exactly_one_image():
    x_i, x_j = torch.randn(3, 3, 64, 48), torch.randn(3, 3, 64, 48)
    mix = random_masking(3, 12, 0.5)[2]
    mixed = patchify(mim.mix_images(x_i, x_j, mix))                       # (B, N, P)
    from_i = (mixed == patchify(x_i)).all(dim=-1)                         # (B, N): the whole unit equals image i
    from_j = (mixed == patchify(x_j)).all(dim=-1)
    assert (from_i ^ from_j).all()                                        # exactly one source per unit
    assert torch.equal(from_j.float(), mix) and (mix.sum(dim=1) == 6).all()


def random_geometry(b: int, *, seed: int = 0) -> torch.Tensor:
    """(B, 2, 5) geometry of a target and an input view (top, left, height, width as fractions of the source, flip),
    cycling through the four flip patterns."""
    g = torch.Generator().manual_seed(seed)
    size = 0.45 + 0.5 * torch.rand(b, 2, 2, generator=g)                 # (B, 2, 2) height, width
    corner = torch.rand(b, 2, 2, generator=g) * (1 - size)                # (B, 2, 2) top, left inside the image
    flips = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]]).repeat(b // 4 + 1, 1)[:b]   # (B, 2)
    return torch.cat([corner, size, flips[..., None]], dim=-1)           # (B, 2, 5)


def cut_views(src: torch.Tensor, geometry: torch.Tensor, side: int) -> torch.Tensor:
    """Each view of geometry (B, 2, 5) resampled out of src (B, 3, S, S), bilinear: (B, 2, 3, side, side)."""
    views = []
    for view in geometry.unbind(dim=1):                                   # (B, 5) each
        top, left, height, width, flip = view.unbind(dim=1)              # (B,) each
        theta = torch.zeros(src.shape[0], 2, 3)                           # output [-1, 1] -> source [-1, 1]
        theta[:, 0, 0] = torch.where(flip > 0.5, -width, width)
        theta[:, 0, 2] = 2 * left + width - 1
        theta[:, 1, 1] = height
        theta[:, 1, 2] = 2 * top + height - 1
        grid = torch.nn.functional.affine_grid(theta, [src.shape[0], 3, side, side], align_corners=False)
        views.append(torch.nn.functional.grid_sample(src, grid, align_corners=False))
    return torch.stack(views, dim=1)                                      # (B, 2, 3, side, side)


def sample_at(view: torch.Tensor, coords: torch.Tensor, hp: int) -> torch.Tensor:
    """Bilinear values of view (B, 3, H, W) at unit coordinates (B, N, 2) = (row, col) of an hp x hp grid: (B, 3, N)."""
    grid = (coords[..., [1, 0]] + 0.5) * 2 / hp - 1                       # (B, N, 2) x, y in [-1, 1]
    return torch.nn.functional.grid_sample(view, grid[:, :, None], align_corners=False)[..., 0]   # (B, 3, N)


def ramp_image(b: int, side: int) -> torch.Tensor:
    """(B, 3, S, S): channel 0 = the pixel centre's row, channel 1 its column, as fractions of the image."""
    pos = (torch.arange(side) + 0.5) / side
    return torch.stack([pos[:, None].expand(side, side), pos[None, :].expand(side, side),
                        torch.zeros(side, side)])[None].repeat(b, 1, 1, 1)


def test_view_coords_map_target_units_into_the_input_view():
    """Oracle: on a linear ramp (each pixel holds its source position), a target-view unit centre and the input view
    sampled at its view_coords hold the same source position, for every flip pattern; scales = 10 ln(box ratio)."""
    hp = 4
    geometry = random_geometry(8)
    views = cut_views(ramp_image(8, 96), geometry, side=64)              # (B, 2, 3, 64, 64)
    coords = mim.view_coords((hp, hp), geometry)                          # (B, N, 4)
    identity = mim.view_coords((hp, hp)).expand(8, -1, -1)                # (B, N, 4) the target grid itself
    truth = sample_at(views[:, 0], identity[..., :2], hp)[:, :2]          # (B, 2, N) source row, col of each unit
    seen = sample_at(views[:, 1], coords[..., :2], hp)[:, :2]             # (B, 2, N)
    inside = ((coords[..., :2] > 0) & (coords[..., :2] < hp - 1)).all(dim=-1)   # (B, N) well inside the input view
    assert inside.sum() > 20
    err = (seen - truth).abs().amax(dim=1)                                # (B, N)
    assert err[inside].max() < 1e-4, err[inside].max()
    ratio = geometry[:, 0, 2:4] / geometry[:, 1, 2:4]                     # (B, 2) target / input box sides
    torch.testing.assert_close(coords[..., 2:], 10 * torch.log(ratio)[:, None].expand(-1, hp * hp, -1))
    assert torch.equal(identity[0, 5], torch.tensor([1.0, 1.0, 0.0, 0.0]))   # no geometry: the plain grid, scale 0


def test_m3i_teacher_gets_no_gradient_and_follows_the_ema_rule():
    torch.manual_seed(0)
    model = build("m3i")
    assert model.num_views == 2
    check_step(model, torch.randn(2, 2, 3, 32, 32), geometry=random_geometry(2))
    assert all(not p.requires_grad and p.grad is None for p in model.teacher.parameters())
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    opt.step()                                                            # student moves, teacher does not
    before = [t.clone() for t in model.teacher.parameters()]
    model.ema_update()                                                    # m = cfg.momentum
    m = model.cfg.momentum
    assert m == 0.995                                                     # SiameseIM's m0 (cosine to 1)
    for t, t0, s in zip(model.teacher.parameters(), before, model.encoder.parameters()):
        assert torch.allclose(t, m * t0 + (1 - m) * s, atol=1e-7)
    after = [t.clone() for t in model.teacher.parameters()]
    model.ema_update(progress=1.0)                                        # cosine schedule ends at m = 1
    assert all(torch.equal(a, t) for a, t in zip(after, model.teacher.parameters()))
    assert mim.cosine_momentum(0.99, 0.0) == pytest.approx(0.99)
    model.train()
    assert not model.teacher.training                                     # the target encoder stays in eval mode


@pytest.mark.parametrize("name", ["m3i", *mim.M3I_PRESET_NAMES])
def test_m3i_presets_train_one_step(name):
    torch.manual_seed(0)
    model = build(name)
    if model.num_views == 2:
        out = check_step(model, torch.randn(4, 2, 3, 64, 64), geometry=random_geometry(4))
    else:
        out = check_step(model, torch.randn(4, 3, 64, 64))
    assert out["mask"].shape == (4, 16)


class RecordingDecoder(torch.nn.Module):
    """Stands in for QueryDecoder: records its inputs and predicts a fixed random (B, Nq, out), new for each call."""

    def __init__(self, out_dim):
        super().__init__()
        self.out_dim, self.calls, self.preds = out_dim, [], []
        self.scale = torch.nn.Parameter(torch.ones(()))                   # keeps the loss differentiable

    def forward(self, tokens, token_coords, query_coords):
        self.calls.append((tokens.shape, token_coords, query_coords))
        g = torch.Generator().manual_seed(len(self.calls))
        self.preds.append(torch.randn(*query_coords.shape[:2], self.out_dim, generator=g))   # (B, Nq, out)
        return self.scale * self.preds[-1]


def test_m3i_wiring_intra_view_image_i_inter_view_image_j_one_teacher_pass(monkeypatch):
    torch.manual_seed(0)
    model = build("m3i")
    model.decoder = RecordingDecoder(out_dim=64)
    teacher_batches, teacher_features = [], model.teacher.forward_features

    def counting(x, **kwargs):                                            # instance attribute shadows the method
        teacher_batches.append(x.shape[0])
        return teacher_features(x, **kwargs)
    model.teacher.forward_features = counting
    sigma = torch.tensor([2, 0, 3, 1])                                    # j = sigma(i): no slot is its own partner
    perms = []
    monkeypatch.setattr(torch, "randperm", lambda n, **kw: perms.append(n) or sigma.clone())
    imgs, geometry = torch.randn(4, 2, 3, 64, 64), random_geometry(4)
    encoded, encoder_features = [], model.encoder.forward_features
    model.encoder.forward_features = lambda x, **kw: encoded.append(x) or encoder_features(x, **kw)
    out = model(imgs, geometry=geometry)
    assert teacher_batches == [4] and perms == [4]                        # one pass over the B target views
    # the mix: each unit of slot b is image i's target view (mix 0) or image j = sigma(b)'s input view (mix 1)
    (mixed,) = encoded
    mix = out["mask"][:, :, None]                                         # (B, N, 1), 1 = from image j
    expected = mim.patchify(imgs[:, 0]) * (1 - mix) + mim.patchify(imgs[sigma, 1]) * mix   # (B, N, P)
    assert torch.equal(mim.patchify(mixed), expected) and (mix.sum(dim=1) == 8).all()
    # documented losses (L2 on all target units): image i against target[own], image j against target[sigma]
    with torch.no_grad():
        target = torch.nn.functional.layer_norm(teacher_features(imgs[:, 0])[-1], (64,))   # (B, N, C), no affine
    pred_i, pred_j = model.decoder.preds
    assert out["logs"]["loss_i"].item() == pytest.approx(((pred_i - target) ** 2).mean().item(), rel=1e-5)
    assert out["logs"]["loss_j"].item() == pytest.approx(((pred_j - target[sigma]) ** 2).mean().item(), rel=1e-5)
    assert out["logs"]["loss_j"].item() != pytest.approx(((pred_j - target) ** 2).mean().item(), rel=1e-2)
    (shape_i, pos_i, query_i), (shape_j, pos_j, query_j) = model.decoder.calls
    assert shape_i == shape_j == (4, 8, 64)                               # each image owns half of the 16 units
    grid = mim.view_coords((4, 4)).expand(4, -1, -1)
    assert torch.equal(query_i, grid)                                     # image i: queries on its own view's grid
    torch.testing.assert_close(query_j, mim.view_coords((4, 4), geometry)[sigma])   # image j: v_j's units in u_j
    units = torch.cat([pos_i, pos_j], dim=1)[..., :2]                     # (B, 16, 2) grid positions of the tokens
    index = (units[..., 0] * 4 + units[..., 1]).long().sort(dim=1).values  # (B, 16)
    assert torch.equal(index, torch.arange(16).expand(4, -1))             # i and j split the grid, no overlap


@pytest.mark.parametrize("name", ["m3i", "m3i_k_siamese_im_feat"])
def test_two_view_m3i_refuses_a_batch_without_two_views_and_their_geometry(name):
    model = build(name)
    assert model.num_views == 2
    for imgs, geometry in ((torch.randn(2, 3, 32, 32), None),            # one view: (B, 3, H, W)
                           (torch.randn(2, 3, 3, 32, 32), random_geometry(2)),   # three views
                           (torch.randn(2, 2, 3, 32, 32), None),         # two views, no geometry
                           (torch.randn(2, 2, 3, 32, 32), random_geometry(2)[:, :, :4])):   # no flips
        with pytest.raises(ValueError, match=r"\(B, 2, 3, H, W\).*geometry \(B, 2, 5\)"):
            model(imgs, geometry=geometry)
    one_view = build("m3i_e_mim_feat")
    assert one_view.num_views == 1
    with pytest.raises(ValueError, match=r"one view per image"):
        one_view(torch.randn(2, 2, 3, 32, 32), geometry=random_geometry(2))


def test_m3i_is_deterministic_under_a_seed():
    model = build("m3i")
    imgs, geometry = torch.randn(2, 2, 3, 32, 32), random_geometry(2)
    losses = []
    for _ in range(2):
        torch.manual_seed(7)                                              # sigma and mix from torch's RNG
        losses.append(model(imgs, geometry=geometry)["loss"].item())
    assert losses[0] == losses[1]


def test_m3i_on_vit_has_one_loss_term_per_image():
    """M3I is the self-supervised method (the supervised category and text targets are not built): a mixed input
    gives exactly two terms, image i's and image j's, and their sum is the loss."""
    torch.manual_seed(0)
    model = build("m3i", "vit")
    out = check_step(model, torch.randn(4, 2, 3, 64, 64), geometry=random_geometry(4))
    assert set(out["logs"]) == {"loss_i", "loss_j"}
    assert out["loss"].item() == pytest.approx((out["logs"]["loss_i"] + out["logs"]["loss_j"]).item())
    assert "num_classes" not in vars(mim.PRESETS["m3i"]) and "text_target" not in vars(mim.PRESETS["m3i"])


def test_loss_choice_is_checked_at_construction():
    with pytest.raises(ValueError):
        build("mae", loss="info_nce")                                     # a dense target needs a per-unit loss
    with pytest.raises(ValueError):
        build("m3i_k_siamese_im_feat", loss="info_nce")
    with pytest.raises(ValueError, match="info_nce"):
        build("m3i_c_global_distillation", loss="l2")                    # one loss for global targets


# M3I Tab. 2: input and target of each row as the paper gives them, and the supervised positions we chose (M3I
# docstring). The loss is one per target type for every row (also our choice, M3I docstring): the paper's per-row
# losses are in an appendix table not at hand, and one loss keeps each compared pair of rows to one factor.
TABLE_2 = {
    "a": ("V1 full", "dense pixels", "all"),
    "b": ("V1 full", "dense feature", "all"),
    "c": ("V1 full", "global feature", "1 vector"),
    "d": ("V1 masked", "dense pixels", "masked only"),
    "e": ("V1 masked", "dense feature", "all"),
    "f": ("V1 masked", "global feature", "1 vector"),
    "g": ("V2 full", "dense pixels", "all"),
    "h": ("V2 full", "dense feature", "all"),
    "i": ("V2 full", "global feature", "1 vector"),
    "j": ("V2 masked", "dense pixels", "all"),
    "k": ("V2 masked", "dense feature", "all"),
    "l": ("V2 masked", "global feature", "1 vector"),
}
TARGET_KINDS = {"dense pixels": "pixel", "dense feature": "dense_feature", "global feature": "global_feature"}
LOSS_OF_TARGET = {  # target -> (loss, norm_pix_loss) for every row with that target; None = norm_pix_loss unused
    "pixel": ("l2", True), "dense_feature": ("l2", None), "global_feature": ("info_nce", None)}
# Pairs of rows Tab. 2 compares, by the one factor they differ in, and the config fields that factor may change.
COMPARED = {
    "masked or not": ([("a", "d"), ("b", "e"), ("c", "f"), ("g", "j"), ("h", "k"), ("i", "l")],
                      {"mask_ratio", "mask_pattern", "loss_on_masked"}),
    "same or other view": ([("a", "g"), ("b", "h"), ("c", "i")], {"input_view"}),
}


def row(letter: str) -> str:
    return next(n for n in mim.M3I_PRESET_NAMES if n[4] == letter)


@pytest.mark.parametrize("name", mim.M3I_PRESET_NAMES)
def test_table2_presets_have_the_tables_input_target_and_loss(name):
    inputs, target_kind, positions = TABLE_2[name[4]]
    cfg = mim.PRESETS[name]
    assert cfg.input_view == ("same" if inputs.startswith("V1") else "other")
    assert (cfg.mask_ratio > 0) == inputs.endswith("masked") and cfg.mix_ratio == 0
    if inputs.endswith("masked"):          # intra-view: MAE's 0.75 at random; inter-view: SiameseIM's blocks ~ 0.6
        assert (cfg.mask_ratio, cfg.mask_pattern) == ((0.75, "random") if inputs.startswith("V1") else (0.6, "block"))
    assert cfg.target == TARGET_KINDS[target_kind]
    assert (cfg.loss, cfg.norm_pix_loss if cfg.target == "pixel" else None) == LOSS_OF_TARGET[cfg.target]
    assert cfg.loss_on_masked == (positions == "masked only")
    # the target itself, against an independent formula for each kind (V1 = the target view)
    torch.manual_seed(0)
    model = build(name)
    view = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        got = model.targets(view)
        if cfg.target == "pixel":                                         # (B, N, 768) per-unit normalised pixels
            units = view.reshape(2, 3, 2, 16, 2, 16).permute(0, 2, 4, 3, 5, 1).reshape(2, 4, 768)
            expected = (units - units.mean(-1, keepdim=True)) / (units.var(-1, keepdim=True) + 1e-6) ** 0.5
        else:
            feats = model.teacher.forward_features(view)[-1]             # (B, N, C) EMA encoder, full V1
            expected = torch.nn.functional.layer_norm(feats, feats.shape[-1:]) if cfg.target == "dense_feature" \
                else feats.mean(dim=1)                                    # LN target / GAP (Fig. 1)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("factor", COMPARED)
def test_table2_rows_compared_in_the_paper_differ_in_that_factor_only(factor):
    pairs, allowed = COMPARED[factor]
    for a, b in pairs:
        cfg_a, cfg_b = (asdict(mim.PRESETS[row(x)]) for x in (a, b))
        differ = {k for k in cfg_a if cfg_a[k] != cfg_b[k]}
        assert differ and differ <= allowed, (a, b, differ)              # never the loss, target or decoder


@pytest.mark.parametrize("name", mim.M3I_PRESET_NAMES)
def test_each_table2_row_encodes_its_input_view_and_predicts_the_target_views_units(name):
    """Rows a-f encode the one view they are given (the target view); rows g-l encode view 1 (the input view, never
    the target view 0), and their decoder queries sit at view_coords(geometry). Targets always come from view 0:
    the loss equals L2 between the (stand-in) decoder's output and the target of view 0, over all units."""
    torch.manual_seed(0)
    model = build(name)
    encoded, features = [], model.encoder.forward_features
    model.encoder.forward_features = lambda x, **kw: encoded.append(x) or features(x, **kw)
    if model.cfg.target == "global_feature":
        taught, teacher_features = [], model.teacher.forward_features
        model.teacher.forward_features = lambda x, **kw: taught.append(x) or teacher_features(x, **kw)
    else:
        model.decoder = RecordingDecoder(out_dim=768 if model.cfg.target == "pixel" else 64)
    imgs, geometry = torch.randn(4, 2, 3, 32, 32), random_geometry(4)
    if model.num_views == 2:
        out, expected_input = model(imgs, geometry=geometry), imgs[:, 1]
    else:
        out, expected_input = model(imgs[:, 0]), imgs[:, 0]
    assert len(encoded) == 1 and torch.equal(encoded[0], expected_input)
    if model.cfg.target == "global_feature":                              # InfoNCE, tau 0.2, by hand
        assert len(taught) == 1 and torch.equal(taught[0], imgs[:, 0])
        with torch.no_grad():
            keys = teacher_features(imgs[:, 0])[-1].mean(dim=1)           # (B, C) GAP of the EMA features
        q, k = (v / v.norm(dim=-1, keepdim=True) for v in (out["pred"], keys))   # out["pred"]: pooled (B, C)
        logits = q @ k.t() / 0.2                                          # (B, B): the batch is the candidates
        expected = (logits.logsumexp(dim=1) - logits.diagonal()).mean()
        assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
        return
    (_, _, queries), = model.decoder.calls
    grid = mim.view_coords((2, 2)).expand(4, -1, -1)
    torch.testing.assert_close(queries, mim.view_coords((2, 2), geometry) if model.num_views == 2 else grid)
    with torch.no_grad():
        target = model.targets(imgs[:, 0])                                # table test: the target of a view
    if not model.cfg.loss_on_masked:
        pred = model.decoder.preds[0]
        assert out["loss"].item() == pytest.approx(((pred - target) ** 2).mean().item(), rel=1e-5)


class TargetDecoder(torch.nn.Module):
    """Stands in for a decoder: predicts a given target exactly, plus `noise` on unit `unit` of sample 0."""

    def __init__(self, target, *, unit, noise):
        super().__init__()
        self.target, self.unit, self.noise = target, unit, noise

    def forward(self, *args):
        pred = self.target.clone()
        pred[0, self.unit] += self.noise
        return pred


@pytest.mark.parametrize("name", ["m3i_d_mim_pixel", "m3i_e_mim_feat", "simmim", "fastmim"])
def test_which_units_are_supervised(name, monkeypatch):
    """MAE-style averaging over the masked units only (FastMIM Sec. 4.1: "the masked region"; M3I row d = MAE), or
    over all units (M3I row e). A fixed mask, a stand-in decoder that returns the target computed here, and noise
    2.0 on one unit: a visible unit costs 0 (masked-only) or 2^2 / (B N) (all units), a masked unit 2^2 over the
    batch's masked-unit count (masked-only) or 2^2 / (B N); smooth-L1 (SimMIM preset) charges 1.5 for 2^2."""
    torch.manual_seed(0)
    model = build(name)
    fixed = mim.random_masking(2, 16, 0.75, generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(mim, "mask_units", lambda *a, **k: fixed)
    mask = fixed[2]
    imgs = torch.nn.functional.interpolate(torch.randn(2, 3, 8, 8), size=64, mode="bilinear")
    with torch.no_grad():
        if name == "fastmim":
            target = mim.hog_targets(hog(imgs))                           # HOG oracle: test_hog_matches_naive_reference
        elif name == "m3i_e_mim_feat":
            target = model.targets(imgs)                                  # teacher features (table test)
        else:
            units = imgs.reshape(2, 3, 4, 16, 4, 16).permute(0, 2, 4, 3, 5, 1).reshape(2, 16, 768)
            target = (units - units.mean(-1, keepdim=True)) / (units.var(-1, keepdim=True) + 1e-6) ** 0.5
    masked_only = name != "m3i_e_mim_feat"
    per_unit = 1.5 if name == "simmim" else 4.0                           # smooth-L1 (beta 1) of 2 is 2 - 0.5; L2: 2^2
    count = 24 if masked_only else 32                                     # 2 x 12 masked units, or 2 x 16 units
    visible, masked = int((mask[0] == 0).nonzero()[0, 0]), int((mask[0] == 1).nonzero()[0, 0])
    for unit, counted in ((visible, not masked_only), (masked, True)):
        model.decoder = TargetDecoder(target, unit=unit, noise=2.0)
        expected = per_unit / count if counted else 0.0
        assert model(imgs)["loss"].item() == pytest.approx(expected, rel=1e-5, abs=1e-7), unit


def test_presets_and_methods_agree():
    assert len(mim.M3I_PRESET_NAMES) == 12 and set(mim.METHODS) == set(mim.PRESETS)
    masked = {n for n in mim.M3I_PRESET_NAMES if mim.PRESETS[n].mask_ratio > 0}
    assert {n[4] for n in masked} == set("defjkl")                        # Tab. 2: rows d-f and j-l mask the input
    other = {n[4] for n in mim.M3I_PRESET_NAMES if mim.PRESETS[n].input_view == "other"}
    assert other == set("ghijkl")
