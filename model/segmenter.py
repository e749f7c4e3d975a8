"""The reasoning segmenter: a Qwen-VL that emits ``[SEG]`` tokens, prompting a SAM mask decoder.

Which hidden state stands for a ``[SEG]``
-----------------------------------------
A final hidden state of the language model (after its last norm), at the position the model's
``config.seg_state`` chooses (:data:`model.constants.SEG_STATES`): the ``[SEG]`` token's own
(``"seg_token"``, the default: the position where ``[SEG]`` is the input token) or that of the
token before it (``"preceding_token"``, LISA's: the position whose next-token prediction is the
``[SEG]``). :attr:`ReasonSegmenter.seg_state_offset` is that choice as an offset (0 or -1), which
:func:`state_positions` applies to a teacher-forced batch and :meth:`ReasonSegmenter.generate` to
the decoding steps. Training and teacher-forced evaluation read the states from the full forward
pass (a hook on the final norm, :class:`FinalStateCapture`); generation from the KV-cache decoding
steps (:mod:`model.decoding` takes the language model's post-norm output of each step, the state
of the token it consumes; transformers' ``generate`` goes through the same hook, and after a beam
search one forward over the answers kept does). Tests check that all give the same vectors.
Generation runs one decoding step past the last kept token so that a ``[SEG]`` produced last still
has its own state.

Shapes: B images, T tokens, H text hidden size, P SAM prompt size, S SAM input side,
n_i masks for image i, N masks in the batch.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

from utils.masks import mask_score, mask_to_box

from .batch import collate, encode_sample, map_in_threads, row_images, to_device
from .config import ADAPTER_DIR, HEAD_WEIGHTS, SAM_WEIGHTS, VLM_DIR, SegmenterConfig
from .constants import SEG_STATES, SEG_TOKEN
from .conversation import IGNORE_INDEX
from .decoding import GreedyDecoder, PrefixCache, causal_lm, greedy_decode, resolve_decoding
from .shared_images import shared_images
from .side_stream import SideStream
from .losses import mask_bce_loss, mask_dice_loss
from .mask_decoding import decode_low_res_masks, postprocess_by_image
from .image_tokens import image_token_counts
from .processor import load_processor, save_processor
from .projection import SegProjection
from .sam import SamTransform, build_sam, freeze_for_segmentation, sam_prompt_embed_dim
from .sam_compile import run_image_encoder
from .vlm import LoraSettings, ensure_seg_token, is_hub_id, load_vlm, make_trainable, text_hidden_size, vlm_family

logger = logging.getLogger(__name__)

# SAM parts kept in float32 whatever the run dtype. Always the prompt encoder: its positional
# encoding multiplies a float32 coordinate grid.
SAM_FP32 = ("prompt_encoder",)
# In training the mask decoder too: its trained weights are float32 master weights, and its frozen
# IoU head stays float32 with them, so that the decoder runs as one float32 block with or without
# autocast (it is 0.2 M parameters).
TRAINED_SAM_FP32 = (*SAM_FP32, "mask_decoder")


@dataclass
class SegmenterOutput:
    """Training / teacher-forced forward output.

    Attributes:
        loss: weighted total.
        ce_loss, bce_loss, dice_loss: the parts (mask losses averaged over the N masks).
        mask_logits: per image, [n_i, H_i, W_i] logits at the original image size.
        num_masks: N.
    """

    loss: torch.Tensor
    ce_loss: torch.Tensor
    bce_loss: torch.Tensor
    dice_loss: torch.Tensor
    mask_logits: list[torch.Tensor]
    num_masks: int


@dataclass
class TeacherForcedOutput:
    """The language model's side of a teacher-forced forward (:meth:`ReasonSegmenter.teacher_forced`).

    Attributes:
        ce_loss: token cross-entropy, averaged over the answer tokens of all rows.
        hidden: [R, T, H] final hidden states of every position.
        seg_states: per sample, the [n_i, H] states standing for the ``[SEG]`` tokens in the
            answers of its conversations (``config.seg_state``), in row order.
    """

    ce_loss: torch.Tensor
    hidden: torch.Tensor
    seg_states: list[torch.Tensor]


@dataclass
class SegmentationResult:
    """One answer: its text, and one mask and box per ``[SEG]`` in it.

    Attributes:
        text: the generated answer, ``[SEG]`` kept, end-of-turn tokens removed.
        masks: HxW bool masks at the original image size, in the order of the ``[SEG]``s.
        boxes: XYXY boxes (exclusive x1, y1) derived from the masks; None for an empty mask.
        scores: per mask, its confidence: the mean sigmoid probability of the decoder's logits
            over the mask's pixels (:func:`utils.masks.mask_score`); None for an empty mask.
        token_ids: the generated token ids.
        seg_states: [n, H] hidden states of the ``[SEG]`` tokens (None when there are none).
        image_tokens: image tokens the image became in the language model's input (see
            :func:`model.image_tokens.image_token_counts`); None when unknown.
    """

    text: str
    masks: list[np.ndarray] = field(default_factory=list)
    boxes: list[tuple[int, int, int, int] | None] = field(default_factory=list)
    scores: list[float | None] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    seg_states: torch.Tensor | None = None
    image_tokens: int | None = None


class FinalStateCapture:
    """``with capture() as states:`` collects the language model's final-norm outputs ([B, t, H],
    one per forward call inside the block) into the list ``states``, through a forward hook."""

    def __init__(self, vlm: nn.Module) -> None:
        self.norm = _final_norm(vlm)

    @contextmanager
    def __call__(self) -> Iterator[list[torch.Tensor]]:
        outputs: list[torch.Tensor] = []
        handle = self.norm.register_forward_hook(lambda _m, _i, output: outputs.append(output))
        try:
            yield outputs
        finally:
            handle.remove()


def _final_norm(vlm: nn.Module) -> nn.Module:
    for name, module in vlm.named_modules():
        if name.endswith("language_model.norm"):
            return module
    raise ValueError("could not find the language model's final norm (language_model.norm)")


class ReasonSegmenter(nn.Module):
    """Qwen-VL + projection + SAM.

    Trainable: the VLM's LoRA and ``[SEG]`` rows (or the whole language model), the projection,
    and SAM's mask decoder except its IoU head (unused by the loss, so frozen: DDP then never
    sees a trainable parameter without a gradient). SAM's image and prompt encoders are frozen
    and stay in eval mode.
    """

    def __init__(self, config: SegmenterConfig, vlm: nn.Module, processor, sam: nn.Module) -> None:
        super().__init__()
        self.config = config
        self.vlm = vlm
        self.processor = processor
        self.sam = sam
        # On the device of the mask decoder it prompts (a device_map may have put the VLM elsewhere).
        decoder_device = sam.mask_decoder.iou_token.weight.device
        self.projection = SegProjection(config.hidden_size, config.prompt_dim).to(decoder_device)
        self.sam_transform = SamTransform.from_sam(sam)
        self.seg_token_id = processor.tokenizer.convert_tokens_to_ids(SEG_TOKEN)
        self.capture_final_states = FinalStateCapture(vlm)
        self._decoders: dict[str, GreedyDecoder] = {}  # by decoding mode, built on first use
        self._side_stream = SideStream()
        freeze_for_segmentation(sam)
        # Frozen here, not by freeze_for_segmentation (LISA's setup, which trains the whole decoder):
        # the loss never uses the IoU head, and DDP waits for a gradient of every trainable parameter.
        sam.mask_decoder.iou_prediction_head.requires_grad_(False)

    # ------------------------------------------------------------------ construction and I/O

    @classmethod
    def from_components(
        cls,
        vlm_path: str | os.PathLike,
        sam_variant: str,
        sam_checkpoint: str | os.PathLike | None = None,
        lora: LoraSettings | None = None,
        train_language_model: bool = False,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device | None = None,
        **config_overrides,
    ) -> "ReasonSegmenter":
        """A new segmenter from a Qwen-VL (a directory or hub id) and a SAM checkpoint (the start of training).

        Every weight is read straight into its run dtype on ``device`` (see :meth:`cast_for_run`):
        frozen ones in ``dtype``, trainable ones in float32 (the master weights). No float32 copy
        of the frozen model is made.

        Args:
            lora: wrap the VLM with LoRA (None: a frozen VLM, or see ``train_language_model``).
            train_language_model: train the whole language model instead of LoRA (the VLM is
                then read in float32 and only its vision tower is cast to ``dtype``).
            dtype: the run dtype of the frozen weights (bf16 for a bf16 run on CUDA).
            device: where the model is built (None: the CPU).
        """
        # Absolute where local: a checkpoint (its config, its adapter) is read from other working
        # directories (test.py, a resume), where a relative "weights/Qwen" would be missing, or taken
        # for a hub id.
        vlm_path = _recorded_path(vlm_path)
        family = vlm_family(vlm_path)
        processor = load_processor(vlm_path, family)
        vlm = load_vlm(vlm_path, dtype=torch.float32 if train_language_model else dtype, device=device)
        seg_id = ensure_seg_token(vlm, processor.tokenizer)
        # Not configure_training on the built model: that would draw the LoRA's random initialisation
        # after SAM's and the projection's, and change the weights a seed gives.
        vlm = make_trainable(vlm, lora, train_language_model, seg_id)
        sam = build_sam(sam_variant, sam_checkpoint, dtype=dtype, device=device, fp32_modules=TRAINED_SAM_FP32)
        config = SegmenterConfig(
            vlm_family=family,
            sam_variant=sam_variant,
            hidden_size=text_hidden_size(vlm.config),
            prompt_dim=sam_prompt_embed_dim(sam),
            vlm_path=vlm_path,
            sam_checkpoint=_recorded_path(sam_checkpoint) if sam_checkpoint else None,
            lora=dict(vars(lora)) if (lora is not None and not train_language_model) else {},
            train_language_model=train_language_model,
            **config_overrides,
        )
        return cls(config, vlm, processor, sam).cast_for_run(dtype)

    @classmethod
    def from_pretrained(
        cls,
        directory: str | os.PathLike,
        dtype: torch.dtype = torch.float32,
        is_trainable: bool = False,
        base_model: str | os.PathLike | None = None,
        sam_checkpoint: str | os.PathLike | None = None,
        *,
        device: str | torch.device | None = None,
        train_language_model: bool | None = None,
        **vlm_kwargs,
    ) -> "ReasonSegmenter":
        """Load a directory written by :meth:`save_pretrained` (full or trainable-only).

        Every weight is read straight into its run dtype on ``device``; nothing is loaded in
        float32 first and cast afterwards.

        Args:
            dtype: the run dtype. For inference (``is_trainable=False``) every weight is in
                ``dtype`` except SAM's prompt encoder (float32). For training (``is_trainable``)
                only the frozen weights are; the trainable ones (LoRA, ``[SEG]`` rows,
                projection, mask decoder with its IoU head) are float32, read from the files
                without a round trip through ``dtype``.
            is_trainable: load for training: keep a LoRA adapter trainable (resuming training),
                trainable weights in float32.
            base_model: override the base Qwen-VL of an adapter checkpoint (e.g. moved files): a
                directory, or a hub id (``owner/name``, a string naming no local path), as the
                checkpoint's own ``vlm_path`` may be.
            sam_checkpoint: override the official SAM file of a checkpoint without SAM weights.
            device: where the model is loaded (None: the CPU).
            train_language_model: with ``is_trainable``, the whole language model trains: it is
                read in float32 and made trainable (None: as the checkpoint's config says).
            vlm_kwargs: passed to the VLM's ``from_pretrained`` (e.g. ``quantization_config``
                with a ``device_map``, which then places the VLM instead of ``device``).
        """
        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"model directory {directory} does not exist")
        config = SegmenterConfig.from_pretrained(directory)
        vlm_path, processor_path = _vlm_source(directory, config, base_model)
        processor = load_processor(processor_path, config.vlm_family)
        if train_language_model is None:
            train_language_model = config.train_language_model
        train_language_model = bool(is_trainable and train_language_model)
        vlm_dtype = torch.float32 if train_language_model else dtype
        vlm = load_vlm(vlm_path, dtype=vlm_dtype, device=device, **vlm_kwargs)
        if text_hidden_size(vlm.config) != config.hidden_size:
            raise ValueError(
                f"{directory} was trained on a {config.vlm_family} model with hidden size {config.hidden_size}, "
                f"but {vlm_path} has hidden size {text_hidden_size(vlm.config)}: pass the base model it was "
                "trained on (--base_model)"
            )
        seg_id = ensure_seg_token(vlm, processor.tokenizer)
        vlm = make_trainable(vlm, None, train_language_model, seg_id)  # a LoRA is the adapter's, loaded next
        if config.adapter_path:
            from peft import PeftModel

            from .seg_rows import use_row_sparse_trainable_tokens

            vlm = PeftModel.from_pretrained(vlm, directory / config.adapter_path, is_trainable=is_trainable)
            _check_adapter_loaded(vlm, directory / config.adapter_path, vlm_path)
            use_row_sparse_trainable_tokens(vlm)
        if (directory / SAM_WEIGHTS).is_file():
            sam_file = directory / SAM_WEIGHTS
        elif sam_checkpoint or config.sam_checkpoint:
            sam_file = Path(sam_checkpoint or config.sam_checkpoint)
        else:
            raise FileNotFoundError(
                f"{directory} holds no SAM weights ({SAM_WEIGHTS}) and names no SAM checkpoint; "
                "pass --vision_pretrained with the official SAM file"
            )
        sam = build_sam(
            config.sam_variant, sam_file, dtype=dtype, device=device,
            fp32_modules=TRAINED_SAM_FP32 if is_trainable else SAM_FP32,
        )
        # In memory the config points at the files this model came from, so that a trainable-only
        # checkpoint saved later can name its base model and SAM file.
        config.sam_checkpoint = str(Path(sam_file).resolve())
        if not config.adapter_path:
            config.vlm_path = str(Path(vlm_path).resolve())
        model = cls(config, vlm, processor, sam)
        head_file = directory / HEAD_WEIGHTS
        if not head_file.is_file():
            raise FileNotFoundError(f"{head_file} not found: the segmentation head of {directory} is missing")
        model.load_head_state(load_file(head_file))
        return model.cast_for_run(dtype, trainable_dtype=torch.float32 if is_trainable else dtype)

    def cast_for_run(self, dtype: torch.dtype, trainable_dtype: torch.dtype = torch.float32) -> "ReasonSegmenter":
        """Put every floating-point weight in the dtype it runs in, in place; returns ``self``.

        * frozen weights (``requires_grad=False``): ``dtype`` (e.g. bf16 for a bf16 run);
        * trainable ones: ``trainable_dtype``: float32 in training (the optimizer updates float32
          master weights while autocast computes in ``dtype``), ``dtype`` for inference;
        * SAM's :data:`SAM_FP32` parts, and in training (``trainable_dtype`` float32) its
          :data:`TRAINED_SAM_FP32` ones: float32.

        Weights already in their dtype are not touched (no copy), so this is cheap on a model
        loaded in its dtype. Integer and quantised weights (bitsandbytes) are left alone, and so
        are buffers: transformers keeps its rotary frequencies in float32 on purpose.
        """
        parts = TRAINED_SAM_FP32 if trainable_dtype == torch.float32 else SAM_FP32
        keep_fp32 = tuple(f"sam.{part}." for part in parts)
        for name, param in self.named_parameters():
            if not param.is_floating_point():
                continue
            if name.startswith(keep_fp32):
                wanted = torch.float32
            else:
                wanted = trainable_dtype if param.requires_grad else dtype
            if param.dtype != wanted:
                param.data = param.data.to(wanted)
        return self

    def _apply(self, fn, recurse=True):
        # SAM's SAM_FP32 parts stay float32 whatever dtype the rest of the model is cast to (bf16
        # inference on CUDA).
        super()._apply(fn, recurse)
        for part in SAM_FP32:
            self.sam.get_submodule(part).float()
        self._decoders.clear()  # their caches are in the old device and dtype
        return self

    def save_pretrained(self, directory: str | os.PathLike, include_sam: bool = True) -> None:
        """Write a segmenter directory.

        Layout: ``config.json``; the VLM as ``vlm/`` (full weights) or ``adapter/`` (a peft LoRA
        adapter with the ``[SEG]`` rows, referring to the base model), each with the processor
        and ``[SEG]``; ``head.safetensors`` (projection and SAM mask decoder); and, when
        ``include_sam``, ``sam.safetensors`` (the whole SAM with its official keys). Without
        SAM, the config names the official SAM file to rebuild it from (training checkpoints).
        """
        try:
            from peft import PeftModel
        except ImportError:  # peft is only needed for LoRA models; a full VLM saves without it
            PeftModel = None

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = SegmenterConfig(**vars(self.config))
        if PeftModel is not None and isinstance(self.vlm, PeftModel):
            config.adapter_path = ADAPTER_DIR
            self.vlm.save_pretrained(directory / ADAPTER_DIR)
            save_processor(self.processor, directory / ADAPTER_DIR, config.vlm_family)
        else:
            config.vlm_path, config.adapter_path = VLM_DIR, None
            self.vlm.save_pretrained(directory / VLM_DIR)
            save_processor(self.processor, directory / VLM_DIR, config.vlm_family)
        if include_sam:
            save_file(_contiguous(self.sam.state_dict()), directory / SAM_WEIGHTS)
            config.sam_checkpoint = None
        elif not config.sam_checkpoint:
            raise ValueError("cannot leave SAM out: this model was not built from a SAM checkpoint file")
        save_file(_contiguous(self.head_state()), directory / HEAD_WEIGHTS)
        config.save_pretrained(directory)

    def configure_training(self, lora: LoraSettings | None, train_language_model: bool = False) -> None:
        """Choose what of the VLM trains: LoRA (with the ``[SEG]`` rows) or the whole language model.

        For a model whose VLM is not wrapped yet (a new or standalone directory). A LoRA
        checkpoint being resumed is loaded with ``from_pretrained(..., is_trainable=True)`` instead.
        """
        from peft import PeftModel

        if isinstance(self.vlm, PeftModel):
            raise ValueError("the VLM already carries a LoRA adapter")
        self.vlm = make_trainable(self.vlm, lora, train_language_model, self.seg_token_id)
        if train_language_model:
            self.config.lora = {}
        elif lora is not None:
            self.config.lora = dict(vars(lora))
        self.config.train_language_model = train_language_model

    def head_state(self) -> dict[str, torch.Tensor]:
        """The segmentation head's weights: ``projection.*`` and ``mask_decoder.*``."""
        state = {f"projection.{k}": v for k, v in self.projection.state_dict().items()}
        state.update({f"mask_decoder.{k}": v for k, v in self.sam.mask_decoder.state_dict().items()})
        return state

    def load_head_state(self, state: dict[str, torch.Tensor]) -> None:
        projection = {k[len("projection."):]: v for k, v in state.items() if k.startswith("projection.")}
        decoder = {k[len("mask_decoder."):]: v for k, v in state.items() if k.startswith("mask_decoder.")}
        self.projection.load_state_dict(projection, strict=True)
        self.sam.mask_decoder.load_state_dict(decoder, strict=True)

    def train(self, mode: bool = True) -> "ReasonSegmenter":
        super().train(mode)
        self.sam.image_encoder.eval()
        self.sam.prompt_encoder.eval()
        return self

    # ------------------------------------------------------------------ building blocks

    def prepare(self, image: np.ndarray, turns: list[tuple[str, str | None]], masks=(), **extra) -> dict:
        """One model-ready sample (see :func:`model.batch.encode_sample`)."""
        return encode_sample(self.processor, self.sam_transform, image, turns, masks, **extra)

    def collate(self, samples: list[dict], padding_side: str = "right") -> dict:
        return collate(samples, self.processor.tokenizer.pad_token_id, padding_side)

    @torch.no_grad()
    def encode_images(
        self,
        sam_pixel_values: torch.Tensor,
        input_sizes: Sequence[Sequence[int]],
        image_keys: Sequence[str | None] | None = None,
    ) -> torch.Tensor:
        """[B, 3, S, S] uint8 SAM inputs, their (h, w) -> [B, P, S/patch, S/patch] embeddings
        (frozen encoder). ``image_keys`` (a batch's, see :func:`model.batch.image_key`) is what an
        attached :class:`~model.image_cache.FeatureCache` keys on; the encoder itself ignores it."""
        encoder = self.sam.image_encoder
        pixels = self.sam_transform.normalize(sam_pixel_values, input_sizes)
        return run_image_encoder(encoder, pixels.to(encoder.patch_embed.proj.weight.dtype))

    def decode_masks(
        self,
        image_embeddings: torch.Tensor,
        seg_states: Sequence[torch.Tensor],
        input_sizes: Sequence[Sequence[int]],
        original_sizes: Sequence[Sequence[int]],
    ) -> list[torch.Tensor]:
        """Masks for a batch of images, the mask decoder run once for all of them.

        Args:
            image_embeddings: [B, P, h, w] SAM embeddings.
            seg_states: per image, its [n_i, H] ``[SEG]`` hidden states (n_i may be 0).
            input_sizes, original_sizes: per image, SAM's (h, w) before padding and the original (H, W).
        Returns:
            per image, [n_i, H_i, W_i] mask logits.
        """
        counts = [len(states) for states in seg_states]
        if not sum(counts):
            return [image_embeddings.new_zeros((0, *(int(v) for v in size))).float() for size in original_sizes]
        states = torch.cat([states for states in seg_states if len(states)])
        image_index = torch.repeat_interleave(
            torch.arange(len(counts), device=states.device), torch.tensor(counts, device=states.device)
        )
        sparse = self.projection(states.to(self.projection.fc1.weight.dtype))
        low_res = decode_low_res_masks(self.sam, image_embeddings, image_index, sparse)
        return postprocess_by_image(low_res, counts, input_sizes, original_sizes, self.sam_transform.image_size)

    # ------------------------------------------------------------------ training forward

    def forward(self, batch: dict) -> SegmenterOutput:
        """Teacher-forced forward with losses.

        Args:
            batch: from :meth:`collate` (right padding), with ``labels`` and ``masks``. Both
                encoders run once per image, however many conversations are about it; the
                ``[SEG]`` states of a sample (from all its conversations, in order) prompt its masks.
        """
        language = self.teacher_forced(batch)
        seg_states = language.seg_states
        image_embeddings = self.encode_images(batch["sam_pixel_values"], batch["sam_input_size"])
        for index, (states, gt_masks) in enumerate(zip(seg_states, batch["masks"])):
            if len(states) != len(gt_masks):
                raise ValueError(
                    f"sample {index} ({batch['extra'][index].get('image_path', 'no path')}): "
                    f"{len(states)} {SEG_TOKEN} tokens in the answers but {len(gt_masks)} ground-truth masks"
                )
        num_masks = sum(len(states) for states in seg_states)
        if num_masks:
            mask_logits = self.decode_masks(image_embeddings, seg_states, batch["sam_input_size"], batch["original_size"])
            pairs = [(logits, gt.to(logits.device)) for logits, gt in zip(mask_logits, batch["masks"]) if len(logits)]
            # Per-mask losses, averaged over all masks of the batch (each mask weighs the same).
            bce_loss = torch.cat([mask_bce_loss(logits, gt) for logits, gt in pairs]).mean()
            dice_loss = torch.cat([mask_dice_loss(logits, gt) for logits, gt in pairs]).mean()
        else:
            # No [SEG] in the batch: the projection and decoder still join the graph (with zero
            # weight) so every trainable parameter gets a gradient and DDP does not wait for one.
            dummy = self.decode_masks(image_embeddings[:1], [language.hidden[0, :1]], *self._first_sizes(batch))[0]
            bce_loss = dice_loss = dummy.sum() * 0.0
            mask_logits = [language.hidden.new_zeros((0, *size)) for size in batch["original_size"]]
        ce_loss = language.ce_loss
        loss = (
            self.config.ce_weight * ce_loss + self.config.bce_weight * bce_loss + self.config.dice_weight * dice_loss
        )
        return SegmenterOutput(loss, ce_loss, bce_loss, dice_loss, mask_logits, num_masks)

    def teacher_forced(self, batch: dict) -> TeacherForcedOutput:
        """Run the VLM on a right-padded batch with labels (the vision tower once per image)."""
        keep, targets = labelled_next_tokens(batch["labels"])
        with self.capture_final_states() as captured, shared_images(self.vlm, batch) as inputs:
            # The LM head runs only where the next token is labelled: logits [n, V], not [R, T, V].
            output = self.vlm(**inputs, logits_to_keep=keep)
        hidden = captured[-1]
        seg_positions = state_positions(batch["labels"] == self.seg_token_id, self.seg_state_offset)  # answers only
        per_sample: list[list[torch.Tensor]] = [[] for _ in batch["masks"]]
        for row, sample in enumerate(row_images(batch)):
            per_sample[sample].append(hidden[row][seg_positions[row]])
        states = [torch.cat(parts) if parts else hidden.new_zeros((0, hidden.shape[-1])) for parts in per_sample]
        return TeacherForcedOutput(F.cross_entropy(output.logits.float(), targets), hidden, states)

    @staticmethod
    def _first_sizes(batch: dict) -> tuple:
        return batch["sam_input_size"][:1], batch["original_size"][:1]

    # ------------------------------------------------------------------ prediction

    @torch.no_grad()
    def generate(
        self,
        batch: dict,
        max_new_tokens: int = 64,
        decoding: str = "auto",
        prefix_cache: PrefixCache | None = None,
        **generate_kwargs,
    ) -> list[SegmentationResult]:
        """Answer a left-padded batch (open last turns), gathering ``[SEG]`` states on the way.

        Greedy decoding with a KV cache; the vision encoders run once per image; no second
        forward pass.

        Args:
            decoding: one of :data:`model.decoding.DECODING_MODES` (``"auto"``: a static cache and
                a compiled step on CUDA, the same loop uncompiled elsewhere).
            prefix_cache: a one-request batch reuses (and stores) its image prefix's keys and
                values there (follow-up questions about the same image).
            generate_kwargs: ``logits_processor`` works in every mode; anything else (sampling,
                beams) is passed to transformers' ``generate``, which then decodes (one answer per
                request: ``num_return_sequences`` must be 1).
        Raises:
            ValueError: a batch that is not left-padded, or ``num_return_sequences`` > 1.
        """
        attention_mask = batch.get("attention_mask")
        if attention_mask is not None and not bool(attention_mask[:, -1].all()):
            # A right-padded row would go on after its padding: a silently wrong answer.
            raise ValueError(
                "generate needs a left-padded batch (every prompt ending at the last column); "
                'build it with collate(..., padding_side="left")'
            )
        mode = resolve_decoding(decoding, self.device)
        if set(generate_kwargs) - {"logits_processor"}:
            mode = "transformers"
        stop_ids = self._stop_token_ids()
        # SAM's encoder has no use for the answer: on a GPU it runs beside the prefill, which
        # leaves the GPU idle most of its time (model.side_stream).
        embeddings_ready = self._side_stream.start(
            lambda: self.encode_images(batch["sam_pixel_values"], batch["sam_input_size"], batch.get("image_keys")),
            batch["sam_pixel_values"].device,
        )
        try:
            with shared_images(self.vlm, batch) as inputs:
                if mode == "transformers":
                    tokens, states = self._generate_with_transformers(inputs, max_new_tokens, generate_kwargs)
                else:
                    decoded = greedy_decode(
                        self._decoder(mode), inputs, max_new_tokens, stop_ids,
                        logits_processor=generate_kwargs.get("logits_processor"), prefix_cache=prefix_cache,
                        image_keys=batch.get("image_keys"),
                    )
                    tokens, states = decoded.tokens, decoded.states
        finally:
            # Also when decoding fails: the side stream must be done with the batch's pixels
            # before they are freed (and a retry reuses their memory).
            image_embeddings = embeddings_ready()
        rows = row_images(batch)  # the image of each request
        image_tokens = self.image_token_counts(batch)
        results, row_states = [], []
        no_states = image_embeddings.new_zeros((0, self.config.hidden_size))
        for index, row_tokens in enumerate(tokens.tolist()):
            end = next((i for i, t in enumerate(row_tokens) if t in stop_ids), len(row_tokens))
            row_tokens = row_tokens[:end]
            text = self.processor.tokenizer.decode(row_tokens, skip_special_tokens=False)
            result = SegmentationResult(text=text, token_ids=row_tokens)
            if rows[index] < len(image_tokens):
                result.image_tokens = image_tokens[rows[index]]
            seg_steps = [j for j, token in enumerate(row_tokens) if token == self.seg_token_id]
            # states[:, 0] is the prompt's last state, states[:, j + 1] the state after token j.
            result.seg_states = states[index, [j + 1 + self.seg_state_offset for j in seg_steps]] if seg_steps else None
            row_states.append(result.seg_states if seg_steps else no_states)
            results.append(result)
        if any(len(row) for row in row_states):
            row_logits = self.decode_masks(  # one pass for every request of the batch
                image_embeddings[torch.as_tensor(rows, device=image_embeddings.device)], row_states,
                [batch["sam_input_size"][image] for image in rows], [batch["original_size"][image] for image in rows],
            )
            for result, logits in zip(results, row_logits):
                if len(logits):
                    result.masks = [mask.cpu().numpy() for mask in logits > 0]
                    result.boxes = [mask_to_box(mask) for mask in result.masks]
                    result.scores = [mask_score(mask_logits) for mask_logits in logits]
        return results

    def _generate_with_transformers(self, inputs: dict, max_new_tokens: int, generate_kwargs: dict) -> tuple:
        """transformers' ``generate`` -> ([B, N] tokens, [B, N' + 1, H] states: the prompt's last,
        then those of the consumed tokens, as :class:`model.decoding.Decoded` has them)."""
        if generate_kwargs.get("num_return_sequences", 1) != 1:
            raise ValueError(
                f"num_return_sequences={generate_kwargs['num_return_sequences']}: generate gives one answer per "
                "request; leave it out (sample several answers with separate calls and do_sample=True)"
            )
        rows, prompt_length = inputs["input_ids"].shape
        options = {"do_sample": False, "pad_token_id": self.processor.tokenizer.pad_token_id, **generate_kwargs}
        with self.capture_final_states() as captured:
            # One step past the limit: a last [SEG] gets its state.
            sequences = self.vlm.generate(**inputs, max_new_tokens=max_new_tokens + 1, **options)
        tokens = sequences[:, prompt_length : prompt_length + max_new_tokens]
        # Greedy and sampled decoding run each row once a token: step 0 runs the prompt, and the state
        # of generated token j comes from step j + 1. Beam search runs (and reorders) several
        # hypotheses per row: their states are recomputed from the answers kept.
        if all(len(step) == rows for step in captured) and all(step.shape[1] == 1 for step in captured[1:]):
            return tokens, torch.cat([step[:, -1:] for step in captured], dim=1)
        return tokens, self._answer_states(inputs, tokens)

    def _answer_states(self, inputs: dict, tokens: torch.Tensor) -> torch.Tensor:
        """[B, N + 1, H] final states of one forward over left-padded prompts [B, T] followed by
        their answers ``tokens`` [B, N]: the prompts' last, then those of the answer tokens."""
        prompt_length = inputs["input_ids"].shape[1]
        full = dict(inputs, input_ids=torch.cat([inputs["input_ids"], tokens], dim=1))
        attention_mask = inputs["attention_mask"]
        full["attention_mask"] = torch.cat([attention_mask, torch.ones_like(tokens, dtype=attention_mask.dtype)], dim=1)
        if inputs.get("mm_token_type_ids") is not None:  # answer tokens are text
            full["mm_token_type_ids"] = F.pad(inputs["mm_token_type_ids"], (0, tokens.shape[1]))
        with self.capture_final_states() as captured:
            self.vlm(**full, logits_to_keep=1)
        return captured[-1][:, prompt_length - 1 :]

    def _decoder(self, mode: str) -> GreedyDecoder:
        """The decoder of ``mode`` (kept: its static caches and compiled step are reused)."""
        decoder = self._decoders.get(mode)
        if decoder is None or decoder.lm is not causal_lm(self.vlm):  # built before a LoRA wrap
            decoder = self._decoders[mode] = GreedyDecoder(self.vlm, compiled=mode == "compiled")
        return decoder

    def image_token_counts(self, batch: dict) -> list[int]:
        """Image tokens of each image of ``batch`` (from its ``image_grid_thw``)."""
        if batch.get("image_grid_thw") is None:
            return []
        return image_token_counts(batch["image_grid_thw"], self.processor.image_processor.merge_size)

    def _stop_token_ids(self) -> set[int]:
        tokenizer = self.processor.tokenizer
        ids = {tokenizer.pad_token_id, tokenizer.eos_token_id}
        eos = self.vlm.generation_config.eos_token_id
        ids.update(eos if isinstance(eos, list) else [eos])
        return {i for i in ids if i is not None}

    def predict(
        self,
        images: Sequence[np.ndarray],
        prompts: Sequence[str],
        max_new_tokens: int = 64,
        mask_sizes: Sequence[tuple[int, int] | None] | None = None,
        **generate_kwargs,
    ) -> list[SegmentationResult]:
        """Answer one request per image (a batch, generated together; the images are
        preprocessed on parallel threads, :func:`model.batch.map_in_threads`).

        ``mask_sizes``: per image, the (H, W) its masks and boxes are given in, when not the
        image's own (the photo an image was a downscaled copy of; None: the image's).
        """
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        sizes = list(mask_sizes) if mask_sizes is not None else [None] * len(images)
        samples = map_in_threads(
            lambda image, prompt, size: self.prepare(image, [(prompt, None)], mask_size=size), images, prompts, sizes
        )
        batch = self.collate(samples, padding_side="left")
        return self.generate(to_device(batch, self.device), max_new_tokens=max_new_tokens, **generate_kwargs)

    @property
    def device(self) -> torch.device:
        return self.projection.fc1.weight.device

    @property
    def seg_state_offset(self) -> int:
        """A ``[SEG]`` at position p of a sequence is stood for by the state at p + this (0 or -1;
        ``config.seg_state``, see :data:`model.constants.SEG_STATES`)."""
        return SEG_STATES[self.config.seg_state]


