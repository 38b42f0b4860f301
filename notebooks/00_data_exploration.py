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
# `figures/00_test_samples.png`.

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

# %% tags=["hide_input"]
from IPython.display import display

from mudenet_core import experiment, io, viz
from mudenet_core.data import denormalize

# %% [markdown]
# ## Splits
# The validation split is carved from `train/good` with a fixed seed; it calibrates the anomaly-map
# normalisation and is never trained on.

# %%
run, generator, device = experiment.start_run(OUT_DIR, dataset=DATASET, category=CATEGORY, seed=SEED, device=DEVICE)
splits = experiment.build_splits(run, DATA_ROOT, IMAGE_SIZE)
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
