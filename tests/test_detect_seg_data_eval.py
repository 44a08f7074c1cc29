"""Dense data and evaluation of detect_seg.py: COCO masks, readers, augmentation, padding, COCO AP, mIoU.

Oracles: hand-built cases whose AP / mIoU follow from the definitions (derivations in the comments), brute force
(mask IoU pair by pair, point-in-polygon at pixel centres, a confusion matrix for mIoU), torchvision's box_iou,
and pycocotools as an optional oracle (skipped when it is not installed) for RLE strings, polygon rasterisation
and all 12 COCO numbers on random detections with crowds, ties and many images.
"""
import contextlib
import copy
import io
import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.ops import box_iou, masks_to_boxes

import detect_seg as ds


# ---- helpers ------------------------------------------------------------------------------------------------------

def rng_masks(rng, n, h, w, p=None):
    """n random (h, w) masks of varied density (some empty or full)."""
    return np.stack([rng.random((h, w)) < (rng.random() if p is None else p) for _ in range(n)])


def box_gt(boxes, areas=None, crowd=None, cats=None, size=(200, 200)):
    """A one-image COCO gt dict from xywh boxes (area = w*h unless given)."""
    anns = []
    for i, b in enumerate(boxes):
        anns.append({"id": i + 1, "image_id": 1, "category_id": 1 if cats is None else cats[i], "bbox": list(b),
                     "area": b[2] * b[3] if areas is None else areas[i],
                     "iscrowd": 0 if crowd is None else crowd[i]})
    return {"images": [{"id": 1, "height": size[0], "width": size[1]}], "annotations": anns,
            "categories": [{"id": c} for c in (1, 2, 3)]}


def det(box, score, cat=1, image_id=1):
    return {"image_id": image_id, "category_id": cat, "bbox": list(box), "score": score}


def stats_dict(stats):
    return dict(zip(ds.COCO_STAT_NAMES, np.asarray(stats, dtype=float)))


def polygon_centre_inside(polygon, h, w):
    """Brute force: is each pixel centre inside the polygon (even-odd ray casting)? (H, W) bool, and distances."""
    pts = np.asarray(polygon, dtype=np.float64).reshape(-1, 2)
    cy, cx = np.mgrid[0:h, 0:w] + 0.5                                     # pixel centres
    inside = np.zeros((h, w), dtype=bool)
    dist = np.full((h, w), np.inf)
    for (x0, y0), (x1, y1) in zip(pts, np.roll(pts, -1, axis=0)):
        crosses = (y0 > cy) != (y1 > cy)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_at = x0 + (cy - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (cx < x_at)
        seg = np.array([x1 - x0, y1 - y0])
        t = np.clip(((cx - x0) * seg[0] + (cy - y0) * seg[1]) / max(seg @ seg, 1e-12), 0, 1)
        dist = np.minimum(dist, np.hypot(cx - x0 - t * seg[0], cy - y0 - t * seg[1]))
    return inside, dist


# ---- 1. COCO masks ------------------------------------------------------------------------------------------------

def test_rle_hand_encodings():
    # A 5x1 column of ones: runs [0, 5] -> characters 48+0, 48+5.
    assert ds.rle_encode(np.ones((5, 1), dtype=bool)) == {"size": [5, 1], "counts": "05"}
    # Runs [1, 2, 3, 1]: the 4th is stored as 1 - 2 = -1 -> one group 31 with the sign bit -> chr(48 + 31) = 'O'.
    assert ds.rle_to_string([1, 2, 3, 1]) == "123O"
    # Column-major: [[0, 1], [1, 1]] read down the columns is 0, 1, 1, 1 -> runs [1, 3].
    assert ds.rle_encode(np.array([[0, 1], [1, 1]], dtype=bool))["counts"] == "13"
    assert np.array_equal(ds.rle_decode({"size": [2, 2], "counts": [1, 3]}), [[0, 1], [1, 1]])


def test_rle_round_trips():
    rng = np.random.default_rng(0)
    masks = [rng.random((h, w)) < p for h, w, p in [(7, 5, 0.5), (1, 1, 1.0), (1, 1, 0.0), (30, 1, 0.3), (1, 30, 0.7),
                                                     (40, 60, 0.02), (40, 60, 0.98)]]
    masks += [np.zeros((9, 11), dtype=bool), np.ones((9, 11), dtype=bool)]
    for m in masks:
        rle = ds.rle_encode(m)
        assert np.array_equal(ds.rle_decode(rle), m)
        counts = ds.rle_from_string(rle["counts"])
        assert np.array_equal(ds.rle_decode({"size": rle["size"], "counts": counts}), m)   # uncompressed form
        assert ds.rle_area(rle) == m.sum()
    # Big runs and negative changes need several 5-bit groups and the sign extension.
    counts = [0, 3, 1_000_000, 2, 5, 123_456_789, 1, 0, 70_000, 31, 32, 16, 15, 17]
    assert ds.rle_from_string(ds.rle_to_string(counts)) == counts
    assert ds.rle_from_string(ds.rle_to_string(counts).encode()) == counts                # bytes, as pycocotools
    with pytest.raises(ValueError, match="size"):
        ds.rle_decode({"size": [3, 3], "counts": [4, 4]})


def test_polygon_is_pixel_centre_rule():
    """Independent of pycocotools: a pixel is in the mask iff its centre is in the polygon, except within the
    1/5-pixel snapping of the boundary."""
    rng = np.random.default_rng(1)
    for _ in range(40):
        h, w = rng.integers(5, 40, 2)
        poly = rng.uniform(-3, max(h, w) + 3, 2 * rng.integers(3, 8))
        mask = ds.polygon_to_mask(poly, int(h), int(w))
        inside, dist = polygon_centre_inside(poly, int(h), int(w))
        assert (dist[mask != inside] < 0.3).all()
    # An axis-aligned rectangle on integer coordinates covers exactly the pixels between its corners.
    rect = ds.polygon_to_mask([1, 2, 5, 2, 5, 6, 1, 6], 8, 8)
    expected = np.zeros((8, 8), dtype=bool)
    expected[2:6, 1:5] = True
    assert np.array_equal(rect, expected)
    # Several polygons are one object: their union (two overlapping 4x4 squares: 16 + 16 - 4 pixels).
    two = ds.segmentation_to_mask([[0, 0, 4, 0, 4, 4, 0, 4], [2, 2, 6, 2, 6, 6, 2, 6]], 8, 8)
    assert two.sum() == 28 and two[0, 0] and two[3, 3] and two[5, 5] and not two[0, 5]


def test_mask_iou_brute_force():
    rng = np.random.default_rng(2)
    dt, gt = rng_masks(rng, 6, 13, 17), rng_masks(rng, 5, 13, 17)
    dt[0] = False                                                         # an empty detection
    crowd = np.array([False, True, False, True, False])
    iou = ds.mask_iou(dt, gt, crowd)
    for d in range(6):
        for g in range(5):
            inter = (dt[d] & gt[g]).sum()
            union = dt[d].sum() if crowd[g] else (dt[d] | gt[g]).sum()
            assert iou[d, g] == (inter / union if inter else 0.0)


def test_box_iou_xywh_vs_torchvision_and_crowd_rule():
    rng = np.random.default_rng(3)
    dt = np.concatenate([rng.uniform(0, 50, (8, 2)), rng.uniform(1, 30, (8, 2))], axis=1)   # xywh
    gt = np.concatenate([rng.uniform(0, 50, (6, 2)), rng.uniform(1, 30, (6, 2))], axis=1)
    to_xyxy = lambda b: torch.tensor(np.concatenate([b[:, :2], b[:, :2] + b[:, 2:]], 1))   # noqa: E731
    plain = ds.box_iou_xywh(dt, gt, np.zeros(6, dtype=bool))
    assert np.allclose(plain, box_iou(to_xyxy(dt), to_xyxy(gt)).numpy(), atol=1e-12)
    crowd = ds.box_iou_xywh(dt, gt, np.ones(6, dtype=bool))
    union = box_iou(to_xyxy(dt), to_xyxy(gt)).numpy()
    inter = union * 0                                                     # intersection / detection area, by hand
    for d in range(8):
        for g in range(6):
            w = min(dt[d, 0] + dt[d, 2], gt[g, 0] + gt[g, 2]) - max(dt[d, 0], gt[g, 0])
            h = min(dt[d, 1] + dt[d, 3], gt[g, 1] + gt[g, 3]) - max(dt[d, 1], gt[g, 1])
            inter[d, g] = max(w, 0) * max(h, 0) / (dt[d, 2] * dt[d, 3])
    assert np.allclose(crowd, inter, atol=1e-12)


PYCOCOTOOLS_NOISE = pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools")   # its numpy-2 notice


@PYCOCOTOOLS_NOISE
def test_rle_and_polygons_match_pycocotools():
    mask_api = pytest.importorskip("pycocotools.mask")
    rng = np.random.default_rng(4)
    for i in range(200):
        h, w = (int(v) for v in rng.integers(1, 40, 2))
        m = rng.random((h, w)) < rng.random()
        ref = mask_api.encode(np.asfortranarray(m.astype(np.uint8)))
        assert ds.rle_encode(m)["counts"] == ref["counts"].decode()
        assert np.array_equal(ds.rle_decode(ref), m)
        coords = [rng.uniform(-5, max(h, w) + 5, 2 * 6), rng.integers(-2, max(h, w) + 2, 2 * 5).astype(float),
                  np.round(rng.uniform(0, max(h, w), 2 * 4) * 2) / 2][i % 3]
        ref_poly = mask_api.decode(mask_api.frPyObjects([coords.tolist()], h, w))[..., 0].astype(bool)
        assert np.array_equal(ds.polygon_to_mask(coords, h, w), ref_poly)


# ---- 2. Dense datasets --------------------------------------------------------------------------------------------

def write_image(path, h, w, seed=0):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)


