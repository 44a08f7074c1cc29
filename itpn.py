"""iTPN: a HiViT backbone and a feature pyramid pre-trained together (masked image modeling on the pyramid).

Paper:
    Integrally Pre-Trained Transformer Pyramid Networks (Tian et al., CVPR 2023, arXiv 2211.12735 v1, with its
    supplementary material) and its journal version Fast-iTPN (TPAMI 2024, arXiv 2211.12735 v2, Sec. 3 = iTPN).

Implements:
    The iTPN backbone (HiViT in iTPN notation, from hivit.py), the C-MLP feature pyramid of Eq. 3 exactly as the
    released code builds it, its dense stride-4..64 outputs for detection/segmentation, iTPN on a plain ViT
    (supplementary Sec. 3), and three pre-training recipes: the paper's MIM + multi-stage MFM with an EMA teacher
    (Eq. 4, not in the released code), the official pixel recipe, and frozen-teacher (CLIP) distillation.
    `load_official` loads the released fine-tuning, pixel pre-training and CLIP pre-training checkpoints.

Sections:
    1. Config and presets                <-> paper Tab. 1 / supplementary Tab. 7 (iTPN-B 3-3-24, iTPN-L 2-2-40)
    2. Pyramid primitives (PatchSplit)   <-> Sec. 3.2 "up-sampling", Fig. 2
    3. Feature pyramid                   <-> Eq. 3, Fig. 2, supplementary Sec. 2 (C-MLP, no convolution)
    4. The iTPN model (+ plain ViT)      <-> Sec. 3.2, supplementary Sec. 3 / Tab. 11
    5. Dense outputs (strides 4..64)     <-> Sec. 4.3 (the pre-trained pyramid is the detection/segmentation neck)
    6. Official pixel recipe             <-> Sec. 3.3 (MIM on the summed pyramid), reference 2.3-2.4
    7. Paper method: MIM + MFM, EMA teacher <-> Eq. 4, Sec. 3.3
    8. Frozen-teacher distillation       <-> Sec. 3.4 (CLIP teacher), reference 3
    9. Loading official checkpoints      <-> released iTPN checkpoints
    10. __main__ smoke demo

Shapes:
    B batch, C stage-3 width (stage 1 = C/4, stage 2 = C/2), F pyramid width (fpn_dim), D decoder width,
    T teacher width, H, W image size, Hp, Wp grid of 16x16 units, N = Hp*Wp units, N_vis visible units,
    N_m masked units, h, w inner grid of a unit (4, 2, 1 at strides 4, 8, 16), K classes.
    A unit tensor is (B, N, h, w, c). Pyramid levels are named by stride: p4, p8, p16 (official order p16, p8, p4).
    mask: (B, N) float, 1 = removed (masked), 0 = kept (visible).

Pre-training API (the PRETRAINER CONTRACT of contracts.md; train.py builds one of these):
    iTPNPixelPretrainer(cfg)                   official pixel recipe            METHODS["itpn_pixel"]
    iTPNPaperPretrainer(cfg)                   paper Eq. 4 (MIM + lambda MFM)   METHODS["itpn"]; has ema_update()
    iTPNDistillPretrainer(cfg, teacher_path=)  frozen-teacher distillation      METHODS["itpn_distill"]
    Each applies its recipe's overrides to cfg (RECIPES, e.g. no RPE for pixel pre-training) and keeps the result
    in `.cfg`. out = pretrainer(imgs (B, 3, H, W), ImageNet-normalised) -> {"loss", "mask" (B, N), "pred",
    "recon" (pixel recipes: (B, 3, H, W) in the normalised input space), "logs"}.

Differences from the paper / official code:
    - Paper method (Eq. 4) is NOT in the released code (reference 2.5); built here from the paper: the EMA teacher
      (momentum 0.996) is a copy of the backbone only (the paper takes targets "from the last layer of each
      stage", which the backbone alone produces); it sees only the masked units (ids_keep = masked indices: exact,
      since stages 1-2 never mix units). The student's pyramid holds visible units only, so the MAE decoder fills
      the masked units and one linear head per stage (h^{pt,s}) maps each unit's decoder state to that stage's
      sub-token grid (4x4xC/4, 2x2xC/2, 1x1xC). Targets are layer-normalised (no affine) per sub-token, the MFM
      loss is the L2 loss summed over the three stages, weighted by lambda = 0.3. These choices are ours.
    - Official pixel recipe (reference 2): one decoder (512-d, 8 blocks, 16 heads) on the sum of the three levels,
      each level given the same mask token (so a masked unit's input is 3 * mask_token), norm-pix L2 on masked
      units. Pixel pre-training runs without RPE (official). The APE resampling quirk of reference 2.7 is off by
      default; set cfg.ape_quirk=True to reproduce released pixel pre-training outputs.
    - Distillation (reference 3): stages 1-2 see all units, masked units become a mask token at stage 3 (BEiT
      block masking, 75 of 196 units), all units are supervised (official), smooth-L1 (iTPN) or cosine (Fast-iTPN,
      paper only) on the main (pyramid) and aux (3/4-depth + 2 blocks) heads. The pyramid prediction of a masked
      unit sees its own pixels through the stage-1/2 laterals (reference 3.7); no other unit does (tested).
      The teacher is run on the student's batch de-normalised from ImageNet statistics, re-normalised with its own
      (CLIP or ImageNet) statistics and resized so its token grid equals the student's unit grid; the official
      code feeds a separately lanczos-resized image, and its CLIP input is effectively (x+1)/2 (reference 3.3):
      not replicated. Teacher target = last layer (+ CLIP projection), then LayerNorm without affine (official).
    - Eq. 3: the paper up-samples V^{s+1}; the released code (followed here, checkpoint layout) up-samples the raw
      stage-3 tokens U^16 for the 16 -> 8 step and V^8 for the 8 -> 4 step, with a learned PatchSplit (LN, linear,
      depth-to-space). All pyramid blocks are C-MLPs with MLP ratio 4 and no drop path.
    - A classifier (num_classes > 0) has no pyramid, like the official fine-tuning model (num_outs=1); a backbone
      (num_classes = 0) carries the pyramid, like the pre-training and det/seg models (num_outs=3..5).
    - Dense outputs: "det" = pyramid maps, strides 32/64 by avg-pool (official det); "seg" = each level
      concatenated with the backbone feature of its stride, stride 32 by max-pool (official seg). The det/seg
      copies of the official backbone use LayerNorm eps 1e-5; ours keep 1e-6 (dense layouts are not loaded here).
    - Plain-ViT iTPN (supplementary Sec. 3): the outputs of layers 4 and 7 (of 12; scaled for other depths) are
      up-sampled 4x and 2x with PatchSplit (our choice of up-sampler: learned, per unit, so still leak-free).
    - Module names differ from the official ones (e.g. `pyramid.lateral8` for `align_dim_16to8`, `aux_blocks` for
      `cls_pt_layers`); `load_official` renames. Optimiser/schedule/data recipes live in train.py.

Run:
    python itpn.py                                                      # CPU smoke demo, ~10 s
    torchrun --nproc_per_node 8 train.py --model itpn_b --method itpn   # pre-training (train.py)
"""

