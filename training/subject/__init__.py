"""DreamBooth's subject, for training/dreambooth.py and eval's subject runner.

    args.py  the trainer's flags and their checks (build_parser, parse_args: the app reads its defaults)
    data.py  the embedded example subject (a real cat photo, cropped) and the instance/class-image dataset
"""
