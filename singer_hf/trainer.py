"""`SingerTrainer`: a `transformers.Trainer` for `DistillationModel`, and its arguments."""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import threading
from dataclasses import dataclass
from pathlib import Path

import datasets
import peft
import torch
from accelerate.utils import DynamoBackend, TorchDynamoPlugin, is_torchdata_stateful_dataloader_available
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints
from transformers.utils import logging

from .checkpoints import STAGING_PREFIX, check_fingerprint, publish_adapter_files, resolve_checkpoint, write_fingerprint
from .data import PixelNormalizer, image_processor_stats
from .modeling import DistillationConfig, DistillationModel
from .numerics import NonFiniteGuard, NonFiniteLossError
from .validation import DistillationFields, ReliabilityFields, TrainingDefaults, check_training_arguments

logger = logging.get_logger(__name__)

DISTILLATION_DIR = "distillation"
"""Subfolder of a saved student holding the research artefacts: adapters (PEFT format), projectors."""
HEADS_FILE = "heads.safetensors"
CONFIG_FILE = "distillation_config.json"
STREAM_STATE_FILE = "stream_state_rank{}.pt"
"""A checkpoint's streamed-data position (the stateful DataLoader's state), one per process."""
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
"""Signals that make `SingerTrainer.train` write a checkpoint after the current step and stop."""


@dataclass
class SingerTrainingArguments(TrainingDefaults, TrainingArguments, DistillationFields, ReliabilityFields):
    """`TrainingArguments` with a distillation run's defaults (`validation.TrainingDefaults`: the paper's
    optimiser), the distillation method's fields (`validation.DistillationFields`) and `ReliabilityFields`."""

    _argument_group_name = "training (transformers.TrainingArguments and the distillation fields)"

    def __post_init__(self):
        self.check_distillation_fields()  # before TrainingArguments' own set-up, which may touch the device
        check_training_arguments(self)
        self._fit_to_hardware()
        super().__post_init__()
        if not self.use_cpu and self.dataloader_pin_memory:
            # Performance (issue 9): pinned batches are copied to the accelerator without stalling
            # the host at every step (the caching host allocator keeps a pinned buffer until its copy is done).
            self.accelerator_config.non_blocking = True

    def distillation_config(self) -> DistillationConfig:
        return DistillationConfig(**self.distillation_values())

    def _fit_to_hardware(self) -> None:
        """A recipe written for GPUs runs as well as it can on the machine at hand, saying what it changed.

        - No accelerator: train on the CPU, so that processes started by torchrun / `accelerate launch`
          join as CPU ranks over gloo instead of each training alone and writing the output.
        - bf16 on a CPU without native bf16 (x86 `amx_bf16` / `avx512_bf16`, Arm `bf16`): fp32. Emulated
          bf16 autocast runs ~10x slower than fp32 there; like a Trainer that picks the precision the
          device supports, the run trains rather than crawls (bf16 stays on where the CPU has it).
        - More DataLoader workers than the CPU cores this process may use (`os.sched_getaffinity`):
          one per core. Decoding is CPU-bound; more workers only compete for the same cores.
        """
        if not _has_accelerator():
            self.use_cpu = True
        if self.use_cpu and self.bf16 and native_cpu_bf16() is False:
            logger.warning(
                "bf16: this CPU has no native bf16 (no %s in /proc/cpuinfo), where bf16 runs ~10x slower than fp32; "
                "training in fp32", " / ".join(CPU_BF16_FLAGS),
            )  # fmt: skip
            self.bf16 = False
        cores = usable_cores()
        if self.dataloader_num_workers > cores:
            logger.warning(
                "dataloader_num_workers: %d, but this process may use %d CPU core(s) (os.sched_getaffinity); using %d",
                self.dataloader_num_workers, cores, cores,
            )  # fmt: skip
            self.dataloader_num_workers = cores


class EpochCallback(TrainerCallback):
    """Tells `target.set_epoch` (e.g. a seeded `ImageTransform`) the epoch, also when a run resumes mid-epoch."""

    def __init__(self, target):
        self.target = target

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.target.set_epoch(int(state.epoch or 0))


class _RunControlCallback(TrainerCallback):
    def __init__(self, trainer: "SingerTrainer"):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer._begin_resumed(state)

    def on_step_begin(self, args, state, control, **kwargs):
        self.trainer._restore_rng()

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer._continue_epoch(state)
        self.trainer._stop_if_preempted(state, control)


def _has_accelerator() -> bool:
    accelerator = getattr(torch, "accelerator", None)
    return accelerator.is_available() if accelerator is not None else torch.cuda.is_available()


CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16", "bf16")
"""/proc/cpuinfo flags of native bf16 arithmetic: x86 AMX and AVX512-BF16, Arm's BF16 extension."""


