"""`dysco generate`: decode one prompt with DySCO, AttnTS or vanilla decoding.

    dysco generate --model smollm2-135m --heads 8:2,15:4 --strength 2 --prompt "Where does Alice live?"
    dysco generate --profile smollm2-135m@latest --prompt-file question.txt --json
    echo "Hello" | dysco generate --method vanilla

DySCO's head set comes from `--heads` or a registry profile (`--profile REF`; without either, the
registry's profile named after the model is tried). Knob flags override the profile's knobs. A
prompt is sent as one user message through the model's chat template when it has one (`--raw`
sends the text as it is).
"""

from __future__ import annotations

import argparse
import json
import sys

from decoder import loading  # `loading.load_model`, looked up at call time: tests replace it
from decoder.catalogue import DEFAULT_MODEL, CatalogueError
from decoder.cli_common import EXIT_RUNTIME, EXIT_USAGE, UsageError, check_model_options
from decoder.loading import model_name
from decoder.template import has_chat_template
from registry import (
    InvalidReference,
    ProfileNotFound,
    ProfileValidationError,
    Registry,
    RegistryError,
    check_knobs,
    parse_head_set,
    parse_intervention_warmup,
    parse_ref,
)
from registry.profile import LAGGED_PROBS, SELECTIONS  # the knobs' accepted values (no torch there)


