"""The lab book's grader can fail: every unmodified exercise scores below full marks, every solution
scores full marks, and each planted mistake loses exactly the points of the tests meant to catch it."""
import pytest

from tools.lab import book, grading, holes, material, solving, workspace

EXERCISES = list(book.exercises().values())
MISTAKES = [(exercise, mistake) for exercise in EXERCISES for mistake in exercise.mistakes]
SEED = 0x1AB5


def _id(value):
    return value.directory_name if isinstance(value, book.Exercise) else None


@pytest.mark.parametrize("exercise", EXERCISES, ids=_id)
def test_an_unmodified_exercise_stops_at_its_first_hole_and_scores_below_full_marks(exercise, tmp_path):
    directory = workspace.start(exercise, tmp_path)
    result = grading.grade(exercise, directory, SEED)
    assert not result.full_marks
    if any(hole.planted is None for hole in exercise.holes):      # a planted bug stops nothing: it is found
        assert result.run.hole is not None
        assert result.run.hole.startswith(f"not yet implemented: E#{exercise.number}-")
    report = "\n".join(grading.render(result))
    assert "FAIL" in report and f"hhr lab hint {exercise.number}" in report


@pytest.mark.parametrize("exercise", EXERCISES, ids=_id)
def test_the_solution_scores_full_marks(exercise, tmp_path):
    result = grading.grade(exercise, solving.start_filled(exercise, tmp_path), SEED)
    assert result.full_marks, "\n".join(grading.render(result))


@pytest.mark.parametrize("exercise,mistake", MISTAKES,
                         ids=[f"{exercise.directory_name}-{mistake.hole}-{index}"
                              for index, (exercise, mistake) in enumerate(MISTAKES)])
def test_a_planted_mistake_loses_exactly_the_points_of_its_tests(exercise, mistake, tmp_path):
    result = grading.grade(exercise, solving.start_filled(exercise, tmp_path, mistake), SEED)
    assert result.failed() == set(mistake.fails), "\n".join(grading.render(result))
    lost = sum(test.points for test in exercise.tests if test.name in mistake.fails)
    assert result.score == exercise.points - lost


@pytest.mark.parametrize("exercise", EXERCISES, ids=_id)
def test_every_exercise_is_complete(exercise):
    names = {hole.name(exercise.number) for hole in exercise.holes}
    assert set(solving.solution_blocks(exercise)) == names, "one solution block per hole"
    assert {test.hole for test in exercise.tests} - {None} <= names
    assert {mistake.hole for mistake in exercise.mistakes} <= names and exercise.mistakes
    assert {name for mistake in exercise.mistakes for name in mistake.fails} <= {test.name for test in exercise.tests}
    assert len({test.name for test in exercise.tests}) == len(exercise.tests)
    page = material.package_directory().parent / "docs" / "labs" / f"{exercise.directory_name}.md"
    assert page.exists(), f"docs/labs/{exercise.directory_name}.md"


@pytest.mark.parametrize("exercise", [exercise for exercise in EXERCISES
                                      if exercise.prepare is material.prepare_hypervisor], ids=_id)
def test_a_hypervisor_exercise_s_solution_is_the_code_its_regions_cut_out(exercise):
    assert solving.solution_blocks(exercise) == material.region_texts(exercise)


def test_a_solution_block_pasted_by_hand_replaces_only_its_hole(tmp_path):
    exercise = EXERCISES[0]
    directory = workspace.start(exercise, tmp_path)
    first = exercise.holes[0].name(exercise.number)
    filled = holes.fill(directory, exercise.files, {first: solving.solution_blocks(exercise)[first]})
    assert filled == [first]
    left = holes.sites(directory, exercise.files)
    assert first not in left and len(left) == len(exercise.holes) - 1
    result = grading.grade(exercise, directory, SEED)
    assert result.run.hole.startswith(f"not yet implemented: {exercise.holes[1].name(exercise.number)} at ")


def test_starting_twice_keeps_the_student_s_work(tmp_path):
    exercise = EXERCISES[0]
    directory = workspace.start(exercise, tmp_path)
    (directory / exercise.files[0]).write_text("my work\n")
    with pytest.raises(FileExistsError):
        workspace.start(exercise, tmp_path)
    assert (directory / exercise.files[0]).read_text() == "my work\n"


