"""The services tunewright runs beside itself: the state folder and environment (`settings`), Prefect's local
server (`prefect_server`), `tunewright up` / `down` (`services`), pre-migrated SQLite databases
(`db_templates`), and a Ray cluster on this machine for stage 4 (`cluster`, `tunewright cluster`)."""
