"""A classifier that judges refusals, as a check on the substring markers.

Markers miss soft refusals ("Let's talk about something else") and flag compliant text that
happens to contain one ("... which is illegal in most countries"). A `RefusalClassifier` wraps a
transformers `pipeline` (a text-classification model trained to spot refusals, or any NLI model
used zero-shot) and `recheck_pareto` re-scores the harmful responses of the best Pareto trials
with it after the search. It is off unless `ClassifierOptions.model` is set, and the model is
only loaded the first time a response is judged.
"""

import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from abliterate.errors import AbliterateError
from abliterate.metrics import normalize_response
from abliterate.options import ClassifierOptions

log = logging.getLogger("abliterate.classifier")


class RefusalClassifier:
    """Judges responses with a transformers pipeline built on first use.

    `device` is anything `pipeline(device=...)` takes (a torch.device, "cuda:0", an index); None
    leaves the placement to transformers (CPU unless accelerate says otherwise).
    """

    def __init__(self, options: ClassifierOptions, device=None) -> None:
        if not options.model:
            raise AbliterateError("no classifier model: set classifier.model to a hub id or local dir")
        self.options = options
        self.device = device
        self._pipeline = None

    # ---- loading -------------------------------------------------------------------
    @property
    def pipeline(self):
        """The transformers pipeline, loaded and checked on first access."""
        if self._pipeline is None:
            self._pipeline = self._load()
        return self._pipeline

    def _load(self):
        from transformers import pipeline

        opts = self.options
        path = Path(opts.model).expanduser()
        looks_local = path.is_absolute() or opts.model.startswith((".", "~")) or opts.model.count("/") > 1
        if looks_local and not path.is_dir():
            raise AbliterateError(
                f"classifier.model={opts.model!r}: no such directory; pass a hub id or local dir of a {opts.task} model"
            )
        model = str(path) if looks_local else opts.model
        try:  # trust_remote_code always passed: left unset, transformers asks on stdin and runs the code on "y"
            pipe = pipeline(opts.task, model=model, device=self.device, trust_remote_code=opts.trust_remote_code)
        except Exception as err:  # loaders raise OSError, ValueError, hub errors, ...
            if isinstance(err, ValueError) and "trust_remote_code=True" in str(err):
                raise AbliterateError(
                    f"classifier.model={opts.model!r} needs its own Python code to load (auto_map in its config "
                    "files); pass --classifier.trust_remote_code true only if you trust that code"
                ) from None
            raise AbliterateError(
                f"classifier.model={opts.model!r}: cannot load it as a {opts.task} model "
                f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
                "pass a hub id or local dir of a sequence-classification model"
            ) from err
        labels = [str(label) for label in pipe.model.config.id2label.values()]
        if opts.task == "text-classification":
            if opts.refusal_label not in labels:
                raise AbliterateError(
                    f"classifier.refusal_label={opts.refusal_label!r} is not a label of {opts.model}; "
                    f"its labels are: {', '.join(labels)}"
                )
        elif pipe.entailment_id == -1:
            raise AbliterateError(
                f"classifier.model={opts.model!r} has no entailment label (labels: {', '.join(labels)}); "
                "zero-shot-classification needs an NLI model, or use classifier.task=text-classification"
            )
        pipe.model.eval()
        log.info("loaded refusal classifier %s (%s) on %s", opts.model, opts.task, pipe.device)
        return pipe

    # ---- judging -------------------------------------------------------------------
    def refusal_scores(self, responses: Sequence[str]) -> list[float]:
        """Score of refusal_label per response; an empty response (after normalisation) scores 1.0.

        Empty responses are not sent to the model, and when all are empty it is not loaded.
        """
        if isinstance(responses, str):
            raise TypeError("responses must be a sequence of strings, not a single string")
        scores = [1.0] * len(responses)
        todo = [i for i, text in enumerate(responses) if normalize_response(text)]
        if not todo:
            return scores
        texts = [responses[i] for i in todo]
        for i, score in zip(todo, self._score(texts), strict=True):
            scores[i] = score
        return scores

    @torch.no_grad()
    def _score(self, texts: list[str]) -> list[float]:
        opts = self.options
        pipe = self.pipeline
        if opts.task == "text-classification":
            outputs = pipe(texts, top_k=None, truncation=True, batch_size=opts.batch_size)
            return [next(o["score"] for o in row if o["label"] == opts.refusal_label) for row in outputs]
        outputs = pipe(
            texts,
            candidate_labels=[opts.refusal_label, opts.other_label],
            hypothesis_template=opts.hypothesis_template,
            multi_label=False,
            batch_size=opts.batch_size,
        )
        if isinstance(outputs, dict):
            outputs = [outputs]
        return [dict(zip(o["labels"], o["scores"], strict=True))[opts.refusal_label] for o in outputs]

    def is_refusal(self, responses: Sequence[str]) -> list[bool]:
        """Whether each response is a refusal: its refusal score is at or above the threshold.

        An empty or whitespace-only response is a refusal without asking the model, as with the
        markers (`metrics.is_refusal`): saying nothing does not comply.
        """
        return [score >= self.options.threshold for score in self.refusal_scores(responses)]

    def refusal_rate(self, responses: Sequence[str]) -> float:
        """Fraction of `responses` judged refusals."""
        if len(responses) == 0:
            raise ValueError("refusal_rate() needs at least one response")
        verdicts = self.is_refusal(responses)
        return sum(verdicts) / len(verdicts)


def log_recheck(rows: Sequence[dict], options: ClassifierOptions) -> None:
    """The re-check as a table on the "abliterate.classifier" logger."""
    if not rows:
        return
    log.info(
        "classifier re-check of %d Pareto trial(s) with %s (threshold %.2f):",
        len(rows),
        options.model,
        options.threshold,
    )
    log.info("  %6s  %8s  %8s  %10s  %8s", "trial", "KL", "markers", "classifier", "disagree")
    for row in rows:
        log.info(
            "  %6d  %8.4f  %8.3f  %10.3f  %8.3f",
            row["trial"],
            row["kl"],
            row["marker_refusal_rate"],
            row["classifier_refusal_rate"],
            row["disagreement"],
        )
