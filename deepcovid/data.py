"""Datasets: discovery of ``ROOT/{train,val,test}/<CLASS>/*``, patient ids, the patient-grouped
validation split, and the decoded-image cache.

The decoded cache decodes and resizes every image once into a memory-mapped uint8 array
(N, S, S, 3), keyed by a fingerprint of the file list (path, size, mtime) and the input size,
so an edited or added image invalidates it. Training then augments uint8 tensors with
torchvision transforms v2 instead of decoding JPEGs every epoch. Decoding also validates:
unreadable files are reported by path and dropped, once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .errors import ConfigError, DataError, InvalidImageError
from .progress import progress

log = logging.getLogger("deepcovid")

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".dcm", ".dicom"})
MIN_VAL_IMAGES = 100
CACHE_MODES = ("disk", "memory", "off")

_PERSON = re.compile(r"^(person\d+)_", re.IGNORECASE)
_IM = re.compile(r"^((?:[A-Za-z0-9]+-)?IM-\d+)-\d+", re.IGNORECASE)


@dataclass(frozen=True)
class Sample:
    path: str
    label: int
    patient: str


def patient_id(path: str | os.PathLike) -> str:
    """Kermany-style patient id: ``person123_bacteria_456`` -> ``person123``; ``IM-0115-0001`` ->
    ``IM-0115``; ``NORMAL2-IM-1427-0001`` -> ``NORMAL2-IM-1427``; otherwise the file's stem."""
    stem = Path(path).stem
    m = _PERSON.match(stem) or _IM.match(stem)
    return m.group(1) if m else stem


def positive_class_of(classes: list[str], override: str | None = None) -> str | None:
    """Two classes: the one that is not NORMAL (case-insensitive), unless ``override`` names one."""
    if override:
        if override not in classes:
            raise ConfigError(f"--positive-class {override!r} is not one of the classes {classes}")
        return override
    if len(classes) != 2:
        return None
    others = [c for c in classes if c.upper() != "NORMAL"]
    if len(others) != 1:
        raise ConfigError(f"cannot tell the positive class of {classes}: name it with --positive-class")
    return others[0]


def order_classes(classes: list[str], positive: str | None) -> list[str]:
    """Two classes are stored [negative, positive] so label 1 / the single logit is positive."""
    if positive is None:
        return sorted(classes)
    return [c for c in sorted(classes) if c != positive] + [positive]


def list_class_folder(split_dir: Path) -> dict[str, list[Path]]:
    if not split_dir.is_dir():
        raise DataError(f"{split_dir} is not a folder")
    out = {}
    for d in sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        out[d.name] = sorted(
            f for f in d.rglob("*") if f.is_file() and not f.name.startswith(".") and f.suffix.lower() in IMAGE_EXTENSIONS
        )
    return out


def discover(split_dir: Path, classes: list[str] | None = None) -> tuple[list[str], list[Sample]]:
    """Samples of one split. With ``classes`` given (from train), the folder must use those names."""
    split_dir = Path(split_dir)
    found = list_class_folder(split_dir)
    if not found:
        raise DataError(f"{split_dir} holds no class folders; expected {split_dir}/<CLASS>/<images>")
    if classes is None:
        empty = [c for c, files in found.items() if not files]
        if empty:
            raise DataError(f"class folder(s) {', '.join(str(split_dir / c) for c in empty)} hold no images "
                            f"(supported: {', '.join(sorted(IMAGE_EXTENSIONS))})")
        if len(found) < 2:
            raise DataError(f"{split_dir} has only one class ({', '.join(found)}); need at least two class folders")
        classes = sorted(found)
    else:
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise DataError(f"{split_dir} has class folder(s) {unknown} that the training data does not have ({classes})")
    samples = [Sample(str(f), classes.index(c), patient_id(f)) for c in classes for f in found.get(c, [])]
    if not samples:
        raise DataError(f"{split_dir} holds no images")
    return classes, samples


def counts(samples: list[Sample], classes: list[str]) -> dict[str, int]:
    c = np.bincount([s.label for s in samples], minlength=len(classes))
    return {name: int(c[i]) for i, name in enumerate(classes)}


