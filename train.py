r"""train.py: masked image pre-training of HiViT / iTPN / Fast-iTPN / ViT, from a laptop CPU to 8 GPUs x N nodes.

Paper:
    Integrally Pre-Trained Transformer Pyramid Networks (iTPN; Tian et al., CVPR 2023, arXiv 2211.12735), whose
    recipe is MAE's (Masked Autoencoders Are Scalable Vision Learners; He et al., CVPR 2022, arXiv 2111.06377).
    Methods come from mim.py (MAE, SimMIM, FastMIM, M3I), itpn.py (the iTPN paper method, the official pixel
    recipe, frozen-teacher distillation) and fast_itpn.py (Fast-iTPN distillation, TPAMI 2024).

Implements:
    The pre-training driver: one loop that runs any --method on any --model, single process or under torchrun
    (DDP), on an image folder or on the built-in procedural `ShapesDataset`, with MAE's flags, checkpoints that
    resume bit-for-bit, a JSON-lines log and reconstruction pictures. `python train.py` with no arguments is the
    classroom demo: tiny iTPN, paper method (MIM + MFM), built-in shapes, a few minutes on 2 CPU cores.

Sections:
    1. Setup: DDP from torchrun's environment, seeds  <-> MAE recipe (torchrun, DistributedSampler)
    2. Data: ShapesDataset, image folders, augmentation <-> MAE Sec. 4 / iTPN Tab. 7: RandomResizedCrop(0.2-1) + flip
    3. Model: --model and --method tables             <-> iTPN Sec. 3.3-3.4 (mim.py / itpn.py / fast_itpn.py)
    4. Optimizer: AdamW, no decay on 1-D params       <-> iTPN Tab. 7: AdamW (0.9, 0.95), wd 0.05
    5. Schedule: get_lr(step)                         <-> iTPN Tab. 7: lr = 1.5e-4 x batch / 256, cosine, warm-up
    6. Run records: checkpoints, log, pictures        <-> MAE checkpoint-<epoch>.pth, log.txt, MAE Fig. 2 panels
    7. The training loop                              <-> MAE engine_pretrain (accumulation, AMP, clip)
    8. Flags and __main__                             <-> MAE main_pretrain.py flags

Shapes:
    B images per GPU per micro-step, V views per image (1, or 2 for M3I), H = W = --input_size, N = (H/16)^2
    units, P picture panels. mask: (B, N) float, 1 = removed (masked), 0 = kept (visible).

Differences from the paper / official code:
    - Defaults come from one of two recipes: "paper" (224 px, batch 64 per GPU, 400 epochs, 40 warm-up) for the
      paper-size models, "demo" (64 px, 400 built-in images, 30 epochs) for the tiny CPU models. Any flag overrides.
      The paper's effective batch is 4096 = 64 GPUs x 64; on 8 GPUs add --accum_iter 8 to keep it.
    - Randomness is seeded per step, not per process: augmentation from (seed, epoch, image index), masking and
      drop path from (seed, step, shard), shard = micro_step * world_size + rank. So a resumed run is bitwise the
      run that was never stopped (CPU), and with --batch_size 1 a run on R ranks with --accum_iter A equals a
      single-process run with --accum_iter R*A (same images, same masks). MAE seeds each process once (seed+rank).
      Other splits of one effective batch (accum 2 x batch 1 vs batch 2) see the same images and, as each micro-batch
      loss is divided by accum_iter, the same gradient for an RNG-free loss; real methods' masks then differ.
    - Unreadable images are replaced by the next readable one and counted (log key skipped_images); MAE crashes.
    - A checkpoint holds plain types only (args as a dict, RNG states as lists/tensors): torch.load(...,
      weights_only=True) reads it. Each is written to a .tmp file, fsynced, then renamed (MAE writes in place), so
      a crash or power loss keeps the previous one. `checkpoint-last.pth` is rewritten every epoch and at
      --max_steps; numbered `checkpoint-<epoch>.pth` files are kept every --save_every epochs. Resuming with another
      effective batch (batch_size x accum_iter x world size) is refused; MAE resumes and silently changes the schedule.
    - bf16 autocast (no GradScaler) on CUDA by default, fp32 on CPU (CPU bf16 is ~35x slower without bf16 units);
      the official code used fp16 + GradScaler (still available: --amp fp16).
    - One optimisation recipe (iTPN's = MAE's) for every --method; FastMIM's and M3I's own lr/epochs are flags away.
      After each step train.py calls ema_update(progress=step/total): M3I ramps its momentum to 1 (cosine, as
      BYOL/SiameseIM), iTPN's paper method keeps the paper's constant 0.996.
    - M3I (2 views): both views handed over are the same crop; mim.py cuts the second view from it itself, so it
      knows the geometry between the two (there is no colour augmentation here).

Run:
    python train.py                                         # CPU demo: tiny iTPN, built-in shapes, ~3 min, output/
    python train.py --model itpn_b --data_path /imagenet --batch_size 8 --max_steps 20      # one-GPU/CPU smoke test
    torchrun --nproc_per_node 8 train.py --model itpn_b --data_path /imagenet --accum_iter 8  # paper: eff. batch 4096
    torchrun --nnodes 8 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 \
        train.py --model itpn_b --data_path /imagenet     # the same on each of 8 nodes (HOST: one of them): 64 GPUs
    python train.py --resume auto --output_dir output       # continue the run in output/ where it stopped
"""

import argparse
import glob
import json
import math
import os
import random
import shutil
import subprocess
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, fields, is_dataclass, replace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torchvision.transforms as T
from PIL import Image, ImageDraw
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.utils import make_grid
from tqdm import tqdm

import fast_itpn
import hivit
import itpn
import mim

# What finetune.py / detect_seg.py may import (the data, DDP setup, optimizer, schedule and checkpoint pieces).
__all__ = ["setup_distributed", "seed_for", "print0", "SHAPE_CLASSES", "ShapesDataset", "to_rgb", "ImageFiles",
           "PretrainViews", "IMAGENET_MEAN", "IMAGENET_STD", "MODELS", "METHODS", "param_groups", "get_lr",
           "save_checkpoint", "load_checkpoint", "find_checkpoint", "rng_state", "set_rng_state", "main"]


# ---- 1. Setup: DDP from torchrun's environment, seeds -------------------------------------------------------------

def setup_distributed(device_name: str):
    """(rank, world_size, device) from torchrun's RANK / LOCAL_RANK / WORLD_SIZE; one process when they are unset.

    torchrun (or `torchrun --nnodes ...` on every node) exports these variables; nothing else launches DDP here.
    NCCL on GPUs, gloo on CPU.
    """
    use_cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if use_cuda else "cpu")
    rank, local_rank, world_size = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return rank, world_size, torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")   # one GPU per process


