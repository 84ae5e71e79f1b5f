"""`fnscale eval ...` commands (filled by the evaluation work)."""


def register(group, root) -> None:
    pass
