"""One-file archives of profiles (tar.gz), and reading untrusted ones safely.

Layout of an archive:

    archive.json                  {"format", "entries": [{dir, name, version, tags, content_hash,
                                                          files: {file name: sha256}}]}
    <n>/profile.json              n = 1, 2, … one directory per exported profile
    <n>/head_scores.safetensors

Reading never extracts to disk: members are read into memory after their header passes a
whitelist (relative names of exactly that shape, plain files only, bounded sizes, listed in the
index, which comes first: an unlisted member is refused before any of its bytes is read), then checked
against the sha256 in `archive.json` and the profile's content hash, then parsed as JSON and
safetensors and validated. Any problem refuses the whole archive.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import re
import tarfile
import uuid
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from registry.errors import ProfileCorrupted, ProfileNotFound, UnsafeArchiveError
from registry.files import (
    PROFILE_FILE,
    SCORES_FILE,
    VERSION_FILES,
    is_version_name,
    profile_from_files,
    profile_to_files,
    sha256,
)
from registry.profile import Profile

ARCHIVE_FORMAT = "dysco-registry-archive/1"
ARCHIVE_INDEX = "archive.json"
_MEMBER_RE = re.compile(r"^([1-9][0-9]{0,5})/(profile\.json|head_scores\.safetensors)$")
_MAX_FILE = 256 * 2**20
_MAX_TOTAL = 1024 * 2**20
_MAX_MEMBERS = 30_000


@dataclass(frozen=True)
class ArchiveEntry:
    """One profile in an archive, with the name, version and tags it had where it was exported."""

    profile: Profile
    name: str
    version: int | str
    tags: tuple[str, ...] = ()

    @property
    def ref(self) -> str:
        """The reference it had in the exporting store, e.g. 'qwen3-8b@2'."""
        return f"{self.name}@{self.version}"


def write_archive(path: Path, entries: list[ArchiveEntry]) -> None:
    """Write `entries` to the tar.gz `path` atomically; same entries give the same bytes."""
    files: dict[str, bytes] = {}
    index_entries = []
    for slot, entry in enumerate(entries, start=1):
        payload = profile_to_files(entry.profile)
        for file_name, data in payload.items():
            files[f"{slot}/{file_name}"] = data
        index_entries.append({
            "dir": str(slot), "name": entry.name, "version": entry.version,
            "tags": list(entry.tags), "content_hash": entry.profile.content_hash(),
            "files": {file_name: sha256(data) for file_name, data in payload.items()},
        })
    index = {"format": ARCHIVE_FORMAT, "entries": index_entries}
    files = {ARCHIVE_INDEX: json.dumps(index, indent=2, sort_keys=True).encode(), **files}

    temp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.partial")
    try:
        with open(temp, "wb") as raw:
            # No file name and mtime 0 in the gzip and tar headers: reproducible bytes.
            with gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0) as zipped:
                with tarfile.open(fileobj=zipped, mode="w", format=tarfile.PAX_FORMAT) as tar:
                    for member_name, data in files.items():
                        info = tarfile.TarInfo(member_name)
                        info.size, info.mode, info.mtime = len(data), 0o644, 0
                        tar.addfile(info, io.BytesIO(data))
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def read_archive(path: Path) -> list[ArchiveEntry]:
    """Read and verify every entry of an archive made by `write_archive`; write nothing.

    Raises `UnsafeArchiveError` for anything outside the layout (absolute paths, '..', links,
    devices, unexpected or unlisted files) and `ProfileCorrupted` for checksum or content
    mismatches and invalid profiles, naming the member.
    """
    label = path.name
    index, members = _read_members(path)  # every member it returns is listed in the index
    entries = []
    for item in index["entries"]:
        slot, checksums = item["dir"], item["files"]
        for file_name in VERSION_FILES:
            member = f"{slot}/{file_name}"
            if member not in members:
                raise UnsafeArchiveError(f"{label}: {member} is listed but missing")
            if sha256(members[member]) != checksums[file_name]:
                raise ProfileCorrupted(
                    f"{label}: checksum mismatch in {member} (expected sha256 "
                    f"{checksums[file_name]}, found {sha256(members[member])})",
                    f"{label}:{member}",
                )
        profile = profile_from_files(
            {f: members[f"{slot}/{f}"] for f in VERSION_FILES}, f"{label}:{slot}"
        )
        if profile.content_hash() != item.get("content_hash"):
            raise ProfileCorrupted(
                f"{label}: entry {slot} does not match its content hash in {ARCHIVE_INDEX}",
                f"{label}:{slot}",
            )
        tags = item.get("tags") if isinstance(item.get("tags"), list) else []
        entries.append(ArchiveEntry(
            profile, profile.model.name, item.get("version", "?"),
            tuple(t for t in tags if isinstance(t, str)),
        ))
    return entries


def _parse_index(label: str, data: bytes) -> dict:
    """The archive's index, checked to be a well-formed `ARCHIVE_FORMAT` index (each entry's dir and files)."""
    try:
        index = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ProfileCorrupted(f"{label}: {ARCHIVE_INDEX} is not valid JSON: {err}",
                               f"{label}:{ARCHIVE_INDEX}") from None
    if not (isinstance(index, dict) and index.get("format") == ARCHIVE_FORMAT
            and isinstance(index.get("entries"), list)):
        raise UnsafeArchiveError(f"{label}: {ARCHIVE_INDEX} is not a {ARCHIVE_FORMAT} index")
    for item in index["entries"]:
        slot = item.get("dir") if isinstance(item, dict) else None
        checksums = item.get("files") if isinstance(item, dict) else None
        if not (isinstance(slot, str) and is_version_name(slot) and isinstance(checksums, dict)
                and set(checksums) == set(VERSION_FILES)):
            raise UnsafeArchiveError(f"{label}: malformed entry in {ARCHIVE_INDEX}: {item!r}")
    return index


def _read_members(path: Path) -> tuple[dict, dict[str, bytes]]:
    """The index and every member's bytes, refusing anything but plain files with whitelisted relative
    names that the index lists. The index comes first (as `write_archive` writes it), so an unlisted
    member is refused from its header, before a byte of it is read."""
    label = path.name
    if not path.is_file():
        raise ProfileNotFound(f"archive {path} does not exist")
    members: dict[str, bytes] = {}
    index: dict | None = None
    listed: set[str] = set()
    total = 0
    try:
        with tarfile.open(path, mode="r:gz") as tar:
            for count, member in enumerate(tar, start=1):
                if count > _MAX_MEMBERS:
                    raise UnsafeArchiveError(f"{label}: more than {_MAX_MEMBERS} members")
                name = member.name
                if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
                    raise UnsafeArchiveError(f"{label}: refusing absolute path {name!r}")
                if ".." in PurePosixPath(name.replace("\\", "/")).parts:
                    raise UnsafeArchiveError(f"{label}: refusing path with '..': {name!r}")
                if member.issym() or member.islnk():
                    raise UnsafeArchiveError(
                        f"{label}: refusing link {name!r} -> {member.linkname!r}"
                    )
                if member.isdir():
                    if is_version_name(name.rstrip("/")):
                        continue  # a folder for one entry, as other tar tools write them
                    raise UnsafeArchiveError(f"{label}: unexpected directory {name!r}")
                if not member.isfile():
                    raise UnsafeArchiveError(
                        f"{label}: refusing {name!r}: not a regular file (device, fifo or other)"
                    )
                if name != ARCHIVE_INDEX and not _MEMBER_RE.match(name):
                    raise UnsafeArchiveError(
                        f"{label}: unexpected file {name!r}; an archive holds only "
                        f"{ARCHIVE_INDEX} and <n>/{PROFILE_FILE}, <n>/{SCORES_FILE}"
                    )
                if name in members:
                    raise UnsafeArchiveError(f"{label}: {name!r} appears twice")
                if index is None and name != ARCHIVE_INDEX:
                    raise UnsafeArchiveError(
                        f"{label}: {name!r} comes before {ARCHIVE_INDEX}; an archive made by `dysco registry "
                        f"export` begins with its index"
                    )
                if index is not None and name not in listed:
                    raise UnsafeArchiveError(f"{label}: unexpected file {name!r} not listed in {ARCHIVE_INDEX}")
                if member.size > _MAX_FILE or total + member.size > _MAX_TOTAL:
                    raise UnsafeArchiveError(f"{label}: {name!r} is too large")
                handle = tar.extractfile(member)
                data = handle.read(member.size + 1) if handle is not None else b""
                if len(data) != member.size:
                    raise UnsafeArchiveError(f"{label}: {name!r} is truncated")
                total += len(data)
                members[name] = data
                if name == ARCHIVE_INDEX:
                    index = _parse_index(label, data)
                    listed = {f"{item['dir']}/{f}" for item in index["entries"] for f in VERSION_FILES}
    except (tarfile.TarError, EOFError, OSError) as err:  # BadGzipFile is an OSError
        raise UnsafeArchiveError(f"{label}: not a readable tar.gz archive ({err})") from None
    if index is None:
        raise UnsafeArchiveError(f"{label}: no {ARCHIVE_INDEX}; not a dysco registry archive")
    return index, members
