"""Registry: profile validation, the store (versions, references, atomicity, corruption), seeds,
and the model-identity check."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from registry import (
    InvalidReference,
    Knobs,
    ModelIdentity,
    Profile,
    ProfileCorrupted,
    ProfileMismatchError,
    ProfileNotFound,
    ProfileValidationError,
    Registry,
    check_model,
    collect_provenance,
    load_seed,
    seed_names,
)

IDENTITY = ModelIdentity(
    name="tiny-llama", architecture="llama", num_layers=4, num_heads=6, num_kv_heads=2,
    config_fingerprint="cfg-aaaa", weights_fingerprint="w-1111",
)


def make_profile(seed: int = 0, **changes) -> Profile:
    """A valid profile for IDENTITY with seed-dependent scores, head set and metrics."""
    rng = np.random.default_rng(seed)
    qr = rng.standard_normal((4, 6)).astype(np.float32)
    order = np.argsort(-qr, axis=None)[:3]
    fields = dict(
        model=IDENTITY,
        head_set=[(int(i // 6), int(i % 6)) for i in order],
        knobs=Knobs(strength=1.5 + seed, top_p=0.9, top_k=64, decay=0.5, context_warmup=4),
        head_scores={"qr": qr, "retrieval": rng.random((4, 6)).astype(np.float32)},
        metrics={"dev_mrcr": 0.25 + seed / 100, "tokens_per_s": 12, "task": "mrcr"},
        provenance=collect_provenance(
            probe_kind="qr", probe_count=8, seed=seed, created="2026-01-01T00:00:00Z"
        ),
    )
    fields.update(changes)
    return Profile(**fields)


def versions_on_disk(root: Path, name: str = "tiny-llama") -> list[str]:
    folder = root / name
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


# --- profile -------------------------------------------------------------------------------------


def test_round_trip_by_every_reference_form(tmp_path):
    reg = Registry(tmp_path)
    first, second = make_profile(0), make_profile(1)
    assert reg.register(first) == "tiny-llama@1"
    assert reg.register(second, tags=["prod"]) == "tiny-llama@2"
    refs = {
        "tiny-llama": second, "tiny-llama@latest": second, "tiny-llama@2": second,
        "tiny-llama@prod": second, "tiny-llama@1": first,
        f"tiny-llama@{first.content_hash()[:6]}": first,
        f"tiny-llama@{second.content_hash()[:10].upper()}": second,
    }
    for ref, expected in refs.items():
        loaded = reg.load(ref)
        assert loaded == expected, ref
        assert loaded.content_hash() == expected.content_hash()
        assert loaded.head_set == expected.head_set
        assert dataclasses.asdict(loaded.knobs) == dataclasses.asdict(expected.knobs)
        assert loaded.metrics == expected.metrics and loaded.provenance == expected.provenance
        for key, matrix in expected.head_scores.items():
            assert loaded.head_scores[key].dtype == np.float32
            np.testing.assert_array_equal(loaded.head_scores[key], matrix)
    assert reg.resolve("tiny-llama@prod") == ("tiny-llama", 2)


def test_profile_normalises_numpy_input_and_hash_tracks_content():
    profile = make_profile(
        head_scores={"qr": np.ones((4, 6), dtype=np.float64)},
        metrics={"dev": np.float32(0.5), "n": np.int64(3)},
        head_set=[(np.int64(1), np.int64(2))],
    )
    assert profile.head_scores["qr"].dtype == np.float32
    assert profile.metrics == {"dev": 0.5, "n": 3} and type(profile.metrics["n"]) is int
    assert profile.head_set == [(1, 2)]
    scores = np.ones((4, 6))
    scores[3, 5] = 1.0001
    changed_tensor = dataclasses.replace(profile, head_scores={"qr": scores})
    changed_knob = dataclasses.replace(profile, knobs=Knobs(strength=2.5))
    hashes = {profile.content_hash(), changed_tensor.content_hash(), changed_knob.content_hash()}
    assert len(hashes) == 3
    assert Profile.from_dict(profile.to_dict(), profile.head_scores) == profile


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(knobs=dict(strength=0)), "knobs.strength must be > 0"),
        (dict(knobs=dict(strength=float("nan"))), "knobs.strength must be finite"),
        (dict(knobs=dict(top_p=0.0)), "knobs.top_p must be in (0, 1]"),
        (dict(knobs=dict(top_p=1.5)), "knobs.top_p must be in (0, 1]"),
        (dict(knobs=dict(top_k=0)), "knobs.top_k must be an integer >= 1"),
        (dict(knobs=dict(top_k=2.5)), "knobs.top_k must be an integer >= 1"),
        (dict(knobs=dict(decay=1.0)), "knobs.decay must be in [0, 1)"),
        (dict(knobs=dict(context_warmup=-1)), "knobs.context_warmup must be an integer >= 0"),
        (dict(knobs=dict(selection="greedy")), "knobs.selection must be one of dynamic, static, lagged"),
        (dict(knobs=dict(lagged_probs="soft")), "knobs.lagged_probs must be one of plain, biased"),
        (dict(knobs=dict(attnts_temperature=0)), "knobs.attnts_temperature must be > 0"),
        (dict(knobs=dict(intervention_warmup=-1)), "knobs.intervention_warmup must be 'auto'"),
        (dict(knobs=dict(intervention_warmup="sometimes")), "or an integer >= 0, got 'sometimes'"),
        (dict(knobs=dict(intervention_warmup="-2")), "knobs.intervention_warmup must be 'auto'"),
        (dict(knobs=dict(intervention_warmup=1.5)), "knobs.intervention_warmup must be 'auto'"),
        (dict(knobs=dict(intervention_warmup=True)), "knobs.intervention_warmup must be 'auto'"),
        (dict(knobs=dict(intervention_warmup=None)), "knobs.intervention_warmup must be 'auto'"),
        (dict(knobs=dict(temperature=1.0)), "unknown knobs field(s) 'temperature'"),
        (dict(head_set=[(4, 0)]), "(4, 0) is outside the model's shape: layers must be in 0..3"),
        (dict(head_set=[(0, 6)]), "heads in 0..5"),
        (dict(head_set=[(-1, 0)]), "outside the model's shape"),
        (dict(head_set=[(1, 1), (1, 1)]), "lists (1, 1) twice"),
        (dict(head_set=[]), "head_set is empty"),
        (dict(head_set=[(1, "2")]), "not a (layer, head) pair of integers"),
        (dict(head_scores={"qr": np.zeros((6, 4))}), "has shape (6, 4), expected (4, 6)"),
        (dict(head_scores={"qr": np.full((4, 6), np.inf)}), "non-finite value at layer 0, head 0"),
        (dict(head_scores={"bad key": np.zeros((4, 6))}), "head_scores key 'bad key'"),
        (dict(metrics={"dev": float("nan")}), "metrics.dev must be finite"),
        (dict(provenance={"when": object()}), "provenance.when must hold only JSON values"),
        (dict(schema_version=2), "upgrade dysco-toolkit"),
        (dict(model=dict(IDENTITY.to_dict(), num_heads=5)), "multiple of model.num_kv_heads"),
        (dict(model=dict(IDENTITY.to_dict(), name="bad name!")), "model name 'bad name!'"),
    ],
)
def test_schema_violations_are_refused_with_specific_messages(changes, message):
    if isinstance(changes.get("knobs"), dict):
        changes["knobs"] = {**Knobs().to_dict(), **changes["knobs"]}
    with pytest.raises(ProfileValidationError) as err:
        make_profile(**changes)
    assert message in str(err.value)


def test_from_dict_names_missing_and_unknown_fields():
    data = make_profile().to_dict()
    with pytest.raises(ProfileValidationError, match="unknown profile field"):
        Profile.from_dict({**data, "extra": 1})
    del data["head_set"]
    with pytest.raises(ProfileValidationError, match="missing field 'head_set'"):
        Profile.from_dict(data)
    model = dict(make_profile().model.to_dict())
    del model["num_layers"]
    with pytest.raises(ProfileValidationError, match="model is missing field"):
        ModelIdentity.from_dict(model)


# --- intervention_warmup: a knob added after profiles were first stored ---------------------------


def _hash_before_intervention_warmup(data: dict, head_scores: dict) -> str:
    """The content hash as it was computed before the knob existed, spelled out (it must not move)."""
    import hashlib

    from registry.profile import canonical_json

    digest = hashlib.sha256(b"dysco-profile\0")
    digest.update(canonical_json(data))
    for key in sorted(head_scores):
        matrix = np.ascontiguousarray(head_scores[key], dtype="<f4")
        digest.update(b"\0" + key.encode("utf-8") + b"\0")
        digest.update(canonical_json(list(matrix.shape)))
        digest.update(matrix.tobytes())
    return digest.hexdigest()


def _write_version_without_intervention_warmup(root: Path, profile: Profile) -> dict:
    """Store `profile` as version 1 the way the registry wrote it before the knob existed."""
    from registry.files import PROFILE_FILE, profile_to_files, sha256
    from registry.store import FORMAT, MANIFEST_FILE, _manifest_checksum

    data = profile.to_dict()
    for knob in Knobs.ADDED_LATER:  # intervention_warmup, and lagged_probs (issue 13) after it
        del data["knobs"][knob]
    files = profile_to_files(profile)
    files[PROFILE_FILE] = (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()
    folder = root / profile.model.name / "1"
    folder.mkdir(parents=True)
    for name, content in files.items():
        (folder / name).write_bytes(content)
    manifest = {
        "format": FORMAT, "name": profile.model.name, "registered_at": "2026-01-01T00:00:00Z",
        "content_hash": _hash_before_intervention_warmup(data, profile.head_scores),
        "files": {name: sha256(content) for name, content in files.items()},
    }
    manifest["manifest_sha256"] = _manifest_checksum(manifest)
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def test_intervention_warmup_defaults_to_auto_and_normalises():
    assert Knobs().intervention_warmup == "auto"
    assert Knobs.from_dict({}).intervention_warmup == "auto"
    assert Knobs(intervention_warmup=" AUTO ").intervention_warmup == "auto"
    assert Knobs(intervention_warmup="4").intervention_warmup == 4
    assert Knobs(intervention_warmup=np.int64(3)).intervention_warmup == 3
    assert Knobs(intervention_warmup=0).intervention_warmup == 0
    assert Knobs().to_dict()["intervention_warmup"] == "auto"  # profile.json names it explicitly


def test_a_profile_stored_before_intervention_warmup_loads_with_auto_and_still_verifies(tmp_path):
    profile = make_profile(0)
    manifest = _write_version_without_intervention_warmup(tmp_path, profile)
    reg = Registry(tmp_path)
    loaded = reg.load("tiny-llama@1")  # verifies file checksums and the content hash
    assert loaded.knobs.intervention_warmup == "auto"
    assert loaded == profile and loaded.content_hash() == manifest["content_hash"] == profile.content_hash()
    assert [(row.version, row.status) for row in reg.list("tiny-llama")] == [(1, "ok")]
    assert reg.resolve(f"tiny-llama@{manifest['content_hash'][:8]}") == ("tiny-llama", 1)
    # The same profile registered now is recognised as that version (import does not duplicate it).
    archive = tmp_path / "old.tar.gz"
    reg.export("tiny-llama@1", archive)
    assert reg.import_archive(archive) == ["tiny-llama@1"]
    # The shipped seeds (no intervention_warmup in their JSON) keep the hashes they always had.
    assert load_seed("qwen3-8b").content_hash() == (
        "b8a424003419fbdcb2b8200e217183e1ad928601576ad939847d687967517526")
    assert load_seed("llama-3.1-8b-instruct").content_hash() == (
        "175a394b93f2536244e3b8a23cd1b772b813a07e455ece773dd4eef5ff6d8503")


def test_a_set_intervention_warmup_is_part_of_the_hash_and_the_diff(tmp_path):
    auto = make_profile(0)
    explicit = make_profile(0, knobs=dataclasses.replace(auto.knobs, intervention_warmup="auto"))
    zero = make_profile(0, knobs=dataclasses.replace(auto.knobs, intervention_warmup=0))
    four = make_profile(0, knobs=dataclasses.replace(auto.knobs, intervention_warmup="4"))
    assert explicit.content_hash() == auto.content_hash()
    assert len({auto.content_hash(), zero.content_hash(), four.content_hash()}) == 3
    reg = Registry(tmp_path)
    reg.register(auto)
    reg.register(zero)
    assert reg.load("tiny-llama@2").knobs.intervention_warmup == 0
    report = reg.diff("tiny-llama@1", "tiny-llama@2")
    assert report["knobs"] == {"intervention_warmup": {"a": "auto", "b": 0}} and not report["identical"]


def test_lagged_probs_came_later_and_only_a_set_value_moves_the_hash(tmp_path):
    """`lagged_probs` (issue 13) is left out of the hash at its default, like intervention_warmup."""
    base = make_profile(0)
    data = base.to_dict()
    assert data["knobs"]["lagged_probs"] == "plain"  # profile.json names it
    del data["knobs"]["lagged_probs"], data["knobs"]["intervention_warmup"]
    assert base.content_hash() == _hash_before_intervention_warmup(data, base.head_scores)
    assert Knobs.from_dict({}).lagged_probs == "plain"
    lagged = make_profile(0, knobs=dataclasses.replace(base.knobs, selection="lagged"))
    biased = make_profile(0, knobs=dataclasses.replace(base.knobs, selection="lagged", lagged_probs="biased"))
    assert len({base.content_hash(), lagged.content_hash(), biased.content_hash()}) == 3
    reg = Registry(tmp_path)
    reg.register(lagged)
    reg.register(biased)
    loaded = reg.load("tiny-llama@2")
    assert (loaded.knobs.selection, loaded.knobs.lagged_probs) == ("lagged", "biased")
    assert loaded.content_hash() == biased.content_hash()
    assert reg.diff("tiny-llama@1", "tiny-llama@2")["knobs"] == {"lagged_probs": {"a": "plain", "b": "biased"}}


# --- store: errors, nothing written ---------------------------------------------------------------


def test_unknown_model_version_tag_and_hash_are_clear_errors(tmp_path):
    reg = Registry(tmp_path)
    reg.register(make_profile(0), tags=["prod"])
    with pytest.raises(ProfileNotFound, match="no profile named 'ghost'.*known: .*tiny-llama"):
        reg.load("ghost")
    with pytest.raises(ProfileNotFound, match=r"tiny-llama has no version 7 \(versions: \[1\]\)"):
        reg.load("tiny-llama@7")
    with pytest.raises(ProfileNotFound, match="no version, tag or content hash 'staging'.*prod"):
        reg.load("tiny-llama@staging")
    with pytest.raises(ProfileNotFound, match="content hash 'abcdef0'"):
        reg.load("tiny-llama@abcdef0")
    with pytest.raises(ProfileNotFound, match="no seed profile named 'tiny-llama'"):
        reg.load("tiny-llama@seed")


@pytest.mark.parametrize(
    "ref, message",
    [("", "non-empty"), ("a@b@c", "more than one '@'"), ("tiny-llama@", "invalid part after '@'"),
     ("tiny-llama@a b", "invalid part"), ("../etc", "is not accepted"), ("x--y", "no '--'"),
     ("@3", "model name must be a non-empty string")],
)
def test_malformed_references_are_refused(tmp_path, ref, message):
    with pytest.raises(InvalidReference, match=message):
        Registry(tmp_path).load(ref)


def test_bad_input_writes_nothing(tmp_path):
    reg = Registry(tmp_path)
    with pytest.raises(ProfileValidationError, match="tag 'latest' is reserved"):
        reg.register(make_profile(), tags=["latest"])
    broken = make_profile()
    broken.metrics["loss"] = float("inf")  # edited after construction: register re-validates
    with pytest.raises(ProfileValidationError, match="metrics.loss must be finite"):
        reg.register(broken)
    with pytest.raises(ProfileValidationError, match="takes a registry.Profile"):
        reg.register({"model": "x"})  # type: ignore[arg-type]
    assert not (tmp_path / "tiny-llama").exists() or versions_on_disk(tmp_path) == []
    assert reg.list("qwen3-8b")[0].version == "seed"
    with pytest.raises(ProfileNotFound):
        reg.list("tiny-llama")


def test_tags_move_are_validated_and_removed(tmp_path):
    reg = Registry(tmp_path)
    reg.register(make_profile(0))
    reg.register(make_profile(1))
    assert reg.tag("tiny-llama@1", "prod") == "tiny-llama@1"
    assert reg.tag("tiny-llama@latest", "prod") == "tiny-llama@2"
    assert reg.tags("tiny-llama") == {"prod": 2}
    for bad, message in [("latest", "reserved"), ("deadbeef", "looks like a content-hash"),
                         ("1st", "not accepted"), ("a b", "not accepted")]:
        with pytest.raises(ProfileValidationError, match=message):
            reg.tag("tiny-llama@1", bad)
    with pytest.raises(ProfileValidationError, match="shipped seed"):
        reg.tag("qwen3-8b@seed", "prod")
    reg.untag("tiny-llama", "prod")
    with pytest.raises(ProfileNotFound, match="no version, tag or content hash 'prod'"):
        reg.load("tiny-llama@prod")
    with pytest.raises(ProfileNotFound, match="has no tag 'prod'"):
        reg.untag("tiny-llama", "prod")


def test_hub_style_names_are_stored_and_listed(tmp_path):
    reg = Registry(tmp_path)
    model = dataclasses.replace(IDENTITY, name="Org/Tiny-Llama")
    assert reg.register(make_profile(model=model)) == "Org/Tiny-Llama@1"
    assert (tmp_path / "Org--Tiny-Llama" / "1" / "profile.json").is_file()
    assert "Org/Tiny-Llama" in reg.names()
    assert reg.load("Org/Tiny-Llama").model.name == "Org/Tiny-Llama"


def test_diff_reports_changed_knobs_heads_and_scores(tmp_path):
    reg = Registry(tmp_path)
    reg.register(make_profile(0))
    reg.register(make_profile(0, knobs=Knobs(strength=3.0), head_set=[(0, 0), (3, 5)]))
    report = reg.diff("tiny-llama@1", "tiny-llama@2")
    assert report["a"] == "tiny-llama@1" and report["b"] == "tiny-llama@2"
    assert not report["identical"]
    assert report["knobs"]["strength"] == {"a": 1.5, "b": 3.0}
    assert report["knobs"]["top_p"] == {"a": 0.9, "b": 0.975}
    assert [3, 5] in report["head_set"]["only_b"]
    assert report["head_scores"]["qr"] == {"status": "same", "max_abs_diff": 0.0}
    assert report["model"] == {}
    assert reg.diff("tiny-llama@1", "tiny-llama@1")["identical"]


# --- seeds ---------------------------------------------------------------------------------------

PUBLISHED = {
    "qwen3-8b": ("qwen3", 36, 32, 8, [(21, 31), (21, 18), (20, 15), (22, 4), (21, 11), (20, 16),
                                     (21, 17), (19, 13), (21, 10), (21, 8), (18, 5), (20, 14),
                                     (19, 14), (24, 13), (17, 4), (19, 28)]),
    "qwen3-4b": ("qwen3", 36, 32, 8, [(20, 15), (21, 18), (21, 31), (22, 4), (21, 11), (24, 29),
                                     (21, 10), (20, 16), (21, 8), (21, 17), (23, 30), (20, 14),
                                     (20, 13), (24, 13), (20, 4), (18, 19)]),
    "llama-3.1-8b-instruct": ("llama", 32, 32, 8, [
        (17, 24), (14, 31), (17, 26), (16, 19), (16, 25), (13, 1), (14, 22), (13, 16), (14, 20),
        (14, 3), (14, 1), (17, 27), (16, 26), (17, 21), (16, 27), (19, 3)]),
}


# Calibrated on an H200 and shipped (docs/results.md, "The research loop, round 2"): the heads the
# calibration started from, and the knobs it registered (the published ones, kept by the adoption rule).
# name: (architecture, layers, heads, kv heads, head set, knobs); Knobs() where the study kept the published ones
CALIBRATED = {
    "smollm2-135m": ("llama", 30, 9, 3, [(17, 3), (18, 6), (17, 4), (7, 7), (8, 0), (18, 7), (23, 2), (14, 3),
                                         (23, 7), (22, 7), (21, 8), (15, 6), (23, 8), (23, 1), (20, 6), (20, 3)], Knobs()),
    # round 5: the study from the kv-probe heads adopted one head and a narrow selection
    "qwen2.5-coder-0.5b": ("qwen2", 24, 14, 2, [(16, 3)],
                           Knobs(strength=2.477032689806519, top_k=19, top_p=0.617765241477609,
                                 decay=0.8278896752954941, intervention_warmup=2)),
    "qwen2.5-coder-1.5b": ("qwen2", 28, 12, 2, [(8, 3), (14, 3), (14, 4), (16, 2), (23, 4), (6, 7), (19, 1), (16, 5),
                                                (19, 3), (23, 1), (22, 7), (17, 2), (14, 0), (16, 4), (23, 0),
                                                (16, 0)], Knobs()),
}


def test_calibrated_seeds_match_by_shape_and_say_where_their_figures_come_from():
    from decoder.catalogue import get_entry

    for name, (arch, layers, heads, kv, head_set, knobs) in CALIBRATED.items():
        seed = load_seed(name)
        assert (seed.model.architecture, seed.model.num_layers, seed.model.num_heads,
                seed.model.num_kv_heads) == (arch, layers, heads, kv)
        entry = get_entry(name)  # the catalogue's shape of the same model
        assert (entry.num_layers, entry.num_heads, entry.num_kv_heads) == (layers, heads, kv)
        assert seed.head_set == head_set and seed.knobs == knobs
        # tuned knobs only where the study's adoption rule took its best trial
        assert seed.metrics.get("adoption", {}).get("adopted", False) == (knobs != Knobs())
        assert seed.model.config_fingerprint is None and seed.model.weights_fingerprint is None
        assert seed.provenance["source"] == "calibration" and "The research loop, round" in seed.provenance["results"]
        assert seed.metrics["heldout"]["n"] >= 100  # the held-out rule: n >= 100 per cell


def test_seeds_hold_the_published_head_sets_and_knobs():
    assert seed_names() == sorted([*PUBLISHED, *CALIBRATED])
    for name, (arch, layers, heads, kv, head_set) in PUBLISHED.items():
        seed = load_seed(name)
        assert (seed.model.architecture, seed.model.num_layers, seed.model.num_heads,
                seed.model.num_kv_heads) == (arch, layers, heads, kv)
        assert seed.head_set == head_set
        assert seed.knobs == Knobs(strength=2.0, top_p=0.975, top_k=4096, decay=0.75,
                                   context_warmup=8, selection="dynamic")
        assert seed.model.config_fingerprint is None and seed.model.weights_fingerprint is None
        assert seed.head_scores == {}
        assert seed.provenance["source"] == "paper" and seed.provenance["arxiv"] == "2602.22175"


def test_seed_rule_store_wins_once_a_version_exists(tmp_path):
    reg = Registry(tmp_path)
    assert reg.resolve("qwen3-8b") == ("qwen3-8b", "seed")
    assert reg.resolve("qwen3-8b@latest") == ("qwen3-8b", "seed")
    tuned = dataclasses.replace(load_seed("qwen3-8b"), knobs=Knobs(strength=3.0))
    assert reg.register(tuned) == "qwen3-8b@1"
    assert reg.resolve("qwen3-8b") == ("qwen3-8b", 1)
    assert reg.load("qwen3-8b").knobs.strength == 3.0
    assert reg.load("qwen3-8b@seed").knobs.strength == 2.0


# --- atomicity ------------------------------------------------------------------------------------


def _register_many(root: str, writer: int, count: int, barrier) -> list[str]:
    barrier.wait()
    reg = Registry(root)
    return [reg.register(make_profile(seed=writer * 100 + i)) for i in range(count)]


def test_concurrent_writers_get_distinct_intact_versions(tmp_path):
    context = multiprocessing.get_context("fork" if sys.platform != "win32" else "spawn")
    writers, per_writer = 4, 3
    barrier = context.Manager().Barrier(writers)
    with context.Pool(writers) as pool:
        results = pool.starmap(
            _register_many, [(str(tmp_path), w, per_writer, barrier) for w in range(writers)]
        )
    refs = [ref for batch in results for ref in batch]
    assert sorted(refs, key=lambda r: int(r.split("@")[1])) == [
        f"tiny-llama@{n}" for n in range(1, writers * per_writer + 1)
    ]
    reg = Registry(tmp_path)
    for writer, batch in enumerate(results):
        for i, ref in enumerate(batch):
            assert reg.load(ref) == make_profile(seed=writer * 100 + i)
    assert all(row.status == "ok" for row in reg.list("tiny-llama"))
    assert not [p for p in (tmp_path / "tiny-llama").iterdir() if p.name.startswith(".incoming")]


KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    from test_registry import make_profile
    from registry import store

    def die(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    setattr(store.Registry, {step!r}, die)
    store.Registry({root!r}).register(make_profile(seed=9))
    """
)


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
@pytest.mark.parametrize("step", ["_write_manifest", "_claim_version"])
def test_writer_killed_mid_write_leaves_no_visible_entry(tmp_path, step):
    reg = Registry(tmp_path)
    reg.register(make_profile(seed=1))
    script = KILL_SCRIPT.format(tests=str(Path(__file__).parent), step=step, root=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()
    leftovers = [p for p in (tmp_path / "tiny-llama").iterdir() if p.name.startswith(".incoming")]
    assert len(leftovers) == 1  # the dead writer's staging dir is there ...
    assert reg.versions("tiny-llama") == [1]  # ... but invisible to readers
    assert [row.ref for row in reg.list("tiny-llama")] == ["tiny-llama@1"]
    assert reg.resolve("tiny-llama@latest") == ("tiny-llama", 1)
    assert reg.register(make_profile(seed=2)) == "tiny-llama@2"  # and the next writer cleans it
    assert not leftovers[0].exists()
    assert reg.load("tiny-llama@2") == make_profile(seed=2)


# --- corruption -----------------------------------------------------------------------------------


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def test_corrupt_files_are_named_and_other_versions_stay_usable(tmp_path):
    reg = Registry(tmp_path)
    for seed in range(4):
        reg.register(make_profile(seed=seed))
    folder = tmp_path / "tiny-llama"
    _flip_last_byte(folder / "2" / "head_scores.safetensors")
    text = (folder / "3" / "profile.json").read_text()
    assert '"strength": 3.5' in text  # a valid edit: only the checksum can tell
    (folder / "3" / "profile.json").write_text(text.replace('"strength": 3.5', '"strength": 9.0'))
    manifest = json.loads((folder / "4" / "manifest.json").read_text())
    manifest["registered_at"] = "1999-01-01T00:00:00Z"
    (folder / "4" / "manifest.json").write_text(json.dumps(manifest))

    for version, file_name in [(2, "head_scores.safetensors"), (3, "profile.json"),
                               (4, "manifest.json")]:
        with pytest.raises(ProfileCorrupted, match=f"checksum mismatch in .*{file_name}") as err:
            reg.load(f"tiny-llama@{version}")
        assert err.value.path == str(folder / str(version) / file_name)
    assert reg.load("tiny-llama@1") == make_profile(seed=0)
    with pytest.warns(UserWarning, match="skipping corrupt version"):
        assert reg.resolve("tiny-llama") == ("tiny-llama", 1)
    status = {row.version: row.status for row in reg.list("tiny-llama")}
    assert status == {1: "ok", 2: "corrupt", 3: "corrupt", 4: "corrupt"}
    with pytest.raises(ProfileCorrupted):
        reg.tag("tiny-llama@2", "prod")

    (folder / "1" / "profile.json").unlink()
    with pytest.raises(ProfileCorrupted, match="profile.json is missing"):
        reg.load("tiny-llama@1")
    with pytest.warns(UserWarning), pytest.raises(ProfileCorrupted, match="every stored version"):
        reg.load("tiny-llama")


# --- root -----------------------------------------------------------------------------------------


def test_default_root_follows_env_then_user_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("DYSCO_REGISTRY", str(tmp_path / "custom"))
    assert Registry().root == tmp_path / "custom"
    monkeypatch.delenv("DYSCO_REGISTRY")
    assert Registry().root.parts[-2:] == ("dysco-toolkit", "registry")


def test_reading_needs_no_torch(tmp_path):
    Registry(tmp_path).register(make_profile())
    code = (
        "import sys; from registry import Registry; "
        f"p = Registry({str(tmp_path)!r}).load('tiny-llama'); Registry({str(tmp_path)!r}).list(); "
        "assert 'torch' not in sys.modules, 'torch was imported'; print(p.head_set)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(make_profile().head_set)


# --- model identity -------------------------------------------------------------------------------


def test_check_model_accepts_matching_fingerprints_under_any_name():
    identity = dict(IDENTITY.to_dict(), name="/models/local-copy")
    assert check_model(make_profile(), identity) == "config and weights fingerprints match"


def test_check_model_refuses_other_weights_naming_both_fingerprints():
    other = dict(IDENTITY.to_dict(), weights_fingerprint="w-2222")
    with pytest.raises(ProfileMismatchError) as err:
        check_model(make_profile(), other)
    assert "w-1111" in str(err.value) and "w-2222" in str(err.value)
    with pytest.warns(UserWarning, match="w-2222"):
        basis = check_model(make_profile(), other, force=True)
    assert basis.startswith("forced")


def test_check_model_matches_seeds_by_name_and_shape_and_says_so():
    seed = load_seed("qwen3-8b")
    identity = {"name": "Qwen/Qwen3-8B", "architecture": "qwen3", "num_layers": 36,
                "num_heads": 32, "num_kv_heads": 8, "config_fingerprint": "c",
                "weights_fingerprint": "w"}
    assert "matched by name and shape only" in check_model(seed, identity)
    with pytest.raises(ProfileMismatchError, match="name 'qwen3-8b' .profile. vs 'Qwen/Qwen3-4B'"):
        check_model(seed, dict(identity, name="Qwen/Qwen3-4B"))
    with pytest.raises(ProfileMismatchError, match="num_kv_heads 8 .profile. vs 4"):
        check_model(seed, dict(identity, num_kv_heads=4))


def test_check_model_never_forces_heads_outside_the_model():
    small = dict(IDENTITY.to_dict(), num_layers=1)
    profile = make_profile(head_set=[(3, 0)])
    with warnings.catch_warnings(), pytest.raises(ProfileMismatchError, match="not overridable"):
        check_model(profile, small, force=True)
    with pytest.raises(ProfileValidationError, match="missing num_heads"):
        check_model(profile, {"architecture": "llama", "num_layers": 4, "num_kv_heads": 2})


# --- property: any valid profile survives the store unchanged ------------------------------------

@st.composite
def random_profiles(draw) -> Profile:
    layers, kv = draw(st.integers(1, 6)), draw(st.integers(1, 3))
    heads = kv * draw(st.integers(1, 3))
    cells = st.tuples(st.integers(0, layers - 1), st.integers(0, heads - 1))
    head_set = draw(st.lists(cells, min_size=1, max_size=layers * heads, unique=True))
    finite = st.floats(-1e6, 1e6, allow_nan=False, width=32)
    matrices = draw(st.dictionaries(
        st.sampled_from(["qr", "qr_ndcg", "retrieval"]),
        st.lists(finite, min_size=layers * heads, max_size=layers * heads), max_size=3,
    ))
    knobs = Knobs(
        strength=draw(st.floats(0.01, 200)), top_p=draw(st.floats(0.001, 1.0)),
        top_k=draw(st.integers(1, 10**6)), decay=draw(st.floats(0.0, 0.999)),
        context_warmup=draw(st.integers(0, 64)),
        selection=draw(st.sampled_from(["dynamic", "static", "lagged"])),
        lagged_probs=draw(st.sampled_from(["plain", "biased"])),
        intervention_warmup=draw(st.sampled_from(["auto"]) | st.integers(0, 64)),
    )
    metrics = draw(st.dictionaries(st.text(max_size=8), st.one_of(
        st.floats(allow_nan=False, allow_infinity=False), st.integers(), st.text(max_size=10)),
        max_size=4))
    fingerprint = draw(st.none() | st.text(min_size=1, max_size=8))
    return Profile(
        model=ModelIdentity("rand", "llama", layers, heads, kv, fingerprint, None),
        head_set=head_set, knobs=knobs, metrics=metrics,
        head_scores={
            key: np.array(values, dtype=np.float32).reshape(layers, heads)
            for key, values in matrices.items()
        },
    )


@settings(max_examples=20, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(profile=random_profiles())
def test_any_valid_profile_round_trips_with_the_same_hash(tmp_path, profile):
    reg = Registry(tmp_path / "prop")
    ref = reg.register(profile)
    loaded = reg.load(ref)
    assert loaded == profile and loaded.content_hash() == profile.content_hash()
    assert reg.load(f"rand@{profile.content_hash()[:12]}") == profile
