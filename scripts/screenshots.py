"""Take screenshots of the platform's UIs for the docs, with headless Chromium.

Run: .venv/bin/python scripts/screenshots.py [--out docs/screenshots] [--home DIR] [--keep]

Needs Chromium and Playwright's Python package. Playwright drives the system's Chromium, so skip
`playwright install` (it downloads a browser):
    apt-get install -y chromium          # Debian; the binary is /usr/bin/chromium (or pass --chromium PATH)
    .venv/bin/pip install playwright

What it does, in a fresh state folder (a temporary one unless --home is given):
`tunewright up` on free ports, `tunewright deploy`, one short flow run of `tunewright-retrain/run-recipe`
(4 training steps, 8 evaluation examples; a few minutes on CPU) run by `tunewright worker --run-once`, then
`tunewright monitor` on a few hourly windows of made-up served traffic (in-distribution tickets first, then
production tickets, so the drift climbs), and `evidently ui` on the snapshots that leaves. It writes:
    prefect-form.png         Prefect UI: the custom-run form of tunewright-finetune/finetune, prefilled
    prefect-flow-run.png     Prefect UI: the finished fine-tuning flow run, on its Artifacts tab
    mlflow-experiment.png    MLflow UI: the runs of experiment support-tickets, the stage runs expanded
    evidently-dashboard.png  evidently UI: the drift dashboard of the served model's project
Everything it started is stopped at the end (--keep leaves the servers running and prints how to stop them).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = "recipes/demo.yaml"
EXPERIMENT = "support-tickets"
MODEL = "support-ticket-json"
QUICK = ["train.max_steps=4", "evaluate.max_examples=8", "deploy.verify_samples=1", f"tracking.experiment={EXPERIMENT}"]
VIEWPORT = {"width": 1400, "height": 900}
INSTALL = ("apt-get install -y chromium   (Debian; or pass --chromium PATH)\n"
           "  .venv/bin/pip install playwright   (do not run `playwright install`: the system Chromium is used)")


class Failed(Exception):
    """A step that did not work; the message says which and where its log is."""


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def check_requirements(chromium: str | None) -> str:
    """The Chromium binary to drive; exits with the install steps when it or Playwright is missing."""
    missing = []
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("the playwright Python package")
    found = chromium or shutil.which("chromium") or shutil.which("chromium-browser")
    if not found or not Path(found).exists():
        missing.append(f"Chromium ({chromium or 'chromium on PATH'})")
    if missing:
        raise SystemExit(f"screenshots: missing {' and '.join(missing)}; install with\n  {INSTALL}")
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tool(name: str) -> str:
    """A console script of this virtual environment (beside the running Python), else from PATH."""
    beside = Path(sys.executable).with_name(name)
    found = str(beside) if beside.exists() else shutil.which(name)
    if not found:
        raise SystemExit(f"screenshots: no `{name}` beside {sys.executable} or on PATH; run with the project's "
                         ".venv/bin/python after `make install`")
    return found


def stop_group(proc: subprocess.Popen, grace: float = 15.0) -> None:
    """Stop a process started in its own session, and its children."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def run(cmd: list[str], env: dict, logfile: Path, timeout: float, what: str) -> str:
    """Run a command to its end with its output in `logfile`; kill it and its children on timeout or Ctrl-C."""
    logfile.parent.mkdir(parents=True, exist_ok=True)
    with logfile.open("ab") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            code = proc.wait(timeout)
        except BaseException:
            stop_group(proc, grace=5)
            raise
    text = logfile.read_text(errors="replace")
    if code != 0:
        raise Failed(f"{what} exited with {code}; see {logfile}:\n{text[-2500:]}")
    return text


def http(url: str, body: dict | None = None) -> dict | list:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"},
                                 method="GET" if body is None else "POST")
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    from tunewright.platform.services import wait_http as wait

    try:
        wait(url, timeout, proc)
    except (RuntimeError, TimeoutError) as exc:
        raise Failed(str(exc)) from None


# --- the platform ---------------------------------------------------------------------------------------------

