"""Our DreamBooth trainer against diffusers' own LoRA DreamBooth script of a family, on one random pipeline.

    python bench/vs_diffusers.py [--family sdxl|flux2-klein] [--model sdxl-mid|tiny-sdxl|tiny-flux2-klein|DIR]
                                 [--resolution 384] [--steps 5 45] [--rounds 3] [--rank 16] [--batch 1]

What a user would run instead: diffusers' examples/dreambooth/train_dreambooth_lora_sdxl.py (--family sdxl) or
train_dreambooth_lora_flux2_klein.py (--family flux2-klein; both kept in bench/vendor/, see its README.md for
where they come from) and training/dreambooth.py --method lora, each as its own process
(`python SCRIPT ...`, no launcher), on the same pipeline folder and the same instance images (crops of
skimage.data.chelsea()), with the same rank, resolution, batch size, seed and learning rate, fp32
(--mixed_precision no), no validation, no checkpoint, no final samples, both logging to tensorboard (both
scripts' default tracker). Each trainer runs twice per round, for the two --steps counts; a round runs the four
commands with the order of the trainers swapped every round (a slow phase of a noisy machine hits both alike).

    per step   = (wall(N2) - wall(N1)) / (N2 - N1)       (each round; the median over rounds is reported)
    fixed cost = wall(N1) - N1 x per step                  (imports, loading, injection, first-step allocations,
                                                            the final save: everything but the steps)

Ours also logs its own time/step (metrics.jsonl; the median of the N2 run, first step left out) as a check of the
differencing. --model sdxl-mid (SDXL's default) builds a random pipeline of SDXL's architecture scaled down
(bench/unet_step.py's SDXL_MID_UNET, two CLIP text encoders of widths 192 and 320, the second with a pooled
projection; the 8x VAE of bench/unet_step.py) with save_pretrained; tiny-sdxl and tiny-flux2-klein (klein's
default) are the project's presets (the architectures in miniature); a folder is any saved pipeline of the family.
Klein: both train on the text encoder's layers 9, 18, 27 (the pipeline's, ours; the script's default is 10, 20,
30, so it is given --text_encoder_out_layers 9 18 27) and both encode the prompt once.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.common import RESULTS, machine, write_json  # noqa: E402
from bench.unet_step import SDXL_MID_TEXT, SDXL_MID_UNET, VAE_8X  # noqa: E402
from ground import cli  # noqa: E402
from training.common.models import write_tokenizer_files  # noqa: E402
from training.families import FAMILIES as PRESETS  # noqa: E402

OURS = ROOT / "training" / "dreambooth.py"
# per family: diffusers' script, the default --model, what their script needs to train what ours trains
FAMILIES = {"sdxl": dict(script=ROOT / "bench" / "vendor" / "train_dreambooth_lora_sdxl.py", model="sdxl-mid",
                         theirs=[]),
            "flux2-klein": dict(script=ROOT / "bench" / "vendor" / "train_dreambooth_lora_flux2_klein.py",
                                model="tiny-flux2-klein", theirs=["--text_encoder_out_layers", "9", "18", "27"])}
PROMPT = "a photo of sks cat"


# ----- the inputs: one random SDXL pipeline folder, a few instance images ---------------------------------------
def build_sdxl_mid(folder: Path, resolution: int) -> None:
    """SDXL's architecture scaled down (random weights), saved with save_pretrained."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer


    tok_dir = folder.parent / "tokenizer-files"
    vocab = write_tokenizer_files(tok_dir)
    tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir), model_max_length=77)

    def text(hidden: int, layers: int) -> dict:   # 64-wide heads, as CLIP-L's and OpenCLIP bigG's
        return dict(hidden_size=hidden, intermediate_size=4 * hidden, num_attention_heads=hidden // 64,
                    num_hidden_layers=layers, vocab_size=vocab, max_position_embeddings=77, hidden_act="gelu",
                    bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id)

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=resolution // 8, in_channels=4, out_channels=4, **SDXL_MID_UNET)
    vae = AutoencoderKL(**VAE_8X, sample_size=resolution, scaling_factor=0.13025, force_upcast=True)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text(SDXL_MID_TEXT[0], 6)))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text(SDXL_MID_TEXT[1], 8),
                                                                projection_dim=SDXL_MID_TEXT[1]))
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading")
    StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
                              tokenizer_2=tokenizer, unet=unet, scheduler=scheduler).save_pretrained(folder)


