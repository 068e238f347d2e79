"""The supported host range as ComfyUI itself reads it, and the README's main job run as a user runs it."""
import os
import subprocess
import sys
from pathlib import Path

from hostenv import require_comfyui

COMFYUI_PATH = str(Path(require_comfyui()).resolve())  # the main job runs from another folder
PACK_ROOT = Path(__file__).resolve().parents[2]
TESTED_VERSIONS = ("0.3.64", "0.8.0")  # ../shared/hosts, the oldest and newest the README states


def test_comfyui_reads_the_supported_range_from_pyproject(comfy):
    from comfy_config import config_parser
    from packaging.specifiers import SpecifierSet

    import comfyui_version
    config = config_parser.extract_node_configuration(str(PACK_ROOT))
    assert config.project.name == "comfyui-subject-personalization"
    assert config.tool_comfy.display_name.startswith("Subject Personalization")
    supported = SpecifierSet(config.project.supported_comfyui_version)
    assert supported.contains(TESTED_VERSIONS[0]) and supported.contains(TESTED_VERSIONS[-1])
    assert supported.contains(comfyui_version.__version__), \
        f"ComfyUI {comfyui_version.__version__} runs these tests but pyproject says {supported}"
    readme = (PACK_ROOT / "README.md").read_text()
    assert f"ComfyUI {TESTED_VERSIONS[0]} to {TESTED_VERSIONS[-1]}" in readme


def main_job(tmp_path: Path, workflow: str) -> subprocess.CompletedProcess:
    """The README's main-job command in a fresh process, its temporary files in a folder of the test's."""
    command = [sys.executable, str(PACK_ROOT / "tools" / "run_workflow.py"), str(PACK_ROOT / "workflows" / workflow)]
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    return subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL,
                          env={**os.environ, "COMFYUI_PATH": COMFYUI_PATH, "TMPDIR": str(scratch)})


def test_the_main_job_runs_its_self_check_headless(tmp_path):
    """With no FastComposer weights installed."""
    done = main_job(tmp_path, "fastcomposer_two_subjects.json")
    assert done.returncode == 0, f"{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    assert "SELF-CHECK on seeded random weights (not installed: models/fastcomposer/pytorch_model.bin)" in done.stdout
    from PIL import Image
    images = sorted((tmp_path / "output").glob("selfcheck_*.png"))
    assert len(images) == 1 and Image.open(images[0]).size == (64, 64)
    assert not any((tmp_path / "tmp").glob("subject_personalization_selfcheck_*")), "the self-check left its weights behind"


def test_a_nested_workflow_without_its_files_stops_with_the_list_to_download(tmp_path):
    done = main_job(tmp_path, "nested_ipadapter_single_subject.json")
    assert done.returncode == 2, f"{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    assert ("nested_ipadapter_single_subject.json needs models/checkpoints/v1-5-pruned-emaonly.safetensors, "
            "models/clip_vision/CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors, "
            "models/ipadapter/ip-adapter-plus-face_sd15.safetensors in ComfyUI's folders") in done.stderr.replace("\n", " ")
