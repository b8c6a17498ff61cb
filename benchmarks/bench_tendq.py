"""Robustness benchmark of the 10Dq estimator; prints JSON (see smartbeam.bench.tendq)."""

import argparse
import json

from smartbeam.bench.tendq import add_arguments, run

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    add_arguments(parser)
    print(json.dumps(run(parser.parse_args()), indent=2))
