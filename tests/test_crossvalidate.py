"""k-fold cross-validation over the folds stage 1 assigns: one training per fold, held-out fold scored, summary."""

import json

import pytest
from mlflow import MlflowClient

from tunewright.recipe import load_recipe


def test_each_fold_trains_without_its_rows_and_the_parent_run_summarises_them(prefect_server, tiny_recipe, state):
    from flows.crossvalidate import crossvalidate
    from tunewright.splits import read_split

    recipe = load_recipe(tiny_recipe, ["data.balance.kfolds=2", "train.max_steps=2", "evaluate.max_examples=4",
                                       "evaluate.metrics=[token_f1]"])
    result = crossvalidate(recipe=recipe)
    assert len(result.folds) == 2
    client = MlflowClient()
    children = client.search_runs([result.context.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{result.context.parent_run_id}'")
    assert {r.info.run_name for r in children} >= {"1-data", "fold-0", "fold-1"}
    for i in (0, 1):
        fold_run = next(r for r in children if r.info.run_name == f"fold-{i}")
        stages = client.search_runs([result.context.experiment_id],
                                    filter_string=f"tags.mlflow.parentRunId = '{fold_run.info.run_id}'")
        assert {r.info.run_name for r in stages} == {"2-model", "3-environment", "4-fine-tune", "5-evaluate"}
        folder = f"{result.context.state_dir}/runs/{result.context.parent_run_id}/folds/fold-{i}"
        train, held = read_split(f"{folder}/train.jsonl"), read_split(f"{folder}/test.jsonl")
        assert {r["fold"] for r in held} == {i} and i not in {r["fold"] for r in train}
        assert not {r["id"] for r in train} & {r["id"] for r in held}
    parent = client.get_run(result.context.parent_run_id)
    tuned = [f.scores["tuned"]["token_f1"] for f in result.folds]
    assert parent.data.metrics["cv_tuned_token_f1_mean"] == pytest.approx(sum(tuned) / 2)
    assert "cv_base_json_exact_match_std" in parent.data.metrics
    summary = json.loads(open(client.download_artifacts(parent.info.run_id, "crossvalidation/summary.json")).read())
    assert summary["summary"]["tuned"]["token_f1"]["folds"] == 2
    assert client.search_registered_models() == []  # nothing is registered


def test_cross_validation_needs_folds(tiny_recipe):
    from typer.testing import CliRunner

    from tunewright.cli import app

    out = CliRunner().invoke(app, ["crossvalidate", str(tiny_recipe)])
    assert out.exit_code == 2 and "kfolds >= 2" in out.output
