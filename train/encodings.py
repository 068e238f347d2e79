"""What the frozen encoders make of each training example, computed once and kept on disk.

The base model's text encoder, VAE and CLIP vision tower are frozen and the subject token's input
embedding is fixed, so their outputs never change during training: each example's latent, prompt context
(with every subject word as s*), token positions, subject masks and CLIP vision tokens of the references
are written once to `<output>/encodings/NNNNNN.safetensors` and read back (memory-mapped) every epoch.
"""
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from ..nodes.nested_encode import encode_subject_prompt
from ..nodes.nested_subject import CLIP_VISION_OUTPUTS
from ..nodes.subjects import Subject
from .dataset import SubjectDataset


@dataclass
class EncodedExample:
    latent: torch.Tensor               # (C, h, w)
    context: torch.Tensor              # (T, D)
    pooled: torch.Tensor               # (P,)
    positions: list[int]               # token position of each subject
    references: list[torch.Tensor]     # per subject: CLIP vision tokens (n, tokens, W)
    masks: list[torch.Tensor | None]   # per subject: (h, w) at latent resolution


def _file(folder: Path, index: int) -> Path:
    return folder / f"{index:06d}.safetensors"


@torch.no_grad()
def encode_dataset(dataset: SubjectDataset, folder: Path, adapter, clip, vae, clip_vision, progress=None) -> None:
    """Write every example's encodings that are not on disk yet (an interrupted run resumes the cache)."""
    folder.mkdir(parents=True, exist_ok=True)
    hidden_state = CLIP_VISION_OUTPUTS[adapter.vision_hidden_state]
    for index in range(len(dataset)):
        path = _file(folder, index)
        if path.is_file():
            continue
        example = dataset[index]
        subjects = [Subject(subject.word, subject.references, adapter=adapter) for subject in example.subjects]
        context, pooled, positions = encode_subject_prompt(clip, subjects, example.caption)
        latent = vae.encode(example.pixels[None])[0].float()
        tensors = {"latent": latent.contiguous(), "context": context[0].float().contiguous(),
                   "pooled": pooled.reshape(-1).float().contiguous(), "positions": torch.tensor(positions)}
        for slot, subject in enumerate(example.subjects):
            tokens = clip_vision.encode_image(subject.references)[hidden_state]
            tensors[f"references_{slot}"] = tokens.to(torch.float16).contiguous()
            if subject.mask is not None:
                mask = F.interpolate(subject.mask[None, None], size=latent.shape[-2:], mode="area")[0, 0]
                tensors[f"mask_{slot}"] = mask.contiguous()
        save_file(tensors, str(path.with_suffix(".tmp")), metadata={"subjects": json.dumps(len(example.subjects))})
        path.with_suffix(".tmp").rename(path)  # complete files only: a crash never leaves a half-written cache
        if progress is not None:
            progress.update(1)


def load_encoded(folder: Path, index: int) -> EncodedExample:
    with safe_open(str(_file(folder, index)), framework="pt") as f:
        count = json.loads(f.metadata()["subjects"])
        keys = set(f.keys())
        return EncodedExample(
            f.get_tensor("latent"), f.get_tensor("context"), f.get_tensor("pooled"), f.get_tensor("positions").tolist(),
            [f.get_tensor(f"references_{slot}").float() for slot in range(count)],
            [f.get_tensor(f"mask_{slot}") if f"mask_{slot}" in keys else None for slot in range(count)])
