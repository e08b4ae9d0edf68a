"""Evaluation: domain features, FID/KID/IS/precision-recall, TSTR, the Inception path and input ranges."""

from unittest import mock

import numpy as np
import pytest
import torch

from fedgen.data.sources import load_dataset
from fedgen.data.transforms import to_tensor
from fedgen.evaluation import generative as G
from fedgen.evaluation.evaluate import labels_like
from fedgen.evaluation.features import RangeError, check_signed_unit_range, domain_extractor
from fedgen.evaluation.inception import InceptionWeightsError, inception_extractor, to_inception_input
from fedgen.evaluation.tstr import tstr_accuracy


@pytest.fixture(scope="module")
def digits_domain(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("FEDGEN_CACHE", str(tmp_path_factory.mktemp("cache")))
    ds = load_dataset("digits")
    extractor, info = domain_extractor(ds, epochs=6, log=lambda m: None)
    yield ds, extractor, info
    mp.undo()


def test_domain_classifier_is_accurate_and_cached(digits_domain):
    ds, extractor, info = digits_domain
    assert info["real_test_accuracy"] > 0.9
    again, info2 = domain_extractor(ds, epochs=6, log=lambda m: pytest.fail("should load from cache"))
    assert info2["real_test_accuracy"] == info["real_test_accuracy"]
    x = to_tensor(ds.test.images[:50])
    torch.testing.assert_close(again.features_and_logits(x)[0], extractor.features_and_logits(x)[0])


def test_fid_and_kid_are_zero_on_itself_and_grow_with_noise(digits_domain):
    ds, extractor, _ = digits_domain
    real = to_tensor(ds.test.images)
    ref, _ = extractor.features_and_logits(real)
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(real.shape, generator=gen)
    half = len(real) // 2
    fids = []
    for sigma in (0.0, 0.1, 0.3, 0.6, 1.0):
        feats, _ = extractor.features_and_logits((real + sigma * noise).clamp(-1, 1))
        fids.append(G.fid(ref, feats))
    assert abs(fids[0]) < 1e-6
    assert all(b > a for a, b in zip(fids, fids[1:], strict=False)), fids
    assert G.kid(ref[:half], ref[:half], subsets=5, subset_size=half)[0] < 0  # unbiased: below 0 on itself


def test_fid_equals_the_closed_form_for_gaussian_features():
    """FID = |m1 - m2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) of the two sets' means and covariances."""
    from scipy import linalg

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(2000, 6, generator=gen, dtype=torch.float64)
    b = torch.randn(1500, 6, generator=gen, dtype=torch.float64) @ torch.diag(torch.tensor([1, 2, 0.5, 1, 1, 3.0],
                                                                                           dtype=torch.float64)) + 0.7
    m1, m2 = a.mean(0).numpy(), b.mean(0).numpy()
    s1, s2 = np.cov(a.numpy(), rowvar=False), np.cov(b.numpy(), rowvar=False)
    closed = ((m1 - m2) ** 2).sum() + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert G.fid(a, b) == pytest.approx(closed, rel=1e-6)


def test_kid_is_unbiased_within_its_standard_error():
    """KID over R independent pairs of Gaussian sets: mean 0 within 4 standard errors when both come from one law,
    positive beyond 4 standard errors when one is shifted by half a standard deviation."""
    gen = torch.Generator().manual_seed(0)
    reps, n, d = 30, 300, 8

    def kids(shift):
        return np.array([G.kid(torch.randn(n, d, generator=gen), torch.randn(n, d, generator=gen) + shift,
                               subsets=1, subset_size=n)[0] for _ in range(reps)])

    same, shifted = kids(0.0), kids(0.5)
    assert abs(same.mean()) < 4 * same.std(ddof=1) / np.sqrt(reps)
    assert shifted.mean() > 4 * shifted.std(ddof=1) / np.sqrt(reps)


def test_precision_recall_and_inception_score_bounds():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(300, 8, generator=gen)
    assert G.precision_recall(a, a) == (1.0, 1.0)
    assert G.precision_recall(a, a + 100) == (0.0, 0.0)
    # fakes collapsed on a quarter of the real support: precise, poor recall
    b = torch.randn(500, 2, generator=gen)
    p, r = G.precision_recall(b, b[b[:, 0] > 0.67])
    assert p == 1.0 and 0.15 < r < 0.4
    uniform = torch.zeros(100, 10)
    assert G.inception_score(uniform)[0] == pytest.approx(1.0, abs=1e-4)
    confident = torch.nn.functional.one_hot(torch.arange(2000) % 10, 10).float() * 50
    assert G.inception_score(confident)[0] == pytest.approx(10.0, rel=0.05)  # random splits of 200: ~uniform marginal


def test_metric_keys_name_the_extractor():
    gen = torch.Generator().manual_seed(0)
    real = {"train": torch.randn(200, 4, generator=gen), "test": torch.randn(200, 4, generator=gen)}
    out = G.generative_metrics("domain", real, torch.randn(200, 4, generator=gen), torch.randn(200, 10))
    assert {"fid_domain_train", "fid_domain_test", "kid_domain_test", "precision_domain_test",
            "recall_domain_test", "is_domain"} <= set(out)
    assert not any("inception" in k for k in out)


def test_tstr_on_real_data_matches_the_real_baseline(digits_domain):
    ds, _, info = digits_domain
    x, y = to_tensor(ds.train.images), torch.from_numpy(ds.train.labels)
    acc = tstr_accuracy(x, y, to_tensor(ds.test.images), torch.from_numpy(ds.test.labels), ds.num_classes, epochs=6)
    assert acc == pytest.approx(info["real_test_accuracy"], abs=0.02)
    shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))]
    chance = tstr_accuracy(x, shuffled, to_tensor(ds.test.images), torch.from_numpy(ds.test.labels),
                           ds.num_classes, epochs=2)
    assert chance < 0.3