def test_the_values_a_run_uses_change_with_the_seed(tmp_path):
    exercise = EXERCISES[0]
    directory = solving.start_filled(exercise, tmp_path)
    first, second = (grading.grade(exercise, directory, seed) for seed in (1, 2))
    assert first.full_marks and second.full_marks
    assert first.run.values != second.run.values


def test_a_failed_vm_entry_is_explained_in_the_run_and_the_report(tmp_path):
    exercise = book.exercise(2)
    mistake = next(mistake for mistake in exercise.mistakes if "TSS" in mistake.what)
    result = grading.grade(exercise, solving.start_filled(exercise, tmp_path, mistake), SEED)
    assert result.run.entry_failure().startswith("VMENTER FAIL: VMCS guest state invalid TR.AR")
    assert f"a VM entry failed: {result.run.entry_failure()}" in result.run.summary()
    report = "\n".join(grading.render(result))
    assert f"the machine says: {result.run.entry_failure()}" in report


def test_an_exercise_is_given_the_work_of_the_exercises_before_it_only(tmp_path):
    given = {number: {path.name for path in workspace.start(book.exercise(number), tmp_path).glob("*.inc")}
             for number in (1, 2, 3)}
    assert "vmx_on.inc" not in given[1] and "vmx_on.inc" in given[2]
    assert "vmcs_setup.inc" not in given[2] and "vmcs_setup.inc" in given[3]


def test_the_command_line_as_a_student_uses_it(tmp_path, monkeypatch, capsys):
    from tools import cli
    monkeypatch.chdir(tmp_path)
    assert cli.main(["lab", "start", "1"]) == 0
    directory = tmp_path / workspace.DEFAULT_DIRECTORY / book.exercise(1).directory_name
    monkeypatch.chdir(directory)                         # inside the exercise's folder, as the page says
    capsys.readouterr()
    assert cli.main(["lab", "run", "1", "--seed", "7"]) == 1
    assert "not yet implemented: E#1-1 at monitor.s:" in capsys.readouterr().out
    assert cli.main(["lab", "hint", "1", "2"]) == 0
    assert "IA32_VMX_CR4_FIXED0" in capsys.readouterr().out
    assert cli.main(["lab", "grade", "1", "--seed", "7"]) == 1
    report = capsys.readouterr().out
    assert "seed 0x7" in report and "score: 0/40" in report
    holes.fill(directory, book.exercise(1).files, solving.solution_blocks(book.exercise(1)))
    assert cli.main(["lab", "grade", "--seed", "7"]) == 1        # every exercise: only the first is started
    report = capsys.readouterr().out
    assert "score: 40/40" in report and "not started (hhr lab start 2)" in report
    assert cli.main(["lab", "grade", "1"]) == 0
    assert cli.main(["lab", "start", "1"]) == 2                   # the student's work stays
    assert "exists already" in capsys.readouterr().err


def test_an_answer_that_loops_or_exits_costs_only_its_own_points(tmp_path, monkeypatch):
    from tools.lab import reading_run
    monkeypatch.setattr(reading_run, "ANSWER_SECONDS", 1)
    exercise = book.exercise(9)
    directory = solving.start_filled(exercise, tmp_path)
    answers = directory / reading_run.ANSWERS_FILE
    text = answers.read_text()
    text = text.replace("def inverse_calls(events):\n", "def inverse_calls(events):\n    while True:\n        pass\n", 1)
    text = text.replace("def call_sequence(events):\n", "def call_sequence(events):\n    raise SystemExit(3)\n", 1)
    answers.write_text(text)
    result = grading.grade(exercise, directory, SEED)
    assert result.failed() == {"inverse-calls", "call-sequence"}
    report = "\n".join(grading.render(result))
    assert "no answer within 1 s" in report and "SystemExit: 3 at answers.py:" in report


HYPERVISOR_EXERCISES = [exercise for exercise in EXERCISES if exercise.prepare is material.prepare_hypervisor]


@pytest.mark.parametrize("exercise", HYPERVISOR_EXERCISES, ids=_id)
def test_a_hypervisor_exercise_s_solution_is_the_code_of_its_regions(exercise):
    """The solution blocks are the marked regions of the package's own sources, so they cannot drift."""
    assert solving.solution_blocks(exercise) == material.region_texts(exercise)
