"""decoder: load models and generate with vanilla, AttnTS or DySCO decoding.

    from decoder import Decoder, DyscoConfig, load_model
    model, tokenizer = load_model("smollm2-135m")
    decoder = Decoder(model, tokenizer, dysco=DyscoConfig(head_set=[(8, 2), (15, 4)]))
    decoder.generate("The secret number is 7319. The secret number is", max_new_tokens=8).text

Modules: `attention` (the attention hook and plans), `dysco` (knobs, importance, selection, bias),
`template` (chat-template positions), `generation` (the Decoder), `loading`/`catalogue` (models).
Names below are imported on first use, so `import decoder` stays cheap (no torch).
"""

from __future__ import annotations

import importlib

METHODS = ("vanilla", "attnts", "dysco")  # every decoding method (decoders, reports, CLIs), in report order
_EXPORTS = {
    "AttentionPlan": "decoder.attention",
    "UnsupportedModelError": "decoder.attention",
    "attach": "decoder.attention",
    "use_plan": "decoder.attention",
    "DyscoConfig": "decoder.dysco",
    "Decoder": "decoder.generation",
    "Generation": "decoder.generation",
    "PrefillState": "decoder.generation",
    "ResumableDecoder": "decoder.protocols",
    "encode_chat": "decoder.template",
    "load_model": "decoder.loading",
    "model_identity": "decoder.loading",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'decoder' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