def print0(*args, **kwargs) -> None:
    """print on rank 0 only (torchrun sets RANK; without it this is the only process)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(*args, **kwargs)


def seed_for(*keys: int) -> int:
    """A well-mixed 32-bit seed from integers, e.g. (seed, step, shard); the same on every machine and process."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0])


# ---- 2. Data: the built-in ShapesDataset, image folders, augmentation ---------------------------------------------

SHAPE_CLASSES = ("circle", "square", "triangle", "star", "ellipse", "cross", "hexagon", "ring")  # labels 1..K
SPLITS = {"train": 0, "val": 1, "test": 2}
SUPERSAMPLE = 4          # shapes are drawn at 4x resolution and box-filtered down (anti-aliasing)
MIN_VISIBLE = 0.3        # an instance less than 30% visible after occlusion is dropped from the targets


def shape_outline(name: str, rng: np.random.Generator):
    """Polygon(s) of a shape in unit coordinates (radius ~1, centred): (outline (k, 2), hole (k, 2) or None)."""
    t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    circle = np.stack([np.cos(t), np.sin(t)], 1)                          # (48, 2)
    if name in ("circle", "ring"):
        return circle, (circle * rng.uniform(0.45, 0.65) if name == "ring" else None)
    if name == "ellipse":
        return circle * [1.0, rng.uniform(0.4, 0.6)], None               # aspect is the class cue here
    if name == "star":
        t = np.linspace(0, 2 * np.pi, 10, endpoint=False)
        r = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        return np.stack([r * np.cos(t), r * np.sin(t)], 1), None          # (10, 2)
    if name == "cross":
        a = 0.35                                                          # half arm width
        return np.array([[a, 1], [a, a], [1, a], [1, -a], [a, -a], [a, -1], [-a, -1], [-a, -a], [-1, -a],
                         [-1, a], [-a, a], [-a, 1]], dtype=float), None
    sides = {"square": 4, "triangle": 3, "hexagon": 6}[name]
    t = np.linspace(0, 2 * np.pi, sides, endpoint=False) + np.pi / sides
    return np.stack([np.cos(t), np.sin(t)], 1), None                      # (sides, 2)


