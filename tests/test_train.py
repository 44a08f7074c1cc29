"""train.py: the built-in data, the schedule, the loop (DDP = single process, bitwise resume), run records, and
every bad input ending in a clear message. CPU only, tiny models, 32-px images, a few steps each."""
import json
import os
import re
import subprocess
import sys
import warnings
from dataclasses import fields

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import train
from conftest import read_log, subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--input_size", "32", "--batch_size", "2", "--num_workers", "0"]   # smallest real run


pytestmark = pytest.mark.usefixtures("one_thread")                       # conftest: tiny runs, one thread


class StandIn(nn.Module):
    """The smallest module that follows the PRETRAINER CONTRACT (README, "Seams"): 16-px units, 75% masked, a linear
    pixel predictor on masked-out input, an EMA teacher excluded from the optimizer, optional NaN at a set call."""

    num_views = 1

    def __init__(self, nan_at_call: int | None = None, fixed_mask: bool = False):
        super().__init__()
        self.proj = nn.Linear(768, 768)
        self.teacher = nn.Linear(768, 768).requires_grad_(False)
        self.nan_at_call, self.calls, self.fixed_mask = nan_at_call, 0, fixed_mask

    def forward(self, imgs):
        b, _, h, w = imgs.shape
        units = imgs.unfold(2, 16, 16).unfold(3, 16, 16).permute(0, 2, 3, 4, 5, 1).reshape(b, -1, 768)   # (B, N, P)
        noise = torch.arange(units.shape[1]).expand(b, -1) if self.fixed_mask else torch.rand(b, units.shape[1])
        mask = (noise.argsort(1) < units.shape[1] * 3 // 4).float()                                      # (B, N)
        pred = self.proj(units * (1 - mask[..., None]))
        loss = (((pred - units) ** 2).mean(-1) * mask).sum() / mask.sum()
        self.calls += 1
        if self.calls == self.nan_at_call:
            loss = loss * float("nan")
        recon = pred.reshape(b, h // 16, w // 16, 16, 16, 3).permute(0, 5, 1, 3, 2, 4).reshape(b, 3, h, w)
        return {"loss": loss, "mask": mask, "pred": pred, "recon": recon, "logs": {"loss_pix": loss.detach()}}

    @torch.no_grad()
    def ema_update(self, progress=None):
        for t, s in zip(self.teacher.parameters(), self.proj.parameters()):
            t.mul_(0.9).add_(s, alpha=0.1)


def run(tmp_path, *argv, name="out"):
    """train.main in this process; returns (log records, output dir)."""
    out = str(tmp_path / name)
    return train.main([*argv, "--output_dir", out]), out


def error_of(argv, tmp_path, name="bad"):
    """The message a bad invocation stops with (SystemExit), as a string (in a fresh output folder by default)."""
    with pytest.raises(SystemExit) as info:
        run(tmp_path, *argv, name=name)
    return str(info.value.code)


def write_png(path, array, mode=None):
    Image.fromarray(array, mode=mode).save(path) if mode else Image.fromarray(array).save(path)


# ---- data ---------------------------------------------------------------------------------------------------------

def test_shapes_dataset_is_deterministic_and_its_targets_agree():
    ds = train.ShapesDataset(6, image_size=48, seed=3, task="det")
    again = train.ShapesDataset(6, image_size=48, seed=3, task="det")
    other_seed = train.ShapesDataset(6, image_size=48, seed=4, task="det")
    for i in range(6):
        a, b = ds.scene(i), again.scene(i)
        assert np.array_equal(a["image"], b["image"]) and np.array_equal(a["masks"], b["masks"])
        assert a["image"].shape == (48, 48, 3) and a["image"].dtype == np.uint8
        assert not np.array_equal(a["image"], other_seed.scene(i)["image"])
        n = len(a["labels"])
        assert a["boxes"].shape == (n, 4) and a["masks"].shape == (n, 48, 48)
        assert ((a["labels"] >= 1) & (a["labels"] <= len(train.SHAPE_CLASSES))).all()
        for label, box, m in zip(a["labels"], a["boxes"], a["masks"]):
            ys, xs = np.nonzero(m)
            assert (box == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).all()      # tight xyxy box
            assert (a["semantic"][m] == label).all()                                      # semantic = instances
        assert (a["masks"].sum(0) <= 1).all()                                           # occlusion: disjoint
    img, label = train.ShapesDataset(4, image_size=32, task="cls")[2]
    assert img.size == (32, 32) and 0 <= label < len(train.SHAPE_CLASSES)
    assert train.ShapesDataset(4, image_size=32)[0][1] == 0                               # pretrain: label ignored


def test_pretrain_views_depend_only_on_seed_epoch_and_index():
    views = train.PretrainViews(train.ShapesDataset(4, image_size=48), input_size=32, seed=1)
    a, _, _ = views[2]                                                    # (x, target, skipped)
    torch.manual_seed(123)                                                # the global RNG does not matter
    b, _, _ = views[2]
    views.epoch = 1
    c, _, _ = views[2]
    assert a.shape == (3, 32, 32) and torch.equal(a, b) and not torch.equal(a, c)


class SolidOrRamp(torch.utils.data.Dataset):
    """Images whose pixels tell where and what they are: "solid" = one colour per image (so only a colour change can
    change a view's pixels), "ramp" = red = column and green = row (so a view's pixels tell which source pixel they
    show). 200 x 256 px."""

    def __init__(self, kind: str, n: int = 8):
        self.kind, self.n = kind, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        a = np.zeros((200, 256, 3), np.uint8)
        if self.kind == "solid":
            a[:] = np.random.default_rng(i).integers(30, 220, 3)
        else:
            a[..., 0] = np.arange(256)[None, :]                           # red = column (1 per px)
            a[..., 1] = np.arange(200)[:, None] * 255 // 199              # green = row (~1.28 per px)
        return Image.fromarray(a), 0


def pixel_values(x: torch.Tensor) -> torch.Tensor:
    """ImageNet-normalised (..., 3, H, W) -> 0..255."""
    mean, std = torch.tensor(train.IMAGENET_MEAN)[:, None, None], torch.tensor(train.IMAGENET_STD)[:, None, None]
    return (x * std + mean) * 255


def test_two_views_are_independent_crops_and_only_the_input_view_changes_colour():
    """M3I (num_views 2): view 0 (target) and view 1 (input) have different crop boxes; on one-colour images view 0
    keeps the image's colour exactly as the one-view recipe does, view 1 does not (ColorJitter / grayscale)."""
    views = train.PretrainViews(SolidOrRamp("solid"), input_size=32, num_views=2, seed=0)
    one_view = train.PretrainViews(SolidOrRamp("solid"), input_size=32, seed=0)
    for i in range(len(views)):
        x, _, _ = views[i]
        assert x["imgs"].shape == (2, 3, 32, 32) and x["geometry"].shape == (2, 5)
        assert not torch.equal(x["geometry"][0, :4], x["geometry"][1, :4])   # other crop boxes
        colour = torch.tensor(np.asarray(SolidOrRamp("solid")[i][0])[0, 0], dtype=torch.float32)   # (3,)
        target, other = pixel_values(x["imgs"]).mean(dim=(2, 3))         # (3,) mean colour of each view
        assert (target - colour).abs().max() < 0.5                        # view 0: the source colour
        assert (other - colour).abs().max() > 2                           # view 1: another colour
        torch.testing.assert_close(x["imgs"][0], one_view[i][0])          # view 0 = the one-view recipe's view


def test_two_view_geometry_is_exact():
    """Oracle: with the colour change off, each ramp pixel tells its source position. A target unit's centre
    read in view 0 and view 1 read at mim.view_coords(geometry) show the same source pixel (within 1 px; the
    flip and crop draws cover mirrored and plain views)."""
    import mim
    views = train.PretrainViews(SolidOrRamp("ramp", n=16), input_size=64, num_views=2, seed=0)
    views.colour = lambda image: image                                    # geometry only
    hp, checked, flips = 4, 0, set()

    def sample(view, coords):                                             # (3, H, W) at (N, 2) unit coords -> (3, N)
        grid = (coords[:, [1, 0]] + 0.5) * 2 / hp - 1
        return torch.nn.functional.grid_sample(view[None], grid[None, :, None], align_corners=False)[0, :, :, 0]

    for i in range(len(views)):
        x, _, _ = views[i]
        geometry = x["geometry"]                                          # (2, 5)
        flips.add(tuple(geometry[:, 4].tolist()))
        coords = mim.view_coords((hp, hp), geometry[None])[0]             # (N, 4): view 0's units in view 1
        truth = sample(pixel_values(x["imgs"][0]), mim.view_coords((hp, hp))[0, :, :2])[:2]   # (2, N) red, green
        seen = sample(pixel_values(x["imgs"][1]), coords[:, :2])[:2]
        inside = ((coords[:, :2] > 0) & (coords[:, :2] < hp - 1)).all(dim=-1)   # (N,) away from view 1's border
        checked += int(inside.sum())
        assert (seen - truth)[:, inside].abs().max() < 1.0, i
    assert checked > 50 and len(flips) >= 3


class TwoViewStandIn(StandIn):
    """StandIn with M3I's batch contract: forward(imgs (B, 2, 3, H, W), geometry (B, 2, 5)); records its inputs."""

    num_views = 2

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, imgs, geometry):
        self.seen.append((imgs.shape, geometry.clone()))
        return super().forward(imgs[:, 1])


def test_pretrain_task_hands_both_views_and_their_geometry_to_the_model(tmp_path, monkeypatch):
    """train.py -> PretrainTask.loss: a two-view method is called with the views and their geometry as keyword
    arguments, for the training steps and for the pictures."""
    model = TwoViewStandIn()
    monkeypatch.setattr(train, "build_pretrainer", lambda *a, **k: model)
    records, out = run(tmp_path, *TINY, "--num_images", "4", "--epochs", "1", "--vis_every", "1")
    assert records[0]["step"] == 2 and len(model.seen) == 3               # 2 steps + the pictures
    for shape, geometry in model.seen:
        assert shape[1:] == (2, 3, 32, 32) and geometry.shape == (shape[0], 2, 5)
        assert ((geometry[..., 2:4] > 0) & (geometry[..., 2:4] <= 1)).all()   # box sides: fractions of the source
    assert any(f.startswith("reconstruction-") for f in os.listdir(out))


def test_the_momentum_teacher_follows_the_student_after_every_step(tmp_path):
    """After each optimizer step train.py calls ema_update: the iTPN teacher after one step is exactly
    m t0 + (1 - m) s1 (m = 0.996), t0 = the initial backbone, s1 = the backbone after the step."""
    import itpn
    torch.manual_seed(0)                                                  # prepare() seeds the init the same way
    initial = train.build_pretrainer("itpn_tiny", "itpn", mask_ratio=None, norm_pix_loss=None, teacher=None)
    records, out = run(tmp_path, *TINY, "--model", "itpn_tiny", "--method", "itpn", "--num_images", "2",
                       "--max_steps", "1")
    state = torch.load(os.path.join(out, "checkpoint-last.pth"), weights_only=True)["model"]
    m = itpn.PRETRAIN_PRESETS["itpn"].ema_momentum
    moved = 0
    for name, t0 in initial.teacher.state_dict().items():
        s1, t1 = state["encoder.backbone." + name], state["teacher." + name]
        torch.testing.assert_close(t1, m * t0 + (1 - m) * s1 if t0.is_floating_point() else s1)
        moved += int(not torch.equal(t1, t0))
    assert moved > 0


def test_image_modes_are_converted(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 255, (20, 24, 3), dtype=np.uint8)
    write_png(tmp_path / "grey.png", rgb[..., 0])
    write_png(tmp_path / "rgba.png", np.concatenate([rgb, rgb[..., :1]], -1))
    Image.fromarray((rgb[..., 0].astype(np.uint16) * 257)).save(tmp_path / "deep.png")   # 16-bit greyscale
    files = train.ImageFiles(str(tmp_path))
    for i in range(len(files)):
        img, _ = files[i]
        assert img.mode == "RGB" and img.size == (24, 20)
    deep = np.asarray(files[files.paths.index(str(tmp_path / "deep.png"))][0])[..., 0]
    assert np.abs(deep.astype(int) - rgb[..., 0]).max() <= 1                              # 16-bit rescaled, not clipped


# ---- optimizer and schedule ---------------------------------------------------------------------------------------

def test_get_lr_warms_up_from_zero_then_follows_a_cosine_to_min_lr():
    kw = dict(lr=1.0, min_lr=0.1, warmup_steps=10, total_steps=110)
    lrs = [train.get_lr(s, **kw) for s in range(111)]
    assert lrs[0] == 0 and lrs[5] == pytest.approx(0.5) and lrs[10] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.55) and lrs[110] == pytest.approx(0.1)
    assert all(x >= y for x, y in zip(lrs[10:], lrs[11:]))


