"""Recovery: distillation lowers the student's KL to the teacher, resumes exactly, merges LoRA exactly, reads
only calibration-side text, and refuses budgets and settings it cannot honour."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

import pruning
from fasp_bench import data
from fasp_bench.recovery import RecoveryPlan, distillation_loss, parse_recover_spec, recover, recovery_tag

SEQLEN = 32
PLAN = RecoveryPlan(tokens=16 * SEQLEN * 4, seqlen=SEQLEN, batch_size=4, micro_batch=2, learning_rate=2e-3,
                    validation_seqlen=SEQLEN, save_steps=4, dtype="float32")


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, tiny_model_dirs) -> Path:
    """The tiny Llama with its weights scaled up: peaked next-token distributions that pruning visibly moves (at
    init scale every distribution is near uniform and the KL to distil is noise)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["llama-gqa"])
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.mul_(8)
    out = tmp_path_factory.mktemp("teacher")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dirs["llama-gqa"]).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def pruned_dir(tmp_path_factory, teacher_dir, data_root) -> Path:
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    result = pruning.prune(AutoModelForCausalLM.from_pretrained(teacher_dir), method="fasp", sparsity=0.4,
                           calibration=data.calibration_ids(tokenizer, 8, SEQLEN, root=data_root), progress=False)
    out = tmp_path_factory.mktemp("recovery") / "fasp-0.4"
    pruning.save_pruned(result.model, out, result.metadata, tokenizer=tokenizer)
    return out


def _kl_to_teacher(student: Path, teacher: Path, ids: torch.Tensor) -> float:
    """KL(teacher || student) per token, from both folders' own logits."""
    with torch.no_grad():
        s = AutoModelForCausalLM.from_pretrained(student).eval()(ids).logits
        t = AutoModelForCausalLM.from_pretrained(teacher).eval()(ids).logits
    return F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="batchmean").item() \
        / ids.shape[1]


def _held_out(tokenizer, data_root) -> torch.Tensor:
    """c4-calval windows: calibration-side text the recovery never trains on."""
    ids = data.calibration_validation_ids(tokenizer, SEQLEN, 0, data_root)
    return ids[: 8 * SEQLEN].view(8, SEQLEN)


def test_distillation_loss_is_the_tempered_kl_plus_the_weighted_next_token_loss():
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    ids = torch.randint(0, 11, (2, 5))
    temp = 2.0
    p_t = torch.softmax(t / temp, -1)
    kl = (p_t * (p_t.log() - torch.log_softmax(s / temp, -1))).sum(-1).mean() * temp ** 2
    nll = -torch.log_softmax(s[:, :-1], -1).gather(-1, ids[:, 1:, None]).mean()
    assert distillation_loss(s, t, ids, temp, 0.0).item() == pytest.approx(kl.item(), rel=1e-5)
    assert distillation_loss(s, t, ids, temp, 0.25).item() == pytest.approx(0.75 * kl.item() + 0.25 * nll.item(),
                                                                          rel=1e-5)
    assert distillation_loss(t, t, ids, temp, 0.0).item() == pytest.approx(0.0, abs=1e-6)


def test_training_text_is_calibration_side_and_never_a_c4_calval_window(data_root):
    from fasp_bench.models import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"))
    train = data.training_ids(tokenizer, 256, 512, 0, data_root)
    calval = data.calibration_validation_ids(tokenizer, 512, 0, data_root)
    stream = torch.cat([torch.tensor(tokenizer(t, add_special_tokens=False).input_ids)
                        for t in data.c4_documents(data_root, data.CALIBRATION_DOCS)])

    def grams(ids: torch.Tensor, n: int = 24) -> set:
        return set(map(tuple, ids.unfold(0, n, 1).tolist()))

    # a 24-gram both hold is text the documents repeat (it occurs twice in docs 0-499), never a shared position
    shared = grams(calval) & set().union(*(grams(w) for w in train))
    occurrences = Counter(map(tuple, stream.unfold(0, 24, 1).tolist()))
    assert all(occurrences[g] > 1 for g in shared), [tokenizer.decode(list(g)) for g in shared if occurrences[g] < 2]
    assert train.shape[1] == 256 and len(set(map(tuple, train.tolist()))) == len(train)  # no window twice
    # the windows are calibration-document text: most of their 12-grams occur inside docs 0-499 (the rest cross
    # a document boundary, where the draw joins documents with EOS)
    inside = grams(stream, 12)
    assert sum(g in inside for g in grams(train[:8].flatten(), 12)) > 0.9 * (8 * 256 - 11)
    assert train.numel() + calval.numel() <= 255_536 + 500  # the two share the calibration stream, never a token


