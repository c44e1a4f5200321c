"""Versioned, fingerprinted DySCO profiles: what one model needs for DySCO decoding, stored safely.

Reading a profile needs no torch (numpy, safetensors and JSON only).

    from registry import Registry, check_model
    profile = Registry().load("qwen3-8b")        # the shipped seed until you register one
    profile.head_set[:2], profile.knobs.strength   # → ([(21, 31), (21, 18)], 2.0)
"""

from registry.check import check_model
from registry.errors import (
    InvalidReference,
    ProfileCorrupted,
    ProfileMismatchError,
    ProfileNotFound,
    ProfileValidationError,
    RegistryError,
    UnsafeArchiveError,
)
from registry.profile import (
    SCHEMA_VERSION,
    Knobs,
    ModelIdentity,
    Profile,
    check_knobs,
    collect_provenance,
    library_versions,
    parse_head_set,
    parse_intervention_warmup,
)
from registry.store import Registry, VersionInfo, default_root, load_seed, parse_ref, seed_names

__all__ = [
    "SCHEMA_VERSION",
    "InvalidReference",
    "Knobs",
    "ModelIdentity",
    "Profile",
    "ProfileCorrupted",
    "ProfileMismatchError",
    "ProfileNotFound",
    "ProfileValidationError",
    "Registry",
    "RegistryError",
    "UnsafeArchiveError",
    "VersionInfo",
    "check_knobs",
    "check_model",
    "collect_provenance",
    "library_versions",
    "default_root",
    "load_seed",
    "parse_head_set",
    "parse_intervention_warmup",
    "parse_ref",
    "seed_names",
]
