r"""detect_seg.py: detection and segmentation on the pre-trained pyramid, every component in plain PyTorch.

Paper:
    iTPN / Fast-iTPN (Tian et al., CVPR 2023 / TPAMI 2024, arXiv 2211.12735 v1/v2), whose central claim is that a
    pyramid pre-trained with the backbone transfers better than one initialised at fine-tuning; HiViT (arXiv
    2205.14949). Heads: UPerNet (arXiv 1807.10221), Mask R-CNN (arXiv 1703.06870), DINO (arXiv 2203.03605) on
    Deformable DETR (arXiv 2010.04159). Metrics: COCO AP (cocoapi `cocoeval.py`), mIoU (mmseg `metrics.py`).

Implements:
    The dense half of the papers: COCO / ADE20K / built-in readers and augmentations, COCO AP and mIoU with the
    reference tools' exact semantics (public, usable alone), backbones -> pyramid maps (the pre-trained iTPN pyramid
    as the neck; ViTDet's simple pyramid for HiViT / ViT), UPerHead, Mask R-CNN-lite and a DINO-style detector, and
    one driver that trains and evaluates any of them through train.py's Trainer with finetune.py's layer decay.
    `python detect_seg.py` is the CPU demo: tiny iTPN + UPerHead on built-in shapes, mIoU in a few minutes (at that
    length the tiny model tells shapes from background but not which shape, so it still predicts background only).

Sections:
    1. Settings: DenseConfig and the recipes      <-> iTPN supp. (ADE20K UPerNet, COCO Mask R-CNN 1x), DINO Sec. 4.1
    2. COCO masks: RLE and polygons               <-> cocoapi maskApi.c
    3. Dense datasets: COCO json, ADE20K          <-> COCO 2017 and ADEChallengeData2016 layouts
    4. Augmentations and padding                  <-> mmseg ADE20K / mmdet COCO pipelines
    5. Evaluation: COCO AP, mean IoU              <-> cocoeval.py evaluate/accumulate/summarize; mmseg metrics
    6. Simple feature pyramid                     <-> ViTDet Sec. 3, Fig. 2 (c)
    7. UPerHead segmentation                      <-> UPerNet Sec. 3, Fig. 3; PSPNet Sec. 3.2
    8. Mask R-CNN-lite                            <-> Faster R-CNN Sec. 3, Mask R-CNN Sec. 3, FPN Eq. 1
    9. DINO-style detector                        <-> DINO Sec. 3.3-3.5; Deformable DETR Eq. 2-3
    10. Backbones -> dense features               <-> iTPN Sec. 3.2, 4.3 (the pyramid is the neck)
    11. The dense task                            <-> train.py's Trainer (task interface)
    12. main

Shapes:
    B batch, H, W unpadded input size, Hp, Wp padded size (a multiple of the coarsest stride), C backbone width,
    F pyramid width, K classes, n instances of an image. Pyramid maps are keyed by stride: "p4".."p64".
    Targets: labels (n,) in 1..K, boxes (n, 4) xyxy input px, masks (n, H, W) bool, semantic (H, W) 0..K-1 with
    255 = ignore. pad_mask (B, Hp, Wp), True = padding. Each section's own letters are in its docstrings.

Differences from the paper / official code:
    - Sections 5 and 7-9 open with their own lists; the driver's are these.
    - Built-in data: ShapesDataset's det/seg targets (train.py) at 64 px; segmentation counts its background as
      class 0 of K + 1. Real data: ADE20K (reduce-zero-label) and COCO 2017 layouts.
    - One recipe per head: the official iTPN-B ADE20K (AdamW, layer decay 0.9, poly, 160k iterations) and COCO
      Mask R-CNN 1x configs, DINO-4scale's optimiser; layer ids are finetune.py's official ones, the pyramid and
      the heads train at the full lr. --schedule 3x: 36 epochs, x0.1 at 27 and 33, and multi-scale training
      (short side drawn from 11 sizes, 0.6-1.0 x --input_size: 480..800 at 800, as Swin's / HiViT's 3x configs);
      the random-crop branch of those configs' AutoAugment is left out.
    - HiViT / ViT use ViTDet's simple pyramid; --pyramid random re-initialises iTPN's pre-trained pyramid (the
      ablation of the paper's claim). UPerHead uses BatchNorm (SyncBN under DDP on GPUs, as mmseg; torch's SyncBN
      has no CPU kernel, so CPU ranks normalise by their own batch; DDP re-sends rank 0's running statistics at
      every step, and once more before an evaluation).
    - Evaluation runs on every rank's share of the val split; COCO results are gathered and scored on rank 0.

Run:
    python detect_seg.py                                  # CPU demo: seg, tiny iTPN from scratch, output_uperhead/
    python detect_seg.py --task det --head maskrcnn       # CPU demo: Mask R-CNN-lite, box/mask AP, output_maskrcnn/
    python detect_seg.py --task det --head dino           # CPU demo: DINO-style, box AP, output_dino/
    python detect_seg.py --finetune output/checkpoint-last.pth --output_dir output_seg_pretrained   # backbone and
                                                          # pyramid from `python train.py`'s run
    torchrun --nproc_per_node 8 detect_seg.py --task seg --head uperhead --model itpn_b --finetune X \
        --data_path /ade20k                                               # paper: 512 crops, 160k iterations
    torchrun --nproc_per_node 8 detect_seg.py --task det --head maskrcnn --model itpn_b --finetune X \
        --data_path /coco                                                 # paper: COCO 1x
"""

import copy
import json
import math
import os
import sys
import warnings
from collections import Counter, defaultdict
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from functools import partial

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.ops import (batched_nms, box_area, box_convert, box_iou, clip_boxes_to_image, generalized_box_iou,
                             generalized_box_iou_loss, remove_small_boxes, roi_align, sigmoid_focal_loss)
from torchvision.transforms.functional import to_pil_image
from torchvision.transforms.v2 import functional as TF
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

import fast_itpn
import hivit
import itpn
from finetune import layer_decay_groups, load_pretrained, read_pretrained
from train import (IMAGENET_MEAN, IMAGENET_STD, MODELS, SHAPE_CLASSES, ConfigError, Dist, RunConfig, SeededViews,
                   ShapesDataset, Trainer, count_steps, denormalize, epoch_loader, find_checkpoint, flag,
                   load_checkpoint, param_groups, parse_config, prepare_output_dir, print0, save_image, script_errors,
                   setup_distributed)

__all__ = [
    "DenseConfig", "DEFAULTS",
    "rle_encode", "rle_decode", "rle_area", "rle_to_string", "rle_from_string", "polygon_to_mask",
    "segmentation_to_mask", "mask_iou", "box_iou_xywh",
    "CocoDataset", "ADE20KDataset", "ADE20K_NUM_CLASSES", "reduce_zero_label_map",
    "rescale_size", "SegTrainTransform", "DetTrainTransform", "EvalTransform", "photometric_distortion", "pad_collate",
    "COCO_STAT_NAMES", "coco_evaluate", "iou_areas", "iou_metrics", "mean_iou", "predictions_to_coco",
    "targets_to_coco_gt",
    "SimpleFeaturePyramid", "LayerNorm2d",
    "UPerConfig", "UPER_PRESETS", "SEG_LEVELS", "ConvNormReLU", "PyramidPoolingModule", "FCNHead", "UPerHead",
    "seg_loss", "slide_windows", "predict_whole", "predict_slide", "poly_lr", "seg_palette", "seg_picture",
    "MaskRCNNConfig", "MASKRCNN_PRESETS", "cell_anchors", "grid_anchors", "BoxCoder", "Matcher", "sample_balanced",
    "RPNHead", "RPN", "roi_levels", "multiscale_roi_align", "BoxHead", "box_losses", "MaskHead", "mask_targets",
    "mask_loss", "postprocess_detections", "paste_masks", "MaskRCNNLite",
    "DINOConfig", "DINO_PRESETS", "FOCAL_ALPHA", "FOCAL_GAMMA", "MATCH_COST", "LOSS_WEIGHT",
    "inverse_sigmoid", "sine_features", "sine_position_embedding", "box_sine_embedding",
    "ms_deform_attn_sample", "MSDeformAttn", "valid_ratios", "encoder_reference_points", "EncoderLayer",
    "encoder_proposals", "QuerySelection", "dn_num_groups", "cdn_queries", "dn_attention_mask", "DecoderLayer",
    "Decoder", "linear_sum_assignment", "hungarian_match", "set_losses", "dn_indices", "dino_losses",
    "dino_postprocess", "normalise_targets", "DINOHead",
    "DenseModel", "build_backbone", "build_head", "load_backbone", "step_lr", "dense_schedule", "DenseData",
    "dense_collate", "rescale_prediction", "DenseTask", "eval_mode", "detection_picture", "prepare", "main",
]


# ---- 1. Settings: DenseConfig, one flag per field, and the recipes ---------------------------------------------------

@dataclass
class DenseConfig(RunConfig):
    """Dense tasks: what to train, on which backbone, from which weights, on which data."""
    task: str = flag("seg", "seg: semantic segmentation (mIoU); det: detection and instance masks (COCO AP)",
                     choices=["seg", "det"])
    head: str | None = flag(None, "uperhead (seg); maskrcnn or dino (det). Default: uperhead / maskrcnn",
                            choices=["uperhead", "maskrcnn", "dino"])
    model: str = flag("itpn_tiny", "backbone, one of train.py's --model names", metavar="NAME")
    finetune: str = flag("", "weights to start from: a train.py checkpoint (backbone + pyramid), a finetune.py "
                             "checkpoint or an official HiViT / iTPN / Fast-iTPN file", metavar="PATH")
    pyramid: str = flag("pretrained", "pretrained: load the pyramid with the backbone; random: re-initialise it "
                                      "(the iTPN ablation)", choices=["pretrained", "random"])
    data_path: str | None = flag(None, "ADE20K root (images/, annotations/) for seg, COCO root (train2017/, "
                                       "val2017/, annotations/) for det. Default: the built-in shapes")
    num_images: int | None = flag(None, "built-in training images (the val split has a quarter as many)",
                                  valid=(lambda v: v >= 4, ">= 4"))
    input_size: int | None = flag(None, "seg: crop side in px; det: short side of the resize (long side <= 5/3 "
                                        "of it)", valid=(lambda v: v >= 64 and v % 32 == 0, ">= 64, a multiple "
                                                                                          "of 32"))
    eval_every: int | None = flag(None, "evaluate on the val split every N epochs and at the end",
                                  valid=(lambda v: v >= 1, ">= 1"))
    layer_decay: float | None = flag(None, "layer-wise lr decay of the backbone (finetune.py's official layer ids)",
                                     valid=(lambda v: 0 < v <= 1, "in (0, 1]"))
    drop_path: float | None = flag(None, "stochastic depth of the backbone", valid=(lambda v: 0 <= v < 1, "in [0, 1)"))
    slide: bool | None = flag(None, "seg: sliding-window inference (paper: 512 windows, stride 341) instead of "
                                    "the whole image")
    migration_ratio: float = flag(0.0, "Fast-iTPN token migration rho (Sec. 4.1): share of stage-3 token "
                                       "computation removed", valid=(lambda v: 0 <= v < 0.5, "in [0, 0.5)"))
    attention: str = flag("global", "Fast-iTPN stage-3 attention (Tab. 7): global, window, or window + gathering "
                                    "tokens", choices=["global", "window", "gathering"])
    schedule: str = flag("1x", "det: 1x (12 epochs, lr x0.1 at 8 and 11) or 3x (36 epochs, x0.1 at 27 and 33, "
                               "multi-scale training: short side 0.6-1.0 x --input_size)", choices=["1x", "3x"])
    eval: bool = flag(False, "evaluate --finetune / --resume weights on the val split and stop")
    output_dir: str | None = flag(None, "checkpoints, log.txt, config.json and pictures. Default: output_<head> "
                                        "(train.py's output/ holds the pre-training run it may start from)")

    RESUME_KEYS = ("task", "head", "model", "schedule", "input_size")


# Defaults per (scale, head). "paper": iTPN-B's ADE20K UPerNet (official seg config: AdamW 3e-5 at batch 16, layer
# decay 0.9, poly, 160k iterations = 127 epochs of 20,210 images, 1,500 warm-up iterations, 512 crops, slide
# test) and COCO Mask R-CNN 1x (det config: AdamW 2e-4 at batch 16, layer decay 0.9, drop path 0.05, 12 epochs,
# x0.1 at epochs 8 and 11, 500 warm-up iterations); DINO-4scale (AdamW 1e-4, backbone 1e-5, wd 1e-4, clip 0.1,
# x0.1 at epoch 11). lr = blr x effective batch / 256, so blr = lr x 256 / 16. "demo": tiny models, built-in
# shapes at 64 px, minutes on 2 CPU cores.
DEFAULTS = {
    "paper_uperhead": dict(input_size=512, batch_size=2, epochs=127, warmup_epochs=1.19, blr=4.8e-4, min_lr=0.0,
                           weight_decay=0.05, layer_decay=0.9, drop_path=0.1, eval_every=13, save_every=13,
                           slide=True, num_workers=4, num_images=2000),
    "paper_maskrcnn": dict(input_size=800, batch_size=2, epochs=12, warmup_epochs=0.07, blr=3.2e-3, min_lr=0.0,
                           weight_decay=0.05, layer_decay=0.9, drop_path=0.05, eval_every=1, save_every=1,
                           slide=False, num_workers=4, num_images=2000),
    "paper_dino": dict(input_size=800, batch_size=2, epochs=12, warmup_epochs=0.0, blr=1.6e-3, min_lr=0.0,
                       weight_decay=1e-4, layer_decay=1.0, drop_path=0.1, eval_every=1, save_every=1, slide=False,
                       num_workers=4, clip_grad=0.1, num_images=2000),
    "demo_uperhead": dict(input_size=64, batch_size=8, epochs=12, warmup_epochs=1, blr=0.03, min_lr=0.0,
                          weight_decay=0.05, layer_decay=0.9, drop_path=0.0, eval_every=4, save_every=4,
                          slide=False, num_workers=0, num_images=400, threads=1),
    "demo_maskrcnn": dict(input_size=64, batch_size=8, epochs=12, warmup_epochs=1, blr=0.03, min_lr=0.0,
                          weight_decay=0.05, layer_decay=0.9, drop_path=0.0, eval_every=4, save_every=4,
                          slide=False, num_workers=0, num_images=400, threads=1),
    "demo_dino": dict(input_size=64, batch_size=8, epochs=12, warmup_epochs=1, blr=0.03, min_lr=0.0,
                      weight_decay=1e-4, layer_decay=1.0, drop_path=0.0, eval_every=4, save_every=4, slide=False,
                      num_workers=0, clip_grad=0.1, num_images=400, threads=1),
}
# --model: train.py's models, plus the released det / seg backbones of iTPN (itpn.DENSE_PRESETS: LayerNorm eps 1e-5,
# the seg ones with RPE tables for 512 px), whose official files --finetune loads with identical outputs.
DENSE_MODELS = {**MODELS, **{name: ("itpn", cfg) for name, cfg in itpn.DENSE_PRESETS.items()}}
DEFAULT_HEAD = {"seg": "uperhead", "det": "maskrcnn"}
HEADS = {"seg": ("uperhead",), "det": ("maskrcnn", "dino")}
BACKBONE_LR = {"dino": 0.1}      # DINO trains the backbone at lr / 10 (official config); the others at lr


# ---- 2. COCO masks: run-length encoding and polygons -----------------------------------------------------------------

# COCO stores a mask as runs down the columns (Fortran order), alternating 0-run, 1-run, ..., starting with a 0-run
# (empty when the top-left pixel is set): {"size": [H, W], "counts": [...]} ("uncompressed", crowd annotations in the
# json files) or "counts" as a string (maskApi.c `rleToString`, what pycocotools' encode returns).

def rle_to_string(counts) -> str:
    """Compressed COCO counts (maskApi.c `rleToString`): each run as signed 5-bit groups, low bits first.

    From the fourth run on, the change from the run two before is stored instead (runs of the same colour have
    similar lengths). Each character is 48 + a group, bit 5 meaning "another group follows"; the last group's
    bit 4 is the sign.
    """
    chars = []
    for i, run in enumerate(counts):
        x = int(run) - (int(counts[i - 2]) if i > 2 else 0)
        more = True
        while more:
            group = x & 0x1F                                              # low 5 bits
            x >>= 5                                                       # arithmetic shift keeps the sign
            more = x != -1 if group & 0x10 else x != 0                    # stop once the rest is only sign
            chars.append(chr(48 + group + (0x20 if more else 0)))
    return "".join(chars)


def rle_from_string(s) -> list[int]:
    """Inverse of `rle_to_string` (maskApi.c `rleFrString`); accepts str or bytes (pycocotools returns bytes)."""
    s = s.decode("ascii") if isinstance(s, bytes) else s
    counts, i = [], 0
    while i < len(s):
        x, shift, more = 0, 0, True
        while more:
            group = ord(s[i]) - 48
            x |= (group & 0x1F) << shift
            more = bool(group & 0x20)
            i, shift = i + 1, shift + 5
            if not more and group & 0x10:
                x |= -1 << shift                                          # sign-extend a negative change
        counts.append(x + (counts[-2] if len(counts) > 2 else 0))
    return counts


def rle_counts(rle: dict) -> np.ndarray:
    """The run lengths of an RLE dict whose counts are a list or a compressed string, as int64."""
    counts = rle["counts"]
    return np.asarray(rle_from_string(counts) if isinstance(counts, (str, bytes)) else counts, dtype=np.int64)


def rle_encode(mask) -> dict:
    """(H, W) bool -> {"size": [H, W], "counts": str}, the compressed RLE pycocotools' `mask.encode` writes."""
    mask = np.asarray(mask, dtype=bool)
    h, w = mask.shape
    flat = mask.T.reshape(-1)                                             # (W*H,) column-major
    starts = np.flatnonzero(flat[1:] != flat[:-1]) + 1                    # where each run after the first begins
    counts = np.diff(np.concatenate([[0], starts, [flat.size]]))
    if flat.size and flat[0]:
        counts = np.concatenate([[0], counts])                            # empty leading 0-run
    return {"size": [h, w], "counts": rle_to_string(counts.tolist())}


def rle_decode(rle: dict) -> np.ndarray:
    """COCO RLE (list or string counts) -> (H, W) bool."""
    h, w = rle["size"]
    counts = rle_counts(rle)
    if (counts < 0).any() or counts.sum() != h * w:
        raise ValueError(f"RLE counts sum to {counts.sum()} (or are negative), but size {h}x{w} needs {h * w}: "
                         f"the 'size' field must be [height, width] of the image the mask was encoded at")
    colour = np.arange(len(counts)) % 2 == 1                              # runs alternate 0, 1, 0, ...
    flat = np.repeat(colour, counts)                                      # (W*H,)
    return np.ascontiguousarray(flat.reshape(w, h).T)                     # (H, W)


def rle_area(rle: dict) -> int:
    """Number of set pixels: the sum of the 1-runs (pycocotools `mask.area`)."""
    return int(rle_counts(rle)[1::2].sum())


POLYGON_UPSAMPLE = 5     # maskApi.c `rleFrPoly` traces polygon edges on a grid 5x finer than the pixels


def polygon_to_mask(polygon, height: int, width: int) -> np.ndarray:
    """One COCO polygon [x0, y0, x1, y1, ...] (pixel coordinates, pixel i spans [i, i+1]) -> (H, W) bool.

    The rule of maskApi.c `rleFrPoly`, so masks equal pycocotools' pixel for pixel (no boundary differences; tested
    on random polygons): vertices are snapped to a 5x finer grid, every edge is traced point by point on that grid
    (stepping along its longer axis, from its left or top end so the rounding does not depend on direction), and
    wherever the trace crosses the vertical line through a pixel column's centre, the column toggles between outside
    and inside from the first pixel row whose centre lies at or below the crossing (even-odd rule). A pixel is thus
    inside when its centre is, up to the 1/5-pixel snapping.
    """
    xy = np.asarray(polygon, dtype=np.float64)
    k = len(xy) // 2                                                      # an odd trailing coordinate is ignored
    mask = np.zeros((height, width), dtype=bool)
    if k == 0:
        return mask
    xs = (POLYGON_UPSAMPLE * xy[0:2 * k:2] + 0.5).astype(np.int64)        # (k,) C's int cast truncates toward 0
    ys = (POLYGON_UPSAMPLE * xy[1:2 * k:2] + 0.5).astype(np.int64)        # (k,)
    xe, ye = np.roll(xs, -1), np.roll(ys, -1)                             # (k,) edge j ends at vertex j+1
    dx, dy = np.abs(xe - xs), np.abs(ye - ys)
    along_x = dx >= dy
    flip = np.where(along_x, xs > xe, ys > ye)                            # trace from the left / top end
    x0, y0, x1, y1 = np.where(flip, xe, xs), np.where(flip, ye, ys), np.where(flip, xs, xe), np.where(flip, ys, ye)
    steps = np.maximum(dx, dy)
    slope = np.where(along_x, (y1 - y0) / np.maximum(dx, 1), (x1 - x0) / np.maximum(dy, 1))
    n = steps + 1                                                         # points per edge, both ends included
    edge = np.repeat(np.arange(k), n)                                     # (P,) edge of each traced point
    d = np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)               # (P,) step index along its edge
    t = np.where(flip[edge], steps[edge] - d, d)                          # keep the polygon's point order
    off = (np.where(along_x, y0, x0)[edge] + slope[edge] * t + 0.5).astype(np.int64)   # (P,) rounded minor axis
    u = np.where(along_x[edge], x0[edge] + t, off)                        # (P,) x on the fine grid
    v = np.where(along_x[edge], off, y0[edge] + t)                        # (P,) y on the fine grid
    j = np.flatnonzero(u[1:] != u[:-1]) + 1                               # the trace moves to another fine column
    col = np.where(u[j] < u[j - 1], u[j], u[j] - 1)                       # the fine column left of the crossing
    col = (col + 0.5) / POLYGON_UPSAMPLE - 0.5                            # integer only at a pixel column's centre
    keep = (np.floor(col) == col) & (col >= 0) & (col <= width - 1)
    row = np.ceil(np.clip((np.minimum(v[j], v[j - 1]) + 0.5) / POLYGON_UPSAMPLE - 0.5, 0, height))
    pos = col[keep].astype(np.int64) * height + row[keep].astype(np.int64)   # column-major index of each toggle
    toggles = np.bincount(pos, minlength=height * width + 1)[:height * width]   # (W*H,) a toggle at H*W is the end
    inside = np.cumsum(toggles) % 2 == 1                                  # (W*H,) even-odd rule down the columns
    return np.ascontiguousarray(inside.reshape(width, height).T)          # (H, W)


def segmentation_to_mask(segmentation, height: int, width: int) -> np.ndarray:
    """A COCO `segmentation` (list of polygons, or RLE with list or string counts) -> (H, W) bool.

    Several polygons are one object in pieces: their union (pycocotools `annToRLE` merges them).
    """
    if isinstance(segmentation, dict):
        if list(segmentation["size"]) != [height, width]:
            raise ValueError(f"RLE of size {segmentation['size']} on a {height}x{width} image: encode masks at the "
                             f"image's own resolution")
        return rle_decode(segmentation)
    if segmentation and not isinstance(segmentation[0], (list, tuple, np.ndarray)):
        segmentation = [segmentation]                                     # a bare polygon
    mask = np.zeros((height, width), dtype=bool)
    for polygon in segmentation:
        mask |= polygon_to_mask(polygon, height, width)
    return mask


def decode_masks(segmentations: list, height: int, width: int) -> np.ndarray:
    """COCO segmentations -> (n, H, W) bool (n may be 0)."""
    masks = [segmentation_to_mask(seg, height, width) for seg in segmentations]
    return np.stack(masks) if masks else np.zeros((0, height, width), dtype=bool)


def mask_iou(dt_masks: np.ndarray, gt_masks: np.ndarray, gt_crowd: np.ndarray) -> np.ndarray:
    """(D, H, W), (G, H, W) bool, (G,) bool -> (D, G) IoU; a crowd GT divides by the detection's area (rleIou).

    Intersections are one matrix product of the flattened masks. float32 sums of 0/1 products are exact integers
    below 2**24 pixels; larger images use float64.
    """
    dtype = np.float32 if dt_masks.shape[1] * dt_masks.shape[2] < 2 ** 24 else np.float64
    dt = dt_masks.reshape(len(dt_masks), -1).astype(dtype)               # (D, H*W)
    gt = gt_masks.reshape(len(gt_masks), -1).astype(dtype)               # (G, H*W)
    inter = (dt @ gt.T).astype(np.float64)                                # (D, G)
    dt_area, gt_area = dt.sum(1, dtype=np.float64), gt.sum(1, dtype=np.float64)
    union = np.where(gt_crowd[None, :], dt_area[:, None], dt_area[:, None] + gt_area[None, :] - inter)
    return np.where(inter > 0, inter / np.maximum(union, 1), 0.0)


def box_iou_xywh(dt: np.ndarray, gt: np.ndarray, gt_crowd: np.ndarray) -> np.ndarray:
    """(D, 4), (G, 4) xywh, (G,) bool -> (D, G) IoU; a crowd GT divides by the detection's area (maskApi.c bbIou).

    Written out rather than torchvision's `box_iou`: that one works in xyxy, where x2 - x1 can differ from w in the
    last bit, and has no crowd rule. The arithmetic order is bbIou's, so IoUs equal pycocotools' exactly.
    """
    w = np.minimum(dt[:, None, 0] + dt[:, None, 2], gt[None, :, 0] + gt[None, :, 2]) - np.maximum(
        dt[:, None, 0], gt[None, :, 0])                                   # (D, G) overlap width
    h = np.minimum(dt[:, None, 1] + dt[:, None, 3], gt[None, :, 1] + gt[None, :, 3]) - np.maximum(
        dt[:, None, 1], gt[None, :, 1])                                   # (D, G) overlap height
    inter = w * h
    dt_area, gt_area = dt[:, 2] * dt[:, 3], gt[:, 2] * gt[:, 3]
    union = np.where(gt_crowd[None, :], dt_area[:, None], dt_area[:, None] + gt_area[None, :] - inter)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where((w > 0) & (h > 0), inter / union, 0.0)


# ---- 3. Dense datasets: COCO json, ADE20K folders --------------------------------------------------------------------

def warn_issues(source: str, issues: Counter, examples: dict):
    """One warning per kind of bad input, with its count and a first example, instead of one per item."""
    for issue, count in issues.items():
        warnings.warn(f"{source}: {count} {issue} (first: {examples[issue]})", stacklevel=3)


