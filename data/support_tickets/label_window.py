"""Label an exported window of served support tickets for retraining.

Run: python data/support_tickets/label_window.py WINDOW.jsonl WINDOW.labelled.jsonl [--labels FILE]

The demo's labelling job, named in `recipes/demo.yaml` as `monitor.label_command`: the monitoring flow exports a
drifted window of `tunewright serve`'s traffic (`window.jsonl`) and runs it before it emits the drift event, so the
retrain that the event starts finds `window.labelled.jsonl` beside the export. Here the reviewer is
`production_labels.jsonl`, the correct answers the generator wrote for the production requests; with real traffic,
a labelling tool or a person writes the same file (training-format chat records). Requests with no label are left
out and counted, never guessed: the served answer is what the model already says, so it is never used as a label.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def user_text(record: dict) -> str | None:
    """The ticket text of a logged request: the last user message of a chat request, or a completion's prompt."""
    if isinstance(record.get("messages"), list):
        users = [m.get("content") for m in record["messages"] if isinstance(m, dict) and m.get("role") == "user"]
        return users[-1] if users else None
    return record.get("prompt")


def label_window(window: Path, out: Path, labels: Path) -> tuple[int, int]:
    """Write the labelled records of the window's requests to `out`; return (labelled, without a label)."""
    gold = {}
    with labels.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if line.strip():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise SystemExit(f"{labels} line {lineno}: not JSON ({exc.msg})") from None
                gold[user_text(rec)] = rec
    rows, missing, seen = [], 0, set()
    with window.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                text = user_text(json.loads(line))
            except json.JSONDecodeError as exc:
                raise SystemExit(f"{window} line {lineno}: not JSON ({exc.msg})") from None
            if text in gold and text not in seen:
                seen.add(text)
                rows.append({"id": f"window-{gold[text]['id']}", "messages": gold[text]["messages"]})
            elif text not in gold:
                missing += 1
    tmp = out.with_suffix(".part")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(out)  # whole or not at all: a retrain never reads half a file
    return len(rows), missing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("window", type=Path, help="the exported window (window.jsonl)")
    parser.add_argument("out", type=Path, help="where the labelled records go (window.labelled.jsonl)")
    parser.add_argument("--labels", type=Path, default=HERE / "production_labels.jsonl")
    args = parser.parse_args()
    labelled, missing = label_window(args.window, args.out, args.labels)
    print(f"labelled {labelled} requests of {args.window} into {args.out}; {missing} had no label")
    if not labelled:
        sys.exit(1)


if __name__ == "__main__":
    main()
