"""Oracles for hivit.py: paper/official sizes, visible-unit equivalence, an independent official forward, loading."""
import os
import re
from dataclasses import replace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import hivit
from hivit import PRESETS, HiViT, HiViTConfig, VisionTransformer, VIT_PRESETS, load_official
from conftest import gmacs, official_hivit_logits, official_layout


def meta_model(cfg):
    with torch.device("meta"):
        return HiViT(cfg) if isinstance(cfg, HiViTConfig) else VisionTransformer(cfg)


# ---- sizes: paper Tab. 7 and the official models ----

@pytest.mark.parametrize("name, params_m, paper_gmacs, layout", [
    ("hivit_t", 19.182, 4.59, "hivit_tiny"), ("hivit_s", 37.526, 9.04, "hivit_small"),
    ("hivit_b", 66.419, 15.81, "hivit_base"), ("hivit_l", 266.763, 63.66, "hivit_large"),
])
def test_parameter_counts_and_gmacs(name, params_m, paper_gmacs, layout):
    model = meta_model(PRESETS[name])
    n = sum(p.numel() for p in model.parameters())
    assert n == official_layout(layout)["n_params"]                     # exact, against the official model
    assert abs(n / 1e6 - params_m) / params_m < 1e-3
    assert abs(gmacs(model) - paper_gmacs) / paper_gmacs < 1e-2           # MACs = FLOPs / 2


def test_vit_b_size():
    # ViT-B/16 with mean pooling + fc_norm + head: 86.57M (the well-known ViT-B count plus fc_norm, minus nothing)
    n = sum(p.numel() for p in meta_model(VIT_PRESETS["vit_b"]).parameters())
    assert abs(n / 1e6 - 86.568) < 1e-3


# ---- visible-unit equivalence (the paper's key claim: no inter-unit ops before stage 3) ----

def test_visible_units_equal_full_then_select():
    torch.manual_seed(0)
    model = HiViT(PRESETS["tiny"]).eval()
    for blk in model.blocks:                                             # non-zero relative position biases, so a
        nn.init.normal_(blk.attn.relative_position_bias_table)           # wrong row/column gather would show
    x = torch.randn(3, 3, 64, 64)
    ids_keep = torch.rand(3, 16).argsort(dim=1)[:, :5]                  # (B, N_vis)
    with torch.no_grad():
        full_units, grid = model.embed_units(x)
        f4, f8, tokens = model.forward_early(full_units)
        v4, v8, *_, v16 = model.forward_features(x, ids_keep=ids_keep)   # [f4, f8, every stage-3 block]

        def select(t):
            idx = ids_keep.reshape(3, 5, *([1] * (t.ndim - 2))).expand(-1, -1, *t.shape[2:])
            return torch.gather(t, 1, idx)

        # exact: the same per-row ops on fewer rows (bitwise on CPU fp32)
        assert torch.equal(v4, select(f4)) and torch.equal(v8, select(f8))
        # the kept-units index is the full index with the kept rows and columns
        full_index = hivit.relative_position_index(grid)
        assert torch.equal(model.rpe_index(grid, ids_keep), torch.stack([full_index[i][:, i] for i in ids_keep]))
        # stage 3 on the selected tokens (with their APE and RPE) is what the seam returns
        sel = select(tokens + model.pos_embed_for(grid))
        ref = model.forward_stage3(sel, grid_hw=grid, ids_keep=ids_keep)[-1]
        assert torch.equal(v16, ref)
        # and it is NOT the same as attending over all units (stage 3 does mix units)
        assert not torch.allclose(v16, select(model.forward_features(x)[-1]), atol=1e-4)


def test_masked_unit_pixels_do_not_reach_visible_units():
    torch.manual_seed(0)
    model = HiViT(PRESETS["tiny"]).eval()
    x = torch.randn(1, 3, 64, 64)
    ids_keep = torch.tensor([[0, 5, 10, 15]])                            # unit 1 (row 0, col 1) is masked
    y = x.clone()
    y[:, :, 0:16, 16:32] += 5.0                                          # change only unit 1's pixels
    with torch.no_grad():
        for a, b in zip(model.forward_features(x, ids_keep=ids_keep), model.forward_features(y, ids_keep=ids_keep)):
            assert torch.equal(a, b)


