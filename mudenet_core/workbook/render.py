"""HTML: each executed notebook beside its ``.ipynb``, and the profile's ``index.html``."""

from __future__ import annotations

from pathlib import Path

from mudenet_core.workbook.plan import Plan


def render_html(ipynb: Path, html_path: Path, *, no_input: bool) -> Path:
    """Render an executed notebook to static HTML (images inline); ``hide_input`` cells lose their code."""
    import nbformat
    from nbconvert import HTMLExporter
    from nbconvert.preprocessors import TagRemovePreprocessor
    from traitlets.config import Config

    from mudenet_core.io import atomic_write_text

    c = Config()
    c.TagRemovePreprocessor.remove_input_tags = {"hide_input"}
    c.TagRemovePreprocessor.remove_cell_tags = {"remove_cell"}
    c.TagRemovePreprocessor.enabled = True
    exporter = HTMLExporter(config=c)
    exporter.register_preprocessor(TagRemovePreprocessor(config=c), enabled=True)
    exporter.exclude_input = no_input
    exporter.exclude_input_prompt = no_input
    exporter.exclude_output_prompt = no_input
    body, _ = exporter.from_notebook_node(nbformat.read(ipynb, as_version=4))
    return atomic_write_text(html_path, body)


def protocol(plan: Plan, manifest: dict) -> str:
    """The index's protocol line: every run in the profile folder and the commands that produced them."""
    keys = [k.split("/") for k in manifest.get("runs", {})] or [
        [k.dataset, k.category, f"seed{k.seed}"] for k in plan.runs]
    datasets = sorted({k[0] for k in keys})
    cats = sorted({f"{k[0]}/{k[1]}" for k in keys})
    seeds = sorted({k[2].removeprefix("seed") for k in keys})
    commands = "; ".join(dict.fromkeys(  # each distinct command once, in order
        "python run_all.py " + " ".join(inv.get("argv", [])) for inv in manifest.get("invocations", [])))
    return (
        f"Protocol: profile '{plan.profile}' (params/{plan.profile}.yaml); dataset(s) {', '.join(datasets)}; "
        f"categories {', '.join(cats)}; seeds {', '.join(seeds)}; "
        f"methods {', '.join(plan.methods)}. "
        "Models train on train/good only; normalisation and thresholds are calibrated on a validation split "
        "carved from train/good; metrics are computed on the full test split (image AUROC, pixel AUROC, "
        "AU-PRO up to FPR 0.3, normalised)." + (f" Commands: {commands}." if commands else "")
    )


def write_index(plan: Plan, manifest: dict) -> Path:
    """``<profile_dir>/index.html`` (when the report notebook has written ``tables/``)."""
    from mudenet_core import report

    index = plan.profile_dir / "index.html"
    if (plan.profile_dir / "tables").is_dir():
        report.write_index(
            plan.profile_dir,
            manifest=manifest,
            title=f"MuDeNet workbook — profile {plan.profile}" + (" (reference)" if plan.reference else ""),
            protocol=protocol(plan, manifest),
        )
    return index
