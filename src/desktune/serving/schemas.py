"""The OpenAI-shaped request and response bodies, as pydantic models (they also make the OpenAPI description)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

FinishReason = Literal["stop", "length"]
StopText = Annotated[str, Field(min_length=1)]


class _Strict(BaseModel):
    """Unknown fields are refused by name rather than silently ignored; no type is coerced ("5" is not 5, "yes"
    not true) and numbers are finite (1e400 reads as infinity)."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class TextPart(_Strict):
    """One text part of a message's content."""

    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    """A message of the conversation (`developer` is read as `system`)."""

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None


class StreamOptions(_Strict):
    """`include_usage`: a last chunk carries the token counts."""

    include_usage: bool = False


class _Sampling(_Strict):
    """What both endpoints share: the model (a base or adapter name), sampling and streaming."""

    model: str = Field(min_length=1, max_length=512, description="A name from GET /v1/models.")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 = greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=1, description="Only one choice per request.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: StopText | Annotated[list[StopText], Field(max_length=4)] | None = Field(
        None, description="Up to 4 strings that end the answer.")
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    frequency_penalty: float = Field(0.0, ge=0.0, le=0.0, description="Not supported: 0 only.")
    presence_penalty: float = Field(0.0, ge=0.0, le=0.0, description="Not supported: 0 only.")
    user: str | None = None


class ChatRequest(_Sampling):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, description="Default: the server's limit (or what the context "
                                                             "leaves).")
    max_completion_tokens: int | None = Field(None, ge=1, description="The newer name of max_tokens.")


class CompletionRequest(_Sampling):
    """POST /v1/completions: raw text continued, no chat template."""

    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)] = Field(
        description="One prompt (a list must hold exactly one).")
    max_tokens: int = Field(16, ge=1)
    echo: Literal[False] = Field(False, description="Not supported: false only.")


class Usage(BaseModel):
    """Token counts of one request."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    """The answer."""

    role: Literal["assistant"] = "assistant"
    content: str


class _Answer(BaseModel):
    """What every answer and streamed chunk carries: its id, when it was made, the model that made it."""

    id: str
    created: int
    model: str


class ChatChoice(BaseModel):
    """One answer and why it ended."""

    index: int
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: None = None


class ChatCompletion(_Answer):
    """A whole chat answer (stream=false)."""

    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage


class CompletionChoice(BaseModel):
    """One continuation and why it ended."""

    index: int
    text: str
    finish_reason: FinishReason
    logprobs: None = None


class Completion(_Answer):
    """A whole text completion (stream=false)."""

    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage


class ModelCard(BaseModel):
    """A model the server answers as: the base or one of its adapters."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "desktune"


class ModelList(BaseModel):
    """GET /v1/models."""

    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    """What went wrong, in OpenAI's shape."""

    message: str
    type: str
    code: str | None = None
    param: str | None = None


class ErrorResponse(BaseModel):
    """Every error answer: {"error": {...}}."""

    error: ErrorBody


class ChatDelta(BaseModel):
    """What a chunk adds to the answer: the role (first chunk) or text."""

    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    """One streamed piece; the last one carries the finish reason."""

    index: int
    delta: ChatDelta
    logprobs: None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(_Answer):
    """A streamed chat event's data (stream=true); with include_usage the last has no choices and the usage."""

    object: Literal["chat.completion.chunk"]
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChunkChoice(BaseModel):
    """One streamed piece of text; the last one carries the finish reason."""

    index: int
    text: str
    logprobs: None = None
    finish_reason: FinishReason | None = None


class CompletionChunk(_Answer):
    """A streamed completion event's data (stream=true)."""

    object: Literal["text_completion"]
    choices: list[CompletionChunkChoice]
    usage: Usage | None = None
