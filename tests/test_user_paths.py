"""A new user's first commands: a wrong --model or --device fails at once in one line, every flag is
explained in --help, --device means the same everywhere, and an interrupt never prints a traceback."""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from conftest import HAS_CUDA

import tpfleet
from tpfleet import env, exits
from tpfleet.cli import build_parser, parse_args
from tpfleet.config import EngineConfig, check_checkpoint_dir, engine_fields_from_args
from tpfleet.lifecycle import interrupts_deferred

MODEL_COMMANDS = ["serve", "launch", "warmup", "bench decode", "bench engine"]
THIS_MACHINE = "cuda" if HAS_CUDA else "cpu"


def tpfleet_cli(*argv: str, timeout: float = 60, **environ: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tpfleet", *argv], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **environ})


def assert_one_line_error(result: subprocess.CompletedProcess, *words: str) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


# --- --model: a local checkpoint directory, checked before anything starts -----------------------------

@pytest.mark.parametrize("command", MODEL_COMMANDS)
def test_a_missing_model_fails_at_once_naming_the_path(command, tmp_path):
    missing = tmp_path / "no-such-model"
    started = time.monotonic()
    result = tpfleet_cli(*command.split(), "--model", str(missing))
    assert time.monotonic() - started < 5  # no hub look-ups, no engine start
    assert_one_line_error(result, f"tpfleet {command}: error:", str(missing), "no such directory")


def test_a_directory_that_is_not_a_checkpoint_fails_at_once(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    record = tmp_path / "engine.exit.json"
    started = time.monotonic()
    result = tpfleet_cli("serve", "--model", str(tmp_path), TPFLEET_EXIT_RECORD=str(record))
    assert time.monotonic() - started < 5
    assert_one_line_error(result, str(tmp_path), "no config.json")
    written = exits.read(record)  # what a launcher that started this engine learns
    assert written.exc_type == "ValueError" and "no config.json" in written.message


@pytest.mark.parametrize("command", ["serve", "launch"])
def test_a_tp_size_the_model_cannot_split_fails_before_any_rank_starts(command, tiny_model):
    started = time.monotonic()
    result = tpfleet_cli(command, "--model", str(tiny_model), "--device", "cpu", "--tp-size", "8")
    assert time.monotonic() - started < 10  # no rank spawned, no engine started
    assert_one_line_error(result, f"tpfleet {command}: error:", "num_attention_heads (4)", "(8)")


@pytest.mark.parametrize("command", ["serve", "launch", "router"])
def test_a_taken_port_is_one_line_before_anything_starts(command, tiny_model):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        model = [] if command == "router" else ["--model", str(tiny_model), "--device", "cpu"]
        started = time.monotonic()
        result = tpfleet_cli(command, *model, "--port", str(port))
        assert time.monotonic() - started < 10  # launch: no engine started before the router's port
        assert_one_line_error(result, f"tpfleet {command}: error:", f"cannot listen on 127.0.0.1:{port}")


def test_a_fleet_of_no_engines_is_refused(tiny_model):
    result = tpfleet_cli("launch", "--model", str(tiny_model), "--device", "cpu", "--engines", "0")
    assert result.returncode == 2 and "engines must be at least 1" in result.stderr, result.stderr


def test_the_checkpoint_check_names_what_is_missing(tiny_model, tmp_path):
    check_checkpoint_dir(str(tiny_model))  # a complete checkpoint passes
    with pytest.raises(ValueError, match="not a directory"):
        check_checkpoint_dir(str(tiny_model / "config.json"))
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_text((tiny_model / "config.json").read_text())
    with pytest.raises(ValueError, match=r"no \*\.safetensors weights"):
        check_checkpoint_dir(str(partial))
    index = json.loads((tiny_model / "model.safetensors.index.json").read_text())
    first, *rest = sorted(set(index["weight_map"].values()))
    (partial / "model.safetensors.index.json").write_text(json.dumps(index))
    (partial / first).write_bytes((tiny_model / first).read_bytes())
    with pytest.raises(ValueError, match=f"missing shards: {rest[0]}"):
        check_checkpoint_dir(str(partial))
    for name in rest:
        (partial / name).write_bytes((tiny_model / name).read_bytes())
    with pytest.raises(ValueError, match="no tokenizer"):
        check_checkpoint_dir(str(partial))
    (partial / "tokenizer.json").write_text((tiny_model / "tokenizer.json").read_text())
    check_checkpoint_dir(str(partial))


def test_processes_tpfleet_starts_never_ask_a_model_hub(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")  # a user's explicit choice stands
    child = env.child_env()
    assert child["HF_HUB_OFFLINE"] == "1" and child["TRANSFORMERS_OFFLINE"] == "0"


# --- --device ---------------------------------------------------------------------------------------------

@pytest.mark.skipif(HAS_CUDA, reason="checks the message on a machine without a GPU")
@pytest.mark.parametrize("command", ["serve", "launch", "warmup", "bench decode", "make-model"])
def test_device_cuda_without_a_gpu_is_one_line_and_exit_2(command, tiny_model, tmp_path):
    target = ["--out", str(tmp_path / "model")] if command == "make-model" else ["--model", str(tiny_model)]
    result = tpfleet_cli(*command.split(), *target, "--device", "cuda", CUDA_VISIBLE_DEVICES="")
    assert_one_line_error(result, "--device cuda: no CUDA GPU is visible", "torch.cuda.is_available() is False",
                          "CUDA_VISIBLE_DEVICES=''")
    assert not (tmp_path / "model").exists()


@pytest.mark.skipif(HAS_CUDA, reason="checks the message on a machine without a GPU")
def test_a_gpu_only_benchmark_without_a_gpu_is_one_line_and_exit_2():
    result = tpfleet_cli("bench", "attention")
    assert_one_line_error(result, "tpfleet bench attention needs a CUDA GPU: no CUDA GPU is visible")


def test_an_impossible_engine_config_is_a_usage_error_not_a_traceback(tiny_model):
    result = tpfleet_cli("serve", "--model", str(tiny_model), "--device", "cpu", "--graph-mode", "full")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1] == "tpfleet serve: error: CUDA graphs need device='cuda'"


def test_device_defaults_to_auto_in_every_command_and_documents_hold_the_device():
    commands = build_parser()[1]
    with_device = {name: parser for name, parser in commands.items()
                   if any(action.dest == "device" for action in parser._actions)}
    assert {"make-model", "serve", "launch", "warmup", "bench decode", "bench engine"} <= set(with_device)
    for name, parser in with_device.items():
        action = next(action for action in parser._actions if action.dest == "device")
        assert action.default == "auto" and set(action.choices) == {"auto", "cpu", "cuda"}, name
    for command in ("serve", "launch", "warmup", "bench decode"):
        assert engine_fields_from_args(parse_args([*command.split(), "--model", "m"]))["device"] == THIS_MACHINE
        assert engine_fields_from_args(parse_args([*command.split(), "--model", "m", "--device", "cpu"]))[
            "device"] == "cpu"


# --- --help and --version ---------------------------------------------------------------------------------

def help_entries(text: str) -> dict[str, str]:
    """Option entries of an argparse help text: "--tp-size TP_SIZE, --tp TP_SIZE" -> its help, unwrapped."""
    entries: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("  -"):
            current, _, rest = line.strip().partition("  ")
            entries[current] = rest.strip()
        elif current is not None and line.startswith("    "):
            entries[current] = f"{entries[current]} {line.strip()}".strip()
        else:
            current = None
    return entries


def help_output(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as stop:
        parse_args([*argv, "--help"])
    assert stop.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("command", sorted(build_parser()[1]))
def test_help_explains_every_option_with_its_default(command, capsys):
    parser = build_parser()[1][command]
    text = help_output(command.split(), capsys)
    assert parser.description and parser.description in " ".join(text.split())
    entries = help_entries(text)
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            continue
        entry = next((help for invocation, help in entries.items()
                      if action.option_strings[0] in invocation.replace(",", " ").split()), None)
        assert entry, (command, action.option_strings)
        if not action.required:
            assert str(action.default) in entry, (command, action.option_strings, entry)


def sub_commands(parser: argparse.ArgumentParser) -> argparse._SubParsersAction:
    return next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))


@pytest.mark.parametrize("group", ["", "bench"])
def test_help_lists_every_sub_command_with_what_it_does(group, capsys):
    parser = build_parser()[0]
    if group:
        parser = sub_commands(parser).choices[group]
    listed = sub_commands(parser)._choices_actions
    text = " ".join(help_output(group.split(), capsys).split())
    assert len(listed) >= 5
    for choice in listed:
        assert choice.help and f"{choice.dest} {choice.help}" in text, choice.dest


def test_version():
    result = tpfleet_cli("--version", timeout=30)
    assert result.returncode == 0 and result.stdout.strip() == f"tpfleet {tpfleet.__version__}"


# --- interrupts ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_serve_interrupted_while_starting_stops_cleanly(sig, tiny_model):
    """For serve, Ctrl-C and SIGTERM are the way to stop it, at any stage: exit code 0, no traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "tpfleet", "serve", "--model", str(tiny_model), "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = proc.stdout.readline()  # the "starting" phase: before the engine's imports and weights
    assert "starting" in first, first
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, (proc.returncode, out, err)
    assert "Traceback" not in err, err


def test_ctrl_c_while_the_ranks_import_stops_cleanly(tiny_model):
    """A Ctrl-C in the terminal reaches the whole process group, ranks still importing included: they
    must ignore it (the server stops them), not die of it and be reported as a crashed rank."""
    proc = subprocess.Popen([sys.executable, "-m", "tpfleet", "serve", "--model", str(tiny_model), "--device", "cpu",
                             "--tp-size", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    lines = []
    while not any("ranks_started" in line for line in lines):
        lines.append(proc.stdout.readline())
        assert lines[-1], lines
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, (proc.returncode, out, err)
    assert "rank 1" not in err and "Traceback" not in err, err


def test_interrupts_during_imports_are_raised_once_the_imports_are_done():
    """A signal inside `interrupts_deferred` is noted, not raised there (an interrupt inside a library's
    import can turn into another error or abort the interpreter); leaving the block raises it, and the
    handlers before are back."""
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    reached_end = False
    with pytest.raises(KeyboardInterrupt):
        with interrupts_deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # the handlers have run by now
            reached_end = True
    assert reached_end
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    with interrupts_deferred():  # no signal: nothing raised
        pass


def test_an_interrupt_at_any_other_stage_exits_130_in_one_line(monkeypatch, capsys):
    from tpfleet import cli

    def interrupted(args):
        raise KeyboardInterrupt

    for name in (*env.MULTICAST_OFF, *env.HUB_OFFLINE):
        monkeypatch.delenv(name, raising=False)  # whatever main() sets is undone after the test
    monkeypatch.setattr(cli, "run_command", interrupted)
    sigterm_handler = signal.getsignal(signal.SIGTERM)
    try:
        assert cli.main(["doctor"]) == 130
    finally:
        signal.signal(signal.SIGTERM, sigterm_handler)
    assert capsys.readouterr().err == "interrupted\n"


def test_dummy_load_format_runs_a_model_from_its_config_alone(tmp_path):
    """`make-model --no-weights` writes config and tokenizer only; `--load-format dummy` serves its
    shapes with random weights, deterministically per seed, and only with that format is a checkpoint
    without weights accepted."""
    from tpfleet.engine.llm_engine import LLMEngine
    from tpfleet.engine.sequence import SamplingParams
    from tpfleet.model.make_model import make_model

    shapes = make_model("tiny-moe", tmp_path / "shapes", weights=False)
    assert not list(shapes.glob("*.safetensors"))
    with pytest.raises(ValueError, match="no \\*.safetensors"):
        check_checkpoint_dir(str(shapes))
    check_checkpoint_dir(str(shapes), "dummy")
    with pytest.raises(ValueError, match="load_format must be 'auto' or 'dummy'"):
        EngineConfig(model=str(shapes), load_format="random")

    def greedy(seed: int) -> list[int]:
        engine = LLMEngine(EngineConfig(model=str(shapes), load_format="dummy", seed=seed, kv_cache_tokens=512))
        try:
            seq = engine.add_request([1, 2, 3, 4], SamplingParams(max_new_tokens=6, temperature=0.0, ignore_eos=True))
            while engine.has_work():
                engine.step()
            norms = [p for n, p in engine.runner.model.named_parameters() if n.endswith("norm.weight")]
            assert all(bool((p == 1).all()) for p in norms)
            return seq.completion_ids
        finally:
            engine.shutdown()

    assert greedy(0) == greedy(0) and len(greedy(0)) == 6


def test_make_model_cli_writes_shapes_only(tmp_path):
    run = subprocess.run([sys.executable, "-m", "tpfleet.cli", "make-model", "--preset", "tiny", "--no-weights",
                          "--out", str(tmp_path / "m")], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "config and tokenizer" in run.stdout, run.stderr[-2000:]
    assert (tmp_path / "m" / "config.json").is_file() and not list((tmp_path / "m").glob("*.safetensors"))
