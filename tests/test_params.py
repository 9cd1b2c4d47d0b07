import pytest
import yaml
from conftest import ROOT

from imgclf.data.sources import check_source
from imgclf.params import ParamsError, load_params, params_from_dict


def committed() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_committed_params_load_with_documented_defaults():
    params = load_params(ROOT / "params.yaml")
    assert params.data.source == "tfds" and params.data.name == "tf_flowers"
    assert (params.split.train, params.split.val, params.split.test) == (0.70, 0.15, 0.15)
    assert params.model.backbone == "efficientnetb0" and params.model.image_size == 352
    assert params.head.learning_rate == pytest.approx(1e-3)
    assert params.finetune.learning_rate == pytest.approx(3e-4)


def with_value(section, key, value) -> dict:
    raw = committed()
    raw[section][key] = value
    return raw


@pytest.mark.parametrize("section,key,value,expected", [
    ("model", "backbone", "vgg16", "model.backbone: 'vgg16' is not allowed; choose one of: efficientnetb0"),
    ("data", "source", "s3", "data.source: 's3' is not allowed"),
    ("model", "weights", "random", "model.weights"),
    ("data", "max_per_class", -1, "data.max_per_class: must be >= 0"),
    ("finetune", "unfreeze_layers", -3, "finetune.unfreeze_layers: must be >= 0"),
    ("train", "batch_size", 0, "train.batch_size: must be > 0"),
    ("train", "batch_size", "big", "train.batch_size: must be an integer"),
    ("head", "cache_features", "yes", "head.cache_features: must be true or false"),
    ("export", "quantization", "int4", "export.quantization"),
    ("finetune", "cached_views", 0, "finetune.cached_views: must be >= 1"),
    ("finetune", "mixup", -0.2, "finetune.mixup: must be >= 0"),
    ("finetune", "lr_schedule", "step", "finetune.lr_schedule: 'step' is not allowed; choose one of: cosine"),
    ("finetune", "warmup_epochs", -1, "finetune.warmup_epochs: must be >= 0"),
    ("baseline", "filters", [], "baseline.filters: must be a non-empty list"),
    ("baseline", "lr_schedule", "step", "baseline.lr_schedule: 'step' is not allowed; choose one of: cosine"),
    ("baseline", "stem_stride", 3, "baseline.stem_stride: must be 1 or 2"),
    ("augment", "crop", 1.0, "augment.crop: must be in [0, 1)"),
    ("split", "val", 1.5, "split.val: must be a fraction in (0, 1)"),
])
def test_bad_values_name_the_key_and_what_is_allowed(section, key, value, expected):
    with pytest.raises(ParamsError) as info:
        params_from_dict(with_value(section, key, value))
    assert expected in str(info.value)


def test_split_fractions_must_sum_to_one():
    with pytest.raises(ParamsError, match=r"split: train \+ val \+ test must sum to 1"):
        params_from_dict(with_value("split", "train", 0.8))


def test_unknown_key_is_rejected():
    with pytest.raises(ParamsError, match=r"model.backbon: unknown key"):
        params_from_dict(with_value("model", "backbon", "resnet50"))


def test_scientific_notation_learning_rate_is_a_number():
    raw = committed()
    raw["finetune"]["learning_rate"] = "1e-5"
    assert params_from_dict(raw).finetune.learning_rate == pytest.approx(1e-5)


def test_missing_folder_is_reported_with_its_key(tmp_path):
    params = params_from_dict(with_value("data", "source", "folder"))
    raw = committed()
    raw["data"].update(source="folder", path=str(tmp_path / "nope"))
    with pytest.raises(ParamsError, match=r"data.path: folder not found: .*nope"):
        check_source(params_from_dict(raw).data, tmp_path)
    assert params.data.path == "inputs"


def test_empty_class_folder_is_rejected_before_work(tmp_path):
    (tmp_path / "photos" / "cats").mkdir(parents=True)
    (tmp_path / "photos" / "dogs").mkdir()
    (tmp_path / "photos" / "dogs" / "a.jpg").write_bytes(b"x")
    raw = committed()
    raw["data"].update(source="folder", path="photos")
    with pytest.raises(ValueError, match="empty class folder.*cats"):
        check_source(params_from_dict(raw).data, tmp_path)


def test_missing_archive_is_reported(tmp_path):
    raw = committed()
    raw["data"].update(source="url", path="flowers.tgz")
    with pytest.raises(ParamsError, match="data.path: archive not found"):
        check_source(params_from_dict(raw).data, tmp_path)


def test_flat_params_for_tracking():
    flat = load_params(ROOT / "params.yaml").flat()
    assert flat["model.backbone"] == "efficientnetb0"
    assert flat["baseline.filters"] == [32, 64, 128, 256]


@pytest.mark.parametrize("section,key", [("finetune", "patience"), ("train", "tta"), ("data", "sha256")])
def test_a_key_missing_from_params_yaml_is_an_error_naming_it(section, key):
    raw = committed()
    del raw[section][key]
    with pytest.raises(ParamsError, match=rf"params.yaml: {section}.{key}: missing"):
        params_from_dict(raw)


def test_a_missing_section_or_seed_is_an_error_naming_it():
    raw = committed()
    del raw["gradcam"]
    with pytest.raises(ParamsError, match=r"params.yaml: gradcam: missing"):
        params_from_dict(raw)
    raw = committed()
    del raw["seed"]
    with pytest.raises(ParamsError, match=r"params.yaml: seed: missing"):
        params_from_dict(raw)


def test_the_dataclasses_hold_no_defaults():
    """params.yaml is the one source of defaults: no second copy in the code."""
    import dataclasses

    from imgclf import params as module

    for name in dir(module):
        cls = getattr(module, name)
        if isinstance(cls, type) and dataclasses.is_dataclass(cls):
            for f in dataclasses.fields(cls):
                assert f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING, \
                    f"{name}.{f.name} has a default"


def test_overrides_set_keys_as_dvc_exp_run_does_and_leave_the_original_alone():
    from imgclf.params import with_overrides

    raw = committed()
    changed = with_overrides(raw, ["finetune.members=1", "model.image_size=224", "augment.flip=false"])
    params = params_from_dict(changed)
    assert (params.finetune.members, params.model.image_size, params.augment.flip) == (1, 224, False)
    assert raw == committed()
    with pytest.raises(ParamsError, match="modle"):
        with_overrides(raw, ["modle.image_size=224"])
    with pytest.raises(ParamsError, match="key.path=value"):
        with_overrides(raw, ["model.image_size"])
