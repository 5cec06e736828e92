#!/usr/bin/env python
"""Kill -9 anywhere: train a small MoE GPT under torchrun, SIGKILL it at random moments, resume with --load until
done, and check that the result equals an uninterrupted run bit for bit.

    python tools/fault_inject.py --kills 20 --seed 1 --work-dir /tmp/fi -- <pretrain_gpt.py flags: model, data,
        tokenizer, --train-iters N --save-interval K --moe-expert-parallel-size 2 ...>

Each interrupted launch gets one fault, drawn from the seeded generator (printed, so a failure reproduces):
- `step`: SIGKILL a random rank once the log shows a randomly chosen iteration (mid-step, mid-all-to-all);
- `write:N`: the ranks SIGKILL themselves in the middle of their N-th checkpoint file write (a torn file on disk,
  MEGATRON_FAULT_INJECT, megatron/checkpointing/faults.py);
- `tracker`: rank 0 dies between writing the new tracker file and renaming it over the old one.
With `--async-save` among the pretrain flags the checkpoint files are written on a background thread while training
goes on, so `write:N` kills a rank during an asynchronous write (mid-step on the training thread), and `step` kills
land while a write may be in flight.
Invariants, checked after every restart and at the end: each restart loads the last complete checkpoint (the
tracker before the launch), never a torn one; no more steps are recomputed than were run since that checkpoint
(at most --save-interval; with --async-save at most twice that, as a save is committed only once its write has
finished, at the latest when the next one is due); the final dense weights, Adam state and every expert file equal the uninterrupted run's.
Prints one line per kill and a summary; exit 0 when every invariant held, 1 otherwise.
"""
import argparse
import os
import random
import re
import signal
import subprocess
import sys
import time


import torch

from megatron import checkpointing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ITER_RE = re.compile(r"^\s*iteration\s+(\d+)/")
STEP_MS_RE = re.compile(r"elapsed time per iteration \(ms\): ([\d.]+)")
LOADED_RE = re.compile(r"loaded checkpoint .* at iteration (\d+)")


