"""The dataset and split names of the flags (``--dataset``, ``--val_dataset``), read without the
data layer: parsers check them before torch, cv2 and the readers are imported (``test.py --help``
answers at once)."""

from __future__ import annotations

SYNTHETIC_VAL_SPLITS: dict[str, tuple[str, str, str]] = {
    # name -> (source kind, spec, dataset label)
    "synthetic|val": ("reason_seg", "ReasonSeg|val", "synthetic_reason_seg"),
    "synthetic|refer_val": ("refer_seg", "refcoco|unc|val", "synthetic_refer"),
    "synthetic|grefer_val": ("refer_seg", "grefcoco|unc|val", "synthetic_grefer"),
}


def split_names(spec: str, separator: str = "||") -> list[str]:
    """``"a||b||c"`` -> ``["a", "b", "c"]`` (blank entries dropped)."""
    return [part.strip() for part in spec.split(separator) if part.strip()]


def val_split_kind(name: str) -> str:
    """``reason_seg``, ``refer_seg`` or ``coco``: the source kind behind a validation split name."""
    name = name.strip()
    if name in SYNTHETIC_VAL_SPLITS:
        return SYNTHETIC_VAL_SPLITS[name][0]
    if name.split("|")[0] == "coco":
        return "coco"
    return "reason_seg" if len(name.split("|")) == 2 else "refer_seg"
