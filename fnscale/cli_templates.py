"""`fnscale templates ...` commands (filled by the networks work)."""


def register(group) -> None:
    pass
