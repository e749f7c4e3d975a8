"""The constants every part of the project shares (training, evaluation, inference, the demo)."""

SEG_TOKEN = "[SEG]"
"""The special token an answer carries once per mask; its hidden state prompts SAM's mask decoder."""

IGNORE_LABEL = 255
"""Ground-truth mask value of pixels that are neither target nor background: not trained on
(left out of both mask losses) and not scored (removed from prediction and target, as LISA does)."""

ANSWER_STYLES: tuple[str, ...] = ("plain", "named")
"""How mask answers are worded (see :mod:`utils.data.templates`): LISA's templates ("Sure, [SEG]."),
or the target named before its ``[SEG]`` ("Sure, it is the red square [SEG]."). Here, not in the
data layer, because the training flags and the model's config name it without loading the data
code."""

SEG_STATES: dict[str, int] = {"seg_token": 0, "preceding_token": -1}
"""Which last-layer hidden state stands for a ``[SEG]`` (to the position of the ``[SEG]`` in the
sequence, the offset of the state used): ``"seg_token"``, the ``[SEG]`` token's own state, or
``"preceding_token"``, the state of the token before it, whose next-token prediction is the
``[SEG]`` (LISA's choice). One choice per model (its config), used by training, evaluation and
generation alike."""

PRECISION_NAMES: tuple[str, ...] = ("bf16", "fp16", "fp32")
"""The ``--precision`` values of every entry point. Their dtypes are
:data:`utils.mixed_precision.PRECISIONS`; the names are here, without torch, for the parsers
(``train_ddp.py --help`` must not import torch)."""

SINGLE_TURN = "single_turn"
MULTI_TURN = "multi_turn"
CONVERSATION_MODES: tuple[str, ...] = (SINGLE_TURN, MULTI_TURN)
"""How the questions of one training sample (one image) are asked: ``single_turn``, each as its
own conversation (LISA's way, and how evaluation asks them), or ``multi_turn``, as the turns of one
conversation (``--conversation_mode``, see :mod:`model.batch`)."""

DECODING_MODES: tuple[str, ...] = ("auto", "compiled", "eager", "transformers")
"""How answers are decoded (``--decoding``; :mod:`model.decoding`): here, without torch, for the
parsers."""

TEACHER_FORCED = "teacher_forced"
GENERATE = "generate"
EVAL_PROTOCOLS: tuple[str, ...] = (TEACHER_FORCED, GENERATE)
"""How an evaluation asks (``test.py --protocol``, :mod:`utils.evaluation`): ``teacher_forced``,
the reference answer with its ``[SEG]`` is given and only the masks are the model's (the published
numbers); ``generate``, the model writes its own answer."""
