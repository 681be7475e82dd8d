"""`SingerTrainer`: a `transformers.Trainer` for `DistillationModel`, and its arguments."""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import threading
from dataclasses import dataclass, field

import datasets
import peft
import torch
from accelerate.utils import DynamoBackend, TorchDynamoPlugin, is_torchdata_stateful_dataloader_available
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from transformers import ProgressCallback, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints
from transformers.utils import logging

from .architectures import load_pretrained
from .checkpoints import STAGING_PREFIX, check_fingerprint, publish_adapter_files, resolve_checkpoint, write_fingerprint
from .data import PixelNormalizer, image_processor_stats
from .modeling import DistillationConfig, DistillationModel
from .numerics import NonFiniteGuard, NonFiniteLossError
from .validation import DistillationFields, check_training_arguments

logger = logging.get_logger(__name__)

DISTILLATION_DIR = "distillation"
"""Subfolder of a saved student holding the research artefacts: adapters (PEFT format), projectors."""
HEADS_FILE = "heads.safetensors"
CONFIG_FILE = "distillation_config.json"
STREAM_STATE_FILE = "stream_state_rank{}.pt"
"""A checkpoint's streamed-data position (the stateful DataLoader's state), one per process."""


@dataclass
class ReliabilityFields:
    """How a run protects its results (see `checkpoints.py`)."""

    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Replace a non-empty output_dir (its checkpoints and adapters are removed)."}
    )
    max_nonfinite_steps: int = field(
        default=10, metadata={"help": "Stop after this many consecutive skipped steps with a non-finite loss (0: at the first)."}
    )


@dataclass
class SingerTrainingArguments(TrainingArguments, DistillationFields, ReliabilityFields):
    """`TrainingArguments` plus the distillation method's fields (`validation.DistillationFields`).

    Defaults follow the paper run (SPEC §6): AdamW, lr 1e-3, weight decay 1e-4, cosine decay to
    lr·1e-4 after a 5 % warm-up, no gradient clipping.
    """

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
    ddp_find_unused_parameters: bool | None = field(
        default=False,
        metadata={
            "help": "DDP's find_unused_parameters. Off: DistillationModel freezes the student parameters no loss reaches, "
            "so every trainable parameter gets a gradient at every step and DDP need not search the graph for unused ones."
        },
    )
    logging_nan_inf_filter: bool = field(
        default=False, metadata={"help": "Off: it costs a host sync per step; SingerTrainer skips non-finite steps itself."}
    )

    def __post_init__(self):
        self.check_distillation_fields()  # before TrainingArguments' own set-up, which may touch the device
        check_training_arguments(self)
        # On a machine without an accelerator, train on the CPU: the recipes' bf16 then runs as CPU
        # autocast instead of failing, and processes started by torchrun / `accelerate launch` join as
        # CPU ranks over gloo instead of each training alone and writing the output.
        if not has_accelerator():
            self.use_cpu = True
        super().__post_init__()
        if not self.use_cpu and self.dataloader_pin_memory:
            # Performance (issue 9): pinned batches are copied to the accelerator without stalling
            # the host at every step (the caching host allocator keeps a pinned buffer until its copy is done).
            self.accelerator_config.non_blocking = True

    def distillation_config(self) -> DistillationConfig:
        return DistillationConfig(**self.distillation_values())


class EpochCallback(TrainerCallback):
    """Tells `target.set_epoch` (e.g. a seeded `ImageTransform`) the epoch, also when a run resumes mid-epoch."""

    def __init__(self, target):
        self.target = target

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.target.set_epoch(int(state.epoch or 0))


class _RunControlCallback(TrainerCallback):
    def __init__(self, trainer: "SingerTrainer"):
        self.trainer = trainer

    def on_step_begin(self, args, state, control, **kwargs):
        self.trainer._restore_rng()

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer._stop_if_preempted(state, control)


def has_accelerator() -> bool:
    """Whether torch sees an accelerator (GPU, XPU, MPS, ...); without one, the scripts run their processes as CPU ranks."""
    accelerator = getattr(torch, "accelerator", None)
    return accelerator.is_available() if accelerator is not None else torch.cuda.is_available()


