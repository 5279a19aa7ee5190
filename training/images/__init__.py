"""Images for the image tasks (DreamBooth, semantic map), eval and the app.

    files.py    image files in, RGB images out: decoding (EXIF rotation, transparency over white, 16-bit),
                validated folders, --dataset_name images and captions
    samples.py  fixed-seed samples from a pipeline (+ prompts.jsonl and a grid), class images
"""
