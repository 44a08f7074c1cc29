"""Masked image modeling: MAE, SimMIM / FastMIM(-P) with HOG targets, and M3I with its 12 special cases.

Paper:
    MAE: Masked Autoencoders Are Scalable Vision Learners (He et al., CVPR 2022, arXiv 2111.06377).
    FastMIM: Expediting Masked Image Modeling Pre-training for Vision (Guo et al., arXiv 2212.06593), with
        MaskFeat's HOG target (Wei et al., arXiv 2112.09133) and SimMIM (Xie et al., arXiv 2111.09886).
    M3I: Towards All-in-one Pre-training via Maximizing Multi-modal Mutual Information (Su et al., CVPR 2023,
        arXiv 2211.09807); its inter-view branch follows SiameseIM (Tao et al., arXiv 2206.01204).

Implements:
    The shared pieces of masked image modeling (unit masking, pixel / HOG / teacher targets, losses, the EMA rule)
    and three pre-training methods that wrap any encoder through the encoder seam: `forward_features(x,
    ids_keep=None)[-1]` -> (B, N_vis, C), `cfg.embed_dim` = C, optional `cfg.patch_size` (16 otherwise) and
    `init_pos_embed_sincos()`. M3I is one module; the 12 self-supervised rows of M3I Tab. 2 are presets of it.

Sections:
    1. Config                          <-> MAE Tab. 1, FastMIM Tab. 11, M3I Sec. 3.4
    2. Masking (one convention)        <-> MAE Sec. 3 "random sampling", BEiT blockwise masking, FastMIM Sec. 4.1
    3. Pixel targets                   <-> MAE Sec. 3 "reconstruction target" (norm_pix_loss)
    4. HOG target                      <-> FastMIM Sec. 4.1, MaskFeat Sec. 3
    5. Losses                          <-> M3I Sec. 3.1: Gaussian -> L2, Boltzmann -> softmax CE / InfoNCE
    6. Decoders and heads              <-> MAE Fig. 1, FastMIM Tab. 16, M3I Sec. 3.4 / Fig. 2, CAE attention pooling
    7. Momentum (EMA) teacher          <-> M3I Sec. 3.4 "target encoder", BYOL/MoCo EMA rule, iTPN Sec. 3.3
    8. MAE                             <-> MAE Sec. 3
    9. SimMIM / FastMIM / FastMIM-P    <-> FastMIM Sec. 4.1-4.2, Tab. 1c (depth truncation)
    10. M3I                            <-> M3I Sec. 3.3-3.4, Fig. 2
    11. Presets and METHODS            <-> MAE Tab. 1, FastMIM Tab. 11 / Sec. 4.2, M3I Tab. 2 (the 12 rows)
    12. __main__ smoke demo

Shapes:
    B batch, C encoder width (stage 3), H, W image size, Hp, Wp grid of units (16x16 px: the encoder's last-stage
    patch), N = Hp*Wp units, N_vis visible units, D decoder width, P = p*p*3 pixels of one unit.
    mask: (B, N) float in original unit order, **1 = removed (masked), 0 = kept (visible)**.
    ids_keep (B, N_vis), ids_restore (B, N) as in MAE (see section 2).

Differences from the papers / official code (the classes MAE, FastMIM, M3I and `hog` give the details):
    - Visible count `round(N * (1 - mask_ratio))` (MAE: int(), which loses a unit to float error at 10 * 0.1).
    - Every method starts the position table from the 2-D sin-cos table and keeps it TRAINABLE, as iTPN's pixel
      pre-training does (MAE freezes it). Build the method first, then load weights.
    - MAE on HiViT has no CLS token and a 6-block decoder (`MAE_HIVIT`, HiViT App. A; MAE's 8 on a plain ViT);
      "simmim" is FastMIM's formulation of SimMIM; HOG runs in fp32, per colour.
    - M3I (no code released): the self-supervised M3I and the 12 rows of Tab. 2 are built; its supervised
      category and text targets are not (pre-training here reads unlabelled images). The choices the paper leaves
      open are listed in the M3I docstring: the two views (train.py crops both, only the input view changes
      colour), mixing, decoder positions, and one loss per target type in all rows (L2 for pixels and dense
      features, InfoNCE for global features; no UniGrad).

Run:
    # read in import order: hivit -> mim -> itpn -> fast_itpn -> train -> finetune -> detect_seg (2nd)
    python mim.py                                                      # CPU smoke demo, every method, ~20 s
    torchrun --nproc_per_node 8 train.py --model hivit_b --method mae  # pre-training (train.py drives this file)
    # How train.py drives a method (README "Seams"), on an encoder without a head (tiny models: tiny_decoder(cfg)):
    pretrainer = mim.METHODS[name](encoder, cfg=mim.PRESETS[name])
    out = pretrainer(imgs)           # imgs (B, 3, H, W); when pretrainer.num_views == 2 (M3I, Tab. 2 rows g-l):
    out = pretrainer(imgs, geometry=geometry)   # imgs (B, 2, 3, H, W) [target view, input view], geometry (B, 2, 5)
    pretrainer.ema_update(progress=step / total_steps)                # after each optimizer step, if it has one
"""

import copy
import math
import random
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from hivit import LN_EPS, AttentionBlock, check_image_size, mask_blend, select_units, sincos_pos_embed_2d

__all__ = [
    "MIMConfig", "tiny_decoder", "img_size_at", "truncate_encoder_config",
    "random_masking", "block_masking", "ids_from_mask", "mask_units", "mask_to_map",
    "patchify", "unpatchify", "norm_pix", "masked_mean", "pixel_recon", "HOG_BINS", "HOG_CELL", "hog", "hog_targets",
    "hog_picture", "l2_loss", "smooth_l1_loss", "cosine_loss", "cross_entropy_loss", "info_nce_loss", "LOSSES",
    "DENSE_LOSSES", "LightDecoder", "unshuffle", "MAEDecoder", "view_pos_embed", "QueryDecoder", "AttentionPool",
    "make_teacher", "ema_update_", "cosine_momentum",
    "MAE", "FastMIM", "view_coords", "mix_images", "M3I",
    "PRESETS", "M3I_PRESET_NAMES", "MAE_HIVIT", "METHODS",
]


# ---- 1. Config ----------------------------------------------------------------------------------------------------

