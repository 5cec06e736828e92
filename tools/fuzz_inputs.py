#!/usr/bin/env python
"""Fuzz the inputs of pretrain_gpt.py: flip bytes in, truncate or zero-fill copies of the data (.idx, .bin), the
cached index .npy files, the checkpoint tracker, model_optim_rng.pt, an expert file, the SentencePiece model and
the GPT-2 vocab.json/merges.txt, run training on each damaged copy and classify what happened.

    python tools/fuzz_inputs.py --data-path PREFIX --tokenizer-model SP.model --vocab-file VOCAB.json \\
        --merge-file MERGES.txt --cases 200 --seed S --work-dir DIR [--subprocess 5]

Cases run in this process through megatron.training.main (a tiny MoE GPT; --subprocess K more as real
`python pretrain_gpt.py` processes). Every case must end in one of:
- refused: exit code 2 and ONE `error:` line naming the damaged file, no traceback; a .bin change that puts a
  token id outside the vocabulary anywhere in the file must be refused this way by the start-up scan (which reads
  every split's range at every start), so "trained" is impossible for it;
- a documented behaviour (docs/design.md §4 "Corrupted inputs"), each checked, not assumed:
  * cache rebuilt: a changed .npy index cache is derived data; rank 0 rebuilds it (a log line naming it), and the
    rebuilt file equals the original;
  * trained on changed tokens: a .bin byte change whose token ids stay inside the vocabulary cannot be told from
    data without a checksum of the data;
  * doc_idx changed: an .idx change confined to doc_idx that keeps it rising (GPT training does not read it);
  * tokenizer still parses: a SentencePiece/GPT-2 file change that leaves a valid, self-consistent tokenizer of
    the same size;
  * other complete iteration: the tracker changed into the number of another complete checkpoint, which loads.
Anything else (a traceback, a hang past --timeout, exit 0 where corruption must be caught, an error line that does
not name the file, several lines) is a failure. The originals are hashed before and after: they are never touched.
Exit code 0 when every case passed, 1 otherwise. The seed is printed first so a failure reproduces.
"""
import argparse
import contextlib
import hashlib
import io
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import numpy as np

TYPES = ("idx", "bin", "doc_idx.npy", "sample_idx.npy", "shuffle_idx.npy", "tracker", "model_optim_rng.pt",
         "expert", "sp.model", "vocab.json", "merges.txt")
MUTATIONS = ("flip", "truncate", "zero")
REFUSED = "refused: exit 2, one line naming the file"
FAIL = "FAIL"
BASE_ITERS = 2  # the base checkpoint holds iterations 1 and 2 (tracker 2)


def model_flags(train_iters: int):
    return ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "32",
            "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "3e-3", "--train-iters", str(train_iters),
            "--num-experts", "4", "--expert-interval", "2", "--topk", "2", "--split", "90,10,0", "--log-interval",
            "1", "--eval-interval", "1000", "--eval-iters", "1", "--seed", "7", "--peak-flops", "1e11",
            "--make-vocab-size-divisible-by", "64"]


def sha256(path: str) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


