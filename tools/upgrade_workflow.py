"""Upgrade a workflow saved with the pack's 0.1.0 to the node ids it has had since 0.2.0 (SubjectPersonalization_<Name>).

    python tools/upgrade_workflow.py OLD.json [NEW.json]     (default: OLD.upgraded.json beside it)

Reads the graph editor's format (nodes[].type) and the API format (<id>.class_type); only the pack's own 0.1.0 ids
change, so other packs' nodes and ComfyUI's are left as they are.
"""
import argparse
import json
from pathlib import Path

NODE_ID_PREFIX = "SubjectPersonalization_"  # nodes/naming.py
OLD_IDS = frozenset({
    "FastComposerLoader", "FastComposerEncode", "NestedAttentionLoader", "NestedAttentionNewAdapter",
    "ApplyNestedAttention", "NestedAttentionEncode", "NestedAttentionIPAdapterLoader", "NestedAttentionOfficialLoader",
    "NestedAttentionSubject", "PrepareSubjectWithMask", "PrepareFace", "SubjectRegionMask", "ApplySubjectMasks",
    "AddSubject", "RecordSubjectAttention", "SubjectAttentionMaps",
})


def upgraded(workflow: dict) -> tuple[dict, int]:
    """The workflow with every 0.1.0 id of the pack prefixed, and how many nodes changed."""
    changed = 0

    def renamed(node: dict, key: str) -> None:
        nonlocal changed
        if node.get(key) in OLD_IDS:
            node[key] = NODE_ID_PREFIX + node[key]
            if node.get("properties", {}).get("Node name for S&R") in OLD_IDS:
                node["properties"]["Node name for S&R"] = node[key]
            changed += 1

    for node in workflow.get("nodes", []):  # the graph editor's format
        renamed(node, "type")
    for node in workflow.values():  # the API format: {"<id>": {"class_type": ...}}
        if isinstance(node, dict):
            renamed(node, "class_type")
    return workflow, changed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workflow", type=Path)
    parser.add_argument("output", type=Path, nargs="?")
    args = parser.parse_args()
    try:
        workflow = json.loads(args.workflow.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        parser.exit(1, f"cannot read {args.workflow}: {error}; give a workflow .json saved by ComfyUI\n")
    if not isinstance(workflow, dict):
        parser.exit(1, f"{args.workflow} holds a JSON {type(workflow).__name__}, not a workflow\n")
    output = args.output or args.workflow.with_suffix(".upgraded.json")
    if output.exists():
        parser.exit(1, f"{output} exists: give another output name\n")
    workflow, changed = upgraded(workflow)
    from pack_package import register_pack  # this script's folder, tools/, is the first on the import path
    register_pack()
    from subject_personalization.encoders.kill_safe import written_beside
    with written_beside(output) as partial:
        partial.write_text(json.dumps(workflow, indent=2), encoding="utf-8")
    print(f"wrote {output}: {changed} node(s) of the pack renamed")


if __name__ == "__main__":
    main()
