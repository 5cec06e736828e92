"""Pretrain a GPT (dense or MoE) with Megatron-DeepSpeed flags; launch with python or torchrun."""
import sys

from megatron.training import main

if __name__ == "__main__":
    sys.exit(main())
