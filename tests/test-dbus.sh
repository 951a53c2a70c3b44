#!/usr/bin/env bash
# test-dbus: the D-Bus door end to end. Starts a private dbus-daemon, the
# real moed in per-user mode on it with a fixture model, and drives it with
# busctl and a small D-Bus client written here in Python (the standard
# library only: python3-dbus or gi may not be installed): introspection
# against ipc/org.moed.Engine1.xml, ListModels, Complete, Chat with its
# unicast Token/Finished signals, Cancel and its owner check, a caller
# leaving the bus, named errors, GetStatus/GetUsage, properties, Reload
# (and, as root, polkit through a stand-in polkitd), SIGTERM drain.
set -euo pipefail
build=${1:?usage: test-dbus.sh BUILD_DIR}
src=${MOED_SOURCE_ROOT:-$(cd "$(dirname "$0")/.." && pwd)}
contract=$src/ipc/org.moed.Engine1.xml
# Short paths: unix socket names are limited to 108 bytes.
tmp=$(mktemp -d "${TMPDIR:-/tmp}/moed-dbus-XXXXXX")
bus_pid='' moed_pid='' bg_pids=()
stop_pid() { # SIGTERM, then SIGKILL after 5 s: a wedged daemon must not hang the test
  local _
  kill "$1" 2>/dev/null || return 0
  for _ in $(seq 1 50); do kill -0 "$1" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
}
cleanup() {
  for p in "${bg_pids[@]}" $moed_pid $bus_pid; do stop_pid "$p"; done
  rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 143' TERM INT
passed=0 failed=0

ok() { echo "ok - $1"; passed=$((passed + 1)); }
bad() { echo "not ok - $1"; failed=$((failed + 1)); }
check() { # description, command...
  local what=$1; shift
  if "$@"; then ok "$what"; else bad "$what"; fi
}
die() { # a failure the rest cannot go on from
  bad "$1"
  [ -f "$tmp/moed.log" ] && { echo "--- moed log (tail)"; tail -n 40 "$tmp/moed.log"; }
  echo "$passed passed, $failed failed"
  exit 1
}

# A python that any uid can run (a pyenv shim under /root cannot).
py=python3
[ -x /usr/bin/python3 ] && py=/usr/bin/python3
command -v "$py" >/dev/null || die "python3 is needed"
command -v busctl >/dev/null || die "busctl is needed"
command -v dbus-daemon >/dev/null || die "dbus-daemon is needed"

# ---- the client ----
cat >"$tmp/dbusc.py" <<'PY'
"""A minimal D-Bus client over a unix socket (no python-dbus or gi needed):
EXTERNAL auth, Hello, method calls and signals, little-endian marshalling
of the basic types, arrays, structs, dict entries and variants."""
import os
import socket
import struct
import time

ALIGN = {'y': 1, 'b': 4, 'n': 2, 'q': 2, 'i': 4, 'u': 4, 'x': 8, 't': 8, 'd': 8,
         's': 4, 'o': 4, 'g': 1, 'a': 4, '(': 8, '{': 8, 'v': 1, 'h': 4}
FIXED = {'y': 'B', 'b': 'I', 'n': 'h', 'q': 'H', 'i': 'i', 'u': 'I', 'x': 'q', 't': 'Q',
         'd': 'd', 'h': 'I'}


def split_sig(sig):
    """'sa(ss)a{sv}' -> ['s', 'a(ss)', 'a{sv}']"""
    out, i = [], 0
    while i < len(sig):
        j = type_end(sig, i)
        out.append(sig[i:j])
        i = j
    return out


def type_end(sig, i):
    c = sig[i]
    if c == 'a':
        return type_end(sig, i + 1)
    if c in '({':
        close = ')' if c == '(' else '}'
        i += 1
        while sig[i] != close:
            i = type_end(sig, i)
        return i + 1
    return i + 1


class Variant:
    def __init__(self, sig, value):
        self.sig, self.value = sig, value

    def __repr__(self):
        return 'Variant(%r, %r)' % (self.sig, self.value)


class Writer:
    def __init__(self):
        self.buf = bytearray()

    def pad(self, n):
        while len(self.buf) % n:
            self.buf.append(0)

    def write(self, t, v):
        c = t[0]
        self.pad(ALIGN[c])
        if c in FIXED:
            self.buf += struct.pack('<' + FIXED[c], v)
        elif c in 'so':
            b = v.encode()
            self.buf += struct.pack('<I', len(b)) + b + b'\0'
        elif c == 'g':
            b = v.encode()
            self.buf += struct.pack('<B', len(b)) + b + b'\0'
        elif c == 'v':
            self.write('g', v.sig)
            self.write(v.sig, v.value)
        elif c == '(':
            for st, sv in zip(split_sig(t[1:-1]), v):
                self.write(st, sv)
        elif c == 'a':
            et = t[1:]
            at = len(self.buf)
            self.buf += b'\0\0\0\0'
            self.pad(ALIGN[et[0]])
            start = len(self.buf)
            if et[0] == '{':
                kt, vt = split_sig(et[1:-1])
                for k, val in (v.items() if isinstance(v, dict) else v):
                    self.pad(8)
                    self.write(kt, k)
                    self.write(vt, val)
            else:
                for e in v:
                    self.write(et, e)
            struct.pack_into('<I', self.buf, at, len(self.buf) - start)
        else:
            raise ValueError('type ' + t)

    def write_sig(self, sig, values):
        for t, v in zip(split_sig(sig), values):
            self.write(t, v)


class Reader:
    def __init__(self, buf, off=0):
        self.buf, self.off = buf, off

    def pad(self, n):
        self.off = (self.off + n - 1) // n * n

    def read(self, t):
        c = t[0]
        self.pad(ALIGN[c])
        if c in FIXED:
            f = '<' + FIXED[c]
            (v,) = struct.unpack_from(f, self.buf, self.off)
            self.off += struct.calcsize(f)
            return bool(v) if c == 'b' else v
        if c in 'so':
            (n,) = struct.unpack_from('<I', self.buf, self.off)
            v = bytes(self.buf[self.off + 4:self.off + 4 + n]).decode()
            self.off += 4 + n + 1
            return v
        if c == 'g':
            n = self.buf[self.off]
            v = bytes(self.buf[self.off + 1:self.off + 1 + n]).decode()
            self.off += 1 + n + 1
            return v
        if c == 'v':
            s = self.read('g')
            return Variant(s, self.read(s))
        if c == '(':
            return tuple(self.read(st) for st in split_sig(t[1:-1]))
        if c == 'a':
            (n,) = struct.unpack_from('<I', self.buf, self.off)
            self.off += 4
            et = t[1:]
            self.pad(ALIGN[et[0]])
            end = self.off + n
            if et[0] == '{':
                kt, vt = split_sig(et[1:-1])
                out = {}
                while self.off < end:
                    self.pad(8)
                    k = self.read(kt)
                    out[k] = self.read(vt)
                return out
            out = []
            while self.off < end:
                out.append(self.read(et))
            return out
        raise ValueError('type ' + t)

    def read_sig(self, sig):
        return [self.read(t) for t in split_sig(sig)]


FIELDS = {1: 'path', 2: 'interface', 3: 'member', 4: 'error_name', 5: 'reply_serial',
          6: 'destination', 7: 'sender', 8: 'signature'}
FIELD_TYPES = {1: 'o', 2: 's', 3: 's', 4: 's', 5: 'u', 6: 's', 7: 's', 8: 'g'}
TYPES = {1: 'call', 2: 'return', 3: 'error', 4: 'signal'}


class Message:
    def __init__(self, kind, serial, fields, body):
        self.kind, self.serial, self.body = kind, serial, body
        for k, v in fields.items():
            setattr(self, k, v)
        for k in FIELDS.values():
            if not hasattr(self, k):
                setattr(self, k, None)

    def __repr__(self):
        return '<%s %s %s.%s %r>' % (self.kind, self.path, self.interface,
                                      self.member or self.error_name, self.body)


class DBusError(Exception):
    def __init__(self, name, message):
        super().__init__('%s: %s' % (name, message))
        self.name, self.message = name, message


class Conn:
    def __init__(self, address):
        assert address.startswith('unix:path='), address
        path = address[len('unix:path='):].split(',')[0]
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.sock.sendall(b'\0AUTH EXTERNAL ' + str(os.geteuid()).encode().hex().encode()
                          + b'\r\n')
        line = self._line()
        if not line.startswith(b'OK'):
            raise RuntimeError('auth failed: %r' % line)
        self.sock.sendall(b'BEGIN\r\n')
        self.rbuf = bytearray()
        self.serial = 0
        self.queue = []   # messages received while waiting for a reply
        self.unique = self.call('org.freedesktop.DBus', '/org/freedesktop/DBus',
                                'org.freedesktop.DBus', 'Hello')[0]

    def _line(self):
        out = b''
        while not out.endswith(b'\r\n'):
            c = self.sock.recv(1)
            if not c:
                raise RuntimeError('bus closed during auth')
            out += c
        return out

    def close(self):
        self.sock.close()

    def send(self, kind, fields, sig='', args=()):
        body = Writer()
        body.write_sig(sig, args)
        self.serial += 1
        hf = []
        names = {v: k for k, v in FIELDS.items()}
        for k, v in fields.items():
            code = names[k]
            hf.append((code, Variant(FIELD_TYPES[code], v)))
        if sig:
            hf.append((8, Variant('g', sig)))
        h = Writer()
        h.buf += struct.pack('<BBBBII', ord('l'), kind, 0, 1, len(body.buf), self.serial)
        h.write('a(yv)', hf)
        h.pad(8)
        self.sock.sendall(bytes(h.buf) + bytes(body.buf))
        return self.serial

    def _recv_exact(self, n, deadline):
        while len(self.rbuf) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError('no message from the bus in time')
            self.sock.settimeout(left)
            c = self.sock.recv(65536)
            if not c:
                raise RuntimeError('bus connection closed')
            self.rbuf += c
        out = bytes(self.rbuf[:n])
        del self.rbuf[:n]
        return out

    def recv(self, timeout=30.0):
        """The next message (from the queue first)."""
        if self.queue:
            return self.queue.pop(0)
        deadline = time.monotonic() + timeout
        fixed = self._recv_exact(16, deadline)
        assert fixed[0:1] == b'l', 'big-endian message'
        kind, _flags, _ver, blen, serial, flen = struct.unpack('<xBBBIII', fixed)
        hlen = (16 + flen + 7) // 8 * 8
        rest = self._recv_exact(hlen - 16 + blen, deadline)
        buf = fixed + rest
        r = Reader(buf, 12)
        fields = {}
        for code, var in r.read('a(yv)'):
            if code in FIELDS:
                fields[FIELDS[code]] = var.value
        sig = fields.get('signature', '')
        body = Reader(buf[hlen:]).read_sig(sig) if sig else []
        return Message(TYPES.get(kind, kind), serial, fields, body)

    def call(self, dest, path, iface, member, sig='', args=(), timeout=60.0):
        fields = {'path': path, 'member': member}
        if iface:
            fields['interface'] = iface
        if dest:
            fields['destination'] = dest
        serial = self.send(1, fields, sig, args)
        deadline = time.monotonic() + timeout
        held = []
        try:
            while True:
                m = self.recv(max(0.0, deadline - time.monotonic()))
                if m.kind in ('return', 'error') and m.reply_serial == serial:
                    if m.kind == 'error':
                        raise DBusError(m.error_name, m.body[0] if m.body else '')
                    return m.body
                held.append(m)
        finally:
            self.queue = held + self.queue

    def reply(self, m, sig='', args=()):
        self.send(2, {'reply_serial': m.serial, 'destination': m.sender}, sig, args)

    def add_match(self, rule):
        self.call('org.freedesktop.DBus', '/org/freedesktop/DBus', 'org.freedesktop.DBus',
                  'AddMatch', 's', [rule])


# ---- scenarios: each prints TAP lines "ok - ..." / "not ok - ..." ----
import json
import sys
import xml.etree.ElementTree as ET

SVC, PATH, IFACE, REQ = 'org.moed.Engine1', '/org/moed/Engine1', 'org.moed.Engine1', \
    'org.moed.Request1'
PROPS = 'org.freedesktop.DBus.Properties'


def check(what, cond, detail=''):
    print(('ok - ' if cond else 'not ok - ') + what + ('' if cond or not detail
                                                      else ' (%s)' % detail))
    sys.stdout.flush()
    return cond


def greedy(max_tokens=None):
    o = {'temperature': Variant('d', 0.0)}
    if max_tokens:
        o['max_tokens'] = Variant('t', int(max_tokens))
    return o


def members(xml_text, iface):
    """Every method, signal and property of iface with its arguments."""
    root = ET.fromstring(xml_text)
    out = set()
    for i in root.iter('interface'):
        if i.get('name') != iface:
            continue
        for m in i:
            args = tuple((a.get('name'), a.get('type'), a.get('direction', 'out'))
                         for a in m.findall('arg'))
            ann = tuple(sorted((a.get('name'), a.get('value')) for a in m.findall('annotation')
                               if a.get('name').startswith('org.freedesktop.DBus.')))
            out.add((m.tag, m.get('name'), m.get('type'), m.get('access'), args, ann))
    return out


def cmp_xml(live, contract, iface):
    a, b = members(live, iface), members(contract, iface)
    check('%s: the live object has every member of the XML, same signatures' % iface,
          b and a == b, 'missing or different: %s; not in the XML: %s' %
          (sorted(b - a), sorted(a - b)))


def start_chat(c, model, opts, msgs=(('user', 'Tell me a long story.'),)):
    return c.call(SVC, PATH, IFACE, 'Chat', 'sa(ss)a{sv}', [model, list(msgs), opts])[0]


def wait_finished(c, path, timeout=120):
    """Token texts and the Finished body of the request at path."""
    toks, dests = [], set()
    deadline = time.monotonic() + timeout
    while True:
        m = c.recv(max(0.1, deadline - time.monotonic()))
        if m.kind != 'signal' or m.path != path:
            continue
        dests.add(m.destination)
        if m.member == 'Token':
            toks.append(m.body[0])
        elif m.member == 'Finished':
            return toks, m.body, dests


def s_introspect_request(addr, model, contract):
    c = Conn(addr)
    with open(contract) as f:
        want = f.read()
    for attempt in range(5):
        path = start_chat(c, model, greedy())
        try:
            live = c.call(SVC, path, 'org.freedesktop.DBus.Introspectable', 'Introspect')[0]
            props = c.call(SVC, path, PROPS, 'GetAll', 's', [REQ])[0]
            c.call(SVC, path, REQ, 'Cancel')
        except DBusError as e:
            if e.name == 'org.freedesktop.DBus.Error.UnknownObject':
                wait_finished(c, path)
                continue   # finished before we looked: try again
            raise
        wait_finished(c, path)
        cmp_xml(live, want, REQ)
        check('request object: Model is the model asked for',
              props['Model'].value == model, repr(props))
        check('request object: Id is a chat completion id',
              props['Id'].value.startswith('chatcmpl-'), repr(props))
        return
    check('request object stays long enough to introspect', False)


# The conversation test-dbus.sh also sends with busctl's Complete.
QUESTION = [('system', 'Answer briefly.'), ('user', 'What is a mixture of experts?')]


def s_chat(addr, model, max_tokens, want_text, want_reason):
    c, spy = Conn(addr), Conn(addr)
    # An ordinary client subscribing to every Request1 signal: unicast
    # signals must not reach it.
    spy.add_match("type='signal',interface='%s'" % REQ)
    path = start_chat(c, model, greedy(max_tokens), QUESTION)
    check('Chat returns a request object path', path.startswith(PATH + '/request/'), path)
    toks, fin, dests = wait_finished(c, path)
    text = ''.join(toks)
    check('Chat streams Token signals', len(toks) > 0)
    check('Chat tokens concatenate to the Complete answer (greedy)', text == want_text,
          '%r != %r' % (text, want_text))
    check('Finished carries the same reason as Complete', fin[0] == want_reason, repr(fin))
    check('Finished counts tokens', fin[1] > 0 and fin[2] > 0, repr(fin))
    check('signals reach the caller without a match rule, addressed to it (unicast)',
          dests == {c.unique}, repr(dests))
    seen = []
    try:
        while True:
            m = spy.recv(0.5)
            if m.kind == 'signal' and m.interface == REQ:
                seen.append(m)
    except TimeoutError:
        pass
    check('another client subscribed to Request1 signals sees none', not seen,
          '%d seen' % len(seen))


def s_cancel(addr, model):
    c, other = Conn(addr), Conn(addr)
    for attempt in range(5):
        path = start_chat(c, model, greedy())
        try:
            other.call(SVC, path, REQ, 'Cancel')
            check('Cancel by another connection is refused', False, 'it succeeded')
            return
        except DBusError as e:
            if e.name == 'org.freedesktop.DBus.Error.UnknownObject':
                wait_finished(c, path)
                continue
            check('Cancel by another connection gets org.moed.Error.AccessDenied',
                  e.name == 'org.moed.Error.AccessDenied', e.name)
        try:
            c.call(SVC, path, REQ, 'Cancel')
        except DBusError as e:
            if e.name == 'org.freedesktop.DBus.Error.UnknownObject':
                wait_finished(c, path)
                continue
            raise
        toks, fin, _ = wait_finished(c, path)
        check('Cancel by the caller finishes with reason "cancelled"', fin[0] == 'cancelled',
              repr(fin))
        return
    check('a request runs long enough to be cancelled', False)


def active(c):
    return c.call(SVC, PATH, PROPS, 'Get', 'ss', [IFACE, 'ActiveRequests'])[0].value


def s_disconnect(addr, model):
    watch = Conn(addr)
    c = Conn(addr)
    path = start_chat(c, model, greedy())
    m = c.recv(30)  # first Token (or Finished)
    before = active(watch)
    c.close()
    t0 = time.monotonic()
    while active(watch) > 0 and time.monotonic() - t0 < 20:
        time.sleep(0.05)
    after = active(watch)
    check('a running Chat counts in ActiveRequests', before >= 1 or m.member == 'Finished',
          'ActiveRequests %d' % before)
    check('a caller leaving the bus ends its request', after == 0,
          'ActiveRequests still %d after 20 s' % after)


def expect_error(c, what, name, needle, model, msgs, opts, method='Chat'):
    try:
        r = c.call(SVC, PATH, IFACE, method, 'sa(ss)a{sv}', [model, msgs, opts])
        if method == 'Chat':
            wait_finished(c, r[0])
        check(what, False, 'accepted')
    except DBusError as e:
        check(what, e.name == name and needle in e.message, '%s: %s' % (e.name, e.message))


def s_errors(addr, model):
    c = Conn(addr)
    hi = [('user', 'hi')]
    inv = 'org.moed.Error.InvalidArgument'
    expect_error(c, 'an unknown option is InvalidArgument naming it', inv, 'bogus', model, hi,
                 {'bogus': Variant('d', 1.0)})
    expect_error(c, 'an option of the wrong type is InvalidArgument naming it', inv,
                 'temperature', model, hi, {'temperature': Variant('s', 'hot')})
    expect_error(c, 'an out-of-range option is InvalidArgument naming it', inv, 'top_p',
                 model, hi, {'top_p': Variant('d', 7.0)})
    expect_error(c, 'max_tokens 0 is InvalidArgument', inv, 'max_tokens', model, hi,
                 {'max_tokens': Variant('t', 0)})
    expect_error(c, 'a negative max_tokens is InvalidArgument', inv, 'max_tokens', model, hi,
                 {'max_tokens': Variant('i', -5)})
    expect_error(c, 'five stop strings are InvalidArgument', inv, 'stop', model, hi,
                 {'stop': Variant('as', ['a', 'b', 'c', 'd', 'e'])})
    expect_error(c, 'an unknown role is InvalidArgument', inv, 'role', model,
                 [('wizard', 'hi')], {})
    expect_error(c, 'no messages is InvalidArgument', inv, 'messages', model, [], {})
    expect_error(c, 'an unknown model is NoSuchModel', 'org.moed.Error.NoSuchModel',
                 'no-such-model', 'no-such-model', hi, {})
    expect_error(c, 'Complete checks its options too', inv, 'bogus', model, hi,
                 {'bogus': Variant('u', 1)}, 'Complete')
    # Options of every accepted type go through.
    opts = {'max_tokens': Variant('u', 4), 'temperature': Variant('d', 0.7),
            'top_p': Variant('d', 0.9), 'top_k': Variant('i', 20), 'min_p': Variant('d', 0.05),
            'seed': Variant('x', -3), 'stop': Variant('as', ['\n\n']),
            'presence_penalty': Variant('d', 0.5), 'frequency_penalty': Variant('d', 0.5)}
    try:
        r = c.call(SVC, PATH, IFACE, 'Complete', 'sa(ss)a{sv}', [model, hi, opts])
        check('Complete takes every option', r[1] in ('stop', 'length') and r[3] <= 4, repr(r))
    except DBusError as e:
        check('Complete takes every option', False, str(e))
    # The daemon goes on serving after all that.
    r = c.call(SVC, PATH, IFACE, 'ListModels')
    check('still serving after the bad calls', any(m[0] == model for m in r[0]), repr(r))


def s_watch_props(addr, ready, timeout):
    c = Conn(addr)
    c.add_match("type='signal',sender='%s',path='%s',interface='%s',member='PropertiesChanged'"
                % (SVC, PATH, PROPS))
    open(ready, 'w').close()
    deadline = time.monotonic() + float(timeout)
    try:
        while True:
            m = c.recv(max(0.1, deadline - time.monotonic()))
            if m.kind == 'signal' and m.member == 'PropertiesChanged' and m.body[0] == IFACE:
                check('Reload emits PropertiesChanged for org.moed.Engine1 (State: %s)' %
                      (m.body[1].get('State').value if 'State' in m.body[1] else '-'),
                      'State' in m.body[1] or 'State' in m.body[2], repr(m.body))
                return
    except TimeoutError:
        check('Reload emits PropertiesChanged for org.moed.Engine1', False, 'none came')


def s_drain(addr, model, pid):
    import signal
    c, other = Conn(addr), Conn(addr)
    # Long enough to be running at SIGTERM, short enough to end well
    # inside the drain deadline.
    path = start_chat(c, model, greedy(300))
    first = c.recv(30)
    os.kill(int(pid), signal.SIGTERM)
    time.sleep(0.2)
    try:
        state = other.call(SVC, PATH, PROPS, 'Get', 'ss', [IFACE, 'State'])[0].value
        check('State is draining after SIGTERM', state == 'draining' or first.member == 'Finished',
              state)
        other.call(SVC, PATH, IFACE, 'Chat', 'sa(ss)a{sv}', [model, [('user', 'hi')], {}])
        check('a new Chat while draining is refused', False, 'accepted')
    except DBusError as e:
        check('a new Chat while draining gets org.moed.Error.Unavailable',
              e.name == 'org.moed.Error.Unavailable', '%s: %s' % (e.name, e.message))
    toks, fin, _ = wait_finished(c, path, 90)
    check('the running Chat still gets its Finished signal (%s)' % fin[0],
          fin[0] in ('stop', 'length', 'cancelled'), repr(fin))


def s_fake_polkit(addr, answers, log, ready):
    """Stands in for polkitd: answers CheckAuthorization from the list."""
    c = Conn(addr)
    r = c.call('org.freedesktop.DBus', '/org/freedesktop/DBus', 'org.freedesktop.DBus',
               'RequestName', 'su', ['org.freedesktop.PolicyKit1', 4])
    assert r[0] == 1, r
    open(ready, 'w').close()
    answers = answers.split(',')
    calls = []
    deadline = time.monotonic() + 60
    while answers and time.monotonic() < deadline:
        try:
            m = c.recv(max(0.1, deadline - time.monotonic()))
        except TimeoutError:
            break
        if m.kind != 'call' or m.member != 'CheckAuthorization':
            continue
        subject, action, details, flags, cancel_id = m.body
        calls.append({'kind': subject[0], 'name': subject[1]['name'].value, 'action': action,
                      'flags': flags, 'path': m.path, 'interface': m.interface,
                      'signature': m.signature})
        yes = answers.pop(0) == 'yes'
        c.reply(m, '(bba{ss})', [(yes, False, {})])
    with open(log, 'w') as f:
        json.dump(calls, f)


def main():
    cmd, args = sys.argv[1], sys.argv[2:]
    try:
        if cmd == 'xml-compare':
            live, contract, iface = args
            cmp_xml(open(live).read(), open(contract).read(), iface)
        elif cmd == 'request-introspect':
            s_introspect_request(*args)
        elif cmd == 'chat':
            s_chat(*args)
        elif cmd == 'cancel':
            s_cancel(*args)
        elif cmd == 'disconnect':
            s_disconnect(*args)
        elif cmd == 'errors':
            s_errors(*args)
        elif cmd == 'watch-props':
            s_watch_props(*args)
        elif cmd == 'drain':
            s_drain(*args)
        elif cmd == 'fake-polkit':
            s_fake_polkit(*args)
        else:
            raise SystemExit('unknown scenario ' + cmd)
    except Exception as e:  # a scenario that breaks is a failure, never a skip
        check('%s ran to the end' % cmd, False, '%s: %s' % (type(e).__name__, e))


if __name__ == '__main__':
    main()
PY

# Runs a scenario of the client; its "ok"/"not ok" lines count here.
scenario() { # [--as-nobody] name args...
  local out rc=0 pre=()
  if [ "$1" = --as-nobody ]; then pre=(setpriv --reuid=65534 --regid=65534 --clear-groups); shift; fi
  out=$("${pre[@]}" "$py" "$tmp/dbusc.py" "$@" 2>"$tmp/py.err") || rc=$?
  local counted=0 line
  while IFS= read -r line; do
    case $line in
      "ok - "*) ok "${line#ok - }"; counted=1 ;;
      "not ok - "*) bad "${line#not ok - }"; counted=1 ;;
      ?*) echo "# $line" ;;
    esac
  done <<<"$out"
  if [ $rc -ne 0 ] || [ $counted -eq 0 ]; then
    bad "scenario $1 ran (exit $rc)"
    sed 's/^/# /' "$tmp/py.err"
  fi
}
wait_file() { # path seconds
  local _
  for _ in $(seq 1 $(($2 * 10))); do [ -e "$1" ] && return 0; sleep 0.1; done
  return 1
}

