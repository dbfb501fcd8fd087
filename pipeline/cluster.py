"""Which Ray cluster the run uses, and what it offers.

* ``RAY_ADDRESS`` set (``host:port``, ``ray://host:port``): join that cluster. One that does not
  answer within ``connect_timeout_s`` (30 s by default) stops the run with a message naming the address, instead of
  Ray's own endless reconnect loop.
* No ``RAY_ADDRESS``: join the cluster ``ray start`` recorded on this machine (``ray up``,
  ``ray submit``) while it is there, else start a local one. A head that died without
  ``ray stop`` leaves its address in ``/tmp/ray/ray_current_cluster``; Ray would try that dead
  address forever, so the file is trusted only while a GCS process on this machine serves it or
  its port answers. Local Rays other processes started for themselves are never joined.
* ``RAY_ADDRESS=auto``: the recorded cluster, else any running on this machine.
* ``RAY_ADDRESS=local``: always a fresh local Ray.
"""

from __future__ import annotations

import os
import socket
import threading
import time

import ray

CONNECT_TIMEOUT_S = 30.0
_PROBE_S = 10.0  # of the above, how long a closed port is retried (a head still starting up)


class ClusterUnreachable(RuntimeError):
    """The cluster the run was told (or found) to join does not answer."""


def connect(num_cpus_local: int | None = None, timeout_s: float = CONNECT_TIMEOUT_S) -> str:
    """Join the cluster the environment names, else start a local one. Returns a description
    for the log; raises ``ClusterUnreachable`` within about ``timeout_s`` seconds."""
    if ray.is_initialized():
        return "already connected"
    address, origin = _address_to_join()
    common = {"log_to_driver": True, "configure_logging": True, "logging_level": "WARNING"}
    if address is None:
        ray.init(address="local", num_cpus=num_cpus_local, include_dashboard=False, **common)
    else:
        deadline = time.monotonic() + timeout_s
        _probe(address, origin, min(deadline, time.monotonic() + _PROBE_S))
        _init_before(deadline, timeout_s, address, origin, common)
    ctx = ray.get_runtime_context()
    return f"ray {ray.__version__} at {ctx.gcs_address}"


def _address_to_join() -> tuple[str | None, str]:
    """(address, where it came from); ``None``: start a local Ray."""
    env = os.environ.get("RAY_ADDRESS", "").strip()
    if env == "local":
        return None, "RAY_ADDRESS"
    if env and env != "auto":
        return env, "RAY_ADDRESS"
    recorded = _recorded_address()
    if env == "auto":
        live = _live_gcs_addresses()
        if recorded in live or (recorded and not live):
            return recorded, "RAY_ADDRESS=auto"
        if live:
            return sorted(live)[0], "RAY_ADDRESS=auto"
        raise ClusterUnreachable("RAY_ADDRESS=auto, but no Ray cluster runs on this machine: "
                                 "start one (ray start --head) or unset RAY_ADDRESS to run on a local Ray")
    # No address given: only the cluster `ray start` recorded (``ray up`` / ``ray submit`` heads),
    # and only while it is there. Other processes' own local Rays are never joined.
    if recorded and (recorded in _live_gcs_addresses() or _answers(recorded)):
        return recorded, "the Ray cluster `ray start` left running on this machine"
    return None, "none"


def _answers(address: str, timeout_s: float = 2.0) -> bool:
    try:
        with socket.create_connection(_host_port(address), timeout=timeout_s):
            return True
    except (OSError, ClusterUnreachable):
        return False


def _live_gcs_addresses() -> set[str]:
    try:
        from ray._private.services import find_gcs_addresses

        return set(find_gcs_addresses())
    except Exception:  # noqa: BLE001 - private API: if it fails, no live cluster is known
        return set()


def _recorded_address() -> str | None:
    try:
        from ray._private.utils import read_ray_address

        return read_ray_address()
    except Exception:  # noqa: BLE001 - private API, as above
        return None


def _host_port(address: str) -> tuple[str, int]:
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        raise ClusterUnreachable(f"Ray address {address!r} is not host:port")
    return host.strip("[]"), int(port)


def _advice(address: str, origin: str) -> str:
    if origin == "RAY_ADDRESS":
        return (f"the Ray cluster at {address} (RAY_ADDRESS) does not answer: start it, fix RAY_ADDRESS, "
                "or unset it to run on a local Ray")
    return (f"the Ray cluster at {address} ({origin}) does not answer: run `ray stop` to clear it, "
            "or set RAY_ADDRESS=local to run on a fresh local Ray")


def _probe(address: str, origin: str, until: float) -> None:
    """A TCP connect to the address, retried until ``until``: a closed port or a silent host
    fails here in seconds, where Ray itself would retry without end."""
    host, port = _host_port(address)
    while True:
        try:
            with socket.create_connection((host, port), timeout=max(0.5, min(5.0, until - time.monotonic()))):
                return
        except OSError as exc:
            if time.monotonic() >= until:
                raise ClusterUnreachable(f"{_advice(address, origin)} ({exc.strerror or exc})") from None
            time.sleep(1.0)


def _init_before(deadline: float, timeout_s: float, address: str, origin: str, options: dict[str, object]) -> None:
    """``ray.init(address)``, given up at ``deadline``: a port that accepts connections but is no
    Ray cluster (or a hung head) would otherwise keep Ray's connect loop going for good."""
    outcome: dict[str, BaseException | None] = {}

    def join() -> None:
        try:
            ray.init(address=address, **options)
            outcome["error"] = None
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=join, name="ray-connect", daemon=True)
    thread.start()
    thread.join(max(0.0, deadline - time.monotonic()))
    if "error" not in outcome:
        raise ClusterUnreachable(f"{_advice(address, origin)} (no answer within {timeout_s:g} s)")
    if outcome["error"] is not None:
        raise ClusterUnreachable(f"{_advice(address, origin)} ({outcome['error']})") from outcome["error"]


def cluster_gpus() -> float:
    return float(ray.cluster_resources().get("GPU", 0.0))


def cluster_cpus() -> float:
    return float(ray.cluster_resources().get("CPU", 0.0))


def autoscaler_max_gpus(path: str = "~/ray_bootstrap_config.yaml") -> float:
    """On a head started by ``ray up``, how many GPUs the autoscaler may bring up: each worker
    type's GPUs times its ``max_workers`` (within the cluster's own ``max_workers``). The cluster
    may have none *yet* (workers scale from zero) yet be meant for GPU training; 0 off such a head."""
    try:
        import yaml

        with open(os.path.expanduser(path), encoding="utf-8") as f:
            cfg = yaml.safe_load(f) or {}
    except (OSError, ValueError):
        return 0.0
    if not isinstance(cfg, dict):
        return 0.0
    cap = cfg.get("max_workers")
    total = 0.0
    for t in (cfg.get("available_node_types") or {}).values():
        if not isinstance(t, dict):
            continue
        try:
            gpus = float((t.get("resources") or {}).get("GPU", 0))
            workers = t.get("max_workers")
            if workers is None:  # unstated: the cluster's bound, or at least one such worker
                workers = cap if cap is not None else 1
            if cap is not None:
                workers = min(workers, cap)
            total += gpus * max(0, workers)
        except (AttributeError, TypeError, ValueError):  # a malformed entry counts for nothing
            continue
    return total
