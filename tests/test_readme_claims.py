"""What README.md and the configs' comments promise, checked against the code so the text cannot silently rot.

The README is parsed, not copied: each test reads the claim from the README (a flag, a config key, a default, a
table row, a snippet's imports) and compares it with what the code defines.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import re
import warnings
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import yaml
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_moe import zoo
from lightning_moe.callbacks import ExpertLoadMonitor
from lightning_moe.compare import CompareConfig
from lightning_moe.data import TextDataModule
from lightning_moe.demo import main as demo_main
from lightning_moe.module import CausalLMModule, Seq2SeqLMModule
from lightning_moe.strategies import ExpertParallelStrategy

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))


def _section(heading: str) -> str:
    """The README text from ``heading`` (a full heading line) to the next heading of the same or a higher level."""
    start = README.index(f"\n{heading}\n")
    level = heading.split(" ")[0]
    rest = README[start + len(heading) + 2 :]
    ends = [m.start() for m in re.finditer(r"^(#+) ", rest, re.M) if len(m.group(1)) <= len(level)]
    return rest[: ends[0]] if ends else rest


def _params(fn: object) -> set[str]:
    return set(inspect.signature(fn).parameters)


# -- lightning-moe demo: errors name the flag the user typed ----------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "flag", "value", "allowed"),
    [
        (["--experts", "0"], "--experts", "0", "must be >= 1"),
        (["--top-k", "9"], "--top-k", "9", "must be in [1, --experts] = [1, 8]"),
        (["--experts", "4", "--top-k", "0"], "--top-k", "0", "must be in [1, --experts] = [1, 4]"),
        (["--dim", "0"], "--dim", "0", "must be >= 1"),
        (["--hidden", "-3"], "--hidden", "-3", "must be >= 1"),
        (["--tokens", "0"], "--tokens", "0", "must be >= 1"),
        (["--steps", "0"], "--steps", "0", "must be >= 1"),
        (["--capacity-factor", "0"], "--capacity-factor", "0.0", "must be a finite number > 0"),
        (["--capacity-factor", "nan"], "--capacity-factor", "nan", "must be a finite number > 0"),
        (["--capacity-factor", "inf"], "--capacity-factor", "inf", "must be a finite number > 0"),
        (["--seed", str(2**64)], "--seed", str(2**64), "must be in [-2**63, 2**64 - 1]"),
    ],
)
def test_demo_errors_name_the_flag_value_and_range_before_any_work(capsys, argv, flag, value, allowed):
    with pytest.raises(ValueError) as error:
        demo_main(argv)
    message = str(error.value)
    assert message.startswith(f"{flag}={value} is invalid: {allowed}"), message
    # The layer's field names are not flags of this command.
    assert not re.search(r"\b(num_experts|top_k|hidden_dim|capacity_factor)=", message), message
    assert capsys.readouterr().out == ""  # refused before the layer was built or anything printed


def test_demo_flags_in_errors_are_flags_the_parser_takes(capsys):
    with pytest.raises(SystemExit):
        demo_main(["--help"])
    help_text = capsys.readouterr().out
    for flag in ("--experts", "--top-k", "--dim", "--hidden", "--tokens", "--steps", "--capacity-factor", "--seed"):
        assert re.search(rf"{re.escape(flag)}\b", help_text), flag


# -- command-line flags and config keys quoted in the README and the configs' comments -----------------------------


def _documented_flags() -> set[str]:
    text = README + "".join(path.read_text() for path in CONFIGS)
    return set(re.findall(r"--(?:model|data|trainer)(?:\.\w+)+", text))


def test_every_documented_cli_flag_names_an_argument_of_the_class_it_configures():
    trainer = _params(L.Trainer.__init__)
    targets = {
        "model": _params(CausalLMModule.__init__),
        "model.init_args": _params(CausalLMModule.__init__),
        "data": _params(TextDataModule.__init__),
        "trainer": trainer,
        "trainer.strategy.init_args": _params(ExpertParallelStrategy.__init__),
        "trainer.logger.init_args": _params(TensorBoardLogger.__init__),
    }
    flags = _documented_flags()
    assert {"--model.arch", "--data.tokenizer_path", "--trainer.max_steps"} <= flags  # the parsing found them
    for flag in sorted(flags):
        owner, _, name = flag[2:].rpartition(".")
        assert owner in targets, f"{flag}: unknown group {owner}"
        assert name in targets[owner], f"README/configs document {flag}, but {owner} takes no {name!r}"


def test_every_documented_override_key_is_a_field_of_the_families_it_is_documented_for():
    fields = {}
    for name in zoo.names():
        config = zoo.config(name)
        fields.setdefault(type(config).__name__, {f.name for f in dataclasses.fields(config)})
    text = README + "".join(path.read_text() for path in CONFIGS)
    keys = set()
    for body in re.findall(r"overrides:? '?\{([^}]*)\}", text):
        keys |= {part.split(":")[0].strip() for part in body.split(",") if ":" in part}
    assert {"num_experts", "expert_kernel", "router_gate_precision", "capacity_factor"} <= keys
    by_family = {  # the families the README names for a key; every family where it names none
        "router_jitter": ["MixtralConfig", "SwitchConfig"],
        "expert_capacity": ["SwitchConfig"],
        "capacity_scope": ["SwitchConfig"],
        "mtp_depth": ["DeepSeekConfig"],
    }
    for key in sorted(keys):
        for family in by_family.get(key, sorted(fields)):
            assert key in fields[family], f"overrides key {key!r} is not a field of {family}"


# -- defaults quoted in the README --------------------------------------------------------------------------------


def _default(fn: object, name: str) -> object:
    return inspect.signature(fn).parameters[name].default


def test_readme_defaults_equal_the_code_defaults():
    max_scalars = _default(ExpertLoadMonitor.__init__, "max_expert_scalars")
    assert f"`max_expert_scalars` ({max_scalars})" in README
    min_mib = _default(CausalLMModule.__init__, "reuse_expert_grad_memory_min_mib")
    assert f"from {min_mib:g} MiB of\nweight per stacked matrix" in README
    density = _default(Seq2SeqLMModule.__init__, "noise_density")
    span = _default(Seq2SeqLMModule.__init__, "mean_span_length")
    assert f"(noise density {density:g}, mean span {span:g}," in README
    beta1, beta2 = _default(CausalLMModule.__init__, "betas")
    assert f"with the default betas {beta1:g} and {beta2:g}" in README
    first = (1 - beta1) / (1 - beta2) ** 0.5
    assert f"({first:.2f} with the default betas" in README
    # The same ratio with beta2 = 0.999, the README's other example.
    assert f"({first:.2f} with the default betas {beta1:g} and {beta2:g}; {(1 - beta1) / 0.001**0.5:.1f} with" in README
    out_dir = CompareConfig().out_dir
    assert f"(default `./{out_dir}`)" in README


def test_readme_preset_coefficients_equal_the_presets():
    v3, tiny = zoo.config("deepseek-v3"), zoo.config("deepseek-tiny")
    assert v3.bias_update_speed == tiny.bias_update_speed
    assert f"`gamma: null` = the preset's `bias_update_speed`, {v3.bias_update_speed:g})" in README
    assert f"(V3's lambda {v3.mtp_loss_coef:g} by default" in README
    mixtral = zoo.config("mixtral-8x7b")
    assert f"Mixtral: `c * top_k` = {mixtral.load_balance_coef:g} per layer" in README
    # from_hf of Mixtral-8x7B's config.json (router_aux_loss_coef 0.02) weights each of its 32 layers c * top_k / L.
    per_layer = 0.02 * mixtral.top_k / mixtral.num_layers
    assert f"(Mixtral-8x7B: {per_layer:g} per layer)" in README


# -- the zoo table ------------------------------------------------------------------------------------------------


def _zoo_rows() -> list[list[str]]:
    rows = []
    for line in _section("## Model zoo").splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 7 and cells[0].startswith("`") and cells[0] != "`<family>-tiny`":
            rows.append(cells)
    return rows


ZOO_ROWS = _zoo_rows()


def _billions(count: int) -> str:
    return f"{count / 1e9:.2f}B"


@pytest.mark.parametrize("row", ZOO_ROWS, ids=[row[0].strip("`") for row in ZOO_ROWS])
def test_zoo_table_row_matches_count_parameters(row):
    name, family, total, active, experts, top_k, _ = row
    if "..." in name:  # `switch-base-8` ... `-256`: the first and the last preset of the range
        first, last = re.findall(r"`([^`]+)`", name)
        last = first[: first.rindex("-")] + last
        low, high = (cell.strip() for cell in total.split("..."))
        assert _billions(zoo.count_parameters(first).total) == low
        assert _billions(zoo.count_parameters(last).total) == high
        assert zoo.config(first).num_experts == int(experts.split("...")[0])
        assert zoo.config(last).num_experts == int(experts.split("...")[1])
        return
    preset = name.strip("`")
    config = zoo.config(preset)
    count = zoo.count_parameters(preset)
    assert zoo.family_of(preset) == family, preset
    assert _billions(count.total) == total, preset
    assert _billions(count.active) == active, preset
    assert int(experts.split()[0]) == config.num_experts, preset
    assert int(top_k) == getattr(config, "top_k", 1), preset


def test_zoo_table_lists_every_published_preset():
    listed = {row[0].strip("`") for row in ZOO_ROWS}
    for name in zoo.names():
        if name.endswith(("-tiny", "-dense", "-dense-total")) or name.startswith("switch-base-"):
            continue
        assert name in listed, f"{name} is a preset but not in the README's zoo table"


# -- the README's Python snippets ---------------------------------------------------------------------------------


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README, re.S)


def test_every_python_snippet_parses_and_its_imports_resolve():
    blocks = _python_blocks()
    assert len(blocks) >= 5
    imported = 0
    for block in blocks:
        if block.lstrip().startswith("def read_config"):  # the sample of generated text, not a snippet
            continue
        tree = ast.parse(block)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                module = __import__(node.module, fromlist=["_"])
                for alias in node.names:
                    assert hasattr(module, alias.name), f"{node.module} has no {alias.name}"
                    imported += 1
    assert imported >= 10


def test_callbacks_snippet_runs_as_written():
    block = next(b for b in _python_blocks() if "ExpertLoadMonitor(logging_interval=50)" in b)
    namespace: dict[str, object] = {}
    exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102  (the README's own code)
    names = {type(cb).__name__ for cb in namespace["trainer"].callbacks}
    assert {"ExpertLoadMonitor", "ExpertSpecialization", "ExpertCollapseDetector"} <= names
    assert {"CapacityFactorTuner", "LoadBalancingBias"} <= names


def test_moe_layer_snippet_runs_and_its_error_example_is_the_config_error():
    block = next(b for b in _python_blocks() if "MoELayer(" in b and "stats.losses" in b)
    namespace: dict[str, object] = {}
    exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102  (the README's own code)
    stats, x = namespace["stats"], namespace["x"]
    assert namespace["y"].shape == x.shape
    top_k = namespace["layer"].config.router.top_k
    assert int(stats.tokens_per_expert.sum()) == x.shape[0] * x.shape[1] * top_k
    example = re.search(r"\(`(top_k=(\d+) is invalid: must be <= num_experts \((\d+)\))`\)", README)
    assert example is not None
    from lightning_moe.nn import RouterConfig

    with pytest.raises(ValueError) as error:
        RouterConfig(num_experts=int(example.group(3)), top_k=int(example.group(2)))
    assert str(error.value) == example.group(1)


# -- the configs' own examples --------------------------------------------------------------------------------------


def _config_examples() -> list[tuple[str, str, dict]]:
    """``(config file, arch, overrides)`` for each ``--model.arch`` and ``overrides`` example in a config's comments."""
    examples = []
    for path in CONFIGS:
        text = path.read_text()
        config = yaml.safe_load(text)
        if "model" not in config:
            continue
        comments = "\n".join(line for line in text.splitlines() if line.lstrip().startswith("#"))
        default_arch = config["model"]["init_args"]["arch"]
        for arch in re.findall(r"--model\.arch ([\w.-]*\w)", comments):  # no full stop at the end
            examples.append((path.name, arch, {}))
        for overrides in re.findall(r"--model\.init_args\.overrides '(\{[^}]*\})'", comments):
            examples.append((path.name, default_arch, yaml.safe_load(overrides)))
    return examples