# ---- a private bus ----
chmod 755 "$tmp" # the root-only part connects as nobody
chmod 644 "$tmp/dbusc.py"
addr=unix:path=$tmp/bus
cat >"$tmp/bus.conf" <<EOF
<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>$addr</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow send_destination="*"/>
    <allow receive_sender="*"/>
    <allow own="*"/>
  </policy>
</busconfig>
EOF
bus_pid=$(dbus-daemon --config-file="$tmp/bus.conf" --fork --print-pid --nopidfile) ||
  die "dbus-daemon starts"
bc() { busctl --address="$addr" --timeout=120 "$@"; }
E=(org.moed.Engine1 /org/moed/Engine1 org.moed.Engine1)

# ---- the daemon ----
"$build/tools/moed-fixture" --shape tiny --type Q8_0 ${MOED_VOCAB_JSON:+--vocab "$MOED_VOCAB_JSON"} \
  -o "$tmp/tiny.gguf" >/dev/null || die "moed-fixture writes the model"
model=tiny # per-user mode names a model after its file
mkdir -m 700 "$tmp/run"
start_moed() {
  env -u NOTIFY_SOCKET -u LISTEN_FDS -u LISTEN_PID -u WATCHDOG_USEC \
    DBUS_SESSION_BUS_ADDRESS="$addr" XDG_RUNTIME_DIR="$tmp/run" \
    "$build/daemon/moed" --user --model "$tmp/tiny.gguf" --socket "$tmp/moed.sock" \
    --threads 2 >>"$tmp/moed.log" 2>&1 &
  moed_pid=$!
  local _
  for _ in $(seq 1 600); do # 60 s at most
    if [ "$(bc call org.freedesktop.DBus /org/freedesktop/DBus org.freedesktop.DBus \
            NameHasOwner s org.moed.Engine1 2>/dev/null)" = "b true" ]; then
      return 0
    fi
    kill -0 "$moed_pid" 2>/dev/null || die "moed runs (it exited; see its log)"
    sleep 0.1
  done
  die "moed takes the name org.moed.Engine1 within 60 s"
}
start_moed
ok "moed owns org.moed.Engine1 on the bus"

