"""Masked image modeling: MAE, SimMIM / FastMIM(-P) with HOG targets, and M3I with its 12 special cases.

Paper:
    MAE: Masked Autoencoders Are Scalable Vision Learners (He et al., CVPR 2022, arXiv 2111.06377).
    FastMIM: Expediting Masked Image Modeling Pre-training for Vision (Guo et al., arXiv 2212.06593), with
        MaskFeat's HOG target (Wei et al., arXiv 2112.09133) and SimMIM (Xie et al., arXiv 2111.09886).
    M3I: Towards All-in-one Pre-training via Maximizing Multi-modal Mutual Information (Su et al., CVPR 2023,
        arXiv 2211.09807); its inter-view branch follows SiameseIM (Tao et al., arXiv 2206.01204).

Implements:
    The shared pieces of masked image modeling (unit masking, pixel / HOG / teacher targets, losses) and three
    pre-training methods as nn.Modules that wrap any encoder of hivit.py / itpn.py / fast_itpn.py through its public
    seam `forward_features(x, ids_keep=None)[-1] -> (B, N_vis, C)`. M3I is one configurable module; the 12
    self-supervised rows of M3I Tab. 2 are presets of it.

Sections:
    1. Config and presets             <-> MAE Tab. 1, FastMIM Tab. 11, M3I Tab. 2 / Sec. 3.4
    2. Masking (one convention)        <-> MAE Sec. 3 "random sampling", BEiT blockwise masking, FastMIM Sec. 4.1
    3. Pixel targets                   <-> MAE Sec. 3 "reconstruction target" (norm_pix_loss)
    4. HOG target                      <-> FastMIM Sec. 4.1, MaskFeat Sec. 3
    5. Losses                          <-> M3I Sec. 3.1: Gaussian -> L2, Boltzmann -> softmax CE / InfoNCE
    6. Decoders and heads              <-> MAE Fig. 1, FastMIM Tab. 16, M3I Sec. 3.4 / Fig. 2, CAE attention pooling
    7. Momentum (EMA) teacher          <-> M3I Sec. 3.4 "target encoder", BYOL/MoCo EMA rule
    8. MAE                             <-> MAE Sec. 3
    9. SimMIM / FastMIM / FastMIM-P    <-> FastMIM Sec. 4.1-4.2, Tab. 1c (depth truncation)
    10. M3I and its 12 special cases   <-> M3I Sec. 3.3-3.4, Fig. 2, Tab. 2
    11. METHODS: what train.py builds
    12. __main__ smoke demo

Shapes:
    B batch, C encoder width (stage 3), H, W image size, Hp, Wp grid of units (16x16 px: the encoder's last-stage
    patch), N = Hp*Wp units, N_vis visible units, D decoder width, P = p*p*3 pixels of one unit, K classes,
    T text length. mask: (B, N) float in original unit order, **1 = removed (masked), 0 = kept (visible)**.
    ids_keep (B, N_vis), ids_restore (B, N) as in MAE (see section 2).

Differences from the papers / official code (and our choices where the papers are silent):
    - Visible count: `round(N * (1 - mask_ratio))` (MAE: int()); equal for every paper setting (196 * 0.25 = 49),
      but int() silently loses a unit to float error (10 * (1 - 0.9) = 0.999..).
    - MAE on HiViT: no CLS token (HiViT has none); a LayerNorm is applied to the encoder output before the decoder
      (the plain ViT already ends with one; a second is harmless). Decoder init is PyTorch/trunc-normal, not Xavier.
    - SimMIM here means FastMIM's formulation at 224 px (mask the RGB input with a learnable 3-d token, all tokens
      encoded, light decoder, pixel target) with a smooth-L1 loss on masked units (SimMIM proper: L1, 32-px mask
      units, ratio 0.6, mask token in embedding space).
    - HOG is always computed in fp32 with autocast disabled (FastMIM's copy raises under AMP), from the normalised
      input, per colour channel (27 = 3 x 9 values per cell); per-cell L2 normalisation is tied to norm_pix_loss
      exactly as in FastMIM's code.
    - FastMIM-P: the resolution schedule `img_sizes` is a list of (fraction of training, side) pairs; nothing in
      this file is built for one resolution (HOG cells, masks, position tables and relative-position tables are
      all derived from the input each call), so a switch needs no rebuild and keeps every optimizer moment.
    - Depth truncation (FastMIM Tab. 1c) is done by building the encoder with fewer blocks
      (`truncate_encoder_config`); fine-tuning loads it into the full-depth model, the last k blocks fresh.
    - M3I (no code released; reference notes Sec. 3.6 list the open points). Our choices:
      * train.py hands one crop per image, (B, 3, H, W), or two photometric variants of the SAME crop,
        (B, 2, 3, H, W). The second, "other" view is cut from it here by a random resized crop + flip
        (`random_resized_views`), so the crop geometry that the decoder positions need is known exactly.
        Target view v_k = the crop itself. No per-view colour augmentation beyond what train.py supplies.
      * Mixing: per-sample random unit mask with `mix_ratio` 0.5 of the units from image j = sigma(i), sigma a
        random batch permutation; both halves are exact counts. No "which image" embedding (paper mentions none).
      * Dense feature targets: the EMA encoder on the full target view, LayerNorm without affine (SiameseIM),
        L2 loss on ALL target positions (not only the positions hidden by the other image); no UniGrad term.
      * One 4-block decoder shared by images i and j: visible tokens of that image + one query per target-view
        unit; positions are 4-d (row, col, log scale h, log scale w) in units of the INPUT view's patches from its
        top-left corner, sin-cos encoded then a learnable Linear, used for visible tokens and queries alike.
      * Global-feature rows (c, f, i, l): attention pooling + Linear on the encoder tokens, target = GAP of the
        EMA features, InfoNCE with tau = 0.2 over the batch (the negatives prevent collapse).
      * Category target (needs labels): attention pooling over the image's own tokens + Linear, logits against a
        learned category embedding (K x C), softmax CE with each image's own label (no label mixing).
      * Text target (needs captions): bytes -> 2-layer transformer -> mean pool; CLIP-style InfoNCE against the
        attention-pooled image vector. Loss terms are summed with weight 1 (paper Eq. 4 is an unweighted sum).
      * EMA momentum: constant `momentum`, or SiameseIM's cosine ramp to 1 when train.py passes `progress`.

Run:
    python mim.py                                                      # CPU smoke demo, every method, ~20 s
    torchrun --nproc_per_node 8 train.py --model hivit_b --method mae  # pre-training (train.py drives this file)

How train.py builds a method (PRETRAINER CONTRACT, contracts.md):
    cfg = replace(mim.PRESETS[name], ...)                   # e.g. mask_ratio=args.mask_ratio
    encoder = HiViT(replace(hivit.PRESETS[model], num_classes=0, depth=...))   # no head: every param must train;
                                                            # FastMIM depth truncation: mim.truncate_encoder_config
    pretrainer = mim.METHODS[name](encoder, cfg=cfg)        # "mae", "simmim", "fastmim", "fastmim_p", "m3i",
                                                            # and the 12 "m3i_a_..." .. "m3i_l_..." presets
    side = mim.img_size_at(cfg, progress=epoch / epochs)    # crop size of this epoch (FastMIM 128, FastMIM-P steps)
    out = pretrainer(imgs)                                  # imgs (B, 3, H, W) or (B, 2, 3, H, W) if num_views == 2
    out = pretrainer(imgs, labels=y, captions=t)            # only if cfg.num_classes > 0 / cfg.text_target
    pretrainer.ema_update(progress=step / total_steps)      # after each optimizer step, if the method has it
"""

