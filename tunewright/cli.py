"""The `tunewright` command.

Run: tunewright run recipes/demo.yaml [--set train.max_steps=30 ...]
     tunewright serve models:/support-ticket-json@champion [NAME=REFERENCE ...]
     tunewright replay data/support_tickets/production.jsonl --system-from data/support_tickets/tickets.jsonl
     tunewright monitor recipes/demo.yaml --window-end now
     tunewright promote support-ticket-json 3 --reason "..."   |   tunewright rollback support-ticket-json --reason "..."
     tunewright cluster up --nodes 2   |   tunewright cluster status   |   tunewright cluster down
"""

from __future__ import annotations

from pathlib import Path

import typer

from tunewright.recipe.names import DATA_FORMATS

app = typer.Typer(
    help="Fine-tune LLMs through the seven-stage lifecycle (Prefect flows, MLflow tracking and registry).",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
)

SET_HELP = "Override a recipe value: section.key=value (YAML value), repeatable. E.g. --set train.max_steps=30"


def _load(recipe: Path, overrides: list[str]):
    """The validated recipe, its merge's adapter folders checked too; a bad one ends the command (exit 2) before any
    work."""
    from tunewright.recipe import RecipeError, load_recipe
    from tunewright.registry.merging import check_sources

    try:
        r = load_recipe(recipe, overrides)
    except RecipeError as exc:
        typer.secho(str(exc), fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    if r.model.merge is not None:
        try:
            check_sources(r.model.merge)
        except ValueError as exc:
            typer.secho(f"{recipe}: {exc}", fg=typer.colors.RED, err=True)
            raise typer.Exit(2) from None
    return r


def _stage_errors() -> tuple[type[Exception], ...]:
    """What stops a run for a reason the user can act on (bad data, a failed check, a missing file or package): said
    in one line, not as a traceback. Imported when a run starts, not when the command is."""
    from tasks.data import DataGateError
    from tasks.data.formats import FormatError
    from tasks.data.sources import SourceError
    from tasks.deploy import VerificationError
    from tasks.environment import PreflightError

    return (DataGateError, FormatError, SourceError, VerificationError, PreflightError, FileNotFoundError,
            ModuleNotFoundError)


@app.command()
def validate(recipe: Path = typer.Argument(..., help="Recipe YAML file."),
             set_: list[str] = typer.Option([], "--set", help=SET_HELP)) -> None:
    """Check a recipe without running anything."""
    r = _load(recipe, set_)
    typer.echo(f"{recipe}: valid recipe '{r.name}' (digest {r.digest()})")


@app.command()
def run(recipe: Path = typer.Argument(..., help="Recipe YAML file (see recipes/)."),
        set_: list[str] = typer.Option([], "--set", help=SET_HELP),
        resume: bool = typer.Option(False, "--resume", help="Continue the newest unfinished run of this recipe "
                                    "(same file and --set values) from its last complete checkpoint.")) -> None:
    """Run all seven stages for a recipe and print where to look at the results."""
    from tunewright.platform import settings

    r = _load(recipe, set_)
    state = settings.state_dir(r.tracking.state_dir)
    settings.configure(state, r.tracking.tracking_uri)
    _quiet_libraries()
    _server_stops_with_us()
    from flows.finetune import finetune
    from tunewright.registry.tracking import NothingToResume

    stops = (*_stage_errors(), NothingToResume)
    try:
        result = finetune(recipe=r, resume=resume)
    except stops as exc:
        typer.secho(f"run stopped: {exc}", fg=typer.colors.RED, err=True)
        typer.secho("nothing was registered; the model registry is as it was.", err=True)
        raise typer.Exit(1) from None
    _summary(result, state)


@app.command()
def tune(recipe: Path = typer.Argument(..., help="Recipe YAML file whose values are searched (see recipes/)."),
         space: Path | None = typer.Option(None, "--space", help="Search space YAML (default: the recipe's `search` "
                                           "section); see recipes/search/."),
         set_: list[str] = typer.Option([], "--set", help=SET_HELP),
         trials: int | None = typer.Option(None, "--trials", min=1, help="Trials in the study, counted over every "
                                           "worker that joins it (default: the space's n_trials)."),
         sampler: str | None = typer.Option(None, "--sampler", help="grid, random or tpe (default: the space's)."),
         storage: str | None = typer.Option(None, "--storage", help="SQLAlchemy URL of the study database, e.g. "
                                            "postgresql://user@host/db (default: TUNEWRIGHT_STUDY_STORAGE, the "
                                            "space's storage, else SQLite in the state folder)."),
         study: str | None = typer.Option(None, "--study", help="Study name; workers naming the same one share its "
                                          "trials (default: the recipe name and a digest of recipe and search)."),
         train_best: bool = typer.Option(False, "--train-best", help="Then run all seven stages on the best "
                                         "recipe.")) -> None:
    """Search hyperparameters with Optuna (each trial a subflow and a nested MLflow run); write the best recipe."""
    import os

    from tunewright.platform import settings
    from tunewright.recipe import RecipeError

    r = _load(recipe, set_)
    state = settings.state_dir(r.tracking.state_dir)
    settings.configure(state, r.tracking.tracking_uri)
    if storage:
        # handed over in the environment, not as a flow parameter: Prefect shows parameters, and a URL may hold a password
        os.environ["TUNEWRIGHT_STUDY_STORAGE"] = storage
    _quiet_libraries()
    _server_stops_with_us()
    from tunewright import search

    try:
        setup = search.prepare(recipe, set_, space, trials=trials, sampler=sampler, study=study)
    except RecipeError as exc:
        typer.secho(str(exc), fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    for note in setup.notes:
        typer.secho(f"note: {note}", fg=typer.colors.YELLOW, err=True)
    from flows.tune import tune as tune_flow

    stops = (search.SearchError, *_stage_errors())
    try:
        result = tune_flow(recipe_path=str(recipe), overrides=list(set_), space_path=str(space) if space else None,
                           trials=trials, sampler=sampler, study=study, train_best=train_best)
    except stops as exc:
        typer.secho(f"search stopped: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None
    _tune_summary(result, state)
    if result.report.best_trial is None:
        raise typer.Exit(1)


def _tune_summary(result, state: Path) -> None:
    from tunewright.platform import settings

    rep = result.report
    counts = ", ".join(f"{n} {state_}" for state_, n in rep.counts.items() if n or state_ != "running")
    lines = ["", f"tunewright tune: study '{rep.study_name}' ({rep.storage})",
             f"  trials: {counts}; {rep.direction} {rep.metric}", "",
             *(f"  {line}" for line in rep.table.splitlines()), ""]
    if rep.best_trial is None:
        lines.append("  no trial completed, so there is no best recipe")
    else:
        lines += [f"  best: trial {rep.best_trial}, {rep.metric} {rep.best_value:.4f}: "
                  + ", ".join(f"{k}={v}" for k, v in rep.best_params.items()),
                  f"  best recipe: {rep.best_recipe}", f"    tunewright run {rep.best_recipe}"]
    lines += [f"  MLflow search run: {rep.search_run_id} (experiment id {rep.experiment_id}); trials nested under it",
              *(["  plots:"] if rep.plots else []), *(f"    {path}" for path in rep.plots.values())]
    typer.echo("\n".join(lines))
    if result.full is not None:
        _summary(result.full, state)
    else:
        uri = settings.mlflow_tracking_uri(state)
        typer.echo("\n".join(["  open the UIs:", *[f"    {c}" for c in settings.ui_commands(state, uri)], ""]))


@app.command()
def crossvalidate(recipe: Path = typer.Argument(..., help="Recipe YAML file with data.balance.kfolds >= 2."),
                  set_: list[str] = typer.Option([], "--set", help=SET_HELP)) -> None:
    """k-fold cross-validation: stages 2-5 once per fold of the training split; nothing is registered."""
    from tunewright.platform import settings

    r = _load(recipe, set_)
    if r.data.balance.kfolds < 2:
        typer.secho(f"{recipe}: crossvalidate needs data.balance.kfolds >= 2 (e.g. --set data.balance.kfolds=5)",
                    fg=typer.colors.RED, err=True)
        raise typer.Exit(2)
    state = settings.state_dir(r.tracking.state_dir)
    settings.configure(state, r.tracking.tracking_uri)
    _quiet_libraries()
    _server_stops_with_us()
    from flows.crossvalidate import crossvalidate as run_folds

    result = run_folds(recipe=r)
    main = result.folds[0].metric
    lines = [f"{len(result.folds)}-fold cross-validation of '{r.name}' (MLflow run {result.context.parent_run_id}):"]
    for who, figures in result.summary.items():
        lines.append(f"  {who:6s} " + ", ".join(f"{m} {v['mean']:.3f} ± {v['std']:.3f}" for m, v in figures.items()
                                                 if m in (main, "answer_loss", "perplexity") or not m.startswith("field_")))
    typer.echo("\n".join(lines))


@app.command()
def monitor(recipe: Path = typer.Argument(..., help="Recipe YAML file whose model's served traffic is judged."),
            set_: list[str] = typer.Option([], "--set", help=SET_HELP),
            request_log: str | None = typer.Option(None, "--request-log", help="Where `tunewright serve --request-log` "
                                                   "wrote (default: the recipe's monitor.request_log)."),
            window_end: str | None = typer.Option(None, "--window-end", help="End of the window judged: `now`, or "
                                                  "seconds since the epoch (default: the end of the last whole "
                                                  "window).")) -> None:
    """Stage 7 on served traffic: judge one window of the request log and, on drift or a service-level breach,
    emit one drift event (the `retrain-on-drift` deployment of `tunewright deploy` is triggered by it); where a
    challenger meets live traffic, promote it or roll it back on the same traffic."""
    import time

    from tunewright.platform import settings

    r = _load(recipe, set_)
    if window_end is None:
        end = None
    elif window_end == "now":
        end = time.time()
    else:
        try:
            end = float(window_end)
        except ValueError:
            typer.secho(f"--window-end: `now` or seconds since the epoch, not {window_end!r}", fg=typer.colors.RED,
                        err=True)
            raise typer.Exit(2) from None
    state = settings.state_dir(r.tracking.state_dir)
    settings.configure(state, r.tracking.tracking_uri)
    _quiet_libraries()
    _server_stops_with_us()
    from flows.monitor import monitor as judge

    try:
        verdict = judge(recipe_path=str(recipe), overrides=list(set_), request_log=request_log, window_end=end)
    except (FileNotFoundError, ValueError) as exc:
        typer.secho(f"monitor: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None
    event = "event emitted" if verdict.emitted else (f"no event: {verdict.suppressed}" if verdict.suppressed else
                                                     "no event")
    typer.echo(f"window {verdict.key}: {'; '.join(verdict.reasons) or 'quiet: no drift, within service levels'}\n"
               f"  {event}; summary {verdict.summary_path}; requests exported to {verdict.window_path}")
    if verdict.canary is not None and verdict.canary.decision != "none":
        typer.echo(f"canary {verdict.canary.key}: {verdict.canary.decision}: {'; '.join(verdict.canary.reasons)}")


@app.command()
def replay(requests: Path = typer.Argument(..., help="JSONL of requests: `messages` (chat) or `prompt` per line."),
           url: str = typer.Option("http://127.0.0.1:8000/v1", "--url", help="The server's OpenAI API base URL."),
           model: str | None = typer.Option(None, "--model", help="Served model name (default: the first of "
                                            "/v1/models)."),
           concurrency: int = typer.Option(4, "--concurrency", min=1, help="Clients sending at once."),
           limit: int | None = typer.Option(None, "--limit", min=1, help="Send only the first N requests."),
           max_tokens: int = typer.Option(64, "--max-tokens", min=1),
           system_from: Path | None = typer.Option(None, "--system-from", help="A chat JSONL (e.g. the training "
                                                   "data) whose first system message is put before each bare "
                                                   "prompt, as the application sends it.")) -> None:
    """Send recorded requests to an OpenAI-compatible server (e.g. production traffic to `tunewright serve`) with the
    official openai client, and report throughput, latency and errors. API key: TUNEWRIGHT_API_KEY."""
    from tunewright.replay import ReplayError, replay as send

    try:
        result = send(requests, url=url, model=model, concurrency=concurrency, limit=limit, max_tokens=max_tokens,
                      system_from=system_from, progress=typer.echo)
    except ReplayError as exc:
        typer.secho(f"replay: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    typer.echo(f"{result['sent']} requests to {result['model']} in {result['seconds']:.1f} s "
               f"({result['req_per_s']:.2f} req/s): {result['ok']} answered, {result['errors']} failed; latency p50 "
               f"{result['p50_seconds']:.2f} s, p95 {result['p95_seconds']:.2f} s")
    if result["errors"]:
        for message in result["first_errors"]:
            typer.secho(f"  {message}", fg=typer.colors.YELLOW, err=True)
        raise typer.Exit(1)


@app.command()
def up(prefect_port: int = typer.Option(4200, "--prefect-port"), mlflow_port: int = typer.Option(5000, "--mlflow-port"),
       database: str | None = typer.Option(None, "--database", help="A PostgreSQL server, postgresql://user@host:5432: "
                                           "Prefect uses its database `prefect`, MLflow `mlflow` (created if missing; "
                                           "a path names a prefix: .../team gives team_prefect, team_mlflow). The "
                                           "password: --database-password-file, $TUNEWRIGHT_DATABASE_PASSWORD, "
                                           "$PGPASSWORD or ~/.pgpass (default: SQLite in the state folder)."),
       database_password_file: Path | None = typer.Option(None, "--database-password-file", help="A file holding "
                                                          "the database password, readable by its owner only "
                                                          "(chmod 600)."),
       artifacts: str | None = typer.Option(None, "--artifacts", help="Where MLflow keeps artifacts, e.g. s3://bucket/"
                                            "prefix (credentials and AWS_ENDPOINT_URL / MLFLOW_S3_ENDPOINT_URL from "
                                            "the environment; default: the state folder).")) -> None:
    """Start a Prefect server and an MLflow server on this machine for the state folder, and print their URLs."""
    from tunewright.platform import database as db
    from tunewright.platform import services, settings

    server = None
    if database:
        try:
            server = db.parse(database, database_password_file)
        except ValueError as exc:
            typer.secho(str(exc), fg=typer.colors.RED, err=True)
            raise typer.Exit(2) from None
        if server.password_in_url:
            typer.secho("warning: the password in --database stays in shell history and shows in `ps` while this "
                        f"command runs; prefer ${db.PASSWORD_ENV} or --database-password-file", fg=typer.colors.YELLOW,
                        err=True)
    elif database_password_file is not None:
        typer.secho("--database-password-file needs --database", fg=typer.colors.RED, err=True)
        raise typer.Exit(2)
    state = settings.state_dir()
    try:
        info = services.up(state, prefect_port=prefect_port, mlflow_port=mlflow_port, database=server,
                           artifacts=artifacts)
    except (RuntimeError, TimeoutError) as exc:
        typer.secho(str(exc), fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None
    s = info["servers"]
    typer.echo("\n".join([
        ("already running" if info.get("already") else "started") + f" for state folder {state}:",
        f"  Prefect UI   {s['prefect']['url']}", f"  MLflow UI    {s['mlflow']['url']}",
        f"  database     {info['database']}, artifacts {info['artifacts']}",
        "next: tunewright deploy, then tunewright worker (every tunewright command in this state folder uses them);",
        "      tunewright down stops them"]))


@app.command()
def down() -> None:
    """Stop the servers `tunewright up` started for the state folder."""
    from tunewright.platform import services, settings

    stopped = services.down(settings.state_dir())
    typer.echo("stopped " + ", ".join(stopped) if stopped else "nothing to stop: `tunewright up` is not running here")


def _platform_env() -> dict[str, str]:
    """The environment for Prefect commands against the servers of this state folder (or PREFECT_API_URL)."""
    import os

    from tunewright.platform import services, settings

    state = settings.state_dir()
    env = dict(os.environ, TUNEWRIGHT_HOME=str(state), TUNEWRIGHT_REPO_DIR=str(_repo()),
               PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="true", MLFLOW_DISABLE_TELEMETRY="true")
    for key, value in services.environment(state).items():
        env.setdefault(key, value)
    if not env.get("PREFECT_API_URL"):
        typer.secho("no Prefect server: run `tunewright up` first (or set PREFECT_API_URL)", fg=typer.colors.RED,
                    err=True)
        raise typer.Exit(2)
    return env


def _repo() -> Path:
    root = Path(__file__).resolve().parents[1]
    if not (root / "prefect.yaml").is_file():
        typer.secho(f"{root}: no prefect.yaml; run from a clone of the repository (pip install -e .)",
                    fg=typer.colors.RED, err=True)
        raise typer.Exit(2)
    return root


@app.command()
def deploy(pool: str = typer.Option("tunewright", "--pool", help="The process work pool the deployments use."),
           gpus: int = typer.Option(1, "--gpus", help="Slots of the `gpu` concurrency limit: trainings on CUDA that "
                                    "may run at once (one per device)."),
           kubernetes_template: Path | None = typer.Option(
               None, "--kubernetes-template", help="Make the pool a Kubernetes work pool whose flow runs are Jobs "
               "of this base job template (infra/k8s/base-job-template.json: trainer image, GPUs, /dev/shm).")) -> None:
    """Create the work pool and register prefect.yaml's deployments on the server `tunewright up` started."""
    import subprocess
    import sys

    env = _platform_env()
    prefect = str(Path(sys.executable).with_name("prefect"))
    exists = subprocess.run([prefect, "work-pool", "inspect", pool], env=env, capture_output=True).returncode == 0
    if kubernetes_template is not None:
        if not kubernetes_template.is_file():
            typer.secho(f"--kubernetes-template: {kubernetes_template} not found", fg=typer.colors.RED, err=True)
            raise typer.Exit(2)
        args = (["update", pool] if exists else ["create", pool, "--type", "kubernetes"])
        subprocess.run([prefect, "work-pool", *args, "--base-job-template", str(kubernetes_template)], env=env,
                       check=True)
    elif not exists:
        subprocess.run([prefect, "work-pool", "create", pool, "--type", "process"], env=env, check=True)
    # one training per GPU at a time: fine-tuning holds slots of this global concurrency limit on CUDA
    if subprocess.run([prefect, "global-concurrency-limit", "inspect", "gpu"], env=env,
                      capture_output=True).returncode != 0:
        subprocess.run([prefect, "global-concurrency-limit", "create", "gpu", "--limit", str(max(1, gpus))],
                       env=env, check=True, capture_output=True)
    out = subprocess.run([prefect, "--no-prompt", "deploy", "--all"], env=env, cwd=_repo(), capture_output=True,
                         text=True)
    if out.returncode != 0:
        typer.secho(out.stdout[-3000:] + out.stderr[-3000:], fg=typer.colors.RED, err=True)
        raise typer.Exit(1)
    typer.echo(f"deployments registered on {env['PREFECT_API_URL'].removesuffix('/api')} (work pool '{pool}'); "
               "start a worker with: tunewright worker")


@app.command()
def worker(pool: str = typer.Option("tunewright", "--pool"),
           run_once: bool = typer.Option(False, "--run-once", help="Run the flow runs waiting now, then stop.")) -> None:
    """Start a process worker for the deployments, pointed at this state folder's servers."""
    import os
    import sys

    env = _platform_env()
    prefect = str(Path(sys.executable).with_name("prefect"))
    args = [prefect, "worker", "start", "--pool", pool] + (["--run-once"] if run_once else [])
    os.execve(prefect, args, env)


cluster_app = typer.Typer(help="A Ray cluster for stage 4 (the recipe's environment.cluster): nodes on this machine, "
                          "others joining with `ray start --address`.", no_args_is_help=True)
app.add_typer(cluster_app, name="cluster")


@cluster_app.command("up")
def cluster_up(nodes: int = typer.Option(1, "--nodes", min=1, help="Nodes on this machine: the head and N-1 more."),
               cpus_per_node: int | None = typer.Option(None, "--cpus-per-node", min=0, help="CPUs each node "
                                                          "offers (default: this machine's CPUs shared out)."),
               gpus_per_node: int = typer.Option(0, "--gpus-per-node", min=0, help="GPUs each node offers."),
               port: int = typer.Option(6379, "--port", help="The head's GCS port, the address nodes join."),
               client_port: int = typer.Option(10001, "--client-port", help="The Ray Client port "
                                               "(ray://HOST:PORT, for drivers outside the cluster).")) -> None:
    """Start a Ray head on this machine plus N-1 nodes joined to it, and print the address to use."""
    import os
    import socket

    from tunewright.platform import cluster

    with socket.socket() as sock:
        if sock.connect_ex(("127.0.0.1", port)) == 0:
            typer.secho(f"port {port} is in use (a Ray cluster already? `tunewright cluster status --address "
                        f"127.0.0.1:{port}`); choose another with --port", fg=typer.colors.RED, err=True)
            raise typer.Exit(2)
    cpus = cpus_per_node if cpus_per_node is not None else max(1, (os.cpu_count() or 1) // nodes)
    started = []
    try:
        head = cluster.start_head(port, cpus=cpus, gpus=gpus_per_node, client_port=client_port)
        started.append(head)
        for _ in range(nodes - 1):
            started.append(cluster.add_node(head.address, cpus=cpus, gpus=gpus_per_node))
        cluster.wait_for_nodes(head.address, nodes, timeout=60)
        listed = cluster.nodes(head.address)
    except cluster.ClusterError as exc:
        for node in reversed(started):
            cluster.kill_node(node)
        typer.secho(str(exc), fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None
    head_ip = next((n["ip"] for n in listed if n["head"]), "HEAD_IP")
    typer.echo("\n".join([
        f"started a Ray cluster of {nodes} node(s) on this machine, {cpus} CPU and {gpus_per_node} GPU each",
        "  the recipe's environment.cluster.address:",
        f"    auto                   (a flow run on this machine; or 127.0.0.1:{port})",
        f"    ray://{head_ip}:{client_port}  (a flow run on a machine outside the cluster)",
        "  add a node from another machine (the same image or environment, the storage folder mounted at the same "
        "path):",
        f"    ray start --address {head_ip}:{port} --num-gpus N",
        "  tunewright cluster status lists the nodes; tunewright cluster down stops every Ray process here"]))


@cluster_app.command("down")
def cluster_down(address: str | None = typer.Option(None, "--address", help="Stop only this machine's nodes of "
                                                    "the cluster at HOST:PORT (default: every Ray process on this "
                                                    "machine, `ray stop --force`).")) -> None:
    """Stop the Ray nodes on this machine (all of them: `ray stop --force`; with --address, that cluster's)."""
    from tunewright.platform import cluster

    try:
        cluster.stop(address)
    except cluster.ClusterError as exc:
        typer.secho(str(exc), fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None
    typer.echo(f"stopped this machine's nodes of the Ray cluster at {address}" if address
               else "stopped every Ray process on this machine")


@cluster_app.command("status")
def cluster_status(address: str | None = typer.Option(None, "--address", help="HOST:PORT (the GCS), ray://HOST:PORT "
                                                      "or auto (default: $RAY_ADDRESS, else auto: the cluster last "
                                                      "started on this machine).")) -> None:
    """List the cluster's nodes with their CPUs, GPUs and other resources."""
    import os

    from tunewright.platform import cluster

    address = address or os.environ.get("RAY_ADDRESS") or "auto"
    try:
        listed = cluster.nodes(address)
    except cluster.ClusterError as exc:
        typer.secho(str(exc), fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None
    alive = [n for n in listed if n["alive"]]
    lines = [f"Ray cluster at {address}: {len(alive)} alive node(s), "
             f"{sum(n['resources'].get('CPU', 0) for n in alive):g} CPU, "
             f"{sum(n['resources'].get('GPU', 0) for n in alive):g} GPU"]
    for n in sorted(listed, key=lambda n: (not n["alive"], not n["head"], n["ip"], n["port"])):
        res = n["resources"]
        extra = {k: v for k, v in res.items() if k not in ("CPU", "GPU", "memory", "object_store_memory")
                 and not k.startswith("node:") and not k.startswith("accelerator_type:")}
        lines.append(f"  {'head' if n['head'] else 'node'} {n['ip']}:{n['port']}  "
                     f"{'alive' if n['alive'] else 'dead '}  {res.get('CPU', 0):g} CPU  {res.get('GPU', 0):g} GPU  "
                     f"{res.get('memory', 0) / 2**30:.1f} GiB" + "".join(f"  {k}={v:g}" for k, v in extra.items()))
    typer.echo("\n".join(lines))


def _env_flag(name: str) -> bool:
    """Whether the environment variable `name` is set to true (`1` or `true`, any case), as vLLM reads its flags."""
    import os

    return os.environ.get(name, "").strip().lower() in ("1", "true")


def _server_stops_with_us() -> None:
    """Prefect's temporary server (used without PREFECT_API_URL) stops even when this process is killed."""
    import os

    if not os.environ.get("PREFECT_API_URL"):
        from tunewright.platform import prefect_server

        prefect_server.install()


def _quiet_libraries() -> None:
    """Per-step log lines are the progress display; library bars and deprecation notes are noise."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)


def _summary(result, state: Path) -> None:
    from tunewright.platform import settings

    s, d, m = result.scores, result.deployed, result.drift
    lines = [
        "",
        f"tunewright run '{result.context.recipe_name}' finished",
        f"  {s.metric} on {s.n_examples} held-out examples: base {s.base_score:.1%} -> fine-tuned {s.tuned_score:.1%}"
        f"  (answer loss {s.base_loss:.3f} -> {s.tuned_loss:.3f})",
        (f"  training: {result.trained.steps} steps in {result.trained.train_seconds:.0f}s, final loss {result.trained.final_loss:.4f}"
         if result.trained.steps else "  training: none (the merged adapter, as merged)"),
        f"  MLflow run: {result.context.parent_run_id} (experiment id {result.context.experiment_id})",
        f"  registered model: {d.registered_model} version {d.version}, alias '{d.alias}' ({d.reason})",
        f"  drift: {'DETECTED' if m.drift_detected else 'none'} ({m.drifted_share:.0%} of columns drifted)",
        "  reports:",
        f"    data gate   {result.data.report_path}",
        f"    evaluation  {s.report_path}",
        f"    drift       {m.report_path}",
        "  open the UIs:",
        *[f"    {c}" for c in settings.ui_commands(state, result.context.tracking_uri)],
        "",
    ]
    typer.echo("\n".join(lines))


@app.command()
def serve(
    models: list[str] = typer.Argument(..., help="Models to serve, each `NAME=REFERENCE` or a bare REFERENCE: a "
                                       "registered version models:/NAME@ALIAS or models:/NAME/VERSION (an adapter or a "
                                       "full fine-tune), a run's logged folder runs:/RUN_ID/PATH (e.g. a version's "
                                       "merged export), an adapter folder, s3://bucket/prefix, or a whole model "
                                       "folder. "
                                       "Clients pick one by its name as `model`."),
    base: Path | None = typer.Option(None, "--base", help="The base model folder (default: the base logged with the "
                                     "first registered adapter, else the folder the first adapter was trained over)."),
    serve_base: str | None = typer.Option(None, "--serve-base", help="Also answer as the base model, under this "
                                          "name."),
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(8000, "--port"),
    precision: str = typer.Option("fp32", "--precision", help="fp32, bf16 or fp16 weights."),
    quantize: str | None = typer.Option(None, "--quantize", help="8bit: int8 linear layers (CPU)."),
    batching: bool = typer.Option(True, "--batching/--no-batching", help="Continuous batching (transformers' "
                                  "engine); off: one request at a time through generate."),
    engine_kind: str = typer.Option("batching", "--engine", help="batching: transformers' continuous batching in "
                                    "this process; vllm: each model served by a vLLM process this server starts "
                                    "(GPU workers; vLLM in its own environment, its `vllm` command from "
                                    "TUNEWRIGHT_VLLM or the PATH)."),
    share_base: bool = typer.Option(True, "--share-base/--no-share-base", help="LoRA adapters over one base (two "
                                    "or more) share one copy of it and are batched together; off: each merged into "
                                    "a base of its own."),
    max_tokens: int = typer.Option(512, "--max-tokens", help="Longest answer a request may ask for (and the default)."),
    max_queue: int = typer.Option(256, "--max-queue", help="Requests in progress at once; more are answered 429."),
    max_body_bytes: int = typer.Option(1 << 20, "--max-body-bytes", help="Largest request body (413 above it)."),
    kv_cache_tokens: int = typer.Option(16384, "--kv-cache-tokens", help="Tokens the batching engine's KV cache "
                                        "holds across running requests (more wait their turn)."),
    cache_size: int = typer.Option(1024, "--cache-size", help="Greedy answers kept for identical requests (0: off)."),
    challenger_share: float = typer.Option(0.0, "--challenger-share", help="Share of the traffic for a served "
                                           "models:/NAME@ALIAS answered by NAME@challenger, for comparison "
                                           "(default: the model's own setting, `tunewright canary`)."),
    shadow: bool = typer.Option(False, "--shadow", help="NAME@challenger answers a copy of every request off the "
                                "user's path instead (logged with shadow: true); the user gets the alias's answer."),
    watch_interval: float = typer.Option(30.0, "--watch-interval", help="Seconds between checks of the served "
                                         "aliases; a moved alias is swapped in without dropping requests."),
    request_log: str | None = typer.Option(None, "--request-log", help="Where every request is logged for stage 7: "
                                           "a .jsonl file, a folder (a file per --log-rotate window) or "
                                           "s3://bucket/prefix."),
    log_rotate: int = typer.Option(3600, "--log-rotate", help="Seconds per request-log file or object window."),
    api_key_file: Path | None = typer.Option(None, "--api-key-file", help="API keys, one per line, in a file only "
                                             "its owner can read (chmod 600); added to TUNEWRIGHT_API_KEYS."),
    insecure: bool = typer.Option(False, "--insecure", help="Listen beyond loopback (--host 0.0.0.0) with no API "
                                  "key: anyone who reaches the port can use the models."),
    open_metrics: bool = typer.Option(False, "--open-metrics", help="/metrics answers without a key when the API "
                                      "has keys (for a scraper on a trusted network)."),
    allow_runtime_adapters: bool = typer.Option(False, "--allow-runtime-adapters", help="Clients may load a local "
                                                "adapter folder over the served base (POST /v1/load_lora_adapter) and "
                                                "unload one (POST /v1/unload_lora_adapter), as vLLM does; also on "
                                                "with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True."),
    log_raw_text: bool = typer.Option(False, "--log-raw-text", help="Write prompts and answers to the request log "
                                      "as sent, personal data included (default: e-mail addresses, card numbers, "
                                      "IBANs, IPs, SSNs and phone numbers become placeholders such as [EMAIL])."),
) -> None:
    """Serve fine-tuned models over an OpenAI-compatible API (chat, completions, streaming) with continuous
    batching. With API keys (TUNEWRIGHT_API_KEYS, comma-separated, or --api-key-file) clients send
    `Authorization: Bearer <key>`; beyond loopback the server refuses to start without keys unless --insecure."""
    import logging

    from tunewright.platform import settings
    from tunewright.serve.keys import api_keys, check_exposure

    try:
        keys = api_keys(api_key_file)
        check_exposure(host, keys, insecure)
    except ValueError as exc:
        typer.secho(f"serve: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None

    state = settings.state_dir()
    settings.configure(state)
    _quiet_libraries()
    from tunewright.serve.engine import EngineFailed
    from tunewright.serve.requestlog import RequestLog
    from tunewright.serve.wiring import describe, open_engine, run_server

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        engine, watcher = open_engine(models, str(base) if base else None, state / "adapters", serve_base=serve_base,
                                      challenger_share=challenger_share, shadow=shadow, precision=precision, quantize=quantize,
                                      batching=batching, max_queue=max_queue, cache_size=cache_size,
                                      watch_interval=watch_interval, kv_cache_tokens=kv_cache_tokens,
                                      engine_kind=engine_kind, share_base=share_base)
    except (ValueError, FileNotFoundError, EngineFailed) as exc:
        typer.secho(f"serve: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    for line in describe(engine, watcher):
        typer.echo(line)
    log_target = RequestLog(request_log, rotate_seconds=log_rotate, redact=not log_raw_text) if request_log else None
    typer.echo(f"OpenAI-compatible API on http://{host}:{port}/v1")
    if not keys:
        typer.echo("no API keys: anyone on this machine can call it (--api-key-file or TUNEWRIGHT_API_KEYS)")
    run_server(engine, watcher, host=host, port=port, max_tokens=max_tokens, request_log=log_target,
               max_body_bytes=max_body_bytes, api_keys=keys, open_metrics=open_metrics,
               runtime_adapters=allow_runtime_adapters or _env_flag("VLLM_ALLOW_RUNTIME_LORA_UPDATING"))


data_app = typer.Typer(help="Stage 1 on its own: read, clean, gate and account for a dataset.", no_args_is_help=True)
app.add_typer(data_app, name="data")

FORMATS_HELP = f"Record format: {', '.join(DATA_FORMATS)}."


@data_app.command("check")
def data_check(
    source: str = typer.Argument(..., help="A file, folder or s3://bucket/prefix, or a recipe whose data section is used."),
    format_: str = typer.Option("auto", "--format", help=FORMATS_HELP),
    recipe: Path | None = typer.Option(None, "--recipe", help="Take cleaning, balancing, split and gate settings from this recipe."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of the summary."),
    out: Path | None = typer.Option(None, "--out", help="Folder for the splits, quarantine and report (default: the state folder, by digest)."),
) -> None:
    """Run stage 1 alone (no model is loaded): exit 0 when the gate passes, 1 when it fails, 2 when unreadable."""
    import json
    import logging

    from tunewright.platform import settings
    from tunewright.recipe import DataConfig, SourceConfig

    if source.endswith((".yaml", ".yml")) and Path(source).is_file():
        r = _load(Path(source), set_)
        cfg, tokenizer, state_cfg = r.data, r.model.base, r.tracking.state_dir
    elif recipe is not None:
        r = _load(recipe, set_)
        cfg, tokenizer, state_cfg = r.data, r.model.base, r.tracking.state_dir
    else:
        cfg, tokenizer, state_cfg = None, None, None
    if not (source.endswith((".yaml", ".yml")) and Path(source).is_file()):
        try:
            src = SourceConfig(path=source, format=format_)
        except Exception as exc:
            _fail(as_json, f"{source}: {_first_error(exc)}", 2)
        base = cfg or DataConfig(path=source)
        cfg = base.model_copy(update={"path": None, "format": "auto", "sources": [src]})
    state = settings.state_dir(state_cfg)
    settings.configure(state)
    _quiet_libraries()
    from tasks.data import DataGateError, prepare
    from tasks.data.formats import FormatError
    from tasks.data.sources import SourceError

    log = logging.getLogger("tunewright.data")
    if not as_json:
        logging.basicConfig(level=logging.WARNING, format="%(message)s")
        log.setLevel(logging.INFO)
    try:
        summary = prepare(cfg, state, tokenizer=tokenizer, out=out, log=log, use_cache=out is None)
    except (SourceError, FormatError) as exc:
        _fail(as_json, str(exc), 2)
    except OSError as exc:  # e.g. the output folder or the state folder cannot be written
        _fail(as_json, f"{exc.filename or 'data check'}: {exc.strerror or exc}", 2)
    except DataGateError as exc:
        if exc.summary is None:
            _fail(as_json, str(exc), 1)
        summary = exc.summary
    if as_json:
        typer.echo(json.dumps(_public(summary), default=str))
    else:
        typer.echo(_text_summary(summary))
    raise typer.Exit(0 if summary["passed"] else 1)


def _first_error(exc: Exception) -> str:
    errors = getattr(exc, "errors", None)
    return errors()[0]["msg"].removeprefix("Value error, ") if callable(errors) else str(exc)


def _fail(as_json: bool, message: str, code: int):
    import json

    if as_json:
        typer.echo(json.dumps({"passed": False, "error": message}))
    else:
        typer.secho(message, fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _public(summary: dict) -> dict:
    keys = ("format", "kind", "digest", "passed", "cached", "rows_read", "rows_in", "rows_kept", "rows_quarantined",
            "duplicates_removed", "near_duplicates_removed", "redactions", "cleaning", "contaminated", "splits",
            "sources", "classes", "quarantine", "gate_reasons", "paths", "seconds")
    out = {k: summary.get(k) for k in keys}
    out["expectations"] = [{k: e[k] for k in ("expectation", "column", "success", "unexpected_count", "observed_value",
                                              "examples")} for e in summary["expectations"]]
    out["repairs"] = summary.get("repairs", [])[:200]
    return out


def _text_summary(s: dict) -> str:
    lines = [f"format: {s['format']} ({s['kind']})" + ("  [reused from an earlier check]" if s.get("cached") else "")]
    for name, src in s["sources"].items():
        lines.append(f"  {name}: {src['format']}, {src['rows_read']} rows read"
                     + (f", {src['rows_sampled_out']} left out by the mix" if src["rows_sampled_out"] else ""))
    lines.append("cleaning: " + (", ".join(f"{k} {v} rows" for k, v in s["cleaning"].items()) or "nothing changed"))
    lines.append("PII and secrets redacted: "
                 + (", ".join(f"{k} {v}" for k, v in s["redactions"].items()) or "none found"))
    if s.get("n_repairs"):
        lines.append(f"repairs: {s['n_repairs']} (see the report)")
    failed = [e for e in s["expectations"] if not e["success"]]
    lines.append(f"gate: {'PASSED' if s['passed'] else 'FAILED'}" + (f" ({len(failed)} expectations not met)" if failed else ""))
    for e in failed:
        what = f"{e['unexpected_count']} rows" if e["unexpected_count"] is not None else f"observed {e['observed_value']}"
        lines.append(f"  - {e['expectation']}{' on ' + repr(e['column']) if e['column'] else ''}: {what}"
                     + (f", e.g. {', '.join(e['examples'][:3])}" if e["examples"] else ""))
    for why in s["gate_reasons"]:
        lines.append(f"  - {why}")
    lines.append(f"rows: {s['rows_in']} in = {s['rows_kept']} kept + {s['rows_quarantined']} quarantined + "
                 f"{s['duplicates_removed']} duplicates + {s['near_duplicates_removed']} near duplicates")
    if s["contaminated"]:
        lines.append(f"contamination: {s['contaminated']} validation/test examples largely seen in training "
                     f"({s.get('contamination_action', 'remove')})")
    if s["passed"]:
        lines.append("splits: " + ", ".join(f"{k} {v}" for k, v in s["splits"].items()))
    if s.get("classes"):
        lines.append("classes: " + ", ".join(f"{k} {v}" for k, v in s["classes"]["distribution"].items()))
    for q in s["quarantine"][:10]:
        lines.append(f"  quarantined {'; '.join(q['reasons'])}")
    if len(s["quarantine"]) > 10:
        lines.append(f"  ... {len(s['quarantine']) - 10} more in {s['paths']['quarantine']}")
    lines.append(f"report: {s['paths']['report']}")
    lines.append(f"quarantine: {s['paths']['quarantine']}")
    return "\n".join(lines)


def _move(action: str, name: str, alias: str, **kwargs) -> None:
    from tunewright.platform import settings
    from tunewright.registry import aliases

    settings.configure(settings.state_dir())
    try:
        move = getattr(aliases, action)(name, alias=alias, **kwargs)
    except aliases.PromotionError as exc:
        typer.secho(str(exc), fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    typer.echo(f"{move.name}@{move.alias}: version {move.previous or '(none)'} -> {move.version} "
               f"({move.action} by {move.by}: {move.reason})")


@app.command()
def promote(name: str = typer.Argument(..., help="Registered model name."),
            version: str = typer.Argument(..., help="The version to promote."),
            reason: str = typer.Option(..., "--reason", help="Why; recorded on the version and in the alias history."),
            alias: str = typer.Option("champion", "--alias", help="The alias to move."),
            by: str | None = typer.Option(None, "--by", help="Who (default: your user name)."),
            force: bool = typer.Option(False, "--force", help="Promote a version whose gate failed.")):
    """Move an alias (champion by default) to a version that passed its gate, and record who and why."""
    _move("promote", name, alias, version=version, reason=reason, by=by, force=force)


@app.command()
def rollback(name: str = typer.Argument(..., help="Registered model name."),
             reason: str = typer.Option(..., "--reason", help="Why; recorded on the version and in the alias history."),
             to: str | None = typer.Option(None, "--to", help="The version to go back to (default: the one that "
                                           "held the alias before the current one)."),
             alias: str = typer.Option("champion", "--alias", help="The alias to move back."),
             by: str | None = typer.Option(None, "--by", help="Who (default: your user name).")):
    """Move an alias back to the version that held it before, and record who and why."""
    _move("rollback", name, alias, to=to, reason=reason, by=by)


@app.command()
def canary(name: str = typer.Argument(..., help="Registered model name."),
           share: float = typer.Option(0.1, "--share", help="Share of the served alias's traffic `challenger` answers "
                                       "(0 ends the canary setting)."),
           shadow: bool = typer.Option(False, "--shadow", help="The champion answers every user; the challenger "
                                       "answers a copy of each request off the user's path.")):
    """Let the model's `challenger` meet live traffic: `tunewright serve` following models:/NAME@ALIAS sends it
    this share (or, with --shadow, a copy of every request), and the monitoring flow promotes it or rolls it back on
    what it served (the recipe's deploy.canary margins, or their defaults)."""
    from mlflow.exceptions import MlflowException

    from tunewright.platform import settings
    from tunewright.registry.aliases import alias_holder
    from tunewright.registry.canary import set_canary

    settings.configure(settings.state_dir())
    try:
        setting = set_canary(name, share, "shadow" if shadow else "canary")
    except (ValueError, MlflowException) as exc:
        typer.secho(f"canary: {getattr(exc, 'message', exc)}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    if not setting:
        typer.echo(f"{name}: no canary; served aliases answer all their traffic")
        return
    challenger = alias_holder(name, "challenger")
    how = "a shadow copy of every request" if shadow else f"{share:.0%} of the traffic"
    typer.echo(f"{name}: {how} to its challenger ({f'version {challenger}' if challenger else 'none yet'}); "
               "servers following the alias apply it when they start")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
