"""Mask R-CNN-lite (detect_seg.py section 3) against torchvision's own Mask R-CNN, an independent formulation.

torchvision.models.detection is imported here only, as the oracle. Pieces are compared one by one (anchors, box
coder, matcher, sampler, multi-scale RoIAlign, mask targets, mask pasting), then the whole head with the SAME
weights copied into torchvision's RegionProposalNetwork / RoIHeads: proposals, final detections (boxes, scores,
labels, pasted masks) and the five training losses under the same seed. The "twin" is built through torchvision's
MaskRCNN constructor and left at its defaults for everything not in MaskRCNNConfig, so our constants are checked
against torchvision's too. Where the "paper" (mmdet) preset departs from torchvision (zero-IoU guard at 0.3,
aligned RoIAlign, L1, binarised mask targets) a brute-force formulation is the oracle.
"""
import dataclasses
import math

import pytest
import torch
from torch import nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler
from torchvision.models.detection._utils import BoxCoder as TVBoxCoder
from torchvision.models.detection._utils import Matcher as TVMatcher
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import paste_masks_in_image, project_masks_on_boxes
from torchvision.ops import MultiScaleRoIAlign, box_iou, roi_align

import detect_seg as ds
from conftest import _NoBackbone, torchvision_twin

STRIDES = (4, 8, 16, 32, 64)        # the iTPN det pyramid p4..p64
C, K, SIDE = 8, 3, 128              # channels, classes, padded input side (a multiple of 64: exact strides)
IMAGE_SIZES = [(128, 128), (104, 120)]
# torchvision's RPN / RoIHeads semantics with CPU-sized counts and widths.
TV_TINY = dataclasses.replace(ds.MASKRCNN_PRESETS["torchvision"], rpn_pre_nms_top_n=(300, 150),
                              rpn_post_nms_top_n=(150, 100), rpn_batch_per_image=64, roi_batch_per_image=64,
                              box_fc_dim=32, mask_dim=8)


# ---- helpers ---------------------------------------------------------------------------------------------------------

def random_boxes(n: int, *, side: float = SIDE, min_size: float = 4.0, generator=None) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=generator) * (side - min_size)
    wh = min_size + torch.rand(n, 2, generator=generator) * (side - xy - min_size).clamp(min=1)
    return torch.cat([xy, xy + wh], dim=1)                                       # (n, 4) xyxy


def make_model(cfg=TV_TINY, *, seed: int = 0, std: float = 0.05) -> ds.MaskRCNNLite:
    """Heads with non-trivial random weights (the default RPN init N(0, 0.01) would leave proposals = anchors)."""
    torch.manual_seed(seed)
    model = ds.MaskRCNNLite(C, num_classes=K, strides=STRIDES, cfg=cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, std)
    return model


def make_features(seed: int = 1, batch: int = 2) -> list:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, C, SIDE // s, SIDE // s, generator=g) for s in STRIDES]


def ellipse_masks(boxes: torch.Tensor) -> torch.Tensor:
    """(n, 4) boxes -> (n, SIDE, SIDE) bool: the ellipse inscribed in each box (pixel centres at +0.5)."""
    ys, xs = torch.meshgrid(torch.arange(SIDE) + 0.5, torch.arange(SIDE) + 0.5, indexing="ij")
    centre, radius = (boxes[:, :2] + boxes[:, 2:]) / 2, (boxes[:, 2:] - boxes[:, :2]) / 2
    dx = (xs - centre[:, 0, None, None]) / radius[:, 0, None, None]
    dy = (ys - centre[:, 1, None, None]) / radius[:, 1, None, None]
    return dx ** 2 + dy ** 2 <= 1


def make_targets(seed: int = 2) -> list:
    """Two or three objects per image: rectangles with an elliptic instance mask inside, labels 1..K."""
    g = torch.Generator().manual_seed(seed)
    targets = []
    for n, (h, w) in zip((2, 3), IMAGE_SIZES):
        boxes = random_boxes(n, side=min(h, w), min_size=12.0, generator=g)
        targets.append({"boxes": boxes, "labels": torch.randint(1, K + 1, (n,), generator=g),
                        "masks": ellipse_masks(boxes)})
    return targets


