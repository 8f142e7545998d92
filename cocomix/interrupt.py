"""Ctrl-C in an entry point: one line saying what was kept and exit status 130, never a
KeyboardInterrupt traceback. It imports nothing heavy, so that an entry point can install it before
it imports torch (the start-up a Ctrl-C most often lands in)."""

import signal
import sys


def on_ctrl_c(kept="nothing was written"):
    """From now on Ctrl-C (SIGINT) prints 'interrupted: <kept>' and exits with status 130. It is
    raised as SystemExit at the point it lands, so `finally` blocks and atexit handlers (locks,
    temporary files) still run; a script that stops its own way later sets its own handler."""

    def handler(signum, frame):
        print(f"interrupted: {kept}", file=sys.stderr, flush=True)
        raise SystemExit(130)

    signal.signal(signal.SIGINT, handler)
