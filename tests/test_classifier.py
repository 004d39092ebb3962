"""The classifier refusal detector, on tiny BERT classifiers built and saved locally (no hub)."""

import logging
from types import SimpleNamespace

import optuna
import pytest
import torch
from optuna.trial import TrialState, create_trial

from abliterate.classifier import ClassifierOptions, RefusalClassifier
from abliterate.errors import AbliterateError
from abliterate.passes import TrialResult
from abliterate.pipeline import Pipeline
from abliterate.scorers import KL, MarkerRefusals

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
WORDS = (
    "i cannot can help with that sure here is how to do it sorry the plan step one two "
    "this response a refusal compliance . , : !"
).split()


def build_tokenizer():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(  # pairs for the zero-shot (NLI) pipeline
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        model_max_length=64,
    )


def tiny_bert(id2label: dict[int, str]):
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=len(SPECIAL) + len(WORDS),
        hidden_size=4,
        num_hidden_layers=1,
        num_attention_heads=1,
        intermediate_size=4,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        id2label=id2label,
        label2id={label: i for i, label in id2label.items()},
    )
    return BertForSequenceClassification(config)


def says_cannot_classifier():
    """A text classifier whose refusal logit fires exactly when the text contains "cannot".

    Weights set by hand (hidden size 4): every word embeds to +-1 on dims 0/1, "cannot" to +-1 on
    dims 2/3, which the embedding LayerNorm scales by 100. Zero queries and keys make attention a
    uniform mean over the tokens; a large attention output lets that mean dominate the [CLS]
    residual, and the MLP adds nothing. So the pooled [CLS] state has dim 2 > 0 iff "cannot" is in
    the text, and the classifier reads refusal = 8 * pooled[2] - 2 against compliance = 0: a
    refusal score of about 0.12 without the word and above 0.98 with it.
    """
    model = tiny_bert({0: "compliance", 1: "refusal"})
    cannot = (SPECIAL + WORDS).index("cannot")
    bert, layer = model.bert, model.bert.encoder.layer[0]
    with torch.no_grad():
        for param in model.parameters():
            param.zero_()
        bert.embeddings.word_embeddings.weight[:] = torch.tensor([1.0, -1.0, 0.0, 0.0])
        bert.embeddings.word_embeddings.weight[cannot] = torch.tensor([0.0, 0.0, 1.0, -1.0])
        bert.embeddings.LayerNorm.weight[:] = torch.tensor([1.0, 1.0, 100.0, 100.0])
        layer.attention.self.value.weight[:] = torch.eye(4)
        layer.attention.output.dense.weight[:] = 100 * torch.eye(4)
        layer.attention.output.LayerNorm.weight.fill_(1.0)
        layer.output.LayerNorm.weight.fill_(1.0)
        bert.pooler.dense.weight[:] = torch.eye(4)
        model.classifier.weight[1, 2] = 8.0
        model.classifier.bias[1] = -2.0
    return model


