"""Run one of the pack's example workflows headless through ComfyUI: the pack's main job from a terminal.

    COMFYUI_PATH=/path/to/ComfyUI python tools/run_workflow.py workflows/fastcomposer_two_subjects.json \
        --subject man.jpg --subject woman.jpg

With the workflow's weights installed in ComfyUI's models folders, this renders the workflow as saved, with
your subject photos (default: the workflow's own, shipped in photos/). Without them a FastComposer workflow runs
a SELF-CHECK instead: the same graph on seeded random weights (written to a temporary folder) and the shipped
photos, at 64x64 with 2 steps. Its image is noise by design; it shows that the pack, the graph and ComfyUI work
together on this machine. The FastComposer stand-in has the official file's keys, shapes and dtypes and goes
through the same loader; its tensors share a few random blocks, so it takes about 0.7 GB of disk instead of 5.5 GB.
Other workflows without their files stop with the list of what to download.
"""
import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the tools folder only, never the pack root
from comfy_headless import HeadlessComfy, small_and_quick  # noqa: E402

SELF_CHECK_SIZE, SELF_CHECK_STEPS = 64, 2
# Loader node -> (model folder, input naming the file)
LOADERS = {"SubjectPersonalization_FastComposerLoader": ("fastcomposer", "checkpoint"), "CheckpointLoaderSimple": ("checkpoints", "ckpt_name"),
           "CLIPVisionLoader": ("clip_vision", "clip_name"), "SubjectPersonalization_NestedAttentionIPAdapterLoader": ("ipadapter", "ipadapter"),
           "SubjectPersonalization_NestedAttentionLoader": ("nested_attention", "adapter"),
           "SubjectPersonalization_NestedAttentionOfficialLoader": ("nested_attention", "checkpoint"),
           "IPAdapterModelLoader": ("ipadapter", "ipadapter_file")}
OTHER_PACKS = {"IPAdapter": "ComfyUI_IPAdapter_plus (https://github.com/cubiq/ComfyUI_IPAdapter_plus)"}  # node prefix
STAND_INS = {"SubjectPersonalization_FastComposerLoader"}  # the loaders the self-check has seeded random weights for


def missing_weights(comfy: HeadlessComfy, prompt: dict) -> dict[str, str]:
    """'models/<folder>/<file>' -> loader node type, for every model file the workflow names that is not installed."""
    missing = {}
    for node in prompt.values():
        if node["class_type"] in LOADERS:
            folder, input_name = LOADERS[node["class_type"]]
            if node["inputs"][input_name] not in comfy.folder_paths.get_filename_list(folder):
                missing[f"models/{folder}/{node['inputs'][input_name]}"] = node["class_type"]
    return missing


def write_random_weights(comfy: HeadlessComfy, prompt: dict) -> None:
    from pack_package import register_pack
    register_pack()
    from subject_personalization.tools.random_fastcomposer import write_random_fastcomposer
    for node in prompt.values():
        if node["class_type"] == "SubjectPersonalization_FastComposerLoader":
            print("self-check: writing a FastComposer stand-in with seeded random weights in the official layout (0.7 GB)")
            name = Path(node["inputs"]["checkpoint"]).with_suffix(".bin").name  # the light stand-in is a pickle
            write_random_fastcomposer(comfy.model_dir("fastcomposer") / name, seed=0, light=True)
            node["inputs"]["checkpoint"] = name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workflow", type=Path, help="a workflow JSON from workflows/")
    parser.add_argument("--subject", action="append", type=Path, default=[],
                        help="a subject photo, once per subject, in the order of the workflow's image nodes")
    parser.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH"), help="the ComfyUI checkout (default: $COMFYUI_PATH)")
    parser.add_argument("--output", type=Path, default=Path("output"), help="where to copy the resulting images")
    args = parser.parse_args()
    if not args.comfyui:
        parser.error("set COMFYUI_PATH or pass --comfyui: this runs the workflow through a real ComfyUI")

    comfy = HeadlessComfy(args.comfyui)
    workflow = json.loads(args.workflow.read_text())
    unknown = sorted({node["type"] for node in workflow["nodes"]} - set(comfy.nodes.NODE_CLASS_MAPPINGS))
    if unknown:
        packs = sorted({pack for node_type in unknown for prefix, pack in OTHER_PACKS.items() if node_type.startswith(prefix)})
        parser.error(f"{args.workflow.name} uses nodes this ComfyUI does not have ({', '.join(unknown)}): install "
                     f"{' and '.join(packs) or 'the custom node pack that provides them'} into its custom_nodes folder")
    prompt = comfy.workflow_to_prompt(workflow)
    missing = missing_weights(comfy, prompt)
    if set(missing.values()) - STAND_INS:
        parser.error(f"{args.workflow.name} needs {', '.join(missing)} in ComfyUI's folders (README, 'Workflows and "
                     f"the files they need'); the self-check on random weights covers the FastComposer workflows only")
    scratch = Path(tempfile.mkdtemp(prefix="subject_personalization_selfcheck_")) if missing else None
    try:
        run(comfy, prompt, args, parser, missing, scratch)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def run(comfy: HeadlessComfy, prompt: dict, args: argparse.Namespace, parser: argparse.ArgumentParser,
        missing: dict[str, str], scratch: Path | None) -> None:
    if missing:
        print(f"SELF-CHECK on seeded random weights (not installed: {', '.join(missing)}); the image is noise by design")
        comfy.use_scratch_directories(scratch, tuple(LOADERS[loader][0] for loader in STAND_INS))
        comfy.pack_module("nodes.example_photos").install_example_photos()  # into the scratch input folder
        write_random_weights(comfy, prompt)
        small_and_quick(prompt, SELF_CHECK_SIZE, SELF_CHECK_STEPS)

    image_nodes = [node for node in prompt.values() if node["class_type"] == "LoadImage"]
    if args.subject and len(args.subject) != len(image_nodes):
        parser.error(f"{args.workflow.name} takes {len(image_nodes)} subject image(s), {len(args.subject)} given")
    for index, node in enumerate(image_nodes):
        target = comfy.input_dir / f"run_workflow_subject_{index + 1}.png"
        if args.subject:
            shutil.copy(args.subject[index], target)
        elif not (comfy.input_dir / node["inputs"]["image"]).exists():
            parser.error(f"give the subject photos with --subject (the workflow's {node['inputs']['image']} is not in ComfyUI's input folder)")
        else:
            continue
        node["inputs"]["image"] = target.name

    args.output.mkdir(parents=True, exist_ok=True)
    for image in comfy.output_images(comfy.execute(prompt)):
        destination = args.output / (("selfcheck_" if missing else "") + image.name)
        shutil.copy(image, destination)
        print(f"{'SELF-CHECK image' if missing else 'image'}: {destination}")


if __name__ == "__main__":
    main()
