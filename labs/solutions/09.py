# Solution of exercise 9: paste each block in place of its HOLE line.

# E#9-1
    return sum(1 for record in events if record["type"] == "event" and record["kind"] == "vmcallr")

# E#9-2
    return [record["data"]["call_name"] for record in events
            if record["type"] == "event" and record["kind"] == "vmcallr"]

# E#9-3
    new = next(image["label"] for image in blackout[0]["images"] if image["role"] == "new")
    counts = {}
    for record in blackout:
        if record["type"] == "insn" and record["sym"] and record["sym"].startswith(new + ":"):
            routine = record["sym"].split("+")[0].split(".")[0]   # a local label counts as its routine
            counts[routine] = counts.get(routine, 0) + 1
    return max(counts, key=counts.get)

# E#9-4
    def begins(phase):
        return next(record["t"] for record in events if record["type"] == "event" and record["lp"] == 0
                    and record["kind"] == "restart-phase" and record["data"]["phase_name"] == phase)
    return begins("commit") - begins("blackout")
