"""Tests of the reference, jepa_ppo_cartpole.py: `python -m pytest -q jepa_ppo_cartpole_test.py`.

The lab's tests (jepa_ppo_cartpole_lab_test.py) import the helpers shared by both files from here."""

import ast
import atexit
import dataclasses
import glob
import importlib
import io
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile

import gymnasium as gym
import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import jepa_ppo_cartpole as jp

# one thread, as the runs below get (OMP_NUM_THREADS=1): these models are too small to gain from more, and threads
# that wait on each other lose tenfold on a machine whose other cores are busy
torch.set_num_threads(1)
ROOT = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(ROOT, "jepa_ppo_cartpole.py")
# what the reference logs: CleanRL's tags, the two extra losses, the collapse indicators, the gradient norms
TAGS = [
    "charts/episodic_return", "charts/episodic_length", "charts/SPS", "charts/learning_rate",
    "losses/value_loss", "losses/policy_loss", "losses/entropy", "losses/approx_kl", "losses/clipfrac",
    "losses/explained_variance", "losses/jepa_loss", "losses/var_loss",
    "embedding/variance", "embedding/variance_pre_ln", "embedding/collapsed",
    "grad_norm/encoder", "grad_norm/predictor", "grad_norm/actor", "grad_norm/critic",
]
TIMINGS = ["charts/SPS"]  # left out by scripts/same_logs.py
CONFIGS = {
    "1": ["--no-jepa", "--rl-grad", "--no-var-reg"],
    "2": ["--jepa", "--rl-grad", "--no-var-reg"],
    "3": ["--jepa", "--no-rl-grad", "--no-var-reg"],
    "4": ["--jepa", "--no-rl-grad", "--var-reg"],
}
SHORT = ["--total-timesteps", "512", "--num-envs", "8", "--num-steps", "32", "--no-cuda"]


def three(config, *extra, seed=7):
    """Flags of three iterations of a configuration, on seed 7 unless told: several tests of both files read these
    runs (`cached_run`)."""
    return [*CONFIGS[config], "--total-timesteps", "768", "--num-envs", "8", "--num-steps", "32", "--seed", str(seed),
            "--no-cuda", *extra]


def run_script(args, cwd, timeout=240, script=SCRIPT):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, script, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=env)


def run_once(args, cwd, script=SCRIPT):
    """Run the script to the end in `cwd` and return the scalars of its one run directory."""
    result = run_script(args, cwd, script=script)
    assert result.returncode == 0, result.stderr
    (run_dir,) = glob.glob(os.path.join(str(cwd), "runs", "*"))
    return scalars(run_dir)


def scalars(run_dir):
    acc = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


_CACHE = {"dir": None, "runs": {}}


def cached_run(args, script=SCRIPT):
    """(run directory, finished process) of `script args`, run once per test session: several tests of both files
    read the same short runs (a failed run is not kept, so each test that needs it fails on its own)."""
    key = (script, tuple(args))
    if key not in _CACHE["runs"]:
        if _CACHE["dir"] is None:
            _CACHE["dir"] = tempfile.mkdtemp(prefix="jepa_ppo_cartpole_test_")
            atexit.register(shutil.rmtree, _CACHE["dir"], ignore_errors=True)
        cwd = tempfile.mkdtemp(dir=_CACHE["dir"])
        result = run_script(args, cwd, script=script)
        assert result.returncode == 0, result.stderr
        (run_dir,) = glob.glob(os.path.join(cwd, "runs", "*"))
        _CACHE["runs"][key] = (run_dir, result)
    return _CACHE["runs"][key]


def script_module(name):
    """A module of scripts/ (same_logs, plot, ...)."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    return importlib.import_module(name)


def one_line_exit(argv, parse=jp.parse_args):
    """The message of the SystemExit that parsing `argv` raises, checked to be one line and an error."""
    with pytest.raises(SystemExit) as exit_info:
        parse(argv)
    message = str(exit_info.value.code)
    assert exit_info.value.code != 0 and "\n" not in message.strip()
    return message


# ----------------------------------------------------------------------------------------- the file
def test_the_reference_is_the_paper_alone():
    """At most 600 lines of at most 120 characters; no trace of the lab's features; never imports the lab."""
    with open(SCRIPT) as f:
        text = f.read()
    lines = text.splitlines()
    assert len(lines) <= 600
    assert [n for n, line in enumerate(lines, 1) if len(line) > 120] == []
    pattern = re.compile(r"tubelet|frame_gap|frame_diffs|patch_embed|fresh_targets|ema_per_iteration|weight_decay|probe"
                         r"|projector|cnn")  # as `grep -nE` reads it: case-sensitive
    assert [(n, line) for n, line in enumerate(lines, 1) if pattern.search(line)] == []
    nodes = list(ast.walk(ast.parse(text)))
    imported = [alias.name for node in nodes if isinstance(node, ast.Import) for alias in node.names]
    imported += [node.module for node in nodes if isinstance(node, ast.ImportFrom)]
    assert imported and not any(name.startswith("jepa_ppo_cartpole_lab") for name in imported)


# ------------------------------------------------------------------------------------------ pixels
def area_matrix(n_in, n_out):
    """Exact area-average downsampling (n_out, n_in), for factors that need not be whole numbers."""
    scale, m = n_in / n_out, np.zeros((n_out, n_in))
    for i in range(n_out):
        a, b = i * scale, (i + 1) * scale
        for k in range(int(a), min(n_in, math.ceil(b))):
            m[i, k] = max(0.0, min(b, k + 1) - max(a, k)) / scale
    return m


def gymnasium_frames(states, height, width):
    """Gymnasium's own pygame render, to grayscale, cropped like render_cartpole, area-downsampled."""
    env = gym.make("CartPole-v1", render_mode="rgb_array").unwrapped
    env.reset(seed=0)
    rows, cols = area_matrix(jp.CROP_BOTTOM - jp.CROP_TOP, height), area_matrix(jp.SCREEN_WIDTH, width)
    frames = []
    for state in states:
        env.state = np.array(state, dtype=np.float64)
        gray = env.render().astype(np.float64) @ np.array([0.299, 0.587, 0.114])
        frames.append(rows @ gray[jp.CROP_TOP:jp.CROP_BOTTOM] @ cols.T)
    env.close()
    return np.stack(frames)


def frames_match(ours, reference):
    """Every frame within 32 gray levels of Gymnasium's at every pixel, and 0.25 on average.

    A cart one source pixel (1/125 m) off moves its edge by 1/6.25 of an output pixel: 41 levels."""
    error = np.abs(ours.astype(np.float64) - reference)
    return error.max() <= 32.0 and error.mean() <= 0.25


@pytest.fixture(scope="module")
def random_states():
    rng = np.random.default_rng(0)
    n = 240
    states = np.stack([rng.uniform(-2.4, 2.4, n), rng.uniform(-2, 2, n), rng.uniform(-0.21, 0.21, n),
                       rng.uniform(-2, 2, n)], 1)
    # the termination extremes: |x| near 2.4 (cart half off screen), |theta| near 0.21 rad
    states[:30, 0] = rng.choice([-1, 1], 30) * rng.uniform(2.3, 2.45, 30)
    states[30:60, 2] = rng.choice([-1, 1], 30) * rng.uniform(0.2, 0.23, 30)
    return states


