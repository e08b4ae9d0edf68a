"""PGA: the discriminator zoo, the party step, the three aggregation modes, what crosses the wire, and whole runs
in-process and on Flower's simulation engine."""

import io
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file
from typer.testing import CliRunner

from fedgen import config as C
from fedgen.algorithms.pga.coordinator import PGA
from fedgen.algorithms.pga.silo import PGASilo
from fedgen.cli import app
from fedgen.core.records import Failure, Reply, Request
from fedgen.data.silos import SiloData
from fedgen.federation.rundir import RunDir
from fedgen.nn.diffaugment import diff_augment
from fedgen.nn.gan import DISCRIMINATORS, ConditionalGenerator, build_discriminator
from fedgen.runtimes.local import train

QUIET = Console(file=io.StringIO())


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (1, 8, 8)])
def test_generator_and_every_discriminator_kind(shape):
    g = ConditionalGenerator(shape, 10, z_dim=16, width=8)
    x = g(torch.randn(4, 16), torch.arange(4))
    assert x.shape == (4, *shape) and x.min() >= -1 and x.max() <= 1
    sizes = {}
    for kind in DISCRIMINATORS:
        d = build_discriminator(kind, shape, 10)
        assert d(x, torch.arange(4)).shape == (4,)
        sizes[kind] = sum(p.numel() for p in d.parameters())
        layer_kinds = {type(m).__name__ for m in d.modules()}
        assert ("Conv2d" in layer_kinds) == (kind != "mlp")
    assert len(set(sizes.values())) == len(DISCRIMINATORS)  # five different architectures
    for kind in DISCRIMINATORS:  # the auxiliary-classifier variant: the image alone in, 1 + K logits out
        d = build_discriminator(kind, shape, 10, auxiliary=True)
        out = d(x, torch.arange(4))
        assert out.shape == (4, 11)
        torch.testing.assert_close(d(x, torch.zeros(4, dtype=torch.long)), out)  # the label is not an input


def _party(noise_ratio=0.5, kind="dcgan", n=64, loss="gan", extra=()):
    cfg = C.load("pga-smoke", overrides=[f"pga.noise_ratio={noise_ratio}", f'pga.discriminators=["{kind}"]',
                                         "pga.steps_per_round=1000", f"pga.loss={loss}", *extra])
    gen = torch.Generator().manual_seed(0)
    data = SiloData(torch.rand(n, 1, 8, 8, generator=gen) * 2 - 1, torch.randint(10, (n,), generator=gen))
    return cfg, PGASilo(cfg, 0, data, [str(k) for k in range(10)], torch.device("cpu"))


