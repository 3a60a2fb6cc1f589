"""The ``simsiam`` command. Each subcommand's arguments and --help live with its implementation,
so ``simsiam NAME ...`` and ``python -m pipelines.NAME ...`` are the same program."""
from __future__ import annotations

import importlib
import sys

# name -> (module with main(argv) -> int, one-line summary)
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("pipelines.pretrain_eval", "pretrain SimSiam, then linear-evaluate it (the main job)"),
    "search": ("pipelines.search", "hyperparameter search with Ray Tune + Optuna"),
    "ablate": ("pipelines.ablate", "the paper's ablation studies as one Tune grid"),
    "retrain": ("pipelines.retrain", "scheduled retraining: new shards, warm start, promote if better"),
    "submit": ("simsiam.submit", "submit a pipeline to a Ray cluster with the Jobs SDK"),
    "data": ("simsiam.data.cli", "convert datasets to Parquet shards and inspect them"),
    "export": ("simsiam.export_cli", "export a checkpoint's backbone as a torchvision state_dict"),
    "config": ("simsiam.config_cli", "show a resolved config or list every field"),
}


def _usage() -> str:
    lines = ["usage: simsiam COMMAND [ARGS...]", "", "SimSiam self-supervised pretraining on Ray.", "",
             "commands:"]
    lines += [f"  {name:<9} {summary}" for name, (_, summary) in COMMANDS.items()]
    lines += ["", "Run 'simsiam COMMAND --help' for a command's options.",
              "With no arguments, 'simsiam run' pretrains and evaluates the sample preset on a local Ray cluster."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] == "--version":
        from simsiam import __version__
        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"simsiam: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest, prog=f"simsiam {name}") or 0)


if __name__ == "__main__":
    sys.exit(main())
