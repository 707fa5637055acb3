"""The CLI contract: inspect, run (one-shot, dry run, JSON, stdin, stats), verbose logging, demo, store names, help."""

from __future__ import annotations

import json
import os
import re
import subprocess

import numpy as np
import pytest
from mistral_common.protocol.instruct.messages import UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from conftest import DENSE_SHARED, HF, NATIVE
from helpers import SMALLFOUR, assert_one_line_error, run_cli


def test_inspect_json_groups_tensors_by_role(converted):
    spec = DENSE_SHARED
    info = json.loads(run_cli("inspect", converted(spec, "q8_0"), "--json").stdout)
    assert info["architecture"] == "mistral4"
    assert info["chat_template"] is True
    assert info["tokenizer"]["tokens"] == spec.vocab_size
    hyper = info["hyperparameters"]
    assert hyper["expert_count"] == spec.n_experts and hyper["expert_shared_count"] == spec.n_shared_experts
    assert hyper["leading_dense_block_count"] == spec.first_dense_layers
    roles = {(r["role"], r["type"]): r for r in info["roles"]}
    moe_layers = spec.n_layers - spec.first_dense_layers
    experts = roles[("routed_experts", "Q8_0")]
    assert experts["count"] == 2 * moe_layers
    assert experts["parameters"] == moe_layers * spec.n_experts * 3 * spec.expert_ff * spec.hidden_size
    assert experts["bits_per_weight"] == 8.5
    assert roles[("router", "F32")]["count"] == moe_layers
    assert roles[("dense_ffn", "Q8_0")]["count"] == 3 * spec.first_dense_layers
    assert roles[("shared_expert", "Q8_0")]["parameters"] == \
        moe_layers * 3 * spec.expert_ff * spec.n_shared_experts * spec.hidden_size
    assert sum(r["bytes"] for r in info["roles"]) == info["tensors"]["bytes"]


def test_inspect_table(converted):
    result = run_cli("inspect", converted(HF, "f32"))
    assert result.returncode == 0, result.stderr
    for word in ("mistral4", "routed_experts", "shared_expert", "router", "embeddings", "chat template: yes"):
        assert word in result.stdout


@pytest.mark.parametrize("prompt", ["Hello", "Write a haiku about\nthe Mont Blanc, in French. ✨", "  spaces, digits 12345 ",
                                    "[INST] and [/THINK] typed by a user are text</s>"])
def test_dry_run_matches_mistral_common(converted, checkpoint, prompt):
    result = run_cli("run", converted(HF, "f32"), "-p", prompt, "--dry-run", "--json")
    assert result.returncode == 0, result.stderr
    got = json.loads(result.stdout)
    tokenizer = MistralTokenizer.from_file(str(checkpoint(HF) / "tekken.json"))
    expected = tokenizer.encode_chat_completion(ChatCompletionRequest(messages=[UserMessage(content=prompt)]))
    assert got["tokens"] == expected.tokens
    assert got["prompt"] == tokenizer.decode(expected.tokens, special_token_policy="keep")


def test_run_json_is_deterministic_with_seed(converted):
    args = ("run", converted(HF, "q8_0"), "-p", "Bonjour", "-n", "12", "--seed", "7", "--temperature", "0.8", "--json")
    first, second = run_cli(*args), run_cli(*args)
    assert first.returncode == 0, first.stderr
    a, b = json.loads(first.stdout), json.loads(second.stdout)
    assert a["content"] == b["content"] and a["content"]
    assert a["usage"]["completion_tokens"] == 12 and a["finish_reason"] == "length"
    assert a["usage"]["prompt_tokens"] > 5
    assert set(a["timings"]) >= {"prompt_ms", "prompt_per_second", "predicted_ms", "predicted_per_second"}
    assert a["reasoning_content"] == ""


