"""Pipeline layer splits (Megatron-LM's even, uneven first/last and interleaved stages) and the combinations
pipeline parallelism refuses, each one ConfigError line naming every flag involved (no processes started)."""
import pytest

from megatron.arguments import parse_args, train_config_from_args, validate
from megatron.errors import ConfigError
from megatron.pipeline.layout import stage_layers

BASE = ["--num-layers", "8", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "32",
        "--max-position-embeddings", "32", "--train-iters", "4", "--micro-batch-size", "1",
        "--global-batch-size", "8"]


def configure(argv, world):
    validate(train_config_from_args(parse_args(argv), padded_vocab_size=128, dp_size=1), world)


def _ids(split):
    return [[list(c) for c in chunks] for chunks in split]


def test_splits_follow_megatron_lm():
    assert _ids(stage_layers(8, 2)) == [[[0, 1, 2, 3]], [[4, 5, 6, 7]]]
    # interleaved: global stage v * pp + r holds layers [s*n, (s+1)*n)
    assert _ids(stage_layers(8, 2, 2)) == [[[0, 1], [4, 5]], [[2, 3], [6, 7]]]
    assert _ids(stage_layers(8, 4, 1)) == [[[0], [4]], [[1], [5]], [[2], [6]], [[3], [7]]]
    # uneven: first/last given, the middle stages split the rest evenly
    assert _ids(stage_layers(8, 3, None, 2, 2)) == [[[0, 1]], [[2, 3, 4, 5]], [[6, 7]]]
    assert _ids(stage_layers(7, 4, None, 1)) == [[[0]], [[1, 2]], [[3, 4]], [[5, 6]]]
    assert _ids(stage_layers(8, 2, None, None, 3)) == [[[0, 1, 2, 3, 4]], [[5, 6, 7]]]


@pytest.mark.parametrize("extra,world,match", [
    (["--pipeline-model-parallel-size", "3"], 3,
     r"--num-layers \(8\), --pipeline-model-parallel-size \(3\): the layers \(8\) must split evenly"),
    (["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "3"], 2,
     r"--num-layers \(8\), --pipeline-model-parallel-size \(2\), --num-layers-per-virtual-pipeline-stage \(3\): "
     r"interleaving needs .* divisible by pipeline size x layers per virtual stage"),
    (["--pipeline-model-parallel-size", "3", "--decoder-first-pipeline-num-layers", "4",
      "--decoder-last-pipeline-num-layers", "4"], 3,
     r"--decoder-first-pipeline-num-layers \(4\), --decoder-last-pipeline-num-layers \(4\): the layers left after "
     r"the first/last stages \(0\) must split evenly"),
    (["--pipeline-model-parallel-size", "2", "--decoder-first-pipeline-num-layers", "2",
      "--num-layers-per-virtual-pipeline-stage", "2"], 2, r"uneven first/last stages do not combine with virtual"),
    (["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1",
      "--global-batch-size", "5"], 2, r"5 micro-batches per step .* must be a multiple of max\(1, 5 // 2\)"),
    (["--pipeline-model-parallel-size", "3"], 4,
     r"world size \(4\) must be divisible by .*--pipeline-model-parallel-size \(3\)"),
    (["--pipeline-model-parallel-size", "2", "--overlap-grad-reduce"], 2,
     r"--pipeline-model-parallel-size 2 with --overlap-grad-reduce is not supported"),
    (["--pipeline-model-parallel-size", "2", "--zero-stage", "2"], 4,
     r"--zero-stage 2 with tied embeddings is not supported: .*use --zero-stage 1 or "
     r"--untie-embeddings-and-output-weights"),
])
def test_bad_combinations_are_one_line(extra, world, match):
    with pytest.raises(ConfigError, match=match) as e:
        configure(BASE + extra, world)
    assert "\n" not in str(e.value)


def test_good_combinations_pass():
    for extra, world in ((["--pipeline-model-parallel-size", "2", "--zero-stage", "1"], 4),
                         (["--pipeline-model-parallel-size", "4", "--num-layers-per-virtual-pipeline-stage", "1"], 4),
                         (["--pipeline-model-parallel-size", "2", "--zero-stage", "2",
                           "--untie-embeddings-and-output-weights"], 4),
                         (["--pipeline-model-parallel-size", "2", "--context-parallel-size", "2"], 4),
                         (["--pipeline-model-parallel-size", "2", "--tensor-model-parallel-size", "2",
                           "--sequence-parallel"], 4)):
        configure(BASE + extra, world)
