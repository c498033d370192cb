"""Every code block of the README runs: Python blocks as written, `modes` commands with small
sample counts (the full runs take minutes), the lmms-eval command's arguments against the
adapter, and the install and test lines through `.ci/run`, which runs exactly them."""

from __future__ import annotations

import contextlib
import inspect
import io
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from modes.cli.main import main
from plans import uniform_plan

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.S)
BASH_BLOCKS = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
COMMANDS = [
    line.split("  #")[0].strip()
    for block in BASH_BLOCKS
    for line in block.splitlines()
    if line.strip() and not line.lstrip().startswith("#")
]
# a question of the bundled benchmark's arithmetic skill; its answer is 4
QUESTION = "start with 2 , add 3 and then take away 1 . what is the result ?"
# small options per subcommand, appended to the README's command (later options win)
SMALL = {
    name: shlex.split(options)
    for name, options in {
        "calibrate": "--samples 16",
        "search": "--samples 16 --grid-size 6",
        "eval": "--samples 24",
        "compare": "--calibration-samples 16 --test-samples 16 --grid-size 4 --targets 0.5 "
        "--methods modes,naee,k_reduction",
        "bench": "--prompt-tokens 16 --new-tokens 2 --repeats 1 --system-malloc",
        "demo": "--calibration-samples 16 --test-samples 16 --grid-size 4",
    }.items()
}


def run(code: str, cwd: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.chdir(cwd)
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        exec(compile(code, "README.md", "exec"), {})
    return output.getvalue()


def test_readme_has_the_blocks_this_file_runs():
    assert len(PYTHON_BLOCKS) == 2
    assert {c.split()[0] for c in COMMANDS} == {"pip", "modes", "python", "lmms-eval", "torchrun"}
    assert any(c.startswith("modes serve") for c in COMMANDS)


def test_first_python_example_runs_as_written(tmp_path, monkeypatch):
    example = PYTHON_BLOCKS[0]
    assert len(example.strip().splitlines()) <= 12
    ratio = float(run(example, tmp_path, monkeypatch).splitlines()[-1].split()[0])
    assert 0 < ratio < 1


def test_pipeline_example_runs_as_written(tmp_path, monkeypatch):
    lines = run(PYTHON_BLOCKS[1], tmp_path, monkeypatch).splitlines()
    accuracy, skippable, overall = map(float, lines[0].split())
    assert 0 < accuracy <= 1 and 0 < overall < skippable < 1
    assert 0 < float(lines[1]) < 1  # the saved plan, applied by hand, skips as searched
    assert (tmp_path / "plan.json").exists()


def test_modes_commands_run_in_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for command in [c for c in COMMANDS if c.startswith("modes ") and not c.startswith("modes serve")]:
        argv = shlex.split(command)[1:]
        assert main(argv + SMALL[argv[0]]) == 0, command


def test_install_and_test_lines_are_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    for command in COMMANDS:
        if command.startswith(("pip ", "python -m pytest")):
            assert command in ci, f"README promises `{command}` but .ci/run does not run it"


def test_lmms_eval_command_names_the_adapter_and_its_arguments():
    pytest.importorskip("lmms_eval")
    from modes.evaluation.lmms import ModesLMM

    accepted = set(inspect.signature(ModesLMM.__init__).parameters) - {"self", "unknown"}
    for command in [c for c in COMMANDS if c.startswith("lmms-eval")]:
        argv = shlex.split(command)
        assert argv[argv.index("--model") + 1] == "modes"
        model_args = dict(pair.split("=", 1) for pair in argv[argv.index("--model_args") + 1].split(","))
        assert set(model_args) <= accepted, set(model_args) - accepted


def test_torchrun_commands_run_in_order(tmp_path):
    environment = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    environment["OMP_NUM_THREADS"] = "1"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]  # `torchrun`, free port
    for command in [c for c in COMMANDS if c.startswith("torchrun ")]:
        argv = shlex.split(command)[1:]
        subcommand = argv[argv.index("modes") + 1]
        finished = subprocess.run(
            [*launcher, *argv, *SMALL[subcommand]],
            cwd=tmp_path,
            env=environment,
            capture_output=True,
            text=True,
        )
        assert finished.returncode == 0, (command, finished.stderr[-2000:])


def test_serve_command_answers_the_openai_client(tmp_path, bundled):
    """`modes serve` as written (on a free port), once the pipeline's plan exists."""
    openai = pytest.importorskip("openai")
    model = bundled[0]
    uniform_plan(model, 0.01, modalities=("text",)).save(tmp_path / "plan.json")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    (command,) = [c for c in COMMANDS if c.startswith("modes serve")]
    argv = [sys.executable, "-m", "modes", *shlex.split(command)[1:], "--port", str(port)]
    server = subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        deadline = time.time() + 120
        while True:
            try:
                answer = client.chat.completions.create(
                    model="modes", messages=[{"role": "user", "content": QUESTION}], max_tokens=4
                )
                break
            except openai.APIConnectionError:
                assert time.time() < deadline and server.poll() is None, server.stdout.read()
                time.sleep(0.5)
        assert answer.choices[0].message.content.strip() == "4"
    finally:
        server.terminate()
        server.wait(timeout=30)