def launch(nproc: int, flags, env_extra=None):
    env = {**os.environ, **(env_extra or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           os.path.join(ROOT, "pretrain_gpt.py"), *flags]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def worker_pids(pid: int):
    """The pretrain_gpt.py processes below `pid` (torchrun's workers)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/task/{p}/children") as f:
                kids = [int(x) for x in f.read().split()]
        except OSError:
            continue
        for k in kids:
            try:
                with open(f"/proc/{k}/cmdline", "rb") as f:
                    if b"pretrain_gpt.py" in f.read():
                        out.append(k)
            except OSError:
                pass
            todo.append(k)
    return sorted(set(out))


def run_with_fault(nproc, flags, fault, rng, log):
    """Runs one launch with `fault` (None: none); returns (returncode, last iteration logged, iteration loaded)."""
    env = {checkpointing.FAULT_ENV: fault} if fault and not fault.startswith("step") else None
    proc = launch(nproc, flags, env)
    target = int(fault.split(":")[1]) if fault and fault.startswith("step") else None
    last, loaded, killed, step_s = 0, None, False, 0.1
    for line in proc.stdout:
        log.write(line)
        m = ITER_RE.match(line)
        if m:
            last = int(m.group(1))
            step_ms = STEP_MS_RE.search(line)
            if step_ms:
                step_s = float(step_ms.group(1)) / 1000
        m = LOADED_RE.search(line)
        if m:
            loaded = int(m.group(1))
        if target is not None and not killed and last >= target:
            # somewhere inside the next step: at most one step's time (the last one logged), or a short step (the
            # tiny models of the tests run 30-50 ms) would be left behind and the kill land after the final save
            time.sleep(rng.uniform(0.0, min(0.1, step_s)))
            pids = worker_pids(proc.pid)
            if pids:
                os.kill(rng.choice(pids), signal.SIGKILL)
                killed = True
    proc.wait()
    if proc.returncode != 0:  # the survivors of a killed rank are torn down by torchrun; make sure none lingers
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass
    return proc.returncode, last, loaded


def same_checkpoint(a: str, b: str) -> list:
    """Differences between two checkpoint roots' latest iterations (empty: bitwise equal)."""
    da, _ = checkpointing.resolve_checkpoint_dir(a)
    db, _ = checkpointing.resolve_checkpoint_dir(b)
    diffs = []
    files = sorted((set(os.listdir(da)) | set(os.listdir(db))) - {checkpointing.MANIFEST})  # tensors compared
    for name in files:
        pa, pb = os.path.join(da, name), os.path.join(db, name)
        if os.path.isdir(pa) or os.path.isdir(pb):
            pa, pb = os.path.join(pa, "model_optim_rng.pt"), os.path.join(pb, "model_optim_rng.pt")
        if not (os.path.isfile(pa) and os.path.isfile(pb)):
            diffs.append(f"{name}: present in one run only")
            continue
        x, y = torch.load(pa, weights_only=True), torch.load(pb, weights_only=True)
        for section in ("model", "optimizer"):
            for k in sorted(set(x.get(section, {})) | set(y.get(section, {}))):
                vx, vy = x.get(section, {}).get(k), y.get(section, {}).get(k)
                if isinstance(vx, dict) and isinstance(vy, dict):
                    bad = [s for s in vx if not torch.equal(torch.as_tensor(vx[s]), torch.as_tensor(vy.get(s)))]
                    if bad or set(vx) != set(vy):
                        diffs.append(f"{name} {section} {k} {bad or 'keys'}")
                elif vx is None or vy is None or not torch.equal(vx, vy):
                    diffs.append(f"{name} {section} {k}")
    return diffs


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        print("error: give the pretrain_gpt.py flags after `--` (model, data, tokenizer, --train-iters, "
              "--save-interval)", file=sys.stderr)
        return 2
    cut = argv.index("--")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--nproc", type=int, default=2, help="ranks per launch (torchrun --nproc_per_node)")
    p.add_argument("--work-dir", required=True)
    args = p.parse_args(argv[:cut])
    flags = argv[cut + 1:]
    for banned in ("--save", "--load", "--exit-interval"):
        if banned in flags:
            print(f"error: {banned} is set by the harness; leave it out of the pretrain flags", file=sys.stderr)
            return 2
    needed = {}
    for name in ("--train-iters", "--save-interval"):  # the harness plans the kills around both
        i = flags.index(name) if name in flags else -1
        value = flags[i + 1] if 0 <= i < len(flags) - 1 else ""
        if not value.isdigit() or int(value) < 1:
            print(f"error: the pretrain flags need {name} N (a positive integer); the kills are planned around it",
                  file=sys.stderr)
            return 2
        needed[name] = int(value)
    train_iters, save_interval = needed["--train-iters"], needed["--save-interval"]
    max_lost = 2 * save_interval if "--async-save" in flags else save_interval  # steps a kill may cost
    os.makedirs(args.work_dir, exist_ok=True)
    ref, ck = os.path.join(args.work_dir, "reference"), os.path.join(args.work_dir, "faulty")
    log = open(os.path.join(args.work_dir, "launches.log"), "w")
    rng = random.Random(args.seed)
    print(f"fault injection: seed {args.seed}, {args.kills} kills, {args.nproc} ranks, {train_iters} iterations, "
          f"save every {save_interval}{' (asynchronous writes)' if '--async-save' in flags else ''}")
    t0 = time.time()
    rc, last, _ = run_with_fault(args.nproc, [*flags, "--log-interval", "1", "--save", ref], None, rng, log)
    if rc != 0 or last != train_iters:
        print(f"error: the uninterrupted run failed (exit {rc}); see {log.name}", file=sys.stderr)
        return 1
    print(f"uninterrupted run: {time.time() - t0:.1f} s")
    failures, recomputed, kills = [], [], 0
    while True:
        before = checkpointing.read_tracker(ck) if os.path.isdir(ck) else None
        start = before or 0
        if start == train_iters:  # a kill after the final save (in the closing validation): the work is done
            break
        fault = None
        if kills < args.kills:
            # a step fault needs a step to land in before the final save; near the end, faults hit the saves
            kind = rng.choice(["step", "step", "write", "tracker"] if train_iters - start >= 3 else ["write", "tracker"])
            if kind == "step":
                # within the next two save intervals, so the kills spread over the whole run
                fault = f"step:{rng.randint(start + 1, min(start + 2 * save_interval, train_iters - 2))}"
            elif kind == "write":
                fault = f"write:{rng.randint(1, 3)}"
            else:
                fault = "tracker"
        flags_now = [*flags, "--log-interval", "1", "--save", ck] + (["--load", ck] if before is not None else [])
        rc, last, loaded = run_with_fault(args.nproc, flags_now, fault, rng, log)
        if before is not None and loaded != before:
            failures.append(f"launch after tracker {before} loaded iteration {loaded}")
        if rc == 0:
            if last != train_iters:
                failures.append(f"a launch exited 0 at iteration {last} of {train_iters}")
            if fault is not None:
                print(f"  fault {fault} did not fire (the run finished first)")
            break
        kills += 1
        after = checkpointing.read_tracker(ck) if os.path.isdir(ck) else None
        lost = last - (after or 0)
        recomputed.append(lost)
        if lost > max_lost:
            failures.append(f"kill {kills}: {lost} steps to recompute > {max_lost} (--save-interval {save_interval}"
                            f"{', --async-save' if max_lost > save_interval else ''})")
        print(f"kill {kills}/{args.kills}: {fault} | resumed from {start}, reached {last}, last complete "
              f"checkpoint now {after} | {lost} step(s) to recompute")
    if checkpointing.read_tracker(ck) != train_iters:
        failures.append(f"the interrupted training did not reach iteration {train_iters}")
    diffs = same_checkpoint(ref, ck)
    if diffs:
        failures.append(f"final state differs from the uninterrupted run: {diffs[:5]}")
    print(f"kills survived: {kills}/{args.kills}; steps recomputed per kill: max {max(recomputed, default=0)}, "
          f"mean {sum(recomputed) / max(len(recomputed), 1):.1f} (save interval {save_interval}); final weights, "
          f"Adam state and expert files equal to the uninterrupted run: {'yes' if not diffs else 'NO'}; "
          f"{time.time() - t0:.0f} s")
    if kills < args.kills:
        failures.append(f"{kills} of {args.kills} kills fired: training finished first (a kill after the final save "
                        f"leaves nothing to resume); use more --train-iters or fewer --kills")
    for f in failures:
        print(f"FAILED: {f}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
