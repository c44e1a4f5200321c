"""Generation with DySCO, AttnTS or vanilla decoding, batched, on any attached transformers model.

    decoder = Decoder(model, tokenizer, method="dysco",
                      dysco=DyscoConfig(head_set=[(21, 31), (21, 18)], strength=2.0))
    result = decoder.generate([{"role": "user", "content": "Where does Alice live?"}], max_new_tokens=20)
    result.text, result.diagnostics[0][0]            # {"selected": 17, "mass": 0.97}

Prompts are chat conversations (one, or a list of them), strings, or token ids (one list or a list
of lists; a 1-D or 2-D tensor). A batch is left-padded; every row keeps its own importance and
selection, and a row that finishes (EOS, a stop string, `max_new_tokens`) leaves the batch.

The DySCO step order is in `decoder.dysco`'s docstring. Costs of this (CPU-first, exact) path: the
model's DynamicCache concatenates each layer's keys and values on every forward, as transformers'
own generate does; the probe concatenates too (up to the deepest layer of S) and its writes are
undone by restoring references, never by copying the cache. Finished rows are dropped from the cache
once (`batch_select_indices`). The bias is applied inside the attention call and the probe computes
probabilities only for the heads of S; importance, selection and bias stay on the input embedding's
device (captures and logits are brought there from the layers of a model spread with a device_map).
On a tensor-parallel model (transformers' `tp_plan`, one process per GPU) every rank runs the same
Decoder: the attention hook gathers the QR heads' captures across the ranks (`docs/scaling.md`).

For calibration, `prefill` runs the knob-independent part once and `generate_from` continues from it
without changing it (the cache is shared by reference; DynamicCache never writes in place):

    state = decoder.prefill(prompts, warmup=16)     # plain prefill up to the last 16 tokens
    for knobs in trials:
        Decoder(model, tokenizer, dysco=knobs).generate_from(state, max_new_tokens=64)

`model.generate(**inputs, custom_generate=decoder.custom_generate, max_new_tokens=32)` runs the same
decoding inside transformers' generate and returns its usual tensor of sequences.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from decoder import METHODS
from decoder.attention import AttentionPlan, attach, attention_group, attention_layers, use_plan
from decoder.loading import cache_kwarg, context_limit, eos_token_ids, model_identity, model_shape  # model facts: their one home
from decoder.dysco import (
    DyscoConfig, dysco_bias, evidence_mask, feed_schedule, select_positions, selection_diagnostics,
    update_importance, upweighted_positions,
)
from decoder.template import encode_chat, resolve_intervention_warmup
from registry import check_model

__all__ = [
    "METHODS", "Decoder", "Generation", "PrefillState", "Scores", "StepEvent", "left_pad",
]



@dataclass
class PrefillState:
    """A batch after its knob-independent prefill; `generate_from` continues from it without changing it."""

    cache: Any  # transformers DynamicCache holding the first `prefilled` columns
    input_ids: torch.Tensor  # [batch, prompt_len] left-padded
    real: torch.Tensor  # bool [batch, prompt_len]: True on real tokens
    template: torch.Tensor  # bool [batch, prompt_len]: True on chat-template tokens
    prompt_ids: list[list[int]]  # unpadded prompts
    prefilled: int  # columns already in the cache
    temperature: float  # attention temperature the prefill ran with (AttnTS), 1.0 otherwise
    last_logits: torch.Tensor | None = None  # [batch, vocab] when the whole prompt is prefilled


@dataclass
class StepEvent:
    """What a callback sees after each generation step."""

    step: int  # 0 for the first generated token
    rows: list[int]  # batch rows (as given) that produced a token at this step
    tokens: list[int]  # their new tokens, aligned with `rows`
    diagnostics: list[dict] | None  # per row {"selected": n, "mass": m, evidence_* with evidence} for DySCO steps


@dataclass
class Generation:
    """The result of `Decoder.generate`: one entry per prompt, in the order given."""

    texts: list[str]
    token_ids: list[list[int]]  # generated ids (EOS included when it ended the row)
    prompt_ids: list[list[int]]
    finish_reasons: list[str]  # "eos", "stop_string" or "length"
    diagnostics: list[list[dict]] | None = None  # per row, per DySCO step: `decoder.dysco.selection_diagnostics`
    logits: list[torch.Tensor] | None = None  # per row float32 [n_generated, vocab]
    timings: dict[str, float] | None = None  # the fast path's: prepare_s, prefill_s, ttft_s, decode_s_per_token

    @property
    def text(self) -> str:
        """The first (often only) row's text."""
        return self.texts[0]


