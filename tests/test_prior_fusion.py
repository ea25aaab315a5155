"""The class prior (teacher/prior.py) and the label-free ensemble weights (teacher/fusion.py), recomputed on small
arrays and simulations with known answers."""
from __future__ import annotations

import numpy as np
import pytest

from distillery.teacher import fusion, prior


# ---------------------------------------------------------------- prior


def test_count_bias_meets_the_prior_counts():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(3000, 5)) + np.array([2.0, 0.0, 0.0, -1.0, 0.5])  # a per-class bias
    for target in ([0.2] * 5, [0.4, 0.3, 0.15, 0.1, 0.05]):
        b = prior.count_bias(z, target)
        counts = np.bincount((z + b).argmax(1), minlength=5)
        assert np.abs(counts - np.asarray(target) * 3000).max() <= 15, (counts, target)
        assert abs(b.mean()) < 1e-9  # centred
    # scale-free: the same counts for scores 7x larger, bias 7x larger
    b1, b7 = prior.count_bias(z, [0.2] * 5), prior.count_bias(7 * z, [0.2] * 5)
    assert np.allclose(7 * b1, b7, atol=1e-2)


def test_class_sizes_largest_remainder():
    assert prior.class_sizes([1, 1, 1], 10).tolist() == [4, 3, 3]
    assert prior.class_sizes([0.5, 0.25, 0.25], 7).tolist() == [3, 2, 2]  # remainders .5, .75, .75
    assert prior.class_sizes([3, 1], 8).sum() == 8


def test_balanced_labels_meet_given_sizes_exactly():
    rng = np.random.default_rng(1)
    z = rng.normal(size=(101, 4)) + np.array([3.0, 0, 0, 0])  # class 0 would take nearly everything
    for target in ([0.25] * 4, [0.1, 0.2, 0.3, 0.4]):
        labels = prior.balanced_labels(z, target, prior.tie_key([str(i) for i in range(101)], 0))
        assert np.bincount(labels, minlength=4).tolist() == prior.class_sizes(target, 101).tolist()
    # with ample room every image keeps its argmax
    z2 = np.eye(3)[[0, 1, 2, 0, 1, 2]] * 5
    assert prior.balanced_labels(z2, [1 / 3] * 3).tolist() == [0, 1, 2, 0, 1, 2]


def test_select_top_ranks_by_margin_and_breaks_ties_by_hash_not_order():
    # class 0 rows: margins 1, 3, 3, 0.5 -> the two with margin 3 first, their order by the keys
    z = np.array([[2.0, 1.0], [4.0, 1.0], [5.0, 2.0], [1.5, 1.0], [0.0, 1.0]])
    labels = np.array([0, 0, 0, 0, 1])
    keys = np.array([0.9, 0.7, 0.2, 0.1, 0.5])
    idx, lab = prior.select_top(z, labels, 2, keys)
    assert idx.tolist() == [2, 1, 4] and lab.tolist() == [0, 0, 1]
    idx2, _ = prior.select_top(z, labels, 2, np.array([0.9, 0.1, 0.7, 0.1, 0.5]))
    assert idx2.tolist() == [1, 2, 4]  # other keys, other order among the tie
    # the keys come from content and seed, not position
    k0 = prior.tie_key(["a", "b", "c"], 0)
    assert prior.tie_key(["c", "a", "b"], 0).tolist() == [k0[2], k0[0], k0[1]]
    assert not np.allclose(k0, prior.tie_key(["a", "b", "c"], 1))


def test_margins_by_hand():
    z = np.array([[3.0, 1.0, 2.0], [0.0, 5.0, 1.0]])
    assert prior.margins(z, np.array([0, 2])).tolist() == [1.0, -4.0]


