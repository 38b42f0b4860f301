"""anomalib side of ``benchmarks/peers.py``; runs in the separate anomalib venv, never in the project's.

Builds anomalib's own torch model (``PatchcoreModel`` / ``PadimModel``) on timm's ``tf_efficientnet_lite0``
without downloading anything (``pre_trained=False``), loads our Lite0 ImageNet weights renamed for timm,
fits it on the training tensors exactly as anomalib's Lightning modules do (training-mode forward passes
that collect embeddings, then ``subsample_embedding`` / ``fit``), and writes the test maps and scores.
The images arrive ImageNet-normalised from our pipeline and are converted to the Lite normalisation
``(255 x - 127) / 128`` that the weights were trained with (what our backbone does internally). PaDiM's
random channel subset (``PadimModel.idx``) is replaced by the one our PaDiM fitted with (``--channel-idx``).

Prints one JSON line: fit_s, predict_s, version.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
LITE_MEAN, LITE_STD = 127.0 / 255.0, 128.0 / 255.0


def to_lite(x: torch.Tensor) -> torch.Tensor:
    """ImageNet-normalised (B, 3, H, W) -> Lite-normalised (B, 3, H, W)."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x * std + mean - LITE_MEAN) / LITE_STD


def build(method: str, layers: list[str], args) -> torch.nn.Module:
    if method == "patchcore":
        from anomalib.models.image.patchcore.torch_model import PatchcoreModel

        model = PatchcoreModel(
            layers=layers,
            backbone="tf_efficientnet_lite0",
            pre_trained=False,
            num_neighbors=args.num_neighbors,
        )
    else:
        from anomalib.models.image.padim.torch_model import PadimModel

        model = PadimModel(
            backbone="tf_efficientnet_lite0", layers=layers, pre_trained=False, n_features=args.n_features
        )
        if args.channel_idx is not None:  # the subset our PaDiM drew, instead of anomalib's own draw
            idx = torch.load(args.channel_idx, map_location="cpu", weights_only=True).long()
            if idx.shape != model.idx.shape or int(idx.max()) >= model.n_features_original:
                raise SystemExit(
                    f"--channel-idx: {tuple(idx.shape)} indices up to {int(idx.max())}, expected "
                    f"{tuple(model.idx.shape)} below {model.n_features_original}"
                )
            model.idx = idx
    net = model.feature_extractor.feature_extractor  # timm features_only network
    state = torch.load(args.weights, map_location="cpu", weights_only=True)
    missing, unexpected = net.load_state_dict(state, strict=False)
    head = {"conv_head.weight", "classifier.weight", "classifier.bias"}
    bad_unexpected = [k for k in unexpected if k not in head and not k.startswith("bn2.")]
    if missing or bad_unexpected:
        raise SystemExit(f"weight mapping mismatch: missing {missing}, unexpected {bad_unexpected}")
    return model


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("method", choices=["patchcore", "padim"])
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--weights", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--layers", nargs="+", required=True)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--coreset-ratio", type=float, default=0.1)
    p.add_argument("--num-neighbors", type=int, default=9)
    p.add_argument("--n-features", type=int, default=100)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--channel-idx", type=Path, help="PaDiM: saved (d,) indices to use as PadimModel.idx")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)  # anomalib draws PaDiM's channels and the coreset start with the global RNG
    import anomalib

    data = torch.load(args.data, weights_only=True)
    model = build(args.method, args.layers, args)
    t0 = time.perf_counter()
    model.train()
    with torch.no_grad():
        for s in range(0, len(data["train"]), args.batch):
            model(to_lite(data["train"][s : s + args.batch]))
        if args.method == "patchcore":
            model.subsample_embedding(args.coreset_ratio)
        else:
            model.fit()
    fit_s = time.perf_counter() - t0
    model.eval()
    maps, scores = [], []
    t0 = time.perf_counter()
    with torch.no_grad():
        for s in range(0, len(data["test"]), args.batch):
            out = model(to_lite(data["test"][s : s + args.batch]))
            maps.append(
                out.anomaly_map.reshape(out.anomaly_map.shape[0], *out.anomaly_map.shape[-2:]).numpy()
            )
            scores.append(out.pred_score.reshape(-1).double().numpy())
    predict_s = time.perf_counter() - t0
    np.save(args.out / "maps.npy", np.concatenate(maps).astype(np.float32))
    np.save(args.out / "scores.npy", np.concatenate(scores))
    print(json.dumps({"fit_s": fit_s, "predict_s": predict_s, "version": anomalib.__version__}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
