"""The one training loop of r2r: accelerate, a seeded data order, EMA, tqdm, atomic safetensors checkpoints.

Every training command is a `TrainTask` run by `run_training`. A resumed run draws exactly what an uninterrupted one
draws (each draw seeded by seed, step, micro-batch and process); checkpoints under `OUT/checkpoints/` hold tensors
and JSON only, never a pickle, and a run killed at any instant resumes from a complete one.
Why: docs/design.md, "The training loop".
"""

from __future__ import annotations

import json
import math
import shutil
import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from r2r.atomic import atomic_dir, atomic_write

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = [
    "CHECKPOINTS_DIR",
    "LATEST_FILE",
    "MIXED_PRECISION",
    "CheckpointError",
    "LoopConfig",
    "LoopResult",
    "TrainTask",
    "WholeModuleTask",
    "data_indices",
    "derive_seed",
    "latest_checkpoint",
    "run_training",
    "step_generator",
]

CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest"
STATE_FILE = "state.json"
TRAINABLE_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
EMA_FILE = "ema.safetensors"
LOG_FILE = "log.jsonl"
CHECKPOINT_FORMAT = 1
MIXED_PRECISION = ("no", "bf16", "fp16")


class CheckpointError(RuntimeError):
    """A checkpoint or output folder that cannot be used as asked; the message names the path and the fix."""


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoopConfig:
    """Options every training command shares (the names of diffusers' training scripts)."""

    batch_size: int = 1
    grad_accum: int = 1
    lr: float = 1e-5
    max_steps: int = 1000
    mixed_precision: str = "no"
    seed: int = 0
    checkpoint_every: int = 500
    checkpoints_total_limit: int = 2
    resume: bool = False
    ema: bool = False
    ema_decay: float = 0.9999
    lr_warmup_steps: int = 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    progress: bool = True
    # Stop (as a kill would: no final output) once this many steps ran in this session; resume tests use it.
    stop_after: int | None = None

    def __post_init__(self) -> None:
        positive = ("batch_size", "grad_accum", "max_steps", "checkpoint_every", "checkpoints_total_limit")
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed-precision must be one of {MIXED_PRECISION}, got {self.mixed_precision!r}")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema-decay must be in [0, 1), got {self.ema_decay}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.stop_after is not None and self.stop_after < 1:
            raise ValueError(f"stop_after must be >= 1, got {self.stop_after}")

    def fingerprint(self) -> dict[str, Any]:
        """The options a resumed run must share with the checkpoint (max-steps may grow, the rest may not)."""
        skip = {"max_steps", "checkpoint_every", "checkpoints_total_limit", "resume", "progress", "stop_after"}
        return {k: v for k, v in asdict(self).items() if k not in skip}

    def lr_at(self, step: int) -> float:
        """Constant learning rate after a linear warm-up: a pure function of the step, so nothing to save."""
        if self.lr_warmup_steps > 0 and step < self.lr_warmup_steps:
            return self.lr * (step + 1) / self.lr_warmup_steps
        return self.lr


@dataclass
class LoopResult:
    """What a `run_training` call did."""

    step: int  # optimizer steps done in total (including those before a resume)
    completed: bool  # False when stopped early by `stop_after`
    output: Path | None  # the task's final output (None when not completed)
    seconds: float  # wall time of the training, summed over every session of this run
    session_seconds: float  # wall time of this call
    last_loss: float | None = None
    losses: list[float] = field(default_factory=list)  # per-step loss of this session


# --------------------------------------------------------------------------------------------------
# Tasks
# --------------------------------------------------------------------------------------------------


