import { spawn } from 'node:child_process';
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { DatabaseSync } from 'node:sqlite';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath, pathToFileURL } from 'node:url';
import t from 'tap';
import { openSqliteStore, SqliteStore, type SqliteStoreOptions } from '../../src/storage/sqlite-store.ts';
import { StoreError, type StoreEvent, type Watcher } from '../../src/storage/store.ts';

/** The subtest type (tap exports it only as a generic class plus plugins). */
type Test = Parameters<Parameters<typeof t.test>[0]>[0];

const storeModuleUrl = pathToFileURL(fileURLToPath(new URL('../../src/storage/sqlite-store.ts', import.meta.url))).href;

/** A store in a fresh tmp dir, closed at the end of the test; background compaction off unless asked. */
async function openTmp(
  t: Test,
  options: Partial<SqliteStoreOptions> = {},
): Promise<{ store: SqliteStore; path: string }> {
  const path = join(t.testdir(), 'store.db');
  const store = await openSqliteStore({ compactIntervalMs: 0, ...options, path });
  t.teardown(() => store.close());
  return { store, path };
}

/** Reads `count` events from a watcher without closing it. */
async function take(watcher: Watcher, count: number): Promise<StoreEvent[]> {
  const it = watcher[Symbol.asyncIterator]();
  const out: StoreEvent[] = [];
  while (out.length < count) {
    const next = await it.next();
    if (next.done === true) break;
    out.push(next.value);
  }
  return out;
}

function countRows(path: string): number {
  const db = new DatabaseSync(path, { readOnly: true });
  try {
    return Number(db.prepare('SELECT count(*) AS n FROM kv').get()?.n);
  } finally {
    db.close();
  }
}

async function waitFor(t: Test, what: string, check: () => Promise<boolean>, timeoutMs = 5_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await check())) {
    if (Date.now() > deadline) {
      t.fail(`timed out waiting for ${what}`);
      return;
    }
    await sleep(5);
  }
}

t.test('create, get, update and delete assign one global revision per write', async (t) => {
  const { store } = await openTmp(t);
  t.equal(store.name, 'sqlite');
  t.equal(await store.currentRevision(), 0);
  t.equal(await store.get('/things/a'), undefined);

  const a = await store.create('/things/a', '{"n":1}');
  t.same(a, { key: '/things/a', value: '{"n":1}', modRevision: 1 });
  const b = await store.create('/things/b', '{"n":2}');
  t.equal(b.modRevision, 2);
  t.same(await store.get('/things/a'), a);

  const a2 = await store.update('/things/a', '{"n":3}', a.modRevision);
  t.same(a2, { key: '/things/a', value: '{"n":3}', modRevision: 3 });
  t.same(await store.get('/things/a'), a2);

  const deleted = await store.delete('/things/a', a2.modRevision);
  t.same(deleted, { key: '/things/a', value: '{"n":3}', modRevision: 4 }, 'delete returns the last value at the deletion revision');
  t.equal(await store.get('/things/a'), undefined);
  t.equal(await store.currentRevision(), 4);

  const again = await store.create('/things/a', '{"n":5}');
  t.equal(again.modRevision, 5, 'a deleted key can be created again');
  const unconditional = await store.delete('/things/b');
  t.equal(unconditional.modRevision, 6, 'delete without expectedRevision is unconditional');
});

t.test('compare-and-swap failures: AlreadyExists, NotFound, Conflict, and they do not consume revisions', async (t) => {
  const { store } = await openTmp(t);
  const a = await store.create('/k/a', 'A');
  await t.rejects(store.create('/k/a', 'again'), { name: 'StoreError', code: 'AlreadyExists' });
  await t.rejects(store.update('/k/missing', 'x', 1), { code: 'NotFound' });
  await t.rejects(store.update('/k/a', 'x', a.modRevision + 1), { code: 'Conflict' });
  await t.rejects(store.delete('/k/missing'), { code: 'NotFound' });
  await t.rejects(store.delete('/k/a', 99), { code: 'Conflict' });
  t.equal(await store.currentRevision(), 1, 'failed writes leave the revision alone');
  t.same(await store.get('/k/a'), a, 'failed writes leave the value alone');

  const a2 = await store.update('/k/a', 'B', a.modRevision);
  await t.rejects(store.update('/k/a', 'C', a.modRevision), { code: 'Conflict' }, 'a stale revision loses the race');
  await store.delete('/k/a', a2.modRevision);
  await t.rejects(store.update('/k/a', 'D', a2.modRevision), { code: 'NotFound' }, 'updating a deleted key is NotFound');
  await t.rejects(store.delete('/k/a'), { code: 'NotFound' });
});

