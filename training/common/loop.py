"""The training loop every trainer shares: a trainer is its data, its loss and its sampling (a `Task`),
and this module does the rest.

    spec = parse_args(argv)                            # the run resolved once (training.common.spec.RunSpec)
    run = TrainingRun(spec)                            # accelerator, resume point, seed, output folder
    ... load the data (bad input fails in seconds), then the model ...
    steps = run.total_steps(len(dataset))              # --max_train_steps, else epochs of the data
    config, names = run.adapt(unet, steps)             # inject, or load the checkpoint's adapter
    run.fit(unet, task, dataset, collate, info={...})  # prepare, steps, checkpoints, final save
    # main() is training.common.runtime.run_trainer(parse_args, train): exit codes and exit_status.json

What it guarantees, for every trainer:
- exact resume: the batch order of an epoch is a function of (seed, epoch), each micro-batch's noise a
  function of (seed, step, micro-batch, process), and the checkpoint holds the adapter plus optimizer,
  scheduler and RNG states, so a run SIGKILLed after checkpoint N and resumed ends bit-identical;
- exit codes: 0 done, 2 bad input (TrainingError: one `error:` line), 1 diverged (the loss or the
  gradient norm became NaN/inf: DivergedError, nothing saved after the last good checkpoint) or a write
  failed (a full disk: one `error:` line, the last complete checkpoint untouched), 143 stopped by SIGTERM
  (a checkpoint at the current step, without samples, then a `stopped:` line saying how to resume);
  the main process records the code and its line in RUN/exit_status.json (`accelerate launch` turns
  every non-zero code into its own 1: the file is the trainer's own word);
- SIGKILL at any moment, a checkpoint write included, loses at most the steps after the last complete
  checkpoint (training/common/faults.py kills at exact points of the write in the tests);
- --deterministic: deterministic kernels and a fixed thread count, for bit-identical reruns on one machine
  (see `make_deterministic`);
- per-step weight distances in metrics.jsonl (the followed layer every step, every adapted layer every
  --distance_logging_steps steps and at checkpoints); checkpoints with the task's samples; DDP over any
  number of processes (only the main process writes);
- with --ema_decay, a moving average of the adapter beside every checkpoint and the final adapter (ema/, with
  its samples), resumed bit-identically (training/common/ema.py); training itself never sees it.
"""
from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

import lowrank
from ground import runfolder

from . import DivergedError, StoppedError, TrainingError
from .batches import epoch_loader, mix_seed, steps_per_epoch, total_steps
from .checkpoint import (
    check_resumed_adapter,
    load_accelerator_state,
    read_state,
    register_adapter_hooks,
    resolve_resume,
    save_checkpoint,
)
from .config import write_config
from .ema import RunAverage
from .faults import fault_point
from .model_card import write_run_card
from .runtime import StopRequest, quiet_libraries, refuse_sharding, set_threads, start_accelerator
from .spec import RunSpec
from .task import Task
from .tracking import (
    DistanceProbe,
    MetricsLogger,
    rank_records,
    resolve_report_to,
    run_info,
    setup_console,
    write_rank_heatmap,
)

logger = setup_console()


