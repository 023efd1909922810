"""Tests of the scripts the README runs (scripts/plot.py, scripts/greedy.py), on event files written here:
`python -m pytest -q scripts/scripts_test.py`. scripts/same_logs.py is tested where it matters, in the lab's
tests: the lab against the reference, to the bit."""

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import jepa_ppo_cartpole as ref  # noqa: E402
import jepa_ppo_cartpole_lab as lab  # noqa: E402
from jepa_ppo_cartpole_test import script_module  # noqa: E402


def test_plot_statistics_iqm_and_t_interval():
    plot = script_module("plot")
    assert plot.iqm(np.array([1.0, 2, 3, 4, 100])) == 3.0  # the outlier and the lowest seed are cut
    assert plot.iqm(np.array([70.0, 0, 1, 2, 10, 11, 50, 60])) == (2 + 10 + 11 + 50) / 4  # not the median (10.5)
    half = 2.776 * np.sqrt(2.5) / np.sqrt(5)  # t(0.975, 4) s / sqrt(n), s^2 = 2.5
    assert plot.t_interval(np.array([1.0, 2, 3, 4, 5])) == pytest.approx([3 - half, 3 + half])
    curves_low, curves_high = plot.t_interval(np.array([[0.0, 10], [2, 10], [4, 10]]))  # per step
    assert curves_low[1] == curves_high[1] == 10 and curves_low[0] == pytest.approx(2 - 4.303 * 2 / np.sqrt(3))
    assert np.isnan(plot.t_interval(np.array([1.0]))).all()  # one seed: no interval (the README's quick look)
    assert plot.t_975(30) == 2.042 and plot.t_975(40) == pytest.approx(2.021, abs=1e-3)  # tables' 2.021


def test_final_return_is_the_episodes_ending_in_the_last_10k_steps_of_the_budget():
    plot = script_module("plot")
    steps, returns = np.array([89_840, 90_000, 90_256, 99_840]), np.array([0.0, 0.0, 100.0, 200.0])
    assert plot.final_return(steps, returns, 100_000) == 150.0  # (90k, 100k]: 90,000 itself is out
    assert np.isnan(plot.final_return(steps, returns, 50_000))


def test_plot_writes_each_runs_lowest_variance_collapsed_iterations_and_command(tmp_path):
    plot = script_module("plot")
    from torch.utils.tensorboard import SummaryWriter
    for seed, lowest in [(1, 3e-8), (2, 2e-3)]:
        writer = SummaryWriter(str(tmp_path / f"reproduce__jepa-norlgrad-novar__s{seed}__1"))
        flags = {**vars(lab.LabArgs()), "seed": seed, "rl_grad": False, "cuda": False, "exp_name": "reproduce"}
        writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in flags.items()))
        for step in range(5_000, 100_001, 5_000):
            variance = lowest if step == 50_000 else 0.5
            writer.add_scalar("charts/episodic_return", 30.0, step)
            for tag, value in [("embedding/variance", variance), ("embedding/collapsed", float(variance < 1e-7)),
                               ("charts/SPS", 300), ("embedding/effective_rank", 5.0), ("losses/jepa_loss", 1.0)]:
                writer.add_scalar(tag, value, step)
        writer.close()
    sweep = plot.load_sweep(str(tmp_path))
    rows = plot.run_rows(sweep)
    assert [(row["seed"], row["lowest_variance"], row["collapsed"], row["iterations"]) for row in rows] == [
        (1, pytest.approx(3e-8), 1, 20), (2, pytest.approx(2e-3), 0, 20)]
    assert rows[0]["command"] == "OMP_NUM_THREADS=1 python jepa_ppo_cartpole_lab.py --seed 1 --no-cuda --no-rl-grad"
    (summary,) = plot.table_rows(sweep)
    assert summary["lowest_embedding_variance_of_all_seeds"] == "3.0e-08" and summary["collapsed_iterations"] == "1/40"
    assert summary["final_return_mean_ci95"] == "[30.0, 30.0]"


def test_plot_refuses_two_runs_of_one_configuration_and_seed(tmp_path):
    plot = script_module("plot")
    from torch.utils.tensorboard import SummaryWriter
    for stamp in ["1", "2"]:  # a rerun: same configuration, same seed
        writer = SummaryWriter(str(tmp_path / f"reproduce__jepa-rlgrad-novar__s3__{stamp}"))
        writer.add_scalar("charts/SPS", 300, 100_000)
        writer.close()
    with pytest.raises(SystemExit) as exit_info:
        plot.load_sweep(str(tmp_path))
    assert "two finished runs" in str(exit_info.value.code) and "s3" in str(exit_info.value.code)