def pipeline_folder(model: str, work: Path, resolution: int) -> Path:
    if model == "sdxl-mid":
        folder = work / "sdxl-mid-random"
        build_sdxl_mid(folder, resolution)
        return folder

    for family in PRESETS:
        if family.is_preset(model):
            return family.preset_path()   # built once into the cache; their script loads the same folder
    return Path(model).expanduser().resolve()


def instance_folder(folder: Path, n: int = 4) -> Path:
    """n overlapping 300 x 300 crops of skimage's chelsea (300 x 451), as PNG."""
    from PIL import Image
    from skimage import data

    img = data.chelsea()
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        left = round(i * (img.shape[1] - 300) / max(n - 1, 1))
        Image.fromarray(img[:, left:left + 300]).save(folder / f"chelsea-{i}.png")
    return folder


# ----- the two commands ------------------------------------------------------------------------------------------
def commands(args, pipeline: Path, instances: Path, out: Path, steps: int) -> dict[str, list[str]]:
    shared = ["--pretrained_model_name_or_path", str(pipeline), "--instance_data_dir", str(instances),
              "--instance_prompt", PROMPT, "--resolution", str(args.resolution), "--train_batch_size",
              str(args.batch), "--max_train_steps", str(steps), "--rank", str(args.rank), "--seed", "0",
              "--learning_rate", "1e-4", "--mixed_precision", "no", "--checkpointing_steps", "1000000",
              "--report_to", "tensorboard"]
    return {"ours": [sys.executable, str(OURS), *shared, "--output_dir", str(out / f"ours-{steps}"),
                     "--method", "lora", "--skip_final_samples"],
            "theirs": [sys.executable, str(args.diffusers_script), *shared, *FAMILIES[args.family]["theirs"],
                       "--output_dir", str(out / f"theirs-{steps}")]}


def environment(device: str) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled")
    if device == "cpu":
        env["ACCELERATE_USE_CPU"] = "true"   # accelerate's CPU even where a GPU is visible
    return env


def run_one(cmd: list[str], env: dict, out: Path) -> float:
    """Wall seconds of the whole process; a failure raises with the tail of its stderr."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or not any(out.glob("*.safetensors")):
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise cli.CommandError(f"{' '.join(cmd[:2])} exited {proc.returncode} (no adapter in {out}):\n{tail}")
    return wall


def logged_step(out: Path) -> float:
    """Ours: the median of metrics.jsonl's time/step, the first step left out."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["time/step"] for r in rows[1:] or rows)


def measure(args, pipeline: Path, instances: Path, work: Path) -> dict:
    env, (n1, n2) = environment(args.device), args.steps
    walls: dict[str, dict[int, list[float]]] = {k: {n1: [], n2: []} for k in ("ours", "theirs")}
    ours_logged = []
    for rnd in range(args.rounds):
        order = ["ours", "theirs"] if rnd % 2 == 0 else ["theirs", "ours"]
        for steps in (n1, n2):
            cmds = commands(args, pipeline, instances, work / f"round-{rnd}", steps)
            for who in order:
                out = Path(cmds[who][cmds[who].index("--output_dir") + 1])
                walls[who][steps].append(run_one(cmds[who], env, out))
                print(f"round {rnd + 1}/{args.rounds}: {who} {steps} steps: {walls[who][steps][-1]:.1f} s",
                      flush=True)
                if who == "ours" and steps == n2:
                    ours_logged.append(logged_step(out))
    result = {}
    for who, w in walls.items():
        per_step = [(b - a) / (n2 - n1) for a, b in zip(w[n1], w[n2])]
        step = statistics.median(per_step)
        result[who] = {"per_step_s": step, "per_step_by_round": per_step, "walls": {str(k): v for k, v in w.items()},
                       "fixed_s": statistics.median(a - n1 * step for a in w[n1])}
    result["ours"]["logged_time_per_step_s"] = statistics.median(ours_logged)
    result["ratio_per_step"] = result["ours"]["per_step_s"] / result["theirs"]["per_step_s"]
    result["ratio_per_step_by_round"] = [a / b for a, b in zip(result["ours"]["per_step_by_round"],
                                                                result["theirs"]["per_step_by_round"])]
    result["ratio_fixed"] = result["ours"]["fixed_s"] / result["theirs"]["fixed_s"]
    result["command"] = {k: shlex.join(v[1:]) for k, v in commands(args, pipeline, instances, work / "round-0",
                                                                  n2).items()}
    return result