def _batch(b=16, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return {"fake1": torch.rand(b, 1, 8, 8, generator=gen) * 2 - 1, "labels1": torch.randint(10, (b,), generator=gen),
            "fake2": torch.rand(b, 1, 8, 8, generator=gen) * 2 - 1, "labels2": torch.randint(10, (b,), generator=gen)}


def test_party_step_is_the_protocol():
    """d_i = BCE(D(fake1), 0) before the discriminator's step; g_i = BCE(D'(fake2), 1) with the updated D'; the
    gradient is dg_i/dfake2; without noise g_noised == g."""
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    _, party = _party(noise_ratio=0.0)
    batch = _batch()
    before = {k: v.clone() for k, v in party.d.state_dict().items()}
    party.d.train()
    with torch.no_grad():
        d_expected = float(bce(party.d(batch["fake1"], batch["labels1"]), torch.zeros(16)))
    party.d.load_state_dict(before)
    reply = party.handle(Request(0, "pga-step", {"batch": batch}, {"round": 0, "step": 0, "want_grad": True}))
    assert reply.config["d"] == pytest.approx(d_expected, rel=1e-6)
    assert any(not torch.equal(before[k], v) for k, v in party.d.state_dict().items())  # D took its step
    fake2 = batch["fake2"].clone().requires_grad_(True)
    g = bce(party.d(fake2, batch["labels2"]), torch.ones(16))
    (grad,) = torch.autograd.grad(g, fake2)
    assert reply.config["g"] == pytest.approx(float(g.detach()), rel=1e-6)
    assert reply.config["g_noised"] == reply.config["g"]
    torch.testing.assert_close(reply.arrays["grad"]["fake2"], grad)
    no_grad = party.handle(Request(0, "pga-step", {"batch": batch}, {"round": 0, "step": 1, "want_grad": False}))
    assert no_grad.arrays == {}


def test_acgan_party_step_adds_the_auxiliary_classifier():
    """With pga.loss=acgan: d_i = BCE(D(fake1)[0], 0) (no classification of fakes); g_i = BCE(D'(fake2)[0], 1) +
    CE(D'(fake2)[1:], labels2); the discriminator's step also trains the classifier on the real batch."""
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    ce = torch.nn.functional.cross_entropy
    _, party = _party(noise_ratio=0.0, loss="acgan")
    batch = _batch()
    party.d.train()
    with torch.no_grad():
        d_expected = float(bce(party.d(batch["fake1"], batch["labels1"])[:, 0], torch.zeros(16)))
    reply = party.handle(Request(0, "pga-step", {"batch": batch}, {"round": 0, "step": 0, "want_grad": True}))
    assert reply.config["d"] == pytest.approx(d_expected, rel=1e-6)
    fake2 = batch["fake2"].clone().requires_grad_(True)
    out = party.d(fake2, batch["labels2"])
    adversarial, classification = bce(out[:, 0], torch.ones(16)), ce(out[:, 1:], batch["labels2"])
    (grad,) = torch.autograd.grad(adversarial + classification, fake2)
    assert reply.config["g"] == pytest.approx(float(adversarial + classification), rel=1e-6)
    assert float(classification) > 0.1  # the classifier's term is a real part of g_i
    torch.testing.assert_close(reply.arrays["grad"]["fake2"], grad)
    def classifier_loss():  # the auxiliary classifier on the party's own real images
        party.d.eval()
        with torch.no_grad():
            return float(ce(party.d(party.data.images, party.data.labels)[:, 1:], party.data.labels))

    before = classifier_loss()
    for step in range(1, 30):
        party.handle(Request(0, "pga-step", {"batch": batch}, {"round": 0, "step": step, "want_grad": False}))
    assert classifier_loss() < 0.8 * before  # the discriminator's steps train the classifier on real labels


def test_diffaugment_shifts_and_cuts_out_each_image_from_its_generator():
    """Translation moves every pixel by one shift per image (zeros enter at the border); cutout zeroes one
    (H/2 x W/2) square per image, clipped at the border; the same generator state gives the same images; the
    gradient reaches exactly the input pixels that stay visible."""
    n, h, w = 64, 16, 16
    x = (torch.arange(n * h * w, dtype=torch.float64).view(n, 1, h, w) + 1)  # every value distinct and non-zero
    out = diff_augment(x, torch.Generator().manual_seed(3))
    torch.testing.assert_close(out, diff_augment(x, torch.Generator().manual_seed(3)))
    assert not torch.equal(out, diff_augment(x, torch.Generator().manual_seed(4)))
    shifts, cut = set(), []
    for k in range(n):
        kept = out[k, 0] != 0
        source = (out[k, 0][kept] - 1 - k * h * w).long()  # where each visible value came from
        rows, cols = torch.nonzero(kept, as_tuple=True)
        dr, dc = source // w - rows, source % w - cols
        assert len(set(dr.tolist())) == 1 and len(set(dc.tolist())) == 1  # one shift for the whole image
        shifts.add((int(dr[0]), int(dc[0])))
        assert max(abs(int(dr[0])), abs(int(dc[0]))) <= 2  # 1/8 of 16
        # the zeros are the border strips the shift brought in, plus the cutout: one square of at most 8 x 8
        r, c = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        from_inside = (r + dr[0] >= 0) & (r + dr[0] < h) & (c + dc[0] >= 0) & (c + dc[0] < w)
        rr, cc = torch.nonzero(~kept & from_inside, as_tuple=True)
        assert len(rr) >= 4  # at least the quarter of a 4 x 4 corner square left beside a strip
        assert int(rr.max() - rr.min()) + 1 <= 8 and int(cc.max() - cc.min()) + 1 <= 8
        assert len(rr) == (int(rr.max() - rr.min()) + 1) * (int(cc.max() - cc.min()) + 1)  # a full rectangle
        cut.append(len(rr))
    assert len(shifts) > 10  # the shifts vary across images (25 possible)
    assert np.median(cut) >= 32  # mostly whole 8 x 8 squares, clipped only near the border
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(diff_augment(xg, torch.Generator().manual_seed(3)).sum(), xg)
    assert int(grad.sum()) == int((out != 0).sum())  # each visible output pixel is one input pixel, weight 1


def test_spectral_norm_bounds_every_layer_of_the_discriminator():
    """After the power iteration has converged, each convolution and linear layer's effective weight has largest
    singular value 1 (reshaped to a matrix, as Miyato et al. normalise it); without the option it does not."""
    torch.manual_seed(0)
    x = torch.rand(8, 1, 28, 28) * 2 - 1
    for kind in DISCRIMINATORS:
        d = build_discriminator(kind, (1, 28, 28), 10, auxiliary=True, spectral_norm=True)
        d.train()
        for _ in range(200):
            d(x, torch.zeros(8, dtype=torch.long))
        layers = [m for m in d.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)]
        assert layers and all(hasattr(m, "parametrizations") for m in layers)
        for m in layers:
            assert torch.linalg.matrix_norm(m.weight.detach().flatten(1), ord=2) == pytest.approx(1.0, abs=2e-3)
    plain = build_discriminator("dcgan", (1, 28, 28), 10)
    norms = [float(torch.linalg.matrix_norm(m.weight.detach().flatten(1), ord=2)) for m in plain.modules()
             if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)]
    assert max(abs(v - 1) for v in norms) > 0.1


