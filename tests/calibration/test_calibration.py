"""The calibration study: search space, resume after SIGKILL, shared workers, MLflow, bad input.

Every run uses a tiny random Llama saved as a local checkpoint (mechanics, not quality) and tiny
sizes; the study, the MLflow store and the registry live in a temporary folder.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pytest

from calibration.space import INTERVENTION_WARMUPS, PUBLISHED, SearchSpace
from calibration.errors import CalibrationError
from calibration.study import CalibrationConfig, calibrate, head_ranking, parse_heads

MODEL_NAME = "tiny-llama"
COMMON = [
    "--dev", "kv", "--context", "300", "--examples", "2", "--test-examples", "1",
    "--max-new-tokens", "6", "--attnts-temperatures", "0.8", "--threads", "1", "--quiet",
]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny random Llama saved as a checkpoint folder that `load_model` reads like any other."""
    from decoder.tiny import tiny_model

    folder = tmp_path_factory.mktemp("models") / MODEL_NAME
    model, tokenizer = tiny_model("llama", seed=3)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_identity(tiny_checkpoint):
    from decoder.loading import load_model, model_identity
    from registry import ModelIdentity

    model, _ = load_model(str(tiny_checkpoint), progress=False)
    return ModelIdentity.from_dict(model_identity(model, MODEL_NAME))


def _register_head_profile(root: Path, identity) -> str:
    """Register a head-set profile (QR scores included) for the tiny model, as headfinder would."""
    from registry import Profile, Registry

    scores = np.random.default_rng(0).random((identity.num_layers, identity.num_heads)).astype(np.float32)
    profile = Profile(model=identity, head_set=[(3, 1), (2, 0)], head_scores={"qr": scores},
                      provenance={"kind": "test"})
    return Registry(root).register(profile)


@pytest.fixture()
def workdir(tmp_path, tiny_checkpoint, tiny_identity):
    """A working folder holding a registry with one head-set profile for the tiny model."""
    registry = tmp_path / "registry"
    ref = _register_head_profile(registry, tiny_identity)
    return {"dir": tmp_path, "registry": registry, "ref": ref, "model": str(tiny_checkpoint)}


def _cli(work, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "calibration.cli", "--model", work["model"], "--registry", str(work["registry"]),
        "--storage", f"sqlite:///{work['dir'] / 'study.db'}", "--tracking-uri",
        f"sqlite:///{work['dir'] / 'mlflow.db'}", *COMMON, *extra,
    ]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _trials(db: Path) -> list[tuple[int, str]]:
    """(number, state) of every trial in a study database, read with plain sqlite."""
    with sqlite3.connect(db, timeout=30) as con:
        return con.execute("SELECT number, state FROM trials ORDER BY number").fetchall()


def _versions(work) -> list[int]:
    from registry import Registry

    return Registry(work["registry"]).versions(MODEL_NAME)


# --------------------------------------------------------------------------- the search space


def test_space_holds_the_published_defaults_and_is_clipped_to_the_model():
    from registry import Knobs

    space = SearchSpace.for_model(context_length=8192, ranking_length=270)
    assert space.defaults() == PUBLISHED
    assert PUBLISHED["intervention_warmup"] == Knobs().intervention_warmup == "auto"
    for name, value in PUBLISHED.items():
        if name == "intervention_warmup":
            assert value in space.intervention_warmup
            continue
        lo, hi = getattr(space, name)
        assert lo <= value <= hi, name
    small = SearchSpace.for_model(context_length=512, ranking_length=6)
    assert small.top_k[1] == 512 and small.num_heads[1] == 6
    assert small.defaults()["top_k"] == 512 and small.defaults()["num_heads"] == 6
    dists = space.distributions()
    assert dists["top_k"].log and dists["num_heads"].log
    assert dists["intervention_warmup"].choices == INTERVENTION_WARMUPS and INTERVENTION_WARMUPS[0] == "auto"


def test_space_suggests_and_enqueues_the_intervention_warmup():
    from decoder.tiny import tiny_model

    space = SearchSpace.for_model(context_length=4096, ranking_length=16)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    study.enqueue_trial(space.defaults())
    first = space.suggest(study.ask())
    assert first["intervention_warmup"] == "auto" and first == space.defaults()
    drawn = {space.suggest(study.ask())["intervention_warmup"] for _ in range(40)}
    assert drawn <= set(INTERVENTION_WARMUPS) and len(drawn) > 2
    assert space.to_dict()["intervention_warmup"] == list(INTERVENTION_WARMUPS)  # JSON, stored with the study
    json.dumps(space.to_dict())

    # Fixed (calibrate --intervention-warmup N): a single choice, which is also the default trial's.
    fixed = SearchSpace.for_model(4096, 16, intervention_warmup="3")
    assert fixed.intervention_warmup == (3,) and fixed.defaults()["intervention_warmup"] == 3
    assert SearchSpace.for_model(4096, 16, intervention_warmup=" Auto ").intervention_warmup == ("auto",)
    for bad in ("-1", "often", 2.5):
        with pytest.raises(ValueError, match="intervention_warmup must be 'auto'"):
            SearchSpace.for_model(4096, 16, intervention_warmup=bad)

    # The shared prefill must leave out the largest warmup any trial can use: "auto" is the tiny
    # chat template's 9-token generation prompt, more than the largest number (8).
    _, tokenizer = tiny_model("llama")
    assert space.intervention_warmup_tokens(tokenizer) == 9
    assert fixed.intervention_warmup_tokens(tokenizer) == 3


