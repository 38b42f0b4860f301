"""The static HTML of a profile: ``<profile>/index.html`` and the table and page helpers the pages share.

:func:`write_index` reads only what :mod:`mudenet_core.report` builds (``tables/*.csv``, ``figures/*.png``),
the runs' configs (for paper vs ours, :mod:`mudenet_core.published`) and the rendered notebook pages; the
category pages (:mod:`mudenet_core.category_report`) use :func:`html_table` and :func:`html_page` too.

Example:
    >>> t = html_table(pd.DataFrame({"a": [0.5]}, index=pd.Index(["Mean"], name="k")))
    >>> t.count("<td>"), '<tr class="mean"><td>Mean</td><td>0.5</td>' in t
    (2, True)
"""

from __future__ import annotations

import html
import os
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from mudenet_core.io import atomic_write_text
from mudenet_core.published import paper_vs_ours, render_paper_vs_ours, run_configs
from mudenet_core.report import (
    ABLATION_COLUMNS,
    HEADLINE_METRICS,
    PROTOCOL_NOTE,
    ablation_table,
    category_table,
    deployment_table,
    format_cell,
    headline_table,
    load_metric_tables,
    load_timings,
    read_tidy,
    timings_table,
)

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1200px;
color:#222;line-height:1.4;padding:0 1rem}
h1{font-size:1.6rem}h2{font-size:1.25rem;margin-top:2rem;border-bottom:1px solid #ddd}h3{font-size:1.05rem}
table{border-collapse:collapse;margin:.6rem 0 1rem;font-size:.9rem}
th,td{border:1px solid #ccc;padding:.25rem .6rem;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
tr.mean td{font-weight:bold;background:#fafafa}
.note{color:#555;font-size:.85rem}img{max-width:100%;border:1px solid #eee;margin:.3rem 0}
code{background:#f5f5f5;padding:0 .2rem}ul.runs{columns:2}figure{display:inline-block;margin:.3rem}
"""
_CSS = CSS  # backwards-compatible name


def html_table(df: pd.DataFrame, *, table_id: str = "", index: bool = True) -> str:
    """A small static HTML table (escaped), bold "Mean" row."""
    if df.empty:
        return '<p class="note">(no data)</p>'
    d = df.reset_index() if index else df
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in d.columns)
    body = []
    for row in d.itertuples(index=False):
        cls = ' class="mean"' if str(row[0]) == "Mean" else ""
        body.append(f"<tr{cls}>" + "".join(f"<td>{html.escape(format_cell(v))}</td>" for v in row) + "</tr>")
    tid = f' id="{html.escape(table_id)}"' if table_id else ""
    return f"<table{tid}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def html_page(title: str, body: Sequence[str]) -> str:
    """A complete static HTML page with the shared inline CSS."""
    return (
        f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def category_pages(profile_dir: str | Path) -> list[Path]:
    """The category pages of a profile (``categories/<dataset>/<category>/index.html``), sorted."""
    return sorted(Path(profile_dir).glob("categories/*/*/index.html"))


def write_index(
    profile_dir: str | Path,
    *,
    title: str = "MuDeNet workbook results",
    manifest: dict | None = None,
    protocol: str = "",
) -> Path:
    """Write ``<profile_dir>/index.html``, the static results page of a profile.

    It holds the headline tables (val beside test), deployment vs oracle, per-category tables, links to the
    category pages, paper vs ours, ablations, timings, figures and links to the rendered notebooks.

    Reads only ``tables/*.csv``, ``figures/*.png``, the runs' ``eval/*/metrics.json`` (configs, for paper vs
    ours) and the rendered pages (``**/*.html``). Static HTML with inline CSS, readable without Jupyter.
    """
    profile_dir = Path(profile_dir)
    profile = str((manifest or {}).get("profile", "")) or profile_dir.name
    parts = [f"<h1>{html.escape(title)}</h1>"]
    if manifest:
        parts.append(
            f"<p class='note'>profile <code>{html.escape(str(manifest.get('profile', '')))}</code>, "
            f"git <code>{html.escape(str(manifest.get('git_sha', '')))}</code>, "
            f"finished {html.escape(str(manifest.get('finished', '')))}</p>"
        )
    if protocol:
        parts.append(f"<p class='note'>{html.escape(protocol)}</p>")
    metrics = load_metric_tables(profile_dir) if (profile_dir / "tables").is_dir() else pd.DataFrame()
    timings = load_timings(profile_dir)
    pages = category_pages(profile_dir)
    if metrics.empty:
        parts.append("<p class='note'>No result tables yet.</p>")
    else:
        parts.append(f"<p class='note'>{html.escape(PROTOCOL_NOTE)}</p>")
        for ds in sorted(metrics["dataset"].unique()):
            parts.append(f"<h2>{html.escape(ds)} — summary (mean over categories)</h2>")
            head = headline_table(metrics, timings, dataset=ds)
            parts.append(html_table(head, table_id=f"tbl-{ds}-headline"))
            dep = deployment_table(metrics, dataset=ds)
            if not dep.empty:
                parts.append("<h3>Deployment: test metrics at the threshold calibrated on val, beside the "
                             "oracle F1-max</h3>")
                parts.append(html_table(dep, table_id=f"tbl-{ds}-deployment"))
            ds_pages = [p for p in pages if p.parent.parent.name == ds]
            if ds_pages:
                parts.append(f"<p>Category pages (every method side by side, curves, hardest images):</p>"
                             f"<ul class='runs' id='pages-{html.escape(ds)}'>")
                for p in ds_pages:
                    rel = os.path.relpath(p, profile_dir)
                    parts.append(f"<li><a href='{html.escape(rel)}'>{html.escape(ds)} / "
                                 f"{html.escape(p.parent.name)}</a></li>")
                parts.append("</ul>")
            for metric in HEADLINE_METRICS:
                t = category_table(metrics, metric, dataset=ds)
                if t.empty:
                    continue
                parts.append(f"<h3>{html.escape(ds)} — {html.escape(metric)} (test, per category)</h3>")
                parts.append(html_table(t, table_id=f"tbl-{ds}-{metric}"))
        pvo = paper_vs_ours(metrics, run_configs(profile_dir), profile=profile)
        table, sentence = render_paper_vs_ours(pvo)
        parts.append(
            "<h2>Paper vs ours</h2><p class='note'>Test split, percent. Each row sets one published number "
            "beside our runs of the same method with a matching config (named in 'our config') on the same "
            "dataset; 'categories' says how many of the paper's categories our mean covers (a mean over "
            "fewer categories is not the same quantity). One source per row.</p>"
        )
        if table.empty:
            parts.append("<p class='note' id='tbl-paper-vs-ours'>No result of ours matches a published "
                         "config.</p>")
        else:
            parts.append(html_table(table, table_id="tbl-paper-vs-ours", index=False))
        if sentence:
            parts.append(f"<p class='note' id='paper-not-run'>{html.escape(sentence)}</p>")
    abl_path = profile_dir / "tables" / "ablations.csv"
    if abl_path.is_file():
        abl = read_tidy([abl_path], columns=ABLATION_COLUMNS)
        for metric in ("image_auroc", "pixel_auroc"):
            t = ablation_table(abl, metric)
            if not t.empty:
                parts.append(f"<h2>Ablations — {html.escape(metric)} (test, mean over categories)</h2>")
                parts.append(html_table(t, table_id=f"tbl-ablations-{metric}"))
    t = timings_table(timings)
    if not t.empty:
        parts.append("<h2>Timings (mean over categories)</h2>")
        parts.append(html_table(t, table_id="tbl-timings"))
    figs = sorted((profile_dir / "figures").glob("*.png"))
    if figs:
        parts.append("<h2>Figures</h2>")
        for f in figs:
            rel = os.path.relpath(f, profile_dir)
            parts.append(
                f"<figure><img src='{html.escape(rel)}' alt='{html.escape(f.stem)}'>"
                f"<figcaption class='note'>{html.escape(f.name)}</figcaption></figure>"
            )
    reports = sorted(
        p for p in profile_dir.rglob("*.html")
        if p.name != "index.html" and "categories" not in p.relative_to(profile_dir).parts[:1]
    )
    if reports:
        parts.append("<h2>Notebook reports (with code)</h2><ul class='runs'>")
        for p in reports:
            rel = os.path.relpath(p, profile_dir)
            parts.append(f"<li><a href='{html.escape(rel)}'>{html.escape(rel)}</a></li>")
        parts.append("</ul>")
    tables = sorted((profile_dir / "tables").glob("*.csv")) if (profile_dir / "tables").is_dir() else []
    if tables:
        parts.append("<h2>Tables (tidy CSV)</h2><ul>")
        for p in tables:
            rel = os.path.relpath(p, profile_dir)
            parts.append(f"<li><a href='{html.escape(rel)}'>{html.escape(rel)}</a></li>")
        parts.append("</ul>")
    return atomic_write_text(profile_dir / "index.html", html_page(title, parts))
