#!/usr/bin/env python3
"""daemon-client: what tests/test-daemon.sh cannot do with curl alone,
written with the standard library only: checks of an SSE stream and of a
Prometheus page, JSON field extraction, and raw-socket clients (a slow
client, a silent one, a flood of connections, a probe of the drain).

Each command prints one JSON object (or, for `json`, a value) on stdout;
the shell script decides what passes."""
import http.client
import json
import os
import re
import selectors
import signal
import socket
import sys
import time


class UnixHTTP(http.client.HTTPConnection):
    """HTTP/1.1 over a Unix socket (keep-alive by default)."""

    def __init__(self, path, timeout=10.0):
        super().__init__('localhost', timeout=timeout)
        self.unix_path = path

    def connect(self):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self.unix_path)
        self.sock = s


def out(obj):
    print(json.dumps(obj, ensure_ascii=False, separators=(',', ':')))


# ---- json FILE EXPR: EXPR (Python, j is the document) of a JSON file ----

def cmd_json(path, expr):
    with open(path, encoding='utf-8') as f:
        j = json.load(f)
    v = eval(expr, {'j': j, 'len': len, 'isinstance': isinstance, 'str': str,
                    'int': int, 'float': float, 'all': all, 'any': any, 'sorted': sorted})
    print(v if isinstance(v, str) else json.dumps(v, ensure_ascii=False))


# ---- sse KIND FILE: the structure of a stream, and what it carried ----

def cmd_sse(kind, path):
    """kind: chat or completion. Prints text, finish, usage, moed, events,
    errors (every rule of the stream that was broken)."""
    raw = open(path, 'rb').read()
    errors = []
    res = {'text': '', 'finish': None, 'usage': None, 'moed': None, 'events': 0,
           'done': False, 'errors': errors}
    try:
        data = raw.decode('utf-8')
    except UnicodeDecodeError as e:
        errors.append('the stream is not UTF-8: %s' % e)
        out(res)
        return
    if not data.endswith('\n\n'):
        errors.append('the stream does not end with a blank line')
    events = [e for e in data.split('\n\n') if e != '']
    res['events'] = len(events)
    if not events:
        errors.append('no events')
    want_obj = 'chat.completion.chunk' if kind == 'chat' else 'text_completion'
    ids, models = set(), set()
    finish_at = usage_at = None
    content_after_finish = False
    for i, ev in enumerate(events):
        if '\n' in ev or not ev.startswith('data: '):
            errors.append('event %d is not one "data: " line: %r' % (i, ev[:80]))
            continue
        payload = ev[len('data: '):]
        if payload == '[DONE]':
            if i != len(events) - 1:
                errors.append('[DONE] is event %d of %d, not the last' % (i, len(events)))
            res['done'] = True
            continue
        try:
            c = json.loads(payload)
        except ValueError as e:
            errors.append('event %d is not JSON: %s' % (i, e))
            continue
        if 'error' in c:
            errors.append('event %d carries an error: %s' % (i, c['error']))
            continue
        if c.get('object') != want_obj:
            errors.append('event %d: object %r, expected %r' % (i, c.get('object'), want_obj))
        ids.add(c.get('id'))
        models.add(c.get('model'))
        choices = c.get('choices')
        if c.get('usage') is not None:
            if choices != []:
                errors.append('event %d: a usage chunk with choices' % i)
            if usage_at is not None:
                errors.append('two usage chunks')
            if finish_at is None:
                errors.append('the usage chunk comes before the finish chunk')
            usage_at = i
            res['usage'] = c['usage']
            continue
        if 'usage' not in c:
            errors.append('event %d has no "usage" key (null expected)' % i)
        if not isinstance(choices, list) or len(choices) != 1:
            errors.append('event %d: choices is not one choice' % i)
            continue
        ch = choices[0]
        if ch.get('index') != 0:
            errors.append('event %d: choice index %r' % (i, ch.get('index')))
        if kind == 'chat':
            delta = ch.get('delta')
            if not isinstance(delta, dict):
                errors.append('event %d: no delta object' % i)
                continue
            if i == 0 and delta.get('role') != 'assistant':
                errors.append('the first chat chunk does not carry role "assistant"')
            if i > 0 and 'role' in delta:
                errors.append('event %d carries the role again' % i)
            piece = delta.get('content') or ''
        else:
            piece = ch.get('text')
            if not isinstance(piece, str):
                errors.append('event %d: text is not a string' % i)
                piece = ''
        if finish_at is not None and piece:
            content_after_finish = True
        res['text'] += piece
        if ch.get('finish_reason') is not None:
            if finish_at is not None:
                errors.append('two chunks with a finish_reason')
            finish_at = i
            res['finish'] = ch['finish_reason']
            res['moed'] = c.get('moed')
    if content_after_finish:
        errors.append('text after the finish chunk')
    if finish_at is None:
        errors.append('no chunk with a finish_reason')
    if not res['done']:
        errors.append('no data: [DONE]')
    if len(ids) > 1 or None in ids:
        errors.append('chunk ids differ or are missing: %s' % sorted(map(str, ids)))
    if len(models) > 1:
        errors.append('chunk models differ: %s' % sorted(map(str, models)))
    out(res)