def test_one_prefill_serves_trials_with_different_intervention_warmups():
    """Every trial decoding from the runner's shared prefill gets the tokens it gets running alone."""
    from calibration.runner import ExampleRunner, Method, dysco_warmup
    from calibration.tasks import get_task
    from decoder.dysco import DyscoConfig
    from decoder.generation import Decoder
    from decoder.tiny import tiny_model

    model, tokenizer = tiny_model("llama")
    task = get_task("kv")
    examples = task.generate(tokenizer, 2, 300, 0)
    configs = [DyscoConfig(head_set=[(1, 0), (2, 3)], context_warmup=5, intervention_warmup=w)
               for w in ("auto", 0, 4, 8)]
    assert [dysco_warmup(c, tokenizer) for c in configs] == [14, 5, 9, 13]
    space = SearchSpace.for_model(4096, 16)
    warmup = 5 + space.intervention_warmup_tokens(tokenizer)
    shared = ExampleRunner(model, tokenizer, task, examples, max_new_tokens=6, batch_size=2, warmup=warmup)
    prompts = [example.messages for example in examples]
    for config in configs:
        together = shared.evaluate(Method.dysco(config)).responses
        alone = Decoder(model, tokenizer, dysco=config).generate(prompts, max_new_tokens=6)
        assert together == alone.texts, config.intervention_warmup
    assert len(shared._prefills) == 1  # one prefill of the batch served every trial
    state = shared._prefills[0]
    assert state.input_ids.shape[1] - state.prefilled == 14  # it stopped before the largest warmup
    assert shared.evaluate(Method.vanilla()).responses == Decoder(model, tokenizer, "vanilla").generate(
        prompts, max_new_tokens=6).texts

    # A prefill that stops too late for a trial is refused, not silently decoded differently.
    short = ExampleRunner(model, tokenizer, task, examples, max_new_tokens=6, batch_size=2, warmup=5)
    with pytest.raises(ValueError, match="prefill with warmup >= 14"):
        short.evaluate(Method.dysco(configs[0]))


def test_fast_path_runner_gives_the_exact_runners_responses_and_scores():
    """`ExampleRunner(fast=True)`: one fast prefill per batch serves every trial, and every method gives the
    exact path's responses, per-example scores and DySCO's selection recall (a padded batch and a batch of one)."""
    from calibration.runner import ExampleRunner, Method
    from calibration.tasks import get_task
    from decoder.dysco import DyscoConfig
    from decoder.tiny import tiny_model

    model, tokenizer = tiny_model("llama")
    task = get_task("kv")
    examples = task.generate(tokenizer, 3, 360, 1) + task.generate(tokenizer, 1, 280, 2)
    examples = [examples[0], examples[3], examples[1]]  # batch 0 pads its shorter second row
    space = SearchSpace.for_model(4096, 16)
    runners = {fast: ExampleRunner(model, tokenizer, task, examples, max_new_tokens=5, batch_size=2,
                                   warmup=5 + space.intervention_warmup_tokens(tokenizer), fast=fast)
               for fast in (False, True)}
    methods = [Method.vanilla(), Method.attnts(0.8)] + [
        Method.dysco(DyscoConfig(head_set=[(1, 0), (2, 3)], context_warmup=5, intervention_warmup=w, strength=s,
                                 top_p=p, selection=selection))
        for w, s, p, selection in (("auto", 2.0, 0.975, "dynamic"), (0, 100.0, 0.6, "dynamic"),
                                   (4, 3.0, 0.9, "lagged"), (8, 2.0, 0.8, "static"))]
    for method in methods:
        exact, fast = (runners[f].evaluate(method) for f in (False, True))
        assert fast.responses == exact.responses, method
        assert fast.scores == exact.scores and fast.new_tokens == exact.new_tokens
        _same_selection(fast.extra["selection"], exact.extra["selection"], dysco=method.name == "dysco")
    assert len(runners[True]._prefills) == 2  # one per batch, shared by every method but AttnTS
    assert not runners[True]._prefills[0].attention_mask.all()  # the first batch was padded
    assert runners[True]._prefills[0].prefilled == runners[False]._prefills[0].prefilled


def _same_selection(fast, exact, *, dysco):
    """Per example, the fast path's `summarize_selection` is the exact path's (floats within float32 noise);
    DySCO's are measured (kv locates its evidence), other methods' are None."""
    assert len(fast) == len(exact)
    for a, b in zip(fast, exact):
        assert (a is not None) == (b is not None) == dysco
        if dysco:
            assert a.keys() == b.keys() and a["evidence_recall"] is not None
            assert a == pytest.approx(b, abs=1e-5)


def _close(a, b, tol=1e-5):
    """Nested dicts / lists of the same shape whose numbers agree within `tol` (None where the other is None)."""
    if isinstance(b, dict):
        assert isinstance(a, dict) and a.keys() == b.keys()
        for key in b:
            _close(a[key], b[key], tol)
    elif isinstance(b, (int, float)) and not isinstance(b, bool):
        assert a == pytest.approx(b, abs=tol)
    else:
        assert a == b


