"""The scene vocabulary shared by renderer, captions, evaluator and analyses: shapes, colours, relations, SceneSpec."""

from typing import NamedTuple, Optional

SHAPES = ("triangle", "circle", "square")
COLORS = ("red", "blue")
COLOR_RGB = {"red": (255, 0, 0), "blue": (0, 0, 255)}
BACKGROUND_RGB = (128, 128, 128)
# The 8 relations of object 1 relative to object 2, in the order used by every table and index in the project.
RELATIONS = ("above", "below", "left", "right", "upper_left", "upper_right", "lower_left", "lower_right")
# The relation that holds when object 1 and object 2 swap places.
CONVERSE = {
    "above": "below",
    "below": "above",
    "left": "right",
    "right": "left",
    "upper_left": "lower_right",
    "lower_right": "upper_left",
    "upper_right": "lower_left",
    "lower_left": "upper_right",
}


class SceneSpec(NamedTuple):
    """What a caption asks for. A colour is None when the caption leaves it out."""

    shape1: str
    color1: Optional[str]
    relation: str
    shape2: str
    color2: Optional[str]
