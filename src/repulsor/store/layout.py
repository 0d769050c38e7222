"""The names of the files in a run folder: the one list every reader and writer uses.

A run folder holds the resolved ``CONFIG``, the trained ``MODEL`` (its weights carry the
run's fingerprint), the ``PROTOTYPES`` of a prototype head, the evaluation ``RESULTS``, the
``TRAINING`` record (cost, selected epoch), the per-epoch ``METRICS``, a human ``LOG``, the
``LAST`` and ``BEST`` checkpoints and, while a process writes it, its ``LOCK``.
"""

CONFIG = "config.toml"
MODEL = "model.safetensors"
PROTOTYPES = "prototypes.safetensors"
RESULTS = "results.json"
TRAINING = "training.json"
METRICS = "metrics.jsonl"
LOG = "log.txt"
LAST = "checkpoints/last.safetensors"
BEST = "checkpoints/best.safetensors"
LOCK = ".lock"
EVAL_DIR = "eval"  # the cascade's resumable state, one file per suite

# A comparison folder (``repulsor compare --out``) holds one run folder per method and:
COMPARISON = "comparison.json"  # the plan, every run's numbers, the tables' data
TABLES = "tables.md"  # the tables as Markdown
