"""What an evaluation is asked to do, checked before any decoding: tasks, context lengths, methods,
example counts, and DySCO's head set (from a profile, the registry or a head list).

Every check raises `EvalError` naming what was wrong and what is accepted.

    >>> parse_lengths("2k,4096")
    [2048, 4096]
    >>> format_length(2048), format_length(3000)
    ('2k', '3000')
    >>> parse_heads("21:31,21:18")
    [(21, 31), (21, 18)]
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from calibration.tasks import TASK_NAMES, Task, get_task
from decoder.loading import context_limit, model_identity, model_shape
from registry import (
    InvalidReference,
    ProfileNotFound,
    ProfileValidationError,
    Registry,
    RegistryError,
    check_model,
    parse_head_set,
    parse_intervention_warmup,
)


class EvalError(ValueError):
    """Bad input to `evaluate` or `dysco eval`, with what is accepted."""


# --------------------------------------------------------------------------- parsing input

_LENGTH = re.compile(r"^\s*(\d+)\s*([kK]?)\s*$")


def parse_length(text: str | int) -> int:
    """'2k' -> 2048, '4096' -> 4096; anything else (0, negatives, '1.5k', 'abc') raises EvalError."""
    if isinstance(text, bool):
        raise EvalError(f"bad context length {text!r}: write a token count like 4096 or 4k (k = 1024)")
    if isinstance(text, int):
        value = text
    else:
        match = _LENGTH.match(str(text))
        if not match:
            raise EvalError(f"bad context length {text!r}: write a token count like 4096 or 4k (k = 1024)")
        value = int(match.group(1)) * (1024 if match.group(2) else 1)
    if value < 1:
        raise EvalError(f"bad context length {text!r}: it must be at least 1 token (e.g. 2k or 2048)")
    return value


def parse_lengths(text: str | Sequence[str | int]) -> list[int]:
    """'2k,4k,8k' (or a list) -> [2048, 4096, 8192]; duplicates are an error."""
    items = [t for t in text.split(",")] if isinstance(text, str) else list(text)
    items = [t.strip() if isinstance(t, str) else t for t in items]
    if not items or any(t == "" for t in items):
        raise EvalError(f"bad --lengths {text!r}: give comma-separated token counts like 2k,4k,8k or 4096")
    lengths = [parse_length(t) for t in items]
    if len(set(lengths)) != len(lengths):
        raise EvalError(f"--lengths lists a length twice: {text!r}")
    return lengths


def format_length(tokens: int) -> str:
    """2048 -> '2k', 3000 -> '3000' (the inverse of parse_length where it is exact)."""
    return f"{tokens // 1024}k" if tokens % 1024 == 0 else str(tokens)


def parse_names(text: str | Sequence[str], accepted: Sequence[str], what: str) -> list[str]:
    """Comma-separated (or listed) names, each one of `accepted`, none twice."""
    items = [t.strip() for t in text.split(",")] if isinstance(text, str) else [str(t).strip() for t in text]
    if not items or any(not t for t in items):
        raise EvalError(f"no {what} given in {text!r}; accepted: {', '.join(accepted)}")
    unknown = [t for t in items if t not in accepted]
    if unknown:
        raise EvalError(f"unknown {what} {unknown[0]!r}; accepted: {', '.join(accepted)}")
    if len(set(items)) != len(items):
        raise EvalError(f"a {what} is listed twice in {text!r}")
    return items


def resolve_tasks(tasks: str | Sequence[str | Task]) -> list[Task]:
    """Task objects from names ('needle,kv'), MRCR files / Hub ids, or Task objects; none twice."""
    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",")]
    if not tasks:
        raise EvalError(f"no task given; accepted: {', '.join(TASK_NAMES)} (or an MRCR file / Hub id)")
    resolved = []
    for item in tasks:
        if isinstance(item, Task):
            resolved.append(item)
            continue
        if not isinstance(item, str) or not item.strip():
            raise EvalError(f"bad task {item!r}; accepted: {', '.join(TASK_NAMES)} (or an MRCR file / Hub id)")
        try:
            resolved.append(get_task(item.strip()))
        except ValueError as err:
            raise EvalError(str(err)) from None
    labels = [task_label(t) for t in resolved]
    if len(set(labels)) != len(labels):
        raise EvalError(f"a task is listed twice: {', '.join(labels)}")
    return resolved


def task_label(task: Task) -> str:
    """A task's name in reports: its name, with the file name for a file-backed task ('mrcr:dev.parquet')."""
    source = getattr(task, "source", None)
    return f"{task.name}:{Path(source).name}" if source else task.name


