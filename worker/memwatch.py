"""Sampling a process's resident memory in a background thread (run on workers with
``client.run``) to check that memory stays bounded during an evaluation."""

from __future__ import annotations

import threading

_state: dict = {"thread": None, "stop": None, "peak": 0}


def peak_rss() -> int:
    """The peak resident set size of this process so far (bytes, from the OS)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def start_rss_sampler(interval: float = 0.02) -> int:
    """Start sampling this process's RSS every ``interval`` seconds; returns the current RSS."""
    import psutil

    stop_rss_sampler()
    proc = psutil.Process()
    stop = threading.Event()
    _state["peak"] = proc.memory_info().rss

    def run() -> None:
        while not stop.wait(interval):
            rss = proc.memory_info().rss
            if rss > _state["peak"]:
                _state["peak"] = rss

    t = threading.Thread(target=run, name="rss-sampler", daemon=True)
    _state.update(thread=t, stop=stop)
    t.start()
    return _state["peak"]


def stop_rss_sampler() -> int:
    """Stop sampling; returns the peak RSS seen (bytes)."""
    t, stop = _state["thread"], _state["stop"]
    if t is not None:
        stop.set()
        t.join()
        _state.update(thread=None, stop=None)
    return int(_state["peak"])