def test_party_with_diffaugment_sees_augmented_images_and_returns_their_gradient():
    """With pga.diffaugment every image the discriminator sees (the real batch, both fake batches) is augmented by
    the step's generator, and the returned gradient is d g_i / d fake2 through the augmentation."""
    from fedgen.core.seeding import generator

    bce = torch.nn.functional.binary_cross_entropy_with_logits
    cfg, party = _party(noise_ratio=0.0, kind="resnet", extra=["pga.diffaugment=true", "pga.spectral_norm=true"])
    party._bring_to(0, 0, 0)  # the discriminator the step will use (no BatchNorm: eval mode recomputes it exactly)
    seen = []
    party.d.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    batch = _batch()
    reply = party.handle(Request(0, "pga-step", {"batch": batch}, {"round": 0, "step": 0, "want_grad": True}))
    assert len(seen) == 3  # real batch, fake batch 1 (the discriminator's step), fake batch 2 (g_i)
    augment = generator(cfg.train.seed, "pga-augment", 0, 0, 0)
    idx = torch.randint(len(party.data), (16,), generator=generator(cfg.train.seed, "pga-party", 0, 0, 0))
    torch.testing.assert_close(seen[0], diff_augment(party.data.images[idx], augment))
    torch.testing.assert_close(seen[1], diff_augment(batch["fake1"], augment))
    fake2 = batch["fake2"].clone().requires_grad_(True)
    augmented = diff_augment(fake2, augment)
    torch.testing.assert_close(seen[2], augmented.detach())
    party.d.eval()  # spectral norm's power iteration does not step again: the weights g_i was computed with
    g = bce(party.d(augmented, batch["labels2"]), torch.ones(16))
    (grad,) = torch.autograd.grad(g, fake2)
    assert reply.config["g"] == pytest.approx(float(g.detach()), rel=1e-5)
    torch.testing.assert_close(reply.arrays["grad"]["fake2"], grad)


def test_party_loss_noise_has_sd_ratio_times_d():
    """(g_noised - g) / (ratio d_i) over n steps is N(0, 1): its mean within 4/sqrt(n), its variance within
    4 sqrt(2/n) of 1."""
    _, party = _party(noise_ratio=0.5)
    z = []
    for s in range(300):
        rep = party.handle(Request(0, "pga-step", {"batch": _batch(seed=s)}, {"round": 0, "step": s}))
        z.append((rep.config["g_noised"] - rep.config["g"]) / (0.5 * rep.config["d"]))
    z = np.array(z)
    assert abs(z.mean()) < 4 / math.sqrt(len(z)) and abs(z.var() - 1) < 4 * math.sqrt(2 / len(z))