import copy
import math
import random
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from hivit import AttentionBlock, check_image_size, sincos_pos_embed_2d

__all__ = [
    "MIMConfig", "PRESETS", "M3I_PRESET_NAMES", "tiny_decoder", "img_size_at", "truncate_encoder_config",
    "random_masking", "block_masking", "mask_to_map", "ids_from_mask",
    "patchify", "unpatchify", "norm_pix", "masked_mean", "hog", "hog_targets",
    "l2_loss", "smooth_l1_loss", "cosine_loss", "cross_entropy_loss", "info_nce_loss", "LOSSES",
]


# ---- 1. Config and presets ----------------------------------------------------------------------------------------

@dataclass
class MIMConfig:
    mask_ratio: float = 0.75          # fraction of units removed (MAE Tab. 1: 0.75); 0 = full input
    mask_pattern: str = "random"      # "random" (MAE argsort of noise) or "block" (BEiT blockwise, SiameseIM)
    target: str = "pixel"             # "pixel", "hog", "dense_feature" (EMA teacher) or "global_feature" (its GAP)
    norm_pix_loss: bool = True        # pixels: per-unit mean/std normalised; HOG: per-cell L2 normalised (FastMIM)
    loss: str = "l2"                  # key of LOSSES: "l2", "smooth_l1", "cosine", "info_nce"
    loss_on_masked: bool = True       # average over masked units only (MAE, FastMIM) or all target units (M3I)
    decoder_dim: int = 512            # D (MAE 512, FastMIM ViT-B 256, M3I 512 here; SiameseIM 768)
    decoder_depth: int = 8            # decoder blocks (MAE 8, FastMIM ViT-B 1, M3I 4)
    decoder_heads: int = 16           # decoder heads (FastMIM: D / 32)
    input_view: str = "same"          # M3I Tab. 2: "same" = intra-view (input is the target view), "other" = inter
    mix_ratio: float = 0.0            # M3I Sec. 3.4: fraction of units taken from image j; 0 = no mixing
    num_classes: int = 0              # M3I category target over K classes (needs labels); 0 = off
    text_target: bool = False         # M3I text target (needs captions as byte tokens); off by default
    momentum: float = 0.995           # EMA teacher momentum m0 (SiameseIM: cosine from 0.995 to 1)
    temperature: float = 0.2          # tau of InfoNCE (MoCo v3-like, reference Tab. 2 row i)
    img_sizes: tuple = ((0.0, 224),)  # (fraction of training, side in px) schedule; FastMIM 128, FastMIM-P 3 steps