class ShapesDataset(Dataset):
    """Procedural scenes of coloured shapes on textured backgrounds: no files, no network, no licence.

    Sample i is drawn from np.random.default_rng([seed, split, i]), so it is the same in every DataLoader worker,
    every DDP rank and every rerun. One generator serves every task (finetune.py and detect_seg.py reuse it):
        task="pretrain" -> (PIL image, 0)               label ignored, like ImageFolder for MIM
        task="cls"      -> (PIL image, label in 0..K-1) one centred object; only its shape tells the class
        task="det"/"seg"-> (PIL image, {"labels" (n,) 1..K, "boxes" (n, 4) xyxy px, "masks" (n, H, W) bool,
                                        "semantic" (H, W) uint8: 0 background, k class, 255 ignore})
    Colour, size, rotation, aspect, position, texture and background vary independently of the class.
    """

    def __init__(self, num_images: int, *, image_size: int = 64, seed: int = 0, split: str = "train",
                 task: str = "pretrain", num_objects: tuple[int, int] = (1, 4),
                 scale: tuple[float, float] = (0.15, 0.4)):
        if task not in ("pretrain", "cls", "det", "seg"):
            raise ValueError(f"task must be pretrain, cls, det or seg, got {task!r}")
        self.num_images, self.image_size, self.seed, self.split = num_images, image_size, seed, SPLITS[split]
        self.task, self.num_objects, self.scale = task, num_objects, scale

    def __len__(self):
        return self.num_images

    def background(self, rng) -> np.ndarray:
        """(S, S, 3) float in [0, 1]: a two-colour gradient or low-frequency noise, plus pixel noise."""
        s = self.image_size
        c0, c1 = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
        if rng.random() < 0.5:
            ramp = np.linspace(0, 1, s)[:, None, None]                   # (S, 1, 1) vertical gradient
            img = c0 + (c1 - c0) * (ramp if rng.random() < 0.5 else ramp.transpose(1, 0, 2))   # (S, S, 3)
        else:
            coarse = Image.fromarray((rng.uniform(0, 1, (4, 4)) * 255).astype(np.uint8))      # 4x4 noise
            low = np.asarray(coarse.resize((s, s), Image.BICUBIC), dtype=np.float64)[..., None] / 255  # (S, S, 1)
            img = c0 + (c1 - c0) * low                                    # (S, S, 3) "texture"
        return np.clip(img + rng.normal(0, 0.03, (s, s, 3)), 0, 1)

    def scene(self, index: int) -> dict:
        """Render scene `index`: image (H, W, 3) uint8 and all targets (see the class docstring)."""
        rng = np.random.default_rng([self.seed, self.split, index])
        s, big = self.image_size, self.image_size * SUPERSAMPLE
        img = self.background(rng)
        n = 1 if self.task == "cls" else int(rng.integers(self.num_objects[0], self.num_objects[1] + 1))
        labels, masks, drawn = [], [], []
        for _ in range(n):
            label = int(rng.integers(len(SHAPE_CLASSES)))
            outline, hole = shape_outline(SHAPE_CLASSES[label], rng)
            radius = rng.uniform(*self.scale) * s * (1.3 if self.task == "cls" else 1.0)
            centre = (rng.normal(s / 2, s / 16, 2) if self.task == "cls" else rng.uniform(radius, s - radius, 2))
            angle = rng.uniform(0, 2 * np.pi)
            rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
            aspect = np.array([1.0, rng.uniform(0.8, 1.0)])                # nuisance: mild squash
            layer = Image.new("L", (big, big), 0)
            draw = ImageDraw.Draw(layer)
            for poly, fill in ((outline, 255), (hole, 0)):
                if poly is not None:
                    pts = (poly * aspect) @ rot.T * radius * SUPERSAMPLE + centre * SUPERSAMPLE   # (k, 2) px
                    draw.polygon([tuple(p) for p in pts], fill=fill)
            alpha = np.asarray(layer.resize((s, s), Image.BOX), dtype=np.float64)[..., None] / 255  # (S, S, 1)
            colour = rng.uniform(0, 1, 3)
            if rng.random() < 0.5:                                        # texture: stripes across the object
                stripes = 0.5 + 0.5 * np.sin(np.arange(s) * rng.uniform(0.5, 1.5))[:, None, None]   # (S, 1, 1)
                colour = colour * (0.7 + 0.3 * stripes)                   # (S, 1, 3)
            img = img * (1 - alpha) + colour * alpha                     # z-order: later objects on top
            hard = alpha[..., 0] >= 0.5                                   # (S, S) bool
            masks = [m & ~hard for m in masks]                            # occlusion removes hidden pixels
            labels.append(label + 1)
            masks.append(hard)
            drawn.append(hard.sum())
        keep = [i for i, m in enumerate(masks) if m.sum() >= MIN_VISIBLE * max(drawn[i], 1) and m.any()]
        semantic = np.zeros((s, s), dtype=np.uint8)
        for i, m in enumerate(masks):                                     # dropped fragments -> 255 (ignore)
            semantic[m] = labels[i] if i in keep else 255
        masks = np.stack([masks[i] for i in keep]) if keep else np.zeros((0, s, s), dtype=bool)   # (n, S, S)
        boxes = np.zeros((len(keep), 4), dtype=np.float32)
        for j, m in enumerate(masks):
            ys, xs = np.nonzero(m)
            boxes[j] = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)   # xyxy, tight around the visible part
        image = (np.clip(img * rng.uniform(0.8, 1.2) + rng.uniform(-0.1, 0.1), 0, 1) * 255).astype(np.uint8)
        return {"image": image, "labels": np.array([labels[i] for i in keep], dtype=np.int64), "boxes": boxes,
                "masks": masks, "semantic": semantic}

    def __getitem__(self, index: int):
        scene = self.scene(index)
        image = Image.fromarray(scene["image"])
        if self.task == "pretrain":
            return image, 0
        if self.task == "cls":
            return image, int(scene["labels"][0]) - 1 if len(scene["labels"]) else 0
        return image, {k: scene[k] for k in ("labels", "boxes", "masks", "semantic")}


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB: 16-bit and 32-bit greyscale are rescaled, palette/grey/alpha converted."""
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        arr = np.asarray(img, dtype=np.float64)
        arr = arr / 257 if arr.max() > 255 else arr                       # 16-bit range -> 8-bit
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    return img.convert("RGB")                                             # RGBA: alpha dropped; L/P/LA expanded


class ImageFiles(Dataset):
    """Every image file under `root`, recursively (labels ignored): an ImageFolder tree or a flat folder.

    MAE's layout <root>/train/<class>/<img> is used when <root>/train exists. __getitem__ raises on unreadable
    or truncated files; PretrainViews skips them.
    """

    def __init__(self, root: str):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"--data_path {root!r} is not a directory (omit --data_path for the built-in "
                                    f"shapes dataset)")
        self.root = os.path.join(root, "train") if os.path.isdir(os.path.join(root, "train")) else root
        self.paths = sorted(os.path.join(d, f) for d, _, files in os.walk(self.root, followlinks=True)
                            for f in files if f.lower().endswith(IMG_EXTENSIONS))
        if not self.paths:
            raise FileNotFoundError(f"no image files ({', '.join(IMG_EXTENSIONS[:4])}, ...) under {self.root!r}")

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index: int):
        with Image.open(self.paths[index]) as img:
            return to_rgb(img), 0                                         # convert() reads the whole file


IMAGENET_MEAN, IMAGENET_STD = itpn.IMAGENET_MEAN, itpn.IMAGENET_STD     # the student's input normalisation
MAX_BAD_IN_A_ROW = 50    # this many unreadable files in a row means the data path is wrong, not a few bad files


class PretrainViews(Dataset):
    """Augmented crop of dataset[i] -> ((3, H, W) or (V, 3, H, W) normalised, number of files skipped).

    MAE / iTPN augmentation: RandomResizedCrop(scale 0.2-1, bicubic) + horizontal flip + ImageNet mean/std.
    The crop is seeded by (seed, epoch, i), so it does not depend on the worker, the rank or a resume. Set `.epoch`
    and `.input_size` before building each epoch's DataLoader (its workers get a fresh copy of this object).
    """

    def __init__(self, dataset: Dataset, *, input_size: int, num_views: int = 1, seed: int = 0):
        self.dataset, self.input_size, self.num_views, self.seed, self.epoch = dataset, input_size, num_views, seed, 0

    def transform(self, img: Image.Image) -> torch.Tensor:
        """(3, H, W) with H = W = self.input_size (FastMIM-P changes it between epochs)."""
        return T.Compose([
            T.RandomResizedCrop(self.input_size, scale=(0.2, 1.0), interpolation=T.InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])(img)

    def __len__(self):
        return len(self.dataset)

    def read(self, index: int):
        """(PIL image, skipped): the first readable image at index, index+1, ... with a warning for each bad one."""
        tries = min(len(self.dataset), MAX_BAD_IN_A_ROW)
        for skipped in range(tries):
            j = (index + skipped) % len(self.dataset)
            try:
                return self.dataset[j][0], skipped
            except (OSError, SyntaxError, ValueError) as err:             # PIL raises all three on broken files
                warnings.warn(f"skipping unreadable image #{j}: {err}")
        verdict = "no image in the dataset is readable" if tries == len(self.dataset) else "check the data"
        raise RuntimeError(f"{tries} images in a row could not be read (from #{index}); {verdict}")

    def __getitem__(self, index: int):
        img, skipped = self.read(index)
        with torch.random.fork_rng(devices=[]):                          # torchvision draws from torch's CPU RNG
            torch.manual_seed(seed_for(self.seed, self.epoch, index))
            view = self.transform(img)                                    # (3, H, W)
        if self.num_views == 1:
            return view, skipped
        # M3I: mim.py cuts the second view out of this crop itself, so it knows the geometry between the two;
        # with no colour augmentation here, the V views handed over are the same crop.
        return view.expand(self.num_views, -1, -1, -1).clone(), skipped   # (V, 3, H, W)


def epoch_loader(views: PretrainViews, *, epoch: int, input_size: int, skip_batches: int, batch_size: int,
                 rank: int, world_size: int, seed: int, num_workers: int, pin_memory: bool) -> DataLoader:
    """This rank's batches of one epoch, starting after `skip_batches` (mid-epoch resume).

    DistributedSampler + set_epoch gives every rank a disjoint 1/world_size of one shuffled order (the same
    order for any world size: rank r reads positions r, r+R, r+2R, ...). Its index list, minus what was already
    consumed, is the sampler of a fresh DataLoader; no image is loaded only to be thrown away.
    """
    sampler = DistributedSampler(views, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True)
    sampler.set_epoch(epoch)
    views.epoch, views.input_size = epoch, input_size
    order = list(sampler)[skip_batches * batch_size:]
    return DataLoader(views, batch_size=batch_size, sampler=order, num_workers=num_workers,
                      pin_memory=pin_memory, drop_last=True)


# ---- 3. Model: the --model and --method tables --------------------------------------------------------------------

# --model name -> (family, size preset). The names are the presets' own, the tiny CPU presets get a family prefix.
MODELS: dict[str, tuple[str, object]] = {
    **{("hivit_tiny" if k == "tiny" else k): ("hivit", cfg) for k, cfg in hivit.PRESETS.items()},
    **{k: ("vit", cfg) for k, cfg in hivit.VIT_PRESETS.items()},
    **{("itpn_tiny" if k == "tiny" else k): ("itpn", cfg) for k, cfg in itpn.PRESETS.items()},
    **{("fast_itpn_tiny" if k == "tiny" else k): ("fast_itpn", cfg) for k, cfg in fast_itpn.PRESETS.items()},
}
# --method name -> the file that defines it. itpn.py's and fast_itpn.py's methods build their own model from a size
# preset; mim.py's wrap any encoder with the seam forward_features(x, ids_keep=None)[-1] -> (B, N_vis, C).
METHODS: dict[str, str] = {**{name: "itpn" for name in itpn.METHODS},
                           **{name: "fast_itpn" for name in fast_itpn.METHODS},
                           **{name: "mim" for name in mim.METHODS}}
DEFAULT_METHOD = {"itpn": "itpn", "hivit": "mae", "vit": "mae", "fast_itpn": "fastmim"}   # iTPN: paper Eq. 4
TEACHER_METHODS = ("itpn_distill", "fast_itpn_distill")                  # need --teacher PATH


def compatible_methods(family: str) -> list[str]:
    """Methods that run on a model family: every mim.py method, plus the family's own (which need its pyramid)."""
    return [m for m in METHODS if METHODS[m] in ("mim", family)]


