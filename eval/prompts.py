"""DreamBooth's evaluation prompts (Ruiz et al. 2023, dataset/prompts_and_classes.txt): 25 for
objects and 25 for live subjects (cats and dogs), "{0} {1}" = unique token + class noun. The
protocol generates 4 images per prompt and scores every (real, generated) pair."""
from __future__ import annotations

from . import EvalError

OBJECT_PROMPTS = [
    "a {0} {1} in the jungle",
    "a {0} {1} in the snow",
    "a {0} {1} on the beach",
    "a {0} {1} on a cobblestone street",
    "a {0} {1} on top of pink fabric",
    "a {0} {1} on top of a wooden floor",
    "a {0} {1} with a city in the background",
    "a {0} {1} with a mountain in the background",
    "a {0} {1} with a blue house in the background",
    "a {0} {1} on top of a purple rug in a forest",
    "a {0} {1} with a wheat field in the background",
    "a {0} {1} with a tree and autumn leaves in the background",
    "a {0} {1} with the Eiffel Tower in the background",
    "a {0} {1} floating on top of water",
    "a {0} {1} floating in an ocean of milk",
    "a {0} {1} on top of green grass with sunflowers around it",
    "a {0} {1} on top of a mirror",
    "a {0} {1} on top of the sidewalk in a crowded street",
    "a {0} {1} on top of a dirt road",
    "a {0} {1} on top of a white rug",
    "a red {0} {1}",
    "a purple {0} {1}",
    "a shiny {0} {1}",
    "a wet {0} {1}",
    "a cube shaped {0} {1}",
]

LIVE_PROMPTS = [
    "a {0} {1} in the jungle",
    "a {0} {1} in the snow",
    "a {0} {1} on the beach",
    "a {0} {1} on a cobblestone street",
    "a {0} {1} on top of pink fabric",
    "a {0} {1} on top of a wooden floor",
    "a {0} {1} with a city in the background",
    "a {0} {1} with a mountain in the background",
    "a {0} {1} with a blue house in the background",
    "a {0} {1} on top of a purple rug in a forest",
    "a {0} {1} wearing a red hat",
    "a {0} {1} wearing a santa hat",
    "a {0} {1} wearing a rainbow scarf",
    "a {0} {1} wearing a black top hat and a monocle",
    "a {0} {1} in a chef outfit",
    "a {0} {1} in a firefighter outfit",
    "a {0} {1} in a police outfit",
    "a {0} {1} wearing pink glasses",
    "a {0} {1} wearing a yellow shirt",
    "a {0} {1} in a purple wizard outfit",
    "a red {0} {1}",
    "a purple {0} {1}",
    "a shiny {0} {1}",
    "a wet {0} {1}",
    "a cube shaped {0} {1}",
]

# DreamBooth's live subjects are its cats and dogs; every other class of its dataset is an object
LIVE_CLASSES = {"cat", "dog", "kitten", "puppy"}
IMAGES_PER_PROMPT = 4


def subject_of(instance_prompt: str, class_prompt: str | None = None) -> tuple[str, str]:
    """(unique token, class noun) of an instance prompt such as "a photo of sks dog".

    The class noun is what the instance prompt shares with the end of the class prompt ("a photo of
    stuffed animal" -> "stuffed animal"); without a class prompt, the last word. The token is the word
    before it."""
    words = (instance_prompt or "").split()
    n_class = 1
    if class_prompt:
        shared, cls = 0, class_prompt.split()
        while shared < min(len(words) - 1, len(cls)) and words[-1 - shared] == cls[-1 - shared]:
            shared += 1
        n_class = max(1, shared)
    if len(words) < n_class + 1:
        raise EvalError(f"cannot find a unique token and a class noun in the instance prompt {instance_prompt!r}; "
                        f"pass --unique_token and --class_noun")
    return words[-n_class - 1], " ".join(words[-n_class:])


def is_live(class_noun: str) -> bool:
    return any(w in LIVE_CLASSES for w in class_noun.lower().split())


def protocol_prompts(unique_token: str, class_noun: str, kind: str = "auto") -> list[str]:
    """The 25 DreamBooth prompts for this subject; kind: auto (live for cats and dogs), object, live."""
    if kind not in ("auto", "object", "live"):
        raise EvalError(f"--subject_kind {kind!r}: choose auto, object or live")
    live = is_live(class_noun) if kind == "auto" else kind == "live"
    return [p.format(unique_token, class_noun) for p in (LIVE_PROMPTS if live else OBJECT_PROMPTS)]
