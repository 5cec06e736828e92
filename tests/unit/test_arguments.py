"""Every CLI flag maps to exactly one TrainConfig field; cross-concern validation names the flags."""
import json
import os
import tempfile

import pytest

from megatron.arguments import build_parser, parse_args, train_config_from_args, validate
from megatron.errors import ConfigError

_DS_JSON = os.path.join(tempfile.mkdtemp(prefix="test_arguments_"), "ds.json")
with open(_DS_JSON, "w") as _f:
    json.dump({"train_batch_size": 8, "train_micro_batch_size_per_gpu": 1}, _f)

BASE = ["--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
        "--train-iters", "100"]

# a valid one-cycle schedule, for the cases whose own flag is one of its two required bounds
ONE_CYCLE = ["--lr-decay-style", "one-cycle", "--cycle-min-lr", "1e-5", "--cycle-max-lr", "1e-2"]

# flag -> (argv value(s), config field path, expected value). Adding a flag means adding it here on purpose.
MAPPING = {
    "--num-layers": (["6"], "model.num_layers", 6),
    "--hidden-size": (["128"], "model.hidden_size", 128),
    "--ffn-hidden-size": (["300"], "model.ffn_hidden_size", 300),
    "--num-attention-heads": (["8"], "model.num_attention_heads", 8),
    "--seq-length": (["48"], "model.seq_length", 48),
    "--max-position-embeddings": (["96"], "model.max_position_embeddings", 96),
    "--position-embedding-type": (["rope"], "model.position_embedding_type", "rope"),
    "--rotary-base": (["500"], "model.rotary_base", 500.0),
    "--hidden-dropout": (["0.2"], "model.hidden_dropout", 0.2),
    "--attention-dropout": (["0.3"], "model.attention_dropout", 0.3),
    "--init-method-std": (["0.006"], "model.init_method_std", 0.006),
    "--layernorm-epsilon": (["1e-6"], "model.layernorm_epsilon", 1e-6),
    "--make-vocab-size-divisible-by": (["64"], "tokenizer.make_vocab_size_divisible_by", 64),
    "--no-bias-gelu-fusion": ([], "model.activation", "gelu"),
    "--openai-gelu": ([], "model.activation", "gelu_tanh"),  # after --no-bias-gelu-fusion (PRECEDING)
    "--num-experts": (["8"], "moe.num_experts", (8,)),
    "--expert-interval": (["1", "--num-experts", "4"], "moe.expert_interval", 1),
    "--topk": (["2", "--num-experts", "4"], "moe.topk", 2),
    "--moe-expert-parallel-size": (["2", "--num-experts", "4"], "moe.ep_size", (2,)),
    "--moe-train-capacity-factor": (["1.25", "--num-experts", "4"], "moe.train_capacity_factor", 1.25),
    "--moe-eval-capacity-factor": (["2.0", "--num-experts", "4"], "moe.eval_capacity_factor", 2.0),
    "--moe-min-capacity": (["8", "--num-experts", "4"], "moe.min_capacity", 8),
    "--moe-loss-coeff": (["0.02", "--num-experts", "4"], "moe.loss_coeff", 0.02),
    "--disable-moe-token-dropping": (["--num-experts", "4"], "moe.drop_tokens", False),
    "--moe-z-loss-coeff": (["0.001", "--num-experts", "4"], "moe.z_loss_coeff", 0.001),
    "--moe-noisy-gate-policy": (["RSample", "--num-experts", "4"], "moe.noisy_gate_policy", "RSample"),
    "--moe-use-rts": (["--num-experts", "4"], "moe.use_rts", True),  # after --no-moe-use-rts (PRECEDING)
    "--no-moe-use-rts": (["--num-experts", "4"], "moe.use_rts", False),
    "--mlp-type": (["residual", "--num-experts", "4"], "moe.mlp_type", "residual"),
    "--moe-token-drop-policy": (["probs", "--num-experts", "4"], "moe.drop_policy", "probs"),
    "--disable-moe-top2-2nd-expert-sampling": (["--num-experts", "4"], "moe.second_expert_sampling", False),
    # megatron-core router flags (router_fields): any but --moe-router-dtype selects router_family 'megatron'
    "--moe-router-topk": (["2", "--num-experts", "4"], "moe.topk", 2),
    "--moe-router-score-function": (["sigmoid", "--num-experts", "4"], "moe.score_function", "sigmoid"),
    "--moe-router-pre-softmax": (["--num-experts", "4"], "moe.pre_softmax", True),
    "--moe-router-topk-scaling-factor": (["2.5", "--num-experts", "4", "--moe-router-topk", "2"],
                                         "moe.topk_scaling_factor", 2.5),
    "--moe-router-num-groups": (["2", "--moe-router-group-topk", "1", "--num-experts", "4", "--moe-router-topk",
                                 "2"], "moe.num_groups", 2),
    "--moe-router-group-topk": (["1", "--moe-router-num-groups", "2", "--num-experts", "4", "--moe-router-topk",
                                 "2"], "moe.group_topk", 1),
    "--moe-router-enable-expert-bias": (["--moe-router-score-function", "sigmoid", "--num-experts", "4"],
                                        "moe.expert_bias", True),
    "--moe-router-bias-update-rate": (["0.01", "--moe-router-topk", "2", "--num-experts", "4"],
                                      "moe.bias_update_rate", 0.01),
    "--moe-router-bias-update-type": (["proportional", "--moe-router-topk", "2", "--num-experts", "4"],
                                      "moe.bias_update_type", "proportional"),
    "--moe-router-load-balancing-type": (["seq_aux_loss", "--moe-router-topk", "2", "--num-experts", "4"],
                                         "moe.load_balancing_type", "seq_aux_loss"),
    "--moe-aux-loss-coeff": (["0.02", "--moe-router-topk", "2", "--num-experts", "4"], "moe.loss_coeff", 0.02),
    "--moe-input-jitter-eps": (["0.1", "--moe-router-topk", "2", "--num-experts", "4"], "moe.input_jitter_eps",
                               0.1),
    "--moe-router-dtype": (["fp64", "--num-experts", "4"], "moe.router_dtype", "fp64"),
    "--moe-router-center-input": (["causal", "--num-experts", "4"], "moe.router_input_centering", "causal"),
    "--moe-router-input-whitening-momentum": (["0.5", "--moe-router-center-input", "causal", "--num-experts", "4"],
                                              "moe.router_input_whitening", 0.5),
    "--moe-router-input-whitening-refresh": (["--moe-router-input-whitening-momentum", "0.5",
                                             "--moe-router-center-input", "causal", "--num-experts", "4"],
                                            "moe.router_input_whitening_refresh", True),
    "--moe-expert-capacity-factor": (["1.5", "--moe-router-topk", "2", "--num-experts", "4"], "moe.drop_tokens",
                                     True),
    "--moe-pad-expert-input-to-capacity": (["--num-experts", "4"], "moe.pad_to_capacity", True),
    "--no-moe-pad-expert-input-to-capacity": (["--num-experts", "4"], "moe.pad_to_capacity", False),
    "--micro-batch-size": (["2"], "data.micro_batch_size", 2),
    "--global-batch-size": (["16"], "data.global_batch_size", 16),
    "--train-iters": (["77"], "scheduler.train_iters", 77),
    "--train-tokens": (["6400"], "scheduler.train_iters", 200),  # 6400 tokens / (1 sample x 32 tokens)
    "--lr": (["0.5"], "optimizer.lr", 0.5),
    "--min-lr": (["1e-5"], "optimizer.min_lr", 1e-5),
    "--lr-decay-style": (["cosine"], "scheduler.lr_decay_style", "cosine"),
    "--lr-range-test-min-lr": (["1e-5"], "scheduler.lr_range_test_min_lr", 1e-5),
    "--lr-range-test-step-size": (["50"], "scheduler.lr_range_test_step_size", 50),
    "--lr-range-test-step-rate": (["4.0"], "scheduler.lr_range_test_step_rate", 4.0),
    "--lr-range-test-staircase": ([], "scheduler.lr_range_test_staircase", True),
    "--cycle-min-lr": (["1e-4", *ONE_CYCLE[:2], "--cycle-max-lr", "1e-2"], "scheduler.cycle_min_lr", 1e-4),
    "--cycle-max-lr": (["2e-3", *ONE_CYCLE[:4]], "scheduler.cycle_max_lr", 2e-3),
    "--cycle-first-step-size": (["40"], "scheduler.cycle_first_step_size", 40),
    "--cycle-second-step-size": (["60"], "scheduler.cycle_second_step_size", 60),
    "--cycle-first-stair-count": (["4"], "scheduler.cycle_first_stair_count", 4),
    "--cycle-second-stair-count": (["6"], "scheduler.cycle_second_stair_count", 6),
    "--decay-step-size": (["10"], "scheduler.decay_step_size", 10),
    "--decay-lr-rate": (["0.5"], "scheduler.decay_lr_rate", 0.5),
    "--no-cycle-momentum": ([], "scheduler.cycle_momentum", False),
    "--cycle-min-mom": (["0.85"], "scheduler.cycle_min_mom", 0.85),
    "--cycle-max-mom": (["0.95"], "scheduler.cycle_max_mom", 0.95),
    "--decay-mom-rate": (["0.1"], "scheduler.decay_mom_rate", 0.1),
    "--lr-warmup-iters": (["7"], "scheduler.lr_warmup_iters", 7),
    "--lr-warmup-tokens": (["320"], "scheduler.lr_warmup_tokens", 320),  # the LR follows consumed tokens
    "--lr-decay-iters": (["90"], "scheduler.lr_decay_iters", 90),
    "--lr-decay-tokens": (["640"], "scheduler.lr_decay_tokens", 640),
    "--weight-decay": (["0.1"], "optimizer.weight_decay", 0.1),
    "--adam-beta1": (["0.8"], "optimizer.adam_beta1", 0.8),
    "--adam-beta2": (["0.95"], "optimizer.adam_beta2", 0.95),
    "--adam-eps": (["1e-6"], "optimizer.adam_eps", 1e-6),
    "--clip-grad": (["0.5"], "optimizer.clip_grad", 0.5),
    "--overlap-grad-reduce": ([], "optimizer.overlap_grad_reduce", True),
    "--ddp-bucket-size": (["1000"], "optimizer.ddp_bucket_size", 1000),
    "--no-check-for-nan-in-loss-and-grad": ([], "optimizer.check_for_nan_in_loss_and_grad", False),
    "--check-for-nan-in-loss-and-grad": ([], "optimizer.check_for_nan_in_loss_and_grad", True),  # (PRECEDING)
    "--bf16": ([], "optimizer.bf16", True),
    "--fp16": ([], "optimizer.fp16", True),
    "--loss-scale": (["128"], "optimizer.loss_scale", 128.0),
    "--initial-loss-scale": (["1024"], "optimizer.initial_loss_scale", 1024.0),
    "--min-loss-scale": (["2"], "optimizer.min_loss_scale", 2.0),
    "--loss-scale-window": (["50"], "optimizer.loss_scale_window", 50),
    "--hysteresis": (["3"], "optimizer.hysteresis", 3),
    "--seed": (["42"], "data.seed", 42),
    "--tensor-model-parallel-size": (["2"], "parallel.tensor_model_parallel_size", 2),
    "--sequence-parallel": ([], "parallel.sequence_parallel", True),
    "--context-parallel-size": (["2"], "parallel.context_parallel_size", 2),
    "--expert-tensor-parallel-size": (["2"], "parallel.expert_tensor_parallel_size", 2),
    "--enable-expert-tensor-parallelism": (["--tensor-model-parallel-size", "2"],
                                           "parallel.expert_tensor_parallel_size", 2),  # ETP = TP
    "--pipeline-model-parallel-size": (["2"], "parallel.pipeline_model_parallel_size", 2),
    "--num-layers-per-virtual-pipeline-stage": (["1"], "parallel.layers_per_virtual_stage", 1),
    "--decoder-first-pipeline-num-layers": (["1"], "parallel.first_stage_layers", 1),
    "--decoder-last-pipeline-num-layers": (["1"], "parallel.last_stage_layers", 1),
    "--pipeline-schedule": (["gpipe"], "parallel.pipeline_schedule", "gpipe"),
    "--distributed-backend": (["gloo"], "parallel.distributed_backend", "gloo"),
    "--compile": ([], "compile", True),
    "--deterministic": ([], "deterministic", True),
    "--no-tf32": ([], "tf32", False),
    "--distributed-timeout-minutes": (["45"], "parallel.distributed_timeout_minutes", 45.0),
    "--checkpoint-activations": ([], "model.recompute_granularity", "full"),
    "--recompute-granularity": (["selective"], "model.recompute_granularity", "selective"),
    "--recompute-method": (["block", "--recompute-granularity", "full", "--recompute-num-layers", "1"],
                           "model.recompute_method", "block"),
    "--recompute-num-layers": (["2", "--checkpoint-activations"], "model.recompute_num_layers", 2),
    "--zero-stage": (["2"], "parallel.zero_stage", 2),
    "--use-distributed-optimizer": ([], "parallel.zero_stage", 1),
    "--data-path": (["0.3", "A", "0.7", "B"], "data.data_path", ("0.3", "A", "0.7", "B")),
    "--split": (["98,2,0"], "data.split", "98,2,0"),
    "--data-cache-path": (["/tmp/c"], "data.data_cache_path", "/tmp/c"),
    "--num-workers": (["0"], "data.num_workers", 0),
    "--eod-mask-loss": ([], "data.eod_mask_loss", True),
    "--tokenizer-type": (["SentencePieceTokenizer"], "tokenizer.tokenizer_type", "SentencePieceTokenizer"),
    "--vocab-file": (["v.json"], "tokenizer.vocab_file", "v.json"),
    "--merge-file": (["m.txt"], "tokenizer.merge_file", "m.txt"),
    "--tokenizer-model": (["t.model"], "tokenizer.tokenizer_model", "t.model"),
    "--save": (["/tmp/s"], "checkpoint.save", "/tmp/s"),
    "--load": (["/tmp/l"], "checkpoint.load", "/tmp/l"),
    "--save-interval": (["5"], "checkpoint.save_interval", 5),
    "--no-load-optim": ([], "checkpoint.no_load_optim", True),
    "--no-load-rng": ([], "checkpoint.no_load_rng", True),
    "--finetune": ([], "checkpoint.finetune", True),
    "--load-fallback": ([], "checkpoint.load_fallback", True),
    "--async-save": ([], "checkpoint.async_save", True),
    "--log-interval": (["3"], "logging.log_interval", 3),
    "--eval-interval": (["9"], "logging.eval_interval", 9),
    "--eval-iters": (["4"], "logging.eval_iters", 4),
    "--exit-interval": (["11"], "logging.exit_interval", 11),
    "--exit-duration-in-mins": (["30"], "logging.exit_duration_in_mins", 30.0),
    "--exit-signal-handler": ([], "logging.exit_signal_handler", True),
    "--tensorboard-dir": (["/tmp/tb"], "logging.tensorboard_dir", "/tmp/tb"),
    "--peak-flops": (["1e12"], "logging.peak_flops", 1e12),
    "--reset-iteration": ([], "checkpoint.reset_iteration", True),
    "--mos": (["--load-teacher", "T", "--num-experts", "4"], "distill.mos", True),
    "--kd": (["--load-teacher", "T"], "distill.kd", True),
    "--load-teacher": (["T", "--kd"], "distill.load_teacher", "T"),
    "--num-layers-teacher": (["24", "--kd", "--load-teacher", "T"], "distill.num_layers_teacher", 24),
    "--hidden-size-teacher": (["64", "--kd", "--load-teacher", "T"], "distill.hidden_size_teacher", 64),
    "--num-attention-heads-teacher": (["8", "--kd", "--load-teacher", "T"], "distill.num_attention_heads_teacher", 8),
    "--num-experts-teacher": (["8", "16", "--kd", "--load-teacher", "T"], "distill.num_experts_teacher", (8, 16)),
    "--kd-temp": (["2.0", "--kd", "--load-teacher", "T"], "distill.kd_temp", 2.0),
    "--kd-alpha-ce": (["0.5", "--kd", "--load-teacher", "T"], "distill.kd_alpha_ce", 0.5),
    "--kd-beta-ce": (["0.7", "--kd", "--load-teacher", "T"], "distill.kd_beta_ce", 0.7),
    "--mos-kd-stop-iters": (["50", "--kd", "--load-teacher", "T"], "distill.kd_stop_iters", 50),
    "--mos-kd-stop-tokens": (["5000", "--kd", "--load-teacher", "T"], "distill.kd_stop_tokens", 5000),
    "--moe-offload-optimizer": (["nvme", "--moe-offload-dir", "/tmp/o"], "optimizer_offload.mode", "nvme"),
    "--moe-offload-dir": (["/tmp/o"], "optimizer_offload.directory", "/tmp/o"),
    "--moe-offload-buffer-count": (["6"], "optimizer_offload.buffer_count", 6),
    "--no-moe-offload-pipeline": ([], "optimizer_offload.pipeline", False),
    "--moe-offload-overlap": ([], "optimizer_offload.overlap", True),
    "--moe-offload-aio-block-size": (["262144"], "optimizer_offload.aio_block_size", 262144),
    "--moe-offload-aio-queue-depth": (["8"], "optimizer_offload.aio_queue_depth", 8),
    "--moe-offload-aio-single-submit": ([], "optimizer_offload.aio_single_submit", True),
    "--moe-offload-aio-overlap-events": ([], "optimizer_offload.aio_overlap_events", True),
    "--moe-offload-aio-intra-op-parallelism": (["2"], "optimizer_offload.aio_intra_op_parallelism", 2),
    "--train-samples": (["640"], "scheduler.train_samples", 640),
    "--lr-warmup-samples": (["10", "--train-samples", "640"], "scheduler.lr_warmup_samples", 10),
    "--lr-decay-samples": (["320", "--train-samples", "640"], "scheduler.lr_decay_samples", 320),
    "--rampup-batch-size": (["1", "1", "8", "--global-batch-size", "4", "--train-samples", "64"],
                            "data.rampup_batch_size", (1, 1, 8)),
    "--override-opt_param-scheduler": ([], "scheduler.override_opt_param_scheduler", True),
    "--use-checkpoint-opt_param-scheduler": ([], "scheduler.use_checkpoint_opt_param_scheduler", True),
    "--deepspeed": (["--deepspeed_config", _DS_JSON], "data.global_batch_size", 8),
    "--deepspeed_config": ([_DS_JSON, "--deepspeed"], "data.global_batch_size", 8),
    "--tensorboard-queue-size": (["5"], "logging.tensorboard_queue_size", 5),
    "--log-timers-to-tensorboard": ([], "logging.log_timers_to_tensorboard", True),
    "--log-batch-size-to-tensorboard": ([], "logging.log_batch_size_to_tensorboard", True),
    "--log-validation-ppl-to-tensorboard": ([], "logging.log_validation_ppl_to_tensorboard", True),
    "--log-optimizer-states-to-tensorboard": ([], "logging.log_optimizer_states_to_tensorboard", True),
    # Megatron-LM core blocks and experts (issue 25)
    "--normalization": (["RMSNorm"], "model.normalization", "RMSNorm"),
    "--norm-epsilon": (["1e-6"], "model.layernorm_epsilon", 1e-6),
    "--swiglu": ([], "model.activation", "swiglu"),
    "--group-query-attention": ([], "model.num_query_groups", 1),
    "--num-query-groups": (["2", "--group-query-attention"], "model.num_query_groups", 2),
    "--kv-channels": (["32"], "model.kv_channels", 32),
    "--qk-layernorm": ([], "model.qk_layernorm", True),
    "--qk-layernorm-full": (["--qk-layernorm"], "model.qk_layernorm_full", True),
    "--add-qkv-bias": ([], "model.add_qkv_bias", True),
    "--rotary-percent": (["0.5"], "model.rotary_percent", 0.5),
    "--no-position-embedding": ([], "model.position_embedding_type", "none"),
    "--disable-bias-linear": ([], "model.add_bias_linear", False),
    "--untie-embeddings-and-output-weights": ([], "model.untie_embeddings_and_output_weights", True),
    "--multi-latent-attention": (["--position-embedding-type", "rope"], "model.multi_latent_attention", True),
    "--q-lora-rank": (["16"], "model.q_lora_rank", 16),
    "--kv-lora-rank": (["16"], "model.kv_lora_rank", 16),
    "--qk-head-dim": (["16"], "model.qk_head_dim", 16),
    "--qk-pos-emb-head-dim": (["16"], "model.qk_pos_emb_head_dim", 16),
    "--v-head-dim": (["16"], "model.v_head_dim", 16),
    "--moe-ffn-hidden-size": (["32", "--num-experts", "2"], "moe.moe_ffn_hidden_size", 32),
    "--moe-shared-expert-intermediate-size": (["48", "--num-experts", "2"], "moe.shared_expert_ffn_hidden_size", 48),
    "--moe-shared-expert-gate": (["--moe-shared-expert-intermediate-size", "8", "--num-experts", "2"],
                                 "moe.shared_expert_gate", True),
    "--moe-layer-freq": (["([0]*1+[1]*3)", "--num-experts", "2"], "moe.layer_freq", (0, 1, 1, 1)),
    "--expert-model-parallel-size": (["2", "--num-experts", "2"], "moe.ep_size", (2,)),
}
# Megatron-DeepSpeed flags that change nothing here: each is accepted and says so once (args.config_notes).
NOTE_ONLY = {
    "--use-mcore-models": ([], "one model implementation"),
    "--no-masked-softmax-fusion": ([], "scaled_dot_product_attention"),
    "--no-bias-swiglu-fusion": ([], "unfused"),
    "--no-bias-dropout-fusion": ([], "unfused"),
    "--no-rope-fusion": ([], "unfused"),
    "--no-gradient-accumulation-fusion": ([], ".grad"),
    "--no-persist-layer-norm": ([], "torch modules"),
    "--use-flash-attn": ([], "flash kernel"),
    "--moe-grouped-gemm": ([], "grouped GEMM"),
    "--moe-per-layer-logging": ([], "every MoE layer"),
    "--moe-shared-expert-overlap": ([], "beside the routed ones"),
    "--transformer-impl": (["transformer_engine"], "TransformerEngine is not used"),
    "--moe-token-dispatcher-type": (["allgather"], "all-to-all"),
    "--deepspeed-activation-checkpointing": ([], "torch.utils.checkpoint"),
    "--create-moe-param-group": ([], "own optimizer groups"),
    "--no-pipeline-parallel": ([], "no pipeline engine"),
    "--data-impl": (["mmap"], "always read through mmap"),
}
# Flags whose only other accepted value is an error until the capability exists.
ERROR_ONLY = {"--rotary-scaling-factor": (["40"], r"--rotary-scaling-factor 40.0: RoPE scaling \(YaRN\) is not")}
# Megatron-LM core flags that would change results and are refused in one line (issue 25)
REFUSED = {"--apply-layernorm-1p": "zero-centred", "--rotary-interleaved": "interleaved RoPE",
           "--use-rope-scaling": "Llama-3.1 RoPE scaling"}
