"""Supervisor: drain on SIGTERM, worker replacement, fail-fast start-up, settings."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import threading
import time
import uuid
from pathlib import Path

import grpc
import pytest

from riskwire.protos import scoring_pb2, scoring_pb2_grpc
from riskwire.server.config import Settings, SettingsError, load_settings

pytestmark = pytest.mark.timeout(300)

DRAIN_BOUND_S = 40.0  # grace (3 s in the test profile, 20 s below) + join slack, busy CI box


def score_request(transaction_id: str = "") -> scoring_pb2.ScoreRequest:
    """A valid request on a fresh card."""
    return scoring_pb2.ScoreRequest(
        transaction=scoring_pb2.Transaction(
            transaction_id=transaction_id,
            card_id=f"card-{uuid.uuid4().hex}",
            merchant_id="m-1",
            mcc=5411,
            amount=10.0,
            currency="EUR",
            country="DE",
            card_country="DE",
            channel="pos",
        )
    )


# ------------------------------------------------------------------------ processes


def test_sigterm_drains_in_flight_stream_and_exits_zero(start_server, models_dir) -> None:
    """A stream open at SIGTERM keeps being served during the grace period; exit is 0.

    The grace period is raised to 20 s so a busy machine cannot make the in-flight stream
    outlive it; the stream is closed right away, so the exit itself is prompt.
    """
    server = start_server(models_dir, env={"RISKWIRE_GRACE_PERIOD_S": "20"})
    more = threading.Event()
    finish = threading.Event()

    def requests():
        yield score_request("before")
        more.wait(60)
        yield score_request("during-drain")
        finish.wait(60)

    with grpc.insecure_channel(server.target) as channel:
        responses = scoring_pb2_grpc.ScoringStub(channel).ScoreStream(requests(), timeout=120)
        first = next(responses)
        assert first.transaction_id == "before" and not first.HasField("error")
        pid = server.worker_of(first.request_id)
        server.process.send_signal(signal.SIGTERM)
        server.wait_for_log(lambda line: f"[{pid}]" in line and "draining" in line, 30)
        more.set()
        second = next(responses)
        finish.set()
        assert second.transaction_id == "during-drain" and not second.HasField("error")
        assert list(responses) == []
    assert server.wait_exit(DRAIN_BOUND_S) == 0, server.log_tail()
    assert "stopped" in server.log()
    assert server.snapshot.is_file()


def test_sigterm_idle_server_exits_zero(start_server, models_dir) -> None:
    """SIGTERM on an idle server: workers stop, the supervisor exits 0 within the bound."""
    server = start_server(models_dir)
    workers = server.worker_pids()
    assert len(workers) == 2
    server.process.send_signal(signal.SIGTERM)
    assert server.wait_exit(DRAIN_BOUND_S) == 0, server.log_tail()
    for pid in workers:
        assert not Path(f"/proc/{pid}").exists() or _is_zombie(pid), f"worker {pid} left"


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


def test_killed_worker_is_replaced(start_server, models_dir) -> None:
    """SIGKILL a worker: a new worker pid appears, health is SERVING, it serves calls."""
    server = start_server(models_dir)
    before = server.worker_pids()
    assert len(before) == 2, before
    victim = min(before)
    os.kill(victim, signal.SIGKILL)

    deadline = time.monotonic() + 120
    while True:
        now = server.worker_pids()
        if len(now) == 2 and victim not in now:
            break
        assert time.monotonic() < deadline, f"no replacement worker; log:\n{server.log_tail()}"
        time.sleep(0.1)  # poll interval, bounded by the deadline
    (replacement,) = now - before
    server.wait_for_log(lambda line: f"[{replacement}]" in line and "serving fraud" in line, 120)
    assert f"pid {victim}) exited" in server.log()
    server.wait_health(30)

    served_by: set[int] = set()
    for i in range(40):  # new connections until the replacement has answered one
        with grpc.insecure_channel(
            server.target, options=[("grpc.use_local_subchannel_pool", 1), ("probe", i)]
        ) as channel:
            response = scoring_pb2_grpc.ScoringStub(channel).Score(score_request(), timeout=10)
        assert 0.0 <= response.probability <= 1.0
        served_by.add(server.worker_of(response.request_id))
        if replacement in served_by:
            break
    assert replacement in served_by, f"only {served_by} answered"
    assert server.process.poll() is None


def wait_until_gone(pids: set[int], timeout_s: float) -> set[int]:
    """Poll until none of ``pids`` is alive (zombies count as gone); return the survivors."""
    deadline = time.monotonic() + timeout_s
    alive = set(pids)
    while alive and time.monotonic() < deadline:
        alive = {p for p in alive if Path(f"/proc/{p}").exists() and not _is_zombie(p)}
        if alive:
            time.sleep(0.1)  # poll interval, bounded by the deadline
    return alive


def test_sigterm_during_startup_exits_cleanly(start_server, models_dir) -> None:
    """SIGTERM before the workers are ready: exit 0 promptly and leave no worker behind."""
    server = start_server(models_dir, wait=False)
    deadline = time.monotonic() + 60
    while len(server.worker_pids()) < 2:  # workers spawned, still loading
        assert server.process.poll() is None, server.log_tail()
        assert time.monotonic() < deadline, server.log_tail()
        time.sleep(0.02)  # poll interval, bounded by the deadline
    workers = server.worker_pids()
    server.process.send_signal(signal.SIGTERM)
    assert server.wait_exit(DRAIN_BOUND_S) == 0, server.log_tail()
    assert not wait_until_gone(workers, DRAIN_BOUND_S)


def test_workers_exit_when_supervisor_is_killed(start_server, models_dir) -> None:
    """SIGKILL on the supervisor: its orphaned workers stop on their own, promptly."""
    server = start_server(models_dir)
    workers = server.worker_pids()
    assert len(workers) == 2
    try:
        server.process.send_signal(signal.SIGKILL)
        server.wait_exit(30)
        # PDEATHSIG sends each worker SIGTERM: the same drain as a supervisor's stop.
        survivors = wait_until_gone(workers, DRAIN_BOUND_S)
        assert not survivors, f"orphaned workers {sorted(survivors)} still running"
    finally:
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        wait_until_gone(workers, 30)


def test_empty_models_dir_exits_nonzero_with_clear_message(start_server, tmp_path) -> None:
    """No model to serve: the server stops with a non-zero status instead of looping."""
    empty = tmp_path / "empty-models"
    empty.mkdir()
    server = start_server(empty, wait=False)
    status = server.wait_exit(90)
    assert status != 0
    log = server.log()
    assert "no loadable model package" in log and str(empty) in log
    assert log.count("could not start") <= 2  # at most once per worker: no restart loop


def test_prod_refuses_and_dev_warns_without_tls_and_auth(start_server, tmp_path) -> None:
    """--profile prod exits with a clear error without TLS and auth; dev starts but logs a
    loud warning."""
    empty = tmp_path / "models"
    empty.mkdir()
    prod = start_server(empty, "--profile", "prod", wait=False)
    assert prod.wait_exit(90) != 0
    assert "refuses to start without TLS and authentication" in prod.log()
    dev = start_server(empty, "--profile", "dev", wait=False)  # exits: nothing to serve
    dev.wait_exit(90)
    warnings = [line for line in dev.log().splitlines() if "WARNING" in line]
    assert any("TLS and authentication OFF" in w for w in warnings), dev.log()


# ------------------------------------------------------------------------ settings


def write_toml(path: Path, text: str) -> Path:
    """Write a config file and return its path."""
    path.write_text(text)
    return path


def test_defaults_and_profile_defaults() -> None:
    """No file, env or flags: dataclass defaults; a profile overrides its own fields."""
    assert load_settings(environ={}) == Settings()
    test = load_settings(environ={}, overrides={"profile": "test"})
    assert test.profile == "test" and test.state_capacity == 1 << 16
    assert test.grace_period_s == 3.0
    with pytest.raises(SettingsError, match="TLS and authentication"):
        load_settings(environ={}, overrides={"profile": "prod"})
    assert Settings().warnings() and "TLS and authentication OFF" in Settings().warnings()[0]


def test_prod_starts_with_tls_and_auth(tmp_path: Path) -> None:
    """prod's defaults apply once TLS and auth are configured; half a TLS pair is refused."""
    from riskwire.clients.certs_cli import generate_dev_certificates

    files = generate_dev_certificates(tmp_path / "tls")
    tls = {"tls_cert": str(files["server_cert"]), "tls_key": str(files["server_key"])}
    prod = load_settings(environ={}, overrides={"profile": "prod", "auth": True, **tls})
    assert prod.host == "0.0.0.0" and prod.log_level == "WARNING"
    assert prod.warnings() == []
    with pytest.raises(SettingsError, match="together"):
        load_settings(environ={}, overrides={"tls_cert": tls["tls_cert"]})