def test_greedy_table_reads_the_greedy_return_and_repeats_the_command(tmp_path):
    greedy = script_module("greedy")
    from torch.utils.tensorboard import SummaryWriter
    run_dir = tmp_path / "jepa_ppo_cartpole__jepa-rlgrad-novar__s4__1"
    writer = SummaryWriter(str(run_dir))
    flags = {**vars(ref.Args()), "seed": 4, "total_timesteps": 300_000, "capture_video": True, "cuda": False,
             "exp_name": "x", "runs_dir": "elsewhere"}
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in flags.items()))
    for step in range(10_000, 299_776, 10_000):  # ends at 290k: 60.0, then at the last step 100.0
        writer.add_scalar("charts/episodic_return", 60.0 if step <= 280_000 else 100.0, step)
    writer.add_scalar("charts/episodic_return", 0.0, 289_900)  # in the last 10k steps trained, not of the budget
    writer.add_scalar("charts/episodic_return", 100.0, 299_776)
    writer.add_scalar("charts/SPS", 300, 299_776)
    writer.close()
    with pytest.raises(SystemExit, match="no charts/greedy_return"):
        greedy.greedy_row(str(run_dir))
    writer = SummaryWriter(str(run_dir))
    writer.add_scalar("charts/greedy_return", 500.0, 299_776)
    writer.close()
    row = greedy.greedy_row(str(run_dir))
    assert row["steps_trained"] == 299_776 and row["greedy_mean_return"] == 500.0 and row["seed"] == 4
    assert row["final_return"] == 100.0  # plot.py's window, (290k, 300k]: the episode of the last step alone
    assert row["command"] == (
        "OMP_NUM_THREADS=1 python jepa_ppo_cartpole.py --seed 4 --no-cuda --capture-video --total-timesteps 300000")


def test_pool_gives_each_csv_its_rows_then_pools_a_configuration_over_disjoint_seeds(tmp_path):
    pool, plot = script_module("pool"), script_module("plot")
    header = "configuration,seeds,final_returns,aucs\n"
    (tmp_path / "a.csv").write_text(header + '1: RL gradient only,1 2,100.0 200.0,10.0 20.0\n'
                                             '3: JEPA only,1 2,1.0 2.0,1.0 2.0\n')
    (tmp_path / "b.csv").write_text(header + '1: RL gradient only,21 22 23,300.0 400.0 500.0,30.0 40.0 50.0\n')
    a, b = str(tmp_path / "a.csv"), str(tmp_path / "b.csv")
    rows = pool.pooled_rows([a, b])
    assert [(row["source"], row["configuration"], row["n"]) for row in rows] == [
        (a, "1: RL gradient only", 2), (a, "3: JEPA only", 2), (b, "1: RL gradient only", 3),
        (f"{a} + {b}", "1: RL gradient only", 5)]
    low, high = plot.t_interval(np.array([100.0, 200, 300, 400, 500]))
    assert rows[-1]["final_return_mean"] == 300.0 and rows[-1]["final_return_t95"] == f"[{low:.1f}, {high:.1f}]"
    with pytest.raises(SystemExit, match="repeats seeds"):
        pool.pooled_rows([a, a])
    runs = tmp_path / "runs.csv"  # a runs.csv: each run's values as logged, unrounded
    runs.write_text("configuration,seed,final_return,auc\n"
                    "1: RL gradient only,1,100.04,10.0\n1: RL gradient only,2,200.0,20.0\n")
    assert pool.read_seeds(str(runs)) == {"1: RL gradient only": {1: (100.04, 10.0), 2: (200.0, 20.0)}}
    (tmp_path / "other.csv").write_text("configuration,final_return_mean\n1,2\n")
    with pytest.raises(SystemExit, match="neither a runs.csv's columns"):
        pool.read_seeds(str(tmp_path / "other.csv"))


def test_plot_reads_a_sweep_of_the_reference_which_logs_no_effective_rank(tmp_path):
    """`reproduce.sh --script jepa_ppo_cartpole.py`: the reference logs neither probes nor the effective rank."""
    plot = script_module("plot")
    from torch.utils.tensorboard import SummaryWriter
    writer = SummaryWriter(str(tmp_path / "reproduce__jepa-rlgrad-novar__s1__1"))
    for step in range(5_000, 100_001, 5_000):
        for tag in ["charts/episodic_return", "embedding/variance", "embedding/collapsed", "charts/SPS",
                    "losses/jepa_loss"]:
            writer.add_scalar(tag, 0.0 if tag == "embedding/collapsed" else 1.0, step)
    writer.close()
    sweep = plot.load_sweep(str(tmp_path))
    (row,) = plot.table_rows(sweep)
    assert row["final_return_mean"] == 1.0 and row["final_return_mean_ci95"] == "[nan, nan]"  # one seed
    assert np.isnan(sweep["jepa-rlgrad-novar"][1]["effective_rank_curve"]).all()


def test_a_run_of_the_atari_entry_point_is_repeated_by_its_own_script():
    plot = script_module("plot")
    assert plot.command({"env_id": "ALE/Pong-v5", "seed": "3", "jepa": "False", "gamma": "0.99"}) == (
        "OMP_NUM_THREADS=1 python jepa_ppo_atari.py --seed 3 --no-jepa --env-id ALE/Pong-v5")
