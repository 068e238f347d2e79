"""A process for the kill tests (tests/host/test_kill_safety.py): ComfyUI's modules with BASE_DIR as its base
directory (without its server, which the code run here does not use), then the pack's own code. The tests kill it at
a named moment (encoders/kill_safe.py) and run it again.

    python tests/kill_worker.py train BASE_DIR ARGS...
        `python -m train`'s main (train/run.py) with ARGS, on the tests' tiny SD1.5-layout UNet (BASE_DIR/tiny_unet.pt),
        alone or as one of torchrun's processes, with the text encoder of the config's checkpoint (a fresh adapter's
        token starts from a word's embedding); with its VAE and the CLIP vision model of the config's clip_vision where
        it renders validation images (the training itself reads the encodings cache)
    python tests/kill_worker.py create-adapter BASE_DIR CHECKPOINT FILENAME SEED
        the Create Nested Attention Adapter node, overwrite on, into BASE_DIR/models/nested_attention, for the tiny
        UNet and CHECKPOINT's text encoder
"""
import os
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def tiny_model(base_directory: Path):
    import torch
    from trainer_setup import tiny_sd15_model
    unet_config, state_dict = torch.load(base_directory / "tiny_unet.pt", weights_only=True)
    return tiny_sd15_model(unet_config, state_dict=state_dict)


def text_encoder_and_vae(checkpoint: str, vae: bool = True) -> tuple:
    import comfy.sd
    return comfy.sd.load_checkpoint_guess_config(checkpoint, output_vae=vae, output_model=False)[1:3]


def main() -> None:
    sys.path.insert(0, str(TESTS))
    import conftest  # noqa: F401  registers the pack as `subject_personalization`
    command, base_directory, *arguments = sys.argv[1:]
    base_directory = Path(base_directory)
    sys.path.insert(0, os.environ["COMFYUI_PATH"])
    sys.argv = [sys.argv[0], "--cpu", "--base-directory", str(base_directory)]
    import comfy.options
    comfy.options.enable_args_parsing()
    if command == "train":
        import comfy.clip_vision
        from subject_personalization.train.run import main as train
        from subject_personalization.train.trainer import BaseModels

        def tiny_base(config) -> BaseModels:
            validating = bool(config.validate_every and config.validation)
            clip, vae = text_encoder_and_vae(config.checkpoint, vae=validating)
            clip_vision = comfy.clip_vision.load(config.clip_vision) if validating else None
            return BaseModels(tiny_model(base_directory), clip, vae, clip_vision, "tiny-sd15")

        train(arguments, base_models=tiny_base)
    elif command == "create-adapter":
        checkpoint, filename, seed = arguments
        from subject_personalization.nodes.nested_adapter_nodes import NestedAttentionNewAdapter
        clip, _ = text_encoder_and_vae(checkpoint, vae=False)
        NestedAttentionNewAdapter().create(tiny_model(base_directory), clip, "person", "person", "ViT-L/14", int(seed),
                                           filename, overwrite=True)
    else:
        sys.exit(f"unknown command {command!r}: train or create-adapter")


if __name__ == "__main__":
    main()
