"""The selection mode as a calibrated knob, and accuracy and speed optimised together (issue 13).

Mechanics on the tiny random Llama of test_calibration (its fixtures); the cost model and the
choice of the registered point on hand-made trials.
"""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import unquote, urlparse

import optuna
import pytest
from optuna.trial import create_trial

from calibration.errors import CalibrationError
from calibration.pareto import choose, front_points, front_table, plot_front, token_cost
from calibration.space import INTERVENTION_WARMUPS, KNOBS, PUBLISHED, SearchSpace
from calibration.study import CalibrationConfig, calibrate
from test_calibration import _run_main, tiny_checkpoint, tiny_identity, workdir  # noqa: F401 (fixtures)

# What a study stored as its search space before selection became a knob (main at 131a61b), for a
# 4096-token model with 16 ranked heads: a study made then must still find its definition equal.
SPACE_BEFORE = {"strength": [1.0, 8.0], "top_k": [16, 4096], "top_p": [0.5, 1.0], "decay": [0.0, 0.95],
                "num_heads": [1, 16], "intervention_warmup": list(INTERVENTION_WARMUPS)}
DEFINITION_KEYS_BEFORE = {"model", "dev", "examples_sha256", "n_dev", "n_test", "context", "max_new_tokens",
                          "batch_size", "head_ranking_sha256", "context_warmup", "selection", "space", "objectives",
                          "loss_penalty", "attnts_temperatures", "seed", "dtype"}


def _config(work, **overrides) -> CalibrationConfig:
    base = dict(dev="kv", model=work["model"], profile=work["ref"], trials=6, examples=2, test_examples=1,
                context=300, max_new_tokens=4, storage=None, tracking=False, registry=str(work["registry"]),
                attnts_temperatures=(0.8,), threads=1)
    return CalibrationConfig(**{**base, **overrides})


def _trial(number: int, objective: float, cost: float, **attrs):
    trial = create_trial(values=[objective, cost], params={}, distributions={}, user_attrs=attrs)
    trial.number = number
    return trial


def _dominates(a, b) -> bool:
    """a is at least as accurate and as cheap as b, and strictly better in one."""
    return a[0] >= b[0] and a[1] <= b[1] and (a[0] > b[0] or a[1] < b[1])


# --------------------------------------------------------------------------- the cost model and the rule


def test_cost_model_counts_the_probe_layers_of_dynamic_selection_only():
    # Qwen3-8B's published heads reach layer 24 of 36: 1 + 25/36, measured 1.69-1.73x on the H200.
    assert token_cost("dynamic", [(24, 3), (17, 0)], 36) == pytest.approx(1 + 25 / 36)
    assert token_cost("dynamic", [(0, 1)], 4) == 1.25 and token_cost("dynamic", [(3, 0)], 4) == 2.0
    assert token_cost("lagged", [(24, 3)], 36) == token_cost("static", [(24, 3)], 36) == 1.0
    with pytest.raises(ValueError, match="needs a model with layers and a head set"):
        token_cost("dynamic", [], 36)


def test_the_registered_point_is_the_most_accurate_within_the_budget():
    trials = [_trial(0, 0.50, 1.8, published_defaults=True), _trial(1, 0.60, 1.9), _trial(2, 0.55, 1.0),
              _trial(3, 0.55, 1.0), _trial(4, 0.40, 1.0)]
    study = optuna.create_study(directions=["maximize", "minimize"])
    study.add_trials(trials)
    front = study.best_trials
    assert {t.number for t in front} == {1, 2, 3}
    assert choose(front).number == 1  # the most accurate
    assert choose(front, max_cost=1.5).number == 2  # within the budget; a tie goes to the earlier trial
    with pytest.raises(CalibrationError, match=r"no complete trial costs at most --max-cost 0.5: the cheapest costs 1"):
        choose(front, max_cost=0.5)
    points = front_points(front)
    assert [p.trial for p in points] == [2, 3, 1]  # cheapest first
    table = front_table(points, "cost", chosen=2)
    assert table.splitlines()[0].startswith("Pareto front (cost: passes per token, vanilla = 1")
    assert any(line.startswith("   2*") for line in table.splitlines())


