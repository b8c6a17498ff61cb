"""GP-adaptive XMCD benchmark: ``python benchmarks/bench_adaptive.py [--seeds N] [--quick]``.

Prints the JSON figures of :mod:`smartbeam.bench.adaptive`.
"""

import argparse
import json

from smartbeam.bench.adaptive import add_arguments, run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_arguments(parser)
    print(json.dumps(run(parser.parse_args()), indent=2))


if __name__ == "__main__":
    main()
