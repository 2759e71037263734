"""Config files, overrides and validation: every bad input names its key."""

from pathlib import Path

import pytest

import model.config as config_module
from model import ConfigError, GPTConfig
from model.config import CONFIG_DIR, config_from_dict, load_config, parse_override

TINY = """\
model:
  vocab_size: 65
  block_size: 32
  n_layer: 2
  n_head: 2
  n_embd: 32
data:
  tokenizer: char
train:
  max_steps: 20
  lr: 6e-4
  min_lr: 6.0e-5
"""


@pytest.fixture
def tiny(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    return path


def config_error(path, overrides=(), match=""):
    """The ConfigError a load raises; its message must be one line and match `match`."""
    with pytest.raises(ConfigError, match=match) as info:
        load_config(path, overrides)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_load_yaml(tiny):
    cfg = load_config(tiny)
    assert cfg.name == "tiny"
    assert (cfg.model.n_layer, cfg.model.n_embd, cfg.model.vocab_size) == (2, 32, 65)
    assert cfg.data.tokenizer == "char"
    assert cfg.train.max_steps == 20
    # 6e-4 has no dot, which YAML 1.1 reads as a string; it must still be the float
    assert cfg.train.lr == pytest.approx(6e-4) and isinstance(cfg.train.lr, float)
    assert cfg.train.min_lr == pytest.approx(6e-5)
    assert cfg.train.batch_size == 12  # absent keys keep their defaults


def test_overrides_are_typed(tiny):
    cfg = load_config(tiny, ["train.max_steps=50", "model.n_layer=3", "train.lr=1",
                             "train.compile=true", "train.out_dir=out/x", "train.min_lr=1e-5"])
    assert cfg.train.max_steps == 50 and type(cfg.train.max_steps) is int
    assert cfg.model.n_layer == 3 and type(cfg.model.n_layer) is int
    assert cfg.train.lr == 1.0 and type(cfg.train.lr) is float  # an int is fine for a float
    assert cfg.train.compile is True
    assert cfg.train.out_dir == "out/x" and str(cfg.out_dir) == "out/x"
    assert cfg.train.min_lr == pytest.approx(1e-5)


def test_override_adds_missing_section(tmp_path):
    path = tmp_path / "only_model.yaml"
    path.write_text("model:\n  n_layer: 1\n")
    cfg = load_config(path, ["train.max_steps=7"])
    assert cfg.train.max_steps == 7 and cfg.model.n_layer == 1


def test_optional_can_be_null(tiny):
    assert load_config(tiny, ["model.n_kv_head=null"]).model.n_kv_head is None
    config_error(tiny, ["model.n_layer=null"], match="model.n_layer")


def test_unknown_key_suggests_closest(tiny):
    message = config_error(tiny, ["train.max_step=5"], match=r"train\.max_step")
    assert "max_steps" in message


def test_unknown_key_in_file(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("model:\n  n_embed: 64\n")
    message = config_error(path, match=r"model\.n_embed")
    assert "n_embd" in message


def test_unknown_section(tiny):
    message = config_error(tiny, ["trian.max_steps=5"], match="trian")
    assert "'train'" in message


def test_unknown_section_in_file(tmp_path):
    path = tmp_path / "section.yaml"
    path.write_text("modle:\n  n_layer: 2\n")
    assert "'model'" in config_error(path, match="modle")


@pytest.mark.parametrize("override, key", [
    ("model.n_layer=abc", "model.n_layer"),
    ("model.n_layer=2.5", "model.n_layer"),
    ("model.n_layer=true", "model.n_layer"),  # a bool is not an int here
    ("train.lr=fast", "train.lr"),
    ("train.compile=3", "train.compile"),
    ("data.tokenizer=5", "data.tokenizer"),
])
def test_wrong_type_names_key(tiny, override, key):
    config_error(tiny, [override], match=key.replace(".", r"\."))


@pytest.mark.parametrize("overrides, key", [
    (["train.lr=-0.001"], "train.lr"),
    (["train.lr=0"], "train.lr"),
    (["train.min_lr=0.01", "train.lr=0.001"], "train.min_lr"),
    (["model.n_embd=30", "model.n_head=4"], "model.n_embd"),
    (["model.n_kv_head=3"], "model.n_kv_head"),
    (["model.n_layer=0"], "model.n_layer"),
    (["model.dropout=1.0"], "model.dropout"),
    (["model.norm=batchnorm"], "model.norm"),
    (["model.activation=tanh"], "model.activation"),
    (["model.pos_emb=rope", "model.n_embd=6", "model.n_head=2"], "model.n_embd"),
    (["train.beta2=1.0"], "train.beta2"),
    (["train.batch_size=0"], "train.batch_size"),
    (["train.schedule=linear"], "train.schedule"),
    (["data.tokenizer=word"], "data.tokenizer"),
    (["data.val_fraction=0"], "data.val_fraction"),
])
def test_impossible_values_name_key(tiny, overrides, key):
    config_error(tiny, overrides, match=key.replace(".", r"\."))


@pytest.mark.parametrize("text", ["train.max_steps", "max_steps=5", "=5"])
def test_malformed_override(text):
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_override(text)


def test_invalid_yaml(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("model: [unclosed\n")
    config_error(path, match="not valid YAML")


def test_file_must_hold_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    config_error(path, match="sections")


def test_missing_file(tmp_path):
    config_error(tmp_path / "absent.yaml", match="not found")


def test_name_finds_config_dir(tmp_path, monkeypatch):
    shipped = tmp_path / "configs"
    shipped.mkdir()
    (shipped / "tiny.yaml").write_text(TINY)
    monkeypatch.setattr(config_module, "CONFIG_DIR", shipped)
    monkeypatch.chdir(tmp_path)  # no tiny.yaml here, so only configs/ can supply it
    assert load_config("tiny").model.n_embd == 32
    assert load_config("tiny.yaml", ["model.n_embd=64"]).model.n_embd == 64
    assert "tiny.yaml" in config_error("small", match="not found")  # lists what exists


def test_lookup_order(tmp_path, monkeypatch):
    """An existing path, then ./configs/NAME, then the installed package's copy."""
    packaged, checkout = tmp_path / "site" / "model" / "configs", tmp_path / "site" / "configs"
    packaged.mkdir(parents=True)
    (packaged / "tiny.yaml").write_text(TINY)
    monkeypatch.setattr(config_module, "PACKAGED_CONFIG_DIR", packaged)
    monkeypatch.setattr(config_module, "CONFIG_DIR", checkout)  # installed: no checkout
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # no configs/ here: only the packaged copy can supply the name
    assert config_module.resolve_config_path("tiny.yaml") == packaged / "tiny.yaml"
    assert config_module.resolve_config_path("tiny") == packaged / "tiny.yaml"
    assert load_config("tiny.yaml").model.n_embd == 32
    (work / "configs").mkdir()
    (work / "configs" / "tiny.yaml").write_text(TINY.replace("n_embd: 32", "n_embd: 64"))
    assert config_module.resolve_config_path("tiny.yaml") == Path("configs/tiny.yaml")
    assert load_config("tiny.yaml").model.n_embd == 64
    (work / "tiny.yaml").write_text(TINY.replace("n_embd: 32", "n_embd: 16"))
    assert load_config("tiny.yaml").model.n_embd == 16
    # A site-packages/configs owned by another distribution is never consulted first.
    checkout.mkdir()
    (checkout / "other.yaml").write_text(TINY)
    assert config_module.shipped_config_dir() == packaged


def test_installed_package_ships_data_and_every_subpackage():
    """pyproject lists model's packages and data by hand (configs/ is mapped in as
    model/configs); anything missing there would be absent from a non-editable install."""
    tomllib = pytest.importorskip("tomllib")
    root = CONFIG_DIR.parent
    setup = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    subpackages = {".".join(p.parent.relative_to(root).parts)
                   for p in (root / "model").rglob("__init__.py")}
    assert subpackages <= set(setup["packages"])
    assert setup["package-dir"]["model.configs"] == "configs"
    assert setup["package-data"]["model.configs"] == ["*.yaml"]
    data = setup["package-data"]["model.data"]
    assert all(any(p.match(f"model/data/{pattern}") for pattern in data)
               for p in (root / "model" / "data" / "assets").iterdir())


def test_resolved_config_round_trips(tiny):
    cfg = load_config(tiny, ["model.n_kv_head=1", "train.time_budget_s=3"])
    raw = cfg.to_dict()
    assert config_from_dict(raw, name=raw.pop("name")) == cfg


def test_config_records_the_keys_given(tiny):
    cfg = load_config(tiny, ["train.max_steps=5", "train.seed=1337"])  # a default, but given
    assert cfg.given == {"model.vocab_size", "model.block_size", "model.n_layer",
                         "model.n_head", "model.n_embd", "data.tokenizer", "train.max_steps",
                         "train.lr", "train.min_lr", "train.seed"}
    assert config_from_dict({"model": None}).given == frozenset()
    assert config_module.Config().given is None  # built in Python: not known
    # Not a setting: not saved, not compared, so a saved config reloads equal to the original.
    raw = cfg.to_dict()
    assert "given" not in raw
    reloaded = config_from_dict(raw, name=raw.pop("name"))
    assert reloaded == cfg and reloaded.given >= cfg.given  # a saved config states every key


def test_gpt_config_validates_on_construction():
    with pytest.raises(ConfigError, match="n_embd"):
        GPTConfig(n_embd=30, n_head=4)
    with pytest.raises(ConfigError, match="n_kv_head"):
        GPTConfig(n_head=6, n_kv_head=4)


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.name == path.stem
