import io
import math

import pytest

from mtvision.engine.progress import Progress, format_duration, format_value, resolve_mode
from mtvision.errors import MTVisionError


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (45, "45s"), (59.4, "59s"), (59.6, "1m00s"), (192, "3m12s"), (3720, "1h02m"), (90061, "25h01m")],
)
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def test_format_duration_unknown():
    assert format_duration(math.nan) == "?"
    assert format_duration(math.inf) == "?"
    assert format_duration(-1) == "?"


def test_format_value():
    assert format_value("loss", 0.53212) == "0.532"
    assert format_value("semseg", 0.21) == "0.21"
    assert format_value("lr", 0.001) == "1.0e-03"
    assert format_value("loss", 12345.0) == "1.23e+04"
    assert format_value("epoch", 3) == "3"


def test_plain_lines_exact_on_fake_clock():
    clock, out = FakeClock(), io.StringIO()
    bar = Progress(100, "train", mode="plain", interval=20, stream=out, images_per_step=8, clock=clock)
    for _ in range(45):
        clock.now += 0.25
        bar.update(loss=0.532, semseg=0.21, lr=1e-3)
    lines = out.getvalue().splitlines()
    # 4 steps/s, 32 img/s; eta = remaining steps / 4
    assert lines == [
        "train: step 20/100 (20%) | loss 0.532 | semseg 0.21 | lr 1.0e-03 | 32.0 img/s | eta 20s",
        "train: step 40/100 (40%) | loss 0.532 | semseg 0.21 | lr 1.0e-03 | 32.0 img/s | eta 15s",
    ]
    bar.close()
    assert out.getvalue().splitlines()[-1].startswith("train: step 45/100 (45%) | ")
    bar.close()  # idempotent
    assert len(out.getvalue().splitlines()) == 3


def test_plain_prints_on_reaching_total_once():
    clock, out = FakeClock(), io.StringIO()
    with Progress(5, "eval", mode="plain", interval=2, stream=out, clock=clock) as bar:
        for _ in range(5):
            clock.now += 1.0
            bar.update()
    lines = out.getvalue().splitlines()
    assert [line.split(" | ")[0] for line in lines] == [
        "eval: step 2/5 (40%)",
        "eval: step 4/5 (80%)",
        "eval: step 5/5 (100%)",
    ]
    assert lines[-1] == "eval: step 5/5 (100%) | 1.0 img/s | eta 0s"


def test_eta_uses_moving_rate_not_the_slow_start():
    clock, out = FakeClock(), io.StringIO()
    bar = Progress(200, "train", mode="plain", interval=8, stream=out, window=4, clock=clock)
    for step in range(8):
        clock.now += 10.0 if step < 4 else 1.0  # four slow warm-up steps, then 1 step/s
        bar.update(2 if step == 7 else 1)
    # the window holds the last 4 updates: 5 steps in 4 s
    assert bar.count == 9
    assert bar.steps_per_second() == pytest.approx(5 / 4)
    assert bar.eta_seconds() == pytest.approx((200 - 9) / (5 / 4))
    assert out.getvalue().splitlines()[-1].endswith("| eta 2m33s")


def test_unknown_rate_shows_question_marks():
    out = io.StringIO()
    bar = Progress(10, "", mode="plain", interval=1, stream=out, clock=FakeClock())
    bar.update(loss=1.5)  # no time has passed
    assert out.getvalue() == "step 1/10 (10%) | loss 1.5 | ? img/s | eta ?\n"


def test_explicit_images_count_for_a_short_last_batch():
    clock = FakeClock()
    bar = Progress(2, "x", mode="plain", stream=io.StringIO(), images_per_step=8, clock=clock)
    clock.now += 1.0
    bar.update()
    clock.now += 1.0
    bar.update(images=4)
    assert bar.images == 12
    assert bar.images_per_second() == pytest.approx(6.0)


def test_disabled_prints_nothing():
    clock, out = FakeClock(), io.StringIO()
    with Progress(10, "train", mode="plain", interval=1, enabled=False, stream=out, clock=clock) as bar:
        for _ in range(10):
            clock.now += 1.0
            bar.update(loss=0.1)
        bar.write("hello")
    assert out.getvalue() == ""
    tty = FakeTTY()
    with Progress(10, "train", mode="tqdm", enabled=False, stream=tty, clock=clock) as bar:
        bar.update()
    assert tty.getvalue() == ""


def test_auto_mode_selection(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    assert resolve_mode("auto", io.StringIO()) == "plain"
    assert resolve_mode("auto", FakeTTY()) == "tqdm"
    monkeypatch.setenv("CI", "true")
    assert resolve_mode("auto", FakeTTY()) == "plain"
    monkeypatch.setenv("CI", "false")
    assert resolve_mode("auto", FakeTTY()) == "tqdm"
    assert resolve_mode("tqdm", io.StringIO()) == "tqdm"
    assert Progress(3, "x", stream=io.StringIO()).mode == "plain"
    with pytest.raises(MTVisionError, match="progress mode"):
        resolve_mode("fancy", io.StringIO())


def test_tqdm_mode_shows_postfix_and_messages():
    clock, out = FakeClock(), io.StringIO()
    with Progress(4, "train", mode="tqdm", stream=out, images_per_step=2, clock=clock) as bar:
        for _ in range(4):
            clock.now += 0.5
            bar.update(loss=0.25, lr=0.01)
        bar.write("epoch done")
    text = out.getvalue()
    assert "train" in text and "4/4" in text
    assert "loss 0.25 | lr 1.0e-02 | 4.0 img/s" in text
    assert "epoch done" in text


def test_a_resumed_bar_starts_at_its_step_and_rates_only_new_work():
    t = [0.0]
    bar = Progress(100, "train", mode="plain", enabled=False, images_per_step=8, initial=60, clock=lambda: t[0])
    assert bar.count == 60 and bar.images == 0
    t[0] = 2.0
    bar.update(4)
    assert bar.steps_per_second() == pytest.approx(2.0) and bar.images_per_second() == pytest.approx(16.0)
    assert bar.eta_seconds() == pytest.approx(36 / 2.0)
    with pytest.raises(MTVisionError, match="initial"):
        Progress(10, "x", initial=11)