def write_coco(root, data, images=None, split="val2017"):
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    with open(os.path.join(root, "annotations", f"instances_{split}.json"), "w") as f:
        json.dump(data, f)
    for im in data["images"] if images is None else images:
        write_image(os.path.join(root, split, im["file_name"]), im["height"], im["width"], seed=im["id"])


def tiny_coco(root):
    """3 images: #1 a polygon and a compressed-RLE mask, #2 a crowd (uncompressed RLE) and a polygon, #3 nothing.
    Category ids 7 and 3 (not contiguous, not sorted) -> labels 3 -> 1, 7 -> 2."""
    rle_mask = np.zeros((24, 32), dtype=bool)
    rle_mask[5:15, 20:30] = True
    crowd_mask = np.zeros((20, 30), dtype=bool)
    crowd_mask[2:18, 1:12] = True
    crowd_counts = ds.rle_from_string(ds.rle_encode(crowd_mask)["counts"])
    data = {
        "images": [{"id": 11, "file_name": "a.jpg", "height": 24, "width": 32},
                   {"id": 12, "file_name": "b.jpg", "height": 20, "width": 30},
                   {"id": 13, "file_name": "c.jpg", "height": 16, "width": 16}],
        "categories": [{"id": 7, "name": "seven"}, {"id": 3, "name": "three"}],
        "annotations": [
            {"id": 1, "image_id": 11, "category_id": 7, "bbox": [2.0, 3.0, 10.0, 8.0], "area": 70.0, "iscrowd": 0,
             "segmentation": [[2, 3, 12, 3, 12, 11, 2, 11]]},
            {"id": 2, "image_id": 11, "category_id": 3, "bbox": [20, 5, 10, 10], "area": 100.0, "iscrowd": 0,
             "segmentation": ds.rle_encode(rle_mask)},
            {"id": 3, "image_id": 12, "category_id": 3, "bbox": [1, 2, 11, 16], "area": 176.0, "iscrowd": 1,
             "segmentation": {"size": [20, 30], "counts": crowd_counts}},
            {"id": 4, "image_id": 12, "category_id": 7, "bbox": [15, 4, 10, 10], "area": 50.0, "iscrowd": 0,
             "segmentation": [[15, 4, 25, 4, 15, 14]]},
        ]}
    write_coco(root, data)
    return data, rle_mask, crowd_mask


def test_coco_reader_targets(tmp_path):
    data, rle_mask, crowd_mask = tiny_coco(str(tmp_path))
    with pytest.warns(UserWarning, match="1 images without annotations"):
        dataset = ds.CocoDataset(str(tmp_path), split="val2017")
    assert len(dataset) == 3 and dataset.issues["images without annotations, kept as negatives"] == 1
    assert [c["id"] for c in dataset.categories] == [3, 7] and dataset.label_of == {3: 1, 7: 2}
    img, t = dataset[0]
    assert img.size == (32, 24) and t["image_id"] == 11
    assert t["labels"].tolist() == [2, 1]                                 # category 7 -> 2, 3 -> 1
    assert np.array_equal(t["boxes"], [[2, 3, 12, 11], [20, 5, 30, 15]])  # xywh -> xyxy
    assert np.array_equal(t["masks"][0], ds.polygon_to_mask([2, 3, 12, 3, 12, 11, 2, 11], 24, 32))
    assert np.array_equal(t["masks"][1], rle_mask) and t["area"].tolist() == [70, 100]
    _, t = dataset[1]
    assert t["iscrowd"].tolist() == [True, False] and np.array_equal(t["masks"][0], crowd_mask)
    _, t = dataset[2]                                                     # the negative image
    assert t["labels"].shape == (0,) and t["boxes"].shape == (0, 4) and t["masks"].shape == (0, 16, 16)


@PYCOCOTOOLS_NOISE
def test_coco_reader_masks_match_pycocotools(tmp_path):
    coco_api = pytest.importorskip("pycocotools.coco")
    tiny_coco(str(tmp_path))
    with pytest.warns(UserWarning):
        dataset = ds.CocoDataset(str(tmp_path))
    with contextlib.redirect_stdout(io.StringIO()):
        ref = coco_api.COCO(os.path.join(str(tmp_path), "annotations", "instances_val2017.json"))
    for i, info in enumerate(dataset.images):
        anns = ref.loadAnns(ref.getAnnIds(imgIds=info["id"]))
        masks = dataset[i][1]["masks"]
        assert len(anns) == len(masks)
        for ann, mask in zip(anns, masks):
            assert np.array_equal(ref.annToMask(ann).astype(bool), mask)