def run_twin(twin: MaskRCNN, features: list, targets=None) -> tuple:
    images = ImageList(torch.zeros(features[0].shape[0], 3, SIDE, SIDE), IMAGE_SIZES)
    feats = {str(i): f for i, f in enumerate(features)}
    proposals, rpn_losses = twin.rpn(images, feats, targets)
    detections, roi_losses = twin.roi_heads(feats, proposals, IMAGE_SIZES, targets)
    return proposals, detections, {**rpn_losses, **roi_losses}


# ---- 3.1 presets -----------------------------------------------------------------------------------------------------

def test_torchvision_preset_and_constants_equal_torchvision_defaults():
    cfg = ds.MASKRCNN_PRESETS["torchvision"]
    twin = MaskRCNN(_NoBackbone(C), num_classes=K + 1)            # all defaults (maskrcnn_resnet50_fpn heads)
    rpn, roi = twin.rpn, twin.roi_heads
    assert rpn.anchor_generator.sizes == tuple((cfg.anchor_scale * s,) for s in STRIDES)
    assert all(tuple(r) == cfg.aspect_ratios for r in rpn.anchor_generator.aspect_ratios)
    assert (rpn._pre_nms_top_n["training"], rpn._pre_nms_top_n["testing"]) == cfg.rpn_pre_nms_top_n
    assert (rpn._post_nms_top_n["training"], rpn._post_nms_top_n["testing"]) == cfg.rpn_post_nms_top_n
    assert rpn.fg_bg_sampler.batch_size_per_image == cfg.rpn_batch_per_image
    assert roi.fg_bg_sampler.batch_size_per_image == cfg.roi_batch_per_image
    assert roi.box_head.fc7.out_features == cfg.box_fc_dim and roi.mask_head[0][0].out_channels == cfg.mask_dim
    assert twin.roi_heads.box_roi_pool.sampling_ratio == cfg.roi_sampling_ratio
    assert (rpn.proposal_matcher.high_threshold, rpn.proposal_matcher.low_threshold) == (ds.RPN_FG_IOU, ds.RPN_BG_IOU)
    assert (roi.proposal_matcher.high_threshold, roi.proposal_matcher.low_threshold) == (ds.ROI_IOU, ds.ROI_IOU)
    assert rpn.fg_bg_sampler.positive_fraction == ds.RPN_POSITIVE_FRACTION
    assert roi.fg_bg_sampler.positive_fraction == ds.ROI_POSITIVE_FRACTION
    assert (rpn.nms_thresh, rpn.min_size) == (ds.RPN_NMS_IOU, ds.RPN_MIN_SIZE)
    assert tuple(rpn.box_coder.weights) == ds.RPN_BOX_WEIGHTS and tuple(roi.box_coder.weights) == ds.ROI_BOX_WEIGHTS
    assert rpn.box_coder.bbox_xform_clip == ds.BBOX_XFORM_CLIP
    assert (roi.score_thresh, roi.nms_thresh, roi.detections_per_img) == (
        ds.SCORE_THRESH, ds.DET_NMS_IOU, ds.DETS_PER_IMAGE)
    assert roi.box_roi_pool.output_size == (ds.BOX_POOL,) * 2 and roi.mask_roi_pool.output_size == (ds.MASK_POOL,) * 2
    assert (roi.box_roi_pool.canonical_scale, roi.box_roi_pool.canonical_level) == (
        ds.CANONICAL_SCALE, ds.CANONICAL_LEVEL)
    assert len(roi.mask_head) == ds.MASK_NUM_CONVS


