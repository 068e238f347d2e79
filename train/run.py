"""The command line: read the config, join the process group under torchrun, load the base model, train."""
import argparse
import os
from pathlib import Path
from typing import Callable, Mapping

import torch
import torch.distributed as dist

from .config import TrainConfig, load_config
from .trainer import BaseModels, Trainer, load_base_models
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


def shared_store_warning(environment: Mapping[str, str]) -> str | None:
    """What to change when torchrun may restart the job but shares its rendezvous store with the process group: a
    restarted group can then read its peers' addresses from the attempt before and fail to connect (pytorch/pytorch
    #135712; seen here with torch 2.9.1 and gloo). None when it does not apply."""
    restarts = environment.get("TORCHELASTIC_MAX_RESTARTS", "0")
    if not (restarts.isdecimal() and int(restarts) > 0 and environment.get("TORCHELASTIC_USE_AGENT_STORE") == "True"):
        return None
    return (f"torchrun may restart this job ({restarts} restarts) and shares its rendezvous store with the process "
            f"group, where a restarted group can read its peers' addresses from the attempt before and fail to connect "
            f"(pytorch/pytorch#135712): set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in torchrun's environment")


def main(argv: list[str] | None = None, base_models: Callable[[TrainConfig], BaseModels] | None = None) -> None:
    """The command. `base_models`: what the frozen base is made from (default: the config's checkpoint and CLIP
    vision files, through ComfyUI's loaders)."""
    parser = argparse.ArgumentParser(prog="python -m train", description="Train a Nested Attention adapter.")
    parser.add_argument("--config", help="a TOML or JSON file of training options (train/config.py lists them)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one option")
    parser.add_argument("--resume", help="a checkpoint of this run (…/checkpoints/step_N.safetensors); 'latest', its "
                                         "newest complete checkpoint; or 'auto', that or a fresh start when there is "
                                         "none (for jobs that torchrun --max-restarts restarts)")
    parser.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH"), help="the ComfyUI checkout (default: $COMFYUI_PATH)")
    args = parser.parse_args(argv)
    config = load_config(args.config, args.set)

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0 and (warning := shared_store_warning(os.environ)):
        print(f"warning: {warning}", flush=True)
    if world_size > 1:
        cuda = torch.cuda.is_available() and config.device != "cpu"
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
    try:
        if base_models is None:
            config.checkpoint = resolve_model_file(config.checkpoint, "checkpoints")
            config.clip_vision = resolve_model_file(config.clip_vision, "clip_vision")
        if config.init_from:
            config.init_from = resolve_model_file(config.init_from, "ipadapter", "nested_attention")
        trainer = Trainer(config, (base_models or load_base_models)(config), rank, world_size)
        if args.resume:
            trainer.resume(args.resume)
        trainer.fit(validate=render_validation if config.validation else None)
    finally:
        if world_size > 1:
            dist.destroy_process_group()
