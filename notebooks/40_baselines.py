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
# # 40 · Baselines on the same category
#
# **Purpose:** fit and evaluate every baseline of the harness (`METHODS`: PaDiM, PatchCore, a convolutional
# autoencoder, Uninformed Students, GLASS, PAGMFR, RGPKD — whichever are available) with the same splits, the
# same test set and the same metrics as MuDeNet.
#
# **Inputs:** the category's splits, `configs/<method>/<PROFILE>.yaml`; `eval/mudenet/scores.csv` from
# `30_evaluation` when present (for the joint ROC plot).
#
# **Outputs (under `OUT_DIR`):** per method `checkpoints/<method>/model.pt`, `eval/<method>/*`,
# `eval/<method>/val/*`, `checkpoints/<method>/threshold.json`,
# `tables/metrics_<method>.csv`, `tables/timings_<method>.csv`; `figures/40_roc_all.png`; GLASS's and PAGMFR's
# training curves and timing logs in `checkpoints/<method>/`; `figures/40_pagmfr_predictions.png`.

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
OVERRIDES: dict = {}  # per-method config overrides: method name -> list of override strings (run_all.py --set)
REUSE: bool = True  # load checkpoints written by an earlier execution instead of recomputing
DATA_OVERRIDES: dict = {}  # DataConfig overrides, e.g. {"val_fraction": 0.2} (run_all.py --set data.KEY=VALUE)
METHODS: list = ["padim", "patchcore", "ae", "us", "glass", "pagmfr", "rgpkd"]  # baselines to run (registry names; unavailable ones are skipped)
TEXTURE_DIR: str = ""  # texture images for the synthetic validation anomalies (e.g. DTD images/); "" = self-textures

# %% tags=["hide_input"]
import pandas as pd
from IPython.display import display

from mudenet_core import experiment, methods, viz

# %%
run, generator, device = experiment.start_run(OUT_DIR, dataset=DATASET, category=CATEGORY, seed=SEED, device=DEVICE)
splits = experiment.build_splits(run, DATA_ROOT, IMAGE_SIZE, DATA_OVERRIDES)
val_set = experiment.build_validation(splits, TEXTURE_DIR)
available = methods.available_methods()
todo = [m for m in METHODS if m in available and m != "mudenet"]
print("running:", todo, "| not available:", [m for m in METHODS if m not in available])

# %% [markdown]
# ## Fit and evaluate
# Each baseline trains on `train/good`, calibrates on the validation split, chooses its threshold on the
# synthetic-anomaly validation set, and is scored once on the test split by the same harness
# (`mudenet_core.harness.evaluate`).

# %%
tables, curves, fitted = [], {}, {}
for method in todo:
    cfg = experiment.method_config(method, PROFILE, image_size=IMAGE_SIZE, overrides=OVERRIDES.get(method))
    det, info = experiment.fit_or_load(method, cfg, splits, run, generator=generator, device=device, reuse=REUSE,
                                       val_set=val_set)
    result, tidy = experiment.evaluate_method(det, method, splits, run, device=device, config=cfg, fit_info=info)
    tables.append(tidy)
    fitted[method] = det
    curves[method] = (result.scores["label"].to_numpy(), result.scores["score"].to_numpy())
    print(f"{method}: fit {info.get('fit_s', float('nan')):.1f} s, image AUROC val {info['validation']['image_auroc']:.3f}"
          f" / test {result.metrics['image_auroc']:.3f}")

# %%
mudenet_scores = run.eval_dir("mudenet") / "scores.csv"
if mudenet_scores.is_file():  # written by 30_evaluation
    s = pd.read_csv(mudenet_scores)
    curves = {"mudenet": (s["label"].to_numpy(), s["score"].to_numpy()), **curves}
if tables:
    display(pd.concat(tables).pivot_table(index="method", columns="metric", values="value"))
if curves:
    fig = viz.roc_curves(curves, title=f"{DATASET}/{CATEGORY}: image-level ROC")
    display(experiment.show_figure(fig, run.figure("40_roc_all.png")))

# %% [markdown]
# ## Methods that learn from synthesised anomalies
# GLASS and PAGMFR write their training curves (losses; for GLASS also the synthetic-validation AUROC that chose
# its checkpoint) beside the checkpoint. PAGMFR's per-image visualisation shows image, ground truth and heat map
# for a few test images (display only: nothing is chosen from it).

# %%
from IPython.display import Image

for method in ("glass", "pagmfr"):
    png = run.checkpoint_dir(method) / "training_curves.png"
    if method in fitted and png.is_file():
        display(Image(filename=str(png)))
if "pagmfr" in fitted:
    from mudenet_core.baselines import pagmfr

    fig = pagmfr.prediction_grid(fitted["pagmfr"], splits.test, n=4 if SMOKE else 6)
    display(experiment.show_figure(fig, run.figure("40_pagmfr_predictions.png")))