def test_distillation_lowers_the_kl_on_held_out_windows_and_reads_no_evaluation_text(
        pruned_dir, teacher_dir, data_root, tmp_path, monkeypatch):
    teacher = teacher_dir
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    held_out = _held_out(tokenizer, data_root)
    before = _kl_to_teacher(pruned_dir, teacher, held_out)

    def refuse(*_args, **_kwargs):
        raise AssertionError("recovery read an evaluation text")

    for name in ("perplexity_text", "wikitext2_test_text", "c4_eval_text", "calibration_validation_ids"):
        monkeypatch.setattr(data, name, refuse)
    record = recover(str(pruned_dir), str(teacher), PLAN, tmp_path / "out", data_root=data_root)
    monkeypatch.undo()

    losses = [loss for _, loss in record["loss"]]
    assert len(losses) == 16 and sum(losses[-4:]) < sum(losses[:4])
    after = _kl_to_teacher(tmp_path / "out", teacher, held_out)
    assert after < 0.9 * before, (before, after)
    # the pruned shapes, reloaded with from_pretrained, and the record in pruning.json
    pruned = AutoModelForCausalLM.from_pretrained(pruned_dir).state_dict()
    recovered = AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    assert {k: v.shape for k, v in pruned.items()} == {k: v.shape for k, v in recovered.items()}
    meta = json.loads((tmp_path / "out" / "pruning.json").read_text())
    assert meta["method"] == "fasp" and meta["recovery"]["tokens"] == PLAN.tokens and meta["recovery"]["steps"] == 16
    assert not (tmp_path / "out.recovery").exists()


