"""DySCO as a model type of EleutherAI's lm-evaluation-harness (`lm_eval`): `--model dysco`.

    python -m decoder.lm_eval_model run --model dysco \\
        --model_args pretrained=smollm2-135m,profile=smollm2-135m@1,method=dysco \\
        --tasks niah_single_1 --apply_chat_template --batch_size 4 --output_path results/
    dysco-lm-eval run --model dysco ...          # the same, as a console script

    import lm_eval
    import decoder.lm_eval_model                # importing it registers "dysco"
    lm_eval.simple_evaluate(model="dysco", model_args="pretrained=smollm2-135m,method=vanilla", tasks=[...])

Why a wrapper instead of plain `lm_eval --model dysco`: lm_eval 0.4.13 (the version pinned in the
`lm-eval` extra) resolves `--model` in its own registry only, which holds its built-in models and
whatever was registered (`lm_eval.api.registry.register_model`) by a module imported before; it reads
no entry points for models. `python -m decoder.lm_eval_model` / `dysco-lm-eval` import this module
(which registers `dysco`) and then run lm_eval's own CLI, unchanged, on the same arguments.

model_args (`--model_args k=v,k=v`):
    pretrained          catalogue name (`smollm2-135m`), local folder or .gguf, or Hub id (`decoder.loading`)
    method              dysco (default) | vanilla | attnts
    profile             registry profile `name@version|tag|latest`; default for dysco: `<pretrained>@latest`
    heads               DySCO head set instead of a profile, `layer:head` pairs joined by `;` (`,` splits
                        model_args): heads=17:3;18:6
    strength, top_p, top_k, decay, context_warmup, selection, intervention_warmup
                        DySCO knob overrides (`DyscoConfig`'s fields and checks)
    attnts_temperature  AttnTS attention temperature (method=attnts; else the profile's)
    fast                True: generate on the fast path (`decoder.fast.FastDecoder`, greedy only)
    device, dtype       cpu | cuda | cuda:N (default cuda when there is one); float32 | bfloat16 | float16 | auto
    batch_size          an integer (else the harness's --batch_size; device too: model_args win)
    registry, force, trust_remote_code    registry folder; use a profile made for another model; run remote code
    and HFLM's max_length, truncation, add_bos_token, prefix_token_id, think_end_token, enable_thinking,
    chat_template_args, softmax_dtype, max_batch_size.

What is scaled when. Tokenisation, truncation, batching, chat templates, stop-sequence handling and the
results are the harness's own (this class is its `hf` model, HFLM, with the methods that run the model
replaced); only the forward passes change:

- `generate_until`: the harness's batch of token ids goes to `Decoder.generate` (`FastDecoder` with
  fast=True) with its `until` strings and `max_gen_toks`; so it decodes exactly as `dysco generate`:
  DySCO's feed schedule on the prompt (plain prefill; the last `context_warmup - 1` tokens before the
  generation prompt fed one at a time, importance only; the last `intervention_warmup + 1` prompt
  tokens and every generated token with a full DySCO step: probe the QR heads, update the importance,
  select, then `log(strength)` added to the attention logits of the selected positions in every head
  of every layer). With `--apply_chat_template` the chat-template positions are found as
  `decoder.template` finds them and are never up-weighted.
- `loglikelihood` (and `loglikelihood_rolling`, whose windows the harness scores the same way), for
  method=dysco: the context is the prompt and runs the same feed schedule; each continuation token but
  the last is then teacher-forced with one full DySCO step (`Decoder.score`): the log-probability of continuation
  token j comes from the DySCO step that fed token j-1 (token 0's from the context's last step), with
  the bias chosen by the importance up to and including that step. So a continuation scores what
  DySCO gave it while generating it, and `is_greedy` says whether DySCO's greedy decoding produces it.
  The context's template positions are excluded as in generation; continuation positions are content.
- method=vanilla scores with the harness's own batched forward; method=attnts with the same forward
  under the AttnTS temperature (every attention logit divided by it, as in the decoder's prefill and
  steps). For those methods the attention of a position does not depend on the step, so this equals
  teacher-forcing through the decoder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import sys
from collections.abc import Sequence
from typing import Any

from decoder.threads import quiet_idle_threads

quiet_idle_threads()  # before lm_eval imports torch

try:
    from lm_eval.models.huggingface import HFLM
except ImportError as err:  # the harness is an optional extra
    raise ImportError(
        f"decoder.lm_eval_model needs lm-evaluation-harness ({err}); install it with "
        "pip install 'dysco-toolkit[lm-eval]' (lm_eval==0.4.13)"
    ) from err

import numpy as np
import torch

from decoder import loading  # `loading.load_model`, looked up at call time: tests replace it
from decoder.attention import AttentionPlan, use_plan
from decoder.catalogue import DEFAULT_MODEL
from decoder.dysco import DyscoConfig
from decoder.generate_cli import parse_heads
from decoder.generation import METHODS, Decoder
from decoder.loading import DTYPE_NAMES, check_device
from decoder.template import encode_chat
from registry import ProfileNotFound, Registry

__all__ = ["KNOBS", "DyscoLM", "main", "parse_model_heads"]

_MODULE = "decoder.lm_eval_model"
log = logging.getLogger(_MODULE)

# DySCO's knobs, by DyscoConfig's own field names (its checks validate them).
KNOBS = tuple(f.name for f in dataclasses.fields(DyscoConfig) if f.init and f.name != "head_set")
# HFLM options that still mean something with a model loaded here; passed through unchanged.
_HFLM_OPTIONS = (
    "max_length", "truncation", "add_bos_token", "prefix_token_id", "think_end_token", "enable_thinking",
    "chat_template_args", "softmax_dtype", "max_batch_size",
)
_OWN_ARGS = ("pretrained", "method", "profile", "heads", "fast", "device", "dtype", "batch_size",
             "attnts_temperature", "registry", "force", "trust_remote_code")
_HARNESS_DEFAULT_DEVICE = "cuda:0"  # lm_eval.config.evaluate_config.EvaluatorConfig.device
# Generation kwargs a task may set that the decoder honours (the harness adds until/max_gen_toks).
_GEN_KWARGS = ("do_sample", "temperature", "top_p")


class _ChatMasks:
    """Chat-template masks of the conversations the harness rendered, found again from token ids.

    The harness renders a chat to a string and tokenises it later; the template positions are taken
    from `decoder.template.encode_chat` of the same conversation when its ids are the rendering's ids.
    Keyed by a hash of the ids: also of the ids minus their last 1-2 tokens, because the harness moves
    a context's trailing whitespace (the generation prompt's newline) into the continuation. Only the
    template positions are kept (a few dozen per chat, however long the context).
    """

    TRIMS = (0, 1, 2)

    def __init__(self) -> None:
        self._positions: dict[bytes, np.ndarray] = {}  # key -> int32 template positions of the full rendering
        self.recorded = 0

    @staticmethod
    def _key(ids: Sequence[int]) -> bytes:
        return hashlib.blake2b(np.asarray(ids, dtype=np.int64).tobytes(), digest_size=16).digest()

    def add(self, tokenizer, messages: list[dict], text: str, add_generation_prompt: bool) -> bool:
        """Remember the template positions of `messages` rendered as `text`; False when they cannot be matched."""
        try:
            ids, mask = encode_chat(tokenizer, messages, add_generation_prompt=add_generation_prompt)
        except Exception:  # noqa: BLE001 - a chat our renderer refuses only loses its template mask
            return False
        if ids != list(tokenizer(text, add_special_tokens=False)["input_ids"]):
            return False  # the harness rendered it differently (continue_final_message, chat_template_args)
        positions = np.flatnonzero(np.asarray(mask, dtype=bool)).astype(np.int32)
        for trim in self.TRIMS:
            if len(ids) - trim >= 1:
                self._positions[self._key(ids[: len(ids) - trim])] = positions
        self.recorded += 1
        return True

    def find(self, ids: Sequence[int]) -> list[bool] | None:
        """The template mask of a context's ids (a leading special token the tokenizer added counts as template)."""
        if not self._positions:
            return None
        for offset in (0, 1):
            positions = self._positions.get(self._key(ids[offset:])) if len(ids) > offset else None
            if positions is not None:
                mask = [False] * len(ids)
                for p in positions[positions < len(ids) - offset].tolist():
                    mask[offset + p] = True
                mask[:offset] = [True] * offset
                return mask
        return None


