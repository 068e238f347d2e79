"""Training options: the shipped configs load, overrides parse as JSON, and mistakes are named."""
import re
import tomllib
from pathlib import Path

import pytest

from subject_personalization.train.config import load_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "train" / "configs").glob("*.toml"))


def test_configs_are_shipped():
    assert {path.name for path in CONFIGS} >= {"faces_sdxl.toml", "pets_sd15.toml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda path: path.name)
def test_shipped_config_loads_with_its_values(path):
    values = tomllib.loads(path.read_text())
    config = load_config(path)
    assert {key: getattr(config, key) for key in values} == values
    assert config.data and config.checkpoint and config.clip_vision and config.validation


def test_overrides_are_json_when_they_can_be(tmp_path):
    path = tmp_path / "run.json"
    path.write_text('{"data": "/d", "max_steps": 5}')
    config = load_config(path, ["max_steps=7", "output=runs/x", "encoder={\"depth\": 2}", "ema_decay=0.99"])
    assert (config.data, config.max_steps, config.output, config.encoder, config.ema_decay) == ("/d", 7, "runs/x",
                                                                                               {"depth": 2}, 0.99)


def test_mistakes_are_named(tmp_path):
    with pytest.raises(ValueError, match="unknown training option\\(s\\) learning_rat; known: .*learning_rate"):
        load_config(None, ["learning_rat=1"])
    with pytest.raises(ValueError, match="is not key=value"):
        load_config(None, ["max_steps"])
    with pytest.raises(ValueError, match="mixed_precision must be no, bf16 or fp16, got 'fp8'"):
        load_config(None, ["mixed_precision=fp8"])


@pytest.mark.parametrize("name,text", [("run.toml", ""), ("run.toml", "# data = \"/d\"\n\n# max_steps = 5\n"),
                                       ("run.json", "{}")])
def test_a_config_that_sets_no_option_is_refused(tmp_path, name, text):
    """Every default, silently, is never what a config file meant."""
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError, match=rf"^cannot use {re.escape(str(path))}: it sets no option; write in it the "
                                         rf"options the run needs \(data, checkpoint, clip_vision at least"):
        load_config(path, ["max_steps=7"])
