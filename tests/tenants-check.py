#!/usr/bin/env python3
"""tenants-check: the checks of tests/test-tenants.sh that want more than
curl and grep, standard library only. The shell script records what each
request it made should have left behind (an "expectation" per request: who
asked, and the usage of the answer or the reason of the refusal); this
script compares that with the daemon's usage, its audit records (stderr
fallback lines or journald) and the hash-chained audit file.

Commands print JSON (json, sse, served, refused, flip) or TAP lines
("ok - ..." / "not ok - ..."); the TAP commands exit 1 when a check
failed."""
import hashlib
import json
import os
import re
import subprocess
import sys
import time

AUDIT_MESSAGE_ID = '740c0de242704d41b9c8eaab7f3f9bf7'
USAGE_KEYS = ('requests', 'refusals', 'prompt_tokens', 'completion_tokens', 'limited')


def out(obj):
    print(json.dumps(obj, ensure_ascii=False, separators=(',', ':')))


def load(path):
    with open(path, encoding='utf-8') as f:
        return json.load(f)


def load_lines(path):
    res = []
    with open(path, encoding='utf-8') as f:
        for line in f:
            if line.strip():
                res.append(json.loads(line))
    return res


class Tap:
    def __init__(self):
        self.failed = 0

    def check(self, what, cond, detail=''):
        if cond:
            print('ok - %s' % what)
        else:
            self.failed += 1
            print('not ok - %s' % what)
            if detail:
                for line in str(detail).splitlines():
                    print('  | %s' % line[:400])
        return cond

    def done(self):
        sys.exit(1 if self.failed else 0)


# ---- json FILE EXPR: a Python expression of the document j ----

def cmd_json(path, expr):
    j = load(path)
    v = eval(expr, {'j': j, 'len': len, 'isinstance': isinstance, 'str': str, 'int': int,
                    'all': all, 'any': any, 'sorted': sorted, 'sum': sum})
    print(v if isinstance(v, str) else json.dumps(v, ensure_ascii=False))


# ---- sse FILE: what a stream carried, and whether it was well formed ----

def cmd_sse(path):
    raw = open(path, 'rb').read().decode('utf-8', 'replace')
    res = {'id': None, 'text': '', 'finish': None, 'moed': None, 'usage': None,
           'done': False, 'errors': []}
    events = [e for e in raw.split('\n\n') if e.strip()]
    if not raw.endswith('\n\n'):
        res['errors'].append('the stream does not end with a blank line')
    for i, ev in enumerate(events):
        if not ev.startswith('data: '):
            res['errors'].append('event %d is not a data line: %r' % (i, ev[:80]))
            continue
        payload = ev[len('data: '):]
        if payload == '[DONE]':
            if i != len(events) - 1:
                res['errors'].append('[DONE] is not the last event')
            res['done'] = True
            continue
        try:
            c = json.loads(payload)
        except ValueError as e:
            res['errors'].append('event %d is not JSON: %s' % (i, e))
            continue
        if 'error' in c:
            res['errors'].append('event %d carries an error: %s' % (i, c['error']))
            continue
        res['id'] = res['id'] or c.get('id')
        if c.get('usage'):
            res['usage'] = c['usage']
        for ch in c.get('choices') or []:
            delta = ch.get('delta') or {}
            res['text'] += ch.get('text') or delta.get('content') or ''
            if ch.get('finish_reason') is not None:
                if res['finish'] is not None:
                    res['errors'].append('two chunks with a finish_reason')
                res['finish'] = ch['finish_reason']
                res['moed'] = c.get('moed')
    if not res['done']:
        res['errors'].append('no data: [DONE]')
    if res['finish'] is None:
        res['errors'].append('no chunk with a finish_reason')
    out(res)


# ---- expectations: one JSON line per request the test made ----

def cmd_served(kind, path, tenant, uid, gid):
    """kind: json (a whole answer) or sse (the summary of cmd_sse)."""
    j = load(path)
    if kind == 'json':
        finish = j['choices'][0]['finish_reason']
    else:
        finish = j['finish']
    u = j['usage']
    out({'served': True, 'id': j['id'], 'tenant': tenant, 'uid': int(uid), 'gid': int(gid),
         'prompt_tokens': u['prompt_tokens'], 'completion_tokens': u['completion_tokens'],
         'finish': finish})