def check_n(n: Any) -> int:
    """`n` (examples per task and length) checked: an integer >= 1."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise EvalError(f"n (examples per task and length) must be an integer >= 1, got {n!r}")
    return n


def parse_heads(text: str) -> list[tuple[int, int]]:
    """'21:31,21:18' -> [(21, 31), (21, 18)] (`registry.parse_head_set`, as `calibrate --heads`)."""
    try:
        return parse_head_set(text, "--heads")
    except ProfileValidationError as err:
        raise EvalError(str(err)) from None



def resolve_dysco(
    model: Any,
    name: str,
    *,
    profile: str | Any | None = None,
    heads: Sequence[Sequence[int]] | None = None,
    registry: str | Path | None = None,
    force: bool = False,
    intervention_warmup: int | str | None = None,
    profile_ref: str | None = None,
) -> tuple[Any, dict[str, Any]]:
    """The DyscoConfig for `model` from heads, a profile (ref or object), or the registry's `name@latest`.

    Returns (config, info) where info says where it came from: for a profile its resolved reference
    (`name@3`, never `@latest`) and content hash, and its tuned AttnTS temperature when it has one.
    `profile_ref` labels a profile given as an object (see `load_profile`). `intervention_warmup`
    ("auto" or a token count) overrides the profile's (heads: the published "auto"); None keeps it.
    """
    from decoder.dysco import DyscoConfig

    if profile is not None and heads is not None:
        raise EvalError("give either a profile or a head list (--heads), not both")
    overrides: dict[str, Any] = {}
    if intervention_warmup is not None:
        overrides["intervention_warmup"] = check_intervention_warmup(intervention_warmup)
    if heads is not None:
        layers, per_layer = model_shape(model)
        pairs = [tuple(int(v) for v in pair) for pair in heads]
        bad = [p for p in pairs if not (0 <= p[0] < layers and 0 <= p[1] < per_layer)]
        if bad:
            raise EvalError(
                f"head {bad[0][0]}:{bad[0][1]} is outside {name} ({layers} layers × {per_layer} heads; "
                f"layers 0–{layers - 1}, heads 0–{per_layer - 1})"
            )
        try:
            return DyscoConfig(head_set=pairs, **overrides), {"source": "heads", "head_set": [list(p) for p in pairs]}
        except ValueError as err:
            raise EvalError(f"bad head list: {err}") from None

    if profile is None or isinstance(profile, str):
        ref, loaded = load_profile(name, profile, registry)
    else:
        loaded = profile
        ref = profile_ref
    try:
        basis = check_model(loaded, model_identity(model, name), force=force)
    except RegistryError as err:
        raise EvalError(f"profile {ref or loaded.model.name!r} does not fit {name!r}: {err}") from None
    knobs = loaded.knobs
    if knobs.attnts_temperature is not None:
        raise EvalError(f"profile {ref or loaded.model.name!r} is an AttnTS profile (no DySCO knobs); give a DySCO "
                        "profile or --heads")
    config = DyscoConfig.from_profile(loaded).replace(**overrides)
    # The resolved version and the content hash: `@latest` (or a tag) names another profile tomorrow.
    info = {"source": "profile", "profile": ref or loaded.model.name, "content_hash": loaded.content_hash(),
            "match": basis}
    tuned = (loaded.metrics or {}).get("attnts_temperature")
    if isinstance(tuned, (int, float)) and not isinstance(tuned, bool) and tuned > 0:
        info["attnts_temperature"] = float(tuned)
    return config, info


def load_profile(name: str, profile: str | None = None, registry: str | Path | None = None) -> tuple[str, Any]:
    """(resolved reference, Profile) of `profile` (a reference), or of the registry's `name@latest`.

    The reference returned is the version it resolved to (`name@3`, or `name@seed`), so a report
    says which profile it used even after `@latest` moves. Needs no model: the CLI calls it before loading.
    """
    try:
        store = Registry(registry)
    except RegistryError as err:
        raise EvalError(f"--registry: {err}") from None
    ref = profile or f"{name}@latest"
    try:
        found, version = store.resolve(ref)
        resolved = f"{found}@{version}"
        return resolved, store.load(resolved)
    except InvalidReference as err:
        raise EvalError(str(err)) from None
    except ProfileNotFound as err:
        if profile is not None:
            raise EvalError(f"profile {ref!r} not found: {err}") from None
        raise EvalError(
            f"method 'dysco' needs a head set and the registry ({store.root}) has no profile for {name!r}: "
            f"run `headfinder detect --model {name} --register` first, or pass --profile REF or "
            "--heads L:H,… (or leave dysco out of --methods)"
        ) from None
    except RegistryError as err:
        raise EvalError(f"cannot read profile {ref!r}: {err}") from None


def check_intervention_warmup(value: Any) -> int | str:
    """`intervention_warmup` checked: "auto" or an integer >= 0 (EvalError otherwise)."""
    try:
        return parse_intervention_warmup(value, "--intervention-warmup")
    except ProfileValidationError as err:
        raise EvalError(str(err)) from None


def model_context(model: Any) -> int | None:
    """The loaded model's context in tokens (None: its config states none)."""
    return context_limit(model.config)


def check_lengths(lengths: Sequence[int], limit: int | None, name: str) -> None:
    """EvalError unless every context length fits the model's context of `limit` tokens (None: no limit known)."""
    too_long = [length for length in lengths if limit is not None and length > limit]
    if too_long:
        raise EvalError(
            f"length {format_length(too_long[0])} ({too_long[0]} tokens) is beyond {name}'s context of {limit} "
            f"tokens; accepted: lengths up to {limit} tokens minus the new tokens"
        )
