"""Recovery after pruning: knowledge distillation from the dense model into a pruned checkpoint.

The student (the pruned checkpoint, float32 master weights) learns the teacher's next-token distributions,
KL(teacher || student) at temperature T, optionally mixed with the plain language-model loss; fully fine-tuned
or through LoRA adapters merged back, so the recovered folder has the pruned shapes and deploys as the pruned
one does. Training is transformers' Trainer: bf16 autocast where the hardware has it, gradient checkpointing,
a fixed seed, a checkpoint every `save_steps` in `<out>.recovery/` that a rerun resumes from.

Training text is calibration-side only, from one of two sources:
- "c4": the C4 calibration documents (0-499) less every c4-calval window (`data.training_ids`);
- "teacher": sequences the dense teacher samples itself in vLLM from a random first token (the data-free
  distillation of LLM-QAT), seeded, cached per teacher.
A budget beyond the source is refused unless `epochs` allows that many passes (recorded).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from pruning.checkpoint import check_output_dir, read_metadata, save_pruned

from .data import bos_id, training_ids
from .devices import resolve_device, resolve_dtype
from .errors import BenchError
from .models import cache_dir, fingerprint, load_config, resolve_model

SOURCES = ("c4", "teacher")
STATE_SUFFIX = ".recovery"  # <out>.recovery/: the Trainer's checkpoints and this recovery's identity


@dataclass(frozen=True)
class RecoveryPlan:
    tokens: int | None  # training tokens; None: every token of the source ("all", c4 only)
    source: str = "c4"
    seqlen: int = 512
    batch_size: int = 8  # sequences per optimizer step
    micro_batch: int = 4  # sequences per forward (gradient accumulation makes up the rest)
    learning_rate: float = 5e-5
    temperature: float = 1.0
    lm_weight: float = 0.0  # weight of the plain next-token loss; the KL term has 1 - lm_weight
    lora_rank: int = 0  # 0: full fine-tuning
    lora_alpha: float | None = None  # default 2 x rank
    epochs: int = 1  # passes over the source a budget may take
    validation_seqlen: int = 512  # the c4-calval windows (of this length) kept out of training
    seed: int = 0
    save_steps: int = 20
    device: str | None = None
    dtype: str | None = None

    def check(self) -> RecoveryPlan:
        if self.source not in SOURCES:
            raise BenchError(f"unknown recovery source {self.source!r}: use one of {', '.join(SOURCES)}")
        if self.tokens is None and self.source != "c4":
            raise BenchError("tokens=all needs the c4 source: give the teacher source a number of tokens")
        if self.tokens is not None and self.tokens < self.seqlen * self.batch_size:
            raise BenchError(f"a recovery budget of {self.tokens} tokens is less than one step of "
                             f"{self.batch_size} x {self.seqlen}: raise --tokens or lower --batch-size")
        checks = [(self.seqlen >= 2, "--seqlen must be at least 2"),
                  (self.micro_batch >= 1 and self.batch_size % self.micro_batch == 0,
                   "--batch-size must be a positive multiple of --micro-batch"),
                  (self.learning_rate > 0, "--lr must be positive"),
                  (self.temperature > 0, "--temperature must be positive"),
                  (0 <= self.lm_weight <= 1, "--lm-weight must be in [0, 1]"),
                  (self.lora_rank >= 0, "--lora-rank must be 0 (full fine-tuning) or positive"),
                  (self.epochs >= 1, "--epochs must be at least 1"),
                  (self.save_steps >= 1, "--save-steps must be at least 1")]
        for ok, message in checks:
            if not ok:
                raise BenchError(message)
        return self


def parse_recover_spec(text: str) -> list[RecoveryPlan]:
    """`kd:tokens=0,250000,all[,source=teacher,lora=8,lr=1e-4,...]` -> one plan per budget (0: no recovery)."""
    kind, _, rest = text.partition(":")
    if kind != "kd":
        raise BenchError(f"unknown recovery {kind!r} in --recover {text!r}: the one recovery is kd (distillation)")
    fields = {"source": "source", "lora": "lora_rank", "lr": "learning_rate", "temperature": "temperature",
              "lm_weight": "lm_weight", "epochs": "epochs", "seqlen": "seqlen", "batch_size": "batch_size",
              "micro_batch": "micro_batch"}
    kinds = {"lora_rank": int, "epochs": int, "seqlen": int, "batch_size": int, "micro_batch": int,
             "learning_rate": float, "temperature": float, "lm_weight": float, "source": str}
    budgets, options, key = [], {}, None
    for part in [p for p in rest.split(",") if p]:
        name, eq, value = part.partition("=")
        if eq:
            key = name.strip()
            if key != "tokens" and key not in fields:
                raise BenchError(f"unknown recovery option {key!r} in --recover {text!r}: use tokens or "
                                 + ", ".join(fields))
        else:
            value = name  # a further budget: `tokens=0,250000`
        if key is None:
            raise BenchError(f"--recover {text!r}: write kd:tokens=N[,N...]")
        if key == "tokens":
            budgets.append(parse_tokens(value, zero=True))
        else:
            kind = kinds[fields[key]]
            try:
                options[fields[key]] = kind(value)
            except ValueError:
                raise BenchError(f"--recover {text!r}: {key}={value!r} is not a {kind.__name__}") from None
    if not budgets:
        raise BenchError(f"--recover {text!r} names no budget: write kd:tokens=N[,N...]")
    return [RecoveryPlan(tokens=b, **options) for b in budgets]


def recovery_tag(plan: RecoveryPlan) -> str:
    """A recovered model's suffix in labels and folder names: `kd-100k`, `kd-all`, `kd-500k-teacher-lora8`."""
    n = plan.tokens
    budget = ("all" if n is None else f"{n // 1_000_000}M" if n and n % 1_000_000 == 0
              else f"{n // 1000}k" if n and n % 1000 == 0 else str(n))
    # every setting off its default is named, so two recoveries of one model never share a label or a folder
    default = RecoveryPlan(tokens=n)
    named = [f"{short}{getattr(plan, field):g}" for field, short in _TAGS
             if getattr(plan, field) != getattr(default, field)]
    return "-".join(["kd", budget, *([plan.source] if plan.source != "c4" else []),
                     *([f"lora{plan.lora_rank}"] if plan.lora_rank else []), *named])


