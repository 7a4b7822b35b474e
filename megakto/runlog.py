"""Rank-0 output: TensorBoard scalars, one plain log line per logging step, and a tqdm bar.

Values arrive already reduced over ranks (sums and counts at one site in the trainer); this module
only writes them.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Mapping

__all__ = ["RunLogger", "Phases"]


class Phases:
    """Wall-clock seconds of consecutive start-up phases on this rank: :meth:`done` closes the
    phase that ran since the previous call (or since construction)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.notes: dict[str, list[str]] = {}  # what a phase's seconds include, shown beside them
        self._start = self._last = time.perf_counter()

    def note(self, name: str, text: str) -> None:
        """Show ``text`` beside phase ``name`` (a part of it and its time)."""
        self.notes.setdefault(name, []).append(text)

    def done(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self._last
        self._last = now

    def summary(self) -> str:
        """``start-up 41.2 s: checks 1.0 s, data 12.1 s (of it tokenizer checks 0.1 s ...), policy 3.0 s, ...``"""
        total = self._last - self._start

        def part(k, v):
            return f"{k} {v:.1f} s" + (f" (of it {'; '.join(self.notes[k])})" if k in self.notes else "")

        return f"start-up {total:.1f} s: " + ", ".join(part(k, v) for k, v in self.seconds.items())


class RunLogger:
    def __init__(self, output_dir: str, *, enabled: bool, total_steps: int, initial_step: int = 0):
        self.enabled = enabled
        self._writer = None
        self._bar = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter
        from tqdm.auto import tqdm

        self.log_dir = os.path.join(output_dir, "tensorboard")
        # After a resume, drop the events past the checkpoint that a crashed run had already
        # written. TensorBoard's loader discards every event with step >= purge_step, so the
        # checkpoint step's own scalars (written before the crash, not logged again) need + 1.
        self._writer = SummaryWriter(self.log_dir, purge_step=initial_step + 1 if initial_step > 0 else None)
        self._bar = tqdm(total=total_steps, initial=initial_step, desc="kto", dynamic_ncols=True,
                         disable=not sys.stderr.isatty())

    def info(self, message: str) -> None:
        if self.enabled:
            stamp = time.strftime("%H:%M:%S")
            line = f"[megakto {stamp}] {message}"
            if self._bar is not None and not self._bar.disable:
                self._bar.write(line)
            else:
                print(line, flush=True)

    def scalars(self, step: int, values: Mapping[str, float], prefix: str = "", quiet: bool = False) -> None:
        """TensorBoard scalars and (unless ``quiet``) the step's log line."""
        if not self.enabled:
            return
        for key, value in values.items():
            self._writer.add_scalar(f"{prefix}{key}", value, step)
        self._writer.flush()
        if quiet:
            return
        shown = ("loss", "kl", "rewards/margins", "reward_accuracy")
        text = " ".join(f"{prefix}{k} {values[k]:.4f}" for k in shown if k in values)
        self.info(f"step {step} {text}" + "".join(
            f" {k} {values[k]:.3g}" for k in ("grad_norm", "learning_rate", "tokens_per_s", "memory/peak_gib")
            if k in values))

    def warning(self, message: str, *, step: int, tag: str = "health") -> None:
        """A warning line, also a TensorBoard text entry under ``tag``."""
        if not self.enabled:
            return
        self.info(f"warning: {message}")
        self._writer.add_text(tag, message, step)
        self._writer.flush()

    def text(self, tag: str, text: str, step: int) -> None:
        if self.enabled:
            self._writer.add_text(tag, text, step)
            self._writer.flush()

    def advance(self, n: int = 1, **postfix: float) -> None:
        if self._bar is not None:
            self._bar.update(n)
            if postfix:
                self._bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._writer is not None:
            self._writer.close()