def test_param_groups_decay_matrices_only_and_skip_frozen_teacher():
    model = StandIn()
    decay, no_decay = train.param_groups(model, 0.05)
    assert [p.shape for p in decay["params"]] == [(768, 768)] and decay["weight_decay"] == 0.05
    assert [p.shape for p in no_decay["params"]] == [(768,)] and no_decay["weight_decay"] == 0.0


# ---- the whole run ------------------------------------------------------------------------------------------------

def test_default_command_runs_end_to_end_and_writes_its_records(tmp_path, monkeypatch):
    monkeypatch.setattr(train, "run_record", lambda source_dir: {"git_commit": None})   # as outside a git checkout
    records, out = run(tmp_path, "--max_steps", "2")                     # `python train.py`, 2 steps
    files = os.listdir(out)
    assert {"checkpoint-last.pth", "log.txt", "config.json"} <= set(files)
    assert any(f.startswith("reconstruction-") and f.endswith(".png") for f in files)
    log = read_log(out)
    assert log == json.loads(json.dumps(records)) and log[0]["step"] == 2 and np.isfinite(log[0]["train_loss"])
    ckpt = torch.load(os.path.join(out, "checkpoint-last.pth"), weights_only=True)
    assert ckpt["step"] == 2 and ckpt["args"]["model"] == "itpn_tiny" and ckpt["args"]["method"] == "itpn"
    assert {"model", "optimizer", "scaler", "epoch", "steps_per_epoch", "world_size", "config"} <= set(ckpt)
    assert "rng" not in ckpt                                              # every draw is seeded by its position
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["args"]["epochs"] == train.DEFAULTS["demo"]["epochs"] and config["git_commit"] is None
    assert open(os.path.join(out, "train.py.source")).read() == open(os.path.join(ROOT, "train.py")).read()


def test_resume_continues_bitwise_as_if_never_stopped(tmp_path):
    argv = [*TINY, "--model", "hivit_tiny", "--method", "mae", "--num_images", "8", "--epochs", "2",
            "--warmup_epochs", "1", "--blr", "0.05"]                    # 4 steps per epoch
    _, straight = run(tmp_path, *argv, "--max_steps", "6", name="straight")
    _, stopped = run(tmp_path, *argv, "--max_steps", "3", name="stopped")  # stopped mid-epoch 0, checkpoint saved
    run(tmp_path, *argv, "--max_steps", "6", "--resume", "auto", "--num_workers", "1", name="stopped")  # crops
    # are seeded per image, so a worker process draws the same ones as the main process did
    a = torch.load(os.path.join(straight, "checkpoint-last.pth"), weights_only=True)
    b = torch.load(os.path.join(stopped, "checkpoint-last.pth"), weights_only=True)
    assert a["step"] == b["step"] == 6
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    (whole0, whole1), (part0, rest0, part1) = read_log(straight), read_log(stopped)
    assert whole1["train_loss"] == part1["train_loss"]                    # epoch 1, steps 4-5: identical
    assert (part0["step"], rest0["step"]) == (3, 4)                       # epoch 0 = steps 0-2, then step 3
    assert whole0["train_loss"] == pytest.approx((3 * part0["train_loss"] + rest0["train_loss"]) / 4, rel=1e-6)


