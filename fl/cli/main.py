"""The ``privagg`` command line: ``train``, ``demo``, ``sweep``, ``audit`` and ``flower``."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fl.config import EarlyStopConfig, PrivacyConfig, TrainConfig

__all__ = ["HelpFormatter", "build_parser", "config_from_args", "main"]

log = logging.getLogger("privagg")

# Sub-commands implemented in their own modules: (name, module, help). Each module exposes
# ``add_arguments(parser)`` and ``run(args) -> int``.
EXTERNAL_COMMANDS: tuple[tuple[str, str], ...] = (
    ("sweep", "accuracy against privacy budget: epsilon values x seeds, with a table and a plot"),
    ("compare", "accuracy against privacy budget across privacy configurations x epsilons x seeds"),
    ("audit", "empirical privacy audit: canary-based lower bounds on epsilon"),
    ("flower", "run across machines on Flower: certs, superlink, supernode, run, local"),
    ("predict", "apply a model saved by train --save-model to new rows of a CSV"),
)

DEMO_PRIVACY = "dp-sgd,secagg+"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default exactly once: added only where the help text does not already say it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return super()._get_help_string(action)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("privagg")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0.1.0 (not installed)"


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``privagg train`` (shared with ``sweep``), in three help groups."""
    d = TrainConfig()
    _add_data_group(p, d)
    _add_training_group(p, d)
    _add_privacy_group(p, PrivacyConfig())


def _add_data_group(p: argparse.ArgumentParser, d: TrainConfig) -> None:
    """The "data" flags: data set, clients, partition, held-out share, per-site CSVs and preprocessing."""
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default=d.dataset,
                   help="breast_cancer | digits | credit_default | csv:PATH (default: %(default)s)")
    g.add_argument("--target", help="label column of a CSV data set")
    g.add_argument("--clients", type=int, default=d.clients, help="number of clients (default: %(default)s)")
    g.add_argument("--partition", default=d.partition,
                   help="iid | dirichlet:ALPHA (label skew) | by-column:NAME (one client per value)")
    g.add_argument("--test-fraction", type=float, default=d.test_fraction, help="held-out share (default: %(default)s)")
    from fl.data.sites import add_data_arguments  # per-site CSVs and federated preprocessing

    add_data_arguments(g)


def _add_training_group(p: argparse.ArgumentParser, d: TrainConfig) -> None:
    """The "model and training" flags: model, rounds, optimizers, sampling, dropout, seed, early stopping."""
    g = p.add_argument_group("model and training")
    g.add_argument("--model", default=d.model, help="logreg | mlp | mlp-ln | cnn (default: %(default)s)")
    g.add_argument("--hidden", type=int, default=d.hidden, help="mlp hidden width (default: %(default)s)")
    g.add_argument("--rounds", type=int, default=d.rounds, help="federated rounds (default: %(default)s)")
    g.add_argument("--local-epochs", type=int, default=d.local_epochs,
                   help="local epochs per round (default: %(default)s)")
    g.add_argument("--lr", type=float, default=None,
                   help="client learning rate (default: 1.0 for logreg, 0.1 for mlp; see fl.config.DEFAULT_LR)")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="client minibatch size (default: %(default)s)")
    g.add_argument("--optimizer", choices=["sgd", "adam"], default=d.optimizer, help="client optimizer")
    g.add_argument("--class-weight", default=d.class_weight, metavar="none|balanced|LABEL=W,...",
                   help="weight of each class in the training loss: none, balanced (N / (K * n_c) from the class "
                        "counts released with the federated statistics, DP when DP is on) or public weights "
                        "LABEL=W,... (e.g. 0=1,1=5; unlisted classes weigh 1) (default: %(default)s)")
    g.add_argument("--cohort", type=int, help="clients sampled per round, without replacement (default: all)")
    g.add_argument("--sample-rate", type=float,
                   help="Poisson client sampling rate q (instead of --cohort; default: off)")
    g.add_argument("--weighting", choices=["samples", "uniform"], default=d.weighting,
                   help="FedAvg weights n_k/n (samples) or equal weights (uniform; DP forces it)")
    g.add_argument("--server-opt", choices=["fedavg", "fedadam"], default=d.server_opt, help="server optimizer")
    g.add_argument("--server-lr", type=float, default=d.server_lr, help="server learning rate (default: %(default)s)")
    g.add_argument("--dropout", type=float, default=d.dropout,
                   help="simulated probability that a sampled client drops mid-round (default: %(default)s)")
    g.add_argument("--seed", type=int, default=d.seed, help="seed for data split, sampling and init")
    es = EarlyStopConfig()
    g.add_argument("--patience", type=int,
                   help="early stopping: stop after this many rounds without the validation loss falling by more "
                        "than --min-delta, and keep the best round's model (default: off, run all --rounds). The "
                        "validation split is --validation-fraction of the server's held-out rows; the final "
                        "accuracy and the baselines use only the rest")
    g.add_argument("--min-delta", type=float, default=es.min_delta,
                   help="early stopping: the smallest fall in validation loss that counts (default: %(default)s)")
    g.add_argument("--validation-fraction", type=float, default=es.validation_fraction,
                   help="early stopping: share of the held-out rows used for validation (default: %(default)s)")