t.test('errors are rejections with StoreError, never synchronous throws', async (t) => {
  const { store } = await openTmp(t, { maxValueBytes: 10 });
  const pending = store.create('/k/big', 'x'.repeat(11));
  t.type(pending, Promise);
  await t.rejects(pending, { code: 'TooLarge' });
  const error = await store.create('/k/a', 'ok').then(() => store.create('/k/a', 'ok')).catch((e: unknown) => e);
  t.type(error, StoreError);

  await t.rejects(openSqliteStore({ path: t.testdir() }), { code: 'Unavailable' }, 'a directory is not a database file');
});

t.test('list is ordered by key and isolates prefixes (/a/ vs /ab/)', async (t) => {
  const { store } = await openTmp(t);
  for (const key of ['/ab/1', '/a/c', '/a/a', '/b/x', '/a/b', '/a', '/ab/0']) await store.create(key, key);
  const a = await store.list('/a/');
  t.same(a.items.map((i) => i.key), ['/a/a', '/a/b', '/a/c']);
  t.equal(a.revision, 7);
  t.equal(a.more, false);
  t.same((await store.list('/ab/')).items.map((i) => i.key), ['/ab/0', '/ab/1']);
  t.same((await store.list('/a')).items.map((i) => i.key), ['/a', '/a/a', '/a/b', '/a/c', '/ab/0', '/ab/1']);
  t.equal((await store.list('')).items.length, 7, 'the empty prefix lists everything');
  t.same((await store.list('/zzz/')).items, []);
  t.same(
    (await store.list('/a/')).items.map((i) => [i.value, i.modRevision]),
    [['/a/a', 3], ['/a/b', 5], ['/a/c', 2]],
  );
  await store.delete('/a/b');
  t.same((await store.list('/a/')).items.map((i) => i.key), ['/a/a', '/a/c'], 'deleted keys are not listed');
});

t.test('limit + startAfter paginate a consistent snapshot, with more and filter', async (t) => {
  const { store } = await openTmp(t);
  const keys: string[] = [];
  for (let i = 0; i < 25; i++) {
    const key = `/p/${String(i).padStart(3, '0')}`;
    keys.push(key);
    await store.create(key, JSON.stringify({ i }));
  }
  await store.create('/q/000', 'other prefix');

  const seen: string[] = [];
  let startAfter: string | undefined;
  let atRevision: number | undefined;
  let pages = 0;
  for (;;) {
    const page = await store.list('/p/', { limit: 10, startAfter, atRevision });
    pages++;
    seen.push(...page.items.map((i) => i.key));
    atRevision ??= page.revision;
    t.equal(page.revision, atRevision, 'every page reads at the first page revision');
    // Writes between pages must not show up in later pages of the same snapshot.
    await store.create(`/p/${String(100 + pages).padStart(3, '0')}`, 'late');
    await store.delete(keys[24] as string).catch(() => {});
    if (!page.more) break;
    startAfter = page.items.at(-1)?.key;
  }
  t.equal(pages, 3);
  t.same(seen, keys, 'pages concatenate to exactly the snapshot');

  const exact = await store.list('/p/', { limit: 2, startAfter: '/p/020', atRevision });
  t.same(exact.items.map((i) => i.key), ['/p/021', '/p/022']);
  t.equal(exact.more, true);
  const last = await store.list('/p/', { limit: 2, startAfter: '/p/022', atRevision });
  t.same(last.items.map((i) => i.key), ['/p/023', '/p/024']);
  t.equal(last.more, false, 'more is false when the page ends exactly at the last item');

  const even = await store.list('/p/', {
    limit: 3,
    atRevision,
    filter: (v) => (JSON.parse(v.value) as { i: number }).i % 2 === 0,
  });
  t.same(even.items.map((i) => i.key), ['/p/000', '/p/002', '/p/004'], 'the filter applies before the limit');
  t.equal(even.more, true);
  const none = await store.list('/p/', { limit: 3, atRevision, filter: (v) => v.key === '/p/024' });
  t.same(none.items.map((i) => i.key), ['/p/024']);
  t.equal(none.more, false);
  await t.rejects(
    store.list('/p/', { filter: () => { throw new TypeError('bad filter'); } }),
    TypeError,
    'a throwing filter surfaces its own error',
  );
  t.same(
    (await store.list('/p/', { startAfter: '/a' })).items.length,
    (await store.list('/p/')).items.length,
    'a startAfter before the prefix does not narrow the list',
  );
  t.same((await store.list('/p/', { startAfter: '/q' })).items, [], 'a startAfter past the prefix lists nothing');
});

