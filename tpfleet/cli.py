"""The `tpfleet` command."""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
import tempfile
import threading

import tpfleet
from tpfleet import env, exits
from tpfleet.config import (
    PLACEMENT_FIELDS,
    EngineConfig,
    add_engine_arguments,
    check_checkpoint_dir,
    engine_config_from_args,
    engine_fields_from_args,
    non_default_fields,
)
from tpfleet.devices import DEVICE_CHOICES, DeviceError, require_cuda, resolve_device
from tpfleet.jit import default_triton_cache
from tpfleet.lifecycle import interrupts_deferred, sigterm_as_interrupt
from tpfleet.model.config import ModelConfig
from tpfleet.server.launch import CannotListen

INTERRUPTED = 128 + signal.SIGINT  # the shell's code for a command ended by Ctrl-C
GPU_ONLY = ("bench allreduce", "bench gemv", "bench attention", "bench moe")  # commands with no CPU path


class Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default, except where there is none to show: a required option,
    or an empty-string default whose meaning the help text gives."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.required or action.default == "":
            return action.help
        return super()._get_help_string(action)


GROUP_HELP = {"bench": "benchmarks (decode, engine, start and colocate also run on CPU)"}


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


SERVER_SETTINGS = ("api_key", "admin_api_key", "max_body_bytes", "max_stop_strings", "max_batch_size")


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The parser, and its sub-parsers by command name ("serve", "bench decode", ...)."""
    from tpfleet.server.guard import DEFAULT_MAX_BATCH_SIZE, DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_STOP_STRINGS

    parser = argparse.ArgumentParser(prog="tpfleet", description=tpfleet.__doc__, formatter_class=Formatter)
    parser.add_argument("--version", action="version", version=f"tpfleet {tpfleet.__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    groups = {"": sub}
    commands: dict[str, argparse.ArgumentParser] = {}

    def command(name: str, text: str) -> argparse.ArgumentParser:
        group, _, leaf = name.rpartition(" ")
        if group not in groups:
            groups[group] = sub.add_parser(group, help=GROUP_HELP[group], description=GROUP_HELP[group],
                                           formatter_class=Formatter).add_subparsers(dest="what", required=True)
        commands[name] = groups[group].add_parser(leaf, help=text, description=text, formatter_class=Formatter)
        return commands[name]

    make_model_cmd = command("make-model", "write a random Qwen3 or Qwen3-MoE checkpoint (no network)")
    presets = ["tiny", "small", "8b-shape", "tiny-moe", "30b-a3b-shape"]
    make_model_cmd.add_argument("--preset", default="tiny", choices=presets,
                                help="model shape (the -moe and -a3b presets are Qwen3-MoE)")
    make_model_cmd.add_argument("--out", required=True, help="checkpoint directory to write")
    make_model_cmd.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    make_model_cmd.add_argument("--no-weights", action="store_true",
                                help="config and tokenizer only: a model's shapes for `--load-format dummy`")
    make_model_cmd.add_argument("--device", default="auto", choices=DEVICE_CHOICES,
                                help="where to draw the random weights (cuda is faster); 'auto': cuda where this "
                                     "machine sees a GPU, else cpu")

    serve_cmd = command("serve", "serve one TP engine over HTTP")
    serve_cmd.add_argument("--config", default=None,
                           help="the engine's whole EngineConfig as a JSON document, inline or in a file; engine "
                                "flags given as well override its fields")
    add_engine_arguments(serve_cmd, model_required=False)
    serve_cmd.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve_cmd.add_argument("--port", type=int, default=0, help="0: the kernel picks a free port (printed when ready)")
    serve_cmd.add_argument("--served-model-name", default=None, help="model name in OpenAI API answers (None: --model)")
    serve_cmd.add_argument("--api-key", default=None,
                           help="key every route but /health, /health_generate and /metrics requires, as "
                                f"`Authorization: Bearer KEY` (None: ${env.API_KEY})")
    serve_cmd.add_argument("--admin-api-key", default=None,
                           help="key the admin routes (weights, memory, pause, abort, flush) require "
                                f"(None: ${env.ADMIN_API_KEY}); needed to listen beyond loopback")
    serve_cmd.add_argument("--allow-unauthenticated-admin", action="store_true",
                           help="listen beyond loopback without --admin-api-key (a network you trust)")
    serve_cmd.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                           help="largest request body; larger ones get 413")
    serve_cmd.add_argument("--max-stop-strings", type=int, default=DEFAULT_MAX_STOP_STRINGS,
                           help="most stop strings per request")
    serve_cmd.add_argument("--max-batch-size", type=int, default=DEFAULT_MAX_BATCH_SIZE,
                           help="most sequences per request (prompts times n)")

    launch_cmd = command("launch", "start a fleet of engines and serve a router in front of them")
    launch_cmd.add_argument("--engines", type=int, default=1, help="how many engines")
    launch_cmd.add_argument("--gpus", default="",
                            help="comma-separated indices (of this process's visible GPUs) or UUIDs; none given: "
                                 "every GPU this process sees")
    launch_cmd.add_argument("--backend", choices=["local", "ray"], default="local",
                            help="engines as local processes, or in Ray actors")
    launch_cmd.add_argument("--max-concurrent-starts", type=int, default=1, help="engines starting at once")
    launch_cmd.add_argument("--startup-timeout", type=float, default=600.0,
                            help="seconds for an engine to become ready")
    launch_cmd.add_argument("--restart-budget", type=int, default=3, help="restarts per engine after it dies")
    launch_cmd.add_argument("--reap-stale", action="store_true", help="kill processes already holding the GPUs")
    launch_cmd.add_argument("--log-dir", default=None,
                            help="engine logs, config documents and exit records (None: a fresh temp dir, kept "
                                 "after the stop)")
    launch_cmd.add_argument("--host", default="127.0.0.1", help="router address")
    launch_cmd.add_argument("--engine-host", default="127.0.0.1",
                            help="where engines listen; 'node' for each Ray node's IP when engines span machines")
    launch_cmd.add_argument("--port", type=int, default=0, help="router port (0: the kernel picks)")
    launch_cmd.add_argument("--engine-arg", action="append", default=[],
                            help="an engine flag, as `tpfleet serve` takes it (repeat; e.g. "
                                 "--engine-arg=--kv-cache-tokens --engine-arg=4096)")
    launch_cmd.add_argument("--ray-address", default=None,
                            help="Ray cluster to join with --backend ray (None: start one)")
    launch_cmd.add_argument("--placement-group", default=None,
                            help="--backend ray: place engine ranks in this existing placement group (name or id)")
    launch_cmd.add_argument("--bundle-indices", type=_int_list, default=None,
                            help="with --placement-group: the bundle of each rank of each engine, in order")
    launch_cmd.add_argument("--num-gpus-per-actor", type=float, default=1.0,
                            help="GPU share each rank asks of its bundle (e.g. 0.2 beside a trainer's 0.8)")
    launch_cmd.add_argument("--api-key", default=None,
                            help="key every engine's routes but /health, /health_generate and /metrics require, "
                                 f"passed to them as ${env.API_KEY} (None: ${env.API_KEY})")
    launch_cmd.add_argument("--admin-api-key", default=None,
                            help="key every engine's admin routes and the router's worker routes require, passed "
                                 f"to engines as ${env.ADMIN_API_KEY} (None: ${env.ADMIN_API_KEY})")
    launch_cmd.add_argument("--router-read-timeout", type=float, default=None,
                            help="seconds the router waits for an engine's next bytes before answering 504 (None: "
                                 "as long as the engine takes; health checks catch a dead or hung one)")
    add_engine_arguments(launch_cmd, exclude=PLACEMENT_FIELDS)

    router_cmd = command("router", "serve a router alone; engines register over HTTP (POST /workers or /add_worker)")
    router_cmd.add_argument("--worker-urls", nargs="*", default=[], help="engines to start with")
    router_cmd.add_argument("--host", default="127.0.0.1", help="router address")
    router_cmd.add_argument("--port", type=int, default=0, help="router port (0: the kernel picks)")
    router_cmd.add_argument("--read-timeout", type=float, default=None,
                            help="seconds the router waits for an engine's next bytes before answering 504 (None: "
                                 "as long as the engine takes; health checks catch a dead or hung one)")
    router_cmd.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                            help="largest request body the router takes (413 above it, before it is read whole)")
    router_cmd.add_argument("--admin-api-key", default=None,
                            help=f"key needed to register or remove workers (None: ${env.ADMIN_API_KEY})")

    demo_cmd = command("demo", "build the tiny model, serve it with TP=2 on CPU, send requests, stop; then a few "
                                "RL steps with two engines behind the router")
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
    engine_cmd.add_argument("--hf-chunk", type=int, default=128,
                            help="transformers baseline: sequences per generate call of the offline workload (a "
                                 "call prefills its whole chunk at once: 30b-a3b-shape needs 32 or fewer on 80 GB)")
    engine_cmd.add_argument("--hf-experts", default=None,
                            help="transformers baseline of an MoE model: its experts_implementation (grouped_mm, "
                                 "eager); default transformers' own choice, which is recorded")
    engine_cmd.add_argument("--out", default="bench-out", help="directory for the JSON and PNG")
    engine_cmd.add_argument("--batches", type=_int_list, default="1,8,64,256,512",
                            help="decode batch sizes (comma-separated); one above --max-num-seqs is skipped")
    engine_cmd.add_argument("--contexts", type=_int_list, default="128,1024,4096,8192",
                            help="decode contexts in tokens per sequence (comma-separated); combos whose KV "
                                 "does not fit are skipped")
    engine_cmd.add_argument("--decode-steps", type=int, default=32, help="timed decode steps per point")
    engine_cmd.add_argument("--offline-max-len", type=int, default=1024,
                            help="offline workload: prompt and output lengths uniform in [max/10, max]")
    engine_cmd.add_argument("--logprobs", choices=["both", "on", "off"], default="both",
                            help="offline runs with return_logprob, without, or both (the logprob cost)")
    engine_cmd.add_argument("--workload", choices=["decode", "rl"], default="decode",
                            help="decode: the step-time sweep and offline throughput; rl: an RL rollout batch "
                                 "in-process and over HTTP through the router")
    engine_cmd.add_argument("--rl-prompts", type=int, default=64, help="rl: prompts")
    engine_cmd.add_argument("--rl-samples", type=int, default=8, help="rl: samples per prompt (separate requests)")
    engine_cmd.add_argument("--rl-max-output", type=int, default=4096, help="rl: the output length cap")
    engine_cmd.add_argument("--rl-prompt-len", type=_int_list, default="256,2048",
                            help="rl: MIN,MAX prompt length (uniform)")
    engine_cmd.add_argument("--no-http", action="store_true", help="rl: skip the run over HTTP")
    start_cmd = command("bench start", "cold and warm time-to-ready of `tpfleet serve`, per start-up phase")
    add_engine_arguments(start_cmd)
    start_cmd.add_argument("--out", default="bench-out", help="directory for the JSON")
    start_cmd.add_argument("--timeout", type=float, default=900.0, help="seconds for each start")
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
                          help="the preset's shards at these tensor-parallel sizes (comma-separated)")
    gemv_cmd.add_argument("--preset", default="8b-shape", choices=["8b-shape", "30b-a3b-shape"],
                          help="whose projections: Qwen3-8B's, or Qwen3-30B-A3B's attention and router")
    gemv_cmd.add_argument("--sweep", action="store_true", help="also time a grid of launch configs per projection")
    gemv_cmd.add_argument("--rows", type=_int_list, default="",
                          help="instead: the projections at these batch sizes (comma-separated), cuBLAS against "
                               "the floor (with --sweep, tpfleet's skinny GEMM too, up to 64 rows)")
    gemv_cmd.add_argument("--out", default="bench-out", help="directory for the JSON and PNG")
    attention_cmd = command("bench attention", "decode attention per KV-split policy vs the bandwidth floor")
    attention_cmd.add_argument("--tiles", action="store_true",
                               help="instead: every tile and split count at large batches and long contexts")
    attention_cmd.add_argument("--batches", type=_int_list, default="64,256", help="--tiles: batch sizes")
    attention_cmd.add_argument("--contexts", type=_int_list, default="1024,4096,8192", help="--tiles: contexts")
    attention_cmd.add_argument("--out", default="bench-out", help="directory for the JSON and PNG")

    colocate_cmd = command("bench colocate",
                           "release/resume/weight-update cycles with a colocated trainer vs the floor")
    add_engine_arguments(colocate_cmd)
    colocate_cmd.add_argument("--cycles", type=int, default=20, help="release, resume and update cycles")
    colocate_cmd.add_argument("--out", default="bench-out", help="directory for the JSON")
    moe_cmd = command("bench moe",
                      "fused MoE layer vs the torch reference, a dense GEMM and the floor, per token count")
    moe_cmd.add_argument("--tp-sizes", "--tp", dest="tp_sizes", type=_int_list, default="1",
                         help="Qwen3-30B-A3B's expert shards at these TP sizes")
    moe_cmd.add_argument("--tokens", type=_int_list, default=None, help="token counts (None: 1, 2, 4, ..., 8192)")
    moe_cmd.add_argument("--sweep", action="store_true", help="time candidate tiles per token count first and cache "
                                                              "the fastest")
    moe_cmd.add_argument("--out", default="bench-out", help="directory for the JSON")

    warmup_cmd = command("warmup", "build the JIT caches engine configs need; a no-op when still valid")
    add_engine_arguments(warmup_cmd, exclude=PLACEMENT_FIELDS, several=("tp_size", "graph_mode"))
    warmup_cmd.add_argument("--timeout", type=float, default=900.0, help="seconds per config")

    doctor_cmd = command("doctor", "check the launch environment; non-zero exit if a launch would break")
    doctor_cmd.add_argument("--gpus", default="",
                            help="limit to these GPUs (comma-separated indices or UUID prefixes); none given: every "
                                 "GPU")
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


def steady_state(cfg: EngineConfig) -> EngineConfig:
    """What step and throughput benchmarks run: every CUDA-graph bucket captured at start, so that no timed
    step captures one (`bench start` times the default)."""
    return dataclasses.replace(cfg, capture_all_graphs=True)


def command_name(args: argparse.Namespace) -> str:
    """"serve", "bench decode", ...: the key of `build_parser`'s sub-parsers."""
    return f"{args.cmd} {args.what}" if getattr(args, "what", None) else args.cmd


