"""Megatron-DeepSpeed's own MoE example scripts run here by changing the entry point only: each script's flag lines
(copied below as data from microsoft/Megatron-DeepSpeed examples_deepspeed/MoE/, sizes shrunk to a tiny model, the
data path pointing at a tiny corpus built here) plus the ds_config its sed line generates from
ds_config_gpt_TEMPLATE.json, under torchrun with 2 ranks (gloo, CPU): it trains, saves, and resumes from its own
--load (the first launch finds nothing there and starts fresh, as Megatron does)."""
import json
import os
import re
import string
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import ROOT, synthetic_docs

GPT2 = os.path.join(ROOT, "..", "shared", "data", "gpt2")

# ---- examples_deepspeed/MoE/ds_config_gpt_TEMPLATE.json, verbatim (placeholders filled by the scripts' sed)
TEMPLATE = """{
  "train_batch_size" : CONFIG_BATCH_SIZE,
  "train_micro_batch_size_per_gpu": CONFIG_MBSIZE,
  "steps_per_print": LOG_INTERVAL,

  "zero_optimization": {
    "stage": ZERO_STAGE
  },

  "gradient_clipping": 1.0,
  "prescale_gradients": PRESCALE_GRAD,

  "fp16": {
    "enabled": CONFIG_FP16_ENABLED,
    "loss_scale": 0,
    "loss_scale_window": 500,
    "hysteresis": 2,
    "min_loss_scale": 1,
    "initial_scale_power": 11
  },

  "bf16": {
    "enabled": CONFIG_BF16_ENABLED
  },
  "curriculum_learning": {
    "enabled": CONFIG_CL_ENABLED,
    "curriculum_type": "seqlen",
    "min_difficulty": CONFIG_CL_MIN,
    "max_difficulty": CONFIG_CL_MAX,
    "schedule_type": "fixed_linear",
    "schedule_config": {
      "total_curriculum_step": CONFIG_CL_DURATION,
      "difficulty_step": 8
    }
  },

  "wall_clock_breakdown" : false
}"""

# ---- the flag lines every MoE script shares (data_options, megatron_options, deepspeed_options), verbatim
DATA_OPTIONS = "--vocab-file ${VOCAB_PATH} --merge-file ${MERGE_PATH} --data-path ${DATA_BLEND} --data-impl mmap"
MEGATRON_HEAD = """--override-opt_param-scheduler --adam-beta1 0.9 --adam-beta2 0.95
    --tensor-model-parallel-size ${MP_SIZE} --moe-expert-parallel-size ${EP_PARALLEL_SIZE} --num-experts ${EP_SIZE}
    --moe-loss-coeff ${MLC}"""
MEGATRON_MOE = """--moe-train-capacity-factor ${MOE_TRAIN_CAP_FACTOR} --moe-eval-capacity-factor ${MOE_EVAL_CAP_FACTOR}
    --moe-min-capacity ${MOE_MIN_CAP} --init-method-std ${INIT_STD} --lr-decay-tokens ${LR_DECAY_TOKENS}
    --lr-warmup-tokens ${WARMUP_TOKENS} --micro-batch-size ${BATCH_SIZE} --exit-duration-in-mins ${EXIT_DURATION}"""
MEGATRON_TAIL = """--lr ${LR} --min-lr ${MIN_LR} --lr-decay-style cosine --split 98,2,0 --log-interval ${LOG_INTERVAL}
    --eval-interval ${EVAL_INTERVAL} --eval-iters ${EVAL_ITERS} --save-interval ${SAVE_INTERVAL} --weight-decay 0.1
    --clip-grad 1.0 --hysteresis 2 --num-workers 0 --fp16"""
MODEL = """--global-batch-size ${GLOBAL_BATCH_SIZE} --num-layers ${NUM_LAYERS} --hidden-size ${HIDDEN_SIZE}
    --num-attention-heads ${NUM_ATTN_HEADS} --seq-length ${SEQ_LEN} --max-position-embeddings ${SEQ_LEN}"""
TENSORBOARD = """--tensorboard-queue-size 1 --log-timers-to-tensorboard --log-batch-size-to-tensorboard
    --log-validation-ppl-to-tensorboard --tensorboard-dir ${TENSORBOARD_DIR}"""
DEEPSPEED = """--deepspeed --deepspeed_config ${config_json} --pipeline-model-parallel-size ${PP_SIZE}
    --no-pipeline-parallel --deepspeed-activation-checkpointing"""