import copy
import math
import os
from dataclasses import dataclass, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from hivit import (
    HiViT, HiViTConfig, ViTConfig, VisionTransformer, AttentionBlock, MLPBlock,
    check_image_size, drop_path_rates, init_weights, map_official_key, sincos_pos_embed_2d, units_to_map,
)
from hivit import load_official as load_official_hivit

__all__ = [
    "iTPNConfig", "PRESETS", "RECIPES", "PatchSplit", "FeaturePyramid", "pyramid_maps", "PlainViTUnits", "iTPN",
    "encode_backbone",
]

LN_EPS = 1e-6                       # official LayerNorm eps of the classification / pre-training models
UNIT = 16                           # px per unit (main patch)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)    # student input normalisation
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)   # OpenAI CLIP


# ---- 1. Config and presets ----------------------------------------------------------------------------------------

@dataclass
class iTPNConfig(HiViTConfig):
    """HiViT fields (img_size, embed_dim, depths, heads, rpe, layer_scale, ape_quirk, num_classes, ...) plus these."""
    fpn_dim: int = 256              # F, width of every pyramid level
    fpn_depth: int = 2              # C-MLP fusion blocks per top-down step (pixel pre-training 2, CLIP 1, det 1)
    plain_vit: bool = False         # Supp. Sec. 3: plain ViT/16 backbone (depth, heads, C), layers 4, 7 up-sampled
    mask_ratio: float = 0.75        # pixel / paper recipes: fraction of units dropped (random masking)
    decoder_dim: int = 512          # D, pixel decoder width (official 512)
    decoder_depth: int = 8          # pixel decoder attention blocks (official 8)
    decoder_heads: int = 16         # pixel decoder heads (official 16, head_dim 32)
    mfm_weight: float = 0.3         # lambda of Eq. 4 (paper method only)
    ema_momentum: float = 0.996     # m of the EMA teacher, t <- m t + (1 - m) s (paper Sec. 3.3)
    distill_mask_ratio: float = 0.383   # distillation: block-masked fraction, 75 of 196 units (reference 3.5)
    distill_loss: str = "smooth_l1"     # "smooth_l1" (iTPN, official) or "cosine" (Fast-iTPN paper)


