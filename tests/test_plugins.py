"""Methods come in through one door: the `san_peft.methods` entry points.

A third-party-style method (its module is written by this test, outside the repository)
is registered through `registry.load_plugins` with an `importlib.metadata.EntryPoint`, the
same object an installed package's entry point is; from then on it is a method like the
built-in ones: listed, composed from its dataclass (no YAML), validated, described, trained.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import tiny_overrides
from helpers import tiny_model
from omegaconf import OmegaConf

from san.cli import console, params
from san.config import config_dir, group_options
from san.errors import ConfigError
from san.methods import registry

PLUGIN_MODULE = "san_example_plugin"
PLUGIN_METHOD = "head_scale"
PLUGIN_SOURCE = textwrap.dedent('''
    """An example plugin: a learned scale (and shift) on every input feature of the classifier."""

    from dataclasses import dataclass, field

    import torch
    from torch import nn

    from san.methods.base import AdaptedModel, MethodConfig
    from san.methods.registry import register_method
    from san.methods.surgery import replace_module


    @dataclass
    class HeadScaleConfig(MethodConfig):
        init: float = field(default=1.0, metadata={"help": "Initial value of every scale."})
        learn_shift: bool = field(default=False, metadata={"help": "Also learn a shift of every feature."})


    class ScaledHead(nn.Module):
        def __init__(self, head: nn.Linear, init: float, learn_shift: bool):
            super().__init__()
            self.head = head
            self.scale = nn.Parameter(torch.full((head.in_features,), float(init)))
            self.shift = nn.Parameter(torch.zeros(head.in_features)) if learn_shift else None

        def forward(self, x):
            x = x * self.scale
            return self.head(x if self.shift is None else x + self.shift)

        @torch.no_grad()
        def folded(self) -> nn.Linear:
            if self.shift is not None:  # W (s x + t) + b = W diag(s) x + (W t + b)
                self.head.bias += self.head.weight @ self.shift
            self.head.weight *= self.scale
            return self.head


    class HeadScale(AdaptedModel):
        """A learned scale on every input feature of the classifier (an example plugin)."""

        config_class = HeadScaleConfig

        def _adapt(self, model):
            self.wrapper = ScaledHead(model.get_classifier(), self.config.init, self.config.learn_shift)
            replace_module(model, self.wrapper.head, self.wrapper)

        def _method_parameters(self):
            yield from (p for p in (self.wrapper.scale, self.wrapper.shift) if p is not None)

        def _no_weight_decay_parameters(self):
            return self._method_parameters()

        def _merge_into(self, model):
            replace_module(model, self.wrapper, self.wrapper.folded())
            return model


    register_method("head_scale", HeadScale)
''')


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """The example method, registered through the entry-point door; the registry (and Hydra's
    config store) are as before once the test ends."""
    from hydra.core.config_store import ConfigStore

    registry.load_plugins()  # the installed methods first, so that restoring the registry keeps them
    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))
    if hasattr(registry, "_STORED"):  # the names already put into Hydra's config store
        monkeypatch.setattr(registry, "_STORED", set(registry._STORED))
    folder = tmp_path / "site-packages"
    folder.mkdir()
    (folder / f"{PLUGIN_MODULE}.py").write_text(PLUGIN_SOURCE)
    monkeypatch.syspath_prepend(str(folder))
    entry_point = importlib.metadata.EntryPoint(name="example", value=PLUGIN_MODULE, group=registry.ENTRY_POINT_GROUP)
    assert PLUGIN_METHOD not in registry.available_methods()
    registry.load_plugins([entry_point])
    yield PLUGIN_METHOD
    sys.modules.pop(PLUGIN_MODULE, None)
    ConfigStore.instance().repo.get("method", {}).pop(f"{PLUGIN_METHOD}.yaml", None)


def test_a_plugin_method_is_listed(plugin):
    assert plugin in registry.available_methods() and plugin in group_options("method")
    assert registry.method_class(plugin).__module__ == PLUGIN_MODULE


def test_a_plugin_method_composes_from_its_dataclass(plugin, compose):
    method = OmegaConf.to_container(compose([f"method={plugin}"]).method)
    assert method == {
        "name": plugin,
        "label": None,
        "train_head": True,
        "update_batchnorm_stats": False,
        "init": 1.0,
        "learn_shift": False,
    }
    assert compose([f"method={plugin}", "method.init=0.5"]).method.init == 0.5


def test_an_unknown_setting_names_the_accepted_ones(plugin, compose):
    accepted = "init, label, learn_shift, name, train_head, update_batchnorm_stats"
    with pytest.raises(Exception) as error:  # at composition: the dataclass has no such field
        compose([f"method={plugin}", "method.nope=1"])
    assert f"Accepted under method: {accepted}" in console.user_message(error.value, "san-train")
    # added on purpose (+), it composes, and building the method refuses it
    method = OmegaConf.to_container(compose([f"method={plugin}", "+method.nope=1"]).method)
    with pytest.raises(ConfigError, match=r"no setting\(s\) \['nope'\]; accepted: \['init', 'learn_shift', "):
        registry.build_method_from_config(tiny_model("test_vit"), method)


@pytest.mark.parametrize(
    "override, expected",
    [
        ("method.init=abc", "method.init: Value 'abc' of type 'str' could not be converted to Float"),
        ("method.learn_shift=maybe", "method.learn_shift: Value 'maybe' is not a valid bool"),
    ],
)
def test_a_wrongly_typed_setting_is_one_clean_error(plugin, capsys, override, expected):
    with pytest.raises(SystemExit) as exit:
        params.main([f"method={plugin}", override])
    assert exit.value.code == console.EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err.startswith(f"san-params: error: {expected}") and "--describe" in err and "Traceback" not in err


@pytest.mark.slow
def test_a_plugin_method_trains_through_san_train(plugin, tmp_path, tiny_task, compose):
    from san.records import read_record
    from san.run import run

    cfg = compose(
        tiny_overrides(tmp_path, tiny_task, f"method={plugin}", "method.learn_shift=true", "trainer.epochs=1")
    )
    record = read_record(run(cfg))
    assert record["status"] == "complete", record.get("error")
    assert record["method"]["name"] == record["method"]["registered_name"] == plugin
    assert record["method"]["settings"]["learn_shift"] is True
    width = tiny_model("test_vit").num_features
    assert record["params"]["trainable_without_head"] == 2 * width  # a scale and a shift per feature
    assert record["metrics"]["per_epoch"][0]["train_loss"] > 0


def test_a_plugin_method_is_described(plugin, capsys):
    params.main([f"method={plugin}", "--describe"])
    out = capsys.readouterr().out
    assert "A learned scale on every input feature of the classifier" in out
    assert "init (float, default 1.0): Initial value of every scale." in out
    assert "learn_shift (bool, default False): Also learn a shift of every feature." in out


# --- the installed door ------------------------------------------------------------------
def _experiment_methods() -> set[str]:
    names = set()
    for path in sorted(Path(config_dir(), "experiment").glob("*.yaml")):
        for entry in OmegaConf.load(path).get("plan", {}).get("methods", []):
            names.add(entry if isinstance(entry, str) else entry["method"])
    return names


def test_installed_entry_points_are_pyprojects():
    """Else the install is stale (an entry point added since): make install."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    pyproject = tomllib.loads((Path(config_dir()).parent / "pyproject.toml").read_text())
    declared = pyproject["project"]["entry-points"][registry.ENTRY_POINT_GROUP]
    installed = {ep.name: ep.value for ep in importlib.metadata.entry_points(group=registry.ENTRY_POINT_GROUP)}
    assert installed == declared, "the installed entry points are not pyproject.toml's: run make install"


