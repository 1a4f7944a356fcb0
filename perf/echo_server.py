"""A bare grpcio server answering riskwire's method paths with canned bytes: the ceiling.

It is the baseline of ``perf/bench_serving.py``: the same worker count, spawn-started
worker processes sharing one port with SO_REUSEPORT, the same thread-pool size, the
same channel options, grpc experiments, per-core pinning and frozen startup heap as
``riskwire serve``, and the same polling-thread dispatch of small unary calls and lighter
per-call scopes (``server/grpc/call_scopes.py``) — but every
handler returns pre-serialised bytes without parsing the request. What riskwire loses
against it is the cost of our own Python work (decode, validate, features, predict,
encode).

Paths answered (raw bytes in, canned bytes out, no (de)serialisation per call):

* ``/riskwire.v1.Scoring/Score``: a small valid ScoreResponse;
* ``/riskwire.v1.Scoring/ScoreBatch``: a ScoreBatchResponse of ``--batch-rows`` results
  (whatever the request holds: the echo never parses it);
* ``/inference.GRPCInferenceService/*``: a minimal Open Inference Protocol echo —
  ServerLive/Ready, ModelReady, ServerMetadata, ModelMetadata and ModelConfig shaped
  like riskwire's (so perf_analyzer drives both the same way), ModelInfer returning the
  single-row outputs riskwire returns;
* ``/grpc.health.v1.Health/Check``: SERVING.

Any other path is answered UNIMPLEMENTED and logged to stderr once per path, so a
load tool calling an RPC riskwire does not implement shows up.

    python perf/echo_server.py --port 50071 --workers 2 [--threads 8] [--no-pin]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import signal
import struct
import sys
import threading
from collections.abc import Callable
from concurrent import futures
from multiprocessing.synchronize import Event as EventType

from riskwire.server.config import Settings

SCORE = "/riskwire.v1.Scoring/Score"
SCORE_BATCH = "/riskwire.v1.Scoring/ScoreBatch"
OIP = "/inference.GRPCInferenceService/"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
READY_LINE = "echo: serving on {host}:{port} with {workers} workers"
_DEFAULTS = Settings()


def canned_responses(model: str = "fraud", batch_rows: int = 256) -> dict[str, bytes]:
    """Method path → the serialised response the echo returns for it."""
    from riskwire.protos import inference_pb2 as pb
    from riskwire.protos import scoring_pb2 as sc
    from riskwire.server.grpc.tensors import INPUTS, OUTPUTS

    def result(i: int) -> sc.ScoreResponse:
        return sc.ScoreResponse(
            request_id=f"echo-{i}",
            transaction_id=f"tx-{i}",
            probability=0.0123,
            decision=sc.DECISION_APPROVE,
            model_name=model,
            model_version="1",
        )

    score = result(0)
    score.reasons.add(feature="amount", contribution=0.1, value=12.5)
    batch = sc.ScoreBatchResponse(request_id="echo", model_name=model, model_version="1")
    batch.results.extend(result(i) for i in range(batch_rows))
    types = {"BYTES": 13, "FP64": 12, "FP32": 11, "INT64": 9, "INT32": 8}
    meta = pb.ModelMetadataResponse.TensorMetadata
    metadata = pb.ModelMetadataResponse(
        name=model,
        versions=["1"],
        platform="riskwire_lightgbm",
        inputs=[meta(name=s.name, datatype=s.datatype, shape=[-1, 1]) for s in INPUTS],
        outputs=[meta(name=n, datatype=d, shape=[-1, 1]) for n, d in OUTPUTS],
    )
    config = pb.ModelConfig(
        name=model,
        platform="riskwire_lightgbm",
        backend="riskwire",
        max_batch_size=_DEFAULTS.max_batch_rows,
        input=[
            pb.ModelInput(name=s.name, data_type=types[s.datatype], dims=[1], optional=s.optional)
            for s in INPUTS
        ],
        output=[pb.ModelOutput(name=n, data_type=types[d], dims=[1]) for n, d in OUTPUTS],
    )
    infer = pb.ModelInferResponse(model_name=model, model_version="1")
    out = pb.ModelInferResponse.InferOutputTensor
    infer.outputs.extend(
        [
            out(name="probability", datatype="FP64", shape=[1, 1]),
            out(name="decision", datatype="BYTES", shape=[1, 1]),
        ]
    )
    infer.raw_output_contents.extend([struct.pack("<d", 0.0123), struct.pack("<I", 7) + b"approve"])
    true = pb.ServerLiveResponse(live=True).SerializeToString()  # b"\x08\x01"
    return {
        SCORE: score.SerializeToString(),
        SCORE_BATCH: batch.SerializeToString(),
        OIP + "ServerLive": true,
        OIP + "ServerReady": true,
        OIP + "ModelReady": true,
        OIP + "ServerMetadata": pb.ServerMetadataResponse(
            name="echo", version="0", extensions=["model_configuration"]
        ).SerializeToString(),
        OIP + "ModelMetadata": metadata.SerializeToString(),
        OIP + "ModelConfig": pb.ModelConfigResponse(config=config).SerializeToString(),
        OIP + "ModelInfer": infer.SerializeToString(),
        HEALTH_CHECK: true,  # HealthCheckResponse(status=SERVING) has the same bytes
    }


def _handler(canned: dict[str, bytes]):  # noqa: ANN202 - a grpc.GenericRpcHandler
    import grpc

    from riskwire.server.grpc.dispatch import inline

    unknown: set[str] = set()

    def answer(response: bytes) -> Callable[[bytes, grpc.ServicerContext], bytes]:
        @inline
        def method(request: bytes, context: grpc.ServicerContext) -> bytes:
            return response

        return method

    def unimplemented(request: bytes, context: grpc.ServicerContext) -> bytes:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "the echo server does not answer this")
        return b""

    handlers = {path: grpc.unary_unary_rpc_method_handler(answer(b)) for path, b in canned.items()}
    fallback = grpc.unary_unary_rpc_method_handler(unimplemented)

    class EchoHandler(grpc.GenericRpcHandler):
        def service(self, handler_call_details: grpc.HandlerCallDetails):  # noqa: ANN201
            path = handler_call_details.method
            found = handlers.get(path)
            if found is None:
                if path not in unknown:
                    unknown.add(path)
                    print(f"echo[{os.getpid()}]: UNIMPLEMENTED {path}", file=sys.stderr, flush=True)
                return fallback
            return found

    return EchoHandler()


def run_worker(
    worker_id: int,
    host: str,
    port: int,
    threads: int,
    cpu: int | None,
    batch_rows: int,
    ready: EventType,
    workers: int,
) -> None:
    """Spawn target: pin, build the canned responses, serve until SIGTERM."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    import grpc

    from riskwire.server.worker import (
        balance_connections,
        freeze_startup_heap,
        grpc_options,
        polling_thread_dispatch,
    )

    polling_thread_dispatch(_DEFAULTS)  # as riskwire's workers do
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix=f"echo{worker_id}"),
        options=grpc_options(_DEFAULTS),
        maximum_concurrent_rpcs=_DEFAULTS.max_concurrent_rpcs or None,
    )
    server.add_generic_rpc_handlers((_handler(canned_responses(batch_rows=batch_rows)),))
    if server.add_insecure_port(f"{host}:{port}") == 0:
        print(f"echo worker {worker_id}: cannot listen on {host}:{port}", file=sys.stderr)
        raise SystemExit(3)
    server.start()
    if _DEFAULTS.balance_connections:
        balance_connections(port, workers)  # as riskwire's workers do
    freeze_startup_heap()  # as riskwire's workers do
    signal.signal(signal.SIGTERM, lambda signum, frame: server.stop(1.0))
    ready.set()
    server.wait_for_termination()
    os._exit(0)


