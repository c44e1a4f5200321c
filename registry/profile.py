"""The profile: everything one model needs for DySCO decoding, as a validated, hashable value.

A profile holds the model's identity, its per-head score matrices, the chosen head set, the
decoding knobs, the metrics that justified them and where it all came from. It needs no torch:
score matrices are numpy arrays, everything else is plain JSON.

    >>> import numpy as np
    >>> from registry import Profile, ModelIdentity, Knobs
    >>> model = ModelIdentity(name="smollm2-135m", architecture="llama",
    ...                       num_layers=30, num_heads=9, num_kv_heads=3)
    >>> profile = Profile(model=model, head_set=[(14, 2), (17, 5)],
    ...                   head_scores={"qr": np.zeros((30, 9), np.float32)},
    ...                   knobs=Knobs(strength=2.0))
    >>> len(profile.content_hash())
    64
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata
from typing import Any, ClassVar

import numpy as np

from registry.errors import ProfileValidationError

SCHEMA_VERSION = 1
SELECTIONS = ("dynamic", "static", "lagged")
# lagged selection: which attention probabilities of the full pass feed the next step's importance
LAGGED_PROBS = ("plain", "biased")
AUTO = "auto"  # intervention_warmup: the chat template's generation-prompt length, resolved by the decoder
# Model names become directory names; "@" separates a name from its version in a reference.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
_SCORE_KEY_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]*$")
_NAME_MAX = 120


def validate_model_name(name: object) -> str:
    """Check that `name` can name a model in the registry (a catalogue name or `org/model`)."""
    if not isinstance(name, str) or not name:
        raise ProfileValidationError(f"model name must be a non-empty string, got {name!r}")
    if len(name) > _NAME_MAX or not _NAME_RE.match(name) or "--" in name or ".." in name:
        raise ProfileValidationError(
            f"model name {name!r} is not accepted: use letters, digits, '.', '_' and '-' "
            f"(no '--' or '..'), optionally one 'org/' prefix, at most {_NAME_MAX} characters, "
            "starting with a letter or digit; e.g. 'smollm2-135m' or 'Qwen/Qwen3-8B'"
        )
    return name


def _positive_int(value: object, what: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ProfileValidationError(f"{what} must be an integer >= {minimum}, got {value!r}")
    if int(value) < minimum:
        raise ProfileValidationError(f"{what} must be an integer >= {minimum}, got {value}")
    return int(value)


def _finite_float(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ProfileValidationError(f"{what} must be a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise ProfileValidationError(f"{what} must be finite, got {number}")
    return number


def parse_intervention_warmup(value: object, what: str = "knobs.intervention_warmup") -> int | str:
    """DySCO's `intervention_warmup` normalised: "auto" (any case, spaces around it) or an integer >= 0,
    also written as a string of digits ("4" -> 4). Anything else is a `ProfileValidationError` (a
    ValueError). The knob's one parser: `DyscoConfig`, the CLIs and the search space all call it.
    """
    if isinstance(value, str):
        text = value.strip().lower()
        if text == AUTO:
            return AUTO
        if text.isascii() and text.isdigit():
            return int(text)
    elif not isinstance(value, bool) and isinstance(value, (int, np.integer)) and int(value) >= 0:
        return int(value)
    raise ProfileValidationError(
        f"{what} must be 'auto' (the chat template's generation-prompt length, the published default) "
        f"or an integer >= 0, got {value!r}"
    )


def parse_head_set(text: str, what: str = "--heads") -> list[tuple[int, int]]:
    """'21:31, 21:18' -> [(21, 31), (21, 18)]: the one parser of a head set written on a command line.

    Pairs of non-negative integers LAYER:HEAD, comma-separated, at least one, none twice (spaces are
    ignored). Anything else is a `ProfileValidationError` (a ValueError) naming `what` and the bad part.
    Whether the heads exist in a model is checked against the model (`Profile`, `DyscoConfig`).
    """
    if not isinstance(text, str):
        raise ProfileValidationError(f"{what} must be text like 21:31,21:18, got {text!r}")
    pairs: list[tuple[int, int]] = []
    for item in text.replace(" ", "").split(","):
        if not item:
            continue
        layer, sep, head = item.partition(":")
        if not (sep and layer.isascii() and layer.isdigit() and head.isascii() and head.isdigit()):
            raise ProfileValidationError(
                f"{what}: bad head {item!r}: write LAYER:HEAD pairs of non-negative integers, e.g. 21:31,21:18"
            )
        pair = (int(layer), int(head))
        if pair in pairs:
            raise ProfileValidationError(f"{what} lists {layer}:{head} twice")
        pairs.append(pair)
    if not pairs:
        raise ProfileValidationError(f"{what} is empty: write LAYER:HEAD pairs, e.g. 21:31,21:18")
    return pairs


def check_knobs(values: Mapping[str, Any], flags: Mapping[str, str] | None = None) -> None:
    """Check knob values (e.g. a command line's overrides) by the rules of `Knobs`, before any model loads.

    `flags` maps a knob to the option that set it (e.g. {"top_p": "--top-p"}) so the error names it.
    """
    try:
        Knobs(**values)
    except TypeError as err:  # an unknown knob name: a caller's bug, not the user's
        raise ProfileValidationError(f"not a DySCO knob: {err}") from None
    except ProfileValidationError as err:
        message = str(err)
        for knob, flag in (flags or {}).items():
            message = message.replace(f"knobs.{knob} ", f"{flag} ")
        raise ProfileValidationError(message) from None


def _optional_fingerprint(value: object, what: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ProfileValidationError(f"{what} must be a non-empty string or null, got {value!r}")
    return value


@dataclass(frozen=True)
class ModelIdentity:
    """Which model a profile belongs to: name, shape, and fingerprints of its config and weights.

    Fingerprints are `None` for profiles (like the shipped seeds) that match by name and shape only.
    """

    name: str
    architecture: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    config_fingerprint: str | None = None
    weights_fingerprint: str | None = None

    def __post_init__(self) -> None:
        validate_model_name(self.name)
        if not isinstance(self.architecture, str) or not self.architecture:
            raise ProfileValidationError(
                f"model.architecture must be a non-empty string (a transformers model_type such "
                f"as 'llama' or 'qwen3'), got {self.architecture!r}"
            )
        set_ = object.__setattr__
        set_(self, "num_layers", _positive_int(self.num_layers, "model.num_layers", 1))
        set_(self, "num_heads", _positive_int(self.num_heads, "model.num_heads", 1))
        set_(self, "num_kv_heads", _positive_int(self.num_kv_heads, "model.num_kv_heads", 1))
        if self.num_heads % self.num_kv_heads:
            raise ProfileValidationError(
                f"model.num_heads ({self.num_heads}) must be a multiple of model.num_kv_heads "
                f"({self.num_kv_heads})"
            )
        set_(self, "config_fingerprint",
             _optional_fingerprint(self.config_fingerprint, "model.config_fingerprint"))
        set_(self, "weights_fingerprint",
             _optional_fingerprint(self.weights_fingerprint, "model.weights_fingerprint"))

    def to_dict(self) -> dict[str, Any]:
        """The identity as a JSON-ready dict (the same keys the decoder's identity dict uses)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelIdentity:
        """Build an identity from a dict, naming any missing or unknown key."""
        return cls(**_known_fields(cls, data, "model"))


@dataclass(frozen=True)
class Knobs:
    """DySCO decoding knobs; defaults are the published ones (arXiv 2602.22175).

    `strength >= 99` is the hard variant (unselected positions masked). `intervention_warmup` is
    "auto" (the chat template's generation-prompt length, resolved against the tokenizer when a
    decoder is built) or a number of prompt tokens. `attnts_temperature` is set only for profiles
    of the AttnTS baseline. `lagged_probs` matters only with `selection="lagged"` (`decoder.dysco`).
    """

    strength: float = 2.0
    top_p: float = 0.975
    top_k: int = 4096
    decay: float = 0.75
    context_warmup: int = 8
    selection: str = "dynamic"
    attnts_temperature: float | None = None
    intervention_warmup: int | str = AUTO
    lagged_probs: str = "plain"

    # Knobs that came after profiles were first stored, with the value a profile without them loads
    # with. The content hash leaves such a knob out while it holds that value, so every profile stored
    # before the knob existed keeps its hash (and its manifest still verifies).
    ADDED_LATER: ClassVar[dict[str, Any]] = {"intervention_warmup": AUTO, "lagged_probs": "plain"}

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        strength = _finite_float(self.strength, "knobs.strength")
        if strength <= 0:
            raise ProfileValidationError(f"knobs.strength must be > 0, got {strength}")
        top_p = _finite_float(self.top_p, "knobs.top_p")
        if not 0 < top_p <= 1:
            raise ProfileValidationError(f"knobs.top_p must be in (0, 1], got {top_p}")
        decay = _finite_float(self.decay, "knobs.decay")
        if not 0 <= decay < 1:
            raise ProfileValidationError(f"knobs.decay must be in [0, 1), got {decay}")
        set_(self, "strength", strength)
        set_(self, "top_p", top_p)
        set_(self, "decay", decay)
        set_(self, "top_k", _positive_int(self.top_k, "knobs.top_k", 1))
        set_(self, "context_warmup", _positive_int(self.context_warmup, "knobs.context_warmup", 0))
        if self.selection not in SELECTIONS:
            raise ProfileValidationError(
                f"knobs.selection must be one of {', '.join(SELECTIONS)}, got {self.selection!r}"
            )
        if self.lagged_probs not in LAGGED_PROBS:
            raise ProfileValidationError(
                f"knobs.lagged_probs must be one of {', '.join(LAGGED_PROBS)}, got {self.lagged_probs!r}"
            )
        if self.attnts_temperature is not None:
            temperature = _finite_float(self.attnts_temperature, "knobs.attnts_temperature")
            if temperature <= 0:
                raise ProfileValidationError(
                    f"knobs.attnts_temperature must be > 0 or null, got {temperature}"
                )
            set_(self, "attnts_temperature", temperature)
        set_(self, "intervention_warmup", parse_intervention_warmup(self.intervention_warmup))

    def to_dict(self) -> dict[str, Any]:
        """The knobs as a JSON-ready dict (every knob, as `profile.json` holds them)."""
        return dataclasses.asdict(self)

    def hashed_dict(self) -> dict[str, Any]:
        """`to_dict()` without the knobs of `ADDED_LATER` that hold their default: what the content hash reads."""
        return {
            name: value for name, value in self.to_dict().items()
            if not (name in self.ADDED_LATER and value == self.ADDED_LATER[name])
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Knobs:
        """Build knobs from a dict; missing knobs take the published defaults, unknown ones fail."""
        return cls(**_known_fields(cls, data, "knobs", all_optional=True))


def _known_fields(
    cls: type, data: Mapping[str, Any], what: str, all_optional: bool = False
) -> dict[str, Any]:
    if not isinstance(data, Mapping):
        raise ProfileValidationError(f"{what} must be a JSON object, got {type(data).__name__}")
    fields_ = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields_))
    if unknown:
        raise ProfileValidationError(
            f"unknown {what} field(s) {', '.join(map(repr, unknown))}; accepted: "
            f"{', '.join(fields_)}"
        )
    if not all_optional:
        required = [
            name for name, f in fields_.items()
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        missing = [name for name in required if name not in data]
        if missing:
            raise ProfileValidationError(f"{what} is missing field(s) {', '.join(missing)}")
    return dict(data)


def _json_value(value: Any, where: str) -> Any:
    """Normalise a metrics/provenance value to plain JSON (numpy scalars become Python numbers)."""
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or isinstance(value, (bool, str, int)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ProfileValidationError(f"{where} must be finite, got {value}")
        return value
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise ProfileValidationError(f"{where} keys must be strings, got {key!r}")
            out[key] = _json_value(item, f"{where}.{key}")
        return out
    if isinstance(value, (list, tuple)):
        return [_json_value(item, f"{where}[{i}]") for i, item in enumerate(value)]
    raise ProfileValidationError(
        f"{where} must hold only JSON values (numbers, strings, booleans, null, lists, objects), "
        f"got {type(value).__name__}"
    )


def canonical_json(obj: Any) -> bytes:
    """The one byte string a JSON value hashes as: sorted keys, no spaces, UTF-8, no NaN."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


@dataclass(frozen=True, eq=False)
class Profile:
    """One model's DySCO profile. Construction validates; an invalid profile cannot exist.

    Fields: `model` (identity), `head_set` ((layer, head) pairs, ranked, no duplicates),
    `knobs`, `head_scores` (name -> float32 [num_layers, num_heads], e.g. "qr", "qr_ndcg",
    "retrieval"), `metrics` and `provenance` (free-form JSON), `schema_version`.

    Conventional keys — metrics: `dev_<task>`, `test_<task>`, `baseline_<method>_<task>`,
    `tokens_per_s`; provenance: `probe_kind`, `probe_count`, `probe_length`, `seed`, `study`,
    `mlflow_run_id`, `library_versions`, `created`, `parent` (the ref this one refines, e.g.
    "smollm2-135m@1"), `source` ("paper" for the seeds). A new version from an old one:
    `dataclasses.replace(old, knobs=Knobs(strength=3.0), metrics={...})`.
    """

    model: ModelIdentity
    head_set: list[tuple[int, int]]
    knobs: Knobs = field(default_factory=Knobs)
    head_scores: dict[str, np.ndarray] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        if isinstance(self.schema_version, bool) or not isinstance(self.schema_version, int):
            raise ProfileValidationError(
                f"schema_version must be an integer, got {self.schema_version!r}"
            )
        if self.schema_version > SCHEMA_VERSION:
            raise ProfileValidationError(
                f"profile has schema_version {self.schema_version}, but this dysco-toolkit reads "
                f"schema {SCHEMA_VERSION} and older; upgrade dysco-toolkit to read it"
            )
        if self.schema_version < 1:
            raise ProfileValidationError(f"schema_version must be >= 1, got {self.schema_version}")
        if isinstance(self.model, Mapping):
            set_(self, "model", ModelIdentity.from_dict(self.model))
        elif not isinstance(self.model, ModelIdentity):
            raise ProfileValidationError(f"model must be a ModelIdentity, got {self.model!r}")
        if isinstance(self.knobs, Mapping):
            set_(self, "knobs", Knobs.from_dict(self.knobs))
        elif not isinstance(self.knobs, Knobs):
            raise ProfileValidationError(f"knobs must be a Knobs, got {self.knobs!r}")
        set_(self, "head_set", self._checked_head_set(self.head_set))
        set_(self, "head_scores", self._checked_head_scores(self.head_scores))
        if not isinstance(self.metrics, Mapping) or not isinstance(self.provenance, Mapping):
            raise ProfileValidationError("metrics and provenance must be JSON objects (dicts)")
        set_(self, "metrics", _json_value(self.metrics, "metrics"))
        set_(self, "provenance", _json_value(self.provenance, "provenance"))

    def _checked_head_set(self, head_set: object) -> list[tuple[int, int]]:
        layers, heads = self.model.num_layers, self.model.num_heads
        if isinstance(head_set, (str, bytes)) or not isinstance(head_set, Iterable):
            raise ProfileValidationError(
                f"head_set must be a list of (layer, head) pairs, got {head_set!r}"
            )
        checked: list[tuple[int, int]] = []
        for pair in head_set:
            if isinstance(pair, (str, bytes)) or not isinstance(pair, Iterable):
                raise ProfileValidationError(f"head_set entry {pair!r} is not a (layer, head) pair")
            items = list(pair)
            if len(items) != 2 or any(
                isinstance(v, bool) or not isinstance(v, (int, np.integer)) for v in items
            ):
                raise ProfileValidationError(
                    f"head_set entry {pair!r} is not a (layer, head) pair of integers"
                )
            layer, head = int(items[0]), int(items[1])
            if not (0 <= layer < layers and 0 <= head < heads):
                raise ProfileValidationError(
                    f"head_set entry ({layer}, {head}) is outside the model's shape: layers must "
                    f"be in 0..{layers - 1} and heads in 0..{heads - 1} "
                    f"({self.model.name}: {layers} layers x {heads} heads)"
                )
            if (layer, head) in checked:
                raise ProfileValidationError(f"head_set lists ({layer}, {head}) twice")
            checked.append((layer, head))
        if not checked:
            raise ProfileValidationError("head_set is empty; DySCO needs at least one head")
        return checked

    def _checked_head_scores(self, head_scores: object) -> dict[str, np.ndarray]:
        if not isinstance(head_scores, Mapping):
            raise ProfileValidationError(
                f"head_scores must be a dict of name -> [layers, heads] array, got "
                f"{type(head_scores).__name__}"
            )
        shape = (self.model.num_layers, self.model.num_heads)
        checked: dict[str, np.ndarray] = {}
        for key, matrix in head_scores.items():
            if not isinstance(key, str) or not _SCORE_KEY_RE.match(key):
                raise ProfileValidationError(
                    f"head_scores key {key!r} is not accepted: start with a letter, then letters, "
                    "digits, '_', '.' or '-' (e.g. 'qr', 'qr_ndcg', 'retrieval')"
                )
            try:
                array = np.array(matrix, dtype=np.float32)  # a private copy: profiles are values
            except (TypeError, ValueError) as err:
                raise ProfileValidationError(
                    f"head_scores[{key!r}] is not a numeric matrix: {err}"
                ) from None
            if array.shape != shape:
                raise ProfileValidationError(
                    f"head_scores[{key!r}] has shape {tuple(array.shape)}, expected {shape} "
                    f"(num_layers, num_heads)"
                )
            if not np.isfinite(array).all():
                bad = np.argwhere(~np.isfinite(array))[0]
                raise ProfileValidationError(
                    f"head_scores[{key!r}] holds a non-finite value at layer {bad[0]}, head "
                    f"{bad[1]} (NaN or inf, or a number too large for float32)"
                )
            array.setflags(write=False)
            checked[key] = array
        return checked

    # --- serialisation ---------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Every field but the score matrices, as plain JSON (what `profile.json` holds)."""
        return {
            "schema_version": self.schema_version,
            "model": self.model.to_dict(),
            "head_set": [list(pair) for pair in self.head_set],
            "knobs": self.knobs.to_dict(),
            "metrics": self.metrics,
            "provenance": self.provenance,
        }

    @classmethod
    def from_dict(
        cls, data: Mapping[str, Any], head_scores: Mapping[str, np.ndarray] | None = None
    ) -> Profile:
        """Rebuild a profile from `to_dict()` output plus its score matrices."""
        fields_ = _known_fields(cls, data, "profile", all_optional=True)
        fields_.pop("head_scores", None)  # matrices never travel in JSON
        for name in ("model", "head_set"):
            if name not in fields_:
                raise ProfileValidationError(f"profile is missing field {name!r}")
        return cls(**fields_, head_scores=dict(head_scores or {}))

    def content_hash(self) -> str:
        """sha256 (hex) over the canonical JSON of every field and every score matrix's bytes.

        Knobs added after the first stored profiles are left out while they hold the value a profile
        without them loads with (`Knobs.ADDED_LATER`), so old profiles keep their hashes.
        """
        digest = hashlib.sha256(b"dysco-profile\0")
        digest.update(canonical_json({**self.to_dict(), "knobs": self.knobs.hashed_dict()}))
        for key in sorted(self.head_scores):
            matrix = np.ascontiguousarray(self.head_scores[key], dtype="<f4")
            digest.update(b"\0" + key.encode("utf-8") + b"\0")
            digest.update(canonical_json(list(matrix.shape)))
            digest.update(matrix.tobytes())
        return digest.hexdigest()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Profile):
            return NotImplemented
        return (
            self.to_dict() == other.to_dict()
            and self.head_scores.keys() == other.head_scores.keys()
            and all(np.array_equal(v, other.head_scores[k]) for k, v in self.head_scores.items())
        )

    __hash__ = None  # type: ignore[assignment]  # mutable dict fields: not usable as a dict key


# Every library a profile's or a result's figures depend on; those not installed are left out.
_PROVENANCE_PACKAGES = ("dysco-toolkit", "torch", "transformers", "numpy", "scipy", "safetensors", "optuna", "mlflow")


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries results depend on (package metadata only: nothing is imported)."""
    versions = {}
    for package in _PROVENANCE_PACKAGES:
        try:
            versions[package] = importlib_metadata.version(package)
        except importlib_metadata.PackageNotFoundError:
            continue
    return versions


def collect_provenance(**fields_: Any) -> dict[str, Any]:
    """A provenance dict with the creation time and library versions filled in, plus `fields_`.

    Usage: `collect_provenance(probe_kind="qr", probe_count=64, probe_length=2048, seed=0,
    study="smollm2-mrcr", mlflow_run_id=run.info.run_id, parent="smollm2-135m@1")`.
    Library versions come from installed package metadata, so nothing heavy is imported.
    """
    provenance: dict[str, Any] = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "library_versions": library_versions(),
    }
    provenance.update(fields_)
    return provenance
