"""Training engines: what steps the optimiser and writes checkpoints, behind one small interface.

``train()`` runs one loop; the engine decides *where* and *how* the trainee's parameters live:

- :class:`PlainEngine`: one process, ``torch.optim.AdamW``, a ``LambdaLR`` warm-up/decay, grad-norm
  clipping, checkpoints as ``trainable.safetensors`` + ``optimizer.pt`` (read back with
  ``weights_only=True``).
- :class:`DeepSpeedEngine`: ``deepspeed.initialize`` with the user's JSON config (ZeRO stage 1/2/3,
  CPU offload, bf16/fp16), one process per rank (launched by ``deepspeed`` or ``torchrun``). The
  whole :class:`~kvkd.train.trainer.Trainee` (student, aligners, router) is the engine's model, so
  projection and router parameters are trained, partitioned and checkpointed with it. Without an
  ``optimizer`` section in the config a ``torch.optim.AdamW`` is passed in (no fused kernel to
  compile); the lr schedule is the same ``LambdaLR``, replayed to the resumed step from this run's ``--steps``.

Both write, per checkpoint ``checkpoints/step-N/``, ``trainable.safetensors`` (the gathered trainable
tensors, full size, what ``kvkd eval``/``kvkd export`` read) and ``state.json`` last: a checkpoint
without ``state.json`` is incomplete and ignored. The DeepSpeed engine adds DeepSpeed's own files
(model and optimiser partitions of every rank) next to them; resuming reads those.

Global batch semantics (both engines): step s uses the rows ``_batches`` gives for s (one shuffle
of the whole data set per epoch, as in one process); rank r of W reads ``rows[r::W]``. Each rank's
loss is scaled by ``W * n_r / n`` so that DeepSpeed's mean of rank gradients equals the gradient
of the global batch's per-example mean (see :func:`rank_rows`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from kvkd.models import resolve_device
from kvkd.train.rundir import NonFiniteError, RunDir, disk_error, make_readable, nonfinite_tensors

def to_device(batch, device: torch.device):
    """Move every tensor of a (nested) batch to ``device``; other values are kept."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def rank_rows(rows: list[int], rank: int, world: int) -> tuple[list[int], float]:
    """This rank's share of a global batch and its loss scale.

    Args:
        rows: the global batch (data-set row indices), as one process would use them.
        rank, world: this process and the number of processes.
    Returns:
        (rows[rank::world], world * len(mine) / len(rows)): scaling each rank's per-example-mean
        loss by this factor makes the mean over ranks equal the global batch's per-example mean.
    """
    mine = rows[rank::world]
    return mine, world * len(mine) / len(rows)


def check_batches_split(n: int, batch_size: int, world: int) -> None:
    """Refuse a data size / batch size / world size for which some rank would get no row.

    Raises:
        ValueError: if batch_size < world, or the last batch of an epoch (n % batch_size rows)
            is smaller than the number of ranks.
    """
    last = n % batch_size
    if batch_size < world or 0 < last < world:
        raise ValueError(
            f"{world} ranks cannot share batches of {batch_size} rows over {n} rows (the last batch of each epoch has "
            f"{last or batch_size}); use --batch-size >= {world} such that {n} % batch_size is 0 or >= {world}"
        )


def lr_lambda(cfg):
    """Linear warm-up over ``cfg.warmup_steps`` then linear decay to 0 at ``cfg.steps`` (factor of cfg.lr)."""

    def factor(s: int) -> float:
        return min((s + 1) / max(1, cfg.warmup_steps), max(0.0, (cfg.steps - s) / max(1, cfg.steps - cfg.warmup_steps)))

    return factor


