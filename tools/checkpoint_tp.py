"""Converts a checkpoint to another tensor-parallel size (merging pipeline stages, if any, into one):
tools/checkpoint_reshard.py with --target-pp 1, kept under its old name and flags.

    python tools/checkpoint_tp.py --load CKPT --save OUT --target-tp 1 [--true-vocab-size V]
"""
import importlib.util
import os
import sys

_spec = importlib.util.spec_from_file_location(
    "checkpoint_reshard_tool", os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoint_reshard.py"))
_reshard = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_reshard)
ConvertError = _reshard.ConvertError


def convert(load: str, save: str, target_tp: int, true_vocab_size=None, *_pipeline_defaults) -> str:
    return _reshard.convert(load, save, target_tp, true_vocab_size)


def main(argv=None) -> int:
    return _reshard.main(argv, pipeline=False, convert_fn=lambda *a: convert(*a))


if __name__ == "__main__":
    sys.exit(main())
