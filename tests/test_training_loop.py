"""The shared step loop: Ctrl-C stops at a step boundary with a checkpoint, and a resume continues exactly."""

import os
import signal

import torch

from lora_loom.lora_core.training_loop import resume, run_steps, save_checkpoint


def test_ctrl_c_finishes_the_step_checkpoints_and_stops(tmp_path):
    state = {"step": 0, "elapsed": 0.0, "checkpoint_every": 100}
    done, checkpoints = [], []

    def one_step():
        done.append(state["step"])
        if state["step"] == 2:
            os.kill(os.getpid(), signal.SIGINT)  # the user presses Ctrl-C during step 3
        return 0.5

    handler = signal.getsignal(signal.SIGINT)
    finished = run_steps(10, state, one_step, lambda: checkpoints.append(state["step"]))
    assert not finished and done == [0, 1, 2] and checkpoints == [3] and state["step"] == 3
    assert signal.getsignal(signal.SIGINT) is handler  # the previous handler is back


def test_a_resumed_loop_ends_where_an_uninterrupted_one_does(tmp_path):
    def train(path, stop_after):
        model = torch.nn.Linear(3, 2)
        torch.nn.init.constant_(model.weight, 0.1)
        torch.nn.init.zeros_(model.bias)
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
        generator = torch.Generator().manual_seed(0)
        state = {"step": 0, "elapsed": 0.0, "checkpoint_every": 4}
        parts = {"model": model, "optimizer": optimizer}
        resume(path, parts, generator, state)

        def one_step():
            x = torch.randn(5, 3, generator=generator)
            loss = model(x).square().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            return loss.item()

        checkpoint = lambda: save_checkpoint(path, parts, generator, state)  # noqa: E731
        return run_steps(9, state, one_step, checkpoint, stop_after=stop_after), model

    _, straight = train(tmp_path / "a.safetensors", None)
    calls = 0
    while not (result := train(tmp_path / "b.safetensors", 2))[0]:
        calls += 1
    assert calls == 4 and torch.equal(result[1].weight, straight.weight)
