"""``python -m support.sigterm_at_build_fork serve ...`` (tests/ on the path): ``authgw`` with
one change of timing only: a SIGTERM reaches the master while it forks a reload's builder.
Signals are blocked around that fork, so the handler runs when they are unblocked, before the
master has noted the builder: the interleaving of a stop that arrives during that fork (review
of stop 43's diff)."""

import os
import runpy
import signal
import sys

import gateway.supervisor as supervisor

_real_fork = os.fork
_in_build = [False]


def _fork() -> int:
    pid = _real_fork()
    if pid and _in_build[0]:
        os.kill(os.getpid(), signal.SIGTERM)  # pending until the master unblocks signals
    return pid


def _start_build(self, _real=supervisor._Master._start_build):
    _in_build[0] = True
    try:
        return _real(self)
    finally:
        _in_build[0] = False


os.fork = _fork
supervisor._Master._start_build = _start_build
sys.argv = ["authgw", *sys.argv[1:]]
runpy.run_module("gateway", run_name="__main__")
