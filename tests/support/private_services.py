"""PostgreSQL and Redis instances of the chaos suite's own, and workers pointed at them.

The shared services (127.0.0.1:5432, :6379) are never touched: the suite starts
its own PostgreSQL cluster (initdb into a temporary folder, run as the `postgres`
user) and its own Redis (no persistence, like production's), each on a free port,
so a test can restart, stop and flush them. Both are stopped in a finalizer,
pass or fail. Each test gets a fresh database, queue and data folder.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from tests.conftest import ROOT
from tests.support.fixtures import ClientDispatcher, die_with_parent, wait_until

PG_BIN = Path("/usr/lib/postgresql/15/bin")
CHAOS_DIR = ROOT / "tests" / "chaos"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _as_postgres(*argv: str, check: bool = True, timeout: float = 120) -> str:
    """Run a PostgreSQL binary as the `postgres` user (the suite may run as root)."""
    prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    binary = PG_BIN / argv[0] if (PG_BIN / argv[0]).exists() else Path(argv[0])
    done = subprocess.run(
        [*prefix, str(binary), *argv[1:]],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd="/",
    )
    if check and done.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed ({done.returncode}): {done.stdout}{done.stderr}")
    return done.stdout + done.stderr


@dataclass
class PrivatePostgres:
    """A PostgreSQL cluster in a temporary folder, on a free port."""

    root: Path
    port: int = field(default_factory=free_port)
    _databases: Iterator[int] = field(default_factory=itertools.count)

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def log(self) -> Path:
        return self.root / "postgres.log"

    def server_url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/{database}"

    def init(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
        _as_postgres(
            "initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust",
            "-E", "UTF8", "--no-sync", "--no-instructions",
        )  # fmt: skip
        self.start()

    def _options(self) -> str:
        # fsync off: the machine does not crash, processes do; a crash of the server
        # (immediate stop) still loses what was only in its shared memory, as in
        # production with synchronous_commit off.
        return (
            f"-p {self.port} -c listen_addresses=127.0.0.1 "
            f"-c unix_socket_directories={self.root} -c fsync=off -c full_page_writes=off "
            "-c max_connections=300 -c shared_buffers=64MB"
        )

    def start(self) -> None:
        _as_postgres(
            "pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", self._options(),
            "-w", "-t", "120", "start",
        )  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        _as_postgres("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "120", "stop")

    def restart(self, mode: str = "fast") -> None:
        """`pg_ctl restart -m fast` (a clean restart) or `-m immediate` (a crash)."""
        _as_postgres(
            "pg_ctl", "-D", str(self.data), "-m", mode, "-l", str(self.log),
            "-o", self._options(), "-w", "-t", "120", "restart",
        )  # fmt: skip

    def down_for(self, seconds: float, mode: str = "fast") -> None:
        """Stop the server, hold the outage for `seconds`, start it again."""
        self.stop(mode)
        time.sleep(seconds)
        self.start()

    def running(self) -> bool:
        out = _as_postgres("pg_ctl", "-D", str(self.data), "status", check=False)
        return "server is running" in out

    def ensure_running(self) -> None:
        if not self.running():
            self.start()

    def create_database(self) -> str:
        """A fresh, migrated database; returns its SQLAlchemy URL."""
        from app.store.migrate import upgrade

        name = f"chaos_{os.getpid()}_{next(self._databases)}"
        admin = create_engine(self.server_url(), isolation_level="AUTOCOMMIT")
        try:
            with admin.connect() as conn:
                conn.execute(text(f'CREATE DATABASE "{name}"'))
        finally:
            admin.dispose()
        url = self.server_url(name)
        upgrade(url)
        return url

    def close(self) -> None:
        with contextlib.suppress(Exception):
            if self.data.exists():
                self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


@dataclass
class PrivateRedis:
    """A Redis server without persistence, on a free port."""

    root: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> Any:
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        log = (self.root / "redis.log").open("ab")
        self.process = subprocess.Popen(
            [
                "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "no", "--dir", str(self.root),
                "--daemonize", "no",
            ],
            stdout=log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent,
        )  # fmt: skip
        log.close()
        wait_until(self._pings, timeout=30, what=f"the private Redis on :{self.port}")

    def _pings(self) -> bool:
        client = self.client()
        try:
            return bool(client.ping())
        except Exception:
            return False
        finally:
            client.close()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def restart(self) -> None:
        """Stop and start again: without persistence, every queued message is lost."""
        self.stop()
        self.start()

    def down_for(self, seconds: float) -> None:
        self.stop()
        time.sleep(seconds)
        self.start()

    def flushall(self) -> None:
        client = self.client()
        try:
            client.flushall()
        finally:
            client.close()

    def ensure_running(self) -> None:
        if self.process is None or self.process.poll() is not None:
            self.start()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


# --- session fixtures: one private PostgreSQL and Redis for the whole chaos suite ----


@pytest.fixture(scope="session")
def private_postgres() -> Iterator[PrivatePostgres]:
    if shutil.which("pg_ctl") is None and not (PG_BIN / "pg_ctl").exists():
        pytest.skip("PostgreSQL binaries (initdb, pg_ctl) are not installed")
    pg = PrivatePostgres(Path(tempfile.mkdtemp(prefix="agentloop-chaos-pg-")))
    try:
        pg.init()
        yield pg
    finally:
        pg.close()


@pytest.fixture(scope="session")
def private_redis() -> Iterator[PrivateRedis]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    server = PrivateRedis(Path(tempfile.mkdtemp(prefix="agentloop-chaos-redis-")))
    try:
        server.start()
        yield server
    finally:
        server.close()


# --- per test: a fresh database, queue and data folder; a service and workers --------

_queues = itertools.count()


@dataclass
class ChaosEnv:
    """Where one test's runs live, and the environment its workers get."""

    pg: PrivatePostgres
    redis: PrivateRedis
    database_url: str
    queue: str
    data_dir: Path
    faults_dir: Path
    # The private Redis, or the session's RabbitMQ vhost (chaos_broker "rabbitmq").
    broker_url: str = ""

    def __post_init__(self) -> None:
        self.broker_url = self.broker_url or self.redis.url

    def worker_env(self) -> dict[str, str]:
        return {
            "DATABASE_URL": self.database_url,
            "CELERY_BROKER_URL": self.broker_url,
            "AGENTLOOP_QUEUE": self.queue,
            "AGENTLOOP_DATA_DIR": str(self.data_dir),
            "AGENTLOOP_TOOL_MODULES": "tests.chaos.tools",
            "AGENTLOOP_RUNBOOKS_DIR": str(CHAOS_DIR / "runbooks"),
            "AGENTLOOP_LEASE_GRACE": "1",
            "AGENTLOOP_SWEEP_INTERVAL": "0.5",
            "AGENTLOOP_SWEEP_GRACE": "0.5",
            "AGENTLOOP_EXPIRE_INTERVAL": "3600",
            "CHAOS_FAULTS_DIR": str(self.faults_dir),
        }

    def settings(self) -> Any:
        from app.config import load_settings

        env = self.worker_env()
        return load_settings(
            database_url=env["DATABASE_URL"],
            broker_url=env["CELERY_BROKER_URL"],
            queue=self.queue,
            data_dir=self.data_dir,
            tool_modules=env["AGENTLOOP_TOOL_MODULES"],
            runbooks_dir=env["AGENTLOOP_RUNBOOKS_DIR"],
            lease_grace=1.0,
            sweep_grace=0.5,
            sweep_interval=0.5,
        )

    def workspace(self, run_id: str) -> Path:
        return self.data_dir / "workspaces" / run_id

    def arm(self, fault: str, run_id: str) -> None:
        """Arm a one-shot fault for one run (see tests/chaos/tools.py)."""
        (self.faults_dir / f"{fault}.{run_id}").touch()


