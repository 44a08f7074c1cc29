"""finetune.py: official layer ids, checkpoint conversion (train.py and official layouts), position-table resizing,
mixing, accuracy, the loop (overfit, weight EMA, gradient clipping, bitwise resume, 2 gloo ranks = 1 process), the
recipes against their sources and every bad input's message.
CPU only, tiny models, 32-px images, a few steps each; the official layouts are read from tests/official_keys."""
import json
import math
import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import fast_itpn
import finetune
import hivit
import itpn
import train
from conftest import official_fast_itpn_logits, official_hivit_logits, official_layout, read_log, subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--input_size", "32", "--num_images", "16", "--num_val_images", "6", "--batch_size", "4", "--num_workers",
        "0", "--epochs", "2", "--warmup_epochs", "1"]


pytestmark = pytest.mark.usefixtures("one_thread")                       # conftest: tiny runs, one thread


def run(tmp_path, *argv, name="out"):
    """finetune.main in this process; returns (records, output dir)."""
    out = str(tmp_path / name)
    return finetune.main([*argv, "--output_dir", out]), out


def error_of(tmp_path, *argv, name="bad"):
    with pytest.raises(SystemExit) as info:
        run(tmp_path, *argv, name=name)
    return str(info.value.code)


# ---- 1. layer-wise lr decay: the official rules, written from their description, on the official key names -------

def official_scales(keys, *, rule, n1, n2, layer_decay):
    """Official lr scale of every official parameter name (flat blocks.{i}: n1 MLP blocks, merge, n2 MLP blocks,
    merge, attention blocks). iTPN / HiViT: ids over the non-merge blocks, a merge takes the id of the block before
    it, the head and fc_norm get L; iTPN rescales the decay to 13 layers. Fast-iTPN: blocks.i -> i + 1, the rest
    len(blocks) + 1, no rescaling."""
    flat = sorted({int(k.split(".")[1]) for k in keys if k.startswith("blocks.")})
    if rule == "fast_itpn":
        top = len(flat) + 1

        def lid(k):
            if k == "pos_embed" or k.startswith("patch_embed"):
                return 0
            return int(k.split(".")[1]) + 1 if k.startswith("blocks.") else top
        return {k: layer_decay ** (top - lid(k)) for k in keys}
    main_blocks = [i for i in flat if i not in (n1, n1 + n2 + 1)]
    top = len(main_blocks) + 1
    decay = layer_decay ** (13 / top) if rule == "itpn" else layer_decay

    def lid(k):
        if k == "absolute_pos_embed" or k.startswith("patch_embed"):
            return 0
        if not k.startswith("blocks."):
            return top
        i = int(k.split(".")[1])
        while i not in main_blocks:                                       # a merge: the block before it
            i -= 1
        return main_blocks.index(i) + 1
    return {k: decay ** (top - lid(k)) for k in keys}


def scales_and_decay(model, family, layer_decay):
    groups = finetune.layer_decay_groups(model, family=family, cfg=model.cfg, weight_decay=0.05,
                                         layer_decay=layer_decay)
    return ({n: g["lr_scale"] for g in groups for n in g["names"]},
            {n for g in groups for n in g["names"] if g["weight_decay"] == 0})


@pytest.mark.parametrize("layout, model_name, rule, layer_decay", [
    ("hivit_base", "hivit_b", "hivit", 0.85), ("itpn_base_finetune", "itpn_b", "itpn", 0.60),
    ("itpn_large_clip_finetune", "itpn_l", "itpn", 0.55), ("fast_itpn_tiny", "fast_itpn_t", "fast_itpn", 0.80),
    ("fast_itpn_base", "fast_itpn_b", "fast_itpn", 0.90)])
def test_layer_ids_follow_the_official_rule_on_the_official_names(layout, model_name, rule, layer_decay):
    info = official_layout(layout)
    family, preset = train.MODELS[model_name]
    params = {k: shape for k, shape, _ in info["keys"] if not k.endswith("relative_position_index")}
    want = official_scales(params, rule=rule, n1=preset.mlp_depth1, n2=preset.mlp_depth2, layer_decay=layer_decay)
    with torch.device("meta"):
        model = finetune.build_classifier(model_name, num_classes=1000, drop_path=0.0, input_size=info["input_size"],
                                          layer_scale="gamma_1" in str(list(params)))
    got, no_decay = scales_and_decay(model, family, layer_decay)
    prefix = "backbone." if family == "itpn" else ""
    ours = {prefix + hivit.map_official_key(k, mlp_depth1=preset.mlp_depth1, mlp_depth2=preset.mlp_depth2): k
            for k in params}
    assert set(ours) == set(got)                                          # every parameter, nothing else
    for name, key in ours.items():
        assert got[name] == pytest.approx(want[key], rel=1e-12), key
    official_no_decay = {k for k, shape in params.items() if len(shape) == 1 or k in ("absolute_pos_embed",
                         "pos_embed") or k.endswith(("relative_position_bias_table", ".bias"))}
    assert {ours_name for ours_name, k in ours.items() if k in official_no_decay} == no_decay
    if rule == "itpn":                                                    # the stem always gets layer_decay^13
        assert got["backbone.patch_embed.proj.weight"] == pytest.approx(layer_decay ** 13)


def test_vit_layer_ids_are_maes():
    with torch.device("meta"):
        model = finetune.build_classifier("vit_b", num_classes=10, drop_path=0.0, input_size=224)
    got, no_decay = scales_and_decay(model, "vit", 0.65)
    assert got["patch_embed.weight"] == got["pos_embed"] == pytest.approx(0.65 ** 13)   # MAE: ViT-B stem 0.65^13
    assert got["blocks.0.mlp.fc1.weight"] == pytest.approx(0.65 ** 12)
    assert got["blocks.11.attn.qkv.weight"] == pytest.approx(0.65)
    assert got["head.weight"] == got["fc_norm.weight"] == 1.0
    assert "pos_embed" in no_decay and "blocks.0.attn.qkv.weight" not in no_decay
    with torch.device("meta"):                                            # iTPN on a plain ViT: the same ids
        plain = finetune.build_classifier("itpn_vit_b", num_classes=10, drop_path=0.0, input_size=224)
    got_plain, _ = scales_and_decay(plain, "itpn", 0.65)
    assert got_plain == {"backbone.vit." + k: v for k, v in got.items()}


# ---- 2. position tables: resized by bicubic convolution (torch's a = -0.75), identity at the same grid -----------

def bicubic_matrix(n_in, n_out, a=-0.75):
    """(n_out, n_in) weights of 1-D cubic convolution with half-pixel centres and replicated borders."""
    def cubic(d):
        d = abs(d)
        if d <= 1:
            return (a + 2) * d ** 3 - (a + 3) * d ** 2 + 1
        return a * d ** 3 - 5 * a * d ** 2 + 8 * a * d - 4 * a if d < 2 else 0.0
    w = np.zeros((n_out, n_in))
    for o in range(n_out):
        src = (o + 0.5) * n_in / n_out - 0.5
        base = math.floor(src)
        for k in range(-1, 3):
            w[o, min(max(base + k, 0), n_in - 1)] += cubic(src - (base + k))
    return w


