"""The one training loop behind `distill`, `lora` (and quantization-aware training): AdamW,
linear warmup + cosine decay, gradient accumulation and clipping, autocast, a step or token
budget, periodic held-out evaluation, progress with tokens/s and ETA, and checkpoints of
everything a resume needs (trainable weights, optimizer, scheduler, RNG, data position)."""
from __future__ import annotations

import json
import math
import pickle
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dsc import parallel
from dsc.distill.batches import Batches
from dsc.distill.config import TrainConfig
from dsc.fingerprint import file_hash
from dsc.models import replace_dir
from dsc.tracking import Tracker


def total_steps(cfg: TrainConfig, tokens_per_step: int) -> int:
    return cfg.steps if cfg.steps is not None else max(1, math.ceil(cfg.tokens / tokens_per_step))


def lr_lambda(steps: int, warmup: float, min_ratio: float):
    warm = round(warmup * steps)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, steps - warm)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    if cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda"
                                   and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return None


@dataclass
class Loop:
    """State of one training run; `run()` returns its metrics."""

    model: torch.nn.Module  # the Objective, wrapped by DDP / FSDP when distributed
    cfg: TrainConfig
    train: Batches
    held_out: Batches | None
    device: torch.device
    log: object
    state_dir: Path | None = None  # persistent: checkpoints and train_log.jsonl survive a kill
    step: int = 0
    history: list = field(default_factory=list)
    elapsed: float = 0.0  # seconds spent in training steps (excluding evaluation and checkpoints)
    tracker: Tracker = field(default_factory=Tracker)  # experiment tracker (rank 0's; no-op elsewhere)
    scope: str = "train"  # metric prefix in the tracker: the stage's folder name

    def __post_init__(self):
        self.steps = total_steps(self.cfg, self.train.tokens_per_step)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(self.steps, self.cfg.warmup, self.cfg.min_lr_ratio))
        self.amp = autocast_dtype(self.cfg, self.device)

    # -- the loop ---------------------------------------------------------------------------
    def run(self) -> dict:
        resumed = self.load()
        self.tracker.resume(self.scope, resumed)
        if not resumed and self.held_out is not None:
            self.evaluate()
        with _StopRequests() as stop:
            self._steps(stop)
        final = self.evaluate() if self.held_out is not None else {}
        tokens = self.step * self.train.tokens_per_step
        return {"steps": self.steps, "tokens": tokens, "train_seconds": round(self.elapsed, 3),
                "tokens_per_s": round(tokens / max(self.elapsed, 1e-9), 1), "processes": self.train.world,
                "resumed_at_step": resumed, "final_train": next((h["loss"] for h in reversed(self.history) if "loss" in h), None),
                "eval": final, "eval_start": next((h["eval"] for h in self.history if "eval" in h), None)}

    def _steps(self, stop: "_StopRequests") -> None:
        t_log, s_log = time.perf_counter(), self.step
        while self.step < self.steps:
            t0 = time.perf_counter()
            parts = self.train_step()
            self.elapsed += time.perf_counter() - t0
            self.step += 1
            if self.step % self.cfg.log_every == 0 or self.step == self.steps:
                self.report(parts, (self.step - s_log) / max(time.perf_counter() - t_log, 1e-9))
                t_log, s_log = time.perf_counter(), self.step
            if self.held_out is not None and self.cfg.eval_every and self.step % self.cfg.eval_every == 0 \
                    and self.step < self.steps:
                self.evaluate()
            if parallel.any_true(stop.requested):  # SIGTERM / Ctrl-C: keep this step, then stop
                self.save()
                raise KeyboardInterrupt
            if self.cfg.save_every and self.step % self.cfg.save_every == 0 and self.step < self.steps:
                self.save()

    def train_step(self) -> dict:
        self.model.train()
        sums: dict[str, float] = {}
        accum = self.cfg.grad_accum
        for m in range(accum):
            ids, top = self.train.get(self.step, m, self.device)
            with parallel.sync_gradients(self.model, m == accum - 1), self._autocast():
                loss, parts = self.model(ids, top)
                (loss / accum).backward()
            for k, v in {"loss": loss.detach(), **parts}.items():
                sums[k] = sums.get(k, 0.0) + float(v) / accum
        if self.cfg.max_grad_norm:
            sums["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm))
        sums["lr"] = self.scheduler.get_last_lr()[0]  # the rate this step used
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return sums

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None)

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Mean loss terms (and the student's LM perplexity) on the held-out micro-batches."""
        self.model.eval()
        sums: dict[str, float] = {}
        n = self.cfg.eval_batches
        for i in range(n):
            ids, top = self.held_out.held_out(i, self.device)
            with self._autocast():
                loss, parts = self.model(ids, top)
            for k, v in {"loss": loss, **parts}.items():
                sums[k] = sums.get(k, 0.0) + float(v) / n
        result = {k: round(v, 6) for k, v in parallel.mean(sums).items()}
        result["ppl"] = round(math.exp(min(result["ce"], 50.0)), 4)
        self.record({"step": self.step, "eval": result})
        self.tracker.log(self.scope, {f"eval/{k}": v for k, v in result.items()}, self.step)
        self.log.info("eval at step %d: %s", self.step, " ".join(f"{k} {v:.4f}" for k, v in result.items()),
                      extra={"event": "train_eval", "step": self.step, **{f"eval_{k}": v for k, v in result.items()}})
        return result

    def report(self, parts: dict, steps_per_s: float) -> None:
        lr = parts.pop("lr")
        parts = parallel.mean(parts)
        tps = steps_per_s * self.train.tokens_per_step
        eta = (self.steps - self.step) / max(steps_per_s, 1e-9)
        entry = {"step": self.step, "tokens": self.step * self.train.tokens_per_step,
                 **{k: round(v, 6) for k, v in parts.items()}, "lr": lr,
                 "tokens_per_s": round(tps, 1), "eta_s": round(eta, 1)}
        self.record(entry)
        self.tracker.log(self.scope, {k: v for k, v in entry.items() if k not in ("step", "eta_s")}, self.step)
        self.log.info("step %d/%d loss %.4f lr %.2e %.0f tok/s eta %.0fs", self.step, self.steps, parts["loss"],
                      entry["lr"], tps, eta, extra={"event": "train_progress", **entry, "total_steps": self.steps})

    def record(self, entry: dict) -> None:
        self.history.append(entry)
        if self.state_dir is not None and parallel.rank() == 0:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            with open(self.state_dir / "train_log.jsonl", "a") as fh:
                fh.write(json.dumps(entry) + "\n")

    # -- checkpoints ----------------------------------------------------------------------------
    @property
    def _ckpt(self) -> Path:
        return self.state_dir / "checkpoint"

    def save(self) -> None:
        if self.state_dir is None:
            return
        model_sd, optim_sd = parallel.trainable_state(self.model, self.optimizer)
        rngs = parallel.gather_objects(_rng_state())
        if parallel.rank() == 0:
            tmp = self.state_dir / ".tmp-checkpoint"
            tmp.mkdir(parents=True, exist_ok=True)
            torch.save({"model": model_sd, "optimizer": optim_sd, "rng": rngs}, tmp / "state.pt")
            meta = {"step": self.step, "steps": self.steps, "elapsed": self.elapsed, "world": self.train.world,
                    "scheduler": self.scheduler.state_dict(), "history": self.history,
                    "state_sha256": file_hash(tmp / "state.pt")}
            (tmp / "meta.json").write_text(json.dumps(meta))
            replace_dir(tmp, self._ckpt)
        parallel.barrier()
        self.log.info("checkpoint at step %d", self.step, extra={"event": "train_checkpoint", "step": self.step})

    def load(self) -> int:
        """Resume from the last checkpoint, if any; returns the step resumed at (0: fresh)."""
        if self.state_dir is None:
            return 0
        loaded = self._read_checkpoint() if (self._ckpt / "meta.json").is_file() else None
        if loaded is None:
            if parallel.rank() == 0:  # a run killed before its first checkpoint logged steps that restart now
                (self.state_dir / "train_log.jsonl").unlink(missing_ok=True)
            return 0
        meta, state = loaded
        parallel.load_trainable_state(self.model, self.optimizer, state["model"], state["optimizer"])
        self.scheduler.load_state_dict(meta["scheduler"])
        if meta["world"] != self.train.world:
            self.log.warning("resuming on %d processes a run checkpointed on %d: the data order and the "
                             "global batch change from here", self.train.world, meta["world"],
                             extra={"event": "train_world_change"})
        else:
            _set_rng_state(state["rng"][parallel.rank()])
        self.step, self.elapsed, self.history = meta["step"], meta["elapsed"], meta["history"]
        if parallel.rank() == 0:  # the log continues from the checkpoint: drop what was lost
            lines = "".join(json.dumps(entry) + "\n" for entry in self.history)
            (self.state_dir / "train_log.jsonl").write_text(lines)
        self.log.info("resuming training at step %d/%d", self.step, self.steps,
                      extra={"event": "train_resume", "step": self.step})
        return self.step

    def _read_checkpoint(self) -> tuple[dict, dict] | None:
        """(meta, state) of the last checkpoint, or None when it is damaged (then training starts
        over: the checkpoint is dsc's own, and a wrong one must not be resumed from)."""
        try:
            meta = json.loads((self._ckpt / "meta.json").read_text())
            want = meta.get("state_sha256")
            if want is not None and file_hash(self._ckpt / "state.pt") != want:
                raise ValueError("state.pt differs from what was saved (its sha256 changed)")
            state = torch.load(self._ckpt / "state.pt", map_location="cpu", weights_only=True)
            meta["step"], meta["scheduler"], meta["history"]  # noqa: B018 - present, or damaged
            return meta, state
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError, EOFError,
                pickle.UnpicklingError) as exc:
            self.log.warning("training checkpoint %s is damaged (%s: %s): training this stage from the start",
                             self._ckpt, type(exc).__name__, exc, extra={"event": "damaged", "path": str(self._ckpt)})
            parallel.barrier()  # every rank has read it before rank 0 removes it
            if parallel.rank() == 0:
                shutil.rmtree(self._ckpt, ignore_errors=True)
            return None


class _StopRequests:
    """While training, SIGTERM and SIGINT ask the loop to stop after the current step (with a
    checkpoint of it) instead of interrupting it halfway; outside, the previous handlers apply."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested = False
        self._previous = {}

    def _handle(self, signum, frame):
        self.requested = True

    def __enter__(self) -> "_StopRequests":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def _rng_state() -> dict:
    """Dropout (LoRA's) draws from torch's generators; the data order is seeded separately."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
