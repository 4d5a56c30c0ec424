"""sit.progress: a tqdm bar on a terminal, else a plain line every few seconds; the sampler's progress through t."""
import io

from sit.progress import Progress, SamplerProgress, format_duration


class FakeClock:
    """time.monotonic stand-in: advances only when told."""

    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_without_a_terminal_a_line_every_interval_and_one_at_the_end():
    stream, clock = io.StringIO(), FakeClock()
    progress = Progress("train", 1000, "step", stream=stream, clock=clock, interval=10.0)
    for step in range(1, 5):  # 4 steps, 3 s apart: only the one at 12 s is due (10 s after the start)
        clock.now += 3.0
        progress.update_to(step)
    assert stream.getvalue() == "train: 4/1000 step (0%), 0.333 step/s, ETA 49m48s\n"
    clock.now += 2.0
    progress.update_to(5)  # 2 s after the last line: not due
    progress.close()
    lines = stream.getvalue().splitlines()
    assert lines == ["train: 4/1000 step (0%), 0.333 step/s, ETA 49m48s",
                     "train: 5/1000 step (0%), 0.357 step/s, ETA 46m26s"]  # 5 steps in 14 s


def test_a_resumed_run_counts_its_rate_from_where_it_started_and_notes_follow():
    stream, clock = io.StringIO(), FakeClock()
    progress = Progress("train", 100, "step", initial=40, stream=stream, clock=clock, interval=5.0)
    clock.now += 10.0
    progress.update_to(60, loss="0.5")
    assert stream.getvalue() == "train: 60/100 step (60%), 2 step/s, ETA 20s, loss 0.5\n"


def test_disabled_progress_writes_nothing_and_a_terminal_gets_a_bar():
    stream = io.StringIO()
    progress = Progress("train", 10, "step", enabled=False, stream=stream, interval=0.0)
    progress.update_to(5)
    progress.close()
    assert stream.getvalue() == ""
    terminal = Terminal()
    bar = Progress("train", 10, "step", stream=terminal)
    bar.update_to(4)
    bar.close()
    assert "4/10" in terminal.getvalue() and "\r" in terminal.getvalue()  # tqdm redraws one line


def test_sampler_progress_follows_t_and_counts_evaluations():
    stream, clock = io.StringIO(), FakeClock()
    progress = SamplerProgress(stream=stream, clock=clock, interval=1.0)
    for t in (0.0, 0.25, 0.2, 0.5):  # an adaptive solver may evaluate behind its furthest point
        clock.now += 1.0
        progress(t)
    assert progress.evaluations == 4 and progress.position == 0.5
    assert stream.getvalue().splitlines()[-1] == "sampling: 0.5/1 t (50%), 0.125 t/s, ETA 4s, evaluations 4"
    progress.close()  # done: the whole interval, whatever t the last evaluation had
    assert stream.getvalue().splitlines()[-1] == "sampling: 1/1 t (100%), 0.25 t/s, evaluations 4"
    reverse = SamplerProgress(reverse=True, enabled=False)
    reverse(0.75)
    assert reverse.position == 0.25 and reverse.evaluations == 1


def test_durations_are_short():
    assert [format_duration(s) for s in (0.4, 42, 185, 7620)] == ["0s", "42s", "3m05s", "2h07m"]
