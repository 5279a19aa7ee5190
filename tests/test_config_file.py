"""--config FILE (training/common/config.py) for every trainer: values through the flags' own types, the command line
over the file, the file over a preset; the config.yaml a run writes reproduces it bit for bit (its picked seed
included); unknown keys and bad values one `error:` line, exit 2, nothing written."""
import json

import pytest
import yaml

from tests.stderr import one_error_line
from tests.test_training_faults import same_adapter
from training import dreambooth, glue, instruct, semantic_map
from training.common.config import CONFIG_FILE

FAST = ["--resolution", "32", "--rank", "2", "--max_train_steps", "2", "--checkpointing_steps", "10",
        "--report_to", "none", "--skip_final_samples", "--export_diffusers", "false"]

pytestmark = pytest.mark.usefixtures("tiny_cache")


def write(path, text):
    path.write_text(text)
    return str(path)


def test_yaml_values_take_the_flags_types_and_the_command_line_wins(tmp_path):
    config = write(tmp_path / "run.yaml", """
method: lora
rank: 4
learning_rate: 1e-4          # YAML reads this as text: the flag's type makes it a number
target_modules: [to_q, to_v]
center_crop: true
validation_prompt: [a photo of sks cat, a sks cat on a beach]
snr_gamma: 5
lr_scheduler: cosine
max_train_steps: 7
""")
    spec = dreambooth.parse_args(["--config", config, "--rank", "8", "--output_dir", str(tmp_path / "o")])
    a = spec.args
    assert (spec.adapter.method, spec.adapter.rank, spec.learning_rate) == ("lora", 8, 1e-4)
    assert spec.adapter.target_modules == ["to_q", "to_v"] and a.center_crop is True
    assert a.validation_prompt == ["a photo of sks cat", "a sks cat on a beach"]
    assert (a.snr_gamma, a.lr_scheduler, spec.max_train_steps, a.config) == (5.0, "cosine", 7, config)
    assert dreambooth.parse_args(["--config", config, "--validation_prompt", "x"]).args.validation_prompt == ["x"]


def test_toml_works_for_every_trainer(tmp_path):
    config = write(tmp_path / "run.toml", 'seed = 3\nlearning_rate = 0.002\nadam_weight_decay = 0.0\n')
    for trainer in (dreambooth, semantic_map, glue, instruct):
        a = trainer.parse_args(["--config", config, "--output_dir", str(tmp_path / trainer.__name__)]).args
        assert (a.seed, a.learning_rate, a.adam_weight_decay) == (3, 0.002, 0.0), trainer.__name__
        assert trainer.parse_args(["--config", config, "--seed", "9"]).args.seed == 9


def test_a_repeatable_flag_from_the_file_is_replaced_by_the_command_line(tmp_path):
    config = write(tmp_path / "i.toml", 'mc_file = ["a.jsonl", "b.jsonl"]\n')
    assert instruct.parse_args(["--config", config]).args.mc_file == ["a.jsonl", "b.jsonl"]
    assert instruct.parse_args(["--config", config, "--mc_file", "c.jsonl"]).args.mc_file == ["c.jsonl"]


def test_the_file_beats_a_preset_and_the_command_line_beats_both(tmp_path):
    preset = glue.parse_args(["--preset", "delora-paper", "--task_name", "sst2"]).args
    config = write(tmp_path / "g.yaml", f"num_train_epochs: {preset.num_train_epochs + 2}\n")
    ours = glue.parse_args(["--preset", "delora-paper", "--task_name", "sst2", "--config", config]).args
    assert ours.num_train_epochs == preset.num_train_epochs + 2
    assert glue.parse_args(["--preset", "delora-paper", "--task_name", "sst2", "--config", config,
                            "--num_train_epochs", "1"]).args.num_train_epochs == 1


@pytest.mark.parametrize("text, suffix, says", [
    ("learnig_rate: 0.1\n", "yaml", "unknown key 'learnig_rate': not a flag of"),
    ("task_name = 'sst2'\n", "toml", "unknown key 'task_name'"),          # a GLUE flag, not DreamBooth's
    ("rank: 2.5\n", "yaml", "rank: argument --rank: invalid int value: '2.5'"),
    ("lr_scheduler: sometimes\n", "yaml", "invalid choice: 'sometimes'"),
    ("center_crop: 1\n", "yaml", "--center_crop is a switch; give true or false"),
    ("- a\n- b\n", "yaml", "expected one key per flag"),
    ("rank: [4\n", "yaml", "is not valid YAML"),
    ("rank: 4\n", "ini", "give a .yaml, .yml, .toml or .json file"),
    ("config: other.yaml\n", "yaml", "cannot name another"),
])
def test_bad_config_is_one_line_exit_2_and_nothing_written(tmp_path, capsys, text, suffix, says):
    out = tmp_path / "out"
    config = write(tmp_path / f"c.{suffix}", text)
    assert dreambooth.main(["--config", config, "--output_dir", str(out), *FAST]) == 2
    line = one_error_line(capsys)
    assert says in line and config in line, line
    assert not out.exists()
    assert dreambooth.main(["--config", str(tmp_path / "missing.yaml"), "--output_dir", str(out)]) == 2
    assert "does not exist" in one_error_line(capsys)


def test_the_written_config_reproduces_the_run(tmp_path):
    """No --seed: the run picks one, and config.yaml records it with every resolved flag; passed back (another
    output folder on the command line) it gives the same adapter bits."""
    first, again = tmp_path / "first", tmp_path / "again"
    assert dreambooth.main(["--output_dir", str(first), *FAST, "--method", "delora", "--snr_gamma", "4",
                            "--caption_dropout", "0.5", "--target_modules", "re:.*attn1.*to_(q|v)"]) == 0
    written = yaml.safe_load((first / CONFIG_FILE).read_text())
    run = json.loads((first / "run.json").read_text())
    assert written["seed"] == run["seed"] is not None and run["args"]["seed"] is None
    assert written["target_modules"] == "re:.*attn1.*to_(q|v)" and written["caption_dropout"] == 0.5
    assert "config" not in written and "debug_nan_at_step" not in written
    assert dreambooth.main(["--config", str(first / CONFIG_FILE), "--output_dir", str(again)]) == 0
    same_adapter(first, again)
    replayed = json.loads((again / "run.json").read_text())
    assert replayed["seed"] == run["seed"] and replayed["adapter_config"] == run["adapter_config"]
