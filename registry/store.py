"""The on-disk registry: immutable numbered profile versions per model, tags, export and import.

    from registry import Registry
    reg = Registry("/tmp/my-registry")         # default: $DYSCO_REGISTRY or the user data dir
    ref = reg.register(profile, tags=["prod"])  # 'smollm2-135m@1'
    reg.load("smollm2-135m@prod") == profile   # → True

Layout (one directory per version, never modified after it appears):

    <root>/<name>/<N>/manifest.json              format, name, content hash, time, file checksums
    <root>/<name>/<N>/profile.json               the profile without its matrices (JSON)
    <root>/<name>/<N>/head_scores.safetensors    the score matrices
    <root>/<name>/tags/<tag>.json                {"version": N}; replaced atomically
    <root>/<name>/.incoming-<host>-<pid>-<rand>/ a version being written; invisible, cleaned later

A model name `org/model` is stored as the directory `org--model`.

References: `name` and `name@latest` mean the highest *intact* version; `name@3` a version number;
`name@prod` a tag; `name@3fa9c2…` a prefix (6+ hex characters) of a version's content hash, which
survives export and import; `name@seed` the profile shipped with the package. Seed rule: when the
store holds no version of `name` at all, `name` and `name@latest` resolve to its seed (if one is
shipped); as soon as one version is registered, they resolve to the store.

Writing a version: the files go into a private staging directory inside `<root>/<name>/`, each
fsynced, and the version number is claimed by renaming that directory to `<N>`; rename is atomic
and fails if `<N>` exists, in which case the next number is tried. Readers therefore see a version
completely or not at all, and two writers never share a number.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import socket
import time
import uuid
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from registry.archive import ArchiveEntry, read_archive, write_archive
from registry.errors import (
    InvalidReference,
    ProfileCorrupted,
    ProfileNotFound,
    ProfileValidationError,
    RegistryError,
)
from registry.files import (
    PROFILE_FILE,
    SCORES_FILE,
    SEED,
    VERSION_FILES,
    is_version_name,
    profile_from_files,
    profile_to_files,
    sha256,
)
from registry.locking import folder_lock
from registry.profile import Profile, canonical_json, validate_model_name

ENV_VAR = "DYSCO_REGISTRY"
FORMAT = "dysco-registry/1"
MANIFEST_FILE = "manifest.json"
LATEST = "latest"
HASH_PREFIX_MIN = 6

_STAGING_PREFIX = ".incoming-"
_STALE_AFTER_S = 24 * 3600  # staging dirs of another host (or unknown pid) older than this go
_SELECTOR_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_HEX_RE = re.compile(r"^[0-9a-f]+$")
_TAG_RE = re.compile(r"^[A-Za-z][A-Za-z0-9._-]{0,63}$")


def default_root() -> Path:
    """The registry's home: `$DYSCO_REGISTRY`, else `<user data dir>/dysco-toolkit/registry`."""
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir("dysco-toolkit", appauthor=False)) / "registry"


def parse_ref(ref: str) -> tuple[str, str | None]:
    """Split `name@selector` into (name, selector or None); `InvalidReference` if malformed."""
    if not isinstance(ref, str) or not ref.strip():
        raise InvalidReference(f"a profile reference must be a non-empty string, got {ref!r}")
    name, at, selector = ref.partition("@")
    usage = "use name, name@latest, name@3, name@<tag>, name@<hash prefix> or name@seed"
    if at and "@" in selector:
        raise InvalidReference(f"profile reference {ref!r} has more than one '@'; {usage}")
    try:
        validate_model_name(name)
    except ProfileValidationError as err:
        raise InvalidReference(f"profile reference {ref!r}: {err}") from None
    if not at:
        return name, None
    if not selector or not _SELECTOR_RE.match(selector):
        raise InvalidReference(
            f"profile reference {ref!r} has an invalid part after '@' ({selector!r}); {usage}"
        )
    return name, selector


