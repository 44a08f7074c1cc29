"""detect_seg.py's driver: the three heads end to end on built-in shapes, records, resume, DDP, schedules, bad input.

CPU only, tiny models, 64-px images, a few steps each (the heads' own oracles are in the other test_detect_seg_*)."""
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

import detect_seg as ds
from conftest import read_log, subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--num_images", "16", "--batch_size", "4", "--epochs", "2", "--warmup_epochs", "1", "--num_workers", "0"]


pytestmark = pytest.mark.usefixtures("one_thread")                       # conftest: tiny runs, one thread


def run(tmp_path, *argv, name="out"):
    out = str(tmp_path / name)
    return ds.main([*argv, "--output_dir", out]), out


def error_of(tmp_path, *argv, name="bad"):
    with pytest.raises(SystemExit) as info:
        run(tmp_path, *argv, name=name)
    return str(info.value.code)


@pytest.mark.parametrize("argv, metric", [
    ([], "test_mIoU"),
    (["--task", "det", "--head", "maskrcnn"], "test_segm_AP"),
    (["--task", "det", "--head", "dino"], "test_bbox_AP"),
    (["--task", "seg", "--model", "hivit_tiny"], "test_mIoU"),                # the simple feature pyramid
    (["--task", "det", "--model", "vit_tiny"], "test_bbox_AP")])
def test_every_head_trains_evaluates_and_writes_its_records(tmp_path, argv, metric):
    records, out = run(tmp_path, *SMALL, *argv)
    assert len(records) == 2 and records == read_log(out)
    last = records[-1]
    assert last["step"] == 8 and torch.isfinite(torch.tensor(last["train_loss"]))
    assert metric in last and 0 <= last[metric] <= 100                   # evaluated at the end of the run
    files = set(os.listdir(out))
    assert {"checkpoint-last.pth", "checkpoint-best.pth", "config.json", "log.txt"} <= files
    picture = [f for f in files if f.endswith("-epoch001.png")]
    assert len(picture) == 1
    with Image.open(os.path.join(out, picture[0])) as pic:                # 4 val images, 64 px drawn at 256
        assert pic.size == ((3 if picture[0].startswith("seg") else 1) * 256, 4 * 256)
    ckpt = torch.load(os.path.join(out, "checkpoint-last.pth"), weights_only=True)
    assert ckpt["args"]["task"] == (argv[1] if argv else "seg") and ckpt["step"] == 8


def test_eval_only_reproduces_the_logged_evaluation(tmp_path):
    records, out = run(tmp_path, *SMALL)
    again, _ = run(tmp_path, *SMALL, "--eval", "--resume", os.path.join(out, "checkpoint-last.pth"), name="eval")
    assert again[0]["test_mIoU"] == pytest.approx(records[-1]["test_mIoU"], abs=1e-9)
    assert not os.path.exists(tmp_path / "eval" / "log.txt")              # --eval writes nothing


@pytest.mark.parametrize("head", ["maskrcnn", "dino", "uperhead"])
def test_resume_continues_bitwise(tmp_path, head):
    argv = [*SMALL, "--task", "seg" if head == "uperhead" else "det", "--head", head]   # 4 steps per epoch
    run(tmp_path, *argv, name="straight")
    run(tmp_path, *argv, "--max_steps", "3", name="stopped")
    run(tmp_path, *argv, "--resume", "auto", name="stopped")
    a = torch.load(tmp_path / "straight" / "checkpoint-last.pth", weights_only=True)
    b = torch.load(tmp_path / "stopped" / "checkpoint-last.pth", weights_only=True)
    assert a["step"] == b["step"] == 8 and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    metric = "test_mIoU" if head == "uperhead" else "test_bbox_AP"
    assert read_log(str(tmp_path / "straight"))[-1][metric] == read_log(str(tmp_path / "stopped"))[-1][metric]


