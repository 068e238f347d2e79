"""Run ComfyUI in-process, headless: boot it, load this pack, turn graph-editor workflows into prompts, execute.

Used by the host-tier tests and by `tools/run_workflow.py`. Needs a ComfyUI checkout (COMFYUI_PATH).
"""
import asyncio
import json
import os
import sys
import uuid
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parent.parent
FRONTEND_ONLY_NODES = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
MUTED_MODES = {2, 4}  # "never" and "bypass" in the graph editor


class HeadlessComfy:
    """A booted ComfyUI with this pack loaded; base_directory (default: the checkout) holds models/, input/, output/.

    Boot it once per process: ComfyUI reads its command line and registers nodes at import time.
    """

    def __init__(self, comfyui_path: str | Path, base_directory: str | Path | None = None, extra_args: tuple[str, ...] = (),
                 cpu: bool = True):
        self.comfyui_path = Path(comfyui_path).resolve()
        self.base_directory = Path(base_directory or comfyui_path).resolve()
        sys.path.insert(0, str(self.comfyui_path))
        device_args = ["--cpu"] if cpu else []  # --cpu is needed on a machine without an NVIDIA driver
        sys.argv = [str(self.comfyui_path / "main.py"), *device_args, "--base-directory", str(self.base_directory), *extra_args]
        import comfy.options
        comfy.options.enable_args_parsing()
        import utils.extra_config  # noqa: F401  ComfyUI's own `utils` must be imported before `nodes`
        import execution
        import folder_paths
        import nodes
        self.execution, self.folder_paths, self.nodes = execution, folder_paths, nodes
        for name in ("input", "output", "models"):
            (self.base_directory / name).mkdir(parents=True, exist_ok=True)
        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
        self.server = _RecordingServer()
        # One executor for the session: like a running ComfyUI, it re-runs only nodes whose inputs changed.
        self.executor = execution.PromptExecutor(self.server)
        if not asyncio.run(nodes.load_custom_node(str(PACK_ROOT))):
            raise RuntimeError(f"ComfyUI failed to import the pack at {PACK_ROOT}; see the log above")

    def use_scratch_directories(self, scratch: Path, model_folders: tuple[str, ...]) -> None:
        """Send inputs, outputs and the named model folders to scratch, leaving the user's folders untouched."""
        for name in ("input", "output"):
            (scratch / name).mkdir(parents=True, exist_ok=True)
        self.folder_paths.set_input_directory(str(scratch / "input"))
        self.folder_paths.set_output_directory(str(scratch / "output"))
        for folder in model_folders:
            self.folder_paths.add_model_folder_path(folder, str(scratch / "models" / folder), is_default=True)

    def model_dir(self, folder_name: str) -> Path:
        path = Path(self.folder_paths.get_folder_paths(folder_name)[0])
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def input_dir(self) -> Path:
        return Path(self.folder_paths.get_input_directory())

    def workflow_to_prompt(self, workflow: dict) -> dict:
        """Graph-editor (UI) format -> API format: widget values follow INPUT_TYPES order, links become [node, slot]."""
        links = {link[0]: (str(link[1]), link[2]) for link in workflow["links"]}
        prompt = {}
        for node in workflow["nodes"]:
            if node["type"] in FRONTEND_ONLY_NODES or node.get("mode", 0) in MUTED_MODES:
                continue
            node_class = self.nodes.NODE_CLASS_MAPPINGS.get(node["type"])
            if node_class is None:
                raise KeyError(f"workflow node {node['id']} has unknown type {node['type']}")
            inputs = {}
            linked = {slot["name"]: slot.get("link") for slot in node.get("inputs", [])}
            values = iter(node.get("widgets_values", []))
            declared = node_class.INPUT_TYPES()
            for section in ("required", "optional"):
                for name, spec in declared.get(section, {}).items():
                    options = spec[1] if len(spec) > 1 else {}
                    is_widget = isinstance(spec[0], list) or spec[0] in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
                    if is_widget and not options.get("forceInput", False):
                        value = next(values)
                        if options.get("control_after_generate") or name in ("seed", "noise_seed"):
                            next(values)
                        if options.get("image_upload"):
                            next(values, None)
                        if linked.get(name) is None:
                            inputs[name] = value
                    if linked.get(name) is not None:
                        inputs[name] = list(links[linked[name]])
            prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
        return prompt

    def execute(self, prompt: dict) -> dict:
        """Validate and run an API-format prompt; returns the history outputs, raises with ComfyUI's messages on failure."""
        prompt_id = str(uuid.uuid4())
        valid, error, outputs, node_errors = asyncio.run(self.execution.validate_prompt(prompt_id, prompt, None))
        if not valid:
            raise RuntimeError(f"ComfyUI rejected the prompt: {error} {json.dumps(node_errors, default=str)[:2000]}")
        self.executor.execute(prompt, prompt_id, {"client_id": self.server.client_id}, outputs)
        events = [event for event, _ in self.executor.status_messages]
        if "execution_success" not in events:  # `success` alone can stay true after some graph errors
            raise RuntimeError(f"ComfyUI execution failed: {json.dumps(self.executor.status_messages, default=str)[-3000:]}")
        return self.executor.history_result["outputs"]

    def output_images(self, outputs: dict) -> list[Path]:
        """Paths of the images SaveImage / PreviewImage nodes wrote."""
        paths = []
        for node_output in outputs.values():
            for image in node_output.get("images", []):
                folder = self.folder_paths.get_directory_by_type(image["type"])
                paths.append(Path(folder) / image.get("subfolder", "") / image["filename"])
        return paths


class _RecordingServer:
    """The parts of ComfyUI's PromptServer the executor talks to."""

    def __init__(self):
        self.client_id = "headless"
        self.last_node_id = None
        self.last_prompt_id = None
        self.sockets_metadata = {}
        self.messages = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))


def comfyui_path_from_env() -> str | None:
    return os.environ.get("COMFYUI_PATH") or None
