"""
Progress of a long loop, for a terminal and for a log file alike: tqdm's bar when its stream is a
terminal, plain lines when it is not (a file, a pipe, nohup, CI), where each of tqdm's redraws would
be another '\r'-separated update on one endless line. A plain line comes at most every `seconds`, or
every `every` updates when given (train.py's log_interval), and a final one at the end.

COCOMIX_PROGRESS=bar or =lines overrides the choice: reproduce.py's stages run their programs with
their output piped to it, and pass on whether its own output is a terminal.
"""

import os
import sys
import time

SECONDS = 10  # the longest a plain-line progress stays silent


def use_bar(file):
    choice = os.environ.get("COCOMIX_PROGRESS")
    if choice in ("bar", "lines"):
        return choice == "bar"
    try:
        return file.isatty()
    except (AttributeError, ValueError):  # no stream, or a closed one
        return False


def progress_bar(iterable=None, total=None, desc="", disable=False, file=None, every=0, **kw):
    """tqdm(iterable, total=..., desc=..., disable=..., file=..., **kw) on a terminal; elsewhere a
    Lines with the same use (iteration, update, set_postfix, write, close, n, a with-block)."""
    file = file or sys.stderr
    if use_bar(file):
        from tqdm import tqdm

        return tqdm(iterable, total=total, desc=desc, disable=disable, file=file, **kw)
    return Lines(iterable, total, desc, disable, file, every, **kw)


class Lines:
    """tqdm's interface, printing 'desc n/total (p%): key=value, ... [elapsed]' lines."""

    def __init__(
        self, iterable, total, desc, disable, file, every, initial=0, unit="it", unit_scale=False,
        leave=True, seconds=SECONDS, **_
    ):  # fmt: skip
        if total is None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.iterable, self.total, self.desc, self.disable, self.file = (
            iterable, total, desc, disable, file
        )  # fmt: skip
        self.every, self.seconds, self.unit, self.unit_scale, self.leave = (
            every, seconds, unit, unit_scale, leave
        )  # fmt: skip
        self.n = self.printed = self.start = initial  # printed: n at the last line
        self.postfix, self.t0 = "", time.time()
        self.last = self.t0

    def __iter__(self):
        for x in self.iterable:
            yield x
            self.update(1)
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def set_postfix(self, **kw):
        self.postfix = ", ".join(f"{k}={v}" for k, v in kw.items())

    def write(self, msg):
        print(msg, file=self.file, flush=True)

    def amount(self, n):
        if not self.unit_scale:
            return f"{n:,}" if isinstance(n, int) or n >= 100 else f"{n:.3g}"
        from tqdm import tqdm

        return tqdm.format_sizeof(n)

    def line(self, final=False):
        text = f"{self.desc} {self.amount(self.n)}" if self.desc else self.amount(self.n)
        if self.total:
            text += f"/{self.amount(self.total)} ({100 * self.n / self.total:.0f}%)"
        elif self.unit != "it":
            text += f" {self.unit}"
        if self.postfix:
            text += f": {self.postfix}"
        elapsed = time.time() - self.t0
        rate = (self.n - self.start) / elapsed if elapsed > 0 else 0.0
        text += f" [{elapsed:.1f}s, {self.amount(rate)} {self.unit}/s"
        self.write(text + (", done]" if final else "]"))
        self.printed, self.last = self.n, time.time()

    def update(self, n=1):
        self.n += n
        if self.disable:
            return
        due = self.n - self.printed >= self.every if self.every else False
        if due or (not self.every and time.time() - self.last >= self.seconds):
            self.line()

    def refresh(self):
        pass

    def close(self):
        """The final line: always, unless disabled or nothing was counted; a transient bar
        (leave=False) that never printed stays silent, as tqdm's vanishes."""
        if self.disable or self.n == self.start or (not self.leave and self.printed == self.start):
            self.disable = True
            return
        if self.printed != self.n:
            self.line(final=True)
        self.disable = True  # a second close prints nothing
