"""Load a logged model in a fresh process and answer prompts: the check before registration.

Run: python -m tunewright.registry.verify MODEL_URI PROMPTS.json ANSWERS.json
PROMPTS.json is a list of prompts (strings), of message lists, or of input rows (objects, e.g. a reward
model's {"messages", "answer"}); ANSWERS.json gets the model's outputs.
"""

from __future__ import annotations

import json
import sys


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    import mlflow
    import pandas as pd

    uri, prompts_path, answers_path = argv
    prompts = json.load(open(prompts_path, encoding="utf-8"))
    model = mlflow.pyfunc.load_model(uri)
    if prompts and isinstance(prompts[0], dict):
        frame = pd.DataFrame(prompts)
    else:
        frame = pd.DataFrame({"messages" if prompts and isinstance(prompts[0], list) else "prompt": prompts})
    answers = model.predict(frame)
    json.dump(list(answers), open(answers_path, "w", encoding="utf-8"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
