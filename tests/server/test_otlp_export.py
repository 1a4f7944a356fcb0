"""Server spans and merged metrics reach a real OTLP/gRPC receiver (the collector's
trace and metrics services)."""

from __future__ import annotations

import threading
import time
import uuid
from concurrent import futures

import grpc
import pytest
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc
from opentelemetry.proto.collector.metrics.v1 import (
    metrics_service_pb2,
    metrics_service_pb2_grpc,
)
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from riskwire.protos import scoring_pb2, scoring_pb2_grpc

pytestmark = pytest.mark.timeout(300)
TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT = "b7ad6b7169203331"


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """What an OpenTelemetry Collector's OTLP/gRPC trace receiver does, minus the rest."""

    def __init__(self) -> None:
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []
        self.lock = threading.Lock()

    def Export(self, request, context):  # noqa: N802, ANN001, ANN201 - the OTLP service
        with self.lock:
            self.requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()

    def spans(self) -> list[tuple[dict, object]]:
        """(resource attributes, span) of everything received."""
        found = []
        with self.lock:
            for request in self.requests:
                for resource_spans in request.resource_spans:
                    resource = {
                        a.key: a.value.string_value for a in resource_spans.resource.attributes
                    }
                    for scope in resource_spans.scope_spans:
                        found += [(resource, span) for span in scope.spans]
        return found


class MetricsReceiver(metrics_service_pb2_grpc.MetricsServiceServicer):
    """The collector's OTLP/gRPC metrics receiver: keeps every export request."""

    def __init__(self) -> None:
        self.requests: list[metrics_service_pb2.ExportMetricsServiceRequest] = []
        self.lock = threading.Lock()

    def Export(self, request, context):  # noqa: N802, ANN001, ANN201 - the OTLP service
        with self.lock:
            self.requests.append(request)
        return metrics_service_pb2.ExportMetricsServiceResponse()

    def requests_counted(self, method: str) -> int:
        """riskwire.requests for ``method`` with status OK in the latest export."""
        with self.lock:
            latest = self.requests[-1] if self.requests else None
        total = 0
        for resource_metrics in latest.resource_metrics if latest else ():
            for scope in resource_metrics.scope_metrics:
                for metric in scope.metrics:
                    if metric.name != "riskwire.requests":
                        continue
                    for point in metric.sum.data_points:
                        values = attributes(point)
                        if values["rpc.method"] == method and values["rpc.grpc.status_code"] == 0:
                            total += point.as_int or int(point.as_double)
        return total


class LogsReceiver(logs_service_pb2_grpc.LogsServiceServicer):
    """The collector's OTLP/gRPC logs receiver: keeps every log record."""

    def __init__(self) -> None:
        self.records: list = []
        self.lock = threading.Lock()

    def Export(self, request, context):  # noqa: N802, ANN001, ANN201 - the OTLP service
        with self.lock:
            for resource_logs in request.resource_logs:
                for scope in resource_logs.scope_logs:
                    self.records.extend(scope.log_records)
        return logs_service_pb2.ExportLogsServiceResponse()


def attributes(span) -> dict:  # noqa: ANN001
    out = {}
    for a in span.attributes:
        value = a.value
        out[a.key] = value.string_value or value.int_value
    return out