def test_render_matches_gymnasium_and_rejects_broken_drawings(random_states):
    reference = gymnasium_frames(random_states, 32, 96)
    draw = lambda s: jp.render_cartpole(torch.tensor(s, dtype=torch.float32), 32, 96).numpy()
    assert frames_match(draw(random_states), reference)
    wrong_sign = random_states * np.array([1, 1, -1, 1])
    assert not frames_match(draw(wrong_sign), reference)
    cart_one_pixel_off = random_states + np.array([1 / 125, 0, 0, 0])
    assert not frames_match(draw(cart_one_pixel_off), reference)


def test_render_matches_gymnasium_at_another_resolution(random_states):
    states = random_states[::4]
    ours = jp.render_cartpole(torch.tensor(states, dtype=torch.float32), 64, 192).numpy()
    error = np.abs(ours.astype(np.float64) - gymnasium_frames(states, 64, 192))
    assert error.max() <= 40.0 and error.mean() <= 0.25


def test_render_shape_dtype_and_content():
    states = torch.tensor([[0.0, 0, 0, 0], [1.0, 0, 0.1, 0]])
    frames = jp.render_cartpole(states, 32, 96)
    assert frames.shape == (2, 32, 96) and frames.dtype == torch.uint8
    assert frames[:, 0].min() == 255  # the top row is background
    assert (frames[0] != frames[1]).any()  # the state is visible


# ------------------------------------------------------------------------------ frames and episodes
def test_push_frame_shifts_and_restarts():
    stack = torch.arange(3, dtype=torch.uint8).view(1, 3, 1, 1).repeat(2, 1, 2, 2)  # frames 0, 1, 2
    frame = torch.full((2, 2, 2), 7, dtype=torch.uint8)
    out = jp.push_frame(stack, frame, torch.tensor([False, True]))
    assert out[0, :, 0, 0].tolist() == [1, 2, 7]
    assert out[1, :, 0, 0].tolist() == [7, 7, 7]


def rollout_until_done(envs, policy_action, steps=40, height=32, width=96):
    """Drive the vector env with step_envs the way the training loop does; return the rows."""
    state, _ = envs.reset(seed=3)
    stack = jp.initial_stack(torch.as_tensor(state), height, width, 3)
    is_reset = torch.zeros(envs.num_envs, dtype=torch.bool)
    rows = []
    for _ in range(steps):
        action = torch.full((envs.num_envs,), policy_action)
        state, reward, terminated, done, next_stack, _ = jp.step_envs(envs, action, stack, is_reset)
        rows.append(dict(stack=stack, valid=~is_reset, reward=reward, terminated=terminated, done=done, state=state,
                         next_stack=next_stack))
        stack, is_reset = next_stack, done
    return rows


def test_episode_boundaries_next_step_autoreset():
    envs = jp.make_envs(2)
    rows = rollout_until_done(envs, policy_action=1)
    t = next(i for i, r in enumerate(rows) if r["done"][0])  # the last transition of env 0's first episode
    terminal_frame = jp.render_cartpole(rows[t]["state"], 32, 96)[0]
    # the JEPA target of the last transition (row t + 1's stack) ends in that episode's true last state
    assert torch.equal(rows[t + 1]["stack"][0, 2], terminal_frame)
    assert torch.equal(rows[t + 1]["stack"][0, :2], rows[t]["stack"][0, 1:])
    # the reset step is no transition: it is masked out, gets reward 0 and no termination
    assert rows[t]["valid"][0] and not rows[t + 1]["valid"][0]
    assert rows[t + 1]["reward"][0] == 0 and rows[t + 1]["terminated"][0] == 0
    # the new episode's first stack repeats its first frame, and is no frame of the old episode
    first = rows[t + 2]["stack"][0]
    assert torch.equal(first[0], first[1]) and torch.equal(first[1], first[2])
    assert torch.equal(first[2], jp.render_cartpole(rows[t + 1]["state"], 32, 96)[0])
    assert not torch.equal(first[2], terminal_frame)
    envs.close()


def test_truncation_bootstraps_and_termination_does_not():
    # one env, three rows: a real step that is truncated, the reset row, a real step that terminates
    rewards = torch.tensor([[1.0], [0.0], [1.0]])
    values = torch.tensor([[5.0], [7.0], [3.0]])  # row 1 holds the truncated final state, V = 7
    terminations = torch.tensor([[0.0], [0.0], [1.0]])
    dones = torch.tensor([[1.0], [0.0], [1.0]])
    next_value = torch.tensor([11.0])
    adv = jp.compute_advantages(rewards, values, next_value, terminations, dones, gamma=0.9, gae_lambda=0.8)
    assert adv[0, 0].item() == pytest.approx(1.0 + 0.9 * 7.0 - 5.0)  # bootstraps from the truncated state
    assert adv[2, 0].item() == pytest.approx(1.0 - 3.0)  # a termination does not bootstrap


def test_gae_matches_discounted_sum_inside_an_episode():
    rewards, values = torch.ones(4, 1), torch.zeros(4, 1)
    zeros = torch.zeros(4, 1)
    adv = jp.compute_advantages(rewards, values, torch.zeros(1), zeros, zeros, gamma=0.5, gae_lambda=1.0)
    assert adv[:, 0].tolist() == pytest.approx([1 + 0.5 + 0.25 + 0.125, 1 + 0.5 + 0.25, 1.5, 1.0])


def test_true_truncation_at_500_steps():
    envs = jp.make_envs(1)
    envs.reset(seed=0)
    envs.unwrapped.steps[:] = 499  # the next step is the 500th of the episode
    envs.unwrapped.state[:] = 0.0
    _, _, terminated, truncated, _ = envs.step(np.array([0]))
    assert truncated[0] and not terminated[0]
    envs.close()


# ------------------------------------------------------------------------------------------- models
def make_models(*, args_class=jp.Args, make_encoder=jp.make_vit, **overrides):
    args = args_class(**overrides)
    torch.manual_seed(0)
    encoder, predictor = make_encoder(args), jp.Predictor(args.embed_dim, args.predictor_hidden)
    actor, critic = jp.make_heads(args.embed_dim)
    return args, encoder, predictor, actor, critic


