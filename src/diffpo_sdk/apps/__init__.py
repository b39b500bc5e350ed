"""Apps and tooling: the ``diffpo`` command, the offline demo and the local drafter LLM (the last two need torch)."""
