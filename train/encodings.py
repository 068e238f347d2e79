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
from ..nodes.nested_subject import vision_hidden_states
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
    for index in range(len(dataset)):
        path = _file(folder, index)
        if path.is_file():
            continue
        example = dataset[index]
        subjects = [Subject(subject.word, subject.references, adapter=adapter) for subject in example.subjects]
        context, pooled, positions = encode_subject_prompt(clip, subjects, example.caption)
        latent = vae.encode(example.pixels[None])[0].float()
        references = [vision_hidden_states(clip_vision, subject.references, adapter.vision_hidden_state,
                                           len(adapter.vision_layers)) for subject in example.subjects]
        masks = [None if subject.mask is None else
                 F.interpolate(subject.mask[None, None], size=latent.shape[-2:], mode="area")[0, 0]
                 for subject in example.subjects]
        save_encoded(path, EncodedExample(latent, context[0].float(), pooled.reshape(-1).float(), positions,
                                          references, masks))
        if progress is not None:
            progress.update(1)


def check_vision_input(folder: Path, adapter) -> None:
    """The cache records which CLIP vision hidden state it holds; a run that needs another one is refused."""
    wanted = {"hidden_state": adapter.vision_hidden_state, "layers_before": len(adapter.vision_layers)}
    record = folder / "vision_input.json"
    if record.is_file():
        found = json.loads(record.read_text())
        if found != wanted:
            raise ValueError(f"the encodings in {folder} hold CLIP vision hidden states {found}, but this run needs "
                             f"{wanted} (train_vision_layers changed): set `encodings` to another folder or delete it")
        return
    folder.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(wanted))


def save_encoded(path: Path, example: EncodedExample) -> None:
    """Write one example; complete files only (through a temporary name), so a crash never leaves a half-written cache."""
    tensors = {"latent": example.latent.contiguous(), "context": example.context.contiguous(),
               "pooled": example.pooled.contiguous(), "positions": torch.tensor(example.positions)}
    for slot, (references, mask) in enumerate(zip(example.references, example.masks)):
        tensors[f"references_{slot}"] = references.to(torch.float16).contiguous()
        if mask is not None:
            tensors[f"mask_{slot}"] = mask.contiguous()
    save_file(tensors, str(path.with_suffix(".tmp")), metadata={"subjects": json.dumps(len(example.references))})
    path.with_suffix(".tmp").rename(path)


def load_encoded(folder: Path, index: int) -> EncodedExample:
    with safe_open(str(_file(folder, index)), framework="pt") as f:
        count = json.loads(f.metadata()["subjects"])
        keys = set(f.keys())
        return EncodedExample(
            f.get_tensor("latent"), f.get_tensor("context"), f.get_tensor("pooled"), f.get_tensor("positions").tolist(),
            [f.get_tensor(f"references_{slot}").float() for slot in range(count)],
            [f.get_tensor(f"mask_{slot}") if f"mask_{slot}" in keys else None for slot in range(count)])