def test_coco_reader_bad_annotations(tmp_path):
    data, _, _ = tiny_coco(str(tmp_path))
    bad = copy.deepcopy(data)
    bad["images"].append({"id": 14, "file_name": "missing.jpg", "height": 8, "width": 8})
    bad["annotations"] += [
        {"id": 5, "image_id": 11, "category_id": 3, "bbox": [1, 1, 0, 5], "area": 0, "iscrowd": 0,
         "segmentation": [[1, 1, 1, 6, 1, 1]]},                         # zero-area box
        {"id": 6, "image_id": 11, "category_id": 99, "bbox": [1, 1, 4, 4], "area": 16, "iscrowd": 0,
         "segmentation": [[1, 1, 5, 1, 5, 5]]},                          # category not in the json
        {"id": 7, "image_id": 11, "category_id": 3, "bbox": [1, 1, 4, 4], "area": 16, "iscrowd": 0,
         "segmentation": [[1, 1, 5, 1]]},                                # 2-point polygon only: dropped
        {"id": 8, "image_id": 11, "category_id": 3, "bbox": [1, 1, 4, 4], "area": 16, "iscrowd": 0,
         "segmentation": [[1, 1, 5, 1], [1, 1, 5, 1, 5, 5]]},            # one short polygon: that polygon dropped
        {"id": 9, "image_id": 77, "category_id": 3, "bbox": [1, 1, 4, 4], "area": 16, "iscrowd": 0,
         "segmentation": [[1, 1, 5, 1, 5, 5]]},                          # image id not in the json
        {"id": 10, "image_id": 11, "category_id": 3, "bbox": [1, 1, 4, 4], "area": 16, "iscrowd": 0,
         "segmentation": ds.rle_encode(np.ones((5, 5), dtype=bool))},    # RLE of another size
    ]
    write_coco(str(tmp_path), bad, images=data["images"])                 # missing.jpg is never written
    with pytest.warns(UserWarning) as record:
        dataset = ds.CocoDataset(str(tmp_path))
    messages = " | ".join(str(w.message) for w in record)
    for issue in ("1 annotations with a zero-area box", "1 annotations with a category id not in",
                  "2 annotations with a polygon of fewer than 3 points", "1 images listed in the json whose file is",
                  "1 annotations whose RLE size differs", "1 images without annotations",
                  "1 annotations of an image not in the json"):
        assert issue in messages
    assert len(dataset) == 3
    _, t = dataset[0]
    assert t["labels"].tolist() == [2, 1, 1]                              # id 8 kept with its valid polygon
    assert np.array_equal(t["masks"][2], ds.polygon_to_mask([1, 1, 5, 1, 5, 5], 24, 32))


def test_coco_reader_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="instances_val2017.json"):
        ds.CocoDataset(str(tmp_path))
    data, _, _ = tiny_coco(str(tmp_path))
    with open(os.path.join(str(tmp_path), "val2017", "b.jpg"), "wb") as f:
        f.write(b"not a jpeg")                                            # unreadable image
    with pytest.warns(UserWarning):
        dataset = ds.CocoDataset(str(tmp_path))
    with pytest.raises(ValueError, match="b.jpg.*remove image id 12"):
        dataset[1]
    data["images"][0]["height"] = 25                                      # json size differs from the file
    write_coco(str(tmp_path), data, images=[])
    with pytest.warns(UserWarning):
        dataset = ds.CocoDataset(str(tmp_path))
    with pytest.raises(ValueError, match="a.jpg is 24x32 but .* says 25x32"):
        dataset[0]
    with open(os.path.join(str(tmp_path), "annotations", "instances_val2017.json"), "w") as f:
        f.write('{"images": []}')
    with pytest.raises(ValueError, match="not a COCO instances file"):
        ds.CocoDataset(str(tmp_path))


def tiny_ade(root, split="training"):
    """4 good pairs (labels 0..150 incl. 0 = other) plus one of each bad pair."""
    label_dir = os.path.join(root, "annotations", split)
    os.makedirs(label_dir, exist_ok=True)
    rng = np.random.default_rng(0)
    labels = {}
    for i in range(4):
        h, w = 12 + i, 20 - i
        write_image(os.path.join(root, "images", split, f"ADE_{i}.jpg"), h, w, seed=i)
        labels[i] = rng.integers(0, 151, (h, w)).astype(np.uint8)
        labels[i][0, 0], labels[i][0, 1], labels[i][0, 2] = 0, 1, 150
        Image.fromarray(labels[i]).save(os.path.join(label_dir, f"ADE_{i}.png"))
    write_image(os.path.join(root, "images", split, "ADE_nolabel.jpg"), 10, 10)
    write_image(os.path.join(root, "images", split, "ADE_size.jpg"), 10, 10)
    Image.fromarray(np.zeros((11, 10), dtype=np.uint8)).save(os.path.join(label_dir, "ADE_size.png"))
    write_image(os.path.join(root, "images", split, "ADE_rgb.jpg"), 10, 10)
    Image.fromarray(np.zeros((10, 10, 3), dtype=np.uint8)).save(os.path.join(label_dir, "ADE_rgb.png"))
    with open(os.path.join(root, "images", split, "ADE_broken.jpg"), "wb") as f:
        f.write(b"garbage")
    Image.fromarray(np.zeros((10, 10), dtype=np.uint8)).save(os.path.join(label_dir, "ADE_broken.png"))
    return labels


def test_ade20k_reader_and_bad_pairs(tmp_path):
    labels = tiny_ade(str(tmp_path))
    with pytest.warns(UserWarning) as record:
        dataset = ds.ADE20KDataset(str(tmp_path), split="training")
    messages = " | ".join(str(w.message) for w in record)
    for issue in ("1 images without a label PNG", "1 label PNGs whose size differs", "1 label PNGs that are not "
                  "single-channel", "1 unreadable image or label files"):
        assert issue in messages
    assert len(dataset) == 4
    for i in range(4):
        img, t = dataset[i]
        raw = labels[i].astype(np.int64)
        assert img.size == (raw.shape[1], raw.shape[0]) and t["semantic"].dtype == np.uint8
        assert np.array_equal(t["semantic"], np.where(raw == 0, 255, raw - 1))   # 0 -> 255, k -> k - 1
        assert t["semantic"][0, :3].tolist() == [255, 0, 149]
    with pytest.warns(UserWarning):
        raw_dataset = ds.ADE20KDataset(str(tmp_path), reduce_zero_label=False)
    assert np.array_equal(raw_dataset[0][1]["semantic"], labels[0])
    with pytest.raises(FileNotFoundError, match="images/validation"):
        ds.ADE20KDataset(str(tmp_path), split="validation")
    path = os.path.join(str(tmp_path), "images", "training", "ADE_4.jpg")   # truncated: the header reads, the
    write_image(path, 64, 64)                                                # pixels do not
    Image.fromarray(np.zeros((64, 64), dtype=np.uint8)).save(path.replace("images", "annotations")[:-3] + "png")
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[:len(data) // 2])
    with pytest.warns(UserWarning):
        dataset = ds.ADE20KDataset(str(tmp_path))
    assert len(dataset) == 5
    with pytest.raises(ValueError, match="ADE_4.jpg.*truncated"):
        dataset[4]


# ---- 3. Augmentations ---------------------------------------------------------------------------------------------

PALETTE = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0]], dtype=np.uint8)   # class -> colour