def random_official_state_dict(cfg, seed=0):
    """Random tensors under official key names for a small config (the inverse of map_official_key, by hand)."""
    g = torch.Generator().manual_seed(seed)
    ours = HiViT(cfg).state_dict()
    n1, n2 = cfg.mlp_depth1, cfg.mlp_depth2
    sd = {}
    for k, v in ours.items():
        if k.startswith("stage1.") or k.startswith("stage2."):
            stage, j, rest = k.split(".", 2)
            i = int(j) if stage == "stage1" else n1 + 1 + int(j)
            rest = rest.replace("norm.", "norm2.")
            k = f"blocks.{i}.{rest}"
        elif k.startswith("merge1."):
            k = f"blocks.{n1}." + k[len("merge1."):]
        elif k.startswith("merge2."):
            k = f"blocks.{n1 + n2 + 1}." + k[len("merge2."):]
        elif k.startswith("blocks."):
            _, j, rest = k.split(".", 2)
            k = f"blocks.{int(j) + n1 + n2 + 2}.{rest}"
        sd[k] = torch.randn(v.shape, generator=g) * 0.2
    sd["relative_position_index"] = torch.zeros(16, 16, dtype=torch.long)   # derived buffer: accepted, ignored
    return sd


def test_load_official_matches_independent_official_forward():
    cfg = HiViTConfig(img_size=64, embed_dim=128, mlp_depth1=2, mlp_depth2=1, depth=2, num_heads=2, num_classes=7)
    sd = random_official_state_dict(cfg)
    model = HiViT(cfg).eval()
    ignored = load_official(model, {"model": sd})
    assert ignored == ["relative_position_index"]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = official_hivit_logits(sd, x, n1=2, n2=1, heads=2)
        torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("preset, layout", [("hivit_t", "hivit_tiny"), ("hivit_s", "hivit_small"),
                                            ("hivit_b", "hivit_base"), ("hivit_l", "hivit_large")])
def test_official_key_listing_loads_strictly(preset, layout):
    """Every official key of the released layout maps onto our model with the listed shape, none left over."""
    model = meta_model(PRESETS[preset])
    sd = {k: torch.empty(shape, dtype=getattr(torch, dtype), device="meta")
          for k, shape, dtype in official_layout(layout)["keys"]}
    assert load_official(model, sd) == ["relative_position_index"]


def test_load_official_errors_name_the_key():
    cfg = HiViTConfig(img_size=64, embed_dim=128, mlp_depth1=2, mlp_depth2=1, depth=2, num_heads=2, num_classes=7)
    sd = random_official_state_dict(cfg)
    missing = {k: v for k, v in sd.items() if k != "blocks.5.attn.qkv.weight"}
    with pytest.raises(KeyError, match=r"blocks\.0\.attn\.qkv\.weight"):  # reported under our name
        load_official(HiViT(cfg), missing)
    extra = dict(sd, **{"blocks.9.attn.qkv.weight": torch.zeros(1)})
    with pytest.raises(KeyError, match=r"unexpected keys \[.blocks\.9\.attn\.qkv\.weight"):
        load_official(HiViT(cfg), extra)
    wrong = dict(sd, head=None)
    wrong.pop("head")
    wrong["head.weight"] = torch.zeros(5, 128)
    with pytest.raises(ValueError, match=r"head\.weight: checkpoint \(5, 128\) vs model \(7, 128\)"):
        load_official(HiViT(cfg), wrong)
    # pre-training-only keys are listed and ignored; a fine-tuning start may leave head/fc_norm at init
    pre = {k: v for k, v in sd.items() if not k.startswith(("head.", "fc_norm."))}
    pre["mask_token"] = torch.zeros(1, 1, 128)
    ignored = load_official(HiViT(cfg), pre, allow_missing=("head.", "fc_norm."))
    assert "mask_token" in ignored


# ---- behaviour: gradients, sizes, errors, mask tokens ----