def child_env(home: Path, prefect_port: int) -> dict:
    """The environment of every command: this state folder's servers, not the caller's, and one thread each."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL")}
    env.update(TUNEWRIGHT_HOME=str(home), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               DO_NOT_TRACK="1", PREFECT_SERVER_ANALYTICS_ENABLED="false", MLFLOW_DISABLE_TELEMETRY="true",
               PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT="false")
    return env


def finished_flow_run(prefect: str, env: dict, home: Path) -> str:
    """Run the quick recipe through the run-recipe deployment; the id of the flow run holding its artifacts."""
    deployment = http(f"{prefect}/api/deployments/name/tunewright-retrain/run-recipe")
    flow_run = http(f"{prefect}/api/deployments/{deployment['id']}/create_flow_run",
                    {"parameters": {"recipe_path": RECIPE, "overrides": QUICK}})
    log(f"flow run {flow_run['name']} created; running it with `tunewright worker --run-once` (a few minutes)")
    worker_log = home / "logs" / "worker.log"
    run([tool("tunewright"), "worker", "--run-once"], env, worker_log, 3600, "tunewright worker --run-once")
    state = http(f"{prefect}/api/flow_runs/{flow_run['id']}")["state_type"]
    if state != "COMPLETED":
        raise Failed(f"flow run {flow_run['name']} ended {state}; see {worker_log}")
    # retrain() runs the fine-tuning flow as a subflow: its run holds the per-stage artifacts
    children = http(f"{prefect}/api/flow_runs/filter",
                    {"flow_runs": {"parent_flow_run_id": {"any_": [flow_run["id"]]}}})
    return children[0]["id"] if children else flow_run["id"]


def write_traffic(path: Path, windows: int, now: float) -> list[float]:
    """A request log of `windows` hourly windows ending now, drifting from training-like tickets to production
    tickets; the window ends, oldest first."""
    def chat_pairs(file: str) -> list[tuple[str, str]]:
        pairs = []
        for line in (REPO / file).read_text(encoding="utf-8").splitlines():
            if line.strip():
                messages = json.loads(line)["messages"]
                pairs.append((next(m["content"] for m in messages if m["role"] == "user"), messages[-1]["content"]))
        return pairs

    familiar = chat_pairs("data/support_tickets/tickets.jsonl")
    novel = chat_pairs("data/support_tickets/production_labels.jsonl")
    rng = random.Random(0)
    per_window, records, ends = 120, [], []
    for w in range(windows):
        end = now - (windows - 1 - w) * 3600
        ends.append(end)
        share = w / max(windows - 1, 1)  # of production tickets: none in the oldest window, all in the newest
        for i in range(per_window):
            prompt, answer = rng.choice(novel) if rng.random() < share else rng.choice(familiar)
            when = end - 3590 + i * 3580 / per_window
            records.append({"time": datetime.fromtimestamp(when, tz=UTC).isoformat().replace("+00:00", "Z"),
                            "registered_model": MODEL, "version": "1", "prompt": prompt, "answer": answer,
                            "status": 200, "latency_ms": round(rng.uniform(500, 900 + 400 * share))})
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return ends


# --- the browser ----------------------------------------------------------------------------------------------

@contextmanager
def browser_page(chromium: str):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, headless=True)
        try:
            page = browser.new_page(viewport=VIEWPORT, color_scheme="light")
            page.set_default_timeout(60_000)
            yield page
        finally:
            browser.close()


def settle(page, extra_ms: int = 2000) -> None:
    """Let requests finish and charts draw: network idle (not all UIs ever get there), then a little more."""
    from playwright.sync_api import TimeoutError as PageTimeout

    try:
        page.wait_for_load_state("networkidle", timeout=10_000)
    except PageTimeout:  # MLflow and Prefect keep polling
        pass
    page.wait_for_timeout(extra_ms)


def shoot(page, path: Path, max_height: int = 900) -> Path:
    """Screenshot the page, grown to its content's height up to `max_height` (UIs that scroll inside a pane are
    grown by the window, so their sidebars reach the bottom)."""
    height = page.evaluate("Math.max(document.documentElement.scrollHeight, document.body.scrollHeight)")
    page.set_viewport_size({"width": VIEWPORT["width"], "height": max(VIEWPORT["height"], min(height, max_height))})
    page.wait_for_timeout(1000)
    page.evaluate("document.activeElement && document.activeElement.blur()")
    page.screenshot(path=str(path), animations="disabled")
    page.set_viewport_size(VIEWPORT)
    log(f"wrote {path} ({path.stat().st_size // 1024} KB)")
    return path


def best_effort(what: str, action) -> None:
    try:
        action()
    except Exception as exc:
        log(f"note: could not {what} ({type(exc).__name__}: {str(exc).splitlines()[0]}); taking the page as it is")


def prefect_shots(page, prefect: str, flow_run_id: str, out: Path) -> list[Path]:
    ui = http(f"{prefect}/ui-settings")
    base = (ui.get("v2_base_url") or "/v2") if ui.get("default_ui") == "v2" else ""
    base = prefect + base.rstrip("/")
    deployment = http(f"{prefect}/api/deployments/name/tunewright-finetune/finetune")

    page.goto(f"{base}/deployments/deployment/{deployment['id']}/run", wait_until="load")
    # the form is drawn once the deployment's parameters load: wait for the recipe's name in a field
    page.wait_for_function("() => [...document.querySelectorAll('input, textarea')]"
                           ".some(e => e.value === 'support-tickets-demo')")
    settle(page)
    shots = [shoot(page, out / "prefect-form.png", max_height=1500)]

    page.goto(f"{base}/runs/flow-run/{flow_run_id}?tab=Artifacts", wait_until="load")
    page.get_by_text("data-gate", exact=True).first.wait_for()
    page.get_by_text("Completed").first.wait_for()
    settle(page, 3000)  # the run graph draws on a canvas after the data arrives
    shots.append(shoot(page, out / "prefect-flow-run.png", max_height=1400))
    return shots


def mlflow_shot(page, mlflow: str, out: Path) -> Path:
    found = http(f"{mlflow}/api/2.0/mlflow/experiments/get-by-name?experiment_name={EXPERIMENT}")
    experiment_id = found["experiment"]["experiment_id"]
    # the runs list of the model-training view (3.x opens an experiment on its GenAI overview otherwise)
    page.goto(f"{mlflow}/#/experiments/{experiment_id}/runs?workflowType=machine_learning", wait_until="load")
    page.get_by_text("support-tickets-demo").first.wait_for()
    settle(page)
    best_effort("close the assistant panel", lambda: page.get_by_role("button", name="Close").click(timeout=5000))

    def expand_stages():
        row = page.locator("[role=row]", has_text="support-tickets-demo").first
        row.locator('button[data-component-id*="runnamecellrenderer"]').click(timeout=5000)
        page.get_by_text("4-fine-tune").first.wait_for(timeout=20_000)
    best_effort("expand the stage runs", expand_stages)

    def pick_columns():
        page.get_by_role("button", name="Columns").click(timeout=5000)
        menu = page.locator("[data-radix-popper-content-wrapper]")
        search = page.get_by_placeholder("Search columns")
        # off: Dataset and Source (wide); on: the headline metrics
        for name in ["Dataset", "Source", "base_json_exact_match", "tuned_json_exact_match", "final_train_loss",
                     "drifted_share"]:
            search.fill(name)
            page.wait_for_timeout(400)
            menu.get_by_text(name, exact=True).first.click(timeout=5000)
        page.keyboard.press("Escape")
    best_effort("choose the columns", pick_columns)
    settle(page, 1500)
    return shoot(page, out / "mlflow-experiment.png")


def evidently_shot(page, url: str, out: Path) -> Path:
    projects = http(f"{url}/api/projects")
    project = next((p for p in projects if p["name"] == f"tunewright {MODEL}"), None)
    if project is None:
        raise Failed(f"evidently: no project 'tunewright {MODEL}' in the workspace (found "
                     f"{[p['name'] for p in projects]})")
    page.goto(f"{url}/projects/{project['id']}", wait_until="load")
    page.get_by_text("Share of drifted columns").first.wait_for()
    page.locator("svg [class*=MuiLineElement], svg [class*=MuiMarkElement]").first.wait_for(state="attached")
    settle(page, 3000)
    return shoot(page, out / "evidently-dashboard.png", max_height=1400)


# --- main -----------------------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "screenshots", help="Folder for the PNGs.")
    parser.add_argument("--home", type=Path, help="State folder (TUNEWRIGHT_HOME) to use; default: a new "
                        "temporary one, removed at the end unless something failed or --keep.")
    parser.add_argument("--keep", action="store_true", help="Leave the servers (and evidently ui) running.")
    parser.add_argument("--windows", type=int, default=3, help="Hourly windows of served traffic to judge "
                        "(each is a `tunewright monitor` run of about a minute or two).")
    parser.add_argument("--chromium", help="Chromium binary (default: chromium on PATH).")
    args = parser.parse_args()

    chromium = check_requirements(args.chromium)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    temporary = args.home is None
    home = Path(tempfile.mkdtemp(prefix="tunewright-screenshots-")) if temporary else args.home.resolve()
    home.mkdir(parents=True, exist_ok=True)
    prefect_port, mlflow_port, evidently_port = free_port(), free_port(), free_port()
    env = child_env(home, prefect_port)
    tunewright = tool("tunewright")
    logs = home / "logs"
    started = time.monotonic()
    evidently = None
    ok = False
    log(f"state folder {home}")
    try:
        run([tunewright, "validate", RECIPE, *[a for o in QUICK for a in ("--set", o)]], env, logs / "validate.log",
            120, "tunewright validate")
        log(f"starting Prefect (port {prefect_port}) and MLflow (port {mlflow_port}) with `tunewright up`")
        run([tunewright, "up", "--prefect-port", str(prefect_port), "--mlflow-port", str(mlflow_port)], env,
            logs / "up.log", 600, "tunewright up")
        services = json.loads((home / "services.json").read_text())["servers"]
        prefect, mlflow = services["prefect"]["url"], services["mlflow"]["url"]
        log("registering the deployments with `tunewright deploy`")
        run([tunewright, "deploy"], env, logs / "deploy.log", 600, "tunewright deploy")
        flow_run_id = finished_flow_run(prefect, env, home)
        log("flow run finished; taking the Prefect and MLflow screenshots")
        shots = []
        with browser_page(chromium) as page:
            shots += prefect_shots(page, prefect, flow_run_id, out)
            shots.append(mlflow_shot(page, mlflow, out))

        traffic = home / "requests.jsonl"
        ends = write_traffic(traffic, args.windows, time.time() - 5)
        for i, end in enumerate(ends, 1):
            log(f"judging window {i} of {len(ends)} with `tunewright monitor`")
            run([tunewright, "monitor", RECIPE, "--request-log", str(traffic), "--window-end", f"{end:.3f}"], env,
                logs / "monitor.log", 1800, "tunewright monitor")
        with (logs / "evidently-ui.log").open("ab") as ui_log:
            evidently = subprocess.Popen([tool("evidently"), "ui", "--workspace", str(home / "evidently"), "--port",
                                          str(evidently_port)], env=env, cwd=home, stdin=subprocess.DEVNULL,
                                         stdout=ui_log, stderr=subprocess.STDOUT, start_new_session=True)
        evidently_url = f"http://127.0.0.1:{evidently_port}"
        wait_http(f"{evidently_url}/api/projects", 120, evidently)
        with browser_page(chromium) as page:
            shots.append(evidently_shot(page, evidently_url, out))
        ok = True
    except Failed as exc:
        raise SystemExit(f"screenshots: {exc}") from None
    finally:
        if args.keep:
            if evidently is not None:
                log(f"evidently ui left running on port {evidently_port}: kill -- -{evidently.pid}")
            log(f"servers left running: TUNEWRIGHT_HOME={home} {tunewright} down")
        else:
            if evidently is not None:
                stop_group(evidently)
            subprocess.run([tunewright, "down"], env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, timeout=120, check=False)
            if ok and temporary:
                shutil.rmtree(home, ignore_errors=True)
        if not ok:
            log(f"state folder kept for its logs: {home}")
    log(f"done in {time.monotonic() - started:.0f} s:")
    for path in shots:
        print(f"  {path}")


if __name__ == "__main__":
    main()
