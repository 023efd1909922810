"""How large is each loss's gradient on the encoder? Per-loss gradient norms over the first iterations of a run.

    python scripts/grad_scale.py --seed 6 --iterations 71 --every 10

Trains with the training file's own functions and default flags (configuration 2, the warm-up and annealing
schedule of a 100k-step run) and, on the first minibatch of every --every-th iteration's batch, prints the norm
of the gradient that the policy loss, the value loss (times vf_coef) and the JEPA loss each put on the x-encoder's
parameters (the third screening round in docs/RESULTS.md, and its scratch --balance-grads, rest on these).
"""

import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import jepa_ppo_cartpole as jp  # noqa: E402


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
    args = jp.parse_args(["--seed", str(cli.seed), "--no-cuda"])
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    encoder, target_encoder, predictor, actor, critic, optimizer = jp.make_agent(args, "cpu")
    envs = jp.make_envs(args.num_envs)
    state = torch.as_tensor(envs.reset(seed=args.seed)[0])
    env_state = {"state": state, "history": jp.initial_stack(state, args.frame_height, args.frame_width, 3),
                 "is_reset_step": torch.zeros(args.num_envs, dtype=torch.bool)}
    rollout, timings = jp.make_rollout_storage(args, "cpu"), {"env": 0.0, "inference": 0.0}
    print("| iteration | steps | policy | value | JEPA | JEPA / policy | JEPA / value |\n|---|---|---|---|---|---|---|")
    for iteration in range(1, cli.iterations + 1):
        frac = (1.0 - (iteration - 1.0) / args.num_iterations) * min(1.0, iteration / args.lr_warmup_iters)  # the defaults' schedule
        optimizer.param_groups[0]["lr"] = frac * args.learning_rate
        jp.collect_rollout(envs, encoder, actor, critic, rollout, env_state, timings, 1)
        batch = jp.make_batch(args, rollout, encoder, target_encoder, critic)
        if (iteration - 1) % cli.every == 0:
            losses = jp.minibatch_losses(args, encoder, predictor, actor, critic, {k: v[:args.minibatch_size] for k, v in batch.items()})
            policy = encoder_grad_norm(losses["policy_loss"], encoder)
            value = encoder_grad_norm(args.vf_coef * losses["value_loss"], encoder)
            jepa = encoder_grad_norm(args.jepa_coef * losses["jepa_loss"], encoder)
            print(f"| {iteration} | {iteration * args.batch_size} | {policy:.3g} | {value:.3g} | {jepa:.3g} | {jepa / policy:.0f} | {jepa / value:.2f} |", flush=True)
        jp.update(args, encoder, target_encoder, predictor, actor, critic, optimizer, batch)
    envs.close()


if __name__ == "__main__":
    main()
