"""The bytes of one stored profile: `profile.json` (JSON) and `head_scores.safetensors`.

Shared by the store and by archives, so both write and read exactly the same files. Nothing here
unpickles or executes anything: JSON and safetensors only.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from registry.errors import ProfileCorrupted, ProfileValidationError
from registry.profile import Profile

PROFILE_FILE = "profile.json"
SCORES_FILE = "head_scores.safetensors"
VERSION_FILES = (PROFILE_FILE, SCORES_FILE)
SEED = "seed"  # the version label of a profile shipped with the package


def sha256(data: bytes) -> str:
    """Hex sha256 of `data`."""
    return hashlib.sha256(data).hexdigest()


def is_version_name(entry: str) -> bool:
    """True for '1', '2', … (a canonical positive version number), False for '01', '0', 'x'."""
    return entry.isascii() and entry.isdigit() and str(int(entry)) == entry and entry != "0"


def profile_to_files(profile: Profile) -> dict[str, bytes]:
    """{file name: bytes} for `profile`: readable JSON plus the score matrices."""
    text = json.dumps(profile.to_dict(), indent=2, sort_keys=True, allow_nan=False) + "\n"
    matrices = {key: np.ascontiguousarray(m) for key, m in profile.head_scores.items()}
    return {PROFILE_FILE: text.encode("utf-8"), SCORES_FILE: save_safetensors(matrices)}


def profile_from_files(files: dict[str, bytes], where: str) -> Profile:
    """Parse the files of one profile; any failure is `ProfileCorrupted` naming `where/<file>`."""
    try:
        data = json.loads(files[PROFILE_FILE].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ProfileCorrupted(f"{where}/{PROFILE_FILE} is not valid JSON: {err}",
                               f"{where}/{PROFILE_FILE}") from None
    try:
        scores = load_safetensors(files[SCORES_FILE])
    except Exception as err:  # safetensors raises its own SafetensorError, among others
        raise ProfileCorrupted(f"{where}/{SCORES_FILE} is not a valid safetensors file: {err}",
                               f"{where}/{SCORES_FILE}") from None
    try:
        return Profile.from_dict(data, scores)
    except ProfileValidationError as err:
        # The score matrices live in the safetensors file: a NaN or a wrong shape is that file's fault.
        bad = SCORES_FILE if str(err).startswith("head_scores") else PROFILE_FILE
        raise ProfileCorrupted(f"{where}/{bad} holds an invalid profile: {err}", f"{where}/{bad}") from None
