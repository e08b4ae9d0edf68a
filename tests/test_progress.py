"""Progress outside a terminal: plain lines with an ETA, at most one per task every `every_s` seconds."""

import io

from rich.console import Console

from fedgen.core.progress import PlainProgress, clock_text, progress_bar, task


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_plain_lines_with_elapsed_time_and_eta():
    out, clock = io.StringIO(), Clock()
    console = Console(file=out, width=10_000)
    with PlainProgress(console, every_s=30, clock=clock) as progress:
        rounds = progress.add_task("rounds", total=30, completed=10)  # a resumed run: 10 rounds were done before
        for _ in range(20):
            clock.now += 10
            progress.advance(rounds)
    # a line every 30 s; the rate is measured on this run's rounds only (10 s each), not the resumed ones
    assert out.getvalue().splitlines() == [
        "rounds: 13/30 (43%), 0:00:30 elapsed, ETA 0:02:50",
        "rounds: 16/30 (53%), 0:01:00 elapsed, ETA 0:02:20",
        "rounds: 19/30 (63%), 0:01:30 elapsed, ETA 0:01:50",
        "rounds: 22/30 (73%), 0:02:00 elapsed, ETA 0:01:20",
        "rounds: 25/30 (83%), 0:02:30 elapsed, ETA 0:00:50",
        "rounds: 28/30 (93%), 0:03:00 elapsed, ETA 0:00:20",
        "rounds: 30/30 (100%), 0:03:20 elapsed, done",  # the end of a task that has spoken
    ]


def test_short_work_says_nothing():
    out, clock = io.StringIO(), Clock()
    progress = PlainProgress(Console(file=out), every_s=30, clock=clock)
    with task(progress, "sampling 64 (grid)", 64) as advance:
        for _ in range(64):
            clock.now += 0.1
            advance()
    assert out.getvalue() == "" and not progress.tasks


def test_a_terminal_gets_the_live_bar_and_a_file_the_plain_lines():
    from rich.progress import Progress

    assert isinstance(progress_bar(Console(file=io.StringIO(), force_terminal=True)), Progress)
    assert isinstance(progress_bar(Console(file=io.StringIO())), PlainProgress)
    assert clock_text(3725.4) == "1:02:05"


def test_emulated_bf16_is_named_with_the_settings_to_turn_off():
    import torch

    from fedgen.core.device import cpu_bf16_flags, emulated_bf16_note

    avx2 = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n"
    amx = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
    cpu = torch.device("cpu")
    assert cpu_bf16_flags(avx2) == set() and cpu_bf16_flags(amx) == {"avx512_bf16", "amx_bf16"}
    assert cpu_bf16_flags("no flags line here") is None
    assert emulated_bf16_note(cpu, ["train.bf16", "eval.bf16"], avx2) == (
        "this CPU has no native bfloat16 (no avx512_bf16 or amx_bf16 flag): train.bf16 and eval.bf16 run emulated, "
        "several times slower; for speed here: --set train.bf16=false --set eval.bf16=false")
    assert emulated_bf16_note(cpu, ["train.bf16"], amx) is None  # native: nothing to say
    assert emulated_bf16_note(cpu, [], avx2) is None  # bf16 not asked for
    assert emulated_bf16_note(torch.device("meta"), ["train.bf16"], avx2) is None  # not a CPU
