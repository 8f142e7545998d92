"""
The paper's comparison at small scale, in one command:

    # smoke test: about a minute on a 2-core CPU
    python reproduce.py --preset=tiny
    # gutenberg, source + SAE ~50 min, ~25-30 min per seed, 2 cores
    python reproduce.py --preset=cpu --seeds 1,2,3
    # the 69M setup, GPT-2 + OpenAI SAE, one GPU (not measured)
    python reproduce.py --preset=gpu

What each preset trains, needs and costs (measured, with date and machine): the README's table.
    python reproduce.py --preset=tiny --ablation label_rule=activation mix=add lam=0

Data: --data_root (default: the environment variable COCOMIX_DATA), a folder laid out like our
offline copy: tinyshakespeare/input.txt, gutenberg/*.txt, lambada/lambada_test.jsonl (and
benchmarks/ for the gpu preset's zero-shot suite). Without one,
the tiny preset downloads TinyShakespeare and has no OOD or LAMBADA numbers; the cpu preset needs
it (or --input). The tokenizer: tiktoken's, offline from TIKTOKEN_CACHE_DIR (see corpus.py).

Stages, each skipped when its output exists and its stage.json records the same settings (a
finished stage with other settings stops the run: use another --out_dir, or --force to redo it):
  1. data     prepare.prepare(--input) -> OUT/data
  2. source   the concept source, train.py on the preset's source config -> OUT/source
              (or --concept_source FILE: a trained one, recorded by its SHA-256)
  3. sae      sae.py on the source + its concept dictionary -> OUT/sae
              (or --sae_path FILE, likewise)
  4. train    every method x seed for the same token budget and batches -> OUT/runs/{method}_s{seed}
  5. eval     val loss/ppl/bpb, out-of-domain loss, LAMBADA, the zero-shot suite
              (gpu preset: benchmarks/ under the data folder) -> OUT/runs/*/eval.json
  6. report   OUT/results.md, OUT/curves.csv (and OUT/curves.png with matplotlib), always rewritten
Stages 5 and 6 are report.py's; skipping, resuming, refusing and locking are cocomix/stages.py's.
"""

import argparse
import ast
import contextlib
import json
import os
import re
import runpy
import signal

from cocomix.checks import check_config_keys
from cocomix.interrupt import on_ctrl_c

if __name__ == "__main__":  # Ctrl-C in the start-up (the imports below): one line, exit 130
    on_ctrl_c("no stage had started")

from cocomix.report import evaluate_run, report
from cocomix.stages import (
    REPO,
    checkpoint_step,
    command_stage,
    digest,
    done,
    fail,
    file_hashes,
    folder_lock,
    given_file,
    read_json,
    read_log,
    resumable,
    write_json,
)

