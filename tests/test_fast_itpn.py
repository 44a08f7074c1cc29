"""Oracles for fast_itpn.py: official sizes and key layout, token-wise forms of the conv ops, an independent official
forward, token migration bookkeeping, the gathering limiting case, gradients, input sizes."""
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import fast_itpn
from hivit import count_params as count_model_params
from hivit import map_official_key, resize_pos_embed
from hivit import map_to_units, select_units
from fast_itpn import (PRESETS, FastiTPN, load_official,
                       migration_schedule, replenish, select_migrants, window_shape)
from conftest import official_fast_itpn_logits, official_layout

TINY = PRESETS["tiny"]


def count_params(cfg):
    return count_model_params(FastiTPN, cfg)


def tiny(**overrides):
    torch.manual_seed(0)
    return FastiTPN(replace(TINY, **overrides)).eval()


# ---- 1. sizes: released models and the paper's counts ----

@pytest.mark.parametrize("name, layout, img_size", [
    ("fast_itpn_t", "fast_itpn_tiny", 224), ("fast_itpn_s", "fast_itpn_small", 224),
    ("fast_itpn_b", "fast_itpn_base", 224), ("fast_itpn_l", "fast_itpn_large", 224),
    ("fast_itpn_b", "fast_itpn_base_512", 512), ("fast_itpn_l", "fast_itpn_large_640", 640),
])
def test_parameter_counts_match_official(name, layout, img_size):
    assert count_params(replace(PRESETS[name], img_size=img_size)) == official_layout(layout)["n_params"]


@pytest.mark.parametrize("name, img_size, paper_m", [
    ("fast_itpn_t", 224, 24.2), ("fast_itpn_s", 384, 40.0), ("fast_itpn_b", 512, 85.2), ("fast_itpn_l", 384, 312.3),
])
def test_paper_counts_include_the_larger_position_table(name, img_size, paper_m):
    # The paper's 40.0/85.2/312.3M are not the 224-px counts (39.903/84.825/312.017M): they match only when the
    # position embedding is counted at 384/512/384 px (the released builders' counts). The paper rounds to 0.1M.
    assert round(count_params(replace(PRESETS[name], img_size=img_size)) / 1e6, 1) == paper_m


# ---- 2. token-wise forms of the conv ops (paper: ConvMLP = per-pixel MLP; conv merge = concat + linear) ----

def test_conv_mlp_block_equals_tokenwise_linear_form():
    torch.manual_seed(0)
    blk = fast_itpn.ConvMLPBlock(16, mlp_ratio=3.0)
    for p in blk.parameters():                                            # non-trivial norms too
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 16, 8, 8)
    t = x.permute(0, 2, 3, 1)                                             # (B, h, w, c): one token per pixel
    mlp = blk.mlp
    h = F.layer_norm(t, (16,), blk.norm.weight, blk.norm.bias, eps=1e-6)
    h = F.gelu(F.linear(h, mlp.fc1.weight[:, :, 0, 0], mlp.fc1.bias))   # 1x1 conv weight (out, in, 1, 1) = Linear
    h = F.layer_norm(h, (48,), mlp.ffn_ln.weight, mlp.ffn_ln.bias, eps=1e-6)
    ref = t + F.linear(h, mlp.fc2.weight[:, :, 0, 0], mlp.fc2.bias)
    torch.testing.assert_close(blk(x).permute(0, 2, 3, 1), ref, rtol=1e-5, atol=1e-5)


def test_conv_merge_equals_concat_then_linear():
    torch.manual_seed(0)
    merge = fast_itpn.ConvPatchMerge(8)
    torch.nn.init.normal_(merge.norm.weight, mean=1.0, std=0.3)
    x = torch.randn(2, 8, 8, 8)
    t = F.layer_norm(x.permute(0, 2, 3, 1), (8,), merge.norm.weight, merge.norm.bias, eps=1e-6)   # (B, H, W, c)
    t = t.reshape(2, 4, 2, 4, 2, 8).permute(0, 1, 3, 5, 2, 4)            # (B, H/2, W/2, c, 2, 2)
    w = merge.reduction.weight.reshape(16, 8 * 2 * 2)                     # (2c, c*2*2) matches (c, dy, dx) order
    ref = F.linear(t.reshape(2, 4, 4, 32), w, merge.reduction.bias)       # (B, H/2, W/2, 2c)
    torch.testing.assert_close(merge(x).permute(0, 2, 3, 1), ref, rtol=1e-5, atol=1e-5)


