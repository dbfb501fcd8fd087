"""Single-image command line: train, retarget, score.

    python -m ingan train IMAGE --preset tiny --out model.pt
    python -m ingan retarget model.pt IMAGE --size 256x128 --size 64x64 --out-dir out/
    python -m ingan retarget model.pt IMAGE --size 256x128@0.3,-0.3 --out-dir out/   (shaped)
    python -m ingan score SOURCE OUTPUT
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import torch

from . import checkpoint, images, metrics, retarget
from .config import BF16_DEFAULT_TEXT, PRESETS, get_preset
from .files import atomic_write
from .fit import fit
from .images import DEFAULT_FORMAT, FORMATS, MASK_EXT, working_resolution
from .progress import Progress, hms
from .retarget import encode_output, retarget_image
from .train import pick_device


class CLIError(Exception):
    """An expected failure: printed as one line, exit code 2."""


def parse_size(text: str) -> tuple[int, int, retarget.Shifts | None]:
    """'WxH' or 'WxH@LEFT,RIGHT' -> (H, W, shifts), sizes in the order the model takes them."""
    try:
        base, shifts = retarget.parse_shape(text)
        w, h = retarget.parse_size(base)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return h, w, shifts


def _print_progress(p: Progress) -> None:
    loss = " ".join(f"{k}={v:.4f}" for k, v in p.losses.items())
    print(f"[{p.iteration}/{p.total}] {loss} | {p.rate:.2f} it/s | elapsed {hms(p.seconds)} "
          f"| eta {hms(p.eta)}", file=sys.stderr, flush=True)


def cmd_train(args: argparse.Namespace) -> int:
    preset = get_preset(args.preset)
    train_cfg = preset.train.with_overrides(iterations=args.iterations, seed=args.seed, crop_size=args.crop_size,
                                            bf16=args.bf16, max_shift=args.max_shift)
    if args.max_side is not None:
        train_cfg = dataclasses.replace(train_cfg, max_side=args.max_side or None)
    if train_cfg.iterations < 1:
        raise CLIError("--iterations must be at least 1")
    image = images.load(args.image)
    device = pick_device(args.device)
    work_hw = working_resolution(tuple(image.shape[-2:]), train_cfg.max_side)
    print(f"training preset={preset.name} iterations={train_cfg.iterations} seed={train_cfg.seed} "
          f"device={device} image={image.shape[-1]}x{image.shape[-2]} working={work_hw[1]}x{work_hw[0]}", file=sys.stderr)
    done = fit(image, preset.name, preset.model, train_cfg, device, progress=None if args.quiet else _print_progress)
    data = checkpoint.save(done.checkpoint)
    atomic_write(args.out, data)
    print(f"saved {args.out} ({len(data) / 1e6:.1f} MB) after {done.seconds:.1f} s", file=sys.stderr)
    return 0


def _load_checkpoint(path: str, device: torch.device) -> checkpoint.Checkpoint:
    try:
        with open(path, "rb") as f:
            return checkpoint.load(f.read(), map_location=device)
    except OSError as exc:
        raise CLIError(f"cannot read checkpoint {path}: {exc.strerror or exc}") from None
    except checkpoint.CheckpointError as exc:
        raise CLIError(f"{path}: {exc}") from None


def cmd_retarget(args: argparse.Namespace) -> int:
    device = pick_device(args.device)
    ckpt = _load_checkpoint(args.model, device)
    image = images.load(args.image)
    g = ckpt.build_generator(device)
    os.makedirs(args.out_dir, exist_ok=True)
    start = time.perf_counter()
    sizes = [(h, w) for h, w, _ in args.size]
    shifts = [sh for _, _, sh in args.size]
    outs = retarget_image(g, image, sizes, ckpt.train.max_side, shifts)
    for sh, out in zip(shifts, outs, strict=True):
        enc = encode_output(out, args.format, sh)
        files = [(f"{enc.stem}.{enc.ext}", enc.data)] + ([(f"{enc.stem}.{MASK_EXT}", enc.mask)] if enc.mask else [])
        for name, data in files:
            atomic_write(os.path.join(args.out_dir, name), data)
            print(os.path.join(args.out_dir, name))
    print(f"{len(outs)} outputs in {time.perf_counter() - start:.2f} s", file=sys.stderr)
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    src = images.load(args.source).float() / 255.0
    out = images.load(args.output).float() / 255.0
    print(json.dumps(metrics.score(src, out, max_patches=args.max_patches), indent=2))
    return 0


def _names(alpha: bool) -> str:
    return " and ".join(f.name for f in FORMATS.values() if f.alpha == alpha)


_FORMAT_HELP = (f"a shaped output keeps its frame as alpha in {_names(True)}; in {_names(False)} the outside "
                f"is painted white and the frame written as NAME.{MASK_EXT} beside it")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ingan", description="Train and apply a single-image InGAN.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train one InGAN on one image")
    t.add_argument("image")
    t.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    t.add_argument("--iterations", type=int, help="override the preset's iteration count")
    t.add_argument("--seed", type=int)
    t.add_argument("--crop-size", type=int)
    t.add_argument("--max-side", type=int, help="working-image longer side; 0 keeps the full image")
    t.add_argument("--max-shift", type=float, metavar="M",
                   help="train for shaped outputs too: top-corner shifts up to +-M (0..0.9; 0: rectangles only)")
    t.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help=f"bfloat16 autocast for convolutions (default: {BF16_DEFAULT_TEXT})")
    t.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    t.add_argument("--quiet", action="store_true", help="no progress lines")
    t.add_argument("--out", required=True, help="checkpoint path to write")
    t.set_defaults(fn=cmd_train)

    r = sub.add_parser("retarget", help="retarget an image with a trained model")
    r.add_argument("model")
    r.add_argument("image")
    r.add_argument("--size", type=parse_size, action="append", required=True, metavar="WxH[@LEFT,RIGHT]",
                   help="output size, repeatable; @LEFT,RIGHT shifts the top corners (normalised units, "
                        "-0.9..0.9) for a shaped output, transparent outside its frame")
    r.add_argument("--format", default=DEFAULT_FORMAT, choices=list(FORMATS), help=_FORMAT_HELP)
    r.add_argument("--out-dir", required=True)
    r.add_argument("--device", default="auto")
    r.set_defaults(fn=cmd_retarget)

    s = sub.add_parser("score", help="patch-distribution metrics of OUTPUT against SOURCE, as JSON")
    s.add_argument("source")
    s.add_argument("output")
    s.add_argument("--max-patches", type=int, default=4096)
    s.set_defaults(fn=cmd_score)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (CLIError, images.ImageDecodeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
