"""Torch datasets for MVTec AD, MVTec LOCO AD, VisA, MPDD, a generic folder layout and the generated dataset.

Every dataset is an :class:`AnomalyDataset` over a resolved, sorted index (a pandas DataFrame with columns
``image_path, mask_path, label, defect_type, category, split``); ``__getitem__`` returns the data contract::

    {"image": (3, H, W) float (ImageNet-normalised), "label": 0 | 1, "mask": (1, H, W) float in {0, 1},
     "path": str, "category": str, "defect_type": str ("good" for normal images)}

:func:`make_splits` builds train, val (carved from ``train/good`` with a seed; MVTec LOCO uses
``validation/good``) and test, and can save the resolved index as CSV with the run. Only train is ever
augmented, and only when asked (``DataConfig.augment_policy="table"`` or an explicit ``augment``): the default
is one recipe for every category, no augmentation. Training-free methods fit on
:attr:`Splits.train_unaugmented`.

Bad data fails before training. :func:`build_index` checks every file (:func:`check_index`): image
headers, the pixel limit ``DataConfig.max_image_pixels``, and the masks of defect images by the mask rule of
:mod:`mudenet_core.data.images` (background 0, a label mask, not empty); ``DataConfig.strict`` makes a bad
mask a :class:`DataError` (default) or a :class:`DataWarning`. :func:`make_splits` then decodes every image
once (``DataConfig.preload``) and keeps the resized tensors in memory, so a corrupt file fails there, with
the file's name, and ``__getitem__`` reads no file afterwards.

Example:
    >>> import tempfile
    >>> from mudenet_core.data import synthetic
    >>> root = synthetic.generate(tempfile.mkdtemp(), categories=["plate"], image_size=32, n_train=5,
    ...                           n_test_good=1, n_test_per_defect=1, seed=0)
    >>> s = make_splits(DataConfig(dataset="synthetic", root=str(root), category="plate", image_size=32,
    ...                            val_fraction=0.2))
    >>> len(s.train), len(s.val), len(s.test)
    (4, 1, 6)
    >>> x = s.test[0]; tuple(x["image"].shape), tuple(x["mask"].shape), x["defect_type"], x["label"]
    ((3, 32, 32), (1, 32, 32), 'color', 1)
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from mudenet_core.config import ConfigBase, ConfigError, bounded, nonnegative
from mudenet_core.data.images import (
    MAX_IMAGE_PIXELS,
    DataError,
    DataWarning,
    binarize_mask,
    check_image,
    image_size,
    list_images,
    load_image,
    load_mask,
    mask_problem,
)
from mudenet_core.data.transforms import (
    AugmentConfig,
    augment,
    augment_for,
    derive_seed,
    normalize,
    resize_image,
    resize_mask,
    to_tensor,
)
from mudenet_core.io import load_json, save_csv
from mudenet_core.utils import progress

DatasetName = Literal["synthetic", "mvtec_ad", "mvtec_loco", "visa", "mpdd", "folder"]

MVTEC_AD_CATEGORIES = ("bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
                       "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper")
MVTEC_LOCO_CATEGORIES = ("breakfast_box", "juice_bottle", "pushpins", "screw_bag", "splicing_connectors")
VISA_CATEGORIES = ("candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2", "pcb1",
                   "pcb2", "pcb3", "pcb4", "pipe_fryum")
MPDD_CATEGORIES = ("bracket_black", "bracket_brown", "bracket_white", "connector", "metal_plate", "tubes")
INDEX_COLUMNS = ["image_path", "mask_path", "label", "defect_type", "category", "split"]
SPLIT_ORDER = {"train": 0, "val": 1, "test": 2}


@dataclasses.dataclass(frozen=True)
class DataConfig(ConfigBase):
    """Which dataset and category to load, at which size, and how to split and augment it."""

    dataset: DatasetName = "synthetic"  # dataset layout
    root: str = ""  # dataset root (holds the category folders); "" = the generated dataset (default root)
    category: str = "plate"  # category (object/texture) folder name
    image_size: int = bounded(256, ge=8)  # square side H = W after resizing
    normalize: bool = True  # ImageNet mean/std normalisation of "image"
    # fraction of train/good held out for validation (ignored by mvtec_loco)
    val_fraction: float = bounded(0.1, ge=0, lt=1)
    split_seed: int = nonnegative(0)  # seed of the train/val (and folder test) split
    # "none": no training augmentation, the same for every category (our protocol's default); "table": the
    # opt-in per-category table configs/augment/<dataset>.yaml (our choices, not the paper's)
    augment_policy: Literal["none", "table"] = "none"
    augment: AugmentConfig | None = None  # explicit training augmentation for this run; wins over the policy
    # check every file when indexing: headers (decodable, within max_image_pixels, mask size == image size)
    # and defect images' masks (mask rule of mudenet_core.data.images: background 0, label mask, non-empty)
    validate: bool = True
    strict: bool = True  # a mask breaking the mask rule is a DataError; False: a DataWarning, mask still used
    # decode every image once when the splits are made (a corrupt file fails then, before any training) and
    # keep the resized image and mask in memory; False: read files in __getitem__ (data too big for memory)
    preload: bool = True
    # preload cache: "exact" keeps uint8 where that is exact (8-bit images already at image_size), else
    # float32 (items bit-identical to reading the files; ~0.8 MB per 256 px image); "uint8": always uint8
    # (4x smaller; resized pixels rounded to steps of 1/255)
    preload_dtype: Literal["exact", "uint8"] = "exact"
    # refuse images with more pixels (width x height); 0 = no limit
    max_image_pixels: int = nonnegative(MAX_IMAGE_PIXELS)
    # decode large images at a reduced scale that still covers image_size (JPEG: codec draft, others: integer
    # box-averaging): bounded memory for high-resolution images; pixels differ slightly from a full decode
    reduce_on_load: bool = False
    folder_normal_dir: str = "good"  # folder dataset: normal images (relative to root, or absolute)
    folder_anomaly_dir: str = ""  # folder dataset: anomalous test images ("" = none)
    folder_mask_dir: str = ""  # folder dataset: masks named <stem><suffix>.<ext> ("" = no masks)
    folder_mask_suffix: str = ""  # folder dataset: e.g. "_mask" for 000_mask.png
    folder_test_normal_dir: str = ""  # folder dataset: normal test images ("" = hold some normals out)
    # folder dataset: fraction of normal images held out for test
    folder_test_fraction: float = bounded(0.2, ge=0, lt=1)

    def __post_init__(self):
        if isinstance(self.augment, dict):  # DataConfig(augment={...}) as well as from_dict
            object.__setattr__(self, "augment", AugmentConfig.from_dict(self.augment))
        super().__post_init__()  # declared bounds and Literal choices
        for name in ("strict", "preload", "reduce_on_load"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"DataConfig.{name} must be True or False, got {getattr(self, name)!r}")
        if self.preload_dtype not in ("exact", "uint8"):
            raise ConfigError(
                f"DataConfig.preload_dtype must be 'exact' or 'uint8', got {self.preload_dtype!r}")
        px = self.max_image_pixels
        if isinstance(px, bool) or not isinstance(px, int | np.integer) or px < 0:
            raise ConfigError(
                f"DataConfig.max_image_pixels must be an integer >= 0 (0 = no limit), got {px!r}")

    def resolved_augment(self) -> AugmentConfig:
        """``augment`` if set; else none (policy "none") or the category's table entry (policy "table").

        Example:
            >>> DataConfig(category="weave").resolved_augment().is_identity
            True
            >>> DataConfig(category="weave", augment_policy="table").resolved_augment().hflip
            True
        """
        if self.augment is not None:
            return self.augment
        if self.augment_policy == "table":
            return augment_for(self.dataset, self.category)
        return AugmentConfig()


# ------------------------------------------------------------------------------------------- index builders
def _rows_to_index(rows: list[dict], extra: tuple[str, ...] = ()) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=INDEX_COLUMNS + list(extra))
    df["label"] = df["label"].astype(int)
    df["_order"] = df["split"].map(SPLIT_ORDER)
    df = df.sort_values(["_order", "image_path"], kind="stable").drop(columns="_order").reset_index(drop=True)
    return df


def _row(image, mask, label: int, defect_type: str, category: str, split: str, **extra) -> dict:
    return dict(image_path=str(image), mask_path=str(mask), label=int(label), defect_type=defect_type,
                category=category, split=split, **extra)


def _category_dir(root: str | Path, category: str, dataset: str) -> Path:
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"{dataset}: dataset root not found: {root}")
    cat = root / category
    if not cat.is_dir():
        found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        raise DataError(f"{dataset}: category folder not found: {cat} (categories under {root}: {found})")
    return cat


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DataError(f"missing {what} folder: {path}")
    return path


def _nonempty_images(folder: Path, what: str) -> list[Path]:
    files = list_images(_require_dir(folder, what))
    if not files:
        raise DataError(f"no images in {what} folder {folder} (empty category?)")
    return files


def _check_sizes(image: Path, masks: list[Path]) -> None:
    size = image_size(image)
    for m in masks:
        ms = image_size(m)
        if ms != size:
            raise DataError(f"mask {m} has size {ms[0]}x{ms[1]} but its image {image} is {size[0]}x{size[1]}")


def index_mvtec_ad(root: str | Path, category: str, *, dataset: str = "mvtec_ad",
                   validate: bool = True) -> pd.DataFrame:
    """Index an MVTec AD-layout category (also MPDD and the generated dataset).

    Layout: ``<root>/<category>/train/good/*.png``, ``test/<defect_type>/*.png``,
    ``ground_truth/<defect_type>/<stem>_mask.png`` for every non-good test image.

    Returns:
        index with ``split`` in {"train", "test"} (:func:`make_splits` carves the validation split later).
    """
    cat = _category_dir(root, category, dataset)
    train = _nonempty_images(cat / "train" / "good", "train/good")
    rows = [_row(p, "", 0, "good", category, "train") for p in train]
    test_dir = _require_dir(cat / "test", "test")
    types = sorted(p.name for p in test_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not types:
        raise DataError(f"no defect-type folders in {test_dir}")
    for t in types:
        for p in _nonempty_images(test_dir / t, f"test/{t}"):
            if t == "good":
                rows.append(_row(p, "", 0, "good", category, "test"))
                continue
            mask = cat / "ground_truth" / t / f"{p.stem}_mask.png"
            if not mask.is_file():
                raise DataError(f"defect image {p} has no mask (expected {mask})")
            if validate:
                _check_sizes(p, [mask])
            rows.append(_row(p, mask, 1, t, category, "test"))
    if validate:
        for r in rows:
            if r["label"] == 0:
                image_size(r["image_path"])
    return _rows_to_index(rows)


def _loco_masks(folder: Path) -> list[Path]:
    return list_images(folder) if folder.is_dir() else []


def index_mvtec_loco(root: str | Path, category: str, *, validate: bool = True) -> pd.DataFrame:
    """Index an MVTec LOCO AD category.

    Layout: ``train/good``, ``validation/good`` (the val split), ``test/{good,logical_anomalies,
    structural_anomalies}``, ``ground_truth/<type>/<stem>/000.png, 001.png, ...`` (one mask per defect; pixel
    values index the defect types of ``defects_config.json``). ``mask_path`` holds the mask folder.

    Returns:
        index with ``split`` in {"train", "val", "test"} and an extra column ``subset`` in
        {"good", "logical", "structural"}.
    """
    cat = _category_dir(root, category, "mvtec_loco")
    rows = []
    for split, folder in (("train", "train"), ("val", "validation")):
        rows += [_row(p, "", 0, "good", category, split, subset="good")
                 for p in _nonempty_images(cat / folder / "good", f"{folder}/good")]
    test_dir = _require_dir(cat / "test", "test")
    types = sorted(p.name for p in test_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not types:
        raise DataError(f"no defect-type folders in {test_dir}")
    for t in types:
        subset = "good" if t == "good" else t.split("_")[0]
        for p in _nonempty_images(test_dir / t, f"test/{t}"):
            if t == "good":
                rows.append(_row(p, "", 0, "good", category, "test", subset="good"))
                continue
            mdir = cat / "ground_truth" / t / p.stem
            masks = _loco_masks(mdir)
            if not masks:
                raise DataError(f"defect image {p} has no mask (expected one or more PNGs in {mdir})")
            if validate:
                _check_sizes(p, masks)
            rows.append(_row(p, mdir, 1, t, category, "test", subset=subset))
    if validate:
        for r in rows:
            if r["label"] == 0:
                image_size(r["image_path"])
    return _rows_to_index(rows, extra=("subset",))


VISA_COLUMNS = ("object", "split", "label", "image", "mask")


def index_visa(root: str | Path, category: str, *, validate: bool = True) -> pd.DataFrame:
    """Index a VisA category from the official ``<root>/split_csv/1cls.csv``.

    The CSV has the columns ``object, split, label, image, mask``.

    Image and mask paths in the CSV are relative to ``root``; labels are ``normal``/``anomaly``; VisA masks
    hold class ids, binarised as non-zero. Anomalous images get ``defect_type="anomaly"``.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"visa: dataset root not found: {root}")
    csv = root / "split_csv" / "1cls.csv"
    if not csv.is_file():
        raise DataError(f"visa: split file not found: {csv} (the official split_csv/1cls.csv is required)")
    try:
        table = pd.read_csv(csv, dtype=str, keep_default_na=False)
    except Exception as e:  # malformed CSV
        raise DataError(f"{csv}: cannot be read as CSV ({type(e).__name__}: {e})") from None
    missing = [c for c in VISA_COLUMNS if c not in table.columns]
    if missing:
        raise DataError(f"{csv}: missing column(s) {missing}; expected {list(VISA_COLUMNS)}")
    sel = table[table["object"] == category]
    if sel.empty:
        known = sorted(table["object"].unique())
        raise DataError(f"{csv}: no rows for category {category!r} (categories: {known})")
    rows = []
    for r in sel.itertuples(index=False):
        where = f"{csv} (row for {r.image})"
        if r.split not in ("train", "test"):
            raise DataError(f"{where}: split must be 'train' or 'test', got {r.split!r}")
        if r.label not in ("normal", "anomaly"):
            raise DataError(f"{where}: label must be 'normal' or 'anomaly', got {r.label!r}")
        img = root / r.image
        if not img.is_file():
            raise DataError(f"{where}: image not found: {img}")
        label = int(r.label == "anomaly")
        mask = ""
        if label:
            if r.split == "train":
                raise DataError(f"{where}: anomalous image in the train split")
            if not r.mask:
                raise DataError(f"defect image {img} has no mask (empty 'mask' column in {csv})")
            m = root / r.mask
            if not m.is_file():
                raise DataError(f"defect image {img} has no mask (expected {m})")
            if validate:
                _check_sizes(img, [m])
            mask = str(m)
        elif validate:
            image_size(img)
        rows.append(dict(image_path=str(img), mask_path=mask, label=label,
                         defect_type="anomaly" if label else "good", category=category, split=r.split))
    df = _rows_to_index(rows)
    if not (df["split"] == "train").any():
        raise DataError(f"{csv}: no training images for category {category!r}")
    if not (df["split"] == "test").any():
        raise DataError(f"{csv}: no test images for category {category!r}")
    return df


def _resolve(root: Path, sub: str) -> Path:
    p = Path(sub).expanduser()
    return p if p.is_absolute() else root / p


def _carve(n: int, fraction: float, seed: int, what: str) -> np.ndarray:
    """Boolean (n,) marking ``round(fraction * n)`` items (>= 1 if fraction > 0) chosen by ``seed``."""
    chosen = np.zeros(n, dtype=bool)
    if fraction <= 0:
        return chosen
    k = max(1, int(round(fraction * n)))
    if k >= n:
        raise DataError(f"cannot hold out {k} of {n} images for {what}: nothing would be left to train on")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    chosen[perm[:k].numpy()] = True
    return chosen


def index_folder(cfg: DataConfig) -> pd.DataFrame:
    """Index a generic folder dataset: normal images, optional anomalous images and optional masks.

    Without ``folder_test_normal_dir``, ``folder_test_fraction`` of the normal images (chosen with
    ``split_seed + 1``) become the normal test images. Masks are matched by file stem:
    ``<mask_dir>/<stem><mask_suffix>.<ext>``; without a mask folder anomalous images get an all-zero mask
    (image-level metrics only).
    """
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise DataError(f"folder: dataset root not found: {root}")
    cat = cfg.category or root.name
    normals = _nonempty_images(_resolve(root, cfg.folder_normal_dir), "normal")
    rows = []
    if cfg.folder_test_normal_dir:
        test_normals = _nonempty_images(_resolve(root, cfg.folder_test_normal_dir), "normal test")
        train_normals = normals
    else:
        held = _carve(len(normals), cfg.folder_test_fraction, cfg.split_seed + 1, "the normal test images")
        train_normals = [p for p, h in zip(normals, held, strict=True) if not h]
        test_normals = [p for p, h in zip(normals, held, strict=True) if h]
    rows += [dict(image_path=str(p), mask_path="", label=0, defect_type="good", category=cat, split="train")
             for p in train_normals]
    rows += [dict(image_path=str(p), mask_path="", label=0, defect_type="good", category=cat, split="test")
             for p in test_normals]
    if cfg.folder_anomaly_dir:
        adir = _resolve(root, cfg.folder_anomaly_dir)
        anomalies = _nonempty_images(adir, "anomaly")
        masks = {}
        if cfg.folder_mask_dir:
            mdir = _require_dir(_resolve(root, cfg.folder_mask_dir), "mask")
            masks = {p.stem: p for p in list_images(mdir)}
        for p in anomalies:
            mask = ""
            if cfg.folder_mask_dir:
                key = p.stem + cfg.folder_mask_suffix
                if key not in masks:
                    raise DataError(f"defect image {p} has no mask (expected {mdir / key}.<png|jpg|...>)")
                mask = str(masks[key])
                if cfg.validate:
                    _check_sizes(p, [masks[key]])
            rows.append(dict(image_path=str(p), mask_path=mask, label=1, defect_type=adir.name, category=cat,
                             split="test"))
    if cfg.validate:
        for r in rows:
            if r["label"] == 0:
                image_size(r["image_path"])
    return _rows_to_index(rows)


# ------------------------------------------------------------------------------------------------ datasets
class AnomalyDataset(Dataset):
    """A dataset over a resolved index; yields the sample dict of the data contract.

    Args:
        index: rows with ``image_path, mask_path, label, defect_type, category, split`` (kept as ``.index``).
        image_size: square side H = W of the returned tensors.
        normalize: ImageNet-normalise ``image`` (else it stays in [0, 1]).
        augment: training augmentation (None or identity: none).
        generator: required when ``augment`` does something; one draw from it seeds the dataset, and each
            ``__getitem__`` then uses its own generator seeded from (that seed, epoch, item, times fetched),
            so the augmentations are deterministic whatever the batch order, and differ between epochs.
            With ``num_workers > 0`` call :meth:`set_epoch` every epoch (workers do not share fetch counts).
        max_pixels: pixel limit of every image and mask read (:func:`~mudenet_core.data.images.load_image`).
        reduce_on_load: decode images reduced to no less than ``image_size`` (``load_image(reduce_to=...)``).

    ``augment`` is the (non-identity) augmentation or None; :meth:`without_augment` gives the same images
    un-augmented (training-free methods, and methods that augment on the fly such as MuDeNet). After
    :meth:`preload` the resized images and masks come from memory; augmentation and normalisation are applied
    afterwards, as without the cache, so the items are the same.
    """

    def __init__(self, index: pd.DataFrame, *, image_size: int, normalize: bool = True,
                 augment: AugmentConfig | None = None, generator: torch.Generator | None = None,
                 max_pixels: int = MAX_IMAGE_PIXELS, reduce_on_load: bool = False):
        missing = [c for c in INDEX_COLUMNS if c not in index.columns]
        assert not missing, f"index is missing column(s) {missing}"
        self.index = index.reset_index(drop=True)
        self.image_size = int(image_size)
        self.normalize = bool(normalize)
        self.max_pixels = int(max_pixels)
        self.reduce_on_load = bool(reduce_on_load)
        self.augment = augment if augment is not None and not augment.is_identity else None
        if self.augment is not None and generator is None:
            raise ValueError("augmentation needs an explicit torch.Generator (pass generator=...)")
        self._base_seed = (int(torch.randint(0, 2**62, (1,), generator=generator).item())
                           if self.augment is not None else 0)
        self._epoch = 0
        self._fetches = np.zeros(len(self.index), dtype=np.int64)
        self._images: list[torch.Tensor] | None = None  # preloaded (3, H, W) uint8 or float32 in [0, 1]
        self._masks: list[torch.Tensor | None] | None = None  # preloaded (1, H, W) bool; None: no mask file

    def __len__(self) -> int:
        return len(self.index)

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation stream of an epoch (resets the per-item fetch counts)."""
        self._epoch = int(epoch)
        self._fetches[:] = 0

    def without_augment(self, *, normalize: bool | None = None) -> AnomalyDataset:
        """A copy of this dataset (same index, size and preloaded tensors) with augmentation off.

        Args:
            normalize: ImageNet-normalise the copy's images (None: as this dataset does; False gives images in
                [0, 1], the base images of :class:`~mudenet_core.data.transforms.BatchAugmenter`).
        """
        out = copy.copy(self)
        out.augment = None
        out.normalize = self.normalize if normalize is None else bool(normalize)
        out._fetches = np.zeros(len(self.index), dtype=np.int64)
        return out

    def _item_generator(self, i: int) -> torch.Generator:
        seed = derive_seed(self._base_seed, self._epoch, i, self._fetches[i])
        self._fetches[i] += 1
        return torch.Generator().manual_seed(seed)

    def load_mask(self, i: int, size: tuple[int, int]) -> torch.Tensor:
        """The ground-truth mask of item ``i`` at its original size: (1, H0, W0) float in {0, 1}.

        Defect pixels as :func:`~mudenet_core.data.images.binarize_mask` reads them (non-zero, if valid).
        """
        row = self.index.iloc[i]
        if not row["mask_path"]:
            return torch.zeros(1, *size)
        mp = Path(row["mask_path"])
        files = list_images(mp) if mp.is_dir() else [mp]
        if not files:
            raise DataError(f"mask folder {mp} holds no mask image")
        m = np.zeros(size, dtype=bool)
        for f in files:
            arr = load_mask(f, max_pixels=self.max_pixels)
            if arr.shape != size:
                raise DataError(f"mask {f} has size {arr.shape[1]}x{arr.shape[0]} but its image "
                                f"{row['image_path']} is {size[1]}x{size[0]}")
            m |= binarize_mask(arr)
        return torch.from_numpy(m)[None].float()

    def _decode(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Read item ``i`` from disk: image (3, H, W) float in [0, 1] and mask (1, H, W) float in {0, 1}."""
        path = self.index["image_path"].iloc[i]
        reduce_to = self.image_size if self.reduce_on_load else None
        img = load_image(path, max_pixels=self.max_pixels, reduce_to=reduce_to)  # (H0, W0, 3) in [0, 1]
        hw = img.shape[:2] if reduce_to is None else check_image(path, max_pixels=0)[::-1]  # size on disk
        image = resize_image(to_tensor(img), self.image_size)  # (3, H, W)
        mask = resize_mask(self.load_mask(i, tuple(hw)), self.image_size)  # (1, H, W)
        return image, mask

    def preload(self, *, lossy: bool = False, bar=None) -> AnomalyDataset:
        """Decode every item once now (a corrupt file fails here); keep its resized image and mask in memory.

        Images are kept as uint8 where that is exact (8-bit images that need no resizing), else as float32, so
        items are bit-identical to reading the files; ``lossy=True`` keeps uint8 always (4x smaller: resized
        pixels rounded to steps of 1/255). Masks are kept as bool, and only for rows with a mask file.

        Args:
            lossy: always keep images as uint8.
            bar: a progress bar to advance by one per item (:func:`mudenet_core.utils.progress`), or None.

        Returns:
            this dataset (copies made by :meth:`without_augment` afterwards share the tensors).
        """
        images, masks = [], []
        has_mask = self.index["mask_path"].astype(bool).to_numpy()
        for i in range(len(self)):
            image, mask = self._decode(i)
            q = (image * 255.0).round_().to(torch.uint8)  # (3, H, W)
            images.append(q if lossy or torch.equal(q.float() / 255.0, image) else image)
            masks.append(mask > 0.5 if has_mask[i] else None)
            if bar is not None:
                bar.update(1)
        self._images, self._masks = images, masks
        return self

    @property
    def preloaded(self) -> bool:
        """Whether the items come from memory (:meth:`preload`)."""
        return self._images is not None

    @property
    def cache_nbytes(self) -> int:
        """Bytes held by the preloaded images and masks (0 when not preloaded)."""
        if self._images is None:
            return 0
        tensors = self._images + [m for m in self._masks if m is not None]
        return sum(t.numel() * t.element_size() for t in tensors)

    def _take_preloaded(self, source: AnomalyDataset, positions: np.ndarray) -> None:
        """Share ``source``'s preloaded tensors of its rows ``positions`` (this dataset's rows, in order)."""
        if source._images is not None:
            self._images = [source._images[j] for j in positions]
            self._masks = [source._masks[j] for j in positions]

    def __getitem__(self, i: int) -> dict:
        row = self.index.iloc[i]
        if self._images is None:
            image, mask = self._decode(i)  # (3, H, W), (1, H, W)
        else:
            cached = self._images[i]
            image = cached.float() / 255.0 if cached.dtype == torch.uint8 else cached.clone()
            m = self._masks[i]
            mask = m.float() if m is not None else torch.zeros(1, self.image_size, self.image_size)
        if self.augment is not None:
            image, mask = augment(image, mask, self.augment, self._item_generator(i))
        if self.normalize:
            image = normalize(image)
        return {"image": image, "label": int(row["label"]), "mask": (mask > 0.5).float(),
                "path": str(row["image_path"]), "category": str(row["category"]),
                "defect_type": str(row["defect_type"])}


@dataclasses.dataclass(frozen=True)
class DefectSpec:
    """One entry of MVTec LOCO's ``defects_config.json``."""

    defect_name: str
    pixel_value: int
    saturation_threshold: float
    relative_saturation: bool


def load_defects_config(path: str | Path) -> dict[int, DefectSpec]:
    """Read MVTec LOCO's ``defects_config.json`` into ``pixel_value -> DefectSpec``.

    The file is a list of ``{defect_name, pixel_value, saturation_threshold, relative_saturation}``.
    """
    path = Path(path)
    data = load_json(path)
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of defect entries, got {type(data).__name__}")
    out = {}
    keys = ("defect_name", "pixel_value", "saturation_threshold", "relative_saturation")
    for e in data:
        if not isinstance(e, dict) or any(k not in e for k in keys):
            raise DataError(f"{path}: each entry needs keys {list(keys)}, got {e!r}")
        spec = DefectSpec(str(e["defect_name"]), int(e["pixel_value"]), float(e["saturation_threshold"]),
                          bool(e["relative_saturation"]))
        if spec.pixel_value in out:
            raise DataError(f"{path}: pixel_value {spec.pixel_value} appears twice")
        out[spec.pixel_value] = spec
    return out


class MVTecLOCOTestDataset(AnomalyDataset):
    """MVTec LOCO AD test split: the contract's dataset plus sPRO regions and structural/logical subsets.

    ``index["subset"]`` is "good", "logical" or "structural". :meth:`subset` keeps the good images and one
    kind of anomaly (the usual per-type protocol).

    Args:
        defects_config: the category's ``defects_config.json``; when None (or absent) every region saturates
            at its full area (sPRO then equals PRO).
    """

    def __init__(self, index: pd.DataFrame, *, image_size: int, normalize: bool = True,
                 defects_config: str | Path | None = None, max_pixels: int = MAX_IMAGE_PIXELS,
                 reduce_on_load: bool = False):
        super().__init__(index, image_size=image_size, normalize=normalize, max_pixels=max_pixels,
                         reduce_on_load=reduce_on_load)
        assert "subset" in self.index.columns, "MVTec LOCO index needs a 'subset' column"
        self.defects_config = Path(defects_config) if defects_config is not None else None
        self._specs = (load_defects_config(self.defects_config)
                       if self.defects_config is not None and self.defects_config.is_file() else None)
        self._regions: list | None = None

    def subset(self, kind: Literal["logical", "structural"]) -> MVTecLOCOTestDataset:
        """The good test images plus the anomalies of one kind."""
        if kind not in ("logical", "structural"):
            raise ValueError(f"kind must be 'logical' or 'structural', got {kind!r}")
        keep = self.index["subset"].isin(["good", kind]).to_numpy()
        out = MVTecLOCOTestDataset(self.index[keep], image_size=self.image_size, normalize=self.normalize,
                                   defects_config=self.defects_config, max_pixels=self.max_pixels,
                                   reduce_on_load=self.reduce_on_load)
        out._take_preloaded(self, np.flatnonzero(keep))
        return out

    def _threshold(self, value: int, area_eval: int, orig_hw: tuple[int, int], mask_file: Path) -> float:
        if self._specs is None:
            return float(area_eval)
        if value not in self._specs:
            raise DataError(f"mask {mask_file} has pixel value {value}, which {self.defects_config} does not "
                            f"list (known: {sorted(self._specs)})")
        spec = self._specs[value]
        if spec.relative_saturation:  # fraction of the region's own area
            thr = spec.saturation_threshold * area_eval
        else:  # pixel count at the original resolution, scaled to the evaluation resolution
            thr = spec.saturation_threshold * (self.image_size ** 2) / (orig_hw[0] * orig_hw[1])
        return float(min(thr, area_eval))  # a threshold above the region's area could never be reached

    def spro_regions(self) -> list[list[tuple[np.ndarray, float]]]:
        """Per test image (dataset order), its defect regions at evaluation size with saturation thresholds.

        Returns:
            one list per image (empty for good images) of ``(region (H, W) bool, threshold in pixels)``; one
            region per mask file and pixel value. Regions that vanish at the evaluation size are left out.
        """
        if self._regions is not None:
            return self._regions
        out = []
        for i in range(len(self)):
            row = self.index.iloc[i]
            regions = []
            if row["label"] == 1:
                for f in list_images(row["mask_path"]):
                    arr = load_mask(f, max_pixels=self.max_pixels)  # (H0, W0) pixel values
                    arr = np.where(binarize_mask(arr), arr, 0)  # a non-zero background (strict=False) -> 0
                    for v in np.unique(arr[arr > 0]):
                        region0 = torch.from_numpy(arr == v)[None].float()  # (1, H0, W0)
                        region = resize_mask(region0, self.image_size)[0].numpy() > 0.5  # (H, W)
                        area = int(region.sum())
                        if area == 0:
                            continue
                        regions.append((region, self._threshold(int(v), area, arr.shape, f)))
            out.append(regions)
        self._regions = out
        return out


# -------------------------------------------------------------------------------------------------- splits
@dataclasses.dataclass
class Splits:
    """The three datasets of one category, and their resolved index (one row per image, ``split`` column)."""

    train: AnomalyDataset
    val: AnomalyDataset
    test: AnomalyDataset
    index: pd.DataFrame
    config: DataConfig

    def save_index(self, path: str | Path) -> Path:
        """Write the resolved index as CSV (atomically)."""
        return save_csv(path, self.index)

    @property
    def train_unaugmented(self) -> AnomalyDataset:
        """The training images without augmentation, loaded as val and test are.

        Training-free methods (PaDiM, PatchCore) fit on this, whatever the training augmentation.
        """
        return self.train.without_augment()


def check_index(df: pd.DataFrame, cfg: DataConfig) -> None:
    """Check the files of an index before any training (:func:`build_index` does, when ``cfg.validate``).

    * every image: a readable header, and no more pixels than ``cfg.max_image_pixels`` as it will be decoded
      (reduced for JPEGs when ``cfg.reduce_on_load``);
    * every mask of a defect image: the mask rule of :mod:`mudenet_core.data.images` (the background, the most
      common border value, is 0; at most ``MASK_MAX_VALUES`` values), and at least one defect (non-zero)
      pixel in the image's mask or, for MVTec LOCO, in the union of its mask folder. Defect images without a
      mask file (a folder dataset without masks: image-level labels only) are not checked.

    Raises:
        DataError: naming the (first) bad file, when ``cfg.strict``. Otherwise one :class:`DataWarning` lists
            the bad masks, which are then read by :func:`~mudenet_core.data.images.binarize_mask`.
    """
    reduce_to = cfg.image_size if cfg.reduce_on_load else None
    problems = []
    for row in df.itertuples(index=False):
        check_image(row.image_path, max_pixels=cfg.max_image_pixels, reduce_to=reduce_to)
        if row.label != 1 or not row.mask_path:
            continue
        mp = Path(row.mask_path)
        defect = False
        for f in list_images(mp) if mp.is_dir() else [mp]:
            arr = load_mask(f, max_pixels=cfg.max_image_pixels)  # (H0, W0) pixel values
            problem = mask_problem(arr)
            if problem is not None:
                problems.append(f"mask {f}: {problem}")
            defect = defect or bool(binarize_mask(arr).any())
        if not defect:
            problems.append(f"mask {mp}: empty (no defect pixel), but {row.image_path} is a defect image")
    if not problems:
        return
    if cfg.strict:
        more = f" (and {len(problems) - 1} more bad mask(s))" if len(problems) > 1 else ""
        raise DataError(f"{problems[0]}{more}; fix the mask(s), or pass DataConfig(strict=False) to use them "
                        f"with a warning")
    shown = "; ".join(problems[:10]) + (f"; and {len(problems) - 10} more" if len(problems) > 10 else "")
    warnings.warn(f"{cfg.dataset}/{cfg.category}: {len(problems)} mask(s) break the mask rule of "
                  f"mudenet_core.data.images and are used as well as possible (strict=False): {shown}",
                  DataWarning, stacklevel=3)


def build_index(cfg: DataConfig) -> pd.DataFrame:
    """The resolved index of ``cfg``: ``split`` in {"train", "val", "test"}, val drawn by ``split_seed``.

    With ``cfg.validate`` every file is checked (:func:`check_index`).
    """
    if cfg.dataset == "synthetic":
        from mudenet_core.data import synthetic

        root = synthetic.resolve_root(cfg.root)
        df = index_mvtec_ad(root, cfg.category, dataset="synthetic", validate=cfg.validate)
    elif cfg.dataset in ("mvtec_ad", "mpdd"):
        df = index_mvtec_ad(cfg.root, cfg.category, dataset=cfg.dataset, validate=cfg.validate)
    elif cfg.dataset == "mvtec_loco":
        df = index_mvtec_loco(cfg.root, cfg.category, validate=cfg.validate)
    elif cfg.dataset == "visa":
        df = index_visa(cfg.root, cfg.category, validate=cfg.validate)
    elif cfg.dataset == "folder":
        df = index_folder(cfg)
    else:  # pragma: no cover - Literal already checked by from_dict
        raise ConfigError(f"unknown dataset {cfg.dataset!r}")
    if cfg.validate:
        check_index(df, cfg)
    if cfg.dataset == "mvtec_loco":  # the val split is validation/good, already in the index
        return df
    train_pos = np.flatnonzero(df["split"].to_numpy() == "train")
    held = _carve(len(train_pos), cfg.val_fraction, cfg.split_seed, f"validation ({cfg.category})")
    df.loc[train_pos[held], "split"] = "val"
    return _rows_to_index(df.to_dict("records"), extra=tuple(c for c in df.columns if c not in INDEX_COLUMNS))


PRELOAD_PROGRESS_MIN = 100  # show a progress bar when preloading at least this many images


def make_splits(cfg: DataConfig, *, index: pd.DataFrame | None = None,
                save_split_to: str | Path | None = None, generator: torch.Generator | None = None,
                show_progress: bool = True) -> Splits:
    """Build the train (augmented if ``cfg`` asks), val and test datasets of one category.

    With ``cfg.preload`` every image of the three splits is decoded here, once (a corrupt file is a
    :class:`DataError` naming it, before any training), and kept resized in memory
    (:meth:`AnomalyDataset.preload`).

    Args:
        cfg: the data config.
        index: ``build_index(cfg)`` when the caller has it already (its files are then not checked again).
        save_split_to: write the resolved index there as CSV; a folder (existing, or a path without suffix)
            gets ``<dataset>_<category>.csv``.
        generator: seeds the training augmentations (default: a generator seeded with ``cfg.split_seed``).
        show_progress: a progress bar while preloading (only for at least ``PRELOAD_PROGRESS_MIN`` images).

    Returns:
        :class:`Splits` (train/val/test are disjoint; val comes from train/good, or validation/good for LOCO).
    """
    df = build_index(cfg) if index is None else index
    if generator is None:
        generator = torch.Generator().manual_seed(cfg.split_seed)

    def part(split: str) -> pd.DataFrame:
        return df[df["split"] == split].reset_index(drop=True)

    common = dict(image_size=cfg.image_size, normalize=cfg.normalize, max_pixels=cfg.max_image_pixels,
                  reduce_on_load=cfg.reduce_on_load)
    aug = cfg.resolved_augment()
    train = AnomalyDataset(part("train"), augment=aug, generator=generator, **common)
    val = AnomalyDataset(part("val"), **common)
    if cfg.dataset == "mvtec_loco":
        defects = Path(cfg.root).expanduser() / cfg.category / "defects_config.json"
        test = MVTecLOCOTestDataset(part("test"), defects_config=defects, **common)
    else:
        test = AnomalyDataset(part("test"), **common)
    if cfg.preload:
        total = len(train) + len(val) + len(test)
        with progress(total=total, desc=f"decoding {cfg.dataset}/{cfg.category}",
                      enabled=show_progress and total >= PRELOAD_PROGRESS_MIN) as bar:
            for ds in (train, val, test):
                ds.preload(lossy=cfg.preload_dtype == "uint8", bar=bar)
    splits = Splits(train=train, val=val, test=test, index=df, config=cfg)
    if save_split_to is not None:
        path = Path(save_split_to)
        if path.is_dir() or not path.suffix:
            path = path / f"{cfg.dataset}_{cfg.category}.csv"
        splits.save_index(path)
    return splits
