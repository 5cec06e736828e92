"""Mixture-of-Students through the training loop: staged KD stops running the teacher at the stop iteration."""
from megatron.training import pretrain
from tests.conftest import tiny_train_argv


def test_staged_mos_teacher_stops_and_student_trains(tiny_corpus, tmp_path, capsys):
    teacher = str(tmp_path / "teacher")
    pretrain(tiny_train_argv(tiny_corpus, tmp_path, "--num-layers", "4", "--num-experts", "4", "--train-iters", "10",
                             "--save", teacher))
    r = pretrain(tiny_train_argv(tiny_corpus, tmp_path, "--num-layers", "2", "--num-experts", "4", "--train-iters",
                                 "10", "--mos", "--load-teacher", teacher, "--num-layers-teacher", "4",
                                 "--kd-temp", "2.0", "--kd-alpha-ce", "1.0", "--kd-beta-ce", "0.5",
                                 "--mos-kd-stop-iters", "5", "--log-interval", "1"))
    st = r["state"]
    assert st.teacher.forward_count == 5 * st.num_micro_batches  # 2 micro-batches per step, steps 0..4
    log = capsys.readouterr().out
    kd_lines = [l for l in log.splitlines() if l.startswith(" iteration") and "kd loss" in l]
    assert len(kd_lines) == 5  # iterations 1..5 logged a KD term, 6..10 trained on LM loss alone
    assert sum(r["losses"][-3:]) < sum(r["losses"][:3])


def test_teacher_flag_mismatch_is_one_line(tiny_corpus, tmp_path):
    from tests.inprocess import run_cli

    teacher = str(tmp_path / "teacher")
    pretrain(tiny_train_argv(tiny_corpus, tmp_path, "--train-iters", "2", "--save", teacher))
    p = run_cli("pretrain_gpt.py", tiny_train_argv(
        tiny_corpus, tmp_path, "--train-iters", "2", "--kd", "--load-teacher", teacher, "--num-layers-teacher", "3"))
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "--num-layers-teacher" in p.stderr, p.stderr