def test_tstr_defaults_to_the_training_set_size_and_class_counts(digits_domain, monkeypatch):
    from fedgen import config as C
    from fedgen.evaluation import evaluate as E

    ds, _, _ = digits_domain
    seen = []

    def fake_generate(generator, labels, seed, progress=None, purpose=""):
        seen.append(labels)
        x = to_tensor(ds.train.images[:1]).expand(len(labels), -1, -1, -1)
        return E.Generated(x, labels, 0.0)

    monkeypatch.setattr(E, "generate", fake_generate)
    from fedgen.diffusion.pipeline import DiffusionSampler

    cfg = C.load("tiny")
    generator = DiffusionSampler(torch.nn.Linear(1, 1), cfg.diffusion, (1, 8, 8), None)
    ev = cfg.eval.model_copy(update={"tstr": True, "classifier_epochs": 6})
    record = E.evaluate_model(generator, cfg, ds, ev, log=lambda m: None)
    fid_labels, tstr_labels = seen
    assert torch.bincount(fid_labels, minlength=10).tolist() == np.bincount(ds.test.labels, minlength=10).tolist()
    assert torch.bincount(tstr_labels, minlength=10).tolist() == np.bincount(ds.train.labels, minlength=10).tolist()
    assert record["tstr_generated"] == len(ds.train.labels) and record["generated"] == len(ds.test.labels)
    assert record["domain_classifier"].startswith("domain-digits-1x8x8-") and record["sampler"] == "ddpm"


def test_label_agreement_is_the_domain_classifiers_accuracy_on_the_samples(digits_domain, monkeypatch):
    """A 'generator' that returns the real test images: agreement is the classifier's real test accuracy; with the
    labels rolled by one class, it is the share the classifier puts in the neighbouring class (near zero)."""
    from fedgen import config as C
    from fedgen.diffusion.pipeline import DiffusionSampler
    from fedgen.evaluation import evaluate as E

    ds, extractor, info = digits_domain
    order = np.argsort(ds.test.labels, kind="stable")  # labels_like yields sorted labels: the real images in order
    images = to_tensor(ds.test.images[order])
    shift = {"label": 0}

    def real_as_generated(generator, labels, seed, progress=None, purpose=""):
        return E.Generated(images, (labels + shift["label"]) % 10, 0.0)

    monkeypatch.setattr(E, "generate", real_as_generated)
    cfg = C.load("tiny")
    sampler = DiffusionSampler(torch.nn.Linear(1, 1), cfg.diffusion, (1, 8, 8), None)
    ev = cfg.eval.model_copy(update={"classifier_epochs": 6})
    record = E.evaluate_model(sampler, cfg, ds, ev, log=lambda m: None)
    assert record["label_agreement_domain"] == pytest.approx(info["real_test_accuracy"], abs=1e-9)
    shift["label"] = 1
    assert E.evaluate_model(sampler, cfg, ds, ev, log=lambda m: None)["label_agreement_domain"] < 0.1