# --------------------------------------------------------------------------- selection as a knob


def test_selection_is_searched_only_when_asked_and_a_default_space_is_stored_as_before():
    space = SearchSpace.for_model(4096, 16)
    assert space.to_dict() == SPACE_BEFORE and space.defaults() == PUBLISHED
    assert "selection" not in space.distributions()

    searched = SearchSpace.for_model(4096, 16, selection=("lagged", "dynamic", "static"))
    assert searched.to_dict() == {**SPACE_BEFORE, "selection": ["lagged", "dynamic", "static"],
                                  "lagged_probs": ["plain", "biased"]}
    assert searched.defaults() == {**PUBLISHED, "selection": "dynamic"}  # the published mode first
    assert SearchSpace.for_model(4096, 16, selection=("lagged",), lagged_probs=("biased",)).defaults() \
        == {**PUBLISHED, "selection": "lagged", "lagged_probs": "biased"}
    assert "lagged_probs" not in SearchSpace.for_model(4096, 16, selection=("static", "dynamic")).to_dict()

    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    drawn = [searched.suggest(study.ask()) for _ in range(40)]
    assert {d["selection"] for d in drawn} == {"dynamic", "lagged", "static"}
    for d in drawn:  # lagged_probs only for the lagged trials; every knob of KNOBS for all
        assert ("lagged_probs" in d) == (d["selection"] == "lagged") and set(KNOBS) <= set(d)
    assert {d["lagged_probs"] for d in drawn if "lagged_probs" in d} == {"plain", "biased"}
    # Drawn first, so that a trial that drew its last knob (storage re-queues those) drew all of them.
    assert list(study.trials[0].params)[0] == "selection"

    for bad, message in ((("fast",), "selection choices must be distinct values among dynamic, static, lagged"),
                         (("lagged", "lagged"), "selection choices must be distinct"),
                         ):
        with pytest.raises(ValueError, match=message):
            SearchSpace.for_model(4096, 16, selection=bad)
    with pytest.raises(ValueError, match="lagged_probs choices"):
        SearchSpace.for_model(4096, 16, selection=("lagged",), lagged_probs=())


def test_one_prefill_serves_every_selection_mode():
    """Lagged and static trials decode from the study's shared prefill exactly as they do alone."""
    from calibration.runner import ExampleRunner, Method
    from calibration.tasks import get_task
    from decoder.dysco import DyscoConfig
    from decoder.generation import Decoder
    from decoder.tiny import tiny_model

    model, tokenizer = tiny_model("llama")
    task = get_task("kv")
    examples = task.generate(tokenizer, 2, 300, 0)
    space = SearchSpace.for_model(4096, 16, selection=("dynamic", "lagged", "static"))
    shared = ExampleRunner(model, tokenizer, task, examples, max_new_tokens=6, batch_size=2,
                           warmup=5 + space.intervention_warmup_tokens(tokenizer))
    prompts = [example.messages for example in examples]
    responses = {}
    for selection, probs in (("dynamic", "plain"), ("lagged", "plain"), ("lagged", "biased"), ("static", "plain")):
        config = DyscoConfig(head_set=[(1, 0), (2, 3)], context_warmup=5, intervention_warmup=4, strength=8.0,
                             selection=selection, lagged_probs=probs)
        together = shared.evaluate(Method.dysco(config)).responses
        alone = Decoder(model, tokenizer, dysco=config).generate(prompts, max_new_tokens=6).texts
        assert together == alone, (selection, probs)
        responses[selection, probs] = together
    assert len(shared._prefills) == 1


# --------------------------------------------------------------------------- whole studies


