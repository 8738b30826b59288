"""``transnext convert IN OUT``: between ``.pth`` and ``.safetensors`` (direction by suffix).

Published mmdet Mask R-CNN and mmseg UPerNet checkpoints become transnext detection / segmentation
checkpoints with their model record (:mod:`transnext.dense.reference_import`). Other training
checkpoints are reduced to their state dict (``{'model': ...}`` unwrapped, ``module.`` prefixes
stripped) and their model record, classes and data settings (kept as safetensors
metadata, or beside ``model`` in a ``.pth``), so that ``transnext predict`` / ``eval`` take the
converted file as they take the original. Other output suffixes are refused (ONNX:
``transnext export onnx``); files that would need arbitrary pickled objects are refused.
``--variant`` also checks that the result loads strictly into that architecture.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", metavar="IN", help="input checkpoint (.pth/.pt/.bin or .safetensors)")
    parser.add_argument("dst", metavar="OUT", help="output file (.safetensors, or .pth/.pt/.bin)")
    parser.add_argument("--variant", metavar="NAME",
                        help="check that the weights load strictly into this variant (e.g. transnext_tiny)")
    parser.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    parser.add_argument("--extrapolation", action="store_true",
                        help="reference UPerNet checkpoints of the *_ms_extrapolation configs (extrapolated position bias)")


def run(args: argparse.Namespace) -> int:
    import sys
    from pathlib import Path

    from ..checkpoints import check_convert_target, checkpoint_metadata, convert_checkpoint, load_checkpoint, load_state_dict

    dst = Path(args.dst)
    check_convert_target(dst)
    if dst.exists() and not args.force:
        print(f"transnext convert: error: {dst} exists; pass --force to overwrite it", file=sys.stderr)
        return 1
    if _is_reference_dense(args.src):
        from ..dense.reference_import import import_reference_checkpoint

        info = import_reference_checkpoint(args.src, dst, variant=args.variant, extrapolation=args.extrapolation)
        command = "detect" if info["task"] == "detect" else "segment"
        named = f", {len(info['classes'])} class names" if info["classes"] else ""
        print(f"wrote {info['path']}: {info['kind']} reference checkpoint as a transnext {info['variant']} "
              f"{'Mask R-CNN (mmdet test-time mode)' if command == 'detect' else 'UPerNet'} with {info['num_classes']} classes{named}; "
              f"use it with 'transnext {command} eval|predict --checkpoint {info['path']}'")
        return 0
    if args.extrapolation:
        raise ValueError("--extrapolation applies to reference UPerNet checkpoints only")
    if args.variant:
        from ..models.registry import create_model

        model = create_model(args.variant, num_classes=_num_classes(load_state_dict(args.src)))
        load_checkpoint(model, args.src)  # raises with the list of problems
    out = convert_checkpoint(args.src, dst)
    tensors = load_state_dict(out)
    n_params = sum(t.numel() for t in tensors.values())
    checked = f", loads into {args.variant}" if args.variant else ""
    kept = checkpoint_metadata(out)
    kept_text = f"; kept its {', '.join(kept)}" if kept else ""
    print(f"wrote {out} ({len(tensors)} tensors, {n_params / 1e6:.2f}M values{checked}{kept_text})")
    return 0


def _num_classes(state_dict) -> int:
    head = state_dict.get("head.weight")
    return int(head.shape[0]) if head is not None else 0


def _is_reference_dense(path: str) -> bool:
    """A published mmdet / mmseg dense checkpoint (converted with its model record instead of tensor by tensor)."""
    from ..checkpoints import load_state_dict

    try:
        state_dict = load_state_dict(path)
    except Exception:  # noqa: BLE001 - the regular conversion reports unreadable files in its own words
        return False
    from ..dense.reference_import import is_reference_checkpoint

    return is_reference_checkpoint(state_dict)