def test_match_prior_moves_counts_and_applies_the_same_bias_elsewhere():
    rng = np.random.default_rng(2)
    p = rng.dirichlet([5, 1, 1], size=600)  # class 0 dominates
    q = rng.dirichlet([1, 1, 1], size=50)
    fixed, (q2,), b = prior.match_prior(p, [1 / 3] * 3, [q])
    assert np.abs(np.bincount(fixed.argmax(1), minlength=3) - 200).max() <= 6
    assert np.allclose(fixed.sum(1), 1) and np.allclose(q2.sum(1), 1)
    expect = np.log(q) + b
    expect = np.exp(expect - expect.max(1, keepdims=True))
    assert np.allclose(q2, expect / expect.sum(1, keepdims=True))
    same, (q3,), b0 = prior.match_prior(p, None, [q])
    assert np.array_equal(same, p) and np.array_equal(q3, q) and not b0.any()


def test_estimated_prior_recovers_class_sizes_from_a_biased_classifier():
    """Gaussian classes of known sizes; a text classifier with a strong per-class bias; synthetic images drawn
    from the same class centres (balanced). EM on the biased probabilities (Saerens) takes the bias for the prior;
    the prototype estimate recovers the sizes."""
    rng = np.random.default_rng(3)
    d, c = 16, 4
    centres = rng.normal(size=(c, d))
    sizes = np.array([400, 250, 100, 50])
    x = np.concatenate([centres[k] + rng.normal(size=(n, d)) for k, n in enumerate(sizes)])
    truth = np.repeat(np.arange(c), sizes)
    syn_y = np.repeat(np.arange(c), 30)
    syn = centres[syn_y] + rng.normal(size=(len(syn_y), d))
    est, info = prior.estimate_prior_from_prototypes(x, syn, syn_y, c, shrink=0.0)
    assert np.abs(est - sizes / sizes.sum()).max() < 0.03, est
    # the biased classifier: text directions = centres, plus a bias that favours the smallest class
    logits = prior._l2(x) @ prior._l2(centres).T * 10 + np.array([0.0, 0.0, 0.0, 6.0])
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    pi = np.full(c, 1 / c)
    for _ in range(100):  # Saerens et al. 2002
        q = p * pi * c
        q /= q.sum(1, keepdims=True)
        pi = q.mean(0)
    assert pi[3] > 4 * sizes[3] / sizes.sum()  # EM takes the bias for the prior
    # matching the biased column to the estimated prior recovers accuracy
    fixed, _, _ = prior.match_prior(p, est)
    assert (fixed.argmax(1) == truth).mean() > (p.argmax(1) == truth).mean() + 0.05
    # shrink pulls towards uniform; every share stays >= the floor
    half, _ = prior.estimate_prior_from_prototypes(x, syn, syn_y, c, shrink=0.5)
    assert np.allclose(half, 0.5 * est + 0.5 / c, atol=1e-6)


def test_estimated_prior_needs_every_class():
    with pytest.raises(ValueError, match="class '#1' has no synthetic"):
        prior.estimate_prior_from_prototypes(np.ones((3, 2)), np.ones((2, 2)), [0, 0], 2)


def test_given_prior_names_every_class():
    class Cfg:
        given = {"a": 3, "b": 1}
    assert prior.given_prior(Cfg, ["a", "b"]).tolist() == [0.75, 0.25]
    Cfg.given = {"a": 1}
    with pytest.raises(ValueError, match="no share for class 'b'"):
        prior.given_prior(Cfg, ["a", "b"])
    Cfg.given = {"a": 1, "b": 1, "z": 1}
    with pytest.raises(ValueError, match="'z' is not a class"):
        prior.given_prior(Cfg, ["a", "b"])


# ---------------------------------------------------------------- Dawid-Skene


def _simulated_votes(acc, n=4000, c=5, seed=0, pi=None):
    rng = np.random.default_rng(seed)
    truth = rng.choice(c, size=n, p=pi)
    votes = []
    for a in acc:
        right = rng.random(n) < a
        wrong = (truth + rng.integers(1, c, size=n)) % c
        votes.append(np.where(right, truth, wrong))
    return np.stack(votes), truth


