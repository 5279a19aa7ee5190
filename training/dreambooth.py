#!/usr/bin/env python
"""DreamBooth with lowrank adapters:  accelerate launch training/dreambooth.py --method delora

Follows diffusers' examples/dreambooth/train_dreambooth_lora.py (flag names, accelerate structure,
prior preservation), with lowrank adapters on the UNet's attention projections instead of peft.
With no arguments it trains on the embedded example subject with the built-in tiny SD (random
weights: it shows the machinery, not image quality).

Outputs (output_dir):
    adapter_config.json, adapter.safetensors   the final adapter (lowrank.load_adapter)
    samples/, samples_grid.png                 fixed-seed samples of the final adapter (+ prompts.jsonl)
    checkpoint-N/                              adapter, optimizer/scheduler/RNG state, samples/
    metrics.jsonl                              per step: loss, lr, ‖W_eff − W0‖_F of every adapted layer
    run.json                                   arguments, resolved settings, library versions
Exit codes: 0 done; 1 the loss diverged (NaN/inf); 2 bad input (one `error:` line on stderr).
"""
from __future__ import annotations

import contextlib
import math
import random
import shutil
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file (accelerate launch training/dreambooth.py): make `training` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn.functional as F

import lowrank
from lowrank import AdapterConfig
from training.common import DivergedError, TrainingError
from training.common.args import (ArgumentParser, adapter_config, add_adapter_args, add_training_args,
                                  check_folder_path, check_training_args, default_learning_rate)
from training.common.checkpoint import (list_checkpoints, load_accelerator_state, read_state, register_adapter_hooks,
                                        remove_stale, resolve_resume, save_checkpoint, write_json_atomic)
from training.common.data import (EXAMPLE_CLASS_PROMPT, EXAMPLE_NAME, EXAMPLE_PROMPT, DreamBoothDataset, collate,
                                  epoch_batches, example_subject, load_image_dir, mix_seed, steps_per_epoch)
from training.common.logging import (DistanceProbe, MetricsLogger, rank_records, read_metrics, resolve_report_to,
                                     run_info, setup_console, write_rank_heatmap)
from training.common.models import is_tiny, load_pipeline
from training.common.samples import (count_images, generate, generate_class_images, sampling_pipeline,
                                     write_grid, write_samples)

logger = setup_console()


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    add_training_args(parser, default_resolution=" (default: 512; 64 with the tiny preset)")
    g = parser.add_argument_group("DreamBooth")
    g.add_argument("--instance_data_dir", default=None,
                   help="Folder with 3-5 photos of the subject (default: the embedded example cat).")
    g.add_argument("--instance_prompt", default=None,
                   help=f"Prompt with the identifier of the subject (default with the example: {EXAMPLE_PROMPT!r}).")
    g.add_argument("--class_data_dir", default=None,
                   help="Class images for prior preservation; missing ones are generated "
                        "(default: output_dir/class_images).")
    g.add_argument("--class_prompt", default=None,
                   help=f"Prompt of the subject's class (default with the example: {EXAMPLE_CLASS_PROMPT!r}).")
    g.add_argument("--with_prior_preservation", action="store_true",
                   help="Add the class-prior loss (DreamBooth Eq. 2).")
    g.add_argument("--prior_loss_weight", type=float, default=1.0, help="Weight of the prior-preservation loss.")
    g.add_argument("--num_class_images", type=int, default=100, help="Class images to use (generated when missing).")
    g.add_argument("--sample_batch_size", type=int, default=4, help="Batch size for generating class images.")
    g.add_argument("--center_crop", action="store_true", help="Center-crop images (default: random crops).")
    add_adapter_args(parser)
    return parser


