"""The README's command blocks, read out of README.md, run top to bottom on a fresh clone: every
file or folder a step reads is made by an earlier step (or is a data folder's, or a name that
downloads), and every train.py key a step sets exists."""

import contextlib
import os
import runpy
import shlex

import pytest

from cocomix.checks import config_keys
from cocomix.weights import GPT2_NAMES
from tests.fixtures import ROOT

TRAIN_KEYS = set(config_keys(os.path.join(ROOT, "train.py")))


def readme_block(title):
    """The commands of the first ```bash block under the README heading `title`, each as its words
    (continuation lines joined, comments dropped)."""
    text = open(os.path.join(ROOT, "README.md")).read()
    section = text[text.index(f"\n## {title}\n") :]
    start = section.index("```bash\n") + len("```bash\n")
    block = section[start : section.index("\n```", start)]
    words = [shlex.split(line, comments=True) for line in block.replace("\\\n", " ").splitlines()]
    return [w for w in words if w]


def parse(words):
    """['python', 'x.py', 'a', '--k=v', '--i', 'p'] -> ('x.py', ['a'], {'k': 'v', 'i': 'p'})."""
    assert words[0] == "python", words
    script, args = (words[2], words[3:]) if words[1] == "-m" else (words[1], words[2:])
    positional, flags, i = [], {}, 0
    while i < len(args):
        if args[i].startswith("--"):
            key, eq, value = args[i][2:].partition("=")
            if not eq:  # --key value, or a switch
                has_value = i + 1 < len(args) and not args[i + 1].startswith("--")
                value, i = (args[i + 1], i + 1) if has_value else (True, i)
            flags[key] = value
        else:
            positional.append(args[i])
        i += 1
    return script, positional, flags


def data_file(path):
    """A path in the data folder ($COCOMIX_DATA): there when the variable names a folder."""
    if "$COCOMIX_DATA" in path and os.path.isdir(os.environ.get("COCOMIX_DATA", "")):
        assert os.path.exists(os.path.expandvars(path)), f"{path}: not in the data folder"
    return "$COCOMIX_DATA" in path


def check_block(commands):
    """Follows the commands' files: fails naming the first step that reads what no earlier step
    made."""
    made = set()

    def need(path, step):
        norm = os.path.normpath(path)
        assert norm in made or data_file(path), f"step {step!r} reads {path}, which no step made"

    for words in commands:
        if words[0] != "python":  # pip install: makes no file a step reads
            continue
        step = " ".join(words)
        script, positional, flags = parse(words)
        if script == "train.py":
            settings = {"data_dir": "data/shakespeare", "out_dir": "out"}
            for config in positional:  # read as train.py reads it, from the repo root
                assert os.path.isfile(os.path.join(ROOT, config)), f"{step}: no {config}"
                with contextlib.chdir(ROOT):
                    settings.update(runpy.run_path(config))
            assert not (unknown := set(flags) - TRAIN_KEYS), f"{step}: no config keys {unknown}"
            settings.update(flags)
            need(settings["data_dir"], step)
            source, sae = settings.get("concept_source", ""), settings.get("sae_path", "")
            if source and source not in GPT2_NAMES:
                need(source, step)
            if sae and not sae.startswith("openai:"):
                need(sae, step)
            made.add(os.path.normpath(os.path.join(settings["out_dir"], "ckpt.pt")))
        elif script == "prepare.py":
            if "input" in flags:
                assert data_file(flags["input"]), f"{step}: input outside the data folder"
            made.add(os.path.normpath(flags["out_dir"]))
        elif script == "sae.py":
            need(flags["data_dir"], step)
            need(flags["concept_source"], step)
            made.add(os.path.normpath(flags["sae_path"]))
        else:  # the readers: sample.py, scripts.eval, scripts.measure_steering, scripts.export_hf
            for key in ("data_dir", "ckpt", "lambada"):
                if key in flags:
                    need(flags[key], step)
            if "out_dir" in flags:
                need(os.path.join(flags["out_dir"], "ckpt.pt"), step)
    return made


@pytest.mark.parametrize("title", ["Step by step", "The paper's setup on one GPU"])
def test_readme_block_makes_what_each_step_reads(title):
    commands = readme_block(title)
    assert len(commands) >= 4, commands
    made = check_block(commands)
    assert made, title


def test_block_check_finds_a_step_without_its_input():
    """The check itself: a step that reads a checkpoint no step trained fails, naming the step."""
    commands = [
        ["python", "prepare.py", "--source", "shakespeare", "--out_dir", "data/s"],
        ["python", "train.py", "config/tiny.py", "--data_dir=data/s", "--out_dir=out/a"],
        ["python", "-m", "scripts.export_hf", "--ckpt=out/b/ckpt.pt"],
    ]
    check_block(commands[:2])
    with pytest.raises(AssertionError, match="reads out/b/ckpt.pt, which no step made"):
        check_block(commands)
    with pytest.raises(AssertionError, match="no config keys {'max_iter'}"):
        check_block([commands[0], [*commands[1], "--max_iter=2"]])
