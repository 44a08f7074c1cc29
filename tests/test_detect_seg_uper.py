"""Oracles for the segmentation part of detect_seg.py: UPerHead, simple feature pyramid, loss, inference, schedule.

The independent formulations below are written from the papers' and mmseg's / detectron2's descriptions with plain
tensor ops (hand-written adaptive pooling, bilinear resampling, batch/layer norm), sharing only the weights.
"""
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import detect_seg as ds

TINY = ds.UPER_PRESETS["tiny"]
WIDTHS = [12, 20, 36, 36]          # unequal, like iTPN's "seg" levels F + C/4, F + C/2, F + C, F + C
STRIDES = (4, 8, 16, 32)


def random_levels(*, batch=2, height=64, width=64, widths=WIDTHS, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(batch, c, height // s, width // s, generator=g).to(dtype)
            for k, c, s in zip(ds.SEG_LEVELS, widths, STRIDES)}


# ---- independent formulations -------------------------------------------------------------------------------------

def interp_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in) weights of 1-D linear resampling with half-pixel centres (align_corners=False)."""
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    for o in range(n_out):
        src = max((o + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = min(int(np.floor(src)), n_in - 1)
        i1 = min(i0 + 1, n_in - 1)
        lam = src - i0
        m[o, i0] += 1 - lam
        m[o, i1] += lam
    return m


def bilinear(x, size):
    """Separable bilinear resize: rows then columns, each a matrix product."""
    mh, mw = interp_matrix(x.shape[-2], size[0]).to(x.dtype), interp_matrix(x.shape[-1], size[1]).to(x.dtype)
    return mh @ x @ mw.T


def adaptive_avg(x, s):
    """PSPNet bins: bin i of s covers rows floor(i h / s) .. ceil((i + 1) h / s) (and the same for columns)."""
    h, w = x.shape[-2:]
    out = x.new_zeros(*x.shape[:2], s, s)
    for i in range(s):
        for j in range(s):
            r0, r1 = (i * h) // s, -((-(i + 1) * h) // s)
            c0, c1 = (j * w) // s, -((-(j + 1) * w) // s)
            out[:, :, i, j] = x[:, :, r0:r1, c0:c1].mean(dim=(2, 3))
    return out


def batch_norm(y, sd, prefix, *, train):
    if train:
        mean, var = y.mean(dim=(0, 2, 3)), y.var(dim=(0, 2, 3), unbiased=False)
    else:
        mean, var = sd[prefix + "running_mean"], sd[prefix + "running_var"]
    inv = (var + 1e-5).rsqrt() * sd[prefix + "weight"]
    return (y - mean[:, None, None]) * inv[:, None, None] + sd[prefix + "bias"][:, None, None]


def conv_bn_relu(x, sd, prefix, *, train):
    w = sd[prefix + "conv.weight"]
    y = F.conv2d(x, w, padding=w.shape[-1] // 2)
    return batch_norm(y, sd, prefix + "norm.", train=train).clamp_min(0)


def uper_oracle(sd, levels, *, scales, train):
    """UPerNet as mmseg's UPerHead describes it: PPM on the coarsest level, bilinear top-down, fpn 3x3 convs on all
    but the PPM level, upsample everything to stride 4, concatenate, 3x3 fuse, 1x1 classifier; aux FCN on stride 16."""
    x4, x8, x16, x32 = levels
    size32 = x32.shape[-2:]
    branches = [bilinear(conv_bn_relu(adaptive_avg(x32, s), sd, f"ppm.branches.{k}.", train=train), size32)
                for k, s in enumerate(scales)]
    lats = [conv_bn_relu(x, sd, f"laterals.{i}.", train=train) for i, x in enumerate((x4, x8, x16))]
    lats.append(conv_bn_relu(torch.cat([x32, *branches], 1), sd, "ppm.bottleneck.", train=train))
    lats[2] = lats[2] + bilinear(lats[3], lats[2].shape[-2:])
    lats[1] = lats[1] + bilinear(lats[2], lats[1].shape[-2:])
    lats[0] = lats[0] + bilinear(lats[1], lats[0].shape[-2:])
    feats = [conv_bn_relu(lats[i], sd, f"fpn_convs.{i}.", train=train) for i in range(3)] + [lats[3]]
    feats = [bilinear(f, x4.shape[-2:]) for f in feats]
    fused = conv_bn_relu(torch.cat(feats, 1), sd, "fuse.", train=train)
    logits = F.conv2d(fused, sd["classifier.weight"], sd["classifier.bias"])
    aux = conv_bn_relu(x16, sd, "aux_head.conv.", train=train)
    aux = F.conv2d(aux, sd["aux_head.classifier.weight"], sd["aux_head.classifier.bias"])
    return logits, aux


def randomise_norms(module, seed=1):
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.GroupNorm, torch.nn.LayerNorm)):
            m.weight.data = (torch.rand(m.weight.shape, generator=g) + 0.5).to(m.weight.dtype)
            m.bias.data = (torch.randn(m.bias.shape, generator=g) * 0.2).to(m.bias.dtype)
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean = (torch.randn(m.running_mean.shape, generator=g) * 0.2).to(m.running_mean.dtype)
            m.running_var = (torch.rand(m.running_var.shape, generator=g) + 0.5).to(m.running_var.dtype)


# ---- 1. config ----------------------------------------------------------------------------------------------------

def test_paper_preset_is_itpn_ade20k_setting():
    # official `upernet_itpn_base_*_ade20k` on mmseg's `upernet_beit`: decode channels 768, PPM (1, 2, 3, 6),
    # dropout 0.1, FCN aux 256 channels at weight 0.4, slide test 512 / 341, ignore 255; ViTDet pyramid width 256.
    p = ds.UPER_PRESETS["paper"]
    assert (p.channels, p.pool_scales, p.dropout, p.norm) == (768, (1, 2, 3, 6), 0.1, "bn")
    assert (p.aux_channels, p.aux_weight, p.ignore_index) == (256, 0.4, 255)
    assert (p.crop_size, p.crop_stride, p.fpn_dim) == (512, 341, 256)
    with pytest.raises(ValueError, match="norm"):
        ds.UPerConfig(norm="syncbn")
    with pytest.raises(ValueError, match="crop_stride"):
        ds.UPerConfig(crop_size=64, crop_stride=65)


# ---- 2. simple feature pyramid ------------------------------------------------------------------------------------

@pytest.mark.parametrize("grid", [(4, 4), (3, 5), (2, 6), (5, 2)])
def test_simple_pyramid_strides_and_gradients(grid):
    torch.manual_seed(0)
    hp, wp = grid
    sfp = ds.SimpleFeaturePyramid(32, out_dim=16, with_p64=True)
    maps = sfp(torch.randn(2, hp * wp, 32), grid_hw=grid)
    expect = {"p4": (4 * hp, 4 * wp), "p8": (2 * hp, 2 * wp), "p16": (hp, wp), "p32": (hp // 2, wp // 2),
              "p64": (-(-(hp // 2) // 2), -(-(wp // 2) // 2))}     # kernel-1 stride-2 pooling keeps ceil(n / 2)
    assert {k: tuple(v.shape) for k, v in maps.items()} == {k: (2, 16, *s) for k, s in expect.items()}
    assert all(torch.isfinite(v).all() for v in maps.values())
    assert torch.equal(maps["p64"], maps["p32"][:, :, ::2, ::2])         # ViTDet's top block: plain sub-sampling
    sum(v.square().mean() for v in maps.values()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in sfp.parameters())


def test_simple_pyramid_token_layout_is_row_major():
    """Tokens (B, N, C) equal the map whose pixel (r, c) is token r * Wp + c (a ViT's flatten(2).transpose(1, 2))."""
    torch.manual_seed(0)
    hp, wp, c = 3, 5, 16
    sfp = ds.SimpleFeaturePyramid(c, out_dim=8)
    tokens = torch.randn(2, hp * wp, c)
    grid_map = torch.zeros(2, c, hp, wp)
    for r in range(hp):
        for col in range(wp):
            grid_map[:, :, r, col] = tokens[:, r * wp + col]
    by_tokens, by_map = sfp(tokens, grid_hw=(hp, wp)), sfp(grid_map)
    assert all(torch.equal(by_tokens[k], by_map[k]) for k in by_map)


def test_simple_pyramid_matches_plain_ops():
    """detectron2's SimpleFeaturePyramid written out: deconvs, channel LN (mean/var over C per pixel), GELU,
    max-pool, then 1x1 conv + LN + 3x3 conv + LN per level."""
    torch.manual_seed(0)
    c, f = 16, 8
    sfp = ds.SimpleFeaturePyramid(c, out_dim=f).double()
    randomise_norms(sfp)
    sd = sfp.state_dict()
    x = torch.randn(2, c, 3, 4, dtype=torch.float64)

    def ln(y, p):
        mu = y.mean(1, keepdim=True)
        var = (y - mu).square().mean(1, keepdim=True)
        return (y - mu) / (var + 1e-6).sqrt() * sd[p + "weight"][:, None, None] + sd[p + "bias"][:, None, None]

    def deconv(y, p):
        return F.conv_transpose2d(y, sd[p + "weight"], sd[p + "bias"], stride=2)

    def level(y, k):
        p = f"outputs.{k}."
        y = ln(F.conv2d(y, sd[p + "reduce.weight"]), p + "norm1.norm.")
        return ln(F.conv2d(y, sd[p + "conv.weight"], padding=1), p + "norm2.norm.")

    up4 = deconv(F.gelu(ln(deconv(x, "up4.0."), "up4.1.norm.")), "up4.3.")
    expect = {"p4": level(up4, "p4"), "p8": level(deconv(x, "up8."), "p8"), "p16": level(x, "p16"),
              "p32": level(F.max_pool2d(x, 2), "p32")}
    got = sfp(x)
    for k in expect:
        torch.testing.assert_close(got[k], expect[k], rtol=0, atol=1e-10)


def test_simple_pyramid_bad_input():
    sfp = ds.SimpleFeaturePyramid(16, out_dim=8)
    with pytest.raises(ValueError, match="grid_hw"):
        sfp(torch.randn(1, 12, 16))
    with pytest.raises(ValueError, match="CLS"):
        sfp(torch.randn(1, 13, 16), grid_hw=(3, 4))
    with pytest.raises(ValueError, match="channels"):
        sfp(torch.randn(1, 8, 3, 4))
    with pytest.raises(ValueError, match="divisible by 4"):
        ds.SimpleFeaturePyramid(18)


# ---- 3. UPerHead --------------------------------------------------------------------------------------------------

def test_uperhead_shapes_finite_and_gradient_for_every_parameter():
    torch.manual_seed(0)
    head = ds.UPerHead(WIDTHS, num_classes=5, cfg=TINY)
    maps = random_levels(width=96)                                        # non-square: 64 x 96
    maps["p64"] = torch.randn(2, 7, 1, 2)                                # extra levels are ignored
    out = head(maps)
    assert out["logits"].shape == (2, 5, 16, 24) and out["aux_logits"].shape == (2, 5, 4, 6)
    assert all(torch.isfinite(v).all() for v in out.values())
    ds.seg_loss(out, torch.randint(0, 5, (2, 64, 96)))["loss"].backward()
    no_grad = [n for n, p in head.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad
    head.eval()
    assert list(head(maps)) == ["logits"]                                 # the aux head is training-only


@pytest.mark.parametrize("train", [False, True])
def test_uperhead_matches_independent_forward(train):
    torch.manual_seed(0)
    cfg = replace(TINY, dropout=0.0)                                      # dropout is random: off for the oracle
    head = ds.UPerHead(WIDTHS, num_classes=4, cfg=cfg).double()
    randomise_norms(head)
    head.train(train)
    levels = random_levels(height=64, width=96, dtype=torch.float64)      # p32 is 2 x 3: the 6 x 6 PPM bins overlap
    out = head(levels)
    logits, aux = uper_oracle(head.state_dict(), [levels[k] for k in ds.SEG_LEVELS], scales=cfg.pool_scales,
                              train=train)
    torch.testing.assert_close(out["logits"], logits, rtol=0, atol=1e-10)
    if train:
        torch.testing.assert_close(out["aux_logits"], aux, rtol=0, atol=1e-10)


def test_dropout_before_the_classifiers_only_in_training():
    """Dropout before both classifiers: two training passes differ (main and aux), eval passes are identical."""
    torch.manual_seed(0)
    head = ds.UPerHead(WIDTHS, num_classes=3, cfg=replace(TINY, dropout=0.5))
    maps = random_levels()
    torch.manual_seed(1)
    a = head(maps)
    torch.manual_seed(2)
    b = head(maps)
    assert not torch.allclose(a["logits"], b["logits"]) and not torch.allclose(a["aux_logits"], b["aux_logits"])
    head.eval()
    assert torch.equal(head(maps)["logits"], head(maps)["logits"])


def test_uperhead_initialisation():
    """Classifiers N(0, 0.01) with zero bias (mmseg); convs before a norm Kaiming-normal fan_out, no bias (mmcv)."""
    torch.manual_seed(0)
    head = ds.UPerHead([64] * 4, num_classes=150, cfg=replace(TINY, channels=64, aux_channels=64))
    for cls in (head.classifier, head.aux_head.classifier):
        assert abs(cls.weight.std().item() - 0.01) < 0.001 and not cls.bias.any()
    conv = head.fuse.conv                                                 # 3x3, 4*64 -> 64
    fan_out = conv.weight.shape[0] * 9
    assert conv.bias is None and abs(conv.weight.std().item() / (2 / fan_out) ** 0.5 - 1) < 0.05


def test_batch_of_one_with_batchnorm_is_a_clear_error_and_groupnorm_trains():
    """The PPM's 1x1 branch has one value per channel for one image, which BatchNorm cannot normalise."""
    torch.manual_seed(0)
    maps = random_levels(batch=1)
    bn_head = ds.UPerHead(WIDTHS, num_classes=3, cfg=TINY)
    with pytest.raises(ValueError, match="norm='gn'"):
        bn_head(maps)
    bn_head.eval()
    assert bn_head(maps)["logits"].shape == (1, 3, 16, 16)               # inference on one image is fine
    gn_head = ds.UPerHead(WIDTHS, num_classes=3, cfg=replace(TINY, norm="gn"))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in gn_head.modules())
    out = gn_head(maps)
    ds.seg_loss(out, torch.randint(0, 3, (1, 64, 64)))["loss"].backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in gn_head.parameters())


