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
from safetensors.torch import save_file

from ..encoders.checkpoint_io import UnreadableFile, read_json, read_safetensors
from ..encoders.kill_safe import written_beside
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


def _rebuild(folder: Path) -> str:
    """What to do about a damaged cache: it is derived data, made again from the dataset."""
    return f"delete the encodings folder {folder} and run again: it is rebuilt from the training set"


@torch.no_grad()
def encode_dataset(dataset: SubjectDataset, folder: Path, adapter, clip, vae, clip_vision, progress=None) -> None:
    """Write every example's encodings that are not on disk yet (an interrupted run resumes the cache)."""
    # ComfyUI-side helpers, imported here so that the cache format is read without ComfyUI (the core tier).
    from ..nodes.nested_encode import encode_subject_prompt
    from ..nodes.nested_subject import vision_hidden_states
    from ..nodes.subjects import Subject
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
        found = read_json(record, _rebuild(folder))
        if not isinstance(found, dict):
            raise UnreadableFile(record, f"it holds a {type(found).__name__}, not the cache's record of its CLIP vision "
                                         f"input", _rebuild(folder))
        if found != wanted:
            raise ValueError(f"the encodings in {folder} hold CLIP vision hidden states {found}, but this run needs "
                             f"{wanted} (train_vision_layers changed): set `encodings` to another folder or delete it")
        return
    folder.mkdir(parents=True, exist_ok=True)
    with written_beside(record) as partial:
        partial.write_text(json.dumps(wanted))


def save_encoded(path: Path, example: EncodedExample) -> None:
    """Write one example, beside its name and renamed into place: a kill never leaves a half-written cache entry."""
    tensors = {"latent": example.latent.contiguous(), "context": example.context.contiguous(),
               "pooled": example.pooled.contiguous(), "positions": torch.tensor(example.positions)}
    for slot, (references, mask) in enumerate(zip(example.references, example.masks)):
        tensors[f"references_{slot}"] = references.to(torch.float16).contiguous()
        if mask is not None:
            tensors[f"mask_{slot}"] = mask.contiguous()
    with written_beside(path) as partial:
        save_file(tensors, str(partial), metadata={"subjects": json.dumps(len(example.references))})


def load_encoded(folder: Path, index: int) -> EncodedExample:
    """One cached example, refused (with the advice to rebuild the cache) unless its file is complete: the subject
    count in its metadata, and every tensor that count and the format need."""
    path = _file(folder, index)
    metadata, tensors = read_safetensors(path, _rebuild(folder))
    stated = metadata.get("subjects", "")
    if not (stated.isdecimal() and int(stated) <= len(tensors)):  # each subject has its own tensors
        raise UnreadableFile(path, f"its metadata field 'subjects' is {stated!r}, not a count of the subjects it holds",
                             _rebuild(folder))
    count = int(stated)
    missing = [key for key in ("latent", "context", "pooled", "positions", *(f"references_{slot}" for slot in range(count)))
               if key not in tensors]
    if missing or tensors["positions"].numel() != count:
        problem = f"it lacks {', '.join(missing)}" if missing else \
            f"it holds {tensors['positions'].numel()} subject positions for {count} subjects"
        raise UnreadableFile(path, f"the cached encoding is incomplete: {problem}", _rebuild(folder))
    return EncodedExample(
        tensors["latent"], tensors["context"], tensors["pooled"], tensors["positions"].tolist(),
        [tensors[f"references_{slot}"].float() for slot in range(count)],
        [tensors.get(f"mask_{slot}") for slot in range(count)])
