/**
 * Authentication and authorization in the filter chain: health without credentials, 401 and 403
 * as Status objects naming what was refused.
 */
import t from 'tap';
import { buildTestApp, PFV } from '../helpers/app.ts';

t.test('health endpoints need no credentials; everything else does', async (t) => {
  const h = await buildTestApp({ user: null });
  t.teardown(() => h.close());
  for (const path of ['/healthz', '/livez', '/readyz']) {
    const r = await h.app.inject({ method: 'GET', url: path });
    t.equal(r.statusCode, 200, path);
    t.equal(r.body, 'ok');
  }
  const verbose = await h.app.inject({ method: 'GET', url: '/readyz?verbose' });
  t.match(verbose.body, /\[\+\]storage ok/);
  const r = await h.app.inject({ method: 'GET', url: PFV });
  t.equal(r.statusCode, 401);
  t.match(r.json(), { kind: 'Status', reason: 'Unauthorized', code: 401 });
  t.equal((await h.app.inject({ method: 'GET', url: '/apis' })).statusCode, 401);
});

t.test('readiness fails when storage is closed', async (t) => {
  const h = await buildTestApp();
  await h.store.close();
  const r = await h.app.inject({ method: 'GET', url: '/readyz' });
  t.equal(r.statusCode, 500);
  t.match(r.body, /\[-\]storage failed/);
  await h.app.close();
});

t.test('a denied request is 403 naming the user, verb and resource', async (t) => {
  const seen: unknown[] = [];
  const h = await buildTestApp({
    user: { username: 'jane', groups: ['dev'] },
    authorizer: {
      authorize: async (a) => {
        seen.push({ verb: a.verb, resource: a.resource, subresource: a.subresource, name: a.name });
        return { allowed: a.verb === 'get', reason: 'RBAC: jane may only read' };
      },
    },
  });
  t.teardown(() => h.close());
  const r = await h.app.inject({ method: 'DELETE', url: `${PFV}/x` });
  t.equal(r.statusCode, 403);
  t.equal(r.json().message, 'preflightvalidations.kmm.sigs.x-k8s.io "x" is forbidden: User "jane" cannot delete resource "preflightvalidations" in API group "kmm.sigs.x-k8s.io": RBAC: jane may only read');
  await h.app.inject({ method: 'PATCH', url: `${PFV}/x/status`, headers: { 'content-type': 'application/merge-patch+json' }, payload: '{}' });
  await h.app.inject({ method: 'GET', url: `${PFV}?watch=1` });
  await h.app.inject({ method: 'DELETE', url: PFV });
  t.same(seen.slice(1), [
    { verb: 'patch', resource: 'preflightvalidations', subresource: 'status', name: 'x' },
    { verb: 'watch', resource: 'preflightvalidations', subresource: undefined, name: undefined },
    { verb: 'deletecollection', resource: 'preflightvalidations', subresource: undefined, name: undefined },
  ]);
});