def test_dawid_skene_estimates_independent_accuracies():
    acc = [0.85, 0.7, 0.6, 0.45, 0.35]
    votes, truth = _simulated_votes(acc, pi=[0.4, 0.25, 0.15, 0.1, 0.1])
    post, conf, pi = fusion.dawid_skene(votes, 5)
    est = fusion.estimated_accuracy(conf, pi)
    true = (votes == truth).mean(1)
    assert np.abs(est - true).max() < 0.05, (est, true)
    assert np.abs(pi - [0.4, 0.25, 0.15, 0.1, 0.1]).max() < 0.03
    assert (post.argmax(1) == truth).mean() > max(true)  # better than the best single column
    w = fusion.log_odds_weights(est, 5)
    assert np.all(np.diff(w) < 0)  # weights follow the accuracies
    assert abs(w.sum() - 1) < 1e-9


def test_log_odds_weights_by_hand():
    w = fusion.log_odds_weights(np.array([0.9, 0.5, 0.2]), 3)
    raw = np.array([np.log(0.9 * 2 / 0.1), np.log(0.5 * 2 / 0.5), 0.0])  # 0.2 < chance: weight 0
    assert np.allclose(w, raw / raw.sum())


def test_copies_are_not_counted_twice():
    acc = [0.8, 0.65, 0.55, 0.5]
    votes, truth = _simulated_votes(acc, seed=1)
    probs = {f"t{i}": np.eye(5)[v] * 0.9 + 0.02 for i, v in enumerate(votes)}
    w, det = fusion.dawid_skene_weights(probs)
    # a copy of the weakest teacher, making exactly its mistakes
    probs2 = {**probs, "t3_copy": probs["t3"].copy()}
    w2, det2 = fusion.dawid_skene_weights(probs2)
    assert ["t3", "t3_copy"] in det2["groups"]
    assert abs(w2["t3"] + w2["t3_copy"] - w["t3"]) < 0.01  # the pair carries what one carried
    for k in ("t0", "t1", "t2"):
        assert abs(w2[k] - w[k]) < 0.01
        assert abs(det2["estimated_accuracy"][k] - det["estimated_accuracy"][k]) < 0.01
    # without grouping the copy would inflate the weak teacher's estimate
    v_all = np.stack([p.argmax(1) for p in probs2.values()])
    _, conf, pi = fusion.dawid_skene(v_all, 5)
    naive = fusion.estimated_accuracy(conf, pi)
    assert naive[3] > det2["estimated_accuracy"]["t3"] + 0.1


def test_columns_of_one_teacher_are_one_group_and_collapsed_columns_are_dropped():
    votes, _ = _simulated_votes([0.8, 0.7, 0.6, 0.6], seed=2)
    probs = {f"t{i}": np.eye(5)[v] for i, v in enumerate(votes)}
    probs["flat"] = np.eye(5)[np.zeros(votes.shape[1], int)]  # everything in one class
    w, det = fusion.dawid_skene_weights(probs, linked=[["t2", "t3"]])
    assert ["t2", "t3"] in det["groups"]
    assert w["flat"] == 0 and "flat" in det["dropped"]
    assert abs(sum(w.values()) - 1) < 1e-6


def test_two_groups_get_equal_weights():
    votes, _ = _simulated_votes([0.8, 0.6], seed=3)
    w, det = fusion.dawid_skene_weights({"a": np.eye(5)[votes[0]], "b": np.eye(5)[votes[1]]})
    assert w == {"a": 0.5, "b": 0.5} and "at least 3" in det["note"]


def test_cohen_kappa_by_hand():
    a = np.array([0, 0, 1, 1])
    b = np.array([0, 1, 1, 1])
    po, pe = 0.75, 0.5 * 0.25 + 0.5 * 0.75
    assert fusion.cohen_kappa(a, b, 2) == pytest.approx((po - pe) / (1 - pe))
