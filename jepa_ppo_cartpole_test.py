"""Tests of jepa_ppo_cartpole.py: run with `python -m pytest -q jepa_ppo_cartpole_test.py`."""

import glob
import math
import os
import signal
import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import jepa_ppo_cartpole as jp

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "jepa_ppo_cartpole.py")
TAGS = [
    "charts/episodic_return", "charts/episodic_length", "charts/SPS", "charts/learning_rate",
    "losses/value_loss", "losses/policy_loss", "losses/entropy", "losses/approx_kl", "losses/clipfrac",
    "losses/explained_variance", "losses/jepa_loss", "losses/var_loss",
    "embedding/variance", "embedding/variance_pre_ln", "embedding/ln_gain_norm", "embedding/target_variance",
    "embedding/collapsed", "embedding/effective_rank",
    "grad_norm/encoder", "grad_norm/predictor", "grad_norm/actor", "grad_norm/critic",
    "probe/r2_cart_position", "probe/r2_cart_velocity", "probe/r2_pole_angle", "probe/r2_pole_velocity",
    "probe/onpolicy_r2_cart_position", "probe/onpolicy_r2_cart_velocity", "probe/onpolicy_r2_pole_angle",
    "probe/onpolicy_r2_pole_velocity",
]
CONFIGS = {
    "1": ["--no-jepa", "--rl-grad", "--no-var-reg"],
    "2": ["--jepa", "--rl-grad", "--no-var-reg"],
    "3": ["--jepa", "--no-rl-grad", "--no-var-reg"],
    "4": ["--jepa", "--no-rl-grad", "--var-reg"],
}
SHORT = ["--total-timesteps", "512", "--num-envs", "8", "--num-steps", "32", "--no-cuda"]


def run_script(args, cwd, timeout=240):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def run_once(args, cwd):
    """Run the script to the end in `cwd` and return the scalars of its one run directory."""
    result = run_script(args, cwd)
    assert result.returncode == 0, result.stderr
    (run_dir,) = glob.glob(os.path.join(str(cwd), "runs", "*"))
    return scalars(run_dir)


def scalars(run_dir):
    acc = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def small_args(**overrides):
    args = jp.Args(**overrides)
    args.batch_size = args.num_envs * args.num_steps
    return args


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
    states = np.stack([rng.uniform(-2.4, 2.4, n), rng.uniform(-2, 2, n), rng.uniform(-0.21, 0.21, n), rng.uniform(-2, 2, n)], 1)
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
        state, reward, terminated, done, next_stack, _ = jp.step_envs(envs, action, stack, is_reset, height, width)
        rows.append(dict(stack=stack, valid=~is_reset, reward=reward, terminated=terminated, done=done, state=state, next_stack=next_stack))
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
def make_models(**overrides):
    args = small_args(**overrides)
    torch.manual_seed(0)
    encoder, predictor = jp.make_encoder(args), jp.Predictor(args.embed_dim, args.predictor_hidden)
    actor, critic = jp.make_heads(args.embed_dim)
    return args, encoder, predictor, actor, critic


