"""``riskwire models …`` and the lifecycle calls of AdminClient, against an in-process fake
Admin server on port 0 that answers with canned messages and records every request."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field

import grpc
import pytest
from google.protobuf.message import Message
from grpc import StatusCode

from riskwire.clients.admin import AdminClient, change_dict, traffic_dict, version_dict
from riskwire.clients.cli import main
from riskwire.clients.models_cli import format_duration
from riskwire.protos import admin_pb2, admin_pb2_grpc

pytestmark = pytest.mark.timeout(60)

TRAFFIC = admin_pb2.TrafficState(
    name="fraud",
    primary="3",
    previous=["1", "2"],
    canary="4",
    canary_weight=5.0,
    steps=[25.0, 50.0, 100.0],
    step_interval_s=600.0,
    generation=7,
    loaded=["2"],
)
VERSIONS = [
    admin_pb2.ModelVersionInfo(
        name="fraud", version="3", state="serving", traffic_percent=95.0,
        risk_category="high", owner="risk-team", metrics={"roc_auc": 0.91234, "pr_auc": 0.4},
        loaded_in_workers=[0, 1],
    ),
    admin_pb2.ModelVersionInfo(
        name="fraud", version="4", state="serving", traffic_percent=5.0, risk_category="high",
        owner="risk-team", metrics={"roc_auc": 0.92}, loaded_in_workers=[0, 1],
    ),
    admin_pb2.ModelVersionInfo(
        name="fraud", version="5", state="available", load_error="worker 1: bad digest",
    ),
]  # fmt: skip


@dataclass
class Call:
    method: str
    request: Message
    time_remaining_s: float | None
    metadata: dict[str, str]


@dataclass
class FakeAdmin(admin_pb2_grpc.AdminServicer):
    """Canned answers; ``fail[method]`` aborts that method with (code, details)."""

    calls: list[Call] = field(default_factory=list)
    fail: dict[str, tuple[grpc.StatusCode, str]] = field(default_factory=dict)
    shadow: admin_pb2.ShadowConfig = field(default_factory=admin_pb2.ShadowConfig)

    def _record(self, method: str, request: Message, context: grpc.ServicerContext) -> None:
        metadata = {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}
        self.calls.append(Call(method, request, context.time_remaining(), metadata))
        if method in self.fail:
            context.abort(*self.fail[method])

    def _change(self, method: str, request: Message, context: grpc.ServicerContext) -> Message:
        self._record(method, request, context)
        return admin_pb2.ModelsChange(traffic=TRAFFIC, message=f"{method} {request.name} done")

    def ListModels(self, request, context):
        self._record("ListModels", request, context)
        return admin_pb2.ListModelsResponse(versions=VERSIONS, traffic=[TRAFFIC])

    def LoadModel(self, request, context):
        return self._change("LoadModel", request, context)

    def UnloadModel(self, request, context):
        return self._change("UnloadModel", request, context)

    def Promote(self, request, context):
        return self._change("Promote", request, context)

    def Rollback(self, request, context):
        return self._change("Rollback", request, context)

    def SetCanary(self, request, context):
        return self._change("SetCanary", request, context)

    def GetShadow(self, request, context):
        self._record("GetShadow", request, context)
        return self.shadow

    def SetShadow(self, request, context):
        self._record("SetShadow", request, context)
        self.shadow = admin_pb2.ShadowConfig()
        self.shadow.CopyFrom(request)
        self.shadow.generation = len(self.calls)
        return self.shadow


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[FakeAdmin, str]]:
    fake = FakeAdmin()
    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    admin_pb2_grpc.add_AdminServicer_to_server(fake, grpc_server)
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    grpc_server.start()
    yield fake, f"127.0.0.1:{port}"
    grpc_server.stop(None)


@pytest.fixture
def fake(
    server: tuple[FakeAdmin, str], monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[FakeAdmin, str]]:
    """The fake with no recorded calls, no failures and mirroring off; a clean environment."""
    for name in ("RISKWIRE_API_KEY", "RISKWIRE_TLS_CA", "RISKWIRE_TLS_CERT", "RISKWIRE_TLS_KEY"):
        monkeypatch.delenv(name, raising=False)
    servicer, target = server
    servicer.calls.clear()
    servicer.fail.clear()
    servicer.shadow = admin_pb2.ShadowConfig()
    yield servicer, target


def run(target: str, *argv: str) -> int:
    return main(["models", argv[0], "--admin", target, *argv[1:]])


# AdminClient ---------------------------------------------------------------------------


def test_message_dicts_are_plain_python() -> None:
    traffic = traffic_dict(TRAFFIC)
    assert traffic == {
        "name": "fraud", "primary": "3", "previous": ["1", "2"], "canary": "4",
        "canary_weight": 5.0, "steps": [25.0, 50.0, 100.0], "step_interval_s": 600.0,
        "generation": 7, "halted_reason": "", "loaded": ["2"],
    }  # fmt: skip
    assert all(type(traffic[k]) is list for k in ("previous", "steps", "loaded"))
    assert set(traffic) == {f.name for f in admin_pb2.TrafficState.DESCRIPTOR.fields}
    version = version_dict(VERSIONS[0])
    assert version == {
        "name": "fraud", "version": "3", "state": "serving", "traffic_percent": 95.0,
        "risk_category": "high", "owner": "risk-team", "load_error": "",
        "metrics": {"pr_auc": 0.4, "roc_auc": 0.91234}, "loaded_in_workers": [0, 1],
    }  # fmt: skip
    assert type(version["metrics"]) is dict and type(version["loaded_in_workers"]) is list
    assert set(version) == {f.name for f in admin_pb2.ModelVersionInfo.DESCRIPTOR.fields}
    change = change_dict(admin_pb2.ModelsChange(traffic=TRAFFIC, message="ok"))
    assert change == {"traffic": traffic, "message": "ok"}
    json.dumps(change)


def test_client_calls_send_requests_and_wait_long_enough(fake: tuple[FakeAdmin, str]) -> None:
    servicer, target = fake
    with AdminClient(target, timeout_s=5.0, api_key="k1") as admin:
        listed = admin.list_models("fraud")
        assert listed["versions"][2]["load_error"] == "worker 1: bad digest"
        assert listed["traffic"] == [traffic_dict(TRAFFIC)]
        assert admin.load_model("fraud", "5")["message"] == "LoadModel fraud done"
        admin.unload_model("fraud", "2")
        admin.promote("fraud", "4", force=True)
        admin.rollback("fraud")
        change = admin.set_canary("fraud", "4", 5.0, steps=[25, 50], step_interval_s=60.0)
        admin.load_model("fraud", "5", timeout_s=3.0)
    assert change["traffic"]["steps"] == [25.0, 50.0, 100.0]
    requests = [(c.method, c.request) for c in servicer.calls]
    assert requests == [
        ("ListModels", admin_pb2.ListModelsRequest(name="fraud")),
        ("LoadModel", admin_pb2.ModelVersionRequest(name="fraud", version="5")),
        ("UnloadModel", admin_pb2.ModelVersionRequest(name="fraud", version="2")),
        ("Promote", admin_pb2.PromoteRequest(name="fraud", version="4", force=True)),
        ("Rollback", admin_pb2.ModelRequest(name="fraud")),
        (
            "SetCanary",
            admin_pb2.CanaryRequest(
                name="fraud", version="4", weight_percent=5.0, steps=[25, 50], step_interval_s=60
            ),
        ),
        ("LoadModel", admin_pb2.ModelVersionRequest(name="fraud", version="5")),
    ]
    remaining = [c.time_remaining_s for c in servicer.calls]
    # the deadline reaches the server rounded up (grpc-timeout units), hence the slack
    assert remaining[0] <= 6.0
    assert all(100.0 < r <= 121.5 for r in remaining[1:6])  # lifecycle default: 120 s
    assert remaining[6] <= 4.0
    assert all(c.metadata.get("authorization") == "Bearer k1" for c in servicer.calls)


# riskwire models list ------------------------------------------------------------------


def test_list_prints_table_and_traffic(
    fake: tuple[FakeAdmin, str], capsys: pytest.CaptureFixture[str]
) -> None:
    servicer, target = fake
    assert run(target, "list", "fraud") == 0
    assert servicer.calls[0].request == admin_pb2.ListModelsRequest(name="fraud")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "VERSION", "STATE", "TRAFFIC", "RISK", "OWNER", "ROC_AUC"]
    assert lines[1].split() == ["fraud", "3", "serving", "95%", "high", "risk-team", "0.9123"]
    assert lines[2].split() == ["fraud", "4", "serving", "5%", "high", "risk-team", "0.9200"]
    assert lines[3].split() == ["fraud", "5", "available", "-", "-", "-", "-"]
    assert lines[0].index("STATE") == lines[3].index("available")
    assert lines[4] == "fraud v5: load error: worker 1: bad digest"
    assert lines[5] == (
        "fraud: primary v3, canary v4 at 5%, next 25%, 50%, 100% every 10m, previous v2, "
        "also loaded v2"
    )
    assert len(lines) == 6


def test_list_json_and_every_model(
    fake: tuple[FakeAdmin, str], capsys: pytest.CaptureFixture[str]
) -> None:
    servicer, target = fake
    assert run(target, "list", "--json") == 0
    assert servicer.calls[0].request == admin_pb2.ListModelsRequest(name="")
    printed = json.loads(capsys.readouterr().out)
    assert printed["traffic"] == [traffic_dict(TRAFFIC)]
    assert [v["version"] for v in printed["versions"]] == ["3", "4", "5"]


# changes -------------------------------------------------------------------------------


def _version_request(version: str) -> Message:
    return admin_pb2.ModelVersionRequest(name="fraud", version=version)


@pytest.mark.parametrize(
    ("argv", "method", "request_message"),
    [
        (("load", "fraud", "5"), "LoadModel", _version_request("5")),
        (("unload", "fraud", "2"), "UnloadModel", _version_request("2")),
        (("promote", "fraud", "4"), "Promote", admin_pb2.PromoteRequest(name="fraud", version="4")),
        (
            ("promote", "fraud", "4", "--force"),
            "Promote",
            admin_pb2.PromoteRequest(name="fraud", version="4", force=True),
        ),
        (("rollback", "fraud"), "Rollback", admin_pb2.ModelRequest(name="fraud")),
        (
            ("canary", "fraud", "4", "--weight", "5", "--steps", "5, 25,50,100", "--interval",
             "10m"),
            "SetCanary",
            admin_pb2.CanaryRequest(
                name="fraud", version="4", weight_percent=5, steps=[5, 25, 50, 100],
                step_interval_s=600,
            ),
        ),
        (
            ("canary", "fraud", "4", "--weight", "12.5", "--force"),
            "SetCanary",
            admin_pb2.CanaryRequest(name="fraud", version="4", weight_percent=12.5, force=True),
        ),
        (("canary", "fraud", "--stop"), "SetCanary", admin_pb2.CanaryRequest(name="fraud")),
    ],
)  # fmt: skip
def test_change_sends_request_and_prints_traffic(
    fake: tuple[FakeAdmin, str],
    capsys: pytest.CaptureFixture[str],
    argv: tuple[str, ...],
    method: str,
    request_message: Message,
) -> None:
    servicer, target = fake
    assert run(target, *argv) == 0
    assert [(c.method, c.request) for c in servicer.calls] == [(method, request_message)]
    assert capsys.readouterr().out.splitlines() == [
        f"{method} fraud done",
        "fraud: primary v3, canary v4 at 5%, next 25%, 50%, 100% every 10m, previous v2, "
        "also loaded v2",
    ]


@pytest.mark.parametrize(
    ("text", "seconds"), [("90", 90.0), ("90s", 90.0), ("10m", 600.0), ("1.5h", 5400.0)]
)
def test_interval_suffixes(fake: tuple[FakeAdmin, str], text: str, seconds: float) -> None:
    servicer, target = fake
    argv = ("canary", "fraud", "4", "--weight", "5", "--steps", "50,100", "--interval", text)
    assert run(target, *argv) == 0
    assert servicer.calls[0].request.step_interval_s == seconds


@pytest.mark.parametrize(
    "bad",
    [
        ("--weight", "0"),
        ("--weight", "101"),
        ("--weight", "x"),
        ("--weight", "5", "--steps", "25,5"),
        ("--weight", "5", "--steps", "25,25"),
        ("--weight", "5", "--steps", "0,50"),
        ("--weight", "5", "--steps", "50,150"),
        ("--weight", "5", "--steps", "5,,50"),
        ("--weight", "5", "--steps", "50", "--interval", "10d"),
        ("--weight", "5", "--steps", "50", "--interval", "0"),
        ("--weight", "5", "--steps", "50", "--interval", "-1m"),
        ("--weight", "5", "--stop"),
        (),
    ],
)
def test_bad_canary_arguments_are_refused_by_the_parser(
    fake: tuple[FakeAdmin, str], capsys: pytest.CaptureFixture[str], bad: tuple[str, ...]
) -> None:
    servicer, target = fake
    with pytest.raises(SystemExit) as exit_info:
        run(target, "canary", "fraud", "4", *bad)
    assert exit_info.value.code == 2
    assert "usage:" in capsys.readouterr().err
    assert servicer.calls == []


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("canary", "fraud", "4", "--stop"), "--stop takes no VERSION"),
        (("canary", "fraud", "--stop", "--steps", "50"), "--stop takes no VERSION"),
        (("canary", "fraud", "--weight", "5"), "canary needs a VERSION"),
        (("canary", "fraud", "4", "--weight", "5", "--interval", "1m"), "--interval needs --steps"),
        (("shadow", "fraud", "--rate", "5"), "shadow needs a VERSION"),
        (("shadow", "fraud", "4", "--off"), "--off takes no VERSION"),
    ],
)
def test_inconsistent_arguments_exit_2_without_a_call(
    fake: tuple[FakeAdmin, str],
    capsys: pytest.CaptureFixture[str],
    argv: tuple[str, ...],
    message: str,
) -> None:
    servicer, target = fake
    assert run(target, *argv) == 2
    assert message in capsys.readouterr().err
    assert servicer.calls == []


# shadow --------------------------------------------------------------------------------


def test_shadow_on_and_off(fake: tuple[FakeAdmin, str], capsys: pytest.CaptureFixture[str]) -> None:
    servicer, target = fake
    assert run(target, "shadow", "fraud", "4", "--rate", "12.5") == 0
    assert servicer.calls[0].request == admin_pb2.ShadowConfig(
        enabled=True, primary="fraud", version="4", rate_percent=12.5
    )
    assert capsys.readouterr().out == (
        "shadow of fraud: fraud v4, 12.5% mirrored (configuration 1)\n"
    )
    assert run(target, "shadow", "fraud", "--off") == 0
    assert [c.method for c in servicer.calls] == ["SetShadow", "GetShadow", "SetShadow"]
    assert servicer.calls[2].request == admin_pb2.ShadowConfig(enabled=False, primary="fraud")
    assert capsys.readouterr().out == "shadow of fraud: off (configuration 3)\n"


def test_shadow_off_leaves_another_models_shadow_alone(
    fake: tuple[FakeAdmin, str], capsys: pytest.CaptureFixture[str]
) -> None:
    servicer, target = fake
    servicer.shadow = admin_pb2.ShadowConfig(enabled=True, primary="aml", version="2")
    assert run(target, "shadow", "fraud", "--off") == 2
    assert "mirrors aml, not fraud" in capsys.readouterr().err
    assert [c.method for c in servicer.calls] == ["GetShadow"]


# errors --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "method", "code"),
    [
        (("promote", "fraud", "4"), "Promote", StatusCode.PERMISSION_DENIED),
        (("list",), "ListModels", StatusCode.UNAUTHENTICATED),
        (("canary", "fraud", "4", "--weight", "5"), "SetCanary", StatusCode.FAILED_PRECONDITION),
        (("shadow", "fraud", "4", "--rate", "5"), "SetShadow", StatusCode.NOT_FOUND),
    ],
)  # fmt: skip
def test_rpc_errors_print_code_and_exit_2(
    fake: tuple[FakeAdmin, str],
    capsys: pytest.CaptureFixture[str],
    argv: tuple[str, ...],
    method: str,
    code: grpc.StatusCode,
) -> None:
    servicer, target = fake
    servicer.fail[method] = (code, "no can do")
    assert run(target, *argv) == 2
    captured = capsys.readouterr()
    assert captured.err == f"riskwire: error: {code.name}: no can do\n"
    assert captured.out == ""


def test_unreachable_admin_exits_2(
    fake: tuple[FakeAdmin, str], capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as probe:  # bound, not listening: connection refused
        probe.bind(("127.0.0.1", 0))
        assert run(f"127.0.0.1:{probe.getsockname()[1]}", "rollback", "fraud") == 2
    assert "riskwire: error: UNAVAILABLE:" in capsys.readouterr().err


def test_format_duration() -> None:
    assert [format_duration(s) for s in (45, 90, 600, 5400, 7200)] == [
        "45s", "1.5m", "10m", "1.5h", "2h",
    ]  # fmt: skip
