"""Distil a generic MuDeNet teacher once (EfficientAD-style) and ship it in mudenet_core/weights/.

Two commands:

    # distil (checkpoints in work_dirs/generic_teacher/<name>/, resumable; writes the teacher file and its
    # L_dist curve _curve.csv / _curve.png next to it)
    python scripts/distill_generic_teacher.py distill --width 32 --steps 1500 [--max-minutes 45] [--resume]

    # compare with a per-category teacher (same architecture, distilled as the profile does) on the held-out
    # generic images and the category's own images; writes <teacher>_comparison.csv
    python scripts/distill_generic_teacher.py compare --teacher mudenet_core/weights/<file>.pt \
        --category-folder ../shared/data/mpdd/metal_plate

Every run uses ``--threads`` CPU threads (default 1). The distillation config is
``mudenet_core.teacher_zoo.GenericTeacherConfig``; options not exposed as flags are set with
``--set key=value``.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from mudenet_core import io, teacher_zoo, train  # noqa: E402
from mudenet_core.teacher_zoo import GenericTeacherConfig  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface (``distill`` and ``compare``)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("distill", help="distil a generic teacher")
    d.add_argument("--width", type=int, default=32, help="teacher block channels")
    d.add_argument("--out-channels", type=int, default=64, help="C, descriptor channels")
    d.add_argument("--image-size", type=int, default=128, help="crop side")
    d.add_argument("--backbone", default="efficientnet_lite0", help="distillation backbone")
    d.add_argument("--steps", type=int, default=GenericTeacherConfig.steps, help="optimisation steps")
    d.add_argument("--batch-size", type=int, default=GenericTeacherConfig.batch_size, help="crops per step")
    d.add_argument("--seed", type=int, default=0, help="initialisation, held-out choice and crops")
    d.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other GenericTeacherConfig field (repeatable), e.g. --set lr=5e-4")
    d.add_argument("--out", default=None, help="teacher file (default: mudenet_core/weights/<standard name>)")
    d.add_argument("--work-dir", default=None, help="checkpoint folder (default: work_dirs/generic_teacher/"
                                                     "<file stem>)")
    d.add_argument("--resume", action="store_true", help="continue from the checkpoint in --work-dir")
    d.add_argument("--overwrite", action="store_true", help="replace an existing teacher file / checkpoint")
    d.add_argument("--max-minutes", type=float, default=None,
                   help="stop at the first checkpoint after this much wall time (continue with --resume)")
    d.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    d.add_argument("--quiet", action="store_true", help="no progress bar")

    c = sub.add_parser("compare", help="generic vs per-category teacher, on held-out and category images")
    c.add_argument("--teacher", required=True, help="generic teacher file")
    c.add_argument("--category-folder", required=True,
                   help="category in the MVTec layout (train/good, test/good), relative to the repo root")
    c.add_argument("--profile", default="cpu", help="MuDeNet profile whose distill settings the per-category "
                                                    "teacher uses (architecture taken from the teacher file)")
    c.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="MuDeNet config override for the per-category teacher, e.g. distill.steps=600")
    c.add_argument("--seed", type=int, default=0, help="seed of the per-category distillation")
    c.add_argument("--finetune-steps", type=int, default=None,
                   help="steps of per-category fine-tuning of the generic teacher (default: as many as the "
                        "per-category distillation; 0: none)")
    c.add_argument("--out", default=None, help="CSV (default: <teacher stem>_comparison.csv)")
    c.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    return p


def _config(args) -> GenericTeacherConfig:
    cfg = GenericTeacherConfig(image_size=args.image_size, backbone=args.backbone, width=args.width,
                               out_channels=args.out_channels, steps=args.steps, batch_size=args.batch_size,
                               seed=args.seed)
    return cfg.with_overrides(args.set) if args.set else cfg


def cmd_distill(args, argv: list[str]) -> int:
    """Distil (or resume) a generic teacher."""
    cfg = _config(args)
    name = teacher_zoo.teacher_file_name(cfg.backbone, image_size=cfg.image_size,
                                         out_channels=cfg.out_channels, width=cfg.width)
    out = Path(args.out) if args.out else teacher_zoo.WEIGHTS_DIR / name
    work = Path(args.work_dir) if args.work_dir else REPO / "work_dirs" / "generic_teacher" / out.stem
    # the reproducing command: resuming (recorded as the file's resumed_at) does not change the result
    command = " ".join(["python", "scripts/distill_generic_teacher.py",
                        *map(shlex.quote, [a for a in argv if a != "--resume"])])
    print(f"config: {cfg.to_dict()}", flush=True)
    res = teacher_zoo.distill_generic_teacher(
        cfg, out, work_dir=work, resume=args.resume, overwrite=args.overwrite, max_minutes=args.max_minutes,
        command=command, show_progress=not args.quiet, log=lambda m: print(m, flush=True))
    if res["status"] == "done":
        ho = res["heldout"]
        print(f"done: {res['step']} steps in {res['time_s']:.0f} s; train L_dist first/last-50 mean "
              f"{res['L_dist'][0]:.4f} / {sum(res['L_dist'][-50:]) / len(res['L_dist'][-50:]):.4f}; held-out "
              f"L_dist {ho[0][1]:.4f} -> {ho[-1][1]:.4f}" if ho else "", flush=True)
    return 0


class _ListDS:
    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "label": 0}


def cmd_compare(args) -> int:
    """Per-category teacher vs the generic one, each in its own target units."""
    import pandas as pd

    from mudenet_core.methods import load_config
    from mudenet_core.mudenet import MuDeNet, resolve_folder

    tpath = Path(args.teacher)
    d = teacher_zoo.load_teacher_file(tpath)
    gcfg = GenericTeacherConfig.from_dict(d["config"])
    arch = {k: getattr(gcfg, k) for k in teacher_zoo.COMPATIBILITY_KEYS}
    mcfg = load_config("mudenet", args.profile, overrides=args.override or None)
    mcfg = dataclasses.replace(mcfg, **arch, distill=dataclasses.replace(mcfg.distill, init="scratch",
                                                                         channel_seed=gcfg.channel_seed))
    root = resolve_folder(args.category_folder)
    sets = {"category_train": train.load_image_folder(root / "train" / "good", gcfg.image_size),
            "category_test_good": train.load_image_folder(root / "test" / "good", gcfg.image_size)}
    _, held_paths = teacher_zoo.split_paths(gcfg)
    sets["generic_heldout"] = teacher_zoo.center_crops(teacher_zoo.load_pool(held_paths, gcfg.load_size),
                                                       gcfg.image_size)

    # per-category teacher, distilled as the profile does (category training images, its own statistics)
    det = MuDeNet(mcfg)
    t0 = time.perf_counter()
    dlog = det.distill(_ListDS(sets["category_train"]), generator=torch.Generator().manual_seed(args.seed),
                       show_progress=False)
    cat_time = time.perf_counter() - t0
    backbone, layers = teacher_zoo._backbone(gcfg)
    teachers = {
        "per_category": (det.nets.teacher, det.nets.channel_idx, det.nets.target_mean, det.nets.target_std),
    }
    generic = teacher_zoo.DescriptorNet(gcfg.width, gcfg.out_channels, tuple(gcfg.level_blocks),
                                        tuple(gcfg.level_kernels))
    generic.load_state_dict(d["state_dict"])
    teachers["generic"] = (generic, d["channel_idx"], d["target_mean"], d["target_std"])
    # the generic teacher fine-tuned on the category (distill.init=pretrained, the per-category step count)
    ft_steps = args.finetune_steps if args.finetune_steps is not None else len(dlog["distill"]["L_dist"])
    if ft_steps > 0:
        ft_cfg = dataclasses.replace(mcfg, distill=dataclasses.replace(
            mcfg.distill, init="pretrained", pretrained_path=str(tpath.resolve()), steps=ft_steps))
        ft = MuDeNet(ft_cfg)
        t0 = time.perf_counter()
        ft.distill(_ListDS(sets["category_train"]), generator=torch.Generator().manual_seed(args.seed),
                   show_progress=False)
        print(f"fine-tuned the generic teacher for {ft_steps} steps in {time.perf_counter() - t0:.0f} s")
        teachers["generic_finetuned"] = (ft.nets.teacher, ft.nets.channel_idx, ft.nets.target_mean,
                                         ft.nets.target_std)
    rows = []
    for tname, (net, idx, mean, std) in teachers.items():
        tg = teacher_zoo.Targets(backbone, layers, idx, mean, std)
        for sname, images in sets.items():
            q = teacher_zoo.distillation_quality(net, images, tg(images), gcfg.eval_batch_size)
            for metric, value in q.items():
                rows.append({"teacher": tname, "images": sname, "n_images": len(images), "metric": metric,
                             "value": value})
            print(f"{tname:13s} {sname:19s} L_dist {q['L_dist']:.4f}  L_mean {q['L_mean']:.4f}  "
                  f"explained {q['explained']:.3f}", flush=True)
    n_train = len(sets["category_train"])
    rows.append({"teacher": "per_category", "images": "category_train", "n_images": n_train,
                 "metric": "train_L_dist_last", "value": dlog["distill"]["L_dist"][-1]})
    rows.append({"teacher": "per_category", "images": "category_train", "n_images": n_train,
                 "metric": "distill_time_s", "value": cat_time})
    df = pd.DataFrame(rows)
    df["teacher_file"], df["profile"], df["git_sha"] = tpath.name, args.profile, io.git_sha()
    df["per_category_distill_steps"] = len(dlog["distill"]["L_dist"])
    out = Path(args.out) if args.out else tpath.with_name(tpath.stem + "_comparison.csv")
    io.save_csv(out, df)
    print(f"per-category distillation: {len(dlog['distill']['L_dist'])} steps in {cat_time:.0f} s; "
          f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.command == "distill":
        return cmd_distill(args, argv)
    return cmd_compare(args)


if __name__ == "__main__":
    raise SystemExit(main())
