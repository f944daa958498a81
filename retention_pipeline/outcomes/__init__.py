"""Measure and adjust: who came back after each assignment, performance against the holdout,
and the decisions (variant shares, paused steps) the next day's audience follows."""