# The 12 self-supervised instantiations of M3I Tab. 2 (reference Sec. 3.5): input (same/other view, full/masked),
# target (dense pixels / dense feature / global feature) and loss. Masked intra-view rows use MAE's 0.75, masked
# inter-view rows SiameseIM's 118/196 ~ 0.6 blockwise; both are our choice (paper: not given).
_M3I = MIMConfig(decoder_dim=512, decoder_depth=4, decoder_heads=16, loss_on_masked=False, mask_ratio=0.0)
_PIX, _DENSE = dict(target="pixel", loss="l2"), dict(target="dense_feature", loss="l2")
_GLOBAL = dict(target="global_feature", loss="info_nce")
_INTRA_MASK, _INTER_MASK = dict(mask_ratio=0.75), dict(mask_ratio=0.6, mask_pattern="block")
M3I_TABLE2: dict[str, MIMConfig] = {
    "m3i_a_auto_encoder": replace(_M3I, **_PIX),                                          # 77.5 IN / 0.0 COCO
    "m3i_b_dense_distillation": replace(_M3I, **_DENSE),                                  # 78.8 / 32.4
    "m3i_c_global_distillation": replace(_M3I, **_GLOBAL),                                # 77.1 / 27.9
    "m3i_d_mim_pixel": replace(_M3I, **_PIX, **_INTRA_MASK, loss_on_masked=True),         # 83.1 / 46.8 (~ MAE)
    "m3i_e_mim_feat": replace(_M3I, **_DENSE, **_INTRA_MASK),                             # 83.3 / 47.4
    "m3i_f_mim_global": replace(_M3I, **_GLOBAL, **_INTRA_MASK),                          # 83.2 / 47.5
    "m3i_g_novel_view_synthesis": replace(_M3I, **_PIX, input_view="other"),              # 78.8 / 33.0
    "m3i_h_dense_instance_discrimination": replace(_M3I, **_DENSE, input_view="other"),   # 83.2 / 50.1
    "m3i_i_instance_discrimination": replace(_M3I, **_GLOBAL, input_view="other"),        # 83.0 / 46.4
    "m3i_j_siamese_im_pixel": replace(_M3I, **_PIX, **_INTER_MASK, input_view="other"),   # 78.9 / 38.1
    "m3i_k_siamese_im_feat": replace(_M3I, **_DENSE, **_INTER_MASK, input_view="other"),  # 83.7 / 49.8 (SiameseIM)
    "m3i_l_instance_discrimination_mask": replace(_M3I, **_GLOBAL, **_INTER_MASK, input_view="other"),  # 82.9/46.2
}
M3I_PRESET_NAMES = tuple(M3I_TABLE2)