def unit_size(family: str, preset) -> int:
    """Pixels per unit (the encoder's last-stage patch): 16 for the HiViT family, patch_size for a plain ViT."""
    return preset.patch_size if family == "vit" else 16


def build_pretrainer(model: str, method: str, *, mask_ratio: float | None, norm_pix_loss: bool | None,
                     teacher: str | None, truncate: int = 0) -> nn.Module:
    """The nn.Module train.py drives (PRETRAINER CONTRACT, README "Seams"). None = the method's own default."""
    family, preset = MODELS[model]
    tiny = model.endswith("_tiny")
    if (method in TEACHER_METHODS) != (teacher is not None):
        raise ValueError(f"--teacher PATH goes with --method {' or '.join(TEACHER_METHODS)}, and only with them")
    if METHODS[method] != "mim":                                          # itpn.py / fast_itpn.py recipes
        if norm_pix_loss is not None or truncate:
            raise ValueError(f"--norm_pix_loss and --truncate are fixed by the {method} recipe; they apply to "
                             f"mim.py's methods")
        if mask_ratio is not None and METHODS[method] == "itpn":
            preset = replace(preset, mask_ratio=mask_ratio)
        elif mask_ratio is not None:
            raise ValueError(f"--mask_ratio is fixed by the {method} recipe (block masking)")
        module = itpn if METHODS[method] == "itpn" else fast_itpn
        return module.METHODS[method](preset, **({"teacher_path": teacher} if method in TEACHER_METHODS else {}))
    preset = mim.truncate_encoder_config(preset, truncate)                # FastMIM Tab. 1c (0 = full depth)
    cfg = mim.tiny_decoder(mim.PRESETS[method]) if tiny else mim.PRESETS[method]
    cfg = replace(cfg, **{k: v for k, v in (("mask_ratio", mask_ratio), ("norm_pix_loss", norm_pix_loss))
                          if v is not None})
    if family == "vit":
        encoder = hivit.VisionTransformer(replace(preset, num_classes=0))
    elif family == "fast_itpn":                                           # mim.py reads stage 3 only: no pyramid
        encoder = fast_itpn.FastiTPN(replace(preset, num_classes=0), pyramid=False)
    else:                                                                 # iTPN's backbone is a HiViT
        backbone_cfg = {f.name: getattr(preset, f.name) for f in fields(hivit.HiViTConfig)}   # drop iTPN's extras
        encoder = hivit.HiViT(hivit.HiViTConfig(**{**backbone_cfg, "num_classes": 0}))
    return mim.METHODS[method](encoder, cfg=cfg)


# ---- 4. Optimizer: AdamW, no weight decay on biases and 1-D parameters --------------------------------------------

BETAS = (0.9, 0.95)      # iTPN Tab. 7 / MAE: beta2 = 0.95 (not 0.999) for stable large-batch MIM


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """MAE's add_weight_decay: decay every matrix, not biases or 1-D tensors (norms, layer scales); frozen EMA
    or teacher parameters (requires_grad=False) are left out of the optimizer altogether."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# ---- 5. Schedule: the learning rate as a pure function of the optimizer step ---------------------------------------

def get_lr(step: int, *, lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up from 0 to lr, then half-cycle cosine to min_lr (iTPN Tab. 7, MAE per-iteration schedule).

    No scheduler object: resuming only needs the step. MAE computes the same curve from a fractional epoch.
    """
    if step < warmup_steps:
        return lr * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


# ---- 6. Run records: checkpoints, the JSON log, config.json, reconstruction pictures ------------------------------

