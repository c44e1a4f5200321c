"""Typed contracts between the decoders and the code that drives them (no torch: checked with isinstance).

`ResumableDecoder` is what a decoder offers when a prompt's plain prefill can be computed once and
continued from by several methods or knob settings, and says how many prompt columns that prefill
must leave out for it (`warmup_columns`): `decoder.generation.Decoder` is one. `decoder.fast.FastDecoder`
continues prefills of its own static cache (calibration trials) but has no `warmup_columns`, so
`dysco eval` does not share a prefill between fast decoders.

    >>> from decoder.generation import Decoder
    >>> from decoder.tiny import tiny_model
    >>> model, tokenizer = tiny_model("llama")
    >>> isinstance(Decoder(model, tokenizer, "vanilla"), ResumableDecoder)
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:  # torch-heavy; only the annotations need them
    from decoder.generation import Generation, PrefillState

__all__ = ["ResumableDecoder"]


@runtime_checkable
class ResumableDecoder(Protocol):
    """A decoder that prefills a batch once (`prefill`) and decodes from that state (`generate_from`)."""

    method: str  # one of decoder.METHODS
    tokenizer: Any

    def warmup_columns(self, prompt_len: int) -> int:
        """Prompt columns this decoder feeds one at a time, so a shared prefill must leave them out."""
        ...

    def prefill(
        self, prompts: Any, *, template_mask: Sequence[Sequence[bool]] | None = None, warmup: int | None = None,
        max_new_tokens: int = 0,
    ) -> PrefillState:
        """A plain prefill of all but the last `warmup` prompt columns, to continue from."""
        ...

    def generate_from(self, state: PrefillState, *, max_new_tokens: int = 64, **options: Any) -> Generation:
        """Decode from a `prefill` state without changing it (several decoders may continue from one)."""
        ...
