r"""finetune.py: image classification from any pre-trained checkpoint (or none), with the papers' recipes.

Paper:
    Integrally Pre-Trained Transformer Pyramid Networks (iTPN; Tian et al., CVPR 2023, arXiv 2211.12735 v1, supp.
    Tab. 8 and 10), Fast-iTPN (TPAMI 2024, arXiv 2211.12735 v2, Sec. 5.2), HiViT (ICLR 2023, arXiv 2205.14949), all
    fine-tuned with the recipe of MAE (He et al., CVPR 2022, arXiv 2111.06377, App. A.1: Tab. 9 fine-tuning,
    Tab. 10 linear probing).

Implements:
    Fine-tuning and linear probing of any --model of train.py on an ImageFolder tree or the built-in shapes: checkpoint
    conversion (train.py checkpoints of every method, official HiViT / iTPN / Fast-iTPN layouts) with position tables
    interpolated to the new grid, layer-wise lr decay with each family's official layer ids, MixUp / CutMix /
    RandAugment / random erasing from torchvision, label smoothing, weight EMA and top-1 / top-5 evaluation.
    `python finetune.py` is the classroom demo: the tiny iTPN on the built-in shapes, a few minutes on CPU.

Sections:
    1. Settings: FinetuneConfig and the recipes     <-> iTPN supp. Tab. 8/10, Fast-iTPN Sec. 5.2, MAE Tab. 9 and 10
    2. Data: labelled splits, augmentation          <-> MAE Tab. 9: RandAugment, random erasing; eval resize + crop
    3. Model: classifiers, checkpoints, tables      <-> MAE `interpolate_pos_embed`, BEiT / Swin bias-table resizing
    4. Optimizer: layer-wise lr decay, LARS         <-> BEiT / ELECTRA layer decay, MAE Tab. 10 (LARS)
    5. Mixing, loss and accuracy                     <-> MixUp (arXiv 1710.09412), CutMix (arXiv 1905.04899)
    6. The fine-tuning task, pictures                <-> MAE engine_finetune: train step, evaluation, EMA; iTPN Fig. 6
    7. main

Shapes:
    B images per process per micro-step, K classes, C backbone width, H = W = --input_size, N = (H/16)^2 units,
    G the side of a checkpoint's position grid; pictures: P images, Hp x Wp units, T tokens of an attention map
    (N, or N + 1 with a CLS token).

Differences from the paper / official code:
    - Settings left unset come from one recipe (RECIPES, sources there), picked by --model and by what the
      checkpoint holds (pixel or CLIP-style distillation; none = training from scratch); *_tiny models take "demo".
      Every recipe states a base lr, lr = blr x effective batch / 256 (MAE); the official Fast-iTPN and CLIP
      scripts give absolute lrs, converted at their batch.
    - Augmentation is torchvision's: RandAugment(2 ops, magnitude m) without timm's magnitude noise and
      "increasing" variants; MixUp / CutMix from torchvision.transforms.v2 (one lambda per micro-batch, the partner
      is the previous image; timm pairs each image with the mirrored batch position). Every model reads ImageNet
      mean/std (train.py pre-trains with them; the official CLIP fine-tuning reads 0.5 / 0.5).
    - Position tables of another grid are resized once, when the checkpoint is loaded (bicubic to the new size,
      as MAE's `interpolate_pos_embed` and Swin's bias-table "interpolate" mode). The model files also resize on
      the fly, which covers evaluating at a size other than --input_size.
    - Evaluation shards the val set over ranks without padding (MAE's --dist_eval repeats images to fill ranks).
    - EMA of the weights: torch.optim.swa_utils.AveragedModel (its first update copies the weights; timm's starts
      from the initial weights).
    - Pictures at the end of a run: predictions-epochNNN.png (val images, "true -> predicted") and, in the manner of
      iTPN Fig. 6, attention-epochNNN.png: each val image beside the attention its units receive in the last block
      (averaged over queries and heads: the classifiers mean-pool, see received_attention), a heat map over a grey
      copy. Fast-iTPN draws it on the plain path only (no N x N map under token migration or window attention).

Run:
    python finetune.py                          # CPU demo: tiny iTPN from scratch, built-in shapes, output_finetune/
    python train.py                             # then the same from the pre-trained demo (train.py writes output/):
    python finetune.py --finetune output/checkpoint-last.pth --output_dir output_finetune_pretrained
    python finetune.py --eval --resume output_finetune/checkpoint-best.pth     # evaluate a fine-tuned checkpoint
    python finetune.py --linear_probe --finetune output/checkpoint-last.pth --output_dir output_probe   # MAE's probe
    torchrun --nproc_per_node 8 finetune.py --model itpn_b --finetune PRETRAINED.pth --data_path /imagenet \
        --accum_iter 4                          # iTPN supp. Tab. 8: effective batch 1024 = 8 x 32 x 4
"""

import json
import math
import os
import sys
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image, ImageDraw
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.transforms import v2

import fast_itpn
import hivit
import itpn
from train import (
    IMAGENET_MEAN, IMAGENET_STD, MODELS, METHOD_FILE, ConfigError, DataError, Dist, ImageFiles, RunConfig,
    SeededViews, ShapesDataset, Trainer, cosine_schedule, count_steps, denormalize, epoch_loader, flag,
    find_checkpoint, load_checkpoint, parse_config, prepare_output_dir, print0, save_image, script_errors,
    setup_distributed,
)

__all__ = [
    "FinetuneConfig", "RECIPES", "recipe_name", "labelled_splits", "train_transform", "eval_transform",
    "build_classifier", "unit_of", "resize_pos_table", "resize_bias_table", "Pretrained", "read_pretrained",
    "load_pretrained", "LinearProbe", "layer_id", "layer_decay_groups", "LARS", "make_mixing", "topk_correct",
    "evaluate", "save_predictions", "last_attention_block", "received_attention", "heat_overlay", "save_attention",
    "FinetuneTask", "prepare", "main",
]


# ---- 1. Settings: FinetuneConfig and the recipes ------------------------------------------------------------------

@dataclass
class FinetuneConfig(RunConfig):
    """Fine-tuning: model, weights, recipe and data."""
    output_dir: str = flag("output_finetune", "checkpoints, log.txt, config.json and pictures (train.py's output/ "
                                              "holds the pre-training run the second demo starts from)")
    model: str = flag("itpn_tiny", "architecture and size (train.py's --model choices)", metavar="NAME")
    finetune: str = flag("", "weights to start from: a train.py or finetune.py checkpoint, or an official "
                             "HiViT / iTPN / Fast-iTPN file; empty = train from scratch", metavar="PATH")
    nb_classes: int | None = flag(None, "classes K of the head; default: the number of class folders (8 built-in)",
                                  valid=(lambda v: v >= 2, ">= 2"))
    drop_path: float | None = flag(None, "stochastic depth rate of the last block (linear from 0)",
                                   valid=(lambda v: 0 <= v < 1, "in [0, 1)"))
    layer_decay: float | None = flag(None, "layer-wise lr decay: block l of L trains at lr x decay^(L - l)",
                                     valid=(lambda v: 0 < v <= 1, "in (0, 1]"))
    smoothing: float | None = flag(None, "label smoothing epsilon", valid=(lambda v: 0 <= v < 1, "in [0, 1)"))
    mixup: float | None = flag(None, "MixUp alpha (0 = off); with --cutmix, each micro-batch takes one of the two",
                               valid=(lambda v: v >= 0, ">= 0"))
    cutmix: float | None = flag(None, "CutMix alpha (0 = off)", valid=(lambda v: v >= 0, ">= 0"))
    randaug: int | None = flag(None, "RandAugment magnitude, 2 ops per image (0 = off)",
                               valid=(lambda v: 0 <= v <= 30, "in [0, 30]"))
    reprob: float | None = flag(None, "random erasing probability (per-pixel random fill)",
                                valid=(lambda v: 0 <= v <= 1, "in [0, 1]"))
    model_ema: bool | None = flag(None, "keep an EMA of the weights and evaluate it too (test_acc1_ema, ...)")
    model_ema_decay: float | None = flag(None, "EMA decay per optimizer step", valid=(lambda v: 0 < v < 1, "in (0, 1)"))
    eval: bool = flag(False, "only evaluate the weights of --resume (or --finetune) on the val split and print it")
    linear_probe: bool = flag(False, "MAE's linear probing: frozen backbone, BatchNorm without affine + linear head, "
                                     "LARS")
    data_path: str | None = flag(None, "ImageFolder tree with <path>/train/<class>/* and <path>/val/<class>/*. "
                                       "Default: the built-in ShapesDataset (classification task)")
    num_images: int | None = flag(None, "training images of the built-in data", valid=(lambda v: v >= 1, ">= 1"))
    num_val_images: int | None = flag(None, "val images of the built-in data", valid=(lambda v: v >= 1, ">= 1"))
    input_size: int | None = flag(None, "crop side in px, a multiple of the model's 16-px unit",
                                  valid=(lambda v: v >= 16, ">= 16"))
    migration_ratio: float | None = flag(None, "Fast-iTPN token migration rho (Sec. 4.1; 0 = off)",
                                         valid=(lambda v: 0 <= v < 0.5, "in [0, 0.5)"))
    attention: str | None = flag(None, "Fast-iTPN stage-3 attention (Sec. 4.2): global, window or gathering",
                                 choices=list(fast_itpn.ATTENTION_MODES))

    RESUME_KEYS = ("model", "nb_classes", "linear_probe", "input_size")


