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


def test_a_process_that_loaded_tunewright_exits_without_walking_its_heap_and_still_runs_its_exit_handlers(tmp_path):
    """The interpreter's last collections over a process's millions of objects took seconds of every run's exit:
    tunewright freezes the heap once the exit handlers registered after it have run, and those still run."""
    out_file = tmp_path / "order.txt"
    script = f"""
import atexit, gc
atexit.register(lambda: open({str(out_file)!r}, "a").write(f"last frozen={{gc.get_freeze_count()}}\\n"))
import tunewright
atexit.register(lambda: open({str(out_file)!r}, "a").write(f"first frozen={{gc.get_freeze_count()}}\\n"))
import torch, transformers  # a heap the size a run has
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=cli_env())
    assert done.returncode == 0, done.stderr
    first, last = out_file.read_text().splitlines()
    assert first == "first frozen=0"  # handlers registered after tunewright's run before the freeze
    assert last.startswith("last frozen=") and int(last.split("=")[1]) > 100_000