def cmd_refused(tenant, uid, gid, contains, reason):
    """tenant '-': none was found; reason '-': not counted in usage."""
    out({'served': False, 'tenant': None if tenant == '-' else tenant, 'uid': int(uid),
         'gid': int(gid), 'contains': contains, 'reason': None if reason == '-' else reason})


# ---- usage USAGE EXPECT [only]: /v1/moed/usage against the expectations ----

def expected_usage(expect):
    want = {}
    for e in expect:
        if e['tenant'] is None or (not e['served'] and e['reason'] is None):
            continue
        w = want.setdefault(e['tenant'], {'requests': 0, 'refusals': 0, 'prompt_tokens': 0,
                                          'completion_tokens': 0, 'refused': {}})
        if e['served']:
            w['requests'] += 1
            w['prompt_tokens'] += e['prompt_tokens']
            w['completion_tokens'] += e['completion_tokens']
        else:
            w['refusals'] += 1
            w['refused'][e['reason']] = w['refused'].get(e['reason'], 0) + 1
    return want


def cmd_usage(usage_path, expect_path, caller, scope):
    """caller: the tenant the answer must name; scope: 'all' (every tenant
    of the set is listed) or 'own' (only the caller's)."""
    t = Tap()
    j = load(usage_path)
    expect = load_lines(expect_path) if os.path.getsize(expect_path) else []
    want = expected_usage(expect)
    listed = {x['name']: x for x in j.get('tenants', [])}
    t.check('usage names the caller\'s tenant %s' % caller, j.get('tenant') == caller, j)
    if scope == 'own':
        t.check('usage lists only %s' % caller, sorted(listed) == [caller], sorted(listed))
    else:
        missing = [n for n in want if n not in listed]
        t.check('usage lists every tenant that made requests (%s)' % ', '.join(sorted(want)),
                not missing, 'missing: %s; listed: %s' % (missing, sorted(listed)))
    for name, x in sorted(listed.items()):
        w = want.get(name, {'requests': 0, 'refusals': 0, 'prompt_tokens': 0,
                            'completion_tokens': 0, 'refused': {}})
        got = {k: x.get(k) for k in ('requests', 'refusals', 'prompt_tokens',
                                     'completion_tokens', 'refused')}
        t.check('usage of %s: requests %d, refusals %d %s, prompt %d and completion %d '
                'tokens (the sum of its answers\' usage)' %
                (name, w['requests'], w['refusals'], w['refused'] or '', w['prompt_tokens'],
                 w['completion_tokens']), got == w, 'got %s' % got)
        t.check('usage of %s: nothing active or queued' % name,
                x.get('active') == 0 and x.get('queued') == 0, x)
    t.done()


# ---- same-usage A B: two usage answers with the same counts ----

def cmd_same_usage(a_path, b_path):
    t = Tap()
    a = {x['name']: x for x in load(a_path)['tenants']}
    b = {x['name']: x for x in load(b_path)['tenants']}
    t.check('the same tenants are listed (%s)' % ', '.join(sorted(a)), sorted(a) == sorted(b),
            '%s / %s' % (sorted(a), sorted(b)))
    for name in sorted(a):
        if name not in b:
            continue
        ka = {k: a[name].get(k) for k in USAGE_KEYS + ('refused',)}
        kb = {k: b[name].get(k) for k in USAGE_KEYS + ('refused',)}
        t.check('usage of %s survived: %s' % (name, json.dumps(ka, sort_keys=True)), ka == kb,
                'after: %s' % json.dumps(kb, sort_keys=True))
    t.done()


# ---- audit records ----

FIELD = re.compile(r'([A-Z0-9_]+)=("(?:[^"\\]|\\.)*"|[^ ]*)(?: |$)')
ESC = re.compile(r'\\(x[0-9a-fA-F]{2}|.)')