_TAGS = (("learning_rate", "lr"), ("temperature", "T"), ("lm_weight", "lm"), ("epochs", "ep"), ("seqlen", "len"),
         ("batch_size", "bs"), ("micro_batch", "mb"), ("lora_alpha", "alpha"))


def parse_tokens(value: str, zero: bool = False) -> int | None:
    """A token budget: N, 2.5e5, or 'all' (None); 0 (no recovery) only where `zero`."""
    if value.strip() == "all":
        return None
    try:
        tokens = float(value)
    except ValueError:
        tokens = -1.0
    if tokens < (0 if zero else 1) or not tokens.is_integer():
        raise BenchError(f"token budget {value!r} is not a {'' if zero else 'positive '}token count: give N, "
                         "2.5e5 or all")
    return int(tokens)


def _dtype_of(config) -> torch.dtype:
    dtype = getattr(config, "dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def source_windows(plan: RecoveryPlan, tokenizer, teacher: str, data_root: Path | None) -> tuple[torch.Tensor, int]:
    """The plan's training windows [n, seqlen] in order, and how many tokens the source holds for one pass."""
    if plan.source == "c4":
        pool = training_ids(tokenizer, plan.seqlen, plan.validation_seqlen, plan.seed, data_root)
    else:
        pool = teacher_windows(teacher, math.ceil(plan.tokens / plan.seqlen), plan.seqlen, plan.seed)
    available = pool.numel()
    passes = _passes(plan, available)
    count = (available if plan.tokens is None else plan.tokens) // plan.seqlen
    generator = torch.Generator().manual_seed(plan.seed)
    orders = [torch.arange(len(pool))] + [torch.randperm(len(pool), generator=generator) for _ in range(passes - 1)]
    return pool[torch.cat(orders)[:count]], available


def _passes(plan: RecoveryPlan, available: int) -> int:
    """Passes over a source of `available` tokens the budget takes; more than `epochs` is refused."""
    wanted = available if plan.tokens is None else plan.tokens
    passes = math.ceil(wanted / available)
    if passes > plan.epochs:
        raise BenchError(f"a budget of {wanted:,} tokens needs {passes} passes over the {plan.source} source's "
                         f"{available:,} tokens: lower --tokens, or allow --epochs {passes}")
    return passes


def check_budget(plan: RecoveryPlan, tokenizer, data_root: Path | None) -> None:
    """Refuse, before any work, a c4 budget the source cannot give (the teacher source has no limit)."""
    if plan.source == "c4":
        _passes(plan, training_ids(tokenizer, plan.seqlen, plan.validation_seqlen, plan.seed, data_root).numel())


def teacher_windows(teacher: str, count: int, seqlen: int, seed: int) -> torch.Tensor:
    """`count` sequences of `seqlen` tokens the teacher samples in vLLM (temperature 1, one seed per sequence)
    from a seeded random first token (after <bos> for a BOS model); cached per teacher fingerprint."""
    from .serving.bench import ServeProtocol, default_dtype, measure_in_subprocess, require_vllm

    path = cache_dir() / "generated" / f"{fingerprint(teacher)}-{count}x{seqlen}-seed{seed}.pt"
    if path.exists():
        return torch.load(path)
    require_vllm()
    protocol = ServeProtocol(prompts=1, input_len=1, output_len=1, repeats=1, seed=seed, dtype=default_dtype())
    result = measure_in_subprocess(resolve_model(teacher), protocol, timeout_s=3600, points=[],
                                   sample={"sequences": count, "length": seqlen, "seed": seed})
    if "error" in result:
        raise BenchError(f"the teacher could not generate recovery text in vLLM: {result['error']}")
    windows = torch.tensor(result["sampled"], dtype=torch.long)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(windows, tmp)
    tmp.replace(path)
    return windows


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, input_ids: torch.Tensor,
                      temperature: float, lm_weight: float) -> torch.Tensor:
    """(1 - w) T^2 KL(teacher_T || student_T) per token + w CE(student, next token), in float32."""
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = F.kl_div(s, t, log_target=True, reduction="none").sum(-1).mean() * temperature ** 2
    if not lm_weight:
        return kl
    ce = F.cross_entropy(student_logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten())
    return (1 - lm_weight) * kl + lm_weight * ce