def parse_args(argv=None):
    args = build_parser().parse_args(argv)

    check_training_args(args)
    args.output_dir = args.output_dir or f"outputs/dreambooth-{args.method or AdapterConfig().method}"
    out = Path(args.output_dir).expanduser()
    check_folder_path(out, "--output_dir")
    if args.instance_data_dir is None:
        args.instance_prompt = args.instance_prompt or EXAMPLE_PROMPT
        args.class_prompt = args.class_prompt or EXAMPLE_CLASS_PROMPT
    elif not args.instance_prompt:
        raise TrainingError("--instance_prompt is required with --instance_data_dir (e.g. 'a photo of sks dog')")
    if args.with_prior_preservation:
        if not args.class_prompt:
            raise TrainingError("--with_prior_preservation needs --class_prompt (e.g. 'a photo of dog')")
        args.class_data_dir = args.class_data_dir or str(out / "class_images")
        check_folder_path(Path(args.class_data_dir).expanduser(), "--class_data_dir")
        if args.num_class_images <= 0 or args.sample_batch_size <= 0:
            raise TrainingError("--num_class_images and --sample_batch_size must be positive")
    elif args.class_data_dir and args.instance_data_dir:
        logger.warning("--class_data_dir is ignored without --with_prior_preservation")
    if args.resolution is None:
        args.resolution = 64 if is_tiny(args.pretrained_model_name_or_path) else 512
    adapter_config(args)   # fail on a bad method/option now, before loading any model
    return args


def main(argv=None) -> int:
    created = None   # an output folder this run made: removed again if bad input stops it before any file
    try:
        args = parse_args(argv)
        out = Path(args.output_dir).expanduser()
        created = None if out.exists() else out
        train(args)
        return 0
    except DivergedError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (TrainingError, lowrank.AdapterError) as e:
        print(f"error: {e}", file=sys.stderr)
        if created is not None and created.is_dir() and not any(p.is_file() for p in created.rglob("*")):
            shutil.rmtree(created, ignore_errors=True)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; continue with --resume_from_checkpoint latest", file=sys.stderr)
        return 130


