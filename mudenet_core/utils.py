"""Seeds, devices and progress bars: the small helpers every training and evaluation loop uses."""

from __future__ import annotations

import contextlib
import os
import random
import sys
from collections.abc import Iterator

import numpy as np
import torch
from tqdm.auto import tqdm


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a CPU ``torch.Generator`` seeded with ``seed``.

    Package code never creates an unseeded RNG: pass the returned generator on to splits, samplers
    and augmentations.

    Example:
        >>> g = seed_everything(0); a = torch.rand(2, generator=g)
        >>> g = seed_everything(0); bool((a == torch.rand(2, generator=g)).all())
        True
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def resolve_device(device: str = "auto") -> torch.device:
    """``"auto"`` picks CUDA when available, else CPU; an explicit CUDA request without CUDA is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but CUDA is not available here; use --device cpu")
    return dev


def progress(iterable=None, *, desc: str = "", total: int | None = None, enabled: bool = True, **kw):
    """A tqdm progress bar that stays quiet when disabled or when output is not a terminal/notebook in CI."""
    disable = (not enabled) or bool(os.environ.get("MUDENET_NO_PROGRESS"))
    return tqdm(iterable, desc=desc, total=total, disable=disable, file=sys.stderr, dynamic_ncols=True,
                mininterval=1.0, **kw)


@contextlib.contextmanager
def modes_restored(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Run a block (e.g. an evaluation inside a training loop) and restore every submodule's train/eval mode.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout()).train()
        >>> net[0].eval()
        Linear(in_features=2, out_features=2, bias=True)
        >>> with modes_restored(net):
        ...     _ = net.eval()
        >>> net.training, net[0].training, net[1].training
        (True, False, True)
    """
    modes = {m: m.training for m in module.modules()}
    try:
        yield module
    finally:
        for m, t in modes.items():
            m.train(t)