def _lora(model, plan: RecoveryPlan):
    """LoRA adapters on every plain, non-empty linear of the decoder blocks (not the embedding or head). The
    project's narrow-V projections (V padded to the head size, O reading the narrow V) keep their pruned
    weights: an adapter's output would not match their padded shapes."""
    from peft import LoraConfig, get_peft_model

    targets = [name for name, m in model.named_modules()
               if type(m) is torch.nn.Linear and ".layers." in name and m.weight.numel()]
    config = LoraConfig(r=plan.lora_rank, lora_alpha=plan.lora_alpha or 2 * plan.lora_rank, lora_dropout=0.0,
                        target_modules=targets, bias="none")
    return get_peft_model(model, config)


def _trainer_class():
    from transformers import Trainer, TrainerCallback

    class DistillationTrainer(Trainer):
        loss_is_scaled_for_ga = False  # a per-batch mean: the Trainer divides by the accumulation steps

        def __init__(self, *args, teacher, temperature: float, lm_weight: float, **kwargs):
            super().__init__(*args, **kwargs)
            self.teacher, self.temperature, self.lm_weight = teacher, temperature, lm_weight

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            with torch.no_grad():
                teacher_logits = self.teacher(input_ids=inputs["input_ids"]).logits
            outputs = model(input_ids=inputs["input_ids"])
            loss = distillation_loss(outputs.logits, teacher_logits, inputs["input_ids"], self.temperature,
                                     self.lm_weight)
            return (loss, outputs) if return_outputs else loss

    class Progress(TrainerCallback):
        """One bar in tokens (tok/s), the last loss beside it; wall seconds carried across resumes."""

        def __init__(self, total_steps: int, tokens_per_step: int, state_dir: Path):
            self.total, self.per_step, self.clock = total_steps, tokens_per_step, state_dir / "seconds.json"
            self.before = json.loads(self.clock.read_text())["seconds"] if self.clock.exists() else 0.0
            self.bar = None

        def seconds(self) -> float:
            return self.before + time.perf_counter() - self.started

        def on_train_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()
            self.bar = tqdm(total=self.total * self.per_step, initial=state.global_step * self.per_step,
                            unit="tok", unit_scale=True, desc="recover", dynamic_ncols=True)

        def on_step_end(self, args, state, control, **kwargs):
            self.bar.update(self.per_step)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.bar.set_postfix_str(f"loss {logs['loss']:.4f}")

        def on_save(self, args, state, control, **kwargs):
            self.clock.write_text(json.dumps({"step": state.global_step, "seconds": self.seconds()}))

        def on_train_end(self, args, state, control, **kwargs):
            self.bar.close()

    return DistillationTrainer, Progress


