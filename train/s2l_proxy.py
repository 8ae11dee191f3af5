"""S2L's proxy (``alignd select s2l``, train/select.py): a LoRA adapter of a small model trained on the set
with TRL's ``SFTTrainer``, checkpointed C times, and every example's loss at each checkpoint (its loss
trajectory), each checkpoint's losses kept so that an interrupted run resumes between checkpoints."""

from __future__ import annotations

import gc
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from alignd.train.data import TrainingError, TrainingInputError, require, write_json_atomic

if TYPE_CHECKING:
    from alignd.train.select import Example

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProxyOptions:
    """How the proxy is trained and its losses taken (TRL ``SFTConfig`` / PEFT ``LoraConfig``)."""

    checkpoints: int = 5
    epochs: float = 3.0
    learning_rate: float = 2e-4
    batch_size: int = 8
    lora_rank: int = 16
    max_length: int = 512
    loss_batch_size: int = 16
    seed: int = 0

    def check(self) -> None:
        require(
            [
                (
                    self.checkpoints >= 2,
                    f"--checkpoints must be >= 2 (a trajectory needs two points), got {self.checkpoints}",
                ),
                (self.epochs > 0, f"--proxy-epochs must be > 0, got {self.epochs}"),
                (self.learning_rate > 0, f"--proxy-learning-rate must be > 0, got {self.learning_rate}"),
                (self.batch_size >= 1, f"--proxy-batch-size must be >= 1, got {self.batch_size}"),
                (self.lora_rank >= 1, f"--proxy-lora-rank must be >= 1, got {self.lora_rank}"),
                (self.max_length >= 16, f"--max-length must be >= 16, got {self.max_length}"),
                (self.loss_batch_size >= 1, f"--loss-batch-size must be >= 1, got {self.loss_batch_size}"),
            ]
        )

    def total_steps(self, size: int) -> int:
        return max(1, math.ceil(math.ceil(size / self.batch_size) * self.epochs))

    def checkpoint_steps(self, size: int) -> list[int]:
        """C optimizer steps, evenly spaced over the proxy's training, the last at its end."""
        total = self.total_steps(size)
        if total < self.checkpoints:
            raise TrainingInputError(
                f"the proxy trains for only {total} steps ({size} examples, batch {self.batch_size}, {self.epochs:g} "
                f"epochs), fewer than --checkpoints {self.checkpoints}: lower --checkpoints or --proxy-batch-size, "
                "or raise --proxy-epochs"
            )
        return sorted({round(total * (i + 1) / self.checkpoints) for i in range(self.checkpoints)})


def tokenize_examples(tokenizer, examples: list[Example], max_length: int) -> tuple[list[list[int]], list[int], int]:
    """(prompt + target token ids, where the target starts, how many were cut to ``max_length``) of each
    example, the chat rendered as TRL renders a prompt-completion example for training. A target that
    the tokenizer cannot encode (unknown tokens, or text that does not come back when decoded) is an
    error naming the example."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise TrainingInputError("the proxy's tokenizer has no chat template: give a chat model as --proxy")
    unk = tokenizer.unk_token_id
    ids, starts, truncated = [], [], 0
    for e in examples:
        user = [{"role": "user", "content": e.prompt}]
        prompt_text = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
        full_text = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": e.target}], tokenize=False)
        prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        full_ids = tokenizer(full_text, add_special_tokens=False)["input_ids"]
        start = len(prompt_ids)
        if full_ids[:start] != prompt_ids:  # a template whose prompt is not a prefix: the common prefix
            start = next(
                (i for i, (a, b) in enumerate(zip(full_ids, prompt_ids, strict=False)) if a != b),
                min(len(full_ids), start),
            )
        target_ids = tokenizer(e.target, add_special_tokens=False)["input_ids"]
        if unk is not None and (unk in target_ids or unk in prompt_ids):
            raise TrainingInputError(
                f"line {e.line} (id '{e.id}'): the proxy's tokenizer cannot encode this example (unknown tokens): "
                "use a proxy whose tokenizer covers the set's text"
            )
        if " ".join(tokenizer.decode(target_ids, skip_special_tokens=True).split()) != " ".join(e.target.split()):
            raise TrainingInputError(
                f"line {e.line} (id '{e.id}'): the proxy's tokenizer does not encode this example's answer faithfully "
                "(decoding it gives other text): use a proxy whose tokenizer covers the set's text"
            )
        if start >= max_length:
            raise TrainingInputError(
                f"line {e.line} (id '{e.id}'): the prompt alone is {start} tokens, at least --max-length {max_length}: "
                "raise --max-length or shorten the prompt"
            )
        if len(full_ids) > max_length:
            truncated += 1
            full_ids = full_ids[:max_length]
        ids.append(full_ids)
        starts.append(start)
    return ids, starts, truncated


def example_losses(
    model, token_ids: list[list[int]], starts: list[int], pad_id: int, batch_size: int, *, progress=None
) -> np.ndarray:
    """Each example's mean token loss (nats) of its target (tokens from ``starts[i]`` on) given what comes
    before, in batched forward passes over examples sorted by length (right-padded)."""
    import torch

    device = next(model.parameters()).device
    order = sorted(range(len(token_ids)), key=lambda i: len(token_ids[i]))
    out = np.empty(len(token_ids), dtype=np.float64)
    model.eval()
    with torch.no_grad():
        for b in range(0, len(order), batch_size):
            rows = order[b : b + batch_size]
            width = max(len(token_ids[i]) for i in rows)
            input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            target = torch.zeros((len(rows), width), dtype=torch.bool)
            for r, i in enumerate(rows):
                n = len(token_ids[i])
                input_ids[r, :n] = torch.tensor(token_ids[i])
                mask[r, :n] = 1
                target[r, starts[i] : n] = True
            logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits.float()
            # token t is predicted at position t - 1
            logprobs = torch.log_softmax(logits[:, :-1], dim=-1)
            picked = logprobs.gather(-1, input_ids[:, 1:].to(device).unsqueeze(-1)).squeeze(-1)
            weight = target[:, 1:].to(device)
            nll = -(picked * weight).sum(-1) / weight.sum(-1).clamp(min=1)
            out[rows] = nll.cpu().numpy()
            if progress is not None:
                progress.update(len(rows))
    return out


def _sft_trainer(model_dir: Path, examples: list[Example], opts: ProxyOptions, output_dir: Path, schedule: list[int]):
    """TRL's ``SFTTrainer`` for a LoRA adapter of the proxy on the set (prompt-completion, loss on the
    completion only), saving a checkpoint at each step of ``schedule``."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from alignd.train.tuning import DEFAULT_TARGET_MODULES

    steps = set(schedule)

    class SaveAtSchedule(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step in steps:
                control.should_save = True
            return control

    cuda = torch.cuda.is_available()
    config = SFTConfig(
        output_dir=str(output_dir),
        max_steps=schedule[-1],
        learning_rate=opts.learning_rate,
        per_device_train_batch_size=opts.batch_size,
        seed=opts.seed,
        data_seed=opts.seed,
        max_length=opts.max_length,
        completion_only_loss=True,
        bf16=cuda and torch.cuda.is_bf16_supported(),
        gradient_checkpointing=False,
        logging_steps=max(1, schedule[-1] // 20),
        save_strategy="steps",
        save_steps=schedule[-1] + 1,  # never by itself: the callback saves at the schedule's steps
        save_total_limit=None,  # every checkpoint is a point of the trajectories
        report_to="none",
        dataloader_pin_memory=cuda,
        lr_scheduler_type="constant",  # the trajectories show the data, not a decaying learning rate
    )
    dataset = Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": e.prompt}],
                "completion": [{"role": "assistant", "content": e.target}],
            }
            for e in examples
        ]
    )
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    lora = LoraConfig(
        r=opts.lora_rank,
        lora_alpha=2 * opts.lora_rank,
        lora_dropout=0.0,
        target_modules=list(DEFAULT_TARGET_MODULES),
        bias="none",
        task_type="CAUSAL_LM",
    )
    return SFTTrainer(
        model=model,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=lora,
        callbacks=[SaveAtSchedule()],
    )