def test_installed_entry_points_load_every_builtin_method():
    """In a fresh interpreter the registry finds every method the experiments name through
    the installed entry points alone (the core never imports `baselines`)."""
    code = (
        "import json, sys; from san.methods import registry; before = sorted(m for m in sys.modules "
        "if m == 'baselines' or m.startswith('baselines.')); names = registry.available_methods(); "
        "print(json.dumps({'before': before, 'names': names}))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = json.loads(result.stdout.splitlines()[-1])
    assert loaded["before"] == []
    variants = {path.stem for path in Path(config_dir(), "method").glob("*.yaml")}
    experiments = _experiment_methods()
    assert experiments and experiments - variants <= set(loaded["names"])
    assert experiments <= set(loaded["names"]) | variants


def test_san_params_describes_each_san_setting_with_its_help(capsys):
    from san.methods.san import SANConfig

    params.main(["method=san", "--describe"])
    lines = capsys.readouterr().out.splitlines()
    for spec in dataclasses.fields(SANConfig):
        line = next((line for line in lines if line.startswith(f"  {spec.name} (")), None)
        assert line is not None, f"{spec.name} is not described"
        assert line.endswith(spec.metadata["help"]), line


def test_san_params_describes_a_variant_with_its_values(capsys):
    params.main(["method=adaptformer", "--describe"])
    out = capsys.readouterr().out
    assert out.startswith("variant adaptformer of method adapter:")
    assert '"scale": 0.1' in out and '"placement": "residual_stream"' in out