class _Windows(torch.utils.data.Dataset):
    def __init__(self, windows: torch.Tensor):
        self.windows = windows

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.windows[i]}


def recover(checkpoint: str, teacher: str, plan: RecoveryPlan, out: str | Path, *, data_root: Path | None,
            overwrite: bool = False, callbacks: list | None = None) -> dict:
    """Distil `teacher` into `checkpoint` by `plan`, save the result to `out`; returns its pruning.json record.

    A rerun with the same plan resumes from `<out>.recovery/` (a different plan there is refused in one line);
    `callbacks`: extra transformers TrainerCallbacks."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, TrainingArguments

    plan = plan.check()
    out = check_output_dir(out, overwrite)
    student_path, teacher_path = resolve_model(checkpoint), resolve_model(teacher)
    student_vocab, teacher_vocab = load_config(checkpoint).vocab_size, load_config(teacher).vocab_size
    if student_vocab != teacher_vocab:
        raise BenchError(f"the teacher's vocabulary ({teacher_vocab}) is not the student's ({student_vocab}): "
                         "give the dense model the checkpoint was pruned from as --teacher")
    tokenizer = AutoTokenizer.from_pretrained(student_path)
    windows, available = source_windows(plan, tokenizer, teacher, data_root)
    steps = len(windows) // plan.batch_size
    if steps == 0:
        raise BenchError(f"the {plan.source} source holds {available:,} tokens, less than one step of "
                         f"{plan.batch_size} x {plan.seqlen}: lower --batch-size or --seqlen")
    windows = windows[:steps * plan.batch_size]  # whole steps only
    identity = {"plan": asdict(replace(plan, device=None)), "student": fingerprint(checkpoint),
                "teacher": fingerprint(teacher), "windows": len(windows)}
    state = Path(f"{out}{STATE_SUFFIX}")
    _claim_state(state, identity)

    device = resolve_device(plan.device)
    dtype = resolve_dtype(plan.dtype, device)
    student = AutoModelForCausalLM.from_pretrained(student_path, dtype=torch.float32)  # float32 master weights
    saved_dtype = _dtype_of(load_config(checkpoint))  # the recovered folder keeps the checkpoint's dtype
    teacher_model = AutoModelForCausalLM.from_pretrained(teacher_path, dtype=dtype).to(device).eval()
    teacher_model.requires_grad_(False)
    if plan.lora_rank:
        student = _lora(student, plan)
    args = TrainingArguments(  # bf16: autocast over the float32 master weights
        output_dir=str(state), per_device_train_batch_size=plan.micro_batch,
        gradient_accumulation_steps=plan.batch_size // plan.micro_batch, max_steps=steps,
        learning_rate=plan.learning_rate, lr_scheduler_type="cosine", warmup_steps=0.1, weight_decay=0.0,
        optim="adamw_torch", logging_steps=1, save_strategy="steps", save_steps=plan.save_steps, save_total_limit=1,
        seed=plan.seed, data_seed=plan.seed, bf16=dtype == torch.bfloat16, use_cpu=device.type == "cpu",
        gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}, report_to=[],
        disable_tqdm=True, remove_unused_columns=False, dataloader_num_workers=0)
    trainer_class, progress_class = _trainer_class()
    progress = progress_class(steps, plan.batch_size * plan.seqlen, state)
    trainer = trainer_class(model=student, args=args, train_dataset=_Windows(windows),
                            data_collator=lambda rows: {"input_ids": torch.stack([r["input_ids"] for r in rows])},
                            callbacks=[progress, *(callbacks or [])], teacher=teacher_model,
                            temperature=plan.temperature, lm_weight=plan.lm_weight)
    trainer.remove_callback(PrinterCallback)  # the bar shows the loss; the curve goes to pruning.json
    resume = _last_complete_checkpoint(state)
    resumed_at = int(resume.name.rsplit("-", 1)[-1]) if resume else 0
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    seconds = progress.seconds()
    model = trainer.model.merge_and_unload() if plan.lora_rank else trainer.model
    model = model.to("cpu", saved_dtype)
    model.config.use_cache = True
    record = {
        **asdict(replace(plan, tokens=len(windows) * plan.seqlen)), "budget": plan.tokens,
        "device": device.type, "dtype": str(dtype).removeprefix("torch."),
        "teacher": teacher, "teacher_fingerprint": identity["teacher"], "student": str(checkpoint),
        "student_fingerprint": identity["student"], "source_tokens": available,
        "passes": math.ceil(len(windows) * plan.seqlen / available), "steps": steps,
        "text": ("C4 train docs 0-499 less every c4-calval window" if plan.source == "c4"
                 else "sampled by the teacher in vLLM (temperature 1) from a random first token"),
        "bos": "<bos> first in every window" if bos_id(tokenizer) is not None else "none",
        "loss": [[e["step"], e["loss"]] for e in trainer.state.log_history if "loss" in e],
        "seconds": seconds, "resumed_from_step": resumed_at,
    }
    metadata = {**(read_metadata(student_path) or {}), "recovery": record}
    metadata.pop("fingerprint", None)
    save_pruned(model, out, metadata, tokenizer=tokenizer, overwrite=overwrite)
    shutil.rmtree(state, ignore_errors=True)
    return record


def _last_complete_checkpoint(state: Path) -> Path | None:
    """The Trainer's newest checkpoint that was fully written (it writes trainer_state.json last); one cut short
    by a kill mid-save is deleted, so the run resumes from the one before it."""
    steps = {}
    for folder in state.glob("checkpoint-*"):
        if (folder / "trainer_state.json").is_file() and folder.name.split("-")[-1].isdigit():
            steps[int(folder.name.split("-")[-1])] = folder
        else:
            shutil.rmtree(folder, ignore_errors=True)
    return steps[max(steps)] if steps else None


def _claim_state(state: Path, identity: dict) -> None:
    """Resume only the same recovery: a state folder holding another plan or other models is refused."""
    marker = state / "recovery.json"
    if marker.exists():
        held = json.loads(marker.read_text())
        if held != identity:
            raise BenchError(f"{state} holds an unfinished recovery with other settings or models: delete it, or "
                             "rerun with the settings it was started with")
        return
    state.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(identity, indent=2))
