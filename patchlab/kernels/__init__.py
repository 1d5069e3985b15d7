"""Pure tensor math, no I/O: deltas, vocabulary rows, drift and intruders, low-rank and sparse factors."""
