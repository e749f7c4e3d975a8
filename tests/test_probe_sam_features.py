"""tools/probe_sam_features.py: the README's account of why the demo fails comparisons and kinds
(the frozen random tiny SAM's features carry colour, hardly the kind of shape or the position)."""

from tools.probe_sam_features import probe


def test_the_tiny_sam_features_carry_colour_not_kind_nor_position():
    plain = probe("tiny", "zeros", num_scenes=24)
    assert plain["colour_accuracy"] > 0.95 > 3 * plain["colour_majority"]
    assert plain["kind_accuracy"] < 0.7 and plain["x_r2"] < 0.5 and plain["y_r2"] < 0.5
    # A position embedding puts the position in the features (and the probe can tell).
    placed = probe("tiny", "sincos", num_scenes=24)
    assert placed["x_r2"] > 0.7 and placed["y_r2"] > 0.7
