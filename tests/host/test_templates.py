"""The pack's workflows in ComfyUI's template browser: listed under the pack's folder by /workflow_templates, each with
the card picture the editor asks for beside it (/api/workflow_templates/<folder>/<name>.jpg, frontends 1.35 to 1.58),
served by the host's own routes."""
import json
import urllib.request
from pathlib import Path

from hostenv import require_comfyui

require_comfyui()
from PIL import Image  # noqa: E402

PACK_ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = sorted((PACK_ROOT / "workflows").glob("*.json"))


def test_every_workflow_has_its_card_picture():
    for path in WORKFLOWS:
        picture = path.with_suffix(".jpg")
        with Image.open(picture) as image:
            assert image.format == "JPEG" and image.size == (512, 512), picture.name  # the cards are square
        assert picture.stat().st_size < 100_000, f"{picture.name}: commit-sized pictures (tools/build_thumbnails.py)"
    assert sorted((PACK_ROOT / "workflows").glob("*.jpg")) == [path.with_suffix(".jpg") for path in WORKFLOWS]


def test_the_template_browser_lists_the_workflows_and_gets_their_pictures(comfy):
    folder = comfy.nodes.NODE_CLASS_MAPPINGS["SubjectPersonalization_FastComposerLoader"].RELATIVE_PYTHON_MODULE.removeprefix("custom_nodes.")
    comfy._serve()
    assert sorted(comfy.get("/workflow_templates")[folder]) == [path.stem for path in WORKFLOWS]
    for path in WORKFLOWS:
        route = f"{comfy.url}/api/workflow_templates/{folder}/{path.stem}"
        with urllib.request.urlopen(f"{route}.jpg", timeout=60) as reply:
            assert reply.read() == path.with_suffix(".jpg").read_bytes()
        with urllib.request.urlopen(f"{route}.json", timeout=60) as reply:  # what a click on the card loads
            assert json.loads(reply.read()) == json.loads(path.read_text())
