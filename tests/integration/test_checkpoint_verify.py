"""Checkpoint checksums and --load-fallback: every file a save writes is listed in checksums.json (size, xxh3-64);
a torn or corrupted checkpoint is refused at load with one line naming the file and the iteration --load-fallback
would load; with the flag the newest older checkpoint that verifies is loaded and training goes on."""
import json
import logging
import os
import shutil

import pytest
import xxhash

from megatron import checkpointing
from megatron.training import main, pretrain
from tests.conftest import tiny_train_argv

MOE = ["--num-experts", "4", "--expert-interval", "2", "--topk", "2"]


@pytest.fixture(scope="module")
def two_checkpoints(tiny_corpus, tmp_path_factory):
    """A MoE run saved at iterations 2 and 4 (tracker 4); tests copy it before changing anything."""
    tmp = tmp_path_factory.mktemp("two_ck")
    save = str(tmp / "ck")
    pretrain(tiny_train_argv(tiny_corpus, tmp, *MOE, "--train-iters", "4", "--save-interval", "2", "--save", save))
    return save


def _copy(src, tmp_path):
    dst = str(tmp_path / "ck")
    shutil.copytree(src, dst)
    return dst


def _flip(path, offset=None):
    data = bytearray(open(path, "rb").read())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0x5A
    open(path, "wb").write(bytes(data))


def _main(argv, capsys):
    rc = main(argv)
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    return rc, err


def test_manifest_lists_every_file_with_its_size_and_hash(two_checkpoints):
    for d, it in checkpointing.iteration_dirs(two_checkpoints):
        body = json.load(open(os.path.join(d, "checksums.json")))
        assert body["iteration"] == it and body["algorithm"] == "xxh3_64"
        on_disk = sorted(os.path.relpath(os.path.join(r, f), d) for r, _, fs in os.walk(d) for f in fs
                         if f != "checksums.json")
        assert sorted(body["files"]) == on_disk  # the dense file and the 4 expert files
        for rel, entry in body["files"].items():
            data = open(os.path.join(d, rel), "rb").read()  # the reference: the file's bytes hashed whole
            assert entry == {"bytes": len(data), "xxh3_64": xxhash.xxh3_64_hexdigest(data)}, rel


@pytest.mark.parametrize("damage, which", [("flip", "expert"), ("truncate", "dense"), ("delete", "expert")])
def test_torn_or_corrupted_file_refused_naming_it_and_the_fallback(tiny_corpus, tmp_path, two_checkpoints, capsys,
                                                                   damage, which):
    ck = _copy(two_checkpoints, tmp_path)
    d = checkpointing.iter_dir(ck, 4)
    path = checkpointing.dense_path(d) if which == "dense" else checkpointing.expert_path(d, 0, 3)
    if damage == "flip":
        _flip(path)
    elif damage == "truncate":
        os.truncate(path, os.path.getsize(path) - 100)
    else:
        os.remove(path)
    rc, err = _main(tiny_train_argv(tiny_corpus, tmp_path, *MOE, "--train-iters", "6", "--load", ck), capsys)
    assert rc == 2 and len(err) == 1, err
    assert path in err[0] and "torn or corrupted" in err[0] and "--load-fallback would load iteration 2" in err[0]


def test_load_fallback_loads_the_previous_checkpoint_and_training_goes_on(tiny_corpus, tmp_path, two_checkpoints,
                                                                         caplog):
    ck = _copy(two_checkpoints, tmp_path)
    bad = checkpointing.expert_path(checkpointing.iter_dir(ck, 4), 0, 1)
    _flip(bad)
    with caplog.at_level(logging.INFO, logger="megatron.checkpointing"):
        r = pretrain(tiny_train_argv(tiny_corpus, tmp_path, *MOE, "--train-iters", "4", "--save-interval", "2",
                                     "--load", ck, "--save", ck, "--load-fallback"))
    lines = [m for m in caplog.messages if m.startswith("--load-fallback")]
    assert len(lines) == 1 and bad in lines[0] and "loaded iteration 2" in lines[0], caplog.messages
    assert "iter_0000004.corrupt" in lines[0]
    # it resumed from iteration 2 (2 steps run, the loaded weights were iteration 2's), then saved 4 again
    assert len(r["losses"]) == 2 and r["state"].iteration == 4
    # the refused directory is kept for inspection, the new iteration 4 verifies, the tracker names it
    assert os.path.isdir(os.path.join(ck, "iter_0000004.corrupt"))
    assert checkpointing.read_tracker(ck) == 4 and checkpointing.checkpoint_complete(checkpointing.iter_dir(ck, 4))
    checkpointing.load_checkpoint_file(checkpointing.iter_dir(ck, 4), bad)  # the rewritten file verifies