# mmdet 2.x `configs/_base_/models/mask_rcnn_r50_fpn.py`, the model file of the iTPN / HiViT COCO configs, copied
# value by value: (our field, mmdet's key, mmdet's value).
MMDET_MASK_RCNN = [
    ("anchor_scale", "rpn_head.anchor_generator.scales", 8),
    ("aspect_ratios", "rpn_head.anchor_generator.ratios", (0.5, 1.0, 2.0)),
    ("rpn_pre_nms_top_n", "train_cfg.rpn_proposal.nms_pre, test_cfg.rpn.nms_pre", (2000, 1000)),
    ("rpn_post_nms_top_n", "train_cfg.rpn_proposal.max_per_img, test_cfg.rpn.max_per_img", (1000, 1000)),
    ("rpn_batch_per_image", "train_cfg.rpn.sampler.num", 256),
    ("rpn_low_quality_min_iou", "train_cfg.rpn.assigner.min_pos_iou", 0.3),
    ("roi_batch_per_image", "train_cfg.rcnn.sampler.num", 512),
    ("roi_sampling_ratio", "bbox_roi_extractor.roi_layer.sampling_ratio", 0),
    ("box_loss_beta", "loss_bbox=L1Loss (RPN and RoI heads)", 0.0),
    ("box_fc_dim", "bbox_head.fc_out_channels", 1024),
    ("mask_dim", "mask_head.conv_out_channels", 256),
]


@pytest.mark.parametrize("field, mmdet_key, value", MMDET_MASK_RCNN)
def test_paper_preset_is_mmdets_mask_rcnn(field, mmdet_key, value):
    assert getattr(ds.MASKRCNN_PRESETS["paper"], field) == value, mmdet_key


def test_paper_constants_are_mmdets():
    """The rules both presets share, against the same mmdet file's train_cfg / test_cfg."""
    assert (ds.RPN_FG_IOU, ds.RPN_BG_IOU, ds.RPN_POSITIVE_FRACTION, ds.RPN_NMS_IOU) == (0.7, 0.3, 0.5, 0.7)
    assert (ds.ROI_IOU, ds.ROI_POSITIVE_FRACTION) == (0.5, 0.25)              # rcnn assigner pos/neg 0.5, 1:3
    assert (ds.SCORE_THRESH, ds.DET_NMS_IOU, ds.DETS_PER_IMAGE) == (0.05, 0.5, 100)
    assert (ds.BOX_POOL, ds.MASK_POOL, ds.MASK_SIZE) == (7, 14, 28)
    assert ds.ROI_BOX_WEIGHTS == tuple(1 / s for s in (0.1, 0.1, 0.2, 0.2))   # bbox_coder.target_stds


def test_paper_heads_have_torchvision_size_without_background_outputs():
    """At the paper's widths (C = 256, K = 80) our heads = torchvision's heads minus the background box deltas and
    background mask map (mmdet's predictors have neither)."""
    model = ds.MaskRCNNLite(256, num_classes=80, strides=STRIDES, cfg=ds.MASKRCNN_PRESETS["paper"])
    twin = MaskRCNN(_NoBackbone(256), num_classes=81)
    tv_heads = sum(p.numel() for p in twin.parameters())
    background = (4 * 1024 + 4) + (256 + 1)          # one box-delta row block + one 1x1 mask logit map
    assert sum(p.numel() for p in model.parameters()) == tv_heads - background


# ---- 3.2 anchors -----------------------------------------------------------------------------------------------------

def test_anchors_equal_torchvision_anchor_generator():
    model = make_model()
    feats = make_features()
    ours = torch.cat(model.rpn.anchors(feats))
    gen = AnchorGenerator(sizes=((32,), (64,), (128,), (256,), (512,)), aspect_ratios=((0.5, 1.0, 2.0),) * 5)
    theirs = gen(ImageList(torch.zeros(2, 3, SIDE, SIDE), IMAGE_SIZES), feats)
    assert torch.equal(ours, theirs[0]) and torch.equal(ours, theirs[1])
    assert ours.shape[0] == sum(f.shape[-2] * f.shape[-1] * 3 for f in feats)


def test_anchor_strides_are_explicit_not_inferred():
    """T3: a 200 px input gives p64 of 3x3 (avg-pooled odd sizes); torchvision infers 200 // 3 = 66, we use 64."""
    model = make_model()
    sizes = [(50, 50), (25, 25), (12, 12), (6, 6), (3, 3)]
    feats = [torch.zeros(1, C, *s) for s in sizes]
    ours = model.rpn.anchors(feats)
    gen = AnchorGenerator(sizes=((32,), (64,), (128,), (256,), (512,)), aspect_ratios=((0.5, 1.0, 2.0),) * 5)
    explicit = gen.grid_anchors([list(s) for s in sizes], [[torch.tensor(s), torch.tensor(s)] for s in STRIDES])
    for a, b in zip(ours, explicit):
        assert torch.equal(a, b)
    inferred = gen(ImageList(torch.zeros(1, 3, 200, 200), [(200, 200)]), feats)[0]
    assert not torch.equal(torch.cat(ours), inferred)           # torchvision's inference is off on p32 / p64


