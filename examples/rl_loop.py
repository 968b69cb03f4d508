"""GRPO-style RL against a tpfleet fleet: a transformers trainer, two TP engines behind the router,
new weights pushed into the engines before every rollout. Prints the mean reward per step (it rises)
and the rollout-vs-trainer log-prob mismatch over every generated token. The loop is
tpfleet.rl_loop; this is its command line.

    python examples/rl_loop.py                       # CPU, float32, the tiny model built on the fly
    python examples/rl_loop.py --device cuda         # engines on GPUs 0-3, the trainer on GPU 4 (NCCL
                                                     # and CUDA IPC); with no GPU to spare it shares GPU 0
                                                     # and sends CUDA IPC handles only
    python examples/rl_loop.py --engines 2 --tp-size 1 --steps 8 --weight-sync both
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile

from tpfleet.model.make_model import make_model
from tpfleet.rl_loop import SYNC_METHODS, RLConfig, train


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    defaults = RLConfig(model="")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="Qwen3 checkpoint (default: build the tiny one)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--engines", type=int, default=defaults.engines)
    ap.add_argument("--tp-size", type=int, default=defaults.tp_size)
    ap.add_argument("--steps", type=int, default=defaults.steps)
    ap.add_argument("--num-prompts", type=int, default=defaults.num_prompts)
    ap.add_argument("--group-size", type=int, default=defaults.group_size, help="samples per prompt (G)")
    ap.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    ap.add_argument("--lr", type=float, default=defaults.lr)
    ap.add_argument("--seed", type=int, default=defaults.seed)
    ap.add_argument("--weight-sync", choices=SYNC_METHODS, default=None,
                    help="how new weights reach the engines (default: both, alternating, on cuda; distributed on cpu)")
    ap.add_argument("--json", action="store_true", help="print the result as JSON at the end")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """Run the loop; returns its result (per-step rewards, mismatches, weight versions, timings)."""
    args = parse_args(argv)
    model = args.model or str(make_model("tiny", tempfile.mkdtemp(prefix="tpfleet-rl-")))
    cfg = RLConfig(model=model, device=args.device, engines=args.engines, tp_size=args.tp_size, steps=args.steps,
                   num_prompts=args.num_prompts, group_size=args.group_size, max_new_tokens=args.max_new_tokens,
                   lr=args.lr, seed=args.seed, weight_sync=args.weight_sync)
    result = train(cfg)
    if args.json:
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
