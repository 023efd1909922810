"""Tests of the research log's one-off scripts (docs/research/), on event files written here or short runs:
`python -m pytest -q docs/research/research_test.py`."""

import importlib
import os
import subprocess
import sys

import numpy as np
import pytest

RESEARCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(RESEARCH))
sys.path.insert(0, ROOT)
from jepa_ppo_cartpole_test import script_module  # noqa: E402


def research_module(name):
    """A module of docs/research/ (compare, long_runs, pace_table, ...)."""
    sys.path.insert(0, RESEARCH)
    return importlib.import_module(name)


def test_compare_puts_each_sweep_of_a_configuration_on_its_own_row(tmp_path):
    compare, plot = research_module("compare"), script_module("plot")
    from torch.utils.tensorboard import SummaryWriter
    final = {("vit", 1): 100.0, ("vit", 2): 200.0, ("cnn", 1): 450.0, ("cnn", 2): 410.0}
    for (encoder, seed), value in final.items():
        writer = SummaryWriter(str(tmp_path / encoder / f"reproduce__nojepa-rlgrad-novar__s{seed}__1"))
        for step in range(5_000, 100_001, 5_000):  # the last two episodes end in 90k-100k
            writer.add_scalar("charts/episodic_return", value if step > 90_000 else 20.0, step)
            for tag in ["charts/SPS", "embedding/variance", "embedding/effective_rank", "losses/jepa_loss"]:
                writer.add_scalar(tag, 1.0, step)
            for name in plot.STATE_VARIABLES:
                for probe in plot.PROBES:
                    writer.add_scalar(f"probe/{probe}r2_{name}", 0.5, step)
        writer.close()
    sweeps = [("ViT", plot.load_sweep(str(tmp_path / "vit"))), ("CNN", plot.load_sweep(str(tmp_path / "cnn")))]
    table = compare.rows(sweeps).splitlines()
    assert table[2].startswith("| 1: RL gradient only | ViT | 1 2 | 150.0 +- 70.7 ")
    assert table[3].startswith("| 1: RL gradient only | CNN | 1 2 | 430.0 +- 28.3 ")
    assert len(table) == 4  # no row for configurations without runs


def test_long_runs_reads_each_run_to_its_own_horizon(tmp_path):
    long_runs = research_module("long_runs")
    from torch.utils.tensorboard import SummaryWriter

    def write_run(name, requested, last_step, episode_return, greedy=None):
        """An episode every 1k steps and at the run's last step, of return episode_return(step)."""
        writer = SummaryWriter(str(tmp_path / name))
        writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n|total_timesteps|{requested}|\n|num_envs|8|\n"
                                           "|num_steps|32|")
        for step in [*range(1_000, last_step, 1_000), last_step]:
            writer.add_scalar("charts/episodic_return", episode_return(step), step)
            writer.add_scalar("embedding/variance", 0.5 if step > 2_000 else 1e-9, step)
            writer.add_scalar("embedding/collapsed", float(step <= 2_000), step)
            writer.add_scalar("charts/SPS", 300, step)
        if greedy is not None:  # --capture-video logs the greedy episodes' mean return once, at the end
            writer.add_scalar("charts/greedy_return", greedy, last_step)
        writer.close()

    # 20 up to 90k, 30 in (90k, 100k], 20 again, 500 from 151k, 480 in (190k, 200k]: each window has its own value,
    # and the episodes at exactly 90k and 190k (outside the windows) another
    learner = lambda step: (30.0 if 90_000 < step <= 100_000 else 480.0 if step > 190_000 else 500.0 if step > 150_000
                            else 20.0)
    end_200k, end_195k = 200_000 // 256 * 256, 195_000 // 256 * 256  # the steps the runs really reach: whole batches
    write_run("long__jepa-rlgrad-novar__s1__1", 200_000, end_200k, learner, greedy=500.0)
    write_run("long__jepa-rlgrad-novar__s2__1", 200_000, end_200k,
              lambda step: 500.0 if step <= 3_000 else 20.0)  # lucky start
    write_run("long__nojepa-rlgrad-novar__s1__1", 195_000, end_195k,
              lambda step: 20.0)  # a shorter run of another configuration
    write_run("long__jepa-norlgrad-novar__s1__1", 200_000, 120_000, lambda step: 20.0)  # stopped early
    sweep, unfinished = long_runs.load(str(tmp_path))
    assert sorted(sweep) == ["jepa-rlgrad-novar", "nojepa-rlgrad-novar"]
    assert unfinished == ["jepa-norlgrad-novar s1 unfinished (running or stopped) at 120.0k of 199.9k: left out"]
    run = sweep["jepa-rlgrad-novar"][1]
    assert run["returns"] == {100_000: 30.0, 200_000: 480.0}
    # its own horizon, not the longest run's; and no window at 200k that would end after the run (at 194.8k)
    assert list(sweep["nojepa-rlgrad-novar"][1]["returns"]) == [100_000]
    # the running mean of 20 episodes (one per 1k steps) first reaches 475 when 19 of 20 are 500: at 169k
    assert run["to_475"] == 169_000 and run["to_400"] == 166_000
    assert np.isinf(sweep["jepa-rlgrad-novar"][2]["to_400"])  # three episodes of 500 are no full window of 20
    assert run["lowest_variance"] == pytest.approx(1e-9) and run["collapsed"] == pytest.approx(2 / 200)
    row = long_runs.table(sweep).splitlines()[3]
    # one seed of two never reached a threshold: the median over both seeds is "never" too. Seed 2's AUC by hand: the
    # running mean on the 101-point grid is 500, 500, 380, 260, 200, 164, 140, 122.9, 110, 100, 92, 44, then 89 x 20
    assert row == ("| 2: JEPA + RL gradient | 1 2 | 25.0 +- 5.0 | 250.0 +- 230.0 | 117.5 43.5: 80.5 +- 37.0 "
                   "| 166k - (1/2; -) | 169k - (1/2; -) | 1e-09 | 1% | 500.0 - |")

    write_run("long__nojepa-rlgrad-novar__s2__1", 200_000, end_200k,
              lambda step: 20.0)  # another length, same configuration
    with pytest.raises(SystemExit, match="must share their length"):
        long_runs.load(str(tmp_path))
    write_run("long__nojepa-rlgrad-novar__s2__1", 200_000, end_200k, lambda step: 20.0)  # ... and a rerun of seed 2
    with pytest.raises(SystemExit, match="must share their length|two finished runs"):
        long_runs.load(str(tmp_path))


