"""``simsiam config``: print the resolved config of a preset plus overrides, or list every field."""
from __future__ import annotations

import argparse
import sys

import yaml

from simsiam import config as C


def main(argv: list[str] | None = None, prog: str = "simsiam config") -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__)
    p.add_argument("config", nargs="?", default="sample", help="preset (sample, cifar10, imagenet) or YAML path")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field by dotted name, e.g. optim.base_lr=0.1 (repeatable)")
    p.add_argument("--list", action="store_true",
                   help="list every field with its value in CONFIG (after --set) and its meaning; fields that "
                        "differ from the library default are marked *")
    args = p.parse_args(argv)
    try:
        cfg = C.load(args.config, args.overrides)
    except C.ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.list:
        defaults = {name: value for name, value, _ in C.describe()}
        print(f"# {args.config}{' with --set ' + ' '.join(args.overrides) if args.overrides else ''}: "
              "field, value (* = not the library default), meaning")
        for name, value, help_ in C.describe(cfg):
            mark = "*" if value != defaults[name] else " "
            print(f"{name:<38} {mark} {value!r:<22} {help_}")
        return 0
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
    return 0