def coloured_scene(h=60, w=80, seed=0):
    """An image whose colour tells the class of every pixel, and its label map (blocks of 4 classes)."""
    rng = np.random.default_rng(seed)
    label = np.zeros((h, w), dtype=np.uint8)
    for k in range(1, 4):
        y, x = rng.integers(0, h - 20), rng.integers(0, w - 20)
        label[y:y + 20, x:x + 25] = k
    return Image.fromarray(PALETTE[label]), label


def colour_to_class(x):
    """(3, H, W) normalised -> (H, W) nearest palette class."""
    rgb = (x * torch.tensor(ds.IMAGENET_STD)[:, None, None] + torch.tensor(ds.IMAGENET_MEAN)[:, None, None]) * 255
    dist = ((rgb[None] - torch.tensor(PALETTE, dtype=torch.float32)[:, :, None, None]) ** 2).sum(1)   # (4, H, W)
    return dist.argmin(0)


def test_seg_train_transform_keeps_labels_on_their_pixels():
    image, label = coloured_scene()
    tf = ds.SegTrainTransform(crop_size=48, scale=(160, 60), photometric=False)
    for seed in range(12):
        torch.manual_seed(seed)
        x, t = tf(image, {"semantic": label})
        sem = t["semantic"]
        assert x.dtype == torch.float32 and sem.dtype == torch.int64 and x.shape[-2:] == sem.shape
        assert t["orig_size"] == (60, 80)
        assert set(sem.unique().tolist()) <= {0, 1, 2, 3}                 # nearest: no new values
        wrong = colour_to_class(x) != sem                                 # bilinear image vs nearest label
        padded = torch.nn.functional.pad(sem[None, None].float(), (1, 1, 1, 1), mode="replicate")
        band = (torch.nn.functional.max_pool2d(padded, 3, 1) != -torch.nn.functional.max_pool2d(-padded, 3, 1))
        assert not (wrong & ~band[0, 0]).any()                            # disagreement only on class boundaries
        # rescale: short side 60 * r with r in 0.5..2 -> crop = min(48, rescaled size)
        assert min(x.shape[-2:]) >= 30 * 0.99 and max(x.shape[-2:]) <= 48
    torch.manual_seed(0)
    x1, _ = tf(image, {"semantic": label})
    torch.manual_seed(0)
    x2, _ = tf(image, {"semantic": label})
    assert torch.equal(x1, x2)                                            # seeded by torch's RNG only


def test_seg_train_transform_flips_label_with_image():
    """With a left/right-asymmetric scene, both flipped and unflipped outputs occur and stay aligned."""
    image, label = coloured_scene(h=40, w=40, seed=3)
    tf = ds.SegTrainTransform(crop_size=64, scale=(40, 40), ratio_range=(1.0, 1.0), photometric=False)
    outcomes = set()
    for seed in range(10):
        torch.manual_seed(seed)
        x, t = tf(image, {"semantic": label})
        assert torch.equal(colour_to_class(x), t["semantic"])             # no resize, no crop: exact
        outcomes.add(torch.equal(t["semantic"], torch.as_tensor(label).long().flip(-1)))
    assert outcomes == {True, False}


def test_label_resize_takes_the_pixel_under_each_centre():
    """Shrinking 4x4 -> 2x2: output pixel i covers source pixels 2i, 2i+1 and its centre lies on source pixel 2i+1
    (centre (i + 1/2) * 2 = 2i + 1); plain nearest would take 2i, half an output pixel off the image."""
    label = np.arange(16, dtype=np.uint8).reshape(4, 4)
    masks = np.stack([label == 5, label == 4])
    image = Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8))
    seg = ds.SegTrainTransform(crop_size=8, scale=(2, 2), ratio_range=(1.0, 1.0), photometric=False)
    detect = ds.DetTrainTransform(scales=((2, 2),), flip_prob=0.0)
    for seed in range(4):
        torch.manual_seed(seed)
        sem = seg(image, {"semantic": label})[1]["semantic"]
        assert sem.tolist() in ([[5, 7], [13, 15]], [[7, 5], [15, 13]])    # rows/cols 1 and 3, maybe flipped
    out = detect(image, {"labels": np.array([1, 2]), "boxes": np.array([[1, 1, 2, 2], [0, 1, 1, 2]]), "masks": masks})
    assert out[1]["masks"].tolist() == [[[True, False], [False, False]], [[False, False], [False, False]]]


def test_seg_crop_cat_max_ratio_rule():
    """Columns 0..79 class 0, 80..99 class 1; 40-wide crops. A crop at offset o holds o - 40 columns of class 1 and
    passes the 0.75 rule only for o in 51..60 (10 of 61 offsets). With 10 redraws most crops pass; without, 1 in 6."""
    label = torch.zeros(20, 100, dtype=torch.uint8)
    label[:, 80:] = 1
    tf = ds.SegTrainTransform(crop_size=40, ratio_range=(1.0, 1.0), cat_max_ratio=0.75)
    passing = 0
    for seed in range(60):
        torch.manual_seed(seed)
        top, left, h, w = tf.crop_box(label)
        assert (top, h, w) == (0, 20, 40)
        passing += 51 <= left <= 60
    assert passing >= 40                                                  # expected 60 * (1 - (51/61)^10) = 50


def test_photometric_distortion():
    x = torch.rand(3, 16, 16)
    outs = []
    for seed in range(8):
        torch.manual_seed(seed)
        y = ds.photometric_distortion(x.clone())
        assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
        outs.append(y)
    assert sum(not torch.equal(y, x) for y in outs) >= 6                  # each of 4 steps fires with p = 1/2
    torch.manual_seed(3)
    assert torch.equal(ds.photometric_distortion(x.clone()), outs[3])


def test_photometric_distortion_steps_and_ranges(monkeypatch):
    """Every step forced on, each draw at the top of its range: mmseg's ranges, in mmseg's order."""
    draws = []
    monkeypatch.setattr(ds, "coin", lambda: True)                         # every step fires, contrast first
    monkeypatch.setattr(ds, "uniform", lambda low, high: draws.append((low, high)) or high)
    black = ds.photometric_distortion(torch.zeros(3, 4, 4))
    assert draws == [(-32 / 255, 32 / 255), (0.5, 1.5), (0.5, 1.5), (-18 / 180, 18 / 180)]
    # Black: brightness +32/255, then contrast x1.5; saturation and hue leave a grey image alone -> 48/255.
    assert torch.allclose(black, torch.full((3, 4, 4), 48 / 255), atol=1e-4)
    red = ds.photometric_distortion(torch.tensor([1.0, 0, 0])[:, None, None].expand(3, 4, 4))
    # Red: brightness and contrast clip R at 1 and lift G = B to 48/255. Saturation x1.5 moves away from the grey
    # level (torchvision weights .299, .587, .114): G = B = g = 1.5 * 48/255 - 0.5 * (.299 + .701 * 48/255), R
    # clips at 1. Hue +0.1 of the circle: HSV (0, 1 - g, 1) -> (0.1, 1 - g, 1), i.e. R 1, G 1 - 0.4 (1 - g), B g.
    g = 1.5 * 48 / 255 - 0.5 * (0.299 + 0.701 * 48 / 255)
    assert torch.allclose(red[:, 0, 0], torch.tensor([1.0, 1 - 0.4 * (1 - g), g]), atol=1e-4)