def test_head_ranking_follows_qr_scores_then_head_set():
    from registry import ModelIdentity, Profile

    identity = ModelIdentity(name="m", architecture="llama", num_layers=2, num_heads=3, num_kv_heads=1)
    scores = np.array([[0.1, 0.9, 0.3], [0.8, 0.0, 0.5]], dtype=np.float32)
    with_scores = Profile(model=identity, head_set=[(0, 1)], head_scores={"qr": scores})
    assert head_ranking(with_scores) == [(0, 1), (1, 0), (1, 2), (0, 2), (0, 0), (1, 1)]
    without = Profile(model=identity, head_set=[(1, 2), (0, 0)])
    assert head_ranking(without) == [(1, 2), (0, 0)]
    assert parse_heads("21:31, 21:18") == [(21, 31), (21, 18)]
    with pytest.raises(CalibrationError, match="LAYER:HEAD"):
        parse_heads("21-31")


def test_a_trial_left_running_by_a_dead_process_is_failed_and_queued_again(tmp_path):
    from calibration.space import SearchSpace
    from calibration.storage import open_storage, reclaim_dead_trials, this_worker

    storage = open_storage(f"sqlite:///{tmp_path / 's.db'}")
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    space = SearchSpace.for_model(4096, 16)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan = study.ask()
    space.suggest(orphan)
    orphan.set_user_attr("worker", {**this_worker(), "pid": dead.pid})  # a process that has ended
    alive = study.ask()
    space.suggest(alive)
    alive.set_user_attr("worker", this_worker())  # this very process: must be left alone

    assert reclaim_dead_trials(study) == [orphan.number]
    trials = study.get_trials()
    assert trials[orphan.number].state.name == "FAIL"
    assert trials[alive.number].state.name == "RUNNING"
    retry = [t for t in trials if t.user_attrs.get("retry_of") == orphan.number]
    assert len(retry) == 1 and retry[0].state.name == "WAITING"
    assert reclaim_dead_trials(study) == []  # idempotent: nothing is queued twice
    rerun = study.ask()  # the next trial taken is the queued one, with the orphan's parameters
    assert rerun.number == retry[0].number and space.suggest(rerun) == trials[orphan.number].params


# --------------------------------------------------------------------------- a whole calibration


def test_calibration_registers_a_profile_and_logs_mlflow_runs(workdir):
    import mlflow
    from registry import Registry

    tracking = f"sqlite:///{workdir['dir'] / 'mlflow.db'}"
    config = CalibrationConfig(
        dev="kv", model=workdir["model"], profile=workdir["ref"], trials=4, examples=2, test_examples=1,
        context=300, max_new_tokens=6, storage=f"sqlite:///{workdir['dir'] / 'study.db'}",
        tracking_uri=tracking, registry=str(workdir["registry"]), attnts_temperatures=(0.8, 0.9),
        threads=1,
    )
    result = calibrate(config)

    assert result.trials["finished"] == 4
    assert set(result.scores["dev"]) == set(result.scores["test"]) == {"vanilla", "attnts", "dysco", "dysco_published"}
    # Held-out comparisons, each paired on the same test examples.
    assert set(result.paired_test) == {"dysco-vanilla", "dysco_published-vanilla", "dysco-dysco_published",
                                       "attnts-vanilla"}
    for row in result.paired_test.values():
        assert row["n"] == 1 and 0.0 <= row["p_value"] <= 1.0
    # A random tiny model scores 0 everywhere: the study says so instead of pretending to have tuned.
    dev_values = [v for v in result.scores["dev"].values() if v is not None]
    if max(dev_values) == 0.0:
        assert result.flat_objective is not None and "flat" in result.flat_objective["message"]
        assert "WARNING: the objective is flat" in result.table()
    # Selection recall of the best trial on dev (kv names its evidence: the asked pair).
    recall = result.selection["dev_best"]
    assert recall is not None and 0.0 <= recall["evidence_recall"] <= 1.0 and recall["examples"] == 2
    assert result.attnts_temperature in (0.8, 0.9)
    # The registered knobs are the chosen trial's, with the reason recorded (the published ones unless beaten).
    assert result.adoption["chosen_trial"] == result.best_trial and result.adoption["message"]
    assert result.adoption["adopted"] == (result.best_trial == result.adoption["best_trial"])
    assert result.profile_ref == f"{MODEL_NAME}@2" and result.parent_ref == workdir["ref"]
    profile = Registry(workdir["registry"]).load(result.profile_ref)
    assert profile.metrics["test"] == result.scores["test"]
    assert profile.metrics["dev"]["vanilla"] == result.scores["dev"]["vanilla"]
    assert profile.metrics["adoption"] == result.adoption and profile.metrics["loss_penalty"] == 1.0
    assert profile.provenance["parent"] == workdir["ref"]
    assert profile.provenance["study_name"] == result.study_name
    assert profile.provenance["mlflow_run_id"] == result.mlflow["run_id"]
    assert "optuna" in profile.provenance["library_versions"]
    assert profile.knobs.top_k == result.best_params["top_k"]
    assert len(profile.head_set) == result.best_params["num_heads"]
    assert "qr" in profile.head_scores  # carried over from the parent

    # The first trial is the published defaults, clipped to this model (4x4 heads, 4096 context).
    study = optuna.load_study(study_name=result.study_name, storage=config.storage)
    first = study.trials[0]
    assert first.params == {"strength": 2.0, "top_k": 4096, "top_p": 0.975, "decay": 0.75, "num_heads": 16,
                            "intervention_warmup": "auto"}
    assert profile.knobs.intervention_warmup == result.best_params["intervention_warmup"]

    # MLflow: one parent run, one nested run per finished trial, with params and scores.
    mlflow.set_tracking_uri(tracking)
    runs = mlflow.search_runs(experiment_names=["dysco-calibration"], output_format="list")
    parent = [r for r in runs if r.info.run_id == result.mlflow["run_id"]]
    nested = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == result.mlflow["run_id"]]
    assert len(parent) == 1 and len(nested) == 4
    assert {int(r.data.tags["optuna.trial_number"]) for r in nested} == {0, 1, 2, 3}
    for run in nested:
        assert set(run.data.params) >= {"strength", "top_k", "top_p", "decay", "num_heads", "intervention_warmup"}
        assert "duration_s" in run.data.metrics
    assert parent[0].data.metrics["test_dysco"] == result.scores["test"]["dysco"]
    assert "test_p_dysco-vanilla" in parent[0].data.metrics
    assert parent[0].data.tags["dysco.flat_objective"] == ("yes" if result.flat_objective else "no")
    artifacts = {a.path for a in mlflow.MlflowClient(tracking).list_artifacts(result.mlflow["run_id"], "plots")}
    assert "plots/optimization_history.png" in artifacts

    # Again, without naming the profile: the latest one (@2) is this calibration's result, so it
    # starts from @2's parent, finds the same (complete) study, and runs or registers nothing new.
    again = calibrate(dataclasses.replace(config, profile=None))
    assert again.study_name == result.study_name and again.profile_ref == result.profile_ref
    assert _versions(workdir) == [1, 2]


