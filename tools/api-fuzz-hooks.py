"""schemathesis hooks for tools/api-fuzz: reach the code behind the validation.

Both hooks only ever replace a value with another of the same validity under the schema,
so a positive case stays positive and a negative one stays negative.

- Bodies: the schema types an exit's `endpoint` and a peer's `allowed_ips` as plain
  strings, so generated ones almost never parse and nearly every exit or peer would be
  refused before it could be stored, swapped in and removed again. Most of them become
  real addresses (documentation ranges: nothing is ever sent to them). Generated keys
  repeat a lot, so most well-formed ones are replaced by fresh random keys; and in a
  whole state, peers' allowed exits are often drawn from that state's own exits.
- PUT /v1/config applies only if If-Match names the node's current generation, which a
  generated number almost never does. Every other PUT whose headers are valid gets the
  node's current ETag, so fuzzed states (valid or not) reach validation, persistence and
  the table swap instead of stopping at 412.
- DELETE /v1/exits/{key} and /v1/peers/{key}: a generated key never names an existing
  object, so removal would only ever answer 404. Every other DELETE whose path is valid
  names an exit or peer the node has, when it has one.

And one that checks: around every POST, PUT and DELETE, the node's state file must parse
and agree with GET /v1/config; a refused change must leave both exactly as they were, an
accepted change to exits, peers or the config must advance the generation by one, and
closing a session must not touch them. Anything else is written to $API_FUZZ_PROBLEMS,
which tools/api-fuzz fails on.
"""

import base64
import itertools
import json
import os
import re
import urllib.request

import schemathesis
from hypothesis import strategies as st

URL = os.environ["API_FUZZ_URL"]
TOKEN = os.environ["API_FUZZ_TOKEN"]
STATE_FILE = os.environ["API_FUZZ_STATE"]
PROBLEMS = os.environ["API_FUZZ_PROBLEMS"]

KEY_PATTERN = re.compile(r"^[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]=$")
KEY = st.binary(min_size=32, max_size=32).map(lambda b: base64.b64encode(b).decode())
PORT = st.integers(min_value=1, max_value=65535)
ENDPOINT = st.one_of(
    st.builds("198.51.100.{}:{}".format, st.integers(0, 255), PORT),
    st.builds("[2001:db8::{:x}]:{}".format, st.integers(0, 0xFFFF), PORT),
)
NETWORK = st.one_of(
    st.builds("10.{}.{}.{}/{}".format, st.integers(0, 255), st.integers(0, 255),
              st.integers(0, 255), st.integers(0, 32)),
    st.builds("fd00::{:x}/{}".format, st.integers(0, 0xFFFF), st.integers(0, 128)),
)


def _is_key(v):
    return isinstance(v, str) and KEY_PATTERN.match(v) is not None


def _mostly(value, strategy):
    """`strategy` three times in four, else `value` as generated."""
    return st.one_of(st.just(value), strategy, strategy, strategy)


def _field(name, value):
    if name == "endpoint" and isinstance(value, str):
        return _mostly(value, ENDPOINT)
    if name == "public_key" and _is_key(value):
        return _mostly(value, KEY)
    if (name == "allowed_ips" and isinstance(value, list) and value
            and all(isinstance(x, str) for x in value)):
        return _mostly(value, st.lists(NETWORK, min_size=len(value), max_size=len(value)))
    return _realistic(value)


def _realistic(value):
    """A strategy for `value` with some addresses and keys made real."""
    if isinstance(value, dict):
        return st.fixed_dictionaries({k: _field(k, v) for k, v in value.items()})
    if isinstance(value, list):
        return st.tuples(*(_realistic(x) for x in value)).map(list)
    return st.just(value)


def _link_peers_to_exits(state):
    """Peers of a whole state that may use some of that state's own exits."""
    if not isinstance(state, dict) or not isinstance(state.get("peers"), list):
        return st.just(state)
    # Generated bodies break the schema on purpose too: `exits` may be anything.
    listed = state.get("exits")
    if not isinstance(listed, list):
        return st.just(state)
    exits = [e.get("public_key") for e in listed if isinstance(e, dict)]
    exits = [k for k in exits if _is_key(k)]
    if not exits:
        return st.just(state)

    def relink(peer):
        wanted = peer.get("allowed_exits") if isinstance(peer, dict) else None
        if not isinstance(wanted, list) or not all(_is_key(k) for k in wanted):
            return st.just(peer)
        drawn = st.lists(st.sampled_from(exits), min_size=len(wanted), max_size=len(wanted))
        return st.one_of(st.just(peer), drawn.map(lambda ks: {**peer, "allowed_exits": ks}))

    return st.tuples(*map(relink, state["peers"])).map(lambda ps: {**state, "peers": list(ps)})


