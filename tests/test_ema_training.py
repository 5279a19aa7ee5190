"""--ema_decay through the trainers: the average a run saves against a hand computation from its per-step
checkpoints (only optimizer steps count, after the methods' own step hooks), bit-identical after a resume,
training itself unchanged, checkpoint-N/ema and ema/ loadable and exportable, samples of both, the flags in
--help, run.json and the model card, the app's choices, and bad values refused in one line.

Trainer runs are in-process: tiny SD at 32 px, a checkpoint every step, 1 sample of 1 denoising step."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import lowrank
from app import generate
from ground import runfolder
from lowrank.io import adapter_state_dict
from tests.stderr import one_error_line
from tests.test_language_tasks import glue_args, glue_files  # noqa: F401 - glue_files is a fixture
from tests.test_training_faults import same_adapter
from training import dreambooth, export, glue, semantic_map
from training.families import load_pipeline
from training.text.language import load_language_model

FAST = ["--seed", "0", "--resolution", "32", "--rank", "2", "--max_train_steps", "4", "--checkpointing_steps", "1",
        "--num_inference_steps", "1", "--num_validation_images", "1", "--report_to", "none",
        "--export_diffusers", "false", "--gradient_accumulation_steps", "2"]
DECAY, START = 0.8, 1
EMA = ["--ema_decay", str(DECAY), "--ema_start_step", str(START)]

pytestmark = pytest.mark.usefixtures("tiny_cache")


def train(out, *extra):
    assert dreambooth.main(["--output_dir", str(out), *FAST, *extra]) == 0
    return out


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_cache):
    return train(tmp_path_factory.mktemp("ema") / "lora", *EMA)


def weights(folder):
    return load_file(str(folder / runfolder.ADAPTER_WEIGHTS))


def hand_average(run, steps):
    """The average after each step from the checkpoints' adapters (the weights after that optimizer step), with
    the same fp32 operations in the same order as AdapterEMA.update; the trained keys are the factors."""
    trained = {k for k in weights(run) if k.endswith((".lora_A", ".lora_B"))}
    averages, avg = {}, None
    for step in range(1, steps + 1):
        w = weights(runfolder.checkpoint_dir(run, step))
        if step <= START:
            avg = {k: v.float().clone() for k, v in w.items()}
        else:
            avg = {k: avg[k].mul(DECAY).add(v.float(), alpha=1 - DECAY) if k in trained else v.float().clone()
                   for k, v in w.items()}
        averages[step] = avg
    return averages, trained


def check_average(run, steps):
    averages, trained = hand_average(run, steps)
    assert trained
    for step in range(1, steps + 1):
        got = weights(runfolder.checkpoint_dir(run, step) / runfolder.EMA_DIR)
        assert got.keys() == averages[step].keys()
        for k, v in got.items():
            assert torch.equal(v.float(), averages[step][k]), (step, k)
        state = load_file(str(runfolder.checkpoint_dir(run, step) / runfolder.EMA_STATE))
        assert all(torch.equal(state[k], averages[step][k]) for k in averages[step])
    final = weights(run / runfolder.EMA_DIR)
    assert all(torch.equal(final[k].float(), averages[steps][k]) for k in final)
    last = weights(run)   # the average has moved away from the weights once it averages
    assert all(torch.equal(last[k], final[k]) for k in last if k not in trained)
    assert not any(torch.equal(last[k], final[k]) for k in trained)
    return averages


def test_average_is_the_hand_computed_one_over_optimizer_steps(lora_run):
    """Accumulation 2: four optimizer steps of two micro-batches; the average follows the optimizer steps."""
    averages = check_average(lora_run, 4)
    first = weights(runfolder.checkpoint_dir(lora_run, 1))
    assert all(torch.equal(averages[1][k], first[k].float()) for k in first)   # step <= --ema_start_step: copied
    assert [r["step"] for r in runfolder.read_metrics(lora_run)] == [1, 2, 3, 4]


def test_average_follows_the_methods_step_hooks(tmp_path):
    """Delta-LoRA snapshots (A_K, B_K) in its after-optimizer-step hook at K = 2: the average taken after that
    step already holds the snapshot (copied, not averaged), so the hooks ran first."""
    run = train(tmp_path / "deltalora", *EMA, "--method", "deltalora", "--deltalora_start_step", "2",
                "--max_train_steps", "3", "--skip_final_samples")
    check_average(run, 3)
    for step, started in ((1, False), (2, True), (3, True)):
        avg = weights(runfolder.checkpoint_dir(run, step) / runfolder.EMA_DIR)
        flags = [v for k, v in avg.items() if k.endswith("deltalora_started")]
        assert flags and all(bool(f) is started for f in flags)


def test_resumed_run_has_the_same_average_and_training_is_unchanged(lora_run, tmp_path):
    quick = [*EMA, "--skip_final_samples"]   # samples never touch the training bits
    resumed = train(tmp_path / "resumed", *quick, "--max_train_steps", "2")   # ends after checkpoint-2
    shutil.rmtree(resumed / runfolder.EMA_DIR)                               # only the checkpoint carries on
    train(resumed, *quick, "--resume_from_checkpoint", "latest")
    same_adapter(lora_run / runfolder.EMA_DIR, resumed / runfolder.EMA_DIR)
    same_adapter(lora_run / "checkpoint-4" / runfolder.EMA_DIR, resumed / "checkpoint-4" / runfolder.EMA_DIR)
    same_adapter(lora_run, resumed)
    plain = train(tmp_path / "plain", "--skip_final_samples")   # no average: the same adapter, no ema/ anywhere
    same_adapter(lora_run, plain)
    assert not list(plain.rglob(runfolder.EMA_DIR)) and not list(plain.rglob(runfolder.EMA_STATE))
    assert "ema/" not in (plain / "README.md").read_text()
    # turned on at a resume: the average starts from the resumed weights (checkpoint-2's)
    steps = [weights(runfolder.checkpoint_dir(plain, k)) for k in (2, 3, 4)]
    train(plain, *quick, "--resume_from_checkpoint", "checkpoint-2")
    average = weights(plain / runfolder.EMA_DIR)
    for k, v in average.items():
        want = steps[0][k].float()
        if k.endswith((".lora_A", ".lora_B")):
            want = want.mul(DECAY).add(steps[1][k], alpha=1 - DECAY).mul(DECAY).add(steps[2][k], alpha=1 - DECAY)
        assert torch.equal(v, want if k.endswith((".lora_A", ".lora_B")) else steps[2][k]), k


def test_resuming_with_another_decay_says_so_and_uses_it(lora_run, tmp_path, capsys):
    """Changing --ema_decay at a resume is allowed (a user's call), but not silent: one warning naming both; the
    average goes on from the checkpoint's with the new decay (training itself unchanged)."""
    run = tmp_path / "redecayed"
    shutil.copytree(runfolder.checkpoint_dir(lora_run, 3), runfolder.checkpoint_dir(run, 3))
    capsys.readouterr()
    train(run, "--ema_decay", "0.5", "--ema_start_step", str(START), "--skip_final_samples",
          "--resume_from_checkpoint", "latest")
    err = capsys.readouterr().err
    assert f"checkpoint-3's moving average was kept with --ema_decay {DECAY} --ema_start_step {START}; it continues " \
           f"with --ema_decay 0.5 --ema_start_step {START}" in " ".join(err.split())
    same_adapter(lora_run, run)
    before, step4 = hand_average(lora_run, 3)[0][3], weights(runfolder.checkpoint_dir(lora_run, 4))
    for k, v in weights(run / runfolder.EMA_DIR).items():
        want = before[k].mul(0.5).add(step4[k].float(), alpha=0.5) if k.endswith((".lora_A", ".lora_B")) \
            else step4[k].float()
        assert torch.equal(v.float(), want), k


def test_a_damaged_average_state_is_one_error_line(lora_run, tmp_path, capsys):
    run = tmp_path / "damaged"
    shutil.copytree(runfolder.checkpoint_dir(lora_run, 3), runfolder.checkpoint_dir(run, 3))
    (runfolder.checkpoint_dir(run, 3) / runfolder.EMA_STATE).write_bytes(b"not a safetensors file")
    assert dreambooth.main(["--output_dir", str(run), *FAST, *EMA, "--resume_from_checkpoint", "latest"]) == 2
    assert runfolder.EMA_STATE in one_error_line(capsys)
    assert not (run / runfolder.EMA_DIR).exists()


def test_averages_load_export_and_have_samples(lora_run, tmp_path):
    unet = load_pipeline().unet
    for folder in (lora_run / runfolder.EMA_DIR, lora_run / "checkpoint-3" / runfolder.EMA_DIR):
        lowrank.load_adapter(unet, folder)
        live = adapter_state_dict(unet)
        saved = weights(folder)
        assert live.keys() == saved.keys() and all(torch.equal(live[k], saved[k]) for k in saved)
        lowrank.eject(unet)
    for folder in (lora_run, lora_run / "checkpoint-2"):   # samples of both, the normal ones where they were
        normal, average = (json.loads(line) for line in ((f / runfolder.SAMPLES / runfolder.PROMPTS).read_text()
                                                        for f in (folder, folder / runfolder.EMA_DIR)))
        assert normal == average and (folder / runfolder.EMA_DIR / runfolder.SAMPLES / normal["image"]).is_file()
    out = tmp_path / "exported"
    assert export.main([str(lora_run / "checkpoint-2" / runfolder.EMA_DIR), "--format", "peft",
                        "--output", str(out)]) == 0
    peft = load_file(str(out / "adapter_model.safetensors"))
    b = next(k for k in weights(lora_run) if k.endswith("lora_B"))
    avg_b = weights(lora_run / "checkpoint-2" / runfolder.EMA_DIR)[b]
    assert any(torch.equal(v, avg_b) for v in peft.values())
    assert f"`{lora_run.name}/checkpoint-2/ema`" in (out / "README.md").read_text()


def test_flags_in_help_run_json_card_and_the_app(lora_run):
    text = dreambooth.build_parser().format_help()
    assert "--ema_decay" in text and "--ema_start_step" in text
    args = json.loads((lora_run / runfolder.RUN_JSON).read_text())["args"]
    assert (args["ema_decay"], args["ema_start_step"]) == (DECAY, START)
    card = (lora_run / "README.md").read_text()
    assert f"decay `{DECAY}`" in card and "`ema/`" in card
    choices = generate.checkpoint_choices(lora_run)
    assert choices[:2] == ["step 1", "step 1 (EMA)"] and "final (EMA)" in choices
    assert generate.default_choice(choices) == "final"
    assert generate.adapter_dir(lora_run, "final (EMA)") == lora_run / runfolder.EMA_DIR
    assert generate.adapter_dir(lora_run, "checkpoint-2/ema") == lora_run / "checkpoint-2" / runfolder.EMA_DIR


@pytest.mark.parametrize("flags, says", [
    (["--ema_decay", "0"], "--ema_decay must be between 0 and 1"),
    (["--ema_decay", "1"], "--ema_decay must be between 0 and 1"),
    (["--ema_decay", "-0.5"], "--ema_decay must be between 0 and 1"),
    (["--ema_decay", "2"], "--ema_decay must be between 0 and 1"),
    (["--ema_decay", "0.9", "--ema_start_step", "-1"], "--ema_start_step must be >= 0"),
])
def test_bad_values_are_one_line_and_write_nothing(tmp_path, capsys, flags, says):
    out = tmp_path / "bad"
    assert dreambooth.main(["--output_dir", str(out), *FAST, *flags]) == 2
    assert says in one_error_line(capsys)
    assert not out.exists()


def test_semantic_map_averages_its_conditioning_encoder_too(tmp_path):
    """The map encoder trains in full beside the adapter: its average is saved with the adapter's, by the task."""
    out = tmp_path / "seg"
    assert semantic_map.main(["--output_dir", str(out), "--seed", "0", "--resolution", "32", "--rank", "2",
                              "--max_train_steps", "2", "--checkpointing_steps", "1", "--num_inference_steps", "1",
                              "--num_validation_images", "1", "--num_validation_maps", "1", "--report_to", "none",
                              "--skip_final_samples", *EMA]) == 0
    encoders = [load_file(str(runfolder.checkpoint_dir(out, s) / runfolder.CONDITIONING_ENCODER)) for s in (1, 2)]
    average = load_file(str(out / runfolder.EMA_DIR / runfolder.CONDITIONING_ENCODER))
    assert average.keys() == encoders[1].keys()
    for k, v in average.items():   # step 1 <= --ema_start_step: copied; step 2 averaged
        assert torch.equal(v, encoders[0][k].float().mul(DECAY).add(encoders[1][k].float(), alpha=1 - DECAY)), k
    assert any(not torch.equal(average[k], encoders[1][k]) for k in average)
    assert (runfolder.checkpoint_dir(out, 2) / runfolder.EMA_DIR / runfolder.SAMPLES / "grid.png").is_file()
    assert runfolder.is_adapter_dir(out / runfolder.EMA_DIR) and not (out / runfolder.EMA_DIR / "samples").exists()


def test_glue_averages_its_head_and_the_average_loads(tmp_path, glue_files, monkeypatch):
    """A language trainer takes the flags too: the classifier head (trained in full) is averaged with the adapter."""
    monkeypatch.setenv("LOWRANK_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "glue"
    assert glue.main(glue_args(out, glue_files, "--seed", "1", "--max_train_steps", "3", "--checkpointing_steps", "1",
                               "--learning_rate", "1e-2", *EMA)) == 0
    heads = [weights(runfolder.checkpoint_dir(out, s)) for s in (1, 2, 3)]
    head = [k for k in heads[0] if k.startswith("modules_to_save.")]
    average = weights(out / runfolder.EMA_DIR)
    assert head and all(torch.equal(average[k], heads[0][k].mul(DECAY).add(heads[1][k], alpha=1 - DECAY)
                                    .mul(DECAY).add(heads[2][k], alpha=1 - DECAY)) for k in head)
    model, _ = load_language_model("tiny-bert", "classification", num_labels=2)
    lowrank.load_adapter(model, out / runfolder.EMA_DIR)
    live = adapter_state_dict(model)
    assert all(torch.equal(live[k], average[k]) for k in average)
