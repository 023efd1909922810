"""Tests of the lab, jepa_ppo_cartpole_lab.py: `python -m pytest -q jepa_ppo_cartpole_lab_test.py`. The helpers
shared with the reference's tests live in jepa_ppo_cartpole_test.py; the scripts' tests sit beside them
(scripts/scripts_test.py, docs/research/research_test.py)."""

import dataclasses
import glob
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import jepa_ppo_cartpole as ref
import jepa_ppo_cartpole_lab as lab
from jepa_ppo_cartpole_test import (CONFIGS, MODULES, NAN_RUN, ROOT, SHORT, TAGS, TIMINGS, cached_run,
                                    check_ema_steps, check_pixel_locality, fake_minibatch, labelled_rollout,
                                    make_agent_and_batch, make_models, one_line_exit, read_id, run_once, run_script,
                                    run_to_interrupt, scalars, script_module, three,
                                    tokens_seen)

LAB_SCRIPT = os.path.join(ROOT, "jepa_ppo_cartpole_lab.py")
PROBE_TAGS = [f"probe/{kind}r2_{name}" for kind in ["", "onpolicy_"] for name in lab.STATE_VARIABLES]
LAB_TAGS = [*TAGS, "embedding/effective_rank", "embedding/ln_gain_norm", "embedding/target_variance", *PROBE_TAGS,
            "perf/rollout_seconds", "perf/update_seconds", "perf/diagnostics_seconds"]


def lab_models(**overrides):
    return make_models(args_class=lab.LabArgs, make_encoder=lab.make_encoder, **overrides)


def lab_parse(argv):
    return ref.parse_args(argv, lab.LabArgs, lab.check_lab_args)


# ------------------------------------------------------------------------------------------- encoders
def test_no_lab_flag_gives_the_reference_encoder_and_every_lab_flag_another():
    assert type(lab.make_encoder(lab.LabArgs())) is ref.ViTEncoder
    for flags in [dict(encoder="cnn"), dict(patch_embed="conv"), dict(tubelets=True), dict(frame_diffs=True),
                  dict(frame_gap=2), dict(ink=False), dict(final_ln=False)]:
        assert type(lab.make_encoder(lab.LabArgs(**flags))) is not ref.ViTEncoder, flags


def test_cnn_encoder_reads_the_three_frames_as_channels():
    args, encoder, *_ = lab_models(encoder="cnn")
    assert isinstance(encoder, lab.CNNEncoder) and encoder.convs[0].in_channels == 3
    stacks = fake_minibatch(args, n=4)["stacks"]
    s_x = encoder(stacks)
    assert s_x.shape == (4, args.embed_dim) and torch.equal(s_x, encoder.ln_f(encoder.pre_norm(stacks)))
    moved = stacks.clone()
    moved[:, 0] = 255  # a change in the oldest frame alone changes the embedding
    assert not torch.allclose(encoder(moved), s_x)


def test_tubelets_make_one_token_per_patch_position_that_sees_all_frames():
    args, encoder, *_ = lab_models(tubelets=True)
    _, per_frame, *_ = lab_models()
    stacks = fake_minibatch(args, n=2)["stacks"]
    patches = (args.frame_height // args.patch_size) * (args.frame_width // args.patch_size)
    assert encoder(stacks).shape == (2, args.embed_dim)
    assert tokens_seen(encoder, stacks) == patches + 1 and tokens_seen(per_frame, stacks) == 3 * patches + 1
    stacks[:, 0] = 255  # the frame order still matters: a tubelet keeps its frames in order
    assert not torch.allclose(encoder(stacks), encoder(stacks.flip(1)), atol=1e-5)


@pytest.mark.parametrize("patch_embed, tubelets", [("linear", True), ("conv", False), ("conv", True)])
def test_a_pixel_reaches_only_the_tokens_of_its_frame_and_place(patch_embed, tubelets):
    """The reference's linear per-frame tokens are tested beside it; here the lab's tubelets and conv stem."""
    args, encoder, *_ = lab_models(patch_embed=patch_embed, tubelets=tubelets)
    check_pixel_locality(args, encoder, conv=patch_embed == "conv", tubelets=tubelets)


@pytest.mark.parametrize("overrides", [{}, {"tubelets": True}, {"patch_embed": "conv"}, {"encoder": "cnn"}],
                         ids=["per-frame", "tubelets", "conv-stem", "cnn"])
def test_frame_diffs_make_a_still_stack_read_as_two_blank_frames_and_its_last(overrides):
    """In ink a zero difference is white (0), so under --frame-diffs a stack of three equal frames must embed as
    the stack (white, white, last frame) does without it, on every encoder path."""
    args, encoder, *_ = lab_models(frame_diffs=True, **overrides)
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
    args = lab.LabArgs(ink=ink)
    stacks = fake_minibatch(args, n=2)["stacks"]
    stacks[:, 0] = ref.render_cartpole(torch.tensor([[0.3, 0, -0.1, 0]] * 2), args.frame_height, args.frame_width)
    pixels = lab.to_pixels(stacks, ink)
    inputs = lab.encoder_input(stacks, 1, ink, True)
    assert torch.equal(inputs, torch.stack([pixels[:, 1] - pixels[:, 0], pixels[:, 2] - pixels[:, 1], pixels[:, 2]],
                                           1))
    for frame, reached in [(0, {0}), (1, {0, 1}), (2, {1, 2})]:
        flipped = stacks.clone()
        flipped[:, frame, 20, 40] = 255 - flipped[:, frame, 20, 40]
        changed = (lab.encoder_input(flipped, 1, ink, True) - inputs).abs().amax(dim=(0, 2, 3)) > 0
        assert set(changed.nonzero().flatten().tolist()) == reached


@pytest.mark.parametrize("patch_embed", ["linear", "conv"])
def test_untrained_embedding_tells_frames_apart(patch_embed):
    """At initialisation the embedding must vary over the probe set's stacks: the conv stem with PyTorch's default
    init started at a variance of 1e-5 (the linear embedding: 1e-2), and configuration 2 then collapsed."""
    args, encoder, *_ = lab_models(patch_embed=patch_embed)
    stacks, _ = lab.make_probe_set(0, args.frame_height, args.frame_width, "cpu")
    with torch.no_grad():
        assert ref.embedding_variance(encoder(stacks[:128])).item() > 3e-3


@pytest.mark.parametrize("encoder_type", ["vit", "cnn"])
@pytest.mark.parametrize("ink, white", [(True, 0.0), (False, 1.0)])
def test_encoder_reads_ink_or_raw_intensity(ink, white, encoder_type):
    args, encoder, *_ = lab_models(ink=ink, encoder=encoder_type)
    seen = []
    first = encoder.patch_proj if encoder_type == "vit" else encoder.convs[0]
    first.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0]))
    encoder(torch.full((1, 3, 32, 96), 255, dtype=torch.uint8))
    assert seen[0].dtype == torch.float32
    assert torch.allclose(seen[0], torch.full_like(seen[0], white), rtol=0, atol=1e-6)


@pytest.mark.parametrize("final_ln", [True, False])
def test_final_layernorm_switch(final_ln):
    args, encoder, *_ = lab_models(final_ln=final_ln)
    stacks = fake_minibatch(args, n=4)["stacks"]
    cls, s_x = encoder.pre_norm(stacks), encoder(stacks)
    if final_ln:  # at initialisation: gain 1, bias 0, so each embedding has mean 0 and variance 1
        torch.testing.assert_close(s_x.mean(-1), torch.zeros(4), atol=1e-5, rtol=0)
        torch.testing.assert_close(s_x.var(-1, unbiased=False), torch.ones(4), atol=1e-3, rtol=0)
    else:
        assert torch.equal(s_x, cls) and not any(isinstance(m, torch.nn.LayerNorm) for m in [encoder.ln_f])