def fake_minibatch(args, n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    states = torch.rand(n, 4, generator=g) * torch.tensor([4.0, 2, 0.4, 2]) - torch.tensor([2.0, 1, 0.2, 1])
    stacks = jp.render_cartpole(states, args.frame_height, args.frame_width)[:, None].repeat(1, 3, 1, 1)
    return {"stacks": stacks, "actions": torch.randint(0, 2, (n,), generator=g), "logprobs": torch.full((n,), -0.69),
            "advantages": torch.randn(n, generator=g), "returns": torch.randn(n, generator=g), "values": torch.randn(n, generator=g),
            "targets": torch.randn(n, args.embed_dim, generator=g)}


def test_encoder_and_predictor_shapes():
    args, encoder, predictor, _, _ = make_models()
    stacks = fake_minibatch(args)["stacks"]
    s_x = encoder(stacks)
    assert s_x.shape == (16, args.embed_dim)
    tokens = 3 * (args.frame_height // args.patch_size) * (args.frame_width // args.patch_size)
    assert tokens == 36
    assert predictor(s_x, torch.zeros(16, dtype=torch.long)).shape == (16, args.embed_dim)


def test_cnn_encoder_reads_the_three_frames_as_channels():
    args, encoder, *_ = make_models(encoder="cnn")
    assert isinstance(encoder, jp.CNNEncoder) and encoder.convs[0].in_channels == 3
    stacks = fake_minibatch(args, n=4)["stacks"]
    s_x = encoder(stacks)
    assert s_x.shape == (4, args.embed_dim) and torch.equal(s_x, encoder.ln_f(encoder.pre_norm(stacks)))
    moved = stacks.clone()
    moved[:, 0] = 255  # a change in the oldest frame alone changes the embedding
    assert not torch.allclose(encoder(moved), s_x)


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


def test_tubelets_make_one_token_per_patch_position_that_sees_all_frames():
    args, encoder, *_ = make_models(tubelets=True)
    _, per_frame, *_ = make_models()
    stacks = fake_minibatch(args, n=2)["stacks"]
    patches = (args.frame_height // args.patch_size) * (args.frame_width // args.patch_size)
    assert encoder(stacks).shape == (2, args.embed_dim)
    assert tokens_seen(encoder, stacks) == patches + 1 and tokens_seen(per_frame, stacks) == 3 * patches + 1
    stacks[:, 0] = 255  # the frame order still matters: a tubelet keeps its frames in order
    assert not torch.allclose(encoder(stacks), encoder(stacks.flip(1)), atol=1e-5)


@pytest.mark.parametrize("tubelets", [False, True])
@pytest.mark.parametrize("patch_embed", ["linear", "conv"])
def test_a_pixel_reaches_only_the_tokens_of_its_frame_and_place(patch_embed, tubelets):
    """Flip one pixel of frame 1 in patch (row 0, column 2): the linear embedding changes that patch's token alone;
    the conv stem (3x3 stride-2 convolutions, a 31 x 31 window around each patch's top-left corner) changes only
    tokens of that frame at rows 0-1, columns 2-3, that patch's among them. A tubelet spans all three frames."""
    args, encoder, *_ = make_models(patch_embed=patch_embed, tubelets=tubelets)
    stacks = fake_minibatch(args, n=2)["stacks"]
    with torch.no_grad():
        tokens = encoder.embed_patches(stacks)
        assert tokens.shape == (2, 1 if tubelets else 3, 2, 6, args.embed_dim)
        flipped = stacks.clone()
        flipped[:, 1, 2, 2 * 16 + 2] = 255 - flipped[:, 1, 2, 2 * 16 + 2]
        changed = (encoder.embed_patches(flipped) - tokens).abs().amax(dim=(0, 4)) > 1e-6  # (frames, rows, cols)
    frame = 0 if tubelets else 1
    allowed = {(frame, 0, 2)} if patch_embed == "linear" else {(frame, r, c) for r in (0, 1) for c in (2, 3)}
    changed_at = {tuple(i) for i in changed.nonzero().tolist()}
    assert (frame, 0, 2) in changed_at and changed_at <= allowed
    assert tokens_seen(encoder, stacks) == changed.numel() + 1


@pytest.mark.parametrize("overrides", [{}, {"tubelets": True}, {"patch_embed": "conv"}, {"encoder": "cnn"}],
                         ids=["per-frame", "tubelets", "conv-stem", "cnn"])
def test_frame_diffs_make_a_still_stack_read_as_two_blank_frames_and_its_last(overrides):
    """In ink a zero difference is white (0), so under --frame-diffs a stack of three equal frames must embed as
    the stack (white, white, last frame) does without it, on every encoder path."""
    args, encoder, *_ = make_models(frame_diffs=True, **overrides)
    still = fake_minibatch(args, n=2)["stacks"]  # the three frames of each stack are the same
    blank_then_last = still.clone()
    blank_then_last[:, :2] = 255
    with torch.no_grad():
        with_diffs = encoder.pre_norm(still)
        encoder.frame_diffs = False
        assert torch.allclose(with_diffs, encoder.pre_norm(blank_then_last), atol=1e-5)  # ink of 255 is -6e-8, not 0
        assert not torch.allclose(with_diffs, encoder.pre_norm(still), atol=1e-3)


@pytest.mark.parametrize("ink", [True, False])
def test_frame_diffs_a_pixel_of_one_frame_reaches_only_the_inputs_that_hold_that_frame(ink):
    """Inputs (t-1 - (t-2), t - (t-1), t): frame t-2 is in the first only, t-1 in the first two, t in the last two."""
    args = small_args(ink=ink)
    stacks = fake_minibatch(args, n=2)["stacks"]
    stacks[:, 0] = jp.render_cartpole(torch.tensor([[0.3, 0, -0.1, 0]] * 2), args.frame_height, args.frame_width)
    pixels = jp.to_pixels(stacks, ink)
    inputs = jp.encoder_input(stacks, ink, True)
    assert torch.equal(inputs, torch.stack([pixels[:, 1] - pixels[:, 0], pixels[:, 2] - pixels[:, 1], pixels[:, 2]], 1))
    for frame, reached in [(0, {0}), (1, {0, 1}), (2, {1, 2})]:
        flipped = stacks.clone()
        flipped[:, frame, 20, 40] = 255 - flipped[:, frame, 20, 40]
        changed = (jp.encoder_input(flipped, ink, True) - inputs).abs().amax(dim=(0, 2, 3)) > 0
        assert set(changed.nonzero().flatten().tolist()) == reached


@pytest.mark.parametrize("patch_embed", ["linear", "conv"])
def test_untrained_embedding_tells_frames_apart(patch_embed):
    """At initialisation the embedding must vary over the probe set's stacks: the conv stem with PyTorch's default
    init started at a variance of 1e-5 (the linear embedding: 1e-2), and configuration 2 then collapsed."""
    args, encoder, *_ = make_models(patch_embed=patch_embed)
    stacks, _ = jp.make_probe_set(0, args.frame_height, args.frame_width, "cpu")
    with torch.no_grad():
        assert jp.embedding_variance(encoder(stacks[:128])).item() > 3e-3


@pytest.mark.parametrize("encoder_type", ["vit", "cnn"])
@pytest.mark.parametrize("ink, white", [(True, 0.0), (False, 1.0)])
def test_encoder_reads_ink_or_raw_intensity(ink, white, encoder_type):
    args, encoder, *_ = make_models(ink=ink, encoder=encoder_type)
    seen = []
    first = encoder.patch_embed if encoder_type == "vit" else encoder.convs[0]
    first.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0]))
    encoder(torch.full((1, 3, 32, 96), 255, dtype=torch.uint8))
    assert seen[0].dtype == torch.float32 and torch.allclose(seen[0], torch.full_like(seen[0], white), rtol=0, atol=1e-6)


@pytest.mark.parametrize("final_ln", [True, False])
def test_final_layernorm_switch(final_ln):
    args, encoder, *_ = make_models(final_ln=final_ln)
    stacks = fake_minibatch(args, n=4)["stacks"]
    cls, s_x = encoder.pre_norm(stacks), encoder(stacks)
    if final_ln:  # at initialisation: gain 1, bias 0, so each embedding has mean 0 and variance 1
        torch.testing.assert_close(s_x.mean(-1), torch.zeros(4), atol=1e-5, rtol=0)
        torch.testing.assert_close(s_x.var(-1, unbiased=False), torch.ones(4), atol=1e-3, rtol=0)
    else:
        assert torch.equal(s_x, cls) and not any(isinstance(m, torch.nn.LayerNorm) for m in [encoder.ln_f])


@pytest.mark.parametrize("weight_decay", [0.0, 0.5])
def test_weight_decay_is_decoupled(weight_decay):
    args = small_args(weight_decay=weight_decay, learning_rate=0.1)
    *modules, optimizer = jp.make_agent(args, "cpu")
    trained = [p for m in [modules[0], *modules[2:]] for p in m.parameters()]
    before = [p.detach().clone() for p in trained]
    for p in trained:
        p.grad = torch.zeros_like(p)  # no gradient: only the decay moves the weights
    optimizer.step()
    for p, b in zip(trained, before):
        torch.testing.assert_close(p.detach(), b * (1 - 0.1 * weight_decay))


