"""``simsiam export``: a checkpoint's backbone as a plain state_dict. Imports torch only to run, so
``--help`` is instant."""
from __future__ import annotations

import argparse
import sys

from simsiam.checkpoint import CHECKPOINT_FILE

DESCRIPTION = """\
Export a SimSiam checkpoint's backbone as a plain state_dict (tensors only). How to load it depends on
the run's model.backbone (the command prints the way for the checkpoint given):

  resnet18/34/50 (cifar10, imagenet presets): torchvision's names, without fc -
      net = torchvision.models.resnet50()
      missing, unexpected = net.load_state_dict(torch.load(OUT, weights_only=True), strict=False)
      # missing == ['fc.weight', 'fc.bias'], unexpected == []; with model.cifar_stem (cifar10) first
      # net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False); net.maxpool = nn.Identity()
  small (sample preset): SimSiam's own small ResNet, loaded strictly -
      net = simsiam.model.SmallResNet(width=32)   # the run's model.small_width
      net.load_state_dict(torch.load(OUT, weights_only=True))
"""


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt", metavar="CKPT", help=f"checkpoint file, or a Ray checkpoint directory holding "
                                                f"{CHECKPOINT_FILE} (<storage>/<run name>/checkpoint_*)")
    p.add_argument("out", metavar="OUT.pt", help="where to write the backbone state_dict (written atomically)")
    return p


def main(argv: list[str] | None = None, prog: str = "simsiam export") -> int:
    """``simsiam export CKPT OUT.pt``; exit 2 (with what the file is and what was expected) on a bad CKPT."""
    args = build_parser(prog).parse_args(argv)
    from simsiam.checkpoint import export, how_to_load

    try:
        keys, cfg = export(args.ckpt, args.out)
    except (FileNotFoundError, ValueError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {len(keys)} tensors to {args.out} (backbone {cfg.model.backbone}); "
          f"{how_to_load(cfg).replace('OUT', repr(str(args.out)))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
