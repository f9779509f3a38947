"""The worker process: ``python -m benchmarks.worker '<json spec>'`` runs one measurement and
prints its result; see ``benchmarks.harness.worker``."""

import sys

from benchmarks.harness.worker import main

if __name__ == "__main__":
    sys.exit(main(sys.argv))