def train(args) -> None:
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, broadcast_object_list, set_seed
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from diffusers.utils import logging as diffusers_logging
    from tqdm.auto import tqdm
    from transformers.utils import logging as transformers_logging

    output_dir = Path(args.output_dir).expanduser()
    report_to = resolve_report_to(args.report_to)
    accelerator = Accelerator(mixed_precision=args.mixed_precision, log_with=report_to,
                              project_config=ProjectConfiguration(project_dir=str(output_dir),
                                                                  logging_dir=str(output_dir / "logs")))
    main_proc, rank, world, device = (accelerator.is_main_process, accelerator.process_index,
                                      accelerator.num_processes, accelerator.device)
    setup_console(main_proc)
    if accelerator.distributed_type.name in ("FSDP", "DEEPSPEED", "MEGATRON_LM"):
        # the adapter is a few MB and SD fits on one GPU: sharding buys nothing, and the lowrank save/resume
        # path needs whole (unsharded) adapter tensors on every process
        raise TrainingError(f"{accelerator.distributed_type.name} is not supported by this script; "
                            f"use data parallel: accelerate launch --multi_gpu --num_processes N")
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()

    # Resume point and seed come first: the seed drives the adapter init, data order and noise.
    resume_dir = resolve_resume(output_dir, args.resume_from_checkpoint)
    if args.resume_from_checkpoint and resume_dir is None:
        logger.info("no checkpoint in %s yet; starting a new run", output_dir)
    state = read_state(resume_dir) if resume_dir else {}
    seed = args.seed if args.seed is not None else state.get("seed")
    if seed is None:   # pick one on the main process and share it, so all processes agree
        seed = broadcast_object_list([random.SystemRandom().randrange(2**31)])[0]
    set_seed(seed)
    if main_proc:
        output_dir.mkdir(parents=True, exist_ok=True)
        remove_stale(output_dir)
        if resume_dir is None and list_checkpoints(output_dir):
            logger.warning("%s holds checkpoints of an earlier run; new ones replace those with the same step, "
                           "and --resume_from_checkpoint latest picks the newest of all", output_dir)
    accelerator.wait_for_everyone()

    # Data before the model: bad input fails in seconds, not after loading SD.
    if args.instance_data_dir:
        instance_images = load_image_dir(args.instance_data_dir, args.resolution)
    else:
        instance_images = example_subject(args.resolution)
        logger.info("instance images: %s, prompt %r", EXAMPLE_NAME, args.instance_prompt)

    # Frozen weights in the mixed-precision dtype; the adapter is injected afterwards, in fp32.
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    with accelerator.main_process_first():   # one process builds the tiny preset / fills the hub cache
        pipe = load_pipeline(args.pretrained_model_name_or_path, revision=args.revision,
                             torch_dtype=None if weight_dtype == torch.float32 else weight_dtype)
    if args.resolution % (pipe.vae_scale_factor * 2):
        raise TrainingError(f"--resolution {args.resolution} must be a multiple of {pipe.vae_scale_factor * 2} "
                            f"for this model")
    unet, vae, text_encoder, tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    for module in [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)]:   # + safety checker
        module.requires_grad_(False)
        module.to(device)

    class_images = None
    if args.with_prior_preservation:   # class images come from the base model, before any adapter
        class_dir = Path(args.class_data_dir).expanduser()
        if count_images(class_dir) < args.num_class_images:
            generate_class_images(sampling_pipeline(pipe.components), class_dir, args.class_prompt,
                                  args.num_class_images, args.resolution, args.num_inference_steps,
                                  args.guidance_scale, args.sample_batch_size, rank, world, show_progress=main_proc)
        accelerator.wait_for_everyone()
        class_images = load_image_dir(class_dir, args.resolution, flag="--class_data_dir")[: args.num_class_images]
        if len(class_images) < args.num_class_images:
            raise TrainingError(f"--class_data_dir {class_dir} has {len(class_images)} readable images, fewer than "
                                f"--num_class_images {args.num_class_images}; remove the unreadable ones")

    dataset = DreamBoothDataset(instance_images, class_images, args.resolution, args.center_crop, seed)
    per_epoch = steps_per_epoch(len(dataset), args.train_batch_size, args.gradient_accumulation_steps, world)
    max_train_steps = args.max_train_steps or args.num_train_epochs * per_epoch
    num_epochs = math.ceil(max_train_steps / per_epoch)

    # The adapter. On resume it is loaded into the plain model (see checkpoint.py: bit-exact rebuild).
    config = adapter_config(args, dyndora_total_steps=max_train_steps)
    if resume_dir:
        saved, _ = lowrank.read_adapter(resume_dir)
        # values the trainer filled in (not the user) keep the checkpoint's, so a resumed run may change
        # --max_train_steps without silently changing a schedule the adapter already follows
        config = adapter_config(args, dyndora_total_steps=getattr(saved, "dyndora_total_steps", max_train_steps))
        if saved != config:
            diff = [f"{k}={v!r}" for k, v in saved.to_dict().items() if config.to_dict()[k] != v]
            raise TrainingError(f"{resume_dir} was trained with {', '.join(diff)}; resume with the same adapter flags")
        names = lowrank.load_adapter(unet, resume_dir)
    else:
        names = lowrank.inject(unet, config)
    for p in unet.parameters():   # trainable parameters in fp32 (diffusers' cast_training_params)
        if p.requires_grad:
            p.data = p.data.float()
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()

    learning_rate = args.learning_rate or default_learning_rate(config.method)
    optimizer = torch.optim.AdamW(
        lowrank.parameter_groups(unet, lr=learning_rate, lambda_lr=args.lambda_learning_rate,
                                 weight_decay=args.adam_weight_decay),
        betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
    # Stepped once per optimizer step, not prepared (a prepared scheduler steps num_processes times).
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer, num_warmup_steps=args.lr_warmup_steps,
                                 num_training_steps=max_train_steps)
    register_adapter_hooks(accelerator)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    accelerator.register_for_checkpointing(lr_scheduler)
    model = accelerator.unwrap_model(unet)
    hooks = lowrank.step_hooks(model)   # every step, unconditionally: methods without hooks cost nothing
    probe = DistanceProbe(model)
    params = [p for p in model.parameters() if p.requires_grad]

    global_step = 0
    if resume_dir:
        load_accelerator_state(accelerator, resume_dir)   # optimizer, scheduler, RNG; the adapter is in place
        global_step = int(state["global_step"])
        logger.info("resumed from %s at step %d", resume_dir, global_step)

    @torch.no_grad()
    def encode(prompt: str) -> torch.Tensor:   # the text encoder is frozen: each prompt is encoded once
        ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(device)
        return text_encoder(ids)[0]

    instance_emb = encode(args.instance_prompt)
    class_emb = encode(args.class_prompt) if class_images else None
    val_pipe = sampling_pipeline({**pipe.components, "unet": model})
    val_prompts = args.validation_prompt or [args.instance_prompt]

    def samples():
        return generate(val_pipe, val_prompts, args.num_validation_images, args.resolution,
                        args.num_inference_steps, args.guidance_scale, accelerator.autocast)

    info = run_info(args, seed=seed, learning_rate=learning_rate, max_train_steps=max_train_steps,
                    num_train_epochs=num_epochs, steps_per_epoch=per_epoch, adapter_config=config.to_dict(),
                    adapted_layers=len(names), fig3_layer=probe.fig3,
                    parameters=lowrank.count_parameters(model), instance_images=len(instance_images),
                    class_images=len(class_images or []), num_processes=world,
                    mixed_precision=accelerator.mixed_precision, device=str(device),
                    resumed_from=str(resume_dir) if resume_dir else None, report_to=report_to,
                    distance_at_start={"step": global_step, **{k: v for k, v in probe().items() if "/" not in k}})
    if main_proc:
        write_json_atomic(output_dir / "run.json", info)
    metrics = MetricsLogger(accelerator, output_dir, "dreambooth-lowrank", {**vars(args), "seed": seed},
                            resume_step=global_step if resume_dir else None, report_to=report_to)

    def compute_loss(pixels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        with torch.no_grad():
            latents = vae.encode(pixels).latent_dist.sample(generator=gen) * vae.config.scaling_factor
        # noise and timesteps from a CPU generator seeded per step: identical on any device and on resume
        noise = torch.randn(latents.shape, generator=gen, dtype=torch.float32).to(device, latents.dtype)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                                  generator=gen).to(device)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        n = pixels.shape[0] // 2 if class_emb is not None else pixels.shape[0]
        emb = instance_emb.expand(n, -1, -1)
        if class_emb is not None:
            emb = torch.cat([emb, class_emb.expand(n, -1, -1)])
        pred = unet(noisy, timesteps, emb, return_dict=False)[0].float()
        if noise_scheduler.config.prediction_type == "v_prediction":
            target = noise_scheduler.get_velocity(latents, noise, timesteps).float()
        else:
            target = noise.float()
        if class_emb is None:
            return F.mse_loss(pred, target)
        (pred, pred_prior), (target, target_prior) = pred.chunk(2), target.chunk(2)
        return F.mse_loss(pred, target) + args.prior_loss_weight * F.mse_loss(pred_prior, target_prior)

    def diverged(what: str, value: float) -> DivergedError:
        progress.close()   # the bar's last line must not swallow the error line
        metrics.close()
        last = list_checkpoints(output_dir)
        where = f"last good checkpoint: {last[-1][1]}" if last else "no checkpoint was written yet"
        return DivergedError(f"{what} is {value} at step {global_step + 1} (lr {lr_scheduler.get_last_lr()[0]:g}); "
                             f"stopped without saving; {where} (resume it with --resume_from_checkpoint latest "
                             f"and a lower --learning_rate)")

    logger.info("training %s (%d layers, %s trainable params) for %d steps on %d process(es); outputs in %s",
                config.method, len(names), f"{info['parameters']['trainable']:,}", max_train_steps, world, output_dir)
    progress = tqdm(total=max_train_steps, initial=global_step, desc="Steps", disable=not main_proc)
    accum = args.gradient_accumulation_steps
    unet.train()
    for epoch in range(global_step // per_epoch, num_epochs):
        batches = epoch_batches(len(dataset), args.train_batch_size, epoch, seed, rank, world)
        remaining = batches[(global_step - epoch * per_epoch) * accum:]   # skips what a resumed run already did
        loader = iter(torch.utils.data.DataLoader(dataset, batch_sampler=remaining, collate_fn=collate,
                                                  num_workers=args.dataloader_num_workers))
        for start in range(0, len(remaining), accum):
            t0 = time.perf_counter()
            group = min(accum, len(remaining) - start)   # the epoch's last step may have fewer micro-batches
            losses = []
            for micro in range(group):
                pixels = next(loader).to(device, dtype=weight_dtype)
                gen = torch.Generator().manual_seed(mix_seed(seed, global_step, micro, rank))
                # manual accumulation: gradients all-reduce only on the step's last micro-batch
                with contextlib.nullcontext() if micro == group - 1 else accelerator.no_sync(unet):
                    loss = compute_loss(pixels, gen) + hooks.extra_loss()
                    if args.debug_nan_at_step == global_step + 1:
                        loss = loss * float("nan")
                    mean_loss = accelerator.reduce(loss.detach(), reduction="mean")   # all processes agree
                    if not torch.isfinite(mean_loss):
                        raise diverged("the loss", mean_loss.item())
                    accelerator.backward(loss / group)
                losses.append(mean_loss.item())
            grad_norm = accelerator.clip_grad_norm_(params, args.max_grad_norm or float("inf"))
            # with fp16 an inf norm is routine: the grad scaler skips that step and lowers its scale
            if accelerator.scaler is None and not torch.isfinite(torch.as_tensor(grad_norm)):
                raise diverged("the gradient norm", float(grad_norm))
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            global_step += 1
            hooks.after_optimizer_step(global_step)

            row = {"loss": sum(losses) / len(losses), "lr": lr_scheduler.get_last_lr()[0],
                   "grad_norm": float(grad_norm) if math.isfinite(float(grad_norm)) else None, "epoch": epoch}
            if len(optimizer.param_groups) > 1:
                row["lr_lambda"] = lr_scheduler.get_last_lr()[1]
            if main_proc:   # adapters are identical on every process: measure once
                t_train = time.perf_counter() - t0
                row.update(probe())
                row["time/step"] = t_train + row["time/distance"]
                row["time/distance_share"] = row["time/distance"] / row["time/step"]
                progress.set_postfix(loss=f"{row['loss']:.4f}", dist_fig3=f"{row['distance_fig3']:.3g}")
            metrics.log(global_step, row)
            progress.update(1)

            if global_step % args.checkpointing_steps == 0:
                def extras(folder: Path) -> None:
                    shots = samples()
                    write_samples(folder / "samples", shots)
                    metrics.log_images(global_step, [img for _, _, img in shots])
                save_checkpoint(accelerator, output_dir, global_step,
                                {"seed": seed, "method": config.method, "max_train_steps": max_train_steps},
                                extras, args.checkpoints_total_limit)
            elif args.validation_steps and global_step % args.validation_steps == 0 and main_proc:
                shots = samples()
                write_samples(output_dir / "validation" / f"step-{global_step}", shots)
                metrics.log_images(global_step, [img for _, _, img in shots])
            if args.debug_step_delay:
                time.sleep(args.debug_step_delay)
            if global_step >= max_train_steps:
                break
        if global_step >= max_train_steps:
            break
    progress.close()

    if world > 1:   # DDP keeps replicas identical; a per-process hook that drifted would show up here
        checksum = torch.stack([p.detach().double().sum() for p in params]).sum().reshape(1)
        sums = accelerator.gather(checksum.to(device))
        if not torch.all(sums == sums[0]):
            raise TrainingError(f"the {world} processes ended with different adapters ({sums.tolist()}); please report")
    accelerator.wait_for_everyone()
    if main_proc:
        lowrank.save_adapter(model, output_dir)
        shots = samples()
        write_samples(output_dir / "samples", shots)
        write_grid(output_dir / "samples_grid.png", shots, cols=args.num_validation_images)
        records = rank_records(read_metrics(output_dir / "metrics.jsonl"))
        if records:   # dynamic-rank methods: where the rank budget went
            write_json_atomic(output_dir / "live_ranks.json", {"final": records[-1][1], "steps": records})
            write_rank_heatmap(records, output_dir / "live_ranks.png")
        metrics.log_images(global_step, [img for _, _, img in shots], tag="final")
        print(f"done: {global_step} steps of {config.method}. Results in {output_dir}/: adapter.safetensors, "
              f"samples_grid.png, samples/, metrics.jsonl (distances), checkpoint-*/, run.json")
    metrics.close()


if __name__ == "__main__":
    sys.exit(main())
