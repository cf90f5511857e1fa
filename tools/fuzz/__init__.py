"""`hhr fuzz`: a coverage-guided fuzzer of the hot restart's state transfer (docs/fuzzing.md)."""