def test_rescale_size_rule():
    assert ds.rescale_size(480, 640, (1333, 800)) == (800, 1067)          # short side 800, long 1066.7 -> 1067
    assert ds.rescale_size(400, 1600, (1333, 800)) == (333, 1333)         # long side capped: factor 1333 / 1600
    assert ds.rescale_size(512, 683, (2048, 512)) == (512, 683)           # ADE20K test scale on a 512-short image


def test_det_train_transform_moves_boxes_and_masks_together():
    h, w = 30, 50
    masks = np.zeros((2, h, w), dtype=bool)
    masks[0, 2:12, 3:20] = True
    masks[1, 15:28, 30:46] = True
    boxes = masks_to_boxes(torch.as_tensor(masks)).numpy() + [0, 0, 1, 1]   # tight xyxy (x2 = last pixel + 1)
    target = {"labels": np.array([1, 2]), "boxes": boxes, "masks": masks, "iscrowd": np.array([False, True]),
              "image_id": 5}
    image = Image.fromarray(np.zeros((h, w, 3), dtype=np.uint8))
    tf = ds.DetTrainTransform(scales=((100, 60), (200, 90)))
    seen_sizes, seen_flips = set(), set()
    for seed in range(16):
        torch.manual_seed(seed)
        x, t = tf(image, target)
        nh, nw = x.shape[-2:]
        seen_sizes.add((nh, nw))
        assert (nh, nw) in {ds.rescale_size(h, w, (100, 60)), ds.rescale_size(h, w, (200, 90))}
        scaled = boxes * np.array([nw / w, nh / h, nw / w, nh / h])
        flipped = np.stack([nw - scaled[:, 2], scaled[:, 1], nw - scaled[:, 0], scaled[:, 3]], axis=1)
        is_flip = np.allclose(t["boxes"].numpy(), flipped, atol=1e-4)
        assert is_flip or np.allclose(t["boxes"].numpy(), scaled, atol=1e-4)
        seen_flips.add(is_flip)
        assert t["masks"].shape == (2, nh, nw) and t["masks"].dtype == torch.bool
        tight = masks_to_boxes(t["masks"]).numpy() + [0, 0, 1, 1]
        assert np.abs(tight - t["boxes"].numpy()).max() <= 1.0           # the masks moved with the boxes
        assert t["labels"].tolist() == [1, 2] and t["iscrowd"].tolist() == [False, True] and int(t["image_id"]) == 5
    assert len(seen_sizes) == 2 and seen_flips == {True, False}
    torch.manual_seed(0)
    x, t = ds.DetTrainTransform()(image, {"labels": np.zeros(0), "boxes": np.zeros((0, 4)),
                                          "masks": np.zeros((0, h, w), dtype=bool)})
    assert t["boxes"].shape == (0, 4) and t["masks"].shape == (0,) + tuple(x.shape[-2:])   # negatives pass


def test_eval_transform_keeps_target_at_original_resolution():
    image, label = coloured_scene(h=30, w=40)
    x, t = ds.EvalTransform(scale=(120, 60))(image, {"semantic": label})
    assert x.shape == (3, 60, 80) and t["orig_size"] == (30, 40)
    assert torch.equal(t["semantic"], torch.as_tensor(label))
    expected = (torch.as_tensor(np.array(image)).permute(2, 0, 1).float() / 255 - torch.tensor(
        ds.IMAGENET_MEAN)[:, None, None]) / torch.tensor(ds.IMAGENET_STD)[:, None, None]
    x, _ = ds.EvalTransform(scale=(40, 30))(image, {"semantic": label})   # no resize: exactly the normalised image
    assert torch.allclose(x, expected, atol=1e-6)


# ---- 4. Batching --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("stride", [32, 64])
def test_pad_collate(stride):
    sizes = [(30, 50), (45, 20)]
    batch = [(torch.randn(3, h, w), {"semantic": torch.randint(0, 5, (h, w)), "masks": torch.ones(2, h, w,
                                                                                                   dtype=torch.bool)})
             for h, w in sizes]
    images, pad_mask, image_sizes, targets = ds.pad_collate(batch, stride=stride)
    hp, wp = math.ceil(45 / stride) * stride, math.ceil(50 / stride) * stride
    assert images.shape == (2, 3, hp, wp) and pad_mask.shape == (2, hp, wp) and image_sizes == sizes
    for i, (h, w) in enumerate(sizes):
        assert torch.equal(images[i, :, :h, :w], batch[i][0])
        assert not pad_mask[i, :h, :w].any() and pad_mask[i].sum() == hp * wp - h * w
        assert (images[i][:, pad_mask[i]] == 0).all()
        assert torch.equal(targets[i]["semantic"][:h, :w], batch[i][1]["semantic"])
        assert (targets[i]["semantic"][pad_mask[i]] == 255).all()
        assert targets[i]["masks"].shape == (2, hp, wp) and targets[i]["masks"].sum() == 2 * h * w
    _, _, _, untouched = ds.pad_collate(batch, stride=stride, pad_targets=False)
    assert untouched[0]["semantic"] is batch[0][1]["semantic"]


# ---- 5. COCO AP ---------------------------------------------------------------------------------------------------

def test_coco_perfect_and_empty_detections():
    boxes = [(10, 10, 20, 20), (50, 60, 40, 50), (0, 0, 120, 130)]        # small, medium, large
    gt = box_gt(boxes, cats=[1, 2, 2])
    s = stats_dict(ds.coco_evaluate(gt, [det(b, 0.9, c) for b, c in zip(boxes, [1, 2, 2])], "bbox"))
    # 1 - 2e-16 rather than 1: pycocotools' precision is tp / (tp + fp + eps).
    assert all(s[k] == pytest.approx(1, abs=1e-12) for k in ("AP", "AP50", "AP75", "APs", "APm", "APl"))
    assert all(s[k] == 1 for k in ("AR10", "AR100", "ARs", "ARm", "ARl"))
    # AR@1: one detection per image *and category*; category 2 has two GTs in the image -> 1/2, category 1 -> 1.
    assert s["AR1"] == 0.75
    s = stats_dict(ds.coco_evaluate(gt, [], "bbox"))
    assert s["AP"] == 0.0 and s["AR100"] == 0.0


def test_coco_annotation_id_zero_is_an_ordinary_id():
    # pycocotools stores matched GT ids and reads 0 as "unmatched"; matching here is by position, so id 0 works.
    gt = box_gt([(10, 10, 40, 40)])
    gt["annotations"][0]["id"] = 0
    assert ds.coco_evaluate(gt, [det((10, 10, 40, 40), 0.9)], "bbox")[0] == pytest.approx(1, abs=1e-12)


def test_coco_fp_ranked_above_tp():
    # 1 GT; an FP (score .9) then the TP (.8): precision [0, 1/2], suffix max [1/2, 1/2], recall [0, 1] -> every
    # recall threshold reads 1/2. AR@1 = 0: the FP fills the only slot.
    gt = box_gt([(10, 10, 40, 40)])
    s = stats_dict(ds.coco_evaluate(gt, [det((100, 100, 30, 30), 0.9), det((10, 10, 40, 40), 0.8)], "bbox"))
    assert s["AP"] == pytest.approx(0.5, abs=1e-12) and s["AP50"] == pytest.approx(0.5, abs=1e-12)
    assert s["AR1"] == 0.0 and s["AR10"] == 1.0


