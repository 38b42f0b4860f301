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
# # 90 · Report: tables, figures and one page per category
#
# **Purpose:** the paper-style tables and figures of this profile, built only from what the earlier notebooks
# wrote (tidy CSVs, per-image scores and maps; never checkpoints or models): per dataset the headline table with
# validation metrics beside test metrics (mean ± std over seeds), fit time and images/s; the deployment metrics at
# the validation threshold beside the oracle F1-max; per-category tables; paper vs ours; ablations and timings;
# and one page per (dataset, category) with every method side by side, ROC and PRO curves and the hardest images.
#
# **Inputs (under `OUT_DIR`):** `runs/<dataset>/<category>/seed<k>/tables/{metrics_*, timings_*, ablations}.csv`,
# `runs/.../eval/<method>/{scores.csv, maps.npy, metrics.json, val/scores.csv}`, `runs/.../splits/*.csv`.
#
# **Outputs (under `OUT_DIR`):** `tables/<dataset>.csv`, `tables/ablations.csv`, `tables/timings.csv` (tidy),
# `tables/*.md` (rendered), `figures/<dataset>_methods.png`, `figures/ablations.png`, `figures/timings.png`,
# `categories/<dataset>/<category>/index.html` (+ PNGs), linked from `index.html`.

# %% tags=["parameters"]
SMOKE: bool = False  # tiny run for CI (no effect here beyond the record)
OUT_DIR: str = "results/cpu"  # the profile folder holding runs/ (tables/, figures/, categories/ are written here)
SEED: int = 0  # unused: tables aggregate every seed found
PROFILE: str = "cpu"  # profile name, for the titles
K_HARDEST: int = 3  # hardest normal and hardest anomalous test images shown on each category page

# %% tags=["hide_input"]
from pathlib import Path

from IPython.display import HTML, Markdown, display

from mudenet_core import category_report, published, report

# %% tags=["hide_input"]
out = Path(OUT_DIR)
written = report.build_tables(out)
rendered = report.write_rendered_tables(out, profile=PROFILE)
metrics = report.load_metric_tables(out)
timings = report.load_timings(out)
print("tables:", ", ".join(sorted(written)))

# %% [markdown]
# ## Headline: validation beside test
# Mean over categories (per seed, then mean ± sample std over seeds; std omitted with a single seed), in
# percent. *val*: held-out normal training images plus synthetic anomalies (what model selection and the
# threshold may use); *test*: the test split, read once. Fit time in seconds and throughput in images/s on this
# machine. The deployment table gives the test metrics at the threshold calibrated on val (what a deployment
# gets) beside F1-max, the oracle that picks the best threshold on test.

# %%
for ds in sorted(metrics["dataset"].unique()):
    display(Markdown(f"**{ds}** — summary"), report.headline_table(metrics, timings, dataset=ds))
    deployment = report.deployment_table(metrics, dataset=ds)
    if not deployment.empty:
        display(Markdown(f"**{ds}** — deployment (test, at the val threshold) vs oracle F1-max"), deployment)
    mean, std = report.method_summary(metrics, ds)
    if not mean.empty:
        fig = report.bar_figure(mean, xerr=std, title=f"{ds} ({PROFILE}): test, mean over categories", xlim=(0, 1))
        display(report.show_figure(fig, out / "figures" / f"{ds}_methods.png"))

# %% [markdown]
# ## Per-category results (test)

# %%
for ds in sorted(metrics["dataset"].unique()):
    for metric in report.HEADLINE_METRICS:
        table = report.category_table(metrics, metric, dataset=ds)
        if not table.empty:
            display(Markdown(f"**{ds} — {metric}**"), table)

# %% [markdown]
# ## One page per category
# Every method side by side (val and test), ROC and PRO curves of all methods, and the hardest test images
# with every method's map; written without code and linked from the profile's `index.html`.

# %%
pages = category_report.write_category_pages(out, k_normal=K_HARDEST, k_anomalous=K_HARDEST, profile=PROFILE)
display(HTML("<ul>" + "".join(f"<li><code>{p.relative_to(out)}</code></li>" for p in pages) + "</ul>"))

# %% [markdown]
# ## Paper vs ours
# Each published number beside our test result of the same method with a matching config (named per row);
# rows that compare nothing are not shown, and the sentence below the table lists what is published but not run.

# %%
table, not_run = published.render_paper_vs_ours(
    published.paper_vs_ours(metrics, published.run_configs(out), profile=PROFILE))
display(table if not table.empty else Markdown("_No result of ours matches a published config._"))
if not_run:
    display(Markdown(not_run))

# %% [markdown]
# ## Ablations (MuDeNet, re-scored; test, mean over categories)

# %%
if "ablations" in written:
    abl = report.read_tidy([written["ablations"]], columns=report.ABLATION_COLUMNS)
    display(report.ablation_table(abl, "image_auroc"), report.ablation_table(abl, "pixel_auroc"))
    abl_test = abl[abl["split"] == "test"]
    wide = report.mean_over_categories(abl_test, by=("ablation", "variant", "metric")).pivot_table(
        index=["ablation", "variant"], columns="metric", values="mean", sort=False)
    shown = [m for m in report.HEADLINE_METRICS if m in wide.columns]
    fig = report.bar_figure(wide[shown], title=f"ablations ({PROFILE}, test)", xlim=(0, 1))
    display(report.show_figure(fig, out / "figures" / "ablations.png"))

# %% [markdown]
# ## Timings
# Fit time (s) and inference throughput (images/s) per method, mean over categories, on this machine.

# %%
if "timings" in written:
    display(report.timings_table(timings))
    summary = report.mean_over_categories(timings, by=("method", "metric")).pivot_table(
        index="method", columns="metric", values="mean")
    if "fit_s" in summary.columns:
        fig = report.bar_figure(summary[["fit_s"]], title=f"fit time in seconds ({PROFILE})")
        display(report.show_figure(fig, out / "figures" / "timings.png"))

# %% [markdown]
# ## Tracked runs (MLflow)
# Every fit of this profile as an MLflow run (`mlflow.db` in `OUT_DIR`; browse it with
# `mlflow ui --backend-store-uri sqlite:///<OUT_DIR>/mlflow.db`); empty when tracking was off.

# %%
from mudenet_core import tracking  # noqa: E402

display(tracking.search_runs(tracking.tracking_uri(out)))
