#!/usr/bin/env python
"""
Cost benchmark of RegionContrast (the package ``tools/benchmarks`` says what each part measures).

    python tools/benchmark.py                      # CPU, the full run (make bench)
    python tools/benchmark.py --quick --out /tmp/b.json
    python tools/benchmark.py --full-grid          # part 3 on every class count x bank size
    python tools/benchmark.py --device cuda        # GPU: full crop, AMP, adds part 5
"""
import sys

from benchmarks.cli import main

if __name__ == "__main__":
    sys.exit(main())
