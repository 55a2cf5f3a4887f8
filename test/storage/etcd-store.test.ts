/**
 * The etcd backend against a real etcd (Debian's etcd-server, 3.4) on loopback: the store contract
 * shared with SQLite, plus what only etcd has: several stores (server processes) on one etcd, the
 * stored layout (prefix, compression), outages, failover and hung endpoints.
 */
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { writeFileSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { createServer, type Server, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import t from 'tap';
import { generateCa, issueClientCertificate, issueServerCertificate } from '../../src/certs/dev-pki.ts';
import { EtcdStore, openEtcdStore, type EtcdStoreOptions } from '../../src/storage/etcd-store.ts';
import { StoreError } from '../../src/storage/store.ts';
import { ensureDebianBinary } from '../helpers/debian.ts';
import { startEtcd } from '../helpers/etcd.ts';
import { freePort } from '../helpers/server.ts';
import { storeContract, take, waitFor, type Test } from './store-contract.ts';

const etcd = await startEtcd();
t.teardown(async () => {
  if (!t.passing()) t.comment(`etcd output:\n${etcd.output()}`);
  await etcd.stop();
});

const TIMEOUT_MS = 1_500;
let stores = 0;

/** A store on its own key prefix, closed at the end of the test. */
async function open(t: Test, options: Partial<EtcdStoreOptions> = {}): Promise<EtcdStore> {
  const store = await openEtcdStore({
    endpoints: [etcd.url],
    prefix: `/test/${process.pid}/${++stores}`,
    requestTimeoutMs: TIMEOUT_MS,
    ...options,
  });
  t.teardown(() => store.close());
  return store;
}

/** A key as stored, read through etcd's JSON gateway (not through the store). */
async function rawGet(key: string): Promise<{ value: Buffer; modRevision: number } | undefined> {
  const res = await fetch(`${etcd.url}/v3/kv/range`, {
    method: 'POST',
    body: JSON.stringify({ key: Buffer.from(key).toString('base64') }),
  });
  const body = (await res.json()) as { kvs?: { value?: string; mod_revision: string }[] };
  const kv = body.kvs?.[0];
  return kv && { value: Buffer.from(kv.value ?? '', 'base64'), modRevision: Number(kv.mod_revision) };
}

async function rawPut(key: string, value: string): Promise<void> {
  const res = await fetch(`${etcd.url}/v3/kv/put`, {
    method: 'POST',
    body: JSON.stringify({ key: Buffer.from(key).toString('base64'), value: Buffer.from(value).toString('base64') }),
  });
  if (!res.ok) throw new Error(`put ${key}: ${res.status} ${await res.text()}`);
}

/** A PreflightValidation status with 10,000 modules: about 4.5 MiB of JSON. */
function tenThousandModules(): string {
  const now = '2025-01-01T00:00:00Z';
  const modules = Array.from({ length: 10_000 }, (_, i) => ({
    namespace: `ns-${i % 50}`,
    name: `module-${i}`,
    containerImage: `registry.example.com/kmm/module-${i}:6.1.0-18-amd64`,
    verificationStatus: i % 10 === 0 ? 'False' : 'True',
    verificationStage: i % 10 === 0 ? 'Requeued' : 'Done',
    statusReason: (i % 10 === 0
      ? `image registry.example.com/kmm/module-${i}:6.1.0-18-amd64 not found for kernel 6.1.0-18-amd64`
      : `image registry.example.com/kmm/module-${i}:6.1.0-18-amd64 exists and its signature was verified`
    ).padEnd(230, '.'),
    lastTransitionTime: now,
  }));
  return JSON.stringify({
    apiVersion: 'kmm.sigs.x-k8s.io/v1beta2',
    kind: 'PreflightValidation',
    metadata: { name: 'ten-thousand' },
    spec: { kernelVersion: '6.1.0-18-amd64' },
    status: { kernelVersion: '6.1.0-18-amd64', modules, counts: { total: 10_000, verified: 9_000, failed: 1_000, error: 0, pending: 0 } },
  });
}

function stats(samples: number[]): string {
  const sorted = [...samples].sort((x, y) => x - y);
  const at = (q: number) => (sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))] ?? 0).toFixed(2);
  const mean = samples.reduce((s, x) => s + x, 0) / samples.length;
  return `mean ${mean.toFixed(2)} ms, p50 ${at(0.5)} ms, p99 ${at(0.99)} ms`;
}