# Flags that change what is parsed rather than one field: each with the test that covers it
PARSE_ONLY = {"--use-checkpoint-args": "tests/unit/test_hf_families.py::test_use_checkpoint_args_*, "
                                       "tests/dist/test_hf_continue_training.py"}
SAMPLE_BASED = {"--train-samples", "--lr-warmup-samples", "--lr-decay-samples", "--rampup-batch-size"}

EXTRA_PROVIDERS = []  # later issues register their flag groups here (MoS, offload)
# flags whose mapping is only visible after an opposite flag (every case must move its field off the default)
PRECEDING = {"--moe-use-rts": ["--no-moe-use-rts"], "--openai-gelu": ["--no-bias-gelu-fusion"],
             "--check-for-nan-in-loss-and-grad": ["--no-check-for-nan-in-loss-and-grad"]}


def _all_flags():
    p = build_parser()
    return {s for a in p._actions for s in a.option_strings if s.startswith("--") and s != "--help"}


def test_flag_list_is_complete():
    listed = set(MAPPING) | set(NOTE_ONLY) | set(ERROR_ONLY) | set(REFUSED) | set(PARSE_ONLY)
    assert _all_flags() == listed, sorted(_all_flags() ^ listed)


@pytest.mark.parametrize("flag", sorted(NOTE_ONLY))
def test_no_effect_flag_says_so_once(flag):
    values, text = NOTE_ONLY[flag]
    notes = parse_args(BASE + [flag] + values).config_notes
    assert len([n for n in notes if n.startswith(flag)]) == 1 and text in " ".join(notes), notes
    assert not [n for n in parse_args(BASE).config_notes if n.startswith(flag)]