def read_image(path: str, fix: str) -> Image.Image:
    """The file as RGB, or a ValueError naming it and the fix (PIL raises OSError, SyntaxError or ValueError)."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")                                     # convert() reads the whole file
    except (OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"cannot read image {path} ({err}): {fix}") from None


class CocoDataset(Dataset):
    """COCO instances: <root>/<split>/*.jpg and <root>/annotations/instances_<split>.json -> (PIL image, target).

    target: labels (n,) int64 1..K, boxes (n, 4) float32 xyxy px, masks (n, H, W) bool, iscrowd (n,) bool,
            area (n,) float32 (the json's segmentation area, which COCO's area ranges use), image_id int.
    Labels: categories sorted by id become 1..K. `categories[k - 1]` is label k's json entry (id, name), `label_of`
    maps a category id to its label (COCO's 80 ids run 1..90 with gaps).
    Bad annotations are dropped at construction with one counted warning per kind (`issues`): a category id not in
    the json, a box of zero area (after clipping to the image), a polygon with fewer than 3 points (the annotation
    too when no polygon is left), an RLE of another size than its image, an image id not in the json. Images without
    annotations stay as negatives (counted in `issues` too); images whose file is missing are dropped.
    """

    def __init__(self, root: str, *, split: str = "val2017"):
        self.image_dir = os.path.join(root, split)
        self.ann_file = os.path.join(root, "annotations", f"instances_{split}.json")
        for path in (self.image_dir, self.ann_file):
            if not os.path.exists(path):
                raise FileNotFoundError(f"{path} not found: the COCO layout is <root>/{split}/*.jpg and "
                                        f"<root>/annotations/instances_{split}.json")
        try:
            with open(self.ann_file) as f:
                data = json.load(f)
            self.categories = sorted(data["categories"], key=lambda c: c["id"])
            images, annotations = data["images"], data["annotations"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{self.ann_file} is not a COCO instances file ({err!r}): it needs 'images', "
                             f"'annotations' and 'categories' lists") from None
        self.label_of = {c["id"]: k + 1 for k, c in enumerate(self.categories)}
        self.issues, self.examples = Counter(), {}                      # bad input kind -> count, first example
        self.images = self.existing_images(images)
        sizes = {im["id"]: (im["height"], im["width"]) for im in self.images}
        self.annotations = defaultdict(list)
        for ann in annotations:
            ann = self.clean(ann, sizes)
            if ann is not None:
                self.annotations[ann["image_id"]].append(ann)
        for im in self.images:
            if not self.annotations[im["id"]]:
                self.count("images without annotations, kept as negatives", im["file_name"])
        warn_issues(self.ann_file, self.issues, self.examples)

    def count(self, issue: str, example):
        self.issues[issue] += 1
        self.examples.setdefault(issue, example)

    def existing_images(self, images: list) -> list:
        """The json's images whose file exists; an error when none does (the path is wrong, not a few files)."""
        found = [os.path.isfile(os.path.join(self.image_dir, im["file_name"])) for im in images]
        if images and not any(found):
            raise FileNotFoundError(f"none of the {len(images)} images of {self.ann_file} is in {self.image_dir} "
                                    f"(e.g. {images[0]['file_name']}): check the root and the split")
        for im, ok in zip(images, found):
            if not ok:
                self.count("images listed in the json whose file is missing, dropped", im["file_name"])
        return [im for im, ok in zip(images, found) if ok]

    def clean(self, ann: dict, sizes: dict):
        """The annotation ready to use (box clipped to the image, polygons of >= 3 points), or None, counted."""
        issue = self.unusable(ann, sizes)
        if issue is not None:
            self.count(issue, ann.get("id"))
            return None
        seg = ann.get("segmentation")
        if isinstance(seg, list) and seg:
            polygons = [p for p in seg if len(p) >= 6]                    # 3 points = 6 numbers
            if len(polygons) < len(seg):
                self.count("annotations with a polygon of fewer than 3 points (the polygon dropped, the annotation "
                          "too when no polygon is left)", ann.get("id"))
                if not polygons:
                    return None
            seg = polygons
        h, w = sizes[ann["image_id"]]
        x, y, bw, bh = ann["bbox"]
        box = [min(max(x, 0), w), min(max(y, 0), h), min(max(x + bw, 0), w), min(max(y + bh, 0), h)]   # xyxy
        if not seg:
            self.count("annotations without a segmentation (their box is used as mask)", ann.get("id"))
            seg = [[box[0], box[1], box[2], box[1], box[2], box[3], box[0], box[3]]]
        return {**ann, "box": box, "segmentation": seg}

    def unusable(self, ann: dict, sizes: dict):
        """Why the annotation cannot be used at all, or None."""
        if ann.get("image_id") not in sizes:
            return "annotations of an image not in the json (or whose file is missing)"
        if ann.get("category_id") not in self.label_of:
            return "annotations with a category id not in 'categories'"
        h, w = sizes[ann["image_id"]]
        x, y, bw, bh = ann.get("bbox") or (0, 0, 0, 0)
        if min(x + bw, w) <= max(x, 0) or min(y + bh, h) <= max(y, 0):   # empty after clipping to the image
            return "annotations with a zero-area box"
        seg = ann.get("segmentation")
        if isinstance(seg, dict) and list(seg.get("size", [])) != [h, w]:
            return "annotations whose RLE size differs from the image"
        return None

    def coco_gt(self) -> dict:
        """The ground truth of the kept images and annotations, in COCO json form, for `coco_evaluate`."""
        return {"images": self.images, "annotations": [a for im in self.images for a in self.annotations[im["id"]]],
                "categories": self.categories}

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index: int):
        info = self.images[index]
        path = os.path.join(self.image_dir, info["file_name"])
        image = read_image(path, fix=f"replace the file or remove image id {info['id']} from {self.ann_file}")
        h, w = info["height"], info["width"]
        if image.size != (w, h):
            raise ValueError(f"{path} is {image.size[1]}x{image.size[0]} but {self.ann_file} says {h}x{w}: fix the "
                             f"json's height/width (masks are drawn at that size)")
        anns = self.annotations[info["id"]]
        masks = decode_masks([a["segmentation"] for a in anns], h, w)    # (n, H, W)
        return image, {
            "labels": np.array([self.label_of[a["category_id"]] for a in anns], dtype=np.int64),
            "boxes": np.array([a["box"] for a in anns], dtype=np.float32).reshape(-1, 4),   # (n, 4) xyxy
            "masks": masks,
            "iscrowd": np.array([bool(a.get("iscrowd", 0)) for a in anns], dtype=bool),
            "area": np.array([a.get("area", m.sum()) for a, m in zip(anns, masks)], dtype=np.float32),
            "image_id": info["id"],
        }


ADE20K_NUM_CLASSES = 150     # SceneParsing classes 1..150 -> 0..149 after reduce-zero-label


def reduce_zero_label_map(label) -> np.ndarray:
    """mmseg's reduce_zero_label on a label map: 0 ("other") -> 255, k -> k - 1, 255 stays 255 (ignore)."""
    label = np.asarray(label).astype(np.int64)
    label = np.where(label == 0, 255, label - 1)
    return np.where(label == 254, 255, label)                             # a 255 that became 254 is ignore again


class ADE20KDataset(Dataset):
    """ADE20K (SceneParsing, mmseg layout): <root>/images/<split>/*.jpg + <root>/annotations/<split>/*.png.

    -> (PIL image, {"semantic": (H, W) uint8}). Labels are single-channel PNGs, 0 = "other", 1..150 = classes; with
    reduce_zero_label (ADE20K's setting) they become 0..149 and "other" 255 = ignore, the same map the evaluation
    sees. Pairs are checked from the file headers at construction: an image without its PNG, a PNG whose size differs
    from its image, a PNG that is not single-channel and an unreadable file are skipped with counted warnings
    (`issues`). A file that fails later, while its pixels are read, raises a ValueError naming it.
    """

    def __init__(self, root: str, *, split: str = "training", reduce_zero_label: bool = True):
        image_dir, label_dir = os.path.join(root, "images", split), os.path.join(root, "annotations", split)
        for path in (image_dir, label_dir):
            if not os.path.isdir(path):
                raise FileNotFoundError(f"{path} not found: the ADE20K layout is <root>/images/{split}/*.jpg and "
                                        f"<root>/annotations/{split}/*.png")
        self.reduce_zero_label = reduce_zero_label
        self.issues, self.examples = Counter(), {}                      # bad input kind -> count, first example
        self.pairs = []
        for name in sorted(os.listdir(image_dir)):
            if not name.lower().endswith((".jpg", ".jpeg", ".png")):
                continue
            pair = (os.path.join(image_dir, name), os.path.join(label_dir, os.path.splitext(name)[0] + ".png"))
            issue = self.check(*pair)
            if issue:
                self.issues[issue] += 1
                self.examples.setdefault(issue, name)
            else:
                self.pairs.append(pair)
        warn_issues(image_dir, self.issues, self.examples)
        if not self.pairs:
            raise FileNotFoundError(f"no usable image/label pair under {root!r} for split {split!r}")

    @staticmethod
    def check(image_path: str, label_path: str):
        """Why the pair cannot be used, from the headers only (PIL reads no pixels here), or None."""
        if not os.path.isfile(label_path):
            return "images without a label PNG"
        try:
            with Image.open(image_path) as img, Image.open(label_path) as lab:
                if lab.mode not in ("L", "P"):
                    return "label PNGs that are not single-channel 8-bit (class indices)"
                if img.size != lab.size:
                    return "label PNGs whose size differs from their image"
        except (OSError, SyntaxError, ValueError):
            return "unreadable image or label files"
        return None

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, index: int):
        image_path, label_path = self.pairs[index]
        image = read_image(image_path, fix="replace or delete the file")
        try:
            with Image.open(label_path) as lab:
                label = np.array(lab)                                     # (H, W) uint8 class indices
        except (OSError, SyntaxError, ValueError) as err:
            raise ValueError(f"cannot read label {label_path} ({err}): replace or delete it") from None
        if self.reduce_zero_label:
            label = reduce_zero_label_map(label).astype(np.uint8)
        return image, {"semantic": label}


# ---- 4. Augmentations and padding to the model stride ----------------------------------------------------------------

# -- 4.1 Augmentations --
# Callables (PIL image, target) -> ((3, H, W) float normalised with ImageNet mean/std, target of torch tensors).
# Geometry goes through torchvision.transforms.v2 on tv_tensors, so boxes and masks follow the image; masks and
# label maps are resized with nearest. All randomness is drawn from torch's CPU RNG: seeding it per (seed, epoch,
# index) makes a sample's augmentation independent of workers, ranks and resumes.

# Label maps and masks: the source pixel under each output pixel's centre, the geometry of the bilinear image
# resize (align_corners=False). Plain NEAREST (and mmseg's cv2 INTER_NEAREST) takes the top-left source pixel of each
# cell, which shifts labels by up to half an output pixel against the image when shrinking.
NEAREST = TF.InterpolationMode.NEAREST_EXACT


def rescale_size(height: int, width: int, scale) -> tuple[int, int]:
    """mmcv's keep-ratio rescale: the largest (h, w) with long side <= max(scale) and short side <= min(scale)."""
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def uniform(low: float, high: float) -> float:
    """A draw from U(low, high) on torch's RNG."""
    return float(torch.empty(()).uniform_(low, high))


def coin() -> bool:
    """True with probability 1/2, on torch's RNG."""
    return bool(torch.rand(()) < 0.5)


def photometric_distortion(x: torch.Tensor) -> torch.Tensor:
    """mmseg `PhotoMetricDistortion` on a (3, H, W) float image in [0, 1]; each step with probability 1/2.

    Brightness +-32/255 (additive); contrast x0.5-1.5 (multiplicative), before or after the colour steps at random;
    saturation x0.5-1.5; hue +-18 of OpenCV's 180 (= +-0.1 of the hue circle). Values are clipped after each step.
    """
    if coin():
        x = (x + uniform(-32 / 255, 32 / 255)).clamp(0, 1)
    contrast_first = coin()
    if contrast_first and coin():
        x = (x * uniform(0.5, 1.5)).clamp(0, 1)
    if coin():
        x = TF.adjust_saturation(x, uniform(0.5, 1.5))                    # torchvision clips to [0, 1]
    if coin():
        x = TF.adjust_hue(x, uniform(-18 / 180, 18 / 180))
    if not contrast_first and coin():
        x = (x * uniform(0.5, 1.5)).clamp(0, 1)
    return x


def normalise(image: torch.Tensor) -> torch.Tensor:
    """(3, H, W) uint8 -> (3, H, W) float32 normalised with the ImageNet mean and std."""
    return TF.normalize(TF.to_dtype(image, torch.float32, scale=True), IMAGENET_MEAN, IMAGENET_STD)


class SegTrainTransform:
    """ADE20K training pipeline of BEiT / iTPN (mmseg `configs/_base_/datasets/ade20k.py`), target -> {semantic}.

    Rescale keeping the aspect ratio to fit (2048, 512) x r, r ~ U(0.5, 2.0); random crop_size crop, redrawn up to
    10 times while one class covers >= cat_max_ratio of its labelled pixels; horizontal flip; photometric distortion.
    Crops of images smaller than crop_size are smaller; the collate pads them (label 255).
    """

    def __init__(self, *, crop_size: int = 512, scale=(2048, 512), ratio_range=(0.5, 2.0),
                 cat_max_ratio: float = 0.75, photometric: bool = True):
        self.crop_size, self.scale, self.ratio_range = crop_size, scale, ratio_range
        self.cat_max_ratio, self.photometric = cat_max_ratio, photometric

    def crop_box(self, semantic: torch.Tensor) -> tuple[int, int, int, int]:
        """(top, left, height, width) of a crop in which no class covers cat_max_ratio of the labelled pixels."""
        h, w = semantic.shape
        ch, cw = min(self.crop_size, h), min(self.crop_size, w)
        for _ in range(10):                                               # mmseg: 10 tries, then the last draw
            top, left = int(torch.randint(h - ch + 1, ())), int(torch.randint(w - cw + 1, ()))
            crop = semantic[top:top + ch, left:left + cw]
            counts = torch.bincount(crop[crop != 255].flatten(), minlength=1)
            counts = counts[counts > 0]
            if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                break
        return top, left, ch, cw

    def __call__(self, image: Image.Image, target: dict):
        img = TF.pil_to_tensor(image)                                     # (3, H, W) uint8
        sem = tv_tensors.Mask(torch.as_tensor(np.asarray(target["semantic"]), dtype=torch.uint8)[None])   # (1, H, W)
        h, w = img.shape[-2:]
        r = uniform(*self.ratio_range)
        size = rescale_size(h, w, (int(self.scale[0] * r), int(self.scale[1] * r)))
        img, sem = TF.resize(img, list(size), antialias=True), TF.resize(sem, list(size), interpolation=NEAREST)
        box = self.crop_box(sem[0])
        img, sem = TF.crop(img, *box), TF.crop(sem, *box)
        if coin():
            img, sem = TF.horizontal_flip(img), TF.horizontal_flip(sem)
        x = TF.to_dtype(img, torch.float32, scale=True)
        x = photometric_distortion(x) if self.photometric else x
        x = TF.normalize(x, IMAGENET_MEAN, IMAGENET_STD)
        return x, {"semantic": sem[0].as_subclass(torch.Tensor).long(), "orig_size": (h, w)}   # (H', W')


class DetTrainTransform:
    """Mask R-CNN training pipeline (mmdet `configs/_base_/datasets/coco_instance.py`), target -> instances.

    Resize keeping the aspect ratio to fit a scale (1333, 800): long side <= 1333, short side <= 800; with several
    `scales` one is drawn per image (multi-scale training of the 3x schedule, e.g. short side 480..800 by 32).
    Horizontal flip with probability 1/2. Keeps labels, boxes, masks and, when present, iscrowd and image_id.
    """

    def __init__(self, *, scales=((1333, 800),), flip_prob: float = 0.5):
        self.scales, self.flip_prob = scales, flip_prob

    def __call__(self, image: Image.Image, target: dict):
        img = TF.pil_to_tensor(image)                                     # (3, H, W) uint8
        h, w = img.shape[-2:]
        boxes = tv_tensors.BoundingBoxes(torch.as_tensor(np.asarray(target["boxes"]), dtype=torch.float32)
                                         .reshape(-1, 4), format="XYXY", canvas_size=(h, w))   # (n, 4)
        masks = tv_tensors.Mask(torch.as_tensor(np.asarray(target["masks"]), dtype=torch.bool))  # (n, H, W)
        size = list(rescale_size(h, w, self.scales[int(torch.randint(len(self.scales), ()))]))
        img, boxes = TF.resize(img, size, antialias=True), TF.resize(boxes, size)
        masks = TF.resize(masks, size, interpolation=NEAREST)
        if torch.rand(()) < self.flip_prob:
            img, boxes, masks = TF.horizontal_flip(img), TF.horizontal_flip(boxes), TF.horizontal_flip(masks)
        out = {"labels": torch.as_tensor(np.asarray(target["labels"]), dtype=torch.int64),
               "boxes": boxes.as_subclass(torch.Tensor), "masks": masks.as_subclass(torch.Tensor), "orig_size": (h, w)}
        for key in ("iscrowd", "image_id"):
            if key in target:
                out[key] = torch.as_tensor(np.asarray(target[key]))
        return normalise(img), out


class EvalTransform:
    """Test pipeline of both tasks: resize the image to fit `scale` keeping its aspect ratio, normalise.

    The target stays at the original resolution, as torch tensors, with `orig_size` (H, W) added: COCO boxes are
    scored in original pixels and mIoU on the original label map (ADE20K's test scale is (2048, 512), COCO's
    (1333, 800)). Predictions are mapped back with orig_size / the resized size.
    """

    def __init__(self, *, scale=(2048, 512)):
        self.scale = scale

    def __call__(self, image: Image.Image, target: dict):
        img = TF.pil_to_tensor(image)                                     # (3, H, W) uint8
        h, w = img.shape[-2:]
        img = TF.resize(img, list(rescale_size(h, w, self.scale)), antialias=True)
        out = {k: torch.as_tensor(np.asarray(v)) for k, v in target.items()}
        return normalise(img), {**out, "orig_size": (h, w)}


# -- 4.2 Batching: padding to the model stride --
def pad_collate(batch: list, *, stride: int = 32, pad_targets: bool = True):
    """[(image (3, h_i, w_i), target)] -> (images (B, 3, Hp, Wp), pad_mask (B, Hp, Wp), image_sizes, targets).

    Hp, Wp: the largest h_i, w_i rounded up to a multiple of `stride` (32 = the coarsest pyramid level for
    segmentation, 64 with the P64 level of detection), so every level's map is exactly 1/stride of the input.
    Images are padded bottom/right with 0 (the mean colour after normalisation); pad_mask is True on padding;
    image_sizes [(h_i, w_i)] are the unpadded sizes. With pad_targets (training), each target's maps in input
    coordinates are padded too: semantic with 255 (ignore), masks with False. Evaluation targets stay as they are
    (original resolution). Use as DataLoader(collate_fn=functools.partial(pad_collate, stride=64)).
    """
    images, targets = [img for img, _ in batch], [dict(t) for _, t in batch]
    sizes = [tuple(img.shape[-2:]) for img in images]
    hp = math.ceil(max(h for h, _ in sizes) / stride) * stride
    wp = math.ceil(max(w for _, w in sizes) / stride) * stride
    out = images[0].new_zeros(len(images), 3, hp, wp)                     # (B, 3, Hp, Wp)
    pad_mask = torch.ones(len(images), hp, wp, dtype=torch.bool)          # (B, Hp, Wp)
    for i, (img, (h, w)) in enumerate(zip(images, sizes)):
        out[i, :, :h, :w] = img
        pad_mask[i, :h, :w] = False
        if pad_targets:
            pad = (0, wp - w, 0, hp - h)                                  # F.pad order: left, right, top, bottom
            if "semantic" in targets[i]:
                targets[i]["semantic"] = F.pad(targets[i]["semantic"], pad, value=255)   # (Hp, Wp)
            if "masks" in targets[i]:
                targets[i]["masks"] = F.pad(targets[i]["masks"], pad, value=False)       # (n, Hp, Wp)
    return out, pad_mask, sizes, targets


# ---- 5. Evaluation: COCO AP (pycocotools' semantics), mean IoU (mmseg's), conversions --------------------------------

# Differences from pycocotools / mmseg / the official pipelines:
# - COCO AP equals pycocotools' to the last bit (tested on random cases with crowds and ties) except where
#   pycocotools is undefined or fragile: an annotation id 0 is a normal id here (pycocotools uses 0 as "unmatched"),
#   an empty result list scores 0 (pycocotools' loadRes refuses it), `segm` results need a mask (loadRes would
#   rasterise the box), and a result's area is its box area when it has a `bbox`, else its mask area, per result
#   (loadRes decides from the first result only).
# - mean_iou refuses label values outside 0..K-1 other than the ignore index (mmseg silently drops them, which
#   hides a missing reduce_zero_label).
# - Photometric distortion: brightness, contrast and hue as mmseg; saturation is torchvision's `adjust_saturation`
#   (a blend with the grey image) instead of scaling HSV saturation. Images are resized with antialiasing, label
#   maps and masks with nearest on pixel centres (mmseg's cv2 nearest takes each cell's top-left pixel instead).
# - Training crops are padded to the batch's stride multiple by the collate, not to the crop size (mmseg pads each
#   crop to 512x512; both pad with label 255 and image 0).
# - Crowd annotations stay in the COCO targets with iscrowd True: training heads drop them, evaluation ignores them.

# -- 5.1 COCO AP: exactly pycocotools' semantics --
# For every (image, category): detections sorted by score (stable), at most 100; IoU with every GT, a crowd GT
# dividing by the detection's area. For every area range and IoU threshold, greedy matching in score order: a
# detection takes the free GT of highest IoU >= threshold, preferring real GTs to ignored ones (crowd, or GT `area`
# outside the range; crowd GTs are never used up); it is ignored when its GT is, and when unmatched with its own area
# outside the range. Per (category, area range, maxDets): the first maxDets detections of each image, pooled and
# sorted by score, give precision/recall; precision is made non-increasing from the right and read at 101 recall
# thresholds. A category without non-ignored GT stays -1 and is left out of the means.

COCO_IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)                          # .50:.05:.95 (linspace: pycocotools' values)
COCO_RECALL_THRESHOLDS = np.linspace(0.0, 1.0, 101)                       # 101-point interpolation
COCO_MAX_DETS = (1, 10, 100)                                              # per image *per category*
COCO_AREA_RANGES = ((0, 1e10), (0, 32 ** 2), (32 ** 2, 96 ** 2), (96 ** 2, 1e10))   # all, small, medium, large (px^2)
COCO_STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def gt_instances(anns: list, iou_type: str, image: dict) -> dict:
    """One (image, category)'s GT: boxes (G, 4) xywh or masks (G, H, W), area (G,) (the `area` field), crowd (G,)."""
    need = "bbox" if iou_type == "bbox" else "segmentation"
    for a in anns:
        for key in (need, "area"):
            if key not in a:
                raise ValueError(f"annotation {a.get('id')} of image {a['image_id']} has no {key!r}, which "
                                 f"{iou_type} evaluation needs")
    out = {"crowd": np.array([bool(a.get("iscrowd", 0)) for a in anns], dtype=bool),
           "area": np.array([a["area"] for a in anns], dtype=np.float64)}
    if iou_type == "bbox":
        out["boxes"] = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)   # (G, 4)
    else:
        out["masks"] = decode_masks([a["segmentation"] for a in anns], image["height"], image["width"])
    return out


def result_instances(results: list, iou_type: str, image: dict) -> dict:
    """One (image, category)'s detections: boxes (D, 4) xywh or masks (D, H, W), score (D,) and area (D,).

    As pycocotools' loadRes: a result's area is its box's w*h when it has a `bbox`, else its mask's pixel count; a
    result without `bbox` is boxed tightly around its mask.
    """
    need = "segmentation" if iou_type == "segm" else "bbox"
    for r in results:
        if need not in r and "segmentation" not in r:
            raise ValueError(f"a result of image {r['image_id']} has no {need!r}, which {iou_type} evaluation needs")
    out = {"score": np.array([r["score"] for r in results], dtype=np.float64),
           "area": np.array([r["bbox"][2] * r["bbox"][3] if r.get("bbox") else rle_area(r["segmentation"])
                             for r in results], dtype=np.float64)}
    if iou_type == "segm":
        out["masks"] = decode_masks([r["segmentation"] for r in results], image["height"], image["width"])
    else:
        out["boxes"] = np.array([r["bbox"] if "bbox" in r else tight_box_xywh(rle_decode(r["segmentation"]))
                                 for r in results], dtype=np.float64).reshape(-1, 4)   # (D, 4)
    return out


def tight_box_xywh(mask: np.ndarray) -> list:
    """The smallest xywh box around a mask's pixels, [0, 0, 0, 0] when empty (pycocotools `toBbox`)."""
    ys, xs = np.nonzero(mask)
    return [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1] if len(xs) else [0, 0, 0, 0]


def best_gt(candidates: np.ndarray, iou: np.ndarray) -> np.ndarray:
    """(T, G) bool, (G,) -> (T,) the candidate of highest IoU, the last one on ties, -1 where there is none.

    Last on ties: pycocotools scans the GTs in order and replaces its choice whenever IoU >= the best so far.
    """
    score = np.where(candidates, iou[None, :], -np.inf)                   # (T, G)
    last = candidates.shape[1] - 1 - np.argmax(score[:, ::-1], axis=1)    # (T,)
    return np.where(candidates.any(1), last, -1)


def match_image(iou: np.ndarray, gt: dict, dt: dict, area_range) -> dict:
    """Greedy matching of one (image, category) at every IoU threshold (cocoeval.py `evaluateImg`).

    iou: (D, G) with detections sorted by score. Returns scores (D,), matched and ignored (T, D) bool, and the
    number of non-ignored GTs.
    """
    lo, hi = area_range
    gt_ignored = gt["crowd"] | (gt["area"] < lo) | (gt["area"] > hi)
    order = np.argsort(gt_ignored, kind="mergesort")                      # real GTs first, stable
    gt_ignored, crowd, iou = gt_ignored[order], gt["crowd"][order], iou[:, order]
    T, (D, G) = len(COCO_IOU_THRESHOLDS), iou.shape
    threshold = np.minimum(COCO_IOU_THRESHOLDS, 1 - 1e-10)[:, None]      # (T, 1)
    used = np.zeros((T, G), dtype=bool)                                   # GT taken at this threshold
    matched, ignored = np.zeros((T, D), dtype=bool), np.zeros((T, D), dtype=bool)
    for d in range(D if G else 0):
        free = (~used | crowd) & (iou[d] >= threshold)                    # (T, G) a crowd GT absorbs any number
        m = best_gt(free & ~gt_ignored, iou[d])                          # a real GT if one qualifies ...
        m = np.where(m >= 0, m, best_gt(free & gt_ignored, iou[d]))      # ... else an ignored one
        t = np.flatnonzero(m >= 0)
        matched[t, d], ignored[t, d], used[t, m[t]] = True, gt_ignored[m[t]], True
    outside = (dt["area"] < lo) | (dt["area"] > hi)
    ignored |= ~matched & outside[None, :]                                # unmatched and out of range: not an FP
    return {"scores": dt["score"], "matched": matched, "ignored": ignored, "num_gt": int((~gt_ignored).sum())}


def precision_recall(matched: np.ndarray, ignored: np.ndarray, num_gt: int):
    """(T, D) pooled detections in score order -> interpolated precision (T, R) and final recall (T,)."""
    tp = np.cumsum(matched & ~ignored, axis=1).astype(np.float64)        # (T, D)
    fp = np.cumsum(~matched & ~ignored, axis=1).astype(np.float64)       # (T, D)
    recall = tp / num_gt
    precision = tp / (fp + tp + np.spacing(1))
    precision = np.maximum.accumulate(precision[:, ::-1], axis=1)[:, ::-1]   # (T, D) suffix max: no zig-zag
    out = np.zeros((len(tp), len(COCO_RECALL_THRESHOLDS)))
    for t in range(len(tp)):
        idx = np.searchsorted(recall[t], COCO_RECALL_THRESHOLDS, side="left")   # first point reaching each recall
        reached = idx < recall.shape[1]
        out[t, reached] = precision[t, idx[reached]]                      # 0 for recalls never reached
    return out, recall[:, -1] if recall.shape[1] else np.zeros(len(tp))


def check_keys(name: str, items: list, keys: tuple):
    """A ValueError naming the first item that lacks one of `keys`."""
    for i, item in enumerate(items):
        missing = [k for k in keys if k not in item]
        if missing:
            raise ValueError(f"{name}[{i}] lacks {missing}: COCO form needs {list(keys)}")


def coco_evaluate(gt: dict, results: list, iou_type: str) -> np.ndarray:
    """The 12 COCO numbers (pycocotools' order, see COCO_STAT_NAMES) of `results` against `gt`; -1 = undefined.

    gt: a dict in COCO json form: images [{id, height, width}], categories [{id}], annotations [{id, image_id,
        category_id, bbox xywh, area, iscrowd, segmentation (polygons, or RLE with list or string counts)}]. The
        `area` field (not the box's) decides small / medium / large, for bbox AP too.
    results: [{image_id, category_id, score, bbox xywh and/or segmentation (RLE)}]; results of a category not in
        gt are dropped, of an image not in gt refused.
    iou_type: "bbox" or "segm".
    """
    if iou_type not in ("bbox", "segm"):
        raise ValueError(f"iou_type must be 'bbox' or 'segm', got {iou_type!r}")
    check_keys("gt", [gt], ("images", "annotations", "categories"))
    check_keys("gt['annotations']", gt["annotations"], ("image_id", "category_id"))
    check_keys("results", results, ("image_id", "category_id", "score"))
    images = {im["id"]: im for im in gt["images"]}
    cat_ids = sorted({c["id"] for c in gt["categories"]})
    known = set(cat_ids)
    unknown = {r["image_id"] for r in results} - images.keys()
    if unknown:
        raise ValueError(f"results for image ids not in gt['images'] (e.g. {sorted(unknown)[:3]}): use gt's ids")
    gts, dts = defaultdict(list), defaultdict(list)                       # (image id, category id) -> list, in order
    for a in gt["annotations"]:
        if a["image_id"] in images and a["category_id"] in known:
            gts[a["image_id"], a["category_id"]].append(a)
    for r in results:
        if r["category_id"] in known:
            dts[r["image_id"], r["category_id"]].append(r)
    evals = {}                                                            # (category, image) -> one per area range
    for key in set(gts) | set(dts):
        order = np.argsort([-r["score"] for r in dts[key]], kind="mergesort")[:COCO_MAX_DETS[-1]]
        g = gt_instances(gts[key], iou_type, images[key[0]])
        d = result_instances([dts[key][i] for i in order], iou_type, images[key[0]])
        if not len(g["area"]) or not len(d["area"]):
            iou = np.zeros((len(d["area"]), len(g["area"])))
        elif iou_type == "bbox":
            iou = box_iou_xywh(d["boxes"], g["boxes"], g["crowd"])
        else:
            iou = mask_iou(d["masks"], g["masks"], g["crowd"])
        evals[key[1], key[0]] = [match_image(iou, g, d, area) for area in COCO_AREA_RANGES]
    return summarize(*accumulate(evals, cat_ids, sorted(images)))


def accumulate(evals: dict, cat_ids: list, image_ids: list):
    """Precision (T, R, K, A, M) and recall (T, K, A, M), -1 where a category has no non-ignored GT."""
    T, R, K, A, M = (len(COCO_IOU_THRESHOLDS), len(COCO_RECALL_THRESHOLDS), len(cat_ids), len(COCO_AREA_RANGES),
                     len(COCO_MAX_DETS))
    precision, recall = -np.ones((T, R, K, A, M)), -np.ones((T, K, A, M))
    for k, cat in enumerate(cat_ids):
        per_image = [evals[cat, img] for img in image_ids if (cat, img) in evals]   # image id order
        for a in range(A):
            recs = [e[a] for e in per_image]
            num_gt = sum(r["num_gt"] for r in recs)
            if num_gt == 0:
                continue
            for m, max_det in enumerate(COCO_MAX_DETS):
                scores = np.concatenate([r["scores"][:max_det] for r in recs])
                order = np.argsort(-scores, kind="mergesort")            # stable: ties keep image, then rank order
                matched = np.concatenate([r["matched"][:, :max_det] for r in recs], axis=1)[:, order]   # (T, D)
                ignored = np.concatenate([r["ignored"][:, :max_det] for r in recs], axis=1)[:, order]   # (T, D)
                precision[:, :, k, a, m], recall[:, k, a, m] = precision_recall(matched, ignored, num_gt)
    return precision, recall


def summarize(precision: np.ndarray, recall: np.ndarray) -> np.ndarray:
    """The 12 numbers: means over the defined (> -1) entries (cocoeval.py `summarize`)."""
    def mean(x):
        return float(np.mean(x[x > -1])) if (x > -1).any() else -1.0

    all_, small, medium, large = range(4)
    t50, t75 = 0, 5                                                       # indices of IoU .50 and .75
    m100 = len(COCO_MAX_DETS) - 1
    return np.array([
        mean(precision[:, :, :, all_, m100]), mean(precision[t50, :, :, all_, m100]),
        mean(precision[t75, :, :, all_, m100]), mean(precision[:, :, :, small, m100]),
        mean(precision[:, :, :, medium, m100]), mean(precision[:, :, :, large, m100]),
        mean(recall[:, :, all_, 0]), mean(recall[:, :, all_, 1]), mean(recall[:, :, all_, m100]),
        mean(recall[:, :, small, m100]), mean(recall[:, :, medium, m100]), mean(recall[:, :, large, m100])])


# -- 5.2 Mean IoU (mmseg semantics) --
def iou_areas(preds, labels, num_classes: int, *, ignore_index: int = 255, reduce_zero_label: bool = False):
    """Per-class (intersection, predicted, label) pixel areas summed over (H, W) integer maps: (3, K) float64.

    mmseg `intersect_and_union`: label pixels equal to ignore_index are dropped (after reduce_zero_label maps
    0 -> 255 and k -> k - 1); predictions outside 0..K-1 count in no class. Areas of several shards (DDP ranks)
    add up, so `iou_metrics(sum of areas)` is the metric of the whole dataset.
    """
    areas = np.zeros((3, num_classes), dtype=np.float64)                 # intersection, predicted, label
    for i, (pred, label) in enumerate(zip(preds, labels)):
        pred, label = np.asarray(pred).astype(np.int64), np.asarray(label).astype(np.int64)
        if pred.shape != label.shape:
            raise ValueError(f"image {i}: prediction {pred.shape} and label {label.shape} differ; resize the "
                             f"prediction to the label's (original) size before scoring")
        if reduce_zero_label:
            label = reduce_zero_label_map(label)
        keep = label != ignore_index
        pred, label = pred[keep], label[keep]
        if label.size and (label.min() < 0 or label.max() >= num_classes):
            raise ValueError(f"image {i}: label value {label.max() if label.max() >= num_classes else label.min()} "
                             f"outside 0..{num_classes - 1} (ignore {ignore_index}); ADE20K's raw labels 0..150 need "
                             f"reduce_zero_label=True")
        valid = (pred >= 0) & (pred < num_classes)
        areas[0] += np.bincount(label[pred == label], minlength=num_classes)
        areas[1] += np.bincount(pred[valid], minlength=num_classes)
        areas[2] += np.bincount(label, minlength=num_classes)
    return areas


def iou_metrics(areas: np.ndarray) -> dict:
    """mmseg `total_area_to_metrics`: IoU = I / (P + L - I), Acc = I / L per class; aAcc, mIoU and mAcc.

    A class absent from both prediction and label has IoU NaN and is left out of mIoU (a class predicted but absent
    from the labels counts with IoU 0); Acc is NaN for classes absent from the labels."""
    inter, pred_area, label_area = areas
    with np.errstate(divide="ignore", invalid="ignore"):
        iou, acc = inter / (pred_area + label_area - inter), inter / label_area
        a_acc = inter.sum() / label_area.sum()
    with warnings.catch_warnings():                                       # nanmean of all-NaN warns, returns NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        return {"aAcc": float(a_acc), "mIoU": float(np.nanmean(iou)), "mAcc": float(np.nanmean(acc)),
                "IoU": iou, "Acc": acc}


def mean_iou(preds, labels, num_classes: int, *, ignore_index: int = 255, reduce_zero_label: bool = False) -> dict:
    """aAcc, mIoU, mAcc and per-class IoU and Acc (K,) over a whole dataset of (H, W) integer maps (mmseg)."""
    return iou_metrics(iou_areas(preds, labels, num_classes, ignore_index=ignore_index,
                                 reduce_zero_label=reduce_zero_label))


# -- 5.3 Conversions to COCO form --
def xyxy_to_xywh(boxes) -> list:
    """(n, 4) corners -> COCO's [x, y, w, h] lists."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)            # (n, 4)
    return np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1).tolist()   # (n, 4) xywh


def predictions_to_coco(predictions: list, image_ids: list, categories: list) -> list:
    """Per-image predictions -> COCO result dicts for `coco_evaluate` (or a results json).

    predictions[i]: {"boxes" (n, 4) xyxy in original-image pixels, "scores" (n,), "labels" (n,) in 1..K, optional
    "masks" (n, H, W) bool, or probabilities binarised at > 0.5}, for image image_ids[i]. categories: in label
    order, categories[k - 1]["id"] is label k's category id (CocoDataset.categories).
    """
    out = []
    for pred, image_id in zip(predictions, image_ids):
        labels = np.asarray(pred["labels"]).reshape(-1)
        boxes, scores = xyxy_to_xywh(pred["boxes"]), np.asarray(pred["scores"], dtype=np.float64).reshape(-1)
        masks = np.asarray(pred["masks"]) if "masks" in pred else None
        for j, label in enumerate(labels):
            res = {"image_id": image_id, "category_id": categories[int(label) - 1]["id"], "bbox": boxes[j],
                   "score": float(scores[j])}
            if masks is not None:
                res["segmentation"] = rle_encode(masks[j] if masks.dtype == bool else masks[j] > 0.5)
            out.append(res)
    return out


def targets_to_coco_gt(targets: list, image_ids: list, categories: list) -> dict:
    """Dataset targets at original resolution -> a COCO gt dict for `coco_evaluate` (e.g. the built-in shapes).

    targets[i]: {"labels" (n,) 1..K, "boxes" (n, 4) xyxy, "masks" (n, H, W) bool, optional "iscrowd", optional
    "area"} of image image_ids[i]. area defaults to the mask's pixel count, as COCO's (the segmentation area).
    """
    images, annotations = [], []
    for target, image_id in zip(targets, image_ids):
        masks = np.asarray(target["masks"], dtype=bool)                   # (n, H, W)
        images.append({"id": image_id, "height": int(masks.shape[1]), "width": int(masks.shape[2])})
        labels = np.asarray(target["labels"]).reshape(-1)
        crowd = np.asarray(target.get("iscrowd", np.zeros(len(labels)))).reshape(-1)
        area = np.asarray(target["area"]) if "area" in target else masks.reshape(len(masks), -1).sum(1)
        for j, (label, box) in enumerate(zip(labels, xyxy_to_xywh(target["boxes"]))):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "bbox": box,
                                "category_id": categories[int(label) - 1]["id"], "area": float(area[j]),
                                "iscrowd": int(crowd[j]), "segmentation": rle_encode(masks[j])})
    return {"images": images, "annotations": annotations, "categories": [dict(c) for c in categories]}


# ---- 6. Simple feature pyramid for backbones without a pyramid (ViTDet) ----------------------------------------------

class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of a (B, c, H, W) map, separately at every pixel (ViTDet's "LN" for conv maps)."""

    def __init__(self, dim: int, *, eps: float = 1e-6):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)                                         # (B, H, W, c)
        return self.norm(x).permute(0, 3, 1, 2)                           # (B, c, H, W)


class LevelConvs(nn.Module):
    """Per-level output convs of the simple pyramid: 1x1 conv -> LN -> 3x3 conv -> LN, no bias, no activation."""

    def __init__(self, in_dim: int, *, out_dim: int, ln_eps: float):
        super().__init__()
        self.reduce = nn.Conv2d(in_dim, out_dim, kernel_size=1, bias=False)
        self.norm1 = LayerNorm2d(out_dim, eps=ln_eps)
        self.conv = nn.Conv2d(out_dim, out_dim, kernel_size=3, padding=1, bias=False)
        self.norm2 = LayerNorm2d(out_dim, eps=ln_eps)

    def forward(self, x):
        return self.norm2(self.conv(self.norm1(self.reduce(x))))         # (B, F, h, w)


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's simple feature pyramid: strides 4..32 (+ 64) from the stride-16 map alone, no top-down pathway.

    ViTDet Sec. 3 shows that a plain ViT needs no FPN: deconvolving and pooling its last map is enough. Branches:
    p4 = ConvT(C -> C/2) -> LN -> GELU -> ConvT(C/2 -> C/4); p8 = ConvT(C -> C/2); p16 = identity; p32 = max-pool 2;
    each then LevelConvs to F channels (equal widths, unlike iTPN's "seg" concatenation). with_p64 adds ViTDet's
    top block, p64 = p32 sub-sampled by a kernel-1 stride-2 max-pool, for detection.
    Input: tokens (B, N, C) with grid_hw = (Hp, Wp), row-major (token n is unit (n // Wp, n % Wp)), as a ViT or
    HiViT forward_features returns them last; or a map (B, C, Hp, Wp). Output: {"p4": (B, F, 4Hp, 4Wp),
    "p8": (B, F, 2Hp, 2Wp), "p16": (B, F, Hp, Wp), "p32": (B, F, Hp // 2, Wp // 2)[, "p64"]}. Pad images to a
    multiple of 32 (64 with p64) for exact strides.
    """

    def __init__(self, embed_dim: int, *, out_dim: int = 256, with_p64: bool = False, ln_eps: float = 1e-6):
        super().__init__()
        if embed_dim % 4:
            raise ValueError(f"embed_dim must be divisible by 4 (the stride-4 branch has C/4 channels), "
                             f"got {embed_dim}")
        c = embed_dim
        self.embed_dim, self.with_p64 = c, with_p64
        self.up4 = nn.Sequential(nn.ConvTranspose2d(c, c // 2, kernel_size=2, stride=2),   # (B, C/2, 2Hp, 2Wp)
                                 LayerNorm2d(c // 2, eps=ln_eps), nn.GELU(),
                                 nn.ConvTranspose2d(c // 2, c // 4, kernel_size=2, stride=2))   # (B, C/4, 4Hp, 4Wp)
        self.up8 = nn.ConvTranspose2d(c, c // 2, kernel_size=2, stride=2)
        self.down32 = nn.MaxPool2d(kernel_size=2, stride=2)
        widths = {"p4": c // 4, "p8": c // 2, "p16": c, "p32": c}       # ViTDet halves / quarters on the way up
        self.outputs = nn.ModuleDict({k: LevelConvs(d, out_dim=out_dim, ln_eps=ln_eps) for k, d in widths.items()})

    def to_map(self, x: torch.Tensor, grid_hw) -> torch.Tensor:
        """Tokens (B, N, C) + (Hp, Wp), or a map (B, C, Hp, Wp) -> the map, with a clear error for anything else."""
        if x.ndim == 4:
            if x.shape[1] != self.embed_dim:
                raise ValueError(f"map has {x.shape[1]} channels, the pyramid was built for {self.embed_dim}")
            return x
        if x.ndim != 3 or grid_hw is None:
            raise ValueError(f"expected tokens (B, N, C) with grid_hw=(Hp, Wp), or a map (B, C, Hp, Wp); got "
                             f"{tuple(x.shape)} with grid_hw={grid_hw}")
        b, n, c = x.shape
        hp, wp = grid_hw
        if n != hp * wp or c != self.embed_dim:
            raise ValueError(f"tokens {tuple(x.shape)} do not fit grid {hp}x{wp} with C={self.embed_dim}: need "
                             f"N = Hp * Wp = {hp * wp} (drop the CLS token first)")
        return x.transpose(1, 2).reshape(b, c, hp, wp)                     # (B, C, Hp, Wp), row-major units

    def forward(self, x: torch.Tensor, grid_hw: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
        x = self.to_map(x, grid_hw)                                        # (B, C, Hp, Wp), stride 16
        branches = {"p4": self.up4(x),                                     # (B, C/4, 4Hp, 4Wp)
                    "p8": self.up8(x),                                     # (B, C/2, 2Hp, 2Wp)
                    "p16": x,                                              # (B, C, Hp, Wp)
                    "p32": self.down32(x)}                                 # (B, C, Hp/2, Wp/2)
        maps = {k: self.outputs[k](v) for k, v in branches.items()}       # each (B, F, ., .)
        if self.with_p64:
            maps["p64"] = F.max_pool2d(maps["p32"], kernel_size=1, stride=2)   # (B, F, H/64, W/64)
        return maps


# ---- 7. UPerHead segmentation: head, loss, inference, poly schedule, picture -----------------------------------------

# Differences from UPerNet / the official ADE20K setting:
# - Norm: BatchNorm2d in every ConvNormReLU (one process); under DDP on GPUs the driver converts it to
#   SyncBatchNorm (nn.SyncBatchNorm.convert_sync_batchnorm), the papers' SyncBN. BatchNorm cannot train on one image per
#   process (the PPM's 1x1 branch has one value per channel): UPerHead raises a ValueError that names the fix,
#   and UPerConfig(norm="gn") gives GroupNorm (up to 32 groups of >= 4 channels) for any batch size.
# - Loss reduction: the sum of per-pixel cross-entropies divided by ALL label pixels, ignored ones included
#   (mmseg's CrossEntropyLoss as the BEiT / iTPN code ran it; later mmseg names it avg_non_ignore=False). PyTorch's
#   `ignore_index` mean divides by labelled pixels only; the two differ by the labelled fraction (with 50 %
#   ignored pixels ours is exactly half), i.e. only in effective learning rate. A batch with no labelled pixel
#   gives 0, not NaN.
# - Adapter for backbones without a pyramid: ViTDet's simple feature pyramid (last stride-16 map only; 2 and 1
#   deconvolutions, identity, max-pool; then 1x1 + 3x3 convs with channel LayerNorm to F channels), not BEiT's
#   fpn1..fpn4 (four intermediate layers, C channels per level). It needs one map, so a plain ViT and HiViT feed
#   it identically; HiViT's own stride-4/8 stage outputs are not used. "p64" is ViTDet's max-pool (kernel 1,
#   stride 2); iTPN's detection pyramid avg-pools instead.
# - Inference pads every input (whole image or window) bottom/right with zeros to a multiple of size_divisor
#   (32, the coarsest stride) and crops the logits back; mmseg's whole mode feeds the unpadded image.
# - Initialisation as mmcv/mmseg: convs before a norm Kaiming-normal (fan_out, ReLU) without bias, classifiers
#   N(0, 0.01) with zero bias; the simple feature pyramid keeps PyTorch's default init (as detectron2).
# - Schedule: mmcv's poly with linear warm-up, whose warm-up factor multiplies the poly value (warmup_ratio 1e-6,
#   power 1.0 as iTPN/BEiT; PSPNet used power 0.9). AdamW with layer decay and the data pipeline live elsewhere.

# -- 7.1 Config and presets --
SEG_LEVELS = ("p4", "p8", "p16", "p32")      # the four levels UPerHead reads, fine to coarse (strides 4, 8, 16, 32)
GN_GROUPS = 32                               # GroupNorm groups (Wu & He's default), fewer for narrow layers
GN_MIN_GROUP = 4                             # channels per group at least: a 1x1 map normalised over 1 channel is 0


@dataclass
class UPerConfig:
    channels: int = 768                      # ch, UPerHead width; iTPN-B / BEiT-B ADE20K 768 (mmseg's ResNet/Swin 512)
    pool_scales: tuple[int, ...] = (1, 2, 3, 6)   # PPM bins per side (PSPNet Sec. 3.2)
    dropout: float = 0.1                     # Dropout2d before both classifiers
    norm: str = "bn"                         # "bn": BatchNorm2d (SyncBN under DDP, the papers') | "gn": GroupNorm
    aux_channels: int = 256                  # FCN auxiliary head width (3x3 conv, on stride 16)
    aux_weight: float = 0.4                  # auxiliary cross-entropy weight (PSPNet Sec. 4); 0 = no auxiliary head
    ignore_index: int = 255                  # label value never scored
    fpn_dim: int = 256                       # F, simple-feature-pyramid width for HiViT / ViT backbones (ViTDet 256)
    crop_size: int = 512                     # sliding-window inference: window side, px (BEiT / iTPN ADE20K)
    crop_stride: int = 341                   # sliding-window inference: step, px (about 2/3 of the window)
    size_divisor: int = 32                   # inference pads inputs to a multiple of this (stride of "p32")

    def __post_init__(self):
        if self.norm not in ("bn", "gn"):
            raise ValueError(f"UPerConfig.norm must be 'bn' or 'gn', got {self.norm!r}")
        if not 0 < self.crop_stride <= self.crop_size:
            raise ValueError(f"need 0 < crop_stride <= crop_size (windows must overlap or touch), got "
                             f"crop_stride={self.crop_stride}, crop_size={self.crop_size}")


UPER_PRESETS: dict[str, UPerConfig] = {
    # official iTPN seg config `upernet_itpn_base_*_ade20k` (decode channels 768, in_channels [384, 512, 768, 768])
    # on mmseg's `upernet_beit` base: PPM (1, 2, 3, 6), dropout 0.1, FCN aux 256 channels x 0.4, slide 512 / 341.
    "paper": UPerConfig(),
    # CPU preset: 64-px images, seconds per step.
    "tiny": UPerConfig(channels=32, aux_channels=16, fpn_dim=32, crop_size=64, crop_stride=43),
}


# -- 7.2 UPerHead and FCN auxiliary head (UPerNet Sec. 3, Fig. 3; PSPNet Sec. 3.2) --
def resize_bilinear(x: torch.Tensor, size) -> torch.Tensor:
    """Bilinear resize with align_corners=False, the convention of every resize in UPerNet / mmseg."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)   # (B, c, *size)


def make_norm(kind: str, channels: int) -> nn.Module:
    """BatchNorm2d, or GroupNorm with up to 32 groups of at least 4 channels (so a 1x1 map keeps information)."""
    if kind == "bn":
        return nn.BatchNorm2d(channels)
    groups = math.gcd(GN_GROUPS, channels)
    while groups > 1 and channels // groups < GN_MIN_GROUP:
        groups //= 2
    return nn.GroupNorm(groups, channels)


class ConvNormReLU(nn.Module):
    """Conv (no bias: the norm's shift replaces it) -> norm -> ReLU, mmcv's ConvModule as UPerNet uses it."""

    def __init__(self, in_dim: int, out_dim: int, *, kernel_size: int, norm: str):
        super().__init__()
        self.conv = nn.Conv2d(in_dim, out_dim, kernel_size=kernel_size, padding=kernel_size // 2, bias=False)
        self.norm = make_norm(norm, out_dim)
        self.act = nn.ReLU()
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")   # mmcv ConvModule init

    def forward(self, x):
        return self.act(self.norm(self.conv(x)))


def make_classifier(in_dim: int, num_classes: int) -> nn.Conv2d:
    """1x1 conv to K logits, initialised N(0, 0.01) with zero bias (mmseg BaseDecodeHead)."""
    conv = nn.Conv2d(in_dim, num_classes, kernel_size=1)
    nn.init.normal_(conv.weight, mean=0.0, std=0.01)
    nn.init.zeros_(conv.bias)
    return conv


class PyramidPoolingModule(nn.Module):
    """PSPNet's PPM (Sec. 3.2, Fig. 3) plus UPerHead's 3x3 bottleneck: global context for the coarsest level.

    For each scale s: average-pool x into s x s bins -> ConvNormReLU 1x1 (-> ch) -> bilinear back to x's size;
    then concatenate [x, branch_1, ..., branch_S] and fuse with a ConvNormReLU 3x3 (-> ch).
    """

    def __init__(self, in_dim: int, *, out_dim: int, scales: tuple[int, ...], norm: str):
        super().__init__()
        self.scales = tuple(scales)
        self.branches = nn.ModuleList(ConvNormReLU(in_dim, out_dim, kernel_size=1, norm=norm) for _ in self.scales)
        self.bottleneck = ConvNormReLU(in_dim + len(self.scales) * out_dim, out_dim, kernel_size=3, norm=norm)

    def forward(self, x):
        size = x.shape[-2:]
        pooled = [resize_bilinear(branch(F.adaptive_avg_pool2d(x, s)), size)   # (B, ch, s, s) -> (B, ch, h, w)
                  for s, branch in zip(self.scales, self.branches)]
        return self.bottleneck(torch.cat([x, *pooled], dim=1))           # (B, c3 + S*ch, h, w) -> (B, ch, h, w)


class FCNHead(nn.Module):
    """Auxiliary head (PSPNet Sec. 4 deep supervision, mmseg FCNHead with one conv): ConvNormReLU 3x3 -> dropout -> 1x1.

    Trained on the stride-16 level with weight 0.4 and dropped at inference; it pushes the backbone's middle
    features to be discriminative on their own.
    """

    def __init__(self, in_dim: int, *, num_classes: int, cfg: UPerConfig):
        super().__init__()
        self.conv = ConvNormReLU(in_dim, cfg.aux_channels, kernel_size=3, norm=cfg.norm)
        self.dropout = nn.Dropout2d(cfg.dropout)
        self.classifier = make_classifier(cfg.aux_channels, num_classes)

    def forward(self, x):
        return self.classifier(self.dropout(self.conv(x)))               # (B, K, h, w)


class UPerHead(nn.Module):
    """UPerNet's decoder (Sec. 3, Fig. 3: "PPM head" + FPN + fuse) on four levels of any widths, + the FCN aux head.

    in_channels: widths of "p4", "p8", "p16", "p32", possibly unequal: iTPN's "seg" pyramid gives F + C/4,
    F + C/2, F + C, F + C (iTPN-B: 384, 512, 768, 768), the simple feature pyramid F four times.
    forward(maps) with maps = {"p4": (B, c0, H/4, W/4), ..., "p32": (B, c3, H/32, W/32)} (extra keys such as "p64"
    are ignored) returns {"logits": (B, K, H/4, W/4)} and, in training mode with an auxiliary head,
    "aux_logits": (B, K, H/16, W/16). Logits are raw (no softmax), at the stride of their level; seg_loss and the
    predict_* functions resize them.
    """

    def __init__(self, in_channels: list[int], *, num_classes: int, cfg: UPerConfig):
        super().__init__()
        if len(in_channels) != len(SEG_LEVELS) or num_classes < 1:
            raise ValueError(f"UPerHead needs 4 level widths (for {', '.join(SEG_LEVELS)}) and num_classes >= 1, "
                             f"got in_channels={list(in_channels)}, num_classes={num_classes}")
        ch = cfg.channels
        self.in_channels, self.num_classes = list(in_channels), num_classes
        self.ppm = PyramidPoolingModule(in_channels[3], out_dim=ch, scales=cfg.pool_scales, norm=cfg.norm)
        self.laterals = nn.ModuleList(ConvNormReLU(c, ch, kernel_size=1, norm=cfg.norm) for c in in_channels[:3])
        self.fpn_convs = nn.ModuleList(ConvNormReLU(ch, ch, kernel_size=3, norm=cfg.norm) for _ in range(3))
        self.fuse = ConvNormReLU(len(SEG_LEVELS) * ch, ch, kernel_size=3, norm=cfg.norm)
        self.dropout = nn.Dropout2d(cfg.dropout)
        self.classifier = make_classifier(ch, num_classes)
        self.aux_head = FCNHead(in_channels[2], num_classes=num_classes, cfg=cfg) if cfg.aux_weight > 0 else None

    def check_levels(self, maps: dict) -> list[torch.Tensor]:
        missing = [k for k in SEG_LEVELS if k not in maps]
        if missing:
            raise ValueError(f"UPerHead needs levels {SEG_LEVELS}, missing {missing} (got keys {list(maps)})")
        levels = [maps[k] for k in SEG_LEVELS]
        for k, x, c in zip(SEG_LEVELS, levels, self.in_channels):
            if x.ndim != 4 or x.shape[1] != c:
                raise ValueError(f"level {k} is {tuple(x.shape)}; this UPerHead was built for (B, {c}, h, w) there "
                                 f"(in_channels={self.in_channels})")
        if self.training and levels[0].shape[0] == 1 and isinstance(self.ppm.branches[0].norm, nn.BatchNorm2d):
            raise ValueError("UPerHead with BatchNorm cannot train on 1 image per process: the PPM's 1x1 pooling "
                             "branch then has a single value per channel. Use a batch of >= 2 per process, or "
                             "UPerConfig(norm='gn') (GroupNorm works for any batch).")
        return levels

    def forward(self, maps: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x4, x8, x16, x32 = self.check_levels(maps)
        lat = [conv(x) for conv, x in zip(self.laterals, (x4, x8, x16))]   # each (B, ch, H/s, W/s), s = 4, 8, 16
        lat.append(self.ppm(x32))                                          # (B, ch, H/32, W/32): PPM replaces lateral
        for i in (3, 2, 1):                                                # top-down, coarse to fine (FPN)
            lat[i - 1] = lat[i - 1] + resize_bilinear(lat[i], lat[i - 1].shape[-2:])   # bilinear, not nearest
        outs = [conv(x) for conv, x in zip(self.fpn_convs, lat[:3])]       # 3x3 smoothing; the PPM level has none
        outs.append(lat[3])
        outs = [resize_bilinear(x, outs[0].shape[-2:]) for x in outs]      # each (B, ch, H/4, W/4)
        fused = self.fuse(torch.cat(outs, dim=1))                          # (B, 4ch, H/4, W/4) -> (B, ch, H/4, W/4)
        out = {"logits": self.classifier(self.dropout(fused))}            # (B, K, H/4, W/4)
        if self.training and self.aux_head is not None:
            out["aux_logits"] = self.aux_head(x16)                         # (B, K, H/16, W/16)
        return out


# -- 7.3 Segmentation loss (PSPNet Sec. 4: main + 0.4 auxiliary) --
def pixel_ce(logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int) -> torch.Tensor:
    """Cross-entropy at label resolution, summed over labelled pixels and divided by ALL pixels (mmseg default)."""
    logits = resize_bilinear(logits, labels.shape[-2:])                   # (B, K, H, W), align_corners False
    return F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction="sum") / labels.numel()


def seg_loss(outputs: dict[str, torch.Tensor], labels: torch.Tensor, *, aux_weight: float = 0.4,
             ignore_index: int = 255) -> dict[str, torch.Tensor]:
    """loss = CE(logits) + aux_weight * CE(aux_logits) (the latter only when UPerHead returned it, i.e. in training).

    labels: (B, H, W) integer class map at image resolution, ignore_index where unlabelled; logits are upsampled
    bilinearly to it. Returns {"loss", "loss_seg"[, "loss_aux"]}.
    """
    logits = outputs["logits"]
    num_classes = logits.shape[1]
    if labels.ndim != 3 or labels.shape[0] != logits.shape[0] or labels.dtype not in (torch.int64, torch.uint8):
        raise ValueError(f"labels must be a (B={logits.shape[0]}, H, W) int64 (or uint8) class map, got "
                         f"{tuple(labels.shape)} {labels.dtype}")
    labels = labels.long()
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))
    if bool(bad.any()):
        raise ValueError(f"labels hold values outside 0..{num_classes - 1} other than {ignore_index} (e.g. "
                         f"{int(labels[bad][0])}): check num_classes and reduce_zero_label (ADE20K: 0 -> 255, "
                         f"then 1..150 -> 0..149)")
    loss_seg = pixel_ce(logits, labels, ignore_index=ignore_index)
    out = {"loss": loss_seg, "loss_seg": loss_seg}
    if "aux_logits" in outputs:
        out["loss_aux"] = pixel_ce(outputs["aux_logits"], labels, ignore_index=ignore_index)
        out["loss"] = loss_seg + aux_weight * out["loss_aux"]
    return out


# -- 7.4 Inference: whole image and sliding window (BEiT / iTPN ADE20K test setting) --
def slide_windows(height: int, width: int, *, crop_size: int, crop_stride: int) -> list[tuple[int, int, int, int]]:
    """Windows (y1, y2, x1, x2) of side crop_size every crop_stride px; the last one per side ends at the border.

    Per side: n = ceil((size - crop) / stride) + 1 windows (1 if size <= crop, then the window is the whole side);
    a window that would cross the border is shifted back so it ends on it, so every window is crop_size wide
    (or the whole side) and every pixel is covered (mmseg `slide_inference`).
    """
    if not 0 < crop_stride <= crop_size:
        raise ValueError(f"need 0 < crop_stride <= crop_size, got crop_stride={crop_stride}, crop_size={crop_size}")

    def starts(size: int) -> list[int]:
        n = max(size - crop_size + crop_stride - 1, 0) // crop_stride + 1
        return [min(i * crop_stride, max(size - crop_size, 0)) for i in range(n)]   # last one snapped to the border

    return [(y, min(y + crop_size, height), x, min(x + crop_size, width))
            for y in starts(height) for x in starts(width)]


def padded_logits(logits_fn, images: torch.Tensor, *, size_divisor: int) -> torch.Tensor:
    """Pad bottom/right with 0 to a multiple of size_divisor, run logits_fn, resize to the padded size, crop back.

    Zero padding after normalisation is the mean colour (the same pad value as training).
    """
    h, w = images.shape[-2:]
    padded = F.pad(images, (0, -w % size_divisor, 0, -h % size_divisor))   # (B, 3, H', W'), multiples of divisor
    logits = logits_fn(padded)                                             # (B, K, h, w) at the model's stride
    if logits.ndim != 4 or logits.shape[0] != images.shape[0]:
        raise ValueError(f"logits_fn must return (B={images.shape[0]}, K, h, w) logits, got {tuple(logits.shape)}")
    return resize_bilinear(logits, padded.shape[-2:])[:, :, :h, :w]       # (B, K, H, W)


@torch.no_grad()
def predict_whole(logits_fn, images: torch.Tensor, *, out_size=None, size_divisor: int = 32) -> torch.Tensor:
    """One pass over the whole (normalised) batch (B, 3, H, W); logits (B, K, *out_size), default (H, W).

    logits_fn(images) -> (B, K, h, w) is any model, e.g. `lambda x: head(pyramid(x))["logits"]` in eval mode.
    Resize out_size to the original image size and take argmax over K for the prediction (metrics are computed at
    the original label resolution).
    """
    logits = padded_logits(logits_fn, images, size_divisor=size_divisor)  # (B, K, H, W)
    return resize_bilinear(logits, out_size or images.shape[-2:])         # (B, K, *out_size)


@torch.no_grad()
def predict_slide(logits_fn, images: torch.Tensor, *, crop_size: int = 512, crop_stride: int = 341,
                  out_size=None, size_divisor: int = 32) -> torch.Tensor:
    """Sliding-window inference: average of the window logits covering each pixel; (B, K, *out_size).

    Each window's logits are resized to the window, summed into the image canvas and divided by the number of
    windows covering each pixel (BEiT / iTPN ADE20K: 512 x 512 windows, stride 341, on images resized to a short
    side of 512). A window covering the whole image gives exactly predict_whole.
    """
    b, _, h, w = images.shape
    total = None
    count = images.new_zeros(1, 1, h, w)                                    # windows covering each pixel
    for y1, y2, x1, x2 in slide_windows(h, w, crop_size=crop_size, crop_stride=crop_stride):
        window = images[:, :, y1:y2, x1:x2]                                 # (B, 3, y2-y1, x2-x1)
        logits = padded_logits(logits_fn, window, size_divisor=size_divisor)   # (B, K, y2-y1, x2-x1)
        if total is None:
            total = logits.new_zeros(b, logits.shape[1], h, w)              # (B, K, H, W)
        total[:, :, y1:y2, x1:x2] += logits
        count[:, :, y1:y2, x1:x2] += 1
    return resize_bilinear(total / count, out_size or (h, w))              # (B, K, *out_size)


# -- 7.5 Poly learning rate with linear warm-up (PSPNet Sec. 5.1; BEiT / iTPN ADE20K) --
def poly_lr(step: int, *, lr: float, warmup_steps: int, total_steps: int, power: float = 1.0, min_lr: float = 0.0,
            warmup_ratio: float = 1e-6) -> float:
    """Learning rate at iteration `step` (0-based): mmcv's "poly" policy with linear warm-up.

    poly(t) = (lr - min_lr) * (1 - t / total_steps) ** power + min_lr; during warm-up (t < warmup_steps) it is
    multiplied by a factor rising linearly from warmup_ratio at t = 0 to 1 at t = warmup_steps (mmcv multiplies the
    poly value, not the base lr). Paper setting (iTPN / BEiT ADE20K, 16 images per step): total_steps 160000,
    warmup_steps 1500, power 1.0, min_lr 0, warmup_ratio 1e-6. Steps past total_steps stay at min_lr.
    """
    if total_steps <= 0 or not 0 <= warmup_steps < total_steps:
        raise ValueError(f"need 0 <= warmup_steps < total_steps, got warmup_steps={warmup_steps}, "
                         f"total_steps={total_steps}")
    t = min(max(step, 0), total_steps)
    regular = (lr - min_lr) * (1 - t / total_steps) ** power + min_lr
    if t < warmup_steps:
        return regular * (1 - (1 - t / warmup_steps) * (1 - warmup_ratio))
    return regular


# -- 7.6 Picture: image | label overlay | prediction overlay --
def seg_palette(num_classes: int) -> torch.Tensor:
    """Fixed colours (K, 3) uint8: class c gets PASCAL VOC's bit-interleaved colour of c + 1 (black is left to 255).

    VOC's rule spreads the bits of an index over the high bits of R, G, B (bit 3j + ch of the index -> bit 7 - j of
    channel ch), so neighbouring indices get very different colours; index 0 (black) is skipped.
    """
    index = torch.arange(1, num_classes + 1)
    rgb = torch.zeros(num_classes, 3, dtype=torch.int64)
    for j in range(8):
        for ch in range(3):
            rgb[:, ch] |= ((index >> (3 * j + ch)) & 1) << (7 - j)
    return rgb.to(torch.uint8)


def seg_picture(image: torch.Tensor, label: torch.Tensor, pred: torch.Tensor, num_classes: int):
    """PIL image (3W x H): image | label over image | prediction over image (alpha 0.5; 255 and any value outside
    0..K-1 drawn black). image: (3, H, W) in [0, 1] (de-normalised); label, pred: (H, W) integer maps."""
    if image.ndim != 3 or image.shape[0] != 3 or label.shape != image.shape[1:] or pred.shape != image.shape[1:]:
        raise ValueError(f"need image (3, H, W) and label, pred (H, W) of the same size, got {tuple(image.shape)}, "
                         f"{tuple(label.shape)}, {tuple(pred.shape)}")
    img = (image.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)   # (3, H, W)
    colors = [tuple(c) for c in seg_palette(num_classes).tolist()]

    def overlay(seg: torch.Tensor) -> torch.Tensor:
        seg = seg.detach().cpu().long()
        masks = seg[None] == torch.arange(num_classes)[:, None, None]      # (K, H, W) one mask per class
        out = draw_segmentation_masks(img, masks, alpha=0.5, colors=colors)   # (3, H, W)
        out[:, (seg < 0) | (seg >= num_classes)] = 0                       # ignore label: black
        return out

    return to_pil_image(torch.cat([img, overlay(label), overlay(pred)], dim=2))   # (3, H, 3W)


# ---- 8. Mask R-CNN-lite ----------------------------------------------------------------------------------------------

# Differences from Mask R-CNN / the official mmdet config:
# - Box head: the paper's two shared FC layers (Mask R-CNN Fig. 4 right, mmdet Shared2FCBBoxHead, torchvision
#   TwoMLPHead) with smooth-L1 / L1 on deltas. The iTPN config uses a 4conv1fc head with SyncBN and a GIoU loss
#   (x10) on decoded boxes: dropped, because batch norm over 2 images per device and a decoded-box loss are
#   choices of the detector, not of the pre-trained pyramid under study.
# - No FPN neck (the pyramid is the neck, as in the official iTPN detector); no P6 is synthesised here: the caller
#   passes the levels and their strides. No resize / flip / AutoAugment / normalisation (the driver's data
#   pipeline), no ONNX, TorchScript or keypoint paths.
# - Anchors are rounded to whole pixels (torchvision; mmdet keeps e.g. 22.63 instead of 23 for ratio 0.5 at 32).
# - The low-quality rescue gives an anchor back its own best gt (torchvision); mmdet's gt_max_assign_all gives it
#   the gt whose maximum it attains. They differ only for an anchor that is one gt's best but overlaps another
#   more. The rescue is skipped for a gt whose best IoU is 0 or below `rpn_low_quality_min_iou` (mmdet
#   min_pos_iou 0.3); torchvision has no such guard (a gt overlapping nothing turns every anchor positive).
# - RoI matching has no low-quality rescue (torchvision; mmdet's rcnn assigner enables it with min_pos_iou 0.5,
#   which can only re-route a >= 0.5 proposal to another gt).
# - Decoding clamps dw, dh from above only (torchvision); mmdet clamps |dw|, |dh| <= log(1000/16).
# - Proposals need w, h >= 1e-3 px (torchvision); mmdet min_bbox_size 0 keeps w, h > 0.
# - Masks are pasted with torchvision's integer paste (bilinear resize of the 1-px padded 28x28 map into the
#   integer box, +1); mmdet/detectron2 paste with grid_sample. The two differ by under a pixel.
# - Predictors have no background outputs (4K deltas, K mask maps), as mmdet; torchvision carries unused
#   background rows. Inits: mmdet's (fc xavier, cls N(0, 0.01), deltas N(0, 0.001), convs kaiming fan_out).
# - Against torchvision: strides are explicit (torchvision infers image_size // feature_size for anchors and
#   rounds feature/image ratios for RoIAlign, wrong for avg-pooled odd levels); preset "torchvision" otherwise
#   reproduces torchvision's `maskrcnn_resnet50_fpn` heads, and the tests check proposals, detections and losses
#   against them with shared weights.

# -- 8.1 Config and presets --
# Settings shared by mmdet's mask_rcnn_r50_fpn and torchvision's maskrcnn_resnet50_fpn (and the papers).
RPN_FG_IOU, RPN_BG_IOU = 0.7, 0.3       # Faster R-CNN Sec. 3.1.2: positive >= 0.7, negative < 0.3, between ignored
RPN_POSITIVE_FRACTION = 0.5             # Faster R-CNN Sec. 3.1.3: up to 1:1 positives : negatives
RPN_NMS_IOU = 0.7                       # Faster R-CNN Sec. 3.3, applied per level
RPN_MIN_SIZE = 1e-3                     # px, proposals thinner than this are dropped
RPN_BOX_WEIGHTS = (1.0, 1.0, 1.0, 1.0)  # mmdet target_stds 1: raw Eq. 2 deltas
ROI_IOU = 0.5                           # Mask R-CNN Sec. 3.1: RoI positive iff IoU >= 0.5, no ignore band
ROI_POSITIVE_FRACTION = 0.25            # Mask R-CNN Sec. 3.1: positives : negatives = 1 : 3
ROI_BOX_WEIGHTS = (10.0, 10.0, 5.0, 5.0)    # = 1 / mmdet target_stds (0.1, 0.1, 0.2, 0.2)
BBOX_XFORM_CLIP = math.log(1000.0 / 16)     # cap on decoded dw, dh: a box grows at most 62.5x its reference
NUM_POOLED_LEVELS = 4                   # RoIAlign reads the four finest levels (p4..p32), never p64
CANONICAL_SCALE, CANONICAL_LEVEL = 224, 4   # FPN Eq. 1: a 224x224 RoI pools from level k0 = 4 (stride 16)
LEVEL_EPS = 1e-6                        # torchvision's LevelMapper eps inside the floor of FPN Eq. 1
BOX_POOL, MASK_POOL = 7, 14             # Mask R-CNN Fig. 4: 7x7 box features, 14x14 mask features
MASK_SIZE = 2 * MASK_POOL               # M = 28: the mask head's 2x deconvolution
MASK_NUM_CONVS = 4                      # Mask R-CNN Fig. 4 (right): four 3x3 convs before the deconvolution
SCORE_THRESH, DET_NMS_IOU, DETS_PER_IMAGE = 0.05, 0.5, 100  # test_cfg.rcnn: per-class NMS, 100 boxes per image
DET_MIN_SIZE = 1e-2                     # px, detections thinner than this are dropped


@dataclass
class MaskRCNNConfig:
    """Head settings that differ between the papers' mmdet config ("paper"), torchvision and the CPU preset."""
    anchor_scale: int = 8                   # anchor side = scale x stride: 32..512 px on strides 4..64 (mmdet scales)
    aspect_ratios: tuple = (0.5, 1.0, 2.0)  # anchor h / w, A = 3 per location (Faster R-CNN Sec. 3.1.1)
    rpn_pre_nms_top_n: tuple = (2000, 1000)     # (train, test) proposals kept per level before NMS (nms_pre)
    rpn_post_nms_top_n: tuple = (1000, 1000)    # (train, test) proposals kept per image after NMS (max_per_img)
    rpn_batch_per_image: int = 256          # anchors sampled per image for the RPN loss (Faster R-CNN Sec. 3.1.3)
    rpn_low_quality_min_iou: float = 0.3    # rescue a gt's best anchors only if that IoU >= this and > 0 (min_pos_iou)
    roi_batch_per_image: int = 512          # RoIs sampled per image (Mask R-CNN Sec. 3.1)
    roi_sampling_ratio: int = 0             # RoIAlign samples per bin side; 0 = adaptive ceil(roi / S) (mmdet)
    roi_aligned: bool = True                # RoIAlign half-pixel offset (mmcv default True; torchvision False)
    box_loss_beta: float = 0.0              # smooth-L1 beta of both box losses; 0 = L1 (mmdet), torchvision 1/9
    binarize_mask_targets: bool = True      # mask targets >= 0.5 (mmdet, detectron2); torchvision keeps them soft
    box_fc_dim: int = 1024                  # width of the two FC layers of the box head (Fig. 4)
    mask_dim: int = 256                     # channels of the mask head's convs and deconvolution (Fig. 4)


MASKRCNN_PRESETS: dict[str, MaskRCNNConfig] = {
    # iTPN / HiViT COCO detector heads (mmdet 2.x mask_rcnn_r50_fpn train_cfg / test_cfg).
    "paper": MaskRCNNConfig(),
    # torchvision maskrcnn_resnet50_fpn: RPN keeps 2000 proposals in training, RoIAlign with 2 samples per bin side
    # and no half-pixel offset, smooth-L1 beta 1/9, soft mask targets; any overlap > 0 may rescue (torchvision has
    # no guard at all, which differs only for a gt that overlaps no anchor).
    "torchvision": MaskRCNNConfig(rpn_post_nms_top_n=(2000, 1000), rpn_low_quality_min_iou=0.0, roi_sampling_ratio=2,
                                  roi_aligned=False, box_loss_beta=1 / 9, binarize_mask_targets=False),
    # CPU preset: same rules, fewer proposals and samples, narrow heads.
    "tiny": MaskRCNNConfig(rpn_pre_nms_top_n=(300, 150), rpn_post_nms_top_n=(150, 100), rpn_batch_per_image=64,
                           roi_batch_per_image=64, box_fc_dim=64, mask_dim=16),
}


# -- 8.2 Anchors --
def cell_anchors(size: float, *, aspect_ratios: tuple) -> torch.Tensor:
    """The A anchors of one location, centred on (0, 0): (A, 4). Faster R-CNN Sec. 3.1.1, ratio = h / w.

    Area stays size^2: w = size / sqrt(r), h = size * sqrt(r). Corners are rounded to whole pixels (torchvision's
    convention; mmdet keeps fractions), so e.g. size 32, r = 0.5 gives [-23, -11, 23, 11].
    """
    h_ratios = torch.as_tensor(aspect_ratios, dtype=torch.float32).sqrt()      # (A,)
    w_ratios = 1 / h_ratios
    ws, hs = w_ratios * size, h_ratios * size
    return (torch.stack([-ws, -hs, ws, hs], dim=1) / 2).round()                # (A, 4)


def grid_anchors(feature_size: tuple, *, stride: int, cell: torch.Tensor) -> torch.Tensor:
    """All anchors of one level: (H_l * W_l * A, 4), row-major over (y, x), the A ratios innermost.

    Location (i, j) is centred on (j * stride, i * stride): offset 0, the top-left corner of the cell (torchvision,
    detectron2 and mmdet 2.x all use it). The stride is given, never inferred from image / feature size (an
    avg-pooled odd level would give e.g. 61 instead of 64). This order must equal the head's flattening (3.5).
    """
    height, width = feature_size
    ys = torch.arange(height, device=cell.device, dtype=cell.dtype) * stride     # (H_l,)
    xs = torch.arange(width, device=cell.device, dtype=cell.dtype) * stride      # (W_l,)
    shift_y, shift_x = torch.meshgrid(ys, xs, indexing="ij")                     # (H_l, W_l) each
    shifts = torch.stack([shift_x, shift_y, shift_x, shift_y], dim=-1).reshape(-1, 1, 4)   # (H_l * W_l, 1, 4)
    return (shifts + cell.reshape(1, -1, 4)).reshape(-1, 4)                      # (H_l * W_l * A, 4)


# -- 8.3 Box coder --
class BoxCoder:
    """Faster R-CNN Eq. 2 with weights (wx, wy, ww, wh): dx = wx (gx - ex) / ew, dw = ww log(gw / ew), ...

    e is the reference (anchor or proposal), g the box to encode; centres are x1 + w / 2. The weights scale the
    deltas to unit-ish variance: (1, 1, 1, 1) for the RPN, (10, 10, 5, 5) for the RoI head.
    """

    def __init__(self, weights: tuple):
        self.weights = weights

    def encode(self, boxes: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """boxes, reference (N, 4) -> deltas (N, 4)."""
        wx, wy, ww, wh = self.weights
        ew, eh = reference[:, 2] - reference[:, 0], reference[:, 3] - reference[:, 1]
        ex, ey = reference[:, 0] + 0.5 * ew, reference[:, 1] + 0.5 * eh
        gw, gh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        gx, gy = boxes[:, 0] + 0.5 * gw, boxes[:, 1] + 0.5 * gh
        dx, dy = wx * (gx - ex) / ew, wy * (gy - ey) / eh
        dw, dh = ww * torch.log(gw / ew), wh * torch.log(gh / eh)
        return torch.stack([dx, dy, dw, dh], dim=1)                              # (N, 4)

    def decode(self, deltas: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """deltas (N, 4) or class-specific (N, K, 4), reference (N, 4) -> boxes of the deltas' shape."""
        ref = reference.reshape(reference.shape[0], *[1] * (deltas.dim() - 2), 4)   # (N, 4) or (N, 1, 4)
        widths, heights = ref[..., 2] - ref[..., 0], ref[..., 3] - ref[..., 1]
        ctr_x, ctr_y = ref[..., 0] + 0.5 * widths, ref[..., 1] + 0.5 * heights
        wx, wy, ww, wh = self.weights
        dx, dy = deltas[..., 0] / wx, deltas[..., 1] / wy
        dw = (deltas[..., 2] / ww).clamp(max=BBOX_XFORM_CLIP)      # exp() of a wild early prediction stays finite
        dh = (deltas[..., 3] / wh).clamp(max=BBOX_XFORM_CLIP)
        pred_x, pred_y = dx * widths + ctr_x, dy * heights + ctr_y
        half_w, half_h = 0.5 * (torch.exp(dw) * widths), 0.5 * (torch.exp(dh) * heights)
        return torch.stack([pred_x - half_w, pred_y - half_h, pred_x + half_w, pred_y + half_h], dim=-1)


# -- 8.4 Matcher and sampler --
BELOW_LOW, BETWEEN = -1, -2     # matcher codes: background, ignored (the IoU band between the two thresholds)


class Matcher:
    """Assign each prediction (anchor / proposal) its best gt by IoU, or a negative code.

    best IoU >= high -> that gt's index; low <= best < high -> BETWEEN (ignored); best < low -> BELOW_LOW.
    Low-quality rescue (RPN only, Faster R-CNN Sec. 3.1.2 "the anchor(s) with the highest IoU with a gt box"): for
    every gt, all predictions attaining its best IoU (ties included) get back their own best gt even below `high`,
    so a small or thin object still has a positive anchor. Guard: a gt whose best IoU is 0 (or below min_iou)
    rescues nothing; without it every zero-IoU prediction would "attain" that gt's maximum and turn positive.
    """

    def __init__(self, *, high: float, low: float, allow_low_quality: bool, low_quality_min_iou: float = 0.0):
        self.high, self.low = high, low
        self.allow_low_quality, self.low_quality_min_iou = allow_low_quality, low_quality_min_iou

    def __call__(self, iou: torch.Tensor) -> torch.Tensor:
        """iou (G, N) -> (N,) int64 matched gt index, BELOW_LOW or BETWEEN. No gt: all BELOW_LOW (background)."""
        if iou.shape[0] == 0:
            return torch.full((iou.shape[1],), BELOW_LOW, dtype=torch.int64, device=iou.device)
        best_iou, best_gt = iou.max(dim=0)                                       # (N,), (N,)
        matches = best_gt.clone()
        matches[best_iou < self.low] = BELOW_LOW
        matches[(best_iou >= self.low) & (best_iou < self.high)] = BETWEEN
        if self.allow_low_quality:
            best_per_gt = iou.max(dim=1).values                                  # (G,)
            usable = (best_per_gt > 0) & (best_per_gt >= self.low_quality_min_iou)
            attains = (iou == best_per_gt[:, None]) & usable[:, None]           # (G, N)
            rescued = attains.any(dim=0)                                         # (N,)
            matches[rescued] = best_gt[rescued]
        return matches


def sample_balanced(labels: list, *, batch_per_image: int, positive_fraction: float) -> tuple:
    """Per image draw up to batch * fraction positives (label >= 1), fill the rest with negatives (label 0).

    Ignored entries (-1) are never drawn. Both draws are uniform without replacement (randperm), positives first:
    with the same seed this draws exactly what torchvision's BalancedPositiveNegativeSampler draws.
    Returns (positive, negative): per image (n,) bool masks.
    """
    positives, negatives = [], []
    for lab in labels:
        pos, neg = torch.where(lab >= 1)[0], torch.where(lab == 0)[0]
        num_pos = min(pos.numel(), int(batch_per_image * positive_fraction))
        num_neg = min(neg.numel(), batch_per_image - num_pos)
        pos = pos[torch.randperm(pos.numel(), device=pos.device)[:num_pos]]
        neg = neg[torch.randperm(neg.numel(), device=neg.device)[:num_neg]]
        pos_mask = torch.zeros_like(lab, dtype=torch.bool)
        neg_mask = torch.zeros_like(lab, dtype=torch.bool)
        pos_mask[pos], neg_mask[neg] = True, True
        positives.append(pos_mask)
        negatives.append(neg_mask)
    return positives, negatives


# -- 8.5 Region proposal network --
class RPNHead(nn.Module):
    """Faster R-CNN Sec. 3.1: a shared 3x3 conv + ReLU, then per anchor one objectness logit and 4 deltas."""

    def __init__(self, channels: int, *, num_anchors: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        self.objectness = nn.Conv2d(channels, num_anchors, kernel_size=1)
        self.deltas = nn.Conv2d(channels, 4 * num_anchors, kernel_size=1)
        for conv in (self.conv, self.objectness, self.deltas):   # Faster R-CNN Sec. 3.1.3: N(0, 0.01), bias 0
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, feature: torch.Tensor) -> tuple:
        """(B, C, H_l, W_l) -> logits (B, H_l * W_l * A), deltas (B, H_l * W_l * A, 4), in grid_anchors' order."""
        x = F.relu(self.conv(feature))
        # float32 outputs: under bf16 autocast, coordinates near 1000 px would round to 4 px steps when decoded.
        logits, deltas = self.objectness(x).float(), self.deltas(x).float()      # (B, A, H_l, W_l), (B, 4A, ...)
        B, A, H, W = logits.shape
        logits = logits.permute(0, 2, 3, 1).reshape(B, H * W * A)                # (B, H_l * W_l * A)
        deltas = deltas.view(B, A, 4, H, W).permute(0, 3, 4, 1, 2).reshape(B, H * W * A, 4)   # (B, H_l W_l A, 4)
        return logits, deltas


class RPN(nn.Module):
    """Anchors on every level -> scored, decoded, per-level NMS'd proposals; in training also the RPN loss."""

    def __init__(self, channels: int, *, strides: tuple, cfg: MaskRCNNConfig):
        super().__init__()
        self.strides, self.cfg = tuple(strides), cfg
        self.head = RPNHead(channels, num_anchors=len(cfg.aspect_ratios))
        self.box_coder = BoxCoder(RPN_BOX_WEIGHTS)
        self.matcher = Matcher(high=RPN_FG_IOU, low=RPN_BG_IOU, allow_low_quality=True,
                               low_quality_min_iou=cfg.rpn_low_quality_min_iou)

    def anchors(self, features: list) -> list:
        """Per level (H_l * W_l * A, 4): size = anchor_scale x stride (FPN Sec. 4.1: 32^2..512^2 on P2..P6)."""
        out = []
        for feature, stride in zip(features, self.strides):
            cell = cell_anchors(self.cfg.anchor_scale * stride, aspect_ratios=self.cfg.aspect_ratios)
            out.append(grid_anchors(feature.shape[-2:], stride=stride, cell=cell.to(feature.device)))
        return out

    def forward(self, features: list, *, image_sizes: list, targets: list = None) -> tuple:
        """-> (proposals: per image (P, 4), losses: {} in eval, {loss_objectness, loss_rpn_box} in training)."""
        logits, deltas = zip(*[self.head(f) for f in features])                 # per level (B, N_l), (B, N_l, 4)
        anchors = self.anchors(features)
        num_per_level = [a.shape[0] for a in anchors]
        logits, deltas, anchors = torch.cat(logits, 1), torch.cat(deltas, 1), torch.cat(anchors, 0)  # (B, N), ...
        B, N = logits.shape
        # Proposals carry no gradient into the RoI heads (approximate joint training, Faster R-CNN Sec. 3.2).
        proposals = self.box_coder.decode(deltas.detach().reshape(B * N, 4), anchors.repeat(B, 1))    # (B N, 4)
        proposals = self.select_proposals(proposals.view(B, N, 4), logits.detach(), num_per_level=num_per_level,
                                          image_sizes=image_sizes)
        if not self.training:
            return proposals, {}
        return proposals, self.loss(logits, deltas, anchors, targets)

    def select_proposals(self, proposals: torch.Tensor, logits: torch.Tensor, *, num_per_level: list,
                         image_sizes: list) -> list:
        """Top-k per level -> sigmoid -> clip -> drop tiny -> NMS 0.7 per level -> first post_nms_top_n per image."""
        pre_nms = self.cfg.rpn_pre_nms_top_n[0 if self.training else 1]
        post_nms = self.cfg.rpn_post_nms_top_n[0 if self.training else 1]
        top_idx, level_ids, offset = [], [], 0
        for level, n in enumerate(num_per_level):      # per level, so coarse levels are not crowded out by p4
            k = min(pre_nms, n)
            top_idx.append(logits[:, offset:offset + n].topk(k, dim=1).indices + offset)   # (B, k)
            level_ids.append(torch.full((k,), level, dtype=torch.int64, device=logits.device))
            offset += n
        top_idx, level_ids = torch.cat(top_idx, dim=1), torch.cat(level_ids)    # (B, N_top), (N_top,)
        scores = logits.gather(1, top_idx).sigmoid()                             # (B, N_top)
        boxes = proposals.gather(1, top_idx[..., None].expand(-1, -1, 4))       # (B, N_top, 4)
        out = []
        for boxes_i, scores_i, size in zip(boxes, scores, image_sizes):
            boxes_i = clip_boxes_to_image(boxes_i, tuple(size))                 # to the unpadded image
            keep = remove_small_boxes(boxes_i, RPN_MIN_SIZE)
            boxes_i, scores_i, levels_i = boxes_i[keep], scores_i[keep], level_ids[keep]
            keep = batched_nms(boxes_i, scores_i, levels_i, RPN_NMS_IOU)[:post_nms]   # sorted by score
            out.append(boxes_i[keep])                                            # (P, 4)
        return out

    def loss(self, logits: torch.Tensor, deltas: torch.Tensor, anchors: torch.Tensor, targets: list) -> dict:
        """Faster R-CNN Eq. 1: BCE over sampled anchors + box loss over sampled positives / all sampled (T8)."""
        labels, matched_boxes = [], []
        for t in targets:
            matches = self.matcher(box_iou(t["boxes"], anchors))                 # (N,)
            lab = (matches >= 0).to(logits.dtype)                                # 1 object, 0 background
            lab[matches == BETWEEN] = -1                                         # ignored by the sampler
            labels.append(lab)
            gt = t["boxes"] if t["boxes"].numel() else anchors.new_zeros(1, 4)
            matched_boxes.append(gt[matches.clamp(min=0)])                      # (N, 4), used where lab == 1
        positive, negative = sample_balanced(labels, batch_per_image=self.cfg.rpn_batch_per_image,
                                             positive_fraction=RPN_POSITIVE_FRACTION)
        positive, negative = torch.cat(positive), torch.cat(negative)            # (B N,)
        sampled = positive | negative
        num_sampled = max(int(sampled.sum()), 1)
        anchors_all = anchors.repeat(len(targets), 1)                            # (B N, 4)
        targets_pos = self.box_coder.encode(torch.cat(matched_boxes)[positive], anchors_all[positive])
        loss_box = F.smooth_l1_loss(deltas.reshape(-1, 4)[positive], targets_pos, beta=self.cfg.box_loss_beta,
                                    reduction="sum") / num_sampled
        loss_objectness = F.binary_cross_entropy_with_logits(logits.reshape(-1)[sampled], torch.cat(labels)[sampled],
                                                             reduction="sum") / num_sampled
        return {"loss_objectness": loss_objectness, "loss_rpn_box": loss_box}


# -- 8.6 Multi-scale RoIAlign --
def roi_levels(boxes: torch.Tensor, *, strides: tuple) -> torch.Tensor:
    """FPN Eq. 1: k = floor(k0 + log2(sqrt(w h) / 224)), clamped to the pooled levels -> (R,) index into strides."""
    k_min, k_max = int(math.log2(strides[0])), int(math.log2(strides[-1]))
    side = torch.sqrt(box_area(boxes))
    k = torch.floor(CANONICAL_LEVEL + torch.log2(side / CANONICAL_SCALE) + LEVEL_EPS)
    return (k.clamp(min=k_min, max=k_max) - k_min).to(torch.int64)


def multiscale_roi_align(features: list, boxes: list, *, strides: tuple, output_size: int, sampling_ratio: int,
                         aligned: bool) -> torch.Tensor:
    """Pool every box from its FPN level with RoIAlign (Mask R-CNN Sec. 3): per image boxes (P_i, 4) -> (R, C, S, S).

    features are the pooled levels (fine to coarse, strides[l] = 2^l strides[0]); spatial scale 1 / stride.
    """
    rois = torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], dim=1) for i, b in enumerate(boxes)])  # (R, 5)
    levels = roi_levels(rois[:, 1:], strides=strides)                           # (R,)
    out = rois.new_zeros(rois.shape[0], features[0].shape[1], output_size, output_size)   # (R, C, S, S)
    for level, (feature, stride) in enumerate(zip(features, strides)):
        idx = torch.where(levels == level)[0]
        out[idx] = roi_align(feature, rois[idx], output_size, spatial_scale=1.0 / stride,
                             sampling_ratio=sampling_ratio, aligned=aligned).to(out.dtype)
    return out


# -- 8.7 Box head and its loss --
class BoxHead(nn.Module):
    """Mask R-CNN Fig. 4 (right, FPN): 7x7 RoI features -> FC 1024 -> FC 1024 -> K+1 scores, 4K class deltas."""

    def __init__(self, channels: int, *, num_classes: int, fc_dim: int):
        super().__init__()
        self.num_classes = num_classes
        self.fc6 = nn.Linear(channels * BOX_POOL * BOX_POOL, fc_dim)
        self.fc7 = nn.Linear(fc_dim, fc_dim)
        self.cls_score = nn.Linear(fc_dim, num_classes + 1)    # index 0 = background (T1)
        self.bbox_pred = nn.Linear(fc_dim, 4 * num_classes)    # class-specific, none for background (mmdet)
        for fc in (self.fc6, self.fc7):                        # mmdet Shared2FCBBoxHead init
            nn.init.xavier_uniform_(fc.weight)
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        for fc in (self.fc6, self.fc7, self.cls_score, self.bbox_pred):
            nn.init.zeros_(fc.bias)

    def forward(self, x: torch.Tensor) -> tuple:
        """(R, C, 7, 7) -> class logits (R, K+1), deltas (R, K, 4)."""
        x = x.flatten(1)                                                         # (R, C * 49)
        x = F.relu(self.fc7(F.relu(self.fc6(x))))                                # (R, fc_dim)
        deltas = self.bbox_pred(x).float().reshape(x.shape[0], self.num_classes, 4)   # (R, K, 4), float32 as RPN
        return self.cls_score(x).float(), deltas


def box_losses(class_logits: torch.Tensor, deltas: torch.Tensor, labels: torch.Tensor,
               regression_targets: torch.Tensor, *, beta: float) -> tuple:
    """Fast R-CNN Eq. 1: CE over all sampled RoIs; box loss on the gt class's deltas of positives / all sampled (T8).

    labels (R,) in 0..K, regression_targets (R_pos, 4) for the positives in order.
    """
    loss_classifier = F.cross_entropy(class_logits, labels)
    pos = torch.where(labels > 0)[0]
    pos_deltas = deltas[pos, labels[pos] - 1]                                    # (R_pos, 4): label k -> row k - 1
    loss_box = F.smooth_l1_loss(pos_deltas, regression_targets, beta=beta, reduction="sum") / labels.numel()
    return loss_classifier, loss_box


# -- 8.8 Mask head, targets and loss --
class MaskHead(nn.Module):
    """Mask R-CNN Fig. 4 (right): four 3x3 convs, a 2x deconv, then one 28x28 logit map per class (1x1 conv)."""

    def __init__(self, channels: int, *, num_classes: int, dim: int):
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv2d(channels if i == 0 else dim, dim, kernel_size=3, padding=1) for i in range(MASK_NUM_CONVS))
        self.deconv = nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2)
        self.mask_logits = nn.Conv2d(dim, num_classes, kernel_size=1)   # per class, no background map (mmdet)
        for layer in [*self.convs, self.deconv, self.mask_logits]:     # mmdet FCNMaskHead / torchvision init
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(R, C, 14, 14) -> (R, K, 28, 28) logits."""
        for conv in self.convs:
            x = F.relu(conv(x))                                                  # (R, dim, 14, 14)
        return self.mask_logits(F.relu(self.deconv(x))).float()                  # (R, K, 28, 28)


def mask_targets(gt_masks: torch.Tensor, boxes: torch.Tensor, matched: torch.Tensor, *, binarize: bool,
                 aligned: bool) -> torch.Tensor:
    """Crop each RoI's matched gt mask to the RoI and resize it to 28x28 (Mask R-CNN Sec. 3.1, "the intersection
    between an RoI and its associated ground-truth mask"): (G, Hi, Wi), (P, 4), (P,) -> (P, 28, 28).

    One roi_align over the G masks, with the matched gt index as the batch index (no per-RoI copy of a mask).
    """
    rois = torch.cat([matched[:, None].to(boxes), boxes], dim=1)                # (P, 5)
    crops = roi_align(gt_masks[:, None].to(boxes), rois, MASK_SIZE, spatial_scale=1.0, sampling_ratio=0,
                      aligned=aligned)[:, 0]                                     # (P, 28, 28) soft
    return (crops >= 0.5).to(crops) if binarize else crops


def mask_loss(mask_logits: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """L_mask: per-pixel BCE on the gt class's map only (Mask R-CNN Sec. 3, T10), mean over positives and pixels.

    mask_logits (P, K, 28, 28), labels (P,) in 1..K, targets (P, 28, 28).
    """
    if labels.numel() == 0:
        return mask_logits.sum() * 0                                             # keeps the graph, no NaN
    picked = mask_logits[torch.arange(labels.numel(), device=labels.device), labels - 1]   # (P, 28, 28)
    return F.binary_cross_entropy_with_logits(picked, targets)


# -- 8.9 Post-processing and mask pasting --
def postprocess_detections(class_logits: torch.Tensor, deltas: torch.Tensor, proposals: list, *, image_sizes: list,
                           box_coder: BoxCoder) -> list:
    """Softmax scores, class-specific boxes, then per image: score > 0.05, per-class NMS 0.5, best 100 (T9).

    class_logits (R, K+1), deltas (R, K, 4), proposals per image (P_i, 4) -> per image (boxes, scores, labels).
    Every (proposal, class) pair is its own candidate, so one proposal may yield boxes of several classes.
    """
    scores = F.softmax(class_logits, dim=-1)[:, 1:]                              # (R, K), background dropped
    boxes = box_coder.decode(deltas, torch.cat(proposals))                       # (R, K, 4)
    labels = torch.arange(1, scores.shape[1] + 1, device=scores.device).expand_as(scores)   # (R, K)
    sizes = [p.shape[0] for p in proposals]
    out = []
    for boxes_i, scores_i, labels_i, size in zip(boxes.split(sizes), scores.split(sizes), labels.split(sizes),
                                                 image_sizes):
        boxes_i = clip_boxes_to_image(boxes_i, tuple(size)).reshape(-1, 4)      # (P_i K, 4)
        scores_i, labels_i = scores_i.reshape(-1), labels_i.reshape(-1)         # (P_i K,)
        keep = torch.where(scores_i > SCORE_THRESH)[0]
        boxes_i, scores_i, labels_i = boxes_i[keep], scores_i[keep], labels_i[keep]
        keep = remove_small_boxes(boxes_i, DET_MIN_SIZE)
        boxes_i, scores_i, labels_i = boxes_i[keep], scores_i[keep], labels_i[keep]
        keep = batched_nms(boxes_i, scores_i, labels_i, DET_NMS_IOU)[:DETS_PER_IMAGE]   # NMS within each class
        out.append((boxes_i[keep], scores_i[keep], labels_i[keep]))
    return out


def paste_masks(probs: torch.Tensor, boxes: torch.Tensor, *, image_size: tuple) -> torch.Tensor:
    """Place each 28x28 probability map into its box on an (h, w) canvas (Mask R-CNN Sec. 3.1 "Inference").

    probs (k, M, M), boxes (k, 4) -> (k, h, w) in [0, 1]. torchvision's recipe: pad the map with one pixel of
    zeros and grow the box by (M + 2) / M about its centre, so the map fades to 0 at the box edge; truncate the box
    to integers, bilinearly resize the map to the integer box, whose pixel count is x2 - x1 + 1 (the only "+1"
    in this file), and copy the part inside the image.
    """
    height, width = image_size
    canvas = probs.new_zeros(probs.shape[0], height, width)                      # (k, h, w)
    padded = F.pad(probs, (1, 1, 1, 1))                                          # (k, M + 2, M + 2)
    scale = (probs.shape[-1] + 2) / probs.shape[-1]
    centre, half = (boxes[:, :2] + boxes[:, 2:]) * 0.5, (boxes[:, 2:] - boxes[:, :2]) * 0.5 * scale   # (k, 2) each
    int_boxes = torch.cat([centre - half, centre + half], dim=1).to(torch.int64).tolist()   # truncation toward 0
    for i, (x1, y1, x2, y2) in enumerate(int_boxes):
        box_w, box_h = max(x2 - x1 + 1, 1), max(y2 - y1 + 1, 1)
        resized = F.interpolate(padded[i][None, None], size=(box_h, box_w), mode="bilinear",
                                align_corners=False)[0, 0]                       # (box_h, box_w)
        x0, y0, x3, y3 = max(x1, 0), max(y1, 0), min(x2 + 1, width), min(y2 + 1, height)
        if x3 > x0 and y3 > y0:
            canvas[i, y0:y3, x0:x3] = resized[y0 - y1:y3 - y1, x0 - x1:x3 - x1]
    return canvas


# -- 8.10 The Mask R-CNN-lite model --
def check_maskrcnn_strides(strides: tuple) -> None:
    """Strides are powers of two, fine to coarse, and the pooled levels double (FPN Eq. 1 assumes it)."""
    strides = tuple(strides)
    if not strides or any(not isinstance(s, int) or s < 1 or s & (s - 1) for s in strides):
        raise ValueError(f"strides must be powers of two, one per feature level, e.g. (4, 8, 16, 32, 64); "
                         f"got {strides}")
    pooled = strides[:NUM_POOLED_LEVELS]
    if any(b != 2 * a for a, b in zip(pooled, pooled[1:])) or any(b <= a for a, b in zip(strides, strides[1:])):
        raise ValueError(f"strides must increase fine to coarse, doubling over the first {NUM_POOLED_LEVELS} levels "
                         f"(they are pooled by the FPN level rule); got {strides}")


def check_maskrcnn_inputs(model: nn.Module, features: list, *, image_sizes: list, targets: list) -> None:
    """One clear message per bad input instead of a deep traceback."""
    if len(features) != len(model.strides):
        raise ValueError(f"got {len(features)} feature maps but {len(model.strides)} strides {model.strides}: pass "
                         f"one (B, C, H, W) map per stride, fine to coarse")
    B, fine = features[0].shape[0], features[0].shape[-2:]
    for f, s in zip(features, model.strides):
        if f.dim() != 4 or f.shape[0] != B or f.shape[1] != model.in_channels:
            raise ValueError(f"feature maps must be (B={B}, C={model.in_channels}, H, W); got {tuple(f.shape)}")
        if any(abs(n * s - m * model.strides[0]) >= s for n, m in zip(f.shape[-2:], fine)):
            raise ValueError(f"a {tuple(f.shape[-2:])} map does not fit stride {s} next to the {tuple(fine)} map at "
                             f"stride {model.strides[0]}: order the maps fine to coarse and give their true strides")
    if len(image_sizes) != B or any(h > fine[0] * model.strides[0] or w > fine[1] * model.strides[0]
                                    for h, w in image_sizes):
        raise ValueError(f"image_sizes needs one unpadded (h, w) per image, within the padded input "
                         f"{fine[0] * model.strides[0]}x{fine[1] * model.strides[0]}; got {list(image_sizes)}")
    if not model.training:
        return
    if targets is None or len(targets) != B:
        raise ValueError("training needs targets, one dict {labels, boxes, masks} per image (or call model.eval())")
    for t in targets:
        boxes, labels, masks = t["boxes"], t["labels"], t["masks"]
        if boxes.dim() != 2 or boxes.shape[1] != 4 or not boxes.is_floating_point():
            raise ValueError(f"target boxes must be float (G, 4) xyxy in pixels; got {boxes.dtype} "
                             f"{tuple(boxes.shape)}")
        if labels.dtype != torch.int64 or labels.shape != boxes.shape[:1] or masks.shape[0] != boxes.shape[0]:
            raise ValueError("target labels must be int64 (G,) and masks (G, H, W), one per box")
        if labels.numel() and (labels.min() < 1 or labels.max() > model.num_classes):
            raise ValueError(f"target labels must be in 1..{model.num_classes} (0 is background): shift 0-based "
                             f"labels by +1")
        if boxes.numel() and ((boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])).any():
            raise ValueError("target boxes must have x2 > x1 and y2 > y1 (xyxy): drop empty boxes in the data")


class MaskRCNNLite(nn.Module):
    """RPN on every level + box and mask heads on RoIAlign of the first four levels (Mask R-CNN Sec. 3).

    Training: proposals + gt boxes (T6) are matched at IoU 0.5 and sampled 1:3, the box head gets all sampled RoIs,
    the mask head the positives only; loss = sum of the five terms, all weight 1. Inference: box head on the
    proposals, post-processing, then the mask head on the final boxes (not on the proposals).
    """

    def __init__(self, in_channels: int, *, num_classes: int, strides: tuple, cfg: MaskRCNNConfig):
        super().__init__()
        check_maskrcnn_strides(strides)
        self.in_channels, self.num_classes, self.strides, self.cfg = in_channels, num_classes, tuple(strides), cfg
        self.pool_strides = self.strides[:NUM_POOLED_LEVELS]
        self.rpn = RPN(in_channels, strides=strides, cfg=cfg)
        self.box_head = BoxHead(in_channels, num_classes=num_classes, fc_dim=cfg.box_fc_dim)
        self.mask_head = MaskHead(in_channels, num_classes=num_classes, dim=cfg.mask_dim)
        self.box_coder = BoxCoder(ROI_BOX_WEIGHTS)
        self.roi_matcher = Matcher(high=ROI_IOU, low=ROI_IOU, allow_low_quality=False)

    def pool(self, features: list, boxes: list, *, output_size: int) -> torch.Tensor:
        return multiscale_roi_align(features[:NUM_POOLED_LEVELS], boxes, strides=self.pool_strides,
                                    output_size=output_size, sampling_ratio=self.cfg.roi_sampling_ratio,
                                    aligned=self.cfg.roi_aligned)

    def forward(self, features: list, *, image_sizes: list, targets: list = None):
        check_maskrcnn_inputs(self, features, image_sizes=image_sizes, targets=targets)
        proposals, rpn_losses = self.rpn(features, image_sizes=image_sizes, targets=targets)
        if self.training:
            losses = {**rpn_losses, **self.roi_losses(features, proposals, targets)}
            return {"loss": sum(losses.values()), **losses}
        return self.detect(features, proposals, image_sizes=image_sizes)

    def sample_rois(self, proposals: list, targets: list) -> tuple:
        """Append the gt boxes to the proposals (T6), match at 0.5, sample per image.

        -> per image: rois (R_i, 4), labels (R_i,) in 0..K, matched gt index (R_i,) (meaningful where label > 0).
        """
        all_rois, all_labels, all_matched = [], [], []
        for props, t in zip(proposals, targets):
            rois = torch.cat([props, t["boxes"].to(props)])                      # (P + G, 4)
            matched = self.roi_matcher(box_iou(t["boxes"].to(props), rois))      # (P + G,)
            labels = t["labels"][matched.clamp(min=0)] if t["labels"].numel() else matched.new_zeros(matched.shape)
            labels = torch.where(matched >= 0, labels, torch.zeros_like(labels))   # BELOW_LOW -> background 0
            all_rois.append(rois), all_labels.append(labels), all_matched.append(matched.clamp(min=0))
        positive, negative = sample_balanced(all_labels, batch_per_image=self.cfg.roi_batch_per_image,
                                             positive_fraction=ROI_POSITIVE_FRACTION)
        keep = [torch.where(p | n)[0] for p, n in zip(positive, negative)]
        return ([r[k] for r, k in zip(all_rois, keep)], [lab[k] for lab, k in zip(all_labels, keep)],
                [m[k] for m, k in zip(all_matched, keep)])

    def roi_losses(self, features: list, proposals: list, targets: list) -> dict:
        rois, labels, matched = self.sample_rois(proposals, targets)
        class_logits, deltas = self.box_head(self.pool(features, rois, output_size=BOX_POOL))
        pos = [torch.where(lab > 0)[0] for lab in labels]
        regression_targets = torch.cat([self.box_coder.encode(t["boxes"].to(r)[m[p]], r[p])
                                        for t, r, m, p in zip(targets, rois, matched, pos)])   # (R_pos, 4)
        loss_classifier, loss_box = box_losses(class_logits, deltas, torch.cat(labels), regression_targets,
                                               beta=self.cfg.box_loss_beta)
        pos_rois = [r[p] for r, p in zip(rois, pos)]
        mask_logits = self.mask_head(self.pool(features, pos_rois, output_size=MASK_POOL))   # (R_pos, K, 28, 28)
        targets_mask = torch.cat([mask_targets(t["masks"], r[p], m[p], binarize=self.cfg.binarize_mask_targets,
                                               aligned=self.cfg.roi_aligned)
                                  for t, r, m, p in zip(targets, rois, matched, pos)])   # (R_pos, 28, 28)
        pos_labels = torch.cat([lab[p] for lab, p in zip(labels, pos)])
        return {"loss_classifier": loss_classifier, "loss_box": loss_box,
                "loss_mask": mask_loss(mask_logits, pos_labels, targets_mask)}

    @torch.no_grad()
    def detect(self, features: list, proposals: list, *, image_sizes: list) -> list:
        class_logits, deltas = self.box_head(self.pool(features, proposals, output_size=BOX_POOL))
        dets = postprocess_detections(class_logits, deltas, proposals, image_sizes=image_sizes,
                                      box_coder=self.box_coder)
        boxes = [d[0] for d in dets]
        mask_logits = self.mask_head(self.pool(features, boxes, output_size=MASK_POOL))   # (D, K, 28, 28)
        labels = torch.cat([d[2] for d in dets])
        probs = mask_logits[torch.arange(labels.numel(), device=labels.device), labels - 1].sigmoid()  # (D, 28, 28)
        results = []
        for (b, s, lab), p, size in zip(dets, probs.split([len(b) for b in boxes]), image_sizes):
            masks = paste_masks(p, b, image_size=tuple(size))                    # (k, h, w)
            results.append({"boxes": b, "scores": s, "labels": lab, "masks": masks})
        return results


# ---- 9. DINO-style detector ------------------------------------------------------------------------------------------

# Differences from DINO (paper / official code):
# - Deformable attention is the pure-PyTorch `grid_sample` path (the official repo's CPU fallback
#   `ms_deform_attn_core_pytorch`), numerically the same operator as the CUDA kernel, slower.
# - Kept: 4 levels (given maps + extra stride-2 conv levels), padding masks and valid ratios, two-stage top-k
#   anchors (detached) with learned content queries, CDN positive/negative groups with the attention mask, shared
#   class/box heads across decoder layers, separate encoder-output heads, focal matching cost, all 3 x (Ldec + 1)
#   + 3 x Ldec loss terms with DINO's weights, top-k post-processing without NMS.
# - CDN group count: `max(1, dn_number // G)` for every dn_number. Upstream doubles dn_number and only divides
#   when the doubled value is >= 100 (so dn_number < 50 gives 2 x dn_number groups); this is the intended rule.
# - Look-forward-twice: the box head reads the normed decoder output for both the refinement fed to the next
#   layer and the prediction (upstream refines from the un-normed output and predicts from the normed one). The
#   prediction of layer i then has the same value as the reference fed to layer i + 1; only the gradient paths
#   differ, which is the point of Sec. 3.5. One box-head call per layer.
# - Top-k selection ignores padded tokens and tokens whose proposal is invalid (upstream ranks them too and only
#   gives them an infinite box logit). The DN label embedding has K rows (upstream K + 1, one never used).
# - Detections are clipped to the unpadded image. No dropout anywhere (DINO-4scale uses 0.0).
# - Dropped: 5-scale, EMA, decoder query perturbers and layer dropout, `dec_layer_number`, pattern embeddings,
#   the mask / panoptic heads, the cardinality logging term, multi-scale training augmentation.

# -- 9.1 Config and presets --
@dataclass
class DINOConfig:
    d_model: int = 256                  # D, transformer width; divisible by num_heads and by 32 (GroupNorm groups)
    num_heads: int = 8                  # M, heads of deformable attention and of decoder self-attention
    num_levels: int = 4                 # L, levels; those beyond the given maps are stride-2 convs ("4scale": 8..64)
    num_points: int = 4                 # P, sampling points per head and level (K in Deformable DETR Eq. 3)
    enc_layers: int = 6                 # deformable encoder layers
    dec_layers: int = 6                 # decoder layers; each predicts, all but the last give auxiliary losses
    ffn_dim: int = 2048                 # FFN hidden width (ReLU) in encoder and decoder layers
    num_queries: int = 900              # Q, matching queries = top-Q encoder proposals
    dn_number: int = 100                # CDN budget: groups = max(1, dn_number // G), 2 G slots per group
    dn_label_noise_ratio: float = 0.5   # a DN label is resampled with probability half of this (0.25)
    dn_box_noise_scale: float = 1.0     # lambda of Sec. 3.3 in half box sides (official scripts 1.0, config 0.4)
    num_select: int = 300               # detections kept per image at inference (top-k over Q x K scores)


DINO_PRESETS = {
    "paper": DINOConfig(),              # DINO-4scale, official config + training script
    "tiny": DINOConfig(d_model=64, num_heads=4, num_points=2, enc_layers=1, dec_layers=3, ffn_dim=128,
                       num_queries=30, dn_number=6, num_select=30),          # CPU tests, seconds
}

# Matching costs and loss weights (DINO-4scale: set_cost_* and *_loss_coef); the same weights for every loss set.
FOCAL_ALPHA, FOCAL_GAMMA = 0.25, 2.0    # focal loss (Lin et al.) in both the matching cost and the loss
MATCH_COST = {"ce": 2.0, "bbox": 5.0, "giou": 2.0}
LOSS_WEIGHT = {"ce": 1.0, "bbox": 5.0, "giou": 2.0}
PRIOR_PROB = 0.01                       # class-head bias = -log((1 - p) / p): every class starts at score 0.01


# -- 9.2 Box helpers and sine embeddings --
def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """logit(x) with x clamped to [eps, 1 - eps], so boxes touching the border map to a finite logit (+-6.9)."""
    x = x.clamp(min=0.0, max=1.0)
    return torch.log(x.clamp(min=eps) / (1.0 - x).clamp(min=eps))


def cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    return box_convert(boxes, in_fmt="cxcywh", out_fmt="xyxy")


def sine_features(t: torch.Tensor, *, num_feats: int, temperature: float) -> torch.Tensor:
    """(...) scalars -> (..., num_feats): sin/cos pairs at frequencies temperature^(-2i/num_feats), interleaved."""
    dim_t = temperature ** (2 * (torch.arange(num_feats, device=t.device) // 2) / num_feats)   # (F,) pairs share one
    a = t[..., None] / dim_t                                                                   # (..., F)
    return torch.stack([a[..., 0::2].sin(), a[..., 1::2].cos()], dim=-1).flatten(-2)          # (..., F)


def sine_position_embedding(mask: torch.Tensor, *, num_feats: int, temperature: float = 20.0) -> torch.Tensor:
    """(B, H, W) padding mask -> (B, 2 num_feats, H, W): DETR's 2-d sine code (Sec. 3.2), (y, x) halves.

    Positions are cumulative counts of valid pixels, divided by the valid extent and scaled to 2 pi, so the unpadded
    image always spans [0, 2 pi] whatever its padding. Temperature 20 as DINO (`PositionEmbeddingSineHW`).
    """
    not_mask = (~mask).float()
    y = not_mask.cumsum(1)                                          # (B, H, W) 1..valid_H down each column
    x = not_mask.cumsum(2)                                          # (B, H, W) 1..valid_W along each row
    y = y / (y[:, -1:, :] + 1e-6) * 2 * math.pi
    x = x / (x[:, :, -1:] + 1e-6) * 2 * math.pi
    pos_y = sine_features(y, num_feats=num_feats, temperature=temperature)    # (B, H, W, F)
    pos_x = sine_features(x, num_feats=num_feats, temperature=temperature)    # (B, H, W, F)
    return torch.cat([pos_y, pos_x], dim=-1).permute(0, 3, 1, 2)              # (B, 2F, H, W)


def box_sine_embedding(boxes: torch.Tensor, *, num_feats: int) -> torch.Tensor:
    """(..., 4) cxcywh in [0, 1] -> (..., 4 num_feats), in the order y, x, w, h. DINO Sec. 3.2 (after DAB-DETR):
    decoder queries are 4-d anchor boxes; their positional query is an MLP of this code, recomputed every layer."""
    cx, cy, w, h = (boxes * 2 * math.pi).unbind(-1)                 # 4 x (...)
    parts = [sine_features(c, num_feats=num_feats, temperature=10000.0) for c in (cy, cx, w, h)]   # 4 x (..., F)
    return torch.cat(parts, dim=-1)                                 # (..., 4F)


def mlp(dims: list[int]) -> nn.Sequential:
    """Linear layers with ReLU between them: dims [d0, d1, ..., dk]."""
    layers = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers += [nn.Linear(a, b)] + ([nn.ReLU()] if i < len(dims) - 2 else [])
    return nn.Sequential(*layers)


# -- 9.3 Multi-scale deformable attention (pure PyTorch) --
def ms_deform_attn_sample(value: torch.Tensor, spatial_shapes: list[tuple[int, int]], locations: torch.Tensor,
                          weights: torch.Tensor) -> torch.Tensor:
    """The sum of Deformable DETR Eq. 3: bilinear samples of every level's value map, weighted and summed.

    value (B, S, M, Dh): tokens of all levels, flattened fine to coarse, split into heads.
    locations (B, Q, M, L, P, 2): normalised (x, y) in the padded level map, origin at its top-left corner.
    weights (B, Q, M, L, P): attention weights, already softmaxed jointly over L x P per head.
    Returns (B, Q, M * Dh). Samples outside the map read zeros (`padding_mode="zeros"`).
    """
    B, _, M, Dh = value.shape
    _, Q, _, L, P, _ = locations.shape
    values = value.split([h * w for h, w in spatial_shapes], dim=1)          # L x (B, H_l W_l, M, Dh)
    # grid_sample wants [-1, 1]; with align_corners=False the location ((j + .5) / W, (i + .5) / H) is pixel (i, j)
    grids = 2 * locations - 1                                               # (B, Q, M, L, P, 2)
    samples = []
    for lvl, (h, w) in enumerate(spatial_shapes):
        v = values[lvl].permute(0, 2, 3, 1).reshape(B * M, Dh, h, w)        # (B M, Dh, H_l, W_l)
        g = grids[:, :, :, lvl].transpose(1, 2).reshape(B * M, Q, P, 2)     # (B M, Q, P, 2)
        samples.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros",
                                     align_corners=False))                 # (B M, Dh, Q, P)
    samples = torch.stack(samples, dim=-2).flatten(-2)                      # (B M, Dh, Q, L P)
    weights = weights.transpose(1, 2).reshape(B * M, 1, Q, L * P)           # (B M, 1, Q, L P)
    out = (samples * weights).sum(-1)                                       # (B M, Dh, Q)
    return out.view(B, M * Dh, Q).transpose(1, 2)                           # (B, Q, M Dh)


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention (Deformable DETR Eq. 3): each query reads M x L x P bilinear samples around
    its reference; offsets and weights are linear functions of the query (no query-key dot product)."""

    def __init__(self, d_model: int, *, num_heads: int, num_levels: int, num_points: int):
        super().__init__()
        self.num_heads, self.num_levels, self.num_points = num_heads, num_levels, num_points
        self.sampling_offsets = nn.Linear(d_model, num_heads * num_levels * num_points * 2)   # Delta p_mlqk of Eq. 3
        self.attention_weights = nn.Linear(d_model, num_heads * num_levels * num_points)      # A_mlqk of Eq. 3
        self.value_proj = nn.Linear(d_model, d_model)                                         # W'_m of Eq. 3
        self.output_proj = nn.Linear(d_model, d_model)                                        # W_m of Eq. 3
        self.reset_parameters()

    def reset_parameters(self):
        """Official init (`ms_deform_attn.py`, `_reset_parameters`): head h starts looking along direction 2 pi h / M,
        point p at distance p + 1; uniform attention weights."""
        M, L, P = self.num_heads, self.num_levels, self.num_points
        nn.init.zeros_(self.sampling_offsets.weight)
        theta = torch.arange(M, dtype=torch.float32) * (2 * math.pi / M)                      # (M,)
        ring = torch.stack([theta.cos(), theta.sin()], dim=-1)                                # (M, 2)
        ring = ring / ring.abs().max(-1, keepdim=True).values          # on the unit square: larger |component| = 1
        ring = ring[:, None, None, :].repeat(1, L, P, 1)                                      # (M, L, P, 2)
        ring = ring * torch.arange(1, P + 1, dtype=torch.float32).view(1, 1, P, 1)           # (M, L, P, 2)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(ring.flatten())                                  # (M L P 2,)
        nn.init.zeros_(self.attention_weights.weight)                  # uniform weights after the softmax
        nn.init.zeros_(self.attention_weights.bias)
        for proj in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)

    def forward(self, query: torch.Tensor, *, reference: torch.Tensor, value: torch.Tensor,
                spatial_shapes: list[tuple[int, int]], padding_mask: torch.Tensor) -> torch.Tensor:
        """query (B, Q, D); reference (B, Q, L, 2) points (encoder) or (B, Q, L, 4) cxcywh boxes (decoder), normalised
        in each level's padded frame; value (B, S, D); padding_mask (B, S), True = padding. Returns (B, Q, D)."""
        B, Q, _ = query.shape
        M, L, P = self.num_heads, self.num_levels, self.num_points
        value = self.value_proj(value).masked_fill(padding_mask[..., None], 0.0)   # padding contributes nothing
        value = value.view(B, value.shape[1], M, -1)                               # (B, S, M, Dh)
        offsets = self.sampling_offsets(query).view(B, Q, M, L, P, 2)              # (B, Q, M, L, P, 2)
        # Eq. 3: sum_l sum_k A_mlqk = 1, so the softmax runs over levels AND points of a head together
        weights = self.attention_weights(query).view(B, Q, M, L * P).softmax(-1)   # (B, Q, M, L P)
        weights = weights.view(B, Q, M, L, P)                                      # (B, Q, M, L, P)
        if reference.shape[-1] == 2:
            # encoder: offsets are in pixels of each level, so divide by that level's (W_l, H_l)
            size = torch.tensor([[w, h] for h, w in spatial_shapes], dtype=query.dtype, device=query.device)  # (L, 2)
            locations = (reference[:, :, None, :, None, :]
                         + offsets / size[None, None, None, :, None, :])     # (B, Q, M, L, P, 2)
        else:
            # decoder (box reference): offsets are in units of the half box size, shrunk by P (official code)
            locations = (reference[:, :, None, :, None, :2]
                         + offsets / P * reference[:, :, None, :, None, 2:] * 0.5)   # (B, Q, M, L, P, 2)
        out = ms_deform_attn_sample(value, spatial_shapes, locations, weights)        # (B, Q, D)
        return self.output_proj(out)


# -- 9.4 Deformable encoder --
def valid_ratios(masks: list[torch.Tensor]) -> torch.Tensor:
    """L x (B, H_l, W_l) padding masks -> (B, L, 2): the valid fraction (w, h) of each padded level map."""
    ratios = []
    for m in masks:
        valid_h = (~m[:, :, 0]).sum(1).float() / m.shape[1]                       # (B,)
        valid_w = (~m[:, 0, :]).sum(1).float() / m.shape[2]                       # (B,)
        ratios.append(torch.stack([valid_w, valid_h], dim=-1))                    # (B, 2)
    return torch.stack(ratios, dim=1)                                             # (B, L, 2)


def encoder_reference_points(spatial_shapes: list[tuple[int, int]], ratios: torch.Tensor) -> torch.Tensor:
    """Each token's pixel centre, normalised by its level's valid extent, then placed in every level's padded frame.

    Returns (B, S, L, 2) (x, y): a token attends around the same image point on all L levels (Sec. 4.1, p_hat_q).
    """
    refs = []
    for lvl, (h, w) in enumerate(spatial_shapes):
        ys, xs = torch.meshgrid(torch.arange(h, device=ratios.device) + 0.5,
                                torch.arange(w, device=ratios.device) + 0.5, indexing="ij")   # 2 x (H_l, W_l)
        ref_y = ys.reshape(1, -1) / (ratios[:, None, lvl, 1] * h)                 # (B, H_l W_l)
        ref_x = xs.reshape(1, -1) / (ratios[:, None, lvl, 0] * w)                 # (B, H_l W_l)
        refs.append(torch.stack([ref_x, ref_y], dim=-1))                          # (B, H_l W_l, 2)
    refs = torch.cat(refs, dim=1)                                                 # (B, S, 2)
    return refs[:, :, None] * ratios[:, None]                                     # (B, S, L, 2)


class EncoderLayer(nn.Module):
    """Post-norm layer: deformable self-attention over all levels (query = token + position), then a ReLU FFN."""

    def __init__(self, d_model: int, *, num_heads: int, num_levels: int, num_points: int, ffn_dim: int):
        super().__init__()
        self.attn = MSDeformAttn(d_model, num_heads=num_heads, num_levels=num_levels, num_points=num_points)
        self.norm1 = nn.LayerNorm(d_model)
        self.ffn = mlp([d_model, ffn_dim, d_model])
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src, *, pos, reference, spatial_shapes, padding_mask):
        src = self.norm1(src + self.attn(src + pos, reference=reference, value=src, spatial_shapes=spatial_shapes,
                                         padding_mask=padding_mask))
        return self.norm2(src + self.ffn(src))


# -- 9.5 Mixed query selection (two-stage) --
def encoder_proposals(padding_mask: torch.Tensor, spatial_shapes: list[tuple[int, int]]):
    """One proposal box per encoder token (Deformable DETR Sec. 4.2, two-stage): centred on the token, side
    0.05 x 2^l of the valid image at level l. Returns (B, S, 4) logits and (B, S) valid flags; a proposal is valid
    when its token is not padding and all four numbers lie in (0.01, 0.99); invalid ones get logit +inf."""
    B = padding_mask.shape[0]
    props, start = [], 0
    for lvl, (h, w) in enumerate(spatial_shapes):
        m = padding_mask[:, start:start + h * w].view(B, h, w)                    # (B, H_l, W_l)
        valid_h = (~m[:, :, 0]).sum(1).float()                                    # (B,)
        valid_w = (~m[:, 0, :]).sum(1).float()                                    # (B,)
        ys, xs = torch.meshgrid(torch.arange(h, device=m.device), torch.arange(w, device=m.device), indexing="ij")
        cx = (xs.reshape(1, -1) + 0.5) / valid_w[:, None]                         # (B, H_l W_l)
        cy = (ys.reshape(1, -1) + 0.5) / valid_h[:, None]                         # (B, H_l W_l)
        side = torch.full_like(cx, 0.05 * 2.0 ** lvl)                             # (B, H_l W_l)
        props.append(torch.stack([cx, cy, side, side], dim=-1))                   # (B, H_l W_l, 4)
        start += h * w
    props = torch.cat(props, dim=1)                                               # (B, S, 4)
    valid = ((props > 0.01) & (props < 0.99)).all(-1) & ~padding_mask            # (B, S)
    logits = torch.log(props / (1 - props)).masked_fill(~valid[..., None], float("inf"))
    return logits, valid


class QuerySelection(nn.Module):
    """DINO Sec. 3.4: score every encoder token, keep the top Q; their refined proposal boxes (detached) become the
    decoder's anchors, i.e. its positional queries. Content queries stay learned (in the head): "mixed"."""

    def __init__(self, d_model: int, *, class_head: nn.Module, box_head: nn.Module):
        super().__init__()
        self.enc_output = nn.Linear(d_model, d_model)
        self.enc_output_norm = nn.LayerNorm(d_model)
        self.class_head = class_head          # separate copies of the decoder heads (two_stage_*_share = False)
        self.box_head = box_head

    def forward(self, memory, *, padding_mask, spatial_shapes, num_queries: int) -> dict:
        """memory (B, S, D) -> {"anchors" (B, Q, 4) detached logits, "logits" (B, Q, K), "boxes" (B, Q, 4) sigmoid}."""
        proposals, valid = encoder_proposals(padding_mask, spatial_shapes)       # (B, S, 4), (B, S)
        memory = memory.masked_fill(~valid[..., None], 0.0)
        memory = self.enc_output_norm(self.enc_output(memory))                    # (B, S, D)
        logits = self.class_head(memory)                                          # (B, S, K)
        boxes = self.box_head(memory) + proposals                                 # (B, S, 4) refined, logit space
        score = logits.max(-1).values.masked_fill(~valid, float("-inf"))          # (B, S)
        top = score.topk(num_queries, dim=1).indices                              # (B, Q)
        boxes = boxes.gather(1, top[..., None].expand(-1, -1, 4))                 # (B, Q, 4)
        logits = logits.gather(1, top[..., None].expand(-1, -1, logits.shape[-1]))  # (B, Q, K)
        # the anchors are detached (no decoder gradient reaches the encoder through the box coordinates);
        # the undetached top-k predictions get their own ("encoder") loss
        return {"anchors": boxes.detach(), "logits": logits, "boxes": boxes.sigmoid()}


# -- 9.6 Contrastive denoising (training only) --
def dn_num_groups(dn_number: int, max_gt: int) -> int:
    """CDN groups for a batch whose largest image has max_gt boxes: about dn_number positive/negative pairs in all."""
    return max(1, dn_number // max_gt)


def cdn_queries(targets: list[dict], *, num_groups: int, num_classes: int, label_noise_ratio: float,
                box_noise_scale: float):
    """Noised copies of the GTs (DINO Sec. 3.3, Fig. 3), laid out as groups of 2 G slots per image:
    slot g 2G + j is the positive copy of GT j in group g, slot g 2G + G + j its negative copy, j >= n padding.

    targets: per image {"labels" (n,) in 0..K-1, "boxes" (n, 4) normalised cxcywh}.
    Returns labels (B, N_dn) int64, boxes (B, N_dn, 4) cxcywh in [0, 1], real (B, N_dn) bool (False = padding slot).
    Label noise: each copy gets a uniformly drawn class with probability label_noise_ratio / 2.
    Box noise: each corner moves by sign x u x (half side) x lambda, u in [0, 1) for positives and [1, 2) for
    negatives, so positives stay near the GT (reconstruct it) and negatives are farther (predict "no object").
    """
    B, G = len(targets), max(len(t["labels"]) for t in targets)
    device = targets[0]["boxes"].device
    labels = torch.zeros(B, num_groups, 2, G, dtype=torch.int64, device=device)     # (B, groups, pos/neg, G)
    boxes = torch.full((B, num_groups, 2, G, 4), 0.5, device=device)               # padding slot: logit 0
    real = torch.zeros(B, num_groups, 2, G, dtype=torch.bool, device=device)
    for b, t in enumerate(targets):
        n = len(t["labels"])
        labels[b, :, :, :n] = t["labels"]
        boxes[b, :, :, :n] = t["boxes"]
        real[b, :, :, :n] = True
    flip = torch.rand(labels.shape, device=device) < 0.5 * label_noise_ratio
    labels = torch.where(flip, torch.randint_like(labels, num_classes), labels)
    corners = cxcywh_to_xyxy(boxes)                                                 # (B, groups, 2, G, 4)
    half = boxes[..., 2:].repeat(1, 1, 1, 1, 2) / 2                  # (B, groups, 2, G, 4) as w/2, h/2, w/2, h/2
    u = torch.rand(corners.shape, device=device)
    u = u + torch.tensor([0.0, 1.0], device=device).view(1, 1, 2, 1, 1)             # negatives: [1, 2)
    sign = torch.randint_like(corners, 2) * 2 - 1
    corners = (corners + sign * u * half * box_noise_scale).clamp(0.0, 1.0)
    noised = box_convert(corners, in_fmt="xyxy", out_fmt="cxcywh")                  # (B, groups, 2, G, 4)
    boxes = torch.where(real[..., None], noised, boxes)
    return labels.flatten(1), boxes.flatten(1, 3), real.flatten(1)                  # (B, N_dn), (B, N_dn, 4), (B, N_dn)


def dn_attention_mask(*, num_groups: int, group_size: int, num_queries: int, device=None) -> torch.Tensor:
    """(T, T) decoder self-attention mask, True = blocked (`nn.MultiheadAttention`), T = groups x group_size + Q.

    Matching queries (the last Q) never see DN slots: those hold noised GTs, i.e. the answers. A DN group sees
    itself and the matching queries but no other DN group, so groups are independent denoising problems.
    """
    n_dn = num_groups * group_size
    mask = torch.zeros(n_dn + num_queries, n_dn + num_queries, dtype=torch.bool, device=device)
    mask[n_dn:, :n_dn] = True
    for g in range(num_groups):
        rows = slice(g * group_size, (g + 1) * group_size)
        mask[rows, :n_dn] = True
        mask[rows, rows] = False
    return mask


# -- 9.7 Decoder and look-forward-twice --
class DecoderLayer(nn.Module):
    """Post-norm layer: self-attention among queries, deformable cross-attention around each query's box, FFN."""

    def __init__(self, d_model: int, *, num_heads: int, num_levels: int, num_points: int, ffn_dim: int):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, num_heads, batch_first=True)
        self.norm1 = nn.LayerNorm(d_model)
        self.cross_attn = MSDeformAttn(d_model, num_heads=num_heads, num_levels=num_levels, num_points=num_points)
        self.norm2 = nn.LayerNorm(d_model)
        self.ffn = mlp([d_model, ffn_dim, d_model])
        self.norm3 = nn.LayerNorm(d_model)

    def forward(self, tgt, *, query_pos, reference, memory, spatial_shapes, padding_mask, attn_mask):
        q = tgt + query_pos
        tgt = self.norm1(tgt + self.self_attn(q, q, tgt, attn_mask=attn_mask, need_weights=False)[0])
        tgt = self.norm2(tgt + self.cross_attn(tgt + query_pos, reference=reference, value=memory,
                                               spatial_shapes=spatial_shapes, padding_mask=padding_mask))
        return self.norm3(tgt + self.ffn(tgt))


class Decoder(nn.Module):
    """Decoder layers with iterative box refinement in inverse-sigmoid space and look-forward-twice (Sec. 3.5).

    Layer i predicts a logit-space delta Delta_i from its output. With b'_i the refined box:
        b'_i = sigmoid(Delta_i + logit(b_{i-1}))      b_i = detach(b'_i)  -> reference fed to layer i + 1
        b_i^pred = sigmoid(Delta_i + logit(b'_{i-1})) -> the box layer i is trained on
    so the loss of layer i also corrects layer i - 1's box (through b'_{i-1}), while no gradient flows along the
    reference chain itself. b_0 are the (detached) anchors. The class and box heads are shared by all layers.
    """

    def __init__(self, cfg: DINOConfig, *, class_head: nn.Module, box_head: nn.Module):
        super().__init__()
        D = cfg.d_model
        self.layers = nn.ModuleList([
            DecoderLayer(D, num_heads=cfg.num_heads, num_levels=cfg.num_levels, num_points=cfg.num_points,
                         ffn_dim=cfg.ffn_dim) for _ in range(cfg.dec_layers)])
        self.ref_point_head = mlp([2 * D, D, D])   # box sine code (4 x D/2) -> query_pos
        self.norm = nn.LayerNorm(D)                # one norm shared by all layers' outputs
        self.class_head, self.box_head = class_head, box_head

    def forward(self, tgt, *, ref_logit, memory, spatial_shapes, padding_mask, ratios, attn_mask):
        """tgt (B, T, D) content queries, ref_logit (B, T, 4) anchors in logit space (detached) ->
        logits (Ldec, B, T, K), boxes (Ldec, B, T, 4) normalised cxcywh."""
        ref = ref_logit.sigmoid()                                   # b_0, (B, T, 4)
        refined = ref                                               # b'_{i-1}; for layer 0 the anchors themselves
        scale = torch.cat([ratios, ratios], dim=-1)[:, None]        # (B, 1, L, 4)
        logits, boxes = [], []
        for layer in self.layers:
            ref_in = ref[:, :, None] * scale                        # (B, T, L, 4) the box in each padded level
            sine = box_sine_embedding(ref_in[:, :, 0], num_feats=tgt.shape[-1] // 2)    # (B, T, 2D) y, x, w, h
            tgt = layer(tgt, query_pos=self.ref_point_head(sine), reference=ref_in, memory=memory,
                        spatial_shapes=spatial_shapes, padding_mask=padding_mask, attn_mask=attn_mask)
            hs = self.norm(tgt)
            delta = self.box_head(hs)                               # Delta_i, (B, T, 4)
            boxes.append((delta + inverse_sigmoid(refined)).sigmoid())      # b_i^pred: looks back to layer i - 1
            logits.append(self.class_head(hs))                      # (B, T, K)
            refined = (delta + inverse_sigmoid(ref)).sigmoid()      # b'_i: gradient reaches Delta_i only
            ref = refined.detach()                                  # b_i
        return torch.stack(logits), torch.stack(boxes)              # (Ldec, B, T, K), (Ldec, B, T, 4)


# -- 9.8 Exact assignment and the Hungarian matcher --
def linear_sum_assignment(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact minimum-cost assignment of a rectangular (n, m) matrix: min(n, m) pairs, no row or column twice.

    Shortest augmenting paths with dual potentials (Jonker-Volgenant; the variant of Crouse 2016 that scipy's
    `linear_sum_assignment` uses): each row in turn is joined by a Dijkstra search on the reduced costs
    cost[i, j] - u[i] - v[j] >= 0, then the duals are updated so that all reduced costs stay non-negative and are
    zero on the current assignment, which is therefore optimal for the rows added so far.
    Returns (rows, cols) sorted by row, as scipy does. O(n^2 m) with n = min(n, m).
    """
    cost = np.asarray(cost, dtype=np.float64)
    if cost.ndim != 2:
        raise ValueError(f"linear_sum_assignment: cost must be a 2-d matrix, got shape {cost.shape}")
    if not np.isfinite(cost).all():
        raise ValueError("linear_sum_assignment: cost has NaN or inf entries (non-finite predicted boxes or logits?)")
    transposed = cost.shape[0] > cost.shape[1]
    if transposed:                                   # more rows than columns: assign the columns instead
        cost = cost.T
    n, m = cost.shape
    u, v = np.zeros(n), np.zeros(m)                  # dual potentials of rows and columns
    col4row, row4col = np.full(n, -1), np.full(m, -1)
    for start in range(n):
        shortest = np.full(m, np.inf)                # shortest alternating-path cost to each column
        path = np.full(m, -1)                        # row preceding each column on that path
        rows_seen, cols_seen = np.zeros(n, bool), np.zeros(m, bool)
        i, min_val, sink = start, 0.0, -1
        while sink < 0:
            rows_seen[i] = True
            reduced = min_val + cost[i] - u[i] - v   # (m,)
            better = ~cols_seen & (reduced < shortest)
            path[better], shortest[better] = i, reduced[better]
            open_cols = np.flatnonzero(~cols_seen)
            lowest = shortest[open_cols].min()
            ties = open_cols[shortest[open_cols] == lowest]
            free = ties[row4col[ties] < 0]           # prefer an unassigned column: the path ends there
            j = free[0] if len(free) else ties[0]
            min_val, cols_seen[j] = lowest, True
            if row4col[j] < 0:
                sink = j
            else:
                i = row4col[j]
        u[start] += min_val                          # dual update keeps reduced costs >= 0, = 0 on the matching
        others = rows_seen.copy()
        others[start] = False
        u[others] += min_val - shortest[col4row[others]]
        v[cols_seen] -= min_val - shortest[cols_seen]
        j = sink                                     # flip the alternating path back to the start row
        while True:
            i = path[j]
            row4col[j] = i
            col4row[i], j = j, col4row[i]
            if i == start:
                break
    if transposed:
        order = np.argsort(col4row)
        return col4row[order], order
    return np.arange(n), col4row


@torch.no_grad()
def hungarian_match(logits: torch.Tensor, boxes: torch.Tensor, targets: list[dict]) -> list[tuple]:
    """DETR Eq. 1 with DINO's costs: C = 2 focal-class + 5 L1(cxcywh) + 2 (-GIoU), solved exactly per image.

    logits (B, Q, K), boxes (B, Q, 4) normalised cxcywh; targets per image {"labels" (n,) 0..K-1, "boxes" (n, 4)}.
    Returns per image (query_idx (k,), gt_idx (k,)) int64 with k = min(Q, n). The cost is computed for the whole
    batch at once (one matrix B Q x sum n, as DETR) and each image reads its own block.
    """
    B, Q, K = logits.shape
    sizes = [len(t["labels"]) for t in targets]
    empty = torch.zeros(0, dtype=torch.int64)
    if sum(sizes) == 0:
        return [(empty, empty) for _ in range(B)]
    prob = logits.flatten(0, 1).float().sigmoid()                                   # (B Q, K)
    out_boxes = boxes.flatten(0, 1).float()                                         # (B Q, 4)
    tgt_labels = torch.cat([t["labels"] for t in targets])                         # (N,)
    tgt_boxes = torch.cat([t["boxes"] for t in targets]).float()                   # (N, 4)
    # focal cost: the focal loss of calling the GT class positive minus that of calling it negative
    pos = FOCAL_ALPHA * (1 - prob) ** FOCAL_GAMMA * -(prob + 1e-8).log()
    neg = (1 - FOCAL_ALPHA) * prob ** FOCAL_GAMMA * -(1 - prob + 1e-8).log()
    cost_class = (pos - neg)[:, tgt_labels]                                         # (B Q, N)
    cost_bbox = torch.cdist(out_boxes, tgt_boxes, p=1)                              # (B Q, N)
    cost_giou = -generalized_box_iou(cxcywh_to_xyxy(out_boxes), cxcywh_to_xyxy(tgt_boxes))   # (B Q, N)
    C = MATCH_COST["bbox"] * cost_bbox + MATCH_COST["ce"] * cost_class + MATCH_COST["giou"] * cost_giou
    C = C.view(B, Q, -1).cpu()                                                      # (B, Q, N)
    result = []
    for b, c in enumerate(C.split(sizes, dim=-1)):                                  # B x (B, Q, n_b)
        rows, cols = linear_sum_assignment(c[b].numpy())
        result.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
    return result


# -- 9.9 Losses --
def set_losses(logits: torch.Tensor, boxes: torch.Tensor, targets: list[dict], indices: list[tuple], *,
               num_boxes: float) -> dict:
    """One prediction set's losses (DETR Eq. 2, focal classification as Deformable DETR / DINO), each a SUM divided
    by num_boxes, not a mean over elements: focal over all queries x classes (matched: GT class one-hot, others
    all-zero "no object"), L1 on normalised cxcywh and 1 - GIoU of the matched pairs."""
    device = logits.device
    batch_idx = torch.cat([torch.full_like(q, b) for b, (q, _) in enumerate(indices)]).to(device)    # (k,)
    query_idx = torch.cat([q for q, _ in indices]).to(device)                                         # (k,)
    gt_labels = torch.cat([t["labels"][g.to(device)] for t, (_, g) in zip(targets, indices)])         # (k,)
    gt_boxes = torch.cat([t["boxes"][g.to(device)] for t, (_, g) in zip(targets, indices)])           # (k, 4)
    onehot = torch.zeros_like(logits)
    onehot[batch_idx, query_idx, gt_labels] = 1.0
    loss_ce = sigmoid_focal_loss(logits, onehot, alpha=FOCAL_ALPHA, gamma=FOCAL_GAMMA, reduction="sum")
    src = boxes[batch_idx, query_idx]                                                                 # (k, 4)
    loss_bbox = F.l1_loss(src, gt_boxes, reduction="sum")
    loss_giou = generalized_box_iou_loss(cxcywh_to_xyxy(src), cxcywh_to_xyxy(gt_boxes), reduction="sum")
    return {"ce": loss_ce / num_boxes, "bbox": loss_bbox / num_boxes, "giou": loss_giou / num_boxes}


def dn_indices(targets: list[dict], *, num_groups: int, group_size: int) -> list[tuple]:
    """Fixed DN assignment (no matching): positive slot g group_size + j <-> GT j. Negatives and padding slots are
    unmatched, i.e. trained as "no object" and without box loss."""
    result = []
    for t in targets:
        gt = torch.arange(len(t["labels"]))                                                 # (n,)
        slots = torch.arange(num_groups)[:, None] * group_size + gt[None, :]               # (groups, n)
        result.append((slots.flatten(), gt.repeat(num_groups)))                            # (groups n,) each
    return result


def _num_boxes(targets: list[dict], device) -> float:
    """GTs per process, averaged over processes (so every rank normalises the same way), at least 1."""
    n = torch.tensor(float(sum(len(t["labels"]) for t in targets)), device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(n)
        n = n / dist.get_world_size()
    return max(n.item(), 1.0)


def dino_losses(out: dict, targets: list[dict]) -> dict:
    """All loss sets with DINO's weights: the last decoder layer (`loss_ce`, ...), every earlier layer (`_0`, `_1`,
    ...), the encoder top-k output (`_enc`) and the DN part of every layer (`_dn`, `_dn_0`, ...; normalised by
    num_boxes x groups). Returns {"loss": weighted sum} plus each unweighted term, detached, for logging."""
    num_boxes = _num_boxes(targets, out["logits"].device)
    n_layers = out["logits"].shape[0]
    terms = {}
    sets = [(out["enc_logits"], out["enc_boxes"], "_enc")]
    sets += [(out["logits"][i], out["boxes"][i], "" if i == n_layers - 1 else f"_{i}") for i in range(n_layers)]
    for logits, boxes, suffix in sets:
        indices = hungarian_match(logits, boxes, targets)
        for k, v in set_losses(logits, boxes, targets, indices, num_boxes=num_boxes).items():
            terms[f"loss_{k}{suffix}"] = v
    groups = out["dn_groups"]
    for i in range(n_layers):
        suffix = "_dn" + ("" if i == n_layers - 1 else f"_{i}")
        if groups == 0:                  # no GT in the batch: no DN queries this step, constant zero terms
            dn = {k: out["logits"].new_zeros(()) for k in LOSS_WEIGHT}
        else:
            indices = dn_indices(targets, num_groups=groups, group_size=out["dn_group_size"])
            dn = set_losses(out["dn_logits"][i], out["dn_boxes"][i], targets, indices, num_boxes=num_boxes * groups)
        for k, v in dn.items():
            terms[f"loss_{k}{suffix}"] = v
    total = sum(LOSS_WEIGHT[name.split("_")[1]] * v for name, v in terms.items())
    return {"loss": total, **{k: v.detach() for k, v in terms.items()}}


# -- 9.10 Post-processing --
def dino_postprocess(logits: torch.Tensor, boxes: torch.Tensor, image_sizes: list[tuple[int, int]], *,
                     num_select: int) -> list[dict]:
    """Top-k over all (query, class) pairs of sigmoid scores, no NMS: one query may appear with several labels.

    logits (B, Q, K), boxes (B, Q, 4) normalised cxcywh of the last layer; image_sizes [(h, w)] unpadded.
    Returns per image {"boxes" (k, 4) xyxy input pixels, clipped to the image, "scores" (k,), "labels" (k,) 1..K}.
    """
    B, Q, K = logits.shape
    k = min(num_select, Q * K)
    scores, idx = logits.sigmoid().flatten(1).topk(k, dim=1)                        # (B, k) over Q x K
    query = torch.div(idx, K, rounding_mode="floor")                                # (B, k)
    xyxy = cxcywh_to_xyxy(boxes).gather(1, query[..., None].expand(-1, -1, 4))      # (B, k, 4)
    results = []
    for b, (h, w) in enumerate(image_sizes):
        scale = torch.tensor([w, h, w, h], dtype=xyxy.dtype, device=xyxy.device)
        results.append({"boxes": clip_boxes_to_image(xyxy[b] * scale, (h, w)), "scores": scores[b],
                        "labels": idx[b] % K + 1})                                  # back to 1..K
    return results


# -- 9.11 The DINO head --
def normalise_targets(targets: list[dict], *, image_sizes: list[tuple[int, int]], num_classes: int) -> list[dict]:
    """Targets in (labels 1..K, xyxy input pixels) -> inside the head (labels 0..K-1, cxcywh / unpadded size)."""
    if len(targets) != len(image_sizes):
        raise ValueError(f"DINOHead: {len(targets)} target dicts for {len(image_sizes)} images; pass one per image")
    result = []
    for t, (h, w) in zip(targets, image_sizes):
        labels, boxes = t["labels"], t["boxes"]
        if boxes.ndim != 2 or boxes.shape[-1] != 4 or len(boxes) != len(labels):
            raise ValueError(f"DINOHead: target boxes must be (n, 4) with n = len(labels), got {tuple(boxes.shape)} "
                             f"for {len(labels)} labels")
        if len(labels) and (labels.min() < 1 or labels.max() > num_classes):
            raise ValueError(f"DINOHead: target labels must lie in 1..{num_classes} (0 is never a class), got "
                             f"{labels.min().item()}..{labels.max().item()}")
        if len(boxes) and not (torch.isfinite(boxes).all() and (boxes[:, 2:] >= boxes[:, :2]).all()):
            raise ValueError("DINOHead: target boxes must be finite xyxy in input pixels with x2 >= x1, y2 >= y1")
        scale = torch.tensor([w, h, w, h], dtype=torch.float32, device=boxes.device)
        result.append({"labels": labels.long() - 1,
                       "boxes": box_convert(boxes.float() / scale, in_fmt="xyxy", out_fmt="cxcywh")})
    return result


class DINOHead(nn.Module):
    """DINO on a feature pyramid: input projection, deformable encoder, mixed query selection, CDN, decoder, losses.

    DINOHead(in_channels, *, num_classes, cfg): in_channels lists the channels of the given maps, fine to coarse;
    cfg.num_levels - len(in_channels) extra levels are made by stride-2 3x3 convs (DINO-4scale: strides 8, 16, 32
    from the backbone + 64 from the conv).
    forward(features, *, pad_mask, image_sizes, targets=None):
        features: list of (B, C_l, H_l, W_l), fine to coarse; pad_mask (B, H, W) bool at input resolution, True =
        padding; image_sizes [(h, w)] of the unpadded images; targets per image {"labels" (n,) in 1..K,
        "boxes" (n, 4) xyxy input pixels}.
        train mode -> {"loss": weighted sum, "loss_ce", "loss_bbox", "loss_giou", ..._0.., _enc, _dn...: logs};
        eval mode  -> per image {"boxes" (k, 4) xyxy px, "scores" (k,), "labels" (k,) in 1..K}, k = num_select.
    """

    def __init__(self, in_channels: list[int], *, num_classes: int, cfg: DINOConfig):
        super().__init__()
        D, L = cfg.d_model, cfg.num_levels
        if D % cfg.num_heads or D % 32:
            raise ValueError(f"DINOConfig: d_model={D} must be divisible by num_heads={cfg.num_heads} and by 32 "
                             "(GroupNorm(32) in the input projection)")
        if not 1 <= len(in_channels) <= L:
            raise ValueError(f"DINOHead: got {len(in_channels)} input levels for num_levels={L}; pass at most "
                             "num_levels maps (extra levels are made by stride-2 convs) or raise num_levels")
        self.cfg, self.num_classes, self.in_channels = cfg, num_classes, list(in_channels)
        # Deformable DETR App. A.2: 1x1 conv + GroupNorm per given level; 3x3 stride-2 convs for the extra levels,
        # the first on the raw coarsest map, the next ones on the previous extra level
        self.input_proj = nn.ModuleList([nn.Sequential(nn.Conv2d(c, D, 1), nn.GroupNorm(32, D)) for c in in_channels])
        self.extra_proj = nn.ModuleList([
            nn.Sequential(nn.Conv2d(in_channels[-1] if i == 0 else D, D, 3, stride=2, padding=1), nn.GroupNorm(32, D))
            for i in range(L - len(in_channels))])
        self.level_embed = nn.Parameter(torch.zeros(L, D))      # e_l of Sec. 4.1, added to the sine positions
        self.encoder = nn.ModuleList([
            EncoderLayer(D, num_heads=cfg.num_heads, num_levels=L, num_points=cfg.num_points, ffn_dim=cfg.ffn_dim)
            for _ in range(cfg.enc_layers)])
        class_head, box_head = nn.Linear(D, num_classes), mlp([D, D, D, 4])
        self.decoder = Decoder(cfg, class_head=class_head, box_head=box_head)
        self.query_selection = QuerySelection(D, class_head=copy.deepcopy(class_head), box_head=copy.deepcopy(box_head))
        self.tgt_embed = nn.Embedding(cfg.num_queries, D)       # learned content queries (Sec. 3.4 "mixed")
        self.label_enc = nn.Embedding(num_classes, D)           # content of DN queries: embedding of the noised label
        self.reset_parameters()

    def reset_parameters(self):
        """Official init: xavier for every matrix of the transformer, then the special cases."""
        for module in (self.encoder, self.decoder, self.query_selection):
            for p in module.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()
        nn.init.normal_(self.level_embed)
        nn.init.normal_(self.tgt_embed.weight)
        for proj in list(self.input_proj) + list(self.extra_proj):
            nn.init.xavier_uniform_(proj[0].weight)
            nn.init.zeros_(proj[0].bias)
        for heads in (self.decoder, self.query_selection):
            nn.init.constant_(heads.class_head.bias, -math.log((1 - PRIOR_PROB) / PRIOR_PROB))
            nn.init.zeros_(heads.box_head[-1].weight)           # first prediction = the reference box itself
            nn.init.zeros_(heads.box_head[-1].bias)

    def _check_inputs(self, features, pad_mask, image_sizes):
        if len(features) != len(self.in_channels):
            raise ValueError(f"DINOHead: got {len(features)} feature maps, built for {len(self.in_channels)} "
                             f"(in_channels={self.in_channels})")
        got = [f.shape[1] for f in features]
        if got != self.in_channels:
            raise ValueError(f"DINOHead: feature channels {got} differ from in_channels={self.in_channels}")
        B = features[0].shape[0]
        if pad_mask.dtype != torch.bool or pad_mask.dim() != 3 or pad_mask.shape[0] != B:
            raise ValueError(f"DINOHead: pad_mask must be a (B={B}, H, W) bool tensor (True = padding), got "
                             f"{pad_mask.dtype} {tuple(pad_mask.shape)}")
        if len(image_sizes) != B:
            raise ValueError(f"DINOHead: {len(image_sizes)} image_sizes for a batch of {B}")

    def project(self, features, pad_mask):
        """Input projection to D channels, extra levels, and each level's padding mask (nearest-resized)."""
        srcs = [proj(f) for proj, f in zip(self.input_proj, features)]           # (B, D, H_l, W_l) each
        for i, proj in enumerate(self.extra_proj):
            srcs.append(proj(features[-1] if i == 0 else srcs[-1]))               # (B, D, ceil(H/2), ceil(W/2))
        masks = [F.interpolate(pad_mask[None].float(), size=s.shape[-2:])[0].bool() for s in srcs]   # (B, H_l, W_l)
        return srcs, masks

    def forward_outputs(self, features, *, pad_mask, dn_targets=None) -> dict:
        """Raw outputs: "logits" (Ldec, B, Q, K), "boxes" (Ldec, B, Q, 4) normalised cxcywh, "enc_logits" /
        "enc_boxes" (B, Q, .), and with dn_targets (internal format) "dn_logits" / "dn_boxes" (Ldec, B, N_dn, .),
        "dn_groups", "dn_group_size" (dn_groups = 0: no denoising queries)."""
        cfg = self.cfg
        srcs, masks = self.project(features, pad_mask)
        spatial_shapes = [tuple(s.shape[-2:]) for s in srcs]
        pos = [sine_position_embedding(m, num_feats=cfg.d_model // 2) + self.level_embed[lvl].view(1, -1, 1, 1)
               for lvl, m in enumerate(masks)]                                     # (B, D, H_l, W_l) each
        src = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], dim=1)      # (B, S, D)
        pos = torch.cat([p.flatten(2).transpose(1, 2) for p in pos], dim=1)       # (B, S, D)
        mask = torch.cat([m.flatten(1) for m in masks], dim=1)                    # (B, S)
        if mask.shape[1] < cfg.num_queries:
            raise ValueError(f"DINOHead: {mask.shape[1]} encoder tokens < num_queries={cfg.num_queries}; use larger "
                             "images or fewer queries")
        ratios = valid_ratios(masks)                                              # (B, L, 2)
        reference = encoder_reference_points(spatial_shapes, ratios)             # (B, S, L, 2)
        memory = src
        for layer in self.encoder:
            memory = layer(memory, pos=pos, reference=reference, spatial_shapes=spatial_shapes, padding_mask=mask)
        sel = self.query_selection(memory, padding_mask=mask, spatial_shapes=spatial_shapes,
                                   num_queries=cfg.num_queries)
        B = memory.shape[0]
        tgt = self.tgt_embed.weight[None].expand(B, -1, -1)                       # (B, Q, D)
        ref_logit, attn_mask, groups, group_size = sel["anchors"], None, 0, 0
        max_gt = max(len(t["labels"]) for t in dn_targets) if dn_targets is not None else 0
        if max_gt > 0:
            groups, group_size = dn_num_groups(cfg.dn_number, max_gt), 2 * max_gt
            labels, boxes, real = cdn_queries(dn_targets, num_groups=groups, num_classes=self.num_classes,
                                              label_noise_ratio=cfg.dn_label_noise_ratio,
                                              box_noise_scale=cfg.dn_box_noise_scale)
            dn_tgt = self.label_enc(labels) * real[..., None]                     # (B, N_dn, D) padding: zeros
            tgt = torch.cat([dn_tgt, tgt], dim=1)                                 # (B, T, D)
            ref_logit = torch.cat([inverse_sigmoid(boxes), ref_logit], dim=1)     # (B, T, 4)
            attn_mask = dn_attention_mask(num_groups=groups, group_size=group_size, num_queries=cfg.num_queries,
                                          device=tgt.device)                      # (T, T)
        logits, boxes = self.decoder(tgt, ref_logit=ref_logit, memory=memory, spatial_shapes=spatial_shapes,
                                     padding_mask=mask, ratios=ratios, attn_mask=attn_mask)
        n_dn = groups * group_size
        return {"logits": logits[:, :, n_dn:], "boxes": boxes[:, :, n_dn:],         # (Ldec, B, Q, .)
                "dn_logits": logits[:, :, :n_dn], "dn_boxes": boxes[:, :, :n_dn],   # (Ldec, B, N_dn, .)
                "enc_logits": sel["logits"], "enc_boxes": sel["boxes"], "dn_groups": groups,
                "dn_group_size": group_size}

    def forward(self, features: list[torch.Tensor], *, pad_mask: torch.Tensor, image_sizes: list[tuple[int, int]],
                targets: list[dict] | None = None):
        self._check_inputs(features, pad_mask, image_sizes)
        if not self.training:
            out = self.forward_outputs(features, pad_mask=pad_mask)
            return dino_postprocess(out["logits"][-1], out["boxes"][-1], image_sizes, num_select=self.cfg.num_select)
        if targets is None:
            raise ValueError("DINOHead in train mode needs targets; call .eval() to get detections")
        targets = normalise_targets(targets, image_sizes=image_sizes, num_classes=self.num_classes)
        losses = dino_losses(self.forward_outputs(features, pad_mask=pad_mask, dn_targets=targets), targets)
        # a batch without GT has no DN queries; keep label_enc in the graph so DDP (find_unused_parameters=False)
        # sees a gradient for every parameter on every step (official `dino.py` does the same)
        losses["loss"] = losses["loss"] + 0.0 * self.label_enc.weight.sum()
        return losses


# ---- 10. Backbones -> dense features ---------------------------------------------------------------------------------

DET_LEVELS = ("p4", "p8", "p16", "p32", "p64")   # Mask R-CNN: RPN on all five, RoIAlign on p4..p32
DINO_LEVELS = ("p8", "p16", "p32")               # DINO-4scale: strides 8-32 + one extra stride-2 conv level


class DenseModel(nn.Module):
    """A backbone that gives pyramid maps, and one head: forward(images, pad_mask, image_sizes, targets) -> the head's.

    iTPN / Fast-iTPN: the pre-trained pyramid itself is the neck (`forward_pyramid`, itpn.py section 4): "seg" maps
    p4..p32 are each level concatenated with the backbone feature of its stride, "det" maps p4..p64 are F channels
    each (the official detectors have no extra FPN). HiViT / plain ViT: ViTDet's simple feature pyramid on the
    stride-16 tokens (section 5), so plain and hierarchical backbones reach the same heads.
    """

    def __init__(self, backbone: nn.Module, *, neck: nn.Module | None, head: nn.Module, task: str, head_name: str):
        super().__init__()
        self.backbone, self.neck, self.head, self.task, self.head_name = backbone, neck, head, task, head_name

    def freeze_unread(self) -> list[str]:
        """Freeze the backbone / neck parameters whose outputs the head never reads, and return their names.

        DINO-4scale reads p8..p32, so the pyramid's stride-4 branch (and the simple pyramid's p4 / p64 convs) get no
        gradient; DDP requires every trained parameter to get one. Found by one backward from the read maps of a
        minimum-size input, so it holds for every backbone without listing their modules."""
        read = DET_LEVELS if self.head_name == "maskrcnn" else DINO_LEVELS if self.head_name == "dino" else None
        if read is None:
            return []
        trunk = [m for m in (self.backbone, self.neck) if m is not None]
        side = itpn.DENSE_MIN_SIZE["det"]
        x = torch.zeros(1, 3, side, side, device=next(self.parameters()).device)
        with torch.enable_grad():
            maps = self.maps(x)
            sum(maps[k].sum() for k in read).backward()
        frozen = [n for m in trunk for n, p in m.named_parameters() if p.requires_grad and p.grad is None]
        for m in trunk:
            for n, p in m.named_parameters():
                p.requires_grad_(p.requires_grad and p.grad is not None)
                p.grad = None
        return frozen

    def maps(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, 3, H, W), H and W multiples of the coarsest stride -> {"p4": (B, c, H/4, W/4), ...}."""
        if self.neck is None:
            return self.backbone.forward_pyramid(images, mode=self.task)
        tokens = self.backbone.forward_features(images)[-1]              # (B, N, C) stride-16 tokens
        return self.neck(tokens, grid_hw=(images.shape[-2] // 16, images.shape[-1] // 16))

    def forward(self, images, *, pad_mask, image_sizes, targets=None):
        maps = self.maps(images)
        if self.head_name == "uperhead":
            return self.head(maps)
        if self.head_name == "maskrcnn":
            return self.head([maps[k] for k in DET_LEVELS], image_sizes=image_sizes, targets=targets)
        return self.head([maps[k] for k in DINO_LEVELS], pad_mask=pad_mask, image_sizes=image_sizes,
                         targets=targets)


def build_backbone(model: str, cfg) -> tuple[nn.Module, nn.Module | None, list[int]]:
    """(backbone, neck or None, channels of p4..p32) for --model, without a classification head."""
    family, preset = DENSE_MODELS[model]
    if family in ("itpn", "fast_itpn"):
        arch = replace(preset, num_classes=0, drop_path_rate=cfg.drop_path)
        if family == "fast_itpn":
            arch = replace(arch, migration_ratio=cfg.migration_ratio, attention=cfg.attention)
            backbone = fast_itpn.FastiTPN(arch)
        else:
            backbone = itpn.iTPN(arch)
        c, f = arch.embed_dim, arch.fpn_dim
        widths = [f + c // 4, f + c // 2, f + c, f + c] if cfg.task == "seg" else [f] * 4   # itpn.pyramid_maps
        return backbone, None, widths
    if family == "vit":
        backbone = hivit.VisionTransformer(replace(preset, num_classes=0, drop_path_rate=cfg.drop_path))
    else:
        backbone = hivit.HiViT(replace(preset, num_classes=0, drop_path_rate=cfg.drop_path))
    fpn_dim = UPER_PRESETS["tiny" if model.endswith("_tiny") else "paper"].fpn_dim
    neck = SimpleFeaturePyramid(preset.embed_dim, out_dim=fpn_dim, with_p64=cfg.task == "det")
    return backbone, neck, [fpn_dim] * 4


def build_head(cfg, *, widths: list[int], num_classes: int, tiny: bool) -> nn.Module:
    preset = "tiny" if tiny else "paper"
    if cfg.head == "uperhead":
        return UPerHead(widths, num_classes=num_classes, cfg=UPER_PRESETS[preset])
    if cfg.head == "maskrcnn":
        return MaskRCNNLite(widths[0], num_classes=num_classes, strides=(4, 8, 16, 32, 64),
                            cfg=MASKRCNN_PRESETS[preset])
    return DINOHead([widths[0]] * len(DINO_LEVELS), num_classes=num_classes, cfg=DINO_PRESETS[preset])


def load_backbone(model: DenseModel, cfg) -> None:
    """--finetune into the backbone (and its pyramid); --pyramid random re-initialises the pyramid afterwards.

    A released det / seg backbone (--model itpn_b_det, ...) reads its official file with itpn.load_official
    (strict, outputs identical to the official forward); everything else goes through finetune.py's converter."""
    if cfg.finetune and cfg.model in itpn.DENSE_PRESETS:
        ignored = itpn.load_official(model.backbone, hivit.read_checkpoint(cfg.finetune, what="--finetune"))
        print0(f"--finetune: the official {cfg.model} layout, loaded strictly ({len(ignored)} keys of its heads "
               f"ignored)")
    elif cfg.finetune:
        load_pretrained(model.backbone, read_pretrained(cfg.finetune), model_name=cfg.model)
    if cfg.pyramid == "random":
        if getattr(model.backbone, "pyramid", None) is None:
            raise ConfigError(f"--pyramid random: --model {cfg.model} has no pre-trained pyramid (only iTPN and "
                              f"Fast-iTPN do); its simple feature pyramid always starts fresh")
        model.backbone.pyramid.apply(hivit.init_weights)                 # the ablation: a fresh pyramid (Sec. 4.3)
        print0("--pyramid random: the feature pyramid starts from its random init")


# ---- 11. The dense task: data, loss, evaluation, pictures ------------------------------------------------------------

def step_lr(step: int, *, lr: float, warmup_steps: int, milestones: tuple[int, ...]) -> float:
    """mmdet's step schedule: linear warm-up from 0, then lr x 0.1 at every milestone step passed."""
    if step < warmup_steps:
        return lr * step / warmup_steps
    return lr * 0.1 ** sum(step >= m for m in milestones)


def dense_schedule(cfg: DenseConfig, *, lr: float, steps_per_epoch: int):
    """step -> lr: poly with warm-up for segmentation (mmseg), steps at 2/3 and 11/12 of training for Mask R-CNN
    (epochs 8 and 11 of 12, mmdet 1x; 27 and 33 of 36 with --schedule 3x), at 11/12 for DINO."""
    warmup, total = round(cfg.warmup_epochs * steps_per_epoch), cfg.epochs * steps_per_epoch
    if cfg.task == "seg":
        return lambda step: poly_lr(step, lr=lr, warmup_steps=warmup, total_steps=total, min_lr=cfg.min_lr)
    fractions = {"1x": (2 / 3, 11 / 12), "3x": (3 / 4, 11 / 12)}[cfg.schedule] if cfg.head == "maskrcnn" else (11 / 12,)
    milestones = tuple(round(f * cfg.epochs) * steps_per_epoch for f in fractions)
    return lambda step: step_lr(step, lr=lr, warmup_steps=warmup, milestones=milestones)


def dense_param_groups(model: DenseModel, cfg: DenseConfig) -> list[dict]:
    """finetune.py's layer-decay groups for the backbone (official ids; the pyramid counts as the top layer),
    MAE-style decay groups for the neck and head; DINO's backbone at lr / 10."""
    family, preset = DENSE_MODELS[cfg.model]
    groups = layer_decay_groups(model.backbone, family=family, cfg=preset, weight_decay=cfg.weight_decay,
                                layer_decay=cfg.layer_decay)
    for g in groups:
        g["lr_scale"] *= BACKBONE_LR.get(cfg.head, 1.0)
    rest = nn.ModuleList([m for m in (model.neck, model.head) if m is not None])
    return groups + param_groups(rest, cfg.weight_decay)


def det_scales(cfg: DenseConfig) -> list[tuple[int, int]]:
    """(long, short) resize limits of detection training: (5/3 x S, S) for S = --input_size (mmdet's (1333, 800)),
    with --schedule 3x 11 short sides evenly from 0.6 S to S (480, 512, ..., 800 at 800: multi-scale training)."""
    shorts = [cfg.input_size] if cfg.schedule == "1x" else [round(cfg.input_size * (0.6 + 0.04 * k)) for k in range(11)]
    return [(round(cfg.input_size * 5 / 3), short) for short in shorts]


class DenseData:
    """Train and val splits of the task's data, each a (dataset, categories) pair, and their transforms."""

    def __init__(self, cfg: DenseConfig):
        scale = (round(cfg.input_size * 5 / 3), cfg.input_size)           # (long, short) side limits
        if cfg.data_path is None:
            task = "seg" if cfg.task == "seg" else "det"
            # the same images for every --seed (as finetune.py): seeds vary the training, not the data
            self.train = ShapesDataset(cfg.num_images, image_size=cfg.input_size, seed=0, task=task)
            self.val = ShapesDataset(max(4, cfg.num_images // 4), image_size=cfg.input_size, seed=0, split="val",
                                     task=task)
            names = list(SHAPE_CLASSES)
            self.categories = [{"id": k + 1, "name": n} for k, n in enumerate(names)]
            self.num_classes = len(names) + (1 if cfg.task == "seg" else 0)   # seg: class 0 = background
            self.class_names = (["background"] + names) if cfg.task == "seg" else names
        elif cfg.task == "seg":
            self.train = ADE20KDataset(cfg.data_path, split="training")
            self.val = ADE20KDataset(cfg.data_path, split="validation")
            self.num_classes, self.categories = ADE20K_NUM_CLASSES, None
            self.class_names = [str(k) for k in range(ADE20K_NUM_CLASSES)]
        else:
            self.train = CocoDataset(cfg.data_path, split="train2017")
            self.val = CocoDataset(cfg.data_path, split="val2017")
            self.categories = self.val.categories
            self.num_classes, self.class_names = len(self.categories), [c["name"] for c in self.categories]
        if cfg.task == "seg":
            self.train_transform = SegTrainTransform(crop_size=cfg.input_size, scale=(4 * cfg.input_size,
                                                                                       cfg.input_size))
            self.eval_transform = EvalTransform(scale=(4 * cfg.input_size, cfg.input_size))
        else:
            self.train_transform = DetTrainTransform(scales=det_scales(cfg))
            self.eval_transform = EvalTransform(scale=scale)


def dense_collate(batch: list, *, stride: int, train: bool):
    """SeededViews items (x, target, skipped) -> ((images, pad_mask, image_sizes), targets, skipped (B,))."""
    images, pad_mask, sizes, targets = pad_collate([(x, t) for x, t, _ in batch], stride=stride, pad_targets=train)
    return (images, pad_mask, sizes), targets, torch.tensor([s for _, _, s in batch])


def rescale_prediction(pred: dict, *, input_size: tuple[int, int], orig_size: tuple[int, int]) -> dict:
    """Detections in the resized input frame -> original image pixels (boxes scaled, masks resized, > 0.5)."""
    (h, w), (h0, w0) = input_size, orig_size
    out = {k: v.detach().cpu() for k, v in pred.items()}
    out["boxes"] = out["boxes"] * torch.tensor([w0 / w, h0 / h, w0 / w, h0 / h])
    if "masks" in out:
        masks = out["masks"][:, None].float()                             # (k, 1, h, w)
        out["masks"] = F.interpolate(masks, size=(h0, w0), mode="bilinear", align_corners=False)[:, 0] > 0.5
    return out


def evaluated_only(gt: dict, image_ids: set) -> dict:
    """A COCO gt dict restricted to the images that were evaluated (an unreadable val image is left out of the
    metric instead of counting its objects as missed)."""
    return {**gt, "images": [im for im in gt["images"] if im["id"] in image_ids],
            "annotations": [a for a in gt["annotations"] if a["image_id"] in image_ids]}


PICTURE_SIDE = 256        # px: built-in 64-px images are drawn 4x larger, so labels and scores can be read


class DenseTask:
    """The task train.Trainer drives for segmentation and detection (the *task* interface of train.py)."""

    def __init__(self, model: DenseModel, data: DenseData, *, cfg: DenseConfig, dist_: Dist):
        self.model, self.data, self.cfg, self.dist = model.to(dist_.device), data, cfg, dist_
        self.stride = 32 if cfg.task == "seg" else 64                     # the coarsest level must divide the input
        self.views = SeededViews(data.train, data.train_transform, seed=cfg.seed)
        self.num_samples = len(self.views)

    def batches(self, epoch: int, skip: int):
        return epoch_loader(self.views, epoch=epoch, skip_batches=skip, batch_size=self.cfg.batch_size,
                            dist_=self.dist, num_workers=self.cfg.num_workers,
                            collate_fn=partial(dense_collate, stride=self.stride, train=True))

    def to_device(self, inputs, targets):
        images, pad_mask, sizes = inputs
        dev = self.dist.device
        targets = [{k: v.to(dev) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]
        return images.to(dev, non_blocking=True), pad_mask.to(dev), sizes, targets

    def loss(self, model: nn.Module, inputs, targets) -> dict:
        images, pad_mask, sizes, targets = self.to_device(inputs, targets)
        if self.cfg.task == "seg":
            out = model(images, pad_mask=pad_mask, image_sizes=sizes)
            labels = torch.stack([t["semantic"] for t in targets])        # (B, Hp, Wp), 255 = ignore
            losses = seg_loss(out, labels, aux_weight=UPER_PRESETS["paper"].aux_weight)
        else:
            targets = [drop_crowd(t) for t in targets]
            losses = model(images, pad_mask=pad_mask, image_sizes=sizes, targets=targets)
        return {"loss": losses["loss"], "logs": {k: v.detach() for k, v in losses.items() if k != "loss"}}

    def after_step(self, progress: float) -> None:
        pass

    def state(self) -> dict:
        return {}

    def load_state(self, ckpt: dict) -> None:
        pass

    def end_of_epoch(self, epoch: int, *, finished: bool, last: bool) -> dict:
        if not (last or (finished and (epoch + 1) % self.cfg.eval_every == 0)):
            return {}
        record = self.evaluate()
        if self.dist.master:
            self.picture(os.path.join(self.cfg.output_dir, f"{self.cfg.task}-epoch{epoch:03d}.png"))
        return record

    # -- evaluation on the val split, shared out over the ranks --

    @torch.no_grad()
    def predict(self, x: torch.Tensor, target: dict):
        """(prediction, target) of one val item (x, target) at its original resolution: a label map (H, W) for seg,
        a detection dict (boxes in original pixels, masks resized) for det. The model must be in eval mode."""
        orig = tuple(int(s) for s in target["orig_size"])
        dev = self.dist.device
        if self.cfg.task == "seg":
            def logits_fn(images):
                return self.model(images, pad_mask=None, image_sizes=None)["logits"]   # (B, K, h/4, w/4)
            paper = UPER_PRESETS["paper"]
            logits = (predict_slide(logits_fn, x[None].to(dev), out_size=orig, crop_size=paper.crop_size,
                                    crop_stride=paper.crop_stride) if self.cfg.slide else
                      predict_whole(logits_fn, x[None].to(dev), out_size=orig))   # (1, K, H, W)
            return logits[0].argmax(0).cpu(), target
        (images, pad_mask, sizes), _, _ = dense_collate([(x, target, 0)], stride=self.stride, train=False)
        pred = self.model(images.to(dev), pad_mask=pad_mask.to(dev), image_sizes=sizes)[0]
        return rescale_prediction(pred, input_size=sizes[0], orig_size=orig), target

    def predictions(self):
        """This rank's share of the val split, every readable image exactly once: yields (index, prediction,
        target). An image that cannot be read is left out of the metric with a warning (SeededViews would hand
        over a neighbour in its place, which would then count twice)."""
        views = SeededViews(self.data.val, self.data.eval_transform, seed=self.cfg.seed)
        for i in range(self.dist.rank, len(views), self.dist.world_size):
            x, target, skipped = views[i]
            if skipped:
                warnings.warn(f"val image {i} cannot be read: left out of the evaluation", stacklevel=2)
                continue
            yield (i, *self.predict(x, target))

    def evaluate(self) -> dict:
        if self.dist.ddp:                       # rank 0's BatchNorm statistics (the checkpoint's) on every rank:
            for buffer in self.model.buffers():  # the last CPU step updated each rank's copy with its own batch
                dist.broadcast(buffer, src=0)
        with eval_mode(self.model):
            return self.evaluate_seg() if self.cfg.task == "seg" else self.evaluate_det()

    def evaluate_seg(self) -> dict:
        """mIoU over the val split: per-class areas summed on each rank, then over ranks (mmseg's metric)."""
        areas = torch.zeros(3, self.data.num_classes, dtype=torch.float64)
        for _, pred, target in self.predictions():
            areas += torch.from_numpy(iou_areas([pred.numpy()], [np.asarray(target["semantic"])],
                                                self.data.num_classes))
        if self.dist.ddp:
            areas = areas.to(self.dist.device)
            dist.all_reduce(areas)
        metrics = iou_metrics(areas.cpu().numpy())
        return {"test_mIoU": 100 * metrics["mIoU"], "test_aAcc": 100 * metrics["aAcc"],
                "test_mAcc": 100 * metrics["mAcc"]}

    def evaluate_det(self) -> dict:
        """COCO box (and mask) AP over the val split: results gathered on rank 0, stats shared with every rank."""
        results, gt_targets, ids = [], [], []
        for i, pred, target in self.predictions():
            image_id = int(target["image_id"]) if "image_id" in target else i
            results += predictions_to_coco([pred], [image_id], self.data.categories)
            ids.append(image_id)
            if self.cfg.data_path is None:                                # the built-in data has no COCO json
                gt_targets.append((image_id, {k: target[k] for k in ("labels", "boxes", "masks")}))
        gathered = [None] * self.dist.world_size
        if self.dist.ddp:
            dist.all_gather_object(gathered, (results, gt_targets, ids))
        else:
            gathered = [(results, gt_targets, ids)]
        types = ("bbox", "segm") if self.cfg.head == "maskrcnn" else ("bbox",)
        stats = torch.zeros(len(types), 12, dtype=torch.float64)
        if self.dist.master:
            results = [r for part, _, _ in gathered for r in part]
            pairs = sorted((p for _, part, _ in gathered for p in part), key=lambda p: p[0])
            gt = (evaluated_only(self.data.val.coco_gt(), {i for _, _, part in gathered for i in part})
                  if self.cfg.data_path else
                  targets_to_coco_gt([t for _, t in pairs], [i for i, _ in pairs], self.data.categories))
            for row, iou_type in enumerate(types):
                stats[row] = torch.from_numpy(coco_evaluate(gt, results, iou_type))
        if self.dist.ddp:
            stats = stats.to(self.dist.device)
            dist.broadcast(stats, src=0)
        record = {}
        for row, iou_type in enumerate(types):
            record.update({f"test_{iou_type}_{name}": 100 * float(v) if v >= 0 else -1.0   # -1: no such gt
                           for name, v in zip(COCO_STAT_NAMES, stats[row])})
        return record

    def picture(self, path: str) -> None:
        """Four val images: image | label | prediction (seg), or the detections drawn over the image (det); images
        with a side below PICTURE_SIDE are enlarged by a whole factor (labels and masks by repetition)."""
        views = SeededViews(self.data.val, self.data.eval_transform, seed=self.cfg.seed)
        panels = []
        with eval_mode(self.model):
            for i in range(min(4, len(views))):
                x, target, _ = views[i]
                pred, target = self.predict(x, target)
                h, w = target["orig_size"]
                k = max(1, math.ceil(PICTURE_SIDE / min(h, w)))                # small images drawn k x larger
                image = TF.resize(denormalize(x[None])[0], [h * k, w * k], antialias=True)   # (3, kH, kW)
                if self.cfg.task == "seg":
                    label, pred = (torch.as_tensor(m).repeat_interleave(k, 0).repeat_interleave(k, 1)
                                   for m in (target["semantic"], pred))   # (kH, kW) each, nearest
                    panels.append(seg_picture(image, label, pred, self.data.num_classes))
                else:
                    pred = {**pred, "boxes": pred["boxes"] * k}
                    if "masks" in pred:
                        pred["masks"] = pred["masks"].repeat_interleave(k, -2).repeat_interleave(k, -1)   # (n, kH, kW)
                    panels.append(detection_picture(image, pred, names=self.data.class_names))
        canvas = Image.new("RGB", (max(p.width for p in panels), sum(p.height for p in panels)), "white")
        for k, p in enumerate(panels):
            canvas.paste(p, (0, sum(q.height for q in panels[:k])))
        save_image(path, canvas)


@contextmanager
def eval_mode(model: nn.Module):
    """Evaluate in eval mode (no drop path, BatchNorm statistics frozen), then restore the training mode."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def drop_crowd(target: dict) -> dict:
    """Training heads skip crowd regions (COCO iscrowd; evaluation ignores them instead)."""
    if "iscrowd" not in target or not target["iscrowd"].any():
        return target
    keep = ~target["iscrowd"].bool()
    return {k: (v[keep] if k in ("labels", "boxes", "masks", "area", "iscrowd") else v) for k, v in target.items()}


def detection_picture(image: torch.Tensor, pred: dict, *, names: list[str], min_score: float = 0.3) -> Image.Image:
    """Boxes, class names, scores and (when predicted) masks of the detections above min_score, over the image."""
    img = (image.clamp(0, 1) * 255).to(torch.uint8)                       # (3, H, W)
    keep = pred["scores"] >= min_score
    colours = [tuple(int(c) for c in seg_palette(len(names) + 1)[int(k)]) for k in pred["labels"][keep]]
    if "masks" in pred and keep.any():
        img = draw_segmentation_masks(img, pred["masks"][keep].bool(), alpha=0.4, colors=colours)
    if keep.any():
        labels = [f"{names[int(k) - 1]} {s:.2f}" for k, s in zip(pred["labels"][keep], pred["scores"][keep])]
        img = draw_bounding_boxes(img, pred["boxes"][keep], labels=labels, colors=colours, width=1)
    return to_pil_image(img)


# ---- 12. main --------------------------------------------------------------------------------------------------------

DESCRIPTION = ("Dense fine-tuning on the pyramid: semantic segmentation (UPerHead, mIoU) and detection with instance "
               "masks (Mask R-CNN-lite, DINO-style; COCO AP). Unset flags take the 'paper' recipe, or the 'demo' "
               "recipe for the *_tiny models.")


def check_dense_flags(cfg: DenseConfig, parser) -> None:
    """Flag combinations argparse cannot check."""
    if cfg.model not in DENSE_MODELS:
        parser.error(f"argument --model: invalid choice: {cfg.model!r} (choose from {', '.join(DENSE_MODELS)})")
    if cfg.head not in HEADS[cfg.task]:
        parser.error(f"--head {cfg.head} does not do --task {cfg.task}; choose {' or '.join(HEADS[cfg.task])}")
    if cfg.warmup_epochs >= cfg.epochs:
        parser.error(f"--warmup_epochs {cfg.warmup_epochs} must be below --epochs {cfg.epochs} (the schedule warms "
                     f"up, then decays): pass a smaller --warmup_epochs, e.g. 0 for a one-epoch run")
    family = DENSE_MODELS[cfg.model][0]
    if cfg.model in itpn.DENSE_PRESETS and not cfg.model.endswith(cfg.task):
        parser.error(f"--model {cfg.model} is the released {cfg.model.rsplit('_', 1)[1]} backbone; use it with "
                     f"--task {cfg.model.rsplit('_', 1)[1]}")
    if cfg.schedule == "3x" and cfg.head != "maskrcnn":
        parser.error(f"--schedule 3x is Mask R-CNN's (mmdet 3x); --head {cfg.head} takes --epochs for longer runs")
    if (cfg.migration_ratio or cfg.attention != "global") and family != "fast_itpn":
        parser.error(f"--migration_ratio / --attention are Fast-iTPN switches; --model {cfg.model} is {family}")


def prepare(cfg: DenseConfig, dist_: Dist):
    """(task, trainer, resume path) of a run; raises ConfigError on bad input (before any file is written)."""
    resume = find_checkpoint(cfg.output_dir) if cfg.resume == "auto" else cfg.resume or None
    prepare_output_dir(cfg, resuming=resume is not None or cfg.eval)
    ckpt = load_checkpoint(resume, required=("model", "optimizer", "step", "args")) if resume else None
    data = DenseData(cfg)
    torch.manual_seed(cfg.seed)
    backbone, neck, widths = build_backbone(cfg.model, cfg)
    head = build_head(cfg, widths=widths, num_classes=data.num_classes, tiny=cfg.model.endswith("_tiny"))
    model = DenseModel(backbone, neck=neck, head=head, task=cfg.task, head_name=cfg.head)
    load_backbone(model, cfg)
    unread = model.freeze_unread()
    if unread:
        print0(f"--head {cfg.head}: {len(unread)} tensors feed only maps it does not read and are frozen "
               f"({', '.join(sorted({'.'.join(n.split('.')[:2]) for n in unread}))})")
    if dist_.ddp and cfg.head == "uperhead" and dist_.device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)           # the papers' SyncBN across GPUs (CUDA only:
                                                                         # CPU ranks normalise by their own batch)
    task = DenseTask(model, data, cfg=cfg, dist_=dist_)
    eff_batch = cfg.batch_size * cfg.accum_iter * dist_.world_size
    lr = cfg.lr if cfg.lr is not None else cfg.blr * eff_batch / 256
    optimizer = torch.optim.AdamW(dense_param_groups(task.model, cfg), lr=lr, betas=(0.9, 0.999))
    run_config = {"args": asdict(cfg), "world_size": dist_.world_size, "effective_batch_size": eff_batch, "lr": lr,
                  "device": str(dist_.device), "num_classes": data.num_classes}
    best = "test_mIoU" if cfg.task == "seg" else "test_bbox_AP"
    trainer = Trainer(task, cfg=cfg, dist_=dist_, optimizer=optimizer, run_config=run_config, best=best,
                      lr_at=dense_schedule(cfg, lr=lr, steps_per_epoch=count_steps(task.num_samples, cfg, dist_)))
    if ckpt is not None and cfg.eval:                                   # weights only: nothing is trained
        was = {k: ckpt["args"].get(k) for k in ("task", "head", "model")}
        if was != {"task": cfg.task, "head": cfg.head, "model": cfg.model}:
            raise ConfigError(f"--resume {resume} was written with {' '.join(f'--{k} {v}' for k, v in was.items())}: "
                              f"evaluate it with those flags")
        trainer.load_weights(ckpt, resume, hint="evaluate it with the flags it was trained with (its config.json)")
    elif ckpt is not None:
        trainer.resume(ckpt, resume)
    return task, trainer, resume


def main(argv=None) -> list[dict]:
    def recipe(c):                                        # head, output folder and 3x epochs follow the flags
        c.head = c.head or DEFAULT_HEAD[c.task]
        c.output_dir = c.output_dir or f"output_{c.head}"
        name = f"{'demo' if c.model.endswith('_tiny') else 'paper'}_{c.head}"
        if c.schedule == "3x" and c.epochs is None:
            c.epochs = 3 * DEFAULTS[name]["epochs"]
        return name

    cfg, parser = parse_config(DenseConfig, argv, description=DESCRIPTION, defaults=DEFAULTS, recipe=recipe,
                               epilog=__doc__[__doc__.index("Run:"):])
    check_dense_flags(cfg, parser)
    with script_errors():
        dist_ = setup_distributed(cfg)
        try:
            task, trainer, resume = prepare(cfg, dist_)
        except (ValueError, KeyError, FileNotFoundError) as err:         # the readers' and models' checks
            raise ConfigError(err.args[0] if err.args else str(err)) from None
        if cfg.eval:
            record = task.evaluate()
            print0(json.dumps({k: round(v, 3) for k, v in record.items()}))
            return [record]
        print0(f"{cfg.model} + {cfg.head} ({cfg.task}) on {dist_.device} x {dist_.world_size}, data: "
               f"{cfg.data_path or 'built-in shapes'} ({task.num_samples} train images), output: {cfg.output_dir}")
        return trainer.launch(script=__file__, argv=sys.argv[1:] if argv is None else argv,
                              resuming=resume is not None)


if __name__ == "__main__":
    main()
