"""Seeded stand-ins for subject photos, for tests that need a picture the model can tell apart from another."""
from pathlib import Path

import numpy as np
from PIL import Image


def synthetic_subject(path: Path, seed: int) -> None:
    """A seeded picture of a 'subject': a coloured ellipse on a plain background (the height varies with the seed)."""
    rng = np.random.default_rng(seed)
    height, width = 96 + 16 * (seed % 3), 80
    y, x = np.mgrid[:height, :width]
    inside = ((y - height / 2) / (height / 3)) ** 2 + ((x - width / 2) / (width / 3)) ** 2 <= 1
    image = np.where(inside[..., None], rng.integers(0, 256, 3), rng.integers(0, 256, 3)).astype(np.uint8)
    Image.fromarray(image).save(path)