def test_groupnorm_keeps_information_on_a_1x1_map():
    """A group of one channel normalises a 1x1 map to 0; GroupNorm groups here hold >= 4 channels, so the PPM's
    scale-1 branch still depends on its input."""
    torch.manual_seed(0)
    gn_head = ds.UPerHead(WIDTHS, num_classes=3, cfg=replace(TINY, norm="gn")).eval()
    branch = gn_head.ppm.branches[0]                                      # scale 1: input (B, c3, 1, 1)
    a, b = branch(torch.randn(1, WIDTHS[3], 1, 1)), branch(torch.randn(1, WIDTHS[3], 1, 1))
    assert (a - b).abs().max() > 1e-3


def test_uperhead_bad_inputs():
    head = ds.UPerHead(WIDTHS, num_classes=3, cfg=TINY)
    maps = random_levels()
    with pytest.raises(ValueError, match="p16"):
        head({k: v for k, v in maps.items() if k != "p16"})
    with pytest.raises(ValueError, match="p8"):
        head({**maps, "p8": torch.randn(2, 21, 8, 8)})
    with pytest.raises(ValueError, match="4 level widths"):
        ds.UPerHead(WIDTHS[:3], num_classes=3, cfg=TINY)


def test_uperhead_overfits_one_batch():
    """Fixed random 4-level features -> a synthetic label map (8-px aligned blocks, a 255 band), 40 AdamW steps."""
    torch.manual_seed(0)
    maps = random_levels()
    yy, xx = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    labels = ((yy // 16 + xx // 24) % 3).expand(2, 64, 64).clone()
    labels[1] = (labels[1] + 1) % 3
    labels[:, :4] = 255
    head = ds.UPerHead(WIDTHS, num_classes=3, cfg=TINY)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-2)
    first = None
    for _ in range(40):
        loss = ds.seg_loss(head(maps), labels)["loss"]
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    head.eval()
    pred = ds.predict_whole(lambda x: head(maps)["logits"], torch.zeros(2, 3, 64, 64)).argmax(1)
    valid = labels != 255
    assert loss.item() < 0.5 * first
    assert (pred[valid] == labels[valid]).float().mean() > 0.95


# ---- 4. loss ------------------------------------------------------------------------------------------------------

def hand_ce_sum(logits, labels, ignore):
    """Sum over labelled pixels of log(sum_k exp z_k) - z_label, in float64, pixel by pixel."""
    z = logits.double().permute(0, 2, 3, 1).reshape(-1, logits.shape[1])
    y = labels.reshape(-1)
    total = 0.0
    for zi, yi in zip(z, y.tolist()):
        if yi != ignore:
            total += (zi.exp().sum().log() - zi[yi]).item()
    return total


def test_seg_loss_divides_by_all_pixels_and_ignores_255():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 8, 8, generator=g)
    labels = torch.randint(0, 4, (2, 8, 8), generator=g)
    labels[:, :, :4] = 255                                                # exactly 50 % ignored
    out = ds.seg_loss({"logits": logits}, labels)
    assert out["loss"].item() == pytest.approx(hand_ce_sum(logits, labels, 255) / labels.numel(), rel=1e-5)
    # mmseg's reduction is exactly half of PyTorch's mean over labelled pixels here
    torch_mean = F.cross_entropy(logits, labels, ignore_index=255)
    assert out["loss"].item() == pytest.approx(0.5 * torch_mean.item(), rel=1e-5)
    all_ignored = ds.seg_loss({"logits": logits}, torch.full_like(labels, 255))["loss"]
    assert all_ignored.item() == 0.0                                      # finite, where PyTorch's mean is NaN


