"""A training job for the fault-injection tests, run as a subprocess: `python reliability_job.py --help`."""

import argparse
import os
import resource
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from helpers import TinyImageModel, image_loader, make_trainer  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402

from lightning_monitor import MultiLogger  # noqa: E402


class Progress(Callback):
    """Writes 'step wall_time' after every batch (flushed), sleeps to pace the run (``hold`` seconds at step
    ``hold_at``: a signal sent once that step shows lands in this sleep), and fails on request."""

    def __init__(self, path, sleep, fail_at, hold_at=-1, hold=0.0):
        self.path, self.sleep, self.fail_at = path, sleep, fail_at
        self.hold_at, self.hold = hold_at, hold

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step - 1
        if self.path:
            with open(self.path, "a") as f:
                f.write(f"{step} {time.time()}\n")
        if step == self.fail_at:
            raise RuntimeError(f"boom at step {step}")
        time.sleep(self.hold if step == self.hold_at else self.sleep)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", required=True)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--fail-at", type=int, default=-1)
    parser.add_argument("--no-wandb", action="store_true")
    parser.add_argument("--fsize-limit", type=int, default=0, help="RLIMIT_FSIZE in bytes (0: none)")
    parser.add_argument("--flush-secs", type=float, default=None)
    parser.add_argument("--wandb-settings", default="", help="k=v,k=v passed as wandb settings")
    parser.add_argument("--progress", default="")
    parser.add_argument("--hold-at", type=int, default=-1, help="the step after which the job sleeps --hold seconds")
    parser.add_argument("--hold", type=float, default=0.0)
    parser.add_argument("--version", type=int, default=None)
    parser.add_argument("--skip-wandb-probe", action="store_true",
                        help="let any server pass the online probe (as a broken W&B server that answers it would)")
    args = parser.parse_args()
    # Ctrl-C raises KeyboardInterrupt here even when the parent ignores SIGINT (a shell's background job does, and
    # Python then keeps it ignored): the tests send it as a terminal would
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if args.skip_wandb_probe:
        from lightning_monitor._run import wandb_probe

        wandb_probe._not_a_wandb_server = lambda *a, **k: None
    if args.fsize_limit:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG from write() instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (args.fsize_limit, args.fsize_limit))
    tb = {} if args.flush_secs is None else {"flush_secs": args.flush_secs}
    wandb = False
    if not args.no_wandb:
        settings = dict(kv.split("=") for kv in args.wandb_settings.split(",") if kv)
        wandb = {"settings": {k: float(v) for k, v in settings.items()}} if settings else True
    logger = MultiLogger(save_dir=args.runs, name="job", version=args.version, tensorboard=tb, wandb=wandb)
    trainer = make_trainer(
        args.runs, logger=logger, max_steps=args.steps, log_every_n_steps=1,
        callbacks=[Progress(args.progress, args.sleep, args.fail_at, args.hold_at, args.hold)],
    )
    trainer.fit(TinyImageModel(), image_loader(n=16 * args.steps))
    print("JOB DONE", trainer.state.status, flush=True)


if __name__ == "__main__":
    main()
