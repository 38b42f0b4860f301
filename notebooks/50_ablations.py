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
# # 50 · Ablations
#
# **Purpose:** what each part of MuDeNet's scoring contributes, one factor at a time, by re-scoring the
# trained model (no retraining): structural only / logical only / both, which levels are fused, the map
# normalisation, and the Gaussian blur sigma. The latent size Z of the autoencoder needs retraining: it runs
# only for the sizes in `LATENT_SIZES` (the paper grid; empty in the quick profiles).
#
# **Inputs:** `checkpoints/mudenet/model.pt` from `20_training` (same `OUT_DIR`), the validation split
# (re-calibration) and the test split.
#
# **Outputs (under `OUT_DIR`):** `tables/ablations.csv` (tidy, with `ablation` and `variant` columns, read by
# `90_report`), `checkpoints/mudenet_z<Z>/` for retrained latent sizes, `figures/50_ablations.png`.

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
BRANCHES: list = ["both", "structural", "logical"]  # branch variants: both | structural | logical
LEVEL_SETS: list = [[1], [2], [3], [1, 2], [1, 2, 3]]  # 1-based levels fused into the map
NORMALIZATIONS: list = ["minmax", "quantile", "none"]  # per level/branch map normalisation
BLUR_SIGMAS: list = [0.0, 2.0, 4.0, 8.0]  # Gaussian blur sigma in input pixels
LATENT_SIZES: list = []  # autoencoder latent sizes Z to retrain (e.g. [8, 16, 32, 64]; costs a full training each)
TEXTURE_DIR: str = ""  # texture images for the synthetic validation anomalies (e.g. DTD images/); "" = self-textures

# %% tags=["hide_input"]
import pandas as pd
from IPython.display import display

from mudenet_core import experiment, io, report
from mudenet_core.ablations import run_scoring_ablations, scoring_variants

# %%
run, generator, device = experiment.start_run(OUT_DIR, dataset=DATASET, category=CATEGORY, seed=SEED, device=DEVICE)
splits = experiment.build_splits(run, DATA_ROOT, IMAGE_SIZE, DATA_OVERRIDES)
val_set = experiment.build_validation(splits, TEXTURE_DIR)
det, info = experiment.load_fitted("mudenet", run, device=device)
base = det.config.scoring
print(base)

# %% [markdown]
# ## Re-scoring grid
# Every variant changes one field of the trained model's `ScoringConfig`, re-fits the normalisation
# statistics on the validation split and re-scores the synthetic-anomaly validation set (`split = val`) and
# the test split (`split = test`) from the same network outputs. These are ablations: the recipe was chosen on
# validation numbers, and none of these rows is a headline result.

# %%
variants = scoring_variants(base, branches=BRANCHES, level_sets=LEVEL_SETS,
                            normalizations=NORMALIZATIONS, blur_sigmas=BLUR_SIGMAS)
ablations = run_scoring_ablations(det, splits, run, variants, config_hash=det.config.config_hash(),
                                  val_set=val_set)

# %% [markdown]
# ## Latent size Z (retraining)

# %%
for z in LATENT_SIZES:
    cfg_z = det.config.replace(latent_dim=int(z))
    det_z, _ = experiment.fit_or_load("mudenet", cfg_z, splits, run, generator=generator, device=device,
                                      reuse=REUSE, name=f"mudenet_z{z}")
    rows = run_scoring_ablations(det_z, splits, run, [("latent_dim", str(z), det_z.config.scoring)],
                                 config_hash=cfg_z.config_hash(), val_set=val_set)
    ablations = pd.concat([ablations, rows], ignore_index=True)
io.save_csv(run.table("ablations.csv"), ablations)

# %%
wide = ablations.pivot_table(index=["ablation", "variant"], columns=["split", "metric"], values="value", sort=False)
display(wide)
shown = [("val", m) for m in ("image_auroc", "pixel_auroc", "au_pro") if ("val", m) in wide.columns]
fig = report.bar_figure(wide[shown].droplevel(0, axis=1), title=f"{DATASET}/{CATEGORY}: ablations (validation)",
                        xlim=(0, 1))
display(experiment.show_figure(fig, run.figure("50_ablations.png")))
