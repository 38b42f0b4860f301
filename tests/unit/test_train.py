import pytest
import torch

from mudenet_core.io import CheckpointError, load_checkpoint
from mudenet_core.mudenet import ARCHITECTURE_KEYS, MuDeNet, MuDeNetConfig
from mudenet_core.train import EpochSampler, steps_for

TINY = {
    "image_size": 64,
    "backbone": "efficientnet_lite0",
    "pretrained": False,
    "width": 8,
    "out_channels": 8,
    "latent_dim": 4,
    "ae_width": 8,
    "checkpoint_every": 2,
    "eval_batch_size": 4,
    "distill": {"steps": 4, "batch_size": 2},
    "train": {"steps": 6, "batch_size": 2},
}


class ListDS:
    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "label": 0}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # tiny convolutions: one thread avoids OpenMP oversubscription on a shared 2-core machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(123)
    return ListDS(torch.randn(6, 3, 64, 64, generator=g)), ListDS(torch.randn(3, 3, 64, 64, generator=g))


class Interrupt(Exception):
    pass


def interrupt_at(stage, step):
    def cb(s, k, losses):
        if s == stage and k == step:
            raise Interrupt(f"{s} {k}")

    return cb


def test_sampler_covers_every_index_each_epoch_and_restores_state():
    s = EpochSampler(7, 3, torch.Generator().manual_seed(0))
    first = [s.next() for _ in range(2)]
    assert len(set(torch.cat(first).tolist())) == 6
    state = s.state_dict()
    a = [s.next().tolist() for _ in range(4)]
    s.load_state_dict(state)
    assert [s.next().tolist() for _ in range(4)] == a
    assert steps_for(7, 3, 2, 0) == 6


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    ref = MuDeNet(MuDeNetConfig.from_dict(TINY))
    log = ref.fit(
        *data,
        generator=torch.Generator().manual_seed(0),
        show_progress=False,
        checkpoint_dir=tmp_path_factory.mktemp("ref"),
    )
    return ref, log


@pytest.mark.parametrize("stop", [("distill", 3), ("train", 3), ("train", 4)])
def test_interrupted_run_resumes_to_identical_result(tmp_path, data, reference, stop):
    cfg = MuDeNetConfig.from_dict(TINY)
    train_ds, val_ds = data
    ref, log_ref = reference

    ckpt_dir = tmp_path / "run"
    with pytest.raises(Interrupt):
        MuDeNet(cfg).fit(
            train_ds,
            val_ds,
            generator=torch.Generator().manual_seed(0),
            show_progress=False,
            checkpoint_dir=ckpt_dir,
            callback=interrupt_at(*stop),
        )
    saved = load_checkpoint(ckpt_dir / "last.pt")
    assert saved["stage"] == stop[0] and saved["loop_state"]["step"] == stop[1] // 2 * 2  # last checkpoint
    resumed = MuDeNet(cfg)
    log = resumed.fit(
        train_ds,
        val_ds,
        generator=torch.Generator().manual_seed(0),
        show_progress=False,
        checkpoint_dir=ckpt_dir,
        resume=True,
    )

    assert log["distill"]["L_dist"] == log_ref["distill"]["L_dist"]
    for k in ("L1", "LA", "L2", "L"):
        assert log["train"][k] == log_ref["train"][k]
    sd_ref, sd = ref.nets.state_dict(), resumed.nets.state_dict()
    assert sd.keys() == sd_ref.keys()
    for k in sd:
        assert torch.equal(sd[k], sd_ref[k]), k
    x = val_ds.images
    torch.testing.assert_close(resumed.predict(x)[0], ref.predict(x)[0], rtol=0, atol=0)


def test_save_load_round_trip_and_incompatible_config(tmp_path, data):
    cfg = MuDeNetConfig.from_dict(TINY)
    det = MuDeNet(cfg)
    log = det.fit(*data, generator=torch.Generator().manual_seed(1), show_progress=False)
    assert set(log["train"]) >= {"L1", "LA", "L2", "L", "time_s"} and len(log["train"]["L"]) == 6
    assert len(log["distill"]["L_dist"]) == 4
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    maps, scores = det.predict(x)
    assert tuple(maps.shape) == (2, 1, 64, 64) and tuple(scores.shape) == (2,)
    det.save(tmp_path / "m.pt")
    back = MuDeNet.load(tmp_path / "m.pt")
    m2, s2 = back.predict(x)
    assert torch.equal(maps, m2) and torch.equal(scores, s2)
    assert torch.equal(back.nets.channel_idx, det.nets.channel_idx)
    assert back.config == det.config

    wider = cfg.replace(width=16)
    with pytest.raises(CheckpointError, match="width"):
        MuDeNet.load(tmp_path / "m.pt", expected_config=wider)
    assert "width" in ARCHITECTURE_KEYS
    with pytest.raises(CheckpointError, match="lr"):  # resuming under other training settings is refused
        MuDeNet(cfg.with_overrides(["train.lr=0.5"])).fit(
            *data,
            generator=torch.Generator().manual_seed(1),
            show_progress=False,
            checkpoint_dir=_finished_run(tmp_path, cfg, data),
            resume=True,
        )


