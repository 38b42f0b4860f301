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
# # 90 · Report: tables and figures
#
# **Purpose:** the paper-style tables and figures of this profile, built only from the tidy CSVs the earlier
# notebooks wrote (never from checkpoints or models): per-category metrics per dataset and method (mean ± std
# over seeds, the Mean row computed here), paper vs ours, ablations and timings.
#
# **Inputs:** `runs/<dataset>/<category>/seed<k>/tables/{metrics_*, timings_*, ablations}.csv` under `OUT_DIR`.
#
# **Outputs (under `OUT_DIR`):** `tables/<dataset>.csv`, `tables/ablations.csv`, `tables/timings.csv` (tidy),
# `tables/*.md` (rendered), `figures/<dataset>_methods.png`, `figures/ablations.png`, `figures/timings.png`.

# %% tags=["parameters"]
SMOKE: bool = False  # tiny run for CI (no effect here beyond the record)
OUT_DIR: str = "results/cpu"  # the profile folder holding runs/ (tables/ and figures/ are written here)
SEED: int = 0  # unused: tables aggregate every seed found
PROFILE: str = "cpu"  # profile name, for the titles

# %% tags=["hide_input"]
from pathlib import Path

from IPython.display import Markdown, display

from mudenet_core import report

# %% tags=["hide_input"]
out = Path(OUT_DIR)
written = report.build_tables(out)
rendered = report.write_rendered_tables(out)
metrics = report.load_metric_tables(out)
print("tables:", ", ".join(sorted(written)))

# %% [markdown]
# ## Per-category results
# Cells: mean ± sample std over seeds (std omitted with a single seed), in percent.

# %%
for ds in sorted(metrics["dataset"].unique()):
    for metric in report.HEADLINE_METRICS:
        table = report.category_table(metrics, metric, dataset=ds)
        if not table.empty:
            display(Markdown(f"**{ds} — {metric}**"), table)
    mean, std = report.method_summary(metrics, ds)
    fig = report.bar_figure(mean, xerr=std, title=f"{ds} ({PROFILE}): mean over categories", xlim=(0, 1))
    display(report.show_figure(fig, out / "figures" / f"{ds}_methods.png"))

# %% [markdown]
# ## Paper vs ours
# Ours: mean over the categories run here. Paper: published means where a source is known (see `source`).

# %%
report.paper_vs_ours(metrics).round(1)

# %% [markdown]
# ## Ablations (MuDeNet, re-scored; mean over categories)

# %%
if "ablations" in written:
    abl = report.read_tidy([written["ablations"]], columns=report.ABLATION_COLUMNS)
    display(report.ablation_table(abl, "image_auroc"), report.ablation_table(abl, "pixel_auroc"))
    wide = report.mean_over_categories(abl, by=("ablation", "variant", "metric")).pivot_table(
        index=["ablation", "variant"], columns="metric", values="mean", sort=False)
    shown = [m for m in report.HEADLINE_METRICS if m in wide.columns]
    fig = report.bar_figure(wide[shown], title=f"ablations ({PROFILE})", xlim=(0, 1))
    display(report.show_figure(fig, out / "figures" / "ablations.png"))

# %% [markdown]
# ## Timings
# Fit time (s) and inference throughput (images/s) per method, mean over categories, on this machine.

# %%
if "timings" in written:
    tim = report.read_tidy([written["timings"]])
    summary = report.mean_over_categories(tim).pivot_table(index="method", columns="metric", values="mean")
    display(summary.round(2))
    if "fit_s" in summary.columns:
        fig = report.bar_figure(summary[["fit_s"]], title=f"fit time in seconds ({PROFILE})")
        display(report.show_figure(fig, out / "figures" / "timings.png"))
