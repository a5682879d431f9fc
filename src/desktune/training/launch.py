"""`desktune train CONFIG --nproc N`: start N ranks on this machine with torch's own launcher (what torchrun
runs), and turn a failed rank into one message naming it."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from desktune.errors import DesktuneError

USER_ERROR, INTERRUPTED = 2, 130  # the exit codes of `desktune` itself (cli.main)


def launch(args: list[str], nproc: int, *, monitor_interval_s: float = 0.5) -> int:
    """Run `python -m desktune ARGS` as `nproc` ranks; returns the exit code. A rank that fails stops them all
    (torch's agent terminates the others); its failure is named."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # desktune says what happened
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))  # as torchrun does
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"desktune-{os.getpid()}",
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0,
                          monitor_interval=monitor_interval_s)
    try:
        elastic_launch(config, sys.executable)("-m", "desktune", *args)
    except ChildFailedError as e:
        return _failed(e)
    except SignalException:  # Ctrl-C or SIGTERM: torch's agent passed it on; the ranks checkpointed and stopped
        return INTERRUPTED
    return 0


def _failed(err: object) -> int:
    """The exit code for failed ranks: a rank's own when it said why (a user error, Ctrl-C), else one message
    naming the first rank that died and how."""
    failures = getattr(err, "failures", {})
    said = {f.exitcode for f in failures.values()} & {USER_ERROR, INTERRUPTED}
    if said or not failures:  # a rank printed its own message (the others were stopped because of it)
        return max(said) if said else USER_ERROR
    rank, first = min(failures.items(), key=lambda kv: kv[1].timestamp)
    how = f"was killed by {first.signal_name()}" if first.exitcode < 0 else f"exited with code {first.exitcode}"
    log = Path(str(first.error_file)) if getattr(first, "error_file", None) else None
    seen = f"; its error: {log}" if log is not None and log.is_file() else ""
    raise DesktuneError(f"rank {rank} {how}, so the run stopped on every rank{seen}", where="desktune train --nproc",
                        fix="the checkpoints saved before are intact: continue with desktune train CONFIG --resume")