class Layout:
    """Paths of one copy of every input (the base, or the case directory, which is always the same path so that
    the index cache's key, which holds the data prefix's absolute path, finds the copied cache)."""

    def __init__(self, root: str):
        self.root = root
        self.prefix = os.path.join(root, "data", "corpus_text_document")
        self.sp = os.path.join(root, "tok", "sp.model")
        self.vocab = os.path.join(root, "tok", "vocab.json")
        self.merges = os.path.join(root, "tok", "merges.txt")
        self.cache = os.path.join(root, "cache")
        self.ck = os.path.join(root, "ck")

    def argv(self, kind: str, workers: int):
        """Flags for a case of this kind: checkpoint cases resume (--load), GPT-2 cases use that tokenizer."""
        tok = (["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", self.vocab, "--merge-file", self.merges]
               if kind in ("vocab.json", "merges.txt") else
               ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", self.sp])
        iters = BASE_ITERS + 1 if kind in ("tracker", "model_optim_rng.pt", "expert") else BASE_ITERS
        load = ["--load", self.ck] if kind in ("tracker", "model_optim_rng.pt", "expert") else []
        return [*model_flags(iters), *tok, "--data-path", self.prefix, "--data-cache-path", self.cache,
                "--num-workers", str(workers), *load]

    def target(self, kind: str, rng: random.Random) -> str:
        if kind in ("idx", "bin"):
            return f"{self.prefix}.{kind}"
        if kind.endswith(".npy"):
            name = kind[:-4]
            return os.path.join(self.cache, next(f for f in sorted(os.listdir(self.cache))
                                                 if f.startswith("corpus_text_document_train_")
                                                 and f.endswith(f"_{name}.npy")))
        if kind == "tracker":
            return os.path.join(self.ck, "latest_checkpointed_iteration.txt")
        it = os.path.join(self.ck, f"iter_{BASE_ITERS:07d}")
        if kind == "model_optim_rng.pt":
            return os.path.join(it, "mp_rank_00", "model_optim_rng.pt")
        if kind == "expert":
            return os.path.join(it, f"layer_0_expert_{rng.randrange(4)}_mp_rank_00_model_states.pt")
        return {"sp.model": self.sp, "vocab.json": self.vocab, "merges.txt": self.merges}[kind]


def build_base(args, case: Layout, base: Layout) -> None:
    """Copies of the originals, the index cache and a checkpoint at iterations 1 and 2, from a clean run made at
    the case directory's path (the cache key holds it), then kept as the pristine base."""
    from megatron.training import main

    for src, dst in ((args.data_path + ".idx", case.prefix + ".idx"), (args.data_path + ".bin", case.prefix + ".bin"),
                     (args.tokenizer_model, case.sp), (args.vocab_file, case.vocab), (args.merge_file, case.merges)):
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.copyfile(src, dst)
    argv = case.argv("idx", 0) + ["--save", case.ck, "--save-interval", "1"]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
        rc = main(argv)
    if rc != 0:
        raise SystemExit(f"error: the undamaged base run failed (exit {rc}): {err.getvalue()[-500:]}")
    shutil.copytree(case.root, base.root)


def mutate(path: str, how: str, rng: random.Random):
    """Damages `path` in place; returns the byte offsets changed (None for a truncation) and the new length."""
    data = bytearray(open(path, "rb").read())
    changed = None
    if how == "flip":
        changed = sorted({rng.randrange(len(data)) for _ in range(rng.randint(1, 4))})
        for i in changed:
            data[i] ^= rng.randrange(1, 256)
    elif how == "truncate":
        data = data[:rng.randrange(len(data))]
    else:
        start = rng.randrange(len(data))
        n = min(rng.randint(1, 256), len(data) - start)
        changed = [i for i in range(start, start + n) if data[i] != 0]
        data[start:start + n] = bytes(n)
        if not changed:  # the span held zeros already: zero-fill somewhere that is not
            nz = [i for i, b in enumerate(data) if b]
            i = rng.choice(nz)
            data[i], changed = 0, [i]
    with open(path, "wb") as f:
        f.write(bytes(data))
    return changed


def run_in_process(argv, timeout: float):
    """(exit code or 'traceback'/'hang', stderr text, log text) of megatron.training.main(argv) in this process."""
    from megatron.training import main

    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = Keep(level=logging.INFO)
    root = logging.getLogger()
    root.addHandler(handler)
    old_level = root.level
    root.setLevel(logging.INFO)

    def alarm(signum, frame):
        raise TimeoutError("case timed out")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(int(timeout))
    err, out = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(argv)
    except TimeoutError:
        rc = "hang"
    except BaseException as e:  # noqa: BLE001 - what a user would see as a traceback
        rc = "traceback"
        err.write(f"Traceback (in-process): {type(e).__name__}: {e}\n")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        root.removeHandler(handler)
        root.setLevel(old_level)
    return rc, err.getvalue(), "\n".join(records) + "\n" + out.getvalue()


def run_subprocess(argv, timeout: float):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    try:
        r = subprocess.run([sys.executable, os.path.join(ROOT, "pretrain_gpt.py"), *argv], capture_output=True,
                           text=True, timeout=timeout, cwd=ROOT, env=env)
    except subprocess.TimeoutExpired:
        return "hang", "", ""
    rc = "traceback" if "Traceback" in r.stderr else r.returncode
    return rc, r.stderr, r.stdout + r.stderr


def _bin_tokens_in_range(case: Layout, vocab_size: int) -> bool:
    from megatron.data.indexed_dataset import MMapIndexedDataset

    # The whole file: with --split 90,10,0 and --eval-iters 1 the train and valid splits together cover every
    # sequence, and both are scanned at start-up.
    ds = MMapIndexedDataset(case.prefix)
    tokens = np.frombuffer(ds._bin, dtype=ds.dtype)
    return int(tokens.min()) >= 0 and int(tokens.max()) < vocab_size


def _doc_idx_region(case: Layout):
    """Byte range of doc_idx inside the .idx file."""
    import struct

    with open(case.prefix + ".idx", "rb") as f:
        header = f.read(34)
    n_seq, n_doc = struct.unpack("<QQ", header[18:34])
    start = 34 + 12 * n_seq
    return start, start + 8 * n_doc


def classify(kind, how, path, changed, rc, err, logs, case: Layout, base: Layout, doc_region, vocab_size):
    """The outcome label of one case (REFUSED, a documented behaviour, or FAIL: why)."""
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    if rc in ("hang", "traceback"):
        return f"{FAIL}: {rc}: {err.strip().splitlines()[-1][:200] if err.strip() else ''}"
    if kind == "bin" and changed is not None and not _bin_tokens_in_range(case, vocab_size):
        # every start scans each split's .bin range: an out-of-range id is refused before training, always
        if rc != 2 or len(errors) != 1 or "Traceback" in err:
            return f"{FAIL}: out-of-range token id not refused at start-up (exit {rc}, {len(errors)} error lines)"
        if not re.fullmatch(rf"error: {re.escape(path)}: holds token id -?\d+, outside the tokenizer's "
                            rf"{vocab_size} ids .*", errors[0]):
            return f"{FAIL}: out-of-range token id not refused by the start-up check: {errors[0][:300]}"
        return REFUSED
    if rc == 2:
        if len(errors) != 1 or "Traceback" in err:
            return f"{FAIL}: exit 2 with {len(errors)} error lines"
        if path not in errors[0]:
            return f"{FAIL}: the error does not name {path}: {errors[0][:300]}"
        return REFUSED
    if rc != 0:
        return f"{FAIL}: exit code {rc}: {err.strip()[-300:]}"
    # exit 0: only documented behaviours are allowed, each checked
    if kind.endswith(".npy"):
        rebuilt = [m for m in logs.splitlines() if "rebuilding the index cache" in m and path in m]
        same = sha256(path) == sha256(os.path.join(base.cache, os.path.basename(path)))
        return ("cache rebuilt (log line names it), then trained" if rebuilt and same
                else f"{FAIL}: cache change neither refused nor rebuilt")
    if kind == "bin" and changed is not None:  # in range (out-of-range ids were classified above)
        return "trained on changed in-range tokens (undetectable without a data checksum)"
    if kind == "idx" and changed is not None and all(doc_region[0] <= i < doc_region[1] for i in changed):
        return "trained: doc_idx changed but still rising (GPT training does not read it)"
    if kind in ("sp.model", "vocab.json", "merges.txt"):
        return "trained: the tokenizer file still parses and is self-consistent"
    if kind == "tracker":
        m = re.search(r"loaded checkpoint .* at iteration (\d+)", logs)
        text = open(path, "rb").read().decode("ascii", errors="replace").strip()
        if m and text.isdigit() and int(m.group(1)) == int(text) != BASE_ITERS:
            return "loaded another complete iteration (the tracker was changed into its number)"
    return f"{FAIL}: exit 0 although {kind} was damaged ({how})"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-path", required=True, help="tokenized prefix (PREFIX.bin/.idx), SentencePiece ids")
    p.add_argument("--tokenizer-model", required=True, help="the SentencePiece model that tokenized --data-path")
    p.add_argument("--vocab-file", required=True, help="GPT-2 vocab.json")
    p.add_argument("--merge-file", required=True, help="GPT-2 merges.txt")
    p.add_argument("--cases", type=int, default=200, help="in-process cases (spread evenly over the file types)")
    p.add_argument("--subprocess", type=int, default=0, help="further cases as real pretrain_gpt.py processes")
    p.add_argument("--seed", type=int, default=None, help="default: drawn at random (printed)")
    p.add_argument("--work-dir", required=True)
    p.add_argument("--timeout", type=float, default=120.0, help="seconds before a case counts as a hang")
    args = p.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 31)
    print(f"fuzz_inputs: seed {seed}, {args.cases} in-process + {args.subprocess} subprocess cases "
          f"(rerun with --seed {seed})", flush=True)
    originals = [args.data_path + ".idx", args.data_path + ".bin", args.tokenizer_model, args.vocab_file,
                 args.merge_file]
    before = {f: sha256(f) for f in originals}
    t0 = time.time()
    base, case = Layout(os.path.join(args.work_dir, "base")), Layout(os.path.join(args.work_dir, "case"))
    shutil.rmtree(args.work_dir, ignore_errors=True)
    build_base(args, case, base)
    from megatron.tokenizer import build_tokenizer

    vocab_size = build_tokenizer("SentencePieceTokenizer", tokenizer_model=base.sp).vocab_size
    doc_region = _doc_idx_region(base)
    rng = random.Random(seed)
    table = defaultdict(Counter)
    failures = []
    total = args.cases + args.subprocess
    for i in range(total):
        kind = TYPES[i % len(TYPES)]
        how = rng.choice(MUTATIONS)
        shutil.rmtree(case.root, ignore_errors=True)
        shutil.copytree(base.root, case.root)
        path = case.target(kind, rng)
        changed = mutate(path, how, rng)
        damaged = sha256(path)
        as_process = i >= args.cases
        run = run_subprocess if as_process else run_in_process
        rc, err, logs = run(case.argv(kind, 1 if as_process else 0), args.timeout)
        if os.path.exists(path) and sha256(path) != damaged and not kind.endswith(".npy"):
            outcome = f"{FAIL}: the run rewrote the damaged input {path}"
        else:
            outcome = classify(kind, how, path, changed, rc, err, logs, case, base, doc_region, vocab_size)
        where = "subprocess" if as_process else "in-process"
        table[kind][outcome.split(":")[0] if outcome.startswith(FAIL) else outcome] += 1
        line = f"case {i + 1}/{total} [{where}] {kind} {how}: {outcome}"
        if outcome.startswith(FAIL):
            failures.append(line)
        print(line, flush=True)
    after = {f: sha256(f) for f in originals}
    untouched = before == after
    print("\nsummary (cases by file type and outcome):")
    for kind in TYPES:
        print(f"  {kind:20s} " + "; ".join(f"{n} x {o}" for o, n in sorted(table[kind].items())))
    outcomes = Counter()
    for c in table.values():
        outcomes.update(c)
    print("totals: " + "; ".join(f"{n} x {o}" for o, n in sorted(outcomes.items())))
    hangs = sum(1 for f in failures if ": hang" in f)
    tracebacks = sum(1 for f in failures if ": traceback" in f)
    print(f"fuzz_inputs: seed {seed}: {total} cases, {total - len(failures)} passed, {len(failures)} failed "
          f"({tracebacks} tracebacks, {hangs} hangs); originals untouched: {'yes' if untouched else 'NO'}; "
          f"{time.time() - t0:.0f} s")
    for f in failures:
        print(f, flush=True)
    return 0 if not failures and untouched else 1


if __name__ == "__main__":
    sys.exit(main())
