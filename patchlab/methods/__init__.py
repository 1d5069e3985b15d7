"""The verbs: extract, apply/port, compress, PEFT import/export. Each plans, then runs on the engine."""