t.test('snapshot reads at an older revision return the old values', async (t) => {
  const { store } = await openTmp(t);
  const a1 = await store.create('/s/a', 'a1'); // 1
  await store.create('/s/b', 'b1'); // 2
  await store.update('/s/a', 'a2', a1.modRevision); // 3
  await store.delete('/s/b'); // 4
  await store.create('/s/c', 'c1'); // 5
  await store.create('/s/b', 'b2'); // 6

  const at = async (atRevision: number) =>
    (await store.list('/s/', { atRevision })).items.map((i) => `${i.key}=${i.value}@${i.modRevision}`);
  t.same(await at(1), ['/s/a=a1@1']);
  t.same(await at(2), ['/s/a=a1@1', '/s/b=b1@2']);
  t.same(await at(3), ['/s/a=a2@3', '/s/b=b1@2']);
  t.same(await at(4), ['/s/a=a2@3']);
  t.same(await at(5), ['/s/a=a2@3', '/s/c=c1@5']);
  t.same(await at(6), ['/s/a=a2@3', '/s/b=b2@6', '/s/c=c1@5']);
  const future = await store.list('/s/', { atRevision: 1000 });
  t.equal(future.revision, 6, 'a revision above the current one reads the current state');
  t.equal((await store.list('/s/', { atRevision: 2 })).revision, 2);
});

t.test('watch replays history from a revision with correct types, then live events', async (t) => {
  const { store } = await openTmp(t);
  const a = await store.create('/w/a', 'a1'); // 1
  await store.create('/other/x', 'x'); // 2 (other prefix)
  await store.update('/w/a', 'a2', a.modRevision); // 3
  await store.create('/w/b', 'b1'); // 4
  await store.delete('/w/a'); // 5
  await store.create('/w/a', 'a3'); // 6, recreated: ADDED again

  const watcher = store.watch('/w/', { fromRevision: 1 });
  const replay = await take(watcher, 4);
  t.same(replay, [
    { type: 'MODIFIED', key: '/w/a', value: 'a2', revision: 3 },
    { type: 'ADDED', key: '/w/b', value: 'b1', revision: 4 },
    { type: 'DELETED', key: '/w/a', value: 'a2', revision: 5 },
    { type: 'ADDED', key: '/w/a', value: 'a3', revision: 6 },
  ]);

  const b = await store.get('/w/b');
  await store.update('/w/b', 'b2', b?.modRevision ?? 0); // 7
  await store.create('/wx/no', 'prefix isolation'); // 8
  await store.delete('/w/b'); // 9
  const live = await take(watcher, 2);
  t.same(live, [
    { type: 'MODIFIED', key: '/w/b', value: 'b2', revision: 7 },
    { type: 'DELETED', key: '/w/b', value: 'b2', revision: 9 },
  ]);
  watcher.close();
  t.equal(store.activeWatchers, 0);

  const fromNow = store.watch('/w/', { fromRevision: 0 });
  await store.create('/w/c', 'c'); // 10
  t.same(await take(fromNow, 1), [{ type: 'ADDED', key: '/w/c', value: 'c', revision: 10 }], 'fromRevision 0 skips history');
  fromNow.close();

  const future = store.watch('/w/', { fromRevision: 11 });
  await store.create('/w/d', 'd'); // 11, not after 11
  await store.create('/w/e', 'e'); // 12
  t.same((await take(future, 1)).map((e) => e.revision), [12], 'a future fromRevision waits for later events');
  future.close();
});

