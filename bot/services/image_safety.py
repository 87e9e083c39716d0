"""The optional image safety classifier: any transformers image-classification model, run on every
image after it is decoded and stored, before delivery (safety.classifier; off by default).

A job whose image scores at least safety.threshold on one of safety.flagged_labels is flagged; the
verdict is stored with the job and, outside age-restricted channels, the image is withheld or sent as
a spoiler (safety.flagged_action, applied by the delivery). A classifier that fails on an image
flags it: an image nobody checked is not sent as if it had passed.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image

from engine.errors import ConfigError
from fluxbot.settings import SafetySettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageVerdict:
    flagged: bool
    label: str  # the flagged label that scored highest, else the top label
    score: float


class ImageClassifier:
    """Loaded once (blocking: call in a thread); `classify` is blocking too."""

    def __init__(self, model: Any, processor: Any, source: str, flagged: set[str], threshold: float) -> None:
        self.model = model
        self.processor = processor
        self.source = source
        self.threshold = threshold
        labels = {int(i): str(name) for i, name in model.config.id2label.items()}
        self.labels = labels
        self.flagged_ids = [i for i, name in labels.items() if name.lower() in flagged]
        if not self.flagged_ids:
            raise ConfigError(
                f"safety.classifier {source!r} has the labels {sorted(labels.values())}, none of "
                f"safety.flagged_labels {sorted(flagged)}: set flagged_labels to the ones that mean unsafe"
            )

    @classmethod
    def load(cls, settings: SafetySettings) -> ImageClassifier:
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        assert settings.classifier is not None
        source = settings.classifier
        try:
            processor = AutoImageProcessor.from_pretrained(source)
            model = AutoModelForImageClassification.from_pretrained(source).eval()
        except (OSError, ValueError) as exc:
            raise ConfigError(f"safety.classifier {source!r} cannot be loaded: {exc}") from exc
        flagged = {label.lower() for label in settings.flagged_labels}
        return cls(model, processor, source, flagged, settings.threshold)

    def classify(self, images: Sequence[Image.Image]) -> list[ImageVerdict]:
        import torch

        inputs = self.processor(images=[image.convert("RGB") for image in images], return_tensors="pt")
        with torch.inference_mode():
            probabilities = self.model(**inputs).logits.float().softmax(dim=-1)
        verdicts = []
        for row in probabilities.tolist():
            worst = max(self.flagged_ids, key=lambda i: row[i])
            if row[worst] >= self.threshold:
                verdicts.append(ImageVerdict(True, self.labels[worst], row[worst]))
            else:
                top = max(range(len(row)), key=lambda i: row[i])
                verdicts.append(ImageVerdict(False, self.labels[top], row[top]))
        return verdicts

    def verdict(self, pngs: Sequence[bytes]) -> dict[str, Any]:
        """The job's stored verdict for its PNGs (blocking). Never raises: a failure flags the job."""
        try:
            images = [Image.open(io.BytesIO(data)) for data in pngs]
            verdicts = self.classify(images)
        except Exception as exc:  # any failure of a third-party model: flag, log, deliver nothing unchecked
            log.exception("safety classifier %s failed; the job's images count as flagged", self.source)
            return {"flagged": True, "classifier": self.source, "error": str(exc)[:200], "images": []}
        return {
            "flagged": any(v.flagged for v in verdicts),
            "classifier": self.source,
            "threshold": self.threshold,
            "images": [
                {"flagged": v.flagged, "label": v.label, "score": round(v.score, 4)} for v in verdicts
            ],
        }