# iTPN notation counts MLP blocks literally (3-3-24 = 3 + 3 MLP blocks, 24 attention blocks; reference 1.8).
# Sizes with a 1000-class head: iTPN-B 78.558M / 17.82 GMACs, iTPN-L 288.494M / 61.12 GMACs at 224 px.
PRESETS: dict[str, iTPNConfig] = {
    "tiny": iTPNConfig(img_size=64, embed_dim=64, mlp_depth1=1, mlp_depth2=1, depth=2, num_heads=2, num_classes=10,
                       fpn_dim=32, fpn_depth=1, decoder_dim=32, decoder_depth=1, decoder_heads=2),
    "itpn_t": iTPNConfig(embed_dim=384, mlp_depth1=2, mlp_depth2=2, depth=10, num_heads=6),   # = HiViT-T, 19.2M
    "itpn_s": iTPNConfig(embed_dim=384, mlp_depth1=4, mlp_depth2=4, depth=20, num_heads=6),   # = HiViT-S, 37.5M
    "itpn_b": iTPNConfig(embed_dim=512, mlp_depth1=3, mlp_depth2=3, depth=24, num_heads=8),   # 78.558M
    "itpn_l": iTPNConfig(embed_dim=768, mlp_depth1=2, mlp_depth2=2, depth=40, num_heads=12),  # 288.494M
}

# What each official pre-training recipe sets on top of a size preset (reference 2 and 3.6); `.cfg` of a
# pre-trainer shows the result. The paper gives no architecture change for Eq. 4, so it follows the pixel recipe.
RECIPES: dict[str, dict] = {
    "pixel": dict(num_classes=0, rpe=False),                          # itpn_*_dec512d8b: no RPE, fpn_depth 2
    "paper": dict(num_classes=0, rpe=False),
    "distill": dict(num_classes=0, rpe=True, layer_scale=0.1, fpn_depth=1),   # clip_tpn_*: RPE, gamma 0.1, depth 1
}


# ---- 2. Pyramid primitives ----------------------------------------------------------------------------------------

class PatchSplit(nn.Module):
    """Learned up-sampling inside every unit: (B, N, h, w, c) -> (B, N, s*h, s*w, F). LN -> Linear(c, s*s*F) -> shuffle.

    The inverse direction of PatchMerge, but not its inverse order: channel group k = s*row_offset + col_offset goes
    to sub-position (row_offset, col_offset) (official). Per unit only, so masked units never mix with visible ones.
    """

    def __init__(self, dim: int, *, out_dim: int, scale: int = 2, ln_eps: float = LN_EPS):
        super().__init__()
        self.scale = scale
        self.norm = nn.LayerNorm(dim, eps=ln_eps)
        self.reduction = nn.Linear(dim, scale * scale * out_dim, bias=False)   # official name (a widening, here)

    def forward(self, x):
        b, n, h, w, _ = x.shape
        s = self.scale
        x = self.reduction(self.norm(x))                                  # (B, N, h, w, s*s*F)
        x = x.reshape(b, n, h, w, s, s, -1)                               # (B, N, h, w, s, s, F)
        x = x.permute(0, 1, 2, 4, 3, 5, 6)                                # (B, N, h, s, w, s, F)
        return x.reshape(b, n, h * s, w * s, -1)                          # (B, N, s*h, s*w, F)


