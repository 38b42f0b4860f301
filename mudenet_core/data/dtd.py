"""Describable Textures Dataset (DTD) loader: random texture images for anomaly synthesis (DRAEM-style).

Layout (official): ``<root>/images/<class>/*.jpg``; ``root`` may also be the ``images`` folder itself.

Example:
    >>> import tempfile, numpy as np
    >>> from PIL import Image
    >>> root = Path(tempfile.mkdtemp())
    >>> for c in ("banded", "dotted"):
    ...     (root / "images" / c).mkdir(parents=True)
    ...     Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(root / "images" / c / f"{c}_0001.jpg")
    >>> tex = DTDTextures(root, size=16)
    >>> tex.classes, tuple(tex.sample(torch.Generator().manual_seed(0)).shape)
    (['banded', 'dotted'], (3, 16, 16))
"""

from __future__ import annotations

from pathlib import Path

import torch

from mudenet_core.data.images import DataError, list_images, load_image
from mudenet_core.data.transforms import resize_image, to_tensor


class DTDTextures:
    """Texture images of the DTD, resized to ``size`` x ``size``, drawn with an explicit generator.

    Args:
        root: the DTD folder (holding ``images/``) or its ``images`` folder.
        size: square side of the returned textures.
        classes: DTD classes to use (default: every class folder found).
    """

    def __init__(self, root: str | Path, size: int, classes: list[str] | tuple[str, ...] | None = None):
        root = Path(root).expanduser()
        images = root / "images" if (root / "images").is_dir() else root
        if not images.is_dir():
            raise DataError(f"DTD folder not found: {images}")
        found = sorted(p.name for p in images.iterdir() if p.is_dir() and not p.name.startswith("."))
        if classes is None:
            classes = found
        missing = [c for c in classes if c not in found]
        if missing:
            raise DataError(f"DTD classes {missing} not found in {images} (available: {found})")
        self.root = images
        self.size = int(size)
        self.classes = list(classes)
        self.paths: list[Path] = [p for c in self.classes for p in list_images(images / c)]
        if not self.paths:
            raise DataError(f"no DTD images under {images} for classes {self.classes}")

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        """Texture ``i``: (3, size, size) float in [0, 1]."""
        return resize_image(to_tensor(load_image(self.paths[i])), self.size)

    def sample(self, generator: torch.Generator) -> torch.Tensor:
        """One random texture: (3, size, size) float in [0, 1]."""
        i = int(torch.randint(len(self.paths), (1,), generator=generator).item())
        return self[i]

    def sample_batch(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """``n`` random textures: (n, 3, size, size) float in [0, 1]."""
        return torch.stack([self.sample(generator) for _ in range(n)])
