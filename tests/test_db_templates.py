"""New Prefect and MLflow SQLite databases start as copies of empty ones their library has already migrated."""

import sqlite3

from tunewright.platform import db_templates


def _head_revision() -> str:
    """The newest of Prefect's SQLite migrations."""
    from pathlib import Path

    import prefect
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    migrations = Path(prefect.__file__).parent / "server" / "database" / "_migrations"
    config = Config()
    config.set_main_option("script_location", str(migrations))
    config.set_main_option("version_locations", str(migrations / "versions" / "sqlite"))
    return ScriptDirectory.from_config(config).get_current_head()


def _rows(db, sql):
    con = sqlite3.connect(db)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def test_a_new_database_is_a_copy_of_a_migrated_empty_one_made_once(tmp_path, monkeypatch):
    monkeypatch.setenv(db_templates.CACHE_ENV, str(tmp_path / "cache"))
    first = tmp_path / "a" / "prefect" / "prefect.db"
    template = db_templates.seed_prefect(f"sqlite+aiosqlite:///{first}")
    assert template and template.parent == tmp_path / "cache" and template.is_file()
    assert _rows(first, "select version_num from alembic_version") == [(_head_revision(),)]  # nothing left to migrate
    assert _rows(first, "select count(*) from flow_run") == [(0,)]
    assert [p.name for p in template.parent.iterdir()] == [template.name], "no work files left in the cache"

    made = template.stat().st_mtime_ns
    second = tmp_path / "b" / "prefect.db"
    assert db_templates.seed_prefect(f"sqlite+aiosqlite:///{second}") == template
    assert template.stat().st_mtime_ns == made  # made once, copied after
    assert second.read_bytes() == template.read_bytes()
    assert not [p for p in second.parent.iterdir() if p.name != "prefect.db"], "the staged copy is removed"


def test_an_existing_database_and_other_databases_are_left_alone(tmp_path, monkeypatch):
    monkeypatch.setenv(db_templates.CACHE_ENV, str(tmp_path / "cache"))
    existing = tmp_path / "prefect.db"
    con = sqlite3.connect(existing)
    con.execute("create table mine (x)")
    con.close()
    before = existing.read_bytes()
    assert db_templates.seed_prefect(f"sqlite+aiosqlite:///{existing}") is None
    assert existing.read_bytes() == before
    assert db_templates.seed_prefect("postgresql+asyncpg://user:pw@localhost/prefect") is None
    assert db_templates.seed_prefect("sqlite+aiosqlite:///:memory:") is None
    assert not (tmp_path / "cache").exists()


def test_without_a_template_prefect_migrates_the_database_itself(tmp_path, monkeypatch, caplog):
    (tmp_path / "not-a-folder").write_text("")
    monkeypatch.setenv(db_templates.CACHE_ENV, str(tmp_path / "not-a-folder"))
    target = tmp_path / "state" / "prefect.db"
    assert db_templates.seed_prefect(f"sqlite+aiosqlite:///{target}") is None
    assert not target.exists()
    assert "prefect migrates it itself" in caplog.text and str(target) in caplog.text


def test_a_new_mlflow_store_is_seeded_and_works_like_one_mlflow_made(tmp_path, monkeypatch):
    from tunewright.registry import tracking

    monkeypatch.setenv(db_templates.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root is relative to the working folder
    state = tmp_path / "state"
    uri = f"sqlite:///{state / 'mlflow.db'}"
    exp = tracking.experiment_id(tracking.store_client(uri), "seeded", state, uri)
    [template] = (tmp_path / "cache").glob("mlflow-*.db")
    assert _rows(template, "select count(*) from experiments") == [(0,)]  # nothing of the store it was made in

    client = tracking.store_client(uri)
    default = client.get_experiment("0")  # made by MLflow on opening, where this store keeps its artifacts
    assert default.name == "Default" and str(tmp_path / "cache") not in default.artifact_location
    assert client.get_experiment(exp).artifact_location.startswith((state / "mlartifacts").as_uri())
    run = client.create_run(exp)
    client.log_metric(run.info.run_id, "loss", 0.5)
    client.set_terminated(run.info.run_id)
    assert client.get_run(run.info.run_id).data.metrics == {"loss": 0.5}
    client.create_registered_model("seeded-model")
    version = client.create_model_version("seeded-model", f"runs:/{run.info.run_id}/m", run.info.run_id)
    client.set_registered_model_alias("seeded-model", "champion", version.version)
    assert int(client.get_model_version_by_alias("seeded-model", "champion").version) == 1

    other = tmp_path / "other" / "mlflow.db"
    assert db_templates.seed_mlflow(f"sqlite:///{other}") == template  # made once, copied after
    assert db_templates.seed_mlflow("http://mlflow:5000") is None