PRESETS: dict[str, MIMConfig] = {
    "mae": MIMConfig(),                                                     # MAE: 8b512d decoder, norm-pix, 0.75
    "simmim": MIMConfig(loss="smooth_l1", decoder_dim=256, decoder_depth=1, decoder_heads=8),   # full input, 224
    "fastmim": MIMConfig(target="hog", decoder_dim=256, decoder_depth=1, decoder_heads=8,        # Tab. 11, ViT-B
                         img_sizes=((0.0, 128),)),                                              # 1b256d, 128 px
    "fastmim_p": MIMConfig(target="hog", decoder_dim=512, decoder_depth=4, decoder_heads=16,     # Sec. 4.2, Swin-L:
                           img_sizes=((0.0, 128), (0.5, 160), (0.75, 192))),                     # 200/100/100 ep
    "m3i": replace(_M3I, **_DENSE, mix_ratio=0.5, input_view="other"),     # Sec. 3.4 (+ num_classes / text_target)
    **M3I_TABLE2,
}


def tiny_decoder(cfg: MIMConfig) -> MIMConfig:
    """The same method with a 1-block 32-d decoder: for the tiny CPU encoders (tests, `python train.py` demo)."""
    return replace(cfg, decoder_dim=32, decoder_depth=1, decoder_heads=2)


def img_size_at(cfg: MIMConfig, progress: float) -> int:
    """Input side for the fraction `progress` in [0, 1] of training: the last step of `img_sizes` already reached."""
    return [side for start, side in cfg.img_sizes if start <= progress][-1]


def truncate_encoder_config(encoder_cfg, num_blocks: int):
    """FastMIM Tab. 1c: the encoder config with its last `num_blocks` attention blocks removed (ViT-B 12 -> 8/10).

    Works for HiViTConfig / ViTConfig (and any config with a `depth` field). Fine-tuning builds the full-depth
    model and loads the truncated checkpoint; the missing last blocks start from their random init.
    """
    if not 0 <= num_blocks < encoder_cfg.depth:
        raise ValueError(f"can remove 0..{encoder_cfg.depth - 1} blocks, not {num_blocks}")
    return replace(encoder_cfg, depth=encoder_cfg.depth - num_blocks)


# ---- 2. Masking (mask: 1 = removed, 0 = kept; one unit = the encoder's last-stage 16x16 patch) -------------------