def check_local_inputs(args: argparse.Namespace) -> None:
    """What would fail minutes later inside an engine, checked before anything starts: `--model` must be a
    local checkpoint directory whose shapes the tensor- and expert-parallel sizes divide, `--device cuda`
    needs a GPU here. A Ray fleet's engines run on other machines, so `launch --backend ray` leaves those
    to them."""
    name = command_name(args)
    if name == "launch" and args.backend == "ray":
        return
    if getattr(args, "model", None) is not None:
        check_checkpoint_dir(args.model, getattr(args, "load_format", "auto"))
        if name in ("serve", "launch"):
            ModelConfig.from_dir(args.model).check_parallelism(args.tp_size, args.ep_size)
    if getattr(args, "device", None) == "cuda":
        require_cuda()
    if name in GPU_ONLY:
        require_cuda(f"tpfleet {name} needs a CUDA GPU")


def main(argv: list[str] | None = None) -> int:
    """Run one command. Ctrl-C or SIGTERM ends any stage quietly: exit code 130, or 0 where stopping is the
    command's normal end (serve, launch). A bad --model, --device, --tp-size or --port is one line on
    stderr and exit code 2."""
    env.apply_multicast_off()
    env.apply_hub_offline()
    if threading.current_thread() is threading.main_thread():
        sigterm_as_interrupt()
    try:
        args = parse_args(argv)
        try:
            check_local_inputs(args)
        except (ValueError, DeviceError) as error:
            if args.cmd == "serve":
                exits.record_engine_failure(error, 1)  # the launcher that started this engine learns why
            print(f"tpfleet {command_name(args)}: error: {error}", file=sys.stderr)
            return 2
        return run_command(args)
    except CannotListen as error:  # serve, launch, router: the port is taken or the address not ours
        print(f"tpfleet {command_name(args)}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return INTERRUPTED


def run_command(args: argparse.Namespace) -> int:
    default_triton_cache()
    for name, variable in (("api_key", env.API_KEY), ("admin_api_key", env.ADMIN_API_KEY)):
        if hasattr(args, name) and getattr(args, name) is None:  # keys come from the environment, never a default
            setattr(args, name, os.environ.get(variable))
    if args.cmd == "make-model":
        from tpfleet.model.make_model import PRESETS, make_model

        out = make_model(args.preset, args.out, args.seed, resolve_device(args.device), weights=not args.no_weights)
        family = "Qwen3-MoE" if PRESETS[args.preset].num_experts else "Qwen3"
        print(f"wrote {args.preset} {family} {'config and tokenizer' if args.no_weights else 'checkpoint'} to {out}")
    elif args.cmd == "serve":
        try:
            with interrupts_deferred():  # torch comes with these: an import an interrupt must not land inside
                from tpfleet.server.guard import UnsafeBind, check_bind
                from tpfleet.server.launch import serve
        except KeyboardInterrupt:
            return 0
        try:
            cfg = engine_config_from_args(args)
        except ValueError as error:
            exits.record_engine_failure(error, 1)  # no rank has started: no rank records to attach
            build_parser()[1]["serve"].error(str(error))

        settings = {name: getattr(args, name) for name in SERVER_SETTINGS}
        try:
            check_bind(args.host, args.admin_api_key, args.allow_unauthenticated_admin)
        except UnsafeBind as error:
            exits.record_engine_failure(error, 1)
            build_parser()[1]["serve"].error(str(error))
        try:
            serve(cfg, args.host, args.port, args.served_model_name, settings=settings)
        except KeyboardInterrupt:
            pass
    elif args.cmd == "launch":
        from tpfleet.fleet.fleet import FLEET_FIELDS, FleetConfig
        from tpfleet.fleet.launch import launch
        from tpfleet.fleet.router import RouterConfig

        fields = engine_fields_from_args(args)
        for name, value in ((env.API_KEY, args.api_key), (env.ADMIN_API_KEY, args.admin_api_key)):
            if value:
                os.environ[name] = value  # the engines inherit it; a key never appears in their argv
        try:
            engine = {**non_default_fields({k: v for k, v in fields.items() if k not in FLEET_FIELDS}),
                      **parse_engine_args(args.engine_arg)}
            cfg = FleetConfig(
                model=args.model, engines=args.engines, tp_size=args.tp_size, device=fields["device"], engine=engine,
                backend=args.backend, gpus=[g for g in args.gpus.split(",") if g.strip()] or None,
                max_concurrent_starts=args.max_concurrent_starts, startup_timeout_s=args.startup_timeout,
                log_dir=args.log_dir or tempfile.mkdtemp(prefix="tpfleet-logs-"), reap_stale=args.reap_stale,
                restart_budget=args.restart_budget,
                host=args.engine_host, ray_address=args.ray_address, placement_group=args.placement_group,
                bundle_indices=args.bundle_indices, num_gpus_per_actor=args.num_gpus_per_actor)
        except ValueError as error:
            build_parser()[1]["launch"].error(str(error))
        return launch(cfg, args.host, args.port, RouterConfig(read_timeout_s=args.router_read_timeout,
                                                              admin_api_key=args.admin_api_key))
    elif args.cmd == "router":
        from tpfleet.fleet.launch import serve_router
        from tpfleet.fleet.router import RouterConfig

        return serve_router(args.worker_urls, args.host, args.port,
                            RouterConfig(read_timeout_s=args.read_timeout, admin_api_key=args.admin_api_key,
                                         max_body_bytes=args.max_body_bytes))
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

        bench_decode(steady_state(_engine_config(args, "bench decode")), _int_list(args.batch_sizes), args.input_len)
    elif args.cmd == "bench" and args.what == "engine":
        from tpfleet.bench.engine import bench_engine, hf_experts_implementations

        cfg = steady_state(_engine_config(args, "bench engine"))
        if args.workload == "rl":
            from tpfleet.bench.workloads import RLWorkload, bench_rl

            if len(args.rl_prompt_len) != 2 or not 1 <= args.rl_prompt_len[0] <= args.rl_prompt_len[1]:
                build_parser()[1]["bench engine"].error("--rl-prompt-len: expected MIN,MAX with 1 <= MIN <= MAX")
            workload = RLWorkload(args.rl_prompts, args.rl_samples, *args.rl_prompt_len, args.rl_max_output)
            bench_rl(cfg, args.out, workload, args.logprobs, over_http=not args.no_http)
        else:
            if args.hf_chunk < 1:
                build_parser()[1]["bench engine"].error(f"--hf-chunk: expected a positive count, got {args.hf_chunk}")
            if args.hf_experts and args.hf_experts not in (offered := hf_experts_implementations()):
                build_parser()[1]["bench engine"].error(f"--hf-experts: this transformers offers "
                                                        f"{', '.join(offered) or 'no choice'}, not {args.hf_experts!r}")
            bench_engine(cfg, args.out, args.num_seqs, with_hf=not args.no_hf, batches=args.batches,
                         contexts=args.contexts, steps=args.decode_steps, logprobs=args.logprobs,
                         offline_max_len=args.offline_max_len, hf_chunk=args.hf_chunk, hf_experts=args.hf_experts)
    elif args.cmd == "bench" and args.what == "start":
        from tpfleet.bench.start import bench_start

        bench_start(_engine_config(args, "bench start"), args.out, args.timeout)
    elif args.cmd == "bench" and args.what == "allreduce":
        import torch

        from tpfleet.bench.allreduce import bench_allreduce

        bench_allreduce(args.nproc, args.out, getattr(torch, args.dtype), grids=args.grids)
    elif args.cmd == "bench" and args.what == "gemv":
        from tpfleet.bench.gemv import bench_gemv, bench_rows

        if args.rows:
            bench_rows(args.out, args.tp_sizes, args.rows, args.preset, args.sweep)
        else:
            bench_gemv(args.out, args.tp_sizes, args.sweep, args.preset)
    elif args.cmd == "bench" and args.what == "colocate":
        from tpfleet.bench.colocate import bench_colocate

        bench_colocate(_engine_config(args, "bench colocate"), args.out, args.cycles)
    elif args.cmd == "bench" and args.what == "moe":
        from tpfleet.bench.moe import QWEN3_30B_A3B, bench_moe

        bench_moe(args.out, [QWEN3_30B_A3B.at_tp(tp_size) for tp_size in args.tp_sizes], args.tokens, args.sweep)
    elif args.cmd == "bench" and args.what == "attention":
        from tpfleet.bench.attention import bench_attention, bench_attention_tiles

        if args.tiles:
            bench_attention_tiles(args.out, args.batches, args.contexts)
        else:
            bench_attention(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