class _FakePool:
    """Parties with fixed answers: g_i, g_noised_i and dg_i/dfake = c_i (a constant image) per party."""

    def __init__(self, answers: dict[int, tuple[float, float, float]], failing: set[int] = frozenset()):
        self.answers = answers
        self.failing = set(failing)  # parties whose node does not answer
        self.requests = []

    def send(self, requests, timeout, progress=None):
        self.requests.extend(requests)
        out = {}
        for q in requests:
            if q.silo in self.failing:
                out[q.silo] = Failure(q.silo, f"no reply from node {q.silo} within 5s")
                continue
            g, noised, c = self.answers[q.silo]
            arrays = {"grad": {"fake2": torch.full_like(q.arrays["batch"]["fake2"], c)}} if q.config["want_grad"] \
                else {}
            out[q.silo] = Reply(q.silo, arrays, {"d": 0.5, "g": g, "g_noised": noised})
        return out


def _rounds(aggregation: str, answers, rho_max=5.0, extra=()):
    cfg = C.load("pga-smoke", overrides=[f"pga.aggregation={aggregation}", f"pga.rho_max={rho_max}", *extra])
    silos = [SimpleNamespace(silo=s) for s in range(3)]
    fed = SimpleNamespace(image_shape=(1, 8, 8), num_classes=10, silos=silos, pool=_FakePool(answers))
    ctx = SimpleNamespace(cfg=cfg, fed=fed, device=torch.device("cpu"), progress=None, model=None,
                          console=Console(file=io.StringIO()), stop_on_fatal=lambda r, replies: None)
    return PGA(ctx), fed.pool


@pytest.mark.parametrize(("aggregation", "scale"), [("ratio", None), ("mean", None), ("literal", None),
                                                    ("ratio", "clamped")])
def test_generator_gradient_per_aggregation_mode(aggregation, scale):
    answers = {0: (0.8, 0.9, 1.0), 1: (0.4, 0.5, 2.0), 2: (1.0, 1.3, 3.0)}
    if scale == "clamped":
        answers = {k: (g, noised * 100, c) for k, (g, noised, c) in answers.items()}
    rounds, pool = _rounds(aggregation, answers)
    seen = {}
    rounds.opt.step = lambda: seen.setdefault("grads", {n: p.grad.clone() for n, p in rounds.g.named_parameters()})
    out = rounds._step(0, 0)
    r = out["representative"]
    asked = {q.silo for q in pool.requests if q.config["want_grad"]}
    assert asked == ({0, 1, 2} if aggregation == "mean" else {r})
    noised_mean = np.mean([a[1] for a in answers.values()])
    if aggregation == "mean":
        c, rho = np.mean([a[2] for a in answers.values()]), 1.0
    else:
        c = answers[r][2]
        rho = 1.0 if aggregation == "literal" else min(max(noised_mean / answers[r][0], 0), 5.0)
    assert out["rho"] == pytest.approx(rho)
    if scale == "clamped":
        assert out["rho"] == 5.0
    # the generator's parameter gradient is that of fake2 with d(loss)/d(fake2) = rho * c everywhere
    import copy

    from fedgen.core.seeding import generator as seeded

    gen = seeded(rounds.cfg.train.seed, "pga-generator", 0, 0)  # the step's draws, in the step's order
    b, zd = rounds.cfg.train.batch_size, rounds.cfg.pga.z_dim
    torch.randn(b, zd, generator=gen)
    z2 = torch.randn(b, zd, generator=gen)
    torch.randint(10, (b,), generator=gen)
    y2 = torch.randint(10, (b,), generator=gen)
    g = copy.deepcopy(rounds.g).train()  # same weights: the optimizer step was held back
    g.zero_grad()
    g(z2, y2).backward(torch.full((b, 1, 8, 8), rho * c))
    for name, p in g.named_parameters():
        torch.testing.assert_close(seen["grads"][name], p.grad, rtol=1e-5, atol=1e-7)


def test_mode_seeking_loss_is_msgan_on_pairs_of_the_batch():
    """1 / (mean |G(z_a) - G(z_b)| / mean |z_a - z_b| + 1e-5) over the pairs (i, i + n/2)."""
    from fedgen.algorithms.pga.coordinator import mode_seeking_loss

    fake = torch.zeros(4, 1, 2, 2)
    fake[2:] = 0.5  # each pair differs by 0.5 in every pixel
    z = torch.zeros(4, 3)
    z[2:, 0] = 3.0  # each pair differs by 3 in one of three coordinates: mean |dz| = 1
    assert float(mode_seeking_loss(fake, z)) == pytest.approx(1 / (0.5 + 1e-5))
    assert float(mode_seeking_loss(torch.zeros(4, 1, 2, 2), z)) == pytest.approx(1e5)  # collapsed: large


