"""Hyperparameter search: the space schema, and a study of tiny-model trials with one of them pruned."""

from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from tests.conftest import cli_env
from tunewright.recipe import RecipeError, load_recipe, load_space

# a bad learning rate (the weights barely move: validation loss ~10.8 at step 2, as untrained) and two good ones
# (~6 at step 2), and a threshold pruner between them: the grid's three trials end with exactly one pruned, in
# whichever order they run
GOOD, BAD, BETTER = 0.05, 1.0e-7, 0.1
THRESHOLD = 10.0
TRIAL_SETTINGS = ["train.max_steps=4", "train.eval_every=2", "train.warmup_steps=0", "environment.precision=fp32",
                  "model.adapter.method=full"]


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture()
def schema_recipe(tmp_path, ticket_files) -> Path:
    """A recipe that validates without a model on disk (nothing runs)."""
    return _write(tmp_path / "r.yaml", {"name": "space-check", "data": {"path": str(ticket_files["tickets"])},
                                        "train": {"eval_every": 5}})


def test_a_misspelt_parameter_is_named_with_its_line_and_the_key_it_meant(tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("sampler: tpe\nparams:\n  train.learning_rate: {type: float, low: 1.0e-5, high: 1.0e-3}\n"
                     "  train.lora_rank: {type: int, low: 4, high: 16}\n"
                     "pruner: {type: median, upper: 3.0}\n")
    with pytest.raises(RecipeError) as err:
        load_space(space)
    msg = str(err.value)
    assert f"{space}: invalid search space (2 problems)" in msg
    assert f"{space}:4: params.train.lora_rank: not a recipe value" in msg
    assert f"{space}:5: pruner: upper does not apply to pruner 'median'" in msg


def test_space_errors_name_the_field(tmp_path, schema_recipe):
    """Unknown keys list what is allowed; a grid needs finite values; a value the recipe refuses fails up front."""
    from tunewright import search

    bad_key = _write(tmp_path / "a.yaml", {"params": {"train.learning_rate": {"type": "float", "low": 0.1,
                                                                              "hihg": 1.0}}})
    with pytest.raises(RecipeError, match=r"a.yaml:5: params.train.learning_rate.hihg: unknown key \(allowed: type, "
                                          r"low, high"):
        load_space(bad_key)
    grid = _write(tmp_path / "b.yaml", {"sampler": "grid", "params": {
        "train.learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}}})
    with pytest.raises(RecipeError, match="sampler 'grid' needs a finite set of values: give train.learning_rate "
                                          "choices or a step"):
        load_space(grid)
    refused = _write(tmp_path / "c.yaml", {"params": {"train.batch_size": {"type": "int", "choices": [0, 4]}}})
    with pytest.raises(RecipeError, match=r"params.train.batch_size: the recipe refuses 0: .*greater than or equal "
                                          r"to 1"):
        search.prepare(schema_recipe, space_path=refused)
    no_eval = _write(tmp_path / "d.yaml", {"params": {"train.learning_rate": {"type": "float", "low": 1e-4,
                                                                              "high": 1e-2}}})
    with pytest.raises(RecipeError, match="pruner 'median' judges the validation loss .* train.eval_every"):
        search.prepare(schema_recipe, ["train.eval_every=0"], no_eval)


def test_a_search_section_in_the_recipe_leaves_its_digest_and_params_alone(tmp_path, schema_recipe):
    from tunewright import search

    plain = load_recipe(schema_recipe)
    data = yaml.safe_load(schema_recipe.read_text())
    data["search"] = {"sampler": "random", "n_trials": 3, "params": {
        "model.adapter.target_modules": {"type": "categorical", "choices": ["all-linear", ["q_proj", "v_proj"]]},
        "train.lr_scheduler": {"type": "categorical", "choices": ["cosine", "constant"]}}}
    with_search = load_recipe(_write(tmp_path / "s.yaml", data))
    assert with_search.digest() == plain.digest() and with_search.flat() == plain.flat()
    setup = search.prepare(tmp_path / "s.yaml")
    assert setup.n_trials == 3 and setup.study_name.startswith("space-check-")
    # a list choice goes through the --set syntax and back
    recipe = search.trial_recipe(setup, {"model.adapter.target_modules": ["q_proj", "v_proj"]})
    assert recipe.model.adapter.target_modules == ["q_proj", "v_proj"]


def test_a_three_trial_study_prunes_the_bad_learning_rate_and_writes_the_best_recipe(prefect_server, tiny_recipe,
                                                                                      state, tmp_path):
    """Grid over three learning rates, a threshold pruner on the validation loss: two trials complete, one is
    pruned at its first report; Optuna, MLflow (one search run, three nested trial runs) and the files agree."""
    import optuna

    from flows.tune import tune

    space = _write(tmp_path / "space.yaml", {
        "sampler": "grid", "seed": 0,
        "params": {"train.learning_rate": {"type": "float", "choices": [GOOD, BAD, BETTER]}},
        "pruner": {"type": "threshold", "upper": THRESHOLD}})
    result = tune(recipe_path=str(tiny_recipe), overrides=TRIAL_SETTINGS, space_path=str(space))
    rep = result.report

    study = optuna.load_study(study_name=rep.study_name, storage=f"sqlite:///{state / 'optuna.db'}")
    states = {t.params["train.learning_rate"]: t.state for t in study.trials}
    assert states == {GOOD: optuna.trial.TrialState.COMPLETE, BAD: optuna.trial.TrialState.PRUNED,
                      BETTER: optuna.trial.TrialState.COMPLETE}
    pruned = next(t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED)
    assert list(pruned.intermediate_values) == [2]
    assert rep.counts == {"complete": 2, "pruned": 1, "failed": 0, "running": 0}

    client = MlflowClient(f"sqlite:///{state}/mlflow.db")
    parent = client.get_run(rep.search_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["tunewright.search"] == rep.study_name
    trial_runs = client.search_runs([rep.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{rep.search_run_id}'")
    by_number = {int(r.data.tags["optuna.trial_number"]): r for r in trial_runs}
    assert sorted(by_number) == [0, 1, 2]
    for t in study.trials:
        run = by_number[t.number]
        assert run.info.run_id == t.user_attrs["mlflow_run_id"]
        assert float(run.data.params["train.learning_rate"]) == t.params["train.learning_rate"]
        assert run.data.tags["optuna.trial_state"] == t.state.name
        stages = client.search_runs([rep.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run.info.run_id}'")
        assert sorted(r.info.run_name for r in stages) == ["1-data", "2-model", "3-environment", "4-fine-tune"]
    pruned_run = by_number[pruned.number]
    assert pruned_run.info.status == "KILLED" and pruned_run.data.tags["tunewright.pruned_at_step"] == "2"
    pruned_stage = client.search_runs([rep.experiment_id], filter_string=(
        f"tags.mlflow.parentRunId = '{pruned_run.info.run_id}' and tags.`tunewright.stage` = '4-fine-tune'"))[0]
    assert pruned_stage.data.tags["tunewright.pruned_at_step"] == "2"
    assert pruned_stage.data.metrics["steps_done"] == 2
    assert all(by_number[t.number].info.status == "FINISHED" for t in study.trials if t.state.name == "COMPLETE")

    artifacts = {a.path for a in client.list_artifacts(rep.search_run_id, "plots")}
    assert artifacts == {"plots/optimization_history.png", "plots/parallel_coordinate.png",
                         "plots/intermediate_values.png", "plots/search_plots.html"}
    page = Path(rep.plots["interactive"]).read_text()
    assert page.count("plotly-graph-div") == 3 and "parallel coordinates" in page
    assert "search/best.yaml" in {a.path for a in client.list_artifacts(rep.search_run_id, "search")}

    best = study.best_trial
    assert rep.best_trial == best.number and rep.best_value == pytest.approx(best.value)
    assert Path(rep.best_recipe) == state / "search" / rep.study_name / "best.yaml"
    recipe = load_recipe(rep.best_recipe)
    assert recipe.train.learning_rate == best.params["train.learning_rate"]
    assert recipe.train.eval_every == 2 and recipe.search is None
    trial_recipe = load_recipe(tiny_recipe, [*TRIAL_SETTINGS, f"train.learning_rate={best.params['train.learning_rate']}"])
    assert recipe.digest() == trial_recipe.digest()
    assert "pruned" in rep.table and rep.table.count("\n") == 3


def _fake_trial(recipe, ctx, run_evaluation, number):
    """Stands in for the trial subflow: a validation loss that is best at learning rate 1e-3, reported at steps
    2 and 4 through the same hook stage 4 calls."""
    import math
    from types import SimpleNamespace

    from tunewright import pruning

    for step in (2, 4):
        loss = abs(math.log10(recipe.train.learning_rate) + 3) + 1 / step
        if pruning.should_stop(ctx.parent_run_id, step, loss):
            break
    return SimpleNamespace(trained=SimpleNamespace(val_loss=loss), scores=None)


@pytest.fixture()
def postgres_url():
    """A fresh database on the local PostgreSQL server (trust auth for `postgres`), dropped afterwards."""
    import uuid

    import psycopg2

    pg = {"host": "127.0.0.1", "port": 5432, "user": "postgres"}
    try:
        admin = psycopg2.connect(dbname="postgres", connect_timeout=5, **pg)
    except psycopg2.OperationalError as exc:
        raise RuntimeError(f"PostgreSQL is not reachable on 127.0.0.1:5432 ({exc})") from exc
    admin.autocommit = True
    name = f"tw_test_optuna_{uuid.uuid4().hex[:8]}"
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    with admin.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.close()


def test_two_workers_share_one_study_on_postgresql(postgres_url, schema_recipe, tmp_path, state):
    """Two workers running the same search join one study (same default name) and stop when it holds n_trials;
    trial numbers never collide, and every trial has its own MLflow run under its worker's search run."""
    import threading

    import optuna

    from tunewright import search

    space = _write(tmp_path / "space.yaml", {
        "sampler": "tpe", "n_trials": 8, "seed": 3,
        "params": {"train.learning_rate": {"type": "float", "low": 1e-5, "high": 1e-1, "log": True}},
        "pruner": {"type": "median", "n_startup_trials": 2}})
    setups = [search.prepare(schema_recipe, space_path=space, storage=postgres_url) for _ in range(2)]
    assert setups[0].study_name == setups[1].study_name
    runs, errors = [], []

    def worker(setup):
        try:
            with search.search_run(setup) as ctx:
                runs.append(ctx.parent_run_id)
                search.optimize(setup, ctx, _fake_trial)
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(s,)) for s in setups]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    study = optuna.load_study(study_name=setups[0].study_name, storage=search.storage(postgres_url))
    numbers = [t.number for t in study.trials]
    # each worker checks the count after its own trial, so the last round may add one trial per extra worker
    assert sorted(numbers) == list(range(len(numbers))) and 8 <= len(numbers) <= 9
    assert {t.state for t in study.trials} <= {optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED}
    client = MlflowClient(f"sqlite:///{state}/mlflow.db")
    owners = {}
    for run_id in runs:
        for r in client.search_runs([client.get_run(run_id).info.experiment_id],
                                    filter_string=f"tags.mlflow.parentRunId = '{run_id}'"):
            owners[int(r.data.tags["optuna.trial_number"])] = run_id
    assert sorted(owners) == sorted(numbers) and set(owners.values()) == set(runs), "both workers ran trials"
    # a third worker finds the study complete and runs nothing
    with search.search_run(setups[0]) as ctx:
        assert len(search.optimize(setups[0], ctx, _fake_trial).trials) == len(numbers)


@pytest.mark.slow
def test_the_command_searches_a_recipe_section_and_trains_the_best_recipe_in_full(tiny_recipe, state, tmp_path):
    """`tunewright tune RECIPE --train-best` with the space in the recipe and the study in a database of its own:
    the best recipe goes through all seven stages and the search's run points at that pipeline run."""
    import subprocess
    import sys

    import optuna

    data = yaml.safe_load(tiny_recipe.read_text())
    data["search"] = {"sampler": "random", "seed": 1, "pruner": {"type": "none"},
                      "params": {"train.learning_rate": {"type": "float", "low": 0.01, "high": 0.05, "log": True}}}
    recipe = _write(tmp_path / "with-search.yaml", data)
    storage = f"sqlite:///{tmp_path / 'studies.db'}"
    out = subprocess.run([sys.executable, "-m", "tunewright.cli", "tune", str(recipe), "--trials", "1",
                          "--storage", storage, "--study", "cli-study", "--train-best",
                          "--set", "environment.precision=fp32"],
                         capture_output=True, text=True, env=cli_env(), timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "study 'cli-study'" in out.stdout and "best recipe:" in out.stdout and "registered model:" in out.stdout
    study = optuna.load_study(study_name="cli-study", storage=storage)
    assert [t.state.name for t in study.trials] == ["COMPLETE"]
    best_yaml = state / "search" / "cli-study" / "best.yaml"
    assert load_recipe(best_yaml).train.learning_rate == study.best_params["train.learning_rate"]
    client = MlflowClient(f"sqlite:///{state}/mlflow.db")
    search_run = client.search_runs([client.get_experiment_by_name("tiny").experiment_id],
                                    filter_string="tags.`tunewright.search` = 'cli-study'")[0]
    full = client.get_run(search_run.data.tags["tunewright.best_recipe_run_id"])
    assert full.info.status == "FINISHED" and "mlflow.parentRunId" not in full.data.tags
    assert float(full.data.params["train.learning_rate"]) == study.best_params["train.learning_rate"]
    assert "tuned_json_exact_match" in full.data.metrics


def test_the_shipped_space_is_valid_for_the_recipe_its_header_names():
    import shlex

    from tunewright import search

    root = Path(__file__).resolve().parents[1]
    for space in sorted((root / "recipes/search").glob("*.yaml")):
        command = shlex.split(space.read_text().splitlines()[0].removeprefix("# "))
        assert command[:2] == ["tunewright", "tune"] and command[3:5] == ["--space", f"recipes/search/{space.name}"]
        overrides = [command[i + 1] for i, arg in enumerate(command) if arg == "--set"]
        setup = search.prepare(root / command[2], overrides, space)
        assert setup.n_trials >= 1