def fake_minibatch(args, n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    states = torch.rand(n, 4, generator=g) * torch.tensor([4.0, 2, 0.4, 2]) - torch.tensor([2.0, 1, 0.2, 1])
    stacks = jp.render_cartpole(states, args.frame_height, args.frame_width)[:, None].repeat(1, 3, 1, 1)
    return {"stacks": stacks, "actions": torch.randint(0, 2, (n,), generator=g), "logprobs": torch.full((n,), -0.69),
            "advantages": torch.randn(n, generator=g), "returns": torch.randn(n, generator=g),
            "values": torch.randn(n, generator=g), "targets": torch.randn(n, args.embed_dim, generator=g)}


def test_encoder_and_predictor_shapes():
    args, encoder, predictor, _, _ = make_models()
    stacks = fake_minibatch(args)["stacks"]
    s_x = encoder(stacks)
    assert s_x.shape == (16, args.embed_dim)
    tokens = 3 * (args.frame_height // args.patch_size) * (args.frame_width // args.patch_size)
    assert tokens == 36 == tokens_seen(encoder, stacks) - 1
    assert predictor(s_x, torch.zeros(16, dtype=torch.long)).shape == (16, args.embed_dim)


def test_vit_takes_plain_sizes():
    encoder = jp.ViTEncoder(64, 192, 16, 32, 1, 2, 2)
    assert encoder.rows == 4 and encoder.cols == 12 and encoder.patch_proj.weight.shape == (32, 256)
    assert len(encoder.blocks) == 1 and encoder.blocks[0].num_heads == 2
    assert encoder(torch.zeros(2, 3, 64, 192, dtype=torch.uint8)).shape == (2, 32)


@pytest.mark.parametrize("sizes", [dict(frame_height=30), dict(frame_width=100), dict(num_heads=3)])
def test_vit_checks_its_sizes_when_built(sizes):
    with pytest.raises(ValueError, match="patch_size .* must divide .* num_heads .* must divide embed_dim"):
        jp.ViTEncoder(**sizes)


@pytest.mark.parametrize("frames", [
    torch.rand(2, 3, 32, 96),  # floats in [0, 1]: read as uint8 they would be a signal 255 times weaker
    torch.zeros(2, 4, 32, 96, dtype=torch.uint8),  # four frames for a three-frame encoder
    torch.zeros(2, 3, 48, 96, dtype=torch.uint8),  # another frame size
    torch.zeros(3, 32, 96, dtype=torch.uint8),  # one stack without its batch dimension
], ids=["floats", "four-frames", "other-size", "no-batch"])
def test_vit_refuses_input_it_would_misread(frames):
    with pytest.raises(ValueError, match=re.escape("ViTEncoder takes uint8 frames (B, 3, 32, 96)")):
        jp.ViTEncoder()(frames)


@pytest.mark.parametrize("action", [
    torch.eye(2)[torch.tensor([0, 1, 1, 0])],  # one-hot rows: would broadcast to a (4, 4, 64) prediction
    torch.tensor([[0], [1], [1], [0]]),  # (B, 1): the same
    torch.tensor([0.0, 1.0, 1.0, 0.0]),  # floats
    torch.tensor([0, 1, 1]),  # a row short
], ids=["one-hot", "column", "floats", "short"])
def test_predictor_refuses_an_action_that_is_not_one_integer_per_row(action):
    predictor, s_x = jp.Predictor(), torch.randn(4, 64)
    with pytest.raises(ValueError, match="Predictor takes one integer action per row"):
        predictor(s_x, action)
    assert predictor(s_x, torch.tensor([0, 1, 1, 0], dtype=torch.int32)).shape == (4, 64)


def test_variance_loss_needs_a_batch_of_two():
    with pytest.raises(ValueError, match="a batch of 2 or more"):
        jp.variance_loss(torch.randn(1, 64))
    assert jp.variance_loss(torch.tensor([[0.0], [2.0]])).item() == -1.0  # variance 2, clipped at 1


PIECES = ["Block", "ViTEncoder", "Predictor", "ema_update", "jepa_loss", "variance_loss"]


def test_the_pieces_copy_out_alone_and_train_beyond_cartpole_sizes():
    """The ViT, its block, the predictor, the EMA update and the two losses, their source text alone run with nothing
    but torch imported: an encoder of four 84 x 84 frames (Atari's) and six actions learns to predict its y-encoder."""
    import inspect
    namespace = {}
    source = "\n".join(inspect.getsource(getattr(jp, name)) for name in PIECES)
    exec("import torch\nimport torch.nn as nn\nimport torch.nn.functional as F\n" + source, namespace)
    torch.manual_seed(0)
    encoder = namespace["ViTEncoder"](84, 84, patch_size=12, embed_dim=32, depth=1, num_heads=2, num_frames=4)
    target_encoder = namespace["ViTEncoder"](84, 84, patch_size=12, embed_dim=32, depth=1, num_heads=2, num_frames=4)
    target_encoder.load_state_dict(encoder.state_dict())
    predictor = namespace["Predictor"](32, hidden=64, num_actions=6)
    assert type(encoder).__module__ != jp.__name__  # the copies, not the reference's classes
    g = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 256, (16, 5, 84, 84), dtype=torch.uint8, generator=g)  # frames t-3 .. t+1
    actions = torch.randint(0, 6, (16,), generator=g)
    optimizer = torch.optim.Adam([*encoder.parameters(), *predictor.parameters()], lr=1e-3)
    losses = []
    for _ in range(20):
        with torch.no_grad():
            targets = target_encoder(frames[:, 1:])
        s_x = encoder(frames[:, :4])
        loss = namespace["jepa_loss"](predictor(s_x, actions), targets)
        optimizer.zero_grad()
        (loss + namespace["variance_loss"](s_x)).backward()
        assert encoder.patch_proj.weight.grad.abs().sum() > 0  # the JEPA gradient reaches the patches
        optimizer.step()
        before = [p.clone() for p in target_encoder.parameters()]
        namespace["ema_update"](target_encoder, encoder, 0.99)
        for new, old, online in zip(target_encoder.parameters(), before, encoder.parameters()):
            torch.testing.assert_close(new, 0.99 * old + 0.01 * online)
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses) and losses[-1] < 0.5 * losses[0]


def test_positional_encoding_sees_frame_order():
    args, encoder, *_ = make_models()
    stacks = fake_minibatch(args, n=2)["stacks"]
    stacks[:, 0] = 255  # make the three frames differ
    assert not torch.allclose(encoder(stacks), encoder(stacks.flip(1)), atol=1e-5)


def tokens_seen(encoder, stacks):
    """Length of the token sequence (CLS included) that enters the encoder's first block."""
    seen = []
    hook = encoder.blocks[0].register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].shape[1]))
    encoder(stacks)
    hook.remove()
    return seen[0]


def check_pixel_locality(args, encoder, conv, tubelets):
    """Flip one pixel of frame 1 in patch (row 0, column 2): the linear embedding changes that patch's token alone;
    the conv stem (3x3 stride-2 convolutions, a 31 x 31 window around each patch's top-left corner) changes only
    tokens of that frame at rows 0-1, columns 2-3, that patch's among them. A tubelet spans all three frames."""
    stacks = fake_minibatch(args, n=2)["stacks"]
    with torch.no_grad():
        tokens = encoder.embed_patches(stacks)
        assert tokens.shape == (2, 1 if tubelets else 3, 2, 6, args.embed_dim)
        flipped = stacks.clone()
        flipped[:, 1, 2, 2 * 16 + 2] = 255 - flipped[:, 1, 2, 2 * 16 + 2]
        changed = (encoder.embed_patches(flipped) - tokens).abs().amax(dim=(0, 4)) > 1e-6  # (frames, rows, cols)
    frame = 0 if tubelets else 1
    allowed = {(frame, r, c) for r in (0, 1) for c in (2, 3)} if conv else {(frame, 0, 2)}
    changed_at = {tuple(i) for i in changed.nonzero().tolist()}
    assert (frame, 0, 2) in changed_at and changed_at <= allowed
    assert tokens_seen(encoder, stacks) == changed.numel() + 1


def test_a_pixel_reaches_only_the_token_of_its_frame_and_place():
    args, encoder, *_ = make_models()
    check_pixel_locality(args, encoder, conv=False, tubelets=False)


def test_predictor_output_depends_on_action():
    args, encoder, predictor, _, _ = make_models()
    s_x = encoder(fake_minibatch(args, n=4)["stacks"])
    left, right = predictor(s_x, torch.zeros(4, dtype=torch.long)), predictor(s_x, torch.ones(4, dtype=torch.long))
    assert (left - right).abs().min() > 0


# -------------------------------------------------------------------------------- gradient routing
def ppo_encoder_grads(rl_grad):
    args, encoder, predictor, actor, critic = make_models(rl_grad=rl_grad)
    losses = jp.minibatch_losses(args, encoder, predictor, actor, critic, fake_minibatch(args))
    ppo_loss = losses["policy_loss"] + args.vf_coef * losses["value_loss"] - args.ent_coef * losses["entropy"]
    ppo_loss.backward()
    return [p.grad for p in encoder.parameters()], [p.grad for p in actor.parameters()]


