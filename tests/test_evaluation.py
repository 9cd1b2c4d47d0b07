import numpy as np
import pytest

from imgclf.serve import evaluation as ev


def preds(probs, labels, names=("a", "b", "c")):
    return ev.Predictions(np.asarray(probs, dtype=float), np.asarray(labels), list(names))


def test_summary_metrics_on_a_hand_checked_example():
    p = preds([[0.8, 0.1, 0.1], [0.3, 0.6, 0.1], [0.5, 0.4, 0.1], [0.1, 0.2, 0.7]], [0, 1, 1, 2])
    m = ev.summary_metrics(p)
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["top2_accuracy"] == pytest.approx(1.0)
    # class b: precision 1, recall 0.5 -> F1 2/3; a: precision 0.5, recall 1 -> 2/3; c: 1
    assert m["macro_f1"] == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)
    assert m["test_loss"] == pytest.approx(-np.mean(np.log([0.8, 0.6, 0.4, 0.7])))
    assert 0 <= m["ece"] <= 1 and 0.5 <= m["roc_auc_macro_ovr"] <= 1


def test_expected_calibration_error_is_zero_when_calibrated_and_large_when_not():
    labels = np.array([0] * 8 + [1] * 2)
    calibrated = np.tile([0.8, 0.2], (10, 1))  # says 80% and is right 80% of the time
    assert ev.expected_calibration_error(calibrated, labels) == pytest.approx(0.0)
    overconfident = np.tile([0.99, 0.01], (10, 1))
    assert ev.expected_calibration_error(overconfident, np.array([0] * 5 + [1] * 5)) == pytest.approx(0.49)


def test_diagnostics_find_confused_pairs_and_weak_classes():
    # class c is often predicted as a: a is over-predicted, c is missed
    labels = [0, 0, 0, 1, 1, 1, 2, 2, 2, 2]
    predicted = [0, 0, 0, 1, 1, 1, 0, 0, 0, 2]
    p = preds(np.eye(3)[predicted] * 0.9 + 0.0333, labels)
    pairs = ev.most_confused_pairs(ev.confusion(p), p.class_names)
    assert pairs[0] == {"actual": "c", "predicted": "a", "count": 3, "share_of_actual": 0.75}
    weak = {row["class"]: row["issue"] for row in ev.weak_classes(ev.per_class(p), 0.8)}
    assert weak["a"].startswith("low precision") and weak["c"].startswith("low recall")
    assert "b" not in weak


def test_confidently_wrong_orders_by_confidence():
    p = preds([[0.1, 0.9, 0], [0.4, 0.6, 0], [0.9, 0.1, 0], [0.2, 0.7, 0.1]], [0, 0, 0, 0])
    assert list(ev.confidently_wrong(p, 2)) == [0, 3]


def test_comparison_rows_and_verdict():
    rows = ev.comparison_rows(
        {"baseline": {"accuracy": 0.7, "macro_f1": 0.69, "params_total": 10},
         "finetune": {"accuracy": 0.93, "macro_f1": 0.93, "params_total": 20}},
        {"baseline": {"best_epoch": 3, "train_accuracy": 0.9, "val_accuracy": 0.7, "train_seconds": 10},
         "finetune": {"best_epoch": 2, "train_accuracy": 0.95, "val_accuracy": 0.94, "train_seconds": 5}})
    assert rows[0]["overfitting_gap"] == pytest.approx(0.2) and rows[0]["verdict"].startswith("overfits")
    assert rows[1]["verdict"].startswith("fits well") and rows[0]["kept_epoch"] == 3
    text = ev.comparison_summary(rows)
    assert "**finetune**" in text and "+23.0 accuracy points" in text
    assert ev.markdown_table(rows).count("\n") == 4


def test_timed_predictions_predicts_the_full_set_once_after_a_warm_up():
    calls = []

    def predict(x):
        calls.append(len(x))
        return x * 2

    images = np.arange(20, dtype=np.float32)
    outputs, per_second = ev.timed_predictions(predict, images)
    np.testing.assert_array_equal(outputs, images * 2)
    assert calls == [8, 20] and per_second > 0
