"""Generic pretrained teachers: exact resume of the distillation script, loading into MuDeNet, errors."""

import dataclasses
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mudenet_core import teacher_zoo
from mudenet_core.io import load_checkpoint
from mudenet_core.methods import load_config
from mudenet_core.mudenet import MuDeNet, MuDeNetConfig
from mudenet_core.teacher_zoo import GenericTeacherConfig, PretrainedTeacherError

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[2]
SHIPPED_W32 = teacher_zoo.WEIGHTS_DIR / "teacher_efficientnet_lite0_128px_c64_w32.pt"


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """Eight random PNGs of varying size (two held out)."""
    folder = tmp_path_factory.mktemp("generic_images")
    rng = np.random.default_rng(0)
    for i in range(8):
        h, w = 72 + 4 * i, 96 - 2 * i
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    return folder


def tiny_config(folder: Path, **kw) -> GenericTeacherConfig:
    base = dict(image_size=64, backbone="efficientnet_lite0", pretrained=False, width=8, out_channels=8,
                folders=(str(folder),), heldout_images=2, load_size=72, stats_crops=8, steps=4, batch_size=2,
                checkpoint_every=2, eval_batch_size=4)
    return GenericTeacherConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def tiny_teacher(image_folder, tmp_path_factory) -> tuple[Path, dict]:
    """A teacher file distilled in 4 uninterrupted steps (random backbone), and its summary."""
    out = tmp_path_factory.mktemp("tiny_teacher") / "teacher.pt"
    res = teacher_zoo.distill_generic_teacher(tiny_config(image_folder), out, work_dir=out.parent / "work",
                                              show_progress=False, log=lambda m: None)
    return out, res


# MuDeNet config with the tiny teacher's architecture
TINY_MUDENET = {
    "image_size": 64, "backbone": "efficientnet_lite0", "pretrained": False, "width": 8, "out_channels": 8,
    "latent_dim": 4, "ae_width": 8, "checkpoint_every": 1, "eval_batch_size": 4,
    "train": {"steps": 3, "batch_size": 2},
}


class ListDS:
    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "label": 0}


def datasets(size: int):
    g = torch.Generator().manual_seed(1)
    train = ListDS(torch.randn(4, 3, size, size, generator=g))
    return train, ListDS(torch.randn(2, 3, size, size, generator=g))


