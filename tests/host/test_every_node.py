"""Every node of the pack executes through ComfyUI's own executor, and no tensor read from a file is edited in place.

Two prompts (API format, queued over HTTP) hold every node of the pack but one, each feeding an output so that the
executor runs it: a Nested Attention graph (the pack's adapter file, an IP-Adapter Plus file and a freshly created
adapter, three subjects, a mask and a prepared subject, the patch, a recording and its maps, a face crop from its box)
and a FastComposer one (a subject list with regions, the masks' patch). Import Nested Attention Checkpoint needs an
SDXL CLIP: test_official_sdxl_workflow runs it in a server in bf16. Prepare Face runs here without a model pack (its
box); test_faces.py runs it with insightface on stand-in packs.

In place: on an NVIDIA GPU, ComfyUI 0.16 and later (DynamicVRAM) returns read-only memory-mapped tensors from
comfy.utils.load_torch_file, and an in-place edit of one faults. On this CPU tier they are writable, so every tensor
a file read returns while the prompts run (safetensors' safe_open, used by comfy.utils and the pack's reader, and
torch.load) is recorded with a digest of its bytes, compared with a new digest once the prompts have run.
"""
import hashlib

import pytest
import safetensors
import safetensors.torch
import torch

from hostenv import require_comfyui

require_comfyui()

NOT_EXECUTED_HERE = {"SubjectPersonalization_NestedAttentionOfficialLoader": "needs an SDXL CLIP: test_official_sdxl_workflow.py"}
PHOTO = "subject-personalization-astronaut.jpg"
SAMPLE = {"seed": 0, "steps": 1, "cfg": 5.0, "sampler_name": "ddim", "scheduler": "ddim_uniform", "denoise": 1.0}


def nested_prompt() -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "v1-5-pruned-emaonly.safetensors"}},
        "2": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": "CLIP-ViT-L-14.safetensors"}},
        "3": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"}},
        "4": {"class_type": "SubjectPersonalization_NestedAttentionLoader", "inputs": {"adapter": "nested_person_sd15.safetensors"}},
        "5": {"class_type": "SubjectPersonalization_NestedAttentionIPAdapterLoader",
              "inputs": {"ipadapter": "ip-adapter-plus_sd15.safetensors", "clip": ["1", 1], "word": "cat"}},
        "6": {"class_type": "SubjectPersonalization_NestedAttentionNewAdapter",
              "inputs": {"model": ["1", 0], "clip": ["1", 1], "initializer_word": "dog", "subject_domain": "pet",
                         "vision_model": "ViT-L/14", "seed": 3, "filename": "every_node_new_adapter",
                         "overwrite": False}},
        "7": {"class_type": "LoadImage", "inputs": {"image": PHOTO}},
        "8": {"class_type": "SubjectPersonalization_SubjectRegionMask",
              "inputs": {"width": 64, "height": 64, "left": 0.0, "top": 0.0, "right": 0.5, "bottom": 1.0}},
        "9": {"class_type": "SubjectPersonalization_PrepareSubjectWithMask",
              "inputs": {"image": ["7", 0], "mask": ["24", 0], "size": 224, "margin": 0.1, "background": "black"}},
        "24": {"class_type": "SubjectPersonalization_SubjectRegionMask",  # the photo's size: 384 x 384
               "inputs": {"width": 384, "height": 384, "left": 0.2, "top": 0.1, "right": 0.8, "bottom": 0.9}},
        "10": {"class_type": "SubjectPersonalization_NestedAttentionSubject",
               "inputs": {"nested_adapter": ["4", 0], "clip_vision": ["2", 0], "image": ["9", 0], "word": "person",
                          "weight": 1.0, "start_percent": 0.0, "end_percent": 1.0, "mask": ["8", 0]}},
        "11": {"class_type": "SubjectPersonalization_NestedAttentionSubject",
               "inputs": {"nested_adapter": ["5", 0], "clip_vision": ["3", 0], "image": ["7", 0], "word": "cat",
                          "weight": 1.0, "start_percent": 0.0, "end_percent": 1.0, "subjects": ["10", 0]}},
        "12": {"class_type": "SubjectPersonalization_NestedAttentionSubject",
               "inputs": {"nested_adapter": ["6", 0], "clip_vision": ["2", 0], "image": ["7", 0], "word": "dog",
                          "weight": 1.0, "start_percent": 0.0, "end_percent": 1.0, "subjects": ["11", 0]}},
        "13": {"class_type": "SubjectPersonalization_NestedAttentionEncode",
               "inputs": {"clip": ["1", 1], "subjects": ["12", 0], "text": "a person with a cat and a dog"}},
        "14": {"class_type": "SubjectPersonalization_ApplyNestedAttention",
               "inputs": {"model": ["1", 0], "positive": ["13", 0], "strength": 1.0, "start_percent": 0.0,
                          "end_percent": 1.0}},
        "15": {"class_type": "SubjectPersonalization_RecordSubjectAttention",
               "inputs": {"model": ["14", 0], "positive": ["13", 0], "layers": "all", "start_percent": 0.0,
                          "end_percent": 1.0}},
        **sampled("15", "13", "1", width=64),
        "20": {"class_type": "SubjectPersonalization_SubjectAttentionMaps",
               "inputs": {"recording": ["15", 1], "image": ["18", 0], "opacity": 0.6, "mask_threshold": 0.5}},
        "21": {"class_type": "PreviewImage", "inputs": {"images": ["20", 0]}},
        "22": {"class_type": "PreviewImage", "inputs": {"images": ["9", 0]}},
        "25": {"class_type": "SubjectPersonalization_PrepareFace",  # no model pack here: it crops the face box
               "inputs": {"image": ["7", 0], "model": "antelopev2", "face_index": -1, "size": 224, "face_box": ["24", 0]}},
        "26": {"class_type": "PreviewImage", "inputs": {"images": ["25", 0]}},
    }