t.test('no gap and no duplicate when writes race with a paged replay', async (t) => {
  const { store } = await openTmp(t, { watchReplayPageSize: 3 });
  for (let i = 0; i < 40; i++) await store.create(`/r/${i}`, `v${i}`);
  const from = 10;
  const watcher = store.watch('/r/', { fromRevision: from });

  let writes = 0;
  const writer = (async () => {
    // Interleave writes with the consumer: one write per turn of the event loop.
    for (; writes < 60; writes++) {
      await store.create(`/r/live-${writes}`, 'x');
      await new Promise((resolve) => setImmediate(resolve));
    }
  })();
  const revisions: number[] = [];
  let writesDuringReplay = -1;
  for await (const event of watcher) {
    revisions.push(event.revision);
    if (event.revision === 40) writesDuringReplay = writes;
    if (revisions.length % 2 === 0) await new Promise((resolve) => setImmediate(resolve));
    if (event.revision === 100) break;
  }
  await writer;
  t.ok(writesDuringReplay > 0, `${writesDuringReplay} writes committed while the history was being replayed`);
  t.equal(store.activeWatchers, 0, 'break releases the watcher');
  t.same(revisions, Array.from({ length: 100 - from }, (_, i) => from + 1 + i), 'every revision exactly once, in order');
});

t.test('Expired after compaction, for list(atRevision) and watch', async (t) => {
  const { store } = await openTmp(t);
  const a = await store.create('/c/a', 'a1'); // 1
  const a2 = await store.update('/c/a', 'a2', a.modRevision); // 2
  await store.create('/c/b', 'b1'); // 3
  await store.delete('/c/b'); // 4
  await store.update('/c/a', 'a3', a2.modRevision); // 5

  t.equal(await store.compact(3), 3);
  t.equal(await store.compactedRevision(), 3);
  await t.rejects(store.list('/c/', { atRevision: 2 }), { code: 'Expired' });
  t.same((await store.list('/c/', { atRevision: 3 })).items.map((i) => i.value), ['a2', 'b1'], 'the compacted revision itself stays readable');
  t.same((await store.list('/c/', { atRevision: 4 })).items.map((i) => i.value), ['a2']);
  t.throws(() => store.watch('/c/', { fromRevision: 2 }), { code: 'Expired' }, 'watch throws synchronously so the caller can answer 410');
  const w = store.watch('/c/', { fromRevision: 3 });
  t.same((await take(w, 2)).map((e) => `${e.type}@${e.revision}`), ['DELETED@4', 'MODIFIED@5'], 'history after the compacted revision is intact');
  w.close();
  t.equal(await store.compact(2), 3, 'compacting below the compacted revision is a no-op');
  await t.rejects(store.compact(99), RangeError);

  // A compaction that overtakes a running replay ends it instead of leaving a gap.
  const { store: s2 } = await openTmp(t, { watchReplayPageSize: 2 });
  for (let i = 0; i < 10; i++) await s2.create(`/k/${i}`, 'v');
  const slow = s2.watch('/k/', { fromRevision: 1 });
  const it = slow[Symbol.asyncIterator]();
  t.equal((await it.next()).value?.revision, 2);
  t.equal((await it.next()).value?.revision, 3);
  await s2.compact(6);
  await t.rejects(it.next(), { code: 'Expired' });
  t.same(await it.next(), { done: true, value: undefined }, 'the watcher ends after the error');
  t.equal(s2.activeWatchers, 0);
});

t.test('background compaction keeps the revision and time windows and bounds history rows', async (t) => {
  const { store, path } = await openTmp(t, { historyRevisions: 5, historySeconds: Infinity, compactIntervalMs: 5 });
  let v = await store.create('/h/a', '0');
  for (let i = 1; i <= 30; i++) v = await store.update('/h/a', String(i), v.modRevision);
  await waitFor(t, 'compaction to revision 26', async () => (await store.compactedRevision()) === 26);
  await waitFor(t, 'superseded rows to go', async () => countRows(path) <= 6);
  t.equal(countRows(path), 6, 'only the rows inside the window remain');
  t.same((await store.list('/h/', { atRevision: 26 })).items.map((i) => i.value), ['25']);
  await t.rejects(store.list('/h/', { atRevision: 25 }), { code: 'Expired' });

  let clock = 1_000_000;
  const { store: timed } = await openTmp(t, {
    historyRevisions: Infinity,
    historySeconds: 60,
    compactIntervalMs: 5,
    now: () => clock,
  });
  await timed.create('/t/a', 'old'); // 1 at t0
  clock += 30_000;
  await timed.create('/t/b', 'middle'); // 2 at t0+30s
  clock += 40_000; // revision 1 is now 70 s old, revision 2 40 s old
  await timed.create('/t/c', 'new'); // 3
  await waitFor(t, 'time-based compaction', async () => (await timed.compactedRevision()) === 1);
  await sleep(30);
  t.equal(await timed.compactedRevision(), 1, 'history younger than historySeconds is kept');
  clock += 60_000;
  await waitFor(t, 'everything to age out', async () => (await timed.compactedRevision()) === 3);
});

