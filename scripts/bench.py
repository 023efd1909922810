"""Speed figures of the reference and the lab on this machine, printed, never asserted.

    python scripts/bench.py                 # drawing benchmark + a default 100k-step training run of the reference
    python scripts/bench.py --skip-training # drawing benchmark only
    python scripts/bench.py --script jepa_ppo_cartpole_lab.py --train-args=--tubelets   # the lab (note the "=")
    python scripts/bench.py --skip-drawing --script OTHER.py   # any other version of the file, for a comparison

1. frames/s of `render_cartpole` against Gymnasium's pygame `render()` + grayscale + area downsampling to
   the same 32 x 96 crop, one thread each, in this process;
2. a training run in a child process: wall clock, final charts/SPS, its peak resident memory, and (the lab only)
   the split of its time into rollout, update and diagnostics (the perf/* tags).
"""

import argparse
import glob
import os
import resource
import subprocess
import sys
import tempfile
import time

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import jepa_ppo_cartpole as jp  # noqa: E402


def random_states(n, seed=0):
    rng = np.random.default_rng(seed)
    return np.stack([rng.uniform(-2.4, 2.4, n), rng.uniform(-2, 2, n), rng.uniform(-0.21, 0.21, n), rng.uniform(-2, 2, n)], 1)


def bench_drawing(height, width, batch, seconds=3.0):
    torch.set_num_threads(1)
    states = torch.tensor(random_states(batch), dtype=torch.float32)
    jp.render_cartpole(states, height, width)  # warm-up
    frames, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        jp.render_cartpole(states, height, width)
        frames += batch
    ours = frames / (time.perf_counter() - start)

    env = gym.make("CartPole-v1", render_mode="rgb_array").unwrapped
    env.reset(seed=0)
    luma = torch.tensor([0.299, 0.587, 0.114])
    frames, start = 0, time.perf_counter()
    for state in random_states(10_000):
        env.state = state
        rgb = torch.from_numpy(env.render()[jp.CROP_TOP:jp.CROP_BOTTOM]).float()
        F.interpolate((rgb @ luma)[None, None], size=(height, width), mode="area")
        frames += 1
        if time.perf_counter() - start > seconds:
            break
    theirs = frames / (time.perf_counter() - start)
    env.close()
    return ours, theirs


def bench_training(script, extra_args):
    with tempfile.TemporaryDirectory() as workdir:
        start = time.time()
        subprocess.run([sys.executable, os.path.join(ROOT, script), "--exp-name", "bench", *extra_args],
                       cwd=workdir, check=True, stdout=subprocess.DEVNULL)
        wall = time.time() - start
        peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # Linux reports KiB
        (run_dir,) = glob.glob(os.path.join(workdir, "runs", "*"))
        acc = EventAccumulator(run_dir, size_guidance={"scalars": 0})
        acc.Reload()
        last = {tag: acc.Scalars(tag)[-1].value for tag in acc.Tags()["scalars"]}
    return wall, peak_mib, last


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--skip-drawing", action="store_true")
    parser.add_argument("--script", default="jepa_ppo_cartpole.py", help="the file to train with (relative to the root)")
    parser.add_argument("--train-args", default="", help="extra flags for the training run, e.g. '--total-timesteps 20000'")
    opts = parser.parse_args()

    print(f"machine: {os.cpu_count()} cores, torch {torch.__version__}, threads for training: {os.environ.get('OMP_NUM_THREADS', 'torch default')}")
    for batch in [] if opts.skip_drawing else [8, 64]:
        ours, theirs = bench_drawing(32, 96, batch)
        print(f"drawing 32x96, batch {batch:3d}, one thread: render_cartpole {ours:9.0f} frames/s | "
              f"Gymnasium render + downsample {theirs:6.0f} frames/s | ratio {ours / theirs:6.1f}x")
    if not opts.skip_training:
        wall, peak_mib, last = bench_training(opts.script, opts.train_args.split())
        print(f"training run of {opts.script}: wall clock {wall:.1f} s (start-up included), "
              f"final charts/SPS {last['charts/SPS']:.0f}")
        timed = {tag.split("/")[1][:-len("_seconds")]: value for tag, value in last.items() if tag.startswith("perf/")}
        if timed:
            print("time split: " + ", ".join(f"{name} {seconds:.1f} s ({100 * seconds / sum(timed.values()):.0f}%)"
                                              for name, seconds in timed.items()))
        print(f"peak resident memory of the training process: {peak_mib:.0f} MiB")