def c_mlp(dim: int, *, ln_eps: float) -> MLPBlock:
    """The pyramid's only block type: a C-MLP (LN -> fc F->4F -> GELU -> fc, residual), ratio 4 (reference 2.2)."""
    return MLPBlock(dim, mlp_ratio=4.0, ln_eps=ln_eps)


# ---- 3. Feature pyramid (Eq. 3) -----------------------------------------------------------------------------------

class FeaturePyramid(nn.Module):
    """Top-down pyramid of C-MLP blocks on unit tensors: forward(f4, f8, f16) -> [p16, p8, p4] (official order).

    Eq. 3: V^16 = U^16 and V^s = U^s + g^s(V^{s+1}), where U^s is the backbone feature of stride s projected to F
    (the lateral), g^s is a PatchSplit up-sampling, and the sum is refined by `fpn_depth` C-MLP blocks. Each level
    then passes one output C-MLP. No convolution and no attention: a unit's pyramid features depend on that unit's
    backbone features only, so masked and visible units stay separate at every level (supplementary Sec. 2).
    """

    def __init__(self, embed_dim: int, *, fpn_dim: int, fpn_depth: int, ln_eps: float = LN_EPS):
        super().__init__()
        c, f = embed_dim, fpn_dim
        self.proj16 = nn.Linear(c, f) if c != f else nn.Identity()       # official: omitted when C == F
        self.split16 = PatchSplit(c, out_dim=f, ln_eps=ln_eps)            # g^8, on the raw stage-3 tokens
        self.lateral8 = nn.Linear(c // 2, f, bias=False)                  # U^8 from stage 2
        self.fuse8 = nn.ModuleList(c_mlp(f, ln_eps=ln_eps) for _ in range(fpn_depth))
        self.split8 = PatchSplit(f, out_dim=f, ln_eps=ln_eps)             # g^4, on V^8
        self.lateral4 = nn.Linear(c // 4, f, bias=False)                  # U^4 from stage 1
        self.fuse4 = nn.ModuleList(c_mlp(f, ln_eps=ln_eps) for _ in range(fpn_depth))
        self.out16, self.out8, self.out4 = (c_mlp(f, ln_eps=ln_eps) for _ in range(3))

    def forward(self, f4: torch.Tensor, f8: torch.Tensor, f16: torch.Tensor) -> list[torch.Tensor]:
        """f4 (B, N, 4, 4, C/4), f8 (B, N, 2, 2, C/2), f16 (B, N, C) -> [(B, N, 1, 1, F), (B, N, 2, 2, F), (B, N, 4, 4, F)]."""
        u16 = f16[:, :, None, None, :]                                    # (B, N, 1, 1, C)
        v16 = self.proj16(u16)                                            # Eq. 3: V^16 = U^16 (B, N, 1, 1, F)
        v8 = self.split16(u16) + self.lateral8(f8)                        # Eq. 3: U^8 + g(.) (B, N, 2, 2, F)
        for blk in self.fuse8:
            v8 = blk(v8)
        v4 = self.split8(v8) + self.lateral4(f4)                          # Eq. 3: U^4 + g(V^8) (B, N, 4, 4, F)
        for blk in self.fuse4:
            v4 = blk(v4)
        return [self.out16(v16), self.out8(v8), self.out4(v4)]


# ---- 4. The iTPN model (HiViT or plain ViT backbone + pyramid) ----------------------------------------------------

class PlainViTUnits(nn.Module):
    """Supplementary Sec. 3 (Tab. 11): a plain ViT/16 made hierarchical by up-sampling two intermediate layers.

    The outputs of layers 4 and 7 (of 12) are up-sampled 4x and 2x inside each unit into the stride-4 (C/4) and
    stride-8 (C/2) unit tensors HiViT would give, so the same pyramid and heads apply. For other depths the taps
    scale with depth/12.
    """

    def __init__(self, cfg: iTPNConfig):
        super().__init__()
        self.cfg = cfg
        c = cfg.embed_dim
        self.vit = VisionTransformer(ViTConfig(img_size=cfg.img_size, patch_size=UNIT, embed_dim=c, depth=cfg.depth,
                                               num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio,
                                               drop_path_rate=cfg.drop_path_rate, num_classes=cfg.num_classes))
        self.grid = self.vit.grid
        self.taps = (max(1, round(cfg.depth * 4 / 12)), max(1, round(cfg.depth * 7 / 12)))   # 1-based layers
        self.up4 = PatchSplit(c, out_dim=c // 4, scale=4)                 # layer 4 -> (B, N, 4, 4, C/4)
        self.up8 = PatchSplit(c, out_dim=c // 2, scale=2)                 # layer 7 -> (B, N, 2, 2, C/2)

    def no_weight_decay(self) -> set[str]:
        return {f"vit.{n}" for n in self.vit.no_weight_decay()}

    def forward(self, x):
        return self.vit(x)

    def encode(self, x, *, ids_keep=None, mask=None, mask_token=None):
        outs = self.vit.forward_features(x, ids_keep=ids_keep, mask=mask, mask_token=mask_token)
        f4 = self.up4(outs[self.taps[0] - 1][:, :, None, None, :])        # (B, N_vis, 4, 4, C/4)
        f8 = self.up8(outs[self.taps[1] - 1][:, :, None, None, :])        # (B, N_vis, 2, 2, C/2)
        return f4, f8, outs


def encode_backbone(backbone: nn.Module, x: torch.Tensor, *, ids_keep=None, mask=None, mask_token=None):
    """Run a HiViT (or PlainViTUnits) backbone: (f4, f8, list of every stage-3 block's output (B, N_vis, C)).

    Written from HiViT's public steps because iTPN needs more than `forward_features` gives: every attention
    block's output (the distillation's 3/4-depth tap) and the BEiT mask-token path at the stage-3 input.
    """
    if isinstance(backbone, PlainViTUnits):
        return backbone.encode(x, ids_keep=ids_keep, mask=mask, mask_token=mask_token)
    units, grid_hw = backbone.embed_units(x, ids_keep)                    # (B, N_vis, 4, 4, C/4)
    f4, f8, tokens = backbone.forward_early(units)                        # MLP-only stages 1-2, both merges
    if mask is not None:                                                  # Sec. 3.4: mask tokens at stage 3
        m = mask[:, :, None].to(tokens.dtype)                             # (B, N, 1)
        tokens = tokens * (1 - m) + mask_token.to(tokens.dtype) * m       # (B, N, C)
    tokens = tokens + backbone.pos_embed(grid_hw, ids_keep)               # (B, N_vis, C)
    return f4, f8, backbone.forward_stage3(tokens, grid_hw=grid_hw, ids_keep=ids_keep)


class iTPN(nn.Module):
    """iTPN = HiViT backbone (+ feature pyramid when num_classes == 0, + head when num_classes > 0).

    forward(x) -> (B, K) logits (classifier); forward_features(x, ids_keep=) -> [f4, f8, f16] (the HiViT seam);
    forward_levels(x, ids_keep=) -> [p16, p8, p4] unit tensors; forward_pyramid(x) -> dict of (B, F, H/s, W/s) maps.
    """

    def __init__(self, cfg: iTPNConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = PlainViTUnits(cfg) if cfg.plain_vit else HiViT(cfg)
        self.grid = self.backbone.grid                                    # (Hp, Wp) the position tables are for
        self.pyramid = None
        if cfg.num_classes == 0:
            self.pyramid = FeaturePyramid(cfg.embed_dim, fpn_dim=cfg.fpn_dim, fpn_depth=cfg.fpn_depth)
            self.pyramid.apply(init_weights)

    def no_weight_decay(self) -> set[str]:
        return {f"backbone.{n}" for n in self.backbone.no_weight_decay()}

    def rpe_index(self, grid_hw):
        """Relative-position index for extra attention blocks on all N units (None without RPE)."""
        return None if self.cfg.plain_vit else self.backbone.rpe_index(grid_hw)

    def encode(self, x, *, ids_keep=None, mask=None, mask_token=None):
        """(f4, f8, every stage-3 block's output); see `encode_backbone`."""
        return encode_backbone(self.backbone, x, ids_keep=ids_keep, mask=mask, mask_token=mask_token)

    def forward_features(self, x, *, ids_keep=None):
        f4, f8, outs = self.encode(x, ids_keep=ids_keep)
        return [f4, f8, outs[-1]]

    def require_pyramid(self) -> FeaturePyramid:
        if self.pyramid is None:
            raise ValueError("this iTPN is a classifier (num_classes > 0) and has no pyramid: build it with "
                             "num_classes=0 for pre-training, detection or segmentation")
        return self.pyramid

    def forward_levels(self, x, *, ids_keep=None) -> list[torch.Tensor]:
        """Pyramid levels of the kept units: [p16 (B, N_vis, 1, 1, F), p8 (.., 2, 2, F), p4 (.., 4, 4, F)]."""
        f4, f8, outs = self.encode(x, ids_keep=ids_keep)
        return self.require_pyramid()(f4, f8, outs[-1])

    def forward_pyramid(self, x, *, mode: str = "det") -> dict[str, torch.Tensor]:
        """Dense maps for detection ("det": p4..p64, F channels) or segmentation ("seg": p4..p32); see pyramid_maps."""
        grid_hw = check_image_size(x)
        f4, f8, outs = self.encode(x)
        levels = self.require_pyramid()(f4, f8, outs[-1])
        backbone = [f4, f8, outs[-1][:, :, None, None, :]] if mode == "seg" else None   # f16 as (B, N, 1, 1, C)
        return pyramid_maps(levels, grid_hw, mode=mode, backbone=backbone)

    def forward(self, x):
        return self.backbone(x)                                           # (B, K): mean pool -> fc_norm -> head


# ---- 5. Dense outputs (strides 4..64) -----------------------------------------------------------------------------

def pyramid_maps(levels, grid_hw, *, mode: str = "det", backbone=None) -> dict[str, torch.Tensor]:
    """Turn full-image pyramid levels [p16, p8, p4] (unit tensors) into image-layout maps keyed "p4".."p64".

    mode "det" (official Mask R-CNN backbone, reference 6.1): F channels at every stride; p32 = avg_pool(p16, 2) and
        p64 = avg_pool(p32, 2). The pyramid is the neck: no extra FPN.
    mode "seg" (official UPerNet backbone, reference 6.3): each level is concatenated with the backbone feature of
        its stride, `backbone` = [f4, f8, f16 as (B, N, 1, 1, C)], giving F+C/4, F+C/2, F+C; p32 = max_pool(p16, 2).
    Used by iTPN.forward_pyramid and by fast_itpn.py (any backbone giving the same unit tensors).
    """
    if mode not in ("det", "seg"):
        raise ValueError(f"mode must be 'det' or 'seg', got {mode!r}")
    p16, p8, p4 = levels
    if mode == "seg":
        f4, f8, f16 = backbone
        p16, p8, p4 = (torch.cat([p, f], dim=-1) for p, f in ((p16, f16), (p8, f8), (p4, f4)))   # (B, N, h, w, F+c)
    maps = {"p4": units_to_map(p4, grid_hw), "p8": units_to_map(p8, grid_hw),     # (B, ., H/4, W/4), (.., H/8, W/8)
            "p16": units_to_map(p16, grid_hw)}                                    # (B, ., H/16, W/16)
    if mode == "det":
        maps["p32"] = F.avg_pool2d(maps["p16"], kernel_size=2, stride=2)          # (B, F, H/32, W/32)
        maps["p64"] = F.avg_pool2d(maps["p32"], kernel_size=2, stride=2)          # (B, F, H/64, W/64)
    else:
        maps["p32"] = F.max_pool2d(maps["p16"], kernel_size=2, stride=2)          # (B, F+C, H/32, W/32)
    return maps
