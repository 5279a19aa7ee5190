"""Map-to-image, for training/semantic_map.py and eval's semantic-map runner (eval/semantic_run.py).

    data.py          (image, map) pairs: ADE20K folders, metadata.jsonl, `datasets`; canny/shuffle maps,
                     the embedded set, the dataset with its augmentation
    sets.py          which pairs train and which validate, from the flags (MapData)
    conditioning.py  the light conditioning encoder, its file, the UNet it conditions (or a ControlNet)
"""
