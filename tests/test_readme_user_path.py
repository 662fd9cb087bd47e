"""The README's "Serve your own model" path is true: its model file, labels file and
model-config.yaml are what the tools accept, and every flag it shows exists.

(The path itself, ResNet-18 eager and TorchScript through archive, calibration and serving,
is what test_archive.py, test_calibration.py and test_server.py do on the demo model.)"""

from __future__ import annotations

import json
import re
import shlex
import types

import pytest
import torch
import torchvision
import yaml
from torchserve_harness import REPO

from torchserve_gradnorm.cli import archive, calibrate, client
from torchserve_gradnorm.config import handler_section, parse_handler_config

README = (REPO / "README.md").read_text()
SECTION = README[README.index("## Serve your own model") : README.index("### Requests")]


def blocks(language: str) -> list[str]:
    """The section's fenced code blocks in ``language``, without their indentation."""
    found = re.findall(rf"( *)```{language}\n(.*?)\n *```", SECTION, flags=re.S)
    return ["\n".join(line[len(indent) :] for line in body.split("\n")) for indent, body in found]


def commands(program: str) -> list[list[str]]:
    """Every ``program ...`` command line of the section's shell blocks, continuations joined."""
    lines = []
    for block in blocks("sh"):
        for line in block.replace("\\\n", " ").split("\n"):
            line = line.split(" # ")[0].strip()
            if line.startswith(program + " "):
                lines.append(shlex.split(line)[1:])
    return lines


def test_the_model_file_loads_torchvisions_resnet18_weights():
    (source,) = blocks("python")
    module = types.ModuleType("my_resnet")
    exec(compile(source, "my_resnet.py", "exec"), module.__dict__)
    own = [
        c
        for c in vars(module).values()
        if isinstance(c, type) and issubclass(c, torch.nn.Module) and c.__module__ == "my_resnet"
    ]
    assert len(own) == 1  # TorchServe wants exactly one
    state = torchvision.models.resnet18(num_classes=10).state_dict()
    own[0]().load_state_dict(state)  # strict: same names and shapes


def test_the_labels_file_is_in_the_format_gradnorm_archive_accepts(tmp_path):
    (labels,) = blocks("json")
    (tmp_path / "index_to_name.json").write_text(labels)
    archive.validate_labels(str(tmp_path / "index_to_name.json"))
    assert sorted(json.loads(labels), key=int) == [str(i) for i in range(10)]


def test_the_model_config_is_valid():
    (config,) = blocks("yaml")
    parsed = parse_handler_config(handler_section(yaml.safe_load(config)))
    assert parsed.param_filter == "head" and parsed.input.size == (224, 224)


@pytest.mark.parametrize(
    "program, parser",
    [
        ("gradnorm-archive", archive.build_parser()),
        ("gradnorm-calibrate", calibrate.build_parser()),
        ("gradnorm-client", client.build_parser()),
    ],
)
def test_every_command_shown_parses(program, parser):
    shown = commands(program)
    assert shown
    for argv in shown:
        parser.parse_args(argv)  # exits on an unknown flag