def test_two_gloo_ranks_match_one_process_with_the_same_global_batch(tmp_path):
    """Global batch 4 = 2 ranks x 2 micro-steps x 1 image = 1 process x 4 micro-steps x 1 image: shard k of a step
    reads the k-th image and seeds the samplers by k, so Mask R-CNN-lite's losses and gradients agree."""
    argv = ["--task", "det", "--head", "maskrcnn", "--num_images", "8", "--batch_size", "1", "--epochs", "2",
            "--warmup_epochs", "1", "--num_workers", "0", "--eval_every", "2"]
    env = subprocess_env()
    ddp_out = str(tmp_path / "ddp")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "detect_seg.py", *argv, "--accum_iter", "2", "--output_dir", ddp_out],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single, _ = run(tmp_path, *argv, "--accum_iter", "4", name="single")
    ddp = read_log(ddp_out)
    assert len(ddp) == len(single) == 2
    for a, b in zip(ddp, single):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["train_grad_norm"] == pytest.approx(b["train_grad_norm"], rel=1e-4)
    assert ddp[-1]["test_bbox_AP"] == pytest.approx(single[-1]["test_bbox_AP"], abs=1e-6)   # eval sharded


@pytest.mark.parametrize("change, said", [(["--schedule", "3x", "--epochs", "2"], "--schedule 1x"),
                                          (["--input_size", "96"], "--input_size 64")])
def test_a_resume_that_would_train_something_else_is_refused(tmp_path, change, said):
    argv = [*SMALL, "--task", "det", "--head", "maskrcnn", "--max_steps", "1"]
    _, out = run(tmp_path, *argv)
    msg = error_of(tmp_path, *argv, *change, "--resume", "auto", name="out")
    assert msg.startswith("error:") and said in msg and "\n" not in msg


@pytest.mark.parametrize("head", ["uperhead", "dino"])
def test_two_gloo_ranks_train_and_evaluate_every_head(tmp_path, head):
    """UPerHead's BatchNorm (SyncBN only on GPUs) and DINO's num_boxes all-reduce under torchrun with 2 CPU ranks:
    the run finishes, and evaluation over both ranks' shares matches the same weights evaluated by one process."""
    argv = ["--task", "seg" if head == "uperhead" else "det", "--head", head, "--num_images", "8", "--batch_size",
            "2", "--epochs", "1", "--warmup_epochs", "0", "--num_workers", "0"]
    env = subprocess_env()
    out = str(tmp_path / "ddp")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "detect_seg.py", *argv, "--output_dir", out], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = read_log(out)[-1]
    assert record["step"] == 2 and torch.isfinite(torch.tensor(record["train_loss"]))
    metric = "test_mIoU" if head == "uperhead" else "test_bbox_AP"
    again, _ = run(tmp_path, *argv, "--eval", "--resume", os.path.join(out, "checkpoint-last.pth"),
                   name="eval")                                          # one process, another batch split
    assert again[0][metric] == pytest.approx(record[metric], abs=1e-6)


def test_an_unreadable_val_image_is_left_out_of_the_metric(tmp_path, monkeypatch):
    """COCO data with a val image that cannot be decoded: the evaluation warns and scores the others against their
    own ground truth only (not a neighbour twice, and not the broken image's objects as missed)."""
    from test_detect_seg_data_eval import tiny_coco
    data, _, _ = tiny_coco(str(tmp_path / "coco"))
    for split in ("train2017",):                                         # the same three images for training
        os.makedirs(tmp_path / "coco" / split)
        for im in data["images"]:
            os.link(tmp_path / "coco" / "val2017" / im["file_name"], tmp_path / "coco" / split / im["file_name"])
        os.link(tmp_path / "coco" / "annotations" / "instances_val2017.json",
                tmp_path / "coco" / "annotations" / f"instances_{split}.json")
    os.remove(tmp_path / "coco" / "val2017" / "b.jpg")
    (tmp_path / "coco" / "val2017" / "b.jpg").write_bytes(b"not a jpeg")  # image 12, two annotations
    scored = []
    real = ds.coco_evaluate

    def keep(gt, results, iou_type):
        scored.append((sorted(im["id"] for im in gt["images"]), sorted({a["image_id"] for a in gt["annotations"]}),
                       sorted({r["image_id"] for r in results})))
        return real(gt, results, iou_type)

    monkeypatch.setattr(ds, "coco_evaluate", keep)
    with pytest.warns(UserWarning, match="cannot be read: left out of the evaluation"):
        run(tmp_path, "--task", "det", "--head", "maskrcnn", "--data_path", str(tmp_path / "coco"), "--batch_size",
            "2", "--epochs", "1", "--warmup_epochs", "0", "--num_workers", "0", "--input_size", "64")
    images, annotated, predicted = scored[0]
    assert images == [11, 13] and annotated == [11] and set(predicted) <= {11, 13}


