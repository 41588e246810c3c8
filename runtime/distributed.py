"""Serving one mesh from several processes (hosts) on JAX's multi-controller runtime.

Every process runs the same program: it loads only the weight shards its devices hold, runs the
same deterministic scheduler on the same requests, and reads the same replicated logits, so all of
them take the same decisions without talking outside the executables' own collectives. Only
process 0 prints results.

When a peer never arrives or dies, JAX's coordination service aborts the process from C++ with a
stack trace rather than raising. So the CLI runs the worker as a child process and supervises it:
a worker that ends that way is reported as one clear line, within the configured timeout.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import subprocess
import sys
import tempfile

CHILD_MARKER = "QWEN3_AOT_DISTRIBUTED_WORKER"
RESULT_FILE = "QWEN3_AOT_WORKER_STDOUT"
ENV = {"coordinator": "JAX_COORDINATOR_ADDRESS", "num_processes": "JAX_NUM_PROCESSES", "process_id": "JAX_PROCESS_ID"}


@dataclasses.dataclass(frozen=True)
class Cluster:
    coordinator: str
    num_processes: int
    process_id: int
    timeout: int  # seconds to wait for peers, and to notice one that stopped

    @staticmethod
    def from_args(coordinator, num_processes, process_id, timeout) -> "Cluster | None":
        """Flags first, then JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID."""
        coordinator = coordinator or os.environ.get(ENV["coordinator"])
        num = num_processes if num_processes is not None else _env_int(ENV["num_processes"])
        pid = process_id if process_id is not None else _env_int(ENV["process_id"])
        if coordinator is None and num in (None, 1):
            return None
        if coordinator is None or num is None or pid is None:
            raise ValueError("multi-process serving needs --coordinator HOST:PORT, --num-processes N and "
                             "--process-id I (or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID)")
        if ":" not in coordinator:
            raise ValueError(f"--coordinator {coordinator!r}: expected HOST:PORT")
        if num < 1 or not 0 <= pid < num:
            raise ValueError(f"--process-id {pid} must be in [0, {num}) for --num-processes {num}")
        if timeout < 1:
            raise ValueError(f"--timeout must be at least 1 second, got {timeout}")
        return Cluster(coordinator, num, pid, timeout)


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r}: expected an integer") from None


def initialize(cluster: Cluster) -> None:
    """Join the cluster (gloo collectives on CPU). Call before anything touches devices."""
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(cluster.coordinator, num_processes=cluster.num_processes,
                               process_id=cluster.process_id, initialization_timeout=cluster.timeout,
                               heartbeat_timeout_seconds=cluster.timeout,
                               shutdown_timeout_seconds=cluster.timeout)


def is_worker() -> bool:
    return os.environ.get(CHILD_MARKER) == "1"


def supervise(argv: list[str], cluster: Cluster) -> int:
    """Run this command again as a worker child; turn an abort from JAX into one clear line.

    The worker's results reach our stdout through a file: gloo prints connection chatter from C++
    threads straight onto file descriptor 1, and stdout must stay exactly what we print.
    """
    with tempfile.TemporaryDirectory(prefix="aot-worker-") as tmp:
        result = os.path.join(tmp, "stdout")
        env = dict(os.environ, **{CHILD_MARKER: "1", RESULT_FILE: result})
        child = subprocess.run([sys.executable, "-m", "runtime", *argv], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
        if os.path.exists(result):
            with open(result) as f:
                sys.stdout.write(f.read())
    err = child.stderr
    if child.returncode == 0:
        sys.stderr.write("".join(l for l in err.splitlines(keepends=True) if "[Gloo]" not in l))
        return 0
    ours = [line for line in err.splitlines() if line.startswith("python -m runtime: error:")]
    if ours:
        line = ours[-1]
        if "was killed by signal" in line and not _explain(err, cluster).startswith("worker aborted"):
            # the serving engine's process was aborted by JAX, which said why on stderr
            return _aborted(_explain(err, cluster))
        if any(sign in line for sign in PEER_GONE):  # a step's collective lost its peer: say so first
            where = f"process {cluster.process_id} of {cluster.num_processes}, coordinator {cluster.coordinator}"
            line = (f"python -m runtime: error: lost contact with a peer process ({where}): it stopped or became "
                    f"unreachable; {line.split('error: ', 1)[1][:300]}")
        print(line, file=sys.stderr)
        return child.returncode if child.returncode > 0 else 1
    return _aborted(_explain(err, cluster))


def _aborted(why: str) -> int:
    print(f"python -m runtime: error: {why}", file=sys.stderr)
    return 1


# What a collective says when the process at its other end is gone (gloo on CPU, the coordination
# service elsewhere).
PEER_GONE = ("Gloo", "Connection reset by peer", "DEADLINE_EXCEEDED", "UNAVAILABLE", "heartbeat")


def redirect_results() -> None:
    """In a worker: what we print goes to the supervisor's result file, not to fd 1."""
    path = os.environ.get(RESULT_FILE)
    if path:
        sys.stdout = open(path, "w", buffering=1)


def _explain(err: str, cluster: Cluster) -> str:
    where = f"process {cluster.process_id} of {cluster.num_processes}, coordinator {cluster.coordinator}"
    if "RegisterTask" in err or ("Barrier" in err and "DEADLINE_EXCEEDED" in err):
        return (f"not every process joined within {cluster.timeout} s ({where}); start all "
                f"{cluster.num_processes} processes with the same --coordinator and --num-processes")
    if "DEADLINE_EXCEEDED" in err or "heartbeat" in err.lower() or "UNAVAILABLE" in err:
        return f"lost contact with a peer process ({where}): it stopped or became unreachable"
    last = next((line for line in reversed(err.splitlines()) if line.strip() and not line.startswith(" ")), "")
    return f"worker aborted ({where}): {last[:300]}"


class StepChannel:
    """The serving leader (process 0, which takes HTTP requests) tells the other processes what to
    do before each step, through the coordination service's key-value store: record n holds the
    submissions and cancellations to apply before step n. Every process applies the same records
    in the same order to the same deterministic scheduler, so all of them run the same steps and
    their collectives match.

    A record is deleted only when the leader knows every process has read it (`release`, called
    when a step launched after it has finished, which it cannot do without every process): a
    follower that lags behind, or a leader that ran steps with nothing launched, never finds a
    record it still needs gone.
    """

    PREFIX = "qwen3-aot/serve/step"

    def __init__(self, client=None):
        if client is None:
            from jax._src.distributed import global_state

            if global_state.client is None:
                raise RuntimeError("jax.distributed is not initialized")
            client = global_state.client
        self.client = client
        self._kept: collections.deque[int] = collections.deque()  # published, not yet deleted

    def publish(self, n: int, record: dict) -> None:
        self.client.key_value_set(f"{self.PREFIX}/{n}", json.dumps(record))
        self._kept.append(n)

    def release(self, upto: int) -> None:
        """Delete records <= upto: the caller knows that every process has read them."""
        while self._kept and self._kept[0] <= upto:
            self.client.key_value_delete(f"{self.PREFIX}/{self._kept.popleft()}")

    def receive(self, n: int) -> dict:
        """Wait for record n as long as it takes: an idle server publishes nothing, and a peer that
        dies is detected by the coordination service's heartbeat, which ends this process."""
        while True:
            try:
                return json.loads(self.client.blocking_key_value_get(f"{self.PREFIX}/{n}", 10_000))
            except Exception as e:  # noqa: BLE001 - the client raises a runtime error on its deadline
                if "DEADLINE_EXCEEDED" not in str(e) and "timed out" not in str(e).lower():
                    raise
