"""Host tier: the real ComfyUI from COMFYUI_PATH, booted once per test session with seeded random weights."""
import ctypes
import gc
from pathlib import Path

import pytest
import torch

from hostenv import require_comfyui
from model_files import save_checkpoint, save_half
from peers import install_peers
from random_modules import randomise
from subject_personalization.tools.comfy_headless import HeadlessComfy
from subject_personalization.tools.random_fastcomposer import write_random_fastcomposer

# The names the shipped workflows give these files (the official FastComposer file; IP-Adapter users' names).
FASTCOMPOSER_FILE = "pytorch_model.bin"
IP_ADAPTER_PLUS_FILE = "ip-adapter-plus_sd15.safetensors"
IP_ADAPTER_PLUS_FACE_FILE = "ip-adapter-plus-face_sd15.safetensors"  # the same layout, trained on faces
VIT_H_FILE = "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"
SDXL_CHECKPOINT_FILE = "sd_xl_base_1.0.safetensors"
OFFICIAL_NESTED_FILE = "nested_attention_official_sdxl.safetensors"  # the authors' demo checkpoint, as the README names it

# Several full-size models come and go in one process. glibc keeps freed blocks below its (growing) mmap
# threshold on the heap, so the process would hold every model it ever freed; a fixed 1 MiB threshold
# returns each freed weight to the system.
_LIBC = ctypes.CDLL("libc.so.6")
_LIBC.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD


_booted: list[HeadlessComfy] = []  # the session's ComfyUI, once a test asked for it


@pytest.fixture(autouse=True, scope="module")
def release_memory_after_each_module():
    yield
    for comfy in _booted:  # what the module's prompts left in ComfyUI's caches
        comfy.free_memory()
    gc.collect()
    _LIBC.malloc_trim(0)


@pytest.fixture(scope="session")
def comfy(tmp_path_factory) -> HeadlessComfy:
    comfyui_path = require_comfyui()
    base = tmp_path_factory.mktemp("comfy_base")
    install_peers(base / "custom_nodes")  # the packs users combine with this one, loaded beside it as a user's are
    # ComfyUI keeps text and vision encoders in fp16 by default; fp32 makes the exactness tests meaningful. The classic
    # cache keeps the last prompt's outputs only: 0.33's default, the RAM-pressure cache, keeps models until RAM runs
    # short, which it checks when a prompt runs, while this process also builds models between prompts.
    _booted.append(HeadlessComfy(comfyui_path, base,
                                 extra_args=("--fp32-text-enc", "--use-pytorch-cross-attention", "--cache-classic")))
    return _booted[0]


@pytest.fixture(scope="session")
def compat_run(request) -> bool:
    """Whether this is the compatibility subset (--compat) for an older ComfyUI: workflows there execute once."""
    return request.config.getoption("compat")


@pytest.fixture(scope="session")
def fastcomposer_file(comfy):
    """A random checkpoint in the official layout (light form: 0.7 GB, values repeat across layers), written once per
    session into models/fastcomposer. The exactness tests, whose claim needs every tensor its own draw, write theirs."""
    return write_random_fastcomposer(comfy.model_dir("fastcomposer") / FASTCOMPOSER_FILE, seed=0, light=True)


def load_fastcomposer(comfy, path: Path) -> tuple:
    """(MODEL, CLIP, VAE, CLIP_VISION, FASTCOMPOSER) loaded through the pack's loader node."""
    return comfy.nodes.NODE_CLASS_MAPPINGS["SubjectPersonalization_FastComposerLoader"]().load(path.name)


@pytest.fixture(scope="module")
def fastcomposer_models(comfy, fastcomposer_file):
    """The session file's models, loaded for each module that asks and released after it: held for the session, their
    5.5 GB sat under every later module (a clean-clone CI run peaked at 24.0 GB of 24.1 in use)."""
    return load_fastcomposer(comfy, fastcomposer_file)


@pytest.fixture(scope="session")
def node(comfy):
    """Instantiate a registered node class by name."""
    return lambda name: comfy.nodes.NODE_CLASS_MAPPINGS[name]()


@pytest.fixture(scope="session")
def files_from_fastcomposer_models(comfy, fastcomposer_file) -> dict:
    """The session files made from the FastComposer file's models, at one loading released after the writing:
    - an ordinary SD1.5 checkpoint with the same random weights, written by ComfyUI's own save_checkpoint (fp16);
    - a CLIP ViT-L/14 vision model file (the FastComposer vision tower, fp16);
    - SD1.5 adapters of this pack's format for a person and a pet: freshly initialised, output projection randomised
      (a fresh adapter's tokens ignore the image by construction, its projection being zero: randomised, the
      workflow tests can see the subject image reach the output)."""
    from subject_personalization.encoders.nested_adapter import save_nested_adapter
    from subject_personalization.nodes.nested_adapter_nodes import fresh_adapter
    model, clip, vae, clip_vision, _ = load_fastcomposer(comfy, fastcomposer_file)
    files = {"sd15_checkpoint": save_checkpoint(comfy.model_dir("checkpoints") / "v1-5-pruned-emaonly.safetensors",
                                                model, clip, vae),
             "clip_vision": comfy.model_dir("clip_vision") / "CLIP-ViT-L-14.safetensors", "nested_adapters": {}}
    save_half(clip_vision.get_sd(), files["clip_vision"])
    for name, word, domain, seed in (("nested_person_sd15", "person", "person", 1), ("nested_pet_sd15", "dog", "pet", 2)):
        adapter = fresh_adapter(model, clip, word, "ViT-L/14", domain, seed)
        with torch.no_grad():
            adapter.resampler.proj_out.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(seed))
        files["nested_adapters"][name] = comfy.model_dir("nested_attention") / f"{name}.safetensors"
        save_nested_adapter(files["nested_adapters"][name], adapter)
    return files