def test_precedence_flag_over_env_over_file_over_profile(tmp_path: Path) -> None:
    """flag > RISKWIRE_* env > config file > profile defaults, field by field."""
    config = write_toml(
        tmp_path / "server.toml",
        "[server]\nprofile = 'test'\nport = 6001\nworkers = 3\nstate_capacity = 1024\n"
        "grace_period_s = 7\n",
    )
    environ = {"RISKWIRE_PORT": "6002", "RISKWIRE_WORKERS": "5", "RISKWIRE_PIN_WORKERS": "off"}
    settings = load_settings(config_file=config, environ=environ, overrides={"workers": 4})
    assert settings.workers == 4  # flag
    assert settings.port == 6002  # env over file
    assert settings.pin_workers is False  # env
    assert settings.state_capacity == 1024  # file over profile (test: 65536)
    assert settings.grace_period_s == 7.0  # file int coerced to float, over profile
    assert settings.snapshot_interval_s == 5.0  # profile default (test)
    assert settings.profile == "test"


def test_profile_precedence(tmp_path: Path) -> None:
    """The profile itself resolves flag > env > file; flags of None are ignored."""
    config = write_toml(tmp_path / "c.toml", "profile = 'staging'\n")
    assert load_settings(config_file=config, environ={}).profile == "staging"
    env = {"RISKWIRE_PROFILE": "test"}
    assert load_settings(config_file=config, environ=env).profile == "test"
    flags = {"profile": "dev", "port": None}
    settings = load_settings(config_file=config, environ=env, overrides=flags)
    assert settings.profile == "dev" and settings.port == 50051


