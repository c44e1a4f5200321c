"""Does a profile belong to the model it is about to steer? The decoder asks before decoding.

    from registry import check_model
    check_model(profile, {"name": "smollm2-135m", "architecture": "llama", "num_layers": 30,
                          "num_heads": 9, "num_kv_heads": 3, "config_fingerprint": "…",
                          "weights_fingerprint": "…"})
    'config and weights fingerprints match'

Rule: when both sides carry a weights fingerprint, it decides (names may differ: a local path and a
Hub name are the same checkpoint). Otherwise the profile matches by name and shape only (the shipped
seeds have no fingerprints), and the returned basis says so.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

from registry.errors import ProfileMismatchError, ProfileValidationError
from registry.profile import ModelIdentity, Profile

_SHAPE_KEYS = ("architecture", "num_layers", "num_heads", "num_kv_heads")


def _short_name(name: str | None) -> str:
    """'Qwen/Qwen3-8B' and '/models/qwen3-8b/' both become 'qwen3-8b'."""
    return (name or "").rstrip("/").rsplit("/", 1)[-1].strip().lower()


def check_model(
    profile: Profile, identity: Mapping[str, Any] | ModelIdentity, *, force: bool = False
) -> str:
    """Raise `ProfileMismatchError` unless `profile` was made for the model `identity` describes.

    `identity` has the keys of `ModelIdentity` (fingerprints and name may be missing or None).
    With `force=True` a mismatch only warns; a head set that does not fit the model's
    layers x heads still raises, since it cannot be applied at all. Returns how the match was made.
    """
    model = identity.to_dict() if isinstance(identity, ModelIdentity) else dict(identity)
    missing = [key for key in _SHAPE_KEYS if key not in model]
    if missing:
        raise ProfileValidationError(
            f"model identity is missing {', '.join(missing)}; it needs {', '.join(_SHAPE_KEYS)} "
            "and optionally name, config_fingerprint, weights_fingerprint"
        )
    ours = profile.model
    label = f"profile for {ours.name!r}"
    theirs = model.get("name") or "the model"

    outside = [
        (layer, head) for layer, head in profile.head_set
        if not (0 <= layer < int(model["num_layers"]) and 0 <= head < int(model["num_heads"]))
    ]
    if outside:
        raise ProfileMismatchError(
            f"{label} cannot be applied to {theirs!r}: head(s) {outside} lie outside its "
            f"{model['num_layers']} layers x {model['num_heads']} heads (not overridable by force)"
        )

    problems = [
        f"{key} {getattr(ours, key)!r} (profile) vs {model[key]!r} (model)"
        for key in _SHAPE_KEYS
        if getattr(ours, key) != model[key]
    ]
    compared = []
    for kind in ("config", "weights"):
        key = f"{kind}_fingerprint"
        mine, other = getattr(ours, key), model.get(key)
        if mine is not None and other is not None:
            if mine != other:
                problems.append(f"{kind} fingerprint {mine} (profile) vs {other} (model)")
            else:
                compared.append(kind)
    if "weights" in compared:
        basis = f"{' and '.join(compared)} fingerprints match"
    else:
        if _short_name(ours.name) != _short_name(model.get("name")):
            problems.append(f"name {ours.name!r} (profile) vs {model.get('name')!r} (model)")
        why = (
            "the profile has no weights fingerprint (a seed or hand-made profile)"
            if ours.weights_fingerprint is None
            else "the model's identity has no weights fingerprint"
        )
        basis = f"matched by name and shape only: {why}"
        if compared:
            basis += "; config fingerprints match"

    if not problems:
        return basis
    message = (
        f"{label} does not match {theirs!r}: {'; '.join(problems)}. "
        f"Fingerprints — profile: config {ours.config_fingerprint}, weights "
        f"{ours.weights_fingerprint}; model: config {model.get('config_fingerprint')}, weights "
        f"{model.get('weights_fingerprint')}. "
    )
    if force:
        warnings.warn(message + "Using it anyway (forced).", stacklevel=2)
        return "forced despite a mismatch: " + "; ".join(problems)
    raise ProfileMismatchError(
        message + "Load a profile made for this model, or force it (force=True) if you know "
        "the checkpoints are compatible."
    )