def test_no_rl_grad_puts_exactly_zero_ppo_gradient_on_encoder():
    encoder_grads, actor_grads = ppo_encoder_grads(rl_grad=False)
    assert all(g is None or torch.count_nonzero(g) == 0 for g in encoder_grads)
    assert any(g is not None and torch.count_nonzero(g) > 0 for g in actor_grads)


def test_rl_grad_reaches_encoder():
    encoder_grads, _ = ppo_encoder_grads(rl_grad=True)
    assert any(g is not None and torch.count_nonzero(g) > 0 for g in encoder_grads)


@pytest.mark.parametrize("loss_name", ["jepa_loss", "var_loss"])
def test_jepa_and_variance_losses_each_train_encoder_without_rl_grad(loss_name):
    args, encoder, predictor, actor, critic = make_models(rl_grad=False, var_reg=True)
    jp.minibatch_losses(args, encoder, predictor, actor, critic, fake_minibatch(args))[loss_name].backward()
    assert encoder.patch_proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("flags, weights", [
    (dict(jepa=True, rl_grad=True, var_reg=False), {"jepa_loss": 1.0, "ppo": 1.0}),
    (dict(jepa=True, rl_grad=False, var_reg=False), {"jepa_loss": 1.0}),
    (dict(jepa=True, rl_grad=False, var_reg=True, var_coef=0.5), {"jepa_loss": 1.0, "var_loss": 0.5}),
    (dict(jepa=False, rl_grad=True, var_reg=False, jepa_coef=0.3), {"ppo": 1.0}),
    (dict(jepa=False, rl_grad=False, var_reg=True, var_coef=0.5), {"var_loss": 0.5}),  # the variance loss alone
])
def test_encoder_gradient_comes_from_exactly_the_configured_losses(flags, weights):
    args, encoder, predictor, actor, critic = make_models(**flags)
    losses = jp.minibatch_losses(args, encoder, predictor, actor, critic, fake_minibatch(args))
    losses["ppo"] = losses["policy_loss"] - args.ent_coef * losses["entropy"] + args.vf_coef * losses["value_loss"]
    expected = sum(w * losses[name] for name, w in weights.items())
    grad = lambda loss: torch.autograd.grad(loss, list(encoder.parameters()), retain_graph=True, allow_unused=True)
    for got, want in zip(grad(losses["loss"]), grad(expected)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_variance_loss_alone_is_accepted_and_trains_the_encoder():
    """Guards a defect: `--no-jepa --no-rl-grad --var-reg` was refused ("leaves the encoder without any training
    signal") although the variance loss trains the encoder. It is accepted, and the encoder gets a gradient."""
    args = jp.parse_args(["--no-jepa", "--no-rl-grad", "--var-reg"])
    assert (args.jepa, args.rl_grad, args.var_reg) == (False, False, True)
    _, encoder, predictor, actor, critic = make_models(jepa=False, rl_grad=False, var_reg=True)
    losses = jp.minibatch_losses(args, encoder, predictor, actor, critic, fake_minibatch(args))
    losses["loss"].backward()
    assert encoder.patch_proj.weight.grad.abs().sum() > 0
    assert any(p.grad is not None and torch.count_nonzero(p.grad) > 0 for p in encoder.blocks.parameters())


def test_no_training_signal_at_all_is_refused_with_a_true_message():
    """Guards a defect: the refusal named --no-jepa and --no-rl-grad alone and offered --jepa or --rl-grad, as if the
    variance loss could not train the encoder; it must name the three switches and offer --var-reg too."""
    message = one_line_exit(["--no-jepa", "--no-rl-grad", "--no-var-reg"])
    assert all(flag in message for flag in ["--no-jepa", "--no-rl-grad", "--no-var-reg", "--var-reg"])
    assert message == one_line_exit(["--no-jepa", "--no-rl-grad"])  # --no-var-reg is the default


def test_no_jepa_keeps_jepa_gradient_off_encoder():
    args, encoder, predictor, actor, critic = make_models(jepa=False, rl_grad=True)
    jp.minibatch_losses(args, encoder, predictor, actor, critic, fake_minibatch(args))["jepa_loss"].backward()
    assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in encoder.parameters())
    assert predictor.fc1.weight.grad.abs().sum() > 0


def test_loss_formulas():
    pred, target = torch.tensor([[1.0, 2.0], [0.0, 0.0]]), torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    assert jp.jepa_loss(pred, target).item() == pytest.approx((5 + 25) / 2)
    s = torch.tensor([[0.0, 0.0], [2.0, 0.2]])  # batch variances 2 and 0.02
    assert jp.variance_loss(s).item() == pytest.approx(-1.0)  # clamped at 1
    assert jp.variance_loss(0.1 * s).item() == pytest.approx(-(0.02 + 0.0002) / 2)


def test_y_encoder_gets_no_gradient_and_ema_math_holds():
    args, encoder, *_ = make_models()
    target = jp.make_vit(args)
    target.load_state_dict(encoder.state_dict())
    target.requires_grad_(False)
    for a, b in zip(target.parameters(), encoder.parameters()):
        assert torch.equal(a, b)  # both start equal
    with torch.no_grad():
        for p in encoder.parameters():
            p.add_(torch.randn_like(p))
    before = [p.clone() for p in target.parameters()]
    out = target(fake_minibatch(args)["stacks"]).sum()
    assert not out.requires_grad and all(p.grad is None for p in target.parameters())
    jp.ema_update(target, encoder, tau=0.99)
    for new, old, online in zip(target.parameters(), before, encoder.parameters()):
        torch.testing.assert_close(new, 0.99 * old + 0.01 * online, rtol=1e-6, atol=1e-6)


def test_make_agent_starts_the_y_encoder_as_a_frozen_copy():
    encoder, target_encoder, predictor, actor, critic, optimizer = jp.make_agent(jp.Args(), "cpu")
    assert all(torch.equal(a, b) for a, b in zip(encoder.parameters(), target_encoder.parameters()))
    assert not any(p.requires_grad for p in target_encoder.parameters())
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for m in (encoder, predictor, actor, critic) for p in m.parameters()}


def test_collapse_indicator_fires_on_a_collapsed_batch_only():
    g = torch.Generator().manual_seed(0)
    point = torch.randn(1, 64, generator=g).expand(128, 64)
    assert jp.embedding_variance(point + 1e-5 * torch.randn(128, 64, generator=g)) < 1e-7
    assert jp.embedding_variance(point + 1e-2 * torch.randn(128, 64, generator=g)) > 1e-7


# ------------------------------------------------------------- one iteration: rollout, batch, update
class StepStates(gym.vector.VectorWrapper):
    """Keeps the state that each vector step returns (the reference stores none)."""

    def __init__(self, envs):
        super().__init__(envs)
        self.states = []

    def step(self, actions):
        result = self.env.step(actions)
        self.states.append(torch.as_tensor(result[0]))
        return result