def test_a_default_study_keeps_its_definition_and_resumes(workdir):
    storage = f"sqlite:///{workdir['dir'] / 'study.db'}"
    first = calibrate(_config(workdir, trials=2, storage=storage, register=False))
    study = optuna.load_study(study_name=first.study_name, storage=storage)
    definition = study.user_attrs["definition"]
    assert set(definition) == DEFINITION_KEYS_BEFORE and definition["space"] == SPACE_BEFORE
    assert definition["objectives"] == ["score"] and len(study.directions) == 1
    assert all("selection" not in t.params for t in study.trials)
    again = calibrate(_config(workdir, trials=3, storage=storage, register=False))
    assert again.study_name == first.study_name and again.trials["finished"] == 3
    # Searching selection, or adding a speed objective, is another study: said, not mixed in.
    for change, differ in (({"selection": ("dynamic", "lagged")}, "space"), ({"speed_objective": "cost"}, "objectives")):
        with pytest.raises(CalibrationError, match=f"different {differ}"):
            calibrate(_config(workdir, trials=4, storage=storage, register=False, study_name=first.study_name, **change))


def test_a_cost_study_gives_a_pareto_front_plotted_and_stored_with_the_profile(workdir):
    import mlflow
    from registry import Registry

    tracking = f"sqlite:///{workdir['dir'] / 'mlflow.db'}"
    config = _config(workdir, selection=("dynamic", "lagged", "static"), speed_objective="cost", max_cost=1.0,
                     storage=f"sqlite:///{workdir['dir'] / 'study.db'}", tracking=True, tracking_uri=tracking)
    result = calibrate(config)
    study = optuna.load_study(study_name=result.study_name, storage=config.storage)
    assert study.directions == [optuna.study.StudyDirection.MAXIMIZE, optuna.study.StudyDirection.MINIMIZE]
    assert study.metric_names == ["score", "cost"]
    complete = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(complete) == 6 and not study.get_trials(states=(optuna.trial.TrialState.PRUNED,))
    assert complete[0].params["selection"] == "dynamic" and complete[0].user_attrs.get("published_defaults")
    for t in complete:  # the cost is the model's, for the trial's own selection and head set
        assert t.values[1] == pytest.approx(token_cost(t.params["selection"], t.user_attrs["head_set"], 4))
        assert t.user_attrs["ms_per_token"] > 0

    # The front: non-dominated, and every other complete trial is dominated by a point of it.
    front = {p["trial"]: (p["objective"], p["cost"]) for p in result.pareto_front}
    values = {t.number: tuple(t.values) for t in complete}
    assert front and all(front[n] == values[n] for n in front)
    for n, v in values.items():
        beaten = any(_dominates(values[m], v) for m in values if m != n)
        assert beaten == (n not in front), n
    assert [p["cost"] for p in result.pareto_front] == sorted(p["cost"] for p in result.pareto_front)

    # --max-cost 1: one pass per token. The published (dynamic) trial costs more, so the most accurate
    # point within the budget is registered, with its selection; the adoption record says why.
    chosen = result.adoption["chosen_trial"]
    assert chosen == result.best_trial and front[chosen][1] <= 1.0
    assert front[chosen][0] == max(v[0] for v in values.values() if v[1] <= 1.0)
    assert "--max-cost 1" in result.adoption["message"] and result.adoption["speed_objective"] == "cost"
    profile = Registry(workdir["registry"]).load(result.profile_ref)
    assert profile.knobs.selection == result.best_params["selection"] in ("lagged", "static")
    if profile.knobs.selection == "lagged":
        assert profile.knobs.lagged_probs == result.best_params["lagged_probs"]
    stored = profile.metrics["pareto_front"]
    assert stored["points"] == result.pareto_front and stored["chosen_trial"] == chosen
    assert stored["metric"] == "cost" and stored["max_cost"] == 1.0
    assert "Pareto front (cost" in result.table()

    # MLflow: the plot and the front next to the study's other plots.
    client = mlflow.MlflowClient(tracking)
    plots = {a.path for a in client.list_artifacts(result.mlflow["run_id"], "plots")}
    assert {"plots/pareto_front.png", "plots/optimization_history.png"} <= plots
    root = Path(unquote(urlparse(client.get_run(result.mlflow["run_id"]).info.artifact_uri).path))
    png = root / "plots" / "pareto_front.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    logged = json.loads((root / "pareto" / "pareto_front.json").read_text())
    assert logged["points"] == result.pareto_front
    assert client.get_run(result.mlflow["run_id"]).data.metrics["pareto_points"] == len(front)


