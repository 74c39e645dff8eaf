"""`infergate worker`: serve one model instance."""
from __future__ import annotations

import json
import os

from ..serviceconfig import (ConfigError, gpus_per_instance, processor_kind, provider_options,
                             rpc_settings, worker_processes)
from .errors import NO_RUNTIME, CliError, has_model_runtime


def register(sub) -> None:
    p = sub.add_parser("worker", help="serve one model instance",
                       description="Serve one model instance over HTTP (the EAS protocol and the Open "
                                   "Inference Protocol) and, with --grpc-port, gRPC.")
    p.add_argument("--service", required=True, help="service name (the path /api/predict/NAME)")
    p.add_argument("--model", help="ONNX model file (or the .py entry for --processor python)")
    p.add_argument("--processor", default="tensorflow",
                   help="tensorflow | pytorch | caffe | json | python (EAS names such as "
                        "tensorflow_cpu_1.15 work too)")
    p.add_argument("--processor-entry", help="python processor: FILE.py[:Class]")
    p.add_argument("--model-config", help="the service's model_config, for a python processor "
                                          "(get_model_config(), as in EAS)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    p.add_argument("--grpc-port", type=int,
                   help="also serve the Open Inference Protocol over gRPC on this port "
                        "(0 picks a free one; default: no gRPC)")
    p.add_argument("--token", default=os.environ.get("INFERGATE_SERVICE_TOKEN", ""),
                   help="require this service token (raw or EAS signature)")
    p.add_argument("--metadata", help="service metadata as JSON (rpc.* keys); flags below win")
    p.add_argument("--registry", default=os.environ.get("INFERGATE_REGISTRY") or None,
                   help="register here: redis://HOST:PORT/DB or a gateway URL (env "
                        "INFERGATE_REGISTRY: keeps a Redis password off the command line)")
    p.add_argument("--advertise-host", help="address to register (default: --host)")
    p.add_argument("--weight", type=int, default=100)
    p.add_argument("--batching", action="store_true", default=None)
    p.add_argument("--max-batch-size", type=int)
    p.add_argument("--max-batch-timeout-ms", type=int)
    p.add_argument("--batch-sizes", help="rpc.batch_sizes: pad batches to these sizes, e.g. "
                                          "1,2,4,8,16,32 (default: powers of two on a GPU, "
                                          "none on the CPU)")
    p.add_argument("--max-queue-size", type=int)
    p.add_argument("--keepalive-ms", type=int)
    p.add_argument("--threads", type=int, help="rpc.worker_threads: concurrent inference calls")
    p.add_argument("--intra-op-threads", type=int, default=1,
                   help="ONNX Runtime threads inside one call (default 1)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"),
                   help="where the model runs (default: cpu when metadata.gpu is 0, else auto: "
                        "CUDA when onnxruntime-gpu sees a device)")
    p.add_argument("--processes", type=int,
                   help="serve one port from N processes (SO_REUSEPORT), each with its own model "
                        "session and batcher: the HTTP front end then scales over cores "
                        "(default: metadata.processes, else 1)")
    p.add_argument("--max-body-mb", type=int, default=64)
    p.add_argument("--log-level", default="INFO")
    p.set_defaults(run=run)


def run(args) -> int:
    from ..server.runner import configure_logging, run as run_app

    try:
        metadata = json.loads(args.metadata) if args.metadata else {}
        settings = rpc_settings(metadata, batching=args.batching,
                                max_batch_size=args.max_batch_size,
                                max_batch_timeout=args.max_batch_timeout_ms,
                                max_queue_size=args.max_queue_size, keepalive=args.keepalive_ms,
                                worker_threads=args.threads, batch_sizes=args.batch_sizes)
        processor = processor_kind(args.processor)
        options = provider_options(metadata)
        processes = worker_processes(metadata, args.processes)
        device = args.device or ("cpu" if gpus_per_instance(metadata) == 0 else "auto")
    except (ConfigError, json.JSONDecodeError) as exc:
        raise CliError(str(exc)) from None
    if not has_model_runtime():
        raise CliError(NO_RUNTIME)
    if processor != "python" and not args.model:
        raise CliError("--model is required")
    if args.model and not os.path.exists(args.model):
        raise CliError(f"model file {args.model!r} does not exist")
    configure_logging(args.log_level)

    async def make_app():
        from ..worker.app import WorkerApp
        from ..worker.registration import Registration

        app = WorkerApp(args.service, settings, args.model, processor, args.token,
                        args.processor_entry, args.max_body_mb << 20, args.intra_op_threads,
                        device, options, metadata.get("signature_name"), args.model_config)
        port = await app.listen(args.host, port_for_all, reuse_port=processes > 1,
                                grpc_port=grpc_port_for_all)
        if args.registry:
            return Registration(app, args.registry, args.advertise_host or args.host, port,
                                args.weight, follow_token=not args.token)
        return app

    port_for_all, grpc_port_for_all = args.port, args.grpc_port
    if processes > 1:
        from ..control.launcher import free_port

        # Every process must listen on the same ports (gRPC shares its port by default).
        if not port_for_all:
            port_for_all = free_port(args.host)
        if grpc_port_for_all == 0:
            grpc_port_for_all = free_port(args.host)
    run_app(make_app, processes)
    return 0
