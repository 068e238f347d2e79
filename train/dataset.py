"""The training set: images with captions naming their subjects, each subject's reference photo(s) and mask.

A folder with `metadata.jsonl`, one JSON object per training image:

    {"image": "images/0001.jpg", "caption": "a photo of a dog running on the grass",
     "subjects": [{"word": "dog", "references": ["references/0001.jpg"], "mask": "masks/0001.png"}]}

Paths are relative to the folder. Each subject's `word` must be in the caption (several subjects, several
words). `references` may be left out when a `mask` is given: the reference is then cut from the image
itself with the pack's subject preparation (the subject on a plain background). `mask` is optional; the
localisation and masked losses need it.
"""
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..encoders.checkpoint_io import UnreadableFile, read_jsonl
from ..encoders.checkpoint_io import read_image as read_image_array
from ..encoders.subject_preparation import prepare_with_mask

REFERENCE_SIZE = 224
DATASET_FIX = ("a training set is a folder with metadata.jsonl, one JSON object per line: the format is in "
               "docs/training.md")
IMAGE_FIX = "replace it with a readable image (PNG, JPEG or WebP)"


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


def read_image(path: Path, fix: str = IMAGE_FIX) -> torch.Tensor:
    """(H, W, 3) in [0, 1]."""
    return torch.from_numpy(read_image_array(path, "RGB", fix).astype(np.float32) / 255.0)


def read_mask(path: Path, fix: str = IMAGE_FIX) -> torch.Tensor:
    """(H, W) in [0, 1]."""
    return torch.from_numpy(read_image_array(path, "L", fix).astype(np.float32) / 255.0)


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
        self.metadata = self.folder / "metadata.jsonl"
        self.lines = read_jsonl(self.metadata, DATASET_FIX)  # [(line number from 1, entry)]
        if not self.lines:
            raise UnreadableFile(self.metadata, "it lists no images", DATASET_FIX)
        self.resolution, self.reference_background = resolution, reference_background
        for number, entry in self.lines:
            self._check(entry, number)

    def _check(self, entry: object, number: int) -> None:
        """The entry's keys and types, and every subject word in the caption; the files are read when used."""
        def refuse(problem: str) -> UnreadableFile:
            return UnreadableFile(self.metadata, f"line {number}: {problem}", DATASET_FIX)

        if not isinstance(entry, dict):
            raise refuse(f"expected a JSON object, got {type(entry).__name__}")
        for key, kind in (("image", str), ("caption", str), ("subjects", list)):
            if key not in entry:
                raise refuse(f"missing '{key}'")
            if not isinstance(entry[key], kind):
                raise refuse(f"'{key}' must be a {'string' if kind is str else 'list'}")
        if not entry["subjects"]:
            raise refuse("no subjects; every training image needs at least one")
        for subject in entry["subjects"]:
            if not isinstance(subject, dict):
                raise refuse("each subject must be a JSON object with 'word' and 'references' or 'mask'")
            word, references, mask = subject.get("word"), subject.get("references"), subject.get("mask")
            if not isinstance(word, str) or word.lower() not in entry["caption"].lower():
                raise refuse(f"subject word {word!r} is not in the caption {entry['caption']!r}")
            if not (references is None or isinstance(references, list) and all(isinstance(r, str) for r in references)):
                raise refuse(f"the references of {word!r} must be a list of image paths")
            if not (mask is None or isinstance(mask, str)):
                raise refuse(f"the mask of {word!r} must be an image path")
            if not references and not mask:
                raise refuse(f"subject {word!r} needs 'references' or a 'mask' to cut one from")

    def __len__(self) -> int:
        return len(self.lines)

    def __getitem__(self, index: int) -> TrainingExample:
        number, entry = self.lines[index]
        fix = f"{IMAGE_FIX}, or remove line {number} of {self.metadata}"
        photo = read_image(self.folder / entry["image"], fix)
        subjects = []
        for subject in entry["subjects"]:
            mask = read_mask(self.folder / subject["mask"], fix) if subject.get("mask") else None
            if subject.get("references"):
                references = torch.stack([square_resize(read_image(self.folder / path, fix), REFERENCE_SIZE)
                                          for path in subject["references"]])
            else:
                references, _ = prepare_with_mask(photo[None], mask, REFERENCE_SIZE, background=self.reference_background)
            if mask is not None:
                mask = square_resize(mask[..., None], self.resolution)[..., 0].clamp(0, 1)
            subjects.append(SubjectExample(subject["word"], references, mask))
        return TrainingExample(entry["image"], square_resize(photo, self.resolution), entry["caption"], subjects)