def test_units_stay_independent_before_stage3():
    # HiViT's property survives the conv rewrite: a pixel change in one 16-px unit changes only that unit's f4/f8.
    model = tiny()
    x = torch.randn(1, 3, 64, 64)
    y = x.clone()
    y[:, :, 16:32, 32:48] += 1.0                                          # unit (row 1, col 2) = index 6
    with torch.no_grad():
        (a4, a8, a16), (b4, b8, b16) = model.forward_early(x), model.forward_early(y)
    changed4 = (map_to_units(a4, 4) - map_to_units(b4, 4)).abs().flatten(2).amax(-1)[0]   # (N,)
    changed8 = (map_to_units(a8, 2) - map_to_units(b8, 2)).abs().flatten(2).amax(-1)[0]   # (N,)
    changed16 = (a16 - b16).abs().amax(-1)[0]
    for changed in (changed4, changed8, changed16):
        assert changed.nonzero().flatten().tolist() == [6]


# ---- 3. loading the released layout ----

def random_official_state_dict(layout, *, max_block=None, seed=0):
    """Random tensors for every (key, shape) of an official listing; `max_block` keeps blocks.{i} with i < it."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape, _ in layout["keys"]:
        if max_block is not None and key.startswith("blocks.") and int(key.split(".")[1]) >= max_block:
            continue
        t = torch.randn(shape, generator=g) * 0.05
        if key.endswith(("norm.weight", "norm1.weight", "norm2.weight", "ffn_ln.weight")):
            t = t + 1.0
        sd[key] = t
    return sd


@pytest.mark.parametrize("name, layout", [
    ("fast_itpn_t", "fast_itpn_tiny"), ("fast_itpn_s", "fast_itpn_small"), ("fast_itpn_b", "fast_itpn_base"),
    ("fast_itpn_l", "fast_itpn_large"), ("fast_itpn_b", "fast_itpn_base_512"), ("fast_itpn_l", "fast_itpn_large_640"),
])
def test_every_official_key_maps_onto_ours_one_to_one(name, layout):
    info = official_layout(layout)
    cfg = replace(PRESETS[name], img_size=info["input_size"])
    with torch.device("meta"):
        ours = {k: tuple(v.shape) for k, v in FastiTPN(cfg).state_dict().items()}
    mapped = {map_official_key(k, mlp_depth1=cfg.mlp_depth1, mlp_depth2=cfg.mlp_depth2): tuple(shape)
              for k, shape, _ in info["keys"]}
    assert mapped == ours                                                 # same keys, same shapes, nothing left over


def test_load_official_round_trip_and_independent_forward():
    # The released tiny layout cut after 2 stage-3 blocks (official blocks.0-5), so a real model builds in no time.
    sd = random_official_state_dict(official_layout("fast_itpn_tiny"), max_block=6)
    torch.manual_seed(0)
    model = FastiTPN(replace(PRESETS["fast_itpn_t"], depth=2)).eval()
    assert load_official(model, {"model": sd}) == []                     # nothing ignored, nothing missing
    ours = model.state_dict()
    assert torch.equal(ours["stage1.0.norm.weight"], sd["blocks.0.norm2.weight"])
    assert torch.equal(ours["merge2.reduction.weight"], sd["blocks.3.reduction.weight"])
    assert torch.equal(ours["blocks.1.mlp.w3.bias"], sd["blocks.5.mlp.w3.bias"])
    # 64-px input keeps the test fast: the official scripts would rebuild at 64 px with the table interpolated,
    # which is what our model does on the fly.
    x = torch.randn(2, 3, 64, 64)
    official = {**sd, "pos_embed": resize_pos_embed(sd["pos_embed"], (4, 4))}
    with torch.no_grad():
        torch.testing.assert_close(model(x), official_fast_itpn_logits(official, x, n1=1, n2=1, heads=6),
                                   rtol=1e-4, atol=1e-4)


def test_load_official_names_missing_and_wrong_shapes():
    sd = random_official_state_dict(official_layout("fast_itpn_tiny"), max_block=6)
    model = FastiTPN(replace(PRESETS["fast_itpn_t"], depth=2))
    missing = {k: v for k, v in sd.items() if k != "blocks.5.attn.q_bias"}
    with pytest.raises(KeyError, match="blocks.1.attn.q_bias"):          # official blocks.5 = our stage-3 block 1
        load_official(model, missing)
    with pytest.raises(KeyError, match=r"blocks\.6\.attn"):              # a deeper checkpoint, named as in the file
        load_official(model, random_official_state_dict(official_layout("fast_itpn_tiny"), max_block=7))
    small = FastiTPN(replace(PRESETS["fast_itpn_t"], depth=2, img_size=64))
    with pytest.raises(ValueError, match="pos_embed"):                    # built at 64 px, checkpoint at 224
        load_official(small, sd)


# ---- 4. token migration (Sec. 4.1) ----

def test_migration_schedule_hits_the_ratio():
    for ratio in (0.1, 0.2, 0.3, 0.4):                                    # Fig. 5's ratios, 64-token windows, 24 layers
        r = migration_schedule(64, 24, ratio)
        gone = torch.tensor(r).cumsum(0).float()                          # tokens gone after each layer
        assert len(r) == 24 and min(r) >= 0 and abs(gone.mean().item() - ratio * 64) <= 0.5
    assert migration_schedule(64, 24, 0.0) == [0] * 24
    with pytest.raises(ValueError):
        migration_schedule(64, 24, 0.5)                                   # would empty every window
    model = tiny()
    for bad in (dict(migration_ratio=0.5), dict(migration_ratio=-0.1), dict(attention="swin")):
        with pytest.raises(ValueError):
            model.set_acceleration(**bad)
    assert model.cfg.migration_ratio == 0 and model.cfg.attention == "global"   # unchanged after a refusal


def test_select_migrants_drops_the_most_redundant_a_token():
    keys = torch.randn(1, 1, 6, 8)
    keys[0, 0, 4] = keys[0, 0, 1] * 3.0                                   # A token 4 duplicates B token 1 (cosine 1)
    drop, partner, keep = select_migrants(keys, 1)
    assert drop.tolist() == [[[4]]] and partner.tolist() == [[[1]]]
    assert keep.tolist() == [[[0, 1, 2, 3, 5]]]                           # survivors keep raster order


def test_replenish_equation():
    tokens = torch.tensor([[[1.0], [2.0]]])                               # survivors at positions 0 and 3
    pos = torch.tensor([[0, 3]])
    store = [(torch.tensor([[1]]), torch.tensor([[2]]), torch.tensor([[[10.0]]])),   # layer 0: 1 left, partner 2
             (torch.tensor([[2]]), torch.tensor([[3]]), torch.tensor([[[100.0]]]))]  # layer 1: 2 left, partner 3
    full = replenish(tokens, pos, store, 4)
    assert full.flatten().tolist() == [1.0, 112.0, 102.0, 2.0]            # x_i = x_partner(final) + offset_i


def test_migration_zero_and_global_attention_is_the_plain_forward():
    model = tiny()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        f4, f8, tokens = model.forward_early(x)
        ref = tokens + model.pos_embed
        for blk in model.blocks:                                          # the plain forward, block by block
            ref = blk(ref)
        assert torch.equal(model.forward_features(x)[-1], ref)
        model.set_acceleration(migration_ratio=0.01)                      # windowed bookkeeping, r = 0 every layer
        torch.testing.assert_close(model.forward_features(x)[-1], ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", fast_itpn.ATTENTION_MODES)
def test_migration_fills_every_position_exactly_once(mode):
    model = tiny(num_classes=0, attention=mode, migration_ratio=0.3, depth=4, window_size=4)
    x = torch.randn(2, 3, 128, 128)                                       # 8x8 grid: 4 windows of 16 tokens
    schedule = migration_schedule(16, 4, 0.3)
    assert schedule == [2, 2, 2, 2]                                       # r = 2 * 0.3 * 16 / 5 = 1.92 per layer
    with torch.no_grad():
        _, _, tokens = model.forward_early(x)
        tokens = tokens + model.pos_embed_for((8, 8))
        kept, pos, store = model.forward_stage3(tokens, grid_hw=(8, 8))
        assert [s[0].shape[1] for s in store] == [r * 4 for r in schedule]   # r per window, in every layer
        assert kept.shape == (2, 64 - 4 * sum(schedule), 64)
        every = torch.cat([pos] + [s[0] for s in store], dim=1)           # (B, N): survivors + migrated
        assert torch.equal(every.sort(dim=1).values, torch.arange(64).expand(2, 64))
        for pos_drop, pos_partner, _ in store:                            # partners are in the same window
            window = lambda p: (p // 8 // 4) * 2 + p % 8 // 4             # noqa: E731, 2x2 windows of 4x4 tokens
            assert torch.equal(window(pos_drop), window(pos_partner))
        maps = model.forward_pyramid(x)                                   # full resolution despite migration
    assert {k: tuple(v.shape[-2:]) for k, v in maps.items()} == {"p4": (32, 32), "p8": (16, 16), "p16": (8, 8),
                                                                 "p32": (4, 4), "p64": (2, 2)}
    assert all(torch.isfinite(v).all() for v in maps.values())


# ---- 5. window attention and token gathering (Sec. 4.2) ----

def test_one_window_is_global_attention_and_gathering_is_a_mean_cls_token():
    model = tiny(window_size=4)                                           # 4x4 grid: one window covers the map
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        _, _, tokens = model.forward_early(x)
        tokens = tokens + model.pos_embed
        plain = tokens
        for blk in model.blocks:
            plain = blk(plain)
        model.set_acceleration(attention="window")
        torch.testing.assert_close(model.forward_stage3(tokens, grid_hw=(4, 4))[0], plain, rtol=1e-5, atol=1e-5)
        # documented limiting case: gathering == plain blocks on [mean token; tokens], first token dropped
        with_cls = torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1)   # (B, 1 + N, C)
        for blk in model.blocks:
            with_cls = blk(with_cls)
        model.set_acceleration(attention="gathering")
        torch.testing.assert_close(model.forward_stage3(tokens, grid_hw=(4, 4))[0], with_cls[:, 1:],
                                   rtol=1e-5, atol=1e-5)


def test_gathering_tokens_carry_global_context_one_layer_later():
    model = tiny()
    blk = model.blocks[0]
    x = torch.randn(1, 4, 5, 64)                                          # 4 windows: gathering token + 4 tokens
    pos = torch.arange(16).reshape(1, 4, 4)
    y = x.clone()
    y[0, 0, 3] += torch.randn(64)                                         # perturb one token of window 0 (not a
                                                                          # constant: LayerNorm would remove it)
    with torch.no_grad():
        for mode in ("window", "gathering", "global"):
            a, _, _ = blk.forward_windows(x, pos=pos, grid_w=4, mode=mode)
            b, _, _ = blk.forward_windows(y, pos=pos, grid_w=4, mode=mode)
            assert (a - b)[0, 0, 3].abs().amax() > 0                      # the perturbed token itself moved
            tokens_changed = bool((a - b)[0, 1:, 1:].abs().amax() > 0)    # tokens of windows 1-3
            assert tokens_changed == (mode == "global")                   # windows: never token-token across
        a, b = (blk.forward_windows(t, pos=pos, grid_w=4, mode="gathering")[0] for t in (x, y))
        assert ((a - b)[0, 1:, 0].abs().amax(-1) > 0).all()               # every gathering token saw window 0
        a2, b2 = (blk.forward_windows(t, pos=pos, grid_w=4, mode="gathering")[0] for t in (a, b))
        assert ((a2 - b2)[0, 1:, 1:].abs().amax(-1) > 0).all()            # ... and told its tokens one layer later


def test_hrpe_starts_at_zero_and_biases_window_attention_only():
    plain = tiny(attention="window")
    hrpe = tiny(attention="window", hrpe=True)
    hrpe.load_state_dict(plain.state_dict(), strict=False)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(hrpe(x), plain(x))                     # zero init: the released weights' outputs
        for blk in hrpe.blocks:
            blk.attn.relative_position_bias_table.normal_()
        assert not torch.allclose(hrpe(x), plain(x))
        hrpe.set_acceleration(attention="global")                         # global attention ignores the tables
        plain.set_acceleration(attention="global")
        torch.testing.assert_close(hrpe(x), plain(x))


# ---- 6. gradients, sizes ----

def test_gradients_reach_every_parameter_with_both_switches_on():
    model = tiny(num_classes=0, attention="gathering", migration_ratio=0.4, hrpe=True).train()
    maps = model.forward_pyramid(torch.randn(2, 3, 64, 64))
    sum(m.square().mean() for m in maps.values()).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []


def test_window_shape_rule():
    assert window_shape((14, 14), 8) == (7, 7) and window_shape((32, 40), 8) == (8, 8)
    assert window_shape((4, 6), 8) == (4, 6) and window_shape((1, 16), 8) == (1, 8)   # a 1-unit side: 1 token


@pytest.mark.parametrize("switches", [dict(attention="window"), dict(attention="gathering"),
                                      dict(attention="global", migration_ratio=0.2)])
def test_window_attention_never_silently_vanishes_at_208_px(switches):
    """208 px = 13 units: no window of 2..8 tokens divides 13, so windows would be 1 token wide (no mixing, no
    migration). Refused with the nearest sizes that work (192 / 224 px); the plain path runs at 208 px."""
    model = tiny(num_classes=0, window_size=8)
    x = torch.randn(1, 3, 208, 208)
    model.set_acceleration(**switches)
    with pytest.raises(ValueError, match=r"13-unit side \(208 px\).*192 px \(12 units\) or 224 px \(14 units\)"):
        model.forward_features(x)
    with pytest.raises(ValueError, match=r"13-unit side"):
        window_shape((16, 13), 8)
    model.set_acceleration(attention="global", migration_ratio=0.0)
    assert model.forward_features(x)[-1].shape == (1, 169, 64)


@pytest.mark.parametrize("size", [224, 512, 640])
def test_input_sizes_with_both_switches(size):
    model = tiny(num_classes=0, attention="gathering", migration_ratio=0.4)
    with torch.no_grad():
        maps = model.forward_pyramid(torch.randn(1, 3, size, size))
    assert maps["p4"].shape == (1, 32, size // 4, size // 4) and maps["p64"].shape[-1] == size // 64
    with pytest.raises(ValueError, match="divisible"):
        model.forward_features(torch.randn(1, 3, size + 8, size))


# ---- 7. the MIM seam and pre-training (Sec. 4.3) ----

def test_ids_keep_equals_full_encoding_then_select():
    # Early stages never cross a 16-px unit, so dropping after stage 2 is MAE-style dropping at the input: the
    # visible units' stage-1/2 features equal the full image's, and stage 3 sees only the visible tokens.
    model = tiny()
    x = torch.randn(2, 3, 64, 64)
    ids_keep = torch.rand(2, 16).argsort(dim=1)[:, :5]                    # (B, N_vis)
    with torch.no_grad():
        f4, f8, f16 = model.forward_features(x, ids_keep=ids_keep)      # [f4, f8, f16]: no per-block entries
        full4, full8, _ = model.forward_features(x)
        tokens = select_units(model.forward_early(x)[2] + model.pos_embed, ids_keep)
        for blk in model.blocks:
            tokens = blk(tokens)
    assert torch.equal(f4, select_units(full4, ids_keep)) and f16.shape == (2, 5, 64)
    assert torch.equal(f8, select_units(full8, ids_keep))
    torch.testing.assert_close(f16, tokens)
    model.set_acceleration(migration_ratio=0.4)
    with pytest.raises(ValueError, match="full grid"):
        model.forward_features(x, ids_keep=ids_keep)


def test_mask_without_a_mask_token_names_the_fix():
    model = tiny()                                                        # built without the stem mask token
    mask = torch.zeros(1, 16)
    mask[0, 6] = 1.0
    with pytest.raises(ValueError, match=r"mask_token=True"):
        model.forward_features(torch.randn(1, 3, 64, 64), mask=mask)
    with_token = FastiTPN(replace(TINY, num_classes=0), stem_mask_token=True)
    assert with_token.forward_features(torch.randn(1, 3, 64, 64), mask=mask)[-1].shape == (1, 16, 64)


@pytest.fixture
def teacher_file(tmp_path):
    import hivit
    torch.manual_seed(1)
    vit = hivit.VisionTransformer(hivit.VIT_PRESETS["vit_tiny"])          # 16-px patches: the student's unit grid
    path = tmp_path / "teacher.pth"
    torch.save({"model": vit.state_dict(), "config": {"num_heads": vit.cfg.num_heads}}, path)   # heads: not in a shape
    return str(path)


def build_pretrainer(arch, teacher_file):
    """As train.py builds it: METHODS[name](size preset, cfg=PRETRAIN_PRESETS[name], teacher_path=...)."""
    name = "fast_itpn_distill"
    return fast_itpn.METHODS[name](arch, cfg=fast_itpn.PRETRAIN_PRESETS[name], teacher_path=teacher_file)


def test_distillation_pretrainer_contract(teacher_file):
    torch.manual_seed(0)
    pre = build_pretrainer(replace(TINY, attention="gathering", migration_ratio=0.4), teacher_file)
    assert pre.encoder.cfg.attention == "global" and pre.encoder.cfg.migration_ratio == 0   # runs without both
    assert pre.cfg.distill_loss == "cosine"                               # Sec. 4.3
    out = pre(torch.randn(2, 3, 64, 64))
    assert out["mask"].shape == (2, 16) and out["mask"].sum(1).tolist() == [6.0, 6.0]   # round(75/196 * 16)
    assert out["pred"].shape == (2, 16, 64) and 0 <= out["loss"].item() <= 2
    out["loss"].backward()
    trainable = {n: p for n, p in pre.named_parameters() if p.requires_grad}
    assert not any(n.startswith("teacher.") for n in trainable)          # the teacher stays frozen
    assert [n for n, p in trainable.items() if p.grad is None or not p.grad.abs().sum() > 0] == []



def test_distillation_loss_is_one_minus_cosine_on_all_units_and_masked_pixels_reach_no_prediction(teacher_file):
    """Sec. 4.3 as built here: the loss is the mean over all B x N units of 1 - cos(pred, teacher target), computed
    by hand; stem masking hides a masked unit's pixels from every prediction (the teacher still sees them)."""
    torch.manual_seed(0)
    pre = build_pretrainer(TINY, teacher_file).eval()
    x = F.interpolate(torch.randn(2, 3, 8, 8), size=64, mode="bilinear")
    torch.manual_seed(5)
    out = pre(x)
    with torch.no_grad():
        target = pre.teacher(x)                                           # (B, N, T)
    pred = out["pred"]
    cos = (pred * target).sum(-1) / (pred.norm(dim=-1) * target.norm(dim=-1))   # (B, N)
    torch.testing.assert_close(out["loss"], (1 - cos).mean())
    mask = out["mask"]
    noisy = x + F.interpolate(mask.view(2, 1, 4, 4), scale_factor=16) * torch.randn_like(x)   # masked units only
    torch.manual_seed(5)                                                  # the same block mask
    out2 = pre(noisy)
    assert torch.equal(out2["mask"], mask) and 0 < mask.sum() < 32
    assert torch.equal(out2["pred"], pred)                                # no prediction saw the masked pixels
    assert not torch.equal(pre.teacher(noisy), target)                    # the noise was real