@pytest.mark.parametrize("weight_decay", [0.0, 0.5])
def test_weight_decay_is_decoupled(weight_decay):
    args = lab.LabArgs(weight_decay=weight_decay, learning_rate=0.1)
    *modules, optimizer = lab.make_agent(args, "cpu")
    trained = [p for m in [modules[0], *modules[2:]] for p in m.parameters()]
    before = [p.detach().clone() for p in trained]
    for p in trained:
        p.grad = torch.zeros_like(p)  # no gradient: only the decay moves the weights
    optimizer.step()
    for p, b in zip(trained, before):
        torch.testing.assert_close(p.detach(), b * (1 - 0.1 * weight_decay))


@pytest.mark.parametrize("config, predictor", [("2", "mlp"), ("3", "mlp"), ("3", "linear")])
def test_predictor_lr_mult_changes_only_the_predictors_step(config, predictor):
    """One optimizer step with --predictor-lr-mult 10 against 1 from the same weights and batch: every other module,
    the y-encoder included, moves bit for bit as before; the predictor moves ten times as far."""
    flags = {name: f"--{name.replace('_', '-')}" in CONFIGS[config] for name in ["jepa", "rl_grad", "var_reg"]}
    moved = {}
    for mult in [1.0, 10.0]:
        args, agent, batch = make_agent_and_batch(args_class=lab.LabArgs, make_agent=lab.make_agent, update_epochs=1,
                                                  num_minibatches=1, predictor_lr_mult=mult, predictor=predictor,
                                                  **flags)
        before = [[p.detach().clone() for p in m.parameters()] for m in agent[:5]]
        torch.manual_seed(0)
        lab.lab_update(args, *agent[:5], agent[5], batch)
        moved[mult] = [[p.detach() - b for p, b in zip(m.parameters(), bs)] for m, bs in zip(agent[:5], before)]
    for name, slow, fast in zip(MODULES, moved[1.0], moved[10.0]):
        if name == "predictor":
            for a, b in zip(slow, fast):
                assert a.abs().max() > 0
                torch.testing.assert_close(b, 10 * a, rtol=1e-4, atol=1e-6)  # rounding of w + step
        else:
            assert all(torch.equal(a, b) for a, b in zip(slow, fast)), name


def test_predictor_lr_mult_follows_the_schedule_in_the_loop(tmp_path):
    """In the loop the predictor's rate is the multiple of the warmed-up, annealed rate at every iteration."""
    logged = run_once([*CONFIGS["3"], *SHORT, "--total-timesteps", "1024", "--lr-warmup-iters", "2",
                       "--predictor-lr-mult", "0.1"], tmp_path, script=LAB_SCRIPT)
    rates = [lr for _, lr in logged["charts/learning_rate"]]
    assert rates == pytest.approx([5e-4, 7.5e-4, 5e-4, 2.5e-4])
    assert [lr for _, lr in logged["charts/predictor_learning_rate"]] == pytest.approx([0.1 * r for r in rates])


@pytest.mark.parametrize("spread", [1.0, 1e-4])
def test_closed_form_predictor_refit_recovers_a_linear_map_of_layernormed_embeddings(spread):
    """Embeddings out of a LayerNorm (rank-deficient with the one-hot columns), spread widely or at a variance of
    1e-8 around a shared part, the paper's collapse: the refit predicts a linear map's targets from them."""
    g = torch.Generator().manual_seed(0)
    shared, spread_part = torch.randn(1, 16, generator=g), spread * torch.randn(300, 16, generator=g)
    s_x = nn.functional.layer_norm(shared + spread_part, (16,))
    action = torch.randint(0, 2, (300,), generator=g)
    weight, bias = torch.randn(16, 16, generator=g), torch.randn(2, 16, generator=g)
    targets = s_x @ weight + bias[action]  # (300, 16): a per-action offset is what the one-hot columns hold
    predictor = lab.LinearPredictor(16)
    assert predictor.refit(s_x, action, targets) < 1e-6 * targets.var(0).sum()
    residual = predictor(s_x, action) - targets
    assert residual.pow(2).mean() < 1e-4 * (s_x @ weight).var(0).mean()  # the spread's part, not only the offsets


def test_closed_form_predictor_is_refit_before_every_step_never_stepped_and_trains_the_encoder(monkeypatch):
    """Configuration 3, 4 epochs x 4 minibatches: 17 refits (one before each step, one after the last); the weight
    left is the refit for the encoder as it ends, at the minimum of the batch's JEPA loss (a zero gradient); the JEPA
    loss's gradient passes through it into the encoder."""
    args, agent, batch = make_agent_and_batch(128, args_class=lab.LabArgs, make_agent=lab.make_agent, jepa=True,
                                              rl_grad=False, predictor="closed-form")
    encoder, predictor = agent[0], agent[2]
    assert isinstance(predictor, lab.LinearPredictor) and not predictor.weight.any()
    refits, refit_predictor = [], lab.refit_predictor
    monkeypatch.setattr(lab, "refit_predictor", lambda *a: refits.append(a) or refit_predictor(*a))
    encoder_before = [p.detach().clone() for p in encoder.parameters()]
    losses = lab.lab_update(args, *agent[:5], agent[5], batch)
    assert len(refits) == 17
    left = predictor.weight.detach().clone()
    assert losses["jepa_loss_refit"] == pytest.approx(lab.refit_predictor(predictor, encoder, batch), rel=1e-6)
    torch.testing.assert_close(predictor.weight, left, rtol=1e-6, atol=1e-9)
    loss = ref.jepa_loss(predictor(encoder(batch["stacks"]).detach(), batch["actions"]), batch["targets"])
    (gradient,) = torch.autograd.grad(loss, predictor.weight)
    assert gradient.abs().max() < 1e-5 * left.abs().max()
    assert losses["grad_norm_predictor"] > 0
    assert any(not torch.equal(p, b) for p, b in zip(encoder.parameters(), encoder_before))


def test_weight_decay_reaches_the_predictors_own_group():
    args, agent, _ = make_agent_and_batch(args_class=lab.LabArgs, make_agent=lab.make_agent, weight_decay=0.1,
                                          predictor_lr_mult=10.0)
    shared, predictor_group = agent[5].param_groups
    assert predictor_group["weight_decay"] == shared["weight_decay"] == 0.1
    assert predictor_group["decoupled_weight_decay"] and shared["decoupled_weight_decay"]


def test_closed_form_predictor_is_refit_in_the_loop(tmp_path):
    """Each iteration logs the batch's JEPA loss left by its last refit; the saved weight is a refit, not 0."""
    run_dir, _ = cached_run([*CONFIGS["3"], *SHORT, "--predictor", "closed-form", "--save-model"], script=LAB_SCRIPT)
    refit_losses = [v for _, v in scalars(run_dir)["losses/jepa_loss_refit"]]
    assert len(refit_losses) == 2 and all(0 < v < float("inf") for v in refit_losses)
    weight = torch.load(os.path.join(run_dir, "model.pt"), weights_only=True)["predictor"]["weight"]
    assert weight.shape == (66, 64) and weight.abs().max() > 0


# --------------------------------------------------------------------------------------------- probes
def test_effective_rank_is_centred():
    g = torch.Generator().manual_seed(0)
    spread = torch.randn(256, 8, generator=g)  # even spread in 8 directions
    assert lab.effective_rank(spread) > 7.5
    assert lab.effective_rank(spread + 100.0) > 7.5  # a large shared offset is no direction
    assert lab.effective_rank(torch.ones(16, 8)) == pytest.approx(1.0)  # no spread at all
    assert lab.effective_rank(torch.randn(64, 1, generator=g) * torch.ones(1, 8) + 5.0) == pytest.approx(1.0, abs=1e-6)


