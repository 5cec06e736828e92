"""Mixture-of-Students / knowledge distillation: `DistillConfig`, the vocab-parallel KL and KD loss, and the
staged teacher runner (DESIGN.md §4). Teacher *loading* needs checkpoint and model code, so it lives in
`megatron/distillation.py`; this file only receives a built teacher module and the TP group.

Shape legend: b batch, s sequence, v vocabulary entries held by this rank (V / tp), V full padded vocabulary.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class DistillConfig:
    """MoS / KD settings (Megatron-DeepSpeed flag spellings in the error messages).

    Teacher architecture fields left None take the value recorded in the teacher checkpoint.
    """

    mos: bool = False  # --mos: distil into a Mixture-of-Experts student (student has --num-experts > 1)
    kd: bool = False  # --kd: distil into a dense student (student has --num-experts 1)
    load_teacher: Optional[str] = None  # --load-teacher: teacher checkpoint root or iter_XXXXXXX directory
    num_layers_teacher: Optional[int] = None  # --num-layers-teacher; None = the value the checkpoint recorded
    hidden_size_teacher: Optional[int] = None  # --hidden-size-teacher; None = recorded value
    num_attention_heads_teacher: Optional[int] = None  # --num-attention-heads-teacher; None = recorded value
    num_experts_teacher: Optional[Tuple[int, ...]] = None  # --num-experts-teacher: one, or one per MoE layer
    kd_temp: float = 1.0  # --kd-temp: softmax temperature T of both distributions (the KD term is scaled by T^2)
    kd_alpha_ce: float = 1.0  # --kd-alpha-ce: weight of the student's LM (cross-entropy) loss
    kd_beta_ce: float = 1.0  # --kd-beta-ce: weight of the KD term T^2 * KL(teacher || student)
    kd_stop_iters: Optional[int] = None  # --mos-kd-stop-iters: the teacher runs while iteration < this (steps)
    kd_stop_tokens: Optional[int] = None  # --mos-kd-stop-tokens: the teacher runs while consumed tokens < this

    def __post_init__(self):
        if self.num_experts_teacher is not None:
            ne = ((self.num_experts_teacher,) if isinstance(self.num_experts_teacher, int)
                  else tuple(self.num_experts_teacher))
            object.__setattr__(self, "num_experts_teacher", ne)
            if not ne or any(not isinstance(n, int) or n < 1 for n in ne):
                raise ValueError(f"--num-experts-teacher ({list(ne)}) must be one or more positive integers")
        if self.mos and self.kd:
            raise ValueError("--mos and --kd are mutually exclusive: --mos distils into an MoE student, --kd into a "
                             "dense one; give the one that matches --num-experts")
        if self.enabled and not self.load_teacher:
            raise ValueError(f"{self.flag} needs --load-teacher PATH (the teacher checkpoint to distil from)")
        if not self.enabled:
            for flag, v in (("--load-teacher", self.load_teacher), ("--mos-kd-stop-iters", self.kd_stop_iters),
                            ("--mos-kd-stop-tokens", self.kd_stop_tokens)):
                if v is not None:
                    raise ValueError(f"{flag} ({v}) has no effect without --mos or --kd; add one or drop {flag}")
        for flag, v in (("--num-layers-teacher", self.num_layers_teacher),
                        ("--hidden-size-teacher", self.hidden_size_teacher),
                        ("--num-attention-heads-teacher", self.num_attention_heads_teacher)):
            if v is not None and v < 1:
                raise ValueError(f"{flag} ({v}) must be positive")
        if (self.hidden_size_teacher is not None and self.num_attention_heads_teacher is not None
                and self.hidden_size_teacher % self.num_attention_heads_teacher != 0):
            raise ValueError(f"--hidden-size-teacher ({self.hidden_size_teacher}) must be divisible by "
                             f"--num-attention-heads-teacher ({self.num_attention_heads_teacher})")
        if not self.kd_temp > 0:
            raise ValueError(f"--kd-temp ({self.kd_temp}) must be > 0")
        if self.kd_alpha_ce < 0 or self.kd_beta_ce < 0:
            raise ValueError(f"--kd-alpha-ce ({self.kd_alpha_ce}) and --kd-beta-ce ({self.kd_beta_ce}) must be >= 0")
        if self.kd_stop_iters is not None and self.kd_stop_tokens is not None:
            raise ValueError(f"--mos-kd-stop-iters ({self.kd_stop_iters}) and --mos-kd-stop-tokens "
                             f"({self.kd_stop_tokens}) are mutually exclusive; give one")
        for flag, v in (("--mos-kd-stop-iters", self.kd_stop_iters), ("--mos-kd-stop-tokens", self.kd_stop_tokens)):
            if v is not None and v < 1:
                raise ValueError(f"{flag} ({v}) must be >= 1; omit it to distil for the whole run")

    @property
    def enabled(self) -> bool:
        return self.mos or self.kd

    def kd_stopped(self, iteration: int, consumed_tokens: int) -> bool:
        """True once the staged-KD stop (--mos-kd-stop-iters / --mos-kd-stop-tokens) is reached; never without one.

        `iteration` / `consumed_tokens` are the counters before the step (steps done, tokens consumed).
        """
        if self.kd_stop_iters is not None:
            return iteration >= self.kd_stop_iters
        if self.kd_stop_tokens is not None:
            return consumed_tokens >= self.kd_stop_tokens
        return False

    @property
    def flag(self) -> str:
        """The CLI flag that enabled distillation, for messages."""
        return "--mos" if self.mos else "--kd"


def validate_distill(cfg: DistillConfig, student_num_experts: Tuple[int, ...]) -> None:
    """Cross-concern check (call from arguments.validate): --mos needs an MoE student, --kd a dense one.

    `student_num_experts` is the student's --num-experts list ((1,) for a dense model).
    """
    is_moe = any(n > 1 for n in student_num_experts)
    if cfg.mos and not is_moe:
        raise ValueError(f"--mos distils into an MoE student, but --num-experts is {list(student_num_experts)}; "
                         f"give --num-experts > 1 or use --kd for a dense student")
    if cfg.kd and is_moe:
        raise ValueError(f"--kd distils into a dense student, but --num-experts is {list(student_num_experts)}; "
                         f"use --mos for an MoE student")


# ----------------------------------------------------------------------------------------------- collectives
class _AllReduceSumIdentityBackward(torch.autograd.Function):
    """Forward: sum over `group`. Backward: identity.

    Correct when everything downstream of the sum is replicated across the group (so each rank receives the
    same upstream gradient): d(sum)/d(local part) = 1, and each rank owns the gradient of its own shard.
    vocab_parallel_kl_div is written so that both sums it takes satisfy this.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def _all_reduce_sum(x: torch.Tensor, group) -> torch.Tensor:
    if group is None or dist.get_world_size(group) == 1:
        return x
    return _AllReduceSumIdentityBackward.apply(x, group)


