"""Every question and answer wording of the data layer, in one place.

Questions carry no image placeholder: the processor inserts the image itself. Answers carry one
``[SEG]`` per target mask. Each function takes an optional ``rng``: with a generator a template is
drawn at random (training); with ``None`` the first, canonical template is used (validation, so
every evaluation prompt is fixed and matches LISA's evaluation wording).

Mask answers come in two styles (:data:`ANSWER_STYLES`): ``"plain"``, LISA's templates
("Sure, [SEG]."), and ``"named"``, which names the target right before its ``[SEG]`` ("Sure, it
is the red square [SEG]."). A plain answer is the same whatever the question, so nothing makes
the language model carry the request into the ``[SEG]`` position; naming the target there does,
which small models need to learn to use the question at all.
"""

from __future__ import annotations

import numpy as np

from model.constants import ANSWER_STYLES  # defined there so that the flag parsers name it without torch
from utils.data.rng import choose
from utils.data.sample import SEG_TOKEN

SHORT_QUESTION_TEMPLATES: tuple[str, ...] = (
    "What is {class_name} in this image? Please output segmentation mask.",
    "Can you segment the {class_name} in this image?",
    "Please segment the {class_name} in this image.",
    "What is {class_name} in this image? Please respond with segmentation mask.",
)
"""For short requests: class names, referring expressions, short ReasonSeg phrases."""

LONG_QUESTION_TEMPLATES: tuple[str, ...] = (
    "{sent} Please output segmentation mask.",
    "{sent} Please respond with segmentation mask.",
)
"""For long requests: ReasonSeg sentences (``is_sentence``)."""

EXPLANATORY_QUESTION_TEMPLATES: tuple[str, ...] = (
    "{sent} Please output segmentation mask and explain why.",
    "{sent} Please output segmentation mask and explain the reason.",
    "{sent} Please output segmentation mask and give some explanation.",
)
"""For ReasonSeg sentences whose answer is a mask followed by an explanation."""

SHORT_EXPLANATORY_QUESTION_TEMPLATES: tuple[str, ...] = (
    "Can you segment the {class_name} in this image and explain why?",
    "Please segment the {class_name} in this image and explain the reason.",
    "What is {class_name} in this image? Please output segmentation mask and give some explanation.",
)
"""For short ReasonSeg phrases whose answer is a mask followed by an explanation."""

ALL_INSTANCES_QUESTION_TEMPLATE = "Please segment all the {class_name} in this image."
"""For a category asked instance by instance (COCO-format detection splits): one ``[SEG]`` per
instance expected."""

SHORT_TEXT_QUESTION_TEMPLATE = "What is {class_name} in this image?"
"""For short ReasonSeg phrases answered by text only (sentences are asked as they are)."""

ANSWER_TEMPLATES: tuple[str, ...] = (
    "{segs}.",
    "It is {segs}.",
    "Sure, {segs}.",
    "Sure, it is {segs}.",
    "Sure, the segmentation result is {segs}.",
)
"""Mask answers; ``{segs}`` becomes ``[SEG]``, ``[SEG] and [SEG]``, ``[SEG], [SEG] and [SEG]``..."""

NO_TARGET_ANSWER_TEMPLATES: tuple[str, ...] = (
    "There is no such object in this image.",
    "I cannot find it in this image.",
    "Nothing in this image matches the description.",
    "Sorry, there is no such object in the image.",
)
"""Text answers (no ``[SEG]``) for requests that name nothing in the image (gRefCOCO)."""

NAMED_ANSWER_TEMPLATE = "Sure, it is {name} {segs}."
"""The named answer of one mask: one fixed wording, so that generated answers are predictable."""

NAMED_MULTI_ANSWER_TEMPLATE = "Sure, they are {name} {segs}."
"""The named answer of several masks (``{segs}`` is ``[SEG] and [SEG]`` ...)."""

IMAGE_PLACEHOLDER = "<image>"
"""The image marker of LLaVA-style conversations, removed from human turns."""


def _pick(templates: tuple[str, ...], rng: np.random.Generator | None) -> str:
    return templates[0] if rng is None else choose(rng, templates)


def join_seg_tokens(count: int) -> str:
    """``count`` ``[SEG]`` tokens joined as in English: ``[SEG], [SEG] and [SEG]``."""
    if count < 1:
        raise ValueError(f"a mask answer needs at least one [SEG], got {count}")
    tokens = [SEG_TOKEN] * count
    if count == 1:
        return SEG_TOKEN
    return ", ".join(tokens[:-1]) + " and " + tokens[-1]