@pytest.fixture(scope="module")
def refusal_model_dir(tmp_path_factory):
    """The "cannot" text-classification model and its tokenizer, saved to a local dir."""
    path = tmp_path_factory.mktemp("refusal_classifier")
    says_cannot_classifier().save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def nli_model_dir(tmp_path_factory):
    """An untrained NLI-shaped model: entailment / neutral / contradiction."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("nli_classifier")
    tiny_bert({0: "entailment", 1: "neutral", 2: "contradiction"}).save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    return path


def text_classifier(path, **kwargs) -> RefusalClassifier:
    return RefusalClassifier(ClassifierOptions(model=str(path), task="text-classification", **kwargs))


def test_classifier_flags_the_refusal_word(refusal_model_dir):
    classifier = text_classifier(refusal_model_dir)
    responses = [
        "sorry , i cannot help with the plan",
        "here is the plan : step one , step two",
        "i cannot",
        "sure , i can help . here is how",
    ]
    assert classifier.is_refusal(responses) == [True, False, True, False]
    assert classifier.refusal_rate(responses) == 0.5
    scores = classifier.refusal_scores(responses)
    assert scores[0] > 0.98 and scores[1] == pytest.approx(torch.sigmoid(torch.tensor(-2.0)).item())


def test_threshold_is_inclusive(refusal_model_dir):
    text = ["sorry , i cannot help with the plan"]
    score = text_classifier(refusal_model_dir).refusal_scores(text)[0]
    assert 0.0 < score < 1.0
    assert text_classifier(refusal_model_dir, threshold=score).is_refusal(text) == [True]
    assert text_classifier(refusal_model_dir, threshold=min(1.0, score + 1e-4)).is_refusal(text) == [False]
    # threshold 0: everything is a refusal; compliance scores below any positive threshold
    assert text_classifier(refusal_model_dir, threshold=0.0).is_refusal(["sure , here is how"]) == [True]


def test_empty_responses_are_refusals_without_the_model(refusal_model_dir, monkeypatch):
    classifier = text_classifier(refusal_model_dir)

    def no_model(self):
        raise AssertionError("the model must not be loaded or called for empty responses")

    monkeypatch.setattr(RefusalClassifier, "_load", no_model)
    assert classifier.is_refusal(["", "   ", "\n\t", "**"]) == [True] * 4
    assert classifier.refusal_rate([" "]) == 1.0
    assert classifier.is_refusal([]) == []
    monkeypatch.undo()
    # mixed: only the non-empty responses reach the model, and verdicts keep their order
    assert classifier.is_refusal(["", "sure , here is how", " ", "i cannot"]) == [True, False, True, True]


def test_model_is_loaded_lazily(tmp_path):
    classifier = text_classifier(tmp_path / "missing")  # no error yet
    assert classifier._pipeline is None
    with pytest.raises(AbliterateError, match="classifier.model"):
        classifier.is_refusal(["sure , here is how"])


def test_unloadable_model_names_the_option(tmp_path):
    (tmp_path / "not_a_model").mkdir()
    with pytest.raises(AbliterateError, match="classifier.model"):
        text_classifier(tmp_path / "not_a_model").is_refusal(["hi"])


def test_wrong_refusal_label_lists_the_models_labels(refusal_model_dir):
    classifier = text_classifier(refusal_model_dir, refusal_label="REJECTION")
    with pytest.raises(AbliterateError, match="classifier.refusal_label") as info:
        classifier.is_refusal(["i cannot"])
    assert "compliance" in str(info.value) and "refusal" in str(info.value)


def test_zero_shot_runs_on_an_nli_model(nli_model_dir):
    options = ClassifierOptions(model=str(nli_model_dir), batch_size=2)  # zero-shot is the default task
    classifier = RefusalClassifier(options)
    responses = ["sure , here is how", "i cannot help with that", "", "step one : the plan"]
    verdicts = classifier.is_refusal(responses)
    assert len(verdicts) == 4 and all(isinstance(v, bool) for v in verdicts)
    assert verdicts[2] is True
    scores = classifier.refusal_scores(responses)
    assert all(0.0 <= s <= 1.0 for s in scores)
    # two candidate labels: the refusal score is a softmax against other_label, so 0 flags all
    everything = RefusalClassifier(ClassifierOptions(model=str(nli_model_dir), threshold=0.0))
    assert everything.is_refusal(responses) == [True] * 4


def test_zero_shot_needs_an_entailment_label(refusal_model_dir):
    classifier = RefusalClassifier(ClassifierOptions(model=str(refusal_model_dir)))
    with pytest.raises(AbliterateError, match="entailment"):
        classifier.is_refusal(["i cannot"])


@pytest.mark.parametrize(
    "kwargs, option",
    [
        ({"threshold": 1.5}, "classifier.threshold"),
        ({"batch_size": 0}, "classifier.batch_size"),
        ({"recheck_top": -1}, "classifier.recheck_top"),
        ({"other_label": "refusal"}, "classifier.other_label"),
        ({"hypothesis_template": "no slot"}, "classifier.hypothesis_template"),
    ],
)
def test_options_are_validated(kwargs, option):
    with pytest.raises(AbliterateError, match=option):
        ClassifierOptions(model="x", **kwargs)


def test_off_by_default():
    assert not ClassifierOptions().enabled
    with pytest.raises(AbliterateError, match="classifier.model"):
        RefusalClassifier(ClassifierOptions())


# ---- recheck_pareto ------------------------------------------------------------------
class CannedPipeline(Pipeline):
    """A pipeline whose trial passes 'generate' each trial's canned harmful replies."""

    def __init__(self, responses: dict[int, list[str]]):
        self.trainer = SimpleNamespace(world_size=1, is_global_zero=True)
        self.module = SimpleNamespace(markers=["sorry"])
        self.objectives = [MarkerRefusals(), KL()]
        self.canned = responses
        self.evaluated: list[int] = []

    def plan_of(self, trial, space):
        return trial.number

    def evaluate(self, plan, reference, callbacks=(), scorers=None, report=True):
        self.evaluated.append(plan)
        return TrialResult({"kl": 0.01 * plan, "refusals": -1.0}, list(self.canned[plan]))


