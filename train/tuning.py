"""What DPO and IRFT share: a LoRA adapter of the SFT model trained by TRL's ``DPOTrainer`` on
preference pairs, with the SFT model itself as the reference.

The options go into TRL's own configs (``DPOConfig``, which extends ``transformers.TrainingArguments``,
and PEFT's ``LoraConfig``); the loop, checkpoints, logging and resumption are TRL's and transformers'.
This module only builds those configs, the dataset, and reads the run's metrics back from TRL's logs.

**The reference model** (checked in trl 1.16.0, ``trl/trainer/dpo_trainer.py``): given a plain model and a
``peft_config``, ``DPOTrainer.__init__`` wraps the model with ``get_peft_model`` (a fresh adapter) and,
in its "Reference model" block, keeps no reference model (``self.ref_model = None`` for PEFT models);
``_compute_loss`` then computes the reference log-probabilities inside
``use_adapter(model, adapter_name=None)``, which is ``model.disable_adapter()``: the base weights, i.e.
the SFT model. (Handing TRL an already wrapped ``PeftModel`` instead would make it copy the current
adapter as a frozen "ref" adapter and use *that* as the reference: the ``elif is_peft_model(model) and
ref_model is None`` branch. IRFT must keep the SFT reference across rounds, so it continues a round by
loading the previous round's weights into TRL's fresh adapter: :func:`build_trainer` ``init_adapter``.)
"""

from __future__ import annotations

import gc
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from alignd.train.data import TrainingInputError, require, write_json_atomic
from alignd.train.manifest import jsonable, peak_rss_mib

if TYPE_CHECKING:
    from trl import DPOConfig, DPOTrainer

logger = logging.getLogger(__name__)

DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
# Largest LoRA rank `alignd train` makes, until Settings says otherwise: an adapter must fit the
# serving engine's max_lora_rank (vLLM's LoRA kernels take 8, 16, 32 or 64 here), so the setting
# ALIGND_MAX_LORA_RANK, where present, is the limit (see max_lora_rank()).
MAX_LORA_RANK = 64
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
_TRAINED = "trained.json"  # written last in a finished training's work folder
_LOGGED_KEYS = (
    "loss",
    "rewards/margins",
    "rewards/accuracies",
    "rewards/chosen",
    "rewards/rejected",
    "learning_rate",
    "grad_norm",
    "epoch",
)


def max_lora_rank(settings) -> int:
    """The largest LoRA rank to train: the served engine's limit (``ALIGND_MAX_LORA_RANK``) where the
    settings have one, else :data:`MAX_LORA_RANK`."""
    return int(getattr(settings, "max_lora_rank", None) or MAX_LORA_RANK)


@dataclass(frozen=True)
class TrainingOptions:
    """The command's training options; each lands in TRL's ``DPOConfig`` or PEFT's ``LoraConfig``."""

    beta: float = 0.1
    lora_rank: int = 8
    lora_alpha: float | None = None  # None: twice the rank (a common choice: scale 2 whatever the rank)
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES
    epochs: float = 3.0
    max_steps: int = -1  # > 0 overrides epochs (TrainingArguments' rule)
    learning_rate: float = 5e-5
    batch_size: int = 4
    gradient_accumulation_steps: int = 1
    seed: int = 0
    save_steps: int = 50
    logging_steps: int = 5
    max_length: int = 1024
    gradient_checkpointing: bool = False

    @property
    def alpha(self) -> float:
        return float(self.lora_alpha) if self.lora_alpha is not None else 2.0 * self.lora_rank

    def check(self, *, max_rank: int) -> None:
        """Raise :class:`TrainingInputError` for values TRL or PEFT would reject later (or never)."""
        if not 1 <= self.lora_rank <= max_rank:
            raise TrainingInputError(
                f"--lora-rank {self.lora_rank} is out of range: 1 to {max_rank} (the largest rank the server can "
                "serve, ALIGND_MAX_LORA_RANK)"
            )
        checks = [
            (self.beta > 0, f"--beta must be > 0, got {self.beta}"),
            (self.alpha > 0, f"--lora-alpha must be > 0, got {self.lora_alpha}"),
            (0 <= self.lora_dropout < 1, f"--lora-dropout must be in [0, 1), got {self.lora_dropout}"),
            (bool(self.target_modules) and all(self.target_modules), "--target-modules needs module names"),
            (self.epochs > 0 or self.max_steps > 0, f"--epochs must be > 0, got {self.epochs}"),
            (self.learning_rate > 0, f"--learning-rate must be > 0, got {self.learning_rate}"),
            (self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}"),
            (self.gradient_accumulation_steps >= 1, "--gradient-accumulation-steps must be >= 1"),
            (self.save_steps >= 1, f"--save-steps must be >= 1, got {self.save_steps}"),
            (self.logging_steps >= 1, f"--logging-steps must be >= 1, got {self.logging_steps}"),
            (self.max_length >= 16, f"--max-length must be >= 16, got {self.max_length}"),
        ]
        require(checks)

    def identity(self) -> dict:
        return jsonable(asdict(self))


