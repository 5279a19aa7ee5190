"""DreamBooth's subject, for training/dreambooth.py and eval's subject runner.

    data.py  the embedded example subject (a real cat photo, cropped) and the instance/class-image dataset
"""
