"""Registry export/import: round trip; crafted untrusted archives refused, nothing written."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest

from registry import (
    ProfileCorrupted,
    ProfileNotFound,
    Registry,
    UnsafeArchiveError,
)
from test_registry import make_profile


@pytest.fixture()
def exported(tmp_path) -> tuple[Registry, Path]:
    """A source registry with two versions of tiny-llama exported to one archive."""
    source = Registry(tmp_path / "source")
    source.register(make_profile(0))
    source.register(make_profile(1), tags=["prod"])
    archive = tmp_path / "tiny.tar.gz"
    assert source.export("tiny-llama", archive) == ["tiny-llama@1", "tiny-llama@2"]
    return source, archive


def read_members(archive: Path) -> dict[str, bytes]:
    with tarfile.open(archive, "r:gz") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}


def write_archive(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def file_member(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), data


def special_member(name: str, kind: bytes, linkname: str = "") -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info, None


def test_export_import_round_trip_keeps_content_hashes(tmp_path, exported):
    source, archive = exported
    target = Registry(tmp_path / "target")
    target.register(make_profile(7))  # numbers are local: imports take the next ones
    assert target.import_archive(archive) == ["tiny-llama@2", "tiny-llama@3"]
    for original, imported in [("tiny-llama@1", "tiny-llama@2"), ("tiny-llama@2", "tiny-llama@3")]:
        profile = source.load(original)
        assert target.load(imported) == profile
        assert target.resolve(f"tiny-llama@{profile.content_hash()[:8]}") == (
            "tiny-llama", int(imported.split("@")[1]))
    assert target.tags("tiny-llama") == {}  # tags are informational only
    assert target.import_archive(archive) == ["tiny-llama@2", "tiny-llama@3"]  # no duplicates
    assert target.versions("tiny-llama") == [1, 2, 3]


def test_export_of_one_version_and_determinism(tmp_path, exported):
    source, _ = exported
    one, again = tmp_path / "one.tar.gz", tmp_path / "again.tar.gz"
    assert source.export("tiny-llama@prod", one) == ["tiny-llama@2"]
    source.export("tiny-llama@2", again)
    assert one.read_bytes() == again.read_bytes()
    index = json.loads(read_members(one)["archive.json"])
    assert [(e["name"], e["version"], e["tags"]) for e in index["entries"]] == [
        ("tiny-llama", 2, ["prod"])]
    with pytest.raises(ProfileNotFound):
        source.export("ghost", tmp_path / "ghost.tar.gz")
    assert not (tmp_path / "ghost.tar.gz").exists()


def test_export_skips_corrupt_versions_of_a_name_with_a_warning(tmp_path, exported):
    source, _ = exported
    scores = source.root / "tiny-llama" / "1" / "head_scores.safetensors"
    scores.write_bytes(scores.read_bytes()[:-1] + b"\0")
    with pytest.warns(UserWarning, match="not exporting corrupt version"):
        assert source.export("tiny-llama", tmp_path / "ok.tar.gz") == ["tiny-llama@2"]
    with pytest.raises(ProfileCorrupted, match="head_scores.safetensors"):
        source.export("tiny-llama@1", tmp_path / "bad.tar.gz")


def _valid(exported_archive: Path) -> list[tuple[tarfile.TarInfo, bytes]]:
    return [file_member(name, data) for name, data in read_members(exported_archive).items()]


def _reindexed(members: dict[str, bytes]) -> dict[str, bytes]:
    """Rewrite archive.json's checksums to match edited members (an attacker can do this)."""
    index = json.loads(members["archive.json"])
    for entry in index["entries"]:
        for file_name in entry["files"]:
            data = members[f"{entry['dir']}/{file_name}"]
            entry["files"][file_name] = hashlib.sha256(data).hexdigest()
    members["archive.json"] = json.dumps(index).encode()
    return members