def test_schedules_follow_the_papers():
    assert [ds.step_lr(s, lr=1.0, warmup_steps=4, milestones=(8, 11)) for s in (0, 2, 4, 7, 8, 10, 11)] == \
        [0.0, 0.5, 1.0, 1.0, pytest.approx(0.1), pytest.approx(0.1), pytest.approx(0.01)]
    cfg = ds.DenseConfig(task="det", head="maskrcnn", epochs=12, warmup_epochs=0, min_lr=0.0)
    lr_at = ds.dense_schedule(cfg, lr=1.0, steps_per_epoch=10)              # mmdet 1x: x0.1 at epochs 8 and 11
    assert [lr_at(s) for s in (79, 80, 109, 110)] == [1.0, pytest.approx(0.1), pytest.approx(0.1),
                                                      pytest.approx(0.01)]
    cfg = ds.DenseConfig(task="det", head="maskrcnn", epochs=36, warmup_epochs=0, min_lr=0.0, schedule="3x")
    lr_at = ds.dense_schedule(cfg, lr=1.0, steps_per_epoch=10)              # mmdet 3x: x0.1 at epochs 27 and 33
    assert [lr_at(s) for s in (269, 270, 329, 330)] == [1.0, pytest.approx(0.1), pytest.approx(0.1),
                                                        pytest.approx(0.01)]
    cfg.input_size = 800                                                  # Swin / HiViT 3x: 480..800 by 32
    assert ds.det_scales(cfg) == [(1333, s) for s in range(480, 801, 32)]
    cfg.schedule = "1x"
    assert ds.det_scales(cfg) == [(1333, 800)]
    cfg = ds.DenseConfig(task="det", head="dino", epochs=12, warmup_epochs=0, min_lr=0.0)
    lr_at = ds.dense_schedule(cfg, lr=1.0, steps_per_epoch=10)              # DINO: x0.1 at epoch 11
    assert [lr_at(s) for s in (80, 109, 110)] == [1.0, 1.0, pytest.approx(0.1)]
    cfg = ds.DenseConfig(task="seg", epochs=10, warmup_epochs=1, min_lr=0.0)
    lr_at = ds.dense_schedule(cfg, lr=1.0, steps_per_epoch=10)              # poly, power 1, after warm-up
    assert lr_at(55) == pytest.approx(ds.poly_lr(55, lr=1.0, warmup_steps=10, total_steps=100))
    assert lr_at(99) < lr_at(50) < lr_at(10)


def test_dino_trains_its_backbone_at_a_tenth_of_the_lr(tmp_path):
    cfg = ds.DenseConfig(task="det", head="dino", model="itpn_tiny", weight_decay=1e-4, layer_decay=1.0,
                         drop_path=0.0)
    backbone, neck, widths = ds.build_backbone(cfg.model, cfg)
    model = ds.DenseModel(backbone, neck=neck, head=ds.build_head(cfg, widths=widths, num_classes=3, tiny=True),
                          task="det", head_name="dino")
    scale = {id(p): g.get("lr_scale", 1.0) for g in ds.dense_param_groups(model, cfg) for p in g["params"]}
    assert all(scale[id(p)] == pytest.approx(0.1) for p in model.backbone.parameters())   # layer decay 1
    assert {scale[id(p)] for p in model.head.parameters()} == {1.0}
    assert len(scale) == sum(1 for _ in model.parameters())              # every parameter in exactly one group


@pytest.mark.parametrize("argv, expected", [
    (["--task", "seg", "--head", "dino"], "does not do --task seg"),
    (["--model", "itpn_tiny", "--migration_ratio", "0.2"], "Fast-iTPN switches"),
    (["--input_size", "48"], "--input_size 48 is out of range"),
    (["--epochs", "2", "--warmup_epochs", "2"], "must be below --epochs"),
    (["--task", "seg", "--schedule", "3x"], "--schedule 3x is Mask R-CNN's"),
    (["--model", "nope"], "invalid choice")])
def test_bad_flags_stop_at_start_up(tmp_path, capsys, argv, expected):
    with pytest.raises(SystemExit) as info:
        run(tmp_path, *argv)
    assert info.value.code == 2 and expected in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out")


