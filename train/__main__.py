"""`python -m train` from the pack's folder: boot ComfyUI headless, then run the trainer inside the pack's package."""
import sys
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parent.parent

if __name__ == "__main__":
    # The pack's folder must not shadow ComfyUI's top-level modules (`nodes`, `utils`).
    sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != PACK_ROOT]
    sys.path.insert(0, str(PACK_ROOT / "tools"))
    from pack_package import comfyui_from_command_line, register_pack
    register_pack()
    comfyui = comfyui_from_command_line(sys.argv, "the trainer loads the base model with ComfyUI's own loader")
    import torch
    from subject_personalization.tools.comfy_headless import HeadlessComfy
    arguments = sys.argv[1:]
    HeadlessComfy(comfyui, cpu=not torch.cuda.is_available())  # replaces sys.argv with ComfyUI's own
    from subject_personalization.train.run import main
    main(arguments)
