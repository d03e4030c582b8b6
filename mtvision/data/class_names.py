"""Class names of the label-map tasks of the known datasets, for legends: `known_class_names(task, n)`.

The lists live with their datasets (`nyud.CLASS_NAMES`, `pascal.SEMSEG_CLASS_NAMES`, `pascal.PART_NAMES`,
`synthetic.CLASS_NAMES`); a pretrained folder records only class counts, so a model's names are looked
up by (task, number of classes).
"""

from __future__ import annotations

from mtvision.data import nyud, pascal, synthetic

KNOWN_CLASS_NAMES: dict[tuple[str, int], tuple[str, ...]] = {
    ("semseg", len(nyud.CLASS_NAMES)): nyud.CLASS_NAMES,
    ("semseg", len(pascal.SEMSEG_CLASS_NAMES)): pascal.SEMSEG_CLASS_NAMES,
    ("semseg", len(synthetic.CLASS_NAMES)): synthetic.CLASS_NAMES,
    ("parts", len(pascal.PART_NAMES)): pascal.PART_NAMES,
    ("texture", 2): ("plain", "accent"),
}


def known_class_names(task: str, num_classes: int | None) -> tuple[str, ...] | None:
    """The class names of `task` with `num_classes` classes in the dataset that has that many (NYUD-v2's
    40, PASCAL-Context's 21 and 7 parts, the synthetic scenes' 10), or None."""
    if num_classes is None:
        return None
    return KNOWN_CLASS_NAMES.get((task, int(num_classes)))