@pytest.mark.parametrize("flag", sorted(ERROR_ONLY))
def test_unsupported_value_is_one_config_error(flag):
    from megatron.errors import ConfigError

    values, match = ERROR_ONLY[flag]
    train_config_from_args(parse_args(BASE + [flag, "1"]), 128, 1)  # the supported value is accepted
    with pytest.raises(ConfigError, match=match):
        train_config_from_args(parse_args(BASE + [flag] + values), 128, 1)


@pytest.mark.parametrize("flag", sorted(REFUSED))
def test_result_changing_flag_is_refused_in_one_line(flag):
    with pytest.raises(ConfigError, match=f"^{flag}: .*{REFUSED[flag]}.*; drop the flag$"):
        train_config_from_args(parse_args(BASE + [flag]), 128, 1)


def test_use_checkpoint_args_needs_load():
    with pytest.raises(ConfigError, match=r"^--use-checkpoint-args reads the --load checkpoint's flags; give --load$"):
        parse_args(BASE + ["--use-checkpoint-args"])


def test_data_impl_other_than_mmap_is_a_config_error():
    from megatron.errors import ConfigError

    with pytest.raises(ConfigError, match=r"--data-impl lazy: only mmap"):
        train_config_from_args(parse_args(BASE + ["--data-impl", "lazy"]), 128, 1)


