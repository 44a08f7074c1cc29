"""Oracles for itpn.py: official sizes, pyramid strides, leak-free masking, EMA rule, teachers, official layouts."""
from dataclasses import asdict, replace

import pytest
import torch
import torch.nn.functional as F

import itpn
import mim
from hivit import PRESETS as HIVIT_PRESETS
from hivit import VIT_PRESETS, HiViT, ViTConfig, VisionTransformer, count_params, sincos_pos_embed_2d
from itpn import (
    PRESETS, PRETRAIN_PRESETS, FeaturePyramid, PatchSplit, iTPN, iTPNDistillPretrainer, iTPNPixelPretrainer,
    load_official, load_teacher,
)
from mim import mask_to_map
from conftest import (gmacs, official_dense_forward, official_dense_keys, official_layout,
                      official_random_weights)

TINY = PRESETS["tiny"]
META_COPY = "ignore:for .*copying from a non-meta parameter"   # teacher weights copied into a meta model: a no-op


def layout_tensors(name, *, device="meta"):
    """Official keys with the listed shapes: empty on meta, random on CPU."""
    make = (lambda s, d: torch.empty(s, dtype=d, device="meta")) if device == "meta" else \
        (lambda s, d: torch.randn(s).to(d) if d.is_floating_point else torch.randint(0, 9, s, dtype=d))
    return {k: make(shape, getattr(torch, dtype)) for k, shape, dtype in official_layout(name)["keys"]}


def clip_state_dict(*, width=32, depth=1, patch=16, grid=4, out_dim=24, prefix=""):
    """A random OpenAI-CLIP visual state_dict in the documented layout."""
    c = width
    sd = {"conv1.weight": torch.randn(c, 3, patch, patch) * 0.02, "class_embedding": torch.randn(c),
          "positional_embedding": torch.randn(1 + grid * grid, c) * 0.1, "ln_pre.weight": torch.rand(c) + 0.5,
          "ln_pre.bias": torch.randn(c) * 0.1, "ln_post.weight": torch.rand(c) + 0.5,
          "ln_post.bias": torch.randn(c) * 0.1, "proj": torch.randn(c, out_dim) * c ** -0.5}
    for i in range(depth):
        p = f"transformer.resblocks.{i}."
        for ln in ("ln_1", "ln_2"):
            sd[p + ln + ".weight"], sd[p + ln + ".bias"] = torch.rand(c) + 0.5, torch.randn(c) * 0.1
        sd[p + "attn.in_proj_weight"], sd[p + "attn.in_proj_bias"] = torch.randn(3 * c, c) * 0.1, torch.randn(3 * c)
        sd[p + "attn.out_proj.weight"], sd[p + "attn.out_proj.bias"] = torch.randn(c, c) * 0.1, torch.randn(c)
        sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"] = torch.randn(4 * c, c) * 0.1, torch.randn(4 * c)
        sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"] = torch.randn(c, 4 * c) * 0.1, torch.randn(c)
    return {prefix + k: v for k, v in sd.items()}


@pytest.fixture(scope="module")
def teacher_path(tmp_path_factory):
    """A tiny random project ViT saved as train.py would: {'model': state_dict, 'config': plain dict}."""
    torch.manual_seed(0)
    cfg = ViTConfig(img_size=64, embed_dim=32, depth=1, num_heads=2, num_classes=0)
    path = str(tmp_path_factory.mktemp("teacher") / "vit_teacher.pth")
    torch.save({"model": VisionTransformer(cfg).state_dict(), "config": asdict(cfg)}, path)
    return path