def test_spans_and_metrics_arrive_at_an_otlp_receiver(start_server, models_dir) -> None:
    receiver, metrics, logs = Receiver(), MetricsReceiver(), LogsReceiver()
    collector = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, collector)
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(metrics, collector)
    logs_service_pb2_grpc.add_LogsServiceServicer_to_server(logs, collector)
    port = collector.add_insecure_port("127.0.0.1:0")
    collector.start()
    try:
        server = start_server(
            models_dir,
            env={
                "RISKWIRE_TRACING_EXPORTER": "otlp-grpc",
                "RISKWIRE_TRACING_ENDPOINT": f"http://127.0.0.1:{port}",
                "RISKWIRE_TRACING_SAMPLE_RATIO": "1.0",
                "OTEL_BSP_SCHEDULE_DELAY": "200",  # export every 0.2 s, not 5 s
                "RISKWIRE_METRICS_EXPORTER": "otlp-grpc",
                "RISKWIRE_METRICS_ENDPOINT": f"http://127.0.0.1:{port}",
                "RISKWIRE_METRICS_EXPORT_S": "0.3",
                "RISKWIRE_REQUEST_LOG_EXPORTER": "otlp-grpc",
                "RISKWIRE_REQUEST_LOG_ENDPOINT": f"http://127.0.0.1:{port}",
                "OTEL_BLRP_SCHEDULE_DELAY": "200",
            },
        )
        card = f"card-{uuid.uuid4().hex}"
        channels = server.connect_each_worker()
        sent = 0
        try:
            for i, channel in enumerate(channels.values()):
                stub = scoring_pb2_grpc.ScoringStub(channel)
                for j in range(10):
                    request = scoring_pb2.ScoreRequest(
                        transaction=scoring_pb2.Transaction(
                            card_id=card, merchant_id="m-1", mcc=5411, amount=10.0 + j,
                            currency="EUR", country="DE", card_country="DE", channel="pos",
                        ),
                        request_id=f"otlp-{i}-{j}",
                    )  # fmt: skip
                    parent = (("traceparent", f"00-{TRACE_ID}-{PARENT}-01"),) if j == 0 else ()
                    stub.Score(request, timeout=10, metadata=parent)
                    sent += 1
        finally:
            for channel in channels.values():
                channel.close()

        def score_spans() -> list:
            return [(r, s) for r, s in receiver.spans() if s.name.endswith("/Score")]

        deadline = time.monotonic() + 30
        while len(score_spans()) < sent + len(channels) and time.monotonic() < deadline:
            time.sleep(0.2)  # (+ one probe call per worker from connect_each_worker)
        spans = score_spans()
        assert len(spans) >= sent
        instances = {resource["service.instance.id"] for resource, _ in spans}
        assert len(instances) == 2  # both workers export, each with its own instance id
        for resource, span in spans:
            assert resource["service.name"] == "riskwire"
            values = attributes(span)
            assert values["rpc.system"] == "grpc" and values["rpc.method"] == "Score"
            assert values["rpc.service"] == "riskwire.v1.Scoring"
            assert values["rpc.grpc.status_code"] == 0
            assert span.kind == span.SPAN_KIND_SERVER
            assert span.end_time_unix_nano > span.start_time_unix_nano
            stages = [event.name for event in span.events]
            assert stages == [
                "decode", "validate", "features", "predict", "record", "shadow_enqueue",
                "respond",
            ]  # fmt: skip
            for event in span.events:
                assert span.start_time_unix_nano <= event.time_unix_nano
                assert event.time_unix_nano <= span.end_time_unix_nano
        joined = [s for _, s in spans if s.trace_id.hex() == TRACE_ID]
        assert len(joined) == len(channels)  # the two calls that carried a traceparent
        assert all(s.parent_span_id.hex() == PARENT for s in joined)
        # The merged metrics count every call of both workers: one span each (ratio 1.0),
        # the probes of connect_each_worker included.
        deadline = time.monotonic() + 30
        while (
            metrics.requests_counted("Score") != len(score_spans()) and time.monotonic() < deadline
        ):
            time.sleep(0.2)
        assert metrics.requests_counted("Score") == len(score_spans()) >= sent
        # One OpenTelemetry log record per call, carrying its span's trace and span id.
        span_ids = {(s.trace_id, s.span_id) for _, s in spans}
        deadline = time.monotonic() + 30
        while len(logs.records) < len(spans) and time.monotonic() < deadline:
            time.sleep(0.2)
        with logs.lock:
            records = list(logs.records)
        score_logs = [r for r in records if attributes(r)["rpc.method"] == "Score"]
        assert len(score_logs) >= sent
        body = {kv.key: kv.value for kv in score_logs[0].body.kvlist_value.values}
        assert body["method"].string_value == "Score" and body["status"].string_value == "OK"
        assert {(r.trace_id, r.span_id) for r in score_logs} >= span_ids
        exported = b"".join(r.SerializeToString() for r in receiver.requests + metrics.requests)
        exported += b"".join(r.SerializeToString() for r in records)
        assert card.encode() not in exported  # no card id anywhere in the exported data
    finally:
        collector.stop(0)