def test_predictor_output_depends_on_action():
    args, encoder, predictor, _, _ = make_models()
    s_x = encoder(fake_minibatch(args, n=4)["stacks"])
    left, right = predictor(s_x, torch.zeros(4, dtype=torch.long)), predictor(s_x, torch.ones(4, dtype=torch.long))
    assert (left - right).abs().min() > 0


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
    assert encoder.patch_embed.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("flags, weights", [
    (dict(jepa=True, rl_grad=True, var_reg=False), {"jepa_loss": 1.0, "ppo": 1.0}),
    (dict(jepa=True, rl_grad=False, var_reg=False), {"jepa_loss": 1.0}),
    (dict(jepa=True, rl_grad=False, var_reg=True, var_coef=0.5), {"jepa_loss": 1.0, "var_loss": 0.5}),
    (dict(jepa=False, rl_grad=True, var_reg=False, jepa_coef=0.3), {"ppo": 1.0}),
])
def test_encoder_gradient_comes_from_exactly_the_configured_losses(flags, weights):
    args, encoder, predictor, actor, critic = make_models(**flags)
    losses = jp.minibatch_losses(args, encoder, predictor, actor, critic, fake_minibatch(args))
    losses["ppo"] = losses["policy_loss"] - args.ent_coef * losses["entropy"] + args.vf_coef * losses["value_loss"]
    expected = sum(w * losses[name] for name, w in weights.items())
    grad = lambda loss: torch.autograd.grad(loss, list(encoder.parameters()), retain_graph=True, allow_unused=True)
    for got, want in zip(grad(losses["loss"]), grad(expected)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


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
    target = jp.ViTEncoder(args)
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


def test_probe_r2_recovers_a_linear_state():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(400, 8, generator=g)
    y = torch.stack([s[:, 0] * 2 + 1, torch.randn(400, generator=g)], 1)  # one readable, one noise
    r2 = jp.probe_r2(s[:200], y[:200], s[200:], y[200:])
    assert r2[0] > 0.99 and r2[1] < 0.1


def test_probe_set_holds_real_moving_stacks_labelled_by_their_last_frame():
    stacks, states = jp.make_probe_set(seed=3, height=32, width=96, device="cpu")
    assert stacks.shape == (jp.PROBE_STATES, 3, 32, 96) and stacks.dtype == torch.uint8 and states.shape == (jp.PROBE_STATES, 4)
    assert torch.equal(stacks[:, 2], jp.render_cartpole(states, 32, 96))  # the label is the state of the last frame
    # two real steps: the frames differ, and no state left Gymnasium's limits (which would have reset it)
    assert (stacks[:, 0] != stacks[:, 2]).flatten(1).any(1).float().mean() > 0.9
    assert states[:, 0].abs().max() < 2.4 and states[:, 2].abs().max() < 0.2095
    # spread over the box, so a probe has something to explain; same seed, same set
    assert (states.std(0) > torch.tensor([0.8, 0.6, 0.05, 0.6])).all()
    again, _ = jp.make_probe_set(seed=3, height=32, width=96, device="cpu")
    assert torch.equal(stacks, again)


def test_probe_set_with_a_frame_gap_shows_frames_gap_steps_apart():
    """--frame-gap 2: frames 0, 2, 4 of one real trajectory each (its frames 1 and 3 are played, not shown)."""
    stacks, states = jp.make_probe_set(seed=3, height=32, width=96, device="cpu", gap=2)
    assert stacks.shape == (jp.PROBE_STATES, 3, 32, 96) and torch.equal(stacks[:, 2], jp.render_cartpole(states, 32, 96))
    plain, _ = jp.make_probe_set(seed=3, height=32, width=96, device="cpu")
    assert torch.equal(stacks[:, 0], plain[:, 0]) and torch.equal(stacks[:, 1], plain[:, 2])  # same start, same pushes
    # the motion from first to last frame is larger than over the plain stack's two steps
    moved = lambda s: (s[:, 2].float() - s[:, 0].float()).abs().sum((1, 2)).mean()
    assert moved(stacks) > 1.5 * moved(plain)
    # with a gap of 3 some poles pass Gymnasium's 12 degrees within the 6 steps: drawn there, not reset to an upright start
    _, far = jp.make_probe_set(seed=3, height=32, width=96, device="cpu", gap=3)
    assert (far[:, 2].abs() > 0.2095).sum() >= 10
    start = np.random.default_rng(3).uniform(-jp.PROBE_BOX, jp.PROBE_BOX, size=(jp.PROBE_STATES, 4))  # make_probe_set's draw
    assert ((far[:, 0] - torch.tensor(start[:, 0], dtype=torch.float32)).abs() < 0.4).all()  # no cart jumped back to 0


def test_onpolicy_probe_fits_on_half_the_environments_and_scores_on_the_rest(monkeypatch):
    """Each stack carries a row id in a pixel; the stub encoder reads it back, the label holds it too."""
    T, N, pool, ids = 4, 6, [], iter(range(1, 256))
    for _ in range(2):  # two rollouts in the pool
        stacks = torch.zeros(T, N, 3, 8, 8, dtype=torch.uint8)
        states = torch.zeros(T, N, 4)
        for t in range(T):
            for n in range(N):
                stacks[t, n, 2, 0, 0] = states[t, n, 0] = next(ids)
        valid = torch.ones(T, N, dtype=torch.bool)
        valid[1, 0] = valid[2, 4] = False  # reset rows of NEXT_STEP autoreset
        pool.append((stacks, states, valid))
    seen = {}
    monkeypatch.setattr(jp, "probe_r2", lambda *parts: seen.update(zip(["s_fit", "y_fit", "s_test", "y_test"], parts)))
    jp.onpolicy_probe_r2(lambda stacks: stacks[:, 2, 0, :1].float(), pool)

    expected = lambda envs: {int(states[t, n, 0]) for stacks, states, valid in pool for t in range(T) for n in envs if valid[t, n]}
    assert set(seen["y_fit"][:, 0].int().tolist()) == expected(range(N // 2))  # only environments 0-2, only real rows
    assert set(seen["y_test"][:, 0].int().tolist()) == expected(range(N // 2, N))
    assert len(seen["y_fit"]) + len(seen["y_test"]) == sum(int(valid.sum()) for _, _, valid in pool)
    assert torch.equal(seen["s_fit"][:, 0], seen["y_fit"][:, 0]) and torch.equal(seen["s_test"][:, 0], seen["y_test"][:, 0])


def test_effective_rank_is_centred():
    g = torch.Generator().manual_seed(0)
    spread = torch.randn(256, 8, generator=g)  # even spread in 8 directions
    assert jp.effective_rank(spread) > 7.5
    assert jp.effective_rank(spread + 100.0) > 7.5  # a large shared offset is no direction
    assert jp.effective_rank(torch.ones(16, 8)) == pytest.approx(1.0)  # no spread at all
    assert jp.effective_rank(torch.randn(64, 1, generator=g) * torch.ones(1, 8) + 5.0) == pytest.approx(1.0, abs=1e-6)


def test_collapse_indicator_fires_on_a_collapsed_batch_only():
    g = torch.Generator().manual_seed(0)
    point = torch.randn(1, 64, generator=g).expand(128, 64)
    assert jp.embedding_variance(point + 1e-5 * torch.randn(128, 64, generator=g)) < 1e-7
    assert jp.embedding_variance(point + 1e-2 * torch.randn(128, 64, generator=g)) > 1e-7


# ------------------------------------------------------------- one iteration: rollout, batch, update
def test_collect_rollout_aligns_rewards_dones_and_resets_with_the_action_that_caused_them():
    args = small_args(num_envs=2, num_steps=48)
    torch.manual_seed(0)
    encoder, _, _, actor, critic, _ = jp.make_agent(args, "cpu")
    envs = jp.make_envs(args.num_envs)
    state, _ = envs.reset(seed=1)
    state = torch.as_tensor(state)
    env_state = {"state": state, "history": jp.initial_stack(state, 32, 96, 3), "is_reset_step": torch.zeros(2, dtype=torch.bool)}
    rollout, timings = jp.make_rollout_storage(args, "cpu"), {"env": 0.0, "inference": 0.0}
    episodes = jp.collect_rollout(envs, encoder, actor, critic, rollout, env_state, timings, 1)
    envs.close()
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
    assert torch.equal(stacks[:-1, :, 2].flatten(0, 1), jp.render_cartpole(rollout["states"].flatten(0, 1), 32, 96))
    assert torch.equal(stacks[-1], env_state["history"])
    # what the rollout stored is what the policy computed on the stored stack
    with torch.no_grad():
        s_x = encoder(stacks[:-1].flatten(0, 1))
        logits = actor(s_x)
    torch.testing.assert_close(rollout["embeddings"].flatten(0, 1), s_x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rollout["pre_norm"].flatten(0, 1), encoder.pre_norm(stacks[:-1].flatten(0, 1)).detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rollout["values"].flatten(), critic(s_x).flatten().detach(), rtol=1e-5, atol=1e-5)
    logprobs = torch.log_softmax(logits, -1).gather(1, rollout["actions"].flatten()[:, None])[:, 0]
    torch.testing.assert_close(rollout["logprobs"].flatten(), logprobs, rtol=1e-5, atol=1e-5)


def test_frame_gap_feeds_the_encoder_frames_gap_steps_apart_and_restarts_episodes():
    """--frame-gap 2: the stack stored for row t is frames (t-4, t-2, t) of its episode; its first rows repeat the
    episode's first frame where the earlier ones are missing; the JEPA target (row t + 1) is frames (t-3, t-1, t+1),
    the reset row of NEXT_STEP autoreset included: it ends the old episode, at its terminal state."""
    args = small_args(num_envs=2, num_steps=48, frame_gap=2)
    torch.manual_seed(0)
    encoder, _, _, actor, critic, _ = jp.make_agent(args, "cpu")
    envs = jp.make_envs(2)
    state = torch.as_tensor(envs.reset(seed=1)[0])
    env_state = {"state": state, "history": jp.initial_stack(state, 32, 96, 5), "is_reset_step": torch.zeros(2, dtype=torch.bool)}
    rollout = jp.make_rollout_storage(args, "cpu")
    jp.collect_rollout(envs, encoder, actor, critic, rollout, env_state, {"env": 0.0, "inference": 0.0}, 2)
    envs.close()
    frames = jp.render_cartpole(rollout["states"].flatten(0, 1), 32, 96).view(48, 2, 32, 96)  # frame of each row
    stacks, valid, checked = rollout["stacks"], rollout["valid"], 0
    for n in range(2):
        start = 0
        for t in range(48):
            # the earlier frames of an episode's first rows are its first frame; a reset row still shows the old episode
            expected = [frames[max(t - k, start), n] for k in (4, 2, 0)]
            assert all(torch.equal(stacks[t, n, i], expected[i]) for i in range(3)), (t, n)
            checked += 1
            if not valid[t, n]:
                start = t + 1  # the reset row: the next episode starts at row t + 1 (its first state)
    assert checked == 96 and (~valid).sum() >= 2
    assert torch.equal(stacks[-1], jp.encoder_view(env_state["history"], 2))
    with pytest.raises(AssertionError, match="does not fit --frame-gap 2"):  # a history built for another gap
        jp.encoder_view(jp.initial_stack(state, 32, 96, 3), 2)


def labelled_rollout(T=4, N=2):
    """A rollout whose every stack carries an id, 10 t + n + 1, in all its pixels; row 1 of env 0 is a reset row."""
    args = small_args(num_envs=N, num_steps=T, gamma=0.5, gae_lambda=1.0)
    rollout = jp.make_rollout_storage(args, "cpu")
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


def test_make_batch_bootstraps_from_the_stack_after_the_last_row_and_stops_at_dones():
    args, rollout = labelled_rollout()  # rewards, values and terminations 0: only the bootstrap is left
    rollout["dones"][1, 1] = 1.0
    batch = jp.make_batch(args, rollout, read_id, lambda stacks: read_id(stacks) + 1000, lambda s: s)
    advantage = {int(i): float(a) for i, a in zip(read_id(batch["stacks"])[:, 0], batch["advantages"])}
    next_value = [41.0, 42.0]  # ids of the stack after row T - 1 = 3
    assert advantage[31] == pytest.approx(0.5 * next_value[0]) and advantage[1] == pytest.approx(0.5 ** 4 * next_value[0])
    assert advantage[32] == pytest.approx(0.5 * next_value[1]) and advantage[22] == pytest.approx(0.25 * next_value[1])
    assert advantage[12] == 0.0 and advantage[2] == 0.0  # the done at row 1 of env 1 cuts the return
    torch.testing.assert_close(batch["returns"], batch["advantages"] + batch["values"])


def test_make_batch_with_fresh_targets_keeps_the_next_stacks_instead():
    args, rollout = labelled_rollout()
    args.fresh_targets = True
    batch = jp.make_batch(args, rollout, read_id, read_id, lambda s: s)
    assert "targets" not in batch
    assert torch.equal(read_id(batch["next_stacks"]), read_id(batch["stacks"]) + 10)


def make_agent_and_batch(n=64, seed=0, **overrides):
    args = small_args(**overrides)
    torch.manual_seed(0)
    agent = jp.make_agent(args, "cpu")
    batch = fake_minibatch(args, n=n, seed=seed)
    batch["next_stacks"] = 255 - batch["stacks"]  # any stacks that are not the current ones
    if args.fresh_targets:
        del batch["targets"]
    return args, agent, batch


def run_update(args, agent, batch, seed=0):
    torch.manual_seed(seed)  # the minibatch order
    return jp.update(args, *agent[:5], agent[5], batch)


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
        results.append({name: [p.detach().clone() for p in module.parameters()] for name, module in zip(MODULES, agent[:5])})
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
    assert norms["big"].item() == pytest.approx(10.0 * math.sqrt(20)) and norms["small"].item() == pytest.approx(0.01 * math.sqrt(20))
    assert torch.cat([p.grad.flatten() for p in big.parameters()]).norm().item() == pytest.approx(1.0)
    assert all(torch.equal(p.grad, g) for p, g in zip(small.parameters(), small_before))


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


@pytest.mark.parametrize("per_iteration", [False, True])
def test_update_moves_the_y_encoder_by_the_ema_after_every_step_or_once(per_iteration):
    args, agent, batch = make_agent_and_batch(update_epochs=2, num_minibatches=2, ema_per_iteration=per_iteration)
    encoder, target_encoder, optimizer = agent[0], agent[1], agent[5]
    online = []  # the x-encoder after each optimizer step
    optimizer.register_step_post_hook(lambda *_: online.append([p.detach().clone() for p in encoder.parameters()]))
    expected = [p.clone() for p in target_encoder.parameters()]
    run_update(args, agent, batch)
    assert len(online) == 4
    for params in (online[-1:] if per_iteration else online):
        expected = [0.99 * e + 0.01 * o for e, o in zip(expected, params)]
    for new, want in zip(target_encoder.parameters(), expected):
        torch.testing.assert_close(new, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fresh", [False, True])
def test_fresh_targets_come_from_the_y_encoder_at_each_step(fresh):
    args, agent, batch = make_agent_and_batch(update_epochs=2, num_minibatches=2, fresh_targets=fresh)
    target_encoder = agent[1]
    seen, inputs = [], []
    def record(module, args_in, output):
        seen.append(module.cls_token.detach().clone())
        inputs.append(args_in[0])
    target_encoder.register_forward_hook(record)
    run_update(args, agent, batch)
    if fresh:  # one target pass per minibatch, each by a y-encoder the previous step's EMA has moved
        assert len(seen) == 4 and all(not torch.equal(a, b) for a, b in zip(seen, seen[1:]))
        next_sums = set(batch["next_stacks"].flatten(1).sum(1).tolist())  # the y-encoder embeds the next stacks
        assert all(set(x.flatten(1).sum(1).tolist()) <= next_sums for x in inputs)
    else:  # the targets came with the batch
        assert seen == []


def test_update_stops_on_a_non_finite_loss():
    args, agent, batch = make_agent_and_batch()
    batch["returns"][0] = float("nan")
    with pytest.raises(FloatingPointError):
        run_update(args, agent, batch)


# -------------------------------------------------------------------------------------------- flags
@pytest.mark.parametrize("argv, flag", [
    (["--num-envs", "0"], "--num-envs"),
    (["--num-steps", "-3"], "--num-steps"),
    (["--num-minibatches", "3"], "--num-minibatches"),
    (["--frame-height", "30"], "--frame-height"),
    (["--total-timesteps", "100"], "--total-timesteps"),
    (["--ema-tau", "1.5"], "--ema-tau"),
    (["--ema-tau", "-0.1"], "--ema-tau"),
    (["--num-heads", "3"], "--num-heads"),
    (["--no-jepa", "--no-rl-grad"], "--no-rl-grad"),
    (["--learning-rate", "0"], "--learning-rate"),
    (["--weight-decay", "-0.1"], "--weight-decay"),
    (["--probe-every", "0"], "--probe-every"),
    (["--image-every", "0"], "--image-every"),
    (["--encoder", "mlp"], "--encoder"),
    (["--patch-embed", "conv", "--patch-size", "6", "--frame-height", "36"], "--patch-embed conv"),
    (["--patch-embed", "cnn"], "--patch-embed"),
    (["--encoder", "cnn", "--patch-size", "4", "--frame-height", "12"], "--encoder cnn"),
    (["--bogus-flag", "1"], "--bogus-flag"),
    (["--num-envs", "eight"], "--num-envs"),
    (["--frame-gap", "0"], "--frame-gap"),
])
def test_bad_flags_exit_with_one_line(argv, flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        jp.parse_args(argv)
    message = str(exit_info.value.code)
    assert exit_info.value.code != 0 and flag in message and "\n" not in message.strip()


@pytest.mark.parametrize("kind", ["corrupt bytes", "another program's file", "a torch file without a model",
                                  "a model of another size", "a directory"])
def test_eval_checkpoint_that_is_no_checkpoint_exits_with_one_line(kind, tmp_path):
    path = tmp_path / "model.pt"
    if kind == "corrupt bytes":
        path.write_bytes(bytes(range(256)) * 4)
    elif kind == "another program's file":
        path.write_text("step,return\n1,20\n")
    elif kind == "a torch file without a model":
        torch.save({"weights": torch.zeros(3)}, path)
    elif kind == "a model of another size":
        args = small_args()
        torch.manual_seed(0)
        jp.save_checkpoint(str(path), args, *jp.make_agent(args, "cpu")[:5])
        saved = torch.load(path)
        saved["args"]["embed_dim"] = 32
        torch.save(saved, path)
    else:
        path.mkdir()
    with pytest.raises(SystemExit) as exit_info:
        jp.parse_args(["--eval-checkpoint", str(path)])
    message = str(exit_info.value.code)
    assert "--eval-checkpoint" in message and "\n" not in message.strip()


def test_a_wrapped_tyro_message_stays_whole_on_one_line():
    with pytest.raises(SystemExit) as exit_info:
        jp.parse_args(["--encoder", "mlp"])
    message = str(exit_info.value.code)
    assert "'vit'" in message and "'cnn'" in message and "\n" not in message  # tyro wraps the allowed values


def test_bad_flag_from_command_line_leaves_no_run_directory(tmp_path):
    result = run_script(["--num-minibatches", "5"], cwd=tmp_path)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "--num-minibatches" in result.stderr
    assert not (tmp_path / "runs").exists()


def test_defaults_are_the_papers_best_configuration():
    args = jp.parse_args([])
    assert (args.jepa, args.rl_grad, args.var_reg) == (True, True, False)
    assert args.embed_dim == 64 and args.ema_tau == 0.99 and args.total_timesteps == 100_000
    assert args.batch_size == args.num_envs * args.num_steps
    assert args.lr_warmup_iters == 40  # beyond the paper; adopted after screening, every result since uses it


def test_run_directories_are_unique(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(jp.time, "time", lambda: 1234567890.0)
    args = jp.parse_args([])
    first, second = jp.make_run_dir(args), jp.make_run_dir(args)
    assert first != second and os.path.isdir(first) and os.path.isdir(second)
    assert "jepa-rlgrad-novar" in first and "s1" in first
    elsewhere = jp.make_run_dir(jp.parse_args(["--runs-dir", "sweep/logs", "--exp-name", "fig3"]))
    assert os.path.dirname(elsewhere) == os.path.join("sweep", "logs") and os.path.basename(elsewhere).startswith("fig3__")


# ------------------------------------------------------------------------------- end to end, logged
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_each_configuration_logs_every_tag(config, tmp_path):
    result = run_script([*CONFIGS[config], *SHORT], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "SPS" in result.stdout and "return" in result.stdout
    (run_dir,) = glob.glob(str(tmp_path / "runs" / "*"))
    logged = scalars(run_dir)
    missing = [tag for tag in TAGS if tag not in logged]
    assert not missing
    assert all(np.isfinite(v) for tag in TAGS if not tag.startswith("losses/explained") for _, v in logged[tag])
    # the collapse flag is the paper's threshold on the logged variance; the learning rate anneals linearly to 0,
    # times the default warm-up over 40 iterations
    assert [c for _, c in logged["embedding/collapsed"]] == [float(v < 1e-7) for _, v in logged["embedding/variance"]]
    assert [lr for _, lr in logged["charts/learning_rate"]] == pytest.approx([1e-3 * 1 / 40, 5e-4 * 2 / 40])
    acc = EventAccumulator(run_dir)
    acc.Reload()
    assert acc.Tags()["images"]  # what the agent sees
    assert acc.Tags()["tensors"]  # the hyperparameter table (text)


def test_warmup_schedule_in_the_loop_and_frame_diffs_smoke(tmp_path):
    """--lr-warmup-iters 2 over 4 iterations: the rate rises over the first two, times the linear annealing
    (--frame-diffs and --frame-gap ride along as a smoke test of the loop; their inputs are tested above)."""
    logged = run_once([*CONFIGS["2"], *SHORT, "--total-timesteps", "1024", "--lr-warmup-iters", "2", "--frame-diffs",
                       "--frame-gap", "2"], tmp_path)
    assert [lr for _, lr in logged["charts/learning_rate"]] == pytest.approx([5e-4, 7.5e-4, 5e-4, 2.5e-4])
    assert all(np.isfinite(v) for _, v in logged["losses/jepa_loss"])


def test_no_warmup_gives_the_plain_annealing_in_the_loop(tmp_path):
    """--lr-warmup-iters 0, the setting of every result before the warm-up became the default: linear annealing alone."""
    logged = run_once([*CONFIGS["1"], *SHORT, "--total-timesteps", "1024", "--lr-warmup-iters", "0"], tmp_path)
    assert [lr for _, lr in logged["charts/learning_rate"]] == pytest.approx([1e-3, 7.5e-4, 5e-4, 2.5e-4])


def test_cnn_encoder_runs_the_loop(tmp_path):
    logged = run_once([*CONFIGS["2"], *SHORT, "--encoder", "cnn", "--image-every", "1"], tmp_path)
    assert all(tag in logged for tag in TAGS)
    acc = EventAccumulator(glob.glob(str(tmp_path / "runs" / "*"))[0])
    acc.Reload()
    assert acc.Tags()["images"] == ["observations/frame_stacks"]  # no attention maps without attention


def test_configuration_1_learns_the_same_whatever_its_diagnostic_predictor_does(tmp_path):
    """The predictor of --no-jepa trains on detached embeddings: scaling its loss 1000-fold changes its own
    loss curve and nothing of the agent's, to the bit."""
    config_1 = [*CONFIGS["1"], *SHORT, "--total-timesteps", "768", "--seed", "3"]
    runs = []
    for coef in ["1", "1000"]:
        (tmp_path / coef).mkdir()
        runs.append(run_once([*config_1, "--jepa-coef", coef], tmp_path / coef))
    for tag in ["charts/episodic_return", "losses/policy_loss", "losses/value_loss", "embedding/variance", "grad_norm/encoder"]:
        assert runs[0][tag] == runs[1][tag], tag
    assert runs[0]["grad_norm/predictor"] != runs[1]["grad_norm/predictor"]


def test_collapse_diagnostics_in_the_loop(tmp_path):
    """With --no-final-ln the variance before the LayerNorm is the embedding's; with it, the gain starts at norm 8."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    plain = run_once([*CONFIGS["3"], *SHORT, "--no-final-ln"], tmp_path / "a")
    assert plain["embedding/variance_pre_ln"] == plain["embedding/variance"] and "embedding/ln_gain_norm" not in plain
    normed = run_once([*CONFIGS["3"], *SHORT, "--total-timesteps", "768", "--image-every", "100"], tmp_path / "b")
    assert all(7.5 < g < 8.5 for _, g in normed["embedding/ln_gain_norm"])  # sqrt(64) = 8, moved a little by 48 steps
    acc = EventAccumulator(glob.glob(str(tmp_path / "b" / "runs" / "*"))[0], size_guidance={"images": 0})
    acc.Reload()
    assert [e.step for e in acc.Images("attention/cls_to_patches")] == [256, 768]  # the first and the last iteration
    assert normed["embedding/variance_pre_ln"] != normed["embedding/variance"]


def test_same_seed_same_losses_on_cpu(tmp_path):
    """Two runs of one seed log the same values, and scripts/same_logs.py says so; another seed differs, and so does
    the same seed with --frame-gap 2 (the loop feeds its encoder other stacks, not only its probe)."""
    runs, run_dirs = [], []
    for name, flags in [("a", ["--seed", "7"]), ("b", ["--seed", "7"]), ("c", ["--seed", "8"]), ("d", ["--seed", "7", "--frame-gap", "2"])]:
        (tmp_path / name).mkdir()
        assert run_script([*SHORT, *flags], cwd=tmp_path / name).returncode == 0
        (run_dir,) = glob.glob(str(tmp_path / name / "runs" / "*"))
        runs.append(scalars(run_dir))
        run_dirs.append(run_dir)
    for tag in ["losses/policy_loss", "losses/value_loss", "losses/jepa_loss", "charts/episodic_return"]:
        assert runs[0][tag] == runs[1][tag]
    sys.path.insert(0, os.path.join(os.path.dirname(SCRIPT), "scripts"))
    import same_logs
    assert same_logs.differing_tags(run_dirs[0], run_dirs[1]) == ([], len(TAGS) - 1)  # all but charts/SPS
    differ, _ = same_logs.differing_tags(run_dirs[0], run_dirs[2])
    assert "losses/jepa_loss" in differ and "charts/episodic_return" in differ
    differ, _ = same_logs.differing_tags(run_dirs[0], run_dirs[3])
    assert "losses/jepa_loss" in differ and "losses/value_loss" in differ


def test_nan_loss_stops_with_step_and_keeps_logs(tmp_path):
    result = run_script([*SHORT, "--learning-rate", "1e30", "--max-grad-norm", "1e30"], cwd=tmp_path)
    assert result.returncode != 0 and "global step" in result.stderr and "Traceback" not in result.stderr
    (run_dir,) = glob.glob(str(tmp_path / "runs" / "*"))
    assert "charts/episodic_return" in scalars(run_dir)  # what was logged before the NaN survives


def test_ctrl_c_flushes_logs_and_saves_model(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    # a suite started from a background shell inherits SIGINT as ignored: give the child the default handler
    proc = subprocess.Popen([sys.executable, SCRIPT, "--total-timesteps", "100000", "--save-model", "--no-cuda"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines = 0
    for line in proc.stdout:  # wait for two logged iterations
        lines += line.startswith("step")
        if lines == 2:
            break
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert "interrupted" in out and "Traceback" not in err
    (run_dir,) = glob.glob(str(tmp_path / "runs" / "*"))
    assert len(scalars(run_dir)["losses/jepa_loss"]) >= 2
    assert os.path.isfile(os.path.join(run_dir, "model.pt"))


@pytest.mark.parametrize("tubelets", [False, True])
def test_checkpoint_reloads_the_policy_it_saved(tmp_path, tubelets):
    args = small_args(tubelets=tubelets, embed_dim=32, num_heads=2)
    torch.manual_seed(0)
    agent = jp.make_agent(args, "cpu")
    with torch.no_grad():  # the y-encoder and the critic: a reload must not take them for the x-encoder and actor
        for p in [*agent[1].parameters(), *agent[4].parameters()]:
            p.add_(1.0)
    path = str(tmp_path / "model.pt")
    jp.save_checkpoint(path, args, *agent[:5])
    saved, encoder, actor = jp.load_policy(path, "cpu")
    assert saved.tubelets == tubelets and saved.embed_dim == 32
    stacks = fake_minibatch(args, n=8)["stacks"]
    with torch.no_grad():
        assert torch.equal(actor(encoder(stacks)), agent[3](agent[0](stacks)))


@pytest.mark.parametrize("tubelets", [False, True])
def test_cls_attention_is_the_last_blocks_attention_of_the_cls_token(tubelets):
    args, encoder, *_ = make_models(tubelets=tubelets)
    stacks = fake_minibatch(args, n=3)["stacks"]
    maps = jp.cls_attention(encoder, stacks)
    assert maps.shape == stacks.shape and (maps >= 0).all()
    # the same weights from PyTorch's fused attention: with the identity as values, it returns its weights
    seen = []
    last = encoder.blocks[-1]
    hook = last.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0]))
    encoder(stacks)
    hook.remove()
    B, T, D = seen[0].shape
    q, k, _ = last.qkv(last.ln_1(seen[0])).view(B, T, 3, last.num_heads, D // last.num_heads).permute(2, 0, 3, 1, 4)
    weights = F_sdpa(q, k, torch.eye(T).expand(B, last.num_heads, T, T))[:, :, 0, 1:].mean(1)  # (B, patches)
    p = args.patch_size
    per_patch = maps[:, :, ::p, ::p]  # (B, 3, rows, cols)
    expected = weights.view(B, -1, *per_patch.shape[2:]).expand_as(per_patch)
    torch.testing.assert_close(per_patch, expected, rtol=1e-4, atol=1e-6)
    if tubelets:  # a tubelet's weight shows in all three of its frames
        assert torch.equal(maps[:, 0], maps[:, 2])
    image = jp.attention_image(stacks, maps)
    assert image.shape == (3, 3 * args.frame_height, 3 * args.frame_width) and 0 <= image.min() and image.max() <= 1


def test_attention_image_puts_each_stack_in_a_row_and_its_hottest_patch_in_red():
    frames = torch.full((2, 3, 4, 6), 255, dtype=torch.uint8)
    frames[1, 2] = 0  # stack 1, frame t: black
    attention = torch.zeros(2, 3, 4, 6)
    attention[0, 1, :2, :3] = 1.0  # stack 0: all its attention on one patch of frame t-1
    attention[1] = 0.5  # stack 1: even
    image = jp.attention_image(frames, attention)  # (3, 2 * 4, 3 * 6)
    assert image.shape == (3, 8, 18)
    assert torch.allclose(image[:, :2, 6:9], torch.tensor([1.0, 0.3, 0.3])[:, None, None])  # red over white
    assert torch.equal(image[:, :4, :6], torch.ones(3, 4, 6))  # stack 0, frame t-2: white, no heat
    assert torch.equal(image[:, 4:, 12:], torch.zeros(3, 4, 6))  # stack 1, frame t: black, even attention: no heat


def F_sdpa(q, k, v):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v)


def test_play_greedy_records_the_first_episode_to_its_last_state(tmp_path):
    args = small_args()
    torch.manual_seed(0)
    encoder, _, _, actor, _, _ = jp.make_agent(args, "cpu")
    with torch.no_grad():
        actor[-1].bias.copy_(torch.tensor([0.0, 100.0]))  # always push right
    gif = str(tmp_path / "episode.gif")
    mean_return = jp.play_greedy(encoder, actor, args, episodes=2, seed=5, gif_path=gif)
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
    assert 1 < jp.play_greedy(encoder, actor, small_args(frame_gap=2), episodes=2, seed=5) < 30  # a history of 5 frames


def test_checkpoint_saves_and_plays_greedy_episodes(tmp_path):
    """One short run with --save-model --capture-video --image-every 1; the pictures and the projector read back."""
    result = run_script([*SHORT, "--save-model", "--ema-tau", "0", "--capture-video", "--eval-episodes", "2", "--image-every", "1"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (run_dir,) = glob.glob(str(tmp_path / "runs" / "*"))
    acc = EventAccumulator(run_dir, size_guidance={"images": 0})
    acc.Reload()
    assert len(acc.Images("attention/cls_to_patches")) == 2  # both iterations
    assert "charts/greedy_return" in acc.Tags()["scalars"]
    with Image.open(os.path.join(run_dir, "greedy_episode.gif")) as gif:
        assert gif.n_frames > 1 and gif.size == (600, 160)
    config = open(os.path.join(run_dir, "projector_config.pbtxt")).read()
    assert config.count("embeddings {") == 2 and "sprite" in config
    last = sorted(glob.glob(os.path.join(run_dir, "*", "probe_set")))[-1]
    tensors = np.loadtxt(os.path.join(last, "tensors.tsv"))
    assert tensors.shape == (jp.PROBE_STATES, 64) and np.isfinite(tensors).all()
    metadata = open(os.path.join(last, "metadata.tsv")).read().splitlines()
    assert metadata[0].split("\t") == jp.STATE_VARIABLES and len(metadata) == jp.PROBE_STATES + 1
    probe_stacks, probe_states = jp.make_probe_set(1, 32, 96, "cpu")
    np.testing.assert_allclose(np.array([row.split("\t") for row in metadata[1:]], dtype=float), probe_states.numpy(), rtol=1e-5)
    _, encoder, _ = jp.load_policy(os.path.join(run_dir, "model.pt"), "cpu")  # the last snapshot is of the final encoder
    with torch.no_grad():
        np.testing.assert_allclose(tensors, encoder(probe_stacks).numpy(), rtol=1e-4, atol=1e-4)
    os.remove(os.path.join(run_dir, "greedy_episode.gif"))
    (checkpoint,) = glob.glob(str(tmp_path / "runs" / "*" / "model.pt"))
    saved = torch.load(checkpoint)
    assert {"encoder", "predictor", "actor", "critic", "args"} <= set(saved)
    # the loop's EMA moved the y-encoder it trained against: with tau 0 it is the x-encoder itself
    assert all(torch.equal(saved["target_encoder"][k], v) for k, v in saved["encoder"].items())
    torch.manual_seed(1)
    initial = jp.ViTEncoder(jp.parse_args([])).state_dict()
    assert not all(torch.equal(initial[k], v) for k, v in saved["encoder"].items())
    result = run_script(["--eval-checkpoint", checkpoint, "--eval-episodes", "3", "--capture-video"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "mean return over 3 greedy episodes" in result.stdout
    with Image.open(os.path.join(run_dir, "greedy_episode.gif")) as gif:  # written beside the checkpoint
        assert gif.n_frames > 1
    assert len(glob.glob(str(tmp_path / "runs" / "*"))) == 1  # evaluation creates no run directory


def test_default_configuration_learns(tmp_path):
    """A short default run on a fixed seed ends far above a random policy (about 22)."""
    result = run_script(["--total-timesteps", "40000", "--seed", "1", "--no-cuda"], cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr
    (run_dir,) = glob.glob(str(tmp_path / "runs" / "*"))
    returns = scalars(run_dir)["charts/episodic_return"]
    last = [v for step, v in returns if step > 30000]
    assert np.mean(last) > 60


# ------------------------------------------------------------------------------ the plotting script
def test_plot_statistics_iqm_and_bootstrap_interval():
    sys.path.insert(0, os.path.join(os.path.dirname(SCRIPT), "scripts"))
    import plot
    assert plot.iqm(np.array([1.0, 2, 3, 4, 100])) == 3.0  # the outlier and the lowest seed are cut
    assert plot.iqm(np.array([70.0, 0, 1, 2, 10, 11, 50, 60])) == (2 + 10 + 11 + 50) / 4  # not the median (10.5)
    low, high = plot.bootstrap_ci(np.array([1.0, 2, 3, 4, 5]), np.mean)
    assert 1.0 < low < 3.0 < high < 5.0
    narrow_low, narrow_high = plot.bootstrap_ci(np.array([1.0, 2, 3, 4, 5]), np.mean, level=0.5)
    assert low < narrow_low < narrow_high < high
    curves_low, curves_high = plot.bootstrap_ci(np.array([[0.0, 10], [2, 10], [4, 10]]), np.mean)  # per step
    assert curves_low[1] == curves_high[1] == 10 and curves_low[0] < 2 < curves_high[0]


def test_plot_refuses_two_runs_of_one_configuration_and_seed(tmp_path):
    sys.path.insert(0, os.path.join(os.path.dirname(SCRIPT), "scripts"))
    import plot
    from torch.utils.tensorboard import SummaryWriter
    for stamp in ["1", "2"]:  # a rerun: same configuration, same seed
        writer = SummaryWriter(str(tmp_path / f"reproduce__jepa-rlgrad-novar__s3__{stamp}"))
        writer.add_scalar("charts/SPS", 300, 100_000)
        writer.close()
    with pytest.raises(SystemExit) as exit_info:
        plot.load_sweep(str(tmp_path))
    assert "two finished runs" in str(exit_info.value.code) and "s3" in str(exit_info.value.code)


def test_compare_puts_each_sweep_of_a_configuration_on_its_own_row(tmp_path):
    sys.path.insert(0, os.path.join(os.path.dirname(SCRIPT), "scripts"))
    import compare
    import plot
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
    assert table[2].startswith("| 1: RL gradient only | ViT | 1 2 | 150.0 +- 50.0 ")
    assert table[3].startswith("| 1: RL gradient only | CNN | 1 2 | 430.0 +- 20.0 ")
    assert len(table) == 4  # no row for configurations without runs


def test_long_runs_reads_each_run_to_its_own_horizon(tmp_path):
    sys.path.insert(0, os.path.join(os.path.dirname(SCRIPT), "scripts"))
    import long_runs
    from torch.utils.tensorboard import SummaryWriter

    def write_run(name, requested, last_step, episode_return, greedy=None):
        """An episode every 1k steps and at the run's last step, of return episode_return(step)."""
        writer = SummaryWriter(str(tmp_path / name))
        writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n|total_timesteps|{requested}|\n|num_envs|8|\n|num_steps|32|")
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
    learner = lambda step: 30.0 if 90_000 < step <= 100_000 else 480.0 if step > 190_000 else 500.0 if step > 150_000 else 20.0
    end_200k, end_195k = 200_000 // 256 * 256, 195_000 // 256 * 256  # the steps the runs really reach: whole batches
    write_run("long__jepa-rlgrad-novar__s1__1", 200_000, end_200k, learner, greedy=500.0)
    write_run("long__jepa-rlgrad-novar__s2__1", 200_000, end_200k, lambda step: 500.0 if step <= 3_000 else 20.0)  # lucky start
    write_run("long__nojepa-rlgrad-novar__s1__1", 195_000, end_195k, lambda step: 20.0)  # a shorter run of another configuration
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

    write_run("long__nojepa-rlgrad-novar__s2__1", 200_000, end_200k, lambda step: 20.0)  # another length, same configuration
    with pytest.raises(SystemExit, match="must share their length"):
        long_runs.load(str(tmp_path))
    write_run("long__nojepa-rlgrad-novar__s2__1", 200_000, end_200k, lambda step: 20.0)  # ... and a rerun of seed 2
    with pytest.raises(SystemExit, match="must share their length|two finished runs"):
        long_runs.load(str(tmp_path))


def test_grad_scale_prints_the_first_row_of_the_research_log(tmp_path):
    """scripts/grad_scale.py on seed 6: the policy loss's gradient on the encoder is thousands of times the smallest
    at the first update, as docs/RESULTS.md reports (printed to 3 digits, so a different last digit of a float passes)."""
    script = os.path.join(os.path.dirname(SCRIPT), "scripts", "grad_scale.py")
    result = subprocess.run([sys.executable, script, "--seed", "6", "--iterations", "1", "--every", "1"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=240, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[2] == "| 1 | 256 | 0.0546 | 66.3 | 248 | 4542 | 3.74 |"
    with open(os.path.join(os.path.dirname(SCRIPT), "docs", "RESULTS.md")) as log:
        assert "| 1 | 256 | 0.0546 | 66.3 | 248 | 4542 | 3.74 |" in log.read()
