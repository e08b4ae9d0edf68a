import pytest

from fedgen import config as C


def test_presets_validate_and_cover_the_paper_settings():
    for name in C.PRESETS:
        cfg = C.load(name)
        assert cfg.name == name
        assert C.PRESETS[name]["description"]
    paper = C.load("paper-cifar10")
    assert (paper.fl.rounds, paper.fl.local_epochs, paper.fl.clients, paper.fl.k) == (300, 5, 10, 10)
    assert (paper.train.batch_size, paper.train.lr, paper.diffusion.timesteps) == (512, 2e-4, 300)
    assert paper.data.image_size == 32 and paper.data.hflip and paper.data.beta == 0.5
    assert C.load("paper-cifar10-beta0.1").data.beta == 0.1
    assert C.load("paper-cifar10-beta5").data.beta == 5.0
    n50 = C.load("paper-fmnist-n50").fl
    assert (n50.clients, n50.k) == (50, 10)
    assert C.load("paper-fmnist-e10").fl.local_epochs == 10
    assert C.load("paper-fmnist-centralized").fl.centralized
    ct = C.load("paper-ct")
    assert (ct.data.dataset, ct.data.image_size, ct.train.batch_size) == ("image-folder", 64, 128)


def test_toml_file_then_overrides(tmp_path):
    path = tmp_path / "my.toml"
    path.write_text('[data]\ndataset = "image-folder"\nbeta = 0.3\n[fl]\nrounds = 7\n')
    cfg = C.load(config_path=path, overrides=["fl.rounds=20", "data.beta=0.1", "model.arch=tiny",
                                              "data.path=/some/where", "fl.clients_per_round=none"])
    assert cfg.data.dataset == "image-folder"
    assert cfg.fl.rounds == 20 and cfg.data.beta == 0.1 and cfg.model.arch == "tiny"
    assert cfg.data.path == "/some/where" and cfg.fl.clients_per_round is None


def test_save_and_read_round_trip(tmp_path):
    cfg = C.load("tiny", overrides=["fl.rounds=3"])
    C.save(cfg, tmp_path / "c.toml")
    assert C.read(tmp_path / "c.toml") == cfg
    assert C.diff(cfg, C.load("tiny")) == {"fl.rounds": (3, 2)}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["fl.roundz=3"], "fl.roundz: unknown key"),
        (["data.beta=0"], "data.beta: Input should be greater than 0"),
        (["data.dataset=imagenet"], "data.dataset"),
        (["fl.rounds=abc"], "fl.rounds"),
        (["fl.clients=5", "fl.clients_per_round=6"], "fl.clients_per_round (6) exceeds fl.clients (5)"),
        (["nonsense"], "--set expects key=value"),
    ],
)
def test_bad_config_names_the_field(overrides, message):
    with pytest.raises(C.ConfigError) as exc:
        C.load("tiny", overrides=overrides)
    assert message in str(exc.value)


def test_unknown_preset_and_missing_file(tmp_path):
    with pytest.raises(C.ConfigError, match="unknown preset 'nope'; available: smoke, tiny, fmnist-quick"):
        C.load("nope")
    with pytest.raises(C.ConfigError, match="not found"):
        C.load(config_path=tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[fl\nrounds=")
    with pytest.raises(C.ConfigError, match="not valid TOML"):
        C.load(config_path=bad)


def test_values_of_the_wrong_type_are_refused_not_coerced(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[fl]\nrounds = "3"\n')
    with pytest.raises(C.ConfigError, match="fl.rounds: Input should be a valid integer"):
        C.load("tiny", config_path=path)
    with pytest.raises(C.ConfigError, match="fl.rounds: Input should be a valid integer"):
        C.load("tiny", overrides=["fl.rounds=abc"])
    path.write_text('[train]\nbf16 = "yes"\n')
    with pytest.raises(C.ConfigError, match="train.bf16: Input should be a valid boolean"):
        C.load("tiny", config_path=path)
    # text fields take --set values as text
    assert C.load("tiny", overrides=["description=2024"]).description == "2024"
    assert C.load("tiny", overrides=["train.lr=1"]).train.lr == 1.0  # an integer is a valid float


@pytest.mark.parametrize(("preset", "override", "message"), [
    ("tiny", "data.path=/some/where", "data.path: data.dataset=digits is bundled with scikit-learn"),
    ("tiny", "pga.width=8", "pga.width: used only by algorithm=pga"),
    ("pga-smoke", "diffusion.timesteps=10", "diffusion.timesteps: used only by algorithm=feddm"),
    ("pga-smoke", "train.ema_decay=0.9", "train.ema_decay: used only by algorithm=feddm"),
    ("tiny", "fl.prox_mu=0.1", "fl.prox_mu: used only with fl.strategy=fedprox"),
    ("tiny", "fl.server_momentum=0.5", "fl.server_momentum: used only with fl.strategy=fedavgm"),
])
def test_a_setting_the_run_would_ignore_is_an_error(preset, override, message):
    with pytest.raises(C.ConfigError, match="settings this run would ignore") as caught:
        C.load(preset, overrides=[override])
    assert message in str(caught.value)
    key = override.split("=")[0]
    default = C.flatten(C.Config().model_dump(mode="json"))[key]
    C.load(preset, overrides=[f"{key}={'none' if default is None else default}"])  # its default is no setting