def test_two_gloo_ranks_match_one_process_with_the_same_global_batch(tmp_path):
    # Global batch 4 = 2 ranks x 2 micro-steps x 1 image = 1 process x 4 micro-steps x 1 image. Shard k of a step
    # (k = micro_step * world_size + rank) reads the k-th image of the shuffled order and seeds its masks by k.
    argv = ["--model", "itpn_tiny", "--input_size", "32", "--num_images", "4", "--batch_size", "1", "--epochs", "3",
            "--warmup_epochs", "1", "--num_workers", "0", "--blr", "0.5"]
    ddp_out = str(tmp_path / "ddp")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "train.py", *argv, "--accum_iter", "2", "--output_dir", ddp_out],
                          cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single, _ = run(tmp_path, *argv, "--accum_iter", "4", name="single")
    ddp = read_log(ddp_out)
    assert len(ddp) == len(single) == 3                                   # 3 epochs of 1 step
    assert len({r["train_loss"] for r in single}) == 3                   # the model does change
    for a, b in zip(ddp, single):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-5, rel=0)
        assert a["train_grad_norm"] == pytest.approx(b["train_grad_norm"], rel=1e-5)   # AdamW hides a wrong scale
    assert json.load(open(os.path.join(ddp_out, "config.json")))["world_size"] == 2


def test_accumulation_gives_the_gradient_of_the_whole_batch(tmp_path, monkeypatch):
    # accum_iter 2 x batch 1 == accum_iter 1 x batch 2 (same images, same lr) when the loss is a per-image mean
    # that draws no random numbers: real methods seed their masks per shard, so only the layout of the DDP test
    # above is exact for them. This pins the 1/accum_iter scaling of each micro-batch loss.
    monkeypatch.setattr(train, "build_pretrainer", lambda *a, **k: StandIn(fixed_mask=True))   # main seeds the init
    argv = ["--input_size", "32", "--num_images", "4", "--epochs", "2", "--warmup_epochs", "1", "--num_workers", "0",
            "--blr", "1.0"]
    whole, _ = run(tmp_path, *argv, "--batch_size", "2", "--accum_iter", "1", name="whole")
    accum, _ = run(tmp_path, *argv, "--batch_size", "1", "--accum_iter", "2", name="accum")
    assert [r["step"] for r in whole] == [r["step"] for r in accum] == [2, 4]
    for a, b in zip(accum, whole):
        for key in ("train_loss", "train_grad_norm", "train_lr"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), key


def test_lr_clip_grad_save_every_and_vis_every_do_what_they_say(tmp_path, monkeypatch):
    """--lr replaces blr x batch / 256 at the peak; --clip_grad clips what AdamW sees while the log keeps the
    pre-clip norm; numbered checkpoints and pictures appear at exactly the epochs asked for (and at the end)."""
    seen = []                                                             # global grad norm at each optimizer step

    class RecordingAdamW(torch.optim.AdamW):
        def step(self, closure=None):
            grads = [p.grad.flatten() for g in self.param_groups for p in g["params"] if p.grad is not None]
            seen.append(torch.cat(grads).norm().item())
            return super().step(closure)

    monkeypatch.setattr(train.torch.optim, "AdamW", RecordingAdamW)
    monkeypatch.setattr(train, "build_pretrainer", lambda *a, **k: StandIn())
    argv = [*TINY, "--num_images", "2", "--epochs", "5", "--warmup_epochs", "1", "--blr", "1.0"]   # 1 step/epoch
    records, out = run(tmp_path, *argv, "--lr", "0.003", "--save_every", "2", "--vis_every", "3", name="flags")
    assert [r["train_lr"] for r in records[:2]] == [0.0, 0.003]          # step 1 ends the warm-up: the peak
    assert seen == pytest.approx([r["train_grad_norm"] for r in records], rel=1e-5)   # no clip: the same norm
    files = sorted(os.listdir(out))
    assert [f for f in files if re.fullmatch(r"checkpoint-\d+\.pth", f)] == [   # epochs 2, 4 and the last (0-based)
        "checkpoint-1.pth", "checkpoint-3.pth", "checkpoint-4.pth"]
    assert [f for f in files if f.endswith(".png")] == [                 # epoch 3 and the end of the run
        "reconstruction-epoch002.png", "reconstruction-epoch004.png"]
    seen.clear()
    clipped, _ = run(tmp_path, *argv, "--lr", "0.003", "--clip_grad", "1e-3", "--max_steps", "1", name="clipped")
    assert clipped[0]["train_grad_norm"] == pytest.approx(records[0]["train_grad_norm"], rel=1e-6)   # pre-clip,
    assert clipped[0]["train_grad_norm"] > 10 * 1e-3                     # well above the clip
    assert seen == pytest.approx([1e-3], rel=1e-4)                        # what the optimizer was given


def test_help_lists_every_flag_and_every_flag_is_read(capsys):
    with pytest.raises(SystemExit) as info:
        train.main(["--help"])
    assert info.value.code == 0
    shown = capsys.readouterr().out
    source = open(os.path.join(ROOT, "train.py")).read()
    dests = [a.dest for a in train.get_parser()._actions if a.dest != "help"]
    assert sorted(dests) == sorted(f.name for f in fields(train.PretrainConfig))   # one flag per setting
    for action in train.get_parser()._actions:
        if action.dest == "help":
            continue
        assert action.help and action.option_strings[0] in shown, action.dest
        assert f"cfg.{action.dest}" in source, f"--{action.dest} is never read"


def test_pictures_grey_out_exactly_the_masked_units_with_the_shared_normalisation(tmp_path):
    """The 'masked' panel (column 2) is the original with the method's masked 16-px units grey. A 32 x 48 picture
    (2 x 3 units), so a transposed unit grid would show; normalisation constants are itpn.py's, not a copy."""
    import itpn
    assert train.IMAGENET_MEAN is itpn.IMAGENET_MEAN and train.IMAGENET_STD is itpn.IMAGENET_STD
    imgs = torch.randn(1, 3, 32, 48)                                      # (B, 3, H, W) normalised
    torch.manual_seed(0)
    model = StandIn()
    train.save_pictures(str(tmp_path / "p.png"), model, imgs, seed=7, norm_pix_loss=True)
    torch.manual_seed(7)
    mask = model(imgs)["mask"].view(2, 3)                                 # (Hp, Wp) row-major units, 1 = masked
    pixels = mask.repeat_interleave(16, 0).repeat_interleave(16, 1)      # (H, W)
    mean, std = torch.tensor(itpn.IMAGENET_MEAN)[:, None, None], torch.tensor(itpn.IMAGENET_STD)[:, None, None]
    original = (imgs[0] * std + mean).clamp(0, 1)                        # (3, H, W)
    expected = (original * (1 - pixels) + 0.5 * pixels).permute(1, 2, 0) * 255   # (H, W, 3)
    picture = np.asarray(Image.open(tmp_path / "p.png"))
    top, left = 12 * 4 + 2, 2 + (48 + 2)                                 # 4 title lines; padding 2; column 2
    panel = torch.from_numpy(picture[top:top + 32, left:left + 48].astype(np.float32))
    assert 0 < mask.sum() < 6 and (panel - expected).abs().max() <= 0.5 + 1e-3


# ---- checkpoints ---------------------------------------------------------------------------------------------------