class DyscoLM(HFLM):
    """lm_eval's `hf` model with generation and scoring through this toolkit's DySCO / AttnTS / vanilla decoder."""

    def __init__(
        self,
        pretrained: str = DEFAULT_MODEL,
        method: str = "dysco",
        profile: str | None = None,
        heads: str | None = None,
        fast: bool = False,
        device: str | None = None,
        dtype: str | None = None,
        batch_size: int | str = 1,
        attnts_temperature: float | None = None,
        registry: str | None = None,
        force: bool = False,
        trust_remote_code: bool = False,
        **kwargs: Any,
    ) -> None:

        # Every check that needs no model runs first: a typo must not cost a model load.
        knobs = {k: kwargs.pop(k) for k in KNOBS if k in kwargs}
        options = {k: kwargs.pop(k) for k in _HFLM_OPTIONS if k in kwargs}
        if kwargs:
            raise ValueError(
                f"dysco model_args: unknown argument(s) {', '.join(sorted(kwargs))}; accepted: "
                f"{', '.join(_OWN_ARGS + KNOBS + _HFLM_OPTIONS)}"
            )
        if not isinstance(pretrained, str) or not pretrained.strip():
            raise ValueError(f"dysco model_args: pretrained must be a catalogue name, folder or Hub id, got {pretrained!r}")
        if method not in METHODS:
            raise ValueError(f"dysco model_args: method={method!r} is not one of {', '.join(METHODS)}")
        for name, value in (("fast", fast), ("force", force), ("trust_remote_code", trust_remote_code)):
            if not isinstance(value, bool):
                raise ValueError(f"dysco model_args: {name} must be True or False, got {value!r}")
        batch_size = _batch_size(batch_size)
        if dtype is not None and dtype not in ("auto", *DTYPE_NAMES):
            raise ValueError(f"dysco model_args: dtype={dtype!r} is not one of auto, {', '.join(DTYPE_NAMES)}")
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        elif device == _HARNESS_DEFAULT_DEVICE and not torch.cuda.is_available():
            # lm_eval's CLI passes its default --device cuda:0 even when none was given; as its hf model does,
            # run on the CPU then (any other device that is not there is an error below).
            log.warning("dysco: device %s (lm_eval's default --device) but torch sees no CUDA device: using cpu", device)
            device = "cpu"
        try:
            check_device(str(device))
        except ValueError as err:
            raise ValueError(f"dysco model_args: {err}") from None
        head_set = parse_model_heads(heads) if heads is not None else None
        _check_method_args(method, profile, head_set, knobs, attnts_temperature)
        if knobs:
            try:  # DyscoConfig's own checks, on a placeholder head set: the values, before any load
                DyscoConfig(head_set=[(0, 0)], **knobs)
            except (TypeError, ValueError) as err:
                raise ValueError(f"dysco model_args: {err}") from None

        loaded, self._profile_used = _resolve_profile(pretrained, method, profile=profile, head_set=head_set,
                                                      attnts_temperature=attnts_temperature, registry=registry)

        model, tokenizer = loading.load_model(pretrained, dtype=dtype, device=str(device), trust_remote_code=trust_remote_code,
                                      progress=False)
        self._decoder = _build_decoder(model, tokenizer, pretrained, method, loaded=loaded, head_set=head_set, knobs=knobs,
                                       attnts_temperature=attnts_temperature, force=force)
        self._fast_requested = fast
        self._fast_decoder = None
        self._chats = _ChatMasks()
        self._unmatched_warned = False
        super().__init__(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=batch_size, **options)
        self.pretrained = pretrained  # HFLM keeps the model object here; the results file wants the spec

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> DyscoLM:
        """From `--model_args`; device, batch_size or max_batch_size given there win over the harness's flags."""
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any], additional_config: dict | None = None) -> DyscoLM:
        """From a dict of model_args: the harness's flags fill only what model_args leave out.

        lm_eval's CLI always passes --device (default cuda:0) and --batch_size (default 1) next to
        model_args, so without this `device=` or `batch_size=` in model_args were a duplicate-argument error.
        """
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

    # ------------------------------------------------------------------------------------------
    # What the harness asks for
    # ------------------------------------------------------------------------------------------

    @property
    def method(self) -> str:
        """The decoding method: dysco, vanilla or attnts."""
        return self._decoder.method

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """HFLM's rendering, remembering the conversation's template positions so DySCO never up-weights them."""
        text = super().apply_chat_template(chat_history, add_generation_prompt)
        if self.method == "dysco":
            self._chats.add(self.tokenizer, chat_history, text, add_generation_prompt)
        return text

    def _model_generate(self, context: torch.Tensor, max_length: int, stop: list[str], **generation_kwargs) -> torch.Tensor:
        """Generate through the decoder for HFLM.generate_until: [batch, context + new] token ids, pad after the end."""
        attention_mask = generation_kwargs.pop("attention_mask", None)
        unknown = sorted(set(generation_kwargs) - set(_GEN_KWARGS))
        if unknown:
            raise ValueError(
                f"dysco: generation kwargs {', '.join(unknown)} are not supported; the decoder takes "
                f"{', '.join(_GEN_KWARGS)}, until and max_gen_toks"
            )
        temperature = float(generation_kwargs.get("temperature") or 0.0)
        # Temperature 0 is greedy whatever do_sample says (the harness's normalised kwargs mean it so).
        do_sample = bool(generation_kwargs.get("do_sample")) and temperature > 0
        top_p = float(generation_kwargs.get("top_p") or 1.0)
        if attention_mask is None:
            attention_mask = torch.ones_like(context)
        prompts = [row[mask.bool()].tolist() for row, mask in zip(context, attention_mask)]
        masks = self._template_masks(prompts)
        max_new = int(max_length) - context.shape[1]
        if self._fast_requested:
            if do_sample:
                raise ValueError("dysco: fast=True decodes greedily; this task samples (do_sample=True): use fast=False")
            result = self._fast().generate(prompts, max_new_tokens=max_new, stop_strings=stop, template_mask=masks)
        else:
            result = self._decoder.generate(prompts, max_new_tokens=max_new, do_sample=do_sample, temperature=temperature or 1.0,
                                            top_p=top_p, stop_strings=stop, template_mask=masks)
        width = max(len(ids) for ids in result.token_ids)
        tail = torch.full((len(prompts), width), int(self.tokenizer.pad_token_id), dtype=context.dtype, device=context.device)
        for i, ids in enumerate(result.token_ids):
            tail[i, : len(ids)] = torch.tensor(ids, dtype=context.dtype)
        return torch.cat([context, tail], dim=1)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None) -> list[tuple[float, bool]]:
        """DySCO: every continuation teacher-forced through `Decoder.score`; other methods: HFLM's batched forward."""
        if self.method != "dysco":
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        from tqdm import tqdm

        size = int(override_bs or self.batch_size)
        # Requests sharing their context and all but their last token (a multiple-choice item's choices,
        # mostly) need one teacher-forced run: their last tokens are read off the same distribution.
        groups: dict[tuple[tuple[int, ...], tuple[int, ...]], list[int]] = {}
        for i, (_, context, continuation) in enumerate(requests):
            key = (tuple(self._fit_context(context, continuation)), tuple(continuation[:-1]))
            groups.setdefault(key, []).append(i)
        # Longest first, as HFLM: padding stays small within a batch and a too-long request fails first.
        keys = sorted(groups, key=lambda key: -(len(key[0]) + len(key[1])))
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0, desc="Scoring with DySCO (teacher-forced)")
        for start in range(0, len(keys), size):
            chunk = keys[start : start + size]
            contexts = [list(context) for context, _ in chunk]
            continuations = [list(key[1]) + [requests[groups[key][0]][2][-1]] for key in chunk]  # any member's last token
            scores = self._decoder.score(contexts, continuations, template_mask=self._template_masks(contexts),
                                         return_last=True)
            for key, logprobs, hits, last in zip(chunk, scores.logprobs, scores.hits, scores.last):
                before, greedy_before, best = float(logprobs[:-1].sum()), bool(hits[:-1].all()), int(last.argmax())
                for i in groups[key]:
                    token = int(requests[i][2][-1])
                    results[i] = (before + float(last[token]), greedy_before and best == token)
                    if requests[i][0] is not None:  # rolling windows carry no request string
                        self.cache_hook.add_partial("loglikelihood", requests[i][0], results[i])
                bar.update(len(groups[key]))
        bar.close()
        return results  # type: ignore[return-value]

    def _model_call(self, inps: torch.Tensor, attn_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> torch.Tensor:
        """HFLM's forward; under AttnTS with the attention temperature, as the decoder runs every forward."""
        if self.method != "attnts":
            return super()._model_call(inps, attn_mask, labels)

        with use_plan(self.model, AttentionPlan(temperature=self._decoder.temperature)):
            return super()._model_call(inps, attn_mask, labels)

    def get_model_info(self) -> dict:
        """What the results file records about the model: size, dtype, and the method with its knobs and profile."""
        info: dict[str, Any] = {
            "model_num_parameters": sum(p.numel() for p in self.model.parameters()),
            "model_dtype": str(self.model.dtype),
            "model_spec": self.pretrained,
            "dysco_method": self.method,
            "dysco_path": "fast" if self._fast_requested else "exact",
        }
        decoder = self._decoder
        if decoder.dysco is not None:
            config = decoder.dysco
            info["dysco_knobs"] = {
                "head_set": [list(pair) for pair in config.head_set],
                **{name: getattr(config, name) for name in KNOBS},
                "intervention_warmup_tokens": decoder.intervention_warmup,  # "auto" resolved for this tokenizer
            }
        if decoder.method == "attnts":
            info["attnts_temperature"] = decoder.temperature
        if self._profile_used is not None:
            info["dysco_profile"] = self._profile_used
        return info

    # ------------------------------------------------------------------------------------------
    # Helpers
    # ------------------------------------------------------------------------------------------

    def _fast(self):
        if self._fast_decoder is None:
            from decoder.fast import FastDecoder

            d = self._decoder
            self._fast_decoder = FastDecoder(d.model, d.tokenizer, d.method, dysco=d.dysco, temperature=d.temperature)
        return self._fast_decoder

    def _template_masks(self, prompts: list[list[int]]) -> list[list[bool]] | None:
        """Per prompt its chat-template mask (all False for a prompt the harness did not render from a chat)."""
        if self.method != "dysco":
            return None
        masks = []
        for ids in prompts:
            mask = self._chats.find(ids)
            if mask is None and self._chats.recorded and not self._unmatched_warned:
                # A chat prompt left-truncated, continued (gen_prefix) or read from the request cache.
                log.warning("dysco: a chat-templated prompt did not match a rendered conversation; its template "
                            "tokens are treated as content (they may be up-weighted)")
                self._unmatched_warned = True
            masks.append(mask if mask is not None else [False] * len(ids))
        return masks

    def _fit_context(self, context: Sequence[int], continuation: Sequence[int]) -> list[int]:
        """The context HFLM would keep: context + continuation left-truncated to max_length + 1 tokens."""
        keep = self.max_length + 1 - len(continuation)
        if keep < 1:
            raise ValueError(
                f"dysco: a continuation of {len(continuation)} tokens does not fit the model's max_length "
                f"{self.max_length} with at least one context token"
            )
        return list(context)[-keep:]


def parse_model_heads(text: str) -> list[tuple[int, int]]:
    """heads=17:3;18:6 (model_args split on commas, so pairs are joined by ';' or spaces) -> [(17, 3), (18, 6)]."""
    try:
        return parse_heads(str(text).replace(";", ",").replace(" ", ","))
    except ValueError as err:
        raise ValueError(f"dysco model_args: heads: {err} (join pairs with ';', e.g. heads=17:3;18:6)") from None


def _batch_size(value) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"dysco model_args: batch_size must be an integer >= 1, got {value!r} (auto is not supported: its probe "
            "batches of max_length tokens say nothing about DySCO's per-step memory)"
        )
    return value