class SingerTrainer(Trainer):
    """Trains a `DistillationModel`; saves the student as a plain Hugging Face model.

    - Each loss term is logged as `loss_<name>` (e.g. `loss_kd`, `loss_outlier`, `loss_info`),
      averaged over the logging interval and the processes, with one host sync per log, not per step;
      `skipped_images` counts the undecodable images dropped so far (all processes), in each log and
      the final metrics, with one warning per logging interval in which some were dropped.
      `evaluate()` reports `eval_loss` and `eval_loss_<name>` the same way.
    - `args.push_to_hub` does not make the Trainer push (see `singer_hf.publishing`).
    - `save_model` writes the student (config, safetensors, image processor) at the top of the
      folder, so `AutoModel.from_pretrained` loads it without this package; the adapters (PEFT
      format), projectors and distillation config go to `distillation/`. The teacher is never saved.
    - uint8 `pixel_values` (what `scripts/distill.py`'s workers ship) are normalised on the device with
      the image processor's mean and std; `--torch_compile` compiles each teacher and student block
      (`DistillationModel.compile_blocks`), never the whole model.
    - Faults: a step with a non-finite loss or gradient is skipped on the device (`numerics.py`);
      checkpoints are written under a temporary name and renamed when complete, with a fingerprint
      that resuming checks (`checkpoints.py`); SIGTERM saves a checkpoint and stops (`preempted`).
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
        if self._block_compile_kwargs is not None:  # after the cast: compiled for the dtype the blocks train in
            model.compile_blocks(**self._block_compile_kwargs)
        self._loss_sums: dict[str, dict[str, torch.Tensor]] = {"train": {}, "eval": {}}
        self._loss_steps = {"train": 0, "eval": 0}
        self._nonfinite = NonFiniteGuard(args.max_nonfinite_steps)
        self.preempted, self._sigterm_received = False, False
        self.add_callback(_RunControlCallback(self))
        # A stream resumes from its saved position instead of being read again up to it (see train()).
        self._resume_stream = isinstance(self.train_dataset, datasets.IterableDataset) and is_torchdata_stateful_dataloader_available()
        if self._resume_stream:
            self.accelerator.dataloader_config.use_stateful_dataloader = True
        self._stream_state, self._rng_checkpoint = None, None
        self._pixel_normalizer = None
        self._skipped_reported = (0, 0)  # undecodable images reported so far, and the step of that report

    def _build_accelerator_args(self, **kwargs) -> dict:
        """`--torch_compile` (or an Accelerate config's dynamo backend) compiles each teacher and student
        block in place (`DistillationModel.compile_blocks`, called in __init__) with the same backend and
        mode, instead of Accelerate compiling the whole model, whose graph breaks at the PEFT wrappers,
        the block loop and the losses, and whose compiled wrapper the model's cached blocks would bypass."""
        args = super()._build_accelerator_args(**kwargs)
        plugin = args.get("dynamo_plugin") or TorchDynamoPlugin()
        self._block_compile_kwargs = plugin.to_kwargs() if plugin.backend != DynamoBackend.NO else None
        args["dynamo_plugin"] = TorchDynamoPlugin(backend="no")
        return args

    def _accumulate(self, phase: str, losses: dict[str, torch.Tensor]) -> None:
        sums = self._loss_sums[phase]
        for name, value in losses.items():
            value = value.detach()
            if phase == "train":  # a skipped non-finite step counts 0 (see create_optimizer)
                value = torch.nan_to_num(value, nan=0.0, posinf=0.0, neginf=0.0)
            sums[name] = value if name not in sums else sums[name] + value
        self._loss_steps[phase] += 1

    def _prepare_inputs(self, inputs: dict) -> dict:
        """The batch on the device; uint8 pixels (what the workers ship, `build_transforms(normalize=False)`)
        normalised there with the image processor's mean and std."""
        inputs = super()._prepare_inputs(inputs)
        pixel_values = inputs.get("pixel_values")
        if isinstance(pixel_values, torch.Tensor) and pixel_values.dtype == torch.uint8:
            if self._pixel_normalizer is None:
                if self.processing_class is None:
                    raise ValueError("processing_class: uint8 pixel_values are normalised with its mean and std; pass the image processor")
                self._pixel_normalizer = PixelNormalizer(*image_processor_stats(self.processing_class)[:2])
            inputs["pixel_values"] = self._pixel_normalizer(pixel_values)
        return inputs

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        if model.training:
            self._nonfinite.observe(outputs.losses, outputs.loss)
            self._accumulate("train", outputs.losses)
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """The distillation loss on a batch (there are no labels or logits to return)."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            outputs = model(**inputs)
        self._accumulate("eval", outputs.losses)
        return outputs.loss.detach(), None, None

    def training_step(self, model, inputs, num_items_in_batch=None):
        # A non-finite step is skipped (see create_optimizer); its loss must not poison the logged running sum.
        loss = super().training_step(model, inputs, num_items_in_batch)
        return torch.nan_to_num(loss, nan=0.0, posinf=0.0, neginf=0.0)

    def create_optimizer(self, model=None):
        """The usual optimizer, its step skipped on the device when the step's loss or gradients are non-finite."""
        optimizer = super().create_optimizer(model)
        if not getattr(optimizer, "_singer_guarded", False):
            step = optimizer.step
            optimizer.step = lambda closure=None: self._nonfinite.guarded_step(
                step, optimizer, self.state.global_step + 1, closure
            )
            optimizer._singer_guarded = True
        return optimizer

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # Mutating `logs` in place also puts the terms into the metrics that `evaluate()` returns.
        collator_counts = hasattr(self.data_collator, "skipped") and hasattr(self.data_collator, "seen")
        if "train_runtime" in logs and collator_counts:  # the end of training: the final metrics get the total
            totals = self.accelerator.reduce(self._image_counts(self.args.device), reduction="sum").tolist()
            self._report_skipped(logs, *totals)
            return super().log(logs, start_time)
        eval_loss = next((key for key in logs if key.endswith("_loss")), None)
        phase, prefix = ("train", "loss") if "loss" in logs else ("eval", eval_loss)
        if prefix is not None and self._loss_sums[phase]:
            sums = self._loss_sums[phase]
            names = list(sums)
            values = [sums[name] for name in names]
            counts = collator_counts and phase == "train"
            if counts:  # undecodable and collated images so far, this process
                values += list(self._image_counts(values[0].device))
            totals = self.accelerator.reduce(torch.stack(values), reduction="sum").tolist()  # the one host sync
            for name, total in zip(names, totals):
                logs[f"{prefix}_{name}"] = total / (self._loss_steps[phase] * self.accelerator.num_processes)
            if counts:
                self._report_skipped(logs, *totals[-2:])
            self._loss_sums[phase], self._loss_steps[phase] = {}, 0
            skipped_steps = self._nonfinite.report() if phase == "train" else 0
            if skipped_steps:
                logs["nonfinite_steps"] = skipped_steps
        super().log(logs, start_time)

    def _image_counts(self, device) -> torch.Tensor:
        return torch.tensor([float(self.data_collator.skipped), float(self.data_collator.seen)], device=device)

    def _report_skipped(self, logs: dict, skipped: float, seen: float) -> None:
        """`skipped_images` into `logs`, and one warning for the images dropped since the last report."""
        skipped, seen = int(skipped), int(seen)
        logs["skipped_images"] = skipped
        reported, since = self._skipped_reported
        if skipped > reported:
            logger.warning(
                "skipped_images: %d undecodable image(s) dropped in steps %d–%d (%s of the %s examples read so far, %.1f %%)",
                skipped - reported, since + 1, self.state.global_step, f"{skipped:,}", f"{seen:,}", 100 * skipped / max(seen, 1),
            )  # fmt: skip
        self._skipped_reported = (skipped, self.state.global_step)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Refuses to write (or push) a student with non-finite weights."""
        student = self.accelerator.unwrap_model(self.model).student
        broken = [name for name, value in student.state_dict().items() if value.is_floating_point() and not torch.isfinite(value).all()]
        if broken:
            raise NonFiniteLossError(f"student: non-finite weights in {broken[:3]}; not saved (the last checkpoint is intact)")
        super().save_model(output_dir, _internal_call)

    # -- saving and resuming -----------------------------------------------------------------------
    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        """`Trainer.train`, resuming only from a complete checkpoint written by this configuration.

        SIGTERM (a pre-emption) stops training after the current step with a checkpoint; `preempted`
        is then True and the caller should exit without treating the student as finished.
        """
        checkpoint = resolve_checkpoint(resume_from_checkpoint, self.args.output_dir)
        if checkpoint is not None:
            check_fingerprint(self.accelerator.unwrap_model(self.model), checkpoint)
            stream_state = os.path.join(checkpoint, STREAM_STATE_FILE.format(self.args.process_index))
            if self._resume_stream and os.path.isfile(stream_state):
                # The DataLoader continues from here (get_train_dataloader), so the Trainer must not skip
                # batches by reading them; it then also leaves the RNG state to us (_restore_rng).
                self._stream_state = torch.load(stream_state, weights_only=True)
                self._rng_checkpoint = checkpoint
                self.args.ignore_data_skip = True
        self.preempted, self._sigterm_received = False, False
        handles_signals = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, self._on_sigterm) if handles_signals else None
        try:
            return super().train(resume_from_checkpoint=checkpoint, **kwargs)
        except BaseException:
            self._close_progress_bars()
            raise
        finally:
            if handles_signals:
                signal.signal(signal.SIGTERM, previous)

    def _close_progress_bars(self) -> None:
        """Closes the progress bars of a run that failed, before its error is printed: left open, a bar is
        closed (and drawn once more) when the interpreter exits, after the error message."""
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, ProgressCallback):
                for name in ("training_bar", "prediction_bar"):
                    if getattr(callback, name, None) is not None:
                        getattr(callback, name).close()
                        setattr(callback, name, None)

    def get_train_dataloader(self):
        dataloader = super().get_train_dataloader()
        if self._stream_state is not None:
            dataloader.load_state_dict(self._stream_state)
            self._stream_state = None
        return dataloader

    def _restore_rng(self) -> None:
        """The checkpoint's RNG state, at the point the Trainer itself would restore it (after the first fetch)."""
        if self._rng_checkpoint is not None:
            self._load_rng_state(self._rng_checkpoint)
            self._rng_checkpoint = None

    def _on_sigterm(self, signum, frame) -> None:
        logger.warning("SIGTERM: writing a checkpoint after this step, then stopping")
        self._sigterm_received = True

    def _stop_if_preempted(self, state, control) -> None:
        """On SIGTERM: save and stop at this step's end. With several processes the ranks agree on it at each log
        step (a collective per step would cost a host sync), so a signal reaching one rank only is acted on there."""
        received = self._sigterm_received
        if self.accelerator.num_processes > 1:
            if state.global_step % max(int(self.args.logging_steps), 1):
                return
            flag = torch.tensor(float(received), device=self.accelerator.device)
            received = bool(self.accelerator.reduce(flag, reduction="sum").item())
        if received:
            control.should_save = control.should_training_stop = True
            self.preempted = True

    def _save_checkpoint(self, model, trial) -> None:
        """Writes `checkpoint-N` under a temporary name and renames it when every process is done with it,
        so a kill during the write leaves the previous checkpoints intact and nothing half-written named `checkpoint-*`."""
        run_dir = self._get_output_dir(trial=trial)
        final = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        staging = os.path.join(run_dir, f"{STAGING_PREFIX}{self.state.global_step}")
        if self.args.should_save and os.path.isdir(staging):
            shutil.rmtree(staging)  # left by a run killed while writing
        self.accelerator.wait_for_everyone()
        self._staging_dir = staging
        try:
            super()._save_checkpoint(model, trial)  # writes into staging/checkpoint-N (see _get_output_dir)
        finally:
            self._staging_dir = None
        if self.args.should_save:
            write_fingerprint(self.accelerator.unwrap_model(model), os.path.join(staging, os.path.basename(final)))
        dataloader = self.callback_handler.train_dataloader
        if self._resume_stream and hasattr(dataloader, "state_dict"):
            os.makedirs(os.path.join(staging, os.path.basename(final)), exist_ok=True)
            state_file = STREAM_STATE_FILE.format(self.args.process_index)
            torch.save(dataloader.state_dict(), os.path.join(staging, os.path.basename(final), state_file))
        self.accelerator.wait_for_everyone()  # every rank's RNG state is in
        if self.args.should_save:
            if os.path.isdir(final):
                shutil.rmtree(final)  # the same step saved again (e.g. a SIGTERM checkpoint at a save step)
            os.replace(os.path.join(staging, os.path.basename(final)), final)
            shutil.rmtree(staging)
            rotate_checkpoints(run_dir, self.args.save_total_limit, self.state.best_model_checkpoint, use_mtime=True)
        self.accelerator.wait_for_everyone()

    def _get_output_dir(self, trial) -> str:
        staging = getattr(self, "_staging_dir", None)
        return staging if staging is not None else super()._get_output_dir(trial)

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
            publish_adapter_files(research_dir, model.teacher.peft_config[model.teacher.active_adapter].base_model_name_or_path)
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
        saved_student = load_pretrained(type(model.student), resume_from_checkpoint, use_safetensors=True)
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