def fastcomposer_prompt() -> dict:
    return {
        "1": {"class_type": "SubjectPersonalization_FastComposerLoader", "inputs": {"checkpoint": "pytorch_model.bin"}},
        "2": {"class_type": "LoadImage", "inputs": {"image": PHOTO}},
        "3": {"class_type": "SubjectPersonalization_SubjectRegionMask",
              "inputs": {"width": 64, "height": 64, "left": 0.0, "top": 0.0, "right": 0.5, "bottom": 1.0}},
        "4": {"class_type": "SubjectPersonalization_AddSubject", "inputs": {"image": ["2", 0], "word": "woman", "weight": 1.0,
                                                     "start_percent": 0.0, "end_percent": 1.0, "mask": ["3", 0]}},
        "5": {"class_type": "SubjectPersonalization_FastComposerEncode",
              "inputs": {"clip": ["1", 1], "clip_vision": ["1", 3], "fastcomposer": ["1", 4],
                         "text": "a woman reading a book", "subject_words": "", "text_only_fraction": 0.2,
                         "subjects": ["4", 0]}},
        "6": {"class_type": "SubjectPersonalization_ApplySubjectMasks", "inputs": {"model": ["1", 0], "positive": ["5", 0]}},
        **sampled("6", "5", "1", width=64),
    }


def sampled(model: str, positive: str, loader: str, width: int) -> dict:
    """Nodes 16 to 19 and 23: negative prompt, empty latent, KSampler, decode (the loader's VAE, its output 2), save."""
    return {
        "16": {"class_type": "CLIPTextEncode", "inputs": {"clip": [loader, 1], "text": "blurry"}},
        "17": {"class_type": "EmptyLatentImage", "inputs": {"width": width, "height": width, "batch_size": 1}},
        "18": {"class_type": "VAEDecode", "inputs": {"samples": ["19", 0], "vae": [loader, 2]}},
        "19": {"class_type": "KSampler", "inputs": {"model": [model, 0], "positive": [positive, 0],
                                                    "negative": ["16", 0], "latent_image": ["17", 0], **SAMPLE}},
        "23": {"class_type": "SaveImage", "inputs": {"images": ["18", 0], "filename_prefix": "every_node"}},
    }