def unescape(v):
    if not v.startswith('"'):
        return v
    table = {'n': '\n', 'r': '\r', 't': '\t', '"': '"', '\\': '\\'}

    def one(m):
        s = m.group(1)
        return chr(int(s[1:], 16)) if s[0] == 'x' and len(s) == 3 else table.get(s, s)
    return ESC.sub(one, v[1:-1])


def parse_fallback_line(line):
    """One "KEY=value KEY=value" line of policy/audit.c, or None."""
    rec, pos = {}, 0
    while pos < len(line):
        m = FIELD.match(line, pos)
        if not m:
            return None
        rec[m.group(1)] = unescape(m.group(2))
        pos = m.end()
    return rec


def records_from_log(path):
    recs = []
    with open(path, encoding='utf-8', errors='replace') as f:
        for line in f:
            line = line.rstrip('\n')
            if line.startswith('MESSAGE_ID=' + AUDIT_MESSAGE_ID + ' '):
                r = parse_fallback_line(line)
                recs.append(r if r is not None else {'UNPARSED': line})
    return recs


def records_from_journal(pid, want):
    """journald is asynchronous: read until want records came (10 s)."""
    deadline = time.time() + 10
    while True:
        p = subprocess.run(['journalctl', '--no-pager', '-o', 'json',
                            'MESSAGE_ID=' + AUDIT_MESSAGE_ID, '_PID=' + pid],
                           capture_output=True, text=True, timeout=30)
        recs = [json.loads(x) for x in p.stdout.splitlines() if x.strip()]
        if len(recs) >= want or time.time() > deadline:
            return recs
        time.sleep(0.5)


def find_record(recs, used, pred):
    for i, r in enumerate(recs):
        if i not in used and pred(r):
            used.add(i)
            return r
    return None


FILE_FIELDS = {  # journal field: audit file key
    'MOED_TENANT': 'tenant', 'MOED_UID': 'uid', 'MOED_GID': 'gid', 'MOED_PID': 'pid',
    'MOED_DOOR': 'door', 'MOED_MODEL': 'model', 'MOED_REQUEST_ID': 'request_id',
    'MOED_PROMPT_TOKENS': 'prompt_tokens', 'MOED_COMPLETION_TOKENS': 'completion_tokens',
    'MOED_FINISH': 'finish', 'MOED_REFUSAL': 'refusal',
}


