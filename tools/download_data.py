#!/usr/bin/env python
"""Download the registered data files (GPT-2 BPE, LAMBADA, PIQA, BoolQ, RACE, TriviaQA, WebQs) into a data dir, verifying each sha256.

Example:
    python tools/download_data.py --data-dir data --only gpt2,lambada

Files already present with the right hash are skipped. Each download goes to a temporary file that is
renamed into place only after its hash matched. Exit codes: 0 ok, 1 a download failed, 2 bad flags or
a hash mismatch.
"""

import argparse
import hashlib
import os
import sys
import tempfile
import urllib.request
from pathlib import Path


from megatron.data.data_files import DATA_FILES, GROUPS, sha256_file
from megatron.errors import ConfigError, DataError, UserError

# Tests point a file at a local file:// URL through this mapping instead of touching the network.
URL_OVERRIDES = {}


def _select(only):
    if not only:
        return [f for f in DATA_FILES.values() if f.url]
    names = []
    for group in only.split(","):
        group = group.strip()
        if group in GROUPS:
            names.extend(GROUPS[group])
        elif group in DATA_FILES:
            names.append(group)
        else:
            raise ConfigError(f"--only {group!r}: not one of {', '.join(list(GROUPS) + list(DATA_FILES))}")
    return [DATA_FILES[n] for n in dict.fromkeys(names)]


def fetch(entry, data_dir: Path, opener=urllib.request.urlopen) -> str:
    """Download one entry; returns "present" or "downloaded". Raises DataError on hash mismatch,
    OSError on a transfer failure."""
    dest = data_dir / entry.relpath
    if dest.is_file() and (entry.sha256 is None or sha256_file(dest) == entry.sha256):
        return "present" if entry.sha256 else f"present (sha256 {sha256_file(dest)}, not recorded: unverified)"
    url = URL_OVERRIDES.get(entry.name, entry.url)
    if url is None:
        raise OSError(f"{dest}: no download location ({entry.note})")
    dest.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(prefix=dest.name + ".", suffix=".part", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out, opener(url, timeout=60) as resp:
            for chunk in iter(lambda: resp.read(1 << 20), b""):
                h.update(chunk)
                out.write(chunk)
        if entry.sha256 is not None and h.hexdigest() != entry.sha256:
            raise DataError(f"{url}: sha256 {h.hexdigest()} != expected {entry.sha256} for {dest}; not installed")
        os.replace(tmp, dest)
        if entry.sha256 is None:  # nothing to check against yet: say what was fetched, so it can be recorded
            return f"downloaded (sha256 {h.hexdigest()}, not recorded: unverified)"
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return "downloaded"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", required=True, help="where the files go (the layout of shared/data)")
    p.add_argument("--only", default=None, help=f"comma-separated groups or names: {', '.join(GROUPS)}")
    args = p.parse_args(argv)
    try:
        entries = _select(args.only)
    except UserError as e:
        print(f"download_data.py: error: {e}", file=sys.stderr)
        return 2
    status = 0
    for entry in entries:
        try:
            print(f"{entry.relpath}: {fetch(entry, Path(args.data_dir))}")
        except UserError as e:  # a hash mismatch
            print(f"download_data.py: error: {e}", file=sys.stderr)
            status = 2
        except OSError as e:  # the transfer failed (urllib's errors are OSErrors): try again later
            print(f"download_data.py: error: {entry.relpath}: download failed ({e})", file=sys.stderr)
            status = max(status, 1)
    return status


if __name__ == "__main__":
    sys.exit(main())