def test_bad_data_and_weights_end_in_one_message(tmp_path):
    (tmp_path / "empty").mkdir()
    msg = error_of(tmp_path, "--data_path", str(tmp_path / "empty"))
    assert msg.startswith("error:") and "ADE20K layout" in msg
    msg = error_of(tmp_path, "--task", "det", "--data_path", str(tmp_path / "empty"))
    assert msg.startswith("error:") and "COCO layout" in msg
    msg = error_of(tmp_path, "--model", "hivit_tiny", "--pyramid", "random")
    assert "has no pre-trained pyramid" in msg
    (tmp_path / "junk.pth").write_text("not a checkpoint")
    assert "cannot be read" in error_of(tmp_path, "--finetune", str(tmp_path / "junk.pth"))


def test_a_released_dense_backbone_file_loads_strictly_through_the_driver(tmp_path, monkeypatch):
    """--model <released det/seg backbone> --finetune <its mmseg file>: itpn.load_official puts every tensor of the
    file into the backbone (a narrow stand-in of itpn_b_seg with its traits: eps 1e-5, APE at 224 px, 512-px RPE)."""
    from dataclasses import replace
    import itpn
    from conftest import official_dense_keys, official_random_weights
    cfg = replace(itpn.DENSE_PRESETS["itpn_b_seg"], embed_dim=64, num_heads=2, mlp_depth1=1, mlp_depth2=1, depth=2,
                  fpn_dim=32)
    monkeypatch.setitem(ds.DENSE_MODELS, "itpn_narrow_seg", ("itpn", cfg))
    monkeypatch.setitem(itpn.DENSE_PRESETS, "itpn_narrow_seg", cfg)
    sd = official_random_weights(official_dense_keys(c=64, n1=1, n2=1, depth=2, heads=2, fpn_dim=32,
                                                     fpn_depth=cfg.fpn_depth, layer_scale=cfg.layer_scale,
                                                     rpe_side=32))
    path = tmp_path / "upernet_itpn.pth"
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in sd.items()}, "meta": {}}, path)
    loaded = {}
    real = ds.DenseTask.__init__

    def keep(self, model, data, **kw):                                   # the model as the run starts
        loaded.update({k: v.clone() for k, v in model.backbone.state_dict().items()})
        real(self, model, data, **kw)

    monkeypatch.setattr(ds.DenseTask, "__init__", keep)
    run(tmp_path, "--model", "itpn_narrow_seg", "--finetune", str(path), "--input_size", "64", "--batch_size", "2",
        "--num_images", "4", "--epochs", "2", "--warmup_epochs", "0", "--max_steps", "1", "--num_workers", "0",
        "--blr", "0.01", "--layer_decay", "0.9", "--drop_path", "0", "--eval_every", "2", "--save_every", "2",
        "--min_lr", "0", "--weight_decay", "0.05")
    ours = {k: v for k, v in loaded.items() if not k.endswith("relative_position_index")}
    assert len(ours) == len([k for k in sd if not k.endswith("relative_position_index")])   # every tensor
    assert torch.equal(ours["pyramid.out4.mlp.fc2.weight"], sd["fpn_modules.2.mlp.fc2.weight"])
    assert torch.equal(ours["backbone.absolute_pos_embed"], sd["absolute_pos_embed"])
    assert ours["backbone.absolute_pos_embed"].shape[1] == 196            # the seg layout's 224-px table


