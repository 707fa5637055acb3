"""Other machines' devices through llama.cpp's RPC backend: the worker build, endpoint checks, the client.

- **Build.** llama-cpp-python's wheel leaves RPC off, so the worker (`ggml-rpc-server`) and the
  client library (`libggml-rpc.so`) are built once from the sources of the installed
  llama-cpp-python version into `$SMALLFOUR_HOME/rpc/<version>-<backend>-<hash>/`; the hash covers
  the version and the cmake flags, and a `complete` marker written last makes a build all or
  nothing. The backend is a dynamic library (`GGML_BACKEND_DL`) so the client library is one file
  that loads into the process beside the wheel's libggml.
- **Endpoints.** llama.cpp's client aborts the process on a refused connection and waits without a
  limit on a silent one, so every endpoint is checked here first, with a timeout: the HELLO
  handshake (protocol version), then the device count and memory that `plan` shows.
- **Client.** `libggml-rpc.so` is loaded through libllama's own ggml (`ggml_backend_load` resolved
  from the wheel), never through a second copy of libggml, whose backend registry would be one the
  model never sees. Each endpoint's devices are registered so llama.cpp's device list and the
  placement include them. A worker that dies later makes llama.cpp abort; ggml's abort callback
  turns that into one `error:` line and exit code 1 instead of a core dump.
"""

from __future__ import annotations

import ctypes
import fcntl
import functools
import hashlib
import importlib.metadata
import os
import re
import shutil
import socket
import stat
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from smallfour.errors import SmallfourError
from smallfour.store import smallfour_home

DEFAULT_PORT = 50052
LOOPBACK = "127.0.0.1"
# How long an endpoint may take to accept a connection and answer HELLO before it counts as unreachable.
PROBE_TIMEOUT_S = 5.0
# How long a loaded model waits for a worker's reply (a whole prompt batch computed on a slow worker stays
# well within it); `$SMALLFOUR_RPC_TIMEOUT` seconds when set.
REPLY_TIMEOUT_S = 300
# TCP keepalive on the workers' connections: a host that vanishes (power, cable) is noticed in about 25 s.
KEEPALIVE_IDLE_S, KEEPALIVE_INTERVAL_S, KEEPALIVE_COUNT = 10, 5, 3
GONE_GRACE_S = 2.0

# ggml-rpc's wire format (ggml/src/ggml-rpc/ggml-rpc.cpp and ggml/include/ggml-rpc.h of the pinned sources).
RPC_PROTO_MAJOR = 7
RPC_PROTO_MINOR = 0
CMD_GET_DEVICE_MEMORY = 11
CMD_HELLO = 14
CMD_DEVICE_COUNT = 15
CONN_CAPS_SIZE = 24


class RpcError(SmallfourError):
    """An RPC worker that cannot be built, reached or used."""


class WorkerBuildError(RpcError):
    """Building llama.cpp's RPC worker failed."""


# --- the build ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerBuild:
    """A complete build: the server binary and the client library, in `build/bin`."""

    root: Path

    @property
    def server(self) -> Path:
        return self.root / "build" / "bin" / "ggml-rpc-server"

    @property
    def client_library(self) -> Path:
        return self.root / "build" / "bin" / "libggml-rpc.so"

    @property
    def complete(self) -> bool:
        return (self.root / "complete").exists()


def llama_cpp_version() -> str:
    return importlib.metadata.version("llama_cpp_python")


def backend_flags(cuda: str | None = None, metal: bool = False) -> tuple[str, list[str]]:
    """(backend name, extra cmake flags) for a worker on the CPU, CUDA (`cuda` is an architecture list or
    "native"/"" for the build machine's own) or Metal."""
    if cuda is not None and metal:
        raise RpcError("choose one of --cuda and --metal")
    if cuda is not None:
        arch = cuda or "native"
        if not re.fullmatch(r"native|all|all-major|[0-9]+[a-z]?(?:[-;,][0-9]+[a-z]?)*", arch):
            raise RpcError(f"--cuda-arch takes CUDA architectures such as 89 or 80;90 (or native), not {arch!r}")
        return "cuda", ["-DGGML_CUDA=ON", f"-DCMAKE_CUDA_ARCHITECTURES={arch.replace(',', ';')}"]
    if metal:
        return "metal", ["-DGGML_METAL=ON"]
    return "cpu", []


