"""The calibration study: Optuna tunes DySCO's knobs on a dev task and registers the result.

    from calibration import CalibrationConfig, calibrate
    result = calibrate(CalibrationConfig(dev="mrcr", model="smollm2-135m", trials=20,
                                         storage="sqlite:///calibration.db"))
    result.profile_ref, result.scores["test"]   # → ('smollm2-135m@2', {'vanilla': …, 'attnts': …, 'dysco': …})

What one run does, in order:

1. Resolve the dev task, load the model, take the head ranking from the input profile (its
   `head_scores["qr"]`, else its head-set order) or from `--heads`, build and split the examples.
2. Create the study, or load it by name. A loaded study must have been made with the same
   model, examples, head ranking and search space (checked, not assumed). The published
   defaults are enqueued as the first trial of a new study.
3. Evaluate vanilla and AttnTS (a small temperature grid, best kept) once on the dev examples;
   the scores live in the study, so a rerun never recomputes them.
4. Run trials until `trials` have finished (complete or pruned): seeded TPE over strength,
   top_k, top_p, decay, the number of heads and intervention_warmup (unless `intervention_warmup`
   fixes it); a median pruner fed the running objective after each batch. The objective is the
   dev score minus `loss_penalty` times the share of dev examples vanilla gets right and the trial
   gets wrong (`dev_objective`): a setting that trades examples with vanilla is worth less than
   one that only adds. `selection` (dynamic, lagged, static) is searched too when asked for.
   Optional second objective, minimised: the cost of a generated token, modelled or measured
   (`calibration.pareto`): a Pareto front of profiles, and no pruning.
   Every trial continues one plain prefill per batch, which stops before the largest
   context_warmup + intervention_warmup any trial can use.
5. Choose the knobs to register (`adoption`): the best trial (with a speed objective: the most
   accurate point of the Pareto front within `max_cost`, `calibration.pareto.choose`) replaces the published defaults
   (trial 0) only if it beats them on the dev examples by more than their noise, a paired sign
   test at p < `adopt_p`; the best of a few dozen trials on a small dev set is otherwise mostly
   the luckiest one. Re-score the chosen knobs, the published ones, vanilla and AttnTS on the
   held-out test examples, and register a new profile version (parent: the input profile) with
   every score and the provenance.

Resuming and sharing. Every trial is written to the Optuna storage the moment it finishes, so
a killed run loses only the trial in flight. A RUNNING trial whose process is gone (same host:
its pid is checked; another host: its heartbeat stops) is marked failed and its parameters are
queued again. Workers take trials under the study's lock (a file lock for one host's processes;
on a PostgreSQL/MySQL storage also a lock in the database server, for other hosts' processes), so
together they run exactly `trials` trials. `devices` runs one worker per listed GPU
(docs/scaling.md, "Calibration across GPUs and hosts"). Storages, locks and heartbeats live in
`calibration.storage`, the extra worker processes in `calibration.workers`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from calibration.errors import CalibrationError
from calibration.evaluation.statistics import paired_comparison, seed_for, sign_test
from calibration.pareto import (
    COST_METRICS,
    SPEED_OBJECTIVES,
    FrontPoint,
    choose,
    front_points,
    front_table,
    ms_per_token,
    plot_front,
    token_cost,
)
from calibration.runner import Evaluation, ExampleRunner, Method, dysco_warmup
from calibration.space import SearchSpace
from calibration.storage import (
    SERVER_BACKENDS,
    DatabaseLock,
    Locks,
    backend_name,
    heartbeat,
    lock_path,
    open_storage,
    reclaim_dead_trials,
    storage_label,
    this_worker,
)
from calibration.tasks import get_task, split
from calibration.tracking import Tracker, check_reachable
from calibration.workers import WorkerProcesses, check_devices, die_with_parent, process_configs, worker_command
from decoder import loading  # `loading.load_model`, looked up at call time: tests replace it
from decoder.loading import DTYPE_NAMES, check_device, context_limit, model_identity, model_name
from registry import (
    Knobs,
    ModelIdentity,
    Profile,
    ProfileNotFound,
    ProfileValidationError,
    Registry,
    RegistryError,
    check_model,
    parse_head_set,
    parse_intervention_warmup,
)
from registry.profile import library_versions

log = logging.getLogger(__name__)

ATTNTS_TEMPERATURES = (0.7, 0.8, 0.9)
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


@dataclass
class CalibrationConfig:
    """Everything one calibration depends on; the CLI's options map one to one onto it."""

    dev: str
    model: str = "smollm2-135m"
    profile: str | None = None
    heads: list[tuple[int, int]] | None = None
    trials: int = 20
    examples: int = 8
    test_examples: int | None = None  # default: half of `examples`, at least one
    context: int = 1024
    needles: int | None = None
    max_new_tokens: int = 48
    batch_size: int = 1
    storage: str | None = None  # None: in memory (one process, nothing to resume)
    study_name: str | None = None  # default: derived from everything the study depends on
    workers: int = 1
    tracking_uri: str | None = None  # None: sqlite:///mlflow.db in the working folder
    tracking: bool = True
    registry: str | None = None  # None: the registry's default root
    register: bool = True
    seed: int = 0
    # A second objective, minimised: "cost" (passes per generated token, a model) or "measured" (decode
    # ms per token); "none": the dev objective alone (`calibration.pareto`).
    speed_objective: str = "none"
    attnts_temperatures: tuple[float, ...] = ATTNTS_TEMPERATURES
    threads: int | None = None  # torch threads per worker; None: cores / workers
    # None: searched (SearchSpace's choices, "auto" first); "auto" or a token count: fixed to it.
    intervention_warmup: int | str | None = None
    device: str = "cpu"  # where the model runs: "cpu", "cuda", "cuda:1", …
    # One process per listed CUDA device ("cuda:0", "cuda:1", …), this one on the first; `workers` = their number.
    devices: tuple[str, ...] | None = None
    dtype: str | None = None  # None: the checkpoint's own (catalogue models: float32); "bfloat16" on a GPU
    loss_penalty: float = 1.0  # extra cost of a dev example vanilla gets right and the trial wrong
    adopt_p: float = 0.05  # the best trial replaces the published knobs only below this sign-test p
    fast: bool = False  # decode trials, baselines and the test on the fast path (decoder.fast.FastDecoder)
    max_cost: float | None = None  # with a speed objective: register the best point costing at most this
    # None: every trial uses the starting profile's selection; else searched over these modes.
    selection: tuple[str, ...] | None = None
    lagged_probs: tuple[str, ...] | None = None  # the lagged trials' choices (None: plain and biased)

    def validate(self) -> None:
        """Raise `CalibrationError` naming the first bad setting."""
        def positive(name: str, minimum: int = 1) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise CalibrationError(f"{name} must be an integer >= {minimum}, got {value!r}")

        for name in ("trials", "examples", "context", "max_new_tokens", "batch_size", "workers"):
            positive(name)
        if self.test_examples is not None:
            positive("test_examples")
        if self.threads is not None:
            positive("threads")
        if self.profile is not None and self.heads is not None:
            raise CalibrationError("give either a profile or a head list (--heads), not both")
        if self.heads is not None and not self.heads:
            raise CalibrationError("the head list (--heads) is empty")
        if self.workers > 1 and self.storage is None:
            raise CalibrationError("several workers need a shared storage: pass a storage URL (--storage)")
        if isinstance(self.loss_penalty, bool) or not isinstance(self.loss_penalty, (int, float)) \
                or not 0 <= self.loss_penalty < float("inf"):
            raise CalibrationError(f"loss_penalty must be a finite number >= 0, got {self.loss_penalty!r}")
        if isinstance(self.adopt_p, bool) or not isinstance(self.adopt_p, (int, float)) or not 0 < self.adopt_p <= 1:
            raise CalibrationError(
                f"adopt_p must be a p-value in (0, 1] (1: always register the best trial), got {self.adopt_p!r}"
            )
        if not self.attnts_temperatures or any(t <= 0 for t in self.attnts_temperatures):
            raise CalibrationError(
                f"AttnTS temperatures must be positive numbers, got {self.attnts_temperatures!r}"
            )
        self._validate_speed_and_selection()  # flag combinations, before the machine's devices are checked

        if self.dtype is not None and self.dtype not in DTYPE_NAMES:
            raise CalibrationError(f"dtype must be one of {', '.join(DTYPE_NAMES)}, got {self.dtype!r}")
        try:
            check_device(self.device)
        except ValueError as err:
            raise CalibrationError(str(err)) from None
        if self.devices is not None:
            check_devices(self.devices)
            if self.device != "cpu":
                raise CalibrationError("give either one device (--device) or a list (--devices), not both")
            if self.workers != len(self.devices):
                raise CalibrationError(
                    f"--devices lists {len(self.devices)} device(s) but --workers is {self.workers}: one worker "
                    "runs per device (leave --workers out)"
                )
        if self.intervention_warmup is not None:
            try:
                parse_intervention_warmup(self.intervention_warmup, "intervention_warmup")  # the space normalises it
            except ProfileValidationError as err:
                raise CalibrationError(f"{err} (or None to search it)") from None

    def _validate_speed_and_selection(self) -> None:
        from calibration.space import SearchSpace

        if self.speed_objective not in SPEED_OBJECTIVES:
            raise CalibrationError(
                f"speed_objective must be one of {', '.join(SPEED_OBJECTIVES)}, got {self.speed_objective!r}"
            )
        if self.max_cost is not None:
            if self.speed_objective == "none":
                raise CalibrationError(
                    "--max-cost picks a point of the Pareto front, so it needs a speed objective "
                    "(--speed-objective cost or measured)"
                )
            if isinstance(self.max_cost, bool) or not isinstance(self.max_cost, (int, float)) \
                    or not 0 < self.max_cost < float("inf"):
                raise CalibrationError(f"max_cost must be a finite number > 0, got {self.max_cost!r}")
            if self.speed_objective == "cost" and self.max_cost < 1:
                raise CalibrationError(
                    f"--max-cost {self.max_cost:g} admits no trial: the cost model counts passes per generated "
                    "token relative to vanilla, so every trial costs at least 1 (lagged and static: 1)"
                )
        if self.speed_objective == "measured" and self.devices is not None and len(self.devices) > 1:
            raise CalibrationError(
                f"--speed-objective measured compares decode times between trials, but --devices "
                f"{','.join(self.devices)} would time them on different GPUs: use --speed-objective cost "
                "(the same on every device) or a single device"
            )
        try:
            SearchSpace(selection=self.selection or (), lagged_probs=self.lagged_probs or ("plain",))
        except ValueError as err:
            raise CalibrationError(str(err).replace("selection choices", "--selection choices")
                                   .replace("lagged_probs choices", "--lagged-probs choices")) from None
        if self.lagged_probs is not None and "lagged" not in (self.selection or ()):
            raise CalibrationError(
                "--lagged-probs only applies when lagged selection is searched: add lagged to --selection "
                "(e.g. --selection dynamic,lagged)"
            )

    @property
    def n_test(self) -> int:
        """Held-out test examples."""
        return self.test_examples if self.test_examples is not None else max(1, self.examples // 2)


@dataclass
class CalibrationResult:
    """What a calibration produced: scores side by side, the best knobs, the registered profile."""

    study_name: str
    storage: str | None
    trials: dict[str, int]
    best_trial: int
    best_params: dict[str, Any]
    head_set: list[list[int]]
    scores: dict[str, dict[str, float]]  # {"dev"|"test": {"vanilla", "attnts", "dysco"}}
    tokens_per_s: dict[str, float]
    attnts_temperature: float
    profile_ref: str | None
    parent_ref: str | None
    mlflow: dict[str, str | None]
    # With a speed objective: its name and the Pareto front (`calibration.pareto.FrontPoint` dicts, cheapest first).
    speed_objective: str = "none"
    pareto_front: list[dict[str, Any]] = field(default_factory=list)
    # "<method>-<baseline>" on the test examples: paired bootstrap CI and sign test (calibration.evaluation.statistics)
    paired_test: dict[str, dict[str, Any]] = field(default_factory=dict)
    flat_objective: dict[str, Any] | None = None  # set when the dev objective could not tell knobs apart
    # set when no trial beat vanilla on dev by one example or more (`no_gain_over_vanilla`)
    no_gain: dict[str, Any] | None = None
    selection: dict[str, Any] = field(default_factory=dict)  # DySCO's selection recall (dev best, test)
    # Why the registered knobs are the best trial's or the published ones (`Calibration.adoption`).
    adoption: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (what `calibrate --json` prints)."""
        return asdict(self)

    def table(self) -> str:
        """Baselines against the tuned DySCO, on dev and test, as an aligned text table."""
        rows = [
            ("vanilla", "vanilla"),
            (f"AttnTS (T={self.attnts_temperature:g})", "attnts"),
            ("DySCO published knobs", "dysco_published"),
            (f"DySCO calibrated (trial {self.best_trial})", "dysco"),
        ]
        width = max(len(label) for label, _ in rows)
        lines = [f"{'method':<{width}}  {'dev':>6}  {'test':>6}  {'tokens/s':>8}"]
        for label, key in rows:
            dev = self.scores["dev"].get(key)
            test = self.scores["test"].get(key)
            speed = self.tokens_per_s.get(key)
            lines.append(
                f"{label:<{width}}  {_fmt(dev):>6}  {_fmt(test):>6}  "
                f"{'-' if speed is None else f'{speed:.1f}':>8}"
            )
        for name, label in (("dysco-vanilla", "calibrated − vanilla"),
                            ("dysco_published-vanilla", "published − vanilla"),
                            ("dysco-dysco_published", "calibrated − published")):
            row = self.paired_test.get(name)
            if row:
                lines.append(
                    f"test {label}: {row['mean_difference']:+.3f} [{row['low']:+.3f}, {row['high']:+.3f}], "
                    f"{row['wins']}W/{row['losses']}L/{row['ties']}T, sign test p = {row['p_value']:.3g}"
                )
        if self.adoption.get("message"):
            lines.append(f"knobs: {self.adoption['message']}")
        if self.pareto_front:
            points = [FrontPoint(**p) for p in self.pareto_front]
            lines += ["", front_table(points, COST_METRICS[self.speed_objective], chosen=self.best_trial)]
        if self.flat_objective:
            lines.append(f"WARNING: {self.flat_objective['message']}")
        elif self.no_gain:
            lines.append(f"WARNING: {self.no_gain['message']}")
        return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


# --------------------------------------------------------------------------- small helpers


def parse_heads(text: str) -> list[tuple[int, int]]:
    """'21:31,21:18' -> [(21, 31), (21, 18)] (`registry.parse_head_set`, as a CalibrationError)."""
    try:
        return parse_head_set(text, "--heads")
    except ProfileValidationError as err:
        raise CalibrationError(str(err)) from None


def task_options(task: Any, needles: int | None) -> dict[str, Any]:
    """The options `task.generate` gets from a config: `needles` is MRCR's only (a CalibrationError elsewhere)."""
    if needles is None:
        return {}
    if "n_needles" not in task.options():
        raise CalibrationError(f"--needles applies to the mrcr task only, not to {task.name!r}")
    return {"n_needles": needles}


def starting_profile(config: CalibrationConfig, registry: Any) -> tuple[str, Any]:
    """(resolved ref, Profile) a calibration without --heads starts from: `config.profile`, else the model's
    latest profile. Needs no model, so the CLI finds a missing or corrupt one before loading it."""
    ref = config.profile or model_name(config.model)
    try:
        name, version = registry.resolve(ref)
        profile = registry.load(ref)
        if config.profile is None:
            # The latest profile may be an earlier calibration's result, whose head set is cut
            # to its best size: start from the head-set profile it came from instead, so the
            # same command always starts from the same ranking (and resumes the same study).
            for _ in range(64):
                parent = profile.provenance.get("parent")
                if profile.provenance.get("kind") != "calibration" or not parent:
                    break
                name, version = registry.resolve(parent)
                profile = registry.load(parent)
    except ProfileNotFound as err:
        hint = "" if config.profile else " (no --profile given, so the model's latest profile was looked up)"
        raise CalibrationError(
            f"no head set to start from{hint}: {err}. Run `headfinder` on the model first, or pass "
            "--profile REF or --heads LAYER:HEAD,…"
        ) from None
    except RegistryError as err:
        raise CalibrationError(f"cannot read profile {ref!r}: {err}") from None
    return f"{name}@{version}", profile


def head_ranking(profile: Any) -> list[tuple[int, int]]:
    """Heads best first: every head by its QR score when the profile has one, else the head set."""
    scores = profile.head_scores.get("qr")
    if scores is None:
        return list(profile.head_set)
    scores = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-scores, axis=None, kind="stable")  # ties: lower (layer, head) first
    return [tuple(int(v) for v in np.unravel_index(i, scores.shape)) for i in order]


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _sampler_seed(seed: int, trial_index: int) -> int:
    # One seed per trial slot: a resumed study draws what the uninterrupted one would have drawn.
    return int(np.random.SeedSequence([seed, trial_index]).generate_state(1)[0])


