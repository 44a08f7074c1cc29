"""iTPN: a HiViT backbone and a feature pyramid pre-trained together (masked image modeling on the pyramid).

Paper:
    Integrally Pre-Trained Transformer Pyramid Networks (Tian et al., CVPR 2023, arXiv 2211.12735 v1, with its
    supplementary material) and its journal version Fast-iTPN (TPAMI 2024, arXiv 2211.12735 v2, Sec. 3 = iTPN).

Implements:
    The iTPN backbone (hivit.py's HiViT, or a plain ViT: supplementary Sec. 3), the C-MLP feature pyramid of Eq. 3
    exactly as the released code builds it, its dense stride-4..64 outputs for detection/segmentation, and three
    pre-training recipes: the paper's MIM + multi-stage MFM with an EMA teacher (Eq. 4, not in the released code),
    the official pixel recipe and frozen-teacher (CLIP) distillation. `load_official` loads the released
    fine-tuning, pixel pre-training and CLIP pre-training checkpoints.

Sections:
    1. Configs: architecture and pre-training recipe <-> paper Tab. 1 / supplementary Tab. 7, Sec. 3.3-3.4
    2. Pyramid primitives (PatchSplit)   <-> Sec. 3.2 "up-sampling", Fig. 2
    3. Feature pyramid                   <-> Eq. 3, Fig. 2, supplementary Sec. 2 (C-MLP, no convolution)
    4. Dense outputs (strides 4..64)     <-> Sec. 4.3 (the pre-trained pyramid is the detection/segmentation neck)
    5. The iTPN model (+ plain ViT)      <-> Sec. 3.2, supplementary Sec. 3 / Tab. 11
    6. Official pixel recipe             <-> Sec. 3.3 (MIM on the summed pyramid)
    7. Paper method: MIM + MFM, EMA teacher <-> Eq. 4, Sec. 3.3
    8. Frozen-teacher distillation       <-> Sec. 3.4 (CLIP teacher), Fast-iTPN Sec. 4.3 (cosine loss)
    9. Recipe presets and METHODS        <-> Sec. 3.3-3.4
    10. Loading official checkpoints     <-> released iTPN checkpoints
    11. __main__ smoke demo

Shapes:
    B batch, C stage-3 width (stage 1 = C/4, stage 2 = C/2), F pyramid width (fpn_dim), D decoder width,
    T teacher width, H, W image size, Hp, Wp grid of 16x16 units, N = Hp*Wp units, N_vis visible units,
    N_m masked units, h, w inner grid of a unit (4, 2, 1 at strides 4, 8, 16), K classes.
    A unit tensor is (B, N, h, w, c). Pyramid levels are named by stride: p4, p8, p16 (official order p16, p8, p4).
    mask: (B, N) float, 1 = removed (masked), 0 = kept (visible).

Differences from the paper / official code (the docstring of each recipe has the details):
    - The paper method (Eq. 4) is not in the released code: built from the paper, our choices in its docstring.
    - Pixel recipe as released, without its APE resampling quirk (hivit.py's `ape_quirk`, library only).
    - Distillation as released, except the teacher's input (the student's batch, re-normalised for the teacher).
      The Fast-iTPN paper's cosine loss is the recipe preset "itpn_distill_cosine".
    - Eq. 3 up-samples V^{s+1}; the released code (followed: checkpoint layout) up-samples the raw stage-3 tokens
      U^16 in the 16 -> 8 step. Every pyramid block is a C-MLP.
    - A classifier (num_classes > 0) has no pyramid, like the official fine-tuning model; a backbone
      (num_classes = 0) carries it, like the pre-training and det/seg models. Dense outputs: see pyramid_maps.
    - Plain-ViT iTPN (supplementary Sec. 3, presets "itpn_vit_*"): layers 4 and 7 of 12 up-sampled by PatchSplit.
    - Module names differ (e.g. `pyramid.lateral8` for `align_dim_16to8`); `load_official` renames.
    - The released det/seg backbones are DENSE_PRESETS (LayerNorm eps 1e-5; the seg APE kept at 224 px beside RPE
      tables for 512 px); their outputs match exactly. Not built: the large CLIP detection backbone (ViTDet's
      decomposed relative positions).

Run:
    # read in import order: hivit -> mim -> itpn -> fast_itpn -> train -> finetune -> detect_seg (3rd)
    python itpn.py                                                      # CPU smoke demo, ~10 s
    torchrun --nproc_per_node 8 train.py --model itpn_b --method itpn   # pre-training (train.py)
    # train.py builds a pre-trainer (README "Seams"; tiny CPU presets: cfg=itpn.tiny_decoder(recipe)) as
    pretrainer = itpn.METHODS[name](itpn.PRESETS[size], cfg=itpn.PRETRAIN_PRESETS[name])   # + teacher_path=
"""

import math
import os
import warnings
from dataclasses import dataclass, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from hivit import (
    HIVIT_RULES, LN_EPS, HiViT, HiViTConfig, VIT_PRESETS, ViTConfig, VisionTransformer, AttentionBlock, MLPBlock,
    check_config, check_image_size, check_state_dict, count_params, drop_path_rates, init_weights, map_official_key,
    read_checkpoint, select_units, sincos_pos_embed_2d, units_to_map, unwrap_checkpoint,
)
from hivit import load_official as load_official_hivit
from mim import (
    LOSSES, block_masking, ema_update_, l2_loss, make_teacher, masked_mean, norm_pix, patchify, pixel_recon,
    random_masking, unshuffle,
)

__all__ = [
    "iTPNConfig", "PRESETS", "DENSE_PRESETS", "ITPN_RULES", "backbone_config", "iTPNPretrainConfig", "tiny_decoder",
    "PatchSplit", "FeaturePyramid", "DENSE_MIN_SIZE", "check_dense_size", "pyramid_maps", "PlainViTUnits", "iTPN",
    "LevelEmbed", "iTPNPixelPretrainer", "LevelDecoder", "iTPNPaperPretrainer",
    "DISTILL_MASK_RATIO", "distillation_mask", "FrozenTeacher", "load_teacher", "PyramidDistillation",
    "iTPNDistillPretrainer", "PRETRAIN_PRESETS", "METHODS", "map_itpn_key", "load_official",
    "IMAGENET_MEAN", "IMAGENET_STD", "CLIP_MEAN", "CLIP_STD",
]

UNIT = 16                           # px per unit (main patch)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)    # student input normalisation
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)   # OpenAI CLIP
# BEiT block masking of the official CLIP recipe: 75 of 196 units (`itpn_clip/run_itpn_pretraining.py`,
# `--num_mask_patches`).
DISTILL_MASK_RATIO = 75 / 196


# ---- 1. Configs: the architecture, and the pre-training recipe ----------------------------------------------------

@dataclass
class iTPNConfig(HiViTConfig):
    """HiViT fields (img_size, embed_dim, depths, heads, rpe, layer_scale, ape_quirk, num_classes, ...) plus these."""
    fpn_dim: int = 256              # F, width of every pyramid level
    fpn_depth: int = 2              # C-MLP fusion blocks per top-down step (pixel pre-training 2, CLIP 1, det 1)
    plain_vit: bool = False         # supp. Sec. 3: plain ViT/16 backbone (depth, heads, C), layers 4, 7 up-sampled


# iTPN notation counts MLP blocks literally (3-3-24 = 3 + 3 MLP blocks, 24 attention blocks), unlike the HiViT
# paper's. itpn_t / itpn_s are the HiViT-T / -S sizes (paper Tab. 4: 19M, 38M; no official code for them).
# Parameter counts with a 1000-class head are the official models' exact ones (paper: 79M, 288M).
PRESETS: dict[str, iTPNConfig] = {
    "tiny": iTPNConfig(img_size=64, embed_dim=64, mlp_depth1=1, mlp_depth2=1, depth=2, num_heads=2, num_classes=10,
                       fpn_dim=32, fpn_depth=1),
    "itpn_t": iTPNConfig(embed_dim=384, mlp_depth1=2, mlp_depth2=2, depth=10, num_heads=6),   # = HiViT-T, 19.182M
    "itpn_s": iTPNConfig(embed_dim=384, mlp_depth1=4, mlp_depth2=4, depth=20, num_heads=6),   # = HiViT-S, 37.526M
    "itpn_b": iTPNConfig(embed_dim=512, mlp_depth1=3, mlp_depth2=3, depth=24, num_heads=8),   # 78.558M, 17.8G
    "itpn_l": iTPNConfig(embed_dim=768, mlp_depth1=2, mlp_depth2=2, depth=40, num_heads=12),  # 288.494M, 61.2G
    # Supplementary Sec. 3: iTPN on a plain ViT/16 (no MLP stages, no RPE); "itpn_vit_tiny" is the CPU size.
    "itpn_vit_tiny": iTPNConfig(img_size=64, embed_dim=64, mlp_depth1=0, mlp_depth2=0, depth=2, num_heads=2,
                                rpe=False, num_classes=10, fpn_dim=32, fpn_depth=1, plain_vit=True),
    "itpn_vit_b": iTPNConfig(embed_dim=768, mlp_depth1=0, mlp_depth2=0, depth=12, num_heads=12, rpe=False,
                             plain_vit=True),
}