# ---- 3.3 box coder ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("weights", [ds.RPN_BOX_WEIGHTS, ds.ROI_BOX_WEIGHTS])
def test_box_coder_round_trip_and_equal_to_torchvision(weights):
    g = torch.Generator().manual_seed(0)
    ref, boxes = random_boxes(500, generator=g), random_boxes(500, generator=g)
    ours, theirs = ds.BoxCoder(weights), TVBoxCoder(weights)
    deltas = ours.encode(boxes, ref)
    torch.testing.assert_close(deltas, theirs.encode_single(boxes, ref))
    torch.testing.assert_close(ours.decode(deltas, ref), boxes, rtol=0, atol=1e-4)          # decode . encode = id
    wild = torch.randn(500, 4, generator=g) * 10                                 # exercises the log(1000/16) clamp
    torch.testing.assert_close(ours.decode(wild, ref), theirs.decode_single(wild, ref))
    class_specific = torch.randn(500, K, 4, generator=g)                        # (R, K, 4) as the box head gives
    torch.testing.assert_close(ours.decode(class_specific, ref),
                               theirs.decode_single(class_specific.reshape(500, -1), ref).reshape(500, K, 4))


# ---- 3.4 matcher and sampler -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("low_quality", [True, False])
def test_matcher_equals_torchvision(low_quality):
    """Quantised IoUs make ties; every gt overlaps something, where our zero-IoU guard is inactive."""
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        iou = (torch.rand(5, 300, generator=g) * 10).floor() / 10 * (torch.rand(5, 300, generator=g) < 0.3)
        iou[:, 0] = 0.05                                                         # every gt overlaps something
        high, low = (0.7, 0.3) if low_quality else (0.5, 0.5)
        ours = ds.Matcher(high=high, low=low, allow_low_quality=low_quality)(iou)
        assert torch.equal(ours, TVMatcher(high, low, allow_low_quality_matches=low_quality)(iou.clone()))


def brute_force_match(iou: torch.Tensor, *, high: float, low: float, min_iou: float) -> list:
    """Python loops over the rule as written in Faster R-CNN Sec. 3.1.2 plus the zero-IoU / min_pos_iou guard."""
    G, N = iou.shape
    out = []
    for n in range(N):                   # comparisons on float32 tensor elements, as the detector makes them
        best, gt = iou[0, n], 0
        for i in range(1, G):
            if iou[i, n] > best:
                best, gt = iou[i, n], i
        code = gt if best >= high else (-2 if best >= low else -1)
        rescued = False
        for i in range(G):
            gt_best = max(iou[i, m] for m in range(N))
            rescued |= bool(iou[i, n] == gt_best and gt_best > 0 and gt_best >= min_iou)
        out.append(gt if rescued else code)
    return out


@pytest.mark.parametrize("min_iou", [0.0, 0.3])
def test_matcher_low_quality_guard_against_brute_force(min_iou):
    """T5: gt 1 overlaps nothing, gt 2 at most 0.2: neither may rescue anchors (torchvision's Matcher would turn
    every zero-IoU anchor positive for gt 1)."""
    g = torch.Generator().manual_seed(1)
    iou = (torch.rand(3, 40, generator=g) * 10).floor() / 10 * (torch.rand(3, 40, generator=g) < 0.4)
    iou[1] = 0
    iou[2] = iou[2].clamp(max=0.2)
    iou[:, 5] = 0
    iou[2, 5] = 0.2                                                              # anchor 5 touches gt 2 only
    ours = ds.Matcher(high=0.7, low=0.3, allow_low_quality=True, low_quality_min_iou=min_iou)(iou)
    assert ours.tolist() == brute_force_match(iou, high=0.7, low=0.3, min_iou=min_iou)
    assert ours[5].item() == (2 if min_iou <= 0.2 else ds.BELOW_LOW)             # mmdet's 0.3 drops gt 2's rescue
    tv = TVMatcher(0.7, 0.3, allow_low_quality_matches=True)(iou.clone())
    assert (tv >= 0).sum() > (ours >= 0).sum()                                   # the trap this guard closes


