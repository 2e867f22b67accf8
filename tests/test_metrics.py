"""Metric functions against hand-computed cases."""

import math

import pytest

from bertforge import metrics
from bertforge.nltk_words import word_tokenize


def test_classification_binary_by_hand():
    # gold 1 1 1 0 0 0, predicted 1 1 0 1 0 0: tp=2 fp=1 fn=1 tn=2
    gold = [1, 1, 1, 0, 0, 0]
    pred = [1, 1, 0, 1, 0, 0]
    result = metrics.classification_metrics(pred, gold, 2)
    assert result["accuracy"] == pytest.approx(4 / 6)
    assert result["f1"] == pytest.approx(2 / 3)                 # P = R = 2/3
    assert result["macro_f1"] == pytest.approx(2 / 3)           # both classes 2/3
    assert result["mcc"] == pytest.approx((2 * 2 - 1 * 1) / math.sqrt(3 * 3 * 3 * 3))


def test_classification_multiclass_and_degenerate():
    gold = [0, 1, 2, 2]
    pred = [0, 2, 2, 2]
    # class 0: f1 1; class 1: f1 0; class 2: P 2/3, R 1 -> 0.8
    assert metrics.f1_macro(pred, gold, 3) == pytest.approx((1 + 0 + 0.8) / 3)
    result = metrics.classification_metrics(pred, gold, 3)
    assert result["f1"] == result["macro_f1"]
    # multi-class MCC: c=3, s=4, t=(1,1,2), p=(1,0,3): (3*4 - (1+0+6)) / sqrt(16-10) / sqrt(16-6)
    assert result["mcc"] == pytest.approx(5 / math.sqrt(6 * 10))
    assert metrics.matthews_corrcoef([1, 1, 1], [0, 1, 1], 2) == 0.0   # constant prediction: undefined -> 0
    detail = metrics.per_class(pred, gold, ["neg", "neu", "pos"])
    assert detail["per_class"]["neg"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1}
    assert detail["per_class"]["neu"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert detail["per_class"]["pos"]["precision"] == pytest.approx(2 / 3) and detail["per_class"]["pos"]["recall"] == 1
    assert detail["confusion"] == {"labels": ["neg", "neu", "pos"], "matrix": [[1, 0, 0], [0, 0, 1], [0, 0, 2]]}


def test_pearson_spearman_with_ties():
    assert metrics.pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert metrics.pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    # monotone but not linear: Spearman 1, Pearson below 1
    assert metrics.spearman([1, 2, 3, 4], [1, 4, 9, 100]) == pytest.approx(1.0)
    assert metrics.pearson([1, 2, 3, 4], [1, 4, 9, 100]) < 0.9
    # ties get average ranks: x ranks (1, 2.5, 2.5, 4), y ranks (1, 2, 3, 4)
    expected = metrics.pearson([1, 2.5, 2.5, 4], [1, 2, 3, 4])
    assert metrics.spearman([10, 20, 20, 30], [1, 2, 3, 4]) == pytest.approx(expected)
    assert expected == pytest.approx(4.5 / math.sqrt(4.5 * 5))


def test_entities_conlleval_rules():
    assert metrics.get_entities(["B-PER", "I-PER", "O", "B-LOC"]) == [("PER", 0, 1), ("LOC", 3, 3)]
    # an I- after O starts an entity; a type change starts a new one; B after B splits
    assert metrics.get_entities(["O", "I-ORG", "I-ORG", "I-PER", "B-PER", "B-PER"]) == [
        ("ORG", 1, 2), ("PER", 3, 3), ("PER", 4, 4), ("PER", 5, 5)]
    # IOBES
    assert metrics.get_entities(["S-LOC", "B-PER", "E-PER", "O"]) == [("LOC", 0, 0), ("PER", 1, 2)]


def test_entity_scores_by_hand_and_per_type():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    pred = [["B-PER", "I-PER", "O", "B-ORG"], ["B-ORG", "B-ORG"]]
    scores = metrics.entity_scores(gold, pred)
    # gold: PER(0,1) LOC(3) ORG(s1:0) = 3; predicted: PER, ORG(3), ORG(s1:0), ORG(s1:1) = 4; correct: PER, ORG(s1:0)
    assert scores["precision"] == pytest.approx(2 / 4)
    assert scores["recall"] == pytest.approx(2 / 3)
    assert scores["f1"] == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    assert scores["per_type"]["PER"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1}
    assert scores["per_type"]["LOC"]["recall"] == 0.0 and scores["per_type"]["LOC"]["support"] == 1
    assert scores["per_type"]["ORG"]["precision"] == pytest.approx(1 / 3)


def test_entity_does_not_cross_a_sentence_end():
    # "New York" split over two sentences must be two entities, not one: the prediction that joins
    # nothing across the boundary matches both gold entities.
    gold = [["O", "B-LOC"], ["I-LOC", "O"]]
    pred = [["O", "B-LOC"], ["B-LOC", "O"]]
    scores = metrics.entity_scores(gold, pred)
    assert scores["precision"] == scores["recall"] == 1.0
    # flattened into one sequence the same tags would form one entity and the scores would differ
    flat = metrics.get_entities(["O", "B-LOC", "I-LOC", "O"])
    assert flat == [("LOC", 1, 2)]
    with pytest.raises(ValueError):
        metrics.entity_scores([["O"]], [["O", "O"]])


def test_squad_normalisation_examples():
    assert metrics.normalize_answer("The  Denver Broncos!") == "denver broncos"
    assert metrics.normalize_answer("an apple, a pear") == "apple pear"
    assert metrics.normalize_answer("theater") == "theater"          # articles only as whole words
    assert metrics.normalize_answer("Saint-Denis") == "saintdenis"   # punctuation removed, not spaced
    assert metrics.squad_exact("the Broncos", "Broncos.") == 1.0
    # prediction "denver broncos win", truth "broncos": P 1/3, R 1
    assert metrics.squad_f1("Denver Broncos win", "the Broncos") == pytest.approx(0.5)
    assert metrics.squad_f1("a", "the") == 0.0                       # both normalise to empty


def test_squad_metrics_max_over_truths_and_unanswered():
    refs = {"q1": ["Denver Broncos", "Broncos"], "q2": ["1990"], "q3": ["Paris"]}
    preds = {"q1": "Broncos", "q2": "in 1990"}
    result = metrics.squad_metrics(preds, refs)
    assert result["exact_match"] == pytest.approx(100 / 3)
    assert result["f1"] == pytest.approx(100 * (1 + 2 / 3) / 3)


def test_cmrc_character_level():
    assert metrics.cmrc_segments("北京大学，Peking University") == ["北", "京", "大", "学", "peking", "university"]
    assert metrics.cmrc_segments("《红楼梦》", remove_punctuation=False) == ["《", "红", "楼", "梦", "》"]
    assert metrics.cmrc_exact("《红楼梦》", "红楼梦") == 1.0
    # longest common contiguous run: gold 北京大学 (4), prediction 在北京大学里 (6): run 4 -> P 4/6 R 1
    assert metrics.cmrc_f1("在北京大学里", "北京大学") == pytest.approx(2 * (4 / 6) / (4 / 6 + 1))
    # common characters that are not contiguous count only as the longest run: gold 甲乙丙, pred 甲丙: run 1
    assert metrics.cmrc_f1("甲丙", "甲乙丙") == pytest.approx(2 * 0.5 * (1 / 3) / (0.5 + 1 / 3))
    result = metrics.cmrc_metrics({"a": "北京", "b": "上海"}, {"a": ["北京", "京城"], "b": ["广州"], "c": ["x"]})
    assert result["exact_match"] == pytest.approx(100 / 3)
    assert result["f1"] == pytest.approx(100 / 3)


# Expected values from the official cmrc2018_evaluate.py itself (run under Python 3 with nltk 3.9.1 and its English
# punkt_tab model) on the same strings.
@pytest.mark.parametrize("prediction, truth, f1", [
    ("4", "4.5", 0.0),                  # "4.5" is one token
    ("3.5", "3.5米", 2 / 3),             # ["3.5"] against ["3.5", "米"]: P 1, R 1/2
    ("1", "1,000", 0.0),                # "1,000" is one token
    ("don", "don't", 0.0),              # "do" + "n't"
    ("a", "【a】", 0.0),                  # a mark outside the rules stays attached: "【a】"
    ("0．37美元", "0.37美元", 2 / 3),     # a full-width point is a letter to nltk: "0．37" is not "0.37"
])
def test_cmrc_f1_segments_as_the_official_script(prediction, truth, f1):
    assert metrics.cmrc_f1(prediction, truth) == pytest.approx(f1)
    assert metrics.cmrc_f1(truth, prediction) == pytest.approx(f1)
    assert metrics.cmrc_exact(prediction, truth) == 0.0


def test_cmrc_segments_mixed_runs():
    assert metrics.cmrc_segments("约4.5%的Don't") == ["约", "4.5", "%", "的", "do", "n't"]
    # a dropped mark joins its neighbours into one run, and so one word, as in the official script
    assert metrics.cmrc_segments("A-1型") == ["a1", "型"]
    assert metrics.cmrc_segments("A-1型", remove_punctuation=False) == ["a", "-", "1", "型"]


# Each tokenization below is what nltk.word_tokenize (nltk 3.9.1, English punkt_tab) returns for the same text.
@pytest.mark.parametrize("text, words", [
    ("t.f. gilbert", ["t.f", ".", "gilbert"]),                  # no abbreviation: a sentence ends, its period splits
    ("henry a. walsh", ["henry", "a.", "walsh"]),               # an initial before a lower-case word
    ("a. administrators", ["a", ".", "administrators"]),        # ... unless the model saw that word open sentences
    ("church of st. paul", ["church", "of", "st.", "paul"]),    # an abbreviation the model lists
    ("st francis 5. renunciation", ["st", "francis", "5.", "renunciation"]),  # a number before a lower-case word
    ("e.g. by egi, 2001.", ["e.g", ".", "by", "egi", ",", "2001", "."]),
    ("so. (yes.) no", ["so", ".", "(", "yes", ".", ")", "no"]),  # the bracket closes the sentence before it
    ("hey! say! jump", ["hey", "!", "say", "!", "jump"]),
    ('"c. lambei"', ["``", "c.", "lambei", "''"]),
    ("it's 4.5% ... cannot", ["it", "'s", "4.5", "%", "...", "can", "not"]),
    ("a—b", ["a—b"]),                                           # nltk 3.10 splits dashes; 3.9 does not
])
def test_word_tokenize_as_nltk(text, words):
    assert word_tokenize(text) == words
