"""Resume and overwrite that never corrupt or mix runs; one-line errors for unusable checkpoints and folders.

Each test reproduces a failure seen against the CLI before run identities existed: ``--resume`` compared only
the method config (another dataset overwrote ``split.csv`` and crashed, another root or seed silently mixed
runs, a finished run was retrained), ``--overwrite`` left the old model's evaluation and threshold behind, and
checkpoints that do not fit their config or unwritable folders gave raw tracebacks.
"""

from __future__ import annotations

import os
import shutil
import stat

import pytest
import torch
import yaml

from mudenet_core import cli, io
from mudenet_core.cli.identity import index_fingerprint

CATEGORY = "plate"
TINY = ["--profile", "smoke", "--device", "cpu", "--no-progress", "distill.steps=2", "train.steps=2"]

pytestmark = pytest.mark.usefixtures("one_thread")


def train_argv(root, out, *extra):
    return ["train", "--data-root", str(root), "--category", CATEGORY, "--output-dir", str(out), *TINY,
            *extra]


@pytest.fixture(scope="module")
def data_copy(synthetic_root, tmp_path_factory):
    """A private copy of the generated dataset (tests here change files in it)."""
    dst = tmp_path_factory.mktemp("data") / "synthetic"
    shutil.copytree(synthetic_root, dst)
    return dst


@pytest.fixture(scope="module")
def finished(data_copy, tmp_path_factory):
    """A finished tiny MuDeNet run on the data copy."""
    out = tmp_path_factory.mktemp("runs") / "run"
    assert cli.main(train_argv(data_copy, out)) == 0
    return out


def stamp(path):
    st = path.stat()
    return st.st_mtime_ns, st.st_size, path.read_bytes()


def refused(capsys, argv, *needles):
    capsys.readouterr()
    rc = cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    assert len(err) == 1 and err[0].startswith("mudenet: error: cannot resume"), err
    for n in needles:
        assert n in err[0], (n, err[0])
    return err[0]


def test_run_record_holds_identity_status_and_threads(finished, data_copy):
    rec = yaml.safe_load((finished / "config.yaml").read_text())
    assert rec["status"] == "finished" and rec["threads"] == torch.get_num_threads()
    ident = rec["identity"]
    assert ident["seed"] == 0 and ident["command"] == "train" and ident["method"] == "mudenet"
    assert ident["code_hash"] == io.code_hash()
    assert ident["data_config"]["root"] == str(data_copy.resolve())
    assert ident["method_config"]["train"]["steps"] == 2


def test_resume_with_another_dataset_is_refused_before_anything_is_written(finished, data_copy, capsys):
    before = {p.name: stamp(p) for p in finished.iterdir() if p.is_file()}
    refused(capsys, train_argv(data_copy, finished, "--resume", "--category", "weave"),
            "data_config.category", "'plate'", "'weave'")
    assert {p.name: stamp(p) for p in finished.iterdir() if p.is_file()} == before  # split.csv untouched


