"""Run configuration: YAML recipe + key=value overrides, ${ENV} expansion and one-sentence validation errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from medda.config import RunConfig, apply_overrides, flatten, load_config, reference_markdown
from medda.errors import MeddaError

RECIPE = """\
data:
  card: cards/site.yaml
  train:
    path: ${MEDDA_TEST_ROOT}/site_a
    split: training
  patch_size: [32, 32, 16]
model:
  channels: [8, 16, 32]
train:
  iterations: 50
"""


@pytest.fixture
def recipe(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("MEDDA_TEST_ROOT", "/data/root")
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE)
    return path


def test_yaml_values_and_defaults(recipe):
    cfg = load_config(recipe)
    assert isinstance(cfg, RunConfig)
    assert cfg.data.patch_size == [32, 32, 16]
    assert cfg.model.channels == [8, 16, 32]
    assert cfg.train.iterations == 50
    assert cfg.train.batch_size == 2  # default kept
    assert cfg.data.train.split == "training"


def test_overrides_nested_and_yaml_typed(recipe):
    cfg = load_config(
        recipe,
        [
            "train.iterations=7",
            "optim.lr=2e-4",
            "data.augment=false",
            "data.spacing=[1.5, 1.5, 3]",
            "data.val={path: /v, split: validation}",
            "tracking.run_name=null",
            "method.options.pretrain_iterations=3",
            "inference.roi_size=",  # empty value -> None
        ],
    )
    assert cfg.train.iterations == 7 and isinstance(cfg.train.iterations, int)
    assert cfg.optim.lr == pytest.approx(2e-4)
    assert cfg.data.augment is False
    assert cfg.data.spacing == [1.5, 1.5, 3.0]
    assert cfg.data.val.path == Path("/v") and cfg.data.val.split == "validation"
    assert cfg.tracking.run_name is None
    assert cfg.method.options == {"pretrain_iterations": 3}
    assert cfg.inference.roi_size is None
    # later overrides win, untouched siblings survive
    cfg = load_config(recipe, ["train.iterations=1", "train.iterations=2"])
    assert cfg.train.iterations == 2 and cfg.data.train.split == "training"


def test_override_refuses_malformed_items():
    with pytest.raises(MeddaError, match="not of the form key=value"):
        apply_overrides({}, ["train.iterations"])
    with pytest.raises(MeddaError, match="'card', which is not a section"):
        apply_overrides({"data": {"card": "x.yaml"}}, ["data.card.name=1"])


def test_env_expansion(recipe, monkeypatch):
    cfg = load_config(recipe)
    assert cfg.data.train.path == Path("/data/root/site_a")
    monkeypatch.setenv("MEDDA_TEST_ROOT", "/elsewhere")
    assert load_config(recipe).data.train.path == Path("/elsewhere/site_a")
    # overrides are expanded too
    cfg = load_config(recipe, ["data.test={path: '${MEDDA_TEST_ROOT}/t'}"])
    assert cfg.data.test.path == Path("/elsewhere/t")


def test_unset_env_variable_is_a_clear_error(recipe, monkeypatch):
    monkeypatch.delenv("MEDDA_TEST_ROOT")
    with pytest.raises(MeddaError) as err:
        load_config(recipe)
    message = str(err.value)
    assert str(recipe) in message
    assert "MEDDA_TEST_ROOT" in message and "not set" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("override", "field"),
    [("data.trian=1", "data.trian"), ("model.foo.bar=1", "model.foo"), ("colour=red", "colour")],
)
def test_unknown_key_names_the_field(recipe, override, field):
    with pytest.raises(MeddaError) as err:
        load_config(recipe, [override])
    message = str(err.value)
    assert f"field '{field}' is not a known setting" in message
    assert message.startswith(str(recipe))


def test_wrong_type_names_field_and_value(recipe):
    with pytest.raises(MeddaError, match=r"field 'train.iterations'.*'abc'"):
        load_config(recipe, ["train.iterations=abc"])
    with pytest.raises(MeddaError, match=r"field 'train.iterations'"):
        load_config(recipe, ["train.iterations=0"])  # ge=1


def test_patch_size_length_follows_mode(recipe):
    with pytest.raises(MeddaError, match=r"patch_size needs 2 values in 2d mode"):
        load_config(recipe, ["data.mode=2d"])
    with pytest.raises(MeddaError, match=r"patch_size needs 3 values in 3d mode"):
        load_config(recipe, ["data.patch_size=[32, 32]"])
    with pytest.raises(MeddaError, match=r">= 4 voxels"):
        load_config(recipe, ["data.patch_size=[32, 2, 16]"])
    cfg = load_config(recipe, ["data.mode=2d", "data.patch_size=[48, 40]"])
    assert cfg.data.mode == "2d" and cfg.data.patch_size == [48, 40]


def test_missing_and_invalid_files(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(MeddaError) as err:
        load_config(missing)
    assert str(err.value) == f"{missing}: config file not found"
    broken = tmp_path / "broken.yaml"
    broken.write_text("data: [unclosed\n")
    with pytest.raises(MeddaError, match=r"broken.yaml: not valid YAML"):
        load_config(broken)
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(MeddaError, match="mapping"):
        load_config(listing)


def test_required_section_and_base(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(MeddaError, match="field 'data' is required"):
        load_config(empty)
    # `base` supplies defaults that the recipe and overrides refine (as `medda predict` does)
    cfg = load_config(
        None, ["data.patch_size=[16,16,8]"], {"data": {"card": "c.yaml"}, "tracking": {"enabled": False}}
    )
    assert (
        cfg.data.card == Path("c.yaml")
        and cfg.tracking.enabled is False
        and cfg.data.patch_size == [16, 16, 8]
    )


def test_digest_tracks_content(recipe):
    a, b = load_config(recipe), load_config(recipe)
    assert a.digest() == b.digest() and len(a.digest()) == 12
    assert load_config(recipe, ["train.seed=1"]).digest() != a.digest()
    flat = flatten(a.model_dump(mode="json"))
    assert flat["train.iterations"] == 50 and flat["data.patch_size"] == [32, 32, 16]


def test_amp_off_survives_yaml(tmp_path):
    """`off` is YAML 1.1 for false: `train.amp=off` and `amp: off` must still mean float32."""
    assert load_config(None, ["data.card=c.yaml", "train.amp=off"]).train.amp == "off"
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data: {card: c.yaml}\ntrain:\n  amp: off\n")
    assert load_config(recipe).train.amp == "off"
    assert load_config(recipe, ["train.amp=bf16"]).train.amp == "bf16"
    with pytest.raises(MeddaError, match=r"field 'train.amp'"):
        load_config(recipe, ["train.amp=on"])


def test_readme_configuration_reference_lists_every_setting():
    """README 'Configuration' is generated from the pydantic fields (medda.config.reference_markdown)."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    assert reference_markdown() in readme, "README's configuration table is stale: paste reference_markdown()"


def test_readme_method_options_match_the_method_configs():
    from medda.registry import options_markdown

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    assert options_markdown() in readme, "README's method options are stale: paste medda.registry.options_markdown()"


SHIPPED = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_recipe_validates(path, monkeypatch):
    """Each recipe in configs/ loads, names a registered method with valid options, and a card that validates (a
    typo in a benchmark recipe would otherwise surface only on real data, minutes into a run)."""
    from medda.config import validate
    from medda.data.cards import load_card
    from medda.registry import get_method

    monkeypatch.setenv("MEDDA_DATA_ROOT", "/data")
    monkeypatch.chdir(path.parent.parent)  # recipes name cards relative to the repository root
    cfg = load_config(path)
    cls = get_method(cfg.method.name)
    validate(cls.Config, cfg.method.options, f"{path.name}: method.options")
    load_card(cfg.data.card)