def _fill_short(template: str, request: str) -> str:
    """Put a short request in a template: lower-cased (as LISA does), and without a leading
    "the" where the template already has one ("segment the the red circle")."""
    request = request.strip().lower()
    if "the {class_name}" in template and request.startswith("the "):
        request = request[len("the ") :]
    return template.format(class_name=request)


def segmentation_question(
    request: str, is_sentence: bool, rng: np.random.Generator | None = None
) -> str:
    """A question asking for the mask of ``request``.

    Short requests go in a short template (see :func:`_fill_short`); sentences keep their case
    and go in a long template.
    """
    if is_sentence:
        return _pick(LONG_QUESTION_TEMPLATES, rng).format(sent=request.strip())
    return _fill_short(_pick(SHORT_QUESTION_TEMPLATES, rng), request)


def all_instances_question(category: str) -> str:
    """The question of a COCO-format detection split: every instance of ``category``."""
    return _fill_short(ALL_INSTANCES_QUESTION_TEMPLATE, category)


def explanatory_question(request: str, is_sentence: bool, rng: np.random.Generator | None = None) -> str:
    """A question asking for the mask of ``request`` and an explanation."""
    if is_sentence:
        return _pick(EXPLANATORY_QUESTION_TEMPLATES, rng).format(sent=request.strip())
    return _fill_short(_pick(SHORT_EXPLANATORY_QUESTION_TEMPLATES, rng), request)


def text_question(request: str, is_sentence: bool) -> str:
    """A question about ``request`` that expects a text answer only (no mask)."""
    return request.strip() if is_sentence else _fill_short(SHORT_TEXT_QUESTION_TEMPLATE, request)


def segmentation_answer(num_masks: int = 1, rng: np.random.Generator | None = None) -> str:
    """An answer with ``num_masks`` ``[SEG]`` tokens (canonical: ``"[SEG]."``)."""
    return _pick(ANSWER_TEMPLATES, rng).format(segs=join_seg_tokens(num_masks))


def check_answer_style(style: str) -> str:
    """``style`` itself if it is one of :data:`ANSWER_STYLES`.

    Raises:
        ValueError: any other value (the message lists the allowed ones).
    """
    if style not in ANSWER_STYLES:
        raise ValueError(f"answer_style must be one of {', '.join(map(repr, ANSWER_STYLES))}, got {style!r}")
    return style


def _normalise_name(name: str) -> str:
    """A target name as short requests are put in questions: stripped, lower-cased, no final "."."""
    name = name.strip().lower()
    return name[:-1].rstrip() if name.endswith(".") else name


def named_answer(num_masks: int, name: str) -> str:
    """The named answer: ``"Sure, it is the red square [SEG]."``, or for several masks
    ``"Sure, they are the squares [SEG] and [SEG]."``."""
    template = NAMED_ANSWER_TEMPLATE if num_masks == 1 else NAMED_MULTI_ANSWER_TEMPLATE
    return template.format(name=_normalise_name(name), segs=join_seg_tokens(num_masks))


def mask_answer(
    num_masks: int, name: str | None, style: str = "plain", rng: np.random.Generator | None = None
) -> str:
    """The answer of a mask request in ``style``: :func:`named_answer` of ``name`` when the
    style is ``"named"`` and there is a name, else :func:`segmentation_answer` (``rng`` draws
    its template; the named wording is fixed and draws nothing).

    Raises:
        ValueError: ``style`` is not one of :data:`ANSWER_STYLES`.
    """
    if check_answer_style(style) == "named" and name and name.strip():
        return named_answer(num_masks, name)
    return segmentation_answer(num_masks, rng)


def explanatory_answer(
    explanation: str, rng: np.random.Generator | None = None, name: str | None = None, style: str = "plain"
) -> str:
    """A one-mask answer (:func:`mask_answer`) followed by ``explanation``."""
    return f"{mask_answer(1, name, style, rng)} {explanation.strip()}"


def no_target_answer(rng: np.random.Generator | None = None) -> str:
    """A text answer saying the request names nothing in the image (no ``[SEG]``)."""
    return _pick(NO_TARGET_ANSWER_TEMPLATES, rng)


def strip_image_placeholder(text: str) -> str:
    """Remove LLaVA's ``<image>`` marker and the blank space it leaves."""
    return text.replace(IMAGE_PLACEHOLDER, "").strip()