def random_masking(batch_size: int, num_units: int, mask_ratio: float, *, device=None, generator=None):
    """MAE's per-sample random masking by argsort of uniform noise.

    Returns ids_keep (B, N_vis) long in shuffled order, ids_restore (B, N) long (argsort of ids_shuffle, so
    gathering [kept, removed] tokens with it restores the original order), and mask (B, N) float, 1 = removed.
    Every sample keeps exactly N_vis = round(N * (1 - mask_ratio)) units, which is what makes batching trivial.
    """
    num_keep = int(round(num_units * (1 - mask_ratio)))
    noise = torch.rand(batch_size, num_units, device=device, generator=generator)   # (B, N)
    ids_shuffle = noise.argsort(dim=1)                                    # ascending: small noise = keep
    ids_restore = ids_shuffle.argsort(dim=1)                              # (B, N)
    ids_keep = ids_shuffle[:, :num_keep]                                  # (B, N_vis)
    mask = torch.ones(batch_size, num_units, device=device)
    mask[:, :num_keep] = 0                                                # shuffled order: first N_vis are kept
    mask = torch.gather(mask, 1, ids_restore)                             # (B, N) back to original unit order
    return ids_keep, ids_restore, mask


def block_masking(batch_size: int, grid_hw: tuple[int, int], num_masked: int, *, min_block: int = 16,
                  generator=None) -> torch.Tensor:
    """BEiT blockwise masking: rectangles of >= min_block units (aspect 0.3..3.3) until num_masked are masked.

    Returns mask (B, N) float, 1 = removed, exactly num_masked ones per sample (topped up at random when the
    rectangles stall, as SiameseIM does). Python's RNG, seeded once from `generator`, keeps this fast and
    deterministic under a seed (the loop makes a few hundred scalar draws per sample).
    """
    hp, wp = grid_hw
    rng = random.Random(int(torch.randint(2**62, (1,), generator=generator)))
    log_aspect = (math.log(0.3), math.log(1 / 0.3))                     # BEiT's aspect range
    masks = []
    for _ in range(batch_size):
        m = torch.zeros(hp, wp)
        count, stalls = 0, 0
        while count < num_masked and stalls < 10:                         # BEiT: give up after 10 failed tries
            budget = num_masked - count
            area = rng.uniform(min_block, max(min_block, budget))
            aspect = math.exp(rng.uniform(*log_aspect))
            h, w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if not (0 < h <= hp and 0 < w <= wp):
                stalls += 1
                continue
            top, left = rng.randint(0, hp - h), rng.randint(0, wp - w)
            new = int((1 - m[top:top + h, left:left + w]).sum())
            if 0 < new <= budget:                                         # never overshoot the exact count
                m[top:top + h, left:left + w] = 1
                count, stalls = count + new, 0
            else:
                stalls += 1
        free = (m.flatten() == 0).nonzero().flatten().tolist()            # top-up to the exact count
        for idx in rng.sample(free, num_masked - count):
            m.view(-1)[idx] = 1
        masks.append(m.flatten())                                         # (N,)
    return torch.stack(masks)                                             # (B, N)


def ids_from_mask(mask: torch.Tensor):
    """(ids_keep (B, N_vis), ids_restore (B, N)) for a mask with the same number of zeros in every row.

    A stable sort puts kept units first (in raster order) then removed ones, so the result plugs into the same
    encoder/decoder path as random_masking.
    """
    ids_shuffle = mask.argsort(dim=1, stable=True)                        # (B, N): zeros (kept) first
    num_keep = int((mask[0] == 0).sum())
    return ids_shuffle[:, :num_keep], ids_shuffle.argsort(dim=1)          # (B, N_vis), (B, N)


def mask_to_map(mask: torch.Tensor, grid_hw: tuple[int, int], scale: int) -> torch.Tensor:
    """Unit mask (B, N) -> (B, Hp*scale, Wp*scale) map: every unit becomes a scale x scale square.

    This is how one mask stays aligned across pyramid levels: scale 4 / 2 / 1 gives the stride-4 / 8 / 16 feature
    maps of HiViT's units (the same layout as hivit.units_to_map), scale 16 gives the pixel mask.
    """
    hp, wp = grid_hw
    m = mask.reshape(-1, hp, 1, wp, 1)                                    # (B, Hp, 1, Wp, 1)
    m = m.expand(-1, -1, scale, -1, scale)                                # (B, Hp, s, Wp, s)
    return m.reshape(-1, hp * scale, wp * scale)                          # (B, Hp*s, Wp*s)


