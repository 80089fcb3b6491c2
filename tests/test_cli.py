"""The CLI dispatcher: every command and benchmark builds its parser and explains itself."""
import pytest

from abvid.tools.cli import BENCHES, COMMANDS, EXIT_USAGE, main


@pytest.mark.parametrize("argv", [[name, "--help"] for name in COMMANDS] + [["bench", b, "--help"] for b in BENCHES])
def test_every_command_has_help(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage: abvid" in out and "--help" in out and len(out) > 300   # options are described
    assert "Exit codes" in out                                            # every command states its exit codes
    assert "(default: None)" not in out and "issue " not in out.lower()  # no noise, no internal references


def test_no_command_is_a_usage_error(capsys):
    assert main([]) == EXIT_USAGE
    assert "preprocess" in capsys.readouterr().out


def test_config_error_exit_code(tmp_path, capsys):
    rc = main(["pretrain", "--set", "train.stesp=3", "--out", str(tmp_path / "run")])
    assert rc == EXIT_USAGE
    assert "Did you mean 'steps'" in capsys.readouterr().err


def test_help_shows_real_defaults_only(capsys):
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    out = capsys.readouterr().out
    assert "(default: ema)" in out and "output .safetensors path (required)" in out
    with pytest.raises(SystemExit):
        main(["preprocess", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "0 = no clip limit" in out and "(default: 0)" in out       # a zero default is still shown


def test_version_and_debug_flag(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("abvid ")
    assert main(["--debug"]) == EXIT_USAGE                           # --debug alone: the command list