def test_finetune_loads_the_pretrained_backbone_and_pyramid_and_pyramid_random_resets_only_the_pyramid(
        tmp_path, monkeypatch):
    """iTPN's claim needs its pyramid to travel: a train.py iTPN checkpoint gives the dense model its backbone and
    its pyramid tensor for tensor; --pyramid random re-draws the pyramid and leaves the backbone as loaded."""
    import train
    pre = str(tmp_path / "pre")
    train.main(["--model", "itpn_tiny", "--num_images", "8", "--batch_size", "4", "--max_steps", "1",
                "--num_workers", "0", "--output_dir", pre])
    encoder = {k[len("encoder."):]: v for k, v in
               torch.load(os.path.join(pre, "checkpoint-last.pth"), weights_only=True)["model"].items()
               if k.startswith("encoder.")}
    seen = []
    real = ds.DenseTask.__init__

    def keep(self, model, data, **kw):                                   # the model as the run starts
        seen.append({k: v.clone() for k, v in model.backbone.state_dict().items()})
        real(self, model, data, **kw)

    monkeypatch.setattr(ds.DenseTask, "__init__", keep)
    for name, extra in (("loaded", []), ("random", ["--pyramid", "random"])):
        run(tmp_path, *SMALL, "--max_steps", "1", "--finetune", os.path.join(pre, "checkpoint-last.pth"), *extra,
            name=name)
    loaded, random = seen
    pyramid = [k for k in loaded if k.startswith("pyramid.")]
    backbone = [k for k in loaded if k.startswith("backbone.") and k in encoder]    # bias tables: fresh (no RPE)
    assert len(pyramid) == len([k for k in encoder if k.startswith("pyramid.")]) > 0
    for k in pyramid + backbone:
        assert torch.equal(loaded[k], encoder[k]), k                      # every tensor, as pre-trained
    assert all(torch.equal(random[k], encoder[k]) for k in backbone)
    drawn = [k for k in pyramid if loaded[k].ndim >= 2]                  # norms and biases re-init to constants
    assert drawn and not any(torch.equal(random[k], encoder[k]) for k in drawn)
    import finetune
    from train import ConfigError
    file = finetune.read_pretrained(os.path.join(pre, "checkpoint-last.pth"))
    cfg = SimpleNamespace(task="seg", drop_path=0.0)                     # what build_backbone reads
    file.state = {k: v for k, v in file.state.items() if not k.startswith("encoder.pyramid.")}   # no pyramid
    report = finetune.load_pretrained(ds.build_backbone("itpn_tiny", cfg)[0], file, model_name="itpn_tiny")
    assert {k for k in report["fresh"] if k.startswith("pyramid.")} == set(pyramid)          # fresh, and said
    file.state["encoder.pyramid.proj16.weight"] = encoder["pyramid.proj16.weight"]          # a part of one
    with pytest.raises(ConfigError, match="missing pyramid"):
        finetune.load_pretrained(ds.build_backbone("itpn_tiny", cfg)[0], file, model_name="itpn_tiny")