def _context_length(model: Any) -> int:
    return context_limit(model.config) or 2**20


# --------------------------------------------------------------------------- the calibration


class Calibration:
    """One calibration: its model, examples, study and baselines. `calibrate()` drives it.

    cal = Calibration(config); cal.prepare()
    cal.run_trials(); result = cal.finish()     # finish() runs the baselines once
    """

    def __init__(self, config: CalibrationConfig) -> None:
        config.validate()
        self.config = config
        self.tracker = None  # set by calibrate() when MLflow tracking is on

    # --- setup ---------------------------------------------------------------------------------

    def prepare(self, *, create: bool = True, progress: bool = False) -> None:
        """Resolve the task, load the model, build the examples, open (or create) the study."""
        cfg = self.config
        try:
            self.task = get_task(cfg.dev)
        except (ValueError, OSError) as err:
            message = str(err)
            if os.path.exists(cfg.dev) and cfg.dev not in message:
                message = f"cannot read {cfg.dev}: {message}"  # e.g. a bare UnicodeDecodeError
            raise CalibrationError(message) from None
        opts = task_options(self.task, cfg.needles)


        loading.use_device(cfg.device)  # a --devices worker on cuda:1 runs its fast trials there
        self.model, self.tokenizer = loading.load_model(cfg.model, device=cfg.device, dtype=cfg.dtype, progress=progress)
        if cfg.threads is not None:
            import torch

            torch.set_num_threads(cfg.threads)
        self.identity = ModelIdentity.from_dict(model_identity(self.model, model_name(cfg.model)))
        limit = _context_length(self.model)
        if cfg.context + cfg.max_new_tokens > limit:
            raise CalibrationError(
                f"--context {cfg.context} plus --max-new-tokens {cfg.max_new_tokens} exceeds the "
                f"{limit}-token context of {cfg.model!r}"
            )
        self._resolve_heads()

        n_dev, n_test = cfg.examples, cfg.n_test
        try:
            examples = self.task.generate(self.tokenizer, n_dev + n_test, cfg.context, cfg.seed, **opts)
        except ValueError as err:
            raise CalibrationError(f"cannot build {self.task.name} examples: {err}") from None
        dev, test = split(examples, seed=cfg.seed, test_fraction=n_test / (n_dev + n_test))
        self.dev, self.test = dev[:n_dev], test[:n_test]
        if not self.dev or not self.test:
            raise CalibrationError(
                f"need at least one dev and one test example, got {len(self.dev)} and {len(self.test)} "
                f"from {len(examples)} examples"
            )
        self.space = SearchSpace.for_model(
            _context_length(self.model), len(self.ranking), intervention_warmup=cfg.intervention_warmup,
            selection=cfg.selection or (), **({"lagged_probs": cfg.lagged_probs} if cfg.lagged_probs else {}),
        )
        # One plain prefill per batch serves every trial: it stops before the most columns any
        # trial feeds one at a time (its context warmup plus the largest intervention warmup).
        warmup = self.base_knobs.context_warmup + self.space.intervention_warmup_tokens(self.tokenizer)
        self.dev_runner = ExampleRunner(
            self.model, self.tokenizer, self.task, self.dev,
            max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, warmup=warmup, fast=cfg.fast,
        )
        self.definition = self._definition(examples=[e.to_dict() for e in self.dev + self.test])
        if cfg.study_name is None:
            cfg.study_name = f"calibrate-{self.identity.name}-{self.task.name}-{_digest(self.definition)[:10]}"
        self._open_study(create=create)

    def _resolve_heads(self) -> None:
        cfg = self.config
        self.registry = Registry(cfg.registry)
        self.parent_profile = None
        self.parent_ref = None
        layers, heads = self.identity.num_layers, self.identity.num_heads
        if cfg.heads is not None:
            bad = [h for h in cfg.heads if not (0 <= h[0] < layers and 0 <= h[1] < heads)]
            if bad:
                raise CalibrationError(
                    f"--heads {bad[0][0]}:{bad[0][1]} is outside {self.identity.name} "
                    f"({layers} layers x {heads} heads)"
                )
            self.ranking = list(cfg.heads)
            self.base_knobs = Knobs()
            return
        ref = cfg.profile or self.identity.name
        self.parent_ref, profile = starting_profile(cfg, self.registry)
        try:
            check_model(profile, self.identity)
        except RegistryError as err:
            raise CalibrationError(f"profile {ref!r} cannot be calibrated on {cfg.model!r}: {err}") from None
        self.parent_profile = profile
        self.ranking = head_ranking(profile)
        self.base_knobs = profile.knobs

    def _definition(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        """What a study's trials depend on; a study is only ever continued under the same one."""
        cfg = self.config
        return {
            "model": self.identity.to_dict(),
            "dev": cfg.dev,
            "examples_sha256": _digest(examples),
            "n_dev": len(self.dev),
            "n_test": len(self.test),
            "context": cfg.context,
            "max_new_tokens": cfg.max_new_tokens,
            "batch_size": cfg.batch_size,
            "head_ranking_sha256": _digest(self.ranking),
            "context_warmup": self.base_knobs.context_warmup,
            "selection": self.base_knobs.selection,
            # A lagged starting profile's probabilities matter to every trial that does not search selection.
            **({"lagged_probs": self.base_knobs.lagged_probs}
               if self.base_knobs.selection == "lagged" and not self.space.selection else {}),
            "space": self.space.to_dict(),
            "objectives": self.objectives,
            "loss_penalty": float(cfg.loss_penalty),
            "attnts_temperatures": list(cfg.attnts_temperatures),
            "seed": cfg.seed,
            "dtype": str(next(self.model.parameters()).dtype).removeprefix("torch."),
            # Only when fast, so that exact-path studies keep their definition (and default name).
            **({"path": "fast"} if cfg.fast else {}),
        }

    @property
    def objectives(self) -> list[str]:
        """Names of the study's objectives: the dev objective (maximised), then the cost, if any (minimised)."""
        speed = self.config.speed_objective
        return ["score"] if speed == "none" else ["score", COST_METRICS[speed]]

    @property
    def directions(self) -> list[str]:
        """Optuna's directions of `objectives`."""
        return ["maximize"] + ["minimize"] * (len(self.objectives) - 1)

    def _pruner(self) -> optuna.pruners.BasePruner:
        if len(self.objectives) > 1:
            return optuna.pruners.NopPruner()  # Optuna cannot prune multi-objective trials
        # Steps are "dev examples done"; no verdict before half of them were scored.
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=max(1, len(self.dev) // 2))

    def _sampler(self, trial_index: int) -> optuna.samplers.BaseSampler:
        startup = min(10, max(3, self.config.trials // 2))
        return optuna.samplers.TPESampler(
            seed=_sampler_seed(self.config.seed, trial_index), n_startup_trials=startup
        )

    def load_study(self, trial_index: int = 0) -> optuna.Study:
        """The study, with a sampler seeded for trial slot `trial_index`."""
        return optuna.load_study(
            study_name=self.config.study_name, storage=self.storage,
            sampler=self._sampler(trial_index), pruner=self._pruner(),
        )

    def _open_study(self, create: bool) -> None:
        cfg = self.config
        self.storage = open_storage(cfg.storage)
        with self._lock():
            try:
                study = self.load_study()
            except KeyError:
                if not create:
                    raise CalibrationError(
                        f"no study {cfg.study_name!r} in {storage_label(cfg.storage)}; a worker joins an existing study"
                    ) from None
                study = optuna.create_study(
                    study_name=cfg.study_name, storage=self.storage, sampler=self._sampler(0),
                    pruner=self._pruner(), directions=self.directions,
                )
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    study.set_metric_names(self.objectives)
                study.set_user_attr("definition", self.definition)
                study.enqueue_trial(self.space.defaults(), user_attrs={"published_defaults": True})
                self.study = study
                return
        stored = study.user_attrs.get("definition")
        if stored is None:
            raise CalibrationError(
                f"study {cfg.study_name!r} in {storage_label(cfg.storage)} was not made by `calibrate`; pick another --study-name"
            )
        if "intervention_warmup" not in (stored.get("space") or {}):
            raise CalibrationError(
                f"study {cfg.study_name!r} in {storage_label(cfg.storage)} was made before intervention_warmup became a "
                "calibrated knob: its trials decoded with the older feed schedule and cannot be continued. "
                "Start a new study: give a new --study-name (or none: the default name is derived from the "
                "settings, so it names a new study)"
            )
        stored = {"loss_penalty": 0.0, **stored}  # studies made before the penalty optimised the plain score
        if stored != self.definition:
            differ = sorted(k for k in set(stored) | set(self.definition) if stored.get(k) != self.definition.get(k))
            raise CalibrationError(
                f"study {cfg.study_name!r} in {storage_label(cfg.storage)} was made with a different "
                f"{', '.join(differ)}; continuing it would mix incomparable trials. Rerun with the "
                "same settings, or give a new --study-name"
            )
        self.study = study

    def _lock(self):
        """The study's lock: a file lock for the processes of one host, plus, on a PostgreSQL or
        MySQL storage, a lock in the database server for those of other hosts. Reentrant."""
        if getattr(self, "_study_lock", None) is None:
            from filelock import FileLock

            url, key = self.config.storage, self.config.study_name or ""
            path = lock_path(url, key)
            locks = [FileLock(path)] if path else []
            if url is not None and not url.startswith("sqlite") and backend_name(url) in SERVER_BACKENDS:
                locks.append(DatabaseLock(url, key))
            self._study_lock = Locks(*locks)
        return self._study_lock

    # --- baselines ----------------------------------------------------------------------------

    def run_baselines(self, progress: bool = False) -> dict[str, Any]:
        """Vanilla and AttnTS on the dev examples, once per study (stored with it)."""
        stored = self.study.user_attrs.get("baselines")
        if stored is not None:
            return stored
        methods = [("vanilla", Method.vanilla())] + [
            (f"attnts@{t:g}", Method.attnts(t)) for t in self.config.attnts_temperatures
        ]
        results: dict[str, Evaluation] = {}
        for label, method in _progress(methods, progress, "baselines"):
            results[label] = self.dev_runner.evaluate(method)
        grid = {label.split("@")[1]: results[label].mean for label in results if label.startswith("attnts@")}
        # Best AttnTS temperature; ties go to the mildest change (closest to T = 1).
        best_t = max(self.config.attnts_temperatures, key=lambda t: (results[f"attnts@{t:g}"].mean, -abs(1 - t)))
        best = results[f"attnts@{best_t:g}"]
        baselines = {
            "vanilla": _summary(results["vanilla"]),
            "attnts": {**_summary(best), "temperature": best_t, "grid": grid},
        }
        self.study.set_user_attr("baselines", baselines)
        return baselines

    # --- trials -------------------------------------------------------------------------------

    def _knob(self, params: dict[str, Any], name: str) -> Any:
        """A trial's value of `name` when searched, else the starting profile's (`selection`, `lagged_probs`)."""
        return params.get(name, getattr(self.base_knobs, name))

    def _dysco_config(self, params: dict[str, Any]):
        from decoder.dysco import DyscoConfig

        return DyscoConfig(
            head_set=self.ranking[: params["num_heads"]],
            strength=params["strength"],
            top_p=params["top_p"],
            top_k=params["top_k"],
            decay=params["decay"],
            context_warmup=self.base_knobs.context_warmup,
            selection=self._knob(params, "selection"),
            intervention_warmup=params["intervention_warmup"],
            lagged_probs=self._knob(params, "lagged_probs"),
        )

    def _vanilla_dev_scores(self) -> list[float] | None:
        """Vanilla's per-example dev scores when the objective needs them (a loss penalty), else None."""
        if not self.config.loss_penalty:
            return None
        with self._lock():  # one process computes the baselines; the others wait and read them
            return [float(v) for v in self.run_baselines()["vanilla"]["scores"]]

    def _objective(self, trial: optuna.Trial) -> float | tuple[float, float]:
        vanilla = self._vanilla_dev_scores()
        params = self.space.suggest(trial)
        trial.set_user_attr("head_set", [list(h) for h in self.ranking[: params["num_heads"]]])
        config = self._dysco_config(params)
        multi = len(self.objectives) > 1
        penalty = self.config.loss_penalty

        def on_batch(scores: list[float]) -> None:
            if not multi:
                value = dev_objective(scores, vanilla, penalty)
                trial.report(value, len(scores))
                if trial.should_prune():
                    raise optuna.TrialPruned(f"running objective {value:.3f} after {len(scores)} examples")

        evaluation = self.dev_runner.evaluate(Method.dysco(config), on_batch=on_batch)
        for key, value in _summary(evaluation).items():
            trial.set_user_attr(key, value)
        # Both costs of every trial, whichever (if any) the study minimises (`calibration.pareto`).
        costs = {"cost": token_cost(config.selection, config.head_set, self.identity.num_layers),
                 "ms_per_token": ms_per_token(evaluation.decode_seconds, evaluation.new_tokens)}
        trial.set_user_attr("token_cost", costs["cost"])
        trial.set_user_attr("ms_per_token", costs["ms_per_token"])
        objective = dev_objective(evaluation.scores, vanilla, penalty)
        if vanilla is not None:
            d = np.asarray(evaluation.scores) - np.asarray(vanilla)
            trial.set_user_attr("vs_vanilla", {"wins": int((d > 0).sum()), "losses": int((d < 0).sum())})
        return (objective, costs[self.objectives[1]]) if multi else objective

    def _next_trial(self) -> tuple[optuna.Study, optuna.Trial | None, bool]:
        """Under the study's lock: (study, a new trial or None, whether the budget is met)."""
        with self._lock():
            study = self.load_study()
            reclaim_dead_trials(study, locked=True)
            trials = study.get_trials(deepcopy=False)
            finished = sum(t.state in FINISHED for t in trials)
            running = sum(t.state == TrialState.RUNNING for t in trials)
            if finished >= self.config.trials:
                return study, None, True
            if finished + running >= self.config.trials:
                return study, None, False  # others hold the remaining budget: wait for them
            study = self.load_study(trial_index=len(trials))
            with warnings.catch_warnings():
                # Optuna warns that heartbeats are meant for optimize(); this loop beats itself.
                warnings.filterwarnings("ignore", message="Heartbeat of storage")
                trial = study.ask()
            # A first heartbeat before the worker record: a trial with a record always has a
            # heartbeat, so one from a host that dies here is still found (reclaim_dead_trials).
            if isinstance(self.storage, optuna.storages.RDBStorage):
                self.storage.record_heartbeat(trial._trial_id)
            trial.set_user_attr("worker", {**this_worker(), "device": self.config.device})
            return study, trial, False

    def run_trials(self, on_trial: Callable[[optuna.Study], None] | None = None, poll_s: float = 1.0) -> None:
        """Run trials until `trials` of them have finished in the study (counting other workers')."""
        while True:
            study, trial, done = self._next_trial()
            if on_trial is not None:
                on_trial(study)
            if done:
                return
            if trial is None:
                time.sleep(poll_s)
                continue
            with heartbeat(self.storage, trial):
                try:
                    value = self._objective(trial)
                except optuna.TrialPruned:
                    study.tell(trial, state=TrialState.PRUNED)
                except BaseException:
                    study.tell(trial, state=TrialState.FAIL)
                    raise
                else:
                    study.tell(trial, value)
            if on_trial is not None:
                on_trial(study)

    # --- the result -----------------------------------------------------------------------------

    def best_trial(self, study: optuna.Study) -> FrozenTrial:
        """The best complete trial; with two objectives, the most accurate point of the Pareto front
        within `max_cost` (`calibration.pareto.choose`)."""
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if not complete:
            raise CalibrationError(
                f"study {study.study_name!r} has no complete trial (all were pruned or failed)"
            )
        if len(study.directions) == 1:
            return study.best_trial
        return choose(study.best_trials, self.config.max_cost)

    def adoption(self, study: optuna.Study) -> tuple[FrozenTrial, dict[str, Any]]:
        """The trial whose knobs get registered, and why (`choose_knobs` on this study)."""
        cfg = self.config
        published = next((t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                          if t.user_attrs.get("published_defaults")), None)
        best = self.best_trial(study)
        excluded = None
        if len(study.directions) > 1 and published is not None and cfg.max_cost is not None \
                and published.values[1] > cfg.max_cost:
            excluded = (f"the published defaults (trial {published.number}) cost {published.values[1]:.4g} > "
                        f"--max-cost {cfg.max_cost:g}, so the most accurate point within it is kept")
        chosen, why = choose_knobs(best, published, self._vanilla_dev_scores(), cfg.loss_penalty, cfg.adopt_p,
                                   published_excluded=excluded)
        if len(study.directions) > 1:
            why |= {"speed_objective": cfg.speed_objective, "max_cost": cfg.max_cost,
                    "rule": "the most accurate Pareto point (within max_cost when given; ties: cheaper), "
                            "then the adoption rule against the published defaults within the same budget"}
        return chosen, why

    def finish(self, progress: bool = False) -> CalibrationResult:
        """Score the best trial and the baselines on the test examples; register the profile."""
        # Under the lock: two commands finishing one study together register it once.
        with self._lock():
            return self._finish(progress)

    def _finish(self, progress: bool) -> CalibrationResult:
        cfg = self.config
        study = self.load_study()
        best, adoption = self.adoption(study)
        trials = study.get_trials(deepcopy=False)
        counts = {
            "finished": sum(t.state in FINISHED for t in trials),
            "complete": sum(t.state == TrialState.COMPLETE for t in trials),
            "pruned": sum(t.state == TrialState.PRUNED for t in trials),
            "failed": sum(t.state == TrialState.FAIL for t in trials),
        }
        # Re-running a finished study's command returns the registered result instead of
        # registering the same knobs twice.
        previous = study.user_attrs.get("result")
        if previous and previous["best_trial"] == best.number and previous["trials"] == counts \
                and previous.get("adoption", {}).get("adopt_p") == adoption["adopt_p"] \
                and previous.get("adoption", {}).get("max_cost") == adoption.get("max_cost"):
            return CalibrationResult(**previous)

        baselines = self.run_baselines(progress=progress)
        self.dev_runner.release()  # the dev prefills are done with: the test's need the memory
        t_star = baselines["attnts"]["temperature"]
        best_config = self._dysco_config(best.params)
        published = self.space.defaults()
        methods = {
            "vanilla": Method.vanilla(),
            "attnts": Method.attnts(t_star),
            "dysco": Method.dysco(best_config),
        }
        if dict(best.params) != published:  # does tuning beat the published knobs on held-out data?
            methods["dysco_published"] = Method.dysco(self._dysco_config(published))
        test_runner = ExampleRunner(
            self.model, self.tokenizer, self.task, self.test, max_new_tokens=cfg.max_new_tokens,
            batch_size=cfg.batch_size, fast=cfg.fast,
            warmup=max(dysco_warmup(m.dysco, self.tokenizer) for m in methods.values() if m.name == "dysco"),
        )
        test = {name: test_runner.evaluate(m) for name, m in _progress(methods.items(), progress, "test")}
        test_runner.release()
        if "dysco_published" not in test:
            test["dysco_published"] = test["dysco"]
        published_dev = next(
            (_dev_score(t) for t in trials if t.user_attrs.get("published_defaults") and t.state == TrialState.COMPLETE),
            None,
        )
        scores = {
            "dev": {
                "vanilla": baselines["vanilla"]["score"],
                "attnts": baselines["attnts"]["score"],
                "dysco": _dev_score(best),
                "dysco_published": None if published_dev is None else float(published_dev),
            },
            "test": {name: ev.mean for name, ev in test.items()},
        }
        paired = {
            f"{a}-{b}": paired_comparison(test[a].scores, test[b].scores, seed_for(cfg.seed, "calibrate-test", a, b))
            for a, b in (("dysco", "vanilla"), ("dysco_published", "vanilla"), ("dysco", "dysco_published"),
                         ("attnts", "vanilla"))
        }
        selection = {
            "dev_best": best.user_attrs.get("selection"),
            "test": {name: test[name].selection_summary() for name in ("dysco", "dysco_published")},
        }
        flat = flat_objective(baselines, trials, len(self.dev), self.task.name, cfg.context, self.identity.name)
        no_gain = None if flat else no_gain_over_vanilla(
            baselines, self.best_trial(study), len(self.dev), self.task.name, cfg.context, self.identity.name)
        speeds = {
            "vanilla": baselines["vanilla"]["tokens_per_s"],
            "attnts": baselines["attnts"]["tokens_per_s"],
            "dysco": float(best.user_attrs.get("tokens_per_s", 0.0)),
        }
        front = front_points(study.best_trials) if len(study.directions) > 1 else []
        tracking = {
            "tracking_uri": self.tracker.tracking_uri if self.tracker else None,
            "run_id": self.tracker.parent_run_id if self.tracker else None,
        }
        profile = self._profile(best, scores, speeds, baselines, counts, tracking, paired, flat, adoption, front,
                                no_gain)
        ref = self.registry.register(profile) if cfg.register else None
        result = CalibrationResult(
            study_name=study.study_name, storage=storage_label(cfg.storage), trials=counts, best_trial=best.number,
            best_params=dict(best.params), head_set=[list(h) for h in profile.head_set],
            scores=scores, tokens_per_s=speeds, attnts_temperature=t_star, profile_ref=ref,
            parent_ref=self.parent_ref, mlflow=tracking, speed_objective=cfg.speed_objective,
            pareto_front=[p.to_dict() for p in front], paired_test=paired,
            flat_objective=flat, no_gain=no_gain, selection=selection, adoption=adoption,
        )
        study.set_user_attr("result", result.to_dict())
        if self.tracker is not None:
            flat_scores = {f"{split}_{name}": v for split, row in scores.items() for name, v in row.items()}
            speed = {f"tokens_per_s_{name}": v for name, v in speeds.items()}
            flat_scores = {k: v for k, v in flat_scores.items() if v is not None}
            p_values = {f"test_p_{name}": row["p_value"] for name, row in paired.items()}
            self.tracker.log_metrics({**flat_scores, **speed, **p_values, "best_trial": best.number,
                                      "attnts_temperature": t_star})
            self.tracker.set_tags({"dysco.flat_objective": "yes" if flat else "no"})
            if flat:
                self.tracker.set_tags({"dysco.flat_objective_message": flat["message"][:5000]})
            self.tracker.set_tags({"dysco.beats_vanilla_on_dev": "no" if (flat or no_gain) else "yes"})
            if no_gain:
                self.tracker.set_tags({"dysco.no_gain_message": no_gain["message"][:5000]})
            if ref:
                self.tracker.set_tags({"dysco.profile_ref": ref})
            self.tracker.log_json({**profile.to_dict(), "ref": ref}, "profile.json", "profile")
            if front:
                self._log_front(study, front, best.number)
        return result

    def _log_front(self, study: optuna.Study, front: list, chosen: int) -> None:
        """The Pareto front to MLflow: `pareto/pareto_front.json`, `plots/pareto_front.png` and two metrics."""
        metric = self.objectives[1]
        self.tracker.log_json({"metric": metric, "chosen_trial": chosen, "points": [p.to_dict() for p in front]},
                              "pareto_front.json", "pareto")
        self.tracker.log_metrics({"pareto_points": len(front),
                                  f"registered_{metric}": next((p.cost for p in front if p.trial == chosen), None)})
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        with tempfile.TemporaryDirectory() as tmp:
            path = plot_front(complete, front, f"{tmp}/pareto_front.png", metric, chosen,
                              title=f"{self.identity.name}, {self.task.name} at {self.config.context} tokens")
            self.tracker.log_file(path, "plots")

    def _profile(self, best, scores, speeds, baselines, counts, tracking, paired, flat, adoption, front, no_gain=None):
        cfg = self.config
        p = best.params
        knobs = Knobs(
            strength=p["strength"], top_p=p["top_p"], top_k=p["top_k"], decay=p["decay"],
            context_warmup=self.base_knobs.context_warmup, selection=self._knob(p, "selection"),
            intervention_warmup=p["intervention_warmup"], lagged_probs=self._knob(p, "lagged_probs"),
        )
        metrics = {
            "dev_task": self.task.name,
            "dev_source": cfg.dev,
            "context_tokens": cfg.context,
            "max_new_tokens": cfg.max_new_tokens,
            "dev_examples": len(self.dev),
            "test_examples": len(self.test),
            "dev": scores["dev"],
            "test": scores["test"],
            "tokens_per_s": speeds,
            "attnts_temperature": baselines["attnts"]["temperature"],
            "attnts_grid_dev": baselines["attnts"]["grid"],
            "test_paired": paired,
            "flat_objective": flat,
            "no_gain": no_gain,
            "loss_penalty": float(cfg.loss_penalty),
            "adoption": adoption,
        }
        if cfg.needles is not None:
            metrics["needles"] = cfg.needles
        if front:  # the whole front, so a profile of another speed/accuracy trade-off can be picked later
            metrics["pareto_front"] = {
                "speed_objective": cfg.speed_objective, "metric": self.objectives[1], "max_cost": cfg.max_cost,
                "chosen_trial": best.number, "points": [pt.to_dict() for pt in front],
            }
        provenance = {
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "kind": "calibration",
            "parent": self.parent_ref,
            "study_name": self.study.study_name,
            "storage": storage_label(cfg.storage),  # never a password
            "seed": cfg.seed,
            "trials": counts,
            "best_trial": best.number,
            "objectives": self.objectives,
            "search_space": self.space.to_dict(),
            "mlflow_run_id": tracking["run_id"],
            "mlflow_tracking_uri": tracking["tracking_uri"],
            "model_spec": cfg.model,
            "library_versions": library_versions(),
        }
        head_scores = dict(self.parent_profile.head_scores) if self.parent_profile is not None else {}
        return Profile(
            model=self.identity, head_set=self.ranking[: p["num_heads"]], knobs=knobs,
            head_scores=head_scores, metrics=metrics, provenance=provenance,
        )


def objective_terms(scores: Sequence[float], vanilla: Sequence[float] | None, loss_penalty: float) -> np.ndarray:
    """Each example's share of the dev objective: s - loss_penalty * max(0, v - s) [n].

    s: the trial's score, v: vanilla's on the same example (only the first len(scores) of them are
    used, so a pruner can score a trial's running scores); without vanilla's scores, s alone.
    """
    s = np.asarray(scores, dtype=float)
    if vanilla is None or not loss_penalty:
        return s
    return s - loss_penalty * np.clip(np.asarray(vanilla[: len(s)], dtype=float) - s, 0.0, None)


def dev_objective(scores: Sequence[float], vanilla: Sequence[float] | None, loss_penalty: float) -> float:
    """The study's objective: the mean score, less `loss_penalty` x the mean shortfall against vanilla.

        >>> dev_objective([1, 0, 1, 1], [1, 1, 0, 1], loss_penalty=1.0)  # one win, one loss
        0.5
        >>> dev_objective([1, 0, 1, 1], None, loss_penalty=1.0)
        0.75
    """
    terms = objective_terms(scores, vanilla, loss_penalty)
    return float(terms.mean()) if terms.size else 0.0


def choose_knobs(
    best: FrozenTrial,
    published: FrozenTrial | None,
    vanilla: Sequence[float] | None,
    loss_penalty: float,
    adopt_p: float,
    *,
    published_excluded: str | None = None,
) -> tuple[FrozenTrial, dict[str, Any]]:
    """The best trial if it beats the published defaults' trial on dev by more than noise, else theirs.

    "More than noise": a two-sided sign test on the per-example objective terms of the two trials
    (same dev examples) gives p < `adopt_p`. Without a complete published trial, or when
    `published_excluded` says why it cannot be registered (e.g. over a cost budget), the best trial
    is kept. Returns the chosen trial and a JSON-ready account (`message` says it in one line).
    """
    row: dict[str, Any] = {"best_trial": best.number, "adopt_p": float(adopt_p),
                           "published_trial": None if published is None else published.number}
    if published is None or published.number == best.number or published_excluded:
        why = ("the published defaults' trial did not complete" if published is None
               else "the published defaults are the best trial" if published.number == best.number
               else published_excluded)
        return best, {**row, "adopted": True, "chosen_trial": best.number, "message": f"trial {best.number}: {why}"}
    d = (objective_terms(best.user_attrs["scores"], vanilla, loss_penalty)
         - objective_terms(published.user_attrs["scores"], vanilla, loss_penalty))
    wins, losses, p = int((d > 0).sum()), int((d < 0).sum()), sign_test(d.tolist())
    adopted = p < adopt_p
    chosen = best if adopted else published
    verdict = (f"trial {best.number} replaces the published defaults" if adopted else
               f"the published defaults (trial {published.number}) are kept: the best trial, {best.number}, "
               "is not distinguishable from them on this dev set")
    message = (f"{verdict} (dev objective {best.values[0]:.3f} vs {published.values[0]:.3f}, "
               f"{wins}W/{losses}L over {len(d)} examples, sign test p = {p:.3g}, adopted below {adopt_p:g})")
    return chosen, {**row, "adopted": adopted, "chosen_trial": chosen.number, "wins": wins, "losses": losses,
                    "p_value": p, "message": message}


def _dev_score(trial: FrozenTrial) -> float:
    """A trial's plain dev score (its objective may carry a loss penalty)."""
    return float(trial.user_attrs.get("score", trial.values[0]))


def _summary(evaluation: Evaluation) -> dict[str, Any]:
    return {
        "score": evaluation.mean,
        "scores": evaluation.scores,
        "tokens_per_s": evaluation.tokens_per_s,
        "new_tokens": evaluation.new_tokens,
        "decode_seconds": evaluation.decode_seconds,
        "selection": evaluation.selection_summary(),
    }


def flat_objective(
    baselines: dict[str, Any], trials: Sequence[FrozenTrial], n_dev: int, task: str, context: int, model: str
) -> dict[str, Any] | None:
    """A plain report when the dev objective cannot tell anything apart, else None.

    Flat means: vanilla, every AttnTS temperature and every complete trial scored within one
    example's worth (1 / n_dev) of each other, so no knob setting was distinguishable on this dev set.
    """
    values = [float(baselines["vanilla"]["score"])] + [float(v) for v in baselines["attnts"]["grid"].values()]
    values += [float(t.values[0]) for t in trials if t.state == TrialState.COMPLETE and t.values]
    low, high = min(values), max(values)
    if high - low >= 1.0 / n_dev - 1e-9:
        return None
    if high <= 1e-9:
        why, change = (f"every method scored 0 on {task} at {context} tokens: the model cannot do the task there",
                       f"use a shorter context, an easier task (needle, kv) or a stronger model than {model}")
    elif low >= 1 - 1e-9:
        why, change = (f"every method scored 1 on {task} at {context} tokens: nothing is left to improve",
                       "use a longer context (DySCO acts from about 8K tokens) or a harder task (kv, pathtrans, mrcr)")
    else:
        why, change = (f"every method and trial scored within one example ({1 / n_dev:.3f}) of {low:.3f}",
                       "use more dev examples (--examples) or a task and length where the model is between "
                       "its floor and its ceiling")
    return {
        "low": low, "high": high, "values": len(values), "n_dev": n_dev,
        "message": f"the objective is flat, so the study could not tell any knobs apart: {why}. The registered "
                   f"knobs are not tuned; {change}.",
    }


# A best trial this close to strength 1 (where the bias is log 1 = 0, i.e. vanilla) says the study is
# tuning DySCO away rather than finding a setting of it.
NEAR_VANILLA_STRENGTH = 1.3


def no_gain_over_vanilla(
    baselines: dict[str, Any], best: FrozenTrial, n_dev: int, task: str, context: int, model: str
) -> dict[str, Any] | None:
    """A plain report when the study's best trial did not beat vanilla on dev by one example or more, else None.

    The dev objective of vanilla is its plain score (it loses nothing against itself), so a best
    objective below vanilla's score + 1 / n_dev means no knob setting was seen to help: calibration
    has then found where DySCO does no harm, not where it helps.
    """
    vanilla = float(baselines["vanilla"]["score"])
    value = float(best.values[0])
    if value - vanilla >= 1.0 / n_dev - 1e-9:
        return None
    strength = best.params.get("strength")
    drift = (f"; its strength {strength:.2f} is close to 1, where DySCO is vanilla: the study is moving away "
             f"from DySCO, not towards a setting of it" if strength is not None and strength < NEAR_VANILLA_STRENGTH
             else "")
    return {
        "vanilla": vanilla, "best_trial": best.number, "best_objective": value, "n_dev": n_dev,
        "best_strength": strength,
        "message": f"no knob setting beat vanilla on dev: the best trial ({best.number}, objective {value:.3f}) "
                   f"is not one example ({1 / n_dev:.3f}) above vanilla's {vanilla:.3f}{drift}. DySCO is not "
                   f"expected to help {model} on {task} at {context} tokens with these heads: decode it with vanilla "
                   f"there, calibrate from heads detected on probes shaped like the task (`headfinder detect --probes "
                   f"kv` for key-value lookups), or calibrate another task or length (docs/results.md shows where "
                   f"it did help).",
    }


def _progress(items, enabled: bool, desc: str):
    items = list(items)
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="run", leave=False, file=sys.stderr)


# --------------------------------------------------------------------------- the driver


def calibrate(config: CalibrationConfig, *, progress: bool = False) -> CalibrationResult:
    """Run (or resume) a whole calibration and return its result; see the module docstring."""
    config.validate()
    if config.tracking:  # before any study is created or model loaded: mlflow would retry for minutes

        try:
            check_reachable(config.tracking_uri)
        except ConnectionError as err:
            raise CalibrationError(str(err)) from None
    config = replace(config)  # the study name gets filled in; the caller's object stays as given
    if config.threads is None:
        config.threads = max(1, (os.cpu_count() or 1) // config.workers)
    if config.storage is not None and not config.storage.startswith("sqlite"):
        open_storage(config.storage)  # a missing driver or an unreachable server: said before any model loads
    # Extra workers start first: loading the model is slow, and they derive the same study name
    # (or create the study, whichever process comes first) on their own.
    config, *extra = process_configs(config)
    workers = WorkerProcesses([worker_command(c) for c in extra]) if extra else None
    try:
        result = _coordinate(config, progress, workers)
    except BaseException:
        if workers is not None:
            workers.stop()
        raise
    if workers is not None:
        workers.wait()
    return result


def _coordinate(config: CalibrationConfig, progress: bool, workers: WorkerProcesses | None) -> CalibrationResult:
    cal = Calibration(config)
    cal.prepare(create=True, progress=progress)
    tracker = None
    if config.tracking:
        try:
            tracker = Tracker(config.tracking_uri)
            with cal._lock():  # one parent run per study, even when several commands start together
                tracker.start(
                    cal.study,
                    params={**cal.definition, "model": config.model, "study_name": config.study_name,
                            "storage": storage_label(config.storage), "parent_profile": cal.parent_ref,
                            "path": "fast" if config.fast else "exact"},
                    tags={"dysco.model": cal.identity.name, "dysco.dev_task": cal.task.name},
                )
        except Exception as err:  # mlflow raises many kinds for a bad URI or an unreachable server
            raise CalibrationError(
                f"cannot use the MLflow tracking store {config.tracking_uri or 'sqlite:///mlflow.db'}: {err}"
            ) from None
        cal.tracker = tracker
    try:
        # Baselines are computed by one process only, under the lock: before the trials when the
        # objective compares with vanilla (other workers wait for them), else after, in `finish`.
        if workers is not None:
            workers.wait_ready()
        if config.loss_penalty:  # the objective compares with vanilla: its dev scores come first
            with cal._lock():
                cal.run_baselines(progress=progress)
        bar = _trial_bar(cal, progress)

        def on_trial(study: optuna.Study) -> None:
            if tracker is not None:
                with cal._lock():  # several commands on one study log each trial once
                    tracker.sync_trials(study)
            if bar is not None:
                _update_bar(bar, study)

        try:
            cal.run_trials(on_trial=on_trial)
        finally:
            if bar is not None:
                bar.close()
        if tracker is not None:
            with cal._lock():
                tracker.sync_trials(cal.load_study())
        result = cal.finish(progress=progress)
        if tracker is not None:
            tracker.log_plots(cal.load_study())
            tracker.end("FINISHED")
        return result
    except BaseException:
        if tracker is not None:
            with contextlib.suppress(Exception):
                with cal._lock():
                    tracker.sync_trials(cal.load_study())
                tracker.end("FAILED")
        raise


def _trial_bar(cal: Calibration, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    study = cal.load_study()
    finished = sum(t.state in FINISHED for t in study.get_trials(deepcopy=False))
    return tqdm(total=cal.config.trials, initial=min(finished, cal.config.trials), desc="trials",
                unit="trial", file=sys.stderr, dynamic_ncols=True)


def _update_bar(bar, study: optuna.Study) -> None:
    trials = study.get_trials(deepcopy=False)
    finished = min(sum(t.state in FINISHED for t in trials), bar.total)
    if finished > bar.n:
        bar.update(finished - bar.n)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if complete:
        best = max(t.values[0] for t in complete)
        bar.set_postfix(best=f"{best:.3f}", running=sum(t.state == TrialState.RUNNING for t in trials))


def run_worker(config: CalibrationConfig) -> None:
    """Join an existing study as an extra worker: run trials until the budget is met, then exit."""
    cal = Calibration(config)
    cal.prepare(create=True)  # the command that started it may not have created the study yet
    print("ready", flush=True)  # the command waits for this line before it starts on trials
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nobody reads the pipe from now on
    cal.run_trials()


def _worker_main(argv: Sequence[str]) -> int:
    if len(argv) != 2 or argv[0] != "--worker":
        print("usage: python -m calibration.study --worker CONFIG_JSON (started by `calibrate --workers N`)",
              file=sys.stderr)
        return 2
    data = json.loads(argv[1])
    if data.get("heads") is not None:
        data["heads"] = [tuple(h) for h in data["heads"]]
    data["attnts_temperatures"] = tuple(data["attnts_temperatures"])
    for name in ("selection", "lagged_probs"):
        if data.get(name) is not None:
            data[name] = tuple(data[name])
    if data.get("devices") is not None:
        data["devices"] = tuple(data["devices"])
    die_with_parent()
    try:
        run_worker(CalibrationConfig(**data))
    except CalibrationError as err:
        print(f"calibrate worker: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