def test_sampler_equals_torchvision_under_the_same_seed():
    g = torch.Generator().manual_seed(0)
    for batch, fraction in [(64, 0.5), (32, 0.25), (512, 0.25)]:
        labels = [torch.randint(-1, 4, (n,), generator=g) for n in (300, 40, 5)]
        labels[1][labels[1] > 0] = 0                                             # an image with no positive
        torch.manual_seed(7)
        pos, neg = ds.sample_balanced(labels, batch_per_image=batch, positive_fraction=fraction)
        torch.manual_seed(7)
        tv_pos, tv_neg = BalancedPositiveNegativeSampler(batch, fraction)(labels)
        for lab, p, n, tp, tn in zip(labels, pos, neg, tv_pos, tv_neg):
            assert torch.equal(p, tp.bool()) and torch.equal(n, tn.bool())
            assert p.sum() == min(int((lab >= 1).sum()), int(batch * fraction))
            assert n.sum() == min(int((lab == 0).sum()), batch - int(p.sum()))
            assert not (p | n)[lab == -1].any()


# ---- 3.6 multi-scale RoIAlign ----------------------------------------------------------------------------------------

def test_multiscale_roi_align_equals_torchvision():
    side = 512                                                                   # boxes up to 512 px reach P5
    g = torch.Generator().manual_seed(3)
    feats = [torch.randn(2, C, side // s, side // s, generator=g) for s in STRIDES[:4]]
    boxes = [random_boxes(60, side=side, min_size=2.0, generator=g), random_boxes(50, side=side, generator=g)]
    boxes[0] = torch.cat([boxes[0], torch.tensor([[0.0, 0.0, 500.0, 480.0], [10.0, 20.0, 470.0, 500.0]])])
    # sqrt(area) a hair under 112 / 224 / 448: float32 log2 lands just below an integer, the eps decides the level
    boxes[1] = torch.cat([boxes[1], torch.tensor([[0.0, 0.0, 112.0, 111.99994], [0.0, 0.0, 224.0, 223.99995],
                                                  [0.0, 0.0, 448.0, 447.99976]])])
    pooler = MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)
    theirs = pooler({str(i): f for i, f in enumerate(feats)}, boxes, [(side, side), (480, 500)])
    ours = ds.multiscale_roi_align(feats, boxes, strides=STRIDES[:4], output_size=7, sampling_ratio=2, aligned=False)
    assert torch.equal(ours, theirs)
    levels = ds.roi_levels(torch.cat(boxes), strides=STRIDES[:4])
    assert len(set(levels.tolist())) == 4                                        # every level is exercised


def test_roi_levels_and_aligned_pooling_against_brute_force():
    """The paper preset pools with aligned=True, sampling 0 (mmcv), which torchvision's pooler cannot express."""
    feats = make_features()[:4]
    g = torch.Generator().manual_seed(4)
    boxes = random_boxes(30, min_size=2.0, generator=g)
    ours = ds.multiscale_roi_align(feats, [boxes[:12], boxes[12:]], strides=STRIDES[:4], output_size=7,
                                   sampling_ratio=0, aligned=True)
    for r, box in enumerate(boxes.tolist()):
        side = math.sqrt((box[2] - box[0]) * (box[3] - box[1]))
        level = min(max(math.floor(4 + math.log2(side / 224) + 1e-6), 2), 5) - 2    # FPN Eq. 1, P2..P5
        image = 0 if r < 12 else 1
        expect = roi_align(feats[level][image:image + 1], [torch.tensor([box])], 7, spatial_scale=1 / STRIDES[level],
                           sampling_ratio=0, aligned=True)
        torch.testing.assert_close(ours[r:r + 1], expect)


# ---- 3.7 / 3.8 losses, mask targets ----------------------------------------------------------------------------------

def test_box_losses_l1_and_normalisation_against_brute_force():
    """T8: the box loss is summed over positives and divided by ALL sampled RoIs; beta 0 is plain L1 (mmdet)."""
    g = torch.Generator().manual_seed(5)
    logits, deltas = torch.randn(10, K + 1, generator=g), torch.randn(10, K, 4, generator=g)
    labels = torch.tensor([0, 2, 0, 1, 3, 0, 0, 3, 0, 0])
    targets = torch.randn(4, 4, generator=g)
    loss_cls, loss_box = ds.box_losses(logits, deltas, labels, targets, beta=0.0)
    pos = [i for i in range(10) if labels[i] > 0]
    expect = sum(abs(deltas[i, labels[i] - 1] - targets[j]).sum() for j, i in enumerate(pos)) / 10
    torch.testing.assert_close(loss_box, expect)
    nll = -sum(torch.log_softmax(logits[i], 0)[labels[i]] for i in range(10)) / 10
    torch.testing.assert_close(loss_cls, nll)


@pytest.mark.parametrize("binarize", [False, True])
def test_mask_targets_equal_torchvision_projection(binarize):
    targets = make_targets()
    g = torch.Generator().manual_seed(6)
    boxes = random_boxes(25, generator=g)
    matched = torch.randint(0, 3, (25,), generator=g)
    ours = ds.mask_targets(targets[1]["masks"], boxes, matched, binarize=binarize, aligned=False)
    theirs = project_masks_on_boxes(targets[1]["masks"], boxes, matched, 28)
    torch.testing.assert_close(ours, (theirs >= 0.5).float() if binarize else theirs)


def test_mask_loss_reads_the_gt_class_map_only():
    """T10: changing any other class's logits leaves L_mask unchanged; it is BCE on the label's map."""
    g = torch.Generator().manual_seed(7)
    logits, targets = torch.randn(6, K, 28, 28, generator=g), torch.rand(6, 28, 28, generator=g)
    labels = torch.tensor([1, 3, 2, 2, 1, 3])
    loss = ds.mask_loss(logits, labels, targets)
    other = logits.clone()
    for i, lab in enumerate(labels.tolist()):
        other[i, [c for c in range(K) if c != lab - 1]] += 5
    torch.testing.assert_close(ds.mask_loss(other, labels, targets), loss)
    chosen = torch.stack([logits[i, lab - 1] for i, lab in enumerate(labels.tolist())])
    torch.testing.assert_close(loss, nn.functional.binary_cross_entropy(chosen.sigmoid(), targets))
    assert ds.mask_loss(logits[:0], labels[:0], targets[:0]).item() == 0


# ---- 3.9 mask pasting ------------------------------------------------------------------------------------------------

def test_paste_masks_equals_torchvision():
    g = torch.Generator().manual_seed(8)
    probs = torch.rand(30, 28, 28, generator=g)
    boxes = random_boxes(30, side=100, min_size=0.5, generator=g) - 4              # some cross the image border
    ours = ds.paste_masks(probs, boxes, image_size=(100, 120))
    theirs = paste_masks_in_image(probs[:, None], boxes, (100, 120))[:, 0]
    assert torch.equal(ours, theirs)


# ---- 3.5 / 3.10 the whole head against torchvision with the same weights ---------------------------------------------

def test_rpn_proposals_equal_torchvision():
    model, feats = make_model(), make_features()
    twin = torchvision_twin(model)
    for training in (False, True):        # test vs train top-n
        model.train(training), twin.train(training)
        ours, _ = model.rpn(feats, image_sizes=IMAGE_SIZES, targets=make_targets())
        theirs, _ = twin.rpn(ImageList(torch.zeros(2, 3, SIDE, SIDE), IMAGE_SIZES),
                             {str(i): f for i, f in enumerate(feats)}, make_targets())
        for a, b in zip(ours, theirs):
            assert a.shape == b.shape and a.shape[0] > 20
            assert torch.equal(a, b)


@pytest.mark.parametrize("peaked", [False, True])
def test_detections_equal_torchvision_in_eval(peaked):
    """Boxes, scores, labels and pasted masks of the whole head equal torchvision's (RPN + RoIHeads + paste).
    peaked: class scores sharpened so that most candidates fall under the 0.05 threshold (T9)."""
    model, feats = make_model(), make_features()
    if peaked:
        with torch.no_grad():
            model.box_head.cls_score.weight.mul_(100)
    twin = torchvision_twin(model)
    model.eval(), twin.eval()
    ours = model(feats, image_sizes=IMAGE_SIZES)
    with torch.no_grad():
        _, theirs, _ = run_twin(twin, feats)
    for o, t, size in zip(ours, theirs, IMAGE_SIZES):
        assert o["boxes"].shape[0] > 10
        torch.testing.assert_close(o["boxes"], t["boxes"])
        torch.testing.assert_close(o["scores"], t["scores"])
        assert torch.equal(o["labels"], t["labels"])
        torch.testing.assert_close(o["masks"], paste_masks_in_image(t["masks"], t["boxes"], size)[:, 0])
        assert o["masks"].shape[1:] == size


def test_eval_without_any_detection_returns_empty_results():
    model, feats = make_model(ds.MASKRCNN_PRESETS["tiny"]), make_features()
    with torch.no_grad():
        model.box_head.cls_score.bias[0] = 50.0                                  # background wins everywhere
    model.eval()
    for out, (h, w) in zip(model(feats, image_sizes=IMAGE_SIZES), IMAGE_SIZES):
        assert out["boxes"].shape == (0, 4) and out["scores"].shape == out["labels"].shape == (0,)
        assert out["masks"].shape == (0, h, w)


def test_training_losses_equal_torchvision_under_the_same_seed():
    """Same weights, same seed: the samplers draw the same anchors and RoIs, so all five losses agree."""
    model, feats, targets = make_model(), make_features(), make_targets()
    twin = torchvision_twin(model)
    model.train(), twin.train()
    torch.manual_seed(11)
    ours = model(feats, image_sizes=IMAGE_SIZES, targets=targets)
    torch.manual_seed(11)
    _, _, theirs = run_twin(twin, feats, targets)
    names = {"loss_objectness": "loss_objectness", "loss_rpn_box": "loss_rpn_box_reg",
             "loss_classifier": "loss_classifier", "loss_box": "loss_box_reg", "loss_mask": "loss_mask"}
    for ours_name, tv_name in names.items():
        torch.testing.assert_close(ours[ours_name], theirs[tv_name], rtol=1e-5, atol=1e-6)
        assert ours[ours_name] > 0
    torch.testing.assert_close(ours["loss"], sum(ours[n] for n in names))


# ---- training mechanics ----------------------------------------------------------------------------------------------

def test_gt_boxes_are_appended_to_proposals():
    """T6: with no proposals at all every gt still yields a positive RoI (and so a mask loss)."""
    model, targets = make_model(), make_targets()
    model.train()
    rois, labels, matched = model.sample_rois([torch.zeros(0, 4), torch.zeros(0, 4)], targets)
    for r, lab, m, t in zip(rois, labels, matched, targets):
        assert torch.equal(lab, t["labels"]) and torch.equal(r, t["boxes"]) and torch.equal(m, torch.arange(len(m)))


def test_every_parameter_gets_a_gradient_and_proposals_none():
    """(a) all heads train; T7: proposals are detached from the RPN deltas."""
    model, targets = make_model(ds.MASKRCNN_PRESETS["tiny"]), make_targets()
    feats = [f.requires_grad_() for f in make_features()]
    model.train()
    proposals, _ = model.rpn(feats, image_sizes=IMAGE_SIZES, targets=targets)
    assert not any(p.requires_grad for p in proposals)
    losses = model(feats, image_sizes=IMAGE_SIZES, targets=targets)
    losses["loss"].backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert all(torch.isfinite(v) for v in losses.values())


def test_image_without_objects_trains():
    model, feats, targets = make_model(ds.MASKRCNN_PRESETS["tiny"]), make_features(), make_targets()
    targets[1] = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
                  "masks": torch.zeros(0, SIDE, SIDE, dtype=torch.bool)}
    model.train()
    losses = model(feats, image_sizes=IMAGE_SIZES, targets=targets)
    assert all(torch.isfinite(v) for v in losses.values())


