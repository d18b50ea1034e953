"""fasp-bench harness: models, data, evaluation, serving, results and reports around `pruning`."""

__version__ = "0.1.0"