t.test('a slow watcher is ended with Expired instead of growing memory', async (t) => {
  const { store } = await openTmp(t, { watchMaxBufferedEvents: 50 });
  const slow = store.watch('/s/', { fromRevision: 0 });
  const fast = store.watch('/s/', { fromRevision: 0 });
  const fastSeen = take(fast, 200);
  for (let i = 0; i < 200; i++) await store.create(`/s/${i}`, 'v');
  t.equal((await fastSeen).length, 200, 'a consumer that keeps up is not affected');
  t.equal(store.activeWatchers, 1, 'the slow watcher was released as soon as it overflowed');
  const it = slow[Symbol.asyncIterator]();
  await t.rejects(it.next(), { name: 'StoreError', code: 'Expired' });
  t.same(await it.next(), { done: true, value: undefined });
  fast.close();

  const { store: bytes } = await openTmp(t, { watchMaxBufferedBytes: 1_000 });
  const w = bytes.watch('', { fromRevision: 0 });
  for (let i = 0; i < 5; i++) await bytes.create(`/b/${i}`, 'x'.repeat(300));
  await t.rejects(take(w, 1), { code: 'Expired' }, 'the byte budget applies too');
});

t.test('closing, aborting, or breaking out of a watch releases it', async (t) => {
  const { store } = await openTmp(t);
  const controller = new AbortController();
  const aborted = store.watch('/x/', { fromRevision: 0, signal: controller.signal });
  const pending = take(aborted, 1);
  t.equal(store.activeWatchers, 1);
  controller.abort();
  t.same(await pending, [], 'abort ends a waiting iteration');
  t.equal(store.activeWatchers, 0);

  const pre = new AbortController();
  pre.abort();
  t.same(await take(store.watch('/x/', { fromRevision: 0, signal: pre.signal }), 1), []);
  t.equal(store.activeWatchers, 0, 'an already aborted signal never subscribes');

  const closed = store.watch('/x/', { fromRevision: 0 });
  const waiting = take(closed, 1);
  closed.close();
  t.same(await waiting, []);
  t.equal(store.activeWatchers, 0);

  const broken = store.watch('/x/', { fromRevision: 0 });
  await store.create('/x/1', 'v');
  for await (const event of broken) {
    t.equal(event.key, '/x/1');
    break;
  }
  t.equal(store.activeWatchers, 0);
  t.throws(() => store.watch('/x/', { fromRevision: -1 }), RangeError);
});

t.test('close ends watchers and later calls reject with Unavailable', async (t) => {
  const path = join(t.testdir(), 'store.db');
  const store = await openSqliteStore({ path, compactIntervalMs: 10 });
  await store.create('/k', 'v');
  const watcher = store.watch('', { fromRevision: 0 });
  const waiting = take(watcher, 1);
  await store.close();
  t.same(await waiting, [], 'the watcher ends normally');
  await store.close(); // idempotent
  await t.rejects(store.get('/k'), { code: 'Unavailable' });
  await t.rejects(store.create('/k2', 'v'), { code: 'Unavailable' });
  await t.rejects(store.ping(), { code: 'Unavailable' });
  t.throws(() => store.watch('', { fromRevision: 0 }), { code: 'Unavailable' });
});

t.test('the file is in WAL mode and the revision continues after reopen', async (t) => {
  const path = join(t.testdir(), 'nested', 'dir', 'store.db');
  let store = await openSqliteStore({ path, compactIntervalMs: 0 });
  await store.ping();
  const a = await store.create('/k/a', 'a');
  await store.update('/k/a', 'b', a.modRevision);
  await store.create('/k/gone', 'x');
  await store.delete('/k/gone'); // 4
  await store.compact(4); // removes the tombstone, the newest row in the file
  await store.close();

  const db = new DatabaseSync(path, { readOnly: true });
  t.equal(db.prepare('PRAGMA journal_mode').get()?.journal_mode, 'wal');
  db.close();

  store = await openSqliteStore({ path, compactIntervalMs: 0 });
  t.teardown(() => store.close());
  t.equal(await store.currentRevision(), 4, 'the revision survives even when its row was compacted away');
  t.equal(await store.compactedRevision(), 4, 'the compacted revision is persisted');
  t.same(await store.get('/k/a'), { key: '/k/a', value: 'b', modRevision: 2 });
  t.equal((await store.create('/k/c', 'c')).modRevision, 5);
  t.throws(() => store.watch('/k/', { fromRevision: 3 }), { code: 'Expired' });
});

