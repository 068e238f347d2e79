"""The training set: images with captions naming their subjects, each subject's reference photo(s) and mask.

A folder with `metadata.jsonl`, one JSON object per training image:

    {"image": "images/0001.jpg", "caption": "a photo of a dog running on the grass",
     "subjects": [{"word": "dog", "references": ["references/0001.jpg"], "mask": "masks/0001.png"}]}

Paths are relative to the folder. Each subject's `word` must be in the caption (several subjects, several
words). `references` may be left out when a `mask` is given: the reference is then cut from the image
itself with the pack's subject preparation (the subject on a plain background). `mask` is optional; the
localisation and masked losses need it.
"""
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..encoders.subject_preparation import prepare_with_mask

REFERENCE_SIZE = 224


@dataclass
class SubjectExample:
    word: str
    references: torch.Tensor          # (n, h, w, 3) in [0, 1]
    mask: torch.Tensor | None         # (H, W) in [0, 1] at the training resolution


@dataclass
class TrainingExample:
    name: str                         # the image path, relative to the dataset folder
    pixels: torch.Tensor              # (H, W, 3) in [0, 1], square at the training resolution
    caption: str
    subjects: list[SubjectExample]


def read_image(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0)


def read_mask(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.asarray(Image.open(path).convert("L"), dtype=np.float32) / 255.0)


def square_resize(image: torch.Tensor, size: int) -> torch.Tensor:
    """(H, W, C) -> (size, size, C): centre crop to square, then antialiased bilinear resize."""
    height, width = image.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    crop = image[top:top + side, left:left + side].movedim(-1, 0)[None]
    return F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0].movedim(0, -1)


class SubjectDataset:
    def __init__(self, folder: str | Path, resolution: int, reference_background: str = "black"):
        self.folder = Path(folder)
        metadata = self.folder / "metadata.jsonl"
        if not metadata.is_file():
            raise FileNotFoundError(f"{metadata} not found: a training set is a folder with metadata.jsonl "
                                    f"(one JSON object per image; see the README's training guide)")
        self.entries = [json.loads(line) for line in metadata.read_text().splitlines() if line.strip()]
        if not self.entries:
            raise ValueError(f"{metadata} lists no images")
        self.resolution, self.reference_background = resolution, reference_background
        for number, entry in enumerate(self.entries, 1):
            self._check(entry, number)

    def _check(self, entry: dict, number: int) -> None:
        where = f"metadata.jsonl line {number}"
        for key in ("image", "caption", "subjects"):
            if key not in entry:
                raise ValueError(f"{where}: missing '{key}'")
        if not entry["subjects"]:
            raise ValueError(f"{where}: no subjects; every training image needs at least one")
        for subject in entry["subjects"]:
            if subject.get("word", "").lower() not in entry["caption"].lower():
                raise ValueError(f"{where}: subject word {subject.get('word')!r} is not in the caption {entry['caption']!r}")
            if not subject.get("references") and not subject.get("mask"):
                raise ValueError(f"{where}: subject {subject['word']!r} needs 'references' or a 'mask' to cut one from")

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> TrainingExample:
        entry = self.entries[index]
        photo = read_image(self.folder / entry["image"])
        subjects = []
        for subject in entry["subjects"]:
            mask = read_mask(self.folder / subject["mask"]) if subject.get("mask") else None
            if subject.get("references"):
                references = torch.stack([square_resize(read_image(self.folder / path), REFERENCE_SIZE)
                                          for path in subject["references"]])
            else:
                references, _ = prepare_with_mask(photo[None], mask, REFERENCE_SIZE, background=self.reference_background)
            if mask is not None:
                mask = square_resize(mask[..., None], self.resolution)[..., 0].clamp(0, 1)
            subjects.append(SubjectExample(subject["word"], references, mask))
        return TrainingExample(entry["image"], square_resize(photo, self.resolution), entry["caption"], subjects)
