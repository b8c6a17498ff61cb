"""STXM stacks, 10Dq maps and batch throughput; prints JSON (see smartbeam.bench.stxm)."""

import argparse
import json

from smartbeam.bench.stxm import add_arguments, run

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    add_arguments(parser)
    print(json.dumps(run(parser.parse_args()), indent=2))
