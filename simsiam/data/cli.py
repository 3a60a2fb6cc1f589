"""``simsiam data``: convert datasets to Parquet shards, and inspect them.

  simsiam data convert SRC DEST            image folder (one sub-folder per class, or flat) or .npz
  simsiam data convert cifar-10-batches-py DEST   CIFAR-10/100 python folders -> DEST/train, DEST/test
  simsiam data convert imagenet/ DEST      train/ + val/ (class folders, or flat + labels file)
  simsiam data convert --builtin shapes DEST   (or digits)
  simsiam data inspect PATH [--out DIR]    schema, counts, shards, repeated ids, sample and pair grids
  simsiam data inspect PATH --full         also decode every row; exit 1 unless the set is clean
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from simsiam.config import ConfigError, DataConfig
from simsiam.data import BUILTINS
from simsiam.data.schema import DataError


def _convert(args: argparse.Namespace) -> int:
    from simsiam.data.convert import convert

    if args.builtin:
        if len(args.paths) != 1:
            print("error: with --builtin give only DEST", file=sys.stderr)
            return 2
        src, dest = None, args.paths[0]
    else:
        if len(args.paths) != 2:
            print("error: give SRC and DEST (or --builtin NAME DEST)", file=sys.stderr)
            return 2
        src, dest = args.paths
    print(f"converting {src or 'builtin:' + args.builtin} -> {dest}", file=sys.stderr)
    reports = convert(src, dest, builtin=args.builtin, overwrite=args.overwrite, shard_rows=args.shard_rows,
                      workers=args.workers, images_key=args.images_key, labels_key=args.labels_key,
                      on_bad_image=args.on_bad_image, progress=not args.quiet, val_labels=args.val_labels,
                      max_pixels=args.max_pixels)
    for r in reports:
        print(r.summary())
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from simsiam import config as C
    from simsiam.data.inspect import (
        check_rows,
        format_row_check,
        format_summary,
        save_pair_grid,
        save_sample_grid,
        stderr_progress,
        summarize,
    )

    cfg = C.load(args.config, args.overrides)
    summary = summarize(args.path)
    check = None
    if args.full:
        check = check_rows(args.path, cfg.data.max_pixels, workers=args.workers,
                           progress=None if args.json else stderr_progress())
        summary["row_check"] = check.to_dict()
    summary["clean"] = not summary["duplicate_ids"]["count"] and (check is None or check.clean)
    out_dir = args.out or f"inspect_{os.path.basename(args.path.rstrip('/')) or 'data'}"
    if args.samples or args.pairs:
        os.makedirs(out_dir, exist_ok=True)
    files = {}
    if args.samples:
        p = os.path.join(out_dir, "samples.png")
        save_sample_grid(args.path, p, n=args.samples, seed=args.seed)
        files["samples"] = p
    if args.pairs:
        p = os.path.join(out_dir, "pairs.png")
        save_pair_grid(args.path, p, cfg.data, n=args.pairs, seed=args.seed)
        files["pairs"] = p
    summary["grids"] = files
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(format_summary(summary))
        if check is not None:
            print(format_row_check(check))
        for name, p in files.items():
            print(f"  {name} grid: {p}")
    return 0 if summary["clean"] else 1


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="action", metavar="{convert,inspect}")
    c = sub.add_parser("convert", help="image folder / .npz / built-in set -> Parquet shards",
                       description="Convert images to Parquet shards (written atomically; an interrupted run "
                                   "resumes when rerun with the same arguments).")
    c.add_argument("paths", nargs="+", metavar="SRC DEST",
                   help="an image folder (sub-folder per class, or flat = unlabeled), a .npz file, a CIFAR "
                        "python folder (cifar-10-batches-py, cifar-100-python: fine labels) or a folder with "
                        "train/ and val/, then the output directory; .npz with x_train/x_test, CIFAR and the "
                        "digits write DEST/train and DEST/test, train/val folders DEST/train and DEST/val")
    c.add_argument("--builtin", choices=BUILTINS,
                   help="convert a built-in set instead of SRC: shapes (5 shape classes at 32 px, colour, position "
                        "and clutter as nuisances) or digits (scikit-learn's 8x8 digits)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing dataset at DEST")
    c.add_argument("--shard-rows", type=int, default=None, help="rows per shard (default: ~64 MiB shards, >= 16)")
    c.add_argument("--workers", type=int, default=None, help="worker processes (default: one per core)")
    c.add_argument("--images-key", help=".npz: array of images (default: x_train/x_test, images, x or data)")
    c.add_argument("--labels-key", help=".npz: array of labels (default: the images key's usual partner)")
    c.add_argument("--val-labels", metavar="FILE",
                   help="train/val folders with a flat val/: its labels file, 'filename label' lines (label = "
                        "a train class folder name, or its index in sorted order) or a .csv with a header such "
                        "as Kaggle's LOC_val_solution.csv (default: LOC_val_solution.csv, val_annotations.txt, "
                        "val_labels.txt or labels.txt in SRC or SRC/val)")
    c.add_argument("--on-bad-image", choices=("error", "skip"), default="error",
                   help="a source image that does not decode in full (corrupt, truncated, not an image, over "
                        "--max-pixels): stop with an error naming it, or skip it (counted and listed)")
    c.add_argument("--max-pixels", type=int, default=DataConfig().max_pixels,
                   help="a source image with more pixels is bad (decompression bombs); default: data.max_pixels's "
                        "default, %(default)s")
    c.add_argument("--quiet", action="store_true", help="no progress lines")
    c.set_defaults(run=_convert)
    i = sub.add_parser("inspect", help="schema, counts per class, shards, repeated ids, sample and pair grids",
                       description="Describe a shard dataset and save PNG grids of samples and augmented pairs. "
                                   "Exit status: 0 when no problem was found; 1 when ids repeat or (with --full) "
                                   "a row cannot be decoded; 2 when PATH is not a readable dataset.")
    i.add_argument("path", metavar="PATH", help="dataset directory or URI")
    i.add_argument("--out", help="directory for the PNG grids (default: ./inspect_<name>)")
    i.add_argument("--samples", type=int, default=64, help="images in samples.png (0 = none)")
    i.add_argument("--pairs", type=int, default=16, help="augmented view pairs in pairs.png (0 = none)")
    i.add_argument("--config", default="sample", help="preset or YAML whose data.* drives the augmentation")
    i.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. data.image_size=32 (repeatable)")
    i.add_argument("--seed", type=int, default=0, help="which samples and augmentations")
    i.add_argument("--full", action="store_true",
                   help="decode every row as training would (same decoder, the config's data.max_pixels) and list "
                        "each bad one by shard and row; streams, one shard per worker process")
    i.add_argument("--workers", type=int, default=None, help="--full: worker processes (default: one per core)")
    i.add_argument("--json", action="store_true", help="print the summary as JSON")
    i.set_defaults(run=_inspect)
    return p


def main(argv: list[str] | None = None, prog: str = "simsiam data") -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if not getattr(args, "action", None):
        parser.print_help()
        return 2
    try:
        return args.run(args)
    except (DataError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished shards are kept - rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
