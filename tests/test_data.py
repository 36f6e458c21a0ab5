import numpy as np
import pytest
import torch

from conftest import make_image_folder, shared_data_or_skip
from deepcovid.data import DecodedImages, discover, fingerprint, load_splits, patient_id, split_by_patient
from deepcovid.errors import ConfigError, DataError
from deepcovid.transforms import AugmentConfig, build_augment, normalize, rgb_to_hsv


@pytest.mark.parametrize("name,expected", [
    ("person1202_bacteria_3152.jpeg", "person1202"),
    ("person1202_virus_2045.jpeg", "person1202"),
    ("IM-0115-0001.jpeg", "IM-0115"),
    ("NORMAL2-IM-1427-0001.jpeg", "NORMAL2-IM-1427"),
    ("some_scan.png", "some_scan"),
])
def test_patient_id(name, expected):
    assert patient_id(f"/x/{name}") == expected


def test_discovery_orders_positive_class_last(tmp_path):
    make_image_folder(tmp_path / "d" / "train", {"PNEUMONIA": 4, "NORMAL": 4})
    splits = load_splits(tmp_path / "d", val_fraction=0.25)
    assert splits.classes == ["NORMAL", "PNEUMONIA"] and splits.positive_class == "PNEUMONIA"
    make_image_folder(tmp_path / "e" / "train", {"COVID": 8, "XNORMAL": 8})
    with pytest.raises(ConfigError, match="positive-class"):
        load_splits(tmp_path / "e", val_fraction=0.25)
    s = load_splits(tmp_path / "e", val_fraction=0.25, positive_class="COVID")
    assert s.classes == ["XNORMAL", "COVID"]


def test_split_keeps_each_patient_on_one_side(tmp_path):
    make_image_folder(tmp_path / "train", {"NORMAL": 60, "PNEUMONIA": 90}, size=16, images_per_patient=3)
    _, samples = discover(tmp_path / "train")
    train, val = split_by_patient(samples, 0.2, seed=3)
    assert {s.patient for s in train}.isdisjoint({s.patient for s in val})
    assert len(train) + len(val) == len(samples)
    assert 0.1 < len(val) / len(samples) < 0.3
    # stratified: both classes on both sides, roughly in proportion
    val_pos = np.mean([s.label for s in val])
    assert 0.4 < val_pos < 0.8


def test_small_val_folder_is_replaced_by_a_carved_split(tmp_path):
    make_image_folder(tmp_path / "train", {"NORMAL": 20, "PNEUMONIA": 20}, size=16)
    make_image_folder(tmp_path / "val", {"NORMAL": 2, "PNEUMONIA": 2}, size=16)
    s = load_splits(tmp_path, val_fraction=0.2)
    assert "carved" in s.val_source and len(s.train) + len(s.val) == 40


@pytest.mark.parametrize("layout,message", [
    ({"NORMAL": 3, "PNEUMONIA": 0}, "hold no images"),
    ({"NORMAL": 3}, "only one class"),
    ({}, "no class folders"),
])
def test_bad_datasets_stop_before_training(tmp_path, layout, message):
    root = tmp_path / "d"
    (root / "train").mkdir(parents=True)
    for cls, n in layout.items():
        (root / "train" / cls).mkdir()
        if n:
            make_image_folder(root / "train", {cls: n}, size=16)
    with pytest.raises(DataError, match=message):
        load_splits(root)