def _finished_run(tmp_path, cfg, data):
    d = tmp_path / "finished"
    MuDeNet(cfg).fit(*data, generator=torch.Generator().manual_seed(1), show_progress=False, checkpoint_dir=d)
    return d


def test_recalibrating_with_new_scoring_needs_no_retraining(data):
    det = MuDeNet(MuDeNetConfig.from_dict(TINY))
    det.fit(*data, generator=torch.Generator().manual_seed(2), show_progress=False)
    x = data[1].images
    raw = det.predict_components(x)  # (B, 2, S, h, w)
    assert tuple(raw.shape) == (3, 2, 3, 32, 32)
    det.calibrate(
        data[1],
        det.config.scoring.replace(use_logical=False, levels=(2,), blur_sigma=0.0, normalization="minmax"),
    )
    maps, _ = det.predict(x)
    lo, hi = raw[:, 0, 1].min(), raw[:, 0, 1].max()  # val == x here: min-max of structural level 2
    want = torch.nn.functional.interpolate(
        ((raw[:, 0, 1] - lo) / (hi - lo))[:, None], size=(64, 64), mode="bilinear", align_corners=False
    )
    torch.testing.assert_close(maps, want)


def _write_pngs(folder, n, size=40, seed=0):
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")


@pytest.mark.parametrize("source, expected", [("train", 5), ("folder", 3), ("train+folder", 8)])
def test_distillation_sources(tmp_path, source, expected):
    _write_pngs(tmp_path / "generic", 3)
    cfg = MuDeNetConfig().with_overrides(
        {"image_size": 64, "distill.source": source, "distill.folder": str(tmp_path / "generic")})
    train_images = torch.randn(5, 3, 64, 64)
    images = MuDeNet(cfg)._distillation_data(train_images)
    assert images.shape == (expected, 3, 64, 64)
    if source != "folder":
        assert torch.equal(images[:5], train_images)  # the category's images come first, unchanged


def test_distillation_folder_missing_is_a_clear_error(tmp_path):
    cfg = MuDeNetConfig().with_overrides(
        {"image_size": 64, "distill.source": "train+folder", "distill.folder": str(tmp_path / "nowhere")})
    with pytest.raises(FileNotFoundError, match="nowhere"):
        MuDeNet(cfg)._distillation_data(torch.randn(2, 3, 64, 64))


def test_distillation_on_real_dtd_textures(dtd_root):
    cfg = MuDeNetConfig().with_overrides(
        {"image_size": 64, "distill.source": "train+folder", "distill.folder": str(dtd_root),
         "distill.max_images": 4})
    images = MuDeNet(cfg)._distillation_data(torch.zeros(1, 3, 64, 64))
    assert images.shape == (5, 3, 64, 64)
    assert images[1:].std() > 0.1  # real, varied textures (ImageNet-normalised)


def test_distill_then_fit_equals_one_fit(tmp_path, data, reference):
    """Stage 1 alone (``distill``), then ``fit(resume=True)``, reproduces an uninterrupted ``fit`` exactly."""
    cfg = MuDeNetConfig.from_dict(TINY)
    train_ds, val_ds = data
    ref, log_ref = reference
    ckpt_dir = tmp_path / "run"
    log1 = MuDeNet(cfg).distill(train_ds, generator=torch.Generator().manual_seed(0), show_progress=False,
                                checkpoint_dir=ckpt_dir)
    assert "train" not in log1 and len(log1["distill"]["L_dist"]) == TINY["distill"]["steps"]
    assert load_checkpoint(ckpt_dir / "last.pt")["stage"] == "train"
    det = MuDeNet(cfg)
    log = det.fit(train_ds, val_ds, generator=torch.Generator().manual_seed(0), show_progress=False,
                  checkpoint_dir=ckpt_dir, resume=True)
    assert log["distill"]["L_dist"] == log_ref["distill"]["L_dist"]
    assert log["train"]["L"] == log_ref["train"]["L"]
    x = val_ds.images
    torch.testing.assert_close(det.predict(x)[0], ref.predict(x)[0], rtol=0, atol=0)
