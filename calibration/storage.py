"""Where a calibration study lives: Optuna storage URLs (sqlite, PostgreSQL, MySQL), the locks that
let several workers share one study, trial heartbeats, and reclaiming trials left by dead workers.

A file lock serialises one host's processes; on a PostgreSQL/MySQL storage a lock held in the
database server (`DatabaseLock`) serialises other hosts' processes too (docs/scaling.md).

    storage = open_storage("sqlite:///calibration.db")      # or postgresql://user@host/db
    with Locks(FileLock(lock_path(url, study_name)), DatabaseLock(url, study_name)):
        reclaim_dead_trials(study, locked=True)
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
import tempfile
import threading
import warnings
from collections.abc import Iterator
from typing import Any

import optuna
from optuna.trial import TrialState

from calibration.errors import CalibrationError
from calibration.space import KNOBS

log = logging.getLogger(__name__)

DEFAULT_STORAGE = "sqlite:///calibration.db"  # the CLI's default, in the working folder
HEARTBEAT_INTERVAL_S = 10
HEARTBEAT_GRACE_S = 60


# --------------------------------------------------------------------------- worker identity


def _process_started(pid: int) -> float | None:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


_HOST = socket.gethostname()


def this_worker() -> dict[str, Any]:
    """This process as a trial records it: host, pid and the pid's start time (a reused pid is another process)."""
    return {"host": _HOST, "pid": os.getpid(), "started": _process_started(os.getpid())}


def _is_dead(worker: dict[str, Any]) -> bool:
    """Whether a worker recorded on this host is gone (its pid ended or now names another process)."""
    if worker.get("host") != _HOST:
        return False  # another host: its heartbeat decides
    started = _process_started(int(worker["pid"]))
    return started is None or (worker.get("started") is not None and abs(started - worker["started"]) > 1.0)


# --------------------------------------------------------------------------- storage


SERVER_BACKENDS = ("postgresql", "mysql")  # storages several hosts can share (docs/scaling.md)
CONNECT_TIMEOUT_S = 10  # an unreachable database server fails within this, not after the OS's minutes


def storage_label(url: str | None) -> str | None:
    """`url` with its password replaced by ***, for messages, MLflow and profile provenance."""
    if url is None or "@" not in url:
        return url
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL sqlalchemy can parse: open_storage will say so
        return url


def backend_name(url: str) -> str:
    """The database of a storage URL: 'sqlite', 'postgresql', 'mysql' …"""
    from sqlalchemy.engine import make_url

    return make_url(url).get_backend_name()


def _driver(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).get_driver_name()


def _query(url: str) -> Any:
    from sqlalchemy.engine import make_url

    return make_url(url).query


def _connect_args(url: str) -> dict[str, Any]:
    """Connection arguments for a server database: a connect timeout unless the URL sets one."""
    return {} if "connect_timeout" in _query(url) else {"connect_timeout": CONNECT_TIMEOUT_S}


def _storage_error(url: str, err: BaseException) -> CalibrationError:
    """One line saying why `url` cannot be opened: a missing driver (and how to get it), or the server's reason."""
    chain, cause = [], err
    while cause is not None and len(chain) < 8:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    label = storage_label(url)
    missing = next((e for e in chain if isinstance(e, ModuleNotFoundError)), None)
    if missing is not None:
        return CalibrationError(
            f"cannot open the study storage {label}: its database driver ({missing.name}) is not installed; "
            "`pip install 'dysco-toolkit[storage]'` brings psycopg for postgresql:// and PyMySQL for mysql+pymysql://"
        )
    reason = getattr(err, "orig", None) or err  # sqlalchemy wraps the driver's error and adds a help link
    text = " ".join(str(reason).split()) or type(reason).__name__
    return CalibrationError(f"cannot open the study storage {label}: {text}")


class DatabaseLock:
    """A lock held in the storage's database server, for workers on several hosts (no shared lock file).

    PostgreSQL: a session advisory lock; MySQL: GET_LOCK. Both are held by one open connection, so
    the server frees the lock when the process dies (its connection closes). Reentrant.
    """

    def __init__(self, url: str, key: str) -> None:
        from sqlalchemy import create_engine
        from sqlalchemy.pool import NullPool

        self.backend = backend_name(url)
        digest = hashlib.sha256(f"dysco-calibrate\0{key}".encode()).digest()
        self.key = int.from_bytes(digest[:8], "big", signed=True)  # pg advisory locks take a bigint
        self.name = "dysco-" + digest.hex()[:50]  # MySQL lock names hold at most 64 characters
        connect_args = _connect_args(url)
        if self.backend == "postgresql" and _driver(url) in ("psycopg2", "psycopg") \
                and "options" not in _query(url):
            # The server drops a vanished host's connection (and so its lock) within about a
            # minute and a half, not after the OS's two-hour keepalive.
            connect_args["options"] = "-c tcp_keepalives_idle=60 -c tcp_keepalives_interval=10 -c tcp_keepalives_count=3"
        # NullPool: releasing closes the connection for real; AUTOCOMMIT: no transaction stays open while held.
        self.engine = create_engine(url, poolclass=NullPool, connect_args=connect_args,
                                    isolation_level="AUTOCOMMIT")
        self.depth = 0
        self.connection = None

    def __enter__(self) -> "DatabaseLock":
        if self.depth == 0:
            from sqlalchemy import text

            connection = self.engine.connect()
            try:
                if self.backend == "postgresql":
                    connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": self.key})
                elif connection.execute(text("SELECT GET_LOCK(:name, -1)"), {"name": self.name}).scalar() != 1:
                    raise CalibrationError(f"the database server refused the study lock {self.name}")
            except BaseException:
                connection.close()
                raise
            self.connection = connection
        self.depth += 1
        return self

    def __exit__(self, *exc: object) -> None:
        self.depth -= 1
        if self.depth:
            return
        from sqlalchemy import text

        connection, self.connection = self.connection, None
        try:
            with contextlib.suppress(Exception):  # closing the connection frees the lock anyway
                if self.backend == "postgresql":
                    connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": self.key})
                else:
                    connection.execute(text("SELECT RELEASE_LOCK(:name)"), {"name": self.name})
        finally:
            connection.close()