def _get(cfg, path):
    for part in path.split("."):
        cfg = getattr(cfg, part)
    return cfg


@pytest.mark.parametrize("flag", sorted(MAPPING))
def test_flag_maps_to_field(flag):
    values, path, expected = MAPPING[flag]
    base = list(BASE)
    if flag == "--train-tokens" or flag in SAMPLE_BASED:
        base = base[:-2]
    argv = base + PRECEDING.get(flag, []) + [flag] + values
    args = parse_args(argv)
    cfg = train_config_from_args(args, padded_vocab_size=128, dp_size=1)
    got = _get(cfg, path)
    assert got == expected if not isinstance(expected, float) else abs(got - expected) < 1e-12
    # the case must set a value the field would not have without the flag (else it proves nothing)
    own = 0  # the flag's own arguments come first in `values`, then any flags the case needs
    while own < len(values) and not values[own].startswith("--"):
        own += 1
    without = parse_args(base + PRECEDING.get(flag, []) + values[own:])
    try:
        default = _get(train_config_from_args(without, padded_vocab_size=128, dp_size=1), path)
    except (ValueError, AttributeError):
        return  # the flag is needed for the field to exist or be valid (--num-experts makes cfg.moe; --kd ...)
    assert default != expected, f"{flag}: {expected!r} is also the value without the flag"