@dataclass(frozen=True)
class PreferencePair:
    """One training pair: for DPO the best and worst of a prompt's samples, for IRFT the demonstration
    and the policy's own generation."""

    id: str
    prompt: str
    chosen: str
    rejected: str


@dataclass
class TrainResult:
    adapter_dir: Path
    metrics: dict
    dpo_config: dict
    lora_config: dict
    resumed_from: str | None = None
    extra: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------- the base model
def resolve_base_model(settings, *, progress: bool = True) -> tuple[Path, str]:
    """The SFT model folder to train on and its name: the embedded SmolLM2 (converted once by
    alignd.models.loading) or a local model folder; training reads the weights themselves (their digest
    goes into the manifest), so a hub id is not accepted."""
    from alignd.models.loading import prepare_embedded_model
    from alignd.settings import EMBEDDED_MODEL

    if settings.model == EMBEDDED_MODEL:
        return prepare_embedded_model(settings.cache_dir, progress=progress).resolve(), settings.model_name
    path = Path(settings.model).expanduser()
    if not path.exists():
        raise TrainingInputError(f"model folder {path} does not exist (--model: 'embedded' or a local model folder)")
    if not (path / "config.json").is_file():
        raise TrainingInputError(f"{path} is not a Hugging Face model folder (no config.json in it)")
    return path.resolve(), settings.model_name


@dataclass(frozen=True)
class BaseModel:
    """The SFT model an adapter is trained on: its folder, name and weights digest (what the manifest
    names, and what serving checks the adapter against)."""

    folder: Path
    name: str
    digest: str

    def manifest_entry(self) -> dict:
        return {"name": self.name, "path": str(self.folder), "weights_digest": self.digest}


def prepare_base_model(settings, opts: TrainingOptions, *, progress: bool = True) -> BaseModel:
    """Resolve the base model, check that ``opts`` can adapt it, and take its weights digest."""
    from alignd.models.weights import weights_digest

    folder, name = resolve_base_model(settings, progress=progress)
    check_target_modules(folder, opts.target_modules)
    return BaseModel(folder, name, weights_digest(folder))


# ---------------------------------------------------------------------------- configs
def lora_config(opts: TrainingOptions):
    from peft import LoraConfig

    return LoraConfig(
        r=opts.lora_rank,
        lora_alpha=opts.alpha,
        lora_dropout=opts.lora_dropout,
        target_modules=list(opts.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


def dpo_config(opts: TrainingOptions, output_dir: Path) -> DPOConfig:
    import torch
    from trl import DPOConfig

    cuda = torch.cuda.is_available()
    return DPOConfig(
        output_dir=str(output_dir),
        beta=opts.beta,
        learning_rate=opts.learning_rate,
        num_train_epochs=opts.epochs,
        max_steps=opts.max_steps,
        per_device_train_batch_size=opts.batch_size,
        gradient_accumulation_steps=opts.gradient_accumulation_steps,
        seed=opts.seed,
        data_seed=opts.seed,
        max_length=opts.max_length,
        # Weights stay float32; on a GPU with bfloat16 the forward runs under bf16 autocast (TRL's
        # default), on the CPU in float32 (bf16 autocast is slower there and the exactness tests need fp32).
        bf16=cuda and torch.cuda.is_bf16_supported(),
        # TRL turns checkpointing on by default; on the small models trained here it only costs time.
        gradient_checkpointing=opts.gradient_checkpointing,
        # TRL's disable_dropout zeroes *every* nn.Dropout, LoRA's own included: keep it off only when a
        # LoRA dropout is asked for (the base models here have no dropout of their own).
        disable_dropout=opts.lora_dropout == 0,
        logging_steps=opts.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=opts.save_steps,
        save_total_limit=2,  # each checkpoint holds adapter + optimizer; two are enough to resume
        report_to="none",
        dataloader_pin_memory=cuda,
    )


def check_target_modules(model_dir: str | Path, target_modules: tuple[str, ...]) -> None:
    """Raise :class:`TrainingInputError` when a target module name matches no layer of the model (built
    on the meta device from its config: no weights are read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(model_dir))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    linear = sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and "." in name
        }
    )
    missing = [t for t in target_modules if t not in linear]
    if missing:
        raise TrainingInputError(
            f"--target-modules {','.join(missing)}: no such layer in {model_dir}; "
            f"its linear layers: {', '.join(linear)}"
        )
    if "lm_head" in target_modules:
        raise TrainingInputError(
            "--target-modules: TRL cannot train an adapter on lm_head (it reads its weight directly)"
        )


def load_sft(model_dir: str | Path):
    """The SFT model (float32) and its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    return model, tokenizer


def preference_dataset(pairs: list[PreferencePair]):
    """TRL's conversational preference format: TRL renders prompt + answer with the model's chat
    template, as the model is served."""
    from datasets import Dataset

    return Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": p.prompt}],
                "chosen": [{"role": "assistant", "content": p.chosen}],
                "rejected": [{"role": "assistant", "content": p.rejected}],
            }
            for p in pairs
        ]
    )


