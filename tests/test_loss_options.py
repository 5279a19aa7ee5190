"""Min-SNR-γ weighting (--snr_gamma), offset noise (--noise_offset) and caption dropout (--caption_dropout): the
objective's weights, noise and loss against hand computations from the same seeded generator (epsilon and
v-prediction, prior preservation); flow-matching families refusing the DDPM-only flags; DreamBooth's per-image
empty-prompt draws (deterministic, the crops untouched) and a run where every caption drops, whose adapter no
longer depends on the instance prompt; each flag in --help, run.json and the model card; bad values.

Trainer runs are in-process, tiny SD at 32 px, 2 steps, no samples."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from tests.stderr import one_error_line
from tests.test_training_faults import same_adapter
from tests.test_validation_loss import FakeVAE, pixels
from training import dreambooth, semantic_map
from training.common.batches import mix_seed
from training.images.diffusion import DiffusionObjective
from training.subject.data import DreamBoothDataset, collate, example_subject

CPU = torch.device("cpu")
FAST = ["--seed", "0", "--resolution", "32", "--rank", "2", "--max_train_steps", "2", "--checkpointing_steps", "10",
        "--report_to", "none", "--skip_final_samples", "--export_diffusers", "false"]

pytestmark = pytest.mark.usefixtures("tiny_cache")


def hand_snr(t: np.ndarray) -> np.ndarray:
    """SNR(t) = ᾱ_t / (1 − ᾱ_t) in float64, from the scheduler's float32 ᾱ (its default linear betas 1e-4 .. 0.02 over
    1000 steps: a float64 cumulative product of those differs by up to 2e-4 relative at t = 0, where 1 − ᾱ is tiny)."""
    alphas_cumprod = DDPMScheduler().alphas_cumprod.double().numpy()
    np.testing.assert_allclose(alphas_cumprod, np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000)), rtol=1e-5)
    return alphas_cumprod[t] / (1.0 - alphas_cumprod[t])


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_min_snr_weights_are_the_hand_computed_ones(prediction):
    objective = DiffusionObjective(FakeVAE(), DDPMScheduler(prediction_type=prediction), torch.float32, CPU,
                                   snr_gamma=5.0)
    t = np.array([0, 10, 100, 250, 500, 999])
    snr = hand_snr(t)
    want = np.minimum(snr, 5.0) / (snr + 1 if prediction == "v_prediction" else snr)
    got = objective.snr_weights(torch.tensor(t)).numpy()
    np.testing.assert_allclose(got, want, rtol=2e-5)
    assert got[0] == pytest.approx(5.0 / (snr[0] + (prediction == "v_prediction")), rel=2e-5)   # clipped at γ
    assert got[-1] == pytest.approx(1.0 if prediction == "epsilon" else snr[-1] / (snr[-1] + 1), rel=2e-5)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_loss_with_snr_and_offset_noise_is_the_hand_computed_one(prediction):
    """Batch of 4 with prior preservation: the instance half's per-image MSE times its weight, plus the class half's
    plain MSE; the noise is randn + 0.1 · randn(B, C, 1, 1), drawn from the step's generator in diffusers' order."""
    sched = DDPMScheduler(prediction_type=prediction)
    objective = DiffusionObjective(FakeVAE(), sched, torch.float32, CPU, snr_gamma=2.0, noise_offset=0.1)
    x = torch.cat([pixels(), pixels() * 0.5])
    seen = {}

    def denoise(noisy, t):
        seen["noisy"], seen["t"] = noisy, t
        return 0.3 * noisy

    loss = objective.loss(x, denoise, torch.Generator().manual_seed(3), prior_loss_weight=0.7)

    gen = torch.Generator().manual_seed(3)
    latents = (x[:, :2] + torch.randn(x[:, :2].shape, generator=gen)) * 0.5      # FakeVAE's sample, scaled
    noise = torch.randn(latents.shape, generator=gen)
    noise = noise + 0.1 * torch.randn((4, 2, 1, 1), generator=gen)               # the offset: one per image, channel
    t = torch.randint(0, 1000, (4,), generator=gen)
    a = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
    torch.testing.assert_close(seen["noisy"], noisy)
    assert torch.equal(seen["t"], t)
    target = noise if prediction == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * latents
    per_image = ((0.3 * noisy - target) ** 2).mean(dim=(1, 2, 3))
    snr = torch.tensor(hand_snr(t.numpy()))
    weight = torch.minimum(snr, torch.tensor(2.0)) / (snr + 1 if prediction == "v_prediction" else snr)
    want = (per_image[:2].double() * weight[:2]).mean() + 0.7 * per_image[2:].mean()
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)


def test_defaults_are_the_plain_mse_and_draw_nothing_more():
    """No --snr_gamma, no --noise_offset: the loss is F.mse_loss, and the generator is left where it was without them
    (the golden-adapter test in test_families.py holds the whole run to the same bits)."""
    sched = DDPMScheduler()
    plain = DiffusionObjective(FakeVAE(), sched, torch.float32, CPU)
    gen = torch.Generator().manual_seed(5)
    loss = plain.loss(pixels(), lambda noisy, t: 0.3 * noisy, gen)
    after = gen.get_state()
    gen = torch.Generator().manual_seed(5)
    latents, noise, t, noisy = plain.noisy_latents(pixels(), gen)
    assert torch.equal(gen.get_state(), after)
    assert loss.item() == F.mse_loss(0.3 * noisy, noise).item()


def test_flow_matching_families_refuse_the_ddpm_flags(tmp_path, capsys):
    out = tmp_path / "flux"
    for flag, value, says in (("--snr_gamma", "5", "--weighting_scheme"), ("--noise_offset", "0.1", "leave it at 0")):
        assert dreambooth.main(["--output_dir", str(out), "--pretrained_model_name_or_path", "tiny-flux2-klein",
                                *FAST, flag, value]) == 2
        line = one_error_line(capsys)
        assert flag in line and says in line and "flow matching" in line
        assert not out.exists()


@pytest.mark.parametrize("flags, says", [
    (["--snr_gamma", "-1"], "--snr_gamma must be a positive number"),
    (["--snr_gamma", "0"], "--snr_gamma must be a positive number"),
    (["--noise_offset", "-0.1"], "--noise_offset must be >= 0"),
    (["--caption_dropout", "1.5"], "--caption_dropout is a probability"),
])
def test_bad_values_are_one_line_and_write_nothing(tmp_path, capsys, flags, says):
    out = tmp_path / "bad"
    assert dreambooth.main(["--output_dir", str(out), *FAST, *flags]) == 2
    assert says in one_error_line(capsys)
    assert not out.exists()


def test_caption_dropout_draws_are_seeded_per_image_and_leave_the_crops_alone():
    images = example_subject(48)
    dropping = DreamBoothDataset(images, None, 32, center_crop=False, seed=11, caption_dropout=0.4)
    plain = DreamBoothDataset(images, None, 32, center_crop=False, seed=11)
    drops = []
    for k in range(40):
        item, same = dropping[k], plain[k]
        assert torch.equal(item["instance"], same["instance"]) and "drop" not in same
        gen = torch.Generator().manual_seed(mix_seed(11, k))   # the crop's two draws, then the dropout's
        torch.randint(0, 17, (1,), generator=gen), torch.randint(0, 17, (1,), generator=gen)
        assert item["drop"] == (torch.rand((), generator=gen).item() < 0.4)
        drops.append(item["drop"])
    assert 5 < sum(drops) < 30   # about 40 % of 40
    assert drops == [dropping[k]["drop"] for k in range(40)]   # the same on a second pass (resume, rerun)
    assert collate([dropping[k] for k in range(4)])["drop"].tolist() == drops[:4]
    assert "drop" not in collate([plain[0]])


def test_dropped_rows_take_the_empty_prompt():
    cond = {"encoder_hidden_states": torch.arange(24.0).view(3, 2, 4), "text_embeds": torch.ones(3, 5)}
    empty = {"encoder_hidden_states": -torch.ones(1, 2, 4), "text_embeds": torch.zeros(1, 5)}
    out = dreambooth.dropped(cond, empty, torch.tensor([False, True, False]))
    assert torch.equal(out["encoder_hidden_states"][1], -torch.ones(2, 4))
    assert torch.equal(out["text_embeds"][1], torch.zeros(5))
    for k in cond:
        assert torch.equal(out[k][[0, 2]], cond[k][[0, 2]])


def test_every_caption_dropped_trains_without_the_prompt_and_the_flags_are_recorded(tmp_path):
    """--caption_dropout 1: two different instance prompts give the same adapter bits (the loss only ever sees the
    empty prompt); with the prompt kept they differ. run.json and the card carry the flags."""
    options = ["--caption_dropout", "1", "--snr_gamma", "5", "--noise_offset", "0.05"]
    a, b, kept = tmp_path / "a", tmp_path / "b", tmp_path / "kept"
    assert dreambooth.main(["--output_dir", str(a), *FAST, *options, "--instance_prompt", "a photo of sks cat"]) == 0
    assert dreambooth.main(["--output_dir", str(b), *FAST, *options, "--instance_prompt", "zzz qqq"]) == 0
    same_adapter(a, b)
    assert dreambooth.main(["--output_dir", str(kept), *FAST, "--snr_gamma", "5", "--noise_offset", "0.05",
                            "--instance_prompt", "zzz qqq"]) == 0
    with pytest.raises(AssertionError):
        same_adapter(b, kept)
    args = json.loads((a / "run.json").read_text())["args"]
    assert (args["caption_dropout"], args["snr_gamma"], args["noise_offset"]) == (1.0, 5.0, 0.05)
    card = (a / "README.md").read_text()
    assert "`snr_gamma=5.0`" in card and "`noise_offset=0.05`" in card and "`caption_dropout=1.0`" in card
    assert "caption_dropout" not in (kept / "README.md").read_text()   # off: not listed


def test_help_lists_the_flags():
    for parser, flags in ((dreambooth.build_parser(), ("--snr_gamma", "--noise_offset", "--caption_dropout")),
                          (semantic_map.build_parser(), ("--snr_gamma", "--noise_offset", "--caption_dropout"))):
        text = parser.format_help()
        assert all(f in text for f in flags)
    args = semantic_map.build_parser().parse_args(["--caption_dropout", "0.3"])
    assert args.proportion_empty_prompts == 0.3   # the semantic map's own flag, under DreamBooth's name
