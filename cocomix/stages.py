"""
reproduce.py's stages. A stage is skipped when its stage.json records the same settings and the
same bytes of its outputs and inputs, resumed when an interrupted attempt with these settings left
checkpoints, and refused (one line, naming the setting or file) when the folder holds another
configuration's work. Its commands run from the repo root under the folder's lock, their output
streamed to the terminal and to a log; Ctrl-C or SIGTERM is passed on, so the running program saves.
"""

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fail(msg, status=1):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(status)


def digest(obj):
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def write_json(path, obj):
    from cocomix.weights import write_atomic

    # a stage counts as done only once its record is whole
    write_atomic(path, json.dumps(obj, indent=1))


def read_log(run_dir):
    records = []
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except ValueError:  # a line torn by a kill (train.py drops it when it resumes)
                pass
    return records


def flatten(d, prefix=""):
    """{'train': {'lr': 1}} -> {'train.lr': 1}: names the setting that differs, not its section."""
    out = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def file_hashes(record, paths):
    """{path relative to the record's folder: SHA-256} of the files among paths (a stage's outputs
    or inputs), for its stage.json: 'skip: done' then means the same bytes."""
    from cocomix.weights import file_sha256

    home = os.path.dirname(record)
    return {os.path.relpath(p, home): file_sha256(p) for p in paths if os.path.isfile(p)}


def changed_file(name, record, rec, outputs, inputs):
    """Why a finished stage's outputs or inputs are no longer the files it recorded (a checkpoint
    copied over, a source retrained by hand), naming the stage and the file; None when they are."""
    for key, paths in (("outputs", outputs), ("inputs", inputs)):
        old = rec.get(key) or {}
        for rel, h in file_hashes(record, paths).items():
            if rel in old and old[rel] != h:
                path = os.path.normpath(os.path.join(os.path.dirname(record), rel))
                return (
                    f"stage {name}: {path} is not the file the stage "
                    f"{'wrote' if key == 'outputs' else 'read'} (its SHA-256 differs from "
                    "stage.json's); use another --out_dir, or --force to redo the stage"
                )
    return None


def done(name, record, settings, outputs, force, inputs=()):
    """True when `record` holds these settings and the outputs exist, with the bytes it recorded of
    its outputs and inputs (check_hashes). Other settings stop the run (unless force): silently
    mixing two configurations in one out_dir would make the table a lie."""
    rec = read_json(record)
    settings = json.loads(json.dumps(settings))  # compare as JSON sees it (tuples -> lists)
    if rec is not None and rec.get("settings") != settings:
        if not force:
            old, new = flatten(rec.get("settings", {})), flatten(settings)
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            fail(
                f"stage {name}: {record} was made with other settings ({', '.join(diff)}); "
                "use another --out_dir, or --force to redo it"
            )
    elif rec is not None and all(os.path.exists(o) for o in outputs):
        if (changed := changed_file(name, record, rec, outputs, inputs)) is None:
            print(f"skip {name}: done ({os.path.dirname(record)})")
            return True
        if not force:
            fail(changed)
    if os.path.exists(record):
        os.remove(record)  # an interrupted redo must not look finished
    print(f"== stage {name}", flush=True)
    return False


def run_logged(stage, cmd, log_path, env):
    """Runs cmd from the repo root, its output (progress bars too) streamed to us and log_path."""
    print(" ".join(cmd), flush=True)
    # the program's output is our pipe: its progress is a bar only if ours goes to a terminal
    env = {
        "COCOMIX_PROGRESS": "bar" if sys.stdout.isatty() else "lines",
        **(os.environ if env is None else env),
    }
    with open(log_path, "ab") as log:
        log.write((" ".join(cmd) + "\n").encode())
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        try:
            # read1: whatever is there, so '\r' updates flow
            while chunk := proc.stdout.read1(65536):
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
                log.write(chunk)
            rc = proc.wait()
        except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (main makes it one)
            # passed on as SIGTERM, which train.py and sae.py take like Ctrl-C: a stage started by
            # `nohup ... &` inherits SIGINT ignored until it sets its handler, and would not stop
            proc.send_signal(signal.SIGTERM)
            proc.wait()  # train.py and sae.py finish their step, save and exit; let them
            fail(f"interrupted in stage {stage}; run the same command again to resume it", 130)
    if rc == 130:  # the stage's program alone was stopped, and saved what it had
        fail(f"stage {stage} was interrupted; run the same command again to resume it", 130)
    if rc:
        fail(f"stage {stage} failed (exit {rc}); see {log_path}")


@contextlib.contextmanager
def folder_lock(stage, folder, lock_name="lock"):
    """The lock the stage's program takes on folder (train.py's out_dir/lock, sae.py's sae.lock),
    held while the stage reads, removes or rewrites files there: a run the user started in that
    folder is never touched, and the stage is refused naming it."""
    from cocomix.runtime import hold_lock

    try:
        release = hold_lock(os.path.join(folder, lock_name))
    except RuntimeError as e:
        fail(f"stage {stage}: {e}")
    try:
        yield
    finally:
        release()