def test_position_tables_are_resized_by_bicubic_convolution_and_kept_at_the_same_grid():
    g = torch.Generator().manual_seed(0)
    ape = torch.randn(1, 16, 5, generator=g)                              # a 4x4 grid of 5 channels
    got = finetune.resize_pos_table(ape, (6, 7))
    grid = ape[0].reshape(4, 4, 5).double().numpy()
    want = np.einsum("oh,hwc,pw->opc", bicubic_matrix(4, 6), grid, bicubic_matrix(4, 7)).reshape(1, 42, 5)
    np.testing.assert_allclose(got.double().numpy(), want, atol=1e-5)
    bias = torch.randn(49, 3, generator=g)                                # offsets of a 4x4 grid: 7x7, 3 heads
    got = finetune.resize_bias_table(bias, (6, 6))                        # -> 11x11 offsets
    table = bias.reshape(7, 7, 3).double().numpy()
    want = np.einsum("oh,hwc,pw->opc", bicubic_matrix(7, 11), table, bicubic_matrix(7, 11)).reshape(121, 3)
    np.testing.assert_allclose(got.double().numpy(), want, atol=1e-5)
    assert finetune.resize_pos_table(ape, (4, 4)) is ape and finetune.resize_bias_table(bias, (4, 4)) is bias


# ---- 3. train.py checkpoints: the classifier's backbone computes what the pre-trainer's encoder computed ----------

@pytest.fixture(scope="module")
def vit_teacher(tmp_path_factory):
    """A tiny random ViT saved as train.py saves one: the frozen teacher of the distillation methods."""
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("teacher") / "vit_tiny.pth"
    vit = hivit.VisionTransformer(replace(hivit.VIT_PRESETS["vit_tiny"], num_classes=0))
    torch.save({"model": vit.state_dict(), "config": {"num_heads": vit.cfg.num_heads}}, path)
    return str(path)


def pretrain_checkpoint(tmp_path, model, method, *, teacher=None, truncate=0):
    """A pre-trainer built as train.py builds it, with trained-looking (non-init) weights, saved as train.py does."""
    torch.manual_seed(0)
    pretrainer = train.build_pretrainer(model, method, mask_ratio=None, norm_pix_loss=None, teacher=teacher,
                                        truncate=truncate)
    with torch.no_grad():
        for p in pretrainer.parameters():                                 # zero-init tables would hide a bad load
            p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path / f"{model}-{method}.pth"
    torch.save({"model": pretrainer.state_dict(), "args": {"model": model, "method": method, "truncate": truncate},
                "step": 1, "optimizer": {}}, path)
    return pretrainer, str(path)


@pytest.mark.parametrize("model, method, truncate", [
    ("itpn_tiny", "itpn", 0), ("itpn_tiny", "itpn_pixel", 0), ("hivit_tiny", "mae", 0), ("itpn_tiny", "m3i", 0),
    ("vit_tiny", "fastmim", 0), ("fast_itpn_tiny", "simmim", 0), ("hivit_tiny", "mae", 1),
    ("itpn_tiny", "itpn_distill", 0), ("fast_itpn_tiny", "fast_itpn_distill", 0), ("itpn_vit_tiny", "itpn", 0),
    ("itpn_vit_tiny", "mae", 0)])
def test_a_train_checkpoint_gives_the_encoders_features(tmp_path, vit_teacher, model, method, truncate):
    teacher = vit_teacher if method in ("itpn_distill", "fast_itpn_distill") else None   # frozen-teacher methods
    pretrainer, path = pretrain_checkpoint(tmp_path, model, method, teacher=teacher, truncate=truncate)
    pretrained = finetune.read_pretrained(path)
    assert pretrained.kind == ("clip" if teacher else "pixel")
    classifier = finetune.build_classifier(model, num_classes=8, drop_path=0.0, input_size=64,
                                           layer_scale=pretrained.kind == "clip")
    report = finetune.load_pretrained(classifier, pretrained, model_name=model)
    assert not any(k.startswith("teacher.") for k in report["loaded"])   # distillation: no teacher needed
    assert {k for k in pretrained.state if k.startswith("teacher.")} <= set(report["ignored"])
    x = torch.randn(2, 3, 64, 64)
    encoder = pretrainer.encoder.eval()
    classifier.eval()
    with torch.no_grad():
        want = encoder.forward_features(x)[-1]
        feats = classifier.forward_features(x)
        got = feats[len(feats) - 1 - truncate] if truncate else feats[-1]   # the truncated encoder's last block
    assert torch.equal(got, want)
    fresh = set(report["fresh"])
    head = next(p for n, p in classifier.named_parameters() if n.endswith("head.weight"))
    assert any(k.endswith("head.weight") for k in fresh)
    if model != "fast_itpn_tiny":                                         # MAE: a fresh head starts at std 2e-5
        assert 0 < head.abs().max() < 1e-4
    if truncate:                                                          # the removed block starts fresh
        assert {k.split(".")[1] for k in fresh if k.startswith("blocks.")} == {str(hivit.PRESETS["tiny"].depth - 1)}


def test_an_incomplete_backbone_is_refused_naming_what_is_missing(tmp_path):
    pretrainer, path = pretrain_checkpoint(tmp_path, "hivit_tiny", "mae")
    ckpt = torch.load(path, weights_only=True)
    del ckpt["model"]["encoder.stage2.0.mlp.fc1.weight"]
    torch.save(ckpt, path)
    classifier = finetune.build_classifier("hivit_tiny", num_classes=8, drop_path=0.0, input_size=64)
    with pytest.raises(train.ConfigError, match=r"does not fit --model hivit_tiny: missing stage2\.\*\.mlp\.fc1"):
        finetune.load_pretrained(classifier, finetune.read_pretrained(path), model_name="hivit_tiny")


def test_a_checkpoint_at_another_grid_is_resized_when_loaded(tmp_path):
    pretrainer, path = pretrain_checkpoint(tmp_path, "hivit_tiny", "mae")   # tables for 64 px: a 4x4 grid
    classifier = finetune.build_classifier("hivit_tiny", num_classes=8, drop_path=0.0, input_size=96)   # 6x6
    report = finetune.load_pretrained(classifier, finetune.read_pretrained(path), model_name="hivit_tiny")
    encoder, ours = pretrainer.encoder.state_dict(), classifier.state_dict()
    assert torch.equal(ours["absolute_pos_embed"], finetune.resize_pos_table(encoder["absolute_pos_embed"], (6, 6)))
    table = "blocks.1.attn.relative_position_bias_table"
    assert torch.equal(ours[table], finetune.resize_bias_table(encoder[table], (6, 6)))
    assert len(report["resized"]) == 1 + hivit.PRESETS["tiny"].depth


def bicubic_grid(table, side):
    """Independent resize of a (1, G*G, C) table, rows first: the G x G grid of C-vectors as a C-channel image,
    bicubic (align_corners=False) to side x side, flattened back row by row."""
    g, c = math.isqrt(table.shape[1]), table.shape[2]
    image = table[0].reshape(g, g, c).permute(2, 0, 1)[None]             # (1, C, G, G): row i, column j
    image = F.interpolate(image, size=(side, side), mode="bicubic", align_corners=False)   # (1, C, side, side)
    return image[0].permute(1, 2, 0).reshape(1, side * side, c)          # (1, side^2, C)