// Small pages so every list in the contract spans several etcd range requests.
storeContract('etcd', (t, options = {}) =>
  open(t, {
    listPageSize: 4,
    ...(options.maxValueBytes !== undefined ? { maxValueBytes: options.maxValueBytes } : {}),
    ...(options.watchMaxBufferedEvents !== undefined ? { watchMaxBufferedEvents: options.watchMaxBufferedEvents } : {}),
    ...(options.watchMaxBufferedBytes !== undefined ? { watchMaxBufferedBytes: options.watchMaxBufferedBytes } : {}),
  }),
);

t.test('keys live under the prefix; values are compressed behind a header byte; plain values still read', async (t) => {
  const store = await open(t, { prefix: '/registry/kmm.sigs.x-k8s.io/' });
  t.equal(store.prefix, '/registry/kmm.sigs.x-k8s.io', 'a trailing slash of the prefix is dropped');
  const key = '/kmm.sigs.x-k8s.io/preflightvalidations/layout';
  const small = await store.create(key, '{"small":true}');
  const stored = await rawGet(`/registry/kmm.sigs.x-k8s.io${key}`);
  t.equal(stored?.modRevision, small.modRevision, 'the key is prefix + key; modRevision is etcd mod_revision');
  t.equal(stored?.value.toString(), '{"small":true}', 'a small value is stored as plain JSON');

  const big = JSON.stringify({ items: Array.from({ length: 2_000 }, (_, i) => ({ name: `m-${i}`, reason: 'verified' })) });
  await store.update(key, big, small.modRevision);
  const packed = await rawGet(`/registry/kmm.sigs.x-k8s.io${key}`);
  t.equal(packed?.value[0], 0x00, 'a large value starts with the zstd header byte');
  t.ok((packed?.value.length ?? Infinity) < big.length / 10, `${big.length} bytes stored as ${packed?.value.length}`);
  t.equal((await store.get(key))?.value, big);

  // Written by an older version or by another tool: plain JSON without a header.
  await rawPut(`/registry/kmm.sigs.x-k8s.io/kmm.sigs.x-k8s.io/preflightvalidations/legacy`, big);
  const legacy = await store.get('/kmm.sigs.x-k8s.io/preflightvalidations/legacy');
  t.equal(legacy?.value, big, 'an uncompressed value written without the header reads back');
  t.same(
    (await store.list('/kmm.sigs.x-k8s.io/preflightvalidations/')).items.map((i) => i.key),
    ['/kmm.sigs.x-k8s.io/preflightvalidations/layout', '/kmm.sigs.x-k8s.io/preflightvalidations/legacy'],
  );
  await rawPut('/registry/kmm.sigs.x-k8s.io.other/x', 'not ours');
  t.equal((await store.list('')).items.length, 2, 'a sibling prefix is not listed');

  const plain = await open(t, { prefix: '/registry/kmm.sigs.x-k8s.io', compression: false });
  const p = await plain.create('/kmm.sigs.x-k8s.io/preflightvalidations/plain', big);
  t.equal((await rawGet(`/registry/kmm.sigs.x-k8s.io${p.key}`))?.value.toString(), big, 'compression: false stores plain JSON');
  t.equal((await plain.get(key))?.value, big, 'and still reads compressed values');
  const odd = await plain.create('/kmm.sigs.x-k8s.io/preflightvalidations/odd', '\u0000starts with NUL');
  t.equal((await plain.get(odd.key))?.value, '\u0000starts with NUL', 'text starting with a header byte is escaped, not misread');

  await t.rejects(store.get('no-slash'), RangeError);
  t.throws(() => store.watch('no-slash', { fromRevision: 0 }), RangeError);
});

