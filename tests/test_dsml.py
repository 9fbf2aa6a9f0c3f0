"""runtime.dsml: the incremental DSML stream parser."""

from __future__ import annotations

import json

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from magnetar.runtime.chat import Message, ToolCall, render
from magnetar.runtime.dsml import (BlockDone, DsmlError, DsmlInThinking, DsmlParser,
                                   ReasoningDelta, State, TextDelta, ToolCallParsed,
                                   ToolCallStarted)

D = "｜DSML｜"
OPEN = f"<{D}tool_calls>"
CLOSE = f"</{D}tool_calls>"


def invoke(name: str, *params: str) -> str:
    return f'<{D}invoke name="{name}">\n' + "\n".join(params) + f"\n</{D}invoke>"


def param(name: str, value: str, string: bool = True) -> str:
    flag = "true" if string else "false"
    return f'<{D}parameter name="{name}" string="{flag}">{value}</{D}parameter>'


def block(*invokes: str) -> str:
    return f"{OPEN}\n" + "\n".join(invokes) + f"\n{CLOSE}"


def merged(events: list) -> list:
    """Adjacent deltas of the same kind joined; empty deltas dropped."""
    out: list = []
    for ev in events:
        if isinstance(ev, (TextDelta, ReasoningDelta)):
            if not ev.text:
                continue
            if out and type(out[-1]) is type(ev):
                out[-1] = type(ev)(out[-1].text + ev.text)
                continue
        out.append(ev)
    return out


def parse(chunks: list[str] | str, thinking: bool = False) -> list:
    parser = DsmlParser(thinking=thinking)
    events = []
    for chunk in [chunks] if isinstance(chunks, str) else chunks:
        events += parser.feed(chunk)
    return merged(events + parser.finish())


def calls(events: list) -> list[ToolCall]:
    return [ev.call for ev in events if isinstance(ev, ToolCallParsed)]


def errors(events: list) -> list[DsmlError]:
    return [ev for ev in events if isinstance(ev, DsmlError)]


TRICKY = 'a </b> <c x="1"> "quoted" \'single\'\n  second line </ < ｜DSML｜ &amp; &lt;p>'
MULTI = ("I will look.\n\n"
         + block(invoke("read_file", param("path", "src/app.py"),
                        param("max_lines", "200", string=False)),
                 invoke("write", param("text", TRICKY),
                        param("esc", f"x&lt;/{D}parameter>y")),
                 invoke("noargs")))
JSON_ALL = block(invoke("j", param("i", "-12", False), param("f", "2.5e3", False),
                        param("t", "true", False), param("n", "null", False),
                        param("s", '"a</b>\\n\\u00fc"', False),
                        param("a", '[1, "two", [3], {"k": false}]', False),
                        param("o", '{"x": {"y": [null]}, "z": "</"}', False),
                        param("ws", '  \n 7 \n', False)))

# Inputs for the split-invariance tests: (text, thinking).
CORPUS = [
    (MULTI, False),
    ("deep thought < with <think> and </thin words</think>Answer: 3 < 4.\n", True),
    ("plan " + block(invoke("x", param("a", "1"))) + " more plan</think>ok\n\n"
     + block(invoke("y", param("b", "2"))), True),
    (JSON_ALL, False),
    ("just text with a trailing newline \n", False),
    ("text\n" + block(invoke("a", param("p", "v"), param("p", "w"))), False),
    ("t " + f'{OPEN}\n<{D}invoke name=read>', False),
    (block(invoke("a", param("p", "{bad json", False))), False),
    (block(invoke("a", param("p", "v"))) + "\n\n trailing", False),
    (f"{OPEN}\n" + invoke("a", param("p", "unterminated")), False),
    (f"{OPEN}\n<{D}foo>", False),
    ("hi <b>bold</b> and a stray </ and <", False),
    ("unterminated reasoning </th", True),
]


# --- behaviour ------------------------------------------------------------------

def test_text_then_block_with_several_invokes():
    events = parse(MULTI)
    assert events[0] == TextDelta("I will look.")  # "\n\n" is block framing
    assert [e.name for e in events if isinstance(e, ToolCallStarted)] == \
        ["read_file", "write", "noargs"]
    got = calls(events)
    assert [(c.name, c.arguments) for c in got] == [
        ("read_file", {"path": "src/app.py", "max_lines": 200}),
        ("write", {"text": TRICKY, "esc": f"x</{D}parameter>y"}),
        ("noargs", {}),
    ]
    dsml = MULTI[MULTI.index(OPEN):]
    assert all(c.dsml == dsml for c in got)
    assert isinstance(events[-1], BlockDone) and not errors(events)


def test_json_values_of_every_type():
    args = calls(parse(JSON_ALL))[0].arguments
    assert args == {"i": -12, "f": 2500.0, "t": True, "n": None, "s": "a</b>\nü",
                    "a": [1, "two", [3], {"k": False}], "o": {"x": {"y": [None]}, "z": "</"},
                    "ws": 7}


