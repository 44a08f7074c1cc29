"""Shared pytest setup: import the top-level files, deterministic CPU runs, project DeprecationWarnings are errors."""
import os
import sys
import warnings

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
torch.set_num_threads(min(2, os.cpu_count() or 1))

# A DeprecationWarning raised from a project file is a bug (MAE's np.float broke when numpy removed it).
for module in ("hivit", "itpn", "fast_itpn", "mim", "train", "finetune", "detect_seg", "bench"):
    warnings.filterwarnings("error", category=DeprecationWarning, module=module)


# ---- helpers the test files import (`from conftest import ...`): one copy of each ----

import json

import pytest
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

# Listings of the released checkpoints' state_dicts (keys, shapes, dtypes, parameter counts), one JSON per file.
KEYS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "official_keys")


@pytest.fixture
def one_thread():
    """Tiny models are overhead-bound: one OpenMP thread ran the driver tests' runs up to ~10x faster than two on a
    loaded 2-core machine. A test file opts in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def read_log(out: str) -> list[dict]:
    """The records of a run's log.txt (one JSON object per line)."""
    with open(os.path.join(out, "log.txt")) as f:
        return [json.loads(line) for line in f]


def subprocess_env() -> dict:
    """Environment for a script run in a subprocess (torchrun): the project importable, one thread, no bars."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "PYTHONPATH": ROOT}


# Independent forwards of the released classifiers, written out on their own key names (flat blocks.{i}): the
# oracles that loading an official file must reproduce.

def official_hivit_logits(sd, x, *, n1, n2, heads):
    """The official HiViT / iTPN classifier (flat blocks.{i}, CLIP variants with gamma) written out on its keys."""
    def ln(t, p):
        return F.layer_norm(t, t.shape[-1:], sd[p + ".weight"], sd[p + ".bias"], 1e-6)

    def lin(t, p):
        return F.linear(t, sd[p + ".weight"], sd.get(p + ".bias"))

    x = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=4)
    b, c, hh, ww = x.shape
    hp, wp = hh // 4, ww // 4
    x = ln(x.view(b, c, hp, 4, wp, 4).permute(0, 2, 4, 3, 5, 1).reshape(b, hp * wp, 4, 4, c), "patch_embed.norm")
    for i in range(n1 + n2 + 2):
        p = f"blocks.{i}"
        if i in (n1, n1 + n2 + 1):                                        # Swin order: (0,0), (1,0), (0,1), (1,1)
            x = torch.cat([x[:, :, 0::2, 0::2], x[:, :, 1::2, 0::2], x[:, :, 0::2, 1::2], x[:, :, 1::2, 1::2]], -1)
            x = lin(ln(x, p + ".norm"), p + ".reduction")
        else:
            x = x + sd.get(p + ".gamma_2", 1.0) * lin(F.gelu(lin(ln(x, p + ".norm2"), p + ".mlp.fc1")), p + ".mlp.fc2")
    x = x[:, :, 0, 0, :] + sd["absolute_pos_embed"]
    n = x.shape[1]
    rows, cols = torch.meshgrid(torch.arange(hp), torch.arange(wp), indexing="ij")
    dr, dc = rows.flatten()[:, None] - rows.flatten()[None], cols.flatten()[:, None] - cols.flatten()[None]
    index = (dr + hp - 1) * (2 * wp - 1) + dc + wp - 1
    i = n1 + n2 + 2
    while f"blocks.{i}.norm1.weight" in sd:
        p = f"blocks.{i}"
        q, k, v = lin(ln(x, p + ".norm1"), p + ".attn.qkv").view(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4)
        att = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5 + \
            sd[p + ".attn.relative_position_bias_table"][index].permute(2, 0, 1)
        h = lin((att.softmax(-1) @ v).transpose(1, 2).reshape(b, n, -1), p + ".attn.proj")
        x = x + sd.get(p + ".gamma_1", 1.0) * h
        x = x + sd.get(p + ".gamma_2", 1.0) * lin(F.gelu(lin(ln(x, p + ".norm2"), p + ".mlp.fc1")), p + ".mlp.fc2")
        i += 1
    return lin(ln(x.mean(1), "fc_norm"), "head")


def official_fast_itpn_logits(sd, x, *, n1, n2, heads):
    """Independent forward written out on the official key names (`fast_itpn/modeling_finetune.py`'s model)."""
    ln = lambda t, p: F.layer_norm(t, t.shape[-1:], sd[p + ".weight"], sd[p + ".bias"], eps=1e-6)   # noqa: E731
    x = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=4).permute(0, 2, 3, 1)
    i = 0
    for stage_depth in (n1, n2):
        for _ in range(stage_depth):                                      # ConvMLP block as a per-pixel MLP
            p = f"blocks.{i}."
            h = F.gelu(F.linear(ln(x, p + "norm2"), sd[p + "mlp.fc1.weight"][:, :, 0, 0], sd[p + "mlp.fc1.bias"]))
            x = x + F.linear(ln(h, p + "mlp.ffn_ln"), sd[p + "mlp.fc2.weight"][:, :, 0, 0], sd[p + "mlp.fc2.bias"])
            i += 1
        p = f"blocks.{i}."                                                # LN per pixel, then the 2x2/2 conv
        x = F.conv2d(ln(x, p + "norm").permute(0, 3, 1, 2), sd[p + "reduction.weight"], sd[p + "reduction.bias"],
                     stride=2).permute(0, 2, 3, 1)
        i += 1
    x = x.flatten(1, 2) + sd["pos_embed"]                                 # (B, N, C)
    b, n, c = x.shape
    while f"blocks.{i}.norm1.weight" in sd:
        p = f"blocks.{i}."
        h = ln(x, p + "norm1")
        q = F.linear(h, sd[p + "attn.q_proj.weight"], sd[p + "attn.q_bias"]).reshape(b, n, heads, -1).transpose(1, 2)
        k = F.linear(h, sd[p + "attn.k_proj.weight"]).reshape(b, n, heads, -1).transpose(1, 2)
        v = F.linear(h, sd[p + "attn.v_proj.weight"], sd[p + "attn.v_bias"]).reshape(b, n, heads, -1).transpose(1, 2)
        a = ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).float().softmax(-1)
        h = F.linear((a @ v).transpose(1, 2).reshape(b, n, c), sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
        x = x + sd[p + "gamma_1"] * h
        h = ln(x, p + "norm2")
        h = F.silu(F.linear(h, sd[p + "mlp.w1.weight"], sd[p + "mlp.w1.bias"])) * \
            F.linear(h, sd[p + "mlp.w2.weight"], sd[p + "mlp.w2.bias"])
        x = x + sd[p + "gamma_2"] * F.linear(ln(h, p + "mlp.ffn_ln"), sd[p + "mlp.w3.weight"], sd[p + "mlp.w3.bias"])
        i += 1
    return F.linear(ln(x.mean(1), "fc_norm"), sd["head.weight"], sd["head.bias"])


def official_layout(name: str) -> dict:
    """An official state_dict listing (tests/official_keys/<name>.json): keys, shapes, dtypes, parameter counts."""
    path = os.path.join(KEYS_DIR, f"{name}.json")
    if not os.path.exists(path):
        pytest.fail(f"official key listing {path} not found: tests/official_keys/ is part of the repository")
    with open(path) as f:
        return json.load(f)


def gmacs(model, side: int = 224) -> float:
    """Forward GMACs of a (meta-device) model on one side x side image: torch's flop counter / 2."""
    counter = FlopCounterMode(display=False)
    with counter:
        model(torch.empty(1, 3, side, side, device="meta"))
    return counter.get_total_flops() / 2e9


# ---- the released det/seg backbones, written out on their own key names (an oracle independent of itpn.py) ----

import math


def official_dense_keys(*, c, n1, n2, depth, heads, fpn_dim, fpn_depth, layer_scale, rpe_side, mlp_ratio=4.0,
                        bridge_mlp_ratio=3.0):
    """key -> shape of the official det/seg backbone's state_dict, from its constructor (`seg/backbone/iTPN.py`;
    the det files `det/mmdet/models/backbones/iTPN_pixel.py`, `iTPN_CLIP.py` build the same names): a 196-entry APE,
    one flat `blocks.{i}` list (merges at n1 and n1 + n2 + 1), `relative_position_index` and per-block RPE tables
    for an rpe_side x rpe_side grid (None: no RPE), then the pyramid (`align_dim_*`, `split_*`, `block_*`,
    `fpn_modules.*`); layer scale (init_values) on backbone blocks only."""
    keys = {"absolute_pos_embed": (1, 196, c), "patch_embed.proj.weight": (c // 4, 3, 4, 4),
            "patch_embed.proj.bias": (c // 4,), "patch_embed.norm.weight": (c // 4,),
            "patch_embed.norm.bias": (c // 4,)}
    if rpe_side:
        keys["relative_position_index"] = (rpe_side ** 2, rpe_side ** 2)

    def c_mlp(p, dim, ratio, gamma):                                      # BlockWithRPE(num_heads=0)
        hidden = int(dim * ratio)
        keys.update({p + "norm2.weight": (dim,), p + "norm2.bias": (dim,), p + "mlp.fc1.weight": (hidden, dim),
                     p + "mlp.fc1.bias": (hidden,), p + "mlp.fc2.weight": (dim, hidden), p + "mlp.fc2.bias": (dim,)})
        if gamma:
            keys[p + "gamma_2"] = (dim,)

    i = 0
    for dim, n in ((c // 4, n1), (c // 2, n2)):
        for _ in range(n):
            c_mlp(f"blocks.{i}.", dim, bridge_mlp_ratio, layer_scale)
            i += 1
        keys.update({f"blocks.{i}.norm.weight": (4 * dim,), f"blocks.{i}.norm.bias": (4 * dim,),
                     f"blocks.{i}.reduction.weight": (2 * dim, 4 * dim)})
        i += 1
    for _ in range(depth):
        p = f"blocks.{i}."
        c_mlp(p, c, mlp_ratio, layer_scale)
        keys.update({p + "norm1.weight": (c,), p + "norm1.bias": (c,), p + "attn.qkv.weight": (3 * c, c),
                     p + "attn.qkv.bias": (3 * c,), p + "attn.proj.weight": (c, c), p + "attn.proj.bias": (c,)})
        if layer_scale:
            keys[p + "gamma_1"] = (c,)
        if rpe_side:
            keys[p + "attn.relative_position_bias_table"] = ((2 * rpe_side - 1) ** 2, heads)
        i += 1
    f = fpn_dim
    if c != f:
        keys.update({"align_dim_16tofpn.weight": (f, c), "align_dim_16tofpn.bias": (f,)})
    keys.update({"align_dim_16to8.weight": (f, c // 2), "align_dim_8to4.weight": (f, c // 4),
                 "split_16to8.norm.weight": (c,), "split_16to8.norm.bias": (c,),
                 "split_16to8.reduction.weight": (4 * f, c), "split_8to4.norm.weight": (f,),
                 "split_8to4.norm.bias": (f,), "split_8to4.reduction.weight": (4 * f, f)})
    for j in range(fpn_depth):
        c_mlp(f"block_16to8.{j}.", f, mlp_ratio, False)
        c_mlp(f"block_8to4.{j}.", f, mlp_ratio, False)
    for j in range(3):
        c_mlp(f"fpn_modules.{j}.", f, mlp_ratio, False)
    return keys


def official_random_weights(keys: dict, seed: int = 0) -> dict:
    """Random tensors for official keys: norms near 1, everything else small, so activations stay O(1)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in keys.items():
        if k.endswith("relative_position_index"):                          # derived buffer: any values, ignored
            sd[k] = torch.zeros(shape, dtype=torch.long)
        elif ".norm" in k and k.endswith(".weight"):                    # every LayerNorm weight, stem included
            sd[k] = 1 + 0.1 * torch.randn(shape, generator=g)
        else:
            sd[k] = 0.05 * torch.randn(shape, generator=g)
    return sd


def official_dense_forward(sd, x, *, n1, n2, heads, fpn_depth, mode, eps, rpe):
    """The released dense backbone's forward on its own key names, step by step as `seg/backbone/iTPN.py` writes it
    (and, for mode "det", the reference description of the det files: F channels at every level, stride 32/64 by
    average pooling). Returns {"p4": ..., "p32"} ("seg") or {"p4": ..., "p64"} ("det")."""
    def ln(t, p):
        return F.layer_norm(t, t.shape[-1:], sd[p + ".weight"], sd[p + ".bias"], eps)

    def lin(t, p):
        return F.linear(t, sd[p + ".weight"], sd.get(p + ".bias"))

    def c_mlp(t, p):                                                       # x + gamma_2 * mlp(norm2(x))
        y = lin(F.gelu(lin(ln(t, p + ".norm2"), p + ".mlp.fc1")), p + ".mlp.fc2")
        return t + (sd[p + ".gamma_2"] * y if p + ".gamma_2" in sd else y)

    def split(t, p):                                                       # PatchSplit: group k -> (k // 2, k % 2)
        b, n, h, w, _ = t.shape
        t = F.linear(ln(t, p + ".norm"), sd[p + ".reduction.weight"])
        return t.reshape(b, n, h, w, 2, 2, -1).permute(0, 1, 2, 4, 3, 5, 6).reshape(b, n, 2 * h, 2 * w, -1)

    b, _, hh, ww = x.shape
    hp, wp = hh // 16, ww // 16
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=4)
    t = t.view(b, -1, hp, 4, wp, 4).permute(0, 2, 4, 3, 5, 1).reshape(b, hp * wp, 4, 4, -1)
    t = ln(t, "patch_embed.norm")
    features, merges = [], (n1, n1 + n2 + 1)
    for i in range(n1 + n2 + 2):
        p = f"blocks.{i}"
        if i in merges:                                                   # PatchMerge: x0, x1, x2, x3, LN, Linear
            features.append(t)
            t = torch.cat([t[..., 0::2, 0::2, :], t[..., 1::2, 0::2, :], t[..., 0::2, 1::2, :],
                           t[..., 1::2, 1::2, :]], dim=-1)
            t = F.linear(ln(t, p + ".norm"), sd[p + ".reduction.weight"])
        else:
            t = c_mlp(t, p)
    t = t[..., 0, 0, :]
    ape = sd["absolute_pos_embed"]                                        # interpolate_pos_encoding
    n_ape, dim = ape.shape[1], ape.shape[2]
    if not (t.shape[1] == n_ape and hp == wp):
        g = math.sqrt(n_ape)
        ape = F.interpolate(ape.reshape(1, int(g), int(g), dim).permute(0, 3, 1, 2),
                            scale_factor=((hp + 0.1) / g, (wp + 0.1) / g), mode="bicubic")
        ape = ape.permute(0, 2, 3, 1).reshape(1, -1, dim)
    t = t + ape
    n = t.shape[1]
    rows, cols = torch.meshgrid(torch.arange(hp), torch.arange(wp), indexing="ij")
    coords = torch.stack([rows.flatten(), cols.flatten()])                # (2, N)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)      # (N, N, 2)
    index = (rel[..., 0] + hp - 1) * (2 * wp - 1) + rel[..., 1] + wp - 1
    for i in range(n1 + n2 + 2, len({k.split(".")[1] for k in sd if k.startswith("blocks.")})):
        p = f"blocks.{i}"
        qkv = lin(ln(t, p + ".norm1"), p + ".attn.qkv").reshape(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        att = (q * (q.shape[-1] ** -0.5)) @ k.transpose(-2, -1)
        if rpe:
            bias = sd[p + ".attn.relative_position_bias_table"][index.reshape(-1)].view(-1, n, n, heads)
            att = att + bias.permute(0, 3, 1, 2)
        fmax = torch.finfo(torch.float32).max
        att = att.float().clamp(min=-fmax, max=fmax).softmax(dim=-1)
        y = lin((att @ v).transpose(1, 2).reshape(b, n, -1), p + ".attn.proj")
        t = t + (sd[p + ".gamma_1"] * y if p + ".gamma_1" in sd else y)
        t = c_mlp(t, p)
    x16 = t[..., None, None, :]
    features.append(x16)
    outs = [lin(x16, "align_dim_16tofpn") if "align_dim_16tofpn.weight" in sd else x16]
    o = split(x16, "split_16to8") + F.linear(features[1], sd["align_dim_16to8.weight"])
    for j in range(fpn_depth):
        o = c_mlp(o, f"block_16to8.{j}")
    outs.append(o)
    o = split(o, "split_8to4") + F.linear(features[0], sd["align_dim_8to4.weight"])
    for j in range(fpn_depth):
        o = c_mlp(o, f"block_8to4.{j}")
    outs.append(o)
    outs = [c_mlp(o, f"fpn_modules.{i}") for i, o in enumerate(outs)]
    if mode == "seg":                                                     # each level + the backbone feature
        outs = [torch.cat([o, features[len(features) - i - 1]], dim=-1) for i, o in enumerate(outs)]
    maps = [o.reshape(b, hp, wp, *o.shape[-3:]).permute(0, 5, 1, 3, 2, 4).reshape(b, -1, hp * o.shape[-3],
                                                                                    wp * o.shape[-2]) for o in outs]
    out = {"p16": maps[0], "p8": maps[1], "p4": maps[2]}
    if mode == "seg":
        out["p32"] = F.max_pool2d(out["p16"], kernel_size=2, stride=2)
    else:
        out["p32"] = F.avg_pool2d(out["p16"], kernel_size=2, stride=2)
        out["p64"] = F.avg_pool2d(out["p32"], kernel_size=2, stride=2)
    return out

# ---- oracles shared by tests/test_detect_seg_*.py and bench.py (one copy each) ----

import numpy as np
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import MultiScaleRoIAlign


def naive_bilinear(value_map, x, y):
    """value_map (C, H, W); (x, y) normalised, pixel (i, j) centred at ((j + .5) / W, (i + .5) / H); zeros outside."""
    C, H, W = value_map.shape
    px, py = x * W - 0.5, y * H - 0.5
    x0, y0 = math.floor(px.item()), math.floor(py.item())
    fx, fy = px - x0, py - y0
    out = value_map.new_zeros(C)
    for yi, xi, wgt in ((y0, x0, (1 - fx) * (1 - fy)), (y0, x0 + 1, fx * (1 - fy)),
                        (y0 + 1, x0, (1 - fx) * fy), (y0 + 1, x0 + 1, fx * fy)):
        if 0 <= yi < H and 0 <= xi < W:
            out = out + wgt * value_map[:, yi, xi]
    return out


def naive_deform_sample(value, shapes, locations, weights):
    """Eq. 3 by loops: value (B, S, M, Dh), locations (B, Q, M, L, P, 2), weights (B, Q, M, L, P) -> (B, Q, M Dh)."""
    B, _, M, Dh = value.shape
    _, Q, _, L, P, _ = locations.shape
    starts = np.cumsum([0] + [h * w for h, w in shapes])
    rows = []
    for b in range(B):
        for q in range(Q):
            heads = []
            for m in range(M):
                acc = value.new_zeros(Dh)
                for lvl, (h, w) in enumerate(shapes):
                    vmap = value[b, starts[lvl]:starts[lvl + 1], m].T.reshape(Dh, h, w)
                    for p in range(P):
                        x, y = locations[b, q, m, lvl, p]
                        acc = acc + weights[b, q, m, lvl, p] * naive_bilinear(vmap, x, y)
                heads.append(acc)
            rows.append(torch.cat(heads))
    return torch.stack(rows).view(B, Q, M * Dh)


class _NoBackbone(torch.nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.out_channels = channels


@torch.no_grad()
def torchvision_twin(model) -> MaskRCNN:
    """A detect_seg.MaskRCNNLite's heads rebuilt with torchvision's own detection code (the oracle of
    tests/test_detect_seg_maskrcnn.py and the baseline of bench.py): torchvision's Mask R-CNN with our settings
    and OUR weights; every other setting at torchvision's default."""
    cfg, names = model.cfg, ["0", "1", "2", "3"]
    twin = MaskRCNN(
        _NoBackbone(model.in_channels), num_classes=None,        # given by the two predictors below (K + 1)
        rpn_anchor_generator=AnchorGenerator(sizes=tuple((cfg.anchor_scale * s,) for s in model.strides),
                                             aspect_ratios=(cfg.aspect_ratios,) * len(model.strides)),
        rpn_pre_nms_top_n_train=cfg.rpn_pre_nms_top_n[0], rpn_pre_nms_top_n_test=cfg.rpn_pre_nms_top_n[1],
        rpn_post_nms_top_n_train=cfg.rpn_post_nms_top_n[0], rpn_post_nms_top_n_test=cfg.rpn_post_nms_top_n[1],
        rpn_batch_size_per_image=cfg.rpn_batch_per_image, box_batch_size_per_image=cfg.roi_batch_per_image,
        box_roi_pool=MultiScaleRoIAlign(names, 7, cfg.roi_sampling_ratio),
        box_head=TwoMLPHead(model.in_channels * 49, cfg.box_fc_dim),
        box_predictor=FastRCNNPredictor(cfg.box_fc_dim, model.num_classes + 1),
        mask_roi_pool=MultiScaleRoIAlign(names, 14, cfg.roi_sampling_ratio),
        mask_head=MaskRCNNHeads(model.in_channels, [cfg.mask_dim] * 4, 1),
        mask_predictor=MaskRCNNPredictor(cfg.mask_dim, cfg.mask_dim, model.num_classes + 1))
    rpn_head, roi = twin.rpn.head, twin.roi_heads
    pairs = [(rpn_head.conv[0][0], model.rpn.head.conv), (rpn_head.cls_logits, model.rpn.head.objectness),
             (rpn_head.bbox_pred, model.rpn.head.deltas), (roi.box_head.fc6, model.box_head.fc6),
             (roi.box_head.fc7, model.box_head.fc7), (roi.box_predictor.cls_score, model.box_head.cls_score),
             (roi.mask_predictor.conv5_mask, model.mask_head.deconv)]
    pairs += [(roi.mask_head[i][0], conv) for i, conv in enumerate(model.mask_head.convs)]
    for dst, src in pairs:
        dst.weight.copy_(src.weight)
        dst.bias.copy_(src.bias)
    # torchvision also predicts deltas and a mask for class 0 (background); those rows stay random: never used.
    bbox, logits = roi.box_predictor.bbox_pred, roi.mask_predictor.mask_fcn_logits
    bbox.weight[4:], bbox.bias[4:] = model.box_head.bbox_pred.weight, model.box_head.bbox_pred.bias
    logits.weight[1:], logits.bias[1:] = model.mask_head.mask_logits.weight, model.mask_head.mask_logits.bias
    return twin