# -----------------------------------------------------------------------------
# presets. The training settings live in config/ files that train.py reads ('source': the concept
# source's, 'student': what every method's student shares); reproduce.py adds the seed, mode, paths
# and the method's keys. 'sae' are sae.py flags, 'eval' report.evaluate_run's settings; 'input',
# 'ood' and 'lambada' are paths under --data_root. GPT-2's 50257-token LM head dominates the cost of
# these small models: time scales with tokens.
PRESETS = {
    # Smoke test of the whole pipeline: ~2-3 minutes on a loaded 2-core CPU. The numbers mean
    # nothing.
    "tiny": dict(
        input=["tinyshakespeare/input.txt"],
        offline_fallback="source:shakespeare",  # no data folder: download
        ood="gutenberg/Carroll__Through_the_Looking_Glass.txt",
        lambada="lambada/lambada_test.jsonl",
        seeds="1",
        threads=1,  # tiny matrices: a second thread costs more in synchronisation than it saves
        source="config/reproduce_tiny_source.py",
        student="config/reproduce_tiny_student.py",
        sae=dict(
            layer=0,
            n_latents=256,
            k=8,
            tokens=16384,
            batch_size=1024,
            buffer=8192,
            eval_tokens=2048,
        ),
        eval=dict(max_tokens=2048, lambada_max=50, batch_size=16),
    ),
    # Gutenberg on a 2-core CPU. Measured on an idle 2-core EPYC (2 threads, fp32; 2 threads were
    # ~2x one): source ~1800 tok/s -> 2.5M tokens ~25 min; per seed the four students (295k tokens
    # each) ~25 min. The SAE took 9.2 min in docs/results.md's run (bf16 on a shared machine, where
    # the source took 41). SAE: 8192 latents = 32 per model dimension, k = 32,
    # on block 2 of 6, as the paper's block 5 of 12.
    "cpu": dict(
        input=["gutenberg"],
        ood="tinyshakespeare/input.txt",
        lambada="lambada/lambada_test.jsonl",
        seeds="1",
        threads=2,
        source="config/reproduce_cpu_source.py",
        student="config/reproduce_cpu_student.py",
        sae=dict(
            layer=2,
            n_latents=8192,
            k=32,
            tokens=2_097_152,
            batch_size=4096,
            buffer=131072,
            eval_tokens=32768,
        ),
        eval=dict(max_tokens=32768, lambada_max=500, batch_size=8),
    ),
    # The paper's 69M setup, GPT-2 124M + OpenAI's layer-5 32k SAE as the concept source,
    # OpenWebText (needs `datasets`; train.py needs the GPT-2 weights). 1000 steps of 0.5M tokens =
    # 0.52B tokens per method (the paper: 20B). Not measured: 1.4e18 training FLOPs for the four
    # methods, about 1 hour at 40% MFU on one H100 (the README's preset table).
    "gpu": dict(
        input="source:openwebtext",
        ood="tinyshakespeare/input.txt",
        lambada="lambada/lambada_test.jsonl",
        seeds="1",
        threads=0,
        concept_source="gpt2",
        sae_path="openai:resid_post_mlp_v5_32k/5",
        sae_layer=5,
        n_concepts=32768,
        student="config/reproduce_gpu_student.py",
        eval=dict(max_tokens=2_000_000, lambada_max=None, batch_size=32),
        suite="benchmarks",
    ),
}
METHODS = ("ntp", "cocomix", "kd", "pause")
# -----------------------------------------------------------------------------


def flags(d):
    return [f"--{k}={v}" for k, v in d.items() if v is not None]


def read_config(path):
    """The settings a config/ file (path relative to the repo) assigns: what train.py's configurator
    sets from it, less the folders, which reproduce.py sets itself (a stage records where its inputs
    come from by their digests)."""
    # config files exec their base files by paths relative to the repo, as train.py runs them
    with contextlib.chdir(REPO):
        return {
            k: v
            for k, v in runpy.run_path(path).items()
            if not k.startswith("_") and k not in ("data_dir", "out_dir")
        }


def train_command(config_file, extra, data_dir, out_dir):
    """train.py on a config/ file with the keys reproduce.py sets on top (later flags win, as in a
    dict), and the settings that makes: what the stage records, so a changed config file is a
    changed stage."""
    return (
        ["train.py", config_file, *flags(extra), f"--data_dir={data_dir}", f"--out_dir={out_dir}"],
        {**read_config(config_file), **extra},
    )


def parse_value(v):
    """'288' -> 288, '3e-3' -> 0.003, 'True' -> True, anything else stays a string (as
    configurator.py reads it)."""
    try:
        return ast.literal_eval(v)
    except (ValueError, SyntaxError):
        return v


def parse_ablation(spec):
    """'label_rule=activation' or 'mix=add,lam=0' -> ('cocomix[...]', {key: value})."""
    pairs = [p.split("=", 1) for p in spec.split(",")]
    if not all(len(p) == 2 and p[0] and p[1] for p in pairs):
        fail(f"--ablation {spec!r}: expected KEY=VALUE[,KEY=VALUE] (train.py config keys)")
    return f"cocomix[{spec}]", dict(pairs)


def under(root, path):
    """path inside the data folder root, absolute; None without a data folder."""
    return os.path.abspath(os.path.join(root, path)) if root else None


def relative(v, out):
    """A path inside out, relative to it: a record that survives moving out."""
    return os.path.relpath(v, out) if isinstance(v, str) and v.startswith(out) else v


# -----------------------------------------------------------------------------
# the flags, every one checked before the first stage: a typo costs a second, not the stages


