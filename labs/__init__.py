"""The lab book: ten exercises from an empty root-mode program to a hot restart (docs/labs/), each with holes, hints, a solution and a grader."""
