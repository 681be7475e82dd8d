"""`FeatureDistillationTrainer`: a `transformers.Trainer` for `DistillationModel`, and its arguments."""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
from accelerate.utils import DynamoBackend, TorchDynamoPlugin, is_torchdata_stateful_dataloader_available
from transformers import PrinterCallback, ProgressCallback, Trainer, TrainingArguments
from transformers.utils import logging

from .artifact_report import write_artifact_files
from .callbacks import (
    CheckpointCallback,
    ConsolePrinterCallback,
    ConsoleProgressCallback,
    PreemptionCallback,
    ResumedEpochCallback,
    StudentClippingCallback,
)
from . import hardware
from .architectures import resolve_vit
from .checks import check_fields, check_value, integer_at_least, number_above, number_at_least
from .checkpoints import check_fingerprint, remove_incomplete_checkpoints, resolve_checkpoint
from .data import PixelNormalizer, image_processor_stats
from .layout import ARTIFACTS_DIR, STREAM_STATE_FILE, export_students, student_dir
from .fields import MethodFields, RunFields, TrainingDefaults
from .methods import get_method
from .model_card import record_run, student_card_from_run
from .modeling import DEFAULT_NAME, DistillationModel, DistillationModelConfig
from .numerics import NonFiniteGuard
from .publishing import publish_student

logger = logging.get_logger(__name__)

TARGET_NORMALIZATION_BATCHES = 16
"""Training batches (per process) the teachers' target-normalisation statistics are estimated from
before a fresh run (`TeacherSettings.normalization`): at batch 64 and 196 tokens per image, ~200,000
tokens per process, ample for a covariance of width 1024."""


# `TrainingArguments` fields a distillation run needs in range; transformers checks some of them only
# when they are used (a batch size of 0 fails inside the DataLoader), so they are checked up front.
TRAINING_CHECKS = {
    "per_device_train_batch_size": integer_at_least(1),
    "gradient_accumulation_steps": integer_at_least(1),
    "learning_rate": number_above(0),
    "weight_decay": number_at_least(0),
    "num_train_epochs": number_above(0),
    "max_steps": lambda value: None if isinstance(value, int) and (value > 0 or value == -1) else "must be > 0, or -1 to use num_train_epochs",
    "warmup_steps": number_at_least(0),
    "max_grad_norm": number_at_least(0, optional=True),
    "seed": integer_at_least(0),
    "dataloader_num_workers": integer_at_least(0),
    "hub_strategy": lambda value: None if str(getattr(value, "value", value)) == "end" else (
        "only 'end' is supported: checkpoints hold the trainable state, not a student; the finished student is published"
    ),
}


@dataclass
class FeatureDistillationArguments(TrainingDefaults, TrainingArguments, MethodFields, RunFields):
    """`TrainingArguments` with a distillation run's defaults (`fields.TrainingDefaults`: the paper's
    optimiser), the distillation method's fields (`fields.MethodFields`) and `fields.RunFields`.
    `max_grad_norm` > 0 clips each student on its own."""

    _argument_group_name = "training (transformers.TrainingArguments and the distillation fields)"

    def __post_init__(self):
        check_fields(self)  # before TrainingArguments' own set-up, which may touch the device
        for name, check in TRAINING_CHECKS.items():
            check_value(name, getattr(self, name), check)
        get_method(self.method)  # a registered method
        self._fit_to_hardware()
        super().__post_init__()
        if not self.use_cpu and self.dataloader_pin_memory:
            # Pinned batches are copied to the accelerator without stalling the host at every step
            # (the caching host allocator keeps a pinned buffer until its copy is done).
            self.accelerator_config.non_blocking = True

    def __getstate__(self) -> dict:
        """Pickled (the Trainer writes the arguments into every checkpoint) without the Hub token."""
        return {**self.__dict__, "hub_token": None}

    def __copy__(self):
        copied = object.__new__(type(self))
        copied.__dict__.update(self.__dict__)
        return copied

    def distillation_config(self) -> DistillationModelConfig:
        return DistillationModelConfig(**self.method_values())

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
        if not hardware.has_accelerator():
            self.use_cpu = True
        if self.use_cpu and self.bf16 and hardware.native_cpu_bf16() is False:
            logger.warning(
                "bf16: this CPU has no native bf16 (no %s in /proc/cpuinfo), where bf16 runs ~10x slower than fp32; "
                "training in fp32", " / ".join(hardware.CPU_BF16_FLAGS),
            )  # fmt: skip
            self.bf16 = False
        cores = hardware.usable_cores()
        if self.dataloader_num_workers > cores:
            logger.warning(
                "dataloader_num_workers: %d, but this process may use %d CPU core(s) (os.sched_getaffinity); using %d",
                self.dataloader_num_workers, cores, cores,
            )  # fmt: skip
            self.dataloader_num_workers = cores


