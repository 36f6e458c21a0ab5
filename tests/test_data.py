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
    "saturation": {"saturation": 0.9}, "hue": {"hue": 0.3}, "zoom": {"zoom": 0.3},
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


def test_augmentations_off_is_identity_and_unknown_rejected():
    x = torch.randint(0, 255, (3, 32, 32), dtype=torch.uint8)
    assert torch.equal(build_augment(AugmentConfig.off(), 32)(x), x)
    with pytest.raises(ConfigError, match="unknown augmentation"):
        AugmentConfig.from_dict({"sharpen": 1})


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
