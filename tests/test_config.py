"""Settings dataclasses: declared choices are enforced for recipes and Python construction too."""

from __future__ import annotations

import pytest

from openmae.config import ConfigError, from_dict
from openmae.eval_config import EncoderConfig, LinprobeConfig, ProbeEncoderConfig


def test_fine_tuning_refuses_the_probes_auto_pool():
    with pytest.raises(ConfigError, match="model.global_pool must be one of avg, token, got 'auto'"):
        EncoderConfig(global_pool="auto")
    assert ProbeEncoderConfig(global_pool="auto").global_pool == "auto"
    assert EncoderConfig(global_pool="token").global_pool == "token"


def test_linear_probing_refuses_drop_path_when_built():
    with pytest.raises(ConfigError, match="keeps the encoder frozen"):
        from_dict(LinprobeConfig, {"model": {"drop_path_rate": 0.1}})