def _build_dir(root: Path, backend: str, flags: list[str]) -> WorkerBuild:
    version = llama_cpp_version()
    key = hashlib.sha256(repr((version, backend, flags)).encode()).hexdigest()[:12]
    return WorkerBuild(root / f"{version}-{backend}-{key}")


def rpc_root() -> Path:
    return smallfour_home() / "rpc"


def find_build() -> WorkerBuild | None:
    """A complete build of the installed version, the CPU one first: any of them holds the client library."""
    version = llama_cpp_version()
    builds = sorted((WorkerBuild(d) for d in rpc_root().glob(f"{version}-*-*") if d.is_dir()),
                    key=lambda b: (not b.root.name.startswith(f"{version}-cpu-"), b.root.name))
    return next((b for b in builds if b.complete), None)


def ensure_worker_build(cuda: str | None = None, metal: bool = False, *, root: Path | None = None,
                        quiet: bool = False) -> WorkerBuild:
    """The worker build for this backend, built now if it is not there yet (minutes: progress on stderr)."""
    backend, flags = backend_flags(cuda, metal)
    root = root or rpc_root()
    build = _build_dir(root, backend, flags)
    if build.complete:
        return build
    build.root.mkdir(parents=True, exist_ok=True)
    with _locked(build.root / ".lock"):
        if not build.complete:  # another process may have finished it while this one waited
            _build(build, _sources(root), flags, backend, quiet)
    return build


@contextmanager
def _locked(path: Path):
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _sources(root: Path) -> Path:
    """llama.cpp as vendored by the installed llama-cpp-python's sdist (so the worker speaks the same protocol)."""
    version = llama_cpp_version()
    sdist = root / "src" / f"llama_cpp_python-{version}"
    if (sdist / "vendor" / "llama.cpp" / "CMakeLists.txt").exists():
        return sdist / "vendor" / "llama.cpp"
    sdist.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=sdist.parent) as tmp:
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                               f"llama-cpp-python=={version}", "-d", tmp], capture_output=True, text=True)
        archives = list(Path(tmp).glob("*.tar.gz"))
        if done.returncode != 0 or not archives:
            last = (done.stderr.strip().splitlines() or ["no archive"])[-1]
            raise WorkerBuildError(f"could not download llama-cpp-python {version}'s sources: {last}")
        with tarfile.open(archives[0]) as archive:
            archive.extractall(tmp, filter="data")
        os.replace(Path(tmp) / f"llama_cpp_python-{version}", sdist)
    return sdist / "vendor" / "llama.cpp"


_PERCENT = re.compile(r"^\[\s*(\d+)%\]")  # make's "[ 42%] Building …"
_STEP = re.compile(r"^\[(\d+)/(\d+)\]")  # ninja's "[12/80] …"