@dataclass
class MIMConfig:
    mask_ratio: float = 0.75          # fraction of units removed (MAE Tab. 1: 0.75); 0 = full input
    mask_pattern: str = "random"      # "random" (MAE argsort of noise) or "block" (BEiT blockwise, SiameseIM)
    target: str = "pixel"             # "pixel", "hog", "dense_feature" (EMA teacher) or "global_feature" (its GAP)
    norm_pix_loss: bool = True        # pixels: per-unit mean/std normalised; HOG: per-cell L2 normalised (FastMIM)
    loss: str = "l2"                  # key of LOSSES: "l2", "smooth_l1", "cosine", "info_nce"
    loss_on_masked: bool = True       # average over masked units only (MAE, FastMIM) or all target units (M3I)
    decoder_dim: int = 512            # D (MAE 512, FastMIM ViT-B 256, M3I 512 here; SiameseIM 768)
    decoder_depth: int = 8            # decoder blocks (MAE 8, MAE on HiViT 6, FastMIM ViT-B 1, M3I 4)
    decoder_heads: int = 16           # decoder heads (FastMIM: D / 32)
    input_view: str = "same"          # M3I Tab. 2: "same" = intra-view (input is the target view), "other" = inter
    mix_ratio: float = 0.0            # M3I Sec. 3.4: fraction of units taken from image j; 0 = no mixing
    momentum: float = 0.995           # EMA teacher momentum m0 (SiameseIM: cosine to 1); 1.0 = frozen teacher
    temperature: float = 0.2          # tau of InfoNCE (MoCo v3's 0.2; our choice for M3I Tab. 2 rows c, f, i, l)
    img_sizes: tuple = ((0.0, 224),)  # (fraction of training, side in px) schedule; FastMIM 128, FastMIM-P 3 steps


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

def check_mask_ratio(mask_ratio: float) -> None:
    """A ratio outside [0, 1) would silently keep a wrong count (1.5 keeps N/4 units, -0.5 masks none)."""
    if not 0 <= mask_ratio < 1:
        raise ValueError(f"mask_ratio must be in [0, 1) (the fraction of units removed), got {mask_ratio}")


def random_masking(batch_size: int, num_units: int, mask_ratio: float, *, device=None, generator=None):
    """MAE's per-sample random masking by argsort of uniform noise.

    Returns ids_keep (B, N_vis) long in shuffled order, ids_restore (B, N) long (argsort of ids_shuffle, so
    gathering [kept, removed] tokens with it restores the original order), and mask (B, N) float, 1 = removed.
    Every sample keeps exactly N_vis = round(N * (1 - mask_ratio)) units, which is what makes batching trivial.
    """
    check_mask_ratio(mask_ratio)
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
    rectangles stall, as SiameseIM does). This runs on the CPU with NumPy and Python's RNG, seeded once from
    `generator` (deterministic under a seed): a few hundred scalar steps per sample would be slow as torch ops.
    """
    hp, wp = grid_hw
    rng = random.Random(int(torch.randint(2**62, (1,), generator=generator)))   # any 62-bit seed
    log_aspect = (math.log(0.3), math.log(1 / 0.3))                     # BEiT's aspect range
    masks = np.zeros((batch_size, hp, wp), dtype=np.float32)
    for m in masks:                                                       # m: (Hp, Wp) view of one sample
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
            new = h * w - int(m[top:top + h, left:left + w].sum())
            if 0 < new <= budget:                                         # never overshoot the exact count
                m[top:top + h, left:left + w] = 1
                count, stalls = count + new, 0
            else:
                stalls += 1
        flat = m.reshape(-1)                                              # (N,) view of the same memory
        for idx in rng.sample(np.flatnonzero(flat == 0).tolist(), num_masked - count):   # top-up
            flat[idx] = 1
    return torch.from_numpy(masks.reshape(batch_size, hp * wp))          # (B, N)


def ids_from_mask(mask: torch.Tensor):
    """(ids_keep (B, N_vis), ids_restore (B, N)) for a mask with the same number of zeros in every row.

    A stable sort puts kept units first (in raster order) then removed ones, so the result plugs into the same
    encoder/decoder path as random_masking.
    """
    ids_shuffle = mask.argsort(dim=1, stable=True)                        # (B, N): zeros (kept) first
    num_keep = int((mask[0] == 0).sum())
    return ids_shuffle[:, :num_keep], ids_shuffle.argsort(dim=1)          # (B, N_vis), (B, N)


def mask_units(batch_size: int, grid_hw: tuple[int, int], *, mask_ratio: float, pattern: str, device=None):
    """One entry point for the methods: (ids_keep, ids_restore, mask) by "random" or "block" masking, same counts."""
    check_mask_ratio(mask_ratio)
    n = grid_hw[0] * grid_hw[1]
    if pattern == "random":
        return random_masking(batch_size, n, mask_ratio, device=device)
    if pattern == "block":
        num_masked = n - int(round(n * (1 - mask_ratio)))
        mask = block_masking(batch_size, grid_hw, num_masked).to(device)  # (B, N)
        return (*ids_from_mask(mask), mask)
    raise ValueError(f"mask_pattern must be 'random' or 'block', not {pattern!r}")


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
    """MAE's norm_pix_loss target (Sec. 3, Tab. 1c): each unit minus its mean, over sqrt(unbiased var + eps)."""
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)                                # unbiased, as torch's default in MAE
    return (target - mean) / (var + eps) ** 0.5


