"""Beside the packs users already run, on SD1.5: IPAdapter_plus in the same graph as this pack, in either order.

IPAdapter_plus's real code (tests/peers.py installs it from ../shared/peers into the session's ComfyUI) runs in ComfyUI's
executor: its model loader reads an IP-Adapter Plus file in the published layout (seeded random weights), its
IPAdapter Advanced node patches the model. On SD1.5 it keys its attn2 entries (block, number), where the pack's layers
are (block, number, index), which ComfyUI prefers: the pack must wrap its entries in whichever order the nodes come.
SDXL, InstantID and PuLID: tests/host/test_nested_sdxl.py, on that module's SDXL model.
"""
import functools
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hostenv import require_comfyui

require_comfyui()
from peers import require_peer  # noqa: E402

PROMPT = "a photo of a person holding a cat"
SUBJECT_PHOTO, REFERENCE_PHOTO = "subject-personalization-astronaut.jpg", "subject-personalization-chelsea.jpg"
STEPS = 2
# SD1.5 layers where ComfyUI calls IPAdapter_plus's entries: its 6 input and 9 output keys; its ("middle", 1) key is
# never looked up (ComfyUI names the middle block ("middle", 0)), with or without this pack.
IPADAPTER_LAYERS_CALLED = 15


@pytest.fixture(scope="module")
def ipadapter_calls(comfy):
    """How often IPAdapter_plus's attention callback ran: its own function, counted where its Attn2Replace finds it."""
    require_peer(comfy.nodes.NODE_CLASS_MAPPINGS, "IPAdapterAdvanced")
    ipadapter = sys.modules[comfy.nodes.NODE_CLASS_MAPPINGS["IPAdapterAdvanced"].__module__]
    calls, attention = [], ipadapter.ipadapter_attention

    def counted(*args, **kwargs):
        calls.append(1)
        return attention(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ipadapter, "ipadapter_attention", counted)
        yield calls


@pytest.fixture(scope="module")
def sample(comfy, sd15_checkpoint_file, clip_vision_h_file, ipadapter_plus_file, ipadapter_plus_face_file,
           ipadapter_calls):
    """The sampled latent of the SD1.5 model through the named patches, in order ('pack', 'ipadapter'), and how often
    IPAdapter_plus's callback ran; each graph sampled once."""
    @functools.cache
    def run(*patches: str) -> tuple[torch.Tensor, int]:
        prompt = {
            "checkpoint": ("CheckpointLoaderSimple", {"ckpt_name": sd15_checkpoint_file.name}),
            "vision": ("CLIPVisionLoader", {"clip_name": clip_vision_h_file.name}),
            "photo": ("LoadImage", {"image": SUBJECT_PHOTO}),
            "reference": ("LoadImage", {"image": REFERENCE_PHOTO}),
            "adapter": ("SubjectPersonalization_NestedAttentionIPAdapterLoader",
                        {"ipadapter": ipadapter_plus_face_file.name, "clip": ["checkpoint", 1], "word": "person"}),
            "subject": ("SubjectPersonalization_NestedAttentionSubject",
                        {"nested_adapter": ["adapter", 0], "clip_vision": ["vision", 0], "image": ["photo", 0],
                         "word": "person", "weight": 1.0, "start_percent": 0.0, "end_percent": 1.0}),
            "positive": ("SubjectPersonalization_NestedAttentionEncode",
                         {"clip": ["checkpoint", 1], "subjects": ["subject", 0], "text": PROMPT}),
            "negative": ("CLIPTextEncode", {"clip": ["checkpoint", 1], "text": "blurry"}),
            "ipadapter_file": ("IPAdapterModelLoader", {"ipadapter_file": ipadapter_plus_file.name}),
            "latent": ("EmptyLatentImage", {"width": 64, "height": 64, "batch_size": 1}),
        }
        model = ["checkpoint", 0]
        for patch in patches:
            if patch == "pack":
                prompt["pack"] = ("SubjectPersonalization_ApplyNestedAttention",
                                  {"model": model, "positive": ["positive", 0], "strength": 1.0, "start_percent": 0.0,
                                   "end_percent": 1.0})
            else:
                prompt["ipadapter"] = ("IPAdapterAdvanced",
                                       {"model": model, "ipadapter": ["ipadapter_file", 0], "image": ["reference", 0],
                                        "clip_vision": ["vision", 0], "weight": 1.0, "weight_type": "linear",
                                        "combine_embeds": "concat", "start_at": 0.0, "end_at": 1.0,
                                        "embeds_scaling": "V only"})
            model = [patch, 0]
        prompt["sampler"] = ("KSampler", {"model": model, "seed": 0, "steps": STEPS, "cfg": 5.0, "sampler_name": "euler",
                                          "scheduler": "normal", "positive": ["positive", 0], "negative": ["negative", 0],
                                          "latent_image": ["latent", 0], "denoise": 1.0})
        prompt["save"] = ("SaveLatent", {"samples": ["sampler", 0], "filename_prefix": "other_packs/" + "_".join(patches)})
        ipadapter_calls.clear()
        outputs = comfy.execute({name: {"class_type": kind, "inputs": inputs} for name, (kind, inputs) in prompt.items()})
        (saved,) = outputs["save"]["latents"]
        folder = Path(comfy.folder_paths.get_directory_by_type(saved["type"])) / saved["subfolder"]
        return load_file(folder / saved["filename"])["latent_tensor"], len(ipadapter_calls)

    return run


def test_ipadapter_alone_runs_where_comfyui_calls_its_entries(sample):
    """The baseline the other tests count against: one call per layer where ComfyUI looks its keys up, per UNet call
    (cond and uncond batched: one UNet call a step)."""
    _, calls = sample("ipadapter")
    assert calls == IPADAPTER_LAYERS_CALLED * STEPS


@pytest.mark.parametrize("order", [("pack", "ipadapter"), ("ipadapter", "pack")], ids=["pack first", "ipadapter first"])
def test_both_packs_act_in_either_order(sample, order):
    pack_alone, _ = sample("pack")
    ipadapter_alone, _ = sample("ipadapter")
    both, calls = sample(*order)
    assert calls == IPADAPTER_LAYERS_CALLED * STEPS, "IPAdapter's patch must run in every layer it runs in alone"
    assert (both - pack_alone).abs().max() > 1e-2, "IPAdapter's effect is missing"
    assert (both - ipadapter_alone).abs().max() > 1e-2, "the pack's effect is missing"


def test_both_orders_give_the_same_image(sample):
    """The pack wraps IPAdapter's entry at each UNet call whichever node came first, so both orders compute the same
    operations: the same latent, bit for bit."""
    assert torch.equal(sample("pack", "ipadapter")[0], sample("ipadapter", "pack")[0])