def test_cross_concern_validation_names_flags():
    args = parse_args(BASE + ["--global-batch-size", "6", "--micro-batch-size", "4"])
    with pytest.raises(ConfigError, match=r"--global-batch-size \(6\) must be divisible by --micro-batch-size"):
        validate(train_config_from_args(args, 128, dp_size=1), world_size=1)
    args = parse_args(BASE + ["--global-batch-size", "8", "--micro-batch-size", "4"])
    cfg = train_config_from_args(args, 128, dp_size=1)
    with pytest.raises(ConfigError, match=r"data-parallel size \(4\)"):
        validate(cfg, world_size=4)
    args = parse_args(BASE + ["--num-experts", "4", "--moe-expert-parallel-size", "4", "--global-batch-size", "8"])
    cfg = train_config_from_args(args, 128, dp_size=2)
    with pytest.raises(ConfigError, match=r"--moe-expert-parallel-size \(4\) x --expert-tensor-parallel-size \(1\) = 4 must divide the ranks of a pipeline stage: world size \(2\)"):
        validate(cfg, world_size=2)
    with pytest.raises(ValueError, match="--fp16 and --bf16"):
        train_config_from_args(parse_args(BASE + ["--fp16", "--bf16"]), 128, 1)
    with pytest.raises(ValueError, match="--mos"):
        validate(train_config_from_args(parse_args(BASE + ["--mos", "--load-teacher", "T"]), 128, 1), 1)
    with pytest.raises(ConfigError, match="--num-experts has 3 values"):
        train_config_from_args(parse_args(BASE + ["--num-experts", "4", "4", "4"]), 128, 1)


