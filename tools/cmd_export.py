"""Write the encoder of a training checkpoint alone, as one .safetensors file (abvid's or timm's layout).

    abvid export RUN/checkpoints/ckpt-00001000.pt --out encoder.safetensors [--which ema|student]
    abvid export RUN/checkpoints/ckpt-00001000.pt --format timm --out vit_timm.safetensors

--format abvid (default): the encoder's tensors plus, in the metadata, the build_encoder
kwargs, so `abvid.model.load_encoder("encoder.safetensors")` rebuilds it with no training
config and no pickle (`abvid embed --checkpoint` takes it too).

--format timm: the same tensors in timm's ViT key layout. Load it with

    from timm.models.vision_transformer import VisionTransformer
    from safetensors.torch import load_file
    vit = VisionTransformer(img_size=..., patch_size=..., embed_dim=..., depth=..., num_heads=...,
                            num_classes=0, global_pool="token")      # the values this command prints
    vit.load_state_dict(load_file("vit_timm.safetensors"), strict=True)
    features = vit((x - mean) / std)   # x: float RGB in [0, 1]; ImageNet mean / std (printed)

timm's model does not normalise its input (abvid's encoder does), so feed it the normalised
tensor; its pre-logits features then equal abvid's embedding (the CLS token after the final
norm). LayerNorm eps is 1e-6 in both; an encoder from a checkpoint older than format 1 uses
1e-5 and the command says how to build timm's model to match.

--which picks the EMA (teacher) encoder, the default and the one DINO-style methods
evaluate, or the student. A checkpoint whose objective keeps no EMA encoder exports its
student encoder, and says so. CKPT may also be an exported abvid file (to convert it to
timm's layout).

Exit codes: 0 written; 2 usage error (CKPT missing, a folder, not a checkpoint, or of a
format this abvid does not read; --out not a .safetensors path or an existing folder);
3 an unexpected error (a bug; the message names a log file).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from abvid.pipeline.errors import UsageError
from abvid.tools.cli import EXIT_OK


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", metavar="CKPT",
                   help="training checkpoint written by `abvid pretrain` (RUN/checkpoints/ckpt-*.pt), or an "
                        "exported abvid .safetensors")
    p.add_argument("--out", required=True, metavar="FILE", help="output .safetensors path (required)")
    p.add_argument("--format", choices=("abvid", "timm"), default="abvid",
                   help="key layout: abvid (load_encoder / abvid embed) or timm (timm's VisionTransformer)")
    p.add_argument("--which", choices=("ema", "student"), default="ema",
                   help="encoder of a training checkpoint to export: the EMA teacher or the student")


def main(args: argparse.Namespace) -> int:
    from abvid.model.io import load_encoder, save_encoder, save_timm

    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise UsageError(f"--out {args.out} should end in .safetensors (the only format written)")
    if out.is_dir():
        raise UsageError(f"--out {args.out} is a folder; give a file name ending in .safetensors")
    encoder = load_encoder(args.checkpoint, which=args.which)
    params = sum(p.numel() for p in encoder.parameters())
    what = f"{encoder.encoder_source} encoder, {params / 1e6:.2f}M parameters"
    if args.format == "timm":
        path, kw = save_timm(encoder, encoder.encoder_kwargs, out)
        ctor = ", ".join(f"{k}={v!r}" for k, v in kw.items() if k not in ("mean", "std", "norm_eps"))
        print(f"wrote {path} (timm layout, {what})\n"
              f"  timm.models.vision_transformer.VisionTransformer({ctor})\n"
              f"  input: (x - mean) / std with mean={kw['mean']} std={kw['std']}, x RGB in [0, 1]; "
              f"LayerNorm eps {kw['norm_eps']:g}")
        return EXIT_OK
    path = save_encoder(encoder, encoder.encoder_kwargs, out)
    print(f"wrote {path} ({what}, kwargs {encoder.encoder_kwargs})")
    return EXIT_OK