class FeatureDistillationTrainer(Trainer):
    """Trains a `DistillationModel` (any method, one or several students and teachers) through the
    Trainer's public hooks; exports each student as a plain Hugging Face model.

    - Logs: each loss term as `loss_<term>` (`loss_kd`, ...), or `loss/<student>/<term>` with several
      students or teachers, and (`artifact_stats`) the artifact statistics of the features the step
      compared as `artifacts/<view>/<layer>/<stat>` (`DistillationOutput.artifacts`), averaged over
      the logging interval and the processes with one host sync per log; `skipped_images` counts the
      undecodable images dropped so far (all processes), in each log and the final metrics, with one
      warning per logging interval in which some were dropped.
      `evaluate()` reports `eval_loss` and `eval_loss_<term>` the same way.
    - Checkpoints are the Trainer's own (the model's trainable state: `DistillationModel.state_dict`
      leaves the frozen teachers out), completed by `callbacks.CheckpointCallback`; resuming checks
      the run's fingerprint and continues a streamed dataset from its saved position.
    - `save_model()` exports each student (`layout.export_students`); `create_model_card()` writes the
      run record, the artifact statistics and figures (`write_artifact_report`) and the student
      cards; `push_to_hub()` publishes the students with their cards (`publishing.publish_student`).
      Checkpoints are never pushed (`hub_strategy` is "end").
    - Teachers whose KD targets are normalised (`TeacherSettings.normalization`) get their statistics
      at the start of a fresh run, from `TARGET_NORMALIZATION_BATCHES` training batches per process,
      summed over the processes (`fit_target_normalization`); a resumed run loads them from its checkpoint.
    - uint8 `pixel_values` (what `scripts/distill.py`'s workers ship) are normalised on the device with
      the image processor's mean and std; `--torch_compile` compiles each teacher and student block
      (`DistillationModel.compile_blocks`), never the whole model.
    - Faults: a step with a non-finite loss or gradient is skipped on the device (`numerics.py`);
      SIGTERM and Ctrl-C save a checkpoint and stop (`preempted`).
    """

    def __init__(self, model: DistillationModel, args: FeatureDistillationArguments, **kwargs):
        if not isinstance(model, DistillationModel):
            raise ValueError(f"model: FeatureDistillationTrainer trains a singer_hf.DistillationModel, got {type(model).__name__}")
        if args.load_best_model_at_end:
            raise ValueError(
                "load_best_model_at_end: not supported; the eval loss measures agreement with the teacher, not the "
                "student's quality (probe the saved checkpoints instead)"
            )
        if not isinstance(args, FeatureDistillationArguments):
            raise ValueError(f"args: FeatureDistillationTrainer takes FeatureDistillationArguments, got {type(args).__name__}")
        # The one unnamed student's settings are the arguments' own; named students carry their own.
        if list(model.configs) == [DEFAULT_NAME] and len(model.teachers) == 1 and args.distillation_config() != model.config:
            ours, theirs = args.distillation_config().to_dict(), model.config.to_dict()
            differences = [f"{key} {theirs[key]!r} (model) vs {ours[key]!r} (arguments)" for key in ours if ours[key] != theirs[key]]
            raise ValueError(f"args: the model was built with other distillation settings than the arguments: {'; '.join(differences)}")
        # Clipping, checkpoint rotation and publishing are this trainer's (per student; after a checkpoint
        # is complete; `push_to_hub`): the Trainer gets a copy of the arguments without them, and the run
        # is recorded with the originals.
        self.run_arguments = args
        self._save_total_limit = args.save_total_limit
        clipping = args.max_grad_norm
        args = copy.copy(args)
        args.max_grad_norm, args.save_total_limit, args.push_to_hub = 0.0, None, False
        super().__init__(model=model, args=args, **kwargs)
        # `--torch_compile` (or an Accelerate config's dynamo backend) compiles each block in place with
        # the same backend and mode, instead of Accelerate compiling the whole model, whose graph
        # breaks at the PEFT wrappers, the block loop and the losses.
        plugin = self.accelerator.state.dynamo_plugin
        if plugin.backend != DynamoBackend.NO:
            self.accelerator.state.dynamo_plugin = TorchDynamoPlugin(backend="no")
        if args.bf16 and not self.is_fsdp_enabled:
            # The frozen teachers need no fp32 master weights, and autocast would re-cast them on every
            # step. FSDP shards expect one dtype, so it keeps fp32 there.
            model.cast_teacher(torch.bfloat16)
        if plugin.backend != DynamoBackend.NO:  # after the cast: compiled for the dtype the blocks train in
            model.compile_blocks(**plugin.to_kwargs())
        self._metrics: dict[str, dict[str, torch.Tensor]] = {"train": {}, "eval": {}}
        self._steps = {"train": 0, "eval": 0}
        self._nonfinite = NonFiniteGuard(args.max_nonfinite_steps)
        self._pixel_normalizer = None
        self._skipped_reported = (0, 0)  # undecodable images reported so far, and the step of that report
        self._preemption = PreemptionCallback(self)
        self.add_callback(self._preemption)
        self.add_callback(CheckpointCallback(self, self._save_total_limit))
        if clipping:
            self.add_callback(StudentClippingCallback(self, clipping))
        for default, console in ((ProgressCallback, ConsoleProgressCallback), (PrinterCallback, ConsolePrinterCallback)):
            if self.pop_callback(default) is not None:  # the console shows the losses; artifact statistics go to the loggers
                self.add_callback(console(hidden=f"{ARTIFACTS_DIR}/"))
        # A stream resumes from its saved position instead of being read again up to it (see train()).
        self.streams_resumable = isinstance(self.train_dataset, datasets.IterableDataset) and is_torchdata_stateful_dataloader_available()
        if self.streams_resumable:
            self.accelerator.dataloader_config.use_stateful_dataloader = True
        self._stream_state = None

    @property
    def preempted(self) -> str | None:
        """The signal that stopped the last `train()` early with a checkpoint ("SIGTERM", "SIGINT"), else None."""
        return self._preemption.signal_name

    # -- the step --------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = self._normalised(inputs)
        outputs = model(**inputs, artifact_stats=self.args.artifact_stats)
        mode = "train" if model.training else "eval"
        if mode == "train":
            self._nonfinite.observe(outputs.losses, outputs.loss)
        self.record_metrics(mode, {_log_key(term): value for term, value in outputs.losses.items()})
        if outputs.artifacts:
            self.record_metrics(mode, {f"{ARTIFACTS_DIR}/{key}": value for key, value in outputs.artifacts.items()})
        self._steps[mode] += 1
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def record_metrics(self, mode: str, values: dict[str, torch.Tensor]) -> None:
        """Adds device tensors to this logging interval's sums (averaged over the steps at the next log)."""
        sums = self._metrics[mode]
        for name, value in values.items():
            value = value.detach().float()
            if mode == "train":  # a skipped non-finite step counts 0 (see create_optimizer)
                value = torch.nan_to_num(value, nan=0.0, posinf=0.0, neginf=0.0)
            sums[name] = value if name not in sums else sums[name] + value

    def _normalised(self, inputs: dict) -> dict:
        """uint8 pixels (what the workers ship, `build_transforms(normalize=False)`) normalised on the
        device with the image processor's mean and std."""
        pixel_values = inputs.get("pixel_values")
        if isinstance(pixel_values, torch.Tensor) and pixel_values.dtype == torch.uint8:
            if self._pixel_normalizer is None:
                if self.processing_class is None:
                    raise ValueError("processing_class: uint8 pixel_values are normalised with its mean and std; pass the image processor")
                self._pixel_normalizer = PixelNormalizer(*image_processor_stats(self.processing_class)[:2])
            inputs = {**inputs, "pixel_values": self._pixel_normalizer(pixel_values)}
        return inputs

    def training_step(self, model, inputs, num_items_in_batch=None):
        # A non-finite step is skipped (see create_optimizer); its loss must not poison the logged running sum.
        loss = super().training_step(model, inputs, num_items_in_batch)
        return torch.nan_to_num(loss, nan=0.0, posinf=0.0, neginf=0.0)

    def create_optimizer(self, model=None):
        """The usual optimizer, its step skipped on the device when the step's loss or gradients are non-finite."""
        optimizer = super().create_optimizer(model)
        if not getattr(optimizer, "_singer_guarded", False):
            step = optimizer.step
            optimizer.step = lambda closure=None: self._nonfinite.guarded_step(step, optimizer, self.state.global_step + 1, closure)
            optimizer._singer_guarded = True
        return optimizer

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        counts_images = hasattr(self.data_collator, "skipped") and hasattr(self.data_collator, "seen")
        if "train_runtime" in logs and counts_images:  # the end of training: the final metrics get the total
            totals = self.accelerator.reduce(self._image_counts(self.args.device), reduction="sum").tolist()
            self._report_skipped(logs, *totals)
            return super().log(logs, start_time)
        mode = "train" if self.model.training else "eval"
        sums, steps = self._metrics[mode], self._steps[mode]
        if sums and steps:
            names = list(sums)
            values = [sums[name] for name in names]
            counts = counts_images and mode == "train"
            if counts:  # undecodable and collated images so far, this process
                values += list(self._image_counts(values[0].device))
            totals = self.accelerator.reduce(torch.stack(values), reduction="sum").tolist()  # the one host sync
            prefix = "eval_" if mode == "eval" else ""
            for name, total in zip(names, totals):
                logs[prefix + name] = total / (steps * self.accelerator.num_processes)
            if counts:
                self._report_skipped(logs, *totals[-2:])
            self._metrics[mode], self._steps[mode] = {}, 0
            skipped_steps = self._nonfinite.report() if mode == "train" else 0
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

    # -- resuming ----------------------------------------------------------------------------------
    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        """`Trainer.train`, resuming only from a complete checkpoint written by this configuration.

        SIGTERM or Ctrl-C stops training after the current step with a checkpoint; `preempted` then
        says which, and the caller should exit without treating the students as finished.
        """
        checkpoint = resolve_checkpoint(resume_from_checkpoint, self.args.output_dir)
        if checkpoint is not None:
            check_fingerprint(self.accelerator.unwrap_model(self.model), checkpoint)
            stream_state = Path(checkpoint, STREAM_STATE_FILE.format(self.args.process_index))
            if self.streams_resumable and stream_state.is_file():
                # The DataLoader continues from here (get_train_dataloader), so the Trainer must not skip
                # batches by reading them again.
                self._stream_state = torch.load(stream_state, weights_only=True)
                self.args.ignore_data_skip = True
        if checkpoint is None:
            self.fit_target_normalization()
        self.pop_callback(ResumedEpochCallback)
        self.add_callback(ResumedEpochCallback(checkpoint, self._stream_state is not None))
        if self.args.should_save:
            remove_incomplete_checkpoints(self.args.output_dir)  # a kill's leftovers are never mixed into a new checkpoint
        try:
            return super().train(resume_from_checkpoint=checkpoint, **kwargs)
        except BaseException:
            self._close_progress_bars()
            raise

    def fit_target_normalization(self, batches: int = TARGET_NORMALIZATION_BATCHES) -> None:
        """Fits the teachers' target normalisation still unfitted (`DistillationModel.fit_target_normalization`)
        on the first `batches` batches of a fresh training DataLoader, as `compute_loss` would see them,
        the moments summed over the processes. The random state is restored afterwards, so training
        reads the batches and draws the augmentations it would have without it."""
        model = self.accelerator.unwrap_model(self.model)
        if not model.needs_target_normalization:
            return
        reduce_sum = None
        if self.accelerator.num_processes > 1:
            reduce_sum = lambda tensor: self.accelerator.reduce(tensor.to(self.args.device), reduction="sum")  # noqa: E731
        with torch.random.fork_rng(devices=[]):
            dataloader = self.get_train_dataloader()
            on_device = ({key: value.to(self.args.device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}
                         for batch in itertools.islice(dataloader, batches))
            read = (self._normalised(batch) for batch in on_device)
            images = model.fit_target_normalization(read, reduce_sum)
        logger.info("target normalisation: statistics of %s estimated from %d images per process", sorted(model.target_normalizations), images)

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

    # -- results -----------------------------------------------------------------------------------
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """A checkpoint (`_internal_call`): the Trainer's own save of the trainable state. Otherwise:
        every student exported as a plain Hugging Face model folder (`layout.export_students`).
        Publishing is `push_to_hub()`'s."""
        if _internal_call:
            return super().save_model(output_dir, _internal_call=True)
        if self.args.should_save:
            model = self.accelerator.unwrap_model(self.model)
            export_students(model, output_dir or self.args.output_dir, self.processing_class)
        self.accelerator.wait_for_everyone()

    def student_folders(self, output_dir: str | None = None) -> list[Path]:
        model = self.accelerator.unwrap_model(self.model)
        return [student_dir(output_dir or self.args.output_dir, model, name) for name in model.students]

    def create_model_card(
        self,
        license: str | None = None,
        finetuned_from: str | dict[str, str] | None = None,
        dataset: str | None = None,
        students: dict[str, str] | None = None,
        **kwargs,
    ) -> None:
        """The run record and the card of each exported student (`model_card.student_card_from_run`):
        `finetuned_from` names the teacher (with several, each by its name in the model) and `dataset`
        the data (Hub ids or local paths, shown by name only), `students` describes each student by name
        (e.g. "ViT (4 blocks, width 64) from scratch")."""
        if not self.is_world_process_zero():
            return
        model = self.accelerator.unwrap_model(self.model)
        named = finetuned_from if isinstance(finetuned_from, dict) else {}
        teachers = {
            name: named.get(name) or (finetuned_from if isinstance(finetuned_from, str) else None)
            or getattr(resolve_vit(teacher).backbone.config, "_name_or_path", None) or name
            for name, teacher in model.teachers.items()
        }  # fmt: skip
        if self.run_arguments.artifact_stats:
            self.write_artifact_report()
        several = len(model.students) > 1
        for name, folder in zip(model.students, self.student_folders()):
            record_run(folder, teacher_name=teachers, dataset_name=dataset or "unknown", training_args=self.run_arguments,
                       student=(students or {}).get(name), group={"name": name, "students": list(model.students)} if several else None)  # fmt: skip
            student_card_from_run(folder, license=license)

    def write_artifact_report(self, num_images: int = 4) -> list[Path]:
        """Into each student folder's `artifacts/`: the final artifact statistics (the last logged
        training interval's, per distilled teacher block and view) as `artifact_stats.json`, and the
        patch-norm maps and norm histograms (`diagnostics`) of `num_images` fixed images, the first
        of the evaluation split if there is one, else of the training data (as its transform gives
        them). The card shows both. Returns the student folders written into.

        The figures need one process to run the whole model: under FSDP only the statistics are written."""
        model = self.accelerator.unwrap_model(self.model)
        evaluation = self.eval_dataset is not None
        source = f"the first {num_images} images of the {'evaluation split' if evaluation else 'training data (after its augmentation)'}"
        norms, shown = {}, None
        if self.is_fsdp_enabled:
            logger.warning("artifact_stats: no patch-norm figures under FSDP (one process cannot run the sharded model); statistics only")
        else:
            dataset = self.eval_dataset if evaluation else self.train_dataset
            if isinstance(dataset, dict):
                dataset = next(iter(dataset.values()))
            examples = [example for example in itertools.islice(iter(dataset), num_images) if example["pixel_values"] is not None]
            if examples:
                pixels = torch.stack([torch.as_tensor(example["pixel_values"]) for example in examples])
                device = next(model.parameters()).device
                with self.autocast_smart_context_manager():
                    norms = model.artifact_norms(self._normalised({"pixel_values": pixels.to(device)})["pixel_values"])
                norms = {key: value.cpu() for key, value in norms.items()}
                if pixels.dtype == torch.uint8:
                    shown = pixels.float() / 255
                else:  # normalised by the caller's own transform: shown rescaled to [0, 1]
                    shown = (pixels - pixels.amin()) / (pixels.amax() - pixels.amin()).clamp(min=1e-6)
                shown = shown.permute(0, 2, 3, 1)
                source = source.replace(f"first {num_images} ", f"first {len(examples)} ")
        final = next((entry for entry in reversed(self.state.log_history) if any(key.startswith(f"{ARTIFACTS_DIR}/") for key in entry)), None)
        folders = self.student_folders()
        for student, folder in zip(model.students, folders):
            write_artifact_files(folder / ARTIFACTS_DIR, model, student, norms, shown, final, source)
        return folders

    def push_to_hub(self, commit_message: str | None = None, blocking: bool = True, token: str | None = None, revision: str | None = None, **kwargs):
        """Publishes each exported student with its card (`publishing.publish_student`) to its repo
        (`student_repo_ids`: `hub_model_id`, or `<hub_model_id>-<student>` for several); returns the commit URLs."""
        if not self.is_world_process_zero():
            return None
        arguments = self.run_arguments
        model = self.accelerator.unwrap_model(self.model)
        repo_ids = student_repo_ids(arguments.hub_model_id or Path(arguments.output_dir).absolute().name, list(model.students))
        urls = []
        for repo_id, folder in zip(repo_ids.values(), self.student_folders()):
            published = publish_student(
                folder, repo_id, private=arguments.hub_private_repo, revision=revision or arguments.hub_revision,
                token=token or arguments.hub_token, commit_message=commit_message, license=kwargs.get("license"),
            )  # fmt: skip
            urls.append(published.commit_url)
        return urls


def student_repo_ids(repo: str, students: list[str]) -> dict[str, str]:
    """The Hub repo of each student: `repo` for one, `<repo>-<student>` for each of several."""
    return {name: repo if len(students) == 1 else f"{repo}-{name}" for name in students}


def _log_key(term: str) -> str:
    """`kd` → `loss_kd` (one student, one teacher); `tiny/kd` → `loss/tiny/kd`."""
    return f"loss/{term}" if "/" in term else f"loss_{term}"
