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
# # 30 · Evaluation of MuDeNet
#
# **Purpose:** score the test split with the trained MuDeNet (once, for the final report) and compute the
# harness metrics (image AUROC, image AUPR, pixel AUROC, AU-PRO up to FPR 0.3, F1-max as the oracle) beside
# the validation metrics recorded at fit time, and the accuracy / precision / recall / F1 at the threshold
# chosen on validation (what a deployment gets); ROC and PRO curves, score histograms of normal vs anomalous
# images, and the best and worst cases with overlays.
#
# **Inputs:** `checkpoints/mudenet/model.pt` from `20_training` (same `OUT_DIR`), the test split.
#
# **Outputs (under `OUT_DIR`):** `eval/mudenet/{metrics.json, metrics.csv, scores.csv, maps.npy}`,
# `tables/metrics_mudenet.csv` and `tables/timings_mudenet.csv` (tidy, read by `90_report`),
# `tables/per_defect_mudenet.csv`, `figures/30_*.png`.

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

# %% tags=["hide_input"]
from IPython.display import display

from mudenet_core import experiment, io, viz
from mudenet_core.data import denormalize

# %%
run, generator, device = experiment.start_run(OUT_DIR, dataset=DATASET, category=CATEGORY, seed=SEED, device=DEVICE)
splits = experiment.build_splits(run, DATA_ROOT, IMAGE_SIZE, DATA_OVERRIDES)
det, info = experiment.load_fitted("mudenet", run, device=device)

# %% [markdown]
# ## Metrics

# %%
result, tidy = experiment.evaluate_method(det, "mudenet", splits, run, device=device, config=det.config,
                                          fit_info=info)
display(tidy.pivot_table(index="split", columns="metric", values="value"))
per_defect = experiment.per_defect_auroc(result.scores)
io.save_csv(run.table("per_defect_mudenet.csv"), per_defect)
display(per_defect)

# %% [markdown]
# ## ROC and PRO curves

# %%
labels, scores = result.scores["label"].to_numpy(), result.scores["score"].to_numpy()
fig = viz.roc_curves({"mudenet": (labels, scores)})
display(experiment.show_figure(fig, run.figure("30_roc.png")))
if result.masks.any():  # PRO needs anomalous pixels
    fig = viz.pro_curves({"mudenet": (result.masks, result.maps)})
    display(experiment.show_figure(fig, run.figure("30_pro.png")))

# %% [markdown]
# ## Image scores: normal vs anomalous
# The dashed line is the decision threshold chosen on the validation set (`threshold.json`).

# %%
fig = viz.score_histogram(labels, scores, threshold=info.get("threshold"))
display(experiment.show_figure(fig, run.figure("30_score_histogram.png")))

# %% [markdown]
# ## Best and worst cases
# Highest- and lowest-scoring anomalous images, lowest- and highest-scoring normal images (the hardest
# cases are anomalous images with low scores and normal images with high scores).

# %%
test = experiment.stack_items(splits.test, range(len(splits.test)))
lo, hi = viz.map_range(result.maps)
fig = viz.best_worst_cases(denormalize(test["image"]), result.maps, labels, scores, result.masks,
                           k=2 if SMOKE else 3, vmin=lo, vmax=hi)
display(experiment.show_figure(fig, run.figure("30_best_worst.png")))