class FileReads:
    """Every tensor that safetensors' safe_open or torch.load returns, with a digest of its bytes when returned (the
    executor runs nodes in inference mode, whose tensors keep no version counter)."""

    def __init__(self):
        self.tensors: list[tuple[str, torch.Tensor, bytes]] = []

    def keep(self, where: str, value):
        if isinstance(value, torch.Tensor):
            self.tensors.append((where, value, digest(value)))
        elif isinstance(value, dict):
            for key, item in value.items():
                self.keep(f"{where}:{key}", item)
        return value

    def edited(self) -> list[str]:
        return [where for where, tensor, before in self.tensors if digest(tensor) != before]


def digest(tensor: torch.Tensor) -> bytes:
    return hashlib.blake2b(tensor.detach().contiguous().view(-1).view(torch.uint8).numpy()).digest()


@pytest.fixture(scope="module")
def executed(comfy, fastcomposer_file, sd15_checkpoint_file, clip_vision_file, clip_vision_h_file,
             ipadapter_plus_file, nested_adapter_files):
    """(node types of the pack that ran, the tensors read from files while the two prompts ran)."""
    reads = FileReads()
    checkpoint_io = comfy.pack_module("encoders.checkpoint_io")

    class RecordedSafeOpen:
        def __init__(self, *args, **kwargs):
            self.opened = unwrapped_safe_open(*args, **kwargs)
            self.path = args[0]

        def __enter__(self):
            self.opened.__enter__()
            return self

        def __exit__(self, *exc):
            return self.opened.__exit__(*exc)

        def get_tensor(self, key):
            return reads.keep(f"{self.path}:{key}", self.opened.get_tensor(key))

        def __getattr__(self, name):
            return getattr(self.opened, name)

    unwrapped_safe_open, unwrapped_load = safetensors.safe_open, torch.load
    monkeypatch = pytest.MonkeyPatch()
    for module in (safetensors, safetensors.torch, checkpoint_io):  # each holds its own name for it
        monkeypatch.setattr(module, "safe_open", RecordedSafeOpen)
    monkeypatch.setattr(torch, "load", lambda *args, **kwargs: reads.keep(str(args[0]), unwrapped_load(*args, **kwargs)))
    try:
        ran = set()
        for prompt in (nested_prompt(), fastcomposer_prompt()):
            comfy.execute(prompt)
            ran |= {node["class_type"] for node in prompt.values()}
            comfy.free_memory()  # the loaded tensors stay recorded: the models made from them need not
    finally:
        monkeypatch.undo()
        new_adapter = comfy.model_dir("nested_attention") / "every_node_new_adapter.safetensors"
        new_adapter.unlink(missing_ok=True)
    yield ran, reads
    reads.tensors.clear()


@pytest.mark.compat
def test_every_node_of_the_pack_executes_in_comfyuis_executor(comfy, executed):
    ran, _ = executed
    pack = set(comfy.pack_module("nodes").NODE_CLASS_MAPPINGS)
    assert pack - ran == set(NOT_EXECUTED_HERE), f"not executed, and not covered elsewhere: {pack - ran}"


@pytest.mark.compat
def test_no_tensor_read_from_a_file_is_edited_in_place(executed):
    _, reads = executed
    assert len({where.split(":")[0] for where, *_ in reads.tensors}) >= 6, "the loaders' files were all read"
    assert not reads.edited(), f"edited in place after loading: {reads.edited()[:20]}"


def test_the_digest_does_catch_an_edit_in_place(tmp_path):
    """The check above can fail: an in-place edit of a loaded tensor, through a view of it, is seen."""
    from safetensors.torch import save_file
    save_file({"weight": torch.ones(4, 4)}, tmp_path / "file.safetensors")
    reads = FileReads()
    with safetensors.safe_open(str(tmp_path / "file.safetensors"), framework="pt") as opened:
        weight = reads.keep("weight", opened.get_tensor("weight"))
    assert not reads.edited()
    with torch.inference_mode():
        weight[0, 1:3].mul_(2)
    assert reads.edited() == ["weight"]
