"""The study's smoke run (`python -m study --smoke`): every stage, a few steps each, in a fresh process as a user runs
it. It asserts that the stages ran and the scorer validated, never a finding: those are the full run's, in docs/study.md."""
import json
import os
import subprocess
import sys
from pathlib import Path

from hostenv import require_comfyui

COMFYUI_PATH = str(Path(require_comfyui()).resolve())
PACK_ROOT = Path(__file__).resolve().parents[2]


def test_the_smoke_run_goes_through_every_stage(tmp_path):
    output = tmp_path / "study"
    run = subprocess.run([sys.executable, "-m", "study", "--smoke", "--output", str(output)], cwd=PACK_ROOT,
                         capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL,
                         env={**os.environ, "COMFYUI_PATH": COMFYUI_PATH})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    report = json.loads((output / "results.json").read_text())
    assert report["scorer_validation"]["passed"]
    assert set(report["prior"]) >= {"background", "side", "ball", "identity", "prompt"}
    assert 0 <= report["image_encoder"]["accuracy"] <= 1
    per_seed = report["seeds"]["0"]
    methods = {entry["method"] for entry in per_seed["identity_against_prompt"].values()}
    assert methods == {"prior", "nested", "decoupled_gated", "decoupled_ungated", "nested_single_token", "wrong_reference"}
    assert {entry["method"] for entry in per_seed["two_subjects"].values()} == {"nested", "nested_localization"}
    assert len(per_seed["delayed_conditioning"]) == 4
    for method in ("nested", "decoupled", "nested_localization", "nested_single_token"):
        assert list((output / "adapters").glob(f"{method}_seed0_*/checkpoints/step_*.safetensors")), method
    assert "smoke run" in (output / "report.md").read_text()
    assert (output / "identity_vs_prompt.png").stat().st_size > 1000