# Every setting a recipe leaves out is COMMON: MAE's fine-tuning defaults, which the iTPN, HiViT and Fast-iTPN
# scripts keep (AdamW (0.9, 0.999), wd 0.05, smoothing 0.1, MixUp 0.8 / CutMix 1.0, RandAugment m9, erasing 0.25).
COMMON = dict(weight_decay=0.05, smoothing=0.1, mixup=0.8, cutmix=1.0, randaug=9, reprob=0.25, model_ema=False,
              model_ema_decay=0.9999, input_size=224, num_images=10000, num_val_images=2000, num_workers=10,
              save_every=20)
RECIPES: dict[str, dict] = {name: {**COMMON, **r} for name, r in {
    # iTPN supp. Tab. 8 (pixel) / Tab. 10 (CLIP): lr, epochs, warm-up, drop path at batch 1024. Layer decay from the
    # official scripts (itpn_pixel FINETUNE.md, itpn_clip README): the value their 13/L-rescaled rule was tuned
    # with (the paper's main text gives 0.65 / 0.70 for another rule). min_lr: official pixel 5e-6, CLIP 1e-6.
    "itpn_pixel_b": dict(blr=5e-4, layer_decay=0.60, epochs=100, warmup_epochs=5, drop_path=0.2, min_lr=5e-6,
                         batch_size=32),
    "itpn_pixel_l": dict(blr=1e-3, layer_decay=0.55, epochs=50, warmup_epochs=5, drop_path=0.2, min_lr=5e-6,
                         batch_size=32),
    "itpn_clip_b": dict(blr=5e-4, layer_decay=0.60, epochs=100, warmup_epochs=5, drop_path=0.2, min_lr=1e-6,
                        batch_size=32),
    "itpn_clip_l": dict(blr=1e-3, layer_decay=0.55, epochs=50, warmup_epochs=5, drop_path=0.3, min_lr=1e-6,
                        batch_size=32),
    # HiViT's MAE fine-tuning (official hivit `self_supervised/get_started.md`: 64 x 2 accum x 8 GPUs = 1024).
    "hivit_mae": dict(blr=5e-4, layer_decay=0.85, epochs=100, warmup_epochs=5, drop_path=0.2, min_lr=1e-6,
                      batch_size=64),
    # MAE FINETUNE.md, ViT-B / ViT-L (ViT-S takes B's).
    "vit_mae_b": dict(blr=5e-4, layer_decay=0.65, epochs=100, warmup_epochs=5, drop_path=0.1, min_lr=1e-6,
                      batch_size=32),
    "vit_mae_l": dict(blr=1e-3, layer_decay=0.75, epochs=50, warmup_epochs=5, drop_path=0.2, min_lr=1e-6,
                      batch_size=32),
    # Fast-iTPN Sec. 5.2 (official fast_itpn README): lr 1e-4 at batch 1024 (L: 5e-5 at 512) = blr 2.5e-5, EMA on.
    "fast_itpn_t": dict(blr=2.5e-5, layer_decay=0.80, epochs=100, warmup_epochs=5, drop_path=0.1, min_lr=1e-6,
                        batch_size=64, model_ema=True),
    "fast_itpn_s": dict(blr=2.5e-5, layer_decay=0.90, epochs=100, warmup_epochs=5, drop_path=0.1, min_lr=1e-6,
                        batch_size=64, model_ema=True),
    "fast_itpn_b": dict(blr=2.5e-5, layer_decay=0.90, epochs=20, warmup_epochs=3, drop_path=0.1, min_lr=1e-6,
                        batch_size=32, model_ema=True),
    "fast_itpn_l": dict(blr=2.5e-5, layer_decay=0.95, epochs=20, warmup_epochs=3, drop_path=0.2, min_lr=1e-6,
                        batch_size=4, model_ema=True, input_size=640),
    # No checkpoint: HiViT's supervised recipe (official hivit `supervised/config.py`, Swin's: lr 5e-4 per 512
    # images = blr 2.5e-4, 300 epochs, 20 warm-up, min_lr 5e-6 per 512); drop path per size from its configs
    # (T 0.05, S 0.3, B 0.5; L not given, B's).
    **{f"scratch_{size}": dict(blr=2.5e-4, layer_decay=1.0, epochs=300, warmup_epochs=20, drop_path=dp, min_lr=1e-5,
                               batch_size=128) for size, dp in (("t", 0.05), ("s", 0.3), ("b", 0.5), ("l", 0.5))},
    # MAE main_linprobe.py (Tab. 10): LARS, blr 0.1, no weight decay, 90 epochs, batch 16384 = 512 x 32 GPUs,
    # plain crops and flips (no RandAugment, erasing, mixing or smoothing).
    "linprobe": dict(blr=0.1, weight_decay=0.0, layer_decay=1.0, epochs=90, warmup_epochs=10, drop_path=0.0,
                     min_lr=0.0, batch_size=512, smoothing=0.0, mixup=0.0, cutmix=0.0, randaug=0, reprob=0.0),
    # The tiny CPU presets (ours): 64-px shapes, a few minutes on 2 cores. Mixing off and RandAugment mild: the
    # tiny models underfit 2,000 shapes in 15-20 epochs, and stronger regularisation gave no gain there.
    "demo": dict(input_size=64, num_images=2000, num_val_images=500, batch_size=32, epochs=20, warmup_epochs=1,
                 blr=1.6e-2, min_lr=1e-5, layer_decay=0.9, drop_path=0.1, mixup=0.0, cutmix=0.0, randaug=5,
                 reprob=0.25, num_workers=1, threads=1, save_every=5),
    # LARS scales every step to lr x 0.001 x |w|, so the probe needs MAE's absolute lr (6.4) at any batch size.
    "demo_linprobe": dict(input_size=64, num_images=2000, num_val_images=500, batch_size=64, epochs=15,
                          warmup_epochs=1, blr=25.6, weight_decay=0.0, min_lr=0.0, layer_decay=1.0, drop_path=0.0,
                          smoothing=0.0, mixup=0.0, cutmix=0.0, randaug=0, reprob=0.0, num_workers=1, threads=1,
                          save_every=5),
}.items()}


