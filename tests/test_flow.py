"""The whole seven-stage flow under Prefect, on the tiny model, and what MLflow holds afterwards."""

import json
import os
import subprocess
import sys

import pytest
from mlflow import MlflowClient

from tunewright.recipe import load_recipe


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
    # MLflow opens the experiment on its runs; the parent names its source and links each stage's run
    assert client.get_experiment(result.context.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    assert parent.data.tags["mlflow.source.name"] == "flows/finetune.py"
    assert parent.data.tags["mlflow.note.content"].count("#/experiments/") == 7
    # Prefect names the flow run after the recipe and the MLflow run; each stage links to its MLflow run
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as pc:
        run = pc.read_flow_run(parent.data.tags["prefect.flow_run_id"])
        keys = {a.key for a in pc.read_artifacts() if a.flow_run_id == run.id}
    assert run.name == f"tiny-flow-{result.context.parent_run_id[:8]}"
    assert {"mlflow-1-data", "mlflow-4-fine-tune", "mlflow-5-evaluate", "mlflow-6-deploy", "evaluation"} <= keys
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

    # the version holds its adapter only: the base weights are stored once, by digest, and referred to
    import mlflow
    import yaml

    mlmodel = yaml.safe_load(open(mlflow.artifacts.download_artifacts(f"models:/tiny-tickets/{version.version}/MLmodel")))
    flavor = mlmodel["flavors"]["python_function"]
    assert set(flavor["artifacts"]) == {"adapter"}
    assert flavor["config"]["base_uri"].startswith("runs:/") and flavor["config"]["base_digest"].startswith("sha256:")

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


def test_a_second_run_is_compared_with_the_champion_and_a_failed_gate_leaves_it_in_place(prefect_server, tiny_recipe,
                                                                                       state):
    from prefect.client.orchestration import get_client

    from flows.finetune import finetune

    with get_client(sync_client=True) as pc:  # the module's server holds other tests' runs
        earlier = {a.id for a in pc.read_artifacts()}
    first = finetune(recipe=load_recipe(tiny_recipe, ["evaluate.metrics=[token_f1, chrf, accuracy, macro_f1]",
                                                      "evaluate.label_field=category", "deploy.exports=[merged, int8]",
                                                      "deploy.int8_min_agreement=0", "deploy.export_prompts=4"]))
    assert first.deployed.promoted and first.scores.champion is None
    # the exports are logged with the version, and the merged one answers as the adapter does
    import mlflow

    first_version = MlflowClient().get_model_version("tiny-tickets", first.deployed.version)
    assert first_version.tags["tunewright.export.merged.agreement"] == "1.000"
    merged = mlflow.artifacts.download_artifacts(first_version.tags["tunewright.export.merged"])
    int8 = mlflow.artifacts.download_artifacts(first_version.tags["tunewright.export.int8"])
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(merged))
    assert "quantization_config" in json.loads(open(f"{int8}/config.json").read())
    # its answers are kept for when it is the champion: the next run does not generate them again
    assert len(list((state / "eval_cache").glob("champion-*.json"))) == 1
    # the same recipe again must beat the champion by a margin it cannot reach
    second = finetune(recipe=load_recipe(tiny_recipe, [
        "evaluate.metrics=[token_f1, chrf, accuracy, macro_f1]", "evaluate.label_field=category",
        'deploy.gate=["json_exact_match >= champion.json_exact_match + 0.5", "toxic_rate <= base.toxic_rate"]']))
    scores = second.scores
    assert scores.champion == f"models:/tiny-tickets/{first.deployed.version}"
    assert set(scores.scores) == {"base", "tuned", "champion"}
    # the champion answered the same test set: it is the first run's fine-tuned model
    assert scores.scores["champion"]["json_exact_match"] == pytest.approx(first.scores.tuned_score)
    assert scores.scores["champion"]["token_f1"] == pytest.approx(first.scores.scores["tuned"]["token_f1"])
    for figures in scores.scores.values():
        assert {"accuracy", "macro_f1", "token_f1", "chrf", "toxicity", "toxic_rate", "pii_leak_rate",
                "refusal_rate", "answer_loss", "perplexity"} <= set(figures)

    client = MlflowClient()
    assert not second.deployed.promoted and second.deployed.alias == "challenger"
    assert str(client.get_model_version_by_alias("tiny-tickets", "champion").version) == first.deployed.version
    assert str(client.get_model_version_by_alias("tiny-tickets", "challenger").version) == second.deployed.version
    tags = client.get_model_version("tiny-tickets", second.deployed.version).tags
    assert tags["tunewright.gate"] == "failed" and tags["tunewright.compared_with"] == scores.champion
    rules = json.loads(tags["tunewright.gate.rules"])
    assert [r["passed"] for r in rules] == [True, True, False, True]
    # lineage on the version, and the base weights stored once for both versions
    first_tags = client.get_model_version("tiny-tickets", first.deployed.version).tags
    for key in ("tunewright.dataset_digest", "tunewright.recipe_digest", "tunewright.git_commit",
                "tunewright.base_source", "tunewright.base_digest", "tunewright.parent_run_id"):
        assert tags[key], key
    assert tags["tunewright.base_uri"] == first_tags["tunewright.base_uri"]
    bases = client.get_experiment_by_name("tunewright-bases")
    assert len(client.search_runs([bases.experiment_id])) == 1

    # the per-example table in MLflow holds every model's answer and scores; Prefect shows the figures
    eval_run = client.search_runs([second.context.experiment_id], filter_string=(
        f"tags.mlflow.parentRunId = '{second.context.parent_run_id}' and tags.`tunewright.stage` = '5-evaluate'"))[0]
    local = client.download_artifacts(eval_run.info.run_id, "evaluation/examples.json")
    table = json.loads(open(local).read())
    assert {"prompt", "reference", "base", "tuned", "champion", "champion_token_f1", "tuned_toxicity"} <= set(
        table["columns"])
    assert len(table["data"]) == scores.n_examples
    with get_client(sync_client=True) as pc:
        artifacts = pc.read_artifacts()
    evaluation = [a for a in artifacts if a.key == "evaluation" and a.flow_run_id and a.id not in earlier]
    assert len(evaluation) == 2 and sum("champion" in json.dumps(a.data) for a in evaluation) == 1


