"""tracking.py: a fit becomes an MLflow run and a registered model; IDs resolve; failures only warn."""

from __future__ import annotations

import warnings

import pandas as pd
import pytest
import torch

from mudenet_core import experiment, harness, io, tracking


@pytest.fixture(scope="module")
def tracked(synthetic_root, tmp_path_factory, one_thread):
    """An AE (smoke profile) fitted and evaluated by the workbook under <root>/runs/..., tracking on."""
    root = tmp_path_factory.mktemp("results")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(tracking.ENV_SWITCH, "1")
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        run, g, dev = experiment.start_run(
            root / "runs" / "synthetic" / "plate" / "seed0",
            dataset="synthetic",
            category="plate",
            seed=0,
            device="cpu",
        )
        torch.set_num_threads(1)
        splits = experiment.build_splits(run, synthetic_root, 64)
        val = experiment.build_validation(splits, min_anomalous=8)
        cfg = experiment.method_config("ae", "smoke", image_size=64)
        with warnings.catch_warnings():
            warnings.simplefilter("error", tracking.TrackingWarning)  # tracking must work here
            det, info = experiment.fit_or_load(
                "ae", cfg, splits, run, generator=g, device=dev, reuse=False, val_set=val
            )
            result, _ = experiment.evaluate_method(
                det, "ae", splits, run, device=dev, config=cfg, fit_info=info
            )
        yield {
            "root": root,
            "run": run,
            "splits": splits,
            "val": val,
            "cfg": cfg,
            "info": info,
            "result": result,
            "uri": tracking.tracking_uri(root, environ={}),
        }


def test_the_store_sits_in_the_results_root(tracked):
    root = tracked["root"]
    assert (root / tracking.DB_FILE).is_file() and (root / tracking.ARTIFACT_DIR).is_dir()
    assert tracked["uri"] == f"sqlite:///{root.resolve()}/mlflow.db"
    assert tracking.results_root(tracked["run"].out_dir) == root


def test_fit_is_a_run_with_params_metrics_tags_and_a_registered_version(tracked):
    models = tracking.list_models(tracked["uri"])
    assert [m["model_id"] for m in models] == ["models:/ae-synthetic-plate/1"]
    m = models[0]
    assert (m["method"], m["dataset"], m["category"], m["seed"], m["profile"]) == (
        "ae",
        "synthetic",
        "plate",
        0,
        "smoke",
    )
    assert m["run_id"] == tracked["info"]["tracking_run_id"]
    fit_log = io.load_json(tracked["run"].checkpoint_dir("ae") / "fit_log.json")  # what the fit itself wrote
    assert m["validation"]["image_auroc"] == pytest.approx(fit_log["validation"]["image_auroc"])
    test_json = io.load_json(tracked["run"].eval_dir("ae") / "metrics.json")["metrics"]
    assert m["test"]["image_auroc"] == pytest.approx(test_json["image_auroc"])
    assert m["test"]["f1_at_threshold"] == pytest.approx(test_json["f1_at_threshold"])
    run = tracking.client(tracked["uri"]).get_run(m["run_id"])
    p, t = run.data.params, run.data.tags
    # the smoke profile (configs/ae/smoke.yaml) has epochs 2, channels [8, 16, 32, 32], latent 32
    assert (
        p["method.epochs"] == "2"
        and p["method.channels"] == "[8, 16, 32, 32]"
        and p["method.latent_dim"] == "32"
    )
    assert p["data.image_size"] == "64" and p["data.category"] == "plate"
    assert t["git_sha"] == io.git_sha() and t["config_hash"] == tracked["cfg"].config_hash()
    assert t["model_sha256"] == io.file_sha256(tracked["run"].checkpoint_dir("ae") / "model.pt")
    artefacts = {a.path for a in tracking.client(tracked["uri"]).list_artifacts(m["run_id"], "results")}
    assert {"results/metrics_ae.csv", "results/scores.csv"} <= artefacts


@pytest.mark.parametrize("form", ["models:/ae-synthetic-plate/1", "ae-synthetic-plate/1", "runs:/{run}"])
def test_every_id_form_resolves_to_the_fitted_files(tracked, form, tmp_path):
    model_id = form.format(run=tracked["info"]["tracking_run_id"])
    folder = tracking.resolve_model(model_id, uri=tracked["uri"], dst=tmp_path)
    ckpt = tracked["run"].checkpoint_dir("ae")
    assert io.file_sha256(folder / "model.pt") == io.file_sha256(ckpt / "model.pt")
    rec, why = harness.load_calibration(folder)  # threshold.json still names this model.pt
    assert rec is not None, why
    assert (
        rec["threshold"] == io.load_json(ckpt / "threshold.json")["threshold"] == tracked["info"]["threshold"]
    )


@pytest.mark.parametrize(
    "bad",
    [
        "../ae-synthetic-plate/1",
        "/etc/passwd",
        "file:///etc/passwd",
        "models:/../../etc/1",
        "ae-synthetic-plate/0",
        "ae-synthetic-plate/x",
        "models:/ae-synthetic-plate/1/extra",
        "a\\b/1",
        "",
        "  ",
        "runs:/abc",
        "~/model/1",
        "ae synthetic/1",
    ],
)
def test_malformed_and_path_like_ids_are_refused(tracked, bad):
    with pytest.raises(tracking.ModelNotFound):
        tracking.resolve_model(bad, uri=tracked["uri"])