def assert_same_state(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_random_crops_are_seeded_and_draw_the_same_stream_whatever_is_enabled(image_folder):
    cfg = tiny_config(image_folder)
    pool = teacher_zoo.load_pool(sorted(image_folder.glob("*.png")), cfg.load_size)
    assert min(pool[0].shape[-2:]) == cfg.load_size and pool[0].dtype == torch.uint8
    idx = torch.tensor([0, 3, 5])
    a = teacher_zoo.random_crops(pool, idx, cfg, torch.Generator().manual_seed(0))
    b = teacher_zoo.random_crops(pool, idx, cfg, torch.Generator().manual_seed(0))
    assert a.shape == (3, 3, 64, 64) and torch.equal(a, b)
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    plain = dataclasses.replace(cfg, hflip=False, vflip=False, color_jitter=0.0, grayscale_p=0.0)
    teacher_zoo.random_crops(pool, idx, cfg, g1)
    teacher_zoo.random_crops(pool, idx, plain, g2)
    assert torch.equal(g1.get_state(), g2.get_state())


def test_distillation_resumes_exactly_two_plus_two_steps_equal_four(image_folder, tiny_teacher, tmp_path):
    ref_path, ref = tiny_teacher
    cfg = tiny_config(image_folder)
    out, work = tmp_path / "teacher.pt", tmp_path / "work"
    quiet = dict(show_progress=False, log=lambda m: None)
    # a budget of 0 minutes stops at the first checkpoint: step 2 of 4
    first = teacher_zoo.distill_generic_teacher(cfg, out, work_dir=work, max_minutes=0, **quiet)
    assert first["status"] == "stopped" and first["step"] == 2 and not out.exists()
    assert load_checkpoint(work / "last.pt")["loop_state"]["step"] == 2
    with pytest.raises(FileExistsError, match="resume"):
        teacher_zoo.distill_generic_teacher(cfg, out, work_dir=work, **quiet)
    second = teacher_zoo.distill_generic_teacher(cfg, out, work_dir=work, resume=True, **quiet)
    assert second["status"] == "done"

    a, b = teacher_zoo.load_teacher_file(ref_path), teacher_zoo.load_teacher_file(out)
    assert_same_state(a["state_dict"], b["state_dict"])
    for k in ("channel_idx", "target_mean", "target_std"):
        assert torch.equal(a[k], b[k]), k
    assert second["L_dist"] == ref["L_dist"] and len(ref["L_dist"]) == 4
    assert a["heldout_L_dist"] == b["heldout_L_dist"] and [s for s, _ in a["heldout_L_dist"]] == [0, 2, 4]
    assert a["resumed_at"] == [] and b["resumed_at"] == [2]
    curve = Path(str(out.with_suffix("")) + "_curve.csv").read_text()
    assert curve == Path(str(ref_path.with_suffix("")) + "_curve.csv").read_text()
    assert Path(str(out.with_suffix("")) + "_curve.png").is_file()


def test_teacher_file_is_weights_only_and_self_describing(tiny_teacher):
    path, _ = tiny_teacher
    d = torch.load(path, map_location="cpu", weights_only=True)
    assert d["format"] == teacher_zoo.FILE_FORMAT
    assert GenericTeacherConfig.from_dict(d["config"]) == tiny_config(Path(d["config"]["folders"][0]))
    assert d["channel_idx"].dtype == torch.long and d["target_std"].min() > 0
    assert {"git_sha", "command", "steps", "heldout_L_dist"} <= set(d)
    assert all(v.dtype in (torch.float32, torch.long) for v in d["state_dict"].values())  # fp32 weights


def test_pretrained_init_keeps_the_file_teacher_bit_for_bit_through_stage_2(tiny_teacher):
    path, _ = tiny_teacher
    cfg = MuDeNetConfig.from_dict({**TINY_MUDENET, "distill": {"init": "pretrained",
                                                               "pretrained_path": str(path)}})
    det = MuDeNet(cfg)
    log = det.fit(*datasets(64), generator=torch.Generator().manual_seed(0), show_progress=False)
    f = teacher_zoo.load_teacher_file(path)
    assert_same_state(det.nets.teacher.state_dict(), f["state_dict"])  # after stage 2 too
    for k in ("channel_idx", "target_mean", "target_std"):
        assert torch.equal(getattr(det.nets, k), f[k]), k
    assert log["distill"]["init"] == "pretrained" and log["distill"]["time_s"] == 0.0
    assert log["distill"]["L_dist"] == [] and len(log["train"]["L"]) == 3
    assert not torch.equal(det.nets.teacher_std, torch.ones_like(det.nets.teacher_std))  # statistics computed


def test_pretrained_fine_tune_changes_weights_keeps_target_units_and_resumes(tiny_teacher, tmp_path):
    path, _ = tiny_teacher
    distill = {"init": "pretrained", "pretrained_path": str(path), "steps": 2, "batch_size": 2}
    cfg = MuDeNetConfig.from_dict({**TINY_MUDENET, "distill": distill})
    train_ds, val_ds = datasets(64)
    ref = MuDeNet(cfg)
    log_ref = ref.distill(train_ds, generator=torch.Generator().manual_seed(0), show_progress=False)
    f = teacher_zoo.load_teacher_file(path)
    assert log_ref["distill"]["init"] == "pretrained" and len(log_ref["distill"]["L_dist"]) == 2
    assert log_ref["distill"]["pretrained_path"] == str(path)
    assert not torch.equal(ref.nets.teacher.stem[0].weight, f["state_dict"]["stem.0.weight"])
    assert torch.equal(ref.nets.target_mean, f["target_mean"])
    assert torch.equal(ref.nets.channel_idx, f["channel_idx"])

    def stop_at_1(stage, step, losses):
        if stage == "distill" and step == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        MuDeNet(cfg).distill(train_ds, generator=torch.Generator().manual_seed(0), show_progress=False,
                             checkpoint_dir=tmp_path, callback=stop_at_1)
    det = MuDeNet(cfg)
    log = det.distill(train_ds, generator=torch.Generator().manual_seed(0), show_progress=False,
                      checkpoint_dir=tmp_path, resume=True)
    assert log["distill"]["L_dist"] == log_ref["distill"]["L_dist"]
    assert_same_state(det.nets.state_dict(), ref.nets.state_dict())


def test_mismatched_config_raises_a_clear_error(tiny_teacher):
    cpu = load_config("mudenet", "cpu")
    odd = dataclasses.replace(cpu, width=24, distill=dataclasses.replace(cpu.distill, init="pretrained"))
    with pytest.raises(PretrainedTeacherError, match="teacher_efficientnet_lite0_128px_c64_w24.pt"):
        MuDeNet(odd).fit(*datasets(128), generator=torch.Generator().manual_seed(0), show_progress=False)
    path, _ = tiny_teacher
    other = MuDeNetConfig.from_dict({**TINY_MUDENET, "level_kernels": [3, 3, 3],
                                     "distill": {"init": "pretrained", "pretrained_path": str(path)}})
    msg = r"level_kernels: file=\(3, 3, 5\) vs config=\(3, 3, 3\)"
    with pytest.raises(PretrainedTeacherError, match=msg):
        MuDeNet(other).fit(*datasets(64), generator=torch.Generator().manual_seed(0), show_progress=False)
    with pytest.raises(PretrainedTeacherError, match="no such file"):
        teacher_zoo.find_pretrained_teacher(other, "does/not/exist.pt")


def test_shipped_teachers_load_weights_only_and_serve_the_cpu_architecture():
    files = sorted(teacher_zoo.WEIGHTS_DIR.glob("teacher_*.pt"))
    assert SHIPPED_W32 in files
    for p in files:
        d = teacher_zoo.load_teacher_file(p)  # torch.load(weights_only=True)
        g = GenericTeacherConfig.from_dict(d["config"])
        assert p.name == teacher_zoo.teacher_file_name(g.backbone, image_size=g.image_size,
                                                       out_channels=g.out_channels, width=g.width)
        assert g.pretrained and d["command"].startswith("python scripts/distill_generic_teacher.py")
    cpu = load_config("mudenet", "cpu")
    assert cpu.distill.init == "scratch"  # the profile's default is unchanged
    w32 = dataclasses.replace(cpu, width=32, distill=dataclasses.replace(cpu.distill, init="pretrained"))
    assert teacher_zoo.find_pretrained_teacher(w32) == SHIPPED_W32


def test_shipped_w32_teacher_survives_fit_unchanged():
    cpu = load_config("mudenet", "cpu")
    # the cpu profile's distill.steps (200) would fine-tune the teacher: steps=0 keeps it as shipped
    cfg = dataclasses.replace(cpu, width=32, checkpoint_every=0, eval_batch_size=4,
                              distill=dataclasses.replace(cpu.distill, init="pretrained", steps=0),
                              train=dataclasses.replace(cpu.train, steps=1, batch_size=2))
    det = MuDeNet(cfg)
    det.fit(*datasets(128), generator=torch.Generator().manual_seed(0), show_progress=False)
    assert_same_state(det.nets.teacher.state_dict(), teacher_zoo.load_teacher_file(SHIPPED_W32)["state_dict"])


def test_script_cli_writes_a_loadable_teacher(image_folder, tmp_path):
    spec = importlib.util.spec_from_file_location("distill_generic_teacher",
                                                  REPO / "scripts" / "distill_generic_teacher.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "t.pt"
    argv = ["distill", "--width", "8", "--out-channels", "8", "--image-size", "64", "--steps", "2",
            "--batch-size", "2", "--out", str(out), "--work-dir", str(tmp_path / "work"), "--quiet",
            "--set", "pretrained=false", "--set", f"folders=[{image_folder}]", "--set", "heldout_images=2",
            "--set", "load_size=72", "--set", "stats_crops=4", "--set", "checkpoint_every=2"]
    assert script.main(argv) == 0
    d = teacher_zoo.load_teacher_file(out)
    assert d["steps"] == 2 and "--width 8" in d["command"]
    with pytest.raises(FileExistsError, match="overwrite"):
        script.main(argv)