def test_seg_loss_upsamples_bilinearly_and_weights_aux():
    g = torch.Generator().manual_seed(0)
    logits, aux = torch.randn(2, 3, 4, 6, generator=g), torch.randn(2, 3, 2, 3, generator=g)
    labels = torch.randint(0, 3, (2, 16, 24), generator=g)
    labels[0, :5] = 255
    out = ds.seg_loss({"logits": logits, "aux_logits": aux}, labels, aux_weight=0.4)
    main = hand_ce_sum(bilinear(logits.double(), (16, 24)), labels, 255) / labels.numel()
    side = hand_ce_sum(bilinear(aux.double(), (16, 24)), labels, 255) / labels.numel()
    assert out["loss_seg"].item() == pytest.approx(main, rel=1e-5)
    assert out["loss_aux"].item() == pytest.approx(side, rel=1e-5)
    assert out["loss"].item() == pytest.approx(main + 0.4 * side, rel=1e-5)


def test_seg_loss_bad_labels():
    logits = torch.randn(1, 3, 4, 4)
    with pytest.raises(ValueError, match="reduce_zero_label"):
        ds.seg_loss({"logits": logits}, torch.full((1, 16, 16), -1))     # 0 - 1 without the 0 -> 255 step
    with pytest.raises(ValueError, match="reduce_zero_label"):
        ds.seg_loss({"logits": logits}, torch.full((1, 16, 16), 3))
    with pytest.raises(ValueError, match="class map"):
        ds.seg_loss({"logits": logits}, torch.zeros(1, 16, 16))          # float labels


