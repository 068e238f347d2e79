"""workflows/nested_official_sdxl.json, the authors' SDXL checkpoint imported in the graph, runs in a real ComfyUI.

An SDXL base model takes about 14 GB once ComfyUI loads it in float32 on a CPU, too much beside this session's models
on a 24 GB machine; so the workflow runs in ComfyUI's own server in a subprocess started with --bf16-unet
--bf16-text-enc --bf16-vae (about 9 GB), queued over HTTP as the graph editor queues it, and stopped after. Its files
hold seeded random weights in the published layouts (the session's `official_sdxl_files`, and its CLIP ViT-H/14).
Images are 64x64 with 2 steps.
"""
import io
import json
from pathlib import Path

import pytest

from hostenv import require_comfyui

COMFYUI_PATH = Path(require_comfyui())
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from model_files import model_paths_config  # noqa: E402
from synthetic_photos import synthetic_subject  # noqa: E402

from subject_personalization.tools.comfy_headless import small_and_quick  # noqa: E402
from subject_personalization.tools.comfy_server import running_server  # noqa: E402

WORKFLOW = Path(__file__).resolve().parents[2] / "workflows" / "nested_official_sdxl.json"
BF16 = ("--bf16-unet", "--bf16-text-enc", "--bf16-vae")
SIZE, STEPS = 64, 2
PROMPT_TIMEOUT = 900  # s: loading 6.9 GB and sampling SDXL on a busy 2-core machine
CLIENT = "official-sdxl-workflow-test"


@pytest.fixture(scope="module")
def server(tmp_path_factory, official_sdxl_files, clip_vision_h_file):
    config = model_paths_config(tmp_path_factory.mktemp("model_paths") / "extra_model_paths.yaml",
                                [*official_sdxl_files, clip_vision_h_file])
    with running_server(COMFYUI_PATH, tmp_path_factory.mktemp("official_sdxl"),
                        (*BF16, "--extra-model-paths-config", str(config)), http_timeout=120) as running:
        yield running


def render(server, prompt: dict) -> np.ndarray:
    entry = server.wait(server.queue(prompt, CLIENT), timeout=PROMPT_TIMEOUT)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"], default=str)[:3000]
    (saved,) = [image for output in entry["outputs"].values() for image in output.get("images", [])]
    return np.asarray(Image.open(io.BytesIO(server.image(saved))))


def test_the_workflow_names_the_sdxl_base_and_the_official_checkpoint(official_sdxl_files):
    workflow = json.loads(WORKFLOW.read_text())
    values = {node["type"]: node["widgets_values"] for node in workflow["nodes"]}
    base, official = official_sdxl_files
    assert values["CheckpointLoaderSimple"] == [base.name]
    assert values["SubjectPersonalization_NestedAttentionOfficialLoader"][0] == official.name
    assert values["EmptyLatentImage"][:2] == [1024, 1024]


@pytest.mark.compat
def test_the_workflow_runs_on_sdxl_and_follows_the_subject(server, comfy, compat_run):
    prompt = small_and_quick(comfy.workflow_to_prompt(json.loads(WORKFLOW.read_text())), SIZE, STEPS)
    first = render(server, prompt)
    assert first.shape == (SIZE, SIZE, 3) and first.std() > 0
    log = server.log_tail(10**6)  # the checkpoint loaded as ComfyUI's SDXL model, in bf16
    assert "Requested to load SDXL\n" in log and "model weight dtype torch.bfloat16" in log
    if compat_run:
        return

    synthetic_subject(server.base / "input" / "changed_subject.png", seed=99)
    (photo,) = [node for node in prompt.values() if node["class_type"] == "LoadImage"]
    photo["inputs"]["image"] = "changed_subject.png"
    assert not np.array_equal(render(server, prompt), first), "a different subject image must change the result"
