"""The `tunewright` command: help, validation errors before any work, exit codes."""

import subprocess
import sys

from tests.conftest import cli_env


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "tunewright.cli", *args], capture_output=True, text=True,
                          env=cli_env())


def test_help_lists_the_commands_and_the_set_option():
    out = _cli("run", "--help")
    assert out.returncode == 0 and "--set" in out.stdout and "section.key=value" in out.stdout


def test_a_typo_in_the_recipe_stops_before_any_work(tiny_recipe, state):
    text = tiny_recipe.read_text().replace("max_steps:", "max_stepz:")
    tiny_recipe.write_text(text)
    out = _cli("run", str(tiny_recipe))
    assert out.returncode == 2
    assert "train.max_stepz: unknown key" in out.stderr and f"{tiny_recipe}:" in out.stderr
    assert not (state / "mlflow.db").exists(), "nothing should have been tracked"


def test_validate_accepts_the_demo_recipe():
    out = _cli("validate", "recipes/demo.yaml", "--set", "train.max_steps=5")
    assert out.returncode == 0 and "valid recipe 'support-tickets-demo'" in out.stdout