class TrainTask(ABC):
    """What is trained and how its loss is computed; `run_training` does everything else."""

    name: str = "train"

    @property
    @abstractmethod
    def num_samples(self) -> int:
        """Size of the dataset the data order permutes."""

    @abstractmethod
    def build(self, device: torch.device) -> nn.Module:
        """The module holding the trainable parameters (all others frozen), on `device`, in train mode."""

    @abstractmethod
    def loss(self, module: nn.Module, indices: list[int], generator: torch.Generator) -> torch.Tensor:
        """The scalar loss of one micro-batch; every random draw must come from `generator`."""

    @abstractmethod
    def save_final(self, module: nn.Module, out: Path) -> Path:
        """Write the task's result under `out` (atomically) and return its path."""

    def trainable_state(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """The tensors a checkpoint must hold to restore `module` (default: parameters that train)."""
        return {k: p.detach() for k, p in module.named_parameters() if p.requires_grad}

    def load_trainable_state(self, module: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        own = dict(module.named_parameters())
        missing = sorted(set(self.trainable_state(module)) - set(tensors))
        if missing:
            raise CheckpointError(f"checkpoint lacks {len(missing)} trainable tensors, e.g. {missing[0]}")
        import torch

        with torch.no_grad():
            for k, v in tensors.items():
                own[k].copy_(v)

    def fingerprint(self) -> dict[str, Any]:
        """Task options a resumed run must share with the checkpoint (data, model, ...)."""
        return {}

    def after_step(self, module: nn.Module) -> None:  # noqa: B027 - optional hook
        """Called after every optimizer step (e.g. to re-impose a constraint)."""


class WholeModuleTask(TrainTask):
    """A task whose checkpoints hold the module's whole state dict (buffers too): the UNet and VAE stages."""

    def trainable_state(self, module: nn.Module) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in module.state_dict().items()}

    def load_trainable_state(self, module: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        module.load_state_dict(tensors, strict=True)


# --------------------------------------------------------------------------------------------------
# Seeds and data order
# --------------------------------------------------------------------------------------------------


def derive_seed(*keys: int) -> int:
    """A 63-bit seed from integer keys (numpy's SeedSequence hashing: well mixed, platform-stable)."""
    import numpy as np

    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


_ORDER_SALT = 0x0D47A
_STEP_SALT = 0x57E9


def data_indices(seed: int, num_samples: int, start: int, count: int) -> list[int]:
    """Items `start .. start+count` of the endless stream "epoch 0 permuted, epoch 1 permuted, ...".

    Each epoch's permutation is seeded by (seed, epoch), so any position of the stream is known
    without replaying it: a resumed run reads exactly the items the uninterrupted run would.
    """
    import torch

    if num_samples < 1:
        raise ValueError("the dataset is empty")
    out: list[int] = []
    perms: dict[int, list[int]] = {}
    for g in range(start, start + count):
        epoch, pos = divmod(g, num_samples)
        if epoch not in perms:
            gen = torch.Generator().manual_seed(derive_seed(_ORDER_SALT, seed, epoch))
            perms[epoch] = torch.randperm(num_samples, generator=gen).tolist()
        out.append(perms[epoch][pos])
    return out


def step_generator(seed: int, step: int, slot: int = 0) -> torch.Generator:
    """The CPU generator of one micro-batch: noise, timesteps, crops and dropout of its `slot` in the step's global
    batch (micro-batch x processes + process). Keyed by the slot, not by the process, so that P processes draw what
    one process with P times the gradient accumulation draws: the same samples, the same noise."""
    import torch

    return torch.Generator().manual_seed(derive_seed(_STEP_SALT, seed, step, slot, 0))


# --------------------------------------------------------------------------------------------------
# Atomic files and checkpoints
# --------------------------------------------------------------------------------------------------


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path))


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"{path}: unreadable checkpoint file ({exc}); delete this checkpoint folder "
                              "and its `latest` marker to resume from an older one") from exc