def rng_state() -> dict:
    """Every RNG as plain types (weights_only=True loads them). Steps reseed anyway; this makes it belt and braces."""
    np_state = np.random.get_state()
    return {"python": random.getstate(), "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str, state: dict) -> None:
    """Write to path + '.tmp', fsync it, then rename: a crash mid-write leaves the previous checkpoint intact.

    os.replace is atomic on POSIX and Windows: a reader sees either the old file or the complete new one. The
    fsync before it puts the bytes on disk first, so after a power loss the name cannot point at a file whose
    data never left the page cache; the fsync of the folder after it makes the rename itself durable (POSIX).
    """
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()                                                         # Python's buffer -> the OS
        os.fsync(f.fileno())                                              # the OS's cache -> the disk
    os.replace(tmp, path)
    if hasattr(os, "O_DIRECTORY"):                                        # POSIX; Windows cannot open a folder
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def find_checkpoint(output_dir: str) -> str | None:
    """--resume auto: checkpoint-last.pth, else the numbered checkpoint of the highest epoch, else None."""
    last = os.path.join(output_dir, "checkpoint-last.pth")
    if os.path.isfile(last):
        return last
    numbered = glob.glob(os.path.join(output_dir, "checkpoint-*.pth"))
    numbered = [p for p in numbered if os.path.basename(p)[11:-4].isdigit()]
    return max(numbered, key=lambda p: int(os.path.basename(p)[11:-4]), default=None)


def load_checkpoint(path: str) -> dict:
    """torch.load with weights_only=True: plain tensors and containers only, no pickled code."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--resume {path!r}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:                                             # truncated file, pickled objects, ...
        raise ValueError(f"--resume {path!r} is not a readable checkpoint: {err}") from err


def run_record(source_dir: str) -> dict:
    """Where the code came from: the git commit (and whether the tree was dirty), or None outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=source_dir, capture_output=True, text=True,
                              timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=source_dir, capture_output=True, text=True,
                               timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return {"git_commit": None}
    return {"git_commit": head.stdout.strip() or None, "git_dirty": bool(dirty.stdout.strip())}


def denormalize(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) ImageNet-normalised -> [0, 1]."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)     # (1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)       # (1, 3, 1, 1)
    return (x * std + mean).clamp(0, 1)


@torch.no_grad()
def save_pictures(path: str, pretrainer: nn.Module, imgs: torch.Tensor, *, seed: int, norm_pix_loss: bool) -> None:
    """MAE Fig. 2 panels per image: original | masked | prediction | prediction + visible, plus the method's own
    panels (e.g. HOG target / HOG prediction). Fixed images and a fixed mask seed, so epochs compare."""
    was_training = pretrainer.training
    pretrainer.eval()
    torch.manual_seed(seed)                                               # the next step reseeds: nothing leaks
    out = pretrainer(imgs)
    pretrainer.train(was_training)
    first = imgs[:, 0] if imgs.ndim == 5 else imgs                        # (B, 3, H, W): first view
    size = first.shape[-2:]
    original = denormalize(first.float())
    unit = round(math.sqrt(size[0] * size[1] / out["mask"].shape[1]))   # units are square: N x unit^2 = H x W
    m = mim.mask_to_map(out["mask"].to(original.dtype), (size[0] // unit, size[1] // unit), unit)   # (B, H, W)
    m = m.unsqueeze(1)                                                    # (B, 1, H, W), 1 = masked
    panels = {"original": original, "masked": original * (1 - m) + 0.5 * m}   # masked units grey
    if "recon" in out:
        pred = denormalize(out["recon"].float())
        panels["prediction" + (" (unit mean/std of original)" if norm_pix_loss else "")] = pred
        panels["prediction + visible"] = original * (1 - m) + pred * m
    for name, pic in out.get("pictures", {}).items():                    # already in [0, 1], maybe another size
        panels[name] = nn.functional.interpolate(pic.float(), size=size, mode="nearest").clamp(0, 1)
    grid = make_grid(torch.stack(list(panels.values()), 1).flatten(0, 1).cpu(),   # (B * P, 3, H, W)
                     nrow=len(panels), padding=2, pad_value=1.0)         # (3, rows, cols)
    body = Image.fromarray((grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))   # (rows, cols, 3)
    header = 12 * len(panels)                                             # one text line per panel title
    canvas = Image.new("RGB", (body.width, body.height + header), "white")
    canvas.paste(body, (0, header))
    draw = ImageDraw.Draw(canvas)
    for i, name in enumerate(panels):
        draw.text((2, 12 * i), f"column {i + 1}: {name}", fill="black")
    canvas.save(path)


# ---- 7. The training loop -----------------------------------------------------------------------------------------

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def train(pretrainer: nn.Module, views: PretrainViews, *, device: torch.device, rank: int, world_size: int,
          output_dir: str, run_config: dict, checkpoint: dict | None, resume_path: str | None,
          epochs: int, warmup_epochs: float, batch_size: int, accum_iter: int, lr: float, min_lr: float,
          weight_decay: float, clip_grad: float | None, amp: str, seed: int, num_workers: int, save_every: int,
          vis_every: int, max_steps: int | None, input_size_at, norm_pix_loss: bool) -> list[dict]:
    """Pre-train `pretrainer` on `views`; rank 0 writes checkpoints, log.txt and pictures. Returns the log records.

    One optimizer step = accum_iter micro-batches of batch_size images on each of world_size ranks.
    input_size_at(progress in [0, 1]) -> crop side of the epoch (constant except FastMIM-P).
    """
    master_process = rank == 0
    ddp = dist.is_initialized()
    steps_per_epoch = len(views) // world_size // (batch_size * accum_iter)      # drop_last, as MAE; main checks > 0
    total_steps, warmup_steps = epochs * steps_per_epoch, round(warmup_epochs * steps_per_epoch)
    stop_step = total_steps if max_steps is None else min(total_steps, max_steps)

    raw = pretrainer.to(device)
    optimizer = torch.optim.AdamW(param_groups(raw, weight_decay), lr=lr, betas=BETAS)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")   # only fp16 needs loss scaling
    step = 0
    if checkpoint is not None:                                            # restore everything the run depends on
        raw.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scaler.load_state_dict(checkpoint["scaler"])
        set_rng_state(checkpoint["rng"])
        step = checkpoint["step"]
        print0(f"resumed from {resume_path} at step {step} (epoch {step // steps_per_epoch})")
    model = DDP(raw, device_ids=[device.index] if device.type == "cuda" else None) if ddp else raw
    last_good = resume_path
    pictures = PretrainViews(views.dataset, input_size=views.input_size, num_views=views.num_views, seed=seed)
    images_per_step = batch_size * accum_iter * world_size
    print0(f"{steps_per_epoch} steps/epoch x {epochs} epochs, {images_per_step} images/step, lr {lr:.3g}, "
           f"{sum(p.numel() for p in raw.parameters() if p.requires_grad) / 1e6:.2f}M trained parameters")
    if step >= stop_step:
        print0(f"nothing to do: the checkpoint is at step {step} and the run stops at step {stop_step}")
    records = []
    for epoch in range(step // steps_per_epoch, epochs):
        if step >= stop_step:
            break
        size = input_size_at(epoch / epochs)
        epoch_end = min((epoch + 1) * steps_per_epoch, stop_step)
        batches = iter(epoch_loader(views, epoch=epoch, input_size=size,
                                    skip_batches=(step - epoch * steps_per_epoch) * accum_iter,
                                    batch_size=batch_size, rank=rank, world_size=world_size, seed=seed,
                                    num_workers=num_workers, pin_memory=device.type == "cuda"))
        bar = tqdm(total=epoch_end - epoch * steps_per_epoch, initial=step - epoch * steps_per_epoch,
                   desc=f"epoch {epoch}", dynamic_ncols=True,   # TQDM_DISABLE=1 (CI): tqdm's switch, kept here
                   disable=not master_process or os.environ.get("TQDM_DISABLE", "") not in ("", "0"))
        sums, skipped, n_steps, t_epoch = {}, 0, 0, time.perf_counter()
        while step < epoch_end:
            t0 = time.perf_counter()
            lr_now = get_lr(step, lr=lr, min_lr=min_lr, warmup_steps=warmup_steps, total_steps=total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr_now
            metrics = {}
            for micro in range(accum_iter):
                imgs, bad = next(batches)                                 # (B, 3, H, W) or (B, V, 3, H, W)
                imgs = imgs.to(device, non_blocking=True)
                skipped += int(bad.sum())
                # masks and drop path: a function of (seed, step, shard), so resumes and world sizes agree
                torch.manual_seed(seed_for(seed, step, micro * world_size + rank))
                final = micro == accum_iter - 1                           # DDP all-reduces on the final micro-step
                with model.no_sync() if ddp and not final else nullcontext():
                    with torch.autocast(device.type, dtype=AMP_DTYPES[amp], enabled=amp != "none"):
                        out = model(imgs)
                    scaler.scale(out["loss"] / accum_iter).backward()
                for k, v in {"loss": out["loss"], **out.get("logs", {})}.items():
                    metrics[k] = metrics.get(k, 0.0) + torch.as_tensor(v).detach().float() / accum_iter
            scaler.unscale_(optimizer)                                    # true gradients for the norm / clip
            grad_norm = nn.utils.clip_grad_norm_(raw.parameters(), clip_grad or math.inf)
            names = sorted(metrics)
            values = torch.stack([metrics[k].to(device) for k in names] + [grad_norm.float()])   # (len(names) + 1,)
            if ddp:
                dist.all_reduce(values)                                   # SUM: gloo has no AVG
                values /= world_size
            metrics = dict(zip(names + ["grad_norm"], values.tolist()))
            if not math.isfinite(metrics["loss"]):                        # every rank sees the same reduced value
                raise SystemExit(
                    f"non-finite loss ({metrics['loss']}) at step {step} (epoch {epoch}); stopped before the update."
                    f" Last good checkpoint: {last_good or 'none yet'}. Resume it with --resume {last_good or 'PATH'}"
                    f" and a lower --blr, --clip_grad 1.0 or --amp none." if master_process else 1)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if hasattr(raw, "ema_update"):                                # momentum teacher follows the student
                raw.ema_update(progress=step / max(1, total_steps - 1))   # M3I ramps m to 1; iTPN keeps it fixed
            step += 1
            n_steps += 1
            for k, v in {**metrics, "lr": lr_now}.items():
                sums[k] = sums.get(k, 0.0) + v
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{lr_now:.2e}",
                            img_s=f"{images_per_step / (time.perf_counter() - t0):.1f}")
        bar.close()
        skipped_all = torch.tensor(skipped, device=device)                # NCCL reduces CUDA tensors only
        if ddp:
            dist.all_reduce(skipped_all)
        record = {"epoch": epoch, "step": step, **{f"train_{k}": v / n_steps for k, v in sums.items()},
                  "skipped_images": int(skipped_all), "input_size": size,
                  "images_per_sec": n_steps * images_per_step / (time.perf_counter() - t_epoch)}
        if device.type == "cuda":
            record["max_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        records.append(record)
        if not master_process:
            continue
        finished = step == (epoch + 1) * steps_per_epoch
        state = {"model": raw.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                 "epoch": step // steps_per_epoch, "step": step, "args": run_config["args"],
                 "world_size": world_size, "config": run_config["config"], "rng": rng_state()}
        last_good = os.path.join(output_dir, "checkpoint-last.pth")
        save_checkpoint(last_good, state)
        if finished and ((epoch + 1) % save_every == 0 or epoch + 1 == epochs):
            save_checkpoint(os.path.join(output_dir, f"checkpoint-{epoch}.pth"), state)   # MAE's name
        with open(os.path.join(output_dir, "log.txt"), "a") as f:
            f.write(json.dumps(record) + "\n")
        if (finished and (epoch + 1) % vis_every == 0) or step >= stop_step:
            pictures.input_size = size
            imgs = torch.stack([pictures[i][0] for i in range(min(4, len(pictures)))]).to(device)  # (4, [V,] 3, H, W)
            save_pictures(os.path.join(output_dir, f"reconstruction-epoch{epoch:03d}.png"), raw, imgs,
                          seed=seed, norm_pix_loss=norm_pix_loss)
        print0(json.dumps({k: round(v, 5) if isinstance(v, float) else v for k, v in record.items()}))
    return records


# ---- 8. Flags and __main__ ----------------------------------------------------------------------------------------

# Defaults that depend on the model size. "paper": iTPN Tab. 7 / MAE PRETRAIN.md (400 of the 400/1600 epochs,
# 64 images per GPU; 64 GPUs give the paper's 4096). "demo": the tiny presets on 2 CPU cores in a few minutes.
PAPER_INPUT_SIZE = 224   # iTPN Tab. 7; mim.py methods carry their own (FastMIM 128)
RECIPES = {
    "paper": dict(input_size=None, num_images=10000, batch_size=64, epochs=400, warmup_epochs=40, blr=1.5e-4,
                  num_workers=10, save_every=20, vis_every=20, threads=None),
    "demo": dict(input_size=64, num_images=400, batch_size=32, epochs=30, warmup_epochs=3, blr=1.5e-2,
                 num_workers=0, save_every=10, vis_every=5, threads=1),
}


def get_parser():
    p = argparse.ArgumentParser(
        description="Masked image pre-training (iTPN, MAE, SimMIM, FastMIM, M3I). Flags left unset take the "
                    "'paper' recipe, or the 'demo' recipe for the *_tiny models (shown as paper/demo).",
        epilog=__doc__[__doc__.index("Run:"):], formatter_class=argparse.RawDescriptionHelpFormatter)
    r = RECIPES

    def both(key):
        return f"{r['paper'][key]}/{r['demo'][key]}"

    # model and method
    p.add_argument("--model", default="itpn_tiny", choices=list(MODELS), metavar="NAME",
                   help=f"architecture and size; one of: {', '.join(MODELS)} (default itpn_tiny)")
    p.add_argument("--method", default=None, choices=list(METHODS), metavar="NAME",
                   help=f"pre-training method; one of: {', '.join(METHODS)}. Default: itpn (paper Eq. 4: MIM + "
                        f"multi-stage MFM with an EMA teacher) for iTPN models, mae for HiViT/ViT, fastmim for "
                        f"Fast-iTPN")
    p.add_argument("--teacher", default=None, metavar="PATH",
                   help="frozen teacher checkpoint for --method itpn_distill / fast_itpn_distill: a local OpenAI-CLIP "
                        "visual state dict or a ViT checkpoint of this project (nothing is downloaded)")
    p.add_argument("--mask_ratio", type=float, default=None,
                   help="fraction of 16-px units masked (default: the method's, 0.75 for MAE / iTPN)")
    p.add_argument("--norm_pix_loss", action=argparse.BooleanOptionalAction, default=None,
                   help="pixel targets normalised per unit (MAE); default: the method's (on). mim.py methods only")
    p.add_argument("--truncate", type=int, default=0, metavar="K",
                   help="pre-train the encoder with its last K attention blocks removed (FastMIM Tab. 1c); "
                        "fine-tuning loads the checkpoint into the full-depth model. mim.py methods only (default 0)")
    # data
    p.add_argument("--data_path", default=None,
                   help="image folder: ImageFolder tree (<path>/train/<class>/*.jpg) or any folder of images, "
                        "labels ignored. Default: the built-in procedural ShapesDataset")
    p.add_argument("--num_images", type=int, default=None,
                   help=f"size of the built-in dataset when --data_path is not given (default {both('num_images')})")
    p.add_argument("--input_size", type=int, default=None,
                   help=f"crop side in px, a multiple of the model's 16-px unit (default: the method's, "
                        f"{PAPER_INPUT_SIZE} or FastMIM's 128 / FastMIM-P's 128->160->192, which an explicit value "
                        f"rescales; demo "
                        f"{r['demo']['input_size']})")
    p.add_argument("--num_workers", type=int, default=None,
                   help=f"DataLoader worker processes per GPU (default {both('num_workers')})")
    # optimisation
    p.add_argument("--batch_size", type=int, default=None,
                   help=f"images per GPU (or process) per micro-step (default {both('batch_size')}); "
                        f"effective batch = batch_size x accum_iter x world size")
    p.add_argument("--accum_iter", type=int, default=1,
                   help="micro-steps accumulated per optimizer step (default 1; 8 on 8 GPUs gives the paper's 4096)")
    p.add_argument("--epochs", type=int, default=None, help=f"training epochs (default {both('epochs')})")
    p.add_argument("--warmup_epochs", type=float, default=None,
                   help=f"linear warm-up epochs from lr 0 (default {both('warmup_epochs')})")
    p.add_argument("--blr", type=float, default=None,
                   help=f"base learning rate: lr = blr x effective batch / 256 (default {both('blr')})")
    p.add_argument("--lr", type=float, default=None, help="absolute learning rate; overrides --blr")
    p.add_argument("--min_lr", type=float, default=0.0, help="learning rate at the end of the cosine (default 0)")
    p.add_argument("--weight_decay", type=float, default=0.05, help="AdamW weight decay on matrices (default 0.05)")
    p.add_argument("--clip_grad", type=float, default=None,
                   help="clip the global gradient norm to this value (default: off, as the paper; norm is logged)")
    p.add_argument("--amp", default="auto", choices=["auto", "none", "bf16", "fp16"],
                   help="mixed precision: auto = bf16 on CUDA, none on CPU; fp16 adds a GradScaler")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto = CUDA when available (under torchrun: the GPU LOCAL_RANK)")
    p.add_argument("--seed", type=int, default=0, help="seed of the model init, data order, crops and masks")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads per process (torch.set_num_threads). Default: torch's (torchrun: 1) for the "
                        "paper recipe, 1 for the demo: tiny models are overhead-bound, and on a busy 2-core machine "
                        "2 threads ran the demo 4x slower than 1")
    # run records
    p.add_argument("--output_dir", default="output",
                   help="checkpoints, log.txt (one JSON per epoch), config.json and pictures go here")
    p.add_argument("--resume", default="", metavar="PATH|auto",
                   help="checkpoint to continue from; 'auto' = the latest one in --output_dir (fresh if none)")
    p.add_argument("--save_every", type=int, default=None,
                   help=f"keep checkpoint-<epoch>.pth every N epochs (default {both('save_every')}); "
                        f"checkpoint-last.pth is rewritten every epoch")
    p.add_argument("--vis_every", type=int, default=None,
                   help=f"write reconstruction pictures every N epochs and at the end (default {both('vis_every')})")
    p.add_argument("--max_steps", type=int, default=None,
                   help="stop after this many optimizer steps in total (checkpoint saved); the schedule still "
                        "follows --epochs. For smoke tests and time-limited jobs")
    return p


def input_schedule(method: str, input_size: int | None, unit: int):
    """progress -> crop side. mim.py methods carry their own side(s) (FastMIM 128, FastMIM-P 128/160/192);
    an explicit --input_size rescales them so the last side equals it, in whole units."""
    if METHODS[method] != "mim":
        side = input_size or PAPER_INPUT_SIZE
        return lambda progress: side
    cfg = mim.PRESETS[method]
    last = cfg.img_sizes[-1][1]
    scale = 1.0 if input_size is None else input_size / last
    return lambda progress: max(unit, round(mim.img_size_at(cfg, progress) * scale / unit) * unit)


# flag -> (test, valid range in words). Checked after the recipe fills unset flags; None (unset) always passes.
RANGES = {
    "batch_size": (lambda v: v >= 1, ">= 1"),
    "accum_iter": (lambda v: v >= 1, ">= 1"),
    "epochs": (lambda v: v >= 1, ">= 1"),
    "input_size": (lambda v: v >= 1, ">= 1 (a multiple of the model's unit)"),
    "num_images": (lambda v: v >= 1, ">= 1"),
    "mask_ratio": (lambda v: 0 <= v < 1, "in [0, 1): the fraction of units masked; 1 would leave nothing visible"),
    "warmup_epochs": (lambda v: v >= 0, ">= 0"),
    "save_every": (lambda v: v >= 1, ">= 1 (epochs)"),
    "vis_every": (lambda v: v >= 1, ">= 1 (epochs)"),
    "max_steps": (lambda v: v >= 1, ">= 1"),
    "truncate": (lambda v: v >= 0, ">= 0"),
    "num_workers": (lambda v: v >= 0, ">= 0"),
    "blr": (lambda v: v > 0, "> 0"),
    "lr": (lambda v: v > 0, "> 0"),
    "min_lr": (lambda v: v >= 0, ">= 0"),
    "weight_decay": (lambda v: v >= 0, ">= 0"),
    "clip_grad": (lambda v: v > 0, "> 0 (leave it out for no clipping)"),
}


def range_errors(args) -> list[str]:
    """One message per flag outside its valid range (a 0 batch or accum_iter would divide by zero later)."""
    return [f"--{name} {getattr(args, name)} is out of range: it must be {words}"
            for name, (ok, words) in RANGES.items() if getattr(args, name) is not None and not ok(getattr(args, name))]


def check_same_effective_batch(checkpoint: dict, path: str, args, world_size: int) -> None:
    """A resumed run must keep batch_size x accum_iter x world size: the step -> epoch mapping, the lr schedule and
    the images a mid-epoch resume skips are all counted in steps of it. Another split of the same product (e.g. 2x
    the GPUs, half the --accum_iter) keeps all three, so it is allowed (masks then differ: not bitwise)."""
    was = {"batch_size": checkpoint["args"]["batch_size"], "accum_iter": checkpoint["args"]["accum_iter"],
           "world size": checkpoint.get("world_size", world_size)}   # absent in checkpoints from before the check
    now = {"batch_size": args.batch_size, "accum_iter": args.accum_iter, "world size": world_size}
    if math.prod(was.values()) == math.prod(now.values()):
        return
    differ = ", ".join(f"{'' if k == 'world size' else '--'}{k} {was[k]} -> {now[k]}" for k in was
                       if was[k] != now[k])
    raise ValueError(f"{path} was written with an effective batch of {math.prod(was.values())} = --batch_size "
                     f"{was['batch_size']} x --accum_iter {was['accum_iter']} x {was['world size']} process(es); this "
                     f"run has {math.prod(now.values())} ({differ}). The lr schedule, the step -> epoch mapping and "
                     f"the images already seen depend on it: resume with --batch_size {was['batch_size']} --accum_iter "
                     f"{was['accum_iter']} on {was['world size']} process(es) (or any split with the same product), "
                     f"or start a fresh run in another --output_dir")


def main(argv=None) -> list[dict]:
    parser = get_parser()
    args = parser.parse_args(argv)
    family, preset = MODELS[args.model]
    recipe = RECIPES["demo" if args.model.endswith("_tiny") else "paper"]
    for key, value in recipe.items():                                     # unset flags take the recipe's value
        if getattr(args, key) is None:
            setattr(args, key, value)
    if range_errors(args):
        parser.error("; ".join(range_errors(args)))
    args.method = args.method or DEFAULT_METHOD[family]
    if args.method not in compatible_methods(family):
        parser.error(f"--method {args.method} does not run on --model {args.model}; valid methods for {family} "
                     f"models: {', '.join(compatible_methods(family))}")
    unit = unit_size(family, preset)
    if args.input_size is not None and args.input_size % unit:
        parser.error(f"--input_size {args.input_size} is not a multiple of {args.model}'s {unit}-px unit; "
                     f"try {max(unit, args.input_size // unit * unit)} or {(args.input_size // unit + 1) * unit}")
    if args.threads:
        torch.set_num_threads(args.threads)
    rank, world_size, device = setup_distributed(args.device)
    amp = ("bf16" if device.type == "cuda" else "none") if args.amp == "auto" else args.amp
    eff_batch = args.batch_size * args.accum_iter * world_size
    lr = args.lr if args.lr is not None else args.blr * eff_batch / 256  # MAE's linear scaling rule
    try:
        torch.manual_seed(args.seed)                                      # same init on every rank
        random.seed(args.seed)
        np.random.seed(args.seed)
        pretrainer = build_pretrainer(args.model, args.method, mask_ratio=args.mask_ratio,
                                      norm_pix_loss=args.norm_pix_loss, teacher=args.teacher, truncate=args.truncate)
        source = (ImageFiles(args.data_path) if args.data_path
                  else ShapesDataset(args.num_images, image_size=args.input_size or PAPER_INPUT_SIZE, seed=args.seed))
        input_size_at = input_schedule(args.method, args.input_size, unit)
        views = PretrainViews(source, input_size=input_size_at(0.0), num_views=getattr(pretrainer, "num_views", 1),
                              seed=args.seed)
        views.read(0)                                                     # fail now if no image is readable
        if len(views) < eff_batch:
            raise ValueError(f"{len(views)} images do not fill one step of {world_size} x {args.batch_size} x "
                             f"{args.accum_iter} images: lower --batch_size / --accum_iter or add images")
        resume = find_checkpoint(args.output_dir) if args.resume == "auto" else args.resume or None
        if args.resume == "auto" and resume is None:
            print0(f"--resume auto: no checkpoint in {args.output_dir}, starting a fresh run")
        if resume is None and find_checkpoint(args.output_dir):
            print0(f"note: {args.output_dir} holds an earlier run; its checkpoints will be overwritten and log.txt "
                   f"appended to (--resume auto continues it instead)")
        checkpoint = load_checkpoint(resume) if resume else None
        if checkpoint is not None:
            was = {k: checkpoint["args"].get(k) for k in ("model", "method")}
            if was != {"model": args.model, "method": args.method}:
                raise ValueError(f"{resume} was written by --model {was['model']} --method {was['method']}; this "
                                 f"run is --model {args.model} --method {args.method}: pass those or another "
                                 f"--output_dir")
            check_same_effective_batch(checkpoint, resume, args, world_size)
    except (ValueError, KeyError, FileNotFoundError, RuntimeError) as err:   # bad input: a message, no traceback
        if dist.is_initialized():
            dist.destroy_process_group()
        raise SystemExit(f"error: {err}")
    cfg = getattr(pretrainer, "cfg", None)                                # the method's config after its overrides
    run_config = {"args": vars(args), "config": {"model": asdict(preset), "method": asdict(cfg) if is_dataclass(cfg)
                                                 else None},
                  "world_size": world_size, "effective_batch_size": eff_batch, "lr": lr, "amp": amp,
                  "device": str(device), "torch": torch.__version__,
                  **run_record(os.path.dirname(os.path.abspath(__file__)))}
    if rank == 0:
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, "config.json"), "w") as f:
            json.dump(run_config, f, indent=2, default=str)
        if run_config["git_commit"] is None:                              # no git: keep the code itself (airbench)
            shutil.copyfile(os.path.abspath(__file__), os.path.join(args.output_dir, "train.py.source"))
    print0(f"{args.model} + {args.method} on {device} x {world_size}, data: {args.data_path or 'built-in shapes'} "
           f"({len(views)} images), output: {args.output_dir}")
    norm_pix = bool(getattr(cfg, "norm_pix_loss", True))
    try:
        return train(pretrainer, views, device=device, rank=rank, world_size=world_size,
                     output_dir=args.output_dir, run_config=run_config, checkpoint=checkpoint, resume_path=resume,
                     epochs=args.epochs, warmup_epochs=args.warmup_epochs, batch_size=args.batch_size,
                     accum_iter=args.accum_iter, lr=lr, min_lr=args.min_lr, weight_decay=args.weight_decay,
                     clip_grad=args.clip_grad, amp=amp, seed=args.seed, num_workers=args.num_workers,
                     save_every=args.save_every, vis_every=args.vis_every, max_steps=args.max_steps,
                     input_size_at=input_size_at, norm_pix_loss=norm_pix)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