def test_collect_rollout_aligns_rewards_dones_and_resets_with_the_action_that_caused_them():
    args = jp.Args(num_envs=2, num_steps=48)
    torch.manual_seed(0)
    encoder, _, _, actor, critic, _ = jp.make_agent(args, "cpu")
    envs = StepStates(jp.make_envs(args.num_envs))
    state = torch.as_tensor(envs.reset(seed=1)[0])
    env_state = {"state": state, "stack": jp.initial_stack(state, 32, 96), "is_reset_step": torch.zeros(2, dtype=bool)}
    rollout = jp.make_rollout_storage(48, 2, (3, 32, 96), args.embed_dim, "cpu")
    episodes = jp.collect_rollout(envs, encoder, actor, critic, rollout, env_state)
    envs.close()
    states = torch.stack([state, *envs.states[:-1]])  # (48, 2, 4): the state of each row's last frame
    assert torch.equal(env_state["state"], envs.states[-1])
    valid, dones, rewards = rollout["valid"], rollout["dones"].bool(), rollout["rewards"]
    assert dones.sum() >= 2 and len(episodes) == int(dones.sum())  # random CartPole episodes last about 22 steps
    # the row after a done is the reset step: no transition, reward 0; every real transition earns 1
    assert torch.equal(valid[1:], ~dones[:-1]) and valid[0].all()
    assert torch.equal(rewards, valid.float()) and (rollout["terminations"].bool() <= dones).all()
    # each ended episode's return is the sum of its rows' rewards, ending at its done row
    expected = []
    for n in range(2):
        start = 0
        for row in torch.nonzero(dones[:, n])[:, 0].tolist():
            expected.append((row, float(rewards[start:row + 1, n].sum())))
            start = row + 1
    assert sorted(expected) == sorted((row, episodic_return) for row, episodic_return, _ in episodes)
    assert all(length == episodic_return for _, episodic_return, length in episodes)
    # row t + 1's stack continues row t's within an episode, and its last frame shows row t + 1's state
    same_episode = valid[1:] & valid[:-1]
    stacks = rollout["stacks"]
    assert torch.equal(stacks[1:-1, :, :2][same_episode], stacks[:-2, :, 1:][same_episode])
    assert torch.equal(stacks[:-1, :, 2].flatten(0, 1), jp.render_cartpole(states.flatten(0, 1), 32, 96))
    assert torch.equal(stacks[-1], env_state["stack"])
    # what the rollout stored is what the policy computed on the stored stack
    with torch.no_grad():
        s_x = encoder(stacks[:-1].flatten(0, 1))
        logits = actor(s_x)
    torch.testing.assert_close(rollout["embeddings"].flatten(0, 1), s_x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rollout["pre_norm"].flatten(0, 1), encoder.pre_norm(stacks[:-1].flatten(0, 1)).detach(),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rollout["values"].flatten(), critic(s_x).flatten().detach(), rtol=1e-5, atol=1e-5)
    logprobs = torch.log_softmax(logits, -1).gather(1, rollout["actions"].flatten()[:, None])[:, 0]
    torch.testing.assert_close(rollout["logprobs"].flatten(), logprobs, rtol=1e-5, atol=1e-5)


def labelled_rollout(T=4, N=2, *, args_class=jp.Args, **overrides):
    """A rollout whose every stack carries an id, 10 t + n + 1, in all its pixels; row 1 of env 0 is a reset row."""
    args = args_class(num_envs=N, num_steps=T, gamma=0.5, gae_lambda=1.0, **overrides)
    rollout = jp.make_rollout_storage(T, N, (3, 32, 96), args.embed_dim, "cpu")
    for t in range(T + 1):
        for n in range(N):
            rollout["stacks"][t, n] = 10 * t + n + 1
    rollout["valid"][:] = True
    rollout["valid"][1, 0] = False
    rollout["actions"] = torch.arange(T * N).view(T, N) % 2
    return args, rollout


def read_id(stacks):
    return stacks[:, 2, 0, :1].float()  # (B, 1): a stub encoder that embeds a stack as its id


def test_make_batch_targets_are_the_next_row_and_reset_rows_are_dropped():
    args, rollout = labelled_rollout()
    batch = jp.make_batch(args, rollout, read_id, lambda stacks: read_id(stacks) + 1000, lambda s: s)
    ids = read_id(batch["stacks"])[:, 0]
    assert 11 not in ids.tolist() and len(ids) == 4 * 2 - 1  # row 1 of env 0 is gone
    torch.testing.assert_close(batch["targets"][:, 0], ids + 10 + 1000)  # the y-encoder on row t + 1's stack
    assert torch.equal(batch["actions"], (torch.arange(8) % 2)[rollout["valid"].flatten()])
    assert "next_stacks" not in batch


def test_make_batch_bootstraps_from_the_stack_after_the_last_row_and_stops_at_dones():
    args, rollout = labelled_rollout()  # rewards, values and terminations 0: only the bootstrap is left
    rollout["dones"][1, 1] = 1.0
    batch = jp.make_batch(args, rollout, read_id, lambda stacks: read_id(stacks) + 1000, lambda s: s)
    advantage = {int(i): float(a) for i, a in zip(read_id(batch["stacks"])[:, 0], batch["advantages"])}
    next_value = [41.0, 42.0]  # ids of the stack after row T - 1 = 3
    assert advantage[31] == pytest.approx(0.5 * next_value[0])
    assert advantage[1] == pytest.approx(0.5 ** 4 * next_value[0])
    assert advantage[32] == pytest.approx(0.5 * next_value[1]) and advantage[22] == pytest.approx(0.25 * next_value[1])
    assert advantage[12] == 0.0 and advantage[2] == 0.0  # the done at row 1 of env 1 cuts the return
    torch.testing.assert_close(batch["returns"], batch["advantages"] + batch["values"])


def make_agent_and_batch(n=64, seed=0, *, args_class=jp.Args, make_agent=jp.make_agent, **overrides):
    args = args_class(**overrides)
    torch.manual_seed(0)
    agent = make_agent(args, "cpu")
    return args, agent, fake_minibatch(args, n=n, seed=seed)


def run_update(args, agent, batch, seed=0, update=jp.update):
    torch.manual_seed(seed)  # the minibatch order
    return update(args, *agent[:5], agent[5], batch)


MODULES = ["encoder", "target_encoder", "predictor", "actor", "critic"]


@pytest.mark.parametrize("config, scaled, untouched", [
    ("1", "targets", ["encoder", "actor", "critic"]),  # the diagnostic predictor of --no-jepa
    ("2", "targets", ["actor", "critic"]),  # the JEPA loss trains encoder and predictor only
    ("2", "returns", ["actor", "predictor"]),  # the value loss trains critic and encoder only
    ("3", "returns", ["encoder", "predictor", "actor"]),  # under --no-rl-grad the critic keeps to itself
    ("4", "returns", ["encoder", "predictor", "actor"]),
])
def test_a_loss_never_changes_the_step_of_a_module_it_does_not_reach(config, scaled, untouched):
    """One optimizer step with one loss scaled 1000-fold leaves every module that loss does not reach bit for bit
    as it is with the loss unscaled: no shared clip factor, no shared optimizer state."""
    flags = {name: f"--{name.replace('_', '-')}" in CONFIGS[config] for name in ["jepa", "rl_grad", "var_reg"]}
    results = []
    for scale in [1.0, 1000.0]:
        args, agent, batch = make_agent_and_batch(update_epochs=1, num_minibatches=1, **flags)
        batch[scaled] = batch[scaled] * scale
        run_update(args, agent, batch)
        results.append({name: [p.detach().clone() for p in module.parameters()]
                        for name, module in zip(MODULES, agent[:5])})
    same = lambda name: all(torch.equal(a, b) for a, b in zip(results[0][name], results[1][name]))
    for name in untouched:
        assert same(name), name
    assert not same("predictor" if scaled == "targets" else "critic")


