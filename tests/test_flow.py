"""The whole seven-stage flow under Prefect, on the tiny model, and what MLflow holds afterwards."""

import json
import subprocess
import sys

import pytest
from mlflow import MlflowClient

from tunewright.recipe import load_recipe


@pytest.fixture(scope="module")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_flow_runs_all_stages_and_registers_a_model_that_loads_in_a_new_process(prefect_server, tiny_recipe, state):
    from flows.finetune import finetune

    recipe = load_recipe(tiny_recipe)
    result = finetune(recipe=recipe)
    client = MlflowClient()
    parent = client.get_run(result.context.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.params["train.max_steps"] == "4"
    assert "tuned_json_exact_match" in parent.data.metrics
    assert parent.data.tags["tunewright.recipe_digest"] == recipe.digest()
    children = client.search_runs([result.context.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(r.info.run_name for r in children) == [
        "1-data", "2-model", "3-environment", "4-fine-tune", "5-evaluate", "6-deploy", "7-monitor"]
    data_run = next(r for r in children if r.info.run_name == "1-data")
    assert {d.dataset.name for d in data_run.inputs.dataset_inputs} == {"tickets-train", "tickets-test"}
    assert all(d.dataset.digest for d in data_run.inputs.dataset_inputs)
    tune_run = next(r for r in children if r.info.run_name == "4-fine-tune")
    assert len(client.get_metric_history(tune_run.info.run_id, "train_loss")) == 4
    eval_run = next(r for r in children if r.info.run_name == "5-evaluate")
    assert {a.path for a in client.list_artifacts(eval_run.info.run_id, "evaluation")} >= {
        "evaluation/evaluation.html", "evaluation/predictions.jsonl"}

    # min_improvement -1 in the tiny recipe: the gate passes and the alias moves
    version = client.get_model_version_by_alias("tiny-tickets", "champion")
    assert str(version.version) == result.deployed.version and result.deployed.promoted

    # the registered model answers through MLflow's API in a process that never saw it
    code = ("import mlflow, pandas as pd, json; m = mlflow.pyfunc.load_model('models:/tiny-tickets@champion');"
            "print(json.dumps(m.predict(pd.DataFrame({'prompt': ['My Orbit Mouse will not turn on.']}))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert isinstance(json.loads(out.stdout.strip().splitlines()[-1]), list)


def test_a_dataset_that_fails_the_gate_stops_the_flow_and_registers_nothing(prefect_server, tiny_recipe, tmp_path, state):
    from flows.finetune import finetune
    from tasks.data import DataGateError

    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"}]}) + "\n" for i in range(60)))
    recipe = load_recipe(tiny_recipe, [f"data.path={bad}"])
    with pytest.raises(DataGateError, match="expect_column_values_to_be_in_set on 'last_role'"):
        finetune(recipe=recipe)
    client = MlflowClient()
    assert client.search_registered_models() == []
    parent = client.search_runs(client.get_experiment_by_name("tiny").experiment_id,
                                filter_string="tags.`tunewright.recipe_name` = 'tiny-flow'")[0]
    assert parent.info.status == "FAILED"


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_soft_prompt_adapters_are_evaluated_registered_and_served(prefect_server, tiny_recipe, state, method):
    """Prompt- and prefix-tuning go through the whole flow; the registered model, loaded by MLflow in a
    new process, answers exactly as the trained adapter does in this one (greedy decoding, fp32)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from flows.finetune import finetune
    from tunewright.chat import generate

    recipe = load_recipe(tiny_recipe, [f"model.adapter.method={method}", "model.adapter.num_virtual_tokens=4",
                                       "environment.precision=fp32", "train.learning_rate=0.05"])
    result = finetune(recipe=recipe)
    assert result.trained.kind == "adapter" and result.deployed.version
    # stage 5 scored the network with the soft prompt on and off: they differ
    assert 0.0 <= result.scores.tuned_score <= 1.0 and result.scores.tuned_loss != result.scores.base_loss

    prompts = ["My Orbit Mouse will not turn on. Order A12345.", "Where is my refund for order B77777?"]
    tok = AutoTokenizer.from_pretrained(result.trained.output_dir)
    base = AutoModelForCausalLM.from_pretrained(recipe.model.base, dtype=torch.float32)
    net = PeftModel.from_pretrained(base, result.trained.output_dir).eval()
    system = [{"role": "system", "content": result.data.system_prompt}] if result.data.system_prompt else []
    here = generate(net, tok, [system + [{"role": "user", "content": p}] for p in prompts],
                    max_new_tokens=recipe.evaluate.max_new_tokens, batch_size=recipe.evaluate.batch_size)
    code = ("import mlflow, pandas as pd, json, sys; m = mlflow.pyfunc.load_model(sys.argv[1]);"
            "print(json.dumps(m.predict(pd.DataFrame({'prompt': json.loads(sys.argv[2])}), "
            "params={'max_new_tokens': int(sys.argv[3])})))")
    out = subprocess.run([sys.executable, "-c", code, f"models:/tiny-tickets/{result.deployed.version}",
                          json.dumps(prompts), str(recipe.evaluate.max_new_tokens)],
                         capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == here
