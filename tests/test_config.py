"""Config loading: defaults, TOML, overrides, and one clear error for each kind of mistake."""

import pytest

from repulsor.config import Config, from_dict, load_config, parse_override, to_toml
from repulsor.errors import UserError


def write(tmp_path, text):
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


def test_defaults_and_round_trip(tmp_path):
    cfg = load_config()
    assert cfg == Config()
    assert load_config(write(tmp_path, to_toml(cfg))) == cfg


def test_file_and_overrides(tmp_path):
    path = write(tmp_path, '[train]\nlr = 0.2\nepochs = 3\n[eval]\neps = "8/255"\n')
    cfg = load_config(path, ["train.lr=0.05", "model.name=small_cnn", "data.name=mnist", "train.milestones=[2, 3]"])
    assert cfg.train.lr == 0.05 and cfg.train.epochs == 3
    assert cfg.model.name == "small_cnn" and cfg.train.milestones == [2, 3]
    assert cfg.eval.eps == pytest.approx(8 / 255)


def test_int_accepted_for_float():
    assert from_dict({"train": {"lr": 1}}).train.lr == 1.0


@pytest.mark.parametrize(
    "raw, fragment",
    [
        ({"train": {"lrr": 0.1}}, "unknown key train.lrr"),
        ({"trian": {"lr": 0.1}}, "unknown config section [trian]"),
        ({"train": {"epochs": "ten"}}, "train.epochs must be an integer"),
        ({"train": {"epochs": 2.5}}, "train.epochs must be an integer"),
        ({"train": {"lr": "fast"}}, "train.lr must be a number"),
        ({"train": {"channels_last": 1}}, "train.channels_last must be true or false"),
        ({"train": {"epochs": 0}}, "train.epochs = 0 is out of range"),
        ({"train": {"batch_size": -4}}, "train.batch_size = -4 is out of range"),
        ({"train": {"eps": -0.1}}, "train.eps = -0.1 is out of range"),
        ({"eval": {"eps": 8}}, "larger than 1"),
        ({"eval": {"eps": 1.5}}, "larger than 1"),
        ({"train": {"alpha": 3}}, "train.alpha = 3 is larger than 1"),
        # an L1 or L2 radius is bounded by the image box's diameter in its norm (64 coordinates in digits)
        ({"eval": {"norm": "l1", "eps": 65}}, "eval.eps = 65 exceeds the diameter of the image box in l1 (64"),
        ({"eval": {"norm": "l2", "eps": 9}}, "eval.eps = 9 exceeds the diameter of the image box in l2 (8"),
        ({"train": {"eps": "8/0"}}, "cannot read"),
        ({"train": {"method": "magic"}}, "train.method = 'magic' is not one of"),
        ({"model": {"name": "vgg"}}, "model.name = 'vgg' is not one of"),
        ({"data": {"name": "mnist"}, "prototypes": {"dim": 5}}, "prototypes.dim = 5 is smaller than the 10 classes"),
        ({"train": {"milestones": [1, "x"]}}, "must be an integer"),
        ({"train": {"lr": 0.1, "lr_min": 0.2}}, "lr_min"),
        ({"train": 3}, "must be a table"),
        ({"data": {"name": "cifar10"}, "model": {"whiten_directions": 13}},
         "model.whiten_directions = 13 is more than the 12 directions of a 2x2 patch of cifar10"),
        ({"data": {"name": "mnist"}, "model": {"whiten_directions": 5}}, "more than the 4 directions"),
        ({"model": {"whiten_directions": -1}}, "model.whiten_directions = -1 is out of range"),
        ({"data": {"flip": "sometimes"}}, "data.flip = 'sometimes' is not one of"),
        ({"data": {"padding": "edge"}}, "data.padding = 'edge' is not one of"),
        ({"data": {"name": "mnist", "flip": "alternate"}}, "data.flip = 'alternate' has no flips to order"),
        ({"data": {"name": "cifar10", "augment": "none", "flip": "alternate"}}, "has no flips to order"),
        ({"data": {"name": "mnist", "padding": "reflect"}}, "data.padding = 'reflect' has no translations to pad"),
        ({"data": {"name": "cifar10", "crop_padding": 0, "padding": "reflect"}}, "has no translations to pad"),
        ({"data": {"name": "cifar10", "crop_padding": 32, "padding": "reflect"}},
         "data.padding = 'reflect' needs data.crop_padding below the 32-pixel side"),
    ],
)
def test_errors_name_the_problem(raw, fragment):
    with pytest.raises(UserError) as error:
        from_dict(raw)
    assert fragment in str(error.value)
    assert "\n" not in str(error.value)


def test_bad_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    with pytest.raises(UserError, match="not valid TOML"):
        load_config(write(tmp_path, "[train\nlr = "))
    with pytest.raises(UserError, match="is a folder"):
        load_config(tmp_path)


def test_override_syntax():
    assert parse_override("train.lr=0.5") == ("train", "lr", 0.5)
    assert parse_override("data.name=mnist") == ("data", "name", "mnist")
    with pytest.raises(UserError, match="section.key=value"):
        parse_override("lr=0.5")


def test_eps_is_checked_in_its_own_norm():
    """8 is a customary L1 budget and 2 an MNIST L2 one; in L-inf they mean 8/255 mistyped."""
    config = from_dict({"data": {"name": "mnist"}, "eval": {"norm": "l1", "eps": 10},
                        "train": {"norm": "l2", "eps": 2.0, "alpha": 0.5}})
    assert (config.eval.eps, config.train.eps) == (10.0, 2.0)
    with pytest.raises(UserError, match="larger than 1"):
        from_dict({"eval": {"norm": "linf", "eps": 10}})