@pytest.fixture
def chaos_broker(request: pytest.FixtureRequest) -> str:
    """The broker a chaos case runs on: "" for the private Redis, or the session's
    RabbitMQ vhost when a case is parametrized with `chaos_broker` "rabbitmq" (only
    faults of workers and PostgreSQL: RabbitMQ itself is shared, never restarted)."""
    if getattr(request, "param", "redis") == "rabbitmq":
        return str(request.getfixturevalue("rabbitmq_url"))
    return ""


@pytest.fixture
def chaos_env(
    private_postgres: PrivatePostgres,
    private_redis: PrivateRedis,
    chaos_broker: str,
    tmp_path: Path,
) -> ChaosEnv:
    # A test that failed mid-fault may have left a server down.
    private_postgres.ensure_running()
    private_redis.ensure_running()
    data_dir = tmp_path / "data"
    faults = tmp_path / "faults"
    faults.mkdir()
    return ChaosEnv(
        pg=private_postgres,
        redis=private_redis,
        database_url=private_postgres.create_database(),
        queue=f"chaos-{os.getpid()}-{next(_queues)}",
        data_dir=data_dir,
        faults_dir=faults,
        broker_url=chaos_broker,
    )


@pytest.fixture
def chaos_client(chaos_env: ChaosEnv) -> Iterator[ClientDispatcher]:
    client = ClientDispatcher(chaos_env.settings())
    yield client
    client.close()


