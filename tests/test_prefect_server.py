"""Prefect's temporary server: a new state folder's database starts as a copy of a migrated empty one."""

import sqlite3

from tunewright import prefect_server


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
    monkeypatch.setenv(prefect_server.CACHE_ENV, str(tmp_path / "cache"))
    first = tmp_path / "a" / "prefect" / "prefect.db"
    template = prefect_server.seed_database(f"sqlite+aiosqlite:///{first}")
    assert template and template.parent == tmp_path / "cache" and template.is_file()
    assert _rows(first, "select version_num from alembic_version") == [(_head_revision(),)]  # nothing left to migrate
    assert _rows(first, "select count(*) from flow_run") == [(0,)]
    assert [p.name for p in template.parent.iterdir()] == [template.name], "no work files left in the cache"

    made = template.stat().st_mtime_ns
    second = tmp_path / "b" / "prefect.db"
    assert prefect_server.seed_database(f"sqlite+aiosqlite:///{second}") == template
    assert template.stat().st_mtime_ns == made  # made once, copied after
    assert second.read_bytes() == template.read_bytes()
    assert not [p for p in second.parent.iterdir() if p.name != "prefect.db"], "the staged copy is removed"


def test_an_existing_database_and_other_databases_are_left_alone(tmp_path, monkeypatch):
    monkeypatch.setenv(prefect_server.CACHE_ENV, str(tmp_path / "cache"))
    existing = tmp_path / "prefect.db"
    con = sqlite3.connect(existing)
    con.execute("create table mine (x)")
    con.close()
    before = existing.read_bytes()
    assert prefect_server.seed_database(f"sqlite+aiosqlite:///{existing}") is None
    assert existing.read_bytes() == before
    assert prefect_server.seed_database("postgresql+asyncpg://user:pw@localhost/prefect") is None
    assert prefect_server.seed_database("sqlite+aiosqlite:///:memory:") is None
    assert not (tmp_path / "cache").exists()


def test_without_a_template_prefect_migrates_the_database_itself(tmp_path, monkeypatch, caplog):
    (tmp_path / "not-a-folder").write_text("")
    monkeypatch.setenv(prefect_server.CACHE_ENV, str(tmp_path / "not-a-folder"))
    target = tmp_path / "state" / "prefect.db"
    assert prefect_server.seed_database(f"sqlite+aiosqlite:///{target}") is None
    assert not target.exists()
    assert "Prefect migrates it itself" in caplog.text and str(target) in caplog.text