def test_distillation_pretrainer_overfits_one_batch(teacher_file):
    torch.manual_seed(0)
    pre = build_pretrainer(TINY, teacher_file)
    x = F.interpolate(torch.randn(2, 3, 4, 4), size=32, mode="bilinear")  # smooth 32-px images, 2 x 2 units
    opt = torch.optim.AdamW([p for p in pre.parameters() if p.requires_grad], lr=3e-3, weight_decay=0.0)
    losses = []
    for _ in range(20):
        torch.manual_seed(1)                                              # one batch: same images, same block mask
        loss = pre(x)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert min(losses[-3:]) < 0.5 * losses[0], losses


def test_stem_masking_hides_masked_pixels_from_every_level(teacher_file):
    pre = build_pretrainer(TINY, teacher_file).eval()
    x = torch.randn(1, 3, 64, 64)
    y = x.clone()
    y[:, :, 16:32, 32:48] = torch.randn(3, 16, 16)                       # new pixels in unit 6 only
    mask = torch.zeros(1, 16)
    mask[0, 6] = 1.0
    with torch.no_grad():
        a, b = (pre.encoder.forward_levels(t, mask=mask) for t in (x, y))
    assert all(torch.equal(p, q) for p, q in zip(a, b))                   # no leak, unlike iTPN's stage-3 token