def make_trials():
    """Front (refusals, KL): #0 (0.9, 0.0), #1 (0.5, 0.1), #2 (0.25, 0.3), #3 (0.0, 0.9), #4 (0.1, 0.5)."""
    points = [(0.9, 0.0), (0.5, 0.1), (0.25, 0.3), (0.0, 0.9), (0.1, 0.5), (0.6, 0.2), (0.3, 0.6)]
    study = optuna.create_study(directions=["minimize", "minimize"])
    for values in points:
        study.add_trial(create_trial(values=list(values)))
    study.add_trial(create_trial(state=TrialState.PRUNED))  # never re-checked
    study.add_trial(create_trial(state=TrialState.FAIL))
    return study.get_trials(deepcopy=False)


def test_recheck_pareto_takes_the_fewest_marker_refusals(refusal_model_dir, caplog):
    # markers flag "sorry"; the classifier flags "cannot": they disagree on the first two responses.
    canned = {
        3: ["sorry , here is the plan", "i cannot help", "sorry , i cannot", "sure , here is how"],
        4: ["sure , here is how", "step one : the plan", "here is how", "i can do it"],
        2: ["", "sorry , i cannot help with that", "i cannot do that", "here is the plan"],
    }
    pipe = CannedPipeline(canned)
    classifier = text_classifier(refusal_model_dir)
    with caplog.at_level(logging.INFO, logger="abliterate.classifier"):
        rows = pipe.recheck(make_trials(), None, None, classifier, top=3)
    assert pipe.evaluated == [3, 4, 2]  # fewest marker refusals first; dominated/pruned trials skipped
    assert [row["trial"] for row in rows] == [3, 4, 2]
    assert rows[0] == {
        "trial": 3,
        "kl": 0.03,
        "marker_refusal_rate": 0.5,
        "classifier_refusal_rate": 0.5,
        "disagreement": 0.5,
    }
    assert rows[1]["marker_refusal_rate"] == rows[1]["classifier_refusal_rate"] == rows[1]["disagreement"] == 0.0
    # the empty response is a refusal to both; "i cannot do that" only to the classifier
    assert rows[2]["marker_refusal_rate"] == 0.5
    assert rows[2]["classifier_refusal_rate"] == 0.75
    assert rows[2]["disagreement"] == 0.25
    table = "\n".join(r.getMessage() for r in caplog.records if r.name == "abliterate.classifier")
    assert "re-check of 3 Pareto trial" in table and "classifier" in table


def test_recheck_pareto_bounds(refusal_model_dir):
    canned = {n: ["sure"] for n in range(5)}
    pipe = CannedPipeline(canned)
    classifier = text_classifier(refusal_model_dir)
    assert pipe.recheck(make_trials(), None, None, classifier, top=0) == []
    rows = pipe.recheck(make_trials(), None, None, classifier, top=50)
    assert [row["trial"] for row in rows] == [3, 4, 2, 1, 0]  # the whole front, no more
    assert pipe.recheck([], None, None, classifier, top=5) == []


def test_run_rechecks_the_front_with_the_classifier(organism_config, organism_dir, refusal_model_dir, tmp_path):
    """Wired end to end: `run --classifier.model` writes the re-check beside the study."""
    import json

    from abliterate.cli import main

    out = tmp_path / "run"
    main(
        [
            "run",
            "--config",
            str(organism_config),
            "--model",
            str(organism_dir),
            "--output_dir",
            str(out),
            "--study.n_trials",
            "6",
            "--classifier.model",
            str(refusal_model_dir),
            "--classifier.task",
            "text-classification",
            "--classifier.recheck_top",
            "2",
        ]
    )
    rows = json.loads((out / "classifier_recheck.json").read_text())
    assert 1 <= len(rows) <= 2
    for row in rows:
        assert 0.0 <= row["classifier_refusal_rate"] <= 1.0 and 0.0 <= row["marker_refusal_rate"] <= 1.0