def test_a_cost_study_is_deterministic_under_its_seed(workdir):
    def run(seed: int):
        result = calibrate(_config(workdir, selection=("dynamic", "lagged"), speed_objective="cost", seed=seed,
                                   register=False, trials=5))
        return result.pareto_front, result.adoption["chosen_trial"]

    a, b = run(0), run(0)
    assert a == b and a[0]
    assert {p["params"]["selection"] for p in a[0]} <= {"dynamic", "lagged"}


def test_plot_front_draws_a_png(tmp_path):
    trials = [_trial(0, 0.5, 1.8, published_defaults=True), _trial(1, 0.6, 1.9), _trial(2, 0.55, 1.0)]
    points = front_points([t for t in trials if t.number != 0])
    path = plot_front(trials, points, tmp_path / "front.png", "cost", chosen=2)
    assert path.read_bytes()[:4] == b"\x89PNG"


# --------------------------------------------------------------------------- bad flag combinations


@pytest.mark.parametrize("argv, expected", [
    (["--max-cost", "2"], "--max-cost picks a point of the Pareto front, so it needs a speed objective"),
    (["--speed-objective", "cost", "--max-cost", "0.5"], "--max-cost 0.5 admits no trial"),
    (["--lagged-probs", "biased"], "--lagged-probs only applies when lagged selection is searched"),
    (["--selection", "dynamic,static", "--lagged-probs", "plain"], "add lagged to --selection"),
    (["--speed-objective", "measured", "--devices", "0,1"],
     "--speed-objective measured compares decode times between trials, but --devices cuda:0,cuda:1"),
])
def test_bad_speed_and_selection_combinations_are_usage_errors(capsys, tmp_path, argv, expected):
    code = _run_main("--dev", "kv", "--storage", f"sqlite:///{tmp_path / 's.db'}", "--no-tracking", "--quiet", *argv)
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("calibrate: error: ") and expected in err and err.count("\n") == 1
    assert not (tmp_path / "s.db").exists()


@pytest.mark.parametrize("argv, expected", [
    (["--selection", "dynamic,fast"], "expected distinct names among dynamic,static,lagged"),
    (["--selection", "lagged,lagged"], "expected distinct names among dynamic,static,lagged"),
    (["--lagged-probs", "raw"], "expected distinct names among plain,biased"),
    (["--speed-objective", "tokens"], "invalid choice: 'tokens'"),
    (["--max-cost", "-1"], "expected a finite number > 0, got '-1'"),
])
def test_malformed_speed_and_selection_values_are_refused_by_the_parser(capsys, argv, expected):
    with pytest.raises(SystemExit) as exit_info:
        _run_main("--dev", "kv", *argv)
    assert exit_info.value.code == 2
    assert expected in capsys.readouterr().err


def test_the_old_boolean_speed_objective_is_refused_clearly():
    with pytest.raises(CalibrationError, match="speed_objective must be one of none, cost, measured, got True"):
        CalibrationConfig(dev="kv", speed_objective=True).validate()


def test_a_budget_no_trial_meets_is_said_and_the_same_study_rechooses(workdir):
    storage = f"sqlite:///{workdir['dir'] / 'study.db'}"
    # Dynamic selection only: every trial probes, so none costs one pass per token.
    config = _config(workdir, trials=2, storage=storage, speed_objective="cost", max_cost=1.0, register=False)
    with pytest.raises(CalibrationError, match=r"no complete trial costs at most --max-cost 1: the cheapest costs 1\.\d+"):
        calibrate(config)
    again = calibrate(_config(workdir, trials=2, storage=storage, speed_objective="cost", max_cost=2.0, register=False))
    assert again.trials == {"finished": 2, "complete": 2, "pruned": 0, "failed": 0}  # the trials were kept
    assert again.adoption["max_cost"] == 2.0 and all(p["cost"] > 1 for p in again.pareto_front)