def test_corrupted_tracker_without_and_with_fallback(tiny_corpus, tmp_path, two_checkpoints, capsys):
    ck = _copy(two_checkpoints, tmp_path)
    tracker = os.path.join(ck, checkpointing.TRACKER)
    open(tracker, "wb").write(b"\x004")
    argv = tiny_train_argv(tiny_corpus, tmp_path, *MOE, "--train-iters", "5", "--override-opt_param-scheduler", "--load", ck)
    rc, err = _main(argv, capsys)
    assert rc == 2 and len(err) == 1 and tracker in err[0] and "tracker file is corrupted" in err[0], err
    assert "--load-fallback would load iteration 4" in err[0]
    r = pretrain(argv + ["--load-fallback"])
    assert len(r["losses"]) == 1 and r["state"].iteration == 5  # resumed from the newest complete directory


def test_no_older_checkpoint_is_said_so(tiny_corpus, tmp_path, two_checkpoints, capsys):
    ck = _copy(two_checkpoints, tmp_path)
    shutil.rmtree(checkpointing.iter_dir(ck, 2))
    _flip(checkpointing.dense_path(checkpointing.iter_dir(ck, 4)))
    rc, err = _main(tiny_train_argv(tiny_corpus, tmp_path, *MOE, "--train-iters", "5", "--override-opt_param-scheduler", "--load", ck), capsys)
    assert rc == 2 and len(err) == 1 and f"no older complete checkpoint exists in {ck}" in err[0], err
    rc, err = _main(tiny_train_argv(tiny_corpus, tmp_path, *MOE, "--train-iters", "5", "--override-opt_param-scheduler", "--load", ck,
                                    "--load-fallback"), capsys)
    assert rc == 2 and len(err) == 1 and "found no older checkpoint" in err[0], err


def test_checkpoint_without_checksums_still_loads(tiny_corpus, tmp_path, two_checkpoints, caplog):
    ck = _copy(two_checkpoints, tmp_path)
    os.remove(os.path.join(checkpointing.iter_dir(ck, 4), "checksums.json"))  # as written before checksums existed
    with caplog.at_level(logging.INFO, logger="megatron.checkpointing"):
        r = pretrain(tiny_train_argv(tiny_corpus, tmp_path, *MOE, "--train-iters", "5", "--override-opt_param-scheduler", "--load", ck))
    assert r["state"].iteration == 5 and len(r["losses"]) == 1
    said = [m for m in caplog.messages if "without verification" in m]
    assert len(said) == 1, caplog.messages  # once, though three files were read


def test_corrupted_manifest_is_a_corrupted_checkpoint(tiny_corpus, tmp_path, two_checkpoints, capsys):
    ck = _copy(two_checkpoints, tmp_path)
    manifest = os.path.join(checkpointing.iter_dir(ck, 4), "checksums.json")
    text = open(manifest).read()
    digest = json.loads(text)["files"]["mp_rank_00/model_optim_rng.pt"]["xxh3_64"]
    open(manifest, "w").write(text.replace(digest, digest[::-1]))  # still valid JSON; its own digest catches it
    rc, err = _main(tiny_train_argv(tiny_corpus, tmp_path, *MOE, "--train-iters", "5", "--override-opt_param-scheduler", "--load", ck), capsys)
    assert rc == 2 and len(err) == 1 and manifest in err[0] and "iteration 2" in err[0], err