def masked_mean(per_unit: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of a (B, N) loss over the units where mask == 1 (MAE: loss on removed units only)."""
    return (per_unit * mask).sum() / mask.sum().clamp(min=1)              # clamp: an all-visible batch gives 0


def pixel_recon(pred: torch.Tensor, imgs: torch.Tensor, *, patch: int, norm_pix_loss: bool) -> torch.Tensor:
    """Predicted pixels back in the normalised input space, (B, 3, H, W), for the reconstruction pictures.

    With norm_pix_loss the prediction is de-normalised with the ORIGINAL unit's mean and std: the picture then
    borrows each unit's true colour statistics (label it so; the loss never sees them).
    """
    target = patchify(imgs, patch)                                        # (B, N, P)
    if norm_pix_loss:
        std = (target.var(dim=-1, keepdim=True) + 1e-6) ** 0.5          # norm_pix's eps
        pred = pred * std + target.mean(dim=-1, keepdim=True)
    return unpatchify(pred.detach().float(), check_image_size(imgs, patch), patch)   # (B, 3, H, W)


# ---- 4. HOG target (MaskFeat / FastMIM) ---------------------------------------------------------------------------

HOG_BINS = 9      # unsigned orientation bins of 20 degrees (MaskFeat)
HOG_CELL = 8      # px per cell side; a 16-px unit owns 2x2 cells


def hog(imgs: torch.Tensor, *, normalize: bool = True) -> torch.Tensor:
    """MaskFeat-style HOG of (B, 3, H, W) images -> (B, 3*9, H/8, W/8), channel index = colour * 9 + bin.

    Per colour channel: reflect-pad 1, 3x3 Sobel gx/gy, magnitude sqrt(gx^2 + gy^2), orientation atan2(gx, gy)
    (MaskFeat's argument order) mapped to 9 unsigned bins by floor(angle * 9 / pi) mod 9 (hard voting), magnitudes
    summed over 8x8 cells, then each 9-bin histogram L2-normalised when `normalize` (FastMIM ties it to
    norm_pix_loss, `util/hog_layer.py`). Always fp32 with autocast off:
    under AMP the Sobel convs return half precision, which scatter_add_ into an fp32 histogram rejects (FastMIM's
    copy fails exactly there), and a half-precision histogram would lose the small magnitudes of flat regions.
    """
    with torch.autocast(device_type=imgs.device.type, enabled=False):
        x = imgs.float()
        b, c, h, w = x.shape
        # Sobel as differences of shifted copies (= conv2d with [[1, 0, -1], [2, 0, -2], [1, 0, -1]] and its
        # transpose): a flat region then gives a gradient of exactly 0, where a conv kernel's summation order can
        # leave ~1e-8, which the per-cell normalisation would blow up to a unit-length histogram.
        p = F.pad(x, (1, 1, 1, 1), mode="reflect")                       # (B, 3, H+2, W+2)
        dx = p[:, :, :, :-2] - p[:, :, :, 2:]                             # (B, 3, H+2, W) left - right
        dy = p[:, :, :-2, :] - p[:, :, 2:, :]                             # (B, 3, H, W+2) top - bottom
        gx = dx[:, :, :-2] + 2 * dx[:, :, 1:-1] + dx[:, :, 2:]            # (B, 3, H, W) rows weighted 1, 2, 1
        gy = dy[:, :, :, :-2] + 2 * dy[:, :, :, 1:-1] + dy[:, :, :, 2:]   # (B, 3, H, W) cols weighted 1, 2, 1
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


def hog_picture(per_unit: torch.Tensor, grid_hw: tuple[int, int], patch: int = 16) -> torch.Tensor:
    """Per-unit HOG (B, N, 27 * s * s) -> (B, 3, H, W) picture in [0, 1] for the logs (classic HOG rendering).

    Every 8x8 cell draws each of its 9 bins as a line through the cell centre along the EDGE direction (normal to
    the bin's gradient angle), brightness = bin value; colour channels are drawn separately.
    """
    b = per_unit.shape[0]
    hp, wp = grid_hw
    s = patch // HOG_CELL
    x = per_unit.float().reshape(b, hp, wp, 3, HOG_BINS, s, s)           # (B, Hp, Wp, 3, 9, s, s)
    centre = torch.arange(HOG_CELL, dtype=torch.float32, device=x.device) - (HOG_CELL - 1) / 2   # (8,)
    theta = (torch.arange(HOG_BINS, device=x.device) + 0.5) * math.pi / HOG_BINS                 # bin centres
    # angle = atan2(gx, gy): the gradient points along (row, col) ~ (cos, sin), so the edge runs along (-sin, cos)
    dist = (centre[None, :, None] * theta.cos()[:, None, None]
            + centre[None, None, :] * theta.sin()[:, None, None]).abs()   # (9, 8, 8) distance to the edge line
    glyphs = (1 - dist).clamp(min=0)                                      # (9, 8, 8)
    img = torch.einsum("bhwckst,kij->bchsiwtj", x, glyphs)               # (B, 3, Hp, s, 8, Wp, s, 8)
    img = img.reshape(b, 3, hp * patch, wp * patch)                       # (B, 3, H, W)
    peak = img.flatten(1).amax(dim=1).clamp(min=1e-6)                    # (B,) brightest pixel per image
    return img / peak[:, None, None, None]                                # (B, 3, H, W) in [0, 1]


# ---- 5. Losses (M3I Sec. 3.1: Gaussian P -> L2, Boltzmann P -> softmax cross-entropy) ------------------------------
# Dense losses map (B, N, d) predictions and targets to a per-unit (B, N) loss; the method decides where to average
# (masked units only, or all). Global losses map (B, d) vectors to a per-sample (B,) loss.

def l2_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Gaussian P(z | z_hat) = N(z_hat, sigma^2 I) -> mean squared error over the last dim (M3I Sec. 3.1)."""
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
DENSE_LOSSES = ("l2", "smooth_l1", "cosine")     # per-unit losses; info_nce compares whole-image vectors


def check_dense_loss(cfg) -> None:
    """Fail at construction, not at the first step, when a dense target is given a contrastive loss."""
    if cfg.loss not in DENSE_LOSSES:
        raise ValueError(f"a dense target needs one of {DENSE_LOSSES} as loss, not {cfg.loss!r}")


# ---- 6. Decoders and heads ----------------------------------------------------------------------------------------

class LightDecoder(nn.Module):
    """FastMIM's decoder (Tab. 16, "1b256d"): Linear C -> D, `depth` AttentionBlocks, LayerNorm, Linear D -> out.

    It has no mask tokens and no position embedding: the encoder already saw every position (FastMIM Sec. 4.1).
    MAEDecoder and QueryDecoder add their own inputs and reuse `blocks -> norm -> pred` through `run`.
    """

    def __init__(self, in_dim: int, *, dim: int, depth: int, num_heads: int, out_dim: int):
        super().__init__()
        self.embed = nn.Linear(in_dim, dim)
        self.blocks = nn.ModuleList(AttentionBlock(dim, num_heads=num_heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)
        self.pred = nn.Linear(dim, out_dim)

    def run(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, D) decoder tokens -> (B, L, out)."""
        for blk in self.blocks:
            x = blk(x)
        return self.pred(self.norm(x))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.run(self.embed(tokens))                               # (B, N, out)


def unshuffle(visible: torch.Tensor, fill: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
    """MAE's un-shuffle: visible tokens (B, N_vis, D) in ids_keep order, plus `fill` (1, 1, D) for every removed
    unit, back in original unit order (B, N, D).

    [kept, removed] is the shuffled order of ids_shuffle; gathering it with ids_restore = argsort(ids_shuffle) puts
    each token back at its unit (MAE `models_mae.py`, `forward_decoder`). itpn.py's pixel decoder uses it too.
    """
    b, n_vis, _ = visible.shape
    fill = fill.expand(b, ids_restore.shape[1] - n_vis, -1)              # (B, N - N_vis, D)
    x = torch.cat([visible, fill], dim=1)                                 # (B, N, D) in shuffled order
    return select_units(x, ids_restore)                                   # (B, N, D) in original unit order


class MAEDecoder(LightDecoder):
    """MAE's decoder (Fig. 1): visible tokens + a shared mask token per removed unit, un-shuffled, + fixed sin-cos."""

    def __init__(self, in_dim: int, *, dim: int, depth: int, num_heads: int, out_dim: int):
        super().__init__(in_dim, dim=dim, depth=depth, num_heads=num_heads, out_dim=out_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)                  # MAE: N(0, 0.02)

    def forward(self, tokens: torch.Tensor, ids_restore: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
        """tokens (B, N_vis, C) in ids_keep order -> predictions (B, N, out) for every unit, original order."""
        x = unshuffle(self.embed(tokens), self.mask_token, ids_restore)  # (B, N, D)
        x = x + sincos_pos_embed_2d(x.shape[-1], *grid_hw).to(x)         # fixed table, built for this grid
        return self.run(x)                                                # (B, N, out)


def view_pos_embed(dim: int, coords: torch.Tensor) -> torch.Tensor:
    """Sin-cos embedding of 4-d view coordinates (B, L, 4) -> (B, L, dim); dim/4 channels per coordinate.

    coords = (row, col, scale_h, scale_w) from `view_coords`: positions are real numbers in units of the input
    view's patches from its top-left corner (M3I Sec. 3.4, SiameseIM), so a query can sit between or outside the
    visible units. Each quarter is [sin | cos] with omega_k = 1 / 10000^(k / (dim/8)), as MAE's table.
    """
    assert dim % 8 == 0, "view position embedding needs dim divisible by 8"
    omega = 1.0 / 10000 ** (torch.arange(dim // 8, device=coords.device, dtype=torch.float32) / (dim / 8))
    angles = coords.float()[..., None] * omega                            # (B, L, 4, dim/8)
    emb = torch.cat([angles.sin(), angles.cos()], dim=-1)                 # (B, L, 4, dim/4)
    return emb.flatten(2)                                                 # (B, L, dim)


class QueryDecoder(LightDecoder):
    """M3I's image decoder (Sec. 3.4, Fig. 2): visible tokens + one mask query per target-view unit.

    Tokens and queries both get `pos_proj(view_pos_embed(coords))`; the outputs at the queries are the predictions.
    With an identity geometry and the visible units as queries this is MAE's decoder with a learned position map.
    """

    def __init__(self, in_dim: int, *, dim: int, depth: int, num_heads: int, out_dim: int):
        super().__init__(in_dim, dim=dim, depth=depth, num_heads=num_heads, out_dim=out_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.pos_proj = nn.Linear(dim, dim)                               # SiameseIM's "decoder_pos_mlp"

    def forward(self, tokens: torch.Tensor, token_coords: torch.Tensor, query_coords: torch.Tensor) -> torch.Tensor:
        """tokens (B, N_vis, C), token_coords (B, N_vis, 4), query_coords (B, Nq, 4) -> (B, Nq, out)."""
        d = self.mask_token.shape[-1]
        x = self.embed(tokens) + self.pos_proj(view_pos_embed(d, token_coords))      # (B, N_vis, D)
        q = self.mask_token + self.pos_proj(view_pos_embed(d, query_coords))         # (B, Nq, D)
        out = self.run(torch.cat([x, q], dim=1))                          # (B, N_vis + Nq, out)
        return out[:, x.shape[1]:]                                        # (B, Nq, out)


class AttentionPool(nn.Module):
    """CAE-style attention pooling: one learned query attends over tokens -> Linear (M3I Sec. 3.4, global targets)."""

    def __init__(self, dim: int, *, num_heads: int, out_dim: int):
        super().__init__()
        self.query = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.query, std=0.02)
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.proj = nn.Linear(dim, out_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        kv = self.norm(tokens)                                            # (B, L, C)
        pooled, _ = self.attn(self.query.expand(tokens.shape[0], -1, -1), kv, kv, need_weights=False)   # (B, 1, C)
        return self.proj(pooled[:, 0])                                    # (B, out)


# ---- 7. Momentum (EMA) teacher ------------------------------------------------------------------------------------

def make_teacher(encoder: nn.Module) -> nn.Module:
    """A frozen copy of the encoder: no gradient, excluded from the optimizer, always in eval mode."""
    teacher = copy.deepcopy(encoder)
    teacher.requires_grad_(False)
    return teacher.eval()


@torch.no_grad()
def ema_update_(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """theta_teacher <- m * theta_teacher + (1 - m) * theta_student, in place, parameter by parameter.

    The rule of BYOL / MoCo, SiameseIM and iTPN (Sec. 3.3), computed exactly as written (not with `lerp_`, whose
    rounding differs by up to ~5e-7), so a test can check it bit for bit. Buffers are copied from the student.
    Every momentum teacher of the project (M3I here, iTPN's paper method) is updated by this one function.
    """
    for t, s in zip(teacher.parameters(), student.parameters()):
        t.copy_(momentum * t + (1 - momentum) * s.detach().to(t.dtype))
    for t, s in zip(teacher.buffers(), student.buffers()):
        t.copy_(s)


def cosine_momentum(base: float, progress: float) -> float:
    """SiameseIM's schedule: m(t) = 1 - (1 - m0) * (1 + cos(pi t)) / 2, from m0 at t = 0 to 1 at t = 1."""
    return 1 - (1 - base) * (1 + math.cos(math.pi * progress)) / 2


# ---- 8. MAE -------------------------------------------------------------------------------------------------------

class MAE(nn.Module):
    """MAE (Sec. 3): encode only the visible units, decode with mask tokens, L2 on normalised pixels of removed units.

    Differences from MAE's `models_mae.py`: no CLS token (HiViT has none); a LayerNorm on the encoder output before
    the decoder (the plain ViT already ends with one; a second is harmless); PyTorch / trunc-normal decoder init,
    not Xavier; the encoder's position table stays trainable.
    forward(imgs (B, 3, H, W)) -> {"loss", "mask" (B, N), "pred" (B, N, P), "recon" (B, 3, H, W)}.
    """

    num_views = 1

    def __init__(self, encoder: nn.Module, *, cfg: MIMConfig):
        super().__init__()
        self.cfg = cfg
        encoder.init_pos_embed_sincos()                                   # MAE's sin-cos start (trainable here)
        self.encoder = encoder
        self.patch = getattr(encoder.cfg, "patch_size", 16)               # unit = the last-stage patch
        c = encoder.cfg.embed_dim
        self.norm = nn.LayerNorm(c, eps=LN_EPS)                           # MAE encoder's final norm
        check_dense_loss(cfg)
        self.decoder = MAEDecoder(c, dim=cfg.decoder_dim, depth=cfg.decoder_depth, num_heads=cfg.decoder_heads,
                                  out_dim=self.patch ** 2 * 3)

    def forward(self, imgs: torch.Tensor) -> dict:
        grid_hw = check_image_size(imgs, self.patch)
        ids_keep, ids_restore, mask = mask_units(imgs.shape[0], grid_hw, mask_ratio=self.cfg.mask_ratio,
                                                 pattern=self.cfg.mask_pattern, device=imgs.device)
        latent = self.norm(self.encoder.forward_features(imgs, ids_keep=ids_keep)[-1])   # (B, N_vis, C)
        pred = self.decoder(latent, ids_restore, grid_hw)                 # (B, N, P)
        target = patchify(imgs, self.patch)                               # (B, N, P)
        if self.cfg.norm_pix_loss:
            target = norm_pix(target)
        loss = masked_mean(LOSSES[self.cfg.loss](pred.float(), target.float()), mask)   # loss on removed units
        recon = pixel_recon(pred, imgs, patch=self.patch, norm_pix_loss=self.cfg.norm_pix_loss)
        return {"loss": loss, "mask": mask, "pred": pred, "recon": recon}


# ---- 9. SimMIM / FastMIM / FastMIM-P ------------------------------------------------------------------------------

class FastMIM(nn.Module):
    """FastMIM (Sec. 4.1): mask the RGB input with a learnable colour, encode every unit, light decoder, HOG target.

    The "simmim" preset is the same module at 224 px with a pixel target and a smooth-L1 loss on masked units:
    FastMIM's formulation of SimMIM, not SimMIM proper (L1, 32-px mask units, ratio 0.6, mask token in embedding
    space). Low resolution (128 px) and the progressive FastMIM-P schedule only change the input size
    (`img_size_at`); every size-dependent table (HOG cells, masks, position and relative-position tables) is
    derived from the input, so a resolution switch needs no rebuild and keeps the optimizer state untouched.
    FastMIM's released ViT-B pre-trains with 6 heads (12 when fine-tuning); here the encoder keeps its preset.
    forward(imgs (B, 3, H, W)) -> {"loss", "mask" (B, N), "pred" (B, N, out), "recon" or "pictures"}.
    """

    num_views = 1

    def __init__(self, encoder: nn.Module, *, cfg: MIMConfig):
        super().__init__()
        if cfg.target not in ("hog", "pixel"):
            raise ValueError(f"FastMIM predicts 'hog' or 'pixel', not {cfg.target!r}")
        check_dense_loss(cfg)
        self.cfg = cfg
        encoder.init_pos_embed_sincos()                                   # MAE's sin-cos start (trainable here)
        self.encoder = encoder
        self.patch = getattr(encoder.cfg, "patch_size", 16)               # mask unit = last-stage patch (16 px)
        c = encoder.cfg.embed_dim
        # [MASK] in R^{1x1x3}, living in the normalised-pixel space (init ~ the dataset mean colour)
        self.mask_token = nn.Parameter(torch.zeros(1, 3, 1, 1))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.norm = nn.LayerNorm(c, eps=LN_EPS)
        out_dim = 3 * HOG_BINS * (self.patch // HOG_CELL) ** 2 if cfg.target == "hog" else self.patch ** 2 * 3
        self.decoder = LightDecoder(c, dim=cfg.decoder_dim, depth=cfg.decoder_depth, num_heads=cfg.decoder_heads,
                                    out_dim=out_dim)                      # 108 (HOG) or 768 (pixels) per unit

    def mask_input(self, imgs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """X_hat = X * (1 - M) + [MASK] * M with M the unit mask upsampled to pixels (FastMIM Sec. 4.1)."""
        m = mask_to_map(mask, check_image_size(imgs, self.patch), self.patch)[:, None]   # (B, 1, H, W)
        return mask_blend(imgs, m, self.mask_token)                       # (B, 3, H, W)

    def forward(self, imgs: torch.Tensor) -> dict:
        grid_hw = check_image_size(imgs, self.patch)
        _, _, mask = mask_units(imgs.shape[0], grid_hw, mask_ratio=self.cfg.mask_ratio,
                                pattern=self.cfg.mask_pattern, device=imgs.device)
        tokens = self.norm(self.encoder.forward_features(self.mask_input(imgs, mask))[-1])   # (B, N, C): all units
        pred = self.decoder(tokens)                                       # (B, N, out)
        out = {"mask": mask, "pred": pred}
        if self.cfg.target == "hog":
            with torch.no_grad():
                target = hog_targets(hog(imgs, normalize=self.cfg.norm_pix_loss), self.patch)   # (B, N, 108) fp32
            out["pictures"] = {"hog_target": hog_picture(target, grid_hw, self.patch),
                               "hog_pred": hog_picture(pred.detach().clamp(min=0), grid_hw, self.patch)}
        else:
            target = patchify(imgs, self.patch)                           # (B, N, P)
            target = norm_pix(target) if self.cfg.norm_pix_loss else target
            out["recon"] = pixel_recon(pred, imgs, patch=self.patch, norm_pix_loss=self.cfg.norm_pix_loss)
        out["loss"] = masked_mean(LOSSES[self.cfg.loss](pred.float(), target), mask)   # Sec. 4.1: masked region
        return out


# ---- 10. M3I -------------------------------------------------------------------------------------------------------

LOG_SCALE = 10.0    # SiameseIM embeds 10 * ln(scale), so that scales 0.5..2 span a useful angle range


def view_coords(grid_hw: tuple[int, int], geometry: torch.Tensor | None = None) -> torch.Tensor:
    """Coordinates of the TARGET view's units in the frame of the INPUT view: (B or 1, N, 4).

    geometry (B, 2, 5): per image, (top, left, height, width, flip) of the target view (row 0) and of the input view
    (row 1): crop boxes as fractions of the source image, flip 1 = mirrored after cropping (train.PretrainViews makes
    both views and this tensor). A target unit's centre goes to the source image and from there into the input
    view: (row, col) in units of the input view's patches from its top-left corner (M3I Sec. 3.4), plus 10 ln(scale)
    of a target unit measured in input units, per side. geometry None = the input IS the target view: (r, c, 0, 0).
    """
    hp, wp = grid_hw
    rows, cols = torch.meshgrid(torch.arange(hp, dtype=torch.float32), torch.arange(wp, dtype=torch.float32),
                                indexing="ij")
    rows, cols = rows.flatten()[None], cols.flatten()[None]               # (1, N) each
    if geometry is None:
        return torch.stack([rows, cols, torch.zeros_like(rows), torch.zeros_like(rows)], dim=-1)   # (1, N, 4)
    rows, cols = rows.to(geometry.device), cols.to(geometry.device)
    target, inp = geometry.float().unbind(dim=1)                          # (B, 5) each
    t_top, t_left, t_h, t_w, t_flip = (v[:, None] for v in target.unbind(dim=1))   # (B, 1) each
    i_top, i_left, i_h, i_w, i_flip = (v[:, None] for v in inp.unbind(dim=1))      # (B, 1) each
    fx = (cols + 0.5) / wp                                                # (1, N) unit centres in target-view fractions
    fx = torch.where(t_flip > 0.5, 1 - fx, fx)                            # (B, N) a mirrored view = its crop mirrored
    y = t_top + (rows + 0.5) / hp * t_h                                   # (B, N) in source-image fractions
    x = t_left + fx * t_w                                                 # (B, N)
    y, x = (y - i_top) / i_h, (x - i_left) / i_w                          # (B, N) in input-crop fractions
    x = torch.where(i_flip > 0.5, 1 - x, x)                               # mirrored input view
    scale_h = (LOG_SCALE * torch.log(t_h / i_h)).expand_as(y)            # (B, N)
    scale_w = (LOG_SCALE * torch.log(t_w / i_w)).expand_as(y)            # (B, N)
    return torch.stack([y * hp - 0.5, x * wp - 0.5, scale_h, scale_w], dim=-1)   # (B, N, 4)


def mix_images(x_i: torch.Tensor, x_j: torch.Tensor, mix: torch.Tensor, patch: int = 16) -> torch.Tensor:
    """M3I Sec. 3.4: I_mix = m * I_i + (1 - m) * I_j with m constant on p x p units; here mix (B, N) = 1 - m, i.e.
    mix 1 = the unit comes from image j (= removed from image i, the mask convention from image i's side)."""
    m = mask_to_map(mix, check_image_size(x_i, patch), patch)[:, None]   # (B, 1, H, W)
    return mask_blend(x_i, m, x_j)                                        # (B, 3, H, W)


class M3I(nn.Module):
    """M3I (Sec. 3.3-3.4, Fig. 2), self-supervised, and through its config the 12 self-supervised rows of Tab. 2.

    Full M3I: slot i mixes its own target view v_i with another view u_sigma(i) of image j = sigma(i); the encoder
    sees all units of the mix; image i predicts the EMA features of v_i (intra-view), image j those of v_sigma(i)
    (inter-view). Tab. 2 rows use one input: the target view ("same") or the other view ("other"), full or masked.
    The paper's supervised targets (category embeddings, a text encoder) are not built: there are no labels here.

    Our choices where the paper is silent (no code was released):
    * Views: train.PretrainViews(num_views=2) hands two independent random resized crops (scale 0.2-1) + flips of
      each image, (B, 2, 3, H, W), with their exact crop geometry (B, 2, 5) (`view_coords`). View 0 is the target
      view v, left in its colours as the one view of rows a-f; view 1 is the input view u, which also gets colour
      augmentation (ColorJitter: brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1, always; then grayscale with
      p 0.2; MoCo v3's strengths). So v has one distribution in all 12 rows, and rows g-l differ from a-f in the input
      alone: another crop and other colours (instance discrimination without a colour change invites colour
      shortcuts). Image j of full M3I is such a u.
    * Mixing: per-sample random unit mask with `mix_ratio` 0.5 of the units from image j = sigma(i), sigma a
      random batch permutation; both halves are exact counts. No "which image" embedding (the paper mentions none).
    * One loss per target type, in every row that has that target, so that the rows Tab. 2 compares (a/d, b/e,
      c/f, g/j, h/k, i/l: masked or not; a-c vs g-i: same or other view) differ only in the factor compared:
      - pixels (a, d, g, j): L2 on per-unit normalised pixels (MAE's norm_pix_loss);
      - dense features (b, e, h, k, and M3I): L2 on the EMA encoder's features of the full target view,
        LayerNorm-ed without affine (SiameseIM's target; SiameseIM's UniGrad loss is not implemented);
      - global features (c, f, i, l): InfoNCE, tau = 0.2, over the batch, between an attention-pooled vector of
        the encoder tokens and the GAP of the EMA features. Why InfoNCE and not L2: regressing a vector onto its
        own EMA copy has no negatives and can collapse to a constant (BYOL needs a predictor and a tuned momentum
        against that); the batch negatives rule it out, and rows i and l are instance discrimination.
      Averaged over all target units, except row d (masked units only, as MAE, which the paper equates with d).
    * One 4-block decoder shared by images i and j: visible tokens of that image + one query per target-view
      unit; positions are 4-d (row, col, log scale h, log scale w) in units of the INPUT view's patches from its
      top-left corner, sin-cos encoded then a learnable Linear, used for visible tokens and queries alike.
    * InfoNCE negatives come from the LOCAL batch only, so under DDP the loss of rows c, f, i, l depends on the
      world size; gathering keys across ranks is out of scope.
    * Masked rows: intra-view rows (d-f) drop MAE's 0.75 at random, inter-view rows (j-l) SiameseIM's 118/196 ~ 0.6
      in BEiT blocks (the paper gives neither ratio).
    * Loss terms are summed with weight 1 (Eq. 4 is an unweighted sum). EMA momentum: constant `momentum`, or
      SiameseIM's cosine ramp to 1 when train.py passes `progress`.

    forward(imgs (B, 3, H, W)) for one-view rows (a-f), forward(imgs (B, 2, 3, H, W), geometry (B, 2, 5)) when
    `num_views` == 2 (rows g-l, M3I) -> {"loss", "mask" (B, N): mixing or input mask (with mixing, 1 = unit from
    image j), "pred": image i's prediction, "logs": one loss term per image}.
    """

    def __init__(self, encoder: nn.Module, *, cfg: MIMConfig):
        super().__init__()
        if cfg.loss_on_masked and (cfg.input_view != "same" or cfg.mix_ratio > 0 or cfg.mask_ratio == 0):
            raise ValueError("loss_on_masked needs a masked input of the target view itself (Tab. 2 row d)")
        self.cfg = cfg
        encoder.init_pos_embed_sincos()                                   # before make_teacher: EMA copy starts equal
        self.encoder = encoder
        self.num_views = 2 if (cfg.input_view == "other" or cfg.mix_ratio > 0) else 1
        self.patch = getattr(encoder.cfg, "patch_size", 16)
        c = encoder.cfg.embed_dim
        self.norm = nn.LayerNorm(c, eps=LN_EPS)
        # target encoder: identity for pixels, a momentum copy of the encoder for features (Sec. 3.4)
        self.teacher = make_teacher(encoder) if cfg.target in ("dense_feature", "global_feature") else None
        if cfg.target == "global_feature":                                # Tab. 2 rows c, f, i, l
            if cfg.loss != "info_nce":
                raise ValueError(f"a global-feature target takes the 'info_nce' loss (M3I docstring), not {cfg.loss!r}")
            self.global_head = AttentionPool(c, num_heads=max(1, c // 64), out_dim=c)   # head dim 64, as encoders
        else:                                                             # dense pixels or dense features
            check_dense_loss(cfg)
            out_dim = self.patch ** 2 * 3 if cfg.target == "pixel" else c
            self.decoder = QueryDecoder(c, dim=cfg.decoder_dim, depth=cfg.decoder_depth,
                                        num_heads=cfg.decoder_heads, out_dim=out_dim)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()                                           # the target encoder never trains
        return self

    @torch.no_grad()
    def ema_update(self, progress: float | None = None) -> None:
        """After each optimizer step (train.py): constant momentum, or the cosine ramp when progress is given."""
        if self.teacher is not None:
            m = self.cfg.momentum if progress is None else cosine_momentum(self.cfg.momentum, progress)
            ema_update_(self.teacher, self.encoder, m)

    @torch.no_grad()
    def targets(self, view: torch.Tensor) -> torch.Tensor:
        """Targets of the target views, one teacher pass per view: (B, N, P) pixels, (B, N, C) or (B, C) features."""
        if self.cfg.target == "pixel":
            target = patchify(view, self.patch)                           # (B, N, P)
            return norm_pix(target) if self.cfg.norm_pix_loss else target
        feats = self.teacher.forward_features(view)[-1].float()           # (B, N, C) full target view
        if self.cfg.target == "global_feature":
            return feats.mean(dim=1)                                      # (B, C) global average pooling (Fig. 1)
        return F.layer_norm(feats, feats.shape[-1:])                      # (B, N, C) LN without affine (SiameseIM)

    def image_loss(self, tokens, *, unit_ids, query_coords, targets, target_ids, mask, grid_hw):
        """Loss of one image of the input: its tokens (B, L, C) sit at units unit_ids (B, L) of the input view;
        sample b predicts the target of sample target_ids[b] (itself for image i, sigma(b) for image j)."""
        if self.cfg.target == "global_feature":
            pred = self.global_head(tokens)                               # (B, C)
            per_sample = info_nce_loss(pred, targets, positive=target_ids,   # Boltzmann: the batch is the candidates
                                       temperature=self.cfg.temperature)  # (B,)
            return per_sample.mean(), pred
        grid = view_coords(grid_hw).to(tokens.device).expand(unit_ids.shape[0], -1, -1)   # (B, N, 4) input grid
        token_coords = select_units(grid, unit_ids)                       # (B, L, 4) where the tokens sit
        pred = self.decoder(tokens, token_coords, query_coords)           # (B, N, out) one per target unit
        per_unit = LOSSES[self.cfg.loss](pred.float(), targets[target_ids])   # (B, N)
        return (masked_mean(per_unit, mask) if self.cfg.loss_on_masked else per_unit.mean()), pred

    def split_views(self, imgs: torch.Tensor, geometry: torch.Tensor | None):
        """Check the batch contract; returns the target view v (B, 3, H, W) and the input view u (or None)."""
        if self.num_views == 1:
            if imgs.ndim != 4 or geometry is not None:
                raise ValueError(f"this M3I config (input_view 'same', no mixing) takes one view per image, imgs "
                                 f"(B, 3, H, W) and no geometry; got imgs {tuple(imgs.shape)}")
            return imgs, None
        if imgs.ndim != 5 or imgs.shape[1] != 2 or geometry is None or \
                tuple(geometry.shape) != (imgs.shape[0], 2, 5):
            raise ValueError(f"this M3I config (input_view {self.cfg.input_view!r}, mix_ratio {self.cfg.mix_ratio}) "
                             f"takes two views per image, imgs (B, 2, 3, H, W), and their crop geometry (B, 2, 5) "
                             f"(train.PretrainViews(num_views=2) makes both); got imgs {tuple(imgs.shape)}, geometry "
                             f"{None if geometry is None else tuple(geometry.shape)}")
        return imgs[:, 0], imgs[:, 1]                                     # v (target view), u (input view)

    def forward(self, imgs: torch.Tensor, geometry: torch.Tensor | None = None) -> dict:
        cfg = self.cfg
        target_view, other_view = self.split_views(imgs, geometry)       # v, u: (B, 3, H, W) each
        grid_hw = check_image_size(target_view, self.patch)
        b, n, dev = target_view.shape[0], grid_hw[0] * grid_hw[1], target_view.device
        targets = self.targets(target_view)
        samples = torch.arange(b, device=dev)                             # image i predicts its own target
        target_grid = view_coords(grid_hw).to(dev).expand(b, -1, -1)      # (B, N, 4) target view in its own frame
        if self.num_views == 2:
            other_coords = view_coords(grid_hw, geometry)                 # (B, N, 4) v's units in u's frame
        if cfg.mix_ratio > 0:                                             # Sec. 3.4: two images, one input
            sigma = torch.randperm(b, device=dev)                        # image j of slot i is sigma(i)
            _, _, mix = random_masking(b, n, cfg.mix_ratio, device=dev)  # (B, N): 1 = unit from image j
            mixed = mix_images(target_view, other_view[sigma], mix, self.patch)
            tokens = self.norm(self.encoder.forward_features(mixed)[-1])  # (B, N, C): every unit of the mix
            units_i, units_j = ids_from_mask(mix)[0], ids_from_mask(1 - mix)[0]   # (B, N - n_j), (B, n_j)
            images = [("i", select_units(tokens, units_i), units_i, target_grid, samples),       # intra-view
                      ("j", select_units(tokens, units_j), units_j, other_coords[sigma], sigma)]  # inter-view
            mask = mix
        else:                                                             # Tab. 2: one input, maybe masked
            x, query_coords = (target_view, target_grid) if cfg.input_view == "same" else (other_view, other_coords)
            ids_keep, _, mask = mask_units(b, grid_hw, mask_ratio=cfg.mask_ratio, pattern=cfg.mask_pattern,
                                           device=dev)
            # (mask_ratio 0 keeps every unit, in shuffled order: same result, one code path)
            tokens = self.norm(self.encoder.forward_features(x, ids_keep=ids_keep)[-1])   # (B, N_vis, C)
            images = [("i", tokens, ids_keep, query_coords, samples)]
        logs, preds = {}, []
        for name, image_tokens, unit_ids, query_coords, target_ids in images:
            logs[f"loss_{name}"], pred = self.image_loss(image_tokens, unit_ids=unit_ids, query_coords=query_coords,
                                                         targets=targets, target_ids=target_ids, mask=mask,
                                                         grid_hw=grid_hw)
            preds.append(pred)
        loss = sum(logs.values())                                         # Eq. 4: unweighted sum of the terms
        return {"loss": loss, "mask": mask, "pred": preds[0], "logs": {k: v.detach() for k, v in logs.items()}}


# ---- 11. Presets and METHODS: what train.py builds ----------------------------------------------------------------

# The 12 self-supervised instantiations of M3I Tab. 2: input (same/other view, full/masked) and target (dense pixels,
# dense feature, global feature); one loss per target type for every row (our choice, see M3I). IN top-1 / COCO
# AP^box of the paper in comments.
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
    "mae": MIMConfig(),                                                     # MAE (ViT): 8b512d decoder, norm-pix
    "simmim": MIMConfig(loss="smooth_l1", decoder_dim=256, decoder_depth=1, decoder_heads=8),   # full input, 224
    "fastmim": MIMConfig(target="hog", decoder_dim=256, decoder_depth=1, decoder_heads=8,        # Tab. 11, ViT-B
                         img_sizes=((0.0, 128),)),                                              # 1b256d, 128 px
    "fastmim_p": MIMConfig(target="hog", decoder_dim=512, decoder_depth=4, decoder_heads=16,     # Sec. 4.2, Swin-L:
                           img_sizes=((0.0, 128), (0.5, 160), (0.75, 192))),                     # 200/100/100 ep
    "m3i": replace(_M3I, **_DENSE, mix_ratio=0.5, input_view="other"),     # Sec. 3.4, self-supervised targets
    **M3I_TABLE2,
}

# HiViT App. A: HiViT's MAE pre-training uses a 6-block decoder (MAE's 8 blocks are for ViT). train.py takes this
# recipe for "mae" on every hierarchical encoder (HiViT, iTPN's HiViT, Fast-iTPN) and PRESETS["mae"] on a plain ViT.
MAE_HIVIT = replace(PRESETS["mae"], decoder_depth=6)

# Name -> class; a method is built as METHODS[name](encoder, cfg=PRESETS[name]) (header, Run). A plain dict of
# direct references (grep finds every class), not a registry.
METHODS: dict[str, type[nn.Module]] = {"mae": MAE, "simmim": FastMIM, "fastmim": FastMIM, "fastmim_p": FastMIM,
                                       "m3i": M3I, **{name: M3I for name in M3I_PRESET_NAMES}}


# ---- 12. Smoke demo -----------------------------------------------------------------------------------------------

if __name__ == "__main__":
    from hivit import HiViT, PRESETS as HIVIT_PRESETS

    torch.manual_seed(0)
    imgs = torch.randn(2, 3, 64, 64)                                      # a normalised batch, 4 x 4 units
    encoder_cfg = replace(HIVIT_PRESETS["tiny"], num_classes=0)           # no head: every parameter trains
    for name in ["mae", "simmim", "fastmim", "fastmim_p", "m3i", *M3I_PRESET_NAMES]:
        cfg = tiny_decoder(PRESETS[name])
        model = METHODS[name](HiViT(encoder_cfg), cfg=cfg)
        side = max(16, img_size_at(cfg, progress=0.9) * 64 // 224 // 16 * 16)   # schedule scaled 224 -> 64 px
        x = torch.nn.functional.interpolate(imgs, size=side) if side != 64 else imgs
        extra = {}
        if model.num_views == 2:                                          # M3I: the image and its mirror image
            x = torch.stack([x, x.flip(3)], dim=1)                        # (B, 2, 3, H, W)
            frames = torch.tensor([[0.0, 0.0, 1.0, 1.0, 0.0], [0.0, 0.0, 1.0, 1.0, 1.0]])   # full crops, 2nd flipped
            extra = {"geometry": frames.expand(x.shape[0], -1, -1)}       # (B, 2, 5)
        out = model(x, **extra)
        out["loss"].backward()
        logs = " ".join(f"{k} {v:.3f}" for k, v in out.get("logs", {}).items())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6
        print(f"{name:36s} {type(model).__name__:7s} {trainable:.2f}M trainable, input {side:2d}px, "
              f"loss {out['loss'].item():.4f}  {logs}")