# ---- 5. inference -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("h, w, crop, stride", [(512, 683, 512, 341), (683, 2048, 512, 341), (100, 37, 32, 21),
                                                (20, 50, 64, 43), (64, 64, 64, 64), (65, 130, 64, 64)])
def test_slide_windows_cover_every_pixel(h, w, crop, stride):
    windows = ds.slide_windows(h, w, crop_size=crop, crop_stride=stride)
    count = np.zeros((h, w), dtype=int)
    for y1, y2, x1, x2 in windows:
        assert 0 <= y1 < y2 <= h and 0 <= x1 < x2 <= w
        assert (y2 - y1, x2 - x1) == (min(crop, h), min(crop, w))     # full windows (or the whole side)
        count[y1:y2, x1:x2] += 1
    assert count.min() >= 1

    def fewest(size):                                                  # brute force: fewest windows of that stride
        n = 1
        while (n - 1) * stride + crop < size:
            n += 1
        return n
    ys, xs = sorted({wdw[0] for wdw in windows}), sorted({wdw[2] for wdw in windows})
    assert len(windows) == fewest(h) * fewest(w) == len(ys) * len(xs)
    for starts, size in ((ys, h), (xs, w)):
        assert starts[0] == 0 and starts[-1] == max(size - crop, 0)    # last window snapped to the border
        assert all(b - a == stride for a, b in zip(starts[:-2], starts[1:-1]))


