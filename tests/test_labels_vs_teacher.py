"""benchmarks/labels_vs_teacher.py: the figures behind "what the teacher adds to the labels"
(docs/results.md), checked on constant teachers and students whose values follow by hand."""

import math

import pytest
import torch

from sadpipe import losses
from sadpipe.geometry import AnchorLayout
from sadpipe.labeling import IGNORED, match_anchors

from conftest import load_benchmark

LAYOUT = AnchorLayout(strides=(8, 16, 32, 64, 128), sizes=(16.0, 32.0, 64.0, 128.0, 256.0))
PADDED, K = (128, 128), 3
BOXES = torch.tensor([[10.0, 10.0, 40.0, 44.0], [60.0, 70.0, 120.0, 110.0]])
LABELS = torch.tensor([2, 0])


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("labels_vs_teacher")


class Constant(torch.nn.Module):
    """A detector whose class logits are a fixed [A, K] tensor, whatever the image."""

    def __init__(self, logits):
        super().__init__()
        self.layout, self.logits = LAYOUT, logits

    def forward(self, images):
        return self.logits[None].expand(images.shape[0], -1, -1), None


def sample():
    return {"image": torch.zeros(3, *PADDED), "padded_size": PADDED, "boxes": BOXES, "labels": LABELS,
            "iscrowd": torch.zeros(2, dtype=torch.bool)}


def label_grid():
    matched = match_anchors(LAYOUT.anchors(PADDED), BOXES)
    y = torch.zeros(matched.shape[0], K, dtype=torch.float64)  # float64 so q and p are exactly the values below
    fg = matched >= 0
    y[fg, LABELS[matched[fg]]] = 1.0
    return y, (matched != IGNORED)


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def where(y, at_positives: float, elsewhere: float):
    """float64 [A, K] logits (torch.where with two Python floats would give float32)."""
    return torch.where(y > 0, torch.full_like(y, at_positives), torch.full_like(y, elsewhere))


def adl_grad_of_one_entry(p: float, q: float) -> float:
    """d ADL / d student logit for one entry (paper form, beta 1, gamma 2)."""
    s = torch.tensor([[logit(p)]], dtype=torch.float64, requires_grad=True)
    losses.adaptive_distillation_loss(s, torch.tensor([[logit(q)]], dtype=torch.float64), beta=1.0, gamma=2.0).sum().backward()
    return float(s.grad)


def test_a_teacher_that_repeats_the_labels_adds_nothing(bench):
    y, _ = label_grid()
    # q = sigmoid(+-40) is y to 1e-17: p - q == p - y entry by entry, so the cosine is 1 and the gap 0
    teacher = Constant(where(y, 40.0, -40.0))
    student = Constant(torch.full_like(y, logit(0.25)))
    r = bench.compare(teacher, student, [sample()] * 2, images=2)
    assert r["target_gap"] == pytest.approx(0.0, abs=1e-12)
    assert r["teacher_misses"] == 0 and r["teacher_false_per_image"] == 0
    assert r["kd_label_cosine"] == pytest.approx(1.0, abs=1e-12)
    assert r["kd_beyond_labels"] == pytest.approx(0.0, abs=1e-5)
    assert r["student_to_teacher_over_student_to_labels"] == pytest.approx(1.0)