# ---- the interface matches the shipped XML ----
bc introspect --xml-interface "${E[@]:0:2}" >"$tmp/live.xml" || die "introspect works"
scenario xml-compare "$tmp/live.xml" "$contract" org.moed.Engine1
scenario request-introspect "$addr" "$model" "$contract"

# ---- ListModels, properties, status, usage ----
json_get() { # json-text python-expression-over-j
  "$py" -c 'import json,sys; j=json.loads(sys.argv[1]); print(eval(sys.argv[2]))' "$1" "$2"
}
lm=$(bc --json=short call "${E[@]}" ListModels)
check "ListModels lists $model with its context and size" \
  test "$(json_get "$lm" "[m[0] for m in j['data'][0] if m[2] > 0 and m[3] > 0]")" = "['$model']"
v=$(bc --json=short get-property "${E[@]}" Version)
check "Version is moed's version" test "$(json_get "$v" "j['data']")" = \
  "$("$build/daemon/moed" --version | grep -Eo '[0-9]+\.[0-9]+\.[0-9]+' | head -n 1)"
v=$(bc --json=short get-property "${E[@]}" State)
check "State is serving" test "$(json_get "$v" "j['data']")" = serving
v=$(bc --json=short get-property "${E[@]}" Models)
check "Models lists $model" test "$(json_get "$v" "j['data']")" = "['$model']"
v=$(bc --json=short get-property "${E[@]}" ActiveRequests)
check "ActiveRequests is 0 when idle" test "$(json_get "$v" "j['data']")" = 0
st=$(bc --json=short call "${E[@]}" GetStatus)
check "GetStatus is JSON with the state" \
  test "$(json_get "$st" "json.loads(j['data'][0])['state']")" = serving