def test_only_the_param_close_escape_is_decoded():
    text = block(invoke("w", param("v", f"&amp; &gt; &lt;b> &lt;/{D}parameter> &quot;")))
    assert calls(parse(text))[0].arguments["v"] == f"&amp; &gt; &lt;b> </{D}parameter> &quot;"


def test_whitespace_between_elements_is_lenient():
    text = (f"{OPEN}  \n\t<{D}invoke name=\"a\">\n\n  "
            f"{param('p', ' keep  spaces ')}  \n</{D}invoke>\n\n{CLOSE}  \n")
    events = parse(text)
    assert calls(events)[0].arguments == {"p": " keep  spaces "}
    assert not errors(events)


def test_block_without_leading_newlines_and_events_order():
    events = parse("ok" + block(invoke("a", param("p", "v"))))
    kinds = [type(e).__name__ for e in events]
    assert kinds == ["TextDelta", "ToolCallStarted", "ToolCallParsed", "BlockDone"]


def test_tool_call_started_fires_before_the_block_ends():
    parser = DsmlParser(thinking=False)
    assert parser.feed(f'{OPEN}\n<{D}invoke name="rea') == []
    assert parser.feed('d">\n<') == [ToolCallStarted("read")]
    assert parser.state is State.INVOKE
    parser.feed(f'{D}parameter name="p" string="true">body')
    assert parser.state is State.VALUE


def test_dsml_inside_thinking_is_not_a_tool_call():
    inner = block(invoke("rm", param("path", "/")))
    events = parse(f"maybe {inner} no</think>Sure.", thinking=True)
    assert events == [ReasoningDelta(f"maybe {OPEN}"), DsmlInThinking(),
                      ReasoningDelta(inner[len(OPEN):] + " no"), TextDelta("Sure.")]


def test_reasoning_then_real_block():
    events = parse("think</think>\n\n" + block(invoke("a")), thinking=True)
    assert events[0] == ReasoningDelta("think")
    assert calls(events)[0].name == "a"


def test_text_streams_with_minimal_hold_back():
    parser = DsmlParser(thinking=False)
    assert parser.feed("Hello wor") == [TextDelta("Hello wor")]
    assert parser.feed("ld <") == [TextDelta("ld ")]         # "<" may start a block
    assert parser.feed("b>") == [TextDelta("<b>")]
    assert parser.feed("\n\n") == []                        # could be block framing
    assert parser.finish() == [TextDelta("\n\n")]
    thinker = DsmlParser(thinking=True)
    assert thinker.feed("abc</thi") == [ReasoningDelta("abc")]
    assert thinker.feed("nk>x") == [TextDelta("x")]


# --- malformed input: one DsmlError, never an exception --------------------------------

MALFORMED = {
    "bad attribute": block(f'<{D}invoke name=read>\n</{D}invoke>'),
    "missing string attr": block(invoke("a", f'<{D}parameter name="p">v</{D}parameter>')),
    "bad string flag": block(invoke("a", f'<{D}parameter name="p" string="yes">v'
                                         f"</{D}parameter>")),
    "extra space": block(f'<{D}invoke  name="a">\n</{D}invoke>'),
    "unknown tag": block(f"<{D}function_calls>"),
    "unknown plain tag": f"{OPEN}\n<invoke name=\"a\">",
    "text in block": f"{OPEN}\nhello",
    "param outside invoke": block(param("p", "v")),
    "nested invoke": block(invoke("a", invoke("b"))),
    "invalid json": block(invoke("a", param("n", "{'single': 1}", False))),
    "empty json": block(invoke("a", param("n", "", False))),
    "duplicate param": block(invoke("a", param("p", "1"), param("p", "2"))),
    "empty block": f"{OPEN}\n{CLOSE}",
    "unterminated block": f"{OPEN}\n" + invoke("a", param("p", "v")),
    "unterminated value": f"{OPEN}\n<{D}invoke name=\"a\">\n<{D}parameter name=\"p\" "
                          f'string="true">half',
    "unterminated tag": f"{OPEN}\n<{D}invo",
    "stray invoke in text": f'ok <{D}invoke name="a">',
    "close tag in text": f"ok {CLOSE}",
    "text after block": block(invoke("a")) + "\n\nand more",
    "second block": block(invoke("a")) + block(invoke("b")),
    "tag too long": f"{OPEN}\n<{D}invoke name=\"" + "x" * 600,
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_gives_one_error_event(case):
    text = MALFORMED[case]
    events = parse(text)
    errs = errors(events)
    assert len(errs) == 1, events
    assert errs[0].message and errs[0].raw and errs[0].raw in text
    if case not in ("text after block", "second block"):
        assert calls(events) == [] and BlockDone() not in events
    # Char-by-char gives the same error.
    assert parse(list(text)) == events


def test_error_messages_name_the_problem():
    assert "duplicate parameter 'p'" in errors(parse(MALFORMED["duplicate param"]))[0].message
    assert "not valid JSON" in errors(parse(MALFORMED["invalid json"]))[0].message
    assert "unterminated" in errors(parse(MALFORMED["unterminated block"]))[0].message
    err = errors(parse(MALFORMED["text after block"]))[0]
    assert err.message == "text after tool_calls" and err.raw == "\n\na"
    assert "malformed attributes" in errors(parse(MALFORMED["bad attribute"]))[0].message
    assert "unknown tag" in errors(parse(MALFORMED["unknown tag"]))[0].message


def test_input_after_an_error_is_ignored_and_finish_is_idempotent():
    parser = DsmlParser(thinking=False)
    assert len(errors(parser.feed(MALFORMED["unknown tag"]))) == 1
    assert parser.feed("more text") == [] and parser.finish() == []
    assert parser.finish() == []
    with pytest.raises(RuntimeError):
        parser.feed("x")


def test_trailing_whitespace_after_block_is_fine():
    events = parse(block(invoke("a")) + " \n\n")
    assert not errors(events) and events[-1] == BlockDone()


# --- streaming invariance ------------------------------------------------------------

@pytest.mark.parametrize("index", range(len(CORPUS)))
def test_every_split_point_gives_the_same_events(index):
    text, thinking = CORPUS[index]
    whole = parse(text, thinking)
    assert whole  # the corpus exercises something
    for cut in range(len(text) + 1):
        assert parse([text[:cut], text[cut:]], thinking) == whole, cut
    assert parse(list(text), thinking) == whole


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_random_multi_splits_give_the_same_events(data):
    text, thinking = data.draw(st.sampled_from(CORPUS))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=12)))
    chunks = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    assert parse(chunks, thinking) == parse(text, thinking)