def test_a_killed_recovery_resumes_to_the_weights_of_an_uninterrupted_one(pruned_dir, teacher_dir, data_root,
                                                                            tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    # 120 steps (four passes over the tiny tokenizer's calibration-side text): time to land the kill mid-run
    plan = RecoveryPlan(**{**PLAN.__dict__, "tokens": 120 * SEQLEN * 4, "save_steps": 10, "epochs": 4})
    recover(str(pruned_dir), str(teacher_dir), plan, tmp_path / "whole", data_root=data_root)
    args = ["recover", pruned_dir, "--teacher", teacher_dir, "--out", tmp_path / "resumed", "--tokens", plan.tokens,
            "--seqlen", SEQLEN, "--batch-size", 4, "--micro-batch", 2, "--lr", plan.learning_rate, "--save-steps", 10,
            "--epochs", 4, "--validation-seqlen", SEQLEN, "--dtype", "float32"]
    proc = subprocess.Popen([sys.executable, "-m", "fasp_bench.cli", *map(str, args)], start_new_session=True,
                            env={**os.environ, "FASP_BENCH_DATA": str(data_root)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    state = tmp_path / "resumed.recovery"
    deadline = time.time() + 240
    while not (state / "checkpoint-10" / "trainer_state.json").exists() and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "resumed").exists(), "the run finished before it could be killed"
    torn = state / "checkpoint-999"  # as a kill in the middle of a save leaves one: no trainer_state.json
    torn.mkdir()
    (torn / "model.safetensors").write_bytes(b"torn")
    record = recover(str(pruned_dir), str(teacher_dir), plan, tmp_path / "resumed", data_root=data_root)
    assert 10 <= record["resumed_from_step"] < 120 and len(record["loss"]) == 120
    whole = AutoModelForCausalLM.from_pretrained(tmp_path / "whole").state_dict()
    resumed = AutoModelForCausalLM.from_pretrained(tmp_path / "resumed").state_dict()
    for name, tensor in whole.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=1e-6, msg=name)


class _Logits(TrainerCallback):
    """The trained PEFT model's logits on a probe, taken before the merge."""

    def __init__(self, ids: torch.Tensor):
        self.ids, self.logits, self.adapters = ids, None, 0

    def on_train_end(self, args, state, control, model=None, **kwargs):
        with torch.no_grad():
            self.logits = model.eval()(input_ids=self.ids).logits
        self.adapters = sum("lora_B" in name and p.abs().sum() > 0 for name, p in model.named_parameters())


def test_lora_is_merged_exactly_into_the_pruned_shapes(pruned_dir, teacher_dir, data_root, tmp_path, probe):
    plan = RecoveryPlan(**{**PLAN.__dict__, "tokens": 4 * SEQLEN * 4, "lora_rank": 4})
    capture = _Logits(probe)
    recover(str(pruned_dir), str(teacher_dir), plan, tmp_path / "lora", data_root=data_root,
            callbacks=[capture])
    assert capture.adapters > 0  # the adapters learned something, so the merge has something to get right
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "lora").eval()
    assert not any("lora" in name for name in merged.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(merged(probe).logits, capture.logits, rtol=1e-4, atol=1e-5)
    pruned = AutoModelForCausalLM.from_pretrained(pruned_dir).state_dict()
    assert {k: v.shape for k, v in pruned.items()} == {k: v.shape for k, v in merged.state_dict().items()}


def test_recover_spec_gives_one_plan_per_budget():
    plans = parse_recover_spec("kd:tokens=0,2.5e5,all,source=teacher,lora=8,lr=1e-4")
    assert [p.tokens for p in plans] == [0, 250_000, None]
    assert {(p.source, p.lora_rank, p.learning_rate) for p in plans} == {("teacher", 8, 1e-4)}
    # each setting off its default is in the label: two recoveries differing in one never share a folder
    assert recovery_tag(plans[1]) == "kd-250k-teacher-lora8-lr0.0001"
    assert recovery_tag(parse_recover_spec("kd:tokens=all")[0]) == "kd-all"


@pytest.mark.parametrize("spec, message", [
    ("sft:tokens=100", "unknown recovery 'sft'"),
    ("kd:tokens=1.5", "not a token count"),
    ("kd:tokens=100,depth=3", "unknown recovery option 'depth'"),
    ("kd:lr=1e-4", "names no budget"),
    ("kd:tokens=100,lora=two", "lora='two' is not a int"),
])
def test_bad_recover_specs_are_refused_in_one_line(spec, message):
    from fasp_bench.errors import BenchError

    with pytest.raises(BenchError, match=message):
        parse_recover_spec(spec)


@pytest.mark.parametrize("extra, message", [
    (["--tokens", "100000000"], "needs \\d+ passes over the c4 source"),
    (["--tokens", "0.5"], "not a positive token count"),
    (["--tokens", "1000", "--source", "books"], "unknown recovery source 'books'"),
    (["--tokens", "64"], "less than one step"),
    (["--tokens", "all", "--source", "teacher"], "tokens=all needs the c4 source"),
    (["--tokens", "1000", "--lm-weight", "2"], "--lm-weight must be in"),
])
def test_recover_refuses_bad_input_in_one_line_and_writes_nothing(cli, pruned_dir, teacher_dir, data_root,
                                                                   tmp_path, extra, message):
    code, _, err = cli("recover", pruned_dir, "--teacher", teacher_dir, "--out", tmp_path / "out",
                       "--seqlen", SEQLEN, *extra, data=data_root)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.recovery").exists()


def test_recover_refuses_a_teacher_of_another_vocabulary_and_a_state_of_another_plan(
        cli, pruned_dir, teacher_dir, tmp_path, data_root):
    from transformers import LlamaConfig, LlamaForCausalLM

    other = tmp_path / "other"
    LlamaForCausalLM(LlamaConfig(vocab_size=500, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(other)
    code, _, err = cli("recover", pruned_dir, "--teacher", other, "--out", tmp_path / "a", "--tokens", 4096,
                       "--seqlen", SEQLEN, data=data_root)
    assert code == 2 and "the teacher's vocabulary (500) is not the student's" in err
    state = tmp_path / "b.recovery"
    state.mkdir()
    (state / "recovery.json").write_text(json.dumps({"plan": "another"}))
    code, _, err = cli("recover", pruned_dir, "--teacher", teacher_dir, "--out", tmp_path / "b",
                       "--tokens", 4096, "--seqlen", SEQLEN, "--validation-seqlen", SEQLEN, data=data_root)
    assert code == 2 and "holds an unfinished recovery with other settings" in err and not (tmp_path / "b").exists()


def test_teacher_text_from_vllm_trains_a_checkpoint_that_vllm_serves_with_transformers_greedy_tokens(
        servable_model_dirs, data_root, tmp_path, monkeypatch):
    pytest.importorskip("vllm", reason="vLLM is installed by tox (python -m fasp_bench.serving.install)")
    from test_serving import transformers_greedy

    from fasp_bench.recovery import teacher_windows
    from fasp_bench.serving.bench import ServeProtocol, measure_in_subprocess

    monkeypatch.setenv("FASP_BENCH_CACHE", str(tmp_path / "cache"))
    dense = servable_model_dirs["llama"]
    tokenizer = AutoTokenizer.from_pretrained(dense)
    result = pruning.prune(AutoModelForCausalLM.from_pretrained(dense), method="fasp", sparsity=0.3,
                           calibration=data.calibration_ids(tokenizer, 4, SEQLEN, root=data_root), progress=False)
    pruning.save_pruned(result.model, tmp_path / "fasp", result.metadata, tokenizer=tokenizer)
    plan = RecoveryPlan(tokens=4 * 4 * SEQLEN, source="teacher", seqlen=SEQLEN, batch_size=4, micro_batch=4,
                        learning_rate=1e-3, save_steps=2, dtype="float32")
    record = recover(str(tmp_path / "fasp"), str(dense), plan, tmp_path / "recovered", data_root=data_root)
    assert record["source"] == "teacher" and record["tokens"] == plan.tokens and record["passes"] == 1
    # the text is the teacher's own: cached per teacher, of the window length, the same when drawn again
    generated = teacher_windows(str(dense), 16, SEQLEN, 0)
    assert generated.shape == (16, SEQLEN) and len(list((tmp_path / "cache" / "generated").iterdir())) == 1
    assert len(set(map(tuple, generated.tolist()))) == 16  # sampled, not one greedy continuation repeated
    protocol = ServeProtocol(prompts=2, input_len=16, output_len=8, repeats=1, dtype="float32")
    served = measure_in_subprocess(str(tmp_path / "recovered"), protocol, timeout_s=400, return_tokens=True)
    assert "error" not in served, served["error"]
    assert served["architecture"].startswith("Pruned")
    assert served["tokens"] == transformers_greedy(tmp_path / "recovered", protocol)


def test_recover_command_end_to_end_in_a_subprocess(pruned_dir, teacher_dir, data_root, tmp_path):
    from test_cli import run_cli

    done = run_cli("recover", pruned_dir, "--teacher", teacher_dir, "--out", tmp_path / "out", "--tokens", 1024,
                   "--seqlen", SEQLEN, "--batch-size", 4, "--micro-batch", 2, "--validation-seqlen", SEQLEN,
                   "--dtype", "bfloat16", env_data=data_root)
    assert done.returncode == 0, done.stderr
    assert "distilled from" in done.stdout and "8 steps" in done.stdout
    meta = json.loads((tmp_path / "out" / "pruning.json").read_text())
    assert meta["recovery"]["dtype"] == "bfloat16" and len(meta["recovery"]["loss"]) == 8
    assert meta["fingerprint"]["sha256_20"] == pruning.checkpoint.content_fingerprint(tmp_path / "out")


def test_the_main_job_recovers_each_pruned_model_per_budget_and_reports_the_ranking(cli, teacher_dir, data_root,
                                                                                    tmp_path):
    args = ["run", "--model", teacher_dir, "--methods", "fasp", "wanda-sp", "--sparsities", "0.4",
            "--profile", "minimal", "--no-serve", "--zeroshot", "none", "--dtype", "float32", "--device", "cpu",
            "--recover", "kd:tokens=0,2048,seqlen=32,batch_size=4,micro_batch=2,lr=2e-3",
            "--work-dir", tmp_path / "work", "--out", tmp_path / "report"]
    code, _, err = cli(*args, data=data_root)
    assert code == 0, err
    records = [json.loads(line) for line in (tmp_path / "work" / "results.jsonl").read_text().splitlines()]
    recovered = {r["model"]: r["result"] for r in records if r["metric"] == "recover"}
    assert set(recovered) == {"fasp-0.4+kd-2048-lr0.002-len32-bs4-mb2", "wanda-sp-0.4+kd-2048-lr0.002-len32-bs4-mb2"}
    assert all(r["tokens"] == 2048 and r["source"] == "c4" for r in recovered.values())
    scored = {r["fingerprint"] for r in records if r["metric"] == "perplexity"}
    assert {r["checkpoint_fingerprint"] for r in recovered.values()} <= scored  # evaluated like any checkpoint
    report = (tmp_path / "report" / "README.md").read_text()
    assert "**40% sparsity, after recovery kd-2048-lr0.002-len32-bs4-mb2**" in report
    assert "one-shot order" in report or "The order changes" in report
    assert (tmp_path / "report" / "recovery.png").is_file()
    run_record = next(r for r in records if r["metric"] == "run")["result"]
    tag = "kd-2048-lr0.002-len32-bs4-mb2"  # the budget and every setting off its default
    assert [m["label"] for m in run_record["models"]] == ["dense", "fasp-0.4", f"fasp-0.4+{tag}", "wanda-sp-0.4",
                                                          f"wanda-sp-0.4+{tag}"]
    # a rerun trains nothing again: every recovery is on record with its checkpoint
    code, _, err = cli(*args, data=data_root)
    assert code == 0, err
    lines = (tmp_path / "work" / "results.jsonl").read_text().splitlines()
    assert sum(json.loads(line)["metric"] == "recover" for line in lines) == 2


def test_the_report_checks_that_recovery_leaves_the_served_speed_where_pruning_put_it():
    import pandas as pd

    from fasp_bench.report import _served_unchanged

    table = pd.DataFrame([
        {"model": "fasp-0.3", "method": "fasp", "recovered_from": None, "speedup": 1.20, "speedup low": 1.10,
         "speedup high": 1.30},
        {"model": "fasp-0.3+kd-all", "method": "fasp", "recovered_from": "fasp-0.3", "speedup": 1.18,
         "speedup low": 1.05, "speedup high": 1.25},
        {"model": "flap-0.3", "method": "flap", "recovered_from": None, "speedup": 1.20, "speedup low": 1.15,
         "speedup high": 1.25},
        {"model": "flap-0.3+kd-all", "method": "flap", "recovered_from": "flap-0.3", "speedup": 0.90,
         "speedup low": 0.85, "speedup high": 0.95}])
    line = _served_unchanged(table[table["recovered_from"].notna()], table)
    assert "fasp 1.18x against 1.20x one-shot (unchanged within the repeats' ranges)" in line
    assert "flap 0.90x against 1.20x one-shot (**changed beyond the repeats' ranges**)" in line