# The released detection / segmentation backbones (backbone + pyramid, num_classes=0), one per official layout in
# tests/official_keys/ (`itpn_<size>[_clip]_<det|seg>_dense`). They differ from the pre-training models in three
# ways: torch's default LayerNorm eps 1e-5 everywhere (ln_eps), their fpn_depth, and for segmentation RPE tables
# built for 512 px beside an APE table kept at 224 px (ape_size), resized to the 32 x 32 grid in every forward.
# Dense maps: forward_pyramid(x, mode="det") for *_det, mode="seg" for *_seg. drop_path_rate: the official configs'.
# Not here: the large CLIP detection backbone (`itpn_large_clip_det_dense`), whose attention uses ViTDet's
# decomposed relative positions (`rel_pos_h` / `rel_pos_w`); load_official refuses it with that reason.
_DET = dict(num_classes=0, rpe=False, fpn_depth=1, ln_eps=1e-5)         # `det/.../iTPN_pixel.py`, `iTPN_CLIP.py`
_SEG = dict(num_classes=0, rpe=True, fpn_depth=2, ln_eps=1e-5, img_size=512, ape_size=224)   # `seg/backbone/iTPN.py`
DENSE_PRESETS: dict[str, iTPNConfig] = {
    "itpn_b_det": replace(PRESETS["itpn_b"], **_DET, drop_path_rate=0.05),                       # 81.552M
    "itpn_b_clip_det": replace(PRESETS["itpn_b"], **_DET, layer_scale=0.1, drop_path_rate=0.3),  # 81.578M
    "itpn_b_seg": replace(PRESETS["itpn_b"], **_SEG, drop_path_rate=0.1),                        # 83.366M
    "itpn_b_clip_seg": replace(PRESETS["itpn_b"], **_SEG, layer_scale=0.1, drop_path_rate=0.2),  # 83.392M
    "itpn_l_seg": replace(PRESETS["itpn_l"], **_SEG, drop_path_rate=0.2),                        # 294.356M
    "itpn_l_clip_seg": replace(PRESETS["itpn_l"], **_SEG, layer_scale=0.1, drop_path_rate=0.2),  # 294.418M
}

# iTPN's own fields, checked with hivit.HIVIT_RULES by the constructor (hivit.check_config).
ITPN_RULES = [
    ("fpn_dim", lambda c: c.fpn_dim >= 1, "must be >= 1 (the width F of every pyramid level; official 256)"),
    ("fpn_depth", lambda c: c.fpn_depth >= 0, "must be >= 0 (C-MLP fusion blocks per top-down step)"),
    ("ape_size", lambda c: not c.plain_vit or c.ape_size is None,
     "must be None with plain_vit (the ViT's position table is built for img_size)"),
]

def backbone_config(cfg: iTPNConfig) -> HiViTConfig | ViTConfig:
    """The backbone alone: HiViT's config, or for `plain_vit` a ViT/16 with the same width, depth, heads and head.

    iTPN builds its backbone from it; so can any user of the backbone alone (mim.py's methods wrap
    `HiViT(...)` / `hivit.VisionTransformer(...)` of it, with num_classes=0).
    """
    if cfg.plain_vit:
        return ViTConfig(img_size=cfg.img_size, patch_size=UNIT, embed_dim=cfg.embed_dim, depth=cfg.depth,
                         num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, drop_path_rate=cfg.drop_path_rate,
                         ln_eps=cfg.ln_eps, num_classes=cfg.num_classes)
    return HiViTConfig(**{f.name: getattr(cfg, f.name) for f in fields(HiViTConfig)})


@dataclass
class iTPNPretrainConfig:
    """One pre-training recipe of section 6-8; each recipe reads the fields it needs (presets: section 9)."""
    mask_ratio: float = 0.75        # pixel / paper recipes: fraction of units dropped (random masking)
    decoder_dim: int = 512          # D, pixel decoder width (official 512)
    decoder_depth: int = 8          # pixel decoder attention blocks (official 8)
    decoder_heads: int = 16         # pixel decoder heads (official 16, head_dim 32)
    mfm_weight: float = 0.3         # lambda of Eq. 4 (paper method only)
    mfm_decoder_depth: int = 1      # attention blocks of each level's MFM decoder (paper method only; ours)
    ema_momentum: float = 0.996     # m of the EMA teacher, t <- m t + (1 - m) s (paper Sec. 3.3)
    distill_mask_ratio: float = DISTILL_MASK_RATIO   # distillation: block-masked fraction (75 of 196 units)
    distill_loss: str = "smooth_l1"  # distillation: "smooth_l1" (iTPN, official) or "cosine" (Fast-iTPN paper)


def tiny_decoder(cfg: iTPNPretrainConfig) -> iTPNPretrainConfig:
    """The same recipe with a 1-block 32-d pixel decoder: for the tiny CPU presets (tests, `python train.py`)."""
    return replace(cfg, decoder_dim=32, decoder_depth=1, decoder_heads=2)


# ---- 2. Pyramid primitives ----------------------------------------------------------------------------------------

class PatchSplit(nn.Module):
    """Learned up-sampling inside every unit: (B, N, h, w, c) -> (B, N, s*h, s*w, F). LN, Linear(c, s*s*F), shuffle.

    The inverse direction of PatchMerge, but not its inverse order: channel group k = s*row_offset + col_offset goes
    to sub-position (row_offset, col_offset) (official `itpn_pixel/models/models_itpn.py`, `PatchSplit`). Per unit
    only, so masked units never mix with visible ones.
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
    """The pyramid's only block type: a C-MLP (LN -> fc F->4F -> GELU -> fc, residual), ratio 4, no drop path.

    Official: `BlockWithRPE` with num_heads=0 (`itpn_pixel/models/models_itpn.py`), i.e. hivit.py's MLPBlock.
    """
    return MLPBlock(dim, mlp_ratio=4.0, ln_eps=ln_eps)


# ---- 3. Feature pyramid (Eq. 3) -----------------------------------------------------------------------------------

class FeaturePyramid(nn.Module):
    """Top-down pyramid of C-MLP blocks on unit tensors: forward(f4, f8, f16) -> [p16, p8, p4] (official order).

    Eq. 3: V^16 = U^16 and V^s = U^s + g^s(V^{s+1}), where U^s is the backbone feature of stride s projected to F
    (the lateral), g^s is a PatchSplit up-sampling, and the sum is refined by `fpn_depth` C-MLP blocks. Each level
    then passes one output C-MLP. No convolution and no attention: a unit's pyramid features depend on that unit's
    backbone features only, so masked and visible units stay separate at every level (supplementary Sec. 2).
    Eq. 3 up-samples V^{s+1}; the released code, followed here for its checkpoint layout, up-samples the raw
    stage-3 tokens U^16 (C channels) in the 16 -> 8 step and V^8 in the 8 -> 4 step.
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
        """f4 (B, N, 4, 4, C/4), f8 (B, N, 2, 2, C/2), f16 (B, N, C) -> [p16, p8, p4], (B, N, h, w, F) each."""
        u16 = f16[:, :, None, None, :]                                    # (B, N, 1, 1, C)
        v16 = self.proj16(u16)                                            # Eq. 3: V^16 = U^16 (B, N, 1, 1, F)
        v8 = self.split16(u16) + self.lateral8(f8)                        # Eq. 3: U^8 + g(.) (B, N, 2, 2, F)
        for blk in self.fuse8:
            v8 = blk(v8)
        v4 = self.split8(v8) + self.lateral4(f4)                          # Eq. 3: U^4 + g(V^8) (B, N, 4, 4, F)
        for blk in self.fuse4:
            v4 = blk(v4)
        return [self.out16(v16), self.out8(v8), self.out4(v4)]


