"""`python -m train` and torchrun on a ComfyUI SD1.5 checkpoint file, in processes of their own.

A module of its own, holding no model in this process: each of torchrun's two workers loads SD1.5 in float32 (about
6 GB each), and beside test_trainer.py's models the test reached 21 GB on a 24 GB machine.
"""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hostenv import require_comfyui

require_comfyui()
from trainer_setup import write_dataset  # noqa: E402

PACK_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def toys(tmp_path_factory) -> Path:
    """test_trainer.py's procedural subjects on disk (images, masks, references, captions): no model."""
    folder = tmp_path_factory.mktemp("toys")
    write_dataset(folder)
    return folder


CLI_CONFIG = """
resolution = 64
batch_size = 1
max_steps = 1
checkpoint_every = 1
log_every = 1
validate_every = 1
validation_steps = 2
device = "cpu"
encoder = {{ num_queries = 4, depth = 1, width = 64, heads = 4 }}
data = "{data}"
output = "{output}"
checkpoint = "{checkpoint}"
clip_vision = "{clip_vision}"

[[validation]]
prompt = "a photo of a toy on a table"
word = "toy"
reference = "references/0_0.png"
"""


def run_command(*arguments: str) -> None:
    # torch's own threads: torchrun gives each of its processes one thread, a single process takes the machine's.
    done = subprocess.run([sys.executable, *arguments], cwd=PACK_ROOT, capture_output=True, text=True, timeout=900,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0, f"{' '.join(arguments)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"


def test_command_line_trains_validates_and_resumes_under_torchrun(toys, tmp_path, sd15_checkpoint_file, clip_vision_file):
    """`python -m train` on a ComfyUI SD1.5 checkpoint file, then `torchrun` with 2 gloo processes resuming that run
    from its latest complete checkpoint."""
    from PIL import Image
    from subject_personalization.encoders.nested_adapter import load_nested_adapter
    output = tmp_path / "run"
    config = tmp_path / "run.toml"
    config.write_text(CLI_CONFIG.format(data=toys, output=output, checkpoint=sd15_checkpoint_file,
                                        clip_vision=clip_vision_file))
    run_command("-m", "train", "--config", str(config))
    first = load_nested_adapter(output / "checkpoints" / "step_0000001.safetensors")
    assert first.provenance["step"] == 1 and first.provenance["base_model"] == sd15_checkpoint_file.name
    assert Image.open(output / "validation" / "step_0000001.png").size == (128, 64)  # reference | generated

    # torchrun in its elastic form, resuming with --resume auto (a restart after a kill: test_kill_safety.py)
    run_command("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "--max-restarts", "1", "-m",
                "train", "--config", str(config), "--set", "max_steps=2", "--resume", "auto")
    second = load_nested_adapter(output / "checkpoints" / "step_0000002.safetensors")
    assert second.provenance["step"] == 2 and second.provenance["processes"] == 2
    assert any(not torch.equal(first.state_dict()[key], value) for key, value in second.state_dict().items())
    steps = [line.split(",")[0] for line in (output / "loss.csv").read_text().splitlines()[1:]]
    assert steps == ["1", "2"]