def _build(build: WorkerBuild, source: Path, flags: list[str], backend: str, quiet: bool) -> None:
    from smallfour.console import note, progress_bars

    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            raise WorkerBuildError(f"building the RPC worker needs {tool} on PATH (and a C++17 compiler)")
    directory = build.root / "build"
    log_path = build.root / "build.log"
    configure = ["cmake", "-S", str(source), "-B", str(directory), "-DCMAKE_BUILD_TYPE=Release",
                 "-DGGML_RPC=ON", "-DGGML_BACKEND_DL=ON", "-DGGML_NATIVE=OFF", "-DBUILD_SHARED_LIBS=ON",
                 "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                 "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", *flags]
    targets = ["ggml-rpc", "ggml-rpc-server", f"ggml-{backend}"]
    if backend != "cpu":
        targets.append("ggml-cpu")  # the worker also offers its CPU (and RAM) when asked with --device
    compile_ = ["cmake", "--build", str(directory), "--config", "Release", "-j", str(os.cpu_count() or 1),
                "--target", *targets]
    if not quiet:
        note(f"building llama.cpp's RPC worker ({backend}) into {build.root} — once, a few minutes")
    with open(log_path, "w") as log, progress_bars(transient=True) as bars:
        task = bars.add_task(f"building RPC worker ({backend})", total=100, visible=not quiet)
        # make builds the targets one after another, each counting 0-100 %; ninja counts all steps at once.
        target, last = 0, 0
        if shutil.which("stdbuf"):  # make block-buffers its progress lines into a pipe: a bar that jumps
            compile_ = ["stdbuf", "-oL", *compile_]
        for step, command in enumerate((configure, compile_)):
            log.write("$ " + " ".join(command) + "\n")
            log.flush()
            process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for line in process.stdout:
                log.write(line)
                if step == 1 and (m := _PERCENT.match(line)):
                    target += int(m.group(1)) < last
                    last = int(m.group(1))
                    bars.update(task, completed=(min(target, len(targets) - 1) * 100 + last) / len(targets))
                elif step == 1 and (m := _STEP.match(line)):
                    bars.update(task, completed=100 * int(m.group(1)) / int(m.group(2)))
            if process.wait() != 0:
                log.flush()
                raise WorkerBuildError(f"building the RPC worker failed ({'configure' if step == 0 else 'compile'}"
                                       f" step); the log is {log_path}")
    if not (build.server.exists() and build.client_library.exists()):
        raise WorkerBuildError(f"the RPC worker build left no {build.server.name} / {build.client_library.name};"
                               f" the log is {log_path}")
    (build.root / "complete").write_text(llama_cpp_version() + "\n")


# --- endpoints --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


def parse_endpoint(text: str, option: str = "--rpc") -> Endpoint:
    """HOST:PORT as llama.cpp reads it (the first colon splits, so IPv6 literals are refused)."""
    host, sep, port = text.strip().partition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536 or ":" in port or "[" in host:
        raise RpcError(f"{option} {text!r}: expected HOST:PORT, e.g. 192.168.1.20:{DEFAULT_PORT}")
    return Endpoint(host, int(port))


def parse_endpoints(text: str, option: str = "--rpc") -> list[Endpoint]:
    """HOST:PORT[,HOST:PORT…], each once."""
    endpoints = [parse_endpoint(part, option) for part in text.split(",")]
    if len(set(endpoints)) != len(endpoints):
        raise RpcError(f"{option} {text!r}: an endpoint is listed twice")
    return endpoints


@dataclass(frozen=True)
class WorkerInfo:
    """What a worker answered: its protocol version and each device's (free, total) memory in bytes."""

    endpoint: Endpoint
    version: tuple[int, int, int]
    memory: tuple[tuple[int, int], ...]


def probe(endpoint: Endpoint, timeout: float = PROBE_TIMEOUT_S) -> WorkerInfo:
    """Ask a worker for its version and devices, with a timeout; RpcError in one line when it cannot answer.

    The worker serves one client at a time, so this connection is closed before llama.cpp opens its own.
    """
    try:
        with socket.create_connection((endpoint.host, endpoint.port), timeout=timeout) as conn:
            conn.settimeout(timeout)
            reply = _call(conn, CMD_HELLO, bytes(CONN_CAPS_SIZE), endpoint)
            if len(reply) != 4 + CONN_CAPS_SIZE:
                raise RpcError(f"{endpoint} does not speak llama.cpp's RPC protocol (odd HELLO reply); "
                               "is it a smallfour worker?")
            version = tuple(reply[:3])
            if version[0] != RPC_PROTO_MAJOR or version[1] > RPC_PROTO_MINOR:
                raise RpcError(f"worker {endpoint} speaks RPC protocol {'.'.join(map(str, version))}, this "
                               f"client {RPC_PROTO_MAJOR}.{RPC_PROTO_MINOR}: run the same smallfour and "
                               f"llama-cpp-python ({llama_cpp_version()}) on both machines")
            (count,) = struct.unpack("<I", _call(conn, CMD_DEVICE_COUNT, b"", endpoint, 4))
            memory = tuple(struct.unpack("<QQ", _call(conn, CMD_GET_DEVICE_MEMORY, struct.pack("<I", i),
                                                      endpoint, 16)) for i in range(count))
    except socket.timeout:
        raise RpcError(f"worker {endpoint} did not answer within {timeout:g} s (down, firewalled, or serving "
                       "another client)") from None
    except OSError as exc:
        raise RpcError(f"cannot reach worker {endpoint}: {exc.strerror or exc}") from None
    if not memory:
        raise RpcError(f"worker {endpoint} offers no device")
    return WorkerInfo(endpoint, version, memory)


def _call(conn: socket.socket, command: int, payload: bytes, endpoint: Endpoint, expect: int | None = None) -> bytes:
    """One request (| cmd: u8 | size: u64 | payload |) and its reply (| size: u64 | data |)."""
    conn.sendall(struct.pack("<BQ", command, len(payload)) + payload)
    (size,) = struct.unpack("<Q", _receive(conn, 8, endpoint))
    if size > 1 << 16 or (expect is not None and size != expect):
        raise RpcError(f"{endpoint} does not speak llama.cpp's RPC protocol (reply of {size} bytes)")
    return _receive(conn, size, endpoint)


def _receive(conn: socket.socket, size: int, endpoint: Endpoint) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise RpcError(f"worker {endpoint} closed the connection during the handshake (another llama.cpp "
                           f"version? this client is RPC {RPC_PROTO_MAJOR}.{RPC_PROTO_MINOR}, llama-cpp-python "
                           f"{llama_cpp_version()})")
        data += chunk
    return data


# --- the client: workers' devices in this process -----------------------------------------------------

_attached: dict[Endpoint, WorkerInfo] = {}
_abort_callback = None  # kept referenced: ggml holds the C pointer for the process lifetime


def attach(endpoints: list[Endpoint]) -> list[WorkerInfo]:
    """Make the workers' devices llama.cpp devices of this process (named RPC0, RPC1, … in this order).

    Each endpoint is probed first (bounded time, one-line errors); llama.cpp then connects on its own.
    Attaching the same endpoint again is a no-op, so commands may call this freely.
    """
    infos = [_attached.get(e) or probe(e) for e in endpoints]
    fresh = [info for info in infos if info.endpoint not in _attached]
    if not fresh:
        return infos
    api = _client_api()
    _install_abort_callback(api)
    for info in fresh:
        add_server = api.rpc_add_server(str(info.endpoint).encode())
        if not add_server:
            raise RpcError(f"worker {info.endpoint} offers no device")
        api.ggml_backend_register(add_server)
        _attached[info.endpoint] = info
    return infos


def attached() -> list[Endpoint]:
    return list(_attached)


@functools.cache
def _client_api():
    """ggml's registry functions through libllama's handle, `libggml-rpc.so` loaded into that same registry.

    libggml-rpc.so needs libggml-base.so.0; the wheel's copy is already loaded under that soname, so
    the dynamic linker binds to it rather than to the build's own copy (checked below: one registry,
    one set of ggml globals, or the devices would be invisible to the model).
    """
    from llama_cpp import llama_cpp as bindings

    build = find_build() or ensure_worker_build()
    api = ctypes.CDLL(bindings._lib._name, handle=bindings._lib._handle)
    api.ggml_backend_load.argtypes, api.ggml_backend_load.restype = [ctypes.c_char_p], ctypes.c_void_p
    api.ggml_backend_reg_get_proc_address.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    api.ggml_backend_reg_get_proc_address.restype = ctypes.c_void_p
    api.ggml_backend_register.argtypes, api.ggml_backend_register.restype = [ctypes.c_void_p], None
    api.ggml_set_abort_callback.argtypes = [ctypes.c_void_p]
    api.ggml_set_abort_callback.restype = ctypes.c_void_p
    registry = api.ggml_backend_load(str(build.client_library).encode())
    if not registry:
        raise RpcError(f"llama.cpp could not load {build.client_library} (run with -v for its log)")
    bases = {line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines()
             if "libggml-base" in line} if Path("/proc/self/maps").exists() else set()
    if len({os.path.realpath(p) for p in bases}) > 1:
        raise RpcError(f"{build.client_library.name} loaded a second libggml-base ({', '.join(sorted(bases))}), "
                       f"whose devices llama.cpp would not see: {build.root} must be built from the installed "
                       f"llama-cpp-python's own version")
    address = api.ggml_backend_reg_get_proc_address(registry, b"ggml_backend_rpc_add_server")
    api.rpc_add_server = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_char_p)(address)
    return api