us=$(bc --json=short call "${E[@]}" GetUsage)
check "GetUsage is JSON naming the caller's tenant" \
  test "$(json_get "$us" "json.loads(j['data'][0])['tenant']")" = "$(id -un)"

# ---- Complete: greedy twice gives the same answer ----
complete() { # max_tokens (the conversation is QUESTION in the client)
  bc --json=short call "${E[@]}" Complete 'sa(ss)a{sv}' "$model" \
    2 system "Answer briefly." user "What is a mixture of experts?" \
    2 temperature d 0 max_tokens t "$1"
}
c1=$(complete 24) c2=$(complete 24)
text=$(json_get "$c1" "j['data'][0]")
check "Complete answers" test -n "$text"
check "Complete with temperature 0 twice gives the same text" \
  test "$text" = "$(json_get "$c2" "j['data'][0]")"
check "Complete reports finish_reason and token counts" test "$(json_get "$c1" \
  "j['data'][1] in ('stop', 'length') and j['data'][2] > 0 and 0 < j['data'][3] <= 24")" = True

# ---- Chat: the same answer as signals, to the caller alone; Cancel;
# ---- a caller that leaves; bad calls ----
scenario chat "$addr" "$model" 24 "$text" "$(json_get "$c1" "j['data'][1]")"
scenario cancel "$addr" "$model"
scenario disconnect "$addr" "$model"
scenario errors "$addr" "$model"