def cpu_plan(workers: int, pin: bool) -> list[int | None]:
    """Core per worker, as riskwire's supervisor does: pinned when cores >= workers."""
    cores = sorted(os.sched_getaffinity(0))
    if not pin or workers > len(cores):
        return [None] * workers
    return list(cores[:workers])


def serve(host: str, port: int, workers: int, threads: int, pin: bool, batch_rows: int) -> int:
    """Start the workers, print the ready line, stop them all on SIGTERM/SIGINT."""
    from riskwire.server.worker import grpc_environment

    grpc_environment(_DEFAULTS)  # the same grpc experiments as riskwire's workers
    context = multiprocessing.get_context("spawn")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    signal.signal(signal.SIGINT, lambda signum, frame: stop.set())
    events = [context.Event() for _ in range(workers)]
    processes = [
        context.Process(
            target=run_worker,
            args=(i, host, port, threads, cpu, batch_rows, events[i], workers),
            name=f"echo-worker-{i}",
        )
        for i, cpu in enumerate(cpu_plan(workers, pin))
    ]
    for process in processes:
        process.start()
    try:
        for event, process in zip(events, processes, strict=True):
            while not event.wait(0.1):
                if not process.is_alive() or stop.is_set():
                    print("echo: a worker failed to start", file=sys.stderr)
                    return 1
        print(READY_LINE.format(host=host, port=port, workers=workers), flush=True)
        while not stop.wait(0.2):
            if not all(p.is_alive() for p in processes):
                print("echo: a worker died", file=sys.stderr)
                return 1
        return 0
    finally:
        for process in processes:
            if process.is_alive():
                process.terminate()
        for process in processes:
            process.join(5.0)
            if process.is_alive():
                process.kill()
                process.join()


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument(
        "--threads",
        type=int,
        default=_DEFAULTS.threads_per_worker,
        help=f"gRPC handler threads per worker (riskwire default {_DEFAULTS.threads_per_worker})",
    )
    parser.add_argument("--no-pin", dest="pin", action="store_false", help="do not pin workers")
    parser.add_argument("--batch-rows", type=int, default=256, help="results in ScoreBatch")
    args = parser.parse_args(argv)
    return serve(args.host, args.port, args.workers, args.threads, args.pin, args.batch_rows)


if __name__ == "__main__":
    sys.exit(main())