def proxy_trajectories(
    model_dir: Path, examples: list[Example], opts: ProxyOptions, work: Path, *, progress: bool = True
) -> tuple[np.ndarray, list[int], dict]:
    """Train the proxy (resuming TRL's last checkpoint) and take every example's loss at each checkpoint
    (each checkpoint's losses written to ``work/losses/step-<n>.json`` and reused). Returns the
    trajectories (examples x checkpoints), the checkpoint steps and the proxy's metrics."""
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    schedule = opts.checkpoint_steps(len(examples))
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    token_ids, starts, truncated = tokenize_examples(tokenizer, examples, opts.max_length)
    losses_dir = work / "losses"
    losses_dir.mkdir(parents=True, exist_ok=True)
    checkpoints = work / "proxy"
    metrics: dict = {"checkpoint_steps": schedule, "truncated_examples": truncated}
    done_file = work / "proxy.json"
    if not done_file.is_file():
        from alignd.train.tuning import _last_checkpoint

        trainer = _sft_trainer(model_dir, examples, opts, checkpoints, schedule)
        resume = _last_checkpoint(checkpoints)
        if resume:
            logger.info("resuming the proxy's training from %s", resume)
        started = time.perf_counter()
        output = trainer.train(resume_from_checkpoint=resume)
        logged = [{"step": e["step"], "loss": e["loss"]} for e in trainer.state.log_history if "loss" in e]
        write_json_atomic(
            done_file,
            {
                "train_wall_s": round(time.perf_counter() - started, 3),
                "train_loss_mean": output.training_loss,
                "log": logged,
                "resumed_from": resume,
            },
        )
        del trainer
        gc.collect()
    metrics.update(json.loads(done_file.read_text()))

    missing = [s for s in schedule if not (losses_dir / f"step-{s}.json").is_file()]
    started = time.perf_counter()
    if missing:
        from peft import PeftModel, set_peft_model_state_dict
        from safetensors.torch import load_file

        base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
        model = None
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        with tqdm(
            total=len(missing) * len(examples), desc="losses at the checkpoints", unit="example", disable=not progress
        ) as bar:
            for step in missing:
                ckpt = checkpoints / f"checkpoint-{step}"
                if not (ckpt / "adapter_model.safetensors").is_file():
                    raise TrainingError(f"the proxy's checkpoint {ckpt} is missing: run with --restart")
                if model is None:
                    model = PeftModel.from_pretrained(base, str(ckpt))
                else:
                    set_peft_model_state_dict(model, load_file(str(ckpt / "adapter_model.safetensors")))
                values = example_losses(model, token_ids, starts, pad_id, opts.loss_batch_size, progress=bar)
                write_json_atomic(
                    losses_dir / f"step-{step}.json",
                    {"step": step, "ids": [e.id for e in examples], "losses": values.tolist()},
                )
        del model, base
        gc.collect()
    metrics["loss_wall_s_this_process"] = round(time.perf_counter() - started, 3)
    columns = []
    for step in schedule:
        record = json.loads((losses_dir / f"step-{step}.json").read_text())
        if record["ids"] != [e.id for e in examples]:
            raise TrainingError(f"{losses_dir}/step-{step}.json holds other examples: run with --restart")
        columns.append(record["losses"])
    return np.array(columns, dtype=np.float64).T, schedule, metrics