def test_generated_labels_follow_the_real_class_counts():
    labels = np.array([0] * 50 + [1] * 30 + [2] * 20)
    assert torch.bincount(labels_like(labels, 100, 3)).tolist() == [50, 30, 20]
    assert torch.bincount(labels_like(labels, 10, 3)).tolist() == [5, 3, 2]
    assert len(labels_like(labels, 7, 3)) == 7


# ---------------------------------------------------------------- input ranges (the paper's uint8 bug)


def test_domain_extractor_refuses_uint8_and_out_of_range(digits_domain):
    _, extractor, _ = digits_domain
    with pytest.raises(RangeError, match="float images"):
        extractor.features_and_logits(torch.zeros(2, 1, 8, 8, dtype=torch.uint8))
    with pytest.raises(RangeError, match=r"in \[-1, 1\], got values in \[255.000, 255.000\]"):
        check_signed_unit_range(torch.full((1, 1, 4, 4), 255.0))


def test_inception_input_maps_signed_unit_range_to_full_uint8():
    x = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0]).view(1, 1, 1, 5)
    u8 = to_inception_input(x)
    assert u8.dtype == torch.uint8 and u8.shape == (1, 3, 1, 5)
    assert u8[0, 0, 0].tolist() == [0, 64, 128, 191, 255]
    # the bug this guards against: casting [-1, 1] straight to uint8 keeps 0/1 and wraps -1 to 255
    assert x.to(torch.uint8)[0, 0, 0].tolist() != u8[0, 0, 0].tolist()
    with pytest.raises(RangeError):
        to_inception_input(torch.zeros(1, 3, 4, 4, dtype=torch.uint8))


# ---------------------------------------------------------------- the Inception path


@pytest.fixture(scope="module")
def random_inception_weights(tmp_path_factory):
    from fedgen.evaluation.inception import _inception_class

    cls = _inception_class()

    class RandomInit(cls):
        def load_state_dict(self, *args, **kwargs):  # keep the random initialisation
            return None

    torch.manual_seed(0)
    with mock.patch("torch.load", return_value={}):  # nothing to load: keep the random initialisation
        net = RandomInit("inception-v3-compat", ["2048"], feature_extractor_weights_path="unused")
    path = tmp_path_factory.mktemp("weights") / "inception-random.pth"
    torch.save(net.state_dict(), path)
    return path


def test_inception_weights_hash_refused_and_accepted(random_inception_weights):
    with pytest.raises(InceptionWeightsError, match="does not match the FID Inception weights"):
        inception_extractor(random_inception_weights)
    with pytest.raises(InceptionWeightsError, match="not found"):
        inception_extractor(random_inception_weights.with_name("missing.pth"))
    # only the file whose full SHA-256 is the standard weights' digest is accepted (a matching 8-digit prefix is not)
    from fedgen.evaluation import inception as inception_mod

    assert inception_mod.INCEPTION_SHA256 == "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
    with mock.patch.object(inception_mod, "sha256_of", return_value="6726825d" + "0" * 56), \
            pytest.raises(InceptionWeightsError, match="does not match"):
        inception_extractor(random_inception_weights)
    with mock.patch.object(inception_mod, "sha256_of", return_value=inception_mod.INCEPTION_SHA256):
        extractor = inception_extractor(random_inception_weights)
    assert extractor.name == "inception"
    seen = []
    extractor.module.net.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    images = torch.linspace(-1, 1, 2 * 16 * 16).view(2, 1, 16, 16)
    feats, logits = extractor.features_and_logits(images)
    assert feats.shape == (2, 2048) and logits.shape == (2, 1008)
    assert seen[0].dtype == torch.uint8 and seen[0].shape == (2, 3, 16, 16)
    assert seen[0].min().item() == 0 and seen[0].max().item() == 255


def test_domain_classifier_cache_is_keyed_by_recipe(digits_domain):
    ds, _, info = digits_domain  # its 6-epoch classifier is in the cache this uses
    trained = []
    _, other = domain_extractor(ds, epochs=1, log=trained.append)
    assert trained and other["cache_key"] != info["cache_key"]  # other epochs: trained anew, not the cached one
    assert other["epochs"] == 1 and other["seed"] == 0  # the seed is the recipe's, never a run's