def state_positions(seg_positions: torch.Tensor, offset: int) -> torch.Tensor:
    """[R, T] bool, where the ``[SEG]`` tokens are -> [R, T] bool, where the states standing for
    them are (``offset`` <= 0 positions earlier, see :attr:`ReasonSegmenter.seg_state_offset`)."""
    if offset > 0:
        raise ValueError(f"a [SEG] is stood for by its own state or an earlier one, not {offset} later")
    if offset == 0:
        return seg_positions
    return torch.cat([seg_positions[:, -offset:], seg_positions.new_zeros((seg_positions.shape[0], -offset))], dim=1)


def labelled_next_tokens(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where a teacher-forced batch needs the LM head, and the tokens it must predict there.

    Passed as ``logits_to_keep`` to a Qwen-VL's forward (transformers keeps the ``True`` positions
    of a 2-D boolean mask, flattened row by row), the mask makes the head compute [n, V] logits
    instead of [R, T, V]; the cross-entropy of those logits with ``targets`` (mean over the n
    tokens) is then the token loss of transformers' ``ForCausalLMLoss`` with ``labels`` (shift by
    one, mean over the labelled tokens of the whole batch, no ``num_items_in_batch``), with the
    same gradients: unlabelled positions contribute nothing to either.

    Args:
        labels: [R, T] token labels, ``IGNORE_INDEX`` (-100) where unlabelled (prompts, padding).
    Returns:
        (keep, targets): keep [R, T] bool, True at position t when labels[r, t + 1] is labelled;
        targets [n] (n = keep.sum()) those next tokens, in row-major order.
    """
    next_labels = labels[:, 1:]
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = next_labels != IGNORE_INDEX
    return keep, next_labels[keep[:, :-1]]


def _check_adapter_loaded(vlm: nn.Module, adapter_dir: Path, base_model: str | os.PathLike) -> None:
    """Raise ValueError when tensors of the adapter at ``adapter_dir`` found no layer in ``vlm``.

    peft skips such tensors without a word (e.g. the LoRA of layers a smaller base model lacks),
    and the model would run, and merge, without them.
    """
    from peft.utils import get_peft_model_state_dict, load_peft_weights

    # The loaded model's adapter state, named as in the file (what saving it again would write).
    loaded = get_peft_model_state_dict(vlm)
    unused = sorted(set(load_peft_weights(str(adapter_dir), device="cpu")) - set(loaded))
    if unused:
        raise ValueError(
            f"{len(unused)} tensors of the adapter in {adapter_dir} have no layer in the base model {base_model} "
            f"(e.g. {', '.join(unused[:3])}): it is not the model the checkpoint was trained on; pass that one "
            "(--base_model)"
        )


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous() for k, v in state.items()}


def _vlm_source(
    directory: Path, config: SegmenterConfig, base_model: str | os.PathLike | None
) -> tuple[Path | str, Path]:
    """Where the VLM of the segmenter directory ``directory`` (with config ``config``) is read from.

    Returns:
        (its weights, its processor): the directory's ``vlm/`` for both; for a LoRA checkpoint,
        the base model (``base_model``, else the config's ``vlm_path``: a directory, or a hub id
        that transformers finds, see :func:`model.vlm.is_hub_id`) and the adapter's directory.
    Raises:
        FileNotFoundError: no such VLM (the message says what to pass).
        ValueError: a VLM of another family than the one the checkpoint was trained on.
    """
    if config.adapter_path:
        vlm_path = base_model or _resolve(directory, config.vlm_path)
        processor_path = directory / config.adapter_path
        if not (Path(vlm_path).exists() or is_hub_id(vlm_path)):
            raise FileNotFoundError(
                f"{directory} is a LoRA checkpoint of the base model {vlm_path}, which does not exist (nor is it a "
                "hub id owner/name); pass the base model's directory or hub id (--version / base_model)"
            )
    else:
        vlm_path = processor_path = directory / config.vlm_path
        if not vlm_path.exists():
            raise FileNotFoundError(
                f"{directory} holds no {config.vlm_path}/ (its whole VLM), as its config.json says it does: "
                "the directory is incomplete; copy it again from where it was written"
            )
    try:
        family = vlm_family(vlm_path)
    except OSError as err:
        if not is_hub_id(vlm_path):
            raise
        # transformers' message (not in the cache, no connection) names neither the model nor the checkpoint.
        raise FileNotFoundError(
            f"{directory} is a LoRA checkpoint of the base model {vlm_path}, which could not be found: download it "
            f"into the hub cache (hf download) or pass its directory (--version / base_model). {err}"
        ) from err
    if family != config.vlm_family:
        raise ValueError(f"{directory} was trained on a {config.vlm_family} model but {vlm_path} is a {family}")
    return vlm_path, processor_path


def _recorded_path(path: str | os.PathLike) -> str:
    """How a config records where a part came from: a local path made absolute, a hub id as it is."""
    return str(Path(path).resolve()) if Path(path).exists() else str(path)


def _resolve(directory: Path, path: str) -> Path | str:
    """A path from a config: relative to the checkpoint directory if it exists there, else as
    written (a string: it may be a hub id)."""
    return directory / path if (directory / path).exists() else path
