"""Thread policy of reme's entry points (CLI commands, the demo server, build workers).

Library code never changes torch's process-wide thread count; an entry point calls
[`apply_threads`][reme.cli.threads.apply_threads] once at start-up. The count is, first match wins:

1. the ``threads`` argument (a positive int);
2. ``$REME_THREADS`` (a positive int, or ``auto``);
3. ``auto``: the cores this process may run on (``os.sched_getaffinity``) less the cores other
   work keeps busy, ``threads = clamp(cores - floor(max(load1 - 1, 0)), 1, cores)``: a load of
   up to one more than idle is tolerated (it is often the user's own previous command), above
   that each unit of load takes a thread away. On a loaded machine a second torch thread
   mostly waits for its peer at every parallel region (docs/performance.md: at load 6-8 on 2
   cores `predict` took 4.9 s on 1 thread and 8.9 s on 2; at load 20-28 both were equal), so
   one thread is as fast or faster there, and it leaves the other core to the other work.
"""

from __future__ import annotations

import logging
import math
import os
import sys

logger = logging.getLogger(__name__)

#: Environment variable read by `choose_threads`.
ENV_VAR: str = "REME_THREADS"


def available_cores() -> int:
    """Cores this process may run on (affinity mask), at least 1."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return max(os.cpu_count() or 1, 1)


def auto_threads(cores: int | None = None, load1: float | None = None) -> int:
    """The ``auto`` policy: ``clamp(cores - floor(max(load1 - 1, 0)), 1, cores)``.

    Args:
        cores: usable cores (default `available_cores`).
        load1: 1-minute load average (default ``os.getloadavg()[0]``; 0 where unavailable).

    Returns:
        A thread count in 1..cores.
    """
    cores = available_cores() if cores is None else max(int(cores), 1)
    if load1 is None:
        try:
            load1 = os.getloadavg()[0]
        except OSError:  # pragma: no cover
            load1 = 0.0
    return min(max(cores - math.floor(max(float(load1) - 1.0, 0.0)), 1), cores)


def choose_threads(threads: int | str | None = None) -> int:
    """The thread count for this process: ``threads``, else ``$REME_THREADS``, else ``auto``.

    Args:
        threads: a positive int, ``"auto"``, or None (read the environment).

    Returns:
        A positive int.

    Raises:
        ValueError: ``threads`` or ``$REME_THREADS`` is neither a positive int nor ``auto``
            (one line naming the source).
    """
    source = "threads"
    if threads is None:
        threads, source = os.environ.get(ENV_VAR) or "auto", f"${ENV_VAR}"
    if isinstance(threads, str):
        text = threads.strip().lower()
        if text == "auto":
            return auto_threads()
        try:
            threads = int(text)
        except ValueError:
            raise ValueError(f"{source} must be a positive integer or 'auto', got {threads!r}") from None
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"{source} must be a positive integer or 'auto', got {threads!r}")
    return threads


def apply_threads(threads: int | str | None = None) -> int:
    """Set torch's intra-op thread count for the whole process (entry points only).

    Cheap before torch is imported: it then only sets ``OMP_NUM_THREADS`` (and
    ``MKL_NUM_THREADS``), which torch reads when it starts, so a command that refuses its input
    never pays for importing torch. After the import it calls ``torch.set_num_threads``.

    Args:
        threads: see `choose_threads`.

    Returns:
        The count set.

    Raises:
        ValueError: see `choose_threads`.
    """
    n = choose_threads(threads)
    torch = sys.modules.get("torch")
    if torch is None:
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(n)
    elif torch.get_num_threads() != n:
        torch.set_num_threads(n)
    logger.info("torch threads: %d", n)
    return n


def build_workers(device, engine: str = "local") -> int:
    """``reme build-reference --workers 0`` (auto): on a CPU with the local engine, one worker
    process (one torch thread each) per thread `choose_threads` gives; 1 with the encoders on a
    GPU or with Ray (name the actor count there).

    Args:
        device: the visual encoder's device (``torch.device`` or string).
        engine: ``"local"`` or ``"ray"``.

    Returns:
        A worker count >= 1.
    """
    if engine != "local" or not str(device).startswith("cpu"):
        return 1
    return choose_threads()