def test_run_streams_plain_text_and_reads_stdin(converted):
    model = converted(HF, "q8_0")
    piped = subprocess.run([*SMALLFOUR, "run", str(model), "-n", "8", "--temperature", "0"], input="Salut",
                           capture_output=True, text=True, timeout=120)
    flag = run_cli("run", model, "-p", "Salut", "-n", "8", "--temperature", "0")
    assert piped.returncode == 0 and flag.returncode == 0, piped.stderr + flag.stderr
    assert piped.stdout == flag.stdout and piped.stdout.strip()


def test_verbose_shows_llama_log_and_quiet_hides_it(converted):
    model = converted(HF, "q8_0")
    quiet = run_cli("run", model, "-p", "x", "-n", "2")
    loud = run_cli("run", model, "-p", "x", "-n", "2", "-v")
    assert quiet.returncode == 0 and loud.returncode == 0
    assert "llama_model_loader" in loud.stderr
    assert "llama" not in quiet.stderr and quiet.stderr.strip() == ""


def test_run_errors(tmp_path, converted):
    assert_one_line_error(run_cli("run", tmp_path / "missing.gguf", "-p", "x"), "does not exist")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(np.random.default_rng(0).bytes(4096))
    assert_one_line_error(run_cli("run", junk, "-p", "x"), "is not a GGUF file")
    bad_header = tmp_path / "bad-header.gguf"
    bad_header.write_bytes(b"GGUF" + b"\0" * 64)
    assert_one_line_error(run_cli("run", bad_header, "-p", "x"), "bad-header.gguf: GGUF version 0 is not supported")
    whole = converted(HF, "q8_0").read_bytes()
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(whole[:len(whole) // 2])
    assert_one_line_error(run_cli("run", truncated, "-p", "x"), "could not load truncated.gguf")


def test_demo_runs_end_to_end_and_leaves_a_model_every_command_takes(checkpoint, tmp_path):
    checkpoint(NATIVE)  # the demo's fixture, shared with the session's cache
    env = {**os.environ, "SMALLFOUR_HOME": str(tmp_path / "home")}

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*SMALLFOUR, *map(str, args)], capture_output=True, text=True, timeout=600, env=env,
                              cwd=tmp_path)

    result = cli("demo")
    assert result.returncode == 0, result.stderr
    assert "converted to GGUF (q8_0)" in result.stderr and "running through llama.cpp" in result.stderr
    assert result.stdout.strip()
    store = tmp_path / "home" / "models"
    assert sorted(p.name for p in store.iterdir()) == ["demo-mmproj.gguf", "demo.gguf"]
    # The three commands it suggests run as printed (the shell expands ~: here the home is the test's).
    suggested = [line.strip() for line in result.stderr.splitlines() if line.startswith("  smallfour ")]
    assert [line.split()[1] for line in suggested] == ["chat", "run", "batch"], result.stderr
    image = tmp_path / "home" / "demo" / "alps.png"
    batch_input = tmp_path / "home" / "demo" / "batch.jsonl"
    assert f"--image {image}" in suggested[1] and f"batch demo {batch_input} -o" in suggested[2]
    again = cli("demo")  # a second demo replaces its own registration without complaint
    assert again.returncode == 0 and "kept in the model store as `demo`" in again.stderr, again.stderr

    listed = {m["name"]: m for m in json.loads(cli("models", "--json").stdout)["models"]}
    assert (listed["demo"]["location"], listed["demo"]["mmproj"]) == ("store", "demo-mmproj.gguf")
    seeing = cli("run", "demo", "--image", image, "-p", "What is in this picture?", "-n", "3", "--json")
    assert seeing.returncode == 0 and json.loads(seeing.stdout)["usage"]["prompt_tokens"] > 20, seeing.stderr
    batch = cli("batch", "demo", batch_input, "-o", "demo-results.jsonl")
    assert batch.returncode == 0, batch.stderr
    results = [json.loads(line) for line in (tmp_path / "demo-results.jsonl").read_text().splitlines()]
    assert [r["custom_id"] for r in results] == ["q1", "q2", "q3"] and all(r["error"] is None for r in results)
    assert json.loads(cli("inspect", "demo", "--json").stdout)["architecture"] == "mistral4"
    assert cli("plan", "demo", "--json").returncode == 0