def test_every_parameter_gets_a_gradient_and_outputs_are_finite():
    torch.manual_seed(0)
    model = HiViT(HiViTConfig(**{**vars(PRESETS["tiny"]), "drop_path_rate": 0.1, "layer_scale": 0.1}))
    out = model(torch.randn(2, 3, 64, 64))
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("size", [64, 224, 256, 512, (64, 96)])
def test_input_sizes(size):
    h, w = (size, size) if isinstance(size, int) else size
    model = HiViT(PRESETS["tiny"]).eval()
    with torch.no_grad():
        f4, f8, *_, f16 = model.forward_features(torch.randn(1, 3, h, w))
        assert f16.shape == (1, (h // 16) * (w // 16), 64)
        assert hivit.units_to_map(f4, (h // 16, w // 16)).shape == (1, 16, h // 4, w // 4)
        assert torch.isfinite(model(torch.randn(1, 3, h, w))).all()


def test_bad_size_error_says_which_sizes_are_valid():
    with pytest.raises(ValueError, match=r"200x200 is not divisible by the 16-px unit.*192 or 208"):
        HiViT(PRESETS["tiny"])(torch.randn(1, 3, 200, 200))


def test_units_to_map_is_the_image_layout():
    # stem output reshaped by PatchEmbed then unfolded again must give back the conv map
    model = HiViT(PRESETS["tiny"]).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        units = model.patch_embed.proj(x)                                # (1, 16, 16, 24) image layout
        nested = model.patch_embed(x)                                    # LN is per position, so undo it by value
        ref = F.layer_norm(units.permute(0, 2, 3, 1), (16,), model.patch_embed.norm.weight,
                           model.patch_embed.norm.bias, 1e-6).permute(0, 3, 1, 2)
        torch.testing.assert_close(hivit.units_to_map(nested, (4, 6)), ref)


def test_mask_token_path_replaces_masked_stage3_inputs():
    torch.manual_seed(0)
    model = HiViT(PRESETS["tiny"]).eval()
    x = torch.randn(2, 3, 64, 64)
    mask = torch.zeros(2, 16)
    mask[:, 3] = 1
    token = torch.randn(1, 1, 64)
    y = x.clone()
    y[:, :, 0:16, 48:64] = 0                                             # unit 3's pixels
    with torch.no_grad():
        a = model.forward_features(x, mask=mask, mask_token=token)
        b = model.forward_features(y, mask=mask, mask_token=token)
    torch.testing.assert_close(a[-1], b[-1])                             # stage 3 never sees unit 3's pixels
    assert not torch.allclose(a[0], b[0])                                # ... but stages 1-2 do (documented)
    with pytest.raises(ValueError, match="together"):
        model.forward_features(x, mask=mask)


def test_init_pos_embed_sincos():
    model = HiViT(PRESETS["tiny"])
    model.init_pos_embed_sincos()
    assert torch.equal(model.absolute_pos_embed[0], hivit.sincos_pos_embed_2d(64, 4, 4))
    assert model.absolute_pos_embed.requires_grad
    vit = VisionTransformer(VIT_PRESETS["vit_tiny"])
    vit.init_pos_embed_sincos()
    assert torch.equal(vit.pos_embed[0], hivit.sincos_pos_embed_2d(64, 4, 4))


def test_sincos_table_layout():
    t = hivit.sincos_pos_embed_2d(8, 2, 3)                                # dim 8: [sin c, cos c | sin r, cos r]
    assert t.shape == (6, 8)
    torch.testing.assert_close(t[4, :4], torch.tensor([1.0, 1.0, 1.0, 1.0]).mul(torch.tensor(
        [torch.sin(torch.tensor(1.0)), torch.sin(torch.tensor(0.01)), torch.cos(torch.tensor(1.0)),
         torch.cos(torch.tensor(0.01))])))                                # unit 4 = row 1, col 1
    torch.testing.assert_close(t[2, 4:], torch.tensor([0.0, 0.0, 1.0, 1.0]))   # row 0


def test_resize_pos_embed_identity_and_quirk():
    table = torch.randn(1, 196, 8)
    assert hivit.resize_pos_embed(table, (14, 14)) is table
    quirk = hivit.resize_pos_embed(table, (14, 14), force=True)          # official pixel MIM: resampled at 14.1/14
    assert quirk.shape == table.shape and not torch.allclose(quirk, table)
    assert hivit.resize_pos_embed(table, (32, 20)).shape == (1, 640, 8)


def test_vit_seam_and_cls_token():
    torch.manual_seed(0)
    cfg = VIT_PRESETS["vit_tiny"]
    vit = VisionTransformer(cfg).eval()
    x = torch.randn(2, 3, 64, 64)
    ids_keep = torch.rand(2, 16).argsort(dim=1)[:, :4]
    with torch.no_grad():
        outs = vit.forward_features(x, ids_keep=ids_keep)
        assert len(outs) == cfg.depth and outs[-1].shape == (2, 4, 64)
        assert vit(x).shape == (2, 10)
    clip_like = VisionTransformer(hivit.ViTConfig(**{**vars(cfg), "class_token": True, "pre_norm": True,
                                                     "quick_gelu": True, "ln_eps": 1e-5}))
    out = clip_like.forward_features(x)[-1]
    assert out.shape == (2, 16, 64)
    out.sum().backward()
    assert clip_like.cls_token.grad is not None


def test_smoke_demo_runs():
    import runpy
    import contextlib
    import io
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        runpy.run_path(os.path.join(os.path.dirname(__file__), "..", "hivit.py"), run_name="__main__")
    assert "hivit_b      66.419M" in buf.getvalue()


def test_drop_path_drops_whole_samples_and_keeps_the_expectation():
    torch.manual_seed(0)
    dp = hivit.DropPath(0.25)
    x = torch.ones(4000, 3, 5)
    y = dp(x)
    per_sample = y.flatten(1)
    kept = (per_sample != 0).all(dim=1)
    assert ((per_sample == 0).all(dim=1) | kept).all()                   # a sample is dropped entirely or kept
    assert torch.allclose(per_sample[kept], torch.full_like(per_sample[kept], 1 / 0.75))   # rescaled by 1/keep
    assert abs(kept.float().mean().item() - 0.75) < 0.03                 # keep probability
    assert torch.equal(dp.eval()(x), x)                                  # identity at eval time
    assert hivit.drop_path_rates(0.3, 4) == pytest.approx([0.0, 0.1, 0.2, 0.3])   # linear, as torch.linspace


def test_bad_ids_keep_is_a_clear_error():
    model = HiViT(PRESETS["tiny"])
    x = torch.randn(2, 3, 64, 64)
    with pytest.raises(ValueError, match=r"outside \[0, 16\)"):
        model.forward_features(x, ids_keep=torch.tensor([[0, 16], [1, 2]]))
    with pytest.raises(ValueError, match="integer tensor"):
        model.forward_features(x, ids_keep=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="integer tensor"):
        VisionTransformer(VIT_PRESETS["vit_tiny"]).forward_features(x, ids_keep=torch.zeros(1, 3, dtype=torch.long))


def test_dropped_units_on_the_meta_device():
    """FLOP counting (bench.py) runs the seam on meta tensors: no value checks may read them."""
    model = meta_model(PRESETS["hivit_b"])
    ids_keep = torch.empty(1, 49, dtype=torch.long, device="meta")
    out = model.forward_features(torch.empty(1, 3, 224, 224, device="meta"), ids_keep=ids_keep)
    assert out[-1].shape == (1, 49, 512)


def test_ape_quirk_runs_through_the_model():
    """cfg.ape_quirk (library only; official `interpolate_pos_encoding` in masked pixel pre-training): with units
    dropped, the stage-3 input carries the table resampled at (G+0.1)/G, gathered; without dropping, or with the
    quirk off, the raw table. How to use it: build from `replace(preset, ape_quirk=True)`."""
    torch.manual_seed(0)
    cfg = replace(PRESETS["tiny"], ape_quirk=True)
    model = HiViT(cfg).eval()
    ids_keep = torch.tensor([[0, 5, 9, 15]])
    resampled = hivit.resize_pos_embed(model.absolute_pos_embed, (4, 4), force=True)   # (1, 16, C)
    torch.testing.assert_close(model.pos_embed_for((4, 4), ids_keep), resampled[:, ids_keep[0]])
    assert torch.equal(model.pos_embed_for((4, 4)), model.absolute_pos_embed)
    plain = HiViT(PRESETS["tiny"]).eval()
    plain.load_state_dict(model.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert not torch.allclose(model.forward_features(x, ids_keep=ids_keep)[-1],
                                  plain.forward_features(x, ids_keep=ids_keep)[-1])
        assert torch.equal(model.forward_features(x)[-1], plain.forward_features(x)[-1])


def test_relative_bias_at_another_grid_is_the_resized_table():
    """At a grid other than the table's, the bias is read from the table resized to (2Hp-1, 2Wp-1): with a table
    that is a linear function of (drow, dcol), the resized table is the same function on the new offsets."""
    attn = hivit.Attention(8, num_heads=1, rpe_grid=(4, 4))
    d = torch.arange(-3, 4, dtype=torch.float32)
    with torch.no_grad():
        attn.relative_position_bias_table.copy_((d[:, None] * 0 + 1.0).expand(7, 7).reshape(49, 1))   # constant
    index = hivit.relative_position_index((6, 6))[None]
    bias = attn.relative_bias(index, (6, 6))
    assert bias.shape == (1, 1, 36, 36)
    torch.testing.assert_close(bias, torch.ones_like(bias))             # a constant table stays constant
    same = attn.relative_bias(hivit.relative_position_index((4, 4))[None], (4, 4))
    assert torch.equal(same, torch.ones(1, 1, 16, 16))


def test_no_weight_decay_names_are_parameter_names():
    """finetune.py's optimizer looks these names up: each must be a real parameter of the model it came from."""
    models = [HiViT(PRESETS["tiny"]), HiViT(replace(PRESETS["tiny"], rpe=False)),
              VisionTransformer(VIT_PRESETS["vit_tiny"]),
              VisionTransformer(replace(VIT_PRESETS["vit_tiny"], class_token=True))]
    for model in models:
        names = model.no_weight_decay()
        assert names and names <= set(dict(model.named_parameters())), names - set(dict(model.named_parameters()))
    assert {"absolute_pos_embed", "blocks.1.attn.relative_position_bias_table"} <= models[0].no_weight_decay()
    assert models[3].no_weight_decay() == {"pos_embed", "cls_token", "cls_pos_embed"}


def test_seam_lists_every_stage3_block_and_select_units_matches_indexing():
    """forward_features = [f4, f8, block 1, ..., block D]; select_units equals plain per-sample indexing, for
    (B, L) unit indices and for (B, nW, m) indices inside windows (fast_itpn.py)."""
    torch.manual_seed(0)
    model = HiViT(replace(PRESETS["tiny"], depth=3)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = model.forward_features(x)
        units, grid = model.embed_units(x)
        _, _, tokens = model.forward_early(units)
        blocks = model.forward_stage3(tokens + model.pos_embed_for(grid), grid_hw=grid)
    assert len(feats) == 2 + 3 and all(torch.equal(a, b) for a, b in zip(feats[2:], blocks))
    t = torch.randn(2, 6, 4, 4, 5)
    ids = torch.tensor([[5, 0, 2], [1, 1, 4]])
    assert torch.equal(hivit.select_units(t, ids), torch.stack([t[b, ids[b]] for b in range(2)]))
    w = torch.randn(2, 3, 7, 5)                                           # (B, nW, n, C)
    idx = torch.randint(0, 7, (2, 3, 4))                                  # (B, nW, m)
    ref = torch.stack([torch.stack([w[b, j, idx[b, j]] for j in range(3)]) for b in range(2)])
    assert torch.equal(hivit.select_units(w, idx), ref)


# ---- reliability: checkpoint files, configs, inputs ----

@pytest.mark.parametrize("content, expected", [
    (None, "not found: no such file"),
    ("folder", "is a folder"),
    (lambda p: open(p, "wb").write(os.urandom(256)), "is not a PyTorch checkpoint or it is truncated"),
    (lambda p: open(p, "w").write("hello"), "is not a PyTorch checkpoint or it is truncated"),
    (lambda p: torch.save(torch.ones(3), p), "holds a Tensor, not a checkpoint dict"),
    (lambda p: torch.save([torch.ones(3)], p), "holds a list, not a checkpoint dict"),
    (lambda p: torch.save({"args": __import__("argparse").Namespace(model="x")}, p), "pickled Python objects")])
def test_read_checkpoint_gives_one_message_per_kind_of_bad_file(tmp_path, content, expected):
    path = str(tmp_path / "thing.pth")
    if content == "folder":
        os.mkdir(path)
    elif content is not None:
        content(path)
    with pytest.raises(ValueError, match=f"^teacher '{path}'.*{expected}"):
        hivit.read_checkpoint(path, what="teacher")


def test_read_checkpoint_truncated_file_and_good_file(tmp_path):
    path = str(tmp_path / "ckpt.pth")
    torch.save({"model": {"w": torch.arange(1000.0)}, "step": 3}, path)
    assert hivit.read_checkpoint(path)["step"] == 3
    blob = open(path, "rb").read()
    open(path, "wb").write(blob[: len(blob) // 2])                        # an interrupted copy
    with pytest.raises(ValueError, match="not a PyTorch checkpoint or it is truncated"):
        hivit.read_checkpoint(path)


@pytest.mark.parametrize("thing, expected", [
    ("model.pth", r"got the str 'model.pth': read the file first, hivit.read_checkpoint\(path\)"),
    (None, "got a NoneType"), (torch.zeros(3), "got a Tensor"), ({0: torch.zeros(3)}, "non-string keys"),
    ({"model": {"head.weight": [1.0, 2.0]}}, r"entries that are not tensors: \['head.weight'\]")])
def test_load_official_says_it_expects_a_state_dict(thing, expected):
    with pytest.raises(ValueError, match=expected):
        load_official(HiViT(PRESETS["tiny"]), thing)


@pytest.mark.parametrize("change, field", [
    (dict(num_heads=3), "num_heads=3 must be >= 1 and divide embed_dim"), (dict(num_heads=0), "num_heads=0"),
    (dict(depth=0), "depth=0 must be >= 1"), (dict(mlp_depth1=-1), "mlp_depth1=-1 must be >= 0"),
    (dict(mlp_depth2=-2), "mlp_depth2=-2"), (dict(embed_dim=66, num_heads=1), "embed_dim=66 must be a positive "
                                                                             "multiple of 4"),
    (dict(img_size=72), "img_size=72 must be a positive multiple of the 16-px unit"), (dict(img_size=0), "img_size=0"),
    (dict(ape_size=40), "ape_size=40"), (dict(drop_path_rate=1.0), "drop_path_rate=1.0 must be in"),
    (dict(ln_eps=0.0), "ln_eps=0.0 must be > 0"), (dict(num_classes=-1), "num_classes=-1"),
    (dict(mlp_ratio=0.0), "mlp_ratio=0.0"), (dict(bridge_mlp_ratio=-1.0), "bridge_mlp_ratio=-1.0"),
    (dict(layer_scale=-0.1), "layer_scale=-0.1")])
def test_hivit_constructor_names_the_bad_field_and_the_fix(change, field):
    with pytest.raises(ValueError, match=r"^invalid HiViTConfig: " + re.escape(field)):
        HiViT(replace(PRESETS["tiny"], **change))


def test_vit_constructor_checks_its_config_and_lists_every_problem():
    with pytest.raises(ValueError, match=r"img_size=72 must be a positive multiple of patch_size"):
        VisionTransformer(replace(VIT_PRESETS["vit_tiny"], img_size=72))
    with pytest.raises(ValueError, match=r"^invalid ViTConfig: num_heads=5 .*; depth=0 must be >= 1"):
        VisionTransformer(replace(VIT_PRESETS["vit_tiny"], num_heads=5, depth=0))
    with pytest.raises(ValueError, match="width divisible by 4"):                 # MIM's sin-cos start
        VisionTransformer(replace(VIT_PRESETS["vit_tiny"], embed_dim=66, num_heads=1)).init_pos_embed_sincos()


def test_image_dtypes_other_than_the_models_name_the_fix():
    model, vit = HiViT(PRESETS["tiny"]).eval(), VisionTransformer(VIT_PRESETS["vit_tiny"]).eval()
    x = torch.randn(1, 3, 32, 32)
    for m in (model, vit):
        with pytest.raises(ValueError, match=r"images are torch.uint8 .* x.float\(\) / 255"):
            m(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
        with pytest.raises(ValueError, match="images are torch.float64 but the model's weights are torch.float32"):
            m.forward_features(x.double())
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):   # bf16 input under autocast: fine
            assert torch.isfinite(m(x.bfloat16()).float()).all()
    with torch.no_grad():
        assert torch.allclose(model.double()(x.double()), model.float()(x).double(), atol=1e-4)   # a float64 model


def test_ids_keep_without_a_unit_is_refused():
    with pytest.raises(ValueError, match="keeps no unit of this 4-unit image"):
        HiViT(PRESETS["tiny"]).forward_features(torch.randn(2, 3, 32, 32), ids_keep=torch.zeros(2, 0).long())


def test_ln_eps_reaches_every_layernorm_and_ape_size_sets_the_ape_table_alone():
    cfg = replace(PRESETS["tiny"], img_size=128, ape_size=64, ln_eps=1e-5)
    model = HiViT(cfg)
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    # stem, stage-1 block, merge 1, stage-2 block, merge 2, 2 x 2 in the attention blocks, fc_norm
    assert len(norms) == 1 + 1 + 1 + 1 + 1 + 2 * 2 + 1 and all(m.eps == 1e-5 for m in norms)
    assert all(m.eps == hivit.LN_EPS for m in HiViT(PRESETS["tiny"]).modules() if isinstance(m, nn.LayerNorm))
    assert model.absolute_pos_embed.shape == (1, 4 * 4, 64)               # APE: the 64-px grid
    assert model.blocks[0].attn.relative_position_bias_table.shape == (15 * 15, 2)   # RPE: the 128-px grid
    model.init_pos_embed_sincos()
    assert torch.equal(model.absolute_pos_embed[0], hivit.sincos_pos_embed_2d(64, 4, 4))
    with torch.no_grad():                                                 # the 4x4 table is resized to 8x8 units
        torch.testing.assert_close(model.pos_embed_for((8, 8)), hivit.resize_pos_embed(model.absolute_pos_embed,
                                                                                        (8, 8)))
        assert torch.isfinite(model(torch.randn(1, 3, 128, 128))).all()


def test_keep_attention_stores_the_softmax_and_leaves_the_output_alone():
    """Switch on: the output is unchanged and `last_attention` is softmax(q k^T / sqrt(hd) + bias), recomputed here
    from the block's own qkv weights, with the bias read off the table by explicit (drow, dcol) loops."""
    torch.manual_seed(0)
    g, heads, c = 3, 2, 8
    attn = hivit.Attention(c, num_heads=heads, rpe_grid=(g, g))
    nn.init.normal_(attn.relative_position_bias_table)
    x = torch.randn(2, g * g, c)
    index = hivit.relative_position_index((g, g))[None]
    with torch.no_grad():
        off = attn(x, rpe_index=index, grid_hw=(g, g))
        attn.keep_attention = True
        on = attn(x, rpe_index=index, grid_hw=(g, g))
    torch.testing.assert_close(on, off, rtol=0, atol=1e-6)
    w_q, w_k, _ = attn.qkv.weight.detach().split(c)                       # (C, C) each
    b_q, b_k, _ = attn.qkv.bias.detach().split(c)
    table = attn.relative_position_bias_table.detach()
    expected = torch.zeros(2, heads, g * g, g * g)
    hd = c // heads
    for h in range(heads):
        q = x @ w_q[h * hd:(h + 1) * hd].t() + b_q[h * hd:(h + 1) * hd]     # (B, N, hd)
        k = x @ w_k[h * hd:(h + 1) * hd].t() + b_k[h * hd:(h + 1) * hd]
        for i in range(g * g):
            for j in range(g * g):
                dr, dc = i // g - j // g, i % g - j % g                   # query minus key, row-major units
                bias = table[(dr + g - 1) * (2 * g - 1) + dc + g - 1, h]
                expected[:, h, i, j] = (q[:, i] * k[:, j]).sum(-1) / hd ** 0.5 + bias
    expected = expected.softmax(dim=-1)
    torch.testing.assert_close(attn.last_attention, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(attn.last_attention.sum(-1), torch.ones(2, heads, g * g))
    attn(x, rpe_index=index, grid_hw=(g, g)).sum().backward()            # with grad on: the stored map is detached
    assert not attn.last_attention.requires_grad and attn.last_attention.grad_fn is None