@schemathesis.hook
def flatmap_body(ctx, body):
    return _realistic(body).flatmap(_link_peers_to_exits)


_turn = itertools.count()


def _get(path):
    req = urllib.request.Request(URL + path, headers={"Authorization": "Bearer " + TOKEN})
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.headers, json.loads(r.read())


def _negative_locations(case):
    return {
        getattr(location, "value", location)
        for location, info in case.meta.components.items()
        if info.mode.is_negative
    }


@schemathesis.hook
def before_call(ctx, case, **kwargs):
    op = case.operation
    method = op.method.upper()
    if case.meta is None:
        return
    if method == "PUT" and op.path == "/v1/config":
        # A case testing its headers (a missing or malformed one) keeps them as they are.
        name = next((k for k in (case.headers or {}) if k.lower() == "if-match"), None)
        if name is None or "header" in _negative_locations(case) or next(_turn) % 2:
            return
        case.headers[name] = _get("/v1/config")[0]["ETag"]
    elif method == "DELETE" and op.path in ("/v1/exits/{key}", "/v1/peers/{key}"):
        if "path" in _negative_locations(case) or next(_turn) % 2:
            return
        existing = _get(op.path.rsplit("/", 1)[0])[1]
        if existing:
            key = existing[next(_turn) % len(existing)]["public_key"]
            url_safe = key.replace("+", "-").replace("/", "_").rstrip("=")
            case.path_parameters["key"] = url_safe


_before = {}


def _read_state():
    with open(STATE_FILE, "rb") as f:
        return f.read()


def _shown(saved):
    """The state as the API shows it: preshared keys are write-only."""
    shown = json.loads(json.dumps(saved))
    for p in shown.get("peers", []):
        p.pop("preshared_key", None)
    return shown


def _problem(text):
    with open(PROBLEMS, "a") as f:
        f.write(text + "\n")


@schemathesis.hook("before_call")
def snapshot_state(ctx, case, **kwargs):
    if case.operation.method.upper() in ("POST", "PUT", "PATCH", "DELETE"):
        _before[case.id] = (_read_state(), _get("/v1/config")[1])


@schemathesis.hook
def after_call(ctx, case, response):
    snapshot = _before.pop(case.id, None)
    if snapshot is None:
        return
    file_before, served_before = snapshot
    status = response.status_code
    label = f"{case.operation.method.upper()} {case.operation.path} {case.path_parameters or ''} -> {status}"
    raw = _read_state()
    try:
        saved = json.loads(raw)
    except ValueError as e:
        _problem(f"{label}: the state file does not parse afterwards: {e}")
        return
    served = _get("/v1/config")[1]
    if served != _shown(saved):
        _problem(f"{label}: GET /v1/config disagrees with the state file afterwards")
    changes_state = not case.operation.path.startswith("/v1/sessions")
    try:
        answer = response.json()
    except ValueError:
        answer = None
    # A dry run, or a change that changes nothing (re-applying the state in use), must leave
    # the file and the generation exactly as they were.
    unchanged = isinstance(answer, dict) and (
        answer.get("dry_run") is True or answer.get("changed") is False)
    if 200 <= status < 300 and changes_state and unchanged:
        if raw != file_before or served != served_before:
            _problem(f"{label}: answered that nothing changed, but the state changed")
    elif 200 <= status < 300 and changes_state:
        if saved.get("generation") != json.loads(file_before).get("generation") + 1:
            _problem(f"{label}: accepted, but the generation went from "
                     f"{json.loads(file_before).get('generation')} to {saved.get('generation')}")
    elif raw != file_before or served != served_before:
        _problem(f"{label}: {'refused' if status >= 300 else 'no change expected'}, "
                 "but the state changed")
