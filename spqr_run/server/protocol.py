"""OpenAI-compatible request and response shapes (pydantic), and the API error type.

Requests ignore unknown fields (clients send many we do not use) and reject invalid values with the name of
the parameter; responses follow OpenAI's field names so the official clients parse them unchanged.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    field_validator,
    model_validator,
)

MAX_N = 16  # choices per request (a server limit: OpenAI takes up to 128)
MAX_STOP = 8  # stop strings per request

# fields where OpenAI accepts null for "the default"
NULL_IS_DEFAULT = (
    "temperature", "top_p", "top_k", "min_p", "n", "stream", "presence_penalty", "frequency_penalty",
    "repetition_penalty", "echo", "logprobs",
)  # fmt: skip

TokenId = Annotated[StrictInt, Field(ge=0, lt=2**31)]


def _json_number(value: Any) -> Any:
    """A JSON number only: pydantic's lax mode would also take true/false and numeric strings, which the
    published schema (integer / number) does not allow."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError("must be a JSON number")
    return value


# 13 and 13.0 (both JSON Schema integers), never "13" or true
JsonInt = Annotated[int, BeforeValidator(_json_number)]
JsonFloat = Annotated[float, BeforeValidator(_json_number)]


class APIError(Exception):
    """An error answered to the client as `{"error": {message, type, param, code}}` with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


# ---- requests ---------------------------------------------------------------------------------------------
class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: StrictBool = False


class SamplingFields(BaseModel):
    """Fields shared by both generation endpoints; ranges as OpenAI documents them (or wider where the engine
    accepts more: logprobs up to 20 on /v1/completions, 8 stop strings; `n` stops at MAX_N), null meaning
    the default as in OpenAI's API. `top_p` 0 keeps only the most likely token (the limit of a vanishing
    nucleus)."""

    model_config = ConfigDict(extra="ignore")

    model: StrictStr | None = None
    max_tokens: JsonInt | None = Field(default=None, ge=1)
    # None (not sent, or null): the model's recommended value, else the global default (`sampling.resolve_sampling`)
    temperature: JsonFloat | None = Field(default=None, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: JsonFloat | None = Field(default=None, ge=0.0, le=1.0, allow_inf_nan=False)
    top_k: JsonInt | None = Field(default=None, ge=0)
    min_p: JsonFloat | None = Field(default=None, ge=0.0, le=1.0, allow_inf_nan=False)
    n: JsonInt | None = Field(default=1, ge=1, le=MAX_N)
    stop: StrictStr | list[StrictStr] | None = None
    seed: JsonInt | None = Field(default=None, ge=-(2**63), lt=2**64)
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: JsonFloat | None = Field(default=0.0, ge=-2.0, le=2.0, allow_inf_nan=False)
    frequency_penalty: JsonFloat | None = Field(default=0.0, ge=-2.0, le=2.0, allow_inf_nan=False)
    # the engine accepts (0, 10]; a tiny divisor sends positive logits to inf, so the API stops at 0.01
    repetition_penalty: JsonFloat | None = Field(default=None, ge=0.01, le=10.0, allow_inf_nan=False)
    logit_bias: dict[str, Annotated[JsonFloat, Field(ge=-100, le=100, allow_inf_nan=False)]] | None = None
    user: str | None = None

    @model_validator(mode="after")
    def _nulls_are_defaults(self) -> SamplingFields:
        fields = type(self).model_fields
        for name in NULL_IS_DEFAULT:
            if name in fields and getattr(self, name) is None:
                setattr(self, name, fields[name].default)
        return self

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings")
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _check_bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for key in v or {}:
            if not key.isdigit() or int(key) >= 2**31:
                raise ValueError(f"logit_bias key {key!r} is not a token id")
        return v


# ---- structured outputs and tools (OpenAI's shapes) -------------------------------------------------------
class JSONSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: StrictStr = Field(default="response", min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")  # None: any JSON object
    strict: StrictBool | None = None


class ResponseFormat(BaseModel):
    """`{"type": "text"}`, `{"type": "json_object"}` or `{"type": "json_schema", "json_schema": {...}}`."""

    model_config = ConfigDict(extra="ignore")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema; None: no parameters
    strict: StrictBool | None = None


class ToolDefinition(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function"] = "function"
    function: FunctionDefinition


class FunctionName(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: StrictStr


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function"] = "function"
    function: FunctionName


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionCallDelta(BaseModel):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta | None = None


class CompletionRequest(SamplingFields):
    """POST /v1/completions. `prompt`: a string, a list of strings, token ids or a list of token-id lists."""

    prompt: StrictStr | list[StrictStr] | list[TokenId] | list[list[TokenId]]
    max_tokens: JsonInt | None = Field(default=16, ge=0)  # 0: score the prompt only (with echo + logprobs)
    logprobs: JsonInt | None = Field(default=None, ge=0, le=20)
    echo: StrictBool | None = False
    suffix: str | None = None
    response_format: ResponseFormat | None = None  # structured output of the generated text


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: StrictStr


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # assistant messages that called tools
    tool_call_id: str | None = None  # tool messages: the call they answer

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: JsonInt | None = Field(default=None, ge=1)
    logprobs: StrictBool | None = False
    top_logprobs: JsonInt | None = Field(default=None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[ToolDefinition] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: StrictBool = True


class TokenizeRequest(BaseModel):
    """POST /tokenize: `prompt` text, or `messages` rendered with the chat template."""

    model_config = ConfigDict(extra="ignore")
    model: StrictStr | None = None
    prompt: StrictStr | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: StrictBool = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: StrictStr | None = None
    tokens: list[TokenId]


# ---- responses --------------------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionLogprobs(BaseModel):
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "spqr-run"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeResponse(BaseModel):
    prompt: str


class TokenizerInfoResponse(BaseModel):
    """GET /tokenizer_info (vLLM's route; lm-evaluation-harness tokenizes through /tokenize when it exists)."""

    tokenizer_class: str = "spqr_run.Tokenizer"
    bos_token: str | None = None
    eos_token: str | None = None
    pad_token: str | None = None
    add_bos_token: bool
    model_max_length: int
    chat_template: str | None = None


class HealthResponse(BaseModel):
    status: str
