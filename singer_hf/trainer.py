"""`SingerTrainer`: a `transformers.Trainer` for `DistillationModel`, and its arguments."""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field, fields

import peft
import torch
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from transformers import Trainer, TrainingArguments
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.utils import logging

from .modeling import DistillationConfig, DistillationModel

logger = logging.get_logger(__name__)

DISTILLATION_DIR = "distillation"
"""Subfolder of a saved student holding the research artefacts: adapters (PEFT format), projectors."""
HEADS_FILE = "heads.safetensors"
CONFIG_FILE = "distillation_config.json"


@dataclass
class SingerTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus the distillation method's fields (see `DistillationConfig`).

    Defaults follow the paper run (SPEC §6): AdamW, lr 1e-3, weight decay 1e-4, cosine decay to
    lr·1e-4 after a 5 % warm-up, no gradient clipping.
    """

    method: str = field(default="singer", metadata={"help": "singer, fitnet or vitkd."})
    teacher_layers: list[int] | None = field(
        default=None, metadata={"help": "Distilled teacher blocks; default: the method's, scaled to the teacher's depth."}
    )
    rank: int = field(default=64, metadata={"help": "SiNGER adapter rank."})
    null_threshold: float = field(default=0.05, metadata={"help": "Singular-value threshold of the nullspace."})
    adapter_init: str = field(default="nullspace", metadata={"help": "nullspace, or random (ablation)."})
    adapter_seed: int = field(default=0, metadata={"help": "Seed of the adapters' random rows."})
    outlier_quantile: float = field(default=0.97, metadata={"help": "Per-image norm quantile above which tokens are outliers."})
    kd_weight: float | None = field(default=None, metadata={"help": "λ_KD (singer 1, fitnet 10, vitkd mimic 1)."})
    outlier_weight: float | None = field(default=None, metadata={"help": "λ_out (singer 0.01)."})
    info_weight: float | None = field(default=None, metadata={"help": "λ_info (singer 1; 0 is the ablation)."})
    generation_weight: float | None = field(default=None, metadata={"help": "ViTKD generation weight (1)."})
    mask_ratio: float = field(default=0.5, metadata={"help": "ViTKD mask ratio."})

    learning_rate: float = field(default=1e-3, metadata={"help": "Peak AdamW learning rate."})
    weight_decay: float = field(default=1e-4, metadata={"help": "AdamW weight decay."})
    lr_scheduler_type: str = field(default="cosine_with_min_lr", metadata={"help": "Learning-rate schedule."})
    lr_scheduler_kwargs: dict | str | None = field(
        default_factory=lambda: {"min_lr_rate": 1e-4}, metadata={"help": "Cosine floor: lr·1e-4."}
    )
    warmup_steps: float = field(default=0.05, metadata={"help": "Warm-up: steps, or a fraction of training if < 1."})
    max_grad_norm: float = field(default=0.0, metadata={"help": "Gradient clipping norm; 0: none, as in the paper."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Images are transformed on the fly."})
    save_safetensors: bool = True

    def __post_init__(self):
        # On a machine without an accelerator, train on the CPU: the recipes' bf16 then runs as CPU
        # autocast instead of failing, and processes started by torchrun / `accelerate launch` join as
        # CPU ranks over gloo instead of each training alone and writing the output.
        if not _has_accelerator():
            self.use_cpu = True
        super().__post_init__()
        if not self.use_cpu and self.dataloader_pin_memory:
            # Performance (issue 9): pinned batches are copied to the accelerator without stalling
            # the host at every step (the caching host allocator keeps a pinned buffer until its copy is done).
            self.accelerator_config.non_blocking = True

    def distillation_config(self) -> DistillationConfig:
        names = {f.name for f in fields(DistillationConfig)}
        values = {name: getattr(self, name) for name in names}
        return DistillationConfig(**values)


def _has_accelerator() -> bool:
    accelerator = getattr(torch, "accelerator", None)
    return accelerator.is_available() if accelerator is not None else torch.cuda.is_available()


class SingerTrainer(Trainer):
    """Trains a `DistillationModel`; saves the student as a plain Hugging Face model.

    - Each loss term is logged as `loss_<name>` (e.g. `loss_kd`, `loss_outlier`, `loss_info`),
      averaged over the logging interval and the processes, with one host sync per log, not per step;
      `skipped_images` counts the undecodable images dropped so far. `evaluate()` reports `eval_loss`
      and `eval_loss_<name>` the same way.
    - `args.push_to_hub` does not make the Trainer push (see `singer_hf.publishing`).
    - `save_model` writes the student (config, safetensors, image processor) at the top of the
      folder, so `AutoModel.from_pretrained` loads it without this package; the adapters (PEFT
      format), projectors and distillation config go to `distillation/`. The teacher is never saved.
    """

    def __init__(self, model: DistillationModel, args: SingerTrainingArguments, **kwargs):
        if not isinstance(model, DistillationModel):
            raise ValueError(f"model: SingerTrainer trains a singer_hf.DistillationModel, got {type(model).__name__}")
        if args.load_best_model_at_end:
            raise ValueError(
                "load_best_model_at_end: not supported; the eval loss measures agreement with the teacher, not the "
                "student's quality (probe the saved checkpoints instead)"
            )
        if args.push_to_hub:
            # The Trainer's own push (a repo made at start, checkpoint pushes, its layout and card)
            # stays off: singer_hf.publishing publishes the saved student, with its card, after
            # training (scripts/distill.py --push_to_hub does).
            logger.info("push_to_hub: the Trainer's own push is off; publish with singer_hf.publishing.publish_student")
            args = copy.copy(args)
            args.push_to_hub = False
        super().__init__(model=model, args=args, **kwargs)
        if args.bf16 and not self.is_fsdp_enabled:
            # Performance (issue 9): the frozen teacher needs no fp32 master weights, and autocast
            # would re-cast them on every step. FSDP shards expect one dtype, so it keeps fp32 there.
            model.cast_teacher(torch.bfloat16)
        self._loss_sums: dict[str, dict[str, torch.Tensor]] = {"train": {}, "eval": {}}
        self._loss_steps = {"train": 0, "eval": 0}

    def _accumulate(self, phase: str, losses: dict[str, torch.Tensor]) -> None:
        sums = self._loss_sums[phase]
        for name, value in losses.items():
            sums[name] = value.detach() if name not in sums else sums[name] + value.detach()
        self._loss_steps[phase] += 1

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        if model.training:
            self._accumulate("train", outputs.losses)
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """The distillation loss on a batch (there are no labels or logits to return)."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            outputs = model(**inputs)
        self._accumulate("eval", outputs.losses)
        return outputs.loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # Mutating `logs` in place also puts the terms into the metrics that `evaluate()` returns.
        eval_loss = next((key for key in logs if key.endswith("_loss")), None)
        phase, prefix = ("train", "loss") if "loss" in logs else ("eval", eval_loss)
        if prefix is not None and self._loss_sums[phase]:
            sums = self._loss_sums[phase]
            names = list(sums)
            values = [sums[name] for name in names]
            skipped = getattr(self.data_collator, "skipped", None) if phase == "train" else None
            if skipped is not None:  # undecodable images so far, this process
                values.append(torch.tensor(float(skipped), device=values[0].device))
            totals = self.accelerator.reduce(torch.stack(values), reduction="sum").tolist()  # the one host sync
            for name, total in zip(names, totals):
                logs[f"{prefix}_{name}"] = total / (self._loss_steps[phase] * self.accelerator.num_processes)
            if skipped is not None:
                logs["skipped_images"] = int(totals[-1])
            self._loss_sums[phase], self._loss_steps[phase] = {}, 0
        super().log(logs, start_time)

    # -- saving and resuming -----------------------------------------------------------------------
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if not self.args.should_save:  # Trainer.save_model calls _save on every process
            return
        output_dir = output_dir or self.args.output_dir
        model: DistillationModel = self.accelerator.unwrap_model(self.model)
        state_dict = model.state_dict() if state_dict is None else state_dict
        student, adapters, heads = {}, {}, {}
        for key, value in state_dict.items():
            if key.startswith("student."):
                student[key.removeprefix("student.")] = value
            elif key.startswith("teacher."):
                if "singer_" in key:  # the frozen teacher's own weights are never written
                    adapters[key.removeprefix("teacher.")] = value
            else:
                heads[key] = value
        os.makedirs(output_dir, exist_ok=True)
        model.student.save_pretrained(output_dir, state_dict=student, safe_serialization=True)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        arguments = copy.copy(self.args)
        arguments.hub_token = None  # the pickled arguments would carry the token into every checkpoint
        torch.save(arguments, os.path.join(output_dir, TRAINING_ARGS_NAME))  # as Trainer._save does
        research_dir = os.path.join(output_dir, DISTILLATION_DIR)
        os.makedirs(research_dir, exist_ok=True)
        if isinstance(model.teacher, peft.PeftModel):
            model.teacher.save_pretrained(research_dir, state_dict=adapters)
        save_file({k: v.contiguous() for k, v in heads.items()}, os.path.join(research_dir, HEADS_FILE))
        summary = {
            **model.config.to_dict(),
            "teacher_layers": model.teacher_layers,
            "student_layers": model.student_layers,
        }
        with open(os.path.join(research_dir, CONFIG_FILE), "w") as file:
            json.dump(summary, file, indent=2)
        with open(os.path.join(research_dir, "README.md"), "w") as file:  # replaces PEFT's blank card
            file.write(_research_readme(model))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Load a checkpoint written by `_save` into the (possibly wrapped or sharded) model.

        The saved parts are assembled into one full state dict and handed to torch's
        `set_model_state_dict`, which loads into plain, DDP and FSDP2-sharded modules alike.
        """
        model: DistillationModel = self.accelerator.unwrap_model(model or self.model)
        if not os.path.isfile(os.path.join(resume_from_checkpoint, "config.json")):
            raise ValueError(f"resume_from_checkpoint: {resume_from_checkpoint} holds no saved student (config.json)")
        # save_pretrained may write the Hub's key layout; from_pretrained is what maps it back.
        saved_student = type(model.student).from_pretrained(resume_from_checkpoint, use_safetensors=True)
        expected = {key.removeprefix("student.") for key in model.state_dict() if key.startswith("student.")}
        student = {key: value for key, value in saved_student.state_dict().items() if key in expected}
        if missing := sorted(expected - set(student)):
            raise ValueError(f"resume_from_checkpoint: the saved student lacks {missing[:5]}")
        full = {f"student.{key}": value for key, value in student.items()}
        research_dir = os.path.join(resume_from_checkpoint, DISTILLATION_DIR)
        if isinstance(model.teacher, peft.PeftModel):
            adapter_name = model.teacher.active_adapter
            for key, value in peft.utils.load_peft_weights(research_dir).items():
                full[f"teacher.{key}.{adapter_name}"] = value  # PEFT saves keys without the adapter name
        full.update(load_file(os.path.join(research_dir, HEADS_FILE)))
        trainable = {key for key, parameter in model.named_parameters() if parameter.requires_grad}
        trainable |= {key for key, _ in model.named_buffers() if not key.startswith("teacher.")}
        missing = sorted(trainable - set(full))
        unexpected = sorted(set(full) - set(model.state_dict()))
        if missing or unexpected:
            raise ValueError(
                f"resume_from_checkpoint: {resume_from_checkpoint} does not match the model "
                f"(missing {missing[:5]}, unexpected {unexpected[:5]})"
            )
        set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, strict=False))


def _research_readme(model: DistillationModel) -> str:
    pairs = ", ".join(f"teacher block {t} → student block {s}" for t, s in zip(model.teacher_layers, model.student_layers))
    lines = [
        "# Distillation artefacts",
        "",
        f"What trained beside the student with `{model.config.method}` ({pairs}); the student itself is the folder above.",
        "",
        f"- `{CONFIG_FILE}`: the method's settings and the teacher → student block mapping.",
        f"- `{HEADS_FILE}`: the projectors (student width → teacher width) and any method heads.",
    ]
    if isinstance(model.teacher, peft.PeftModel):
        lines += [
            "- `adapter_config.json`, `adapter_model.safetensors`: the teacher's SiNGER adapters, a PEFT adapter:",
            "",
            "```python",
            "import peft, singer_hf  # importing singer_hf registers the SINGER PEFT type",
            "teacher = peft.PeftModel.from_pretrained(teacher, \"<this folder>\")  # the same teacher as in training",
            "```",
        ]
    return "\n".join(lines) + "\n"
