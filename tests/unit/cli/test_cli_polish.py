"""The command line tells a new user what to do: its version, an example per command, the
script that builds an example's manifest, and --set paths that do not exist."""

import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from stagewise import __version__
from stagewise.cli import app, federation
from stagewise.recipe import RecipeError, apply_overrides

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"


def test_version():
    res = CliRunner().invoke(app, ["--version"])
    assert res.exit_code == 0 and res.output.strip() == f"stagewise {__version__}"


@pytest.mark.parametrize("group", [app, federation])
def test_every_command_help_has_an_example(group):
    for command in group.registered_commands:
        doc = command.callback.__doc__ or ""
        assert "Example: stagewise " in doc, command.name or command.callback.__name__


def test_validate_and_run_name_the_prepare_script_of_an_example(tmp_path):
    """A copy of the covid example beside its prepare script, before the script was run."""
    (tmp_path / "examples").mkdir()
    recipe = tmp_path / "examples" / "covid-outcome.yaml"
    shutil.copy(EXAMPLES / "covid-outcome.yaml", recipe)
    shutil.copy(EXAMPLES / "prepare_covid_outcome.py", tmp_path / "examples")
    for command, again in (("validate", "then validate again"), ("run", "then run again")):
        res = CliRunner().invoke(app, [command, str(recipe), "-o", str(tmp_path / "run")] if command == "run"
                                 else [command, str(recipe)])
        text = "".join(res.output.split())  # rich wraps long paths mid-word: compare without whitespace
        assert res.exit_code == 2, res.output
        for part in ("its manifest covid-outcome.csv does not exist yet",
                     f"`python {tmp_path / 'examples' / 'prepare_covid_outcome.py'}`", again):
            assert "".join(part.split()) in text, part
    assert not (tmp_path / "run").exists()


def test_set_paths_that_do_not_exist_say_why():
    data = yaml.safe_load((EXAMPLES / "covid-outcome.yaml").read_text())
    with pytest.raises(RecipeError, match=r"index 5 out of range: arms has 3 entries \(0 to 2\)"):
        apply_overrides(data, ["arms.5.stages.0.epochs=3"])
    with pytest.raises(RecipeError, match=r"index 2 out of range: arms.1.stages has 2 entries"):
        apply_overrides(data, ["arms.1.stages.2.epochs=3"])
    with pytest.raises(RecipeError, match="arms is a list; write an index"):
        apply_overrides(data, ["arms.probe.epochs=3"])
    with pytest.raises(RecipeError, match=r"seed is a value \(0\), it has no field 'x'"):
        apply_overrides(data, ["seed.x=1"])
    assert apply_overrides(data, ["arms.2.stages.0.epochs=4", "protocol.repeats=1"])["arms"][2]["stages"][0]["epochs"] == 4