def reply_timeout() -> int:
    text = os.environ.get("SMALLFOUR_RPC_TIMEOUT", "")
    if not text:
        return REPLY_TIMEOUT_S
    if not text.isdigit() or int(text) < 1:
        raise RpcError(f"SMALLFOUR_RPC_TIMEOUT={text!r}: expected a whole number of seconds, at least 1")
    return int(text)


def bound_connections() -> int:
    """Put time limits on llama.cpp's open connections to the workers; how many it found.

    llama.cpp's client blocks in recv() for as long as a worker is silent. A receive timeout makes
    that recv fail, which llama.cpp treats as a lost worker (and `_install_abort_callback` reports);
    keepalive and TCP_USER_TIMEOUT catch a host that disappeared without closing the connection.
    The sockets are llama.cpp's, reached through /proc/self/fd (Linux): options set through a
    duplicate descriptor apply to the one socket both share. Call it once the context exists: the
    connections the model's buffers and backends hold are open by then.
    """
    if not _attached or not Path("/proc/self/fd").is_dir():
        return 0
    limit = reply_timeout()
    peers = set()
    for endpoint in _attached:
        try:
            peers |= {(info[4][0], endpoint.port) for info in socket.getaddrinfo(endpoint.host, endpoint.port,
                                                                                  type=socket.SOCK_STREAM)}
        except OSError:
            continue
    found = 0
    for entry in Path("/proc/self/fd").iterdir():
        try:
            fd = int(entry.name)
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
            with socket.socket(fileno=os.dup(fd)) as conn:
                if conn.type != socket.SOCK_STREAM or conn.family not in (socket.AF_INET, socket.AF_INET6) \
                        or conn.getpeername()[:2] not in peers:
                    continue
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", limit, 0))
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE_S)
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL_S)
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_COUNT)
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, 1000 * limit)
                found += 1
        except OSError:  # closed meanwhile, or not connected: not a worker connection
            continue
    return found