# ---- Reload by the owner, announced with PropertiesChanged ----
rm -f "$tmp/watch.ready"
"$py" "$tmp/dbusc.py" watch-props "$addr" "$tmp/watch.ready" 20 >"$tmp/watch.out" 2>&1 &
watch_pid=$!
bg_pids+=("$watch_pid")
wait_file "$tmp/watch.ready" 20 || bad "the PropertiesChanged watcher starts"
check "Reload by the user who runs moed succeeds" bc call "${E[@]}" Reload
wait "$watch_pid" || true
scenario_out() { # feeds saved client output through the counting
  local line
  while IFS= read -r line; do
    case $line in
      "ok - "*) ok "${line#ok - }" ;;
      "not ok - "*) bad "${line#not ok - }" ;;
      ?*) echo "# $line" ;;
    esac
  done <"$1"
}
scenario_out "$tmp/watch.out"

# ---- another user: identity from the bus, polkit for Reload (root only) ----
if [ "$(id -u)" = 0 ] && command -v setpriv >/dev/null; then
  nb() { setpriv --reuid=65534 --regid=65534 --clear-groups \
           busctl --address="$addr" --timeout=30 "$@"; }
  if nb call "${E[@]}" ListModels >"$tmp/nb.out" 2>&1; then
    bad "another user (no tenant) is refused ListModels"
  else
    check "another user (no tenant) is refused ListModels" grep -qi "tenant\|denied" "$tmp/nb.out"
  fi
  if nb call "${E[@]}" Reload >"$tmp/nb.out" 2>&1; then
    bad "Reload by another user without polkit is refused"
  else
    check "Reload by another user without polkit is refused" grep -q "polkit" "$tmp/nb.out"
  fi
  rm -f "$tmp/polkit.ready"
  "$py" "$tmp/dbusc.py" fake-polkit "$addr" no,yes "$tmp/polkit.json" "$tmp/polkit.ready" \
    >"$tmp/polkit.out" 2>&1 &
  pk_pid=$!
  bg_pids+=("$pk_pid")
  if wait_file "$tmp/polkit.ready" 20; then
    if nb call "${E[@]}" Reload >"$tmp/nb.out" 2>&1; then
      bad "Reload is refused when polkit says no"
    else
      check "Reload is refused when polkit says no" grep -q "not authorized" "$tmp/nb.out"
    fi
    check "Reload is allowed when polkit says yes" nb call "${E[@]}" Reload
    wait "$pk_pid" || true
    check "polkit was asked for org.moed.manage about the caller's bus name" \
      test "$(json_get "$(cat "$tmp/polkit.json")" "len(j) == 2 and all(c['action'] == 'org.moed.manage' and c['kind'] == 'system-bus-name' and c['name'].startswith(':') and c['signature'] == '(sa{sv})sa{ss}us' and c['flags'] == 1 for c in j)")" = True
  else
    bad "the stand-in polkitd starts"
  fi