ACT_CKPT = "--checkpoint-activations"

SCRIPTS = {
    # ds_pretrain_gpt_125M_MoE64.sh
    "125M_MoE64": f"""{MEGATRON_HEAD} {MEGATRON_MOE} {MODEL} --train-tokens ${{TRAIN_TOKENS}}
        --train-iters ${{TRAIN_ITERS}} {MEGATRON_TAIL} --load ${{CHECKPOINT_PATH}} --save ${{CHECKPOINT_PATH}}
        {TENSORBOARD} {ACT_CKPT} --create-moe-param-group {DATA_OPTIONS} {DEEPSPEED}""",
    # ds_pretrain_gpt_350M_MoE128.sh (the same flag lines; here with the template's curriculum switched on)
    "350M_MoE128": f"""{MEGATRON_HEAD} {MEGATRON_MOE} {MODEL} --train-tokens ${{TRAIN_TOKENS}}
        --train-iters ${{TRAIN_ITERS}} {MEGATRON_TAIL} --load ${{CHECKPOINT_PATH}} --save ${{CHECKPOINT_PATH}}
        {TENSORBOARD} {ACT_CKPT} --create-moe-param-group {DATA_OPTIONS} {DEEPSPEED}""",
    # ds_pretrain_gpt_350M_PR-MoE32or64.sh: pyramid (--num-experts per MoE layer) + residual
    "350M_PR-MoE32or64": f"""{MEGATRON_HEAD} --mlp-type residual {MEGATRON_MOE} {MODEL}
        --train-tokens ${{TRAIN_TOKENS}} --train-iters ${{TRAIN_ITERS}} {MEGATRON_TAIL} --load ${{CHECKPOINT_PATH}}
        --save ${{CHECKPOINT_PATH}} {TENSORBOARD} {ACT_CKPT} --create-moe-param-group {DATA_OPTIONS} {DEEPSPEED}""",
    # ds_pretrain_gpt_350M_PR-MoE32or64_MoS.sh: a shallower student (its --num-layers 21 is hard-coded there) distilled
    # from a PR-MoE teacher; --load is a student directory that does not exist yet
    "350M_PR-MoE32or64_MoS": f"""{MEGATRON_HEAD} --mlp-type residual {MEGATRON_MOE}
        --global-batch-size ${{GLOBAL_BATCH_SIZE}} --num-layers ${{STUDENT_LAYERS}} --hidden-size ${{HIDDEN_SIZE}}
        --num-attention-heads ${{NUM_ATTN_HEADS}} --seq-length ${{SEQ_LEN}} --max-position-embeddings ${{SEQ_LEN}}
        --train-tokens ${{TRAIN_TOKENS}} --train-iters ${{TRAIN_ITERS}} {MEGATRON_TAIL}
        --load ${{CHECKPOINT_PATH_STUDENT}} --save ${{CHECKPOINT_PATH_SAVE}} --mos --kd-beta-ce ${{KD_BETA_CE}}
        --num-layers-teacher ${{NUM_LAYERS}} --num-experts-teacher ${{EP_SIZE_TEACHER}}
        --hidden-size-teacher ${{HIDDEN_SIZE}} --num-attention-heads-teacher ${{NUM_ATTN_HEADS}}
        --load-teacher ${{CHECKPOINT_PATH_TEACHER}} {TENSORBOARD} {ACT_CKPT} --create-moe-param-group
        {DATA_OPTIONS} {DEEPSPEED}""",
    # ds_pretrain_gpt_1.3B_dense.sh: sample-based training with a batch-size ramp-up (--num-experts 1 = dense)
    "1.3B_dense": f"""{MEGATRON_HEAD} {MEGATRON_MOE} --rampup-batch-size ${{RAMPUP}} {MODEL}
        --train-tokens ${{TRAIN_TOKENS}} --train-samples ${{TRAIN_SAMPLES}} {MEGATRON_TAIL}
        --load ${{CHECKPOINT_PATH}} --save ${{CHECKPOINT_PATH}} {TENSORBOARD} {ACT_CKPT} {DATA_OPTIONS}
        --deepspeed --deepspeed_config ${{config_json}} --pipeline-model-parallel-size ${{PP_SIZE}}
        --deepspeed-activation-checkpointing""",
}