def main(argv=None) -> int:
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", default="sdxl", choices=sorted(FAMILIES),
                   help="whose diffusers script ours runs against (default sdxl)")
    p.add_argument("--model", default=None,
                   help="sdxl-mid (SDXL's default: SDXL scaled down, random weights, built here), a preset "
                        "(tiny-sdxl; tiny-flux2-klein, klein's default) or a saved pipeline folder of the family")
    p.add_argument("--resolution", type=int, default=384, help="training resolution, both trainers")
    p.add_argument("--steps", type=int, nargs=2, default=[5, 45], metavar=("N1", "N2"),
                   help="the two step counts each trainer runs (per step = the difference of the walls / N2-N1)")
    p.add_argument("--rounds", type=int, default=3, help="repetitions of the four runs (median reported)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank, both trainers")
    p.add_argument("--batch", type=int, default=1, help="--train_batch_size, both trainers")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cpu (default) or cuda")
    p.add_argument("--diffusers_script", type=Path, default=None,
                   help="diffusers' script (default: the family's copy in bench/vendor/)")
    p.add_argument("--workdir", type=Path, help="keep the pipeline, images and runs here (default: a temp folder)")
    p.add_argument("--out", type=Path, help="result JSON (default bench/results/vs_diffusers-<family>-<device>-"
                                            "<model>-<resolution>px.json)")
    args = p.parse_args(argv)
    args.model = args.model or FAMILIES[args.family]["model"]
    args.diffusers_script = args.diffusers_script or FAMILIES[args.family]["script"]
    if args.steps[1] <= args.steps[0]:
        raise cli.CommandError("--steps N1 N2 needs N2 > N1")
    if not args.diffusers_script.is_file():
        raise cli.CommandError(f"no {args.diffusers_script}: see bench/vendor/README.md for where it comes from")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="vs_diffusers-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        pipeline = pipeline_folder(args.model, work, args.resolution)
        instances = instance_folder(work / "instance")
        result = measure(args, pipeline, instances, work)
    import diffusers
    import peft

    result.update(machine=machine(), diffusers=diffusers.__version__, peft=peft.__version__, family=args.family,
                  script=args.diffusers_script.name, model=args.model,
                  resolution=args.resolution, rank=args.rank, batch=args.batch, steps=args.steps,
                  rounds=args.rounds, seconds=time.perf_counter() - t0,
                  bench="python bench/vs_diffusers.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    name = f"vs_diffusers-{args.family}-{args.device}-{Path(args.model).name}-{args.resolution}px.json"
    out = args.out or RESULTS / name
    write_json(out, result, parents=True)
    o, t = result["ours"], result["theirs"]
    print(f"\n{args.model} at {args.resolution} px, r={args.rank}, batch {args.batch}, fp32, {args.rounds} rounds of "
          f"{args.steps[0]} and {args.steps[1]} steps")
    print(f"  {'':<8} {'s/step':>8} {'fixed s':>8}   per round")
    for who, r in (("ours", o), ("diffusers", t)):
        print(f"  {who:<8} {r['per_step_s']:8.3f} {r['fixed_s']:8.1f}   "
              + ", ".join(f"{s:.3f}" for s in r["per_step_by_round"]))
    print(f"  ours / diffusers: per step {result['ratio_per_step']:.3f} (rounds "
          + ", ".join(f"{r:.3f}" for r in result["ratio_per_step_by_round"])
          + f"), fixed {result['ratio_fixed']:.3f}; ours' own logged time/step {o['logged_time_per_step_s']:.3f} s")
    print(f"\nwrote {out} ({result['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run_cli(main))