def test_snapshot_path_from_env_and_default() -> None:
    """RISKWIRE_STATE_SNAPSHOT sets the snapshot path; default is under the models dir."""
    settings = load_settings(environ={"RISKWIRE_STATE_SNAPSHOT": "/tmp/x/cards.snapshot"})
    assert settings.snapshot_path == Path("/tmp/x/cards.snapshot")
    default = load_settings(environ={"RISKWIRE_MODELS": "/srv/models"})
    assert default.snapshot_path == Path("/srv/models/.state/cards.snapshot")


def test_request_log_size_may_be_a_fraction_of_a_megabyte() -> None:
    settings = load_settings(environ={"RISKWIRE_REQUEST_LOG_MAX_MB": "0.25"})
    assert settings.request_log_max_mb == 0.25


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"environ": {"RISKWIRE_PORT": "http"}}, "RISKWIRE_PORT"),
        ({"environ": {"RISKWIRE_PORT": "70000"}}, "port"),
        ({"environ": {"RISKWIRE_PIN_WORKERS": "maybe"}}, "pin_workers"),
        ({"environ": {"RISKWIRE_GRACE_PERIOD_S": "soon"}}, "grace_period_s"),
        ({"environ": {"RISKWIRE_PROFILE": "production"}}, "profile"),
        ({"environ": {}, "overrides": {"profile": "qa"}}, "profile"),
        ({"environ": {}, "overrides": {"workers": -1}}, "workers"),
        ({"environ": {"RISKWIRE_STATE_CAPACITY": "1000"}}, "state_capacity"),
        ({"environ": {"RISKWIRE_MAX_BATCH_ROWS": "0"}}, "max_batch_rows"),
        ({"environ": {"RISKWIRE_DEFAULT_TOP_REASONS": "11"}}, "default_top_reasons"),
        ({"environ": {"RISKWIRE_REQUEST_LOG_MAX_MB": "0"}}, "request_log_max_mb"),
        ({"environ": {"RISKWIRE_PREDICTION_LOG_WRITER": "fork"}}, "prediction_log_writer"),
    ],
)
def test_bad_values_raise_settings_error_naming_the_setting(kwargs: dict, name: str) -> None:
    """Bad values fail fast with a SettingsError whose message names the setting."""
    with pytest.raises(SettingsError, match=re.escape(name)):
        load_settings(**kwargs)


@pytest.mark.parametrize(
    ("text", "name"),
    [
        ("[server]\nport = 'x'\n", "port"),
        ("[server]\nport = true\n", "port"),
        ("[server]\nworkers = 1.5\n", "workers"),
        ("[server]\nno_such_knob = 1\n", "no_such_knob"),
        ("[server\nport = 1\n", "cannot read config file"),
    ],
)
def test_bad_config_file_raises_settings_error(tmp_path: Path, text: str, name: str) -> None:
    """Wrong types, unknown keys and broken TOML in the file are SettingsErrors."""
    config = write_toml(tmp_path / "bad.toml", text)
    with pytest.raises(SettingsError, match=re.escape(name)):
        load_settings(config_file=config, environ={})


def test_missing_config_file_raises_settings_error(tmp_path: Path) -> None:
    """A config path that does not exist is a SettingsError, not an OSError."""
    with pytest.raises(SettingsError, match="cannot read config file"):
        load_settings(config_file=tmp_path / "absent.toml", environ={})


@pytest.mark.parametrize(
    ("environ", "name"),
    [
        ({"RISKWIRE_GRACE_PERIOD_S": "-1"}, "grace_period_s"),
        ({"RISKWIRE_RESTART_BACKOFF_S": "-0.5"}, "restart_backoff_s"),
        ({"RISKWIRE_SNAPSHOT_INTERVAL_S": "-60"}, "snapshot_interval_s"),
        ({"RISKWIRE_MAX_CONCURRENT_RPCS": "-4"}, "max_concurrent_rpcs"),
        ({"RISKWIRE_LOG_LEVEL": "LOUD"}, "log_level"),
    ],
)
def test_out_of_range_values_are_rejected(environ: dict[str, str], name: str) -> None:
    """Negative durations/limits and unknown log levels should fail fast at start-up."""
    with pytest.raises(SettingsError, match=re.escape(name)):
        load_settings(environ=environ)


def test_serve_with_bad_setting_exits_2_naming_it(tmp_path: Path) -> None:
    """``riskwire serve`` with a bad env value exits 2 with a message, no traceback."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("RISKWIRE_")}
    env["RISKWIRE_STATE_CAPACITY"] = "1000"
    result = subprocess.run(
        [sys.executable, "-m", "riskwire.clients.cli", "serve", "--models", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "state_capacity" in result.stderr and "Traceback" not in result.stderr
