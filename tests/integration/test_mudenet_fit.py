import pytest
import torch

from mudenet_core import harness
from mudenet_core.data import DataConfig, make_splits
from mudenet_core.methods import get_method, load_config
from mudenet_core.mudenet import MuDeNet

pytestmark = pytest.mark.usefixtures("one_thread")


def test_smoke_profile_fits_and_evaluates_on_generated_data(synthetic_root, tmp_path):
    det_cls, cfg_cls = get_method("mudenet")
    assert det_cls is MuDeNet
    cfg = load_config("mudenet", "smoke")
    splits = make_splits(
        DataConfig(dataset="synthetic", root=str(synthetic_root), category="plate", image_size=cfg.image_size)
    )
    det = det_cls(cfg)
    log = det.fit(
        splits.train,
        splits.val,
        generator=torch.Generator().manual_seed(0),
        show_progress=False,
        checkpoint_dir=tmp_path / "ckpt",
    )
    assert len(log["train"]["L"]) == cfg.train.steps and log["time_s"] > 0
    assert all(torch.isfinite(torch.tensor(log["train"][k])).all() for k in ("L1", "LA", "L2", "L"))
    result = harness.evaluate(det, splits.test, show_progress=False)
    for k in ("image_auroc", "pixel_auroc", "au_pro"):
        assert 0.0 <= result.metrics[k] <= 1.0
    assert result.maps.shape[1:] == (cfg.image_size, cfg.image_size)
    # the finished fit checkpoint is loadable and predicts the same maps
    back = MuDeNet.load(tmp_path / "ckpt" / "last.pt")
    x = torch.stack([splits.test[i]["image"] for i in range(2)])
    torch.testing.assert_close(back.predict(x)[0], det.predict(x)[0], rtol=0, atol=0)
