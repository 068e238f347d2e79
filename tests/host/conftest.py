"""Host tier: the real ComfyUI from COMFYUI_PATH, booted once per test session with seeded random weights."""
import pytest

from hostenv import require_comfyui
from subject_personalization.tools.comfy_headless import HeadlessComfy
from subject_personalization.tools.random_fastcomposer import write_random_fastcomposer

FASTCOMPOSER_FILE = "pytorch_model.bin"  # the official file's name, so the shipped workflows find it


@pytest.fixture(scope="session")
def comfy(tmp_path_factory) -> HeadlessComfy:
    comfyui_path = require_comfyui()
    # ComfyUI keeps text and vision encoders in fp16 by default; fp32 makes the exactness tests meaningful.
    return HeadlessComfy(comfyui_path, tmp_path_factory.mktemp("comfy_base"), extra_args=("--fp32-text-enc",))


@pytest.fixture(scope="session")
def fastcomposer_file(comfy):
    """A random checkpoint in the official layout, written once per session into models/fastcomposer."""
    return write_random_fastcomposer(comfy.model_dir("fastcomposer") / FASTCOMPOSER_FILE, seed=0)


@pytest.fixture(scope="session")
def fastcomposer_models(comfy, fastcomposer_file):
    """(MODEL, CLIP, VAE, CLIP_VISION, FASTCOMPOSER) loaded through the pack's loader node."""
    return comfy.nodes.NODE_CLASS_MAPPINGS["FastComposerLoader"]().load(fastcomposer_file.name)


@pytest.fixture(scope="session")
def node(comfy):
    """Instantiate a registered node class by name."""
    return lambda name: comfy.nodes.NODE_CLASS_MAPPINGS[name]()
