"""Data layer: datasets of the data contract, splits, transforms, the generated dataset and DTD textures.

Public API::

    DataConfig, AugmentConfig, make_splits, Splits, build_index, denormalize, augment_for, DataError
    BatchAugmenter, derive_seed (on-the-fly draws), augmentation_grid, augmentation_example, DEMO_AUGMENT
    AnomalyDataset, MVTecLOCOTestDataset, index_mvtec_ad, index_mvtec_loco, index_visa, index_folder
    synthetic (module: CATEGORIES, generate, ensure, default_root, render_sample), dtd (module: DTDTextures)
"""

from mudenet_core.data import dtd, synthesis, synthetic
from mudenet_core.data.datasets import (
    INDEX_COLUMNS,
    MPDD_CATEGORIES,
    MVTEC_AD_CATEGORIES,
    MVTEC_LOCO_CATEGORIES,
    VISA_CATEGORIES,
    AnomalyDataset,
    DataConfig,
    DefectSpec,
    MVTecLOCOTestDataset,
    Splits,
    build_index,
    index_folder,
    index_mvtec_ad,
    index_mvtec_loco,
    index_visa,
    load_defects_config,
    make_splits,
)
from mudenet_core.data.dtd import DTDTextures
from mudenet_core.data.images import DataError, load_image, load_mask
from mudenet_core.data.transforms import (
    DEMO_AUGMENT,
    IMAGENET_MEAN,
    IMAGENET_STD,
    AugmentConfig,
    BatchAugmenter,
    augment,
    augment_for,
    augmentation_example,
    augmentation_grid,
    denormalize,
    derive_seed,
    normalize,
)

__all__ = [
    "INDEX_COLUMNS", "MPDD_CATEGORIES", "MVTEC_AD_CATEGORIES", "MVTEC_LOCO_CATEGORIES", "VISA_CATEGORIES",
    "DEMO_AUGMENT", "IMAGENET_MEAN", "IMAGENET_STD", "AnomalyDataset", "AugmentConfig", "BatchAugmenter",
    "DataConfig", "DataError", "DefectSpec", "DTDTextures", "MVTecLOCOTestDataset", "Splits", "augment",
    "augment_for", "augmentation_example", "augmentation_grid", "build_index", "denormalize", "derive_seed",
    "dtd", "index_folder", "index_mvtec_ad", "index_mvtec_loco", "index_visa",
    "load_defects_config", "load_image", "load_mask", "make_splits", "normalize", "synthesis", "synthetic",
]