def test_tensor_parallel_validation_names_flags():
    args = parse_args(BASE + ["--tensor-model-parallel-size", "3", "--global-batch-size", "4"])
    with pytest.raises(ConfigError, match=r"world size \(4\) must be divisible by --tensor-model-parallel-size \(3\)"):
        validate(train_config_from_args(args, 129, dp_size=1), world_size=4)
    cfg = train_config_from_args(args, 129, dp_size=1)
    with pytest.raises(ConfigError, match=r"--num-attention-heads \(4\) must be divisible by "
                                            r"--tensor-model-parallel-size \(3\)"):
        validate(cfg, world_size=3)
    args = parse_args(BASE + ["--tensor-model-parallel-size", "2", "--ffn-hidden-size", "33"])
    with pytest.raises(ConfigError, match=r"--ffn-hidden-size \(33\) must be divisible"):
        validate(train_config_from_args(args, 128, dp_size=1), world_size=2)
    validate(train_config_from_args(parse_args(BASE + ["--tensor-model-parallel-size", "2"]), 128, 1), world_size=2)


@pytest.mark.parametrize("extra,match", [
    (["--num-experts", "2", "--topk", "3"], r"--topk \(3\) must be between 1"),  # moe.config raises ValueError
    (["--kd-temp", "0", "--kd", "--load-teacher", "T"], r"--kd-temp \(0.0\) must be > 0"),  # moe.distill too
    (["--lr-warmup-iters", "20", "--lr-decay-iters", "10"],
     r"--lr-decay-iters \(10\) must be >= --lr-warmup-iters \(20\)"),  # was the LR scheduler's own check
    (["--position-embedding-type", "rope", "--hidden-size", "36"], r"rope needs an even head dim"),  # was RoPE's
    (["--hidden-dropout", "1.5"], r"--hidden-dropout \(1.5\)"),
])
def test_config_checks_raise_config_errors(extra, match):
    """Every dataclass check reaches the CLI as a ConfigError (what main() catches), moe's ValueErrors included."""
    with pytest.raises(ConfigError, match=match):
        train_config_from_args(parse_args(BASE + extra), 128, 1)


