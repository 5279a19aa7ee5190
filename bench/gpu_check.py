"""The GPU check: what to run in the few minutes a GPU is available (one H100/H200: about 5-8 minutes).

    python bench/gpu_check.py                        # CUDA: SD-1.5 at 512 px (fp16, bf16), SDXL at 1024 px (bf16)
    python bench/gpu_check.py --device cpu --quick   # tiny shapes on the CPU: keeps this script working

1. The real trainer (training/dreambooth.py, in-process through its main()) on a saved random pipeline of the
   SD-1.5 architecture (UNet, VAE and CLIP-L text encoder with random weights; no download) at 512 px, for
   lora, dora, delora and etherplus under each mixed precision: steps/s (median logged time/step after the
   first step), peak GPU memory, every logged loss finite, and resume equality: the run checkpoints halfway,
   a second run resumes from that checkpoint, and its final adapter must equal the uninterrupted run's
   bit for bit (both with --deterministic). One worker process per precision: accelerate fixes the
   mixed precision once per process. Each worker's first method also runs with --cache_latents: its adapter must
   equal the uncached run's bit for bit, and its steps/s ratio is the cache's saving. Then the same for SDXL at
   1024 px in bf16, lora and delora, 10 steps, on a saved random pipeline of SDXL's architecture (its UNet and
   VAE; both text encoders at SDXL's widths but two layers each: they encode the prompt once per run).
2. The per-step ratios of bench/unet_step.py (SD-1.5 UNet, 512 px, bf16; SDXL's UNet, 1024 px, bf16, lora and
   delora) and bench/dit_step.py (FLUX.2-klein-4B's transformer, 512 px + 512 text tokens, bf16, lora, dora,
   delora, etherplus: peft's image benchmark's setting): each method vs LoRA and the floor.
3. The GLUE step of bench/glue_step.py on BERT-base's shape in bf16: each method vs peft's.
--quick runs the same code on the presets (tiny SD, tiny-sdxl) at 32 px, 2 steps, bf16, lora and delora (the DiT
step on klein-mid at 64 px).
Writes one JSON (default bench/results/gpu_check-<device>[-quick].json), prints a table, and exits 1 when
any check failed. --device cuda without a visible GPU is an error, never a silent CPU run.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench import dit_step, glue_step, unet_step  # noqa: E402
from bench.common import RESULTS, machine, write_json  # noqa: E402
from bench.unet_step import SD15_UNET, SDXL_UNET  # noqa: E402
from ground import cli  # noqa: E402
from training import dreambooth  # noqa: E402
from training.common.models import write_tokenizer_files  # noqa: E402

METHODS = ("lora", "dora", "delora", "etherplus")
TINY_UNET = dict(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D",) * 2, up_block_types=("CrossAttnUpBlock2D",) * 2,
                 norm_num_groups=32)
# the tiny-sdxl preset's UNet (training/families/sdxl.py): SDXL's block types, text_time, linear projections
TINY_SDXL_UNET = dict(block_out_channels=(32, 64), layers_per_block=2, cross_attention_dim=64,
                      attention_head_dim=(2, 4), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                      up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2),
                      use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                      projection_class_embeddings_input_dim=80, norm_num_groups=32)
# full: SD-1.5 at 512 px, 20 steps per run; SDXL at 1024 px in bf16, lora and delora, 10 steps per run (one
# SDXL step is ~3x an SD-1.5 one at 512 px: ~1.5-2 minutes of the budget with the pipeline's build, its loads
# and the UNet ratios); quick: the presets at 32 px, 2 steps, two methods (the trainer's path does not depend on
# the method; tests/test_dreambooth*.py train every one)
PLAN = {False: dict(methods=METHODS, resolution=512, steps=20, dtypes=("fp16", "bf16"), unet_res=512,
                    unet_reps=10, glue="base", glue_reps=15, glue_batch=8, glue_seq=128,
                    sdxl=dict(methods=("lora", "delora"), resolution=1024, steps=10, dtypes=("bf16",), unet_res=1024,
                              unet_reps=5),
                    klein=dict(model="klein-4b", methods=METHODS, resolution=512, text_tokens=512, reps=5)),
        True: dict(methods=("lora", "delora"), resolution=32, steps=2, dtypes=("bf16",), unet_res=64, unet_reps=1,
                   glue="tiny", glue_reps=1, glue_batch=2, glue_seq=16,
                   sdxl=dict(methods=("lora", "delora"), resolution=32, steps=2, dtypes=("bf16",), unet_res=64,
                             unet_reps=1),
                   klein=dict(model="klein-mid", methods=("lora", "delora"), resolution=64, text_tokens=32, reps=1))}
MODELS = ("sd15", "sdxl")   # the plan of "sd15" is PLAN[quick] itself, of "sdxl" its "sdxl" entry


def model_plan(plan: dict, model: str) -> dict:
    return plan if model == "sd15" else plan[model]


# ----- the saved random SD-1.5 pipeline -------------------------------------------------------------------
def build_sd15(folder: Path) -> None:
    """SD-1.5's architecture with random weights, saved with save_pretrained (what the trainer loads)."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer


    tok_dir = folder.parent / "tokenizer-files"
    vocab = write_tokenizer_files(tok_dir)
    tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir), model_max_length=77)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=64, in_channels=4, out_channels=4, **SD15_UNET)
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        sample_size=512)
    text_encoder = CLIPTextModel(CLIPTextConfig(   # CLIP ViT-L/14's text tower, the project's vocabulary
        hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12, vocab_size=vocab,
        max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              steps_offset=1)
    StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                            safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(folder)


def build_sdxl(folder: Path, device: str) -> None:
    """SDXL's UNet and VAE with random weights, both text encoders at SDXL's widths (CLIP-L 768, OpenCLIP bigG 1280
    with its 1280-wide pooled projection) but two layers each, built on `device`, saved in bf16 (the VAE in fp32)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer


    tok_dir = folder.parent / "tokenizer-files-sdxl"
    vocab = write_tokenizer_files(tok_dir)
    tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir), model_max_length=77)

    def text(hidden: int) -> CLIPTextConfig:
        return CLIPTextConfig(hidden_size=hidden, intermediate_size=4 * hidden, num_attention_heads=hidden // 64,
                              num_hidden_layers=2, vocab_size=vocab, max_position_embeddings=77, hidden_act="gelu",
                              projection_dim=hidden, bos_token_id=tokenizer.bos_token_id,
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)

    torch.manual_seed(0)
    with torch.device(device):   # SDXL's 2.6 B UNet parameters initialised on the GPU: seconds, not minutes
        unet = UNet2DConditionModel(sample_size=128, in_channels=4, out_channels=4, **SDXL_UNET)
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            sample_size=1024, scaling_factor=0.13025, force_upcast=True)
        text_encoder, text_encoder_2 = CLIPTextModel(text(768)), CLIPTextModelWithProjection(text(1280))
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading")
    for module in (unet, text_encoder, text_encoder_2):   # saved in bf16, as the trainer loads them; the VAE in
        module.to(torch.bfloat16)                         # fp32, as the SDXL family runs it
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=scheduler)
    pipe.save_pretrained(folder)
    del pipe, unet, vae, text_encoder, text_encoder_2
    if device == "cuda":
        torch.cuda.empty_cache()


# ----- 1. the trainer, one worker process per model and mixed precision ----------------------------------------
def trainer_args(plan: dict, pipeline: str, method: str, dtype: str, out: Path) -> list[str]:
    return ["--pretrained_model_name_or_path", pipeline, "--method", method, "--rank", "16", "--seed", "0",
            "--resolution", str(plan["resolution"]), "--max_train_steps", str(plan["steps"]),
            "--checkpointing_steps", str(plan["steps"] // 2), "--mixed_precision", dtype, "--deterministic",
            "--num_inference_steps", "1", "--num_validation_images", "1", "--skip_final_samples",
            "--export_diffusers", "false", "--report_to", "none", "--output_dir", str(out)]


def adapter_difference(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    x, y = load_file(str(a)), load_file(str(b))
    if x.keys() != y.keys():
        return float("inf")
    return max(float((x[k].double() - y[k].double()).abs().max()) for k in x)


def worker(args) -> None:
    """One model and precision: every method's uninterrupted run and its resumed twin; writes args.worker_json."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")   # before the first cuBLAS handle

    plan, dtype, work = model_plan(PLAN[args.quick], args.model), args.worker, Path(args.workdir)
    rows = []
    for method in plan["methods"]:
        straight, resumed = work / f"{args.model}-{method}-{dtype}", work / f"{args.model}-{method}-{dtype}-resumed"
        row = {"model": args.model, "method": method, "dtype": dtype}
        if args.device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        row["exit_code"] = dreambooth.main(trainer_args(plan, args.pipeline, method, dtype, straight))
        row["wall_s"] = time.perf_counter() - t0
        row["peak_gb"] = torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else None
        if row["exit_code"] == 0:
            ran_on = json.loads((straight / "run.json").read_text())["device"]
            if not ran_on.startswith(args.device):
                raise cli.CommandError(f"the trainer ran on {ran_on}, not {args.device}")
            logged = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
            times = [r["time/step"] for r in logged[1:]] or [logged[0]["time/step"]]
            row["steps_per_s"] = 1 / statistics.median(times)
            row["finite"] = all(r["loss"] == r["loss"] and abs(r["loss"]) != float("inf") for r in logged)
            half = f"checkpoint-{plan['steps'] // 2}"
            resumed.mkdir(parents=True, exist_ok=True)
            shutil.copytree(straight / half, resumed / half)
            code = dreambooth.main(trainer_args(plan, args.pipeline, method, dtype, resumed)
                                   + ["--resume_from_checkpoint", "latest"])
            row["resume_max_abs_diff"] = adapter_difference(straight / "adapter.safetensors",
                                                            resumed / "adapter.safetensors") if code == 0 else None
            row["resume_equal"] = row["resume_max_abs_diff"] == 0.0
            if method == plan["methods"][0]:
                row.update(cache_check(plan, args.pipeline, method, dtype, straight, work, row["steps_per_s"]))
        rows.append(row)
        print(f"gpu_check: {args.model} {dtype} {method}: {row}", flush=True)
    write_json(Path(args.worker_json), {"rows": rows})


def cache_check(plan: dict, pipeline: str, method: str, dtype: str, straight: Path, work: Path,
                steps_per_s: float) -> dict:
    """The same run with --cache_latents (the example subject is square: one crop per image): its adapter must equal
    the uncached run's bit for bit, and its steps/s over the uncached run's is the saving (the first epoch encodes)."""
    cached = work / f"{straight.name}-cached"
    code = dreambooth.main(trainer_args(plan, pipeline, method, dtype, cached) + ["--cache_latents"])
    if code != 0:
        return {"cache_exit_code": code, "cache_equal": False}
    logged = [json.loads(line) for line in (cached / "metrics.jsonl").read_text().splitlines()]
    times = [r["time/step"] for r in logged[1:]] or [logged[0]["time/step"]]
    diff = adapter_difference(straight / "adapter.safetensors", cached / "adapter.safetensors")
    return {"cache_max_abs_diff": diff, "cache_equal": diff == 0.0,
            "cache_speedup": (1 / statistics.median(times)) / steps_per_s}


def run_workers(args, plan: dict, pipeline: str, work: Path, model: str = "sd15") -> list[dict]:
    plan, rows = model_plan(plan, model), []
    for dtype in plan["dtypes"]:
        out = work / f"worker-{model}-{dtype}.json"
        env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        if args.device == "cpu":
            env["ACCELERATE_USE_CPU"] = "true"   # the trainer's Accelerator on the CPU even where a GPU exists
        else:
            env.pop("ACCELERATE_USE_CPU", None)
        cmd = [sys.executable, __file__, "--device", args.device, "--worker", dtype, "--worker_json", str(out),
               "--pipeline", pipeline, "--workdir", str(work), "--model", model] + (["--quick"] if args.quick else [])
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0 or not out.is_file():
            tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            rows += [{"model": model, "method": m, "dtype": dtype, "exit_code": proc.returncode, "error": tail}
                     for m in plan["methods"]]
            continue
        rows += json.loads(out.read_text())["rows"]
    return rows


# ----- 2. and 3. the step benches ----------------------------------------------------------------------------
def unet_ratios(args, plan: dict, model: str = "sd15") -> dict:

    plan = model_plan(plan, model)
    ns = argparse.Namespace(device=args.device, dtype="bf16", methods=list(plan["methods"]), reps=plan["unet_reps"],
                            warmup=1, rank=16, batch=1,
                            distance_logging_steps=unet_step.DEFAULT_DISTANCE_LOGGING_STEPS)   # the trainers' default
    cfg = {("sd15", True): TINY_UNET, ("sd15", False): unet_step.SD15_UNET, ("sdxl", True): TINY_SDXL_UNET,
           ("sdxl", False): unet_step.SDXL_UNET}[model, args.quick]
    row, methods = unet_step.run_resolution(ns, plan["unet_res"], cfg)
    if args.device == "cuda":
        torch.cuda.empty_cache()
    secs = row["seconds"]
    return {"resolution": plan["unet_res"], "unet": ("tiny-" if args.quick else "") + model,
            "vs_lora": {m: secs[m] / secs["lora"] for m in methods},
            "vs_floor": {m: secs[m] / secs["floor"] for m in methods},
            "distance_share": row["distance_share"], "distance_share_full": row["distance_share_full"],
            "peak_cuda_bytes": row["peak_cuda_bytes"]}


def dit_ratios(args, plan: dict) -> dict:
    """bench/dit_step.py on FLUX.2-klein-4B's transformer shape (5 double + 20 single blocks, 24 heads of 128; random
    weights) at 512 px in bf16, peft's benchmark setting: each method vs LoRA and the floor."""

    k = plan["klein"]
    ns = argparse.Namespace(device=args.device, dtype="bf16", methods=list(k["methods"]), reps=k["reps"], warmup=1,
                            rank=16, batch=1, model=k["model"], text_tokens=k["text_tokens"],
                            distance_logging_steps=dit_step.DEFAULT_DISTANCE_LOGGING_STEPS)
    row, methods = dit_step.run_resolution(ns, k["resolution"])
    if args.device == "cuda":
        torch.cuda.empty_cache()
    secs = row["seconds"]
    return {"resolution": k["resolution"], "model": k["model"], "adapted_layers": row["adapted_layers"],
            "vs_lora": {m: secs[m] / secs["lora"] for m in methods},
            "vs_floor": {m: secs[m] / secs["floor"] for m in methods}, "peak_cuda_bytes": row["peak_cuda_bytes"]}


def glue_ratios(args, plan: dict, work: Path) -> dict:

    out = work / "glue.json"
    glue_step.main(["--device", args.device, "--dtype", "bf16", "--size", plan["glue"], "--reps",
                    str(plan["glue_reps"]), "--warmup", "1", "--batch", str(plan["glue_batch"]), "--seq",
                    str(plan["glue_seq"]), "--out", str(out)])
    return {"size": plan["glue"], **json.loads(out.read_text())["summary"]}


# ----- the report ----------------------------------------------------------------------------------------------
def failures(result: dict) -> list[str]:
    bad = []
    for r in result["trainer"]:
        name = f"{r.get('model', 'sd15')} {r['dtype']} {r['method']}"
        if r.get("exit_code") != 0:
            bad.append(f"{name}: trainer exit {r.get('exit_code')} {r.get('error', '')}".rstrip())
        elif not r.get("finite"):
            bad.append(f"{name}: a logged loss is not finite")
        elif not r.get("resume_equal"):
            bad.append(f"{name}: the resumed adapter differs (max |diff| {r.get('resume_max_abs_diff')})")
        elif "cache_equal" in r and not r["cache_equal"]:
            bad.append(f"{name}: the --cache_latents adapter differs (max |diff| {r.get('cache_max_abs_diff')}, "
                       f"exit {r.get('cache_exit_code', 0)})")
    return bad


def print_table(result: dict) -> None:
    print(f"\n{'model':<6} {'dtype':<6} {'method':<10} {'steps/s':>8} {'peak GB':>8} {'finite':>7} {'resume':>7} "
          f"{'cached':>14}")
    for r in result["trainer"]:
        sps = f"{r['steps_per_s']:8.2f}" if "steps_per_s" in r else f"{'-':>8}"
        peak = f"{r['peak_gb']:8.2f}" if r.get("peak_gb") is not None else f"{'-':>8}"
        resume = "equal" if r.get("resume_equal") else "DIFF" if "resume_equal" in r else "-"
        cached = "-" if "cache_equal" not in r else \
            f"{'equal' if r['cache_equal'] else 'DIFF'} {r.get('cache_speedup', 0):.2f}x"
        print(f"{r.get('model', 'sd15'):<6} {r['dtype']:<6} {r['method']:<10} {sps} {peak} "
              f"{str(r.get('finite', '-')):>7} {resume:>7} {cached:>14}")
    print()
    for u in (result["unet_step"], result.get("unet_step_sdxl")):
        if u:
            print(f"UNet step ({u['unet']}, {u['resolution']} px, bf16): " + ", ".join(
                f"{m} {v:.3f}x LoRA" for m, v in u["vs_lora"].items()) + f"; LoRA {u['vs_floor']['lora']:.3f}x floor")
    d = result["dit_step_klein"]
    print(f"DiT step ({d['model']}, {d['resolution']} px, bf16): " + ", ".join(
        f"{m} {v:.3f}x LoRA" for m, v in d["vs_lora"].items()) + f"; LoRA {d['vs_floor']['lora']:.3f}x floor")
    g = result["glue_step"]
    print(f"GLUE step (BERT {g['size']}, bf16) vs peft: " + ", ".join(
        f"{m} {v['vs_peft']:.3f}x" for m, v in g.items() if isinstance(v, dict)))


def main(argv=None) -> int:
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="cuda (default; an error when no GPU is visible) or cpu")
    p.add_argument("--quick", action="store_true",
                   help="tiny shapes (the tiny SD preset at 32 px, 2 steps, bf16, lora and delora): a CPU smoke run")
    p.add_argument("--out", type=Path, help="result JSON (default bench/results/gpu_check-<device>[-quick].json)")
    p.add_argument("--worker", help=argparse.SUPPRESS)        # internal: one precision's trainer runs
    p.add_argument("--worker_json", help=argparse.SUPPRESS)
    p.add_argument("--pipeline", help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    p.add_argument("--model", default="sd15", choices=MODELS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise cli.CommandError("--device cuda but torch sees no CUDA GPU; run on a GPU machine, or pass "
                               "--device cpu --quick for the CPU smoke run")
    if args.worker:
        worker(args)
        return 0
    plan, t0 = PLAN[args.quick], time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        work = Path(tmp)
        if args.quick:
            pipeline, pipeline_sdxl = "tiny", "tiny-sdxl"
        else:
            pipeline, pipeline_sdxl = str(work / "sd15-random"), str(work / "sdxl-random")
            build_sd15(Path(pipeline))
        result = {"command": "python bench/gpu_check.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                  "machine": machine(), "plan": plan, "trainer": run_workers(args, plan, pipeline, work)}
        if not args.quick:
            shutil.rmtree(pipeline)   # SD-1.5's 4 GB leave the disk before SDXL's 7 GB arrive
            build_sdxl(Path(pipeline_sdxl), args.device)
        result["trainer"] += run_workers(args, plan, pipeline_sdxl, work, "sdxl")
        result["unet_step"] = unet_ratios(args, plan)
        result["unet_step_sdxl"] = unet_ratios(args, plan, "sdxl")
        result["dit_step_klein"] = dit_ratios(args, plan)
        result["glue_step"] = glue_ratios(args, plan, work)
    result["failures"] = failures(result)
    result["seconds"] = time.perf_counter() - t0
    out = args.out or RESULTS / f"gpu_check-{args.device}{'-quick' if args.quick else ''}.json"
    write_json(out, result)
    print_table(result)
    print(f"\nwrote {out} ({result['seconds']:.0f} s)")
    for line in result["failures"]:
        print(f"FAILED {line}", file=sys.stderr)
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    sys.exit(cli.run_cli(main))