def recipe_name(model: str, kind: str | None, linear_probe: bool) -> str:
    """The RECIPES entry for --model, the checkpoint's pre-training kind ("pixel", "clip" or None = no checkpoint)
    and the protocol. Sizes without a recipe of their own take the base one (iTPN-T/S: no paper recipe)."""
    if model not in MODELS:
        raise ConfigError(f"--model {model!r} is not a model; choose from {', '.join(MODELS)}")
    if model.endswith("_tiny"):
        return "demo_linprobe" if linear_probe else "demo"
    if linear_probe:
        return "linprobe"
    family, size = MODELS[model][0], model.rsplit("_", 1)[1]
    large = "l" if size == "l" else "b"
    if kind is None:
        return f"scratch_{size}"
    if family == "fast_itpn":
        return f"fast_itpn_{size}"
    if family == "itpn":
        return f"itpn_{kind}_{large}"
    return f"vit_mae_{large}" if family == "vit" else "hivit_mae"


# ---- 2. Data: labelled splits, fine-tuning augmentation -----------------------------------------------------------

class InMemory(Dataset):
    """A dataset drawn once: the built-in shapes are procedural, and re-drawing them every epoch costs more CPU
    than the tiny models' training step."""

    def __init__(self, dataset: Dataset):
        self.items = [dataset[i] for i in range(len(dataset))]            # (PIL image, label)
        self.classes = list(dataset.classes)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index: int):
        return self.items[index]


# Built-in classification data: one shape per image, radius 0.3-0.45 of the side (x 1.3 for task "cls"; train.py's
# pre-training scenes use 0.15-0.4). The tiny models tell the 8 shapes apart at 64 px only when they are large:
# from scratch, 20 epochs on 2,000 images reached ~20% top-1 with these sizes and ~14% with the default ones.
CLS_SCALE = (0.3, 0.45)


def labelled_splits(cfg: FinetuneConfig) -> tuple[Dataset, Dataset, list[str]]:
    """(train, val, class names): an ImageFolder tree (labels = class-folder index, the same folders in both
    splits) or the built-in shapes (seed 0 for every --seed, so runs of different seeds see the same images)."""
    if cfg.data_path is None:
        def shapes(n, split):
            return InMemory(ShapesDataset(n, image_size=cfg.input_size, seed=0, split=split, task="cls",
                                          scale=CLS_SCALE))
        train_set = shapes(cfg.num_images, "train")
        return train_set, shapes(cfg.num_val_images, "val"), train_set.classes
    root = cfg.data_path
    if not root or not os.path.isdir(root):
        raise DataError(f"--data_path {root!r} is not a directory (leave it out for the built-in shapes)")
    missing = [s for s in ("train", "val") if not os.path.isdir(os.path.join(root, s))]
    if missing:
        raise DataError(f"--data_path {root!r} has no {' or '.join(s + '/' for s in missing)} folder: fine-tuning "
                        f"reads {root}/train/<class>/<image> and {root}/val/<class>/<image> (ImageFolder layout)")
    train_set, val_set = (ImageFiles(os.path.join(root, s), what=f"--data_path {s}/") for s in ("train", "val"))
    for split in (train_set, val_set):
        loose = sum(label < 0 for label in split.labels)
        if loose:
            raise DataError(f"{loose} images lie directly in {split.root} without a class folder: put every image "
                            f"in <split>/<class>/")
    if train_set.classes != val_set.classes:
        only_train = sorted(set(train_set.classes) - set(val_set.classes))
        only_val = sorted(set(val_set.classes) - set(train_set.classes))
        raise DataError(f"class folders differ between {root}/train and {root}/val (only in train: {only_train}, "
                        f"only in val: {only_val}); labels are folder indices, so both splits need the same folders")
    return train_set, val_set, train_set.classes


