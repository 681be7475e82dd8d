"""What keeps a distillation run safe, as `transformers.TrainerCallback`s.

- `CheckpointCallback`: after the Trainer writes `checkpoint-N`, adds what a distillation run needs
  to resume exactly — each process's streamed-data position and, last, the run's fingerprint
  (`layout.FINGERPRINT_FILE`), which marks the checkpoint complete — then removes checkpoints beyond
  `save_total_limit`, oldest first, never the newest complete one. A checkpoint cut short by a kill
  has no fingerprint and is never resumed from.
- `PreemptionCallback`: SIGTERM (a scheduler's pre-emption) and Ctrl-C save a checkpoint after the
  current step and stop; a second Ctrl-C stops at once.
- `ResumedEpochCallback`: a resumed run says where it continues and logs its true epoch.
- `StudentClippingCallback`: gradient clipping per student, so one student's gradient norm never
  scales another's update (with one student it is the Trainer's usual clipping).
- `EpochCallback`: keeps an epoch-seeded transform (`data.ImageTransform`) on the current epoch.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path

import torch
from transformers import PrinterCallback, ProgressCallback, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints
from transformers.utils import logging

from .checkpoints import run_fingerprint
from .layout import FINGERPRINT_FILE, STREAM_STATE_FILE

logger = logging.get_logger(__name__)


class CheckpointCallback(TrainerCallback):
    def __init__(self, trainer, save_total_limit: int | None):
        self.trainer = trainer
        self.save_total_limit = save_total_limit

    def on_save(self, args, state, control, **kwargs):
        trainer = self.trainer
        checkpoint = Path(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        dataloader = kwargs.get("train_dataloader")
        if trainer.streams_resumable and hasattr(dataloader, "state_dict"):
            checkpoint.mkdir(parents=True, exist_ok=True)
            torch.save(dataloader.state_dict(), checkpoint / STREAM_STATE_FILE.format(args.process_index))
        trainer.accelerator.wait_for_everyone()  # every process's files are in
        if args.should_save:
            model = trainer.accelerator.unwrap_model(trainer.model)
            (checkpoint / FINGERPRINT_FILE).write_text(json.dumps(run_fingerprint(model), indent=2))
            if self.save_total_limit:
                rotate_checkpoints(args.output_dir, self.save_total_limit, state.best_model_checkpoint, use_mtime=True)
        trainer.accelerator.wait_for_everyone()


class PreemptionCallback(TrainerCallback):
    """Installs SIGTERM and SIGINT handlers for the duration of `train()` (main thread only).

    `signal_name` is the signal that stopped the run ("SIGTERM", "SIGINT"), or None. A signal that
    reached another process only is reported as SIGTERM, what schedulers send (Ctrl-C reaches every
    process of a launch).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, trainer):
        self.trainer = trainer
        self.signal_name: str | None = None
        self._received: int | None = None
        self._previous, self._pid = {}, None

    def on_train_begin(self, args, state, control, **kwargs):
        self.signal_name, self._received, self._pid = None, None, os.getpid()
        if threading.current_thread() is threading.main_thread():
            self._previous = {number: signal.signal(number, self._handle) for number in self.SIGNALS}

    def on_train_end(self, args, state, control, **kwargs):
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}

    def _handle(self, number, frame) -> None:
        if os.getpid() != self._pid:
            return  # a DataLoader worker forked from this process: the training process saves and stops
        if self._received is not None:
            if number == signal.SIGINT:
                raise KeyboardInterrupt  # the second Ctrl-C: stop now, without the checkpoint
            return
        self._received = number
        again = " (Ctrl-C again: stop now, without it)" if number == signal.SIGINT else ""
        logger.warning("%s: writing a checkpoint after this step, then stopping%s", signal.Signals(number).name, again)

    def on_step_end(self, args, state, control, **kwargs):
        """Save and stop at this step's end. With several processes the ranks agree on it at each log
        step (a collective per step would cost a host sync), so a signal reaching one rank only is
        acted on there."""
        received = self._received is not None
        accelerator = self.trainer.accelerator
        if accelerator.num_processes > 1:
            if state.global_step % max(int(args.logging_steps), 1):
                return
            flag = torch.tensor(float(received), device=accelerator.device)
            received = bool(accelerator.reduce(flag, reduction="sum").item())
        if received:
            control.should_save = control.should_training_stop = True
            self.signal_name = signal.Signals(self._received or signal.SIGTERM).name


class ResumedEpochCallback(TrainerCallback):
    """Says where a resumed run continues, and keeps the true epoch when a stream resumed from its saved
    position: the stream is not read again up to it, so the Trainer counts that epoch's steps from 0."""

    def __init__(self, checkpoint: str | None, stream_resumed: bool):
        self.checkpoint, self.stream_resumed = checkpoint, stream_resumed
        self._epoch, self._offset = 0, 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        if self.checkpoint is None:
            return
        logger.warning("resuming from %s (step %d of %d)", Path(self.checkpoint).name, state.global_step, state.max_steps)
        if self.stream_resumed:  # an unsized stream's epoch is max_steps steps long
            self._epoch = state.global_step // state.max_steps
            self._offset = (state.global_step % state.max_steps) / state.max_steps

    def on_step_end(self, args, state, control, **kwargs):
        if self._offset and int(state.epoch) == self._epoch:
            state.epoch += self._offset


class StudentClippingCallback(TrainerCallback):
    """Clips each student's gradients (student, heads, adapters) to `max_grad_norm` on its own."""

    def __init__(self, trainer, max_grad_norm: float):
        self.trainer = trainer
        self.max_grad_norm = max_grad_norm
        self.norms: dict[str, torch.Tensor] = {}
        """Each student's gradient norm before clipping, at the last step."""

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        accelerator = self.trainer.accelerator
        model = accelerator.unwrap_model(self.trainer.model)
        accelerator.unscale_gradients()
        for name in model.students:
            parameters = [parameter for parameter in model.student_parameters(name) if parameter.grad is not None]
            self.norms[name] = torch.nn.utils.clip_grad_norm_(parameters, self.max_grad_norm)


class EpochCallback(TrainerCallback):
    """Tells `target.set_epoch` (e.g. a seeded `ImageTransform`) the epoch, also when a run resumes mid-epoch."""

    def __init__(self, target):
        self.target = target

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.target.set_epoch(int(state.epoch or 0))


class ConsoleProgressCallback(ProgressCallback):
    """The progress bar, printing each log without the keys under `hidden` (the artifact statistics: one per
    teacher, block, view and statistic, dozens of values that would bury the losses; they still reach the
    loggers and `trainer_state.json`)."""

    def __init__(self, hidden: str, **kwargs):
        super().__init__(**kwargs)
        self.hidden = hidden

    def on_log(self, args, state, control, logs=None, **kwargs):
        return super().on_log(args, state, control, logs=_shown(logs, self.hidden), **kwargs)


class ConsolePrinterCallback(PrinterCallback):
    """What `--disable_tqdm` prints, without the keys under `hidden` (see `ConsoleProgressCallback`)."""

    def __init__(self, hidden: str):
        self.hidden = hidden

    def on_log(self, args, state, control, logs=None, **kwargs):
        return super().on_log(args, state, control, logs=_shown(logs, self.hidden), **kwargs)


def _shown(logs: dict | None, hidden: str) -> dict:
    """`logs` without the keys under `hidden`, in training's logs and evaluation's (`eval_` + key)."""
    return {key: value for key, value in (logs or {}).items() if not key.removeprefix("eval_").startswith(hidden)}
