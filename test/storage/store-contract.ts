/**
 * The behaviour every {@link Store} backend must have, as tap tests run against a store factory
 * (SQLite in sqlite-store.test.ts, etcd in etcd-store.test.ts).
 *
 * Revisions are asserted relative to the store's revision when the test starts (`base`): a fresh
 * SQLite file starts at 0, while one etcd is shared by all tests of a file. Each store the factory
 * opens must be empty (its own file, or its own etcd key prefix) and closed at the end of the test.
 */
import { setTimeout as sleep } from 'node:timers/promises';
import t from 'tap';
import { StoreError, type Store, type StoreEvent, type Watcher } from '../../src/storage/store.ts';

/** The subtest type (tap exports it only as a generic class plus plugins). */
export type Test = Parameters<Parameters<typeof t.test>[0]>[0];

/** What the contract needs beyond {@link Store}: both backends have these for tests and metrics. */
export interface ContractStore extends Store {
  compact(revision: number): Promise<number>;
  readonly activeWatchers: number;
}

/** Options a test asks for; a backend maps them to its own (or ignores ones it has no use for). */
export interface ContractOptions {
  readonly maxValueBytes?: number;
  readonly watchMaxBufferedEvents?: number;
  readonly watchMaxBufferedBytes?: number;
  /** SQLite only: history rows per replay page, to make a replay span many pages. */
  readonly watchReplayPageSize?: number;
}

/** Opens an empty store, closed by a teardown of `t`. */
export type OpenStore = (t: Test, options?: ContractOptions) => Promise<ContractStore>;

/** Reads `count` events from a watcher without closing it. */
export async function take(watcher: Watcher, count: number): Promise<StoreEvent[]> {
  const it = watcher[Symbol.asyncIterator]();
  const out: StoreEvent[] = [];
  while (out.length < count) {
    const next = await it.next();
    if (next.done === true) break;
    out.push(next.value);
  }
  return out;
}

export async function waitFor(t: Test, what: string, check: () => boolean | Promise<boolean>, timeoutMs = 5_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await check())) {
    if (Date.now() > deadline) {
      t.fail(`timed out waiting for ${what}`);
      return;
    }
    await sleep(5);
  }
}