class ImageTransform:
    """transform(image, target) -> (tensor, target), as SeededViews calls it (a class, so workers can pickle it)."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, image, target):
        return self.transform(image), target


def train_transform(input_size: int, *, randaug: int, reprob: float) -> ImageTransform:
    """MAE Tab. 9: RandomResizedCrop (0.08-1, bicubic), flip, RandAugment, normalise, random erasing (pixel)."""
    steps = [T.RandomResizedCrop(input_size, scale=(0.08, 1.0), interpolation=T.InterpolationMode.BICUBIC),
             T.RandomHorizontalFlip()]
    if randaug:
        steps.append(T.RandAugment(num_ops=2, magnitude=randaug, interpolation=T.InterpolationMode.BILINEAR))
    steps += [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    if reprob:
        steps.append(T.RandomErasing(p=reprob, value="random"))          # timm's "pixel" mode: N(0, 1) per pixel
    return ImageTransform(T.Compose(steps))


EVAL_CROP = 224 / 256    # MAE / DeiT: resize the short side to input / 0.875, then centre-crop


def eval_transform(input_size: int) -> ImageTransform:
    """Resize to input_size / 0.875 and centre-crop (MAE); from 384 px on, resize to the crop (Fast-iTPN, DeiT)."""
    resize = (input_size, input_size) if input_size >= 384 else int(input_size / EVAL_CROP)
    return ImageTransform(T.Compose([T.Resize(resize, interpolation=T.InterpolationMode.BICUBIC),
                                     T.CenterCrop(input_size), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]))


# ---- 3. Model: classifiers, checkpoint conversion, position tables ------------------------------------------------

def build_classifier(model: str, *, num_classes: int, drop_path: float, input_size: int, layer_scale: bool = False,
                     migration_ratio: float | None = None, attention: str | None = None) -> nn.Module:
    """A --model as a K-class classifier at input_size. layer_scale: HiViT / iTPN with the gamma of CLIP-style
    distillation checkpoints (iTPN's CLIP fine-tuning model, `itpn_clip/modeling_finetune.py`)."""
    family, preset = MODELS[model]
    size = dict(num_classes=num_classes, drop_path_rate=drop_path, img_size=input_size)
    if (migration_ratio is not None or attention is not None) and family != "fast_itpn":
        raise ConfigError(f"--migration_ratio and --attention are Fast-iTPN switches; --model {model} is {family}")
    if family == "vit":
        return hivit.VisionTransformer(replace(preset, **size))
    if family == "fast_itpn":
        switches = {k: v for k, v in (("migration_ratio", migration_ratio), ("attention", attention)) if v is not None}
        return fast_itpn.FastiTPN(replace(preset, **size, **switches))
    cfg = replace(preset, **size, **({"layer_scale": 0.1} if layer_scale else {}))   # iTPN's CLIP init_values
    return itpn.iTPN(cfg) if family == "itpn" else hivit.HiViT(cfg)


def unit_of(model: str) -> int:
    """Pixels per unit of a --model: 16 for the HiViT family (stage-3 stride), the patch size for a plain ViT."""
    family, preset = MODELS[model]
    return preset.patch_size if family == "vit" else hivit.UNIT


def resize_pos_table(table: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
    """(1, G*G, C) absolute position table -> (1, Hp*Wp, C): bicubic to the new size (MAE `interpolate_pos_embed`)."""
    g, c = math.isqrt(table.shape[1]), table.shape[2]
    if (g, g) == tuple(grid_hw):
        return table
    grid = table.reshape(1, g, g, c).permute(0, 3, 1, 2)                 # (1, C, G, G)
    grid = F.interpolate(grid.float(), size=tuple(grid_hw), mode="bicubic", align_corners=False)   # (1, C, Hp, Wp)
    return grid.permute(0, 2, 3, 1).reshape(1, -1, c).to(table.dtype)    # (1, Hp*Wp, C)


def resize_bias_table(table: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
    """((2G-1)^2, heads) relative position bias table -> ((2Hp-1)(2Wp-1), heads): bicubic over the offset grid
    (Swin's "interpolate" mode; BEiT's geometric resampling needs SciPy and is not used)."""
    side, heads = math.isqrt(table.shape[0]), table.shape[1]
    new = (2 * grid_hw[0] - 1, 2 * grid_hw[1] - 1)
    if (side, side) == new:
        return table
    grid = table.t().reshape(1, heads, side, side)                        # (1, heads, 2G-1, 2G-1)
    grid = F.interpolate(grid.float(), size=new, mode="bicubic", align_corners=False)   # (1, heads, 2Hp-1, 2Wp-1)
    return grid.reshape(heads, -1).t().to(table.dtype)                    # ((2Hp-1)(2Wp-1), heads)


@dataclass
class Pretrained:
    """A --finetune file, read: its tensors, where its backbone lives, and what it is."""
    state: dict            # key -> tensor, the file's own names
    layout: str            # "encoder" (train.py), "classifier" (finetune.py) or "official" (released files)
    prefix: str            # the backbone's key prefix in `state` ("encoder.", "encoder.backbone.", "" ...)
    source: str            # for messages: "train.py itpn_tiny --method itpn", "official iTPN/HiViT layout", ...
    model: str | None      # the --model that wrote it (this project's files); None for official files
    kind: str              # "pixel" or "clip" (frozen-teacher distillation: CLIP in the papers)
    truncate: int = 0      # train.py --truncate K: the last K attention blocks are missing (FastMIM Tab. 1c)
    pyramid: str = ""      # where an iTPN pre-trainer keeps its feature pyramid ("encoder.pyramid."), for dense models


def backbone_prefix(model: str) -> str:
    """Where a --model's classifier keeps its bare backbone (a HiViT, ViT or Fast-iTPN): iTPN wraps it as
    `backbone` (a plain-ViT iTPN one level deeper, as `backbone.vit`); the others are their backbone."""
    family, preset = MODELS[model]
    if family != "itpn":
        return ""
    return "backbone.vit." if preset.plain_vit else "backbone."


def distilled(method: str) -> bool:
    """Frozen-teacher pre-training (CLIP in the papers): the method's class is itpn.PyramidDistillation's."""
    module = {"itpn": itpn, "fast_itpn": fast_itpn}.get(METHOD_FILE.get(method))
    return module is not None and issubclass(module.METHODS[method], itpn.PyramidDistillation)


def read_pretrained(path: str) -> Pretrained:
    """Read any file --finetune accepts (one clear message per unreadable kind, through train.load_checkpoint)."""
    ckpt = load_checkpoint(path, what="--finetune")
    args = ckpt.get("args")
    if isinstance(args, dict) and "model" in args and isinstance(ckpt.get("model"), dict):
        state, method = ckpt["model"], args.get("method")
        if args["model"] not in MODELS or (method is not None and method not in METHOD_FILE):
            raise ConfigError(f"--finetune {path!r} was written by --model {args['model']} --method {method}, which "
                              f"this version does not have")
        if method is None:                                                # finetune.py: the classifier itself
            layout, prefix, pyramid = "classifier", ("encoder." if args.get("linear_probe") else ""), ""
            source = f"finetune.py {args['model']}"
        else:                                                             # train.py: the pre-trainer's encoder
            inside = backbone_prefix(args["model"]) if METHOD_FILE.get(method) == "itpn" else ""   # iTPN / bare
            layout, prefix = "encoder", "encoder." + inside
            pyramid = "encoder.pyramid." if inside else ""                 # a bare Fast-iTPN holds its own
            source = f"train.py {args['model']} --method {method}"
        layer_scale = any(k.startswith(prefix) and k.endswith("gamma_1") for k in state)
        kind = "clip" if (distilled(method) if method else layer_scale) else "pixel"
        return Pretrained(state, layout, prefix, source, args["model"], kind, int(args.get("truncate") or 0),
                          pyramid)
    state = hivit.unwrap_checkpoint(ckpt)                                 # released files: {'model': sd} or sd
    if "patch_embed.proj.weight" not in state or not any(k.startswith("blocks.") for k in state):
        raise ConfigError(f"--finetune {path!r} is neither a checkpoint of this project nor an official HiViT / "
                          f"iTPN / Fast-iTPN file (no patch_embed.proj / blocks.* keys)")
    fast = "pos_embed" in state                                           # Fast-iTPN: released CLIP-distilled
    clip = fast or any(k.endswith("gamma_1") for k in state)             # iTPN: layer scale = the CLIP models
    return Pretrained(state, "official", "", f"official {'Fast-iTPN' if fast else 'HiViT/iTPN'} layout", None,
                      "clip" if clip else "pixel")


def official_signature(state: dict) -> tuple[str, int, int, int, int]:
    """(style, C, n1, n2, depth) of an official layout: its flat blocks.{i} list read back into stages (merges are
    the blocks with a `reduction`)."""
    flat = sorted({int(k.split(".")[1]) for k in state if k.startswith("blocks.")})
    merges = [i for i in flat if f"blocks.{i}.reduction.weight" in state]
    if len(merges) != 2:
        raise ConfigError("--finetune: an official layout without two patch merges is not a HiViT / iTPN / Fast-iTPN")
    style = "fast_itpn" if "pos_embed" in state else "hivit"
    return (style, state["patch_embed.proj.weight"].shape[0] * 4, merges[0], merges[1] - merges[0] - 1,
            len(flat) - merges[1] - 1)


def model_signature(family: str, cfg) -> tuple[str, int, int, int, int] | None:
    """The same for a model config; None for plain ViTs (no official layout is read for them)."""
    if family == "vit" or getattr(cfg, "plain_vit", False):
        return None
    return ("fast_itpn" if family == "fast_itpn" else "hivit", cfg.embed_dim, cfg.mlp_depth1, cfg.mlp_depth2,
            cfg.depth)


def check_architecture(pretrained: Pretrained, model_name: str, cfg) -> None:
    """Refuse another architecture or size, naming both: this project's files say which --model wrote them, an
    official file is compared by its widths and block counts (and the matching --model is named)."""
    if pretrained.model is not None:
        if pretrained.model != model_name:
            raise ConfigError(f"--finetune holds a {pretrained.model} ({pretrained.source}); this run is --model "
                              f"{model_name}: pass --model {pretrained.model} or another checkpoint")
        return
    found, wanted = official_signature(pretrained.state), model_signature(MODELS[model_name][0], cfg)
    if found != wanted:
        def describe(sig):
            return f"{sig[0]}-style, C {sig[1]}, {sig[2]}+{sig[3]}+{sig[4]} blocks" if sig else "a plain ViT"
        names = [m for m, (family, preset) in MODELS.items() if model_signature(family, preset) == found
                 and not m.endswith("_tiny")] or ["(none of train.py's)"]
        raise ConfigError(f"--finetune holds an {pretrained.source} ({describe(found)}: {' or '.join(names)}); "
                          f"--model {model_name} is {describe(wanted)}: pass --model {names[0]}")


def to_model_keys(pretrained: Pretrained, model: nn.Module, model_name: str) -> tuple[dict, dict]:
    """({model key: tensor}, {model key: the file's key}); keys outside the backbone (and, for a dense iTPN, its
    pyramid) are left out."""
    target, mapped, names = backbone_prefix(model_name), {}, {}
    for key, value in pretrained.state.items():
        if pretrained.pyramid and key.startswith(pretrained.pyramid):    # encoder.pyramid.* -> pyramid.*
            mapped[key[len("encoder."):]], names[key[len("encoder."):]] = value, key
            continue
        if not key.startswith(pretrained.prefix):
            continue                                                      # decoders, teachers, pre-training heads
        new = key[len(pretrained.prefix):]
        if pretrained.layout == "official":                               # official flat blocks.{i} -> stages
            new = hivit.map_official_key(new, mlp_depth1=model.cfg.mlp_depth1, mlp_depth2=model.cfg.mlp_depth2)
        if new is not None:                                               # None: derived relative_position_index
            new = new if pretrained.layout == "classifier" else target + new
            mapped[new], names[new] = value, key
    return mapped, names


def fit_tables(mapped: dict, expected: dict[str, torch.Size]) -> list[str]:
    """Resize position tables to the classifier's grid, in place; returns what was resized, for the report."""
    resized = []
    for key, value in list(mapped.items()):
        shape = expected.get(key)
        if shape is None or value.shape == shape:
            continue
        if key.endswith("pos_embed") and value.ndim == 3 and math.isqrt(value.shape[1]) ** 2 == value.shape[1]:
            side = math.isqrt(shape[1])
            mapped[key] = resize_pos_table(value, (side, side))
        elif key.endswith("relative_position_bias_table"):
            side = (math.isqrt(shape[0]) + 1) // 2
            mapped[key] = resize_bias_table(value, (side, side))
        else:
            continue
        resized.append(f"{key} {tuple(value.shape)} -> {tuple(shape)}")
    return resized


def owner(key: str) -> str:
    """The module a state_dict key belongs to: "head" for "backbone.head.weight", "" for a bare parameter."""
    return key.rsplit(".", 2)[-2] if "." in key else ""


def may_start_fresh(key: str, *, depth: int, truncate: int) -> bool:
    """Classifier tensors a checkpoint may lack: the head, fc_norm, relative position bias tables (off in pixel
    pre-training; zeros = no bias) and the attention blocks a --truncate'd encoder never had."""
    if owner(key) in ("head", "fc_norm") or key.endswith("relative_position_bias_table"):
        return True
    parts = key.split(".")
    i = parts.index("blocks") if "blocks" in parts else -1
    return truncate > 0 and i >= 0 and int(parts[i + 1]) >= depth - truncate


def summarise(keys: list[str], depth: int) -> str:
    """Keys grouped for a report: block numbers and weight/bias become *, and names are cut after `depth` named
    parts ("backbone.blocks.*.attn.relative_position_bias_table (2)", "teacher.* (47)")."""
    groups: dict[str, int] = {}
    for key in keys:
        parts = ["*" if p.isdigit() or p in ("weight", "bias") else p for p in key.split(".")]
        named = [i for i, p in enumerate(parts) if p != "*"]
        if len(named) > depth:
            parts = parts[:named[depth - 1] + 1] + ["*"]
        name = ".".join(parts)
        groups[name] = groups.get(name, 0) + 1
    return ", ".join(f"{g} ({n})" for g, n in groups.items()) or "none"


def load_pretrained(model: nn.Module, pretrained: Pretrained, *, model_name: str) -> dict[str, list[str]]:
    """Load a --finetune file into a classifier or a dense backbone; returns {"loaded", "fresh", "ignored",
    "resized"} key lists.

    The backbone must be complete (up to a --truncate'd tail); a dense iTPN's pyramid comes from the file when it
    holds one (iTPN pre-training, all of it) and starts fresh when it holds none (the report says so); a fresh head
    of a pre-trained model starts at trunc-normal(2e-5) as in MAE and the official iTPN pixel script (Fast-iTPN
    keeps its own 0.01-scaled init)."""
    check_architecture(pretrained, model_name, model.cfg)
    mapped, names = to_model_keys(pretrained, model, model_name)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    head = [k for k in mapped if owner(k) == "head"]
    if any(mapped[k].shape != expected.get(k) for k in head):             # another number of classes: a new head
        mapped = {k: v for k, v in mapped.items() if k not in head}
    resized = fit_tables(mapped, expected)
    used = {names[k] for k in mapped if k in expected}
    ignored = [k for k in pretrained.state if k not in used]
    wrong = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k])}" for k, v in mapped.items()
             if k in expected and v.shape != expected[k]]
    fresh = [k for k in expected if k not in mapped]
    lacking = [k for k in fresh if not may_start_fresh(k, depth=model.cfg.depth, truncate=pretrained.truncate)]
    if not any(k.startswith("pyramid.") for k in mapped):                # a file without a pyramid (official,
        lacking = [k for k in lacking if not k.startswith("pyramid.")]   # MAE-style): a dense iTPN's starts fresh
    if wrong or lacking:
        raise ConfigError(f"--finetune ({pretrained.source}) does not fit --model {model_name}: "
                          + "; ".join(wrong + ([f"missing {summarise(lacking, 4)}"] if lacking else [])))
    model.load_state_dict({k: v for k, v in mapped.items() if k in expected}, strict=False)
    if not isinstance(model, fast_itpn.FastiTPN):
        for name, p in model.named_parameters():
            if name in fresh and name.endswith("head.weight"):
                nn.init.trunc_normal_(p, std=2e-5)
    loaded = [k for k in expected if k in mapped]
    print0(f"--finetune: {pretrained.source} (recipe kind: {pretrained.kind}): loaded {len(loaded)} tensors; "
           f"freshly initialised: {summarise(fresh, 4)}; ignored: {summarise(ignored, 1)}"
           + (f"; resized: {'; '.join(resized)}" if resized else ""))
    return {"loaded": loaded, "fresh": fresh, "ignored": ignored, "resized": resized}