def _check_method_args(method: str, profile, head_set, knobs: dict, attnts_temperature) -> None:
    """Refuse settings the chosen method would silently ignore."""
    if profile is not None and head_set is not None:
        raise ValueError("dysco model_args: give profile or heads, not both")
    if method == "vanilla":
        given = [k for k, v in (("profile", profile), ("heads", head_set), ("attnts_temperature", attnts_temperature))
                 if v is not None] + sorted(knobs)
        if given:
            raise ValueError(f"dysco model_args: method=vanilla takes no {', '.join(given)} (they set DySCO or AttnTS)")
    elif method == "attnts":
        given = (["heads"] if head_set is not None else []) + sorted(knobs)
        if given:
            raise ValueError(f"dysco model_args: method=attnts takes no {', '.join(given)} (DySCO settings); "
                             "it takes attnts_temperature or an AttnTS profile")
    elif attnts_temperature is not None:
        raise ValueError("dysco model_args: attnts_temperature is for method=attnts")


def _resolve_profile(name: str, method: str, *, profile, head_set, attnts_temperature, registry) -> tuple[Any, dict | None]:
    """The registry profile a run needs (None when heads, a temperature or method=vanilla say everything) and its
    resolved reference and content hash; looked up before the model loads."""
    if method == "vanilla" or head_set is not None or (method == "attnts" and attnts_temperature is not None and profile is None):
        return None, None

    store = Registry(registry)
    ref = profile or f"{name}@latest"
    try:
        resolved, version = store.resolve(ref)
        loaded = store.load(f"{resolved}@{version}")
    except ProfileNotFound as err:
        if profile is not None:
            raise ValueError(f"dysco model_args: profile {ref!r} not found in the registry {store.root}: {err}") from None
        needs = "a head set" if method == "dysco" else "an attention temperature"
        raise ValueError(
            f"dysco model_args: method={method} needs {needs} and the registry ({store.root}) has no profile for "
            f"{name!r}; give profile=NAME@VERSION, "
            + ("heads=L:H;L:H (or run `headfinder detect --register`)" if method == "dysco" else "attnts_temperature=T")
        ) from None
    used = {"ref": f"{resolved}@{version}", "content_hash": loaded.content_hash()}
    if method == "attnts" and attnts_temperature is None and loaded.knobs.attnts_temperature is None:
        raise ValueError(f"dysco model_args: profile {used['ref']} has no AttnTS temperature; give attnts_temperature=T")
    if method == "dysco" and loaded.knobs.attnts_temperature is not None:
        raise ValueError(f"dysco model_args: profile {used['ref']} is an AttnTS profile (no head set); use method=attnts")
    return loaded, used


