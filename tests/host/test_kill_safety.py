"""A kill at any moment loses nothing: the trainer and the Create Nested Attention Adapter node killed (SIGKILL) at named
moments (encoders/kill_safe.py), in processes of their own (the official import command: test_official_nested_import).

The trainer (tests/kill_worker.py: `python -m train`'s main on the tests' tiny UNet, with the SD1.5 checkpoint's text
encoder and VAE and the ViT-L/14 file where it renders validation images) is killed before, between and during its checkpoint's
writes, during a step, during validation and while it rewrites its loss log, then run again with `--resume auto`. It
ends with the uninterrupted run's checkpoints, validation images and loss log, bit for bit: every tensor and metadata
value of each file, each image's bytes, each logged value but the throughput (a timing). Files are compared by content,
not byte for byte: safetensors writes its metadata in an order that varies between processes, and a training state
that went through a resume pickles the same values in another order. Under torchrun --max-restarts, one of two
processes is killed mid-run, and torchrun's restart finishes the run as the uninterrupted two-process one.
"""
import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hostenv import require_comfyui

require_comfyui()
from trainer_setup import tiny_sd15_model, write_dataset  # noqa: E402

WORKER = Path(__file__).resolve().parents[1] / "kill_worker.py"
STEPS = 6
CONFIG = """
resolution = 64
batch_size = 2
max_steps = {steps}
checkpoint_every = 2
log_every = 1
validate_every = {validate_every}
validation_steps = 2
learning_rate = 1e-3
device = "cpu"
encoder = {{ num_queries = 4, depth = 1, width = 64, heads = 4 }}
data = "{data}"
encodings = "{encodings}"
output = "run"
checkpoint = "{checkpoint}"
clip_vision = "{clip_vision}"

[[validation]]
prompt = "a photo of a toy on a table"
word = "toy"
reference = "references/0_0.png"
"""
VALIDATE_EVERY = 3  # in the runs that render validation images (they cost a process 15 s of its 25 here)
# Moments of the uninterrupted run (checkpoints at steps 2, 4 and 6, validation at 3 and 6), each killed once; a
# list is one run killed at each moment in turn (the second kill lands in the run that resumes after the first).
KILLS = {
    "before the checkpoint's writes": ["checkpoint-start@4"],
    "during the adapter file's write": ["write:step_0000004.safetensors"],
    "between the adapter file and its state": ["checkpoint-between@4"],
    "during the training state's write": ["write:step_0000004.state.pt"],
    "during the manifest's write": ["write:step_0000004.manifest.json"],
    "during a step": ["step@5"],
    "during validation": ["validation@3"],
    "during the loss log's rewrite on resume": ["step@5", "write:loss.csv"],
}


def tiny_unet_config(checkpoint: Path) -> dict:
    """trainer_setup's tiny layout (SD1.5's at 32 channels), from the UNet config ComfyUI detects in the checkpoint's
    header alone (meta tensors: no weight is read, no model held in this process beside the workers)."""
    import comfy.model_detection
    from safetensors import safe_open
    prefix = "model.diffusion_model."
    with safe_open(str(checkpoint), framework="pt") as f:
        shapes = {key: f.get_slice(key).get_shape() for key in f.keys() if key.startswith(prefix)}
    weights = {key: torch.empty(shape, device="meta") for key, shape in shapes.items()}
    return {**comfy.model_detection.model_config_from_unet(weights, prefix).unet_config, "model_channels": 32}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, comfy, sd15_checkpoint_file, clip_vision_file) -> dict:
    """The base directory (its tiny UNet), and the config files, without and with validation images, sharing one
    encodings cache."""
    folder = tmp_path_factory.mktemp("kill_safety")
    data, base = folder / "toys", folder / "comfyui"
    write_dataset(data)
    base.mkdir()
    config = tiny_unet_config(sd15_checkpoint_file)
    torch.save((config, tiny_sd15_model(config).model.state_dict()), base / "tiny_unet.pt")
    configs = {}
    for validating in (False, True):
        configs[validating] = folder / f"run{'_validating' * validating}.toml"
        configs[validating].write_text(CONFIG.format(
            steps=STEPS, validate_every=VALIDATE_EVERY * validating, data=data, encodings=folder / "encodings",
            checkpoint=sd15_checkpoint_file, clip_vision=clip_vision_file))
    return {"base": base, "config": configs}