# ---- 4. Dense outputs (strides 4..64) -----------------------------------------------------------------------------

# Smallest input side (px) per mode: "det" pools the stride-16 map twice (stride 64 needs H/16 >= 4), "seg" once.
DENSE_MIN_SIZE = {"det": 64, "seg": 32}


def check_dense_size(grid_hw: tuple[int, int], mode: str) -> None:
    """Raise a ValueError unless `mode` is "det" or "seg" and a (Hp, Wp) unit grid is large enough for it."""
    if mode not in DENSE_MIN_SIZE:
        raise ValueError(f"mode must be 'det' or 'seg', got {mode!r}")
    need = DENSE_MIN_SIZE[mode]
    if min(grid_hw) * UNIT < need:
        coarsest = "stride 64 = two 2x poolings" if mode == "det" else "stride 32 = one 2x pooling"
        raise ValueError(f"mode {mode!r} needs images of at least {need}x{need} px ({coarsest} of the stride-16 map), "
                         f"got {grid_hw[0] * UNIT}x{grid_hw[1] * UNIT}: resize or pad the input")


def pyramid_maps(pyramid: FeaturePyramid, feats: list, grid_hw, *, mode: str = "det") -> dict[str, torch.Tensor]:
    """Run the pyramid on a full-image seam list `feats` = [f4, f8, ..., f16] and unfold the levels [p16, p8, p4]
    (unit tensors) into image-layout maps keyed "p4".."p64". iTPN.forward_pyramid and fast_itpn.py use it.

    mode "det" (official Mask R-CNN backbone, `det/mmdet/models/backbones/iTPN_pixel.py`): F channels at every
        stride; p32 = avg_pool(p16, 2) and p64 = avg_pool(p32, 2). The pyramid is the neck: no extra FPN.
    mode "seg" (official UPerNet backbone, `seg/backbone/iTPN.py`): each level is concatenated with the backbone
        feature of its stride (f4, f8, f16), giving F+C/4, F+C/2, F+C channels; p32 = max_pool(p16, 2).
    Input: any multiple of 16 px from DENSE_MIN_SIZE[mode] on (64 for "det", 32 for "seg"); the pooled levels
    floor odd sides (an 80-px image: p16 5x5, p32 2x2, p64 1x1), so multiples of 32 / 64 keep every pixel.
    The released det/seg backbones are DENSE_PRESETS (LayerNorm eps 1e-5, the seg APE at 224 px): built from those,
    the outputs equal the official ones exactly (tested on their key listings).
    """
    check_dense_size(grid_hw, mode)
    p16, p8, p4 = pyramid(feats[0], feats[1], feats[-1])                 # (B, N, h, w, F) each
    if mode == "seg":
        f4, f8, f16 = feats[0], feats[1], feats[-1][:, :, None, None, :]   # f16 as (B, N, 1, 1, C)
        p16, p8, p4 = (torch.cat([p, f], dim=-1) for p, f in ((p16, f16), (p8, f8), (p4, f4)))   # (B, N, h, w, F+c)
    maps = {"p4": units_to_map(p4, grid_hw), "p8": units_to_map(p8, grid_hw),     # (B, ., H/4, W/4), (.., H/8, W/8)
            "p16": units_to_map(p16, grid_hw)}                                    # (B, ., H/16, W/16)
    if mode == "det":
        maps["p32"] = F.avg_pool2d(maps["p16"], kernel_size=2, stride=2)          # (B, F, H/32, W/32)
        maps["p64"] = F.avg_pool2d(maps["p32"], kernel_size=2, stride=2)          # (B, F, H/64, W/64)
    else:
        maps["p32"] = F.max_pool2d(maps["p16"], kernel_size=2, stride=2)          # (B, F+C, H/32, W/32)
    return maps


# ---- 5. The iTPN model (HiViT or plain ViT backbone + pyramid) ----------------------------------------------------