def native_cpu_bf16() -> bool | None:
    """Whether this CPU computes in bf16 natively, from /proc/cpuinfo; None where there is none to read."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    flags = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86, Arm
            flags.update(value.split())
    return bool(flags & set(CPU_BF16_FLAGS))


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask: a container's or a job scheduler's share)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


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
    - uint8 `pixel_values` (what `scripts/distill.py`'s workers ship) are normalised on the device with
      the image processor's mean and std; `--torch_compile` compiles each teacher and student block
      (`DistillationModel.compile_blocks`), never the whole model.
    - Faults: a step with a non-finite loss or gradient is skipped on the device (`numerics.py`);
      checkpoints are written under a temporary name and renamed when complete, with a fingerprint
      that resuming checks (`checkpoints.py`); SIGTERM and Ctrl-C (SIGINT) save a checkpoint after the
      current step and stop (`preempted`, `stop_signal`); a second Ctrl-C stops at once.
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
            logger.debug("push_to_hub: the Trainer's own push is off; publish with singer_hf.publishing.publish_student")
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
        self.preempted, self.stop_signal, self._signal_received = False, None, None
        self._resumed_from, self._stream_resumed, self._epoch_offset, self._resumed_epoch = None, False, 0.0, 0
        self.add_callback(_RunControlCallback(self))
        # A stream resumes from its saved position instead of being read again up to it (see train()).
        self._resume_stream = isinstance(self.train_dataset, datasets.IterableDataset) and is_torchdata_stateful_dataloader_available()
        if self._resume_stream:
            self.accelerator.dataloader_config.use_stateful_dataloader = True
        self._stream_state, self._rng_checkpoint = None, None
        self._pixel_normalizer = None

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
            skipped_steps = self._nonfinite.report() if phase == "train" else 0
            if skipped_steps:
                logs["nonfinite_steps"] = skipped_steps
        super().log(logs, start_time)

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

        SIGTERM (a pre-emption) or Ctrl-C (SIGINT) stops training after the current step with a checkpoint;
        `preempted` is then True, `stop_signal` names the signal, and the caller should exit without treating
        the student as finished. A second Ctrl-C raises KeyboardInterrupt at once, without the checkpoint.
        """
        checkpoint = resolve_checkpoint(resume_from_checkpoint, self.args.output_dir)
        self._stream_resumed, self._epoch_offset = False, 0.0
        if checkpoint is not None:
            check_fingerprint(self.accelerator.unwrap_model(self.model), checkpoint)
            stream_state = os.path.join(checkpoint, STREAM_STATE_FILE.format(self.args.process_index))
            if self._resume_stream and os.path.isfile(stream_state):
                # The DataLoader continues from here (get_train_dataloader), so the Trainer must not skip
                # batches by reading them; it then also leaves the RNG state to us (_restore_rng).
                self._stream_state = torch.load(stream_state, weights_only=True)
                self._rng_checkpoint = checkpoint
                self.args.ignore_data_skip = True
                self._stream_resumed = True
        self._resumed_from = checkpoint
        self.preempted, self.stop_signal, self._signal_received = False, None, None
        self._signal_pid = os.getpid()
        handles_signals = threading.current_thread() is threading.main_thread()
        previous = {number: signal.signal(number, self._on_stop_signal) for number in STOP_SIGNALS} if handles_signals else {}
        try:
            return super().train(resume_from_checkpoint=checkpoint, **kwargs)
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)

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

    def _begin_resumed(self, state) -> None:
        """Says where a resumed run continues. A stream resumed from its saved position is not read again up
        to it, so the Trainer counts this epoch's steps from 0: `_continue_epoch` adds those done before."""
        if self._resumed_from is None:
            return
        logger.info("resuming from %s (step %d of %d)", os.path.basename(self._resumed_from), state.global_step, state.max_steps)
        if self._stream_resumed:  # an unsized stream's epoch is max_steps steps long
            self._resumed_epoch = state.global_step // state.max_steps
            self._epoch_offset = (state.global_step % state.max_steps) / state.max_steps

    def _continue_epoch(self, state) -> None:
        """The true epoch in the epoch a stream resumed in (see `_begin_resumed`), also in the logs and checkpoints."""
        if self._epoch_offset and int(state.epoch) == self._resumed_epoch:
            state.epoch += self._epoch_offset

    def _on_stop_signal(self, signum, frame) -> None:
        if os.getpid() != self._signal_pid:
            return  # a DataLoader worker forked from this process: the training process saves and stops
        if self._signal_received is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt  # a second Ctrl-C: stop now, without the checkpoint
            return
        self._signal_received = signum
        again = " (Ctrl-C again: stop now, without it)" if signum == signal.SIGINT else ""
        logger.warning("%s: writing a checkpoint after this step, then stopping%s", signal.Signals(signum).name, again)

    def _stop_if_preempted(self, state, control) -> None:
        """On SIGTERM or SIGINT: save and stop at this step's end. With several processes the ranks agree on it at
        each log step (a collective per step would cost a host sync), so a signal reaching one rank only is acted on there."""
        received = self._signal_received is not None
        if self.accelerator.num_processes > 1:
            if state.global_step % max(int(self.args.logging_steps), 1):
                return
            flag = torch.tensor(float(received), device=self.accelerator.device)
            received = bool(self.accelerator.reduce(flag, reduction="sum").item())
        if received:
            control.should_save = control.should_training_stop = True
            self.preempted = True
            # a signal to another rank only: named SIGTERM, what schedulers send (Ctrl-C reaches every rank)
            self.stop_signal = signal.Signals(self._signal_received or signal.SIGTERM).name

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