def cmd_audit(source, audit_file, expect_path, model):
    """source: log:PATH (the daemon's stderr) or journal:PID."""
    t = Tap()
    expect = load_lines(expect_path) if os.path.getsize(expect_path) else []
    kind, _, arg = source.partition(':')
    recs = records_from_log(arg) if kind == 'log' else records_from_journal(arg, len(expect))
    where = 'the daemon\'s stderr' if kind == 'log' else 'journald'
    t.check('%s holds one audit record per request made (%d)' % (where, len(expect)),
            len(recs) == len(expect), '%d records: %s' % (len(recs), json.dumps(recs)[:3000]))
    t.check('every audit record parses', not any('UNPARSED' in r for r in recs),
            [r for r in recs if 'UNPARSED' in r])
    used = set()
    for e in expect:
        if e['served']:
            r = find_record(recs, used, lambda r: r.get('MOED_REQUEST_ID') == e['id'])
            what = 'audit record of %s (tenant %s, uid %d)' % (e['id'], e['tenant'], e['uid'])
            if not t.check(what + ' exists', r is not None):
                continue
            want = {'MOED_TENANT': e['tenant'], 'MOED_UID': str(e['uid']),
                    'MOED_GID': str(e['gid']), 'MOED_DOOR': 'http', 'MOED_MODEL': model,
                    'MOED_PROMPT_TOKENS': str(e['prompt_tokens']),
                    'MOED_COMPLETION_TOKENS': str(e['completion_tokens']),
                    'MOED_FINISH': e['finish']}
            got = {k: r.get(k) for k in want}
            t.check(what + ': tenant, uid, gid, door, model, %d+%d tokens, finish %s' %
                    (e['prompt_tokens'], e['completion_tokens'], e['finish']), got == want,
                    'got %s' % got)
            t.check(what + ': timings and the pid, no refusal, no content',
                    'MOED_TOTAL_USEC' in r and 'MOED_QUEUE_USEC' in r and
                    int(r.get('MOED_PID', '0')) > 0 and 'MOED_REFUSAL' not in r and
                    'MOED_PROMPT' not in r and 'MOED_ANSWER' not in r, r)
        else:
            def match(r):
                return ('MOED_REFUSAL' in r and e['contains'] in r['MOED_REFUSAL'] and
                        r.get('MOED_TENANT') == e['tenant'] and r.get('MOED_UID') == str(e['uid']))
            r = find_record(recs, used, match)
            what = 'audit record of the refusal "%s" (tenant %s, uid %d)' % (
                e['contains'], e['tenant'] or 'none', e['uid'])
            if not t.check(what + ' exists', r is not None,
                           json.dumps([x for x in recs if 'MOED_REFUSAL' in x])[:3000]):
                continue
            t.check(what + ': gid, door, no finish, no timings, no content',
                    r.get('MOED_GID') == str(e['gid']) and r.get('MOED_DOOR') == 'http' and
                    'MOED_FINISH' not in r and 'MOED_TOTAL_USEC' not in r and
                    'MOED_PROMPT' not in r and int(r.get('MOED_PID', '0')) > 0, r)
    # The audit file holds the same records, each line hashed as the
    # journal record says.
    lines = {}
    with open(audit_file, 'rb') as f:
        for raw in f.read().split(b'\n'):
            if raw:
                j = json.loads(raw)
                lines[j['seq']] = (raw, j)
    bad = []
    for r in recs:
        seq = int(r.get('MOED_AUDIT_SEQ', '0'))
        if seq not in lines:
            bad.append('seq %s of %s is not in the file' % (seq, r.get('MOED_REQUEST_ID')))
            continue
        raw, j = lines[seq]
        if hashlib.sha256(raw).hexdigest() != r.get('MOED_AUDIT_HASH'):
            bad.append('seq %d: MOED_AUDIT_HASH is not the SHA-256 of the line' % seq)
        for jf, key in FILE_FIELDS.items():
            a, b = r.get(jf), j.get(key)
            if (a is None) != (b is None) or (a is not None and a != str(b)):
                bad.append('seq %d: %s=%r in the record, %s=%r in the file' % (seq, jf, a, key, b))
        if j.get('event') != 'request':
            bad.append('seq %d: event %r' % (seq, j.get('event')))
    t.check('the audit file holds the same %d records (fields, seq and hash)' % len(recs),
            not bad, '\n'.join(bad))
    t.done()


# ---- flip FILE: change one digit of a count in usage.json ----

def cmd_flip(path):
    """Keeps the file valid JSON, so only the checksum can tell."""
    data = bytearray(open(path, 'rb').read())
    m = re.search(rb'"(requests|prompt_tokens|completion_tokens)": *([1-9])', data)
    if not m:
        print('no count to change in %s' % path, file=sys.stderr)
        sys.exit(1)
    i = m.start(2)
    old = data[i]
    data[i] = ord('1') if old != ord('1') else ord('2')
    open(path, 'wb').write(bytes(data))
    json.loads(bytes(data))
    out({'key': m.group(1).decode(), 'offset': i, 'from': chr(old), 'to': chr(data[i])})


COMMANDS = {
    'json': (cmd_json, 2),
    'sse': (cmd_sse, 1),
    'served': (cmd_served, 5),
    'refused': (cmd_refused, 5),
    'usage': (cmd_usage, 4),
    'same-usage': (cmd_same_usage, 2),
    'audit': (cmd_audit, 4),
    'flip': (cmd_flip, 1),
}

if __name__ == '__main__':
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS or \
            len(sys.argv) - 2 != COMMANDS[sys.argv[1]][1]:
        print('usage: tenants-check.py %s ...' % '|'.join(COMMANDS), file=sys.stderr)
        sys.exit(2)
    COMMANDS[sys.argv[1]][0](*sys.argv[2:])