CONFIG_EXAMPLES = _config_examples()


@pytest.mark.parametrize(
    ("name", "arch", "overrides"), CONFIG_EXAMPLES, ids=[f"{n}:{a}" for n, a, _ in CONFIG_EXAMPLES]
)
def test_config_comment_examples_pass_the_configs_model_and_callback_checks(name, arch, overrides):
    config = yaml.safe_load((ROOT / "configs" / name).read_text())
    module_path, _, class_name = config["model"]["class_path"].rpartition(".")
    module_cls = getattr(importlib.import_module(module_path), class_name)
    module = module_cls(**{**config["model"]["init_args"], "arch": arch, "overrides": overrides})
    trainer = SimpleNamespace(optimizers=[], world_size=1)  # what the callbacks' on_fit_start checks read
    for entry in config["trainer"]["callbacks"]:
        module_path, _, class_name = entry["class_path"].rpartition(".")
        if not module_path.startswith("lightning_moe.callbacks"):
            continue
        callback_cls = getattr(importlib.import_module(module_path), class_name)
        if "on_fit_start" not in vars(callback_cls):
            continue
        callback = callback_cls(**entry.get("init_args", {}))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # CapacityFactorTuner warns that a dropless model has nothing to tune
            callback.on_fit_start(trainer, module)  # the check a fit of this example runs first


@pytest.mark.parametrize(("module_cls", "arch"), [(CausalLMModule, "switch-tiny"), (Seq2SeqLMModule, "mixtral-tiny")])
def test_preset_of_the_other_kind_names_a_config_that_trains_it(module_cls, arch):
    with pytest.raises(ValueError, match=rf"arch='{arch}' is invalid for {module_cls.__name__}") as error:
        module_cls(arch=arch)
    message = str(error.value)
    wanted = re.search(r"train it with (\w+)", message).group(1)
    config_path = re.search(r"configs/[\w.-]+\.yaml", message).group(0)
    config = yaml.safe_load((ROOT / config_path).read_text())
    # The config the error points to trains the module the error recommends, and it accepts this preset's kind.
    assert config["model"]["class_path"].rsplit(".", 1)[1] == wanted
    recommended = {"CausalLMModule": CausalLMModule, "Seq2SeqLMModule": Seq2SeqLMModule}[wanted]
    recommended(arch=arch)
