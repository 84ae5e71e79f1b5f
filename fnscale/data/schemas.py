"""Data shapes: which columns mean what, detected in a fixed order, each mapped to chat messages.

Every row becomes an `Example`: a conversation of {role, content} messages with at least one assistant
turn after a prompt, or plain `text` (trained on every token). Extra prompt columns (Alpaca's `input`,
Dolly's `context`) go into the user turn after the instruction, separated by a blank line; a `system`
or `system_prompt` column becomes the system message.
"""

from __future__ import annotations

from dataclasses import dataclass

from fnscale.errors import UsageError


@dataclass(frozen=True)
class Shape:
    name: str
    needs: tuple[str, ...]  # columns that identify the shape
    user: tuple[str, ...] = ()  # columns joined (blank line between, empty ones skipped) into the user turn
    assistant: str = ""  # the column trained on
    example: str = ""  # one row, for README and error messages


# Detection order: the first shape whose columns are all present wins (more specific shapes first).
SHAPES = (
    Shape(
        "chat",
        ("messages",),
        example='{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}',
    ),
    Shape(
        "sharegpt",
        ("conversations",),
        example='{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]}',
    ),
    Shape(
        "system-user-assistant",
        ("user", "assistant"),
        ("user",),
        "assistant",
        '{"system": "Be brief.", "user": "Hi", "assistant": "Hello!"}',
    ),
    Shape(
        "dolly",
        ("instruction", "context", "response"),
        ("instruction", "context"),
        "response",
        '{"instruction": "Summarise.", "context": "Long text...", "response": "Short."}',
    ),
    Shape(
        "instruction-response",
        ("instruction", "response"),
        ("instruction",),
        "response",
        '{"instruction": "Say hi.", "response": "Hi!"}',
    ),
    Shape(
        "alpaca",
        ("instruction", "output"),
        ("instruction", "input"),
        "output",
        '{"instruction": "Add.", "input": "2+2", "output": "4"}',
    ),
    Shape(
        "context-question-answer",
        ("context", "question", "answer"),
        ("context", "question"),
        "answer",
        '{"context": "Paris is in France.", "question": "Where is Paris?", "answer": "France"}',
    ),
    Shape("qa", ("question", "answer"), ("question",), "answer", '{"question": "2+2?", "answer": "4"}'),
    Shape(
        "question-response",
        ("question", "response"),
        ("question",),
        "response",
        '{"question": "2+2?", "response": "4"}',
    ),
    Shape(
        "prompt-completion",
        ("prompt", "completion"),
        ("prompt",),
        "completion",
        '{"prompt": "2+2=", "completion": "4"}',
    ),
    Shape("prompt-response", ("prompt", "response"), ("prompt",), "response", '{"prompt": "2+2?", "response": "4"}'),
    Shape("input-output", ("input", "output"), ("input",), "output", '{"input": "2+2?", "output": "4"}'),
    Shape("camel", ("message_1", "message_2"), ("message_1",), "message_2", '{"message_1": "2+2?", "message_2": "4"}'),
    Shape("text", ("text",), example='{"text": "Any document; every token is trained."}'),
)
BY_NAME = {s.name: s for s in SHAPES}
SCHEMAS = ("auto", *BY_NAME)
ACCEPTED = " | ".join("/".join(s.needs) for s in SHAPES)
SYSTEM_COLUMNS = ("system", "system_prompt")
ROLES = {
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "model": "assistant",
    "bot": "assistant",
    "chatgpt": "assistant",
    "system": "system",
}


@dataclass
class Example:
    """A conversation (messages with an assistant turn after a prompt), or plain text (messages None)."""

    messages: list[dict] | None
    text: str | None = None


def custom_shape(prompt_column: str | None, response_column: str | None) -> Shape | None:
    """The shape --prompt-column/--response-column describe (a comma-separated prompt list is joined)."""
    if not (prompt_column or response_column):
        return None
    if not (prompt_column and response_column):
        raise UsageError("pass both --prompt-column and --response-column")
    user = tuple(c.strip() for c in str(prompt_column).split(",") if c.strip())
    return Shape("custom", (*user, response_column), user, response_column)


def detect_schema(columns, schema: str = "auto") -> str:
    """The shape name of data with these columns: the named one (checked) or the first that fits."""
    columns = set(columns)
    if schema not in SCHEMAS:
        raise UsageError(f"unknown --schema {schema!r}; use one of {', '.join(SCHEMAS)}")
    if schema != "auto":
        missing = [c for c in BY_NAME[schema].needs if c not in columns]
        if missing:
            raise UsageError(
                f"--schema {schema} needs columns {list(BY_NAME[schema].needs)}, data has {sorted(columns)}"
            )
        return schema
    for shape in SHAPES:
        if all(c in columns for c in shape.needs):
            return shape.name
    raise UsageError(
        f"no usable columns: found {sorted(columns)}; expected one of {ACCEPTED} (or pass "
        "--prompt-column/--response-column)"
    )


def resolve_shape(
    columns, schema: str = "auto", prompt_column: str | None = None, response_column: str | None = None
) -> Shape:
    """Custom columns when given (checked against the data), else the detected or named shape."""
    shape = custom_shape(prompt_column, response_column)
    if shape is None:
        return BY_NAME[detect_schema(columns, schema)]
    missing = [c for c in shape.needs if c not in columns]
    if missing:
        raise UsageError(f"columns {missing} not in data; found {sorted(columns)}")
    return shape


def row_example(row: dict, shape: Shape) -> Example:
    """One row as an Example; ValueError when the row does not fit the shape."""
    if shape.name == "text":
        return Example(None, str(row["text"]))
    if shape.name in ("chat", "sharegpt"):
        return Example(_conversation(row[shape.needs[0]]))
    user = "\n\n".join(str(row[c]) for c in shape.user if row.get(c) not in (None, ""))
    if not user:
        raise ValueError(f"empty prompt ({', '.join(shape.user)})")
    system = next((str(row[c]) for c in SYSTEM_COLUMNS if row.get(c)), None)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    return Example(messages + [{"role": "assistant", "content": str(row[shape.assistant])}])


def _conversation(turns) -> list[dict]:
    """{role, content} or ShareGPT {from, value} turns, roles normalised to system/user/assistant."""
    if not isinstance(turns, list) or not turns or not all(isinstance(m, dict) for m in turns):
        raise ValueError("expected a list of {role, content} (or {from, value}) objects")
    out = []
    for m in turns:
        role, content = m.get("role", m.get("from")), m.get("content", m.get("value"))
        if role not in ROLES or content is None:
            raise ValueError(f"turn {m} needs a role in {sorted(ROLES)} and a content")
        out.append({"role": ROLES[role], "content": str(content)})
    if not any(m["role"] == "assistant" and any(p["role"] == "user" for p in out[:i]) for i, m in enumerate(out)):
        raise ValueError("no assistant turn after a user turn")
    return out


def to_examples(
    records: list[dict], schema: str = "auto", prompt_column: str | None = None, response_column: str | None = None
) -> list[Example]:
    """Rows as Examples; a row that does not fit gets one line naming it."""
    if not records:
        return []
    shape = resolve_shape(records[0].keys(), schema, prompt_column, response_column)
    return [checked_example(r, shape, i) for i, r in enumerate(records)]


def checked_example(row: dict, shape: Shape, index: int) -> Example:
    try:
        return row_example(row, shape)
    except (KeyError, TypeError, ValueError) as err:
        raise UsageError(f"example {index} does not fit schema {shape.name}: {err}") from err
