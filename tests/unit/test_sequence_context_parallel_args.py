"""--sequence-parallel / --context-parallel-size: bad combinations are one ConfigError line naming every flag."""
import pytest

from megatron.arguments import parse_args, train_config_from_args, validate
from megatron.errors import ConfigError

BASE = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
        "--train-iters", "10", "--global-batch-size", "4", "--micro-batch-size", "1"]


def _validate(extra, world_size):
    tp = int(extra[extra.index("--tensor-model-parallel-size") + 1]) if "--tensor-model-parallel-size" in extra else 1
    cp = int(extra[extra.index("--context-parallel-size") + 1]) if "--context-parallel-size" in extra else 1
    validate(train_config_from_args(parse_args(BASE + extra), 128, max(world_size // (tp * cp), 1)), world_size)


@pytest.mark.parametrize("extra, world, match", [
    (["--sequence-parallel"], 1, r"^--sequence-parallel needs --tensor-model-parallel-size > 1 \(got 1\)"),
    (["--sequence-parallel", "--tensor-model-parallel-size", "2", "--seq-length", "33"], 2,
     r"^--seq-length \(33\) must be divisible by 2 = --tensor-model-parallel-size \(2\) with --sequence-parallel "
     r"\(True\) x 2 x --context-parallel-size \(1\)"),
    (["--context-parallel-size", "2", "--seq-length", "30"], 2,
     r"^--seq-length \(30\) must be divisible by 4 = .* x 2 x --context-parallel-size \(2\)"),
    (["--sequence-parallel", "--tensor-model-parallel-size", "2", "--overlap-grad-reduce"], 2,
     r"^--sequence-parallel with --overlap-grad-reduce is not supported"),
    (["--context-parallel-size", "2", "--overlap-grad-reduce"], 2,
     r"^--context-parallel-size 2 with --overlap-grad-reduce is not supported"),
    (["--context-parallel-size", "2", "--kd", "--load-teacher", "T"], 2,
     r"^--context-parallel-size \(2\) with --mos/--kd is not supported"),
    (["--context-parallel-size", "2", "--tensor-model-parallel-size", "2"], 6,
     r"^world size \(6\) must be divisible by --tensor-model-parallel-size \(2\) x --context-parallel-size \(2\) x "
     r"--pipeline-model-parallel-size \(1\) = 4"),
])
def test_bad_combinations_are_one_line(extra, world, match):
    with pytest.raises(ConfigError, match=match) as e:
        _validate(extra, world)
    assert "\n" not in str(e.value)


def test_good_combinations_pass():
    _validate(["--sequence-parallel", "--tensor-model-parallel-size", "2"], 2)
    _validate(["--sequence-parallel", "--tensor-model-parallel-size", "2", "--context-parallel-size", "2"], 4)