def test_probe_r2_recovers_a_linear_state():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(400, 8, generator=g)
    y = torch.stack([s[:, 0] * 2 + 1, torch.randn(400, generator=g)], 1)  # one readable, one noise
    r2 = lab.probe_r2(s[:200], y[:200], s[200:], y[200:])
    assert r2[0] > 0.99 and r2[1] < 0.1


def test_probe_set_holds_real_moving_stacks_labelled_by_their_last_frame():
    stacks, states = lab.make_probe_set(seed=3, height=32, width=96, device="cpu")
    assert stacks.shape == (lab.PROBE_STATES, 3, 32, 96) and stacks.dtype == torch.uint8
    assert states.shape == (lab.PROBE_STATES, 4)
    assert torch.equal(stacks[:, 2], ref.render_cartpole(states, 32, 96))  # the label is the state of the last frame
    # two real steps: the frames differ, and no state left Gymnasium's limits (which would have reset it)
    assert (stacks[:, 0] != stacks[:, 2]).flatten(1).any(1).float().mean() > 0.9
    assert states[:, 0].abs().max() < 2.4 and states[:, 2].abs().max() < 0.2095
    # spread over the box, so a probe has something to explain; same seed, same set
    assert (states.std(0) > torch.tensor([0.8, 0.6, 0.05, 0.6])).all()
    again, _ = lab.make_probe_set(seed=3, height=32, width=96, device="cpu")
    assert torch.equal(stacks, again)