def _add_privacy_group(p: argparse.ArgumentParser, pd: PrivacyConfig) -> None:
    """The "privacy" flags: the stage spec, DP-FedAvg, adaptive clipping, budget, secure aggregation, DP-SGD."""
    g = p.add_argument_group("privacy")
    g.add_argument("--privacy", default=pd.spec,
                   help="comma-separated stages, e.g. none | secagg+ | clip,noise,secagg+ | dp-sgd | "
                        "clip,dnoise,secagg | paillier (default: %(default)s)")
    g.add_argument("--clip", type=float, default=pd.clip, help="L2 clip norm of each client update")
    g.add_argument("--noise-multiplier", type=float, help="DP-FedAvg noise multiplier z (sigma = z * clip)")
    g.add_argument("--aclip-quantile", type=float, default=pd.aclip_quantile,
                   help="aclip: target quantile of the update norms (--clip is the initial norm)")
    g.add_argument("--aclip-lr", type=float, default=pd.aclip_lr, help="aclip: learning rate of the clip norm")
    g.add_argument("--aclip-count-noise", type=float, default=pd.aclip_count_noise,
                   help="aclip: noise std on the unclipped-client count per unit of noise multiplier (> 0.5)")
    g.add_argument("--epsilon", type=float, help="target epsilon: calibrates the noise for the planned rounds")
    g.add_argument("--delta", type=float, default=pd.delta, help="target delta (default: %(default)s)")
    g.add_argument("--accountant", choices=["pld", "rdp"], default=pd.accountant, help="privacy accountant")
    g.add_argument("--quant-bits", type=int, default=pd.quant_bits, help="bits per quantized client value")
    g.add_argument("--threshold", type=float, default=pd.threshold,
                   help="secure-aggregation threshold t: a fraction in (0, 1] (0.7 = 70%%) of the cohort for secagg "
                        "(default 0.7) or of each share group for secagg+ (default: the t found with "
                        "--neighbours), or a whole number of clients (3); 1.5 is refused")
    g.add_argument("--neighbours", type=int, default=pd.neighbours,
                   help="SecAgg+ neighbours k per client (default: the smallest k meeting 40-bit security and 30-bit "
                        "correctness for the corrupt and dropout fractions)")
    g.add_argument("--corrupt-fraction", type=float, default=pd.corrupt_fraction,
                   help="SecAgg+: assumed fraction of corrupt clients (default: %(default)s)")
    g.add_argument("--dropout-fraction", type=float, default=pd.dropout_fraction,
                   help="SecAgg+: assumed fraction of clients that drop in a round (default: %(default)s)")
    g.add_argument("--dpsgd-clip", type=float, default=pd.dpsgd_clip,
                   help="DP-SGD per-example clip norm (default: from --epsilon, sqrt(epsilon)/2 within [0.5, 2]: "
                        "most per-example gradients clip, less so at larger epsilon; 1.0 without --epsilon)")
    g.add_argument("--dpsgd-noise-multiplier", type=float, help="DP-SGD noise multiplier (else from --epsilon)")
    g.add_argument("--dpsgd-batch-size", type=int, default=pd.dpsgd_batch_size,
                   help="DP-SGD expected batch size (default: from --epsilon, 8*round(8/sqrt(epsilon)): larger "
                        "batches at smaller epsilon, e.g. 64 at 1 and 32 at 4, at most the smallest client's rows; "
                        "32 without --epsilon)")
    g.add_argument("--insecure-seeded-randomness", action="store_true",
                   help="TEST SEAM: derive DP noise and rounding from --seed so runs repeat exactly (insecure)")


