/**
 * Acceptance on etcd: two server processes share one etcd and see each other's writes through
 * watch; with etcd down requests fail promptly with 503 and /readyz fails; with etcd back the
 * server recovers without a restart.
 */
import t from 'tap';
import { startEtcd, type TestEtcd } from '../helpers/etcd.ts';
import { startTestServer, type TestServer } from '../helpers/server.ts';

const BASE = '/apis/kmm.sigs.x-k8s.io/v1beta2/preflightvalidations';
const body = (name: string) =>
  JSON.stringify({ apiVersion: 'kmm.sigs.x-k8s.io/v1beta2', kind: 'PreflightValidation', metadata: { name }, spec: { kernelVersion: '6.1.0-18-amd64' } });
const JSON_TYPE = { 'content-type': 'application/json' };

let etcd: TestEtcd;
let a: TestServer;
let b: TestServer;
t.before(async () => {
  etcd = await startEtcd();
  const args = ['--storage', 'etcd', '--etcd-servers', etcd.url];
  [a, b] = await Promise.all([startTestServer(args), startTestServer(args)]);
});
t.teardown(async () => {
  await Promise.all([a?.stop(), b?.stop()]);
  await etcd?.stop();
});

t.test('a write through one server is seen by a watch on the other', async (t) => {
  const list = await b.request('GET', BASE);
  const rv = list.json<{ metadata: { resourceVersion: string } }>().metadata.resourceVersion;
  const watch = b.request('GET', `${BASE}?watch=true&resourceVersion=${rv}&timeoutSeconds=3`);
  await new Promise((r) => setTimeout(r, 300));
  const created = await a.request('POST', BASE, { body: body('shared'), headers: JSON_TYPE });
  t.equal(created.status, 201);
  const events = (await watch).body.trim().split('\n').filter(Boolean).map((l) => JSON.parse(l) as { type: string; object: { metadata: { name: string; resourceVersion: string } } });
  t.same(events.map((e) => `${e.type}:${e.object.metadata.name}`), ['ADDED:shared']);
  t.equal(events[0]!.object.metadata.resourceVersion, created.json<{ metadata: { resourceVersion: string } }>().metadata.resourceVersion, 'both servers speak etcd revisions');
  const viaB = await b.request('GET', `${BASE}/shared`);
  t.equal(viaB.status, 200, 'and the other server reads it');
});

t.test('etcd down: 503 Status promptly and /readyz fails; etcd back: served again without restart', async (t) => {
  await etcd.kill(true);
  const started = Date.now();
  const r = await a.request('GET', `${BASE}/shared`);
  const elapsed = Date.now() - started;
  t.equal(r.status, 503);
  t.match(r.json(), { kind: 'Status', reason: 'ServiceUnavailable' });
  t.ok(elapsed < 8000, `answered in ${elapsed} ms`);
  const w = await a.request('POST', BASE, { body: body('while-down'), headers: JSON_TYPE });
  t.equal(w.status, 503);
  const ready = await a.request('GET', '/readyz', { anonymous: true });
  t.equal(ready.status, 500);
  t.match(ready.body, /\[-\]storage failed/);

  await etcd.start();
  const deadline = Date.now() + 20_000;
  let back = await a.request('GET', `${BASE}/shared`);
  while (back.status !== 200 && Date.now() < deadline) {
    await new Promise((res) => setTimeout(res, 250));
    back = await a.request('GET', `${BASE}/shared`);
  }
  t.equal(back.status, 200, 'the server recovered by itself');
  t.equal((await a.request('GET', '/readyz', { anonymous: true })).status, 200);
  t.equal((await a.request('POST', BASE, { body: body('after'), headers: JSON_TYPE })).status, 201);
});