def test_coco_interpolation_suffix_max():
    # 3 GTs; detections TP .9, FP .8, FP .7, TP .6, TP .5: precision [1, 1/2, 1/3, 1/2, 3/5], recall [1/3, 1/3,
    # 1/3, 2/3, 1]. Suffix max [1, 3/5, 3/5, 3/5, 3/5]. Recall thresholds 0..0.33 (34 of them) read 1; 0.34..0.66
    # (33) and 0.67..1 (34) read 3/5. Without the suffix max the middle 33 would read 1/2.
    gts = [(0, 0, 40, 40), (60, 0, 40, 40), (120, 0, 40, 40)]
    dets = [det(gts[0], 0.9), det((0, 100, 30, 30), 0.8), det((60, 100, 30, 30), 0.7), det(gts[1], 0.6),
            det(gts[2], 0.5)]
    s = stats_dict(ds.coco_evaluate(box_gt(gts), dets, "bbox"))
    assert s["AP"] == pytest.approx((34 * 1 + 67 * 0.6) / 101, abs=1e-12)


def test_coco_iou_thresholds():
    # IoU 0.62 (box 10 x 6.2 inside 10 x 10): a TP at thresholds .50, .55, .60 only -> AP 3/10, AP50 1, AP75 0.
    s = stats_dict(ds.coco_evaluate(box_gt([(0, 0, 10, 10)]), [det((0, 0, 10, 6.2), 0.5)], "bbox"))
    assert s["AP"] == pytest.approx(0.3, abs=1e-12) and s["AP50"] == pytest.approx(1, abs=1e-12)
    assert s["AP75"] == 0.0


def test_coco_crowd_region_ignored():
    # One normal GT (medium) with an exact detection (.5) and a big crowd region holding two higher-scored small
    # detections (.9, .8). Crowd IoU = intersection / detection area = 1, so both match the crowd and are ignored,
    # not FPs: AP = 1. They still occupy maxDets slots: AR@1 = 0.
    gt = box_gt([(10, 10, 40, 40), (100, 100, 90, 90)], crowd=[0, 1])
    dets = [det((110, 110, 10, 10), 0.9), det((150, 150, 12, 12), 0.8), det((10, 10, 40, 40), 0.5)]
    s = ds.coco_evaluate(gt, dets, "bbox")
    assert np.allclose(s, [1, 1, 1, -1, 1, -1, 0, 1, 1, -1, 1, -1], atol=1e-12)


def test_coco_max_dets_per_image_per_category():
    # Category 2: 15 high-scored misses then its TP at rank 16; category 1: its only detection, the TP, scored last.
    # maxDets counts per category: AR@10 = mean(cat 1: 1, cat 2: 0) = 1/2 (a per-image cap would give 0).
    gt = box_gt([(0, 0, 20, 20), (100, 100, 20, 20)], cats=[1, 2])
    dets = [det((40 + 5 * i, 40, 10, 10), 0.9, cat=2) for i in range(15)]
    dets += [det((100, 100, 20, 20), 0.1, cat=2), det((0, 0, 20, 20), 0.05, cat=1)]
    s = stats_dict(ds.coco_evaluate(gt, dets, "bbox"))
    assert s["AR1"] == 0.5 and s["AR10"] == 0.5 and s["AR100"] == 1.0


def test_coco_area_ranges_use_the_gt_area_field():
    # A 10x10 box whose annotation says area 5000 is "medium" (32^2..96^2); the matched detection counts there.
    # An unmatched large detection is ignored in the small/medium ranges (its own area is out of range), counted in
    # all and large.
    gt = box_gt([(0, 0, 10, 10)], areas=[5000.0])
    s = stats_dict(ds.coco_evaluate(gt, [det((0, 0, 10, 10), 0.5), det((50, 50, 120, 120), 0.9)], "bbox"))
    assert s["APs"] == -1 and s["APm"] == pytest.approx(1, abs=1e-12) and s["APl"] == -1
    assert s["AP"] == pytest.approx(0.5, abs=1e-12)                       # the large FP ranks first in "all"


def test_coco_tied_scores_keep_result_order():
    # Equal scores: a stable sort keeps the results' order. FP first -> AP 1/2; TP first -> AP 1.
    gt = box_gt([(10, 10, 40, 40)])
    fp, tp = det((100, 100, 30, 30), 0.5), det((10, 10, 40, 40), 0.5)
    assert ds.coco_evaluate(gt, [fp, tp], "bbox")[0] == pytest.approx(0.5, abs=1e-12)
    assert ds.coco_evaluate(gt, [tp, fp], "bbox")[0] == pytest.approx(1, abs=1e-12)


def test_coco_iou_ties_go_to_the_later_gt():
    # GTs A (x 10..20) and B (x 12..22); detection 1 (x 11..21) has IoU 90/110 with both, detection 2 (x 8..18)
    # reaches 0.5 only with A (80/120; with B 60/140). pycocotools keeps scanning while IoU >= the best, so a tie
    # goes to the later GT: listed [A, B], detection 1 takes B and detection 2 gets A -> AP50 = 1. Listed [B, A],
    # detection 1 takes A and detection 2 is an FP at rank 2 -> precision [1, 1/2], recall [1/2, 1/2] -> AP50 51/101.
    a, b = (10, 0, 10, 10), (12, 0, 10, 10)
    dets = [det((11, 0, 10, 10), 0.9), det((8, 0, 10, 10), 0.8)]
    assert ds.coco_evaluate(box_gt([a, b]), dets, "bbox")[1] == pytest.approx(1, abs=1e-12)
    assert ds.coco_evaluate(box_gt([b, a]), dets, "bbox")[1] == pytest.approx(51 / 101, abs=1e-12)


def test_coco_category_without_gt_is_excluded():
    gt = box_gt([(10, 10, 40, 40), (60, 60, 30, 30)])
    dets = [det((10, 10, 40, 40), 0.8), det((100, 100, 30, 30), 0.7)]
    base = ds.coco_evaluate(gt, dets, "bbox")
    extra = dets + [det((0, 0, 50, 50), 0.99, cat=3), det((5, 5, 5, 5), 0.95, cat=3),    # category 3: no GT
                    det((0, 0, 9, 9), 0.9, cat=42)]                                      # category not in gt
    assert np.array_equal(ds.coco_evaluate(gt, extra, "bbox"), base)
    with pytest.raises(ValueError, match="image ids not in"):
        ds.coco_evaluate(gt, [det((0, 0, 5, 5), 0.5, image_id=9)], "bbox")
    with pytest.raises(ValueError, match="iou_type"):
        ds.coco_evaluate(gt, dets, "keypoints")
    with pytest.raises(ValueError, match=r"results\[0\] lacks \['score'\]"):
        ds.coco_evaluate(gt, [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 5]}], "bbox")
    with pytest.raises(ValueError, match="has no 'segmentation'"):
        ds.coco_evaluate(gt, dets, "segm")                                # boxes only: no masks to score