def test_clip_grad_norms_is_clip_grad_norm_per_module_to_the_bit():
    g = torch.Generator().manual_seed(0)
    modules = {name: torch.nn.Linear(8, 8) for name in ["a", "b"]}
    for scale, module in zip([100.0, 0.01], modules.values()):
        for p in module.parameters():
            p.grad = scale * torch.randn(p.shape, generator=g)
    reference = {}
    for name, module in modules.items():
        copy = [p.grad.clone() for p in module.parameters()]
        params = [torch.nn.Parameter(p.detach().clone()) for p in module.parameters()]
        for p, grad in zip(params, copy):
            p.grad = grad
        reference[name] = (torch.nn.utils.clip_grad_norm_(params, 0.5), [p.grad for p in params])
    norms = jp.clip_grad_norms(modules, 0.5)
    for name, module in modules.items():
        assert torch.equal(norms[name], reference[name][0])
        assert all(torch.equal(p.grad, r) for p, r in zip(module.parameters(), reference[name][1]))


def test_clip_grad_norms_clips_each_module_to_its_own_norm():
    big, small = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    for p in big.parameters():
        p.grad = torch.full_like(p, 10.0)
    for p in small.parameters():
        p.grad = torch.full_like(p, 0.01)
    small_before = [p.grad.clone() for p in small.parameters()]
    norms = jp.clip_grad_norms({"big": big, "small": small}, max_norm=1.0)
    assert norms["big"].item() == pytest.approx(10.0 * math.sqrt(20))
    assert norms["small"].item() == pytest.approx(0.01 * math.sqrt(20))
    assert torch.cat([p.grad.flatten() for p in big.parameters()]).norm().item() == pytest.approx(1.0)
    assert all(torch.equal(p.grad, g) for p, g in zip(small.parameters(), small_before))


def test_clip_grad_norms_treats_a_module_without_gradients_as_clip_grad_norm_does():
    unused, used = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    for p in used.parameters():
        p.grad = torch.full_like(p, 10.0)
    norms = jp.clip_grad_norms({"unused": unused, "used": used}, max_norm=1.0)
    assert torch.equal(norms["unused"], torch.nn.utils.clip_grad_norm_(torch.nn.Linear(4, 4).parameters(), 1.0))
    assert norms["unused"].item() == 0.0 and all(p.grad is None for p in unused.parameters())
    assert torch.cat([p.grad.flatten() for p in used.parameters()]).norm().item() == pytest.approx(1.0)


def test_update_clips_the_gradients_it_steps_with():
    """With every gradient clipped to a norm of 1e-9, Adam's steps shrink to a sliver of the unclipped ones."""
    moved = {}
    for max_norm in [1e-9, 1e9]:
        args, agent, batch = make_agent_and_batch(update_epochs=1, num_minibatches=1, max_grad_norm=max_norm)
        before = [[p.detach().clone() for p in module.parameters()] for module in agent[:5]]
        out = run_update(args, agent, batch)
        moved[max_norm] = [sum((p - b).abs().sum().item() for p, b in zip(module.parameters(), old))
                           for module, old in zip(agent[:5], before)]
        assert all(out[f"grad_norm_{name}"] > 1e-3 for name in ["encoder", "predictor", "actor", "critic"])
    for name, tiny, full in zip(MODULES, moved[1e-9], moved[1e9]):
        if name != "target_encoder":
            assert tiny < 0.01 * full, name


def check_ema_steps(per_iteration, update=jp.update, **overrides):
    """Two epochs of two minibatches: the y-encoder is the EMA of the x-encoder after each of the 4 optimizer steps,
    or (`per_iteration`) after the last one only."""
    args, agent, batch = make_agent_and_batch(update_epochs=2, num_minibatches=2, **overrides)
    encoder, target_encoder, optimizer = agent[0], agent[1], agent[5]
    online = []  # the x-encoder after each optimizer step
    optimizer.register_step_post_hook(lambda *_: online.append([p.detach().clone() for p in encoder.parameters()]))
    expected = [p.clone() for p in target_encoder.parameters()]
    run_update(args, agent, batch, update=update)
    assert len(online) == 4
    for params in (online[-1:] if per_iteration else online):
        expected = [0.99 * e + 0.01 * o for e, o in zip(expected, params)]
    for new, want in zip(target_encoder.parameters(), expected):
        torch.testing.assert_close(new, want, rtol=1e-5, atol=1e-6)


def test_update_moves_the_y_encoder_by_the_ema_after_every_step():
    check_ema_steps(per_iteration=False)


def test_update_stops_on_a_non_finite_loss():
    args, agent, batch = make_agent_and_batch()
    batch["returns"][0] = float("nan")
    with pytest.raises(FloatingPointError):
        run_update(args, agent, batch)


# -------------------------------------------------------------------------------------------- flags
@pytest.mark.parametrize("argv, flag", [
    (["--num-envs", "0"], "--num-envs"),
    (["--num-steps", "-3"], "--num-steps"),
    (["--num-minibatches", "65"], "--num-minibatches"),  # 8 envs x 16 rows: 64 minibatches of 2 at most
    (["--num-minibatches", "0"], "--num-minibatches"),
    (["--frame-height", "30"], "--frame-height"),
    (["--total-timesteps", "100"], "--total-timesteps"),
    (["--ema-tau", "1.5"], "--ema-tau"),
    (["--ema-tau", "-0.1"], "--ema-tau"),
    (["--gamma", "1.5"], "--gamma"),
    (["--var-coef", "-1"], "--var-coef"),
    (["--num-heads", "3"], "--num-heads"),
    (["--no-jepa", "--no-rl-grad"], "--no-rl-grad"),
    (["--learning-rate", "0"], "--learning-rate"),
    (["--bogus-flag", "1"], "--bogus-flag"),
    (["--num-envs", "eight"], "--num-envs"),
    # the lab's flags are no flags of the reference
    (["--frame-gap", "2"], "--frame-gap"),
    (["--encoder", "cnn"], "--encoder"),
    (["--eval-checkpoint", "model.pt"], "--eval-checkpoint"),
])
def test_bad_flags_exit_with_one_line(argv, flag):
    assert flag in one_line_exit(argv)


MISSPELT = [(["--totl-timesteps", "1000", "--learning-rat", "3e-4", "--update-epoch", "4", "--clip-coeff", "0.1"],
             ["--total-timesteps", "--learning-rate", "--update-epochs", "--clip-coef"]),
            (["--num-stpes", "3"], ["--num-steps"])]


@pytest.mark.parametrize("columns", ["80", "200"])
@pytest.mark.parametrize("encoding", ["utf-8", "ascii"])  # tyro draws its box in ASCII where stdout is not UTF-8
@pytest.mark.parametrize("argv, meant", MISSPELT)
def test_a_misspelt_flag_is_named_whole_with_tyros_suggestion(argv, meant, columns, encoding, monkeypatch):
    """A flag that starts a wrapped line of tyro's box keeps its "--", whatever the terminal's width, and tyro's
    "Perhaps you meant" survives the boiling down to one line."""
    monkeypatch.setenv("COLUMNS", columns)
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(io.BytesIO(), encoding=encoding))
    message = one_line_exit(argv)
    unknown = ", ".join(argv)
    suggested = ", ".join(sorted(meant))
    assert message == f"error: Unrecognized options: {unknown}; perhaps you meant {suggested} (see --help)"


def test_a_bad_value_gets_tyros_message_and_no_suggestion():
    assert one_line_exit(["--num-envs", "abc"]) == (
        "error: Error parsing --num-envs: invalid literal for int() with base 10: 'abc' (see --help)")
    assert one_line_exit(["--no-jep"]).endswith("perhaps you meant --jepa, --no-jepa (see --help)")