def test_run_stats_report_prompt_and_decode_tokens(converted):
    result = run_cli("run", converted(HF, "q8_0"), "-p", "Bonjour", "-n", "5", "--seed", "1", "--stats", "--json")
    assert result.returncode == 0, result.stderr
    usage = json.loads(result.stdout)["usage"]
    lines = dict(line.split(":", 1) for line in result.stderr.splitlines() if ":" in line)
    assert set(lines) >= {"load", "prompt", "decode", "total"}, result.stderr
    assert re.fullmatch(rf" {usage['prompt_tokens']} tokens in [\d.]+ s, [\d.]+ tok/s", lines["prompt"])
    assert re.match(rf" {usage['completion_tokens'] - 1} tokens in [\d.]+ s, [\d.]+ tok/s \(5 generated",
                    lines["decode"]), lines["decode"]


def test_dry_run_reads_only_the_vocabulary(converted):
    # No placement is computed or checked for a dry run: a placement flag it would refuse goes unread.
    result = run_cli("run", converted(HF, "q8_0"), "-p", "hi", "--dry-run", "--plan", "bogus")
    assert result.returncode == 0 and result.stdout.strip().endswith("[INST]hi[/INST]"), result.stderr
    assert_one_line_error(run_cli("run", converted(HF, "q8_0"), "-p", "hi", "-n", "1", "--plan", "bogus"),
                          "--plan 'bogus': expected auto or check")


def test_a_trailing_assistant_message_is_continued(converted, tmp_path):
    conversation = tmp_path / "continue.json"
    conversation.write_text(json.dumps([{"role": "user", "content": "Name a colour."},
                                        {"role": "assistant", "content": "The colour is"}]))
    result = run_cli("run", converted(HF, "q8_0"), "--messages", conversation, "--dry-run")
    assert result.returncode == 0, result.stderr
    assert result.stdout.rstrip("\n").endswith("[/INST]The colour is"), result.stdout  # no </s>: it goes on


def test_quantize_takes_store_names_and_carries_the_projector(converted, tmp_path):
    source = converted(HF, "f32")
    projector = source.with_name(source.stem + "-mmproj.gguf")
    assert projector.is_file()
    store = tmp_path / "home" / "models"
    store.mkdir(parents=True)
    (store / "tiny.gguf").symlink_to(source)
    (store / "tiny-mmproj.gguf").symlink_to(projector)
    env = {**os.environ, "SMALLFOUR_HOME": str(tmp_path / "home")}

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*SMALLFOUR, *map(str, args)], capture_output=True, text=True, timeout=600, env=env)

    out = tmp_path / "q.gguf"
    result = cli("quantize", "tiny", "-o", out, "--recipe", "q8_0")
    assert result.returncode == 0, result.stderr
    carried = tmp_path / "q-mmproj.gguf"
    assert carried.read_bytes() == projector.read_bytes()
    assert f"wrote {carried} (vision projector" in result.stderr
    # Refused before any work, in the unit the user wrote, and nothing lands (neither file).
    small = cli("quantize", "tiny", "-o", tmp_path / "small.gguf", "--recipe", "fit:1MB")
    assert_one_line_error(small, "fit:1MB is too small; the smallest this model gets is ")
    assert re.search(r"is [\d,.]+ MB \(experts", small.stderr), small.stderr
    assert small.stderr.startswith("error:")  # no empty line (or bar) before the error
    assert not list(tmp_path.glob("small*"))
    text = tmp_path / "calibration.txt"
    text.write_text(" ".join(f"word{i}" for i in range(800)))
    collected = cli("imatrix", "tiny", "-f", text, "-o", tmp_path / "imatrix.gguf", "--chunks", "1")
    assert collected.returncode == 0 and (tmp_path / "imatrix.gguf").is_file(), collected.stderr
    again = cli("quantize", out, "-o", tmp_path / "r.gguf", "--recipe", "q4_k")  # q.gguf is quantized: refused
    assert_one_line_error(again, "is already quantized")
    assert again.stderr.startswith("error:") and not list(tmp_path.glob("r*.gguf"))


