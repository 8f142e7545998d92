"""
Weights & Biases for train.py, an optional extra (pip install wandb): with --wandb_log=True every
record train.py writes to log.jsonl (the training steps' losses and learning rate, the evaluations
with the concept loss, recall and label-cache counts) is also logged to a W&B run, at its step.
WANDB_MODE=offline keeps the run in out_dir/wandb for a later `wandb sync`. The run's id is kept in
out_dir/wandb_id, so that --init_from=resume continues the same run.
"""

import os

MISSING = "wandb_log=True needs wandb, which is not installed: pip install wandb"


def wandb_missing():
    """The one-line error for wandb_log=True without wandb; None when it is installed."""
    import importlib.util

    return MISSING if importlib.util.find_spec("wandb") is None else None


def start_run(out_dir, project, name, config, resume):
    """A W&B run for train.py's records (the function returned logs one): a new one, or with
    resume the one whose id out_dir/wandb_id holds."""
    import wandb

    from cocomix.weights import write_atomic

    id_path = os.path.join(out_dir, "wandb_id")
    run_id = None
    if resume and os.path.exists(id_path):
        with open(id_path) as f:
            run_id = f.read().strip() or None
    run = wandb.init(
        project=project,
        name=name or os.path.basename(os.path.abspath(out_dir)),
        config=config,
        id=run_id,  # None: a new run, with the id W&B gives it
        resume="allow" if run_id else None,
        dir=os.environ.get("WANDB_DIR", out_dir),
    )
    write_atomic(id_path, run.id + "\n")

    def log(record):
        """One log.jsonl record, at its step: 'iter' for an evaluation, 'train_step' for a step."""
        step = record.get("iter", record.get("train_step"))
        # an evaluation's lr is the next step's: at a step with both records, it would overwrite
        # the lr of the step's own record, which every training record carries
        drop = ("iter", "train_step", "lr") if "iter" in record else ("train_step",)
        run.log({k: v for k, v in record.items() if k not in drop}, step=step)

    return log
