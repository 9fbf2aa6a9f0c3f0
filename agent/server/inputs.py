"""Request bodies of each protocol -> the runtime's conversation (docs/spec/server-api.md
§4.2, §5, §6, §7, §8, §10). Bodies are untrusted JSON: every shape problem is a
``BadRequest`` naming the field, answered as 400 in the protocol's error shape.
Unknown top-level fields are ignored (clients send many)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from magnetar.runtime import Message, ToolCall, ToolSpec

NO_LIMIT = 1 << 30  # max_tokens when the client gives none: the worker clamps to the free context
EFFORT_OFF = "none"


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message, self.param = message, param


@dataclass
class Request:
    model: str
    messages: list[Message]
    tools: list[ToolSpec] = field(default_factory=list)
    mode: str = "think"
    max_tokens: int = NO_LIMIT
    sampling: dict = field(default_factory=dict)
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    force_call: bool | str = False  # tool_choice: True = some tool (required / any), a name = that tool
    body: dict = field(default_factory=dict)


def _obj(value: Any, name: str) -> dict:
    if not isinstance(value, dict):
        raise BadRequest(f"'{name}' must be an object", name)
    return value


def _list(value: Any, name: str) -> list:
    if not isinstance(value, list):
        raise BadRequest(f"'{name}' must be an array", name)
    return value


def _text_parts(content: Any, name: str, kinds=("text", "input_text", "output_text")) -> str:
    """A string, null, or an array of text parts (concatenated); media is refused, not dropped."""
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for part in _list(content, name):
        part = _obj(part, name)
        if part.get("type") in kinds and isinstance(part.get("text"), str):
            parts.append(part["text"])
        else:
            raise BadRequest(f"{name}: content part of type {part.get('type')!r} is not supported "
                             "(the model is text-only)", name)
    return "".join(parts)


def _mode(explicit: bool | None, effort: str | None, model: str) -> str:
    """Precedence (§5): explicit toggle > effort none > model alias > default thinking."""
    if explicit is not None:
        return "think" if explicit else "nothink"
    if effort == EFFORT_OFF:
        return "nothink"
    if effort == "max":
        return "think-max"  # the engine falls back to think below its Think-Max context
    if effort is None and model == "deepseek-chat":
        return "nothink"
    return "think"


def _toggle(body: dict) -> bool | None:
    thinking = body.get("thinking")
    if isinstance(thinking, dict) and thinking.get("type") in ("enabled", "disabled", "adaptive"):
        return thinking["type"] != "disabled"
    if isinstance(body.get("think"), bool):
        return body["think"]
    return None


def _sampling(body: dict) -> dict:
    out = {}
    for key, kind in (("temperature", float), ("top_p", float), ("top_k", int), ("min_p", float), ("seed", int)):
        value = body.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise BadRequest(f"'{key}' must be a number", key)
        out[key] = kind(value)
    return out


def _max_tokens(body: dict, *keys: str) -> int:
    for key in keys:
        value = body.get(key)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise BadRequest(f"'{key}' must be a positive integer", key)
            return value
    return NO_LIMIT


def _stops(value: Any, name: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return value
    raise BadRequest(f"'{name}' must be a string or an array of strings", name)


def _tool_spec(name: Any, description: Any, parameters: Any, where: str) -> ToolSpec:
    if not isinstance(name, str) or not name:
        raise BadRequest(f"{where}: a tool needs a name", "tools")
    # Normalized to the official encoder's layout, identical across protocols (§4.2).
    return ToolSpec(name=name, description=description if isinstance(description, str) else "",
                    parameters=parameters if isinstance(parameters, dict) else {})


def _arguments(raw: Any, where: str) -> dict:
    if isinstance(raw, dict):
        return raw
    try:
        value = json.loads(raw or "{}")
    except (TypeError, ValueError):
        raise BadRequest(f"{where}: tool call arguments are not JSON", "messages") from None
    if not isinstance(value, dict):
        raise BadRequest(f"{where}: tool call arguments must be a JSON object", "messages")
    return value


def _base(body: dict, messages: list[Message], tools: list[ToolSpec], mode: str, max_tokens: int,
          stop: list[str]) -> Request:
    model = body.get("model")
    return Request(model=model if isinstance(model, str) else "magnetar", messages=messages, tools=tools,
                   mode=mode, max_tokens=max_tokens, sampling=_sampling(body), stop=stop,
                   stream=body.get("stream") is True, body=body,
                   include_usage=bool((body.get("stream_options") or {}).get("include_usage")))


# -- OpenAI Chat Completions (§6) -------------------------------------------------------------

def chat_request(body: dict) -> Request:
    if body.get("n", 1) != 1:
        raise BadRequest("n > 1 is not supported", "n")
    messages = [_chat_message(_obj(m, "messages"), k) for k, m in enumerate(_list(body.get("messages"), "messages"))]
    tools = [] if body.get("tool_choice") == "none" else _chat_tools(body.get("tools"))
    choice = body.get("tool_choice")
    named = ((choice.get("function") or {}) if isinstance(choice, dict) else {}).get("name")
    model = body.get("model") if isinstance(body.get("model"), str) else ""
    effort = body.get("reasoning_effort")
    request = _base(body, messages, tools, _mode(_toggle(body), effort, model),
                    _max_tokens(body, "max_completion_tokens", "max_tokens"), _stops(body.get("stop"), "stop"))
    request.force_call = _force_call(choice, named, "required", "function", tools)
    return request


def _force_call(choice: Any, named: Any, any_tool: str, one_tool: str, tools: list[ToolSpec]) -> bool | str:
    """tool_choice -> ``Engine.respond``'s ``force_call`` (spec §6: the reply is made to open
    the call; ds4 silently treats these as auto): ``any_tool`` -> True, ``{"type": one_tool,
    name}`` -> the name; auto / none / absent -> False; anything else is a 400."""
    kind = choice.get("type") if isinstance(choice, dict) else choice
    if kind in (None, "auto", "none"):
        return False
    if kind not in (any_tool, one_tool) or (kind == one_tool and not isinstance(choice, dict)):
        raise BadRequest(f"tool_choice {kind!r} is not supported", "tool_choice")
    if not tools:
        raise BadRequest("tool_choice asks for a tool call, but no tools are given", "tool_choice")
    if kind == any_tool:
        return True
    if named not in {t.name for t in tools}:
        raise BadRequest(f"tool_choice names {named!r}, which is not among the tools", "tool_choice")
    return named


def _chat_tools(tools: Any) -> list[ToolSpec]:
    out = []
    for t in _list(tools or [], "tools"):
        fn = _obj(_obj(t, "tools").get("function"), "tools[].function")
        out.append(_tool_spec(fn.get("name"), fn.get("description"), fn.get("parameters"), "tools"))
    return out


def _chat_message(m: dict, k: int) -> Message:
    role = {"developer": "system", "function": "tool"}.get(m.get("role"), m.get("role"))
    if role not in ("system", "user", "assistant", "tool"):
        raise BadRequest(f"messages[{k}]: unknown role {m.get('role')!r}", "messages")
    content = _text_parts(m.get("content"), f"messages[{k}]")
    if role == "tool":
        return Message(role="tool", content=content, tool_call_id=m.get("tool_call_id"))
    if role != "assistant":
        return Message(role=role, content=content)
    calls = []
    for c in _list(m.get("tool_calls") or [], f"messages[{k}].tool_calls"):
        fn = _obj(_obj(c, "tool_calls").get("function"), "tool_calls[].function")
        calls.append(ToolCall(name=str(fn.get("name", "")), arguments=_arguments(fn.get("arguments"), f"messages[{k}]"),
                              id=c.get("id")))
    reasoning = m.get("reasoning_content")
    return Message(role="assistant", content=content, tool_calls=calls,
                   reasoning=reasoning if isinstance(reasoning, str) else None)


# -- legacy Completions (§8) ------------------------------------------------------------------

def completion_request(body: dict) -> Request:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise BadRequest("'prompt' must be a string (token arrays and several prompts are not supported)", "prompt")
    if body.get("n", 1) != 1 or body.get("echo") or body.get("suffix"):
        raise BadRequest("n > 1, echo and suffix are not supported", "n")
    model = body.get("model") if isinstance(body.get("model"), str) else ""
    return _base(body, [Message(role="user", content=prompt)], [], _mode(_toggle(body), body.get("reasoning_effort"),
                 model), _max_tokens(body, "max_tokens"), _stops(body.get("stop"), "stop"))


# -- OpenAI Responses (§7) --------------------------------------------------------------------

def responses_request(body: dict) -> Request:
    for unsupported in ("previous_response_id", "conversation"):
        if body.get(unsupported) is not None:
            raise BadRequest(f"'{unsupported}' is not supported; replay full input instead", unsupported)
    messages = []
    if isinstance(body.get("instructions"), str) and body["instructions"]:
        messages.append(Message(role="system", content=body["instructions"]))
    raw = body.get("input")
    if isinstance(raw, str):
        messages.append(Message(role="user", content=raw))
    else:
        messages += _response_items(_list(raw, "input"))
    tools = [] if body.get("tool_choice") == "none" else _response_tools(body.get("tools"))
    choice = body.get("tool_choice")
    reasoning = body.get("reasoning") if isinstance(body.get("reasoning"), dict) else {}
    model = body.get("model") if isinstance(body.get("model"), str) else ""
    request = _base(body, messages, tools, _mode(_toggle(body), reasoning.get("effort"), model),
                    _max_tokens(body, "max_output_tokens", "max_tokens"), [])
    named = choice.get("name") if isinstance(choice, dict) else None
    request.force_call = _force_call(choice, named, "required", "function", tools)
    return request


def _response_tools(tools: Any) -> list[ToolSpec]:
    out = []
    for t in _list(tools or [], "tools"):
        t = _obj(t, "tools")
        if t.get("type") == "function":
            out.append(_tool_spec(t.get("name"), t.get("description"), t.get("parameters"), "tools"))
        elif t.get("type") == "custom":  # free-form (Codex apply_patch): one string parameter
            params = {"type": "object", "properties": {"input": {"type": "string"}}, "required": ["input"]}
            out.append(_tool_spec(t.get("name"), t.get("description"), params, "tools"))
        # hosted tools (web_search, file_search, mcp...) cannot be rendered: dropped
    return out


def _response_items(items: list) -> list[Message]:
    messages: list[Message] = []
    reasoning: str | None = None
    for k, item in enumerate(items):
        item = _obj(item, "input")
        kind = item.get("type", "message")
        if item.get("status") not in (None, "completed"):
            raise BadRequest(f"input[{k}]: replayed items must be completed", "input")
        if kind == "message":
            role = {"developer": "system"}.get(item.get("role"), item.get("role"))
            if role not in ("system", "user", "assistant"):
                raise BadRequest(f"input[{k}]: unknown role {item.get('role')!r}", "input")
            messages.append(Message(role=role, content=_text_parts(item.get("content"), f"input[{k}]"),
                                    reasoning=reasoning if role == "assistant" else None))
            reasoning = None if role == "assistant" else reasoning
        elif kind == "reasoning":
            texts = [s.get("text", "") for s in item.get("summary") or [] if isinstance(s, dict)]
            texts += [s.get("text", "") for s in item.get("content") or [] if isinstance(s, dict)]
            reasoning = "".join(texts)
        elif kind in ("function_call", "custom_tool_call"):
            args = _arguments(item.get("arguments"), f"input[{k}]") if kind == "function_call" \
                else {"input": str(item.get("input", ""))}
            call = ToolCall(name=str(item.get("name", "")), arguments=args, id=item.get("call_id"))
            prev = messages[-1] if messages else None
            if prev is not None and prev.role == "assistant":  # calls after an assistant message join it
                prev.tool_calls.append(call)
            else:
                messages.append(Message(role="assistant", tool_calls=[call], reasoning=reasoning))
            reasoning = None
        elif kind in ("function_call_output", "custom_tool_call_output"):
            output = item.get("output")
            text = output if isinstance(output, str) else _text_parts(output, f"input[{k}].output")
            messages.append(Message(role="tool", content=text, tool_call_id=item.get("call_id")))
        elif kind != "compaction":
            raise BadRequest(f"input[{k}]: item type {kind!r} is not supported", "input")
    return messages


# -- Anthropic Messages (§10) -----------------------------------------------------------------

def anthropic_request(body: dict) -> Request:
    messages = []
    system = _anthropic_system(body.get("system"))
    if system:
        messages.append(Message(role="system", content=system))
    for k, m in enumerate(_list(body.get("messages"), "messages")):
        messages += _anthropic_message(_obj(m, "messages"), k)
    choice = body.get("tool_choice") if isinstance(body.get("tool_choice"), dict) else {}
    tools = [] if choice.get("type") == "none" else _anthropic_tools(body.get("tools"))
    force_call = _force_call(choice, choice.get("name"), "any", "tool", tools)
    effort = (body.get("output_config") or {}).get("effort") if isinstance(body.get("output_config"), dict) else None
    model = body.get("model") if isinstance(body.get("model"), str) else ""
    request = _base(body, messages, tools, _mode(_toggle(body), effort, model), _max_tokens(body, "max_tokens"),
                    _stops(body.get("stop_sequences"), "stop_sequences"))
    request.force_call = force_call
    return request


def _anthropic_system(system: Any) -> str:
    if system is None or isinstance(system, str):
        return system or ""
    # Claude Code's attribution block changes per conversation: dropped, or no prefix would ever match.
    blocks = [b for b in _list(system, "system") if not str(_obj(b, "system").get("text", "")).startswith("x-anthropic-")]
    return _text_parts(blocks, "system", kinds=("text",))


def _anthropic_tools(tools: Any) -> list[ToolSpec]:
    out = []
    for t in _list(tools or [], "tools"):
        t = _obj(t, "tools")
        if "input_schema" in t:  # server tools (typed, no schema) cannot be rendered
            out.append(_tool_spec(t.get("name"), t.get("description"), t.get("input_schema"), "tools"))
    return out


def _anthropic_message(m: dict, k: int) -> list[Message]:
    role = m.get("role")
    if role not in ("user", "assistant"):
        raise BadRequest(f"messages[{k}]: role must be user or assistant", "messages")
    content = m.get("content")
    blocks = [{"type": "text", "text": content}] if isinstance(content, str) else _list(content, f"messages[{k}]")
    text, reasoning, calls, out = [], None, [], []
    for b in blocks:
        b = _obj(b, f"messages[{k}].content")
        kind = b.get("type")
        if kind == "text":
            text.append(str(b.get("text", "")))
        elif kind == "thinking" and role == "assistant":
            reasoning = (reasoning or "") + str(b.get("thinking", ""))
        elif kind == "tool_use" and role == "assistant":
            calls.append(ToolCall(name=str(b.get("name", "")), arguments=_arguments(b.get("input"), f"messages[{k}]"),
                                  id=b.get("id")))
        elif kind == "tool_result" and role == "user":
            result = b.get("content")
            result = result if isinstance(result, str) else _text_parts(result, f"messages[{k}]", kinds=("text",))
            out.append(Message(role="tool", content=result, tool_call_id=b.get("tool_use_id")))
        elif kind != "redacted_thinking":
            raise BadRequest(f"messages[{k}]: content block {kind!r} is not supported (the model is text-only)",
                             "messages")
    if role == "assistant":
        return [Message(role="assistant", content="".join(text), reasoning=reasoning, tool_calls=calls)]
    if text or not out:
        out.append(Message(role="user", content="".join(text)))
    return out