CRAFTED = {
    "absolute path": (lambda tmp, good: good + [file_member(str(tmp / "pwned"), b"x")],
                      UnsafeArchiveError, "absolute path"),
    "dot-dot": (lambda tmp, good: good + [file_member("../pwned", b"x")],
                UnsafeArchiveError, "'..'"),
    "nested dot-dot": (lambda tmp, good: good + [file_member("1/../../pwned", b"x")],
                       UnsafeArchiveError, "'..'"),
    "symlink": (lambda tmp, good: [special_member("1/profile.json", tarfile.SYMTYPE, "/etc/passwd")]
                + good, UnsafeArchiveError, "refusing link"),
    "hard link": (lambda tmp, good: good + [special_member("3/profile.json", tarfile.LNKTYPE,
                                                           "archive.json")],
                  UnsafeArchiveError, "refusing link"),
    "device": (lambda tmp, good: good + [special_member("1/dev", tarfile.CHRTYPE)],
               UnsafeArchiveError, "not a regular file"),
    "fifo": (lambda tmp, good: good + [special_member("fifo", tarfile.FIFOTYPE)],
             UnsafeArchiveError, "not a regular file"),
    "unexpected file": (lambda tmp, good: good + [file_member("evil.py", b"import os")],
                        UnsafeArchiveError, "unexpected file 'evil.py'"),
    "pickle in an entry": (lambda tmp, good: good + [file_member("1/scores.pkl", b"\x80\x04.")],
                           UnsafeArchiveError, "unexpected file '1/scores.pkl'"),
    "unlisted entry": (lambda tmp, good: good + [file_member("9/profile.json", b"{}")],
                       UnsafeArchiveError, "unexpected file '9/profile.json' not listed in archive.json"),
    "member before the index": (lambda tmp, good: good[1:] + good[:1],
                                UnsafeArchiveError, "'1/profile.json' comes before archive.json"),
    "duplicate member": (lambda tmp, good: good + [good[-1]], UnsafeArchiveError, "appears twice"),
    "no index": (lambda tmp, good: [m for m in good if m[0].name != "archive.json"],
                 UnsafeArchiveError, "comes before archive.json"),
    "only folders": (lambda tmp, good: [special_member("1", tarfile.DIRTYPE)], UnsafeArchiveError, "no archive.json"),
    "listed file missing": (lambda tmp, good: [m for m in good if m[0].name != "2/profile.json"],
                            UnsafeArchiveError, "2/profile.json is listed but missing"),
}


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_crafted_archives_are_refused_and_nothing_is_written(tmp_path, exported, case):
    build, error, message = CRAFTED[case]
    _, archive = exported
    crafted = write_archive(tmp_path / "crafted.tar.gz", build(tmp_path, _valid(archive)))
    target = Registry(tmp_path / "target")
    with pytest.raises(error, match=message):
        target.import_archive(crafted)
    assert target.versions("tiny-llama") == []
    assert not (tmp_path / "pwned").exists() and not (tmp_path.parent / "pwned").exists()


def test_tampered_members_are_caught_by_checksum_or_validation(tmp_path, exported):
    _, archive = exported
    target = Registry(tmp_path / "target")
    members = read_members(archive)

    edited = dict(members)
    original = members["2/profile.json"]
    edited["2/profile.json"] = original.replace(b'"strength": 2.5', b'"strength": 7')
    assert edited["2/profile.json"] != members["2/profile.json"]
    crafted = write_archive(tmp_path / "a.tar.gz", [file_member(k, v) for k, v in edited.items()])
    with pytest.raises(ProfileCorrupted, match="checksum mismatch in 2/profile.json"):
        target.import_archive(crafted)

    # With checksums rewritten, the content hash in the index still catches the edit ...
    crafted = write_archive(tmp_path / "b.tar.gz",
                            [file_member(k, v) for k, v in _reindexed(edited).items()])
    with pytest.raises(ProfileCorrupted, match="does not match its content hash"):
        target.import_archive(crafted)

    # ... and a consistent but invalid profile fails validation. Entry 1 is fine, entry 2 is not:
    # the whole archive is refused, so entry 1 is not registered either.
    edited = dict(members)
    edited["2/profile.json"] = original.replace(b'"num_layers": 4', b'"num_layers": 1')
    crafted = write_archive(tmp_path / "c.tar.gz",
                            [file_member(k, v) for k, v in _reindexed(edited).items()])
    with pytest.raises(ProfileCorrupted, match="invalid profile.*outside the model's shape"):
        target.import_archive(crafted)
    assert target.versions("tiny-llama") == []


