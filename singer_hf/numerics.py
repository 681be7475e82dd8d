"""Non-finite losses: detected on the step, skipped on the device, reported at the log interval.

A NaN or Inf loss (or gradient) must not reach the weights, and checking `loss.isfinite()` on the
host every step would stall a GPU. `NonFiniteGuard` keeps every flag on the device:

- `observe(losses, loss)` records, per step, which loss terms were non-finite;
- `guarded_step(step, optimizer, n)` runs the optimizer step so that it changes nothing when the step's
  loss or gradients were non-finite, without the host ever looking: fused Adam/AdamW (the Trainer's
  default) take the flag as `found_inf` and skip the update, moments and step count in the kernel, as
  under a GradScaler; other optimizers get their parameters and state put back with `torch.where`;
- `report(step)` is called where the trainer syncs anyway (each log): it names the terms and steps
  that were skipped, and raises after `max_consecutive` non-finite steps in a row.

Limits: with an optimizer that is not fused Adam/AdamW, the put-back copies the trainable parameters
and optimizer state every step, and a state tensor on another device than its parameter (a CPU step
count) still advances on a skipped step; a run of bad steps is noticed at the next log, so it can run
up to `logging_steps` past `max_consecutive` (those steps are skipped too).
"""

from __future__ import annotations

import torch
from transformers.utils import logging

logger = logging.get_logger(__name__)


class NonFiniteLossError(RuntimeError):
    pass


def _skips_in_kernel(optimizer: torch.optim.Optimizer) -> bool:
    """Fused Adam/AdamW skip a step on the device when given `found_inf` (GradScaler's protocol)."""
    return isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW) and all(g.get("fused") for g in optimizer.param_groups)


class NonFiniteGuard:
    def __init__(self, max_consecutive: int):
        self.max_consecutive = max_consecutive
        self._terms: list[str] = []
        self._bad_terms: torch.Tensor | None = None  # this interval: which terms were non-finite at least once
        self._step_bad: torch.Tensor | None = None  # the current optimizer step (all its micro-batches)
        self._stats: torch.Tensor | None = None  # [bad steps this interval, first, last, run length now, longest run]

    def observe(self, losses: dict[str, torch.Tensor], loss: torch.Tensor) -> None:
        flags = torch.stack([~torch.isfinite(value.detach()).all() for value in [*losses.values(), loss]])
        if self._bad_terms is None or len(self._terms) != len(flags) - 1:
            self._terms = list(losses)
            self._bad_terms = torch.zeros_like(flags)
            self._stats = torch.zeros(5, dtype=torch.int64, device=flags.device)
        step_bad = flags.any()
        self._step_bad = step_bad if self._step_bad is None else self._step_bad | step_bad
        self._bad_terms |= flags

    def guarded_step(self, step, optimizer: torch.optim.Optimizer, step_number: int, closure=None):
        """`step()` (the optimizer's own), undone on the device when the loss or a gradient of this step was non-finite."""
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not params or self._step_bad is None:
            return step(closure)
        device = params[0].device
        grads = [p.grad for p in params]
        grads_bad = torch.stack([~torch.isfinite(g).all() for g in torch._foreach_norm(grads)]).any()
        bad = (self._step_bad.to(device) | grads_bad).reshape(())
        for grad in grads:
            torch.nan_to_num_(grad, nan=0.0, posinf=0.0, neginf=0.0)  # so the (discarded) update stays finite
        if _skips_in_kernel(optimizer):
            optimizer.found_inf = bad.float()  # read by the fused kernel: no copies of weights or state
            try:
                result = step(closure)
            finally:
                del optimizer.found_inf
        else:
            saved = [(tensor, tensor.detach().clone()) for tensor in self._tensors(optimizer, params, device)]
            result = step(closure)
            with torch.no_grad():
                for tensor, before in saved:
                    tensor.copy_(torch.where(bad, before, tensor))
        self._count(bad, step_number)
        self._step_bad = None
        return result

    @staticmethod
    def _tensors(optimizer, params, device):
        yield from params
        for param in params:
            for value in optimizer.state.get(param, {}).values():
                if isinstance(value, torch.Tensor) and value.device == device:
                    yield value

    def _count(self, bad: torch.Tensor, step_number: int) -> None:
        stats = self._stats.to(bad.device)
        bad_int = bad.long()
        step = torch.tensor(step_number, device=bad.device)
        count, first, last, run, longest = stats.unbind()
        first = torch.where(bad & (count == 0), step, first)
        last = torch.where(bad, step, last)
        run = (run + 1) * bad_int
        self._stats = torch.stack([count + bad_int, first, last, run, torch.maximum(longest, run)])

    def report(self) -> int:
        """Warns about this interval's skipped steps; raises after too many in a row. One host sync. Returns the count."""
        if self._stats is None:
            return 0
        count, first, last, run, longest = self._stats.tolist()
        bad_terms = [name for name, bad in zip([*self._terms, "total"], self._bad_terms.tolist()) if bad]
        terms = ", ".join(f"loss_{name}" if name != "total" else "loss" for name in bad_terms)
        self._stats[0] = 0
        self._stats[4] = self._stats[3]  # a run of bad steps may go on into the next interval
        self._bad_terms.zero_()
        if longest >= self.max_consecutive > 0 or (self.max_consecutive == 0 and count):
            raise NonFiniteLossError(
                f"max_nonfinite_steps: {longest} consecutive optimizer steps had a non-finite loss or gradient "
                f"(up to step {last}; {terms or 'gradients'}); stopping, the last checkpoint holds finite weights"
            )
        if count:
            steps = f"step {first}" if count == 1 else f"{count} steps between {first} and {last}"
            logger.warning("Non-finite %s at %s: skipped (weights and optimizer state unchanged)", terms or "gradients", steps)
        return count