def test_offload_config_errors_are_config_errors():
    import argparse

    from megatron.offload import add_expert_offload_args, expert_offload_config_from_args

    p = argparse.ArgumentParser()
    add_expert_offload_args(p)
    with pytest.raises(ConfigError, match=r"--moe-offload nvme needs --moe-expert-store"):
        expert_offload_config_from_args(p.parse_args(["--moe-offload", "nvme"]))


def test_megatron_router_flags_make_one_moe_config():
    """A Megatron-LM MoE flag set: dropless without a capacity factor, Megatron's aux coefficient default (0)."""
    args = parse_args(BASE + ["--num-experts", "8", "--moe-router-topk", "2", "--moe-router-score-function",
                              "sigmoid", "--moe-router-enable-expert-bias", "--moe-router-num-groups", "4",
                              "--moe-router-group-topk", "2", "--moe-router-dtype", "fp64"])
    moe = train_config_from_args(args, 128, 1).moe
    assert (moe.router_family, moe.topk, moe.drop_tokens, moe.loss_coeff, moe.min_capacity, moe.router_dtype,
            moe.bias_update_rate, moe.load_balancing_type) == ("megatron", 2, False, 0.0, 0, "fp64", 1e-3, "aux_loss")
    ds = train_config_from_args(parse_args(BASE + ["--num-experts", "8", "--moe-router-dtype", "fp64"]), 128, 1).moe
    assert (ds.router_family, ds.drop_tokens, ds.loss_coeff, ds.router_dtype) == ("deepspeed", True, 0.01, "fp64")