def _check_tag_name(tag: str) -> str:
    if not isinstance(tag, str) or not _TAG_RE.match(tag):
        raise ProfileValidationError(
            f"tag {tag!r} is not accepted: start with a letter, then up to 63 letters, digits, "
            "'.', '_' or '-' (e.g. 'prod', 'best-mrcr')"
        )
    if tag in (LATEST, SEED):
        raise ProfileValidationError(f"tag {tag!r} is reserved; choose another name")
    if len(tag) >= HASH_PREFIX_MIN and _HEX_RE.match(tag.lower()):
        raise ProfileValidationError(
            f"tag {tag!r} looks like a content-hash prefix (only hex digits); choose a name with "
            "another letter in it"
        )
    return tag


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms that cannot open directories (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_durable(path: Path, data: bytes) -> None:
    with open(path, "xb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _pid_alive(pid: int) -> bool | None:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OSError, ValueError, OverflowError):
        return None
    return True


def _host_label() -> str:
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"


def _manifest_checksum(manifest: dict[str, Any]) -> str:
    return sha256(canonical_json({k: v for k, v in manifest.items() if k != "manifest_sha256"}))


@dataclass(frozen=True)
class VersionInfo:
    """One row of `Registry.list()`: a stored version (or a shipped seed) and its health."""

    name: str
    version: int | str  # a number, or "seed"
    status: str  # "ok" or "corrupt"
    content_hash: str | None = None
    tags: tuple[str, ...] = ()
    registered_at: str | None = None
    head_set_size: int | None = None
    problem: str | None = None

    @property
    def ref(self) -> str:
        """The exact reference of this version, e.g. 'qwen3-8b@2'."""
        return f"{self.name}@{self.version}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (for `--json`)."""
        return {
            "ref": self.ref, "name": self.name, "version": self.version, "status": self.status,
            "content_hash": self.content_hash, "tags": list(self.tags),
            "registered_at": self.registered_at, "head_set_size": self.head_set_size,
            "problem": self.problem,
        }


# --- seeds shipped with the package --------------------------------------------------------------


def seed_names() -> list[str]:
    """Names of the profiles shipped in `registry/seeds/`."""
    folder = resources.files("registry") / "seeds"
    if not folder.is_dir():
        return []
    return sorted(p.name[: -len(".json")] for p in folder.iterdir() if p.name.endswith(".json"))


def load_seed(name: str) -> Profile:
    """The shipped seed profile `name` (published head set and knobs)."""
    if name not in seed_names():
        raise ProfileNotFound(
            f"no seed profile named {name!r}; seeds: {', '.join(seed_names()) or 'none'}"
        )
    where = f"registry/seeds/{name}.json"
    raw = (resources.files("registry") / "seeds" / f"{name}.json").read_bytes()
    try:
        return Profile.from_dict(json.loads(raw.decode("utf-8")))
    except (UnicodeDecodeError, json.JSONDecodeError, ProfileValidationError) as err:
        raise ProfileCorrupted(f"shipped seed {where} is invalid: {err}", where) from None


# --- the store ------------------------------------------------------------------------------------


def _archive_target(archive_path: str | os.PathLike[str]) -> Path:
    """The file an export writes, checked before anything is written (its temp file goes beside it)."""
    path = Path(archive_path).expanduser()
    if path.is_dir():
        raise RegistryError(f"{path} is a folder; give the archive's file name, e.g. {path / 'profiles.tar.gz'}")
    if not path.parent.is_dir():
        raise RegistryError(f"cannot write {path}: folder {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK):
        raise RegistryError(f"cannot write {path}: folder {path.parent} is not writable")
    return path


class Registry:
    """A directory of versioned profiles. See the module docstring for layout and references."""

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.root = Path(root).expanduser() if root is not None else default_root()
        if self.root.exists() and not self.root.is_dir():
            raise RegistryError(f"registry {self.root} is a file, not a folder; give a folder (it is created if missing)")

    def __repr__(self) -> str:
        return f"Registry({str(self.root)!r})"

    # paths and listings

    def _name_dir(self, name: str) -> Path:
        return self.root / name.replace("/", "--")

    def _version_dir(self, name: str, version: int) -> Path:
        return self._name_dir(name) / str(version)

    def names(self, include_seeds: bool = True) -> list[str]:
        """Model names with at least one stored version (plus shipped seeds unless told not to)."""
        found = set(seed_names()) if include_seeds else set()
        if self.root.is_dir():
            for entry in self.root.iterdir():
                if entry.is_dir() and not entry.name.startswith("."):
                    name = entry.name.replace("--", "/")
                    if self.versions(name):
                        found.add(name)
        return sorted(found)

    def versions(self, name: str) -> list[int]:
        """Stored version numbers of `name`, ascending (intact or not)."""
        folder = self._name_dir(name)
        if not folder.is_dir():
            return []
        return sorted(
            int(e.name) for e in folder.iterdir() if is_version_name(e.name) and e.is_dir()
        )

    def tags(self, name: str) -> dict[str, int]:
        """User tags of `name` and the version each points to."""
        folder = self._name_dir(name) / "tags"
        found: dict[str, int] = {}
        if not folder.is_dir():
            return found
        for entry in sorted(folder.iterdir()):
            if entry.name.startswith(".") or not entry.name.endswith(".json"):
                continue
            try:
                version = json.loads(entry.read_text())["version"]
            except (OSError, ValueError, KeyError, TypeError):
                warnings.warn(f"ignoring unreadable tag file {entry}", stacklevel=2)
                continue
            if isinstance(version, int) and not isinstance(version, bool):
                found[entry.name[: -len(".json")]] = version
        return found

    # reading

    def _read_manifest(self, name: str, version: int) -> dict[str, Any]:
        folder = self._version_dir(name, version)
        path = folder / MANIFEST_FILE
        ref = f"{name}@{version}"
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise ProfileCorrupted(f"{ref}: {path} is missing", str(path)) from None
        try:
            manifest = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ProfileCorrupted(f"{ref}: {path} is not valid JSON ({err})", str(path)) from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise ProfileCorrupted(f"{ref}: {path} is not a {FORMAT} manifest", str(path))
        if manifest.get("manifest_sha256") != _manifest_checksum(manifest):
            raise ProfileCorrupted(
                f"{ref}: checksum mismatch in {path}: the manifest was changed after it was "
                "registered", str(path)
            )
        if manifest.get("name") != name:
            raise ProfileCorrupted(
                f"{ref}: {path} belongs to {manifest.get('name')!r}, not {name!r}", str(path)
            )
        return manifest

    def _read_version(self, name: str, version: int) -> tuple[Profile, dict[str, Any]]:
        """Read and verify one stored version; raise `ProfileCorrupted` naming the bad file."""
        folder = self._version_dir(name, version)
        ref = f"{name}@{version}"
        if not folder.is_dir():
            raise ProfileNotFound(f"{ref} does not exist in {self.root}")
        manifest = self._read_manifest(name, version)
        files = manifest.get("files")
        if not isinstance(files, dict) or set(files) != set(VERSION_FILES):
            raise ProfileCorrupted(
                f"{ref}: {folder / MANIFEST_FILE} must list exactly {', '.join(VERSION_FILES)}",
                str(folder / MANIFEST_FILE),
            )
        contents: dict[str, bytes] = {}
        for file_name in VERSION_FILES:
            path = folder / file_name
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                raise ProfileCorrupted(f"{ref}: {path} is missing", str(path)) from None
            if sha256(data) != files[file_name]:
                raise ProfileCorrupted(
                    f"{ref}: checksum mismatch in {path} (expected sha256 {files[file_name]}, "
                    f"found {sha256(data)}): the file was changed after it was registered",
                    str(path),
                )
            contents[file_name] = data
        profile = profile_from_files(contents, str(folder))
        if profile.content_hash() != manifest.get("content_hash"):
            raise ProfileCorrupted(
                f"{ref}: the profile's content hash differs from the one in "
                f"{folder / MANIFEST_FILE}", str(folder / MANIFEST_FILE)
            )
        return profile, manifest

    def _latest_intact(self, name: str) -> tuple[int, Profile]:
        versions = self.versions(name)
        problems = []
        for version in reversed(versions):
            try:
                profile, _ = self._read_version(name, version)
            except ProfileCorrupted as err:
                warnings.warn(f"skipping corrupt version: {err}", stacklevel=3)
                problems.append(str(err))
                continue
            return version, profile
        raise ProfileCorrupted(
            f"every stored version of {name!r} is corrupt: {'; '.join(problems)}"
        )

    def _not_found(self, name: str) -> ProfileNotFound:
        known = self.names()
        return ProfileNotFound(
            f"no profile named {name!r} in registry {self.root} and no seed of that name; "
            f"known: {', '.join(known) or 'none'}"
        )

    def _by_hash(self, name: str, prefix: str) -> int | None:
        matches: dict[str, int] = {}
        for version in self.versions(name):
            try:
                content_hash = self._read_manifest(name, version).get("content_hash", "")
            except ProfileCorrupted:
                continue
            if isinstance(content_hash, str) and content_hash.startswith(prefix):
                matches[content_hash] = max(version, matches.get(content_hash, 0))
        if len(matches) > 1:
            raise InvalidReference(
                f"{name}@{prefix} is ambiguous: it prefixes the hashes of versions "
                f"{sorted(matches.values())}; give more characters"
            )
        return next(iter(matches.values()), None)

    def _resolve(self, ref: str) -> tuple[str, int | str, Profile | None]:
        name, selector = parse_ref(ref)
        versions = self.versions(name)
        if selector == SEED:
            if name not in seed_names():
                raise ProfileNotFound(
                    f"{ref}: no seed profile named {name!r}; seeds: {', '.join(seed_names())}"
                )
            return name, SEED, None
        if selector is None or selector == LATEST:
            if not versions:
                if name in seed_names():
                    return name, SEED, None
                raise self._not_found(name)
            version, profile = self._latest_intact(name)
            return name, version, profile
        if not versions:
            raise self._not_found(name)
        if selector.isdigit() and int(selector) in versions:
            return name, int(selector), None
        tags = self.tags(name)
        if selector in tags:
            if tags[selector] not in versions:
                raise ProfileNotFound(
                    f"{ref}: tag {selector!r} points to version {tags[selector]}, which no "
                    f"longer exists (versions: {versions})"
                )
            return name, tags[selector], None
        lowered = selector.lower()
        if len(lowered) >= HASH_PREFIX_MIN and _HEX_RE.match(lowered):
            version = self._by_hash(name, lowered)
            if version is not None:
                return name, version, None
        if selector.isdigit() and len(selector) < HASH_PREFIX_MIN:
            raise ProfileNotFound(f"{name} has no version {selector} (versions: {versions})")
        raise ProfileNotFound(
            f"{ref}: {name} has no version, tag or content hash {selector!r} "
            f"(versions: {versions}; tags: {', '.join(sorted(tags)) or 'none'}; "
            f"a hash prefix needs at least {HASH_PREFIX_MIN} hex characters)"
        )

    def resolve(self, ref: str) -> tuple[str, int | str]:
        """Turn a reference into (name, version number), or (name, "seed") for a shipped seed."""
        name, version, _ = self._resolve(ref)
        return name, version

    def load(self, ref: str) -> Profile:
        """Load and verify the profile `ref` names (see the module docstring for the forms)."""
        name, version, profile = self._resolve(ref)
        if profile is not None:
            return profile
        if version == SEED:
            return load_seed(name)
        return self._read_version(name, int(version))[0]

    def list(self, name: str | None = None) -> list[VersionInfo]:
        """Every stored version (and seed), corrupt ones marked instead of raising."""
        if name is not None:
            validate_model_name(name)
            if not self.versions(name) and name not in seed_names():
                raise self._not_found(name)
        rows: list[VersionInfo] = []
        for each in [name] if name is not None else self.names():
            tags_by_version: dict[int, list[str]] = {}
            for tag, version in self.tags(each).items():
                tags_by_version.setdefault(version, []).append(tag)
            if each in seed_names():
                seed = load_seed(each)
                rows.append(VersionInfo(
                    each, SEED, "ok", seed.content_hash(), (), None, len(seed.head_set)
                ))
            for version in self.versions(each):
                tags = tuple(sorted(tags_by_version.get(version, ())))
                try:
                    profile, manifest = self._read_version(each, version)
                except ProfileCorrupted as err:
                    rows.append(VersionInfo(each, version, "corrupt", tags=tags, problem=str(err)))
                    continue
                rows.append(VersionInfo(
                    each, version, "ok", manifest["content_hash"], tags,
                    manifest.get("registered_at"), len(profile.head_set),
                ))
        return rows

    # writing

    def _clean_stale_staging(self, folder: Path) -> None:
        """Remove staging dirs left by writers that died (their pid is gone, or they are old)."""
        here = _host_label()
        for entry in folder.iterdir():
            if not entry.name.startswith(_STAGING_PREFIX):
                continue
            host, _, rest = entry.name[len(_STAGING_PREFIX):].rpartition("-")[0].rpartition("-")
            alive = None
            if host == here and rest.isdigit():
                alive = _pid_alive(int(rest))
            try:
                old = time.time() - entry.stat().st_mtime > _STALE_AFTER_S
            except FileNotFoundError:
                continue
            if alive is False or (alive is None and old):
                shutil.rmtree(entry, ignore_errors=True)

    def _stage(self, folder: Path, profile: Profile) -> Path:
        """Write a complete version into a private staging dir; return that dir."""
        staging = folder / f"{_STAGING_PREFIX}{_host_label()}-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        staging.mkdir()
        try:
            files = profile_to_files(profile)
            for file_name in (SCORES_FILE, PROFILE_FILE):
                _write_durable(staging / file_name, files[file_name])
            manifest: dict[str, Any] = {
                "format": FORMAT,
                "name": profile.model.name,
                "content_hash": profile.content_hash(),
                "registered_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "files": {file_name: sha256(data) for file_name, data in files.items()},
            }
            self._write_manifest(staging, manifest)
            _fsync_dir(staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return staging

    @staticmethod
    def _write_manifest(staging: Path, manifest: dict[str, Any]) -> None:
        manifest["manifest_sha256"] = _manifest_checksum(manifest)
        data = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
        _write_durable(staging / MANIFEST_FILE, data.encode())

    def _claim_version(self, folder: Path, staging: Path) -> int:
        """Rename `staging` to the next free version number; retry on collision."""
        for _ in range(100_000):
            taken = [int(e.name) for e in folder.iterdir() if is_version_name(e.name)]
            version = max(taken, default=0) + 1
            target = folder / str(version)
            if target.exists():
                continue
            try:
                os.rename(staging, target)
            except OSError as err:
                if err.errno in (errno.EEXIST, errno.ENOTEMPTY) or target.exists():
                    continue
                raise
            _fsync_dir(folder)
            return version
        raise RegistryError(f"could not claim a version number in {folder}")

    def register(self, profile: Profile, tags: Iterable[str] = ()) -> str:
        """Store `profile` as the next version of its model's name; return its ref, e.g. 'm@3'."""
        if not isinstance(profile, Profile):
            raise ProfileValidationError(
                f"register() takes a registry.Profile, got {type(profile).__name__}"
            )
        tags = [_check_tag_name(tag) for tag in tags]
        # Validate again: a Profile is validated when built, but its dicts can be edited since.
        profile = Profile.from_dict(profile.to_dict(), profile.head_scores)
        folder = self._name_dir(profile.model.name)
        folder.mkdir(parents=True, exist_ok=True)
        self._clean_stale_staging(folder)
        staging = self._stage(folder, profile)
        try:
            version = self._claim_version(folder, staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        for tag in tags:
            self._write_tag(profile.model.name, tag, version)
        return f"{profile.model.name}@{version}"

    def _write_tag(self, name: str, tag: str, version: int) -> None:
        folder = self._name_dir(name) / "tags"
        folder.mkdir(parents=True, exist_ok=True)
        temp = folder / f".tag-{uuid.uuid4().hex}"
        _write_durable(temp, canonical_json({"version": version}))
        os.replace(temp, folder / f"{tag}.json")
        _fsync_dir(folder)

    def tag(self, ref: str, tag: str) -> str:
        """Point `tag` at the version `ref` resolves to (moving it if set); return that ref."""
        _check_tag_name(tag)
        name, version, _ = self._resolve(ref)
        if version == SEED:
            raise ProfileValidationError(
                f"{ref} is a shipped seed; tags point to stored versions. Store it first: "
                f"Registry.register(Registry.load({name + '@seed'!r})), or `dysco registry "
                f"export {name}@seed seed.tar.gz` then `dysco registry import seed.tar.gz`"
            )
        self._read_version(name, int(version))  # never tag a corrupt version
        self._write_tag(name, tag, int(version))
        return f"{name}@{version}"

    def untag(self, name: str, tag: str) -> None:
        """Remove a user tag from `name`."""
        validate_model_name(name)
        path = self._name_dir(name) / "tags" / f"{tag}.json"
        if not _TAG_RE.match(tag) or not path.is_file():
            raise ProfileNotFound(
                f"{name} has no tag {tag!r} (tags: {', '.join(self.tags(name)) or 'none'})"
            )
        path.unlink()

    # comparing

    def diff(self, a: str, b: str) -> dict[str, Any]:
        """Two profiles side by side: what differs in identity, knobs, heads, scores, metrics.

        Returns a JSON-ready dict with keys `a`, `b` (resolved refs), `identical`, `content_hash`,
        `model`, `knobs`, `metrics`, `provenance` (each {field: {"a": …, "b": …}} for changed
        fields only), `head_set` (lists and set differences) and `head_scores`
        ({key: {"status": same|changed|only_a|only_b, "max_abs_diff": float|None}}).
        """
        refs = []
        profiles = []
        for ref in (a, b):
            name, version, _ = self._resolve(ref)
            refs.append(f"{name}@{version}")
            profiles.append(self.load(f"{name}@{version}"))
        pa, pb = profiles

        def changed(da: dict[str, Any], db: dict[str, Any]) -> dict[str, Any]:
            return {
                key: {"a": da.get(key), "b": db.get(key)}
                for key in sorted(set(da) | set(db))
                if da.get(key) != db.get(key) or (key in da) != (key in db)
            }

        scores: dict[str, Any] = {}
        for key in sorted(set(pa.head_scores) | set(pb.head_scores)):
            if key not in pb.head_scores:
                scores[key] = {"status": "only_a", "max_abs_diff": None}
            elif key not in pa.head_scores:
                scores[key] = {"status": "only_b", "max_abs_diff": None}
            else:
                if pa.head_scores[key].shape != pb.head_scores[key].shape:
                    scores[key] = {"status": "changed", "max_abs_diff": None}
                    continue
                gap = float(np.max(np.abs(pa.head_scores[key] - pb.head_scores[key])))
                scores[key] = {"status": "same" if gap == 0 else "changed", "max_abs_diff": gap}
        set_a, set_b = set(pa.head_set), set(pb.head_set)
        return {
            "a": refs[0],
            "b": refs[1],
            "identical": pa.content_hash() == pb.content_hash(),
            "content_hash": {"a": pa.content_hash(), "b": pb.content_hash()},
            "model": changed(pa.model.to_dict(), pb.model.to_dict()),
            "knobs": changed(pa.knobs.to_dict(), pb.knobs.to_dict()),
            "head_set": {
                "a": [list(p) for p in pa.head_set],
                "b": [list(p) for p in pb.head_set],
                "only_a": [list(p) for p in pa.head_set if p not in set_b],
                "only_b": [list(p) for p in pb.head_set if p not in set_a],
                "common": len(set_a & set_b),
                "same_order": pa.head_set == pb.head_set,
            },
            "head_scores": scores,
            "metrics": changed(pa.metrics, pb.metrics),
            "provenance": changed(pa.provenance, pb.provenance),
        }

    # sharing

    def export(self, ref_or_name: str, archive_path: str | os.PathLike[str]) -> list[str]:
        """Write one tar.gz holding `ref` (one version) or every intact version of a bare name.

        Corrupt versions of a bare name are skipped with a warning. Returns the refs exported.
        The archive lists a sha256 for each file; `import_archive` checks them.
        """
        if "@" in ref_or_name:
            name, version, _ = self._resolve(ref_or_name)
            chosen: list[int | str] = [version]
        else:
            name, _ = parse_ref(ref_or_name)
            chosen = list(self.versions(name))
            if not chosen and name in seed_names():
                chosen = [SEED]
            if not chosen:
                raise self._not_found(name)
        tags = self.tags(name)
        entries = []
        for version in chosen:
            try:
                profile = self.load(f"{name}@{version}")
            except ProfileCorrupted as err:
                if len(chosen) == 1:
                    raise
                warnings.warn(f"not exporting corrupt version: {err}", stacklevel=2)
                continue
            version_tags = sorted(t for t, v in tags.items() if v == version)
            entries.append(ArchiveEntry(profile, name, version, tuple(version_tags)))
        if not entries:
            raise ProfileCorrupted(f"nothing to export: every version of {name!r} is corrupt")
        write_archive(_archive_target(archive_path), entries)
        return [entry.ref for entry in entries]

    def import_archive(self, path: str | os.PathLike[str]) -> list[str]:
        """Verify an archive made by `export` and register its profiles; return their refs here.

        Every check (see `registry.archive.read_archive`) passes before anything is written. A
        profile whose content hash is already stored under its name is not duplicated (its
        existing ref is returned). Version numbers are local to a store, so imported profiles
        take the next free numbers; `name@<hash prefix>` finds them in any store. Tags in the
        archive are informational and not applied.
        """
        refs = []
        for entry in read_archive(Path(path)):
            profile = entry.profile
            # The look-up and the registration are one critical section per model: concurrent imports
            # of one archive otherwise all find the content missing and store it under several versions.
            with folder_lock(self._name_dir(profile.model.name)):
                existing = self._by_hash(profile.model.name, profile.content_hash())
                if existing is not None:
                    refs.append(f"{profile.model.name}@{existing}")
                else:
                    refs.append(self.register(profile))
        return refs
