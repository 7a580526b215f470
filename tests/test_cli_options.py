"""Global CLI options (--config, -v/--verbose, --json) before or after the subcommand.

Parse-level tests plus two runs of the installed console script; no Docker or NATS.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ktrdr_run.cli import build_parser

KTRDR_RUN = str(Path(sys.executable).parent / "ktrdr-run")


@pytest.mark.parametrize(
    ("argv", "config", "verbose"),
    [
        # defaults from the top-level parser
        (["ops", "list"], None, 0),
        (["schema"], None, 0),
        # before the subcommand (as it always was)
        (["--config", "x.toml", "ops", "list"], "x.toml", 0),
        (["-v", "ops", "list"], None, 1),
        # after the subcommand, at each nesting level
        (["ops", "list", "--config", "x.toml"], "x.toml", 0),
        (["ops", "--config", "x.toml", "list"], "x.toml", 0),
        (["submit", "--config", "x.toml", "probe"], "x.toml", 0),
        (["submit", "probe", "-p", "a=1", "--config", "x.toml", "-vv"], "x.toml", 2),
        (["hosts", "--config", "x.toml"], "x.toml", 0),
        (["hosts", "--json", "-v"], None, 1),
        (["config", "check", "--config", "x.toml"], "x.toml", 0),
        (["config", "--config", "x.toml", "check", "-v"], "x.toml", 1),
        (["images", "build", "--force", "--config", "x.toml"], "x.toml", 0),
        (["dispatcher", "--burst", "--config", "x.toml", "--verbose"], "x.toml", 1),
        (["schema", "--config", "x.toml"], "x.toml", 0),
        (
            ["backtest", "--strategy", "sma_cross", "--symbol", "DEMO", "--config", "x.toml", "-v"],
            "x.toml",
            1,
        ),
        # given at several levels: --config's last value wins, -v counts add up
        (["--config", "a.toml", "ops", "list", "--config", "b.toml"], "b.toml", 0),
        (["-v", "ops", "list", "-v"], None, 2),
        (["-v", "ops", "-v", "list", "-v"], None, 3),
        (["-vv", "config", "check", "-v"], None, 3),
    ],
)
def test_global_options_anywhere(argv: list[str], config: str | None, verbose: int) -> None:
    args = build_parser().parse_args(argv)
    assert args.config == (Path(config) if config is not None else None)
    assert args.verbose == verbose


@pytest.mark.parametrize(
    ("argv", "json_out"),
    [
        (["ops", "list"], False),
        (["--json", "ops", "list"], True),
        (["ops", "--json", "list"], True),
        (["ops", "list", "--json"], True),
        (["--json", "ops", "artifacts", "op1", "-o", "d"], True),
        (["artifacts", "get", "sha256-x", "-o", "f", "--json"], True),
        (["--json", "backtest", "--strategy", "sma_cross", "--symbol", "DEMO"], True),
        (["submit", "probe", "--json"], True),
        (["--json", "setup"], True),
        (["hosts"], False),
    ],
)
def test_json_is_a_global_option(argv: list[str], json_out: bool) -> None:
    assert build_parser().parse_args(argv).json is json_out


def test_subcommand_options_keep_their_behaviour() -> None:
    parser = build_parser()
    args = parser.parse_args(["config", "check", "--config", "x.toml", "--timeout-s", "2", "--json"])
    assert args.own_config is True
    assert args.timeout_s == 2.0
    assert args.json is True
    args = parser.parse_args(["config", "check"])
    assert args.timeout_s == 5.0
    assert args.config is None
    args = parser.parse_args(["ops", "logs", "op1", "-f", "-v", "--config", "x.toml"])
    assert (args.op_id, args.follow, args.verbose, args.config) == ("op1", True, 1, Path("x.toml"))
    args = parser.parse_args(["submit", "probe", "-p", "k=v", "--detach", "--config", "x.toml"])
    assert (args.kind, args.param, args.detach) == ("probe", ["k=v"], True)


def test_unknown_option_after_subcommand_is_still_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["ops", "list", "--no-such-option"])
    assert exc.value.code == 2
    assert "--no-such-option" in capsys.readouterr().err


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "KTRDR_RUN_CONFIG"}
    env["XDG_STATE_HOME"] = str(cwd / "state")
    return subprocess.run(
        [KTRDR_RUN, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
    )


def test_console_script_honours_config_after_subcommand(tmp_path: Path) -> None:
    missing = "/nonexistent.toml"
    result = _run(["ops", "list", "--config", missing], tmp_path)
    assert result.returncode == 2, result.stderr
    assert "config error" in result.stderr
    assert missing in result.stderr

    empty = tmp_path / "empty.toml"
    empty.write_text("")
    result = _run(["schema", "--config", str(empty)], tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.lstrip().startswith("{")
