"""The validation loss (--validation_loss_images, training/images/validation.py and the objectives'
validation_loss): each objective's value against a hand computation with the same seeded noise and schedule points,
the training RNG left alone; DreamBooth on tiny-flux2-klein holding the last image out (one image fewer per epoch),
val_loss at the checkpoint steps and the last step equal to a hand recomputation on the checkpoint's adapter loaded
into a fresh transformer, the base model's value the same for every method, bit-identical resume with the flag on,
bad input; the semantic map's held-out pairs; GLUE's val_loss (its tuning part's loss) against the best epoch's
adapter reloaded; eval.report's validation figure and the app's val_loss curve, column and best step.

DreamBooth runs are in-process, 32 px, rank 2, 3-4 steps, one intra-op thread (tests/family_runs.py)."""
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

import lowrank
from app import compare
from app import runs as R
from eval import plots, report
from ground import runfolder
from tests.family_runs import check_resume_after_a_kill, one_thread  # noqa: F401
from tests.test_dreambooth import metrics
from tests.test_language_tasks import glue_args, write_tsv
from training import dreambooth, glue, semantic_map
from training.families import expand, load_family
from training.families.flux2_klein import klein_latents
from training.images.diffusion import DiffusionObjective, FlowMatchObjective
from training.segmap import data as sd
from training.subject.data import example_subject, to_tensor
from training.text import glue_data as G
from training.text.language import load_language_model

PRESET = "tiny-flux2-klein"
SIZE, K = 32, 4
FAST = ["--pretrained_model_name_or_path", PRESET, "--seed", "0", "--resolution", str(SIZE), "--rank", "2",
        "--num_inference_steps", "2", "--num_validation_images", "1", "--report_to", "none", "--skip_final_samples"]
HELD = ["--validation_loss_images", "1"]
POINTS = [125, 375, 625, 875]   # (k + 1/2)/4 of a 1000-step schedule

pytestmark = pytest.mark.usefixtures("tiny_cache")


def denoiser(noisy, t):   # a fixed stand-in for a model: the loss arithmetic, not a network, is under test
    return 0.3 * noisy + (t.float() / 1000).view(-1, 1, 1, 1)


def pixels(n=2):
    return torch.linspace(-1, 1, n * 3 * 8 * 8).reshape(n, 3, 8, 8)


class FakeVAE:
    """encode(x).latent_dist.sample(generator) = x's first 2 channels + a draw from the generator."""
    dtype = torch.float32
    config = SimpleNamespace(scaling_factor=0.5)

    def encode(self, x):
        sample = lambda generator: x[:, :2] + torch.randn(x[:, :2].shape, generator=generator)  # noqa: E731
        return SimpleNamespace(latent_dist=SimpleNamespace(sample=sample))


# ----- the objectives against a hand computation --------------------------------------------------------------
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_ddpm_validation_loss_is_the_hand_computed_mse_at_fixed_noise_and_timesteps(prediction):
    sched = DDPMScheduler(prediction_type=prediction)
    objective = DiffusionObjective(FakeVAE(), sched, torch.float32, torch.device("cpu"))
    x = pixels()
    rng = torch.get_rng_state()
    value = objective.validation_loss(denoiser, x, seed=7, num_timesteps=K)
    assert torch.equal(torch.get_rng_state(), rng)   # the training RNG is not touched

    gen = torch.Generator().manual_seed(7)
    latents = (x[:, :2] + torch.randn(x[:, :2].shape, generator=gen)) * 0.5
    losses = []
    for t in POINTS:
        noise = torch.randn(latents.shape, generator=gen)
        a = sched.alphas_cumprod[t]
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        target = noise if prediction == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * latents
        losses.append(((denoiser(noisy, torch.full((2,), t)) - target) ** 2).mean())
    assert value == pytest.approx(torch.stack(losses).mean().item(), rel=1e-6)
    assert objective.validation_timesteps(K) == POINTS
    assert objective.validation_loss(denoiser, x, seed=7, num_timesteps=K) == value     # fixed noise: same value
    assert objective.validation_loss(denoiser, x, seed=8, num_timesteps=K) != value     # another seed, other noise