def _all_reduce_max_(x: torch.Tensor, group) -> torch.Tensor:
    """In-place MAX over `group` of a tensor that carries no gradient."""
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(x, op=dist.ReduceOp.MAX, group=group)
    return x


# ----------------------------------------------------------------------------------------------- KL
def _vocab_mask(v_local: int, vocab_size: Optional[int], group, device) -> Optional[torch.Tensor]:
    """[v] bool, True for real vocabulary entries of this rank's shard (shard r holds [r*v, (r+1)*v))."""
    if vocab_size is None:
        return None
    rank = dist.get_rank(group) if group is not None else 0
    start = rank * v_local
    if start + v_local <= vocab_size:
        return None  # no padded column in this shard
    return torch.arange(start, start + v_local, device=device) < vocab_size


def _log_normaliser(logits_bsv: torch.Tensor, group) -> torch.Tensor:
    """log Σ_V exp(logits) over the whole (sharded) vocabulary -> [b, s], differentiable w.r.t. the shard."""
    max_bs = logits_bsv.detach().amax(dim=-1)
    _all_reduce_max_(max_bs, group)  # a constant shift: no gradient needed, any value >= the true max works
    sum_exp_bs = torch.exp(logits_bsv - max_bs.unsqueeze(-1)).sum(dim=-1)
    return max_bs + torch.log(_all_reduce_sum(sum_exp_bs, group))


def vocab_parallel_kl_div(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
                          tp_group=None, vocab_size: Optional[int] = None) -> torch.Tensor:
    """Per-token KL(softmax(teacher/T) || softmax(student/T)) over a vocabulary sharded across `tp_group`.

    Steps (communication over tp_group; none when it is None or of size 1):
      1. scale both shards by 1/T in fp32; mask padded vocabulary columns (global id >= vocab_size) to -inf;
      2. teacher: global max (all-reduce MAX), sum-exp (all-reduce SUM) -> log Z_t, then log p_t and p_t locally;
      3. student: the same -> log Z_s (the SUM is differentiable: identity backward);
      4. with s = student/T: KL = Σ_v p_t (log p_t - s_v) + log Z_s, using Σ_V p_t = 1; the first sum is
         per-shard, all-reduced (SUM, identity backward).
    Writing KL this way (rather than all-reducing Σ_v p_t (log p_t - log p_s)) keeps every quantity downstream of
    each all-reduce replicated across the group, which is what makes the identity backward exact: the student
    gradient on each rank is (p_s - p_t) / T for its own shard. (All-reducing per-shard Σ_v p_t (log p_t - log p_s)
    gives the right value but a wrong gradient; Megatron-DeepSpeed's log_softmax over one shard is wrong at TP > 1.)

    Args:
      student_logits: [b, s, v] this rank's shard of the student's logits (any float dtype; computed in fp32).
      teacher_logits: [b, s, v] the teacher's logits for the same shard (no gradient is taken through them).
      temperature: T > 0.
      tp_group: the tensor-parallel group the vocabulary is split over; None = the full vocabulary is local.
      vocab_size: true vocabulary size; columns with global id >= vocab_size (Megatron padding rows) are excluded
        from both distributions (their logits are set to -inf, so they get probability 0 and zero gradient).
    Returns:
      [b, s] per-token KL in fp32 (fp64 for fp64 inputs), identical on every rank of tp_group.
    """
    assert student_logits.shape == teacher_logits.shape, (student_logits.shape, teacher_logits.shape)
    dtype = torch.promote_types(student_logits.dtype, torch.float32)  # fp32, or fp64 when given fp64 (tests)
    s_bsv = student_logits.to(dtype) / temperature
    t_bsv = teacher_logits.detach().to(dtype) / temperature
    valid_v = _vocab_mask(s_bsv.size(-1), vocab_size, tp_group, s_bsv.device)
    if valid_v is not None:
        s_bsv = s_bsv.masked_fill(~valid_v, float("-inf"))
        t_bsv = t_bsv.masked_fill(~valid_v, float("-inf"))
    log_p_t = t_bsv - _log_normaliser(t_bsv, tp_group).unsqueeze(-1)
    p_t = torch.exp(log_p_t)
    # p_t · (log p_t - s), taken as 0 where p_t is 0: padded columns (both terms -inf) or fp32 underflow
    diff_bsv = torch.where(p_t > 0, log_p_t - s_bsv, torch.zeros_like(p_t))
    partial_bs = (p_t * diff_bsv).sum(dim=-1)
    return _all_reduce_sum(partial_bs, tp_group) + _log_normaliser(s_bsv, tp_group)


