"""Do two runs log the same values? Compares the scalars of two run directories, step by step, to the bit.

    python scripts/same_logs.py runs/a/<run> runs/b/<run>            # every tag of either run
    python scripts/same_logs.py --shared runs/ref/<run> runs/lab/<run>  # the tags both runs log

Timings (perf/*, charts/SPS) are left out. Prints the tags whose values differ (none: the runs are the same).
`--shared` compares a run of the reference with one of the lab, which logs more tags.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from plot import read_events  # noqa: E402

TIMINGS = ("perf/", "charts/SPS")


def differing_tags(run_a, run_b, shared=False):
    """(tags that differ, number of tags compared); with `shared`, only the tags that both runs log."""
    (a, _), (b, _) = read_events(run_a), read_events(run_b)
    tags = set(a) & set(b) if shared else set(a) | set(b)
    tags = sorted(tag for tag in tags if not tag.startswith(TIMINGS))
    same = lambda x, y: x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()  # NaN and -0.0 too
    return [tag for tag in tags if tag not in a or tag not in b or not (
        same(a[tag][0], b[tag][0]) and same(a[tag][1], b[tag][1]))], len(tags)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_a")
    parser.add_argument("run_b")
    parser.add_argument("--shared", action="store_true", help="compare only the tags that both runs log")
    cli = parser.parse_args()
    differ, compared = differing_tags(cli.run_a, cli.run_b, cli.shared)
    print(f"{compared} tags compared; {len(differ)} differ" + (": " + ", ".join(differ) if differ else ""))


if __name__ == "__main__":
    main()