# ---- 3. Pixel targets ---------------------------------------------------------------------------------------------

def patchify(imgs: torch.Tensor, patch: int = 16) -> torch.Tensor:
    """(B, 3, H, W) -> (B, N, P) with P = p*p*3 ordered (row in patch, col in patch, channel), as MAE."""
    b, c, h, w = imgs.shape
    hp, wp = h // patch, w // patch
    x = imgs.reshape(b, c, hp, patch, wp, patch)                          # (B, 3, Hp, p, Wp, p)
    x = x.permute(0, 2, 4, 3, 5, 1)                                       # (B, Hp, Wp, p, p, 3)
    return x.reshape(b, hp * wp, patch * patch * c)                       # (B, N, P)


def unpatchify(x: torch.Tensor, grid_hw: tuple[int, int], patch: int = 16) -> torch.Tensor:
    """Inverse of patchify: (B, N, P) -> (B, 3, Hp*p, Wp*p)."""
    b = x.shape[0]
    hp, wp = grid_hw
    x = x.reshape(b, hp, wp, patch, patch, 3)                             # (B, Hp, Wp, p, p, 3)
    x = x.permute(0, 5, 1, 3, 2, 4)                                       # (B, 3, Hp, p, Wp, p)
    return x.reshape(b, 3, hp * patch, wp * patch)                        # (B, 3, H, W)


def norm_pix(target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """MAE's norm_pix_loss target: each unit minus its mean, over sqrt(unbiased var + eps), on the last dim."""
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)                                # unbiased, as torch's default in MAE
    return (target - mean) / (var + eps) ** 0.5


