"""`smallfour worker`: lend this machine's devices to another machine's `--rpc` (llama.cpp's RPC server)."""

from __future__ import annotations

import os
import sys
from typing import Annotated, Optional

import typer

from smallfour.console import err, note
from smallfour.errors import SmallfourError


def worker(
    host: Annotated[str, typer.Option("--host", help="Address to listen on. The RPC protocol has no authentication: "
                                                     "anything but loopback needs --allow-remote.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="TCP port.")] = 50052,
    threads: Annotated[Optional[int], typer.Option("--threads", "-t", min=1, help="CPU threads for the CPU device "
                                                   "(default: llama.cpp's).")] = None,
    device: Annotated[Optional[str], typer.Option("--device", help="Devices to offer, comma-separated (CUDA0, CPU, "
                                                                   "…; default: the GPUs, else the CPU).")] = None,
    cache: Annotated[bool, typer.Option("--cache", help="Keep received tensors in llama.cpp's local cache so a "
                                                        "second load of the same model sends less.")] = False,
    cuda: Annotated[bool, typer.Option("--cuda", help="Build the worker with CUDA (needs the CUDA toolkit).")] = False,
    cuda_arch: Annotated[str, typer.Option("--cuda-arch", help="CUDA architectures for --cuda, e.g. 89 or 80;90.")]
    = "native",
    metal: Annotated[bool, typer.Option("--metal", help="Build the worker with Metal (macOS).")] = False,
    allow_remote: Annotated[bool, typer.Option("--allow-remote", help="Listen on a non-loopback --host. Anyone who "
                                                                      "reaches the port can use this machine: only "
                                                                      "on a trusted network.")] = False,
) -> None:
    """Run llama.cpp's RPC server so another machine's `smallfour run/chat/batch/serve --rpc HOST:PORT` can place
    layers here. Built from llama-cpp-python's own sources on first use (a few minutes). Ctrl-C stops it."""
    from smallfour.rpc import LOOPBACK_HOSTS, ensure_worker_build, worker_command

    if host not in LOOPBACK_HOSTS and not allow_remote:
        raise SmallfourError(f"--host {host}: the RPC protocol has no authentication, so anyone reaching the port "
                             "could use this machine; add --allow-remote to listen there (trusted networks only)")
    build = ensure_worker_build(cuda_arch if cuda else None, metal)
    command = worker_command(build, host, port, threads, device, cache)
    if host not in LOOPBACK_HOSTS:
        err(("warning:", "yellow"), f" listening on {host}:{port} without authentication; use it only on a "
                                    "trusted network")
    note(f"worker on {host}:{port} — on the client: smallfour run MODEL --rpc {host}:{port}")
    sys.stderr.flush()
    # The server takes this process's place: a signal sent to the worker (Ctrl-C, SIGTERM from a service manager)
    # reaches the server itself, and no orphan keeps the port.
    os.execv(command[0], command)