def test_non_archives_are_refused(tmp_path):
    target = Registry(tmp_path / "target")
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"definitely not gzip")
    with pytest.raises(UnsafeArchiveError, match="not a readable tar.gz"):
        target.import_archive(junk)
    with pytest.raises(ProfileNotFound, match="does not exist"):
        target.import_archive(tmp_path / "missing.tar.gz")
    assert not target.root.exists()


_IMPORT_AT_ONCE = """
import sys, time
from registry import Registry
root, start, archives = sys.argv[1], float(sys.argv[2]), sys.argv[3:]
time.sleep(max(0.0, start - time.time()))  # every process begins at the same moment
for archive in archives:
    Registry(root).import_archive(archive)
"""


def test_concurrent_imports_store_each_content_once(tmp_path):
    """Four processes importing the same and different archives at once (three rounds, issue 15: the
    same content ended up under 2-3 versions every round): one version per distinct content."""
    import subprocess
    import sys
    import time

    source = Registry(tmp_path / "source")
    for seed in range(3):
        source.register(make_profile(seed))
    one, other = tmp_path / "one.tar.gz", tmp_path / "other.tar.gz"
    source.export("tiny-llama@1", one)
    source.export("tiny-llama", other)  # versions 1-3: overlaps `one`
    for round_ in range(3):
        root = tmp_path / f"target-{round_}"
        start = time.time() + 1.5  # after every interpreter has started
        jobs = [[one], [one], [other], [one, other]]
        processes = [subprocess.Popen([sys.executable, "-c", _IMPORT_AT_ONCE, str(root), str(start), *map(str, job)],
                                      stderr=subprocess.PIPE, text=True) for job in jobs]
        for process in processes:
            _, err = process.communicate(timeout=120)
            assert process.returncode == 0, err
        rows = Registry(root).list("tiny-llama")
        stored = [row.content_hash for row in rows if row.version != "seed"]
        assert sorted(stored) == sorted(source.load(f"tiny-llama@{v}").content_hash() for v in (1, 2, 3))


def test_an_unlisted_member_is_refused_from_its_header_before_its_bytes_are_read(tmp_path, exported, monkeypatch):
    """Issue 15: up to 1 GB (1.28 GB RSS, 22 s) was read before an unlisted member was refused."""
    _, archive = exported
    crafted = write_archive(tmp_path / "crafted.tar.gz",
                            _valid(archive) + [file_member("9/head_scores.safetensors", bytes(64 * 2**20))])
    opened = []
    extract = tarfile.TarFile.extractfile
    monkeypatch.setattr(tarfile.TarFile, "extractfile", lambda self, m: (opened.append(m.name), extract(self, m))[1])
    target = Registry(tmp_path / "target")
    with pytest.raises(UnsafeArchiveError, match="unexpected file '9/head_scores.safetensors' not listed"):
        target.import_archive(crafted)
    assert "9/head_scores.safetensors" not in opened and not target.root.exists()


def test_nan_scores_are_blamed_on_the_safetensors_file(tmp_path, exported):
    """Issue 15: the NaN-scores archive was refused naming profile.json, which is fine."""
    import numpy as np
    from safetensors.numpy import load, save

    _, archive = exported
    members = read_members(archive)
    scores = {key: matrix.copy() for key, matrix in load(members["2/head_scores.safetensors"]).items()}
    next(iter(scores.values()))[1, 2] = np.nan
    members["2/head_scores.safetensors"] = save(scores)
    crafted = write_archive(tmp_path / "nan.tar.gz", [file_member(k, v) for k, v in _reindexed(members).items()])
    target = Registry(tmp_path / "target")
    with pytest.raises(ProfileCorrupted, match=r"2/head_scores\.safetensors holds an invalid profile: .*non-finite"):
        target.import_archive(crafted)
    assert not target.root.exists()
