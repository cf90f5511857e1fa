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
