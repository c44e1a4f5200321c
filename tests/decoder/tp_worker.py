"""One rank of tests/decoder/test_tensor_parallel.py: runs under `torchrun --nproc-per-node 2`.

Loads each checkpoint with transformers' own tensor parallelism (`from_pretrained(path, tp_plan="auto")`,
spelled `distributed_config=DistributedConfig(tp_plan="auto")`),
runs the checks' forwards and decodes (the exact Decoder and the FastDecoder), and saves what it saw
to OUT/rank{r}.pt; the test compares it with the same work done by one unsharded process.

    torchrun --nproc-per-node 2 tests/decoder/tp_worker.py --out OUT CHECKPOINT...
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # the repository root

from decoder.attention import AttentionPlan, _attachment, attach, use_plan  # noqa: E402
from decoder.dysco import DyscoConfig  # noqa: E402
from decoder.fast import FastDecoder  # noqa: E402
from decoder.generation import Decoder  # noqa: E402

# Heads on both ranks of a 4-head model split in two (rank 0: 0-1, rank 1: 2-3), and a layer whose
# heads of S all sit on one rank.
HEAD_SET = [(1, 0), (1, 3), (2, 2), (3, 1), (3, 0)]
CONFIGS = {
    "dynamic": DyscoConfig(head_set=HEAD_SET, top_p=0.5, top_k=16, context_warmup=4),
    "lagged": DyscoConfig(head_set=HEAD_SET, top_p=0.5, top_k=16, context_warmup=4, selection="lagged"),
    "hard": DyscoConfig(head_set=[(2, 3), (2, 2)], strength=100.0, top_p=0.9, context_warmup=3),
    "static": DyscoConfig(head_set=HEAD_SET, top_p=0.5, top_k=16, context_warmup=4, selection="static"),
}
PROMPTS = [
    [{"role": "user", "content": "Alice lives in Paris and works as a baker. Bob lives in Tokyo. Where does Alice live?"}],
    [{"role": "user", "content": "The value of key 17 is 42."}],
]
NEW_TOKENS = 8


def captures_and_ablation(model, tokenizer) -> dict:
    """Probabilities of a plan that captures every row of some heads (bias on), and logits with heads ablated."""
    attach(model)
    device = model.get_input_embeddings().weight.device
    batch = tokenizer(["The quick brown fox jumps over the lazy dog.", "Alice lives in Paris."], return_tensors="pt",
                      padding=True)
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    n = ids.shape[1]
    bias = torch.zeros(ids.shape[0], n, device=device)
    bias[:, 2] = 1.5  # captures include the bias
    plan = AttentionPlan(logit_bias=bias, capture_heads={1: torch.tensor([3, 0, 1]), 2: torch.tensor([2, 3])},
                         capture_rows=slice(None))
    with torch.no_grad(), use_plan(model, plan):
        model(input_ids=ids, attention_mask=mask)
    ablate = AttentionPlan(ablate_heads={0: torch.tensor([1, 2]), 3: torch.tensor([3])})
    with torch.no_grad(), use_plan(model, ablate):
        ablated = model(input_ids=ids, attention_mask=mask).logits
    return {"captured": {layer: c.cpu() for layer, c in plan.captured.items()}, "ablated": ablated.float().cpu()}


def decodes(model, tokenizer) -> dict:
    """Greedy tokens and logits of vanilla and every DySCO configuration above, on a padded batch."""
    out = {}
    for name, config in [("vanilla", None), *CONFIGS.items()]:
        decoder = Decoder(model, tokenizer, "vanilla") if config is None else Decoder(model, tokenizer, "dysco", dysco=config)
        result = decoder.generate(PROMPTS, max_new_tokens=NEW_TOKENS, return_logits=True)
        out[name] = {"tokens": result.token_ids, "logits": [x.cpu() for x in result.logits]}
    return out


def fast_decodes(model, tokenizer, cuda_graphs: bool = False) -> dict:
    """`decodes` on the fast path (unfused, as it runs under tensor parallelism), and a dynamic decode that
    continues a shared prefill (`prefill` / `generate_from`, as calibration trials do)."""
    out = {}
    for name, config in [("vanilla", None), *CONFIGS.items()]:
        method = "vanilla" if config is None else "dysco"
        fast = FastDecoder(model, tokenizer, method, dysco=config, fuse=False, cuda_graphs=cuda_graphs)
        result = fast.generate(PROMPTS, max_new_tokens=NEW_TOKENS, return_logits=True)
        out[name] = {"tokens": result.token_ids, "logits": [x.cpu() for x in result.logits]}
    state = FastDecoder(model, tokenizer, "vanilla", fuse=False).prefill(PROMPTS, warmup=16, max_new_tokens=NEW_TOKENS)
    resumed = FastDecoder(model, tokenizer, "dysco", dysco=CONFIGS["dynamic"], fuse=False, cuda_graphs=cuda_graphs)
    out["dynamic_from_prefill"] = {"tokens": resumed.generate_from(state, max_new_tokens=NEW_TOKENS).token_ids}
    return out


def shard_checks(model, tokenizer) -> dict:
    """What this rank holds, the gather on a known pattern, and the refusals."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from decoder.tensor_parallel import gather_captured, head_shard

    attachment = _attachment(model)
    rank, world = dist.get_rank(), dist.get_world_size()
    shards = {layer: (s.first, s.count) for layer, s in attachment.shards.items()}
    # Each rank fills only the heads it holds (head h of layer l: the value 100 l + h everywhere).
    pattern = {}
    for layer, (first, count) in shards.items():
        values = torch.zeros(2, 4, 1, 5)
        for head in range(first, first + count):
            values[:, head] = 100 * layer + head
        pattern[layer] = values.to(model.device)
    gather_captured(pattern, attachment.group)
    # A q_proj of 3 heads of 4 cannot be split in two whole-head halves.
    mesh = init_device_mesh(model.device.type, (world,))
    odd = torch.nn.Module()
    odd.q_proj = torch.nn.Linear(8, 12, bias=False)
    odd.q_proj.weight = torch.nn.Parameter(distribute_tensor(torch.randn(12, 8), mesh, [Shard(0)]))
    try:
        head_shard(odd, n_heads=3, head_dim=4)
        split_error = None
    except ValueError as err:
        split_error = str(err)
    decoder = Decoder(model, tokenizer, "vanilla")
    try:
        decoder.generate([[1, 2, 3]], max_new_tokens=2, do_sample=True)
        sample_error = None
    except ValueError as err:
        sample_error = str(err)
    seeded = decoder.generate([[1, 2, 3]], max_new_tokens=4, do_sample=True, seed=3).token_ids
    fast = FastDecoder(model, tokenizer, "dysco", dysco=CONFIGS["dynamic"])
    fast_shards = {layer: (info.first, info.heads) for layer, info in fast.run.layers.items()}
    try:
        FastDecoder(model, tokenizer, "vanilla", fuse=True)
        fuse_error = None
    except ValueError as err:
        fuse_error = str(err)
    return {"rank": rank, "shards": shards, "gathered": {k: v.cpu() for k, v in pattern.items()},
            "split_error": split_error, "sample_error": sample_error, "seeded": seeded,
            "fast_shards": fast_shards, "fast_defaults": (fast.cuda_graphs, fast.run.fused is not None),
            "fuse_error": fuse_error}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM, AutoTokenizer, DistributedConfig

    results = {}
    for path in args.checkpoints:
        # The same as tp_plan="auto", the spelling transformers deprecates from 5.18.
        model = AutoModelForCausalLM.from_pretrained(path, distributed_config=DistributedConfig(tp_plan="auto"),
                                                     dtype=torch.float32)
        model.eval()
        tokenizer = AutoTokenizer.from_pretrained(path)
        results[path] = {**captures_and_ablation(model, tokenizer), "decodes": decodes(model, tokenizer),
                         "fast": fast_decodes(model, tokenizer), **shard_checks(model, tokenizer)}
        if model.device.type == "cuda":  # NCCL: the collectives captured in CUDA graphs too
            results[path]["fast_graphs"] = fast_decodes(model, tokenizer, cuda_graphs=True)
    import torch.distributed as dist

    torch.save(results, os.path.join(args.out, f"rank{dist.get_rank()}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