def masked_mean(per_unit: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of a (B, N) loss over the units where mask == 1 (MAE: loss on removed units only)."""
    return (per_unit * mask).sum() / mask.sum().clamp(min=1)              # clamp: an all-visible batch gives 0


# ---- 4. HOG target (MaskFeat / FastMIM) ---------------------------------------------------------------------------

HOG_BINS = 9      # unsigned orientation bins of 20 degrees (MaskFeat)
HOG_CELL = 8      # px per cell side; a 16-px unit owns 2x2 cells


def hog(imgs: torch.Tensor, *, normalize: bool = True) -> torch.Tensor:
    """MaskFeat-style HOG of (B, 3, H, W) images -> (B, 3*9, H/8, W/8), channel index = colour * 9 + bin.

    Per colour channel: reflect-pad 1, 3x3 Sobel gx/gy, magnitude sqrt(gx^2 + gy^2), orientation atan2(gx, gy)
    (MaskFeat's argument order) mapped to 9 unsigned bins by floor(angle * 9 / pi) mod 9 (hard voting), magnitudes
    summed over 8x8 cells, then each 9-bin histogram L2-normalised when `normalize`. Always fp32 with autocast off:
    under AMP the Sobel output would be half precision and the histogram sums lose their small entries.
    """
    with torch.autocast(device_type=imgs.device.type, enabled=False):
        x = imgs.float()
        b, c, h, w = x.shape
        sobel_x = x.new_tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]])   # (3, 3)
        kernels = torch.stack([sobel_x, sobel_x.t()])[:, None]           # (2, 1, 3, 3): gx, gy
        kernels = kernels.repeat(c, 1, 1, 1)                             # (2*3, 1, 3, 3), per colour channel
        padded = F.pad(x, (1, 1, 1, 1), mode="reflect")                  # (B, 3, H+2, W+2)
        grad = F.conv2d(padded, kernels, groups=c)                       # (B, 2*3, H, W)
        grad = grad.reshape(b, c, 2, h, w)                               # (B, 3, 2, H, W)
        gx, gy = grad[:, :, 0], grad[:, :, 1]                            # (B, 3, H, W) each
        magnitude = torch.sqrt(gx ** 2 + gy ** 2)
        angle = torch.atan2(gx, gy) * (HOG_BINS / math.pi)               # in [-9, 9]
        bins = angle.floor().long() % HOG_BINS                           # unsigned: theta and theta + pi share a bin
        hist = x.new_zeros(b, c, HOG_BINS, h, w)
        hist.scatter_add_(2, bins[:, :, None], magnitude[:, :, None])    # (B, 3, 9, H, W) hard voting
        hist = hist.reshape(b, c * HOG_BINS, h, w)                       # (B, 27, H, W)
        hist = F.avg_pool2d(hist, HOG_CELL) * HOG_CELL ** 2              # (B, 27, H/8, W/8) sum over each cell
        if normalize:
            hist = hist.reshape(b, c, HOG_BINS, h // HOG_CELL, w // HOG_CELL)   # (B, 3, 9, H/8, W/8)
            hist = F.normalize(hist, dim=2)                              # per cell and colour; zero stays zero
            hist = hist.reshape(b, c * HOG_BINS, h // HOG_CELL, w // HOG_CELL)  # (B, 27, H/8, W/8)
    return hist


def hog_targets(hog_map: torch.Tensor, patch: int = 16) -> torch.Tensor:
    """(B, 27, H/8, W/8) -> per-unit targets (B, N, 27 * (p/8)^2), ordered 27-major then cell (row, col) [FastMIM]."""
    b, k, ch, cw = hog_map.shape
    s = patch // HOG_CELL                                                 # cells per unit side (2 for 16-px units)
    x = hog_map.reshape(b, k, ch // s, s, cw // s, s)                     # (B, 27, Hp, s, Wp, s)
    x = x.permute(0, 2, 4, 1, 3, 5)                                       # (B, Hp, Wp, 27, s, s)
    return x.reshape(b, (ch // s) * (cw // s), k * s * s)                 # (B, N, 108)


# ---- 5. Losses (M3I Sec. 3.1: Gaussian P -> L2, Boltzmann P -> softmax cross-entropy) ------------------------------
# Dense losses map (B, N, d) predictions and targets to a per-unit (B, N) loss; the method decides where to average
# (masked units only, or all). Global losses map (B, d) vectors to a per-sample (B,) loss.

def l2_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Gaussian P(z | z_hat) = N(z_hat, sigma^2 I) -> mean squared error over the last dim (M3I Eq. 2)."""
    return ((pred - target) ** 2).mean(dim=-1)


def smooth_l1_loss(pred: torch.Tensor, target: torch.Tensor, *, beta: float = 1.0) -> torch.Tensor:
    """Huber-like: quadratic below beta, L1 above (robust to outlier pixels); mean over the last dim."""
    return F.smooth_l1_loss(pred, target, reduction="none", beta=beta).mean(dim=-1)


def cosine_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - cosine similarity over the last dim (0 for parallel vectors, scale-free like BYOL's loss / 2)."""
    return 1 - F.cosine_similarity(pred, target, dim=-1)


def cross_entropy_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Boltzmann P(z | z_hat) ~ exp(z_hat . z): softmax cross-entropy over candidates, per sample (B,)."""
    return F.cross_entropy(logits.float(), labels, reduction="none")


def info_nce_loss(query: torch.Tensor, keys: torch.Tensor, *, positive: torch.Tensor | None = None,
                  temperature: float = 0.2) -> torch.Tensor:
    """InfoNCE: softmax CE of cosine similarities / tau, (B, d) queries vs (M, d) keys; per sample (B,).

    positive[b] is the index of b's key (default: b itself, so the other samples of the batch are negatives).
    """
    q, k = F.normalize(query.float(), dim=-1), F.normalize(keys.float(), dim=-1)
    logits = q @ k.t() / temperature                                      # (B, M)
    if positive is None:
        positive = torch.arange(q.shape[0], device=q.device)
    return cross_entropy_loss(logits, positive)


LOSSES = {"l2": l2_loss, "smooth_l1": smooth_l1_loss, "cosine": cosine_loss, "info_nce": info_nce_loss}
