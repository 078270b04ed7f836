"""Wire message types: each round-trips through the codec, each malformed input is refused with ProtocolError, and
header fields this version does not know are ignored."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

from swarm.transport.codec import Message, decode, encode
from swarm.transport.errors import ProtocolError, UnknownMethod
from swarm.transport.messages import (
    CAPABILITIES,
    MAX_WAIT,
    REQUESTS,
    Backward,
    BackwardReply,
    Cancel,
    CancelReply,
    Close,
    Forward,
    ForwardReply,
    Info,
    Open,
    OpenReply,
    Ping,
    Push,
    PushTarget,
    Step,
    StepReply,
    parse_capabilities,
    parse_request,
    require_finite,
    supports,
)
from swarm.transport.rpc import RESULT

HIDDEN = 8


def hidden(batch: int = 2, length: int = 3, size: int = HIDDEN) -> torch.Tensor:
    return torch.randn(batch, length, size)


def mask(batch: int = 2, length: int = 3, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    return torch.ones(batch, length, dtype=dtype)


def prompts(blocks: int = 2, batch: int = 1, length: int = 2, size: int = HIDDEN) -> torch.Tensor:
    return torch.randn(blocks, batch, length, size)


def through_codec(kind: str, fields: dict[str, Any], tensors: list[torch.Tensor]) -> Message:
    """What a peer decodes: encoded frames as plain bytes, decoded."""
    return decode([bytes(f) for f in encode(kind, 11, fields, tensors)])


def same(a: object, b: object) -> bool:
    """Field-by-field equality, tensors by value (message types compare by identity)."""
    if type(a) is not type(b):
        return False
    for f in dataclasses.fields(a):  # type: ignore[arg-type]
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.dtype == y.dtype
                    and torch.equal(x, y)):
                return False
        elif x != y:
            return False
    return True


# --- round trips ---------------------------------------------------------------------------------------------------

REQUEST_CASES = {
    "ping": Ping(),
    "info": Info(),
    "forward": Forward(hidden()),
    "forward_all": Forward(hidden(), mask(dtype=torch.int8), prompts(), blocks=(3, 5), keep=True),
    "forward_bool_mask": Forward(hidden(), mask(dtype=torch.bool)),
    "backward": Backward(hidden(), hidden()),
    "backward_all": Backward(hidden(), hidden(), mask(), prompts(batch=2), blocks=(0, 2), kept="k" * 24),
    "open": Open(16),
    "open_all": Open(16, batch_size=3, blocks=(1, 4)),
    "step": Step("s" * 32, hidden()),
    "step_all": Step("s", hidden(1, 4), mask(1, 4), prompts(3, 1, 4), start=0,
                     push=PushTarget("tcp://127.0.0.1:5555", "t", "x.1")),
    "step_relayed": Step("s", ticket="x.1"),
    "step_relayed_all": Step("s", attention_mask=mask(), prompts=prompts(), start=7, ticket="x.2", wait=MAX_WAIT,
                             push=PushTarget("tcp://10.0.0.1:1", "u", "x.3")),
    "push": Push("s", "x.1", hidden()),
    "cancel": Cancel("s", "x.1"),
    "close": Close("s"),
}


@pytest.mark.parametrize("case", list(REQUEST_CASES))
def test_requests_round_trip_through_the_codec(case: str) -> None:
    request = REQUEST_CASES[case]
    kind, fields, tensors = request.to_wire()
    assert kind == request.TYPE
    message = through_codec(kind, fields, tensors)
    assert same(type(request).from_wire(message), request)
    assert same(parse_request(message), request)


def test_names_list_the_tensors_in_order() -> None:
    _, fields, tensors = Backward(hidden(), hidden(), prompts=prompts(batch=2)).to_wire()
    assert fields["names"] == ["hidden", "grad_output", "prompts"] and len(tensors) == 3
    _, fields, tensors = Step("s", ticket="t").to_wire()
    assert fields == {"session": "s", "ticket": "t", "names": []} and tensors == []


def test_absent_names_mean_the_required_tensors() -> None:
    h = hidden()
    forward = Forward.from_wire(through_codec("forward", {}, [h]))
    assert torch.equal(forward.hidden, h) and forward.blocks is None and forward.keep is False


def test_a_relay_address_is_normalized() -> None:
    step = Step.from_wire(through_codec("step", {"session": "s", "names": ["hidden"],
                                                 "push": {"peer": " 127.0.0.1:0042", "session": "a", "ticket": "b"}},
                                        [hidden()]))
    assert step.push == PushTarget("tcp://127.0.0.1:42", "a", "b")


REPLY_CASES = {
    "open": OpenReply("s" * 32, 100),
    "open_bare": OpenReply("s"),
    "step": StepReply(hidden(), 12),
    "forward": ForwardReply(hidden()),
    "forward_kept": ForwardReply(hidden(), "k" * 24),
    "backward": BackwardReply(hidden()),
    "backward_prompts": BackwardReply(hidden(), prompts()),
    "cancel": CancelReply(True),
}


@pytest.mark.parametrize("case", list(REPLY_CASES))
def test_replies_round_trip_through_the_codec(case: str) -> None:
    reply = REPLY_CASES[case]
    fields, tensors = reply.to_wire()
    assert same(type(reply).from_wire(through_codec(RESULT, fields, tensors)), reply)


def test_replies_of_servers_that_send_no_names() -> None:
    h = hidden()
    assert torch.equal(StepReply.from_wire(through_codec(RESULT, {"position": 3}, [h])).hidden, h)
    assert BackwardReply.from_wire(through_codec(RESULT, {}, [h])).grad_prompts is None


# --- unknown fields ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(REQUEST_CASES))
def test_unknown_header_fields_are_ignored(case: str) -> None:
    request = REQUEST_CASES[case]
    kind, fields, tensors = request.to_wire()
    newer = {**fields, "deadline_ms": 70, "priority": 3, "trace": {"id": [1, 2]}}
    assert same(type(request).from_wire(through_codec(kind, newer, tensors)), request)


def test_unknown_reply_fields_are_ignored() -> None:
    fields, tensors = StepReply(hidden(), 4).to_wire()
    assert StepReply.from_wire(through_codec(RESULT, {**fields, "compute_ms": 1.5}, tensors)).position == 4


# --- malformed requests --------------------------------------------------------------------------------------------

S = "s" * 8
H = ["hidden"]
BAD: dict[str, tuple[str, dict[str, Any], Any, str]] = {
    # type, fields, tensors (a function: fresh each time), words of the error
    "forward_no_tensors": ("forward", {}, lambda: [], "expected tensors"),
    "forward_no_tensors_names": ("forward", {"names": []}, lambda: [], "expected tensors"),
    "forward_hidden_2d": ("forward", {"names": H}, lambda: [torch.randn(3, HIDDEN)], "hidden must be"),
    "forward_hidden_4d": ("forward", {"names": H}, lambda: [torch.randn(1, 1, 3, HIDDEN)], "hidden must be"),
    "forward_hidden_int": ("forward", {"names": H}, lambda: [torch.ones(1, 3, HIDDEN, dtype=torch.int64)],
                           "hidden must be"),
    "forward_hidden_bool": ("forward", {"names": H}, lambda: [torch.ones(1, 3, HIDDEN, dtype=torch.bool)],
                            "hidden must be"),
    "forward_empty_length": ("forward", {"names": H}, lambda: [hidden(1, 0)], "hidden must be"),
    "forward_empty_batch": ("forward", {"names": H}, lambda: [hidden(0, 3)], "hidden must be"),
    "forward_blocks_string": ("forward", {"names": H, "blocks": "0:3"}, lambda: [hidden()], "blocks"),
    "forward_blocks_three": ("forward", {"names": H, "blocks": [0, 1, 2]}, lambda: [hidden()], "blocks"),
    "forward_blocks_negative": ("forward", {"names": H, "blocks": [-1, 2]}, lambda: [hidden()], "blocks"),
    "forward_blocks_empty": ("forward", {"names": H, "blocks": [2, 2]}, lambda: [hidden()], "blocks"),
    "forward_blocks_reversed": ("forward", {"names": H, "blocks": [2, 1]}, lambda: [hidden()], "blocks"),
    "forward_blocks_bool": ("forward", {"names": H, "blocks": [False, True]}, lambda: [hidden()], "blocks"),
    "forward_blocks_float": ("forward", {"names": H, "blocks": [0.0, 2.0]}, lambda: [hidden()], "blocks"),
    "forward_keep_int": ("forward", {"names": H, "keep": 1}, lambda: [hidden()], "keep"),
    "forward_mask_short": ("forward", {"names": [*H, "attention_mask"]}, lambda: [hidden(), mask(2, 2)],
                           "attention_mask"),
    "forward_mask_batch": ("forward", {"names": [*H, "attention_mask"]}, lambda: [hidden(), mask(1, 3)],
                           "attention_mask"),
    "forward_mask_1d": ("forward", {"names": [*H, "attention_mask"]},
                        lambda: [hidden(), torch.ones(3, dtype=torch.int64)], "attention_mask"),
    "forward_mask_float": ("forward", {"names": [*H, "attention_mask"]},
                           lambda: [hidden(), torch.ones(2, 3)], "attention_mask"),
    "forward_mask_two": ("forward", {"names": [*H, "attention_mask"]}, lambda: [hidden(), 2 * mask()], "0 and 1"),
    "forward_mask_negative": ("forward", {"names": [*H, "attention_mask"]}, lambda: [hidden(), -mask()], "0 and 1"),
    "forward_prompts_3d": ("forward", {"names": [*H, "prompts"]}, lambda: [hidden(), torch.randn(2, 2, HIDDEN)],
                           "prompts"),
    "forward_prompts_int": ("forward", {"names": [*H, "prompts"]},
                            lambda: [hidden(), torch.ones(2, 1, 2, HIDDEN, dtype=torch.int64)], "prompts"),
    "forward_prompts_batch": ("forward", {"names": [*H, "prompts"]}, lambda: [hidden(2), prompts(batch=3)],
                              "prompts"),
    "forward_prompts_longer": ("forward", {"names": [*H, "prompts"]}, lambda: [hidden(2, 3), prompts(length=4)],
                               "prompts"),
    "forward_prompts_size": ("forward", {"names": [*H, "prompts"]}, lambda: [hidden(), prompts(size=HIDDEN + 1)],
                             "prompts"),
    "forward_prompts_blocks": ("forward", {"names": [*H, "prompts"], "blocks": [0, 3]},
                               lambda: [hidden(), prompts(blocks=2)], "prompts"),
    "forward_names_unknown": ("forward", {"names": [*H, "extra"]}, lambda: [hidden(), hidden()], "expected tensors"),
    "forward_names_missing": ("forward", {"names": ["attention_mask"]}, lambda: [mask()], "expected tensors"),
    "forward_names_wrong": ("forward", {"names": ["hiddden"]}, lambda: [hidden()], "expected tensors"),
    "forward_names_too_few": ("forward", {"names": H}, lambda: [hidden(), mask()], "names"),
    "forward_names_too_many": ("forward", {"names": [*H, "attention_mask"]}, lambda: [hidden()], "names"),
    "forward_names_duplicate": ("forward", {"names": H * 2}, lambda: [hidden(), hidden()], "names"),
    "forward_names_not_list": ("forward", {"names": "hidden"}, lambda: [hidden()], "names"),
    "forward_names_not_strings": ("forward", {"names": [1]}, lambda: [hidden()], "names"),
    "forward_names_absent_two": ("forward", {}, lambda: [hidden(), mask()], "names"),
    "backward_no_grad": ("backward", {"names": H}, lambda: [hidden()], "expected tensors"),
    "backward_grad_shape": ("backward", {"names": [*H, "grad_output"]}, lambda: [hidden(2, 3), hidden(2, 2)],
                            "grad_output"),
    "backward_grad_int": ("backward", {"names": [*H, "grad_output"]},
                          lambda: [hidden(), torch.ones(2, 3, HIDDEN, dtype=torch.int32)], "grad_output"),
    "backward_kept_int": ("backward", {"names": [*H, "grad_output"], "kept": 5}, lambda: [hidden(), hidden()],
                          "kept"),
    "backward_kept_long": ("backward", {"names": [*H, "grad_output"], "kept": "k" * 65},
                           lambda: [hidden(), hidden()], "kept"),
    "open_no_max_length": ("open", {"batch_size": 1}, lambda: [], "max_length"),
    "open_max_length_zero": ("open", {"max_length": 0}, lambda: [], "max_length"),
    "open_max_length_negative": ("open", {"max_length": -5}, lambda: [], "max_length"),
    "open_max_length_string": ("open", {"max_length": "100"}, lambda: [], "max_length"),
    "open_max_length_float": ("open", {"max_length": 10.0}, lambda: [], "max_length"),
    "open_max_length_bool": ("open", {"max_length": True}, lambda: [], "max_length"),
    "open_batch_zero": ("open", {"batch_size": 0, "max_length": 10}, lambda: [], "batch_size"),
    "open_batch_string": ("open", {"batch_size": "2", "max_length": 10}, lambda: [], "batch_size"),
    "open_blocks_string": ("open", {"max_length": 10, "blocks": "0:3"}, lambda: [], "blocks"),
    "step_no_session": ("step", {"names": H}, lambda: [hidden()], "session"),
    "step_session_empty": ("step", {"session": "", "names": H}, lambda: [hidden()], "session"),
    "step_session_int": ("step", {"session": 5, "names": H}, lambda: [hidden()], "session"),
    "step_session_list": ("step", {"session": ["abc"], "names": H}, lambda: [hidden()], "session"),
    "step_session_long": ("step", {"session": "x" * 65, "names": H}, lambda: [hidden()], "session"),
    "step_no_hidden": ("step", {"session": S, "names": []}, lambda: [], "expected tensors"),
    "step_hidden_2d": ("step", {"session": S, "names": H}, lambda: [torch.randn(3, HIDDEN)], "hidden must be"),
    "step_mask_short": ("step", {"session": S, "names": [*H, "attention_mask"]}, lambda: [hidden(), mask(2, 2)],
                        "attention_mask"),
    "step_start_negative": ("step", {"session": S, "names": H, "start": -1}, lambda: [hidden()], "start"),
    "step_start_string": ("step", {"session": S, "names": H, "start": "1"}, lambda: [hidden()], "start"),
    "step_start_float": ("step", {"session": S, "names": H, "start": 1.0}, lambda: [hidden()], "start"),
    "step_start_bool": ("step", {"session": S, "names": H, "start": True}, lambda: [hidden()], "start"),
    "step_wait_without_ticket": ("step", {"session": S, "names": H, "wait": 1.0}, lambda: [hidden()], "wait"),
    "step_ticket_empty": ("step", {"session": S, "ticket": "", "names": []}, lambda: [], "ticket"),
    "step_ticket_int": ("step", {"session": S, "ticket": 5, "names": []}, lambda: [], "ticket"),
    "step_ticket_long": ("step", {"session": S, "ticket": "t" * 65, "names": []}, lambda: [], "ticket"),
    "step_relayed_with_hidden": ("step", {"session": S, "ticket": "t", "names": H}, lambda: [hidden()],
                                 "expected tensors"),
    "step_wait_negative": ("step", {"session": S, "ticket": "t", "wait": -1, "names": []}, lambda: [], "wait"),
    "step_wait_zero": ("step", {"session": S, "ticket": "t", "wait": 0, "names": []}, lambda: [], "wait"),
    "step_wait_too_long": ("step", {"session": S, "ticket": "t", "wait": MAX_WAIT + 1, "names": []}, lambda: [],
                           "wait"),
    "step_wait_nan": ("step", {"session": S, "ticket": "t", "wait": float("nan"), "names": []}, lambda: [], "wait"),
    "step_wait_bool": ("step", {"session": S, "ticket": "t", "wait": True, "names": []}, lambda: [], "wait"),
    "step_wait_string": ("step", {"session": S, "ticket": "t", "wait": "1", "names": []}, lambda: [], "wait"),
    "step_relayed_mask_float": ("step", {"session": S, "ticket": "t", "names": ["attention_mask"]},
                                lambda: [torch.ones(2, 3)], "attention_mask"),
    "step_push_string": ("step", {"session": S, "names": H, "push": "tcp://127.0.0.1:1"}, lambda: [hidden()],
                         "relay push"),
    "step_push_no_ticket": ("step", {"session": S, "names": H, "push": {"peer": "tcp://127.0.0.1:1", "session": "x"}},
                            lambda: [hidden()], "relay push"),
    "step_push_no_peer": ("step", {"session": S, "names": H, "push": {"session": "x", "ticket": "t"}},
                          lambda: [hidden()], "relay push"),
    "step_push_bad_session": ("step", {"session": S, "names": H,
                                       "push": {"peer": "tcp://127.0.0.1:1", "session": "", "ticket": "t"}},
                              lambda: [hidden()], "relay push"),
    "step_push_bad_address": ("step", {"session": S, "names": H,
                                       "push": {"peer": "udp://127.0.0.1:1", "session": "x", "ticket": "t"}},
                              lambda: [hidden()], "relay address"),
    "step_push_bad_port": ("step", {"session": S, "names": H,
                                    "push": {"peer": "127.0.0.1:70000", "session": "x", "ticket": "t"}},
                           lambda: [hidden()], "relay address"),
    "push_no_session": ("push", {"ticket": "t", "names": H}, lambda: [hidden()], "session"),
    "push_ticket_int": ("push", {"session": S, "ticket": 5, "names": H}, lambda: [hidden()], "ticket"),
    "push_no_ticket": ("push", {"session": S, "names": H}, lambda: [hidden()], "ticket"),
    "push_no_tensors": ("push", {"session": S, "ticket": "t", "names": []}, lambda: [], "expected tensors"),
    "push_mask_too": ("push", {"session": S, "ticket": "t", "names": [*H, "attention_mask"]},
                      lambda: [hidden(), mask()], "expected tensors"),
    "push_hidden_int": ("push", {"session": S, "ticket": "t", "names": H},
                        lambda: [torch.ones(1, 2, HIDDEN, dtype=torch.int64)], "hidden must be"),
    "cancel_no_ticket": ("cancel", {"session": S}, lambda: [], "ticket"),
    "cancel_no_session": ("cancel", {"ticket": "t"}, lambda: [], "session"),
    "close_no_session": ("close", {}, lambda: [], "session"),
    "close_session_int": ("close", {"session": 7}, lambda: [], "session"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_malformed_requests_are_refused(case: str) -> None:
    kind, fields, tensors, words = BAD[case]
    message = through_codec(kind, fields, tensors())
    with pytest.raises(ProtocolError, match=words) as error:
        REQUESTS[kind].from_wire(message)
    assert error.value.code == "bad_request" and str(error.value).startswith(f"{kind}: ")
    with pytest.raises(ProtocolError, match=words):
        parse_request(message)


@pytest.mark.parametrize("kind", ["nope", "", "result", "FORWARD", "gossip"])
def test_unknown_request_types(kind: str) -> None:
    with pytest.raises(UnknownMethod) as error:
        parse_request(through_codec(kind, {}, []))
    assert error.value.code == "unknown_method"


def test_a_type_reads_only_its_own_messages() -> None:
    with pytest.raises(ProtocolError, match="expected a 'step' message"):
        Step.from_wire(through_codec("forward", {"names": H}, [hidden()]))


@pytest.mark.parametrize("reply,fields,tensors", [
    (OpenReply, {}, []),
    (OpenReply, {"session": 5}, []),
    (StepReply, {"position": 1}, []),
    (StepReply, {}, [hidden()]),
    (StepReply, {"position": -1}, [hidden()]),
    (StepReply, {"position": 1}, [torch.ones(2, 3)]),
    (ForwardReply, {"names": ["hidden", "extra"]}, [hidden(), hidden()]),
    (ForwardReply, {"kept": 5}, [hidden()]),
    (BackwardReply, {"names": ["grad_input", "grad_prompts"]}, [hidden(), torch.ones(3)]),
    (CancelReply, {"cancelled": "yes"}, []),
])
def test_malformed_replies_are_refused(reply, fields, tensors) -> None:
    with pytest.raises(ProtocolError):
        reply.from_wire(through_codec(RESULT, fields, tensors))


# --- capabilities and helpers --------------------------------------------------------------------------------------


def test_capabilities() -> None:
    assert supports(CAPABILITIES, "relay") and not supports(CAPABILITIES, "teleport")
    assert not supports(None, "relay") and not supports((), "relay")
    assert parse_capabilities(["relay", 5, "", "x" * 100, "keep", "relay"]) == ("relay", "keep")
    assert parse_capabilities(None) == () and parse_capabilities("relay") == ()


def test_require_finite() -> None:
    require_finite("hidden", torch.ones(2))
    with pytest.raises(ProtocolError, match="hidden has NaN"):
        require_finite("hidden", torch.tensor([1.0, float("nan")]))
    with pytest.raises(ProtocolError):  # finite in float32, infinite in the server's float16
        require_finite("hidden", torch.tensor([1e6]), torch.float16)