def test_a_fastmim_vit_pretrained_small_is_fine_tuned_larger_with_its_table_resized(tmp_path):
    """FastMIM pre-trains at low resolution and fine-tunes at a larger one: a train.py vit_tiny --method fastmim
    checkpoint (4 x 4 table, 64 px) in a 112-px classifier (7 x 7, a non-integer ratio) holds the bicubic resize of
    the pre-trained table and every other tensor unchanged."""
    pretrainer, path = pretrain_checkpoint(tmp_path, "vit_tiny", "fastmim")
    table = pretrainer.encoder.pos_embed.detach()
    assert table.shape[1] == 16
    classifier = finetune.build_classifier("vit_tiny", num_classes=8, drop_path=0.0, input_size=112)
    report = finetune.load_pretrained(classifier, finetune.read_pretrained(path), model_name="vit_tiny")
    ours = classifier.state_dict()
    assert report["resized"] == ["pos_embed (1, 16, 64) -> (1, 49, 64)"]
    torch.testing.assert_close(ours["pos_embed"], bicubic_grid(table, 7), rtol=0, atol=1e-6)
    for k, v in pretrainer.encoder.state_dict().items():                  # the rest is loaded as it was
        if k in ours and k != "pos_embed":
            assert torch.equal(ours[k], v), k


# ---- 4. official layouts: random tensors shaped as the released listings give the official forward's logits -----

def official_file(tmp_path, layout, *, attention_blocks=2):
    """Random tensors for every key of a released listing, cut after a few attention blocks (speed), as a file."""
    info = official_layout(layout)
    flat = sorted({int(k.split(".")[1]) for k, _, _ in info["keys"] if k.startswith("blocks.")})
    merges = [i for i in flat if any(k == f"blocks.{i}.reduction.weight" for k, _, _ in info["keys"])]
    keep = merges[1] + 1 + attention_blocks
    g = torch.Generator().manual_seed(0)
    sd = {}
    for key, shape, dtype in info["keys"]:
        if key.startswith("blocks.") and int(key.split(".")[1]) >= keep:
            continue
        t = torch.randn(shape, generator=g) * 0.1 if dtype.endswith("float32") else torch.zeros(shape, dtype=torch.long)
        sd[key] = t + 1.0 if key.endswith(("norm.weight", "norm1.weight", "norm2.weight", "ffn_ln.weight")) else t
    path = tmp_path / f"{layout}.pth"
    torch.save({"model": sd}, path)
    return sd, str(path), info


@pytest.mark.parametrize("layout, model_name", [("hivit_tiny", "hivit_t"), ("itpn_base_finetune", "itpn_b"),
                                                ("itpn_base_clip_finetune", "itpn_b"),
                                                ("fast_itpn_tiny", "fast_itpn_t")])
def test_an_official_finetune_layout_gives_the_official_logits(tmp_path, layout, model_name):
    sd, path, info = official_file(tmp_path, layout)                    # 2 attention blocks, released size
    pretrained = finetune.read_pretrained(path)
    family, preset = train.MODELS[model_name]
    cfg = replace(preset, depth=2, num_classes=1000, img_size=info["input_size"])
    if family == "fast_itpn":
        model = fast_itpn.FastiTPN(cfg)
    else:
        cfg = replace(cfg, layer_scale=0.1 if pretrained.kind == "clip" else 0.0)
        model = itpn.iTPN(cfg) if family == "itpn" else hivit.HiViT(cfg)
    report = finetune.load_pretrained(model.eval(), pretrained, model_name=model_name)
    assert report["fresh"] == [] and report["resized"] == []
    assert set(report["ignored"]) == {k for k in sd if k.endswith("relative_position_index")}
    forward = official_fast_itpn_logits if family == "fast_itpn" else official_hivit_logits
    x = torch.randn(2, 3, info["input_size"], info["input_size"])
    with torch.no_grad():
        want = forward(sd, x, n1=preset.mlp_depth1, n2=preset.mlp_depth2, heads=preset.num_heads)
        torch.testing.assert_close(model(x), want, rtol=1e-4, atol=1e-4)


def test_official_pretraining_layouts_load_the_backbone_and_leave_the_rest(tmp_path):
    for layout, kind, fresh in (("itpn_base_pixel_pretrain", "pixel", {"relative_position_bias_table", "fc_norm",
                                                                        "head"}),
                                ("itpn_base_clip_pretrain", "clip", {"fc_norm", "head"})):
        sd, path, info = official_file(tmp_path, layout)
        pretrained = finetune.read_pretrained(path)
        assert pretrained.kind == kind
        cfg = replace(itpn.PRESETS["itpn_b"], depth=2, num_classes=10, img_size=64,
                      layer_scale=0.1 if kind == "clip" else 0.0)
        model = itpn.iTPN(cfg)
        report = finetune.load_pretrained(model, pretrained, model_name="itpn_b")
        assert {k.split(".")[-2] if "relative" not in k else k.split(".")[-1] for k in report["fresh"]} == fresh
        ignored_tops = {k.split(".")[0] for k in report["ignored"]}
        assert {"decoder_embed", "split_16to8", "fpn_modules"} <= ignored_tops and "blocks" not in ignored_tops
        assert len(report["resized"]) == 1 + (2 if kind == "clip" else 0)   # 224 -> 64 px: APE (+ bias tables)


def bias_table_grid(table, side):
    """Independent resize of a ((2G-1)^2, heads) relative position bias table: entry (dr + G-1) * (2G-1) + dc + G-1
    holds offset (dr, dc) (the index official_hivit_logits builds), so it is a (2G-1) x (2G-1) image per head."""
    n, heads = math.isqrt(table.shape[0]), table.shape[1]
    image = table.reshape(n, n, heads).permute(2, 0, 1)[None]            # (1, heads, 2G-1, 2G-1): dr, dc
    image = F.interpolate(image, size=(2 * side - 1, 2 * side - 1), mode="bicubic", align_corners=False)
    return image[0].permute(1, 2, 0).reshape(-1, heads)                  # ((2 side - 1)^2, heads)


@pytest.mark.parametrize("layout, model_name, input_size", [("fast_itpn_tiny", "fast_itpn_t", 448),
                                                            ("hivit_tiny", "hivit_t", 320)])
def test_an_official_layout_at_a_larger_grid_gets_resized_tables_and_the_official_logits(tmp_path, layout,
                                                                                        model_name, input_size):
    """A released 224-px file (14 x 14 grid) fine-tuned larger (Fast-iTPN-T at 448 = 2x the grid, HiViT-T at 320):
    the APE (and HiViT's relative position bias tables) are bicubic resizes of the file's, and the classifier
    computes the official forward on the file with its tables resized independently."""
    sd, path, info = official_file(tmp_path, layout)
    family, preset = train.MODELS[model_name]
    cfg = replace(preset, depth=2, num_classes=1000, img_size=input_size)
    model = (fast_itpn.FastiTPN(cfg) if family == "fast_itpn" else hivit.HiViT(cfg)).eval()
    report = finetune.load_pretrained(model, finetune.read_pretrained(path), model_name=model_name)
    side, ours = input_size // 16, model.state_dict()
    want = {k: bicubic_grid(v, side) for k, v in sd.items() if k in ("pos_embed", "absolute_pos_embed")}
    want.update({k: bias_table_grid(v, side) for k, v in sd.items() if k.endswith("relative_position_bias_table")})
    assert len(report["resized"]) == len(want) == (1 if family == "fast_itpn" else 1 + 2)   # 2 attention blocks
    for key, table in want.items():
        ours_key = hivit.map_official_key(key, mlp_depth1=preset.mlp_depth1, mlp_depth2=preset.mlp_depth2)
        torch.testing.assert_close(ours[ours_key], table, rtol=0, atol=1e-6)
    forward = official_fast_itpn_logits if family == "fast_itpn" else official_hivit_logits
    x = torch.randn(1, 3, input_size, input_size)
    with torch.no_grad():
        logits = forward({**sd, **want}, x, n1=preset.mlp_depth1, n2=preset.mlp_depth2, heads=preset.num_heads)
        torch.testing.assert_close(model(x), logits, rtol=1e-4, atol=1e-4)