def test_a_softer_teacher_by_hand(bench):
    y, keep = label_grid()
    n_pos = int(y[keep].sum())
    n_neg = int(keep.sum()) * K - n_pos  # non-ignored entries with y = 0
    assert n_pos >= 2 and n_neg > 0
    # teacher: q = 0.75 at positives, 0.1 elsewhere; student: p = 0.25 everywhere
    teacher = Constant(where(y, logit(0.75), logit(0.1)))
    student = Constant(torch.full_like(y, logit(0.25)))
    r = bench.compare(teacher, student, [sample()], images=1)
    # p - q: -0.5 at positives, 0.15 elsewhere; p - y: -0.75 at positives, 0.25 elsewhere
    dot = n_pos * 0.375 + n_neg * 0.0375
    kd_sq, label_sq = n_pos * 0.25 + n_neg * 0.0225, n_pos * 0.5625 + n_neg * 0.0625
    assert r["kd_label_cosine"] == pytest.approx(dot / math.sqrt(kd_sq * label_sq), rel=1e-9)
    assert r["student_to_teacher_over_student_to_labels"] == pytest.approx(math.sqrt(kd_sq / label_sq), rel=1e-9)
    # |q - y|: 0.25 per positive, 0.1 per other kept entry
    assert r["target_gap"] == pytest.approx((n_pos * 0.25 + n_neg * 0.1) / n_pos, rel=1e-9)
    assert r["teacher_q_at_positives"] == pytest.approx(0.75)
    assert r["positive_entries_per_image"] == n_pos
    assert r["teacher_misses"] == 0 and r["teacher_false_per_image"] == 0
    # KD's gradient share on positives: 0.25 per positive entry, 0.0225 per other one (squares of the above)
    assert r["kd_grad_on_positives"] == pytest.approx(n_pos * 0.25 / kd_sq, rel=1e-9)
    # ADL's gradient takes one value on positives and one elsewhere: each from a one-entry ADL
    g_pos, g_neg = (adl_grad_of_one_entry(0.25, q) for q in (0.75, 0.1))
    assert g_pos < 0 and g_neg > 0  # both pull with the labels: up at positives, down elsewhere
    adl_sq = n_pos * g_pos**2 + n_neg * g_neg**2
    adl_dot = n_pos * g_pos * -0.75 + n_neg * g_neg * 0.25
    assert r["adl_label_cosine"] == pytest.approx(adl_dot / math.sqrt(adl_sq * label_sq), rel=1e-9)
    assert r["adl_grad_on_positives"] == pytest.approx(n_pos * g_pos**2 / adl_sq, rel=1e-9)
    assert r["kd_grad_against_labels"] == 0 and r["adl_grad_against_labels"] == 0
    # Chen's weighted soft CE, -(q log p + 1.5 (1 - q) log(1 - p)), has d/dz = q (p - 1) + 1.5 (1 - q) p:
    #   positives (q 0.75): 0.75 * -0.75 + 1.5 * 0.25 * 0.25 = -0.46875
    #   elsewhere (q 0.1):  0.1 * -0.75 + 1.5 * 0.9 * 0.25 = 0.2625
    w_pos, w_neg = -0.46875, 0.2625
    wce_sq = n_pos * w_pos**2 + n_neg * w_neg**2
    wce_dot = n_pos * w_pos * -0.75 + n_neg * w_neg * 0.25
    assert r["wce_label_cosine"] == pytest.approx(wce_dot / math.sqrt(wce_sq * label_sq), rel=1e-9)
    assert r["wce_grad_on_positives"] == pytest.approx(n_pos * w_pos**2 / wce_sq, rel=1e-9)
    assert r["wce_grad_against_labels"] == 0


def test_misses_and_false_detections_are_counted(bench):
    y, keep = label_grid()
    n_pos = int(y[keep].sum())
    logits = where(y, logit(0.75), logit(0.1))
    positive_rows = torch.nonzero(y > 0)
    logits[tuple(positive_rows[0])] = logit(0.4)  # one positive the teacher misses
    background = torch.nonzero((y == 0) & keep[:, None])
    for row in background[:3]:  # three background entries it fires on
        logits[tuple(row)] = logit(0.9)
    r = bench.compare(Constant(logits), Constant(torch.zeros_like(logits)), [sample()], images=1)
    assert r["teacher_misses"] == pytest.approx(1 / n_pos)
    assert r["teacher_false_per_image"] == 3
    # student p = 0.5 everywhere. KD's gradient p - q against the labels' p - y:
    #   the missed positive: +0.1 vs -0.5 (against); the three false entries: -0.4 vs +0.5 (against);
    #   other positives: -0.25 vs -0.5; other background entries: +0.4 vs +0.5 (with the labels)
    n_neg = int(keep.sum()) * K - n_pos
    against = 0.1**2 + 3 * 0.4**2
    total = against + (n_pos - 1) * 0.25**2 + (n_neg - 3) * 0.4**2
    assert r["kd_grad_against_labels"] == pytest.approx(against / total, rel=1e-9)