# --- round trip with chat.render -------------------------------------------------------

def _assistant_output(call_list: list[ToolCall], content: str, reasoning: str) -> str:
    """What the model would have sampled after the <think> opener."""
    r = render([Message(role="user", content="go"),
                Message(role="assistant", content=content, reasoning=reasoning,
                        tool_calls=call_list)],
               mode="think", add_generation_prompt=False)
    head = render([Message(role="user", content="go")], mode="think").text
    assert r.text.startswith(head)
    return r.text[len(head):]


ROUND_TRIP_CALLS = [
    ToolCall(name="write_file", arguments={
        "path": "a/b.py", "text": f'x = "</"\ny = \'<\'\n<{D}invoke name="no">\n'
                                  f"end</{D}parameter>!", "empty": ""}),
    ToolCall(name="run", arguments={"argv": ["ls", "-l", f"</{D}parameter>"], "n": 3,
                                    "cfg": {"a": None, "b": [True, 1.5]}}),
]


def test_round_trip_through_render_and_parser():
    out = _assistant_output(ROUND_TRIP_CALLS, "Writing.", "I should write")
    events = parse(out, thinking=True)
    assert events[0] == ReasoningDelta("I should write")
    assert events[1] == TextDelta("Writing.")
    got = calls(events)
    assert [(c.name, c.arguments) for c in got] == \
        [(c.name, c.arguments) for c in ROUND_TRIP_CALLS]
    # Replaying the parsed calls (they carry dsml) reproduces the text exactly.
    assert _assistant_output(got, "Writing.", "I should write") == out
    for cut in range(0, len(out), 7):
        assert parse([out[:cut], out[cut:]], thinking=True) == events


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                max_size=3),
    max_leaves=8)
_name = st.text("abcdefghijklmnopqrstuvwxyz_0123456789", min_size=1, max_size=12)
_value = st.one_of(st.text(max_size=60),
                   st.sampled_from(["</", "<", '"', f"</{D}", f"</{D}parameter>",
                                    f"<{D}invoke>", "\n\n", "</think>"]),
                   _json)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(_name, st.dictionaries(_name, _value, max_size=4)),
                min_size=1, max_size=3),
       st.text(max_size=30))
def test_round_trip_random_calls(raw_calls, content):
    original = [ToolCall(name=n, arguments=a) for n, a in raw_calls]
    dumped = json.dumps([c.arguments for c in original], ensure_ascii=False)
    assume(f"&lt;/{D}parameter>" not in dumped)    # the one ambiguous spelling
    assume(D not in content and "</think>" not in content)
    out = _assistant_output(original, content, "r")
    events = parse(out, thinking=True)
    assert not errors(events)
    assert [(c.name, c.arguments) for c in calls(events)] == \
        [(c.name, c.arguments) for c in original]
    text = "".join(e.text for e in events if isinstance(e, TextDelta))
    assert text == content  # only the "\n\n" framing is dropped
