"""What a trainer printed on stderr, read from pytest's capsys."""


def one_error_line(capsys) -> str:
    """The one `error:` line; any other line is the trainer's own progress note, never a traceback."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]