t.test('a 10,000-module status round-trips compressed, far under etcd request limit', async (t) => {
  const store = await open(t);
  const value = tenThousandModules();
  const bytes = Buffer.byteLength(value);
  t.ok(bytes > 4_000_000 && bytes < 5_500_000, `the JSON is ${(bytes / 1048576).toFixed(2)} MiB`);
  const watcher = store.watch('/big/', { fromRevision: 0 });

  let started = performance.now();
  const created = await store.create('/big/ten-thousand', value);
  const createMs = performance.now() - started;
  started = performance.now();
  const got = await store.get('/big/ten-thousand');
  const getMs = performance.now() - started;
  t.equal(got?.value, value, 'get returns the exact JSON');
  t.equal(got?.modRevision, created.modRevision);
  const stored = await rawGet(`${store.prefix}/big/ten-thousand`);
  const size = stored?.value.length ?? Infinity;
  t.ok(size < 1.4 * 1024 * 1024, 'stored under the 1.4 MiB limit');
  t.ok(size < 512 * 1024, `compressed to ${size} bytes (${((100 * size) / bytes).toFixed(2)} % of ${bytes})`);
  t.comment(`10,000-module status: ${bytes} bytes of JSON stored as ${size} bytes; create ${createMs.toFixed(1)} ms, get ${getMs.toFixed(1)} ms`);

  t.equal((await store.list('/big/')).items[0]?.value, value, 'list returns it whole');
  const [event] = await take(watcher, 1);
  t.ok(event?.type === 'ADDED' && event.value === value, 'the watch event carries it whole');
  const updated = await store.update('/big/ten-thousand', value.replace('"Requeued"', '"Done"'), created.modRevision);
  t.equal((await store.list('/big/', { atRevision: created.modRevision })).items[0]?.value, value, 'the old version reads at its revision');
  t.equal((await store.delete('/big/ten-thousand', updated.modRevision)).value, updated.value, 'delete returns the last version');
  watcher.close();
});

t.test('a value still too large after compression is refused with TooLarge and a clear message', async (t) => {
  const store = await open(t);
  const before = await store.currentRevision();
  // Random base64 barely compresses: ~2 MB of it stays well over 1.4 MiB.
  const { randomBytes } = await import('node:crypto');
  const noise = JSON.stringify({ blob: randomBytes(1_600_000).toString('base64') });
  const error = await store.create('/big/noise', noise).catch((e: unknown) => e);
  t.type(error, StoreError);
  t.equal((error as StoreError).code, 'TooLarge');
  t.match((error as StoreError).message, /\/big\/noise is \d+ bytes, \d+ bytes after zstd compression: over the \d+-byte limit/);
  t.equal(await store.currentRevision(), before, 'nothing was written');
  await t.rejects(open(t, { maxValueBytes: 4 * 1024 * 1024 }).then((s) => s.create('/big/noise', noise)), { code: 'TooLarge' }, 'etcd itself refuses requests over 1.5 MiB');
});