@dataclass
class Scores:
    """The result of `Decoder.score`: one entry per (prompt, continuation), in the order given."""

    logprobs: list[torch.Tensor]  # per row float32 [len(continuation)]: log p(token | everything before it)
    hits: list[torch.Tensor]  # per row bool [len(continuation)]: the token is the argmax there
    last: list[torch.Tensor] | None = None  # with return_last: per row float32 [vocab], the log-softmax at its last token

    @property
    def totals(self) -> list[float]:
        """Each continuation's summed log-probability."""
        return [float(row.sum()) for row in self.logprobs]

    @property
    def greedy(self) -> list[bool]:
        """Per row: greedy decoding would have produced exactly this continuation."""
        return [bool(row.all()) for row in self.hits]


def left_pad(ids: list[list[int]], masks: list[list[bool]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded batch: token ids [batch, width], real-token mask and chat-template mask (bool, same shape)."""
    width = max(len(row) for row in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    real = torch.zeros(len(ids), width, dtype=torch.bool)
    template = torch.zeros(len(ids), width, dtype=torch.bool)
    for i, (row, mask) in enumerate(zip(ids, masks)):
        input_ids[i, width - len(row):] = torch.tensor(row)
        real[i, width - len(row):] = True
        template[i, width - len(row):] = torch.tensor(mask, dtype=torch.bool)
    return input_ids, real, template


class Decoder:
    """Vanilla, AttnTS or DySCO decoding for one model (attached on construction).

    `temperature` is the AttnTS attention temperature (every attention logit divided by it, in prefill
    and decode); sampling temperature is an argument of `generate`.
    """

    def __init__(
        self,
        model,
        tokenizer,
        method: str = "dysco",
        dysco: DyscoConfig | None = None,
        temperature: float = 1.0,
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"unknown decoding method {method!r}; choose one of {', '.join(METHODS)}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature <= 0:
            raise ValueError(f"attention temperature must be a finite number > 0, got {temperature!r}")
        if method != "attnts" and temperature != 1.0:
            raise ValueError(f"temperature={temperature} is the AttnTS attention temperature; use method='attnts' for it")
        if method == "dysco":
            if dysco is None:
                raise ValueError("method='dysco' needs a DyscoConfig (its head set at least), e.g. from a registry profile")
            if not isinstance(dysco, DyscoConfig):
                raise TypeError(f"dysco must be a DyscoConfig, got {type(dysco).__name__}")
        attach(model)
        if method == "dysco":
            layers, heads = model_shape(model)
            try:
                dysco.check_model(layers, heads, attention_layers(model))
            except ValueError as err:
                raise ValueError(f"{type(model).__name__}: {err}") from None
        self.model = model
        self.tokenizer = tokenizer
        self.method = method
        self.dysco = dysco if method == "dysco" else None
        # "auto" resolved once against this tokenizer: an integer from here on.
        self.intervention_warmup = resolve_intervention_warmup(dysco.intervention_warmup, tokenizer) if self.dysco else 0
        self.temperature = float(temperature)
        self.device = model.get_input_embeddings().weight.device
        # Sharded heads (transformers' tp_plan): each rank runs this decoder; the hook gathers the captures.
        self.tensor_parallel = attention_group(model) is not None
        self.pad_id = next(
            (i for i in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)) if i is not None), 0
        )

    @classmethod
    def from_profile(cls, model, tokenizer, profile, *, force: bool = False, name: str | None = None) -> Decoder:
        """A DySCO (or AttnTS, for an AttnTS profile) decoder from a registry profile, checked against the model."""
        identity = model_identity(model, name or getattr(model, "name_or_path", None) or "")
        check_model(profile, identity, force=force)
        knobs = profile.knobs
        if getattr(knobs, "attnts_temperature", None) is not None:
            return cls(model, tokenizer, method="attnts", temperature=knobs.attnts_temperature)
        return cls(model, tokenizer, method="dysco", dysco=DyscoConfig.from_profile(profile))

    # ------------------------------------------------------------------------------------------
    # Prompts
    # ------------------------------------------------------------------------------------------

    def encode(self, prompts, template_mask: Sequence[Sequence[bool]] | None = None) -> tuple[list[list[int]], list[list[bool]]]:
        """Token ids and chat-template masks of a batch of prompts (see the module docstring for forms)."""
        rows = _as_batch(prompts)
        ids, masks = [], []
        for i, prompt in enumerate(rows):
            if isinstance(prompt, str):
                if not prompt:
                    raise ValueError(f"prompt {i} is an empty string")
                row = list(self.tokenizer(prompt, add_special_tokens=True)["input_ids"])
                mask = [False] * len(row)
            elif prompt and isinstance(prompt[0], Mapping):
                row, mask = encode_chat(self.tokenizer, prompt)
            else:
                row = [int(t) for t in prompt]
                mask = [False] * len(row)
            if not row:
                raise ValueError(f"prompt {i} has no tokens")
            ids.append(row)
            masks.append(mask)
        if template_mask is not None:
            if len(template_mask) != len(ids):
                raise ValueError(f"template_mask has {len(template_mask)} rows for {len(ids)} prompts")
            for i, (row, mask) in enumerate(zip(ids, template_mask)):
                if len(mask) != len(row):
                    raise ValueError(f"template_mask row {i} has {len(mask)} entries for a prompt of {len(row)} tokens")
            masks = [[bool(x) for x in mask] for mask in template_mask]
        vocab = self.model.get_input_embeddings().weight.shape[0]
        for i, row in enumerate(ids):
            bad = [t for t in row if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"prompt {i} has token id {bad[0]} outside the vocabulary of {vocab}")
        return ids, masks

    # ------------------------------------------------------------------------------------------
    # Prefill
    # ------------------------------------------------------------------------------------------

    def warmup_columns(self, prompt_len: int) -> int:
        """Prompt columns fed one at a time: context plus intervention warmup (the last prompt token included)."""
        if self.dysco is None:
            return 0
        schedule = feed_schedule(prompt_len, self.dysco.context_warmup, self.intervention_warmup)
        return prompt_len - schedule.prefill_end

    def prefill(self, prompts, *, template_mask=None, warmup: int | None = None, max_new_tokens: int = 0) -> PrefillState:
        """Plain (or AttnTS) prefill of all but the last `warmup` prompt columns (default: this decoder's warmup)."""
        from transformers import DynamicCache

        ids, masks = self.encode(prompts, template_mask)
        width = max(len(row) for row in ids)
        limit = context_limit(self.model.config)
        if limit is not None:
            longest = max(range(len(ids)), key=lambda i: len(ids[i]))
            if width > limit:
                raise ValueError(f"prompt {longest} has {width} tokens, longer than the model's context of {limit} tokens")
            if width + max_new_tokens > limit:
                raise ValueError(
                    f"prompt {longest} has {width} tokens; with max_new_tokens={max_new_tokens} it would exceed the "
                    f"model's context of {limit} tokens"
                )
        input_ids, real, template = (x.to(self.device) for x in left_pad(ids, masks, self.pad_id))
        warmup = self.warmup_columns(width) if warmup is None else min(int(warmup), width)
        if warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {warmup}")
        cache = DynamicCache(config=self.model.config)
        state = PrefillState(cache, input_ids, real, template, ids, prefilled=0, temperature=self.temperature)
        if width - warmup > 0:
            state.last_logits = self._forward(state, cache, 0, width - warmup, plan=self._plain_plan())
            state.prefilled = width - warmup
        if state.prefilled < width:
            state.last_logits = None
        return state

    def _plain_plan(self) -> AttentionPlan | None:
        return AttentionPlan(temperature=self.temperature) if self.temperature != 1.0 else None

    def _forward(self, state, cache, start: int, end: int, plan: AttentionPlan | None, *, ids=None, real=None, frozen=False):
        """Run columns [start, end) through the model; returns the last column's logits [batch, vocab] (float32)."""
        ids = state.input_ids if ids is None else ids
        real = state.real if real is None else real
        attention_mask = real[:, :end].long()
        position_ids = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)[:, start:end]
        kwargs = dict(
            input_ids=ids[:, start:end], attention_mask=attention_mask, position_ids=position_ids,
            use_cache=True, logits_to_keep=1,
        )
        kwargs[cache_kwarg(self.model)] = cache
        # Logits come back to the input device: with a device_map the head may sit on another one.
        with torch.no_grad():
            if plan is None:
                return self.model(**kwargs).logits[:, -1].float().to(self.device)
            with use_plan(self.model, plan, frozen_cache=cache if frozen else None):
                output = self.model(**kwargs)
                return output.logits[:, -1].float().to(self.device)
        return None  # a stopped probe forward

    # ------------------------------------------------------------------------------------------
    # Generation
    # ------------------------------------------------------------------------------------------

    def generate(
        self,
        prompts,
        *,
        max_new_tokens: int = 64,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop_strings: Sequence[str] | str | None = None,
        eos: int | Sequence[int] | None = None,
        callback: Callable[[StepEvent], None] | None = None,
        streamer=None,
        return_diagnostics: bool = False,
        return_logits: bool = False,
        template_mask: Sequence[Sequence[bool]] | None = None,
        evidence: Sequence[Sequence[int]] | None = None,
    ) -> Generation:
        """Generate for a batch of prompts; `temperature`/`top_p` here are *sampling* knobs (with `do_sample`).

        `evidence` (per prompt, the token positions that hold the answer) adds the selection recall
        to each DySCO step's diagnostics (`return_diagnostics`).
        """
        _check_positive_int(max_new_tokens, "max_new_tokens")
        state = self.prefill(prompts, template_mask=template_mask, max_new_tokens=max_new_tokens)
        return self.generate_from(
            state, max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_p=top_p,
            seed=seed, stop_strings=stop_strings, eos=eos, callback=callback, streamer=streamer,
            return_diagnostics=return_diagnostics, return_logits=return_logits, evidence=evidence,
        )

    def generate_from(
        self,
        state: PrefillState,
        *,
        max_new_tokens: int = 64,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop_strings: Sequence[str] | str | None = None,
        eos: int | Sequence[int] | None = None,
        callback: Callable[[StepEvent], None] | None = None,
        streamer=None,
        return_diagnostics: bool = False,
        return_logits: bool = False,
        evidence: Sequence[Sequence[int]] | None = None,
    ) -> Generation:
        """Continue a `prefill` state (left unchanged) with this decoder's method and knobs."""
        _check_positive_int(max_new_tokens, "max_new_tokens")
        if do_sample:
            if self.tensor_parallel and seed is None:
                raise ValueError(
                    "sampling on a tensor-parallel model needs a seed (the same on every rank), so that every rank "
                    "draws the same token; pass seed=..., or decode greedily"
                )
            if not (isinstance(temperature, (int, float)) and temperature > 0):
                raise ValueError(f"sampling temperature must be > 0, got {temperature!r}")
            if not 0 < top_p <= 1:
                raise ValueError(f"sampling top_p must be in (0, 1], got {top_p!r}")
        if state.temperature != self.temperature:
            raise ValueError(
                f"this state was prefilled with attention temperature {state.temperature}, but this decoder uses "
                f"{self.temperature}; AttnTS changes the prefill, so prefill again with this decoder"
            )
        width = state.input_ids.shape[1]
        warmup = self.warmup_columns(width)
        if state.prefilled > width - warmup:
            raise ValueError(
                f"this state was prefilled up to column {state.prefilled} of {width}, past this decoder's warmup start "
                f"({width - warmup}); prefill with warmup >= {warmup}"
            )
        if isinstance(stop_strings, str):
            stop_strings = [stop_strings]
        stop_strings = [s for s in (stop_strings or []) if s]
        eos_ids = self._eos_ids(eos)
        generator = None
        if do_sample and seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(int(seed))

        run = _DecodeState(self, state, max_new_tokens, return_diagnostics, evidence)
        logits = run.start(warmup)
        batch = len(state.prompt_ids)
        generated: list[list[int]] = [[] for _ in range(batch)]
        row_logits: list[list[torch.Tensor]] = [[] for _ in range(batch)]
        diagnostics: list[list[dict]] = [[] for _ in range(batch)]
        reasons = ["length"] * batch
        if streamer is not None:
            if batch != 1:
                raise ValueError("a streamer follows one prompt; give a batch of one or use `callback`")
            streamer.put(torch.tensor([state.prompt_ids[0]]))

        for step in range(max_new_tokens):
            tokens = _next_tokens(logits, do_sample, temperature, top_p, generator)  # [active]
            token_list = tokens.tolist()
            rows = list(run.rows)
            step_diagnostics = run.last_diagnostics
            for i, (row, token) in enumerate(zip(rows, token_list)):
                generated[row].append(token)
                if return_logits:
                    row_logits[row].append(logits[i].cpu())
                if step_diagnostics is not None:
                    diagnostics[row].append(step_diagnostics[i])
            if callback is not None:
                callback(StepEvent(step, rows, token_list, step_diagnostics))
            if streamer is not None:
                streamer.put(torch.tensor(token_list))
            finished = []
            for i, (row, token) in enumerate(zip(rows, token_list)):
                if token in eos_ids:
                    reasons[row] = "eos"
                elif stop_strings and any(s in self._decode(generated[row]) for s in stop_strings):
                    reasons[row] = "stop_string"
                else:
                    continue
                finished.append(i)
            if len(finished) == len(rows) or step == max_new_tokens - 1:
                break
            if finished:
                run.drop(finished)
            logits = run.step(tokens if not finished else tokens[[i for i in range(len(rows)) if i not in finished]])
        if streamer is not None:
            streamer.end()

        texts = []
        for row, ids in enumerate(generated):
            visible = ids[:-1] if reasons[row] == "eos" else ids
            text = self._decode(visible)
            if reasons[row] == "stop_string":
                text = text[: min(text.find(s) for s in stop_strings if s in text)]
            texts.append(text)
        return Generation(
            texts=texts,
            token_ids=generated,
            prompt_ids=[list(p) for p in state.prompt_ids],
            finish_reasons=reasons,
            diagnostics=diagnostics if return_diagnostics and self.method == "dysco" else None,
            logits=[torch.stack(x) for x in row_logits] if return_logits else None,
        )

    def score(self, prompts, continuations: Sequence[Sequence[int]], *, template_mask=None, return_last: bool = False) -> Scores:
        """Log-probabilities of given continuations (token ids), teacher-forced through this decoder's own steps.

        The prompt runs exactly as in `generate` (for DySCO its feed schedule: prefill, importance-only
        steps, DySCO steps on the generation prompt); then each continuation token but the last is fed
        as `generate` feeds a sampled token (for DySCO one full step: probe, importance, select, biased
        pass). So a continuation scores what this decoder gave it when it generated it. `return_last`
        keeps each row's whole log-softmax at its last token (to score other last tokens without a rerun).
        """
        rows = [[int(t) for t in row] for row in continuations]
        if len(rows) != len(_as_batch(prompts)):
            raise ValueError(f"{len(rows)} continuations for {len(_as_batch(prompts))} prompts")
        if not all(rows):
            raise ValueError(f"continuation {next(i for i, row in enumerate(rows) if not row)} is empty")
        longest = max(len(row) for row in rows)
        # Only the tokens before each continuation's last one are fed: longest - 1 columns past the prompt.
        state = self.prefill(prompts, template_mask=template_mask, max_new_tokens=longest - 1)
        run = _DecodeState(self, state, longest - 1, diagnostics=False)
        logits = run.start(self.warmup_columns(state.input_ids.shape[1]))
        logprobs: list[list[torch.Tensor]] = [[] for _ in rows]
        hits: list[list[bool]] = [[] for _ in rows]
        last: list[torch.Tensor | None] = [None] * len(rows)
        for j in range(longest):
            active = list(run.rows)
            tokens = torch.tensor([rows[r][j] for r in active], device=logits.device)
            log_softmax = torch.log_softmax(logits, dim=-1)
            picked = log_softmax.gather(-1, tokens[:, None])[:, 0].cpu()
            argmax = (logits.argmax(dim=-1) == tokens).tolist()
            finished = [i for i, r in enumerate(active) if len(rows[r]) == j + 1]
            for i, r in enumerate(active):
                logprobs[r].append(picked[i])
                hits[r].append(argmax[i])
            if return_last:
                for i in finished:
                    last[active[i]] = log_softmax[i].cpu()
            if len(finished) == len(active):
                break
            if finished:
                run.drop(finished)
                tokens = tokens[[i for i in range(len(active)) if i not in finished]]
            logits = run.step(tokens)
        return Scores(logprobs=[torch.stack(row) for row in logprobs], hits=[torch.tensor(row) for row in hits],
                      last=last if return_last else None)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _eos_ids(self, eos) -> set[int]:
        return eos_token_ids(self.model, self.tokenizer, eos)  # decoder.fast calls this too

    # ------------------------------------------------------------------------------------------
    # transformers' generate(custom_generate=...)
    # ------------------------------------------------------------------------------------------

    def custom_generate(
        self,
        model,
        input_ids: torch.Tensor,
        logits_processor=None,
        stopping_criteria=None,
        generation_config=None,
        template_mask: Sequence[Sequence[bool]] | None = None,
        **model_kwargs,
    ) -> torch.Tensor:
        """Entry point for `model.generate(..., custom_generate=decoder.custom_generate)`: returns sequences."""
        if model is not self.model:
            raise ValueError("this decoder was built for another model; build a Decoder for the model you call generate on")
        attention_mask = model_kwargs.get("attention_mask")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        prompts = [row[mask.bool()].tolist() for row, mask in zip(input_ids, attention_mask)]
        config = generation_config
        max_new = config.max_new_tokens if config.max_new_tokens is not None else config.max_length - input_ids.shape[1]
        result = self.generate(
            prompts,
            max_new_tokens=max_new,
            do_sample=bool(config.do_sample),
            temperature=config.temperature if config.do_sample and config.temperature else 1.0,
            top_p=config.top_p if config.do_sample and config.top_p else 1.0,
            eos=config.eos_token_id,
            stop_strings=config.stop_strings,
            streamer=model_kwargs.get("streamer"),
            template_mask=template_mask,
        )
        width = max(len(ids) for ids in result.token_ids)
        pad = config.pad_token_id if config.pad_token_id is not None else self.pad_id
        tail = torch.full((input_ids.shape[0], width), int(pad), dtype=input_ids.dtype, device=input_ids.device)
        for i, ids in enumerate(result.token_ids):
            tail[i, : len(ids)] = torch.tensor(ids, dtype=input_ids.dtype)
        return torch.cat([input_ids, tail], dim=1)


class _DecodeState:
    """The mutable state of one pass over a prefilled batch (`generate_from`, `score`): active rows, cache, DySCO state."""

    def __init__(
        self, decoder: Decoder, state: PrefillState, max_new_tokens: int, diagnostics: bool,
        evidence: Sequence[Sequence[int]] | None = None,
    ) -> None:
        self.decoder = decoder
        self.state = state
        self.dysco = decoder.dysco
        self.diagnostics = diagnostics
        self.cache = _share_cache(state.cache)
        batch, width = state.input_ids.shape
        total = width + max_new_tokens
        device = state.input_ids.device
        # Buffers over every column this run can reach; column t holds the token fed at step t.
        self.ids = torch.full((batch, total), decoder.pad_id, dtype=torch.long, device=device)
        self.ids[:, :width] = state.input_ids
        self.real = torch.zeros(batch, total, dtype=torch.bool, device=device)
        self.real[:, :width] = state.real
        self.template = torch.zeros(batch, total, dtype=torch.bool, device=device)
        self.template[:, :width] = state.template
        self.evidence = None  # bool [batch, total]: the answer's positions (diagnostics only)
        if evidence is not None:
            self.evidence = evidence_mask(evidence, [len(p) for p in state.prompt_ids], width, total, device)
        self.rows = list(range(batch))
        self.column = state.prefilled  # next column to feed
        self.importance: torch.Tensor | None = None  # float32 [active, column]
        self.static_set: torch.Tensor | None = None  # bool [active, total] (static selection)
        self.last_diagnostics: list[dict] | None = None
        if self.dysco is not None:
            self.heads = {
                layer: torch.tensor(heads, dtype=torch.long, device=device) for layer, heads in self.dysco.heads_by_layer.items()
            }
            captured = [(layer, head) for layer, heads in self.dysco.heads_by_layer.items() for head in heads]
            self.head_order = torch.tensor([captured.index(pair) for pair in self.dysco.head_set], device=device)

    # -- feeding columns ------------------------------------------------------------------------

    def _plain(self, start: int, end: int, plan: AttentionPlan | None = None) -> torch.Tensor:
        plan = plan if plan is not None else self.decoder._plain_plan()
        return self.decoder._forward(self.state, self.cache, start, end, plan, ids=self.ids, real=self.real)

    def start(self, warmup: int) -> torch.Tensor:
        """Feed the prompt columns not yet in the cache; returns the logits of the first token."""
        width = self.state.input_ids.shape[1]
        if self.column == width:
            return self.state.last_logits
        logits = None
        if width - warmup > self.column:  # a chunk the state's prefill left over
            logits = self._plain(self.column, width - warmup)
            self.column = width - warmup
        if self.dysco is None:
            return logits
        schedule = feed_schedule(width, self.dysco.context_warmup, self.decoder.intervention_warmup)
        while self.column < schedule.intervene_from:  # plain passes that only read importance
            self._warmup_step()
        while self.column < width:  # the generation prompt: full DySCO steps, teacher-forced
            logits = self._dysco_step()
        return logits

    def _warmup_step(self) -> None:
        t = self.column
        plan = AttentionPlan(capture_heads=self.heads, kv_length=t + 1)
        self.decoder._forward(self.state, self.cache, t, t + 1, plan, ids=self.ids, real=self.real)
        updated = update_importance(self.importance, self._current(plan), self.dysco.decay)
        past = torch.nn.functional.pad(self.importance, (0, 1)) if self.importance is not None else torch.zeros_like(updated)
        self.importance = torch.where(self.real[:, t : t + 1], updated, past)  # padding columns leave it as it was
        self.column += 1

    def _current(self, plan: AttentionPlan) -> torch.Tensor:
        """`cur`: mean over the heads of S of the current query's probabilities, [active, column + 1]."""
        # Each capture sits on its layer's device (device_map); the importance lives on the input device.
        device = self.decoder.device
        by_layer = torch.cat([plan.captured[layer][:, :, -1, :].to(device) for layer in self.heads], dim=1)  # [active, |S|, n]
        # Averaged in the head set's own order, as the published code stacks them: same float sums.
        return by_layer[:, self.head_order].mean(dim=1)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append the sampled tokens and produce the next logits."""
        t = self.column
        self.ids[:, t] = tokens
        self.real[:, t] = True
        if self.dysco is None:
            logits = self._plain(t, t + 1)
            self.column += 1
            return logits
        return self._dysco_step()

    def _dysco_step(self) -> torch.Tensor:
        """One DySCO step for column `self.column`: probe, importance, select, full pass with the bias
        (lagged: select from the previous passes' importance, full pass, importance from that pass)."""
        dysco, t = self.dysco, self.column
        n = t + 1
        real, template = self.real[:, :n], self.template[:, :n]
        lagged = False  # this step's full pass updates the importance (lagged selection, rule 9 of decoder.dysco)
        if self.static_set is not None:  # static selection, after its first step
            up = self.static_set[:, :n].clone()
            up[:, -1] = True
        else:
            generating = t >= self.state.input_ids.shape[1]  # past the prompt: a generated token's step
            if self.importance is not None and (dysco.selection == "static" or (dysco.lagged and generating)):
                # Static selects once, lagged at every generated token's step, without a probe, from the
                # importance of the columns before t; the current column is up-weighted but not ranked.
                # Lagged probes on the prompt's DySCO steps: the first token is dynamic DySCO's.
                selected = select_positions(self.importance, dysco.top_p, dysco.top_k, valid=real[:, :t])
                selected = torch.nn.functional.pad(selected, (0, 1))
                lagged = dysco.lagged
            else:
                probe = AttentionPlan(capture_heads=self.heads, stop_after_layer=dysco.deepest_layer, kv_length=n)
                self.decoder._forward(self.state, self.cache, t, n, probe, ids=self.ids, real=self.real, frozen=True)
                self._absorb(self._current(probe), real[:, -1:])
                selected = select_positions(self.importance, dysco.top_p, dysco.top_k, valid=real)
            chosen = upweighted_positions(selected, template, real, hard=dysco.hard, current=False)
            if dysco.selection == "static":
                self.static_set = torch.nn.functional.pad(chosen, (0, self.real.shape[1] - n))
            up = chosen.clone()
            up[:, -1] = True
        bias = dysco_bias(up, dysco.strength)  # `up` already excludes padding (and template, when soft)
        if self.diagnostics:
            evidence = self.evidence[:, : self.importance.shape[1]] if self.evidence is not None else None
            self.last_diagnostics = selection_diagnostics(self.importance, up, evidence)
        plan = AttentionPlan(logit_bias=bias, kv_length=n)
        if lagged:
            plan.capture_heads, plan.capture_plain = self.heads, dysco.lagged_probs == "plain"
        logits = self.decoder._forward(self.state, self.cache, t, n, plan, ids=self.ids, real=self.real)
        if lagged:  # the importance the next step selects from
            self._absorb(self._current(plan), real[:, -1:])
        self.column += 1
        return logits

    def _absorb(self, current: torch.Tensor, real_now: torch.Tensor) -> None:
        """Fold the current column's head probabilities [batch, n] into the importance; a row whose
        column is padding (a prompt shorter than the teacher-forced span) keeps its importance."""
        updated = update_importance(self.importance, current, self.dysco.decay)
        past = torch.nn.functional.pad(self.importance, (0, 1)) if self.importance is not None else torch.zeros_like(updated)
        self.importance = torch.where(real_now, updated, past)

    def drop(self, finished: list[int]) -> None:
        """Remove finished rows (indices into the active rows) from the batch and the cache."""
        keep = [i for i in range(len(self.rows)) if i not in set(finished)]
        index = torch.tensor(keep, dtype=torch.long, device=self.ids.device)
        self.rows = [self.rows[i] for i in keep]
        self.ids, self.real, self.template = self.ids[index], self.real[index], self.template[index]
        self.cache.batch_select_indices(index)
        if self.importance is not None:
            self.importance = self.importance[index]
        if self.static_set is not None:
            self.static_set = self.static_set[index]
        if self.evidence is not None:
            self.evidence = self.evidence[index]


def _share_cache(cache):
    """A cache that shares `cache`'s tensors: DynamicCache rebinds on update, so the original stays as it is."""
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    clone = copy.copy(cache)
    clone.layers = []
    for layer in cache.layers:
        if type(layer) not in (DynamicLayer, DynamicSlidingWindowLayer):
            raise TypeError(f"cannot share a {type(layer).__name__} cache layer; prefill states use DynamicCache")
        clone.layers.append(copy.copy(layer))
    return clone


def _next_tokens(logits: torch.Tensor, do_sample: bool, temperature: float, top_p: float, generator) -> torch.Tensor:
    """Greedy or temperature/nucleus sampling over `logits` [batch, vocab]."""
    if not do_sample:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        ordered, order = probs.sort(dim=-1, descending=True)
        outside = ordered.cumsum(-1) - ordered >= top_p
        ordered = ordered.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, ordered)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _check_positive_int(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _as_batch(prompts) -> list:
    """Normalise the accepted prompt forms to a list of rows (each a str, a conversation or a list of ids)."""
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() == 1:
            prompts = [prompts.tolist()]
        elif prompts.dim() == 2:
            prompts = prompts.tolist()
        else:
            raise ValueError(f"token-id tensors must be 1-D or 2-D, got shape {tuple(prompts.shape)}")
        if not prompts:
            raise ValueError("the batch of prompts is empty")
        return prompts
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, Mapping):
        raise ValueError("a single message must be inside a list: [{'role': 'user', 'content': ...}]")
    if not isinstance(prompts, Sequence):
        raise ValueError(f"prompts must be a string, chat messages or token ids, got {type(prompts).__name__}")
    if len(prompts) == 0:
        raise ValueError("the batch of prompts is empty")
    first = prompts[0]
    if isinstance(first, Mapping):  # one conversation
        return [list(prompts)]
    if isinstance(first, int) or (hasattr(first, "__index__") and not isinstance(first, (str, Sequence))):
        return [list(prompts)]  # one list of token ids
    rows = []
    for i, row in enumerate(prompts):
        if isinstance(row, torch.Tensor):
            row = row.tolist()
        if isinstance(row, str):
            rows.append(row)
        elif isinstance(row, Sequence):
            if len(row) == 0:
                raise ValueError(f"prompt {i} is empty")
            rows.append(list(row))
        else:
            raise ValueError(f"prompt {i} must be a string, chat messages or token ids, got {type(row).__name__}")
    return rows