# ---- 5. mixing, smoothing and accuracy ----------------------------------------------------------------------------

def test_mixup_and_cutmix_targets_sum_to_one_and_match_the_pixels():
    b, k = 6, 10
    colours = torch.arange(1, b + 1, dtype=torch.float32)                 # image i is the constant i + 1
    x, y = colours.view(b, 1, 1, 1).expand(b, 3, 16, 16).clone(), torch.tensor([3, 1, 4, 0, 5, 9])
    for name, mixing in (("mixup", finetune.make_mixing(mixup=0.8, cutmix=0.0, num_classes=k)),
                         ("cutmix", finetune.make_mixing(mixup=0.0, cutmix=1.0, num_classes=k))):
        torch.manual_seed(3)
        mixed, soft = mixing(x, y)
        assert soft.shape == (b, k) and torch.allclose(soft.sum(1), torch.ones(b))
        for i in range(b):
            own, partner = soft[i, y[i]].item(), soft[i, y[i - 1]].item()   # torchvision pairs i with i - 1
            if name == "mixup":                                           # the pixel value tells lambda
                lam = (mixed[i, 0, 0, 0] - colours[i - 1]) / (colours[i] - colours[i - 1])
                assert own == pytest.approx(lam.item(), abs=1e-5) and own + partner == pytest.approx(1.0)
            else:                                                         # the pasted area share is 1 - lambda
                assert (mixed[i] == colours[i - 1]).float().mean().item() == pytest.approx(partner, abs=1e-6)
    both = finetune.make_mixing(mixup=0.8, cutmix=1.0, num_classes=k)
    kinds = set()
    for seed in range(20):                                                # the batch takes one of the two
        torch.manual_seed(seed)
        mixed, _ = both(x, y)
        kinds.add("cutmix" if bool((mixed == x).any()) else "mixup")
    assert kinds == {"mixup", "cutmix"} and finetune.make_mixing(mixup=0.0, cutmix=0.0, num_classes=k) is None


def test_smoothing_of_soft_targets_is_timms_mixed_smoothing():
    logits, soft = torch.randn(4, 5), torch.softmax(torch.randn(4, 5), 1)
    eps = 0.1
    want = -(((1 - eps) * soft + eps / 5) * logits.log_softmax(1)).sum(1).mean()
    assert F.cross_entropy(logits, soft, label_smoothing=eps).item() == pytest.approx(want.item(), rel=1e-6)


def test_the_training_loss_mixes_first_and_smooths_the_mixed_targets():
    cfg = finetune.FinetuneConfig(mixup=0.8, cutmix=1.0, smoothing=0.1, batch_size=4)
    model = finetune.build_classifier("hivit_tiny", num_classes=8, drop_path=0.0, input_size=32).eval()
    dist_ = train.Dist(0, 1, torch.device("cpu"))
    task = finetune.FinetuneTask(model, [], [], cfg=cfg, dist_=dist_, classes=list("abcdefgh"))
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 3, 5, 7])
    for seed in range(4):                                                 # both MixUp and CutMix batches
        torch.manual_seed(seed)
        loss = task.loss(model, x, y)["loss"]
        torch.manual_seed(seed)
        mixed, soft = finetune.make_mixing(mixup=0.8, cutmix=1.0, num_classes=8)(x, y)
        assert soft.max() < 1                                             # a real mix happened
        want = -((0.9 * soft + 0.1 / 8) * model(mixed).log_softmax(1)).sum(1).mean()
        assert loss.item() == pytest.approx(want.item(), rel=1e-5)


def test_train_transform_is_maes_pipeline_from_torchvision():
    steps = finetune.train_transform(64, randaug=9, reprob=0.25).transform.transforms
    kinds = [type(t).__name__ for t in steps]
    assert kinds == ["RandomResizedCrop", "RandomHorizontalFlip", "RandAugment", "ToTensor", "Normalize",
                     "RandomErasing"]
    assert steps[0].scale == (0.08, 1.0) and (steps[2].num_ops, steps[2].magnitude) == (2, 9)
    assert steps[5].p == 0.25 and steps[5].value == "random"              # timm's per-pixel random fill
    plain = [type(t).__name__ for t in finetune.train_transform(64, randaug=0, reprob=0.0).transform.transforms]
    assert plain == ["RandomResizedCrop", "RandomHorizontalFlip", "ToTensor", "Normalize"]   # the probe's


def test_eval_transform_resizes_to_256_and_keeps_the_central_224():
    frame = np.full((256, 256, 3), 255, np.uint8)
    frame[16:240, 16:240] = 0                                             # a 16-px white frame around black
    x, _ = finetune.eval_transform(224)(Image.fromarray(frame), 0)
    assert x.shape == (3, 224, 224)
    assert torch.allclose(x, finetune.eval_transform(224)(Image.new("RGB", (224, 224)), 0)[0], atol=1e-6)
    big, _ = finetune.eval_transform(384)(Image.fromarray(frame), 0)      # from 384 on: resize, no crop
    assert big.shape == (3, 384, 384) and big[:, 0, 0].mean() > 0 and big[:, 192, 192].mean() < 0


def test_topk_counts_a_hand_made_case():
    logits = torch.tensor([[0.0, 1, 2, 3, 4, 5, 6],                       # label 6: top-1
                           [6.0, 5, 4, 3, 2, 1, 0],                       # label 4: 5th best -> top-5 only
                           [6.0, 5, 4, 3, 2, 1, 0],                       # label 5: 6th best -> neither
                           [1.0, 9, 2, 3, 4, 5, 6]])                      # label 0: last -> neither
    assert finetune.topk_correct(logits, torch.tensor([6, 4, 5, 0])) == [1, 2]
    assert finetune.topk_correct(logits[:, :3], torch.tensor([2, 0, 1, 0])) == [2, 4]   # k capped at K = 3


def test_lars_step_is_the_trust_ratio_update():
    w, b = torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(3))
    w.grad, b.grad = torch.randn(3, 4), torch.randn(3)
    w0, b0, gw, gb = w.detach().clone(), b.detach().clone(), w.grad.clone(), b.grad.clone()
    finetune.LARS([w, b], lr=0.5, weight_decay=0.1, momentum=0.9).step()
    update = gw + 0.1 * w0
    update = update * 0.001 * w0.norm() / update.norm()
    assert torch.allclose(w, w0 - 0.5 * update) and torch.allclose(b, b0 - 0.5 * gb)   # vectors: plain SGD


# ---- 6. the loop: overfit, end to end, resume, DDP ----------------------------------------------------------------

