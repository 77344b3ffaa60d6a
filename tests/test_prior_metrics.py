"""Prior-only metrics on constructed cases, and the two trivial priors."""

import pytest
import torch
import torch.nn.functional as F

from argen.eval.prior_metrics import mean_embedding_prior, nearest_caption_prior, prior_metrics


def _embeddings(n: int, d: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def test_perfect_predictions_have_cosine_one_and_rank_one():
    true = _embeddings(12)
    m = prior_metrics(true * 3.0, true)  # scale does not matter: cosines
    torch.testing.assert_close(m.cosine, torch.ones(12))
    assert m.rank.tolist() == [1] * 12
    assert (m.mean_cosine, m.top1, m.top5, m.median_rank, m.num_candidates) == pytest.approx((1.0, 1.0, 1.0, 1.0, 12))


def test_permuted_predictions_have_known_ranks():
    # Orthonormal true embeddings: a prediction equal to true[j] has cosine 1 to j and 0 to every other image, so
    # row i predicted as true[perm[i]] ranks its true image 1 if perm[i] == i, else 2 (one candidate ahead, ties kept).
    true = torch.eye(8)
    perm = torch.tensor([0, 2, 1, 3, 5, 4, 6, 7])
    m = prior_metrics(true[perm], true)
    assert m.rank.tolist() == [1, 2, 2, 1, 2, 2, 1, 1]
    torch.testing.assert_close(m.cosine, (perm == torch.arange(8)).float())
    assert m.top1 == pytest.approx(0.5) and m.top5 == pytest.approx(1.0) and m.median_rank == pytest.approx(1.0)


def test_rank_counts_candidates_strictly_closer_than_the_true_image():
    true = F.normalize(torch.tensor([[1.0, 0.0]]), dim=-1)
    pred = F.normalize(torch.tensor([[1.0, 1.0]]), dim=-1)  # 45 degrees from the true image
    angles = torch.tensor([0.0, 10.0, 30.0, 44.0, 60.0, 90.0, 180.0]) * torch.pi / 180  # from pred
    base = torch.pi / 4
    candidates = torch.stack([torch.cos(base + angles), torch.sin(base + angles)], dim=-1)
    m = prior_metrics(pred, true, candidates=candidates)
    assert m.rank.tolist() == [1 + 4]  # 0, 10, 30 and 44 degrees beat the true image at 45
    assert m.num_candidates == 7


def test_prior_metrics_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="pair row by row"):
        prior_metrics(_embeddings(3), _embeddings(4))
    with pytest.raises(ValueError, match="dimension 8"):
        prior_metrics(_embeddings(3), _embeddings(3, d=8))


def test_mean_embedding_prior_is_the_normalised_mean_for_every_row():
    train = _embeddings(50)
    pred = mean_embedding_prior(train, 5)
    expected = F.normalize(F.normalize(train, dim=-1).mean(0), dim=-1)
    assert pred.shape == (5, 16)
    torch.testing.assert_close(pred, expected.expand(5, -1))


def test_nearest_caption_prior_returns_the_image_of_the_closest_caption():
    text = _embeddings(20, seed=1)
    image = _embeddings(20, seed=2)
    queries = torch.stack([text[7] * 2.0, text[3] + 1e-3 * torch.randn(16, generator=torch.Generator().manual_seed(3))])
    torch.testing.assert_close(nearest_caption_prior(text, image, queries), image[[7, 3]])


def test_trivial_priors_score_below_a_good_prior():
    # Images = their caption's embedding plus noise: the oracle (true) prior scores best, the lookup in between,
    # the caption-blind mean worst.
    gen = torch.Generator().manual_seed(4)
    concepts = torch.randn(10, 16, generator=gen)
    train_ids, val_ids = torch.arange(200) % 10, torch.arange(40) % 10
    train_img = concepts[train_ids] + 0.5 * torch.randn(200, 16, generator=gen)
    val_img = concepts[val_ids] + 0.5 * torch.randn(40, 16, generator=gen)
    nearest = prior_metrics(nearest_caption_prior(concepts[train_ids], train_img, concepts[val_ids]), val_img)
    mean = prior_metrics(mean_embedding_prior(train_img, 40), val_img)
    oracle = prior_metrics(concepts[val_ids], val_img)
    assert oracle.mean_cosine > nearest.mean_cosine > mean.mean_cosine
    assert oracle.mean_rank < mean.mean_rank