@pytest.mark.parametrize("argv", [["--num-minibatches", "65"],
                                  ["--num-envs", "1", "--num-steps", "4", "--num-minibatches", "4"]])
def test_bad_flag_from_command_line_leaves_no_run_directory(argv, tmp_path):
    result = run_script(argv, cwd=tmp_path)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "--num-minibatches" in result.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("argv", [["--num-envs", "1", "--num-steps", "4", "--num-minibatches", "4"],
                                  ["--num-envs", "4", "--num-steps", "2", "--num-minibatches", "8"]])
def test_minibatches_too_small_for_an_advantage_std_are_refused(argv):
    """Guards a defect: --num-minibatches had only to divide the batch, so minibatches of one transition passed (a
    standard deviation of one advantage is NaN) and the run stopped on a non-finite loss at its first update. Each
    minibatch must hold 2 transitions, of the num_steps // 2 per environment that a rollout holds at least."""
    assert "--num-minibatches" in one_line_exit(argv)


def test_the_smallest_minibatches_allowed_train_without_a_non_finite_loss(tmp_path):
    """The boundary of that rule (1 env x 8 // 2 = 2 x 2 minibatches) is accepted, and 25 iterations of it keep
    every loss finite (a reset row per episode leaves at least 4 transitions for the 2 minibatches of 2)."""
    argv = ["--num-envs", "1", "--num-steps", "8", "--num-minibatches", "2", "--total-timesteps", "200", "--no-cuda"]
    args = jp.parse_args(argv)
    assert args.num_envs * (args.num_steps // 2) == 2 * args.num_minibatches
    logged = run_once(argv, tmp_path)
    assert len(logged["losses/policy_loss"]) == 25
    assert all(np.isfinite(v) for tag in ["losses/policy_loss", "losses/value_loss", "losses/jepa_loss"]
               for _, v in logged[tag])


def test_defaults_are_the_papers_best_configuration():
    args = jp.parse_args([])
    assert (args.jepa, args.rl_grad, args.var_reg) == (True, True, False)
    assert args.embed_dim == 64 and args.ema_tau == 0.99 and args.total_timesteps == 100_000
    assert args.lr_warmup_iters == 40  # beyond the paper; adopted after screening, every result since uses it


def test_run_directories_are_unique(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(jp.time, "time", lambda: 1234567890.0)
    args = jp.parse_args([])
    first, second = jp.make_run_dir(args), jp.make_run_dir(args)
    assert first != second and os.path.isdir(first) and os.path.isdir(second)
    assert "jepa-rlgrad-novar" in first and "s1" in first
    elsewhere = jp.make_run_dir(jp.parse_args(["--runs-dir", "sweep/logs", "--exp-name", "fig3"]))
    assert os.path.dirname(elsewhere) == os.path.join("sweep", "logs")
    assert os.path.basename(elsewhere).startswith("fig3__")


# ------------------------------------------------------------------------------- end to end, logged
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_each_configuration_logs_every_tag(config):
    run_dir, result = cached_run(three(config))
    assert "SPS" in result.stdout and "return" in result.stdout
    logged = scalars(run_dir)
    assert sorted(logged) == sorted(TAGS)  # every tag of the reference, and nothing of the lab's
    assert all(np.isfinite(v) for tag in TAGS if not tag.startswith("losses/explained") for _, v in logged[tag])
    # the collapse flag is the paper's threshold on the logged variance; the learning rate anneals linearly to 0,
    # times the default warm-up over 40 iterations
    assert [c for _, c in logged["embedding/collapsed"]] == [float(v < 1e-7) for _, v in logged["embedding/variance"]]
    assert [lr for _, lr in logged["charts/learning_rate"]] == pytest.approx([1e-3 * 1 / 40, 1e-3 * 2 / 3 * 2 / 40,
                                                                             1e-3 * 1 / 3 * 3 / 40])
    acc = EventAccumulator(run_dir)
    acc.Reload()
    assert acc.Tags()["tensors"]  # the hyperparameter table (text)
    assert acc.Tags()["images"] == []  # the pictures are the lab's


def test_warmup_schedule_in_the_loop(tmp_path):
    """--lr-warmup-iters 2 over 4 iterations: the rate rises over the first two, times the linear annealing."""
    logged = run_once([*CONFIGS["2"], *SHORT, "--total-timesteps", "1024", "--lr-warmup-iters", "2"], tmp_path)
    assert [lr for _, lr in logged["charts/learning_rate"]] == pytest.approx([5e-4, 7.5e-4, 5e-4, 2.5e-4])
    assert all(np.isfinite(v) for _, v in logged["losses/jepa_loss"])


def test_no_warmup_gives_the_plain_annealing_in_the_loop(tmp_path):
    """--lr-warmup-iters 0, the setting of every result before the warm-up became the default: linear annealing
    alone."""
    logged = run_once([*CONFIGS["1"], *SHORT, "--total-timesteps", "1024", "--lr-warmup-iters", "0"], tmp_path)
    assert [lr for _, lr in logged["charts/learning_rate"]] == pytest.approx([1e-3, 7.5e-4, 5e-4, 2.5e-4])


def test_configuration_1_learns_the_same_whatever_its_diagnostic_predictor_does(tmp_path):
    """The predictor of --no-jepa trains on detached embeddings: scaling its loss 1000-fold changes its own
    loss curve and nothing of the agent's, to the bit."""
    runs = [scalars(cached_run(three("1"))[0]),  # --jepa-coef 1, the default
            run_once(three("1", "--jepa-coef", "1000"), tmp_path)]
    for tag in ["charts/episodic_return", "losses/policy_loss", "losses/value_loss", "embedding/variance",
                "grad_norm/encoder"]:
        assert runs[0][tag] == runs[1][tag], tag
    assert runs[0]["grad_norm/predictor"] != runs[1]["grad_norm/predictor"]


def test_same_seed_same_logs_on_cpu(tmp_path):
    """Two runs of one seed log the same values, and scripts/same_logs.py says so; another seed differs (the run of
    the checkpoint test below, whose --save-model and --capture-video change nothing before its greedy episodes)."""
    same_logs = script_module("same_logs")
    run_dirs = [cached_run(three("2"))[0]]
    assert run_script(three("2"), cwd=tmp_path).returncode == 0
    run_dirs += glob.glob(str(tmp_path / "runs" / "*"))
    run_dirs.append(cached_run(CHECKPOINT_RUN)[0])
    runs = [scalars(run_dir) for run_dir in run_dirs]
    for tag in ["losses/policy_loss", "losses/value_loss", "losses/jepa_loss", "charts/episodic_return"]:
        assert runs[0][tag] == runs[1][tag]
    assert same_logs.differing_tags(run_dirs[0], run_dirs[1]) == ([], len(TAGS) - len(TIMINGS))
    differ, _ = same_logs.differing_tags(run_dirs[0], run_dirs[2])
    assert "losses/jepa_loss" in differ and "charts/episodic_return" in differ


NAN_RUN = [*SHORT, "--learning-rate", "1e30", "--max-grad-norm", "1e30"]


def test_nan_loss_stops_with_step_and_keeps_logs(tmp_path):
    """The loss turns NaN in the first update: the episodes of the rollout before it are logged all the same (they
    were lost when the loop logged them after the update)."""
    result = run_script(NAN_RUN, cwd=tmp_path)
    assert result.returncode != 0 and "global step" in result.stderr and "Traceback" not in result.stderr
    (run_dir,) = glob.glob(str(tmp_path / "runs" / "*"))
    assert "charts/episodic_return" in scalars(run_dir)  # what was logged before the NaN survives


COUNT_CLOSES = """
import atexit, runpy, sys
from torch.utils.tensorboard import SummaryWriter
closes, close = [], SummaryWriter.close
def counted_close(self):
    closes.append(1)
    close(self)
SummaryWriter.close = counted_close
atexit.register(lambda: print(f"writer closes: {len(closes)}", file=sys.stderr))
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("flags", [[], ["--save-model"]])
def test_a_non_finite_loss_closes_the_writer_once(flags, tmp_path):
    """Guards a defect: the loop closed the writer on a non-finite loss, and again on its way out."""
    driver = tmp_path / "count_closes.py"
    driver.write_text(COUNT_CLOSES)
    result = subprocess.run([sys.executable, str(driver), SCRIPT, *NAN_RUN, *flags], cwd=tmp_path, capture_output=True,
                            text=True, timeout=240, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode != 0 and "non-finite loss" in result.stderr
    assert "writer closes: 1" in result.stderr


def test_a_non_finite_loss_saves_no_model(tmp_path):
    """Guards a defect: with --save-model, a run stopped by a non-finite loss saved the NaN model to model.pt (and
    said "model saved") as if it had finished. It exits with one line, keeps its logs, and saves nothing."""
    result = run_script([*NAN_RUN, "--save-model"], cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    (message,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert "non-finite loss" in message and "global step" in message and "no model saved" in message
    assert "model saved" not in result.stdout
    (run_dir,) = glob.glob(str(tmp_path / "runs" / "*"))
    assert not os.path.exists(os.path.join(run_dir, "model.pt"))
    assert "charts/episodic_return" in scalars(run_dir)


def run_to_interrupt(script, tmp_path):
    """Start a long run with --save-model, wait for two logged iterations, press Ctrl-C; return (out, err, run dir)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    # a suite started from a background shell inherits SIGINT as ignored: give the child the default handler
    proc = subprocess.Popen([sys.executable, script, "--total-timesteps", "100000", "--save-model", "--no-cuda"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines = 0
    for line in proc.stdout:  # wait for two logged iterations
        lines += line.startswith("step")
        if lines == 2:
            break
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    (run_dir,) = glob.glob(str(tmp_path / "runs" / "*"))
    return out, err, run_dir


def test_ctrl_c_flushes_logs_and_saves_model(tmp_path):
    out, err, run_dir = run_to_interrupt(SCRIPT, tmp_path)
    assert "interrupted" in out and "Traceback" not in err
    assert len(scalars(run_dir)["losses/jepa_loss"]) >= 2
    assert os.path.isfile(os.path.join(run_dir, "model.pt"))


@pytest.mark.parametrize("num_envs", [1, 2, 3])
def test_fewer_than_four_environments_train_to_the_end(num_envs, tmp_path):
    """Guards a defect: with fewer than 4 environments the first frame stacks' image (4 stacks assumed) crashed the
    run before its first iteration, and left its run directory behind. Two iterations run and log to the end."""
    result = run_script(["--num-envs", str(num_envs), "--num-steps", "32", "--total-timesteps", str(64 * num_envs),
                         "--no-cuda"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (run_dir,) = glob.glob(str(tmp_path / "runs" / "*"))
    logged = scalars(run_dir)
    assert set(TAGS) - {"charts/episodic_return", "charts/episodic_length"} <= set(logged)
    assert [step for step, _ in logged["losses/jepa_loss"]] == [32 * num_envs, 64 * num_envs]


# ----------------------------------------------------------------------------- checkpoint and greedy play
def test_play_greedy_records_the_first_episode_to_its_last_state(tmp_path):
    args = jp.Args()
    torch.manual_seed(0)
    encoder, _, _, actor, _, _ = jp.make_agent(args, "cpu")
    with torch.no_grad():
        actor[-1].bias.copy_(torch.tensor([0.0, 100.0]))  # always push right
    gif = str(tmp_path / "episode.gif")
    mean_return = jp.play_greedy(encoder, actor, 32, 96, episodes=2, seed=5, gif_path=gif)
    envs = jp.make_envs(2)
    state, _ = envs.reset(seed=5)
    states, done = [state[0]], False
    while not done:
        state, reward, terminated, truncated, _ = envs.step(np.array([1, 1]))
        states.append(state[0])
        done = terminated[0] or truncated[0]
    envs.close()
    with Image.open(gif) as image:  # Pillow merges identical neighbouring frames, adding up their durations
        durations = []
        for k in range(image.n_frames):
            image.seek(k)
            durations.append(image.info["duration"])
        last = np.array(image.convert("L"))
    assert sum(durations) == 20 * len(states)  # the first state and one per step, the terminal one included
    expected = jp.render_cartpole(torch.tensor(np.array(states[-1:]), dtype=torch.float32), 160, 600)[0].numpy()
    assert np.abs(last.astype(int) - expected).max() <= 1
    assert 1 < mean_return < 30  # pushing right only falls within a few dozen steps


CHECKPOINT_RUN = three("2", "--save-model", "--capture-video", seed=8)


def test_checkpoint_saves_the_run_and_capture_video_plays_greedy_episodes():
    """--save-model --capture-video: model.pt holds the flags and the five modules' weights, from which a fresh
    ViT and actor replay the logged greedy return; the GIF shows the first greedy episode at full resolution."""
    run_dir, result = cached_run(CHECKPOINT_RUN)
    assert "mean return over 10 greedy episodes" in result.stdout and "model saved" in result.stdout
    logged = scalars(run_dir)
    assert [step for step, _ in logged["charts/greedy_return"]] == [768]
    with Image.open(os.path.join(run_dir, "greedy_episode.gif")) as gif:
        assert gif.n_frames > 1 and gif.size == (600, 160)
    saved = torch.load(os.path.join(run_dir, "model.pt"), weights_only=True)
    assert set(saved) == {"args", *MODULES}
    assert saved["args"] == dataclasses.asdict(jp.parse_args(CHECKPOINT_RUN))
    # trained: the x-encoder left its initialisation, and the EMA moved the y-encoder after it, not onto it
    torch.manual_seed(8)
    initial = jp.make_vit(jp.parse_args([])).state_dict()
    assert not any(torch.equal(initial[k], v) for k, v in saved["encoder"].items())
    assert not any(torch.equal(initial[k], v) or torch.equal(saved["encoder"][k], v)
                   for k, v in saved["target_encoder"].items())
    args = jp.Args(**saved["args"])
    encoder = jp.ViTEncoder(args.frame_height, args.frame_width, args.patch_size, args.embed_dim, args.depth,
                            args.num_heads, args.mlp_ratio)
    encoder.load_state_dict(saved["encoder"])
    actor = jp.make_heads(args.embed_dim)[0]
    actor.load_state_dict(saved["actor"])
    (_, greedy_return), = logged["charts/greedy_return"]
    assert jp.play_greedy(encoder, actor, 32, 96, 10, args.seed) == pytest.approx(greedy_return)


def test_default_configuration_learns(tmp_path):
    """A short default run on a fixed seed ends far above a random policy (about 22)."""
    result = run_script(["--total-timesteps", "40000", "--seed", "1", "--no-cuda"], cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr
    (run_dir,) = glob.glob(str(tmp_path / "runs" / "*"))
    returns = scalars(run_dir)["charts/episodic_return"]
    last = [v for step, v in returns if step > 30000]
    assert np.mean(last) > 60