def test_same_settings_draw_the_same_trials(workdir):
    storage = f"sqlite:///{workdir['dir'] / 'twins.db'}"

    def trial_params(name: str) -> list[dict]:
        config = CalibrationConfig(
            dev="kv", model=workdir["model"], profile=workdir["ref"], trials=5, examples=2, test_examples=1,
            context=300, max_new_tokens=4, storage=storage, tracking=False, register=False,
            registry=str(workdir["registry"]), attnts_temperatures=(0.8,), threads=1, study_name=name,
        )
        calibrate(config)
        return [t.params for t in optuna.load_study(study_name=name, storage=storage).trials]

    a, b = trial_params("a"), trial_params("b")
    assert a == b and len(a) == 5
    assert len({json.dumps(p, sort_keys=True) for p in a}) == 5  # TPE really explored
    # intervention_warmup is searched too (every trial continues the same shared prefill).
    assert a[0]["intervention_warmup"] == "auto" and {p["intervention_warmup"] for p in a} <= set(INTERVENTION_WARMUPS)


def test_a_fixed_intervention_warmup_is_used_by_every_trial_and_registered(workdir):
    from registry import Registry

    config = CalibrationConfig(
        dev="kv", model=workdir["model"], profile=workdir["ref"], trials=2, examples=2, test_examples=1,
        context=300, max_new_tokens=3, storage=None, tracking=False, registry=str(workdir["registry"]),
        attnts_temperatures=(0.8,), threads=1, intervention_warmup="0",
    )
    result = calibrate(config)
    assert result.best_params["intervention_warmup"] == 0
    assert Registry(workdir["registry"]).load(result.profile_ref).knobs.intervention_warmup == 0
    with pytest.raises(CalibrationError, match="intervention_warmup must be 'auto'.*got 'x'"):
        CalibrationConfig(dev="kv", intervention_warmup="x").validate()


def test_a_study_made_before_intervention_warmup_is_refused_clearly(workdir):
    from calibration.storage import open_storage

    storage = f"sqlite:///{workdir['dir'] / 'old.db'}"
    old = optuna.create_study(study_name="old", storage=open_storage(storage), direction="maximize")
    old.set_user_attr("definition", {"space": {"strength": [1.0, 8.0], "top_k": [16, 4096], "top_p": [0.5, 1.0],
                                               "decay": [0.0, 0.95], "num_heads": [1, 16]}})
    config = CalibrationConfig(
        dev="kv", model=workdir["model"], profile=workdir["ref"], trials=1, examples=2, test_examples=1,
        context=300, max_new_tokens=3, storage=storage, study_name="old", tracking=False,
        registry=str(workdir["registry"]), threads=1,
    )
    with pytest.raises(CalibrationError, match="made before intervention_warmup .* give a new --study-name"):
        calibrate(config)


def test_speed_objective_gives_a_pareto_front_and_a_changed_study_is_refused(workdir):
    import mlflow

    tracking = f"sqlite:///{workdir['dir'] / 'mlflow.db'}"
    config = CalibrationConfig(
        dev="kv", model=workdir["model"], profile=workdir["ref"], trials=3, examples=2, test_examples=1,
        context=300, max_new_tokens=4, storage=f"sqlite:///{workdir['dir'] / 'study.db'}",
        tracking_uri=tracking, registry=str(workdir["registry"]), attnts_temperatures=(0.8,),
        threads=1, study_name="speed", speed_objective="measured",
    )
    result = calibrate(config)
    assert result.pareto_front and all(
        set(p) == {"trial", "objective", "cost", "score", "params", "published"} for p in result.pareto_front)
    front = {p["trial"] for p in result.pareto_front}
    assert result.adoption["best_trial"] in front and result.tokens_per_s["dysco"] > 0
    study = optuna.load_study(study_name="speed", storage=config.storage)
    assert len(study.directions) == 2 and study.metric_names == ["score", "ms_per_token"]
    # The measured cost is the trial's own decode time per generated token.
    for point in result.pareto_front:
        trial = study.trials[point["trial"]]
        assert point["cost"] == pytest.approx(1000 * trial.user_attrs["decode_seconds"] / trial.user_attrs["new_tokens"])
    artifacts = {a.path for a in mlflow.MlflowClient(tracking).list_artifacts(result.mlflow["run_id"], "plots")}
    assert "plots/pareto_front.png" in artifacts

    # The same study name with other settings would mix incomparable trials: refused.
    changed = CalibrationConfig(**{**config.__dict__, "speed_objective": "none", "examples": 3})
    with pytest.raises(CalibrationError, match="different examples_sha256, n_dev, objectives"):
        calibrate(changed)
    assert _versions(workdir) == [1, 2]