def _build_decoder(model, tokenizer, name: str, method: str, *, loaded, head_set, knobs, attnts_temperature,
                   force) -> Decoder:
    """The Decoder `dysco generate` would build from the same settings (profile checked against the model)."""
    if method == "vanilla":
        return Decoder(model, tokenizer, method="vanilla")
    if method == "attnts":
        temperature = attnts_temperature if attnts_temperature is not None else loaded.knobs.attnts_temperature
        return Decoder(model, tokenizer, method="attnts", temperature=float(temperature))
    if head_set is not None:
        return Decoder(model, tokenizer, method="dysco", dysco=DyscoConfig(head_set=head_set, **knobs))
    decoder = Decoder.from_profile(model, tokenizer, loaded, force=force, name=name)
    if knobs:
        decoder = Decoder(model, tokenizer, method="dysco", dysco=decoder.dysco.replace(**knobs))
    return decoder


def main(argv: list[str] | None = None) -> None:
    """lm_eval's own CLI (`run`, `ls`, `validate`) with the `dysco` model registered: `dysco-lm-eval run --model dysco ...`."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    # Run as a script this file is `__main__`; the importable module is the one that registers `dysco`.
    import importlib

    importlib.import_module(_MODULE).main()
else:
    from lm_eval.api.registry import register_model

    register_model("dysco")(DyscoLM)
