"""Face-parsing label ids (CelebAMask-HQ, 19 classes) and the facial parts ConsistentID uses.

The ids are those of the BiSeNet model ConsistentID ships (`face_parsing.pth`, the same
weights as face-parsing.PyTorch's `79999_iter.pth`), trained on CelebAMask-HQ with the
class list in face-parsing.PyTorch's `prepropess_data.py`.

The original's `mapping_table` (functions.py) names five of these ids wrongly: 6 "Hair"
(is eyeglasses), 9 "Mouth_External Contour" (earring), 15 "Neck_Inner Contour" (necklace),
17 "Hat" (hair), 18 "Earring" (hat), and lists ids 19-24 that never occur. None of those
ids is used for the facial crops, so behaviour is unaffected; we use the correct names.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import IntEnum

NUM_PARSING_CLASSES = 19


class FaceLabel(IntEnum):
    """BiSeNet / CelebAMask-HQ class ids."""

    BACKGROUND = 0
    SKIN = 1
    LEFT_BROW = 2
    RIGHT_BROW = 3
    LEFT_EYE = 4
    RIGHT_EYE = 5
    EYEGLASSES = 6
    LEFT_EAR = 7
    RIGHT_EAR = 8
    EARRING = 9
    NOSE = 10
    MOUTH = 11
    UPPER_LIP = 12
    LOWER_LIP = 13
    NECK = 14
    NECKLACE = 15
    CLOTH = 16
    HAIR = 17
    HAT = 18


# Caption word -> parsing ids, in the original's region (label) order. Only one id of a
# left/right or upper/lower pair is ever used: the lowest present (reference §4.16).
FACIAL_PART_LABELS: dict[str, tuple[FaceLabel, ...]] = {
    "face": (FaceLabel.SKIN,),
    "eyes": (FaceLabel.LEFT_EYE, FaceLabel.RIGHT_EYE),
    "ears": (FaceLabel.LEFT_EAR, FaceLabel.RIGHT_EAR),
    "nose": (FaceLabel.NOSE,),
    "mouth": (FaceLabel.UPPER_LIP, FaceLabel.LOWER_LIP),
}

LABEL_TO_PART: dict[int, str] = {
    int(label): part for part, labels in FACIAL_PART_LABELS.items() for label in labels
}

# The original's names for the ids it actually uses ("Face" is the skin class), so code
# that mirrors its name-keyed dicts can translate.
REFERENCE_PART_NAMES: dict[int, str] = {
    FaceLabel.SKIN: "Face",
    FaceLabel.LEFT_EYE: "Left_Eye",
    FaceLabel.RIGHT_EYE: "Right_Eye",
    FaceLabel.LEFT_EAR: "Left_Ear",
    FaceLabel.RIGHT_EAR: "Right_Ear",
    FaceLabel.NOSE: "Nose",
    FaceLabel.UPPER_LIP: "Upper_Lip",
    FaceLabel.LOWER_LIP: "Lower_Lip",
}


def select_facial_labels(present_labels: Iterable[int]) -> tuple[int, ...]:
    """The labels whose regions become facial crops, in crop order (ascending label).

    Per part, the lowest label present: Left_Eye (4) over Right_Eye (5), Left_Ear (7) over
    Right_Ear (8), Upper_Lip (12) over Lower_Lip (13), as the original's dedupe on the name
    after "_" does (reference §4.15-16). Labels of other classes are ignored.
    """
    present = {int(label) for label in present_labels}
    chosen = []
    for candidates in FACIAL_PART_LABELS.values():
        found = [int(label) for label in candidates if label in present]
        if found:
            chosen.append(min(found))
    return tuple(sorted(chosen))