def test_a_fast_path_study_scores_every_trial_as_the_exact_path_and_keeps_to_its_path(workdir, capsys):
    """`calibrate --fast`: the same trials, per-example scores and baselines as the exact path; a study
    is continued only on the path it was made with (the default names differ, so they never mix)."""
    from types import SimpleNamespace

    storage = f"sqlite:///{workdir['dir'] / 'paths.db'}"
    base = dict(dev="kv", model=workdir["model"], profile=workdir["ref"], trials=3, examples=3, test_examples=1,
                context=300, max_new_tokens=4, batch_size=2, storage=storage, tracking=False, register=False,
                registry=str(workdir["registry"]), attnts_temperatures=(0.8,), threads=1)
    results = {False: calibrate(CalibrationConfig(**base))}
    # The fast study through the command line, as on a GPU (there with --device cuda --dtype bfloat16).
    assert _run_main("--dev", "kv", "--model", workdir["model"], "--profile", workdir["ref"], "--trials", "3",
                     "--examples", "3", "--test-examples", "1", "--context", "300", "--max-new-tokens", "4",
                     "--batch-size", "2", "--storage", storage, "--no-tracking", "--no-register", "--registry",
                     str(workdir["registry"]), "--attnts-temperatures", "0.8", "--threads", "1", "--quiet",
                     "--json", "--fast") == 0
    results[True] = SimpleNamespace(**json.loads(capsys.readouterr().out))
    assert results[True].study_name != results[False].study_name
    studies = {fast: optuna.load_study(study_name=r.study_name, storage=storage) for fast, r in results.items()}
    for exact, fast in zip(studies[False].trials, studies[True].trials, strict=True):
        assert fast.params == exact.params and fast.state == exact.state
        assert fast.user_attrs["scores"] == exact.user_attrs["scores"]
    assert studies[True].user_attrs["baselines"]["vanilla"]["scores"] == \
        studies[False].user_attrs["baselines"]["vanilla"]["scores"]
    assert results[True].scores == results[False].scores
    assert results[False].selection["dev_best"] is not None
    _close(results[True].selection, results[False].selection)  # dev best and test: the same selection recall
    for exact, fast in zip(studies[False].trials, studies[True].trials, strict=True):  # and each trial's
        _close(fast.user_attrs.get("selection"), exact.user_attrs.get("selection"))
    with pytest.raises(CalibrationError, match="different path"):
        calibrate(CalibrationConfig(**base, study_name=results[True].study_name))
    with pytest.raises(CalibrationError, match="different path"):
        calibrate(CalibrationConfig(**base, study_name=results[False].study_name, fast=True))


# --------------------------------------------------------------------------- resume and workers


def test_sigkill_then_rerun_keeps_every_finished_trial(workdir):
    db = workdir["dir"] / "study.db"
    cmd = _cli(workdir, "--trials", "6", "--profile", workdir["ref"], "--max-new-tokens", "24")
    first = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    done: list[tuple[int, str]] = []
    while time.monotonic() < deadline and first.poll() is None:
        if db.exists():
            try:
                done = [t for t in _trials(db) if t[1] == "COMPLETE"]
            except sqlite3.OperationalError:
                done = []  # tables not created yet, or locked for a moment
        if len(done) >= 2:
            break
        time.sleep(0.05)
    assert first.poll() is None, first.communicate()[1].decode()[-3000:]
    assert len(done) >= 2, "the first run never finished two trials"
    first.send_signal(signal.SIGKILL)
    first.wait()
    before = {n: s for n, s in _trials(db)}
    summaries = optuna.get_all_study_summaries(f"sqlite:///{db}")
    assert len(summaries) == 1
    name = summaries[0].study_name
    finished_before = {
        t.number: (t.params, t.values)
        for t in optuna.load_study(study_name=name, storage=f"sqlite:///{db}").trials
        if t.state.is_finished() and t.state != optuna.trial.TrialState.FAIL
    }
    running_before = [n for n, s in before.items() if s == "RUNNING"]

    second = subprocess.run(cmd + ["--json"], env=_env(), capture_output=True, timeout=300)
    assert second.returncode == 0, second.stderr.decode()[-3000:]
    result = json.loads(second.stdout)
    assert result["study_name"] == name and result["trials"]["finished"] == 6

    study = optuna.load_study(study_name=name, storage=f"sqlite:///{db}")
    for number, (params, values) in finished_before.items():  # every finished trial kept as it was
        assert study.trials[number].params == params and study.trials[number].values == values
    states = [t.state.name for t in study.trials]
    assert states.count("COMPLETE") + states.count("PRUNED") == 6
    assert "RUNNING" not in states and "WAITING" not in states
    for number in running_before:  # the trial the kill interrupted: failed, then run again
        assert study.trials[number].state.name == "FAIL"
        retried = [t for t in study.trials if t.user_attrs.get("retry_of") == number]
        if study.trials[number].params:
            assert len(retried) == 1 and retried[0].params == study.trials[number].params
    assert _versions(workdir) == [1, 2]


