"""The one streaming executor, the delta sources it reads from, and device resolution."""
