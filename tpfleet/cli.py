"""The `tpfleet` command."""

from __future__ import annotations

import argparse
import sys

from tpfleet import env, exits
from tpfleet.config import (
    PLACEMENT_FIELDS,
    EngineConfig,
    add_engine_arguments,
    engine_config_from_args,
    engine_fields_from_args,
    non_default_fields,
)
from tpfleet.jit import default_triton_cache

Formatter = argparse.ArgumentDefaultsHelpFormatter
GROUP_HELP = {"bench": "benchmarks (GPU)"}


def _grids(text: str) -> list[tuple[int, int]]:
    """'64x256,128x256' -> [(64, 256), (128, 256)]; the custom kernel checks the ranges itself."""
    try:
        return [(int(blocks), int(threads)) for blocks, threads in (g.split("x") for g in text.split(",") if g)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected BLOCKSxTHREADS,... e.g. 64x256,128x256") from None


def _int_list(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def engine_arg_parser() -> argparse.ArgumentParser:
    """What `launch --engine-arg` takes: the engine flags a fleet leaves to its user."""
    from tpfleet.fleet.fleet import FLEET_FIELDS

    parser = argparse.ArgumentParser(prog="tpfleet launch --engine-arg", add_help=False, exit_on_error=False)
    add_engine_arguments(parser, exclude=FLEET_FIELDS + PLACEMENT_FIELDS)
    return parser


def parse_engine_args(argv: list[str]) -> dict:
    """`--engine-arg` values, parsed by the engine flags' parser, as EngineConfig overrides."""
    try:
        args, unknown = engine_arg_parser().parse_known_args(argv)
    except argparse.ArgumentError as error:
        raise ValueError(f"--engine-arg: {error}") from None
    if unknown:
        raise ValueError(f"--engine-arg: not an engine flag a fleet leaves to its user: {' '.join(unknown)}")
    return non_default_fields(engine_fields_from_args(args))


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The parser, and its sub-parsers by command name ("serve", "bench decode", ...)."""
    parser = argparse.ArgumentParser(prog="tpfleet", description=__doc__, formatter_class=Formatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    groups = {"": sub}
    commands: dict[str, argparse.ArgumentParser] = {}

    def command(name: str, text: str) -> argparse.ArgumentParser:
        group, _, leaf = name.rpartition(" ")
        if group not in groups:
            groups[group] = sub.add_parser(group, help=GROUP_HELP[group], formatter_class=Formatter).add_subparsers(
                dest="what", required=True)
        commands[name] = groups[group].add_parser(leaf, help=text, formatter_class=Formatter)
        return commands[name]

    make_model_cmd = command("make-model", "write a random Qwen3 or Qwen3-MoE checkpoint (no network)")
    presets = ["tiny", "small", "8b-shape", "tiny-moe", "30b-a3b-shape"]
    make_model_cmd.add_argument("--preset", default="tiny", choices=presets,
                                help="model shape (the -moe and -a3b presets are Qwen3-MoE)")
    make_model_cmd.add_argument("--out", required=True, help="checkpoint directory to write")
    make_model_cmd.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    make_model_cmd.add_argument("--device", default="cpu", help="where to draw the random weights (cuda is faster)")

    serve_cmd = command("serve", "serve one TP engine over HTTP")
    serve_cmd.add_argument("--config", default=None,
                           help="the engine's whole EngineConfig as a JSON document, inline or in a file; engine "
                                "flags given as well override its fields")
    add_engine_arguments(serve_cmd, model_required=False)
    serve_cmd.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve_cmd.add_argument("--port", type=int, default=0, help="0: the kernel picks a free port (printed when ready)")
    serve_cmd.add_argument("--served-model-name", default=None, help="model name in OpenAI API answers (None: --model)")

    launch_cmd = command("launch", "start a fleet of engines and serve a router in front of them")
    launch_cmd.add_argument("--engines", type=int, default=1, help="how many engines")
    launch_cmd.add_argument("--gpus", default="", help="indices (of this process's visible GPUs) or UUIDs")
    launch_cmd.add_argument("--backend", choices=["local", "ray"], default="local",
                            help="engines as local processes, or in Ray actors")
    launch_cmd.add_argument("--max-concurrent-starts", type=int, default=1, help="engines starting at once")
    launch_cmd.add_argument("--startup-timeout", type=float, default=600.0,
                            help="seconds for an engine to become ready")
    launch_cmd.add_argument("--restart-budget", type=int, default=3, help="restarts per engine after it dies")
    launch_cmd.add_argument("--reap-stale", action="store_true", help="kill processes already holding the GPUs")
    launch_cmd.add_argument("--log-dir", default=None,
                            help="engine logs, config documents and exit records (None: a fresh temp dir)")
    launch_cmd.add_argument("--host", default="127.0.0.1", help="router address")
    launch_cmd.add_argument("--engine-host", default="127.0.0.1",
                            help="where engines listen; 'node' for each Ray node's IP when engines span machines")
    launch_cmd.add_argument("--port", type=int, default=0, help="router port (0: the kernel picks)")
    launch_cmd.add_argument("--engine-arg", action="append", default=[],
                            help="an engine flag, as `tpfleet serve` takes it (repeat; e.g. "
                                 "--engine-arg=--kv-cache-tokens --engine-arg=4096)")
    add_engine_arguments(launch_cmd, exclude=PLACEMENT_FIELDS)

    demo_cmd = command("demo", "build the tiny model, serve it with TP=2 on CPU, send requests, stop")
    demo_cmd.add_argument("--tp-size", "--tp", dest="tp_size", type=int, default=2, help="tensor-parallel size")
    demo_cmd.add_argument("--workdir", default=None, help="where to build the model (None: a fresh temp dir)")

    decode_cmd = command("bench decode", "smoke benchmark: decode step time and tokens/s at given batch sizes")
    add_engine_arguments(decode_cmd)
    decode_cmd.add_argument("--batch-sizes", default="1,64", help="comma-separated batch sizes")
    decode_cmd.add_argument("--input-len", type=int, default=128, help="prompt tokens per sequence")
    engine_cmd = command("bench engine", "decode latency, offline throughput, vs transformers and the floor")
    add_engine_arguments(engine_cmd)
    engine_cmd.add_argument("--num-seqs", type=int, default=256, help="sequences of the offline workload")
    engine_cmd.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    engine_cmd.add_argument("--out", default="bench-out", help="directory for the JSON and PNG")
    allreduce_cmd = command("bench allreduce", "all-reduce latency of every backend and the dispatcher")
    allreduce_cmd.add_argument("--nproc", type=int, default=2, help="GPUs (one process each)")
    allreduce_cmd.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                               help="element type")
    allreduce_cmd.add_argument("--out", default="bench-out", help="directory for the JSON and PNG")
    allreduce_cmd.add_argument("--grids", type=_grids, default=[],
                               help="other custom-kernel launch grids to time in graph mode, as BLOCKSxTHREADS,... "
                                    "(e.g. 64x256,128x256)")
    gemv_cmd = command("bench gemv", "batch-1 GEMV kernels vs cuBLAS and the bandwidth floor, per projection")
    gemv_cmd.add_argument("--tp-sizes", "--tp", dest="tp_sizes", type=_int_list, default="1,2",
                          help="Qwen3-8B's shards at these tensor-parallel sizes (comma-separated)")
    gemv_cmd.add_argument("--sweep", action="store_true", help="also time a grid of launch configs per projection")
    gemv_cmd.add_argument("--out", default="bench-out", help="directory for the JSON and PNG")
    attention_cmd = command("bench attention", "decode attention per KV-split policy vs the bandwidth floor")
    attention_cmd.add_argument("--out", default="bench-out", help="directory for the JSON and PNG")

    warmup_cmd = command("warmup", "build the JIT caches engine configs need; a no-op when still valid")
    add_engine_arguments(warmup_cmd, exclude=PLACEMENT_FIELDS, several=("tp_size", "graph_mode"),
                         defaults={"device": "cuda"})
    warmup_cmd.add_argument("--timeout", type=float, default=900.0, help="seconds per config")

    doctor_cmd = command("doctor", "check the launch environment; non-zero exit if a launch would break")
    doctor_cmd.add_argument("--gpus", default="", help="limit to these GPUs (indices or UUID prefixes)")
    doctor_cmd.add_argument("--compare-ray", action="store_true",
                            help="diff a plain process's environment with a Ray actor's")
    doctor_cmd.add_argument("--json", action="store_true", help="machine-readable output")
    return parser, commands


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse; for `serve --config`, the document's fields are the defaults that engine flags override."""
    parser, commands = build_parser()
    args = parser.parse_args(argv)
    if args.cmd == "serve" and args.config is not None:
        try:
            document = EngineConfig.from_file_or_json(args.config)
        except (OSError, ValueError) as error:
            exits.record_engine_failure(error, 1)  # the launcher that wrote the document learns why
            commands["serve"].error(f"--config: {error}")
        commands["serve"].set_defaults(**document.to_dict())
        args = parser.parse_args(argv)
    if args.cmd == "serve" and args.model is None:
        commands["serve"].error("the engine needs a model: give --model or --config")
    return args


def _engine_config(args: argparse.Namespace, command: str) -> EngineConfig:
    try:
        return engine_config_from_args(args)
    except ValueError as error:
        build_parser()[1][command].error(str(error))


def main(argv: list[str] | None = None) -> int:
    env.apply_multicast_off()
    args = parse_args(argv)
    default_triton_cache()
    if args.cmd == "make-model":
        from tpfleet.model.make_model import make_model

        out = make_model(args.preset, args.out, args.seed, args.device)
        print(f"wrote {args.preset} Qwen3 checkpoint to {out}")
    elif args.cmd == "serve":
        from tpfleet.server.launch import serve

        try:
            cfg = engine_config_from_args(args)
        except ValueError as error:
            exits.record_engine_failure(error, 1)  # no rank has started: no rank records to attach
            raise
        try:
            serve(cfg, args.host, args.port, args.served_model_name)
        except KeyboardInterrupt:
            pass
    elif args.cmd == "launch":
        from tpfleet.fleet.fleet import FLEET_FIELDS, FleetConfig
        from tpfleet.fleet.launch import launch

        fields = engine_fields_from_args(args)
        try:
            engine = {**non_default_fields({k: v for k, v in fields.items() if k not in FLEET_FIELDS}),
                      **parse_engine_args(args.engine_arg)}
            cfg = FleetConfig(
                model=args.model, engines=args.engines, tp_size=args.tp_size, device=args.device, engine=engine,
                backend=args.backend, gpus=[g for g in args.gpus.split(",") if g.strip()] or None,
                max_concurrent_starts=args.max_concurrent_starts, startup_timeout_s=args.startup_timeout,
                log_dir=args.log_dir, reap_stale=args.reap_stale, restart_budget=args.restart_budget,
                host=args.engine_host)
        except ValueError as error:
            build_parser()[1]["launch"].error(str(error))
        return launch(cfg, args.host, args.port)
    elif args.cmd == "warmup":
        from tpfleet.warmup.cli import warmup_command, warmup_configs

        fields = engine_fields_from_args(args)
        tp_sizes, graph_modes = fields.pop("tp_size"), fields.pop("graph_mode")
        try:
            configs = warmup_configs(fields, tp_sizes, graph_modes)
        except ValueError as error:
            build_parser()[1]["warmup"].error(str(error))
        return warmup_command(configs, args.timeout)
    elif args.cmd == "doctor":
        from tpfleet.doctor.cli import doctor_command

        return doctor_command([g for g in args.gpus.split(",") if g] or None, args.compare_ray, args.json)
    elif args.cmd == "demo":
        from tpfleet.demo import run_demo

        return run_demo(args.tp_size, args.workdir)
    elif args.cmd == "bench" and args.what == "decode":
        from tpfleet.bench.engine import bench_decode

        bench_decode(_engine_config(args, "bench decode"), _int_list(args.batch_sizes), args.input_len)
    elif args.cmd == "bench" and args.what == "engine":
        from tpfleet.bench.engine import bench_engine

        bench_engine(_engine_config(args, "bench engine"), args.out, args.num_seqs, with_hf=not args.no_hf)
    elif args.cmd == "bench" and args.what == "allreduce":
        import torch

        from tpfleet.bench.allreduce import bench_allreduce

        bench_allreduce(args.nproc, args.out, getattr(torch, args.dtype), grids=args.grids)
    elif args.cmd == "bench" and args.what == "gemv":
        from tpfleet.bench.gemv import bench_gemv

        bench_gemv(args.out, args.tp_sizes, args.sweep)
    elif args.cmd == "bench" and args.what == "attention":
        from tpfleet.bench.attention import bench_attention

        bench_attention(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
