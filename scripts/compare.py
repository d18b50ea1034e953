#!/usr/bin/env python3
"""The comparison: `python scripts/compare.py --methods fasp flap [--sparsities 0.1 0.2 0.3] [--profile quick|standard]
[--model smollm2-135m] [--out reports/]`. A thin entry over `fasp-bench run`."""

import sys

from fasp_bench.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]], script=True))