@pytest.fixture
def chaos_service(chaos_env: ChaosEnv, chaos_client: ClientDispatcher) -> Iterator[Any]:
    """An AgentService in the test process over the private database, publishing to
    the private broker: what the web app and the CLI would be."""
    from app.wiring import build_service

    service = build_service(chaos_env.settings(), chaos_client, chaos_client)
    yield service
    service.store.dispose()


# --- real worker processes on the private services -----------------------------------

FAKETIME_LIB = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")


@dataclass
class ChaosWorker:
    process: subprocess.Popen[bytes]
    log: Path
    name: str

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def child_pids(self) -> list[int]:
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        try:
            return [int(p) for p in children.read_text().split()]
        except OSError:
            return []

    def kill_child(self, pid: int | None = None) -> int:
        """SIGKILL a pool child (the given one, or the first); returns its pid."""
        target = pid if pid is not None else self.child_pids()[0]
        os.kill(target, signal.SIGKILL)
        return target

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=15)
        if self.process.poll() is None:
            # Kill the whole process group: the master and its pool children.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        else:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)  # orphaned children, if any


@pytest.fixture
def start_chaos_worker(chaos_env: ChaosEnv, tmp_path: Path) -> Iterator[Callable[..., ChaosWorker]]:
    """Start `celery worker` processes over the private services (prefork; beat
    optional; `clock_offset` like "+60s" runs the worker under libfaketime)."""
    started: list[ChaosWorker] = []

    def start(
        *,
        beat: bool = True,
        concurrency: int = 1,
        name: str = "w",
        clock_offset: str | None = None,
        env: dict[str, str] | None = None,
    ) -> ChaosWorker:
        index = len(started)
        log = tmp_path / f"worker-{name}-{index}.log"
        argv = [
            sys.executable, "-m", "celery", "-A", "tasks", "worker",
            "--pool=prefork", f"--concurrency={concurrency}", "--loglevel=INFO",
            "--without-gossip", "--without-mingle", "--without-heartbeat",
            f"--hostname={name}{index}-{chaos_env.queue}@%h",
        ]  # fmt: skip
        if beat:
            argv += ["--beat", f"--schedule={tmp_path / f'beat-{name}-{index}'}"]
        worker_env = {**os.environ, **chaos_env.worker_env(), **(env or {})}
        if clock_offset is not None:
            if not FAKETIME_LIB.exists():
                pytest.fail(f"{FAKETIME_LIB} is missing: apt-get install -y libfaketime")
            worker_env.update(
                LD_PRELOAD=str(FAKETIME_LIB),
                FAKETIME=clock_offset,
                FAKETIME_DONT_RESET="1",
                FAKETIME_NO_CACHE="1",
            )
        with log.open("wb") as out:
            process = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=worker_env,
                start_new_session=True, preexec_fn=die_with_parent,
            )  # fmt: skip
        worker = ChaosWorker(process=process, log=log, name=f"{name}{index}")
        started.append(worker)
        wait_until(
            lambda: "ready." in worker.output() or process.poll() is not None,
            timeout=90,
            what=f"worker {worker.name} to be ready",
        )
        assert process.poll() is None, worker.output()[-4000:]
        return worker

    yield start
    for worker in started:
        worker.stop()