def test_overfits_one_batch():
    data = train.ShapesDataset(8, image_size=32, task="cls")
    transform = finetune.eval_transform(32)
    x = torch.stack([transform(*data[i])[0] for i in range(8)])
    y = torch.tensor([data[i][1] for i in range(8)])
    torch.manual_seed(0)
    model = finetune.build_classifier("itpn_tiny", num_classes=8, drop_path=0.0, input_size=32)
    groups = finetune.layer_decay_groups(model, family="itpn", cfg=model.cfg, weight_decay=0.0, layer_decay=0.75)
    opt = torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"} for g in groups], lr=3e-3)
    for group in opt.param_groups:
        group["lr"] *= group["lr_scale"]
    for _ in range(60):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05 and finetune.topk_correct(model(x), y) == [8, 8]


def test_default_run_logs_accuracy_keeps_the_best_and_draws_predictions(tmp_path):
    records, out = run(tmp_path, *TINY, "--model_ema", "--mixup", "0.8", "--cutmix", "1.0")
    log = read_log(out)
    assert [r["epoch"] for r in log] == [0, 1] and log == json.loads(json.dumps(records))
    for r in log:
        assert {"test_acc1", "test_acc5", "test_loss", "test_acc1_ema", "train_loss", "train_lr"} <= set(r)
        assert 0 <= r["test_acc1"] <= r["test_acc5"] <= 100 and r["test_acc1"] * 6 / 100 == pytest.approx(
            round(r["test_acc1"] * 6 / 100))                              # a whole number of the 6 val images
    best = torch.load(os.path.join(out, "checkpoint-best.pth"), weights_only=True)
    assert best["best"] == max(r["test_acc1"] for r in log) and "model_ema" in best
    assert os.path.exists(os.path.join(out, "predictions-epoch001.png"))
    with Image.open(os.path.join(out, "attention-epoch001.png")) as im:   # 6 val images: 6 (image, heat) pairs
        tiles = np.asarray(im.convert("RGB")).reshape(2, 96 + 14, 8, 96, 3)   # (rows, px, cols, px, RGB) slots
    drawn = (tiles[:, 2:94, :, 2:94] != 255).any(axis=(1, 3, 4))        # (rows, cols): a picture in the slot
    assert drawn.tolist() == [[True] * 8, [True] * 4 + [False] * 4]
    last = os.path.join(out, "checkpoint-last.pth")
    again = finetune.main([*TINY, "--batch_size", "2", "--model_ema", "--eval", "--resume", last])   # another split
    assert again[0]["test_acc1"] == log[-1]["test_acc1"] and again[0]["test_loss"] == pytest.approx(
        log[-1]["test_loss"], rel=1e-6)
    msg = error_of(tmp_path, *TINY, "--input_size", "64", "--model_ema", "--eval", "--resume", last)
    assert msg.startswith("error:") and "does not fit" in msg and "--finetune" in msg   # not a traceback


def test_finetune_from_the_train_demo_checkpoint(tmp_path):
    train.main(["--model", "hivit_tiny", "--method", "mae", "--input_size", "32", "--num_images", "4",
                "--batch_size", "2", "--max_steps", "1", "--num_workers", "0", "--output_dir",
                str(tmp_path / "pretrain")])
    records, out = run(tmp_path, *TINY, "--model", "hivit_tiny", "--finetune",
                       str(tmp_path / "pretrain" / "checkpoint-last.pth"), "--max_steps", "2")
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["pretrained"] == "train.py hivit_tiny --method mae" and records[-1]["step"] == 2


def test_resume_continues_bitwise_as_if_never_stopped(tmp_path):
    argv = [*TINY, "--model", "hivit_tiny", "--mixup", "0.8", "--cutmix", "1.0", "--model_ema", "--randaug", "9",
            "--drop_path", "0.1"]                                         # 4 steps per epoch
    _, straight = run(tmp_path, *argv, "--max_steps", "6", name="straight")
    _, stopped = run(tmp_path, *argv, "--max_steps", "3", name="stopped")
    run(tmp_path, *argv, "--max_steps", "6", "--resume", "auto", "--num_workers", "1", name="stopped")
    a = torch.load(os.path.join(straight, "checkpoint-last.pth"), weights_only=True)
    b = torch.load(os.path.join(stopped, "checkpoint-last.pth"), weights_only=True)
    assert a["step"] == b["step"] == 6
    for part in ("model", "model_ema"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    assert read_log(straight)[-1]["train_loss"] == read_log(stopped)[-1]["train_loss"]
    assert read_log(straight)[-1]["test_acc1_ema"] == read_log(stopped)[-1]["test_acc1_ema"]
    msg = error_of(tmp_path, *argv, "--input_size", "64", "--resume", "auto", name="stopped")   # another size
    assert msg.startswith("error:") and "--input_size 32" in msg


def prepared(tmp_path, *argv):
    """finetune.prepare's (task, trainer) for argv, one process on the CPU, as finetune.main builds them."""
    cfg, _ = train.parse_config(finetune.FinetuneConfig, [*argv, "--output_dir", str(tmp_path / "out")],
                                description="", defaults=finetune.RECIPES,
                                recipe=lambda c: finetune.recipe_name(c.model, None, c.linear_probe))
    task, trainer, _ = finetune.prepare(cfg, train.Dist(0, 1, torch.device("cpu")), None)
    return task, trainer


def test_weight_ema_copies_the_first_step_then_averages_with_the_decay(tmp_path):
    """torch's AveragedModel through finetune's task and Trainer: after optimizer step 1 the EMA is the weights, after
    step t it is d * ema + (1 - d) * w_t with d = --model_ema_decay (0.75, so d and 1 - d cannot be swapped)."""
    d = 0.75
    task, trainer = prepared(tmp_path, *TINY, "--model", "hivit_tiny", "--model_ema", "--model_ema_decay", str(d),
                             "--lr", "1e-2", "--warmup_epochs", "0", "--mixup", "0.8", "--cutmix", "1.0")
    batches = iter(task.batches(0, 0))
    ema = None
    for step in range(3):
        before = {n: p.detach().clone() for n, p in task.model.named_parameters()}
        trainer.train_step(batches)
        weights = {n: p.detach().clone() for n, p in task.model.named_parameters()}
        got = dict(task.ema.module.named_parameters())
        assert got.keys() == weights.keys()
        assert not torch.equal(weights["blocks.0.attn.qkv.weight"], before["blocks.0.attn.qkv.weight"])   # a real step
        want = weights if ema is None else {n: d * ema[n] + (1 - d) * weights[n] for n in weights}
        for n in weights:
            if ema is None:
                assert torch.equal(got[n], want[n]), n                     # the first update copies
            else:
                torch.testing.assert_close(got[n].detach(), want[n], rtol=0, atol=1e-6, msg=n)
        if ema is not None:
            assert not torch.equal(got["blocks.0.attn.qkv.weight"], weights["blocks.0.attn.qkv.weight"])
        ema = {n: p.detach().clone() for n, p in got.items()}


def test_clip_grad_clips_the_step_and_the_log_keeps_the_norm_before_clipping(tmp_path):
    """--clip_grad through finetune.main: after one AdamW step, exp_avg = (1 - beta1) * g for the gradient g the
    optimizer received, so its global norm / 0.1 is |g|: the clipped run's is 0.01, the unclipped run's is the logged
    train_grad_norm, and both runs log the same norm (the norm before clipping)."""
    argv = [*TINY, "--model", "hivit_tiny", "--max_steps", "1", "--lr", "1e-3", "--warmup_epochs", "0"]
    norms = {}
    for name, extra in (("clipped", ["--clip_grad", "0.01"]), ("free", [])):
        records, out = run(tmp_path, *argv, *extra, name=name)
        state = torch.load(os.path.join(out, "checkpoint-last.pth"), weights_only=True)["optimizer"]["state"]
        exp_avg = torch.cat([s["exp_avg"].flatten() for s in state.values()])
        norms[name] = (records[0]["train_grad_norm"], exp_avg.norm().item() / (1 - 0.9))   # AdamW beta1 0.9
    logged, received = norms["clipped"]
    assert logged > 1.0 and received == pytest.approx(0.01, rel=1e-4)   # the step saw a gradient of norm 0.01
    assert norms["free"][0] == pytest.approx(logged, rel=1e-5)          # the log: the norm before clipping
    assert norms["free"][1] == pytest.approx(logged, rel=1e-4)          # without --clip_grad: the whole gradient


def test_two_gloo_ranks_match_one_process_with_the_same_global_batch(tmp_path):
    # Global batch 4 = 2 ranks x 2 micro-steps x 1 image = 1 process x 4 micro-steps x 1 image; 7 val images are
    # split 4 + 3 over the ranks and summed. Only one image per micro-batch makes the micro-batches the same for
    # both world sizes (DistributedSampler gives rank r positions r, r + R, ...), so MixUp / CutMix pair each image
    # with itself here: what the run checks is that their draws (lambda, the choice, the box) come from the
    # (seed, step, shard) stream, or the drop path draws after them would differ by rank. Drop path 0.5: at 0.1 the
    # few per-image keep / drop draws mostly agree whatever the seed, so a wrong mixing stream could pass. EMA on.
    argv = ["--model", "itpn_tiny", "--input_size", "32", "--num_images", "4", "--num_val_images", "7",
            "--batch_size", "1", "--epochs", "3", "--warmup_epochs", "1", "--num_workers", "0", "--blr", "0.05",
            "--drop_path", "0.5", "--randaug", "9", "--mixup", "0.8", "--cutmix", "1.0", "--model_ema",
            "--model_ema_decay", "0.5"]
    ddp_out = str(tmp_path / "ddp")
    env = subprocess_env()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "finetune.py", *argv, "--accum_iter", "2", "--output_dir", ddp_out],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single, single_out = run(tmp_path, *argv, "--accum_iter", "4", name="single")
    ddp = read_log(ddp_out)
    assert len(ddp) == len(single) == 3 and len({r["train_loss"] for r in single}) == 3
    for a, b in zip(ddp, single):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-5, rel=0)
        assert a["train_grad_norm"] == pytest.approx(b["train_grad_norm"], rel=1e-5)
        assert a["test_loss"] == pytest.approx(b["test_loss"], rel=1e-5) and a["test_acc1"] == b["test_acc1"]
        assert a["test_loss_ema"] == pytest.approx(b["test_loss_ema"], rel=1e-5)
    last = [torch.load(os.path.join(d, "checkpoint-last.pth"), weights_only=True) for d in (ddp_out, single_out)]
    for part in ("model", "model_ema"):
        for k, v in last[0][part].items():
            torch.testing.assert_close(v, last[1][part][k], rtol=0, atol=1e-5, msg=f"{part} {k}")


