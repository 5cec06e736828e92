"""Data-file registry (hash checks, cache, default dir) and tools/download_data.py with file:// sources."""

import hashlib
import importlib.util
from pathlib import Path

import pytest

from megatron.data import data_files
from megatron.data.data_files import DATA_FILES, DataFile, DataFileError, default_data_dir, resolve

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def private_hash_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(data_files, "_HASH_CACHE_FILE", tmp_path / "hash-cache" / "sha256.json")
    monkeypatch.setattr(data_files, "_memory_cache", {})


def _load_download_tool():
    spec = importlib.util.spec_from_file_location("download_data", REPO / "tools" / "download_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_registry_matches_sources_md():
    assert {f.relpath for f in DATA_FILES.values()} == {
        "gpt2/gpt2-vocab.json", "gpt2/gpt2-merges.txt", "lambada/lambada_test.jsonl",
        "piqa/valid.jsonl", "piqa/valid-labels.lst", "corpus/gutenberg_novels.jsonl",
        "boolq/validation.parquet", "race/race_high_test.jsonl", "triviaqa/rc.nocontext-validation.parquet",
        "webqs/test.parquet"}
    # the four harness-task files could not be fetched where they were registered: no hash recorded yet
    assert {n for n, f in DATA_FILES.items() if f.sha256 is None} == {
        "boolq-validation", "race-high-test", "triviaqa-validation", "webqs-test"}
    sources = default_data_dir() / "SOURCES.md"
    if not sources.is_file():
        pytest.skip(f"{sources} not present")
    text = sources.read_text()
    for entry in DATA_FILES.values():  # every hash we check against is the one the data's README publishes
        assert entry.sha256 is None or entry.sha256 in text, entry.relpath
    assert DATA_FILES["corpus"].url is None


def test_real_small_files_verify():
    try:
        path = resolve("piqa-valid-labels")
    except DataFileError as e:
        pytest.skip(f"shared data not available: {e}")
    assert path.name == "valid-labels.lst"
    assert resolve("gpt2/gpt2-merges.txt").name == "gpt2-merges.txt"  # lookup by relative path too


def _fake_data_dir(tmp_path, content=b"not the real lambada\n"):
    d = tmp_path / "data"
    (d / "lambada").mkdir(parents=True)
    (d / "lambada" / "lambada_test.jsonl").write_bytes(content)
    return d


def test_hash_mismatch_and_missing(tmp_path):
    d = _fake_data_dir(tmp_path)
    actual = hashlib.sha256(b"not the real lambada\n").hexdigest()
    with pytest.raises(DataFileError, match=rf"lambada_test\.jsonl: sha256 {actual} != expected {DATA_FILES['lambada'].sha256}.*download_data\.py --data-dir") as info:
        resolve("lambada", data_dir=d)
    assert "\n" not in str(info.value)
    assert resolve("lambada", data_dir=d, verify=False) == d / "lambada" / "lambada_test.jsonl"
    with pytest.raises(DataFileError, match=r"valid\.jsonl: missing"):
        resolve("piqa-valid", data_dir=d)
    with pytest.raises(DataFileError, match="missing.*any jsonl corpus"):
        resolve("corpus", data_dir=d)
    with pytest.raises(KeyError):
        resolve("wikitext", data_dir=d)


def test_digest_cached_per_size_and_mtime(tmp_path, monkeypatch):
    d = _fake_data_dir(tmp_path)
    calls = []
    real = data_files.sha256_file
    monkeypatch.setattr(data_files, "sha256_file", lambda p: calls.append(p) or real(p))
    for _ in range(3):
        with pytest.raises(DataFileError):
            resolve("lambada", data_dir=d)
    assert len(calls) == 1
    monkeypatch.setattr(data_files, "_memory_cache", {})  # a new process: the on-disk cache answers
    with pytest.raises(DataFileError):
        resolve("lambada", data_dir=d)
    assert len(calls) == 1
    (d / "lambada" / "lambada_test.jsonl").write_bytes(b"changed content, new size\n")
    with pytest.raises(DataFileError):
        resolve("lambada", data_dir=d)
    assert len(calls) == 2


def test_default_data_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("DATA_DIR", str(tmp_path))
    assert default_data_dir() == tmp_path
    monkeypatch.delenv("DATA_DIR")
    shared = REPO.parent / "shared" / "data"
    assert default_data_dir() == (shared if shared.is_dir() else Path("data"))


@pytest.fixture
def fake_entry(tmp_path, monkeypatch):
    """A registry entry for a small generated file served from a file:// URL (no network in tests)."""
    src = tmp_path / "src" / "labels.lst"
    src.parent.mkdir()
    src.write_bytes(b"0\n1\n1\n")
    entry = DataFile("test-labels", "test/labels.lst", hashlib.sha256(src.read_bytes()).hexdigest(), src.as_uri())
    monkeypatch.setitem(DATA_FILES, entry.name, entry)
    return entry, src


def test_download_from_file_url(tmp_path, fake_entry, capsys):
    entry, _ = fake_entry
    tool = _load_download_tool()
    dest_dir = tmp_path / "dl"
    assert tool.main(["--data-dir", str(dest_dir), "--only", "test-labels"]) == 0
    assert (dest_dir / "test" / "labels.lst").read_bytes() == b"0\n1\n1\n"
    assert resolve("test-labels", data_dir=dest_dir) == dest_dir / "test" / "labels.lst"
    assert tool.main(["--data-dir", str(dest_dir), "--only", "test-labels"]) == 0
    assert "test/labels.lst: present" in capsys.readouterr().out
    assert list((dest_dir / "test").iterdir()) == [dest_dir / "test" / "labels.lst"]  # no .part left


def test_download_rejects_bad_hash(tmp_path, fake_entry, monkeypatch, capsys):
    entry, src = fake_entry
    src.write_bytes(b"tampered\n")
    tool = _load_download_tool()
    dest_dir = tmp_path / "dl"
    assert tool.main(["--data-dir", str(dest_dir), "--only", "test-labels"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sha256" in err[0] and "labels.lst" in err[0]
    assert list((dest_dir / "test").iterdir()) == []  # nothing installed, temp file removed


def test_download_real_entry_with_url_override(tmp_path, capsys):
    try:
        src = resolve("piqa-valid-labels")
    except DataFileError as e:
        pytest.skip(f"shared data not available: {e}")
    tool = _load_download_tool()
    tool.URL_OVERRIDES["piqa-valid-labels"] = src.as_uri()
    try:
        assert tool.main(["--data-dir", str(tmp_path), "--only", "piqa-valid-labels"]) == 0
    finally:
        tool.URL_OVERRIDES.clear()
    assert resolve("piqa-valid-labels", data_dir=tmp_path).read_bytes() == src.read_bytes()
    assert tool.main(["--data-dir", str(tmp_path), "--only", "nonsense"]) == 2
