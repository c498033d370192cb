"""The model card lists every training phase's command, so the checkpoint can be reproduced."""

from __future__ import annotations

from modes.bundled.card import _commands, _phases


def test_each_phase_gets_a_command_that_continues_the_one_before():
    first = {"steps": 50, "lr": 0.002, "seed": 0, "vision_steps": 400}
    second = {"steps": 30, "lr": 0.001, "seed": 1, "previous": first}
    third = {"steps": 20, "lr": 0.0005, "seed": 2, "previous": second,
             "skill_weights": {"exists": 3.0, "color_at": 1.0}}  # fmt: skip
    lines = _commands(_phases(third)).splitlines()[1:-1]
    assert lines == [
        "python -m modes.bundled.train --out phase1 --vision-steps 400 --steps 50 --lr 0.002 --seed 0",
        "python -m modes.bundled.train --out phase2 --init phase1 --steps 30 --lr 0.001 --seed 1",
        "python -m modes.bundled.train --out src/modes/bundled/checkpoint --init phase2 --steps 20"
        " --lr 0.0005 --seed 2 --skill-weights exists=3",
    ]
