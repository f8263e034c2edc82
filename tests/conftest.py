"""Shared fixtures: a tiny model with the real SmolLM2 tokenizer, a small ticket dataset, a state folder."""

from __future__ import annotations

import atexit
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# no network here: fail fast instead of retrying a hub that cannot answer
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Flows run in this process use Prefect's temporary server: give it a database of its own per test process (with
# pytest-xdist, each worker starts one; two on one SQLite file would lock each other out), and time to start on a
# busy machine. Must be set before Prefect is imported.
if "PREFECT_HOME" not in os.environ:  # one the person running the tests chose stays theirs, and stays on disk
    os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix=f"prefect-{os.environ.get('PYTEST_XDIST_WORKER', 'main')}-")
    atexit.register(shutil.rmtree, os.environ["PREFECT_HOME"], True)
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
# registered versions fetch their base weights into a cache by digest: one for this test process, not the home folder
if "TUNEWRIGHT_BASE_CACHE" not in os.environ:
    os.environ["TUNEWRIGHT_BASE_CACHE"] = tempfile.mkdtemp(prefix="tunewright-bases-")
    atexit.register(shutil.rmtree, os.environ["TUNEWRIGHT_BASE_CACHE"], True)
if os.environ.get("PYTEST_XDIST_WORKER"):
    # several test processes share the cores: one torch thread each (more would make them wait on each other);
    # the recipes' num_threads default follows it
    os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session", autouse=True)
def _temporary_prefect_server_stops_with_this_process():
    """Flows run in this process start Prefect's temporary server: started the way `tunewright run` starts it, it
    stops when this test process dies, even killed (a CI timeout), instead of staying behind on its port."""
    from tunewright.platform import prefect_server

    prefect_server.install()


@pytest.fixture(scope="session")
def prefect_server(_temporary_prefect_server_stops_with_this_process) -> str:
    """A Prefect server of this test process's own (Prefect's test harness; with pytest-xdist each worker starts
    one), started for the first test that asks for it and shared by the rest; its API URL.

    Opt-in: the harness points Prefect's settings at it, in this process only, until the session ends; the
    environment (and so every subprocess) is left as it was. Tests sharing it leave nothing behind that acts on
    the others (deployments, triggers, concurrency limits) and count only their own flow runs."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield PREFECT_API_URL.value()


def cli_env(**extra: str) -> dict[str, str]:
    """The environment for a `tunewright` command the way a user runs one: no Prefect server or Prefect home of the
    test process's own, so the command starts its temporary server on its state folder's database."""
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_HOME")}
    return env | extra


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, proc, log: Path, timeout: float = 180) -> None:
    """Until `url` answers 200; fail with the server's log if it exits or stays silent."""
    from tunewright.platform.services import wait_http as wait

    wait(url, timeout, proc, log)


def spy_on_events(monkeypatch) -> list[dict]:
    """The tunewright events this test emits (`prefect.events.emit_event` replaced while it runs): they are
    recorded, not sent. Prefect's own events go on to the real function, because a Prefect module imported while
    the test runs keeps the replacement for the rest of the session (`prefect.concurrency` binds `emit_event` on
    import), and must go on working after it."""
    import prefect.events

    emitted: list[dict] = []
    real = prefect.events.emit_event

    def spy(*args, **event):
        if not args and str(event.get("event", "")).startswith("tunewright."):
            emitted.append(event)
            return None
        return real(*args, **event)

    monkeypatch.setattr(prefect.events, "emit_event", spy)
    return emitted


def wait_until(condition, timeout: float, what: str, every: float = 0.5):
    """Call `condition` until it returns something true, and return that; fail naming `what` after `timeout` s."""
    import time

    deadline = time.monotonic() + timeout
    while not (got := condition()):
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout:.0f} s")
        time.sleep(every)
    return got


