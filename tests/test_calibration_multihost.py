"""Calibration across GPUs and hosts: a PostgreSQL study shared by workers, one worker per GPU, an MLflow server.

The PostgreSQL tests need a server: .ci/run starts a throwaway one and exports its URL as
DYSCO_TEST_POSTGRES_URL (e.g. postgresql://postgres@127.0.0.1:5433/postgres); without it they
are skipped with that reason. Each test gets a database of its own on that server.
Models are the tiny random Llama of tests/test_calibration.py (mechanics, not quality).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import optuna
import pytest

from calibration.study import CalibrationConfig, calibrate
from test_calibration import COMMON, _env, _versions, tiny_checkpoint, tiny_identity, workdir  # noqa: F401 (fixtures)

POSTGRES_ENV = "DYSCO_TEST_POSTGRES_URL"


@pytest.fixture()
def postgres(request) -> str:
    """The URL of a new, empty database on the test server (dropped afterwards); skips without a server."""
    server = os.environ.get(POSTGRES_ENV)
    if not server:
        pytest.skip(f"needs a PostgreSQL server: set {POSTGRES_ENV} (.ci/run starts one and sets it)")
    import sqlalchemy
    from sqlalchemy.engine import make_url

    name = f"dysco_test_{uuid.uuid4().hex[:12]}"
    admin = sqlalchemy.create_engine(server, isolation_level="AUTOCOMMIT", poolclass=sqlalchemy.pool.NullPool)
    with admin.connect() as con:
        con.execute(sqlalchemy.text(f"CREATE DATABASE {name}"))
    yield make_url(server).set(database=name).render_as_string(hide_password=False)
    with admin.connect() as con:
        con.execute(sqlalchemy.text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
    admin.dispose()


def _cli(work, storage: str, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "calibration.cli", "--model", work["model"], "--registry", str(work["registry"]),
        "--storage", storage, "--tracking-uri", f"sqlite:///{work['dir'] / 'mlflow.db'}",
        "--profile", work["ref"], *COMMON, *extra,
    ]


def _other_host_env(folder: Path) -> dict[str, str]:
    """An environment whose temp folder, so whose host lock files, no other process shares: a stand-in for
    another host (the study's lock files for a server database live in the temp folder)."""
    folder.mkdir(parents=True, exist_ok=True)
    return {**_env(), "TMPDIR": str(folder)}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_main(*argv: str) -> int:
    from calibration.cli import main

    return main(list(argv))


@pytest.fixture()
def no_model_load(monkeypatch):
    """Fail the test if anything loads a model (errors must come before)."""
    import decoder.loading

    def forbidden(*args, **kwargs):
        raise AssertionError("a model was loaded before the error")

    monkeypatch.setattr(decoder.loading, "load_model", forbidden)


# --------------------------------------------------------------------------- errors before any model load


def test_a_missing_driver_or_an_unreachable_server_is_one_line_before_any_model_load(capsys, no_model_load):
    base = ["--dev", "kv", "--heads", "1:0", "--no-tracking", "--quiet"]
    # mysql:// means the mysqlclient driver, which is not installed (PyMySQL is, as mysql+pymysql://).
    assert _run_main(*base, "--storage", "mysql://me:secret@127.0.0.1/db") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "secret" not in err
    assert err.startswith("calibrate: error: cannot open the study storage mysql://me:***@127.0.0.1/db: "
                          "its database driver (MySQLdb) is not installed; `pip install 'dysco-toolkit[storage]'`")

    port = _free_port()  # nothing listens there
    began = time.perf_counter()
    assert _run_main(*base, "--storage", f"postgresql://me:secret@127.0.0.1:{port}/db") == 1
    err = capsys.readouterr().err
    assert time.perf_counter() - began < 30
    assert err.count("\n") == 1 and "secret" not in err
    assert err.startswith(f"calibrate: error: cannot open the study storage postgresql://me:***@127.0.0.1:{port}/db: ")
    assert "Connection refused" in err


# --------------------------------------------------------------------------- one worker per GPU


def test_devices_are_checked_before_any_model_load(capsys, monkeypatch, tmp_path, no_model_load):
    import torch

    db = tmp_path / "s.db"
    base = ["--dev", "kv", "--heads", "1:0", "--no-tracking", "--quiet", "--storage", f"sqlite:///{db}"]

    def usage_error(*extra: str) -> str:
        try:
            code, ours = _run_main(*base, *extra), True
        except SystemExit as exit_info:  # argparse's own errors, after its usage lines
            code, ours = exit_info.code, False
        assert code == 2, extra
        err = capsys.readouterr().err
        assert err.count("\n") == 1 or not ours, err
        line = err.strip().splitlines()[-1]
        assert line.startswith("calibrate: error:"), line
        return line

    assert "argument --devices: expected CUDA device indices, e.g. 0,1 or cuda:0,cuda:1; got 'gpu1' in '0,gpu1'" \
        in usage_error("--devices", "0,gpu1")
    assert "not allowed with argument --devices" in usage_error("--devices", "0", "--device", "cuda:0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "--devices cuda:0,cuda:1 asked for, but torch sees no CUDA device" in usage_error("--devices", "0,1")
    # A machine with two GPUs (as torch reports it).
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert "this machine has 2 CUDA device(s) (cuda:0 to cuda:1, after CUDA_VISIBLE_DEVICES), so cuda:2 does not " \
           "exist" in usage_error("--devices", "cuda:0,cuda:2")
    assert "--devices lists a device twice: cuda:1,cuda:1" in usage_error("--devices", "1,cuda:1")
    assert "--devices lists 2 device(s) but --workers is 3" in usage_error("--devices", "0,1", "--workers", "3")
    assert not db.exists()


def test_each_listed_device_gets_one_worker_process(monkeypatch):
    import torch

    from calibration.cli import build_parser, config_from_args
    from calibration.workers import process_configs, worker_command

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    args = build_parser().parse_args(["--dev", "kv", "--devices", "2,cuda:0,3", "--storage", "sqlite:///s.db"])
    config = config_from_args(args)
    config.validate()
    assert config.devices == ("cuda:2", "cuda:0", "cuda:3") and config.workers == 3
    own, *extra = process_configs(config)
    assert (own.device, own.workers, own.devices) == ("cuda:2", 3, None)  # the command itself: the first device
    own.validate()
    specs = []
    for worker in extra:
        command = worker_command(worker)
        assert command[:4] == [sys.executable, "-m", "calibration.study", "--worker"]
        specs.append(json.loads(command[4]))
    assert [(s["device"], s["workers"], s["devices"]) for s in specs] == [("cuda:0", 1, None), ("cuda:3", 1, None)]
    assert all(s["storage"] == "sqlite:///s.db" and s["dev"] == "kv" for s in specs)
    # Without --devices: --workers N processes on the one --device, as before.
    plain = config_from_args(build_parser().parse_args(["--dev", "kv", "--workers", "2"]))
    assert [c.device for c in process_configs(plain)] == ["cpu", "cpu"]


@pytest.mark.gpu
def test_workers_on_two_gpus_share_one_study(workdir):
    import torch

    devices = [f"cuda:{i}" for i in range(min(2, torch.cuda.device_count()))]
    storage = f"sqlite:///{workdir['dir'] / 'gpu.db'}"
    run = subprocess.run(_cli(workdir, storage, "--trials", "6", "--devices", ",".join(devices), "--json",
                              "--no-tracking", "--max-new-tokens", "24"),
                         env=_env(), capture_output=True, timeout=600)
    assert run.returncode == 0, run.stderr.decode()[-3000:]
    study = optuna.load_study(study_name=json.loads(run.stdout)["study_name"], storage=storage)
    assert len(study.trials) == 6 and all(t.state.name in ("COMPLETE", "PRUNED") for t in study.trials)
    assert {t.user_attrs["worker"]["device"] for t in study.trials} == set(devices)


# --------------------------------------------------------------------------- PostgreSQL


def _states(url: str, name: str) -> list[str]:
    return [t.state.name for t in optuna.load_study(study_name=name, storage=url).trials]


def test_the_database_lock_excludes_other_hosts_and_dies_with_its_holder(postgres, tmp_path):
    from calibration.storage import DatabaseLock

    first, second = DatabaseLock(postgres, "study-a"), DatabaseLock(postgres, "study-a")
    got = threading.Event()

    def take() -> None:
        with second:
            got.set()

    with first, first:  # reentrant
        waiter = threading.Thread(target=take, daemon=True)
        waiter.start()
        assert not got.wait(1.5), "two connections held the same study lock at once"
        with DatabaseLock(postgres, "study-b"):  # another study's lock is independent
            pass
    assert got.wait(10), "the lock was not released"
    waiter.join(10)

    # A holder killed by SIGKILL (a crashed host's worker) does not keep the lock: the server frees it.
    code = ("import sys, time; from calibration.storage import DatabaseLock\n"
            f"lock = DatabaseLock({postgres!r}, 'study-a'); lock.__enter__(); print('held', flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                              env=_other_host_env(tmp_path / "host-b"))
    try:
        assert holder.stdout.readline().strip() == b"held"
        got.clear()
        waiter = threading.Thread(target=take, daemon=True)
        waiter.start()
        assert not got.wait(1.5)
        holder.send_signal(signal.SIGKILL)
        assert got.wait(15), "the killed holder's lock was not freed"
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_a_trial_of_a_dead_worker_on_another_host_is_failed_by_heartbeat_and_retried(postgres):
    import sqlalchemy

    from calibration.space import SearchSpace
    from calibration.storage import HEARTBEAT_GRACE_S, open_storage, reclaim_dead_trials, this_worker

    storage = open_storage(postgres)
    study = optuna.create_study(study_name="hb", storage=storage, direction="maximize")
    space = SearchSpace.for_model(4096, 16)
    trial = study.ask()
    params = space.suggest(trial)
    trial.set_user_attr("worker", {**this_worker(), "host": "another-host", "pid": 1})
    storage.record_heartbeat(trial._trial_id)

    assert reclaim_dead_trials(study) == []  # a fresh heartbeat: alive, whatever its pid means here
    assert _states(postgres, "hb") == ["RUNNING"]

    engine = sqlalchemy.create_engine(postgres, poolclass=sqlalchemy.pool.NullPool)
    with engine.begin() as con:  # the host died HEARTBEAT_GRACE_S + 30 s ago: its heartbeat stopped then
        con.execute(sqlalchemy.text("UPDATE trial_heartbeats SET heartbeat = heartbeat - make_interval(secs => :s)"),
                    {"s": HEARTBEAT_GRACE_S + 30})
    engine.dispose()
    reclaim_dead_trials(study)
    trials = optuna.load_study(study_name="hb", storage=postgres).trials
    assert [t.state.name for t in trials] == ["FAIL", "WAITING"]
    assert trials[1].params == params  # queued again with the same parameters


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_a_trial_killed_before_its_worker_was_recorded_is_failed_under_the_lock(tmp_path):
    """A process SIGKILLed between creating its trial and recording itself on it leaves a RUNNING trial
    with no pid or heartbeat; under the study's lock (where live workers do both together) it is failed."""
    from calibration.storage import open_storage, reclaim_dead_trials

    study = optuna.create_study(study_name="s", storage=open_storage(f"sqlite:///{tmp_path / 's.db'}"))
    orphan = study.ask()
    assert reclaim_dead_trials(study) == []  # without the lock, it could be a live worker's, mid-way
    assert reclaim_dead_trials(study, locked=True) == [orphan.number]
    assert [t.state.name for t in study.get_trials()] == ["FAIL"]


def test_two_hosts_share_one_postgres_study_exactly(workdir, postgres, tmp_path):
    """`--workers 2` on one host, then two commands as on two hosts (no shared lock file): exactly the
    trial budget each time, no trial run twice, the profile registered once, one MLflow run per trial."""
    import mlflow

    base = ["--max-new-tokens", "48", "--json"]  # trials long enough to share (MLflow syncs take a while)
    run = subprocess.run(_cli(workdir, postgres, "--trials", "6", "--workers", "2", *base),
                         env=_env(), capture_output=True, timeout=500)
    assert run.returncode == 0, run.stderr.decode()[-3000:]
    name = json.loads(run.stdout)["study_name"]
    trials = optuna.load_study(study_name=name, storage=postgres).trials
    assert [t.state.name in ("COMPLETE", "PRUNED") for t in trials] == [True] * 6
    pids = [t.user_attrs["worker"]["pid"] for t in trials]
    assert len(set(pids)) == 2, f"both processes should run trials: {pids}\n{run.stderr.decode()[-3000:]}"

    hosts = [_other_host_env(tmp_path / f"host-{k}") for k in "ab"]
    procs = [subprocess.Popen(_cli(workdir, postgres, "--trials", "10", *base), env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for env in hosts]
    outs = [p.communicate(timeout=500) for p in procs]
    for proc, (_, err) in zip(procs, outs):
        assert proc.returncode == 0, err.decode()[-3000:]
    results = [json.loads(out) for out, _ in outs]
    assert results[0]["profile_ref"] == results[1]["profile_ref"]
    assert _versions(workdir) == [1, 2, 3]
    trials = optuna.load_study(study_name=name, storage=postgres).trials
    assert len(trials) == 10 and all(t.state.name in ("COMPLETE", "PRUNED") for t in trials)
    params = [json.dumps(t.params, sort_keys=True) for t in trials]
    assert len(set(params)) == len(params), "a trial's parameters were run twice"
    mlflow.set_tracking_uri(f"sqlite:///{workdir['dir'] / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["dysco-calibration"], output_format="list")
    assert sorted(int(r.data.tags["optuna.trial_number"]) for r in runs if "optuna.trial_number" in r.data.tags) \
        == list(range(10))
    assert len([r for r in runs if "optuna.trial_number" not in r.data.tags]) == 1  # one parent run


def test_a_killed_worker_trial_is_failed_and_retried_on_postgres(workdir, postgres):
    import sqlalchemy

    from calibration.space import KNOBS

    cmd = _cli(workdir, postgres, "--trials", "8", "--max-new-tokens", "24")
    first = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    engine = sqlalchemy.create_engine(postgres, poolclass=sqlalchemy.pool.NullPool)
    # Two trials done and a third under way (its parameters drawn): the kill lands mid-trial.
    query = sqlalchemy.text(
        "SELECT (SELECT count(*) FROM trials WHERE state = 'COMPLETE'), "
        "(SELECT count(*) FROM trials t WHERE state = 'RUNNING' "
        " AND (SELECT count(*) FROM trial_params p WHERE p.trial_id = t.trial_id) = :knobs)"
    ).bindparams(knobs=len(KNOBS))
    deadline, done, busy = time.monotonic() + 300, 0, 0
    while time.monotonic() < deadline and first.poll() is None and not (done >= 2 and busy):
        try:
            with engine.connect() as con:
                done, busy = con.execute(query).one()
        except sqlalchemy.exc.ProgrammingError:
            pass  # tables not created yet
        time.sleep(0.02)
    engine.dispose()
    if not (done >= 2 and busy):
        first.kill()
        pytest.fail("the first run never had two trials done and a third under way: "
                    + first.communicate()[1].decode()[-3000:])
    first.send_signal(signal.SIGKILL)
    first.wait()
    (name,) = [s.study_name for s in optuna.get_all_study_summaries(postgres)]
    running = [t.number for t in optuna.load_study(study_name=name, storage=postgres).trials
               if t.state.name == "RUNNING"]
    assert len(running) == 1

    second = subprocess.run(cmd + ["--json"], env=_env(), capture_output=True, timeout=400)
    assert second.returncode == 0, second.stderr.decode()[-3000:]
    assert json.loads(second.stdout)["trials"]["finished"] == 8
    study = optuna.load_study(study_name=name, storage=postgres)
    states = [t.state.name for t in study.trials]
    assert states.count("COMPLETE") + states.count("PRUNED") == 8 and states.count("FAIL") == 1
    killed = study.trials[running[0]]  # the trial the kill interrupted: failed, then run again with its parameters
    assert killed.state.name == "FAIL"
    retried = [t for t in study.trials if t.user_attrs.get("retry_of") == killed.number]
    assert len(retried) == 1 and retried[0].params == killed.params and retried[0].state.name != "FAIL"


# --------------------------------------------------------------------------- an MLflow tracking server


@pytest.fixture()
def mlflow_server(tmp_path):
    """(tracking URI, artifact folder) of a real `mlflow server` on a free port; skips if it does not start."""
    mlflow_bin = shutil.which("mlflow", path=os.path.dirname(sys.executable))
    if mlflow_bin is None:
        pytest.skip("the mlflow command is not installed next to this Python")
    port, artifacts = _free_port(), tmp_path / "artifacts"
    log = open(tmp_path / "mlflow-server.log", "wb")
    server = subprocess.Popen(
        [mlflow_bin, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow-server.db'}",
         "--artifacts-destination", str(artifacts)],
        stdout=log, stderr=subprocess.STDOUT, env=_env(), start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    import urllib.request

    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2):
                break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                log.close()
                tail = (tmp_path / "mlflow-server.log").read_text(errors="replace")[-500:]
                pytest.skip(f"mlflow server did not start within 120 s: {tail}")
            time.sleep(0.5)
    yield uri, artifacts
    os.killpg(server.pid, signal.SIGTERM)  # its own session: the server and the workers it started
    try:
        server.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
    log.close()


def test_runs_and_plots_reach_an_mlflow_tracking_server(workdir, mlflow_server):
    from mlflow import MlflowClient

    uri, artifacts = mlflow_server
    config = CalibrationConfig(
        dev="kv", model=workdir["model"], profile=workdir["ref"], trials=3, examples=2, test_examples=1,
        context=300, max_new_tokens=4, storage=f"sqlite:///{workdir['dir'] / 'study.db'}", tracking_uri=uri,
        registry=str(workdir["registry"]), attnts_temperatures=(0.8,), threads=1,
    )
    result = calibrate(config)
    assert result.mlflow == {"tracking_uri": uri, "run_id": result.mlflow["run_id"]}
    client = MlflowClient(uri)
    parent = client.get_run(result.mlflow["run_id"])
    assert parent.info.status == "FINISHED" and parent.data.metrics["test_dysco"] == result.scores["test"]["dysco"]
    experiment = client.get_experiment_by_name("dysco-calibration")
    nested = client.search_runs([experiment.experiment_id],
                                filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(int(r.data.tags["optuna.trial_number"]) for r in nested) == [0, 1, 2]
    listed = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert "plots/optimization_history.png" in listed
    local = client.download_artifacts(parent.info.run_id, "plots/optimization_history.png", str(workdir["dir"]))
    assert Path(local).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The server stored it in its artifact folder (proxied upload), not the client in a local path.
    assert list(artifacts.rglob("optimization_history.png"))
    assert list(artifacts.rglob("profile.json"))

