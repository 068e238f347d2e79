"""Run ComfyUI headless the way its own `main.py` runs it, with this pack among its custom nodes.

Used by the main job (`tools/run_workflow.py`), the host-tier tests, the trainer and the benchmarks. ComfyUI's
`main.py` is imported as a module and its `start_comfyui()` called: argument parsing, paths, prestartup scripts,
node loading (the pack from `custom_nodes/`, as a user's install loads it), database and prompt worker are the
host's own code in whichever version COMFYUI_PATH holds. Prompts go through its HTTP API on a loopback port
(`/prompt`, then `/history`), as the graph editor sends them, so a change in the host breaks here, in CI, first.
"""
import importlib.util
import json
import os
import sys
import tempfile
import threading
import uuid
from pathlib import Path

if __package__:
    from .comfy_client import ComfyClient, free_loopback_port
else:  # imported with tools/ on sys.path (run_workflow.py, the benchmarks)
    from comfy_client import ComfyClient, free_loopback_port

PACK_ROOT = Path(__file__).resolve().parent.parent
PACK_NODE = "SubjectPersonalization_FastComposerLoader"  # any node of the pack: its presence shows ComfyUI imported the pack
FRONTEND_ONLY_NODES = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
MUTED_MODES = {2, 4}  # "never" and "bypass" in the graph editor
_TRIVIAL_PROMPT = {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
                   "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}


class HeadlessComfy(ComfyClient):
    """A booted ComfyUI with this pack loaded; base_directory (default: the checkout) holds models/, input/, output/.

    Boot it once per process: ComfyUI reads its command line and registers nodes at import time. The HTTP server
    starts on the first `execute` (loading models for the trainer needs none).
    """

    def __init__(self, comfyui_path: str | Path, base_directory: str | Path | None = None, extra_args: tuple[str, ...] = (),
                 cpu: bool = True):
        self.comfyui_path = Path(comfyui_path).resolve()
        if not (self.comfyui_path / "main.py").is_file():
            raise FileNotFoundError(f"{self.comfyui_path} holds no ComfyUI (no main.py); set COMFYUI_PATH to a ComfyUI "
                                    f"checkout, e.g. one made by tools/setup_comfyui.sh")
        self.base_directory = Path(base_directory or comfyui_path).resolve()
        for name in ("input", "output", "models", "custom_nodes", "user"):
            (self.base_directory / name).mkdir(parents=True, exist_ok=True)
        super().__init__(free_loopback_port())
        custom_nodes = self._custom_nodes_with_the_pack()
        device_args = ["--cpu"] if cpu else []  # --cpu is needed on a machine without an NVIDIA driver
        # The database beside the base's user folder: ComfyUI's own default for a checkout, inside a scratch base.
        database = f"sqlite:///{self.base_directory / 'user' / 'comfyui.db'}"
        sys.argv = [str(self.comfyui_path / "main.py"), *device_args, "--base-directory", str(self.base_directory),
                    "--listen", "127.0.0.1", "--port", str(self.port), "--database-url", database, *extra_args]
        sys.path.insert(0, str(self.comfyui_path))
        import comfy.options
        comfy.options.enable_args_parsing()
        import folder_paths
        if custom_nodes is not None:
            folder_paths.add_model_folder_path("custom_nodes", str(custom_nodes))
        main = _import_file("comfyui_main", self.comfyui_path / "main.py")
        self.loop, self.server, self._start_server = main.start_comfyui()
        # main.py's progress hook reads the last prompt's id, which only its prompt worker sets; nodes called
        # directly (the trainer, the tests) report progress before any prompt ran.
        self.server.last_prompt_id = None
        import nodes
        self.folder_paths, self.nodes = folder_paths, nodes
        if PACK_NODE not in nodes.NODE_CLASS_MAPPINGS:
            raise RuntimeError(f"ComfyUI failed to import the pack at {PACK_ROOT}: see 'IMPORT FAILED' in the log above")
        self.client_id = uuid.uuid4().hex
        self._serving = False

    def _custom_nodes_with_the_pack(self) -> Path | None:
        """Link the pack into base/custom_nodes when that is a scratch base; a folder to add when the user's lacks it."""
        folder = self.base_directory / "custom_nodes"
        if any(entry.resolve() == PACK_ROOT for entry in folder.iterdir()):
            return None
        if self.base_directory != self.comfyui_path:
            (folder / PACK_ROOT.name).symlink_to(PACK_ROOT, target_is_directory=True)
            return None
        extra = Path(tempfile.mkdtemp(prefix="subject_personalization_nodes_"))
        (extra / PACK_ROOT.name).symlink_to(PACK_ROOT, target_is_directory=True)
        return extra

    def _serve(self) -> None:
        """Start ComfyUI's HTTP server on its own event loop thread, as main.py starts it, and wait until it answers."""
        if self._serving:
            return
        threading.Thread(target=self.loop.run_until_complete, args=(self._start_server(),), daemon=True,
                         name="comfyui-server").start()
        self.wait_until_answering("/system_stats", timeout=120)
        self._serving = True

    def use_scratch_directories(self, scratch: Path, model_folders: tuple[str, ...]) -> None:
        """Send inputs, outputs and the named model folders to scratch, leaving the user's folders untouched."""
        for name in ("input", "output"):
            (scratch / name).mkdir(parents=True, exist_ok=True)
        self.folder_paths.set_input_directory(str(scratch / "input"))
        self.folder_paths.set_output_directory(str(scratch / "output"))
        for folder in model_folders:
            self.folder_paths.add_model_folder_path(folder, str(scratch / "models" / folder), is_default=True)

    def free_memory(self) -> None:
        """Drop ComfyUI's cached node outputs and loaded models, as POST /free does for the graph editor, and return only
        once its prompt worker has. The worker unloads on its own thread, after the prompt it is running or as soon as
        the request wakes it; ComfyUI's list of loaded models is not thread-safe (a model loaded here during that
        unload shifts its indices, leaves an unloaded model listed, and every later load fails in `is_dead`). The
        worker takes one prompt at a time and reads the request after each, so the second of two trivial prompts
        starts only once the unload is over."""
        self._serve()
        self.post("/free", {"unload_models": True, "free_memory": True})
        for _ in range(2):
            self.execute(_TRIVIAL_PROMPT)

    def pack_module(self, name: str):
        """A module of the pack as ComfyUI loaded it (from custom_nodes, under its folder's name): e.g. "nodes.subjects"."""
        root = self.nodes.NODE_CLASS_MAPPINGS[PACK_NODE].__module__.rsplit(".nodes.", 1)[0]
        return importlib.import_module(f"{root}.{name}")

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

    def queue(self, prompt: dict, client_id: str | None = None) -> str:
        self._serve()
        return super().queue(prompt, client_id or self.client_id)

    def execute(self, prompt: dict, timeout: float | None = None) -> dict:
        """Queue a prompt, wait for it; the history outputs. Raises with ComfyUI's messages when it did not succeed."""
        status = (entry := self.wait(self.queue(prompt), timeout))["status"]
        events = {event: data for event, data in status["messages"]}
        if status["status_str"] != "success" or "execution_success" not in events:
            error = events.get("execution_error") or events.get("execution_interrupted") or status
            raise RuntimeError(f"ComfyUI execution failed: {json.dumps(error, default=str)[-3000:]}")
        return entry["outputs"]

    def output_images(self, outputs: dict) -> list[Path]:
        """Paths of the images SaveImage / PreviewImage nodes wrote."""
        paths = []
        for node_output in outputs.values():
            for image in node_output.get("images", []):
                folder = self.folder_paths.get_directory_by_type(image["type"])
                paths.append(Path(folder) / image.get("subfolder", "") / image["filename"])
        return paths


def small_and_quick(prompt: dict, side: int, steps: int) -> dict:
    """The prompt (API format, changed in place and returned) at side x side pixels and `steps` sampler steps."""
    for node in prompt.values():
        if node["class_type"] == "EmptyLatentImage":
            node["inputs"].update(width=side, height=side)
        if "steps" in node["inputs"]:
            node["inputs"]["steps"] = steps
    return prompt


def _import_file(module_name: str, path: Path):
    """Execute a source file as a module of that name (not __main__: main.py then skips its own start)."""
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def comfyui_path_from_env() -> str | None:
    return os.environ.get("COMFYUI_PATH") or None