def _install_abort_callback(api) -> None:
    """Turn llama.cpp's abort on a lost worker into one `error:` line and exit code 1.

    The RPC client has no error path: a worker that dies or stops answering mid-run makes it call
    ggml_abort, which would dump core. Aborts that are not about RPC keep ggml's own behaviour.
    """
    global _abort_callback
    if _abort_callback is not None:
        return

    @ctypes.CFUNCTYPE(None, ctypes.c_char_p)
    def on_abort(message: bytes) -> None:
        text = (message or b"").decode("utf-8", errors="replace")
        if "rpc" not in text.lower():
            sys.stderr.write(text + "\n")
            return  # ggml goes on to abort()
        gone, silent = _lost_workers()
        what = (f"worker {', '.join(gone)} is gone" if gone else
                f"worker {', '.join(silent or map(str, _attached))} stopped answering")
        sys.stderr.write(f"error: {what} ({text.split(': ', 1)[-1].strip()})\n")
        sys.stderr.flush()
        os._exit(1)

    _abort_callback = on_abort
    api.ggml_set_abort_callback(ctypes.cast(on_abort, ctypes.c_void_p))


def _lost_workers() -> tuple[list[str], list[str]]:
    """(workers that refuse connections, workers that do not accept them in time). A killed worker's connection
    can close a moment before its listening socket does, so refusal is looked for during a short grace period."""
    deadline = time.monotonic() + GONE_GRACE_S
    while True:
        states = {str(e): _connect_state(e) for e in _attached}
        gone = [e for e, state in states.items() if state == "refused"]
        if gone or time.monotonic() > deadline:
            return gone, [e for e, state in states.items() if state == "silent"]
        time.sleep(0.1)


def _connect_state(endpoint: Endpoint) -> str:
    try:
        socket.create_connection((endpoint.host, endpoint.port), timeout=1.0).close()
        return "open"
    except socket.timeout:
        return "silent"
    except OSError:
        return "refused"


# --- the worker -------------------------------------------------------------------------------------

LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}


def worker_command(build: WorkerBuild, host: str, port: int, threads: int | None, devices: str | None,
                   cache: bool) -> list[str]:
    """llama.cpp's RPC server on HOST:PORT, after checking the port is free (its own failure is a bare log line)."""
    try:
        with socket.socket() as listener:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((host, port))
    except OSError as exc:
        raise RpcError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    command = [str(build.server), "--host", host, "--port", str(port)]
    if threads is not None:
        command += ["--threads", str(threads)]
    if devices:
        command += ["--device", devices]
    if cache:
        command.append("--cache")
    return command