# The scripts' variables, shrunk: 2 ranks (NUM_GPUS = EP_PARALLEL_SIZE = 2), a 4-layer h32 GPT, 4 iterations
TINY = dict(SEQ_LEN=32, NUM_LAYERS=4, STUDENT_LAYERS=2, HIDDEN_SIZE=32, NUM_ATTN_HEADS=4, GLOBAL_BATCH_SIZE=8,
            BATCH_SIZE=2, MP_SIZE=1, PP_SIZE=1, EP_PARALLEL_SIZE=2, EP_SIZE="4", MLC=0.01, MOE_TRAIN_CAP_FACTOR=1.0,
            MOE_EVAL_CAP_FACTOR=1.0, MOE_MIN_CAP=4, INIT_STD=0.014, LR_DECAY_TOKENS=2048, WARMUP_TOKENS=256,
            EXIT_DURATION=30000000, TRAIN_TOKENS=10 ** 9, TRAIN_ITERS=4, LR=3.0e-3, MIN_LR=1.0e-06, LOG_INTERVAL=1,
            EVAL_INTERVAL=100, EVAL_ITERS=1, SAVE_INTERVAL=2, KD_BETA_CE=1, EP_SIZE_TEACHER="4 8",
            CL_ENABLED="false", CL_START_SEQLEN=8, CL_STEP=3)
OVERRIDES = {
    "350M_MoE128": dict(CL_ENABLED="true"),
    "350M_PR-MoE32or64": dict(EP_SIZE="4 8"),
    "350M_PR-MoE32or64_MoS": dict(EP_SIZE="4"),
    "1.3B_dense": dict(EP_SIZE="1", EP_PARALLEL_SIZE=1, RAMPUP="4 4 8", TRAIN_SAMPLES=40),
}


def ds_config(v: dict) -> str:
    """The scripts' sed pipeline over the template (ZERO_STAGE 0, PRESCALE_GRAD true, fp16 on, bf16 off)."""
    text = TEMPLATE
    for old, new in (("CONFIG_BATCH_SIZE", v["GLOBAL_BATCH_SIZE"]), ("CONFIG_MBSIZE", v["BATCH_SIZE"]),
                     ("LOG_INTERVAL", v["LOG_INTERVAL"]), ("ZERO_STAGE", 0), ("PRESCALE_GRAD", "true"),
                     ("CONFIG_FP16_ENABLED", "true"), ("CONFIG_BF16_ENABLED", "false"),
                     ("CONFIG_CL_ENABLED", v["CL_ENABLED"]), ("CONFIG_CL_MIN", v["CL_START_SEQLEN"]),
                     ("CONFIG_CL_MAX", v["SEQ_LEN"]), ("CONFIG_CL_DURATION", v["CL_STEP"])):
        text = text.replace(old, str(new), 1)
    return text


@pytest.fixture(scope="module")
def gpt2_corpus(tmp_path_factory):
    """300 synthetic documents tokenized with GPT-2's BPE (the scripts' --vocab-file/--merge-file)."""
    from megatron.data.indexed_dataset import MMapIndexedDatasetBuilder, best_fitting_dtype
    from megatron.tokenizer import build_tokenizer

    vocab, merges = os.path.join(GPT2, "gpt2-vocab.json"), os.path.join(GPT2, "gpt2-merges.txt")
    if not (os.path.isfile(vocab) and os.path.isfile(merges)):
        pytest.skip(f"GPT-2 BPE files not found under {GPT2} (tools/download_data.py fetches them)")
    tok = build_tokenizer("GPT2BPETokenizer", vocab_file=vocab, merge_file=merges)
    d = tmp_path_factory.mktemp("gpt2_corpus")
    prefix = str(d / "corpus_text_document")
    b = MMapIndexedDatasetBuilder(prefix + ".bin", dtype=best_fitting_dtype(tok.vocab_size))
    for t in synthetic_docs(300):
        b.add_item(np.array(tok.tokenize(t) + [tok.eod]))
        b.end_document()
    b.finalize(prefix + ".idx")
    return {"VOCAB_PATH": vocab, "MERGE_PATH": merges, "DATA_BLEND": prefix}


