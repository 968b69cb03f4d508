"""Training and rollouts on the same device(s), as RL post-training runs them.

Each iteration: the engine gives its GPU memory back, the trainer takes a step, the engine takes
its memory again, the trainer pushes its new weights into the engine (CUDA IPC on GPU, by value on
CPU), and the engine generates a rollout. After every update the engine's greedy rollout must equal
the trainer's own greedy generation: proof that the weights really arrived.

    python examples/colocate.py                     # CPU, the tiny model built on the fly
    python examples/colocate.py --device cuda --model /path/to/qwen3
"""

from __future__ import annotations

import argparse
import sys
import tempfile

import httpx
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tpfleet.fleet import Fleet, FleetConfig
from tpfleet.model.config import ModelConfig
from tpfleet.model.make_model import make_model
from tpfleet.weight_sync import FlattenedBucketSender, update_weights_from_tensor_request


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="Qwen3 checkpoint (default: build the tiny one)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--steps", type=int, default=3)
    a = ap.parse_args()
    model = a.model or str(make_model("tiny", tempfile.mkdtemp(prefix="tpfleet-colocate-")))
    # Trainer and engine both use the checkpoint's dtype (float32 for the tiny model), so the greedy
    # check below compares like with like; in bf16 two correct implementations drift apart.
    dtype = ModelConfig.from_dir(model).dtype
    engine = {"dtype": str(dtype).removeprefix("torch.")}
    engine.update({"mem_fraction_static": 0.3} if a.device == "cuda" else {"kv_cache_tokens": 8192})

    tok = AutoTokenizer.from_pretrained(model)
    trainer = AutoModelForCausalLM.from_pretrained(model, dtype=dtype).to(a.device)
    opt = torch.optim.AdamW(trainer.parameters(), lr=2e-3)
    prompt = tok("Once upon a time").input_ids
    data = torch.tensor([tok("The quick brown fox jumps over the lazy dog. " * 4).input_ids], device=a.device)

    ok = True
    with Fleet(FleetConfig(model=model, engines=1, tp_size=1, device=a.device, engine=engine)) as fleet:
        url = fleet.urls[0]
        for step in range(a.steps):
            freed = fleet.broadcast("/release_memory_occupation")[0]
            trainer.train()
            loss = trainer(input_ids=data, labels=data).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            fleet.broadcast("/resume_memory_occupation")
            named = [(n, p.detach()) for n, p in trainer.state_dict().items()]
            with FlattenedBucketSender(named, device=a.device) as sender:
                r = fleet.broadcast("/update_weights_from_tensor",
                                    update_weights_from_tensor_request([sender.payload()]))
            rollout = httpx.post(f"{url}/generate", json={"input_ids": prompt, "sampling_params": {
                "max_new_tokens": 12, "temperature": 0, "ignore_eos": True}}, timeout=120).json()
            trainer.eval()
            with torch.no_grad():
                mine = trainer.generate(torch.tensor([prompt], device=a.device), max_new_tokens=12, do_sample=False,
                                        eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
            match = rollout["output_ids"] == mine
            ok &= match
            print(f"step {step}: loss {loss.item():.4f}; engine released {freed['released']}: "
                  f"{freed['released_tensor_bytes'] / 2**20:.1f} MiB of tensors, "
                  f"{freed['freed_bytes'] / 2**20:.1f} MiB "
                  f"of device memory freed; {r[0]['message']}; rollout {rollout['text']!r}; "
                  f"{'matches' if match else 'DIFFERS from'} the trainer's greedy generation", flush=True)
    print("colocation: all rollouts match the trainer" if ok else "colocation: MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
