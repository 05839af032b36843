"""compute.threads: auto: torch's default on an idle machine; beside other work, the fastest
thread count timed on training steps (the fewest within 5 %); chosen again when the load moves."""

import pytest

from stagewise.recipe import ComputeConfig
from stagewise.training.threads import ThreadChooser, describe_choice, pick_threads, thread_candidates


class Machine:
    """A fake machine: a step's seconds depend on the thread count set, the load is settable."""

    def __init__(self, seconds_by_threads, load):
        self.seconds, self.load, self.now, self.threads, self.steps = seconds_by_threads, load, 0.0, None, 0

    def set_threads(self, n):
        self.threads = n

    def clock(self):
        return self.now

    def step(self):
        self.steps += 1
        self.now += self.seconds[self.threads]


def _chooser(machine, default=2, cpus=2):
    return ThreadChooser(default, cpus, load=lambda: machine.load, clock=machine.clock, set_threads=machine.set_threads)


def test_an_idle_machine_keeps_the_default_without_timing_anything():
    machine = Machine({1: 0.4, 2: 0.2}, load=0.3)
    record = _chooser(machine).choose(machine.step)
    assert record == {"load_average": 0.3, "cpus": 2, "measured": False, "chosen": 2}
    assert machine.steps == 0 and machine.threads == 2
    assert describe_choice(record) == "2 threads (load average 0.3 on 2 CPUs: torch's default)"


def test_a_busy_machine_times_each_count_and_keeps_the_fastest():
    machine = Machine({1: 0.41, 2: 1.52}, load=3.2)  # the figures: 2 threads wait on each other
    chooser = _chooser(machine)
    record = chooser.choose(machine.step)
    assert record["measured"] and record["chosen"] == 1 and machine.threads == 1
    assert record["seconds_per_step"] == {"1": pytest.approx(0.41), "2": pytest.approx(1.52)}
    assert machine.steps == 2 * 4  # one warm-up and three timed steps per candidate, taken in turn
    assert describe_choice(record) == ("1 thread (load average 3.2 on 2 CPUs; timed 1 thread 0.41 s, "
                                       "2 threads 1.52 s per training step)")
    assert not chooser.due()  # the same load: not chosen again
    machine.load = 3.9
    assert not chooser.due()  # moved by less than a CPU
    other = _chooser(Machine({1: 0.3, 2: 0.9}, load=30.0))
    other.current, other.load_at_choice, other.load = 1, 30.0, lambda: 32.0
    assert not other.due()  # at load 30, two CPUs more is noise (a quarter of it is not)
    machine.load, machine.seconds = 1.1, {1: 0.4, 2: 0.25}  # the other work ended
    assert chooser.due()
    assert chooser.choose(machine.step)["chosen"] == 2 and machine.threads == 2


def test_the_fewest_threads_within_five_percent_of_the_fastest_are_kept():
    assert pick_threads({1: 1.0, 4: 0.97, 8: 0.5}) == 8
    assert pick_threads({1: 1.0, 4: 0.96, 8: 0.99}) == 1  # 4 threads are only 4 % faster: leave CPUs to others
    assert thread_candidates(2, 9.7) == [1, 2]
    assert thread_candidates(16, 6.0) == [1, 10, 16]


def test_the_recipe_takes_auto_a_number_or_null_and_auto_is_the_default():
    assert ComputeConfig().threads == "auto"
    assert ComputeConfig(threads=3).threads == 3 and ComputeConfig(threads=None).threads is None
    with pytest.raises(ValueError, match="threads"):
        ComputeConfig(threads=0)
