"""Several machines through llama.cpp's RPC backend, on loopback: `smallfour worker` processes and `--rpc` clients.

The worker is built once from the pinned llama-cpp-python sources into `.cache/rpc/` (keyed by version and
cmake flags, like the fixture checkpoints) and every test runs it through the real CLI.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import HF, REPO
from helpers import assert_one_line_error

RPC_CACHE = REPO / ".cache" / "rpc"
SDIST = REPO / ".cache" / "sdist"
PROMPT = ["-p", "Name three rivers.", "--temperature", "0", "--seed", "7"]


@pytest.fixture(scope="session")
def rpc_build():
    """The worker build in the repository's cache (built here the first time: minutes)."""
    from smallfour import rpc

    version = rpc.llama_cpp_version()
    unpacked = SDIST / f"llama_cpp_python-{version}"
    sources = RPC_CACHE / "src" / unpacked.name
    if unpacked.exists() and not sources.exists():  # the sdist bench/throughput.py unpacked: no second download
        sources.parent.mkdir(parents=True, exist_ok=True)
        sources.symlink_to(unpacked.resolve())
    return rpc.ensure_worker_build(root=RPC_CACHE, quiet=True)


@pytest.fixture
def home(tmp_path, rpc_build):
    """An environment whose $SMALLFOUR_HOME holds the cached build, as if `smallfour worker` had built it there."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "rpc").symlink_to(RPC_CACHE.resolve())
    return os.environ | {"SMALLFOUR_HOME": str(home), "PYTHONUNBUFFERED": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def workers(home, tmp_path):
    """`workers(n)` → n `smallfour worker` processes on loopback, ready; their endpoints and processes."""
    from smallfour.rpc import Endpoint, probe

    started: list[subprocess.Popen] = []

    def start(n: int) -> tuple[str, list[subprocess.Popen]]:
        ports = [free_port() for _ in range(n)]
        for port in ports:
            log = open(tmp_path / f"worker-{port}.log", "w")
            # Own session: a test kills the worker's whole group (the CLI and llama.cpp's server under it).
            started.append(subprocess.Popen([sys.executable, "-m", "smallfour", "worker", "--port", str(port),
                                             "--threads", "1"], env=home, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True))
        deadline = time.monotonic() + 60
        for port in ports:
            while True:
                try:
                    probe(Endpoint("127.0.0.1", port), timeout=2)
                    break
                except Exception:
                    assert time.monotonic() < deadline, (tmp_path / f"worker-{port}.log").read_text()
                    time.sleep(0.2)
        return ",".join(f"127.0.0.1:{p}" for p in ports), started[-n:]

    yield start
    for process in started:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def smallfour(env: dict, *args, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "smallfour", *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_two_workers_give_the_local_greedy_output(converted, home, workers):
    model = converted(HF, "f32")
    endpoints, _ = workers(2)
    local = smallfour(home, "run", model, *PROMPT, "-n", "24")
    remote = smallfour(home, "run", model, *PROMPT, "-n", "24", "--rpc", endpoints, "-v")
    assert local.returncode == 0 and remote.returncode == 0, remote.stderr
    assert remote.stdout == local.stdout and local.stdout.strip()
    # Every layer went to the workers, and each worker holds weights (only the input embeddings stay here).
    for device, endpoint in enumerate(endpoints.split(",")):
        assert f"using device RPC{device} ({endpoint})" in remote.stderr
        assert f"[{endpoint}] model buffer size" in remote.stderr
    assert f"offloaded {HF.n_layers + 1}/{HF.n_layers + 1} layers" in remote.stderr


def test_batch_and_plan_use_the_workers(converted, home, workers, tmp_path):
    model = converted(HF, "f32")
    endpoints, _ = workers(1)
    requests = tmp_path / "in.jsonl"
    requests.write_text('{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": '
                        '{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0}}\n')
    done = smallfour(home, "batch", model, requests, "-o", tmp_path / "out.jsonl", "--rpc", endpoints, "-v")
    assert done.returncode == 0, done.stderr
    assert f"using device RPC0 ({endpoints})" in done.stderr
    # Sizes as given: no worker is asked (127.0.0.1:1 has none). Both hold layers, the second one the output:
    # the hidden state (4096 f32) crosses into the first and between them, the logits (131072 f32) come back.
    planned = smallfour(home, "plan", "--model", "mistral-small-4", "--recipe", "q8_0", "--ram", "64GB", "--json",
                        "--rpc", f"{endpoints}=80GB,127.0.0.1:1=h100")
    assert planned.returncode == 0, planned.stderr
    result = json.loads(planned.stdout)
    assert [d["name"].split()[:2] for d in result["devices"][:2]] == [["RPC0", endpoints], ["RPC1", "127.0.0.1:1"]]
    assert result["devices"][1]["holds_output"] and result["devices"][0]["layers"]
    assert result["network_bytes_per_token"] == 2 * 4 * 4096 + 4 * 131072
    asked = smallfour(home, "plan", "--model", "mistral-small-4", "--recipe", "sf-q4", "--rpc", endpoints)
    assert f"RPC0 {endpoints}" in asked.stdout and "GiB free" in asked.stdout and "kB per generated token" in \
        asked.stdout, asked.stdout + asked.stderr


def test_serve_answers_through_a_worker(converted, home, workers, tmp_path):
    import urllib.request

    model = converted(HF, "f32")
    endpoints, _ = workers(1)
    port = free_port()
    log = open(tmp_path / "serve.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "smallfour", "serve", model, "--port", str(port), "--parallel",
                               "1", "--rpc", endpoints, "-v"], env=home, stdout=log, stderr=subprocess.STDOUT)
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                       "temperature": 0}).encode()
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", body,
                                                 {"Content-Type": "application/json"})
                with urllib.request.urlopen(request, timeout=60) as response:
                    answer = json.load(response)
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
                time.sleep(0.5)
    finally:
        server.terminate()
        server.wait(timeout=60)
    assert answer["usage"]["completion_tokens"] == 4
    assert f"using device RPC0 ({endpoints})" in (tmp_path / "serve.log").read_text()


def test_unreachable_endpoint_is_one_line_quickly(converted, home):
    model = converted(HF, "f32")
    closed = free_port()  # nothing listens there
    started = time.monotonic()
    result = smallfour(home, "run", model, "-p", "x", "-n", "1", "--rpc", f"127.0.0.1:{closed}", timeout=60)
    assert_one_line_error(result, f"127.0.0.1:{closed}")
    assert time.monotonic() - started < 30


def test_silent_endpoint_times_out(converted, home):
    """A port that accepts but never answers (not a worker, or one stuck) fails within the probe timeout."""
    model = converted(HF, "f32")
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        started = time.monotonic()
        result = smallfour(home, "run", model, "-p", "x", "-n", "1", "--rpc", f"127.0.0.1:{port}", timeout=60)
    assert_one_line_error(result, "did not answer")
    assert time.monotonic() - started < 30


def test_other_protocol_version_is_refused(converted, home):
    """A worker that answers HELLO with another major version: refused before llama.cpp would abort on it."""
    import threading

    model = converted(HF, "f32")
    with socket.socket() as fake:
        fake.bind(("127.0.0.1", 0))
        fake.listen()
        port = fake.getsockname()[1]

        def answer() -> None:
            conn, _ = fake.accept()
            with conn:
                conn.recv(1 + 8 + 24)
                conn.sendall((28).to_bytes(8, "little") + bytes([6, 1, 0, 0]) + bytes(24))

        threading.Thread(target=answer, daemon=True).start()
        result = smallfour(home, "run", model, "-p", "x", "-n", "1", "--rpc", f"127.0.0.1:{port}", timeout=60)
    assert_one_line_error(result, "6.1.0", "same smallfour")


def test_worker_killed_mid_generation_fails_in_bounded_time(converted, home, workers):
    model = converted(HF, "f32")
    endpoints, processes = workers(2)
    client = subprocess.Popen([sys.executable, "-m", "smallfour", "run", model, *PROMPT, "-n", "3000",
                               "--rpc", endpoints], env=home, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert client.stdout.read(1), client.stderr.read().decode()  # generating: the first text is out
        os.killpg(processes[1].pid, signal.SIGKILL)
        killed = time.monotonic()
        _, stderr = client.communicate(timeout=60)
    finally:
        if client.poll() is None:
            client.kill()
    assert time.monotonic() - killed < 30
    result = subprocess.CompletedProcess(client.args, client.returncode, "", stderr.decode())
    assert_one_line_error(result, f"worker {endpoints.split(',')[1]} is gone")
    assert "Traceback" not in result.stderr and "core dumped" not in result.stderr


def test_stalled_worker_fails_after_the_reply_timeout(converted, home, workers):
    """A worker that stops answering without closing its connection (stopped, or its host gone) ends the run."""
    model = converted(HF, "f32")
    endpoints, processes = workers(1)
    client = subprocess.Popen([sys.executable, "-m", "smallfour", "run", model, *PROMPT, "-n", "3000",
                               "--rpc", endpoints], env=home | {"SMALLFOUR_RPC_TIMEOUT": "3"},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert client.stdout.read(1), client.stderr.read().decode()
        os.killpg(processes[0].pid, signal.SIGSTOP)
        stopped = time.monotonic()
        _, stderr = client.communicate(timeout=60)
    finally:
        if client.poll() is None:
            client.kill()
        os.killpg(processes[0].pid, signal.SIGCONT)
    assert time.monotonic() - stopped < 20
    result = subprocess.CompletedProcess(client.args, client.returncode, "", stderr.decode())
    assert_one_line_error(result, f"worker {endpoints} stopped answering")


def test_worker_refuses_other_hosts_without_the_flag(home):
    result = smallfour(home, "worker", "--host", "0.0.0.0", "--port", str(free_port()), timeout=60)
    assert_one_line_error(result, "--allow-remote")


def test_worker_port_in_use_is_one_line(home):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = smallfour(home, "worker", "--port", str(taken.getsockname()[1]), timeout=60)
    assert_one_line_error(result, "cannot listen")


def test_worker_build_flags():
    from smallfour.rpc import RpcError, backend_flags

    assert backend_flags() == ("cpu", [])
    assert backend_flags("80;90") == ("cuda", ["-DGGML_CUDA=ON", "-DCMAKE_CUDA_ARCHITECTURES=80;90"])
    assert backend_flags("") == ("cuda", ["-DGGML_CUDA=ON", "-DCMAKE_CUDA_ARCHITECTURES=native"])
    assert backend_flags(metal=True) == ("metal", ["-DGGML_METAL=ON"])
    for bad in ({"cuda": "sm_89"}, {"cuda": "89", "metal": True}):
        with pytest.raises(RpcError):
            backend_flags(**bad)


def test_endpoint_syntax():
    from smallfour.rpc import Endpoint, RpcError, parse_endpoints

    assert parse_endpoints("10.0.0.2:50052,box:1") == [Endpoint("10.0.0.2", 50052), Endpoint("box", 1)]
    for bad in ("host", "host:", ":50052", "host:0", "host:x", "[::1]:50052", "a:1,a:1"):
        with pytest.raises(RpcError):
            parse_endpoints(bad)
