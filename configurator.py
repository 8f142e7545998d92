"""
nanoGPT's "poor man's configurator", with unknown keys rejected. Use from a script as

    exec(open('configurator.py').read())

after defining the defaults as globals. Arguments are either a Python config file
(`config/cpu_cocomix.py`, executed, it may set any known key) or `--key=value`
overrides, where value is parsed as a Python literal when it is one and must have
the default's type (ints are accepted for floats). `--help` (or `-h`) lists every key with its
default and the comment beside it in the calling script, under the script's own comment headers.
"""

import sys
from ast import literal_eval


def _config_error(msg):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


if any(arg in ("-h", "--help") for arg in sys.argv[1:]):
    # every key with its default and comment, read from the calling script's source
    from cocomix.checks import config_help as _config_help

    print(_config_help(globals().get("__file__") or sys.argv[0], globals()))
    sys.exit(0)

for arg in sys.argv[1:]:
    if "=" not in arg:
        if arg.startswith("--"):
            _config_error(f"expected --key=value, got {arg!r}")
        # a config file: its assignments become this script's settings
        try:
            with open(arg, encoding="utf-8-sig") as f:  # a BOM, as a Windows editor leaves
                _src = f.read()
        except OSError as e:
            _config_error(f"cannot read config file {arg}: {e.strerror}")
        _before = set(globals())
        _defaults = {
            k: v
            for k, v in globals().items()
            if isinstance(v, (int, float, bool, str)) and not k.startswith("_")
        }
        try:
            exec(_src)
        except (
            Exception
        ) as _e:  # a typo in a config file: one line, not a traceback from inside exec
            _config_error(f"config file {arg}: {type(_e).__name__}: {_e}")
        _unknown = set(globals()) - _before - {"_src", "_before", "_defaults", "_e"}
        _unknown = {k for k in _unknown if not k.startswith("_")}
        if _unknown:
            _config_error(f"{arg} sets unknown config keys: {', '.join(sorted(_unknown))}")
        # the file's values must have the defaults' types, as --key=value ones
        for (
            _k,
            _v,
        ) in _defaults.items():
            _new = globals()[_k]
            if type(_new) != type(_v) and not (type(_v) is float and type(_new) is int):
                _config_error(f"{arg} sets {_k} to {_new!r}, expected a {type(_v).__name__}")
            if type(_v) is float:
                globals()[_k] = float(_new)
    else:
        if not arg.startswith("--"):
            _config_error(f"expected --key=value, got {arg!r}")
        key, val = arg[2:].split("=", 1)
        if key not in globals() or key.startswith("_") or key in ("config_keys",):
            _config_error(f"unknown config key {key!r}")
        try:
            attempt = literal_eval(val)
        except (SyntaxError, ValueError):
            attempt = val  # a plain string
        default = globals()[key]
        if (
            isinstance(default, bool)
            and isinstance(attempt, str)
            and attempt.lower() in ("true", "false")
        ):
            attempt = attempt.lower() == "true"
        if (
            isinstance(default, float)
            and isinstance(attempt, int)
            and not isinstance(attempt, bool)
        ):
            attempt = float(attempt)
        if default is not None and type(attempt) != type(default):
            _config_error(f"--{key} expects a {type(default).__name__}, got {val!r}")
        globals()[key] = attempt