def optimised_params(trainee: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Parameters the engine's optimiser steps: all trainable ones except those of a router that
    updates itself (``trains_itself``, e.g. a REINFORCE policy with its own optimiser)."""
    router = getattr(trainee, "router", None)
    skip = {id(p) for p in router.parameters()} if getattr(router, "trains_itself", False) else set()
    return [p for p in trainee.parameters() if p.requires_grad and id(p) not in skip]


def checkpoint_dir(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step-{step:07d}"


def prune_checkpoints(run: Path, keep: int) -> None:
    """Keep the newest ``keep`` complete checkpoints (and any newer incomplete one). Each old one
    is renamed to ``.del-step-N`` before it is deleted, so a kill mid-delete leaves no ``step-*``
    folder that looks like a checkpoint."""
    for old in RunDir(run).checkpoints()[: -max(keep, 1)]:
        doomed = old.with_name(f".del-{old.name}")
        os.replace(old, doomed)
        shutil.rmtree(doomed, ignore_errors=True)


def _refuse_nonfinite(state: dict, step: int) -> None:
    bad = nonfinite_tensors(state)
    if bad:
        raise NonFiniteError(f"step {step}: the trained tensors hold NaN/inf ({', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}); "
                             "no checkpoint written: the run diverged (lower --lr, or resume from the newest checkpoint)")


@dataclass
class EngineInfo:
    """What ``config.json`` records about the engine."""

    kind: str
    world_size: int
    zero_stage: int | None = None
    precision: str = "float32"


class PlainEngine:
    """One process: AdamW + LambdaLR + grad clipping on ``device`` (the behaviour before DeepSpeed)."""

    rank = 0
    world_size = 1
    local_rank = 0

    def __init__(self, trainee: torch.nn.Module, cfg, device: torch.device):
        self.device = device
        self.module = trainee.to(device)
        self.params = optimised_params(trainee)
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(cfg))
        self.grad_clip = cfg.grad_clip
        self.info = EngineInfo("plain", 1, precision=cfg.dtype)

    def __call__(self, *args):
        return self.module(*args)

    def autocast(self):
        return contextlib.nullcontext()

    def lr(self) -> float:
        return self.sched.get_last_lr()[0]

    def all_finite(self, loss: torch.Tensor) -> bool:
        """Whether the step's loss is finite (on every rank)."""
        return bool(torch.isfinite(loss.detach()).all())

    def backward_step(self, loss: torch.Tensor, step: bool = True) -> bool:
        """Add ``loss``'s gradients; with ``step`` (the last micro-batch of gradient accumulation)
        clip them, step the optimiser and the schedule and start the next step from zero. Returns
        False (and skips the update, not the schedule) when the gradient norm is NaN/inf."""
        if not getattr(self, "_accumulating", False):
            self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self._accumulating = not step
        if not step:
            return True
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        finite = bool(torch.isfinite(norm))
        if finite:
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.sched.step()
        return finite

    def skip_step(self) -> None:
        """A step whose loss is non-finite: no update (gradients accumulated in it are dropped),
        the schedule moves on (step s keeps lr(s))."""
        self.opt.zero_grad(set_to_none=True)
        self._accumulating = False
        self.sched.step()

    def drop_micro_batch(self, loss: torch.Tensor, step: bool = True) -> None:
        """A micro-batch of a step already known to be skipped (a non-finite loss in it or before
        it): no backward; at the step's last micro-batch (``step``) :meth:`skip_step`."""
        if step:
            self.skip_step()

    def save(self, run: Path, step: int, keep: int) -> Path:
        """Write ``checkpoints/step-N`` (weights, optimiser, ``state.json``) through a temp folder.

        Raises:
            NonFiniteError: the tensors hold NaN/inf (nothing written).
            RunFolderError: a write failed (e.g. disk full; the temp folder is removed).
        """
        state = self.module.checkpoint_state()
        _refuse_nonfinite(state, step)
        final = checkpoint_dir(run, step)
        tmp = run / "checkpoints" / f".tmp-step-{step:07d}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir(parents=True)
            save_file(state, str(tmp / "trainable.safetensors"))
            torch.save(self.opt.state_dict(), tmp / "optimizer.pt")  # read back with weights_only=True
            (tmp / "state.json").write_text(json.dumps({"step": step, "engine": "plain"}))
            make_readable(tmp)
        except (OSError, RuntimeError) as err:
            shutil.rmtree(tmp, ignore_errors=True)
            raise disk_error(tmp, err) from None
        if final.exists():
            os.replace(final, final.with_name(f".del-{final.name}"))
            shutil.rmtree(final.with_name(f".del-{final.name}"), ignore_errors=True)
        os.replace(tmp, final)  # a checkpoint folder exists only once complete
        prune_checkpoints(run, keep)
        return final

    def load(self, ckpt: Path) -> int:
        """Restore weights, optimiser and schedule from ``ckpt``; returns its step.

        Raises:
            ValueError: the checkpoint was written by the DeepSpeed engine.
        """
        if not (ckpt / "optimizer.pt").is_file():
            raise ValueError(f"{ckpt} is a DeepSpeed checkpoint (no optimizer.pt): resume it with --deepspeed CONFIG")
        self.module.load_checkpoint_state(load_file(str(ckpt / "trainable.safetensors"), device=str(self.device)))
        self.opt.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True, map_location=self.device))
        start = json.loads((ckpt / "state.json").read_text())["step"]
        with warnings.catch_warnings():  # replaying the schedule before this run's first optimiser step is intended
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
            for _ in range(start):
                self.sched.step()
        return start

    def all_mean(self, values: torch.Tensor, weight: float) -> torch.Tensor:
        return values

    def barrier(self) -> None:
        pass


