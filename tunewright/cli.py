"""The `tunewright` command.

Run: tunewright run recipes/demo.yaml [--set train.max_steps=30 ...]
"""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(
    help="Fine-tune LLMs through the seven-stage lifecycle (Prefect flows, MLflow tracking and registry).",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
)

SET_HELP = "Override a recipe value: section.key=value (YAML value), repeatable. E.g. --set train.max_steps=30"


def _load(recipe: Path, overrides: list[str]):
    from tunewright.recipe import RecipeError, load_recipe

    try:
        return load_recipe(recipe, overrides)
    except RecipeError as exc:
        typer.secho(str(exc), fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None


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
    from tunewright import settings

    r = _load(recipe, set_)
    state = settings.state_dir(r.tracking.state_dir)
    settings.configure(state, r.tracking.tracking_uri)
    _quiet_libraries()
    from flows.finetune import finetune
    from tasks.data import DataGateError
    from tasks.deploy import VerificationError
    from tasks.environment import PreflightError
    from tunewright.tracking import NothingToResume

    try:
        result = finetune(recipe=r, resume=resume)
    except (DataGateError, VerificationError, PreflightError, NothingToResume, FileNotFoundError,
            ModuleNotFoundError) as exc:
        typer.secho(f"run stopped: {exc}", fg=typer.colors.RED, err=True)
        typer.secho("nothing was registered; the model registry is as it was.", err=True)
        raise typer.Exit(1) from None
    _summary(result, state)


def _quiet_libraries() -> None:
    """Per-step log lines are the progress display; library bars and deprecation notes are noise."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)


def _summary(result, state: Path) -> None:
    from tunewright import settings

    s, d, m = result.scores, result.deployed, result.drift
    lines = [
        "",
        f"tunewright run '{result.context.recipe_name}' finished",
        f"  {s.metric} on {s.n_examples} held-out examples: base {s.base_score:.1%} -> fine-tuned {s.tuned_score:.1%}"
        f"  (answer loss {s.base_loss:.3f} -> {s.tuned_loss:.3f})",
        f"  training: {result.trained.steps} steps in {result.trained.train_seconds:.0f}s, final loss {result.trained.final_loss:.4f}",
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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
