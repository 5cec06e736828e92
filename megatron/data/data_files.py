"""Registry of the third-party data files (tokenizer, eval sets, corpus): where they live, their sha256, where to get them."""

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from megatron.errors import DataError
from typing import Dict, Optional, Union

_REPO_ROOT = Path(__file__).resolve().parents[2]
_HASH_CACHE_FILE = Path(os.path.expanduser("~/.cache/megatron-moe/sha256-cache.json"))


@dataclass(frozen=True)
class DataFile:
    name: str  # short key used by callers, e.g. "gpt2-vocab"
    relpath: str  # path under the data dir
    sha256: Optional[str]  # None: not yet recorded (the file could not be fetched where this entry was written)
    url: Optional[str]  # canonical public location; None when there is no single download
    note: str = ""


DATA_FILES: Dict[str, DataFile] = {
    f.name: f
    for f in (
        DataFile("gpt2-vocab", "gpt2/gpt2-vocab.json", "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
                 "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json", "OpenAI encoder.json"),
        DataFile("gpt2-merges", "gpt2/gpt2-merges.txt", "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
                 "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe", "OpenAI vocab.bpe"),
        DataFile("lambada", "lambada/lambada_test.jsonl", "4aa8d02cd17c719165fc8a7887fddd641f43fcafa4b1c806ca8abc31fabdb226",
                 "https://openaipublic.blob.core.windows.net/gpt-2/data/lambada_test.jsonl", "LAMBADA (OpenAI detokenized)"),
        DataFile("piqa-valid", "piqa/valid.jsonl", "93503cc97c679e459b065c3d13e848282e44b2a25213985bed3e5d458abef72d",
                 "https://yonatanbisk.com/piqa/data/valid.jsonl", "PIQA validation questions"),
        DataFile("piqa-valid-labels", "piqa/valid-labels.lst", "b4192dc3a2a0363d9d60ccf79800cbbe2f32ebb17726efdde6970e0b8131bceb",
                 "https://yonatanbisk.com/piqa/data/valid-labels.lst", "PIQA validation labels"),
        DataFile("corpus", "corpus/gutenberg_novels.jsonl", "27b5956c1ccd624728759d4edb69f006c2c800bfd10fa1b430333aeac5112660",
                 None, "cleaned Project Gutenberg novels; no single download, use any jsonl corpus with --json-keys text"),
        # The seed's other zero-shot tasks, from the files lm-evaluation-harness 0.4 reads (its dataset_path). Their
        # sha256 is None: they could not be downloaded where these entries were written, so a present file is used
        # unverified (tools/download_data.py prints the hash it got; record it here once checked).
        DataFile("boolq-validation", "boolq/validation.parquet", None,
                 "https://huggingface.co/datasets/aps/super_glue/resolve/refs%2Fconvert%2Fparquet/boolq/validation/"
                 "0000.parquet", "BoolQ validation (SuperGLUE, the harness's aps/super_glue boolq)"),
        DataFile("race-high-test", "race/race_high_test.jsonl", None,
                 "https://huggingface.co/datasets/EleutherAI/race/resolve/e30efe648089df42c548e93faa9c5f1816e2c44f/"
                 "race_high_test.jsonl", "RACE-high test, one record per article (the harness's EleutherAI/race high)"),
        DataFile("triviaqa-validation", "triviaqa/rc.nocontext-validation.parquet", None,
                 "https://huggingface.co/datasets/mandarjoshi/trivia_qa/resolve/main/rc.nocontext/"
                 "validation-00000-of-00001.parquet", "TriviaQA rc.nocontext validation (mandarjoshi/trivia_qa)"),
        DataFile("webqs-test", "webqs/test.parquet", None,
                 "https://huggingface.co/datasets/stanfordnlp/web_questions/resolve/main/data/"
                 "test-00000-of-00001.parquet", "WebQuestions test (stanfordnlp/web_questions)"),
    )
}
# Groups accepted by tools/download_data.py --only.
GROUPS = {"gpt2": ("gpt2-vocab", "gpt2-merges"), "lambada": ("lambada",), "piqa": ("piqa-valid", "piqa-valid-labels"), "corpus": ("corpus",),
          "boolq": ("boolq-validation",), "race": ("race-high-test",), "triviaqa": ("triviaqa-validation",),
          "webqs": ("webqs-test",)}


class DataFileError(DataError):
    """A registered data file is missing or has the wrong sha256; the message says how to fetch it."""


def default_data_dir() -> Path:
    """``$DATA_DIR`` if set, else ``<repo>/../shared/data`` if it exists, else ``./data``."""
    env = os.environ.get("DATA_DIR")
    if env:
        return Path(env)
    shared = _REPO_ROOT.parent / "shared" / "data"
    if shared.is_dir():
        return shared
    return Path("data")


def sha256_file(path: Union[str, Path], chunk_bytes: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_bytes), b""):
            h.update(chunk)
    return h.hexdigest()


_memory_cache: Dict[str, str] = {}


def _stat_key(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"


def cached_sha256(path: Path) -> str:
    """sha256 of ``path``, remembered per (path, size, mtime) in memory and in ~/.cache/megatron-moe."""
    key = _stat_key(path)
    if key in _memory_cache:
        return _memory_cache[key]
    disk = {}
    try:
        disk = json.loads(_HASH_CACHE_FILE.read_text())
    except (OSError, ValueError):
        pass
    digest = disk.get(key)
    if digest is None:
        digest = sha256_file(path)
        disk[key] = digest
        try:  # the cache is an optimisation: a read-only home must not break data loading
            _HASH_CACHE_FILE.parent.mkdir(parents=True, exist_ok=True)
            tmp = _HASH_CACHE_FILE.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(disk))
            os.replace(tmp, _HASH_CACHE_FILE)
        except OSError:
            pass
    _memory_cache[key] = digest
    return digest


def lookup(name: str) -> DataFile:
    """Registry entry by short name (``"lambada"``) or relative path (``"lambada/lambada_test.jsonl"``)."""
    if name in DATA_FILES:
        return DATA_FILES[name]
    for entry in DATA_FILES.values():
        if entry.relpath == name:
            return entry
    raise KeyError(f"unknown data file {name!r}; known: {', '.join(DATA_FILES)}")


def resolve(name: str, data_dir: Optional[Union[str, Path]] = None, verify: bool = True) -> Path:
    """Path of registered file ``name`` (short name or relative path, see ``DATA_FILES``) under ``data_dir`` (default ``default_data_dir()``).

    Raises:
        KeyError for an unknown name; DataFileError (one line) when the file is missing or, with
        ``verify``, its sha256 differs from the registry.
    """
    entry = lookup(name)
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    path = data_dir / entry.relpath
    fix = f"run `python tools/download_data.py --data-dir {data_dir}`"
    if entry.url is None:
        fix = f"{entry.note}"
    if not path.is_file():
        expected = f"expected sha256 {entry.sha256}" if entry.sha256 else "sha256 not recorded"
        raise DataFileError(f"{path}: missing ({expected}); {fix}")
    if verify and entry.sha256 is not None:  # None: no recorded hash to check against (see DATA_FILES)
        actual = cached_sha256(path)
        if actual != entry.sha256:
            raise DataFileError(f"{path}: sha256 {actual} != expected {entry.sha256}; {fix}")
    return path