else
  echo "# SKIP: the other-user and polkit checks need root (setpriv); running as $(id -un)"
fi

# ---- SIGTERM: the running Chat finishes, new ones are refused, exit 0 ----
scenario drain "$addr" "$model" "$moed_pid"
rc=''
for _ in $(seq 1 600); do # 60 s at most
  if ! kill -0 "$moed_pid" 2>/dev/null; then
    rc=0
    wait "$moed_pid" || rc=$?
    break
  fi
  sleep 0.1
done
check "moed exits with status 0 after SIGTERM (status ${rc:-still running})" test "$rc" = 0
moed_pid=''
check "moed released org.moed.Engine1" test "$(bc call org.freedesktop.DBus /org/freedesktop/DBus \
  org.freedesktop.DBus NameHasOwner s org.moed.Engine1)" = "b false"
if grep -q "ERROR: AddressSanitizer\|runtime error:" "$tmp/moed.log"; then
  bad "moed ran clean under the sanitizers"; grep -A20 "ERROR: AddressSanitizer\|runtime error:" "$tmp/moed.log" | head -n 40
else
  ok "moed ran clean under the sanitizers"
fi

if [ "$failed" -gt 0 ]; then
  echo "--- moed log (tail)"
  tail -n 40 "$tmp/moed.log"
fi
echo "$passed passed, $failed failed"
test "$failed" -eq 0
