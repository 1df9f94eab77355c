"""The command line's overrides reach the validated config (quick: nothing is trained)."""

from __future__ import annotations

import pytest

from stroke_ray.cli import train_config
from stroke_ray.errors import ConfigError


def test_train_overrides_reach_the_config(tmp_path):
    cfg = train_config("train_example", name="run-a", store="s3://bucket/stores/isles.zarr", epochs=3,
                       augment="strong", tracking_uri="http://127.0.0.1:5000", storage="s3://bucket/runs")
    assert (cfg.name, cfg.epochs, cfg.tracking_uri) == ("run-a", 3, "http://127.0.0.1:5000")
    assert cfg.data.store == "s3://bucket/stores/isles.zarr"
    assert cfg.augment.preset == "strong"
    assert cfg.storage_path == "s3://bucket/runs"  # a URL stays a URL
    plain = train_config("train_example")
    assert plain.storage_path == "runs" and plain.name != "run-a"


def test_a_bad_override_is_refused_naming_the_config():
    with pytest.raises(ConfigError, match="train_example"):
        train_config("train_example", augment="heavy")
