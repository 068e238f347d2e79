"""pyproject.toml against the ComfyUI registry's documented fields (docs.comfy.org/registry/specifications): the id's
character rules, a semantic version, the licence, the supported ComfyUI range, the publisher and the optional face
dependencies. ComfyUI's own reading of the range is tested in the host tier (test_host_support.py)."""
import re
from pathlib import Path

from subject_personalization.encoders.checkpoint_io import read_toml

PACK_ROOT = Path(__file__).resolve().parents[2]
# Letters, digits, and single - _ . between them; starts with a letter; under 100 characters.
REGISTRY_ID = re.compile(r"^[A-Za-z][A-Za-z0-9]*(?:[-_.][A-Za-z0-9]+)*$")


def test_pyproject_carries_the_registry_fields():
    config = read_toml(PACK_ROOT / "pyproject.toml", "fix pyproject.toml")
    project, comfy = config["project"], config["tool"]["comfy"]
    assert REGISTRY_ID.match(project["name"]) and len(project["name"]) < 100
    assert "comfyui" not in project["name"].lower()
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"])
    assert (PACK_ROOT / project["license"]["file"]).is_file()
    assert project["description"].strip() and project["requires-python"] == ">=3.10"
    assert set(project["optional-dependencies"]["faces"]) == {"insightface", "onnxruntime"}
    assert comfy["PublisherId"] and comfy["DisplayName"]
    assert re.fullmatch(r">=\d+\.\d+\.\d+", comfy["requires-comfyui"])


def test_the_registry_id_rule_refuses_what_the_registry_refuses():
    for refused in ("123-tool", "-tool", "my--tool", "tool_", "x" * 100):
        assert not (REGISTRY_ID.match(refused) and len(refused) < 100), refused