class DeepSpeedEngine:
    """The trainee on a DeepSpeed engine (ZeRO 1/2/3, offload, bf16/fp16 from the JSON config).

    Args:
        trainee: the Trainee (all of it becomes the engine's model), or any module with
            ``checkpoint_state``/``load_checkpoint_state`` (``kvkd sft``'s ``SFTModule``).
        cfg: TrainConfig or SFTConfig; ``cfg.deepspeed`` is the JSON config path. ``train_batch_size``,
            ``train_micro_batch_size_per_gpu`` and ``gradient_accumulation_steps`` may be omitted or
            ``"auto"`` (set from ``cfg.batch_size``, ``cfg.grad_accum`` and the world size);
            ``gradient_clipping`` defaults to ``cfg.grad_clip``.
    Raises:
        ValueError: unreadable config, or batch settings that contradict ``--batch-size``.
        ImportError: deepspeed is not installed (``pip install 'kvkd[deepspeed]'``).
    """

    def __init__(self, trainee: torch.nn.Module, cfg):
        try:
            import deepspeed
        except ImportError as e:  # pragma: no cover - the CI installs it
            raise ImportError("--deepspeed needs DeepSpeed: pip install 'kvkd[deepspeed]'") from e
        from deepspeed.accelerator import get_accelerator

        deepspeed.init_distributed()  # backend from the accelerator: nccl on CUDA, gloo on CPU
        import torch.distributed as dist

        self.dist = dist
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        ds = self._config(cfg)
        if getattr(getattr(trainee, "router", None), "trains_itself", False) and (self.world_size > 1 or ds.get("zero_optimization", {}).get("stage", 0) == 3):
            raise ValueError(
                f"router {cfg.router!r} updates its own parameters with its own optimiser: on several ranks each would train "
                "its own copy (and ZeRO-3 partitions them); train it in one process, or pick another router"
            )
        params = optimised_params(trainee)
        optimizer = None if "optimizer" in ds else torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.engine, _, _, _ = deepspeed.initialize(
            model=trainee,
            model_parameters=params,
            optimizer=optimizer,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg)),
            config=ds,
        )
        self.module = self.engine.module
        self.device = self.engine.device
        self.stage = self.engine.zero_optimization_stage()
        self.half = torch.bfloat16 if self.engine.bfloat16_enabled() else torch.float16 if self.engine.fp16_enabled() else None
        self.device_type = get_accelerator().device_name()
        if self.half is not None:  # autocast leaves layer_norm alone, and it refuses fp32 inputs with half weights
            for m in self.module.modules():
                if isinstance(m, torch.nn.LayerNorm) and m.weight is not None:
                    m.register_forward_pre_hook(_input_to_weight_dtype)
        self.info = EngineInfo("deepspeed", self.world_size, self.stage, str(self.half).replace("torch.", "") if self.half else cfg.dtype)
        self._drop = self._skipped = False
        self._guard_optimizer()

    def _config(self, cfg) -> dict:
        path = Path(cfg.deepspeed)
        if not path.is_file():
            raise ValueError(f"--deepspeed {path}: no such file (see kvkd/configs/ds_zero*.json for examples)")
        try:
            ds = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"--deepspeed {path}: not valid JSON ({e})") from None
        micro = cfg.batch_size // self.world_size
        accum = getattr(cfg, "grad_accum", 1)
        wanted = {"train_batch_size": cfg.batch_size * accum, "train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": accum}
        if cfg.batch_size % self.world_size:
            raise ValueError(f"--batch-size {cfg.batch_size} is not a multiple of the {self.world_size} ranks")
        for key, value in wanted.items():
            given = ds.get(key, "auto")
            if given == "auto":
                ds[key] = value
            elif given != value:
                raise ValueError(f"--deepspeed {path}: {key} = {given} contradicts --batch-size {cfg.batch_size} on {self.world_size} ranks (expected {value}; or set it to \"auto\")")
        if ds.get("gradient_clipping", "auto") == "auto":
            ds["gradient_clipping"] = cfg.grad_clip
        # a torch optimiser under ZeRO-Offload: allowed, no DeepSpeedCPUAdam to compile
        ds.setdefault("zero_allow_untested_optimizer", True)
        ds.setdefault("zero_force_ds_cpu_optimizer", False)
        ds.setdefault("steps_per_print", 10**9)  # progress is kvkd's (rank 0)
        return ds

    def __call__(self, *args):
        return self.engine(*args)

    def autocast(self):
        """bf16/fp16 configs convert the weights; autocast lets fp32 inputs (teacher rows) meet them."""
        if self.half is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.half)

    def lr(self) -> float:
        return self.engine.get_lr()[0]

    def all_finite(self, loss: torch.Tensor) -> bool:
        """Whether the step's loss is finite on every rank (all ranks agree, so all skip together)."""
        bad = torch.tensor([0.0 if bool(torch.isfinite(loss.detach()).all()) else 1.0], device=self.device)
        self.dist.all_reduce(bad)
        return float(bad) == 0.0

    def backward_step(self, loss: torch.Tensor, step: bool = True) -> bool:
        """DeepSpeed's backward and step (clipping per the config's ``gradient_clipping``). The
        trainer scales each micro-batch's loss itself; DeepSpeed counts the micro-batches
        (``gradient_accumulation_steps``) and steps optimiser, clipping and schedule at the boundary.

        At the boundary the update is skipped, on every rank, when a gradient is NaN/inf (the
        guard on the optimiser's step, :meth:`_guard_optimizer`, or ZeRO's own overflow check)
        or when :meth:`drop_micro_batch` marked the step; the schedule moves on either way (as
        :class:`PlainEngine`'s). Returns False when the boundary's update was skipped, else True.
        """
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.engine.backward(loss, scale_wrt_gas=False)
        self.engine.step()  # DeepSpeed's micro-step counter and gradient buffers move on every micro-batch
        if not boundary:
            return True
        applied = self.engine.was_step_applied()
        if not applied:  # ZeRO/fp16 overflow: DeepSpeed skipped the update and left the schedule where it was
            self.engine.lr_scheduler.step()
        skipped = self._skipped or not applied
        self._skipped = self._drop = False
        return not skipped

    def drop_micro_batch(self, loss: torch.Tensor, step: bool = True) -> None:
        """A micro-batch of a step already known to be skipped (a non-finite loss in it or before
        it): it still goes through DeepSpeed's backward and step, so the micro-step counter and
        the gradient buffers stay in step with the accumulation boundary, but the step's update is
        skipped (its gradients are dropped by DeepSpeed's own ``zero_grad``) and the schedule
        moves on."""
        self._drop = True
        self.backward_step(loss, step)

    def skip_step(self) -> None:
        """A whole step skipped without a backward: the schedule moves on (only valid at an
        accumulation boundary; the trainer uses :meth:`drop_micro_batch`)."""
        self.engine.lr_scheduler.step()

    def _guard_optimizer(self) -> None:
        """Wrap the innermost torch optimiser's ``step`` (what DeepSpeed calls at the boundary,
        once per ZeRO parameter group) so it does nothing when the step is marked dropped or a
        gradient it would apply is NaN/inf on any rank: no update, no optimiser state change, as
        :class:`PlainEngine` skips. (ZeRO-1/2 also detects a non-finite gradient norm itself; the
        guard covers ZeRO-0/3, bf16 and dropped steps.)"""
        inner = self.engine.optimizer
        while not isinstance(inner, torch.optim.Optimizer) and hasattr(inner, "optimizer"):
            inner = inner.optimizer
        real = inner.step

        def step(*args, **kwargs):
            bad = self._drop or any(p.grad is not None and not bool(torch.isfinite(p.grad).all()) for g in inner.param_groups for p in g["params"])
            flag = torch.tensor([1.0 if bad else 0.0], device=self.device)
            self.dist.all_reduce(flag)
            if float(flag) > 0:
                self._skipped = True
                return None
            return real(*args, **kwargs)

        inner.step = step

    def _gathered(self):
        """Full (unpartitioned) trainable parameters on every rank for the duration (ZeRO-3)."""
        import deepspeed

        if self.stage < 3:
            return contextlib.nullcontext()
        return deepspeed.zero.GatheredParameters([p for p in self.module.parameters() if p.requires_grad], modifier_rank=None)

    def save(self, run: Path, step: int, keep: int) -> Path:
        """DeepSpeed's checkpoint (all ranks) + ``trainable.safetensors`` and ``state.json`` (rank 0)."""
        final = checkpoint_dir(run, step)
        with self._gathered():
            state = self.module.checkpoint_state() if self.rank == 0 else None
        bad = torch.tensor([1.0 if self.rank == 0 and nonfinite_tensors(state) else 0.0], device=self.device)
        self.dist.all_reduce(bad)  # every rank refuses together
        if float(bad):
            _refuse_nonfinite(state if self.rank == 0 else {"(on rank 0)": torch.tensor(float("nan"))}, step)
        if self.rank == 0 and final.exists():
            os.replace(final, final.with_name(f".del-{final.name}"))
            shutil.rmtree(final.with_name(f".del-{final.name}"))
        self.barrier()
        try:
            self.engine.save_checkpoint(str(run / "checkpoints"), tag=final.name, exclude_frozen_parameters=True, save_latest=False)
            if self.rank == 0:
                save_file({k: v.cpu() for k, v in state.items()}, str(final / "trainable.safetensors"))
                tmp = final / ".state.json.tmp"
                tmp.write_text(json.dumps({"step": step, "engine": "deepspeed", "world_size": self.world_size, "zero_stage": self.stage}))
                make_readable(final)
                os.replace(tmp, final / "state.json")  # written last: marks the checkpoint complete
                prune_checkpoints(run, keep)
        except (OSError, RuntimeError) as err:
            if self.rank == 0:
                shutil.rmtree(final, ignore_errors=True)
            raise disk_error(final, err) from None
        self.barrier()
        return final

    def load(self, ckpt: Path) -> int:
        """Resume module, optimiser partitions and lr schedule from a DeepSpeed checkpoint.

        Raises:
            ValueError: the checkpoint was written by the plain engine.
        """
        state = json.loads((ckpt / "state.json").read_text())
        if state.get("engine") != "deepspeed":
            raise ValueError(f"{ckpt} was written without DeepSpeed: resume it without --deepspeed")
        path, _ = self.engine.load_checkpoint(str(ckpt.parent), tag=ckpt.name, load_module_strict=False, load_lr_scheduler_states=False)
        if path is None:
            raise ValueError(f"DeepSpeed could not load the checkpoint {ckpt} (written by another world size or ZeRO stage?)")
        # the schedule follows this run's --steps (a resumed run may train longer), as in PlainEngine
        for _ in range(state["step"]):
            self.engine.lr_scheduler.step()
        return state["step"]

    def all_mean(self, values: torch.Tensor, weight: float) -> torch.Tensor:
        """Weighted mean over ranks of a float vector (weight: this rank's rows)."""
        buf = torch.cat([values.double() * weight, torch.tensor([weight], dtype=torch.float64)])
        self.dist.all_reduce(buf)
        return (buf[:-1] / buf[-1]).float()

    def barrier(self) -> None:
        self.dist.barrier()