def test_probe_set_with_a_frame_gap_holds_histories_whose_encoder_view_is_frames_gap_steps_apart():
    """--frame-gap 2: histories of 5 frames of one real trajectory; the encoder reads frames 0, 2 and 4."""
    stacks, states = lab.make_probe_set(seed=3, height=32, width=96, device="cpu", gap=2)
    assert stacks.shape == (lab.PROBE_STATES, 5, 32, 96)
    view = lab.encoder_input(stacks, 2, True, False)
    assert view.shape == (lab.PROBE_STATES, 3, 32, 96) and torch.equal(view[:, 2], ref.render_cartpole(states, 32, 96))
    plain, _ = lab.make_probe_set(seed=3, height=32, width=96, device="cpu")
    assert torch.equal(stacks[:, :3], plain)  # same start, same pushes
    assert torch.equal(view[:, 0], plain[:, 0]) and torch.equal(view[:, 1], plain[:, 2])
    # the motion from first to last frame is larger than over the plain stack's two steps
    moved = lambda s: (s[:, 2].float() - s[:, 0].float()).abs().sum((1, 2)).mean()
    assert moved(view) > 1.5 * moved(plain)
    # with a gap of 3 some poles pass Gymnasium's 12 degrees within the 6 steps: drawn there, not reset upright
    _, far = lab.make_probe_set(seed=3, height=32, width=96, device="cpu", gap=3)
    assert (far[:, 2].abs() > 0.2095).sum() >= 10
    start = np.random.default_rng(3).uniform(-lab.PROBE_BOX, lab.PROBE_BOX, size=(lab.PROBE_STATES, 4))  # its draw
    assert ((far[:, 0] - torch.tensor(start[:, 0], dtype=torch.float32)).abs() < 0.4).all()  # no cart jumped back


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
    monkeypatch.setattr(lab, "probe_r2", lambda *parts: seen.update(zip(["s_fit", "y_fit", "s_test", "y_test"], parts)))
    lab.onpolicy_probe_r2(lambda stacks: stacks[:, 2, 0, :1].float(), pool)

    expected = lambda envs: {int(states[t, n, 0]) for stacks, states, valid in pool for t in range(T) for n in envs
                             if valid[t, n]}
    assert set(seen["y_fit"][:, 0].int().tolist()) == expected(range(N // 2))  # only environments 0-2, real rows
    assert set(seen["y_test"][:, 0].int().tolist()) == expected(range(N // 2, N))
    assert len(seen["y_fit"]) + len(seen["y_test"]) == sum(int(valid.sum()) for _, _, valid in pool)
    assert torch.equal(seen["s_fit"][:, 0], seen["y_fit"][:, 0])
    assert torch.equal(seen["s_test"][:, 0], seen["y_test"][:, 0])


# ------------------------------------------------ the reference's rollout, batch and update, with the lab's parts
def test_frame_gap_feeds_the_encoder_frames_gap_steps_apart_and_restarts_episodes():
    """--frame-gap 2 through the reference's collect_rollout: the rollout stores for row t frames t-4 .. t of its
    episode, its first rows repeating the episode's first frame where earlier ones are missing, and the lab's
    encoder reads frames (t-4, t-2, t); the JEPA target (row t + 1) is frames (t-3, t-1, t+1), the reset row of
    NEXT_STEP autoreset included: it ends the old episode, at its terminal state."""
    args = lab.LabArgs(num_envs=2, num_steps=48, frame_gap=2)
    torch.manual_seed(0)
    encoder, _, _, actor, critic, _ = lab.make_agent(args, "cpu")
    assert isinstance(encoder, lab.LabViT)
    envs = lab.StateRecorder(ref.make_envs(2))
    state = torch.as_tensor(envs.reset(seed=1)[0])
    env_state = {"state": state, "stack": ref.initial_stack(state, 32, 96, 5),
                 "is_reset_step": torch.zeros(2, dtype=torch.bool)}
    rollout = ref.make_rollout_storage(48, 2, (5, 32, 96), args.embed_dim, "cpu")
    ref.collect_rollout(envs, encoder, actor, critic, rollout, env_state)
    envs.close()
    states = torch.stack([state, *(torch.as_tensor(s) for s in envs.states[:-1])])  # each row's last frame's state
    frames = ref.render_cartpole(states.flatten(0, 1), 32, 96).view(48, 2, 32, 96)  # frame of each row
    stacks, valid, checked = rollout["stacks"], rollout["valid"], 0
    for n in range(2):
        start = 0
        for t in range(48):
            # the earlier frames of an episode's first rows are its first frame; a reset row still shows the old one
            expected = [frames[max(t - k, start), n] for k in (4, 3, 2, 1, 0)]
            assert all(torch.equal(stacks[t, n, i], expected[i]) for i in range(5)), (t, n)
            checked += 1
            if not valid[t, n]:
                start = t + 1  # the reset row: the next episode starts at row t + 1 (its first state)
    assert checked == 96 and (~valid).sum() >= 2
    assert torch.equal(stacks[-1], env_state["stack"])
    histories = stacks[:-1].flatten(0, 1)
    assert torch.equal(lab.encoder_input(histories, 2, True, False), histories[:, [0, 2, 4]])
    with torch.no_grad():  # the encoder embeds frames (t-4, t-2, t): as a gap-1 encoder given those three
        s_x = encoder(histories)
        encoder.gap = 1
        assert torch.equal(s_x, encoder(histories[:, [0, 2, 4]]))
        encoder.gap = 2
    torch.testing.assert_close(rollout["embeddings"].flatten(0, 1), s_x, rtol=1e-5, atol=1e-5)
    with pytest.raises(AssertionError, match="does not fit --frame-gap 2"):  # nor does a history for another gap
        encoder(ref.initial_stack(state, 32, 96, 3))


def test_lab_batch_with_fresh_targets_embeds_the_next_stacks_when_indexed():
    args, rollout = labelled_rollout(args_class=lab.LabArgs, fresh_targets=True)
    batch = lab.lab_batch(args, rollout, read_id, lambda stacks: read_id(stacks) + 1000, lambda s: s)
    assert isinstance(batch["targets"], lab.FreshTargets)
    assert torch.equal(read_id(batch["targets"].next_stacks), read_id(batch["stacks"]) + 10)
    rows = torch.tensor([0, 3, 6])
    torch.testing.assert_close(batch["targets"][rows], read_id(batch["stacks"][rows]) + 10 + 1000)


def fake_rollout(args, seed=0):
    """A rollout of stacks of random states (each of three equal frames), every row a transition but one."""
    T, N, H, W = args.num_steps, args.num_envs, args.frame_height, args.frame_width
    g = torch.Generator().manual_seed(seed)
    rollout = ref.make_rollout_storage(T, N, (3, H, W), args.embed_dim, "cpu")
    states = torch.rand((T + 1) * N, 4, generator=g) * torch.tensor([4.0, 2, 0.4, 2]) - torch.tensor([2.0, 1, 0.2, 1])
    rollout["stacks"][:] = ref.render_cartpole(states, H, W).view(T + 1, N, 1, H, W)
    rollout["valid"][:] = True
    rollout["valid"][1, 0] = False
    rollout["actions"] = torch.randint(0, 2, (T, N), generator=g)
    rollout["logprobs"][:] = -0.69
    rollout["values"] = torch.randn(T, N, generator=g)
    rollout["rewards"][:] = 1.0
    return rollout


@pytest.mark.parametrize("fresh", [False, True])
def test_fresh_targets_come_from_the_y_encoder_at_each_step(fresh):
    args = lab.LabArgs(num_envs=4, num_steps=16, update_epochs=2, num_minibatches=2, fresh_targets=fresh)
    torch.manual_seed(0)
    agent = lab.make_agent(args, "cpu")
    rollout = fake_rollout(args)
    batch = lab.lab_batch(args, rollout, agent[0], agent[1], agent[4])
    target_encoder = agent[1]
    seen, inputs = [], []

    def record(module, args_in, output):
        seen.append(module.cls_token.detach().clone())
        inputs.append(args_in[0])
    target_encoder.register_forward_hook(record)
    torch.manual_seed(0)
    lab.lab_update(args, *agent[:5], agent[5], batch)
    if fresh:  # one target pass per minibatch, each by a y-encoder the previous step's EMA has moved
        assert len(seen) == 4 and all(not torch.equal(a, b) for a, b in zip(seen, seen[1:]))
        next_stacks = rollout["stacks"][1:].flatten(0, 1)[rollout["valid"].flatten()]
        next_sums = set(next_stacks.flatten(1).sum(1).tolist())  # the y-encoder embeds the next stacks
        assert all(set(x.flatten(1).sum(1).tolist()) <= next_sums for x in inputs)
        assert sum(len(x) for x in inputs) == 2 * len(next_stacks)  # each of them once per epoch
    else:  # the targets came with the batch
        assert seen == []


# ------------------------------------------------------------------------------- K-step prediction
class CountingEpisodes:
    """Stands for the environments in `ref.collect_rollout` (`step_envs`' signature and NEXT_STEP autoreset): episodes
    of 1-5 steps whose frames carry, in their first three pixels, the episode's number, the step within it and the
    action that led there (255 on an episode's first frame)."""

    def __init__(self, num_envs, seed=0):
        self.rng = np.random.default_rng(seed)
        self.episode, self.step = np.ones(num_envs, dtype=int), np.zeros(num_envs, dtype=int)
        self.length = self.rng.integers(1, 6, num_envs)

    def frame(self, action):
        frame = torch.zeros(len(self.step), 32, 96, dtype=torch.uint8)
        frame[:, 0, 0], frame[:, 0, 1], frame[:, 0, 2] = map(torch.as_tensor, (self.episode, self.step, action))
        return frame

    def __call__(self, envs, action, stack, is_reset_step):
        action, restart = action.numpy(), is_reset_step.numpy()
        self.episode, self.step = np.where(restart, self.episode + 1, self.episode), np.where(restart, 0, self.step + 1)
        self.length = np.where(restart, self.rng.integers(1, 6, len(restart)), self.length)
        done = ~restart & (self.step == self.length)
        terminated = done & (self.episode % 2 == 0)  # odd episodes are truncated: an end all the same
        next_stack = ref.push_frame(stack, self.frame(np.where(restart, 255, action)), is_reset_step)
        return torch.zeros(len(done), 4), torch.ones(len(done)), torch.as_tensor(terminated, dtype=torch.float32), \
            torch.as_tensor(done), next_stack, {}


def last_frame_labels(stacks):
    return stacks[:, -1, 0, :3].float()  # (B, 3): episode, step, action that led there; a stub y-encoder


def test_k_step_targets_are_the_next_k_stacks_of_the_same_episode_and_no_step_crosses_a_reset():
    T, N, K = 12, 3, 4
    args = lab.LabArgs(num_envs=N, num_steps=T, jepa_steps=K)
    torch.manual_seed(0)
    encoder, target_encoder, _, actor, critic, _ = lab.make_agent(args, "cpu")
    episodes = CountingEpisodes(N)
    rollout = ref.make_rollout_storage(T, N, (3, 32, 96), args.embed_dim, "cpu")
    env_state = {"state": torch.zeros(N, 4), "stack": episodes.frame(255)[:, None].repeat(1, 3, 1, 1),
                 "is_reset_step": torch.zeros(N, dtype=torch.bool)}
    ref.collect_rollout(None, encoder, actor, critic, rollout, env_state, env_step=episodes)
    ends = rollout["dones"].bool()
    assert (ends & (rollout["terminations"] == 1)).any() and (ends & (rollout["terminations"] == 0)).any()
    batch = lab.multistep_batch(args, rollout, encoder, last_frame_labels, critic)
    # the first step's targets, and every other entry, are the reference's batch
    one_step = ref.make_batch(args, rollout, encoder, last_frame_labels, critic)
    assert torch.equal(batch["targets"][:, 0], one_step["targets"])
    assert all(torch.equal(batch[k], v) for k, v in one_step.items() if k != "targets")
    # the oracle: stack t + k is step k of row t's rollout when it is k steps further into the same episode
    labels = last_frame_labels(rollout["stacks"].flatten(0, 1)).view(T + 1, N, 3)
    expected = torch.zeros(T, N, K, dtype=torch.bool)
    for t in range(T):
        for k in range(1, K + 1):
            if t + k <= T:
                same_episode = labels[t + k, :, 0] == labels[t, :, 0]
                expected[t, :, k - 1] = same_episode & (labels[t + k, :, 1] == labels[t, :, 1] + k)
    assert torch.equal(batch["target_mask"], expected.flatten(0, 1)[rollout["valid"].flatten()])
    assert 0 < batch["target_mask"][:, -1].sum() < len(batch["target_mask"])  # some rows reach K steps, some do not
    row_labels = last_frame_labels(batch["stacks"])
    actions = torch.cat([batch["actions"][:, None], batch["later_actions"]], dim=1)  # (B, K)
    for k in range(K):
        entered = batch["target_mask"][:, k]
        target = batch["targets"][entered, k]  # (episode, step, the action that led there) of the target stack
        assert torch.equal(target[:, :2], row_labels[entered, :2] + torch.tensor([0.0, k + 1]))
        assert torch.equal(target[:, 2], actions[entered, k].float())  # step k + 1 follows row t + k's action


def k_step_minibatch(args, n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    K = args.jepa_steps
    return {**fake_minibatch(args, n=n, seed=seed), "later_actions": torch.randint(0, 2, (n, K - 1), generator=g),
            "targets": torch.randn(n, K, args.embed_dim, generator=g),
            "target_mask": torch.ones(n, K, dtype=torch.bool)}


def test_k_step_loss_rolls_the_predictor_on_its_own_outputs_and_reaches_the_encoder_through_all_k():
    args, encoder, predictor, actor, critic = lab_models(jepa_steps=3)
    mb = k_step_minibatch(args)
    mb["target_mask"][:, :2] = False  # only the third step enters: its gradient must pass three predictions
    mb["target_mask"][:4, 2] = False
    losses = lab.multistep_losses(args, encoder, predictor, actor, critic, mb)
    s_x = encoder(mb["stacks"])
    third = predictor(predictor(predictor(s_x, mb["actions"]), mb["later_actions"][:, 0]), mb["later_actions"][:, 1])
    expected = (third - mb["targets"][:, 2]).pow(2).sum(-1)[4:].mean()
    torch.testing.assert_close(losses["jepa_loss"], expected)
    torch.testing.assert_close(losses["jepa_loss_step3"], expected)
    assert losses["jepa_loss_step1"].isnan() and losses["jepa_loss_step2"].isnan()  # no pair of theirs entered
    losses["jepa_loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in [*encoder.parameters(), *predictor.parameters()])
    assert all(p.grad is None for p in [*actor.parameters(), *critic.parameters()])


def test_k_step_loss_takes_the_place_of_the_one_step_term_and_averages_the_pairs_that_enter():
    args, encoder, predictor, actor, critic = lab_models(jepa_steps=2, jepa_coef=0.5)
    mb = k_step_minibatch(args)
    mb["target_mask"][:5, 1] = False
    losses = lab.multistep_losses(args, encoder, predictor, actor, critic, mb)
    s_x = encoder(mb["stacks"])
    first = predictor(s_x, mb["actions"])
    second = predictor(first, mb["later_actions"][:, 0])
    d1, d2 = (first - mb["targets"][:, 0]).pow(2).sum(-1), (second - mb["targets"][:, 1]).pow(2).sum(-1)
    torch.testing.assert_close(losses["jepa_loss"], (d1.sum() + d2[5:].sum()) / (16 + 11))
    without_jepa = ref.minibatch_losses(dataclasses.replace(args, jepa_coef=0.0), encoder, predictor, actor, critic,
                                        {**mb, "targets": mb["targets"][:, 0]})
    torch.testing.assert_close(losses["loss"], without_jepa["loss"] + 0.5 * losses["jepa_loss"])
    for name in ["policy_loss", "value_loss", "var_loss"]:
        torch.testing.assert_close(losses[name], without_jepa[name])


def test_k_step_loss_under_no_jepa_trains_the_predictor_and_leaves_the_encoder_alone():
    args, encoder, predictor, actor, critic = lab_models(jepa_steps=3, jepa=False)
    lab.multistep_losses(args, encoder, predictor, actor, critic, k_step_minibatch(args))["jepa_loss"].backward()
    assert all(p.grad is None for p in encoder.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in predictor.parameters())


def test_k_step_prediction_in_the_loop_logs_each_step_and_trains_otherwise_than_one_step():
    same_logs = script_module("same_logs")
    run_dir, _ = cached_run(three("2", "--jepa-steps", "3"), script=LAB_SCRIPT)
    logged = scalars(run_dir)
    assert sorted(logged) == sorted([*LAB_TAGS, *(f"losses/jepa_loss_step{k}" for k in [1, 2, 3])])
    steps = [np.array([v for _, v in logged[f"losses/jepa_loss_step{k}"]]) for k in [1, 2, 3]]
    jepa = np.array([v for _, v in logged["losses/jepa_loss"]])
    # the K-step loss, not the first step's: strictly between its steps' losses, a weighted average of them
    assert np.all(np.isfinite(steps)) and np.all((np.min(steps, 0) < jepa) & (jepa < np.max(steps, 0)))
    one_step_dir, _ = cached_run(three("2"), script=LAB_SCRIPT)
    differ, _ = same_logs.differing_tags(one_step_dir, run_dir, shared=True)
    assert "losses/jepa_loss" in differ and "losses/value_loss" in differ


@pytest.mark.parametrize("per_iteration", [False, True])
def test_lab_update_moves_the_y_encoder_by_the_ema_after_every_step_or_once(per_iteration):
    check_ema_steps(per_iteration, update=lab.lab_update, args_class=lab.LabArgs, make_agent=lab.make_agent,
                    ema_per_iteration=per_iteration)


def test_ema_per_iteration_leaves_the_args_as_they_were():
    args, agent, batch = make_agent_and_batch(args_class=lab.LabArgs, make_agent=lab.make_agent, update_epochs=1,
                                              ema_per_iteration=True)
    torch.manual_seed(0)
    lab.lab_update(args, *agent[:5], agent[5], batch)
    assert args.ema_tau == 0.99


# ---------------------------------------------------------------------------------------------- flags
@pytest.mark.parametrize("argv, flag", [
    (["--weight-decay", "-0.1"], "--weight-decay"),
    (["--probe-every", "0"], "--probe-every"),
    (["--image-every", "0"], "--image-every"),
    (["--eval-episodes", "0"], "--eval-episodes"),
    (["--encoder", "mlp"], "--encoder"),
    (["--patch-embed", "conv", "--patch-size", "6", "--frame-height", "36"], "--patch-embed conv"),
    (["--patch-embed", "cnn"], "--patch-embed"),
    (["--encoder", "cnn", "--patch-size", "4", "--frame-height", "12"], "--encoder cnn"),
    (["--frame-gap", "0"], "--frame-gap"),
    (["--jepa-steps", "0"], "--jepa-steps"),
    (["--jepa-steps", "33"], "--jepa-steps"),
    (["--jepa-steps", "2", "--fresh-targets"], "--fresh-targets"),
    (["--jepa-steps", "2", "--predictor", "closed-form"], "--predictor closed-form"),
    (["--predictor-lr-mult", "0"], "--predictor-lr-mult"),
    (["--predictor-lr-mult", "inf"], "--predictor-lr-mult"),
    (["--predictor", "closed-form", "--predictor-lr-mult", "10"], "--predictor closed-form"),
    (["--predictor", "ridge"], "--predictor"),
    (["--eval-checkpoint", "no/such/model.pt"], "--eval-checkpoint"),
    # the reference's checks hold in the lab
    (["--num-minibatches", "65"], "--num-minibatches"),
    (["--no-jepa", "--no-rl-grad"], "--no-rl-grad"),
    (["--num-envs", "eight"], "--num-envs"),
    (["--bogus-flag", "1"], "--bogus-flag"),
])
def test_bad_lab_flags_exit_with_one_line(argv, flag):
    assert flag in one_line_exit(argv, lab_parse)


def test_a_wrapped_tyro_message_stays_whole_on_one_line():
    message = one_line_exit(["--encoder", "mlp"], lab_parse)
    assert "'vit'" in message and "'cnn'" in message  # tyro wraps the allowed values


def test_bad_lab_flag_from_command_line_leaves_no_run_directory(tmp_path):
    result = run_script(["--frame-gap", "0"], cwd=tmp_path, script=LAB_SCRIPT)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "--frame-gap" in result.stderr
    assert not (tmp_path / "runs").exists()


def test_lab_args_extend_the_reference_args():
    args = lab_parse([])
    assert isinstance(args, ref.Args) and {f: getattr(args, f) for f in ref.Args.__dataclass_fields__} == vars(
        ref.parse_args([]))
    assert (args.encoder, args.frame_gap, args.ink, args.final_ln, args.weight_decay) == ("vit", 1, True, True, 0.0)


# ----------------------------------------------------------------------------------------- checkpoints
def save_small_checkpoint(path, args_class=lab.LabArgs, make_agent=lab.make_agent, **overrides):
    args = args_class(embed_dim=32, num_heads=2, **overrides)
    torch.manual_seed(0)
    agent = make_agent(args, "cpu")
    with torch.no_grad():  # the y-encoder and the critic: a reload must not take them for the x-encoder and actor
        for p in [*agent[1].parameters(), *agent[4].parameters()]:
            p.add_(1.0)
    ref.save_checkpoint(str(path), args, *agent[:5])
    return args, agent


@pytest.mark.parametrize("tubelets", [False, True])
def test_checkpoint_reloads_the_policy_it_saved(tmp_path, tubelets):
    args, agent = save_small_checkpoint(tmp_path / "model.pt", tubelets=tubelets)
    saved, encoder, actor = lab.load_policy(str(tmp_path / "model.pt"), "cpu")
    assert saved.tubelets == tubelets and saved.embed_dim == 32
    stacks = fake_minibatch(args, n=8)["stacks"]
    with torch.no_grad():
        assert torch.equal(actor(encoder(stacks)), agent[3](agent[0](stacks)))


def test_a_checkpoint_of_the_reference_or_of_before_the_split_loads_in_the_lab(tmp_path):
    """model.pt of the reference records none of the lab's flags; one of before the split named the patch
    projection patch_embed: both load as the reference's encoder and play the policy they saved."""
    path = tmp_path / "model.pt"
    args, agent = save_small_checkpoint(path, args_class=ref.Args, make_agent=ref.make_agent)
    assert "frame_gap" not in torch.load(path, weights_only=True)["args"]
    stacks = fake_minibatch(args, n=8)["stacks"]
    saved, encoder, actor = lab.load_policy(str(path), "cpu")
    assert isinstance(saved, lab.LabArgs) and saved.embed_dim == 32 and saved.frame_gap == 1
    assert type(encoder) is ref.ViTEncoder
    with torch.no_grad():
        assert torch.equal(actor(encoder(stacks)), agent[3](agent[0](stacks)))
    old = torch.load(path, weights_only=True)
    old["encoder"] = {k.replace("patch_proj.", "patch_embed."): v for k, v in old["encoder"].items()}
    assert "patch_embed.weight" in old["encoder"]
    torch.save(old, path)
    _, encoder, actor = lab.load_policy(str(path), "cpu")
    with torch.no_grad():
        assert torch.equal(actor(encoder(stacks)), agent[3](agent[0](stacks)))


@pytest.mark.parametrize("kind, reason", [
    ("corrupt bytes", "is not a model.pt that loads here (UnpicklingError: "),
    ("another program's file", "is not a model.pt that loads here ("),
    ("a torch file without a model", "is not a model.pt written by --save-model"),
    ("a model of another size", "do not fit"),
    ("a model that does not record its patch size", "does not record patch_size"),
    ("a directory", "is a directory or a device, not a model.pt file"),  # refused by the parser, before evaluation
    ("a file gone after parsing", "cannot read"),
    ("a directory that took the file's place after parsing", "cannot read"),
])
def test_eval_checkpoint_that_is_no_checkpoint_exits_with_one_line(kind, reason, tmp_path):
    """--eval-checkpoint reads the file once, in `evaluate`: each kind of bad file ends in one line that says what
    is wrong (an unreadable path is "cannot read", not "not a model.pt")."""
    path = tmp_path / "model.pt"
    if kind == "corrupt bytes":
        path.write_bytes(bytes(range(256)) * 4)
    elif kind == "another program's file":
        path.write_text("step,return\n1,20\n")
    elif kind == "a torch file without a model":
        torch.save({"weights": torch.zeros(3)}, path)
    elif kind == "a directory":
        path.mkdir()
        assert reason in one_line_exit(["--eval-checkpoint", str(path)], lab_parse)
        return
    else:
        save_small_checkpoint(path)
        saved = torch.load(path, weights_only=True)
        if kind == "a model of another size":
            saved["args"]["embed_dim"] = 64
        elif kind == "a model that does not record its patch size":
            del saved["args"]["patch_size"]
        torch.save(saved, path)
    args = lab_parse(["--eval-checkpoint", str(path)])  # the file is there: the parser lets it through
    if "after parsing" in kind:
        path.unlink()
        if "directory" in kind:
            path.mkdir()
    message = one_line_exit(args, lambda args: lab.evaluate(args, "cpu"))
    assert message.startswith("error: --eval-checkpoint: ") and reason in message


# ------------------------------------------------------------------------------------------- pictures
def F_sdpa(q, k, v):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v)


@pytest.mark.parametrize("tubelets", [False, True])
def test_cls_attention_is_the_last_blocks_attention_of_the_cls_token(tubelets):
    args, encoder, *_ = lab_models(tubelets=tubelets)
    stacks = fake_minibatch(args, n=3)["stacks"]
    maps = lab.cls_attention(encoder, stacks)
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
    image = lab.attention_image(stacks, maps)
    assert image.shape == (3, 3 * args.frame_height, 3 * args.frame_width) and 0 <= image.min() and image.max() <= 1


def test_attention_image_puts_each_stack_in_a_row_and_its_hottest_patch_in_red():
    frames = torch.full((2, 3, 4, 6), 255, dtype=torch.uint8)
    frames[1, 2] = 0  # stack 1, frame t: black
    attention = torch.zeros(2, 3, 4, 6)
    attention[0, 1, :2, :3] = 1.0  # stack 0: all its attention on one patch of frame t-1
    attention[1] = 0.5  # stack 1: even
    image = lab.attention_image(frames, attention)  # (3, 2 * 4, 3 * 6)
    assert image.shape == (3, 8, 18)
    assert torch.allclose(image[:, :2, 6:9], torch.tensor([1.0, 0.3, 0.3])[:, None, None])  # red over white
    assert torch.equal(image[:, :4, :6], torch.ones(3, 4, 6))  # stack 0, frame t-2: white, no heat
    assert torch.equal(image[:, 4:, 12:], torch.zeros(3, 4, 6))  # stack 1, frame t: black, even attention: no heat


@pytest.mark.parametrize("num_stacks", [1, 2, 3, 4, 8])
def test_frame_stacks_image_shows_up_to_four_stacks_a_row_each(num_stacks):
    """The first frame stacks' picture takes the stacks there are (the old loop assumed 4 and crashed on fewer)."""
    stacks = torch.randint(0, 256, (num_stacks, 3, 4, 6), dtype=torch.uint8)
    image = lab.frame_stacks_image(stacks)
    shown = min(num_stacks, 4)
    assert image.shape == (4 * shown, 3 * 6) and image.dtype == torch.uint8
    for k in range(shown):
        for f in range(3):
            assert torch.equal(image[4 * k:4 * k + 4, 6 * f:6 * f + 6], stacks[k, f])


def test_play_greedy_feeds_the_lab_encoder_histories_of_five_frames_under_a_gap_of_2():
    args = lab.LabArgs(frame_gap=2)
    torch.manual_seed(0)
    encoder, _, _, actor, _, _ = lab.make_agent(args, "cpu")
    with torch.no_grad():
        actor[-1].bias.copy_(torch.tensor([0.0, 100.0]))  # always push right
    lengths = []
    encoder.register_forward_pre_hook(lambda module, inputs: lengths.append(inputs[0].shape[1]))
    assert 1 < ref.play_greedy(encoder, actor, 32, 96, 2, 5, None, 2 * args.frame_gap + 1) < 30
    assert set(lengths) == {5}


# ------------------------------------------------------------------------------------ end to end, logged
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_the_two_layers_agree_to_the_bit(config):
    """With no lab flag, the lab's loop (the reference's steps, and its diagnostics around them) logs every value
    the reference logs, to the bit, in each of the paper's four configurations; all timings left out."""
    same_logs = script_module("same_logs")
    ref_dir, _ = cached_run(three(config))
    lab_dir, _ = cached_run(three(config), script=LAB_SCRIPT)
    assert same_logs.differing_tags(ref_dir, lab_dir, shared=True) == ([], len(TAGS) - len(TIMINGS))


def test_the_comparison_of_the_two_layers_sees_a_one_operation_change(tmp_path):
    """The lab with --weight-decay 0.01 differs from the reference by one multiplication per optimizer step, the
    decay, smaller than a thousandth of a weight's step: the comparison above must see it."""
    same_logs = script_module("same_logs")
    ref_dir, _ = cached_run(three("2"))
    run_once(three("2", "--weight-decay", "0.01"), tmp_path, script=LAB_SCRIPT)
    (lab_dir,) = glob.glob(str(tmp_path / "runs" / "*"))
    differ, compared = same_logs.differing_tags(ref_dir, lab_dir, shared=True)
    assert compared == len(TAGS) - len(TIMINGS)
    assert {"losses/value_loss", "losses/jepa_loss", "grad_norm/encoder", "embedding/variance"} <= set(differ)


ONE_MORE_OPERATION = """
import runpy, sys
sys.path.insert(0, sys.argv[1])
import jepa_ppo_cartpole as ref
ema_step = ref.ema_update
def ema_update(target, online, tau):  # the y-encoder's step 1% longer: one multiplication more
    ema_step(target, online, 1.0 - (1.0 - tau) * 1.01)
ref.ema_update = ema_update
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_the_comparison_of_the_two_layers_fails_when_the_reference_path_changes_by_one_operation(tmp_path):
    """The agreement test above is no formality: the lab run with one operation more in the reference's own
    `ema_update`, which `ref.update` calls, no longer logs the reference's values. The change is large enough to move
    the logged floats whatever the CPU's kernels round: a change of a few bits in the y-encoder does not on every CPU.
    That the comparison sees a change far smaller than a weight's step, the weight-decay test above shows."""
    same_logs = script_module("same_logs")
    driver = tmp_path / "one_more_operation.py"
    driver.write_text(ONE_MORE_OPERATION)
    result = subprocess.run([sys.executable, str(driver), ROOT, LAB_SCRIPT, *three("3")], cwd=tmp_path,
                            capture_output=True, text=True, timeout=240, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr
    (lab_dir,) = glob.glob(str(tmp_path / "runs" / "*"))
    ref_dir, _ = cached_run(three("3"))
    differ, compared = same_logs.differing_tags(ref_dir, lab_dir, shared=True)
    assert compared == len(TAGS) - len(TIMINGS) and "losses/jepa_loss" in differ


def pre_split_weights(args):
    """Seed 0, then the encoder's layers drawn in the order of the single file before the split (commit f55ef73), the
    order of every published run, written out here on its own: {state_dict name: tensor} and the generator's state."""
    orthogonal = lambda layer: (nn.init.orthogonal_(layer.weight, 2**0.5), nn.init.zeros_(layer.bias), layer)[-1]
    torch.manual_seed(0)
    p, d, n, layers = args.patch_size, args.embed_dim, 3 if args.tubelets else 1, {}
    if args.encoder == "cnn":
        layers["convs.0"], layers["convs.2"] = nn.Conv2d(3, 32, 4, stride=2), nn.Conv2d(32, 64, 3, stride=2)
        layers["convs.4"] = nn.Conv2d(64, 64, 3, stride=1)
        height, width = (args.frame_height - 4) // 2 + 1, (args.frame_width - 4) // 2 + 1
        height, width = (height - 3) // 2 - 1, (width - 3) // 2 - 1  # the second convolution, then the third
        layers["fc"], layers["ln_f"] = nn.Linear(64 * height * width, d), nn.LayerNorm(d)
    else:
        if args.patch_embed == "linear":
            layers["patch_proj"] = nn.Linear(n * p * p, d)
        else:
            widths = [n] + [min(16 * 2**i, d) for i in range(int(math.log2(p)))]
            for i, (c_in, c_out) in enumerate(zip(widths, widths[1:])):
                layers[f"patch_proj.{2 * i}"] = orthogonal(nn.Conv2d(c_in, c_out, 3, 2, 1))
            layers[f"patch_proj.{2 * len(widths) - 2}"] = orthogonal(nn.Conv2d(widths[-1], d, 1))
        rows, cols = args.frame_height // p, args.frame_width // p
        for name, shape in [("frame_pos", (3 // n, 1, 1, d)), ("row_pos", (1, rows, 1, d)),
                            ("col_pos", (1, 1, cols, d)), ("cls_token", (1, 1, d))]:
            layers[name] = 0.02 * torch.randn(shape)
        for b in range(args.depth):
            layers[f"blocks.{b}.ln_1"], layers[f"blocks.{b}.ln_2"] = nn.LayerNorm(d), nn.LayerNorm(d)
            layers[f"blocks.{b}.qkv"], layers[f"blocks.{b}.proj"] = nn.Linear(d, 3 * d), nn.Linear(d, d)
            hidden = args.mlp_ratio * d
            layers[f"blocks.{b}.mlp.0"], layers[f"blocks.{b}.mlp.2"] = nn.Linear(d, hidden), nn.Linear(hidden, d)
        layers["ln_f"] = nn.LayerNorm(d)
    weights = {}
    for name, layer in layers.items():
        weights.update({name: layer} if torch.is_tensor(layer) else
                       {f"{name}.{key}": value for key, value in layer.state_dict().items()})
    return weights, torch.get_rng_state()


# the lab's encoders that the published runs used, with the reference's ViT; they redraw their weights in the pre-split
# order, which the reference's ViT must keep too
PRE_SPLIT_ENCODERS = [{}, {"tubelets": True}, {"patch_embed": "conv"}, {"tubelets": True, "patch_embed": "conv"},
                      {"encoder": "cnn"}]


@pytest.mark.parametrize("flags", PRE_SPLIT_ENCODERS,
                         ids=lambda flags: "-".join(f"{k}={v}" for k, v in flags.items()) or "vit")
def test_encoders_start_from_the_weights_drawn_before_the_split(flags):
    """The published runs started from these weights: a change to the order in which the reference's ViT or the lab's
    encoders create their layers would silently move them. Both sides are computed here, on this machine's kernels."""
    expected, expected_rng = pre_split_weights(lab.LabArgs(**flags))
    torch.manual_seed(0)
    encoder = lab.make_encoder(lab.LabArgs(**flags))
    assert torch.equal(torch.get_rng_state(), expected_rng)  # the same number of draws: later draws line up
    weights = encoder.state_dict()
    assert sorted(weights) == sorted(expected)
    assert [name for name in weights if not torch.equal(weights[name], expected[name])] == []


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_the_lab_logs_every_reference_tag_and_its_own(config):
    run_dir, result = cached_run(three(config), script=LAB_SCRIPT)
    assert "SPS" in result.stdout and "return" in result.stdout
    logged = scalars(run_dir)
    assert sorted(logged) == sorted(LAB_TAGS)
    assert all(np.isfinite(v) for tag in LAB_TAGS if not tag.startswith("losses/explained") for _, v in logged[tag])
    assert [c for _, c in logged["embedding/collapsed"]] == [float(v < 1e-7) for _, v in logged["embedding/variance"]]
    assert [step for step, _ in logged["probe/r2_pole_angle"]] == [256, 768]  # the first and the last iteration
    acc = EventAccumulator(run_dir, size_guidance={"images": 0})
    acc.Reload()
    assert sorted(acc.Tags()["images"]) == ["attention/cls_to_patches", "observations/frame_stacks"]
    assert [e.step for e in acc.Images("observations/frame_stacks")] == [0]
    assert acc.Tags()["tensors"]  # the hyperparameter table (text)
    with open(os.path.join(run_dir, "projector_config.pbtxt")) as config_file:
        assert config_file.read().count("embeddings {") == 2  # the probe set at the first and the last iteration


def test_warmup_schedule_in_the_loop_and_frame_diffs_smoke(tmp_path):
    """--lr-warmup-iters 2 over 4 iterations: the rate rises over the first two, times the linear annealing
    (--frame-diffs and --frame-gap ride along as a smoke test of the loop; their inputs are tested above)."""
    logged = run_once([*CONFIGS["2"], *SHORT, "--total-timesteps", "1024", "--lr-warmup-iters", "2", "--frame-diffs",
                       "--frame-gap", "2"], tmp_path, script=LAB_SCRIPT)
    assert [lr for _, lr in logged["charts/learning_rate"]] == pytest.approx([5e-4, 7.5e-4, 5e-4, 2.5e-4])
    assert all(np.isfinite(v) for _, v in logged["losses/jepa_loss"])


def test_frame_gap_changes_what_the_loop_feeds_the_encoder(tmp_path):
    """The same seed with --frame-gap 2 differs from the lab without it: the loop feeds its encoder other stacks,
    not only its probe."""
    same_logs = script_module("same_logs")
    run_dir, _ = cached_run(three("2"), script=LAB_SCRIPT)
    run_once(three("2", "--frame-gap", "2"), tmp_path, script=LAB_SCRIPT)
    differ, _ = same_logs.differing_tags(run_dir, glob.glob(str(tmp_path / "runs" / "*"))[0])
    assert "losses/jepa_loss" in differ and "losses/value_loss" in differ


def test_cnn_encoder_runs_the_loop(tmp_path):
    logged = run_once([*CONFIGS["2"], *SHORT, "--encoder", "cnn", "--image-every", "1"], tmp_path, script=LAB_SCRIPT)
    assert all(tag in logged for tag in LAB_TAGS)
    acc = EventAccumulator(glob.glob(str(tmp_path / "runs" / "*"))[0])
    acc.Reload()
    assert acc.Tags()["images"] == ["observations/frame_stacks"]  # no attention maps without attention


def test_collapse_diagnostics_in_the_loop(tmp_path):
    """With --no-final-ln the variance before the LayerNorm is the embedding's; with it, the gain starts at norm 8."""
    plain = run_once([*CONFIGS["3"], *SHORT, "--no-final-ln"], tmp_path, script=LAB_SCRIPT)
    assert plain["embedding/variance_pre_ln"] == plain["embedding/variance"] and "embedding/ln_gain_norm" not in plain
    run_dir, _ = cached_run(three("3"), script=LAB_SCRIPT)  # 3 iterations, --image-every 100
    normed = scalars(run_dir)
    assert all(7.5 < g < 8.5 for _, g in normed["embedding/ln_gain_norm"])  # sqrt(64) = 8, moved a little by 48 steps
    acc = EventAccumulator(run_dir, size_guidance={"images": 0})
    acc.Reload()
    assert [e.step for e in acc.Images("attention/cls_to_patches")] == [256, 768]  # the first and the last iteration
    assert normed["embedding/variance_pre_ln"] != normed["embedding/variance"]


@pytest.mark.parametrize("num_envs", [1, 2, 3])
def test_the_lab_trains_with_fewer_than_four_environments(num_envs, tmp_path):
    """Guards a defect: with 1, 2 or 3 environments the first stacks' picture (drawn for four) crashed the run and
    left its directory behind. It shows the stacks there are; the fixed-set probe is logged, and the on-policy probe
    (which splits the environments in two halves) from two environments on."""
    logged = run_once(["--num-envs", str(num_envs), "--num-steps", "32", "--total-timesteps", str(64 * num_envs),
                       "--no-cuda"], tmp_path, script=LAB_SCRIPT)
    assert all(f"probe/r2_{name}" in logged for name in lab.STATE_VARIABLES)
    assert any(tag.startswith("probe/onpolicy") for tag in logged) == (num_envs >= 2)
    acc = EventAccumulator(glob.glob(str(tmp_path / "runs" / "*"))[0], size_guidance={"images": 0})
    acc.Reload()
    (image,) = acc.Images("observations/frame_stacks")
    assert (image.height, image.width) == (32 * num_envs, 3 * 96)


def test_nan_loss_in_the_lab_stops_with_step_keeps_logs_and_saves_no_model(tmp_path):
    result = run_script([*NAN_RUN, "--save-model"], cwd=tmp_path, script=LAB_SCRIPT)
    assert result.returncode != 0 and "global step" in result.stderr and "Traceback" not in result.stderr
    assert "model saved" not in result.stdout
    (run_dir,) = glob.glob(str(tmp_path / "runs" / "*"))
    assert not os.path.exists(os.path.join(run_dir, "model.pt"))
    assert "charts/episodic_return" in scalars(run_dir)  # what was logged before the NaN survives


def test_ctrl_c_in_the_lab_flushes_logs_and_saves_model(tmp_path):
    out, err, run_dir = run_to_interrupt(LAB_SCRIPT, tmp_path)
    assert "interrupted" in out and "Traceback" not in err
    assert len(scalars(run_dir)["losses/jepa_loss"]) >= 2
    assert os.path.isfile(os.path.join(run_dir, "model.pt"))


def test_checkpoint_saves_and_plays_greedy_episodes(tmp_path):
    """One short run with --save-model --capture-video --image-every 1; the pictures and the projector read back;
    --eval-checkpoint plays the saved policy and writes its GIF beside the checkpoint."""
    result = run_script([*SHORT, "--save-model", "--ema-tau", "0", "--capture-video", "--eval-episodes", "2",
                         "--image-every", "1"], cwd=tmp_path, script=LAB_SCRIPT)
    assert result.returncode == 0, result.stderr
    assert "mean return over 2 greedy episodes" in result.stdout
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
    assert tensors.shape == (lab.PROBE_STATES, 64) and np.isfinite(tensors).all()
    metadata = open(os.path.join(last, "metadata.tsv")).read().splitlines()
    assert metadata[0].split("\t") == lab.STATE_VARIABLES and len(metadata) == lab.PROBE_STATES + 1
    probe_stacks, probe_states = lab.make_probe_set(1, 32, 96, "cpu")
    np.testing.assert_allclose(np.array([row.split("\t") for row in metadata[1:]], dtype=float), probe_states.numpy(),
                               rtol=1e-5)
    _, encoder, _ = lab.load_policy(os.path.join(run_dir, "model.pt"), "cpu")  # the last snapshot: the final encoder
    with torch.no_grad():
        np.testing.assert_allclose(tensors, encoder(probe_stacks).numpy(), rtol=1e-4, atol=1e-4)
    os.remove(os.path.join(run_dir, "greedy_episode.gif"))
    (checkpoint,) = glob.glob(str(tmp_path / "runs" / "*" / "model.pt"))
    saved = torch.load(checkpoint, weights_only=True)
    assert {"args", *MODULES} == set(saved)
    # the loop's EMA moved the y-encoder it trained against: with tau 0 it is the x-encoder itself
    assert all(torch.equal(saved["target_encoder"][k], v) for k, v in saved["encoder"].items())
    torch.manual_seed(1)
    initial = ref.make_vit(ref.parse_args([])).state_dict()
    assert not all(torch.equal(initial[k], v) for k, v in saved["encoder"].items())
    result = run_script(["--eval-checkpoint", checkpoint, "--eval-episodes", "3", "--capture-video"], cwd=tmp_path,
                        script=LAB_SCRIPT)
    assert result.returncode == 0, result.stderr
    assert "mean return over 3 greedy episodes" in result.stdout
    with Image.open(os.path.join(run_dir, "greedy_episode.gif")) as gif:  # written beside the checkpoint
        assert gif.n_frames > 1
    assert len(glob.glob(str(tmp_path / "runs" / "*"))) == 1  # evaluation creates no run directory