def arg_parser():
    p = argparse.ArgumentParser(
        description="CoCoMix vs NTP, KD and pause at small scale, end to end."
    )
    p.add_argument("--preset", choices=sorted(PRESETS), required=True)
    p.add_argument(
        "--input", nargs="+", help="text files/folders (default: the preset's, under --data_root)"
    )
    p.add_argument(
        "--data_root",
        help="folder of the data: tinyshakespeare/input.txt, gutenberg/, lambada/, and "
        "benchmarks/ for the gpu preset (default: $COCOMIX_DATA; '' for none)",
    )
    p.add_argument("--out_dir", help="default out/reproduce_{preset}")
    p.add_argument("--seeds", help="comma-separated (default: the preset's)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"subset of {','.join(METHODS)}")
    p.add_argument(
        "--ablation",
        nargs="+",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help="extra CoCoMix runs with these train.py keys, "
        "e.g. label_rule=activation mix=add lam=0",
    )
    p.add_argument(
        "--set",
        nargs="+",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        dest="overrides",
        help="student train.py keys for every method, e.g. max_iters=288 learning_rate=3e-3 (the "
        "budget, the schedule); use a new --out_dir, or "
        "--force, since the finished runs had other settings",
    )
    p.add_argument(
        "--concept_source",
        help="a trained concept source (train.py checkpoint or GPT-2 folder) in place of "
        "the source stage (and KD's teacher); its SHA-256 goes into the records",
    )
    p.add_argument(
        "--sae_path",
        help="an SAE of that source (sae.py's file) in place of the sae stage; needs "
        "--concept_source; its SHA-256 goes into the records",
    )
    p.add_argument("--ood", help="out-of-domain text file ('' to skip; default: the preset's)")
    p.add_argument(
        "--force", action="store_true", help="redo stages whose recorded settings differ"
    )
    return p


def parse_flags():
    """The flags, checked, with a.out (the out_dir), a.seeds [int], a.methods [label] (the
    ablations' labels last), a.ablations {label: {key: value}} and a.sets {key: value} added."""
    a = arg_parser().parse_args()
    a.out = os.path.abspath(a.out_dir or os.path.join(REPO, "out", f"reproduce_{a.preset}"))
    seeds = [s.strip() for s in (a.seeds or PRESETS[a.preset]["seeds"]).split(",") if s.strip()]
    if bad := [s for s in seeds if not (s.isdigit() and int(s) < 2**63)]:
        fail(f"--seeds: {', '.join(bad)} is not a seed (comma-separated integers in [0, 2**63))")
    a.seeds = [int(s) for s in seeds]
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    if bad := [m for m in methods if m not in METHODS]:
        fail(f"unknown method(s) {', '.join(bad)}; choose from {', '.join(METHODS)}")
    if (
        len(set(a.seeds)) < len(a.seeds)
        or len(set(methods)) < len(methods)
        or len(set(a.ablation)) < len(a.ablation)
    ):
        fail(
            "a seed, method or ablation is given twice: it would count twice in every mean and test"
        )
    a.ablations = dict(parse_ablation(s) for s in a.ablation)
    if a.sae_path and not a.concept_source:
        fail("--sae_path needs --concept_source: an SAE belongs to the model it was trained on")
    a.sets = {}
    for spec in a.overrides:
        key, eq, value = spec.partition("=")
        if not eq or not key:
            fail(f"--set {spec!r}: expected KEY=VALUE (a train.py config key)")
        a.sets[key] = parse_value(value)
    keys = [("--ablation", k) for kv in a.ablations.values() for k in kv]
    keys += [("--set", k) for k in a.sets]
    try:  # a misspelt key is refused here, not when its stage starts train.py
        check_config_keys(keys, os.path.join(REPO, "train.py"))
    except ValueError as e:
        fail(str(e))
    a.methods = methods + list(a.ablations)
    if not a.seeds or not a.methods:
        fail("nothing to run: give at least one seed and one method")
    return a


def data_inputs(a, P):
    """The data folder (--data_root, else $COCOMIX_DATA; '' for none) and the data stage's input:
    a list of paths that exist, or 'source:NAME' for a named source that prepare.py downloads."""
    root = a.data_root if a.data_root is not None else os.environ.get("COCOMIX_DATA", "")
    if root and not os.path.isdir(root):
        if a.data_root:
            fail(f"--data_root {root}: not a folder")
        # e.g. .ci/run's default on another machine
        print(f"COCOMIX_DATA={root} is not a folder: no data folder")
        root = ""
    if a.input:
        inputs = [os.path.abspath(x) for x in a.input]
    elif isinstance(P["input"], str):  # a named source that prepare.py downloads
        inputs = P["input"]
    else:
        inputs = [under(root, x) for x in P["input"]] if root else None
        if not (inputs and all(os.path.exists(x) for x in inputs)) and "offline_fallback" in P:
            print(
                f"no {', '.join(P['input'])} in a data folder (--data_root, COCOMIX_DATA): "
                f"prepare.py --{P['offline_fallback'].replace(':', ' ')}"
            )
            inputs = P["offline_fallback"]
        elif not inputs:
            fail(
                f"preset {a.preset} reads {', '.join(P['input'])} from the data folder: give "
                "--data_root DIR or set COCOMIX_DATA to a folder holding it, or give --input FILES"
            )
    if isinstance(inputs, list) and (missing := [x for x in inputs if not os.path.exists(x)]):
        fail(
            f"input not found: {', '.join(missing)}"
            + ("" if a.input else "; pass --input FILES or another --data_root")
        )
    return root, inputs


def text_bytes(path):
    """A text file's size, or the total of a folder's .txt files: the data stage's cheap change
    check."""
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(
        os.path.getsize(os.path.join(d, f))
        for d, _, fs in os.walk(path)
        for f in fs
        if f.endswith(".txt")
    )


def start(a, P):
    """Takes OUT/lock (one reproduce.py per out_dir: a second would discard the first's work in
    progress); returns the stages' environment and the device."""
    from cocomix.runtime import hold_lock

    try:
        hold_lock(os.path.join(a.out, "lock"))
    except RuntimeError as e:
        fail(str(e))
    # child processes: unbuffered, so progress shows as it happens (and TIKTOKEN_CACHE_DIR as the
    # user set it)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    import torch

    if P["threads"] and "OMP_NUM_THREADS" not in os.environ:  # the user's setting wins
        env["OMP_NUM_THREADS"] = str(P["threads"])
        torch.set_num_threads(P["threads"])
    return env, "cuda" if torch.cuda.is_available() else "cpu"


# -----------------------------------------------------------------------------
# the stages, in the order they run. Each one is skipped when its stage.json records the same
# settings (cocomix/stages.py); deps holds the digest of every finished stage's settings, so that a
# stage built on another one is redone when that one changes.


def stage_data(a, inputs):
    """1. data. Reads the input texts (or a named source's download); writes OUT/data/train.bin,
    val.bin, meta.json and stage.json. Returns data_dir, its files and deps."""
    data_dir = os.path.join(a.out, "data")
    data_files = [os.path.join(data_dir, f) for f in ("train.bin", "val.bin", "meta.json")]
    if isinstance(inputs, list):
        data_settings = {"inputs": [[os.path.abspath(x), text_bytes(x)] for x in inputs]}
    else:
        data_settings = {"inputs": inputs}
    record = os.path.join(data_dir, "stage.json")
    if not done("data", record, data_settings, data_files, a.force):
        import prepare

        try:
            if isinstance(inputs, list):
                prepare.prepare(inputs, data_dir, overwrite=a.force)
            else:
                prepare.prepare_source(inputs.removeprefix("source:"), data_dir, overwrite=a.force)
        except prepare.PrepareError as e:
            fail(f"stage data failed: {e}")
        write_json(record, {"settings": data_settings, "outputs": file_hashes(record, data_files)})
    return data_dir, data_files, {"data": digest(data_settings)}


def stage_source(a, P, data_dir, data_files, deps, env):
    """2. concept source. Reads OUT/data; writes OUT/source/ckpt.pt, train.log and stage.json. Or
    takes --concept_source (recorded by its SHA-256, so that the stages built on it, SAE, CoCoMix
    and KD, refuse another file under the same path) or the preset's GPT-2. Returns its path."""
    if a.concept_source:
        source = os.path.abspath(a.concept_source)
        deps["source"] = given_file(source, "--concept_source")
        print(f"skip source: given, {source} (sha256 {deps['source']['sha256'][:12]})")
        return source
    if P.get("concept_source"):
        source = deps["source"] = P["concept_source"]
        print(f"skip source: the concept source is {source}")
        return source
    src_dir = os.path.join(a.out, "source")
    source = os.path.join(src_dir, "ckpt.pt")
    cmd, cfg = train_command(P["source"], {"seed": 1337}, data_dir, src_dir)
    settings = {"train": cfg, "deps": dict(deps)}
    command_stage(
        "source",
        src_dir,
        settings,
        [source],
        [resumable(cmd, src_dir)],
        a,
        env,
        "train.log",
        lambda: checkpoint_step("source", src_dir, cfg),
        inputs=data_files,
    )
    deps["source"] = digest(settings)
    return source


def given_sae(a, source, deps):
    """3. SAE given as --sae_path: checked against its concept source, recorded by its SHA-256.
    Reads the file; writes nothing. Returns (path, n_concepts, layer)."""
    from sae import SAE, check_sae_host

    sae_path = os.path.abspath(a.sae_path)
    deps["sae"] = given_file(sae_path, "--sae_path")
    try:
        sae = SAE.load(sae_path)
        check_sae_host(sae, source)
    except (OSError, ValueError) as e:
        fail(f"--sae_path: {e}")
    n_concepts, sae_layer = sae.n_latents, sae.meta.get("layer")
    if sae_layer is None:
        fail(f"--sae_path {sae_path}: the file does not record its layer (an OpenAI state dict?)")
    print(
        f"skip sae: given, {sae_path} (sha256 {deps['sae']['sha256'][:12]}, "
        f"layer {sae_layer}, {n_concepts} latents)"
    )
    return sae_path, n_concepts, sae_layer


def stage_sae(a, P, source, data_dir, data_files, deps, env, device):
    """3. SAE and its concept dictionary. Reads the concept source and OUT/data; writes
    OUT/sae/sae.pt, sae.concepts.json, sae.log and stage.json (with the preset's OpenAI SAE: only
    the dictionary, next to the downloaded file). Returns (path, n_concepts, layer)."""
    if a.sae_path:
        return given_sae(a, source, deps)
    sae_dir, D = os.path.join(a.out, "sae"), f"--data_dir={data_dir}"
    if P.get("sae_path"):
        sae_path, n_concepts, sae_layer = P["sae_path"], P["n_concepts"], P["sae_layer"]
        settings, outputs = {"sae": sae_path, "deps": dict(deps)}, []
        describe = ["sae.py", "--describe", f"--sae_path={sae_path}", f"--concept_source={source}"]
        cmds = [[*describe, f"--layer={sae_layer}", D, f"--device={device}"]]
    else:
        sae_path = os.path.join(sae_dir, "sae.pt")
        n_concepts, sae_layer = P["sae"]["n_latents"], P["sae"]["layer"]
        settings = {"sae": P["sae"], "deps": dict(deps)}
        concepts = os.path.join(sae_dir, "sae.concepts.json")
        outputs = [sae_path, concepts]
        cmds = [
            ["sae.py", f"--concept_source={source}", f"--sae_path={sae_path}", "--seed=1337"]
            + [*flags(P["sae"]), D, f"--device={device}"],
            # sae.py stopped by a signal exits 130 (run_logged says so); this catches any other
            # early end
            lambda: (
                None
                if os.path.exists(sae_path)
                else fail(
                    "stage sae stopped before the end; run the same command again to resume it; "
                    f"see {sae_dir}/sae.log"
                )
            ),
            # training writes the dictionary itself; describe only if it did not
            lambda: (
                None
                if os.path.exists(concepts)
                else ["sae.py", "--describe", f"--sae_path={sae_path}", D]
            ),
        ]
    command_stage(
        "sae",
        sae_dir,
        settings,
        outputs,
        cmds,
        a,
        env,
        "sae.log",
        lock_name="sae.lock",
        inputs=[source, *data_files],
    )
    deps["sae"] = digest(settings)
    return sae_path, n_concepts, sae_layer


def student_settings(a, P, n_concepts):
    """What every method's student shares (the preset's student config with --set on top), and the
    NTP baseline's width, parameter-matched to the CoCoMix student."""
    from model import GPTConfig, ntp_matched_width

    student = {**read_config(P["student"]), **a.sets}
    keys = ("n_layer", "n_head", "n_embd", "block_size", "concept_topk", "insert_layer")
    width = ntp_matched_width(GPTConfig(**{k: student[k] for k in keys}, n_concepts=n_concepts))
    print(
        f"NTP baseline width {width}: parameter-matched to the CoCoMix student "
        f"(d={student['n_embd']}, {n_concepts} concepts)"
    )
    return student, width


def stage_students(a, P, width, source, sae, data_dir, data_files, deps, env):
    """4. every method x seed, on the same student config, token budget and seed, hence the same
    batches. Reads OUT/data, the concept source and the SAE; writes OUT/runs/{method}_s{seed}/
    ckpt.pt, log.jsonl, train.log and stage.json. Returns {(method, seed): run}."""
    sae_path, _, sae_layer = sae
    method_cfg = {
        "ntp": (dict(mode="ntp", n_embd=width), ("data",)),
        "cocomix": (
            dict(mode="cocomix", concept_source=source, sae_path=sae_path, sae_layer=sae_layer),
            ("data", "source", "sae"),
        ),
        "kd": (dict(mode="kd", concept_source=source), ("data", "source")),
        "pause": (dict(mode="pause"), ("data",)),
    }
    for label, over in a.ablations.items():
        method_cfg[label] = ({**method_cfg["cocomix"][0], **over}, method_cfg["cocomix"][1])
    runs = {}
    for seed in a.seeds:
        for m in a.methods:
            name = re.sub(r"[^A-Za-z0-9_.-]+", "_", m).strip("_") + f"_s{seed}"
            run_dir = os.path.join(a.out, "runs", name)
            over, needs = method_cfg[m]
            extra = {**a.sets, **over, "seed": seed}
            cmd, cfg = train_command(P["student"], extra, data_dir, run_dir)
            cmd += [f"--wandb_run_name={name}"]  # with --set wandb_log=True; not a setting
            settings = {
                "train": {k: relative(v, a.out) for k, v in cfg.items()},
                "deps": {k: deps[k] for k in needs},
            }
            name = f"train {m} seed {seed}"
            rec = command_stage(
                name,
                run_dir,
                settings,
                [os.path.join(run_dir, "ckpt.pt")],
                [resumable(cmd, run_dir)],
                a,
                env,
                "train.log",
                lambda: checkpoint_step(name, run_dir, cfg),
                inputs=[
                    *data_files,
                    *(over[k] for k in ("concept_source", "sae_path") if k in over),
                ],
            )
            runs[m, seed] = {"dir": run_dir, "settings": settings, "train": rec}
    return runs


def eval_settings(a, P, root, inputs):
    """5. what the evaluation reads: the preset's settings with the OOD text, LAMBADA and the
    zero-shot suite where they are there, and the notes for the report saying what was left out."""
    ood = a.ood if a.ood is not None else under(root, P["ood"])
    lambada, notes = under(root, P["lambada"]), []
    if not root:
        notes.append(
            "- No data folder (--data_root, COCOMIX_DATA): no "
            f"{'OOD loss or ' if ood is None else ''}LAMBADA numbers."
        )
    training = [os.path.abspath(x) for x in inputs] if isinstance(inputs, list) else []
    if ood and not os.path.isfile(ood):
        notes.append(f"- OOD text {ood} is not there: no OOD loss.")
        ood = ""
    elif ood and any(
        os.path.abspath(ood) == x or os.path.abspath(ood).startswith(x + os.sep) for x in training
    ):
        notes.append(f"- OOD text {ood} is part of the training input: no OOD loss.")
        ood = ""
    if lambada and not os.path.isfile(lambada):
        notes.append(f"- LAMBADA ({lambada}) is not there: no LAMBADA numbers.")
        lambada = ""
    ood, lambada = ood or "", lambada or ""
    ev = {
        **P["eval"],
        "ood": ood and os.path.abspath(ood),
        "lambada": lambada and os.path.abspath(lambada),
    }
    suite = under(root, P["suite"]) if P.get("suite") else None
    if suite and os.path.isdir(suite):
        ev["suite"] = os.path.abspath(suite)
        notes.append(
            f"- Zero-shot suite: every benchmark file in `{suite}` (scripts/eval.py --suite)."
        )
    elif P.get("suite"):
        notes.append(
            f"- No benchmark folder {suite or P['suite']} under the data folder: "
            "no zero-shot suite."
        )
    if ood:
        notes.append(f"- OOD: `{os.path.basename(ood)}`, first {ev['max_tokens']:,} tokens.")
    if lambada:
        notes.append(
            f"- LAMBADA: first {ev['lambada_max'] or 'all'} "
            "examples, contexts cut to the model's window."
        )
    return ev, notes


def stage_eval(a, runs, ev, data_dir, device):
    """5. evaluate every final checkpoint. Reads OUT/runs/*/ckpt.pt, OUT/data and ev's texts;
    writes OUT/runs/*/eval.json. Adds each run's result and train.py log to runs."""
    from model import load_checkpoint

    for (m, seed), r in runs.items():
        record = os.path.join(r["dir"], "eval.json")
        settings = {"eval": ev, "run": digest(r["settings"])}
        with folder_lock(f"eval {m} seed {seed}", r["dir"]):
            ckpt = os.path.join(r["dir"], "ckpt.pt")
            if not done(f"eval {m} seed {seed}", record, settings, [], a.force, [ckpt]):
                try:
                    model, _ = load_checkpoint(ckpt, device)
                    res = evaluate_run(model, data_dir, ev, device)
                except Exception as e:  # EvalError, or a broken checkpoint
                    fail(f"stage eval {m} seed {seed} failed: {type(e).__name__}: {e}")
                inputs = file_hashes(record, [ckpt])
                write_json(record, {"settings": settings, "result": res, "inputs": inputs})
                print(f"{m} seed {seed}: val loss {res['val']['loss']:.4f}")
        r["eval"], r["log"] = read_json(record)["result"], read_log(r["dir"])


def stage_report(a, runs, student, width, source, sae, notes):
    """6. report. Reads the records above (and the SAE's metrics log); writes OUT/results.md,
    curves.csv and curves.png, always (a second or two: the file follows this report code), and
    prints the results table."""
    s, (sae_path, n_concepts, _) = student, sae
    tokens = s["batch_size"] * s.get("gradient_accumulation_steps", 1) * s["block_size"]
    notes.insert(
        0,
        f"Preset `{a.preset}`. Students: {s['n_layer']} layers, d={s['n_embd']} (NTP d={width}, "
        f"parameter-matched), block {s['block_size']}, {s['max_iters']} steps of {tokens:,} "
        f"tokens; concept source `{relative(source, a.out)}`, SAE `{relative(sae_path, a.out)}` "
        f"({n_concepts} concepts).",
    )
    # sae.py's log, next to its SAE (given or trained here)
    metrics = os.path.splitext(sae_path)[0] + ".metrics.jsonl"
    if os.path.exists(metrics):
        for e in [json.loads(x)["eval"] for x in open(metrics) if '"eval"' in x][-1:]:
            notes.insert(
                1,
                f"- SAE on held-out text: FVU {e['fvu']:.3f}, L0 "
                f"{e['l0']:.1f}, dead fraction {e['dead']:.3f}.",
            )
    table = report(a.out, runs, a.methods, a.seeds, notes)
    print(f"\n{table}\n")
    print(f"results: {os.path.join(a.out, 'results.md')}")


# -----------------------------------------------------------------------------


def reproduce():
    a = parse_flags()
    P = PRESETS[a.preset]
    root, inputs = data_inputs(a, P)
    env, device = start(a, P)
    data_dir, data_files, deps = stage_data(a, inputs)
    source = stage_source(a, P, data_dir, data_files, deps, env)
    sae = stage_sae(a, P, source, data_dir, data_files, deps, env, device)
    student, width = student_settings(a, P, sae[1])
    runs = stage_students(a, P, width, source, sae, data_dir, data_files, deps, env)
    ev, notes = eval_settings(a, P, root, inputs)
    stage_eval(a, runs, ev, data_dir, device)
    stage_report(a, runs, student, width, source, sae, notes)


def main():
    # Ctrl-C, and SIGTERM like it: the running stage saves and exits, then status 130
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        reproduce()
    except KeyboardInterrupt:
        fail("interrupted; run the same command again to resume", 130)


if __name__ == "__main__":
    main()