@pytest.mark.parametrize("case, message", [
    ("levels", "feature maps but"), ("order", "fine to coarse"), ("no_targets", "training needs targets"),
    ("label0", "1..3"), ("empty_box", "x2 > x1"), ("strides", "powers of two"), ("sizes", "image_sizes"),
])
def test_bad_inputs_raise_one_clear_message(case, message):
    model, feats, targets = make_model(ds.MASKRCNN_PRESETS["tiny"]), make_features(), make_targets()
    model.train()
    kwargs = dict(image_sizes=IMAGE_SIZES, targets=targets)
    if case == "levels":
        feats = feats[:4]
    elif case == "order":
        feats = feats[::-1]
    elif case == "no_targets":
        kwargs["targets"] = None
    elif case == "label0":
        targets[0]["labels"] = targets[0]["labels"] - 1
    elif case == "empty_box":
        targets[0]["boxes"][0, 2] = targets[0]["boxes"][0, 0]
    elif case == "sizes":
        kwargs["image_sizes"] = [(SIDE + 64, SIDE)] * 2
    with pytest.raises(ValueError, match=message):
        if case == "strides":
            ds.MaskRCNNLite(C, num_classes=K, strides=(4, 8, 12, 32), cfg=ds.MASKRCNN_PRESETS["tiny"])
        model(feats, **kwargs)