def command_stage(
    name, folder, settings, outputs, cmds, a, env, log_name, check=None, lock_name="lock", inputs=()
):
    """A stage made of subprocesses writing into `folder`; returns its record. attempt.json records
    the settings of an attempt until it succeeds: an interrupted attempt with these settings is
    resumed, its checkpoints kept (train.py's ckpt.pt, sae.py's resume file); other outputs of an
    earlier attempt go first, since train.py and sae.py append to their logs and another attempt
    must not leak into this one. check() may refuse the result (fail) or return entries for the
    record. Files in folder are read, removed and written only under its lock (folder_lock); the
    commands take it themselves. stage.json records the SHA-256 of the outputs and inputs (files),
    which a rerun checks before it skips the stage."""
    with folder_lock(name, folder, lock_name):
        rec = prepare_stage(name, folder, settings, outputs, a, inputs)
    if rec is not None:
        return rec
    record, attempt = os.path.join(folder, "stage.json"), os.path.join(folder, "attempt.json")
    prev = read_json(attempt)
    t0, wall = time.time(), prev.get("wall", 0.0) if prev.get("resumed") else 0.0
    try:
        for cmd in cmds:
            cmd = cmd() if callable(cmd) else cmd  # a callable decides after the previous command
            if cmd:
                run_logged(name, [sys.executable, *cmd], os.path.join(folder, log_name), env)
    # the wall time of every attempt, so that a resumed stage reports the time it took in all
    finally:
        with folder_lock(name, folder, lock_name):
            write_json(attempt, {"settings": prev["settings"], "wall": wall + time.time() - t0})
    with folder_lock(name, folder, lock_name):
        rec = {
            "settings": prev["settings"],
            "wall": wall + time.time() - t0,
            **((check and check()) or {}),
            "outputs": file_hashes(record, outputs),
            "inputs": file_hashes(record, inputs),
        }
        write_json(record, rec)
        os.remove(attempt)
    return rec


def prepare_stage(name, folder, settings, outputs, a, inputs):
    """command_stage's start, under the folder's lock: the record when the stage is done, else None,
    with the folder readied for the attempt (its attempt.json says whether it resumes)."""
    record, attempt = os.path.join(folder, "stage.json"), os.path.join(folder, "attempt.json")
    if done(name, record, settings, outputs, a.force, inputs):
        return read_json(record)
    prev, settings = read_json(attempt), json.loads(json.dumps(settings))
    resume = prev is not None and prev.get("settings") == settings
    # that attempt's checkpoints are work: never discarded unasked
    if prev is not None and not resume and not a.force:
        old, new = flatten(prev.get("settings", {})), flatten(settings)
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        fail(
            f"stage {name}: {folder} holds an interrupted attempt with other settings "
            f"({', '.join(diff)}); use another --out_dir, or --force to discard it"
        )
    resume = resume and any(f == "ckpt.pt" or f.endswith(".resume.pt") for f in os.listdir(folder))
    for f in os.listdir(folder):
        if f.split(".")[0] in (("eval",) if resume else ("ckpt", "log", "train", "sae", "eval")):
            os.remove(os.path.join(folder, f))
    if resume:
        print(f"resuming stage {name} from {folder}")
        write_json(attempt, {**prev, "resumed": True})
    else:
        write_json(attempt, {"settings": settings, "wall": 0.0})
    return None


def resumable(cmd, folder):
    """train.py's command, resuming from folder/ckpt.pt when an interrupted attempt left one
    (command_stage keeps it only for an attempt with the same settings)."""
    return lambda: (
        cmd + ["--init_from=resume"] if os.path.exists(os.path.join(folder, "ckpt.pt")) else cmd
    )


def checkpoint_step(stage, run_dir, cfg):
    """A train.py stage is finished when its checkpoint is of step max_iters (train.py exits 130
    after SIGINT or SIGTERM too, with a checkpoint of where it stopped): the record then holds the
    checkpoint's budget."""
    from cocomix.weights import load_torch_file

    try:
        step = load_torch_file(os.path.join(run_dir, "ckpt.pt"), "checkpoint").get("iter_num")
    except (OSError, ValueError) as e:
        fail(f"stage {stage}: {e}")
    # an --ablation value is kept as written: '100'
    n = lambda key, default=None: int(cfg.get(key, default))
    if step != n("max_iters"):
        fail(
            f"stage {stage} stopped at step {step} of max_iters={cfg['max_iters']} (its "
            f"checkpoint); run the same command again to resume it; see {run_dir}/train.log"
        )
    return {
        "iter_num": step,
        "tokens": step * n("batch_size") * n("gradient_accumulation_steps", 1) * n("block_size"),
    }


def given_file(path, flag):
    """The record of a file given instead of a stage's output: its path and SHA-256 (of a folder: of
    its GPT-2 config and weights)."""
    from cocomix.weights import source_sha256

    if not os.path.exists(path):
        fail(f"{flag} {path}: not found")
    try:
        return {"path": path, "sha256": source_sha256(path)}
    except OSError as e:
        fail(f"{flag} {path}: {e}")
