import json

import numpy as np
import pytest
import torch
from PIL import Image

from openmae import data
from openmae.dense.data import (
    FASHION_SCENES_CLASSES,
    IGNORE_INDEX,
    ADE20KSegmentation,
    CocoDetection,
    DenseDataset,
    DetectionBatch,
    FashionScenes,
    PairedTransform,
    RawSample,
    ade20k_classes,
    ade20k_paths,
    build_dense_dataset,
    coco_paths,
    collate_detection,
    collate_segmentation,
    mask_boxes,
)

HAVE_FASHION_MNIST = any((data.FASHION_MNIST_DIR / f"t10k-images-idx3-ubyte{s}").exists() for s in ("", ".gz"))
needs_fashion_mnist = pytest.mark.skipif(
    not HAVE_FASHION_MNIST, reason="needs the Debian package dataset-fashion-mnist"
)


def item_source(count: int = 12, side: int = 28, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST-like items: bright blobs of random shape on black, labels 0..9."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:side, :side]
    images = []
    for _ in range(count):
        cy, cx = rng.uniform(9, side - 9, 2)
        ry, rx = rng.uniform(5, 9, 2)
        blob = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        images.append(np.where(blob, rng.integers(80, 256, (side, side)), 0).astype(np.uint8))
    return np.stack(images), rng.integers(0, 10, count)


def synthetic_scenes(split: str = "train", **kw) -> FashionScenes:
    return FashionScenes(split, length=kw.pop("length", 40), source=item_source(), **kw)


def assert_scene_consistent(raw: RawSample, num_classes: int = 11) -> None:
    n = len(raw.labels)
    assert raw.masks.shape == (n, *raw.image.shape[-2:]) and raw.boxes.shape == (n, 4)
    assert raw.masks.dtype == torch.bool and raw.semantic.dtype == torch.int64
    assert ((1 <= raw.labels) & (raw.labels < num_classes)).all()
    assert raw.masks.flatten(1).any(1).all(), "an instance without visible pixels"
    assert (raw.masks.sum(0) <= 1).all(), "instance masks overlap"
    union = torch.zeros_like(raw.semantic)
    for mask, label in zip(raw.masks, raw.labels):
        union[mask] = label
    torch.testing.assert_close(union, raw.semantic)  # the class mask is the instances' union, by label
    torch.testing.assert_close(raw.boxes, mask_boxes(raw.masks))
    for mask, (x1, y1, x2, y2) in zip(raw.masks, raw.boxes.long().tolist()):
        assert mask[y1:y2, x1:x2].sum() == mask.sum()  # the box holds the whole mask ...
        assert mask[y1, x1:x2].any() and mask[y2 - 1, x1:x2].any()  # ... and touches it on every side
        assert mask[y1:y2, x1].any() and mask[y1:y2, x2 - 1].any()


# -- fashion-scenes ----------------------------------------------------------------------------


def test_scenes_are_pure_functions_of_seed_split_and_index():
    a, b = synthetic_scenes(), synthetic_scenes()
    for i in (0, 7):
        for x, y in zip(a.load(i), b.load(i)):
            torch.testing.assert_close(x, y)
    assert not torch.equal(a.load(0).image, a.load(1).image)
    assert not torch.equal(a.load(0).image, synthetic_scenes("val").load(0).image)
    assert not torch.equal(a.load(0).image, synthetic_scenes(seed=1).load(0).image)


def test_scene_annotations_are_exact():
    scenes = synthetic_scenes(length=60)
    counts = []
    for i in range(len(scenes)):
        raw = scenes.load(i)
        assert raw.image.shape == (1, 64, 64) and raw.image.dtype == torch.uint8
        assert_scene_consistent(raw)
        # items are painted only where they are foreground on a black canvas: pixels and classes agree
        torch.testing.assert_close(raw.image[0] > 0, raw.semantic > 0)
        counts.append(len(raw.labels))
    assert min(counts) >= 1 and max(counts) == 4 and len(set(counts)) == 4


def test_scene_options_size_channels_items():
    scenes = synthetic_scenes(size=(48, 80), channels=3, items=(2, 2), length=10)
    raw = scenes.load(3)
    assert raw.image.shape == (3, 48, 80)
    torch.testing.assert_close(raw.image[0], raw.image[2])
    assert_scene_consistent(raw)
    assert all(len(scenes.load(i).labels) <= 2 for i in range(10))
    assert scenes.classes == FASHION_SCENES_CLASSES and scenes.classes[0] == "background"
    with pytest.raises(IndexError):
        scenes.load(10)
    with pytest.raises(ValueError, match="split must be"):
        FashionScenes("validation", source=item_source())


@needs_fashion_mnist
def test_fashion_scenes_draw_from_the_matching_split():
    train, val = FashionScenes("train", length=20), FashionScenes("val", length=20)
    assert len(train.item_images) == 60000 and len(val.item_images) == 10000  # t10k for val scenes
    assert len(train) == 20
    torch.testing.assert_close(train.load(5).image, FashionScenes("train", length=20).load(5).image)
    assert not torch.equal(train.load(5).image, val.load(5).image)
    assert_scene_consistent(train.load(5))
    assert_scene_consistent(val.load(5))
    ds = build_dense_dataset("fashion-scenes", "val", "segment", limit=5)
    assert len(ds) == 5 and ds.num_classes == 11
    assert ds.mean == data.FASHION_MNIST_MEAN


def test_fashion_scenes_without_the_dataset_says_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        FashionScenes("train", path=tmp_path)


# -- paired transforms -------------------------------------------------------------------------


def striped_sample(h: int = 40, w: int = 56) -> RawSample:
    """Rectangles of classes 1..3 whose pixel value encodes the class (20 * class + 40), two instances."""
    semantic = torch.zeros(h, w, dtype=torch.int64)
    semantic[4:20, 6:30] = 1
    semantic[22:36, 10:50] = 2
    semantic[8:18, 38:52] = 3
    image = (20 * semantic + 40).to(torch.uint8)[None]
    masks = torch.stack([semantic == 1, semantic == 2, semantic == 3])
    return RawSample(image, semantic, mask_boxes(masks), torch.tensor([1, 2, 3]), masks)


def run_seeded(transform: PairedTransform, raw: RawSample, seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return transform(raw)


def pixels(image: torch.Tensor, mean=0.5, std=0.25) -> torch.Tensor:
    return (image * std + mean) * 255


def interior(mask: torch.Tensor) -> torch.Tensor:
    """Pixels whose 5x5 neighbourhood holds a single value and lies in the picture: resizing (antialiased)
    blends the image across class borders and across the edge of a crop."""
    m = torch.nn.functional.pad(mask.float()[None, None], (2, 2, 2, 2), value=-1.0)
    hi = torch.nn.functional.max_pool2d(m, 5, 1)[0, 0]
    lo = -torch.nn.functional.max_pool2d(-m, 5, 1)[0, 0]
    return hi == lo


@pytest.mark.parametrize("seed", range(6))
def test_training_transform_keeps_class_masks_on_their_pixels(seed):
    t = PairedTransform("segment", 48, train=True, mean=[0.5], std=[0.25], scale_range=(0.5, 2.0))
    image, mask = run_seeded(t, striped_sample(), seed)
    assert image.shape == (1, 48, 48) and image.dtype == torch.float32
    assert mask.shape == (48, 48) and mask.dtype == torch.int64
    values = pixels(image[0])
    inside = interior(mask)
    labelled = inside & (mask != IGNORE_INDEX)
    assert labelled.any()
    torch.testing.assert_close(values[labelled], (20.0 * mask[labelled] + 40), atol=2, rtol=0)
    padded = inside & (mask == IGNORE_INDEX)
    assert (values[padded].abs() < 1).all()  # padding: zeros in the image, the ignore index in the mask


def test_flip_mirrors_image_and_mask():
    raw = striped_sample(48, 48)
    plain = PairedTransform("segment", 48, True, [0.5], [0.25], scale_range=(1, 1), hflip=0.0)
    flipped = PairedTransform("segment", 48, True, [0.5], [0.25], scale_range=(1, 1), hflip=1.0)
    (a, ma), (b, mb) = run_seeded(plain, raw, 0), run_seeded(flipped, raw, 0)
    torch.testing.assert_close(mb, ma.flip(-1))
    torch.testing.assert_close(b, a.flip(-1))
    torch.testing.assert_close(ma, raw.semantic)


def test_flip_mirrors_instances():
    raw = striped_sample(48, 48)
    t = PairedTransform("detect", 48, True, [0.5], [0.25], scale_range=(1, 1), hflip=1.0)
    _, target = run_seeded(t, raw, 0)
    torch.testing.assert_close(target["masks"].bool(), raw.masks.flip(-1))
    x1, y1, x2, y2 = raw.boxes.unbind(1)
    torch.testing.assert_close(target["boxes"], torch.stack([48 - x2, y1, 48 - x1, y2], 1))
    torch.testing.assert_close(target["labels"], raw.labels)


@pytest.mark.parametrize("seed", range(8))
def test_detection_transform_keeps_instances_aligned(seed):
    t = PairedTransform("detect", 32, train=True, mean=[0.5], std=[0.25], scale_range=(0.5, 2.5))
    raw = striped_sample()
    image, target = run_seeded(t, raw, seed)
    boxes, labels, masks = target["boxes"], target["labels"], target["masks"]
    assert masks.dtype == torch.uint8 and masks.shape[1:] == (32, 32) == image.shape[1:]
    assert len(boxes) == len(labels) == len(masks) <= 3
    assert masks.flatten(1).any(1).all()  # instances the crop emptied are gone
    torch.testing.assert_close(boxes, mask_boxes(masks.bool()))
    assert ((boxes >= 0) & (boxes <= 32)).all()
    values = pixels(image[0])
    for mask, label in zip(masks.bool(), labels):
        core = mask & interior(mask)
        torch.testing.assert_close(values[core], torch.full_like(values[core], 20.0 * label + 40), atol=2, rtol=0)


def test_a_crop_drops_the_instances_it_empties():
    t = PairedTransform("detect", 24, train=True, mean=[0.5], std=[0.25], scale_range=(1.5, 2.0))
    counts = {len(run_seeded(t, striped_sample(), seed)[1]["labels"]) for seed in range(12)}
    assert min(counts) < 3


def test_eval_transform_resizes_to_fit_and_pads_bottom_right():
    raw = striped_sample(40, 80)  # resized to 32x64, then padded by 32 rows
    t = PairedTransform("segment", 64, train=False, mean=[0.5], std=[0.25])
    image, mask = t(raw)
    assert image.shape == (1, 64, 64)
    assert (mask[32:] == IGNORE_INDEX).all() and (mask[:32] != IGNORE_INDEX).all()
    assert (pixels(image[0, 32:]).abs() < 1e-3).all()
    expected = torch.nn.functional.interpolate(raw.semantic[None, None].float(), size=(32, 64), mode="nearest")
    torch.testing.assert_close(mask[:32], expected[0, 0].long())
    _, target = PairedTransform("detect", 64, train=False, mean=[0.5], std=[0.25])(raw)
    torch.testing.assert_close(target["boxes"], mask_boxes(target["masks"].bool()))
    torch.testing.assert_close(target["boxes"], raw.boxes * 0.8, atol=1, rtol=0)  # 40x80 -> 32x64


def test_dataset_is_deterministic_per_seed_epoch_index():
    source = synthetic_scenes(length=8)
    t = PairedTransform("segment", 64, True, source.mean, source.std)
    ds = DenseDataset(source, "segment", t, seed=3)
    a, b = ds[2], ds[2]
    torch.testing.assert_close(a[0], b[0])
    torch.testing.assert_close(a[1], b[1])
    assert a[2] == 2
    first = [ds[i][0] for i in range(4)]
    ds.set_epoch(1)
    assert any(not torch.equal(ds[i][0], first[i]) for i in range(4))  # (a crop may show background only)
    other = DenseDataset(source, "segment", t, seed=4)
    assert any(not torch.equal(other[i][0], first[i]) for i in range(4))
    state = torch.get_rng_state()
    ds[0]
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is left alone


def test_collates_and_batches():
    source = synthetic_scenes(length=8, channels=3)
    seg = DenseDataset(source, "segment", PairedTransform("segment", 32, True, source.mean, source.std))
    batch = collate_segmentation([seg[0], (None, None, 5), seg[1]])
    assert batch.images.shape == (2, 3, 32, 32) and batch.labels.shape == (2, 32, 32)
    assert batch.indices.tolist() == [0, 1] and batch.failed == [5]
    assert len(collate_segmentation([(None, None, 1)])) == 0
    det = DenseDataset(source, "detect", PairedTransform("detect", 32, True, source.mean, source.std))
    batch = collate_detection([det[3], det[4], (None, None, 7)])
    assert isinstance(batch, DetectionBatch) and len(batch) == 2 and batch.failed == [7]
    assert batch.images.shape == (2, 3, 32, 32) and set(batch.targets[0]) == {"boxes", "labels", "masks"}
    moved = batch.to("cpu")
    assert moved.targets[1]["labels"].dtype == torch.int64


# -- COCO --------------------------------------------------------------------------------------


def write_image(path, h, w, mode="RGB", seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shape = (h, w, 3) if mode == "RGB" else (h, w)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path)
    return path


def coco_doc() -> dict:
    from pycocotools import mask as mask_utils

    block = np.zeros((20, 30), dtype=np.uint8, order="F")
    block[5:9, 10:25] = 1  # rows 5..8, columns 10..24
    compressed = mask_utils.encode(np.asfortranarray(block))
    compressed["counts"] = compressed["counts"].decode()
    # image 2 (12x16): columns 2..3, rows 3..6; uncompressed RLE runs down the columns
    uncompressed = {"size": [12, 16], "counts": [2 * 12 + 3, 4, 12 - 4, 4, 12 * 16 - 27 - 4 - 8 - 4]}
    return {
        "images": [
            {"id": 1, "file_name": "a.png", "width": 30, "height": 20},
            {"id": 2, "file_name": "sub/b.jpg", "width": 16, "height": 12},
        ],
        "categories": [{"id": 7, "name": "cat"}, {"id": 3, "name": "dog"}],
        "annotations": [
            {
                "id": 10,
                "image_id": 1,
                "category_id": 7,
                "bbox": [2, 1, 4, 3],
                "iscrowd": 0,
                "segmentation": [[2, 1, 6, 1, 6, 4, 2, 4]],
            },
            {
                "id": 11,
                "image_id": 1,
                "category_id": 3,
                "bbox": [10, 5, 15, 4],
                "iscrowd": 0,
                "segmentation": compressed,
            },
            {
                "id": 12,
                "image_id": 1,
                "category_id": 3,
                "bbox": [0, 0, 30, 20],
                "iscrowd": 1,
                "segmentation": {"size": [20, 30], "counts": [600]},
            },
            {"id": 13, "image_id": 2, "category_id": 7, "bbox": [2, 3, 2, 4], "segmentation": uncompressed},
        ],
    }


def write_coco(root, doc=None, split="train"):
    write_image(root / split / "a.png", 20, 30)
    write_image(root / split / "sub" / "b.jpg", 12, 16, seed=1)
    path = root / "annotations" / f"instances_{split}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(coco_doc() if doc is None else doc))
    return path


def test_coco_reads_boxes_polygons_and_rle(tmp_path):
    from pycocotools.coco import COCO

    annotations = write_coco(tmp_path)
    COCO(str(annotations))  # the fixture is a file COCO's own reader takes
    images, found = coco_paths(tmp_path, "train")
    assert (images, found) == (tmp_path / "train", annotations)
    coco = CocoDetection(images, annotations)
    assert coco.classes == ["background", "dog", "cat"] and coco.category_ids == [3, 7]
    assert len(coco) == 2 and coco.has_masks
    raw = coco.load(0)
    assert raw.image.shape == (3, 20, 30)
    assert raw.labels.tolist() == [2, 1]  # cat (id 7) -> 2, dog (id 3) -> 1; the crowd annotation is skipped
    torch.testing.assert_close(raw.boxes, torch.tensor([[2.0, 1, 6, 4], [10, 5, 25, 9]]))
    polygon = torch.zeros(20, 30, dtype=torch.bool)
    polygon[1:4, 2:6] = True
    torch.testing.assert_close(raw.masks[0], polygon)
    assert raw.masks[1].sum() == 4 * 15 and raw.masks[1][5:9, 10:25].all()
    torch.testing.assert_close(mask_boxes(raw.masks), raw.boxes)
    raw = coco.load(1)
    assert raw.image.shape == (3, 12, 16)
    assert raw.masks.shape == (1, 12, 16) and raw.masks[0].sum() == 8 and raw.masks[0][3:7, 2:4].all()
    ds = build_dense_dataset("coco", "train", "detect", path=tmp_path, img_size=32, augment=False)
    image, target, _ = ds[0]
    assert image.shape == (3, 32, 32) and target["labels"].tolist() == [2, 1]
    assert ds.paths[1].endswith("b.jpg")


def test_coco_boxes_only_and_official_names(tmp_path):
    doc = coco_doc()
    for ann in doc["annotations"]:
        ann.pop("segmentation")
    write_coco(tmp_path, doc, split="val2017")
    coco = CocoDetection(*coco_paths(tmp_path, "val"))
    assert not coco.has_masks
    raw = coco.load(0)
    assert raw.masks is None and raw.labels.tolist() == [2, 1]
    _, target = PairedTransform("detect", 32, False, coco.mean, coco.std)(raw)
    assert set(target) == {"boxes", "labels"}
    with pytest.raises(FileNotFoundError, match="instances_train.json"):
        coco_paths(tmp_path, "train")


def broken(change):
    doc = coco_doc()
    change(doc)
    return doc


COCO_CASES = {
    "not an object": ([1, 2], ["not a COCO instances file", "list"]),
    "no annotations": (broken(lambda d: d.pop("annotations")), ["not a COCO instances file", "'annotations'"]),
    "box outside": (
        broken(lambda d: d["annotations"][1].update(bbox=[10, 5, 25, 4])),
        ["annotations[1] (id 11)", "outside", "a.png"],
    ),
    "box negative x": (
        broken(lambda d: d["annotations"][0].update(bbox=[-5, 1, 4, 3])),
        ["annotations[0] (id 10)", "outside"],
    ),
    "box of zero size": (
        broken(lambda d: d["annotations"][0].update(bbox=[2, 1, 0, 3])),
        ["annotations[0] (id 10)", "non-positive size"],
    ),
    "unknown category": (
        broken(lambda d: d["annotations"][3].update(category_id=99)),
        ["annotations[3] (id 13)", "category_id 99"],
    ),
    "unknown image": (
        broken(lambda d: d["annotations"][3].update(image_id=5)),
        ["annotations[3] (id 13)", "image_id 5"],
    ),
    "bad bbox": (
        broken(lambda d: d["annotations"][0].update(bbox=[1, 2, 3])),
        ["annotations[0] (id 10)", "[x, y, width, height]"],
    ),
    "RLE size": (
        broken(lambda d: d["annotations"][1]["segmentation"].update(size=[30, 20])),
        ["annotations[1] (id 11)", "RLE"],
    ),
    "bad polygon": (
        broken(lambda d: d["annotations"][0].update(segmentation=[[1, 2, 3]])),
        ["annotations[0] (id 10)", "polygon"],
    ),
    "image without size": (broken(lambda d: d["images"][1].pop("width")), ["images[1] (id 2)", "width"]),
}


@pytest.mark.parametrize("case", list(COCO_CASES))
def test_bad_coco_annotations_name_the_file_and_entry(tmp_path, case):
    doc, expect = COCO_CASES[case]
    annotations = write_coco(tmp_path, doc)
    with pytest.raises(ValueError) as info:
        CocoDetection(tmp_path / "train", annotations)
    message = str(info.value)
    assert str(annotations) in message
    for text in expect:
        assert text in message, message


def test_coco_missing_files_and_bad_json(tmp_path):
    annotations = write_coco(tmp_path)
    (tmp_path / "train" / "sub" / "b.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 image\(s\) listed in .*instances_train.json are missing: .*b.jpg"):
        CocoDetection(tmp_path / "train", annotations)
    annotations.write_text("{not json")
    with pytest.raises(ValueError, match="instances_train.json is not valid JSON"):
        CocoDetection(tmp_path / "train", annotations)


def test_coco_image_of_another_size_than_its_entry_fails_on_load(tmp_path):
    annotations = write_coco(tmp_path)
    write_image(tmp_path / "train" / "a.png", 21, 30)
    coco = CocoDetection(tmp_path / "train", annotations)
    with pytest.raises(
        ValueError, match=r"a.png is 30x21 px but .*instances_train.json \(images\[0\] \(id 1\)\) gives 30x20"
    ):
        coco.load(0)


def test_coco_undecodable_image_is_a_failed_sample(tmp_path):
    annotations = write_coco(tmp_path)
    (tmp_path / "train" / "a.png").write_bytes(b"not a picture")
    ds = DenseDataset(
        CocoDetection(tmp_path / "train", annotations),
        "detect",
        PairedTransform("detect", 16, True, [0.5] * 3, [0.2] * 3),
    )
    assert ds[0] == (None, None, 0)
    assert collate_detection([ds[0], ds[1]]).failed == [0]
    assert "loads now" not in ds.failure_reason(0)  # the reason openmae.data's BadImageTracker reports
    assert "loads now" in ds.failure_reason(1)


# -- ADE20K layout -----------------------------------------------------------------------------


def write_ade(root, split="training", names=("a", "b"), label_values=None, size=(12, 16)):
    for k, name in enumerate(names):
        write_image(root / "images" / split / f"{name}.jpg", *size, seed=k)
        values = label_values if label_values is not None else np.arange(size[0] * size[1]).reshape(size) % 4
        path = root / "annotations" / split / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.asarray(values, dtype=np.uint8)).save(path)
    return root


def test_ade_layout_reduces_zero_label(tmp_path):
    values = np.zeros((12, 16), dtype=np.uint8)
    values[:, 4:8], values[:, 8:12], values[:, 12:] = 1, 150, 255
    write_ade(tmp_path, label_values=values)
    images, labels = ade20k_paths(tmp_path, "train")
    ade = ADE20KSegmentation(images, labels)
    assert len(ade) == 2 and len(ade.classes) == 150
    raw = ade.load(1)
    assert raw.image.shape == (3, 12, 16) and raw.semantic.dtype == torch.int64
    assert (raw.semantic[:, :4] == IGNORE_INDEX).all() and (raw.semantic[:, 4:8] == 0).all()
    assert (raw.semantic[:, 8:12] == 149).all() and (raw.semantic[:, 12:] == IGNORE_INDEX).all()
    plain = ADE20KSegmentation(images, labels, reduce_zero_label=False)
    assert len(plain.classes) == 151 and plain.classes[0] == "other"
    assert (plain.load(0).semantic[:, 8:12] == 150).all()
    ds = build_dense_dataset("ade20k", "train", "segment", path=tmp_path, img_size=32, augment=False)
    image, mask, _ = ds[0]
    assert image.shape == (3, 32, 32) and mask.shape == (32, 32)
    with pytest.raises(ValueError, match="ade20k has no annotations for 'detect'.*use fashion-scenes or coco"):
        build_dense_dataset("ade20k", "train", "detect", path=tmp_path)
    with pytest.raises(ValueError, match="ADE20KSegmentation has no annotations for 'detect'"):
        DenseDataset(ds.source, "detect", PairedTransform("detect", 32, False, ds.mean, ds.std))


def test_ade_class_names(tmp_path):
    assert ade20k_classes(tmp_path)[:2] == ["class 1", "class 2"]
    (tmp_path / "objectInfo150.txt").write_text(
        "Idx\tRatio\tTrain\tVal\tName\n1\t0.1\t10\t2\twall\n2\t0.1\t9\t1\tbuilding;edifice\n"
    )
    assert ade20k_classes(tmp_path) == ["wall", "building"]
    assert ade20k_classes(tmp_path, reduce_zero_label=False) == ["other", "wall", "building"]
    (tmp_path / "classes.txt").write_text("sky\nroad\n")
    assert ade20k_classes(tmp_path) == ["sky", "road"]


ADE_CASES = {
    "label map of another size": (
        {},
        lambda root: Image.fromarray(np.zeros((10, 16), np.uint8)).save(root / "annotations" / "training" / "b.png"),
        ["b.png is 16x10 px", "b.jpg is 16x12"],
    ),
    "class id out of range": (
        {"label_values": np.full((12, 16), 200)},
        None,
        ["a.png", "class id(s) 200", "outside 0..150"],
    ),
    "colour label map": (
        {},
        lambda root: Image.fromarray(np.zeros((12, 16, 3), np.uint8)).save(root / "annotations" / "training" / "a.png"),
        ["a.png is an image of mode RGB"],
    ),
    "unreadable label map": (
        {},
        lambda root: (root / "annotations" / "training" / "a.png").write_bytes(b"junk"),
        ["a.png cannot be read"],
    ),
}


@pytest.mark.parametrize("case", list(ADE_CASES))
def test_bad_ade_label_maps_name_the_file(tmp_path, case):
    kw, spoil, expect = ADE_CASES[case]
    write_ade(tmp_path, **kw)
    if spoil is not None:
        spoil(tmp_path)
    ade = ADE20KSegmentation(*ade20k_paths(tmp_path, "train"))
    index = 1 if "b.png" in expect[0] else 0
    with pytest.raises(ValueError) as info:
        ade.load(index)
    for text in expect:
        assert text in str(info.value), str(info.value)


def test_ade_missing_label_map_or_folder(tmp_path):
    write_ade(tmp_path)
    (tmp_path / "annotations" / "training" / "b.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 of 2 images .* have no label map: .*b.png \(first: .*b.jpg\)"):
        ADE20KSegmentation(*ade20k_paths(tmp_path, "train"))
    with pytest.raises(FileNotFoundError, match="validation"):
        ade20k_paths(tmp_path, "val")
    with pytest.raises(ValueError, match="needs a path"):
        build_dense_dataset("ade20k", "train", "segment")
    with pytest.raises(ValueError, match="unknown dense dataset 'voc'"):
        build_dense_dataset("voc", "train", "segment", path=tmp_path)
