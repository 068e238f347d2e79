"""What the graph editor shows of each node of the pack: a description, a tooltip on every input and output (the range
and effect of every number), outputs named in one convention; in the classes ComfyUI registered, in its /object_info
(what the editor reads) and in the shipped workflows (which save the output names)."""
import json
import re
import sys
from pathlib import Path

import pytest

from hostenv import TESTED_VERSIONS, comfyui_version, require_comfyui

require_comfyui()

PACK_ROOT = Path(__file__).resolve().parents[2]
PACK_CATEGORY = "Subject Personalization"
# The naming rule (nodes/naming.py): the pack's prefix, then the node's CamelCase name. Saved workflows store these ids.
NODE_ID = re.compile(r"^SubjectPersonalization_[A-Z][A-Za-z]+$")
TITLE_CASE_WORD = re.compile(r"^[A-Z][A-Za-z-]*$")
OUTPUT_NAME = re.compile(r"^[a-z][a-z0-9_]*$")  # lowercase snake_case, naming what the output is


@pytest.fixture(scope="module")
def pack_nodes(comfy) -> dict:
    """Every node class ComfyUI registered from the pack (loaded as custom_nodes.<its folder>), by name."""
    folder = next(name for name, path in comfy.nodes.LOADED_MODULE_DIRS.items() if Path(path).resolve() == PACK_ROOT)
    found = {name: cls for name, cls in comfy.nodes.NODE_CLASS_MAPPINGS.items()
             if getattr(cls, "RELATIVE_PYTHON_MODULE", None) == f"custom_nodes.{folder}"}
    assert "SubjectPersonalization_FastComposerLoader" in found and "SubjectPersonalization_AddSubject" in found, sorted(found)
    return found


@pytest.fixture(scope="module")
def object_info(comfy) -> dict:
    """ComfyUI's /object_info, over its HTTP server, as the graph editor loads it."""
    comfy._serve()
    return comfy.get("/object_info")


def states_value(tooltip: str, value: float) -> bool:
    """Whether the tooltip names this number (1.0 as '1'), not as part of another ('0' in '0.2' or '10')."""
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return re.search(rf"(?<![\d.]){re.escape(text)}(?!\.?\d)", tooltip) is not None


def input_problems(name: str, spec: tuple) -> list[str]:
    options = spec[1] if len(spec) > 1 else {}
    tooltip = options.get("tooltip") or ""
    if not tooltip.strip():
        return [f"input {name} has no tooltip"]
    if spec[0] not in ("INT", "FLOAT"):
        return []
    if "min" not in options or "max" not in options:
        return [f"number input {name} declares no min and max"]
    return [f"the tooltip of {name} does not state its range end {options[end]}" for end in ("min", "max")
            if not states_value(tooltip, options[end])]


def node_problems(name: str, cls, display_names: dict) -> list[str]:
    problems = []
    if not (getattr(cls, "DESCRIPTION", "") or "").strip():
        problems.append("no DESCRIPTION")
    if not getattr(cls, "CATEGORY", "").startswith(PACK_CATEGORY):
        problems.append(f"CATEGORY {getattr(cls, 'CATEGORY', None)!r} is not under {PACK_CATEGORY!r}")
    if not display_names.get(name, "").strip():
        problems.append("no display name")
    declared = cls.INPUT_TYPES()
    for section in ("required", "optional"):
        for input_name, spec in declared.get(section, {}).items():
            problems += input_problems(input_name, spec)
    outputs = cls.RETURN_TYPES
    names = getattr(cls, "RETURN_NAMES", None)
    if names is None or len(names) != len(outputs):
        problems.append(f"RETURN_NAMES {names} does not name each of the outputs {outputs}")
    else:
        problems += [f"output name {output!r} is not lowercase snake_case" for output in names if not OUTPUT_NAME.match(output)]
    tooltips = getattr(cls, "OUTPUT_TOOLTIPS", None)
    if tooltips is None or len(tooltips) != len(outputs) or not all(isinstance(t, str) and t.strip() for t in tooltips):
        problems.append(f"OUTPUT_TOOLTIPS {tooltips} is not one tooltip per output {outputs}")
    return [f"{name}: {problem}" for problem in problems]