def split_by_patient(samples: list[Sample], val_fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Stratified, patient-grouped split (scikit-learn's StratifiedGroupKFold, one fold as validation)."""
    from sklearn.model_selection import StratifiedGroupKFold

    if not 0 < val_fraction < 0.5:
        raise ConfigError(f"--val-fraction must be in (0, 0.5), got {val_fraction}")
    n_splits = max(2, round(1 / val_fraction))
    labels = np.array([s.label for s in samples])
    groups = np.array([s.patient for s in samples])
    if len(np.unique(groups)) < n_splits:
        raise DataError(f"only {len(np.unique(groups))} patients: too few for a {val_fraction:.0%} patient-level validation split")
    sgkf = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    train_idx, val_idx = next(sgkf.split(np.zeros(len(samples)), labels, groups))
    return [samples[i] for i in train_idx], [samples[i] for i in val_idx]


@dataclass
class DatasetSplits:
    root: Path
    classes: list[str]
    positive_class: str | None
    train: list[Sample]
    val: list[Sample]
    test: list[Sample] | None
    val_source: str  # "val/" or "carved from train/ (10%, patient-grouped)"

    def describe(self) -> dict:
        return {
            "root": str(Path(self.root).resolve()),  # --resume may run from another folder
            "classes": self.classes,
            "train_counts": counts(self.train, self.classes),
            "val_counts": counts(self.val, self.classes),
            "test_counts": counts(self.test, self.classes) if self.test else None,
            "val_source": self.val_source,
            "fingerprint": fingerprint(self.train + self.val),
        }


def load_splits(root: Path, *, val_fraction: float = 0.1, seed: int = 0, positive_class: str | None = None) -> DatasetSplits:
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist")
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise DataError(f"{root} has no train/ folder; expected {root}/train/<CLASS>/<images>")
    classes, train = discover(train_dir)
    positive = positive_class_of(classes, positive_class)
    ordered = order_classes(classes, positive)
    if ordered != classes:
        classes, train = discover(train_dir, ordered)
    val = None
    val_source = ""
    if (root / "val").is_dir():
        try:
            _, val = discover(root / "val", classes)
        except DataError:
            val = None
        if val is not None and len(val) >= MIN_VAL_IMAGES:
            val_source = "val/"
        else:
            log.info("val/ has %d images (< %d): carving validation from train/ instead", len(val or []), MIN_VAL_IMAGES)
            val = None
    if val is None:
        train, val = split_by_patient(train, val_fraction, seed)
        val_source = f"carved from train/ ({val_fraction:.0%}, stratified, grouped by patient, seed {seed})"
        overlap = {s.patient for s in train} & {s.patient for s in val}
        assert not overlap, f"patient leak: {sorted(overlap)[:5]}"  # guaranteed by StratifiedGroupKFold
    test = None
    if (root / "test").is_dir():
        _, test = discover(root / "test", classes)
    return DatasetSplits(root, classes, positive, train, val, test, val_source)


def fingerprint(samples: list[Sample]) -> str:
    """Hash of the file list with sizes and mtimes: any edited, added or removed file changes it."""
    h = hashlib.sha256()
    for s in sorted(samples, key=lambda s: s.path):
        try:
            st = os.stat(s.path)
            h.update(f"{s.path}\0{st.st_size}\0{st.st_mtime_ns}\0{s.label}\n".encode())
        except OSError:
            h.update(f"{s.path}\0missing\n".encode())
    return h.hexdigest()[:16]


def decode_for_training(path: str, size: int, clahe: float = 0.0) -> np.ndarray:
    """Decode and resize one image to a (S, S, 3) uint8 array (the cache's unit), equalised
    by CLAHE with clip limit ``clahe`` when it is not 0."""
    from .imageio import load_image, resize_square, to_uint8
    from .transforms import equalize_clahe

    img = load_image(path, target_size=size)
    arr = resize_square(img.pixels, size)
    return equalize_clahe(to_uint8(arr), clahe)


def default_cache_dir() -> Path:
    base = os.environ.get("DEEPCOVID_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "deepcovid")
    return Path(base)


def _decode_all(samples: list[Sample], size: int, out: np.ndarray, desc: str, workers: int, clahe: float = 0.0) -> list[int]:
    """Decode every sample into ``out``; return indices of unreadable files (reported by path)."""
    bad: list[int] = []
    log.info("%s: %d images at %d px (once; later runs reuse the cache)", desc, len(samples), size)

    def work(i: int):
        try:
            out[i] = decode_for_training(samples[i].path, size, clahe)
            return None
        except InvalidImageError as exc:
            return i, str(exc)

    # Threads, not processes: PIL and OpenCV release the GIL while decoding and resizing.
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for res in progress(pool.map(work, range(len(samples))), total=len(samples), desc=desc, unit="img",
                        leave=False):
            if res is not None:
                i, msg = res
                bad.append(i)
                log.warning("skipping unreadable image %s: %s", samples[i].path, msg)
    return bad


class DecodedImages:
    """uint8 (N, S, S, 3) images for a list of samples, decoded once.

    ``mode``: 'disk' (memory-mapped .npy under ``cache_dir``, reused across runs while the
    fingerprint matches), 'memory' (decoded once per process), 'off' (decode every access; the
    baseline the benchmark compares against). Unreadable files are dropped from ``samples``.
    ``clahe``: the CLAHE clip limit of the model's preprocessing (0: none); part of the key.
    """

    def __init__(self, samples: list[Sample], size: int, mode: str = "disk", cache_dir: Path | None = None,
                 workers: int | None = None, desc: str = "decoding", clahe: float = 0.0):
        from .transforms import check_clahe

        if mode not in CACHE_MODES:
            raise ConfigError(f"--cache must be one of {CACHE_MODES}, got {mode!r}")
        self.size = size
        self.clahe = check_clahe(clahe)
        self.mode = mode
        workers = workers or min(4, os.cpu_count() or 1)
        self.array: np.ndarray | None = None
        if mode == "off":
            # Still validate once, so a corrupt file is reported and skipped, never crashes an epoch.
            scratch = np.empty((1, size, size, 3), np.uint8)
            bad = []
            for i, s in enumerate(samples):
                try:
                    scratch[0] = decode_for_training(s.path, size, self.clahe)
                except InvalidImageError as exc:
                    bad.append(i)
                    log.warning("skipping unreadable image %s: %s", s.path, exc)
            self.samples = [s for i, s in enumerate(samples) if i not in set(bad)]
            self.bad = [samples[i].path for i in bad]
            return
        if mode == "memory":
            arr = np.empty((len(samples), size, size, 3), np.uint8)
            bad = _decode_all(samples, size, arr, desc, workers, self.clahe)
            keep = np.setdiff1d(np.arange(len(samples)), bad)
            self.array = arr[keep] if bad else arr
            self.samples = [samples[i] for i in keep]
            self.bad = [samples[i].path for i in bad]
            return
        cache_dir = Path(cache_dir or default_cache_dir())
        cache_dir.mkdir(parents=True, exist_ok=True)
        key = f"{fingerprint(samples)}-{size}" + (f"-clahe{self.clahe:g}" if self.clahe else "")
        data_path = cache_dir / f"decoded-{key}.npy"
        index_path = cache_dir / f"decoded-{key}.json"
        index = None
        if data_path.is_file() and index_path.is_file():
            try:
                index = json.loads(index_path.read_text())
                self.array = np.load(data_path, mmap_mode="r")
                if index.get("paths") != [s.path for s in samples] or self.array.shape[1:] != (size, size, 3):
                    index = None
            except (OSError, ValueError, json.JSONDecodeError):
                index = None
        if index is None:
            tmp = cache_dir / f".decoded-{key}.{os.getpid()}.npy"
            arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(samples), size, size, 3))
            bad = _decode_all(samples, size, arr, desc, workers, self.clahe)
            arr.flush()
            del arr
            os.replace(tmp, data_path)  # only a complete cache ever gets the real name
            index = {"paths": [s.path for s in samples], "bad": bad, "size": size}
            tmp_idx = index_path.with_name(index_path.name + f".{os.getpid()}.tmp")
            tmp_idx.write_text(json.dumps(index))
            os.replace(tmp_idx, index_path)
            self.array = np.load(data_path, mmap_mode="r")
        bad = set(index["bad"])
        for i in sorted(bad):
            log.warning("skipping unreadable image %s", samples[i].path)
        self._rows = np.array([i for i in range(len(samples)) if i not in bad], dtype=np.int64)
        self.samples = [samples[i] for i in self._rows]
        self.bad = [samples[i].path for i in sorted(bad)]

    def __len__(self) -> int:
        return len(self.samples)

    def copy_to(self, device: torch.device, chunk: int = 512) -> torch.Tensor:
        """All readable images as one uint8 (N, 3, S, S) tensor on ``device`` (channels_last
        strides: the (N, S, S, 3) bytes as they are), copied in chunks so that a memory-mapped
        cache is never read whole into host memory first."""
        if self.mode == "off":
            raise ConfigError("the images must be decoded once (--cache disk or memory) to keep them on the device")
        n, s = len(self), self.size
        out = torch.empty((n, s, s, 3), dtype=torch.uint8, device=device)
        rows = self._rows if self.mode == "disk" else np.arange(n)
        for lo in range(0, n, chunk):
            part = np.ascontiguousarray(self.array[rows[lo:lo + chunk]])
            out[lo:lo + len(part)].copy_(torch.from_numpy(part))
        return out.permute(0, 3, 1, 2)

    def get(self, i: int) -> np.ndarray:
        if self.mode == "off":
            return decode_for_training(self.samples[i].path, self.size, self.clahe)
        if self.mode == "disk":
            return np.array(self.array[self._rows[i]])  # a writable copy, off the memory map
        return self.array[i]


class XRayDataset(Dataset):
    """(image tensor (3,S,S), label) pairs from ``DecodedImages``: normalised float, or with
    ``normalize=False`` the augmented uint8 image, for the training loop to normalise a whole
    batch on the device (a quarter of the bytes through the loader's shared memory and the
    host-to-device copy; benchmarks/bench_gpu.py)."""

    def __init__(self, images: DecodedImages, mean, std, color_space: str = "rgb", augment=None,
                 normalize: bool = True, negative_augment=None):
        self.images = images
        self.negative_augment = negative_augment  # applied first, to label-0 images only
        self.mean, self.std, self.color_space = mean, std, color_space
        self.augment = augment
        self.normalize = normalize
        self.labels = [s.label for s in images.samples]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        from .transforms import normalize

        x = torch.from_numpy(np.ascontiguousarray(self.images.get(i))).permute(2, 0, 1)
        if self.negative_augment is not None and self.labels[i] == 0:
            x = self.negative_augment(x)
        if self.augment is not None:
            x = self.augment(x)
        if not self.normalize:
            return x.contiguous(), self.labels[i]
        return normalize(x, self.mean, self.std, self.color_space), self.labels[i]


class DeviceBatches:
    """Training batches drawn from images kept on the device: the whole decoded train split is
    copied there once, and each epoch is a permutation of it, indexed where the model runs.

    On CUDA this replaces the DataLoader's worker processes, shared-memory transfers and
    host-to-device copies (benchmarks/bench_gpu.py); the augmentation then runs on the batch
    (``transforms.BatchAugment``, given as ``augment``). Yields uint8 (B, 3, S, S) batches, or
    with ``augment`` its float ones, and their labels, with the
    loader's semantics: a fresh shuffle per epoch from ``generator``, or with ``weights`` a
    class-balanced draw with replacement (``--balance sampler``), and ``drop_last``.
    ``dataset`` is the per-image dataset of the same images, for the paths that cache features.
    """

    def __init__(self, images: DecodedImages, batch_size: int, device: torch.device, *, generator: torch.Generator,
                 drop_last: bool = True, weights: np.ndarray | None = None, dataset=None, augment=None):
        self.augment = augment  # augment(x, labels) -> the augmented batch (``transforms.BatchAugment``)
        self.x = images.copy_to(device)
        self.y = torch.as_tensor([s.label for s in images.samples], device=device)
        self.batch_size, self.drop_last, self.generator = int(batch_size), bool(drop_last), generator
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.double)
        self.dataset = dataset

    def __len__(self) -> int:
        n = len(self.y)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        n = len(self.y)
        if self.weights is None:
            order = torch.randperm(n, generator=self.generator)
        else:
            order = torch.multinomial(self.weights, n, replacement=True, generator=self.generator)
        order = order.to(self.x.device)
        for b in range(len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            x, y = self.x[idx], self.y[idx]
            yield (x if self.augment is None else self.augment(x, y)), y