# ----- the run ----------------------------------------------------------------------------------------------
class TrainingRun:
    """Accelerator, resume point, seed and output folder of one run; `adapt` then `fit`."""

    def __init__(self, spec: RunSpec):
        self.spec, self.args, self.project = spec, spec.args, spec.task.name
        args = spec.args
        set_threads(args)   # before the accelerator: cuBLAS reads its setting at CUDA init
        self.output_dir = spec.output_dir
        self.report_to = resolve_report_to(args.report_to)
        self.accelerator = acc = start_accelerator(args, self.output_dir, self.report_to)
        self.is_main, self.process_index, self.num_processes, self.device = (
            acc.is_main_process, acc.process_index, acc.num_processes, acc.device)
        setup_console(self.is_main)
        refuse_sharding(acc)
        quiet_libraries()
        # frozen weights in the mixed-precision dtype; trainable parameters stay fp32
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(acc.mixed_precision, torch.float32)
        # The resume point and the seed come first: the seed drives the adapter init, data order and noise.
        self.resume_dir, self.state, self.seed = self.resume_point_and_seed()
        self.prepare_output_dir()
        acc.wait_for_everyone()

    def resume_point_and_seed(self) -> tuple[Path | None, dict, int]:
        """The checkpoint to resume from (or None), its state, and the run's seed (set in every RNG)."""
        from accelerate.utils import broadcast_object_list, set_seed

        args = self.args
        resume_dir = resolve_resume(self.output_dir, args.resume_from_checkpoint)
        if args.resume_from_checkpoint and resume_dir is None:
            logger.info("no checkpoint in %s yet; starting a new run", self.output_dir)
        state = read_state(resume_dir) if resume_dir else {}
        seed = args.seed if args.seed is not None else state.get("seed")
        if seed is None:   # pick one on the main process and share it, so all processes agree
            seed = broadcast_object_list([random.SystemRandom().randrange(2**31)])[0]
        set_seed(seed)
        return resume_dir, state, seed

    def prepare_output_dir(self) -> None:
        if not self.is_main:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        runfolder.remove_stale(self.output_dir)
        if self.resume_dir is None and runfolder.list_checkpoints(self.output_dir):
            logger.warning("%s holds checkpoints of an earlier run; new ones replace those with the same step, "
                           "and --resume_from_checkpoint latest picks the newest of all", self.output_dir)

    def total_steps(self, num_examples: int, groups: list | None = None) -> int:
        """The run's number of optimizer steps on `num_examples` examples (see `total_steps`)."""
        return total_steps(self.args, num_examples, self.num_processes, groups)

    def adapt(self, model: torch.nn.Module, total_steps: int, task: Task | None = None,
              **fill) -> tuple[lowrank.AdapterConfig, list[str]]:
        """Inject the adapter from the flags, or, resuming, load the checkpoint's into the plain model.

        Loading into the plain model rebuilds the adapter from the saved tensors before anything touches
        the base weights, so base and adapter are bit-identical to the run that wrote the checkpoint.
        `fill` gives defaults for adapter fields the user left unset (e.g. target_modules per task)."""
        task = task or Task()
        saved = lowrank.read_adapter(self.resume_dir)[0] if self.resume_dir else None
        # values the trainer filled in (not the user) keep the checkpoint's, so a resumed run may change
        # --max_train_steps without silently changing a schedule the adapter already follows
        steps = saved.dyndora_total_steps if saved else total_steps
        config = self.spec.adapter_for(**fill, dyndora_total_steps=steps)
        if saved is not None:
            check_resumed_adapter(saved, config, self.resume_dir)
            names = task.load(model, self.resume_dir)
        else:
            names = lowrank.inject(model, config)
        for p in model.parameters():   # trainable parameters in fp32 (diffusers' cast_training_params)
            if p.requires_grad:
                p.data = p.data.float()
        self.config, self.names = config, names
        return config, names

    def fit(self, model: torch.nn.Module, task: Task, dataset, collate: Callable, info: dict | None = None,
            num_train_steps: int | None = None) -> Path:
        """Train `model` (adapted by `adapt`) on `dataset` with `task.loss`; returns the output folder.

        The phases, in order: prepare (optimizer, scheduler, resume state, run.json), then per optimizer
        step: the step, its metrics row, checkpoint/validation/stop; then finish (the final save)."""
        self.task = task
        self.clear_exit_status()
        groups = getattr(dataset, "groups", None)   # a dataset whose batches keep to groups (aspect buckets)
        self.per_epoch = steps_per_epoch(len(dataset), self.args.train_batch_size,
                                         self.args.gradient_accumulation_steps, self.num_processes, groups)
        self.max_steps = max_steps = num_train_steps or self.total_steps(len(dataset), groups)
        self.num_epochs = math.ceil(max_steps / self.per_epoch)
        wrapped = self.prepare(model, task)
        step = self.resume_state()
        self.write_run_json(step, info)
        self.start_metrics(step)
        stop = self.stop_request = StopRequest(self.accelerator)
        wrapped.train()
        for epoch in range(step // self.per_epoch, self.num_epochs):
            loader, groups = epoch_loader(dataset, collate, self.args, epoch, step, self.per_epoch, self.seed,
                                          self.process_index, self.num_processes)
            for group, ends_epoch in groups:
                if step >= max_steps:   # resumed from the last step's checkpoint: only the final save is left
                    break
                t0 = time.perf_counter()
                losses, grad_norm = self.optimizer_step(wrapped, loader, group, step)
                step += 1
                self.hooks.after_optimizer_step(step)
                self.average.update(step)   # after the methods' own updates (Delta-LoRA's snapshot, pruning)
                self.log_step(step, epoch, losses, grad_norm, t0, ends_epoch or step == max_steps)
                self.checkpoint_or_validate(step)
                self.stop_if_requested(step)
                if step >= max_steps:
                    break
            if step >= max_steps:
                break
        self.progress.close()
        stop.restore()   # from here on a SIGTERM ends the process at once: only the final save is left
        self.finish(step)
        return self.output_dir

    # ----- prepare ----------------------------------------------------------------------------------------
    def clear_exit_status(self) -> None:
        if self.is_main:   # training starts here: an earlier attempt's word no longer holds (bad input before
            (self.output_dir / runfolder.EXIT_STATUS).unlink(missing_ok=True)   # this point leaves it alone)

    def prepare(self, model: torch.nn.Module, task: Task) -> torch.nn.Module:
        """Optimizer, scheduler and accelerate's wrapping; returns the wrapped (DDP) model."""
        from diffusers.optimization import get_scheduler

        args, acc = self.args, self.accelerator
        self.learning_rate = self.spec.learning_rate
        optimizer = torch.optim.AdamW(task.param_groups(model, self.learning_rate, args),
                                      betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
        # stepped once per optimizer step, not prepared (a prepared scheduler steps num_processes times)
        self.lr_scheduler = get_scheduler(args.lr_scheduler, optimizer, num_warmup_steps=args.lr_warmup_steps,
                                          num_training_steps=self.max_steps)
        register_adapter_hooks(acc, task.save)
        wrapped, self.optimizer = acc.prepare(model, optimizer)
        acc.register_for_checkpointing(self.lr_scheduler)
        self.model = acc.unwrap_model(wrapped)
        self.hooks = lowrank.step_hooks(self.model)   # every step, unconditionally: methods without hooks cost nothing
        self.probe = DistanceProbe(self.model, args.distance_logging_steps, self.spec.checkpointing_steps,
                                   self.max_steps, task.fig3_pattern)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.average = RunAverage(self.model, task, args, self.resume_dir)   # --ema_decay (else a no-op)
        return wrapped

    def resume_state(self) -> int:
        """Optimizer, scheduler and RNG states of the checkpoint (the adapter is in place); the step to start at."""
        if not self.resume_dir:
            return 0
        load_accelerator_state(self.accelerator, self.resume_dir)
        step = int(self.state["global_step"])
        logger.info("resumed from %s at step %d", self.resume_dir, step)
        return step

    def write_run_json(self, step: int, info: dict | None) -> None:
        args, acc = self.args, self.accelerator
        self.run_info = run = run_info(
            args, seed=self.seed, learning_rate=self.learning_rate, max_train_steps=self.max_steps,
            num_train_epochs=self.num_epochs, steps_per_epoch=self.per_epoch,
            adapter_config=self.config.to_dict(), adapted_layers=len(self.names), fig3_layer=self.probe.fig3,
            task=self.project, parameters=lowrank.count_parameters(self.model), num_processes=self.num_processes,
            mixed_precision=acc.mixed_precision, device=str(self.device),
            resumed_from=str(self.resume_dir) if self.resume_dir else None, report_to=self.report_to,
            distance_at_start={"step": step, **{k: v for k, v in self.probe().items() if "/" not in k}},
            **(info or {}))
        if self.is_main:
            runfolder.write_json(self.output_dir / runfolder.RUN_JSON, run)
            write_config(self.output_dir, args, f"training/{self.spec.task.name}.py", seed=self.seed)

    def start_metrics(self, step: int) -> None:
        """metrics.jsonl and the trackers (tasks log their images through self.metrics), the progress bar."""
        args = self.args
        self.metrics = MetricsLogger(self.accelerator, self.output_dir, f"{self.project}-lowrank",
                                     {**vars(args), "seed": self.seed},
                                     resume_step=step if self.resume_dir else None, report_to=self.report_to)
        self.progress = tqdm(total=self.max_steps, initial=step, desc="Steps", disable=not self.is_main)
        logger.info("training %s (%d layers, %s trainable params) for %d steps on %d process(es); outputs in %s",
                    self.config.method, len(self.names), f"{self.run_info['parameters']['trainable']:,}",
                    self.max_steps, self.num_processes, self.output_dir)

    # ----- one optimizer step -------------------------------------------------------------------------------
    def optimizer_step(self, wrapped: torch.nn.Module, loader, group: int, step: int) -> tuple[list[float], float]:
        """One optimizer step from `group` micro-batches, with the NaN checks; (micro-batch losses, grad norm)."""
        args, acc = self.args, self.accelerator
        losses = []
        for micro in range(group):
            batch = next(loader)
            gen = torch.Generator().manual_seed(mix_seed(self.seed, step, micro, self.process_index))
            # manual accumulation: gradients all-reduce only on the step's last micro-batch
            with contextlib.nullcontext() if micro == group - 1 else acc.no_sync(wrapped):
                loss = self.task.loss(wrapped, batch, gen) + self.hooks.extra_loss()
                if args.debug_nan_at_step == step + 1:
                    loss = loss * float("nan")
                mean_loss = acc.reduce(loss.detach(), reduction="mean")   # all processes agree
                if not torch.isfinite(mean_loss):
                    raise self.diverged("the loss", mean_loss.item(), step)
                acc.backward(loss / group)
            losses.append(mean_loss.item())
        grad_norm = acc.clip_grad_norm_(self.params, args.max_grad_norm or float("inf"))
        # with fp16 an inf norm is routine: the grad scaler skips that step and lowers its scale
        if acc.scaler is None and not torch.isfinite(torch.as_tensor(grad_norm)):
            raise self.diverged("the gradient norm", float(grad_norm), step)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return losses, grad_norm

    def diverged(self, what: str, value: float, step: int) -> DivergedError:
        self.progress.close()   # the bar's last line must not swallow the error line
        self.metrics.close()
        last = runfolder.list_checkpoints(self.output_dir)
        where = f"last good checkpoint: {last[-1][1]}" if last else "no checkpoint was written yet"
        return DivergedError(f"{what} is {value} at step {step + 1} (lr {self.lr_scheduler.get_last_lr()[0]:g}); "
                             f"stopped without saving; {where} (resume it with --resume_from_checkpoint latest "
                             f"and a lower --learning_rate)")

    # ----- the metrics row ----------------------------------------------------------------------------------
    def log_step(self, step: int, epoch: int, losses: list[float], grad_norm, t0: float, ends_epoch: bool) -> None:
        """metrics.jsonl's row of the step: loss, learning rates, grad norm, weight distances, timing."""
        lrs = self.lr_scheduler.get_last_lr()
        row = {"loss": sum(losses) / len(losses), "lr": lrs[0],
               "grad_norm": float(grad_norm) if math.isfinite(float(grad_norm)) else None, "epoch": epoch}
        row.update({f"lr_{g['name']}": lr for g, lr in zip(self.optimizer.param_groups[1:], lrs[1:])
                    if g.get("name")})
        if self.is_main:   # adapters are identical on every process: measure once
            t_train = time.perf_counter() - t0
            row.update(self.probe(step))   # the followed layer, or every layer on a full-probe step
            row["time/step"] = t_train + row["time/distance"]
            row["time/distance_share"] = row["time/distance"] / row["time/step"]
            self.progress.set_postfix(loss=f"{row['loss']:.4f}", dist_fig3=f"{row['distance_fig3']:.3g}")
            if step % self.spec.checkpointing_steps == 0 or step == self.max_steps:
                row.update(self.task.at_checkpoint_step(step) or {})
        if ends_epoch:
            row.update(self.task.at_epoch_end(epoch, step) or {})
        self.metrics.log(step, row)
        self.progress.update(1)

    # ----- checkpoint, validation, stop ---------------------------------------------------------------------
    def save_checkpoint(self, step: int, at_checkpoint: Callable | None) -> None:
        def extras(folder: Path) -> None:   # the task's samples, then the average's (none without at_checkpoint)
            if at_checkpoint is not None:
                at_checkpoint(folder)
            self.average.at_checkpoint(folder, step, samples=at_checkpoint is not None)

        save_checkpoint(self.accelerator, self.output_dir, step,
                        {"seed": self.seed, "method": self.config.method, "max_train_steps": self.max_steps},
                        extras, self.args.checkpoints_total_limit)

    def checkpoint_or_validate(self, step: int) -> None:
        args = self.args
        if step % self.spec.checkpointing_steps == 0:
            self.save_checkpoint(step, lambda folder: self.task.at_checkpoint(folder, step))
        elif args.validation_steps and step % args.validation_steps == 0 and self.is_main:
            self.task.at_validation(step)
        fault_point("step", step, self.process_index)
        if args.debug_step_delay:
            time.sleep(args.debug_step_delay)

    def stop_if_requested(self, step: int) -> None:
        """After a SIGTERM: a checkpoint at this step (samples skipped: the grace before SIGKILL is short)."""
        stop = self.stop_request
        if step >= self.max_steps or not stop.requested():
            return
        self.progress.close()
        self.metrics.close()
        if step % self.spec.checkpointing_steps:
            self.save_checkpoint(step, None)
        stop.restore()
        saved = runfolder.checkpoint_dir(self.output_dir, step).name
        raise StoppedError(f"{stop.name} at step {step} of {self.max_steps}; {saved} is saved in {self.output_dir}; "
                           f"continue with the same command and --resume_from_checkpoint latest")

    # ----- finish -------------------------------------------------------------------------------------------
    def finish(self, step: int) -> None:
        """Replicas checked, then on the main process: the final adapter, the task's outputs, the card."""
        self.check_replicas()
        self.accelerator.wait_for_everyone()
        if self.is_main:
            out = self.output_dir
            fault_point("final", step, self.process_index, str(out / runfolder.ADAPTER_WEIGHTS))
            self.task.save(self.model, out)
            self.task.finish(out, step)
            self.average.finish(out, step, samples=not getattr(self.args, "skip_final_samples", False))
            write_run_card(out)   # README.md; language trainers rewrite it once results.json has the scores
            records = rank_records(runfolder.read_metrics(out))
            if records:   # dynamic-rank methods: where the rank budget went
                runfolder.write_json(out / "live_ranks.json", {"final": records[-1][1], "steps": records})
                write_rank_heatmap(records, out / "live_ranks.png")
            print(self.done_line(step))
        self.metrics.close()

    def check_replicas(self) -> None:
        """DDP keeps replicas identical; a per-process hook that drifted shows here."""
        if self.num_processes == 1:
            return
        checksum = torch.stack([p.detach().double().sum() for p in self.params]).sum().reshape(1)
        sums = self.accelerator.gather(checksum.to(self.device))
        if not torch.all(sums == sums[0]):
            raise TrainingError(f"the {self.num_processes} processes ended with different adapters "
                                f"({sums.tolist()}); please report")

    def done_line(self, step: int) -> str:
        out = self.output_dir
        ckpts = [d.name for _, d in runfolder.list_checkpoints(out)]   # what is there, not what might be
        kept = (f"{ckpts[0]}/" if len(ckpts) == 1 else f"{ckpts[0]}/ ... {ckpts[-1]}/ ({len(ckpts)})") if ckpts \
            else f"no checkpoint (every {self.spec.checkpointing_steps} steps)"
        return (f"done: {step} steps of {self.config.method}. Results in {out}/: adapter.safetensors, "
                f"metrics.jsonl (distances), {kept}, run.json{task_outputs(self.task)}"
                f"{', ema/ (the moving average)' if self.average.ema is not None else ''}"
                f"{', README.md (model card)' if (out / 'README.md').is_file() else ''}")


def task_outputs(task: Task) -> str:
    """The task's own outputs that exist in its run folder (e.g. no diffusers file with --export_diffusers false)."""
    items = [i.strip() for i in task.outputs.split(",") if i.strip()]
    there = [i for i in items if (task.run.output_dir / i.split()[0].rstrip("/")).exists()]
    return "".join(f", {i}" for i in there)
