"""Smoke tests of the aio tools: report_env (ds_report), nvme_tune (ds_nvme_tune), bench_aio."""
import importlib.util
import json
import os
from pathlib import Path

import pytest

from moe.ops.op_builder import AsyncIOBuilder

REPO = Path(__file__).resolve().parents[2]


def load_tool(name):
    spec = importlib.util.spec_from_file_location(f"_tool_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def aio_or_skip():
    try:
        return AsyncIOBuilder().load()
    except RuntimeError as err:
        pytest.skip(f"aio extension unavailable: {err}")


def test_report_env_lists_ops_and_versions(capsys):
    assert load_tool("report_env").main() == 0
    out = capsys.readouterr().out
    for needle in ("async_io", "libaio header", "torch", "python", "apex", "cuda available"):
        assert needle in out


def test_builder_load_error_says_how_to_fix(monkeypatch):
    builder = AsyncIOBuilder()
    monkeypatch.setattr(type(builder), "MODULE", "moe.ops._no_such_module")
    monkeypatch.setattr(type(builder), "sources", lambda self: ["/nonexistent/aio.cpp"])
    with pytest.raises(RuntimeError, match=r"not available.*libaio-dev.*pip install --no-build-isolation -e \."):
        builder.load()


def test_nvme_tune_tiny_sweep(tmp_path, capsys):
    aio_or_skip()
    sweep = {"block_size": [65536], "queue_depth": [4], "intra_op_parallelism": [1, 2],
             "single_submit": [False], "overlap_events": [True]}
    rc = load_tool("nvme_tune").main(["--nvme_dir", str(tmp_path), "--io_size", str(1 << 20), "--loops", "1",
                                      "--sweep_config", json.dumps(sweep)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "Best performance (GB/sec): read = " in out and "write = " in out
    config = json.loads(out[out.index("{\n"):])["aio"]
    assert config["intra_op_parallelism"] in (1, 2) and config["block_size"] == 65536
    assert os.listdir(tmp_path) == []  # temp files cleaned up


def test_nvme_tune_rejects_unknown_setting(tmp_path):
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['blocksize'\]"):
        load_tool("nvme_tune").parse_sweep('{"blocksize": [1]}')


def test_bench_aio_small_run(tmp_path, capsys, monkeypatch):
    aio_or_skip()
    bench = load_tool("bench_aio")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)  # fadvise only: never drop the whole machine's cache in tests
    bench.main(["--dir", str(tmp_path), "--size_mib", "4", "--reps", "1", "--no_deepspeed"])
    out = capsys.readouterr().out
    assert "locked write / dd O_DIRECT write" in out and ("PASS" in out or "MISS" in out)
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_bench_offload_train_small_run(tmp_path):
    """tools/bench_offload.py --train end to end on a tiny model (5 variants, each in its own process): every row
    present, the swapped variants moved the whole expert state each step, and the JSON carries both bounds."""
    import subprocess
    import sys

    aio_or_skip()
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, str(REPO / "tools" / "bench_offload.py"), "--train", "--work-dir",
                        str(tmp_path / "w"), "--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "128",
                        "--num-experts", "8", "--buffer-count", "2", "--seq-length", "32", "--steps", "2", "--rounds", "1",
                        "--output",
                        str(out)], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads(out.read_text())
    names = [row["variant"] for row in data["rows"]]
    assert names[0] == "in-memory AdamW" and len(names) == 5 and "behind the next forward" in names[2]
    assert data["io_bound_s"] > 0 and data["reachable_s"] > 0
    for row in data["rows"][1:]:
        assert row["resident_expert_state_bytes"] < row["expert_state_bytes"]
    assert "targets: pipelined step <= 1.15 x bound" in r.stdout
    assert r.stderr.count("swap per step") == 4  # one line per offloaded variant