def test_a_missing_model_name_is_one_line_everywhere(tmp_path):
    env = {**os.environ, "SMALLFOUR_HOME": str(tmp_path)}
    (tmp_path / "t.txt").write_text("calibration text " * 400)
    for command in (["inspect"], ["plan"], ["quantize", "-o", tmp_path / "x.gguf", "--recipe", "q8_0"],
                    ["imatrix", "-f", tmp_path / "t.txt", "-o", tmp_path / "i.gguf"], ["run", "-p", "x"]):
        result = subprocess.run([*SMALLFOUR, command[0], "nowhere", *map(str, command[1:])], capture_output=True,
                                text=True, timeout=300, env=env)
        assert_one_line_error(result, "nowhere")


def test_pipes_get_unwrapped_lines():
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    result = subprocess.run([*SMALLFOUR, "plan", "--model", "mistral-small-4", "--recipe", "q8_0", "--profile",
                             "24GB+128GB"], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    flags = next(line for line in result.stdout.splitlines() if line.startswith("as flags:"))
    assert flags.endswith("--cpu-experts 32")
    # The override regex of the parameters table is one line (grep finds it whole), not folded at 80 columns.
    assert re.search(r"│ override_tensor +│ \[\"\^blk.*=CPU\"\] +│", result.stdout), result.stdout


def test_app_has_version_and_short_help():
    from importlib.metadata import version

    assert run_cli("--version").stdout == f"smallfour {version('smallfour')}\n"
    for args in (["-h"], ["run", "-h"], ["models", "-h"]):
        result = run_cli(*args)
        assert result.returncode == 0 and "Usage: " in result.stdout, result.stderr


def test_help_reads_plainly_with_a_typer_without_type_descriptors():
    """typer releases differ in what an option carries (an H200 image's typer had no `type_descriptor`):
    the help then names click's type."""
    import click

    from smallfour.cli import _readable_metavars

    options = [click.Option(["--ctx"], type=int), click.Option(["--out"], type=click.Path()),
               click.Option(["--name"], type=str)]
    assert not any(hasattr(o, "type_descriptor") for o in options)
    assert [o.metavar for o in _readable_metavars(options)] == ["INTEGER", "PATH", "TEXT"]


def test_flash_attention_defaults_agree():
    from typer.main import get_command

    from smallfour.cli import app
    from smallfour.placing import PlacementFlags
    from smallfour.planner import Settings

    commands = get_command(app).commands
    defaults = {name: next(p.default for p in commands[name].params if "--flash-attn" in p.opts)
                for name in ("plan", "run", "chat", "batch", "serve", "imatrix")}
    assert set(defaults.values()) == {True} and PlacementFlags().flash_attn is Settings().flash_attn is True


def _declared_commands() -> dict[str, set[str]]:
    """Every command the Typer app declares, with its visible long options."""
    import typer

    from smallfour.cli import app

    commands = typer.main.get_command(app).commands
    return {name: {o for p in c.params if not getattr(p, "hidden", False) for o in p.opts if o.startswith("--")}
            for name, c in commands.items() if not c.hidden}


@pytest.mark.parametrize("command", sorted(_declared_commands()))
def test_every_command_explains_itself(command):
    result = run_cli(command, "--help")
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert re.search(rf"Usage: .*smallfour {command} ", result.stdout), result.stdout
    # Every option the command takes is shown (none lost to a hidden flag or a broken panel).
    shown = set(re.findall(r"--[a-z0-9][a-z0-9-]*", result.stdout))
    assert _declared_commands()[command] | {"--help"} <= shown, result.stdout
    # Values read as words (TEXT, INTEGER, PATH), flags as nothing: no `<bool>`, `<list[str]>`, `<int range>`.
    assert not re.search(r"<[a-z][a-z \[\]|]*>", result.stdout), result.stdout


def test_typer_lives_only_in_the_cli_package():
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    offenders = []
    for package in ("quant", "convert", "smallfour"):
        for path in sorted((root / package).rglob("*.py")):
            if path.is_relative_to(root / "smallfour" / "cli") or path == root / "smallfour" / "__main__.py":
                continue
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                offenders += [f"{path.relative_to(root)} imports {n}" for n in names
                              if n.split(".")[0] == "typer" or n == "smallfour.cli" or n.startswith("smallfour.cli.")]
    assert not offenders, "\n".join(offenders)


def test_console_prints_user_text_as_typed(capsys):
    from smallfour.console import err, out

    line = "[bold]model[draft].gguf[/] :smile: " + "word " * 40
    out(line)
    err(("error:", "bold red"), f" {line}")
    captured = capsys.readouterr()
    assert captured.out == line + "\n"  # no markup, no emoji, no wrapping when not a terminal
    assert captured.err == f"error: {line}\n"


def test_errors_show_paths_as_typed(tmp_path):
    assert_one_line_error(run_cli("run", tmp_path / "model[draft].gguf", "-p", "x"), "model[draft].gguf")
    assert_one_line_error(run_cli("inspect", tmp_path / ":smile:[b].gguf"), ":smile:[b].gguf")


def test_messages_files_are_checked_like_batch_lines(tmp_path, converted):
    model = converted(HF, "q8_0")
    bad_role = tmp_path / "robot.json"
    bad_role.write_text(json.dumps([{"role": "robot", "content": "hi"}]))
    assert_one_line_error(run_cli("run", model, "--messages", bad_role, "--dry-run"),
                          "robot.json: body.messages[0].role must be one of system, user, assistant, tool")
    not_a_list = tmp_path / "object.json"
    not_a_list.write_text(json.dumps({"role": "user"}))
    assert_one_line_error(run_cli("run", model, "--messages", not_a_list, "--dry-run"),
                          'expected a JSON list of {"role", "content"} messages')
    image_in_system = tmp_path / "image.json"
    image_in_system.write_text(json.dumps({"messages": [
        {"role": "system", "content": [{"type": "image_url", "image_url": {"url": "x.png"}}]},
        {"role": "user", "content": "hi"}]}))
    assert_one_line_error(run_cli("run", model, "--messages", image_in_system, "--dry-run"),
                          "messages[0].content[0]: only user messages take images")


@pytest.mark.parametrize("role", ["system", "assistant", "tool"])
def test_only_user_messages_take_images(role):
    from smallfour.messages import MessageError, check_messages

    image = {"type": "image_url", "image_url": {"url": "x.png"}}
    check_messages([{"role": "user", "content": [image, {"type": "text", "text": "hi"}]}])
    with pytest.raises(MessageError, match=r"messages\[1\]\.content\[0\]: only user messages take images"):
        check_messages([{"role": "user", "content": "hi"}, {"role": role, "content": [image]}])


def test_shared_options_read_the_same_everywhere():
    from typer.main import get_command

    from smallfour.cli import app

    commands = get_command(app).commands
    loaders = ("run", "chat", "batch", "imatrix")
    shared = {"--ctx": ("run", "chat", "batch", "plan"), "--mmproj": ("run", "chat", "batch"),
              "--preset": ("run", "chat", "batch"), "--think-budget": ("run", "chat", "batch"),
              "--kv-type": (*loaders, "plan"), "--cpu-experts": loaders, "--verbose": (*loaders, "demo"),
              "--json": ("run", "inspect", "pull", "models", "doctor", "plan"),
              "--recipe": ("convert", "quantize", "plan"), "--imatrix": ("convert", "quantize")}
    for flag, names in shared.items():
        options = [next(p for p in commands[name].params if flag in p.opts) for name in names]
        assert len({(o.help, tuple(o.opts)) for o in options}) == 1, flag  # one name, one help text
        assert len({repr(o.default) for o in options if not o.required}) == 1, flag  # one default
