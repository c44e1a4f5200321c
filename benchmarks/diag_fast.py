"""Where do the fast path and the exact path part? Per-step logits of several variants on the real shape.

    python benchmarks/diag_fast.py        # Qwen3-8B shape, random bf16 weights, 2K prompt, 4 new tokens
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.decode_speed import QWEN3_8B_HEADS, NoTokenizer, build_model  # noqa: E402


def main() -> None:
    from decoder.dysco import DyscoConfig
    from decoder.fast import FastDecoder
    from decoder.generation import Decoder

    model = build_model()
    tok = NoTokenizer()
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(10, 150000, (2048,), generator=gen)
    new = 4
    ids = prompt[None].cuda()
    model.set_attn_implementation("sdpa")
    hf = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                        do_sample=False, output_logits=True, return_dict_in_generate=True)
    ref = {"hf": (hf.sequences[0, 2048:].tolist(), torch.stack(hf.logits, 1)[0].float().cpu())}
    out = dict(ref)
    ex = Decoder(model, tok, "vanilla").generate([prompt.tolist()], max_new_tokens=new, return_logits=True, eos=[])
    out["exact"] = (ex.token_ids[0], ex.logits[0])
    for graphs in (True, False):
        for fuse in (True, False):
            fa = FastDecoder(model, tok, "vanilla", cuda_graphs=graphs, fuse=fuse).generate(
                [prompt.tolist()], max_new_tokens=new, return_logits=True, eos=[])
            out[f"fast g{int(graphs)} f{int(fuse)}"] = (fa.token_ids[0], fa.logits[0])
    base_tokens, base = out["hf"]
    for name, (tokens, logits) in out.items():
        n = min(len(logits), len(base))
        rel = [((logits[i] - base[i]).norm() / base[i].norm()).item() for i in range(n)]
        print(f"{name:16s} tokens {tokens} rel-to-hf per step {['%.1e' % r for r in rel]}")
    # The same for DySCO: exact vs fast variants, teacher-forced on the exact tokens is not needed: compare step 0.
    cfg = DyscoConfig(head_set=QWEN3_8B_HEADS)
    ex = Decoder(model, tok, "dysco", dysco=cfg).generate([prompt.tolist()], max_new_tokens=new, return_logits=True, eos=[])
    print("dysco exact", ex.token_ids[0])
    for graphs in (True, False):
        for fuse in (True, False):
            fa = FastDecoder(model, tok, "dysco", dysco=cfg, cuda_graphs=graphs, fuse=fuse).generate(
                [prompt.tolist()], max_new_tokens=new, return_logits=True, eos=[])
            rel = [((fa.logits[0][i] - ex.logits[0][i]).norm() / ex.logits[0][i].norm()).item() for i in range(new)]
            print(f"dysco fast g{int(graphs)} f{int(fuse)} tokens {fa.token_ids[0]} rel-to-exact {['%.1e' % r for r in rel]}")


if __name__ == "__main__":
    main()
