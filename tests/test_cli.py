from __future__ import annotations

import argparse
import os
import re
import shutil
import stat
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from moe_offload import cli, demo
from moe_offload.offloader import is_patched

ROOT = Path(__file__).resolve().parent.parent


def test_demo_runs_and_generates_the_same_tokens():
    command = [sys.executable, "-m", "moe_offload.cli", "--verbose", "demo", "--layers", "2", "--tokens", "6"]
    result = subprocess.run(
        [*command, "--hidden", "64", "--runs", "2"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert "same tokens as the unpatched model: yes" in result.stdout
    assert "median of 2 timed generations" in result.stdout and "patched / unpatched:" in result.stdout
    assert "hit_rate" in result.stdout
    # --verbose shows the moe_offload logger's INFO records (patch logs the offloader).
    assert "INFO: moe-offload: Offloader(2 MoE layers" in result.stderr


def test_version_and_help():
    result = subprocess.run(
        [sys.executable, "-m", "moe_offload.cli", "--version"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and result.stdout.startswith("moe-offload ")


def test_the_demo_reports_the_median_of_warm_timed_runs(monkeypatch, capsys):
    """The warm-up generation is not timed; the runs alternate between the
    models; the speeds shown are medians, and their ratio."""
    real_generate = demo._generate
    calls: list[str] = []
    # Seconds per generation: a cold first run of each model is slow, and
    # would dominate a single-run figure.
    seconds = {"unpatched": iter([100.0, 1.0, 3.0, 2.0]), "patched": iter([100.0, 4.0, 8.0, 2.0])}

    def fake(model, prompt, tokens):
        name = "patched" if is_patched(model) else "unpatched"
        calls.append(name)
        return real_generate(model, prompt, tokens)[0], next(seconds[name])

    monkeypatch.setattr(demo, "_generate", fake)
    assert demo.run(layers=1, experts=4, hidden=32, tokens=6, budget_fraction=0.5, seed=0, runs=3) == 0
    out = capsys.readouterr().out
    assert calls == [
        "unpatched",
        "patched",
        "unpatched",
        "patched",
        "patched",
        "unpatched",
        "unpatched",
        "patched",
    ]
    unpatched, patched = statistics.median([6 / 1, 6 / 3, 6 / 2]), statistics.median([6 / 4, 6 / 8, 6 / 2])
    assert re.search(rf"unpatched, every expert in memory: +{unpatched:.1f}  \(2.0-6.0\)", out), out
    assert re.search(rf"patched, 50% of the experts in slots: +{patched:.1f}  \(0.8-3.0\)", out), out
    assert re.search(rf"patched / unpatched: +{patched / unpatched:.2f}x", out), out


def _options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.option_strings and a.dest not in ("help", "version")]


@pytest.mark.parametrize("command", ["demo", "convert", "bench"])
def test_every_option_has_a_help_text_with_its_default(command):
    parser = cli._parser()
    [subcommands] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    options = _options(subcommands.choices[command])
    assert "--verbose" in {o for a in options for o in a.option_strings}
    for action in [*options, *_options(parser)]:
        name = action.option_strings[-1]
        assert action.help and "default" in action.help, f"{command} {name}: no help text with its default"
        if action.default not in (None, False, argparse.SUPPRESS, 0, []):
            shown = " ".join(map(str, action.default)) if isinstance(action.default, list) else action.default
            assert str(shown) in action.help, f"{command} {name}: the help does not show {shown}"


BAD_INPUTS = {
    "demo: a hidden size the model cannot have": (["demo", "--hidden", "100"], "--hidden 100"),
    "demo: a value argparse refuses": (["demo", "--layers", "many"], "--layers"),
    "convert: a missing checkpoint": (["convert", "/nonexistent/checkpoint", "STORE"], "/nonexistent"),
    "bench: a budget outside (0, 1]": (["bench", "--budget-fraction", "2"], "(0, 1]"),
    "bench: fewer experts than top-k": (["bench", "--experts", "2"], "--experts 2"),
    "an unknown command": (["serve-everything"], "serve-everything"),
}


@pytest.mark.parametrize("argv, named", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_a_user_error_is_one_line_and_a_non_zero_exit(argv, named, capsys, tmp_path):
    argv = [str(tmp_path / "store") if a == "STORE" else a for a in argv]
    try:
        status = cli.main(argv)
    except SystemExit as e:  # argparse exits itself
        status = e.code
    captured = capsys.readouterr()
    assert status != 0
    assert captured.err.count("\n") == 1 and captured.err.startswith("moe-offload"), captured.err
    assert named in captured.err


def test_the_installed_command_reports_a_user_error_on_one_line(tmp_path):
    command = shutil.which("moe-offload", path=str(Path(sys.executable).parent))
    assert command, "the moe-offload entry point is not installed beside this Python"
    result = subprocess.run(
        [command, "demo", "--tokens", "0"], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert result.returncode != 0
    assert result.stderr == "moe-offload: --tokens 0: generate at least 1 token\n"
    assert result.stdout == ""


def test_the_readme_names_every_extra():
    pyproject = (ROOT / "pyproject.toml").read_text()
    section = pyproject.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    extras = re.findall(r"^([a-z][a-z0-9-]*) = ", section, re.MULTILINE)
    assert extras, "no extras found in pyproject.toml"
    readme = (ROOT / "README.md").read_text()
    for extra in extras:
        assert f'"moe-offload[{extra}]"' in readme, f"README.md does not name the {extra} extra"


def test_every_declared_test_marker_is_used():
    pyproject = (ROOT / "pyproject.toml").read_text()
    markers = re.findall(
        r'^\s+"([a-z_]+): ', pyproject.split("markers = [", 1)[1].split("]", 1)[0], re.MULTILINE
    )
    assert "gpu" in markers
    sources = "".join(p.read_text() for folder in ("tests", "benches") for p in (ROOT / folder).glob("*.py"))
    for marker in markers:
        assert f"mark.{marker}" in sources, f"the pytest marker {marker!r} is declared but no test uses it"


FAKE_VENV_TOOL = """#!/bin/sh
echo "$(basename "$0") $*" >> "$SETUP_LOG"
"""
FAKE_PYTHON3 = """#!/bin/sh
# Stands in for the system Python: creates a venv of fake tools.
if [ "$1" = "-m" ] && [ "$2" = "venv" ]; then
    mkdir -p "$3/bin"
    for tool in python maturin; do cp "$FAKE_VENV_TOOL" "$3/bin/$tool"; chmod +x "$3/bin/$tool"; done
fi
"""


def _executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def _run_setup(tmp_path: Path, tools: dict[str, str]):
    """scripts/setup.sh, copied into `tmp_path` (it works in its checkout),
    with fake system tools in front of PATH: nothing is installed or built."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "setup.sh", tmp_path / "scripts" / "setup.sh")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in tools.items():
        _executable(bin_dir / name, text)
    env = dict(
        os.environ,
        PATH=f"{bin_dir}:/usr/bin:/bin",
        MOE_OFFLOAD_VENV=str(tmp_path / "venv"),
        SETUP_LOG=str(tmp_path / "log"),
        FAKE_VENV_TOOL=str(_executable(tmp_path / "fake-tool", FAKE_VENV_TOOL)),
    )
    return subprocess.run(
        ["bash", str(tmp_path / "scripts" / "setup.sh")], capture_output=True, text=True, env=env, timeout=60
    )


def test_setup_says_what_it_is_doing_and_how_much_it_fetches(tmp_path):
    result = _run_setup(tmp_path, {"python3": FAKE_PYTHON3, "cargo": "#!/bin/sh\n"})
    assert result.returncode == 0, result.stderr
    steps = [line.split(" (")[0] for line in result.stderr.splitlines()]
    assert steps == [
        f"setup: creating {tmp_path / 'venv'}",
        "setup: updating pip",
        "setup: installing torch, transformers, safetensors, numpy, accelerate, matplotlib"
        " and the test tools",
        "setup: building the wheel",
        f"setup: installing the wheel into {tmp_path / 'venv'}",
        "setup: done",
    ]
    assert re.search(r"about \d+ GB to download", result.stderr)
    assert "hypothesis>=6" in (tmp_path / "log").read_text()


def test_setup_stops_with_one_line_when_a_tool_is_missing(tmp_path):
    result = _run_setup(tmp_path, {"python3": FAKE_PYTHON3})
    assert result.returncode != 0
    assert result.stderr.splitlines()[-1].startswith("setup: cargo not found: install a Rust toolchain")
    assert "installing torch" not in result.stderr
