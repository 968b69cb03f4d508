"""The command line as users run it: make-model, the demo, the engine flags and config documents, and
process lifecycle of `serve`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
from safetensors import safe_open

from tpfleet import exits
from tpfleet.cli import build_parser, parse_args, parse_engine_args
from tpfleet.config import FIELD_HELP, EngineConfig, field_types, flag_name
from tpfleet.demo import process_family, start_server, wait_gone
from tpfleet.devices import resolve_device
from tpfleet.model.make_model import make_model

# Every field away from its default, so that a field the flags lose cannot go unnoticed.
NON_DEFAULT = EngineConfig(
    model="/models/qwen3", tp_size=2, ep_size=2, device="cuda", device_ids=[3, 1], gpu_uuids=["GPU-a", "GPU-b"],
    dtype="bfloat16", context_length=4096, block_size=32, max_num_seqs=64, max_num_batched_tokens=512,
    kv_cache_tokens=8192, mem_fraction_static=0.5, enable_prefix_caching=False, attention_backend="triton",
    graph_mode="piecewise", capture_all_graphs=True, overlap_schedule=False, enable_custom_all_reduce=False,
    enable_symm_mem=False, seed=7, enable_return_routed_experts=True, weights_root=["/ckpt/a", "/ckpt/b"],
    hang_timeout=30.0, startup_hang_timeout=900.0, enable_memory_saver=True, weights_cpu_backup=True,
    load_format="dummy")


def as_flags(cfg: EngineConfig) -> list[str]:
    """The command line that sets every field of `cfg` that differs from its default."""
    argv = []
    defaults = EngineConfig(model=cfg.model)
    for name, value in cfg.to_dict().items():
        if name != "model" and value == getattr(defaults, name):
            continue
        if isinstance(value, bool):
            argv.append(flag_name(name))
        elif isinstance(value, list):
            argv += [flag_name(name), ",".join(str(v) for v in value)]
        else:
            argv += [flag_name(name), str(value)]
    return argv


# --- the engine config document and the flags derived from its fields ----------------------------------

def test_config_document_round_trips_and_rejects_unknown_keys(tmp_path):
    assert all(getattr(NON_DEFAULT, name) != getattr(EngineConfig(model="m"), name) for name in field_types()
               if name != "model")
    assert EngineConfig.from_json(NON_DEFAULT.to_json()) == NON_DEFAULT
    (tmp_path / "engine.json").write_text(NON_DEFAULT.to_json())
    assert EngineConfig.from_file(tmp_path / "engine.json") == NON_DEFAULT
    assert EngineConfig.from_file_or_json(str(tmp_path / "engine.json")) == NON_DEFAULT
    assert EngineConfig.from_file_or_json(NON_DEFAULT.to_json()) == NON_DEFAULT
    assert EngineConfig.from_json('{"model": "m"}') == EngineConfig(model="m")
    with pytest.raises(ValueError, match="unknown engine config field 'kv_cache'"):
        EngineConfig.from_json('{"model": "m", "kv_cache": 4096}')
    with pytest.raises(ValueError, match="'tp_size' must be an integer"):
        EngineConfig.from_json('{"model": "m", "tp_size": "2"}')
    with pytest.raises(ValueError, match="'gpu_uuids' must be a list, each a string"):
        EngineConfig.from_json('{"model": "m", "gpu_uuids": "GPU-a"}')
    with pytest.raises(ValueError, match="'model' is missing"):
        EngineConfig.from_json('{"tp_size": 2}')
    with pytest.raises(ValueError, match="tp_size must be 1, 2, 4 or 8"):
        EngineConfig.from_json('{"model": "m", "tp_size": 3}')
    with pytest.raises(ValueError, match="not valid JSON"):
        EngineConfig.from_json("{model")


@pytest.mark.parametrize("command", ["serve", "bench decode", "bench engine", "launch", "warmup"])
def test_every_engine_field_has_a_flag_with_help(command):
    parser = build_parser()[1][command]
    by_dest = {action.dest: action for action in parser._actions}
    planned = {"gpu_uuids", "device_ids"} if command in ("launch", "warmup") else set()
    for name in field_types():
        assert FIELD_HELP[name], name
        if name in planned:
            assert name not in by_dest, name
            continue
        action = by_dest[name]
        assert flag_name(name) in action.option_strings and action.help, name
    assert set(FIELD_HELP) == set(field_types())
    assert "--tp" in by_dest["tp_size"].option_strings  # today's spelling still works
    help_text = parser.format_help()
    assert "(default: 256)" in help_text and "--enable-return-routed-experts" in help_text


def test_flags_parse_back_to_an_equal_engine_config():
    argv = as_flags(NON_DEFAULT)
    for flag in ("--tp-size", "--disable-prefix-caching", "--disable-overlap-schedule", "--disable-custom-all-reduce",
                 "--disable-symm-mem", "--device-ids", "--gpu-uuids", "--kv-cache-tokens", "--ep-size",
                 "--enable-return-routed-experts"):
        assert flag in argv, flag
    from tpfleet.config import engine_config_from_args

    for command in ("serve", "bench decode", "bench engine"):
        assert engine_config_from_args(parse_args([*command.split(), *argv])) == NON_DEFAULT
    device = resolve_device("auto")  # --device defaults to auto: cuda where this machine sees a GPU
    assert engine_config_from_args(parse_args(["serve", "--model", "m"])) == EngineConfig(model="m", device=device)
    old_style = ["serve", "--model", "m", "--tp", "2", "--disable-prefix-caching", "--kv-cache-tokens", "4096"]
    assert engine_config_from_args(parse_args(old_style)) == EngineConfig(
        model="m", tp_size=2, enable_prefix_caching=False, kv_cache_tokens=4096, device=device)


def test_serve_takes_a_config_document_that_flags_override(tmp_path):
    from tpfleet.config import engine_config_from_args

    path = tmp_path / "engine.json"
    path.write_text(NON_DEFAULT.to_json())
    assert engine_config_from_args(parse_args(["serve", "--config", str(path)])) == NON_DEFAULT
    assert engine_config_from_args(parse_args(["serve", "--config", NON_DEFAULT.to_json()])) == NON_DEFAULT
    overridden = parse_args(["serve", "--config", str(path), "--seed", "0", "--max-num-seqs", "8"])
    assert engine_config_from_args(overridden) == EngineConfig(**{**NON_DEFAULT.to_dict(), "seed": 0,
                                                                  "max_num_seqs": 8})
    path.write_text('{"model": "m", "kv_cache": 1}')
    record = tmp_path / "engine.exit.json"
    r = subprocess.run([sys.executable, "-m", "tpfleet.cli", "serve", "--config", str(path)], capture_output=True,
                       text=True, env={**os.environ, "TPFLEET_EXIT_RECORD": str(record)})
    assert r.returncode == 2 and "unknown engine config field 'kv_cache'" in r.stderr
    written = exits.read(record)  # what a launcher learns, without reading the output
    assert written.exc_type == "ValueError" and written.phase == "starting" and "'kv_cache'" in written.message


def test_launch_engine_flags_and_engine_args_become_the_engine_dict():
    assert parse_engine_args(["--kv-cache-tokens", "4096", "--disable-prefix-caching"]) == {
        "kv_cache_tokens": 4096, "enable_prefix_caching": False}
    assert parse_engine_args([]) == {}
    with pytest.raises(ValueError, match="--engine-arg"):
        parse_engine_args(["--tp-size", "2"])  # a fleet field: `launch --tp-size`, not an engine argument
    with pytest.raises(ValueError, match="--engine-arg"):
        parse_engine_args(["--max-num-seqs", "many"])
    args = parse_args(["launch", "--model", "m", "--tp", "2", "--engines", "3", "--max-num-seqs", "8"])
    assert (args.model, args.tp_size, args.engines, args.max_num_seqs) == ("m", 2, 3, 8)


def test_make_model_writes_a_sharded_hf_checkpoint(tmp_path):
    out = subprocess.run([sys.executable, "-m", "tpfleet.cli", "make-model", "--preset", "tiny", "--out",
                          str(tmp_path)], capture_output=True, text=True, check=True)
    assert str(tmp_path) in out.stdout
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "model.safetensors.index.json"):
        assert (tmp_path / name).is_file(), name
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "qwen3" and cfg["vocab_size"] % 2 == 1
    assert cfg["head_dim"] * cfg["num_attention_heads"] != cfg["hidden_size"]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    files = set(index.values())
    assert len(files) > 1
    for f in files:
        with safe_open(str(tmp_path / f), "pt") as st:
            assert {k for k, v in index.items() if v == f} == set(st.keys())


def test_presets_are_deterministic_per_seed(tmp_path):
    a, b, c = (make_model("tiny", tmp_path / n, seed=s) for n, s in (("a", 0), ("b", 0), ("c", 1)))
    def embedding(d):
        return safe_open(str(next(d.glob("model-00001-*"))), "pt").get_tensor("model.embed_tokens.weight")

    assert embedding(a).equal(embedding(b)) and not embedding(a).equal(embedding(c))


def test_demo_runs_and_leaves_no_process(tmp_path):
    r = subprocess.run([sys.executable, "-m", "tpfleet.cli", "demo", "--workdir", str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 left" in r.stdout and "prefix cache" in r.stdout


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_serve_stops_every_rank_on_signal(tiny_model, sig):
    proc, url = start_server(tiny_model, tp_size=2)
    pids = process_family(proc.pid)
    assert len(pids) >= 2
    proc.send_signal(sig)
    assert proc.wait(timeout=30) == 0
    assert wait_gone(pids, timeout=5) == []


def test_a_killed_rank_takes_the_engine_down_promptly(tiny_model):
    proc, url = start_server(tiny_model, tp_size=2)
    pids = process_family(proc.pid)
    worker = next(c for c in psutil.Process(proc.pid).children() if "spawn_main" in " ".join(c.cmdline())
                  and "resource_tracker" not in " ".join(c.cmdline()))
    t = time.monotonic()
    worker.send_signal(signal.SIGKILL)
    code = proc.wait(timeout=10)
    assert code != 0 and time.monotonic() - t < 5
    assert wait_gone(pids, timeout=5) == []
