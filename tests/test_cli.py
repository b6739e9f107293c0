from __future__ import annotations

from pipeline.cli import main
from tests.conftest import TINY_CLIP


def test_missing_input_prefix_fails_clearly_and_writes_nothing(tmp_path, capsys):
    output = tmp_path / "out"
    code = main(
        [
            "run",
            "--input",
            str(tmp_path / "nowhere"),
            "--output",
            str(output),
            "--set",
            "tune.model=random",
            "--set",
            "caption.enabled=false",
            "--set",
            f"clip.model={TINY_CLIP}",
            "--set",
            "clip.pretrained=random",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "error: no shards under" in err and "nowhere" in err
    assert not output.exists()


def test_missing_checkpoint_fails_before_any_data_is_read(tmp_path, capsys):
    code = main(
        [
            "run",
            "--input",
            str(tmp_path),
            "--output",
            str(tmp_path / "out"),
            "--set",
            f"tune.model={tmp_path / 'absent.safetensors'}",
        ]
    )
    assert code == 2
    assert "checkpoint not found" in capsys.readouterr().err


def test_unknown_command_prints_usage(capsys):
    assert main(["frobnicate"]) == 2
    assert "usage: imagetune COMMAND" in capsys.readouterr().out