def launch(name: str, work, corpus, *extra, **values):
    """torchrun --nproc_per_node 2 pretrain_gpt.py <the script's flags> (+ `extra`); returns (stdout, stderr)."""
    v = {**TINY, **OVERRIDES.get(name, {}), **corpus, **values}
    work.mkdir(parents=True, exist_ok=True)
    cfg = work / f"ds_config_{name}.json"
    cfg.write_text(ds_config(v))
    ck = str(work / "checkpoint")
    v.update(config_json=str(cfg), CHECKPOINT_PATH=ck, CHECKPOINT_PATH_STUDENT=ck, CHECKPOINT_PATH_SAVE=ck,
             TENSORBOARD_DIR=str(work / "tensorboard"))
    flags = string.Template(SCRIPTS[name]).substitute(v).split() + list(extra)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        os.path.join(ROOT, "pretrain_gpt.py"), *flags], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, f"{name}: exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return r.stdout, r.stderr


def _losses(out):
    return {int(m.group(1)): float(m.group(2)) for m in re.finditer(r"iteration\s+(\d+)/.*?lm loss: (\S+)", out)}


def train_save_resume(name, work, corpus, iters=4, stop=2, **values):
    """Launch 1 stops after `stop` iterations (--exit-interval, saving); launch 2, the same command line, resumes."""
    out1, err1 = launch(name, work, corpus, "--exit-interval", str(stop), **values)
    ck = work / "checkpoint"
    assert f"WARNING: --load {ck}: no such directory; starting from scratch" in err1
    assert sorted(_losses(out1)) == list(range(1, stop + 1)), out1[-2000:]
    assert (ck / "latest_checkpointed_iteration.txt").read_text() == str(stop)
    out2, err2 = launch(name, work, corpus, **values)
    assert f"loaded checkpoint {ck} at iteration {stop}" in out2 and "WARNING: --load" not in err2
    losses = _losses(out2)
    assert sorted(losses) == list(range(stop + 1, iters + 1)), out2[-2000:]
    assert all(np.isfinite(list(losses.values())))
    assert (ck / "latest_checkpointed_iteration.txt").read_text() == str(iters)
    for note in ("--data-impl mmap", "--no-pipeline-parallel" if "--no-pipeline-parallel" in SCRIPTS[name] else "",
                 "prescale_gradients"):
        assert note in err1, (note, err1[-2000:])
    return out1 + out2, err1 + err2


def test_125M_MoE64_flags_train_save_resume(gpt2_corpus, tmp_path):
    out, _ = train_save_resume("125M_MoE64", tmp_path, gpt2_corpus)
    assert "moe layer 0" in out


@pytest.mark.slow
def test_350M_MoE128_flags_with_the_templates_curriculum(gpt2_corpus, tmp_path):
    out, _ = train_save_resume("350M_MoE128", tmp_path, gpt2_corpus)
    # CL_START_SEQLEN 8 -> SEQ_LEN 32 over CL_STEP 3 iterations, difficulty_step 8: 16, 24, 32, 32 by hand
    assert re.findall(r"curriculum seqlen: (\d+)", out) == ["16", "24", "32", "32"]


@pytest.mark.slow
def test_350M_PR_MoE_flags_train_save_resume(gpt2_corpus, tmp_path):
    out, _ = train_save_resume("350M_PR-MoE32or64", tmp_path, gpt2_corpus)
    assert "moe layer 1" in out


@pytest.mark.slow
def test_350M_PR_MoE_MoS_flags_distil_from_a_tiny_teacher(gpt2_corpus, tmp_path):
    teacher = tmp_path / "teacher"
    launch("350M_PR-MoE32or64", teacher, gpt2_corpus, EP_SIZE="4 8", TRAIN_ITERS=2)  # the teacher: PR-MoE, 4 layers
    out, _ = train_save_resume("350M_PR-MoE32or64_MoS", tmp_path / "student", gpt2_corpus,
                               CHECKPOINT_PATH_TEACHER=str(teacher / "checkpoint"))
    assert "kd loss" in out


@pytest.mark.slow
def test_1_3B_dense_flags_rampup_and_train_samples(gpt2_corpus, tmp_path):
    # --train-samples 40 with --rampup-batch-size 4 4 8 (Megatron): batches 4, 4, 8 reach 16 > 8 samples, then
    # (40 - 16) // 8 = 3 more: 6 iterations
    out, _ = train_save_resume("1.3B_dense", tmp_path, gpt2_corpus, iters=6, stop=3)
    assert re.findall(r"global batch size: (\d+)", out) == ["4", "4", "8", "8", "8", "8"]
    assert re.findall(r"consumed samples:\s+(\d+)", out) == ["4", "8", "16", "24", "32", "40"]