# ---- one-batch overfit -----------------------------------------------------------------------------------------------

class TinyPyramid(nn.Module):
    """A learnable stand-in for the iTPN pyramid: stride-4 stem, then four stride-2 convs (p4..p64)."""

    def __init__(self, channels: int):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, channels, 3, 2, 1), nn.ReLU(), nn.Conv2d(channels, channels, 3, 2, 1))
        self.downs = nn.ModuleList(nn.Conv2d(channels, channels, 3, 2, 1) for _ in range(4))

    def forward(self, x):
        feats = [self.stem(x)]
        for down in self.downs:
            feats.append(down(torch.relu(feats[-1])))
        return feats


def shapes_batch() -> tuple:
    """Two images of separate coloured ellipses (colour = class) on a dark background, with boxes and masks."""
    layout = [[(1, (8, 10, 50, 60)), (2, (64, 20, 120, 70)), (3, (30, 80, 90, 120))],
              [(3, (10, 60, 60, 100)), (1, (70, 8, 112, 50)), (2, (20, 10, 55, 45))]]
    images = torch.full((2, 3, SIDE, SIDE), -1.0)
    targets = []
    for img, objects in zip(images, layout):
        boxes = torch.tensor([box for _, box in objects], dtype=torch.float32)
        masks = ellipse_masks(boxes)
        labels = torch.tensor([lab for lab, _ in objects])
        for m, lab in zip(masks, labels):
            img[lab - 1, m] = 1.0
        targets.append({"boxes": boxes, "labels": labels, "masks": masks})
    return images, targets


