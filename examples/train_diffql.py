"""Diffusion-QL with DyDiff augmentation on the embedded default (shipped Hopper bundle, medium dataset),
evaluated in the real Hopper-v5. A Diffusion-QL step costs ~8x a TD3+BC step on a CPU, so the default
budget is smaller; pass --steps for longer runs.

    python examples/train_diffql.py
    python examples/train_diffql.py --no-dydiff
"""

import argparse

from agents import DiffusionQL
from agents.recipes import add_common_args, run_offline


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, steps=6_000, rollout_every=2_000, rollout_starts=256, eval_every=3_000)
    args = parser.parse_args(argv)
    return run_offline("diffql", lambda data, device: DiffusionQL.from_data(data, device=device), args)


if __name__ == "__main__":
    main()