def test_coco_segm_hand_case():
    # Masks: GT a 10x10 square; detection 1 the same square (IoU 1), detection 2 half of it (IoU 0.5, a duplicate:
    # FP at every threshold once the first took the GT). AP = 1 (the FP ranks below the TP).
    m = np.zeros((40, 40), dtype=bool)
    m[5:15, 5:15] = True
    half = m.copy()
    half[10:15] = False
    gt = {"images": [{"id": 1, "height": 40, "width": 40}], "categories": [{"id": 1}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "area": 100.0, "iscrowd": 0,
                           "segmentation": [[5, 5, 15, 5, 15, 15, 5, 15]]}]}
    res = [{"image_id": 1, "category_id": 1, "score": 0.9, "segmentation": ds.rle_encode(m)},
           {"image_id": 1, "category_id": 1, "score": 0.8, "segmentation": ds.rle_encode(half)}]
    s = stats_dict(ds.coco_evaluate(gt, res, "segm"))
    assert s["AP"] == pytest.approx(1, abs=1e-12) and s["APs"] == s["AP"] and s["AR1"] == 1.0
    res[0]["score"] = 0.7                                                 # now the half mask ranks first: TP at .5
    s = stats_dict(ds.coco_evaluate(gt, res, "segm"))                     # only, the full mask a TP above .5
    assert s["AP50"] == pytest.approx(1, abs=1e-12) and s["AP75"] == pytest.approx(0.5, abs=1e-12)


def random_coco_case(rng, *, n_images, many=False, size=(90, 120)):
    """GT with ~15% crowds (polygon, string-RLE and list-RLE masks), area != box area, sizes across the three
    ranges; detections near GTs (some with a wrong label) and random ones, scores rounded to 2 decimals (ties)."""
    H, W = size
    cats = [{"id": c} for c in (1, 3, 7)]
    images = [{"id": 2 * i + 5, "height": H, "width": W} for i in range(n_images)]
    anns, res = [], []
    for im in images:
        for _ in range(rng.integers(0, 7)):
            w, h = (float(v) for v in np.round(rng.uniform(3, 80, 2), 1))
            x, y = (float(v) for v in np.round([rng.uniform(0, W - w), rng.uniform(0, H - h)], 1))
            crowd = int(rng.random() < 0.15)
            m = np.zeros((H, W), dtype=bool)
            m[int(y):int(y + h), int(x):int(x + w)] = True
            kind = rng.integers(3)
            seg = ([[x, y, x + w, y, x + w * 0.6, y + h, x, y + h * 0.8]] if kind == 0 else
                   ds.rle_encode(m) if kind == 1 else {"size": [H, W], "counts": ds.rle_from_string(
                       ds.rle_encode(m)["counts"])})
            anns.append({"id": len(anns) + 1, "image_id": im["id"], "category_id": int(rng.choice([1, 3, 7])),
                         "bbox": [x, y, w, h], "area": float(w * h * rng.uniform(0.5, 1.5)), "iscrowd": crowd,
                         "segmentation": seg})
    for im in images:
        near = [a for a in anns if a["image_id"] == im["id"]]
        for _ in range(rng.integers(0, 130 if many else 12)):
            if near and rng.random() < 0.6:
                g = near[rng.integers(len(near))]
                x, y, w, h = g["bbox"]
                x, y = x + rng.normal(0, w * 0.1), y + rng.normal(0, h * 0.1)
                w, h = w * rng.uniform(0.8, 1.2), h * rng.uniform(0.8, 1.2)
                cat = g["category_id"] if rng.random() < 0.8 else int(rng.choice([1, 3, 7, 99]))
            else:
                w, h = rng.uniform(2, 80, 2)
                x, y, cat = rng.uniform(0, W - w), rng.uniform(0, H - h), int(rng.choice([1, 3, 7]))
            x, y = max(x, 0.0), max(y, 0.0)
            m = np.zeros((H, W), dtype=bool)
            m[int(y):int(y + h), int(x):int(x + w)] = True
            m[int(y):int(y + h / 2), int(x):int(x + w / 3)] = rng.random() < 0.5
            res.append({"image_id": im["id"], "category_id": cat, "bbox": [float(x), float(y), float(w), float(h)],
                        "score": float(np.round(rng.random(), 2)), "segmentation": ds.rle_encode(m)})
    return {"images": images, "annotations": anns, "categories": cats}, res


def pycocotools_stats(gt, results, iou_type):
    coco_api = pytest.importorskip("pycocotools.coco")
    cocoeval = pytest.importorskip("pycocotools.cocoeval")
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = coco_api.COCO()
        coco_gt.dataset = copy.deepcopy(gt)
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(copy.deepcopy(results))                 # loadRes mutates its input
        e = cocoeval.COCOeval(coco_gt, coco_dt, iou_type)
        e.evaluate()
        e.accumulate()
        e.summarize()
    return e.stats


@PYCOCOTOOLS_NOISE
def test_coco_evaluate_matches_pycocotools_on_random_cases():
    pytest.importorskip("pycocotools")
    rng = np.random.default_rng(7)
    checked = 0
    for trial in range(16):
        gt, res = random_coco_case(rng, n_images=int(rng.integers(1, 6)), many=trial % 8 == 0)
        if not res:
            continue
        variants = {"bbox": res, "segm": res,                             # area from the box (loadRes' rule)
                    "segm-mask-only": [{k: v for k, v in r.items() if k != "bbox"} for r in res]}
        for name, results in variants.items():
            iou_type = name[:4]
            ours, ref = ds.coco_evaluate(gt, results, iou_type), pycocotools_stats(gt, results, iou_type)
            assert np.array_equal(ours, ref), (trial, name, ours, ref)
            checked += 1
    assert checked >= 40


# ---- 6. Mean IoU --------------------------------------------------------------------------------------------------

def test_mean_iou_hand_computed():
    # 3 classes. Image 1: label [0 0 1 1 | 255 2], pred [0 1 1 1 | 0 0]; image 2: label [1 1], pred [1 0].
    # Ignored pixel dropped. Pooled: I = [1, 3, 0], P = [3, 4, 0] (the ignored pixel's pred not counted),
    # L = [2, 4, 1]. IoU = [1/4, 3/5, 0], Acc = [1/2, 3/4, 0], aAcc = 4/7.
    labels = [np.array([[0, 0, 1, 1], [255, 2, 255, 255]]), np.array([[1, 1]])]
    preds = [np.array([[0, 1, 1, 1], [0, 0, 2, 2]]), np.array([[1, 0]])]
    out = ds.mean_iou(preds, labels, 3)
    assert np.allclose(out["IoU"], [1 / 4, 3 / 5, 0]) and np.allclose(out["Acc"], [1 / 2, 3 / 4, 0])
    assert out["aAcc"] == pytest.approx(4 / 7) and out["mIoU"] == pytest.approx((1 / 4 + 3 / 5) / 3)
    # Pooled over the dataset, not a mean of per-image mIoUs.
    per_image = np.mean([np.nanmean(ds.mean_iou([p], [lab], 3)["IoU"]) for p, lab in zip(preds, labels)])
    assert not np.isclose(per_image, out["mIoU"])


