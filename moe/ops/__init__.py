"""Native ops built from csrc/: builders that find, check and load them (see op_builder.py)."""
from moe.ops.op_builder import AsyncIOBuilder, OpBuilder

__all__ = ["AsyncIOBuilder", "OpBuilder"]