def kd_loss(lm_loss: torch.Tensor, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
            loss_mask: torch.Tensor, cfg: DistillConfig, tp_group=None,
            vocab_size: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Student loss = alpha_ce · lm_loss + beta_ce · T² · mean_{unmasked tokens} KL(p_t || p_s).

    T² keeps the gradient scale of the soft term independent of T (Hinton et al. 2015, §2): the gradient of the
    tempered KL w.r.t. the logits shrinks as 1/T². The mean is over tokens with loss_mask > 0, the same
    normalisation as the LM loss, so alpha and beta weight two per-token averages.

    Args:
      lm_loss: scalar, the masked-mean LM cross entropy.
      student_logits, teacher_logits: [b, s, v] vocabulary shards (see vocab_parallel_kl_div).
      loss_mask: [b, s] float, 1 for tokens that count.
      tp_group, vocab_size: see vocab_parallel_kl_div.
    Returns:
      (total, kd_term): total = alpha·lm + beta·kd_term; kd_term = T²·mean KL (before the beta weight), in the
      KL's dtype (fp32, or fp64 for fp64 logits).
    """
    kl_bs = vocab_parallel_kl_div(student_logits, teacher_logits, cfg.kd_temp, tp_group, vocab_size)
    mask_bs = loss_mask.to(kl_bs.dtype)
    kd_term = cfg.kd_temp ** 2 * (kl_bs * mask_bs).sum() / mask_bs.sum().clamp(min=1.0)
    return cfg.kd_alpha_ce * lm_loss + cfg.kd_beta_ce * kd_term, kd_term


# ----------------------------------------------------------------------------------------------- teacher
class TeacherRunner:
    """A frozen teacher: eval mode (MoE layers use their eval capacity factor, no dropout), no gradients, and
    the staged-KD schedule (`active`). Build it with megatron.distillation.load_teacher.

    `model(tokens)` must return an object with `.logits` [b, s, V] (GPTModel's ModelOutput) or the logits.
    """

    def __init__(self, model: torch.nn.Module, cfg: DistillConfig, dtype: torch.dtype = torch.float32):
        if dtype in (torch.bfloat16, torch.float16):
            model = model.to(dtype)  # forward only: no fp32 master weights needed, half the memory and traffic
        self.model: Optional[torch.nn.Module] = model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        self.cfg = cfg
        self.forward_count = 0  # teacher forward passes run so far (one per student micro-batch while active)

    def active(self, iteration: int, consumed_tokens: int) -> bool:
        """Whether the step about to run (`iteration` steps and `consumed_tokens` tokens done) distils.

        The stop is permanent (both counters only grow), so the first time this returns False because of it the
        teacher is released to free its memory for the rest of training.
        """
        if self.model is None:
            return False
        if self.cfg.kd_stopped(iteration, consumed_tokens):
            if not dist.is_initialized() or dist.get_rank() == 0:
                log.info("staged KD: teacher stopped at iteration %d (%d tokens); the student continues on LM loss "
                         "alone", iteration, consumed_tokens)
            self.model = None
            return False
        return True

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [b, s] int64 -> teacher logits [b, s, V] (the model's dtype/autocast dtype).

        Runs under torch.inference_mode (no graph, no version counters); the result is an inference tensor: read it,
        do not modify it in place or save it for a backward.
        """
        if self.model is None:
            raise RuntimeError("the teacher was released after the staged-KD stop; check active() first")
        if self.model.training:  # e.g. a caller's .train() reached it; the teacher always runs in eval
            self.model.eval()
        with torch.inference_mode():
            out = self.model(tokens)
        self.forward_count += 1
        return out.logits if hasattr(out, "logits") else out
