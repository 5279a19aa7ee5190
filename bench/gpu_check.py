"""The GPU check: what to run in the few minutes a GPU is available (one H100/H200: about 5-8 minutes).

    python bench/gpu_check.py                        # CUDA: SD-1.5 architecture at 512 px, fp16 and bf16
    python bench/gpu_check.py --device cpu --quick   # tiny shapes on the CPU: keeps this script working

1. The real trainer (training/dreambooth.py, in-process through its main()) on a saved random pipeline of the
   SD-1.5 architecture (UNet, VAE and CLIP-L text encoder with random weights; no download) at 512 px, for
   lora, dora, delora and etherplus under each mixed precision: steps/s (median logged time/step after the
   first step), peak GPU memory, every logged loss finite, and resume equality: the run checkpoints halfway,
   a second run resumes from that checkpoint, and its final adapter must equal the uninterrupted run's
   bit for bit (both with --deterministic). One worker process per precision: accelerate fixes the
   mixed precision once per process.
2. The per-step ratios of bench/unet_step.py (SD-1.5 UNet, 512 px, bf16): each method vs LoRA and the floor.
3. The GLUE step of bench/glue_step.py on BERT-base's shape in bf16: each method vs peft's.
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
from bench.common import RESULTS, machine, write_json  # noqa: E402
from ground import cli  # noqa: E402

METHODS = ("lora", "dora", "delora", "etherplus")
TINY_UNET = dict(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D",) * 2, up_block_types=("CrossAttnUpBlock2D",) * 2,
                 norm_num_groups=32)
# full: SD-1.5 at 512 px, 20 steps per run; quick: the tiny preset at 32 px, 2 steps, two methods (the trainer's
# path does not depend on the method; tests/test_dreambooth*.py train every one)
PLAN = {False: dict(methods=METHODS, resolution=512, steps=20, dtypes=("fp16", "bf16"), unet_res=512,
                    unet_reps=10, glue="base", glue_reps=15, glue_batch=8, glue_seq=128),
        True: dict(methods=("lora", "delora"), resolution=32, steps=2, dtypes=("bf16",), unet_res=64, unet_reps=1,
                   glue="tiny", glue_reps=1, glue_batch=2, glue_seq=16)}


# ----- the saved random SD-1.5 pipeline -------------------------------------------------------------------
def build_sd15(folder: Path) -> None:
    """SD-1.5's architecture with random weights, saved with save_pretrained (what the trainer loads)."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from bench.unet_step import SD15_UNET
    from training.common.models import write_tokenizer_files

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


# ----- 1. the trainer, one worker process per mixed precision ---------------------------------------------
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
    """One precision: every method's uninterrupted run and its resumed twin; writes args.worker_json."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")   # before the first cuBLAS handle
    from training import dreambooth

    plan, dtype, work = PLAN[args.quick], args.worker, Path(args.workdir)
    rows = []
    for method in plan["methods"]:
        straight, resumed = work / f"{method}-{dtype}", work / f"{method}-{dtype}-resumed"
        row = {"method": method, "dtype": dtype}
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
        rows.append(row)
        print(f"gpu_check: {dtype} {method}: {row}", flush=True)
    write_json(Path(args.worker_json), {"rows": rows})


def run_workers(args, plan: dict, pipeline: str, work: Path) -> list[dict]:
    rows = []
    for dtype in plan["dtypes"]:
        out = work / f"worker-{dtype}.json"
        env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        if args.device == "cpu":
            env["ACCELERATE_USE_CPU"] = "true"   # the trainer's Accelerator on the CPU even where a GPU exists
        else:
            env.pop("ACCELERATE_USE_CPU", None)
        cmd = [sys.executable, __file__, "--device", args.device, "--worker", dtype, "--worker_json", str(out),
               "--pipeline", pipeline, "--workdir", str(work)] + (["--quick"] if args.quick else [])
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0 or not out.is_file():
            tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            rows += [{"method": m, "dtype": dtype, "exit_code": proc.returncode, "error": tail}
                     for m in plan["methods"]]
            continue
        rows += json.loads(out.read_text())["rows"]
    return rows


# ----- 2. and 3. the step benches ----------------------------------------------------------------------------
def unet_ratios(args, plan: dict) -> dict:
    from bench import unet_step

    ns = argparse.Namespace(device=args.device, dtype="bf16", methods=list(plan["methods"]), reps=plan["unet_reps"],
                            warmup=1, rank=16, batch=1,
                            distance_logging_steps=unet_step.DEFAULT_DISTANCE_LOGGING_STEPS)   # the trainers' default
    cfg = TINY_UNET if args.quick else unet_step.SD15_UNET
    row, methods = unet_step.run_resolution(ns, plan["unet_res"], cfg)
    secs = row["seconds"]
    return {"resolution": plan["unet_res"], "unet": "tiny" if args.quick else "sd15",
            "vs_lora": {m: secs[m] / secs["lora"] for m in methods},
            "vs_floor": {m: secs[m] / secs["floor"] for m in methods},
            "distance_share": row["distance_share"], "distance_share_full": row["distance_share_full"],
            "peak_cuda_bytes": row["peak_cuda_bytes"]}


def glue_ratios(args, plan: dict, work: Path) -> dict:
    from bench import glue_step

    out = work / "glue.json"
    glue_step.main(["--device", args.device, "--dtype", "bf16", "--size", plan["glue"], "--reps",
                    str(plan["glue_reps"]), "--warmup", "1", "--batch", str(plan["glue_batch"]), "--seq",
                    str(plan["glue_seq"]), "--out", str(out)])
    return {"size": plan["glue"], **json.loads(out.read_text())["summary"]}


# ----- the report ----------------------------------------------------------------------------------------------
def failures(result: dict) -> list[str]:
    bad = []
    for r in result["trainer"]:
        name = f"{r['dtype']} {r['method']}"
        if r.get("exit_code") != 0:
            bad.append(f"{name}: trainer exit {r.get('exit_code')} {r.get('error', '')}".rstrip())
        elif not r.get("finite"):
            bad.append(f"{name}: a logged loss is not finite")
        elif not r.get("resume_equal"):
            bad.append(f"{name}: the resumed adapter differs (max |diff| {r.get('resume_max_abs_diff')})")
    return bad


def print_table(result: dict) -> None:
    print(f"\n{'dtype':<6} {'method':<10} {'steps/s':>8} {'peak GB':>8} {'finite':>7} {'resume':>7}")
    for r in result["trainer"]:
        sps = f"{r['steps_per_s']:8.2f}" if "steps_per_s" in r else f"{'-':>8}"
        peak = f"{r['peak_gb']:8.2f}" if r.get("peak_gb") is not None else f"{'-':>8}"
        resume = "equal" if r.get("resume_equal") else "DIFF" if "resume_equal" in r else "-"
        print(f"{r['dtype']:<6} {r['method']:<10} {sps} {peak} {str(r.get('finite', '-')):>7} {resume:>7}")
    u = result["unet_step"]
    print(f"\nUNet step ({u['unet']}, {u['resolution']} px, bf16): " + ", ".join(
        f"{m} {v:.3f}x LoRA" for m, v in u["vs_lora"].items()) + f"; LoRA {u['vs_floor']['lora']:.3f}x floor")
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
            pipeline = "tiny"
        else:
            pipeline = str(work / "sd15-random")
            build_sd15(Path(pipeline))
        result = {"command": "python bench/gpu_check.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                  "machine": machine(), "plan": plan, "trainer": run_workers(args, plan, pipeline, work)}
        result["unet_step"] = unet_ratios(args, plan)
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