def test_a_crash_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint-last.pth")
    train.save_checkpoint(path, {"step": 1, "w": torch.ones(3)})
    real_save = torch.save

    def killed_midway(obj, f):                                             # half a file, then the process dies
        real_save(obj, f)
        f.truncate(f.tell() // 2)
        raise KeyboardInterrupt

    monkeypatch.setattr(train.torch, "save", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        train.save_checkpoint(path, {"step": 2, "w": torch.zeros(3)})
    assert train.load_checkpoint(path)["step"] == 1
    assert train.find_checkpoint(str(tmp_path)) == path                   # the .tmp leftover is never picked


def test_checkpoint_bytes_are_fsynced_before_the_rename_and_the_rename_after(tmp_path, monkeypatch):
    """Power loss: the rename must not reach the disk before the data it points at (os.replace alone allows it)."""
    events, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(fd):                                                        # which file, how many bytes on disk
        events.append(("fsync", os.fstat(fd).st_ino, os.fstat(fd).st_size))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.stat(src).st_ino, os.stat(src).st_size))
        real_replace(src, dst)

    monkeypatch.setattr(train.os, "fsync", fsync)
    monkeypatch.setattr(train.os, "replace", replace)
    path = tmp_path / "checkpoint-last.pth"
    train.save_checkpoint(str(path), {"step": 1, "w": torch.ones(1000)})
    assert [e[0] for e in events] == ["fsync", "replace", "fsync"]
    assert events[0][1:] == events[1][1:] == (path.stat().st_ino, path.stat().st_size)   # the whole file, then
    assert events[2][1] == tmp_path.stat().st_ino                                        # the folder's entry
    assert train.load_checkpoint(str(path))["step"] == 1


# ---- bad inputs: a clear message, nothing lost ----------------------------------------------------------------------

def test_bad_data_paths_stop_with_a_clear_message(tmp_path):
    assert "is not a directory" in error_of(["--data_path", str(tmp_path / "missing")], tmp_path)
    (tmp_path / "empty").mkdir()
    assert "no image files" in error_of(["--data_path", str(tmp_path / "empty")], tmp_path)
    (tmp_path / "corrupt").mkdir()
    for i in range(3):
        (tmp_path / "corrupt" / f"{i}.jpg").write_bytes(b"not an image")
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        msg = error_of(["--data_path", str(tmp_path / "corrupt")], tmp_path)
    assert "no image in the dataset is readable" in msg