def tiny_segmenter(seed=0):
    """A stride-4 "model": 4x4 patchify conv, ReLU, 3x3 conv to 5 classes (not translation-equivariant at 1 px)."""
    g = torch.Generator().manual_seed(seed)
    w1, w2 = torch.randn(8, 3, 4, 4, generator=g) * 0.3, torch.randn(5, 8, 3, 3, generator=g) * 0.3
    return lambda x: F.conv2d(F.conv2d(x, w1, stride=4).relu(), w2, padding=1)


def test_slide_equals_whole_when_one_window_covers_the_image():
    images = torch.randn(2, 3, 40, 56)                                    # not a multiple of 32: padded and cropped
    fn = tiny_segmenter()
    whole = ds.predict_whole(fn, images, out_size=(50, 70))
    slide = ds.predict_slide(fn, images, crop_size=64, crop_stride=43, out_size=(50, 70))
    assert whole.shape == (2, 5, 50, 70) and torch.equal(whole, slide)


def test_slide_equals_whole_for_a_pointwise_model_with_overlapping_windows():
    """A 1x1 conv at full resolution is translation-equivariant, so averaging overlapping windows changes nothing;
    a wrong count normalisation or a misplaced window would."""
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(5, 3, 1, 1, generator=g, dtype=torch.float64)
    fn = lambda x: F.conv2d(x, weight)                                   # noqa: E731
    images = torch.randn(2, 3, 40, 57, generator=g, dtype=torch.float64)
    whole = ds.predict_whole(fn, images)
    slide = ds.predict_slide(fn, images, crop_size=24, crop_stride=16)    # 3 x 4 windows, overlapping
    torch.testing.assert_close(slide, whole, rtol=0, atol=1e-12)
    torch.testing.assert_close(ds.predict_slide(fn, images, crop_size=24, crop_stride=16, out_size=(20, 30)),
                               bilinear(whole, (20, 30)), rtol=0, atol=1e-12)


