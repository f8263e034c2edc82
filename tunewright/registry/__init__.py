"""MLflow tracking and the model registry.

`tracking` opens the parent and stage runs; `pyfunc` is the registered model's MLflow pyfunc; `bases` stores
base weights once, content-addressed; `adapters` fetches adapters and records their lineage; `merging` folds
several adapters into one; `exports` writes merged and 8-bit exports; `verify` loads a logged model in a fresh
process before registration; `promotion_rules` parses and checks stage 6's gate rules; `aliases` moves
`champion` / `challenger` with a record of who and why.
"""