def test_no_weight_decay_names_are_parameter_names():
    for model in (tiny(), tiny(hrpe=True), tiny(num_classes=0)):
        names = model.no_weight_decay()
        assert "pos_embed" in names and names <= set(dict(model.named_parameters())), names
    assert "blocks.0.attn.relative_position_bias_table" in tiny(hrpe=True).no_weight_decay()


def test_beit_mask_tokens_through_the_seam():
    """forward_features(mask=, mask_token=) as every backbone: masked units' stage-3 inputs become the token, so no
    stage-3 output depends on their pixels (f4 still does); mask_token without mask is refused."""
    model = tiny()
    x = torch.randn(1, 3, 64, 64)
    y = x.clone()
    y[:, :, 16:32, 32:48] = torch.randn(3, 16, 16)                       # new pixels in unit 6 only
    mask = torch.zeros(1, 16)
    mask[0, 6] = 1.0
    token = torch.randn(1, 1, 64)
    with torch.no_grad():
        a, b = (model.forward_features(t, mask=mask, mask_token=token) for t in (x, y))
        plain = model.forward_features(y)
    assert torch.equal(a[-1], b[-1]) and not torch.equal(b[-1], plain[-1])
    assert not torch.equal(a[0], b[0])                                    # stages 1-2 see the pixels (documented)
    with pytest.raises(ValueError, match="mask_token goes with mask"):
        model.forward_features(x, mask_token=token)