def _optimizer_to_files(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Optimizer state as tensors (safetensors) + JSON: per-parameter tensors keyed `state.<i>.<name>`."""
    import torch

    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in sd["state"].items():
        for key, val in st.items():
            if isinstance(val, torch.Tensor):
                tensors[f"state.{pid}.{key}"] = val
            else:
                scalars.setdefault(str(pid), {})[key] = val
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, val in tensors.items():
        _, pid, key = name.split(".", 2)
        state.setdefault(int(pid), {})[key] = val
    for pid, extra in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(extra)
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    return {"state": state, "param_groups": groups}


def _step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def latest_checkpoint(out: Path) -> Path | None:
    """The folder named by `OUT/checkpoints/latest`, or None when the run has no checkpoint yet."""
    root = Path(out) / CHECKPOINTS_DIR
    marker = root / LATEST_FILE
    if not marker.is_file():
        return None
    name = marker.read_text(encoding="utf-8").strip()
    path = root / name
    if not name.startswith("step-") or "/" in name or not (path / STATE_FILE).is_file():
        raise CheckpointError(
            f"{marker}: names {name!r}, which is not a complete checkpoint folder; delete {marker} (and the "
            f"folder) to start over, or point it at an existing step-* folder in {root}"
        )
    return path


def _save_checkpoint(out: Path, step: int, task_state: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                     ema: _EMA | None, state: dict[str, Any], keep: int) -> Path:
    root = Path(out) / CHECKPOINTS_DIR
    final = root / _step_dir_name(step)
    opt_tensors, opt_meta = _optimizer_to_files(optimizer)
    with atomic_dir(final) as tmp:
        _save_tensors(tmp / TRAINABLE_FILE, task_state)
        _save_tensors(tmp / OPTIMIZER_FILE, opt_tensors)
        if ema is not None:
            _save_tensors(tmp / EMA_FILE, ema.shadow)
        payload = {"format": CHECKPOINT_FORMAT, "step": step, "optimizer": opt_meta, **state}
        (tmp / STATE_FILE).write_text(json.dumps(payload, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    atomic_write(root / LATEST_FILE, final.name + "\n")  # the marker last: it commits the checkpoint
    steps = sorted(p for p in root.glob("step-*") if p.is_dir() and p != final)
    for old in steps[: max(0, len(steps) - (keep - 1))]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _clean_temporaries(out: Path) -> None:
    root = Path(out) / CHECKPOINTS_DIR
    if root.is_dir():
        for p in root.glob(".step-*"):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------------
# EMA
# --------------------------------------------------------------------------------------------------


class _EMA:
    """Exponential moving average of the trainable tensors, with diffusers' warm-up of the decay."""

    def __init__(self, tensors: dict[str, torch.Tensor], decay: float) -> None:
        self.decay = decay
        self.shadow = {k: v.detach().float().clone() for k, v in tensors.items()}

    def update(self, tensors: dict[str, torch.Tensor], step: int) -> None:
        import torch

        d = min(self.decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for k, v in tensors.items():
                s = self.shadow[k]
                s.mul_(d).add_(v.detach().to(s.device, s.dtype), alpha=1 - d)


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------


def _reset_accelerate() -> None:
    """accelerate keeps its settings in process-wide singletons; clear them so the next run (another
    stage, another test) may use other settings. The distributed state itself is kept."""
    try:
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=False)
        GradientState._reset_state()
    except (ImportError, AttributeError):  # pragma: no cover - older/newer accelerate
        pass


def _check_out(out: Path, cfg: LoopConfig) -> Path | None:
    """The checkpoint to resume from (or None); refuses to mix a new run into an old run's folder."""
    _clean_temporaries(out)
    ckpt = latest_checkpoint(out)
    if not cfg.resume and ckpt is not None:
        raise CheckpointError(
            f"{ckpt.parent}: holds checkpoints of an earlier run; pass --resume to continue it, or choose "
            "another --out"
        )
    return ckpt if cfg.resume else None


def _check_fingerprint(ckpt: Path, saved: dict[str, Any], now: dict[str, Any]) -> None:
    diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if diff:
        details = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs now {now.get(k)!r}" for k in diff[:4])
        raise CheckpointError(
            f"{ckpt}: was written with other options ({details}); resume with the same options, or start a "
            "new run in another --out"
        )


def run_training(task: TrainTask, cfg: LoopConfig, out: Path) -> LoopResult:
    """Train `task` to `cfg.max_steps` optimizer steps under accelerate; checkpoints and logs go to `out`.

    With `cfg.resume`, continues from `out`'s latest checkpoint (or starts fresh if there is none).
    Under `accelerate launch` every process takes its own slice of each global batch (batch-size per process;
    the global batch is processes x batch-size x grad-accum, with the same samples and noise whatever the split)
    and only the main process writes.
    """
    import torch
    from accelerate import Accelerator
    from tqdm import tqdm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = _check_out(out, cfg)
    fingerprint = {"loop": cfg.fingerprint(), "task": json.loads(json.dumps(task.fingerprint(), default=str))}

    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum)
    try:
        device = accelerator.device
        module = task.build(device)
        params = [p for p in module.parameters() if p.requires_grad]
        if not params:
            raise ValueError(f"{task.name}: nothing to train (no parameter requires grad)")
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                      weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)
        start, prior_seconds = 0, 0.0
        ema_state: dict[str, torch.Tensor] | None = None
        if ckpt is not None:
            state = json.loads((ckpt / STATE_FILE).read_text(encoding="utf-8"))
            if state.get("format") != CHECKPOINT_FORMAT:
                raise CheckpointError(f"{ckpt / STATE_FILE}: checkpoint format {state.get('format')}, this r2r "
                                      f"reads {CHECKPOINT_FORMAT}; start a new run in another --out")
            _check_fingerprint(ckpt, state.get("fingerprint", {}), fingerprint)
            task.load_trainable_state(module, _load_tensors(ckpt / TRAINABLE_FILE))
            optimizer.load_state_dict(_optimizer_from_files(_load_tensors(ckpt / OPTIMIZER_FILE), state["optimizer"]))
            if cfg.ema:
                ema_state = _load_tensors(ckpt / EMA_FILE)
            start, prior_seconds = int(state["step"]), float(state.get("seconds", 0.0))
            if start > cfg.max_steps:
                raise CheckpointError(f"{ckpt}: is at step {start}, past --max-steps {cfg.max_steps}; raise "
                                      "--max-steps or start a new run")
        ema = _EMA(task.trainable_state(module), cfg.ema_decay) if cfg.ema else None
        if ema is not None and ema_state is not None:
            ema.shadow = {k: v.to(device) for k, v in ema_state.items()}
        if ema is not None:
            ema.shadow = {k: v.to(device) for k, v in ema.shadow.items()}

        module, optimizer = accelerator.prepare(module, optimizer)
        raw = accelerator.unwrap_model(module)
        procs, rank = accelerator.num_processes, accelerator.process_index
        log_path = out / LOG_FILE
        t0 = time.perf_counter()
        losses: list[float] = []
        step = start
        bar = tqdm(total=cfg.max_steps, initial=start, desc=task.name, unit="step", dynamic_ncols=True,
                   disable=not (cfg.progress and accelerator.is_main_process))
        done_this_session = 0
        stopped = False
        try:
            while step < cfg.max_steps:
                for g in optimizer.param_groups:
                    g["lr"] = cfg.lr_at(step)
                step_loss = 0.0
                cuda = [torch.cuda.current_device()] if device.type == "cuda" else []
                with torch.random.fork_rng(devices=cuda):
                    for micro in range(cfg.grad_accum):
                        slot = micro * procs + rank  # the micro-batch's place in the step's global batch
                        torch.manual_seed(derive_seed(_STEP_SALT, cfg.seed, step, slot, 1))  # e.g. dropout layers
                        first = ((step * cfg.grad_accum + micro) * procs + rank) * cfg.batch_size
                        idx = data_indices(cfg.seed, task.num_samples, first, cfg.batch_size)
                        gen = step_generator(cfg.seed, step, slot)
                        with accelerator.accumulate(module):
                            with accelerator.autocast():
                                loss = task.loss(module, idx, gen)
                            if not torch.isfinite(loss):
                                raise FloatingPointError(f"{task.name}: loss is {loss.item()} at step {step}; "
                                                         "lower --lr or use --mixed-precision no")
                            accelerator.backward(loss)
                            if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                                accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                            optimizer.step()
                            optimizer.zero_grad(set_to_none=True)
                        step_loss += accelerator.gather(loss.detach().float()[None]).mean().item() / cfg.grad_accum
                task.after_step(raw)
                if ema is not None:
                    ema.update(task.trainable_state(raw), step)
                step += 1
                done_this_session += 1
                losses.append(step_loss)
                bar.update(1)
                bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{cfg.lr_at(step - 1):.2e}")
                seconds = prior_seconds + time.perf_counter() - t0
                if accelerator.is_main_process:
                    with open(log_path, "a", encoding="utf-8") as fh:
                        fh.write(json.dumps({"step": step, "loss": step_loss, "lr": cfg.lr_at(step - 1),
                                             "seconds": round(seconds, 3)}) + "\n")
                if step % cfg.checkpoint_every == 0 or step == cfg.max_steps:
                    accelerator.wait_for_everyone()
                    if accelerator.is_main_process:
                        _save_checkpoint(out, step, task.trainable_state(raw), optimizer.optimizer, ema,
                                         {"fingerprint": fingerprint, "seconds": seconds, "loss": step_loss},
                                         cfg.checkpoints_total_limit)
                if cfg.stop_after is not None and done_this_session >= cfg.stop_after and step < cfg.max_steps:
                    stopped = True
                    break
        finally:
            bar.close()
        session = time.perf_counter() - t0
        total = prior_seconds + session
        last = losses[-1] if losses else None
        if stopped:
            return LoopResult(step, False, None, total, session, last, losses)
        accelerator.wait_for_everyone()
        output = None
        if accelerator.is_main_process:
            if ema is not None:
                task.load_trainable_state(raw, ema.shadow)
            output = task.save_final(raw, out)
        accelerator.wait_for_everyone()
        return LoopResult(step, True, output, total, session, last, losses)
    finally:
        accelerator.free_memory()
        _reset_accelerate()