t.test('a 3 MB value round-trips through create, update, list, watch and delete; history of it stays bounded', async (t) => {
  const { store, path } = await openTmp(t);
  const big = (tag: string) =>
    JSON.stringify({
      kind: 'PreflightValidation',
      status: {
        modules: Array.from({ length: 10_000 }, (_, i) => ({
          name: `module-${tag}-${i}`,
          namespace: 'kmm-operator',
          verificationStatus: 'True',
          statusReason: 'image exists and was signed by the trusted key, '.padEnd(240, '.'),
        })),
      },
    });
  const v1 = big('one');
  t.ok(v1.length > 2_500_000 && v1.length < 3_500_000, `value is ${v1.length} bytes`);
  const watcher = store.watch('/big/', { fromRevision: 0 });
  const created = await store.create('/big/x', v1);
  t.equal((await store.get('/big/x'))?.value, v1);
  const v2 = big('two');
  const updated = await store.update('/big/x', v2, created.modRevision);
  t.equal((await store.list('/big/')).items[0]?.value, v2);
  t.equal((await store.list('/big/', { atRevision: created.modRevision })).items[0]?.value, v1);
  const events = await take(watcher, 2);
  t.ok(events[0]?.value === v1 && events[1]?.value === v2, 'watch carries both values');
  watcher.close();

  let current = updated;
  for (let i = 0; i < 8; i++) current = await store.update('/big/x', big(String(i)), current.modRevision);
  await store.compact(current.modRevision);
  t.equal(countRows(path), 1, 'compaction drops superseded multi-megabyte rows');
  t.equal((await store.delete('/big/x')).value.length, current.value.length);
});

t.test('every acknowledged write survives kill -9 of the writing process', async (t) => {
  const dir = t.testdir();
  const path = join(dir, 'data', 'store.db');
  mkdirSync(join(dir, 'data'));
  const script = join(dir, 'writer.mjs');
  writeFileSync(
    script,
    `import { SqliteStore } from ${JSON.stringify(storeModuleUrl)};
const store = new SqliteStore({ path: process.argv[2], compactIntervalMs: 0 });
const value = JSON.stringify({ pad: 'x'.repeat(2000) });
for (let i = 0; ; i++) {
  const key = '/durable/' + String(i).padStart(8, '0');
  const created = await store.create(key, value);
  if (i % 3 === 0) await store.update(key, JSON.stringify({ updated: i }), created.modRevision);
  process.stdout.write(key + '\\n');
}
`,
  );
  const child = spawn(process.execPath, [script, path], { stdio: ['ignore', 'pipe', 'pipe'] });
  let stdout = '';
  let stderr = '';
  const target = 300;
  child.stderr.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
  const exited = new Promise<NodeJS.Signals | null>((resolve) => child.on('exit', (_code, signal) => resolve(signal)));
  child.stdout.on('data', (chunk: Buffer) => {
    stdout += chunk.toString();
    if (stdout.split('\n').length > target && child.exitCode === null && !child.killed) child.kill('SIGKILL');
  });
  const signal = await exited;
  t.equal(signal, 'SIGKILL', `the writer was killed mid-burst${stderr ? `; stderr: ${stderr}` : ''}`);

  // Only complete lines were acknowledged; a torn last line is a write in flight.
  const acknowledged = stdout.split('\n').slice(0, -1);
  t.ok(acknowledged.length >= target, `${acknowledged.length} writes acknowledged before the kill`);

  const store = await openSqliteStore({ path, compactIntervalMs: 0 });
  t.teardown(() => store.close());
  const missing: string[] = [];
  for (const [i, key] of acknowledged.entries()) {
    const stored = await store.get(key);
    if (stored === undefined) missing.push(key);
    else if (i % 3 === 0 && stored.value !== JSON.stringify({ updated: i })) missing.push(`${key} (update)`);
  }
  t.same(missing, [], 'no acknowledged write is missing');
  const listed = await store.list('/durable/');
  t.ok(listed.items.length >= acknowledged.length);
  t.ok((await store.currentRevision()) >= acknowledged.length);
  const next = await store.create('/durable/after-restart', 'x');
  t.equal(next.modRevision, listed.revision + 1, 'the revision continues after the crash');
});