def test_one_corrupt_file_among_good_ones_is_skipped_and_counted(tmp_path):
    data = tmp_path / "data" / "train" / "some_class"                    # MAE's ImageFolder layout
    data.mkdir(parents=True)
    rgb = np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)
    write_png(data / "a_grey.png", rgb[..., 0])
    write_png(data / "b_rgba.png", np.concatenate([rgb, rgb[..., :1]], -1))
    Image.fromarray(rgb[..., 1].astype(np.uint16) * 200).save(data / "c_deep.png")
    Image.fromarray(rgb).save(data / "d_truncated.jpg")
    blob = (data / "d_truncated.jpg").read_bytes()
    (data / "d_truncated.jpg").write_bytes(blob[: len(blob) // 3])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        records, _ = run(tmp_path, *TINY, "--model", "hivit_tiny", "--method", "mae", "--batch_size", "4",
                         "--data_path", str(tmp_path / "data"), "--epochs", "1", "--warmup_epochs", "0")
    assert records[0]["skipped_images"] == 1 and np.isfinite(records[0]["train_loss"])
    assert any("d_truncated" in str(w.message) or "unreadable" in str(w.message) for w in caught)


def test_unknown_or_incompatible_model_and_method_list_the_valid_ones(tmp_path, capsys):
    for argv in (["--model", "nope"], ["--method", "nope"]):
        with pytest.raises(SystemExit):
            run(tmp_path, *argv)
        assert "invalid choice" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run(tmp_path, "--model", "hivit_tiny", "--method", "itpn")
    err = capsys.readouterr().err
    assert "does not run on --model hivit_tiny" in err and "mae" in err and "fastmim" in err
    with pytest.raises(SystemExit):
        run(tmp_path, "--model", "itpn_tiny", "--method", "fast_itpn_distill")
    assert "valid methods for itpn models" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run(tmp_path, "--input_size", "40")
    assert "not a multiple of itpn_tiny's 16-px unit" in capsys.readouterr().err
    assert "do not fill one step" in error_of([*TINY, "--num_images", "1"], tmp_path)


@pytest.mark.parametrize("flag, value, valid", [
    ("--batch_size", "0", ">= 1"), ("--accum_iter", "0", ">= 1"), ("--epochs", "0", ">= 1"),
    ("--input_size", "0", ">= 1"), ("--input_size", "-16", ">= 1"), ("--num_images", "0", ">= 1"),
    ("--mask_ratio", "1.5", "in [0, 1)"), ("--mask_ratio", "-0.5", "in [0, 1)"), ("--mask_ratio", "1.0", "in [0, 1)"),
    ("--save_every", "0", ">= 1"), ("--vis_every", "0", ">= 1"), ("--clip_grad", "0.0", "> 0"),
    ("--seed", "-1", "in [0, 2**32)"), ("--seed", str(2**32), "in [0, 2**32)")])
def test_out_of_range_numbers_stop_at_start_up_naming_the_flag_and_its_range(tmp_path, capsys, flag, value, valid):
    with pytest.raises(SystemExit) as info:                              # before any model is built or data read
        run(tmp_path, flag, value)
    assert info.value.code == 2                                          # argparse's usage error
    assert f"{flag} {value} is out of range: it must be {valid}" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out")


def test_teacher_is_wired_and_a_missing_or_misshapen_one_is_refused(tmp_path):
    from dataclasses import replace
    import hivit
    vit = hivit.VisionTransformer(replace(hivit.VIT_PRESETS["vit_tiny"], num_classes=0))
    good = vit.state_dict()
    torch.save({"model": good}, tmp_path / "good.pth")
    torch.save({"model": {**good, "blocks.0.mlp.fc2.weight": torch.zeros(64, 100)}}, tmp_path / "wrong.pth")
    distill = [*TINY, "--method", "itpn_distill", "--num_images", "2", "--max_steps", "1", "--teacher"]
    records, _ = run(tmp_path, *distill, str(tmp_path / "good.pth"))
    assert np.isfinite(records[0]["train_loss"]) and "train_loss_aux" in records[0]
    assert "not found" in error_of([*distill, str(tmp_path / "missing.pth")], tmp_path)
    assert "does not match" in error_of([*distill, str(tmp_path / "wrong.pth")], tmp_path)
    assert "--teacher PATH goes with" in error_of(["--method", "itpn_distill"], tmp_path)


def test_resume_from_another_models_checkpoint_is_refused(tmp_path):
    argv = [*TINY, "--num_images", "4", "--epochs", "1", "--warmup_epochs", "0", "--max_steps", "1"]
    run(tmp_path, *argv, "--model", "hivit_tiny", "--method", "mae")
    msg = error_of([*argv, "--model", "vit_tiny", "--method", "mae", "--resume", "auto"], tmp_path, name="out")
    assert "written by --model hivit_tiny" in msg


def test_resume_with_another_effective_batch_is_refused_and_the_same_product_is_allowed(tmp_path, monkeypatch):
    monkeypatch.setattr(train, "build_pretrainer", lambda *a, **k: StandIn())
    argv = ["--input_size", "32", "--num_workers", "0", "--num_images", "8", "--epochs", "2", "--warmup_epochs", "0"]
    run(tmp_path, *argv, "--batch_size", "2", "--max_steps", "1")                    # effective batch 2 x 1 x 1
    assert train.load_checkpoint(str(tmp_path / "out" / "checkpoint-last.pth"))["world_size"] == 1
    msg = error_of([*argv, "--batch_size", "2", "--accum_iter", "2", "--max_steps", "2", "--resume", "auto"],
                   tmp_path, name="out")
    assert "effective batch of 2" in msg and "this run has 4 (--accum_iter 1 -> 2)" in msg   # only the changed flag
    assert "resume with --batch_size 2 --accum_iter 1 on 1 process(es)" in msg             # how to continue
    records, _ = run(tmp_path, *argv, "--batch_size", "1", "--accum_iter", "2", "--max_steps", "2", "--resume", "auto")
    assert records[0]["step"] == 2                                        # 1 x 2 = 2 x 1: continues from step 1


def test_a_nan_loss_stops_and_names_the_last_good_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(train, "build_pretrainer", lambda *a, **k: StandIn(nan_at_call=3))
    with pytest.raises(SystemExit) as info:                               # 2 steps per epoch; NaN at step 2
        run(tmp_path, *TINY, "--num_images", "4", "--epochs", "3", "--warmup_epochs", "0")
    msg = str(info.value.code)
    last = os.path.join(str(tmp_path / "out"), "checkpoint-last.pth")
    assert "non-finite loss" in msg and "step 2" in msg and last in msg
    assert train.load_checkpoint(last)["step"] == 2                       # the good state is still on disk


# ---- the --model / --method tables -----------------------------------------------------------------------------------

def runs(model, method, *, backward=False, teacher=None):
    """Does the pair build and run one step on a (2, [V,] 3, 32, 32) batch? With backward: is every trained
    parameter given a gradient (DDP with find_unused_parameters=False needs it)?"""
    try:
        torch.manual_seed(0)
        pretrainer = train.build_pretrainer(model, method, mask_ratio=None, norm_pix_loss=None, teacher=teacher)
        two = getattr(pretrainer, "num_views", 1) == 2                    # M3I: two views + their geometry
        frames = {"geometry": torch.tensor([[0.0, 0.0, 1.0, 1.0, 0.0], [0.0, 0.0, 1.0, 1.0, 1.0]]).expand(2, -1, -1)}
        with torch.set_grad_enabled(backward):
            out = pretrainer(torch.randn(2, *(2,) * two, 3, 32, 32), **(frames if two else {}))   # (B, [2,] 3, H, W)
    except (TypeError, ValueError, AttributeError, KeyError):
        return False
    if backward:
        out["loss"].backward()
        assert all(p.grad is not None for p in pretrainer.parameters() if p.requires_grad), (model, method)
    return True


@pytest.mark.parametrize("model", ["hivit_tiny", "vit_tiny", "itpn_tiny", "fast_itpn_tiny"])
def test_default_method_of_every_family_trains_every_parameter(model):
    assert runs(model, train.DEFAULT_METHOD[train.MODELS[model][0]], backward=True)


@pytest.fixture(scope="module")
def vit_teacher(tmp_path_factory):
    """A tiny random project ViT (16-px patches, the student's unit grid) saved as train.py saves a checkpoint."""
    from dataclasses import replace
    import hivit
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("teacher") / "vit_tiny.pth"
    torch.save({"model": hivit.VisionTransformer(replace(hivit.VIT_PRESETS["vit_tiny"], num_classes=0)).state_dict()},
               path)
    return str(path)


TINY_OF = {"mim": "hivit_tiny", "itpn": "itpn_tiny", "fast_itpn": "fast_itpn_tiny"}   # file of a method -> model


@pytest.mark.parametrize("method", list(train.METHOD_FILE))
def test_every_method_trains_every_parameter_on_its_tiny_model(method, vit_teacher):
    """All of --method's choices (the 12 M3I presets, FastMIM-P and both distillations included): one forward and
    backward through build_pretrainer, as train.py builds them."""
    teacher = vit_teacher if method in train.TEACHER_METHODS else None
    assert runs(TINY_OF[train.METHOD_FILE[method]], method, backward=True, teacher=teacher)


def test_compatibility_table_is_right_both_ways():
    """mim.py's methods wrap every encoder; itpn.py's and fast_itpn.py's need their own model (and pyramid)."""
    for model in ("hivit_tiny", "vit_tiny", "fast_itpn_tiny"):
        assert not runs(model, "itpn") and not runs(model, "itpn_pixel")
    for method in ("mae", "simmim", "m3i", "m3i_e_mim_feat"):             # drop units / mask pixels / mix / EMA
        assert runs("fast_itpn_tiny", method) and runs("itpn_tiny", method)
    assert runs("itpn_tiny", "itpn_pixel")
    for family in ("hivit", "vit", "itpn", "fast_itpn"):
        own = {m for m in train.METHOD_FILE if train.METHOD_FILE[m] in ("mim", family)}
        assert set(train.compatible_methods(family)) == own


def test_fastmim_p_crop_side_follows_its_schedule_across_epochs(tmp_path):
    # 128 -> 160 -> 192 at 0, 1/2, 3/4 of training, rescaled so the last side is --input_size 64, in whole units
    # (at --input_size 32 the schedule would start at 16 px = one unit, which masking leaves invisible: refused)
    records, _ = run(tmp_path, *TINY, "--input_size", "64", "--model", "hivit_tiny", "--method", "fastmim_p",
                     "--num_images", "2", "--epochs", "4", "--warmup_epochs", "0")
    assert [r["input_size"] for r in records] == [48, 48, 48, 64]
    assert all(np.isfinite(r["train_loss"]) for r in records)


def test_truncate_removes_the_last_blocks_and_loads_into_the_full_model():
    """--truncate K (FastMIM Tab. 1c): the encoder has depth - K blocks; its weights fill the full-depth encoder
    except the last K blocks; a recipe with a fixed architecture refuses the flag."""
    torch.manual_seed(0)
    full = train.build_pretrainer("hivit_tiny", "mae", mask_ratio=None, norm_pix_loss=None, teacher=None)
    cut = train.build_pretrainer("hivit_tiny", "mae", mask_ratio=None, norm_pix_loss=None, teacher=None, truncate=1)
    full_keys, cut_keys = set(full.state_dict()), set(cut.state_dict())
    assert cut_keys < full_keys
    depth = train.MODELS["hivit_tiny"][1].depth
    assert {k.split(".", 3)[2] for k in full_keys - cut_keys if ".blocks." in k} == {str(depth - 1)}
    full.load_state_dict(cut.state_dict(), strict=False)
    with pytest.raises(ValueError, match="--truncate"):
        train.build_pretrainer("itpn_tiny", "itpn", mask_ratio=None, norm_pix_loss=None, teacher=None, truncate=1)


# ---- reliability: data folders, flags, runs and checkpoints ---------------------------------------------------------

def rgb_png(path, seed=0, size=(40, 40)):
    write_png(path, np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8))


def test_symlinks_are_followed_once_and_loops_are_cut(tmp_path):
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    for i in range(3):
        rgb_png(data / "sub" / f"{i}.png", i)
    os.symlink("..", data / "sub" / "up")                                 # a loop: sub/up -> data
    os.symlink(".", data / "self")                                        # a self-link
    os.symlink(data / "sub" / "0.png", data / "alias.png")                # a second name of one file
    with pytest.warns(UserWarning, match="already read"):
        files = train.ImageFiles(str(data))
    assert len(files) == 3                                                # each real file once


def test_any_decoding_error_is_skipped_and_a_long_run_of_them_is_one_clear_message(tmp_path):
    class Flaky(torch.utils.data.Dataset):
        def __init__(self, bad):
            self.bad = bad

        def __len__(self):
            return 60

        def __getitem__(self, i):
            if i in self.bad:
                raise ZeroDivisionError("decoder bug")                      # not an OSError
            return Image.new("RGB", (8, 8)), 0

    views = train.SeededViews(Flaky({3}), lambda img, t: (T_to_tensor(img), t), seed=0)
    with pytest.warns(UserWarning, match="ZeroDivisionError"):
        _, _, skipped = views[3]
    assert skipped == 1
    with pytest.warns(UserWarning):
        with pytest.raises(train.DataError, match="50 images in a row could not be read"):
            train.SeededViews(Flaky(set(range(55))), lambda img, t: (img, t))[0]


def T_to_tensor(img):
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)


