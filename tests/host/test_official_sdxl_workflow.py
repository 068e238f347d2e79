"""workflows/nested_official_sdxl.json, the authors' SDXL checkpoint imported in the graph, runs in a real ComfyUI.

An SDXL base model takes about 14 GB once ComfyUI loads it in float32 on a CPU, too much beside this session's models
on a 24 GB machine; so the workflow runs in ComfyUI's own server in a subprocess started with --bf16-unet
--bf16-text-enc --bf16-vae (7 GB), queued over HTTP as the graph editor queues it, and the server is stopped after.
Its files hold seeded random weights in the published layouts, written into the server's models folder and removed
after the module:
- `sd_xl_base_1.0.safetensors`: ComfyUI's own SDXL UNet and text encoders (and the session's SD1.5 VAE, the same
  architecture), saved the way ComfyUI saves a checkpoint, fp16 as released (6.9 GB);
- the official checkpoint in one of the layouts the import accepts (diffusers module names, `to_k_nest`), sized as
  IP-Adapter Plus SDXL, whose resampler reads CLIP ViT-H/14;
- the session's CLIP ViT-H/14 vision model, linked.
Images are 64x64 with 2 steps.
"""
import io
import json
from pathlib import Path

import pytest
import torch

from hostenv import require_comfyui

COMFYUI_PATH = Path(require_comfyui())
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from synthetic_photos import synthetic_subject  # noqa: E402

from subject_personalization.tools.comfy_server import running_server  # noqa: E402

WORKFLOW = Path(__file__).resolve().parents[2] / "workflows" / "nested_official_sdxl.json"
SDXL_CHECKPOINT = "sd_xl_base_1.0.safetensors"
OFFICIAL_CHECKPOINT = "nested_attention_official_sdxl.safetensors"
BF16 = ("--bf16-unet", "--bf16-text-enc", "--bf16-vae")
SIZE, STEPS = 64, 2
PROMPT_TIMEOUT = 900  # s: loading 6.9 GB and sampling SDXL on a busy 2-core machine
CLIENT = "official-sdxl-workflow-test"


def write_sdxl_checkpoint(path: Path, vae_state: dict) -> None:
    from model_files import save_half
    from sdxl_models import random_sdxl
    unet, clip = random_sdxl(torch.float16, seed=20)
    save_half(unet.state_dict_for_saving(clip.get_sd(), vae_state), path)


def write_official_checkpoint(path: Path) -> None:
    """IP-Adapter Plus SDXL's tensors under diffusers module names: image_proj.<resampler key>,
    unet.<attn2 module>.processor.to_{k,v}_nest.weight."""
    from ipadapter_files import ip_adapter_plus
    from safetensors.torch import save_file
    from subject_personalization.encoders.unet_layers import ip_adapter_layers, to_diffusers_name
    parts = ip_adapter_plus("sdxl", seed=21)
    state = {f"image_proj.{key}": tensor for key, tensor in parts["image_proj"].items()}
    for number, layer in ip_adapter_layers("sdxl").items():
        for kv in "kv":
            state[f"unet.{to_diffusers_name(layer.block)}.processor.to_{kv}_nest.weight"] = \
                parts["ip_adapter"][f"{number}.to_{kv}_ip.weight"]
    save_file({key: tensor.contiguous() for key, tensor in state.items()}, path)


@pytest.fixture(scope="module")
def server(tmp_path_factory, fastcomposer_models, clip_vision_h_file):
    base = tmp_path_factory.mktemp("official_sdxl")
    models = base / "models"
    for folder in ("checkpoints", "nested_attention", "clip_vision"):
        (models / folder).mkdir(parents=True)
    written = [models / "checkpoints" / SDXL_CHECKPOINT, models / "nested_attention" / OFFICIAL_CHECKPOINT]
    try:
        write_sdxl_checkpoint(written[0], fastcomposer_models[2].get_sd())
        write_official_checkpoint(written[1])
        (models / "clip_vision" / clip_vision_h_file.name).symlink_to(clip_vision_h_file)
        with running_server(COMFYUI_PATH, base, BF16, http_timeout=120) as running:
            yield running
    finally:
        for path in written:
            path.unlink(missing_ok=True)


def fast(prompt: dict) -> dict:
    for node in prompt.values():
        if node["class_type"] == "EmptyLatentImage":
            node["inputs"].update(width=SIZE, height=SIZE)
        if "steps" in node["inputs"]:
            node["inputs"]["steps"] = STEPS
    return prompt


def render(server, prompt: dict) -> np.ndarray:
    entry = server.wait(server.queue(prompt, CLIENT), timeout=PROMPT_TIMEOUT)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"], default=str)[:3000]
    (saved,) = [image for output in entry["outputs"].values() for image in output.get("images", [])]
    return np.asarray(Image.open(io.BytesIO(server.image(saved))))


def test_the_workflow_names_the_sdxl_base_and_the_official_checkpoint():
    workflow = json.loads(WORKFLOW.read_text())
    values = {node["type"]: node["widgets_values"] for node in workflow["nodes"]}
    assert values["CheckpointLoaderSimple"] == [SDXL_CHECKPOINT]
    assert values["NestedAttentionOfficialLoader"][0] == OFFICIAL_CHECKPOINT
    assert values["EmptyLatentImage"][:2] == [1024, 1024]


def test_the_workflow_runs_on_sdxl_and_follows_the_subject(server, comfy):
    prompt = fast(comfy.workflow_to_prompt(json.loads(WORKFLOW.read_text())))
    first = render(server, prompt)
    assert first.shape == (SIZE, SIZE, 3) and first.std() > 0

    synthetic_subject(server.base / "input" / "changed_subject.png", seed=99)
    (photo,) = [node for node in prompt.values() if node["class_type"] == "LoadImage"]
    photo["inputs"]["image"] = "changed_subject.png"
    assert not np.array_equal(render(server, prompt), first), "a different subject image must change the result"
    log = server.log_tail(10**6)  # the checkpoint loaded as ComfyUI's SDXL model, in bf16
    assert "Requested to load SDXL\n" in log and "model weight dtype torch.bfloat16" in log