def test_grad_scale_prints_the_first_row_of_the_research_log(tmp_path):
    """docs/research/grad_scale.py on seed 6: the policy loss's gradient on the encoder is thousands of times the
    smallest at the first update, as docs/RESULTS.md reports. The row is read back to a 1% tolerance, not to the digit:
    other CPUs round the floats of one update differently, far below that."""
    script = os.path.join(RESEARCH, "grad_scale.py")
    result = subprocess.run([sys.executable, script, "--seed", "6", "--iterations", "1", "--every", "1"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=240, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr
    logged = "| 1 | 256 | 0.0546 | 66.3 | 248 | 4542 | 3.74 |"
    with open(os.path.join(ROOT, "docs", "RESULTS.md")) as log:
        assert logged in log.read()
    numbers = lambda row: [float(cell) for cell in row.strip("| ").split(" | ")]
    assert numbers(result.stdout.splitlines()[2]) == pytest.approx(numbers(logged), rel=1e-2)


def test_pace_table_reads_each_cell_from_its_directory_name(tmp_path, capsys):
    pace_table = research_module("pace_table")
    from torch.utils.tensorboard import SummaryWriter
    for cell, configuration, variance in [("tau0-pace10", "jepa-norlgrad-novar", 1e-9),
                                          ("tau0.99-pace0.1", "jepa-norlgrad-novar", 0.5),
                                          ("tau0-closed", "jepa-norlgrad-novar", 0.5),
                                          ("tau0-pace1", "jepa-rlgrad-novar", 0.5)]:
        for seed in [6, 7]:
            writer = SummaryWriter(str(tmp_path / cell / f"reproduce__{configuration}__s{seed}__1"))
            for step in range(2_496, 49_921, 2_496):  # 20 logged iterations, to where a 50k run ends
                writer.add_scalar("charts/episodic_return", 20.0 * seed, step)
                writer.add_scalar("charts/SPS", 300, step)
                for tag in ["embedding/variance", "embedding/variance_pre_ln"]:
                    writer.add_scalar(tag, variance, step)
                writer.add_scalar("embedding/collapsed", float(variance < 1e-7), step)
                writer.add_scalar("embedding/effective_rank", 3.0, step)
                writer.add_scalar("losses/jepa_loss", 0.25, step)
            writer.close()
    os.makedirs(tmp_path / "tau0-pace10-old")
    cells = pace_table.load_cells(str(tmp_path), 50_000)
    assert [(c["configuration"], c["tau"], c["predictor"], c["pace"]) for c in cells] == [
        ("3", 0.99, "mlp", 0.1), ("3", 0.0, "mlp", 10.0), ("3", 0.0, "closed", 1.0), ("2", 0.0, "mlp", 1.0)]
    pace_table.print_table(cells)
    rows = capsys.readouterr().out.splitlines()
    assert rows[0] == "skipped, not a cell of the grid: " + os.path.join(str(tmp_path), "tau0-pace10-old", "")
    assert rows[3].startswith("| 3 | 0.99 | MLP, pace 0.1 | 6 7 | 130.0; 120 140 | ")
    assert rows[4].endswith("| 40/40 | 2/2 | 3.0, 3.0 | 2.5e-01 |")  # every iteration of both seeds collapsed
    assert rows[5].startswith("| 3 | 0 | linear, refit every step | 6 7 |")
    assert rows[5].endswith("| 0/40 | 0/2 | 3.0, 3.0 | 2.5e-01 |")
    pace_table.write_csv(cells, str(tmp_path / "pace.csv"))
    with open(tmp_path / "pace.csv") as f:
        assert [line.split(",")[2:4] for line in f.read().splitlines()[1:]] == [["mlp", "0.1"]] * 2 + [
            ["mlp", "10.0"]] * 2 + [["closed", "1.0"]] * 2 + [["mlp", "1.0"]] * 2


def test_ksteps_table_compares_each_k_with_k1_of_its_encoder_seed_by_seed(tmp_path):
    ksteps = research_module("ksteps")
    import jepa_ppo_cartpole_lab as lab
    from torch.utils.tensorboard import SummaryWriter
    # (cell, extra flags, {seed: return held over the run}): K = 3 beats K = 1 on seed 6 only; the CNN has no K = 1
    cells = [("vit_k1", {}, {6: 100.0, 7: 300.0}), ("vit_k3", {"jepa_steps": 3}, {6: 200.0, 7: 250.0}),
             ("cnn_k3", {"encoder": "cnn", "jepa_steps": 3}, {6: 480.0, 7: 480.0})]
    for cell, extra, returns in cells:
        for seed, value in returns.items():
            writer = SummaryWriter(str(tmp_path / cell / f"{cell}__jepa-rlgrad-novar__s{seed}__1"))
            flags = {**vars(lab.LabArgs()), "seed": seed, "cuda": False, **extra}
            writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in
                                                                                  flags.items()))
            for step in range(5_000, 100_001, 5_000):
                writer.add_scalar("charts/episodic_return", value, step)
                for tag in ["charts/SPS", "embedding/variance"]:
                    writer.add_scalar(tag, 1.0 if tag != "charts/SPS" else 300, step)
            writer.close()
    loaded = {cell["name"]: cell for cell in ksteps.load_cells(str(tmp_path))}
    assert {name: cell["k"] for name, cell in loaded.items()} == {"vit_k1": 1, "vit_k3": 3, "cnn_k3": 3}
    assert loaded["vit_k3"]["encoder"] == loaded["vit_k1"]["encoder"] != loaded["cnn_k3"]["encoder"]
    lines = ksteps.table(list(loaded.values())).splitlines()[2:]
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in lines}
    assert rows["vit_k3"][3] == "200.0 250.0" and rows["vit_k3"][4] == "225.0 +- 25.0"
    assert rows["vit_k3"][-1] == "1 of 2 seeds |" and rows["vit_k1"][-1] == " |" and rows["cnn_k3"][-1] == " |"
    assert rows["cnn_k3"][7] == "100.0k 100.0k" and rows["vit_k1"][8] == "- -"  # 400 and 475, after 20 episodes
    probes = ksteps.probe_table(list(loaded.values())).splitlines()
    assert len(probes) == 5 and all(line.endswith("| nan / nan | 1.0e+00 |") for line in probes[2:])  # no probes here
    csv_rows = ksteps.run_rows(list(loaded.values()))
    assert [row["command"] for row in csv_rows if row["cell"] == "vit_k3"] == [
        f"OMP_NUM_THREADS=1 python jepa_ppo_cartpole_lab.py --seed {seed} --no-cuda --jepa-steps 3" for seed in [6, 7]]
