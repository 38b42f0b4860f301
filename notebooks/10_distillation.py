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
# # 10 · Teacher distillation (MuDeNet stage 1)
#
# **Purpose:** distil the multi-level teacher T from a frozen pretrained backbone (Eq. 16): every level of T
# regresses the target E, a random subset of C backbone channels, z-scored and resized to the teacher's grid.
#
# **Inputs:** the category's training split (via `DATA_ROOT`), `configs/mudenet/<PROFILE>.yaml`.
#
# **Outputs (under `OUT_DIR`):** `checkpoints/mudenet/last.pt` (teacher after stage 1, resumed by
# `20_training`), `checkpoints/mudenet/distill_log.json`, `tables/distill_quality.csv`,
# `figures/10_distill_loss.png`, `figures/10_teacher_vs_target.png`.

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

# %% tags=["hide_input"]
import pandas as pd
from IPython.display import display

from mudenet_core import experiment, io, mudenet_figures, viz

# %%
run, generator, device = experiment.start_run(OUT_DIR, dataset=DATASET, category=CATEGORY, seed=SEED, device=DEVICE)
splits = experiment.build_splits(run, DATA_ROOT, IMAGE_SIZE, DATA_OVERRIDES)
cfg = experiment.method_config("mudenet", PROFILE, image_size=IMAGE_SIZE,
                                overrides=OVERRIDES.get("mudenet"))
print(cfg.distill)

# %% [markdown]
# ## Distil
# With `REUSE`, a finished distillation in `OUT_DIR` is loaded instead of repeated.

# %%
log = experiment.distill_mudenet(cfg, splits, run, generator=generator, device=device, reuse=REUSE)
print(f"{len(log.get('step', []))} steps, final L_dist = {log['L_dist'][-1]:.4f}" if log.get("L_dist") else log)

# %%
fig = viz.loss_curves(experiment.log_frame(log, ["L_dist"]), smooth=1 if SMOKE else 10)
display(experiment.show_figure(fig, run.figure("10_distill_loss.png")))

# %% [markdown]
# ## Teacher vs target
# One descriptor channel of the target E and of each teacher level, for a few validation images (never
# trained on). The per-level mean squared error on the validation split measures how well T imitates E.

# %%
det = mudenet_figures.load_distilled(run, device)
val = experiment.stack_items(splits.val, range(min(2 if SMOKE else 3, len(splits.val))))
targets, teacher = mudenet_figures.teacher_and_target(det, val["image"])
fig = mudenet_figures.teacher_target_figure(targets, teacher, channel=0)
display(experiment.show_figure(fig, run.figure("10_teacher_vs_target.png")))

# %%
quality = pd.DataFrame({"level": range(1, len(teacher) + 1),
                        "val_mse": [float(((t - targets) ** 2).mean()) for t in teacher]})
io.save_csv(run.table("distill_quality.csv"), quality)
display(quality)