def test_the_pack_registers_the_nodes_of_its_registry(pack_nodes):
    registry = sys.modules[pack_nodes["SubjectPersonalization_AddSubject"].__module__.rsplit(".", 2)[0]].NODE_CLASS_MAPPINGS  # the pack's root
    assert set(pack_nodes) == set(registry)


def test_every_node_describes_itself_its_inputs_and_outputs(comfy, pack_nodes):
    problems = [problem for name, cls in sorted(pack_nodes.items())
                for problem in node_problems(name, cls, comfy.nodes.NODE_DISPLAY_NAME_MAPPINGS)]
    assert not problems, "\n".join(problems)


def test_the_graph_editor_receives_them_from_object_info(pack_nodes, object_info):
    for name, cls in pack_nodes.items():
        info = object_info[name]
        assert info["description"] == cls.DESCRIPTION and info["display_name"] != name
        assert info["category"].startswith(PACK_CATEGORY)
        for section in ("required", "optional"):
            for input_name, spec in info["input"].get(section, {}).items():
                assert spec[1]["tooltip"].strip(), f"{name}.{input_name}"
        assert info["output_name"] == list(cls.RETURN_NAMES) and info["output"] == list(cls.RETURN_TYPES)
        assert info["output_tooltips"] == list(cls.OUTPUT_TOOLTIPS), name


def test_every_node_id_follows_the_naming_rule_and_every_category_is_title_case(pack_nodes):
    """ComfyUI keeps one class per id and the pack loaded last wins: a generic id (AddSubject) can be taken from under
    the pack's workflows by another pack, so every id carries the pack's prefix."""
    assert [name for name in pack_nodes if not NODE_ID.match(name)] == []
    for name, cls in pack_nodes.items():
        parts = cls.CATEGORY.split("/")
        assert parts[0] == PACK_CATEGORY and all(TITLE_CASE_WORD.match(word) for part in parts for word in part.split()), \
            f"{name}: category {cls.CATEGORY!r}"


def test_every_node_can_be_found_by_the_words_users_type(pack_nodes, object_info):
    """Where the running ComfyUI lists search aliases (0.33.0), each node has the pack's words and its own; an older
    one (0.8.0) does not send the field and loads the same classes."""
    listed = [name for name in pack_nodes if "search_aliases" in object_info[name]]
    newest = comfyui_version(require_comfyui()) == TESTED_VERSIONS[-1]
    assert listed == (list(pack_nodes) if newest else []), listed
    face_nodes = {"PrepareFace", "NestedAttentionIPAdapterLoader", "NestedAttentionSubject", "ApplyNestedAttention"}
    for name in listed:
        cls = pack_nodes[name]
        aliases = object_info[name]["search_aliases"]
        assert aliases == cls.SEARCH_ALIASES and {"personalize", "subject", "identity"} <= set(aliases), name
        if name.removeprefix("SubjectPersonalization_") in face_nodes:
            assert "face" in aliases, name
        if "IPAdapter" in name:
            assert "ip-adapter" in aliases and "ipadapter" in aliases, name


@pytest.mark.parametrize("path", sorted((PACK_ROOT / "workflows").glob("*.json")), ids=lambda path: path.name)
def test_workflows_save_each_output_under_its_name(path, object_info):
    """The editor shows a saved node's outputs under the names the workflow saved, and links them by slot index."""
    for node in json.loads(path.read_text())["nodes"]:
        info = object_info[node["type"]]
        saved = [(output["name"], output["type"]) for output in node.get("outputs", [])]
        assert saved == list(zip(info["output_name"], info["output"])), f"{path.name}: node {node['id']} {node['type']}"
