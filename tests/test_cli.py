"""The command line: thin, lazy, and documented from the config fields themselves."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
from click.testing import CliRunner

from frugalseg.cli import COMMANDS, cli


def test_top_level_help_lists_every_command_and_imports_no_stage():
    code = ("import sys; sys.argv = ['frugalseg', '--help']\n"
            "from frugalseg.cli import main\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'lightning', 'numpy')\n"
            "               or m.startswith('frugalseg.stages'))\n"
            "print('HEAVY', heavy)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    for name in COMMANDS:
        assert f"  {name} " in out
    assert "HEAVY []" in out


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_builds_and_shows_help(name):
    result = CliRunner().invoke(cli, [name, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output


def _cli_configs() -> dict[str, type]:
    from frugalseg.stages.classify import ClassifyConfig
    from frugalseg.stages.maps import MapsConfig
    from frugalseg.stages.pipeline import PipelineConfig
    from frugalseg.stages.query import QueryConfig
    from frugalseg.stages.semi import SEMI_METHODS
    from frugalseg.stages.train import TrainConfig

    configs = {"train": TrainConfig, "classify": ClassifyConfig, "cams": MapsConfig, "run": PipelineConfig,
               "query": QueryConfig}
    configs.update({f"train --semi {name}": cls for name, (cls, _) in SEMI_METHODS.items()})
    return configs


def test_every_option_has_help_from_its_field():
    missing = [f"{label}: --{f.name.replace('_', '-')}" for label, cls in _cli_configs().items()
               for f in dataclasses.fields(cls)
               if f.metadata.get("cli", True) and f.name != "semi" and not f.metadata.get("help")]
    assert not missing, "options without help text (declare them with stages.options.option(default, help)):\n" + \
        "\n".join(missing)


def test_help_text_comes_from_the_field():
    from frugalseg.stages.train import TrainConfig

    text = next(f for f in dataclasses.fields(TrainConfig) if f.name == "backbone").metadata["help"]
    result = CliRunner().invoke(cli, ["train", "--help"], terminal_width=400)
    assert result.exit_code == 0
    assert " ".join(text.split()[:4]) in " ".join(result.output.split())


def test_unknown_command_is_a_clear_click_error():
    result = CliRunner().invoke(cli, ["trian"])
    assert result.exit_code == 2
    assert "No such command 'trian'" in result.output