def _nested_trial_numbers(work) -> list[int]:
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{work['dir'] / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["dysco-calibration"], output_format="list")
    return sorted(int(r.data.tags["optuna.trial_number"]) for r in runs if "optuna.trial_number" in r.data.tags)


def _open_at(url: str, start: float, results) -> None:
    from calibration.storage import open_storage

    while time.time() < start:  # every process opens the new database at the same moment
        pass
    try:
        open_storage(url)
        results.put("ok")
    except Exception as err:
        results.put(repr(err))


def test_processes_opening_a_new_database_at_once_all_succeed(tmp_path):
    """A command and its workers create a new study database together; none may lose the race
    for its tables ("table … already exists", seen on CI before the schema lock)."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    for k in range(3):
        results = context.Queue()
        start = time.time() + 0.5
        procs = [context.Process(target=_open_at, args=(f"sqlite:///{tmp_path / f's{k}.db'}", start, results))
                 for _ in range(4)]
        for proc in procs:
            proc.start()
        outcomes = [results.get(timeout=120) for _ in procs]
        for proc in procs:
            proc.join()
        assert outcomes == ["ok"] * 4, outcomes


def test_two_workers_share_one_study_without_duplicates(workdir):
    db = workdir["dir"] / "study.db"
    base = ["--profile", workdir["ref"], "--max-new-tokens", "48", "--json"]  # trials long enough to share

    # --workers 2: this command and the worker it starts run one study together.
    run = subprocess.run(_cli(workdir, "--trials", "8", "--workers", "2", *base), env=_env(),
                         capture_output=True, timeout=400)
    assert run.returncode == 0, run.stderr.decode()[-3000:]
    name = json.loads(run.stdout)["study_name"]
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{db}")
    assert len(study.trials) == 8 and all(t.state.name in ("COMPLETE", "PRUNED") for t in study.trials)
    # The command waits until its worker has loaded the model and joined, so both run trials.
    pids = [t.user_attrs["worker"]["pid"] for t in study.trials]
    assert len(set(pids)) == 2, f"both processes should run trials: {pids}\n{run.stderr.decode()[-3000:]}"
    assert _nested_trial_numbers(workdir) == list(range(8))  # one MLflow run per trial

    # Two independent commands on the same storage (as on two machines) extend it to 10 trials.
    cmd = _cli(workdir, "--trials", "10", *base)
    procs = [subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outs = [p.communicate(timeout=400) for p in procs]
    for proc, (_, err) in zip(procs, outs):
        assert proc.returncode == 0, err.decode()[-3000:]
    results = [json.loads(out) for out, _ in outs]
    assert results[0]["profile_ref"] == results[1]["profile_ref"]  # registered once, by whoever finished first
    assert _versions(workdir) == [1, 2, 3]
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{db}")
    assert len(study.trials) == 10 and all(t.state.name in ("COMPLETE", "PRUNED") for t in study.trials)
    assert _nested_trial_numbers(workdir) == list(range(10))


# --------------------------------------------------------------------------- bad input


def _run_main(*argv: str):
    from calibration.cli import main

    return main(list(argv))


@pytest.mark.parametrize("value", ["x", "-1", "2.5"])
def test_bad_intervention_warmup_is_a_usage_error_before_any_model_load(monkeypatch, capsys, tmp_path, value):
    import decoder.loading

    def forbidden(*args, **kwargs):
        raise AssertionError("the model was loaded despite a bad --intervention-warmup")

    monkeypatch.setattr(decoder.loading, "load_model", forbidden)
    code = _run_main("--dev", "kv", "--storage", f"sqlite:///{tmp_path / 's.db'}", "--no-tracking", "--quiet",
                     "--intervention-warmup", value)
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("calibrate: error: --intervention-warmup must be 'auto'") and err.count("\n") == 1
    assert not (tmp_path / "s.db").exists()


def test_bad_input_gives_clear_errors_and_registers_nothing(workdir, tmp_path, capsys, tiny_checkpoint):
    base = ["--model", workdir["model"], "--registry", str(workdir["registry"]), "--storage",
            f"sqlite:///{tmp_path / 'bad.db'}", "--no-tracking", "--quiet", "--context", "300",
            "--examples", "2", "--max-new-tokens", "2", "--trials", "1"]

    # trials < 1: a usage error before anything is loaded.
    with pytest.raises(SystemExit) as exit_info:
        _run_main("--dev", "kv", *base, "--trials", "0")
    assert exit_info.value.code == 2
    assert "--trials: must be >= 1, got 0" in capsys.readouterr().err

    # Unknown dev task: a usage error, before the model loads.
    assert _run_main("--dev", "nosuchtask", *base) == 2
    assert "unknown dev task 'nosuchtask'" in capsys.readouterr().err

    # Unreadable data file, then a well-formed file of the wrong shape (a missing field).
    garbage = tmp_path / "mrcr.jsonl"
    garbage.write_bytes(b"\x00\xff not json\n")
    assert _run_main("--dev", str(garbage), *base) == 1
    err = capsys.readouterr().err
    assert "calibrate: error:" in err and str(garbage) in err
    shaped = tmp_path / "mrcr_missing.jsonl"
    shaped.write_text(json.dumps({"prompt": "[]", "answer": "x", "n_needles": 2}) + "\n")
    assert _run_main("--dev", str(shaped), *base) == 1
    assert "random_string_to_prepend" in capsys.readouterr().err

    # A profile made for another model.
    from registry import ModelIdentity, Profile, Registry

    # Same shape as the tiny model, other weights: only the fingerprint tells them apart.
    other = ModelIdentity(name="other-model", architecture="llama", num_layers=4, num_heads=4,
                          num_kv_heads=2, weights_fingerprint="f" * 64)
    other_ref = Registry(workdir["registry"]).register(Profile(model=other, head_set=[(1, 1)]))
    assert _run_main("--dev", "kv", *base, "--profile", other_ref, "--json") == 1
    out, err = capsys.readouterr()
    assert "does not match" in json.loads(out)["error"] and "does not match" in err

    # --needles on a task without needles; heads outside the model.
    assert _run_main("--dev", "kv", *base, "--needles", "4") == 2  # a usage error, before the model loads
    assert "--needles applies to the mrcr task only" in capsys.readouterr().err
    assert _run_main("--dev", "kv", *base, "--heads", "9:0") == 1
    assert "outside tiny-llama (4 layers x 4 heads)" in capsys.readouterr().err

    # A context the model cannot hold.
    assert _run_main("--dev", "kv", *base, "--context", "4095", "--max-new-tokens", "8") == 1
    assert "exceeds the 4096-token context" in capsys.readouterr().err

    # Nothing was registered for the tiny model, and no study was left half made.
    assert _versions(workdir) == [1]
    bad_db = tmp_path / "bad.db"
    assert not bad_db.exists() or optuna.get_all_study_summaries(f"sqlite:///{bad_db}") == []


def test_flat_objective_is_reported_with_what_to_change():
    from optuna.trial import create_trial

    from calibration.study import flat_objective

    def trials(*values):
        return [create_trial(value=v, params={}, distributions={}) for v in values]

    zeros = {"vanilla": {"score": 0.0}, "attnts": {"grid": {"0.8": 0.0, "0.9": 0.0}}}
    flat = flat_objective(zeros, trials(0.0, 0.0), 8, "mrcr", 1024, "smollm2-135m")
    assert flat is not None and "every method scored 0 on mrcr at 1024 tokens" in flat["message"]
    assert "stronger model than smollm2-135m" in flat["message"]
    ones = {"vanilla": {"score": 1.0}, "attnts": {"grid": {"0.8": 1.0}}}
    assert "nothing is left to improve" in flat_objective(ones, trials(1.0), 8, "needle", 2048, "m")["message"]
    # Within one example's worth (1/8) of each other: still flat; one example apart: not flat.
    near = {"vanilla": {"score": 0.5}, "attnts": {"grid": {"0.8": 0.5}}}
    assert flat_objective(near, trials(0.5, 0.5), 8, "kv", 8192, "m") is not None
    assert flat_objective(near, trials(0.5, 0.625), 8, "kv", 8192, "m") is None


def test_no_gain_over_vanilla_is_reported_when_the_best_trial_only_ties_vanilla():
    """Round 4 (Qwen2.5-Coder-1.5B, kv at 16K): the best trials tied vanilla at strength ~1.1; say so."""
    from optuna.distributions import FloatDistribution
    from optuna.trial import create_trial

    from calibration.study import CalibrationResult, no_gain_over_vanilla

    def trial(value, strength):
        return create_trial(value=value, params={"strength": strength},
                            distributions={"strength": FloatDistribution(1.0, 10.0)})

    vanilla = {"vanilla": {"score": 8 / 48}}
    report = no_gain_over_vanilla(vanilla, trial(8 / 48, 1.107), 48, "kv", 16384, "qwen2.5-coder-1.5b")
    assert report is not None and report["best_strength"] == 1.107
    assert "no knob setting beat vanilla on dev" in report["message"]
    assert "close to 1, where DySCO is vanilla" in report["message"]
    assert "qwen2.5-coder-1.5b on kv at 16384 tokens" in report["message"]
    # A strong setting that still only ties: no talk of drifting towards vanilla.
    assert "close to 1" not in no_gain_over_vanilla(vanilla, trial(8 / 48, 3.0), 48, "kv", 16384, "m")["message"]
    # One example (1/48) above vanilla is a gain.
    assert no_gain_over_vanilla(vanilla, trial(9 / 48, 2.0), 48, "kv", 16384, "m") is None
    # The result's table ends with it (a flat objective, when there is one, is said instead).
    result = CalibrationResult(
        study_name="s", storage=None, trials={}, best_trial=0, best_params={}, head_set=[],
        scores={"dev": {}, "test": {}}, tokens_per_s={}, attnts_temperature=0.9, profile_ref=None,
        parent_ref=None, mlflow={}, no_gain=report)
    assert result.table().splitlines()[-1] == f"WARNING: {report['message']}"


def test_an_unreachable_tracking_server_fails_at_once_creating_nothing(tmp_path):
    """Issue 15: mlflow retried for 260 s after the study was created; now one clear error first."""
    import socket
    import time

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    storage = tmp_path / "study.db"
    config = CalibrationConfig(dev="kv", model="no-such-model-is-loaded", heads=[(1, 0)], trials=1,
                               storage=f"sqlite:///{storage}", tracking_uri=f"http://127.0.0.1:{port}")
    began = time.perf_counter()
    with pytest.raises(CalibrationError, match=rf"cannot reach the MLflow tracking server at http://127.0.0.1:{port}"):
        calibrate(config)
    assert time.perf_counter() - began < 10
    assert not storage.exists()  # no study, no model load (the model name would have failed first otherwise)


def _finished_trial(number: int, scores: list[float], vanilla: list[float] | None, penalty: float, **attrs):
    from calibration.study import dev_objective

    trial = optuna.trial.create_trial(
        params={}, distributions={}, value=dev_objective(scores, vanilla, penalty),
        user_attrs={"scores": scores, **attrs},
    )
    trial.number = number
    return trial


def test_the_objective_charges_losses_against_vanilla():
    from calibration.study import dev_objective

    vanilla = [1, 1, 0, 0, 1, 0]
    adds_one = [1, 1, 1, 0, 1, 0]  # one win, no loss
    trades = [1, 0, 1, 1, 1, 1]  # three wins, one loss: one more right answer than `adds_one`
    assert sum(trades) > sum(adds_one)
    assert dev_objective(trades, vanilla, 0.0) > dev_objective(adds_one, vanilla, 0.0)
    assert dev_objective(trades, vanilla, 1.0) == pytest.approx(dev_objective(adds_one, vanilla, 1.0)) == 4 / 6
    assert dev_objective(trades, vanilla, 2.0) < dev_objective(adds_one, vanilla, 2.0)
    # Graded (partial) scores: only the shortfall counts, and a pruner's running scores use vanilla's prefix.
    assert dev_objective([0.5, 1.0], [0.75, 0.0], 1.0) == pytest.approx((0.5 - 0.25 + 1.0) / 2)
    assert dev_objective([0.0], vanilla, 1.0) == -1.0


def test_the_best_trial_replaces_the_published_knobs_only_beyond_noise():
    from calibration.study import choose_knobs

    vanilla = [0.0] * 40
    published = _finished_trial(0, [1.0] * 20 + [0.0] * 20, vanilla, 1.0, published_defaults=True)
    lucky = _finished_trial(7, [1.0] * 23 + [0.0] * 17, vanilla, 1.0)  # 3 more right: 3W/0L, p = 0.25
    chosen, why = choose_knobs(lucky, published, vanilla, 1.0, 0.05)
    assert chosen is published and not why["adopted"] and why["chosen_trial"] == 0
    assert (why["wins"], why["losses"]) == (3, 0) and why["p_value"] == pytest.approx(0.25)
    assert "published defaults (trial 0) are kept" in why["message"] and "p = 0.25" in why["message"]

    clear = _finished_trial(9, [1.0] * 30 + [0.0] * 10, vanilla, 1.0)  # 10W/0L, p = 0.002
    chosen, why = choose_knobs(clear, published, vanilla, 1.0, 0.05)
    assert chosen is clear and why["adopted"] and why["p_value"] < 0.01
    assert "trial 9 replaces the published defaults" in why["message"]
    # adopt_p = 1 always takes the best trial; so does a study whose published trial did not complete.
    assert choose_knobs(lucky, published, vanilla, 1.0, 1.0)[0] is lucky
    assert choose_knobs(lucky, None, vanilla, 1.0, 0.05)[0] is lucky
    assert choose_knobs(published, published, vanilla, 1.0, 0.05)[1]["message"].endswith(
        "the published defaults are the best trial")


@pytest.mark.parametrize("flag, value, expected", [
    ("--loss-penalty", "-1", "expected a finite number >= 0, got '-1'"),
    ("--loss-penalty", "nan", "expected a finite number >= 0, got 'nan'"),
    ("--adopt-p", "0", "expected a p-value in (0, 1], got '0'"),
    ("--adopt-p", "x", "expected a p-value in (0, 1], got 'x'"),
])
def test_bad_objective_options_are_usage_errors(capsys, flag, value, expected):
    with pytest.raises(SystemExit) as exit_info:
        _run_main("--dev", "kv", flag, value)
    assert exit_info.value.code == 2
    assert expected in capsys.readouterr().err


@pytest.mark.embedded
def test_fast_path_trials_match_the_exact_path_on_smollm2(smollm2):
    """Real weights, real chat prompts of two lengths in one padded batch: fast-path trials from the
    shared prefill give the exact path's responses and scores (vanilla and the published knobs)."""
    from calibration.runner import ExampleRunner, Method
    from calibration.tasks import get_task
    from decoder.dysco import DyscoConfig

    model, tokenizer = smollm2
    task = get_task("kv")
    examples = task.generate(tokenizer, 1, 400, 0) + task.generate(tokenizer, 1, 250, 1)
    heads = [(8, 2), (15, 4), (20, 1), (21, 7)]
    methods = [Method.vanilla(), Method.dysco(DyscoConfig(head_set=heads))]  # warmups 0 and 12 of the shared 16
    runners = [ExampleRunner(model, tokenizer, task, examples, max_new_tokens=5, batch_size=2, warmup=16, fast=fast)
               for fast in (False, True)]
    for method in methods:
        exact, fast = (runner.evaluate(method) for runner in runners)
        assert fast.responses == exact.responses, method
        assert fast.scores == exact.scores
        _same_selection(fast.extra["selection"], exact.extra["selection"], dysco=method.name == "dysco")
