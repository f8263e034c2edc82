"""Recipe validation: errors name the file, the line and the key; overrides apply."""

import re
from pathlib import Path

import pytest

from tunewright.recipe import RecipeError, load_recipe

ROOT = Path(__file__).resolve().parents[1]


def test_demo_recipe_is_valid_and_paths_resolve_against_the_recipe_file():
    recipe = load_recipe(ROOT / "recipes/demo.yaml")
    assert recipe.data.path == str(ROOT / "data/support_tickets/tickets.jsonl")
    assert recipe.train.max_steps == 60


def test_typo_in_a_key_names_file_line_and_allowed_keys(tmp_path, ticket_files):
    path = tmp_path / "r.yaml"
    path.write_text(f"name: x\ndata:\n  path: {ticket_files['tickets']}\ntrain:\n  max_step: 5\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    msg = str(err.value)
    assert f"{path}:5: train.max_step: unknown key" in msg
    assert "max_steps" in msg  # the allowed keys are listed


def test_wrong_type_and_missing_file_are_reported_together(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: x\ndata:\n  path: nowhere.jsonl\ntrain:\n  learning_rate: fast\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    msg = str(err.value)
    assert f"{path}:3: data.path: file or folder not found" in msg
    assert f"{path}:5: train.learning_rate" in msg


def test_half_fine_tuning_across_processes_is_refused_before_anything_runs(tmp_path, ticket_files):
    path = tmp_path / "r.yaml"
    path.write_text(f"name: x\ndata:\n  path: {ticket_files['tickets']}\nmodel:\n  adapter: {{method: hft}}\n"
                    "environment:\n  num_processes: 2\n")
    with pytest.raises(RecipeError, match=re.escape(f"{path}:6: environment: num_processes > 1 with model.adapter.method")):
        load_recipe(path)


def test_the_cluster_section_is_checked_and_counts_its_workers_as_the_processes(tmp_path, ticket_files):
    recipe = load_recipe(ROOT / "recipes/ray-cluster.yaml")
    assert recipe.environment.cluster.workers == 2 and recipe.environment.processes == 2
    path = tmp_path / "r.yaml"
    path.write_text(f"name: x\ndata:\n  path: {ticket_files['tickets']}\n"
                    "environment:\n  num_processes: 2\n  cluster: {workers: 2, gpu_per_worker: 1}\n")
    with pytest.raises(RecipeError) as caught:
        load_recipe(path)
    assert "environment.cluster.gpu_per_worker: unknown key (allowed: address, workers, cpus_per_worker, gpus_per_worker" \
        in str(caught.value)
    path.write_text(f"name: x\ndata:\n  path: {ticket_files['tickets']}\nmodel:\n  adapter: {{method: hft}}\n"
                    "environment:\n  cluster: {workers: 2}\n")
    with pytest.raises(RecipeError, match="num_processes > 1 with model.adapter.method 'hft'"):
        load_recipe(path)
    path.write_text(f"name: x\ndata:\n  path: {ticket_files['tickets']}\n"
                    "environment:\n  num_processes: 2\n  cluster: {workers: 2}\n")
    with pytest.raises(RecipeError, match="num_processes and cluster both given"):
        load_recipe(path)


def test_set_overrides_values_and_errors_point_at_the_override(tiny_recipe):
    recipe = load_recipe(tiny_recipe, ["train.max_steps=7", "evaluate.metric=exact_match"])
    assert recipe.train.max_steps == 7 and recipe.evaluate.metric == "exact_match"
    with pytest.raises(RecipeError, match=r"\(--set\): train.max_steps"):
        load_recipe(tiny_recipe, ["train.max_steps=-3"])


def test_missing_recipe_file_is_a_clear_error(tmp_path):
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "absent.yaml")


def test_flat_params_cover_every_section(tiny_recipe):
    flat = load_recipe(tiny_recipe).flat()
    assert flat["train.max_steps"] == "4"
    assert {k.split(".")[0] for k in flat} >= {"data", "model", "environment", "train", "evaluate", "deploy", "monitor"}


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_is_valid_and_says_how_to_run_it(path):
    assert path.read_text().startswith(f"# tunewright run recipes/{path.name}")
    load_recipe(path)
