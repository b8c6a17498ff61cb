"""Print the storage benchmark figures as JSON (same as ``smartbeam bench storage``)."""

import argparse
import json

from smartbeam.bench.storage import add_arguments, run

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    add_arguments(parser)
    print(json.dumps(run(parser.parse_args()), indent=2))
