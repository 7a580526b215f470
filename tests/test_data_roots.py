"""A job's data directory must lie under an allowed root: checked at admission, before
anything else is said about the path (no existence oracle, no listing outside the roots)."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from dispatcher.admission import Rejected, resolve_data_dir
from dispatcher.config import Config, DispatcherConfig
from runner.protocol import Job


def config_with(**dispatcher: object) -> Config:
    return Config(dispatcher=msgspec.structs.replace(DispatcherConfig(), **dispatcher))


def job(data_dir: str) -> Job:
    return Job(job_id="j1", kind="probe", data_dir=data_dir)


@pytest.fixture
def layout(tmp_path: Path) -> dict[str, Path]:
    root = tmp_path / "root"
    (root / "market").mkdir(parents=True)
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "keys.txt").write_text("x")
    (root / "escape").symlink_to(secret)
    for directory in (tmp_path, root, root / "market", secret):
        directory.chmod(0o755)
    return {"root": root, "market": root / "market", "secret": secret, "escape": root / "escape"}


def test_a_directory_under_a_root_is_mounted(layout: dict[str, Path]) -> None:
    config = config_with(data_roots=[str(layout["root"])])
    assert resolve_data_dir(job(str(layout["market"])), config) == str(layout["market"])


@pytest.mark.parametrize("name", ["secret", "escape", "missing"])
def test_outside_the_roots_is_refused_the_same_way_whether_it_exists_or_not(
    layout: dict[str, Path], name: str
) -> None:
    path = layout.get(name, layout["root"].parent / "no-such-dir")
    config = config_with(data_roots=[str(layout["root"])])
    with pytest.raises(Rejected) as caught:
        resolve_data_dir(job(str(path)), config)
    message = str(caught.value)
    assert caught.value.field == "data_dir"
    assert message == f"data_dir is outside the allowed data roots ({layout['root']})"
    assert "keys.txt" not in message and str(layout["secret"]) not in message


def test_by_default_the_dispatchers_own_data_dir_is_the_only_root(layout: dict[str, Path]) -> None:
    config = config_with(data_dir=str(layout["root"]))
    assert resolve_data_dir(job(str(layout["market"])), config) == str(layout["market"])
    assert resolve_data_dir(job(""), config) == str(layout["root"])
    with pytest.raises(Rejected, match="outside the allowed data roots"):
        resolve_data_dir(job(str(layout["secret"])), config)


def test_with_no_root_a_job_names_no_data_dir_unless_it_is_a_one_shot_commands_own(
    layout: dict[str, Path],
) -> None:
    config = config_with()
    with pytest.raises(Rejected, match="allows no job data directories; its operator sets") as caught:
        resolve_data_dir(job(str(layout["market"])), config)
    assert str(layout["market"]) not in str(caught.value)
    # the command's own one-shot dispatcher mounts what its own user named
    assert resolve_data_dir(job(str(layout["secret"])), config, own_job=True) == str(layout["secret"])
    assert resolve_data_dir(job(""), config) == ""