def test_default_output_folder_is_per_head_and_leaves_the_pretraining_run_alone(tmp_path, monkeypatch):
    """`python train.py` writes output/; the course's next commands must not be refused (or write) there."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "output").mkdir()
    (tmp_path / "output" / "checkpoint-last.pth").write_bytes(b"the pre-training run")
    ds.main([*SMALL, "--task", "det", "--head", "dino", "--max_steps", "1"])
    assert (tmp_path / "output_dino" / "checkpoint-last.pth").is_file()
    assert os.listdir(tmp_path / "output") == ["checkpoint-last.pth"]


def test_the_3x_schedule_trains_three_times_as_long_at_several_sizes(tmp_path, monkeypatch):
    """--schedule 3x: 36 epochs unless --epochs says otherwise, and each image resized to one of the 3x sizes."""
    sizes = []
    real = ds.DetTrainTransform.__call__

    def note(self, image, target):
        x, out = real(self, image, target)
        sizes.append(min(x.shape[-2:]))                                  # the short side actually drawn
        return x, out

    monkeypatch.setattr(ds.DetTrainTransform, "__call__", note)
    records, _ = run(tmp_path, "--task", "det", "--schedule", "3x", "--num_images", "16", "--batch_size", "8",
                     "--num_workers", "0", "--max_steps", "4", "--input_size", "96")
    assert torch.load(os.path.join(tmp_path, "out", "checkpoint-last.pth"), weights_only=True)["args"]["epochs"] == 36
    assert len(set(sizes)) > 2 and set(sizes) <= {round(96 * (0.6 + 0.04 * k)) for k in range(11)}


@pytest.mark.parametrize("model, stride4", [
    ("itpn_tiny", {"pyramid.split8", "pyramid.lateral4", "pyramid.fuse4", "pyramid.out4"}),   # P8 -> P4, P4's out
    ("hivit_tiny", {"up4", "outputs.p4"})])                                                   # ViTDet's 4x deconvs
def test_dino_freezes_exactly_what_feeds_only_unread_maps(model, stride4):
    """DINO reads p8..p32: what only feeds p4 / p64 is frozen (DDP needs every trained tensor to get a gradient);
    after it, one real step gives every trainable tensor a gradient. Mask R-CNN-lite reads every level."""
    cfg = SimpleNamespace(task="det", drop_path=0.0, head="dino")
    backbone, neck, widths = ds.build_backbone(model, cfg)
    dense = ds.DenseModel(backbone, neck=neck, head=ds.build_head(cfg, widths=widths, num_classes=3, tiny=True),
                          task="det", head_name="dino")
    frozen = dense.freeze_unread()
    assert {".".join(n.split(".")[:2]) if n.startswith(("pyramid", "outputs")) else n.split(".")[0]
            for n in frozen} == stride4                                  # the stride-4 branch, nothing else
    images = torch.randn(2, 3, 64, 64)
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[4.0, 4.0, 40.0, 30.0]])}] * 2
    dense(images, pad_mask=torch.zeros(2, 64, 64, dtype=torch.bool), image_sizes=[(64, 64)] * 2,
          targets=targets)["loss"].backward()
    assert all(p.grad is not None for p in dense.parameters() if p.requires_grad)
    cfg.head = "maskrcnn"
    mask_rcnn = ds.DenseModel(backbone, neck=neck, head=ds.build_head(cfg, widths=widths, num_classes=3, tiny=True),
                              task="det", head_name="maskrcnn")
    for p in mask_rcnn.parameters():
        p.requires_grad_(True)
    assert mask_rcnn.freeze_unread() == []


@pytest.mark.parametrize("argv, field, value", [
    (["--migration_ratio", "0.2"], "migration_ratio", 0.2),                      # Sec. 4.1, seg at 64 px
    (["--task", "det", "--head", "dino", "--attention", "gathering", "--input_size", "128"], "attention",
     "gathering")])                                                              # Tab. 7, det at 128 px
def test_fast_itpn_switches_reach_the_dense_backbone(tmp_path, monkeypatch, argv, field, value):
    seen = []
    real = ds.DenseTask.__init__

    def keep(self, model, data, **kw):
        seen.append(model.backbone.cfg)
        real(self, model, data, **kw)

    monkeypatch.setattr(ds.DenseTask, "__init__", keep)
    records, _ = run(tmp_path, "--model", "fast_itpn_tiny", *argv, "--num_images", "8", "--batch_size", "4",
                     "--epochs", "1", "--warmup_epochs", "0", "--num_workers", "0")
    assert getattr(seen[0], field) == value and torch.isfinite(torch.tensor(records[-1]["train_loss"]))


def test_dense_layer_decay_keeps_the_pyramid_and_head_at_full_lr():
    """UPerHead at layer decay 0.9 (the papers' ADE20K setting): the backbone decays with depth (patch embedding
    lowest, a power of 0.9; later blocks never lower than earlier ones), the pre-trained pyramid counts as the top
    layer and the head trains at the full lr; every parameter in exactly one group."""
    cfg = SimpleNamespace(task="seg", drop_path=0.0, head="uperhead", model="itpn_tiny", layer_decay=0.9,
                          weight_decay=0.05)
    backbone, neck, widths = ds.build_backbone("itpn_tiny", cfg)
    model = ds.DenseModel(backbone, neck=neck, head=ds.build_head(cfg, widths=widths, num_classes=5, tiny=True),
                          task="seg", head_name="uperhead")
    scale = {id(p): g.get("lr_scale", 1.0) for g in ds.dense_param_groups(model, cfg) for p in g["params"]}
    assert len(scale) == sum(1 for _ in model.parameters())
    named = {n: scale[id(p)] for n, p in model.backbone.named_parameters()}
    assert {v for n, v in named.items() if n.startswith("pyramid.")} == {1.0}
    assert {scale[id(p)] for p in model.head.parameters()} == {1.0}
    lowest = named["backbone.patch_embed.proj.weight"]
    assert lowest == min(named.values()) < 1.0 and math.log(lowest, 0.9) == pytest.approx(round(math.log(lowest, 0.9)))
    blocks = [named[f"backbone.blocks.{i}.attn.qkv.weight"] for i in range(len(model.backbone.backbone.blocks))]
    assert blocks == sorted(blocks) and blocks[0] < blocks[-1] < 1.0
