import copy

import pytest
import torch

from mudenet_core import train
from mudenet_core.config import ConfigError
from mudenet_core.data import AugmentConfig, BatchAugmenter, DataConfig, make_splits, normalize
from mudenet_core.io import CheckpointError, load_checkpoint
from mudenet_core.mudenet import ARCHITECTURE_KEYS, RESUME_KEYS, MuDeNet, MuDeNetConfig, _build_nets
from mudenet_core.train import EpochSampler, steps_for

pytestmark = pytest.mark.usefixtures("one_thread")

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


# ---------------------------------------------------------------------------------- on-the-fly augmentation
AUG = AugmentConfig(hflip=True, vflip=True, rotation_deg=15, color_jitter=0.1)


def _nets(seed=0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _build_nets(MuDeNetConfig.from_dict(TINY))


def _stage2(nets, images, augmenter, **kw):
    return train.train_end_to_end(nets, images, steps=6, lr=1e-3, batch_size=2, show_progress=False,
                                  generator=torch.Generator().manual_seed(0), augmenter=augmenter, **kw)


@pytest.fixture(scope="module")
def base_images():
    return torch.rand(5, 3, 64, 64, generator=torch.Generator().manual_seed(3))  # [0, 1]


def test_identity_augmenter_changes_nothing_and_a_real_one_is_used(base_images):
    images = normalize(base_images)
    plain = _stage2(_nets(), images, None)
    ident = _stage2(_nets(), images, BatchAugmenter(base_images, AugmentConfig(), seed=0))
    assert ident["L"] == plain["L"]  # identity: the same run (teacher maps cached as before)
    augmented = _stage2(_nets(), images, BatchAugmenter(base_images, AUG, seed=0))
    assert augmented["L"] != plain["L"]
    assert _stage2(_nets(), images, BatchAugmenter(base_images, AUG, seed=0))["L"] == augmented["L"]


def test_augmented_teacher_maps_are_computed_on_the_augmented_batch(base_images, monkeypatch):
    nets = _nets()
    seen = []
    real = nets.teacher_maps

    def spy(x):
        seen.append(x.clone())
        return real(x)

    monkeypatch.setattr(nets, "teacher_maps", spy)
    aug = BatchAugmenter(base_images, AUG, seed=0)
    _stage2(nets, normalize(base_images), aug)
    assert len(seen) == 6  # once per step: no cache of the un-augmented images
    sampler = train.EpochSampler(5, 2, torch.Generator().manual_seed(0))
    for step, x in enumerate(seen):
        assert torch.equal(x, aug.batch(sampler.next(), step))  # the batch the students were trained on


def test_augmented_end_to_end_training_resumes_exactly(base_images):
    images, aug = normalize(base_images), BatchAugmenter(base_images, AUG, seed=5)
    ref_nets = _nets()
    ref = _stage2(ref_nets, images, aug)

    nets, saved = _nets(), {}

    def keep(state):
        saved[state["step"]] = (copy.deepcopy(state), copy.deepcopy(nets.state_dict()))

    with pytest.raises(Interrupt):
        _stage2(nets, images, aug, checkpoint=keep, checkpoint_every=2, callback=interrupt_at("train", 3))
    state, weights = saved[2]
    resumed = _nets(seed=99)  # another initialisation: everything must come from the checkpoint
    resumed.load_state_dict(weights)
    fresh_aug = BatchAugmenter(base_images.clone(), AUG, seed=5)  # no augmenter state is carried over
    log = _stage2(resumed, images, fresh_aug, state=state)
    assert log["L"] == ref["L"] and log["L1"] == ref["L1"]
    for k, v in ref_nets.state_dict().items():
        assert torch.equal(resumed.state_dict()[k], v), k


@pytest.fixture(scope="module")
def aug_data(synthetic_root):
    cfg = DataConfig(dataset="synthetic", root=str(synthetic_root), category="weave", image_size=64,
                     val_fraction=0.25, augment=AUG)
    s = make_splits(cfg, generator=torch.Generator().manual_seed(0))
    return s.train, s.val


def test_mudenet_fit_with_augmentation_resumes_to_identical_result(tmp_path, aug_data):
    cfg = MuDeNetConfig.from_dict(TINY)
    train_ds, val_ds = aug_data
    ref = MuDeNet(cfg)
    log_ref = ref.fit(train_ds, val_ds, generator=torch.Generator().manual_seed(0), show_progress=False)
    ckpt_dir = tmp_path / "run"
    with pytest.raises(Interrupt):
        MuDeNet(cfg).fit(train_ds, val_ds, generator=torch.Generator().manual_seed(0), show_progress=False,
                         checkpoint_dir=ckpt_dir, callback=interrupt_at("train", 3))
    assert load_checkpoint(ckpt_dir / "last.pt")["augment"] == AUG.to_dict()
    det = MuDeNet(cfg)
    log = det.fit(train_ds, val_ds, generator=torch.Generator().manual_seed(0), show_progress=False,
                  checkpoint_dir=ckpt_dir, resume=True)
    assert log["distill"]["L_dist"] == log_ref["distill"]["L_dist"]
    assert log["train"]["L"] == log_ref["train"]["L"]
    x = torch.stack([val_ds[i]["image"] for i in range(len(val_ds))])
    torch.testing.assert_close(det.predict(x)[0], ref.predict(x)[0], rtol=0, atol=0)
    # resuming under another augmentation would not be exact: refused
    plain = train_ds.without_augment()
    with pytest.raises(CheckpointError, match="augmentation"):
        MuDeNet(cfg).fit(plain, val_ds, generator=torch.Generator().manual_seed(0), show_progress=False,
                         checkpoint_dir=ckpt_dir, resume=True)


def test_mudenet_augments_on_the_fly_with_a_seed_from_the_fit_generator(monkeypatch, aug_data):
    train_ds, val_ds = aug_data
    seen = []

    def spy(nets, images, **kw):
        seen.append((images, kw["augmenter"]))
        raise Interrupt

    monkeypatch.setattr(train, "train_end_to_end", spy)
    for seed in (0, 0, 1):
        with pytest.raises(Interrupt):
            MuDeNet(MuDeNetConfig.from_dict(TINY)).fit(
                train_ds, val_ds, generator=torch.Generator().manual_seed(seed), show_progress=False)
    (images, aug), (_, aug_again), (_, aug_other) = seen
    assert aug.cfg == AUG and aug.seed == aug_again.seed != aug_other.seed  # seeds follow the training seed
    # stage 2 (and distillation) see the un-augmented images; the augmenter holds them in [0, 1]
    plain = train.stack_dataset(train_ds.without_augment())
    assert torch.equal(images, plain) and torch.equal(aug.base(), plain)
    assert aug.images.min() >= 0 and aug.images.max() <= 1


def test_removed_augment_copies_key():
    with pytest.raises(ConfigError, match="augment_copies"):
        MuDeNetConfig.from_dict({"augment_copies": 1})
    assert "augment_copies" not in RESUME_KEYS