def _input_to_weight_dtype(module, args):
    return (args[0].to(module.weight.dtype), *args[1:])


def check_deepspeed_launch(cfg, env=None) -> None:
    """Before anything heavy: a ``--deepspeed`` run needs its config file and a distributed
    launcher (torchrun or deepspeed set ``LOCAL_RANK``/``RANK``); without one DeepSpeed falls back
    to MPI discovery and fails deep inside its init (``No module named 'mpi4py'``).

    Raises:
        ValueError: the config file is missing, or no launcher started this process.
    """
    if not getattr(cfg, "deepspeed", ""):
        return
    env = os.environ if env is None else env
    if not os.path.isfile(cfg.deepspeed):
        raise ValueError(f"--deepspeed {cfg.deepspeed}: no such file; give a DeepSpeed JSON config (kvkd/configs/ds_zero2.json is one)")
    if "LOCAL_RANK" not in env and "RANK" not in env:
        raise ValueError(f"--deepspeed needs a distributed launcher: run `torchrun --nproc_per_node N -m kvkd.cli ...` "
                         f"(or `deepspeed`), with DS_ACCELERATOR=cpu on a machine without GPUs")


def build_engine(trainee: torch.nn.Module, cfg):
    """The engine a config asks for: DeepSpeed if ``cfg.deepspeed`` is set, else plain on ``cfg.device``."""
    if cfg.deepspeed:
        return DeepSpeedEngine(trainee, cfg)
    return PlainEngine(trainee, cfg, resolve_device(cfg.device))