@pytest.fixture(scope="session")
def sd15_checkpoint_file(files_from_fastcomposer_models) -> Path:
    return files_from_fastcomposer_models["sd15_checkpoint"]


@pytest.fixture(scope="session")
def clip_vision_file(files_from_fastcomposer_models) -> Path:
    return files_from_fastcomposer_models["clip_vision"]


@pytest.fixture(scope="session")
def nested_adapter_files(files_from_fastcomposer_models) -> dict:
    """{name: path} of the two adapters, loaded by name in the host tests."""
    return files_from_fastcomposer_models["nested_adapters"]


@pytest.fixture(scope="session")
def clip_vision_h_file(comfy):
    """A CLIP ViT-H/14 vision model file (what IP-Adapter Plus reads), seeded random weights in ComfyUI's own model."""
    from comfy import clip_vision
    vision = clip_vision.ClipVisionModel(str(Path(clip_vision.__file__).with_name("clip_vision_config_h.json")))
    randomise(vision.model, seed=4)
    path = comfy.model_dir("clip_vision") / VIT_H_FILE
    save_half(vision.get_sd(), path)
    return path


@pytest.fixture(scope="session")
def ipadapter_plus_file(comfy):
    """ip-adapter-plus_sd15 in its published layout and sizes, seeded random weights, in models/ipadapter."""
    return write_sd15_ip_adapter_plus(comfy, IP_ADAPTER_PLUS_FILE, seed=6)


@pytest.fixture(scope="session")
def ipadapter_plus_face_file(comfy):
    return write_sd15_ip_adapter_plus(comfy, IP_ADAPTER_PLUS_FACE_FILE, seed=7)


def write_sd15_ip_adapter_plus(comfy, name: str, seed: int):
    from ipadapter_files import ip_adapter_plus, write_ip_adapter
    return write_ip_adapter(comfy.model_dir("ipadapter") / name, ip_adapter_plus("sd15", seed=seed))


@pytest.fixture(scope="module")
def official_sdxl_files(tmp_path_factory, fastcomposer_file):
    """[SDXL base checkpoint, official Nested Attention checkpoint], seeded random weights in published layouts, in
    checkpoints/ and nested_attention/ folders of their own (only servers in bf16 load them: test_official_sdxl_workflow
    says why); 7.7 GB, removed at the end of the module that asked for them.
    - The base: ComfyUI's own SDXL UNet and text encoders in fp16, as released, and the session FastComposer file's
      SD1.5 VAE (the same architecture; read from the file, so that the session's models need not be loaded: the
      module runs first), written by ComfyUI's own save_checkpoint.
    - The official checkpoint: IP-Adapter Plus SDXL's tensors under diffusers module names, one of the layouts the
      import accepts: image_proj.<resampler key>, unet.<attn2 module>.processor.to_{k,v}_nest.weight."""
    import comfy.sd
    from comfy.model_patcher import ModelPatcher
    from ipadapter_files import ip_adapter_plus
    from sdxl_models import random_sdxl
    from subject_personalization.encoders.checkpoint_io import read_state_dict
    from subject_personalization.encoders.fastcomposer_checkpoint import split_fastcomposer
    from subject_personalization.encoders.unet_layers import ip_adapter_layers, to_diffusers_name
    models = tmp_path_factory.mktemp("sdxl_models")
    base, official = models / "checkpoints" / SDXL_CHECKPOINT_FILE, models / "nested_attention" / OFFICIAL_NESTED_FILE
    for path in (base, official):
        path.parent.mkdir()
    try:
        unet, clip = random_sdxl(torch.float16, seed=20)
        cpu = torch.device("cpu")
        vae = comfy.sd.VAE(sd=split_fastcomposer(read_state_dict(fastcomposer_file)).vae)
        save_checkpoint(base, ModelPatcher(unet, load_device=cpu, offload_device=cpu), clip, vae)
        del unet, clip, vae
        parts = ip_adapter_plus("sdxl", seed=21)
        state = {f"image_proj.{key}": tensor for key, tensor in parts["image_proj"].items()}
        for number, layer in ip_adapter_layers("sdxl").items():
            for kv in "kv":
                state[f"unet.{to_diffusers_name(layer.block)}.processor.to_{kv}_nest.weight"] = \
                    parts["ip_adapter"][f"{number}.to_{kv}_ip.weight"]
        save_half(state, official)
        yield [base, official]
    finally:
        for path in (base, official):
            path.unlink(missing_ok=True)
