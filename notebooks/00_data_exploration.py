# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 00 · Data exploration
#
# **Purpose:** look at one category before training: how many images each split holds per defect type, what
# normal and defective images look like (ground-truth outlines in red), and basic image statistics.
#
# **Inputs:** the dataset under `DATA_ROOT` (`DATASET` layout, category `CATEGORY`).
#
# **Outputs (under `OUT_DIR`):** `splits/<dataset>_<category>.csv` (resolved index: which image is in which
# split), `tables/data_counts.csv`, `tables/image_stats.csv`, `figures/00_train_samples.png`,
# `figures/00_augmentations.png`, `figures/00_validation_anomalies.png`, `figures/00_test_samples.png`.

# %% tags=["parameters"]
SMOKE: bool = False  # tiny run for CI: fewer examples and a reduced grid; pair with the smoke PROFILE
OUT_DIR: str = "results/cpu/runs/synthetic/plate/seed0"  # this run's output folder (checkpoints, tables, figures)
SEED: int = 0  # training seed (the train/val split is fixed)
DATASET: str = "synthetic"  # dataset layout: synthetic | mvtec_ad | mvtec_loco | visa | mpdd | folder
DATA_ROOT: str = "data/synthetic"  # folder holding the categories (relative to the repository root or absolute)
CATEGORY: str = "plate"  # category folder
IMAGE_SIZE: int = 128  # square input size in pixels (a multiple of 32 for MuDeNet)
PROFILE: str = "cpu"  # method configs: configs/<method>/<profile>.yaml (smoke | cpu | paper)
DEVICE: str = "auto"  # "auto" (CUDA when available), "cpu" or "cuda"
REUSE: bool = True  # load checkpoints written by an earlier execution instead of recomputing
DATA_OVERRIDES: dict = {}  # DataConfig overrides, e.g. {"val_fraction": 0.2} (run_all.py --set data.KEY=VALUE)
TEXTURE_DIR: str = ""  # texture images for the synthetic validation anomalies (e.g. DTD images/); "" = self-textures

# %% tags=["hide_input"]
from IPython.display import display

from mudenet_core import experiment, io, viz
from mudenet_core.data import augmentation_example, augmentation_grid, denormalize, synthesis

# %% [markdown]
# ## Splits
# The validation split is carved from `train/good` with a fixed seed; it calibrates the anomaly-map
# normalisation and is never trained on.

# %%
run, generator, device = experiment.start_run(OUT_DIR, dataset=DATASET, category=CATEGORY, seed=SEED, device=DEVICE)
splits = experiment.build_splits(run, DATA_ROOT, IMAGE_SIZE, DATA_OVERRIDES)
counts = experiment.split_counts(splits.index)
io.save_csv(run.table("data_counts.csv"), counts)
display(counts.pivot_table(index=["label", "defect_type"], columns="split", values="images", fill_value=0))

# %% [markdown]
# ## Normal training images

# %%
n_show = 4 if SMOKE else 8
train = experiment.stack_items(splits.train, range(min(n_show, len(splits.train))))  # as augmented for training
fig = viz.sample_grid(denormalize(train["image"]), None, titles=train["defect_type"], ncols=4)
display(experiment.show_figure(fig, run.figure("00_train_samples.png")))

# %% [markdown]
# ## Augmentation draws
# Our protocol trains every category with one recipe: no augmentation unless the data config asks for it
# (`augment_policy="table"` reads our own, not the paper's, tables in `configs/augment/`). Trained methods draw
# afresh every time they use an image; rotations zoom in instead of padding. Each row: a training image and 4
# draws. The title says which augmentation is shown: the run's own, the category's opt-in table entry (not
# used), or a DEMONSTRATION recipe (not used).

# %%
aug, aug_title = augmentation_example(splits.train.augment, DATASET, CATEGORY)
originals = experiment.stack_items(splits.train.without_augment(normalize=False), range(min(2 if SMOKE else 4, len(splits.train))))
fig = augmentation_grid(originals["image"], aug, n_draws=4, seed=SEED, title=aug_title)
display(experiment.show_figure(fig, run.figure("00_augmentations.png")))

# %% [markdown]
# ## The validation set: held-out normal images plus synthetic anomalies
# Every choice (schedules, branches, thresholds) is made on this set, never on the test split. Anomalies are
# GLASS-style local anomaly synthesis (`mudenet_core.data.synthesis`): Perlin-noise masks filled with a texture
# (`TEXTURE_DIR`, or patches of other normal images when none is given), several seeded versions of each
# held-out image. Top row: synthetic anomalies; bottom row: their exact masks.

# %%
val_set = experiment.build_validation(splits, TEXTURE_DIR)
n_val = val_set.index["label"].value_counts().to_dict()
print(f"validation set: {n_val.get(0, 0)} normal images, {n_val.get(1, 0)} synthetic anomalies "
      f"({val_set.per_image} per normal image); textures: {TEXTURE_DIR or 'self-textures'}")
fig = synthesis.sample_grid(val_set, n=4 if SMOKE else 8)
display(experiment.show_figure(fig, run.figure("00_validation_anomalies.png")))

# %% [markdown]
# ## Test images per defect type, ground truth outlined

# %%
picks = experiment.pick_examples(splits.index, k=1 if SMOKE else 2)
test = experiment.stack_items(splits.test, picks)
fig = viz.sample_grid(denormalize(test["image"]), test["mask"][:, 0], titles=test["defect_type"], ncols=4)
display(experiment.show_figure(fig, run.figure("00_test_samples.png")))

# %% [markdown]
# ## Image statistics
# Per-channel mean and standard deviation in [0, 1] pixel units (before ImageNet normalisation), and the
# fraction of anomalous pixels per defect type.

# %%
stats = experiment.image_statistics(splits.train, max_images=16 if SMOKE else 64)
io.save_csv(run.table("image_stats.csv"), stats)
display(stats)
coverage = experiment.mask_coverage(splits.test)
display(coverage.groupby("defect_type")["mask_fraction"].agg(["count", "mean", "max"]))
