"""The smartbeam CLI: --help everywhere, usage errors exit 2, input errors exit 1 cleanly."""

from __future__ import annotations

import subprocess
import sys

import pytest

from smartbeam.cli import build_parser, main


def _subcommands():
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return sorted(action.choices)


@pytest.mark.parametrize("command", _subcommands())
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert "usage: smartbeam" in capsys.readouterr().out


def test_unknown_option_exits_2_with_usage():
    proc = subprocess.run([sys.executable, "-m", "smartbeam.cli", "demo", "--no-such-option"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "usage:" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bad_value_exits_1_without_traceback():
    proc = subprocess.run([sys.executable, "-m", "smartbeam.cli", "runs", "--uri",
                           "http://127.0.0.1:9"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "cannot reach Tiled at http://127.0.0.1:9" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bench_help_lists_its_own_options(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "kde", "--help"])
    assert exc.value.code == 0
    assert "--quick" in capsys.readouterr().out


def test_ioc_rejects_bad_shape():
    with pytest.raises(SystemExit) as exc:
        main(["ioc", "sans", "--shape", "128by128"])
    assert exc.value.code == 2
