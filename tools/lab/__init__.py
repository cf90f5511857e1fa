"""`hhr lab`: the lab book's exercises, started in a working directory, run and graded."""