def test_resume_with_another_root_of_the_same_size_is_refused(finished, data_copy, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(data_copy, other)
    refused(capsys, train_argv(other, finished, "--resume"), "data_config.root")


def test_resume_with_another_seed_is_refused(finished, data_copy, capsys):
    refused(capsys, train_argv(data_copy, finished, "--resume", "--seed", "1"), "seed: recorded 0, now 1")


def test_resume_with_another_method_config_is_refused(finished, data_copy, capsys):
    argv = train_argv(data_copy, finished, "--resume")
    argv[argv.index("train.steps=2")] = "train.steps=3"
    refused(capsys, argv, "method_config.train.steps: recorded 2, now 3")


def test_resume_of_a_finished_run_does_nothing(finished, data_copy, capsys):
    model = stamp(finished / "model.pt")
    assert cli.main(train_argv(data_copy, finished, "--resume")) == 0
    assert "nothing to do" in capsys.readouterr().err
    assert stamp(finished / "model.pt") == model


def test_resume_after_a_training_image_changed_in_place_is_refused(data_copy, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(data_copy, data)
    out = tmp_path / "run"
    assert cli.main(train_argv(data, out)) == 0
    img = sorted((data / CATEGORY / "train" / "good").iterdir())[0]
    img.unlink()
    refused(capsys, train_argv(data, out, "--resume"), "data_index")


def test_index_fingerprint_sees_content_and_location():
    import pandas as pd

    def index(paths):
        return pd.DataFrame({"image_path": [str(p) for p in paths], "mask_path": [""] * len(paths)})

    import tempfile
    from pathlib import Path

    d = Path(tempfile.mkdtemp())
    a, b = d / "a.png", d / "b.png"
    a.write_bytes(b"1234")
    b.write_bytes(b"5678")
    fp = index_fingerprint(index([a, b]))
    assert index_fingerprint(index([b, a])) == fp  # row order does not matter
    assert index_fingerprint(index([a])) != fp  # a file left out
    os.utime(b, ns=(b.stat().st_atime_ns, b.stat().st_mtime_ns + 10**9))  # rewritten in place
    assert index_fingerprint(index([a, b])) != fp


def test_overwrite_clears_the_old_models_outputs(data_copy, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(train_argv(data_copy, out)) == 0
    assert cli.main(["evaluate", "--checkpoint", str(out), "--no-progress", "--n-overlays", "1"]) == 0
    assert (out / "evaluate" / "metrics.json").is_file()
    (out / "notes.txt").write_text("mine")
    assert cli.main(train_argv(data_copy, out, "--overwrite", "train.steps=1")) == 0
    assert not (out / "evaluate").exists()  # the old model's evaluation is gone
    assert (out / "notes.txt").read_text() == "mine"  # files the command does not own stay
    assert yaml.safe_load((out / "config.yaml").read_text())["method_config"]["train"]["steps"] == 1
    capsys.readouterr()


def test_evaluate_overwrite_leaves_no_stale_overlay(finished, capsys):
    ev = finished / "evaluate_stale"
    argv = ["evaluate", "--checkpoint", str(finished), "--output-dir", str(ev), "--no-progress",
            "--n-overlays", "1"]
    assert cli.main(argv) == 0
    stale = ev / "overlays" / "9999_old_image.png"
    stale.write_bytes(b"old")
    assert cli.main([*argv, "--overwrite"]) == 0
    assert not stale.exists() and len(list((ev / "overlays").iterdir())) == 1
    capsys.readouterr()


def _one_line_error(capsys, argv):
    capsys.readouterr()
    rc = cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("mudenet: error: "), err
    return err[0]


def test_checkpoint_whose_weights_do_not_fit_its_config(finished, tmp_path, capsys):
    ckpt = torch.load(finished / "model.pt", weights_only=False)
    bad = tmp_path / "wider.pt"
    torch.save({**ckpt, "config": {**ckpt["config"], "width": 2 * ckpt["config"]["width"]}}, bad)
    err = _one_line_error(capsys, ["evaluate", "--method", "mudenet", "--checkpoint", str(bad)])
    assert str(bad) in err and "shape mismatch" in err
    extra = tmp_path / "newer.pt"
    torch.save({**ckpt, "state_dict": {**ckpt["state_dict"], "head.extra": torch.zeros(1)}}, extra)
    err = _one_line_error(capsys, ["evaluate", "--method", "mudenet", "--checkpoint", str(extra)])
    assert str(extra) in err and "unexpected keys: head.extra" in err


def test_load_weights_names_every_kind_of_mismatch():
    net = torch.nn.Linear(3, 2)
    good = {k: v.clone() for k, v in net.state_dict().items()}
    io.load_weights(net, {k: v + 1 for k, v in good.items()}, "w.pt")
    assert torch.equal(net.bias, good["bias"] + 1)
    with pytest.raises(io.CheckpointError, match=r"w\.pt.*missing keys: bias"):
        io.load_weights(net, {"weight": good["weight"]}, "w.pt")
    with pytest.raises(io.CheckpointError, match=r"shape mismatch.*weight \(2, 4\) vs \(2, 3\)"):
        io.load_weights(net, {"weight": torch.zeros(2, 4), "bias": good["bias"]}, "w.pt")


def test_unwritable_output_folder_is_a_one_line_error(data_copy, tmp_path, capsys, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    if os.geteuid() == 0:  # root ignores permission bits: make the check see what a user would
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(locked) else real(p, mode))
    else:
        locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        err = _one_line_error(capsys, train_argv(data_copy, locked / "run"))
    finally:
        locked.chmod(0o755)
    assert "cannot write to" in err and str(locked) in err
    assert not (locked / "run").exists()


def test_atomic_writes_honour_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        path = io.save_json(tmp_path / "x.json", {"a": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


def test_stale_temporary_files_are_removed_on_the_next_start(finished, data_copy, capsys):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    stale = finished / f".model.pt.{dead}.k2j4.tmp"
    stale.write_bytes(b"half a checkpoint")
    live = finished / f".model.pt.{os.getpid()}.x9z1.tmp"  # a writer still running: kept
    live.write_bytes(b"in progress")
    assert io.clean_stale_temps(finished) == [stale]
    stale.write_bytes(b"half a checkpoint")
    assert cli.main(train_argv(data_copy, finished, "--resume")) == 0  # nothing to do, and cleaned up
    assert not stale.exists() and live.exists()
    live.unlink()
    capsys.readouterr()