def test_predict_rejects_a_bad_logits_fn():
    with pytest.raises(ValueError, match="logits_fn"):
        ds.predict_whole(lambda x: x.mean(1), torch.randn(1, 3, 32, 32))


def test_end_to_end_tokens_pyramid_uperhead_inference():
    """A patchify "ViT" (B, N, C) -> simple pyramid -> UPerHead -> whole and slide inference at the requested size."""
    torch.manual_seed(0)
    patch = torch.nn.Conv2d(3, 32, kernel_size=16, stride=16)
    sfp = ds.SimpleFeaturePyramid(32, out_dim=TINY.fpn_dim)
    head = ds.UPerHead([TINY.fpn_dim] * 4, num_classes=3, cfg=TINY).eval()

    def logits_fn(x):
        tokens = patch(x).flatten(2).transpose(1, 2)                     # (B, N, C)
        return head(sfp(tokens, grid_hw=(x.shape[2] // 16, x.shape[3] // 16)))["logits"]
    images = torch.randn(2, 3, 80, 100)
    assert ds.predict_whole(logits_fn, images, out_size=(60, 75)).shape == (2, 3, 60, 75)
    assert ds.predict_slide(logits_fn, images, crop_size=64, crop_stride=43).shape == (2, 3, 80, 100)


# ---- 6. schedule --------------------------------------------------------------------------------------------------

def test_poly_lr_warmup_middle_end():
    base, warm, total = 6e-5, 1500, 160_000                              # iTPN / BEiT ADE20K: 160k, warm-up 1500
    kw = dict(lr=base, warmup_steps=warm, total_steps=total)
    assert ds.poly_lr(0, **kw) == pytest.approx(base * 1e-6)            # mmcv warmup_ratio 1e-6 at the first step
    # mmcv: the warm-up factor 1 - (1 - t / W)(1 - r) multiplies the poly value at t
    assert ds.poly_lr(750, **kw) == pytest.approx(base * (1 - 750 / total) * (0.5 + 0.5 * 1e-6))
    assert ds.poly_lr(warm, **kw) == pytest.approx(base * (1 - warm / total))
    assert ds.poly_lr(total // 2, **kw) == pytest.approx(base / 2)      # power 1: linear decay
    assert ds.poly_lr(total, **kw) == 0.0 and ds.poly_lr(total + 10, **kw) == 0.0
    lrs = [ds.poly_lr(t, **kw) for t in range(0, total + 1, 250)]
    peak = lrs.index(max(lrs))
    assert peak == warm // 250 and all(np.diff(lrs[:peak + 1]) > 0) and all(np.diff(lrs[peak:]) < 0)
    kw9 = dict(kw, power=0.9, min_lr=1e-6)
    assert ds.poly_lr(total // 2, **kw9) == pytest.approx((base - 1e-6) * 0.5 ** 0.9 + 1e-6)
    assert ds.poly_lr(total, **kw9) == pytest.approx(1e-6)
    with pytest.raises(ValueError, match="warmup_steps"):
        ds.poly_lr(0, lr=base, warmup_steps=10, total_steps=10)


# ---- 7. picture ---------------------------------------------------------------------------------------------------

def test_seg_picture_panels():
    g = torch.Generator().manual_seed(0)
    k = 6
    image = torch.rand(3, 12, 10, generator=g)
    label = torch.randint(0, k, (12, 10), generator=g)
    label[:3] = 255
    pred = torch.randint(0, k, (12, 10), generator=g)
    pic = np.asarray(ds.seg_picture(image, label, pred, num_classes=k)).astype(int)   # (H, 3W, 3)
    assert pic.shape == (12, 30, 3)
    img = (image.permute(1, 2, 0) * 255).round().numpy().astype(int)
    palette = ds.seg_palette(k).numpy().astype(int)
    assert len({tuple(c) for c in palette}) == k and palette.sum(1).min() > 0    # distinct, none black
    assert (pic[:, :10] == img).all()
    for panel, seg in ((pic[:, 10:20], label.numpy()), (pic[:, 20:], pred.numpy())):
        ignored = seg == 255
        assert (panel[ignored] == 0).all()
        blend = 0.5 * img + 0.5 * palette[np.where(ignored, 0, seg)]
        assert np.abs(panel[~ignored] - blend[~ignored]).max() <= 1
    with pytest.raises(ValueError, match="same size"):
        ds.seg_picture(image, label[:5], pred, num_classes=k)