def test_a_run_failing_in_stage_7_after_promotion_leaves_the_registry_as_it_found_it(
        prefect_server, tiny_recipe, tmp_path, state):
    """Stage 6 registers and promotes (the tiny recipe's gate passes), then stage 7 fails on a production log with a
    bad line: the flow fails and takes its registration back, so the model it created is gone."""
    from flows.finetune import finetune

    production = tmp_path / "production.jsonl"
    production.write_text(json.dumps({"prompt": "My Orbit Mouse will not turn on."}) + "\n{not json\n")
    recipe = load_recipe(tiny_recipe, [f"monitor.production_path={production}"])
    with pytest.raises(ValueError, match=r"production.jsonl line 2: invalid JSON"):
        finetune(recipe=recipe)
    client = MlflowClient()
    parent = client.search_runs(client.get_experiment_by_name("tiny").experiment_id,
                                filter_string="tags.`tunewright.recipe_name` = 'tiny-flow'")[0]
    assert parent.info.status == "FAILED"
    deploy_run = client.search_runs([parent.info.experiment_id], filter_string=(
        f"tags.mlflow.parentRunId = '{parent.info.run_id}' and attributes.run_name = '6-deploy'"))[0]
    assert deploy_run.data.params["version"] == "1" and deploy_run.data.params["alias"] == "champion", \
        "stage 6 registered and promoted before stage 7 failed"
    assert client.search_registered_models() == [], "the run created the model, and nothing of it remains"
