import re

import pytest

from lightning_moe.demo import main


def test_demo_prints_loads_and_balancing_lowers_the_loss(capsys):
    main(["--experts", "4", "--top-k", "2", "--dim", "16", "--hidden", "32", "--tokens", "256", "--steps", "40"])
    out = capsys.readouterr().out
    losses = [float(v) for v in re.findall(r"loss (\d+\.\d+)", out)]
    assert len(losses) == 2 and losses[1] < losses[0]
    copies = [int(v) for v in re.findall(r"(\d+) copies", out)]
    assert len(copies) == 8 and sum(copies[:4]) == sum(copies[4:]) == 256 * 2
    assert "grouped" in out and "reference loop" in out


def test_demo_arguments_name_the_field():
    with pytest.raises(ValueError, match=r"tokens=-5 is invalid: must be >= 1"):
        main(["--tokens", "-5"])
    with pytest.raises(ValueError, match=r"--experts=0 is invalid: must be >= 1"):
        main(["--experts", "0"])
