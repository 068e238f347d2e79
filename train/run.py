"""The command line: read the config, join the process group under torchrun, load the base model, train."""
import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist

from .config import load_config
from .trainer import Trainer, load_base_models
from .validation import render_validation


def resolve_model_file(name: str, *folders: str) -> str:
    """A path as given, or a file name in one of ComfyUI's models/<folder>/ (the first that holds it)."""
    import folder_paths
    named = " or ".join(f"models/{folder}/" for folder in folders)
    if not name:
        raise ValueError(f"the config names no {folders[0]} file: set it to a path or a file name in {named}")
    if Path(name).is_file():
        return name
    found = next((path for folder in folders if (path := folder_paths.get_full_path(folder, name))), None)
    if found is None:
        raise FileNotFoundError(f"{name} is neither a file nor a file name in {named}: give its path, or put it there")
    return found


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m train", description="Train a Nested Attention adapter.")
    parser.add_argument("--config", help="a TOML or JSON file of training options (train/config.py lists them)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one option")
    parser.add_argument("--resume", help="a checkpoint of this run (…/checkpoints/step_N.safetensors) or 'latest'")
    parser.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH"), help="the ComfyUI checkout (default: $COMFYUI_PATH)")
    args = parser.parse_args(argv)
    config = load_config(args.config, args.set)

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world_size > 1:
        cuda = torch.cuda.is_available() and config.device != "cpu"
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
    try:
        config.checkpoint = resolve_model_file(config.checkpoint, "checkpoints")
        config.clip_vision = resolve_model_file(config.clip_vision, "clip_vision")
        if config.init_from:
            config.init_from = resolve_model_file(config.init_from, "ipadapter", "nested_attention")
        trainer = Trainer(config, load_base_models(config), rank, world_size)
        if args.resume:
            trainer.resume(args.resume)
        trainer.fit(validate=render_validation if config.validation else None)
    finally:
        if world_size > 1:
            dist.destroy_process_group()
