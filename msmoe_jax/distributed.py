"""Starting a run that spans several processes (hosts): who the coordinator is, how many
processes there are and which one this is.

The three come, in this order of precedence, from the train.py flags (``--coordinator``,
``--num-processes``, ``--process-id``), from the environment (``JAX_COORDINATOR_ADDRESS``,
``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``), or from the cluster manager: under SLURM (``srun``)
or Open MPI (``mpirun``) with more than one task, JAX detects them itself. With none of these
the run is a single process and nothing is initialised.

Must run before JAX touches a backend. On the CPU the processes' collectives go over gloo.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import socket
import sys
import time

# Cluster managers whose task counts JAX reads itself (jax._src.clusters), by the variable
# that holds the number of tasks.
CLUSTER_TASK_COUNTS = {"SLURM": "SLURM_NTASKS", "Open MPI": "OMPI_COMM_WORLD_SIZE"}


class DistributedError(ValueError):
    """Inconsistent multi-process settings, phrased for the user."""


@dataclasses.dataclass(frozen=True)
class ProcessSpec:
    coordinator: str | None = None  # host:port of process 0's coordination service
    num_processes: int | None = None
    process_id: int | None = None
    cluster: str | None = None  # a detected cluster manager that JAX will read

    @property
    def multi_process(self) -> bool:
        return self.cluster is not None or (self.num_processes or 1) > 1


def add_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("multi-process runs (one process per host; see README)")
    g.add_argument("--coordinator", metavar="HOST:PORT",
                   help="address of process 0's coordinator (env JAX_COORDINATOR_ADDRESS)")
    g.add_argument("--num-processes", type=int, metavar="N",
                   help="number of processes in the run (env JAX_NUM_PROCESSES)")
    g.add_argument("--process-id", type=int, metavar="I",
                   help="this process's index, 0..N-1 (env JAX_PROCESS_ID)")


def _env_int(name: str, environ) -> int | None:
    value = environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"{name}: expected an integer, got {value!r}") from None


def resolve(args: argparse.Namespace | None = None, environ=None) -> ProcessSpec:
    """The process settings from the flags, else the environment, else a cluster manager."""
    environ = os.environ if environ is None else environ
    pick = lambda flag, value: flag if flag is not None else value
    coordinator = pick(getattr(args, "coordinator", None),
                       environ.get("JAX_COORDINATOR_ADDRESS") or None)
    count = pick(getattr(args, "num_processes", None), _env_int("JAX_NUM_PROCESSES", environ))
    pid = pick(getattr(args, "process_id", None), _env_int("JAX_PROCESS_ID", environ))
    given = {"--coordinator": coordinator, "--num-processes": count, "--process-id": pid}
    if any(v is not None for v in given.values()):
        if count is not None and count < 1:
            raise DistributedError(f"--num-processes: must be at least 1, got {count}")
        if count == 1 and coordinator is None:
            return ProcessSpec(num_processes=1, process_id=0)
        missing = [k for k, v in given.items() if v is None]
        if missing:
            raise DistributedError(
                f"{', '.join(missing)}: needed as well for a multi-process run (flags, or the "
                "environment variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, "
                "JAX_PROCESS_ID)")
        if not 0 <= pid < count:
            raise DistributedError(f"--process-id: must be in 0..{count - 1} for "
                                   f"--num-processes={count}, got {pid}")
        if ":" not in coordinator:
            raise DistributedError(f"--coordinator: expected HOST:PORT, got {coordinator!r}")
        return ProcessSpec(coordinator, count, pid)
    for name, var in CLUSTER_TASK_COUNTS.items():
        if (_env_int(var, environ) or 1) > 1:
            return ProcessSpec(cluster=name)
    return ProcessSpec()


def initialize(spec: ProcessSpec, heartbeat_timeout_s: int, init_timeout_s: int) -> None:
    """Joins the run's processes (``jax.distributed.initialize``) when there are several.

    A process that stops sending heartbeats for ``heartbeat_timeout_s`` is declared dead and
    the coordination service stops the others, so a killed host ends the run instead of
    leaving the rest waiting in a collective forever.
    """
    if not spec.multi_process:
        return
    if spec.coordinator is not None and spec.process_id != 0:
        wait_for_coordinator(spec.coordinator, init_timeout_s)
    import jax

    # Only the CPU client reads this; without it CPU processes cannot run collectives together.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=spec.coordinator, num_processes=spec.num_processes,
        process_id=spec.process_id, initialization_timeout=init_timeout_s,
        heartbeat_timeout_seconds=heartbeat_timeout_s)


def wait_for_coordinator(address: str, timeout_s: float, every_s: float = 10.0,
                         say=lambda msg: print(msg, file=sys.stderr, flush=True)) -> None:
    """Waits until something listens at ``address`` (HOST:PORT), at most ``timeout_s``.

    JAX's own wait for the coordinator blocks in C++ (Ctrl-C does nothing) and ends in an
    abort; this wait is Python's, so it reports progress every ``every_s``, stops on Ctrl-C,
    and ends in a DistributedError naming the address. A host name that does not resolve
    fails at once.
    """
    host, _, port = address.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host  # [IPv6]:port
    try:
        port_number = int(port)
        if not 0 < port_number < 65536:
            raise ValueError(port)
        socket.getaddrinfo(host, port_number, type=socket.SOCK_STREAM)
    except ValueError:
        raise DistributedError(f"--coordinator: expected HOST:PORT with a port in 1..65535, "
                               f"got {address!r}") from None
    except socket.gaierror as e:
        raise DistributedError(f"--coordinator {address}: cannot resolve host {host!r} "
                               f"({e.strerror})") from None
    start = time.monotonic()
    next_note = start + every_s
    while True:
        try:
            with socket.create_connection((host, port_number), timeout=min(2.0, timeout_s)):
                return
        except OSError:
            pass
        now = time.monotonic()
        if now - start >= timeout_s:
            raise DistributedError(
                f"--coordinator {address}: nothing answered within "
                f"distributed.init_timeout_s={timeout_s:g}s; is process 0 running, and can this "
                "host reach that port?")
        if now >= next_note:
            say(f"waiting for the coordinator at {address} ({now - start:.0f}s of "
                f"{timeout_s:g}s)")
            next_note = now + every_s
        time.sleep(min(0.5, max(0.0, timeout_s - (now - start))))