@pytest.mark.parametrize("unknown", ["ae-synthetic-plate/2", "nosuch/1", "runs:/" + "0" * 32])
def test_unknown_ids_are_not_found(tracked, unknown):
    with pytest.raises(tracking.ModelNotFound, match="not found"):
        tracking.resolve_model(unknown, uri=tracked["uri"])


def test_reloading_a_fitted_model_logs_nothing_new(tracked, monkeypatch):
    monkeypatch.setenv(tracking.ENV_SWITCH, "1")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    t = tracked
    _, info = experiment.fit_or_load(
        "ae",
        t["cfg"],
        t["splits"],
        t["run"],
        generator=torch.Generator(),
        device="cpu",
        reuse=True,
        val_set=t["val"],
    )
    assert info["loaded"] and info["tracking_run_id"] == t["info"]["tracking_run_id"]
    assert len(tracking.list_models(t["uri"])) == 1
    runs = tracking.search_runs(t["uri"])
    assert len(runs) == 1 and {"run_id", "method", "val.image_auroc", "test.image_auroc"} <= set(runs.columns)
    assert runs.loc[0, "test.image_auroc"] == pytest.approx(t["result"].metrics["image_auroc"])


def _fit_small(root, splits, val):
    run, g, dev = experiment.start_run(root, dataset="synthetic", category="plate", seed=1, device="cpu")
    torch.set_num_threads(1)
    cfg = experiment.method_config("ae", "smoke", image_size=64, overrides=["epochs=1"])
    return run, experiment.fit_or_load(
        "ae", cfg, splits, run, generator=g, device=dev, reuse=False, val_set=val
    )


@pytest.mark.parametrize("uri", ["sqlite:////proc/no/such/dir/mlflow.db", "nosuchscheme://host/x"])
def test_a_broken_store_warns_once_and_the_results_are_written(tracked, tmp_path, monkeypatch, uri):
    monkeypatch.setenv(tracking.ENV_SWITCH, "1")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run, (det, info) = _fit_small(tmp_path / "run", tracked["splits"], tracked["val"])
        experiment.evaluate_method(
            det, "ae", tracked["splits"], run, device="cpu", config=det.config, fit_info=info
        )
    ours = [w for w in caught if issubclass(w.category, tracking.TrackingWarning)]
    assert len(ours) == 2, [str(w.message) for w in ours]  # one for the fit, one for the evaluation
    assert all(uri in str(w.message) and "\n" not in str(w.message) for w in ours)
    assert info["tracking_run_id"] is None
    ckpt = run.checkpoint_dir("ae")
    for f in ("model.pt", "threshold.json", "fit_log.json"):
        assert (ckpt / f).is_file()
    assert pd.read_csv(run.table("metrics_ae.csv"))["metric"].eq("image_auroc").any()


def test_the_switch_turns_tracking_off(tracked, tmp_path, monkeypatch):
    monkeypatch.setenv(tracking.ENV_SWITCH, "0")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run, (_, info) = _fit_small(tmp_path / "off", tracked["splits"], tracked["val"])
    assert info["tracking_run_id"] is None and (run.checkpoint_dir("ae") / "model.pt").is_file()
    assert (
        not (tmp_path / "off" / tracking.DB_FILE).exists() and not (tmp_path / "off" / "mlartifacts").exists()
    )


def test_cli_train_logs_to_the_tracking_uri(synthetic_root, tmp_path, monkeypatch, one_thread):
    from mudenet_core import cli

    uri = f"sqlite:///{tmp_path / 'cli' / 'mlflow.db'}"
    monkeypatch.setenv(tracking.ENV_SWITCH, "1")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    out = tmp_path / "ae"
    assert (
        cli.main(
            [
                "train",
                "--method",
                "ae",
                "--profile",
                "smoke",
                "--data-root",
                str(synthetic_root),
                "--category",
                "plate",
                "--output-dir",
                str(out),
                "--no-progress",
                "--threads",
                "1",
                "epochs=1",
            ]
        )
        == 0
    )
    assert (
        cli.main(
            ["evaluate", "--checkpoint", str(out), "--no-progress", "--n-overlays", "0", "--threads", "1"]
        )
        == 0
    )
    (m,) = tracking.list_models(uri)
    assert m["name"] == "ae-synthetic-plate" and m["profile"] == "custom"  # epochs=1 is not the smoke profile
    assert m["validation"]["image_auroc"] == pytest.approx(
        io.load_json(out / "validation" / "metrics.json")["metrics"]["image_auroc"]
    )
    assert m["test"]["image_auroc"] == pytest.approx(
        io.load_json(out / "evaluate" / "metrics.json")["metrics"]["image_auroc"]
    )
    folder = tracking.resolve_model(m["model_id"], uri=uri, dst=tmp_path / "dl")
    assert io.file_sha256(folder / "model.pt") == io.file_sha256(out / "model.pt")
