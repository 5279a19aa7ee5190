"""The language tasks, for training/glue.py, training/instruct.py, eval's robustness tasks and export.

    language.py       language models through transformers' Auto classes; presets minilm, tiny-bert,
                      tiny-llama, tiny-gpt2
    glue_data.py      GLUE tasks, metrics, the tuning/test split, files, --dataset_name and hub loading
    tweet_data.py     the tweet tasks (real human labels): the corpus, its cleaning and the fixed split
    instruct_data.py  Alpaca prompts with the prompt masked, multiple-choice items and their scorer
"""
