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
# # 20 · Training S1, A and S2 (MuDeNet stage 2)
#
# **Purpose:** train the structural student S1, the autoencoder A and the logical student S2 end to end
# (Eqs. 3, 5, 7, 8) on top of the distilled teacher, then calibrate the map normalisation on the validation
# split. Then the validation set (held-out normal images plus synthetic anomalies made on them) is scored:
# its metrics and the decision threshold come from it, never from the test split. Loss curves per term; raw
# maps of test images recorded during training and the final anomaly maps.
#
# **Inputs:** `checkpoints/mudenet/last.pt` from `10_distillation` (same `OUT_DIR`), the training split.
#
# **Outputs (under `OUT_DIR`):** `checkpoints/mudenet/model.pt`, `checkpoints/mudenet/fit_log.json`,
# `checkpoints/mudenet/threshold.json`, `eval/mudenet/val/*`,
# `checkpoints/mudenet/snapshots.npz`, `figures/20_loss_curves.png`, `figures/20_maps_during_training.png`,
# `figures/20_maps_after_training.png`.

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
TEXTURE_DIR: str = ""  # texture images for the synthetic validation anomalies (e.g. DTD images/); "" = self-textures

# %% tags=["hide_input"]
import numpy as np
from IPython.display import display

from mudenet_core import experiment, mudenet_figures, train, viz
from mudenet_core.data import denormalize
from mudenet_core.mudenet import MuDeNet

# %%
run, generator, device = experiment.start_run(OUT_DIR, dataset=DATASET, category=CATEGORY, seed=SEED, device=DEVICE)
splits = experiment.build_splits(run, DATA_ROOT, IMAGE_SIZE, DATA_OVERRIDES)
val_set = experiment.build_validation(splits, TEXTURE_DIR)
cfg = experiment.method_config("mudenet", PROFILE, image_size=IMAGE_SIZE,
                                overrides=OVERRIDES.get("mudenet"))
print(cfg.train)
examples = experiment.stack_items(splits.test, experiment.pick_examples(splits.index, k=1)[: 2 if SMOKE else 4])

# %% [markdown]
# ## Train
# Resumes from the distilled teacher of `10_distillation`; with `REUSE`, a finished model is loaded instead.

# %%
snap_path = run.checkpoint_dir("mudenet") / "snapshots.npz"
steps_total = train.steps_for(len(splits.train), cfg.train.batch_size, cfg.train.epochs, cfg.train.steps)
det = MuDeNet(cfg)
snapshots = mudenet_figures.MapSnapshots(det, examples["image"], every=max(1, steps_total // 6))
det, info = experiment.fit_or_load("mudenet", cfg, splits, run, generator=generator, device=device,
                                   reuse=REUSE, resume=True, callback=snapshots, detector=det, val_set=val_set)
if not info["loaded"]:
    snapshots.save(snap_path)
print(f"fit: {info.get('fit_s', float('nan')):.1f} s, stages {info.get('stages_s')} (loaded: {info['loaded']})")
print(f"validation ({len(val_set)} images): " + ", ".join(f"{k} {v:.3f}" for k, v in info["validation"].items())
      + f"; threshold {info['threshold']:.4g}")

# %%
fig = viz.loss_curves(experiment.log_frame(info["log"]["train"]), smooth=1 if SMOKE else 10)
display(experiment.show_figure(fig, run.figure("20_loss_curves.png")))

# %% [markdown]
# ## Raw maps during training
# Level-mean raw structural (X − S1)² and logical (A − S2)² maps of one defective test image at several steps
# (each panel on its own colour scale).

# %%
if snap_path.is_file():  # absent when a model trained elsewhere was loaded
    snap = np.load(snap_path)
    fig = mudenet_figures.snapshot_figure(snap["steps"], snap["maps"], image=len(examples["label"]) - 1)
    display(experiment.show_figure(fig, run.figure("20_maps_during_training.png")))

# %% [markdown]
# ## Anomaly maps after training (calibrated, fused)

# %%
maps, scores = det.predict(examples["image"])
lo, hi = viz.map_range(maps)
titles = [f"{d}  score={s:.2f}" for d, s in zip(examples["defect_type"], scores.tolist(), strict=True)]
fig = viz.anomaly_map_grid(denormalize(examples["image"]), maps, examples["mask"], titles=titles, vmin=lo, vmax=hi)
display(experiment.show_figure(fig, run.figure("20_maps_after_training.png")))