def test_one_batch_overfit_on_shapes():
    torch.manual_seed(0)
    images, targets = shapes_batch()
    cfg = ds.MASKRCNN_PRESETS["tiny"]
    backbone, model = TinyPyramid(16), ds.MaskRCNNLite(16, num_classes=K, strides=STRIDES, cfg=cfg)
    params = [*backbone.parameters(), *model.parameters()]
    opt = torch.optim.AdamW(params, lr=3e-3, weight_decay=0)
    model.train()
    losses = []
    for _ in range(60):
        loss = model(backbone(images), image_sizes=IMAGE_SIZES, targets=targets)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.35 * sum(losses[:3]) / 3, losses
    model.eval()
    with torch.no_grad():
        dets = model(backbone(images), image_sizes=IMAGE_SIZES)
    for d, t in zip(dets, targets):              # one object per class per image: its best-scored detection
        for box, lab, gt_mask in zip(t["boxes"], t["labels"], t["masks"]):
            same = torch.where(d["labels"] == lab)[0]
            assert same.numel(), "no detection of the object's class"
            top = same[d["scores"][same].argmax()]
            assert box_iou(box[None], d["boxes"][top][None]).item() > 0.5
            h, w = d["masks"].shape[1:]
            pred, gt = d["masks"][top] >= 0.5, gt_mask[:h, :w]
            assert (pred & gt).sum() / (pred | gt).sum() > 0.5                  # mask IoU