def _early_stopping_from_args(args: argparse.Namespace) -> EarlyStopConfig | None:
    """``--patience`` turns early stopping on; its two companions alone would be ignored, so they are refused."""
    es = EarlyStopConfig()
    if args.patience is None:
        changed = [f for f, v, d in (("--min-delta", args.min_delta, es.min_delta),
                                     ("--validation-fraction", args.validation_fraction, es.validation_fraction))
                   if v != d]
        if changed:
            raise ValueError(f"{' and '.join(changed)} would be ignored: early stopping is off; add --patience N")
        return None
    return EarlyStopConfig(patience=args.patience, min_delta=args.min_delta,
                           validation_fraction=args.validation_fraction)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    from fl.data.sites import data_config_from_args

    privacy = PrivacyConfig(
        spec=args.privacy, clip=args.clip, noise_multiplier=args.noise_multiplier, epsilon=args.epsilon,
        delta=args.delta, accountant=args.accountant, quant_bits=args.quant_bits, threshold=args.threshold,
        neighbours=args.neighbours, corrupt_fraction=args.corrupt_fraction, dropout_fraction=args.dropout_fraction,
        dpsgd_clip=args.dpsgd_clip, dpsgd_noise_multiplier=args.dpsgd_noise_multiplier,
        dpsgd_batch_size=args.dpsgd_batch_size, aclip_quantile=args.aclip_quantile, aclip_lr=args.aclip_lr,
        aclip_count_noise=args.aclip_count_noise,
    )
    return TrainConfig(
        dataset=args.dataset, target=args.target, clients=args.clients, partition=args.partition,
        model=args.model, hidden=args.hidden, rounds=args.rounds, local_epochs=args.local_epochs, lr=args.lr,
        batch_size=args.batch_size, optimizer=args.optimizer, class_weight=getattr(args, "class_weight", "none"),
        cohort=args.cohort, sample_rate=args.sample_rate,
        weighting=args.weighting, server_opt=args.server_opt, server_lr=args.server_lr, dropout=args.dropout,
        test_fraction=args.test_fraction, seed=args.seed,
        insecure_seeded_randomness=args.insecure_seeded_randomness, privacy=privacy,
        early_stopping=_early_stopping_from_args(args), **data_config_from_args(args),
    )


def _run_and_report(config: TrainConfig, *, report: Path | None, plot: Path | None, checkpoint_dir: Path | None,
                    resume: bool, quiet: bool, baselines: bool = True, save_model: Path | None = None) -> int:
    from fl.cli.predict import save_model as save
    from fl.report import plot_rounds, summary_lines, write_json
    from fl.training.loop import train

    def saver(fed: Any, rep: dict[str, Any]) -> None:
        if save_model is not None:
            save(fed, save_model, report=rep)

    result = train(config, progress=not quiet, checkpoint_dir=checkpoint_dir, resume=resume, baseline=baselines,
                   on_finish=saver)
    for line in summary_lines(result):
        print(line)
    if report is not None:
        write_json(result, report)
        print(f"report: {report}")
    if plot is not None:
        plot_rounds(result, plot)
        print(f"plot:   {plot}")
    if save_model is not None:
        print(f"model:  {save_model} (privagg predict --model {save_model} --data NEW.csv)")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    ckpt = args.resume or args.checkpoint_dir
    return _run_and_report(config, report=args.report, plot=args.plot, checkpoint_dir=ckpt,
                           resume=args.resume is not None, quiet=args.quiet, baselines=not args.no_baselines,
                           save_model=args.save_model)


