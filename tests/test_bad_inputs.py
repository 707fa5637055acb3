"""Bad input of every kind through the real CLI: never a traceback, always a documented exit code and one line.

One table of cases (docs/troubleshooting.md lists the exit codes: 0 ok, 1 an error line, 2 a usage error
from the option parser, 130 Ctrl-C, 143 SIGTERM). Each case builds its files in a fresh directory, runs
`smallfour` as a user would, and states the exit code, a fragment of the `error:` line and, where the
case is about files, what must (not) be left on disk. The classes the hardening issue named each have
a variant here beyond the reported one: markup in any user string, any wrongly typed recipe value, any
path that leaves a batch file's directory, any non-raster image format.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import struct
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from conftest import HF, build_fixture
from helpers import SMALLFOUR, line_error

EXIT_CODES = {0, 1, 2, 130, 143}


@dataclass
class Case:
    id: str
    args: Callable[[Path, Path], list[str]]  # (work dir, model) → argv after `smallfour`
    fragment: str  # in the one error line (or, for exit 0, in the output)
    code: int = 1
    setup: Callable[[Path], None] = lambda d: None
    absent: tuple[str, ...] = ()  # paths (relative to the work dir) that must not exist afterwards
    hidden: tuple[str, ...] = ()  # strings the output must not reveal
    stdin: str | None = None
    check: Callable[[Path], None] = field(default=lambda d: None)


def write(name: str, data: str | bytes) -> Callable[[Path], None]:
    def setup(directory: Path) -> None:
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return setup


def eps_bytes() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "EPS")
    return buffer.getvalue()


def batch_line(url: str) -> str:
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Describe."},
                                                      {"type": "image_url", "image_url": {"url": url}}]}],
            "max_tokens": 2}
    return json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": body}) + "\n"


def batch_error(directory: Path) -> str:
    lines = (directory / "out.jsonl").read_text().splitlines()
    assert len(lines) == 1, lines
    return line_error(json.loads(lines[0]))["message"]


def batch_case(id: str, url: str, fragment: str, hidden: tuple[str, ...] = (), extra_setup=None) -> Case:
    """A batch line whose image the policy refuses: exit 0, an error line in OUTPUT naming the reason."""
    def setup(directory: Path) -> None:
        (directory / "jobs").mkdir()
        (directory / "jobs" / "in.jsonl").write_text(batch_line(url))
        (directory / "secret.png").write_bytes(b"\x89PNG\r\n\x1a\n")  # outside the input's directory
        if extra_setup:
            extra_setup(directory)

    def check(directory: Path) -> None:
        message = batch_error(directory)
        assert fragment in message, message
        for secret in hidden:
            assert secret not in message, message
        assert str(directory) not in message, message  # never the resolved path

    return Case(id, lambda d, m: ["batch", m, d / "jobs" / "in.jsonl", "-o", d / "out.jsonl"], "requests done",
                code=0, setup=setup, check=check)


def recipe(id: str, toml: str | bytes, fragment: str) -> Case:
    return Case(id, lambda d, m: ["quantize", d / "in.gguf", "-o", d / "q.gguf", "--recipe", d / "r.toml"], fragment,
                setup=write("r.toml", toml), absent=("q.gguf",))


CASES = [
    # 10: user strings are printed literally, never as rich markup or emoji codes.
    Case("markup-model", lambda d, m: ["run", "x[/INST]", "-p", "hi"], "model file x[/INST] does not exist"),
    Case("markup-image", lambda d, m: ["run", m, "-p", "hi", "--image", "photo [draft].png"],
         "image file photo [draft].png does not exist"),
    Case("emoji-code", lambda d, m: ["run", m, "-p", "hi", "--image", ":smile:.png"], ":smile:.png"),
    Case("markup-recipe", lambda d, m: ["quantize", d / "in.gguf", "-o", d / "q.gguf", "--recipe", "fit:[bold]x"],
         "fit:[bold]x"),
    # 11/12: tracebacks and silent acceptance that became one line.
    Case("messages-not-utf8", lambda d, m: ["run", m, "--messages", d / "m.json"], "not UTF-8",
         setup=write("m.json", b'[{"role": "user", "content": "caf\xe9"}]')),
    Case("messages-content-123", lambda d, m: ["run", m, "--messages", d / "m.json"], "content must be a string",
         setup=write("m.json", '[{"role": "user", "content": 123}]')),
    Case("messages-empty-list", lambda d, m: ["run", m, "--messages", d / "m.json"], "non-empty list",
         setup=write("m.json", "[]")),
    Case("messages-null-content", lambda d, m: ["run", m, "--messages", d / "m.json"], "has no content",
         setup=write("m.json", '[{"role": "user", "content": null}]')),
    Case("empty-prompt", lambda d, m: ["run", m, "-p", "  "], "the prompt given with -p is empty"),
    Case("tensor-split-nan", lambda d, m: ["run", m, "-p", "hi", "--tensor-split", "nan,1"], "finite"),
    Case("tensor-split-inf", lambda d, m: ["run", m, "-p", "hi", "--tensor-split", "1,inf"], "finite"),
    Case("tensor-split-negative", lambda d, m: ["run", m, "-p", "hi", "--tensor-split", "-1,2"], "≥ 0"),
    Case("convert-no-tokenizer", lambda d, m: ["convert", d / "ck", "-o", d / "out.gguf"], "no tokenizer found in",
         setup=lambda d: shutil.copytree(build_fixture(HF), d / "ck", copy_function=os.symlink,
                                         ignore=shutil.ignore_patterns("tekken.json", "tokenizer.json")),
         absent=("out.gguf", "out-mmproj.gguf")),
    # 8: a config with 1 layer over weights of 2 (the fixture's files linked, config.json a changed copy).
    Case("convert-config-fewer-layers", lambda d, m: ["convert", d / "ck", "-o", d / "out.gguf"],
         "tensors its config does not account for",
         setup=lambda d: (shutil.copytree(build_fixture(HF), d / "ck", copy_function=os.symlink,
                                          ignore=shutil.ignore_patterns("config.json")),
                          (d / "ck" / "config.json").write_text((build_fixture(HF) / "config.json").read_text()
                                                                .replace('"num_hidden_layers": 2',
                                                                         '"num_hidden_layers": 1'))),
         absent=("out.gguf", "out-mmproj.gguf")),
    Case("truncated-gguf-inspect", lambda d, m: ["inspect", d / "cut.gguf"], "truncated"),
    Case("huge-tensor-count", lambda d, m: ["inspect", d / "huge.gguf"], "huge.gguf"),
    Case("huge-tensor-count-run", lambda d, m: ["run", d / "huge.gguf", "-p", "hi"], "huge.gguf"),
    # 5: only raster formats, told by content, whatever the name or data: URL says.
    Case("eps-as-png", lambda d, m: ["run", m, "-p", "hi", "--image", d / "photo.png"], "not an image in an accepted",
         setup=lambda d: (d / "photo.png").write_bytes(eps_bytes())),
    Case("pdf-as-jpg", lambda d, m: ["run", m, "-p", "hi", "--image", d / "photo.jpg"], "not an image in an accepted",
         setup=write("photo.jpg", b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n")),
    # 9: recipe schema, one line naming the key; ranges stay ranges.
    recipe("recipe-is-5", "recipe = 5\n", "[recipe] must be a table"),
    recipe("roles-is-string", '[recipe]\ndefault = "Q8_0"\nroles = "x"\n', "unknown key 'roles' in [recipe]"),
    recipe("roles-section-string", 'roles = "x"\n[recipe]\ndefault = "Q8_0"\n', "[roles] must be a table"),
    recipe("rules-numbers", '[recipe]\ndefault = "Q8_0"\nrules = [1, 2]\n', "unknown key 'rules'"),
    recipe("rules-top-numbers", 'rules = [1, 2]\n[recipe]\ndefault = "Q8_0"\n', "rule 1 must be a table"),
    recipe("pattern-is-5", '[recipe]\ndefault = "Q8_0"\n[[rules]]\npattern = 5\ntype = "Q8_0"\n',
           "rule 1 pattern must be a string"),
    recipe("default-is-bool", "[recipe]\ndefault = true\n", "[recipe] default must be a string, not a boolean"),
    recipe("unknown-recipe-key", '[recipe]\ndefault = "Q8_0"\nfallback = "F16"\n', "unknown key 'fallback'"),
    recipe("recipe-not-utf8", b'[recipe]\ndefault = "Q8_0"\nname = "\xff"\n', "not UTF-8"),
    recipe("backwards-range", '[recipe]\ndefault = "Q8_0"\n[[rules]]\nlayers = "5-2"\ntype = "Q8_0"\n',
           "ends before it starts"),
    # 1: outputs that are one file or an input.
    Case("quantize-onto-itself", lambda d, m: ["quantize", d / "in.gguf", "-o", d / "sub" / ".." / "in.gguf",
                                               "--recipe", "q8_0", "--force"], "is the input",
         setup=lambda d: (d / "sub").mkdir()),
    Case("batch-output-is-model", lambda d, m: ["batch", d / "model.gguf", d / "in.jsonl", "-o", d / "model.gguf"],
         "is the input", setup=write("in.jsonl", batch_line("data:,"))),
    # 6: batch image paths stay under the input's directory; http(s) is never fetched.
    batch_case("batch-dotdot", "../secret.png", "outside the directories"),
    batch_case("batch-absolute", "/etc/passwd", "outside the directories", hidden=("root",)),
    batch_case("batch-missing-outside", "/nonexistent/x.png", "outside the directories"),
    batch_case("batch-home", "~/x.png", "does not exist", hidden=(str(Path.home()),)),
    batch_case("batch-file-url", "file:///etc/hostname", "outside the directories"),
    batch_case("batch-http", "https://example.com/cat.png", "never fetched"),
    batch_case("batch-symlink-out", "link.png", "outside the directories",
               extra_setup=lambda d: (d / "jobs" / "link.png").symlink_to(d / "secret.png")),
    # Engine, threads, server and scale options: usage errors (2) or one line, never a traceback.
    Case("batch-parallel-zero", lambda d, m: ["batch", m, d / "in.jsonl", "-o", d / "out.jsonl", "--parallel", "0"],
         "--parallel", code=2, setup=write("in.jsonl", batch_line("data:,")), absent=("out.jsonl",)),
    Case("batch-parallel-too-many", lambda d, m: ["batch", m, d / "in.jsonl", "-o", d / "out.jsonl",
                                                  "--parallel", "1000"], "llama.cpp handles 1 to",
         setup=write("in.jsonl", batch_line("data:,"))),
    # RPC workers, the offline bundle, the GPU self-check.
    Case("rpc-not-an-endpoint", lambda d, m: ["run", m, "-p", "hi", "--rpc", "nonsense"], "expected HOST:PORT"),
    Case("rpc-refused", lambda d, m: ["run", m, "-p", "hi", "--rpc", "127.0.0.1:1"], "cannot reach worker 127.0.0.1:1"),
    Case("plan-rpc-size", lambda d, m: ["plan", m, "--rpc", "127.0.0.1:1=abc"], "as a memory size"),
    Case("worker-open-host", lambda d, m: ["worker", "--host", "0.0.0.0"], "add --allow-remote"),
    Case("worker-port-range", lambda d, m: ["worker", "--port", "70000"], "--port", code=2),
    Case("bundle-python-version", lambda d, m: ["bundle", d / "b", "--python-version", "abc"], "give it as X.Y",
         absent=("b",)),
    Case("bundle-existing-dir", lambda d, m: ["bundle", d], "give a new directory"),
    Case("check-gpu-without-gpu", lambda d, m: ["doctor", "--check-gpu"], "llama.cpp sees no GPU"),
    Case("run-threads-zero", lambda d, m: ["run", m, "-p", "hi", "--threads", "0"], "--threads", code=2),
    Case("run-threads-batch-word", lambda d, m: ["run", m, "-p", "hi", "--threads-batch", "abc"], "--threads-batch",
         code=2),
    Case("serve-port-out-of-range", lambda d, m: ["serve", m, "--port", "99999"], "--port", code=2),
    Case("serve-parallel-zero", lambda d, m: ["serve", m, "--parallel", "0"], "--parallel", code=2),
    Case("plan-unknown-engine", lambda d, m: ["plan", "--engine", "tpu", "--profile", "4xH100"], "unknown engine"),
    batch_case("batch-eps-data-url", "data:image/png;base64," + base64.b64encode(b"%!PS-Adobe-3.0 EPSF-3.0\n")
               .decode(), "not an image in an accepted"),
]


@pytest.fixture(scope="module")
def model(converted) -> Path:
    return converted(HF, "q8_0")


def _prepare(directory: Path, model: Path, converted) -> None:
    """Files several cases share: an f32 GGUF to quantize, a truncated one, one claiming 2^63-1 tensors."""
    source = converted(HF, "f32")
    (directory / "in.gguf").symlink_to(source)
    (directory / "model.gguf").symlink_to(model)
    (directory / "model-mmproj.gguf").symlink_to(model.with_name(model.stem + "-mmproj.gguf"))
    data = model.read_bytes()
    (directory / "cut.gguf").write_bytes(data[: len(data) // 3])
    (directory / "huge.gguf").write_bytes(data[:8] + struct.pack("<Q", 2**63 - 1) + data[16:4096])


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, model, converted, tmp_path):
    _prepare(tmp_path, model, converted)
    case.setup(tmp_path)
    argv = [*SMALLFOUR, *map(str, case.args(tmp_path, tmp_path / "model.gguf"))]
    result = subprocess.run(argv, input=case.stdin or "", capture_output=True, text=True, cwd=tmp_path, timeout=300)
    output = result.stdout + result.stderr
    assert "Traceback (most recent call last)" not in output, output
    assert result.returncode in EXIT_CODES and result.returncode == case.code, output
    if case.code == 1:
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, output
        assert case.fragment in errors[0], errors[0]
    else:
        assert case.fragment in output, output
    for hidden in case.hidden:
        assert hidden not in result.stderr, result.stderr
    for name in case.absent:
        assert not (tmp_path / name).exists(), name
    assert not list(tmp_path.glob(".*.partial")), "a partial output was left"
    case.check(tmp_path)


def test_hostile_hub_names_and_hashes_touch_no_disk(hub, env, tmp_path):
    """A Hub that lists `../` names or a non-hash ETag: refused in one line before anything is written."""
    from hub_stub import _describe

    for repo, name, etag in (("acme/dotdot", "../../escaped.json", None), ("acme/etag", "config.json", "../../x")):
        commit = hub.add_commit(repo, {"config.json": b"{}"})
        files = hub.repos[repo].commits[commit]
        del files["config.json"]
        files[name] = _describe(name, b"{}")
        if etag is not None:
            files[name].git_sha1 = etag
        result = subprocess.run([*SMALLFOUR, "pull", repo], capture_output=True, text=True, env=env, timeout=120)
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "refusing to download" in errors[0], result.stderr
    leaked = [p for p in tmp_path.rglob("*") if p.name in ("escaped.json", "x", "x.lock", "x.incomplete")]
    assert not leaked, leaked
    assert not list(tmp_path.parent.glob("escaped.json"))