t.test('two stores on one etcd (two server processes) share revisions, watches and compaction', async (t) => {
  const prefix = `/test/${process.pid}/shared`;
  const a = await open(t, { prefix });
  const b = await open(t, { prefix });
  const watcher = b.watch('/pv/', { fromRevision: 0 });
  const created = await a.create('/pv/one', '{"v":1}');
  t.same(await take(watcher, 1), [{ type: 'ADDED', key: '/pv/one', value: '{"v":1}', revision: created.modRevision }], 'a write through A is an event on B');
  t.same(await b.get('/pv/one'), created, 'B reads what A wrote');
  const viaB = await b.update('/pv/one', '{"v":2}', created.modRevision);
  await t.rejects(a.update('/pv/one', '{"v":3}', created.modRevision), { code: 'Conflict' }, 'A loses with the revision B superseded');
  await t.rejects(a.create('/pv/one', '{}'), { code: 'AlreadyExists' });
  t.same((await take(watcher, 1)).map((e) => `${e.type}@${e.revision}`), [`MODIFIED@${viaB.modRevision}`]);
  t.equal((await a.list('/pv/')).revision, (await b.list('/pv/')).revision, 'both list at the same etcd revision');
  watcher.close();

  // Compaction by one process is discovered by the other.
  await a.update('/pv/one', '{"v":4}', viaB.modRevision);
  const fresh = await open(t, { prefix }); // has not seen the compaction yet
  const target = await a.currentRevision();
  await a.compact(target);
  await t.rejects(b.list('/pv/', { atRevision: created.modRevision }), { code: 'Expired' });
  t.equal(await b.compactedRevision(), target, 'B finds the compacted revision etcd did not announce');
  t.throws(() => b.watch('/pv/', { fromRevision: created.modRevision }), { code: 'Expired' }, 'then refuses an old watch up front');
  const late = fresh.watch('/pv/', { fromRevision: created.modRevision });
  await t.rejects(take(late, 1), { code: 'Expired' }, 'a store that did not know ends the watch with Expired');
  t.equal(await fresh.compactedRevision(), target, 'and learns the compacted revision from the cancel');
  t.equal(fresh.activeWatchers, 0);
});

t.test('etcd down: calls fail with Unavailable within the timeout, watches end; back up: served again without reopening', async (t) => {
  const store = await open(t);
  const before = await store.create('/o/a', '{"n":1}');
  const watcher = store.watch('/o/', { fromRevision: 0 });
  const watchEnd = take(watcher, 1).catch((e: unknown) => e);
  const host = new URL(etcd.url).host;

  await etcd.kill(true);
  const margin = 1_000;
  const timed = async (name: string, call: () => Promise<unknown>) => {
    const started = Date.now();
    const error = await call().then(
      () => undefined,
      (e: unknown) => e,
    );
    const elapsed = Date.now() - started;
    t.ok(error instanceof StoreError && error.code === 'Unavailable', `${name} rejects with Unavailable`);
    t.ok(elapsed < TIMEOUT_MS + margin, `${name} failed in ${elapsed} ms (timeout ${TIMEOUT_MS} ms)`);
    t.match((error as Error).message, host, `${name}: the message names the endpoint`);
  };
  await timed('get', () => store.get('/o/a'));
  await timed('list', () => store.list('/o/'));
  await timed('list at a revision', () => store.list('/o/', { atRevision: before.modRevision, limit: 1 }));
  await timed('create', () => store.create('/o/b', '{}'));
  await timed('update', () => store.update('/o/a', '{}', before.modRevision));
  await timed('delete', () => store.delete('/o/a'));
  await timed('currentRevision', () => store.currentRevision());
  await timed('compactedRevision', () => store.compactedRevision());
  await timed('ping', () => store.ping());
  await timed('a new watch', () => take(store.watch('/o/', { fromRevision: 0 }), 1));
  const ended = await watchEnd;
  t.ok(ended instanceof StoreError && ended.code === 'Unavailable', 'an open watch ends with Unavailable');
  t.match((ended as Error).message, host);
  t.equal(store.activeWatchers, 0);

  await etcd.start();
  const restarted = Date.now();
  await waitFor(t, 'the store to reach etcd again', () => store.ping().then(() => true, () => false), 20_000);
  t.comment(`served again ${Date.now() - restarted} ms after etcd answered health checks`);
  t.same(await store.get('/o/a'), before, 'data written before the outage is there');
  const again = store.watch('/o/', { fromRevision: before.modRevision });
  const after = await store.create('/o/after', '{}');
  t.same((await take(again, 1)).map((e) => e.revision), [after.modRevision], 'watches work again');
  again.close();
});