class LinearProbe(nn.Module):
    """MAE's linear probing (MAE Tab. 10): frozen backbone, mean-pooled stage-3 tokens, a LayerNorm without affine
    (MAE's freshly built, frozen fc_norm), BatchNorm1d(affine=False) and a linear head (init std 0.01)."""

    def __init__(self, encoder: nn.Module, num_classes: int):
        super().__init__()
        self.encoder = encoder.requires_grad_(False)                      # its own head is never used
        width = encoder.cfg.embed_dim
        self.bn = nn.BatchNorm1d(width, affine=False, eps=1e-6)
        self.head = nn.Linear(width, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

    def forward(self, x):
        with torch.no_grad():                                             # nothing below the head is trained
            feats = self.encoder.forward_features(x)[-1].mean(dim=1)      # (B, C)
            feats = F.layer_norm(feats, feats.shape[-1:], eps=1e-6)
        return self.head(self.bn(feats))                                  # (B, K)


# ---- 4. Optimizer: layer-wise lr decay with the official layer ids, LARS ------------------------------------------

def official_index(name: str, cfg) -> int | None:
    """Our HiViT / Fast-iTPN module name -> the official flat `blocks.{i}` index (stage 1, merge, stage 2, merge,
    stage 3 in one list; hivit.map_official_key goes the other way). None for parameters outside the blocks."""
    n1, n2 = cfg.mlp_depth1, cfg.mlp_depth2
    parts = name.split(".")
    start = {"stage1": 0, "stage2": n1 + 1, "blocks": n1 + n2 + 2}
    if parts[0] in start:
        return start[parts[0]] + int(parts[1])
    return {"merge1": n1, "merge2": n1 + n2 + 1}.get(parts[0])


def layer_id(name: str, family: str, cfg) -> tuple[int, int]:
    """(layer id, number of layers L) of a parameter under its family's official rule; scale = decay^(L - id).

    - hivit, itpn (official `util/lr_decay.py` of both repos): the stem and APE are 0, the MLP and attention blocks
      1..L-1 in order, a patch merge takes the id of the block before it, everything else (fc_norm, head) L.
    - fast_itpn (official `optim_factory.py`): flat block i is i + 1 (merges count), everything else L.
    - vit (MAE `util/lr_decay.py`): stem, position tables and CLS token 0, block k is k + 1, the rest L.
    """
    if family == "itpn" and cfg.plain_vit:                               # iTPN on a plain ViT: MAE's rule
        family, name = "vit", name.replace("backbone.vit.", "", 1)
    if family == "vit":
        top = cfg.depth + 1
        if name.startswith(("patch_embed", "pos_embed", "cls_token", "cls_pos_embed", "norm_pre")):
            return 0, top
        return (int(name.split(".")[1]) + 1, top) if name.startswith("blocks.") else (top, top)
    name = name[len("backbone."):] if name.startswith("backbone.") else name
    index = official_index(name, cfg)
    stem = name.startswith(("patch_embed", "absolute_pos_embed", "pos_embed"))
    if family == "fast_itpn":
        top = cfg.mlp_depth1 + cfg.mlp_depth2 + 2 + cfg.depth + 1         # len(blocks) + 1
        return (0, top) if stem else ((index + 1, top) if index is not None else (top, top))
    merges = (cfg.mlp_depth1, cfg.mlp_depth1 + cfg.mlp_depth2 + 1)
    top = cfg.mlp_depth1 + cfg.mlp_depth2 + cfg.depth + 1                 # blocks that are not merges, + 1
    if stem:
        return 0, top
    if index is None:
        return top, top
    return index + 1 - sum(m <= index for m in merges), top               # a merge inherits the id before it


def layer_decay_groups(model: nn.Module, *, family: str, cfg, weight_decay: float, layer_decay: float) -> list:
    """Optimizer groups by (layer id, decay or not), each with its "lr_scale" (train.Trainer applies it).

    No weight decay on 1-D tensors (biases, norms, layer scales) and the model's `no_weight_decay()` names
    (position tables, bias tables). iTPN rescales the decay to 13 layers: d = layer_decay^(13 / L), so the stem
    always trains at layer_decay^13 as in a 12-block ViT (official `util/lr_decay.py`); the others do not."""
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lid, top = layer_id(name, family, cfg)
        decay = layer_decay ** (13 / top) if family == "itpn" and not cfg.plain_vit else layer_decay
        no_wd = p.ndim <= 1 or name in skip
        group = groups.setdefault((lid, no_wd), {"params": [], "names": [], "lr_scale": decay ** (top - lid),
                                                  "weight_decay": 0.0 if no_wd else weight_decay})
        group["params"].append(p)
        group["names"].append(name)
    return list(groups.values())


class LARS(torch.optim.Optimizer):
    """LARS (You et al., arXiv 1708.03888) as MAE's linear probe uses it: SGD with momentum where the update of
    every matrix is rescaled by trust * ||w|| / ||g + wd * w||; vectors (biases) take plain momentum SGD.

    MAE uses it because its probe trains at batch 16384, where plain SGD needs per-layer lr tuning; torch has no
    LARS, and SGD alone would change the protocol the papers report."""

    def __init__(self, params, *, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if p.ndim > 1:
                    update = update.add(p, alpha=group["weight_decay"])
                    w_norm, u_norm = torch.norm(p), torch.norm(update)
                    trust = torch.where((w_norm > 0) & (u_norm > 0),
                                        group["trust_coefficient"] * w_norm / u_norm, torch.ones_like(w_norm))
                    update = update * trust
                mu = self.state[p].setdefault("mu", torch.zeros_like(p))
                mu.mul_(group["momentum"]).add_(update)
                p.add_(mu, alpha=-group["lr"])


# ---- 5. Mixing, loss and accuracy ---------------------------------------------------------------------------------

def make_mixing(*, mixup: float, cutmix: float, num_classes: int):
    """(images (B, 3, H, W), labels (B,)) -> (mixed images, soft targets (B, K)), or None when both are off.

    torchvision's MixUp / CutMix: lambda ~ Beta(alpha, alpha) once per micro-batch, image i mixed with image i-1;
    CutMix's lambda is the pasted box's area share. With both on, each micro-batch takes one of them with
    probability 1/2 (timm's switch_prob 0.5, as every recipe here). The draws come from torch's RNG, which the
    Trainer seeds per (seed, step, shard)."""
    chosen = [t(alpha=a, num_classes=num_classes) for t, a in ((v2.MixUp, mixup), (v2.CutMix, cutmix)) if a > 0]
    if not chosen:
        return None
    return chosen[0] if len(chosen) == 1 else v2.RandomChoice(chosen)


def topk_correct(logits: torch.Tensor, target: torch.Tensor, ks=(1, 5)) -> list[int]:
    """How many of the B samples have their label among the k highest logits, per k (k is capped at K)."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices      # (B, k_max), best first
    hit = top == target[:, None]                                          # (B, k_max)
    return [int(hit[:, :k].any(dim=1).sum()) for k in ks]


@torch.no_grad()
def evaluate(model: nn.Module, views: SeededViews, *, batch_size: int, dist_: Dist, num_workers: int) -> dict:
    """{"test_loss", "test_acc1", "test_acc5"} (accuracies in %) over the whole val set: rank r evaluates images
    r, r + R, ... and the sums are all-reduced, so every image counts once whatever the world size."""
    was_training = model.training
    model.eval()
    shard = Subset(views, range(dist_.rank, len(views), dist_.world_size))
    sums = torch.zeros(4, dtype=torch.float64, device=dist_.device)      # loss sum, top-1, top-5, images
    for x, y, _ in DataLoader(shard, batch_size=batch_size, num_workers=num_workers):
        x, y = x.to(dist_.device), y.to(dist_.device)
        logits = model(x).float()
        top1, top5 = topk_correct(logits, y)
        sums += torch.tensor([F.cross_entropy(logits, y, reduction="sum").item(), top1, top5, len(y)],
                             dtype=torch.float64, device=dist_.device)
    if dist_.ddp:
        dist.all_reduce(sums)
    model.train(was_training)
    loss, top1, top5, n = sums.tolist()
    return {"test_loss": loss / n, "test_acc1": 100 * top1 / n, "test_acc5": 100 * top5 / n}


# ---- 6. The fine-tuning task: training loss, EMA, evaluation, pictures --------------------------------------------

@torch.no_grad()
def save_predictions(path: str, model: nn.Module, views: SeededViews, classes: list[str], device) -> None:
    """A grid of the first val images, each captioned "true -> predicted" (green when right, red when wrong)."""
    was_training = model.training
    model.eval()
    x, y = zip(*[views[i][:2] for i in range(min(16, len(views)))])
    images = torch.stack(x)                                               # (P, 3, H, W), normalised
    pred = model(images.to(device)).argmax(dim=1).tolist()
    model.train(was_training)
    pictures = denormalize(images)                                        # (P, 3, H, W) in [0, 1]
    tile, cols = max(96, pictures.shape[-1]), 8
    canvas = Image.new("RGB", (cols * tile, math.ceil(len(pred) / cols) * (tile + 14)), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (img, true, guess) in enumerate(zip(pictures, y, pred)):
        arr = (img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)   # (H, W, 3)
        left, top = (i % cols) * tile, (i // cols) * (tile + 14)
        canvas.paste(Image.fromarray(arr).resize((tile - 4, tile - 4), Image.NEAREST), (left + 2, top + 2))
        draw.text((left + 2, top + tile - 2), f"{classes[true]} -> {classes[guess]}",
                  fill=(0, 128, 0) if true == guess else (200, 0, 0))
    save_image(path, canvas)


# The attention modules whose `keep_attention` switch records softmax probabilities (hivit.py, fast_itpn.py).
ATTENTION_MODULES = (hivit.Attention, fast_itpn.FastAttention)
ATTENTION_IMAGES, PAIRS_PER_ROW = 8, 4   # val images in the attention picture; (image, heat map) pairs per row


def last_attention_block(model: nn.Module) -> nn.Module:
    """The last stage-3 attention of a classifier or linear probe: `blocks[-1].attn` of the HiViT / ViT / Fast-iTPN
    backbone (iTPN: of `backbone`, or `backbone.vit`). Found as the last attention module registered: stage 3
    comes after the MLP-only stages, and a classifier has no pyramid or decoder after it."""
    blocks = [m for m in model.modules() if isinstance(m, ATTENTION_MODULES)]
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no hivit.Attention / fast_itpn.FastAttention module")
    return blocks[-1]


def received_attention(attn: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
    """Softmax probabilities (B, heads, T, T) -> (B, Hp, Wp): the attention each unit receives, averaged over the
    unit queries and the heads (a CLS token, T = N + 1 first, is left out as query and as key).

    Why this map and not one query's row: the classifiers have no CLS token, they mean-pool the units, and
    mean_i sum_j a_ij v_j = sum_j (mean_i a_ij) v_j, so entry j is unit j's weight in the pooled output of the
    last attention (per head; averaged over heads). Without a CLS token every map sums to 1 (uniform: 1/N each)."""
    n = grid_hw[0] * grid_hw[1]
    units = attn[:, :, -n:, -n:]                                          # (B, heads, N, N): unit queries, keys
    return units.mean(dim=(1, 2)).reshape(-1, *grid_hw)                   # (B, Hp, Wp)


def heat_overlay(image: torch.Tensor, heat: torch.Tensor) -> torch.Tensor:
    """(3, H, W) image in [0, 1] and (Hp, Wp) heat -> (3, H, W): half a grey copy of the image, half a blue (low)
    to red (high) colour of the heat, bilinearly upsampled to the image and min-max scaled per image."""
    h = F.interpolate(heat[None, None].float(), size=image.shape[-2:], mode="bilinear",
                      align_corners=False)[0]                              # (1, H, W)
    h = (h - h.min()) / (h.max() - h.min()).clamp_min(1e-12)              # (1, H, W) in [0, 1]
    colour = torch.cat([h, torch.zeros_like(h), 1 - h])                   # (3, H, W): red = high, blue = low
    return 0.5 * image.mean(dim=0, keepdim=True) + 0.5 * colour           # (3, H, W)


@torch.no_grad()
def save_attention(path: str, model: nn.Module, views: SeededViews, classes: list[str], *, unit: int,
                   device) -> bool:
    """iTPN Fig. 6-style picture of the last attention block: for the first ATTENTION_IMAGES val images, the image
    (captioned "true -> predicted") and beside it the attention each unit receives (received_attention) as a heat
    map over a grey copy, captioned with its peak as a multiple of uniform attention (1/N).

    Returns False (and draws nothing) for a Fast-iTPN with token migration or window attention, which has no
    N x N map. The switch is on for this one forward only."""
    backbone = model.encoder if isinstance(model, LinearProbe) else model
    if isinstance(backbone, fast_itpn.FastiTPN) and backbone.accelerated():
        print0("attention picture skipped: token migration / window attention leave no N x N attention map")
        return False
    block, was_training = last_attention_block(model), model.training
    x, y = zip(*[views[i][:2] for i in range(min(ATTENTION_IMAGES, len(views)))])
    images = torch.stack(x)                                               # (P, 3, H, W), normalised
    model.eval()
    block.keep_attention = True
    try:
        pred = model(images.to(device)).argmax(dim=1).tolist()
        attn = block.last_attention.cpu()                                 # (P, heads, T, T)
    finally:
        block.keep_attention, block.last_attention = False, None
        model.train(was_training)
    grid_hw = (images.shape[-2] // unit, images.shape[-1] // unit)
    received = received_attention(attn, grid_hw)                          # (P, Hp, Wp)
    pictures = denormalize(images)                                        # (P, 3, H, W) in [0, 1]
    tile, cols = max(96, pictures.shape[-1]), 2 * min(PAIRS_PER_ROW, len(pred))
    canvas = Image.new("RGB", (cols * tile, math.ceil(2 * len(pred) / cols) * (tile + 14)), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (img, heat, true, guess) in enumerate(zip(pictures, received, y, pred)):
        left, top = (2 * i % cols) * tile, (2 * i // cols) * (tile + 14)
        for j, (arr, caption) in enumerate([(img, f"{classes[true]} -> {classes[guess]}"),
                                            (heat_overlay(img, heat), f"peak {heat.max() * heat.numel():.2f}x")]):
            rgb = (arr.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)   # (H, W, 3)
            canvas.paste(Image.fromarray(rgb).resize((tile - 4, tile - 4), Image.BILINEAR),
                         (left + j * tile + 2, top + 2))
            draw.text((left + j * tile + 2, top + tile - 2), caption,
                      fill=(0, 0, 0) if j else (0, 128, 0) if true == guess else (200, 0, 0))
    save_image(path, canvas)
    return True


class FinetuneTask:
    """The task train.Trainer drives (its docstring has the interface): classification with optional MixUp /
    CutMix, label smoothing and an EMA of the weights; evaluation after every epoch."""

    def __init__(self, model: nn.Module, views: SeededViews, val_views: SeededViews, *, cfg: FinetuneConfig,
                 dist_: Dist, classes: list[str]):
        self.model, self.cfg, self.dist = model.to(dist_.device), cfg, dist_
        self.views, self.val_views, self.classes, self.num_samples = views, val_views, classes, len(views)
        self.mix = make_mixing(mixup=cfg.mixup, cutmix=cfg.cutmix, num_classes=len(classes))
        self.ema = None
        if cfg.model_ema:
            self.ema = AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(cfg.model_ema_decay),
                                     use_buffers=True)

    def batches(self, epoch: int, skip: int):
        return epoch_loader(self.views, epoch=epoch, skip_batches=skip, batch_size=self.cfg.batch_size,
                            dist_=self.dist, num_workers=self.cfg.num_workers)

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
        x, y = x.to(self.dist.device, non_blocking=True), y.to(self.dist.device, non_blocking=True)
        if self.mix is not None:                                          # y becomes soft targets (B, K)
            x, y = self.mix(x, y)
        logits = model(x).float()                                         # (B, K)
        # cross_entropy smooths soft targets too: (1 - eps) * y + eps / K, which is timm's mixed smoothing
        return {"loss": F.cross_entropy(logits, y, label_smoothing=self.cfg.smoothing)}

    def after_step(self, progress: float) -> None:
        if self.ema is not None:
            self.ema.update_parameters(self.model)

    def evaluate(self) -> dict:
        options = dict(batch_size=self.cfg.batch_size, dist_=self.dist, num_workers=self.cfg.num_workers)
        record = evaluate(self.model, self.val_views, **options)
        if self.ema is not None:
            record.update({f"{k}_ema": v for k, v in evaluate(self.ema.module, self.val_views, **options).items()})
        return record

    def end_of_epoch(self, epoch: int, *, finished: bool, last: bool) -> dict:
        record = self.evaluate()
        print0(f"epoch {epoch}: val top-1 {record['test_acc1']:.2f}%, top-5 {record['test_acc5']:.2f}%, loss "
               f"{record['test_loss']:.4f} ({len(self.val_views)} images)")
        if last and self.dist.master:
            save_predictions(os.path.join(self.cfg.output_dir, f"predictions-epoch{epoch:03d}.png"), self.model,
                             self.val_views, self.classes, self.dist.device)
            save_attention(os.path.join(self.cfg.output_dir, f"attention-epoch{epoch:03d}.png"), self.model,
                           self.val_views, self.classes, unit=unit_of(self.cfg.model),
                           device=self.dist.device)
        return record

    def state(self) -> dict:
        return {"model_ema": self.ema.state_dict()} if self.ema is not None else {}

    def load_state(self, ckpt: dict) -> None:
        if self.ema is not None:
            if "model_ema" not in ckpt:
                raise ConfigError("the checkpoint has no EMA weights (written without --model_ema): add "
                                  "--no-model_ema")
            self.ema.load_state_dict(ckpt["model_ema"])


# ---- 7. main ------------------------------------------------------------------------------------------------------

def check_flags(cfg: FinetuneConfig) -> None:
    """Flag combinations the range checks cannot see (the model's unit, linear probing, --eval)."""
    unit = unit_of(cfg.model)
    if cfg.input_size % unit:
        raise ConfigError(f"--input_size {cfg.input_size} is not a multiple of {cfg.model}'s {unit}-px unit; try "
                          f"{max(unit, cfg.input_size // unit * unit)} or {(cfg.input_size // unit + 1) * unit}")
    if cfg.linear_probe and cfg.batch_size < 2:
        raise ConfigError("--linear_probe normalises features with BatchNorm, which needs --batch_size >= 2")
    if cfg.eval and not (cfg.resume or cfg.finetune):
        raise ConfigError("--eval evaluates weights: give a fine-tuned checkpoint with --resume (or --finetune)")


def classes_of(cfg: FinetuneConfig) -> tuple[Dataset, Dataset, list[str]]:
    """The labelled splits, with --nb_classes checked against (or read from) the data."""
    train_set, val_set, classes = labelled_splits(cfg)
    if cfg.nb_classes is not None and cfg.nb_classes != len(classes):
        shown = ", ".join(classes[:8]) + (", ..." if len(classes) > 8 else "")
        raise ConfigError(f"--nb_classes {cfg.nb_classes} but the data has {len(classes)} classes ({shown}): leave "
                          f"--nb_classes out to read it from the data")
    cfg.nb_classes = len(classes)
    return train_set, val_set, classes


def build_model(cfg: FinetuneConfig, pretrained: Pretrained | None, resumed: dict | None) -> nn.Module:
    """The classifier (or linear probe) with the --finetune weights loaded; a resumed run loads its own later.
    CLIP-style weights carry layer scales (gamma), so the architecture follows the weights it will receive."""
    weights = resumed["model"] if resumed is not None else \
        {k: v for k, v in pretrained.state.items() if k.startswith(pretrained.prefix)} if pretrained else {}
    torch.manual_seed(cfg.seed)                                           # the same init on every rank
    model = build_classifier(cfg.model, num_classes=cfg.nb_classes, drop_path=cfg.drop_path,
                             input_size=cfg.input_size, migration_ratio=cfg.migration_ratio, attention=cfg.attention,
                             layer_scale=any(k.endswith("gamma_1") for k in weights))
    if pretrained is not None and resumed is None:
        report = load_pretrained(model, pretrained, model_name=cfg.model)
        if cfg.eval and any(owner(k) == "head" for k in report["fresh"]):
            raise ConfigError(f"--eval: {pretrained.source} has no head for these {cfg.nb_classes} classes (a "
                              f"pre-training checkpoint?): fine-tune it first, then --eval --resume the result")
    return LinearProbe(model, cfg.nb_classes) if cfg.linear_probe else model


def make_optimizer(model: nn.Module, cfg: FinetuneConfig, lr: float) -> torch.optim.Optimizer:
    """AdamW (0.9, 0.999) with layer-decay groups for fine-tuning; LARS on the head for linear probing (MAE)."""
    if cfg.linear_probe:
        return LARS([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=cfg.weight_decay)
    groups = layer_decay_groups(model, family=MODELS[cfg.model][0], cfg=model.cfg, weight_decay=cfg.weight_decay,
                                layer_decay=cfg.layer_decay)
    return torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"} for g in groups], lr=lr)


def load_for_eval(trainer: Trainer, ckpt: dict, path: str, cfg: FinetuneConfig) -> None:
    """--eval --resume: the checkpoint must come from a run of this model and protocol, and fit it tensor for tensor
    (another --input_size: evaluate it with --finetune, which resizes the position tables)."""
    was = {k: ckpt["args"].get(k) for k in ("model", "linear_probe")}
    if was != {"model": cfg.model, "linear_probe": cfg.linear_probe}:
        raise ConfigError(f"--resume {path} was written with {' '.join(f'--{k} {v}' for k, v in was.items())}: "
                          f"evaluate it with those flags")
    trainer.load_weights(ckpt, path, hint=f"evaluate it at the --input_size it was trained at "
                                          f"({ckpt['args'].get('input_size')}), or pass it as --finetune with --eval")


def prepare(cfg: FinetuneConfig, dist_: Dist, pretrained: Pretrained | None):
    """Everything a run needs before its first step: (task, trainer, resume path); raises ConfigError on bad input."""
    check_flags(cfg)
    resume = find_checkpoint(cfg.output_dir) if cfg.resume == "auto" else cfg.resume or None
    if cfg.resume == "auto" and resume is None:
        print0(f"--resume auto: no checkpoint in {cfg.output_dir}, starting a fresh run")
    if not cfg.eval:
        prepare_output_dir(cfg, resuming=resume is not None)
    ckpt = load_checkpoint(resume, required=("model", "args")) if resume else None
    train_set, val_set, classes = classes_of(cfg)
    model = build_model(cfg, pretrained, ckpt)
    views = SeededViews(train_set, train_transform(cfg.input_size, randaug=cfg.randaug, reprob=cfg.reprob),
                        seed=cfg.seed)
    task = FinetuneTask(model, views, SeededViews(val_set, eval_transform(cfg.input_size), seed=cfg.seed), cfg=cfg,
                        dist_=dist_, classes=classes)
    eff_batch = cfg.batch_size * cfg.accum_iter * dist_.world_size
    if not cfg.eval and len(views) < eff_batch:
        raise ConfigError(f"{len(views)} training images do not fill one step of {eff_batch} images: lower "
                          f"--batch_size / --accum_iter or add images")
    lr = cfg.lr if cfg.lr is not None else cfg.blr * eff_batch / 256     # MAE's linear scaling rule
    run_config = {"args": asdict(cfg), "world_size": dist_.world_size, "effective_batch_size": eff_batch, "lr": lr,
                  "device": str(dist_.device), "pretrained": pretrained.source if pretrained else None,
                  "config": {"model": asdict(MODELS[cfg.model][1])}}
    trainer = Trainer(task, cfg=cfg, dist_=dist_, optimizer=make_optimizer(task.model, cfg, lr), best="test_acc1",
                      run_config=run_config,
                      lr_at=cosine_schedule(cfg, lr=lr, steps_per_epoch=count_steps(len(views), cfg, dist_)))
    if ckpt is not None and cfg.eval:
        load_for_eval(trainer, ckpt, resume, cfg)
    elif ckpt is not None:
        trainer.resume(ckpt, resume)
    return task, trainer, resume


DESCRIPTION = ("Fine-tune (or linearly probe) a HiViT / iTPN / Fast-iTPN / ViT classifier. Flags left unset take "
               "the recipe of the model and checkpoint (RECIPES in finetune.py).")
EPILOG = (f"models: {', '.join(MODELS)}\nrecipes: {', '.join(RECIPES)}\n\n" + __doc__[__doc__.index("Run:"):])


def main(argv=None) -> list[dict]:
    argv = sys.argv[1:] if argv is None else argv
    read = {}

    def recipe(c: FinetuneConfig) -> str:                                 # the checkpoint decides pixel / CLIP
        read["pretrained"] = read_pretrained(c.finetune) if c.finetune else None
        read["recipe"] = recipe_name(c.model, read["pretrained"].kind if read["pretrained"] else None, c.linear_probe)
        return read["recipe"]

    with script_errors():
        cfg, _ = parse_config(FinetuneConfig, argv, description=DESCRIPTION, defaults=RECIPES, recipe=recipe,
                              epilog=EPILOG)
        dist_ = setup_distributed(cfg)
        pretrained = read["pretrained"]
        try:
            task, trainer, resume = prepare(cfg, dist_, pretrained)
        except (ValueError, KeyError, FileNotFoundError) as err:         # the model files' checks, by type
            raise ConfigError(err.args[0] if err.args else str(err)) from None
        print0(f"{cfg.model} {'linear probe' if cfg.linear_probe else 'fine-tuning'} from "
               f"{pretrained.source if pretrained else 'scratch'} (recipe {read['recipe']}) on {dist_.device} x "
               f"{dist_.world_size}, data: {cfg.data_path or 'built-in shapes'} ({task.num_samples} train / "
               f"{len(task.val_views)} val images, {cfg.nb_classes} classes), output: {cfg.output_dir}")
        if cfg.eval:                                                      # MAE's --eval: print, write nothing
            record = task.evaluate()
            print0(json.dumps(record))
            return [record]
        return trainer.launch(script=__file__, argv=argv, resuming=resume is not None)


if __name__ == "__main__":
    main()
