"""Write the encoder of a training checkpoint alone, as one .safetensors file.

    abvid export run/ckpt-001000.pt --out encoder.safetensors [--which ema|student]

The file holds the encoder's tensors and, in its metadata, the build_encoder
kwargs, so `abvid.model.load_encoder("encoder.safetensors")` rebuilds it with
no training config and no pickle. --which picks the EMA (teacher) encoder,
the default and the one DINO-style methods evaluate, or the student.
"""
from __future__ import annotations

import argparse
import sys

from abvid.tools.cli import EXIT_OK, EXIT_USAGE


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", metavar="CKPT", help="training checkpoint written by `abvid pretrain`")
    p.add_argument("--out", required=True, metavar="FILE", help="output .safetensors path")
    p.add_argument("--which", choices=("ema", "student"), default="ema",
                   help="encoder to export: EMA teacher or student")


def main(args: argparse.Namespace) -> int:
    from abvid.model.io import EncoderFileError, load_encoder, save_encoder

    if not args.out.endswith(".safetensors"):
        print(f"abvid export: --out {args.out} should end in .safetensors", file=sys.stderr)
        return EXIT_USAGE
    try:
        encoder = load_encoder(args.checkpoint, which=args.which)
    except EncoderFileError as e:
        print(f"abvid export: {e}", file=sys.stderr)
        return EXIT_USAGE
    path = save_encoder(encoder, encoder.encoder_kwargs, args.out)
    params = sum(p.numel() for p in encoder.parameters())
    print(f"wrote {path} ({args.which} encoder, {params / 1e6:.2f}M parameters, kwargs {encoder.encoder_kwargs})")
    return EXIT_OK
