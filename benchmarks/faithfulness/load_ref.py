"""Load SmolLM2-135M-Instruct (float32, CPU, eager) into the published RescaleLlamaForCausalLM (transformers 4.57)."""
import os
import torch
from transformers import LlamaConfig

CKPT = os.path.expanduser("~/.cache/dysco-toolkit/models/smollm2-135m/checkpoint")


def load_ref_model():
    from dysco.custom_modeling_llama import RescaleLlamaForCausalLM
    config = LlamaConfig.from_pretrained(CKPT)
    # The checkpoint was saved by transformers 5.x, which writes RoPE as `rope_parameters`;
    # 4.57 reads `rope_theta` (default 10000). Carry the real theta over.
    rp = getattr(config, "rope_parameters", None) or {}
    config.rope_theta = float(rp.get("rope_theta", 100000.0))
    config.rope_scaling = None
    model = RescaleLlamaForCausalLM.from_pretrained(
        CKPT, config=config, attn_implementation="eager", torch_dtype=torch.float32
    )
    model.eval()
    return model
