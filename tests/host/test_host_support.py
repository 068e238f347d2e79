"""The supported host range as ComfyUI itself reads it, the headless runner as main.py runs ComfyUI, and the main job's
answer when a workflow's files are missing (its self-check runs in test_readme_commands.py, as the README writes it)."""
import importlib
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from hostenv import TESTED_VERSIONS, require_comfyui

COMFYUI_PATH = str(Path(require_comfyui()).resolve())  # the main job runs from another folder
PACK_ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.compat
def test_comfyui_reads_the_supported_range_from_pyproject(comfy):
    from comfy_config import config_parser
    from packaging.specifiers import SpecifierSet

    import comfyui_version
    config = config_parser.extract_node_configuration(str(PACK_ROOT))
    assert config.project.name == "subject-personalization"
    assert config.tool_comfy.display_name.startswith("Subject Personalization")
    supported = SpecifierSet(config.project.supported_comfyui_version)
    assert supported.contains(TESTED_VERSIONS[0]) and supported.contains(TESTED_VERSIONS[-1])
    assert supported.contains(comfyui_version.__version__), \
        f"ComfyUI {comfyui_version.__version__} runs these tests but pyproject says {supported}"
    readme = (PACK_ROOT / "README.md").read_text()
    assert f"ComfyUI {TESTED_VERSIONS[0]} to {TESTED_VERSIONS[-1]}" in readme


@pytest.mark.compat
def test_the_headless_runner_queues_prompts_on_main_pys_own_prompt_worker(comfy):
    """The runner (tools/comfy_headless.py) starts ComfyUI with main.py's own start_comfyui(): the executor that runs
    what it queues is made by main.py's prompt worker, with the caches main.py builds from the command line in this
    version (0.23 and later also read cache_args["ram_inactive"]), never by the pack."""
    main = sys.modules["comfyui_main"]
    workers = [thread for thread in threading.enumerate() if getattr(thread, "_target", None) is main.prompt_worker]
    assert len(workers) == 1 and workers[0].is_alive()
    prompt = {"1": {"class_type": "EmptyImage", "inputs": {"width": 24, "height": 24, "batch_size": 1, "color": 0x5A17E5}},
              "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}
    runs = [comfy.wait(comfy.queue(prompt), timeout=120)["status"] for _ in range(2)]
    assert [run["status_str"] for run in runs] == ["success", "success"]
    cached = [dict(run["messages"])["execution_cached"]["nodes"] for run in runs]
    assert "1" not in cached[0] and "1" in cached[1], f"main.py's cache keeps the first run's outputs: {cached}"
    tools = PACK_ROOT / "tools"
    assert not [path.name for path in tools.glob("*.py") if "PromptExecutor" in path.read_text()]


@pytest.mark.compat
def test_free_memory_returns_only_once_the_worker_has_unloaded(comfy, fastcomposer_models, monkeypatch):
    """ComfyUI's prompt worker unloads models on its own thread, the tests load them on theirs, and ComfyUI's list of
    loaded models is not thread-safe: in CI a load during the unload left an unloaded model listed, and every later
    load failed in `is_dead`. So the runner's free_memory returns only once the unload is over, also when the request
    lands while the worker is busy between two waits for a prompt (held here in its clean-up after a prompt) and the
    unload is slow (made so here)."""
    management = importlib.import_module("comfy.model_management")
    hook_breaker = importlib.import_module("hook_breaker_ac10a0")  # main.py calls it at the end of its clean-up
    unload_all_models, restore_functions = management.unload_all_models, hook_breaker.restore_functions
    held, release = threading.Event(), threading.Event()

    def held_restore_functions():
        held.set()
        release.wait(timeout=60)
        restore_functions()

    def slow_unload_all_models():
        time.sleep(2)
        unload_all_models()

    clip = fastcomposer_models[1]
    clip.encode_from_tokens(clip.tokenize("a photo"))
    assert any(loaded.model is clip.patcher for loaded in management.current_loaded_models)
    monkeypatch.setattr(management, "unload_all_models", slow_unload_all_models)
    monkeypatch.setattr(hook_breaker, "restore_functions", held_restore_functions)
    comfy.execute({"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 7}},
                   "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}})
    assert held.wait(timeout=30), "main.py's prompt worker did not clean up after the prompt within 30 s"
    freeing = threading.Thread(target=comfy.free_memory, name="free_memory")
    freeing.start()
    while freeing.is_alive() and not comfy.server.prompt_queue.get_flags(reset=False):
        time.sleep(0.01)  # the request is in, unread by the held worker
    release.set()
    freeing.join(timeout=120)
    assert not freeing.is_alive(), "free_memory did not return within 120 s"
    listed = [type(loaded.model).__name__ for loaded in management.current_loaded_models if loaded.model is not None]
    assert not listed, f"free_memory returned while ComfyUI still listed loaded models: {listed}"


def main_job(tmp_path: Path, workflow: str) -> subprocess.CompletedProcess:
    """The README's main-job command in a fresh process, its temporary files in a folder of the test's."""
    command = [sys.executable, str(PACK_ROOT / "tools" / "run_workflow.py"), str(PACK_ROOT / "workflows" / workflow)]
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    return subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL,
                          env={**os.environ, "COMFYUI_PATH": COMFYUI_PATH, "TMPDIR": str(scratch)})


def test_a_nested_workflow_without_its_files_stops_with_the_list_to_download(tmp_path):
    done = main_job(tmp_path, "nested_ipadapter_single_subject.json")
    assert done.returncode == 2, f"{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    assert ("nested_ipadapter_single_subject.json needs models/checkpoints/v1-5-pruned-emaonly.safetensors, "
            "models/clip_vision/CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors, "
            "models/ipadapter/ip-adapter-plus-face_sd15.safetensors in ComfyUI's folders") in done.stderr.replace("\n", " ")