@pytest.mark.parametrize("extra, match", [
    (["--topk", "1", "--moe-router-topk", "2"], None),  # --topk's default: no conflict
    (["--topk", "4", "--moe-router-topk", "2"], r"^--topk \(4\) conflicts with --moe-router-topk \(2\)"),
    (["--moe-loss-coeff", "0.1", "--moe-aux-loss-coeff", "0.2", "--moe-router-topk", "2"],
     r"^--moe-loss-coeff \(0.1\) conflicts with --moe-aux-loss-coeff \(0.2\)"),
    (["--moe-train-capacity-factor", "2", "--moe-expert-capacity-factor", "1"],
     r"^--moe-train-capacity-factor \(2.0\) conflicts with --moe-expert-capacity-factor \(1.0\)"),
    (["--moe-min-capacity", "8", "--moe-router-topk", "2"], r"^--moe-min-capacity \(8\) conflicts with"),
    (["--moe-noisy-gate-policy", "Jitter", "--moe-router-topk", "2"],
     r"^--moe-noisy-gate-policy \(Jitter\) conflicts with --moe-input-jitter-eps"),
    (["--disable-moe-token-dropping", "--moe-expert-capacity-factor", "1"],
     r"^--disable-moe-token-dropping conflicts with --moe-expert-capacity-factor \(1.0\)"),
])
def test_conflicting_router_flags_are_one_line(extra, match):
    args = parse_args(BASE + ["--num-experts", "8"] + extra)
    if match is None:
        assert train_config_from_args(args, 128, 1).moe.topk == 2
        return
    with pytest.raises(ConfigError, match=match) as err:
        train_config_from_args(args, 128, 1)
    assert "\n" not in str(err.value)