def register_cli(subparsers) -> None:
    """Add `dysco generate` to the umbrella CLI."""
    p = subparsers.add_parser(
        "generate",
        help="generate text with DySCO, AttnTS or vanilla decoding",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default=None, help="catalogue name, local folder/.gguf or Hub id (default: the profile's "
                   "model, else smollm2-135m)")
    p.add_argument("--method", choices=("dysco", "vanilla", "attnts"), default="dysco", help="decoding method (default dysco)")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--heads", help="DySCO head set as layer:head pairs, e.g. 21:31,21:18")
    source.add_argument("--profile", help="registry profile reference, e.g. smollm2-135m@latest")
    p.add_argument("--strength", type=float, help="up-weighting factor (published 2.0; >= 99 = hard mask)")
    p.add_argument("--top-k", type=int, help="most positions selected per step (published 4096)")
    p.add_argument("--top-p", type=float, help="importance mass the selection reaches (published 0.975)")
    p.add_argument("--decay", type=float, help="weight of the previous step's importance (published 0.75)")
    p.add_argument("--warmup", type=int, help="context warmup: prompt tokens fed one at a time before the intervention warmup, the first "
                   "of them only updating importance (published 8)")
    p.add_argument("--selection", choices=SELECTIONS,
                   help="re-select every step after a probe (dynamic, default), once (static), or every step from the "
                   "previous step's full pass, with no probe (lagged: one pass per token)")
    p.add_argument("--lagged-probs", choices=LAGGED_PROBS,
                   help="with --selection lagged: the full pass's probabilities the next step selects from: a plain "
                   "softmax of q·k (plain, default) or the biased one it used (biased)")
    p.add_argument("--intervention-warmup", metavar="auto|N",
                   help="auto = the chat template's generation-prompt length, published default; an integer otherwise "
                   "(prompt tokens before the last one that already get a DySCO step)")
    p.add_argument("--temperature", type=float, default=None, help="AttnTS attention temperature (method attnts)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="most tokens to generate (default 128)")
    prompt = p.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", help="the prompt text (default: read stdin)")
    prompt.add_argument("--prompt-file", help="read the prompt from this file")
    p.add_argument("--system", help="a system message to put before the prompt (chat models)")
    p.add_argument("--raw", action="store_true", help="do not wrap the prompt in the chat template")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--sample-temperature", type=float, default=1.0, help="sampling temperature (with --sample)")
    p.add_argument("--sample-top-p", type=float, default=1.0, help="sampling nucleus (with --sample)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 … (default cpu)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: the checkpoint's)")
    p.add_argument("--force", action="store_true", help="use a profile made for another model anyway (warns)")
    p.add_argument("--json", action="store_true", help='print {"text": …, "diagnostics": …} instead of streaming text')
    p.add_argument("--fast", action="store_true",
                   help="greedy decoding on the fast path (static KV buffers, fused biased attention, CUDA graphs on one "
                   "GPU): same tokens as the default path; prints the text at the end (with --json, the same "
                   "per-step diagnostics)")
    p.set_defaults(func=_cmd_generate)


def parse_heads(text: str) -> list[tuple[int, int]]:
    """'21:31,21:18' -> [(21, 31), (21, 18)]; a ValueError names the bad part (`registry.parse_head_set`)."""
    return parse_head_set(text, "--heads")


def _read_prompt(args) -> str:
    if args.prompt is not None:
        text = args.prompt
    elif args.prompt_file is not None:
        try:
            with open(args.prompt_file, encoding="utf-8") as handle:
                text = handle.read()
        except OSError as err:
            raise OSError(f"cannot read --prompt-file {args.prompt_file}: {err.strerror}") from None
        except UnicodeDecodeError:
            raise UsageError(f"--prompt-file {args.prompt_file} is not UTF-8 text") from None
    else:
        if sys.stdin.isatty():
            raise UsageError("no prompt: give --prompt TEXT, --prompt-file F, or pipe the prompt on stdin")
        text = sys.stdin.read()
    if not text.strip():
        raise UsageError("the prompt is empty")
    return text


# argparse dest -> the DySCO knob it overrides (the option that sets it is --dest, dashed)
_KNOB_FLAGS = {"strength": "strength", "top_k": "top_k", "top_p": "top_p", "decay": "decay", "warmup": "context_warmup",
               "selection": "selection", "intervention_warmup": "intervention_warmup", "lagged_probs": "lagged_probs"}


def _knob_overrides(args) -> dict:
    return {knob: getattr(args, flag) for flag, knob in _KNOB_FLAGS.items() if getattr(args, flag) is not None}


def _check_arguments(args) -> None:
    """Every check that needs no model (flag values, ranges, combinations): a UsageError before any load."""
    try:
        if args.profile is not None:
            parse_ref(args.profile)
        if args.intervention_warmup is not None:
            args.intervention_warmup = parse_intervention_warmup(args.intervention_warmup, "--intervention-warmup")
        check_knobs(_knob_overrides(args), {knob: "--" + flag.replace("_", "-") for flag, knob in _KNOB_FLAGS.items()})
        if args.temperature is not None:
            check_knobs({"attnts_temperature": args.temperature}, {"attnts_temperature": "--temperature"})
        args.head_set = parse_heads(args.heads) if args.heads is not None else None
    except (InvalidReference, ProfileValidationError) as err:
        raise UsageError(str(err)) from None
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    check_model_options(args.device, args.dtype)
    if args.fast and args.sample:
        raise UsageError("--fast decodes greedily; drop --sample, or drop --fast to sample")
    if args.temperature is not None and args.method != "attnts":
        raise UsageError("--temperature is the AttnTS attention temperature; use it with --method attnts "
                         "(for sampling use --sample --sample-temperature)")


def _build_decoder(args, model, tokenizer, profile, model_name):
    from decoder.dysco import DyscoConfig
    from decoder.generation import Decoder

    overrides = _knob_overrides(args)
    if args.method == "attnts":
        return Decoder(model, tokenizer, method="attnts", temperature=_attnts_temperature(args, profile))
    if args.method == "vanilla":
        return Decoder(model, tokenizer, method="vanilla")
    if args.head_set is not None:
        config = DyscoConfig(head_set=args.head_set, **overrides)
        return Decoder(model, tokenizer, method="dysco", dysco=config)
    decoder = Decoder.from_profile(model, tokenizer, profile, force=args.force, name=model_name)
    if overrides and decoder.dysco is not None:
        decoder = Decoder(model, tokenizer, method="dysco", dysco=decoder.dysco.replace(**overrides))
    return decoder


def _attnts_temperature(args, profile) -> float:
    temperature = args.temperature
    if temperature is None and profile is not None:
        temperature = profile.knobs.attnts_temperature
    if temperature is None:
        raise UsageError("--method attnts needs --temperature T (the attention temperature)")
    return temperature


def _cmd_generate(args) -> int:
    try:
        return _generate(args)
    except UsageError as err:
        print(f"dysco generate: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as err:
        # Known failures of the input (a profile for another model, a corrupted registry version, a
        # model that cannot be loaded) are one line; anything else is a bug and keeps its traceback.
        if isinstance(err, (ValueError, TypeError, LookupError, RegistryError, CatalogueError, OSError)):
            print(f"dysco generate: error: {err}", file=sys.stderr)
            return EXIT_RUNTIME
        raise


def _generate(args) -> int:
    _check_arguments(args)
    text = _read_prompt(args)

    profile = profile_ref = None
    if args.profile is not None or (args.method == "dysco" and args.head_set is None):
        ref = args.profile or model_name(args.model or DEFAULT_MODEL)
        try:
            registry = Registry()
            name, version = registry.resolve(ref)
            profile = registry.load(f"{name}@{version}")
            profile_ref = f"{name}@{version}"  # what was used, not what was asked (`@latest` moves)
        except ProfileNotFound:
            if args.profile is not None:
                raise
    model_spec = args.model or (profile.model.name if profile is not None and args.profile else None) or DEFAULT_MODEL
    # What the profile decides is checked before the model loads too.
    if args.method == "attnts":
        _attnts_temperature(args, profile)
    elif args.method == "dysco" and args.head_set is None:
        if profile is None:
            raise UsageError(
                f"--method dysco needs a head set: give --heads layer:head,… or --profile REF (the registry has no "
                f"profile named {model_name(model_spec)!r}; `headfinder` makes one)"
            )
    model, tokenizer = loading.load_model(model_spec, dtype=args.dtype, device=args.device, progress=not args.json)
    decoder = _build_decoder(args, model, tokenizer, profile, model_name(model_spec))

    if args.raw or not has_chat_template(tokenizer):
        prompt = text
    else:
        prompt = ([{"role": "system", "content": args.system}] if args.system else []) + [{"role": "user", "content": text}]

    used = _profile_used(decoder, profile, profile_ref, args)
    if used and not args.json:
        print(f"[dysco] profile {used['ref']} (content {used['content_hash'][:12]})", file=sys.stderr)
    if args.fast:
        return _generate_fast(args, decoder, prompt, model_spec, used)

    streamed = []

    def stream(event) -> None:
        streamed.extend(event.tokens)
        shown = tokenizer.decode(streamed[:-1], skip_special_tokens=True)
        now = tokenizer.decode(streamed, skip_special_tokens=True)
        if now.startswith(shown):
            sys.stdout.write(now[len(shown):])
            sys.stdout.flush()

    result = decoder.generate(
        prompt,
        max_new_tokens=args.max_new_tokens,
        do_sample=args.sample,
        temperature=args.sample_temperature,
        top_p=args.sample_top_p,
        seed=args.seed,
        stop_strings=args.stop or None,
        callback=None if args.json else stream,
        return_diagnostics=True,
    )
    if args.json:
        print(json.dumps({
            "text": result.text,
            "model": model_spec,
            "method": decoder.method,
            "prompt_tokens": len(result.prompt_ids[0]),
            "tokens": result.token_ids[0],
            "finish_reason": result.finish_reasons[0],
            "knobs": _knobs(decoder),
            "profile": used,
            "diagnostics": result.diagnostics[0] if result.diagnostics else [],
        }))
    else:
        sys.stdout.write("\n")
    return 0


def _profile_used(decoder, profile, profile_ref, args) -> dict | None:
    """The registry profile this run decodes with (resolved version and content hash), or None."""
    if profile is None or profile_ref is None or (args.heads is not None and decoder.method == "dysco"):
        return None
    if decoder.method == "vanilla":
        return None
    return {"ref": profile_ref, "content_hash": profile.content_hash()}


def _generate_fast(args, decoder, prompt, model_name: str, used: dict | None = None) -> int:
    """Greedy generation on `decoder.fast`, printed when done (the fast path does not stream)."""
    from decoder.fast import FastDecoder

    fast = FastDecoder(decoder.model, decoder.tokenizer, decoder.method, dysco=decoder.dysco,
                       temperature=decoder.temperature)
    result = fast.generate(prompt, max_new_tokens=args.max_new_tokens, stop_strings=args.stop or None,
                           return_diagnostics=args.json)
    if args.json:
        print(json.dumps({
            "text": result.text, "model": model_name, "method": decoder.method, "path": "fast",
            "prompt_tokens": len(result.prompt_ids[0]), "tokens": result.token_ids[0],
            "finish_reason": result.finish_reasons[0], "knobs": _knobs(decoder), "profile": used,
            "timings": result.timings, "diagnostics": result.diagnostics[0] if result.diagnostics else [],
        }))
    else:
        print(result.text)
    return 0


def _knobs(decoder) -> dict:
    if decoder.dysco is None:
        return {"temperature": decoder.temperature} if decoder.method == "attnts" else {}
    d = decoder.dysco
    return {"head_set": [list(p) for p in d.head_set], "strength": d.strength, "top_p": d.top_p, "top_k": d.top_k,
            "decay": d.decay, "context_warmup": d.context_warmup, "selection": d.selection,
            "lagged_probs": d.lagged_probs, "intervention_warmup": d.intervention_warmup,
            # "auto" resolved against the tokenizer: the prompt tokens that actually got a DySCO step before the last
            "intervention_warmup_tokens": decoder.intervention_warmup}
