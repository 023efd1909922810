"""Does the split into reference and lab change any run? Runs the single file of a commit before the split and the
lab of this checkout with the same flags and seed, and compares the scalars they both log, to the bit.

    python docs/research/split_check.py --out docs/split_check.csv              # the README's rows and the lab's levers
    python docs/research/split_check.py --before f55ef73 --steps 6144 --jobs 2 --only vit cnn

Each case is a set of flags run in the given configurations; every run is single-threaded on the CPU. The earlier
commit is checked out with `git worktree` under --logdir. Prints and writes one row per run pair: the tags both log
(timings left out) and those that differ (none: the split changed nothing in that run).
"""

import argparse
import csv
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "scripts"))
from same_logs import differing_tags  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
CONFIGURATIONS = {
    1: "--no-jepa --rl-grad --no-var-reg", 2: "--jepa --rl-grad --no-var-reg",
    3: "--jepa --no-rl-grad --no-var-reg", 4: "--jepa --no-rl-grad --var-reg",
}
ALL = (1, 2, 3, 4)
# name -> (flags, configurations, seed): the README's four 100k-step rows in every configuration, then each lab
# lever in configuration 3 (probes and pictures every 3 iterations, so that they are compared too)
LEVER = "--probe-every 3 --image-every 3"
CASES = {
    "vit": ("", ALL, 1),
    "vit-gap2-diffs": ("--frame-gap 2 --frame-diffs", ALL, 1),
    "cnn": ("--encoder cnn --lr-warmup-iters 0", ALL, 1),
    "cnn-gap2-diffs": ("--encoder cnn --lr-warmup-iters 0 --frame-gap 2 --frame-diffs", ALL, 1),
    "tubelets": (f"--tubelets {LEVER}", (3,), 2),
    "conv-stem": (f"--patch-embed conv {LEVER}", (3,), 2),
    "conv-stem-diffs": (f"--patch-embed conv --frame-diffs {LEVER}", (3,), 2),
    "tubelets-gap2-diffs": (f"--tubelets --frame-gap 2 --frame-diffs {LEVER}", (3,), 2),
    "frame-diffs": (f"--frame-diffs {LEVER}", (3,), 2),
    "frame-gap3": (f"--frame-gap 3 {LEVER}", (3,), 2),
    "no-ink": (f"--no-ink {LEVER}", (3,), 2),
    "no-final-ln": (f"--no-final-ln {LEVER}", (3,), 2),
    "cnn-no-ink-no-final-ln": (f"--encoder cnn --no-ink --no-final-ln {LEVER}", (3,), 2),
    "weight-decay": (f"--weight-decay 0.4 {LEVER}", (3,), 2),
    "fresh-targets": (f"--fresh-targets {LEVER}", (3,), 2),
    "ema-per-iteration": (f"--ema-per-iteration {LEVER}", (3,), 2),
}


def run(cwd, script, flags, logdir):
    """One single-threaded run; returns its run directory."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, script, *flags.split(), "--no-cuda", "--exp-name", "check", "--runs-dir", logdir],
                   cwd=cwd, env=env, check=True, stdout=subprocess.DEVNULL)
    return max((os.path.join(logdir, name) for name in os.listdir(logdir)), key=os.path.getmtime)  # the newest


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", default="f55ef73", help="a commit of the single file before the split")
    parser.add_argument("--steps", type=int, default=6144, help="--total-timesteps of every run")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--logdir", default="runs/split_check")
    parser.add_argument("--only", nargs="*", choices=sorted(CASES), help="some of the cases")
    parser.add_argument("--out", help="a CSV to write")
    cli = parser.parse_args()
    logdir = os.path.abspath(cli.logdir)
    before_src = os.path.join(logdir, f"src_{cli.before}")
    if not os.path.isdir(before_src):
        subprocess.run(["git", "worktree", "add", "--detach", before_src, cli.before], cwd=ROOT, check=True)

    pairs = []
    for name in cli.only or CASES:
        flags, configurations, seed = CASES[name]
        for c in configurations:
            full = f"{CONFIGURATIONS[c]} {flags} --seed {seed} --total-timesteps {cli.steps}"
            pairs.append((name, c, seed, full))

    def check(pair):
        name, c, seed, full = pair
        where = os.path.join(logdir, f"{name}_config{c}")
        before = run(before_src, "jepa_ppo_cartpole.py", full, os.path.join(where, "before"))
        after = run(ROOT, "jepa_ppo_cartpole_lab.py", full, os.path.join(where, "after"))
        differ, compared = differing_tags(before, after, shared=True)
        return {"case": name, "configuration": c, "seed": seed, "flags": full, "tags_compared": compared,
                "tags_differing": " ".join(differ)}

    with ThreadPoolExecutor(cli.jobs) as pool:
        rows = list(pool.map(check, pairs))
    for row in rows:
        print(f"{row['case']:24s} configuration {row['configuration']}: {row['tags_compared']} tags compared, "
              f"{len(row['tags_differing'].split())} differ {row['tags_differing']}")
    if cli.out:
        with open(cli.out, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