def test_linear_probe_trains_the_head_only(tmp_path):
    _, path = pretrain_checkpoint(tmp_path, "hivit_tiny", "mae")
    records, out = run(tmp_path, *TINY, "--model", "hivit_tiny", "--finetune", path, "--linear_probe",
                       "--input_size", "64")                       # the checkpoint's grid: nothing resized
    ckpt = torch.load(os.path.join(out, "checkpoint-last.pth"), weights_only=True)
    encoder = torch.load(path, weights_only=True)["model"]
    for k, v in ckpt["model"].items():                                    # the backbone is the checkpoint's
        if k.startswith("encoder.") and not k.startswith(("encoder.head", "encoder.fc_norm")):
            assert torch.equal(v, encoder[k]), k
    assert {"bn.running_mean", "bn.running_var", "head.weight", "head.bias"} <= set(ckpt["model"])
    assert "bn.weight" not in ckpt["model"] and ckpt["optimizer"]["param_groups"][0]["momentum"] == 0.9   # LARS
    assert [len(g["params"]) for g in ckpt["optimizer"]["param_groups"]] == [2]   # head weight and bias only


def test_fast_itpn_switches_reach_the_model(tmp_path):
    finetune_cfg = dict(num_classes=8, drop_path=0.0, input_size=64, migration_ratio=0.2, attention="gathering")
    model = finetune.build_classifier("fast_itpn_tiny", **finetune_cfg)
    assert model.cfg.migration_ratio == 0.2 and model.cfg.attention == "gathering" and model.accelerated()
    records, out = run(tmp_path, *TINY, "--model", "fast_itpn_tiny", "--migration_ratio", "0.2", "--attention",
                       "window", "--max_steps", "1")
    assert math.isfinite(records[0]["train_loss"])
    assert os.path.exists(os.path.join(out, "predictions-epoch000.png"))    # no N x N map: no attention picture
    assert not os.path.exists(os.path.join(out, "attention-epoch000.png"))


# ---- 6b. the attention picture (iTPN Fig. 6): the recorded maps, the received-attention map, the drawing ---------

def test_fast_attention_keeps_the_explicit_softmax_and_the_fused_output():
    """FastAttention's switch: the output agrees with the fused kernel and `last_attention` is
    softmax(q k^T / sqrt(hd)) recomputed head by head from q_proj + q_bias and k_proj (k has no bias)."""
    torch.manual_seed(0)
    c, heads, n = 8, 2, 6
    attn = fast_itpn.FastAttention(c, num_heads=heads)
    torch.nn.init.normal_(attn.q_bias)
    x = torch.randn(2, n, c)
    with torch.no_grad():
        fused = attn(x)
        attn.keep_attention = True
        explicit = attn(x)
    torch.testing.assert_close(explicit, fused, rtol=0, atol=1e-6)
    hd = c // heads
    q = (x @ attn.q_proj.weight.detach().t() + attn.q_bias.detach()).split(hd, dim=-1)   # heads x (B, N, hd)
    k = (x @ attn.k_proj.weight.detach().t()).split(hd, dim=-1)
    expected = torch.stack([(qh @ kh.transpose(1, 2) / hd ** 0.5).softmax(-1) for qh, kh in zip(q, k)], dim=1)
    torch.testing.assert_close(attn.last_attention, expected, rtol=0, atol=1e-6)
    attn(x).sum().backward()                                              # with grad on: the stored map is detached
    assert attn.last_attention.grad_fn is None and not attn.last_attention.requires_grad
    with pytest.raises(ValueError, match="plain global path"):            # windows: no N x N map to keep
        attn.forward_windows(x.reshape(2, 2, 3, c), mode="window")


