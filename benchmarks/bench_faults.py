"""Inject faults for real and print what happened and what was lost (JSON)."""

import argparse
import json

from smartbeam.bench.faults import add_arguments, run

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    add_arguments(parser)
    parser.add_argument("--json", action="store_true", help="(output is always JSON)")
    print(json.dumps(run(parser.parse_args()), indent=2))
