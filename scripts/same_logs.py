"""Do two runs log the same values? Compares every scalar of two run directories, step by step, to the bit.

    python scripts/same_logs.py runs/a/<run> runs/b/<run>

Timings (perf/*, charts/SPS) are left out. Prints the tags whose values differ (none: the runs are the same).
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from plot import read_events  # noqa: E402

TIMINGS = ("perf/", "charts/SPS")


def differing_tags(run_a, run_b):
    (a, _), (b, _) = read_events(run_a), read_events(run_b)
    tags = sorted(tag for tag in set(a) | set(b) if not tag.startswith(TIMINGS))
    same = lambda x, y: x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()  # NaN and -0.0 too
    return [tag for tag in tags if tag not in a or tag not in b or not (
        same(a[tag][0], b[tag][0]) and same(a[tag][1], b[tag][1]))], len(tags)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_a")
    parser.add_argument("run_b")
    cli = parser.parse_args()
    differ, compared = differing_tags(cli.run_a, cli.run_b)
    print(f"{compared} tags compared; {len(differ)} differ" + (": " + ", ".join(differ) if differ else ""))


if __name__ == "__main__":
    main()