class PlainViTUnits(nn.Module):
    """Supplementary Sec. 3 (Tab. 11): a plain ViT/16 made hierarchical by up-sampling two intermediate layers.

    The outputs of layers 4 and 7 (of 12) are up-sampled 4x and 2x inside each unit into the stride-4 (C/4) and
    stride-8 (C/2) unit tensors HiViT would give, so the same pyramid and heads apply. For other depths the taps
    scale with depth/12. The up-sampler is our choice (the supplementary does not name one): PatchSplit, learned
    and per unit, so masked units stay separate. The up-samplers exist only with the pyramid (num_classes == 0): a
    classifier never uses
    them, and parameters without a gradient would break DDP fine-tuning (find_unused_parameters=False); its
    seam list then starts with f4 = f8 = None.
    """

    def __init__(self, cfg: iTPNConfig):
        super().__init__()
        c = cfg.embed_dim
        self.vit = VisionTransformer(backbone_config(cfg))
        self.grid = self.vit.grid
        self.taps = (max(1, round(cfg.depth * 4 / 12)), max(1, round(cfg.depth * 7 / 12)))   # 1-based layers
        self.up4 = self.up8 = None
        if cfg.num_classes == 0:                                          # only the pyramid reads them
            self.up4 = PatchSplit(c, out_dim=c // 4, scale=4, ln_eps=cfg.ln_eps)   # layer 4 -> (B, N, 4, 4, C/4)
            self.up8 = PatchSplit(c, out_dim=c // 2, scale=2, ln_eps=cfg.ln_eps)   # layer 7 -> (B, N, 2, 2, C/2)
            self.up4.apply(init_weights)
            self.up8.apply(init_weights)

    def init_pos_embed_sincos(self) -> None:
        self.vit.init_pos_embed_sincos()

    def no_weight_decay(self) -> set[str]:
        return {f"vit.{n}" for n in self.vit.no_weight_decay()}

    def forward(self, x):
        return self.vit(x)

    def forward_features(self, x, *, ids_keep=None, mask=None, mask_token=None) -> list:
        """HiViT's seam on a ViT: [f4 (B, N_vis, 4, 4, C/4), f8 (B, N_vis, 2, 2, C/2), every block's tokens]."""
        outs = self.vit.forward_features(x, ids_keep=ids_keep, mask=mask, mask_token=mask_token)
        if self.up4 is None:                                              # classifier: no strides 4 and 8
            return [None, None, *outs]
        f4 = self.up4(outs[self.taps[0] - 1][:, :, None, None, :])        # (B, N_vis, 4, 4, C/4)
        f8 = self.up8(outs[self.taps[1] - 1][:, :, None, None, :])        # (B, N_vis, 2, 2, C/2)
        return [f4, f8, *outs]


class iTPN(nn.Module):
    """iTPN = HiViT backbone (+ feature pyramid when num_classes == 0, + head when num_classes > 0).

    forward(x) -> (B, K) logits (classifier); forward_features(x, ...) -> the backbone's seam list [f4, f8, every
    stage-3 block's tokens]; forward_levels(x, ...) -> [p16, p8, p4] unit tensors; forward_pyramid(x) -> dict of
    (B, F, H/s, W/s) maps. A pre-trainer's keys `encoder.backbone.*` are an iTPN classifier's `backbone.*`.
    """

    def __init__(self, cfg: iTPNConfig):
        super().__init__()
        check_config(cfg, HIVIT_RULES + ITPN_RULES)                       # one message naming each bad field
        self.cfg = cfg
        self.backbone = PlainViTUnits(cfg) if cfg.plain_vit else HiViT(backbone_config(cfg))
        self.grid = self.backbone.grid                                    # (Hp, Wp) the position tables are for
        self.pyramid = None
        if cfg.num_classes == 0:
            self.pyramid = FeaturePyramid(cfg.embed_dim, fpn_dim=cfg.fpn_dim, fpn_depth=cfg.fpn_depth,
                                          ln_eps=cfg.ln_eps)
            self.pyramid.apply(init_weights)

    def init_pos_embed_sincos(self) -> None:
        """Start the backbone's (trainable) APE from MAE's 2-D sin-cos table, as pixel pre-training does."""
        self.backbone.init_pos_embed_sincos()

    def no_weight_decay(self) -> set[str]:
        return {f"backbone.{n}" for n in self.backbone.no_weight_decay()}

    def rpe_index(self, grid_hw):
        """Relative-position index for extra attention blocks on all N units (None without RPE)."""
        return None if self.cfg.plain_vit else self.backbone.rpe_index(grid_hw)

    def forward_features(self, x, *, ids_keep=None, mask=None, mask_token=None) -> list:
        """The encoder seam of hivit.py: [f4 (B, N_vis, 4, 4, C/4), f8 (B, N_vis, 2, 2, C/2), then every stage-3
        block's tokens (B, N_vis, C)], the last entry the stage-3 output. ids_keep drops units; mask + mask_token
        replace the stage-3 input of masked units (BEiT). A plain-ViT classifier gives f4 = f8 = None."""
        return self.backbone.forward_features(x, ids_keep=ids_keep, mask=mask, mask_token=mask_token)

    def require_pyramid(self) -> FeaturePyramid:
        if self.pyramid is None:
            raise ValueError("this iTPN is a classifier (num_classes > 0) and has no pyramid: build it with "
                             "num_classes=0 for pre-training, detection or segmentation")
        return self.pyramid

    def forward_levels(self, x, *, ids_keep=None, mask=None, mask_token=None) -> list[torch.Tensor]:
        """Pyramid levels of the encoded units: [p16 (B, N_vis, 1, 1, F), p8 (.., 2, 2, F), p4 (.., 4, 4, F)]."""
        feats = self.forward_features(x, ids_keep=ids_keep, mask=mask, mask_token=mask_token)
        return self.require_pyramid()(feats[0], feats[1], feats[-1])

    def forward_pyramid(self, x, *, mode: str = "det") -> dict[str, torch.Tensor]:
        """Dense maps for detection ("det": p4..p64, F channels) or segmentation ("seg": p4..p32); see pyramid_maps.

        x: (B, 3, H, W), H and W multiples of 16 and at least DENSE_MIN_SIZE[mode] (64 px for det, 32 for seg)."""
        grid_hw = check_image_size(x)
        check_dense_size(grid_hw, mode)                                   # before the forward, not after it
        return pyramid_maps(self.require_pyramid(), self.forward_features(x), grid_hw, mode=mode)

    def forward(self, x):
        return self.backbone(x)                                           # (B, K): mean pool -> fc_norm -> head


# ---- 6. Official pixel recipe: one decoder on the summed pyramid levels -------------------------------------------

class LevelEmbed(nn.Module):
    """One pyramid level -> one vector per unit: LN(F) -> Linear(F, D/(h*w)) per sub-token, then space-to-depth.

    A (2, 2, F) level becomes 4 sub-tokens of D/4 channels flattened row-major into D, so every level lands in the
    same (B, N, D) space and the three levels can be summed (official `decoder_embed`: pixel decoder in
    `itpn_pixel/models/models_itpn_mim.py`, `forward_decoder`; CLIP head in `itpn_clip/modeling_pretrain.py`).
    """

    def __init__(self, fpn_dim: int, *, out_dim: int, ln_eps: float = LN_EPS):
        super().__init__()
        self.norm = nn.LayerNorm(fpn_dim, eps=ln_eps)
        self.proj = nn.Linear(fpn_dim, out_dim)

    def forward(self, level):
        b, n = level.shape[:2]
        return self.proj(self.norm(level)).reshape(b, n, -1)              # (B, N, D): (h, w, D/hw) row-major


class iTPNPixelPretrainer(nn.Module):
    """Official pixel recipe (`itpn_pixel/models/models_itpn_mim.py`, `iTPNMaskedAutoencoder`): masked units dropped,
    pyramid -> summed levels -> decoder -> pixels.

    As released: MAE's random masking (`mask_ratio` 0.75); one 512-d, 8-block, 16-head decoder on the sum of the
    three levels, each level given the same mask token (a masked unit's input is 3 * mask_token); norm-pix L2 on
    masked units only; no RPE during pixel pre-training; the APE starts from sin-cos and stays trainable.
    out = self(imgs): "loss", "mask" (B, N), "pred" (B, N, 16*16*3) normalised pixels per unit (mim.patchify
    order), "recon" (B, 3, H, W) de-normalised with each unit's own mean/std (so it shows the *original*
    statistics of masked units: for pictures only), "logs".
    """

    ARCH_OVERRIDES = dict(num_classes=0, rpe=False)    # what the recipe sets on a size preset (itpn_*_dec512d8b)
    num_views = 1

    def __init__(self, arch: iTPNConfig, *, cfg: iTPNPretrainConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = iTPN(replace(arch, **self.ARCH_OVERRIDES))
        self.encoder.init_pos_embed_sincos()                              # sin-cos start, trainable (official)
        f, d = self.encoder.cfg.fpn_dim, cfg.decoder_dim
        self.decoder_embed = nn.ModuleList(LevelEmbed(f, out_dim=d // (s * s)) for s in (1, 2, 4))   # p16, p8, p4
        self.mask_token = nn.Parameter(torch.zeros(1, 1, d))
        # Fixed sin-cos table, stored as a frozen parameter as in the official checkpoints (other grids: recomputed).
        table = sincos_pos_embed_2d(d, *self.encoder.grid)[None]          # (1, N, D)
        self.decoder_pos_embed = nn.Parameter(table, requires_grad=False)
        self.decoder_blocks = nn.ModuleList(AttentionBlock(d, num_heads=cfg.decoder_heads, mlp_ratio=4.0)
                                            for _ in range(cfg.decoder_depth))
        self.decoder_norm = nn.LayerNorm(d, eps=LN_EPS)
        self.decoder_pred = nn.Linear(d, UNIT * UNIT * 3)                 # P = 768 pixels per unit
        for part in (self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred):
            part.apply(init_weights)
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    def decode(self, levels, ids_restore, grid_hw):
        """Visible-unit levels [p16, p8, p4] -> decoder states of all N units (B, N, D)."""
        x = sum(embed(level) for embed, level in zip(self.decoder_embed, levels))   # Sec. 3.3: summed (B, N_vis, D)
        # Official: each level gets the same mask token before the sum, so a masked unit's input is 3 * mask_token.
        x = unshuffle(x, self.mask_token * len(levels), ids_restore)      # (B, N, D), original unit order
        pos = self.decoder_pos_embed if tuple(grid_hw) == self.encoder.grid else \
            sincos_pos_embed_2d(x.shape[-1], *grid_hw)[None].to(x)        # (1, N, D)
        x = x + pos
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_norm(x)

    def forward_mim(self, imgs):
        """The MIM half shared with the paper method: (output dict, levels [p16, p8, p4] of the visible units
        (B, N_vis, h, w, F), ids_restore (B, N), ids_masked (B, N_m)).

        ids_masked are the removed units in shuffled order, read off the masking call itself (ids_shuffle after
        its N_vis kept ones), so they always agree with `mask` whatever rounding random_masking uses."""
        grid_hw = check_image_size(imgs)
        ids_keep, ids_restore, mask = random_masking(imgs.shape[0], grid_hw[0] * grid_hw[1], self.cfg.mask_ratio,
                                                     device=imgs.device)
        levels = self.encoder.forward_levels(imgs, ids_keep=ids_keep)    # visible units only, in every stage
        hidden = self.decode(levels, ids_restore, grid_hw)               # (B, N, D)
        pred = self.decoder_pred(hidden)                                  # (B, N, P)
        loss = masked_mean(l2_loss(pred, norm_pix(patchify(imgs))), mask)   # norm_pix_loss (official: always on)
        with torch.no_grad():                                             # picture only: undo norm_pix per unit
            recon = pixel_recon(pred, imgs, patch=UNIT, norm_pix_loss=True)   # (B, 3, H, W)
        out = {"loss": loss, "mask": mask, "pred": pred, "recon": recon, "logs": {"loss_mim": loss.detach()}}
        ids_shuffle = ids_restore.argsort(dim=1)                          # (B, N): the inverse permutation, exact
        return out, levels, ids_restore, ids_shuffle[:, ids_keep.shape[1]:]   # ids_masked (B, N_m)

    def forward(self, imgs):
        return self.forward_mim(imgs)[0]


# ---- 7. Paper method (Eq. 4): MIM + multi-stage masked feature modeling with an EMA teacher -----------------------

class LevelDecoder(nn.Module):
    """One MFM branch of Eq. 4: V^s of the visible units -> h^{pt,s}'s prediction of x^s at the masked units.

    V^s (B, N_vis, h, w, F) -> LevelEmbed (LN, Linear(F, D/(h*w)) on each sub-token, space-to-depth to (B, N_vis, D))
    -> this level's mask token at every masked unit and MAE's un-shuffle (B, N, D) -> + the fixed sin-cos table of
    the unit grid -> `depth` attention blocks -> LN -> depth-to-space (B, N, h, w, D/(h*w)) -> the head h^{pt,s}:
    one Linear(D/(h*w), c) applied to each sub-token on its own (Fast-iTPN paper, Sec. 3.3: "a linear projection
    working on each token individually"), read at the masked units only.
    Resolution: the mask token (1, 1, D) is one (h, w, D/(h*w)) grid of sub-tokens, so a masked unit is filled at
    the level's own resolution. Positions: a sub-token's place inside its unit is its channel block of the D-vector
    (fixed by the space-to-depth), so the unit-grid table and the block order together give every stride-s
    position its own code, as in the official pixel decoder's input (`decoder_embed` + `decoder_pos_embed`).
    """

    def __init__(self, fpn_dim: int, *, scale: int, out_dim: int, dim: int, depth: int, num_heads: int):
        super().__init__()
        self.scale = scale                                                # h = w: sub-tokens per unit side (1, 2, 4)
        self.embed = LevelEmbed(fpn_dim, out_dim=dim // (scale * scale))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.ModuleList(AttentionBlock(dim, num_heads=num_heads, mlp_ratio=4.0) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)
        self.head = nn.Linear(dim // (scale * scale), out_dim)           # h^{pt,s}: per sub-token
        self.apply(init_weights)
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    def forward(self, level: torch.Tensor, *, ids_restore, ids_masked, grid_hw) -> torch.Tensor:
        """level (B, N_vis, h, w, F) in ids_keep order -> prediction (B, N_m, h, w, c) at the units ids_masked."""
        x = unshuffle(self.embed(level), self.mask_token, ids_restore)    # (B, N, D), original unit order
        x = x + sincos_pos_embed_2d(x.shape[-1], *grid_hw)[None].to(x)   # (1, N, D) fixed table
        for blk in self.blocks:
            x = blk(x)
        x = select_units(self.norm(x), ids_masked)                        # (B, N_m, D)
        b, n_m, _ = x.shape
        x = x.reshape(b, n_m, self.scale, self.scale, -1)                 # (B, N_m, h, w, D/(h*w)): depth-to-space
        return self.head(x)                                               # (B, N_m, h, w, c)


class iTPNPaperPretrainer(iTPNPixelPretrainer):
    """Eq. 4: L = L_MIM + lambda * sum_s L_MFM^s, lambda = 0.3; not in the released code, built from Sec. 3.3.

    L_MIM is the pixel recipe's loss, decoded from V = the sum of the levels (section 6). L_MFM^s is a function of
    V^s alone (Fast-iTPN paper, Eq. 4: h^{pt,s}(V^s), "x^s has the same spatial resolution as V^s"): the LevelDecoder
    of level s reads that level only and predicts the EMA teacher's stage-s features x^s at the masked units, so
    each term trains its own level and, through it, the pyramid and backbone below (tested).
    Our choices where the paper is brief:
    * The teacher is an EMA copy of the backbone only (`ema_update`: t = m t + (1 - m) s, m = 0.996 constant): the
      paper takes the targets "from the last layer of each stage", which the backbone alone produces.
    * The teacher encodes only the masked units (ids_keep = the masked indices); for stages 1-2, which never mix
      units, this equals encoding the full image and selecting them (tested).
    * V^s holds the visible units only (MAE-style dropping), so a masked unit must be filled and decoded before
      the per-sub-token head h^{pt,s} can read it: one LevelDecoder per level, each `mfm_decoder_depth` = 1
      attention block at the pixel decoder's width D and heads. One block: a light decoder (FastMIM decodes its
      HOG features with one), and the three levels add 3 blocks to the 8 of the MIM decoder. Not shared between
      levels: Eq. 4 indexes h^{pt,s} by s, the levels are different feature spaces (strides 16 / 8 / 4, targets of
      C, C/2, C/4 channels), and separate weights keep each term's parameters its own.
    * Targets are layer-normalised per sub-token (no affine); L_MFM^s is the squared error averaged over the
      masked units, their sub-tokens and channels; L_MFM sums the 3 stages.
    out["logs"]: loss_mim, loss_mfm and its terms loss_mfm_s16, loss_mfm_s8, loss_mfm_s4; out["pred"] / "recon" are
    the pixel prediction as in the pixel recipe. For inspection and tests: out["ids_masked"] (B, N_m) the units the
    teacher saw, and out["mfm_targets"] [stride 16, 8, 4] the layer-normed teacher targets (B, N_m, h, w, c), no
    grad, in ids_masked order.
    """

    STRIDES = (16, 8, 4)                                                  # the pyramid's level order [p16, p8, p4]

    def __init__(self, arch: iTPNConfig, *, cfg: iTPNPretrainConfig):
        super().__init__(arch, cfg=cfg)
        c, f = self.encoder.cfg.embed_dim, self.encoder.cfg.fpn_dim
        # level s (1 x 1, 2 x 2, 4 x 4 sub-tokens per unit) predicts stage s of width C, C/2, C/4
        self.mfm_decoders = nn.ModuleList(
            LevelDecoder(f, scale=16 // s, out_dim=c * s // 16, dim=cfg.decoder_dim, depth=cfg.mfm_decoder_depth,
                         num_heads=cfg.decoder_heads) for s in self.STRIDES)
        self.teacher = make_teacher(self.encoder.backbone)               # frozen copy: no optimizer, no grad, eval

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()                                               # the teacher never drops paths
        return self

    def ema_update(self, progress: float | None = None) -> None:
        """Paper Sec. 3.3: teacher <- m * teacher + (1 - m) * student, with mim.py's one EMA rule.

        The paper gives one constant m (0.996), so `progress` (train.py passes step / total) is not used here; the
        argument exists so that every pre-trainer with a momentum teacher is driven the same way."""
        ema_update_(self.teacher, self.encoder.backbone, self.cfg.ema_momentum)

    @torch.no_grad()
    def mfm_targets(self, imgs: torch.Tensor, ids_masked: torch.Tensor) -> list[torch.Tensor]:
        """x^16, x^8, x^4: the EMA teacher's stage outputs at the masked units (Sec. 3.3: it sees only those),
        layer-normed per sub-token without affine (our choice): (B, N_m, 1, 1, C), (.., 2, 2, C/2), (.., 4, 4, C/4)."""
        feats = self.teacher.forward_features(imgs, ids_keep=ids_masked)  # [t4, t8, ..., t16]
        stages = (feats[-1][:, :, None, None, :], feats[1], feats[0])    # stride 16 as (B, N_m, 1, 1, C)
        return [F.layer_norm(t, t.shape[-1:]) for t in stages]

    def mfm_terms(self, levels, *, targets, ids_restore, ids_masked, grid_hw) -> list[torch.Tensor]:
        """[L_MFM^16, L_MFM^8, L_MFM^4]: term s reads level V^s (B, N_vis, h, w, F) and nothing else (Eq. 4)."""
        terms = []
        for decoder, level, target in zip(self.mfm_decoders, levels, targets):
            pred = decoder(level, ids_restore=ids_restore, ids_masked=ids_masked, grid_hw=grid_hw)   # (B, N_m, h, w, c)
            terms.append(l2_loss(pred.float().flatten(2), target.flatten(2)).mean())   # every unit here is masked
        return terms

    def forward(self, imgs):
        out, levels, ids_restore, ids_masked = self.forward_mim(imgs)    # levels of the visible units only
        targets = self.mfm_targets(imgs, ids_masked)
        terms = self.mfm_terms(levels, targets=targets, ids_restore=ids_restore, ids_masked=ids_masked,
                               grid_hw=check_image_size(imgs))
        loss_mim, loss_mfm = out["loss"], sum(terms)
        out["loss"] = loss_mim + self.cfg.mfm_weight * loss_mfm           # Eq. 4
        out["logs"] = {"loss_mim": loss_mim.detach(), "loss_mfm": loss_mfm.detach(),
                       **{f"loss_mfm_s{s}": t.detach() for s, t in zip(self.STRIDES, terms)}}
        out["ids_masked"], out["mfm_targets"] = ids_masked, targets
        return out


# ---- 8. Frozen-teacher distillation (the paper's CLIP variant) ----------------------------------------------------

def distillation_mask(batch_size: int, grid_hw: tuple[int, int], *, mask_ratio: float = DISTILL_MASK_RATIO):
    """BEiT block mask of the distillation recipes: (B, N), 1 = masked.

    75 of 196 units at 224 px with blocks of at least 16 units (BEiT's `MaskingGenerator` settings in the official
    CLIP recipe); at other grids both numbers scale with N.
    """
    n = grid_hw[0] * grid_hw[1]
    return block_masking(batch_size, grid_hw, round(mask_ratio * n), min_block=max(1, round(16 * n / 196)))


class FrozenTeacher(nn.Module):
    """A frozen ViT that maps the student's batch to per-unit targets (B, N, T).

    imgs (ImageNet-normalised, as train.py feeds the student) -> raw pixels -> the teacher's own normalisation ->
    resized so the teacher's token grid equals the student's unit grid -> last layer (+ CLIP projection) ->
    LayerNorm without affine (eps 1e-5), as the official target (`itpn_clip/clip/create_clip.py`). The official
    code feeds the teacher a separately resized image that its CLIP input scaling effectively sees as (x+1)/2 of a
    [0, 1] image; that is not replicated.
    """

    def __init__(self, vit: VisionTransformer, *, proj: torch.Tensor | None, pixel_mean, pixel_std):
        super().__init__()
        self.vit = vit.requires_grad_(False).eval()
        self.register_buffer("proj", proj)                                # (C_t, T) or None (no projection)
        self.out_dim = proj.shape[1] if proj is not None else vit.cfg.embed_dim   # T
        shift = torch.tensor(IMAGENET_MEAN) - torch.tensor(pixel_mean)
        self.register_buffer("in_scale", (torch.tensor(IMAGENET_STD) / torch.tensor(pixel_std))[:, None, None],
                             persistent=False)                            # (3, 1, 1)
        self.register_buffer("in_shift", (shift / torch.tensor(pixel_std))[:, None, None], persistent=False)

    def train(self, mode: bool = True):
        return super().train(False)                                       # always eval: frozen

    @torch.no_grad()
    def forward(self, imgs):
        x = imgs * self.in_scale + self.in_shift                          # ImageNet-normalised -> teacher-normalised
        p = self.vit.cfg.patch_size
        hp, wp = check_image_size(imgs)
        if p != UNIT:                                                     # e.g. CLIP-L/14: 14 px per token
            x = F.interpolate(x, size=(hp * p, wp * p), mode="bicubic", align_corners=False)   # (B, 3, Hp*p, Wp*p)
        tokens = self.vit.forward_features(x)[-1]                         # (B, N, C_t), after the final LN
        if self.proj is not None:
            tokens = tokens @ self.proj                                   # (B, N, T)
        return F.layer_norm(tokens, tokens.shape[-1:], eps=1e-5)


def clip_to_vit_state_dict(sd: dict) -> tuple[ViTConfig, dict, torch.Tensor]:
    """OpenAI-CLIP visual state_dict -> (ViTConfig, hivit.VisionTransformer state_dict, projection (C, T)).

    Accepted layout (keys optionally prefixed `visual.`; text-tower keys are ignored): conv1.weight (C, 3, p, p)
    (no bias), class_embedding (C,), positional_embedding (1 + G*G, C), ln_pre, transformer.resblocks.{i}.{ln_1,
    attn.in_proj_weight (3C, C), attn.in_proj_bias, attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}, ln_post, proj (C, T).
    Heads = C / 64 (every OpenAI CLIP ViT); QuickGELU, LayerNorm eps 1e-5.
    """
    sd = {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")} or sd
    needed = ("conv1.weight", "class_embedding", "positional_embedding", "proj",
              "transformer.resblocks.0.mlp.c_fc.weight")
    missing = [k for k in needed if k not in sd]
    if missing:
        raise ValueError(f"teacher has conv1.weight like an OpenAI-CLIP visual state_dict but lacks {missing}")
    c, _, p, _ = sd["conv1.weight"].shape
    g = math.isqrt(sd["positional_embedding"].shape[0] - 1)
    depth = len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")})
    cfg = ViTConfig(img_size=g * p, patch_size=p, embed_dim=c, depth=depth, num_heads=max(1, c // 64),
                    mlp_ratio=sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / c, class_token=True,
                    pre_norm=True, quick_gelu=True, ln_eps=1e-5, num_classes=0)
    pos = sd["positional_embedding"]
    out = {"patch_embed.weight": sd["conv1.weight"], "patch_embed.bias": torch.zeros(c),   # CLIP's conv has no bias
           "cls_token": sd["class_embedding"].reshape(1, 1, c),          # (1, 1, C)
           "cls_pos_embed": pos[:1][None], "pos_embed": pos[1:][None]}   # (1, 1, C), (1, G*G, C)
    renames = {"ln_pre.": "norm_pre.", "ln_post.": "norm.", "ln_1.": "norm1.", "ln_2.": "norm2.",
               "attn.in_proj_weight": "attn.qkv.weight", "attn.in_proj_bias": "attn.qkv.bias",
               "attn.out_proj.": "attn.proj.", "mlp.c_fc.": "mlp.fc1.", "mlp.c_proj.": "mlp.fc2."}
    for key, value in sd.items():
        if key.startswith(("ln_pre.", "ln_post.", "transformer.resblocks.")):
            new = key.replace("transformer.resblocks.", "blocks.")
            for old, ours in renames.items():
                new = new.replace(old, ours)
            out[new] = value
    return cfg, out, sd["proj"].float()                                  # released CLIP weights are often fp16


def project_to_vit_state_dict(ckpt: dict) -> tuple[ViTConfig, dict]:
    """A checkpoint written by this project: a hivit.VisionTransformer state_dict, bare or under 'model' /
    'module' / 'state_dict' (hivit.unwrap_checkpoint, which also strips DDP's 'module.'), keys optionally
    prefixed (e.g. `encoder.` in a train.py checkpoint of mim.py's MAE on a ViT).

    Sizes are read from the shapes. The head count is not in any shape: it comes from a saved 'config' dict with
    num_heads, else from the ViT preset named by train.py's 'args' {'model': 'vit_b', ...}, else C / 64.
    quick_gelu and ln_eps come from 'config' when present (defaults: GELU, eps 1e-6). 'config' is either the
    ViTConfig fields themselves or train.py's {'model': ViTConfig fields, 'method': ...}.
    """
    sd = unwrap_checkpoint(ckpt)                                          # {'model'|'module'|'state_dict': sd}
    anchor = next((k for k in sd if k.endswith("patch_embed.weight")), None)
    if anchor is None:
        raise ValueError("teacher checkpoint is neither an OpenAI-CLIP visual state_dict (conv1.weight) nor a "
                         "hivit.VisionTransformer state_dict (patch_embed.weight)")
    prefix = anchor[: -len("patch_embed.weight")]
    sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    missing = [k for k in ("pos_embed", "blocks.0.mlp.fc1.weight") if k not in sd]
    if missing:
        raise ValueError(f"teacher has {anchor} like a hivit.VisionTransformer state_dict but lacks "
                         f"{[prefix + k for k in missing]}")
    saved = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else {}
    saved = saved["model"] if isinstance(saved.get("model"), dict) else saved   # train.py: {"model", "method"}
    run_args = ckpt.get("args") if isinstance(ckpt.get("args"), dict) else {}
    c, _, p, _ = sd["patch_embed.weight"].shape
    heads = saved.get("num_heads") or getattr(VIT_PRESETS.get(run_args.get("model")), "num_heads", None)
    if heads is None:                                                     # nothing in the file says it
        heads = max(1, c // 64)
        warnings.warn(f"the teacher file records no head count (no 'config' with num_heads, no train.py 'args' "
                      f"naming a ViT preset): assuming 64-d heads, {heads} head(s) of width {c}. A teacher trained "
                      f"with another count gives wrong targets: save it as {{'model': state_dict, 'config': "
                      f"{{'num_heads': H}}}} (train.py checkpoints record it)")
    cfg = ViTConfig(img_size=math.isqrt(sd["pos_embed"].shape[1]) * p, patch_size=p, embed_dim=c,
                    depth=len({k.split(".")[1] for k in sd if k.startswith("blocks.")}), num_heads=heads,
                    mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / c, class_token="cls_token" in sd,
                    pre_norm="norm_pre.weight" in sd, quick_gelu=saved.get("quick_gelu", False),
                    ln_eps=saved.get("ln_eps", LN_EPS), num_classes=0)
    return cfg, {k: v for k, v in sd.items() if not k.startswith(("head.", "fc_norm."))}   # classifier head unused


def load_teacher(path: str) -> FrozenTeacher:
    """Build a FrozenTeacher from a local file: an OpenAI-CLIP image encoder or a project ViT (see the two mappers).

    Never downloads. The file is read by hivit.read_checkpoint (a ValueError per kind of unreadable file), then
    (hivit.check_state_dict) a KeyError names missing/unexpected keys and a ValueError every tensor whose shape
    disagrees with the architecture read from the file. A project ViT file that records no head count gets 64-d
    heads and a warning that says so.
    """
    ckpt = read_checkpoint(path, what="teacher")
    flat = unwrap_checkpoint(ckpt)                                        # {'model'|'module'|'state_dict': sd}
    if any(k.endswith("conv1.weight") for k in flat):
        cfg, sd, proj = clip_to_vit_state_dict(flat)
        mean, std = CLIP_MEAN, CLIP_STD
    else:
        (cfg, sd), proj = project_to_vit_state_dict(ckpt), None
        mean, std = IMAGENET_MEAN, IMAGENET_STD                           # trained on the student's normalisation
    vit = VisionTransformer(cfg)
    expected = {k: v.shape for k, v in vit.state_dict().items()}
    found = dict(sd)
    if proj is not None:                                                  # CLIP's projection: (C, any T)
        expected["proj"], found["proj"] = (cfg.embed_dim, proj.shape[-1]), proj
    check_state_dict(found, expected, what=f"teacher {path} does not match a ViT of width {cfg.embed_dim}, depth "
                                           f"{cfg.depth}, patch {cfg.patch_size} (read from the file)",
                     hint="an OpenAI-CLIP visual state_dict or a ViT checkpoint written by this project")
    vit.load_state_dict(sd)
    return FrozenTeacher(vit, proj=proj, pixel_mean=mean, pixel_std=std)


class PyramidDistillation(nn.Module):
    """Frozen-teacher distillation on a pyramid: what iTPN's recipe (Sec. 3.4) and Fast-iTPN's (fast_itpn.py) share.

    The teacher (`load_teacher`) maps the batch to per-unit targets (B, N, T). The main head reads the pyramid:
    each level is space-to-depth'ed to C per unit (LevelEmbed) and the three are summed, then LN and Linear(C, T)
    (official `itpn_clip/modeling_pretrain.py`: `decoder_embed`, `norm`, `lm_head`). The loss is the recipe's
    `distill_loss` averaged over ALL units, as released. A subclass builds `self.encoder` (with its pyramid).
    """

    num_views = 1

    def __init__(self, *, cfg: iTPNPretrainConfig, teacher_path: str, embed_dim: int, fpn_dim: int):
        super().__init__()
        if cfg.distill_loss not in ("smooth_l1", "cosine"):
            raise ValueError(f"distill_loss must be 'smooth_l1' or 'cosine', got {cfg.distill_loss!r}")
        self.cfg = cfg
        self.teacher = load_teacher(teacher_path)                         # frozen, requires_grad=False, always eval
        c = embed_dim
        self.decoder_embed = nn.ModuleList(LevelEmbed(fpn_dim, out_dim=c // (s * s)) for s in (1, 2, 4))
        self.norm = nn.LayerNorm(c, eps=LN_EPS)
        self.lm_head = nn.Linear(c, self.teacher.out_dim)
        for part in (self.decoder_embed, self.norm, self.lm_head):
            part.apply(init_weights)

    def main_prediction(self, levels: list[torch.Tensor]) -> torch.Tensor:
        """[p16, p8, p4] over all N units -> (B, N, T): summed level embeddings (the teacher's grid), LN, head."""
        merged = sum(embed(level) for embed, level in zip(self.decoder_embed, levels))   # (B, N, C)
        return self.lm_head(self.norm(merged))                            # (B, N, T)

    def distill_loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Smooth-L1 (official `itpn_clip/engine_for_pretraining.py`) or 1 - cos (Fast-iTPN paper), all units."""
        return LOSSES[self.cfg.distill_loss](pred, target).mean()


class iTPNDistillPretrainer(PyramidDistillation):
    """Frozen-teacher distillation as released (`itpn_clip/modeling_pretrain.py`, `iTPNClipDistill`).

    Block masking (`distillation_mask`); stages 1-2 see every unit and masked units become a mask token at the
    stage-3 input (BEiT-style, `forward_features_for_pretraining`); two heads supervise ALL units with equal
    weights: main = the pyramid head of PyramidDistillation, and aux = aux_head(aux_norm(2 attention blocks on the
    output of stage-3 block int(0.75 * depth), 0-based: 19 of 24 for iTPN-B)), the 2 blocks with LayerNorm eps 1e-5
    as released. The pyramid prediction of a masked unit sees its own pixels through the stage-1/2 laterals (as in
    the official code); no other unit does, and the aux head does not (tested). The teacher width T is read from
    the teacher file.
    out = {"loss", "mask" (B, N), "pred" main (B, N, T), "logs": {loss_main, loss_aux}}.
    """

    ARCH_OVERRIDES = dict(num_classes=0, rpe=True, layer_scale=0.1, fpn_depth=1)   # clip_tpn_*: RPE, gamma 0.1

    def __init__(self, arch: iTPNConfig, *, cfg: iTPNPretrainConfig, teacher_path: str):
        arch = replace(arch, **self.ARCH_OVERRIDES)
        super().__init__(cfg=cfg, teacher_path=teacher_path, embed_dim=arch.embed_dim, fpn_dim=arch.fpn_dim)
        self.encoder = iTPN(arch)
        c = arch.embed_dim
        self.mask_token = nn.Parameter(torch.zeros(1, 1, c))             # replaces masked units at the stage-3 input
        # Early supervision: tap after block int(0.75 * depth), 0-based, + 2 fresh attention blocks with the next two
        # drop-path rates of the main schedule and torch's default LayerNorm eps 1e-5 (official `cls_pt_layers`).
        self.aux_index = int(0.75 * arch.depth)
        n_early = 0 if arch.plain_vit else arch.mlp_depth1 + arch.mlp_depth2   # blocks before stage 3
        first = n_early + self.aux_index
        dpr = drop_path_rates(arch.drop_path_rate, n_early + arch.depth)[first:first + 2]
        rpe_grid = self.encoder.grid if arch.rpe and not arch.plain_vit else None
        self.aux_blocks = nn.ModuleList(
            AttentionBlock(c, num_heads=arch.num_heads, mlp_ratio=arch.mlp_ratio, drop_path=p,
                           layer_scale=arch.layer_scale, rpe_grid=rpe_grid, ln_eps=1e-5) for p in dpr)
        self.aux_norm = nn.LayerNorm(c, eps=LN_EPS)
        self.aux_head = nn.Linear(c, self.teacher.out_dim)
        for part in (self.aux_blocks, self.aux_norm, self.aux_head):
            part.apply(init_weights)
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    def forward(self, imgs):
        grid_hw = check_image_size(imgs)
        mask = distillation_mask(imgs.shape[0], grid_hw, mask_ratio=self.cfg.distill_mask_ratio).to(imgs.device)
        feats = self.encoder.forward_features(imgs, mask=mask, mask_token=self.mask_token)   # all N units
        levels = self.encoder.pyramid(feats[0], feats[1], feats[-1])     # [p16, p8, p4], (B, N, h, w, F)
        main = self.main_prediction(levels)                               # (B, N, T)
        aux = feats[2 + self.aux_index]                                   # (B, N, C): after block aux_index
        rpe_index = self.encoder.rpe_index(grid_hw)
        for blk in self.aux_blocks:
            aux = blk(aux, rpe_index=rpe_index, grid_hw=grid_hw)
        aux = self.aux_head(self.aux_norm(aux))                           # (B, N, T)
        target = self.teacher(imgs)                                       # (B, N, T), no grad
        loss_main, loss_aux = self.distill_loss(main, target), self.distill_loss(aux, target)
        return {"loss": loss_main + loss_aux, "mask": mask, "pred": main,
                "logs": {"loss_main": loss_main.detach(), "loss_aux": loss_aux.detach()}}


# ---- 9. Recipe presets and METHODS: what train.py builds ----------------------------------------------------------

# Method name -> recipe; a pre-trainer is built as METHODS[name](PRESETS[size], cfg=PRETRAIN_PRESETS[name]) (header).
PRETRAIN_PRESETS: dict[str, iTPNPretrainConfig] = {
    "itpn": iTPNPretrainConfig(),                                         # Eq. 4: pixel MIM + 0.3 MFM, EMA 0.996
    "itpn_pixel": iTPNPretrainConfig(),                                   # official itpn_*_dec512d8b: 8b512d, 0.75
    "itpn_distill": iTPNPretrainConfig(),                                 # official CLIP recipe: smooth-L1
    "itpn_distill_cosine": iTPNPretrainConfig(distill_loss="cosine"),     # the loss of the Fast-iTPN paper
}
METHODS: dict[str, type[nn.Module]] = {"itpn": iTPNPaperPretrainer, "itpn_pixel": iTPNPixelPretrainer,
                                       "itpn_distill": iTPNDistillPretrainer,
                                       "itpn_distill_cosine": iTPNDistillPretrainer}


# ---- 10. Loading official checkpoints -----------------------------------------------------------------------------

# Official prefix -> ours, for everything outside the backbone (the backbone goes through hivit.map_official_key).
# Names are in a pre-trainer's namespace; an iTPN backbone uses the "encoder." ones without that prefix.
OFFICIAL_NAMES = {
    "align_dim_16tofpn.": "encoder.pyramid.proj16.", "split_16to8.": "encoder.pyramid.split16.",
    "align_dim_16to8.": "encoder.pyramid.lateral8.", "block_16to8.": "encoder.pyramid.fuse8.",
    "split_8to4.": "encoder.pyramid.split8.", "align_dim_8to4.": "encoder.pyramid.lateral4.",
    "block_8to4.": "encoder.pyramid.fuse4.", "fpn_modules.0.": "encoder.pyramid.out16.",
    "fpn_modules.1.": "encoder.pyramid.out8.", "fpn_modules.2.": "encoder.pyramid.out4.",
    "cls_pt_layers.": "aux_blocks.", "norm_cls.": "aux_norm.", "lm_cls_head.": "aux_head.",
}
BACKBONE_PREFIXES = ("absolute_pos_embed", "patch_embed.", "blocks.", "fc_norm.", "head.")


def map_itpn_key(key: str, cfg: iTPNConfig) -> str | None:
    """Official iTPN key -> our pre-trainer key (None for derived buffers); unknown keys pass through unchanged."""
    if key.endswith("relative_position_index"):                          # derived, recomputed here
        return None
    if key.startswith(BACKBONE_PREFIXES):
        return "encoder.backbone." + map_official_key(key, mlp_depth1=cfg.mlp_depth1, mlp_depth2=cfg.mlp_depth2)
    for old, new in OFFICIAL_NAMES.items():
        if key.startswith(old):
            rest = key[len(old):]
            if new.startswith("encoder.pyramid."):                       # C-MLP blocks: norm2 -> norm (as hivit)
                rest = rest.replace("norm2.", "norm.")
            return new + rest
    if key.startswith("decoder_embed."):                                  # decoder_embed.{i}.{0: LN, 1: Linear}
        _, i, j, rest = key.split(".", 3)
        return f"decoder_embed.{i}.{('norm', 'proj')[int(j)]}.{rest}"
    return key                                                            # mask_token, decoder_*, norm, lm_head


def load_official(model: nn.Module, state_dict: dict) -> list[str]:
    """Strictly load a released iTPN checkpoint; returns the official keys that were ignored.

    - iTPN classifier (num_classes > 0) <- `itpn_*_finetune` / `itpn_*_clip_finetune` (via hivit.load_official);
    - iTPN backbone (num_classes = 0)   <- any pre-training layout: backbone + pyramid, the heads are ignored;
                                           the det/seg layouts into DENSE_PRESETS (mmdet / mmseg files: the
                                           `backbone.*` keys, the heads' keys are ignored);
    - iTPNPixelPretrainer               <- `itpn_*_pixel_pretrain` (build with ape_quirk=True for output parity);
    - iTPNDistillPretrainer             <- `itpn_*_clip_pretrain` (our teacher is not in the file, it stays).
    Errors (hivit.check_state_dict) name missing and unexpected keys by our names and every shape mismatch. Strict
    also means that using a depth-2 pyramid checkpoint with fpn_depth=1 (the official det recipe) drops the
    `block_*.1` keys on purpose, where the official code drops them silently. The paper pre-trainer has no official
    layout (the released code has no MFM) and raises TypeError.
    """
    if isinstance(model, iTPN) and model.cfg.num_classes > 0:
        return load_official_hivit(model.backbone, state_dict)
    if isinstance(model, iTPNPaperPretrainer) or not isinstance(model, (iTPN, iTPNPixelPretrainer,
                                                                        iTPNDistillPretrainer)):
        raise TypeError(f"no official checkpoint layout for {type(model).__name__}: the released code has a "
                        f"classifier, a pixel pre-trainer and a CLIP pre-trainer only")
    sd = unwrap_checkpoint(state_dict)                                    # where official scripts keep the weights
    is_backbone = isinstance(model, iTPN)
    arch = model.cfg if is_backbone else model.encoder.cfg
    mapped, ignored = {}, []
    if is_backbone and any(k.startswith("backbone.") for k in sd):       # mmdet / mmseg: heads beside backbone.*
        ignored = [k for k in sd if not k.startswith("backbone.")]
        sd = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    if any(k.endswith((".rel_pos_h", ".rel_pos_w")) for k in sd):
        raise ValueError("this checkpoint's attention uses ViTDet's decomposed relative positions (rel_pos_h / "
                         "rel_pos_w: the official large CLIP detection backbone with rpe=True), which this iTPN does "
                         "not implement; DENSE_PRESETS lists the layouts it loads")
    for key, value in sd.items():
        new = map_itpn_key(key, arch)
        if new is not None and is_backbone:
            new = new[len("encoder."):] if new.startswith("encoder.") else None   # heads: not part of a backbone
        if new is None:
            ignored.append(key)
            continue
        mapped[new] = value
    expected = {k: v.shape for k, v in model.state_dict().items()
                if not k.startswith("teacher.")}                          # the frozen teacher comes from its own file
    check_state_dict(mapped, expected, what=f"official checkpoint does not match {type(model).__name__}",
                     hint="check the preset: depths, fpn_depth, rpe, layer_scale, img_size, and the teacher's width; "
                          "official det/seg backbones: DENSE_PRESETS")
    model.load_state_dict(mapped, strict=not isinstance(model, iTPNDistillPretrainer))
    return ignored


# ---- 11. Smoke demo -----------------------------------------------------------------------------------------------

if __name__ == "__main__":
    import tempfile

    torch.manual_seed(0)
    arch = PRESETS["tiny"]
    x = torch.randn(2, 3, 64, 64)
    backbone = iTPN(replace(arch, num_classes=0))
    levels = backbone.forward_levels(x)
    print("pyramid levels (p16, p8, p4):", [tuple(p.shape) for p in levels])
    print("dense maps:", {k: tuple(v.shape) for k, v in backbone.forward_pyramid(x).items()})
    with tempfile.TemporaryDirectory() as tmp:                            # a tiny random ViT teacher (our layout)
        teacher_path = os.path.join(tmp, "teacher.pth")
        torch.save(VisionTransformer(ViTConfig(img_size=64, embed_dim=32, depth=1, num_heads=2,
                                               num_classes=0)).state_dict(), teacher_path)
        pretrainers = {}
        for name, method in METHODS.items():
            teacher = {"teacher_path": teacher_path} if issubclass(method, PyramidDistillation) else {}
            pretrainers[name] = method(arch, cfg=tiny_decoder(PRETRAIN_PRESETS[name]), **teacher)
    pretrainers["itpn_vit_tiny pixel"] = iTPNPixelPretrainer(PRESETS["itpn_vit_tiny"],
                                                             cfg=tiny_decoder(PRETRAIN_PRESETS["itpn_pixel"]))
    for name, model in pretrainers.items():
        out = model(x)
        out["loss"].backward()
        logs = ", ".join(f"{k} {v.item():.3f}" for k, v in out["logs"].items())
        print(f"{name:20s} loss {out['loss'].item():.4f} ({logs}), pred {tuple(out['pred'].shape)}, "
              f"mask {tuple(out['mask'].shape)}")
    pretrainers["itpn"].ema_update()
    for name in ("itpn_b", "itpn_l", "itpn_vit_b"):
        print(f"{name}: classifier {count_params(iTPN, PRESETS[name]) / 1e6:.3f}M, backbone + pyramid "
              f"{count_params(iTPN, replace(PRESETS[name], num_classes=0)) / 1e6:.3f}M parameters")
    for name, cfg in DENSE_PRESETS.items():                               # the released det/seg backbones
        print(f"{name}: {count_params(iTPN, cfg) / 1e6:.3f}M parameters, built for {cfg.img_size} px, LayerNorm "
              f"eps {cfg.ln_eps}, forward_pyramid(x, mode={name.rsplit('_', 1)[1]!r})")