/** A PreflightValidation-like JSON document with 10,000 module statuses (about 3 MB). */
export function bigValue(tag: string): string {
  return JSON.stringify({
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
}

/** Registers the contract tests (prefixed with `label`) in the calling test file. */
export function storeContract(label: string, open: OpenStore): void {
  const test = (name: string, fn: (t: Test) => Promise<void>) => t.test(`${label}: ${name}`, fn);

  test('create, get, update and delete assign one global revision per write', async (t) => {
    const store = await open(t);
    const base = await store.currentRevision();
    t.equal(await store.get('/things/a'), undefined);

    const a = await store.create('/things/a', '{"n":1}');
    t.same(a, { key: '/things/a', value: '{"n":1}', modRevision: base + 1 });
    const b = await store.create('/things/b', '{"n":2}');
    t.equal(b.modRevision, base + 2);
    t.same(await store.get('/things/a'), a);

    const a2 = await store.update('/things/a', '{"n":3}', a.modRevision);
    t.same(a2, { key: '/things/a', value: '{"n":3}', modRevision: base + 3 });
    t.same(await store.get('/things/a'), a2);

    const deleted = await store.delete('/things/a', a2.modRevision);
    t.same(deleted, { key: '/things/a', value: '{"n":3}', modRevision: base + 4 }, 'delete returns the last value at the deletion revision');
    t.equal(await store.get('/things/a'), undefined);
    t.equal(await store.currentRevision(), base + 4);

    const again = await store.create('/things/a', '{"n":5}');
    t.equal(again.modRevision, base + 5, 'a deleted key can be created again');
    const unconditional = await store.delete('/things/b');
    t.equal(unconditional.modRevision, base + 6, 'delete without expectedRevision is unconditional');
    t.same(unconditional.value, '{"n":2}');
  });

  test('compare-and-swap failures: AlreadyExists, NotFound, Conflict, and they do not consume revisions', async (t) => {
    const store = await open(t);
    const base = await store.currentRevision();
    const a = await store.create('/k/a', 'A');
    await t.rejects(store.create('/k/a', 'again'), { name: 'StoreError', code: 'AlreadyExists' });
    await t.rejects(store.update('/k/missing', 'x', 1), { code: 'NotFound' });
    await t.rejects(store.update('/k/missing', 'x', 0), { code: 'NotFound' }, 'revision 0 does not match a missing key');
    await t.rejects(store.update('/k/a', 'x', a.modRevision + 1), { code: 'Conflict' });
    await t.rejects(store.delete('/k/missing'), { code: 'NotFound' });
    await t.rejects(store.delete('/k/a', 99_999_999), { code: 'Conflict' });
    t.equal(await store.currentRevision(), base + 1, 'failed writes leave the revision alone');
    t.same(await store.get('/k/a'), a, 'failed writes leave the value alone');

    const a2 = await store.update('/k/a', 'B', a.modRevision);
    await t.rejects(store.update('/k/a', 'C', a.modRevision), { code: 'Conflict' }, 'a stale revision loses the race');
    await store.delete('/k/a', a2.modRevision);
    await t.rejects(store.update('/k/a', 'D', a2.modRevision), { code: 'NotFound' }, 'updating a deleted key is NotFound');
    await t.rejects(store.delete('/k/a'), { code: 'NotFound' });

    // Concurrent updates from the same revision: exactly one wins.
    const c = await store.create('/k/c', '0');
    const results = await Promise.allSettled(Array.from({ length: 8 }, (_, i) => store.update('/k/c', String(i + 1), c.modRevision)));
    t.equal(results.filter((r) => r.status === 'fulfilled').length, 1, 'one concurrent update wins');
    t.ok(
      results.every((r) => r.status === 'fulfilled' || (r.reason instanceof StoreError && r.reason.code === 'Conflict')),
      'the others get Conflict',
    );
  });

  test('errors are rejections with StoreError, never synchronous throws', async (t) => {
    const store = await open(t, { maxValueBytes: 10 });
    const pending = store.create('/k/big', 'x'.repeat(11));
    t.type(pending, Promise);
    await t.rejects(pending, { code: 'TooLarge' });
    await t.rejects(store.update('/k/big', 'x'.repeat(11), 1), { code: 'TooLarge' });
    const error = await store.create('/k/a', 'ok').then(() => store.create('/k/a', 'ok')).catch((e: unknown) => e);
    t.type(error, StoreError);
  });

  test('list is ordered by key and isolates prefixes (/a/ vs /ab/)', async (t) => {
    const store = await open(t);
    const base = await store.currentRevision();
    for (const key of ['/ab/1', '/a/c', '/a/a', '/b/x', '/a/b', '/a', '/ab/0']) await store.create(key, key);
    const a = await store.list('/a/');
    t.same(a.items.map((i) => i.key), ['/a/a', '/a/b', '/a/c']);
    t.equal(a.revision, base + 7);
    t.equal(a.more, false);
    t.same((await store.list('/ab/')).items.map((i) => i.key), ['/ab/0', '/ab/1']);
    t.same((await store.list('/a')).items.map((i) => i.key), ['/a', '/a/a', '/a/b', '/a/c', '/ab/0', '/ab/1']);
    t.equal((await store.list('')).items.length, 7, 'the empty prefix lists everything');
    t.same((await store.list('/zzz/')).items, []);
    t.same(
      (await store.list('/a/')).items.map((i) => [i.value, i.modRevision]),
      [['/a/a', base + 3], ['/a/b', base + 5], ['/a/c', base + 2]],
    );
    await store.delete('/a/b');
    t.same((await store.list('/a/')).items.map((i) => i.key), ['/a/a', '/a/c'], 'deleted keys are not listed');
  });

  test('limit + startAfter paginate a consistent snapshot, with more and filter', async (t) => {
    const store = await open(t);
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
    const tail = await store.list('/p/', { limit: 2, atRevision, filter: (v) => v.key >= '/p/023' });
    t.same(tail.items.map((i) => i.key), ['/p/023', '/p/024']);
    t.equal(tail.more, false, 'more is false when no further item matches the filter');
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

  test('snapshot reads at an older revision return the old values', async (t) => {
    const store = await open(t);
    const base = await store.currentRevision();
    const a1 = await store.create('/s/a', 'a1'); // 1
    await store.create('/s/b', 'b1'); // 2
    await store.update('/s/a', 'a2', a1.modRevision); // 3
    await store.delete('/s/b'); // 4
    await store.create('/s/c', 'c1'); // 5
    await store.create('/s/b', 'b2'); // 6

    const at = async (n: number) =>
      (await store.list('/s/', { atRevision: base + n })).items.map((i) => `${i.key}=${i.value}@${i.modRevision - base}`);
    t.same(await at(1), ['/s/a=a1@1']);
    t.same(await at(2), ['/s/a=a1@1', '/s/b=b1@2']);
    t.same(await at(3), ['/s/a=a2@3', '/s/b=b1@2']);
    t.same(await at(4), ['/s/a=a2@3']);
    t.same(await at(5), ['/s/a=a2@3', '/s/c=c1@5']);
    t.same(await at(6), ['/s/a=a2@3', '/s/b=b2@6', '/s/c=c1@5']);
    const future = await store.list('/s/', { atRevision: base + 1000 });
    t.equal(future.revision, base + 6, 'a revision above the current one reads the current state');
    t.equal(future.items.length, 3);
    t.equal((await store.list('/s/', { atRevision: base + 2 })).revision, base + 2);
  });

  test('watch replays history from a revision with correct types, then live events', async (t) => {
    const store = await open(t);
    const base = await store.currentRevision();
    const a = await store.create('/w/a', 'a1'); // 1
    await store.create('/other/x', 'x'); // 2 (other prefix)
    await store.update('/w/a', 'a2', a.modRevision); // 3
    await store.create('/w/b', 'b1'); // 4
    await store.delete('/w/a'); // 5
    await store.create('/w/a', 'a3'); // 6, recreated: ADDED again

    const watcher = store.watch('/w/', { fromRevision: base + 1 });
    const replay = await take(watcher, 4);
    t.same(replay, [
      { type: 'MODIFIED', key: '/w/a', value: 'a2', revision: base + 3 },
      { type: 'ADDED', key: '/w/b', value: 'b1', revision: base + 4 },
      { type: 'DELETED', key: '/w/a', value: 'a2', revision: base + 5 },
      { type: 'ADDED', key: '/w/a', value: 'a3', revision: base + 6 },
    ]);

    const b = await store.get('/w/b');
    await store.update('/w/b', 'b2', b?.modRevision ?? 0); // 7
    await store.create('/wx/no', 'prefix isolation'); // 8
    await store.delete('/w/b'); // 9
    const live = await take(watcher, 2);
    t.same(live, [
      { type: 'MODIFIED', key: '/w/b', value: 'b2', revision: base + 7 },
      { type: 'DELETED', key: '/w/b', value: 'b2', revision: base + 9 },
    ]);
    watcher.close();
    t.equal(store.activeWatchers, 0);

    const fromNow = store.watch('/w/', { fromRevision: 0 });
    await store.create('/w/c', 'c'); // 10
    t.same(await take(fromNow, 1), [{ type: 'ADDED', key: '/w/c', value: 'c', revision: base + 10 }], 'fromRevision 0 skips history');
    fromNow.close();

    const future = store.watch('/w/', { fromRevision: base + 11 });
    await store.create('/w/d', 'd'); // 11, not after 11
    await store.create('/w/e', 'e'); // 12
    t.same((await take(future, 1)).map((e) => e.revision), [base + 12], 'a future fromRevision waits for later events');
    future.close();
  });

  test('no gap and no duplicate when writes race with the replay', async (t) => {
    const store = await open(t, { watchReplayPageSize: 3 });
    const base = await store.currentRevision();
    for (let i = 0; i < 40; i++) await store.create(`/r/${i}`, `v${i}`);
    const from = base + 10;
    const watcher = store.watch('/r/', { fromRevision: from });

    let writes = 0;
    const writer = (async () => {
      // Interleave writes with the consumer: one write per turn of the event loop.
      for (; writes < 60; writes++) {
        await store.create(`/r/live-${writes}`, 'x');
        await new Promise((resolve) => setImmediate(resolve));
      }
    })().catch((e: unknown) => e);
    const revisions: number[] = [];
    let writesDuringReplay = -1;
    for await (const event of watcher) {
      revisions.push(event.revision);
      if (event.revision === base + 40) writesDuringReplay = writes;
      if (revisions.length % 2 === 0) await new Promise((resolve) => setImmediate(resolve));
      if (event.revision === base + 100) break;
    }
    t.equal(await writer, undefined, 'every write succeeded');
    t.ok(writesDuringReplay > 0, `${writesDuringReplay} writes committed while the history was being replayed`);
    t.equal(store.activeWatchers, 0, 'break releases the watcher');
    t.same(revisions, Array.from({ length: 100 - 10 }, (_, i) => from + 1 + i), 'every revision exactly once, in order');
  });

  test('Expired after compaction, for list(atRevision) and watch', async (t) => {
    const store = await open(t);
    const base = await store.currentRevision();
    const a = await store.create('/c/a', 'a1'); // 1
    const a2 = await store.update('/c/a', 'a2', a.modRevision); // 2
    await store.create('/c/b', 'b1'); // 3
    await store.delete('/c/b'); // 4
    await store.update('/c/a', 'a3', a2.modRevision); // 5

    t.equal(await store.compact(base + 3), base + 3);
    t.equal(await store.compactedRevision(), base + 3);
    await t.rejects(store.list('/c/', { atRevision: base + 2 }), { name: 'StoreError', code: 'Expired' });
    t.same((await store.list('/c/', { atRevision: base + 3 })).items.map((i) => i.value), ['a2', 'b1'], 'the compacted revision itself stays readable');
    t.same((await store.list('/c/', { atRevision: base + 4 })).items.map((i) => i.value), ['a2']);
    t.throws(() => store.watch('/c/', { fromRevision: base + 2 }), { code: 'Expired' }, 'watch throws synchronously so the caller can answer 410');
    const w = store.watch('/c/', { fromRevision: base + 3 });
    t.same((await take(w, 2)).map((e) => `${e.type}@${e.revision - base}`), ['DELETED@4', 'MODIFIED@5'], 'history after the compacted revision is intact');
    w.close();
    t.equal(await store.compact(base + 2), base + 3, 'compacting below the compacted revision is a no-op');
    await t.rejects(store.compact((await store.currentRevision()) + 100), RangeError);
    t.same((await store.list('/c/')).items.map((i) => i.value), ['a3'], 'the current state is untouched');
  });

  test('a slow watcher is ended with Expired instead of growing memory', async (t) => {
    const store = await open(t, { watchMaxBufferedEvents: 50 });
    const slow = store.watch('/s/', { fromRevision: 0 });
    const fast = store.watch('/s/', { fromRevision: 0 });
    // Caught at once: a rejection left unhandled until the writes are done would fail the test file.
    const fastSeen = take(fast, 200).catch((e: unknown) => e);
    for (let i = 0; i < 200; i++) await store.create(`/s/${i}`, 'v');
    const seen = await fastSeen;
    t.ok(Array.isArray(seen) && seen.length === 200, `a consumer that keeps up is not affected${seen instanceof Error ? `: ${seen.message}` : ''}`);
    await waitFor(t, 'the slow watcher to be released', () => store.activeWatchers === 1);
    t.equal(store.activeWatchers, 1, 'the slow watcher was released as soon as it overflowed');
    const it = slow[Symbol.asyncIterator]();
    await t.rejects(it.next(), { name: 'StoreError', code: 'Expired' });
    t.same(await it.next(), { done: true, value: undefined });
    fast.close();

    const bytes = await open(t, { watchMaxBufferedBytes: 1_000 });
    const w = bytes.watch('', { fromRevision: 0 });
    for (let i = 0; i < 5; i++) await bytes.create(`/b/${i}`, 'x'.repeat(300));
    await waitFor(t, 'the byte budget to end the watcher', () => bytes.activeWatchers === 0);
    await t.rejects(take(w, 1), { code: 'Expired' }, 'the byte budget applies too');
  });

  test('closing, aborting, or breaking out of a watch releases it', async (t) => {
    const store = await open(t);
    const controller = new AbortController();
    const aborted = store.watch('/x/', { fromRevision: 0, signal: controller.signal });
    const pending = take(aborted, 1).catch((e: unknown) => e);
    t.equal(store.activeWatchers, 1);
    controller.abort();
    t.same(await pending, [], 'abort ends a waiting iteration');
    t.equal(store.activeWatchers, 0);

    const pre = new AbortController();
    pre.abort();
    t.same(await take(store.watch('/x/', { fromRevision: 0, signal: pre.signal }), 1), []);
    t.equal(store.activeWatchers, 0, 'an already aborted signal never subscribes');

    const closed = store.watch('/x/', { fromRevision: 0 });
    const waiting = take(closed, 1).catch((e: unknown) => e);
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

    // The store still works after all that: the released streams did not take anything down.
    const after = store.watch('/x/', { fromRevision: 0 });
    await store.create('/x/2', 'v');
    t.same((await take(after, 1)).map((e) => e.key), ['/x/2']);
    after.close();
  });

  test('close ends watchers and later calls reject with Unavailable', async (t) => {
    const store = await open(t);
    await store.create('/k', 'v');
    const watcher = store.watch('', { fromRevision: 0 });
    const waiting = take(watcher, 1).catch((e: unknown) => e);
    await store.close();
    t.same(await waiting, [], 'the watcher ends normally');
    t.equal(store.activeWatchers, 0);
    await store.close(); // idempotent
    await t.rejects(store.get('/k'), { code: 'Unavailable' });
    await t.rejects(store.list(''), { code: 'Unavailable' });
    await t.rejects(store.create('/k2', 'v'), { code: 'Unavailable' });
    await t.rejects(store.ping(), { code: 'Unavailable' });
    t.throws(() => store.watch('', { fromRevision: 0 }), { code: 'Unavailable' });
  });

  test('a 3 MB value round-trips through create, update, list, watch and delete', async (t) => {
    const store = await open(t);
    const v1 = bigValue('one');
    t.ok(v1.length > 2_500_000 && v1.length < 3_500_000, `value is ${v1.length} bytes`);
    const watcher = store.watch('/big/', { fromRevision: 0 });
    const created = await store.create('/big/x', v1);
    t.equal((await store.get('/big/x'))?.value, v1);
    const v2 = bigValue('two');
    const updated = await store.update('/big/x', v2, created.modRevision);
    t.equal((await store.list('/big/')).items[0]?.value, v2);
    t.equal((await store.list('/big/', { atRevision: created.modRevision })).items[0]?.value, v1);
    const events = await take(watcher, 2);
    t.ok(events[0]?.value === v1 && events[1]?.value === v2, 'watch carries both values');
    const deleted = await store.delete('/big/x', updated.modRevision);
    t.equal(deleted.value, v2);
    const [gone] = await take(watcher, 1);
    t.ok(gone?.type === 'DELETED' && gone.value === v2, 'DELETED carries the big last value');
    watcher.close();
  });
}
