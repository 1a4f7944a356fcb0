"""Server spans reach a real OTLP/gRPC receiver (the collector's trace service)."""

from __future__ import annotations

import threading
import time
import uuid
from concurrent import futures

import grpc
import pytest
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


def attributes(span) -> dict:  # noqa: ANN001
    out = {}
    for a in span.attributes:
        value = a.value
        out[a.key] = value.string_value or value.int_value
    return out


def test_server_spans_arrive_at_an_otlp_receiver(start_server, models_dir) -> None:
    receiver = Receiver()
    collector = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, collector)
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
        joined = [s for _, s in spans if s.trace_id.hex() == TRACE_ID]
        assert len(joined) == len(channels)  # the two calls that carried a traceparent
        assert all(s.parent_span_id.hex() == PARENT for s in joined)
        exported = b"".join(r.SerializeToString() for r in receiver.requests)
        assert card.encode() not in exported  # no card id anywhere in the exported data
    finally:
        collector.stop(0)
