"""LastCheckpoint: last.ckpt rewritten at every epoch end and on a step/time interval, and saved on SIGTERM/SIGINT."""

from __future__ import annotations

import signal
import threading
import time
from datetime import timedelta
from typing import Any

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities.exceptions import SIGTERMException

from vision_mamba.utils.pylogger import RankedLogger

log = RankedLogger(__name__, rank_zero_only=True)


def exit_status(sig: signal.Signals) -> int:
    """The status shells report for a process a signal stopped: 143 for SIGTERM, 130 for SIGINT."""
    return 128 + int(sig)


class LastCheckpoint(ModelCheckpoint):
    """Keeps ``<dirpath>/last.ckpt`` fresh, whatever the monitored metric does, and saves it when the job is stopped.

    Lightning's ``save_last`` rewrites ``last.ckpt`` only when a top-k checkpoint is saved, so a run whose metric
    stopped improving keeps an old one. This callback (top-k is left to the ``ModelCheckpoint`` beside it) writes it

    - at every epoch end (after validation, when validation runs),
    - every ``every_n_train_steps`` optimiser steps and every ``train_time_interval`` (either, both or none),
    - on SIGTERM and SIGINT (``signals``; what SLURM, Kubernetes and Ctrl+C send before killing): the current
      step finishes, ``last.ckpt`` is saved with the exact-resume state (mid-epoch position, RNG states) and the
      process exits with 143 (SIGTERM) or 130 (SIGINT). A second Ctrl+C stops at once, without a checkpoint.
      Under DDP the ranks agree on the step to stop after (any rank's signal counts). Under SLURM auto-requeue
      (``trainer=slurm``: SIGUSR1 before the time limit, then SIGTERM) the same state is also saved as the next
      ``hpc_ckpt_N.ckpt``, which the requeued job resumes from. A signal during validation
      takes effect at the next training step, or at the end of training; one on a step that validation follows
      (an epoch's last) lets that validation run first, and the run stops with the epoch complete (a resume would
      not validate that epoch again). The handlers are active while training
      runs (from ``on_train_start``); before that Lightning's own handling applies.
    """

    def __init__(
        self,
        dirpath: str | None = None,
        every_n_train_steps: int | None = None,
        train_time_interval: timedelta | None = None,
        signals: list[str] | tuple[str, ...] = ("SIGTERM", "SIGINT"),
        **kwargs: Any,
    ) -> None:
        # top-k off; the intervals are this class's own (Lightning's would also decide when top-k is saved)
        super().__init__(dirpath=dirpath, save_last=True, save_top_k=0, enable_version_counter=False, **kwargs)
        self.last_every_n_train_steps = every_n_train_steps or 0
        self.last_train_time_interval = train_time_interval
        self.signals = [signal.Signals[s] if isinstance(s, str) else signal.Signals(s) for s in signals]
        self.received: signal.Signals | None = None
        self._stop_after_validation = False
        self._last_save_time = time.monotonic()

    def write_last(self, trainer) -> None:
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        self._last_save_time = time.monotonic()

    def _may_save(self, trainer) -> bool:
        return not (trainer.fast_dev_run or trainer.sanity_checking or trainer.state.fn != "fit")

    # --- intervals ------------------------------------------------------------------------------------------------

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        self._last_save_time = time.monotonic()
        self._install_signal_handlers()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        interval = self.last_train_time_interval
        time_due = interval is not None and time.monotonic() - self._last_save_time >= interval.total_seconds()
        stop = self.received is not None
        if self.signals or interval is not None:
            stop, time_due = self._agree(trainer, stop, time_due)
        if stop:
            # Lightning raises its SIGTERMException at the end of this step (after the LightningModule's own
            # batch-end hook, e.g. the EMA update) when this flag is set; on_exception then saves. Set here, on
            # every rank at the same step, rather than from the signal handler.
            self.received = self.received or signal.SIGTERM  # another rank's signal
            if trainer.fit_loop.epoch_loop._should_check_val_fx(trainer.fit_loop._data_fetcher):
                # Lightning would stop the validation after its first batch, and a resume skips the validation of
                # a step saved before it: the flag waits for on_validation_end (the same decision on every rank)
                self._stop_after_validation = True
                return
            trainer._signal_connector.received_sigterm = True
            return
        if not self._may_save(trainer) or self._last_global_step_saved == trainer.global_step:
            return  # also: no optimiser step since the last save (gradient accumulation)
        steps = self.last_every_n_train_steps
        if time_due or (steps and trainer.global_step % steps == 0):
            self.write_last(trainer)

    @staticmethod
    def _agree(trainer, *flags: bool) -> list[bool]:
        """Each flag true on any rank (one all-reduce per step under DDP), so that every rank saves or stops at the
        same step: a save is a collective."""
        if trainer.world_size == 1:
            return list(flags)
        agreed = trainer.strategy.reduce(torch.tensor(flags, device=trainer.strategy.root_device), reduce_op="max")
        return [bool(f) for f in agreed.tolist()]

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self._may_save(trainer) and self._should_save_on_train_epoch_end(trainer):
            self.write_last(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._stop_after_validation and not trainer.sanity_checking:
            self._stop_after_validation = False
            trainer._signal_connector.received_sigterm = True  # stops after the epoch end (or at the next step)
        if self._may_save(trainer) and not self._should_save_on_train_epoch_end(trainer):
            self.write_last(trainer)

    # --- signals --------------------------------------------------------------------------------------------------

    def _install_signal_handlers(self) -> None:
        # after Lightning's own (Trainer._run installs them before training starts), which it restores at teardown
        if threading.current_thread() is not threading.main_thread():
            return
        self.received = None
        self._stop_after_validation = False
        for sig in self.signals:
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl+C: stop now
        self.received = signal.Signals(signum)

    def on_train_end(self, trainer, pl_module) -> None:
        super().on_train_end(trainer, pl_module)
        if self.received is not None:  # the signal came after the last step: training is complete and saved
            log.info(f"{self.received.name} received: training ended and {self.last_model_path} is saved; stopping")
            raise SystemExit(exit_status(self.received))

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        received = self.received or signal.SIGTERM  # Lightning's own handler caught it before training started
        if self._may_save(trainer) and trainer.global_step > 0:
            self.write_last(trainer)
            log.info(
                f"{received.name} received: saved {self.last_model_path} at step {trainer.global_step} (epoch "
                f"{trainer.current_epoch}); resume with hydra.run.dir=<this run> ckpt_path=last"
            )
            if _slurm_requeues(trainer):
                # the requeued job resumes from the newest hpc_ckpt_N by itself: make it this step's state rather
                # than the one Lightning's SIGUSR1 handler saved in the middle of a step
                hpc = trainer._checkpoint_connector.hpc_save_path(trainer.default_root_dir)
                trainer.save_checkpoint(hpc)
                log.info(f"and {hpc}, which the requeued SLURM job resumes from")
        exception.code = exit_status(received)


def _slurm_requeues(trainer) -> bool:
    environment = trainer._accelerator_connector.cluster_environment
    return isinstance(environment, SLURMEnvironment) and environment.auto_requeue