t.test('a dead endpoint first in the list: requests fail over to the next one', async (t) => {
  const dead = `http://127.0.0.1:${await freePort()}`;
  const store = await open(t, { endpoints: [dead, etcd.url] });
  const created = await store.create('/f/a', 'v');
  t.equal((await store.get('/f/a'))?.modRevision, created.modRevision);
  const w = store.watch('/f/', { fromRevision: 0 });
  const next = await store.create('/f/b', 'v');
  t.same((await take(w, 1)).map((e) => e.revision), [next.modRevision], 'watches go to the live endpoint');
  w.close();

  const allDead = new EtcdStore({ endpoints: [dead, `http://127.0.0.1:${await freePort()}`], requestTimeoutMs: TIMEOUT_MS });
  t.teardown(() => allDead.close());
  const error = await allDead.get('/f/a').catch((e: unknown) => e);
  t.match(error, { code: 'Unavailable' });
  t.match((error as Error).message, new URL(dead).host, 'the message names every endpoint tried');
  await t.rejects(openEtcdStore({ endpoints: [dead], requestTimeoutMs: TIMEOUT_MS }), { code: 'Unavailable' }, 'open checks that etcd answers');
});

t.test('an endpoint that accepts connections but never answers cannot hang a call', async (t) => {
  const sockets = new Set<Socket>();
  const server: Server = createServer((socket) => {
    sockets.add(socket);
    socket.on('error', () => {});
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  t.teardown(() => {
    for (const s of sockets) s.destroy();
    server.close();
  });
  const address = server.address();
  const endpoint = `http://127.0.0.1:${typeof address === 'object' && address ? address.port : 0}`;
  const store = new EtcdStore({ endpoints: [endpoint], requestTimeoutMs: 800 });
  t.teardown(() => store.close());
  for (const [name, call] of [
    ['get', () => store.get('/h/a')],
    ['create', () => store.create('/h/a', 'v')],
    ['watch', () => take(store.watch('/h/', { fromRevision: 0 }), 1)],
  ] as const) {
    const started = Date.now();
    const error = await call().catch((e: unknown) => e);
    const elapsed = Date.now() - started;
    t.match(error, { code: 'Unavailable' }, `${name} fails with Unavailable`);
    t.ok(elapsed < 800 + 700, `${name} gave up after ${elapsed} ms`);
  }
});

t.test('mutual TLS: the CA, client certificate and key files are used', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'kmm-preflight-etcd-tls-'));
  const ca = generateCa('etcd-test-ca');
  const server = issueServerCertificate({ caCertPem: ca.certPem, caKeyPem: ca.keyPem });
  const client = issueClientCertificate({ caCertPem: ca.certPem, caKeyPem: ca.keyPem, commonName: 'kmm-preflight' });
  const other = generateCa('some-other-ca');
  const files = {
    ca: join(dir, 'ca.crt'),
    otherCa: join(dir, 'other-ca.crt'),
    serverCert: join(dir, 'server.crt'),
    serverKey: join(dir, 'server.key'),
    clientCert: join(dir, 'client.crt'),
    clientKey: join(dir, 'client.key'),
  };
  writeFileSync(files.ca, ca.certPem);
  writeFileSync(files.otherCa, other.certPem);
  writeFileSync(files.serverCert, server.certPem);
  writeFileSync(files.serverKey, server.keyPem, { mode: 0o600 });
  writeFileSync(files.clientCert, client.certPem);
  writeFileSync(files.clientKey, client.keyPem, { mode: 0o600 });

  const [clientPort, peerPort] = [await freePort(), await freePort()];
  const url = `https://127.0.0.1:${clientPort}`;
  const peer = `http://127.0.0.1:${peerPort}`;
  const child = spawn(
    await ensureDebianBinary('etcd', 'etcd-server'),
    [
      '--name', 'tls', '--data-dir', join(dir, 'data'),
      '--listen-client-urls', url, '--advertise-client-urls', url,
      '--listen-peer-urls', peer, '--initial-advertise-peer-urls', peer, '--initial-cluster', `tls=${peer}`,
      '--cert-file', files.serverCert, '--key-file', files.serverKey,
      '--trusted-ca-file', files.ca, '--client-cert-auth',
      '--log-level', 'warn', '--logger', 'zap',
    ],
    { stdio: ['ignore', 'ignore', 'pipe'] },
  );
  let stderr = '';
  child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
  t.teardown(async () => {
    if (child.exitCode === null) {
      child.kill('SIGKILL');
      await once(child, 'exit');
    }
    await rm(dir, { recursive: true, force: true });
  });

  const tls = { caFile: files.ca, certFile: files.clientCert, keyFile: files.clientKey };
  let store: EtcdStore | undefined;
  const deadline = Date.now() + 20_000;
  while (store === undefined) {
    store = await openEtcdStore({ endpoints: [url], tls, requestTimeoutMs: TIMEOUT_MS }).catch(() => undefined);
    if (store === undefined) {
      if (child.exitCode !== null || Date.now() > deadline) throw new Error(`etcd with TLS did not come up:\n${stderr}`);
      await new Promise((r) => setTimeout(r, 200));
    }
  }
  const tlsStore = store;
  t.teardown(() => tlsStore.close());
  const w = tlsStore.watch('/tls/', { fromRevision: 0 });
  const created = await tlsStore.create('/tls/a', '{"secure":true}');
  t.same(await tlsStore.get('/tls/a'), created, 'reads and writes over mutual TLS');
  t.same((await take(w, 1)).map((e) => e.revision), [created.modRevision], 'and watches');
  w.close();

  const hostless = await openEtcdStore({ endpoints: [`127.0.0.1:${clientPort}`], tls, requestTimeoutMs: TIMEOUT_MS });
  t.teardown(() => hostless.close());
  t.equal(hostless.endpoints[0], url, 'an endpoint without a scheme is https when TLS is configured');

  await t.rejects(
    openEtcdStore({ endpoints: [url], tls: { caFile: files.ca }, requestTimeoutMs: TIMEOUT_MS }),
    { code: 'Unavailable' },
    'without a client certificate etcd refuses the connection',
  );
  await t.rejects(
    openEtcdStore({ endpoints: [url], tls: { ...tls, caFile: files.otherCa }, requestTimeoutMs: TIMEOUT_MS }),
    { code: 'Unavailable' },
    'a server certificate from another CA is refused',
  );
  await t.rejects(
    openEtcdStore({ endpoints: [url], tls: { ...tls, caFile: join(dir, 'missing.crt') } }),
    { code: 'Unavailable', message: /missing\.crt/ },
    'an unreadable TLS file is named',
  );
  await t.rejects(openEtcdStore({ endpoints: [url], tls: { certFile: files.clientCert } }), RangeError, 'a certificate needs its key');
});

t.test('latency of get and create on a local etcd', async (t) => {
  const store = await open(t);
  const value = JSON.stringify({ apiVersion: 'kmm.sigs.x-k8s.io/v1beta2', kind: 'PreflightValidation', metadata: { name: 'x' }, spec: { kernelVersion: '6.1.0-18-amd64' } });
  const creates: number[] = [];
  const gets: number[] = [];
  for (let i = 0; i < 200; i++) {
    let started = performance.now();
    await store.create(`/lat/${i}`, value);
    creates.push(performance.now() - started);
    started = performance.now();
    await store.get(`/lat/${i}`);
    gets.push(performance.now() - started);
  }
  t.comment(`create: ${stats(creates)}`);
  t.comment(`get: ${stats(gets)}`);
  t.ok(gets.reduce((s, x) => s + x, 0) / gets.length < 50, 'a get takes milliseconds');
});
