"""One process of the two-process trainer test: joins a gloo group and trains on the shared encodings."""
import os
import sys


def train_process(rank: int, world_size: int, options: dict, folder) -> None:
    import conftest  # noqa: F401  registers the pack as `subject_personalization`
    sys.path.insert(0, os.environ["COMFYUI_PATH"])
    sys.argv = ["main.py", "--cpu"]
    import comfy.options
    comfy.options.enable_args_parsing()
    import torch
    import torch.distributed as dist
    from subject_personalization.encoders.nested_adapter import load_nested_adapter
    from subject_personalization.train.config import TrainConfig
    from subject_personalization.train.trainer import BaseModels, Trainer
    from trainer_setup import tiny_sd15_model
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29533")
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        unet_config, state_dict = torch.load(folder / "tiny_unet.pt", weights_only=True)
        base = BaseModels(tiny_sd15_model(unet_config, state_dict=state_dict), name="tiny-sd15")
        trainer = Trainer(TrainConfig(**options), base, rank, world_size, adapter=load_nested_adapter(folder / "start.safetensors"))
        trainer.fit()
        torch.save(trainer.adapter.state_dict(), folder / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()
