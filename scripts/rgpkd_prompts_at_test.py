"""RGPKD with and without prompts at test time, on the fitted models of a results profile (an ablation).

The committed recipe (``configs/rgpkd/cpu.yaml``) retrieves and fuses prompts at test time, as chosen on
validation. This script re-scores every fitted RGPKD model of a profile folder both ways, on the
synthetic-anomaly validation set and on the test split, without retraining: the prompt switch only changes
prediction (the bank is saved with the model). The run parameters (data root, image size, texture folder,
data overrides) are read from the profile's manifest, so the splits and the validation set are the ones the
fit used.

Writes ``<profile>/tables/rgpkd_prompts_at_test.csv`` (tidy: method, variant, dataset, category, seed, split,
metric, value, git_sha) and prints the mean ± std per variant.

Usage::

    python scripts/rgpkd_prompts_at_test.py results/reference/cpu
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import pandas as pd

from mudenet_core import experiment, harness, io
from mudenet_core.baselines.rgpkd import RGPKD

METRICS = ("image_auroc", "pixel_auroc", "au_pro")


def _parameters(manifest: dict, key: str) -> dict:
    for rec in manifest["runs"].get(key, []):
        if rec.get("notebook") == "40_baselines":
            return rec["parameters"]
    raise SystemExit(f"manifest has no 40_baselines record for {key}")


def main() -> int:
    """Re-score every fitted RGPKD model of the profile with prompts at test on and off."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("profile_dir", type=Path, help="results profile folder holding manifest.json and runs/")
    args = ap.parse_args()
    manifest = json.loads((args.profile_dir / "manifest.json").read_text())
    sha = io.git_sha()  # before anything is written
    scratch = Path(tempfile.mkdtemp(prefix="rgpkd_prompts_"))  # the run folders stay untouched
    rows = []
    for model in sorted(args.profile_dir.glob("runs/*/*/seed*/checkpoints/rgpkd/model.pt")):
        run_dir = model.parents[2]
        dataset, category, seed = run_dir.parts[-3], run_dir.parts[-2], int(run_dir.name[4:])
        p = _parameters(manifest, f"{dataset}/{category}/seed{seed}")
        scratch_run = scratch / run_dir.relative_to(args.profile_dir)
        run, _, device = experiment.start_run(scratch_run, dataset=dataset, category=category, seed=seed,
                                              device="cpu")
        splits = experiment.build_splits(run, p["DATA_ROOT"], p["IMAGE_SIZE"], p.get("DATA_OVERRIDES") or {})
        val_set = experiment.build_validation(splits, p.get("TEXTURE_DIR", ""))
        det = RGPKD.load(model, device=device)
        for prompts in (True, False):
            det.config = det.config.replace(prompts_at_test=prompts)
            for split, ds in (("val", val_set), ("test", splits.test)):
                m = harness.evaluate(det, ds, show_progress=False).metrics
                rows += [{"method": "rgpkd", "variant": f"prompts_at_test={prompts}", "dataset": dataset,
                          "category": category, "seed": seed, "split": split, "metric": k, "value": m[k],
                          "git_sha": sha} for k in METRICS]
        print(f"{dataset}/{category}/seed{seed}: done")
    shutil.rmtree(scratch, ignore_errors=True)
    df = pd.DataFrame(rows)
    io.save_csv(args.profile_dir / "tables" / "rgpkd_prompts_at_test.csv", df)
    summary = df.groupby(["dataset", "category", "variant", "split", "metric"])["value"].agg(["mean", "std"])
    print((100 * summary).round(1).to_string())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