def load_generator():
    spec = importlib.util.spec_from_file_location("ticket_generator", ROOT / "data/support_tickets/generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """The real SmolLM2 tokenizer, read from the embedded GGUF file."""
    from transformers import AutoTokenizer

    from tunewright.tokenizer import embedded_gguf

    gguf = embedded_gguf()
    out = tmp_path_factory.mktemp("tokenizer")
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tokenizer_dir, tmp_path_factory) -> Path:
    """A 2-layer, hidden-64 Llama with SmolLM2's tokenizer and chat template."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return _tiny_model(tokenizer_dir, tmp_path_factory.mktemp("tiny-llama"), LlamaConfig, LlamaForCausalLM,
                       intermediate_size=128)


def _tiny_model(tokenizer_dir: Path, out: Path, config_class, model_class, **shape) -> Path:
    """A 2-layer, hidden-64 model of `model_class` (seed 0) with SmolLM2's tokenizer, saved in `out`."""
    import torch
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = config_class(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id, **shape)
    model_class(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def ticket_files(tmp_path_factory) -> dict[str, Path]:
    """A small labelled ticket set (160 rows) and 60 drifted production requests."""
    gen = load_generator()
    out = tmp_path_factory.mktemp("tickets")
    return {"tickets": write_jsonl(out / "tickets.jsonl", gen.generate(160, seed=7)),
            "production": write_jsonl(out / "production.jsonl", gen.generate_production(60, seed=8))}


@pytest.fixture()
def state(tmp_path, monkeypatch) -> Path:
    """An empty state folder with its own MLflow SQLite store."""
    import mlflow

    home = tmp_path / "state"
    monkeypatch.setenv("TUNEWRIGHT_HOME", str(home))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{home}/mlflow.db")
    # an earlier test's stage runs set MLflow's process-wide URI, which wins over the variable
    mlflow.set_tracking_uri(f"sqlite:///{home}/mlflow.db")
    home.mkdir()
    return home


@pytest.fixture()
def tiny_recipe(tmp_path, tiny_model_dir, ticket_files, state):
    """A recipe file for the whole flow on the tiny model and small dataset; returns its path."""
    import yaml

    recipe = {
        "name": "tiny-flow",
        "data": {"path": str(ticket_files["tickets"]), "split": {"val_fraction": 0.1, "test_fraction": 0.15},
                 "gate": {"min_rows": 50}},
        "model": {"base": str(tiny_model_dir), "adapter": {"r": 4, "alpha": 8}},
        "train": {"max_steps": 4, "batch_size": 4, "learning_rate": 5e-3, "warmup_steps": 1, "max_seq_len": 160},
        "evaluate": {"max_examples": 8, "batch_size": 8, "max_new_tokens": 8},
        "deploy": {"registered_model": "tiny-tickets", "min_improvement": -1.0, "verify_samples": 2},
        "monitor": {"production_path": str(ticket_files["production"])},
        "tracking": {"experiment": "tiny"},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


@pytest.fixture()
def run_ctx(tiny_recipe):
    """An open pipeline run (parent MLflow run) for calling stage tasks one by one."""
    from tunewright.recipe import load_recipe
    from tunewright.registry.tracking import pipeline_run

    recipe = load_recipe(tiny_recipe)
    with pipeline_run(recipe) as ctx:
        yield recipe, ctx


@pytest.fixture(scope="session")
def tiny_moe_dir(tokenizer_dir, tmp_path_factory) -> Path:
    """A 2-layer Mixtral-style mixture of experts (4 experts, top-2) with SmolLM2's tokenizer."""
    from transformers import MixtralConfig, MixtralForCausalLM

    return _tiny_model(tokenizer_dir, tmp_path_factory.mktemp("tiny-mixtral"), MixtralConfig, MixtralForCausalLM,
                       intermediate_size=64, num_local_experts=4, num_experts_per_tok=2)


@pytest.fixture()
def s3_endpoint(monkeypatch):
    """A moto S3 server on a free local port, with the environment pointing boto3 at it."""
    import socket

    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    url = f"http://127.0.0.1:{port}"
    for key, value in {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    yield url
    server.stop()


# --- alignment recipes on the tiny model (tests/test_alignment.py, tests/test_ppo.py) ---------------------

@pytest.fixture()
def aligned(tmp_path, tiny_model_dir, state):
    """Stages 1 to 3 of a preference recipe on the tiny model (preference pairs from the ticket generator)."""
    import yaml

    from tasks.data import prepare_data
    from tasks.environment import setup_environment
    from tasks.model import initialise_model
    from tunewright.recipe import load_recipe
    from tunewright.registry.tracking import pipeline_run

    gen = load_generator()
    pairs = write_jsonl(tmp_path / "pairs.jsonl", gen.generate_preferences(gen.generate(160, seed=7), seed=9))

    def make(data_path=None, adapter=None, **train):
        recipe = {
            "name": "tiny-align",
            "data": {"path": str(data_path or pairs), "split": {"val_fraction": 0.1, "test_fraction": 0.15},
                     "gate": {"min_rows": 50}, "clean": {"contamination": "report", "near_dedupe": False}},
            "model": {"base": str(tiny_model_dir), "adapter": adapter or {"r": 4, "alpha": 8}},
            "train": {"max_steps": 8, "batch_size": 4, "learning_rate": 5e-3, "warmup_steps": 0,
                      "lr_scheduler": "constant", "max_seq_len": 160, **train},
            "evaluate": {"max_examples": 6, "batch_size": 6, "max_new_tokens": 8},
            # fp32 everywhere: the thresholds below hold on every CPU kind, with or without bf16
            "environment": {"precision": "fp32"},
            "tracking": {"experiment": "tiny-align"},
        }
        path = tmp_path / f"align-{len(list(tmp_path.glob('align-*.yaml')))}.yaml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        return load_recipe(path)

    opened = []

    def stages(**train):
        recipe = make(**train)  # data_path= another dataset
        cm = pipeline_run(recipe)
        ctx = cm.__enter__()
        opened.append(cm)
        data = prepare_data.fn(recipe.data, ctx, expect_kind=recipe.train.data_kinds())
        model = initialise_model.fn(recipe.model, recipe.environment.seed, ctx)
        env = setup_environment.fn(recipe.environment, recipe.train, recipe.model, model, ctx)
        return recipe, ctx, data, model, env

    yield stages
    for cm in reversed(opened):
        cm.__exit__(None, None, None)


def metric_history(ctx, key: str) -> list[float]:
    """One metric of the pipeline run's stage-4 MLflow run, by step."""
    import mlflow

    runs = mlflow.search_runs(experiment_ids=[ctx.experiment_id],
                              filter_string=f"tags.`tunewright.stage` = '4-fine-tune' and tags.`mlflow.parentRunId` = "
                                            f"'{ctx.parent_run_id}'")
    history = mlflow.MlflowClient().get_metric_history(runs.iloc[0]["run_id"], key)
    return [m.value for m in sorted(history, key=lambda m: m.step)]


def crash_then_resume(monkeypatch, stages: tuple, at_step: int):
    """Run stage 4 in a fresh run folder, killed right after its step-`at_step` checkpoint, then resume it: the
    resumed run's artifact."""
    import dataclasses

    from tasks.finetune import checkpoints, fine_tune

    recipe, ctx, data, model, env = stages
    crashed = dataclasses.replace(ctx, work_dir=str(Path(ctx.work_dir).with_name("crashed")))
    real_save = checkpoints.save

    def save_then_crash(root, step, *args, **kwargs):
        path = real_save(root, step, *args, **kwargs)
        if step == at_step:
            raise KeyboardInterrupt(f"killed after the step-{at_step} checkpoint")
        return path

    monkeypatch.setattr(checkpoints, "save", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        fine_tune.fn(recipe.train, recipe.model, data, model, env, crashed)
    monkeypatch.setattr(checkpoints, "save", real_save)
    return fine_tune.fn(recipe.train, recipe.model, data, model, env, crashed)