def test_a_run_of_broken_files_inside_loader_workers_ends_in_one_line(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    rgb_png(data / "a.png")
    for i in range(60):
        (data / f"b{i:02d}.png").write_bytes(b"broken")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        msg = error_of([*TINY[:4], "--num_workers", "1", "--data_path", str(data), "--model", "hivit_tiny",
                        "--method", "mae", "--batch_size", "8", "--epochs", "1", "--warmup_epochs", "0"], tmp_path)
    assert msg.startswith("error: 50 images in a row could not be read") and "Traceback" not in msg


def test_high_bit_depth_images_are_scaled_by_their_modes_range_the_same_for_every_image(tmp_path):
    dim = np.full((8, 8), 250, np.uint16)
    dim[0, 0] = 300                                                       # max > 255: still the 16-bit range's scale
    Image.fromarray(dim).save(tmp_path / "dim.png")
    Image.fromarray(np.full((8, 8), 200, np.uint16)).save(tmp_path / "dimmer.png")
    Image.fromarray(np.full((8, 8), 0.5, np.float32)).save(tmp_path / "half.tif")
    files = train.ImageFiles(str(tmp_path))
    pixel = {os.path.basename(p): np.asarray(files[i][0])[1, 1, 0] for i, p in enumerate(files.paths)}
    assert pixel == {"dim.png": round(250 * 255 / 65535), "dimmer.png": round(200 * 255 / 65535), "half.tif": 128}


def test_gif_frames_are_read_and_unreadable_folders_are_reported(tmp_path, monkeypatch):
    data = tmp_path / "gifs"
    data.mkdir()
    frames = [Image.new("RGB", (16, 16), c) for c in ("red", "blue")]
    frames[0].save(data / "anim.gif", save_all=True, append_images=frames[1:])
    files = train.ImageFiles(str(data))
    assert len(files) == 1 and np.asarray(files[0][0])[0, 0].tolist() == [255, 0, 0]   # the first frame
    (data / "locked").mkdir()
    real_scandir = os.scandir

    def scandir(path="."):
        if str(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.warns(UserWarning, match="skipping folder .*locked.*Permission denied"):
        train.ImageFiles(str(data))


def test_an_empty_data_path_is_refused(tmp_path):
    assert "--data_path is empty" in error_of(["--data_path", ""], tmp_path)


def test_bad_output_dirs_are_refused_before_any_work(tmp_path, monkeypatch):
    def error_with_output_dir(path):
        with pytest.raises(SystemExit) as info:
            train.main(["--output_dir", str(path)])
        return str(info.value.code)

    monkeypatch.setattr(train, "build_pretrainer", lambda *a, **k: pytest.fail("the model was built"))
    (tmp_path / "file").write_text("x")
    assert "is a file" in error_with_output_dir(tmp_path / "file")
    assert "lies under the file" in error_with_output_dir(tmp_path / "file" / "run")
    monkeypatch.setattr(train.os, "access", lambda path, mode: False)     # root can write anywhere: pretend
    assert "is not writable" in error_with_output_dir(tmp_path / "ro")


def test_missing_cuda_and_bad_thread_counts_are_messages(tmp_path, capsys):
    if not torch.cuda.is_available():
        assert "no CUDA device" in error_of(["--device", "cuda"], tmp_path)
    with pytest.raises(SystemExit):
        run(tmp_path, "--threads", "0")
    assert "--threads 0 is out of range" in capsys.readouterr().err


def test_a_fresh_run_never_overwrites_a_finished_one(tmp_path):
    argv = [*TINY, "--num_images", "4", "--epochs", "1", "--warmup_epochs", "0", "--model", "hivit_tiny",
            "--method", "mae"]
    run(tmp_path, *argv)
    out = tmp_path / "out"
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    msg = error_of(argv, tmp_path, name="out")
    assert "holds a run" in msg and "--resume auto" in msg and "--overwrite" in msg
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before      # nothing touched
    run(tmp_path, *argv, "--overwrite")
    assert len(read_log(str(out))) == 1                                   # a new log, not two runs mixed


def test_resume_on_a_dataset_of_another_size_is_refused(tmp_path):
    argv = [*TINY, "--epochs", "2", "--warmup_epochs", "0", "--model", "hivit_tiny", "--method", "mae"]
    run(tmp_path, *argv, "--num_images", "8", "--max_steps", "1")
    msg = error_of([*argv, "--num_images", "6", "--resume", "auto"], tmp_path, name="out")
    assert "written on a dataset of 8 images, this run has 6" in msg and "dataset changed size" in msg
    msg = error_of([*argv, "--num_images", "9", "--resume", "auto"], tmp_path, name="out")   # 4 steps per epoch too
    assert "written on a dataset of 8 images, this run has 9" in msg


def test_a_full_disk_keeps_the_previous_checkpoint_and_leaves_no_tmp(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint-last.pth")
    train.save_checkpoint(path, {"step": 1})

    def no_space(obj, f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(train.torch, "save", no_space)
    with pytest.raises(train.ConfigError, match="disk is full"):
        train.save_checkpoint(path, {"step": 2})
    assert train.load_checkpoint(path)["step"] == 1 and os.listdir(tmp_path) == ["checkpoint-last.pth"]


def test_leftover_tmp_files_are_removed_when_a_run_starts(tmp_path):
    argv = [*TINY, "--num_images", "4", "--epochs", "1", "--warmup_epochs", "0", "--model", "hivit_tiny",
            "--method", "mae", "--max_steps", "1"]
    run(tmp_path, *argv)
    (tmp_path / "out" / "checkpoint-last.pth.tmp").write_bytes(b"half a checkpoint")
    run(tmp_path, *argv, "--resume", "auto", "--max_steps", "2")
    assert not any(p.name.endswith(".tmp") for p in (tmp_path / "out").iterdir())


def test_ctrl_c_stops_at_a_step_boundary_saves_and_resumes_bitwise(tmp_path, monkeypatch):
    argv = [*TINY, "--num_images", "8", "--epochs", "2", "--warmup_epochs", "0", "--model", "hivit_tiny",
            "--method", "mae", "--blr", "0.05"]                           # 4 steps per epoch
    run(tmp_path, *argv, name="straight")
    real_after_step = train.PretrainTask.after_step

    def interrupted(self, progress):
        real_after_step(self, progress)
        if round(progress * 7) == 2:                                      # during step 2 of 8
            os.kill(os.getpid(), __import__("signal").SIGINT)

    monkeypatch.setattr(train.PretrainTask, "after_step", interrupted)
    msg = error_of(argv, tmp_path, name="stopped")
    assert "SIGINT" not in msg and "stopped at step 3" in msg and "--resume auto" in msg
    assert train.load_checkpoint(str(tmp_path / "stopped" / "checkpoint-last.pth"))["step"] == 3
    monkeypatch.setattr(train.PretrainTask, "after_step", real_after_step)
    run(tmp_path, *argv, "--resume", "auto", name="stopped")
    a = train.load_checkpoint(str(tmp_path / "straight" / "checkpoint-last.pth"))
    b = train.load_checkpoint(str(tmp_path / "stopped" / "checkpoint-last.pth"))
    assert a["step"] == b["step"] == 8 and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


@pytest.mark.parametrize("content, expected", [
    (lambda p: torch.save(torch.ones(3), p), "holds a Tensor, not a checkpoint dict"),
    (lambda p: open(p, "wb").write(os.urandom(256)), "is not a PyTorch checkpoint"),
    (lambda p: open(p, "w").write("hello"), "is not a PyTorch checkpoint"),
    (lambda p: torch.save({"model": {}, "step": 1}, p), "not a checkpoint written by this project"),
    (lambda p: torch.save({"model": {}, "optimizer": {}, "step": 1, "args": argparse_namespace()}, p),
     "pickled Python objects")])
def test_files_that_are_not_checkpoints_get_one_message_each(tmp_path, content, expected):
    path = str(tmp_path / "thing.pth")
    content(path)
    msg = error_of(["--resume", path], tmp_path)
    assert msg.startswith("error: --resume") and expected in msg


def argparse_namespace():
    import argparse
    return argparse.Namespace(model="itpn_tiny")


@pytest.mark.parametrize("model, depth", [("hivit_b", 6), ("itpn_b", 6), ("fast_itpn_b", 6), ("itpn_vit_b", 8),
                                          ("vit_b", 8)])
def test_mae_decoder_depth_follows_the_encoder_family(model, depth):
    """HiViT App. A: MAE on a hierarchical encoder decodes with 6 blocks; MAE's own 8 stay for a plain ViT (also
    iTPN's plain-ViT backbone). Built on the meta device: no memory, no init time."""
    with torch.device("meta"):
        pretrainer = train.build_pretrainer(model, "mae", mask_ratio=None, norm_pix_loss=None, teacher=None)
    assert len(pretrainer.decoder.blocks) == depth == pretrainer.cfg.decoder_depth
    assert pretrainer.cfg.decoder_dim == 512 and pretrainer.cfg.decoder_heads == 16


# ---- reliability: sizes and mask ratios each method can train at, teacher files (model side) ----

def flags_verdict(argv, capsys, monkeypatch):
    """(exit code, message) of train.main(argv) when every start-up check has run; nothing is built or written."""
    monkeypatch.setattr(train, "setup_distributed", lambda cfg: (_ for _ in ()).throw(train.ConfigError("flags ok")))
    with pytest.raises(SystemExit) as info:
        train.main([*argv, "--output_dir", "/nonexistent/never-written"])
    code = info.value.code
    return (0, "flags ok") if code == "error: flags ok" else (code, capsys.readouterr().err)


@pytest.mark.parametrize("argv, split, smallest", [
    (["--model", "itpn_tiny", "--input_size", "16"], "1 masked, 0 visible", 32),             # a 16-px image: 1 unit
    (["--model", "itpn_tiny", "--method", "itpn_pixel", "--input_size", "16"], "1 masked, 0 visible", 32),
    (["--model", "hivit_tiny", "--method", "mae", "--input_size", "16"], "1 masked, 0 visible", 32),   # HiViT alike
    (["--model", "vit_tiny", "--method", "simmim", "--input_size", "16"], "1 masked, 0 visible", 32),
    (["--model", "hivit_tiny", "--method", "fastmim_p", "--input_size", "32"], "1 masked, 0 visible", 48),  # 16 px
    (["--model", "hivit_tiny", "--method", "m3i", "--input_size", "16"], "0 from image i, 1 from image j", 32),
    (["--model", "itpn_tiny", "--method", "itpn_distill", "--teacher", "t.pth", "--input_size", "16"],
     "0 masked, 1 visible", 32),
    (["--model", "hivit_tiny", "--method", "mae", "--mask_ratio", "0.01", "--input_size", "64"],
     "0 masked, 16 visible", 128)])
def test_sizes_a_method_cannot_train_at_are_refused_naming_the_smallest(argv, split, smallest, capsys, monkeypatch):
    code, err = flags_verdict(argv, capsys, monkeypatch)
    assert code == 2 and f"splits into {split}" in err and f"use --input_size {smallest} or more" in err, err
    size_at = argv.index("--input_size") + 1
    for side, verdict in ((smallest - 16, 2), (smallest, 0)):            # the stated minimum is the minimum
        argv[size_at] = str(side)
        assert flags_verdict(argv, capsys, monkeypatch)[0] == verdict, side


@pytest.mark.parametrize("method", ["mae", "simmim", "fastmim", "fastmim_p", "m3i_d_mim_pixel", "itpn",
                                    "itpn_pixel"])
def test_mask_ratio_zero_is_refused_where_the_loss_lives_on_masked_units(method, capsys, monkeypatch):
    model = "itpn_tiny" if method.startswith("itpn") else "hivit_tiny"
    code, err = flags_verdict(["--model", model, "--method", method, "--mask_ratio", "0"], capsys, monkeypatch)
    assert code == 2 and f"--mask_ratio 0 masks no unit, but {method}'s loss is computed on masked units" in err


def test_full_input_m3i_rows_take_mask_ratio_zero_and_mixing_refuses_a_mask_ratio(capsys, monkeypatch):
    assert flags_verdict(["--model", "hivit_tiny", "--method", "m3i_b_dense_distillation", "--mask_ratio", "0",
                          "--input_size", "16"], capsys, monkeypatch) == (0, "flags ok")
    code, err = flags_verdict(["--model", "hivit_tiny", "--method", "m3i", "--mask_ratio", "0.5"], capsys, monkeypatch)
    assert code == 2 and "--mask_ratio does not apply to --method m3i" in err
    code, err = flags_verdict(["--model", "hivit_tiny", "--method", "mae", "--truncate", "2"], capsys, monkeypatch)
    assert code == 2 and "--truncate 2 removes every attention block of hivit_tiny (depth 2): use 0..1" in err


@pytest.mark.parametrize("model, method, side", [
    ("itpn_tiny", "itpn", 32), ("itpn_tiny", "itpn_pixel", 48), ("hivit_tiny", "mae", 32), ("vit_tiny", "fastmim", 48),
    ("hivit_tiny", "m3i", 32), ("hivit_tiny", "m3i_k_siamese_im_feat", 48), ("itpn_tiny", "itpn_distill", 32),
    ("fast_itpn_tiny", "fast_itpn_distill", 48)])
def test_unit_split_counts_what_the_methods_forward_masks(model, method, side, tmp_path):
    """The size check reads unit_split; here it is held against the mask each pre-trainer's own forward returns."""
    import hivit
    from dataclasses import replace
    teacher = None
    if method in train.TEACHER_METHODS:
        teacher = str(tmp_path / "t.pth")
        torch.save(hivit.VisionTransformer(replace(hivit.VIT_PRESETS["vit_tiny"], num_classes=0)).state_dict(), teacher)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                                   # the teacher's guessed head count
        pretrainer = train.build_pretrainer(model, method, mask_ratio=None, norm_pix_loss=None, teacher=teacher)
    grid = side // 16
    imgs = torch.randn(2, 3, side, side)
    if pretrainer.num_views == 2:
        views = train.PretrainViews(train.ShapesDataset(2, image_size=side), input_size=side, num_views=2)
        batch = torch.utils.data.default_collate([views[i][0] for i in range(2)])
        out = pretrainer(**batch)
    else:
        out = pretrainer(imgs)
    parts = train.unit_split(method, (grid, grid), None)
    masked = parts.get("masked", parts.get("from image j"))                # M3I's mask: 1 = unit from image j
    assert out["mask"].sum(1).tolist() == [float(masked)] * 2 and sum(parts.values()) == grid * grid


def test_a_bare_vit_teacher_gets_a_message_that_its_head_count_is_guessed(tmp_path):
    import hivit
    from dataclasses import replace
    vit = hivit.VisionTransformer(replace(hivit.VIT_PRESETS["vit_tiny"], num_classes=0))   # 2 heads of 32 channels
    torch.save(vit.state_dict(), tmp_path / "bare.pth")
    argv = [*TINY, "--method", "itpn_distill", "--num_images", "2", "--max_steps", "1", "--teacher"]
    with pytest.warns(UserWarning, match=r"records no head count.*assuming 64-d heads, 1 head\(s\) of width 64"):
        run(tmp_path, *argv, str(tmp_path / "bare.pth"))
    torch.save({"model": vit.state_dict(), "config": {"num_heads": 2}}, tmp_path / "recorded.pth")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)                       # the count is in the file: no guess
        run(tmp_path, *argv, str(tmp_path / "recorded.pth"), name="recorded")


@pytest.mark.parametrize("content, expected", [
    (lambda p: torch.save(torch.ones(3), p), "holds a Tensor, not a checkpoint dict"),
    (lambda p: open(p, "wb").write(os.urandom(256)), "is not a PyTorch checkpoint"),
    (lambda p: open(p, "w").write("hello"), "is not a PyTorch checkpoint"),
    (lambda p: torch.save({"model": {}, "args": argparse_namespace()}, p), "pickled Python objects")])
def test_teacher_files_that_are_not_checkpoints_get_one_message_each(tmp_path, content, expected):
    path = str(tmp_path / "teacher.pth")
    content(path)
    msg = error_of([*TINY, "--method", "itpn_distill", "--teacher", path], tmp_path)
    assert msg.startswith(f"error: teacher '{path}'") and expected in msg and "Traceback" not in msg


# ---- reliability: resume settings, records on a full disk, the resume command, --overwrite -------------------------

HIVIT_MAE = [*TINY, "--model", "hivit_tiny", "--method", "mae", "--num_images", "4", "--epochs", "2",
             "--warmup_epochs", "0"]                                      # 2 steps per epoch


@pytest.fixture(scope="module")
def one_step_run(tmp_path_factory):
    """A hivit_tiny + MAE run stopped after step 1 (seed 0, full depth, the method's mask ratio and targets)."""
    out = str(tmp_path_factory.mktemp("resume") / "run")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    train.main([*HIVIT_MAE, "--max_steps", "1", "--output_dir", out])
    torch.set_num_threads(threads)
    return out


@pytest.mark.parametrize("changed, was", [
    (["--seed", "1"], "--seed 0"), (["--input_size", "48"], "--input_size 32"),
    (["--mask_ratio", "0.5"], "--mask_ratio unset"), (["--no-norm_pix_loss"], "--norm_pix_loss unset"),
    (["--truncate", "1"], "--truncate 0")])
def test_a_resume_that_changes_what_is_trained_is_refused_in_one_line(one_step_run, changed, was):
    before = {name: os.path.getmtime(os.path.join(one_step_run, name)) for name in os.listdir(one_step_run)}
    with pytest.raises(SystemExit) as info:
        train.main([*HIVIT_MAE, *changed, "--max_steps", "2", "--resume", "auto", "--output_dir", one_step_run])
    msg = str(info.value.code)
    assert f"was written by {was}; this run has {changed[0]}" in msg and "\n" not in msg
    assert {name: os.path.getmtime(os.path.join(one_step_run, name)) for name in os.listdir(one_step_run)} == before


def test_a_checkpoint_that_does_not_record_a_setting_is_read_as_written_with_its_default(one_step_run, tmp_path):
    """Files from before a setting existed lack it in their args: they were written with its default. The weight
    load behind the settings check still ends in one line when the file's weights do not fit."""
    ckpt = train.load_checkpoint(os.path.join(one_step_run, "checkpoint-last.pth"))
    del ckpt["args"]["truncate"], ckpt["args"]["seed"]
    torch.save(ckpt, tmp_path / "old.pth")
    records, _ = run(tmp_path, *HIVIT_MAE, "--max_steps", "2", "--resume", str(tmp_path / "old.pth"))
    assert records[0]["step"] == 2                                        # seed 0 and truncate 0: the defaults
    msg = error_of([*HIVIT_MAE, "--seed", "3", "--resume", str(tmp_path / "old.pth")], tmp_path)
    assert "was written by --seed 0; this run has --seed 3" in msg
    ckpt["model"] = {k: v for k, v in ckpt["model"].items() if not k.startswith("encoder.blocks.1.")}
    torch.save(ckpt, tmp_path / "shallow.pth")                            # as a --truncate 1 run would write it
    msg = error_of([*HIVIT_MAE, "--resume", str(tmp_path / "shallow.pth")], tmp_path)
    assert "does not fit this run's model" in msg and "encoder.blocks.1." in msg and "\n" not in msg


@pytest.mark.parametrize("name", ["log.txt", "config.json"])
def test_a_full_disk_while_writing_a_record_is_one_message_and_keeps_the_checkpoint(tmp_path, monkeypatch, name):
    monkeypatch.setattr(train, "build_pretrainer", lambda *a, **k: StandIn())
    real_open = open

    def full_disk(path, *args, **kwargs):
        if os.path.basename(str(path)).startswith(name):                  # the record and its temporary file
            raise OSError(28, "No space left on device", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", full_disk)
    msg = error_of([*TINY, "--num_images", "2", "--epochs", "1", "--warmup_epochs", "0"], tmp_path, name="out")
    assert msg.startswith(f"error: could not write {tmp_path / 'out' / name}") and "disk is full" in msg
    assert "--output_dir" in msg and "\n" not in msg
    last = tmp_path / "out" / "checkpoint-last.pth"
    if name == "log.txt":                                                 # written before the log line
        assert train.load_checkpoint(str(last))["step"] == 1
    assert not any(p.name.endswith(".tmp") for p in (tmp_path / "out").iterdir())


def test_a_log_line_cut_by_a_full_disk_is_taken_back(tmp_path, monkeypatch):
    path = tmp_path / "log.txt"
    train.write_file(str(path), '{"epoch": 0}\n', append=True)
    real_open = open

    class HalfWritten:                                                    # writes half, then the disk is full
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            self.f.write(data[:len(data) // 2])
            self.f.flush()
            raise OSError(28, "No space left on device")

    monkeypatch.setattr("builtins.open", lambda p, *a, **k: HalfWritten(real_open(p, *a, **k)))
    with pytest.raises(train.ConfigError, match="disk is full"):
        train.write_file(str(path), '{"epoch": 1}\n', append=True)
    monkeypatch.undo()
    assert path.read_text() == '{"epoch": 0}\n'                           # only whole lines


def test_ctrl_c_under_torchrun_prints_a_torchrun_resume_command(tmp_path, monkeypatch):
    """Rank 0 of 2 (no process group is needed to run one rank's share of the data) is stopped by SIGINT."""
    monkeypatch.setattr(train, "build_pretrainer", lambda *a, **k: StandIn())
    monkeypatch.setattr(train, "setup_distributed", lambda cfg: train.Dist(0, 2, torch.device("cpu")))
    monkeypatch.setattr(train.PretrainTask, "after_step",
                        lambda self, progress: os.kill(os.getpid(), __import__("signal").SIGINT))
    argv = [*TINY, "--num_images", "8", "--epochs", "1", "--warmup_epochs", "0", "--seed", "5"]
    msg = error_of([*argv, "--overwrite"], tmp_path, name="out")
    out = str(tmp_path / "out")
    assert msg.endswith(f"\n  torchrun --nproc_per_node 2 train.py {' '.join(argv)} --output_dir {out} --resume auto")


def test_resume_command_names_the_launcher_and_drops_resume_and_overwrite(monkeypatch):
    cpu = torch.device("cpu")
    argv = ["--batch_size", "2", "--resume", "x.pth", "--overwrite", "--data_path", "/my data", "--resume=auto"]
    assert train.resume_command("train.py", argv, train.Dist(0, 1, cpu)) == \
        "python train.py --batch_size 2 --data_path '/my data'"
    assert train.resume_command("finetune.py", [], train.Dist(0, 8, cpu)) == "torchrun --nproc_per_node 8 finetune.py"
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")                           # 2 nodes of 8: the same on each node
    assert train.resume_command("train.py", ["--seed", "1"], train.Dist(0, 16, cpu)) == \
        "torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 train.py --seed 1"


def test_every_numeric_setting_has_a_range():
    """Every int / float flag of every script is range-checked at start-up (range_errors)."""
    import detect_seg
    import finetune
    for cls in (train.RunConfig, train.PretrainConfig, finetune.FinetuneConfig, detect_seg.DenseConfig):
        for f in fields(cls):
            if train.field_type(f) in (int, float):
                assert f.metadata.get("valid") is not None, f"{cls.__name__}.{f.name} has no range"


def test_overwrite_removes_only_the_run_s_own_files(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    own = ["checkpoint-last.pth", "checkpoint-9.pth", "checkpoint-best.pth", "checkpoint-last.pth.tmp", "log.txt",
           "config.json", "reconstruction-epoch099.png", "predictions-epoch1200.png", "seg-epoch000.png"]
    users = ["notes.png", "reconstruction-final.png", "plot-epoch1.png", "notes.txt", "Run-epoch001.png"]
    for name in own + users:
        (out / name).write_bytes(b"x")
    train.clear_run(str(out))
    assert sorted(p.name for p in out.iterdir()) == sorted(users)
