"""Config resolution: defaults <- file <- flags."""

import pytest

from kvkd.config import ConfigError, resolve
from kvkd.train.trainer import TrainConfig


def test_file_then_flags_override(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  steps: 7\n  lr: 0.01\n  router: similarity\n  router_options: {temperature: 0.5}\n")
    cfg = resolve(TrainConfig, "train", str(f), {"steps": 3, "lr": None})
    assert cfg.steps == 3 and cfg.lr == 0.01 and cfg.router == "similarity"
    assert cfg.router_options == {"temperature": 0.5}
    assert cfg.batch_size == TrainConfig().batch_size


def test_toml_flat_and_unknown_keys(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('steps = 5\nbatch-size = 2\n')
    assert resolve(TrainConfig, "train", str(f), {}).batch_size == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("stepz: 5\n")
    with pytest.raises(ConfigError, match="stepz"):
        resolve(TrainConfig, "train", str(bad), {})