def test_missing_folders(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_splits(tmp_path / "nope")
    (tmp_path / "x").mkdir()
    with pytest.raises(DataError, match="no train/ folder"):
        load_splits(tmp_path / "x")


def test_corrupt_files_are_reported_and_skipped(tmp_path, caplog):
    make_image_folder(tmp_path / "train", {"NORMAL": 4, "PNEUMONIA": 4}, size=16)
    bad = tmp_path / "train" / "NORMAL" / "IM-9999-0001.jpeg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    _, samples = discover(tmp_path / "train")
    for mode in ("memory", "disk", "off"):
        caplog.clear()
        imgs = DecodedImages(samples, 16, mode, cache_dir=tmp_path / "cache")
        assert len(imgs) == 8 and imgs.bad == [str(bad)]
        assert str(bad) in caplog.text
        assert imgs.get(0).shape == (16, 16, 3) and imgs.get(0).dtype == np.uint8


def test_disk_cache_is_reused_and_invalidated_by_edits(tmp_path):
    make_image_folder(tmp_path / "train", {"NORMAL": 3, "PNEUMONIA": 3}, size=16)
    _, samples = discover(tmp_path / "train")
    a = DecodedImages(samples, 16, "disk", cache_dir=tmp_path / "c")
    files = sorted((tmp_path / "c").glob("decoded-*.npy"))
    assert len(files) == 1
    b = DecodedImages(samples, 16, "disk", cache_dir=tmp_path / "c")
    assert np.array_equal(a.get(2), b.get(2)) and len(list((tmp_path / "c").glob("decoded-*.npy"))) == 1
    # editing one image changes the fingerprint -> a new cache entry with the new pixels
    from PIL import Image

    Image.new("RGB", (16, 16), (255, 255, 255)).save(samples[2].path)
    fp_before = fingerprint(samples)
    import os
    os.utime(samples[2].path, ns=(1, 1))
    assert fingerprint(samples) != fp_before
    c = DecodedImages(samples, 16, "disk", cache_dir=tmp_path / "c")
    assert len(list((tmp_path / "c").glob("decoded-*.npy"))) == 2
    assert c.get(2).min() > 240


AUG_ONE_AT_A_TIME = {
    "rotation": {"rotation": 20.0}, "hflip": {"hflip": 1.0}, "vflip": {"vflip": 1.0}, "shift": {"shift": 12},
    "blur": {"blur": 2.0, "blur_p": 1.0}, "brightness": {"brightness": 0.5}, "contrast": {"contrast": 0.5},
    "saturation": {"saturation": 0.9}, "hue": {"hue": 0.3}, "zoom": {"zoom": 0.3}, "erase": {"erase": 1.0},
}


@pytest.mark.parametrize("name", sorted(AUG_ONE_AT_A_TIME))
def test_each_table1_augmentation_changes_the_image(name):
    torch.manual_seed(0)
    # asymmetric colourful image so flips, hue and saturation all show
    x = torch.zeros(3, 64, 64, dtype=torch.uint8)
    x[0, :, :32] = 200
    x[1, 10:30, 5:60] = 120
    x[2, 40:, 20:] = 80
    cfg = AugmentConfig(**{**AugmentConfig.off().to_dict(), **AUG_ONE_AT_A_TIME[name]})
    aug = build_augment(cfg, 64)
    assert len(aug.transforms) == 1
    changed = any(not torch.equal(aug(x), x) for _ in range(5))
    assert changed, f"{name} did not change the image"
    assert aug(x).dtype == torch.uint8 and aug(x).shape == x.shape


def _xray_like(seed: int, size: int = 96) -> torch.Tensor:
    """A grey (3, S, S) uint8 image with structure at every scale, as the X-rays are."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    plane = 110 + 70 * torch.exp(-((xx - 0.3) ** 2 + yy ** 2) * 4) - 60 * torch.exp(-((xx + 0.4) ** 2 + (yy - 0.2) ** 2) * 9)
    plane = (plane + torch.randn(size, size, generator=g) * 12).clamp(0, 255).to(torch.uint8)
    return plane.expand(3, -1, -1).contiguous()


def test_opencv_affine_samples_the_pixels_torchvision_samples():
    from torchvision.transforms import v2

    from deepcovid.transforms import RandomAffineUint8

    kw = dict(degrees=20, translate=(12 / 96, 12 / 96), scale=(0.7, 1.3))
    ours, ref = RandomAffineUint8(**kw), v2.RandomAffine(**kw)
    colour = torch.randint(0, 256, (3, 96, 96), dtype=torch.uint8, generator=torch.Generator().manual_seed(9))
    differing = []
    for seed in range(40):
        x = _xray_like(seed) if seed % 2 else colour
        torch.manual_seed(seed)
        want = ref(x)
        torch.manual_seed(seed)
        got = ours(x)  # same parameter draws: torchvision makes them in both
        assert got.dtype == torch.uint8 and got.shape == x.shape
        differing.append((got != want).float().mean().item())
    # only exact rounding ties may pick the neighbouring pixel
    assert max(differing) < 2e-3 and np.mean(differing) < 5e-4
    # rotations really happened, and the corners filled with zeros as torchvision fills them
    assert (want == 0).any() and not torch.equal(want, x)
    # anything but a plain uint8 (C, H, W) tensor goes to torchvision's kernel: identical
    xf = colour.float() / 255
    torch.manual_seed(3)
    want = ref(xf)
    torch.manual_seed(3)
    assert torch.equal(ours(xf), want)


def test_grey_colour_jitter_table_equals_torchvision_colour_jitter():
    from torchvision.transforms import v2

    from deepcovid.transforms import GrayAwareColorJitter

    ours = GrayAwareColorJitter(0.5, 0.5, 0.3, 0.1)
    ref = v2.ColorJitter(0.5, 0.5)  # on grey images saturation and hue are skipped by design
    for seed in range(40):
        x = _xray_like(seed)
        torch.manual_seed(seed)
        want = ref(x)
        torch.manual_seed(seed)
        got = ours(x)
        assert torch.equal(got, want), seed
        assert torch.equal(got[0], got[1]) and torch.equal(got[1], got[2])
    assert not torch.equal(want, x)
    # one factor at a time too (the table is built for whichever is on)
    for b, c in ((0.4, 0.0), (0.0, 0.4)):
        torch.manual_seed(1)
        want = v2.ColorJitter(b or None, c or None)(x)
        torch.manual_seed(1)
        assert torch.equal(GrayAwareColorJitter(b, c, 0.0, 0.0)(x), want)
    # a colour image still gets the full torchvision jitter
    colour = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(5)
    want = v2.ColorJitter(0.5, 0.5, 0.3, 0.1)(colour)
    torch.manual_seed(5)
    assert torch.equal(ours(colour), want)


def test_grey_images_augmented_as_one_plane_equal_the_three_plane_run():
    from torchvision.transforms import v2

    aug = build_augment(AugmentConfig(zoom=0.1), 96)
    three_planes = v2.Compose(aug.transforms)  # the same transforms without the one-plane path
    for seed in range(20):
        x = _xray_like(seed)
        torch.manual_seed(seed)
        got = aug(x)
        torch.manual_seed(seed)
        assert torch.equal(got, three_planes(x)), seed
        assert got.shape == (3, 96, 96) and got.is_contiguous()
    colour = torch.randint(0, 256, (3, 96, 96), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(0)
    got = aug(colour)
    torch.manual_seed(0)
    assert torch.equal(got, three_planes(colour)) and not torch.equal(got[0], got[1])


def test_clahe_equalises_each_plane_and_zero_is_off():
    import cv2

    from deepcovid.transforms import check_clahe, equalize_clahe

    grey = _xray_like(0, 64)[0].numpy() // 3 + 60  # a low-contrast X-ray-like plane
    img = np.repeat(grey[..., None], 3, axis=2)
    out = equalize_clahe(img, 2.0)
    want = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8)).apply(grey)
    assert out.dtype == np.uint8 and out.shape == img.shape
    assert all(np.array_equal(out[..., c], want) for c in range(3))
    assert np.ptp(out) > np.ptp(img)  # contrast stretched
    assert equalize_clahe(img, 0.0) is img
    colour = img.copy()
    colour[..., 2] = 255 - colour[..., 2]
    out = equalize_clahe(colour, 2.0)
    assert np.array_equal(out[..., 0], want) and not np.array_equal(out[..., 2], want)
    assert check_clahe(None) == 0.0 and check_clahe("1.5") == 1.5
    for bad in (-1, "x", float("inf")):
        with pytest.raises(ConfigError, match="CLAHE"):
            check_clahe(bad)


def test_clahe_cache_filled_by_threads_equals_one_image_at_a_time(tmp_path):
    from deepcovid.data import decode_for_training

    make_image_folder(tmp_path / "train", {"NORMAL": 24, "PNEUMONIA": 24}, size=96, ext=".png")
    _, samples = discover(tmp_path / "train")
    images = DecodedImages(samples, 64, "memory", workers=4, clahe=2.0)
    for i, s in enumerate(images.samples):
        assert np.array_equal(images.get(i), decode_for_training(s.path, 64, 2.0)), s.path


def test_planar_blur_equals_opencv_blur_of_the_interleaved_image():
    import cv2

    from deepcovid.transforms import RandomGaussianBlur

    x = torch.randint(0, 256, (3, 40, 56), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    torch.manual_seed(0)
    got = RandomGaussianBlur(2.0, 1.0)(x)
    torch.manual_seed(0)
    torch.rand(())  # the probability draw
    sigma = float(torch.empty(()).uniform_(0.1, 2.0))
    want = cv2.GaussianBlur(np.ascontiguousarray(x.permute(1, 2, 0).numpy()), (0, 0), sigma)
    assert torch.equal(got, torch.from_numpy(want).permute(2, 0, 1)) and not torch.equal(got, x)


def test_augmentations_off_is_identity_and_unknown_rejected():
    x = torch.randint(0, 255, (3, 32, 32), dtype=torch.uint8)
    assert torch.equal(build_augment(AugmentConfig.off(), 32)(x), x)
    with pytest.raises(ConfigError, match="unknown augmentation"):
        AugmentConfig.from_dict({"sharpen": 1})


def test_neg_blur_blurs_only_negative_class_images(tmp_path):
    """``neg_blur``: one more blur for label-0 (NORMAL) training images, per image in the loader
    and per batch on the device; label-1 images and a run without it are untouched."""
    from deepcovid.data import XRayDataset
    from deepcovid.transforms import BatchAugment, build_negative_augment

    off = AugmentConfig.off().to_dict()
    assert build_negative_augment(AugmentConfig(**off)) is None
    assert build_negative_augment(AugmentConfig(**{**off, "neg_blur": 2.0})) is None  # p 0: off
    neg = AugmentConfig(**{**off, "neg_blur": 2.0, "neg_blur_p": 1.0})
    make_image_folder(tmp_path / "train", {"NORMAL": 3, "PNEUMONIA": 3}, size=24)
    _, samples = discover(tmp_path / "train")
    imgs = DecodedImages(samples, 24, "memory")
    plain = XRayDataset(imgs, (0.5,) * 3, (0.5,) * 3, normalize=False)
    blurred = XRayDataset(imgs, (0.5,) * 3, (0.5,) * 3, normalize=False, negative_augment=build_negative_augment(neg))
    tv = lambda t: (t[..., 1:].float() - t[..., :-1].float()).abs().mean()  # noqa: E731
    labels = [plain[i][1] for i in range(len(plain))]
    assert sorted(labels) == [0, 0, 0, 1, 1, 1]
    # sigma is drawn in (0.1, 2]: a draw near 0.1 hardly blurs, so the smoothing is asserted on
    # the negatives together, under a fixed seed
    torch.manual_seed(0)
    ratio = sum(tv(blurred[i][0]) for i in range(6) if labels[i] == 0) / sum(tv(plain[i][0]) for i in range(6) if labels[i] == 0)
    assert ratio < 0.8
    assert all(torch.equal(blurred[i][0], plain[i][0]) for i in range(6) if labels[i] == 1)
    # the same on a device batch: only the rows labelled 0 are smoothed
    x = _gray_batch()
    y = torch.tensor([0, 1, 0, 1, 1, 0])
    out = BatchAugment(neg, 32)(x, y) * 255
    assert sum(tv(out[i]) for i in (0, 2, 5)) < 0.8 * sum(tv(x[i]) for i in (0, 2, 5))
    assert all(torch.equal(out[i], x[i].float()) for i in (1, 3, 4))
    with pytest.raises(ValueError, match="needs the batch's labels"):
        BatchAugment(neg, 32)(x)
    for bad, msg in (({"neg_blur_p": 1.5}, "neg_blur_p is a probability"), ({"neg_blur": -1.0}, "neg_blur is a maximum sigma"),
                     ({"blur_p": -0.1}, "blur_p is a probability")):
        with pytest.raises(ConfigError, match=msg):
            AugmentConfig.from_dict(bad)


def test_neg_zoom_zooms_in_on_negative_class_images_only():
    """``neg_zoom``: a zoom in (scale in [1, 1 + neg_zoom]) for label-0 training images, per
    image in the loader and per batch on the device (one resampling with the other geometry);
    label-1 rows are untouched, and with ``neg_blur`` too both apply."""
    from deepcovid.transforms import BatchAugment, RandomGaussianBlur, build_negative_augment

    off = AugmentConfig.off().to_dict()
    assert build_negative_augment(AugmentConfig(**{**off, "neg_zoom": 0.3})) is None  # p 0: off
    neg = AugmentConfig(**{**off, "neg_zoom": 0.5, "neg_zoom_p": 1.0})
    x = torch.zeros(3, 64, 64, dtype=torch.uint8)
    x[:, 16:48, 16:48] = 200  # a centred square: zooming in makes it larger
    torch.manual_seed(0)
    grown = [int((build_negative_augment(neg)(x) > 0).sum()) for _ in range(8)]
    assert min(grown) >= int((x > 0).sum()) and max(grown) > 1.3 * int((x > 0).sum())
    both = build_negative_augment(AugmentConfig(**{**neg.to_dict(), "neg_blur": 2.0, "neg_blur_p": 1.0}))
    assert [type(t).__name__ for t in both.transforms] == ["RandomApply", RandomGaussianBlur.__name__]
    # on a device batch, with the preset's own flips on: only the rows labelled 0 grow
    xb = x.expand(6, -1, -1, -1).contiguous()
    y = torch.tensor([0, 1, 0, 1, 1, 0])
    out = BatchAugment(AugmentConfig(**{**neg.to_dict(), "hflip": 0.5}), 64)(xb, y)
    area = (out > 0).flatten(1).sum(1)
    assert all(int(area[i]) > int((x > 0).sum()) for i in (0, 2, 5))
    assert all(torch.equal(out[i] * 255, xb[i].float()) for i in (1, 3, 4))  # a symmetric square: flips change nothing
    with pytest.raises(ValueError, match="needs the batch's labels"):
        BatchAugment(neg, 64)(xb)
    for bad, msg in (({"neg_zoom_p": 1.5}, "neg_zoom_p is a probability"), ({"neg_zoom": -0.1}, "neg_zoom is how far")):
        with pytest.raises(ConfigError, match=msg):
            AugmentConfig.from_dict(bad)


def test_normalize_and_hsv():
    x = torch.tensor([[[255]], [[0]], [[0]]], dtype=torch.uint8)  # pure red
    assert torch.allclose(rgb_to_hsv(x.float() / 255).flatten(), torch.tensor([0.0, 1.0, 1.0]))
    y = normalize(x, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert torch.allclose(y.flatten(), torch.tensor([1.0, -1.0, -1.0]))
    with pytest.raises(ConfigError):
        normalize(x, (0, 0, 0), (1, 1, 1), "lab")


@pytest.mark.realdata
def test_real_folder_discovery_and_patient_split():
    root = shared_data_or_skip()
    s = load_splits(root, val_fraction=0.1, seed=0)
    from deepcovid.data import counts

    total = counts(s.train + s.val, s.classes)
    assert total == {"NORMAL": 1341, "PNEUMONIA": 3875}
    assert {x.patient for x in s.train}.isdisjoint({x.patient for x in s.val})
    assert 0.07 < len(s.val) / 5216 < 0.13
    assert counts(s.test, s.classes) == {"NORMAL": 117, "PNEUMONIA": 195}


def test_uint8_loader_batches_normalised_on_the_device_match_the_per_image_path(tmp_path):
    from deepcovid.data import XRayDataset
    from deepcovid.training import batch_normalizer

    make_image_folder(tmp_path / "train", {"NORMAL": 3, "PNEUMONIA": 3}, size=24)
    _, samples = discover(tmp_path / "train")
    imgs = DecodedImages(samples, 24, "memory")
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    for cs in ("rgb", "hsv"):
        per_image = XRayDataset(imgs, mean, std, cs)
        raw = XRayDataset(imgs, mean, std, cs, normalize=False)
        x, label = raw[2]
        assert x.dtype == torch.uint8 and x.shape == (3, 24, 24) and label == per_image[2][1]
        batch = torch.stack([raw[i][0] for i in range(len(raw))])
        out = batch_normalizer(mean, std, cs)(batch)
        ref = torch.stack([per_image[i][0] for i in range(len(per_image))])
        assert out.dtype == torch.float32 and torch.allclose(out, ref, atol=1e-6)


@pytest.mark.parametrize("cache", ["memory", "disk"])
def test_device_batches_cover_the_split_once_per_epoch(tmp_path, cache):
    from deepcovid.data import DecodedImages, DeviceBatches, discover

    _, samples = discover(make_image_folder(tmp_path / "train", {"NORMAL": 6, "PNEUMONIA": 5}, size=24))
    images = DecodedImages(samples, 16, cache, cache_dir=tmp_path / "c")
    x = images.copy_to(torch.device("cpu"))
    assert x.shape == (11, 3, 16, 16) and x.dtype == torch.uint8
    assert all(torch.equal(x[i], torch.from_numpy(images.get(i)).permute(2, 0, 1)) for i in range(11))
    g = torch.Generator().manual_seed(0)
    keep = DeviceBatches(images, 4, torch.device("cpu"), generator=g, drop_last=False)
    epochs = [list(keep), list(keep)]
    assert len(keep) == 3 and [len(b[0]) for b in epochs[0]] == [4, 4, 3]
    firsts = []
    for batches in epochs:
        xs = torch.cat([b[0] for b in batches])
        ys = torch.cat([b[1] for b in batches])
        # every image exactly once, with its own label
        rows = [next(i for i in range(11) if torch.equal(x[i], img)) for img in xs]
        assert sorted(rows) == list(range(11))
        assert ys.tolist() == [images.samples[i].label for i in rows]  # each image with its own label
        firsts.append(xs)
    assert not torch.equal(firsts[0], firsts[1])  # reshuffled each epoch
    drop = DeviceBatches(images, 4, torch.device("cpu"), generator=g, drop_last=True)
    assert len(drop) == 2 and [len(b[0]) for b in drop] == [4, 4]
    # --balance sampler: draws with replacement by weight; weight 0 never drawn
    labels = np.array([s.label for s in images.samples])
    w = (labels == labels[0]).astype(float)
    ys = torch.cat([b[1] for b in DeviceBatches(images, 4, torch.device("cpu"), generator=g, weights=w, drop_last=False)])
    assert len(ys) == 11 and set(ys.tolist()) == {images.samples[0].label}
    with pytest.raises(ConfigError, match="--cache disk or memory"):
        DecodedImages(samples, 16, "off").copy_to(torch.device("cpu"))


def _gray_batch(n=6, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 1, size, size), generator=g, dtype=torch.uint8)
    return x.repeat(1, 3, 1, 1)


def test_batch_augment_matches_the_per_image_definitions():
    from deepcovid.transforms import BatchAugment

    x = _gray_batch()
    off = AugmentConfig.off()
    assert torch.equal(BatchAugment(off, 32)(x) * 255, x.float())
    assert torch.equal(BatchAugment(AugmentConfig(**{**off.to_dict(), "hflip": 1.0}), 32)(x) * 255, x.float().flip(-1))
    assert torch.equal(BatchAugment(AugmentConfig(**{**off.to_dict(), "vflip": 1.0}), 32)(x) * 255, x.float().flip(-2))
    # shift: each image moves by whole pixels within +-4, zero filled, drawn per image
    torch.manual_seed(0)
    y = BatchAugment(AugmentConfig(**{**off.to_dict(), "shift": 4}), 32)(x) * 255
    shifts = []
    for i in range(len(x)):
        src = x[i].float()
        for dy in range(-4, 5):
            for dx in range(-4, 5):
                ref = torch.zeros_like(src)
                ref[:, max(dy, 0):32 + min(dy, 0), max(dx, 0):32 + min(dx, 0)] = \
                    src[:, max(-dy, 0):32 + min(-dy, 0), max(-dx, 0):32 + min(-dx, 0)]
                if torch.equal(ref, y[i]):
                    shifts.append((dy, dx))
    assert len(shifts) == len(x) and len(set(shifts)) > 1
    # brightness: one factor per image, within [0.8, 1.2]
    torch.manual_seed(1)
    y = BatchAugment(AugmentConfig(**{**off.to_dict(), "brightness": 0.2}), 32)(torch.full((6, 3, 8, 8), 100, dtype=torch.uint8)) * 255
    f = y[:, 0, 0, 0] / 100
    assert ((f >= 0.8) & (f <= 1.2)).all() and len(set(f.tolist())) == 6 and (y == y[:, :1, :1, :1]).all()
    # contrast keeps the mean of a grey image and scales its spread
    torch.manual_seed(2)
    img = _gray_batch(4).float()
    y = BatchAugment(AugmentConfig(**{**off.to_dict(), "contrast": 0.2}), 32)(img.to(torch.uint8)) * 255
    assert torch.allclose(y.mean((1, 2, 3)), img.mean((1, 2, 3)), rtol=0.03)
    # blur with p 1 smooths every image; p 0 is the identity
    smooth = BatchAugment(AugmentConfig(**{**off.to_dict(), "blur": 2.0, "blur_p": 1.0}), 32)(x) * 255
    tv = lambda t: (t[..., 1:] - t[..., :-1]).abs().mean((1, 2, 3))  # noqa: E731
    assert (tv(smooth) < 0.8 * tv(x.float())).all()
    assert torch.equal(BatchAugment(AugmentConfig(**{**off.to_dict(), "blur": 2.0, "blur_p": 0.0}), 32)(x) * 255, x.float())


def _erased_box(img: torch.Tensor) -> tuple[int, int, float]:
    """(height, width, share of the image) of the black part of a once-uniform grey image; it
    must be one filled rectangle, the same on every plane."""
    black = img == 0
    assert torch.equal(black[0], black[1]) and torch.equal(black[1], black[2])
    rows, cols = torch.nonzero(black[0].any(1)).flatten(), torch.nonzero(black[0].any(0)).flatten()
    if len(rows) == 0:
        return 0, 0, 0.0
    h, w = int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)
    assert int(black[0].sum()) == h * w  # a filled rectangle
    return h, w, h * w / black[0].numel()


@pytest.mark.parametrize("path", ["loader", "device"])
def test_random_erasing_blacks_out_one_rectangle_of_2_to_33_percent(path):
    from deepcovid.transforms import BatchAugment

    off = AugmentConfig.off().to_dict()
    x = torch.full((200, 3, 32, 32), 200, dtype=torch.uint8)

    def run(p):
        cfg = AugmentConfig(**{**off, "erase": p})
        if path == "loader":
            aug = build_augment(cfg, 32)
            return torch.stack([aug(img) for img in x])
        return (BatchAugment(cfg, 32)(x) * 255).round().to(torch.uint8)

    torch.manual_seed(0)
    boxes = [_erased_box(img) for img in run(1.0)]
    shares = [s for _, _, s in boxes]
    # every image erased, within torchvision's area range (sides round to whole pixels)
    assert min(shares) >= 0.015 and max(shares) <= 0.37
    assert len({(h, w) for h, w, _ in boxes}) > 50  # drawn per image
    assert torch.equal(run(0.0), x)
    torch.manual_seed(1)
    erased = sum(_erased_box(img)[2] > 0 for img in run(0.5))
    assert 70 <= erased <= 130  # p = 0.5 of 200


@pytest.mark.parametrize("color_space", ["rgb", "hsv"])
def test_device_path_without_augmentation_gives_the_loader_path_input(color_space):
    """What the model sees from --augment-on device equals the per-image loader path's input
    (guards the 0-1 scale that ``normalize`` takes)."""
    from deepcovid.training import batch_normalizer
    from deepcovid.transforms import BatchAugment

    x = _gray_batch(3)
    x[:, 0] //= 2  # one colour image batch too: hsv needs real colours
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    device_path = batch_normalizer(mean, std, color_space)(BatchAugment(AugmentConfig.off(), 32)(x))
    loader_path = torch.stack([normalize(img, mean, std, color_space) for img in x])
    assert torch.allclose(device_path, loader_path, atol=1e-5)


def test_batch_augment_draws_per_image_keeps_grey_grey_and_colours_colour_images():
    from deepcovid.transforms import BatchAugment

    torch.manual_seed(0)
    x = _gray_batch(1).repeat(8, 1, 1, 1)
    y = BatchAugment(AugmentConfig(), 32)(x)
    assert y.dtype == torch.float32 and y.shape == x.shape and 0 <= y.min() and y.max() <= 1  # normalize() takes [0, 1]
    assert len({tuple(v.flatten().tolist()) for v in y}) == 8  # eight different augmentations of one image
    assert torch.equal(y[:, 0], y[:, 1]) and torch.equal(y[:, 1], y[:, 2])  # saturation/hue skip grey images
    colour = x.clone()
    colour[:, 0] = colour[:, 0] // 2  # a tinted image: hue/saturation apply to it
    cfg = AugmentConfig(**{**AugmentConfig.off().to_dict(), "hue": 0.5})
    out = BatchAugment(cfg, 32)(colour)
    assert not torch.equal(out * 255, colour.float()) and 0 <= out.min() and out.max() <= 1.0001
    with pytest.raises(ValueError, match="B, 3, S, S"):
        BatchAugment(cfg, 32)(colour[0])
