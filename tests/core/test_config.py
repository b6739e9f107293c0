from __future__ import annotations

import pytest

from pipeline.core.config import load_config
from pipeline.training.config import load_train_config


def test_yaml_then_keyword_values_then_set_overrides(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("input: s3://a/in/\noutput: s3://a/out/\ntune: {model: random}\nclip: {batch_size: 8}\n")
    config = load_config(path, ["clip.batch_size=256", "caption.enabled=false"], output="s3://b/out/")
    assert (config.input, config.output) == ("s3://a/in/", "s3://b/out/")
    assert config.clip.batch_size == 256
    assert config.caption.enabled is False


def test_input_and_output_are_required():
    with pytest.raises(ValueError, match="output is required"):
        load_config(None, ["tune.model=random"], input="s3://a/")


def test_unknown_keys_and_bad_types_name_the_key():
    with pytest.raises(ValueError, match="unknown config key.*clip.batchsize"):
        load_config(None, ["clip.batchsize=3", "tune.model=random"], input="a", output="b")
    with pytest.raises(ValueError, match="clip.batch_size='many' must be an integer"):
        load_config(None, ["clip.batch_size=many", "tune.model=random"], input="a", output="b")
    with pytest.raises(ValueError, match="encode.format='gif' must be one of"):
        load_config(None, ["encode.format=gif", "tune.model=random"], input="a", output="b")


def test_exponent_notation_sets_a_float_although_yaml_reads_it_as_text():
    config = load_train_config(None, ["optim.lr=3e-4", "optim.min_lr_ratio=1E-2"], input="a", output="b")
    assert (config.optim.lr, config.optim.min_lr_ratio) == (3e-4, 1e-2)
    with pytest.raises(ValueError, match="optim.lr='3e' must be a number"):
        load_train_config(None, ["optim.lr=3e"], input="a", output="b")


def test_an_empty_tuner_model_explains_the_fix():
    with pytest.raises(ValueError, match="tune.model is required.*'random'"):
        load_config(None, ["tune.model="], input="a", output="b")


def test_the_tuner_defaults_to_the_packaged_checkpoint():
    assert load_config(None, [], input="a", output="b").tune.model == "default"


def test_redacted_config_hides_credentials_in_every_uri():
    secret = ["tune.model=s3://key:s3cret@bucket/tuner/", "runner.address=ray://admin:s3cret@head:10001"]
    config = load_config(None, secret, input="https://user:s3cret@host/in", output="b")
    redacted = config.redacted()
    assert "s3cret" not in str(redacted)
    assert (
        redacted["tune"]["model"] == "s3://***@bucket/tuner/"
        and redacted["runner"]["address"] == "ray://***@head:10001"
    )


def test_the_shipped_example_config_loads_with_the_documented_defaults():
    from importlib.resources import files

    from pipeline.core.config import JobConfig, RunnerConfig

    example = files("pipeline") / "configs" / "example.yaml"
    config = load_config(str(example))
    assert config == JobConfig(input=config.input, output=config.output)
    assert isinstance(config, JobConfig) and config.runner == RunnerConfig()


def test_the_shipped_example_config_is_the_generated_one_with_every_key():
    from pipeline.core.example_config import EXAMPLE, example_yaml

    assert EXAMPLE.read_text() == example_yaml(), (
        "regenerate: python -m pipeline.core.example_config > pipeline/configs/example.yaml"
    )
    text = example_yaml()
    assert "  lock_ttl_seconds: 600.0" in text and "  batch_rows: 256" in text and "  exclude: []" in text
    assert "  decoder: cached                      # cached | open_clip" in text


def test_pattern_lists_are_checked_item_by_item():
    config = load_config(None, ["read.exclude=['*.parquet', '*_stats.json']"], input="in", output="out")
    assert config.read.exclude == ["*.parquet", "*_stats.json"] and config.read.include == []
    with pytest.raises(ValueError, match=r"read.include='\*.jpg' must be a list, e.g. read.include=\['\*.parquet'\]"):
        load_config(None, ["read.include='*.jpg'"], input="in", output="out")
    with pytest.raises(ValueError, match=r"read.exclude='\*.parquet' must be a list"):  # YAML reads * as an alias
        load_config(None, ["read.exclude=*.parquet"], input="in", output="out")
    with pytest.raises(ValueError, match=r"read.exclude\[1\]=3 must be a string"):
        load_config(None, ["read.exclude=['a', 3]"], input="in", output="out")
