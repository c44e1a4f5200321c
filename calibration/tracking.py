"""MLflow bookkeeping of a calibration study, with plain `mlflow` (no optuna-integration).

One parent run per study; one nested run per finished trial (parameters, score, tokens/s,
duration, the running score after each batch); the study's plots and the final profile as
artifacts of the parent.

Trials are logged by *syncing* from the Optuna storage rather than from inside each trial: the
process that owns the study (the `calibrate` command, never its extra workers) copies every
finished trial that has no run yet. So the tracking store has a single writer however many
workers share the study, and a trial that finished just before a crash is logged on the rerun.

    tracker = Tracker("sqlite:///mlflow.db")
    parent = tracker.start(study, params={"dev": "mrcr"})   # reused when the study resumes
    tracker.sync_trials(study)                              # after each trial
    tracker.log_plots(study); tracker.end()
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

EXPERIMENT = "dysco-calibration"
# mlflow 3 itself defaults to a SQLite store named like this in the working folder.
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
_PARENT_RUNS_ATTR = "mlflow_parent_runs"  # study user attr: {tracking uri: parent run id}

log = logging.getLogger(__name__)

_STATUS = {TrialState.COMPLETE: "FINISHED", TrialState.PRUNED: "FINISHED", TrialState.FAIL: "FAILED"}


def _ms(when: Any) -> int | None:
    return None if when is None else int(when.timestamp() * 1000)


def _param_value(value: Any) -> str:
    # MLflow params are strings of at most a few thousand characters.
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return text[:6000]


class Tracker:
    """Writes one study's runs into an MLflow tracking store (local SQLite by default)."""

    def __init__(self, tracking_uri: str | None = None, experiment: str = EXPERIMENT) -> None:
        from mlflow import MlflowClient

        self.tracking_uri = tracking_uri or DEFAULT_TRACKING_URI
        self.experiment = experiment
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # mlflow's own deprecation chatter on first use
            self.client = MlflowClient(self.tracking_uri)
        self.parent_run_id: str | None = None
        self._logged: set[int] | None = None

    # --- the parent run ----------------------------------------------------------------------

    def _experiment_id(self) -> str:
        found = self.client.get_experiment_by_name(self.experiment)
        if found is not None:
            return found.experiment_id
        from mlflow.exceptions import MlflowException

        try:
            return self.client.create_experiment(self.experiment)
        except MlflowException:  # created meanwhile by another process
            return self.client.get_experiment_by_name(self.experiment).experiment_id

    def start(self, study: optuna.Study, params: Mapping[str, Any], tags: Mapping[str, str] | None = None) -> str:
        """Open (or, when the study already has one in this store, reopen) the study's parent run."""
        from mlflow.exceptions import MlflowException

        known = dict(study.user_attrs.get(_PARENT_RUNS_ATTR, {}))
        run_id = known.get(self.tracking_uri)
        if run_id is not None:
            try:
                run = self.client.get_run(run_id)
                if run.info.lifecycle_stage != "active":
                    run_id = None
            except MlflowException:
                run_id = None  # the store was wiped or moved: start afresh
        if run_id is None:
            run = self.client.create_run(
                self._experiment_id(),
                run_name=study.study_name,
                tags={"optuna.study_name": study.study_name, **dict(tags or {})},
            )
            run_id = run.info.run_id
            self.client.log_batch(
                run_id, params=[_mlflow_param(k, v) for k, v in sorted(params.items())]
            )
            known[self.tracking_uri] = run_id
            study.set_user_attr(_PARENT_RUNS_ATTR, known)
        else:
            self.client.update_run(run_id, status="RUNNING")
        self.parent_run_id = run_id
        return run_id

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        """Log flat numeric metrics on the parent run."""
        from mlflow.entities import Metric

        stamp = _now_ms()
        batch = [Metric(k, float(v), stamp, step) for k, v in sorted(metrics.items()) if v is not None]
        if batch:
            self.client.log_batch(self._parent(), metrics=batch)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Set string tags on the parent run (e.g. the registered profile reference)."""
        for key, value in tags.items():
            self.client.set_tag(self._parent(), key, str(value))

    def end(self, status: str = "FINISHED") -> None:
        """Mark the parent run finished (or FAILED/KILLED)."""
        if self.parent_run_id is not None:
            self.client.set_terminated(self.parent_run_id, status=status)

    def _parent(self) -> str:
        if self.parent_run_id is None:
            raise RuntimeError("Tracker.start(study, …) must be called first")
        return self.parent_run_id

    # --- nested runs, one per finished trial ---------------------------------------------------

    def logged_trials(self, refresh: bool = False) -> set[int]:
        """Numbers of the trials that already have a nested run under the parent."""
        if self._logged is None or refresh:
            runs = self.client.search_runs(
                [self._experiment_id()],
                filter_string=f"tags.mlflow.parentRunId = '{self._parent()}'",
                max_results=50_000,
            )
            self._logged = {
                int(run.data.tags["optuna.trial_number"])
                for run in runs
                if "optuna.trial_number" in run.data.tags
            }
        return self._logged

    def sync_trials(self, study: optuna.Study) -> int:
        """Log a nested run for every finished trial without one; returns how many were added."""
        # Fresh from the store: another command on the same study may have logged some.
        done = self.logged_trials(refresh=True)
        added = 0
        for trial in study.get_trials(deepcopy=False, states=tuple(_STATUS)):
            if trial.number not in done:
                self._log_trial(study, trial)
                done.add(trial.number)
                added += 1
        return added

    def _log_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        from mlflow.entities import Metric, Param

        run = self.client.create_run(
            self._experiment_id(),
            start_time=_ms(trial.datetime_start),
            run_name=f"trial-{trial.number}",
            tags={
                "mlflow.parentRunId": self._parent(),
                "optuna.study_name": study.study_name,
                "optuna.trial_number": str(trial.number),
                "optuna.trial_state": trial.state.name,
            },
        )
        stamp = _ms(trial.datetime_complete) or _now_ms()
        metrics: list[Metric] = []
        if trial.values is not None:
            names = study.metric_names or [f"objective_{i}" for i in range(len(trial.values))]
            metrics += [Metric(name, float(v), stamp, 0) for name, v in zip(names, trial.values)]
        for key in ("score", "tokens_per_s", "new_tokens", "decode_seconds", "token_cost", "ms_per_token"):
            if key in trial.user_attrs and not any(m.key == key for m in metrics):
                metrics.append(Metric(key, float(trial.user_attrs[key]), stamp, 0))
        if trial.duration is not None:
            metrics.append(Metric("duration_s", trial.duration.total_seconds(), stamp, 0))
        for step, value in sorted(trial.intermediate_values.items()):
            metrics.append(Metric("running_score", float(value), stamp, step))
        params = [Param(k, _param_value(v)) for k, v in sorted(trial.params.items())]
        extra = {k: v for k, v in trial.user_attrs.items() if k in ("head_set", "worker", "retry_of")}
        params += [Param(k, _param_value(v)) for k, v in sorted(extra.items())]
        self.client.log_batch(run.info.run_id, metrics=metrics, params=params)
        self.client.set_terminated(run.info.run_id, status=_STATUS[trial.state], end_time=stamp)

    # --- artifacts ---------------------------------------------------------------------------

    def log_plots(self, study: optuna.Study) -> list[str]:
        """Optuna's history and parameter-importance plots (of the dev objective) as PNG, plus HTML
        when plotly is installed; with two objectives the study draws its own Pareto plot
        (`calibration.pareto.plot_front`, logged with `log_file`). Returns the artifact paths written; a plot that cannot
        be drawn yet (too few trials) is skipped with a note in the log."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
        from optuna.visualization import matplotlib as ovm

        target = None
        target_name = "score"
        if len(study.directions) > 1:
            target = lambda t: t.values[0]  # noqa: E731  (the accuracy objective)
        plots = {
            "optimization_history": lambda: ovm.plot_optimization_history(
                study, target=target, target_name=target_name
            ),
            "param_importances": lambda: ovm.plot_param_importances(
                study, evaluator=_importance_evaluator(), target=target, target_name=target_name
            ),
        }
        written: list[str] = []
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # optuna marks its matplotlib backend experimental
            for name, draw in plots.items():
                try:
                    ax = draw()
                except (ValueError, RuntimeError, ZeroDivisionError) as err:
                    log.info("skipping the %s plot: %s", name, err)
                    continue
                figure = getattr(ax, "figure", None) or ax.flat[0].figure
                path = Path(tmp) / f"{name}.png"
                figure.savefig(path, dpi=110, bbox_inches="tight")
                plt.close(figure)
                self.client.log_artifact(self._parent(), str(path), artifact_path="plots")
                written.append(f"plots/{name}.png")
            written += self._log_html(study, target, target_name, tmp)
        return written

    def _log_html(self, study: optuna.Study, target, target_name: str, tmp: str) -> list[str]:
        from optuna import visualization as ov

        if not ov.is_available():  # plotly is optional
            return []
        written = []
        for name, draw in (
            ("optimization_history", ov.plot_optimization_history),
            ("param_importances", ov.plot_param_importances),
        ):
            try:
                kwargs = {"evaluator": _importance_evaluator()} if name == "param_importances" else {}
                figure = draw(study, target=target, target_name=target_name, **kwargs)
            except (ValueError, RuntimeError, ZeroDivisionError):
                continue
            path = os.path.join(tmp, f"{name}.html")
            figure.write_html(path, include_plotlyjs="cdn")
            self.client.log_artifact(self._parent(), path, artifact_path="plots")
            written.append(f"plots/{name}.html")
        return written

    def log_file(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Store a file (e.g. a plot) as an artifact of the parent run."""
        self.client.log_artifact(self._parent(), str(path), artifact_path=artifact_path)

    def log_json(self, obj: Any, name: str, artifact_path: str | None = None) -> None:
        """Store a JSON document (e.g. the final profile) as an artifact of the parent run."""
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            path.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
            self.client.log_artifact(self._parent(), str(path), artifact_path=artifact_path)


def check_reachable(
    tracking_uri: str | None, timeout_s: float = 5.0,
    advice: str = "start it (`mlflow server`), fix --tracking-uri, or pass --no-tracking",
) -> None:
    """Raise ConnectionError, naming the URI, when an http(s) tracking server does not answer within
    `timeout_s` (mlflow itself retries for minutes); file and database stores are not checked here."""
    import urllib.error
    import urllib.request

    if not tracking_uri or not tracking_uri.lower().startswith(("http://", "https://")):
        return
    url = tracking_uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s):
            return
    except urllib.error.HTTPError:
        return  # it answered (with an error page): a server is there
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise ConnectionError(
            f"cannot reach the MLflow tracking server at {tracking_uri} ({reason}, within {timeout_s:g} s); {advice}"
        ) from None


def _importance_evaluator():
    # Seeded, so the same study draws the same importances; 32 trees are plenty for tens of trials.
    return optuna.importance.FanovaImportanceEvaluator(n_trees=32, seed=0)


def _mlflow_param(key: str, value: Any):
    from mlflow.entities import Param

    return Param(key, _param_value(value))


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)