def test_mode_seeking_pairs_the_labels_and_adds_its_gradient_to_the_parties():
    """pga.mode_seeking = w: fake batch 2's labels come in pairs (i, i + b/2), and the generator's gradient is the
    parties' (rho * dL/dfake2 backpropagated) plus w times the gradient of the mode-seeking term."""
    import copy

    from fedgen.algorithms.pga.coordinator import mode_seeking_loss
    from fedgen.core.seeding import generator as seeded

    answers = {0: (0.8, 0.9, 1.0), 1: (0.4, 0.5, 2.0), 2: (1.0, 1.3, 3.0)}
    rounds, pool = _rounds("mean", answers, extra=["pga.mode_seeking=0.7"])
    seen = {}
    rounds.opt.step = lambda: seen.setdefault("grads", {n: p.grad.clone() for n, p in rounds.g.named_parameters()})
    rounds._step(0, 0)
    b, zd = rounds.cfg.train.batch_size, rounds.cfg.pga.z_dim
    labels = pool.requests[0].arrays["batch"]["labels2"]
    assert torch.equal(labels[:b // 2], labels[b - b // 2:]) and len(set(labels.tolist())) > 1
    gen = seeded(rounds.cfg.train.seed, "pga-generator", 0, 0)
    torch.randn(b, zd, generator=gen)
    z2 = torch.randn(b, zd, generator=gen)
    g = copy.deepcopy(rounds.g).train()
    g.zero_grad()
    fake2 = g(z2, labels)
    ((fake2 * 2.0).sum() + 0.7 * mode_seeking_loss(fake2, z2)).backward()  # mean of c = 1, 2, 3; rho = 1
    for name, p in g.named_parameters():
        torch.testing.assert_close(seen["grads"][name], p.grad, rtol=1e-5, atol=1e-7)
    plain, _ = _rounds("mean", answers)
    plain.opt.step = lambda: seen.setdefault("plain", {n: p.grad.clone() for n, p in plain.g.named_parameters()})
    plain._step(0, 0)
    assert any(not torch.allclose(seen["plain"][n], seen["grads"][n]) for n in seen["plain"])


@pytest.mark.parametrize("aggregation", ["ratio", "mean", "literal"])
def test_a_failed_representative_skips_the_step_or_is_left_out_of_the_mean(aggregation):
    """The step's representative does not answer: ratio and literal have no gradient to follow, so the step is
    skipped and logged with the reason; mean averages the gradients of the parties that answered."""
    answers = {0: (0.8, 0.9, 1.0), 1: (0.4, 0.5, 2.0), 2: (1.0, 1.3, 3.0)}
    representative = _rounds(aggregation, answers)[0]._step(0, 0)["representative"]
    rounds, pool = _rounds(aggregation, answers)
    pool.failing = {representative}
    stepped = []
    rounds.opt.step = lambda: stepped.append(1)
    out = rounds._step(0, 0)
    assert out["representative"] == representative and representative in out["rejected"]
    others = [p for p in answers if p != representative]
    if aggregation == "mean":
        assert out["skipped"] is None and stepped == [1]
        assert out["g_representative"] == pytest.approx(np.mean([answers[p][0] for p in others]))
    else:
        assert stepped == [] and out["skipped"] == (f"party {representative} (the representative) did not answer: "
                                                    f"no reply from node {representative} within 5s")
    rounds, pool = _rounds(aggregation, answers)
    pool.failing = {representative}
    rounds.ctx.run = SimpleNamespace(committed_rounds=lambda: [])
    record, _ = rounds.round(0)  # the whole round: the step is in its record, the round completes
    assert record["rejected"][str(representative)] == f"no reply from node {representative} within 5s"
    if aggregation == "mean":
        assert record["skipped"] == [] and record["skipped_steps"] == 0
    else:
        assert {"step": 1, "why": out["skipped"]} in record["skipped"]
        assert record["skipped_steps"] == len(record["skipped"]) >= 1


def test_the_representative_is_uniform_over_parties():
    """n steps, 3 parties: each is the representative Binomial(n, 1/3) times; within 4.5 standard deviations."""
    rounds, _ = _rounds("literal", {0: (0.8, 0.9, 1.0), 1: (0.4, 0.5, 2.0), 2: (1.0, 1.3, 3.0)})
    rounds.opt.step = lambda: None
    n = 600
    counts = np.bincount([rounds._step(0, s)["representative"] for s in range(n)], minlength=3)
    sd = math.sqrt(n * (1 / 3) * (2 / 3))
    assert np.all(np.abs(counts - n / 3) < 4.5 * sd), counts
    assert [rounds._step(0, s)["representative"] for s in range(20)] == \
        [rounds._step(0, s)["representative"] for s in range(20)]  # seeded


def test_the_generator_side_sees_no_real_image_and_no_discriminator():
    rounds, pool = _rounds("ratio", {0: (0.8, 0.9, 1.0), 1: (0.4, 0.5, 2.0), 2: (1.0, 1.3, 3.0)})
    rounds._step(0, 0)
    for q in pool.requests:
        assert q.kind == "pga-step" and set(q.arrays) == {"batch"}
        assert set(q.arrays["batch"]) == {"fake1", "labels1", "fake2", "labels2"}  # generated images and labels only
    _, party = _party()
    reply = party.handle(Request(0, "pga-step", {"batch": _batch()}, {"round": 0, "step": 0, "want_grad": True}))
    assert set(reply.arrays) == {"grad"} and set(reply.arrays["grad"]) == {"fake2"}  # no weights, no real data
    assert set(reply.config) == {"d", "g", "g_noised", "real_loss"}


@pytest.fixture(scope="module")
def pga_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("pga") / "run"
    train(C.load("pga-smoke", overrides=["train.cpu_threads=1"]), out, QUIET)
    return out


def test_pga_run_directory_and_resume(pga_run, tmp_path):
    run = RunDir(pga_run)
    records = [r for r in run.read_metrics() if r["event"] == "round"]
    assert [r["round"] for r in records] == [1, 2] and records[0]["steps"] == 5
    assert set(records[0]["d_mean"]) == {"0", "1", "2"} and sum(records[0]["representatives"].values()) == 5
    assert "no formal guarantee" in records[0]["privacy"]
    assert (run.checkpoints / "round_0002" / "optimizer.pt").exists()  # the generator's Adam state
    assert (run.silo_state(1) / "round_0002.pt").exists()  # party 1's discriminator, kept by the party
    assert (run.samples / "final.png").exists()
    ext = tmp_path / "ext"
    train(C.load("pga-smoke", overrides=["train.cpu_threads=1", "fl.rounds=1"]), ext, QUIET)
    train(C.load("pga-smoke", overrides=["train.cpu_threads=1"]), ext, QUIET)
    a = load_file(pga_run / "checkpoints" / "round_0002" / "global.safetensors")
    b = load_file(ext / "checkpoints" / "round_0002" / "global.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)  # resumed = uninterrupted, discriminators included


def test_pga_killed_mid_round_resumes_bit_identically(pga_run, tmp_path, monkeypatch):
    from fedgen.algorithms.pga import silo as party_mod

    real_step = party_mod.PGASilo._step

    def dies_in_round_2(self, request):
        if request.config["round"] == 1 and request.config["step"] == 3 and self.silo == 2:
            raise KeyboardInterrupt  # the process is killed in the middle of round 2
        return real_step(self, request)

    out = tmp_path / "killed"
    monkeypatch.setattr(party_mod.PGASilo, "_step", dies_in_round_2)
    with pytest.raises(KeyboardInterrupt):
        train(C.load("pga-smoke", overrides=["train.cpu_threads=1"]), out, QUIET)
    assert RunDir(out).committed_rounds() == [1]
    monkeypatch.undo()
    train(C.load("pga-smoke", overrides=["train.cpu_threads=1"]), out, QUIET)
    a = load_file(pga_run / "checkpoints" / "round_0002" / "global.safetensors")
    b = load_file(out / "checkpoints" / "round_0002" / "global.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_party_whose_loss_turns_nan_stops_the_run_naming_it(tmp_path, monkeypatch):
    from fedgen.algorithms.pga import silo as party_mod
    from fedgen.federation.loop import TrainingAborted

    real_step = party_mod.PGASilo._step

    def nan_party(self, request):
        reply = real_step(self, request)
        if self.silo == 1 and request.config["round"] == 1:
            reply.config["g"] = float("nan")
        return reply

    monkeypatch.setattr(party_mod.PGASilo, "_step", nan_party)
    out = tmp_path / "nan"
    with pytest.raises(TrainingAborted, match=r"round 2 aborted at generator step 1: party 1's discriminator loss is "
                                              r"NaN/Inf \(g\).*last good checkpoint is round 1"):
        train(C.load("pga-smoke", overrides=["train.cpu_threads=1"]), out, QUIET)
    assert RunDir(out).committed_rounds() == [1]


def test_pga_on_flower_simulation_equals_in_process(pga_run, tmp_path):
    from fedgen.runtimes.flower.simulation import train_simulation

    out = tmp_path / "sim"
    train_simulation(C.load("pga-smoke", overrides=["train.cpu_threads=1", "runtime.sim_cpus=2", "fl.rounds=1"]), out,
                     QUIET)
    a = load_file(pga_run / "checkpoints" / "round_0001" / "global.safetensors")
    b = load_file(out / "checkpoints" / "round_0001" / "global.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_pga_sample_and_evaluate_with_baselines(pga_run, tmp_path, monkeypatch):
    import json

    monkeypatch.setenv("FEDGEN_CACHE", str(tmp_path / "cache"))
    runner = CliRunner()
    done = runner.invoke(app, ["sample", str(pga_run), "--n", "20", "--out", str(tmp_path / "g.png")])
    assert done.exit_code == 0, done.output
    assert "from the generator after round 2" in " ".join(done.output.split())
    bad = runner.invoke(app, ["sample", str(pga_run), "--sampler", "ddim", "--out", str(tmp_path / "x.png")])
    assert bad.exit_code == 1 and "for diffusion runs" in bad.output
    done = runner.invoke(app, ["evaluate", str(pga_run), "--n", "100", "--tstr", "--tstr-samples", "300"])
    assert done.exit_code == 0, done.output
    record = json.loads((pga_run / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["sampler"] == "gan" and record["tstr_generated"] == 300
    assert set(record["local_real_accuracy"]) == {"0", "1", "2"}
    assert record["local_real_accuracy_mean"] == pytest.approx(np.mean(list(record["local_real_accuracy"].values())))
    assert record["real_train_real_test_accuracy"] > record["local_real_accuracy_mean"] - 0.05


@pytest.mark.parametrize(("overrides", "message"), [
    (['pga.discriminators=["dcgan", "mlp"]'], "give one per party (fl.clients=3) or one for all"),
    (['pga.discriminators=["vit"]'], "unknown ['vit']"),
    (["fl.clients_per_round=2"], "every party takes part in every step"),
    (["pga.aggregation=median"], "pga.aggregation"),
    (["pga.spectral_norm=true", "privacy.mode=dp-sgd", "privacy.target_epsilon=10"],
     "pga.spectral_norm with privacy.mode=dp-sgd: Opacus computes per-sample gradients"),
])
def test_bad_pga_config_names_the_field(overrides, message):
    with pytest.raises(C.ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        C.load("pga-smoke", overrides=overrides)


def test_an_image_side_the_networks_cannot_take_is_a_clear_error(tmp_path):
    from fedgen.core.errors import UsageError

    with pytest.raises(UsageError, match="image side divisible by 4, got 6x6; set data.image_size"):
        train(C.load("pga-smoke", overrides=["data.image_size=6"]), tmp_path / "r", QUIET)
    assert not (tmp_path / "r" / "config.toml").exists()


def test_generator_average_is_the_warm_up_ema_of_weights_and_batchnorm_statistics():
    from fedgen.algorithms.pga.coordinator import generator_average

    g = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    ema = generator_average(g, 0.9)
    history = []
    for step in range(4):
        with torch.no_grad():
            g[0].weight.fill_(float(step + 1))
        g.train()
        g(torch.tensor([[1.0, 0.0], [0.0, 3.0]]))  # moves the running mean
        history.append((g[0].weight.clone(), g[1].running_mean.clone()))
        ema.update_parameters(g)
    want_w, want_m = history[0]  # the first update copies; then decay min(0.9, (1+n)/(10+n)) at update n
    for n, (w, m) in enumerate(history[1:], start=1):
        d = min(0.9, (1 + n) / (10 + n))
        want_w, want_m = d * want_w + (1 - d) * w, d * want_m + (1 - d) * m
    assert torch.allclose(ema.module[0].weight, want_w, atol=0, rtol=1e-6)
    assert torch.allclose(ema.module[1].running_mean, want_m, atol=0, rtol=1e-6)
    assert not torch.equal(ema.module[0].weight, g[0].weight)


def test_pga_with_a_generator_average_samples_with_it_and_resumes_bit_identically(pga_run, tmp_path):
    from fedgen.runs.load import load_run_model

    sets = ["train.cpu_threads=1", "pga.ema_decay=0.99"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    train(C.load("pga-smoke", overrides=sets), whole, QUIET)
    train(C.load("pga-smoke", overrides=[*sets, "fl.rounds=1"]), split, QUIET)
    train(C.load("pga-smoke", overrides=sets), split, QUIET)
    for name in ("global", "ema"):
        a = load_file(whole / "checkpoints" / "round_0002" / f"{name}.safetensors")
        b = load_file(split / "checkpoints" / "round_0002" / f"{name}.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a)
    # the average changes nothing in training: the generator itself is the one of the run without it
    plain = load_file(pga_run / "checkpoints" / "round_0002" / "global.safetensors")
    generator = load_file(whole / "checkpoints" / "round_0002" / "global.safetensors")
    assert all(torch.equal(plain[k], generator[k]) for k in plain)
    loaded, raw = load_run_model(whole), load_run_model(whole, raw=True)
    assert (loaded.weights, raw.weights) == ("ema", "raw")
    ema = load_file(whole / "checkpoints" / "round_0002" / "ema.safetensors")
    assert all(torch.equal(loaded.model.state_dict()[k], ema[k]) for k in ema)
    assert not torch.equal(loaded.model.state_dict()["body.0.weight"], raw.model.state_dict()["body.0.weight"])


@pytest.mark.parametrize("loss", ["gan", "acgan"])
def test_party_with_hinge_loss_steps_on_the_hinge_and_returns_minus_d(loss):
    """pga.adversarial = "hinge": the discriminator's step minimises mean relu(1 - D(real)) + mean relu(1 + D(fake1))
    (d_i is the second term), and g_i = -mean D'(fake2) (plus the classifier's cross-entropy with acgan), its
    gradient returned. Checked against the same discriminator stepped by hand."""
    extra = ["pga.adversarial=hinge", "pga.aggregation=mean"]
    cfg, party = _party(noise_ratio=0.0, kind="resnet", loss=loss, extra=extra)
    _, twin = _party(noise_ratio=0.0, kind="resnet", loss=loss, extra=extra)
    party._bring_to(0, 0, 0)
    twin._bring_to(0, 0, 0)
    batch = _batch()
    reply = party.handle(Request(0, "pga-step", {"batch": batch}, {"round": 0, "step": 0, "want_grad": True}))

    from fedgen.core.seeding import generator

    idx = torch.randint(len(twin.data), (16,), generator=generator(cfg.train.seed, "pga-party", 0, 0, 0))
    real, real_labels = twin.data.images[idx], twin.data.labels[idx]

    def split(out):
        return (out[:, 0], out[:, 1:]) if loss == "acgan" else (out, None)

    logit_real, cls_real = split(twin.d(real, real_labels))
    logit_fake, _ = split(twin.d(batch["fake1"], batch["labels1"]))
    d_loss = (1 - logit_real).relu().mean() + (1 + logit_fake).relu().mean()
    if loss == "acgan":
        d_loss = d_loss + torch.nn.functional.cross_entropy(cls_real, real_labels)
    twin.opt.zero_grad()
    d_loss.backward()
    twin.opt.step()
    assert reply.config["d"] == pytest.approx(float((1 + logit_fake).relu().mean().detach()), rel=1e-5)
    twin.d.eval()
    party.d.eval()
    for a, b in zip(party.d.parameters(), twin.d.parameters(), strict=True):
        torch.testing.assert_close(a, b)
    fake2 = batch["fake2"].clone().requires_grad_(True)
    logit2, cls2 = split(twin.d(fake2, batch["labels2"]))
    g = -logit2.mean() + (torch.nn.functional.cross_entropy(cls2, batch["labels2"]) if loss == "acgan" else 0)
    (grad,) = torch.autograd.grad(g, fake2)
    assert reply.config["g"] == pytest.approx(float(g.detach()), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(reply.arrays["grad"]["fake2"], grad)


def test_hinge_with_the_ratio_reading_is_refused():
    with pytest.raises(C.ConfigError, match=r"pga.adversarial=hinge with pga.aggregation=ratio: .* \(set "
                                            r"pga.aggregation to mean or literal\)"):
        C.load("pga-smoke", overrides=["pga.adversarial=hinge"])