def _log_last_step():
    """A transformers callback: log the last step too, so that the final loss is the loss at the end and
    not at the last multiple of logging_steps."""
    from transformers import TrainerCallback

    class LogLastStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.max_steps and state.global_step >= state.max_steps:
                control.should_log = True
            return control

    return LogLastStep()


def build_trainer(
    model_dir: str | Path,
    pairs: list[PreferencePair],
    opts: TrainingOptions,
    output_dir: Path,
    *,
    init_adapter: Path | None = None,
) -> DPOTrainer:
    """TRL's ``DPOTrainer`` for a LoRA adapter of the SFT model in ``model_dir`` on ``pairs``; the
    reference is the SFT model (the adapter disabled, see the module's docstring). ``init_adapter``: an
    adapter folder whose weights the new adapter starts from (same LoRA options)."""
    from trl import DPOTrainer

    model, tokenizer = load_sft(model_dir)
    trainer = DPOTrainer(
        model=model,
        args=dpo_config(opts, output_dir),
        train_dataset=preference_dataset(pairs),
        processing_class=tokenizer,
        peft_config=lora_config(opts),
        callbacks=[_log_last_step()],
    )
    if init_adapter is not None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        loaded = set_peft_model_state_dict(trainer.model, load_file(str(init_adapter / "adapter_model.safetensors")))
        lora_missing = [k for k in loaded.missing_keys if "lora_" in k]
        if loaded.unexpected_keys or lora_missing:
            raise TrainingInputError(
                f"adapter {init_adapter} does not fit the LoRA options of this run "
                f"(unexpected {loaded.unexpected_keys[:3]}, missing {lora_missing[:3]})"
            )
    return trainer


def _last_checkpoint(folder: Path) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(folder)) if folder.is_dir() else None


def summarize_logs(log_history: list[dict]) -> dict:
    """The metrics of a run from TRL's logs (``trainer.state.log_history``): the last logged step's loss,
    implicit-reward margin and accuracy, and a compact per-step log."""
    steps = [e for e in log_history if "loss" in e and "step" in e]
    last = steps[-1] if steps else {}
    return {
        "final_loss": last.get("loss"),
        "final_step": last.get("step"),
        "reward_margin": last.get("rewards/margins"),
        "reward_accuracy": last.get("rewards/accuracies"),
        "implicit_reward_chosen": last.get("rewards/chosen"),
        "implicit_reward_rejected": last.get("rewards/rejected"),
        "log": [{"step": e["step"], **{k: e[k] for k in _LOGGED_KEYS if k in e}} for e in steps],
    }


def train_adapter(
    model_dir: str | Path,
    pairs: list[PreferencePair],
    opts: TrainingOptions,
    work_dir: Path,
    *,
    init_adapter: Path | None = None,
) -> TrainResult:
    """Train (or resume training) a LoRA adapter on ``pairs`` in ``work_dir``: TRL's checkpoints in
    ``checkpoints/`` (resumed from the last one), the adapter in ``adapter/`` and its metrics in
    ``trained.json``, written last. A finished training is not redone."""
    work_dir.mkdir(parents=True, exist_ok=True)
    adapter_dir = work_dir / "adapter"
    done = work_dir / _TRAINED
    if done.is_file() and adapter_dir.is_dir():
        record = json.loads(done.read_text())
        logger.info("training in %s already finished; reusing its adapter", work_dir)
        return TrainResult(
            adapter_dir, record["metrics"], record["dpo_config"], record["lora_config"], record.get("resumed_from")
        )
    checkpoints = work_dir / "checkpoints"
    trainer = build_trainer(model_dir, pairs, opts, checkpoints, init_adapter=init_adapter)
    resume = _last_checkpoint(checkpoints)
    if resume:
        logger.info("resuming training from %s", resume)
    start = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=resume)
    wall = time.perf_counter() - start

    staging = work_dir / "adapter.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    trainer.model.save_pretrained(str(staging))
    for extra in set(os.listdir(staging)) - set(ADAPTER_FILES):  # PEFT's model card: not part of the artefact
        path = staging / extra
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    shutil.rmtree(adapter_dir, ignore_errors=True)
    os.rename(staging, adapter_dir)

    metrics = {
        "steps": trainer.state.global_step,
        "epochs": trainer.state.epoch,
        "pairs": len(pairs),
        "train_loss_mean": output.training_loss,
        **summarize_logs(trainer.state.log_history),
        "train_wall_s": round(wall, 3),
        "train_runtime_s": output.metrics.get("train_runtime"),
        "train_examples_per_s": output.metrics.get("train_samples_per_second"),
        "peak_rss_mib": peak_rss_mib(),
    }
    result = TrainResult(
        adapter_dir,
        metrics,
        jsonable(trainer.args.to_dict()),
        jsonable(trainer.model.peft_config["default"].to_dict()),
        resume,
    )
    write_json_atomic(
        done,
        {
            "metrics": result.metrics,
            "dpo_config": result.dpo_config,
            "lora_config": result.lora_config,
            "resumed_from": resume,
        },
    )
    del trainer
    gc.collect()  # the model and optimizer state, before the next round or the next model loads
    return result