class Locks:
    """Several reentrant locks taken together, in order (a file lock, then a database lock)."""

    def __init__(self, *locks: Any) -> None:
        self.locks = locks
        self._held: list[contextlib.ExitStack] = []

    def __enter__(self) -> "Locks":
        with contextlib.ExitStack() as stack:
            for lock in self.locks:
                stack.enter_context(lock)
            self._held.append(stack.pop_all())
        return self

    def __exit__(self, *exc: object) -> None:
        self._held.pop().close()


def open_storage(url: str | None) -> optuna.storages.BaseStorage:
    """An Optuna storage for `url` (None: in memory), with heartbeats so dead trials get retried.

    Raises CalibrationError, in one line, for a missing database driver or an unreachable server.
    """
    if url is None:
        return optuna.storages.InMemoryStorage()
    engine_kwargs: dict[str, Any] = {}
    from filelock import FileLock

    try:
        if url.startswith("sqlite"):
            # Workers write briefly and rarely; wait for the lock rather than fail.
            engine_kwargs["connect_args"] = {"timeout": 120}
        elif backend_name(url) in SERVER_BACKENDS:
            engine_kwargs["connect_args"] = _connect_args(url)
        # Opening a new database creates its tables; two processes doing it at once (a command and
        # the worker it started, or workers on two hosts) race, and the loser fails with "table …
        # already exists".
        path = lock_path(url, "storage schema")
        schema_lock = FileLock(path) if path and os.path.isdir(os.path.dirname(path)) else contextlib.nullcontext()
        server_lock = DatabaseLock(url, "storage schema") if backend_name(url) in SERVER_BACKENDS \
            else contextlib.nullcontext()
        with schema_lock, server_lock, warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(
                url,
                engine_kwargs=engine_kwargs,
                heartbeat_interval=HEARTBEAT_INTERVAL_S,
                grace_period=HEARTBEAT_GRACE_S,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3),
            )
    except Exception as err:  # sqlalchemy raises many kinds; all mean "cannot open this URL"
        raise _storage_error(url, err) from None


def lock_path(url: str | None, key: str) -> str | None:
    """A host-wide lock file for `key` (a study name, or the storage schema) on the storage `url`."""
    if url is None:
        return None
    if url.startswith("sqlite:///"):
        from sqlalchemy.engine import make_url

        database = make_url(url).database
        if database and database != ":memory:":
            return os.path.abspath(database) + f".{hashlib.sha256(key.encode()).hexdigest()[:12]}.lock"
    digest = hashlib.sha256(f"{url}\0{key}".encode()).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), f"dysco-calibrate-{digest}.lock")


@contextlib.contextmanager
def heartbeat(storage: optuna.storages.BaseStorage, trial: optuna.Trial) -> Iterator[None]:
    """Record the trial's heartbeat while it runs (RDB storages), so other hosts can see it live."""
    if not isinstance(storage, optuna.storages.RDBStorage):  # open_storage gives RDB ones heartbeats
        yield
        return
    stop = threading.Event()
    trial_id = trial._trial_id  # optuna exposes no public id; stable since optuna 1.x

    def beat() -> None:
        while True:
            with contextlib.suppress(Exception):  # a missed beat is harmless; the next one retries
                storage.record_heartbeat(trial_id)
            if stop.wait(HEARTBEAT_INTERVAL_S):
                return

    thread = threading.Thread(target=beat, name="optuna-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def reclaim_dead_trials(study: optuna.Study, *, locked: bool = False) -> list[int]:
    """Fail RUNNING trials whose process is gone and queue their parameters again.

    Same host: the pid recorded in the trial's `worker` attribute is checked (it is dead, or now
    names another process). Other hosts: Optuna's heartbeat decides. `locked`: the caller holds the
    study's lock, under which a live worker creates a trial and records its `worker` together, so a
    RUNNING trial without one was left by a process killed in between. Returns the failed numbers.
    """
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = trial.user_attrs.get("worker")
        if worker is None and not locked or worker is not None and not _is_dead(worker):
            continue
        study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
        failed.append(trial.number)
        log.warning("trial %d was left running by a dead process (pid %s); re-running it",
                    trial.number, (worker or {}).get("pid", "unrecorded"))
        if set(KNOBS) <= set(trial.params):  # every knob drawn (a searched selection is drawn first)
            study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # other hosts: by heartbeat
    return failed