def smooth_batch(b=2, side=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.interpolate(torch.randn(b, 3, 8, 8, generator=g), size=(side, side), mode="bilinear")


def build(method, teacher_path, arch=TINY, **recipe):
    """A pre-trainer as train.py builds it: size preset + the method's recipe preset (tiny decoder) + overrides."""
    torch.manual_seed(0)
    cfg = replace(itpn.tiny_decoder(PRETRAIN_PRESETS[method]), **recipe)
    if issubclass(itpn.METHODS[method], itpn.PyramidDistillation):
        return itpn.METHODS[method](arch, cfg=cfg, teacher_path=teacher_path)
    return itpn.METHODS[method](arch, cfg=cfg)


# ---- sizes: paper / official models ----

@pytest.mark.parametrize("name, params_m, paper_gmacs, layout", [
    ("itpn_b", 78.558, 17.82, "itpn_base_finetune"), ("itpn_l", 288.494, 61.12, "itpn_large_finetune"),
])
def test_parameter_counts_and_gmacs(name, params_m, paper_gmacs, layout):
    with torch.device("meta"):
        model = iTPN(PRESETS[name])
    n = sum(p.numel() for p in model.parameters())
    assert n == official_layout(layout)["n_params"]                     # exact, against the official model
    assert abs(n / 1e6 - params_m) / params_m < 1e-3
    assert abs(gmacs(model) - paper_gmacs) / paper_gmacs < 1e-2           # MACs = FLOPs / 2


@pytest.mark.filterwarnings(META_COPY)
@pytest.mark.parametrize("size", ["base", "large"])
def test_pretrainer_sizes_match_official(size, tmp_path):
    preset = PRESETS["itpn_b" if size == "base" else "itpn_l"]
    teacher_dim = 512 if size == "base" else 768                        # CLIP-B/16 vs CLIP-L/14 (official recipes)
    path = str(tmp_path / "clip.pth")
    torch.save(clip_state_dict(out_dim=teacher_dim), path)
    with torch.device("meta"):
        pixel = iTPNPixelPretrainer(preset, cfg=PRETRAIN_PRESETS["itpn_pixel"])
        distill = iTPNDistillPretrainer(preset, cfg=PRETRAIN_PRESETS["itpn_distill"], teacher_path=path)
    assert sum(p.numel() for p in pixel.parameters()) == official_layout(f"itpn_{size}_pixel_pretrain")["n_params"]
    n = sum(p.numel() for k, p in distill.named_parameters() if not k.startswith("teacher."))
    assert n == official_layout(f"itpn_{size}_clip_pretrain")["n_params"]
    assert count_params(iTPN, replace(PRESETS["itpn_t"], num_classes=1000)) == 19_181_668   # = HiViT-T


def test_itpn_s_is_hivit_s():
    """itpn_s / itpn_t are the HiViT-S / -T sizes (4-4-20, 384-d): the same 37.5M parameters with a 1000 head."""
    assert PRESETS["itpn_s"].num_classes == 1000
    assert count_params(iTPN, PRESETS["itpn_s"]) == 37_526_464
    with torch.device("meta"):
        assert sum(p.numel() for p in HiViT(HIVIT_PRESETS["hivit_s"]).parameters()) == 37_526_464


def test_plain_vit_variant_taps_layers_4_and_7_of_12():
    """Supplementary Sec. 3: strides 4 and 8 come from the outputs of layers 4 and 7 (1-based) of a 12-layer ViT."""
    torch.manual_seed(0)
    model = iTPN(replace(TINY, plain_vit=True, depth=12, num_classes=0)).eval()
    vit, x = model.backbone.vit, torch.randn(1, 3, 32, 32)               # 2 x 2 units
    with torch.no_grad():
        f4, f8 = model.forward_features(x)[:2]
        ref = vit.forward_features(x)                                     # every block's output (B, N, C)
        up4 = [model.backbone.up4(r[:, :, None, None, :]) for r in ref]   # (B, N, 4, 4, C/4) per block
        up8 = [model.backbone.up8(r[:, :, None, None, :]) for r in ref]   # (B, N, 2, 2, C/2) per block
    assert len(ref) == 12
    assert [i for i, u in enumerate(up4) if torch.equal(u, f4)] == [3]  # 0-based index 3 = layer 4
    assert [i for i, u in enumerate(up8) if torch.equal(u, f8)] == [6]  # layer 7


# ---- pyramid ----

def test_pyramid_strides_and_channels():
    torch.manual_seed(0)
    model = iTPN(replace(TINY, num_classes=0)).eval()
    c, f = TINY.embed_dim, TINY.fpn_dim
    x = torch.randn(2, 3, 64, 96)                                         # non-square: 4 x 6 units
    with torch.no_grad():
        det, seg = model.forward_pyramid(x), model.forward_pyramid(x, mode="seg")
    for s in (4, 8, 16, 32, 64):
        assert det[f"p{s}"].shape == (2, f, 64 // s, 96 // s)
    for s, ch in ((4, f + c // 4), (8, f + c // 2), (16, f + c), (32, f + c)):
        assert seg[f"p{s}"].shape == (2, ch, 64 // s, 96 // s)
    torch.testing.assert_close(det["p32"], F.avg_pool2d(det["p16"], 2))  # det: avg-pool, seg: max-pool (official)
    torch.testing.assert_close(seg["p32"], F.max_pool2d(seg["p16"], 2))
    torch.testing.assert_close(seg["p4"][:, :f], det["p4"])              # seg = pyramid level ++ backbone feature
    levels = model.forward_levels(x)
    assert [tuple(p.shape) for p in levels] == [(2, 24, 1, 1, f), (2, 24, 2, 2, f), (2, 24, 4, 4, f)]


def test_patch_split_puts_channel_group_k_at_row_k_div_2_col_k_mod_2():
    torch.manual_seed(0)
    split = PatchSplit(8, out_dim=3)
    x = torch.randn(2, 5, 2, 2, 8)                                        # (B, N, h, w, c)
    y = split(x)                                                          # (B, N, 4, 4, 3)
    z = split.reduction(split.norm(x))                                    # (B, N, 2, 2, 12) before the shuffle
    for i in range(2):
        for j in range(2):
            for k in range(4):
                torch.testing.assert_close(y[:, :, 2 * i + k // 2, 2 * j + k % 2], z[:, :, i, j, 3 * k:3 * k + 3])


def test_pyramid_has_no_spatial_mixing():
    """Eq. 3 with C-MLPs only: a unit's pyramid outputs depend on that unit's backbone features alone."""
    torch.manual_seed(0)
    pyr = FeaturePyramid(16, fpn_dim=8, fpn_depth=2)
    f4, f8, f16 = torch.randn(1, 6, 4, 4, 4), torch.randn(1, 6, 2, 2, 8), torch.randn(1, 6, 16)
    before = pyr(f4, f8, f16)
    f4[:, 2] += 1.0
    f8[:, 2] += 1.0
    f16[:, 2] += 1.0
    for a, b in zip(before, pyr(f4, f8, f16)):
        changed = (a - b).flatten(2).abs().amax(dim=2)[0] > 0             # (N,)
        assert changed.tolist() == [False, False, True, False, False, False]


def official_pyramid_forward(sd, f4, f8, x16, *, fpn_depth):
    """The released pyramid (official `itpn_pixel/models/models_itpn.py`) written out on its own key names."""
    def ln(x, p):
        return F.layer_norm(x, x.shape[-1:], sd[p + ".weight"], sd[p + ".bias"], eps=1e-6)

    def c_mlp(x, p):                                                      # BlockWithRPE(num_heads=0): norm2 + mlp
        h = F.linear(ln(x, p + ".norm2"), sd[p + ".mlp.fc1.weight"], sd[p + ".mlp.fc1.bias"])
        return x + F.linear(F.gelu(h), sd[p + ".mlp.fc2.weight"], sd[p + ".mlp.fc2.bias"])

    def patch_split(x, p):                                                # LN, Linear(c, 4F), group k -> (k//2, k%2)
        y = F.linear(ln(x, p + ".norm"), sd[p + ".reduction.weight"])
        b, n, h, w, _ = y.shape
        y = y.reshape(b, n, h, w, 2, 2, -1).permute(0, 1, 2, 4, 3, 5, 6)
        return y.reshape(b, n, 2 * h, 2 * w, -1)

    x16 = x16[:, :, None, None, :]
    o16 = F.linear(x16, sd["align_dim_16tofpn.weight"], sd["align_dim_16tofpn.bias"])
    o8 = patch_split(x16, "split_16to8") + F.linear(f8, sd["align_dim_16to8.weight"])
    for j in range(fpn_depth):
        o8 = c_mlp(o8, f"block_16to8.{j}")
    o4 = patch_split(o8, "split_8to4") + F.linear(f4, sd["align_dim_8to4.weight"])
    for j in range(fpn_depth):
        o4 = c_mlp(o4, f"block_8to4.{j}")
    return [c_mlp(o, f"fpn_modules.{i}") for i, o in enumerate((o16, o8, o4))]


def test_pyramid_matches_an_independent_official_forward():
    """Random weights under the official names -> the loader's mapping -> our pyramid equals the described one."""
    torch.manual_seed(0)
    cfg = replace(TINY, num_classes=0, fpn_depth=2)
    c, f = cfg.embed_dim, cfg.fpn_dim
    official = {"align_dim_16tofpn.weight": (f, c), "align_dim_16tofpn.bias": (f,),
                "align_dim_16to8.weight": (f, c // 2), "align_dim_8to4.weight": (f, c // 4),
                "split_16to8.norm.weight": (c,), "split_16to8.norm.bias": (c,),
                "split_16to8.reduction.weight": (4 * f, c), "split_8to4.norm.weight": (f,),
                "split_8to4.norm.bias": (f,), "split_8to4.reduction.weight": (4 * f, f)}
    blocks = [f"block_16to8.{j}" for j in range(2)] + [f"block_8to4.{j}" for j in range(2)] + \
        [f"fpn_modules.{i}" for i in range(3)]
    for p in blocks:
        official |= {p + ".norm2.weight": (f,), p + ".norm2.bias": (f,), p + ".mlp.fc1.weight": (4 * f, f),
                     p + ".mlp.fc1.bias": (4 * f,), p + ".mlp.fc2.weight": (f, 4 * f), p + ".mlp.fc2.bias": (f,)}
    official = {k: torch.randn(shape) * 0.2 for k, shape in official.items()}
    model = iTPN(cfg).eval()
    mapped = {itpn.map_itpn_key(k, cfg): v for k, v in official.items()}    # the loader's own key mapping
    assert all(k.startswith("encoder.pyramid.") for k in mapped)
    model.pyramid.load_state_dict({k[len("encoder.pyramid."):]: v for k, v in mapped.items()})   # strict
    f4, f8, x16 = torch.randn(2, 5, 4, 4, c // 4), torch.randn(2, 5, 2, 2, c // 2), torch.randn(2, 5, c)
    with torch.no_grad():
        for a, b in zip(model.pyramid(f4, f8, x16), official_pyramid_forward(official, f4, f8, x16, fpn_depth=2)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_classifier_has_no_pyramid():
    model = iTPN(TINY)
    assert model.pyramid is None and model(torch.randn(1, 3, 64, 64)).shape == (1, TINY.num_classes)
    with pytest.raises(ValueError, match="num_classes=0"):
        model.forward_pyramid(torch.randn(1, 3, 64, 64))


# ---- pre-training: gradients, EMA, masking invariants, leak-freedom, overfitting ----

@pytest.mark.parametrize("method", ["itpn_pixel", "itpn", "itpn_distill"])
def test_every_trainable_parameter_gets_a_gradient(method, teacher_path):
    model = build(method, teacher_path)
    out = model(smooth_batch())
    assert set(out) >= {"loss", "mask", "pred", "logs"} and torch.isfinite(out["loss"])
    assert out["mask"].shape == (2, 16)
    out["loss"].backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert any(n.startswith("encoder.pyramid.") for n, _ in trainable)
    no_grad = [n for n, p in trainable if p.grad is None or not torch.isfinite(p.grad).all()]
    assert no_grad == []
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert all(n.startswith(("teacher.", "decoder_pos_embed")) for n in frozen)
    if method != "itpn_pixel":                                           # teachers: frozen, no gradient, eval
        teacher = [p for n, p in model.named_parameters() if n.startswith("teacher.")]
        assert teacher and all(p.grad is None and not p.requires_grad for p in teacher)
        model.train()
        assert not model.teacher.training


@pytest.mark.parametrize("method", ["itpn_pixel", "itpn_distill"])
def test_plain_vit_variant_trains_every_parameter(method, teacher_path):
    """Supplementary Sec. 3: the same pyramid and heads on a plain ViT (layers up-sampled to strides 4 and 8)."""
    model = build(method, teacher_path, arch=replace(TINY, plain_vit=True))
    model(smooth_batch())["loss"].backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    levels = model.encoder.forward_levels(torch.randn(1, 3, 64, 64))
    assert [tuple(p.shape[2:4]) for p in levels] == [(1, 1), (2, 2), (4, 4)]


@pytest.mark.parametrize("plain_vit", [False, True])
def test_pixel_pretraining_starts_the_ape_from_sincos(plain_vit):
    """Pixel pre-training: the APE starts as MAE's 2-D sin-cos table (HiViT's and the plain ViT's) and stays trainable;
    iTPN.init_pos_embed_sincos is the public way (it goes through hivit's own init_pos_embed_sincos)."""
    expected = sincos_pos_embed_2d(TINY.embed_dim, 4, 4)[None]            # (1, N, C)

    def ape(encoder):
        return encoder.backbone.vit.pos_embed if plain_vit else encoder.backbone.absolute_pos_embed

    model = build("itpn_pixel", None, arch=replace(TINY, plain_vit=plain_vit))
    assert ape(model.encoder).requires_grad
    torch.testing.assert_close(ape(model.encoder).detach(), expected, rtol=0, atol=0)
    encoder = iTPN(replace(TINY, plain_vit=plain_vit, num_classes=0))   # fine-tuning init: random, not sin-cos
    assert not torch.equal(ape(encoder).detach(), expected)
    encoder.init_pos_embed_sincos()
    torch.testing.assert_close(ape(encoder).detach(), expected, rtol=0, atol=0)


def test_plain_vit_classifier_trains_every_parameter():
    """DDP (find_unused_parameters=False) needs a gradient for every parameter: a classifier has no up-samplers."""
    torch.manual_seed(0)
    model = iTPN(replace(TINY, plain_vit=True))                           # num_classes 10: ViT + head only
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    assert model.forward_features(torch.randn(1, 3, 64, 64))[:2] == [None, None]
    backbone = iTPN(replace(TINY, plain_vit=True, num_classes=0))         # the pyramid's up-samplers: official init
    for split in (backbone.backbone.up4, backbone.backbone.up8):
        assert abs(split.reduction.weight.std().item() - 0.02) < 0.004   # trunc-normal(0.02), not PyTorch's default
        assert torch.equal(split.norm.weight, torch.ones_like(split.norm.weight))


def test_ema_update_is_exactly_m_t_plus_one_minus_m_s():
    model = build("itpn", None)
    with torch.no_grad():
        for p in model.encoder.backbone.parameters():                    # student moves away from the teacher
            p.add_(torch.randn_like(p))
    teacher0 = [t.clone() for t in model.teacher.parameters()]
    student = [s.detach().clone() for s in model.encoder.backbone.parameters()]
    m = model.cfg.ema_momentum
    assert m == 0.996
    model.ema_update()
    for t, t0, s in zip(model.teacher.parameters(), teacher0, student):
        assert torch.equal(t, m * t0 + (1 - m) * s)


def test_teacher_targets_at_stages_1_2_equal_full_image_then_select():
    """The EMA teacher sees only the masked units; for the MLP-only stages this is exactly 'full image, then select'."""
    model = build("itpn", None)
    x = smooth_batch()
    ids_masked = torch.rand(2, 16).argsort(dim=1)[:, :12]                 # (B, N_m)
    with torch.no_grad():
        m4, m8 = model.teacher.forward_features(x, ids_keep=ids_masked)[:2]
        a4, a8 = model.teacher.forward_features(x)[:2]
    idx = ids_masked[:, :, None, None, None]
    torch.testing.assert_close(m4, torch.gather(a4, 1, idx.expand(-1, -1, *a4.shape[2:])), rtol=0, atol=1e-6)
    torch.testing.assert_close(m8, torch.gather(a8, 1, idx.expand(-1, -1, *a8.shape[2:])), rtol=0, atol=1e-6)


@pytest.mark.parametrize("mfm_weight", [None, 1.7])
def test_paper_loss_is_mim_plus_lambda_times_each_levels_own_mfm_term(mfm_weight):
    """Eq. 4 recomputed by hand: L_MIM is the pixel recipe's loss (same init, same mask); L_MFM^s is rebuilt unit
    by unit from level V^s alone (a visible unit's own sub-tokens embedded and laid out row-major in the D-vector, a
    masked unit = the level's mask token, + the unit grid's sin-cos, the decoder blocks, then the head on each
    sub-token's channel block), against the teacher's stage-s features of the masked units (encoded alone), layer-
    normed per sub-token, averaged over masked units, sub-tokens and channels; L = L_MIM + lambda * sum_s L_MFM^s."""
    recipe = {} if mfm_weight is None else {"mfm_weight": mfm_weight}
    model, pixel = build("itpn", None, **recipe).eval(), build("itpn_pixel", None, **recipe).eval()   # same init
    lam = 0.3 if mfm_weight is None else mfm_weight
    assert model.cfg.mfm_weight == lam
    x = smooth_batch()
    torch.manual_seed(3)
    out = model(x)
    torch.manual_seed(3)                                                  # same mask
    with torch.no_grad():
        loss_mim = pixel(x)["loss"]
    mask, ids_masked = out["mask"], out["ids_masked"]                     # (B, N), (B, N_m)
    assert torch.equal(mask.gather(1, ids_masked), torch.ones(2, 12))
    visible = torch.stack([(m == 0).nonzero()[:, 0] for m in mask])      # (B, N_vis) in raster order
    d = model.cfg.decoder_dim
    pos = sincos_pos_embed_2d(d, 4, 4)                                    # (N, D), hivit.py
    terms = []
    with torch.no_grad():
        levels = model.encoder.forward_levels(x, ids_keep=visible)       # [p16, p8, p4] of the visible units
        feats = model.teacher.forward_features(x, ids_keep=ids_masked)   # the masked units alone
        stages = (feats[-1][:, :, None, None, :], feats[1], feats[0])     # x^16, x^8, x^4
        for decoder, level, stage in zip(model.mfm_decoders, levels, stages):
            k = level.shape[2]                                            # sub-tokens per unit side
            rows = []
            for b in range(2):
                units = []
                for n in range(16):
                    if mask[b, n] == 0:
                        sub = level[b, (visible[b] == n).nonzero()[0, 0]]  # (k, k, F) this unit's sub-tokens
                        units.append(decoder.embed.proj(decoder.embed.norm(sub)).flatten())   # row-major (D,)
                    else:
                        units.append(decoder.mask_token[0, 0])
                rows.append(torch.stack(units) + pos)                     # (N, D)
            h = torch.stack(rows)                                         # (B, N, D)
            for blk in decoder.blocks:
                h = blk(h)
            h = decoder.norm(h)
            errors = []
            for b in range(2):
                for m, n in enumerate(ids_masked[b].tolist()):
                    for i in range(k):
                        for j in range(k):
                            block = h[b, n, (i * k + j) * d // k ** 2:(i * k + j + 1) * d // k ** 2]
                            pred = F.linear(block, decoder.head.weight, decoder.head.bias)
                            target = F.layer_norm(stage[b, m, i, j], stage.shape[-1:])
                            errors.append(((pred - target) ** 2).mean())
            terms.append(torch.stack(errors).mean())
    logs = out["logs"]
    for s, term in zip((16, 8, 4), terms):
        torch.testing.assert_close(logs[f"loss_mfm_s{s}"], term)
    torch.testing.assert_close(logs["loss_mim"], loss_mim)
    torch.testing.assert_close(out["loss"], loss_mim + lam * sum(terms))


def test_each_mfm_term_reads_only_its_own_pyramid_level():
    """Eq. 4: L_MFM^s = ||x^s - h^{pt,s}(V^s)||. With the levels as leaves, term s has a gradient with respect to
    V^s and none with respect to the other two levels."""
    model = build("itpn", None)
    x = smooth_batch()
    torch.manual_seed(3)
    _, levels, ids_restore, ids_masked = model.forward_mim(x)
    leaves = [level.detach().requires_grad_() for level in levels]       # [p16, p8, p4] (B, N_vis, h, w, F)
    terms = model.mfm_terms(leaves, targets=model.mfm_targets(x, ids_masked), ids_restore=ids_restore,
                            ids_masked=ids_masked, grid_hw=(4, 4))
    for s, term in enumerate(terms):
        grads = torch.autograd.grad(term, leaves, allow_unused=True, retain_graph=True)
        norms = [0.0 if g is None else g.norm().item() for g in grads]
        assert norms[s] > 0 and [n for r, n in enumerate(norms) if r != s] == [0.0, 0.0], (s, norms)


def test_mfm_trains_pyramid_and_backbone_with_weight_lambda():
    """Every encoder gradient is g_MIM + lambda * g_MFM (same init, same mask): read g_MFM off lambda = 0 and 0.3,
    predict lambda = 0.6. g_MFM reaches every pyramid output block and the backbone's three stages."""
    x = smooth_batch()
    grads = {}
    for lam in (0.0, 0.3, 0.6):
        model = build("itpn", None, mfm_weight=lam)
        torch.manual_seed(3)
        model(x)["loss"].backward()
        grads[lam] = {n: p.grad for n, p in model.named_parameters() if n.startswith("encoder.")}
    mfm = {n: (grads[0.3][n] - grads[0.0][n]) / 0.3 for n in grads[0.0]}
    for n, g in mfm.items():
        torch.testing.assert_close(grads[0.6][n], grads[0.0][n] + 0.6 * g, rtol=1e-3,
                                   atol=1e-3 * grads[0.6][n].abs().max().item() + 1e-12)
    for part in ("pyramid.out16.", "pyramid.out8.", "pyramid.out4.", "backbone.stage1.", "backbone.stage2.",
                 "backbone.blocks."):
        assert max(g.abs().max().item() for n, g in mfm.items() if n.startswith("encoder." + part)) > 0, part


@pytest.mark.parametrize("method", ["itpn_pixel", "itpn"])
def test_pixel_loss_is_norm_pix_l2_on_the_masked_units_only(method, monkeypatch):
    """Sec. 3.3 / official: the MIM loss is the squared error to per-unit normalised pixels (unbiased variance,
    eps 1e-6), averaged over the masked units only. A stand-in prediction head returns that target computed here,
    plus noise on one unit: noise on a visible unit costs nothing, 2.0 on a masked unit costs 2^2 / 24 (2 x 12
    masked units)."""
    fixed = mim.random_masking(2, 16, 0.75, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(itpn, "random_masking", lambda *a, **k: fixed)
    ids_keep, _, mask = fixed
    x = smooth_batch()
    units = x.reshape(2, 3, 4, 16, 4, 16).permute(0, 2, 4, 3, 5, 1).reshape(2, 16, 768)   # (B, N, 16*16*3)
    target = (units - units.mean(-1, keepdim=True)) / (units.var(-1, keepdim=True) + 1e-6) ** 0.5

    class Oracle(torch.nn.Module):
        def __init__(self, unit, noise):
            super().__init__()
            self.unit, self.noise = unit, noise

        def forward(self, hidden):                                        # (B, N, D) -> (B, N, P)
            pred = target.clone()
            pred[0, self.unit] += self.noise
            return pred

    model = build(method, None)
    visible_unit, masked_unit = int(ids_keep[0, 0]), int((mask[0] == 1).nonzero()[0, 0])
    for unit, noise, expected in ((visible_unit, 5.0, 0.0), (masked_unit, 2.0, 4.0 / 24)):
        model.decoder_pred = Oracle(unit, noise)
        out = model(x)
        assert torch.equal(out["mask"], mask)
        assert out["logs"]["loss_mim"].item() == pytest.approx(expected, rel=1e-5, abs=1e-7)


def test_ema_teacher_targets_depend_only_on_the_masked_units_pixels():
    """Sec. 3.3: the teacher encodes the masked units alone. Noise on visible units leaves every stage's target
    unchanged (bit for bit); noise on masked units changes them (a teacher fed ids_keep, or the full image,
    fails one of the two)."""
    model = build("itpn", None).eval()
    x = smooth_batch()
    torch.manual_seed(3)
    out = model(x)
    mask = out["mask"]
    assert torch.equal(mask.gather(1, out["ids_masked"]), torch.ones(2, 12))   # the teacher saw masked units only
    runs = {}
    for name, m in (("visible", 1 - mask), ("masked", mask)):
        torch.manual_seed(7)
        xi = perturb_masked_units(x, m)                                   # noise on the units where m == 1
        torch.manual_seed(3)                                              # same mask again
        runs[name] = model(xi)
        assert torch.equal(runs[name]["mask"], mask) and torch.equal(runs[name]["ids_masked"], out["ids_masked"])
    for ref, vis, msk in zip(out["mfm_targets"], runs["visible"]["mfm_targets"], runs["masked"]["mfm_targets"]):
        assert ref.shape[:2] == (2, 12)
        assert torch.equal(vis, ref)
        assert ((msk - ref).flatten(2).abs().amax(dim=2) > 0).all()      # every masked unit's target moved
    assert not torch.equal(runs["visible"]["pred"], out["pred"])          # the noise was real: the student saw it


def test_masked_indices_follow_the_masking_call_not_the_config_ratio(monkeypatch):
    """The teacher's units come from the masking call (ids_shuffle after its kept ones), not from N and mask_ratio:
    a masking that keeps a different count than round(N * (1 - mask_ratio)) still gives exactly its masked units."""
    def keep_half(batch_size, num_units, mask_ratio, **kw):
        return mim.random_masking(batch_size, num_units, 0.5, **kw)       # 8 of 16 kept, cfg says 4
    monkeypatch.setattr(itpn, "random_masking", keep_half)
    model = build("itpn", None)
    torch.manual_seed(3)
    out = model(smooth_batch())
    assert out["mask"].sum(dim=1).tolist() == [8.0, 8.0] and out["ids_masked"].shape == (2, 8)
    assert torch.equal(out["mask"].gather(1, out["ids_masked"]), torch.ones(2, 8))
    assert all(t.shape[:2] == (2, 8) for t in out["mfm_targets"])


def perturb_masked_units(x, mask, unit=16):
    """Add noise to the pixels of the masked units only (mask (B, N), 1 = masked)."""
    hp, wp = x.shape[-2] // unit, x.shape[-1] // unit
    pix = mask_to_map(mask, (hp, wp), unit)[:, None]                      # (B, 1, H, W)
    return x + pix * torch.randn_like(x)


def test_decoder_input_equals_the_official_per_level_mask_token_formulation():
    """Official: every level gets the mask token, is un-shuffled, then the levels are summed. Ours: sum the visible
    levels, fill masked units with 3 * mask_token, un-shuffle once. Same tensor, bit for bit."""
    torch.manual_seed(0)
    recipe = replace(itpn.tiny_decoder(PRETRAIN_PRESETS["itpn_pixel"]), decoder_depth=0)
    model = iTPNPixelPretrainer(TINY, cfg=recipe).eval()                 # decode = norm(input + position)
    levels = [torch.randn(2, 5, s, s, TINY.fpn_dim) for s in (1, 2, 4)] # 5 visible of 16 units
    ids_restore = torch.rand(2, 16).argsort(dim=1)                        # (B, N)
    official = 0
    for embed, level in zip(model.decoder_embed, levels):
        x = torch.cat([embed(level), model.mask_token.expand(2, 11, -1)], dim=1)   # (B, N, D), shuffled order
        official = official + torch.gather(x, 1, ids_restore[:, :, None].expand(-1, -1, x.shape[-1]))
    with torch.no_grad():
        expected = model.decoder_norm(official + model.decoder_pos_embed)
        assert torch.equal(model.decode(levels, ids_restore, (4, 4)), expected)


@pytest.mark.parametrize("method", ["itpn_pixel", "itpn"])
def test_masked_pixels_change_no_prediction_in_the_mim_path(method):
    """Dropping masked units: their pixels reach nothing, not even their own prediction (supplementary Sec. 2)."""
    model = build(method, None).eval()
    x = smooth_batch()
    torch.manual_seed(3)
    out = model(x)
    x2 = perturb_masked_units(x, out["mask"])
    torch.manual_seed(3)                                                  # same mask again
    out2 = model(x2)
    assert out["mask"].sum() > 0 and torch.equal(out["mask"], out2["mask"])
    assert torch.equal(out["pred"], out2["pred"])


def test_mask_alignment_and_leak_in_the_distillation_path(teacher_path):
    """Mask tokens at stage 3: a masked unit's pixels change only that unit, at every pyramid level and in the
    main prediction (its own, via the stage-1/2 laterals, as in the official code), never any other unit or the aux
    head."""
    model = build("itpn_distill", teacher_path).eval()
    x = smooth_batch()
    torch.manual_seed(5)
    mask = model(x)["mask"]
    x2 = perturb_masked_units(x, mask)
    with torch.no_grad():
        feats = [model.encoder.forward_features(xi, mask=mask, mask_token=model.mask_token) for xi in (x, x2)]
        maps = [itpn.pyramid_maps(model.encoder.pyramid, f, (4, 4)) for f in feats]
    for name, scale in (("p4", 4), ("p8", 2), ("p16", 1)):
        changed = (maps[0][name] - maps[1][name]).abs().amax(dim=1) > 0   # (B, 4*scale, 4*scale)
        assert not (changed & (mask_to_map(mask, (4, 4), scale) == 0)).any(), name   # aligned: inside masked units
    assert not ((maps[0]["p16"] - maps[1]["p16"]).abs() > 0).any()      # stage 3 sees mask tokens only
    torch.manual_seed(5)
    main1 = model(x)["pred"]
    torch.manual_seed(5)
    main2 = model(x2)["pred"]
    changed = (main1 - main2).abs().amax(dim=-1) > 0                      # (B, N)
    assert not (changed & (mask == 0)).any() and changed.any()


@pytest.mark.parametrize("method, steps", [("itpn_pixel", 20), ("itpn", 20), ("itpn_distill", 8)])
def test_overfits_one_batch(method, steps, teacher_path):
    model = build(method, teacher_path)
    x = smooth_batch(b=1, side=32)                                       # 2 x 2 units: 1 visible, 3 masked
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        torch.manual_seed(1)                                              # one batch: same images, same mask
        loss = model(x)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        if hasattr(model, "ema_update"):
            model.ema_update()
        losses.append(loss.item())
    assert min(losses[-3:]) < 0.5 * losses[0], losses



def test_official_distillation_loss_is_smooth_l1_over_every_unit(teacher_path):
    """The released CLIP recipe (`itpn_clip/engine_for_pretraining.py`): nn.SmoothL1Loss() (beta 1, mean over every
    element of every unit) between a head's output and the teacher target, recomputed here by hand for the main
    head; the total is main + aux with weight 1."""
    model = build("itpn_distill", teacher_path).eval()
    x = smooth_batch()
    torch.manual_seed(5)
    out = model(x)
    with torch.no_grad():
        target = model.teacher(x)                                         # (B, N, T)
    d = (out["pred"] - target).abs()
    torch.testing.assert_close(out["logs"]["loss_main"], torch.where(d < 1, 0.5 * d ** 2, d - 0.5).mean())
    torch.testing.assert_close(out["loss"], out["logs"]["loss_main"] + out["logs"]["loss_aux"])

def test_cosine_distillation_loss_and_the_aux_tap_at_three_quarters_depth(teacher_path):
    """The "itpn_distill_cosine" preset (Fast-iTPN's loss): each loss is the mean over all B*N units of
    1 - cos(pred, target); the aux head reads the output of block int(0.75 * depth) = 6 (0-based) of 8, then 2
    blocks, norm, head."""
    model = build("itpn_distill_cosine", teacher_path, arch=replace(TINY, depth=8)).eval()
    assert model.cfg.distill_loss == "cosine" and type(model) is iTPNDistillPretrainer
    x = smooth_batch()
    torch.manual_seed(5)
    out = model(x)
    logs = out["logs"]
    torch.testing.assert_close(out["loss"], logs["loss_main"] + logs["loss_aux"])

    def one_minus_cos_mean(p, t):                                         # (B, N, T) each -> scalar
        return (1 - (p * t).sum(-1) / (p.norm(dim=-1) * t.norm(dim=-1))).mean()

    with torch.no_grad():
        target = model.teacher(x)                                         # (B, N, T)
        torch.testing.assert_close(logs["loss_main"], one_minus_cos_mean(out["pred"], target))
        outs = model.encoder.forward_features(x, mask=out["mask"], mask_token=model.mask_token)[2:]   # blocks
        rpe_index = model.encoder.rpe_index((4, 4))
        aux_losses = []
        for tap in (5, 6, 7):
            aux = outs[tap]                                               # (B, N, C)
            for blk in model.aux_blocks:
                aux = blk(aux, rpe_index=rpe_index, grid_hw=(4, 4))
            aux_losses.append(one_minus_cos_mean(model.aux_head(model.aux_norm(aux)), target))
    assert len(outs) == 8
    torch.testing.assert_close(logs["loss_aux"], aux_losses[1])
    assert all(abs(a.item() - logs["loss_aux"].item()) > 1e-6 for a in (aux_losses[0], aux_losses[2]))


# ---- teachers ----

def test_project_teacher_gives_layer_normed_last_layer(teacher_path):
    teacher = load_teacher(teacher_path)
    vit = VisionTransformer(ViTConfig(img_size=64, embed_dim=32, depth=1, num_heads=2, num_classes=0))
    vit.load_state_dict(torch.load(teacher_path, weights_only=True)["model"])
    x = smooth_batch()
    ref = vit.forward_features(x)[-1]                                     # same normalisation as the student
    torch.testing.assert_close(teacher(x), F.layer_norm(ref, (32,), eps=1e-5), rtol=1e-5, atol=1e-5)
    assert teacher.out_dim == 32 and not any(p.requires_grad for p in teacher.parameters())


def test_train_py_checkpoint_teacher_reads_heads_from_args(tmp_path):
    """A train.py checkpoint of MAE on vit_tiny: keys under `encoder.`, heads only known from args['model']."""
    torch.manual_seed(0)
    cfg = replace(VIT_PRESETS["vit_tiny"], num_classes=0)                  # 64-d, 2 heads (64 / 64 would say 1)
    vit = VisionTransformer(cfg).eval()
    sd = {f"encoder.{k}": v for k, v in vit.state_dict().items()} | {"decoder_pred.weight": torch.zeros(3, 3)}
    path = str(tmp_path / "checkpoint-last.pth")
    torch.save({"model": sd, "args": {"model": "vit_tiny", "method": "mae"}, "config": {"mask_ratio": 0.75}}, path)
    x = smooth_batch()
    with torch.no_grad():
        ref = F.layer_norm(vit.forward_features(x)[-1], (64,), eps=1e-5)
    torch.testing.assert_close(load_teacher(path)(x), ref, rtol=1e-5, atol=1e-5)


def test_train_py_checkpoint_teacher_restores_heads_gelu_and_eps_from_config(tmp_path):
    """train.py writes config = {"model": asdict(preset), "method": ...}: the architecture fields are under "model"."""
    torch.manual_seed(0)
    cfg = ViTConfig(img_size=64, embed_dim=64, depth=1, num_heads=4, quick_gelu=True, ln_eps=1e-5, num_classes=0)
    vit = VisionTransformer(cfg).eval()                                   # 4 heads: neither C / 64 nor vit_tiny's 2
    sd = {f"encoder.{k}": v for k, v in vit.state_dict().items()}
    path = str(tmp_path / "checkpoint-last.pth")
    torch.save({"model": sd, "args": {"model": "vit_tiny", "method": "mae"},
                "config": {"model": asdict(cfg), "method": {"mask_ratio": 0.75}}}, path)
    teacher = load_teacher(path)
    assert (teacher.vit.cfg.num_heads, teacher.vit.cfg.quick_gelu, teacher.vit.cfg.ln_eps) == (4, True, 1e-5)
    x = smooth_batch()
    with torch.no_grad():
        ref = F.layer_norm(vit.forward_features(x)[-1], (64,), eps=1e-5)
    torch.testing.assert_close(teacher(x), ref, rtol=1e-5, atol=1e-5)


def test_teacher_files_unwrap_like_official_ones(tmp_path, teacher_path):
    """hivit.unwrap_checkpoint: weights under 'state_dict' (or 'module'), DDP's 'module.' prefix stripped."""
    x = smooth_batch()
    with torch.no_grad():
        ref = load_teacher(teacher_path)(x)
    ckpt = torch.load(teacher_path, weights_only=True)                    # {"model": sd, "config": 2 heads}
    path = str(tmp_path / "ddp.pth")
    torch.save({"state_dict": {f"module.{k}": v for k, v in ckpt["model"].items()}, "config": ckpt["config"]}, path)
    with torch.no_grad():
        torch.testing.assert_close(load_teacher(path)(x), ref, rtol=0, atol=0)
    clip = clip_state_dict(width=32, out_dim=24, prefix="module.visual.")
    torch.save({"state_dict": clip}, path)
    assert load_teacher(path).out_dim == 24


def test_pixel_recon_undoes_norm_pix_with_each_units_statistics():
    """recon (pictures only) = prediction * std + mean of the original unit, in the normalised input space."""
    model = build("itpn_pixel", None)
    x = smooth_batch()
    torch.manual_seed(3)
    out = model(x)
    target = mim.patchify(x)                                              # (B, N, P)
    expected = out["pred"] * (target.var(dim=-1, keepdim=True) + 1e-6) ** 0.5 + target.mean(dim=-1, keepdim=True)
    torch.testing.assert_close(out["recon"], mim.unpatchify(expected.detach(), (4, 4)))
    assert not out["recon"].requires_grad


def clip_reference_forward(sd, x, heads):
    """OpenAI CLIP's visual forward written independently: conv, CLS, pos, ln_pre, resblocks (QuickGELU), ln_post."""
    c = sd["conv1.weight"].shape[0]
    tok = F.conv2d(x, sd["conv1.weight"], stride=sd["conv1.weight"].shape[-1]).flatten(2).transpose(1, 2)
    tok = torch.cat([sd["class_embedding"].expand(x.shape[0], 1, c), tok], dim=1) + sd["positional_embedding"]
    tok = F.layer_norm(tok, (c,), sd["ln_pre.weight"], sd["ln_pre.bias"], eps=1e-5)
    i = 0
    while f"transformer.resblocks.{i}.ln_1.weight" in sd:
        p = f"transformer.resblocks.{i}."
        h = F.layer_norm(tok, (c,), sd[p + "ln_1.weight"], sd[p + "ln_1.bias"], eps=1e-5).transpose(0, 1)
        attn = torch.nn.MultiheadAttention(c, heads)
        attn.load_state_dict({"in_proj_weight": sd[p + "attn.in_proj_weight"],
                              "in_proj_bias": sd[p + "attn.in_proj_bias"],
                              "out_proj.weight": sd[p + "attn.out_proj.weight"],
                              "out_proj.bias": sd[p + "attn.out_proj.bias"]})
        tok = tok + attn(h, h, h, need_weights=False)[0].transpose(0, 1)
        h = F.layer_norm(tok, (c,), sd[p + "ln_2.weight"], sd[p + "ln_2.bias"], eps=1e-5)
        h = F.linear(h, sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"])
        tok = tok + F.linear(h * torch.sigmoid(1.702 * h), sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"])
        i += 1
    out = F.layer_norm(tok[:, 1:], (c,), sd["ln_post.weight"], sd["ln_post.bias"], eps=1e-5)
    return out @ sd["proj"]                                               # (B, N, T)


def test_openai_clip_teacher_matches_an_independent_clip_forward(tmp_path):
    torch.manual_seed(0)
    sd = clip_state_dict(width=64, depth=2, out_dim=24)
    path = str(tmp_path / "clip_visual.pth")
    released = {"visual." + k: (v.half() if k == "proj" else v) for k, v in sd.items()}   # fp16 proj, as released
    torch.save(released | {"token_embedding.weight": torch.zeros(3, 2)}, path)        # text keys are ignored
    teacher = load_teacher(path)
    imgs = smooth_batch()
    clip_input = imgs * teacher.in_scale + teacher.in_shift               # the documented re-normalisation
    raw = imgs * torch.tensor(itpn.IMAGENET_STD)[:, None, None] + torch.tensor(itpn.IMAGENET_MEAN)[:, None, None]
    clip_mean, clip_std = torch.tensor(itpn.CLIP_MEAN)[:, None, None], torch.tensor(itpn.CLIP_STD)[:, None, None]
    torch.testing.assert_close(clip_input, (raw - clip_mean) / clip_std, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        sd["proj"] = sd["proj"].half().float()
        ref = F.layer_norm(clip_reference_forward(sd, clip_input, heads=1), (24,), eps=1e-5)
    torch.testing.assert_close(teacher(imgs), ref, rtol=1e-4, atol=1e-4)


def test_teacher_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="^teacher .*missing.pth' not found: .*nothing is downloaded"):
        load_teacher(str(tmp_path / "missing.pth"))
    sd = clip_state_dict(width=32)
    sd["transformer.resblocks.0.mlp.c_proj.weight"] = torch.zeros(48, 128)   # wrong width in one block
    path = str(tmp_path / "bad.pth")
    torch.save(sd, path)
    with pytest.raises(ValueError, match=r"blocks\.0\.mlp\.fc2\.weight: checkpoint \(48, 128\) vs model \(32, 128\)"):
        load_teacher(path)
    with pytest.raises(ValueError, match="neither an OpenAI-CLIP"):
        torch.save({"foo": torch.zeros(1)}, path)
        load_teacher(path)


# ---- official checkpoint layouts ----

@pytest.mark.filterwarnings(META_COPY)
@pytest.mark.parametrize("layout, kind", [
    ("itpn_base_finetune", "classifier"), ("itpn_base_pixel_pretrain", "pixel"),
    ("itpn_base_clip_pretrain", "distill"),
])
def test_load_official_round_trip(layout, kind, tmp_path):
    """Random tensors of the listed shapes load strictly and land, value for value, in our model."""
    path = str(tmp_path / "clip.pth")
    torch.save(clip_state_dict(out_dim=512), path)
    preset = PRESETS["itpn_b"]
    with torch.device("meta"):
        model = {"classifier": lambda: iTPN(preset),
                 "pixel": lambda: iTPNPixelPretrainer(preset, cfg=PRETRAIN_PRESETS["itpn_pixel"]),
                 "distill": lambda: iTPNDistillPretrainer(preset, cfg=PRETRAIN_PRESETS["itpn_distill"],
                                                          teacher_path=path)}[kind]()
    model = model.to_empty(device="cpu")                                  # skip the (slow) random init
    sd = layout_tensors(layout, device="cpu")
    ignored = load_official(model, {"model": sd})
    assert set(ignored) <= {"relative_position_index"}
    ours = model.state_dict()
    prefix = "backbone." if kind == "classifier" else ""
    for key, value in sd.items():
        if key.endswith("relative_position_index"):
            continue
        new = itpn.map_itpn_key(key, model.cfg if kind == "classifier" else model.encoder.cfg)
        new = prefix + new[len("encoder.backbone."):] if prefix else new
        assert torch.equal(ours[new], value), key


@pytest.mark.filterwarnings(META_COPY)
def test_other_layouts_load_strictly_and_backbone_takes_pretraining_weights(tmp_path):
    """Every other released layout maps key for key with the listed shapes (meta tensors: no memory)."""
    path = str(tmp_path / "clip_l.pth")
    torch.save(clip_state_dict(out_dim=768), path)
    large = PRESETS["itpn_l"]
    with torch.device("meta"):
        models = [(iTPN(large), "itpn_large_finetune"),
                  (iTPN(replace(large, layer_scale=0.1)), "itpn_large_clip_finetune"),
                  (iTPN(replace(PRESETS["itpn_b"], layer_scale=0.1)), "itpn_base_clip_finetune"),
                  (iTPNPixelPretrainer(large, cfg=PRETRAIN_PRESETS["itpn_pixel"]), "itpn_large_pixel_pretrain"),
                  (iTPNDistillPretrainer(large, cfg=PRETRAIN_PRESETS["itpn_distill"], teacher_path=path),
                   "itpn_large_clip_pretrain"),
                  (iTPN(replace(large, num_classes=0, rpe=False)), "itpn_large_pixel_pretrain"),
                  (iTPN(replace(PRESETS["itpn_b"], num_classes=0, fpn_depth=1, rpe=False)), "itpn_base_det_dense")]
    for model, layout in models:
        ignored = load_official(model, layout_tensors(layout))
        assert all(not k.startswith(("blocks.", "align_dim", "split_", "fpn_modules")) for k in ignored)


@pytest.mark.filterwarnings(META_COPY)
def test_load_official_errors_name_keys_and_dims(tmp_path):
    path = str(tmp_path / "clip_l.pth")
    torch.save(clip_state_dict(out_dim=768), path)                        # teacher width 768 vs the base file's 512
    with torch.device("meta"):
        model = iTPNDistillPretrainer(PRESETS["itpn_b"], cfg=PRETRAIN_PRESETS["itpn_distill"], teacher_path=path)
    with pytest.raises(ValueError, match=r"lm_head\.weight: checkpoint \(512, 512\) vs model \(768, 512\)"):
        load_official(model, layout_tensors("itpn_base_clip_pretrain"))
    with torch.device("meta"):
        pixel = iTPNPixelPretrainer(replace(PRESETS["itpn_b"], fpn_depth=1), cfg=PRETRAIN_PRESETS["itpn_pixel"])
    with pytest.raises(KeyError, match=r"unexpected keys \['encoder\.pyramid\.fuse4\.1\.mlp\.fc1\.bias'"):
        load_official(pixel, layout_tensors("itpn_base_pixel_pretrain"))
    with pytest.raises(TypeError, match="no official checkpoint layout"):
        load_official(build("itpn", None), {})


# ---- presets, configs, seams ----

def test_plain_vit_presets_are_vit_backbones_and_pretrain():
    """itpn_vit_b is iTPN on ViT-B/16 (supplementary Sec. 3): its classifier is exactly hivit's ViT-B; the tiny one
    pre-trains on CPU, and its backbone_config gives the ViT that mim.py's methods wrap."""
    assert count_params(iTPN, PRESETS["itpn_vit_b"]) == count_params(VisionTransformer, VIT_PRESETS["vit_b"])
    vit_cfg = itpn.backbone_config(replace(PRESETS["itpn_vit_tiny"], num_classes=0))
    assert isinstance(vit_cfg, ViTConfig) and (vit_cfg.embed_dim, vit_cfg.depth, vit_cfg.patch_size) == (64, 2, 16)
    model = build("itpn_pixel", None, arch=PRESETS["itpn_vit_tiny"])
    assert isinstance(model.encoder.backbone, itpn.PlainViTUnits)
    model(smooth_batch())["loss"].backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    mae = mim.METHODS["mae"](VisionTransformer(vit_cfg), cfg=mim.tiny_decoder(mim.PRESETS["mae"]))
    assert torch.isfinite(mae(smooth_batch())["loss"])
    hivit_cfg = itpn.backbone_config(PRESETS["itpn_b"])
    assert count_params(HiViT, hivit_cfg) == count_params(iTPN, PRESETS["itpn_b"])


def test_no_weight_decay_names_are_parameter_names():
    """finetune.py's optimizer looks these names up: each must name a real parameter (HiViT and plain ViT)."""
    for arch in (TINY, replace(TINY, num_classes=0), PRESETS["itpn_vit_tiny"],
                 replace(PRESETS["itpn_vit_tiny"], num_classes=0)):
        model = iTPN(arch)
        names = model.no_weight_decay()
        assert names and names <= set(dict(model.named_parameters())), names
    assert "backbone.absolute_pos_embed" in iTPN(TINY).no_weight_decay()
    assert iTPN(PRESETS["itpn_vit_tiny"]).no_weight_decay() == {"backbone.vit.pos_embed"}


def test_recipe_presets_and_methods_agree():
    """Every method has a recipe preset and vice versa; the recipe is not part of the architecture config."""
    assert set(itpn.METHODS) == set(PRETRAIN_PRESETS)
    arch_fields = set(vars(TINY))
    assert not arch_fields & set(vars(PRETRAIN_PRESETS["itpn"]))
    assert PRETRAIN_PRESETS["itpn_distill"].distill_loss == "smooth_l1"
    assert PRETRAIN_PRESETS["itpn_distill_cosine"].distill_loss == "cosine"


# ---- reliability: files, configs, inputs; the released det/seg backbones ----

@pytest.mark.parametrize("content, expected", [
    (lambda p: torch.save(torch.ones(3), p), "holds a Tensor, not a checkpoint dict"),
    (lambda p: open(p, "wb").write(b"\x00" * 64), "is not a PyTorch checkpoint or it is truncated"),
    (lambda p: open(p, "w").write("a text file"), "is not a PyTorch checkpoint or it is truncated"),
    (lambda p: torch.save({"model": {"conv1.weight": torch.zeros(8, 3, 16, 16)}}, p), r"lacks \['class_embedding'"),
    (lambda p: torch.save({"patch_embed.weight": torch.zeros(8, 3, 16, 16)}, p), r"lacks \['pos_embed'"),
    (lambda p: torch.save({"args": __import__("argparse").Namespace(model="vit_b")}, p), "pickled Python objects")])
def test_teacher_files_that_are_not_teachers_get_one_message_each(tmp_path, content, expected):
    path = str(tmp_path / "teacher.pth")
    content(path)
    with pytest.raises(ValueError, match=expected):
        load_teacher(path)


def test_a_bare_vit_state_dict_as_teacher_says_its_head_count_is_a_guess(tmp_path, teacher_path):
    vit = VisionTransformer(ViTConfig(img_size=64, embed_dim=128, depth=1, num_heads=4, num_classes=0))
    path = str(tmp_path / "bare.pth")
    torch.save(vit.state_dict(), path)
    with pytest.warns(UserWarning, match=r"records no head count.*assuming 64-d heads, 2 head\(s\) of width 128"):
        assert load_teacher(path).vit.cfg.num_heads == 2
    torch.save({"model": vit.state_dict(), "config": {"num_heads": 4}}, path)
    with __import__("warnings").catch_warnings():
        __import__("warnings").simplefilter("error")                    # recorded: no warning
        assert load_teacher(path).vit.cfg.num_heads == 4


@pytest.mark.parametrize("change, field", [
    (dict(fpn_dim=0), "fpn_dim=0 must be >= 1"), (dict(fpn_depth=-1), "fpn_depth=-1 must be >= 0"),
    (dict(num_heads=3), "num_heads=3 must be >= 1 and divide embed_dim"), (dict(depth=0), "depth=0"),
    (dict(img_size=100), "img_size=100"), (dict(plain_vit=True, ape_size=64), "ape_size=64 must be None")])
def test_itpn_constructor_names_the_bad_field(change, field):
    with pytest.raises(ValueError, match="^invalid iTPNConfig: " + field):
        iTPN(replace(TINY, num_classes=0, **change))


def test_dense_maps_state_their_minimum_input_size():
    model = iTPN(replace(TINY, num_classes=0)).eval()
    with torch.no_grad():
        for mode, side in itpn.DENSE_MIN_SIZE.items():
            maps = model.forward_pyramid(torch.randn(1, 3, side, side + 16), mode=mode)
            coarsest = maps["p64" if mode == "det" else "p32"]
            assert coarsest.shape[-2] == 1 and torch.isfinite(coarsest).all()
            with pytest.raises(ValueError, match=f"mode '{mode}' needs images of at least {side}x{side} px"):
                model.forward_pyramid(torch.randn(1, 3, side - 16, 128), mode=mode)
    assert itpn.DENSE_MIN_SIZE == {"det": 64, "seg": 32}
    with pytest.raises(ValueError, match="mode must be 'det' or 'seg'"):
        model.forward_pyramid(torch.randn(1, 3, 64, 64), mode="cls")


@pytest.mark.parametrize("thing, expected", [
    ("itpn_b.pth", "read the file first"), (None, "got a NoneType"), (torch.ones(2), "got a Tensor")])
def test_load_official_says_what_it_expects(thing, expected):
    for model in (iTPN(TINY), iTPN(replace(TINY, num_classes=0))):      # classifier and backbone paths
        with pytest.raises(ValueError, match=expected):
            load_official(model, thing)


# The released dense layouts: DENSE_PRESETS name -> (listing, forward mode, tiny-width stand-in kwargs).
DENSE = {"itpn_b_det": "itpn_base_det_dense", "itpn_b_clip_det": "itpn_base_clip_det_dense",
         "itpn_b_seg": "itpn_base_seg_dense", "itpn_b_clip_seg": "itpn_base_clip_seg_dense",
         "itpn_l_seg": "itpn_large_seg_dense", "itpn_l_clip_seg": "itpn_large_clip_seg_dense"}


def dense_keys_of(cfg):
    """official_dense_keys for a DENSE_PRESETS-like config (the oracle's own reading of the official constructor)."""
    return official_dense_keys(c=cfg.embed_dim, n1=cfg.mlp_depth1, n2=cfg.mlp_depth2, depth=cfg.depth,
                               heads=cfg.num_heads, fpn_dim=cfg.fpn_dim, fpn_depth=cfg.fpn_depth,
                               layer_scale=cfg.layer_scale, rpe_side=cfg.img_size // 16 if cfg.rpe else None)


@pytest.mark.filterwarnings(META_COPY)
@pytest.mark.parametrize("name", DENSE)
def test_dense_presets_are_the_official_layouts(name):
    """Keys, shapes and parameter counts of every released det/seg backbone: the oracle's key builder reproduces
    the listing, and the listing's tensors load strictly into iTPN(DENSE_PRESETS[name]) (meta: no memory)."""
    layout = official_layout(DENSE[name])
    cfg = itpn.DENSE_PRESETS[name]
    assert {k: tuple(s) for k, s, _ in layout["keys"]} == dense_keys_of(cfg)
    assert count_params(iTPN, cfg) == layout["n_params"]
    assert cfg.ln_eps == 1e-5 and cfg.img_size == layout["config"]["img_size"]
    with torch.device("meta"):
        model = iTPN(cfg)
    assert load_official(model, {"model": layout_tensors(DENSE[name])}) == ["relative_position_index"] * cfg.rpe


def small_dense(name):
    """A narrow stand-in with every trait of the layout that shapes the forward (eps, APE grid vs RPE grid, 512 px
    for segmentation, fpn_depth, layer scale): iTPN-B's segmentation forward at 512 px takes ~5 s on CPU."""
    return replace(itpn.DENSE_PRESETS[name], embed_dim=64, num_heads=2, mlp_depth1=1, mlp_depth2=1, depth=2,
                   fpn_dim=32)


@pytest.mark.parametrize("name, width, side", [
    ("itpn_b_det", "wide", (64, 96)), ("itpn_b_clip_det", "small", (96, 64)),
    ("itpn_b_seg", "small", (512, 512)), ("itpn_b_clip_seg", "small", (512, 512))])
def test_dense_layouts_equal_the_official_forward_exactly(name, width, side):
    """Random weights under the official names -> load_official -> forward_pyramid equals the official forward
    written out in conftest, bit for bit; with our default eps 1e-6 instead of the layout's 1e-5 it does not."""
    preset = itpn.DENSE_PRESETS[name]
    cfg = replace(preset, depth=4) if width == "wide" else small_dense(name)   # "wide": iTPN-B's widths, 4 blocks
    mode = name.rsplit("_", 1)[1]
    sd = official_random_weights(dense_keys_of(cfg))
    x = torch.randn(1, 3, *side, generator=torch.Generator().manual_seed(1))
    with torch.device("meta"):
        model = iTPN(cfg)
    model = model.to_empty(device="cpu").eval()
    load_official(model, {"state_dict": {f"backbone.{k}": v for k, v in sd.items()},   # an mmseg file
                          "meta": {"epoch": 12}} if mode == "seg" else sd)
    with torch.no_grad():
        ref = official_dense_forward(sd, x, n1=cfg.mlp_depth1, n2=cfg.mlp_depth2, heads=cfg.num_heads,
                                     fpn_depth=cfg.fpn_depth, mode=mode, eps=1e-5, rpe=cfg.rpe)
        maps = model.forward_pyramid(x, mode=mode)
        assert maps.keys() == ref.keys() and all(torch.equal(maps[k], ref[k]) for k in ref)
        for norm in (m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)):
            norm.eps = 1e-6                                               # our classifiers' eps: not the layout
        maps = model.forward_pyramid(x, mode=mode)
        assert not any(torch.equal(maps[k], ref[k]) for k in ref)
    if mode == "seg":                                                     # APE 196 positions resized to 32 x 32
        assert sd["absolute_pos_embed"].shape[1] == 196 and model.grid == (32, 32)


def test_mmseg_files_give_the_backbone_keys_and_the_large_clip_det_layout_is_refused():
    cfg = small_dense("itpn_b_seg")
    sd = {f"backbone.{k}": v for k, v in official_random_weights(dense_keys_of(cfg)).items()}
    sd["decode_head.conv_seg.weight"] = torch.zeros(150, 512, 1, 1)
    ignored = load_official(iTPN(cfg), {"state_dict": sd})
    assert sorted(ignored) == ["decode_head.conv_seg.weight", "relative_position_index"]
    with torch.device("meta"):
        model = iTPN(replace(itpn.DENSE_PRESETS["itpn_l_clip_seg"], img_size=224, ape_size=None, fpn_depth=1))
    with pytest.raises(ValueError, match="decomposed relative positions"):
        load_official(model, layout_tensors("itpn_large_clip_det_dense"))