def test_flow_validation_loss_is_the_unweighted_hand_computed_mse_on_the_sigma_grid():
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)   # shifted: σ is not t/1000
    encode = lambda px, gen: px[:, :2] * 0.7  # noqa: E731  (deterministic latents, like FLUX.2's VAE mode)
    objective = FlowMatchObjective(encode, torch.float32, sched, torch.float32, torch.device("cpu"),
                                   weighting_scheme="sigma_sqrt")   # a training weighting the validation loss ignores
    x = pixels(3)
    rng = torch.get_rng_state()
    value = objective.validation_loss(denoiser, x, seed=3, num_timesteps=K)
    assert torch.equal(torch.get_rng_state(), rng)

    gen, latents, losses = torch.Generator().manual_seed(3), x[:, :2] * 0.7, []
    for i in POINTS:
        noise = torch.randn(latents.shape, generator=gen)
        sigma, t = sched.sigmas[i], sched.timesteps[i]
        assert 0 < sigma < 1
        pred = denoiser((1 - sigma) * latents + sigma * noise, t.repeat(3))
        losses.append(F.mse_loss(pred, noise - latents))
    assert value == pytest.approx(torch.stack(losses).mean().item(), rel=1e-6)
    assert objective.validation_timesteps(K) == [float(sched.timesteps[i]) for i in POINTS]
    assert len(set(objective.validation_timesteps(K))) == K   # spread over the schedule, not one t


# ----- DreamBooth on FLUX.2-klein ----------------------------------------------------------------------------
def train(out, *extra):
    return dreambooth.main(["--output_dir", str(out), *FAST, *extra])


@pytest.fixture(scope="module")
def held_out_runs(tmp_path_factory):
    """method -> a 3-step run with the last instance image held out and a checkpoint at step 2."""
    root = tmp_path_factory.mktemp("val-loss")
    runs = {}
    for method in ("lora", "delora"):
        assert train(root / method, "--method", method, "--max_train_steps", "3", "--checkpointing_steps", "2",
                     *HELD) == 0
        runs[method] = root / method
    return runs


def hand_val_loss(adapter_dir=None, seed=0) -> float:
    """The held-out image's loss by hand: a fresh pipeline (+ the adapter in `adapter_dir`), the last example image
    centre-cropped, FLUX.2's latents, noise drawn point by point from Generator(seed), σ from the scheduler's
    training grid, x_σ = (1 − σ)x + σ·noise, unweighted MSE against noise − x, the mean over the points."""
    family, pipe = load_family(PRESET)
    model = family.denoiser(pipe)
    if adapter_dir is not None:
        lowrank.load_adapter(model, adapter_dir)
    model.eval()
    img = example_subject(SIZE)[-1]
    left, top = (img.width - SIZE) // 2, (img.height - SIZE) // 2
    x = to_tensor(img.crop((left, top, left + SIZE, top + SIZE)))[None]
    cond = expand(family.encode(pipe, ["a photo of sks cat"], SIZE), 1)
    sched = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    gen, losses = torch.Generator().manual_seed(seed), []
    with torch.no_grad():
        latents = klein_latents(pipe.vae, x)
        for i in POINTS:
            noise = torch.randn(latents.shape, generator=gen)
            sigma = sched.sigmas[i]
            pred = family.denoise(model, (1 - sigma) * latents + sigma * noise, sched.timesteps[i].repeat(1), cond)
            losses.append(((pred.float() - (noise - latents)) ** 2).mean())
    return torch.stack(losses).mean().item()


def test_the_held_out_image_never_trains_and_val_loss_is_logged_at_checkpoints_and_the_end(held_out_runs):
    run = json.loads((held_out_runs["lora"] / runfolder.RUN_JSON).read_text())
    assert run["instance_images"] == 4 and run["steps_per_epoch"] == 4     # 5 example images, 1 held out
    held = run["validation_loss"]
    assert held["held_out_images"] == 1 and held["seed"] == 0 and len(held["timesteps"]) == K
    rows = metrics(held_out_runs["lora"])
    assert [r["step"] for r in rows if "val_loss" in r] == [2, 3]          # checkpoint-2 and the last step
    assert all(np.isfinite(r["val_loss"]) for r in rows if "val_loss" in r)
    card = (held_out_runs["lora"] / "README.md").read_text()
    assert f"**Validation loss** at step 3: {rows[-1]['val_loss']:.4g}" in card


def test_val_loss_equals_a_hand_computation_on_the_checkpoint_adapter(held_out_runs):
    for method, out in held_out_runs.items():
        rows = {r["step"]: r for r in metrics(out)}
        assert rows[2]["val_loss"] == pytest.approx(hand_val_loss(out / "checkpoint-2"), rel=1e-6)
        assert rows[3]["val_loss"] == pytest.approx(hand_val_loss(out), rel=1e-6)
        assert rows[3]["val_loss"] != rows[2]["val_loss"], method             # the adapter moved
    base = hand_val_loss()
    values = [json.loads((out / runfolder.RUN_JSON).read_text())["validation_loss"] for out in held_out_runs.values()]
    # the base model's value, before any adapter: the same noise and points for every method, bit for bit
    assert values[0] == values[1] and values[0]["base_model"] == pytest.approx(base, rel=1e-6)