def cmd_demo(args: argparse.Namespace) -> int:
    """Five hospitals, breast cancer, label-skewed, with the privacy layers on."""
    out: Path = args.out
    config = TrainConfig(
        dataset="breast_cancer", clients=5, partition="dirichlet:0.5", model="logreg", rounds=10, lr=1.0, seed=0,
        privacy=PrivacyConfig(spec=DEMO_PRIVACY, clip=5.0, epsilon=1.0, delta=1e-5, dpsgd_batch_size=64,
                              dpsgd_clip=1.0),
    )
    print("privagg demo: 5 hospitals share a breast-cancer model (569 patients, label-skewed split).\n"
          "  - each hospital trains with DP-SGD: (1, 1e-5)-DP for every patient of that hospital;\n"
          "  - updates are clipped, quantized and summed with SecAgg+: the server sees only the sum.")
    return _run_and_report(config, report=out / "report.json", plot=out / "accuracy.png", checkpoint_dir=None,
                           resume=False, quiet=False)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="privagg",
        description="Privacy-preserving federated learning: secure aggregation (SecAgg/SecAgg+), packed "
                    "Paillier sums and differential privacy as pluggable layers.",
    )
    parser.add_argument("--log-level", default="WARNING", type=str.upper, choices=LOG_LEVELS,
                        help="how much the library logs (default: %(default)s)")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("train", help="run a federated training on a bundled data set or your CSV",
                       description="Run a federated training and print one line per round.",
                       formatter_class=HelpFormatter)
    add_train_arguments(p)
    g = p.add_argument_group("output")
    g.add_argument("--report", type=Path, help="write the JSON report here")
    g.add_argument("--plot", type=Path, help="write a PNG of accuracy per round here")
    g.add_argument("--checkpoint-dir", type=Path, help="checkpoint after every round into this directory")
    g.add_argument("--resume", type=Path, metavar="DIR", help="continue the run checkpointed in DIR")
    g.add_argument("--save-model", type=Path, metavar="DIR",
                   help="write the trained model (weights.pt) and its preprocessing (model.json) into DIR")
    g.add_argument("--quiet", action="store_true", help="no progress bar or per-round lines")
    g.add_argument("--no-baselines", action="store_true",
                   help="skip the baselines (centralized fit and the same federated run without privacy) for speed")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("demo", help="the main job: 5 hospitals on breast cancer with privacy layers on",
                       description="Five hospitals train a breast-cancer classifier on label-skewed shares: DP-SGD "
                                   "at (1, 1e-5) per patient and SecAgg+, 10 rounds. Prints each round, then the "
                                   "accuracy beside the non-private federated, centralized and majority-class "
                                   "baselines; writes OUT/report.json and OUT/accuracy.png.",
                       formatter_class=HelpFormatter)
    p.add_argument("--out", type=Path, default=Path("out"), help="output directory (default: %(default)s)")
    p.set_defaults(func=cmd_demo)

    # imported here, not at the top: these modules import fl.cli.main themselves
    from fl.cli import audit as audit_cli
    from fl.cli import compare, predict, sweep
    from fl.cli import flower as flower_cli

    modules = {"sweep": sweep, "compare": compare, "audit": audit_cli, "flower": flower_cli, "predict": predict}
    for name, help_text in EXTERNAL_COMMANDS:
        mod = modules[name]
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter)
        mod.add_arguments(p)
        p.set_defaults(func=mod.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        parser = build_parser()
    except ModuleNotFoundError as exc:  # installed without the extras (the core is secagg only)
        print(f"privagg: error: the command line needs the ML extras (missing {exc.name!r}); install them with "
              f"pip install 'privagg[all]'", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.WARNING),
                        format="%(levelname)s %(name)s: %(message)s")
    from fl.training.loop import TrainingInterrupted

    try:
        return int(args.func(args))
    except TrainingInterrupted as exc:
        print(f"privagg: {exc.message()}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("privagg: interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError) as exc:
        # configuration and data errors: one clear line, no traceback
        print(f"privagg: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