def test_distillation_pretrainer_keeps_the_official_head_names(teacher_file):
    """The head comes from itpn.PyramidDistillation but its keys stay at the pre-trainer's top level."""
    import itpn
    pre = build_pretrainer(TINY, teacher_file)
    assert isinstance(pre, itpn.PyramidDistillation)
    assert {k.split(".")[0] for k in pre.state_dict()} == {"teacher", "decoder_embed", "norm", "lm_head", "encoder"}
    assert "encoder.patch_embed.mask_token" in pre.state_dict()


# ---- 8. reliability: configs and inputs ----

@pytest.mark.parametrize("change, field", [
    (dict(num_heads=3), "num_heads=3 must be >= 1 and divide embed_dim"), (dict(depth=0), "depth=0 must be >= 1"),
    (dict(mlp_depth1=-1), "mlp_depth1=-1"), (dict(img_size=40), "img_size=40"), (dict(window_size=0), "window_size=0"),
    (dict(fpn_dim=0), "fpn_dim=0"), (dict(fpn_depth=-1), "fpn_depth=-1"),
    (dict(embed_dim=66, num_heads=1), "embed_dim=66 must be a positive multiple of 4")])
def test_constructor_names_the_bad_field(change, field):
    with pytest.raises(ValueError, match="^invalid FastiTPNConfig: " + field):
        tiny(**change)


def test_image_dtype_and_dense_input_size_messages():
    model = tiny(num_classes=0)
    with pytest.raises(ValueError, match=r"images are torch.uint8 .* x.float\(\) / 255"):
        model.forward_features(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
    with pytest.raises(ValueError, match="images are torch.float64"):
        model.forward_pyramid(torch.zeros(1, 3, 64, 64, dtype=torch.float64))
    with pytest.raises(ValueError, match="mode 'det' needs images of at least 64x64 px"):
        model.forward_pyramid(torch.zeros(1, 3, 32, 64))
    with torch.no_grad():
        assert model.forward_pyramid(torch.zeros(1, 3, 32, 32), mode="seg")["p32"].shape[-2:] == (1, 1)
