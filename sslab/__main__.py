"""Command line: ``python -m sslab {pretrain,probe,curve,datasets,bench} ...``.

Runs with torch and torchvision alone; notebook-only packages (matplotlib, umap) are used
only when present.
"""
from __future__ import annotations

import argparse
import sys

from .data import DATASETS


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows each flag's default, except where the help already says it or there is none."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is None or isinstance(action.default, bool) or action.default == [] or "default" in text:
            return text
        if isinstance(action.default, (list, tuple)):  # as it is typed: 1,2,4 rather than [1, 2, 4]
            return f"{text} (default: {','.join(map(str, action.default))})"
        return super()._get_help_string(action)


def _int_list(name: str):
    def parse(text: str):
        allowed = f"--{name}={text!r} is not allowed; allowed: comma-separated integers without repeats, e.g. 1,2,4"
        try:
            values = [int(v) for v in text.split(",")]
        except ValueError:  # a word, or an empty item as in '1,,2'
            raise argparse.ArgumentTypeError(allowed) from None
        if len(set(values)) < len(values):
            raise argparse.ArgumentTypeError(allowed)
        return values
    return parse


def _device_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    p.add_argument("--data-root", default=None, help="folder to look in first for datasets (and to download into)")
    p.add_argument("--out", default=None, help="outputs folder (default: the repository's outputs/, or $SSLAB_OUTPUTS)")
    p.add_argument("--deterministic", action="store_true", help="bit-for-bit repeatable runs (CPU)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def _pretrain_args(p: argparse.ArgumentParser, prefix: str = "") -> None:
    from .train import CHECKPOINT_EVERY_S
    p.add_argument(f"--{prefix}epochs", dest="epochs", type=int, default=3, help="pretraining epochs")
    p.add_argument("--limit", type=int, default=None, help="use only N unlabeled images (seeded shuffle)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per step (default per method: rotation 150 (×4 rotations), VAEs 128)")
    p.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (default per method: rotation SGD 0.05, VAEs Adam 1e-3)")
    p.add_argument("--image-size", type=int, default=None, help="resize images to N px (default: native size)")
    p.add_argument("--width", type=float, default=None,
                   help="channel multiplier of the AlexNet (default: 1.0 on CUDA = the study's net, 0.25 on CPU)")
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto",  # pretrain.COMPILE_CHOICES
                   help="torch.compile the training loss; auto: only where a measurement in docs/BENCHMARKS.md "
                        "showed it faster (none yet, so off)")
    p.add_argument("--checkpoint-every", type=float, default=CHECKPOINT_EVERY_S, metavar="SECONDS",
                   help="write the resume checkpoint at the end of an epoch once this many seconds have passed "
                        "since the last one (0: after every epoch); the last epoch's is always written")
    p.add_argument("--data-budget", type=float, default=None, metavar="GB",
                   help="device memory the unlabeled images may take (default: half the free memory on CUDA); "
                        "a larger pool streams from pinned host memory in chunks, with the same result")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sslab", formatter_class=_Formatter,
                                     description="sslab: self-supervised pretraining when labels are scarce.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", formatter_class=_Formatter,
                       help="pretrain one pretext task (reuses a complete run with the same config)",
                       description="Pretrain a pretext task on the dataset's unlabeled pool. The last line "
                                   "printed is the run folder.")
    p.add_argument("--method", default="rotation", help="rotation, vae or siamese-vae")
    p.add_argument("--dataset", default="fashion-mnist", help=f"one of: {', '.join(DATASETS)}")
    _pretrain_args(p)
    p.add_argument("--seed", type=int, default=0, help="random seed (weights, shuffling, augmentation)")
    p.add_argument("--force", action="store_true", help="train again even if a complete run exists")
    p.add_argument("--sync-bn", action="store_true",
                   help="under torchrun: SyncBatchNorm, batch statistics over all processes (CUDA only)")
    _device_args(p)
    from .distributed import HELP as distributed_help
    p.epilog = distributed_help

    p = sub.add_parser("datasets", formatter_class=_Formatter, help="list datasets and where each was found")
    p.add_argument("--data-root", default=None, help="folder to look in first")
    p.add_argument("--ensure", "--download", dest="ensure", default=None, metavar="NAME",
                   help="make sure dataset NAME is available (download it when the network allows); "
                        "exits non-zero with instructions otherwise")

    try:
        from . import evaluate  # noqa: F401
    except ImportError:
        evaluate = None
    if evaluate is not None:
        from .cli_eval import add_eval_commands
        add_eval_commands(sub, _Formatter, _device_args, _pretrain_args, _int_list)
    try:
        from .bench import add_bench_command
        add_bench_command(sub, _Formatter)
    except ImportError:
        pass
    return parser


def cmd_pretrain(args) -> int:
    from .pretrain import COMPILE_CHOICES, PretrainConfig, describe, pretrain
    config = PretrainConfig(method=args.method, dataset=args.dataset, epochs=args.epochs, limit=args.limit,
                            batch_size=args.batch_size, lr=args.lr, image_size=args.image_size, width=args.width,
                            seed=args.seed, data_root=args.data_root)
    run = pretrain(config, device=args.device, out=args.out, force=args.force, progress=args.progress,
                   deterministic=args.deterministic, sync_bn=args.sync_bn, data_budget=args.data_budget,
                   compile=COMPILE_CHOICES[args.compile], checkpoint_every=args.checkpoint_every)
    from .distributed import is_main_process
    if is_main_process():  # under torchrun, rank 0 speaks for all
        print(describe(run))
        print(run.path)
    return 0


def cmd_datasets(args) -> int:
    from .data import dataset_status, load_dataset
    if args.ensure:
        splits = load_dataset(args.ensure, args.data_root)
        print(f"{splits.name}: {len(splits.train)} train, {len(splits.test)} test, "
              f"{len(splits.unlabeled)} unlabeled images of {tuple(splits.train.images.shape[1:])} from {splits.source}")
        return 0
    for name, where in dataset_status(args.data_root):
        print(f"{name:14s} {where}")
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handlers = {"pretrain": cmd_pretrain, "datasets": cmd_datasets}
    handler = handlers.get(args.command) or getattr(args, "handler", None)
    from . import distributed
    from .store import CorruptCheckpoint
    from .train import TrainingDiverged
    # Under torchrun every process runs this; each message is shown once per node at most.
    speaks = distributed.reports_errors()
    if distributed.launched() and args.command != "pretrain":
        if speaks:
            print(f"error: under torchrun only `pretrain` runs on several processes; run `{args.command}` as one "
                  f"process (a sweep spreads over machines with `curve --shard I/N`, then `curve --merge`)",
                  file=sys.stderr)
        return 2
    try:
        return handler(args)
    # Errors a person can act on (bad parameter, missing or unwritable folder, damaged file,
    # diverged loss): their message says what to do, a traceback would only hide it.
    except (ValueError, OSError, CorruptCheckpoint, TrainingDiverged) as exc:
        if speaks:
            print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if speaks:
            print("interrupted; the last complete checkpoint is kept and the same command resumes from it",
                  file=sys.stderr)
        return 130
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    sys.exit(main())
