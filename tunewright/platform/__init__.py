"""The services tunewright runs beside itself: the state folder and environment (`settings`), Prefect's local
server (`prefect_server`), `tunewright up` / `down` (`services`), and pre-migrated SQLite databases
(`db_templates`)."""