def test_received_attention_is_the_mean_over_queries_and_heads_by_brute_force():
    g = torch.Generator().manual_seed(0)
    for cls in (0, 1):                                                    # a CLS token (first) is left out
        attn = torch.rand(2, 3, cls + 6, cls + 6, generator=g).softmax(-1)   # (B, heads, T, T), grid 2 x 3
        received = finetune.received_attention(attn, (2, 3))
        expected = torch.zeros(2, 2, 3)
        for b in range(2):
            for j in range(6):
                expected[b, j // 3, j % 3] = sum(attn[b, h, cls + i, cls + j] for h in range(3) for i in range(6)) / 18
        torch.testing.assert_close(received, expected)
        if cls == 0:                                                      # rows sum to 1, so the map does
            torch.testing.assert_close(received.sum(dim=(1, 2)), torch.ones(2))


def test_heat_overlay_puts_the_heat_on_its_unit():
    """A one-hot heat on unit (row 1, col 2) of a 3 x 4 grid: the reddest 16 x 16 block is that unit's (a
    transposed or flipped upsampling would light another one); a flat grey image stays grey under the blend."""
    heat = torch.zeros(3, 4)
    heat[1, 2] = 1.0
    out = finetune.heat_overlay(torch.full((3, 48, 64), 0.5), heat)
    assert out.shape == (3, 48, 64) and 0 <= out.min() and out.max() <= 1
    red = out[0].reshape(3, 16, 4, 16).mean(dim=(1, 3))                   # (Hp, Wp) mean red per unit
    assert divmod(int(red.argmax()), 4) == (1, 2)
    assert out[0].max() == pytest.approx(0.75) and out[2].min() == pytest.approx(0.25)   # 0.5 grey + 0.5 colour


@pytest.mark.parametrize("model_name, path", [
    ("hivit_tiny", "blocks"), ("vit_tiny", "blocks"), ("itpn_tiny", "backbone.blocks"),
    ("itpn_vit_tiny", "backbone.vit.blocks"), ("fast_itpn_tiny", "blocks"),
])
def test_every_family_records_its_last_attention_block_and_draws_it(tmp_path, model_name, path):
    torch.manual_seed(0)
    model = finetune.build_classifier(model_name, num_classes=8, drop_path=0.0, input_size=32).eval()
    block = finetune.last_attention_block(model)
    assert block is model.get_submodule(path)[-1].attn
    assert finetune.last_attention_block(finetune.LinearProbe(model, 8)) is block
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        off = model(x)
        block.keep_attention = True
        on = model(x)
    block.keep_attention = False
    torch.testing.assert_close(on, off, rtol=0, atol=1e-6)
    assert block.last_attention.shape == (2, block.num_heads, 4, 4)    # 32 px: 2 x 2 units, no CLS token
    views = train.SeededViews(train.ShapesDataset(5, image_size=32, task="cls"), finetune.eval_transform(32))
    path_png = str(tmp_path / "attention.png")
    assert finetune.save_attention(path_png, model, views, train.SHAPE_CLASSES, unit=16, device="cpu")
    assert not block.keep_attention and block.last_attention is None     # the switch is off again
    with Image.open(path_png) as im:                                      # 5 (image, heat) pairs: 4 + 1 per row
        assert im.size == (8 * 96, 2 * (96 + 14))


def test_recipes_follow_the_model_and_the_checkpoint():
    assert finetune.recipe_name("itpn_b", "pixel", False) == "itpn_pixel_b"
    assert finetune.recipe_name("itpn_l", "clip", False) == "itpn_clip_l"
    assert finetune.recipe_name("itpn_s", "pixel", False) == "itpn_pixel_b"
    assert finetune.recipe_name("fast_itpn_l", "clip", False) == "fast_itpn_l"
    assert finetune.recipe_name("hivit_b", "pixel", False) == "hivit_mae"
    assert finetune.recipe_name("hivit_s", None, False) == "scratch_s"
    assert finetune.recipe_name("vit_l", "pixel", True) == "linprobe"
    assert finetune.recipe_name("itpn_tiny", None, False) == "demo"
    assert finetune.RECIPES["fast_itpn_l"]["input_size"] == 640 and finetune.RECIPES["itpn_pixel_b"]["blr"] == 5e-4


# The paper-size recipes against their sources: (recipe, GPUs x accumulation of the source's command, source's
# numbers, citation). Sources that give an absolute lr at batch B are written as lr * 256 / B (MAE's blr); Swin-style
# configs scale lr and min_lr per 512 images, so their min_lr is written at the source's batch (128 x 8 GPUs = 1024).
RECIPE_SOURCES = [
    ("itpn_pixel_b", 32, dict(blr=5e-4, epochs=100, warmup_epochs=5, drop_path=0.2, layer_decay=0.60, min_lr=5e-6),
     "iTPN supp. Tab. 8 (B: lr, epochs, warm-up, drop path, batch 1024); layer decay, min_lr: official "
     "`itpn_pixel/FINETUNE.md`"),
    ("itpn_pixel_l", 32, dict(blr=1e-3, epochs=50, warmup_epochs=5, drop_path=0.2, layer_decay=0.55, min_lr=5e-6),
     "iTPN supp. Tab. 8 (L); official `itpn_pixel/FINETUNE.md`"),
    ("itpn_clip_b", 32, dict(blr=5e-4, epochs=100, warmup_epochs=5, drop_path=0.2, layer_decay=0.60, min_lr=1e-6),
     "iTPN supp. Tab. 10 (B, CLIP); layer decay, min_lr: official `itpn_clip/README.md`"),
    ("itpn_clip_l", 32, dict(blr=1e-3, epochs=50, warmup_epochs=5, drop_path=0.3, layer_decay=0.55, min_lr=1e-6),
     "iTPN supp. Tab. 10 (L, CLIP); official `itpn_clip/README.md`"),
    ("hivit_mae", 8 * 2, dict(blr=5e-4, epochs=100, warmup_epochs=5, drop_path=0.2, layer_decay=0.85, min_lr=1e-6),
     "official hivit `self_supervised/get_started.md` (64 x accum 2 x 8 GPUs); min_lr: MAE `main_finetune.py`"),
    ("vit_mae_b", 32, dict(blr=5e-4, epochs=100, warmup_epochs=5, drop_path=0.1, layer_decay=0.65, min_lr=1e-6),
     "MAE `FINETUNE.md` ViT-B (32 GPUs); App. A Tab. 9: batch 1024, warm-up 5, 100 epochs (B)"),
    ("vit_mae_l", 32, dict(blr=1e-3, epochs=50, warmup_epochs=5, drop_path=0.2, layer_decay=0.75, min_lr=1e-6),
     "MAE `FINETUNE.md` ViT-L; App. A Tab. 9: 50 epochs (L), layer decay 0.75"),
    ("fast_itpn_t", 16, dict(blr=1e-4 * 256 / 1024, epochs=100, warmup_epochs=5, drop_path=0.1, layer_decay=0.80,
                             min_lr=1e-6, model_ema=True, model_ema_decay=0.9999),
     "Fast-iTPN Sec. 5.2 / official `fast_itpn/README.md`: lr 1e-4 at 64 x 16 GPUs, EMA 0.9999"),
    ("fast_itpn_s", 16, dict(blr=1e-4 * 256 / 1024, epochs=100, warmup_epochs=5, drop_path=0.1, layer_decay=0.90,
                             min_lr=1e-6, model_ema=True), "Fast-iTPN Sec. 5.2 / official README (S)"),
    ("fast_itpn_b", 32, dict(blr=1e-4 * 256 / 1024, epochs=20, warmup_epochs=3, drop_path=0.1, layer_decay=0.90,
                             min_lr=1e-6, model_ema=True), "Fast-iTPN Sec. 5.2 / official README (B, 32 x 32)"),
    ("fast_itpn_l", 32 * 4, dict(blr=5e-5 * 256 / 512, epochs=20, warmup_epochs=3, drop_path=0.2, layer_decay=0.95,
                                 min_lr=1e-6, model_ema=True, input_size=640),
     "Fast-iTPN Sec. 5.2 / official README (L: lr 5e-5 at 4 x 32 GPUs x update_freq 4 = 512, 640 px)"),
    *[(f"scratch_{size}", 8, dict(blr=5e-4 * 256 / 512, epochs=300, warmup_epochs=20, drop_path=dp, layer_decay=1.0,
                                  min_lr=5e-6 * 1024 / 512),
       f"official hivit `supervised/config.py` (Swin's: lr 5e-4 and min_lr 5e-6 per 512, 300 epochs, 20 warm-up), "
       f"`supervised/get_started.md` (128 x 8 GPUs), drop path of `supervised/configs/hivit_{name}_224.yaml`")
      for size, name, dp in (("t", "tiny", 0.05), ("s", "small", 0.3), ("b", "base", 0.5))],
    ("linprobe", 32, dict(blr=0.1, weight_decay=0.0, epochs=90, warmup_epochs=10, mixup=0.0, cutmix=0.0, randaug=0,
                          reprob=0.0, smoothing=0.0),
     "MAE App. A Tab. 10: LARS, base lr 0.1, wd 0, batch 16384 (`main_linprobe.py`: 512 x 32 GPUs), 90 epochs, "
     "warm-up 10, RandomResizedCrop only"),
]
SOURCE_BATCH = {"linprobe": 16384}                                        # every other source: 1024 (Fast-iTPN-L 512)


@pytest.mark.parametrize("name, devices, want, source", RECIPE_SOURCES, ids=[r[0] for r in RECIPE_SOURCES])
def test_paper_recipes_hold_their_sources_values(name, devices, want, source):
    recipe = finetune.RECIPES[name]
    for key, value in want.items():
        assert recipe[key] == pytest.approx(value, rel=1e-12), (key, source)
    batch = SOURCE_BATCH.get(name, 512 if name == "fast_itpn_l" else 1024)
    assert recipe["batch_size"] * devices == batch, source                # per-GPU batch x GPUs x accumulation
    if name != "linprobe":                                                # MAE Tab. 9's regularisation, every recipe
        assert {k: recipe[k] for k in ("weight_decay", "smoothing", "mixup", "cutmix", "randaug", "reprob")} == \
            dict(weight_decay=0.05, smoothing=0.1, mixup=0.8, cutmix=1.0, randaug=9, reprob=0.25)


def test_help_lists_every_setting(capsys):
    with pytest.raises(SystemExit):
        finetune.main(["--help"])
    text = capsys.readouterr().out
    for name in finetune.FinetuneConfig.__dataclass_fields__:
        assert f"--{name}" in text


# ---- 7. bad inputs: one message each ------------------------------------------------------------------------------

def image_tree(root, splits):
    """splits: {split: [class folder, ...]}, two small PNGs per folder."""
    for split, classes in splits.items():
        for c in classes:
            os.makedirs(root / split / c, exist_ok=True)
            for i in range(2):
                Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(root / split / c / f"{i}.png")


def test_data_errors_name_the_problem(tmp_path):
    image_tree(tmp_path / "noval", {"train": ["a", "b"]})
    assert "no val/ folder" in error_of(tmp_path, *TINY, "--data_path", str(tmp_path / "noval"))
    image_tree(tmp_path / "differ", {"train": ["a", "b"], "val": ["a", "c"]})
    msg = error_of(tmp_path, *TINY, "--data_path", str(tmp_path / "differ"))
    assert "class folders differ" in msg and "['b']" in msg and "['c']" in msg
    image_tree(tmp_path / "loose", {"train": ["a", "b"], "val": ["a", "b"]})
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "loose" / "train" / "x.png")
    assert "without a class folder" in error_of(tmp_path, *TINY, "--data_path", str(tmp_path / "loose"))
    image_tree(tmp_path / "good", {"train": ["a", "b"], "val": ["a", "b"]})
    msg = error_of(tmp_path, *TINY, "--data_path", str(tmp_path / "good"), "--nb_classes", "5")
    assert "--nb_classes 5 but the data has 2 classes (a, b)" in msg
    records, _ = run(tmp_path, *TINY, "--data_path", str(tmp_path / "good"), "--max_steps", "1", name="ok")
    assert len(records) == 1


