"""How large is each loss's gradient on the encoder? Per-loss gradient norms over the first iterations of a run.

    python docs/research/grad_scale.py --seed 6 --iterations 71 --every 10

Trains with the lab's (and so the reference's) own functions and default flags (configuration 2, the warm-up and
annealing schedule of a 100k-step run) and, on the first minibatch of every --every-th iteration's batch, prints
the norm of the gradient that the policy loss, the value loss (times vf_coef) and the JEPA loss each put on the
x-encoder's parameters (the third screening round in docs/RESULTS.md, and its scratch --balance-grads, rest on these).
"""

import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import jepa_ppo_cartpole_lab as lab  # noqa: E402

ref = lab.ref


def encoder_grad_norm(loss, encoder):
    grads = torch.autograd.grad(loss, list(encoder.parameters()), retain_graph=True, allow_unused=True)
    return torch.linalg.vector_norm(torch.stack([g.norm() for g in grads if g is not None])).item()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=6)
    parser.add_argument("--iterations", type=int, default=71)
    parser.add_argument("--every", type=int, default=10)
    cli = parser.parse_args()
    torch.set_num_threads(1)
    args = ref.parse_args(["--seed", str(cli.seed), "--no-cuda"], lab.LabArgs, lab.check_lab_args)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    encoder, target_encoder, predictor, actor, critic, optimizer = lab.make_agent(args, "cpu")
    envs = ref.make_envs(args.num_envs)
    state = torch.as_tensor(envs.reset(seed=args.seed)[0])
    H, W, batch_size = args.frame_height, args.frame_width, args.num_envs * args.num_steps
    num_iterations, history = args.total_timesteps // batch_size, 2 * args.frame_gap + 1
    env_state = {"state": state, "stack": ref.initial_stack(state, H, W, history),
                 "is_reset_step": torch.zeros(args.num_envs, dtype=torch.bool)}
    rollout = ref.make_rollout_storage(args.num_steps, args.num_envs, (history, H, W), args.embed_dim, "cpu")
    minibatch_size = batch_size // args.num_minibatches
    print("| iteration | steps | policy | value | JEPA | JEPA / policy | JEPA / value |\n|---|---|---|---|---|---|---|")
    for iteration in range(1, cli.iterations + 1):
        optimizer.param_groups[0]["lr"] = ref.learning_rate_at(args, iteration, num_iterations)  # the defaults'
        ref.collect_rollout(envs, encoder, actor, critic, rollout, env_state)
        batch = lab.lab_batch(args, rollout, encoder, target_encoder, critic)
        if (iteration - 1) % cli.every == 0:
            losses = ref.minibatch_losses(args, encoder, predictor, actor, critic,
                                          {k: v[:minibatch_size] for k, v in batch.items()})
            policy = encoder_grad_norm(losses["policy_loss"], encoder)
            value = encoder_grad_norm(args.vf_coef * losses["value_loss"], encoder)
            jepa = encoder_grad_norm(args.jepa_coef * losses["jepa_loss"], encoder)
            print(f"| {iteration} | {iteration * batch_size} | {policy:.3g} | {value:.3g} | {jepa:.3g} | "
                  f"{jepa / policy:.0f} | {jepa / value:.2f} |", flush=True)
        lab.lab_update(args, encoder, target_encoder, predictor, actor, critic, optimizer, batch)
    envs.close()


if __name__ == "__main__":
    main()
