"""`python -m encoders.official_nested_import`, run from the pack's folder as a user runs it: the official checkpoint
(synthetic, IP-Adapter-numbered layout) becomes an adapter file whose subject token embedding is the initializer
word's row of the SDXL checkpoint's two token embedding tables, the word tokenized with ComfyUI's own tokenizer files.
The token id expected is read independently, from ComfyUI's vocab.json."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from hostenv import require_comfyui

COMFYUI = Path(require_comfyui())
from ipadapter_files import Weights, flattened, layer_maps, plus_resampler  # noqa: E402
from subject_personalization.encoders.nested_adapter import load_nested_adapter  # noqa: E402
from subject_personalization.encoders.official_nested_import import SDXL_TOKEN_EMBEDDINGS  # noqa: E402

PACK = Path(__file__).resolve().parents[2]
TOKENIZER = COMFYUI / "comfy" / "sd1_tokenizer"
ROWS = 10_000  # the tables cut short: the claim is which row is taken, not the vocabulary's size


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("official")
    weights = Weights(seed=11, dtype=torch.float16)
    resampler = plus_resampler(weights, dim=64, depth=1, dim_head=64, heads=1, num_queries=4, embedding_dim=1280,
                               output_dim=2048, ff_mult=2)
    maps = layer_maps(weights, "sdxl", dict.fromkeys(range(1, 140, 2), 64))
    official = flattened({"image_proj": resampler, "ip_adapter": maps})
    save_file({key: tensor.contiguous() for key, tensor in official.items()}, folder / "nested_official.safetensors")
    tables = {key: torch.randn(ROWS, width) for key, width in zip(SDXL_TOKEN_EMBEDDINGS.values(), (768, 1280))}
    save_file(tables, folder / "sdxl_base.safetensors")
    return folder / "nested_official.safetensors", folder / "sdxl_base.safetensors"


def convert(*arguments: str, kill: dict | None = None) -> subprocess.CompletedProcess:
    """The command line with ComfyUI's tokenizer folder, unless the arguments name another (the last one counts);
    `kill`: the environment that kills it at a moment (encoders/kill_safe.py)."""
    return subprocess.run([sys.executable, "-m", "encoders.official_nested_import", "--tokenizer", str(TOKENIZER),
                           *arguments], cwd=PACK, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(kill or {})})


def test_the_command_killed_while_it_writes_leaves_the_previous_file(files, tmp_path):
    """Killed while it writes an import over an earlier one (another initializer word): the earlier file stays whole
    under its name, the cut-short one beside it; the next run replaces both."""
    from subject_personalization.encoders.kill_safe import KILL_AT, KILL_RECORD
    source, base = files
    destination = tmp_path / "imported.safetensors"
    partial = Path(f"{destination}.partial")
    assert convert(str(source), str(destination), "--base", str(base)).returncode == 0
    previous = destination.read_bytes()
    killed = convert(str(source), str(destination), "--base", str(base), "--initializer-word", "dog",
                     kill={KILL_AT: f"write:{destination.name}", KILL_RECORD: str(tmp_path / "killed")})
    assert killed.returncode == -signal.SIGKILL and (tmp_path / "killed").is_file(), killed.stderr
    assert destination.read_bytes() == previous and partial.stat().st_size > 0
    assert load_nested_adapter(destination).initializer_word == "person"
    again = convert(str(source), str(destination), "--base", str(base), "--initializer-word", "dog")
    assert again.returncode == 0, again.stderr
    assert load_nested_adapter(destination).initializer_word == "dog" and not partial.exists()


def test_the_command_line_converts_once_into_an_adapter_file(files):
    source, base = files
    result = convert(str(source), "--base", str(base), "--initializer-word", "dog", "--subject-domain", "pet",
                     "--placeholder-word", "<dog>")
    assert result.returncode == 0, result.stderr
    destination = source.with_name("nested_official_nested_attention.safetensors")
    assert f"wrote {destination}" in result.stdout
    adapter = load_nested_adapter(destination)
    token = json.loads((TOKENIZER / "vocab.json").read_text(encoding="utf-8"))["dog</w>"]
    with safe_open(str(base), framework="pt") as f:
        for name, key in SDXL_TOKEN_EMBEDDINGS.items():
            assert torch.equal(adapter.placeholder_embeddings[name], f.get_tensor(key)[token]), name
    assert (adapter.base_family, adapter.initializer_word, adapter.subject_domain, adapter.placeholder_word) == \
        ("sdxl", "dog", "pet", "<dog>")
    assert adapter.provenance["source_file"] == source.name and adapter.resampler.config.num_queries == 4


@pytest.mark.parametrize("arguments,problem", [
    (["--initializer-word", "schnauzerdogfriend"], "the initializer word 'schnauzerdogfriend' is"),
    (["--initializer-word", "dog", "--base", "missing.safetensors"], "cannot use missing.safetensors: no such file"),
    (["--tokenizer", "/nowhere"], "/nowhere holds no CLIP tokenizer (vocab.json, merges.txt)"),
])
def test_the_command_line_says_what_is_wrong(files, arguments, problem):
    source, base = files
    result = convert(str(source), str(source.with_name("out.safetensors")), "--base", str(base), *arguments)
    assert result.returncode == 1 and problem in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
