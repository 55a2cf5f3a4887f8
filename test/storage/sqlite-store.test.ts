import { spawn } from 'node:child_process';
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { DatabaseSync } from 'node:sqlite';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath, pathToFileURL } from 'node:url';
import t from 'tap';
import { openSqliteStore, SqliteStore, type SqliteStoreOptions } from '../../src/storage/sqlite-store.ts';
import { bigValue, storeContract, waitFor, type Test } from './store-contract.ts';

// The behaviour shared with the etcd backend is in store-contract.ts; this file adds what is
// specific to the SQLite file: exact revisions from 0, paged replay vs compaction, the background
// compaction windows, WAL durability and reopen.

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

function countRows(path: string): number {
  const db = new DatabaseSync(path, { readOnly: true });
  try {
    return Number(db.prepare('SELECT count(*) AS n FROM kv').get()?.n);
  } finally {
    db.close();
  }
}

storeContract('sqlite', async (t, options = {}) => (await openTmp(t, options)).store);

t.test('a fresh file starts at revision 0; a directory is not a database file', async (t) => {
  const { store } = await openTmp(t);
  t.equal(store.name, 'sqlite');
  t.equal(await store.currentRevision(), 0);
  t.equal(await store.compactedRevision(), 0);
  await t.rejects(openSqliteStore({ path: t.testdir() }), { code: 'Unavailable' }, 'a directory is not a database file');
});

t.test('a compaction that overtakes a running paged replay ends it instead of leaving a gap', async (t) => {
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

t.test('history of a multi-megabyte value stays bounded by compaction', async (t) => {
  const { store, path } = await openTmp(t);
  let current = await store.create('/big/x', bigValue('one'));
  for (let i = 0; i < 8; i++) current = await store.update('/big/x', bigValue(String(i)), current.modRevision);
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