def test_resume_after_a_kill_stays_bit_identical_with_the_validation_loss_on(tmp_path, monkeypatch):
    check_resume_after_a_kill(train, tmp_path, monkeypatch, *HELD)
    assert [r["step"] for r in metrics(tmp_path / "killed") if "val_loss" in r] == [2, 4]


@pytest.mark.parametrize("n, message", [("5", "the data has 5 instance images; hold out at most 4"),
                                        ("-1", "--validation_loss_images must be >= 0")])
def test_too_many_or_negative_held_out_images_is_one_error_line_and_nothing_written(n, message, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(out, "--validation_loss_images", n, "--max_train_steps", "1") == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
    assert not out.exists()


# ----- the semantic map ---------------------------------------------------------------------------------------
def test_semantic_map_holds_out_its_last_pairs(tmp_path):
    out = tmp_path / "seg"
    assert semantic_map.main(["--output_dir", str(out), "--seed", "0", "--resolution", str(SIZE), "--rank", "2",
                              "--max_train_steps", "2", "--checkpointing_steps", "1", "--num_inference_steps", "1",
                              "--num_validation_images", "1", "--num_validation_maps", "1", "--report_to", "none",
                              "--skip_final_samples", "--validation_loss_images", "2"]) == 0
    run = json.loads((out / runfolder.RUN_JSON).read_text())
    assert run["train_pairs"] == len(sd.example_set()[0]) - 2 and run["validation_loss"]["held_out_images"] == 2
    rows = metrics(out)
    assert [r["step"] for r in rows if "val_loss" in r] == [1, 2]
    # step 0 is the base UNet (zero-initialised encoder output, LoRA's B = 0): training moves the value from there
    assert len({run["validation_loss"]["base_model"], rows[0]["val_loss"], rows[1]["val_loss"]}) == 3


# ----- GLUE: the tuning part's loss as val_loss ---------------------------------------------------------------
def test_glue_logs_its_tuning_loss_as_val_loss(tmp_path, monkeypatch):

    monkeypatch.setenv("LOWRANK_CACHE", str(tmp_path / "cache"))
    lines = [line.split("\t") for line in (G.EXAMPLE_DIR / "train.tsv").read_text().splitlines()[1:]]
    files = (write_tsv(tmp_path / "train.tsv", lines[:16]), write_tsv(tmp_path / "dev.tsv", lines[24:40]))
    out = tmp_path / "glue"
    assert glue.main(glue_args(out, files, "--seed", "1", "--num_train_epochs", "1", "--learning_rate", "1e-2")) == 0
    (row,) = [r for r in runfolder.read_metrics(out) if "tune/score" in r]
    model, tokenizer = load_language_model("tiny-bert", "classification", num_labels=2)
    lowrank.load_adapter(model, out / "best")   # epoch 0's adapter and head
    model.eval()
    task = G.TASKS["sst2"]
    _, val = G.load_local(task, files[0], files[1])
    tune, _ = G.split_validation(len(val.labels), "sst2", seed=1)
    feats = glue.encode(tokenizer, val, 128, False)
    batch = tokenizer.pad([feats[i] for i in tune], return_tensors="pt")
    labels = batch.pop("labels")
    with torch.no_grad():
        expected = F.cross_entropy(model(**batch).logits.float(), labels).item()
    assert row["val_loss"] == pytest.approx(expected, rel=1e-5)


# ----- eval.report and the app read it ------------------------------------------------------------------------
def test_report_and_app_show_val_loss(held_out_runs, tmp_path):

    seen = {}
    save = plots.save
    plots.save = lambda fig, path: (seen.__setitem__(path.name, fig), save(fig, path))
    try:
        assert report.main([*map(str, held_out_runs.values()), "--out", str(tmp_path / "report")]) == 0
    finally:
        plots.save = save
    (ax,) = seen["validation_vs_step.png"].axes
    assert "Validation loss" in ax.get_title() and ax.get_legend() is not None
    lora = [r["val_loss"] for r in metrics(held_out_runs["lora"]) if "val_loss" in r]
    assert any(list(line.get_xdata()) == [2, 3] and list(line.get_ydata()) == lora for line in ax.get_lines())
    assert "](validation_vs_step.png)" in (tmp_path / "report" / "report.md").read_text()

    info = R.info(held_out_runs["lora"])
    frame = compare.loss_curves([info])
    held = frame[frame["run"].str.endswith("· val_loss")]
    assert held["step"].tolist() == [2, 3] and held["value"].tolist() == lora
    table = compare.metrics_table([info])
    assert table["val_loss"].tolist() == [round(lora[-1], 4)]
    best = 2 + int(np.argmin(lora))
    assert table["best step"].tolist() == [f"{best} (validation loss)"]