def run_worker(setup, folder: Path, *arguments: str, kill: str | None = None, launcher: tuple = ()) -> int:
    """Run tests/kill_worker.py in `folder` (its output is folder/run), killed at `kill` when given: the return code.
    Under torchrun, its store is not shared with the process group, as docs/training.md says to run it (without, the
    restarted group here failed to connect: it read an address of the killed attempt)."""
    folder.mkdir(parents=True, exist_ok=True)
    env = {key: value for key, value in os.environ.items() if not key.startswith("SUBJECT_PERSONALIZATION_KILL")}
    env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    if kill is not None:
        env.update(SUBJECT_PERSONALIZATION_KILL_AT=kill, SUBJECT_PERSONALIZATION_KILL_RECORD=str(folder / "killed"))
        (folder / "killed").unlink(missing_ok=True)
    done = subprocess.run([sys.executable, *launcher, str(WORKER), *arguments], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    if kill is not None:
        assert (folder / "killed").read_text() == kill, f"never reached {kill}:\n{done.stderr[-3000:]}"
    elif done.returncode != 0:
        pytest.fail(f"{' '.join(arguments)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return done.returncode


def train(setup, folder: Path, validating: bool = False, kill: str | None = None, launcher: tuple = ()) -> int:
    return run_worker(setup, folder, "train", str(setup["base"]), "--config", str(setup["config"][validating]),
                      "--resume", "auto", kill=kill, launcher=launcher)


def torchrun(processes: int) -> tuple:
    return ("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes), "--max-restarts", "1")


@pytest.mark.parametrize("environment,warned", [
    ({"TORCHELASTIC_MAX_RESTARTS": "3", "TORCHELASTIC_USE_AGENT_STORE": "True"}, True),
    ({"TORCHELASTIC_MAX_RESTARTS": "3", "TORCHELASTIC_USE_AGENT_STORE": "False"}, False),  # the variable set
    ({"TORCHELASTIC_MAX_RESTARTS": "0", "TORCHELASTIC_USE_AGENT_STORE": "True"}, False),
    ({}, False)])
def test_a_job_torchrun_may_restart_on_a_shared_store_is_warned(comfy, environment, warned):
    from subject_personalization.train.run import shared_store_warning
    warning = shared_store_warning(environment)
    assert (warning is not None) == warned
    assert not warned or warning.endswith("set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in torchrun's environment")


def content(path: Path):
    """What a file of the run holds: an adapter's metadata and tensors, a training state, a manifest's step and files
    (its hashes are of bytes, which vary as the module docstring says), an image's bytes."""
    import json
    from safetensors import safe_open
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            return f.metadata(), {key: f.get_tensor(key) for key in f.keys()}
    if path.suffix == ".pt":
        return torch.load(path, weights_only=True)
    if path.suffix == ".json":
        manifest = json.loads(path.read_text())
        return manifest["step"], sorted(manifest["files"])
    return path.read_bytes()


def same(first, second) -> bool:
    """Equal values, tensors equal bit for bit in the same dtype."""
    if isinstance(first, torch.Tensor):
        return isinstance(second, torch.Tensor) and first.dtype == second.dtype and torch.equal(first, second)
    if isinstance(first, dict):
        return isinstance(second, dict) and first.keys() == second.keys() and all(same(first[k], second[k]) for k in first)
    if isinstance(first, (list, tuple)):
        return type(first) is type(second) and len(first) == len(second) and all(map(same, first, second))
    return first == second


def run_files(folder: Path) -> dict[str, object]:
    """Every file the run wrote but its loss log: relative name -> content."""
    run = folder / "run"
    return {str(path.relative_to(run)): content(path) for path in sorted(run.rglob("*"))
            if path.is_file() and path.name != "loss.csv" and "tensorboard" not in path.parts}


def loss_rows(folder: Path) -> list[dict]:
    """loss.csv's rows without the throughput column (a timing)."""
    with (folder / "run" / "loss.csv").open(newline="") as log:
        return [{key: value for key, value in row.items() if key != "images_per_second"} for row in csv.DictReader(log)]


def check_nothing_half_written(folder: Path) -> None:
    """After a kill: every file under its final name reads whole."""
    from subject_personalization.encoders.nested_adapter import load_nested_adapter
    from subject_personalization.train.training_state import incomplete
    checkpoints = folder / "run" / "checkpoints"
    for adapter in checkpoints.glob("step_*.safetensors"):
        load_nested_adapter(adapter)
        if adapter.with_suffix(".manifest.json").is_file():
            assert incomplete(adapter) is None, adapter
    for state in checkpoints.glob("*.state.pt"):
        torch.load(state, weights_only=True)
    if (folder / "run" / "loss.csv").is_file():
        assert all(None not in row.values() for row in loss_rows(folder))


@pytest.fixture(scope="module")
def uninterrupted(setup, tmp_path_factory) -> dict[bool, Path]:
    """The runs never killed, with validation images (first: it fills the shared encodings cache) and without."""
    runs = {validating: tmp_path_factory.mktemp(f"uninterrupted{'_validating' * validating}") for validating in (True, False)}
    for validating, folder in runs.items():
        train(setup, folder, validating)
    return runs


def check_same_run(folder: Path, reference: Path) -> None:
    files, expected = run_files(folder), run_files(reference)
    assert sorted(files) == sorted(expected), "the same checkpoints and validation images, and no partial file left"
    different = [name for name in expected if not same(files[name], expected[name])]
    assert not different, f"not bit for bit the uninterrupted run's: {different}"
    assert loss_rows(folder) == loss_rows(reference)


def test_the_uninterrupted_runs_write_complete_checkpoints(uninterrupted):
    from subject_personalization.train.training_state import latest_complete_checkpoint
    for validating, folder in uninterrupted.items():
        checkpoints = folder / "run" / "checkpoints"
        assert sorted(path.name for path in checkpoints.glob("step_*.safetensors")) == \
            [f"step_{step:07d}.safetensors" for step in (2, 4, 6)]
        assert latest_complete_checkpoint(checkpoints) == (checkpoints / "step_0000006.safetensors", [])
        assert [row["step"] for row in loss_rows(folder)] == [str(step) for step in range(1, STEPS + 1)]
        assert len(list((folder / "run").glob("validation/*.png"))) == (2 if validating else 0)
    files = run_files(uninterrupted[False])
    assert not same(files["checkpoints/step_0000004.state.pt"], files["checkpoints/step_0000006.state.pt"]), \
        "the comparison tells two steps apart"


@pytest.mark.parametrize("kills", list(KILLS.values()), ids=list(KILLS))
def test_a_run_killed_then_resumed_auto_ends_as_the_uninterrupted_one(setup, uninterrupted, tmp_path, kills):
    validating = any(kill.startswith("validation@") for kill in kills)
    for kill in kills:
        assert train(setup, tmp_path, validating, kill=kill) == -signal.SIGKILL
        check_nothing_half_written(tmp_path)
    train(setup, tmp_path, validating)
    check_same_run(tmp_path, uninterrupted[validating])


def test_resume_latest_skips_incomplete_checkpoints_and_says_why(setup, uninterrupted, tmp_path):
    import shutil
    from subject_personalization.train.training_state import latest_complete_checkpoint
    checkpoints = tmp_path / "run" / "checkpoints"
    shutil.copytree(uninterrupted[False] / "run", tmp_path / "run")
    (checkpoints / "step_0000006.manifest.json").unlink()  # as a kill before the manifest leaves it
    state = checkpoints / "step_0000004.state.pt"
    state.write_bytes(state.read_bytes()[:-100])  # cut short after its manifest was written
    found, skipped = latest_complete_checkpoint(checkpoints)
    assert found == checkpoints / "step_0000002.safetensors"
    assert skipped == ["step_0000006.safetensors: it has no step_0000006.manifest.json: its writing was interrupted "
                       "(or an earlier version of the pack, which wrote none, wrote it: give its path to --resume)",
                       "step_0000004.safetensors: step_0000004.state.pt is not the file its manifest recorded "
                       "(changed or cut short after it was written)"]


def test_torchrun_restarts_a_killed_process_and_the_run_ends_as_the_uninterrupted_one(setup, uninterrupted, tmp_path):
    reference, killed = tmp_path / "reference", tmp_path / "killed"  # (uninterrupted: the encodings cache is filled)
    train(setup, reference, launcher=torchrun(2))
    assert train(setup, killed, kill="step@5/rank1", launcher=torchrun(2)) == 0, "torchrun's restart finished the run"
    check_same_run(killed, reference)


def test_the_node_killed_while_it_overwrites_an_adapter_leaves_the_previous_file(setup, sd15_checkpoint_file, tmp_path):
    """Create Nested Attention Adapter with overwrite on, killed while it writes another seed's adapter."""
    from subject_personalization.encoders.nested_adapter import load_nested_adapter
    target = setup["base"] / "models" / "nested_attention" / "kill_test.safetensors"
    partial = Path(f"{target}.partial")

    def create(seed: int, kill: str | None = None) -> int:
        return run_worker(setup, tmp_path, "create-adapter", str(setup["base"]), str(sd15_checkpoint_file), "kill_test",
                          str(seed), kill=kill)

    create(seed=1)
    previous = target.read_bytes()
    try:
        assert create(seed=2, kill="write:kill_test.safetensors") == -signal.SIGKILL
        assert target.read_bytes() == previous, "the previous file is there, whole"
        assert partial.stat().st_size > 0, "the new one was cut short beside it, under no name a loader lists"
        create(seed=2)
        assert target.read_bytes() != previous and not partial.exists()
        load_nested_adapter(target)
    finally:
        target.unlink(missing_ok=True)