# ---- metrics FILE: the Prometheus text format (0.0.4) ----

SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$')
LABELS = re.compile(r'^\{([a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\]|\\.)*"(,[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\]|\\.)*")*)?\}$')


def family_of(name, types):
    for suffix in ('_bucket', '_sum', '_count'):
        if name.endswith(suffix) and types.get(name[:-len(suffix)]) in ('histogram', 'summary'):
            return name[:-len(suffix)]
    return name


def cmd_metrics(path):
    """Prints families (name: type), samples ("name{labels}": value) and
    errors: syntax, a TYPE after its samples or twice, a family whose
    samples are not one group, a family without TYPE, histogram buckets."""
    errors = []
    types, samples, seen_done = {}, {}, set()
    current = None
    text = open(path, encoding='utf-8').read()
    if text and not text.endswith('\n'):
        errors.append('the page does not end with a newline')
    for n, line in enumerate(text.splitlines(), 1):
        if line.startswith('# TYPE '):
            parts = line.split()
            if len(parts) != 4 or parts[3] not in ('counter', 'gauge', 'histogram', 'summary',
                                                   'untyped'):
                errors.append('line %d: bad TYPE line %r' % (n, line))
                continue
            if parts[2] in types:
                errors.append('line %d: a second TYPE for %s' % (n, parts[2]))
            if parts[2] in seen_done or any(family_of(k.split('{')[0], types) == parts[2]
                                            for k in samples):
                errors.append('line %d: TYPE of %s after its samples' % (n, parts[2]))
            types[parts[2]] = parts[3]
            continue
        if line.startswith('#') or line == '':
            continue
        m = SAMPLE.match(line)
        if not m:
            errors.append('line %d: not a sample: %r' % (n, line))
            continue
        name, labels, value = m.group(1), m.group(2) or '', m.group(3)
        if labels and not LABELS.match(labels):
            errors.append('line %d: bad labels %r' % (n, labels))
        try:
            v = float(value)
        except ValueError:
            errors.append('line %d: bad value %r' % (n, value))
            continue
        fam = family_of(name, types)
        if fam not in types:
            errors.append('line %d: %s has no # TYPE line' % (n, fam))
        if fam != current:
            if fam in seen_done:
                errors.append('line %d: the samples of %s are not one group' % (n, fam))
            if current is not None:
                seen_done.add(current)
            current = fam
        key = name + labels
        if key in samples:
            errors.append('line %d: %s twice' % (n, key))
        samples[key] = v
    for fam, t in types.items():
        if t != 'histogram':
            continue
        buckets = [(k, v) for k, v in samples.items() if k.startswith(fam + '_bucket{')]
        les = []
        for k, v in buckets:
            le = re.search(r'le="([^"]*)"', k)
            les.append((float('inf') if le.group(1) == '+Inf' else float(le.group(1)), v))
        les.sort()
        if not les or les[-1][0] != float('inf'):
            errors.append('%s has no +Inf bucket' % fam)
        elif samples.get(fam + '_count') != les[-1][1]:
            errors.append('%s_count is not its +Inf bucket' % fam)
        if any(a[1] > b[1] for a, b in zip(les, les[1:])):
            errors.append('%s buckets are not cumulative' % fam)
    out({'families': types, 'samples': samples, 'errors': errors})


# ---- raw-socket clients ----

def read_status(s, deadline):
    """The status code of the response on s, or None if it closed first."""
    buf = b''
    while b'\r\n' not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            return 'timeout'
        s.settimeout(left)
        try:
            d = s.recv(4096)
        except socket.timeout:
            return 'timeout'
        except OSError:
            return None
        if not d:
            return None
        buf += d
    m = re.match(rb'HTTP/1\.[01] (\d{3})', buf)
    return int(m.group(1)) if m else 'garbage'


def cmd_trickle(path, delay):
    """Sends a whole GET /health one byte every DELAY seconds; prints how
    long it took, whether the daemon closed it early, and the status."""
    req = b'GET /health HTTP/1.0\r\n\r\n'
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    t0 = time.monotonic()
    sent = 0
    try:
        for b in req:
            s.send(bytes([b]))
            sent += 1
            time.sleep(float(delay))
    except OSError:
        pass
    status = read_status(s, time.monotonic() + 10) if sent == len(req) else None
    out({'sent': sent, 'of': len(req), 'seconds': round(time.monotonic() - t0, 2),
         'status': status})


