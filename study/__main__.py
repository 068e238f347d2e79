"""`python -m study` from the pack's folder: boot ComfyUI headless, then run the study inside the pack's package."""
import sys
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parent.parent

if __name__ == "__main__":
    # The pack's folder must not shadow ComfyUI's top-level modules (`nodes`, `utils`).
    sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != PACK_ROOT]
    sys.path.insert(0, str(PACK_ROOT / "tools"))
    from pack_package import comfyui_from_command_line, register_pack
    register_pack()
    comfyui = comfyui_from_command_line(sys.argv, "the study samples with ComfyUI's own nodes")
    import tempfile

    from subject_personalization.tools.comfy_headless import HeadlessComfy
    arguments = sys.argv[1:]
    # A scratch base folder: the study reads no model file and writes only under its --output.
    HeadlessComfy(comfyui, tempfile.mkdtemp(prefix="study_comfyui_"), extra_args=("--use-pytorch-cross-attention",))
    from subject_personalization.study.run import main
    main(arguments)