def test_checkpoint_of_another_model_is_refused_naming_both(tmp_path):
    _, path = pretrain_checkpoint(tmp_path, "hivit_tiny", "mae")
    msg = error_of(tmp_path, *TINY, "--model", "vit_tiny", "--finetune", path)
    assert "hivit_tiny" in msg and "vit_tiny" in msg and "pass --model hivit_tiny" in msg
    _, official, _ = official_file(tmp_path, "hivit_tiny")               # HiViT-T cut to 2 attention blocks
    msg = error_of(tmp_path, *TINY, "--model", "fast_itpn_t", "--finetune", official)
    assert "hivit-style, C 384, 2+2+2 blocks" in msg and "fast_itpn_t is fast_itpn-style, C 384, 1+1+12" in msg
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pth")
    assert "neither a checkpoint of this project nor an official" in error_of(tmp_path, *TINY, "--finetune",
                                                                              str(tmp_path / "other.pth"))
    assert "no such file" in error_of(tmp_path, *TINY, "--finetune", str(tmp_path / "missing.pth"))


def test_flag_mistakes_are_one_message_each(tmp_path):
    assert "Fast-iTPN switches" in error_of(tmp_path, *TINY, "--migration_ratio", "0.2")
    assert "multiple of itpn_tiny's 16-px unit" in error_of(tmp_path, *TINY, "--input_size", "40")
    assert "--eval evaluates weights" in error_of(tmp_path, *TINY, "--eval")
    _, path = pretrain_checkpoint(tmp_path, "hivit_tiny", "mae")
    assert "has no head" in error_of(tmp_path, *TINY, "--model", "hivit_tiny", "--eval", "--finetune", path)
    assert "is not a model" in error_of(tmp_path, *TINY, "--model", "resnet50")
    run(tmp_path, *TINY, "--max_steps", "1", name="taken")
    assert "holds a run" in error_of(tmp_path, *TINY, name="taken")      # train.py's overwrite protection
    _, out = run(tmp_path, *TINY, "--max_steps", "1", "--overwrite", name="taken")
    assert len(read_log(out)) == 1                                        # the earlier run's log is gone


def test_default_output_folder_leaves_the_pretraining_run_alone(tmp_path, monkeypatch):
    """`python train.py` writes output/; `python finetune.py` writes output_finetune/ and does not touch output/."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "output").mkdir()
    (tmp_path / "output" / "checkpoint-last.pth").write_bytes(b"the pre-training run")
    finetune.main([*TINY, "--max_steps", "1"])
    assert (tmp_path / "output_finetune" / "checkpoint-last.pth").is_file()
    assert os.listdir(tmp_path / "output") == ["checkpoint-last.pth"]