def test_mean_iou_nan_classes_and_out_of_range_predictions():
    # 5 classes, label [0 0 1 1 4], pred [0 3 1 7 4]. Class 2 is nowhere: NaN, left out of the means. Class 3 is
    # only predicted: IoU 0 counts, Acc NaN. Prediction 7 is outside 0..4: a miss for its label pixel and in no
    # class's predicted area (else class 4's IoU would drop from 1 to 1/2).
    # IoU = [1/2, 1/2, nan, 0, 1] -> mIoU 1/2; Acc = [1/2, 1/2, nan, nan, 1] -> mAcc 2/3; aAcc = 3/5.
    label, pred = np.array([[0, 0, 1, 1, 4]]), np.array([[0, 3, 1, 7, 4]])
    out = ds.mean_iou([pred], [label], 5)
    assert np.allclose(out["IoU"], [1 / 2, 1 / 2, np.nan, 0, 1], equal_nan=True)
    assert np.allclose(out["Acc"], [1 / 2, 1 / 2, np.nan, np.nan, 1], equal_nan=True)
    assert out["mIoU"] == pytest.approx(1 / 2) and out["mAcc"] == pytest.approx(2 / 3)
    assert out["aAcc"] == pytest.approx(3 / 5)
    with pytest.raises(ValueError, match="reduce_zero_label"):
        ds.mean_iou([np.zeros((2, 2))], [np.full((2, 2), 4)], 4)
    with pytest.raises(ValueError, match="differ"):
        ds.mean_iou([np.zeros((2, 3))], [np.zeros((2, 2))], 4)


def test_mean_iou_reduce_zero_label():
    # Raw ADE-style labels: 0 = other -> ignored, k -> k - 1; 255 stays ignored.
    raw = np.array([[0, 1, 2, 255]], dtype=np.uint8)
    pred = np.array([[1, 0, 0, 1]])
    out = ds.mean_iou([pred], [raw], 2, reduce_zero_label=True)           # labels become [255, 0, 1, 255]
    assert np.allclose(out["IoU"], [1 / 2, 0]) and out["aAcc"] == pytest.approx(1 / 2)
    assert ds.reduce_zero_label_map(np.arange(256)).tolist() == [255] + list(range(254)) + [255]


def test_mean_iou_vs_confusion_matrix():
    rng = np.random.default_rng(8)
    K = 6
    labels = [rng.integers(0, K + 2, (9, 11)) for _ in range(5)]
    for lab in labels:
        lab[lab >= K] = 255
    preds = [rng.integers(0, K, (9, 11)) for _ in range(5)]
    preds[0][:] = 0                                                       # make some classes rare
    conf = np.zeros((K, K))
    for p, lab in zip(preds, labels):
        keep = lab != 255
        np.add.at(conf, (lab[keep], p[keep]), 1)                          # rows: label, columns: prediction
    inter = np.diag(conf)
    iou = inter / (conf.sum(0) + conf.sum(1) - inter)
    out = ds.mean_iou(preds, labels, K)
    assert np.allclose(out["IoU"], iou) and out["aAcc"] == pytest.approx(inter.sum() / conf.sum())
    assert np.allclose(out["Acc"], inter / conf.sum(1))


# ---- 7. Conversions -----------------------------------------------------------------------------------------------

def test_predictions_to_coco():
    masks = np.zeros((2, 10, 12), dtype=np.float32)
    masks[0, 1:4, 2:6], masks[1, 5:9, 0:3] = 0.9, 0.6
    masks[1, 5, 0] = 0.5                                                  # not above 0.5: background
    pred = {"boxes": np.array([[2, 1, 6, 4], [0, 5, 3, 9]]), "scores": np.array([0.8, 0.3]),
            "labels": np.array([2, 1]), "masks": masks}
    categories = [{"id": 3}, {"id": 7}]                                   # label 1 -> id 3, label 2 -> id 7
    out = ds.predictions_to_coco([pred], image_ids=[42], categories=categories)
    assert [r["category_id"] for r in out] == [7, 3] and [r["image_id"] for r in out] == [42, 42]
    assert out[0]["bbox"] == [2, 1, 4, 3] and out[1]["score"] == 0.3
    assert np.array_equal(ds.rle_decode(out[0]["segmentation"]), masks[0] > 0.5)
    assert ds.rle_area(out[1]["segmentation"]) == 4 * 3 - 1


def test_shapes_segmentation_through_transform_collate_and_mean_iou():
    """The built-in shapes' semantic map is used as it is: K + 1 classes, 0 = background, 255 = ignore."""
    from functools import partial

    from train import SHAPE_CLASSES, ShapesDataset
    num_classes = len(SHAPE_CLASSES) + 1
    dataset = ShapesDataset(4, image_size=64, task="seg", seed=1)
    torch.manual_seed(0)
    batch = [ds.SegTrainTransform(crop_size=48, scale=(128, 64))(*dataset[i]) for i in range(4)]
    images, pad_mask, sizes, targets = partial(ds.pad_collate, stride=32)(batch)
    labels = torch.stack([t["semantic"] for t in targets])                # (B, Hp, Wp) for cross-entropy
    assert images.shape[-2:] == labels.shape[-2:] == (64, 64) and (labels[pad_mask] == 255).all()
    assert set(labels.unique().tolist()) <= set(range(num_classes)) | {255}
    semantic = [dataset[i][1]["semantic"] for i in range(4)]
    out = ds.mean_iou(semantic, semantic, num_classes)                    # ground truth as prediction
    present = np.unique(np.concatenate([s[s != 255] for s in semantic]))
    assert out["mIoU"] == 1 and np.array_equal(np.flatnonzero(~np.isnan(out["IoU"])), present)


def test_shapes_ground_truth_as_predictions_scores_one():
    """The built-in shapes through targets_to_coco_gt: GT as predictions gives AP 1, jittered boxes less."""
    from train import SHAPE_CLASSES, ShapesDataset
    dataset = ShapesDataset(6, image_size=64, task="det", seed=0)
    categories = [{"id": k + 1, "name": name} for k, name in enumerate(SHAPE_CLASSES)]
    targets = [dataset[i][1] for i in range(len(dataset))]
    image_ids = list(range(1, len(targets) + 1))
    gt = ds.targets_to_coco_gt(targets, image_ids, categories)
    assert len(gt["annotations"]) == sum(len(t["labels"]) for t in targets)
    masks = [m for t in targets for m in t["masks"]]
    assert [a["area"] for a in gt["annotations"]] == [float(m.sum()) for m in masks]   # COCO: the mask's area
    assert all(np.array_equal(ds.rle_decode(a["segmentation"]), m) for a, m in zip(gt["annotations"], masks))
    preds = [{**t, "scores": np.linspace(1, 0.5, len(t["labels"]))} for t in targets]
    for iou_type in ("bbox", "segm"):
        s = ds.coco_evaluate(gt, ds.predictions_to_coco(preds, image_ids, categories), iou_type)
        assert s[0] == pytest.approx(1, abs=1e-12) and s[8] == 1.0
    jittered = [{**p, "boxes": p["boxes"] + np.array([3, 3, 3, 3])} for p in preds]
    assert ds.coco_evaluate(gt, ds.predictions_to_coco(jittered, image_ids, categories), "bbox")[0] < 0.9