def cmd_silent(path, wait):
    """Sends part of a request line, then nothing; prints whether (and
    after how long) the daemon closed the connection."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    s.send(b'GET /hea')
    t0 = time.monotonic()
    deadline = t0 + float(wait)
    closed = False
    while time.monotonic() < deadline:
        s.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            d = s.recv(4096)
        except socket.timeout:
            break
        except OSError:
            closed = True
            break
        if not d:
            closed = True
            break
    out({'closed': closed, 'after_s': round(time.monotonic() - t0, 2)})


def cmd_flood(path, n, wait):
    """Opens N connections at once, then sends GET /health on each; prints
    how many connected, were answered (by status), were closed unanswered,
    or were still waiting after WAIT seconds."""
    n, wait = int(n), float(wait)
    sel = selectors.DefaultSelector()
    res = {'opened': 0, 'connect_failed': 0, 'status': {}, 'closed': 0, 'pending': 0}
    socks = []
    for _ in range(n):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            s.connect(path)
        except (BlockingIOError, InterruptedError):
            pass   # in the backlog: finishes on its own
        except OSError:
            res['connect_failed'] += 1
            s.close()
            continue
        socks.append(s)
    res['opened'] = len(socks)
    req = b'GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n'
    bufs = {}
    for s in socks:
        try:
            s.send(req)
        except OSError:
            pass   # the daemon refused it; recv will tell
        bufs[s] = b''
        sel.register(s, selectors.EVENT_READ)
    deadline = time.monotonic() + wait
    while bufs and time.monotonic() < deadline:
        for key, _ in sel.select(timeout=max(0.01, deadline - time.monotonic())):
            s = key.fileobj
            try:
                d = s.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                d = b''
            if d:
                bufs[s] += d
                continue
            m = re.match(rb'HTTP/1\.[01] (\d{3})', bufs[s])
            if m:
                k = m.group(1).decode()
                res['status'][k] = res['status'].get(k, 0) + 1
            else:
                res['closed'] += 1
            sel.unregister(s)
            s.close()
            del bufs[s]
    res['pending'] = len(bufs)
    for s in bufs:
        s.close()
    out(res)


def cmd_drainprobe(path, pid):
    """With a keep-alive connection open: /health answers 200, SIGTERM to
    PID, then /health on the same connection, and a new connection's
    /health (refused, or an HTTP status, or "timeout")."""
    res = {}
    c = UnixHTTP(path, timeout=5)
    c.request('GET', '/health')
    r = c.getresponse()
    r.read()
    res['before'] = r.status
    os.kill(int(pid), signal.SIGTERM)
    time.sleep(0.5)
    try:
        c.request('GET', '/health')
        r = c.getresponse()
        res['kept_body'] = r.read().decode('utf-8', 'replace')
        res['kept'] = r.status
        c.request('POST', '/v1/completions', body=b'{"model":"x","prompt":"x"}',
                  headers={'Content-Type': 'application/json'})
        r = c.getresponse()
        body = r.read()
        res['kept_post'] = r.status
        res['kept_post_code'] = json.loads(body)['error']['code']
    except (OSError, http.client.HTTPException, ValueError, KeyError) as e:
        res.setdefault('kept', 'error: %s' % e)
        res.setdefault('kept_post', 'error: %s' % e)
    c.close()
    try:
        n = UnixHTTP(path, timeout=2)
        n.request('GET', '/health')
        r = n.getresponse()
        r.read()
        res['new'] = r.status
    except (ConnectionRefusedError, FileNotFoundError):
        res['new'] = 'refused'
    except socket.timeout:
        res['new'] = 'timeout'
    except (OSError, http.client.HTTPException) as e:
        res['new'] = 'error: %s' % e
    out(res)


COMMANDS = {
    'json': (cmd_json, 2), 'sse': (cmd_sse, 2), 'metrics': (cmd_metrics, 1),
    'trickle': (cmd_trickle, 2), 'silent': (cmd_silent, 2), 'flood': (cmd_flood, 3),
    'drainprobe': (cmd_drainprobe, 2),
}

if __name__ == '__main__':
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS or \
            len(sys.argv) - 2 != COMMANDS[sys.argv[1]][1]:
        sys.exit('usage: daemon-client.py {%s} ARGS...' % '|'.join(COMMANDS))
    fn, _ = COMMANDS[sys.argv[1]]
    fn(*sys.argv[2:])
